//! The read pipeline: a cache lookup, then on a miss a database load
//! shared by concurrent readers (single flight), and the fenced populate
//! of what was loaded; batch reads take the same steps for many keys with
//! one cache round trip and one database query.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;

use super::stats::Counters;
use super::table::TableState;
use super::{HookPoint, Inner, Issue, Joined, LoadResult, Lookup, MAX_LATE_JOINS};
use crate::cache::{CacheItem, Fence};
use crate::codec::{self, Decoded};
use crate::entity::Record;
use crate::error::Result;
use crate::value::{Key, VersionedRow};

/// What a reader's miss came to: the cache answered after all (a load it
/// joined late refilled it), or a load's row.
pub(crate) enum Missed<R> {
    Hit(R),
    Loaded(Option<VersionedRow>),
}

impl Inner {
    /// Reads one key: the cache, else the database through single flight.
    pub(crate) async fn read<R: Record>(
        self: &Arc<Self>,
        st: &Arc<TableState>,
        key: Key,
    ) -> Result<(Option<R>, bool)> {
        let ck = self.key_for(st, &key)?;
        // The arrival stamp is taken before the cache lookup: a reader that
        // missed just before a load filled the cache then still joins that
        // load (it finished after the reader arrived) instead of starting
        // a second one.
        let arrival = self.flights.arrive();
        let epoch = self.epochs.current();
        let unreadable = match self.lookup::<R>(st, &ck, true).await {
            Lookup::Hit(hit) => return Ok((Some(hit), true)),
            Lookup::Miss(unreadable) => unreadable,
        };
        self.hook(HookPoint::Miss, &ck).await;
        let make = || {
            self.clone()
                .load_from_db(st.clone(), key.clone(), ck.clone())
        };
        let loaded = match self.load_or_join::<R, _>(st, &ck, arrival, make).await? {
            Missed::Hit(hit) => return Ok((Some(hit), true)),
            Missed::Loaded(l) => l,
        };
        if let Some(found) = unreadable {
            self.replace_unreadable(st, &ck, found, loaded.as_ref(), epoch)
                .await;
        }
        let found = loaded
            .map(|vr| R::from_row(&st.table, vr.row))
            .transpose()?;
        Ok((found, false))
    }

    /// [`Inner::read`] into a shared value: on a cache that keeps entries
    /// in this process, a hit whose entry was decoded before is served from
    /// the entry's slot, without decoding again; any other read decodes
    /// (and fills the slot). The slot belongs to the entry, so a write,
    /// which stores a new entry, brings a new slot; an entry from before the
    /// trusted epoch is not served from its slot either.
    pub(crate) async fn read_shared<R: Record>(
        self: &Arc<Self>,
        st: &Arc<TableState>,
        key: Key,
    ) -> Result<(Option<Arc<R>>, bool)> {
        if self.caps.in_process {
            let ck = self.key_for(st, &key)?;
            if let Some(hit) = self.lookup_slotted::<R>(st, &ck).await {
                return Ok((Some(hit), true));
            }
        }
        let (found, hit) = self.read::<R>(st, key).await?;
        Ok((found.map(Arc::new), hit))
    }

    /// A hit from the entry's slot, or decoded into it; `None` for anything
    /// else (the full read path then looks again and counts the miss).
    async fn lookup_slotted<R: Record>(&self, st: &TableState, ck: &str) -> Option<Arc<R>> {
        let trusted = self.trusted_for(ck).await?;
        let (bytes, slot) = self.cache().get_slotted(ck).await.ok()??;
        let slot = slot?;
        let floor = st.floor();
        if let Some((epoch, hit)) = slot.get::<R>()
            && epoch >= trusted
            && (floor == 0 || codec::entry_version(&bytes).is_some_and(|v| v >= floor))
        {
            Counters::add(&self.stats.hits, 1);
            st.metrics.hits.increment(1);
            self.sample_hit(st, ck);
            return Some(hit);
        }
        let epoch = codec::entry_epoch(&bytes)?;
        match self.classify::<R>(st, ck, bytes, trusted) {
            Lookup::Hit(r) => {
                let r = Arc::new(r);
                slot.fill(epoch, r.clone());
                Some(r)
            }
            Lookup::Miss(_) => None,
        }
    }

