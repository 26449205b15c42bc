//! SQLite as a writethrough database, on rusqlite.
//!
//! SQLite calls block, so none of them runs on the async workers. Writes go
//! to one dedicated writer thread (SQLite has one writer at a time anyway)
//! as whole transactions: a write, its version bump and its outbox record
//! cost one thread hop, not one per statement. When writes queue up, the
//! writer commits them together (group commit): each in its own savepoint,
//! so one failing write does not fail the others, and one `COMMIT` for all,
//! which is where SQLite spends its time. Reads go to a small pool of
//! reader threads with their own connections, which WAL lets run beside the
//! writer.
//!
//! An interactive transaction (a scope) holds the writer thread, and with it
//! SQLite's write lock, from `begin` (`BEGIN IMMEDIATE`) to its end: scopes
//! are serial, so every read in one is current and `get_for_update` is a
//! plain read. A write, or a second `begin`, from the task that holds an
//! open scope (its Tokio task, or its thread outside any task — a
//! `#[tokio::main]` body) would wait for that scope forever; it fails at
//! once with `ErrorKind::WouldDeadlock` instead. Futures joined inside one
//! task count as that task: write beside an open scope from another task.
//!
//! ```no_run
//! # fn main() -> writethrough_core::Result<()> {
//! let db = writethrough_sqlite::SqliteStore::open("app.db")?;
//! # Ok(()) }
//! ```

mod external;
mod introspect;
mod sql;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;
use writethrough_core::backend::{
    ChangePage, ChangeRange, DbCapabilities, DbStore, OUTBOX_TABLE, OutboxEntry, Transaction,
    TxOptions, Write, WriteOutcome, async_trait,
};
use writethrough_core::{Error, ErrorKind, Key, Result, Table, VersionedRow};

use sql::{SqlCache, map_err};

/// How durable a commit is (SQLite's `synchronous` pragma in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Synchronous {
    /// A commit survives a process crash but may be lost on power loss; fast.
    Normal,
    /// A commit is on disk before it returns.
    Full,
}

/// Settings of a [`SqliteStore`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqliteConfig {
    /// The database file.
    pub path: PathBuf,
    /// How long a statement waits for a lock held by another connection
    /// before failing with `ErrorKind::Busy`.
    pub busy_timeout: Duration,
    /// Reader threads (each with its own connection).
    pub readers: usize,
    /// Most write transactions committed together.
    pub group_commit_max: usize,
    /// Durability of commits.
    pub synchronous: Synchronous,
    /// An interactive transaction left idle this long is rolled back, so a
    /// forgotten one cannot hold SQLite's single write lock forever.
    pub idle_transaction_timeout: Duration,
    /// A write that finds the writer idle (nothing queued, no transaction
    /// open) runs at once on the calling thread, as a direct rusqlite call
    /// would, instead of hopping to the writer thread and back. It never
    /// waits there for another process's write lock: a busy database sends
    /// it to the writer thread. Off, every write goes through the thread.
    pub inline_writes: bool,
}

impl SqliteConfig {
    /// Defaults for the file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            path: path.into(),
            busy_timeout: Duration::from_secs(5),
            readers: 2,
            group_commit_max: 256,
            synchronous: Synchronous::Normal,
            idle_transaction_timeout: Duration::from_secs(30),
            inline_writes: true,
        }
    }

    /// Sets the busy timeout.
    #[must_use]
    pub fn busy_timeout(mut self, d: Duration) -> Self {
        self.busy_timeout = d;
        self
    }

    /// Sets the number of reader threads (at least 1).
    #[must_use]
    pub fn readers(mut self, n: usize) -> Self {
        self.readers = n.max(1);
        self
    }

    /// Sets the durability of commits.
    #[must_use]
    pub fn synchronous(mut self, s: Synchronous) -> Self {
        self.synchronous = s;
        self
    }

    /// Sets whether a write that finds the writer idle runs on the calling
    /// thread (see [`SqliteConfig::inline_writes`]).
    #[must_use]
    pub fn inline_writes(mut self, on: bool) -> Self {
        self.inline_writes = on;
        self
    }

    /// Sets the largest group of transactions committed together (1 turns group commit off).
    #[must_use]
    pub fn group_commit_max(mut self, n: usize) -> Self {
        self.group_commit_max = n.max(1);
        self
    }
}

