//! SQL text for one table, values to and from PostgreSQL.
//!
//! # Versions and locks
//!
//! Every write takes a transaction-scoped advisory lock on its key's slot,
//! `pg_advisory_xact_lock(<class>, hashtextextended('<table>:<key>', 0) & 1023)`
//! (see [`slot_lock`]), and only then draws its version from the global
//! sequence `_wt_version_seq`; the lock is held until the write's
//! transaction ends. A key always maps to the same one of [`LOCK_SLOTS`]
//! slots, so what holds for a key's lock holds for its slot's; keys that
//! share a slot merely wait for each other. A bounded number of slots keeps
//! a batch of any size to at most [`LOCK_SLOTS`] locks: one lock per key
//! ran out of the server's lock table (`max_locks_per_transaction`) past a
//! few tens of thousands of rows. `Transaction::get_for_update` takes the
//! same slot lock before it reads. Writers of one key are thus
//! serialized from before they draw a version until after they commit, so
//! versions of a key are committed in increasing order, a delete's included,
//! and a write that finds no row still gets a version above every committed
//! one. Row locks alone are not enough: an `INSERT` evaluates its `VALUES`
//! (and so `nextval`) before it waits on a row that a concurrent delete holds,
//! and would commit a version lower than the delete's.
//!
//! Inside one statement the order is forced by data dependencies, not by the
//! order of the text: the lock is a `MATERIALIZED` CTE, `nextval` is computed
//! in a projection over that CTE's row (or, for several keys, over a count of
//! all the locks taken), and the data-modifying CTE reads the version from
//! it. The tests check the order with a third connection that draws from the
//! sequence while a write waits for its lock.
//!
//! A statement's snapshot is taken before it starts, so an `UPDATE` or
//! `DELETE` that waited for the lock cannot see a row that the lock's holder
//! inserted (row locks and re-checks only follow rows the snapshot had).
//! Autocommit updates and deletes that find nothing therefore call
//! `_wt_assert_absent`, a `VOLATILE` function whose query runs with a fresh
//! snapshot, taken after the lock was granted: if the row is there after all,
//! it raises `WT001`, the statement rolls back and is run again. Inside a
//! transaction the key is locked by an earlier statement instead, so the
//! write's own statement starts after the lock and sees every committed write.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{Postgres, Row as _};
use writethrough_core::backend::{OUTBOX_TABLE, VERSION_COLUMN};
use writethrough_core::{
    ColumnType, Error, ErrorKind, Key, Patch, Result, Row, Table, Value, VersionedRow,
};

use crate::error::{Phase, map_err};

/// The global version sequence.
pub(crate) const SEQ: &str = "_wt_version_seq";
/// The fresh-snapshot existence check (see the module docs).
pub(crate) const ASSERT_ABSENT_FN: &str = "_wt_assert_absent";

pub(crate) type PgQuery = sqlx::query::Query<'static, Postgres, PgArguments>;

/// A query over cached SQL text (sqlx caches the prepared statement per connection).
pub(crate) fn query(sql: &Arc<str>) -> PgQuery {
    sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
}

/// The text a key's advisory lock is hashed from. Every path (single
/// statements, batches, interactive transactions, locking reads) locks
/// through this and [`slot_of`].
pub(crate) fn lock_text(t: &Table, key: &Key) -> String {
    format!("{}:{key}", t.name())
}

/// How many lock slots keys hash into: the most locks one transaction
/// takes, whatever its size. A power of two.
pub(crate) const LOCK_SLOTS: i64 = 1024;

/// The first key of the two-key advisory locks the slots use ("wt" in
/// ASCII), so that they do not meet an application's own advisory locks on
/// small numbers, nor the one-key `ensure_table` lock.
pub(crate) const LOCK_CLASS: i32 = 0x7774;

/// The slot of a lock text (an SQL expression of type `text`), as an `int`.
/// The one slot function: every lock goes through it.
pub(crate) fn slot_of(text: &str) -> String {
    format!("(hashtextextended({text}, 0) & {})::int", LOCK_SLOTS - 1)
}

