//! The command line's arguments.

use clap::{Args, Parser, Subcommand};

/// The writethrough operator's tools: compare, repair and preload a cache
/// kept by writethrough, inspect one key, replay the outbox, check health.
#[derive(Debug, Parser)]
#[command(name = "writethrough", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) conn: Conn,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Where the cache and the database are.
#[derive(Debug, Args)]
pub(crate) struct Conn {
    /// Cache URL: redis://host:6379, memcached://h1:11211,h2:11211, moka://
    #[arg(long, env = "WT_CACHE_URL", global = true)]
    pub(crate) cache: Option<String>,
    /// Database URL: postgres://user@host/db, sqlite://path/to/app.db
    #[arg(long, env = "WT_DB_URL", global = true)]
    pub(crate) db: Option<String>,
    /// The engine's namespace: the prefix of its cache keys.
    #[arg(long, env = "WT_NAMESPACE", default_value = "wt", global = true)]
    pub(crate) namespace: String,
    /// A column's type where the database cannot tell it, as
    /// `[TABLE.]COLUMN=TYPE` (bool, int, float, text, bytes, json); SQLite
    /// stores booleans as integers and JSON as text. Repeatable.
    #[arg(long = "type", value_name = "[TABLE.]COLUMN=TYPE", global = true)]
    pub(crate) types: Vec<String>,
    /// Seconds to wait for a backend to answer when connecting.
    #[arg(long, default_value_t = 5.0, global = true)]
    pub(crate) connect_timeout: f64,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Compare cache entries with database rows; exit status 1 on divergence.
    Audit(AuditArgs),
    /// Preload a table's rows into the cache, fenced like reads.
    Warm(WarmArgs),
    /// Show one key's cache entry beside its database row.
    Inspect(InspectArgs),
    /// Show the outbox records waiting for their cache effect; replay them.
    Outbox(OutboxArgs),
    /// Ping both backends; show their capabilities and the engine's settings.
    Health(HealthArgs),
}

/// `audit`.
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// The table to audit (default: every table with a version column).
    #[arg(long)]
    pub(crate) table: Option<String>,
    /// Compare N rows of each table picked at random (every row when the
    /// table has no more), and look at up to N of its cache keys for
    /// entries whose row is gone.
    #[arg(long, default_value_t = 10_000, conflicts_with = "all")]
    pub(crate) sample: usize,
    /// The seed of the random sample: the same seed picks the same rows
    /// again (default: a new one each run, printed in the report).
    #[arg(long, conflicts_with = "all")]
    pub(crate) seed: Option<u64>,
    /// Compare every row.
    #[arg(long)]
    pub(crate) all: bool,
    /// Rewrite each confirmed divergence from the database.
    #[arg(long)]
    pub(crate) repair: bool,
    /// Milliseconds to wait before looking at a suspect again (a write
    /// between its commit and its cache write is not a divergence).
    #[arg(long, default_value_t = 200)]
    pub(crate) settle_ms: u64,
    /// How many divergent keys to list per table.
    #[arg(long, default_value_t = 10)]
    pub(crate) show: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `warm`.
#[derive(Debug, Args)]
pub(crate) struct WarmArgs {
    /// The table to preload.
    #[arg(long)]
    pub(crate) table: String,
    /// At most this many rows per second.
    #[arg(long)]
    pub(crate) rate: Option<u32>,
    /// At most this many rows in all.
    #[arg(long)]
    pub(crate) limit: Option<usize>,
}

/// `inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// The table.
    pub(crate) table: String,
    /// The key, as text; it must parse as the key column's type.
    pub(crate) key: String,
    /// Print the inspection as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `outbox`.
#[derive(Debug, Args)]
pub(crate) struct OutboxArgs {
    /// Re-apply every pending record's cache effect now, then remove it.
    #[arg(long)]
    pub(crate) replay: bool,
}

/// `health`.
#[derive(Debug, Args)]
pub(crate) struct HealthArgs {
    /// Pings per backend; the report gives the fastest and the slowest.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) pings: u32,
}
