//! The fault suite: the engine under load while a real server is killed,
//! paused, or cut off by the fault proxy, and while the database runs out
//! of connections or stays locked.
//!
//! Every case runs clients that write and read a few hot keys while the
//! fault lasts, then waits for the engine to recover on its own (no
//! restart of the application) and checks:
//! - every operation finished within a bound derived from its timeouts;
//! - no acknowledged write was lost (the database holds it or a newer one);
//! - the cache holds nothing stale (an audit finds no divergence, and reads
//!   through the engine return what the database holds);
//! - for cache faults, no operation failed at all.
//!
//! Each case gets a fresh [`FaultRig`] from a factory the caller provides,
//! with servers of its own, so that faults do not leak between cases.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use writethrough_core::{BreakerState, Config, Engine, ErrorKind, Handle, TableOptions};

use super::engine::{Item, in_db, item};
use super::{Outcome, Pair, eventually, unique};
use crate::proxy::FaultProxy;
use crate::server::ServerControl;

/// Holds the database's write lock (SQLite) for a while.
#[async_trait::async_trait]
pub trait DbLock: Send + Sync {
    /// Takes the lock, keeps it for `d`, releases it; returns once taken.
    async fn hold(&self, d: Duration);
}

/// A pair with handles to inject faults into it.
pub struct FaultRig {
    /// The stores, wired through the proxies where there are some.
    pub pair: Pair,
    /// The cache server, if the cache is one.
    pub cache_server: Option<Arc<dyn ServerControl>>,
    /// The database server, if the database is one.
    pub db_server: Option<Arc<dyn ServerControl>>,
    /// The proxy between the engine and the cache server.
    pub cache_proxy: Option<FaultProxy>,
    /// The proxy between the engine and the database server.
    pub db_proxy: Option<FaultProxy>,
    /// The database's pool size, where it has one.
    pub db_pool_size: Option<usize>,
    /// A way to hold the database's write lock (SQLite).
    pub db_lock: Option<Arc<dyn DbLock>>,
}

/// Makes a fresh rig for each case.
pub type RigFactory = Arc<dyn Fn() -> BoxFuture<'static, FaultRig> + Send + Sync>;

/// What a fault case found.
#[derive(Debug, Clone)]
pub struct FaultReport {
    /// Passed, or not applicable to this pair.
    pub outcome: Outcome,
    /// Operations run during the fault.
    pub ops: u64,
    /// Operations that failed (with a typed error).
    pub failed: u64,
    /// Acknowledged writes missing from the database afterwards.
    pub lost: u64,
    /// The slowest operation.
    pub slowest: Duration,
}

/// One fault case.
#[derive(Clone, Copy)]
pub struct FaultCase {
    /// What it does.
    pub name: &'static str,
    /// Runs it on a fresh rig from the factory.
    pub run: fn(RigFactory) -> BoxFuture<'static, FaultReport>,
}

/// Every fault case.
pub fn cases() -> Vec<FaultCase> {
    macro_rules! fault_cases {
        ($($f:ident),* $(,)?) => {
            vec![$(FaultCase { name: stringify!($f), run: |f| Box::pin($f(f)) }),*]
        };
    }
    fault_cases![
        cache_killed_mid_write_and_restarted_empty,
        cache_paused_past_its_timeout_then_resumed,
        network_to_the_cache_cut_then_healed,
        cache_connections_reset,
        db_restarted_under_load,
        network_to_the_db_cut_then_healed,
        pool_exhausted_is_a_typed_error_then_recovers,
        db_locked_past_its_busy_timeout_is_a_typed_error,
    ]
}

/// The engine settings of the fault suite: short timeouts, a quick breaker.
pub fn config() -> Config {
    let mut cfg = Pair::config();
    cfg.cache_timeout = Duration::from_millis(200);
    cfg.db_timeout = Duration::from_secs(2);
    cfg.breaker.failure_threshold = 3;
    cfg.breaker.open_for = Duration::from_millis(200);
    cfg.retry.attempts = 2;
    cfg
}

/// The longest any operation may take under these settings: a database
/// call, a cache read and the cache write's attempts, and slack for a
/// loaded machine. A bound on liveness, not a speed measurement.
fn op_bound(cfg: &Config) -> Duration {
    cfg.db_timeout * 2 + cfg.cache_timeout * (2 + cfg.retry.attempts) + Duration::from_secs(2)
}

