//! Runs every per-pair example (and the quickstart) as a child process,
//! against a Redis, a Memcached and a PostgreSQL server the testkit starts
//! on free loopback ports, and checks what each prints.
//!
//! A missing server binary fails the test with the testkit's install hint;
//! nothing is skipped. The examples' binaries are the ones cargo builds for
//! `cargo test` of this package (examples are built before the tests run);
//! this test builds nothing itself.

mod common;

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use writethrough_testkit::server::{MemcachedServer, PostgresServer, RedisCluster, RedisServer};

/// Every variable the examples read; each run sets them all, so that the
/// environment the tests run in does not leak into the children.
const VARS: [&str; 4] = [
    "WT_REDIS_URL",
    "WT_MEMCACHED_URL",
    "WT_POSTGRES_URL",
    "WT_SQLITE_URL",
];

/// The files example `name` is built from besides its own `<name>.rs`.
fn shared_sources(name: &str) -> &'static [&'static str] {
    if name == "quickstart" {
        &["lib.rs"]
    } else {
        &["tour.rs", "lib.rs"]
    }
}

/// What one run of an example did.
struct Run {
    name: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name, self.status, self.stdout, self.stderr
        )
    }
}

impl Run {
    /// The stdout line starting with `prefix`.
    fn line(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}: {self}"))
    }

    /// Asserts that the stdout line starting with `prefix` contains `part`.
    fn expect(&self, prefix: &str, part: &str) {
        let line = self.line(prefix);
        assert!(
            line.contains(part),
            "{line:?} should contain {part:?}: {self}"
        );
    }
}

/// Runs example `name` with `env` set and the other variables the examples
/// read removed, and waits for it to exit.
fn run_example(name: &str, env: &[(&str, String)]) -> Run {
    let mut cmd = Command::new(common::example_binary(name, shared_sources(name)));
    for var in VARS {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start the {name} example: {e}"));
    // Read both pipes to their ends, so that the child never blocks on a full one.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    // A bound on waiting, not a timing assertion: a hung example must not hang the suite.
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the example") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the {name} example did not exit within 300 s; stdout so far:\n{}",
                out.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        name: name.to_owned(),
        status,
        stdout: out.join().expect("the stdout reader"),
        stderr: err.join().expect("the stderr reader"),
    }
}

