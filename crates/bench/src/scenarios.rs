//! The scenarios, the alternating runner, and the report.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use writethrough::backend::{CacheStore, DbStore};
use writethrough::{
    Consistency, Engine, Entity, Handle, MonitorConfig, Patch, Result, TableOptions,
};

use crate::Args;
use crate::raw::{
    BoxError, Product, RawCache, RawDb, RawMemcached, RawMoka, RawPostgres, RawRedis,
    RawRedisCluster, RawSqlite,
};

/// Rows seeded per call.
const SEED_CHUNK: usize = 5000;

/// The process's resident memory in bytes (Linux), for an in-process cache.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn product(id: i64, size: usize, price: f64) -> Product {
    Product {
        id,
        name: format!("product {id}"),
        price,
        payload: "x".repeat(size.saturating_sub(60)),
    }
}

/// One operation: runs it and returns how long its measured part took.
type Op = Arc<dyn Fn(u64) -> BoxFuture<'static, Duration> + Send + Sync>;

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Duration> + Send + 'static,
{
    Arc::new(move |i| f(i).boxed())
}

/// Times the whole future.
async fn timed<F: std::future::Future>(f: F) -> Duration {
    let t = Instant::now();
    f.await;
    t.elapsed()
}

#[derive(Default, Clone)]
struct Sample {
    ops: u64,
    wall: Duration,
    lat: Vec<Duration>,
}

impl Sample {
    fn ops_per_sec(&self, items_per_op: u64) -> f64 {
        (self.ops * items_per_op) as f64 / self.wall.as_secs_f64().max(1e-9)
    }
    fn pct(&mut self, q: f64) -> Duration {
        if self.lat.is_empty() {
            return Duration::ZERO;
        }
        self.lat.sort_unstable();
        let i = ((self.lat.len() as f64 * q).ceil() as usize).clamp(1, self.lat.len()) - 1;
        self.lat[i]
    }
}

async fn phase(conc: usize, dur: Duration, op: &Op) -> Sample {
    let started = Instant::now();
    let workers: Vec<_> = (0..conc)
        .map(|w| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0u64;
                while started.elapsed() < dur {
                    lat.push(op(w as u64 * 1_000_000 + i).await);
                    i += 1;
                }
                lat
            })
        })
        .collect();
    let mut s = Sample::default();
    for w in workers {
        let lat = w.await.expect("a worker does not panic");
        s.ops += lat.len() as u64;
        s.lat.extend(lat);
    }
    s.wall = started.elapsed();
    s
}

/// One row of the report.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    scenario: &'static str,
    size: usize,
    conc: usize,
    items_per_op: u64,
    ours_ops: f64,
    raw_ops: f64,
    ours_p50: Duration,
    raw_p50: Duration,
    ours_p99: Duration,
    raw_p99: Duration,
    note: String,
}

struct Sides {
    ours: Op,
    raw: Op,
    items_per_op: u64,
}

struct World {
    cache: Arc<dyn CacheStore>,
    strict: Handle<Product>,
    relaxed: Handle<Product>,
    fenced: Handle<Product>,
    /// A table that tracks writes made outside the engine (its triggers installed).
    tracked: Handle<Product>,
    /// The strict table, read through an engine whose consistency monitor
    /// re-checks 1 % of the hits.
    monitored: Handle<Product>,
    strict_engine: Engine,
    raw_cache: Arc<dyn RawCache>,
    raw_db: Arc<dyn RawDb>,
    external: Arc<dyn RawDb>,
    raw_table: String,
    size: usize,
    /// Read hits of the raw side that found no entry (and loaded the row).
    raw_misses: Arc<AtomicU64>,
    keys: u64,
    /// Cache memory per entry, ours and raw, when measured.
    memory: Option<(f64, f64)>,
}

fn raw_key(size: usize, id: i64) -> String {
    format!("raw:{size}:{id}")
}

fn encode(p: &Product) -> Bytes {
    Bytes::from(serde_json::to_vec(p).expect("encodes"))
}

