//! `writethrough health`: both backends pinged, what they can do, and what
//! an engine with the default settings would do when they misbehave.

use std::time::{Duration, Instant};

use writethrough::Config;
use writethrough::backend::KeyRule;

use crate::args::HealthArgs;
use crate::connect::{Target, human};
use crate::{Fatal, Outcome};

/// The fastest and slowest of `n` pings.
async fn pings<F, Fut>(n: u32, mut ping: F) -> writethrough::Result<(Duration, Duration)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = writethrough::Result<()>>,
{
    let (mut min, mut max) = (Duration::MAX, Duration::ZERO);
    for _ in 0..n {
        let t = Instant::now();
        ping().await?;
        let d = t.elapsed();
        min = min.min(d);
        max = max.max(d);
    }
    Ok((min, max))
}

fn bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

pub(crate) async fn run(target: &Target, args: &HealthArgs) -> Result<Outcome, Fatal> {
    let session = target.open().await?;
    let engine = &session.engine;
    let cache = engine.raw_cache().clone();
    let db = engine.raw_db().clone();
    let (cmin, cmax) = pings(args.pings, || cache.ping()).await?;
    let (dmin, dmax) = pings(args.pings, || db.ping()).await?;
    let caps = cache.capabilities();
    let identity = cache.identity().await.ok().flatten();
    println!("cache     {} at {}", cache.name(), session.target_cache);
    println!(
        "  ping      {} fastest, {} slowest of {}",
        human(cmin),
        human(cmax),
        args.pings
    );
    if let Some(id) = identity {
        println!("  identity  {id}");
    }
    println!(
        "  can       atomic fencing {}, {}, TTL step {}, TTL at most {}",
        if caps.atomic_fencing { "yes" } else { "no" },
        if caps.in_process {
            "in process"
        } else {
            "over the network"
        },
        human(caps.ttl_granularity),
        human(caps.max_ttl)
    );
    println!(
        "  holds     keys of at most {} bytes{}, entries of at most {}",
        caps.max_key_len,
        if caps.key_rule == KeyRule::NoSpaceOrControl {
            " without whitespace or control characters"
        } else {
            ""
        },
        bytes(caps.max_value_len)
    );
    println!("database  {} at {}", db.name(), session.target_db);
    println!(
        "  ping      {} fastest, {} slowest of {}",
        human(dmin),
        human(dmax),
        args.pings
    );
    println!(
        "  holds     text with NUL bytes: {}",
        if db.capabilities().text_allows_nul {
            "yes"
        } else {
            "no"
        }
    );
    match db.managed_tables().await {
        Ok(t) if t.is_empty() => println!("  tables    none with a version column yet"),
        Ok(t) => println!("  tables    {}", t.join(", ")),
        Err(e) => println!("  tables    cannot list them: {e}"),
    }
    let cfg = engine.config();
    let epoch = match engine.check_cache_epoch().await {
        Ok(e) => e.to_string(),
        Err(e) => format!("unknown ({e})"),
    };
    println!("engine    namespace {}, cache epoch {epoch}", cfg.namespace);
    println!(
        "  timeouts  cache calls {}, database calls {}, loads {}, cache writes {}",
        human(cfg.cache_timeout),
        human(cfg.db_timeout),
        human(cfg.load_deadline),
        human(cfg.effective_write_deadline())
    );
    println!(
        "  breaker   opens after {} cache failures in a row, stays open {} then probes",
        cfg.breaker.failure_threshold,
        human(cfg.breaker.open_for)
    );
    println!(
        "  retries   {} attempts per cache write, backoff {} to {}",
        cfg.retry.attempts,
        human(cfg.retry.base_delay),
        human(cfg.retry.max_delay)
    );
    println!(
        "  outbox    replayed after {}, by a reconciler every {}",
        human(cfg.outbox_grace),
        Config::default()
            .reconcile_interval
            .map_or_else(|| "never".to_owned(), human)
    );
    println!(
        "  TTLs      entries {}, tombstones {}",
        cfg.default_ttl
            .map_or_else(|| "never expire".to_owned(), human),
        human(cfg.tombstone_ttl)
    );
    println!("(settings: the engine's defaults; an application may configure its own)");
    session.engine.shutdown().await?;
    Ok(Outcome::Clean)
}