/// Takes the lock of a slot (an SQL `int` expression), held to the end of
/// the transaction.
pub(crate) fn slot_lock(slot: &str) -> String {
    format!("pg_advisory_xact_lock({LOCK_CLASS}, {slot})")
}

/// Takes the slot locks of `$1` (a `text[]` of [`lock_text`]s), each slot
/// once, in slot order, the same order in every transaction, so that
/// transactions locking several keys this way cannot deadlock each other.
fn lock_many_cte(param: &str) -> String {
    lock_many_cte_waiting(param, None)
}

/// How long a coalesced batch waits for each key lock before it gives up
/// (committing nothing) and its writes run one by one: a batch must not
/// make its writers share the wait of one key held by a long transaction.
/// Far above the time a single write holds a key (one statement and its
/// commit), so that contention between writes rarely splits a batch.
pub(crate) const BATCH_LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// [`lock_many_cte`]; with `wait`, the statement's `lock_timeout` is set to
/// it (transaction-local: an autocommit statement's own) before the first
/// lock, by an uncorrelated scalar subquery that runs once, at the first
/// lock's argument.
fn lock_many_cte_waiting(param: &str, wait: Option<std::time::Duration>) -> String {
    let slot = match wait {
        None => "\"_s\".\"h\"".to_owned(),
        Some(d) => format!(
            "(\"_s\".\"h\" + (SELECT length(set_config('lock_timeout', '{}ms', true)) * 0))",
            d.as_millis().max(1)
        ),
    };
    format!(
        "\"_k\" AS MATERIALIZED (SELECT {} FROM \
         (SELECT DISTINCT {} AS \"h\" FROM unnest({param}::text[]) AS \"x\" ORDER BY 1) AS \"_s\"), \
         \"_l\" AS MATERIALIZED (SELECT count(*) AS \"n\" FROM \"_k\")",
        slot_lock(&slot),
        slot_of("\"x\""),
    )
}

/// Locks every key of `$1` (a `text[]`), in hash order.
pub(crate) fn lock_many_sql() -> String {
    format!("WITH {} SELECT \"n\" FROM \"_l\"", lock_many_cte("$1"))
}

fn canonical(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Bool => "boolean",
        ColumnType::Int => "bigint",
        ColumnType::Float => "double precision",
        ColumnType::Text => "text",
        ColumnType::Bytes => "bytea",
        ColumnType::Json => "jsonb",
        _ => "text",
    }
}

/// The PostgreSQL types an existing column may have for a declared type:
/// the canonical one first. Reads cast to the canonical type.
pub(crate) fn accepted_types(ty: ColumnType) -> &'static [&'static str] {
    match ty {
        ColumnType::Bool => &["boolean"],
        ColumnType::Int => &["bigint", "integer", "smallint"],
        ColumnType::Float => &["double precision"],
        ColumnType::Text => &["text", "character varying"],
        ColumnType::Bytes => &["bytea"],
        ColumnType::Json => &["jsonb", "json"],
        _ => &[],
    }
}

/// One prepared-statement text per shape of write.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Variant {
    /// Also insert the outbox record.
    pub(crate) outbox: bool,
    /// The statement runs alone in autocommit: it takes the key lock itself
    /// and, for update and delete, checks a miss with a fresh snapshot.
    /// Otherwise an earlier statement of the transaction holds the lock.
    pub(crate) auto: bool,
}

impl Variant {
    fn index(self) -> usize {
        usize::from(self.outbox) | (usize::from(self.auto) << 1)
    }
}

/// The columns an update sets, and how it runs.
type UpdateShape = (Vec<usize>, Variant);

/// The statements of one table, built once.
pub(crate) struct TableSql {
    pub(crate) table: Table,
    upsert: [Arc<str>; 2],
    /// The upsert of an unfenced write: no key lock (see `plain_upsert`).
    pub(crate) plain_upsert: Arc<str>,
    /// By `outbox` + 2 × `bounded` (see [`TableSql::batch_upsert`]).
    batch_upsert: [Arc<str>; 4],
    delete: [Arc<str>; 4],
    pub(crate) select: Arc<str>,
    pub(crate) select_many: Arc<str>,
    pub(crate) scan_first: Arc<str>,
    pub(crate) scan_after: Arc<str>,
    /// `$1` rows ranked by `md5($2 || key)`: a random sample, by seed.
    pub(crate) sample: Arc<str>,
    pub(crate) count: Arc<str>,
    updates: Mutex<HashMap<UpdateShape, Arc<str>>>,
}

