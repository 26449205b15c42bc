//! Transaction scopes: several writes in one database transaction, whose
//! cache effects apply only once it has committed.
//!
//! The isolation a scope gets on each database, and why a value read to
//! be written back is read with `Tx::get_for_update`, are documented on `Tx`.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::handle::Handle;
use super::stats::Counters;
use super::table::WriteOptions;
use super::{Effect, Engine, Inner};
use crate::db::{Transaction, Write, WriteOp, WriteOutcome};
use crate::entity::Record;
use crate::error::{Error, ErrorKind, Result};
use crate::mapping::KeyArg;
use crate::value::{Key, Patch};

/// An open transaction scope, from [`crate::Engine::begin`] or
/// [`crate::Engine::transaction`].
///
/// Writes go to the database transaction at once (so reads through the
/// scope see them); their cache effects wait for [`Tx::commit`]. Dropping
/// the scope, or [`Tx::rollback`], rolls the transaction back and leaves the
/// cache untouched.
///
/// # Isolation, and read-modify-write
///
/// A scope gets the same promise on both databases: a row read with
/// [`Tx::get_for_update`] cannot be written by anyone else until the scope
/// ends, so reading a value, computing from it and writing it back never
/// loses a concurrent update. How each database keeps it:
///
/// * **PostgreSQL**: `READ COMMITTED` plus the engine's key locks. Every
///   write takes its key's lock (a transaction-scoped advisory lock on one of
///   1024 hash slots) and holds it until its transaction ends;
///   `get_for_update` takes the same lock, then reads, so it sees the last
///   committed write of the key and blocks the next one — for a missing row
///   too. A plain [`Tx::get`] takes no lock: another scope may commit a write
///   of the key right after it, and a value computed from it and written
///   back overwrites that write (a lost update).
/// * **SQLite**: serial. A scope holds the database's only write lock from
///   [`crate::Engine::begin`] (`BEGIN IMMEDIATE`) to its end, so nothing
///   else writes meanwhile and every read in it, locking or not, stays
///   current. A plain write (or a second scope) from the task that holds an
///   open scope could only wait for that scope, forever: it fails at once
///   with [`ErrorKind::WouldDeadlock`].
///
/// Locks can deadlock (two scopes locking two keys in opposite orders; on
/// PostgreSQL, two keys that share a slot), and the database then aborts one
/// scope. [`crate::Engine::transaction`] runs a closure in a scope and runs
/// it again on serialization failures, deadlocks and a busy database, with
/// backoff, within [`crate::Config::transaction_retry`].
///
/// # Failing loudly
///
/// Any error inside a scope — refused input, a validator, the database —
/// poisons it: every later operation, and [`Tx::commit`], fail with the
/// first error's kind and carry it as their source; `commit` then rolls
/// back and writes nothing.
///
/// ```no_run
/// # async fn demo(engine: writethrough_core::Engine,
/// #               accounts: writethrough_core::Handle<writethrough_core::Row>)
/// #               -> writethrough_core::Result<()> {
/// use writethrough_core::Patch;
/// let mut tx = engine.begin().await?;
/// tx.update(&accounts, 1, Patch::new().set("balance", 90)).await?;
/// tx.update(&accounts, 2, Patch::new().set("balance", 110)).await?;
/// tx.commit().await?; // both rows commit, then both cache entries update
/// # Ok(()) }
/// ```
pub struct Tx {
    inner: Arc<Inner>,
    tx: Option<Box<dyn Transaction>>,
    effects: Vec<Effect>,
    poisoned: Option<Error>,
    /// The cache epoch known when the scope began: its entries are prepared in it.
    epoch: u64,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("pending_effects", &self.effects.len())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Tx {
    pub(crate) fn new(inner: Arc<Inner>, tx: Box<dyn Transaction>) -> Self {
        Tx {
            epoch: inner.epochs.current(),
            inner,
            tx: Some(tx),
            effects: Vec::new(),
            poisoned: None,
        }
    }

    /// Fails if the scope is poisoned: with the first error's kind and
    /// status, carrying it as the source.
    fn check_open(&self, operation: &'static str) -> Result<()> {
        match &self.poisoned {
            None => Ok(()),
            Some(first) => Err(poisoned(
                first,
                "an earlier operation of this transaction scope failed; it can only roll back",
            )
            .with_operation(operation)),
        }
    }

    /// Poisons the scope with `e` unless it already is; hands `e` back.
    fn fail(&mut self, e: Error) -> Error {
        if self.poisoned.is_none() {
            self.poisoned = Some(e.clone());
        }
        e
    }

    /// Runs `f` on an open scope: refused if poisoned, and poisons it if `f` fails.
    fn checked<T>(&mut self, operation: &'static str, r: Result<T>) -> Result<T> {
        r.map_err(|e| self.fail(e.with_operation(operation)))
    }

    fn db(&mut self) -> &mut Box<dyn Transaction> {
        self.tx
            .as_mut()
            .expect("a scope has its transaction until commit or rollback consume it")
    }

    async fn apply(&mut self, operation: &'static str, write: Write) -> Result<WriteOutcome> {
        let inner = self.inner.clone();
        let r = inner.db().apply(self.db(), &write).await;
        self.checked(operation, r)
    }

    /// Upserts `record` in the transaction; returns its new version.
    pub async fn put<R: Record>(&mut self, table: &Handle<R>, record: &R) -> Result<u64> {
        self.put_with(table, record, WriteOptions::default()).await
    }

    /// Creates `record` in the transaction: takes its key's lock and reads
    /// it first, so that a row already there (or one another scope commits
    /// meanwhile) fails with [`ErrorKind::Conflict`], which poisons the
    /// scope like any failure in it. Returns the new row's version.
    pub async fn insert<R: Record>(&mut self, table: &Handle<R>, record: &R) -> Result<u64> {
        self.check_open("tx.insert")?;
        let key = record
            .to_row()
            .and_then(|row| table.st.table.normalize_row(row))
            .map(|(key, _)| key);
        let key = self.checked("tx.insert", key)?;
        let existing = self.read(table, Ok(key.clone()), true).await?;
        if existing.is_some() {
            let e = Error::new(
                ErrorKind::Conflict,
                format!("a row with key {key} already exists"),
            );
            return Err(self.fail(e.with_operation("tx.insert")));
        }
        self.put_with(table, record, WriteOptions::default()).await
    }

    /// [`Tx::put`] with per-call options.
    pub async fn put_with<R: Record>(
        &mut self,
        table: &Handle<R>,
        record: &R,
        opts: WriteOptions,
    ) -> Result<u64> {
        self.check_open("tx.put")?;
        let p = self
            .inner
            .prepare(&table.st, table.validate.as_ref(), record, &opts);
        let mut p = self.checked("tx.put", p)?;
        let write = Write {
            table: table.st.table.clone(),
            op: WriteOp::Upsert(std::mem::take(&mut p.row)),
        };
        let o = self.apply("tx.put", write).await?;
        let version = o.version;
        self.effects
            .push(Inner::effect_of_prepared(&table.st, p, &o, self.epoch));
        Ok(version)
    }

    /// Updates some columns in the transaction and returns the new row.
    /// A validator failure poisons the scope: it can then only roll back.
    pub async fn update<R: Record>(
        &mut self,
        table: &Handle<R>,
        key: impl KeyArg<R::Key>,
        patch: Patch,
    ) -> Result<Option<R>> {
        self.check_open("tx.update")?;
        let key = self.checked("tx.update", key.into_key())?;
        let checked = (|| {
            let ck = self.inner.key_for(&table.st, &key)?;
            let patch = table.st.table.normalize_patch(patch)?;
            self.inner
                .check_db_values(patch.columns().iter().map(|(_, v)| v))?;
            Ok((ck, patch))
        })();
        let (ck, patch) = self.checked("tx.update", checked)?;
        let o = self
            .apply(
                "tx.update",
                Write {
                    table: table.st.table.clone(),
                    op: WriteOp::Update(key.clone(), patch),
                },
            )
            .await?;
        let record = o
            .row
            .clone()
            .map(|row| R::from_row(&table.st.table, row))
            .transpose();
        let record = self.checked("tx.update", record)?;
        if let (Some(v), Some(r)) = (&table.validate, &record)
            && let Err(m) = v(r)
        {
            let e = Error::new(ErrorKind::Validation, m);
            return Err(self.fail(e.with_operation("tx.update")));
        }
        self.effects
            .push(self.inner.effect_of(&table.st, key, ck, &o, self.epoch));
        Ok(record)
    }

    /// Deletes in the transaction; returns whether a row was deleted.
    pub async fn delete<R: Record>(
        &mut self,
        table: &Handle<R>,
        key: impl KeyArg<R::Key>,
    ) -> Result<bool> {
        self.check_open("tx.delete")?;
        let key = self.checked("tx.delete", key.into_key())?;
        let ck = self.inner.key_for(&table.st, &key);
        let ck = self.checked("tx.delete", ck)?;
        let o = self
            .apply(
                "tx.delete",
                Write {
                    table: table.st.table.clone(),
                    op: WriteOp::Delete(key.clone()),
                },
            )
            .await?;
        self.effects
            .push(self.inner.effect_of(&table.st, key, ck, &o, self.epoch));
        Ok(o.existed)
    }

    /// Reads a row inside the transaction (seeing its own writes), from the
    /// database, without a lock: on PostgreSQL another scope may write the
    /// key right after. Read a value you will write back with
    /// [`Tx::get_for_update`].
    pub async fn get<R: Record>(
        &mut self,
        table: &Handle<R>,
        key: impl KeyArg<R::Key>,
    ) -> Result<Option<R>> {
        self.read(table, key.into_key(), false).await
    }

    /// Reads a row for update: takes the key's lock (the one writes take),
    /// then reads, so that no other scope or write commits a change of the
    /// key until this scope ends — also when the row does not exist yet.
    /// The read to use for read-modify-write.
    ///
    /// PostgreSQL: the key's advisory lock, held to the end of the scope,
    /// then a `SELECT` (which, under `READ COMMITTED`, sees every write
    /// committed before the lock was granted). SQLite: a plain read — the
    /// scope already holds the single write lock.
    ///
    /// ```no_run
    /// # async fn demo(engine: writethrough_core::Engine,
    /// #               accounts: writethrough_core::Handle<writethrough_core::Row>)
    /// #               -> writethrough_core::Result<()> {
    /// use writethrough_core::{Patch, Value};
    /// let mut tx = engine.begin().await?;
    /// let row = tx.get_for_update(&accounts, 1).await?;
    /// let balance = match row.as_ref().and_then(|r| r.get("balance")) {
    ///     Some(Value::Int(b)) => *b,
    ///     _ => 0,
    /// };
    /// tx.update(&accounts, 1, Patch::new().set("balance", balance + 10)).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_for_update<R: Record>(
        &mut self,
        table: &Handle<R>,
        key: impl KeyArg<R::Key>,
    ) -> Result<Option<R>> {
        self.read(table, key.into_key(), true).await
    }

