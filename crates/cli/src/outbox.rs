//! `writethrough outbox`: what waits for its cache effect, and replaying it.

use writethrough::backend::OutboxSummary;

use crate::args::OutboxArgs;
use crate::connect::{Target, human};
use crate::{Fatal, Outcome};

pub(crate) async fn run(target: &Target, args: &OutboxArgs) -> Result<Outcome, Fatal> {
    let session = target.open().await?;
    let db = session.engine.raw_db().clone();
    let pending = db.outbox_summary().await?;
    print_summary(&pending);
    if args.replay && !pending.is_empty() {
        // The engine replays only the tables it knows: register each one
        // the records name; a table gone from the database is reported.
        for s in &pending {
            if let Err(e) = session.table(&s.table).await {
                println!("  {}: not replayed ({})", s.table, e.0);
            }
        }
        let report = session.engine.reconcile_all().await?;
        println!("replayed {} records", report.replayed);
        print_summary(&db.outbox_summary().await?);
    }
    session.engine.shutdown().await?;
    Ok(Outcome::Clean)
}

fn print_summary(pending: &[OutboxSummary]) {
    if pending.is_empty() {
        println!("outbox: nothing pending");
        return;
    }
    let total: u64 = pending.iter().map(|s| s.pending).sum();
    println!("outbox: {total} pending");
    for s in pending {
        println!(
            "  {:<24} {:>8} pending, oldest {} old",
            s.table,
            s.pending,
            human(s.oldest_age)
        );
    }
}
