//! SQL text for one table, values to and from SQLite, and error mapping.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, OptionalExtension, ToSql, params_from_iter};
use writethrough_core::backend::{OUTBOX_TABLE, VERSION_COLUMN, Write, WriteOp, WriteOutcome};
use writethrough_core::{
    ColumnType, Error, ErrorKind, Key, Patch, Result, Row, Table, Value, VersionedRow,
};

pub(crate) const SEQ_TABLE: &str = "_wt_seq";

/// Maps a rusqlite error to ours, in one place. The message says what
/// happened in words of our own where we know them, else SQLite's.
pub(crate) fn map_err(e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode as C;
    let (kind, msg) = match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::DatabaseBusy | C::DatabaseLocked => (
                ErrorKind::Busy,
                "the database stayed locked past the busy timeout",
            ),
            C::ConstraintViolation => (ErrorKind::ConstraintViolation, ""),
            // A file that is not a database (or is encrypted): no retry helps.
            C::NotADatabase => (
                ErrorKind::Config,
                "the file is not a SQLite database (or it is encrypted or corrupt)",
            ),
            C::CannotOpen => (ErrorKind::Unavailable, "the database file cannot be opened"),
            C::PermissionDenied | C::ReadOnly => (
                ErrorKind::Unavailable,
                "the database file cannot be written (permissions, or read-only)",
            ),
            C::DatabaseCorrupt => (ErrorKind::Backend, "the database file is corrupt"),
            C::DiskFull => (ErrorKind::Unavailable, "the disk is full"),
            C::TooBig => (
                ErrorKind::InvalidValue,
                "a value is larger than SQLite allows",
            ),
            _ => (ErrorKind::Backend, ""),
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => (
            ErrorKind::SchemaMismatch,
            "a stored value does not fit the declared column type",
        ),
        _ => (ErrorKind::Backend, ""),
    };
    // An empty message takes the source's text (see `Error::with_source`).
    Error::new(kind, msg).with_backend("sqlite").with_source(e)
}

pub(crate) struct Bind<'a>(pub(crate) &'a Value);

impl ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Null => ToSqlOutput::Owned(SqlValue::Null),
            Value::Bool(b) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*b))),
            Value::Int(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            Value::Float(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Value::Json(j) => ToSqlOutput::Owned(SqlValue::Text(j.to_string())),
        })
    }
}

pub(crate) struct BindKey<'a>(pub(crate) &'a Key);

impl ToSql for BindKey<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Key::Int(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            Key::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

fn decode(ty: ColumnType, v: ValueRef<'_>) -> Result<Value> {
    let bad = || {
        Error::new(
            ErrorKind::SchemaMismatch,
            format!(
                "a stored {} does not fit a {} column",
                v.data_type(),
                ty.as_str()
            ),
        )
    };
    Ok(match (ty, v) {
        (_, ValueRef::Null) => Value::Null,
        (ColumnType::Bool, ValueRef::Integer(i)) => Value::Bool(i != 0),
        (ColumnType::Int, ValueRef::Integer(i)) => Value::Int(i),
        (ColumnType::Float, ValueRef::Real(f)) => Value::Float(f),
        (ColumnType::Float, ValueRef::Integer(i)) => Value::Float(i as f64),
        (ColumnType::Text, ValueRef::Text(t)) => {
            Value::Text(String::from_utf8(t.to_vec()).map_err(|_| bad())?)
        }
        (ColumnType::Bytes, ValueRef::Blob(b)) => Value::Bytes(b.to_vec()),
        (ColumnType::Json, ValueRef::Text(t)) => {
            Value::Json(serde_json::from_slice(t).map_err(|e| bad().with_source(e))?)
        }
        _ => return Err(bad()),
    })
}

/// Reads a full row (every column, then the version) from a result row.
pub(crate) fn read_row(table: &Table, r: &rusqlite::Row<'_>) -> Result<VersionedRow> {
    let mut row = Row::with_capacity(table.columns().len());
    for (i, col) in table.columns().iter().enumerate() {
        let v = r.get_ref(i).map_err(map_err)?;
        row.insert(col.name.clone(), decode(col.ty, v)?);
    }
    let version: i64 = r.get(table.columns().len()).map_err(map_err)?;
    Ok(VersionedRow {
        row,
        version: u64::try_from(version).unwrap_or(0),
    })
}

fn sql_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Bool | ColumnType::Int => "INTEGER",
        ColumnType::Float => "REAL",
        ColumnType::Text | ColumnType::Json => "TEXT",
        ColumnType::Bytes => "BLOB",
        _ => "ANY",
    }
}

