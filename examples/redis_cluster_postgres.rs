//! The product catalogue tour on a Redis Cluster + PostgreSQL: the cache
//! spread over several primaries, each key fenced on its own slot's node.
//!
//! `cargo run --example redis_cluster_postgres`, with the server URLs from the environment:
//!
//! | variable               | default                                                         |
//! |------------------------|-----------------------------------------------------------------|
//! | `WT_REDIS_CLUSTER_URL` | `redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002` |
//! | `WT_POSTGRES_URL`      | `postgres://postgres@127.0.0.1:5432/postgres`                   |
//!
//! The walk-through itself is `writethrough_examples::tour::catalogue_tour`.

use writethrough_examples::tour::{self, POSTGRES, REDIS_CLUSTER};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tour::run(REDIS_CLUSTER, POSTGRES).await
}
