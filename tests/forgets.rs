//! The cache that forgets or goes back in time (README: "The cache that
//! forgets"), forced on real servers:
//!
//! * a late cache write across an empty restart and across a flush, with
//!   the writer held by an engine hook (before and after its write
//!   deadline check), and with a writer process frozen by a real SIGSTOP;
//! * Redis restarted from an older `dump.rdb`;
//! * a Redis replica promoted (`REPLICAOF NO ONE`) after it missed the
//!   primary's last writes;
//! * one of two Memcached servers out of reach and back with its old
//!   contents;
//! * on a Redis Cluster: a primary's replica, cut off so that it missed the
//!   last writes, promoted when the primary dies; and the history check
//!   across processes under failovers (a primary killed, a primary paused
//!   past the node timeout) and a reshard.
//!
//! Each scenario runs twice: with the mechanism on, no read that starts
//! after the stated bound returns a value older than an acknowledged write;
//! with `Consistency::epochs` off, the same scenario serves stale values
//! (so the test is shown to bite, every run).

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Notify;
use writethrough::backend::CacheStore;
use writethrough::{Config, Consistency, Engine, Entity, Handle, HookPoint, Hooks, TableOptions};
use writethrough_testkit::proxy::FaultProxy;
use writethrough_testkit::server::{MemcachedServer, PostgresServer, RedisCluster, RedisServer};
use writethrough_testkit::suite::engine::{Item, item};
use writethrough_testkit::suite::{Pair, unique};

const CHECK_INTERVAL: Duration = Duration::from_millis(100);
const CACHE_TIMEOUT: Duration = Duration::from_millis(250);
const WRITE_DEADLINE: Duration = Duration::from_millis(300);

/// The README's bound: a read that starts this long after the cache forgot
/// trusts nothing from before.
fn bound() -> Duration {
    CHECK_INTERVAL * 2 + CACHE_TIMEOUT * 2
}

fn config(ns: &str, epochs: bool) -> Config {
    let mut c = Pair::config();
    c.namespace = ns.to_owned();
    c.cache_timeout = CACHE_TIMEOUT;
    c.epoch_check_interval = CHECK_INTERVAL;
    c.write_deadline = WRITE_DEADLINE;
    // The outbox replay would repair some of these cases on its own, later:
    // the scenarios test the epochs and the write deadline alone.
    c.reconcile_interval = None;
    c.consistency = Consistency::strict().epochs(epochs);
    c
}

async fn handle(engine: &Engine, table: &str) -> Handle<Item> {
    engine
        .register_in(Item::table().renamed(table).unwrap(), TableOptions::new())
        .await
        .expect("registers")
}

/// Holds one write at `point` until released.
struct Stall {
    point: HookPoint,
    armed: AtomicBool,
    reached: Notify,
    release: Notify,
}

#[async_trait::async_trait]
impl Hooks for Stall {
    async fn at(&self, point: HookPoint, _key: &str) {
        if point == self.point && self.armed.swap(false, Ordering::SeqCst) {
            self.reached.notify_one();
            self.release.notified().await;
        }
    }
}

/// A network cache server the scenarios can make forget.
enum Server {
    Redis(RedisServer),
    Memcached(MemcachedServer),
    Cluster(RedisCluster),
}

#[derive(Debug, Clone, Copy)]
enum Forget {
    /// Killed and started again, empty.
    RestartEmpty,
    /// An operator's FLUSHALL / flush_all.
    Flush,
}

impl Server {
    fn url(&self) -> String {
        match self {
            Server::Redis(s) => s.url(),
            Server::Memcached(s) => s.url(),
            Server::Cluster(c) => c.url(),
        }
    }

