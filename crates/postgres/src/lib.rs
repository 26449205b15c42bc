//! PostgreSQL as a writethrough database, on sqlx.
//!
//! [`PostgresStore`] owns a connection pool. Every write draws its version
//! from one global sequence after taking a transaction-scoped advisory lock
//! on its key's slot (one of 1024), so the versions of a key are committed
//! in increasing order and a transaction of any size takes at most 1024
//! locks (see the `sql` module for why and how). A scope's
//! `get_for_update` takes the same lock before it reads.
//!
//! Round trips, the engine's cost model:
//!
//! | call | round trips |
//! | --- | --- |
//! | `execute` of one write (upsert, update or delete, outbox or not) | 1: one autocommit statement |
//! | `execute` of upserts to one table with distinct keys (`put_many`) | 1: one statement over `unnest`ed column arrays |
//! | `execute` of any other mix of `n` writes | `n + 3`: `BEGIN`, the key locks, the writes, `COMMIT` |
//! | `get`, `scan`, `outbox_pending`, `outbox_remove`, `ping` | 1 |
//! | `begin` / `commit` / `rollback` | 1 each |
//! | `Transaction::apply` | 1 (an update or delete of a key it has not written yet: 2) |
//!
//! A single update or delete that raced an insert of its key runs once more
//! (rare: see the `sql` module). A statement is prepared once per pooled
//! connection (sqlx caches it), and its text built once per table. sqlx also
//! pings a connection when it goes back to the pool; that happens after the
//! call has returned.
//!
//! `ensure_table` creates, in the current schema, the sequence
//! `_wt_version_seq`, the outbox table `_wt_outbox` and the function
//! `_wt_assert_absent`; a role that only writes needs `USAGE` on the sequence
//! and `INSERT`/`DELETE` on the outbox besides its rights on the tables.
//! Tables it creates get a `text COLLATE "C"` key when the key is text, so
//! that `scan` pages in the byte order of [`Key`] along the primary key.
//!
//! ```no_run
//! # async fn demo() -> writethrough_core::Result<()> {
//! use writethrough_core::{ColumnType, Table};
//! use writethrough_core::backend::DbStore;
//! use writethrough_postgres::PostgresStore;
//!
//! let db = PostgresStore::connect("postgres://app@localhost/shop?max_connections=20").await?;
//! let products = Table::builder("products")
//!     .key("id", ColumnType::Int)
//!     .column("name", ColumnType::Text)
//!     .build()?;
//! db.ensure_table(&products).await?;
//! # Ok(()) }
//! ```

mod coalesce;
mod config;
mod error;
mod external;
mod introspect;
mod sql;
mod tx;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection as _, Row as _};
use writethrough_core::backend::{
    DbCapabilities, DbStore, OUTBOX_TABLE, OutboxEntry, Transaction, TxOptions, VERSION_COLUMN,
    Write, WriteOutcome, async_trait,
};
use writethrough_core::{ColumnType, Error, ErrorKind, Key, Result, Table, VersionedRow};

pub use coalesce::CoalesceStats;
pub use config::PostgresConfig;

use coalesce::Coalescer;

use error::{Phase, map_err};
use sql::{TableSql, bind_key, query};
use tx::{PgTx, Prepared, PreparedOp, RunError, prepare, run_one};

/// How often a single autocommit update or delete is run again when its
/// fresh-snapshot check finds a row inserted while it waited for the key
/// lock, before it falls back to a transaction that locks first.
const SINGLE_STATEMENT_TRIES: usize = 3;

/// How often `execute` runs writes the database aborted to break a
/// deadlock (they committed nothing) before it reports the deadlock.
const DEADLOCK_TRIES: usize = 3;

/// A PostgreSQL database backend. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pool: PgPool,
    config: PostgresConfig,
    tables: RwLock<HashMap<String, Arc<TableSql>>>,
    lock_many: Arc<str>,
    coalescer: Option<Arc<Coalescer>>,
    doorbell: external::Doorbell,
}

