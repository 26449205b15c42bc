//! Engine settings.

use std::time::Duration;

use crate::codec::Codec;
use crate::error::{Error, ErrorKind, Result};

/// The consistency mechanisms, each of which can be switched off to trade
/// a guarantee for speed (and so that the race tests can show what each one
/// prevents). [`Consistency::default`] switches everything on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Consistency {
    /// Cache writes carry the row's version and land only if newer
    /// (races R1, R2, R5), and deletes leave versioned tombstones (R6).
    /// Off: plain SETs and DELs.
    pub fence: bool,
    /// Every write records its cache effect in an outbox table in the same
    /// transaction; a reconciler replays what a crash left unapplied (R3).
    pub outbox: bool,
    /// Concurrent misses on one key in this process share one load (R7).
    pub single_flight: bool,
    /// Keys whose cache write failed after the commit, or whose commit's
    /// outcome is unknown (R4), are remembered: reads in this process skip
    /// the cache for them until a resync re-reads the row and rewrites the
    /// entry. Off: such failures are only logged, and the old entry is
    /// served until its TTL ends.
    pub resync: bool,
    /// Entries carry the cache epoch they were prepared in; the engine
    /// watches the cache's epoch record and identity, moves to a new epoch
    /// when the cache forgot or went back in time (a restart, a flush, a
    /// restore from a snapshot, a failover), and reads entries of earlier
    /// epochs as misses; committed writes whose cache effect is later than
    /// [`Config::write_deadline`] re-read their rows instead. Off: a cache
    /// that forgot is trusted as it is. In-process caches are never watched.
    pub epochs: bool,
}

impl Default for Consistency {
    fn default() -> Self {
        Consistency {
            fence: true,
            outbox: true,
            single_flight: true,
            resync: true,
            epochs: true,
        }
    }
}

impl Consistency {
    /// Everything on: fenced writes, tombstones, the outbox, single flight.
    pub fn strict() -> Self {
        Self::default()
    }

    /// Fenced and single-flight, without the outbox: one statement less per
    /// write, but a crash between commit and cache write can leave a stale
    /// entry until its TTL ends.
    pub fn fenced() -> Self {
        Consistency {
            outbox: false,
            ..Self::default()
        }
    }

    /// Nothing on: the textbook write-through that the races break. For
    /// benchmarks and demonstrations; failures are still retried, and the
    /// breaker still protects the cache.
    pub fn none() -> Self {
        Consistency {
            fence: false,
            outbox: false,
            single_flight: false,
            resync: false,
            epochs: false,
        }
    }

    /// Sets [`Consistency::fence`].
    #[must_use]
    pub fn fence(mut self, on: bool) -> Self {
        self.fence = on;
        self
    }

    /// Sets [`Consistency::outbox`].
    #[must_use]
    pub fn outbox(mut self, on: bool) -> Self {
        self.outbox = on;
        self
    }

    /// Sets [`Consistency::single_flight`].
    #[must_use]
    pub fn single_flight(mut self, on: bool) -> Self {
        self.single_flight = on;
        self
    }

    /// Sets [`Consistency::resync`].
    #[must_use]
    pub fn resync(mut self, on: bool) -> Self {
        self.resync = on;
        self
    }

    /// Sets [`Consistency::epochs`].
    #[must_use]
    pub fn epochs(mut self, on: bool) -> Self {
        self.epochs = on;
        self
    }
}

/// Retries of cache writes after a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Pause before the first retry; doubled each time, with jitter.
    pub base_delay: Duration,
    /// Longest pause between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(100),
        }
    }
}

impl RetryPolicy {
    /// No retry.
    pub fn none() -> Self {
        RetryPolicy {
            attempts: 1,
            ..Self::default()
        }
    }

    /// The pause before retry number `n` (1-based): exponential, capped,
    /// with "equal jitter" (half fixed, half random) so that clients that
    /// failed together do not retry together.
    pub fn delay(&self, n: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.max_delay);
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// When the cache keeps failing, stop calling it for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive failed cache calls that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open before one probe is let through.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_millis(500),
        }
    }
}