impl World {
    fn sides(&self, scenario: &str) -> Option<Sides> {
        let size = self.size;
        let (h, hr) = (self.strict.clone(), self.relaxed.clone());
        let (rc, rd, rt) = (
            self.raw_cache.clone(),
            self.raw_db.clone(),
            self.raw_table.clone(),
        );
        let cache = self.cache.clone();
        let misses = self.raw_misses.clone();
        let keys = self.keys;
        let key = move |i: u64| (i % keys) as i64;
        let s = match scenario {
            "read_hit" | "read_hit_shared" => Sides {
                ours: if scenario == "read_hit" {
                    op(move |i| {
                        let h = h.clone();
                        async move {
                            timed(async { assert!(h.get(key(i)).await.unwrap().is_some()) }).await
                        }
                    })
                } else {
                    op(move |i| {
                        let h = h.clone();
                        async move {
                            timed(async { assert!(h.get_arc(key(i)).await.unwrap().is_some()) })
                                .await
                        }
                    })
                },
                raw: op(move |i| {
                    let (rc, rd, rt, misses) = (rc.clone(), rd.clone(), rt.clone(), misses.clone());
                    async move {
                        timed(async {
                            let k = raw_key(size, key(i));
                            let p = match rc.get(&k).await.unwrap() {
                                Some(b) => serde_json::from_slice::<Product>(&b).unwrap(),
                                // Evicted (a server cache short of memory):
                                // load as ours does, and count it.
                                None => {
                                    misses.fetch_add(1, Ordering::Relaxed);
                                    let p = rd.get(&rt, key(i)).await.unwrap().expect("prefilled");
                                    rc.set(&k, encode(&p)).await.unwrap();
                                    p
                                }
                            };
                            std::hint::black_box(p);
                        })
                        .await
                    }
                }),
                items_per_op: 1,
            },
            "read_miss" => Sides {
                ours: op(move |i| {
                    let (h, cache) = (h.clone(), cache.clone());
                    async move {
                        let k = key(i);
                        cache.delete(&h.cache_key(k).unwrap()).await.unwrap();
                        timed(async { assert!(h.get(k).await.unwrap().is_some()) }).await
                    }
                }),
                raw: op(move |i| {
                    let (rc, rd, rt) = (rc.clone(), rd.clone(), rt.clone());
                    async move {
                        let k = raw_key(size, key(i));
                        rc.del(&k).await.unwrap();
                        timed(async {
                            if rc.get(&k).await.unwrap().is_none() {
                                let p = rd.get(&rt, key(i)).await.unwrap().expect("prefilled");
                                rc.set(&k, encode(&p)).await.unwrap();
                            }
                        })
                        .await
                    }
                }),
                items_per_op: 1,
            },
            "write" | "write_fenced" | "write_unfenced" => {
                let h = match scenario {
                    "write" => h,
                    "write_fenced" => self.fenced.clone(),
                    _ => hr,
                };
                Sides {
                    ours: op(move |i| {
                        let h = h.clone();
                        async move {
                            let p = product(key(i), size, i as f64);
                            timed(async { h.put(&p).await.unwrap() }).await
                        }
                    }),
                    raw: op(move |i| {
                        let (rc, rd, rt) = (rc.clone(), rd.clone(), rt.clone());
                        async move {
                            let p = product(key(i), size, i as f64);
                            timed(async {
                                rd.upsert(&rt, &p).await.unwrap();
                                rc.set(&raw_key(size, p.id), encode(&p)).await.unwrap();
                            })
                            .await
                        }
                    }),
                    items_per_op: 1,
                }
            }
            // Ours through the engine with the monitor on, "raw" the same
            // hit through the engine without it: the monitor's cost.
            "read_hit_monitored" => {
                let monitored = self.monitored.clone();
                Sides {
                    ours: op(move |i| {
                        let h = monitored.clone();
                        async move {
                            timed(async { assert!(h.get(key(i)).await.unwrap().is_some()) }).await
                        }
                    }),
                    raw: op(move |i| {
                        let h = h.clone();
                        async move {
                            timed(async { assert!(h.get(key(i)).await.unwrap().is_some()) }).await
                        }
                    }),
                    items_per_op: 1,
                }
            }
            // Ours on the table with the triggers installed, "raw" the same
            // write on the table without them: the triggers' cost.
            "write_tracked" => {
                let tracked = self.tracked.clone();
                Sides {
                    ours: op(move |i| {
                        let h = tracked.clone();
                        async move {
                            let p = product(key(i), size, i as f64);
                            timed(async { h.put(&p).await.unwrap() }).await
                        }
                    }),
                    raw: op(move |i| {
                        let h = h.clone();
                        async move {
                            let p = product(key(i), size, i as f64);
                            timed(async { h.put(&p).await.unwrap() }).await
                        }
                    }),
                    items_per_op: 1,
                }
            }
            "update" => Sides {
                ours: op(move |i| {
                    let h = h.clone();
                    async move {
                        timed(async {
                            let p = h
                                .update(key(i), Patch::new().set("price", i as f64))
                                .await
                                .unwrap();
                            assert!(p.is_some());
                        })
                        .await
                    }
                }),
                raw: op(move |i| {
                    let (rc, rd, rt) = (rc.clone(), rd.clone(), rt.clone());
                    async move {
                        timed(async {
                            let p = rd
                                .update_price(&rt, key(i), i as f64)
                                .await
                                .unwrap()
                                .expect("row");
                            rc.set(&raw_key(size, p.id), encode(&p)).await.unwrap();
                        })
                        .await
                    }
                }),
                items_per_op: 1,
            },
            "delete" => Sides {
                ours: op(move |i| {
                    let h = h.clone();
                    async move {
                        let k = key(i);
                        let t = timed(async { h.delete(k).await.unwrap() }).await;
                        h.put(&product(k, size, 1.0)).await.unwrap();
                        t
                    }
                }),
                raw: op(move |i| {
                    let (rc, rd, rt) = (rc.clone(), rd.clone(), rt.clone());
                    async move {
                        let k = key(i);
                        let t = timed(async {
                            rd.delete(&rt, k).await.unwrap();
                            rc.del(&raw_key(size, k)).await.unwrap();
                        })
                        .await;
                        let p = product(k, size, 1.0);
                        rd.upsert(&rt, &p).await.unwrap();
                        rc.set(&raw_key(size, k), encode(&p)).await.unwrap();
                        t
                    }
                }),
                items_per_op: 1,
            },
            "batch100" | "batch100_unfenced" => {
                let h = if scenario == "batch100" { h } else { hr };
                Sides {
                    ours: op(move |i| {
                        let h = h.clone();
                        async move {
                            let base = (i / 1_000_000) as i64 * 100;
                            let ps: Vec<Product> = (0..100)
                                .map(|j| product(10_000 + base + j, size, i as f64))
                                .collect();
                            timed(async { h.put_many(&ps).await.unwrap() }).await
                        }
                    }),
                    raw: op(move |i| {
                        let (rc, rd, rt) = (rc.clone(), rd.clone(), rt.clone());
                        async move {
                            let base = (i / 1_000_000) as i64 * 100;
                            let ps: Vec<Product> = (0..100)
                                .map(|j| product(10_000 + base + j, size, i as f64))
                                .collect();
                            timed(async {
                                rd.upsert_many(&rt, &ps).await.unwrap();
                                rc.set_many(
                                    ps.iter()
                                        .map(|p| (raw_key(size, p.id), encode(p)))
                                        .collect(),
                                )
                                .await
                                .unwrap();
                            })
                            .await
                        }
                    }),
                    items_per_op: 100,
                }
            }
            _ => return None,
        };
        Some(s)
    }

