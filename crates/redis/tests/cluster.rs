//! `RedisCache` on a real Redis Cluster (3 primaries, 3 replicas, started
//! by the testkit): the shared cache suite, batches spread over slots,
//! `clear` on every primary, the cluster's identity across a failover,
//! a failover and a reshard under load, and the topologies refused at
//! connect.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use writethrough_core::ErrorKind;
use writethrough_core::backend::{CacheItem, CacheStore, Fence};
use writethrough_redis::{RedisCache, RedisConfig};
use writethrough_testkit::server::{RedisCluster, RedisServer};

use common::*;

async fn cluster() -> RedisCluster {
    RedisCluster::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start a Redis Cluster: {e}"))
}

fn cluster_config(url: &str) -> RedisConfig {
    RedisConfig::from_url(url)
        .unwrap()
        .with_response_timeout(Duration::from_secs(2))
        .with_connection_timeout(Duration::from_secs(1))
}

async fn connect(c: &RedisCluster) -> RedisCache {
    RedisCache::with_config(cluster_config(&c.url()))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", c.logs()))
}

/// The shared cache suite, batches across slots, `clear` on every primary.
#[tokio::test(flavor = "multi_thread")]
async fn the_shared_cache_suite_batches_and_clear_work_on_a_cluster() {
    let c = cluster().await;
    let cache = connect(&c).await;
    assert!(cache.is_cluster());

    // A batch over many slots: every key fenced, answers in the caller's order.
    let items: Vec<CacheItem> = (0..300).map(|i| row_item(&format!("b:{i}"), 5)).collect();
    let fences = cache.set_many_if_newer(items).await.unwrap();
    assert!(fences.iter().all(|f| *f == Fence::Applied));
    // Mixed: every third key older than what is stored.
    let items: Vec<CacheItem> = (0..300)
        .map(|i| row_item(&format!("b:{i}"), if i % 3 == 0 { 4 } else { 6 }))
        .collect();
    let fences = cache.set_many_if_newer(items).await.unwrap();
    for (i, f) in fences.iter().enumerate() {
        let want = if i % 3 == 0 {
            Fence::Stale
        } else {
            Fence::Applied
        };
        assert_eq!(*f, want, "key b:{i}");
    }
    let keys: Vec<String> = (0..300).map(|i| format!("b:{i}")).collect();
    let got = cache.get_many(&keys).await.unwrap();
    for (i, g) in got.iter().enumerate() {
        let want = if i % 3 == 0 { 5 } else { 6 };
        assert_eq!(version_of(g.as_ref()), Some(want), "key b:{i}");
    }
    // The keys live on every primary, and clear finds them all.
    let mut on = std::collections::BTreeSet::new();
    for k in keys.iter().take(40) {
        on.insert(c.primary_of(k).await.unwrap());
    }
    assert_eq!(on.len(), 3, "the batch spans all three primaries");
    cache.set("other:1", entry(1, "x"), None).await.unwrap();
    cache.clear("b:").await.unwrap();
    let got = cache.get_many(&keys).await.unwrap();
    assert!(got.iter().all(Option::is_none), "clear left keys behind");
    assert!(cache.get("other:1").await.unwrap().is_some());

    let db = writethrough_sqlite::SqliteStore::open_temporary().unwrap();
    writethrough_testkit::suite::assert_conformance(
        "cache suite: redis cluster",
        writethrough_testkit::suite::Pair::new(Arc::new(cache), Arc::new(db)),
        writethrough_testkit::suite::cache::cases(),
    )
    .await;
}

