//! One process of the multi-process history checker: it opens its own
//! engine on the URLs it is given, runs `WT_CLIENTS` clients doing
//! `WT_OPS` random operations on keys `1..=WT_KEYS`, and writes every
//! event, timestamped with the machine's monotonic clock, to `WT_OUT`.
//! Values start at `WT_FIRST_VALUE` and client ids at `WT_FIRST_CLIENT`,
//! so that processes never write the same value.
//!
//! With `WT_TRACK_EXTERNAL=1` the table tracks writes made outside the
//! engine. With `WT_ROLE=external` the process is such a writer instead: no
//! engine, a plain connection (sqlx or rusqlite) to `WT_DB_URL`, one
//! update, delete or (half the time) upsert every `WT_EXTERNAL_PAUSE_MS`, `WT_OPS` of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use writethrough::{Entity, TableOptions};
use writethrough_testkit::history::{Recorder, Workload, monotonic_ns, run_clients};
use writethrough_testkit::suite::engine::Item;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

fn num<T: std::str::FromStr>(name: &str) -> T {
    var(name)
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number"))
}

#[tokio::main]
async fn main() {
    if std::env::var("WT_ROLE").as_deref() == Ok("external") {
        return external_writer().await;
    }
    let engine = writethrough::open(&var("WT_CACHE_URL"), &var("WT_DB_URL"))
        .await
        .expect("opens the backends")
        .configure(|c| {
            c.namespace = var("WT_NAMESPACE");
            c.cache_timeout = Duration::from_millis(250);
            c.epoch_check_interval = Duration::from_millis(100);
            c.write_deadline = Duration::from_millis(500);
            c.outbox_grace = Duration::from_millis(500);
            c.reconcile_interval = Some(Duration::from_millis(250));
            c.external_poll_interval = Duration::from_millis(200);
            c.breaker.open_for = Duration::from_millis(100);
            // WT_EPOCHS=0 runs with the mechanism off, to show what it prevents.
            let epochs = std::env::var("WT_EPOCHS").map_or(true, |e| e != "0");
            c.consistency = c.consistency.epochs(epochs);
        })
        .build()
        .expect("builds");
    let table = Item::table()
        .renamed(&var("WT_TABLE"))
        .expect("a table name");
    let items = engine
        .register_in(
            table,
            TableOptions::new()
                .track_external_writes(std::env::var("WT_TRACK_EXTERNAL").as_deref() == Ok("1")),
        )
        .await
        .expect("registers");
    // When this engine moved to a new cache epoch: the parent counts the
    // reads around each change apart, as it does for the faults it injects.
    let stop = Arc::new(AtomicBool::new(false));
    let epochs = tokio::spawn({
        let (engine, stop) = (engine.clone(), stop.clone());
        async move {
            let mut seen = engine.cache_epoch();
            let mut changes = Vec::new();
            // And while it had keys waiting for a resync (its writes caught
            // by a fault, or late after a freeze): it reads those keys from
            // the database, which may be ahead of the cache others read.
            let mut repairing: Option<u64> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let now = engine.cache_epoch();
                if now != seen {
                    changes.push(monotonic_ns().to_string());
                    seen = now;
                }
                let stopping = stop.load(Ordering::SeqCst);
                match (engine.pending_resync() > 0 && !stopping, repairing) {
                    (true, None) => repairing = Some(monotonic_ns()),
                    (false, Some(since)) => {
                        changes.push(format!("{since} {}", monotonic_ns()));
                        repairing = None;
                    }
                    _ => {}
                }
                if stopping {
                    return changes;
                }
            }
        }
    });
    let rec = Arc::new(Recorder::monotonic());
    let w = Workload {
        ops: num("WT_OPS"),
        keys: num("WT_KEYS"),
        clients: num("WT_CLIENTS"),
        cold_keys: num("WT_COLD_KEYS"),
    };
    run_clients(
        &items,
        w,
        &rec,
        num("WT_FIRST_VALUE"),
        num("WT_FIRST_CLIENT"),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let changes = epochs.await.expect("the epoch watcher ends");
    let lines: Vec<String> = rec.events().iter().map(|e| e.to_line()).collect();
    std::fs::write(var("WT_OUT"), lines.join("\n")).expect("writes the history");
    std::fs::write(format!("{}.epochs", var("WT_OUT")), changes.join("\n"))
        .expect("writes the epoch changes");
    let _ = engine.flush().await;
}

