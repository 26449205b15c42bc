//! Metrics through the `metrics` facade, and the latency histograms behind
//! the health report.
//!
//! Handles are registered once (per engine for backend calls, per table for
//! operations), so the hot path only bumps them. Install your recorder
//! (Prometheus, OpenTelemetry, ...) before building the engine: handles
//! registered before a recorder exists stay no-ops.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `writethrough_operations_total` | counter | op, table, outcome (hit, miss, ok, rejected — bad input —, error), cache, db |
//! | `writethrough_operation_seconds` | histogram | op, table, cache, db |
//! | `writethrough_cache_hits_total`, `writethrough_cache_misses_total` | counter | table, cache |
//! | `writethrough_cache_call_seconds` | histogram (not for in-process caches) | call, backend |
//! | `writethrough_cache_call_errors_total` | counter | call, backend |
//! | `writethrough_db_call_seconds` | histogram | call, backend |
//! | `writethrough_db_call_errors_total` | counter | call, backend |
//! | `writethrough_breaker_state` | gauge (0 closed, 1 half-open, 2 open) | backend |
//! | `writethrough_breaker_trips_total` | counter | backend |
//! | `writethrough_resync_pending` | gauge | backend |
//! | `writethrough_stale_refused_total` | counter | backend |
//! | `writethrough_outbox_replayed_total` | counter | db |
//! | `writethrough_external_repaired_total` | counter | db |
//! | `writethrough_epoch_changes_total` | counter | backend |
//! | `writethrough_late_effects_total` | counter | backend |
//! | `writethrough_consistency_violations_total` | counter | table |

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use super::shard::{SHARDS, Sharded, shard};

/// A cache backend call the engine makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheCall {
    Get,
    GetMany,
    Set,
    SetMany,
    SetIfNewer,
    SetManyIfNewer,
    ReplaceIfUnchanged,
    Delete,
    Clear,
    ScanKeys,
    Ping,
    Identity,
}

impl CacheCall {
    const ALL: [CacheCall; 12] = [
        CacheCall::Get,
        CacheCall::GetMany,
        CacheCall::Set,
        CacheCall::SetMany,
        CacheCall::SetIfNewer,
        CacheCall::SetManyIfNewer,
        CacheCall::ReplaceIfUnchanged,
        CacheCall::Delete,
        CacheCall::Clear,
        CacheCall::ScanKeys,
        CacheCall::Ping,
        CacheCall::Identity,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            CacheCall::Get => "cache.get",
            CacheCall::GetMany => "cache.get_many",
            CacheCall::Set => "cache.set",
            CacheCall::SetMany => "cache.set_many",
            CacheCall::SetIfNewer => "cache.set_if_newer",
            CacheCall::SetManyIfNewer => "cache.set_many_if_newer",
            CacheCall::ReplaceIfUnchanged => "cache.replace_if_unchanged",
            CacheCall::Delete => "cache.delete",
            CacheCall::Clear => "cache.clear",
            CacheCall::ScanKeys => "cache.scan_keys",
            CacheCall::Ping => "cache.ping",
            CacheCall::Identity => "cache.identity",
        }
    }
}

/// A database backend call the engine makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DbCall {
    Get,
    GetMany,
    Scan,
    Sample,
    Count,
    Execute,
    Begin,
    Apply,
    Commit,
    Rollback,
    EnsureTable,
    OutboxPending,
    OutboxRemove,
    Ping,
    TrackExternal,
    ExternalChanges,
}

impl DbCall {
    const ALL: [DbCall; 16] = [
        DbCall::Get,
        DbCall::GetMany,
        DbCall::Scan,
        DbCall::Sample,
        DbCall::Count,
        DbCall::Execute,
        DbCall::Begin,
        DbCall::Apply,
        DbCall::Commit,
        DbCall::Rollback,
        DbCall::EnsureTable,
        DbCall::OutboxPending,
        DbCall::OutboxRemove,
        DbCall::Ping,
        DbCall::TrackExternal,
        DbCall::ExternalChanges,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            DbCall::Get => "db.get",
            DbCall::GetMany => "db.get_many",
            DbCall::Scan => "db.scan",
            DbCall::Sample => "db.sample",
            DbCall::Count => "db.count",
            DbCall::Execute => "db.execute",
            DbCall::Begin => "db.begin",
            DbCall::Apply => "db.apply",
            DbCall::Commit => "db.commit",
            DbCall::Rollback => "db.rollback",
            DbCall::EnsureTable => "db.ensure_table",
            DbCall::OutboxPending => "db.outbox_pending",
            DbCall::OutboxRemove => "db.outbox_remove",
            DbCall::Ping => "db.ping",
            DbCall::TrackExternal => "db.track_external",
            DbCall::ExternalChanges => "db.external_changes",
        }
    }
}

