//! The catalogue walk-through every per-pair example runs
//! (`redis_postgres`, `memcached_sqlite`, …): the quickstart's story on
//! backends named by URLs.
//!
//! An example is one call, [`run`], naming its cache and its database:
//!
//! ```no_run
//! use writethrough_examples::tour::{self, POSTGRES, REDIS};
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     tour::run(REDIS, POSTGRES).await
//! }
//! ```
//!
//! [`run`] reads each backend's URL from its environment variable (or
//! takes the default), prints both, connects, and runs
//! [`catalogue_tour`]. A backend that cannot be reached is reported on
//! stderr with its URL and the variable to change, and the process exits
//! with status 1.

use std::borrow::Cow;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use writethrough::backend::{CacheStore, DbStore};
use writethrough::{Engine, ErrorKind, Patch, Stats, TableOptions};

use crate::{Product, notebooks, validate};

/// One backend of a pair: how to name it, and where its URL comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// Its name for people: `"Redis"`, `"PostgreSQL"`.
    pub name: &'static str,
    /// The environment variable that holds its URL; `None` for Moka, which
    /// has nothing to point at.
    pub env: Option<&'static str>,
    /// The URL used when the variable is unset or empty.
    pub default_url: &'static str,
    /// The URL schemes that name this backend (the part before `:`).
    pub schemes: &'static [&'static str],
}

/// Moka, the in-process cache: always `moka://`.
pub const MOKA: Backend = Backend {
    name: "Moka",
    env: None,
    default_url: "moka://",
    schemes: &["moka"],
};

/// Redis: `WT_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub const REDIS: Backend = Backend {
    name: "Redis",
    env: Some("WT_REDIS_URL"),
    default_url: "redis://127.0.0.1:6379",
    schemes: &["redis", "rediss", "redis+unix", "unix"],
};

/// A Redis Cluster: `WT_REDIS_CLUSTER_URL`, default
/// `redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002`.
pub const REDIS_CLUSTER: Backend = Backend {
    name: "Redis Cluster",
    env: Some("WT_REDIS_CLUSTER_URL"),
    default_url: "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
    schemes: &["redis+cluster", "rediss+cluster"],
};

/// Memcached: `WT_MEMCACHED_URL`, default `memcached://127.0.0.1:11211`
/// (several servers: `memcached://h1:11211,h2:11211`).
pub const MEMCACHED: Backend = Backend {
    name: "Memcached",
    env: Some("WT_MEMCACHED_URL"),
    default_url: "memcached://127.0.0.1:11211",
    schemes: &["memcached", "memcache"],
};

/// PostgreSQL: `WT_POSTGRES_URL`, default
/// `postgres://postgres@127.0.0.1:5432/postgres`.
pub const POSTGRES: Backend = Backend {
    name: "PostgreSQL",
    env: Some("WT_POSTGRES_URL"),
    default_url: "postgres://postgres@127.0.0.1:5432/postgres",
    schemes: &["postgres", "postgresql"],
};

/// SQLite: `WT_SQLITE_URL`, default `sqlite::temp:` (a database in a
/// temporary directory, removed at exit); `sqlite://catalogue.db` keeps a file.
pub const SQLITE: Backend = Backend {
    name: "SQLite",
    env: Some("WT_SQLITE_URL"),
    default_url: "sqlite::temp:",
    schemes: &["sqlite"],
};

impl Backend {
    /// The URL to use: the variable's value if it is set and not empty,
    /// else the default.
    pub fn url(&self) -> String {
        self.env
            .and_then(|var| std::env::var(var).ok())
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| self.default_url.to_owned())
    }

    /// Where the URL came from, for messages: "from WT_REDIS_URL", "the
    /// default; set WT_REDIS_URL to change it".
    fn origin(&self) -> String {
        let Some(var) = self.env else {
            return "always".to_owned();
        };
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => format!("from {var}"),
            Ok(_) => format!("the default, as {var} is empty"),
            Err(_) => format!("the default; set {var} to change it"),
        }
    }

    /// Refuses a URL of another backend's scheme, so that the example's
    /// name keeps telling the truth.
    fn check_scheme(&self, url: &str) -> Result<(), String> {
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        if self.schemes.contains(&scheme) {
            return Ok(());
        }
        let var = self.env.unwrap_or("the URL");
        Err(format!(
            "{var} is {:?}, which is not a {} URL: use {}",
            redact(url),
            self.name,
            self.schemes
                .iter()
                .map(|s| format!("{s}:"))
                .collect::<Vec<_>>()
                .join(", "),
        ))
    }

    /// The message for a backend that could not be opened.
    fn unreachable(&self, url: &str, e: &writethrough::Error) -> String {
        let hint = match self.env {
            // A URL that does not parse, an unknown option: nothing to start.
            Some(var) if e.kind().is_input() => format!("\n  fix {var}"),
            Some(var) => format!(
                "\n  is {} running there? Start it, or set {var} to the URL of one",
                self.name
            ),
            None => String::new(),
        };
        format!(
            "cannot open {} at {} ({}): {e}{hint}",
            self.name,
            redact(url),
            self.origin()
        )
    }
}