/// A SQLite database backend. Cheap to clone; the threads stop when the
/// last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

struct Shared {
    writer: Sender<WriterJob>,
    /// The write connection: the writer thread's, lent to a caller that
    /// finds it idle (`inline_writes`).
    conn: Arc<Mutex<Writer>>,
    inline: bool,
    busy_timeout: Duration,
    inlined: AtomicU64,
    /// Writes in flight (queued, running, or waiting for their reply).
    active: AtomicUsize,
    readers: Sender<ReadJob>,
    path: PathBuf,
    /// Where the `data_version` doorbell connects.
    doorbell_cfg: SqliteConfig,
    doorbell: external::Doorbell,
    /// The open scope, if any, and who holds it.
    scope: Arc<ScopeSlot>,
    next_scope: AtomicU64,
    _temp: Option<tempfile::TempDir>,
}

/// Who is running: the Tokio task, or the thread when not inside a task
/// (`block_on`, which a `#[tokio::main]` body runs in, is not a task).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Task(tokio::task::Id),
    Thread(std::thread::ThreadId),
}

impl Owner {
    fn current() -> Self {
        match tokio::task::try_id() {
            Some(id) => Owner::Task(id),
            None => Owner::Thread(std::thread::current().id()),
        }
    }
}

/// The open interactive transaction (there is at most one: it holds the
/// writer thread) and its owner. Set by the writer thread when the scope
/// has begun, cleared before its end is answered, so that the owner never
/// sees it set after its scope ended.
#[derive(Default)]
struct ScopeSlot(Mutex<Option<(u64, Owner)>>);

