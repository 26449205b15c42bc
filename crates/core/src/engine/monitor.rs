//! The continuous consistency monitor: a sample of cache hits, looked at
//! again after a settle delay, beside the database.
//!
//! A read that the cache served is offered to the monitor with the
//! configured probability; the sample waits in a bounded queue (a full
//! queue drops it and counts the drop, so the monitor never slows reads
//! down nor grows without bound). After the settle delay, a background
//! task reads the key's row and its entry (with every other sample due by
//! then, in one database and one cache call per table, the samples of
//! 50 ms gathered in one batch) and judges them as
//! an audit does; a disagreement is looked at once more after another settle delay
//! (a write between its commit and its cache write is not a divergence),
//! and only a confirmed one counts. Checks and divergences are counted per
//! table, exported as metrics, and reported by [`crate::Engine::health`]
//! as the measured consistency in nines.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::Inner;
use super::audit::{DivergenceKind, Verdict};
use super::table::TableState;
use crate::error::{Error, ErrorKind, Result};
use crate::value::Key;

/// Settings of the consistency monitor (see [`crate::Config::monitor`]).
///
/// ```
/// use std::time::Duration;
/// use writethrough_core::{Config, MonitorConfig};
///
/// let mut cfg = Config::default();
/// // Re-check one hit in a hundred, two seconds after it was served.
/// cfg.monitor = Some(MonitorConfig::sampling(0.01).settle(Duration::from_secs(2)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct MonitorConfig {
    /// The share of cache hits re-checked, in (0, 1].
    pub sample_rate: f64,
    /// How long after the hit the check looks, and how long it waits before
    /// its second look at a disagreement.
    pub settle: Duration,
    /// Most samples waiting; past it, new samples are dropped (and counted).
    pub queue: usize,
}

impl MonitorConfig {
    /// Re-checks `sample_rate` of the hits, after one second, with at most
    /// 1024 waiting.
    pub fn sampling(sample_rate: f64) -> Self {
        MonitorConfig {
            sample_rate,
            settle: Duration::from_secs(1),
            queue: 1024,
        }
    }

    /// Sets [`MonitorConfig::settle`].
    #[must_use]
    pub fn settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// Sets [`MonitorConfig::queue`].
    #[must_use]
    pub fn queue(mut self, queue: usize) -> Self {
        self.queue = queue;
        self
    }

    pub(crate) fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::new(ErrorKind::Config, format!("monitor: {m}")));
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return bad("sample_rate must be in (0, 1]");
        }
        if self.queue == 0 || self.queue > 1 << 20 {
            return bad("queue must hold 1 to 1048576 samples");
        }
        if self.settle > Duration::from_secs(3600) {
            return bad("settle must be at most an hour");
        }
        Ok(())
    }
}

/// What the monitor measured since the engine started: part of
/// [`crate::Health`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct ConsistencyReport {
    /// Samples checked against the database.
    pub checks: u64,
    /// Of those, confirmed divergences.
    pub divergences: u64,
    /// Samples dropped because the queue was full.
    pub dropped: u64,
    /// The measured consistency in nines, `-log10(divergences / checks)`;
    /// with no divergence yet, the most the checks so far can show,
    /// `log10(checks)`. `None` before the first check.
    pub nines: Option<f64>,
    /// Checks and divergences per table, by name.
    pub tables: BTreeMap<String, (u64, u64)>,
    /// The last divergence seen.
    pub last_divergence: Option<SeenDivergence>,
}

/// A divergence the monitor confirmed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct SeenDivergence {
    /// The table.
    pub table: String,
    /// The key, as text.
    pub key: String,
    /// What was wrong.
    pub kind: DivergenceKind,
    /// How long ago it was confirmed.
    pub ago: Duration,
}

/// The nines of `divergences` in `checks` (see [`ConsistencyReport::nines`]).
fn nines(checks: u64, divergences: u64) -> Option<f64> {
    match (checks, divergences) {
        (0, _) => None,
        (c, 0) => Some((c as f64).log10()),
        (c, d) => Some(-(d as f64 / c as f64).log10()),
    }
}

struct Sample {
    table: String,
    cache_key: String,
    at: Instant,
}

struct Seen {
    table: String,
    key: String,
    kind: DivergenceKind,
    at: Instant,
}

/// The monitor's state in the engine; its task runs apart.
pub(crate) struct Monitor {
    cfg: MonitorConfig,
    tx: mpsc::Sender<Sample>,
    dropped: AtomicU64,
    counts: Mutex<BTreeMap<String, (u64, u64)>>,
    last: Mutex<Option<Seen>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Monitor {
    /// Starts the monitor's task on `runtime`, for the engine `inner` will be.
    pub(crate) fn start(
        cfg: MonitorConfig,
        runtime: &tokio::runtime::Handle,
        inner: Weak<Inner>,
    ) -> Monitor {
        let (tx, rx) = mpsc::channel(cfg.queue);
        let task = runtime.spawn(run(inner, rx, cfg.settle));
        Monitor {
            cfg,
            tx,
            dropped: AtomicU64::new(0),
            counts: Mutex::new(BTreeMap::new()),
            last: Mutex::new(None),
            task: Mutex::new(Some(task)),
        }
    }

    /// Offers a cache hit on `cache_key` of `st`'s table for a check.
    pub(crate) fn offer(&self, st: &TableState, cache_key: &str) {
        if self.cfg.sample_rate < 1.0 && rand::random::<f64>() >= self.cfg.sample_rate {
            return;
        }
        let sample = Sample {
            table: st.table.name().as_str().to_owned(),
            cache_key: cache_key.to_owned(),
            at: Instant::now(),
        };
        if self.tx.try_send(sample).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("writethrough_monitor_dropped_total").increment(1);
        }
    }