/// `url` with the password, if any, replaced by `***`: URLs are printed.
pub fn redact(url: &str) -> Cow<'_, str> {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return Cow::Borrowed(url);
    };
    let rest = &url[start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let Some(at) = authority.rfind('@') else {
        return Cow::Borrowed(url);
    };
    let Some(colon) = authority[..at].find(':') else {
        return Cow::Borrowed(url);
    };
    Cow::Owned(format!(
        "{}{}:***{}",
        &url[..start],
        &authority[..colon],
        &url[start + at..]
    ))
}

/// A name unique to this run (process id and start time), so that runs
/// sharing a server neither read nor clear each other's rows and entries.
fn run_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{}_{secs}", std::process::id())
}

/// Runs the catalogue walk-through on `cache` + `db`, each at the URL its
/// environment variable names (or its default): what every per-pair
/// example's `main` does.
///
/// Returns the process's exit status: success, or failure after printing
/// on stderr what went wrong (for a backend that cannot be reached: its
/// URL and the variable to change).
pub async fn run(cache: Backend, db: Backend) -> ExitCode {
    let cache_url = cache.url();
    let db_url = db.url();
    let id = run_id();
    let table = format!("products_{id}");
    let namespace = format!("tour_{id}");

    println!("writethrough catalogue tour: {} + {}", cache.name, db.name);
    println!("  cache     {} ({})", redact(&cache_url), cache.origin());
    println!("  database  {} ({})", redact(&db_url), db.origin());
    println!("  table     {table}, cache namespace {namespace}\n");

    let (cache_store, db_store) = match connect(cache, &cache_url, db, &db_url).await {
        Ok(pair) => pair,
        Err(problems) => {
            for p in problems {
                eprintln!("error: {p}");
            }
            return ExitCode::FAILURE;
        }
    };
    let engine = match Engine::builder_dyn(cache_store, db_store)
        .namespace(&namespace)
        .default_ttl(Some(Duration::from_secs(600)))
        .build()
    {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("error: cannot build the engine: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match catalogue_tour(engine.clone(), &table).await {
        // The engine removes the outbox records of applied writes in the
        // background; a program that exits right after its writes flushes
        // first, so that it leaves no records behind.
        Ok(_) => engine.flush().await.map(|()| {
            println!("flush   outbox records of applied writes removed: none left behind");
        }),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: the tour stopped: {e}\n  (cache {} {}, database {} {})",
                redact(&cache_url),
                cache.origin(),
                redact(&db_url),
                db.origin()
            );
            ExitCode::FAILURE
        }
    }
}

/// Opens both backends at once, and reports every one that fails.
async fn connect(
    cache: Backend,
    cache_url: &str,
    db: Backend,
    db_url: &str,
) -> Result<(Arc<dyn CacheStore>, Arc<dyn DbStore>), Vec<String>> {
    let mut problems = Vec::new();
    if let Err(p) = cache.check_scheme(cache_url) {
        problems.push(p);
    }
    if let Err(p) = db.check_scheme(db_url) {
        problems.push(p);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let (c, d) = tokio::join!(
        writethrough::open_cache(cache_url),
        writethrough::open_db(db_url)
    );
    match (c, d) {
        (Ok(c), Ok(d)) => Ok((c, d)),
        (c, d) => {
            if let Err(e) = c {
                problems.push(cache.unreachable(cache_url, &e));
            }
            if let Err(e) = d {
                problems.push(db.unreachable(db_url, &e));
            }
            Err(problems)
        }
    }
}

/// "hit", or "miss, …" from the stats before and after one read.
fn hit_or_miss(before: Stats, after: Stats, found: bool, db: &str) -> String {
    if after.hits > before.hits {
        "hit".to_owned()
    } else if found {
        format!("miss, loaded from {db}")
    } else {
        format!("miss, and {db} has no such row")
    }
}

fn db_label(engine: &Engine) -> &'static str {
    match engine.db_name() {
        "postgres" => "PostgreSQL",
        "sqlite" => "SQLite",
        other => other,
    }
}