struct Names {
    table: String,
    table_lit: String,
    key: String,
    key_lit: String,
    cols: Vec<String>,
    sel_t: String,
}

impl TableSql {
    pub(crate) fn new(t: &Table) -> Self {
        let n = Names::new(t);
        let arc = |s: String| -> Arc<str> { Arc::from(s) };
        let select = format!(
            "SELECT {} FROM {} AS \"_t\" WHERE \"_t\".{} = $1",
            n.sel_t, n.table, n.key
        );
        let select_many = format!(
            "SELECT {} FROM {} AS \"_t\" WHERE \"_t\".{} = ANY($1)",
            n.sel_t, n.table, n.key
        );
        let scan_first = format!(
            "SELECT {} FROM {} AS \"_t\" ORDER BY \"_t\".{} LIMIT $1",
            n.sel_t, n.table, n.key
        );
        let scan_after = format!(
            "SELECT {} FROM {} AS \"_t\" WHERE \"_t\".{k} > $1 ORDER BY \"_t\".{k} LIMIT $2",
            n.sel_t,
            n.table,
            k = n.key
        );
        let sample = format!(
            "SELECT {} FROM {} AS \"_t\" ORDER BY md5($2 || \"_t\".{}::text) LIMIT $1",
            n.sel_t, n.table, n.key
        );
        let count = format!("SELECT count(*) FROM {}", n.table);
        let v = |outbox, auto| Variant { outbox, auto };
        TableSql {
            upsert: [arc(n.upsert(false)), arc(n.upsert(true))],
            plain_upsert: arc(n.plain_upsert()),
            batch_upsert: [
                arc(n.batch_upsert(t, false, false)),
                arc(n.batch_upsert(t, true, false)),
                arc(n.batch_upsert(t, false, true)),
                arc(n.batch_upsert(t, true, true)),
            ],
            delete: [
                arc(n.delete(v(false, false))),
                arc(n.delete(v(true, false))),
                arc(n.delete(v(false, true))),
                arc(n.delete(v(true, true))),
            ],
            select: arc(select),
            select_many: arc(select_many),
            scan_first: arc(scan_first),
            scan_after: arc(scan_after),
            sample: arc(sample),
            count: arc(count),
            updates: Mutex::new(HashMap::new()),
            table: t.clone(),
        }
    }

    /// The upsert; it always takes its key lock (taking it again in a
    /// transaction that holds it costs nothing and never waits).
    pub(crate) fn upsert(&self, outbox: bool) -> &Arc<str> {
        &self.upsert[usize::from(outbox)]
    }

    /// The batch upsert; `bounded` waits at most `BATCH_LOCK_WAIT` for
    /// each key lock and fails with `55P03` past it, committing nothing.
    pub(crate) fn batch_upsert(&self, outbox: bool, bounded: bool) -> &Arc<str> {
        &self.batch_upsert[usize::from(outbox) + 2 * usize::from(bounded)]
    }

    pub(crate) fn delete(&self, v: Variant) -> &Arc<str> {
        &self.delete[v.index()]
    }

    /// The update of the columns at `cols` (indices into the table's columns).
    pub(crate) fn update(&self, cols: Vec<usize>, v: Variant) -> Arc<str> {
        let mut cache = self.updates.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache.get(&(cols.clone(), v)) {
            return s.clone();
        }
        let s: Arc<str> = Arc::from(Names::new(&self.table).update(&cols, v));
        // Bounded: a table has at most 2^columns patch shapes, but a
        // pathological caller should not grow this without end.
        if cache.len() < 1024 {
            cache.insert((cols, v), s.clone());
        }
        s
    }
}

