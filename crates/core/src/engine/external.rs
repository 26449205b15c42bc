//! Following writes made outside the engine.
//!
//! Tables registered with
//! [`TableOptions::track_external_writes`](crate::TableOptions::track_external_writes)
//! have database triggers (installed by [`DbStore::track_external`]) that
//! give every write not made by an engine a version from the engine's own
//! source and record it in the change table, in the writer's transaction.
//! Every engine follows that table with this task and repairs its cache
//! through the fence, exactly like a replay: it re-reads the changed rows
//! (one query per page of keys) and writes them, or tombstones, with one
//! fenced call per page. A whole-table change (`TRUNCATE`) raises the
//! table's floor: entries of lower versions read as misses from then on.
//!
//! # Reading the change table without missing a record
//!
//! Record ids are drawn when a record is made, not when its transaction
//! commits, so a follower that only remembered the highest id seen would
//! skip a record whose transaction committed after a later one's. Each page
//! therefore comes with the transactions still in flight in its snapshot
//! ([`ChangePage::in_flight`](crate::backend::ChangePage::in_flight)): a
//! record not visible yet with an id below one already read belongs to one
//! of them, and any later transaction's records get higher ids. A pass
//! reads the records of the transactions in flight during the last pass
//! (below where it read to), then every record above; it remembers the ids
//! it applied of transactions still in flight, so each record is applied
//! once. A long transaction elsewhere (an idle `psql` session, a report)
//! costs nothing: only the in-flight transactions' own records are read
//! again. (SQLite's writers are serial: nothing is ever in flight.)
//!
//! # Waking up
//!
//! The adapter's doorbell ([`DbStore::external_doorbell`]) rings when a
//! change may have committed; a pass also runs every
//! [`Config::external_poll_interval`](crate::Config::external_poll_interval),
//! which covers a ring that was missed (a `LISTEN` connection that dropped).
//!
//! [`DbStore::track_external`]: crate::backend::DbStore::track_external
//! [`DbStore::external_doorbell`]: crate::backend::DbStore::external_doorbell

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::Inner;
use super::stats::Counters;
use super::table::TableState;
use super::write::{EffectKind, Repair};
use crate::cache::CacheItem;
use crate::codec;
use crate::db::{ChangeRange, ExternalChange};
use crate::error::{Error, ErrorKind, Result};
use crate::value::Key;

