//! Typed handles to registered tables: where applications call the engine.

use std::collections::HashSet;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use futures::future::BoxFuture;
use tracing::Instrument;

use super::metrics::{OpKind, OpOutcome};
use super::stats::Counters;
use super::table::{TableState, Validator, WriteOptions};
use super::{DbCall, Inner, Issue, Joined, LoadResult, Lookup, MAX_LATE_JOINS};
use crate::db::{Write, WriteOp, WriteOutcome};
use crate::entity::Record;
use crate::error::{Error, ErrorKind, Result};
use crate::schema::Table;
use crate::value::{Key, Patch, VersionedRow};

/// A registered table, read and written as `R` (an [`crate::Entity`] or a
/// plain [`crate::Row`]). Cheap to clone.
pub struct Handle<R> {
    pub(crate) inner: Arc<Inner>,
    pub(crate) st: Arc<TableState>,
    pub(crate) validate: Option<Validator<R>>,
    _record: PhantomData<fn() -> R>,
}

impl<R> Clone for Handle<R> {
    fn clone(&self) -> Self {
        Handle {
            inner: self.inner.clone(),
            st: self.st.clone(),
            validate: self.validate.clone(),
            _record: PhantomData,
        }
    }
}

impl<R> std::fmt::Debug for Handle<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("table", &self.st.table.name())
            .finish()
    }
}

impl<R: Record> Handle<R> {
    pub(crate) fn new(
        inner: Arc<Inner>,
        st: Arc<TableState>,
        validate: Option<Validator<R>>,
    ) -> Self {
        Handle {
            inner,
            st,
            validate,
            _record: PhantomData,
        }
    }

    /// The table's schema.
    pub fn table(&self) -> &Table {
        &self.st.table
    }

    /// The cache key of `key`, as the cache backend sees it.
    pub fn cache_key(&self, key: impl Into<Key>) -> Result<String> {
        self.inner.key_for(&self.st, &key.into())
    }

    /// Writes `record`: upsert in the database, commit, then the cache.
    /// Returns the version the database gave the row.
    ///
    /// Bad input (a key the cache cannot hold, a value of the wrong type, a
    /// non-finite float, a value over the cache's item limit, a failed
    /// validation) fails before anything is written.
    pub async fn put(&self, record: &R) -> Result<u64> {
        self.put_with(record, WriteOptions::default()).await
    }

    /// [`Handle::put`] with per-call options (TTL, skip the cache).
    pub async fn put_with(&self, record: &R, opts: WriteOptions) -> Result<u64> {
        self.observed(OpKind::Put, async {
            let p = self
                .inner
                .prepare(&self.st, self.validate.as_ref(), record, &opts)
                .map_err(|e| e.with_operation("put"))?;
            let key = p.cache_key.clone();
            let out = self
                .inner
                .commit_upserts(&self.st, vec![p])
                .await
                .map_err(|e| e.with_operation("put").with_key(&key))?;
            Ok(out[0].version)
        })
        .await
    }

    /// Writes many records: one database transaction, then one pipelined
    /// cache round trip. All are checked before anything is written; a key
    /// may appear only once.
    pub async fn put_many(&self, records: &[R]) -> Result<Vec<u64>> {
        self.put_many_with(records, WriteOptions::default()).await
    }

    /// [`Handle::put_many`] with options applied to every record.
    pub async fn put_many_with(&self, records: &[R], opts: WriteOptions) -> Result<Vec<u64>> {
        self.observed(OpKind::PutMany, async {
            if records.is_empty() {
                return Ok(Vec::new());
            }
            let mut seen = HashSet::with_capacity(records.len());
            let mut prepared = Vec::with_capacity(records.len());
            for r in records {
                let p = self
                    .inner
                    .prepare(&self.st, self.validate.as_ref(), r, &opts)
                    .map_err(|e| e.with_operation("put_many"))?;
                if !seen.insert(p.cache_key.clone()) {
                    return Err(Error::new(
                        ErrorKind::InvalidKey,
                        "the batch writes this key twice",
                    )
                    .with_operation("put_many")
                    .with_key(&p.cache_key));
                }
                prepared.push(p);
            }
            let out = self
                .inner
                .commit_upserts(&self.st, prepared)
                .await
                .map_err(|e| e.with_operation("put_many"))?;
            Ok(out.into_iter().map(|o| o.version).collect())
        })
        .await
    }