/// Every engine setting, with defaults that suit most applications.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Prefix of every cache key, so that several applications can share a
    /// cache: `{namespace}:{table}:{key}`.
    pub namespace: String,
    /// TTL of cached rows when neither the call nor the table sets one;
    /// `None` keeps them until evicted.
    pub default_ttl: Option<Duration>,
    /// How long a delete's tombstone stays in the cache. It must outlive any
    /// read that loaded the row before the delete, which the load deadline
    /// bounds; it is checked to be at least twice `load_deadline`.
    pub tombstone_ttl: Duration,
    /// A read that loaded a row from the database longer ago than this does
    /// not put it in the cache: entries newer than what it loaded may have
    /// expired meanwhile, and the fence would not see them.
    pub load_deadline: Duration,
    /// A committed write whose cache effect cannot be sent within this
    /// long after its commit returned (a stalled process, a slow cache,
    /// retries) does not send it: its rows are re-read and written with the
    /// fence by resync. It bounds how late an entry can land after its
    /// commit, which must stay below `tombstone_ttl` (the tombstone of a
    /// later delete must still be there to refuse it): the engine uses at
    /// most half of it. Network caches only.
    pub write_deadline: Duration,
    /// How often the engine checks the cache's epoch record and identity
    /// (see [`Consistency::epochs`]). A read trusts the cache only within
    /// twice this after the last successful check.
    pub epoch_check_interval: Duration,
    /// How rows are encoded in the cache.
    pub codec: Codec,
    /// Timeout of each cache call (not applied to in-process caches).
    pub cache_timeout: Duration,
    /// Timeout of each database call.
    pub db_timeout: Duration,
    /// Retries of cache writes after a commit.
    pub retry: RetryPolicy,
    /// How [`crate::Engine::transaction`] runs its closure again after a
    /// serialization failure, a deadlock or a busy database: attempts in
    /// all, and the backoff between them.
    pub transaction_retry: RetryPolicy,
    /// The cache circuit breaker.
    pub breaker: BreakerConfig,
    /// The continuous consistency monitor: off (`None`) unless set.
    pub monitor: Option<super::monitor::MonitorConfig>,
    /// The consistency mechanisms.
    pub consistency: Consistency,
    /// Outbox records younger than this are left to the engine that wrote
    /// them; older ones are replayed by any engine's reconciler.
    pub outbox_grace: Duration,
    /// How often the reconciler looks for outbox records to replay and for
    /// keys to resync; `None` runs it only when asked.
    pub reconcile_interval: Option<Duration>,
    /// Most keys remembered for resync after failed cache writes; past it,
    /// the engine clears its namespace in the cache when the cache is back.
    pub max_resync_keys: usize,
    /// How often the follower of writes made outside the engine scans the
    /// change table when no doorbell rang (a missed `NOTIFY`, a backend
    /// without one). Tables opt in with
    /// [`crate::TableOptions::track_external_writes`].
    pub external_poll_interval: Duration,
    /// How long recorded external changes are kept. An engine that starts
    /// with a shared cache replays the ones still kept, so this covers
    /// external writes made while no engine ran for up to this long.
    pub external_retention: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: "wt".into(),
            default_ttl: Some(Duration::from_secs(3600)),
            tombstone_ttl: Duration::from_secs(60),
            load_deadline: Duration::from_secs(5),
            write_deadline: Duration::from_secs(5),
            epoch_check_interval: Duration::from_millis(500),
            codec: Codec::default(),
            cache_timeout: Duration::from_millis(250),
            db_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            transaction_retry: RetryPolicy {
                attempts: 10,
                base_delay: Duration::from_millis(2),
                max_delay: Duration::from_millis(200),
            },
            breaker: BreakerConfig::default(),
            monitor: None,
            consistency: Consistency::default(),
            outbox_grace: Duration::from_secs(2),
            reconcile_interval: Some(Duration::from_secs(1)),
            max_resync_keys: 100_000,
            external_poll_interval: Duration::from_secs(1),
            external_retention: Duration::from_secs(3600),
        }
    }
}

impl Config {
    /// The write deadline in force: [`Config::write_deadline`], capped at
    /// half of [`Config::tombstone_ttl`].
    pub fn effective_write_deadline(&self) -> Duration {
        self.write_deadline.min(self.tombstone_ttl / 2)
    }

    pub(crate) fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::new(ErrorKind::Config, m));
        let ns = &self.namespace;
        if ns.is_empty()
            || ns.len() > 64
            || ns
                .chars()
                .any(|c| c == ':' || c.is_whitespace() || c.is_control())
        {
            return bad(format!(
                "namespace {ns:?} must be 1 to 64 bytes without ':', whitespace or control characters"
            ));
        }
        if self.tombstone_ttl < self.load_deadline * 2 {
            return bad(format!(
                "tombstone_ttl ({:?}) must be at least twice load_deadline ({:?})",
                self.tombstone_ttl, self.load_deadline
            ));
        }
        if self.retry.attempts == 0 || self.transaction_retry.attempts == 0 {
            return bad("retry.attempts and transaction_retry.attempts must be at least 1".into());
        }
        if self.breaker.failure_threshold == 0 {
            return bad("breaker.failure_threshold must be at least 1".into());
        }
        if let Some(m) = &self.monitor {
            m.check()?;
        }
        for (name, d) in [
            ("load_deadline", self.load_deadline),
            ("cache_timeout", self.cache_timeout),
            ("db_timeout", self.db_timeout),
            ("write_deadline", self.write_deadline),
            ("epoch_check_interval", self.epoch_check_interval),
            ("external_poll_interval", self.external_poll_interval),
            ("external_retention", self.external_retention),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must not be zero"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_and_stay_capped() {
        let p = RetryPolicy::default();
        for n in 1..20 {
            let d = p.delay(n);
            let full = (p.base_delay * (1 << (n - 1).min(16))).min(p.max_delay);
            assert!(d >= full / 2 && d <= full, "{n}: {d:?}");
        }
    }

    #[test]
    fn bad_namespaces_and_windows_are_refused() {
        for ns in ["", "a:b", "a b", "x\n"] {
            let c = Config {
                namespace: ns.into(),
                ..Config::default()
            };
            assert_eq!(c.check().unwrap_err().kind(), ErrorKind::Config);
        }
        let c = Config {
            tombstone_ttl: Duration::from_secs(1),
            ..Config::default()
        };
        assert!(c.check().is_err());
        assert!(Config::default().check().is_ok());
    }
}
