//! The cost of `execute` against the raw driver on the same pool, measured
//! alternately in one run so that both see the same machine and server.
//!
//! ```text
//! cargo test -p writethrough-postgres --release --test bench -- --ignored --nocapture
//! ```
//!
//! It prints numbers and asserts only that every call succeeded: a timing
//! assertion would fail on a busy machine for no fault of the code.

mod common;

use std::time::{Duration, Instant};

use sqlx::AssertSqlSafe;
use writethrough_core::backend::{DbStore, TxOptions};

use common::*;

struct Samples {
    name: &'static str,
    times: Vec<Duration>,
}

impl Samples {
    fn new(name: &'static str) -> Self {
        Samples {
            name,
            times: Vec::new(),
        }
    }

    fn quantile(&self, q: f64) -> Duration {
        let mut t = self.times.clone();
        t.sort_unstable();
        t[((t.len() - 1) as f64 * q) as usize]
    }

    fn mean(&self) -> Duration {
        self.times.iter().sum::<Duration>() / self.times.len() as u32
    }
}

/// Prints the samples; the first is the baseline of the ratio column.
fn report(all: &[Samples]) {
    let base = &all[0];
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "operation", "mean", "p50", "p90", "p99", "p50/raw"
    );
    for s in all {
        println!(
            "{:<34} {:>10.1?} {:>10.1?} {:>10.1?} {:>10.1?} {:>8.2}",
            s.name,
            s.mean(),
            s.quantile(0.5),
            s.quantile(0.9),
            s.quantile(0.99),
            s.quantile(0.5).as_secs_f64() / base.quantile(0.5).as_secs_f64()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it with --ignored --nocapture"]
async fn bench_execute_against_raw_sqlx() {
    let pg = pg_with(|c| c.max_connections(4)).await;
    let t = items(&unique("bench"));
    pg.store.ensure_table(&t).await.unwrap();
    let raw_table = unique("bench_raw");
    pg.exec(&format!(
        "CREATE TABLE \"{raw_table}\" (id bigint PRIMARY KEY, name text NOT NULL, qty bigint)"
    ))
    .await;
    let raw_upsert = format!(
        "INSERT INTO \"{raw_table}\" (id, name, qty) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, qty = EXCLUDED.qty"
    );
    let raw_batch = format!(
        "INSERT INTO \"{raw_table}\" (id, name, qty) SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[]) \
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, qty = EXCLUDED.qty"
    );
    let pool = pg.store.pool().clone();
    let keys = 1000i64;
    let rounds: usize = std::env::var("WT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);

    let mut raw = Samples::new("raw sqlx upsert");
    let mut plain = Samples::new("execute(upsert)");
    let mut outbox = Samples::new("execute(upsert) + outbox");
    let mut raw100 = Samples::new("raw sqlx unnest upsert x100");
    let mut batch = Samples::new("execute(100 upserts)");
    for i in 0..(rounds + 200) {
        let warm = i < 200;
        let key = (i as i64 * 7919) % keys;
        let name = format!("name {i}");
        // The order rotates so no kind always runs right after another.
        for step in 0..3 {
            match (i + step) % 3 {
                0 => {
                    let s = Instant::now();
                    sqlx::query(AssertSqlSafe(raw_upsert.clone()))
                        .bind(key)
                        .bind(name.clone())
                        .bind(Some(i as i64))
                        .execute(&pool)
                        .await
                        .unwrap();
                    if !warm {
                        raw.times.push(s.elapsed());
                    }
                }
                1 => {
                    let w = upsert(&t, item(key, &name).set("qty", i as i64));
                    let s = Instant::now();
                    pg.store
                        .execute(vec![w], TxOptions::default())
                        .await
                        .unwrap();
                    if !warm {
                        plain.times.push(s.elapsed());
                    }
                }
                _ => {
                    let w = upsert(&t, item(key, &name).set("qty", i as i64));
                    let s = Instant::now();
                    pg.store
                        .execute(vec![w], TxOptions::with_outbox(true))
                        .await
                        .unwrap();
                    if !warm {
                        outbox.times.push(s.elapsed());
                    }
                }
            }
        }
        if i % 10 == 0 {
            let base = (i as i64 * 100) % keys;
            let ids: Vec<i64> = (0..100).map(|k| (base + k) % keys).collect();
            let names: Vec<String> = ids.iter().map(|k| format!("b{k}")).collect();
            let qtys: Vec<Option<i64>> = ids.iter().map(|k| Some(*k)).collect();
            let s = Instant::now();
            sqlx::query(AssertSqlSafe(raw_batch.clone()))
                .bind(ids.clone())
                .bind(names.clone())
                .bind(qtys)
                .execute(&pool)
                .await
                .unwrap();
            if !warm {
                raw100.times.push(s.elapsed());
            }
            let writes = ids
                .iter()
                .zip(&names)
                .map(|(k, n)| upsert(&t, item(*k, n).set("qty", *k)))
                .collect();
            let s = Instant::now();
            pg.store
                .execute(writes, TxOptions::default())
                .await
                .unwrap();
            if !warm {
                batch.times.push(s.elapsed());
            }
        }
    }
    // Keep the outbox from growing without end between runs.
    sqlx::query("DELETE FROM \"_wt_outbox\"")
        .execute(&pool)
        .await
        .unwrap();
    println!("\n{rounds} rounds, {keys} keys, loopback, one client task:");
    report(&[raw, plain, outbox]);
    report(&[raw100, batch]);
}