impl Names {
    fn new(t: &Table) -> Self {
        let cols: Vec<String> = t.columns().iter().map(|c| c.name.quoted()).collect();
        let mut sel_t = String::new();
        for (c, col) in cols.iter().zip(t.columns()) {
            let _ = write!(sel_t, "\"_t\".{c}::{} AS {c}, ", canonical(col.ty));
        }
        let _ = write!(sel_t, "\"_t\".\"{VERSION_COLUMN}\"::bigint");
        Names {
            table: t.name().quoted(),
            table_lit: format!("'{}'", t.name()),
            key: t.key_column().name.quoted(),
            key_lit: format!("'{}'", t.key_column().name),
            cols,
            sel_t,
        }
    }

    fn outbox_cte(&self, enc_param: &str, from: &str, version: &str) -> String {
        format!(
            ", \"_o\" AS (INSERT INTO \"{OUTBOX_TABLE}\" (tbl, key, version) \
             SELECT {}, {enc_param}, {version} FROM {from} RETURNING id)",
            self.table_lit
        )
    }

    fn check(&self, modified: &str) -> String {
        format!(
            "(SELECT \"{ASSERT_ABSENT_FN}\"('{}'::regclass, {}, $1) WHERE NOT EXISTS (SELECT 1 FROM {modified}))",
            self.table, self.key_lit
        )
    }

    /// `$1..$n` the columns. Returns version, existed, outbox id (NULL).
    /// No key lock: its version may come out below that of a delete it
    /// raced, which only matters when versions fence the cache — so the
    /// engine uses it only with fencing off.
    fn plain_upsert(&self) -> String {
        let n = self.cols.len();
        let params: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
        format!(
            "INSERT INTO {} AS \"_t\" ({}, \"{VERSION_COLUMN}\") VALUES ({}, nextval('{SEQ}')) \
             ON CONFLICT ({}) DO UPDATE SET {} \
             RETURNING \"_t\".\"{VERSION_COLUMN}\"::bigint, NOT (\"_t\".xmax = 0), NULL::bigint",
            self.table,
            self.cols.join(", "),
            params.join(", "),
            self.key,
            self.set_excluded(),
        )
    }

    /// `$1..$n` the columns, `$n+1` the lock text, `$n+2` the outbox key.
    /// Returns version, existed, outbox id.
    fn upsert(&self, outbox: bool) -> String {
        let n = self.cols.len();
        let params: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
        let mut s = format!(
            "WITH \"_l\" AS MATERIALIZED (SELECT {}), \
             \"_w\" AS (INSERT INTO {} AS \"_t\" ({}, \"{VERSION_COLUMN}\") \
             SELECT {}, nextval('{SEQ}') FROM \"_l\" \
             ON CONFLICT ({}) DO UPDATE SET {} \
             RETURNING \"_t\".\"{VERSION_COLUMN}\"::bigint AS \"v\", NOT (\"_t\".xmax = 0) AS \"e\")",
            slot_lock(&slot_of(&format!("${}", n + 1))),
            self.table,
            self.cols.join(", "),
            params.join(", "),
            self.key,
            self.set_excluded(),
        );
        if outbox {
            s += &self.outbox_cte(&format!("${}", n + 2), "\"_w\"", "\"v\"");
        }
        let _ = write!(
            s,
            " SELECT \"_w\".\"v\", \"_w\".\"e\", {} FROM \"_w\"",
            if outbox {
                "(SELECT id FROM \"_o\")"
            } else {
                "NULL::bigint"
            }
        );
        s
    }

    fn set_excluded(&self) -> String {
        let mut sets: Vec<String> = self.cols[1..]
            .iter()
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        sets.push(format!(
            "\"{VERSION_COLUMN}\" = EXCLUDED.\"{VERSION_COLUMN}\""
        ));
        sets.join(", ")
    }