    async fn read<R: Record>(
        &mut self,
        table: &Handle<R>,
        key: Result<Key>,
        for_update: bool,
    ) -> Result<Option<R>> {
        let op = if for_update {
            "tx.get_for_update"
        } else {
            "tx.get"
        };
        self.check_open(op)?;
        let key = self.checked(op, key)?;
        let checked = table.st.table.check_key(&key);
        self.checked(op, checked)?;
        let inner = self.inner.clone();
        let t = &table.st.table;
        let tx = self.db();
        let row = if for_update {
            inner.db().tx_get(tx, t, &key, true).await
        } else {
            inner.db().tx_get(tx, t, &key, false).await
        };
        let record = row.and_then(|row| row.map(|vr| R::from_row(t, vr.row)).transpose());
        self.checked(op, record)
    }

    /// Commits, then applies the cache effects of every write (the last
    /// write of each key wins). If any operation of the scope failed, rolls
    /// back instead, writes nothing, and fails with that first error's kind
    /// (the first error is the source).
    pub async fn commit(mut self) -> Result<()> {
        let tx = self
            .tx
            .take()
            .expect("a scope has its transaction until commit or rollback consume it");
        if let Some(first) = self.poisoned.take() {
            let _ = self.inner.db().rollback(tx).await;
            return Err(poisoned(
                &first,
                "the transaction scope was rolled back, nothing written: an operation in it failed",
            )
            .with_operation("tx.commit"));
        }
        let mut last: HashMap<String, Effect> = HashMap::with_capacity(self.effects.len());
        for e in self.effects.drain(..) {
            last.insert(e.cache_key.clone(), e);
        }
        let effects: Vec<Effect> = last.into_values().collect();
        let inner = self.inner.clone();
        let guard = inner.guard(
            effects
                .iter()
                .map(|e| (e.cache_key.clone(), e.table.clone(), e.key.clone()))
                .collect(),
        );
        if let Err(e) = inner.db().commit(tx).await {
            return Err(guard.failed(e).with_operation("tx.commit"));
        }
        Counters::add(&inner.stats.writes, effects.len() as u64);
        inner.apply_effects(effects, guard).await;
        Ok(())
    }

