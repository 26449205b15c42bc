//! The conformance matrix: the engine suite over every cache × database
//! pair, with a summary table. `cargo test --test matrix -- <filter>` runs
//! the cases (or pairs) whose name contains the filter.

use std::process::ExitCode;
use std::time::Duration;

use writethrough_testkit::suite::{self, CaseReport, Outcome, Pair};

fn main() -> ExitCode {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let ok = rt.block_on(run(filter.as_deref()));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run(filter: Option<&str>) -> bool {
    let servers = writethrough_tests::Servers::start().await;
    let pairs: Vec<Pair> = servers.pairs().await;
    let mut cases = suite::engine::cases();
    cases.extend(suite::races::cases());
    let mut summary = Vec::new();
    let runs: Vec<_> = pairs
        .into_iter()
        .map(|pair| {
            let cases = cases.clone();
            let filter = filter.map(str::to_owned);
            tokio::spawn(async move {
                let reports =
                    suite::run_cases(&pair, &cases, filter.as_deref(), Duration::from_secs(120))
                        .await;
                (pair.name.clone(), reports)
            })
        })
        .collect();
    for run in runs {
        let (pair, reports) = run.await.expect("a pair's run does not panic");
        print_pair(&pair, &reports);
        summary.push((pair, reports));
    }
    print_summary(&summary)
}

fn print_pair(pair: &str, reports: &[CaseReport]) {
    println!("\nengine and race suites on {pair}");
    for r in reports {
        let ms = r.elapsed.as_millis();
        match &r.result {
            Ok(Outcome::Passed) => println!("  ok    {:<72} {ms:>6} ms", r.name),
            Ok(Outcome::NotApplicable(why)) => println!("  n/a   {:<72} ({why})", r.name),
            Err(msg) => println!(
                "  FAIL  {:<72} {ms:>6} ms\n        {}",
                r.name,
                msg.replace('\n', "\n        ")
            ),
        }
    }
}

fn print_summary(summary: &[(String, Vec<CaseReport>)]) -> bool {
    println!(
        "\n{:<22} {:>7} {:>5} {:>7}  result",
        "pair", "passed", "n/a", "failed"
    );
    let mut all_ok = true;
    for (pair, reports) in summary {
        let passed = reports
            .iter()
            .filter(|r| matches!(r.result, Ok(Outcome::Passed)))
            .count();
        let na = reports
            .iter()
            .filter(|r| matches!(r.result, Ok(Outcome::NotApplicable(_))))
            .count();
        let failed = reports.iter().filter(|r| r.result.is_err()).count();
        all_ok &= failed == 0;
        println!(
            "{pair:<22} {passed:>7} {na:>5} {failed:>7}  {}",
            if failed == 0 { "ok" } else { "FAILED" }
        );
    }
    let ran: usize = summary.iter().map(|(_, r)| r.len()).sum();
    if ran == 0 {
        println!("no case matched the filter");
        return false;
    }
    all_ok
}
