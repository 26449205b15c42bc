//! Opening the backends and the tables an operator names.

use std::future::Future;
use std::time::Duration;

use writethrough::{ColumnType, Engine, Handle, Key, Row, Table, TableOptions};

use crate::Fatal;
use crate::args::Conn;

/// The backends to open, checked before anything is opened.
#[derive(Debug)]
pub(crate) struct Target {
    cache_url: String,
    db_url: String,
    namespace: String,
    timeout: Duration,
    types: Vec<TypeOverride>,
}

/// `--type [TABLE.]COLUMN=TYPE`.
#[derive(Debug, Clone)]
struct TypeOverride {
    table: Option<String>,
    column: String,
    ty: ColumnType,
}

impl TypeOverride {
    fn parse(text: &str) -> Result<TypeOverride, Fatal> {
        let bad = || {
            Fatal::new(format!(
                "--type {text:?}: expected [TABLE.]COLUMN=TYPE with TYPE one of bool, int, float, text, bytes, json"
            ))
        };
        let (name, ty) = text.split_once('=').ok_or_else(bad)?;
        let ty = match ty.trim() {
            "bool" => ColumnType::Bool,
            "int" => ColumnType::Int,
            "float" => ColumnType::Float,
            "text" => ColumnType::Text,
            "bytes" => ColumnType::Bytes,
            "json" => ColumnType::Json,
            _ => return Err(bad()),
        };
        let (table, column) = match name.split_once('.') {
            Some((t, c)) => (Some(t.to_owned()), c.to_owned()),
            None => (None, name.to_owned()),
        };
        if column.is_empty() {
            return Err(bad());
        }
        Ok(TypeOverride { table, column, ty })
    }
}

/// `table` with the column types `types` give it.
fn with_types(table: Table, types: &[TypeOverride]) -> Result<Table, Fatal> {
    let name = table.name().as_str();
    let mine: Vec<&TypeOverride> = types
        .iter()
        .filter(|o| o.table.as_deref().is_none_or(|t| t == name))
        .collect();
    for o in &mine {
        if o.table.is_some() && table.column(&o.column).is_none() {
            return Err(Fatal::new(format!(
                "--type {name}.{}: table {name} has no column {}",
                o.column, o.column
            )));
        }
    }
    if mine.is_empty() {
        return Ok(table);
    }
    let ty_of = |c: &writethrough::Column| {
        mine.iter()
            .rev()
            .find(|o| o.column == c.name.as_str())
            .map_or(c.ty, |o| o.ty)
    };
    let key = table.key_column();
    let mut b = Table::builder(name).key(key.name.as_str(), ty_of(key));
    for c in &table.columns()[1..] {
        b = b.column_with(c.name.as_str(), ty_of(c), c.nullable);
    }
    Ok(b.build()?)
}

/// An engine over the opened backends.
pub(crate) struct Session {
    pub(crate) engine: Engine,
    pub(crate) target_cache: String,
    pub(crate) target_db: String,
    types: Vec<TypeOverride>,
}

impl Target {
    pub(crate) fn from_args(c: &Conn) -> Result<Target, Fatal> {
        let cache_url = c
            .cache
            .clone()
            .ok_or_else(|| Fatal::new("no cache URL: pass --cache or set WT_CACHE_URL"))?;
        let db_url =
            c.db.clone()
                .ok_or_else(|| Fatal::new("no database URL: pass --db or set WT_DB_URL"))?;
        let timeout = Duration::try_from_secs_f64(c.connect_timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| {
                Fatal::new(format!(
                    "--connect-timeout {} is not a positive number of seconds",
                    c.connect_timeout
                ))
            })?;
        let types = c
            .types
            .iter()
            .map(|t| TypeOverride::parse(t))
            .collect::<Result<_, _>>()?;
        Ok(Target {
            cache_url,
            db_url,
            namespace: c.namespace.clone(),
            timeout,
            types,
        })
    }

    /// Opens both backends (each must answer a ping within the timeout)
    /// and an engine over them in the namespace. The engine replays no
    /// outbox records on its own: `outbox` shows them untouched unless
    /// asked to replay.
    pub(crate) async fn open(&self) -> Result<Session, Fatal> {
        let cache_shown = redact(&self.cache_url);
        let db_shown = redact(&self.db_url);
        let cache = self
            .within(&format!("the cache at {cache_shown}"), async {
                let c = writethrough::open_cache(&self.cache_url).await?;
                c.ping().await?;
                Ok(c)
            })
            .await?;
        let db = self
            .within(&format!("the database at {db_shown}"), async {
                let d = writethrough::open_db(&self.db_url).await?;
                d.ping().await?;
                Ok(d)
            })
            .await?;
        let engine = Engine::builder_dyn(cache, db)
            .namespace(&self.namespace)
            .configure(|cfg| cfg.reconcile_interval = None)
            .build()?;
        Ok(Session {
            engine,
            target_cache: cache_shown,
            target_db: db_shown,
            types: self.types.clone(),
        })
    }

