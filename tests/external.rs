//! Writes made outside the engine (README: "Writes made outside the
//! engine"), on real servers, written by other processes with the stock
//! clients (`psql`, `sqlite3`) or a plain driver connection:
//!
//! * inserts, updates (one that changes the key too), deletes and a
//!   `TRUNCATE` reach every engine's cache within the bound, on Redis (one
//!   cache shared by two engines) and Moka (one cache per engine); with the
//!   tracking off the same external update is still served stale after the
//!   bound (the mechanism shown to bite);
//! * a bulk update of 100,000 rows, and a migration that adds a column
//!   while engines write;
//! * bad input: a trigger of the engine's name that is not the engine's,
//!   a role without the privilege to create triggers: a typed error at
//!   registration and nothing half-installed;
//! * the history checker with an external-writer process among engine
//!   processes.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use writethrough::backend::{CacheStore, DbStore};
use writethrough::{Config, Engine, Entity, ErrorKind, Handle, TableOptions};
use writethrough_testkit::server::{PostgresServer, RedisServer};
use writethrough_testkit::suite::engine::{Item, item};
use writethrough_testkit::suite::unique;

/// How often the engines scan the change table without a doorbell.
const POLL: Duration = Duration::from_millis(200);

/// The bound the README states for these settings: a scan interval (a
/// missed doorbell), plus the repair's own round trips and the cache
/// timeout twice over. Generous on this noisy machine; the measured
/// delays are printed.
fn bound() -> Duration {
    POLL + Duration::from_millis(800)
}

fn config(ns: &str) -> Config {
    let mut c = Config::default();
    c.namespace = ns.into();
    c.external_poll_interval = POLL;
    c
}