    /// Stops the task; samples waiting are not checked.
    pub(crate) fn stop(&self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
    }

    fn record(&self, table: &str, divergence: Option<(Key, DivergenceKind)>) {
        let (checks, divergences) = {
            let mut counts = self.counts.lock();
            let c = counts.entry(table.to_owned()).or_default();
            c.0 += 1;
            c.1 += u64::from(divergence.is_some());
            *c
        };
        metrics::counter!("writethrough_monitor_checks_total", "table" => table.to_owned())
            .increment(1);
        if let Some((key, kind)) = divergence {
            metrics::counter!("writethrough_monitor_divergences_total", "table" => table.to_owned(), "kind" => kind.as_str())
                .increment(1);
            tracing::warn!(table, key = %key, kind = kind.as_str(), "the consistency monitor found a divergence");
            *self.last.lock() = Some(Seen {
                table: table.to_owned(),
                key: key.to_string(),
                kind,
                at: Instant::now(),
            });
        }
        if let Some(n) = nines(checks, divergences) {
            metrics::gauge!("writethrough_monitor_consistency_nines", "table" => table.to_owned())
                .set(n);
        }
    }

    pub(crate) fn report(&self) -> ConsistencyReport {
        let tables = self.counts.lock().clone();
        let (checks, divergences) = tables
            .values()
            .fold((0, 0), |(c, d), (tc, td)| (c + tc, d + td));
        ConsistencyReport {
            checks,
            divergences,
            dropped: self.dropped.load(Ordering::Relaxed),
            nines: nines(checks, divergences),
            tables,
            last_divergence: self.last.lock().as_ref().map(|s| SeenDivergence {
                table: s.table.clone(),
                key: s.key.clone(),
                kind: s.kind,
                ago: s.at.elapsed(),
            }),
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The key a cache key of `st`'s table names.
fn key_of(st: &TableState, cache_key: &str) -> Option<Key> {
    st.key_of_cache_key(cache_key)
}

/// Most samples checked in one batch: one database and one cache call.
const BATCH: usize = 256;
/// How much later than its settle delay a sample may be checked, so that
/// the samples of that span share a batch instead of each waking the task
/// and both stores: at 1% of 400 000 hits a second, one batch instead of
/// two hundred checks.
const GATHER: Duration = Duration::from_millis(50);

async fn run(engine: Weak<Inner>, mut rx: mpsc::Receiver<Sample>, settle: Duration) {
    // A sample taken from the queue before it was due, kept for the next batch.
    let mut early: Option<Sample> = None;
    loop {
        let first = match early.take() {
            Some(s) => s,
            None => match rx.recv().await {
                Some(s) => s,
                None => return,
            },
        };
        tokio::time::sleep_until((first.at + settle + GATHER).into()).await;
        // Everything else already due joins the batch: under load one
        // round trip per store checks many samples.
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(s) if s.at + settle <= Instant::now() => batch.push(s),
                Ok(s) => {
                    early = Some(s);
                    break;
                }
                Err(_) => break,
            }
        }
        let Some(inner) = engine.upgrade() else {
            return;
        };
        check_batch(&inner, batch, settle).await;
    }
}

/// Checks samples, table by table; a disagreement gets a second look
/// after `settle`, and only a confirmed one counts. A check that cannot
/// read both stores counts for nothing.
async fn check_batch(inner: &Inner, batch: Vec<Sample>, settle: Duration) {
    let Some(monitor) = inner.monitor.as_ref() else {
        return;
    };
    let mut by_table: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in batch {
        by_table.entry(s.table).or_default().push(s.cache_key);
    }
    let mut suspects = Vec::new();
    for (table, cks) in by_table {
        let Some(st) = inner.table_state(&table) else {
            continue;
        };
        let (cks, keys): (Vec<String>, Vec<Key>) = cks
            .into_iter()
            .filter_map(|ck| key_of(&st, &ck).map(|k| (ck, k)))
            .unzip();
        let Ok(rows) = inner.db().get_many(&st.table, &keys).await else {
            continue;
        };
        let Ok(entries) = inner.cache().get_many(&cks).await else {
            continue;
        };
        for ((key, row), entry) in keys.into_iter().zip(&rows).zip(&entries) {
            match inner.verdict(&st, row.as_ref(), entry.as_deref()) {
                Verdict::Divergent(_) => suspects.push((st.clone(), key)),
                _ => monitor.record(&table, None),
            }
        }
    }
    if suspects.is_empty() {
        return;
    }
    tokio::time::sleep(settle).await;
    for (st, key) in suspects {
        if let Ok(again) = inner.recheck(&st, &key).await {
            let table = st.table.name().as_str();
            monitor.record(table, again.map(|(d, _)| (key, d.kind)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_are_measured_or_bounded_by_the_checks() {
        assert_eq!(nines(0, 0), None);
        assert_eq!(nines(1000, 0), Some(3.0));
        assert_eq!(nines(1000, 1), Some(3.0));
        assert_eq!(nines(100, 10), Some(1.0));
    }

    #[test]
    fn rates_outside_the_unit_interval_and_empty_queues_are_refused() {
        for rate in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(MonitorConfig::sampling(rate).check().is_err(), "{rate}");
        }
        assert!(MonitorConfig::sampling(1.0).queue(0).check().is_err());
        assert!(MonitorConfig::sampling(0.01).check().is_ok());
    }
}