    /// `$1..$n` one array per column, `$n+1` the lock texts, `$n+2` the
    /// outbox keys (in the order of `$1`). Returns key, version, existed,
    /// outbox id per row.
    fn batch_upsert(&self, t: &Table, outbox: bool, bounded: bool) -> String {
        let n = self.cols.len();
        let arrays: Vec<String> = t
            .columns()
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::{}[]", i + 1, canonical(c.ty)))
            .collect();
        let mut s = format!(
            "WITH {}, \
             \"_w\" AS (INSERT INTO {} AS \"_t\" ({}, \"{VERSION_COLUMN}\") \
             SELECT \"_r\".*, nextval('{SEQ}') FROM \"_l\", unnest({}) AS \"_r\" \
             ON CONFLICT ({}) DO UPDATE SET {} \
             RETURNING \"_t\".{}::{} AS \"k\", \"_t\".\"{VERSION_COLUMN}\"::bigint AS \"v\", NOT (\"_t\".xmax = 0) AS \"e\")",
            lock_many_cte_waiting(&format!("${}", n + 1), bounded.then_some(BATCH_LOCK_WAIT)),
            self.table,
            self.cols.join(", "),
            arrays.join(", "),
            self.key,
            self.set_excluded(),
            self.key,
            canonical(t.key_column().ty),
        );
        if outbox {
            let _ = write!(
                s,
                ", \"_o\" AS (INSERT INTO \"{OUTBOX_TABLE}\" (tbl, key, version) \
                 SELECT {}, \"_x\".\"enc\", \"_w\".\"v\" FROM \"_w\" \
                 JOIN unnest({}, ${}::text[]) AS \"_x\"(\"k\", \"enc\") ON \"_x\".\"k\" = \"_w\".\"k\" \
                 RETURNING id, version) \
                 SELECT \"_w\".\"k\", \"_w\".\"v\", \"_w\".\"e\", \"_o\".id FROM \"_w\" \
                 LEFT JOIN \"_o\" ON \"_o\".version = \"_w\".\"v\"",
                self.table_lit,
                arrays[0],
                n + 2
            );
        } else {
            s += " SELECT \"_w\".\"k\", \"_w\".\"v\", \"_w\".\"e\", NULL::bigint FROM \"_w\"";
        }
        s
    }

    /// The version CTE `_v`, after the lock CTE `_l` when `auto`; returns
    /// the text and the number of the next free parameter.
    fn version_ctes(&self, auto: bool) -> (String, usize) {
        if auto {
            (
                format!(
                    "WITH \"_l\" AS MATERIALIZED (SELECT {}), \
                     \"_v\" AS MATERIALIZED (SELECT nextval('{SEQ}') AS \"v\" FROM \"_l\")",
                    slot_lock(&slot_of("$2"))
                ),
                3,
            )
        } else {
            (
                format!("WITH \"_v\" AS MATERIALIZED (SELECT nextval('{SEQ}') AS \"v\")"),
                2,
            )
        }
    }

    /// `$1` the key, `$2` the lock text (auto only), then the outbox key.
    /// Returns version, existed, outbox id, check.
    fn delete(&self, v: Variant) -> String {
        let (mut s, next) = self.version_ctes(v.auto);
        let _ = write!(
            s,
            ", \"_d\" AS (DELETE FROM {} AS \"_t\" USING \"_v\" WHERE \"_t\".{} = $1 RETURNING 1)",
            self.table, self.key
        );
        if v.outbox {
            s += &self.outbox_cte(&format!("${next}"), "\"_v\"", "\"v\"");
        }
        let _ = write!(
            s,
            " SELECT \"_v\".\"v\"::bigint, EXISTS (SELECT 1 FROM \"_d\"), {}, {} FROM \"_v\"",
            if v.outbox {
                "(SELECT id FROM \"_o\")"
            } else {
                "NULL::bigint"
            },
            if v.auto {
                self.check("\"_d\"")
            } else {
                "NULL::boolean".to_owned()
            }
        );
        s
    }

