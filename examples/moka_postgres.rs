//! The product catalogue tour on Moka + PostgreSQL: an in-process cache, so
//! for one process only (see "Choosing backends" in the README).
//!
//! `cargo run --example moka_postgres`, with the server URL from the environment:
//!
//! | variable          | default                                       |
//! |-------------------|-----------------------------------------------|
//! | `WT_POSTGRES_URL` | `postgres://postgres@127.0.0.1:5432/postgres` |
//!
//! The walk-through itself is `writethrough_examples::tour::catalogue_tour`.

use writethrough_examples::tour::{self, MOKA, POSTGRES};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tour::run(MOKA, POSTGRES).await
}
