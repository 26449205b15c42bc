//! `writethrough audit`: the engine's audit over tables read from the database.

use std::time::Duration;

use serde_json::json;
use writethrough::{AuditReport, DivergenceKind, ErrorKind, ExtraScan};

use crate::args::AuditArgs;
use crate::connect::{Target, key_json};
use crate::progress::{Interrupt, Progress};
use crate::{Fatal, Outcome};

const KINDS: [DivergenceKind; 4] = [
    DivergenceKind::Stale,
    DivergenceKind::Differs,
    DivergenceKind::Corrupt,
    DivergenceKind::Extra,
];

pub(crate) async fn run(
    target: &Target,
    args: &AuditArgs,
    interrupt: &Interrupt,
) -> Result<Outcome, Fatal> {
    let session = target.open().await?;
    let tables = session.tables(args.table.as_deref()).await?;
    if tables.is_empty() {
        return Err(Fatal::new(
            "the database has no table with a _wt_version column: nothing to audit",
        ));
    }
    let limit = if args.all { usize::MAX } else { args.sample };
    let seed = args.seed.unwrap_or_else(new_seed);
    let settle = Duration::from_millis(args.settle_ms);
    let mut reports = Vec::new();
    let mut interrupted = false;
    for handle in &tables {
        let name = handle.table().name().as_str().to_owned();
        // The progress bar's total, for its ETA: an exact count(*).
        let rows = match interrupt.or(handle.row_count()).await {
            Some(Ok(n)) => Some(n),
            Some(Err(e)) if e.kind() == ErrorKind::Unsupported => None,
            Some(Err(e)) => return Err(e.into()),
            None => {
                interrupted = true;
                break;
            }
        };
        let mut run = handle.audit_run(limit, settle, args.repair);
        // A sample as large as the table is the table, walked in key
        // order without ranking every row.
        if !args.all && rows.is_none_or(|n| n > limit as u64) {
            run = run.sampled(seed);
        }
        let total = rows.map(|n| n.min(limit as u64));
        let mut progress = Progress::new(format!("audit {name}"), total);
        let mut scanning = false;
        while let Some(n) = interrupt.or(run.step()).await {
            let n = n?;
            if run.scanning() && !scanning {
                // The rows are done; the cache keys follow, their number unknown.
                scanning = true;
                progress.finish();
                progress = Progress::new(format!("audit {name} cache keys"), None);
            }
            match n {
                0 => break,
                n => progress.add(n),
            }
        }
        interrupted = interrupt.pressed();
        progress.finish();
        // Confirming (and repairing) what was found so far is short: the
        // settle delay and one look per suspect. Even after Ctrl-C.
        let report = run.finish().await?;
        reports.push((name, report));
        if interrupted {
            break;
        }
    }
    let divergent: usize = reports.iter().map(|(_, r)| r.divergent.len()).sum();
    if args.json {
        let tables: Vec<_> = reports
            .iter()
            .map(|(n, r)| report_json(n, r, args))
            .collect();
        let doc = json!({
            "cache": session.target_cache,
            "db": session.target_db,
            "namespace": session.engine.config().namespace,
            "interrupted": interrupted,
            "divergent": divergent,
            "tables": tables,
        });
        println!("{doc:#}");
    } else {
        for (name, r) in &reports {
            print_report(name, r, args);
        }
        if interrupted {
            println!("interrupted: the report covers only the rows compared before Ctrl-C");
        }
        match (divergent, args.repair) {
            (0, _) => println!("no divergence"),
            (n, false) => println!("{n} divergent; run again with --repair to rewrite them"),
            (n, true) => println!("{n} divergent, repaired from the database"),
        }
    }
    session.engine.shutdown().await?;
    Ok(if interrupted {
        Outcome::Interrupted
    } else if divergent > 0 {
        Outcome::Divergent
    } else {
        Outcome::Clean
    })
}

/// A seed for the sample when none was given: new in every run.
fn new_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn print_report(name: &str, r: &AuditReport, args: &AuditArgs) {
    println!("table {name}");
    match r.sample_seed {
        Some(seed) => println!("  rows      a random sample (seed {seed})"),
        None => println!("  rows      in key order"),
    }
    println!("  checked   {:>8}", r.checked);
    println!("  matching  {:>8}", r.agree);
    println!("  missing   {:>8}  (no entry: allowed)", r.absent);
    for kind in KINDS {
        println!("  {:<9} {:>8}", kind.as_str(), r.count(kind));
    }
    println!("  cache keys {}", r.extra_scan.describe());
    if args.repair {
        println!("  repaired  {:>8}", r.repaired);
    }
    for d in r.divergences.iter().take(args.show) {
        let v = |v: Option<u64>| v.map_or_else(|| "none".to_owned(), |v| format!("v{v}"));
        println!(
            "  divergent key {}: {} (cache {}, database {})",
            d.key,
            d.kind.as_str(),
            v(d.cached_version),
            v(d.db_version)
        );
    }
    if r.divergences.len() > args.show {
        println!("  ... and {} more", r.divergences.len() - args.show);
    }
}

fn report_json(name: &str, r: &AuditReport, args: &AuditArgs) -> serde_json::Value {
    let mut doc = json!({
        "table": name,
        "checked": r.checked,
        "matching": r.agree,
        "missing": r.absent,
        "repaired": r.repaired,
        "sample_seed": r.sample_seed,
        "extra_scan": extra_scan_json(&r.extra_scan),
        "divergences": r.divergences.iter().take(args.show).map(|d| json!({
            "key": key_json(&d.key),
            "kind": d.kind,
            "cached_version": d.cached_version,
            "db_version": d.db_version,
        })).collect::<Vec<_>>(),
    });
    for kind in KINDS {
        doc[kind.as_str()] = r.count(kind).into();
    }
    doc
}

fn extra_scan_json(e: &ExtraScan) -> serde_json::Value {
    match e {
        ExtraScan::Done {
            keys,
            foreign,
            complete,
        } => json!({ "status": "done", "keys": keys, "foreign": foreign, "complete": complete }),
        ExtraScan::Skipped(why) => json!({ "status": "skipped", "reason": why }),
        _ => json!({ "status": "not_run" }),
    }
}