    /// `$1` the key, `$2` the lock text (auto only), then the patch's
    /// values, then the outbox key. Returns version, outbox id, check, then
    /// the row's columns and version (all NULL if no row was found).
    fn update(&self, cols: &[usize], v: Variant) -> String {
        let (mut s, mut next) = self.version_ctes(v.auto);
        let sets: Vec<String> = cols
            .iter()
            .map(|&i| {
                let p = format!("{} = ${next}", self.cols[i]);
                next += 1;
                p
            })
            .collect();
        let _ = write!(
            s,
            ", \"_u\" AS (UPDATE {} AS \"_t\" SET {}, \"{VERSION_COLUMN}\" = \"_v\".\"v\" \
             FROM \"_v\" WHERE \"_t\".{} = $1 RETURNING {})",
            self.table,
            sets.join(", "),
            self.key,
            self.sel_t
        );
        if v.outbox {
            s += &self.outbox_cte(&format!("${next}"), "\"_v\"", "\"v\"");
        }
        let _ = write!(
            s,
            " SELECT \"_v\".\"v\"::bigint, {}, {}, \"_u\".* FROM \"_v\" LEFT JOIN \"_u\" ON true",
            if v.outbox {
                "(SELECT id FROM \"_o\")"
            } else {
                "NULL::bigint"
            },
            if v.auto {
                self.check("\"_u\"")
            } else {
                "NULL::boolean".to_owned()
            }
        );
        s
    }
}

/// `CREATE TABLE` for a table the engine creates itself. Text keys use the
/// "C" collation so that `scan` pages in byte order (the order of `Key`) and
/// still walks the primary key index.
pub(crate) fn create_table_sql(t: &Table) -> String {
    let defs: Vec<String> = t
        .columns()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let ty = canonical(c.ty);
            if i == 0 {
                let coll = if c.ty == ColumnType::Text {
                    " COLLATE \"C\""
                } else {
                    ""
                };
                format!("{} {ty}{coll} PRIMARY KEY", c.name.quoted())
            } else {
                let null = if c.nullable { "" } else { " NOT NULL" };
                format!("{} {ty}{null}", c.name.quoted())
            }
        })
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({}, \"{VERSION_COLUMN}\" BIGINT NOT NULL DEFAULT 0)",
        t.name().quoted(),
        defs.join(", ")
    )
}

/// Binds `v` as a parameter of `ty`'s PostgreSQL type; NULL is bound typed.
pub(crate) fn bind(q: PgQuery, ty: ColumnType, v: &Value, column: &str) -> Result<PgQuery> {
    Ok(match (ty, v) {
        (ColumnType::Bool, Value::Null) => q.bind(None::<bool>),
        (ColumnType::Int, Value::Null) => q.bind(None::<i64>),
        (ColumnType::Float, Value::Null) => q.bind(None::<f64>),
        (ColumnType::Text, Value::Null) => q.bind(None::<String>),
        (ColumnType::Bytes, Value::Null) => q.bind(None::<Vec<u8>>),
        (ColumnType::Json, Value::Null) => q.bind(None::<serde_json::Value>),
        (ColumnType::Bool, Value::Bool(b)) => q.bind(*b),
        (ColumnType::Int, Value::Int(i)) => q.bind(*i),
        (ColumnType::Float, Value::Float(f)) => q.bind(*f),
        (ColumnType::Text, Value::Text(s)) => q.bind(s.clone()),
        (ColumnType::Bytes, Value::Bytes(b)) => q.bind(b.clone()),
        (ColumnType::Json, Value::Json(j)) => q.bind(j.clone()),
        (ty, v) => {
            return Err(Error::new(
                ErrorKind::InvalidValue,
                format!("column {column} is {}, got {}", ty.as_str(), v.type_name()),
            ));
        }
    })
}

pub(crate) fn bind_key(q: PgQuery, key: &Key) -> PgQuery {
    match key {
        Key::Int(i) => q.bind(*i),
        Key::Text(s) => q.bind(s.clone()),
    }
}