/// The SQL function that ranks keys for a random sample (see
/// [`register_functions`]).
pub(crate) const SAMPLE_RANK: &str = "wt_sample_rank";

/// Registers `wt_sample_rank(seed, key)` on a connection: a 64-bit hash of
/// the seed and the key (its type and bytes), so that `ORDER BY` it picks
/// a random sample that the same seed picks again. SQLite's `random()`
/// cannot be seeded.
pub(crate) fn register_functions(conn: &Connection) -> Result<()> {
    use rusqlite::functions::FunctionFlags;
    use rusqlite::types::ValueRef;
    conn.create_scalar_function(
        SAMPLE_RANK,
        2,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let seed: i64 = ctx.get(0)?;
            let mut h = Fnv::new(seed.to_le_bytes());
            match ctx.get_raw(1) {
                ValueRef::Integer(i) => h.feed(b'i', &i.to_le_bytes()),
                ValueRef::Text(t) => h.feed(b't', t),
                ValueRef::Blob(b) => h.feed(b'b', b),
                ValueRef::Real(f) => h.feed(b'r', &f.to_le_bytes()),
                ValueRef::Null => h.feed(b'n', &[]),
            }
            // The top bit cleared: SQLite integers are signed.
            Ok((h.finish() >> 1) as i64)
        },
    )
    .map_err(map_err)
}

/// FNV-1a over the seed and the value, then a splitmix64 finaliser so that
/// neighbouring keys land far apart.
struct Fnv(u64);

