//! The conformance matrix: the engine and race suites over every cache ×
//! database pair, with a summary table. The cache and database suites run
//! in each adapter's own tests (`cargo test -p writethrough-redis`).
//! `cargo test --test matrix -- <term>...` runs the cases whose run, pair
//! or name contains every term (`-- redis+postgres put_many`); `-- --list`
//! lists them (see `suite::Filter`).

use std::process::ExitCode;
use std::time::Duration;

use writethrough_testkit::suite::{self, Case, CaseReport, Filter, Outcome, Pair};

fn main() -> ExitCode {
    let filter = Filter::from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let ok = rt.block_on(run(filter));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One line of the matrix: a suite run on a pair (or a single store).
struct Run {
    label: String,
    pair: Pair,
    cases: Vec<Case>,
}

async fn run(filter: Filter) -> bool {
    let servers = writethrough_tests::Servers::start().await;
    let pairs: Vec<Pair> = servers.pairs().await;
    let mut runs = Vec::new();
    for pair in pairs {
        let mut cases = suite::engine::cases();
        cases.extend(suite::races::cases());
        runs.push(Run {
            label: format!("engine: {}", pair.name),
            pair,
            cases,
        });
    }
    if filter.list {
        for r in &runs {
            for c in &r.cases {
                if filter.matches(&r.label, &r.pair.name, c.name) {
                    println!("{}: {}", r.label, c.name);
                }
            }
        }
        return true;
    }
    // A few suites at a time: two cores cannot run eleven at once without
    // starving them into timeouts.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
    let tasks: Vec<_> = runs
        .into_iter()
        .map(|r| {
            let filter = filter.clone();
            let slots = slots.clone();
            tokio::spawn(async move {
                let _slot = slots.acquire_owned().await.expect("open");
                let reports = suite::run_cases(
                    &r.label,
                    &r.pair,
                    &r.cases,
                    &filter,
                    Duration::from_secs(180),
                )
                .await;
                (r.label, reports)
            })
        })
        .collect();
    let mut summary = Vec::new();
    for t in tasks {
        let (label, reports) = t.await.expect("a run does not panic");
        print_run(&label, &reports);
        summary.push((label, reports));
    }
    print_summary(&summary)
}

fn print_run(label: &str, reports: &[CaseReport]) {
    if reports.is_empty() {
        return;
    }
    println!("\n{label}");
    for r in reports {
        let ms = r.elapsed.as_millis();
        match &r.result {
            Ok(Outcome::Passed) => println!("  ok    {:<74} {ms:>6} ms", r.name),
            Ok(Outcome::NotApplicable(why)) => println!("  n/a   {:<74} ({why})", r.name),
            Err(msg) => println!(
                "  FAIL  {:<74} {ms:>6} ms\n        {}",
                r.name,
                msg.replace('\n', "\n        ")
            ),
        }
    }
}

fn print_summary(summary: &[(String, Vec<CaseReport>)]) -> bool {
    println!(
        "\n{:<32} {:>7} {:>5} {:>7}  result",
        "suite", "passed", "n/a", "failed"
    );
    let mut all_ok = true;
    let mut ran = 0;
    let mut not_applicable = Vec::new();
    for (label, reports) in summary {
        if reports.is_empty() {
            continue;
        }
        ran += reports.len();
        let passed = reports
            .iter()
            .filter(|r| matches!(r.result, Ok(Outcome::Passed)))
            .count();
        let failed = reports.iter().filter(|r| r.result.is_err()).count();
        for r in reports {
            if let Ok(Outcome::NotApplicable(why)) = &r.result {
                not_applicable.push(format!("{label}: {} ({why})", r.name));
            }
        }
        let na = reports.len() - passed - failed;
        all_ok &= failed == 0;
        println!(
            "{label:<32} {passed:>7} {na:>5} {failed:>7}  {}",
            if failed == 0 { "ok" } else { "FAILED" }
        );
    }
    if !not_applicable.is_empty() {
        println!("\nnot applicable by capability:");
        for n in &not_applicable {
            println!("  {n}");
        }
    }
    if ran == 0 {
        println!("no case matched the filter");
        return false;
    }
    all_ok
}
