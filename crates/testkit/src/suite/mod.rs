//! Conformance suites as plain async functions, run by any backend's tests.
//!
//! A [`Case`] takes a [`Pair`] (a cache and a database, both real) and
//! either passes, panics with what went wrong, or declares itself
//! [`Outcome::NotApplicable`] because the backend's capabilities rule it out
//! — which is reported, never silently counted as a pass.

pub mod cache;
pub mod db;
pub mod engine;
pub mod faults;
pub mod races;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use writethrough_core::backend::{CacheStore, DbStore};
use writethrough_core::{Config, Engine, EngineBuilder};

/// What a case concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every assertion held.
    Passed,
    /// The backend's capabilities rule the case out; says which.
    NotApplicable(String),
}

/// A cache and a database to run a case on.
#[derive(Clone)]
pub struct Pair {
    /// `cache+db`, e.g. `moka+sqlite`.
    pub name: String,
    /// The cache.
    pub cache: Arc<dyn CacheStore>,
    /// The database.
    pub db: Arc<dyn DbStore>,
}

impl fmt::Debug for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// A fresh identifier, unique across runs sharing a server: `{base}_{random}`.
pub fn unique(base: &str) -> String {
    format!("{base}_{:08x}", rand::random::<u32>())
}

impl Pair {
    /// A pair named after its backends.
    pub fn new(cache: Arc<dyn CacheStore>, db: Arc<dyn DbStore>) -> Self {
        Pair {
            name: format!("{}+{}", cache.name(), db.name()),
            cache,
            db,
        }
    }

    /// The settings the suites use: a namespace of their own, short
    /// background intervals so that repairs show within a test, and
    /// timeouts a loaded test machine cannot mistake for faults (cases
    /// about timeouts set their own).
    pub fn config() -> Config {
        let mut cfg = Config::default();
        cfg.namespace = unique("t");
        cfg.cache_timeout = Duration::from_secs(5);
        cfg.db_timeout = Duration::from_secs(30);
        cfg.outbox_grace = Duration::from_millis(300);
        cfg.reconcile_interval = Some(Duration::from_millis(200));
        cfg.breaker.open_for = Duration::from_millis(100);
        cfg.load_deadline = Duration::from_secs(2);
        cfg.tombstone_ttl = Duration::from_secs(30);
        cfg
    }

    /// An engine builder over this pair with [`Pair::config`].
    pub fn builder(&self) -> EngineBuilder {
        Engine::builder_dyn(self.cache.clone(), self.db.clone()).config(Self::config())
    }

    /// The same pair with another cache in front (a fault wrapper).
    pub fn with_cache(&self, cache: Arc<dyn CacheStore>) -> Pair {
        Pair {
            name: self.name.clone(),
            cache,
            db: self.db.clone(),
        }
    }

    /// The same pair with another database in front (a fault wrapper).
    pub fn with_db(&self, db: Arc<dyn DbStore>) -> Pair {
        Pair {
            name: self.name.clone(),
            cache: self.cache.clone(),
            db,
        }
    }
}

/// One conformance case.
#[derive(Clone, Copy)]
pub struct Case {
    /// Its name, which says what it proves.
    pub name: &'static str,
    /// Runs it.
    pub run: fn(Pair) -> BoxFuture<'static, Outcome>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// Builds a `Vec<Case>` from async functions `fn(Pair) -> Outcome`.
#[macro_export]
macro_rules! cases {
    ($($f:path),* $(,)?) => {
        vec![$($crate::suite::Case {
            name: stringify!($f),
            run: |p| Box::pin($f(p)),
        }),*]
    };
}

/// How one case ended.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// The case.
    pub name: &'static str,
    /// Passed or not applicable; `Err` carries the panic message.
    pub result: Result<Outcome, String>,
    /// How long it ran.
    pub elapsed: Duration,
}

