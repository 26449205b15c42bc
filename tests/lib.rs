//! Backend pairs for the cross-backend tests: every cache × database
//! combination, over servers the testkit starts.

use std::sync::Arc;

use writethrough::moka::MokaCache;
use writethrough::sqlite::SqliteStore;
use writethrough::{CacheStore, DbStore};
use writethrough_testkit::server::{PostgresServer, RedisServer};
use writethrough_testkit::suite::Pair;

/// Moka + SQLite (a fresh temporary database): no server needed.
pub fn embedded_pair() -> Pair {
    Pair::new(Arc::new(MokaCache::default()), sqlite())
}

/// A fresh temporary SQLite database.
pub fn sqlite() -> Arc<dyn DbStore> {
    Arc::new(SqliteStore::open_temporary().expect("a temporary SQLite database"))
}

/// The servers the shared pairs run on; dropping it stops them.
pub struct Servers {
    /// Redis.
    pub redis: RedisServer,
    /// PostgreSQL.
    pub postgres: PostgresServer,
}

impl Servers {
    /// Starts every server (failing with the install hint if a binary is missing).
    pub async fn start() -> Servers {
        let redis = RedisServer::start()
            .await
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"));
        let postgres = PostgresServer::start()
            .await
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
        Servers { redis, postgres }
    }

    /// A PostgreSQL store (its own pool) on the shared server.
    pub async fn postgres(&self) -> Arc<dyn DbStore> {
        Arc::new(
            writethrough::postgres::PostgresStore::connect(&self.postgres.url())
                .await
                .expect("connects to the testkit's PostgreSQL"),
        )
    }

    /// A Redis cache on the shared server.
    pub async fn redis(&self) -> Arc<dyn CacheStore> {
        Arc::new(
            writethrough::redis::RedisCache::connect(&self.redis.url())
                .await
                .expect("connects to the testkit's redis"),
        )
    }

    /// Every pair, cache × database.
    pub async fn pairs(&self) -> Vec<Pair> {
        vec![
            embedded_pair(),
            Pair::new(self.redis().await, sqlite()),
            Pair::new(Arc::new(MokaCache::default()), self.postgres().await),
            Pair::new(self.redis().await, self.postgres().await),
        ]
    }
}
