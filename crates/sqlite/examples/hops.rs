//! What it costs to keep SQLite's blocking calls off the async workers.
//!
//! `cargo run --release -p writethrough-sqlite --example hops`
//!
//! Compares, for a write transaction (version bump + upsert + outbox record)
//! and for a point read, at concurrency 1 and 16:
//! - `inline`: the blocking call on the async worker (the raw baseline, and
//!   what the design must not do);
//! - `spawn_blocking/stmt`: one `spawn_blocking` hop per statement;
//! - `spawn_blocking/txn`: one `spawn_blocking` hop per transaction;
//! - `store`: this crate — the writer thread (one hop per transaction, group
//!   commit) and the reader threads.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use writethrough_core::backend::{DbStore, TxOptions, Write, WriteOp};
use writethrough_core::{ColumnType, Key, Row, Table};
use writethrough_sqlite::SqliteStore;

const RUN: Duration = Duration::from_millis(1500);

fn table() -> Table {
    Table::builder("hops")
        .key("id", ColumnType::Int)
        .column("payload", ColumnType::Text)
        .build()
        .unwrap()
}

fn open(path: &std::path::Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
        .unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

const SEQ: &str = "UPDATE \"_wt_seq\" SET v = v + 1 WHERE id = 1 RETURNING v";
const UPSERT: &str = "INSERT INTO \"hops\" (\"id\", \"payload\", \"_wt_version\") VALUES (?1, ?2, ?3) \
     ON CONFLICT (\"id\") DO UPDATE SET \"payload\" = excluded.\"payload\", \"_wt_version\" = excluded.\"_wt_version\"";
const OUTBOX: &str =
    "INSERT INTO \"_wt_outbox\" (tbl, key, version, created_ms) VALUES ('hops', ?1, ?2, 0)";
const SELECT: &str = "SELECT \"id\", \"payload\", \"_wt_version\" FROM \"hops\" WHERE \"id\" = ?1";

fn txn(c: &Connection, id: i64, payload: &str) {
    c.execute_batch("BEGIN IMMEDIATE").unwrap();
    let v: i64 = c
        .prepare_cached(SEQ)
        .unwrap()
        .query_row([], |r| r.get(0))
        .unwrap();
    c.prepare_cached(UPSERT)
        .unwrap()
        .execute(rusqlite::params![id, payload, v])
        .unwrap();
    c.prepare_cached(OUTBOX)
        .unwrap()
        .execute(rusqlite::params![format!("i:{id}"), v])
        .unwrap();
    c.execute_batch("COMMIT").unwrap();
}

fn read(c: &Connection, id: i64) -> String {
    c.prepare_cached(SELECT)
        .unwrap()
        .query_row([id], |r| r.get(1))
        .unwrap()
}

/// Runs `op` from `conc` tasks for `RUN`; returns ops/s and the median latency.
async fn measure<F, Fut>(conc: usize, op: F) -> (f64, Duration)
where
    F: Fn(i64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|t| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0i64;
                while started.elapsed() < RUN {
                    let t0 = Instant::now();
                    op(t as i64 * 1_000_000 + i % 1000).await;
                    lat.push(t0.elapsed());
                    i += 1;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    (all.len() as f64 / secs, all[all.len() / 2])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hops.db");
    let store = SqliteStore::open(&path).unwrap();
    let t = table();
    store.ensure_table(&t).await.unwrap();
    let payload: Arc<str> = "x".repeat(256).into();
    let shared = Arc::new(Mutex::new(open(&path)));
    let readers: Arc<Vec<Mutex<Connection>>> =
        Arc::new((0..2).map(|_| Mutex::new(open(&path))).collect());
    // Rows to read.
    for i in 0..1000 {
        txn(&shared.lock().unwrap(), i, &payload);
        for t in 0..16i64 {
            txn(&shared.lock().unwrap(), t * 1_000_000 + i, &payload);
        }
    }
    println!("{:<24} {:>5} {:>12} {:>10}", "path", "conc", "ops/s", "p50");
    for conc in [1usize, 16] {
        let (c, p) = (shared.clone(), payload.clone());
        let r = measure(conc, move |id| {
            let (c, p) = (c.clone(), p.clone());
            async move { txn(&c.lock().unwrap(), id, &p) }
        })
        .await;
        println!(
            "{:<24} {conc:>5} {:>12.0} {:>10.1?}",
            "write inline", r.0, r.1
        );
        let (c, p) = (shared.clone(), payload.clone());
        let r = measure(conc, move |id| {
            let (c, p) = (c.clone(), p.clone());
            async move {
                // One hop per statement: the lock is held across hops, as a
                // transaction must be.
                let c2 = c.clone();
                let guard = tokio::task::spawn_blocking(move || {
                    let g = c2.lock().unwrap();
                    g.execute_batch("BEGIN IMMEDIATE").unwrap();
                    drop(g);
                })
                .await;
                guard.unwrap();
                let c3 = c.clone();
                let v: i64 = tokio::task::spawn_blocking(move || {
                    c3.lock()
                        .unwrap()
                        .prepare_cached(SEQ)
                        .unwrap()
                        .query_row([], |r| r.get(0))
                        .unwrap()
                })
                .await
                .unwrap();
                let (c4, p4) = (c.clone(), p.clone());
                tokio::task::spawn_blocking(move || {
                    c4.lock()
                        .unwrap()
                        .prepare_cached(UPSERT)
                        .unwrap()
                        .execute(rusqlite::params![id, &*p4, v])
                        .unwrap();
                })
                .await
                .unwrap();
                let c5 = c.clone();
                tokio::task::spawn_blocking(move || {
                    c5.lock()
                        .unwrap()
                        .prepare_cached(OUTBOX)
                        .unwrap()
                        .execute(rusqlite::params![format!("i:{id}"), v])
                        .unwrap();
                })
                .await
                .unwrap();
                let c6 = c.clone();
                tokio::task::spawn_blocking(move || {
                    c6.lock().unwrap().execute_batch("COMMIT").unwrap()
                })
                .await
                .unwrap();
            }
        });
        // Statement hops interleave transactions on one connection, which
        // SQLite would reject; measure this path at concurrency 1 only.
        if conc == 1 {
            let r = r.await;
            println!(
                "{:<24} {conc:>5} {:>12.0} {:>10.1?}",
                "write spawn_blocking/stmt", r.0, r.1
            );
        } else {
            drop(r);
        }
        let (c, p) = (shared.clone(), payload.clone());
        let r = measure(conc, move |id| {
            let (c, p) = (c.clone(), p.clone());
            async move {
                tokio::task::spawn_blocking(move || txn(&c.lock().unwrap(), id, &p))
                    .await
                    .unwrap()
            }
        })
        .await;
        println!(
            "{:<24} {conc:>5} {:>12.0} {:>10.1?}",
            "write spawn_blocking/txn", r.0, r.1
        );
        let (s, p, t2) = (store.clone(), payload.clone(), t.clone());
        let r = measure(conc, move |id| {
            let (s, p, t2) = (s.clone(), p.clone(), t2.clone());
            async move {
                let row = Row::new().set("id", id).set("payload", &*p);
                s.execute(
                    vec![Write {
                        table: t2,
                        op: WriteOp::Upsert(row),
                    }],
                    TxOptions::with_outbox(true),
                )
                .await
                .unwrap();
            }
        })
        .await;
        println!(
            "{:<24} {conc:>5} {:>12.0} {:>10.1?}",
            "write store (1 hop/txn)", r.0, r.1
        );

        let rd = readers.clone();
        let r = measure(conc, move |id| {
            let rd = rd.clone();
            async move {
                let c = &rd[(id as usize) % rd.len()];
                std::hint::black_box(read(&c.lock().unwrap(), id));
            }
        })
        .await;
        println!(
            "{:<24} {conc:>5} {:>12.0} {:>10.1?}",
            "read inline", r.0, r.1
        );
        let rd = readers.clone();
        let r = measure(conc, move |id| {
            let rd = rd.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let c = &rd[(id as usize) % rd.len()];
                    std::hint::black_box(read(&c.lock().unwrap(), id));
                })
                .await
                .unwrap()
            }
        })
        .await;
        println!(
            "{:<24} {conc:>5} {:>12.0} {:>10.1?}",
            "read spawn_blocking", r.0, r.1
        );
        let (s, t2) = (store.clone(), t.clone());
        let r = measure(conc, move |id| {
            let (s, t2) = (s.clone(), t2.clone());
            async move {
                std::hint::black_box(s.get(&t2, &Key::Int(id)).await.unwrap());
            }
        })
        .await;
        println!(
            "{:<24} {conc:>5} {:>12.0} {:>10.1?}",
            "read store (threads)", r.0, r.1
        );
    }
}