    /// The misses' side of a read: joins the load of `ck` in flight, or
    /// runs `make`'s. A load that queried before this reader arrived may
    /// predate a write it must see: then the cache, which that load has
    /// refilled since, answers instead, and failing that the reader tries
    /// again; after [`MAX_LATE_JOINS`] late joins (a hot key that will not
    /// stay cached) it loads alone. Shared by `get` and `get_or_load`.
    pub(crate) async fn load_or_join<R: Record, F>(
        &self,
        st: &TableState,
        ck: &str,
        mut arrival: u64,
        make: impl Fn() -> F,
    ) -> Result<Missed<R>>
    where
        F: FnOnce(Issue) -> BoxFuture<'static, LoadResult>,
    {
        for _ in 0..MAX_LATE_JOINS {
            match self.load(ck, arrival, &make).await {
                Joined::Fresh(r) => return Ok(Missed::Loaded(r?)),
                Joined::Late => {
                    if let Lookup::Hit(hit) = self.lookup::<R>(st, ck, false).await {
                        return Ok(Missed::Hit(hit));
                    }
                    arrival = self.flights.arrive();
                }
            }
        }
        Ok(Missed::Loaded(make()(Issue::unshared()).await?))
    }

    /// Looks `ck` up in the cache. On a miss, returns the bytes found if
    /// they were not a readable entry, so that the reader can replace them.
    pub(crate) async fn lookup<R: Record>(
        &self,
        st: &TableState,
        ck: &str,
        count_miss: bool,
    ) -> Lookup<R> {
        let mut unreadable = None;
        if let Some(trusted) = self.trusted_for(ck).await
            && let Ok(Some(bytes)) = self.cache().get(ck).await
        {
            match self.classify::<R>(st, ck, bytes, trusted) {
                hit @ Lookup::Hit(_) => return hit,
                Lookup::Miss(u) => unreadable = u,
            }
        }
        if count_miss {
            Counters::add(&self.stats.misses, 1);
            st.metrics.misses.increment(1);
        }
        Lookup::Miss(unreadable)
    }

    /// Offers a hit to the consistency monitor, when it runs.
    fn sample_hit(&self, st: &TableState, ck: &str) {
        if let Some(m) = &self.monitor {
            m.offer(st, ck);
        }
    }

    /// The epoch a cache read of `ck` may trust, or `None` when the cache
    /// must not answer it: the breaker is open, the key awaits resync, or
    /// the epoch is unconfirmed.
    async fn trusted_for(&self, ck: &str) -> Option<u64> {
        if !self.breaker.allows() || self.resync.contains(ck) {
            return None;
        }
        self.trusted_epoch().await
    }

    /// What one cache entry's bytes are worth to a reader trusting epoch
    /// `trusted`: a hit, or a miss (with the bytes if they are unreadable
    /// or from before the cache forgot, so that the reader replaces them).
    fn classify<R: Record>(
        &self,
        st: &TableState,
        ck: &str,
        bytes: Bytes,
        trusted: u64,
    ) -> Lookup<R> {
        match codec::decode(&bytes) {
            d @ (Decoded::Row { .. } | Decoded::Tombstone { .. })
                if d.epoch().is_some_and(|e| e < trusted) =>
            {
                // Prepared before the cache forgot or went back: the
                // database decides, and the fence lets its row replace it.
                Counters::add(&self.stats.old_epoch_entries, 1);
                Lookup::Miss(Some(bytes))
            }
            d @ (Decoded::Row { .. } | Decoded::Tombstone { .. })
                if d.version().is_some_and(|v| v < st.floor()) =>
            {
                // From before a whole-table change made outside the engine
                // (a TRUNCATE): the database decides.
                Counters::add(&self.stats.below_floor_entries, 1);
                Lookup::Miss(Some(bytes))
            }
            Decoded::Row { codec, payload, .. } => {
                match R::from_payload(codec, &st.table, payload) {
                    Ok(r) => {
                        Counters::add(&self.stats.hits, 1);
                        st.metrics.hits.increment(1);
                        self.sample_hit(st, ck);
                        Lookup::Hit(r)
                    }
                    Err(e) => {
                        // A sound header over a payload that does not fit
                        // the entity: as unreadable as corrupt bytes, and
                        // replaced the same way by the row read next (the
                        // fence alone would keep it: its version is current).
                        Counters::add(&self.stats.corrupt_entries, 1);
                        tracing::warn!(key = ck, error = %e, "cached row does not decode; replacing it from the database");
                        Lookup::Miss(Some(bytes))
                    }
                }
            }
            Decoded::Tombstone { .. } => Lookup::Miss(None),
            Decoded::Corrupt => {
                Counters::add(&self.stats.corrupt_entries, 1);
                Lookup::Miss(Some(bytes))
            }
        }
    }

