//! A process killed with SIGKILL between its database commit and its cache
//! write leaves the cache stale; the outbox repairs it within the stated
//! bound: `outbox_grace + reconcile_interval` while another engine runs,
//! and at once when an engine starts (its first pass replays everything).

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use writethrough::{Engine, Entity, Handle, TableOptions};
use writethrough_testkit::server::{MemcachedServer, PostgresServer, RedisServer};
use writethrough_testkit::suite::engine::{Item, cached, item};
use writethrough_testkit::suite::{Pair, unique};

async fn engine(pair: &Pair, ns: &str, reconcile: bool) -> Engine {
    pair.builder()
        .configure(|c| {
            c.namespace = ns.to_owned();
            if !reconcile {
                c.reconcile_interval = None;
            }
        })
        .build()
        .expect("builds")
}

/// Runs the child until it announces its commit, then SIGKILLs it.
async fn kill_after_commit(cache_url: &str, db_url: &str, ns: &str, table: &str) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wt-crash-child"))
        .env("WT_CACHE_URL", cache_url)
        .env("WT_DB_URL", db_url)
        .env("WT_NAMESPACE", ns)
        .env("WT_TABLE", table)
        .env("WT_PRICE", "2.0")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the child starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the child commits within 30 s")
        .expect("reads")
        .expect("the child printed a line");
    assert!(line.starts_with("COMMITTED"), "{line}");
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.expect("reaped");
    assert!(!status.success());
}

async fn scenario(pair: Pair, cache_url: String, db_url: String) {
    let cfg = Pair::config();
    let bound = cfg.outbox_grace + cfg.reconcile_interval.expect("a reconcile interval");
    let (ns, table) = (unique("crash"), unique("crash"));
    let t = Item::table().renamed(&table).unwrap();

    // A surviving engine repairs what the crash left within the bound.
    let survivor = engine(&pair, &ns, true).await;
    let items: Handle<Item> = survivor
        .register_in(t.clone(), TableOptions::new())
        .await
        .unwrap();
    let v1 = items.put(&item(1, 1.0)).await.unwrap();
    // Past its first pass (which replays everything at start), the
    // survivor replays only records older than the grace period.
    tokio::time::sleep(cfg.reconcile_interval.unwrap() * 2).await;
    // The put's own outbox record stays while the epoch is young (it would
    // be replayed if the cache forgot); a replay of it repairs the key too,
    // so it goes first: what is measured is the wait on the child's record.
    survivor
        .flush()
        .await
        .expect("acknowledged records removed");
    kill_after_commit(&cache_url, &db_url, &ns, &table).await;
    let committed = pair
        .db
        .get(&t, &1.into())
        .await
        .unwrap()
        .expect("committed");
    assert!(committed.version > v1, "the child committed before it died");
    let repaired = wait_repaired(&pair, &items, committed.version, bound * 3)
        .await
        .unwrap_or_else(|| panic!("not repaired within {:?}", bound * 3));
    println!(
        "{}: stale entry repaired by a surviving engine {repaired:.0?} after the kill (bound {bound:.0?})",
        pair.name,
    );
    // The record waits out the grace period: the writer might still be alive.
    assert!(
        repaired + Duration::from_millis(50) >= cfg.outbox_grace / 2,
        "replayed at once: {repaired:?}"
    );
    drop(items);
    drop(survivor);

    // With no engine running, the restarted one repairs it on start.
    let quiet = engine(&pair, &ns, false).await;
    let items = quiet
        .register_in(t.clone(), TableOptions::new())
        .await
        .unwrap();
    let v2 = items.put(&item(1, 1.5)).await.unwrap();
    drop(items);
    drop(quiet);
    kill_after_commit(&cache_url, &db_url, &ns, &table).await;
    let committed = pair
        .db
        .get(&t, &1.into())
        .await
        .unwrap()
        .expect("committed");
    assert!(committed.version > v2);
    let restarted = engine(&pair, &ns, true).await;
    let items = restarted.register_in(t, TableOptions::new()).await.unwrap();
    assert_eq!(
        cached(&pair, &items, 1).await,
        Some((true, v2)),
        "stale until the restart replays"
    );
    let repaired = wait_repaired(&pair, &items, committed.version, bound * 3).await;
    println!(
        "{}: stale entry repaired {:.0?} after the restart",
        pair.name,
        repaired.unwrap_or_else(|| panic!("not repaired within {:?} of the restart", bound * 3))
    );
    assert_eq!(items.get(1).await.unwrap().map(|i| i.price), Some(2.0));
}

/// How long until the cache holds `version` or nothing for key 1.
async fn wait_repaired(
    pair: &Pair,
    items: &Handle<Item>,
    version: u64,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        match cached(pair, items, 1).await {
            None => return Some(started.elapsed()),
            Some((_, v)) if v >= version => return Some(started.elapsed()),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_killed_after_its_commit_leaves_redis_consistent_within_the_bound() {
    let redis = RedisServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let pg = PostgresServer::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cache = writethrough::open_cache(&redis.url()).await.unwrap();
    let db = writethrough::open_db(&pg.url()).await.unwrap();
    scenario(Pair::new(cache, db), redis.url(), pg.url()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_killed_after_its_commit_leaves_memcached_consistent_within_the_bound() {
    let memcached = MemcachedServer::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}", dir.path().join("crash.db").display());
    let cache = writethrough::open_cache(&memcached.url()).await.unwrap();
    let db = writethrough::open_db(&db_url).await.unwrap();
    scenario(Pair::new(cache, db), memcached.url(), db_url).await;
}
