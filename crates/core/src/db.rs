//! The database side: the source of truth, and the versions that fence the cache.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::schema::Table;
use crate::value::{Key, Patch, Row, VersionedRow};

/// Name of the version column the engine adds to every table it manages.
pub const VERSION_COLUMN: &str = "_wt_version";
/// Name of the engine's outbox table.
pub const OUTBOX_TABLE: &str = "_wt_outbox";
/// Name of the table where the triggers of [`DbStore::track_external`]
/// record writes made outside the engine.
pub const CHANGES_TABLE: &str = "_wt_changes";

/// One write to apply in a transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// Insert the row, or replace every column of the existing one.
    Upsert(Row),
    /// Set some columns of an existing row.
    Update(Key, Patch),
    /// Remove a row.
    Delete(Key),
}

/// A write and its table.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// The table written.
    pub table: Table,
    /// What to do.
    pub op: WriteOp,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOutcome {
    /// The version this write was given. Every write gets one, even an
    /// update or delete that found no row, so that the engine can fence the
    /// cache at it.
    pub version: u64,
    /// For update and delete: whether the row was found. For upsert:
    /// whether it replaced a row, where the backend can tell cheaply
    /// (PostgreSQL), else false (SQLite); the engine does not use it.
    pub existed: bool,
    /// For an update that found its row: the whole row after the update.
    pub row: Option<Row>,
    /// The outbox record written in the same transaction, if any.
    pub outbox_id: Option<i64>,
}

/// Options for a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TxOptions {
    /// Record every write in the outbox table, in the same transaction, so
    /// that its cache effect survives a crash after commit.
    pub outbox: bool,
    /// The versions will fence cache writes, so they must follow commit
    /// order per key (the `Transaction` contract). When false (the engine's
    /// fencing is off), an adapter may draw versions more cheaply, e.g.
    /// without a per-key lock; they still increase.
    pub fence: bool,
}

impl Default for TxOptions {
    fn default() -> Self {
        TxOptions {
            outbox: false,
            fence: true,
        }
    }
}

impl TxOptions {
    /// Options with the outbox on or off (versions fenced).
    pub fn with_outbox(outbox: bool) -> Self {
        TxOptions {
            outbox,
            ..Self::default()
        }
    }

    /// Sets [`TxOptions::fence`].
    #[must_use]
    pub fn fenced(mut self, fence: bool) -> Self {
        self.fence = fence;
        self
    }
}

/// A write recorded in the outbox whose cache effect may not have been applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The record's id.
    pub id: i64,
    /// The table written.
    pub table: String,
    /// The key written.
    pub key: Key,
    /// The write's version.
    pub version: u64,
}

/// The outbox records pending for one table, as an operator sees them.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OutboxSummary {
    /// The table the records are for.
    pub table: String,
    /// How many records are pending.
    pub pending: u64,
    /// How long ago the oldest of them was written.
    pub oldest_age: Duration,
}

impl OutboxSummary {
    /// A summary line, for adapters to build.
    pub fn new(table: String, pending: u64, oldest_age: Duration) -> Self {
        OutboxSummary {
            table,
            pending,
            oldest_age,
        }
    }
}

/// A write made outside the engine (psql, a migration, another service),
/// recorded by the triggers that [`DbStore::track_external`] installs, in
/// the same transaction as the write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalChange {
    /// The record's id (increasing in the order records were made).
    pub id: i64,
    /// The table written.
    pub table: String,
    /// The key written; `None` for the whole table (a `TRUNCATE`): every
    /// entry of the table older than `version` is gone.
    pub key: Option<Key>,
    /// The version the write was given, from the source the engine's
    /// writes draw from, so that versions of a key keep increasing across
    /// both kinds of writer.
    pub version: u64,
    /// The writer's transaction as the adapter names it (see
    /// [`ChangePage::in_flight`]); 0 where writers are serial (SQLite).
    pub position: u64,
}