    /// Replaces unreadable bytes with the row just loaded. The fence alone
    /// would keep bytes whose header is intact but whose payload is not, so
    /// this swaps exactly those bytes, atomically, where the backend can.
    async fn replace_unreadable(
        &self,
        st: &TableState,
        ck: &str,
        found: Bytes,
        vr: Option<&VersionedRow>,
        epoch: u64,
    ) {
        if !self.breaker.allows() {
            return;
        }
        let item = match vr {
            // No row: "none as of the version found", in this epoch (the
            // database has no row, so whatever was there is gone).
            None => {
                // At least the table's floor: a whole-table change at the
                // floor's version removed whatever row there was.
                let version = codec::entry_version(&found).unwrap_or(0).max(st.floor());
                CacheItem {
                    key: ck.to_owned(),
                    entry: codec::tombstone_at(version, epoch),
                    version,
                    ttl: Some(self.tombstone_ttl),
                }
            }
            Some(vr) => {
                if !st.caches(&vr.row) {
                    return;
                }
                let Some((entry, ttl)) = self.entry_for(st, &vr.row, vr.version, epoch) else {
                    return;
                };
                CacheItem {
                    key: ck.to_owned(),
                    entry,
                    version: vr.version,
                    ttl,
                }
            }
        };
        let r = self.cache().replace_if_unchanged(found, item).await;
        if let Ok(Fence::Applied) = r {
            Counters::add(&self.stats.populates, 1);
        }
    }

    /// Runs `load` for `ck`, shared with concurrent callers when single
    /// flight is on; `arrival` is the caller's stamp from `Flights::arrive`.
    pub(crate) async fn load<F>(&self, ck: &str, arrival: u64, load: impl FnOnce() -> F) -> Joined
    where
        F: FnOnce(Issue) -> BoxFuture<'static, LoadResult>,
    {
        if self.cfg.consistency.single_flight {
            self.flights.run(ck, arrival, load()).await
        } else {
            Joined::Fresh(load()(Issue::unshared()).await)
        }
    }

