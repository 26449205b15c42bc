//! The engine's background work: probing the cache when the breaker is
//! open, resyncing keys whose cache writes failed, removing applied outbox
//! records, and replaying the outbox records a crash left behind.

use std::sync::Weak;
use std::time::{Duration, Instant};

use super::Inner;
use super::stats::Counters;
use crate::error::{Error, ErrorKind, Result};

/// How often the background task wakes up.
const TICK: Duration = Duration::from_millis(50);
/// Outbox records replayed per database round trip.
const REPLAY_BATCH: usize = 512;

/// What a reconcile pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// Outbox records whose cache effect was re-applied and which were removed.
    pub replayed: usize,
}

pub(crate) async fn run(engine: Weak<Inner>) {
    let started = Instant::now();
    let mut next_reconcile = started;
    let mut first_pass = true;
    loop {
        tokio::time::sleep(TICK).await;
        let Some(inner) = engine.upgrade() else {
            return;
        };
        inner.flights.sweep();
        inner
            .check_epoch_if_due(inner.cfg.epoch_check_interval)
            .await;
        inner.probe_if_due().await;
        inner.resync_pass().await;
        inner.metrics.resync_pending.set(inner.resync.len() as f64);
        if let Err(e) = inner.flush_acks(false).await {
            tracing::debug!(error = %e, "could not remove applied outbox records");
        }
        if let Some(every) = inner.cfg.reconcile_interval
            && Instant::now() >= next_reconcile
        {
            // The first pass replays everything made before this engine
            // started: records a crashed process left behind may be younger
            // than the grace period. Records younger than that are this
            // engine's writes in flight (or a live peer's), which their
            // writers complete; replaying them would only race those writes.
            let min_age = if first_pass {
                started.elapsed().min(inner.cfg.outbox_grace)
            } else {
                inner.cfg.outbox_grace
            };
            match inner.reconcile(min_age).await {
                Ok(r) if r.replayed > 0 => {
                    tracing::info!(replayed = r.replayed, "replayed outbox records");
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "outbox replay deferred"),
            }
            first_pass = false;
            next_reconcile = Instant::now() + every;
        }
    }
}

impl Inner {
    /// When the breaker's open time is up: probe the cache, resync what was
    /// written meanwhile, and close the breaker only if both succeed.
    async fn probe_if_due(&self) {
        if !self.breaker.probe_due() {
            return;
        }
        self.metrics.breaker_state.set(1.0);
        let ok = self.cache().ping().await.is_ok() && self.resync_all().await;
        if ok {
            self.breaker.close();
            self.metrics.breaker_state.set(0.0);
        } else {
            self.breaker.reopen();
            self.metrics.breaker_state.set(2.0);
        }
    }

    /// Resyncs the keys whose cache writes failed, if the breaker is closed.
    pub(crate) async fn resync_pass(&self) {
        if !self.resync.is_empty() && self.breaker.allows() {
            self.resync_all().await;
        }
    }

    /// One resync pass regardless of the breaker: re-reads each row and
    /// writes it with the fence (or a tombstone if it is gone). True if
    /// nothing failed.
    async fn resync_all(&self) -> bool {
        if self.resync.overflowed() {
            let generation = self.resync.current_generation();
            let prefix = format!("{}:", self.cfg.namespace);
            if self.cache().clear(&prefix).await.is_err() {
                return false;
            }
            self.resync.cleared(generation);
        }
        for d in self.resync.batch(usize::MAX) {
            let epoch = self.epoch_for_write().await;
            let read_at = Instant::now();
            let Ok(row) = self.db().get(&d.table.table, &d.key).await else {
                return false;
            };
            if !self.timely(read_at) {
                // Stalled between the read and the write: read again next pass.
                return false;
            }
            if self
                .repair(&d.table, &d.cache_key, row, d.version, epoch)
                .await
                .is_err()
            {
                return false;
            }
            self.resync.done(&d);
            Counters::add(&self.stats.resynced, 1);
        }
        true
    }

    /// Whether a cache write prepared from a database read at `read_at`
    /// may still be sent (see `Config::write_deadline`).
    pub(crate) fn timely(&self, read_at: Instant) -> bool {
        !self.epochs.watched || read_at.elapsed() <= self.cfg.effective_write_deadline()
    }

    /// Removes the outbox records of applied cache effects. Unless `all`,
    /// records younger than the epoch trust window stay a while: if the
    /// cache turns out to have forgotten meanwhile, they are replayed.
    pub(crate) async fn flush_acks(&self, all: bool) -> Result<()> {
        let ids: Vec<i64> = {
            let mut acks = self.acks.lock();
            if all || !self.epochs.watched {
                acks.drain(..).map(|a| a.id).collect()
            } else {
                let cutoff = Instant::now().checked_sub(self.epochs.trust());
                let (old, young): (Vec<_>, Vec<_>) = std::mem::take(&mut *acks)
                    .into_iter()
                    .partition(|a| cutoff.is_some_and(|c| a.at <= c));
                *acks = young;
                old.into_iter().map(|a| a.id).collect()
            }
        };
        if ids.is_empty() {
            return Ok(());
        }
        // On failure the records stay; a reconciler replays them
        // (harmlessly) and removes them.
        self.db().outbox_remove(ids).await
    }

    /// Re-applies the cache effect of every outbox record at least `min_age`
    /// old, then removes them. Replaying is idempotent: it writes the row's
    /// current state with the fence, exactly as a read would.
    pub(crate) async fn reconcile(&self, min_age: Duration) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        if self.tables.read().is_empty() {
            return Ok(report);
        }
        if !self.breaker.allows() {
            return Err(Error::new(
                ErrorKind::CircuitOpen,
                "the cache is not being called; outbox records wait",
            ));
        }
        // Only this engine's tables: records of tables it does not know are
        // left to the engines that cache them.
        let tables: Vec<String> = self.tables.read().keys().cloned().collect();
        loop {
            let entries = self
                .db()
                .outbox_pending(Some(&tables), min_age, REPLAY_BATCH)
                .await?;
            let n = entries.len();
            let mut ids = Vec::with_capacity(n);
            for e in entries {
                if let Some(st) = self.table_state(&e.table) {
                    let ck = st.cache_key(&e.key);
                    let epoch = self.epoch_for_write().await;
                    let read_at = Instant::now();
                    let row = self.db().get(&st.table, &e.key).await?;
                    if !self.timely(read_at) {
                        return Err(Error::new(
                            ErrorKind::Timeout,
                            "outbox replay stalled past the write deadline; it resumes next pass",
                        ));
                    }
                    self.repair(&st, &ck, row, e.version, epoch).await?;
                }
                ids.push(e.id);
            }
            if !ids.is_empty() {
                self.db().outbox_remove(ids).await?;
            }
            report.replayed += n;
            Counters::add(&self.stats.replayed, n as u64);
            self.metrics.replayed.increment(n as u64);
            if n < REPLAY_BATCH {
                return Ok(report);
            }
        }
    }
}