impl ScopeSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, Owner)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, id: u64, owner: Owner) {
        *self.lock() = Some((id, owner));
    }

    fn clear(&self, id: u64) {
        let mut slot = self.lock();
        if slot.is_some_and(|(open, _)| open == id) {
            *slot = None;
        }
    }

    /// Refuses a call to the writer thread from the owner of the open
    /// scope: it would queue behind that scope, which waits for its owner.
    fn check(&self, what: &str) -> Result<()> {
        let me = Owner::current();
        match *self.lock() {
            Some((_, owner)) if owner == me => Err(Error::new(
                ErrorKind::WouldDeadlock,
                format!(
                    "{what} from the task that holds an open SQLite transaction scope would wait \
                     for that scope forever (SQLite has one writer); write through the scope, \
                     commit or roll it back first, or write from another task"
                ),
            )
            .with_backend("sqlite")),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .finish()
    }
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum WriterJob {
    Group(GroupItem),
    Begin(Interactive),
    Ensure(Table, Reply<()>),
    TrackExternal(Table, Reply<u64>),
    PruneExternal(Duration, Reply<u64>),
}

enum GroupItem {
    /// Writes; with `create_only`, every upsert must create its row.
    Writes(Vec<Write>, TxOptions, bool, Reply<Vec<WriteOutcome>>),
    OutboxRemove(Vec<i64>, Reply<()>),
}

struct Interactive {
    cmds: Receiver<TxCmd>,
    opts: TxOptions,
    started: Reply<()>,
    /// The scope's id and owner, and the slot to record them in.
    id: u64,
    owner: Owner,
    slot: Arc<ScopeSlot>,
}

enum TxCmd {
    Apply(Box<Write>, Reply<WriteOutcome>),
    Get(Table, Key, Reply<Option<VersionedRow>>),
    Commit(Reply<()>),
    Rollback(Reply<()>),
}

enum ReadJob {
    Get(Table, Key, Reply<Option<VersionedRow>>),
    GetMany(Table, Vec<Key>, Reply<Vec<Option<VersionedRow>>>),
    Scan(Table, Option<Key>, usize, Reply<Vec<VersionedRow>>),
    OutboxPending(
        Option<Vec<String>>,
        Duration,
        usize,
        Reply<Vec<OutboxEntry>>,
    ),
    Ping(Reply<()>),
    /// Changes of tables in a range: after, upto, positions.
    Changes(
        Vec<String>,
        (i64, i64, Option<Vec<u64>>),
        usize,
        Reply<ChangePage>,
    ),
    /// A catalog read for operators' tools (see `introspect`).
    Catalog(Box<dyn FnOnce(&Connection) + Send>),
}

fn gone() -> Error {
    Error::new(
        ErrorKind::Unavailable,
        "the SQLite worker thread is gone; the outcome of the call is unknown",
    )
    .with_backend("sqlite")
    .in_doubt()
}

async fn ask<T>(rx: oneshot::Receiver<Result<T>>) -> Result<T> {
    rx.await.unwrap_or_else(|_| Err(gone()))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with default settings.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::with_config(SqliteConfig::new(path.as_ref()))
    }

    /// Opens a fresh database in a temporary directory, removed when the
    /// store is dropped: for examples and tests.
    pub fn open_temporary() -> Result<Self> {
        let dir = tempfile::tempdir().map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                "cannot create a temporary directory",
            )
            .with_source(e)
        })?;
        let mut store = Self::with_config(SqliteConfig::new(dir.path().join("writethrough.db")))?;
        Arc::get_mut(&mut store.shared)
            .expect("a new store is not shared yet")
            ._temp = Some(dir);
        Ok(store)
    }

    /// Opens the database described by `cfg`.
    pub fn with_config(cfg: SqliteConfig) -> Result<Self> {
        let writer_conn = open_conn(&cfg, false)?;
        writer_conn
            .execute_batch(&sql::engine_tables_sql())
            .map_err(map_err)?;
        let (wtx, wrx) = crossbeam_channel::unbounded();
        let (rtx, rrx) = crossbeam_channel::unbounded();
        for i in 0..cfg.readers.max(1) {
            let conn = open_conn(&cfg, true)?;
            let rrx = rrx.clone();
            spawn(format!("wt-sqlite-read-{i}"), move || {
                reader_loop(conn, rrx)
            })?;
        }
        let (max, idle) = (cfg.group_commit_max.max(1), cfg.idle_transaction_timeout);
        let conn = Arc::new(Mutex::new(Writer {
            conn: writer_conn,
            cache: SqlCache::default(),
        }));
        let theirs = conn.clone();
        spawn("wt-sqlite-write".into(), move || {
            writer_loop(&theirs, wrx, max, idle)
        })?;
        Ok(SqliteStore {
            shared: Arc::new(Shared {
                writer: wtx,
                conn,
                inline: cfg.inline_writes,
                busy_timeout: cfg.busy_timeout,
                inlined: AtomicU64::new(0),
                active: AtomicUsize::new(0),
                readers: rtx,
                path: cfg.path.clone(),
                doorbell_cfg: cfg,
                doorbell: external::Doorbell::default(),
                scope: Arc::default(),
                next_scope: AtomicU64::new(1),
                _temp: None,
            }),
        })
    }

    /// Write transactions that found the writer idle and ran on the
    /// caller's thread (see [`SqliteConfig::inline_writes`]).
    pub fn writes_inline(&self) -> u64 {
        self.shared.inlined.load(Ordering::Relaxed)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    async fn write<T>(&self, job: WriterJob, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        let what = match &job {
            WriterJob::Group(GroupItem::Writes(..)) => "a write",
            WriterJob::Group(GroupItem::OutboxRemove(..)) => "an outbox cleanup",
            WriterJob::Begin(_) => "a second transaction scope",
            WriterJob::Ensure(..) => "ensure_table",
            WriterJob::TrackExternal(..) => "track_external",
            WriterJob::PruneExternal(..) => "an external change cleanup",
        };
        self.shared.scope.check(what)?;
        self.shared.writer.send(job).map_err(|_| gone())?;
        ask(rx).await
    }

    /// A write transaction: on the calling thread when it is the only one
    /// in flight and the writer is idle, else through the writer thread
    /// (where concurrent ones commit together).
    async fn write_txn(
        &self,
        writes: Vec<Write>,
        opts: TxOptions,
        create_only: bool,
    ) -> Result<Vec<WriteOutcome>> {
        // No scope check before the inline attempt: an open scope holds the
        // write connection, so the write goes to `write`, which checks.
        let active = &self.shared.active;
        let alone = active.fetch_add(1, Ordering::AcqRel) == 0;
        let _done = Decrement(active);
        if alone && let Some(r) = self.try_inline(&writes, opts, create_only) {
            return r;
        }
        let (tx, rx) = oneshot::channel();
        self.write(
            WriterJob::Group(GroupItem::Writes(writes, opts, create_only, tx)),
            rx,
        )
        .await
    }

    /// Runs `writes` on the calling thread if the writer is idle: nothing
    /// queued for it and its connection free. `None` sends them to the
    /// writer thread: it was busy, or another process holds the write lock
    /// (this thread does not wait for it).
    fn try_inline(
        &self,
        writes: &[Write],
        opts: TxOptions,
        create_only: bool,
    ) -> Option<Result<Vec<WriteOutcome>>> {
        let sh = &self.shared;
        if !sh.inline || !sh.writer.is_empty() {
            return None;
        }
        let mut guard = sh.conn.try_lock().ok()?;
        let w = &mut *guard;
        if !w.conn.is_autocommit() || w.conn.busy_timeout(Duration::ZERO).is_err() {
            return None;
        }
        let r = match exec(&w.conn, "BEGIN IMMEDIATE") {
            Err(e) if e.kind() == ErrorKind::Busy => None,
            Err(e) => Some(Err(e)),
            Ok(()) => {
                sh.inlined.fetch_add(1, Ordering::Relaxed);
                Some(commit_alone(
                    &w.conn,
                    &mut w.cache,
                    writes,
                    opts,
                    create_only,
                ))
            }
        };
        if let Err(e) = w.conn.busy_timeout(sh.busy_timeout) {
            tracing::warn!(error = %e, "cannot restore the SQLite busy timeout");
        }
        r
    }

    async fn read<T>(&self, job: ReadJob, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        self.shared.readers.send(job).map_err(|_| gone())?;
        ask(rx).await
    }
}

