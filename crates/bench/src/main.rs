//! writethrough-bench: every path of the engine against the raw driver calls
//! doing the same work, alternating in one run.
//!
//! ```text
//! cargo run --release -p writethrough-bench -- --embedded
//! cargo run --release -p writethrough-bench -- --cache redis://127.0.0.1:6379 --db postgres://postgres@127.0.0.1/test
//! cargo run --release -p writethrough-bench -- --pairs all \
//!     --redis redis://127.0.0.1:6379 --memcached memcached://127.0.0.1:11211 \
//!     --postgres postgres://postgres@127.0.0.1/test
//! ```
//!
//! Options: `--duration-ms N` per phase (default 1000), `--rounds N`
//! (default 3; ours and raw alternate, swapping who goes first), `--keys N`
//! (default 1000; with 10,000 or more, the read hit's note gives the cache
//! memory per entry, ours and raw), `--count N --side ours|raw` (exactly N
//! operations of the first scenario on one side, one at a time, no report:
//! `scripts/callgrind.sh` counts instructions per operation with it),
//! `--sizes 256,16384`, `--concurrency 1,16`, `--scenarios read_hit,write,...`,
//! `--markdown FILE` to also write the tables as Markdown.
//!
//! `--pairs moka+sqlite,redis+postgres,...` (or `all`) runs several pairs
//! one after the other in one process, taking their URLs from `--redis`,
//! `--memcached`, `--postgres` and `--sqlite` (default `sqlite::temp:`;
//! `--cache` and `--db` fill the slot of their scheme too). It prints one
//! table per pair, then the read hit per cache backend, and, when Redis and
//! Memcached both ran, `read_hit_redis_vs_memcached`: ours and raw on both,
//! the four alternating in one run.

mod raw;
mod scenarios;

use std::time::Duration;

use writethrough::Result;

use crate::scenarios::Pair;

/// Parsed command line.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    /// Cache URL (`moka://` for the embedded pair).
    pub(crate) cache: String,
    /// Database URL (`sqlite::temp:` for the embedded pair).
    pub(crate) db: String,
    /// Pairs to run (`cache+db` names); empty: the one of `cache` and `db`.
    pub(crate) pairs: Vec<String>,
    /// The Redis URL for `--pairs`.
    pub(crate) redis: Option<String>,
    pub(crate) redis_cluster: Option<String>,
    /// The Memcached URL for `--pairs`.
    pub(crate) memcached: Option<String>,
    /// The PostgreSQL URL for `--pairs`.
    pub(crate) postgres: Option<String>,
    /// The SQLite URL for `--pairs`.
    pub(crate) sqlite: String,
    /// Length of one measured phase.
    pub(crate) duration: Duration,
    /// Rounds of (ours, raw) phases.
    pub(crate) rounds: usize,
    /// Keys each scenario cycles through (seeded before the runs).
    pub(crate) keys: u64,
    /// `--count N --side ours|raw`: run exactly N operations of the first
    /// scenario on one side, one at a time, and no report (for callgrind).
    pub(crate) count: Option<(u64, bool)>,
    /// Value sizes in bytes.
    pub(crate) sizes: Vec<usize>,
    /// Concurrency levels.
    pub(crate) concurrency: Vec<usize>,
    /// Scenarios to run (empty: all).
    pub(crate) scenarios: Vec<String>,
    /// Where to write the Markdown tables.
    pub(crate) markdown: Option<String>,
}

const USAGE: &str = "usage: writethrough-bench [--embedded | --cache URL --db URL \
     | --pairs moka+sqlite,redis+postgres,...|all [--redis URL] [--redis-cluster URL] [--memcached URL] \
     [--postgres URL] [--sqlite URL]] [--duration-ms N] [--rounds N] [--keys N] [--count N --side ours|raw] [--sizes a,b] \
     [--concurrency a,b] [--scenarios x,y] [--markdown FILE]";