    /// Rolls back; the cache is not touched.
    pub async fn rollback(mut self) -> Result<()> {
        let tx = self
            .tx
            .take()
            .expect("a scope has its transaction until commit or rollback consume it");
        self.inner
            .db()
            .rollback(tx)
            .await
            .map_err(|e| e.with_operation("tx.rollback"))
    }
}

/// The error of an operation on a poisoned scope: the first error's kind
/// and status, the first error as its source.
fn poisoned(first: &Error, why: &str) -> Error {
    let mut e = Error::new(first.kind(), why.to_owned()).with_status(first.status());
    if let Some(k) = first.key() {
        e = e.with_key(k);
    }
    e.with_source(first.clone())
}

impl Engine {
    /// Runs `f` in a transaction scope: commits when it returns `Ok`, rolls
    /// back when it returns `Err` (and returns that error). A run that fails
    /// with a serialization failure, a deadlock or a busy database — from
    /// the closure, its scope, or the commit — is rolled back and `f` runs
    /// again in a new scope, after a backoff, up to
    /// [`crate::Config::transaction_retry`]`.attempts` runs in all; a
    /// commit whose outcome is unknown is never run again. `f` may run more
    /// than once, so it should do nothing outside the scope that it cannot
    /// repeat.
    ///
    /// Read what you write back with [`Tx::get_for_update`]; see the
    /// [`Tx`] module docs for the isolation each database gives.
    ///
    /// The closure gets the scope and returns a boxed `Send` future (a
    /// [`BoxFuture`]), so that the whole call can be `tokio::spawn`ed. An
    /// async closure (`AsyncFnMut(&mut Tx)`) would read better, but on
    /// stable Rust the future of a function taking one cannot be proven
    /// `Send` where it is spawned (rust-lang/rust#110338: "implementation of
    /// `Send` is not general enough"). The boxed future may outlive any
    /// borrow the closure holds, so move clones of the handles into it:
    /// handles are one `Arc`, cheap to clone.
    ///
    /// ```no_run
    /// # async fn demo(engine: writethrough_core::Engine,
    /// #               accounts: writethrough_core::Handle<writethrough_core::Row>)
    /// #               -> writethrough_core::Result<()> {
    /// use writethrough_core::{Patch, Row, Value};
    /// fn balance(r: Option<Row>) -> i64 {
    ///     match r.and_then(|r| r.get("balance").cloned()) {
    ///         Some(Value::Int(b)) => b,
    ///         _ => 0,
    ///     }
    /// }
    /// let moved = engine
    ///     .transaction(|tx| {
    ///         let accounts = accounts.clone();
    ///         Box::pin(async move {
    ///             let from = balance(tx.get_for_update(&accounts, 1).await?);
    ///             let to = balance(tx.get_for_update(&accounts, 2).await?);
    ///             tx.update(&accounts, 1, Patch::new().set("balance", from - 10)).await?;
    ///             tx.update(&accounts, 2, Patch::new().set("balance", to + 10)).await?;
    ///             Ok(10)
    ///         })
    ///     })
    ///     .await?;
    /// assert_eq!(moved, 10);
    /// # Ok(()) }
    /// ```
    pub async fn transaction<T, F>(&self, mut f: F) -> Result<T>
    where
        F: for<'t> FnMut(&'t mut Tx) -> BoxFuture<'t, Result<T>>,
    {
        let policy = self.inner.cfg.transaction_retry;
        let mut attempt = 1;
        loop {
            let r = async {
                let mut tx = self.begin().await?;
                match f(&mut tx).await {
                    Ok(v) => tx.commit().await.map(|()| v),
                    Err(e) => {
                        let _ = tx.rollback().await;
                        Err(e)
                    }
                }
            }
            .await;
            match r {
                Err(e)
                    if e.kind().is_retryable_transaction()
                        && !e.is_in_doubt()
                        && attempt < policy.attempts =>
                {
                    tracing::debug!(error = %e, attempt, "transaction failed; running it again");
                    Counters::add(&self.inner.stats.transaction_retries, 1);
                    tokio::time::sleep(policy.delay(attempt)).await;
                    attempt += 1;
                }
                r => return r.map_err(|e| e.with_operation("transaction")),
            }
        }
    }
}