    async fn forget(&mut self, how: Forget, cache: &dyn CacheStore) {
        match (how, self) {
            (Forget::RestartEmpty, Server::Redis(s)) => {
                s.kill().await.unwrap();
                s.restart().await.unwrap();
            }
            (Forget::RestartEmpty, Server::Memcached(s)) => {
                s.kill().await.unwrap();
                s.restart().await.unwrap();
            }
            (Forget::Flush, Server::Redis(s)) => {
                redis_cmd(&s.url(), redis::cmd("FLUSHALL")).await;
            }
            // The Memcached adapter's clear of every key is flush_all.
            (Forget::Flush, Server::Memcached(_)) => cache.clear("").await.unwrap(),
            // A primary and its replica both restarted empty.
            (Forget::RestartEmpty, Server::Cluster(c)) => {
                let primary = c.primaries().await.unwrap()[0];
                let replicas = c.replicas_of(primary).await.unwrap();
                for r in replicas {
                    c.node_mut(r).kill().await.unwrap();
                    c.node_mut(r).restart().await.unwrap();
                }
                c.node_mut(primary).kill().await.unwrap();
                c.node_mut(primary).restart().await.unwrap();
                c.wait_healthy().await.unwrap();
            }
            (Forget::Flush, Server::Cluster(_)) => cache.clear("").await.unwrap(),
        }
    }
}