impl Fnv {
    fn new(seed: [u8; 8]) -> Self {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        h.bytes(&seed);
        h
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn feed(&mut self, tag: u8, b: &[u8]) {
        self.bytes(&[tag]);
        self.bytes(b);
    }
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Up to `n` rows of `t`, ranked by [`SAMPLE_RANK`] under `seed`.
pub(crate) fn sample(
    conn: &Connection,
    t: &Table,
    n: usize,
    seed: u64,
) -> Result<Vec<VersionedRow>> {
    let sql = TableSql::new(t);
    let mut stmt = conn.prepare_cached(&sql.sample).map_err(map_err)?;
    let mut rows = stmt
        .query(rusqlite::params![
            i64::try_from(n).unwrap_or(i64::MAX),
            i64::from_le_bytes(seed.to_le_bytes())
        ])
        .map_err(map_err)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(map_err)? {
        out.push(read_row(t, r)?);
    }
    Ok(out)
}

/// `count(*)` of `t`.
pub(crate) fn count(conn: &Connection, t: &Table) -> Result<u64> {
    let sql = TableSql::new(t);
    let n: i64 = conn
        .prepare_cached(&sql.count)
        .map_err(map_err)?
        .query_row([], |r| r.get(0))
        .map_err(map_err)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// The statements of one table, built once.
pub(crate) struct TableSql {
    pub(crate) create: String,
    pub(crate) upsert: String,
    upsert_head: String,
    upsert_tail: String,
    width: usize,
    pub(crate) select: String,
    /// The rows of the keys in a JSON array: one statement for any number.
    pub(crate) select_many: String,
    pub(crate) delete: String,
    pub(crate) scan_first: String,
    pub(crate) scan_after: String,
    /// `?1` rows ranked by `wt_sample_rank(?2, key)`: a random sample, by seed.
    pub(crate) sample: String,
    pub(crate) count: String,
    /// `UPDATE ... SET` prefix; the patch's columns follow.
    pub(crate) select_cols: String,
}

impl TableSql {
    pub(crate) fn new(t: &Table) -> Self {
        let name = t.name().quoted();
        let key = t.key_column().name.quoted();
        let cols: Vec<String> = t.columns().iter().map(|c| c.name.quoted()).collect();
        let select_cols = format!("{}, \"{VERSION_COLUMN}\"", cols.join(", "));
        let defs: Vec<String> = t
            .columns()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pk = if i == 0 { " PRIMARY KEY" } else { "" };
                let null = if c.nullable { "" } else { " NOT NULL" };
                format!("{} {}{pk}{null}", c.name.quoted(), sql_type(c.ty))
            })
            .collect();
        let placeholders: Vec<String> = (1..=cols.len() + 1).map(|i| format!("?{i}")).collect();
        let updates: Vec<String> = cols[1..]
            .iter()
            .chain(std::iter::once(&format!("\"{VERSION_COLUMN}\"")))
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        let set = if updates.is_empty() {
            String::new()
        } else {
            updates.join(", ")
        };
        TableSql {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {name} ({}, \"{VERSION_COLUMN}\" INTEGER NOT NULL DEFAULT 0) STRICT",
                defs.join(", ")
            ),
            upsert: format!(
                "INSERT INTO {name} ({}, \"{VERSION_COLUMN}\") VALUES ({}) ON CONFLICT ({key}) DO UPDATE SET {set}",
                cols.join(", "),
                placeholders.join(", ")
            ),
            upsert_head: format!(
                "INSERT INTO {name} ({}, \"{VERSION_COLUMN}\")",
                cols.join(", ")
            ),
            upsert_tail: format!("ON CONFLICT ({key}) DO UPDATE SET {set}"),
            width: cols.len() + 1,
            select: format!("SELECT {select_cols} FROM {name} WHERE {key} = ?1"),
            select_many: format!(
                "SELECT {select_cols} FROM {name} WHERE {key} IN (SELECT value FROM json_each(?1))"
            ),
            delete: format!("DELETE FROM {name} WHERE {key} = ?1"),
            scan_first: format!("SELECT {select_cols} FROM {name} ORDER BY {key} LIMIT ?1"),
            scan_after: format!(
                "SELECT {select_cols} FROM {name} WHERE {key} > ?1 ORDER BY {key} LIMIT ?2"
            ),
            sample: format!(
                "SELECT {select_cols} FROM {name} ORDER BY {SAMPLE_RANK}(?2, {key}) LIMIT ?1"
            ),
            count: format!("SELECT count(*) FROM {name}"),
            select_cols,
        }
    }

    /// The upsert of `n` rows in one statement (plain `?` placeholders,
    /// bound in order).
    fn upsert_rows(&self, n: usize) -> String {
        if n == 1 {
            return self.upsert.clone();
        }
        let row = format!("({})", vec!["?"; self.width].join(", "));
        format!(
            "{} VALUES {} {}",
            self.upsert_head,
            vec![row; n].join(", "),
            self.upsert_tail
        )
    }

    fn update(&self, t: &Table, patch: &Patch) -> String {
        let sets: Vec<String> = patch
            .columns()
            .iter()
            .enumerate()
            .map(|(i, (c, _))| format!("{} = ?{}", c.quoted(), i + 1))
            .collect();
        let n = sets.len();
        format!(
            "UPDATE {} SET {}, \"{VERSION_COLUMN}\" = ?{} WHERE {} = ?{} RETURNING {}",
            t.name().quoted(),
            sets.join(", "),
            n + 1,
            t.key_column().name.quoted(),
            n + 2,
            self.select_cols
        )
    }
}

/// Per-connection cache of table statements, by table name.
#[derive(Default)]
pub(crate) struct SqlCache {
    tables: HashMap<String, Arc<TableSql>>,
}

impl SqlCache {
    pub(crate) fn get(&mut self, t: &Table) -> Arc<TableSql> {
        if let Some(s) = self.tables.get(t.name().as_str()) {
            return s.clone();
        }
        let s = Arc::new(TableSql::new(t));
        self.tables.insert(t.name().as_str().to_owned(), s.clone());
        s
    }
}

pub(crate) fn engine_tables_sql() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS \"{SEQ_TABLE}\" (id INTEGER PRIMARY KEY CHECK (id = 1), v INTEGER NOT NULL) STRICT;
         INSERT OR IGNORE INTO \"{SEQ_TABLE}\" (id, v) VALUES (1, 0);
         CREATE TABLE IF NOT EXISTS \"{OUTBOX_TABLE}\" (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             tbl TEXT NOT NULL,
             key TEXT NOT NULL,
             version INTEGER NOT NULL,
             created_ms INTEGER NOT NULL
         ) STRICT;"
    )
}

