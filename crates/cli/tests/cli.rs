//! The `writethrough` binary run as a process against real servers (the
//! testkit starts them): its output and exit statuses on every pair with a
//! network cache, divergences planted by hand with the raw cache clients,
//! bad input, the progress bar under a pseudo-terminal, and Ctrl-C.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use writethrough::backend::OUTBOX_TABLE;
use writethrough::codec::Codec;
use writethrough::{ColumnType, Engine, Handle, Key, Row, Table, TableOptions};
use writethrough_testkit::server::{MemcachedServer, PostgresServer, RedisServer};

const BIN: &str = env!("CARGO_BIN_EXE_writethrough");
const NS: &str = "clitest";
const ROWS: i64 = 50;

fn items() -> Table {
    Table::builder("items")
        .key("id", ColumnType::Int)
        .column("name", ColumnType::Text)
        .column("price", ColumnType::Float)
        .nullable("note", ColumnType::Text)
        .build()
        .unwrap()
}

fn item(id: i64, price: f64) -> Row {
    Row::new()
        .set("id", id)
        .set("name", format!("item {id}"))
        .set("price", price)
}

/// The servers of one pair, kept alive for the test, and their URLs.
struct Pair {
    cache_url: String,
    db_url: String,
    redis: Option<RedisServer>,
    memcached: Option<MemcachedServer>,
    postgres: Option<PostgresServer>,
    _dir: tempfile::TempDir,
}

#[derive(Clone, Copy, Debug)]
enum CacheKind {
    Redis,
    Memcached,
}

#[derive(Clone, Copy, Debug)]
enum DbKind {
    Postgres,
    Sqlite,
}