/// Counts a write out when it ends, however it ends.
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map(drop)
        .map_err(|e| {
            Error::new(ErrorKind::Unavailable, "cannot start a SQLite thread").with_source(e)
        })
}

fn open_conn(cfg: &SqliteConfig, read_only: bool) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(&cfg.path, flags).map_err(map_err)?;
    conn.busy_timeout(cfg.busy_timeout).map_err(map_err)?;
    conn.set_prepared_statement_cache_capacity(256);
    let sync = match cfg.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON;{}",
        if read_only {
            " PRAGMA query_only = 1;"
        } else {
            ""
        }
    ))
    .map_err(map_err)?;
    external::mark(&conn)?;
    sql::register_functions(&conn)?;
    Ok(conn)
}

/// How long a worker thread keeps polling for the next job before it
/// sleeps. Waking a sleeping thread costs tens of microseconds on an idle
/// machine, more than the statement; a caller that sends its next request
/// soon after the previous answer finds the thread awake.
const SPIN: Duration = Duration::from_micros(50);

/// Receives the next job, polling for [`SPIN`] before blocking.
fn recv_spinning<T>(jobs: &Receiver<T>) -> Result<T, crossbeam_channel::RecvError> {
    let start = std::time::Instant::now();
    loop {
        match jobs.try_recv() {
            Ok(job) => return Ok(job),
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                return Err(crossbeam_channel::RecvError);
            }
            Err(crossbeam_channel::TryRecvError::Empty) if start.elapsed() < SPIN => {
                std::hint::spin_loop();
            }
            Err(crossbeam_channel::TryRecvError::Empty) => return jobs.recv(),
        }
    }
}