/// One typed array per column, for `unnest` in the batch upsert.
enum ColumnArray {
    Bool(Vec<Option<bool>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Text(Vec<Option<String>>),
    Bytes(Vec<Option<Vec<u8>>>),
    Json(Vec<Option<serde_json::Value>>),
}

/// Binds the rows (normalized, in column order) as one array per column.
pub(crate) fn bind_columns(mut q: PgQuery, t: &Table, rows: &[&Row]) -> Result<PgQuery> {
    for (i, col) in t.columns().iter().enumerate() {
        let n = rows.len();
        let mut arr = match col.ty {
            ColumnType::Bool => ColumnArray::Bool(Vec::with_capacity(n)),
            ColumnType::Int => ColumnArray::Int(Vec::with_capacity(n)),
            ColumnType::Float => ColumnArray::Float(Vec::with_capacity(n)),
            ColumnType::Bytes => ColumnArray::Bytes(Vec::with_capacity(n)),
            ColumnType::Json => ColumnArray::Json(Vec::with_capacity(n)),
            _ => ColumnArray::Text(Vec::with_capacity(n)),
        };
        for row in rows {
            let v = row.iter().nth(i).map(|(_, v)| v).unwrap_or(&Value::Null);
            let ok = match (&mut arr, v) {
                (ColumnArray::Bool(a), Value::Null) => {
                    a.push(None);
                    true
                }
                (ColumnArray::Int(a), Value::Null) => {
                    a.push(None);
                    true
                }
                (ColumnArray::Float(a), Value::Null) => {
                    a.push(None);
                    true
                }
                (ColumnArray::Text(a), Value::Null) => {
                    a.push(None);
                    true
                }
                (ColumnArray::Bytes(a), Value::Null) => {
                    a.push(None);
                    true
                }
                (ColumnArray::Json(a), Value::Null) => {
                    a.push(None);
                    true
                }
                (ColumnArray::Bool(a), Value::Bool(b)) => {
                    a.push(Some(*b));
                    true
                }
                (ColumnArray::Int(a), Value::Int(x)) => {
                    a.push(Some(*x));
                    true
                }
                (ColumnArray::Float(a), Value::Float(x)) => {
                    a.push(Some(*x));
                    true
                }
                (ColumnArray::Text(a), Value::Text(x)) => {
                    a.push(Some(x.clone()));
                    true
                }
                (ColumnArray::Bytes(a), Value::Bytes(x)) => {
                    a.push(Some(x.clone()));
                    true
                }
                (ColumnArray::Json(a), Value::Json(x)) => {
                    a.push(Some(x.clone()));
                    true
                }
                _ => false,
            };
            if !ok {
                return Err(Error::new(
                    ErrorKind::InvalidValue,
                    format!(
                        "column {} is {}, got {}",
                        col.name,
                        col.ty.as_str(),
                        v.type_name()
                    ),
                ));
            }
        }
        q = match arr {
            ColumnArray::Bool(a) => q.bind(a),
            ColumnArray::Int(a) => q.bind(a),
            ColumnArray::Float(a) => q.bind(a),
            ColumnArray::Text(a) => q.bind(a),
            ColumnArray::Bytes(a) => q.bind(a),
            ColumnArray::Json(a) => q.bind(a),
        };
    }
    Ok(q)
}

fn get<'r, T>(r: &'r PgRow, i: usize) -> Result<T>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    r.try_get(i).map_err(|e| map_err(e, Phase::NoCommit))
}

pub(crate) fn get_i64(r: &PgRow, i: usize) -> Result<i64> {
    get(r, i)
}

pub(crate) fn get_opt_i64(r: &PgRow, i: usize) -> Result<Option<i64>> {
    get(r, i)
}

pub(crate) fn get_bool(r: &PgRow, i: usize) -> Result<bool> {
    get(r, i)
}

