//! A child process for the crash and forgetting tests: it opens an engine
//! on the URLs it is given, writes one row, and right after the database
//! commit, before the cache write, announces it on stdout so that the
//! parent can signal it at exactly that point. `WT_MODE=freeze` (the
//! default) then waits forever, for a SIGKILL; `WT_MODE=pause` waits a
//! second, for a SIGSTOP and a later SIGCONT, then finishes the write,
//! prints `DONE` and exits.

use std::io::Write as _;
use std::time::Duration;

use writethrough::{Entity, HookPoint, Hooks, TableOptions};
use writethrough_testkit::suite::engine::{Item, item};

struct AfterCommit {
    pause: bool,
}

#[async_trait::async_trait]
impl Hooks for AfterCommit {
    async fn at(&self, point: HookPoint, key: &str) {
        if point == HookPoint::AfterCommit {
            println!("COMMITTED {key}");
            std::io::stdout().flush().expect("stdout");
            if self.pause {
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else {
                std::future::pending::<()>().await;
            }
        }
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

#[tokio::main]
async fn main() {
    let pause = std::env::var("WT_MODE").is_ok_and(|m| m == "pause");
    let epochs = std::env::var("WT_EPOCHS").map_or(true, |e| e != "0");
    let engine = writethrough::open(&var("WT_CACHE_URL"), &var("WT_DB_URL"))
        .await
        .expect("opens the backends")
        .configure(|c| {
            c.namespace = var("WT_NAMESPACE");
            c.reconcile_interval = None;
            c.cache_timeout = Duration::from_secs(1);
            if pause {
                c.cache_timeout = Duration::from_millis(250);
                c.write_deadline = Duration::from_millis(300);
                c.epoch_check_interval = Duration::from_millis(100);
                c.consistency = c.consistency.epochs(epochs);
            }
        })
        .hooks(std::sync::Arc::new(AfterCommit { pause }))
        .build()
        .expect("builds");
    let table = Item::table()
        .renamed(&var("WT_TABLE"))
        .expect("a table name");
    let items = engine
        .register_in(table, TableOptions::new())
        .await
        .expect("registers");
    let price: f64 = var("WT_PRICE").parse().expect("a price");
    items.put(&item(1, price)).await.expect("the write");
    assert!(pause, "the hook freezes the write after its commit");
    // Let the background work run (the resync of a late write), then leave.
    tokio::time::sleep(Duration::from_millis(500)).await;
    engine.flush().await.expect("flushes");
    println!("DONE");
    std::io::stdout().flush().expect("stdout");
}