fn reader_loop(conn: Connection, jobs: Receiver<ReadJob>) {
    let mut cache = SqlCache::default();
    while let Ok(job) = recv_spinning(&jobs) {
        match job {
            ReadJob::Get(t, k, reply) => {
                let _ = reply.send(sql::get(&conn, &mut cache, &t, &k));
            }
            ReadJob::GetMany(t, keys, reply) => {
                let _ = reply.send(sql::get_many(&conn, &mut cache, &t, &keys));
            }
            ReadJob::Scan(t, after, limit, reply) => {
                let _ = reply.send(sql::scan(&conn, &mut cache, &t, after.as_ref(), limit));
            }
            ReadJob::OutboxPending(tables, min_age, limit, reply) => {
                let _ = reply.send(outbox_pending(&conn, tables.as_deref(), min_age, limit));
            }
            ReadJob::Changes(tables, (after, upto, positions), limit, reply) => {
                let range = ChangeRange {
                    after,
                    upto,
                    positions: positions.as_deref(),
                };
                let _ = reply.send(external::changes(&conn, &tables, range, limit));
            }
            ReadJob::Ping(reply) => {
                let r = conn.query_row("SELECT 1", [], |_| Ok(())).map_err(map_err);
                let _ = reply.send(r);
            }
            ReadJob::Catalog(f) => f(&conn),
        }
    }
}

fn outbox_pending(
    conn: &Connection,
    tables: Option<&[String]>,
    min_age: Duration,
    limit: usize,
) -> Result<Vec<OutboxEntry>> {
    let cutoff = sql::now_ms() - i64::try_from(min_age.as_millis()).unwrap_or(i64::MAX);
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT id, tbl, key, version FROM \"{OUTBOX_TABLE}\" WHERE created_ms <= ?1 \
             AND (?3 IS NULL OR tbl IN (SELECT value FROM json_each(?3))) ORDER BY id LIMIT ?2"
        ))
        .map_err(map_err)?;
    let tables = tables.map(|t| serde_json::Value::from(t.to_vec()).to_string());
    let rows = stmt
        .query_map(
            rusqlite::params![cutoff, i64::try_from(limit).unwrap_or(i64::MAX), tables],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            },
        )
        .map_err(map_err)?;
    let mut out = Vec::new();
    for r in rows {
        let (id, table, key, version) = r.map_err(map_err)?;
        out.push(OutboxEntry {
            id,
            table,
            key: Key::decode(&key)?,
            version: u64::try_from(version).unwrap_or(0),
        });
    }
    Ok(out)
}

fn exec(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(drop)
        .map_err(map_err)
}

/// The write connection and its statements.
struct Writer {
    conn: Connection,
    cache: SqlCache,
}