impl Shared {
    /// The table's statements, built on first use and whenever the table's
    /// schema changes.
    pub(crate) fn table_sql(&self, t: &Table) -> Arc<TableSql> {
        let name = t.name().as_str();
        {
            let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = tables.get(name)
                && s.table == *t
            {
                return s.clone();
            }
        }
        let s = Arc::new(TableSql::new(t));
        self.tables
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), s.clone());
        s
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl PostgresStore {
    /// Connects to the server at `url` (see [`PostgresConfig`] for the pool
    /// parameters it may carry), opening one connection to check that the
    /// server answers.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(PostgresConfig::from_url(url)?).await
    }

    /// Connects with `cfg`, opening one connection to check that the server answers.
    pub async fn with_config(cfg: PostgresConfig) -> Result<Self> {
        // Connect once directly: a pool would report an unreachable server
        // as "pool timed out" after the acquire timeout, hiding the cause.
        let probe = tokio::time::timeout(
            cfg.acquire_timeout,
            sqlx::ConnectOptions::connect(&cfg.session_options()),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Unavailable,
                format!("no connection within {:?}", cfg.acquire_timeout),
            )
            .with_backend("postgres")
        })?
        .map_err(|e| map_err(e, Phase::NoCommit).with_operation("connect"))?;
        let _ = sqlx::Connection::close(probe).await;
        let store = Self::lazy(cfg);
        store
            .ping()
            .await
            .map_err(|e| e.with_operation("connect"))?;
        Ok(store)
    }

    /// A store whose pool connects on first use; no I/O here.
    pub fn lazy(cfg: PostgresConfig) -> Self {
        let ping_after = cfg.ping_idle_after;
        let (cfg_lanes, cfg_max) = (cfg.coalesce_lanes, cfg.coalesce_max);
        let cfg_pool = cfg.max_connections.max(1) as usize;
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections.max(1))
            .min_connections(cfg.min_connections)
            .acquire_timeout(cfg.acquire_timeout)
            .idle_timeout(cfg.idle_timeout)
            .max_lifetime(cfg.max_lifetime)
            // A ping on every acquire would double the cost of a write; a
            // connection that has been busy recently is known to be alive
            // (sqlx pings it when it comes back to the pool), so only idle
            // ones are checked.
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                Box::pin(async move {
                    if ping_after.is_some_and(|d| meta.idle_for >= d) {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(cfg.session_options());
        PostgresStore {
            shared: Arc::new(Shared {
                pool,
                config: cfg,
                tables: RwLock::new(HashMap::new()),
                lock_many: Arc::from(sql::lock_many_sql()),
                coalescer: (cfg_lanes > 0)
                    .then(|| Arc::new(Coalescer::new(cfg_lanes, cfg_max, cfg_pool))),
                doorbell: external::Doorbell::default(),
            }),
        }
    }

    /// The connection pool, for advanced users (your own queries, metrics).
    /// Writes to managed tables that bypass the store bypass its versions too.
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// The settings the store was opened with.
    pub fn config(&self) -> &PostgresConfig {
        &self.shared.config
    }

    /// What write coalescing has done so far: statements that carried
    /// several callers' writes, and how many writes they carried.
    pub fn coalesce_stats(&self) -> CoalesceStats {
        self.shared
            .coalescer
            .as_ref()
            .map(|c| c.stats())
            .unwrap_or_default()
    }

    /// Runs prepared writes, again when the database aborted them to break
    /// a deadlock (they committed nothing).
    pub(crate) async fn run_retrying(
        &self,
        ps: &[Prepared],
        opts: TxOptions,
    ) -> Result<Vec<WriteOutcome>> {
        self.run_retrying_as(ps, opts, false).await
    }

    /// [`PostgresStore::run_retrying`]; `bounded`: a batch upsert waits at
    /// most [`sql::BATCH_LOCK_WAIT`] for each key lock (coalesced batches).
    pub(crate) async fn run_retrying_as(
        &self,
        ps: &[Prepared],
        opts: TxOptions,
        bounded: bool,
    ) -> Result<Vec<WriteOutcome>> {
        let mut attempt = 1;
        loop {
            match self.execute_prepared(ps, opts, bounded).await {
                // A scope locked its keys' slots in another order than
                // this write's sorted order.
                Err(e)
                    if e.kind() == ErrorKind::Deadlock
                        && !e.is_in_doubt()
                        && attempt < DEADLOCK_TRIES =>
                {
                    tracing::debug!(attempt, error = %e, "write aborted by a deadlock; running it again");
                    tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        self.shared
            .pool
            .acquire()
            .await
            .map_err(|e| map_err(e, Phase::NoCommit))
    }

    /// One write, one autocommit statement.
    async fn execute_one(&self, p: &Prepared, outbox: bool) -> Result<WriteOutcome> {
        let mut conn = self.acquire().await?;
        for _ in 0..SINGLE_STATEMENT_TRIES {
            match run_one(&mut conn, p, outbox, true, Phase::Commit).await {
                Ok(out) => return Ok(out),
                Err(RunError::Retry) => {
                    tracing::debug!(table = %p.table().name(), key = %p.key, "write raced an insert of its key; running it again");
                }
                Err(RunError::Failed(e)) => return Err(e),
            }
        }
        let mut out =
            execute_in_tx(&self.shared, &mut conn, std::slice::from_ref(p), outbox).await?;
        out.pop()
            .ok_or_else(|| tx::unexpected("the transaction returned no outcome"))
    }

    /// One unfenced write: a plain upsert, without the key lock. Other
    /// writes take the fenced path.
    async fn execute_plain(&self, p: &Prepared) -> Result<WriteOutcome> {
        let PreparedOp::Upsert(row) = &p.op else {
            return self.execute_one(p, false).await;
        };
        let t = p.table();
        let mut q = query(&p.sql.plain_upsert);
        for (col, (_, value)) in t.columns().iter().zip(row.iter()) {
            q = sql::bind(q, col.ty, value, col.name.as_str())?;
        }
        let mut conn = self.acquire().await?;
        let r = q
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| map_err(e, Phase::Commit))?;
        Ok(WriteOutcome {
            version: sql::version(sql::get_i64(&r, 0)?),
            existed: sql::get_bool(&r, 1)?,
            row: None,
            outbox_id: None,
        })
    }

    /// One attempt at `execute`: the cheapest path the writes allow.
    async fn execute_prepared(
        &self,
        ps: &[Prepared],
        opts: TxOptions,
        bounded: bool,
    ) -> Result<Vec<WriteOutcome>> {
        if ps.len() == 1 && !opts.fence && !opts.outbox {
            self.execute_plain(&ps[0])
                .await
                .map(|o| vec![o])
                .map_err(|e| e.with_key(&ps[0].key))
        } else if ps.len() == 1 {
            self.execute_one(&ps[0], opts.outbox)
                .await
                .map(|o| vec![o])
                .map_err(|e| e.with_key(&ps[0].key))
        } else if ps
            .iter()
            .all(|p| matches!(p.op, PreparedOp::Upsert(_)) && p.table() == ps[0].table())
            && tx::distinct_keys(ps)
        {
            self.batch_upsert(ps, opts.outbox, bounded).await
        } else {
            let mut conn = self.acquire().await?;
            execute_in_tx(&self.shared, &mut conn, ps, opts.outbox).await
        }
    }

    /// Upserts of distinct keys of one table: one autocommit statement that
    /// locks every key in hash order, writes every row and its outbox record.
    async fn batch_upsert(
        &self,
        ps: &[Prepared],
        outbox: bool,
        bounded: bool,
    ) -> Result<Vec<WriteOutcome>> {
        let first = &ps[0];
        let t = first.table();
        let rows: Vec<&writethrough_core::Row> = ps
            .iter()
            .filter_map(|p| match &p.op {
                PreparedOp::Upsert(r) => Some(r),
                _ => None,
            })
            .collect();
        let mut q = sql::bind_columns(query(first.sql.batch_upsert(outbox, bounded)), t, &rows)?;
        q = q.bind(ps.iter().map(Prepared::lock_text).collect::<Vec<_>>());
        if outbox {
            q = q.bind(ps.iter().map(|p| p.key.encode()).collect::<Vec<_>>());
        }
        let mut conn = self.acquire().await?;
        let result = q
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| map_err(e, Phase::Commit))?;
        let index: HashMap<&Key, usize> = ps.iter().enumerate().map(|(i, p)| (&p.key, i)).collect();
        let mut out: Vec<Option<WriteOutcome>> = vec![None; ps.len()];
        for r in &result {
            let key = sql::read_key(t, r, 0)?;
            let Some(&i) = index.get(&key) else {
                return Err(tx::unexpected("the batch upsert returned an unknown key"));
            };
            out[i] = Some(WriteOutcome {
                version: sql::version(sql::get_i64(r, 1)?),
                existed: sql::get_bool(r, 2)?,
                row: None,
                outbox_id: sql::get_opt_i64(r, 3)?,
            });
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| tx::unexpected("the batch upsert skipped a row")))
            .collect()
    }
}

/// The general path: `BEGIN`, every key locked in one statement (in hash
/// order, so that it cannot deadlock with another batch), the writes one
/// statement each, `COMMIT`.
async fn execute_in_tx(
    shared: &Shared,
    conn: &mut PgConnection,
    ps: &[Prepared],
    outbox: bool,
) -> Result<Vec<WriteOutcome>> {
    let mut tx = conn
        .begin()
        .await
        .map_err(|e| map_err(e, Phase::NoCommit))?;
    let keys: HashSet<String> = ps.iter().map(Prepared::lock_text).collect();
    tx::lock_keys(&mut tx, shared, keys.into_iter().collect()).await?;
    let mut out = Vec::with_capacity(ps.len());
    for p in ps {
        let o = run_one(&mut tx, p, outbox, false, Phase::NoCommit)
            .await
            .map_err(|e| e.into_error().with_key(&p.key))?;
        out.push(o);
    }
    tx.commit()
        .await
        .map_err(|e| map_err(e, Phase::Commit).with_operation("db.commit"))?;
    Ok(out)
}

fn schema_err(msg: String) -> Error {
    Error::new(ErrorKind::SchemaMismatch, msg).with_backend("postgres")
}

/// Serializes `ensure_table` across processes (advisory lock key text).
const DDL_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended('_wt_ddl', 0))";

