//! The product catalogue on Moka + SQLite: no server, no setup.
//!
//! `cargo run --example quickstart`

use std::time::Duration;

use writethrough::moka::MokaCache;
use writethrough::sqlite::SqliteStore;
use writethrough::{Engine, ErrorKind, Handle, Patch, TableOptions};
use writethrough_examples::{Product, notebooks, validate};

async fn open(path: &std::path::Path) -> writethrough::Result<(Engine, Handle<Product>)> {
    let engine = Engine::builder(MokaCache::default(), SqliteStore::open(path)?)
        .namespace("shop")
        .default_ttl(Some(Duration::from_secs(600)))
        .build()?;
    let products = engine
        .register::<Product>(TableOptions::new().validate(validate))
        .await?;
    Ok((engine, products))
}

fn hit_or_miss(before: writethrough::Stats, after: writethrough::Stats) -> &'static str {
    if after.hits > before.hits {
        "hit"
    } else {
        "miss, loaded from SQLite"
    }
}

#[tokio::main]
async fn main() -> writethrough::Result<()> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("catalogue.db");
    println!(
        "writethrough quickstart: Moka (in-process cache) + SQLite ({})\n",
        path.display()
    );

    let (engine, products) = open(&path).await?;
    let pen = Product {
        id: 1,
        name: "Fountain pen".into(),
        price: 12.5,
        stock: 40,
    };
    let v = products.put(&pen).await?;
    println!(
        "create  product 1 {:?} at {:.2}: committed to SQLite as version {v}, then cached",
        pen.name, pen.price
    );

    let s = engine.stats();
    let got = products.get(1).await?;
    println!(
        "read    product 1: {} ({:?})",
        hit_or_miss(s, engine.stats()),
        got.map(|p| p.name)
    );

    drop((engine, products));
    let (engine, products) = open(&path).await?;
    println!("restart the application: the in-process cache starts empty, SQLite keeps the rows");
    for _ in 0..2 {
        let s = engine.stats();
        let got = products.get(1).await?;
        println!(
            "read    product 1: {} (price {:?})",
            hit_or_miss(s, engine.stats()),
            got.map(|p| p.price)
        );
    }

    let updated = products.update(1, Patch::new().set("price", 9.99)).await?;
    println!(
        "update  product 1 price to 9.99: the new row is read back and cached ({:?})",
        updated.map(|p| p.price)
    );
    let s = engine.stats();
    let got = products.get(1).await?;
    println!(
        "read    product 1: {} (price {:?})",
        hit_or_miss(s, engine.stats()),
        got.map(|p| p.price)
    );

    let bad = Product {
        id: 7,
        name: "Broken".into(),
        price: -1.0,
        stock: 0,
    };
    match products.put(&bad).await {
        Err(e) if e.kind() == ErrorKind::Validation => {
            println!("reject  product 7: {e}; nothing written")
        }
        other => panic!("a negative price must be rejected, got {other:?}"),
    }

    let import = notebooks();
    let versions = products.put_many(&import).await?;
    println!(
        "import  {} products: one SQLite transaction, then one cache round trip",
        versions.len()
    );
    let s = engine.stats();
    let got = products.get(600).await?;
    println!(
        "read    product 600: {} ({:?})",
        hit_or_miss(s, engine.stats()),
        got.map(|p| p.name)
    );

    let deleted = products.delete(100).await?;
    let got = products.get(100).await?;
    println!(
        "delete  product 100: deleted = {deleted}; read afterwards: {got:?} (a tombstone fences late readers)"
    );

    engine.flush().await?;
    let s = engine.stats();
    println!(
        "\nstats   hits {}, misses {}, database loads {}, writes {} (hit ratio {:.0}%)",
        s.hits,
        s.misses,
        s.loads,
        s.writes,
        100.0 * s.hit_ratio()
    );
    Ok(())
}