impl ExternalChange {
    /// The key of a record from its stored text (`None` text: a
    /// whole-table change), or `None` when no key decodes from it (written
    /// by hand into the change table, or an external write of text into an
    /// integer key column, which SQLite allows): such a record is logged
    /// and skipped by the adapter, never allowed to stop a follower.
    pub fn record_key(id: i64, text: Option<&str>) -> Option<Option<Key>> {
        match text.map(Key::decode).transpose() {
            Ok(key) => Some(key),
            Err(err) => {
                tracing::warn!(id, error = %err, "skipping an unreadable external change record");
                None
            }
        }
    }
}

/// Which recorded changes [`DbStore::external_changes`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeRange<'a> {
    /// Only ids above this.
    pub after: i64,
    /// Only ids up to this.
    pub upto: i64,
    /// Only changes of these transactions (positions), if given.
    pub positions: Option<&'a [u64]>,
}

/// One page of [`ExternalChange`]s.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangePage {
    /// The changes, by increasing id.
    pub changes: Vec<ExternalChange>,
    /// The transactions (positions) still in flight when the page was read,
    /// in the same snapshot. Record ids are drawn before commit, so a
    /// change not visible yet with an id below one already read belongs to
    /// one of these; a change of any later transaction gets a higher id
    /// than every id visible now. Always empty where writers are serial.
    pub in_flight: Vec<u64>,
    /// The highest record id visible in the page's snapshot (0 if none),
    /// whatever the range asked: where a follower that ignores the past
    /// starts.
    pub max_id: i64,
}

/// The followers an adapter's doorbell rings (see
/// [`DbStore::external_doorbell`]): each subscriber gets its own
/// [`tokio::sync::Notify`], so that several engines on one store are all
/// woken. Cloning shares the list.
#[derive(Clone, Default)]
pub struct Bells(Arc<parking_lot::Mutex<Vec<std::sync::Weak<tokio::sync::Notify>>>>);

/// A [`Bells`] that does not keep the list alive: what a doorbell's
/// background task holds, so that it ends with its store.
#[derive(Clone)]
pub struct WeakBells(
    std::sync::Weak<parking_lot::Mutex<Vec<std::sync::Weak<tokio::sync::Notify>>>>,
);

impl Bells {
    /// A new subscriber.
    pub fn subscribe(&self) -> Arc<tokio::sync::Notify> {
        let n = Arc::new(tokio::sync::Notify::new());
        self.0.lock().push(Arc::downgrade(&n));
        n
    }

    /// Rings every live subscriber (a ring while one is busy is kept for
    /// its next wait), forgetting those gone.
    pub fn ring(&self) {
        self.0.lock().retain(|w| match w.upgrade() {
            Some(n) => {
                n.notify_one();
                true
            }
            None => false,
        });
    }

    /// The weak handle.
    pub fn downgrade(&self) -> WeakBells {
        WeakBells(Arc::downgrade(&self.0))
    }
}

impl WeakBells {
    /// Rings every subscriber; false once the store is gone.
    pub fn ring(&self) -> bool {
        match self.0.upgrade() {
            Some(list) => {
                Bells(list).ring();
                true
            }
            None => false,
        }
    }

    /// Whether the store is still there.
    pub fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// What a database backend can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DbCapabilities {
    /// Whether text may contain NUL bytes (PostgreSQL: no).
    pub text_allows_nul: bool,
}

impl DbCapabilities {
    /// Defaults for an adapter to adjust: text may not hold NUL bytes.
    pub fn new() -> Self {
        DbCapabilities {
            text_allows_nul: false,
        }
    }
}

impl Default for DbCapabilities {
    fn default() -> Self {
        Self::new()
    }
}