#[async_trait]
impl DbStore for PostgresStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn capabilities(&self) -> DbCapabilities {
        DbCapabilities::new()
    }

    async fn ensure_table(&self, t: &Table) -> Result<()> {
        let e = |e| map_err(e, Phase::NoCommit).with_operation("db.ensure_table");
        let mut tx = self.shared.pool.begin().await.map_err(e)?;
        // Several processes may start at once: CREATE ... IF NOT EXISTS is
        // not safe against a concurrent CREATE of the same name (it can fail
        // on the catalog's unique index), so the whole check-and-create runs
        // under one advisory lock.
        sqlx::query(DDL_LOCK).execute(&mut *tx).await.map_err(e)?;
        let engine_objects = format!(
            "CREATE SEQUENCE IF NOT EXISTS \"{}\"; \
             CREATE TABLE IF NOT EXISTS \"{OUTBOX_TABLE}\" (\
                 id BIGSERIAL PRIMARY KEY, \
                 tbl TEXT NOT NULL, \
                 key TEXT NOT NULL, \
                 version BIGINT NOT NULL, \
                 created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            sql::SEQ
        );
        sqlx::raw_sql(AssertSqlSafe(engine_objects))
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        let has_fn: bool = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT to_regprocedure('\"{}\"(regclass, name, anyelement)') IS NOT NULL",
            sql::ASSERT_ABSENT_FN
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(e)?;
        if !has_fn {
            sqlx::raw_sql(AssertSqlSafe(sql::assert_absent_fn_sql()))
                .execute(&mut *tx)
                .await
                .map_err(e)?;
        }
        let oid: Option<i64> = sqlx::query_scalar("SELECT to_regclass($1)::oid::bigint")
            .bind(t.name().quoted())
            .fetch_one(&mut *tx)
            .await
            .map_err(e)?;
        match oid {
            None => {
                sqlx::raw_sql(AssertSqlSafe(sql::create_table_sql(t)))
                    .execute(&mut *tx)
                    .await
                    .map_err(e)?;
            }
            Some(oid) => check_existing(&mut tx, t, oid).await?,
        }
        tx.commit()
            .await
            .map_err(|err| map_err(err, Phase::Commit).with_operation("db.ensure_table"))?;
        self.shared.table_sql(t);
        Ok(())
    }

    async fn begin(&self, opts: TxOptions) -> Result<Box<dyn Transaction>> {
        let tx = self
            .shared
            .pool
            .begin()
            .await
            .map_err(|e| map_err(e, Phase::NoCommit).with_operation("db.begin"))?;
        Ok(Box::new(PgTx {
            tx,
            shared: self.shared.clone(),
            outbox: opts.outbox,
            locked: HashSet::new(),
        }))
    }

    async fn execute(&self, writes: Vec<Write>, opts: TxOptions) -> Result<Vec<WriteOutcome>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut ps = writes
            .iter()
            .map(|w| prepare(&self.shared, w))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| e.with_operation("db.execute"))?;
        // A lone fenced upsert may share its statement and commit with
        // concurrent ones (see `coalesce`).
        if let Some(c) = &self.shared.coalescer
            && opts.fence
            && ps.len() == 1
            && matches!(ps[0].op, PreparedOp::Upsert(_))
            && let Some(p) = ps.pop()
        {
            return Coalescer::submit(self, c, p, opts)
                .await
                .map(|o| vec![o])
                .map_err(|e| e.with_operation("db.execute"));
        }
        self.run_retrying(&ps, opts)
            .await
            .map_err(|e| e.with_operation("db.execute"))
    }

    async fn get(&self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        table.check_key(key)?;
        let sql = self.shared.table_sql(table);
        let r = bind_key(query(&sql.select), key)
            .fetch_optional(&self.shared.pool)
            .await
            .map_err(|e| map_err(e, Phase::NoCommit).with_operation("db.get"))?;
        match r {
            Some(r) => sql::read_row(table, &r, 0),
            None => Ok(None),
        }
    }

    async fn get_many(&self, table: &Table, keys: &[Key]) -> Result<Vec<Option<VersionedRow>>> {
        for k in keys {
            table.check_key(k)?;
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let sql = self.shared.table_sql(table);
        let q = query(&sql.select_many);
        let q = match table.key_column().ty {
            ColumnType::Int => q.bind(
                keys.iter()
                    .filter_map(|k| match k {
                        Key::Int(i) => Some(*i),
                        Key::Text(_) => None,
                    })
                    .collect::<Vec<i64>>(),
            ),
            _ => q.bind(
                keys.iter()
                    .filter_map(|k| match k {
                        Key::Text(s) => Some(s.clone()),
                        Key::Int(_) => None,
                    })
                    .collect::<Vec<String>>(),
            ),
        };
        let rows = q
            .fetch_all(&self.shared.pool)
            .await
            .map_err(|e| map_err(e, Phase::NoCommit).with_operation("db.get_many"))?;
        let mut found = HashMap::with_capacity(rows.len());
        for r in &rows {
            if let Some(vr) = sql::read_row(table, r, 0)?
                && let Some(k) = table.key_of(&vr.row)
            {
                found.insert(k, vr);
            }
        }
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    async fn scan(
        &self,
        table: &Table,
        after: Option<Key>,
        limit: usize,
    ) -> Result<Vec<VersionedRow>> {
        let sql = self.shared.table_sql(table);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let q = match &after {
            None => query(&sql.scan_first).bind(limit),
            Some(k) => {
                table.check_key(k)?;
                bind_key(query(&sql.scan_after), k).bind(limit)
            }
        };
        let rows = q
            .fetch_all(&self.shared.pool)
            .await
            .map_err(|e| map_err(e, Phase::NoCommit).with_operation("db.scan"))?;
        rows.iter()
            .filter_map(|r| sql::read_row(table, r, 0).transpose())
            .collect()
    }

    /// `ORDER BY md5(seed || key) LIMIT n`: PostgreSQL hashes every key and
    /// keeps the `n` first (a top-n sort, in the server's memory for `n`
    /// rows only); the same seed ranks the same keys the same way.
    async fn sample(&self, table: &Table, n: usize, seed: u64) -> Result<Vec<VersionedRow>> {
        let sql = self.shared.table_sql(table);
        let rows = query(&sql.sample)
            .bind(i64::try_from(n).unwrap_or(i64::MAX))
            .bind(format!("{seed}:"))
            .fetch_all(&self.shared.pool)
            .await
            .map_err(|e| map_err(e, Phase::NoCommit).with_operation("db.sample"))?;
        rows.iter()
            .filter_map(|r| sql::read_row(table, r, 0).transpose())
            .collect()
    }

    /// `SELECT count(*)`: exact, and a scan of the table (or of an index).
    async fn count(&self, table: &Table) -> Result<u64> {
        let sql = self.shared.table_sql(table);
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql.count.clone()))
            .fetch_one(&self.shared.pool)
            .await
            .map_err(|e| map_err(e, Phase::NoCommit).with_operation("db.count"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn outbox_pending(
        &self,
        tables: Option<&[String]>,
        min_age: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>> {
        let rows = sqlx::query(
            "SELECT id, tbl, key, version FROM \"_wt_outbox\" \
             WHERE created_at <= now() - make_interval(secs => $1) \
             AND ($3::text[] IS NULL OR tbl = ANY($3)) ORDER BY id LIMIT $2",
        )
        .bind(min_age.as_secs_f64())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(tables.map(<[String]>::to_vec))
        .fetch_all(&self.shared.pool)
        .await
        .map_err(|e| map_err(e, Phase::NoCommit).with_operation("db.outbox_pending"))?;
        rows.iter()
            .map(|r| {
                let get = |e| map_err(e, Phase::NoCommit).with_operation("db.outbox_pending");
                let key: String = r.try_get(2).map_err(get)?;
                Ok(OutboxEntry {
                    id: r.try_get(0).map_err(get)?,
                    table: r.try_get(1).map_err(get)?,
                    key: Key::decode(&key)?,
                    version: sql::version(r.try_get(3).map_err(get)?),
                })
            })
            .collect()
    }

    async fn track_external(&self, t: &Table) -> Result<u64> {
        let e = |e| map_err(e, Phase::NoCommit).with_operation("db.track_external");
        let mut tx = self.shared.pool.begin().await.map_err(e)?;
        sqlx::query(DDL_LOCK).execute(&mut *tx).await.map_err(e)?;
        let oid: Option<i64> = sqlx::query_scalar("SELECT to_regclass($1)::oid::bigint")
            .bind(t.name().quoted())
            .fetch_one(&mut *tx)
            .await
            .map_err(e)?;
        let Some(oid) = oid else {
            return Err(Error::new(
                ErrorKind::SchemaMismatch,
                format!("table {} does not exist", t.name()),
            )
            .with_backend("postgres")
            .with_operation("db.track_external"));
        };
        // All or nothing: DDL is transactional, so a refusal (a foreign
        // trigger of the same name, a missing privilege) leaves nothing.
        let floor = external::install(&mut tx, t, oid).await.map_err(|err| {
            if err.kind() == ErrorKind::Config {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "cannot install the triggers that track writes made outside the engine \
                         on table {} (creating triggers needs the table's owner or the TRIGGER \
                         privilege, and CREATE on the schema)",
                        t.name()
                    ),
                )
                .with_backend("postgres")
                .with_operation("db.track_external")
                .with_source(err)
            } else {
                err
            }
        })?;
        tx.commit()
            .await
            .map_err(|err| map_err(err, Phase::Commit).with_operation("db.track_external"))?;
        self.shared
            .doorbell
            .start(self.shared.config.session_options());
        Ok(floor)
    }

    async fn external_changes(
        &self,
        tables: &[String],
        range: writethrough_core::backend::ChangeRange<'_>,
        limit: usize,
    ) -> Result<writethrough_core::backend::ChangePage> {
        external::changes(&self.shared.pool, tables, range, limit).await
    }

    async fn prune_external_changes(&self, age: Duration) -> Result<u64> {
        external::prune(&self.shared.pool, age).await
    }

    fn external_doorbell(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.shared.doorbell.subscribe()
    }

    async fn outbox_remove(&self, ids: Vec<i64>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM \"_wt_outbox\" WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.shared.pool)
            .await
            .map(drop)
            .map_err(|e| map_err(e, Phase::Commit).with_operation("db.outbox_remove"))
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.shared.pool)
            .await
            .map(drop)
            .map_err(|e| map_err(e, Phase::NoCommit).with_operation("db.ping"))
    }

    async fn describe_table(&self, name: &str) -> Result<Table> {
        introspect::describe_table(&self.shared.pool, name).await
    }

    async fn managed_tables(&self) -> Result<Vec<String>> {
        introspect::managed_tables(&self.shared.pool).await
    }

    async fn outbox_summary(&self) -> Result<Vec<writethrough_core::backend::OutboxSummary>> {
        introspect::outbox_summary(&self.shared.pool).await
    }
}