/// Changes read per round trip, and keys re-read per query.
const PAGE: usize = 500;
/// How often recorded changes older than the retention are removed.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Starts the follower unless it runs already.
///
/// A shared cache may hold entries from before this engine started, so
/// its follower replays every record still kept. An in-process cache
/// starts empty: its follower starts at the database's current horizon,
/// read here, before the table serves its first read (a record made after
/// that is applied; one made before concerns an entry this cache cannot
/// hold).
///
/// A table registered while the follower runs already joins it from where
/// it stands; on a shared cache its records kept from before are replayed
/// once, by a task of their own.
pub(crate) async fn start(inner: &Arc<Inner>, table: &str) -> Result<()> {
    if inner.follower.lock().is_some() {
        if !inner.caps.in_process {
            let (weak, table) = (Arc::downgrade(inner), table.to_owned());
            tokio::spawn(async move {
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    match inner.catch_up(&table).await {
                        Ok(_) => return,
                        Err(e) => tracing::debug!(error = %e, table, "catching up; retrying"),
                    }
                    drop(inner);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
        return Ok(());
    }
    let (after, pending) = if inner.caps.in_process {
        let range = ChangeRange {
            after: i64::MAX,
            upto: i64::MAX,
            positions: None,
        };
        let now = inner.db().external_changes(&[], range, 1).await?;
        (now.max_id, now.in_flight)
    } else {
        (0, Vec::new())
    };
    let mut slot = inner.follower.lock();
    if slot.is_none() {
        let f = Follower {
            after,
            pending,
            seen: HashMap::new(),
            last_prune: None,
        };
        let bell = inner.db_store.external_doorbell();
        *slot = Some(tokio::spawn(follow(Arc::downgrade(inner), bell, f)));
    }
    Ok(())
}

/// Where a follower stands.
struct Follower {
    /// Every change with an id up to this is applied, but for those of
    /// the `pending` transactions.
    after: i64,
    /// Transactions in flight during the last pass.
    pending: Vec<u64>,
    /// Ids applied of the `pending` transactions.
    seen: HashMap<i64, u64>,
    last_prune: Option<Instant>,
}

async fn follow(engine: Weak<Inner>, bell: Option<Arc<tokio::sync::Notify>>, mut f: Follower) {
    loop {
        let poll = {
            let Some(inner) = engine.upgrade() else {
                return;
            };
            match inner.follow_pass(&mut f).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(repaired = n, "repaired keys written outside the engine"),
                Err(e) => {
                    tracing::debug!(error = %e, "external changes not applied yet; next pass retries")
                }
            }
            inner.prune_external_if_due(&mut f).await;
            inner.cfg.external_poll_interval
        };
        match &bell {
            Some(b) => {
                let _ = tokio::time::timeout(poll, b.notified()).await;
            }
            None => tokio::time::sleep(poll).await,
        }
    }
}

impl Inner {
    /// One pass over the change table: applies every change not applied
    /// yet, page by page. Returns the keys repaired.
    async fn follow_pass(&self, f: &mut Follower) -> Result<usize> {
        let tables: Vec<String> = self
            .tables
            .read()
            .values()
            .filter(|t| t.external)
            .map(|t| t.table.name().as_str().to_owned())
            .collect();
        if tables.is_empty() {
            return Ok(0);
        }
        let mut in_flight: HashSet<u64> = HashSet::new();
        let mut repaired = 0;
        // The changes of transactions that were in flight during the last
        // pass, among the ids it read past: only those can have appeared
        // below `f.after` since.
        if !f.pending.is_empty() {
            let pending = f.pending.clone();
            let range = ChangeRange {
                after: 0,
                upto: f.after,
                positions: Some(&pending),
            };
            repaired += self
                .apply_range(&tables, range, Some(f), &mut in_flight)
                .await?
                .1;
        }
        // Then everything above.
        let range = ChangeRange {
            after: f.after,
            upto: i64::MAX,
            positions: None,
        };
        let (after, n) = self
            .apply_range(&tables, range, Some(f), &mut in_flight)
            .await?;
        repaired += n;
        // A change read in this pass whose transaction was in flight at an
        // earlier page's snapshot is read again by the next pass: remember
        // those, and only those.
        f.after = after;
        f.seen.retain(|_, p| in_flight.contains(p));
        f.pending = in_flight.into_iter().collect();
        f.pending.sort_unstable();
        Ok(repaired)
    }

    /// Applies every record kept of `table` (a table that joined a
    /// running follower on a shared cache).
    async fn catch_up(&self, table: &str) -> Result<usize> {
        let range = ChangeRange {
            after: 0,
            upto: i64::MAX,
            positions: None,
        };
        let tables = [table.to_owned()];
        let (_, repaired) = self
            .apply_range(&tables, range, None, &mut HashSet::new())
            .await?;
        Ok(repaired)
    }

    /// Reads the changes of `tables` in `range` page by page and applies
    /// them: with a follower, those it has not applied yet (and remembers
    /// them), without, all. Collects the pages' transactions in flight into
    /// `in_flight`. Returns the last id read (`range.after` if none) and
    /// the keys repaired.
    async fn apply_range(
        &self,
        tables: &[String],
        mut range: ChangeRange<'_>,
        mut f: Option<&mut Follower>,
        in_flight: &mut HashSet<u64>,
    ) -> Result<(i64, usize)> {
        let mut repaired = 0;
        loop {
            let page = self.db().external_changes(tables, range, PAGE).await?;
            in_flight.extend(&page.in_flight);
            let n = page.changes.len();
            range.after = page.changes.last().map_or(range.after, |c| c.id);
            repaired += match f.as_deref_mut() {
                Some(f) => self.apply_fresh(f, page.changes).await?,
                None => self.apply_external(&page.changes).await?,
            };
            if n < PAGE {
                return Ok((range.after, repaired));
            }
        }
    }

    /// Applies the changes of a page not applied yet, and remembers them.
    async fn apply_fresh(&self, f: &mut Follower, changes: Vec<ExternalChange>) -> Result<usize> {
        Counters::add(&self.stats.external_read, changes.len() as u64);
        let fresh: Vec<ExternalChange> = changes
            .into_iter()
            .filter(|c| !f.seen.contains_key(&c.id))
            .collect();
        let n = self.apply_external(&fresh).await?;
        f.seen.extend(fresh.iter().map(|c| (c.id, c.position)));
        Ok(n)
    }

    /// Applies one page of changes: whole-table changes raise their
    /// table's floor; changed keys are re-read, one query per table, and
    /// written with the fence, one call per table. A key whose repair
    /// cannot reach the cache is left to resync.
    async fn apply_external(&self, changes: &[ExternalChange]) -> Result<usize> {
        let mut by_table: HashMap<&str, Vec<(Key, u64)>> = HashMap::new();
        for c in changes {
            let Some(st) = self.table_state(&c.table) else {
                continue;
            };
            match &c.key {
                None => {
                    st.floor.fetch_max(c.version, Ordering::AcqRel);
                    Counters::add(&self.stats.external_truncates, 1);
                }
                Some(k) => by_table
                    .entry(&c.table)
                    .or_default()
                    .push((k.clone(), c.version)),
            }
        }
        let mut repaired = 0;
        for (table, mut keys) in by_table {
            let Some(st) = self.table_state(table) else {
                continue;
            };
            // One repair per key: the latest version recorded for it.
            keys.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            keys.dedup_by(|a, b| a.0 == b.0);
            repaired += self.repair_keys(&st, &keys).await?;
        }
        Counters::add(&self.stats.external_repaired, repaired as u64);
        self.metrics.external_repaired.increment(repaired as u64);
        Ok(repaired)
    }

    /// Re-reads `keys` (each with the version its change was given) and
    /// writes what the database holds, with the fence.
    async fn repair_keys(&self, st: &Arc<TableState>, keys: &[(Key, u64)]) -> Result<usize> {
        // Keys whose entry is already at the change's version or later
        // need nothing: another engine on a shared cache repaired them, or
        // a later write replaced them. A key with no entry needs no row
        // either (nobody reads it from the cache), only a small
        // invalidation at the change's version: it fences a late populate
        // of the row from before the change, and the next read loads. The
        // rest (older or unreadable entries, or a cache that did not
        // answer) are re-read and rewritten.
        let cks: Vec<String> = keys.iter().map(|(k, _)| st.cache_key(k)).collect();
        let entries = self.cache().get_many(&cks).await.ok();
        let (mut absent, mut stale) = (Vec::new(), Vec::new());
        for (i, (_, version)) in keys.iter().enumerate() {
            match entries.as_ref().map(|e| e.get(i).cloned().flatten()) {
                Some(None) => absent.push(i),
                Some(Some(b)) if codec::entry_version(&b).is_some_and(|v| v >= *version) => {}
                _ => stale.push(i),
            }
        }
        if !self.cfg.consistency.fence {
            // Nothing to fence a late populate with: absent keys need nothing.
            absent.clear();
        }
        if absent.is_empty() && stale.is_empty() {
            return Ok(0);
        }
        let epoch = self.epoch_for_write().await;
        // Every fenced write of the page goes out in one call: the
        // invalidations of the absent keys and the rewrites of the rest.
        let invalidation = |i: usize| self.item(&cks[i], keys[i].1, epoch, &EffectKind::Invalidate);
        let mut fenced: Vec<CacheItem> = absent.iter().map(|&i| invalidation(i)).collect();
        let mut fenced_keys = absent.clone();
        if !stale.is_empty() {
            let read_at = Instant::now();
            let only: Vec<Key> = stale.iter().map(|&i| keys[i].0.clone()).collect();
            let rows = match self.db().get_many(&st.table, &only).await {
                Ok(rows) => rows.into_iter().map(Ok).collect(),
                Err(e) if e.is_temporary() => return Err(e),
                // A row the engine cannot read (an external write that does
                // not fit the schema): key by key, so that only the bad keys
                // are left out, and those are invalidated below.
                Err(_) => {
                    let mut one_by_one = Vec::with_capacity(only.len());
                    for k in &only {
                        one_by_one.push(self.db().get(&st.table, k).await);
                    }
                    one_by_one
                }
            };
            if !self.timely(read_at) {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "stalled past the write deadline between re-reading and repairing; the next pass reads again",
                ));
            }
            for (&i, row) in stale.iter().zip(rows) {
                let (ck, (key, version)) = (&cks[i], &keys[i]);
                let plan = match row {
                    Ok(row) => self.repair_plan(st, ck, row.as_ref(), *version, epoch),
                    Err(e) if e.is_temporary() => return Err(e),
                    Err(e) => {
                        // Unreadable: no entry may claim to know the row; the
                        // next read goes to the database (and fails there).
                        tracing::warn!(key = %ck, error = %e, "an externally written row does not read; invalidating it");
                        Repair::Fenced(invalidation(i))
                    }
                };
                match plan {
                    Repair::Fenced(item) => {
                        fenced.push(item);
                        fenced_keys.push(i);
                    }
                    Repair::Plain(item) => {
                        if self.cache().set(ck, item.entry, item.ttl).await.is_err() {
                            self.resync.mark(ck, st, key.clone(), *version);
                        }
                    }
                    Repair::Remove => {
                        if self.cache().delete(ck).await.is_err() {
                            self.resync.mark(ck, st, key.clone(), *version);
                        }
                    }
                }
            }
        }
        if !fenced.is_empty() && self.cache().set_many_if_newer(fenced).await.is_err() {
            for i in fenced_keys {
                self.resync.mark(&cks[i], st, keys[i].0.clone(), keys[i].1);
            }
        }
        Ok(absent.len() + stale.len())
    }

    /// Removes recorded changes older than the retention, every minute.
    async fn prune_external_if_due(&self, f: &mut Follower) {
        if f.last_prune.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
            return;
        }
        f.last_prune = Some(Instant::now());
        if let Err(e) = self
            .db_store
            .prune_external_changes(self.cfg.external_retention)
            .await
        {
            tracing::debug!(error = %e, "could not prune recorded external changes");
        }
    }
}