/// Creates the table if missing; checks its columns and adds the version
/// column to a table that predates the engine.
pub(crate) fn ensure_table(conn: &Connection, cache: &mut SqlCache, t: &Table) -> Result<()> {
    conn.execute_batch(&engine_tables_sql()).map_err(map_err)?;
    let sql = cache.get(t);
    conn.execute(&sql.create, []).map_err(map_err)?;
    let mut stmt = conn
        .prepare(&format!(
            "SELECT name, type, pk FROM pragma_table_info({})",
            quote_literal(t.name().as_str())
        ))
        .map_err(map_err)?;
    let existing: Vec<(String, String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(map_err)?
        .collect::<rusqlite::Result<_>>()
        .map_err(map_err)?;
    let mismatch = |m: String| Err(Error::new(ErrorKind::SchemaMismatch, m).with_backend("sqlite"));
    for (i, c) in t.columns().iter().enumerate() {
        let Some((_, declared, pk)) = existing.iter().find(|(n, _, _)| n == c.name.as_str()) else {
            return mismatch(format!(
                "table {} exists without column {}",
                t.name(),
                c.name
            ));
        };
        if !fits(c.ty, declared) {
            return mismatch(format!(
                "column {}.{} is declared {declared:?}, which does not hold {} values (expected {})",
                t.name(),
                c.name,
                c.ty.as_str(),
                sql_type(c.ty)
            ));
        }
        let is_key = i == 0;
        if is_key && *pk != 1 {
            return mismatch(format!(
                "key column {}.{} is not the table's primary key",
                t.name(),
                c.name
            ));
        }
    }
    if existing.iter().filter(|(_, _, pk)| *pk > 0).count() > 1 {
        return mismatch(format!(
            "table {} has a primary key of several columns; the key {} must be the only one",
            t.name(),
            t.key_column().name
        ));
    }
    let existing: Vec<String> = existing.into_iter().map(|(n, _, _)| n).collect();
    if !existing.iter().any(|e| e == VERSION_COLUMN) {
        conn.execute(
            &format!(
                "ALTER TABLE {} ADD COLUMN \"{VERSION_COLUMN}\" INTEGER NOT NULL DEFAULT 0",
                t.name().quoted()
            ),
            [],
        )
        .map_err(map_err)?;
    }
    Ok(())
}

/// Whether a column declared `declared` holds values of `ty`, by SQLite's
/// type affinity rules (section 3.1 of its datatype documentation), so that
/// tables made by hand with `INT`, `VARCHAR(20)` or `DOUBLE` pass, and a
/// column whose affinity would convert or refuse our values does not.
fn fits(ty: ColumnType, declared: &str) -> bool {
    let d = declared.to_ascii_uppercase();
    let affinity = if d.contains("INT") {
        "INTEGER"
    } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
        "TEXT"
    } else if d.contains("BLOB") || d.is_empty() {
        "BLOB"
    } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
        "REAL"
    } else {
        "NUMERIC"
    };
    affinity == sql_type(ty)
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

const BUMP_SQL: &str = "UPDATE \"_wt_seq\" SET v = v + ?1 WHERE id = 1 RETURNING v";

/// Takes `n` versions from the sequence; returns the last (the others are
/// the `n - 1` before it).
fn bump_versions(conn: &Connection, n: usize) -> Result<u64> {
    let v: i64 = conn
        .prepare_cached(BUMP_SQL)
        .map_err(map_err)?
        .query_row([n as i64], |r| r.get(0))
        .map_err(map_err)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// The wall clock in Unix milliseconds, as the outbox and change tables
/// store it.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether the database has a table named `name`.
pub(crate) fn table_exists(conn: &Connection, name: &str) -> Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |r| r.get(0),
    )
    .map_err(map_err)
}