    /// A write made outside the engine (an `UPDATE` on the raw driver's own
    /// connection, which the triggers see as external) until the engine's
    /// cache serves it: 200 rounds, each on a cached row. The p50 and p99
    /// columns are that delay (ours), the raw columns the external
    /// `UPDATE` itself.
    async fn external(&self) -> Row {
        const ROUNDS: u64 = 200;
        let table = format!("wtx_{}", self.size);
        let (mut lag, mut write) = (Sample::default(), Sample::default());
        let mut worst = Duration::ZERO;
        let started = Instant::now();
        for i in 0..ROUNDS {
            let id = 500_000 + (i % 20) as i64;
            let p = product(id, self.size, 1.0);
            self.tracked.put(&p).await.unwrap();
            assert!(self.tracked.get(id).await.unwrap().is_some());
            let price = 2.0 + i as f64;
            let t = Instant::now();
            self.external
                .update_price(&table, id, price)
                .await
                .unwrap()
                .expect("the row is there");
            let committed = Instant::now();
            write.lat.push(committed - t);
            loop {
                if self.tracked.get(id).await.unwrap().map(|p| p.price) == Some(price) {
                    break;
                }
                assert!(
                    committed.elapsed() < Duration::from_secs(30),
                    "never repaired"
                );
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let d = committed.elapsed();
            worst = worst.max(d);
            lag.lat.push(d);
        }
        let wall = started.elapsed();
        let rate = ROUNDS as f64 / wall.as_secs_f64().max(1e-9);
        Row {
            scenario: "external",
            size: self.size,
            conc: 1,
            items_per_op: 1,
            ours_ops: rate,
            raw_ops: rate,
            ours_p50: lag.pct(0.50),
            raw_p50: write.pct(0.50),
            ours_p99: lag.pct(0.99),
            raw_p99: write.pct(0.99),
            note: format!(
                "{ROUNDS} external UPDATEs; p50/p99 ours = commit to the cache serving it (max {worst:.1?}), raw = the UPDATE itself"
            ),
        }
    }

    /// 1,000 concurrent reads of one cold key: how many database loads each side makes.
    /// Warming every row of the table into the cache: ours with
    /// `Handle::warm` (pages of the database, fenced batches) into a
    /// cleared table prefix, raw with the same pages and pipelined SETs
    /// (overwriting, which costs Redis what a new key does). Items/s; the
    /// p50 and p99 columns are the whole warm.
    async fn warm(&self) -> Row {
        let n = self.keys;
        let ck = self.strict.cache_key(0).unwrap();
        if let Some(prefix) = ck.strip_suffix('0') {
            self.cache.clear(prefix).await.unwrap();
        }
        let started = Instant::now();
        let warmed = self.strict.warm(usize::MAX).await.unwrap();
        let ours_wall = started.elapsed();
        let started = Instant::now();
        let (mut after, mut done) = (-1i64, 0u64);
        loop {
            let page = self.raw_db.scan(&self.raw_table, after, 500).await.unwrap();
            let Some(last) = page.last() else { break };
            after = last.id;
            done += page.len() as u64;
            self.raw_cache
                .set_many(
                    page.iter()
                        .map(|p| (raw_key(self.size, p.id), encode(p)))
                        .collect(),
                )
                .await
                .unwrap();
        }
        let raw_wall = started.elapsed();
        let rate = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        Row {
            scenario: "warm",
            size: self.size,
            conc: 1,
            items_per_op: 1,
            ours_ops: rate(ours_wall),
            raw_ops: rate(raw_wall),
            ours_p50: ours_wall,
            raw_p50: raw_wall,
            ours_p99: ours_wall,
            raw_p99: raw_wall,
            note: format!(
                "{n} rows; p50 and p99 are the whole warm; ours wrote {warmed}, raw set {done}"
            ),
        }
    }

    async fn stampede(&self) -> Row {
        let id = 999_999;
        let p = product(id, self.size, 1.0);
        self.strict.put(&p).await.unwrap();
        self.raw_db.upsert(&self.raw_table, &p).await.unwrap();
        let mut ours = Sample::default();
        let mut raw = Sample::default();
        self.cache
            .delete(&self.strict.cache_key(id).unwrap())
            .await
            .unwrap();
        self.raw_cache.del(&raw_key(self.size, id)).await.unwrap();
        let loads_before = self.strict_engine.stats().loads;
        let started = Instant::now();
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let h = self.strict.clone();
                tokio::spawn(
                    async move { timed(async { h.get(id).await.unwrap().unwrap() }).await },
                )
            })
            .collect();
        for t in tasks {
            ours.lat.push(t.await.unwrap());
        }
        ours.wall = started.elapsed();
        ours.ops = 1000;
        let ours_loads = self.strict_engine.stats().loads - loads_before;
        let raw_loads = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let (rc, rd, rt, loads) = (
                    self.raw_cache.clone(),
                    self.raw_db.clone(),
                    self.raw_table.clone(),
                    raw_loads.clone(),
                );
                let size = self.size;
                tokio::spawn(async move {
                    timed(async {
                        let k = raw_key(size, id);
                        if rc.get(&k).await.unwrap().is_none() {
                            loads.fetch_add(1, Ordering::Relaxed);
                            let p = rd.get(&rt, id).await.unwrap().unwrap();
                            rc.set(&k, encode(&p)).await.unwrap();
                        }
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            raw.lat.push(t.await.unwrap());
        }
        raw.wall = started.elapsed();
        raw.ops = 1000;
        Row {
            scenario: "stampede_1000",
            size: self.size,
            conc: 1000,
            items_per_op: 1,
            ours_ops: ours.ops_per_sec(1),
            raw_ops: raw.ops_per_sec(1),
            ours_p50: ours.pct(0.5),
            raw_p50: raw.pct(0.5),
            ours_p99: ours.pct(0.99),
            raw_p99: raw.pct(0.99),
            note: format!(
                "database loads: ours {ours_loads}, raw {}",
                raw_loads.load(Ordering::Relaxed)
            ),
        }
    }
}

const ALL: [&str; 15] = [
    "read_hit",
    "read_hit_shared",
    "read_miss",
    "write",
    "write_fenced",
    "write_unfenced",
    "update",
    "delete",
    "batch100",
    "batch100_unfenced",
    "stampede",
    "warm",
    "write_tracked",
    "external",
    "read_hit_monitored",
];

/// The read hit of ours and of the raw driver on Redis and on Memcached,
/// the four alternating in one run.
pub(crate) const HEAD_TO_HEAD: &str = "read_hit_redis_vs_memcached";

/// Every scenario name `--scenarios` accepts.
pub(crate) fn known(name: &str) -> bool {
    ALL.contains(&name) || name == HEAD_TO_HEAD
}

/// The six pairs, for `--pairs all`.
pub(crate) const ALL_PAIRS: [&str; 6] = [
    "moka+sqlite",
    "redis+sqlite",
    "memcached+sqlite",
    "moka+postgres",
    "redis+postgres",
    "memcached+postgres",
];

/// The backend a URL names, by its scheme.
pub(crate) fn kind(url: &str) -> &'static str {
    match url.split_once(':').map_or("", |(s, _)| s) {
        "moka" => "moka",
        "redis" | "rediss" | "redis+unix" | "unix" => "redis",
        "redis+cluster" | "rediss+cluster" => "redis-cluster",
        "memcached" | "memcache" => "memcached",
        "sqlite" => "sqlite",
        "postgres" | "postgresql" => "postgres",
        _ => "unknown",
    }
}

/// A cache and a database that every scenario runs on.
#[derive(Debug, Clone)]
pub(crate) struct Pair {
    /// `cache+database`, e.g. `redis+postgres`.
    pub(crate) label: String,
    /// Cache URL.
    pub(crate) cache: String,
    /// Database URL.
    pub(crate) db: String,
}

impl Pair {
    /// A pair of URLs, labelled by their backends.
    pub(crate) fn new(cache: &str, db: &str) -> Self {
        Pair {
            label: format!("{}+{}", kind(cache), kind(db)),
            cache: cache.to_owned(),
            db: db.to_owned(),
        }
    }

