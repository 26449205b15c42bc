//! Read-hit latency and throughput of memcached clients against a Redis
//! baseline, in one run, alternating the clients round by round so that
//! machine noise hits them all alike.
//!
//! Starts its own `redis-server` and `memcached` on free loopback ports.
//! Usage: `memcached-client-bench [rounds]` (default 7).

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_memcached::AsciiProtocol as _;
use tokio::process::{Child, Command};
use writethrough_core::backend::CacheStore;

const SIZES: [(&str, usize); 2] = [("256B", 256), ("16KiB", 16 * 1024)];
const CONCURRENCY: [usize; 2] = [1, 16];
/// Operations per measurement (split over the tasks).
const OPS: usize = 4000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("server on {port} did not come up");
}

async fn start(cmd: &str, args: &[String], port: u16) -> Child {
    let child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {cmd} ({e}); apt-get install -y redis-server memcached")
        });
    wait_port(port).await;
    child
}

#[derive(Clone)]
enum Client {
    Redis(redis::aio::MultiplexedConnection),
    WtRaw(Arc<writethrough_memcached::raw::RawClient>),
    WtAdapter(writethrough_memcached::MemcachedCache),
    MemcacheExp(memcache::exp::AsyncMetaClient),
    MemcacheSync(memcache::Client),
    AsyncMemcached(Arc<Vec<tokio::sync::Mutex<async_memcached::Client>>>),
    MemcacheAsync(
        Arc<Vec<tokio::sync::Mutex<memcache_async::ascii::Protocol<tokio::net::TcpStream>>>>,
    ),
}

impl Client {
    /// Reads `key` and returns the value's length (0 on a miss).
    async fn get(&self, task: usize, key: &str) -> usize {
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
            Client::WtRaw(c) => c.get(key).await.unwrap().map_or(0, |v| v.len()),
            Client::WtAdapter(c) => c.get(key).await.unwrap().map_or(0, |v| v.len()),
            Client::MemcacheExp(c) => c
                .get(key)
                .send()
                .await
                .unwrap()
                .value
                .map_or(0, |v| v.len()),
            Client::MemcacheSync(c) => {
                let c = c.clone();
                let key = key.to_owned();
                tokio::task::spawn_blocking(move || {
                    c.get::<Vec<u8>>(&key).unwrap().map_or(0, |v| v.len())
                })
                .await
                .unwrap()
            }
            Client::AsyncMemcached(pool) => {
                let mut c = pool[task % pool.len()].lock().await;
                c.get(key)
                    .await
                    .unwrap()
                    .and_then(|v| v.data)
                    .map_or(0, |v| v.len())
            }
            Client::MemcacheAsync(pool) => {
                let mut c = pool[task % pool.len()].lock().await;
                c.get(key).await.map_or(0, |v| v.len())
            }
        }
    }
}