/// Checks the tour's output: the URLs it used, then every step.
fn check_tour(run: &Run, title: &str, cache_line: &str, db_line: &str) {
    assert!(run.status.success(), "{run}");
    run.expect("writethrough catalogue tour: ", title);
    run.expect("  cache     ", cache_line);
    run.expect("  database  ", db_line);
    run.expect("create  product 1 ", "then cached");
    run.expect("read    product 1, first time: ", "hit");
    run.expect(
        "read    product 1, second time: ",
        "hit (Some((\"Fountain pen\", 12.5)))",
    );
    run.expect("read    product 2, never written: ", "miss");
    run.expect("update  product 1 ", "(Some(9.99))");
    run.expect(
        "read    product 1 after the update: ",
        "hit (price Some(9.99))",
    );
    run.expect("reject  product 7: ", "nothing written");
    run.expect("import  ", "1000 products");
    run.expect("read    product 600: ", "hit (Some(\"Notebook #600\"))");
    run.expect(
        "delete  product 100: ",
        "deleted = true; read afterwards: None",
    );
    run.expect("flush   ", "none left behind");
    let stats = run.line("stats   ");
    let number = |label: &str| -> u64 {
        stats
            .split(label)
            .nth(1)
            .and_then(|rest| rest.split([',', ' ']).find(|w| !w.is_empty()))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in {stats:?}"))
    };
    // Hits: product 1 three times, product 600; misses: product 2, and 100 after its delete.
    assert!(number("hits ") >= 4, "{run}");
    assert!(number("misses ") >= 2, "{run}");
    assert!(number("writes ") >= 1003, "{run}");
    assert!(run.stderr.trim().is_empty(), "nothing on stderr: {run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pair_runs_the_tour() {
    let redis = RedisServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
    let memcached = MemcachedServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start memcached: {e}"));
    let postgres = PostgresServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
    let cluster = RedisCluster::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start a Redis Cluster: {e}"));
    let env = vec![
        ("WT_REDIS_URL", redis.url()),
        ("WT_REDIS_CLUSTER_URL", cluster.url()),
        ("WT_MEMCACHED_URL", memcached.url()),
        ("WT_POSTGRES_URL", postgres.url()),
        ("WT_SQLITE_URL", "sqlite::temp:".to_owned()),
    ];
    let url = |var: &str| {
        let (_, url) = env.iter().find(|(k, _)| *k == var).expect("a variable");
        format!("{url} (from {var})")
    };
    let pairs = [
        (
            "redis_postgres",
            "Redis + PostgreSQL",
            url("WT_REDIS_URL"),
            url("WT_POSTGRES_URL"),
        ),
        (
            "redis_cluster_postgres",
            "Redis Cluster + PostgreSQL",
            url("WT_REDIS_CLUSTER_URL"),
            url("WT_POSTGRES_URL"),
        ),
        (
            "redis_sqlite",
            "Redis + SQLite",
            url("WT_REDIS_URL"),
            url("WT_SQLITE_URL"),
        ),
        (
            "memcached_postgres",
            "Memcached + PostgreSQL",
            url("WT_MEMCACHED_URL"),
            url("WT_POSTGRES_URL"),
        ),
        (
            "memcached_sqlite",
            "Memcached + SQLite",
            url("WT_MEMCACHED_URL"),
            url("WT_SQLITE_URL"),
        ),
        (
            "moka_postgres",
            "Moka + PostgreSQL",
            "moka:// (always)".to_owned(),
            url("WT_POSTGRES_URL"),
        ),
    ];
    for (name, title, cache_line, db_line) in pairs {
        let env = env.clone();
        let run = tokio::task::spawn_blocking(move || run_example(name, &env))
            .await
            .expect("the run");
        check_tour(&run, title, &cache_line, &db_line);
    }

    // The quickstart needs no server, and must keep working as it did.
    let run = tokio::task::spawn_blocking(|| run_example("quickstart", &[]))
        .await
        .expect("the run");
    assert!(run.status.success(), "{run}");
    run.expect(
        "writethrough quickstart: ",
        "Moka (in-process cache) + SQLite",
    );
    run.expect("create  product 1 ", "then cached");
    assert!(
        run.stdout
            .contains("read    product 1: miss, loaded from SQLite (price Some(12.5))\nread    product 1: hit (price Some(12.5))"),
        "after the restart, a miss then a hit: {run}"
    );
    run.expect("reject  product 7: ", "nothing written");
    run.expect(
        "delete  product 100: ",
        "deleted = true; read afterwards: None",
    );
    run.expect("stats   ", "hit ratio");

    // Each run flushed its outbox records: none is left
    // behind for a table no engine will register again.
    let left = postgres
        .simple_query("SELECT count(*) FROM _wt_outbox")
        .await
        .unwrap_or_else(|e| panic!("read the outbox: {e}"));
    assert_eq!(
        left,
        vec![vec![Some("0".to_owned())]],
        "outbox records left behind"
    );
}

/// A loopback port nothing listens on (one the OS just handed out and took back).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("its address").port()
}

/// Asserts that `run` failed cleanly: exit status 1, no panic, and stderr
/// naming every one of `parts`.
fn check_refused(run: &Run, parts: &[&str]) {
    assert_eq!(run.status.code(), Some(1), "{run}");
    assert!(
        !run.stderr.contains("panicked") && !run.stderr.contains("RUST_BACKTRACE"),
        "a message, not a panic: {run}"
    );
    assert!(run.stderr.starts_with("error: "), "{run}");
    for part in parts {
        assert!(
            run.stderr.contains(part),
            "stderr should name {part:?}: {run}"
        );
    }
}

#[test]
fn an_unreachable_server_is_named_with_its_variable() {
    let port = closed_port();
    let redis = format!("redis://127.0.0.1:{port}");
    let postgres = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let memcached = format!("memcached://127.0.0.1:{port}");

    // Both backends down: both are reported, each with its URL and variable.
    let run = run_example(
        "redis_postgres",
        &[
            ("WT_REDIS_URL", redis.clone()),
            ("WT_POSTGRES_URL", postgres.clone()),
        ],
    );
    check_refused(
        &run,
        &["WT_REDIS_URL", &redis, "WT_POSTGRES_URL", &postgres],
    );

    // Memcached down, SQLite fine.
    let run = run_example(
        "memcached_sqlite",
        &[
            ("WT_MEMCACHED_URL", memcached.clone()),
            ("WT_SQLITE_URL", "sqlite::temp:".into()),
        ],
    );
    check_refused(&run, &["WT_MEMCACHED_URL", &memcached]);
    assert!(!run.stderr.contains("WT_SQLITE_URL"), "{run}");

    // A URL of another backend is refused before connecting.
    let run = run_example("redis_sqlite", &[("WT_REDIS_URL", memcached.clone())]);
    check_refused(&run, &["WT_REDIS_URL", &memcached, "not a Redis URL"]);
}