/// A table seen through an open scope: the calls of its [`Handle`], inside
/// the scope's transaction (their cache effects wait for the commit, as
/// every write of a scope does). From [`Tx::on`].
///
/// ```no_run
/// # use writethrough_core::__doc::{Product, product};
/// # async fn demo(
/// #     engine: writethrough_core::Engine,
/// #     products: writethrough_core::Handle<Product>,
/// # ) -> writethrough_core::Result<()> {
/// let mut tx = engine.begin().await?;
/// let mut p = tx.on(&products);
/// let pen = p.get_for_update(1).await?;
/// p.put(&product(1, pen.map_or(1.0, |x| x.price) + 0.5)).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub struct TxTable<'a, R> {
    tx: &'a mut Tx,
    table: &'a Handle<R>,
}

impl Tx {
    /// `table` through this scope: the same calls as on the handle.
    pub fn on<'a, R: Record>(&'a mut self, table: &'a Handle<R>) -> TxTable<'a, R> {
        TxTable { tx: self, table }
    }
}

impl<R: Record> TxTable<'_, R> {
    /// [`Handle::put`] in the scope.
    pub async fn put(&mut self, record: &R) -> Result<u64> {
        self.tx.put(self.table, record).await
    }

    /// [`Handle::insert`] in the scope (see [`Tx::insert`]).
    pub async fn insert(&mut self, record: &R) -> Result<u64> {
        self.tx.insert(self.table, record).await
    }

    /// [`Handle::put_with`] in the scope.
    pub async fn put_with(&mut self, record: &R, opts: WriteOptions) -> Result<u64> {
        self.tx.put_with(self.table, record, opts).await
    }

    /// [`Handle::update`] in the scope.
    pub async fn update(&mut self, key: impl KeyArg<R::Key>, patch: Patch) -> Result<Option<R>> {
        self.tx.update(self.table, key, patch).await
    }

    /// [`Handle::delete`] in the scope.
    pub async fn delete(&mut self, key: impl KeyArg<R::Key>) -> Result<bool> {
        self.tx.delete(self.table, key).await
    }

    /// [`Tx::get`]: a plain read in the scope.
    pub async fn get(&mut self, key: impl KeyArg<R::Key>) -> Result<Option<R>> {
        self.tx.get(self.table, key).await
    }

    /// [`Tx::get_for_update`]: a locking read in the scope.
    pub async fn get_for_update(&mut self, key: impl KeyArg<R::Key>) -> Result<Option<R>> {
        self.tx.get_for_update(self.table, key).await
    }
}

