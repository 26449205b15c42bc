//! The cache circuit breaker and the set of keys waiting for resync.
//!
//! When cache calls keep failing the breaker opens: the engine stops calling
//! the cache, serves reads from the database and writes to the database
//! only, remembering every key it wrote. After `open_for` one probe is let
//! through; if the cache answers, every remembered key is resynced (its
//! current row re-read from the database and written with the fence) before
//! the breaker closes. Until a key is resynced, reads of it in this process
//! skip the cache, so a cache that comes back with old entries (a paused
//! server, a partition) never serves them here.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use super::config::BreakerConfig;
use super::table::TableState;
use crate::value::Key;

/// The breaker's state, as the health report shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// The cache is called.
    Closed,
    /// The cache is not called until the next probe.
    Open,
    /// A probe is checking the cache, and the keys written meanwhile are being resynced.
    HalfOpen,
}

impl BreakerState {
    /// A short name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

pub(crate) struct Breaker {
    cfg: BreakerConfig,
    /// Fast path for the read and write paths: is the breaker anything but closed?
    tripped: AtomicBool,
    failures: AtomicU32,
    state: Mutex<(BreakerState, Instant)>,
    opened_total: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(cfg: BreakerConfig) -> Self {
        Breaker {
            cfg,
            tripped: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            state: Mutex::new((BreakerState::Closed, Instant::now())),
            opened_total: AtomicU64::new(0),
        }
    }

    /// Whether the cache may be called.
    pub(crate) fn allows(&self) -> bool {
        !self.tripped.load(Ordering::Acquire)
    }

    pub(crate) fn state(&self) -> BreakerState {
        self.state.lock().0
    }

    pub(crate) fn times_opened(&self) -> u64 {
        self.opened_total.load(Ordering::Relaxed)
    }

    pub(crate) fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; returns true if it opened the breaker.
    pub(crate) fn record_failure(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n < self.cfg.failure_threshold {
            return false;
        }
        let mut st = self.state.lock();
        if st.0 == BreakerState::Closed {
            *st = (BreakerState::Open, Instant::now() + self.cfg.open_for);
            self.tripped.store(true, Ordering::Release);
            self.opened_total.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(failures = n, "cache circuit breaker opened");
            return true;
        }
        false
    }

    /// If the breaker is open and its time is up, moves it to half-open and
    /// returns true: the caller must probe, then [`Breaker::close`] or [`Breaker::reopen`].
    pub(crate) fn probe_due(&self) -> bool {
        let mut st = self.state.lock();
        if st.0 == BreakerState::Open && Instant::now() >= st.1 {
            st.0 = BreakerState::HalfOpen;
            return true;
        }
        false
    }

    pub(crate) fn close(&self) {
        let mut st = self.state.lock();
        *st = (BreakerState::Closed, Instant::now());
        self.failures.store(0, Ordering::Relaxed);
        self.tripped.store(false, Ordering::Release);
        tracing::info!("cache circuit breaker closed");
    }

    pub(crate) fn reopen(&self) {
        let mut st = self.state.lock();
        *st = (BreakerState::Open, Instant::now() + self.cfg.open_for);
        self.tripped.store(true, Ordering::Release);
    }
}

/// A key whose cache entry may be stale, and what is needed to repair it.
#[derive(Clone)]
pub(crate) struct Dirty {
    pub(crate) cache_key: String,
    pub(crate) table: Arc<TableState>,
    pub(crate) key: Key,
    /// The version of the failed write, or 0 if unknown (a commit in doubt).
    pub(crate) version: u64,
    pub(crate) generation: u64,
}

/// Keys whose cache write failed, waiting for resync.
pub(crate) struct ResyncSet {
    map: Mutex<HashMap<String, Dirty>>,
    len: AtomicUsize,
    /// Generation at which the set overflowed, or 0. While set, every read
    /// skips the cache; resync then clears the engine's whole namespace.
    overflow: AtomicU64,
    generation: AtomicU64,
    max: usize,
}

impl ResyncSet {
    pub(crate) fn new(max: usize) -> Self {
        ResyncSet {
            map: Mutex::new(HashMap::new()),
            len: AtomicUsize::new(0),
            overflow: AtomicU64::new(0),
            generation: AtomicU64::new(1),
            max,
        }
    }

    pub(crate) fn mark(&self, cache_key: &str, table: &Arc<TableState>, key: Key, version: u64) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel);
        let mut map = self.map.lock();
        if map.len() >= self.max && !map.contains_key(cache_key) {
            let _ =
                self.overflow
                    .compare_exchange(0, generation, Ordering::AcqRel, Ordering::Acquire);
            return;
        }
        let version = map
            .get(cache_key)
            .map_or(version, |d| d.version.max(version));
        map.insert(
            cache_key.to_owned(),
            Dirty {
                cache_key: cache_key.to_owned(),
                table: table.clone(),
                key,
                version,
                generation,
            },
        );
        self.len.store(map.len(), Ordering::Release);
    }

    /// Whether reads of `cache_key` must skip the cache.
    pub(crate) fn contains(&self, cache_key: &str) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return self.overflowed();
        }
        self.overflowed() || self.map.lock().contains_key(cache_key)
    }

    pub(crate) fn overflowed(&self) -> bool {
        self.overflow.load(Ordering::Acquire) != 0
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0 && !self.overflowed()
    }

    /// The generation a resync pass starts at: marks made later survive it.
    pub(crate) fn current_generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn batch(&self, limit: usize) -> Vec<Dirty> {
        self.map.lock().values().take(limit).cloned().collect()
    }

    /// Forgets `d` unless the key was marked again since `d` was taken.
    pub(crate) fn done(&self, d: &Dirty) {
        let mut map = self.map.lock();
        if map
            .get(&d.cache_key)
            .is_some_and(|x| x.generation == d.generation)
        {
            map.remove(&d.cache_key);
        }
        self.len.store(map.len(), Ordering::Release);
    }

    /// After the namespace was cleared: forgets every mark older than `generation`.
    pub(crate) fn cleared(&self, generation: u64) {
        let mut map = self.map.lock();
        map.retain(|_, d| d.generation >= generation);
        self.len.store(map.len(), Ordering::Release);
        let of = self.overflow.load(Ordering::Acquire);
        if of != 0 && of < generation {
            let _ = self
                .overflow
                .compare_exchange(of, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_breaker_opens_after_the_threshold_and_probes_after_open_for() {
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_millis(20),
        });
        assert!(!b.record_failure());
        b.record_success();
        assert!(!b.record_failure());
        assert!(!b.record_failure());
        assert!(b.record_failure());
        assert!(!b.allows());
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.probe_due());
        std::thread::sleep(Duration::from_millis(25));
        assert!(b.probe_due());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.allows());
        b.close();
        assert!(b.allows());
        assert_eq!(b.times_opened(), 1);
    }
}