/// A primary killed while writers run: its replica takes over, the same
/// `RedisCache` goes on without a restart, and the cluster's identity
/// changes (so the engine starts a new epoch: the promoted replica may lack
/// the last writes). A reshard under load moves keys with `ASK`/`MOVED`
/// and no write is lost.
#[tokio::test(flavor = "multi_thread")]
async fn failover_and_reshard_under_load_are_survived() {
    let mut c = cluster().await;
    let cache = Arc::new(connect(&c).await);
    let before = cache.identity().await.unwrap().unwrap();
    assert!(before.starts_with("redis-cluster run_ids="), "{before}");
    assert_eq!(before.matches('=').count(), 4, "three primaries: {before}");

    // Writers: each key's version only grows; errors during the failover
    // are expected and retried by the next round.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (cache, stop, acked, failed) =
            (cache.clone(), stop.clone(), acked.clone(), failed.clone());
        writers.push(tokio::spawn(async move {
            let mut v = 1u64;
            let mut last = std::collections::HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<CacheItem> =
                    (0..20).map(|i| row_item(&format!("w{w}:{i}"), v)).collect();
                match cache.set_many_if_newer(batch).await {
                    Ok(f) => {
                        assert!(f.iter().all(|f| *f == Fence::Applied));
                        for i in 0..20 {
                            last.insert(format!("w{w}:{i}"), v);
                        }
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        assert!(e.is_temporary(), "a failover error must be temporary: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                v += 1;
            }
            last
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = c.primary_of("w0:0").await.unwrap();
    let promoted = c.kill_and_fail_over(victim).await.unwrap();
    assert_ne!(promoted, victim);
    // Writes resume on the same `RedisCache`, within a bounded time (a
    // connection stuck failing is replaced after 2 × response_timeout).
    let resumes = |from: u64| {
        let acked = acked.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while acked.load(Ordering::Relaxed) < from + 20 && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            acked.load(Ordering::Relaxed) >= from + 20
        }
    };
    let t_failover = std::time::Instant::now();
    let after_failover = resumes(acked.load(Ordering::Relaxed)).await;
    let resumed_in = t_failover.elapsed();

    // Move slots between the two primaries that survived, under the same load.
    let primaries = c.primaries().await.unwrap();
    let others: Vec<usize> = primaries.into_iter().filter(|&p| p != promoted).collect();
    c.reshard(others[0], others[1], 300).await.unwrap();
    let after_reshard = resumes(acked.load(Ordering::Relaxed)).await;
    stop.store(true, Ordering::Relaxed);
    let mut last = std::collections::HashMap::new();
    for w in writers {
        last.extend(w.await.unwrap());
    }
    assert!(
        after_failover && after_reshard,
        "writes resumed after the failover: {after_failover} (in {resumed_in:?}), after the \
         reshard: {after_reshard} ({} failed meanwhile, {} new cluster connections)",
        failed.load(Ordering::Relaxed),
        cache.cluster_reconnects()
    );
    // The writes acknowledged after the failover are all there: none lost.
    let keys: Vec<String> = last.keys().cloned().collect();
    let got = cache.get_many(&keys).await.unwrap();
    for (k, g) in keys.iter().zip(&got) {
        let stored = version_of(g.as_ref()).unwrap_or(0);
        assert!(
            stored >= last[k],
            "{k}: acknowledged version {} but the cluster holds {stored}",
            last[k]
        );
    }
    let after = cache.identity().await.unwrap().unwrap();
    assert_ne!(
        before, after,
        "a failover must change the cluster's identity"
    );

    // The killed primary rejoins as a replica; the cache goes on.
    c.node_mut(victim).restart().await.unwrap();
    c.wait_healthy().await.unwrap();
    cache.ping().await.unwrap();
}

/// A plain server given as a cluster, seeds of two clusters, a cluster that
/// does not serve every slot: each a typed error at connect, in time.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_topologies_are_refused_at_connect() {
    let plain = RedisServer::start().await.unwrap();
    let url = format!("redis+cluster://127.0.0.1:{}", plain.port());
    let t0 = std::time::Instant::now();
    let e = RedisCache::with_config(cluster_config(&url))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("not a Redis Cluster"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));

    let a = cluster().await;
    let b = RedisCluster::start_with(3, 0).await.unwrap();
    let mixed = format!(
        "redis+cluster://127.0.0.1:{},127.0.0.1:{}",
        a.node(0).port(),
        b.node(0).port()
    );
    let e = RedisCache::with_config(cluster_config(&mixed))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("another Redis Cluster"), "{e}");

    // Take one primary's slots away: the cluster no longer covers them.
    let victim = b.primaries().await.unwrap()[0];
    b.command(victim, &["CLUSTER", "FLUSHSLOTS"]).await.unwrap();
    let url = format!("redis+cluster://127.0.0.1:{}", b.node(victim).port());
    let t0 = std::time::Instant::now();
    let e = RedisCache::with_config(cluster_config(&url))
        .await
        .unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Config | ErrorKind::Unavailable),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());

    for bad in [
        "redis+cluster://",
        "redis+cluster://h1:1,,h2:2",
        "redis+cluster://h1:1/3",
    ] {
        let e = RedisConfig::from_url(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{bad}: {e}");
    }
}