/// Records the cache effects of `(key, version)` pairs of table `t` in the
/// outbox, in one statement per chunk; returns their ids in order.
fn record_outbox(conn: &Connection, t: &Table, entries: &[(Key, u64)]) -> Result<Vec<i64>> {
    let now = now_ms();
    let mut ids = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(ROWS_PER_STATEMENT) {
        let values = vec!["(?, ?, ?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO \"{OUTBOX_TABLE}\" (tbl, key, version, created_ms) VALUES {values} RETURNING id, version"
        );
        let mut params: Vec<rusqlite::types::Value> = Vec::with_capacity(4 * chunk.len());
        for (key, version) in chunk {
            params.push(t.name().as_str().to_owned().into());
            params.push(key.encode().into());
            params.push((*version as i64).into());
            params.push(now.into());
        }
        let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
        let mut by_version: Vec<(i64, i64)> = stmt
            .query_map(params_from_iter(params), |r| Ok((r.get(1)?, r.get(0)?)))
            .map_err(map_err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(map_err)?;
        // RETURNING gives no order; versions are unique, so sort by them.
        by_version.sort_unstable();
        let mut wanted: Vec<(i64, usize)> = chunk
            .iter()
            .enumerate()
            .map(|(i, (_, v))| (*v as i64, i))
            .collect();
        wanted.sort_unstable();
        let mut chunk_ids = vec![0; chunk.len()];
        for ((_, id), (_, i)) in by_version.iter().zip(&wanted) {
            chunk_ids[*i] = *id;
        }
        ids.extend(chunk_ids);
    }
    Ok(ids)
}

/// Rows per multi-row statement: few enough to stay under SQLite's bound
/// on variables, and few distinct statements to cache.
const ROWS_PER_STATEMENT: usize = 64;

/// Applies `writes` in order inside whatever transaction is open. A run of
/// upserts to one table costs one version bump, one multi-row upsert and
/// one multi-row outbox insert per 64 rows, instead of three statements per row.
pub(crate) fn apply_all(
    conn: &Connection,
    cache: &mut SqlCache,
    writes: &[Write],
    outbox: bool,
) -> Result<Vec<WriteOutcome>> {
    let mut out = Vec::with_capacity(writes.len());
    let mut i = 0;
    while i < writes.len() {
        let name = writes[i].table.name();
        let run = writes[i..]
            .iter()
            .take_while(|w| matches!(w.op, WriteOp::Upsert(_)) && w.table.name() == name)
            .count();
        if run >= 2 {
            out.extend(upsert_run(conn, cache, &writes[i..i + run], outbox)?);
            i += run;
        } else {
            out.push(apply(conn, cache, &writes[i], outbox)?);
            i += 1;
        }
    }
    Ok(out)
}

fn upsert_run(
    conn: &Connection,
    cache: &mut SqlCache,
    writes: &[Write],
    outbox: bool,
) -> Result<Vec<WriteOutcome>> {
    let t = &writes[0].table;
    let sql = cache.get(t);
    let last = bump_versions(conn, writes.len())?;
    let first = last + 1 - writes.len() as u64;
    let mut keys = Vec::with_capacity(writes.len());
    for (c, chunk) in writes.chunks(ROWS_PER_STATEMENT).enumerate() {
        let versions: Vec<Value> = (0..chunk.len())
            .map(|i| Value::Int((first + (c * ROWS_PER_STATEMENT + i) as u64) as i64))
            .collect();
        let mut params = Vec::with_capacity(chunk.len() * (t.columns().len() + 1));
        for (w, v) in chunk.iter().zip(&versions) {
            let WriteOp::Upsert(row) = &w.op else {
                unreachable!("a run holds upserts only")
            };
            keys.push(row_key(t, row)?);
            params.extend(row.iter().map(|(_, v)| Bind(v)));
            params.push(Bind(v));
        }
        conn.prepare_cached(&sql.upsert_rows(chunk.len()))
            .map_err(map_err)?
            .execute(params_from_iter(params))
            .map_err(map_err)?;
    }
    let entries: Vec<(Key, u64)> = keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| (k, first + i as u64))
        .collect();
    let ids = if outbox {
        record_outbox(conn, t, &entries)?
            .into_iter()
            .map(Some)
            .collect()
    } else {
        vec![None; entries.len()]
    };
    Ok(entries
        .into_iter()
        .zip(ids)
        .map(|((_, version), outbox_id)| WriteOutcome {
            version,
            existed: false,
            row: None,
            outbox_id,
        })
        .collect())
}

fn row_key(t: &Table, row: &Row) -> Result<Key> {
    t.key_of(row)
        .ok_or_else(|| Error::new(ErrorKind::InvalidKey, "the row has no key"))
}

