//! The scenarios, the alternating runner, and the report.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use writethrough::{
    CacheStore, ColumnType, Consistency, DbStore, Engine, Entity, Handle, Patch, Result, Table,
    TableOptions,
};

use crate::Args;
use crate::raw::{Product, RawCache, RawDb, RawMoka, RawSqlite};

impl Entity for Product {
    fn table() -> Table {
        Table::builder("bench")
            .key("id", ColumnType::Int)
            .column("name", ColumnType::Text)
            .column("price", ColumnType::Float)
            .column("payload", ColumnType::Text)
            .build()
            .expect("a valid schema")
    }
}

/// Keys each scenario cycles through.
const KEYS: i64 = 1000;

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
    strict_engine: Engine,
    raw_cache: Arc<dyn RawCache>,
    raw_db: Arc<dyn RawDb>,
    raw_table: String,
    size: usize,
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
        let key = |i: u64| (i % KEYS as u64) as i64;
        let s = match scenario {
            "read_hit" => Sides {
                ours: op(move |i| {
                    let h = h.clone();
                    async move { timed(async { assert!(h.get(key(i)).await.unwrap().is_some()) }).await }
                }),
                raw: op(move |i| {
                    let rc = rc.clone();
                    async move {
                        timed(async {
                            let b = rc
                                .get(&raw_key(size, key(i)))
                                .await
                                .unwrap()
                                .expect("prefilled");
                            std::hint::black_box(serde_json::from_slice::<Product>(&b).unwrap());
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
            "write" | "write_unfenced" => {
                let h = if scenario == "write" { h } else { hr };
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

    /// 1,000 concurrent reads of one cold key: how many database loads each side makes.
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

const ALL: [&str; 9] = [
    "read_hit",
    "read_miss",
    "write",
    "write_unfenced",
    "update",
    "delete",
    "batch100",
    "batch100_unfenced",
    "stampede",
];

async fn open(
    args: &Args,
) -> Result<(
    Arc<dyn CacheStore>,
    Arc<dyn DbStore>,
    Arc<dyn RawCache>,
    Arc<dyn RawDb>,
    Option<tempfile::TempDir>,
)> {
    let cfg_err = |m: String| writethrough::Error::new(writethrough::ErrorKind::Config, m);
    let mut temp = None;
    let (db, raw_db): (Arc<dyn DbStore>, Arc<dyn RawDb>) = if args.db.starts_with("sqlite:") {
        let path = if args.db == "sqlite::temp:" {
            let dir = tempfile::tempdir().map_err(|e| cfg_err(e.to_string()))?;
            let p = dir.path().join("bench.db");
            temp = Some(dir);
            p
        } else {
            std::path::PathBuf::from(
                args.db
                    .trim_start_matches("sqlite:")
                    .trim_start_matches("//"),
            )
        };
        let ours = writethrough::sqlite::SqliteStore::open(&path)?;
        let raw = RawSqlite::open(&path).map_err(|e| cfg_err(e.to_string()))?;
        (Arc::new(ours), Arc::new(raw))
    } else {
        return Err(cfg_err(format!(
            "no raw driver for {} in this build",
            args.db
        )));
    };
    let (cache, raw_cache): (Arc<dyn CacheStore>, Arc<dyn RawCache>) = if args
        .cache
        .starts_with("moka")
    {
        let ours = writethrough::open_cache(&args.cache).await?;
        // What a careful user would configure: a bounded cache with a TTL
        // (ours has per-entry TTLs, which cost Moka a little more).
        let raw = moka::future::Cache::builder()
            .max_capacity(256 << 20)
            .time_to_live(Duration::from_secs(3600))
            .weigher(|k: &String, v: &Bytes| u32::try_from(k.len() + v.len()).unwrap_or(u32::MAX))
            .build();
        (ours, Arc::new(RawMoka(raw)))
    } else {
        return Err(cfg_err(format!(
            "no raw driver for {} in this build",
            args.cache
        )));
    };
    Ok((cache, db, raw_cache, raw_db, temp))
}

/// Runs every selected scenario and returns the report rows.
pub(crate) async fn run(args: &Args) -> Result<Vec<Row>> {
    let (cache, db, raw_cache, raw_db, _temp) = open(args).await?;
    let strict_engine = Engine::builder_dyn(cache.clone(), db.clone())
        .namespace("bench")
        .consistency(Consistency::strict())
        .build()?;
    let relaxed_engine = Engine::builder_dyn(cache.clone(), db.clone())
        .namespace("benchnf")
        .consistency(Consistency::none())
        .build()?;
    let wanted = |s: &str| args.scenarios.is_empty() || args.scenarios.iter().any(|x| x == s);
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let table = |prefix: &str| Product::table().renamed(&format!("{prefix}_{size}"));
        let strict = strict_engine
            .register_in(table("wt")?, TableOptions::new())
            .await?;
        let relaxed = relaxed_engine
            .register_in(table("wtnf")?, TableOptions::new())
            .await?;
        let raw_table = format!("raw_{size}");
        raw_db.setup(&raw_table).await.map_err(|e| {
            writethrough::Error::new(writethrough::ErrorKind::Backend, e.to_string())
        })?;
        let world = World {
            cache: cache.clone(),
            strict,
            relaxed,
            strict_engine: strict_engine.clone(),
            raw_cache: raw_cache.clone(),
            raw_db: raw_db.clone(),
            raw_table,
            size,
        };
        // Both sides start from the same rows, cached.
        let seed: Vec<Product> = (0..KEYS).map(|id| product(id, size, 1.0)).collect();
        world.strict.put_many(&seed).await?;
        world.relaxed.put_many(&seed).await?;
        world
            .raw_db
            .upsert_many(&world.raw_table, &seed)
            .await
            .expect("raw seed");
        world
            .raw_cache
            .set_many(
                seed.iter()
                    .map(|p| (raw_key(size, p.id), encode(p)))
                    .collect(),
            )
            .await
            .expect("raw seed");
        for scenario in ALL {
            if !wanted(scenario) {
                continue;
            }
            if scenario == "stampede" {
                let row = world.stampede().await;
                eprintln!("{:<16} {:>6} B: {}", row.scenario, size, row.note);
                rows.push(row);
                continue;
            }
            let sides = world.sides(scenario).expect("a known scenario");
            for &conc in &args.concurrency {
                let (mut ours, mut raw) = (Sample::default(), Sample::default());
                for round in 0..args.rounds {
                    let order = if round % 2 == 0 {
                        [true, false]
                    } else {
                        [false, true]
                    };
                    for is_ours in order {
                        let s = phase(
                            conc,
                            args.duration,
                            if is_ours { &sides.ours } else { &sides.raw },
                        )
                        .await;
                        let acc = if is_ours { &mut ours } else { &mut raw };
                        acc.ops += s.ops;
                        acc.wall += s.wall;
                        acc.lat.extend(s.lat);
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
                    note: String::new(),
                };
                eprintln!(
                    "{:<16} {:>6} B  c={:<3} ours {:>9.0}/s raw {:>9.0}/s  p50 ratio {:.2}",
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

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// The report as a Markdown table.
pub(crate) fn render(args: &Args, rows: &[Row]) -> String {
    let mut s = format!(
        "cache `{}`, database `{}`; {} round(s) of {} ms per side, alternating.\n\
         Throughput in items/s; latencies in µs; `p50 ×` is ours / raw (lower is better), \
         `thr ×` is ours / raw (higher is better).\n\n\
         | scenario | value | conc | ours/s | raw/s | thr × | ours p50 | raw p50 | p50 × | ours p99 | raw p99 | note |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        args.cache,
        args.db,
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
