//! Read-hit latency and throughput: the adapter against the raw client
//! under it and against Redis (`redis`'s multiplexed connection), in one
//! run, alternating round by round so that machine noise hits all alike;
//! then a batch of fenced writes against as many single fenced writes.
//!
//! `cargo bench -p writethrough-memcached --bench latency [-- rounds]`
//!
//! Targets: memcached read hit within 1.3x of a Redis read hit; the adapter
//! within about 1.1x of the raw client. The ratios are printed; a ratio is
//! the baseline's throughput over the client's (lower is better).

use std::sync::Arc;
use std::time::Instant;

use writethrough_core::backend::{CacheItem, CacheStore, codec};
use writethrough_memcached::MemcachedCache;
use writethrough_memcached::raw::RawClient;
use writethrough_testkit::server::{MemcachedServer, RedisServer};

const SIZES: [usize; 2] = [256, 16 * 1024];
const CONCURRENCY: [usize; 2] = [1, 16];
const OPS: usize = 4000;

#[derive(Clone)]
enum Client {
    Redis(redis::aio::MultiplexedConnection),
    Raw(Arc<RawClient>),
    Adapter(MemcachedCache),
}

impl Client {
    async fn get(&self, key: &str) -> usize {
        match self {
            Client::Redis(c) => {
                let mut c = c.clone();
                let v: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                v.map_or(0, |v| v.len())
            }
            Client::Raw(c) => c.get(key).await.unwrap().map_or(0, |v| v.len()),
            Client::Adapter(c) => c.get(key).await.unwrap().map_or(0, |v| v.len()),
        }
    }
}

async fn measure(client: &Client, conc: usize, key: &str, len: usize) -> f64 {
    let per_task = OPS / conc;
    let start = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let (client, key) = (client.clone(), key.to_owned());
            tokio::spawn(async move {
                for _ in 0..per_task {
                    assert_eq!(client.get(&key).await, len, "not a hit");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (per_task * conc) as f64 / start.elapsed().as_secs_f64()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    rt.block_on(run(rounds));
}

async fn run(rounds: usize) {
    let redis_server = RedisServer::start()
        .await
        .expect("redis-server (apt-get install -y redis-server)");
    let memcached = MemcachedServer::start()
        .await
        .expect("memcached (apt-get install -y memcached)");
    let mut redis_conn = redis::Client::open(redis_server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let adapter = MemcachedCache::connect(&memcached.url()).await.unwrap();
    let raw = Arc::new(RawClient::new(&memcached.addr().to_string(), 1));
    for len in SIZES {
        let key = format!("bench:{len}");
        let v = vec![b'x'; len];
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(&v)
            .query_async(&mut redis_conn)
            .await
            .unwrap();
        adapter.set(&key, v.into(), None).await.unwrap();
    }
    let clients = [
        (
            "redis GET (MultiplexedConnection)",
            Client::Redis(redis_conn),
        ),
        ("memcached raw client (mg)", Client::Raw(raw)),
        (
            "memcached adapter (CacheStore::get)",
            Client::Adapter(adapter),
        ),
    ];
    for (_, c) in &clients {
        for len in SIZES {
            measure(c, 16, &format!("bench:{len}"), len).await;
        }
    }
    let mut results = vec![vec![vec![Vec::new(); clients.len()]; CONCURRENCY.len()]; SIZES.len()];
    for round in 0..rounds {
        for (si, len) in SIZES.iter().enumerate() {
            for (ci, conc) in CONCURRENCY.iter().enumerate() {
                for j in 0..clients.len() {
                    let k = (j + round) % clients.len();
                    let ops = measure(&clients[k].1, *conc, &format!("bench:{len}"), *len).await;
                    results[si][ci][k].push(ops);
                }
            }
        }
    }
    println!(
        "read hit, {rounds} alternating rounds of {OPS} reads; ops/s as median (best round); \
         ratios of medians (of best rounds)"
    );
    for (si, len) in SIZES.iter().enumerate() {
        for (ci, conc) in CONCURRENCY.iter().enumerate() {
            let r = &results[si][ci];
            let m: Vec<f64> = r.iter().map(|r| median(r)).collect();
            let b: Vec<f64> = r
                .iter()
                .map(|r| r.iter().copied().fold(0.0, f64::max))
                .collect();
            println!(
                "{len:>6} B, concurrency {conc:>2}: redis {:>6.0} ({:>6.0})  raw {:>6.0} ({:>6.0})  \
                 adapter {:>6.0} ({:>6.0}) | adapter vs redis x{:.2} (x{:.2}), target <= 1.3; \
                 adapter vs raw x{:.2} (x{:.2}), target ~1.1",
                m[0],
                b[0],
                m[1],
                b[1],
                m[2],
                b[2],
                m[0] / m[2],
                b[0] / b[2],
                m[1] / m[2],
                b[1] / b[2]
            );
        }
    }
    fenced_batches(&clients[2].1, rounds).await;
}

/// `set_many_if_newer` of N items against N sequential `set_if_newer`.
async fn fenced_batches(client: &Client, rounds: usize) {
    let Client::Adapter(cache) = client else {
        unreachable!("the adapter")
    };
    let n = 1000u64;
    let items = |round: u64, p: &str| -> Vec<CacheItem> {
        (0..n)
            .map(|i| CacheItem {
                key: format!("fenced:{p}:{i}"),
                entry: codec::tombstone(round + 1),
                version: round + 1,
                ttl: None,
            })
            .collect()
    };
    let (mut batch, mut single) = (Vec::new(), Vec::new());
    for round in 0..rounds as u64 {
        let t = Instant::now();
        cache.set_many_if_newer(items(round, "b")).await.unwrap();
        batch.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        for it in items(round, "s") {
            cache.set_if_newer(it).await.unwrap();
        }
        single.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "{n} fenced writes, each replacing an older entry: one set_many_if_newer {:.1} ms, \
         {n} sequential set_if_newer {:.1} ms",
        median(&batch),
        median(&single)
    );
}