/// Applies one write on `conn`, inside whatever transaction is open.
pub(crate) fn apply(
    conn: &Connection,
    cache: &mut SqlCache,
    w: &Write,
    outbox: bool,
) -> Result<WriteOutcome> {
    let t = &w.table;
    let sql = cache.get(t);
    let version = bump_versions(conn, 1)?;
    let (key, existed, row) = match &w.op {
        WriteOp::Upsert(row) => {
            let key = row_key(t, row)?;
            let vv = Value::Int(version as i64);
            let params = row
                .iter()
                .map(|(_, v)| Bind(v))
                .chain(std::iter::once(Bind(&vv)));
            conn.prepare_cached(&sql.upsert)
                .map_err(map_err)?
                .execute(params_from_iter(params))
                .map_err(map_err)?;
            (key, false, None)
        }
        WriteOp::Update(key, patch) => {
            let vv = Value::Int(version as i64);
            let kv = key.to_value();
            let params = patch
                .columns()
                .iter()
                .map(|(_, v)| Bind(v))
                .chain([Bind(&vv), Bind(&kv)]);
            let found = conn
                .prepare_cached(&sql.update(t, patch))
                .map_err(map_err)?
                .query_row(params_from_iter(params), |r| Ok(read_row(t, r)))
                .optional()
                .map_err(map_err)?
                .transpose()?;
            (key.clone(), found.is_some(), found.map(|vr| vr.row))
        }
        WriteOp::Delete(key) => {
            let n = conn
                .prepare_cached(&sql.delete)
                .map_err(map_err)?
                .execute([BindKey(key)])
                .map_err(map_err)?;
            (key.clone(), n > 0, None)
        }
    };
    let outbox_id = if outbox {
        record_outbox(conn, t, &[(key, version)])?.pop()
    } else {
        None
    };
    Ok(WriteOutcome {
        version,
        existed,
        row,
        outbox_id,
    })
}

pub(crate) fn get(
    conn: &Connection,
    cache: &mut SqlCache,
    t: &Table,
    key: &Key,
) -> Result<Option<VersionedRow>> {
    let sql = cache.get(t);
    conn.prepare_cached(&sql.select)
        .map_err(map_err)?
        .query_row([BindKey(key)], |r| Ok(read_row(t, r)))
        .optional()
        .map_err(map_err)?
        .transpose()
}

pub(crate) fn get_many(
    conn: &Connection,
    cache: &mut SqlCache,
    t: &Table,
    keys: &[Key],
) -> Result<Vec<Option<VersionedRow>>> {
    for k in keys {
        t.check_key(k)?;
    }
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let sql = cache.get(t);
    let array = serde_json::Value::Array(
        keys.iter()
            .map(|k| match k {
                Key::Int(i) => serde_json::Value::from(*i),
                Key::Text(s) => serde_json::Value::from(s.as_str()),
            })
            .collect(),
    )
    .to_string();
    let mut stmt = conn.prepare_cached(&sql.select_many).map_err(map_err)?;
    let mut rows = stmt.query([array]).map_err(map_err)?;
    let mut found = std::collections::HashMap::with_capacity(keys.len());
    while let Some(r) = rows.next().map_err(map_err)? {
        let vr = read_row(t, r)?;
        if let Some(k) = t.key_of(&vr.row) {
            found.insert(k, vr);
        }
    }
    Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
}

pub(crate) fn scan(
    conn: &Connection,
    cache: &mut SqlCache,
    t: &Table,
    after: Option<&Key>,
    limit: usize,
) -> Result<Vec<VersionedRow>> {
    let sql = cache.get(t);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut out = Vec::new();
    let mut push = |r: &rusqlite::Row<'_>| -> rusqlite::Result<()> {
        out.push(read_row(t, r));
        Ok(())
    };
    match after {
        None => {
            let mut stmt = conn.prepare_cached(&sql.scan_first).map_err(map_err)?;
            let mut rows = stmt.query([limit]).map_err(map_err)?;
            while let Some(r) = rows.next().map_err(map_err)? {
                push(r).map_err(map_err)?;
            }
        }
        Some(k) => {
            let mut stmt = conn.prepare_cached(&sql.scan_after).map_err(map_err)?;
            let mut rows = stmt
                .query(rusqlite::params![BindKey(k), limit])
                .map_err(map_err)?;
            while let Some(r) = rows.next().map_err(map_err)? {
                push(r).map_err(map_err)?;
            }
        }
    }
    out.into_iter().collect()
}
