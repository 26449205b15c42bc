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
//! skip a record whose transaction committed after a later one's. The
//! adapter therefore gives each record a *position* and each page a
//! *horizon*, read in one snapshot: every record not yet visible will have
//! a position at or above the horizon (PostgreSQL: the writer's
//! transaction id, and the snapshot's oldest transaction still running;
//! SQLite, whose writers are serial: the id, and the next id). The follower
//! asks from its last horizon and remembers the ids it already applied
//! whose position is at or above it, so every record is applied once,
//! however transactions interleave.
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

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::Inner;
use super::stats::Counters;
use super::table::TableState;
use super::write::Repair;
use crate::codec;
use crate::db::ExternalChange;
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
pub(crate) async fn start(inner: &Arc<Inner>) -> Result<()> {
    if inner.follower.lock().is_some() {
        return Ok(());
    }
    let horizon = if inner.caps.in_process {
        inner
            .db()
            .external_changes(&[], u64::MAX, i64::MAX, 1)
            .await?
            .horizon
    } else {
        0
    };
    let mut slot = inner.follower.lock();
    if slot.is_none() {
        let f = Follower {
            horizon,
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
    /// Positions below this are all applied.
    horizon: u64,
    /// Ids applied whose position is at or above the horizon.
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
        let mut after = 0;
        let mut next_horizon = None;
        let mut repaired = 0;
        loop {
            let page = self
                .db()
                .external_changes(&tables, f.horizon, after, PAGE)
                .await?;
            // The first page's horizon is the lowest of the pass: records
            // that became visible between pages are at or above it.
            next_horizon.get_or_insert(page.horizon);
            let n = page.changes.len();
            if let Some(last) = page.changes.last() {
                after = last.id;
            }
            let fresh: Vec<ExternalChange> = page
                .changes
                .into_iter()
                .filter(|c| !f.seen.contains_key(&c.id))
                .collect();
            repaired += self.apply_external(&fresh).await?;
            f.seen.extend(fresh.iter().map(|c| (c.id, c.position)));
            if n < PAGE {
                break;
            }
        }
        if let Some(h) = next_horizon {
            f.horizon = f.horizon.max(h);
            let horizon = f.horizon;
            f.seen.retain(|_, p| *p >= horizon);
        }
        Ok(repaired)
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
        // need nothing: another engine on a shared cache repaired them,
        // or a later write replaced them. (An absent entry is repaired all
        // the same: the row or tombstone written now fences a late
        // populate of the row from before the change.)
        let cks: Vec<String> = keys.iter().map(|(k, _)| st.cache_key(k)).collect();
        let entries = self.cache().get_many(&cks).await.unwrap_or_default();
        let keys: Vec<(Key, u64)> = keys
            .iter()
            .enumerate()
            .filter(|(i, (_, version))| {
                entries
                    .get(*i)
                    .and_then(Option::as_ref)
                    .and_then(|b| codec::entry_version(b))
                    .is_none_or(|v| v < *version)
            })
            .map(|(_, k)| k.clone())
            .collect();
        if keys.is_empty() {
            return Ok(0);
        }
        let epoch = self.epoch_for_write().await;
        let read_at = Instant::now();
        let only: Vec<Key> = keys.iter().map(|(k, _)| k.clone()).collect();
        let rows = self.db().get_many(&st.table, &only).await?;
        if !self.timely(read_at) {
            return Err(Error::new(
                ErrorKind::Timeout,
                "stalled past the write deadline between re-reading and repairing; the next pass reads again",
            ));
        }
        let mut fenced = Vec::with_capacity(keys.len());
        let mut fenced_keys = Vec::with_capacity(keys.len());
        for ((key, version), row) in keys.iter().zip(&rows) {
            let ck = st.cache_key(key);
            match self.repair_plan(st, &ck, row.as_ref(), *version, epoch) {
                Repair::Fenced(item) => {
                    fenced.push(item);
                    fenced_keys.push((ck, key, *version));
                }
                Repair::Plain(item) => {
                    if self.cache().set(&ck, item.entry, item.ttl).await.is_err() {
                        self.resync.mark(&ck, st, key.clone(), *version);
                    }
                }
                Repair::Remove => {
                    if self.cache().delete(&ck).await.is_err() {
                        self.resync.mark(&ck, st, key.clone(), *version);
                    }
                }
            }
        }
        if !fenced.is_empty() && self.cache().set_many_if_newer(fenced).await.is_err() {
            for (ck, key, version) in fenced_keys {
                self.resync.mark(&ck, st, key.clone(), version);
            }
        }
        Ok(keys.len())
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