struct CallHandles {
    seconds: Histogram,
    errors: Counter,
}

/// A lock-free latency histogram: buckets a quarter of a power of two wide
/// (about 19 % apart), from 1 µs to about 70 s. Good enough for a p99 in a
/// health report, at the cost of one atomic add per operation.
pub(crate) struct LatencyHistogram {
    /// One row of buckets per shard, so threads do not share cache lines.
    buckets: [[AtomicU64; BUCKETS]; SHARDS],
}

const BUCKETS: usize = 4 * 26;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl LatencyHistogram {
    fn bucket(d: Duration) -> usize {
        let us = d.as_micros().max(1) as u64;
        let log2 = 63 - us.leading_zeros() as usize;
        let quarter = if log2 >= 2 {
            ((us >> (log2 - 2)) & 3) as usize
        } else {
            0
        };
        (log2 * 4 + quarter).min(BUCKETS - 1)
    }

    fn upper_bound(b: usize) -> Duration {
        let (log2, quarter) = (b / 4, (b % 4) as u64);
        let base = 1u64 << log2;
        if log2 < 2 {
            // Below 4 µs a bucket is a whole octave.
            return Duration::from_micros(2 * base - 1);
        }
        Duration::from_micros(base + base * (quarter + 1) / 4)
    }

    pub(crate) fn record(&self, d: Duration) {
        self.buckets[shard()][Self::bucket(d)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts per bucket, to subtract an earlier snapshot from a later one.
    pub(crate) fn snapshot(&self) -> Vec<u64> {
        (0..BUCKETS)
            .map(|b| {
                self.buckets
                    .iter()
                    .map(|row| row[b].load(Ordering::Relaxed))
                    .sum()
            })
            .collect()
    }

    /// The `q` quantile (0..=1) of the counts `now - before`, as the upper
    /// bound of its bucket; zero when nothing was recorded.
    pub(crate) fn quantile(now: &[u64], before: &[u64], q: f64) -> (u64, Duration) {
        let counts: Vec<u64> = now
            .iter()
            .zip(before.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return (0, Duration::ZERO);
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return (total, Self::upper_bound(b));
            }
        }
        (total, Self::upper_bound(BUCKETS - 1))
    }
}

/// The engine's own metric handles.
pub(crate) struct EngineMetrics {
    cache_calls: Vec<CallHandles>,
    db_calls: Vec<CallHandles>,
    pub(crate) breaker_state: Gauge,
    pub(crate) breaker_trips: Counter,
    pub(crate) resync_pending: Gauge,
    pub(crate) stale_refused: Counter,
    pub(crate) replayed: Counter,
    pub(crate) external_repaired: Counter,
    pub(crate) epoch_changes: Counter,
    pub(crate) late_effects: Counter,
    pub(crate) cache_calls_total: Sharded,
    pub(crate) cache_errors_total: Sharded,
    pub(crate) db_calls_total: Sharded,
    pub(crate) db_errors_total: Sharded,
    pub(crate) reads: LatencyHistogram,
    pub(crate) writes: LatencyHistogram,
}

impl EngineMetrics {
    pub(crate) fn new(cache: &'static str, db: &'static str) -> Self {
        let cache_calls = CacheCall::ALL
            .iter()
            .map(|c| CallHandles {
                seconds: histogram!("writethrough_cache_call_seconds", "call" => c.name(), "backend" => cache),
                errors: counter!("writethrough_cache_call_errors_total", "call" => c.name(), "backend" => cache),
            })
            .collect();
        let db_calls = DbCall::ALL
            .iter()
            .map(|c| CallHandles {
                seconds: histogram!("writethrough_db_call_seconds", "call" => c.name(), "backend" => db),
                errors: counter!("writethrough_db_call_errors_total", "call" => c.name(), "backend" => db),
            })
            .collect();
        EngineMetrics {
            cache_calls,
            db_calls,
            breaker_state: gauge!("writethrough_breaker_state", "backend" => cache),
            breaker_trips: counter!("writethrough_breaker_trips_total", "backend" => cache),
            resync_pending: gauge!("writethrough_resync_pending", "backend" => cache),
            stale_refused: counter!("writethrough_stale_refused_total", "backend" => cache),
            replayed: counter!("writethrough_outbox_replayed_total", "db" => db),
            external_repaired: counter!("writethrough_external_repaired_total", "db" => db),
            epoch_changes: counter!("writethrough_epoch_changes_total", "backend" => cache),
            late_effects: counter!("writethrough_late_effects_total", "backend" => cache),
            cache_calls_total: Sharded::default(),
            cache_errors_total: Sharded::default(),
            db_calls_total: Sharded::default(),
            db_errors_total: Sharded::default(),
            reads: LatencyHistogram::default(),
            writes: LatencyHistogram::default(),
        }
    }

    /// Records a cache call; `took` is `None` for in-process caches, whose
    /// calls are not timed.
    pub(crate) fn cache_call(&self, call: CacheCall, took: Option<Duration>, ok: bool) {
        let h = &self.cache_calls[call as usize];
        if let Some(took) = took {
            h.seconds.record(took.as_secs_f64());
        }
        self.cache_calls_total.add(1);
        if !ok {
            h.errors.increment(1);
            self.cache_errors_total.add(1);
        }
    }

    pub(crate) fn db_call(&self, call: DbCall, took: Duration, ok: bool) {
        let h = &self.db_calls[call as usize];
        h.seconds.record(took.as_secs_f64());
        self.db_calls_total.add(1);
        if !ok {
            h.errors.increment(1);
            self.db_errors_total.add(1);
        }
    }
}

/// An operation on a table, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Get,
    Put,
    PutMany,
    Update,
    Delete,
    GetMany,
    DeleteMany,
    Insert,
    Invalidate,
}

