//! `writethrough`: the operator's command line.
//!
//! It connects to a cache and a database by URL, reads a table's schema
//! from the database (no Rust types needed), and runs the engine's own
//! audit, repair, warm-up and outbox replay on it; `inspect` shows one
//! key's cache entry beside its row, and `health` pings both backends.
//!
//! Exit status: 0 when all is well, 1 when a divergence was found, 2 for
//! bad input or a backend that cannot be used (one line on stderr), 130
//! when Ctrl-C stopped a long run (after its partial report).

mod args;
mod audit;
mod connect;
mod health;
mod inspect;
mod outbox;
mod progress;
mod warm;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

/// What a command ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Everything checked out.
    Clean,
    /// A divergence was found (and maybe repaired).
    Divergent,
    /// Ctrl-C stopped the run; a partial report was printed.
    Interrupted,
}

/// A failure to report on one line, with exit status 2.
#[derive(Debug)]
struct Fatal(String);

impl From<writethrough::Error> for Fatal {
    fn from(e: writethrough::Error) -> Self {
        Fatal(e.to_string())
    }
}

impl Fatal {
    fn new(msg: impl Into<String>) -> Self {
        Fatal(msg.into())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // clap's usage block is several lines; an operator's script
            // wants the one that says what is wrong.
            let rendered = e.to_string();
            let line = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("bad arguments");
            eprintln!("writethrough: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("writethrough: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Divergent) => ExitCode::from(1),
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(Fatal(msg)) => {
            eprintln!("writethrough: {}", one_line(&msg));
            ExitCode::from(2)
        }
    }
}

/// Messages from drivers may span lines; the report is one.
fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn run(cli: Cli) -> Result<Outcome, Fatal> {
    let target = connect::Target::from_args(&cli.conn)?;
    let interrupt = progress::Interrupt::listen();
    match cli.command {
        Command::Audit(a) => audit::run(&target, &a, &interrupt).await,
        Command::Warm(w) => warm::run(&target, &w, &interrupt).await,
        Command::Inspect(i) => inspect::run(&target, &i).await,
        Command::Outbox(o) => outbox::run(&target, &o).await,
        Command::Health(h) => health::run(&target, &h).await,
    }
}