/// What the matrix and fault runners take from their command line, the
/// way libtest does: every free argument is a term, and a case runs only if
/// each term occurs in its run's label, its pair's name or its own name —
/// so `cargo test --test matrix -- redis+postgres put_many` runs the
/// `put_many` cases on that pair. `--list` prints what would run, one
/// `<run>: <case>` per line, and runs nothing; libtest's other flags
/// (`--nocapture`, `--test-threads`, ...) are accepted and ignored.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    terms: Vec<String>,
    /// Print the matching cases instead of running them.
    pub list: bool,
}

impl Filter {
    /// From this process's arguments.
    pub fn from_args() -> Self {
        Self::parse(std::env::args().skip(1))
    }

    /// From the given arguments (flags start with `-`).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Self {
        let mut f = Filter::default();
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            match a.as_str() {
                "--list" => f.list = true,
                // libtest flags that take a value.
                "--test-threads" | "--format" | "--color" | "--skip" | "-Z" => {
                    args.next();
                }
                _ if a.starts_with('-') => {}
                _ => f.terms.push(a),
            }
        }
        f
    }

    /// Whether the case `case` of the run `run` over `pair` is selected.
    pub fn matches(&self, run: &str, pair: &str, case: &str) -> bool {
        self.terms.iter().all(|t| {
            run.contains(t.as_str()) || pair.contains(t.as_str()) || case.contains(t.as_str())
        })
    }
}

/// Runs `cases` on `pair` one after another, each in its own task (a panic
/// fails that case only) under `timeout`. `filter` keeps the cases whose
/// name contains it.
pub async fn run_cases(
    run: &str,
    pair: &Pair,
    cases: &[Case],
    filter: &Filter,
    timeout: Duration,
) -> Vec<CaseReport> {
    let mut out = Vec::new();
    for case in cases {
        if !filter.matches(run, &pair.name, case.name) {
            continue;
        }
        let started = Instant::now();
        let task = tokio::spawn((case.run)(pair.clone()));
        let result = match tokio::time::timeout(timeout, task).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) if e.is_panic() => Err(panic_message(e.into_panic())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("did not finish within {timeout:?}")),
        };
        out.push(CaseReport {
            name: case.name,
            result,
            elapsed: started.elapsed(),
        });
    }
    out
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panicked".into()
    }
}

/// Polls `check` every 10 ms until it returns true or `within` passes;
/// returns whether it became true.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a shared suite on one adapter, from that adapter's own tests
/// (`cargo test -p writethrough-redis` runs the cache suite on Redis),
/// printing each case, and panics naming every case that failed. A case
/// that does not apply prints why.
pub async fn assert_conformance(run: &str, pair: Pair, cases: Vec<Case>) {
    let reports = run_cases(
        run,
        &pair,
        &cases,
        &Filter::default(),
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(reports.len(), cases.len(), "every case ran");
    let mut failed = Vec::new();
    for r in &reports {
        match &r.result {
            Ok(Outcome::Passed) => println!("{run}: ok    {}", r.name),
            Ok(Outcome::NotApplicable(why)) => println!("{run}: n/a   {} ({why})", r.name),
            Err(msg) => {
                println!(
                    "{run}: FAIL  {}
        {msg}",
                    r.name
                );
                failed.push(format!("{}: {msg}", r.name));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{run}: {} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[cfg(test)]
mod filter_tests {
    use super::Filter;

    #[test]
    fn every_term_must_match_and_libtest_flags_are_ignored() {
        let args = [
            "--nocapture",
            "--test-threads",
            "2",
            "redis+postgres",
            "put_many",
        ];
        let f = Filter::parse(args.iter().map(|s| s.to_string()));
        assert!(!f.list);
        assert!(f.matches(
            "engine: redis+postgres",
            "redis+postgres",
            "put_many_refuses_a_key_twice"
        ));
        assert!(!f.matches(
            "engine: moka+sqlite",
            "moka+sqlite",
            "put_many_refuses_a_key_twice"
        ));
        assert!(!f.matches("engine: redis+postgres", "redis+postgres", "delete_many"));
        let all = Filter::parse(["--list".to_string()]);
        assert!(all.list && all.matches("any", "pair", "case"));
    }
}