/// The product catalogue walk-through, printed on stdout as it goes:
/// create a product, read it twice, read one that does not exist, update
/// a price, have a bad product refused, import a thousand products in one
/// batch, delete one, and print the engine's counters.
///
/// The products live in `table` (created if missing, left in place
/// afterwards): give each run its own name when runs share a database.
/// Returns the engine's counters at the end.
pub async fn catalogue_tour(engine: Engine, table: &str) -> writethrough::Result<Stats> {
    let db = db_label(&engine);
    let products = engine
        .register_in::<Product>(
            <Product as writethrough::Entity>::table().renamed(table)?,
            TableOptions::new().validate(validate),
        )
        .await?;

    let pen = Product {
        id: 1,
        name: "Fountain pen".into(),
        price: 12.5,
        stock: 40,
    };
    let v = products.put(&pen).await?;
    println!(
        "create  product 1 {:?} at {:.2}: committed to {db} as version {v}, then cached",
        pen.name, pen.price
    );

    for nth in ["first", "second"] {
        let s = engine.stats();
        let got = products.get(1).await?;
        println!(
            "read    product 1, {nth} time: {} ({:?})",
            hit_or_miss(s, engine.stats(), got.is_some(), db),
            got.map(|p| (p.name, p.price))
        );
    }

    let s = engine.stats();
    let got = products.get(2).await?;
    println!(
        "read    product 2, never written: {} ({got:?})",
        hit_or_miss(s, engine.stats(), got.is_some(), db)
    );

    let updated = products.update(1, Patch::new().set("price", 9.99)).await?;
    println!(
        "update  product 1 price to 9.99: committed, read back and cached ({:?})",
        updated.map(|p| p.price)
    );
    let s = engine.stats();
    let got = products.get(1).await?;
    println!(
        "read    product 1 after the update: {} (price {:?})",
        hit_or_miss(s, engine.stats(), got.is_some(), db),
        got.map(|p| p.price)
    );

    let bad = Product {
        id: 7,
        name: "Broken".into(),
        price: -1.0,
        stock: 0,
    };
    match products.put(&bad).await {
        Err(e) if e.kind() == ErrorKind::Validation => {
            println!("reject  product 7: {e}; nothing written");
        }
        Err(e) => return Err(e),
        Ok(v) => {
            return Err(writethrough::Error::new(
                ErrorKind::Validation,
                format!("a negative price was accepted as version {v}"),
            ));
        }
    }

    let import = notebooks();
    let versions = products.put_many(&import).await?;
    println!(
        "import  {} products: one {db} transaction, then one cache round trip",
        versions.len()
    );
    let s = engine.stats();
    let got = products.get(600).await?;
    println!(
        "read    product 600: {} ({:?})",
        hit_or_miss(s, engine.stats(), got.is_some(), db),
        got.map(|p| p.name)
    );

    let deleted = products.delete(100).await?;
    let got = products.get(100).await?;
    println!(
        "delete  product 100: deleted = {deleted}; read afterwards: {got:?} (a tombstone fences late readers)"
    );

    let s = engine.stats();
    println!(
        "\nstats   hits {}, misses {}, database loads {}, writes {} (hit ratio {:.0}%)",
        s.hits,
        s.misses,
        s.loads,
        s.writes,
        100.0 * s.hit_ratio()
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        for (url, shown) in [
            (
                "postgres://app:s3cret@db:5432/shop",
                "postgres://app:***@db:5432/shop",
            ),
            (
                "redis://:pw@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            (
                "memcached://h1:11211,h2:11211",
                "memcached://h1:11211,h2:11211",
            ),
            ("sqlite::temp:", "sqlite::temp:"),
            ("redis://h/0?user=a@b", "redis://h/0?user=a@b"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }
}