/// Checks an existing table against the schema: every declared column
/// present (exact, case-sensitive names) with a compatible type, a unique
/// index on the key alone; adds the version column if it is missing.
async fn check_existing(tx: &mut PgConnection, t: &Table, oid: i64) -> Result<()> {
    let e = |e| map_err(e, Phase::NoCommit).with_operation("db.ensure_table");
    let cols: Vec<(String, String)> = sqlx::query_as(
        "SELECT attname::text, format_type(atttypid, NULL) FROM pg_attribute \
         WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped",
    )
    .bind(oid)
    .fetch_all(&mut *tx)
    .await
    .map_err(e)?;
    for c in t.columns() {
        let Some((_, ty)) = cols.iter().find(|(n, _)| n == c.name.as_str()) else {
            return Err(schema_err(format!(
                "table {} exists without column {}",
                t.name(),
                c.name
            )));
        };
        if !sql::accepted_types(c.ty).contains(&ty.as_str()) {
            return Err(schema_err(format!(
                "column {}.{} is {ty}, which cannot hold {} values (expected one of {:?})",
                t.name(),
                c.name,
                c.ty.as_str(),
                sql::accepted_types(c.ty)
            )));
        }
    }
    let key = &t.key_column().name;
    let unique: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_index i \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
         WHERE i.indrelid = $1::oid AND i.indisunique AND i.indnkeyatts = 1 \
         AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = $2)",
    )
    .bind(oid)
    .bind(key.as_str())
    .fetch_one(&mut *tx)
    .await
    .map_err(e)?;
    if !unique {
        return Err(schema_err(format!(
            "key column {}.{key} has no unique index (a primary key or UNIQUE constraint on it alone)",
            t.name()
        )));
    }
    match cols.iter().find(|(n, _)| n == VERSION_COLUMN) {
        Some((_, ty)) if ty == "bigint" => {}
        Some((_, ty)) => {
            return Err(schema_err(format!(
                "column {}.{VERSION_COLUMN} is {ty}, not bigint",
                t.name()
            )));
        }
        None => {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS \"{VERSION_COLUMN}\" BIGINT NOT NULL DEFAULT 0",
                t.name().quoted()
            )))
            .execute(&mut *tx)
            .await
            .map_err(e)?;
        }
    }
    Ok(())
}