fn writer_loop(
    shared: &Mutex<Writer>,
    jobs: Receiver<WriterJob>,
    group_max: usize,
    idle: Duration,
) {
    let mut carry = None;
    loop {
        let job = match carry.take() {
            Some(j) => j,
            None => match recv_spinning(&jobs) {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
        let Writer { conn, cache } = &mut *guard;
        let (conn, cache) = (&*conn, cache);
        match job {
            WriterJob::Group(first) => {
                let mut group = vec![first];
                while group.len() < group_max {
                    match jobs.try_recv() {
                        Ok(WriterJob::Group(item)) => group.push(item),
                        Ok(other) => {
                            carry = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                run_group(conn, cache, group);
            }
            WriterJob::Begin(it) => run_interactive(conn, cache, it, idle),
            WriterJob::Ensure(t, reply) => {
                let _ = reply.send(sql::ensure_table(conn, cache, &t));
            }
            WriterJob::TrackExternal(t, reply) => {
                let _ = reply.send(external::install(conn, &t));
            }
            WriterJob::PruneExternal(age, reply) => {
                let _ = reply.send(external::prune(conn, age));
            }
        }
    }
}

fn run_item(
    conn: &Connection,
    cache: &mut SqlCache,
    item: &GroupItem,
) -> Result<Option<Vec<WriteOutcome>>> {
    match item {
        GroupItem::Writes(writes, opts, create_only, _) => {
            run_writes(conn, cache, writes, *opts, *create_only).map(Some)
        }
        GroupItem::OutboxRemove(ids, _) => {
            // Ids come in runs (a batch's records are consecutive): one
            // range delete per run instead of one statement per id.
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            sorted.dedup();
            let mut stmt = conn
                .prepare_cached(&format!(
                    "DELETE FROM \"{OUTBOX_TABLE}\" WHERE id BETWEEN ?1 AND ?2"
                ))
                .map_err(map_err)?;
            let mut i = 0;
            while i < sorted.len() {
                let mut j = i;
                while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
                    j += 1;
                }
                stmt.execute([sorted[i], sorted[j]]).map_err(map_err)?;
                i = j + 1;
            }
            Ok(None)
        }
    }
}

/// One write transaction's statements; with `create_only`, every upsert
/// must create its row.
fn run_writes(
    conn: &Connection,
    cache: &mut SqlCache,
    writes: &[Write],
    opts: TxOptions,
    create_only: bool,
) -> Result<Vec<WriteOutcome>> {
    if create_only {
        // The holder of the write connection is the only writer: nothing
        // can insert the key between this check and the write.
        for w in writes {
            if let writethrough_core::backend::WriteOp::Upsert(row) = &w.op
                && let Some(key) = w.table.key_of(row)
                && sql::get(conn, cache, &w.table, &key)?.is_some()
            {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("a row with key {key} already exists"),
                ));
            }
        }
    }
    sql::apply_all(conn, cache, writes, opts.outbox)
}

/// Runs one write transaction inside the `BEGIN IMMEDIATE` already issued,
/// and commits it (or rolls it back on failure).
fn commit_alone(
    conn: &Connection,
    cache: &mut SqlCache,
    writes: &[Write],
    opts: TxOptions,
    create_only: bool,
) -> Result<Vec<WriteOutcome>> {
    let r = run_writes(conn, cache, writes, opts, create_only)
        .and_then(|out| exec(conn, "COMMIT").map(|()| out));
    if r.is_err() && !conn.is_autocommit() {
        let _ = exec(conn, "ROLLBACK");
    }
    r
}

/// Commits a group of write transactions with one `COMMIT`; each runs in
/// its own savepoint so that a failing one is rolled back alone.
fn run_group(conn: &Connection, cache: &mut SqlCache, group: Vec<GroupItem>) {
    let reply_all = |group: Vec<GroupItem>, results: Vec<Result<Option<Vec<WriteOutcome>>>>| {
        for (item, r) in group.into_iter().zip(results) {
            match item {
                GroupItem::Writes(_, _, _, reply) => {
                    let _ = reply.send(r.map(Option::unwrap_or_default));
                }
                GroupItem::OutboxRemove(_, reply) => {
                    let _ = reply.send(r.map(drop));
                }
            }
        }
    };
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        let n = group.len();
        reply_all(group, (0..n).map(|_| Err(e.clone())).collect());
        return;
    }
    let single = group.len() == 1;
    let mut results = Vec::with_capacity(group.len());
    let mut savepoint_failed = None;
    for item in &group {
        if !single && let Err(e) = exec(conn, "SAVEPOINT wt_group") {
            savepoint_failed = Some(e);
            break;
        }
        let r = run_item(conn, cache, item);
        if !single {
            let undo = if r.is_err() {
                exec(conn, "ROLLBACK TO wt_group")
            } else {
                Ok(())
            };
            if let Err(e) = undo.and_then(|()| exec(conn, "RELEASE wt_group")) {
                savepoint_failed = Some(e);
                break;
            }
        }
        results.push(r);
    }
    let end = match savepoint_failed {
        Some(e) => Err(e),
        None if single && results[0].is_err() => {
            let _ = exec(conn, "ROLLBACK");
            reply_all(group, results);
            return;
        }
        None => exec(conn, "COMMIT"),
    };
    if let Err(e) = end {
        let _ = exec(conn, "ROLLBACK");
        let n = group.len();
        reply_all(group, (0..n).map(|_| Err(e.clone())).collect());
        return;
    }
    reply_all(group, results);
}

fn run_interactive(conn: &Connection, cache: &mut SqlCache, it: Interactive, idle: Duration) {
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        let _ = it.started.send(Err(e));
        return;
    }
    it.slot.set(it.id, it.owner);
    let _open = ClearOnExit(&it.slot, it.id);
    if it.started.send(Ok(())).is_err() {
        let _ = exec(conn, "ROLLBACK");
        return;
    }
    loop {
        match it.cmds.recv_timeout(idle) {
            Ok(TxCmd::Apply(w, reply)) => {
                let _ = reply.send(sql::apply(conn, cache, &w, it.opts.outbox));
            }
            Ok(TxCmd::Get(t, k, reply)) => {
                let _ = reply.send(sql::get(conn, cache, &t, &k));
            }
            Ok(TxCmd::Commit(reply)) => {
                let r = exec(conn, "COMMIT");
                if r.is_err() {
                    let _ = exec(conn, "ROLLBACK");
                }
                it.slot.clear(it.id);
                let _ = reply.send(r);
                return;
            }
            Ok(TxCmd::Rollback(reply)) => {
                let r = exec(conn, "ROLLBACK");
                it.slot.clear(it.id);
                let _ = reply.send(r);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!(?idle, "rolling back an idle SQLite transaction");
                let _ = exec(conn, "ROLLBACK");
                return;
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = exec(conn, "ROLLBACK");
                return;
            }
        }
    }
}