/// An open transaction.
///
/// # Contract
///
/// * Every write gives the key a new version, strictly greater than every
///   version committed for that key before it, a delete's included; the
///   version is returned, and becomes visible with the row only when the
///   transaction commits.
/// * `commit` and `rollback` consume the transaction; dropping it without
///   either rolls it back.
/// * Reads inside the transaction see its own writes.
/// * [`Transaction::get_for_update`] is a locking read: from the moment it
///   returns until the transaction ends, no other transaction can commit a
///   write of that key (present or missing), so a value read with it and
///   written back cannot lose a concurrent update. Plain
///   [`Transaction::get`] gives no such promise.
///
/// # Isolation
///
/// * PostgreSQL: `READ COMMITTED`, plus the engine's key locks. Every write
///   takes its key's lock (a transaction-scoped advisory lock on a hash
///   slot of the key) and holds it to the end of the transaction;
///   `get_for_update` takes the same lock before it reads. Each statement
///   sees what was committed when it started, so a plain `get` may be
///   outdated by the time the transaction writes.
/// * SQLite: serial. A transaction holds the database's single write lock
///   from `begin` (`BEGIN IMMEDIATE`) to its end, so nothing else writes
///   meanwhile; `get_for_update` is a plain read.
#[async_trait]
pub trait Transaction: Send {
    /// Applies one write.
    async fn apply(&mut self, write: &Write) -> Result<WriteOutcome>;
    /// Reads one row, seeing this transaction's own writes.
    async fn get(&mut self, table: &Table, key: &Key) -> Result<Option<VersionedRow>>;
    /// Reads one row after taking the lock its writes take, so that no
    /// other transaction writes the key until this one ends. Works for a
    /// missing row too: the key is locked whether or not a row exists.
    async fn get_for_update(&mut self, table: &Table, key: &Key) -> Result<Option<VersionedRow>>;
    /// Commits.
    async fn commit(self: Box<Self>) -> Result<()>;
    /// Rolls back.
    async fn rollback(self: Box<Self>) -> Result<()>;
}