    async fn within<T>(
        &self,
        what: &str,
        f: impl Future<Output = writethrough::Result<T>>,
    ) -> Result<T, Fatal> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Fatal::new(format!("cannot use {what}: {e}"))),
            Err(_) => Err(Fatal::new(format!(
                "cannot use {what}: no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

impl Session {
    /// The table `name` as the database describes it, registered for plain
    /// rows without creating or altering anything.
    pub(crate) async fn table(&self, name: &str) -> Result<Handle<Row>, Fatal> {
        let table = self.engine.raw_db().describe_table(name).await?;
        let table = with_types(table, &self.types)?;
        let handle = self
            .engine
            .register_table(table, TableOptions::new().create_table(false))
            .await?;
        Ok(handle)
    }

    /// The tables an engine manages (those with a version column), or the
    /// one named.
    pub(crate) async fn tables(&self, only: Option<&str>) -> Result<Vec<Handle<Row>>, Fatal> {
        let names = match only {
            Some(t) => vec![t.to_owned()],
            None => self.engine.raw_db().managed_tables().await?,
        };
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            out.push(self.table(&n).await?);
        }
        Ok(out)
    }
}

/// Parses `text` as a key of `table`'s key column.
pub(crate) fn parse_key(table: &Table, text: &str) -> Result<Key, Fatal> {
    let col = table.key_column();
    let key = match col.ty {
        ColumnType::Int => text.trim().parse::<i64>().map(Key::Int).map_err(|_| {
            Fatal::new(format!(
                "key {text:?} is not an integer: table {} has the int key {}",
                table.name(),
                col.name
            ))
        })?,
        _ => Key::Text(text.to_owned()),
    };
    table.check_key(&key)?;
    Ok(key)
}

/// The URL with its password hidden, for messages.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority
        .rsplit_once('@')
        .and_then(|(userinfo, host)| Some((userinfo.split_once(':')?.0, host)))
    {
        Some((user, host)) => format!("{scheme}://{user}:***@{host}{path}"),
        None => url.to_owned(),
    }
}

/// A key as JSON: a number for int keys, a string for text keys.
pub(crate) fn key_json(key: &Key) -> serde_json::Value {
    match key {
        Key::Int(i) => (*i).into(),
        Key::Text(s) => s.clone().into(),
    }
}

/// A row as a JSON object, in column order.
pub(crate) fn row_json(row: &Row) -> serde_json::Value {
    serde_json::Value::Object(
        row.iter()
            .map(|(c, v)| (c.as_str().to_owned(), writethrough::codec::value_to_json(v)))
            .collect(),
    )
}

/// A duration for people: `850 µs`, `12.3 ms`, `4.2 s`, `3 min`, `2 h`.
pub(crate) fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 2.0 * 86_400.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s < 730.0 * 86_400.0 {
        format!("{:.0} days", s / 86_400.0)
    } else {
        format!("{:.0} years", s / (365.0 * 86_400.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_and_the_rest_kept() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/shop"),
            "postgres://app:***@db:5432/shop"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("sqlite://app.db"), "sqlite://app.db");
        assert_eq!(redact("postgres://app@db/shop"), "postgres://app@db/shop");
        assert_eq!(redact("redis://:pw@cache:6379"), "redis://:***@cache:6379");
    }

    #[test]
    fn type_overrides_retype_their_columns_and_refuse_unknown_ones() {
        let t = Table::builder("t")
            .key("id", ColumnType::Int)
            .column("flag", ColumnType::Int)
            .nullable("attrs", ColumnType::Text)
            .build()
            .unwrap();
        let o = |s: &str| TypeOverride::parse(s).unwrap();
        let t2 = with_types(
            t.clone(),
            &[o("flag=bool"), o("t.attrs=json"), o("u.flag=text")],
        )
        .unwrap();
        assert_eq!(t2.column("flag").unwrap().ty, ColumnType::Bool);
        assert_eq!(t2.column("attrs").unwrap().ty, ColumnType::Json);
        assert!(t2.column("attrs").unwrap().nullable);
        assert!(with_types(t, &[o("t.nope=bool")]).is_err());
        for bad in ["flag", "flag=date", "=bool"] {
            assert!(TypeOverride::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_parse_as_the_key_columns_type() {
        let t = Table::builder("t")
            .key("id", ColumnType::Int)
            .build()
            .unwrap();
        assert_eq!(parse_key(&t, "42").unwrap(), Key::Int(42));
        let e = parse_key(&t, "abc").unwrap_err();
        assert!(e.0.contains("not an integer"), "{}", e.0);
    }
}
