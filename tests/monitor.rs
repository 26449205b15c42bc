//! The continuous consistency monitor finds divergence that is really
//! there: a cache entry corrupted behind the engine's back (with the
//! cache's own client, not the engine) is served once, re-checked after
//! the settle delay, and reported in `health()` with its table, key and
//! kind; the measured consistency drops from "no divergence in N checks"
//! to the nines of one in N. A full queue drops samples and counts them.

use std::time::{Duration, Instant};

use writethrough::codec::Codec;
use writethrough::{
    ColumnType, ConsistencyReport, DivergenceKind, Engine, Key, MonitorConfig, Row, Table,
    TableOptions, Value,
};
use writethrough_testkit::server::RedisServer;

const ROWS: i64 = 20;

fn items() -> Table {
    Table::builder("items")
        .key("id", ColumnType::Int)
        .column("price", ColumnType::Float)
        .build()
        .unwrap()
}

async fn engine(cache_url: &str, monitor: MonitorConfig) -> Engine {
    writethrough::open(cache_url, "sqlite::temp:")
        .await
        .unwrap()
        .namespace("mon")
        .configure(|c| c.monitor = Some(monitor))
        .build()
        .unwrap()
}

/// The table, registered, with rows 1 to `rows` at price `id`.
async fn seeded(engine: &Engine, rows: i64) -> writethrough::Handle<Row> {
    let h = engine
        .register_table(items(), TableOptions::new())
        .await
        .unwrap();
    for i in 1..=rows {
        h.put(&Row::new().set("id", i).set("price", i as f64))
            .await
            .unwrap();
    }
    h
}

/// Polls the health report until `done` holds, for at most 10 s.
async fn until(engine: &Engine, done: impl Fn(&ConsistencyReport) -> bool) -> ConsistencyReport {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = engine.health().consistency.expect("the monitor is on");
        if done(&c) || Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Seeds rows, reads each once (every hit sampled), then corrupts key 5
/// with `plant` and reads it: the monitor must report exactly that.
async fn finds_a_planted_divergence(cache_url: &str, plant: impl AsyncFnOnce(&str, Vec<u8>)) {
    let settle = Duration::from_millis(50);
    let engine = engine(cache_url, MonitorConfig::sampling(1.0).settle(settle)).await;
    let h = seeded(&engine, ROWS).await;
    for i in 1..=ROWS {
        assert!(h.read(Key::Int(i)).await.unwrap().hit, "row {i} is cached");
    }
    let clean = until(&engine, |c| c.checks >= ROWS as u64).await;
    assert_eq!(
        (clean.checks, clean.divergences),
        (ROWS as u64, 0),
        "{clean:?}"
    );
    assert_eq!(clean.nines, Some((ROWS as f64).log10()));
    assert_eq!(clean.last_divergence, None);

    // The same version, another price: the fence cannot see it, only a look
    // at the database can.
    let version = h.inspect(Key::Int(5)).await.unwrap().row.unwrap().version;
    let wrong = Codec::Json
        .encode(&items(), &Row::new().set("id", 5).set("price", -1.0))
        .unwrap()
        .into_entry_at(version, engine.cache_epoch());
    plant(&h.cache_key(Key::Int(5)).unwrap(), wrong.to_vec()).await;
    let served = h.get(Key::Int(5)).await.unwrap().unwrap();
    assert_eq!(
        served.get("price"),
        Some(&Value::Float(-1.0)),
        "the cache served the planted row"
    );

    let found = until(&engine, |c| c.divergences >= 1).await;
    assert_eq!(found.divergences, 1, "{found:?}");
    assert_eq!(found.checks, ROWS as u64 + 1, "{found:?}");
    assert_eq!(found.tables["items"], (ROWS as u64 + 1, 1));
    let last = found
        .last_divergence
        .clone()
        .expect("the divergence is reported");
    assert_eq!((last.table.as_str(), last.key.as_str()), ("items", "5"));
    assert_eq!(last.kind, DivergenceKind::Differs);
    assert!(last.ago < Duration::from_secs(10));
    let nines = found.nines.unwrap();
    assert!(
        (nines - (ROWS as f64 + 1.0).log10()).abs() < 1e-9,
        "{nines}"
    );
    assert_eq!(found.dropped, 0);
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_monitor_finds_an_entry_corrupted_in_redis() {
    let redis = RedisServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    finds_a_planted_divergence(&url, async |key: &str, bytes: Vec<u8>| {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(bytes)
            .query_async(&mut conn)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_monitor_finds_an_entry_corrupted_in_moka() {
    // Moka lives in the engine's process: its raw store is the only way in.
    let engine = engine(
        "moka://",
        MonitorConfig::sampling(1.0).settle(Duration::from_millis(50)),
    )
    .await;
    let cache = engine.raw_cache().clone();
    let h = seeded(&engine, 1).await;
    let version = h.inspect(Key::Int(1)).await.unwrap().row.unwrap().version;
    let stale = Codec::Json
        .encode(&items(), &Row::new().set("id", 1).set("price", 0.5))
        .unwrap()
        .into_entry_at(version - 1, engine.cache_epoch());
    // Unfenced: an older version replaces the newer entry.
    cache
        .set(&h.cache_key(Key::Int(1)).unwrap(), stale, None)
        .await
        .unwrap();
    assert!(h.read(Key::Int(1)).await.unwrap().hit);
    let found = until(&engine, |c| c.divergences >= 1).await;
    assert_eq!((found.checks, found.divergences), (1, 1), "{found:?}");
    assert_eq!(found.last_divergence.unwrap().kind, DivergenceKind::Stale);
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_drops_samples_and_counts_them() {
    let monitor = MonitorConfig::sampling(1.0)
        .settle(Duration::from_millis(300))
        .queue(4);
    let engine = engine("moka://", monitor).await;
    let h = seeded(&engine, 1).await;
    for _ in 0..100 {
        assert!(h.read(Key::Int(1)).await.unwrap().hit);
    }
    let c = engine.health().consistency.unwrap();
    // At most the queue and the sample in the task's hands wait; the rest is dropped.
    assert!(c.dropped >= 100 - 5, "{c:?}");
    let done = until(&engine, |c| c.checks + c.dropped >= 100).await;
    assert_eq!(done.checks + done.dropped, 100, "{done:?}");
    assert_eq!(done.divergences, 0, "{done:?}");
    engine.shutdown().await.unwrap();
}
