//! `writethrough warm`: preload a table, at a bounded rate.

use std::time::{Duration, Instant};

use crate::args::WarmArgs;
use crate::connect::Target;
use crate::progress::{Interrupt, Progress};
use crate::{Fatal, Outcome};

pub(crate) async fn run(
    target: &Target,
    args: &WarmArgs,
    interrupt: &Interrupt,
) -> Result<Outcome, Fatal> {
    if args.rate == Some(0) {
        return Err(Fatal::new("--rate 0 would never load a row"));
    }
    let session = target.open().await?;
    let handle = session.table(&args.table).await?;
    let limit = args.limit.unwrap_or(usize::MAX);
    // Pages of a tenth of a second's rows, so the rate holds within a
    // second instead of in bursts of whole 500-row pages.
    let page = args.rate.map_or(500, |r| (r as usize / 10).clamp(1, 500));
    let mut progress = Progress::new(format!("warm {}", args.table), args.limit.map(|n| n as u64));
    let mut run = handle.warm_run(limit).page_size(page);
    let started = Instant::now();
    while let Some(n) = interrupt.or(run.step()).await {
        let n = n?;
        if n == 0 {
            break;
        }
        progress.add(n);
        if let Some(rate) = args.rate {
            let due = Duration::from_secs_f64(run.scanned() as f64 / f64::from(rate));
            let pause = tokio::time::sleep(due.saturating_sub(started.elapsed()));
            if interrupt.or(pause).await.is_none() {
                break;
            }
        }
    }
    let interrupted = interrupt.pressed();
    progress.finish();
    println!(
        "warm {}: {} rows read, {} written to the cache in {:.1} s{}",
        args.table,
        run.scanned(),
        run.warmed(),
        started.elapsed().as_secs_f64(),
        if interrupted { " (interrupted)" } else { "" }
    );
    session.engine.shutdown().await?;
    Ok(if interrupted {
        Outcome::Interrupted
    } else {
        Outcome::Clean
    })
}
