//! Guarded backends: every call the engine makes to a backend, as a typed
//! method that adds what each call needs and nothing else — the timeout
//! (none for an in-process cache), the per-call metrics and their labels,
//! the breaker's accounting of cache failures, the error counters, and the
//! operation and backend named in the error. The consistency protocol
//! (fences, epochs, resync) stays in the engine; these only carry calls.
//!
//! `inner.cache().get(key)` is the guarded form of
//! `inner.cache_store.get(key)`; the engine never calls a store directly.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Inner;
use super::metrics::{CacheCall, DbCall};
use super::stats::Counters;
use crate::cache::{CacheItem, DecodedSlot, Fence, ScanCursor, ScanPage};
use crate::db::{
    ChangePage, ChangeRange, OutboxEntry, Transaction, TxOptions, Write, WriteOutcome,
};
use crate::error::{Error, ErrorKind, Result};
use crate::schema::Table;
use crate::value::{Key, VersionedRow};

/// The engine's cache, guarded.
#[derive(Clone, Copy)]
pub(crate) struct GuardedCache<'a>(&'a Inner);

/// The engine's database, guarded; also the calls on a transaction.
#[derive(Clone, Copy)]
pub(crate) struct GuardedDb<'a>(&'a Inner);

impl Inner {
    /// The cache, every call guarded.
    pub(crate) fn cache(&self) -> GuardedCache<'_> {
        GuardedCache(self)
    }

    /// The database, every call guarded.
    pub(crate) fn db(&self) -> GuardedDb<'_> {
        GuardedDb(self)
    }
}

impl GuardedCache<'_> {
    async fn call<T>(self, call: CacheCall, f: impl Future<Output = Result<T>>) -> Result<T> {
        self.call_within(call, self.0.cfg.cache_timeout, f).await
    }

    /// [`GuardedCache::call`] with its own timeout, for the calls that walk
    /// many keys.
    async fn call_within<T>(
        self,
        call: CacheCall,
        limit: Duration,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let inner = self.0;
        let r = if inner.caps.in_process {
            // In-process calls cannot stall on a network: no timeout, and no
            // clock reads (they would cost as much as the call itself).
            let r = f.await;
            inner.metrics.cache_call(call, None, r.is_ok());
            r
        } else {
            let started = Instant::now();
            let r = match tokio::time::timeout(limit, f).await {
                Ok(r) => r,
                Err(_) => Err(Error::new(
                    ErrorKind::Timeout,
                    format!("no answer within {limit:?}"),
                )),
            };
            inner
                .metrics
                .cache_call(call, Some(started.elapsed()), r.is_ok());
            r
        };
        match r {
            Ok(v) => {
                inner.breaker.record_success();
                Ok(v)
            }
            Err(e) => {
                Counters::add(&inner.stats.cache_errors, 1);
                if e.is_temporary() && inner.breaker.record_failure() {
                    inner.metrics.breaker_trips.increment(1);
                    inner.metrics.breaker_state.set(2.0);
                }
                Err(e
                    .with_operation(call.name())
                    .with_backend(inner.cache_store.name()))
            }
        }
    }

    pub(crate) async fn get(self, key: &str) -> Result<Option<Bytes>> {
        self.call(CacheCall::Get, self.0.cache_store.get(key)).await
    }

    pub(crate) async fn get_slotted(
        self,
        key: &str,
    ) -> Result<Option<(Bytes, Option<DecodedSlot>)>> {
        self.call(CacheCall::Get, self.0.cache_store.get_slotted(key))
            .await
    }

    pub(crate) async fn get_many(self, keys: &[String]) -> Result<Vec<Option<Bytes>>> {
        self.call(CacheCall::GetMany, self.0.cache_store.get_many(keys))
            .await
    }

    pub(crate) async fn set(self, key: &str, entry: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.call(CacheCall::Set, self.0.cache_store.set(key, entry, ttl))
            .await
    }

    pub(crate) async fn set_many(self, items: Vec<CacheItem>) -> Result<()> {
        self.call(CacheCall::SetMany, self.0.cache_store.set_many(items))
            .await
    }

    pub(crate) async fn set_if_newer(self, item: CacheItem) -> Result<Fence> {
        self.call(CacheCall::SetIfNewer, self.0.cache_store.set_if_newer(item))
            .await
    }

    pub(crate) async fn set_many_if_newer(self, items: Vec<CacheItem>) -> Result<Vec<Fence>> {
        self.call(
            CacheCall::SetManyIfNewer,
            self.0.cache_store.set_many_if_newer(items),
        )
        .await
    }

    pub(crate) async fn replace_if_unchanged(
        self,
        expected: Bytes,
        item: CacheItem,
    ) -> Result<Fence> {
        self.call(
            CacheCall::ReplaceIfUnchanged,
            self.0.cache_store.replace_if_unchanged(expected, item),
        )
        .await
    }

    pub(crate) async fn delete(self, key: &str) -> Result<bool> {
        self.call(CacheCall::Delete, self.0.cache_store.delete(key))
            .await
    }

    pub(crate) async fn clear(self, prefix: &str) -> Result<()> {
        self.call(CacheCall::Clear, self.0.cache_store.clear(prefix))
            .await
    }

    /// One page of keys under `prefix`; a page may walk a whole server
    /// (Memcached's metadump), so it waits up to a minute, or the cache
    /// timeout if longer.
    pub(crate) async fn scan_keys(
        self,
        prefix: &str,
        cursor: ScanCursor,
        count: usize,
    ) -> Result<ScanPage> {
        let limit = self.0.cfg.cache_timeout.max(Duration::from_secs(60));
        self.call_within(
            CacheCall::ScanKeys,
            limit,
            self.0.cache_store.scan_keys(prefix, cursor, count),
        )
        .await
    }

    pub(crate) async fn ping(self) -> Result<()> {
        self.call(CacheCall::Ping, self.0.cache_store.ping()).await
    }

    pub(crate) async fn identity(self) -> Result<Option<String>> {
        self.call(CacheCall::Identity, self.0.cache_store.identity())
            .await
    }
}