/// Clears the scope slot when the writer thread leaves a scope, however it leaves.
struct ClearOnExit<'a>(&'a ScopeSlot, u64);

impl Drop for ClearOnExit<'_> {
    fn drop(&mut self) {
        self.0.clear(self.1);
    }
}

/// An interactive SQLite transaction, run on the writer thread.
struct SqliteTx {
    cmds: Sender<TxCmd>,
    id: u64,
    slot: Arc<ScopeSlot>,
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        // Dropped without commit or rollback: the writer thread rolls back
        // when it sees the channel close, and a write the owner sends next
        // queues behind that rollback, so it may go ahead now.
        self.slot.clear(self.id);
    }
}

impl SqliteTx {
    async fn call<T>(&self, cmd: impl FnOnce(Reply<T>) -> TxCmd) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(cmd(tx)).map_err(|_| closed())?;
        rx.await.unwrap_or_else(|_| Err(closed()))
    }
}

fn closed() -> Error {
    Error::new(
        ErrorKind::Unavailable,
        "the transaction was rolled back (idle too long, or its worker is gone)",
    )
    .with_backend("sqlite")
}

#[async_trait]
impl Transaction for SqliteTx {
    async fn apply(&mut self, write: &Write) -> Result<WriteOutcome> {
        let w = Box::new(write.clone());
        self.call(|r| TxCmd::Apply(w, r)).await
    }
    async fn get(&mut self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        let (t, k) = (table.clone(), key.clone());
        self.call(|r| TxCmd::Get(t, k, r)).await
    }
    /// A plain read: the scope holds SQLite's only write lock from `BEGIN
    /// IMMEDIATE` to its end, so no one else can write the key meanwhile.
    async fn get_for_update(&mut self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        self.get(table, key).await
    }
    async fn commit(self: Box<Self>) -> Result<()> {
        self.call(TxCmd::Commit).await.map_err(|e| {
            if e.kind() == ErrorKind::Unavailable {
                e.in_doubt()
            } else {
                e
            }
        })
    }
    async fn rollback(self: Box<Self>) -> Result<()> {
        self.call(TxCmd::Rollback).await
    }
}