    /// The load of one row from the database, for [`Inner::load`].
    fn load_from_db(
        self: Arc<Self>,
        st: Arc<TableState>,
        key: Key,
        ck: String,
    ) -> impl FnOnce(Issue) -> BoxFuture<'static, LoadResult> {
        move |issue| {
            async move {
                self.hook(HookPoint::BeforeLoad, &ck).await;
                let started = Instant::now();
                let epoch = self.epochs.current();
                Counters::add(&self.stats.loads, 1);
                issue.now();
                let row = self.db().get(&st.table, &key).await?;
                self.hook(HookPoint::AfterLoad, &ck).await;
                if let Some(vr) = &row {
                    self.populate(&st, &ck, vr, started, epoch).await;
                }
                Ok(row)
            }
            .boxed()
        }
    }

    /// Puts a loaded row in the cache, fenced by its version. Waits for the
    /// cache's answer, so that a reader who saw this row and then reads
    /// again cannot be handed an older one another reader put there.
    pub(crate) async fn populate(
        &self,
        st: &TableState,
        ck: &str,
        vr: &VersionedRow,
        started: Instant,
        epoch: u64,
    ) -> bool {
        if !st.caches(&vr.row) || !self.may_populate(started) {
            return false;
        }
        let Some((entry, ttl)) = self.entry_for(st, &vr.row, vr.version, epoch) else {
            return false;
        };
        let r = if self.cfg.consistency.fence {
            let item = CacheItem {
                key: ck.to_owned(),
                entry,
                version: vr.version,
                ttl,
            };
            self.cache().set_if_newer(item).await
        } else {
            self.cache()
                .set(ck, entry, ttl)
                .await
                .map(|()| Fence::Applied)
        };
        match r {
            Ok(Fence::Applied) => {
                Counters::add(&self.stats.populates, 1);
                true
            }
            Ok(Fence::Stale) => {
                Counters::add(&self.stats.stale_refused, 1);
                self.metrics.stale_refused.increment(1);
                false
            }
            Err(_) => false,
        }
    }

    /// Reads many keys: one cache round trip for all of them, then one
    /// database query for the misses, whose rows fill the cache with one
    /// fenced batch write. Each answer says whether it was a hit.
    ///
    /// The misses' load is not shared with concurrent single reads (it
    /// queries the database itself, after this call began, so what it
    /// returns is never older than a write acknowledged before); the
    /// fence, the load deadline and the epochs guard its populate exactly
    /// as they guard a single read's.
    pub(crate) async fn read_many<R: Record>(
        self: &Arc<Self>,
        st: &Arc<TableState>,
        keys: Vec<Key>,
    ) -> Result<Vec<(Option<R>, bool)>> {
        let cks = keys
            .iter()
            .map(|k| self.key_for(st, k))
            .collect::<Result<Vec<String>>>()?;
        let n = keys.len();
        let mut found: Vec<Option<R>> = (0..n).map(|_| None).collect();
        let mut hit = vec![false; n];
        let mut unreadable: Vec<Option<Bytes>> = vec![None; n];
        let trusted = if self.breaker.allows() {
            self.trusted_epoch().await
        } else {
            None
        };
        if let Some(trusted) = trusted {
            let asked: Vec<usize> = (0..n).filter(|&i| !self.resync.contains(&cks[i])).collect();
            let asked_keys: Vec<String> = asked.iter().map(|&i| cks[i].clone()).collect();
            if !asked.is_empty()
                && let Ok(entries) = self.cache().get_many(&asked_keys).await
            {
                for (&i, bytes) in asked.iter().zip(entries) {
                    let Some(bytes) = bytes else { continue };
                    match self.classify::<R>(st, &cks[i], bytes, trusted) {
                        Lookup::Hit(r) => {
                            found[i] = Some(r);
                            hit[i] = true;
                        }
                        Lookup::Miss(u) => unreadable[i] = u,
                    }
                }
            }
        }
        let missed: Vec<usize> = (0..n).filter(|&i| !hit[i]).collect();
        if !missed.is_empty() {
            Counters::add(&self.stats.misses, missed.len() as u64);
            st.metrics.misses.increment(missed.len() as u64);
            // One query per distinct key.
            let mut first: HashMap<&str, usize> = HashMap::with_capacity(missed.len());
            let mut load_keys = Vec::with_capacity(missed.len());
            let mut load_cks = Vec::with_capacity(missed.len());
            for &i in &missed {
                if !first.contains_key(cks[i].as_str()) {
                    first.insert(&cks[i], load_keys.len());
                    load_keys.push(keys[i].clone());
                    load_cks.push(cks[i].clone());
                }
            }
            let (started, epoch) = (Instant::now(), self.epochs.current());
            Counters::add(&self.stats.loads, load_keys.len() as u64);
            let rows = self.db().get_many(&st.table, &load_keys).await?;
            self.populate_many(st, &load_cks, &rows, started, epoch)
                .await;
            for &i in &missed {
                let row = &rows[first[cks[i].as_str()]];
                if let Some(bytes) = unreadable[i].take() {
                    self.replace_unreadable(st, &cks[i], bytes, row.as_ref(), epoch)
                        .await;
                }
                found[i] = row
                    .as_ref()
                    .map(|vr| R::from_row(&st.table, vr.row.clone()))
                    .transpose()?;
            }
        }
        Ok(found.into_iter().zip(hit).collect())
    }

    /// Whether rows loaded by a read that started at `started` may go in
    /// the cache: the cache is being called, resync has not overflowed, and
    /// the load beat its deadline (a late one is counted and dropped).
    fn may_populate(&self, started: Instant) -> bool {
        if !self.breaker.allows() || self.resync.overflowed() {
            return false;
        }
        if started.elapsed() >= self.cfg.load_deadline {
            Counters::add(&self.stats.late_loads, 1);
            return false;
        }
        true
    }

    /// [`Inner::populate`] for a batch of loaded rows: one fenced cache
    /// call per chunk instead of one per row. Returns the entries written.
    pub(crate) async fn populate_many(
        &self,
        st: &TableState,
        cks: &[String],
        rows: &[Option<VersionedRow>],
        started: Instant,
        epoch: u64,
    ) -> usize {
        if !self.may_populate(started) {
            return 0;
        }
        let items: Vec<CacheItem> = cks
            .iter()
            .zip(rows)
            .filter_map(|(ck, row)| {
                let vr = row.as_ref()?;
                if !st.caches(&vr.row) {
                    return None;
                }
                let (entry, ttl) = self.entry_for(st, &vr.row, vr.version, epoch)?;
                Some(CacheItem {
                    key: ck.clone(),
                    entry,
                    version: vr.version,
                    ttl,
                })
            })
            .collect();
        let mut written = 0;
        for chunk in items.chunks(super::CACHE_CHUNK_ITEMS) {
            let chunk = chunk.to_vec();
            let len = chunk.len() as u64;
            if self.cfg.consistency.fence {
                if let Ok(fences) = self.cache().set_many_if_newer(chunk).await {
                    let applied = fences.iter().filter(|f| **f == Fence::Applied).count() as u64;
                    Counters::add(&self.stats.populates, applied);
                    Counters::add(&self.stats.stale_refused, len - applied);
                    self.metrics.stale_refused.increment(len - applied);
                    written += applied as usize;
                }
            } else if self.cache().set_many(chunk).await.is_ok() {
                Counters::add(&self.stats.populates, len);
                written += len as usize;
            }
        }
        written
    }
}
