//! The product catalogue tour on Redis + PostgreSQL, the usual pair for
//! services: several processes share the cache and the database.
//!
//! `cargo run --example redis_postgres`, with the server URLs from the environment:
//!
//! | variable          | default                                       |
//! |-------------------|-----------------------------------------------|
//! | `WT_REDIS_URL`    | `redis://127.0.0.1:6379`                      |
//! | `WT_POSTGRES_URL` | `postgres://postgres@127.0.0.1:5432/postgres` |
//!
//! The walk-through itself is `writethrough_examples::tour::catalogue_tour`.

use writethrough_examples::tour::{self, POSTGRES, REDIS};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tour::run(REDIS, POSTGRES).await
}
