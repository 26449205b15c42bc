//! Backend pairs for the cross-backend tests: every cache × database
//! combination, over servers the testkit starts.

use std::sync::Arc;

use writethrough::backend::{CacheStore, DbStore};
use writethrough::moka::MokaCache;
use writethrough::sqlite::SqliteStore;
use writethrough_testkit::server::{MemcachedServer, PostgresServer, RedisCluster, RedisServer};
use writethrough_testkit::suite::Pair;

/// Moka + SQLite (a fresh temporary database): no server needed.
pub fn embedded_pair() -> Pair {
    Pair::new(Arc::new(MokaCache::default()), sqlite())
}

/// A fresh temporary SQLite database.
pub fn sqlite() -> Arc<dyn DbStore> {
    Arc::new(SqliteStore::open_temporary().expect("a temporary SQLite database"))
}

/// Backend timeouts of the shared pairs.
const SLOW_MACHINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The servers the shared pairs run on; dropping it stops them.
pub struct Servers {
    /// Redis.
    pub redis: RedisServer,
    /// PostgreSQL.
    pub postgres: PostgresServer,
    /// Memcached.
    pub memcached: MemcachedServer,
    /// A Redis Cluster (3 primaries, 3 replicas).
    pub redis_cluster: RedisCluster,
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
        let memcached = MemcachedServer::start()
            .await
            .unwrap_or_else(|e| panic!("cannot start memcached: {e}"));
        let redis_cluster = RedisCluster::start()
            .await
            .unwrap_or_else(|e| panic!("cannot start a Redis Cluster: {e}"));
        Servers {
            redis,
            postgres,
            memcached,
            redis_cluster,
        }
    }

    /// A Memcached cache on the shared server.
    pub async fn memcached(&self) -> Arc<dyn CacheStore> {
        Arc::new(
            writethrough::memcached::MemcachedCache::connect(&format!(
                "{}?timeout={}s",
                self.memcached.url(),
                SLOW_MACHINE.as_secs()
            ))
            .await
            .expect("connects to the testkit's memcached"),
        )
    }

    /// A PostgreSQL store (its own pool) on the shared server.
    pub async fn postgres(&self) -> Arc<dyn DbStore> {
        Arc::new(
            writethrough::postgres::PostgresStore::connect(&self.postgres.url())
                .await
                .expect("connects to the testkit's PostgreSQL"),
        )
    }

    /// A Redis cache on the shared server. Its timeouts are generous: the
    /// suites on shared servers test the fault-free path, and a loaded test
    /// machine must not turn into a fault (the fault suite has its own).
    pub async fn redis(&self) -> Arc<dyn CacheStore> {
        let cfg = writethrough::redis::RedisConfig::from_url(self.redis.url())
            .expect("a redis URL")
            .with_response_timeout(SLOW_MACHINE);
        Arc::new(
            writethrough::redis::RedisCache::with_config(cfg)
                .await
                .expect("connects to the testkit's redis"),
        )
    }

    /// A cache on the shared Redis Cluster, with the same generous timeouts.
    pub async fn redis_cluster(&self) -> Arc<dyn CacheStore> {
        let cfg = writethrough::redis::RedisConfig::from_url(self.redis_cluster.url())
            .expect("a cluster URL")
            .with_response_timeout(SLOW_MACHINE);
        Arc::new(
            writethrough::redis::RedisCache::with_config(cfg)
                .await
                .unwrap_or_else(|e| panic!("connects to the testkit's cluster: {e}")),
        )
    }

    /// Every pair, cache × database.
    pub async fn pairs(&self) -> Vec<Pair> {
        vec![
            embedded_pair(),
            Pair::new(self.redis().await, sqlite()),
            Pair::new(Arc::new(MokaCache::default()), self.postgres().await),
            Pair::new(self.redis().await, self.postgres().await),
            Pair::new(self.memcached().await, sqlite()),
            Pair::new(self.memcached().await, self.postgres().await),
            Pair::new(self.redis_cluster().await, sqlite()),
            Pair::new(self.redis_cluster().await, self.postgres().await),
        ]
    }
}

/// Fault rigs: each call starts the pair's servers afresh, behind fault
/// proxies, so a case can kill, pause or cut them off on its own.
pub mod rigs {
    use std::sync::Arc;
    use std::time::Duration;

    use futures::FutureExt;
    use writethrough::backend::{CacheStore, DbStore};
    use writethrough::sqlite::{SqliteConfig, SqliteStore};
    use writethrough_testkit::proxy::FaultProxy;
    use writethrough_testkit::server::{
        MemcachedServer, PostgresServer, RedisServer, ServerControl,
    };
    use writethrough_testkit::suite::Pair;
    use writethrough_testkit::suite::faults::{DbLock, FaultRig, RigFactory};

