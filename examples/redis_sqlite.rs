//! The product catalogue tour on Redis + SQLite: a shared cache in front
//! of a local database file.
//!
//! `cargo run --example redis_sqlite`, with the server URLs from the environment:
//!
//! | variable        | default                  |
//! |-----------------|--------------------------|
//! | `WT_REDIS_URL`  | `redis://127.0.0.1:6379` |
//! | `WT_SQLITE_URL` | `sqlite::temp:`          |
//!
//! The walk-through itself is `writethrough_examples::tour::catalogue_tour`.

use writethrough_examples::tour::{self, REDIS, SQLITE};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tour::run(REDIS, SQLITE).await
}
