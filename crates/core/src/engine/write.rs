//! The write pipeline: prepare (every check before a side effect),
//! commit (one statement or transaction), the cache effects of what
//! committed (built in one place, `Inner::effect_of` and `Inner::item`),
//! their retries within the write deadline, and the resync of what could
//! not be applied; also the fenced repair and invalidation of one key.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;

/// A write ready to go: checked, encoded, with its cache key and TTL.
pub(crate) struct Prepared {
    pub(crate) key: Key,
    pub(crate) cache_key: String,
    pub(crate) row: Row,
    /// The encoded row if it is to be cached; `None` invalidates instead.
    pub(crate) payload: Option<Payload>,
    pub(crate) ttl: Option<Duration>,
}
/// Most effects in one cache call, and most entry bytes: a pipeline of
/// 100,000 fenced writes outlasts any timeout (and the breaker never learns
/// why), while a few hundred cost one round trip like one write.
pub(crate) const CACHE_CHUNK_ITEMS: usize = 500;
const CACHE_CHUNK_BYTES: usize = 4 << 20;

/// Splits effects into runs of at most [`CACHE_CHUNK_ITEMS`] effects and
/// about [`CACHE_CHUNK_BYTES`] of entries (a single larger entry is a run
/// of its own).
fn cache_chunks(effects: &[Effect]) -> impl Iterator<Item = &[Effect]> {
    let mut rest = effects;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len() && n < CACHE_CHUNK_ITEMS {
            bytes += match &rest[n].kind {
                EffectKind::Put(entry, _) => entry.len(),
                _ => codec::HEADER_LEN,
            };
            if n > 0 && bytes > CACHE_CHUNK_BYTES {
                break;
            }
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}
/// How often `invalidate` looks again when the entry changed under it.
const INVALIDATE_ATTEMPTS: usize = 5;
/// What a committed write does to the cache.
pub(crate) enum EffectKind {
    /// Store this entry.
    Put(Bytes, Option<Duration>),
    /// The row exists at the write's version but is not to be cached: an
    /// invalidation marker when fenced, which lets a later read cache it.
    Invalidate,
    /// There is no row as of the write's version: a tombstone when fenced.
    Tombstone,
}

pub(crate) struct Effect {
    pub(crate) cache_key: String,
    pub(crate) key: Key,
    pub(crate) table: Arc<TableState>,
    pub(crate) version: u64,
    /// The cache epoch known before the write committed.
    pub(crate) epoch: u64,
    pub(crate) kind: EffectKind,
    pub(crate) outbox_id: Option<i64>,
}

/// Marks keys for resync if dropped while armed: a write cancelled between
/// its commit and its cache write, or during a commit whose outcome is
/// therefore unknown, still gets its cache entry repaired.
pub(crate) struct ResyncGuard<'a> {
    inner: &'a Inner,
    keys: Vec<(String, Arc<TableState>, Key)>,
}

impl ResyncGuard<'_> {
    pub(crate) fn disarm(mut self) {
        self.keys.clear();
    }

    /// Settles the guard for a commit that failed with `e`, and hands `e`
    /// back: a commit known not to have happened wrote nothing to repair;
    /// one in doubt marks its keys (the guard is dropped armed).
    pub(crate) fn failed(self, e: Error) -> Error {
        if !e.is_in_doubt() {
            self.disarm();
        }
        e
    }
}

impl Drop for ResyncGuard<'_> {
    fn drop(&mut self) {
        for (ck, st, key) in self.keys.drain(..) {
            self.inner.flights.forget(&ck);
            self.inner.resync.mark(&ck, &st, key.clone(), 0);
        }
    }
}

