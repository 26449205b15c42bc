//! Fault-injecting wrappers around real stores.
//!
//! [`FaultyCache`] and [`FaultyDb`] forward every call to the real backend
//! they wrap, unless told to fail, stall, or report a commit as in doubt.
//! They also count calls, so tests can check round trips. They never stand
//! in for a backend: there is always a real one behind them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use writethrough_core::backend::{
    CacheCapabilities, CacheItem, CacheStore, DbCapabilities, DbStore, Fence, OutboxEntry,
    ScanCursor, ScanPage, Transaction, TxOptions, Write, WriteOutcome, async_trait,
};
use writethrough_core::{Error, ErrorKind, Key, Result, Table, VersionedRow};

fn injected(what: &str) -> Error {
    Error::new(ErrorKind::Unavailable, format!("injected fault: {what}")).with_backend("faulty")
}

/// Call counts by operation name.
#[derive(Default)]
pub struct Calls(Mutex<HashMap<&'static str, u64>>);

impl Calls {
    fn hit(&self, op: &'static str) {
        *self.0.lock().entry(op).or_default() += 1;
    }

    /// How many times `op` was called.
    pub fn get(&self, op: &str) -> u64 {
        self.0.lock().get(op).copied().unwrap_or(0)
    }

    /// Forgets every count.
    pub fn reset(&self) {
        self.0.lock().clear();
    }
}

/// The switches of a [`FaultyCache`].
#[derive(Default)]
pub struct CacheFaults {
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    stall: AtomicBool,
    delay_us: AtomicU64,
    late_us: AtomicU64,
    landed_late: AtomicU64,
    /// Calls seen, by operation (`get`, `set_if_newer`, ...).
    pub calls: Calls,
    ttls: Mutex<Vec<Option<Duration>>>,
}

impl CacheFaults {
    /// Reads (`get`, `get_many`) fail.
    pub fn fail_reads(&self, on: bool) {
        self.fail_reads.store(on, Ordering::SeqCst);
    }
    /// Writes (`set*`, `delete`, `clear`) fail.
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }
    /// Every call fails, `ping` included.
    pub fn fail_all(&self, on: bool) {
        self.fail_reads(on);
        self.fail_writes(on);
    }
    /// Every call waits until the stall is lifted (the engine's timeout fires first).
    pub fn stall(&self, on: bool) {
        self.stall.store(on, Ordering::SeqCst);
    }
    /// Every call waits `d` first.
    pub fn delay(&self, d: Duration) {
        self.delay_us.store(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }
    /// Writes time out at once, as on a stalled connection, but their bytes
    /// were sent: each one still reaches the real cache `d` later, after
    /// whatever was written in between (`None` turns this off).
    pub fn late_writes(&self, d: Option<Duration>) {
        let us = d.map_or(0, |d| {
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
        });
        self.late_us.store(us, Ordering::SeqCst);
    }
    /// Back to a healthy pass-through.
    pub fn heal(&self) {
        self.fail_all(false);
        self.stall(false);
        self.delay(Duration::ZERO);
        self.late_writes(None);
    }

    /// How many late writes have reached the real cache so far.
    pub fn landed_late(&self) -> u64 {
        self.landed_late.load(Ordering::SeqCst)
    }

    fn late(&self) -> Option<Duration> {
        match self.late_us.load(Ordering::SeqCst) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
    /// The TTLs of every item written so far, in order.
    pub fn ttls(&self) -> Vec<Option<Duration>> {
        self.ttls.lock().clone()
    }

    async fn enter(&self, op: &'static str, write: bool) -> Result<()> {
        self.calls.hit(op);
        let delay = self.delay_us.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        while self.stall.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let fail = if write {
            self.fail_writes.load(Ordering::SeqCst)
        } else {
            self.fail_reads.load(Ordering::SeqCst)
        };
        if fail { Err(injected(op)) } else { Ok(()) }
    }
}

/// A real cache behind switchable faults.
#[derive(Clone)]
pub struct FaultyCache {
    inner: Arc<dyn CacheStore>,
    faults: Arc<CacheFaults>,
}

fn stalled() -> Error {
    Error::new(ErrorKind::Timeout, "injected fault: the connection stalled").with_backend("faulty")
}

impl FaultyCache {
    /// Sends `write` to the real cache `d` from now, in the background.
    fn land_late<F>(&self, d: Duration, write: F) -> Error
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let faults = self.faults.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            write.await;
            faults.landed_late.fetch_add(1, Ordering::SeqCst);
        });
        stalled()
    }

    /// Wraps `inner`, healthy.
    pub fn new(inner: Arc<dyn CacheStore>) -> Self {
        FaultyCache {
            inner,
            faults: Arc::default(),
        }
    }

    /// The switches.
    pub fn faults(&self) -> &Arc<CacheFaults> {
        &self.faults
    }

    /// The real cache behind it.
    pub fn inner(&self) -> &Arc<dyn CacheStore> {
        &self.inner
    }
}