/// The writes a table handle and a scope's view of it ([`Tx::on`]) share,
/// so that code can write a table either way: on its own, each write its
/// own transaction, or as part of a caller's scope.
///
/// ```no_run
/// # use writethrough_core::__doc::{Product, product};
/// # async fn demo(
/// #     engine: writethrough_core::Engine,
/// #     products: writethrough_core::Handle<Product>,
/// # ) -> writethrough_core::Result<()> {
/// use writethrough_core::{Patch, Result, TableWrites};
///
/// async fn reprice(w: &mut impl TableWrites<Product>, id: i64, price: f64) -> Result<()> {
///     w.update(id, Patch::new().set("price", price)).await?;
///     Ok(())
/// }
///
/// reprice(&mut products.clone(), 1, 2.0).await?; // its own transaction
/// let mut tx = engine.begin().await?;
/// reprice(&mut tx.on(&products), 1, 2.5).await?; // part of the scope
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[async_trait::async_trait]
pub trait TableWrites<R: Record>: Send {
    /// Upserts `record`; returns its version.
    async fn put(&mut self, record: &R) -> Result<u64>;
    /// Creates `record`; a row already there is `ErrorKind::Conflict`.
    async fn insert(&mut self, record: &R) -> Result<u64>;
    /// Sets some columns of the row at `key`; returns the new row.
    async fn update(&mut self, key: R::Key, patch: Patch) -> Result<Option<R>>;
    /// Deletes the row at `key`; returns whether there was one.
    async fn delete(&mut self, key: R::Key) -> Result<bool>;
    /// Reads the row at `key` (from a scope: a plain read in it).
    async fn get(&mut self, key: R::Key) -> Result<Option<R>>;
}