async fn redis_cmd(url: &str, cmd: redis::Cmd) -> redis::Value {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

async fn postgres() -> PostgresServer {
    PostgresServer::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A write committed, held, a delete acknowledged meanwhile, the cache made
/// to forget, then the held write let go. Returns how many of three reads
/// after the bound (the writer's engine, another, a fresh one) saw the
/// deleted row.
async fn late_write(
    server: &mut Server,
    db_url: &str,
    point: HookPoint,
    how: Forget,
    epochs: bool,
) -> usize {
    let cache = writethrough::open_cache(&server.url()).await.unwrap();
    let db = writethrough::open_db(db_url).await.unwrap();
    let pair = Pair::new(cache.clone(), db);
    let (ns, table) = (unique("late"), unique("late"));
    let stall = Arc::new(Stall {
        point,
        armed: AtomicBool::new(false),
        reached: Notify::new(),
        release: Notify::new(),
    });
    let other = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let writer = pair
        .builder()
        .config(config(&ns, epochs))
        .hooks(stall.clone())
        .build()
        .unwrap();
    let (o, w) = (handle(&other, &table).await, handle(&writer, &table).await);
    o.put(&item(1, 1.0)).await.unwrap();
    assert!(w.get(1).await.unwrap().is_some());

    stall.armed.store(true, Ordering::SeqCst);
    let held = tokio::spawn({
        let w = w.clone();
        async move { w.put(&item(1, 2.0)).await }
    });
    tokio::time::timeout(Duration::from_secs(10), stall.reached.notified())
        .await
        .expect("the write reaches the hook");
    assert!(o.delete(1).await.unwrap(), "the delete is acknowledged");
    server.forget(how, &*cache).await;
    if point == HookPoint::AfterCommit {
        tokio::time::sleep(WRITE_DEADLINE + Duration::from_millis(100)).await;
    }
    stall.release.notify_one();
    held.await.unwrap().expect("the held write succeeds");
    tokio::time::sleep(bound() + Duration::from_millis(100)).await;

    let fresh = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let f = handle(&fresh, &table).await;
    let mut stale = 0;
    for h in [&w, &o, &f] {
        if h.get(1).await.unwrap().is_some() {
            stale += 1;
        }
    }
    if epochs {
        assert!(
            other.stats().epoch_changes + writer.stats().epoch_changes >= 1
                || writer.stats().late_effects >= 1,
            "the mechanism acted: {:?} {:?}",
            other.stats(),
            writer.stats()
        );
    }
    stale
}

async fn late_writes_on(mut server: Server, db_url: &str) {
    for (point, how) in [
        // Held before the deadline check: the write deadline catches it.
        (HookPoint::AfterCommit, Forget::RestartEmpty),
        // Held after it: the entry lands in the old epoch, read as a miss.
        (HookPoint::BeforeCacheWrite, Forget::RestartEmpty),
        (HookPoint::BeforeCacheWrite, Forget::Flush),
    ] {
        let on = late_write(&mut server, db_url, point, how, true).await;
        assert_eq!(on, 0, "{point:?} {how:?}: a deleted row was read back");
        let off = late_write(&mut server, db_url, point, how, false).await;
        assert!(
            off > 0,
            "{point:?} {how:?}: with epochs off the late write should resurrect the row"
        );
        println!("{point:?} across {how:?}: 0 stale reads with epochs, {off}/3 without");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_write_cannot_resurrect_a_deleted_row_on_redis() {
    let redis = RedisServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let pg = postgres().await;
    late_writes_on(Server::Redis(redis), &pg.url()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_write_cannot_resurrect_a_deleted_row_on_memcached() {
    let mc = MemcachedServer::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pg = postgres().await;
    late_writes_on(Server::Memcached(mc), &pg.url()).await;
}

/// The child process commits a write and is frozen by SIGSTOP before its
/// cache write; meanwhile the row is deleted and the cache restarts empty.
/// Returns whether a read after the bound saw the deleted row.
async fn frozen_writer(server: &mut Server, db_url: &str, epochs: bool) -> bool {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let cache = writethrough::open_cache(&server.url()).await.unwrap();
    let db = writethrough::open_db(db_url).await.unwrap();
    let pair = Pair::new(cache.clone(), db);
    let (ns, table) = (unique("frozen"), unique("frozen"));
    let other = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let o = handle(&other, &table).await;
    o.put(&item(1, 1.0)).await.unwrap();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wt-crash-child"))
        .env("WT_CACHE_URL", server.url())
        .env("WT_DB_URL", db_url)
        .env("WT_NAMESPACE", &ns)
        .env("WT_TABLE", &table)
        .env("WT_PRICE", "2.0")
        .env("WT_MODE", "pause")
        .env("WT_EPOCHS", if epochs { "1" } else { "0" })
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the child starts");
    let pid = Pid::from_raw(child.id().expect("a pid") as i32);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the child answers within 30 s")
            .expect("reads")
            .expect("a line")
    };
    let line = next().await;
    assert!(line.starts_with("COMMITTED"), "{line}");
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    assert!(o.delete(1).await.unwrap(), "the delete is acknowledged");
    server.forget(Forget::RestartEmpty, &*cache).await;
    tokio::time::sleep(WRITE_DEADLINE * 2).await;
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let line = next().await;
    assert!(line.starts_with("DONE"), "{line}");
    let status = child.wait().await.expect("reaped");
    assert!(status.success(), "the child exits cleanly");
    tokio::time::sleep(bound()).await;

    let fresh = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let f = handle(&fresh, &table).await;
    o.get(1).await.unwrap().is_some() || f.get(1).await.unwrap().is_some()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_frozen_by_sigstop_cannot_resurrect_a_deleted_row() {
    let redis = RedisServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let pg = postgres().await;
    let mut server = Server::Redis(redis);
    assert!(
        !frozen_writer(&mut server, &pg.url(), true).await,
        "a deleted row was read back after the frozen writer resumed"
    );
    assert!(
        frozen_writer(&mut server, &pg.url(), false).await,
        "with epochs off the frozen writer should resurrect the row"
    );
}

/// Reads keys 1..=n through a fresh engine and `h`; counts reads that do
/// not match the database's current price (`expect`), or that return a
/// row for `gone`.
async fn stale_reads(h: &Handle<Item>, n: i64, expect: f64, gone: i64) -> usize {
    let mut stale = 0;
    for k in 1..=n {
        if h.get(k).await.unwrap().map(|i| i.price) != Some(expect) {
            stale += 1;
        }
    }
    if h.get(gone).await.unwrap().is_some() {
        stale += 1;
    }
    stale
}

/// Writes version one of keys 1..=n and `gone`, snapshots, writes version
/// two and deletes `gone`, then restarts Redis from the snapshot.
async fn old_snapshot(redis: &mut RedisServer, db_url: &str, epochs: bool) -> usize {
    let cache = writethrough::open_cache(&redis.url()).await.unwrap();
    let db = writethrough::open_db(db_url).await.unwrap();
    let pair = Pair::new(cache, db);
    let (ns, table) = (unique("snap"), unique("snap"));
    let engine = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let h = handle(&engine, &table).await;
    let (n, gone) = (20, 99);
    for k in (1..=n).chain([gone]) {
        h.put(&item(k, 1.0)).await.unwrap();
        h.get(k).await.unwrap();
    }
    redis_cmd(&redis.url(), redis::cmd("SAVE")).await;
    for k in 1..=n {
        h.put(&item(k, 2.0)).await.unwrap();
    }
    h.delete(gone).await.unwrap();
    redis.kill().await.unwrap();
    redis.restart().await.unwrap();
    tokio::time::sleep(bound() + Duration::from_millis(100)).await;
    let fresh = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let f = handle(&fresh, &table).await;
    stale_reads(&h, n, 2.0, gone).await + stale_reads(&f, n, 2.0, gone).await
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restored_from_an_older_snapshot_is_not_served_as_current() {
    let mut redis = RedisServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let pg = postgres().await;
    let on = old_snapshot(&mut redis, &pg.url(), true).await;
    assert_eq!(on, 0, "reads served the old snapshot");
    let off = old_snapshot(&mut redis, &pg.url(), false).await;
    assert!(off > 0, "with epochs off the old snapshot should be served");
    println!("old dump.rdb: 0 stale reads with epochs, {off}/42 without");
}

/// A primary and its replica behind one address (a proxy standing in for
/// a virtual IP): the replica is frozen, misses the last writes, the
/// primary dies and the replica is promoted.
async fn promoted_replica(db_url: &str, epochs: bool) -> usize {
    let mut primary = RedisServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let replica = RedisServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let mut replicaof = redis::cmd("REPLICAOF");
    replicaof.arg("127.0.0.1").arg(primary.port());
    redis_cmd(&replica.url(), replicaof).await;
    let proxy = FaultProxy::start(primary.addr()).await.unwrap();
    let url = proxy.url(&primary.url());
    let cache = writethrough::open_cache(&url).await.unwrap();
    let db = writethrough::open_db(db_url).await.unwrap();
    let pair = Pair::new(cache, db);
    let (ns, table) = (unique("replica"), unique("replica"));
    let engine = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let h = handle(&engine, &table).await;
    let (n, gone) = (10, 99);
    for k in (1..=n).chain([gone]) {
        h.put(&item(k, 1.0)).await.unwrap();
    }
    // Every write so far reached the replica.
    let mut caught_up = false;
    for _ in 0..100 {
        let mut wait = redis::cmd("WAIT");
        wait.arg(1).arg(100);
        if redis_cmd(&primary.url(), wait).await == redis::Value::Int(1) {
            caught_up = true;
            break;
        }
    }
    assert!(caught_up, "the replica caught up");
    replica.pause().unwrap();
    // Cut the link too: a frozen replica would still find what the primary
    // sends meanwhile in its socket buffer when it resumes.
    let mut cut = redis::cmd("CLIENT");
    cut.arg("KILL").arg("TYPE").arg("replica");
    redis_cmd(&primary.url(), cut).await;
    for k in 1..=n {
        h.put(&item(k, 2.0)).await.unwrap();
    }
    h.delete(gone).await.unwrap();
    primary.kill().await.unwrap();
    replica.resume().unwrap();
    let mut promote = redis::cmd("REPLICAOF");
    promote.arg("NO").arg("ONE");
    redis_cmd(&replica.url(), promote).await;
    proxy.set_upstream(replica.addr());
    proxy.reset_all();
    // Reads must reach the promoted replica, not fail over to the database.
    let reconnected = writethrough_testkit::suite::eventually(Duration::from_secs(10), || async {
        pair.cache.ping().await.is_ok()
    })
    .await;
    assert!(reconnected, "the client reconnects through the proxy");
    tokio::time::sleep(bound() + Duration::from_millis(100)).await;
    let fresh = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let f = handle(&fresh, &table).await;
    stale_reads(&h, n, 2.0, gone).await + stale_reads(&f, n, 2.0, gone).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promoted_replica_that_missed_writes_is_not_served_as_current() {
    let pg = postgres().await;
    let on = promoted_replica(&pg.url(), true).await;
    assert_eq!(on, 0, "reads served what the replica missed");
    let off = promoted_replica(&pg.url(), false).await;
    assert!(
        off > 0,
        "with epochs off the replica's old entries should be served"
    );
    println!("promoted replica: 0 stale reads with epochs, {off}/22 without");
}

/// Two Memcached servers; the one holding the test's keys is frozen while
/// they are rewritten (its writer then gone), and comes back with its old
/// contents.
async fn server_back_with_old_contents(db_url: &str, epochs: bool) -> usize {
    let a = MemcachedServer::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let b = MemcachedServer::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let url = format!("memcache://{},{}", a.addr(), b.addr());
    let mc = writethrough::memcached::MemcachedCache::connect(&url)
        .await
        .unwrap();
    let db = writethrough::open_db(db_url).await.unwrap();
    let (ns, table) = (unique("ring"), unique("ring"));
    let pair = Pair::new(Arc::new(mc.clone()), db);
    let reader = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let writer = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let (r, w) = (handle(&reader, &table).await, handle(&writer, &table).await);
    let on_b: Vec<i64> = (1..200)
        .filter(|k| mc.server_for(&r.cache_key(*k).unwrap()) == b.addr().to_string())
        .take(8)
        .collect();
    assert_eq!(on_b.len(), 8);
    for &k in &on_b {
        w.put(&item(k, 1.0)).await.unwrap();
        assert_eq!(r.get(k).await.unwrap().map(|i| i.price), Some(1.0));
    }
    b.pause().unwrap();
    for &k in &on_b {
        w.put(&item(k, 2.0)).await.unwrap();
    }
    // The writer, which knows its cache writes failed, goes away.
    drop(w);
    drop(writer);
    tokio::time::sleep(CHECK_INTERVAL * 4 + CACHE_TIMEOUT * 2).await;
    b.resume().unwrap();
    tokio::time::sleep(bound() + Duration::from_millis(100)).await;
    let mut stale = 0;
    for &k in &on_b {
        if r.get(k).await.unwrap().map(|i| i.price) != Some(2.0) {
            stale += 1;
        }
    }
    stale
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memcached_server_back_with_old_contents_is_not_served_as_current() {
    let pg = postgres().await;
    let on = server_back_with_old_contents(&pg.url(), true).await;
    assert_eq!(on, 0, "reads served the returning server's old contents");
    let off = server_back_with_old_contents(&pg.url(), false).await;
    assert!(off > 0, "with epochs off the old contents should be served");
    println!("memcached server back with old contents: 0 stale reads with epochs, {off}/8 without");
}

/// The history checker across processes under a nemesis: four OS
/// processes, each with its own engine and four clients, run random reads,
/// writes, updates and deletes on a few keys while the cache is paused,
/// restarted (Redis: from the snapshot taken a moment before, so older
/// than the database; Memcached: empty), and a client process is frozen
/// with SIGSTOP past every timeout. Reads that begin inside a fault's
/// window (the fault, then the README's bound) are counted apart, with the
/// largest staleness among them; every other operation must be
/// linearizable.
async fn history_under_nemesis(name: &str, server: &mut Server, db_url: &str) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use writethrough_testkit::history::{Event, check_windowed, monotonic_ns};

    const PROCS: u32 = 4;
    // A cluster's faults take longer (a failover, a reshard): more operations
    // so that the clients outlast one of each.
    let ops_per_proc: usize = if matches!(server, Server::Cluster(_)) {
        10_000
    } else {
        6_000
    };
    let (ns, table) = (unique("nemesis"), unique("nemesis"));
    {
        // Create the table before the processes race to.
        let cache = writethrough::open_cache(&server.url()).await.unwrap();
        let db = writethrough::open_db(db_url).await.unwrap();
        let engine = Pair::new(cache, db)
            .builder()
            .config(config(&ns, true))
            .build()
            .unwrap();
        handle(&engine, &table).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut children = Vec::new();
    for p in 0..PROCS {
        let out = dir.path().join(format!("history-{p}.txt"));
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wt-history-client"))
            .env("WT_CACHE_URL", server.url())
            .env("WT_DB_URL", db_url)
            .env("WT_NAMESPACE", &ns)
            .env("WT_TABLE", &table)
            .env("WT_OPS", ops_per_proc.to_string())
            .env("WT_KEYS", "6")
            .env("WT_COLD_KEYS", "40")
            .env("WT_CLIENTS", "4")
            .env("WT_FIRST_VALUE", ((p + 1) * 10_000_000).to_string())
            .env("WT_FIRST_CLIENT", (p * 100).to_string())
            .env("WT_OUT", &out)
            // WT_NEMESIS_EPOCHS=0 runs the engines with epochs off (the README says what that shows).
            .env(
                "WT_EPOCHS",
                std::env::var("WT_NEMESIS_EPOCHS").unwrap_or_else(|_| "1".into()),
            )
            .kill_on_drop(true)
            .spawn()
            .expect("a history client starts");
        children.push((child, out));
    }
    let pids: Vec<Pid> = children
        .iter()
        .map(|(c, _)| Pid::from_raw(c.id().expect("running") as i32))
        .collect();
    // A window lasts the fault, then the README's bound, then the write
    // deadline of the history clients (500 ms): a process that bypassed
    // the cache for a key during the fault (its cache writes failed, its
    // epoch unconfirmed) reads it from the database until its resync is
    // done, and may so see a write whose cache effect another process is
    // still sending (at most a write deadline long).
    let bound_ns = (bound() + Duration::from_millis(500)).as_nanos() as u64;
    let mut windows: Vec<(u64, u64)> = Vec::new();
    let mut faults = Vec::new();
    let running = |children: &mut Vec<(tokio::process::Child, std::path::PathBuf)>| {
        children
            .iter_mut()
            .any(|(c, _)| c.try_wait().expect("waits").is_none())
    };
    let mut round = 0usize;
    while running(&mut children) {
        // Quiet between faults, so that most reads are outside the windows.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let started = monotonic_ns();
        if let Server::Cluster(c) = &mut *server {
            let primaries = c.primaries().await.unwrap();
            let victim = primaries[round % primaries.len()];
            match round % 4 {
                0 => {
                    // Past the node timeout: its replica takes over, and the
                    // old primary, resumed, learns it was replaced.
                    c.node(victim).pause().unwrap();
                    tokio::time::sleep(Duration::from_millis(
                        writethrough_testkit::server::CLUSTER_NODE_TIMEOUT_MS * 3,
                    ))
                    .await;
                    c.node(victim).resume().unwrap();
                    c.wait_healthy().await.unwrap();
                    faults.push("primary paused past the node timeout");
                }
                1 => {
                    c.kill_and_fail_over(victim).await.unwrap();
                    c.node_mut(victim).restart().await.unwrap();
                    c.wait_healthy().await.unwrap();
                    faults.push("primary killed, replica promoted");
                }
                2 => {
                    let pid = pids[round / 4 % pids.len()];
                    if kill(pid, Signal::SIGSTOP).is_ok() {
                        tokio::time::sleep(Duration::from_millis(1200)).await;
                        let _ = kill(pid, Signal::SIGCONT);
                        faults.push("client process frozen");
                    }
                }
                _ => {
                    let to = primaries[(round + 1) % primaries.len()];
                    c.reshard(victim, to, 200).await.unwrap();
                    faults.push("slots resharded");
                }
            }
            windows.push((started, monotonic_ns() + bound_ns));
            round += 1;
            continue;
        }
        match round % 4 {
            0 => {
                if let Server::Redis(s) = &*server {
                    // The snapshot the restart below comes back with.
                    redis_cmd(&s.url(), redis::cmd("SAVE")).await;
                }
                match &*server {
                    Server::Redis(s) => s.pause().unwrap(),
                    Server::Memcached(s) => s.pause().unwrap(),
                    Server::Cluster(_) => unreachable!("handled above"),
                }
                tokio::time::sleep(Duration::from_millis(400)).await;
                match &*server {
                    Server::Redis(s) => s.resume().unwrap(),
                    Server::Memcached(s) => s.resume().unwrap(),
                    Server::Cluster(_) => unreachable!("handled above"),
                }
                windows.push((started, monotonic_ns() + bound_ns));
                faults.push("cache paused");
            }
            1 => {
                let cache = writethrough::open_cache(&server.url()).await.unwrap();
                server.forget(Forget::RestartEmpty, &*cache).await;
                windows.push((started, monotonic_ns() + bound_ns));
                faults.push(if matches!(server, Server::Redis(_)) {
                    "cache restarted from an older snapshot"
                } else {
                    "cache restarted empty"
                });
            }
            2 => {
                // A client process frozen past every timeout. Its writes
                // caught in flight are resynced when it resumes, and until
                // then its reads of those keys go to the database, which
                // may be ahead of the cache another reader hits: a window.
                let pid = pids[round / 4 % pids.len()];
                if kill(pid, Signal::SIGSTOP).is_ok() {
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    let _ = kill(pid, Signal::SIGCONT);
                    faults.push("client process frozen");
                    windows.push((started, monotonic_ns() + bound_ns));
                }
            }
            _ => {}
        }
        round += 1;
    }
    let mut events = Vec::new();
    let (mut epoch_changes, mut repairs) = (0, 0);
    for (mut child, out) in children {
        let status = child.wait().await.expect("reaped");
        assert!(status.success(), "a history client failed: {status}");
        let text = std::fs::read_to_string(&out).expect("the history file");
        events.extend(
            text.lines()
                .map(|l| Event::parse_line(l).expect("an event line")),
        );
        // Every epoch change an engine made (the nemesis's, or one it
        // started itself because a server answered late): until every
        // engine has moved, some read the database and some the cache.
        let changes = std::fs::read_to_string(out.with_extension("txt.epochs"))
            .expect("the epoch changes file");
        // A line with two times is a span in which the engine had keys
        // waiting for a resync: it read them from the database.
        for line in changes.lines() {
            let times: Vec<u64> = line
                .split(' ')
                .map(|t| t.parse().expect("a time"))
                .collect();
            match times[..] {
                [t] => {
                    epoch_changes += 1;
                    windows.push((t.saturating_sub(bound_ns), t + bound_ns));
                }
                [from, to] => {
                    repairs += 1;
                    windows.push((from.saturating_sub(bound_ns), to + bound_ns));
                }
                _ => panic!("an epoch change or a repair span: {line}"),
            }
        }
    }
    let report = check_windowed(&events, &windows);
    println!(
        "nemesis {name}: {} processes, {} faults ({}), {epoch_changes} epoch changes and {repairs} resync spans seen by the engines: {report}",
        PROCS,
        faults.len(),
        {
            let mut kinds = faults.clone();
            kinds.sort_unstable();
            kinds.dedup();
            kinds.join(", ")
        }
    );
    assert!(report.ops >= 20_000, "{report}");
    assert!(faults.len() >= 3, "the nemesis acted: {faults:?}");
    if matches!(server, Server::Cluster(_)) {
        let mut kinds = faults.clone();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(
            kinds.len(),
            4,
            "every kind of cluster fault ran: {faults:?}"
        );
    }
    assert!(
        report.violations.is_empty(),
        "{name}: stale reads outside the fault windows {windows:?}:\n{}",
        report.violations.join("\n")
    );
}

async fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("nemesis.db").display())
}

#[tokio::test(flavor = "multi_thread")]
async fn history_across_processes_under_nemesis_redis_postgres() {
    let redis = RedisServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let pg = postgres().await;
    history_under_nemesis("redis+postgres", &mut Server::Redis(redis), &pg.url()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn history_across_processes_under_nemesis_redis_sqlite() {
    let redis = RedisServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    history_under_nemesis(
        "redis+sqlite",
        &mut Server::Redis(redis),
        &sqlite_url(&dir).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn history_across_processes_under_nemesis_memcached_postgres() {
    let mc = MemcachedServer::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pg = postgres().await;
    history_under_nemesis("memcached+postgres", &mut Server::Memcached(mc), &pg.url()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn history_across_processes_under_nemesis_memcached_sqlite() {
    let mc = MemcachedServer::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    history_under_nemesis(
        "memcached+sqlite",
        &mut Server::Memcached(mc),
        &sqlite_url(&dir).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn history_across_processes_under_nemesis_redis_cluster_postgres() {
    let cluster = RedisCluster::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pg = postgres().await;
    history_under_nemesis(
        "redis-cluster+postgres",
        &mut Server::Cluster(cluster),
        &pg.url(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn history_across_processes_under_nemesis_redis_cluster_sqlite() {
    let cluster = RedisCluster::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    history_under_nemesis(
        "redis-cluster+sqlite",
        &mut Server::Cluster(cluster),
        &sqlite_url(&dir).await,
    )
    .await;
}

/// On a Redis Cluster: the replica of the primary holding the test's keys
/// is frozen and cut off while they are rewritten, then the primary dies
/// and the replica, missing those writes, is promoted.
async fn promoted_cluster_replica(db_url: &str, epochs: bool) -> usize {
    let mut c = RedisCluster::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cache = writethrough::open_cache(&c.url()).await.unwrap();
    let db = writethrough::open_db(db_url).await.unwrap();
    let pair = Pair::new(cache, db);
    // One hash tag: every key of the test in one slot, on one primary.
    let (ns, table) = (format!("{{{}}}", unique("crep")), unique("crep"));
    let engine = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let h = handle(&engine, &table).await;
    let (n, gone) = (10, 99);
    for k in (1..=n).chain([gone]) {
        h.put(&item(k, 1.0)).await.unwrap();
    }
    let primary = c.primary_of(&ns).await.unwrap();
    let replica = c.replicas_of(primary).await.unwrap()[0];
    // Every write so far reached the replica.
    let mut caught_up = false;
    for _ in 0..100 {
        if c.command(primary, &["WAIT", "1", "100"])
            .await
            .unwrap()
            .trim()
            == "1"
        {
            caught_up = true;
            break;
        }
    }
    assert!(caught_up, "the replica caught up");
    c.node(replica).pause().unwrap();
    c.command(primary, &["CLIENT", "KILL", "TYPE", "replica"])
        .await
        .unwrap();
    for k in 1..=n {
        h.put(&item(k, 2.0)).await.unwrap();
    }
    h.delete(gone).await.unwrap();
    c.node_mut(primary).kill().await.unwrap();
    c.node(replica).resume().unwrap();
    // The replica, having missed the writes, is promoted.
    c.command(replica, &["CLUSTER", "FAILOVER", "TAKEOVER"])
        .await
        .unwrap();
    let promoted = writethrough_testkit::suite::eventually(Duration::from_secs(30), || async {
        c.primaries().await.is_ok_and(|p| p.contains(&replica))
    })
    .await;
    assert!(promoted, "the replica took over\n{}", c.logs());
    c.wait_healthy().await.unwrap();
    let reachable = writethrough_testkit::suite::eventually(Duration::from_secs(10), || async {
        pair.cache.get(&format!("{ns}:probe")).await.is_ok()
    })
    .await;
    assert!(reachable, "the cache reaches the promoted replica");
    tokio::time::sleep(bound() + Duration::from_millis(100)).await;
    let fresh = pair.builder().config(config(&ns, epochs)).build().unwrap();
    let f = handle(&fresh, &table).await;
    stale_reads(&h, n, 2.0, gone).await + stale_reads(&f, n, 2.0, gone).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promoted_cluster_replica_that_missed_writes_is_not_served_as_current() {
    let pg = postgres().await;
    let on = promoted_cluster_replica(&pg.url(), true).await;
    assert_eq!(on, 0, "reads served what the replica missed");
    let off = promoted_cluster_replica(&pg.url(), false).await;
    assert!(
        off > 0,
        "with epochs off the replica's old entries should be served"
    );
    println!("promoted cluster replica: 0 stale reads with epochs, {off}/22 without");
}