#[async_trait]
impl CacheStore for FaultyCache {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> CacheCapabilities {
        self.inner.capabilities()
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.faults.enter("get", false).await?;
        self.inner.get(key).await
    }
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>> {
        self.faults.enter("get_many", false).await?;
        self.inner.get_many(keys).await
    }
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.faults.enter("set", true).await?;
        self.faults.ttls.lock().push(ttl);
        if let Some(d) = self.faults.late() {
            let (inner, key) = (self.inner.clone(), key.to_owned());
            return Err(self.land_late(d, async move {
                let _ = inner.set(&key, value, ttl).await;
            }));
        }
        self.inner.set(key, value, ttl).await
    }
    async fn set_many(&self, items: Vec<CacheItem>) -> Result<()> {
        self.faults.enter("set_many", true).await?;
        self.faults.ttls.lock().extend(items.iter().map(|i| i.ttl));
        self.inner.set_many(items).await
    }
    async fn set_if_newer(&self, item: CacheItem) -> Result<Fence> {
        self.faults.enter("set_if_newer", true).await?;
        self.faults.ttls.lock().push(item.ttl);
        if let Some(d) = self.faults.late() {
            let inner = self.inner.clone();
            return Err(self.land_late(d, async move {
                let _ = inner.set_if_newer(item).await;
            }));
        }
        self.inner.set_if_newer(item).await
    }
    async fn set_many_if_newer(&self, items: Vec<CacheItem>) -> Result<Vec<Fence>> {
        self.faults.enter("set_many_if_newer", true).await?;
        self.faults.ttls.lock().extend(items.iter().map(|i| i.ttl));
        self.inner.set_many_if_newer(items).await
    }
    async fn replace_if_unchanged(&self, expected: Bytes, item: CacheItem) -> Result<Fence> {
        self.faults.enter("replace_if_unchanged", true).await?;
        self.inner.replace_if_unchanged(expected, item).await
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        self.faults.enter("delete", true).await?;
        self.inner.delete(key).await
    }
    async fn clear(&self, prefix: &str) -> Result<()> {
        self.faults.enter("clear", true).await?;
        self.inner.clear(prefix).await
    }
    async fn scan_keys(&self, prefix: &str, cursor: ScanCursor, count: usize) -> Result<ScanPage> {
        self.faults.enter("scan_keys", false).await?;
        self.inner.scan_keys(prefix, cursor, count).await
    }
    async fn ping(&self) -> Result<()> {
        self.faults.enter("ping", false).await?;
        self.inner.ping().await
    }
}

/// The switches of a [`FaultyDb`].
#[derive(Default)]
pub struct DbFaults {
    fail_writes: AtomicBool,
    in_doubt_writes: AtomicBool,
    fail_reads: AtomicBool,
    fail_scope_writes: AtomicBool,
    delay_reads_us: AtomicU64,
    /// Calls seen, by operation (`get`, `execute`, `begin`, ...).
    pub calls: Calls,
}

impl DbFaults {
    /// `execute` and transaction commits fail before reaching the database.
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }
    /// `execute` and commits reach the database and commit, then report an
    /// error whose outcome is unknown, as a connection lost mid-commit would.
    pub fn in_doubt_writes(&self, on: bool) {
        self.in_doubt_writes.store(on, Ordering::SeqCst);
    }
    /// `get` and `scan` fail.
    pub fn fail_reads(&self, on: bool) {
        self.fail_reads.store(on, Ordering::SeqCst);
    }
    /// Writes inside transaction scopes (`Transaction::apply`) fail, as a
    /// database that refuses a statement would; the transaction stays open.
    pub fn fail_scope_writes(&self, on: bool) {
        self.fail_scope_writes.store(on, Ordering::SeqCst);
    }
    /// `get` waits `d` before reading.
    pub fn delay_reads(&self, d: Duration) {
        self.delay_reads_us.store(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }
    /// Back to a healthy pass-through.
    pub fn heal(&self) {
        self.fail_writes(false);
        self.in_doubt_writes(false);
        self.fail_reads(false);
        self.fail_scope_writes(false);
        self.delay_reads(Duration::ZERO);
    }

    fn write_fault(&self) -> Option<bool> {
        if self.fail_writes.load(Ordering::SeqCst) {
            Some(false)
        } else if self.in_doubt_writes.load(Ordering::SeqCst) {
            Some(true)
        } else {
            None
        }
    }

    async fn read(&self, op: &'static str) -> Result<()> {
        self.calls.hit(op);
        let d = self.delay_reads_us.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_micros(d)).await;
        }
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(injected(op));
        }
        Ok(())
    }
}