    /// Reads `key`: from the cache, else from the database (one load shared
    /// by every concurrent miss on the key), which then fills the cache.
    pub async fn get(&self, key: impl Into<Key>) -> Result<Option<R>> {
        let key = key.into();
        let shown = key.clone();
        let (found, _) = self
            .observed(OpKind::Get, self.inner.read(&self.st, key))
            .await
            .map_err(|e| e.with_operation("get").with_key(shown))?;
        Ok(found)
    }

    /// Reads `key` from the cache, else from `loader` instead of the database.
    ///
    /// What the loader returns is cached (not written to the database) at
    /// version 0, below every database version: it never replaces an entry
    /// a write or a database load put there, and any later write replaces it.
    pub async fn get_or_load<F, Fut>(&self, key: impl Into<Key>, loader: F) -> Result<Option<R>>
    where
        F: Fn(Key) -> Fut,
        Fut: Future<Output = Result<Option<R>>> + Send + 'static,
    {
        let key = key.into();
        let ck = self
            .inner
            .key_for(&self.st, &key)
            .map_err(|e| e.with_operation("get_or_load"))?;
        let mut arrival = self.inner.flights.arrive();
        if let Lookup::Hit(hit) = self.inner.lookup::<R>(&self.st, &ck, true).await {
            return Ok(Some(hit));
        }
        // As in `Inner::read`: a load that queried before we arrived may
        // predate a write we must see; then the cache, refilled, answers.
        for attempt in 0..=MAX_LATE_JOINS {
            let make = || self.loader_load(&loader, &key, &ck);
            let joined = if attempt == MAX_LATE_JOINS {
                Joined::Fresh(make()(Issue::unshared()).await)
            } else {
                self.inner.load(&ck, arrival, make).await
            };
            match joined {
                Joined::Fresh(loaded) => {
                    let loaded =
                        loaded.map_err(|e| e.with_operation("get_or_load").with_key(&ck))?;
                    return loaded
                        .map(|vr| R::from_row(&self.st.table, vr.row))
                        .transpose();
                }
                Joined::Late => {
                    if let Lookup::Hit(hit) = self.inner.lookup::<R>(&self.st, &ck, false).await {
                        return Ok(Some(hit));
                    }
                    arrival = self.inner.flights.arrive();
                }
            }
        }
        unreachable!("the last attempt loads alone")
    }

    /// The load of one row through a caller's loader, for `Inner::load`.
    fn loader_load<F, Fut>(
        &self,
        loader: &F,
        key: &Key,
        ck: &str,
    ) -> impl FnOnce(Issue) -> BoxFuture<'static, LoadResult> + use<F, Fut, R>
    where
        F: Fn(Key) -> Fut,
        Fut: Future<Output = Result<Option<R>>> + Send + 'static,
    {
        let fut = loader(key.clone());
        let (inner, st, ck, key) = (
            self.inner.clone(),
            self.st.clone(),
            ck.to_owned(),
            key.clone(),
        );
        move |issue| {
            async move {
                let (started, epoch) = (Instant::now(), inner.epochs.current());
                Counters::add(&inner.stats.loads, 1);
                issue.now();
                let Some(record) = fut.await? else {
                    return Ok(None);
                };
                let (got, row) = st.table.normalize_row(record.to_row()?)?;
                if got != key {
                    return Err(Error::new(
                        ErrorKind::InvalidValue,
                        format!("the loader for key {key} returned the row of key {got}"),
                    ));
                }
                let vr = VersionedRow { row, version: 0 };
                inner.populate(&st, &ck, &vr, started, epoch).await;
                Ok(Some(vr))
            }
            .boxed()
        }
    }

