//! The product catalogue tour on Memcached + SQLite: Memcached in front of
//! a local database file.
//!
//! `cargo run --example memcached_sqlite`, with the server URLs from the environment:
//!
//! | variable           | default                       |
//! |--------------------|-------------------------------|
//! | `WT_MEMCACHED_URL` | `memcached://127.0.0.1:11211` |
//! | `WT_SQLITE_URL`    | `sqlite::temp:`               |
//!
//! The walk-through itself is `writethrough_examples::tour::catalogue_tour`.

use writethrough_examples::tour::{self, MEMCACHED, SQLITE};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tour::run(MEMCACHED, SQLITE).await
}
