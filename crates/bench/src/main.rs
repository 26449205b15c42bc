//! writethrough-bench: every path of the engine against the raw driver calls
//! doing the same work, alternating in one run.
//!
//! ```text
//! cargo run --release -p writethrough-bench -- --embedded
//! cargo run --release -p writethrough-bench -- --cache redis://127.0.0.1:6379 --db postgres://postgres@127.0.0.1/test
//! ```
//!
//! Options: `--duration-ms N` per phase (default 1000), `--rounds N`
//! (default 3; ours and raw alternate, swapping who goes first),
//! `--sizes 256,16384`, `--concurrency 1,16`, `--scenarios read_hit,write,...`,
//! `--markdown FILE` to also write the table as Markdown.

mod raw;
mod scenarios;

use std::time::Duration;

use writethrough::Result;

/// Parsed command line.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    /// Cache URL (`moka://` for the embedded pair).
    pub(crate) cache: String,
    /// Database URL (`sqlite::temp:` for the embedded pair).
    pub(crate) db: String,
    /// Length of one measured phase.
    pub(crate) duration: Duration,
    /// Rounds of (ours, raw) phases.
    pub(crate) rounds: usize,
    /// Value sizes in bytes.
    pub(crate) sizes: Vec<usize>,
    /// Concurrency levels.
    pub(crate) concurrency: Vec<usize>,
    /// Scenarios to run (empty: all).
    pub(crate) scenarios: Vec<String>,
    /// Where to write the Markdown table.
    pub(crate) markdown: Option<String>,
}

fn parse() -> std::result::Result<Args, String> {
    let mut a = Args {
        cache: "moka://".into(),
        db: "sqlite::temp:".into(),
        duration: Duration::from_millis(1000),
        rounds: 3,
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
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--embedded" => {
                a.cache = "moka://".into();
                a.db = "sqlite::temp:".into();
            }
            "--cache" => a.cache = val()?,
            "--db" => a.db = val()?,
            "--duration-ms" => {
                a.duration = Duration::from_millis(val()?.parse().map_err(|e| format!("{e}"))?)
            }
            "--rounds" => a.rounds = val()?.parse().map_err(|e| format!("{e}"))?,
            "--sizes" => a.sizes = list(val()?)?,
            "--concurrency" => a.concurrency = list(val()?)?,
            "--scenarios" => a.scenarios = val()?.split(',').map(str::to_owned).collect(),
            "--markdown" => a.markdown = Some(val()?),
            "-h" | "--help" => {
                return Err(
                    "usage: writethrough-bench [--embedded | --cache URL --db URL] \
                            [--duration-ms N] [--rounds N] [--sizes a,b] [--concurrency a,b] \
                            [--scenarios x,y] [--markdown FILE]"
                        .into(),
                );
            }
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = match parse() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let rows = scenarios::run(&args).await?;
    let table = scenarios::render(&args, &rows);
    println!("{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table).map_err(|e| {
            writethrough::Error::new(
                writethrough::ErrorKind::Config,
                format!("cannot write {path}"),
            )
            .with_source(e)
        })?;
    }
    Ok(())
}