#[async_trait::async_trait]
impl<R: Record> TableWrites<R> for Handle<R> {
    async fn put(&mut self, record: &R) -> Result<u64> {
        Handle::put(self, record).await
    }
    async fn insert(&mut self, record: &R) -> Result<u64> {
        Handle::insert(self, record).await
    }
    async fn update(&mut self, key: R::Key, patch: Patch) -> Result<Option<R>> {
        Handle::update(self, key, patch).await
    }
    async fn delete(&mut self, key: R::Key) -> Result<bool> {
        Handle::delete(self, key).await
    }
    async fn get(&mut self, key: R::Key) -> Result<Option<R>> {
        Handle::get(self, key).await
    }
}

#[async_trait::async_trait]
impl<R: Record> TableWrites<R> for TxTable<'_, R> {
    async fn put(&mut self, record: &R) -> Result<u64> {
        TxTable::put(self, record).await
    }
    async fn insert(&mut self, record: &R) -> Result<u64> {
        TxTable::insert(self, record).await
    }
    async fn update(&mut self, key: R::Key, patch: Patch) -> Result<Option<R>> {
        TxTable::update(self, key, patch).await
    }
    async fn delete(&mut self, key: R::Key) -> Result<bool> {
        TxTable::delete(self, key).await
    }
    async fn get(&mut self, key: R::Key) -> Result<Option<R>> {
        TxTable::get(self, key).await
    }
}