pub(crate) fn version(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn decode(r: &PgRow, i: usize, ty: ColumnType) -> Result<Value> {
    let v = match ty {
        ColumnType::Bool => get::<Option<bool>>(r, i)?.map(Value::Bool),
        ColumnType::Int => get::<Option<i64>>(r, i)?.map(Value::Int),
        ColumnType::Float => get::<Option<f64>>(r, i)?.map(Value::Float),
        ColumnType::Bytes => get::<Option<Vec<u8>>>(r, i)?.map(Value::Bytes),
        ColumnType::Json => get::<Option<serde_json::Value>>(r, i)?.map(Value::Json),
        _ => get::<Option<String>>(r, i)?.map(Value::Text),
    };
    Ok(v.unwrap_or(Value::Null))
}

/// Reads the table's columns then the version, starting at column `at`.
/// `None` if the key column is NULL (the LEFT JOIN of an update found no row).
pub(crate) fn read_row(t: &Table, r: &PgRow, at: usize) -> Result<Option<VersionedRow>> {
    let mut row = Row::with_capacity(t.columns().len());
    for (i, col) in t.columns().iter().enumerate() {
        let v = decode(r, at + i, col.ty)?;
        if i == 0 && v.is_null() {
            return Ok(None);
        }
        row.insert(col.name.clone(), v);
    }
    let v = get_i64(r, at + t.columns().len())?;
    Ok(Some(VersionedRow {
        row,
        version: version(v),
    }))
}

/// The key as stored in the returned row of a batch upsert.
pub(crate) fn read_key(t: &Table, r: &PgRow, i: usize) -> Result<Key> {
    Ok(match t.key_column().ty {
        ColumnType::Int => Key::Int(get(r, i)?),
        _ => Key::Text(get(r, i)?),
    })
}

/// The indices of a (normalized) patch's columns in the table.
pub(crate) fn patch_columns(t: &Table, patch: &Patch) -> Vec<usize> {
    patch
        .columns()
        .iter()
        .filter_map(|(c, _)| t.columns().iter().position(|tc| tc.name == *c))
        .collect()
}

/// The function behind the fresh-snapshot check (see the module docs).
pub(crate) fn assert_absent_fn_sql() -> String {
    format!(
        r#"CREATE OR REPLACE FUNCTION "{ASSERT_ABSENT_FN}"(tbl regclass, keycol name, k anyelement)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $wt$
DECLARE present boolean;
BEGIN
  -- VOLATILE: this query gets a snapshot taken now, after the caller's key
  -- lock was granted, so it sees rows the caller's statement snapshot missed.
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I = $1)', tbl, keycol) INTO present USING k;
  IF present THEN
    RAISE EXCEPTION 'writethrough: a concurrent write to this key committed after the statement began; run it again'
      USING ERRCODE = '{}';
  END IF;
  RETURN false;
END
$wt$"#,
        crate::error::RETRY_SQLSTATE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Table {
        Table::builder("Items")
            .key("id", ColumnType::Int)
            .column("name", ColumnType::Text)
            .nullable("doc", ColumnType::Json)
            .build()
            .unwrap()
    }

    #[test]
    fn statements_quote_identifiers_and_bind_values() {
        let s = TableSql::new(&t());
        let up = s.upsert(true);
        assert!(up.contains("INSERT INTO \"Items\""), "{up}");
        assert!(up.contains("$1, $2, $3"), "{up}");
        assert!(
            up.contains("pg_advisory_xact_lock(30580, (hashtextextended($4, 0) & 1023)::int)"),
            "{up}"
        );
        assert!(up.contains("SELECT 'Items', $5"), "{up}");
        let upd = s.update(
            vec![2],
            Variant {
                outbox: false,
                auto: true,
            },
        );
        assert!(upd.contains("SET \"doc\" = $3"), "{upd}");
        assert!(upd.contains("'\"Items\"'::regclass, 'id', $1"), "{upd}");
        let del = s.delete(Variant {
            outbox: true,
            auto: false,
        });
        assert!(!del.contains("pg_advisory"), "{del}");
        assert!(del.contains("SELECT 'Items', $2"), "{del}");
    }

    #[test]
    fn text_keys_are_created_with_the_c_collation() {
        let t = Table::builder("s")
            .key("k", ColumnType::Text)
            .nullable("b", ColumnType::Bytes)
            .build()
            .unwrap();
        let sql = create_table_sql(&t);
        assert!(
            sql.contains("\"k\" text COLLATE \"C\" PRIMARY KEY"),
            "{sql}"
        );
        assert!(sql.contains("\"b\" bytea,"), "{sql}");
        assert!(
            sql.contains("\"_wt_version\" BIGINT NOT NULL DEFAULT 0"),
            "{sql}"
        );
    }
}
