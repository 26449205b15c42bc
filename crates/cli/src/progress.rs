//! Progress of long runs, and Ctrl-C.
//!
//! A bar (rows, rate, and the ETA when the total is known) when stdout is
//! a terminal; otherwise a plain line on stderr at most once a second and
//! one at the end, so that stdout keeps only the report.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use tokio::sync::watch;

/// Shows how far a run over one table got.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    done: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    pub(crate) fn new(label: String, total: Option<u64>) -> Progress {
        let now = Instant::now();
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = match total {
                Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stdout()),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout()),
            };
            let template = if total.is_some() {
                "{msg} [{bar:30}] {pos}/{len} rows, {rate}, ETA {eta}"
            } else {
                "{msg} {spinner} {pos} rows, {rate}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> ").with_key(
                    "rate",
                    |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0} rows/s", s.per_sec());
                    },
                ));
            }
            bar.set_message(label.clone());
            bar
        });
        Progress {
            bar,
            label,
            done: 0,
            started: now,
            last_line: now,
        }
    }

    pub(crate) fn add(&mut self, rows: usize) {
        self.done += rows as u64;
        match &self.bar {
            Some(bar) => bar.inc(rows as u64),
            None if self.last_line.elapsed() >= Duration::from_secs(1) => {
                self.last_line = Instant::now();
                self.line();
            }
            None => {}
        }
    }

    fn line(&self) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        eprintln!(
            "{}: {} rows, {:.0} rows/s",
            self.label,
            self.done,
            self.done as f64 / secs
        );
    }

    /// The last state, drawn once more: the bar stays on its own line.
    pub(crate) fn finish(&self) {
        match &self.bar {
            Some(bar) => {
                bar.finish();
                println!();
            }
            None => self.line(),
        }
    }
}

/// Whether Ctrl-C was pressed; long runs stop at their next page.
#[derive(Clone)]
pub(crate) struct Interrupt {
    rx: watch::Receiver<bool>,
}

impl Interrupt {
    /// Starts listening for Ctrl-C (SIGINT).
    pub(crate) fn listen() -> Interrupt {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = tx.send(true);
            }
        });
        Interrupt { rx }
    }

    /// Resolves once Ctrl-C was pressed.
    pub(crate) async fn wait(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|pressed| *pressed).await.is_err() {
            // No signal handler: never interrupted.
            std::future::pending::<()>().await;
        }
    }

    /// Runs `f` unless Ctrl-C comes first: `None` then.
    pub(crate) async fn or<F: std::future::Future>(&self, f: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            () = self.wait() => None,
            out = f => Some(out),
        }
    }

    pub(crate) fn pressed(&self) -> bool {
        *self.rx.borrow()
    }
}