const KEYS: i64 = 12;
const CLIENTS: usize = 4;

#[derive(Default)]
struct Load {
    ops: AtomicU64,
    failed: AtomicU64,
    slowest_us: AtomicU64,
    /// Highest acknowledged version per key, and the value written with it.
    acked: Mutex<HashMap<i64, (u64, i64)>>,
    kinds: Mutex<Vec<ErrorKind>>,
}

impl Load {
    fn took(&self, d: Duration) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.slowest_us
            .fetch_max(d.as_micros() as u64, Ordering::Relaxed);
    }
    fn slowest(&self) -> Duration {
        Duration::from_micros(self.slowest_us.load(Ordering::Relaxed))
    }
}

/// Runs clients writing and reading the hot keys until `stop` is set.
async fn drive(items: Handle<Item>, stop: Arc<std::sync::atomic::AtomicBool>) -> Arc<Load> {
    let load = Arc::new(Load::default());
    let next = Arc::new(AtomicU64::new(1_000));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (items, stop, load, next) =
                (items.clone(), stop.clone(), load.clone(), next.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (key, write) = {
                        let mut rng = rand::rng();
                        (
                            rand::Rng::random_range(&mut rng, 1..=KEYS),
                            rand::Rng::random_bool(&mut rng, 0.5),
                        )
                    };
                    let started = Instant::now();
                    let failure = if write {
                        let value = next.fetch_add(1, Ordering::Relaxed) as i64;
                        let mut it = item(key, 1.0);
                        it.qty = value;
                        match items.put(&it).await {
                            Ok(v) => {
                                let mut acked = load.acked.lock();
                                let slot = acked.entry(key).or_insert((0, 0));
                                if v > slot.0 {
                                    *slot = (v, value);
                                }
                                None
                            }
                            Err(e) => Some(e),
                        }
                    } else {
                        items.get(key).await.err()
                    };
                    load.took(started.elapsed());
                    if let Some(e) = failure {
                        load.failed.fetch_add(1, Ordering::Relaxed);
                        load.kinds.lock().push(e.kind());
                        // A failing database: do not spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("a client does not panic");
    }
    load
}

/// Engine, table and load around one fault.
struct Scenario {
    rig: FaultRig,
    engine: Engine,
    items: Handle<Item>,
    cfg: Config,
}

async fn scenario(factory: &RigFactory) -> Scenario {
    let rig = factory().await;
    let cfg = config();
    let engine = rig
        .pair
        .builder()
        .config(cfg.clone())
        .build()
        .expect("engine builds");
    let table = <Item as writethrough_core::Entity>::table()
        .renamed(&unique("fault"))
        .expect("valid name");
    let items = engine
        .register_in(table, TableOptions::new())
        .await
        .expect("registers");
    for k in 1..=KEYS {
        items.put(&item(k, 1.0)).await.expect("seed write");
    }
    Scenario {
        rig,
        engine,
        items,
        cfg,
    }
}

impl Scenario {
    /// Runs the load for `before`, then `fault`, then keeps it going for `after`.
    async fn under_load<F, Fut>(&self, before: Duration, fault: F, after: Duration) -> Arc<Load>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let driver = tokio::spawn(drive(self.items.clone(), stop.clone()));
        tokio::time::sleep(before).await;
        fault().await;
        tokio::time::sleep(after).await;
        stop.store(true, Ordering::Relaxed);
        driver.await.expect("the driver does not panic")
    }

    /// Waits for the engine to recover, then checks what must hold; returns the report.
    async fn verdict(&self, load: &Load, cache_fault: bool) -> FaultReport {
        let recovered = eventually(Duration::from_secs(15), || async {
            self.engine.breaker_state() == BreakerState::Closed && self.engine.pending_resync() == 0
        })
        .await;
        assert!(
            recovered,
            "the engine did not recover: breaker {:?}, {} keys to resync",
            self.engine.breaker_state(),
            self.engine.pending_resync()
        );
        let slowest = load.slowest();
        let bound = op_bound(&self.cfg);
        assert!(
            slowest <= bound,
            "an operation took {slowest:?}, over the bound of {bound:?}"
        );
        let failed = load.failed.load(Ordering::Relaxed);
        if cache_fault {
            assert_eq!(
                failed,
                0,
                "a cache fault failed operations: {:?}",
                load.kinds.lock()
            );
        }
        for kind in load.kinds.lock().iter() {
            assert!(
                matches!(
                    kind,
                    ErrorKind::Unavailable
                        | ErrorKind::Timeout
                        | ErrorKind::Busy
                        | ErrorKind::PoolExhausted
                        | ErrorKind::SerializationFailure
                ),
                "an operation failed with {kind:?}, not a fault's typed error"
            );
        }
        let pair = &self.rig.pair;
        let mut lost = 0;
        let acked = load.acked.lock().clone();
        for (key, (version, value)) in acked {
            let (row, stored) = in_db(pair, &self.items, key).await.expect("the row exists");
            if stored < version || (stored == version && row.qty != value) {
                lost += 1;
            }
        }
        assert_eq!(lost, 0, "acknowledged writes were lost");
        let audit = self
            .items
            .audit(KEYS as usize, Duration::from_millis(300), false)
            .await
            .expect("the audit runs");
        assert!(
            audit.divergent.is_empty(),
            "stale cache entries after recovery: {audit:?}"
        );
        for k in 1..=KEYS {
            let via_engine = self.items.get(k).await.expect("reads work");
            let in_db = in_db(pair, &self.items, k).await.map(|(i, _)| i);
            assert_eq!(via_engine, in_db, "key {k} reads what the database holds");
        }
        FaultReport {
            outcome: Outcome::Passed,
            ops: load.ops.load(Ordering::Relaxed),
            failed,
            lost,
            slowest,
        }
    }
}