/// Runs `OPS` reads over `conc` tasks; returns operations per second.
async fn measure(client: &Client, conc: usize, key: &'static str, len: usize) -> f64 {
    let per_task = OPS / conc;
    let start = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    assert_eq!(client.get(t, key).await, len, "not a hit");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (per_task * conc) as f64 / start.elapsed().as_secs_f64()
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(7, |s| s.parse().expect("rounds"));
    let (rport, mport) = (free_port(), free_port());
    let _redis = start(
        "redis-server",
        &[
            "--port".into(),
            rport.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
        ],
        rport,
    )
    .await;
    let _memcached = start(
        "memcached",
        &[
            "-l".into(),
            "127.0.0.1".into(),
            "-p".into(),
            mport.to_string(),
            "-U".into(),
            "0".into(),
            "-m".into(),
            "256".into(),
            "-u".into(),
            "root".into(),
        ],
        mport,
    )
    .await;
    let maddr = format!("127.0.0.1:{mport}");

    // Fill both servers.
    let rclient = redis::Client::open(format!("redis://127.0.0.1:{rport}")).unwrap();
    let mut rconn = rclient.get_multiplexed_async_connection().await.unwrap();
    let adapter = writethrough_memcached::MemcachedCache::connect(&format!("memcached://{maddr}"))
        .await
        .unwrap();
    let keys: [&'static str; 2] = ["bench:256B", "bench:16KiB"];
    for ((_, len), key) in SIZES.iter().zip(keys) {
        let v = vec![b'x'; *len];
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(&v)
            .query_async(&mut rconn)
            .await
            .unwrap();
        adapter.set(key, v.into(), None).await.unwrap();
    }

    let mut clients: Vec<(&str, Client)> = vec![
        (
            "redis MultiplexedConnection (baseline)",
            Client::Redis(rconn),
        ),
        (
            "writethrough raw meta client, 1 conn",
            Client::WtRaw(Arc::new(writethrough_memcached::raw::RawClient::new(
                &maddr, 1,
            ))),
        ),
        (
            "writethrough adapter (CacheStore::get)",
            Client::WtAdapter(adapter),
        ),
        (
            "writethrough adapter, connections=2",
            Client::WtAdapter(
                writethrough_memcached::MemcachedCache::connect(&format!(
                    "memcached://{maddr}?connections=2"
                ))
                .await
                .unwrap(),
            ),
        ),
        (
            "memcache 0.21 exp::AsyncMetaClient (pool)",
            Client::MemcacheExp(
                memcache::exp::AsyncMetaClient::connect(maddr.as_str())
                    .await
                    .unwrap(),
            ),
        ),
    ];
    let sync_default = memcache::Client::connect(format!("memcache://{maddr}")).unwrap();
    clients.push((
        "memcache 0.21 sync, defaults (binary, pool 1, check-out ping)",
        Client::MemcacheSync(sync_default),
    ));
    let pool = r2d2::Pool::builder()
        .max_size(16)
        .test_on_check_out(false)
        .build(memcache::ConnectionManager::new(
            memcache::Url::parse(&format!("memcache://{maddr}?protocol=ascii")).unwrap(),
        ))
        .unwrap();
    clients.push((
        "memcache 0.21 sync, tuned (ascii, pool 16, no ping) + spawn_blocking",
        Client::MemcacheSync(memcache::Client::with_pool(pool).unwrap()),
    ));
    let mut am = Vec::new();
    let mut ma = Vec::new();
    for _ in 0..16 {
        am.push(tokio::sync::Mutex::new(
            async_memcached::Client::new(format!("tcp://{maddr}"))
                .await
                .unwrap(),
        ));
        let s = tokio::net::TcpStream::connect(&maddr).await.unwrap();
        s.set_nodelay(true).unwrap();
        ma.push(tokio::sync::Mutex::new(
            memcache_async::ascii::Protocol::new(s),
        ));
    }
    clients.push((
        "async-memcached 0.9, one conn per task",
        Client::AsyncMemcached(Arc::new(am)),
    ));
    clients.push((
        "memcache-async 0.10, one conn per task",
        Client::MemcacheAsync(Arc::new(ma)),
    ));

    // Warm-up: every client, every scenario, once.
    for (_, c) in &clients {
        for ((_, len), key) in SIZES.iter().zip(keys) {
            measure(c, 16, key, *len).await;
        }
    }

    let n = clients.len();
    // results[size][conc][client] = ops/s per round
    let mut results = vec![vec![vec![Vec::new(); n]; CONCURRENCY.len()]; SIZES.len()];
    for round in 0..rounds {
        for (si, ((_, len), key)) in SIZES.iter().zip(keys).enumerate() {
            for (ci, conc) in CONCURRENCY.iter().enumerate() {
                // Rotate the order each round.
                for j in 0..n {
                    let k = (j + round) % n;
                    let ops = measure(&clients[k].1, *conc, key, *len).await;
                    results[si][ci][k].push(ops);
                }
            }
        }
    }
    println!(
        "read hit, {rounds} rounds alternating, {OPS} reads per measurement; median and best round; ratio = redis ops/s / client ops/s in the same statistic (lower is better)\n"
    );
    for (si, (sname, _)) in SIZES.iter().enumerate() {
        for (ci, conc) in CONCURRENCY.iter().enumerate() {
            println!("value {sname}, concurrency {conc}:");
            let base = median(&mut results[si][ci][0].clone());
            let base_best = best(&results[si][ci][0]);
            for (k, (name, _)) in clients.iter().enumerate() {
                let b = best(&results[si][ci][k]);
                let m = median(&mut results[si][ci][k]);
                println!(
                    "  {name:<68} median {:>7.0} ops/s {:>6.1} us/op x{:.2} | best {:>7.0} ops/s x{:.2}",
                    m,
                    1e6 / m * *conc as f64,
                    base / m,
                    b,
                    base_best / b
                );
            }
        }
    }
}