/// A writer outside the engine, on its own plain connection: no engine
/// marks, so the table's triggers version and record every write.
async fn external_writer() {
    use rand::Rng;
    use writethrough_testkit::history::{Event, Op};

    enum Conn {
        Pg(sqlx::PgConnection),
        Lite(rusqlite::Connection),
    }
    let url = var("WT_DB_URL");
    let table = var("WT_TABLE");
    let mut conn = if url.starts_with("postgres") {
        use sqlx::Connection;
        Conn::Pg(sqlx::PgConnection::connect(&url).await.expect("connects"))
    } else {
        let path = url.trim_start_matches("sqlite://");
        let c = rusqlite::Connection::open(path).expect("opens the file");
        c.busy_timeout(Duration::from_secs(10))
            .expect("sets the busy timeout");
        Conn::Lite(c)
    };
    let ops: usize = num("WT_OPS");
    let keys: i64 = num("WT_KEYS");
    let pause = Duration::from_millis(num("WT_EXTERNAL_PAUSE_MS"));
    let client: u32 = num("WT_FIRST_CLIENT");
    let mut value: u32 = num("WT_FIRST_VALUE");
    let mut events = Vec::new();
    for _ in 0..ops {
        tokio::time::sleep(pause).await;
        let (key, dice) = {
            let mut rng = rand::rng();
            (rng.random_range(1..=keys), rng.random_range(0..4u32))
        };
        value += 1;
        let v = i64::from(value);
        let (update, delete, upsert) = (
            format!("UPDATE \"{table}\" SET qty = $1 WHERE id = $2"),
            format!("DELETE FROM \"{table}\" WHERE id = $1"),
            format!(
                "INSERT INTO \"{table}\" (id, name, price, qty, active, tags) \
                 VALUES ($1, 'external', 1.5, $2, true, '{{}}') \
                 ON CONFLICT (id) DO UPDATE SET qty = excluded.qty, name = excluded.name"
            ),
        );
        let call = monotonic_ns();
        let affected = match &mut conn {
            Conn::Pg(c) => {
                let q = match dice {
                    0 => sqlx::query(sqlx::AssertSqlSafe(update)).bind(v).bind(key),
                    1 => sqlx::query(sqlx::AssertSqlSafe(delete)).bind(key),
                    _ => sqlx::query(sqlx::AssertSqlSafe(upsert)).bind(key).bind(v),
                };
                q.execute(&mut *c).await.map(|r| r.rows_affected()).ok()
            }
            Conn::Lite(c) => {
                let (sql, params): (String, Vec<i64>) = match dice {
                    0 => (update.replace('$', "?"), vec![v, key]),
                    1 => (delete.replace('$', "?"), vec![key]),
                    _ => (upsert.replace('$', "?"), vec![key, v]),
                };
                c.execute(&sql, rusqlite::params_from_iter(params))
                    .map(|n| n as u64)
                    .ok()
            }
        };
        let ret = monotonic_ns();
        let op = match dice {
            0 => Op::Update(value, affected.unwrap_or(0) > 0),
            1 => Op::Delete(affected.unwrap_or(0) > 0),
            _ => Op::Write(value),
        };
        events.push(Event {
            key,
            op,
            call,
            ret: if affected.is_some() { ret } else { u64::MAX },
            client,
        });
    }
    let lines: Vec<String> = events.iter().map(Event::to_line).collect();
    std::fs::write(var("WT_OUT"), lines.join("\n")).expect("writes the history");
}
