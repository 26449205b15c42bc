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
}

/// An engine over the opened backends.
pub(crate) struct Session {
    pub(crate) engine: Engine,
    pub(crate) target_cache: String,
    pub(crate) target_db: String,
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
        Ok(Target {
            cache_url,
            db_url,
            namespace: c.namespace.clone(),
            timeout,
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