impl OpKind {
    const NAMES: [&'static str; 9] = [
        "get",
        "put",
        "put_many",
        "update",
        "delete",
        "get_many",
        "delete_many",
        "insert",
        "invalidate",
    ];

    pub(crate) fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// Whether it reads (its latency is a read's).
    pub(crate) fn reads(self) -> bool {
        matches!(self, OpKind::Get | OpKind::GetMany)
    }
}

struct OpHandles {
    ok: Counter,
    rejected: Counter,
    error: Counter,
    seconds: Histogram,
}

/// How an operation ended, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpOutcome {
    /// It succeeded.
    Ok,
    /// Bad input, refused before any side effect: not a failure of the system.
    Rejected,
    /// It failed.
    Error,
}

/// A table's metric handles.
pub(crate) struct TableMetrics {
    ops: [OpHandles; 9],
    get_hit: Counter,
    get_miss: Counter,
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) violations: Counter,
}

impl TableMetrics {
    pub(crate) fn new(table: &str, cache: &'static str, db: &'static str) -> Self {
        let t = table.to_owned();
        let op = |op: &'static str| OpHandles {
            ok: counter!("writethrough_operations_total", "op" => op, "table" => t.clone(), "outcome" => "ok", "cache" => cache, "db" => db),
            rejected: counter!("writethrough_operations_total", "op" => op, "table" => t.clone(), "outcome" => "rejected", "cache" => cache, "db" => db),
            error: counter!("writethrough_operations_total", "op" => op, "table" => t.clone(), "outcome" => "error", "cache" => cache, "db" => db),
            seconds: histogram!("writethrough_operation_seconds", "op" => op, "table" => t.clone(), "cache" => cache, "db" => db),
        };
        TableMetrics {
            ops: OpKind::NAMES.map(op),
            get_hit: counter!("writethrough_operations_total", "op" => "get", "table" => t.clone(), "outcome" => "hit", "cache" => cache, "db" => db),
            get_miss: counter!("writethrough_operations_total", "op" => "get", "table" => t.clone(), "outcome" => "miss", "cache" => cache, "db" => db),
            hits: counter!("writethrough_cache_hits_total", "table" => t.clone(), "cache" => cache),
            misses: counter!("writethrough_cache_misses_total", "table" => t.clone(), "cache" => cache),
            violations: counter!("writethrough_consistency_violations_total", "table" => t),
        }
    }

    /// Records a finished operation; for reads, `hit` says where it was served from.
    pub(crate) fn op(&self, kind: OpKind, took: Duration, outcome: OpOutcome, hit: Option<bool>) {
        let h = &self.ops[kind as usize];
        h.seconds.record(took.as_secs_f64());
        match outcome {
            OpOutcome::Ok => h.ok.increment(1),
            OpOutcome::Rejected => h.rejected.increment(1),
            OpOutcome::Error => h.error.increment(1),
        }
        match hit {
            Some(true) => self.get_hit.increment(1),
            Some(false) => self.get_miss.increment(1),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_bound_their_values_within_a_quarter_octave() {
        for us in [1u64, 2, 3, 5, 17, 100, 999, 12_345, 1_000_000, 60_000_000] {
            let d = Duration::from_micros(us);
            let b = LatencyHistogram::bucket(d);
            let ub = LatencyHistogram::upper_bound(b);
            assert!(ub >= d, "{us}: {ub:?}");
            assert!(
                ub.as_micros() as f64 <= (us as f64) * 1.26 + 1.0,
                "{us}: {ub:?}"
            );
        }
    }

    #[test]
    fn quantiles_come_from_the_difference_of_snapshots() {
        let h = LatencyHistogram::default();
        for _ in 0..98 {
            h.record(Duration::from_micros(100));
        }
        let before = h.snapshot();
        for _ in 0..99 {
            h.record(Duration::from_micros(10));
        }
        h.record(Duration::from_millis(50));
        let now = h.snapshot();
        let (n, p50) = LatencyHistogram::quantile(&now, &before, 0.5);
        assert_eq!(n, 100);
        assert!(p50 >= Duration::from_micros(10) && p50 < Duration::from_micros(13));
        let (_, p99) = LatencyHistogram::quantile(&now, &before, 0.99);
        assert!(p99 < Duration::from_micros(13), "{p99:?}");
        let (_, max) = LatencyHistogram::quantile(&now, &before, 1.0);
        assert!(max >= Duration::from_millis(50));
    }
}

/// The engine's health over a window: what [`crate::Engine::health`] reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct Health {
    /// The cache circuit breaker's state.
    pub breaker: super::BreakerState,
    /// How many times the breaker opened since the engine started.
    pub breaker_trips: u64,
    /// Keys waiting to be resynced into the cache.
    pub pending_resync: usize,
    /// The window these figures cover: since the previous report (or the start).
    pub window: Duration,
    /// Reads and writes finished in the window.
    pub operations: u64,
    /// Operations per second over the window.
    pub throughput: f64,
    /// Median read latency in the window (upper bound of its histogram bucket).
    pub read_p50: Duration,
    /// 99th percentile read latency in the window.
    pub read_p99: Duration,
    /// Median write latency in the window.
    pub write_p50: Duration,
    /// 99th percentile write latency in the window.
    pub write_p99: Duration,
    /// Failed cache calls over all cache calls in the window (0 when none).
    pub cache_failure_rate: f64,
    /// Failed database calls over all database calls in the window.
    pub db_failure_rate: f64,
    /// Time since the engine was built.
    pub uptime: Duration,
    /// What the consistency monitor measured since the engine started
    /// (not only in the window); `None` when it is off.
    pub consistency: Option<super::ConsistencyReport>,
}

