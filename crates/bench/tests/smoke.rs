//! Smoke tests of the benchmark binary: it exits 0 and prints a row for
//! every scenario, embedded and against real servers. Tiny durations, no
//! timing assertions: the figures of a test run mean nothing.

use std::process::Command;

use writethrough_testkit::server::{MemcachedServer, PostgresServer, RedisServer};

/// The first column of each scenario's row.
const SCENARIOS: [&str; 12] = [
    "read_hit",
    "read_hit_shared",
    "read_miss",
    "write",
    "write_fenced",
    "write_unfenced",
    "update",
    "delete",
    "batch100",
    "batch100_unfenced",
    "stampede_1000",
    "warm",
];

const TINY: [&str; 8] = [
    "--duration-ms",
    "30",
    "--rounds",
    "1",
    "--sizes",
    "256",
    "--concurrency",
    "1",
];

fn run(args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_writethrough-bench"))
        .args(TINY)
        .args(args)
        .output()
        .expect("the benchmark binary starts");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the benchmark exited with {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The text from the `### {title}` heading to the next heading.
fn section<'a>(out: &'a str, title: &str) -> &'a str {
    let heading = format!("### {title}\n");
    let start = out
        .find(&heading)
        .unwrap_or_else(|| panic!("no {heading:?} in the output:\n{out}"))
        + heading.len();
    let end = out[start..].find("\n### ").map_or(out.len(), |i| start + i);
    &out[start..end]
}

fn assert_every_scenario(table: &str, pair: &str) {
    for s in SCENARIOS {
        let row = format!("| {s} | 256 B | ");
        assert!(
            table.lines().any(|l| l.starts_with(&row)),
            "no {s} row for {pair}:\n{table}"
        );
    }
}

#[test]
fn embedded_prints_every_scenario() {
    let out = run(&["--embedded".to_owned()]);
    let table = section(&out, "moka+sqlite");
    assert_every_scenario(table, "moka+sqlite");
    assert!(
        table.contains("database loads: ours 1,"),
        "the stampede loads once:\n{table}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pairs_against_servers_print_every_scenario() {
    let redis = RedisServer::start().await.expect("redis-server starts");
    let memcached = MemcachedServer::start().await.expect("memcached starts");
    let postgres = PostgresServer::start().await.expect("postgres starts");
    let args = vec![
        "--pairs".to_owned(),
        "redis+postgres,memcached+sqlite".to_owned(),
        "--redis".to_owned(),
        redis.url(),
        "--memcached".to_owned(),
        memcached.url(),
        "--postgres".to_owned(),
        postgres.url(),
    ];
    let out = tokio::task::spawn_blocking(move || run(&args))
        .await
        .expect("the run does not panic");
    for pair in ["redis+postgres", "memcached+sqlite"] {
        assert_every_scenario(section(&out, pair), pair);
    }
    let summary = section(&out, "read hit per cache backend");
    for cache in ["redis", "memcached"] {
        assert!(
            summary.contains(&format!("| {cache} | 256 B | 1 | ")),
            "no {cache} row in the summary:\n{summary}"
        );
    }
    let h2h = section(&out, "read_hit_redis_vs_memcached");
    assert!(
        h2h.lines().any(|l| l.starts_with("| 256 B | 1 | ")),
        "no head-to-head row:\n{h2h}"
    );
}

/// With many keys the read hit's note gives memory per entry; `--count`
/// runs exactly that many operations of one side and prints no table.
#[test]
fn keys_report_memory_and_count_runs_one_side() {
    let out = run(&[
        "--embedded".to_owned(),
        "--keys".to_owned(),
        "10000".to_owned(),
        "--scenarios".to_owned(),
        "read_hit".to_owned(),
    ]);
    let table = section(&out, "moka+sqlite");
    assert!(
        table.contains("10000 keys, cache bytes per entry: ours "),
        "no memory note:\n{table}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_writethrough-bench"))
        .args(["--embedded", "--scenarios", "read_hit", "--sizes", "256"])
        .args(["--count", "500", "--side", "raw"])
        .output()
        .expect("the benchmark binary starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ran 500 operations of read_hit (raw)"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("### "));
    let bad = Command::new(env!("CARGO_BIN_EXE_writethrough-bench"))
        .args(["--side", "both"])
        .output()
        .expect("the benchmark binary starts");
    assert_eq!(bad.status.code(), Some(2));
}