fn parse() -> std::result::Result<Args, String> {
    let mut a = Args {
        cache: "moka://".into(),
        db: "sqlite::temp:".into(),
        pairs: Vec::new(),
        redis: None,
        redis_cluster: None,
        memcached: None,
        postgres: None,
        sqlite: "sqlite::temp:".into(),
        duration: Duration::from_millis(1000),
        rounds: 3,
        keys: 1000,
        count: None,
        sizes: vec![256, 16 * 1024],
        concurrency: vec![1, 16],
        scenarios: Vec::new(),
        markdown: None,
    };
    let mut it = std::env::args().skip(1);
    let list = |v: String| -> std::result::Result<Vec<usize>, String> {
        v.split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .map_err(|_| format!("{x:?} is not a number"))
            })
            .collect()
    };
    let mut cache_set = false;
    let mut db_set = false;
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--embedded" => {
                a.cache = "moka://".into();
                a.db = "sqlite::temp:".into();
            }
            "--cache" => {
                a.cache = val()?;
                cache_set = true;
            }
            "--db" => {
                a.db = val()?;
                db_set = true;
            }
            "--pairs" => {
                a.pairs = val()?
                    .split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect()
            }
            "--redis" => a.redis = Some(val()?),
            "--redis-cluster" => a.redis_cluster = Some(val()?),
            "--memcached" => a.memcached = Some(val()?),
            "--postgres" => a.postgres = Some(val()?),
            "--sqlite" => a.sqlite = val()?,
            "--duration-ms" => {
                a.duration = Duration::from_millis(val()?.parse().map_err(|e| format!("{e}"))?)
            }
            "--rounds" => a.rounds = val()?.parse().map_err(|e| format!("{e}"))?,
            "--keys" => {
                a.keys = val()?.parse().map_err(|e| format!("--keys: {e}"))?;
                if a.keys == 0 {
                    return Err("--keys needs at least one key".into());
                }
            }
            "--count" => {
                let n = val()?.parse().map_err(|e| format!("--count: {e}"))?;
                a.count = Some((n, a.count.is_none_or(|(_, ours)| ours)));
            }
            "--side" => {
                let ours = match val()?.as_str() {
                    "ours" => true,
                    "raw" => false,
                    other => return Err(format!("--side {other:?}: ours or raw")),
                };
                a.count = Some((a.count.map_or(0, |(n, _)| n), ours));
            }
            "--sizes" => a.sizes = list(val()?)?,
            "--concurrency" => a.concurrency = list(val()?)?,
            "--scenarios" => {
                a.scenarios = val()?.split(',').map(str::to_owned).collect();
                if let Some(bad) = a.scenarios.iter().find(|s| !scenarios::known(s)) {
                    return Err(format!("unknown scenario {bad:?}"));
                }
            }
            "--markdown" => a.markdown = Some(val()?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    // `--cache` and `--db` also name the server of their kind for `--pairs`.
    for (url, set) in [(a.cache.clone(), cache_set), (a.db.clone(), db_set)] {
        if !set {
            continue;
        }
        match scenarios::kind(&url) {
            "redis" => a.redis = a.redis.take().or(Some(url)),
            "redis-cluster" => a.redis_cluster = a.redis_cluster.take().or(Some(url)),
            "memcached" => a.memcached = a.memcached.take().or(Some(url)),
            "postgres" => a.postgres = a.postgres.take().or(Some(url)),
            "sqlite" => a.sqlite = url,
            _ => {}
        }
    }
    if a.rounds == 0 || a.sizes.is_empty() || a.concurrency.contains(&0) {
        return Err("--rounds, --sizes and --concurrency need at least one, non-zero".into());
    }
    Ok(a)
}

/// The pairs to run, with their URLs.
fn pairs(a: &Args) -> std::result::Result<Vec<Pair>, String> {
    if a.pairs.is_empty() {
        return Ok(vec![Pair::new(&a.cache, &a.db)]);
    }
    let names: Vec<String> = if a.pairs.iter().any(|p| p == "all") {
        scenarios::ALL_PAIRS.iter().map(|&p| p.to_owned()).collect()
    } else {
        a.pairs.clone()
    };
    let need = |v: &Option<String>, flag: &str, pair: &str| {
        v.clone()
            .ok_or_else(|| format!("pair {pair:?} needs {flag} URL"))
    };
    names
        .iter()
        .map(|name| {
            let (c, d) = name
                .split_once('+')
                .ok_or_else(|| format!("{name:?} is not cache+database"))?;
            let cache = match c {
                "moka" if scenarios::kind(&a.cache) == "moka" => a.cache.clone(),
                "moka" => "moka://".to_owned(),
                "redis" => need(&a.redis, "--redis", name)?,
                "redis-cluster" => need(&a.redis_cluster, "--redis-cluster", name)?,
                "memcached" => need(&a.memcached, "--memcached", name)?,
                _ => {
                    return Err(format!(
                        "unknown cache {c:?} in {name:?} (moka, redis, redis-cluster, memcached)"
                    ));
                }
            };
            let db = match d {
                "sqlite" => a.sqlite.clone(),
                "postgres" => need(&a.postgres, "--postgres", name)?,
                _ => {
                    return Err(format!(
                        "unknown database {d:?} in {name:?} (sqlite, postgres)"
                    ));
                }
            };
            Ok(Pair::new(&cache, &db))
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let (args, pairs) = match parse().and_then(|a| pairs(&a).map(|p| (a, p))) {
        Ok(x) => x,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let mut report = String::new();
    let mut emit = |table: String| {
        println!("{table}");
        report.push_str(&table);
        report.push('\n');
    };
    let mut results = Vec::new();
    for pair in &pairs {
        let rows = scenarios::run_pair(&args, pair).await?;
        if !rows.is_empty() {
            emit(scenarios::render(&args, pair, &rows));
        }
        results.push((pair.clone(), rows));
    }
    if results.len() > 1 && results.iter().any(|(_, rows)| !rows.is_empty()) {
        emit(scenarios::render_summary(&results));
    }
    let wanted =
        args.scenarios.is_empty() || args.scenarios.iter().any(|s| s == scenarios::HEAD_TO_HEAD);
    let url_of = |kind: &str| {
        pairs
            .iter()
            .find(|p| scenarios::kind(&p.cache) == kind)
            .map(|p| p.cache.clone())
    };
    if wanted && let (Some(r), Some(m)) = (url_of("redis"), url_of("memcached")) {
        let rows = scenarios::head_to_head(&args, &r, &m).await?;
        emit(scenarios::render_head_to_head(&args, &r, &m, &rows));
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, &report).map_err(|e| {
            writethrough::Error::new(
                writethrough::ErrorKind::Config,
                format!("cannot write {path}"),
            )
            .with_source(e)
        })?;
    }
    Ok(())
}