/// A database backend.
///
/// # Contract
///
/// Checked by `writethrough_testkit::db_suite`:
///
/// * [`DbStore::execute`] applies its writes atomically: all commit, or none.
/// * A failure whose commit outcome is unknown (the connection dropped with
///   the commit in flight) is marked [`crate::Error::is_in_doubt`].
/// * Versions follow the [`Transaction`] contract.
/// * `ensure_table` creates the table with its version column if it is
///   missing, and fails with `SchemaMismatch` if it exists without the
///   columns the schema declares, with a column of a type that cannot hold
///   the declared one, or with another key.
/// * Outbox records written by a transaction appear in `outbox_pending`
///   (when their table is asked for) once they are older than `min_age`,
///   until removed; records of a rolled-back transaction never appear.
#[async_trait]
pub trait DbStore: Send + Sync + 'static {
    /// The backend's short name.
    fn name(&self) -> &'static str;
    /// What the backend can hold.
    fn capabilities(&self) -> DbCapabilities;
    /// Creates the table (and the engine's own tables) if missing, and checks its columns.
    async fn ensure_table(&self, table: &Table) -> Result<()>;
    /// Opens a transaction.
    async fn begin(&self, opts: TxOptions) -> Result<Box<dyn Transaction>>;
    /// Applies `writes` in one transaction, in as few round trips as the backend allows.
    async fn execute(&self, writes: Vec<Write>, opts: TxOptions) -> Result<Vec<WriteOutcome>> {
        let mut tx = self.begin(opts).await?;
        let mut out = Vec::with_capacity(writes.len());
        for w in &writes {
            out.push(tx.apply(w).await?);
        }
        tx.commit().await?;
        Ok(out)
    }
    /// Writes upserts whose rows must not exist yet, in one transaction:
    /// if a key is already there, nothing is written and the call fails
    /// with [`ErrorKind::Conflict`](crate::ErrorKind::Conflict). Two
    /// inserts of one key cannot both succeed. This default takes each
    /// key's lock with [`Transaction::get_for_update`] before it writes;
    /// SQLite checks inside its writer thread instead.
    async fn insert(&self, writes: Vec<Write>, opts: TxOptions) -> Result<Vec<WriteOutcome>> {
        let mut tx = self.begin(opts).await?;
        let mut out = Vec::with_capacity(writes.len());
        for w in &writes {
            if let WriteOp::Upsert(row) = &w.op
                && let Some(key) = w.table.key_of(row)
            {
                match tx.get_for_update(&w.table, &key).await {
                    Ok(None) => {}
                    Ok(Some(_)) => {
                        let _ = tx.rollback().await;
                        return Err(crate::Error::new(
                            crate::ErrorKind::Conflict,
                            format!("a row with key {key} already exists"),
                        ));
                    }
                    Err(e) => {
                        let _ = tx.rollback().await;
                        return Err(e);
                    }
                }
            }
            out.push(tx.apply(w).await?);
        }
        tx.commit().await?;
        Ok(out)
    }
    /// Reads one committed row.
    async fn get(&self, table: &Table, key: &Key) -> Result<Option<VersionedRow>>;
    /// Reads several committed rows, one answer per key in the order given
    /// (a key given twice is answered twice). One query where the backend
    /// can; this default reads them one by one.
    async fn get_many(&self, table: &Table, keys: &[Key]) -> Result<Vec<Option<VersionedRow>>> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.get(table, k).await?);
        }
        Ok(out)
    }
    /// Reads rows in key order, starting after `after`, at most `limit`.
    async fn scan(
        &self,
        table: &Table,
        after: Option<Key>,
        limit: usize,
    ) -> Result<Vec<VersionedRow>>;
    /// Up to `n` distinct rows picked at random, in one query: the `n`
    /// rows whose keys rank first by a hash of `seed` and the key. The same
    /// seed over the same keys picks the same rows; another seed, others.
    /// The database ranks every key to pick them (nothing is held in memory
    /// but the `n` rows, yet the cost grows with the table, like
    /// `ORDER BY random() LIMIT n`). For the audit's `--sample`. The
    /// default says the backend cannot.
    async fn sample(&self, table: &Table, n: usize, seed: u64) -> Result<Vec<VersionedRow>> {
        let _ = (table, n, seed);
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            "picking a random sample of rows",
        ))
    }
    /// How many rows `table` holds, counted exactly (`count(*)`), for
    /// progress reports. The default says the backend cannot tell.
    async fn count(&self, table: &Table) -> Result<u64> {
        let _ = table;
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            "counting a table's rows",
        ))
    }
    /// Outbox records at least `min_age` old, oldest first, at most
    /// `limit`, of the tables named in `tables` (of every table for `None`).
    async fn outbox_pending(
        &self,
        tables: Option<&[String]>,
        min_age: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>>;
    /// Removes outbox records.
    async fn outbox_remove(&self, ids: Vec<i64>) -> Result<()>;
    /// Checks that the database answers.
    async fn ping(&self) -> Result<()>;
    /// Reads a table's schema from the database, for tools that know no
    /// Rust types (the `writethrough` command line). The key is the
    /// primary key (or the column of a single-column unique index); the
    /// version column is not among the columns. Fails with
    /// `SchemaMismatch` for a table that does not exist, that has no
    /// [`VERSION_COLUMN`], or that has a column of a type the engine
    /// cannot map. The default says the backend cannot tell.
    async fn describe_table(&self, name: &str) -> Result<Table> {
        let _ = name;
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            "reading a table's schema",
        ))
    }
    /// The tables that have a [`VERSION_COLUMN`] (those an engine manages),
    /// by name. The default says the backend cannot tell.
    async fn managed_tables(&self) -> Result<Vec<String>> {
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            "listing the managed tables",
        ))
    }
    /// The pending outbox records per table with the oldest one's age,
    /// tables in name order; empty when there is no outbox table yet. The
    /// default counts through [`DbStore::outbox_pending`], which cannot
    /// tell ages (they read as zero).
    async fn outbox_summary(&self) -> Result<Vec<OutboxSummary>> {
        let mut per: std::collections::BTreeMap<String, u64> = Default::default();
        for e in self
            .outbox_pending(None, Duration::ZERO, usize::MAX)
            .await?
        {
            *per.entry(e.table).or_default() += 1;
        }
        Ok(per
            .into_iter()
            .map(|(t, n)| OutboxSummary::new(t, n, Duration::ZERO))
            .collect())
    }
    /// Installs, idempotently and all or nothing, the triggers that give
    /// writes made outside the engine to `table` a version (from the
    /// engine's own source) and record them as [`ExternalChange`]s in the
    /// same transaction; the engine's own writes are recognised and not
    /// recorded. Returns the table's floor: the version of its last
    /// whole-table change (`TRUNCATE`), 0 if none. Fails with
    /// [`ErrorKind::SchemaMismatch`](crate::ErrorKind::SchemaMismatch) when
    /// a trigger of the same name exists that is not the engine's, and
    /// with the database's error (privileges) otherwise, having installed
    /// nothing. The default: [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported).
    async fn track_external(&self, table: &Table) -> Result<u64> {
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            format!(
                "the {} backend cannot track writes made outside the engine",
                self.name()
            ),
        )
        .with_operation("db.track_external")
        .with_key(table.name().as_str()))
    }
    /// Recorded external changes of `tables` in `range`, by id, at most
    /// `limit`; read in one snapshot together with the page's
    /// [`ChangePage::in_flight`].
    async fn external_changes(
        &self,
        tables: &[String],
        range: ChangeRange<'_>,
        limit: usize,
    ) -> Result<ChangePage> {
        let _ = (tables, range, limit);
        Ok(ChangePage::default())
    }
    /// Removes recorded external changes older than `age`; returns how many.
    async fn prune_external_changes(&self, age: Duration) -> Result<u64> {
        let _ = age;
        Ok(0)
    }
    /// A doorbell rung when an external change may have committed
    /// (PostgreSQL `LISTEN/NOTIFY`, SQLite's `data_version`), once
    /// [`DbStore::track_external`] ran. Never the source of truth: a missed
    /// ring is covered by the follower's periodic scan.
    fn external_doorbell(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
}

