//! The cache's epoch: noticing a cache that forgot or went back in time.
//!
//! The fence keeps an older write from replacing a newer entry; it cannot
//! help when the newer entry is gone (the cache restarted empty, was
//! flushed) or was replaced by an older copy (restored from a snapshot, a
//! replica promoted that missed the last writes). So every entry carries
//! the *epoch* it was prepared in (see [`crate::codec`]), the cache holds a
//! record of the current epoch and of the server identity it was made for
//! (`{namespace}:_wt:epoch`), and every engine checks that record every
//! `epoch_check_interval`:
//!
//! * the record is gone (a restart empty, a flush, an eviction), names
//!   another identity (a restart from a snapshot, another server), or is
//!   older than the epoch this engine knows (a rollback): the engine
//!   proposes the next epoch, written with the fence, so that the highest
//!   proposal wins and every engine adopts the same one;
//! * entries of an earlier epoch are then read as misses, and the fence
//!   lets any entry of the new epoch replace them;
//! * the keys this engine wrote within the trust window before the change
//!   are resynced (their entries may have landed in the old epoch after the
//!   change), and their outbox records are left for replay instead of
//!   being removed (for the engines that crashed meanwhile).
//!
//! A read trusts the cache only while its engine confirmed the epoch
//! within the last `2 × epoch_check_interval`; past that (a stalled
//! process, a cache that does not answer the check) it checks first, and
//! reads the database if the check fails. Hence the bound the README
//! states: a read that starts later than `2 × epoch_check_interval + 2 ×
//! cache_timeout` after the cache forgot never returns an entry of before.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Inner;
use super::stats::Counters;
use super::table::TableState;
use crate::cache::CacheItem;
use crate::codec;
use crate::error::{Error, ErrorKind, Result};
use crate::value::Key;

/// A key written recently: resynced if the epoch changes soon after.
pub(crate) struct Recent {
    at: Instant,
    cache_key: String,
    table: Arc<TableState>,
    key: Key,
}

pub(crate) struct Epochs {
    /// False for in-process caches: they forget only with their process.
    pub(crate) watched: bool,
    key: String,
    current: AtomicU64,
    /// When the epoch was last confirmed, in milliseconds since the
    /// engine started, plus one (0: never).
    confirmed: AtomicU64,
    /// One check at a time; a caller that waited finds the answer fresh.
    check: tokio::sync::Mutex<()>,
    recent: Mutex<VecDeque<Recent>>,
    trust: Duration,
    interval: Duration,
    /// Since when checks fail, in milliseconds since the engine started,
    /// plus one (0: the last check succeeded).
    unreachable: AtomicU64,
}

impl Epochs {
    pub(crate) fn new(watched: bool, namespace: &str, check_interval: Duration) -> Self {
        Epochs {
            watched,
            key: format!("{namespace}:_wt:epoch"),
            current: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            check: tokio::sync::Mutex::new(()),
            recent: Mutex::new(VecDeque::new()),
            trust: check_interval * 2,
            interval: check_interval,
            unreachable: AtomicU64::new(0),
        }
    }

    /// The epoch to prepare entries in: the one this engine knows.
    #[inline]
    pub(crate) fn current(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// How long a confirmation is trusted.
    pub(crate) fn trust(&self) -> Duration {
        self.trust
    }

    fn fresh(&self, started: Instant) -> bool {
        let c = self.confirmed.load(Ordering::Acquire);
        c != 0 && (started.elapsed().as_millis() as u64) < c + self.trust.as_millis() as u64
    }

    /// Remembers a key written now, for the trust window.
    pub(crate) fn wrote(&self, cache_key: &str, table: &Arc<TableState>, key: &Key) {
        if !self.watched {
            return;
        }
        let now = Instant::now();
        let mut r = self.recent.lock();
        while r
            .front()
            .is_some_and(|x| now.duration_since(x.at) > self.trust * 2)
        {
            r.pop_front();
        }
        r.push_back(Recent {
            at: now,
            cache_key: cache_key.to_owned(),
            table: table.clone(),
            key: key.clone(),
        });
    }
}

impl Inner {
    /// The epoch a read may trust entries from, checking the record first
    /// if the last confirmation is too old; `None` when the cache cannot be
    /// trusted now (its epoch could not be checked).
    pub(crate) async fn trusted_epoch(&self) -> Option<u64> {
        let ep = &self.epochs;
        if !ep.watched {
            return Some(0);
        }
        if ep.fresh(self.started) {
            return Some(ep.current());
        }
        match self.check_epoch().await {
            Ok(()) => Some(ep.current()),
            Err(e) => {
                tracing::debug!(error = %e, "cache epoch unconfirmed; reading the database");
                None
            }
        }
    }