fn not_applicable(why: &str) -> FaultReport {
    FaultReport {
        outcome: Outcome::NotApplicable(why.into()),
        ops: 0,
        failed: 0,
        lost: 0,
        slowest: Duration::ZERO,
    }
}

const BEFORE: Duration = Duration::from_millis(300);
const AFTER: Duration = Duration::from_millis(700);

/// The cache server is killed while clients write, and comes back empty.
pub async fn cache_killed_mid_write_and_restarted_empty(factory: RigFactory) -> FaultReport {
    let s = scenario(&factory).await;
    let Some(server) = s.rig.cache_server.clone() else {
        return not_applicable("an in-process cache cannot be killed apart from the application");
    };
    let load = s
        .under_load(
            BEFORE,
            || async {
                server.kill().await.expect("kills");
                tokio::time::sleep(Duration::from_millis(500)).await;
                server.restart().await.expect("restarts");
            },
            AFTER,
        )
        .await;
    s.verdict(&load, true).await
}

/// The cache server freezes (SIGSTOP) for longer than the cache timeout;
/// the commands sent meanwhile wait in its socket and run when it resumes,
/// after newer writes: the fence must refuse them.
pub async fn cache_paused_past_its_timeout_then_resumed(factory: RigFactory) -> FaultReport {
    let s = scenario(&factory).await;
    let Some(server) = s.rig.cache_server.clone() else {
        return not_applicable("an in-process cache cannot be paused apart from the application");
    };
    let load = s
        .under_load(
            BEFORE,
            || async {
                server.pause().await.expect("pauses");
                tokio::time::sleep(s.cfg.cache_timeout * 5).await;
                server.resume().await.expect("resumes");
            },
            AFTER,
        )
        .await;
    s.verdict(&load, true).await
}

/// The network to the cache goes silent (a partition), then heals; bytes
/// sent meanwhile arrive late.
pub async fn network_to_the_cache_cut_then_healed(factory: RigFactory) -> FaultReport {
    let s = scenario(&factory).await;
    let Some(proxy) = &s.rig.cache_proxy else {
        return not_applicable("an in-process cache has no network to cut");
    };
    let load = s
        .under_load(
            BEFORE,
            || async {
                proxy.set_blackhole(true);
                tokio::time::sleep(s.cfg.cache_timeout * 5).await;
                proxy.heal();
            },
            AFTER,
        )
        .await;
    s.verdict(&load, true).await
}