/// A health window of its own: each [`HealthMonitor`] reports what
/// happened since *its* previous report, so several readers (a load
/// balancer's probe, a dashboard) do not shorten each other's windows.
pub struct HealthMonitor {
    pub(crate) engine: crate::Engine,
    pub(crate) mark: HealthMark,
}

impl std::fmt::Debug for HealthMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthMonitor").finish_non_exhaustive()
    }
}

/// Counter values at the previous health report.
pub(crate) struct HealthMark {
    at: std::time::Instant,
    reads: Vec<u64>,
    writes: Vec<u64>,
    cache: (u64, u64),
    db: (u64, u64),
}

impl HealthMark {
    pub(crate) fn new() -> Self {
        HealthMark {
            at: std::time::Instant::now(),
            reads: Vec::new(),
            writes: Vec::new(),
            cache: (0, 0),
            db: (0, 0),
        }
    }
}

impl EngineMetrics {
    /// Figures since `mark`, which then moves to now.
    pub(crate) fn window(&self, mark: &mut HealthMark) -> (Duration, u64, [Duration; 4], f64, f64) {
        let now = std::time::Instant::now();
        let reads = self.reads.snapshot();
        let writes = self.writes.snapshot();
        let (nr, r50) = LatencyHistogram::quantile(&reads, &mark.reads, 0.5);
        let (_, r99) = LatencyHistogram::quantile(&reads, &mark.reads, 0.99);
        let (nw, w50) = LatencyHistogram::quantile(&writes, &mark.writes, 0.5);
        let (_, w99) = LatencyHistogram::quantile(&writes, &mark.writes, 0.99);
        let load = |a: &Sharded| a.get();
        let cache = (
            load(&self.cache_calls_total),
            load(&self.cache_errors_total),
        );
        let db = (load(&self.db_calls_total), load(&self.db_errors_total));
        let rate = |now: (u64, u64), then: (u64, u64)| {
            let calls = now.0.saturating_sub(then.0);
            if calls == 0 {
                0.0
            } else {
                now.1.saturating_sub(then.1) as f64 / calls as f64
            }
        };
        let out = (
            now - mark.at,
            nr + nw,
            [r50, r99, w50, w99],
            rate(cache, mark.cache),
            rate(db, mark.db),
        );
        *mark = HealthMark {
            at: now,
            reads,
            writes,
            cache,
            db,
        };
        out
    }
}

impl HealthMonitor {
    /// The report over the window since this monitor's previous report.
    pub fn report(&mut self) -> Health {
        let engine = self.engine.clone();
        engine.health_over(&mut self.mark)
    }
}
