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
use super::read::Missed;
use super::stats::Counters;
use super::table::{TableState, Validator, WriteOptions};
use super::{Inner, Issue, LoadResult, Lookup};
use crate::db::{Write, WriteOp, WriteOutcome};
use crate::entity::{Entity, Record};
use crate::error::{Error, ErrorKind, Result};
use crate::mapping::KeyArg;
use crate::schema::Table;
use crate::value::{Key, Patch, Row, VersionedRow};

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
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// assert_eq!(products.table().name().as_str(), "products");
    /// # Ok(()) }
    /// ```
    pub fn table(&self) -> &Table {
        &self.st.table
    }

    /// The cache key of `key`, as the cache backend sees it.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let ck = products.cache_key(1)?; // "<namespace>:products:1"
    /// println!("{ck}");
    /// # Ok(()) }
    /// ```
    pub fn cache_key(&self, key: impl KeyArg<R::Key>) -> Result<String> {
        self.inner.key_for(&self.st, &key.into_key()?)
    }

    /// Writes `record`: upsert in the database, commit, then the cache.
    /// Returns the version the database gave the row.
    ///
    /// Bad input (a key the cache cannot hold, a value of the wrong type, a
    /// non-finite float, a value over the cache's item limit, a failed
    /// validation) fails before anything is written.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let version = products.put(&product(1, 1.5)).await?;
    /// assert!(version > 0);
    /// # Ok(()) }
    /// ```
    pub async fn put(&self, record: &R) -> Result<u64> {
        self.put_with(record, WriteOptions::default()).await
    }

    /// [`Handle::put`] with per-call options (TTL, skip the cache).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// use std::time::Duration;
    /// use writethrough_core::WriteOptions;
    /// products
    ///     .put_with(&product(1, 1.5), WriteOptions::new().ttl(Duration::from_secs(60)))
    ///     .await?;
    /// # Ok(()) }
    /// ```
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
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let versions = products.put_many(&[product(1, 1.5), product(2, 3.0)]).await?;
    /// assert_eq!(versions.len(), 2);
    /// # Ok(()) }
    /// ```
    pub async fn put_many(&self, records: &[R]) -> Result<Vec<u64>> {
        self.put_many_with(records, WriteOptions::default()).await
    }

    /// [`Handle::put_many`] with options applied to every record.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// use writethrough_core::WriteOptions;
    /// products
    ///     .put_many_with(&[product(1, 1.5)], WriteOptions::new().skip_cache())
    ///     .await?;
    /// # Ok(()) }
    /// ```
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
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// if let Some(p) = products.get(1).await? {
    ///     println!("{} costs {}", p.name, p.price);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get(&self, key: impl KeyArg<R::Key>) -> Result<Option<R>> {
        Ok(self.read_as("get", key).await?.value)
    }

    /// [`Handle::get`] into a shared value. On a cache that keeps entries in
    /// this process (Moka), a hit whose entry was read this way before is
    /// served without decoding it again: the decoded value lives beside the
    /// entry's bytes for as long as the entry does (a write stores a new
    /// entry, so it is never served after the row changed, and an entry
    /// from before the cache forgot is not served from it either). Other
    /// caches decode every time, as `get` does. The decoded values are not
    /// counted in the Moka adapter's byte capacity.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// if let Some(p) = products.get_arc(1).await? {
    ///     println!("{}", p.name); // an Arc<Product>, shared with the next hit
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get_arc(&self, key: impl KeyArg<R::Key>) -> Result<Option<Arc<R>>> {
        let key = key.into_key().map_err(|e| e.with_operation("get_arc"))?;
        let shown = key.clone();
        let (value, _) = self
            .observed(OpKind::Get, self.inner.read_shared(&self.st, key))
            .await
            .map_err(|e| e.with_operation("get_arc").with_key(shown))?;
        Ok(value)
    }

    /// [`Handle::get`] that also says where the row came from: for tests
    /// and logs, without diffing the engine's global stats.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let r = products.read(1).await?;
    /// println!("hit: {}, row: {:?}", r.hit, r.value);
    /// # Ok(()) }
    /// ```
    pub async fn read(&self, key: impl KeyArg<R::Key>) -> Result<Read<R>> {
        self.read_as("read", key).await
    }

    /// `get` and `read`, named `operation` in errors.
    async fn read_as(&self, operation: &'static str, key: impl KeyArg<R::Key>) -> Result<Read<R>> {
        let key = key.into_key().map_err(|e| e.with_operation(operation))?;
        let shown = key.clone();
        let (value, hit) = self
            .observed(OpKind::Get, self.inner.read(&self.st, key))
            .await
            .map_err(|e| e.with_operation(operation).with_key(shown))?;
        Ok(Read::new(value, hit))
    }

    /// Reads many keys: one cache round trip for all of them, then one
    /// database query for the misses, whose rows fill the cache in one
    /// fenced batch. One answer per key, in the order given.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let found = products.get_many([1, 2, 3]).await?;
    /// assert_eq!(found.len(), 3); // None where no row
    /// # Ok(()) }
    /// ```
    pub async fn get_many<K: KeyArg<R::Key>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Option<R>>> {
        Ok(self
            .read_many(keys)
            .await?
            .into_iter()
            .map(|r| r.value)
            .collect())
    }

    /// [`Handle::get_many`] that says of each answer where it came from.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let hits = products.read_many([1, 2]).await?.iter().filter(|r| r.hit).count();
    /// println!("{hits} of 2 from the cache");
    /// # Ok(()) }
    /// ```
    pub async fn read_many<K: KeyArg<R::Key>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Read<R>>> {
        let keys = keys
            .into_iter()
            .map(KeyArg::into_key)
            .collect::<Result<Vec<Key>>>()
            .map_err(|e| e.with_operation("get_many"))?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let found = self
            .observed(OpKind::GetMany, self.inner.read_many(&self.st, keys))
            .await
            .map_err(|e| e.with_operation("get_many"))?;
        Ok(found
            .into_iter()
            .map(|(v, hit)| Read::new(v, hit))
            .collect())
    }

    /// Reads `key` from the cache, else from `loader` instead of the database.
    ///
    /// What the loader returns is cached (not written to the database) at
    /// version 0, below every database version: it never replaces an entry
    /// a write or a database load put there, and any later write replaces it.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let p = products
    ///     .get_or_load(7, |_key| async { Ok(Some(product(7, 9.0))) })
    ///     .await?;
    /// assert_eq!(p.map(|p| p.id), Some(7));
    /// # Ok(()) }
    /// ```
    pub async fn get_or_load<F, Fut>(
        &self,
        key: impl KeyArg<R::Key>,
        loader: F,
    ) -> Result<Option<R>>
    where
        F: Fn(Key) -> Fut,
        Fut: Future<Output = Result<Option<R>>> + Send + 'static,
    {
        let key = key
            .into_key()
            .map_err(|e| e.with_operation("get_or_load"))?;
        let ck = self
            .inner
            .key_for(&self.st, &key)
            .map_err(|e| e.with_operation("get_or_load"))?;
        let arrival = self.inner.flights.arrive();
        if let Lookup::Hit(hit) = self.inner.lookup::<R>(&self.st, &ck, true).await {
            return Ok(Some(hit));
        }
        let make = || self.loader_load(&loader, &key, &ck);
        match self
            .inner
            .load_or_join::<R, _>(&self.st, &ck, arrival, make)
            .await
            .map_err(|e| e.with_operation("get_or_load").with_key(&ck))?
        {
            Missed::Hit(hit) => Ok(Some(hit)),
            Missed::Loaded(loaded) => loaded
                .map(|vr| R::from_row(&self.st.table, vr.row))
                .transpose(),
        }
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
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// use writethrough_core::Patch;
    /// let new = products.update(1, Patch::new().set("price", 1.25)).await?;
    /// assert_eq!(new.map(|p| p.price), Some(1.25));
    /// # Ok(()) }
    /// ```
    pub async fn update(&self, key: impl KeyArg<R::Key>, patch: Patch) -> Result<Option<R>> {
        self.observed(OpKind::Update, async {
            let op = |e: Error| e.with_operation("update");
            let key = key.into_key().map_err(op)?;
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
        let mut tx = inner.db().begin(opts).await?;
        let o = inner.db().apply(&mut tx, &write).await?;
        if let Some(row) = &o.row {
            let r = R::from_row(&self.st.table, row.clone())?;
            if let Err(m) = validate(&r) {
                inner.db().rollback(tx).await?;
                return Err(Error::new(ErrorKind::Validation, m));
            }
        }
        inner.db().commit(tx).await?;
        Ok(o)
    }

    /// Deletes the row at `key` and leaves a tombstone in the cache that a
    /// read which loaded the old row cannot overwrite. Returns whether a row
    /// was deleted.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let existed = products.delete(1).await?;
    /// assert!(products.get(1).await?.is_none());
    /// println!("deleted: {existed}");
    /// # Ok(()) }
    /// ```
    pub async fn delete(&self, key: impl KeyArg<R::Key>) -> Result<bool> {
        self.observed(OpKind::Delete, async {
            let op = |e: Error| e.with_operation("delete");
            let key = key.into_key().map_err(op)?;
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

    /// Creates `record`, which must not exist yet: a row with its key
    /// already there fails with [`ErrorKind::Conflict`] and nothing is
    /// written. Returns the new row's version. Checked like
    /// [`Handle::put`] before anything is written.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// use writethrough_core::ErrorKind;
    /// products.insert(&product(5, 2.0)).await?;
    /// let again = products.insert(&product(5, 2.5)).await;
    /// assert_eq!(again.unwrap_err().kind(), ErrorKind::Conflict);
    /// # Ok(()) }
    /// ```
    pub async fn insert(&self, record: &R) -> Result<u64> {
        self.observed(OpKind::Insert, async {
            let p = self
                .inner
                .prepare(
                    &self.st,
                    self.validate.as_ref(),
                    record,
                    &WriteOptions::default(),
                )
                .map_err(|e| e.with_operation("insert"))?;
            let key = p.cache_key.clone();
            let out = self
                .inner
                .commit_insert(&self.st, p)
                .await
                .map_err(|e| e.with_operation("insert").with_key(&key))?;
            Ok(out.version)
        })
        .await
    }

    /// Deletes many keys in one database transaction, then leaves their
    /// tombstones in one cache round trip. Returns, per key in the order
    /// given, whether a row was deleted. All keys are checked first; a key
    /// may appear only once.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let existed = products.delete_many([1, 2]).await?;
    /// println!("{existed:?}"); // e.g. [true, false]
    /// # Ok(()) }
    /// ```
    pub async fn delete_many<K: KeyArg<R::Key>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<bool>> {
        self.observed(OpKind::DeleteMany, async {
            let op = |e: Error| e.with_operation("delete_many");
            let mut seen = HashSet::new();
            let mut keyed = Vec::new();
            for k in keys {
                let key = k.into_key().map_err(op)?;
                let ck = self.inner.key_for(&self.st, &key).map_err(op)?;
                if !seen.insert(ck.clone()) {
                    return Err(op(Error::new(
                        ErrorKind::InvalidKey,
                        "the batch deletes this key twice",
                    )
                    .with_key(&ck)));
                }
                keyed.push((key, ck));
            }
            if keyed.is_empty() {
                return Ok(Vec::new());
            }
            let writes = keyed
                .iter()
                .map(|(k, _)| Write {
                    table: self.st.table.clone(),
                    op: WriteOp::Delete(k.clone()),
                })
                .collect();
            let opts = self.inner.tx_options();
            let commit = self.inner.db().execute(writes, opts);
            let out = self
                .inner
                .commit_many(&self.st, keyed, commit)
                .await
                .map_err(op)?;
            Ok(out.into_iter().map(|o| o.existed).collect())
        })
        .await
    }

    /// Makes the next read of `key` load it from the database, fenced: the
    /// cached row is replaced, only if unchanged, by an invalidation at its
    /// version, which no older row can overwrite. For a row you know the
    /// cache should not serve (changed outside the engine, say); writes
    /// through the engine never need it. Returns whether an entry was
    /// invalidated (`false`: nothing readable was cached).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// // The row was changed outside the engine: make the next read load it.
    /// products.invalidate(1).await?;
    /// assert!(!products.read(1).await?.hit);
    /// # Ok(()) }
    /// ```
    pub async fn invalidate(&self, key: impl KeyArg<R::Key>) -> Result<bool> {
        self.observed(OpKind::Invalidate, async {
            let op = |e: Error| e.with_operation("invalidate");
            let key = key.into_key().map_err(op)?;
            let ck = self.inner.key_for(&self.st, &key).map_err(op)?;
            self.inner
                .invalidate(&ck)
                .await
                .map_err(|e| op(e).with_key(&ck))
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
        if kind.reads() {
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

impl<E: Entity> Handle<E> {
    /// An untyped view of the same table: reads and writes [`Row`]s and
    /// takes any [`Key`], checked at run time. For tooling that works on
    /// rows; the entity's validator still applies to every write.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// use writethrough_core::Row;
    /// let rows: writethrough_core::Handle<Row> = products.rows();
    /// let row = rows.get(1).await?; // a Row, not a Product
    /// println!("{row:?}");
    /// # Ok(()) }
    /// ```
    pub fn rows(&self) -> Handle<Row> {
        let validate = self.validate.clone().map(|v| {
            let table = self.st.table.clone();
            let rows: Validator<Row> =
                Arc::new(move |row: &Row| match E::from_row(&table, row.clone()) {
                    Ok(record) => v(&record),
                    Err(e) => Err(format!("the row does not fit the entity: {e}")),
                });
            rows
        });
        Handle {
            inner: self.inner.clone(),
            st: self.st.clone(),
            validate,
            _record: PhantomData,
        }
    }
}

/// A read's answer and where it came from.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Read<R> {
    /// The row, or `None` if the database has none.
    pub value: Option<R>,
    /// Whether the cache answered (`false`: the database did).
    pub hit: bool,
}

impl<R> Read<R> {
    fn new(value: Option<R>, hit: bool) -> Self {
        Read { value, hit }
    }

    /// The row, dropping where it came from.
    pub fn into_value(self) -> Option<R> {
        self.value
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
impl Observed for Vec<bool> {}
impl<R> Observed for Option<R> {}
impl<R> Observed for Vec<(Option<R>, bool)> {}
impl<R> Observed for (Option<R>, bool) {
    fn hit(&self) -> Option<bool> {
        Some(self.1)
    }
}

impl Inner {
    pub(crate) async fn execute_one(&self, write: Write) -> Result<WriteOutcome> {
        let opts = self.tx_options();
        let mut out = self.db().execute(vec![write], opts).await?;
        out.pop()
            .ok_or_else(|| Error::new(ErrorKind::Backend, "the database returned no outcome"))
    }
}