#[async_trait]
impl DbStore for SqliteStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn capabilities(&self) -> DbCapabilities {
        let mut c = DbCapabilities::new();
        c.text_allows_nul = true;
        c
    }

    async fn ensure_table(&self, table: &Table) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.write(WriterJob::Ensure(table.clone(), tx), rx).await
    }

    async fn begin(&self, opts: TxOptions) -> Result<Box<dyn Transaction>> {
        let (cmds_tx, cmds_rx) = crossbeam_channel::unbounded();
        let (tx, rx) = oneshot::channel();
        let id = self.shared.next_scope.fetch_add(1, Ordering::Relaxed);
        let job = WriterJob::Begin(Interactive {
            cmds: cmds_rx,
            opts,
            started: tx,
            id,
            owner: Owner::current(),
            slot: self.shared.scope.clone(),
        });
        self.write(job, rx).await?;
        Ok(Box::new(SqliteTx {
            cmds: cmds_tx,
            id,
            slot: self.shared.scope.clone(),
        }))
    }

    async fn execute(&self, writes: Vec<Write>, opts: TxOptions) -> Result<Vec<WriteOutcome>> {
        self.write_txn(writes, opts, false).await
    }

    async fn insert(&self, writes: Vec<Write>, opts: TxOptions) -> Result<Vec<WriteOutcome>> {
        self.write_txn(writes, opts, true).await
    }

    async fn get(&self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        let (tx, rx) = oneshot::channel();
        self.read(ReadJob::Get(table.clone(), key.clone(), tx), rx)
            .await
    }

    async fn get_many(&self, table: &Table, keys: &[Key]) -> Result<Vec<Option<VersionedRow>>> {
        let (tx, rx) = oneshot::channel();
        self.read(ReadJob::GetMany(table.clone(), keys.to_vec(), tx), rx)
            .await
    }

    async fn scan(
        &self,
        table: &Table,
        after: Option<Key>,
        limit: usize,
    ) -> Result<Vec<VersionedRow>> {
        let (tx, rx) = oneshot::channel();
        self.read(ReadJob::Scan(table.clone(), after, limit, tx), rx)
            .await
    }

    async fn outbox_pending(
        &self,
        tables: Option<&[String]>,
        min_age: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>> {
        let (tx, rx) = oneshot::channel();
        let tables = tables.map(<[String]>::to_vec);
        self.read(ReadJob::OutboxPending(tables, min_age, limit, tx), rx)
            .await
    }

    async fn outbox_remove(&self, ids: Vec<i64>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.write(WriterJob::Group(GroupItem::OutboxRemove(ids, tx)), rx)
            .await
    }

    async fn ping(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.read(ReadJob::Ping(tx), rx).await
    }

    async fn track_external(&self, table: &Table) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        let floor = self
            .write(WriterJob::TrackExternal(table.clone(), tx), rx)
            .await?;
        let cfg = &self.shared.doorbell_cfg;
        self.shared.doorbell.start(|| open_conn(cfg, true))?;
        Ok(floor)
    }

    async fn external_changes(
        &self,
        tables: &[String],
        range: ChangeRange<'_>,
        limit: usize,
    ) -> Result<ChangePage> {
        let (tx, rx) = oneshot::channel();
        let owned = (
            range.after,
            range.upto,
            range.positions.map(<[u64]>::to_vec),
        );
        let job = ReadJob::Changes(tables.to_vec(), owned, limit, tx);
        self.read(job, rx).await
    }

    async fn prune_external_changes(&self, age: Duration) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.write(WriterJob::PruneExternal(age, tx), rx).await
    }

    fn external_doorbell(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.shared.doorbell.subscribe()
    }
    async fn describe_table(&self, name: &str) -> Result<Table> {
        let name = name.to_owned();
        self.catalog(move |conn| introspect::describe_table(conn, &name))
            .await
    }

    async fn managed_tables(&self) -> Result<Vec<String>> {
        self.catalog(introspect::managed_tables).await
    }

    /// `ORDER BY wt_sample_rank(seed, key) LIMIT n`, on a reader thread:
    /// SQLite ranks every key by a hash of the seed and the key and keeps
    /// the `n` first.
    async fn sample(&self, table: &Table, n: usize, seed: u64) -> Result<Vec<VersionedRow>> {
        let table = table.clone();
        self.catalog(move |conn| sql::sample(conn, &table, n, seed))
            .await
    }

    /// `SELECT count(*)`: exact.
    async fn count(&self, table: &Table) -> Result<u64> {
        let table = table.clone();
        self.catalog(move |conn| sql::count(conn, &table)).await
    }

    async fn outbox_summary(&self) -> Result<Vec<writethrough_core::backend::OutboxSummary>> {
        self.catalog(introspect::outbox_summary).await
    }
}

impl SqliteStore {
    /// Runs a catalog read on a reader thread.
    async fn catalog<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let job = ReadJob::Catalog(Box::new(move |conn| {
            let _ = tx.send(f(conn));
        }));
        self.read(job, rx).await
    }
}
