//! The fault suite on every pair, each case on servers of its own, with a
//! summary of the faults survived and the operations lost per pair.
//! `cargo test --test faults -- <term>...` runs the cases whose pair or
//! name contains every term; `-- --list` lists them (see `suite::Filter`).

use std::process::ExitCode;

use writethrough_testkit::suite::faults;
use writethrough_testkit::suite::{Filter, Outcome};

fn main() -> ExitCode {
    let filter = Filter::from_args();
    if filter.list {
        for (pair, _) in writethrough_tests::rigs::all() {
            for c in faults::cases() {
                if filter.matches("fault suite", &pair, c.name) {
                    println!("fault suite on {pair}: {}", c.name);
                }
            }
        }
        return ExitCode::SUCCESS;
    }
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

async fn run(filter: Filter) -> bool {
    let pairs = writethrough_tests::rigs::all();
    let tasks: Vec<_> = pairs
        .into_iter()
        .filter(|(name, _)| {
            faults::cases()
                .iter()
                .any(|c| filter.matches("fault suite", name, c.name))
        })
        .map(|(name, factory)| {
            let filter = filter.clone();
            tokio::spawn(async move {
                let reports = faults::run_all(&name, factory, &filter).await;
                (name, reports)
            })
        })
        .collect();
    let mut all_ok = true;
    let mut rows = Vec::new();
    for t in tasks {
        let (pair, reports) = t.await.expect("a pair's run does not panic");
        println!("\nfault suite on {pair}");
        let (mut survived, mut na, mut failed_cases, mut ops, mut lost, mut failed_ops) =
            (0, 0, 0, 0, 0, 0);
        for (name, r) in &reports {
            match r {
                Ok(rep) => match &rep.outcome {
                    Outcome::Passed => {
                        survived += 1;
                        ops += rep.ops;
                        lost += rep.lost;
                        failed_ops += rep.failed;
                        println!(
                            "  ok    {name:<52} {:>6} ops, {:>4} failed (typed), {} lost, slowest {:.0?}",
                            rep.ops, rep.failed, rep.lost, rep.slowest
                        );
                    }
                    Outcome::NotApplicable(why) => {
                        na += 1;
                        println!("  n/a   {name:<52} ({why})");
                    }
                },
                Err(msg) => {
                    failed_cases += 1;
                    println!(
                        "  FAIL  {name:<52}\n        {}",
                        msg.replace('\n', "\n        ")
                    );
                }
            }
        }
        all_ok &= failed_cases == 0;
        rows.push((pair, survived, na, failed_cases, ops, failed_ops, lost));
    }
    println!(
        "\n{:<20} {:>9} {:>5} {:>7} {:>8} {:>11} {:>9}",
        "pair", "survived", "n/a", "failed", "ops", "failed ops", "ops lost"
    );
    for (pair, survived, na, failed, ops, failed_ops, lost) in &rows {
        println!(
            "{pair:<20} {survived:>9} {na:>5} {failed:>7} {ops:>8} {failed_ops:>11} {lost:>9}"
        );
    }
    if rows.is_empty() {
        println!("no case matched the filter");
        return false;
    }
    all_ok
}