    /// Sets some columns of the row at `key` and returns the whole new row,
    /// which is also cached; `None` (and the cache entry invalidated) if
    /// there is no such row.
    ///
    /// With a validator, the new row is validated inside the transaction,
    /// which is rolled back if it fails.
    pub async fn update(&self, key: impl Into<Key>, patch: Patch) -> Result<Option<R>> {
        self.observed(OpKind::Update, async {
            let key = key.into();
            let op = |e: Error| e.with_operation("update");
            let ck = self.inner.key_for(&self.st, &key).map_err(op)?;
            let patch = self.st.table.normalize_patch(patch).map_err(op)?;
            self.inner
                .check_db_values(patch.columns().iter().map(|(_, v)| v))
                .map_err(op)?;
            let write = Write {
                table: self.st.table.clone(),
                op: WriteOp::Update(key.clone(), patch),
            };
            let commit = async {
                match &self.validate {
                    None => self.inner.execute_one(write).await,
                    Some(v) => self.update_validated(write, v).await,
                }
            };
            let outcome = self
                .inner
                .commit_one(&self.st, key, ck, commit)
                .await
                .map_err(op)?;
            outcome
                .row
                .map(|row| R::from_row(&self.st.table, row))
                .transpose()
        })
        .await
    }

    async fn update_validated(
        &self,
        write: Write,
        validate: &Validator<R>,
    ) -> Result<WriteOutcome> {
        let inner = &self.inner;
        let opts = inner.tx_options();
        let mut tx = inner
            .db_call(DbCall::Begin, (*inner.db).begin(opts))
            .await?;
        let o = inner.db_call(DbCall::Apply, tx.apply(&write)).await?;
        if let Some(row) = &o.row {
            let r = R::from_row(&self.st.table, row.clone())?;
            if let Err(m) = validate(&r) {
                inner.db_call(DbCall::Rollback, tx.rollback()).await?;
                return Err(Error::new(ErrorKind::Validation, m));
            }
        }
        inner.db_call(DbCall::Commit, tx.commit()).await?;
        Ok(o)
    }

    /// Deletes the row at `key` and leaves a tombstone in the cache that a
    /// read which loaded the old row cannot overwrite. Returns whether a row
    /// was deleted.
    pub async fn delete(&self, key: impl Into<Key>) -> Result<bool> {
        self.observed(OpKind::Delete, async {
            let key = key.into();
            let op = |e: Error| e.with_operation("delete");
            let ck = self.inner.key_for(&self.st, &key).map_err(op)?;
            let write = Write {
                table: self.st.table.clone(),
                op: WriteOp::Delete(key.clone()),
            };
            let commit = self.inner.execute_one(write);
            let outcome = self
                .inner
                .commit_one(&self.st, key, ck, commit)
                .await
                .map_err(op)?;
            Ok(outcome.existed)
        })
        .await
    }

    /// Runs one operation inside a tracing span and records its metrics.
    async fn observed<T: Observed>(
        &self,
        kind: OpKind,
        op: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let span =
            tracing::debug_span!("writethrough", op = kind.name(), table = %self.st.table.name());
        let started = Instant::now();
        let r = op.instrument(span).await;
        let took = started.elapsed();
        let m = &self.inner.metrics;
        if kind == OpKind::Get {
            m.reads.record(took)
        } else {
            m.writes.record(took)
        }
        let outcome = match &r {
            Ok(_) => OpOutcome::Ok,
            Err(e) if e.kind().is_input() => OpOutcome::Rejected,
            Err(_) => OpOutcome::Error,
        };
        self.st
            .metrics
            .op(kind, took, outcome, r.as_ref().ok().and_then(Observed::hit));
        r
    }
}

/// What an operation's result says about where it was served from.
trait Observed {
    fn hit(&self) -> Option<bool> {
        None
    }
}
impl Observed for u64 {}
impl Observed for bool {}
impl Observed for Vec<u64> {}
impl<R> Observed for Option<R> {}
impl<R> Observed for (Option<R>, bool) {
    fn hit(&self) -> Option<bool> {
        Some(self.1)
    }
}

impl Inner {
    pub(crate) async fn execute_one(&self, write: Write) -> Result<WriteOutcome> {
        let opts = self.tx_options();
        let mut out = self
            .db_call(DbCall::Execute, (*self.db).execute(vec![write], opts))
            .await?;
        out.pop()
            .ok_or_else(|| Error::new(ErrorKind::Backend, "the database returned no outcome"))
    }
}