    /// The cache side of a pair.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Cache {
        /// In-process.
        Moka,
        /// A redis-server.
        Redis,
        /// A memcached.
        Memcached,
    }

    /// The database side of a pair.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Db {
        /// A file.
        Sqlite,
        /// A PostgreSQL cluster.
        Postgres,
    }

    type DbSide = (
        Arc<dyn DbStore>,
        Option<Arc<dyn ServerControl>>,
        Option<FaultProxy>,
        Option<usize>,
        Option<Arc<dyn DbLock>>,
    );

    /// Pool size of the PostgreSQL stores of the fault suite.
    const PG_POOL: usize = 4;

    struct SqliteLock(std::path::PathBuf);

    #[async_trait::async_trait]
    impl DbLock for SqliteLock {
        async fn hold(&self, d: Duration) {
            let (taken_tx, taken_rx) = tokio::sync::oneshot::channel();
            let path = self.0.clone();
            tokio::task::spawn_blocking(move || {
                let c = rusqlite::Connection::open(path).expect("opens");
                c.execute_batch("BEGIN EXCLUSIVE").expect("locks");
                let _ = taken_tx.send(());
                std::thread::sleep(d);
                c.execute_batch("COMMIT").expect("unlocks");
            });
            taken_rx.await.expect("the lock was taken");
        }
    }

    async fn cache(
        kind: Cache,
    ) -> (
        Arc<dyn CacheStore>,
        Option<Arc<dyn ServerControl>>,
        Option<FaultProxy>,
    ) {
        let fail =
            |e: &dyn std::fmt::Display| -> ! { panic!("cannot start the cache server: {e}") };
        match kind {
            Cache::Moka => (
                Arc::new(writethrough::moka::MokaCache::default()),
                None,
                None,
            ),
            Cache::Redis => {
                let server = RedisServer::start().await.unwrap_or_else(|e| fail(&e));
                let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
                let cache = writethrough::redis::RedisCache::connect(&proxy.url(&server.url()))
                    .await
                    .expect("connects");
                (
                    Arc::new(cache),
                    Some(Arc::new(tokio::sync::Mutex::new(server))),
                    Some(proxy),
                )
            }
            Cache::Memcached => {
                let server = MemcachedServer::start().await.unwrap_or_else(|e| fail(&e));
                let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
                let cache =
                    writethrough::memcached::MemcachedCache::connect(&proxy.url(&server.url()))
                        .await
                        .expect("connects");
                (
                    Arc::new(cache),
                    Some(Arc::new(tokio::sync::Mutex::new(server))),
                    Some(proxy),
                )
            }
        }
    }

    /// A fresh rig for `cache` + `db`.
    pub async fn rig(c: Cache, d: Db) -> FaultRig {
        let (cache, cache_server, cache_proxy) = cache(c).await;
        let (db, db_server, db_proxy, db_pool_size, db_lock): DbSide = match d {
            Db::Sqlite => {
                let dir = tempfile::tempdir().expect("a temp dir");
                let path = dir.path().join("faults.db");
                // The directory lives as long as the process: rigs are few.
                std::mem::forget(dir);
                let store = SqliteStore::with_config(
                    SqliteConfig::new(&path).busy_timeout(Duration::from_millis(300)),
                )
                .expect("opens");
                (
                    Arc::new(store),
                    None,
                    None,
                    None,
                    Some(Arc::new(SqliteLock(path))),
                )
            }
            Db::Postgres => {
                let server = PostgresServer::start()
                    .await
                    .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
                let proxy = FaultProxy::start(server.addr()).await.expect("proxy");
                let url = format!(
                    "{}?max_connections={PG_POOL}&acquire_timeout=500ms",
                    proxy.url(&server.url())
                );
                let store = writethrough::postgres::PostgresStore::connect(&url)
                    .await
                    .expect("connects");
                (
                    Arc::new(store),
                    Some(Arc::new(tokio::sync::Mutex::new(server))),
                    Some(proxy),
                    Some(PG_POOL),
                    None,
                )
            }
        };
        FaultRig {
            pair: Pair::new(cache, db),
            cache_server,
            db_server,
            cache_proxy,
            db_proxy,
            db_pool_size,
            db_lock,
        }
    }

    /// Every pair, as a name and a factory of fresh rigs.
    pub fn all() -> Vec<(String, RigFactory)> {
        let mut out = Vec::new();
        for c in [Cache::Moka, Cache::Redis, Cache::Memcached] {
            for d in [Db::Sqlite, Db::Postgres] {
                let name = format!("{c:?}+{d:?}").to_lowercase();
                let f: RigFactory = Arc::new(move || rig(c, d).boxed());
                out.push((name, f));
            }
        }
        out
    }
}