/// A real database behind switchable faults.
#[derive(Clone)]
pub struct FaultyDb {
    inner: Arc<dyn DbStore>,
    faults: Arc<DbFaults>,
}

impl FaultyDb {
    /// Wraps `inner`, healthy.
    pub fn new(inner: Arc<dyn DbStore>) -> Self {
        FaultyDb {
            inner,
            faults: Arc::default(),
        }
    }

    /// The switches.
    pub fn faults(&self) -> &Arc<DbFaults> {
        &self.faults
    }

    /// A committing call (`execute`, `insert`) under the write fault: not
    /// run at all, or run and then reported lost, or run as is.
    async fn faulty_commit<T>(
        &self,
        op: &'static str,
        commit: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        self.faults.calls.hit(op);
        match self.faults.write_fault() {
            Some(false) => Err(injected(op)),
            Some(true) => {
                commit.await?;
                Err(
                    injected(&format!("{op} (connection lost after the commit was sent)"))
                        .in_doubt(),
                )
            }
            None => commit.await,
        }
    }
}

struct FaultyTx {
    inner: Box<dyn Transaction>,
    faults: Arc<DbFaults>,
}

#[async_trait]
impl Transaction for FaultyTx {
    async fn apply(&mut self, write: &Write) -> Result<WriteOutcome> {
        if self.faults.fail_scope_writes.load(Ordering::SeqCst) {
            return Err(injected("apply"));
        }
        self.inner.apply(write).await
    }
    async fn get(&mut self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        self.inner.get(table, key).await
    }
    async fn get_for_update(&mut self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        self.inner.get_for_update(table, key).await
    }
    async fn commit(self: Box<Self>) -> Result<()> {
        self.faults.calls.hit("commit");
        match self.faults.write_fault() {
            Some(false) => {
                self.inner.rollback().await?;
                Err(injected("commit"))
            }
            Some(true) => {
                self.inner.commit().await?;
                Err(injected("commit (connection lost after the commit was sent)").in_doubt())
            }
            None => self.inner.commit().await,
        }
    }
    async fn rollback(self: Box<Self>) -> Result<()> {
        self.inner.rollback().await
    }
}

#[async_trait]
impl DbStore for FaultyDb {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> DbCapabilities {
        self.inner.capabilities()
    }
    async fn ensure_table(&self, table: &Table) -> Result<()> {
        self.inner.ensure_table(table).await
    }
    async fn begin(&self, opts: TxOptions) -> Result<Box<dyn Transaction>> {
        self.faults.calls.hit("begin");
        Ok(Box::new(FaultyTx {
            inner: self.inner.begin(opts).await?,
            faults: self.faults.clone(),
        }))
    }
    async fn execute(&self, writes: Vec<Write>, opts: TxOptions) -> Result<Vec<WriteOutcome>> {
        self.faulty_commit("execute", self.inner.execute(writes, opts))
            .await
    }
    async fn get(&self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        self.faults.read("get").await?;
        self.inner.get(table, key).await
    }
    async fn insert(&self, writes: Vec<Write>, opts: TxOptions) -> Result<Vec<WriteOutcome>> {
        self.faulty_commit("insert", self.inner.insert(writes, opts))
            .await
    }
    async fn get_many(&self, table: &Table, keys: &[Key]) -> Result<Vec<Option<VersionedRow>>> {
        self.faults.read("get_many").await?;
        self.inner.get_many(table, keys).await
    }
    async fn scan(
        &self,
        table: &Table,
        after: Option<Key>,
        limit: usize,
    ) -> Result<Vec<VersionedRow>> {
        self.faults.read("scan").await?;
        self.inner.scan(table, after, limit).await
    }
    async fn sample(&self, table: &Table, n: usize, seed: u64) -> Result<Vec<VersionedRow>> {
        self.faults.read("sample").await?;
        self.inner.sample(table, n, seed).await
    }
    async fn count(&self, table: &Table) -> Result<u64> {
        self.faults.read("count").await?;
        self.inner.count(table).await
    }
    async fn outbox_pending(
        &self,
        tables: Option<&[String]>,
        min_age: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>> {
        self.inner.outbox_pending(tables, min_age, limit).await
    }
    async fn outbox_remove(&self, ids: Vec<i64>) -> Result<()> {
        self.inner.outbox_remove(ids).await
    }
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}