#[async_trait]
impl<D: DbStore + ?Sized> DbStore for Arc<D> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn capabilities(&self) -> DbCapabilities {
        (**self).capabilities()
    }
    async fn ensure_table(&self, table: &Table) -> Result<()> {
        (**self).ensure_table(table).await
    }
    async fn begin(&self, opts: TxOptions) -> Result<Box<dyn Transaction>> {
        (**self).begin(opts).await
    }
    async fn execute(&self, writes: Vec<Write>, opts: TxOptions) -> Result<Vec<WriteOutcome>> {
        (**self).execute(writes, opts).await
    }
    async fn get(&self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        (**self).get(table, key).await
    }
    async fn get_many(&self, table: &Table, keys: &[Key]) -> Result<Vec<Option<VersionedRow>>> {
        (**self).get_many(table, keys).await
    }
    async fn insert(&self, writes: Vec<Write>, opts: TxOptions) -> Result<Vec<WriteOutcome>> {
        (**self).insert(writes, opts).await
    }
    async fn scan(
        &self,
        table: &Table,
        after: Option<Key>,
        limit: usize,
    ) -> Result<Vec<VersionedRow>> {
        (**self).scan(table, after, limit).await
    }
    async fn sample(&self, table: &Table, n: usize, seed: u64) -> Result<Vec<VersionedRow>> {
        (**self).sample(table, n, seed).await
    }
    async fn count(&self, table: &Table) -> Result<u64> {
        (**self).count(table).await
    }
    async fn outbox_pending(
        &self,
        tables: Option<&[String]>,
        min_age: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>> {
        (**self).outbox_pending(tables, min_age, limit).await
    }
    async fn outbox_remove(&self, ids: Vec<i64>) -> Result<()> {
        (**self).outbox_remove(ids).await
    }
    async fn ping(&self) -> Result<()> {
        (**self).ping().await
    }
    async fn describe_table(&self, name: &str) -> Result<Table> {
        (**self).describe_table(name).await
    }
    async fn managed_tables(&self) -> Result<Vec<String>> {
        (**self).managed_tables().await
    }
    async fn outbox_summary(&self) -> Result<Vec<OutboxSummary>> {
        (**self).outbox_summary().await
    }
    async fn track_external(&self, table: &Table) -> Result<u64> {
        (**self).track_external(table).await
    }
    async fn external_changes(
        &self,
        tables: &[String],
        range: ChangeRange<'_>,
        limit: usize,
    ) -> Result<ChangePage> {
        (**self).external_changes(tables, range, limit).await
    }
    async fn prune_external_changes(&self, age: Duration) -> Result<u64> {
        (**self).prune_external_changes(age).await
    }
    fn external_doorbell(&self) -> Option<Arc<tokio::sync::Notify>> {
        (**self).external_doorbell()
    }
}