fn expect_server<T>(r: Result<T, writethrough_testkit::server::ServerError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

impl Pair {
    async fn start(cache: CacheKind, db: DbKind) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let (redis, memcached, cache_url) = match cache {
            CacheKind::Redis => {
                let s = expect_server(RedisServer::start().await);
                let url = s.url();
                (Some(s), None, url)
            }
            CacheKind::Memcached => {
                let s = expect_server(MemcachedServer::start().await);
                let url = s.url();
                (None, Some(s), url)
            }
        };
        let (postgres, db_url) = match db {
            DbKind::Postgres => {
                let s = expect_server(PostgresServer::start().await);
                let url = s.url();
                (Some(s), url)
            }
            DbKind::Sqlite => (
                None,
                format!("sqlite://{}", dir.path().join("app.db").display()),
            ),
        };
        Pair {
            cache_url,
            db_url,
            redis,
            memcached,
            postgres,
            _dir: dir,
        }
    }

    /// An engine of the application's, in the test's namespace.
    async fn engine(&self) -> Engine {
        writethrough::open(&self.cache_url, &self.db_url)
            .await
            .unwrap()
            .namespace(NS)
            // The outbox records a test plants are the command's to replay.
            .configure(|c| c.reconcile_interval = None)
            .build()
            .unwrap()
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args([
                "--cache",
                &self.cache_url,
                "--db",
                &self.db_url,
                "--namespace",
                NS,
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Stores `bytes` under `key` with the cache's own client, not the engine.
    async fn plant(&self, key: &str, bytes: &[u8]) {
        if let Some(r) = &self.redis {
            let client = redis::Client::open(r.url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let _: () = redis::cmd("SET")
                .arg(key)
                .arg(bytes)
                .query_async(&mut conn)
                .await
                .unwrap();
        } else if let Some(m) = &self.memcached {
            let raw = writethrough::memcached::raw::RawClient::new(&m.addr().to_string(), 1);
            raw.set(key, bytes).await.unwrap();
        }
    }

    async fn unplant(&self, key: &str) {
        if let Some(r) = &self.redis {
            let client = redis::Client::open(r.url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let _: i64 = redis::cmd("DEL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
        } else if let Some(m) = &self.memcached {
            let raw = writethrough::memcached::raw::RawClient::new(&m.addr().to_string(), 1);
            raw.delete(key).await.unwrap();
        }
    }

    /// Runs SQL on the database, outside any engine.
    async fn sql(&self, sql: &str) {
        match &self.postgres {
            Some(pg) => {
                pg.simple_query(sql).await.unwrap();
            }
            None => {
                let path = self.db_url.trim_start_matches("sqlite://").to_owned();
                let sql = sql.to_owned();
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open(Path::new(&path)).unwrap();
                    conn.busy_timeout(Duration::from_secs(5)).unwrap();
                    conn.execute_batch(&sql).unwrap();
                })
                .await
                .unwrap();
            }
        }
    }

    /// An outbox record for `key` at `version`, written a second ago, as a
    /// process that died between its commit and its cache write leaves.
    async fn outbox_record(&self, key: i64, version: u64) {
        let sql = match &self.postgres {
            Some(_) => format!(
                "INSERT INTO \"{OUTBOX_TABLE}\" (tbl, key, version, created_at) \
                 VALUES ('items', 'i:{key}', {version}, now() - interval '1 second')"
            ),
            None => format!(
                "INSERT INTO \"{OUTBOX_TABLE}\" (tbl, key, version, created_ms) \
                 VALUES ('items', 'i:{key}', {version}, CAST(unixepoch('subsec') * 1000 AS INTEGER) - 1000)"
            ),
        };
        self.sql(&sql).await;
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn status(out: &Output, code: i32) -> (String, String) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    (stdout, stderr)
}

/// The line of a text report that starts with `label`, its number.
#[track_caller]
fn count(report: &str, label: &str) -> u64 {
    report
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(label)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {label:?} line in\n{report}"))
}

/// A bad-input run: status 2, one line on stderr naming the problem, nothing on stdout.
#[track_caller]
fn refused(out: &Output, needle: &str) {
    let (stdout, stderr) = status(out, 2);
    assert_eq!(stdout, "", "stdout of a refused run");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("writethrough: "), "{stderr:?}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
}

/// Seeds the table through an engine of the application's; returns the
/// engine and the handle.
async fn seed(pair: &Pair) -> (Engine, Handle<Row>) {
    let engine = pair.engine().await;
    let h = engine
        .register_table(items(), TableOptions::new())
        .await
        .unwrap();
    let rows: Vec<Row> = (1..=ROWS).map(|i| item(i, i as f64)).collect();
    h.put_many(&rows).await.unwrap();
    engine.flush().await.unwrap();
    (engine, h)
}

/// The session an operator would run, on one pair: health, warm, a
/// planted divergence found by audit (text and JSON) and inspect,
/// repaired by audit --repair, and the outbox shown and replayed.
async fn operator_session(cache: CacheKind, db: DbKind) {
    let pair = Pair::start(cache, db).await;
    let (engine, h) = seed(&pair).await;

    // The schema comes from each database's catalog, refusals included.
    pair.sql("CREATE TABLE plain (id BIGINT PRIMARY KEY, name TEXT)")
        .await;
    refused(
        &pair.cli(&["inspect", "plain", "1"]),
        "table plain has no _wt_version column",
    );
    refused(
        &pair.cli(&["audit", "--table", "nosuch"]),
        "no table nosuch",
    );
    let (out, _) = status(&pair.cli(&["health"]), 0);
    assert_eq!(out.matches("fastest").count(), 2, "{out}");
    assert!(
        out.contains("breaker   opens after 5 cache failures"),
        "{out}"
    );
    assert!(out.contains("tables    items"), "{out}");

    // A cold cache: warm loads every row.
    engine.raw_cache().clear(&format!("{NS}:")).await.unwrap();
    let (out, _) = status(&pair.cli(&["warm", "--table", "items"]), 0);
    assert!(
        out.contains(&format!("{ROWS} rows read, {ROWS} written")),
        "{out}"
    );
    let (out, _) = status(&pair.cli(&["audit", "--table", "items"]), 0);
    assert_eq!(count(&out, "checked"), ROWS as u64, "{out}");
    assert_eq!(count(&out, "matching"), ROWS as u64, "{out}");
    assert!(out.contains("no divergence"), "{out}");

    // Plant by hand: key 3 stale (an older version, another price), key 7
    // another content at its own version, key 5 bytes that are no entry,
    // key 2 gone.
    let epoch = engine.cache_epoch();
    let v3 = h.inspect(Key::Int(3)).await.unwrap().row.unwrap().version;
    let v7 = h.inspect(Key::Int(7)).await.unwrap().row.unwrap().version;
    let stale = Codec::Json
        .encode(&items(), &item(3, 999.0))
        .unwrap()
        .into_entry_at(v3 - 1, epoch);
    let differs = Codec::Json
        .encode(&items(), &item(7, 0.5))
        .unwrap()
        .into_entry_at(v7, epoch);
    pair.plant(&h.cache_key(Key::Int(3)).unwrap(), &stale).await;
    pair.plant(&h.cache_key(Key::Int(7)).unwrap(), &differs)
        .await;
    pair.plant(&h.cache_key(Key::Int(5)).unwrap(), b"not an entry")
        .await;
    pair.unplant(&h.cache_key(Key::Int(2)).unwrap()).await;

    let (out, _) = status(
        &pair.cli(&["audit", "--table", "items", "--settle-ms", "50"]),
        1,
    );
    assert_eq!(count(&out, "checked"), ROWS as u64, "{out}");
    assert_eq!(count(&out, "matching"), ROWS as u64 - 4, "{out}");
    assert_eq!(count(&out, "missing"), 1, "{out}");
    assert_eq!(count(&out, "stale"), 1, "{out}");
    assert_eq!(count(&out, "differs"), 1, "{out}");
    assert_eq!(count(&out, "corrupt"), 1, "{out}");
    assert!(out.contains("divergent key 3: stale (cache v"), "{out}");
    assert!(
        out.contains("divergent key 5: corrupt (cache none"),
        "{out}"
    );
    assert!(
        out.contains("3 divergent; run again with --repair"),
        "{out}"
    );

    // A sample as large as the table is the whole table, in key order.
    let (out, _) = status(&pair.cli(&["audit", "--json", "--sample", "50"]), 1);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["divergent"], 3, "{doc:#}");
    let t = &doc["tables"][0];
    assert_eq!(t["table"], "items");
    assert_eq!(t["checked"], 50);
    assert_eq!(t["sample_seed"], serde_json::Value::Null, "{doc:#}");
    assert_eq!(t["extra_scan"]["status"], "done", "{doc:#}");
    assert_eq!(t["extra_scan"]["complete"], true, "{doc:#}");
    assert_eq!(
        (&t["stale"], &t["differs"], &t["corrupt"]),
        (&1.into(), &1.into(), &1.into())
    );
    assert_eq!(t["divergences"][0]["key"], 3, "{doc:#}");
    assert_eq!(t["divergences"][0]["kind"], "stale", "{doc:#}");
    assert_eq!(t["divergences"][0]["db_version"], v3, "{doc:#}");

    let (out, _) = status(&pair.cli(&["inspect", "items", "5"]), 1);
    assert!(out.contains("cache     corrupt"), "{out}");
    assert!(out.contains("verdict   DIVERGENT: corrupt"), "{out}");
    let (out, _) = status(&pair.cli(&["inspect", "items", "3"]), 1);
    assert!(
        out.contains(&format!("cache     row, version {}", v3 - 1)),
        "{out}"
    );
    assert!(out.contains("\"price\":999.0"), "{out}");
    assert!(out.contains(&format!("database  version {v3}")), "{out}");
    assert!(out.contains("DIVERGENT: stale"), "{out}");

    let (out, _) = status(
        &pair.cli(&["audit", "--all", "--repair", "--settle-ms", "50"]),
        1,
    );
    assert_eq!(count(&out, "repaired"), 3, "{out}");
    assert!(
        out.contains("3 divergent, repaired from the database"),
        "{out}"
    );
    let (out, _) = status(&pair.cli(&["audit", "--all"]), 0);
    assert_eq!(count(&out, "matching"), ROWS as u64 - 1, "{out}");
    assert!(out.contains("no divergence"), "{out}");
    // The engine of the application reads the repaired rows.
    assert_eq!(
        h.get(Key::Int(3)).await.unwrap().unwrap().get("price"),
        Some(&writethrough::Value::Float(3.0))
    );

    let (out, _) = status(&pair.cli(&["inspect", "items", "1"]), 0);
    assert!(out.contains("verdict   agree"), "{out}");
    assert!(out.contains("codec json"), "{out}");
    // Both tell the TTL left (Memcached by `mg <key> t`, in whole seconds).
    assert!(out.contains("TTL left 60 min"), "{out}");

    // An entry with no row behind it (key 99), found by listing the
    // cache's keys; beside it a tombstone (key 98: "absent" is correct)
    // and a key no int-keyed table has (left alone, not miscounted).
    let extra = Codec::Json
        .encode(&items(), &item(99, 9.5))
        .unwrap()
        .into_entry_at(7, epoch);
    let ck99 = h.cache_key(Key::Int(99)).unwrap();
    pair.plant(&ck99, &extra).await;
    pair.plant(
        &h.cache_key(Key::Int(98)).unwrap(),
        &writethrough::codec::tombstone_at(9, epoch),
    )
    .await;
    pair.plant(&format!("{NS}:items:not-a-number"), &extra)
        .await;
    let (out, _) = status(
        &pair.cli(&["audit", "--table", "items", "--settle-ms", "50"]),
        1,
    );
    assert_eq!(count(&out, "checked"), ROWS as u64, "{out}");
    assert_eq!(count(&out, "extra"), 1, "{out}");
    assert_eq!(count(&out, "stale"), 0, "{out}");
    assert_eq!(count(&out, "corrupt"), 0, "{out}");
    assert!(
        out.contains("divergent key 99: extra (cache v7, database none)"),
        "{out}"
    );
    assert!(
        out.contains("cache keys 52 cache keys looked at, 1 not of this table's keys"),
        "{out}"
    );
    assert!(
        out.contains("1 divergent; run again with --repair"),
        "{out}"
    );
    let (out, _) = status(&pair.cli(&["audit", "--repair", "--settle-ms", "50"]), 1);
    assert_eq!(count(&out, "extra"), 1, "{out}");
    assert_eq!(count(&out, "repaired"), 1, "{out}");
    let (out, _) = status(&pair.cli(&["audit"]), 0);
    assert_eq!(count(&out, "extra"), 0, "{out}");
    assert!(out.contains("no divergence"), "{out}");
    let (out, _) = status(&pair.cli(&["inspect", "items", "99"]), 0);
    assert!(out.contains("cache     absent"), "{out}");
    assert!(out.contains("database  no row"), "{out}");
    let (out, _) = status(&pair.cli(&["inspect", "items", "98"]), 0);
    assert!(out.contains("cache     tombstone, version 9"), "{out}");

    // A process died between its commit and its cache write: the row is
    // newer in the database, the cache still has the old entry, the
    // outbox record says so.
    let (out, _) = status(&pair.cli(&["outbox"]), 0);
    assert!(out.contains("outbox: nothing pending"), "{out}");
    pair.sql("UPDATE items SET price = 44.5, _wt_version = _wt_version + 1000 WHERE id = 4")
        .await;
    let v4 = h.inspect(Key::Int(4)).await.unwrap().row.unwrap().version;
    pair.outbox_record(4, v4).await;
    let (out, _) = status(&pair.cli(&["outbox"]), 0);
    assert!(out.contains("outbox: 1 pending"), "{out}");
    assert!(
        out.contains("items") && out.contains("1 pending, oldest"),
        "{out}"
    );
    let (out, _) = status(&pair.cli(&["inspect", "items", "4"]), 1);
    assert!(out.contains("DIVERGENT: stale"), "{out}");
    let (out, _) = status(&pair.cli(&["outbox", "--replay"]), 0);
    assert!(out.contains("replayed 1 records"), "{out}");
    assert!(out.ends_with("outbox: nothing pending\n"), "{out}");
    let (out, _) = status(&pair.cli(&["inspect", "items", "4"]), 0);
    assert!(out.contains("verdict   agree"), "{out}");
    assert!(out.contains("\"price\":44.5"), "{out}");
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_session_on_redis_and_postgres() {
    operator_session(CacheKind::Redis, DbKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_session_on_redis_and_sqlite() {
    operator_session(CacheKind::Redis, DbKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_session_on_memcached_and_postgres() {
    operator_session(CacheKind::Memcached, DbKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_session_on_memcached_and_sqlite() {
    operator_session(CacheKind::Memcached, DbKind::Sqlite).await;
}

/// Unknown table, no version column, a key of the wrong type, unreachable
/// backends, malformed URLs, missing URLs: status 2 and one line.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_one_line_and_status_2() {
    let pair = Pair::start(CacheKind::Redis, DbKind::Sqlite).await;
    let (engine, _h) = seed(&pair).await;
    pair.sql("CREATE TABLE plain (id INTEGER PRIMARY KEY, name TEXT)")
        .await;
    refused(&pair.cli(&["inspect", "nosuch", "1"]), "no table nosuch");
    refused(
        &pair.cli(&["audit", "--table", "nosuch"]),
        "no table nosuch",
    );
    refused(
        &pair.cli(&["audit", "--table", "plain"]),
        "table plain has no _wt_version column",
    );
    refused(
        &pair.cli(&["inspect", "items", "abc"]),
        "key \"abc\" is not an integer",
    );
    refused(
        &pair.cli(&["inspect", "bad name", "1"]),
        "invalid_identifier",
    );
    refused(
        &pair.cli(&["warm", "--table", "items", "--rate", "0"]),
        "--rate 0",
    );
    refused(
        &pair.cli(&["audit", "--sample", "ten"]),
        "invalid value 'ten'",
    );
    refused(&pair.cli(&["frobnicate"]), "unrecognized subcommand");

    let run = |cache: &str, db: &str, args: &[&str]| {
        Command::new(BIN)
            .args(["--connect-timeout", "2"])
            .args(["--cache", cache, "--db", db])
            .args(args)
            .env_remove("WT_CACHE_URL")
            .env_remove("WT_DB_URL")
            .output()
            .unwrap()
    };
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis_down = format!("redis://127.0.0.1:{closed}");
    refused(
        &run(&redis_down, &pair.db_url, &["health"]),
        &format!("cannot use the cache at {redis_down}"),
    );
    refused(
        &run(
            &format!("memcached://127.0.0.1:{closed}"),
            &pair.db_url,
            &["health"],
        ),
        "cannot use the cache at memcached://",
    );
    refused(
        &run(
            &pair.cache_url,
            &format!("postgres://app:s3cret@127.0.0.1:{closed}/app"),
            &["health"],
        ),
        "cannot use the database at postgres://app:***@127.0.0.1",
    );
    let out = run(
        &pair.cache_url,
        "postgres://app:s3cret@127.0.0.1:1/app",
        &["health"],
    );
    assert!(
        !text(&out.stderr).contains("s3cret"),
        "the password is hidden"
    );
    refused(
        &run("redis//localhost", &pair.db_url, &["health"]),
        "unknown cache URL scheme",
    );
    refused(
        &run(&pair.cache_url, "mysql://localhost/app", &["health"]),
        "unknown database URL scheme \"mysql\"",
    );
    refused(
        &run(&pair.cache_url, "sqlite://", &["health"]),
        "names no file",
    );
    let out = Command::new(BIN)
        .args(["health"])
        .env_remove("WT_CACHE_URL")
        .env_remove("WT_DB_URL")
        .output()
        .unwrap();
    refused(&out, "no cache URL: pass --cache or set WT_CACHE_URL");
    // The environment works as well as the flags.
    let out = Command::new(BIN)
        .args(["--namespace", NS, "inspect", "items", "1"])
        .env("WT_CACHE_URL", &pair.cache_url)
        .env("WT_DB_URL", &pair.db_url)
        .output()
        .unwrap();
    let (out, _) = status(&out, 0);
    assert!(out.contains("verdict   agree"), "{out}");
    engine.shutdown().await.unwrap();
}

/// Under a pseudo-terminal (util-linux `script`), warm draws a bar with
/// rows and rate; with stdout a pipe it prints plain lines on stderr.
#[tokio::test(flavor = "multi_thread")]
async fn progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise() {
    let pair = Pair::start(CacheKind::Redis, DbKind::Sqlite).await;
    let (engine, _h) = seed(&pair).await;
    let cmd = format!(
        "{BIN} --cache {} --db {} --namespace {NS} warm --table items --limit {ROWS}",
        pair.cache_url, pair.db_url
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("util-linux `script` is needed (apt-get install bsdutils): {e}")
        });
    let (screen, _) = status(&out, 0);
    assert!(
        screen.contains(&format!(
            "warm items [{}] {ROWS}/{ROWS} rows",
            "=".repeat(30)
        )),
        "no full bar in {screen:?}"
    );
    assert!(screen.contains("rows/s"), "{screen:?}");
    assert!(screen.contains("ETA"), "{screen:?}");

    // `audit --all` counts the rows first, so its bar has a total and an ETA.
    let cmd = format!(
        "{BIN} --cache {} --db {} --namespace {NS} audit --all --table items",
        pair.cache_url, pair.db_url
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (screen, _) = status(&out, 0);
    assert!(
        screen.contains(&format!(
            "audit items [{}] {ROWS}/{ROWS} rows",
            "=".repeat(30)
        )),
        "no full bar in {screen:?}"
    );
    assert!(screen.contains("ETA"), "{screen:?}");

    let (stdout, stderr) = status(&pair.cli(&["warm", "--table", "items"]), 0);
    assert!(
        !stdout.contains('\r') && !stdout.contains('\x1b'),
        "{stdout:?}"
    );
    assert!(!stdout.contains("=>"), "{stdout:?}");
    assert!(
        stderr.contains(&format!("warm items: {ROWS} rows")),
        "{stderr:?}"
    );
    engine.shutdown().await.unwrap();
}

/// Ctrl-C stops a rate-limited warm-up at once, with a partial report.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_a_long_run_with_a_partial_report() {
    let pair = Pair::start(CacheKind::Redis, DbKind::Sqlite).await;
    let (engine, _h) = seed(&pair).await;
    let child = Command::new(BIN)
        .args([
            "--cache",
            &pair.cache_url,
            "--db",
            &pair.db_url,
            "--namespace",
            NS,
        ])
        .args(["warm", "--table", "items", "--rate", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "stopped promptly"
    );
    let (stdout, _) = status(&out, 130);
    let read: u64 = stdout
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!((1..ROWS as u64).contains(&read), "{stdout}");
    assert!(stdout.contains("(interrupted)"), "{stdout}");
    engine.shutdown().await.unwrap();
}

/// SQLite keeps booleans as integers and JSON as text, so the schema it
/// describes cannot tell them apart: the audit says so (corrupt entries)
/// until `--type` names the columns' types, and then agrees.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_columns_of_booleans_and_json_are_typed_by_the_operator() {
    let pair = Pair::start(CacheKind::Redis, DbKind::Sqlite).await;
    let engine = pair.engine().await;
    let flags = Table::builder("flags")
        .key("id", ColumnType::Int)
        .column("on", ColumnType::Bool)
        .nullable("attrs", ColumnType::Json)
        .build()
        .unwrap();
    let h = engine
        .register_table(flags, TableOptions::new())
        .await
        .unwrap();
    for (id, on) in [(1, true), (2, false)] {
        let row = Row::new()
            .set("id", id)
            .set("on", on)
            .set("attrs", serde_json::json!({ "colour": "red", "n": id }));
        h.put(&row).await.unwrap();
    }
    engine.flush().await.unwrap();

    let (out, _) = status(
        &pair.cli(&["audit", "--table", "flags", "--settle-ms", "10"]),
        1,
    );
    assert_eq!(count(&out, "corrupt"), 2, "{out}");
    let typed = ["--type", "on=bool", "--type", "flags.attrs=json"];
    let (out, _) = status(
        &pair.cli(&[&typed[..], &["audit", "--table", "flags"]].concat()),
        0,
    );
    assert_eq!(count(&out, "matching"), 2, "{out}");
    let (out, _) = status(
        &pair.cli(&[&typed[..], &["inspect", "flags", "1"]].concat()),
        0,
    );
    assert!(out.contains("\"on\":true"), "{out}");
    assert!(out.contains("verdict   agree"), "{out}");
    refused(
        &pair.cli(&["--type", "flags.nope=bool", "audit", "--table", "flags"]),
        "table flags has no column nope",
    );
    refused(
        &pair.cli(&["--type", "on=date", "health"]),
        "--type \"on=date\"",
    );
    engine.shutdown().await.unwrap();
}

/// `--sample N` compares N distinct rows picked at random: two runs pick
/// different rows, the same `--seed` the same rows again. Every row is
/// made stale (its version bumped in the database behind the cache), so
/// the divergent keys of a report are the rows it sampled.
#[tokio::test(flavor = "multi_thread")]
async fn sample_picks_distinct_random_rows_reproducible_by_seed() {
    let pair = Pair::start(CacheKind::Redis, DbKind::Sqlite).await;
    let engine = pair.engine().await;
    let h = engine
        .register_table(items(), TableOptions::new())
        .await
        .unwrap();
    let rows: Vec<Row> = (1..=1000).map(|i| item(i, i as f64)).collect();
    h.put_many(&rows).await.unwrap();
    engine.flush().await.unwrap();
    pair.sql("UPDATE items SET _wt_version = _wt_version + 100000")
        .await;
    let sampled = |extra: &[&str]| {
        let args = [
            &["audit", "--json", "--sample", "20", "--show", "20"][..],
            &["--settle-ms", "0"],
            extra,
        ]
        .concat();
        let (out, _) = status(&pair.cli(&args), 1);
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        let t = doc["tables"][0].clone();
        assert_eq!(t["checked"], 20, "{doc:#}");
        let keys: std::collections::BTreeSet<i64> = t["divergences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["key"].as_i64().unwrap())
            .collect();
        assert_eq!(keys.len(), 20, "20 distinct rows: {doc:#}");
        (keys, t["sample_seed"].as_u64().expect("a seed"))
    };
    let (a, seed_a) = sampled(&[]);
    let (b, seed_b) = sampled(&[]);
    assert_ne!(seed_a, seed_b);
    assert_ne!(a, b, "two runs sample other rows");
    assert_ne!(a, (1..=20).collect(), "not the first rows in key order");
    let (again, seed) = sampled(&["--seed", &seed_a.to_string()]);
    assert_eq!((again, seed), (a, seed_a), "the same seed, the same rows");
    engine.shutdown().await.unwrap();
}