impl Inner {
    pub(crate) fn guard(&self, mut keys: Vec<(String, Arc<TableState>, Key)>) -> ResyncGuard<'_> {
        if !self.cfg.consistency.resync {
            keys.clear();
        }
        ResyncGuard { inner: self, keys }
    }

    /// Checks everything about a write that can be checked without a side effect.
    pub(crate) fn prepare<R: Record>(
        &self,
        st: &TableState,
        validate: Option<&Validator<R>>,
        record: &R,
        opts: &crate::engine::WriteOptions,
    ) -> Result<Prepared> {
        let (key, row) = st.table.normalize_row(record.to_row()?)?;
        let cache_key = st.cache_key(&key);
        self.caps.check_key(&cache_key)?;
        self.check_db_values(row.iter().map(|(_, v)| v))?;
        if let Some(v) = validate {
            v(record).map_err(|m| Error::new(ErrorKind::Validation, m))?;
        }
        let call_ttl = opts
            .ttl
            .map(|t| check_ttl(&self.caps, &self.cfg, t))
            .transpose()?;
        let (payload, ttl) = if !opts.skip_cache && st.caches(&row) {
            let ttl = self.resolve_ttl(st, &row, call_ttl)?;
            let payload = self.cfg.codec.encode(&st.table, &row)?;
            self.caps.check_value_len(payload.entry_len())?;
            (Some(payload), ttl)
        } else {
            (None, None)
        };
        Ok(Prepared {
            key,
            cache_key,
            row,
            payload,
            ttl,
        })
    }

    fn resolve_ttl(
        &self,
        st: &TableState,
        row: &Row,
        call: Option<Duration>,
    ) -> Result<Option<Duration>> {
        if call.is_some() {
            return Ok(call);
        }
        if let Some(f) = &st.ttl_fn
            && let Some(t) = f(row)
        {
            return check_ttl(&self.caps, &self.cfg, t).map(Some);
        }
        Ok(st.ttl.or(self.default_ttl))
    }

    pub(crate) fn check_db_values<'v>(
        &self,
        values: impl Iterator<Item = &'v Value>,
    ) -> Result<()> {
        if self.db_caps.text_allows_nul {
            return Ok(());
        }
        for v in values {
            let has_nul = match v {
                Value::Text(s) => s.contains('\0'),
                Value::Json(j) => j.to_string().contains("\\u0000"),
                _ => false,
            };
            if has_nul {
                return Err(Error::new(
                    ErrorKind::InvalidValue,
                    format!(
                        "{} cannot store text containing a NUL byte",
                        self.db_store.name()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks a key for `st` and returns its cache key.
    pub(crate) fn key_for(&self, st: &TableState, key: &Key) -> Result<String> {
        st.table.check_key(key)?;
        let ck = st.cache_key(key);
        self.caps.check_key(&ck)?;
        Ok(ck)
    }

    /// Upserts the prepared rows in one transaction, then applies their cache effects.
    pub(crate) async fn commit_upserts(
        &self,
        st: &Arc<TableState>,
        prepared: Vec<Prepared>,
    ) -> Result<Vec<WriteOutcome>> {
        let opts = self.tx_options();
        self.commit_prepared(st, prepared, |writes| self.db().execute(writes, opts))
            .await
    }

    /// Inserts one prepared row that must not exist yet: in a transaction
    /// that takes the key's lock and reads it first, so that two inserts of
    /// one key cannot both succeed. A row already there is a `Conflict`.
    pub(crate) async fn commit_insert(
        &self,
        st: &Arc<TableState>,
        prepared: Prepared,
    ) -> Result<WriteOutcome> {
        let opts = self.tx_options();
        let mut out = self
            .commit_prepared(st, vec![prepared], |writes| self.db().insert(writes, opts))
            .await?;
        out.pop()
            .ok_or_else(|| Error::new(ErrorKind::Backend, "the database returned no outcome"))
    }

    /// Commits the prepared rows with `run` (given their writes), then
    /// applies their cache effects.
    async fn commit_prepared<F>(
        &self,
        st: &Arc<TableState>,
        mut prepared: Vec<Prepared>,
        run: impl FnOnce(Vec<Write>) -> F,
    ) -> Result<Vec<WriteOutcome>>
    where
        F: Future<Output = Result<Vec<WriteOutcome>>>,
    {
        let writes = prepared
            .iter_mut()
            .map(|p| Write {
                table: st.table.clone(),
                op: WriteOp::Upsert(std::mem::take(&mut p.row)),
            })
            .collect();
        let guard = self.guard(
            prepared
                .iter()
                .map(|p| (p.cache_key.clone(), st.clone(), p.key.clone()))
                .collect(),
        );
        let epoch = self.epoch_for_write().await;
        let outcomes = match run(writes).await {
            Ok(o) => o,
            Err(e) => return Err(guard.failed(e)),
        };
        Counters::add(&self.stats.writes, outcomes.len() as u64);
        let effects = prepared
            .into_iter()
            .zip(&outcomes)
            .map(|(p, o)| Self::effect_of_prepared(st, p, o, epoch))
            .collect();
        self.apply_effects(effects, guard).await;
        Ok(outcomes)
    }

    /// Commits one update or delete of `key` under a resync guard, then
    /// applies its cache effect (see [`Inner::effect_of`]).
    pub(crate) async fn commit_one(
        &self,
        st: &Arc<TableState>,
        key: Key,
        cache_key: String,
        commit: impl Future<Output = Result<WriteOutcome>>,
    ) -> Result<WriteOutcome> {
        let shown = cache_key.clone();
        let mut out = self
            .commit_many(st, vec![(key, cache_key)], async {
                commit.await.map(|o| vec![o])
            })
            .await
            .map_err(|e| e.with_key(&shown))?;
        out.pop()
            .ok_or_else(|| Error::new(ErrorKind::Backend, "the database returned no outcome"))
    }

    /// Commits updates or deletes of `keys` (one outcome per key, in order)
    /// under a resync guard, then applies their cache effects.
    pub(crate) async fn commit_many(
        &self,
        st: &Arc<TableState>,
        keys: Vec<(Key, String)>,
        commit: impl Future<Output = Result<Vec<WriteOutcome>>>,
    ) -> Result<Vec<WriteOutcome>> {
        let guard = self.guard(
            keys.iter()
                .map(|(k, ck)| (ck.clone(), st.clone(), k.clone()))
                .collect(),
        );
        let epoch = self.epoch_for_write().await;
        let outcomes = match commit.await {
            Ok(o) if o.len() == keys.len() => o,
            Ok(_) => {
                let e = Error::new(ErrorKind::Backend, "the database returned too few outcomes");
                return Err(guard.failed(e.in_doubt()));
            }
            Err(e) => return Err(guard.failed(e)),
        };
        Counters::add(&self.stats.writes, outcomes.len() as u64);
        let effects = keys
            .into_iter()
            .zip(&outcomes)
            .map(|((key, ck), o)| self.effect_of(st, key, ck, o, epoch))
            .collect();
        self.apply_effects(effects, guard).await;
        Ok(outcomes)
    }

    /// The cache effect of a committed upsert, from what `prepare` encoded
    /// and the version the database gave it. With [`Inner::effect_of`],
    /// the one place effects are built (plain writes, batches and scopes).
    pub(crate) fn effect_of_prepared(
        st: &Arc<TableState>,
        p: Prepared,
        o: &WriteOutcome,
        epoch: u64,
    ) -> Effect {
        let kind = match p.payload {
            Some(payload) => EffectKind::Put(payload.into_entry_at(o.version, epoch), p.ttl),
            None => EffectKind::Invalidate,
        };
        Effect {
            cache_key: p.cache_key,
            key: p.key,
            table: st.clone(),
            version: o.version,
            epoch,
            kind,
            outbox_id: o.outbox_id,
        }
    }

    /// The cache effect of an update or delete, from its outcome.
    pub(crate) fn effect_of(
        &self,
        st: &Arc<TableState>,
        key: Key,
        cache_key: String,
        o: &WriteOutcome,
        epoch: u64,
    ) -> Effect {
        let kind = match &o.row {
            Some(row) if st.caches(row) => match self.entry_for(st, row, o.version, epoch) {
                Some((entry, ttl)) => EffectKind::Put(entry, ttl),
                None => EffectKind::Invalidate,
            },
            Some(_) => EffectKind::Invalidate,
            None => EffectKind::Tombstone,
        };
        Effect {
            cache_key,
            key,
            table: st.clone(),
            version: o.version,
            epoch,
            kind,
            outbox_id: o.outbox_id,
        }
    }

    /// The cache entry for a row read back from the database, or `None` when
    /// it cannot be cached (too large, or a computed TTL the cache refuses).
    pub(crate) fn entry_for(
        &self,
        st: &TableState,
        row: &Row,
        version: u64,
        epoch: u64,
    ) -> Option<(Bytes, Option<Duration>)> {
        let ttl = self.resolve_ttl(st, row, None).ok()?;
        let payload = self.cfg.codec.encode(&st.table, row).ok()?;
        self.caps.check_value_len(payload.entry_len()).ok()?;
        Some((payload.into_entry_at(version, epoch), ttl))
    }

    /// Applies committed writes' cache effects, retrying transient failures;
    /// what still fails is remembered for resync. Never fails: the writes
    /// are committed and acknowledged whatever the cache does.
    pub(crate) async fn apply_effects(&self, effects: Vec<Effect>, guard: ResyncGuard<'_>) {
        self.flights
            .forget_all(effects.iter().map(|e| e.cache_key.as_str()));
        for e in &effects {
            self.hook(HookPoint::AfterCommit, &e.cache_key).await;
        }
        if effects.is_empty() {
            guard.disarm();
            return;
        }
        let committed = self.epochs.watched.then(Instant::now);
        for e in &effects {
            self.epochs.wrote(&e.cache_key, &e.table, &e.key);
        }
        let mut attempt = 1;
        let ok = loop {
            if !self.breaker.allows() {
                break false;
            }
            if committed.is_some_and(|at| at.elapsed() > self.cfg.effective_write_deadline()) {
                // Too late to write what was prepared: the cache may have
                // forgotten a newer entry meanwhile (a tombstone expired, a
                // restart). Resync re-reads the rows instead.
                Counters::add(&self.stats.late_effects, effects.len() as u64);
                self.metrics.late_effects.increment(effects.len() as u64);
                tracing::warn!(
                    keys = effects.len(),
                    "cache write past the write deadline; the rows are re-read instead"
                );
                break false;
            }
            for e in &effects {
                self.hook(HookPoint::BeforeCacheWrite, &e.cache_key).await;
            }
            match self.write_effects(&effects).await {
                Ok(()) => break true,
                Err(e) if e.is_temporary() && attempt < self.cfg.retry.attempts => {
                    tokio::time::sleep(self.cfg.retry.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cache write failed after commit; keys queued for resync");
                    break false;
                }
            }
        };
        guard.disarm();
        if ok {
            let at = Instant::now();
            let mut ids = effects
                .iter()
                .filter_map(|e| e.outbox_id)
                .map(|id| Ack { id, at })
                .peekable();
            if ids.peek().is_some() {
                self.acks.lock().extend(ids);
            }
        } else {
            Counters::add(&self.stats.cache_write_failures, effects.len() as u64);
            if !self.cfg.consistency.resync {
                return;
            }
            for e in &effects {
                self.resync
                    .mark(&e.cache_key, &e.table, e.key.clone(), e.version);
            }
        }
    }

    pub(crate) fn item(
        &self,
        cache_key: &str,
        version: u64,
        epoch: u64,
        kind: &EffectKind,
    ) -> CacheItem {
        match kind {
            EffectKind::Put(entry, ttl) => CacheItem {
                key: cache_key.to_owned(),
                entry: entry.clone(),
                version,
                ttl: *ttl,
            },
            EffectKind::Invalidate => CacheItem {
                key: cache_key.to_owned(),
                entry: codec::invalidation_at(version, epoch),
                version,
                ttl: Some(self.tombstone_ttl),
            },
            EffectKind::Tombstone => CacheItem {
                key: cache_key.to_owned(),
                entry: codec::tombstone_at(version, epoch),
                version,
                ttl: Some(self.tombstone_ttl),
            },
        }
    }

    /// Writes the effects in pieces a server takes in one call (see
    /// [`cache_chunks`]); each piece is a cache call of its own, with its
    /// timeout, its metrics and its say in the breaker.
    async fn write_effects(&self, effects: &[Effect]) -> Result<()> {
        for chunk in cache_chunks(effects) {
            self.write_chunk(chunk).await?;
        }
        Ok(())
    }

    async fn write_chunk(&self, effects: &[Effect]) -> Result<()> {
        if self.cfg.consistency.fence {
            let mut items: Vec<CacheItem> = effects
                .iter()
                .map(|e| self.item(&e.cache_key, e.version, e.epoch, &e.kind))
                .collect();
            let fences = if items.len() == 1 {
                let item = items.pop().expect("one item");
                vec![self.cache().set_if_newer(item).await?]
            } else {
                self.cache().set_many_if_newer(items).await?
            };
            let stale = fences.iter().filter(|f| **f == Fence::Stale).count();
            Counters::add(&self.stats.stale_refused, stale as u64);
            self.metrics.stale_refused.increment(stale as u64);
            return Ok(());
        }
        // Unfenced: the textbook write-through, with its races.
        let mut puts = Vec::new();
        for e in effects {
            match &e.kind {
                EffectKind::Put(..) => {
                    puts.push(self.item(&e.cache_key, e.version, e.epoch, &e.kind))
                }
                EffectKind::Invalidate | EffectKind::Tombstone => {
                    self.cache().delete(&e.cache_key).await?;
                }
            }
        }
        match puts.len() {
            0 => Ok(()),
            1 => {
                let it = puts.pop().expect("one item");
                self.cache().set(&it.key, it.entry, it.ttl).await
            }
            _ => self.cache().set_many(puts).await,
        }
    }

    /// Turns the cache entry of `ck` into a miss without opening the door
    /// to an older row: a row entry of version `v` is swapped, only if it
    /// is still exactly those bytes, for an invalidation at `v`, which
    /// refuses every populate older than `v` and lets the database's row
    /// back in on the next read. A tombstone or an invalidation is already
    /// a miss and stays. Returns whether an entry was invalidated.
    pub(crate) async fn invalidate(&self, ck: &str) -> Result<bool> {
        if !self.breaker.allows() {
            return Err(Error::new(
                ErrorKind::CircuitOpen,
                "the cache is not being called; nothing was invalidated",
            ));
        }
        self.flights.forget_all(std::iter::once(ck));
        for _ in 0..INVALIDATE_ATTEMPTS {
            let Some(bytes) = self.cache().get(ck).await? else {
                return Ok(false);
            };
            let version = match codec::decode(&bytes) {
                codec::Decoded::Row { version, .. } => version,
                codec::Decoded::Tombstone { .. } => return Ok(false),
                // Unreadable bytes: no version to keep, any row may replace them.
                codec::Decoded::Corrupt => 0,
            };
            let item = CacheItem {
                key: ck.to_owned(),
                entry: codec::invalidation_at(version, self.epochs.current()),
                version,
                ttl: Some(self.tombstone_ttl),
            };
            match self.cache().replace_if_unchanged(bytes, item).await? {
                Fence::Applied => return Ok(true),
                // A write or a load replaced the entry meanwhile: look again.
                Fence::Stale => continue,
            }
        }
        Err(Error::new(
            ErrorKind::Busy,
            format!("the entry changed under each of {INVALIDATE_ATTEMPTS} attempts"),
        ))
    }

    /// Makes the cache entry of `ck` agree with `row`, the current database
    /// row (or its absence, as of `gone_version` if known), read in `epoch`.
    pub(crate) async fn repair(
        &self,
        st: &TableState,
        ck: &str,
        row: Option<VersionedRow>,
        gone_version: u64,
        epoch: u64,
    ) -> Result<()> {
        match self.repair_plan(st, ck, row.as_ref(), gone_version, epoch) {
            Repair::Fenced(item) => self.cache().set_if_newer(item).await.map(drop),
            Repair::Plain(it) => self.cache().set(ck, it.entry, it.ttl).await,
            Repair::Remove => self.cache().delete(ck).await.map(drop),
        }
    }

    /// What [`Inner::repair`] sends, so that a batch of repairs can go out
    /// in one fenced call.
    pub(crate) fn repair_plan(
        &self,
        st: &TableState,
        ck: &str,
        row: Option<&VersionedRow>,
        gone_version: u64,
        epoch: u64,
    ) -> Repair {
        let item = match row {
            Some(vr) => match st
                .caches(&vr.row)
                .then(|| self.entry_for(st, &vr.row, vr.version, epoch))
            {
                Some(Some((entry, ttl))) => Some(CacheItem {
                    key: ck.to_owned(),
                    entry,
                    version: vr.version,
                    ttl,
                }),
                _ => None,
            },
            None => None,
        };
        let version = row.map_or(gone_version, |vr| vr.version);
        if !self.cfg.consistency.fence || (item.is_none() && version == 0) {
            // Nothing to fence with: remove whatever is there.
            return match item {
                Some(it) if !self.cfg.consistency.fence => Repair::Plain(it),
                _ => Repair::Remove,
            };
        }
        let kind = if row.is_some() {
            EffectKind::Invalidate
        } else {
            EffectKind::Tombstone
        };
        Repair::Fenced(item.unwrap_or_else(|| self.item(ck, version, epoch, &kind)))
    }
}

/// How one repair reaches the cache (see [`Inner::repair_plan`]).
pub(crate) enum Repair {
    /// The row's entry, or a tombstone or invalidation, with the fence.
    Fenced(CacheItem),
    /// The fence is off: a plain set.
    Plain(CacheItem),
    /// Nothing to fence with: remove the entry.
    Remove,
}
