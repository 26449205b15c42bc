//! A child process for the crash test: it opens an engine on the URLs it is
//! given, writes one row, and freezes right after the database commit,
//! before the cache write, announcing it on stdout so that the parent can
//! SIGKILL it at exactly that point.

use std::io::Write as _;
use std::time::Duration;

use writethrough::{Entity, HookPoint, Hooks, TableOptions};
use writethrough_testkit::suite::engine::{Item, item};

struct FreezeAfterCommit;

#[async_trait::async_trait]
impl Hooks for FreezeAfterCommit {
    async fn at(&self, point: HookPoint, key: &str) {
        if point == HookPoint::AfterCommit {
            println!("COMMITTED {key}");
            std::io::stdout().flush().expect("stdout");
            std::future::pending::<()>().await;
        }
    }
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

#[tokio::main]
async fn main() {
    let engine = writethrough::open(&var("WT_CACHE_URL"), &var("WT_DB_URL"))
        .await
        .expect("opens the backends")
        .configure(|c| {
            c.namespace = var("WT_NAMESPACE");
            c.reconcile_interval = None;
            c.cache_timeout = Duration::from_secs(1);
        })
        .hooks(std::sync::Arc::new(FreezeAfterCommit))
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
    unreachable!("the hook freezes the write after its commit");
}