/// Every connection to the cache is reset at once, twice.
pub async fn cache_connections_reset(factory: RigFactory) -> FaultReport {
    let s = scenario(&factory).await;
    let Some(proxy) = &s.rig.cache_proxy else {
        return not_applicable("an in-process cache has no connections");
    };
    let load = s
        .under_load(
            BEFORE,
            || async {
                proxy.reset_all();
                tokio::time::sleep(Duration::from_millis(200)).await;
                proxy.reset_all();
            },
            AFTER,
        )
        .await;
    s.verdict(&load, true).await
}

/// The database server is killed under load and restarted (committed data survives).
pub async fn db_restarted_under_load(factory: RigFactory) -> FaultReport {
    let s = scenario(&factory).await;
    let Some(server) = s.rig.db_server.clone() else {
        return not_applicable(
            "an embedded database cannot be restarted apart from the application",
        );
    };
    let load = s
        .under_load(
            BEFORE,
            || async {
                server.kill().await.expect("kills");
                tokio::time::sleep(Duration::from_millis(300)).await;
                server.restart().await.expect("restarts");
            },
            Duration::from_millis(1500),
        )
        .await;
    s.verdict(&load, false).await
}

/// The network to the database goes silent for longer than the database
/// timeout, then heals.
pub async fn network_to_the_db_cut_then_healed(factory: RigFactory) -> FaultReport {
    let s = scenario(&factory).await;
    let Some(proxy) = &s.rig.db_proxy else {
        return not_applicable("an embedded database has no network to cut");
    };
    let load = s
        .under_load(
            BEFORE,
            || async {
                proxy.set_blackhole(true);
                tokio::time::sleep(s.cfg.db_timeout + Duration::from_millis(500)).await;
                proxy.heal();
            },
            Duration::from_millis(1500),
        )
        .await;
    s.verdict(&load, false).await
}

/// Every pooled connection is held by open transactions: writes fail with
/// `PoolExhausted` (not a hang) and work again once they are released.
pub async fn pool_exhausted_is_a_typed_error_then_recovers(factory: RigFactory) -> FaultReport {
    let s = scenario(&factory).await;
    let Some(size) = s.rig.db_pool_size else {
        return not_applicable("the database has no connection pool");
    };
    let mut held = Vec::new();
    for _ in 0..size {
        held.push(s.engine.begin().await.expect("a connection is free"));
    }
    let started = Instant::now();
    let e = s
        .items
        .put(&item(1, 9.0))
        .await
        .expect_err("no connection is free");
    assert_eq!(e.kind(), ErrorKind::PoolExhausted, "{e}");
    assert!(e.is_temporary());
    let waited = started.elapsed();
    assert!(waited <= op_bound(&s.cfg), "it waited {waited:?}");
    drop(held);
    let load = s
        .under_load(Duration::ZERO, || async {}, Duration::from_millis(500))
        .await;
    s.verdict(&load, false).await
}

/// Another connection holds SQLite's write lock longer than the busy
/// timeout: writes fail with `Busy` and work again once it is released.
pub async fn db_locked_past_its_busy_timeout_is_a_typed_error(factory: RigFactory) -> FaultReport {
    let s = scenario(&factory).await;
    let Some(lock) = s.rig.db_lock.clone() else {
        return not_applicable("the database has no single write lock to hold");
    };
    let load = s
        .under_load(
            BEFORE,
            || async move { lock.hold(Duration::from_millis(1500)).await },
            Duration::from_millis(2000),
        )
        .await;
    let busy = load
        .kinds
        .lock()
        .iter()
        .filter(|k| **k == ErrorKind::Busy)
        .count();
    assert!(busy > 0, "no write reported Busy while the lock was held");
    s.verdict(&load, false).await
}

/// Runs every case on rigs from `factory`, one after another.
pub async fn run_all(
    pair: &str,
    factory: RigFactory,
    filter: &super::Filter,
) -> Vec<(&'static str, Result<FaultReport, String>)> {
    let mut out = Vec::new();
    for case in cases() {
        if !filter.matches("fault suite", pair, case.name) {
            continue;
        }
        let task = tokio::spawn((case.run)(factory.clone()));
        let r = match tokio::time::timeout(Duration::from_secs(120), task).await {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(e)) if e.is_panic() => Err(super::panic_message(e.into_panic())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("did not finish within 120 s".into()),
        };
        out.push((case.name, r));
    }
    out
}