impl GuardedDb<'_> {
    async fn call<T>(self, call: DbCall, f: impl Future<Output = Result<T>>) -> Result<T> {
        self.call_within(call, self.0.cfg.db_timeout, f).await
    }

    /// [`GuardedDb::call`] with its own timeout, for reads that rank or
    /// count a whole table.
    async fn call_within<T>(
        self,
        call: DbCall,
        limit: Duration,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let inner = self.0;
        let started = Instant::now();
        let r = match tokio::time::timeout(limit, f).await {
            Ok(r) => r,
            Err(_) => Err(
                Error::new(ErrorKind::Timeout, format!("no answer within {limit:?}")).in_doubt(),
            ),
        };
        inner.metrics.db_call(call, started.elapsed(), r.is_ok());
        r.map_err(|e| {
            Counters::add(&inner.stats.db_errors, 1);
            e.with_operation(call.name())
                .with_backend(inner.db_store.name())
        })
    }

    pub(crate) async fn ensure_table(self, table: &Table) -> Result<()> {
        self.call(DbCall::EnsureTable, self.0.db_store.ensure_table(table))
            .await
    }

    pub(crate) async fn begin(self, opts: TxOptions) -> Result<Box<dyn Transaction>> {
        self.call(DbCall::Begin, self.0.db_store.begin(opts)).await
    }

    pub(crate) async fn execute(
        self,
        writes: Vec<Write>,
        opts: TxOptions,
    ) -> Result<Vec<WriteOutcome>> {
        self.call(DbCall::Execute, self.0.db_store.execute(writes, opts))
            .await
    }

    pub(crate) async fn insert(
        self,
        writes: Vec<Write>,
        opts: TxOptions,
    ) -> Result<Vec<WriteOutcome>> {
        self.call(DbCall::Execute, self.0.db_store.insert(writes, opts))
            .await
    }

    pub(crate) async fn get(self, table: &Table, key: &Key) -> Result<Option<VersionedRow>> {
        self.call(DbCall::Get, self.0.db_store.get(table, key))
            .await
    }

    pub(crate) async fn get_many(
        self,
        table: &Table,
        keys: &[Key],
    ) -> Result<Vec<Option<VersionedRow>>> {
        self.call(DbCall::GetMany, self.0.db_store.get_many(table, keys))
            .await
    }

    pub(crate) async fn scan(
        self,
        table: &Table,
        after: Option<Key>,
        limit: usize,
    ) -> Result<Vec<VersionedRow>> {
        self.call(DbCall::Scan, self.0.db_store.scan(table, after, limit))
            .await
    }

    pub(crate) async fn sample(
        self,
        table: &Table,
        n: usize,
        seed: u64,
    ) -> Result<Vec<VersionedRow>> {
        self.call_within(
            DbCall::Sample,
            self.whole_table_timeout(),
            self.0.db_store.sample(table, n, seed),
        )
        .await
    }

    pub(crate) async fn count(self, table: &Table) -> Result<u64> {
        self.call_within(
            DbCall::Count,
            self.whole_table_timeout(),
            self.0.db_store.count(table),
        )
        .await
    }

    /// A read that visits every row waits up to a minute, or the database
    /// timeout if longer.
    fn whole_table_timeout(self) -> Duration {
        self.0.cfg.db_timeout.max(Duration::from_secs(60))
    }

    pub(crate) async fn outbox_pending(
        &self,
        tables: Option<&[String]>,
        min_age: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>> {
        self.call(
            DbCall::OutboxPending,
            self.0.db_store.outbox_pending(tables, min_age, limit),
        )
        .await
    }

    pub(crate) async fn track_external(self, table: &Table) -> Result<u64> {
        self.call(DbCall::TrackExternal, self.0.db_store.track_external(table))
            .await
    }

    pub(crate) async fn external_changes(
        self,
        tables: &[String],
        range: ChangeRange<'_>,
        limit: usize,
    ) -> Result<ChangePage> {
        self.call(
            DbCall::ExternalChanges,
            self.0.db_store.external_changes(tables, range, limit),
        )
        .await
    }

    pub(crate) async fn outbox_remove(self, ids: Vec<i64>) -> Result<()> {
        self.call(DbCall::OutboxRemove, self.0.db_store.outbox_remove(ids))
            .await
    }

    /// A write inside an open transaction.
    pub(crate) async fn apply(
        self,
        tx: &mut Box<dyn Transaction>,
        write: &Write,
    ) -> Result<WriteOutcome> {
        self.call(DbCall::Apply, tx.apply(write)).await
    }

    /// A read inside an open transaction; `for_update` takes the key's lock first.
    pub(crate) async fn tx_get(
        &self,
        tx: &mut Box<dyn Transaction>,
        table: &Table,
        key: &Key,
        for_update: bool,
    ) -> Result<Option<VersionedRow>> {
        if for_update {
            self.call(DbCall::Get, tx.get_for_update(table, key)).await
        } else {
            self.call(DbCall::Get, tx.get(table, key)).await
        }
    }

    pub(crate) async fn commit(self, tx: Box<dyn Transaction>) -> Result<()> {
        self.call(DbCall::Commit, tx.commit()).await
    }

    pub(crate) async fn rollback(self, tx: Box<dyn Transaction>) -> Result<()> {
        self.call(DbCall::Rollback, tx.rollback()).await
    }
}
