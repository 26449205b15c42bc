//! One process of the multi-process history checker: it opens its own
//! engine on the URLs it is given, runs `WT_CLIENTS` clients doing
//! `WT_OPS` random operations on keys `1..=WT_KEYS`, and writes every
//! event, timestamped with the machine's monotonic clock, to `WT_OUT`.
//! Values start at `WT_FIRST_VALUE` and client ids at `WT_FIRST_CLIENT`,
//! so that processes never write the same value.

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
        .register_in(table, TableOptions::new())
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
