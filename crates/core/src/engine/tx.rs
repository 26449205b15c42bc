//! Transaction scopes: several writes in one database transaction, whose
//! cache effects apply only once it has committed.

use std::collections::HashMap;
use std::sync::Arc;

use super::handle::Handle;
use super::stats::Counters;
use super::table::WriteOptions;
use super::{DbCall, Effect, EffectKind, Inner};
use crate::db::{Transaction, Write, WriteOp, WriteOutcome};
use crate::entity::Record;
use crate::error::{Error, ErrorKind, Result};
use crate::value::{Key, Patch};

/// An open transaction scope, from [`crate::Engine::begin`].
///
/// Writes go to the database transaction at once (so reads through the
/// scope see them); their cache effects wait for [`Tx::commit`]. Dropping
/// the scope, or [`Tx::rollback`], rolls the transaction back and leaves the
/// cache untouched.
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

    async fn apply(&mut self, write: Write) -> Result<WriteOutcome> {
        if let Some(e) = &self.poisoned {
            return Err(Error::new(
                ErrorKind::Validation,
                format!("the transaction already failed: {e}"),
            ));
        }
        let tx = self.tx.as_mut().expect("an open scope has a transaction");
        let r = self.inner.db_call(DbCall::Apply, tx.apply(&write)).await;
        if let Err(e) = &r {
            self.poisoned = Some(e.clone());
        }
        r
    }

    /// Upserts `record` in the transaction; returns its new version.
    pub async fn put<R: Record>(&mut self, table: &Handle<R>, record: &R) -> Result<u64> {
        self.put_with(table, record, WriteOptions::default()).await
    }

    /// [`Tx::put`] with per-call options.
    pub async fn put_with<R: Record>(
        &mut self,
        table: &Handle<R>,
        record: &R,
        opts: WriteOptions,
    ) -> Result<u64> {
        let p = self
            .inner
            .prepare(&table.st, table.validate.as_ref(), record, &opts)
            .map_err(|e| e.with_operation("tx.put"))?;
        let o = self
            .apply(Write {
                table: table.st.table.clone(),
                op: WriteOp::Upsert(p.row),
            })
            .await?;
        self.effects.push(Effect {
            cache_key: p.cache_key,
            key: p.key,
            table: table.st.clone(),
            version: o.version,
            epoch: self.epoch,
            kind: match p.payload {
                Some(payload) => {
                    EffectKind::Put(payload.into_entry_at(o.version, self.epoch), p.ttl)
                }
                None => EffectKind::Invalidate,
            },
            outbox_id: o.outbox_id,
        });
        Ok(o.version)
    }

    /// Updates some columns in the transaction and returns the new row.
    /// A validator failure poisons the scope: it can then only roll back.
    pub async fn update<R: Record>(
        &mut self,
        table: &Handle<R>,
        key: impl Into<Key>,
        patch: Patch,
    ) -> Result<Option<R>> {
        let key = key.into();
        let op = |e: Error| e.with_operation("tx.update");
        let ck = self.inner.key_for(&table.st, &key).map_err(op)?;
        let patch = table.st.table.normalize_patch(patch).map_err(op)?;
        self.inner
            .check_db_values(patch.columns().iter().map(|(_, v)| v))
            .map_err(op)?;
        let o = self
            .apply(Write {
                table: table.st.table.clone(),
                op: WriteOp::Update(key.clone(), patch),
            })
            .await?;
        let record = o
            .row
            .clone()
            .map(|row| R::from_row(&table.st.table, row))
            .transpose()?;
        if let (Some(v), Some(r)) = (&table.validate, &record)
            && let Err(m) = v(r)
        {
            let e = Error::new(ErrorKind::Validation, m).with_operation("tx.update");
            self.poisoned = Some(e.clone());
            return Err(e);
        }
        self.effects
            .push(self.inner.effect_of(&table.st, key, ck, &o, self.epoch));
        Ok(record)
    }

    /// Deletes in the transaction; returns whether a row was deleted.
    pub async fn delete<R: Record>(
        &mut self,
        table: &Handle<R>,
        key: impl Into<Key>,
    ) -> Result<bool> {
        let key = key.into();
        let ck = self
            .inner
            .key_for(&table.st, &key)
            .map_err(|e| e.with_operation("tx.delete"))?;
        let o = self
            .apply(Write {
                table: table.st.table.clone(),
                op: WriteOp::Delete(key.clone()),
            })
            .await?;
        self.effects
            .push(self.inner.effect_of(&table.st, key, ck, &o, self.epoch));
        Ok(o.existed)
    }

    /// Reads a row inside the transaction (seeing its own writes), from the database.
    pub async fn get<R: Record>(
        &mut self,
        table: &Handle<R>,
        key: impl Into<Key>,
    ) -> Result<Option<R>> {
        let key = key.into();
        table.st.table.check_key(&key)?;
        let tx = self.tx.as_mut().expect("an open scope has a transaction");
        let row = self
            .inner
            .db_call(DbCall::Get, tx.get(&table.st.table, &key))
            .await?;
        row.map(|vr| R::from_row(&table.st.table, vr.row))
            .transpose()
    }

    /// Commits, then applies the cache effects of every write (the last
    /// write of each key wins). Fails without committing if a write of the
    /// scope failed.
    pub async fn commit(mut self) -> Result<()> {
        let tx = self.tx.take().expect("an open scope has a transaction");
        if let Some(e) = self.poisoned.take() {
            let _ = self.inner.db_call(DbCall::Rollback, tx.rollback()).await;
            return Err(Error::new(
                ErrorKind::Validation,
                format!("the transaction was rolled back because a write failed: {e}"),
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
        if let Err(e) = inner.db_call(DbCall::Commit, tx.commit()).await {
            return Err(guard.failed(e).with_operation("tx.commit"));
        }
        Counters::add(&inner.stats.writes, effects.len() as u64);
        inner.apply_effects(effects, guard).await;
        Ok(())
    }

    /// Rolls back; the cache is not touched.
    pub async fn rollback(mut self) -> Result<()> {
        let tx = self.tx.take().expect("an open scope has a transaction");
        self.inner
            .db_call(DbCall::Rollback, tx.rollback())
            .await
            .map_err(|e| e.with_operation("tx.rollback"))
    }
}