    /// The cache backend's name.
    fn cache_kind(&self) -> &'static str {
        kind(&self.cache)
    }

    /// The engines' cache namespace (`bench_redis_postgres`): one per pair,
    /// so that pairs sharing a cache server do not see each other's entries.
    fn namespace(&self) -> String {
        format!("bench_{}", self.label.replace('+', "_"))
    }
}

/// A URL with its password, if any, replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(x) => x,
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

fn backend_err(e: BoxError) -> writethrough::Error {
    writethrough::Error::new(writethrough::ErrorKind::Backend, e.to_string())
}

fn config_err(m: String) -> writethrough::Error {
    writethrough::Error::new(writethrough::ErrorKind::Config, m)
}

/// Both sides of one pair: ours through `writethrough::open_cache` /
/// `open_db`, the raw drivers from the same URLs.
struct Backends {
    cache: Arc<dyn CacheStore>,
    db: Arc<dyn DbStore>,
    raw_cache: Arc<dyn RawCache>,
    raw_db: Arc<dyn RawDb>,
    /// A plain connection to our database (an external writer).
    external: Arc<dyn RawDb>,
    /// The raw SQLite file's directory for `sqlite::temp:`.
    _temp: Option<tempfile::TempDir>,
}

async fn open(cache_url: &str, db_url: &str) -> Result<Backends> {
    let mut temp = None;
    let mut db_url = db_url.to_owned();
    let (raw_db, external): (Arc<dyn RawDb>, Arc<dyn RawDb>) = match kind(&db_url) {
        "sqlite" => {
            let path = if db_url == "sqlite::temp:" {
                // Ours and the raw side in a temporary directory, side by
                // side on the same file system.
                let dir = tempfile::tempdir().map_err(|e| config_err(e.to_string()))?;
                let p = dir.path().join("raw.db");
                db_url = format!("sqlite://{}", dir.path().join("ours.db").display());
                temp = Some(dir);
                p
            } else {
                let rest = &db_url["sqlite:".len()..];
                std::path::PathBuf::from(rest.strip_prefix("//").unwrap_or(rest))
            };
            let raw = RawSqlite::open(&path).map_err(|e| config_err(e.to_string()))?;
            let rest = &db_url["sqlite:".len()..];
            let ours = std::path::PathBuf::from(rest.strip_prefix("//").unwrap_or(rest));
            // The external writer: a plain connection to our file.
            let external = RawSqlite::open(&ours).map_err(|e| config_err(e.to_string()))?;
            (Arc::new(raw), Arc::new(external))
        }
        "postgres" => {
            // The raw driver's connections are not the engine's: to the
            // triggers they are an external writer.
            let raw = Arc::new(RawPostgres::connect(&db_url).await.map_err(backend_err)?);
            (raw.clone(), raw)
        }
        _ => return Err(config_err(format!("no raw driver for {db_url}"))),
    };
    let db = writethrough::open_db(&db_url).await?;
    let cache = writethrough::open_cache(cache_url).await?;
    let raw_cache: Arc<dyn RawCache> = match kind(cache_url) {
        "moka" => {
            // What a careful user would configure: a bounded cache with a TTL
            // (ours has per-entry TTLs, which cost Moka a little more).
            // The same capacity as ours (`moka://?max_bytes=N`, 256 MiB by default).
            let max_bytes = cache_url
                .split_once('?')
                .and_then(|(_, q)| q.split('&').find_map(|p| p.strip_prefix("max_bytes=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(256 << 20);
            let raw = moka::future::Cache::builder()
                .max_capacity(max_bytes)
                .time_to_live(Duration::from_secs(3600))
                .weigher(|k: &String, v: &Bytes| {
                    u32::try_from(k.len() + v.len()).unwrap_or(u32::MAX)
                })
                .build();
            Arc::new(RawMoka(raw))
        }
        "redis" => Arc::new(RawRedis::connect(cache_url).await.map_err(backend_err)?),
        "redis-cluster" => Arc::new(
            RawRedisCluster::connect(cache_url)
                .await
                .map_err(backend_err)?,
        ),
        "memcached" => {
            Arc::new(RawMemcached::connect(cache_url).map_err(|e| config_err(e.to_string()))?)
        }
        _ => return Err(config_err(format!("no raw driver for {cache_url}"))),
    };
    Ok(Backends {
        cache,
        db,
        raw_cache,
        raw_db,
        external,
        _temp: temp,
    })
}

/// The engines of a pair: everything on (`strict`), nothing on
/// (`relaxed`), and fenced without the outbox (`fenced`, for the
/// outbox's cost).
async fn engines(b: &Backends, ns: &str) -> Result<(Engine, Engine, Engine)> {
    let nf = format!("{ns}_nf");
    let fo = format!("{ns}_fo");
    // A shared cache server may hold entries of an earlier run whose
    // versions are newer than what this run's database gives (a fresh
    // SQLite file starts over): they would fence this run's writes out.
    for n in [ns, nf.as_str(), fo.as_str()] {
        b.cache.clear(&format!("{n}:")).await?;
    }
    let fenced = Engine::builder_dyn(b.cache.clone(), b.db.clone())
        .namespace(&fo)
        .consistency(Consistency::fenced())
        .build()?;
    // WT_BENCH_EPOCHS=0 measures the strict path without the cache epochs
    // and the write deadline, to show what they cost.
    let epochs = std::env::var("WT_BENCH_EPOCHS").map_or(true, |v| v != "0");
    let strict = Engine::builder_dyn(b.cache.clone(), b.db.clone())
        .namespace(ns)
        .consistency(Consistency::strict().epochs(epochs))
        .build()?;
    let relaxed = Engine::builder_dyn(b.cache.clone(), b.db.clone())
        .namespace(&nf)
        .consistency(Consistency::none())
        .build()?;
    Ok((strict, relaxed, fenced))
}

/// Registers the tables of one value size and fills both sides with the
/// same rows, cached.
async fn world(
    b: &Backends,
    (strict, relaxed, fenced): &(Engine, Engine, Engine),
    size: usize,
    keys: u64,
) -> Result<World> {
    let table = |prefix: &str| Product::table().renamed(&format!("{prefix}_{size}"));
    let strict_h = strict
        .register_in(table("wt")?, TableOptions::new())
        .await?;
    let relaxed_h = relaxed
        .register_in(table("wtnf")?, TableOptions::new())
        .await?;
    let fenced_h = fenced
        .register_in(table("wtfo")?, TableOptions::new())
        .await?;
    // Same namespace and table as `strict`: the same entries, read through
    // an engine with the monitor on.
    let monitored_engine = Engine::builder_dyn(b.cache.clone(), b.db.clone())
        .namespace(&strict.config().namespace)
        .configure(|c| c.monitor = Some(MonitorConfig::sampling(0.01)))
        .build()?;
    let monitored_h = monitored_engine
        .register_in(table("wt")?, TableOptions::new())
        .await?;
    let tracked_h = strict
        .register_in(
            table("wtx")?,
            TableOptions::new().track_external_writes(true),
        )
        .await?;
    let raw_table = format!("raw_{size}");
    b.raw_db.setup(&raw_table).await.map_err(backend_err)?;
    let mut world = World {
        cache: b.cache.clone(),
        strict: strict_h,
        relaxed: relaxed_h,
        fenced: fenced_h,
        tracked: tracked_h,
        monitored: monitored_h,
        strict_engine: strict.clone(),
        raw_cache: b.raw_cache.clone(),
        raw_db: b.raw_db.clone(),
        external: b.external.clone(),
        raw_table,
        size,
        raw_misses: Arc::new(AtomicU64::new(0)),
        keys,
        memory: None,
    };
    // Many keys: the memory each side's entries take, from the server's
    // count or the process's RSS around its own seeding (database rows
    // first, so that only cache entries fall between the measurements).
    let measure = keys >= 10_000;
    let mem = |w: &World| {
        let rc = w.raw_cache.clone();
        async move {
            Ok::<Option<u64>, writethrough::Error>(
                match rc.used_memory().await.map_err(backend_err)? {
                    Some(m) => Some(m),
                    None if rc.in_process() => Some(rss()),
                    None => None,
                },
            )
        }
    };
    let ids: Vec<i64> = (0..keys as i64).collect();
    for chunk in ids.chunks(SEED_CHUNK) {
        let seed: Vec<Product> = chunk.iter().map(|&id| product(id, size, 1.0)).collect();
        world
            .raw_db
            .upsert_many(&world.raw_table, &seed)
            .await
            .map_err(backend_err)?;
        // The other engines' tables only serve writes: with many keys, they
        // are seeded with the first thousand.
        if chunk[0] < 1000 {
            world.relaxed.put_many(&seed).await?;
            world.fenced.put_many(&seed).await?;
        }
    }
    let m0 = mem(&world).await?;
    for chunk in ids.chunks(SEED_CHUNK) {
        let seed: Vec<Product> = chunk.iter().map(|&id| product(id, size, 1.0)).collect();
        world.strict.put_many(&seed).await?;
    }
    let m1 = mem(&world).await?;
    for chunk in ids.chunks(SEED_CHUNK) {
        world
            .raw_cache
            .set_many(
                chunk
                    .iter()
                    .map(|&id| (raw_key(size, id), encode(&product(id, size, 1.0))))
                    .collect(),
            )
            .await
            .map_err(backend_err)?;
    }
    let m2 = mem(&world).await?;
    if let (true, Some(m0), Some(m1), Some(m2)) = (measure, m0, m1, m2) {
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / keys as f64;
        world.memory = Some((per(m0, m1), per(m1, m2)));
    }
    Ok(world)
}

/// Runs `ops` alternately for `args.rounds` rounds, rotating which goes
/// first, and returns one accumulated sample per op.
async fn alternate(args: &Args, conc: usize, ops: &[&Op]) -> Vec<Sample> {
    let mut acc = vec![Sample::default(); ops.len()];
    for round in 0..args.rounds {
        for j in 0..ops.len() {
            let i = (round + j) % ops.len();
            let s = phase(conc, args.duration, ops[i]).await;
            acc[i].ops += s.ops;
            acc[i].wall += s.wall;
            acc[i].lat.extend(s.lat);
        }
    }
    acc
}

/// Runs every selected scenario on one pair and returns the report rows.
pub(crate) async fn run_pair(args: &Args, pair: &Pair) -> Result<Vec<Row>> {
    let wanted = |s: &str| args.scenarios.is_empty() || args.scenarios.iter().any(|x| x == s);
    if !ALL.iter().any(|s| wanted(s)) {
        return Ok(Vec::new());
    }
    let backends = open(&pair.cache, &pair.db).await?;
    let all = engines(&backends, &pair.namespace()).await?;
    let strict_engine = all.0.clone();
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let world = world(&backends, &all, size, args.keys).await?;
        if let Some((n, ours)) = args.count {
            let scenario = ALL.iter().find(|s| wanted(s)).expect("checked above");
            let sides = world.sides(scenario).ok_or_else(|| {
                writethrough::Error::new(
                    writethrough::ErrorKind::Config,
                    format!("--count runs a timed scenario, not {scenario}"),
                )
            })?;
            let op = if ours { &sides.ours } else { &sides.raw };
            for i in 0..n {
                op(i).await;
            }
            eprintln!(
                "ran {n} operations of {scenario} ({})",
                if ours { "ours" } else { "raw" }
            );
            return Ok(Vec::new());
        }
        for scenario in ALL {
            if !wanted(scenario) {
                continue;
            }
            // One-shot scenarios: a row of their own, not timed phases.
            let once = match scenario {
                "warm" => Some(world.warm().await),
                "stampede" => Some(world.stampede().await),
                "external" => Some(world.external().await),
                _ => None,
            };
            if let Some(row) = once {
                eprintln!(
                    "{:<18} {:<16} {:>6} B: {}",
                    pair.label, row.scenario, size, row.note
                );
                rows.push(row);
                continue;
            }
            let sides = world.sides(scenario).expect("a known scenario");
            for &conc in &args.concurrency {
                let misses_before = (
                    strict_engine.stats().misses,
                    world.raw_misses.load(Ordering::Relaxed),
                );
                let mut s = alternate(args, conc, &[&sides.ours, &sides.raw]).await;
                let (mut raw, mut ours) = (s.pop().expect("two"), s.pop().expect("two"));
                let mut note = String::new();
                if scenario.starts_with("read_hit") {
                    let ours_misses = strict_engine.stats().misses - misses_before.0;
                    let raw_misses = world.raw_misses.load(Ordering::Relaxed) - misses_before.1;
                    if ours_misses + raw_misses > 0 {
                        note = format!("cache misses: ours {ours_misses}, raw {raw_misses}");
                    }
                    if let Some((o, r)) = world.memory {
                        if !note.is_empty() {
                            note.push_str("; ");
                        }
                        note.push_str(&format!(
                            "{} keys, cache bytes per entry: ours {o:.0}, raw {r:.0}",
                            world.keys
                        ));
                    }
                }
                let row = Row {
                    scenario,
                    size,
                    conc,
                    items_per_op: sides.items_per_op,
                    ours_ops: ours.ops_per_sec(sides.items_per_op),
                    raw_ops: raw.ops_per_sec(sides.items_per_op),
                    ours_p50: ours.pct(0.5),
                    raw_p50: raw.pct(0.5),
                    ours_p99: ours.pct(0.99),
                    raw_p99: raw.pct(0.99),
                    note,
                };
                eprintln!(
                    "{:<18} {:<16} {:>6} B  c={:<3} ours {:>9.0}/s raw {:>9.0}/s  p50 ratio {:.2}",
                    pair.label,
                    scenario,
                    size,
                    conc,
                    row.ours_ops,
                    row.raw_ops,
                    ratio(row.ours_p50, row.raw_p50)
                );
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// One row of the Redis-against-Memcached read hit: ours and raw on each.
#[derive(Debug, Clone)]
pub(crate) struct HeadToHead {
    size: usize,
    conc: usize,
    /// Ours on Redis, ours on Memcached, raw Redis, raw Memcached:
    /// (ops/s, p50, p99).
    cells: [(f64, Duration, Duration); 4],
    note: String,
}

/// The read hit on Redis and on Memcached, ours and raw, the four
/// alternating phase by phase so that the machine's noise hits all alike.
/// The database (a temporary SQLite file each) only seeds the rows.
pub(crate) async fn head_to_head(
    args: &Args,
    redis_url: &str,
    memcached_url: &str,
) -> Result<Vec<HeadToHead>> {
    let r = open(redis_url, "sqlite::temp:").await?;
    let m = open(memcached_url, "sqlite::temp:").await?;
    let r_all = engines(&r, "bench_h2h_redis").await?;
    let m_all = engines(&m, "bench_h2h_memcached").await?;
    let mut out = Vec::new();
    for &size in &args.sizes {
        let rw = world(&r, &r_all, size, args.keys).await?;
        let mw = world(&m, &m_all, size, args.keys).await?;
        let (rs, ms) = (
            rw.sides("read_hit").expect("known"),
            mw.sides("read_hit").expect("known"),
        );
        for &conc in &args.concurrency {
            let before = [
                r_all.0.stats().misses,
                m_all.0.stats().misses,
                rw.raw_misses.load(Ordering::Relaxed),
                mw.raw_misses.load(Ordering::Relaxed),
            ];
            let samples = alternate(args, conc, &[&rs.ours, &ms.ours, &rs.raw, &ms.raw]).await;
            let after = [
                r_all.0.stats().misses,
                m_all.0.stats().misses,
                rw.raw_misses.load(Ordering::Relaxed),
                mw.raw_misses.load(Ordering::Relaxed),
            ];
            let misses: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
            let note = if misses.iter().any(|&n| n > 0) {
                format!(
                    "cache misses (ours redis, ours memcached, raw redis, raw memcached): {misses:?}"
                )
            } else {
                String::new()
            };
            let mut cells = [(0.0, Duration::ZERO, Duration::ZERO); 4];
            for (cell, mut s) in cells.iter_mut().zip(samples) {
                *cell = (s.ops_per_sec(1), s.pct(0.5), s.pct(0.99));
            }
            eprintln!(
                "{HEAD_TO_HEAD} {size:>6} B  c={conc:<3} p50 memcached/redis: ours {:.2}, raw {:.2}",
                ratio(cells[1].1, cells[0].1),
                ratio(cells[3].1, cells[2].1)
            );
            out.push(HeadToHead {
                size,
                conc,
                cells,
                note,
            });
        }
    }
    Ok(out)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// One pair's report as a Markdown table.
pub(crate) fn render(args: &Args, pair: &Pair, rows: &[Row]) -> String {
    let mut s = format!(
        "### {}\n\ncache `{}`, database `{}`; {} round(s) of {} ms per side, alternating.\n\
         Throughput in items/s; latencies in µs; `p50 ×` is ours / raw (lower is better), \
         `thr ×` is ours / raw (higher is better).\n\n\
         | scenario | value | conc | ours/s | raw/s | thr × | ours p50 | raw p50 | p50 × | ours p99 | raw p99 | note |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        pair.label,
        redact(&pair.cache),
        redact(&pair.db),
        args.rounds,
        args.duration.as_millis()
    );
    for r in rows {
        let _ = r.items_per_op;
        s.push_str(&format!(
            "| {} | {} B | {} | {:.0} | {:.0} | {:.2} | {} | {} | {:.2} | {} | {} | {} |\n",
            r.scenario,
            r.size,
            r.conc,
            r.ours_ops,
            r.raw_ops,
            r.ours_ops / r.raw_ops.max(1e-9),
            us(r.ours_p50),
            us(r.raw_p50),
            ratio(r.ours_p50, r.raw_p50),
            us(r.ours_p99),
            us(r.raw_p99),
            r.note
        ));
    }
    s
}

/// The read hit per cache backend over the pairs that ran (means over the
/// pairs sharing a cache), and Memcached over Redis where both ran.
pub(crate) fn render_summary(results: &[(Pair, Vec<Row>)]) -> String {
    let mut s = String::from(
        "### read hit per cache backend\n\n\
         From the pair tables above (each pair ran at its own time; a backend in several pairs \
         is their mean). Throughput in reads/s, p50 in µs.\n\n\
         | cache | value | conc | ours/s | ours p50 | raw/s | raw p50 | pairs |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    // (cache, size, conc) -> (ours ops, ours p50, raw ops, raw p50, pairs)
    type Acc = (f64, f64, f64, f64, Vec<String>);
    let mut cells: Vec<((&str, usize, usize), Acc)> = Vec::new();
    for (pair, rows) in results {
        for r in rows.iter().filter(|r| r.scenario == "read_hit") {
            let k = (pair.cache_kind(), r.size, r.conc);
            let i = match cells.iter().position(|(c, _)| *c == k) {
                Some(i) => i,
                None => {
                    cells.push((k, (0.0, 0.0, 0.0, 0.0, Vec::new())));
                    cells.len() - 1
                }
            };
            let a = &mut cells[i].1;
            a.0 += r.ours_ops;
            a.1 += r.ours_p50.as_secs_f64();
            a.2 += r.raw_ops;
            a.3 += r.raw_p50.as_secs_f64();
            a.4.push(pair.label.clone());
        }
    }
    let mean = |a: &Acc| {
        let n = a.4.len().max(1) as f64;
        (a.0 / n, a.1 / n, a.2 / n, a.3 / n)
    };
    cells.sort_by_key(|((c, size, conc), _)| (*size, *conc, *c));
    for ((cache, size, conc), a) in &cells {
        let (oo, op, ro, rp) = mean(a);
        s.push_str(&format!(
            "| {cache} | {size} B | {conc} | {oo:.0} | {:.1} | {ro:.0} | {:.1} | {} |\n",
            op * 1e6,
            rp * 1e6,
            a.4.join(", ")
        ));
    }
    let find = |cache: &str, size: usize, conc: usize| {
        cells
            .iter()
            .find(|(k, _)| *k == (cache, size, conc))
            .map(|(_, a)| mean(a))
    };
    let mut ratios = String::new();
    for ((cache, size, conc), _) in &cells {
        if *cache != "redis" {
            continue;
        }
        if let (Some(r), Some(m)) = (find("redis", *size, *conc), find("memcached", *size, *conc)) {
            ratios.push_str(&format!(
                "| {size} B | {conc} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                m.1 / r.1.max(1e-12),
                m.0 / r.0.max(1e-9),
                m.3 / r.3.max(1e-12),
                m.2 / r.2.max(1e-9),
            ));
        }
    }
    if !ratios.is_empty() {
        s.push_str(
            "\nMemcached / Redis (p50: lower is better, target ≤ 1.30 for ours; \
             thr: higher is better):\n\n\
             | value | conc | ours p50 × | ours thr × | raw p50 × | raw thr × |\n\
             |---:|---:|---:|---:|---:|---:|\n",
        );
        s.push_str(&ratios);
    }
    s
}

/// The head-to-head read hit as a Markdown table.
pub(crate) fn render_head_to_head(
    args: &Args,
    redis_url: &str,
    memcached_url: &str,
    rows: &[HeadToHead],
) -> String {
    let mut s = format!(
        "### {HEAD_TO_HEAD}\n\n\
         Redis `{}` and Memcached `{}`, ours (everything on) and raw, the four alternating in \
         one run; {} round(s) of {} ms per side. Reads/s and µs; `×` is Memcached / Redis \
         (p50: lower is better, target ≤ 1.30 for ours; thr: higher is better).\n\n\
         | value | conc | ours redis/s | ours mc/s | ours redis p50 | ours mc p50 | ours p50 × | ours thr × \
         | raw redis/s | raw mc/s | raw redis p50 | raw mc p50 | raw p50 × | raw thr × | ours redis p99 | ours mc p99 | note |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        redact(redis_url),
        redact(memcached_url),
        args.rounds,
        args.duration.as_millis()
    );
    for h in rows {
        let [or, om, rr, rm] = h.cells;
        s.push_str(&format!(
            "| {} B | {} | {:.0} | {:.0} | {} | {} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {} | {:.2} | {:.2} | {} | {} | {} |\n",
            h.size,
            h.conc,
            or.0,
            om.0,
            us(or.1),
            us(om.1),
            ratio(om.1, or.1),
            om.0 / or.0.max(1e-9),
            rr.0,
            rm.0,
            us(rr.1),
            us(rm.1),
            ratio(rm.1, rr.1),
            rm.0 / rr.0.max(1e-9),
            us(or.2),
            us(om.2),
            h.note
        ));
    }
    s
}
