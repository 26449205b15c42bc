//! Read-hit cost of `RedisCache::get` against a raw redis-rs `GET` on a
//! multiplexed connection, in the same run, alternating.
//!
//! ```text
//! cargo test -p writethrough-redis --release --test bench -- --ignored --nocapture
//! ```
//!
//! Both sides read the same ~256-byte entry from the same server. Each round
//! runs both sides (the order flips every round) at the same concurrency;
//! the report is the median over rounds of the per-round ratio, so drift in
//! machine load hits both sides alike.

mod common;

use std::time::Instant;

use bytes::Bytes;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use writethrough_core::backend::CacheStore;
use writethrough_redis::RedisCache;

use common::*;

const KEY: &str = "bench:product:42";

async fn raw_get(conn: &MultiplexedConnection) -> Bytes {
    let mut c = conn.clone();
    let v: Option<Bytes> = c.get(KEY).await.unwrap();
    v.unwrap()
}

async fn cache_get(cache: &RedisCache) -> Bytes {
    cache.get(KEY).await.unwrap().unwrap()
}

/// Runs `ops` reads spread over `concurrency` tasks; returns nanoseconds per read.
async fn run<F, Fut>(concurrency: usize, ops: usize, read: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Bytes> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let read = read.clone();
        tasks.push(tokio::spawn(async move {
            let mut total = 0usize;
            for _ in 0..ops / concurrency {
                total += read().await.len();
            }
            total
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.unwrap();
    }
    assert_eq!(bytes, (ops / concurrency) * concurrency * 256);
    start.elapsed().as_nanos() as f64 / ((ops / concurrency) * concurrency) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
async fn read_hit_through_redis_cache_vs_raw_multiplexed_get() {
    let srv = server().await;
    let cache = cache(&srv).await;
    let value = entry_of_len(42, 256);
    assert_eq!(value.len(), 256);
    cache.set(KEY, value.clone(), None).await.unwrap();
    let raw = raw(&srv).await;
    assert_eq!(raw_get(&raw).await, value);
    assert_eq!(cache_get(&cache).await, value);

    let rounds = 15;
    for (concurrency, ops) in [(1, 4_000), (16, 32_000)] {
        // Warm both paths (connections, allocator, script cache).
        let r = raw.clone();
        run(concurrency, ops / 4, move || {
            let r = r.clone();
            async move { raw_get(&r).await }
        })
        .await;
        let c = cache.clone();
        run(concurrency, ops / 4, move || {
            let c = c.clone();
            async move { cache_get(&c).await }
        })
        .await;

        let (mut raws, mut caches, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let mut pair = [0.0; 2];
            for side in [round % 2, 1 - round % 2] {
                pair[side] = if side == 0 {
                    let r = raw.clone();
                    run(concurrency, ops, move || {
                        let r = r.clone();
                        async move { raw_get(&r).await }
                    })
                    .await
                } else {
                    let c = cache.clone();
                    run(concurrency, ops, move || {
                        let c = c.clone();
                        async move { cache_get(&c).await }
                    })
                    .await
                };
            }
            raws.push(pair[0]);
            caches.push(pair[1]);
            ratios.push(pair[1] / pair[0]);
        }
        let (r, c, q) = (median(raws), median(caches), median(ratios.clone()));
        println!(
            "concurrency {concurrency:>2}: raw GET {:>7.2} µs/op ({:>8.0} op/s), RedisCache::get {:>7.2} µs/op ({:>8.0} op/s), ratio cache/raw median {q:.3} (min {:.3}, max {:.3}) over {rounds} rounds",
            r / 1000.0,
            1e9 / r,
            c / 1000.0,
            1e9 / c,
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
        );
        assert!(q.is_finite() && q > 0.0);
    }
    // The server lives until here: dropping it kills it.
    drop(srv);
}