async fn postgres() -> PostgresServer {
    PostgresServer::start()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn redis() -> RedisServer {
    RedisServer::start().await.unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a stock client as another process: `psql` on a PostgreSQL URL,
/// `sqlite3` on a file. Fails the test on a non-zero exit, with stderr.
async fn external(db: &Db, sql: &str) -> String {
    let mut cmd = match db {
        Db::Postgres(url) => {
            let mut c = tokio::process::Command::new("psql");
            c.args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                url,
                "-c",
                sql,
            ]);
            c
        }
        Db::Sqlite(path) => {
            let mut c = tokio::process::Command::new("sqlite3");
            c.args(["-bail", "-cmd", ".timeout 10000"])
                .arg(path)
                .arg(sql);
            c
        }
    };
    let out = cmd.stdin(Stdio::null()).output().await.unwrap_or_else(|e| {
        panic!("cannot run the stock client ({e}); install postgresql-client and sqlite3")
    });
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[derive(Clone)]
enum Db {
    Postgres(String),
    Sqlite(std::path::PathBuf),
}

impl Db {
    fn url(&self) -> String {
        match self {
            Db::Postgres(u) => u.clone(),
            Db::Sqlite(p) => format!("sqlite://{}", p.display()),
        }
    }
}

/// Two engines on one database: with `shared`, on one Redis; else each
/// with its own Moka cache (as two processes would be).
async fn engines(db: &Db, redis: Option<&RedisServer>, ns: &str) -> Vec<Engine> {
    let mut out = Vec::new();
    for _ in 0..2 {
        let cache = match redis {
            Some(r) => writethrough::open_cache(&r.url()).await.unwrap(),
            None => writethrough::open_cache("moka://").await.unwrap(),
        };
        let store = writethrough::open_db(&db.url()).await.unwrap();
        let engine = Engine::builder_dyn(cache, store)
            .config(config(ns))
            .build()
            .unwrap();
        out.push(engine);
    }
    out
}

async fn register(engines: &[Engine], table: &str, track: bool) -> Vec<Handle<Item>> {
    let t = Item::table().renamed(table).unwrap();
    let mut out = Vec::new();
    for e in engines {
        out.push(
            e.register_in(t.clone(), TableOptions::new().track_external_writes(track))
                .await
                .unwrap(),
        );
    }
    out
}

/// Waits until every handle reads `want` for `key`; returns how long that
/// took, or `None` if some handle still read something else after `limit`.
async fn seen_by_all(
    handles: &[Handle<Item>],
    key: i64,
    want: Option<i64>,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        let mut all = true;
        for h in handles {
            let got = h.get(key).await.unwrap().map(|i| i.qty);
            all &= got == want;
        }
        if all {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Every kind of external write, each seen by every engine within the
/// bound; then the same update with tracking off, still stale after it.
async fn external_writes_reach_every_cache(db: Db, redis: Option<&RedisServer>, pair: &str) {
    let ns = unique("ext");
    let table = unique("ext");
    let engines = engines(&db, redis, &ns).await;
    let hs = register(&engines, &table, true).await;
    let mut it = item(1, 1.0);
    it.qty = 10;
    hs[0].put(&it).await.unwrap();
    // Every engine has key 1 cached, and key 2 known missing.
    assert!(seen_by_all(&hs, 1, Some(10), bound()).await.is_some());
    assert!(seen_by_all(&hs, 2, None, bound()).await.is_some());
    let mut delays = Vec::new();
    let q = format!("\"{table}\"");
    let steps: Vec<(String, i64, Option<i64>)> = vec![
        (format!("UPDATE {q} SET qty = 11 WHERE id = 1"), 1, Some(11)),
        (
            format!(
                "INSERT INTO {q} (id, name, price, qty, active, tags) \
                 VALUES (2, 'external', 2.5, 20, true, '{{}}')"
            ),
            2,
            Some(20),
        ),
        (format!("DELETE FROM {q} WHERE id = 1"), 1, None),
        (
            format!("UPDATE {q} SET id = 3, qty = 30 WHERE id = 2"),
            3,
            Some(30),
        ),
    ];
    for (i, (sql, key, want)) in steps.into_iter().enumerate() {
        if i == 2 && matches!(db, Db::Postgres(_)) {
            // The doorbell's LISTEN connections cut: notifications sent
            // until they are back are lost; the reconnect rings, and the
            // periodic scan covers the rest.
            let cut = external(
                &db,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'",
            )
            .await;
            let cut: u32 = cut.parse().expect("a count");
            assert!(
                cut >= 2,
                "{pair}: one LISTEN connection per store, {cut} cut"
            );
        }
        external(&db, &sql).await;
        let d = seen_by_all(&hs, key, want, bound())
            .await
            .unwrap_or_else(|| panic!("{pair}: after `{sql}` an engine still served the old row"));
        delays.push(d);
    }
    // The key the update moved away from is gone everywhere.
    assert!(
        seen_by_all(&hs, 2, None, bound()).await.is_some(),
        "{pair}: old key of a key change"
    );
    if matches!(db, Db::Postgres(_)) {
        assert!(seen_by_all(&hs, 3, Some(30), bound()).await.is_some());
        external(&db, &format!("TRUNCATE {q}")).await;
        let d = seen_by_all(&hs, 3, None, bound())
            .await
            .unwrap_or_else(|| panic!("{pair}: a truncated row was still served"));
        delays.push(d);
        assert!(engines[0].stats().external_truncates >= 1);
    }
    // The engine's own writes are not recorded as external ones, and their
    // versions keep increasing across both kinds of writer.
    let before = changes_count(&db).await;
    let mut it = item(4, 1.0);
    it.qty = 40;
    hs[1].put(&it).await.unwrap();
    external(&db, &format!("UPDATE {q} SET qty = 41 WHERE id = 4")).await;
    assert!(seen_by_all(&hs, 4, Some(41), bound()).await.is_some());
    it.qty = 42;
    hs[0].put(&it).await.unwrap();
    // (Private caches see only their own engine's writes: that is what an
    // in-process cache in several processes is.)
    let writer = if redis.is_some() { &hs[..] } else { &hs[..1] };
    assert!(
        seen_by_all(writer, 4, Some(42), bound()).await.is_some(),
        "{pair}: an engine write after an external one"
    );
    assert_eq!(
        changes_count(&db).await,
        before + 1,
        "{pair}: only the external write is recorded"
    );
    let max = delays.iter().max().copied().unwrap_or_default();
    println!("{pair}: external writes seen by every engine after at most {max:.1?} ({delays:.1?})");
    for e in &engines {
        e.shutdown().await.unwrap();
    }

    // Tracking off: the same external update is served stale past the bound.
    let (ns, table) = (unique("ext_off"), unique("ext_off"));
    let engines = self::engines(&db, redis, &ns).await;
    let hs = register(&engines, &table, false).await;
    let mut it = item(1, 1.0);
    it.qty = 10;
    hs[0].put(&it).await.unwrap();
    assert!(seen_by_all(&hs, 1, Some(10), bound()).await.is_some());
    external(
        &db,
        &format!("UPDATE \"{table}\" SET qty = 11 WHERE id = 1"),
    )
    .await;
    assert!(
        seen_by_all(&hs, 1, Some(11), bound() * 2).await.is_none(),
        "{pair}: without tracking the external update should stay invisible to the cache"
    );
    println!(
        "{pair}: without tracking, the external update was still unseen after {:?}",
        bound() * 2
    );
}

async fn changes_count(db: &Db) -> i64 {
    external(db, "SELECT count(*) FROM _wt_changes")
        .await
        .parse()
        .expect("a count")
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_external_writes_reach_shared_and_private_caches() {
    let pg = postgres().await;
    let r = redis().await;
    let db = Db::Postgres(pg.url());
    external_writes_reach_every_cache(db.clone(), Some(&r), "redis+postgres").await;
    external_writes_reach_every_cache(db, None, "moka+postgres").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_external_writes_reach_shared_and_private_caches() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::Sqlite(dir.path().join("ext.db"));
    let r = redis().await;
    external_writes_reach_every_cache(db.clone(), Some(&r), "redis+sqlite").await;
    external_writes_reach_every_cache(db, None, "moka+sqlite").await;
}

/// One `UPDATE` of 100,000 rows while 2,000 of them are cached: every
/// cached key is repaired, page by page.
async fn bulk_update(db: Db, redis: &RedisServer, pair: &str) {
    const ROWS: i64 = 100_000;
    let (ns, table) = (unique("bulk"), unique("bulk"));
    let engines = engines(&db, Some(redis), &ns).await;
    let hs = register(&engines, &table, true).await;
    let q = format!("\"{table}\"");
    let fill = match db {
        Db::Postgres(_) => format!(
            "INSERT INTO {q} (id, name, price, qty, active, tags) \
             SELECT g, 'bulk', 1.0, 1, true, '{{}}' FROM generate_series(1, {ROWS}) AS g"
        ),
        Db::Sqlite(_) => format!(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {ROWS}) \
             INSERT INTO {q} (id, name, price, qty, active, tags) SELECT n, 'bulk', 1.0, 1, 1, '{{}}' FROM g"
        ),
    };
    external(&db, &fill).await;
    // Let the inserts' records be applied, then cache 2,000 rows.
    let keys: Vec<i64> = (1..=2000).map(|k| k * 50).collect();
    tokio::time::sleep(bound()).await;
    for k in &keys {
        assert_eq!(hs[0].get(*k).await.unwrap().map(|i| i.qty), Some(1));
    }
    let start = Instant::now();
    external(&db, &format!("UPDATE {q} SET qty = 2")).await;
    let committed = start.elapsed();
    let limit = Duration::from_secs(60);
    let mut left: Vec<i64> = keys.clone();
    while !left.is_empty() {
        let mut still = Vec::new();
        for k in left {
            if hs[1].get(k).await.unwrap().map(|i| i.qty) != Some(2) {
                still.push(k);
            }
        }
        left = still;
        assert!(
            start.elapsed() < limit,
            "{pair}: {} cached rows still stale after {limit:?}",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let repaired = engines[0].stats().external_repaired + engines[1].stats().external_repaired;
    println!(
        "{pair}: UPDATE of {ROWS} rows committed in {committed:.1?}; every cached row repaired {:.1?} after it started ({repaired} keys repaired by the two engines)",
        start.elapsed()
    );
    assert!(
        repaired >= ROWS as u64,
        "{pair}: every changed key is repaired by some engine"
    );
    for e in &engines {
        e.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_update_of_100k_rows_is_repaired_in_pages() {
    let pg = postgres().await;
    let r = redis().await;
    bulk_update(Db::Postgres(pg.url()), &r, "redis+postgres").await;
    let dir = tempfile::tempdir().unwrap();
    bulk_update(Db::Sqlite(dir.path().join("bulk.db")), &r, "redis+sqlite").await;
}

/// `ALTER TABLE ... ADD COLUMN` while two engines write and read: no
/// engine call fails, and external writes are tracked after it.
async fn migration(db: Db, pair: &str) {
    let (ns, table) = (unique("mig"), unique("mig"));
    let engines = engines(&db, None, &ns).await;
    let hs = register(&engines, &table, true).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = hs
        .iter()
        .cloned()
        .enumerate()
        .map(|(w, h)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let mut it = item(100 + (n % 10) + w as i64 * 10, 1.0);
                    it.qty = n;
                    h.put(&it).await.expect("a write during the migration");
                    h.get(it.id).await.expect("a read during the migration");
                }
                n
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    external(
        &db,
        &format!("ALTER TABLE \"{table}\" ADD COLUMN added_later INTEGER DEFAULT 7"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writes = 0;
    for w in workers {
        writes += w.await.expect("no engine call failed");
    }
    external(
        &db,
        &format!("UPDATE \"{table}\" SET qty = 77 WHERE id = 101"),
    )
    .await;
    assert!(
        seen_by_all(&hs, 101, Some(77), bound()).await.is_some(),
        "{pair}: an external write after the migration"
    );
    println!("{pair}: {writes} engine writes went through a migration adding a column");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migration_adding_a_column_while_engines_write() {
    let pg = postgres().await;
    migration(Db::Postgres(pg.url()), "moka+postgres").await;
    let dir = tempfile::tempdir().unwrap();
    migration(Db::Sqlite(dir.path().join("mig.db")), "moka+sqlite").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_trigger_of_the_engines_name_is_refused_and_nothing_is_installed() {
    let pg = postgres().await;
    let dir = tempfile::tempdir().unwrap();
    for db in [
        Db::Postgres(pg.url()),
        Db::Sqlite(dir.path().join("bad.db")),
    ] {
        let (ns, table) = (unique("bad"), unique("bad"));
        let engines = engines(&db, None, &ns).await;
        // The table exists (created by an engine without tracking), then a
        // trigger of one of the engine's names is added by someone else.
        register(&engines[..1], &table, false).await;
        let q = format!("\"{table}\"");
        let (foreign, other) = match db {
            Db::Postgres(_) => {
                external(
                    &db,
                    &format!(
                        "CREATE FUNCTION {0}_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$; \
                         CREATE TRIGGER _wt_external_truncate BEFORE TRUNCATE ON {q} FOR EACH STATEMENT EXECUTE FUNCTION {0}_fn()",
                        table.replace('-', "_")
                    ),
                )
                .await;
                (
                    "_wt_external_truncate".to_owned(),
                    format!(
                        "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{q}'::regclass AND tgname = '_wt_external'"
                    ),
                )
            }
            Db::Sqlite(_) => {
                external(
                    &db,
                    &format!("CREATE TRIGGER \"_wt_ext_upd_{table}\" AFTER UPDATE ON {q} BEGIN SELECT 1; END"),
                )
                .await;
                (
                    format!("_wt_ext_upd_{table}"),
                    format!(
                        "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name = '_wt_ext_ins_{table}'"
                    ),
                )
            }
        };
        let t = Item::table().renamed(&table).unwrap();
        let e = engines[1]
            .register_in(t, TableOptions::<Item>::new().track_external_writes(true))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::SchemaMismatch, "{e}");
        assert!(e.to_string().contains(&foreign), "{e}");
        assert_eq!(
            external(&db, &other).await,
            "0",
            "a trigger was left half-installed"
        );
        println!("refused: {e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_without_the_privilege_to_create_triggers_gets_a_typed_error() {
    let pg = postgres().await;
    let db = Db::Postgres(pg.url());
    let (ns, table) = (unique("priv"), unique("priv"));
    let engines = engines(&db, None, &ns).await;
    register(&engines[..1], &table, false).await;
    let role = table.replace('-', "_");
    external(
        &db,
        &format!(
            "CREATE ROLE {role} LOGIN; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON \"{table}\", _wt_outbox TO {role}; \
             GRANT USAGE ON SEQUENCE _wt_version_seq, _wt_outbox_id_seq TO {role}"
        ),
    )
    .await;
    let url = pg.url().replacen("postgres@", &format!("{role}@"), 1);
    let store = writethrough::open_db(&url).await.unwrap();
    let t = Item::table().renamed(&table).unwrap();
    let e = store.track_external(&t).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("TRIGGER privilege"), "{e}");
    let left = external(
        &db,
        &format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '\"{table}\"'::regclass AND NOT tgisinternal"),
    )
    .await;
    assert_eq!(left, "0", "nothing is installed");
    println!("refused: {e}");
    // Installed by the owner, the triggers run with its rights: the limited
    // role writes the table as an external writer and is recorded.
    let t = Item::table().renamed(&table).unwrap();
    let hs = vec![
        engines[0]
            .register_in(t, TableOptions::<Item>::new().track_external_writes(true))
            .await
            .unwrap(),
    ];
    let mut it = item(1, 1.0);
    it.qty = 1;
    hs[0].put(&it).await.unwrap();
    external(
        &Db::Postgres(url),
        &format!("UPDATE \"{table}\" SET qty = 2 WHERE id = 1"),
    )
    .await;
    assert!(seen_by_all(&hs, 1, Some(2), bound()).await.is_some());
}

/// The history checker: three engine processes on one Redis and an
/// external-writer process on its own plain connection. Reads that begin
/// within the bound after an external write began are counted apart (with
/// the largest staleness among them); every other operation, the external
/// writes included, must be linearizable. Then the same with tracking off,
/// which must show violations.
async fn history_with_an_external_writer(db_url: &str, redis: &RedisServer, track: bool) -> usize {
    use writethrough_testkit::history::{Event, Op, check_windowed, monotonic_ns};

    const PROCS: u32 = 3;
    // Cold keys are mostly read by the engines (see `Workload`): a stale
    // entry there would outlive the bound.
    const HOT: i64 = 6;
    const COLD: i64 = 200;
    let mut setup = Vec::new();
    let (ns, table) = (unique("exthist"), unique("exthist"));
    {
        let cache = writethrough::open_cache(&redis.url()).await.unwrap();
        let db = writethrough::open_db(db_url).await.unwrap();
        let engine = Engine::builder_dyn(cache, db)
            .config(config(&ns))
            .build()
            .unwrap();
        let t = Item::table().renamed(&table).unwrap();
        let h = engine
            .register_in(t, TableOptions::<Item>::new().track_external_writes(track))
            .await
            .unwrap();
        // Every key starts with a cached row, so that an external write
        // the caches missed would be served stale (recorded as writes).
        for key in 1..=HOT + COLD {
            let v = 1_000 + key as u32;
            let mut it = item(key, 1.0);
            it.qty = i64::from(v);
            let call = monotonic_ns();
            h.put(&it).await.unwrap();
            setup.push(Event {
                key,
                op: Op::Write(v),
                call,
                ret: monotonic_ns(),
                client: 999,
            });
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut children = Vec::new();
    for p in 0..=PROCS {
        let out = dir.path().join(format!("history-{p}.txt"));
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wt-history-client"));
        cmd.env("WT_CACHE_URL", redis.url())
            .env("WT_DB_URL", db_url)
            .env("WT_NAMESPACE", &ns)
            .env("WT_TABLE", &table)
            .env("WT_FIRST_VALUE", ((p + 1) * 10_000_000).to_string())
            .env("WT_FIRST_CLIENT", (p * 100).to_string())
            .env("WT_TRACK_EXTERNAL", if track { "1" } else { "0" })
            .env("WT_OUT", &out)
            .kill_on_drop(true);
        if p == PROCS {
            // Hot and cold keys alike: on a cold key, which the engines
            // mostly read, a stale entry would stay long enough to be read.
            cmd.env("WT_ROLE", "external")
                .env("WT_OPS", "40")
                .env("WT_KEYS", (HOT + COLD).to_string())
                .env("WT_EXTERNAL_PAUSE_MS", "150");
        } else {
            cmd.env("WT_OPS", "8000")
                .env("WT_KEYS", HOT.to_string())
                .env("WT_COLD_KEYS", COLD.to_string())
                .env("WT_CLIENTS", "3");
        }
        children.push((
            cmd.spawn().expect("a history client starts"),
            out,
            p == PROCS,
        ));
    }
    let bound_ns = bound().as_nanos() as u64;
    let mut events = setup;
    // Per key: from an external write's start to the bound after its end.
    let mut windows: std::collections::HashMap<i64, Vec<(u64, u64)>> = Default::default();
    for (mut child, out, is_external) in children {
        let status = child.wait().await.expect("reaped");
        assert!(status.success(), "a history client failed: {status}");
        let text = std::fs::read_to_string(&out).expect("the history file");
        for e in text
            .lines()
            .map(|l| Event::parse_line(l).expect("an event line"))
        {
            if is_external {
                let end = if e.ret == u64::MAX {
                    e.call + 10 * bound_ns
                } else {
                    e.ret
                };
                windows
                    .entry(e.key)
                    .or_default()
                    .push((e.call, end + bound_ns));
            }
            events.push(e);
        }
    }
    let mut keys: Vec<i64> = events.iter().map(|e| e.key).collect();
    keys.sort_unstable();
    keys.dedup();
    let (mut reads, mut inside, mut stale, mut worst, mut violations) =
        (0, 0, 0, Duration::ZERO, 0);
    for k in keys {
        let of_key: Vec<Event> = events.iter().filter(|e| e.key == k).copied().collect();
        reads += of_key
            .iter()
            .filter(|e| matches!(e.op, Op::Read(_)))
            .count();
        let r = check_windowed(&of_key, windows.get(&k).map_or(&[][..], |w| &w[..]));
        inside += r.in_window_reads;
        stale += r.in_window_stale;
        worst = worst.max(r.max_staleness);
        violations += r.violations.len();
    }
    println!(
        "external writer + {PROCS} engine processes, tracking {}: {} ops, {reads} reads, {inside} within the bound after an external write ({stale} of them stale, at most {worst:.0?} behind), {violations} keys with violations outside",
        if track { "on" } else { "off" },
        events.len()
    );
    violations
}

#[tokio::test(flavor = "multi_thread")]
async fn history_with_an_external_writer_process_postgres() {
    let pg = postgres().await;
    let r = redis().await;
    assert_eq!(
        history_with_an_external_writer(&pg.url(), &r, true).await,
        0
    );
    assert!(
        history_with_an_external_writer(&pg.url(), &r, false).await > 0,
        "without tracking, the external writes should leave stale entries"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn history_with_an_external_writer_process_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("h.db").display());
    let r = redis().await;
    assert_eq!(history_with_an_external_writer(&url, &r, true).await, 0);
    assert!(
        history_with_an_external_writer(&url, &r, false).await > 0,
        "without tracking, the external writes should leave stale entries"
    );
}

/// An external write made while no engine runs: the next engine to start
/// on the shared cache replays the records still kept and repairs it.
#[tokio::test(flavor = "multi_thread")]
async fn an_external_write_made_while_no_engine_ran_is_repaired_on_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::Sqlite(dir.path().join("down.db"));
    let r = redis().await;
    let (ns, table) = (unique("down"), unique("down"));
    {
        let engines = engines(&db, Some(&r), &ns).await;
        let hs = register(&engines[..1], &table, true).await;
        let mut it = item(1, 1.0);
        it.qty = 10;
        hs[0].put(&it).await.unwrap();
        assert!(seen_by_all(&hs, 1, Some(10), bound()).await.is_some());
        engines[0].shutdown().await.unwrap();
    }
    // No engine follows the table now; the cache keeps qty 10.
    tokio::time::sleep(Duration::from_millis(300)).await;
    external(
        &db,
        &format!("UPDATE \"{table}\" SET qty = 11 WHERE id = 1"),
    )
    .await;
    let cache = writethrough::open_cache(&r.url()).await.unwrap();
    let ck = format!("{ns}:{table}:1");
    let stale = cache
        .get(&ck)
        .await
        .unwrap()
        .expect("the old entry is still cached");
    assert!(!stale.is_empty());
    let engines = engines(&db, Some(&r), &ns).await;
    let hs = register(&engines[..1], &table, true).await;
    let d = seen_by_all(&hs, 1, Some(11), bound())
        .await
        .expect("the engine that started repaired the entry");
    println!(
        "redis+sqlite: an external write made while no engine ran was repaired {d:.1?} after an engine started"
    );
}

/// A long transaction elsewhere (a `psql` session left open in a
/// transaction that holds a transaction id) must not make the follower
/// read the change table again from where that transaction began: each
/// record is read about once however long it stays open.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_open_transaction_does_not_make_the_follower_reread_the_log() {
    use tokio::io::AsyncWriteExt;
    const WRITES: i64 = 40;
    let pg = postgres().await;
    let db = Db::Postgres(pg.url());
    let (ns, table) = (unique("long"), unique("long"));
    let engines = engines(&db, None, &ns).await;
    let hs = register(&engines[..1], &table, true).await;
    for k in 1..=WRITES {
        let mut it = item(k, 1.0);
        it.qty = 0;
        hs[0].put(&it).await.unwrap();
    }
    let mut held = tokio::process::Command::new("psql")
        .args(["-X", "-q", &pg.url()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("psql runs");
    let stdin = held.stdin.as_mut().unwrap();
    stdin
        .write_all(b"BEGIN; SELECT pg_current_xact_id();\n")
        .await
        .unwrap();
    stdin.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read_before = engines[0].stats().external_read;
    for k in 1..=WRITES {
        external(
            &db,
            &format!("UPDATE \"{table}\" SET qty = 1 WHERE id = {k}"),
        )
        .await;
        assert!(seen_by_all(&hs, k, Some(1), bound()).await.is_some());
    }
    let read = engines[0].stats().external_read - read_before;
    println!(
        "{WRITES} external writes under a transaction held open: {read} records read by the follower"
    );
    assert!(
        read <= 2 * WRITES as u64,
        "the follower read {read} records for {WRITES} changes"
    );
    drop(held);
}

/// Record ids are drawn before commit: an external transaction that drew
/// the lower id and commits after a later one must still be applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_committed_after_a_later_one_is_not_skipped() {
    use tokio::io::AsyncWriteExt;
    let pg = postgres().await;
    let db = Db::Postgres(pg.url());
    let r = redis().await;
    for shared in [true, false] {
        let (ns, table) = (unique("order"), unique("order"));
        let engines = engines(&db, shared.then_some(&r), &ns).await;
        let hs = register(&engines[..1], &table, true).await;
        for k in 1..=2 {
            let mut it = item(k, 1.0);
            it.qty = 0;
            hs[0].put(&it).await.unwrap();
            assert!(seen_by_all(&hs, k, Some(0), bound()).await.is_some());
        }
        let mut first = tokio::process::Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &pg.url()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("psql runs");
        let stdin = first.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("BEGIN; UPDATE \"{table}\" SET qty = 5 WHERE id = 1;\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The later record commits first, and the follower reads past it.
        external(&db, &format!("UPDATE \"{table}\" SET qty = 6 WHERE id = 2")).await;
        assert!(seen_by_all(&hs, 2, Some(6), bound()).await.is_some());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stdin = first.stdin.as_mut().unwrap();
        stdin.write_all(b"COMMIT;\n\\q\n").await.unwrap();
        stdin.flush().await.unwrap();
        assert!(first.wait().await.unwrap().success());
        let d = seen_by_all(&hs, 1, Some(5), bound())
            .await
            .expect("the change of the transaction that committed last is applied");
        println!(
            "{}: a change committed after a later one applied {d:.1?} after its commit",
            if shared {
                "redis+postgres"
            } else {
                "moka+postgres"
            }
        );
    }
}

/// An engine write that cascades into a tracked table (a foreign key's
/// `ON DELETE CASCADE`) is a side effect the engine does not know of: the
/// cascaded delete is recorded and repaired like an external one.
#[tokio::test(flavor = "multi_thread")]
async fn a_cascade_from_an_engine_write_is_recorded() {
    let pg = postgres().await;
    let db = Db::Postgres(pg.url());
    let (ns, parents, children) = (unique("casc"), unique("parents"), unique("children"));
    let engines = engines(&db, None, &ns).await;
    let ps = register(&engines[..1], &parents, false).await;
    let cs = register(&engines[..1], &children, true).await;
    ps[0].put(&item(1, 1.0)).await.unwrap();
    let mut child = item(1, 1.0);
    child.qty = 3;
    cs[0].put(&child).await.unwrap();
    external(
        &db,
        &format!(
            "ALTER TABLE \"{children}\" ADD COLUMN parent BIGINT REFERENCES \"{parents}\" (id) ON DELETE CASCADE; \
             UPDATE \"{children}\" SET parent = 1 WHERE id = 1"
        ),
    )
    .await;
    assert!(seen_by_all(&cs, 1, Some(3), bound()).await.is_some());
    // The engine deletes the parent; PostgreSQL deletes the child.
    assert!(ps[0].delete(1).await.unwrap());
    let d = seen_by_all(&cs, 1, None, bound())
        .await
        .expect("the cascaded delete reaches the cache");
    println!("moka+postgres: a cascade from an engine delete repaired after {d:.1?}");
}
