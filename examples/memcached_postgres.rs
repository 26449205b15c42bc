//! The product catalogue tour on Memcached + PostgreSQL (Memcached may be
//! one server or several: `memcached://h1:11211,h2:11211`).
//!
//! `cargo run --example memcached_postgres`, with the server URLs from the environment:
//!
//! | variable           | default                                       |
//! |--------------------|-----------------------------------------------|
//! | `WT_MEMCACHED_URL` | `memcached://127.0.0.1:11211`                 |
//! | `WT_POSTGRES_URL`  | `postgres://postgres@127.0.0.1:5432/postgres` |
//!
//! The walk-through itself is `writethrough_examples::tour::catalogue_tour`.

use writethrough_examples::tour::{self, MEMCACHED, POSTGRES};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tour::run(MEMCACHED, POSTGRES).await
}