    /// The epoch to prepare a write's entries in. Before this engine's
    /// first check it checks once: entries of epoch 0 would only be read
    /// as misses.
    #[inline]
    pub(crate) async fn epoch_for_write(&self) -> u64 {
        let ep = &self.epochs;
        if ep.watched && ep.confirmed.load(Ordering::Acquire) == 0 {
            let _ = self.check_epoch().await;
        }
        ep.current()
    }

    /// Checks the epoch record now if it is due (from the background task).
    pub(crate) async fn check_epoch_if_due(&self, interval: Duration) {
        let ep = &self.epochs;
        if !ep.watched || !self.breaker.allows() {
            return;
        }
        let c = ep.confirmed.load(Ordering::Acquire);
        let now = self.started.elapsed().as_millis() as u64 + 1;
        if c != 0 && now < c + interval.as_millis() as u64 {
            return;
        }
        if let Err(e) = self.check_epoch().await {
            tracing::debug!(error = %e, "cache epoch check failed");
        }
    }

    /// Reads the epoch record and the cache's identity; adopts the record,
    /// or proposes the next epoch when the cache forgot or went back.
    pub(crate) async fn check_epoch(&self) -> Result<()> {
        let ep = &self.epochs;
        let asked = self.started.elapsed();
        let _one = ep.check.lock().await;
        // Someone else checked while this caller waited.
        let c = ep.confirmed.load(Ordering::Acquire);
        if c != 0 && c > asked.as_millis() as u64 + 1 {
            return Ok(());
        }
        let began = self.started.elapsed();
        let began_ms = began.as_millis() as u64 + 1;
        // A cache out of sight for a check interval or more may have missed
        // writes (a server of a ring away, writes failing meanwhile): start
        // a new epoch even if it kept its identity and record.
        let lost = ep.unreachable.load(Ordering::Acquire);
        let force = lost != 0 && began_ms >= lost + ep.interval.as_millis() as u64;
        match self.check_epoch_locked(force).await {
            Ok(()) => {
                ep.unreachable.store(0, Ordering::Release);
                ep.confirmed.store(began_ms, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                if lost == 0 {
                    ep.unreachable.store(began_ms, Ordering::Release);
                }
                Err(e)
            }
        }
    }

    async fn check_epoch_locked(&self, force: bool) -> Result<()> {
        let ep = &self.epochs;
        let identity = self.cache().identity().await?.unwrap_or_default();
        let record = self.cache().get(&ep.key).await?;
        let own = ep.current();
        let found = record.as_deref().and_then(codec::read_epoch_record);
        let adopt = match &found {
            Some((e, id)) if *id == identity && (*e > own || (*e == own && !force)) => *e,
            _ => {
                let seen = found.as_ref().map_or(0, |(e, _)| *e);
                let proposal = own.max(seen) + 1;
                if proposal > codec::MAX_EPOCH {
                    return Err(Error::new(
                        ErrorKind::Backend,
                        "the cache epoch is exhausted; clear the namespace's epoch record",
                    ));
                }
                let item = CacheItem {
                    key: ep.key.clone(),
                    entry: codec::epoch_record(proposal, &identity),
                    version: proposal,
                    ttl: None,
                };
                self.cache().set_if_newer(item).await?;
                let again = self.cache().get(&ep.key).await?;
                match again.as_deref().and_then(codec::read_epoch_record) {
                    Some((e, id)) if id == identity && e >= proposal => e,
                    _ => {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            "the cache's epoch record changed under the check; trying again",
                        ));
                    }
                }
            }
        };
        if adopt != own {
            self.adopt_epoch(own, adopt);
        }
        Ok(())
    }

    fn adopt_epoch(&self, old: u64, new: u64) {
        let ep = &self.epochs;
        ep.current.store(new, Ordering::Release);
        if old == 0 {
            // The first check of this engine: it trusted nothing before.
            return;
        }
        Counters::add(&self.stats.epoch_changes, 1);
        self.metrics.epoch_changes.increment(1);
        tracing::warn!(
            old,
            new,
            "the cache forgot or went back in time; entries of earlier epochs are read as misses"
        );
        // Entries this engine wrote lately may have landed after the cache
        // forgot, in the old epoch: write them again in the new one.
        let recent: Vec<Recent> = ep.recent.lock().drain(..).collect();
        if self.cfg.consistency.resync {
            for r in recent {
                self.flights.forget(&r.cache_key);
                self.resync.mark(&r.cache_key, &r.table, r.key, 0);
            }
        }
        // And outbox records of that window stay for replay, by whichever
        // engine is alive when their grace is over.
        let cutoff = Instant::now().checked_sub(ep.trust).unwrap_or(self.started);
        self.acks.lock().retain(|a| a.at < cutoff);
    }
}
