//! The raw side: what a careful user would write by hand with the drivers,
//! doing the same work as the engine (without its consistency machinery).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The benchmark's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, writethrough::Entity)]
#[writethrough(table = "bench")]
pub(crate) struct Product {
    /// Key.
    pub(crate) id: i64,
    /// Name.
    pub(crate) name: String,
    /// Price.
    pub(crate) price: f64,
    /// Filler of the benchmark's value size.
    pub(crate) payload: String,
}

/// Boxed error of the raw drivers.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A cache driver used directly.
#[async_trait]
pub(crate) trait RawCache: Send + Sync {
    /// GET.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BoxError>;
    /// SET (no fence).
    async fn set(&self, key: &str, value: Bytes) -> Result<(), BoxError>;
    /// Pipelined SETs.
    async fn set_many(&self, items: Vec<(String, Bytes)>) -> Result<(), BoxError>;
    /// DEL.
    async fn del(&self, key: &str) -> Result<(), BoxError>;
    /// The server's memory in use (Redis `used_memory`, Memcached `bytes`);
    /// `None` for an in-process cache, measured by the process's RSS.
    async fn used_memory(&self) -> Result<Option<u64>, BoxError> {
        Ok(None)
    }
    /// Whether the entries live in this process (their memory is its RSS).
    fn in_process(&self) -> bool {
        false
    }
}

/// A database driver used directly.
#[async_trait]
pub(crate) trait RawDb: Send + Sync {
    /// Creates the table.
    async fn setup(&self, table: &str) -> Result<(), BoxError>;
    /// SELECT by key.
    async fn get(&self, table: &str, id: i64) -> Result<Option<Product>, BoxError>;
    /// One page of rows in key order, after `after`.
    async fn scan(&self, table: &str, after: i64, limit: usize) -> Result<Vec<Product>, BoxError>;
    /// INSERT ... ON CONFLICT DO UPDATE.
    async fn upsert(&self, table: &str, p: &Product) -> Result<(), BoxError>;
    /// Many upserts in one transaction (a multi-row statement where the driver allows).
    async fn upsert_many(&self, table: &str, ps: &[Product]) -> Result<(), BoxError>;
    /// UPDATE ... SET price RETURNING the row.
    async fn update_price(
        &self,
        table: &str,
        id: i64,
        price: f64,
    ) -> Result<Option<Product>, BoxError>;
    /// DELETE.
    async fn delete(&self, table: &str, id: i64) -> Result<bool, BoxError>;
}

/// The TTL the raw caches give every entry: the engine's default TTL
/// (one hour), which a careful user sets too.
const TTL_SECS: u64 = 3600;

/// Moka used directly.
pub(crate) struct RawMoka(pub moka::future::Cache<String, Bytes>);

#[async_trait]
impl RawCache for RawMoka {
    fn in_process(&self) -> bool {
        true
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BoxError> {
        Ok(self.0.get(key).await)
    }
    async fn set(&self, key: &str, value: Bytes) -> Result<(), BoxError> {
        self.0.insert(key.to_owned(), value).await;
        Ok(())
    }
    async fn set_many(&self, items: Vec<(String, Bytes)>) -> Result<(), BoxError> {
        for (k, v) in items {
            self.0.insert(k, v).await;
        }
        Ok(())
    }
    async fn del(&self, key: &str) -> Result<(), BoxError> {
        self.0.invalidate(key).await;
        Ok(())
    }
}

/// SQLite called directly (the blocking call on the async worker), one
/// connection behind a mutex, as SQLite has one writer anyway.
pub(crate) struct RawSqlite(pub Arc<Mutex<rusqlite::Connection>>);

impl RawSqlite {
    /// Opens `path` in WAL mode, as the adapter does.
    pub(crate) fn open(path: &std::path::Path) -> Result<Self, BoxError> {
        let c = rusqlite::Connection::open(path)?;
        c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")?;
        c.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(RawSqlite(Arc::new(Mutex::new(c))))
    }
}

fn sqlite_product(r: &rusqlite::Row<'_>) -> rusqlite::Result<Product> {
    Ok(Product {
        id: r.get(0)?,
        name: r.get(1)?,
        price: r.get(2)?,
        payload: r.get(3)?,
    })
}

#[async_trait]
impl RawDb for RawSqlite {
    async fn setup(&self, table: &str) -> Result<(), BoxError> {
        self.0.lock().expect("lock").execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS \"{table}\" (id INTEGER PRIMARY KEY, name TEXT NOT NULL, \
             price REAL NOT NULL, payload TEXT NOT NULL) STRICT"
        ))?;
        Ok(())
    }
    async fn get(&self, table: &str, id: i64) -> Result<Option<Product>, BoxError> {
        let c = self.0.lock().expect("lock");
        let mut s = c.prepare_cached(&format!(
            "SELECT id, name, price, payload FROM \"{table}\" WHERE id = ?1"
        ))?;
        let mut rows = s.query([id])?;
        Ok(match rows.next()? {
            Some(r) => Some(sqlite_product(r)?),
            None => None,
        })
    }
    async fn scan(&self, table: &str, after: i64, limit: usize) -> Result<Vec<Product>, BoxError> {
        let c = self.0.lock().expect("lock");
        let mut s = c.prepare_cached(&format!(
            "SELECT id, name, price, payload FROM \"{table}\" WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))?;
        let mut rows = s.query(rusqlite::params![after, limit as i64])?;
        let mut out = Vec::with_capacity(limit);
        while let Some(r) = rows.next()? {
            out.push(sqlite_product(r)?);
        }
        Ok(out)
    }
    async fn upsert(&self, table: &str, p: &Product) -> Result<(), BoxError> {
        let c = self.0.lock().expect("lock");
        c.prepare_cached(&format!(
            "INSERT INTO \"{table}\" (id, name, price, payload) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, price = excluded.price, payload = excluded.payload"
        ))?
        .execute(rusqlite::params![p.id, p.name, p.price, p.payload])?;
        Ok(())
    }
    async fn upsert_many(&self, table: &str, ps: &[Product]) -> Result<(), BoxError> {
        let mut c = self.0.lock().expect("lock");
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut s = tx.prepare_cached(&format!(
                "INSERT INTO \"{table}\" (id, name, price, payload) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, price = excluded.price, payload = excluded.payload"
            ))?;
            for p in ps {
                s.execute(rusqlite::params![p.id, p.name, p.price, p.payload])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
    async fn update_price(
        &self,
        table: &str,
        id: i64,
        price: f64,
    ) -> Result<Option<Product>, BoxError> {
        let c = self.0.lock().expect("lock");
        let mut s = c.prepare_cached(&format!(
            "UPDATE \"{table}\" SET price = ?1 WHERE id = ?2 RETURNING id, name, price, payload"
        ))?;
        let mut rows = s.query(rusqlite::params![price, id])?;
        Ok(match rows.next()? {
            Some(r) => Some(sqlite_product(r)?),
            None => None,
        })
    }
    async fn delete(&self, table: &str, id: i64) -> Result<bool, BoxError> {
        let c = self.0.lock().expect("lock");
        let n = c
            .prepare_cached(&format!("DELETE FROM \"{table}\" WHERE id = ?1"))?
            .execute([id])?;
        Ok(n > 0)
    }
}

/// Redis through one `redis` multiplexed connection: every task's commands
/// pipelined on one socket, which is the fastest way `redis` offers (a pool
/// of connections is slower on one server). The response and connection
/// timeouts are those of the adapter (1 s), as a careful user keeps one.
pub(crate) struct RawRedis(redis::aio::MultiplexedConnection);

impl RawRedis {
    /// Connects to a `redis://` URL.
    pub(crate) async fn connect(url: &str) -> Result<Self, BoxError> {
        let client = redis::Client::open(url)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)));
        Ok(RawRedis(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        ))
    }
}

#[async_trait]
impl RawCache for RawRedis {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BoxError> {
        // `Bytes` takes over the reply's buffer without a copy.
        Ok(redis::cmd("GET")
            .arg(key)
            .query_async::<Option<Bytes>>(&mut self.0.clone())
            .await?)
    }
    async fn set(&self, key: &str, value: Bytes) -> Result<(), BoxError> {
        redis::cmd("SET")
            .arg(key)
            .arg(&value[..])
            .arg("EX")
            .arg(TTL_SECS)
            .exec_async(&mut self.0.clone())
            .await?;
        Ok(())
    }
    async fn set_many(&self, items: Vec<(String, Bytes)>) -> Result<(), BoxError> {
        // One pipeline: every SET written at once, one wait for the replies.
        let mut pipe = redis::pipe();
        for (k, v) in &items {
            pipe.cmd("SET")
                .arg(k)
                .arg(&v[..])
                .arg("EX")
                .arg(TTL_SECS)
                .ignore();
        }
        pipe.exec_async(&mut self.0.clone()).await?;
        Ok(())
    }
    async fn del(&self, key: &str) -> Result<(), BoxError> {
        redis::cmd("DEL")
            .arg(key)
            .exec_async(&mut self.0.clone())
            .await?;
        Ok(())
    }
    async fn used_memory(&self) -> Result<Option<u64>, BoxError> {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.0.clone())
            .await?;
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok()))
    }
}

/// A Redis Cluster through redis-rs's async cluster connection, the client
/// the adapter is built on: GET, SET and DEL routed by slot, and the SETs
/// of a batch sent at once (a cluster pipeline cannot cross slots), as the
/// adapter does.
pub(crate) struct RawRedisCluster(redis::cluster_async::ClusterConnection);

impl RawRedisCluster {
    /// Connects to the seeds of a `redis+cluster://h1:p1,h2:p2` URL.
    pub(crate) async fn connect(url: &str) -> Result<Self, BoxError> {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let hosts = rest.split(['/', '?']).next().unwrap_or(rest);
        let seeds: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}/")).collect();
        let client = redis::cluster::ClusterClientBuilder::new(seeds)
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(1))
            .build()?;
        Ok(RawRedisCluster(client.get_async_connection().await?))
    }
}

#[async_trait]
impl RawCache for RawRedisCluster {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BoxError> {
        Ok(redis::cmd("GET")
            .arg(key)
            .query_async::<Option<Bytes>>(&mut self.0.clone())
            .await?)
    }
    async fn set(&self, key: &str, value: Bytes) -> Result<(), BoxError> {
        redis::cmd("SET")
            .arg(key)
            .arg(&value[..])
            .arg("EX")
            .arg(TTL_SECS)
            .exec_async(&mut self.0.clone())
            .await?;
        Ok(())
    }
    async fn set_many(&self, items: Vec<(String, Bytes)>) -> Result<(), BoxError> {
        let sets = items.iter().map(|(k, v)| {
            let mut conn = self.0.clone();
            async move {
                redis::cmd("SET")
                    .arg(k)
                    .arg(&v[..])
                    .arg("EX")
                    .arg(TTL_SECS)
                    .exec_async(&mut conn)
                    .await
            }
        });
        for r in futures::future::join_all(sets).await {
            r?;
        }
        Ok(())
    }
    async fn del(&self, key: &str) -> Result<(), BoxError> {
        redis::cmd("DEL")
            .arg(key)
            .exec_async(&mut self.0.clone())
            .await?;
        Ok(())
    }
}

/// Memcached through the bare pipelined meta-protocol client the adapter is
/// built on (`writethrough_memcached::raw::RawClient`): it measured the
/// fastest of the Rust clients against Redis (crates/memcached/README.md),
/// and using it here isolates what the adapter and the engine add. One
/// server, one connection (the adapter's default), no key checks.
pub(crate) struct RawMemcached(writethrough::memcached::raw::RawClient);

impl RawMemcached {
    /// A client of the first server of a `memcached://host:port[,...][?connections=N]`
    /// URL; several servers are refused (the raw client has no hashing).
    pub(crate) fn connect(url: &str) -> Result<Self, BoxError> {
        let rest = url
            .split_once("://")
            .map(|(_, r)| r)
            .ok_or_else(|| format!("{url:?} is not a memcached:// URL"))?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        if hosts.contains(',') {
            return Err("the raw memcached side speaks to one server only".into());
        }
        let mut connections = 1;
        for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            if k == "connections" {
                connections = v.parse()?;
            }
        }
        Ok(RawMemcached(writethrough::memcached::raw::RawClient::new(
            hosts,
            connections,
        )))
    }
}

#[async_trait]
impl RawCache for RawMemcached {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BoxError> {
        self.0.get(key).await
    }
    async fn set(&self, key: &str, value: Bytes) -> Result<(), BoxError> {
        // `set_many` of one item is one `ms` with a TTL, as `set` has none.
        self.0.set_many(&[(key, &value[..])], TTL_SECS).await
    }
    async fn set_many(&self, items: Vec<(String, Bytes)>) -> Result<(), BoxError> {
        self.0.set_many(&items, TTL_SECS).await
    }
    async fn del(&self, key: &str) -> Result<(), BoxError> {
        self.0.delete(key).await?;
        Ok(())
    }
}

/// The statements of one raw PostgreSQL table, built once.
struct PgSql {
    get: Arc<str>,
    upsert: Arc<str>,
    upsert_many: Arc<str>,
    update_price: Arc<str>,
    delete: Arc<str>,
}

impl PgSql {
    fn new(table: &str) -> Self {
        let cols = "id, name, price, payload";
        let set = "name = EXCLUDED.name, price = EXCLUDED.price, payload = EXCLUDED.payload";
        PgSql {
            get: format!("SELECT {cols} FROM \"{table}\" WHERE id = $1").into(),
            upsert: format!(
                "INSERT INTO \"{table}\" ({cols}) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO UPDATE SET {set}"
            )
            .into(),
            upsert_many: format!(
                "INSERT INTO \"{table}\" ({cols}) \
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::double precision[], $4::text[]) \
                 ON CONFLICT (id) DO UPDATE SET {set}"
            )
            .into(),
            update_price: format!(
                "UPDATE \"{table}\" SET price = $1 WHERE id = $2 RETURNING {cols}"
            )
            .into(),
            delete: format!("DELETE FROM \"{table}\" WHERE id = $1").into(),
        }
    }
}

type PgProduct = (i64, String, f64, String);

fn pg_product((id, name, price, payload): PgProduct) -> Product {
    Product {
        id,
        name,
        price,
        payload,
    }
}

/// PostgreSQL through an sqlx `PgPool`: prepared statements (sqlx prepares
/// each statement once per connection and caches it), one autocommit
/// statement per operation, the batch as one multi-row upsert over `UNNEST`
/// of typed arrays. The pool has the adapter's size and acquire timeout
/// (read from the same URL) and no ping before each acquire (sqlx's default
/// would add a round trip to every call; a careful user turns it off, and
/// the adapter does).
pub(crate) struct RawPostgres {
    pool: sqlx::PgPool,
    sql: RwLock<HashMap<String, Arc<PgSql>>>,
}

impl RawPostgres {
    /// Connects to a `postgres://` URL (the adapter's pool parameters apply).
    pub(crate) async fn connect(url: &str) -> Result<Self, BoxError> {
        let cfg = writethrough::postgres::PostgresConfig::from_url(url)?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .min_connections(cfg.min_connections)
            .acquire_timeout(cfg.acquire_timeout)
            .test_before_acquire(false)
            .connect_with(cfg.connect_options().clone())
            .await?;
        Ok(RawPostgres {
            pool,
            sql: RwLock::new(HashMap::new()),
        })
    }

    fn sql(&self, table: &str) -> Arc<PgSql> {
        if let Some(s) = self.sql.read().expect("lock").get(table) {
            return s.clone();
        }
        self.sql
            .write()
            .expect("lock")
            .entry(table.to_owned())
            .or_insert_with(|| Arc::new(PgSql::new(table)))
            .clone()
    }
}

#[async_trait]
impl RawDb for RawPostgres {
    async fn setup(&self, table: &str) -> Result<(), BoxError> {
        // The column types the adapter gives the engine's tables.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS \"{table}\" (id BIGINT PRIMARY KEY, name TEXT NOT NULL, \
             price DOUBLE PRECISION NOT NULL, payload TEXT NOT NULL)"
        )))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
    async fn get(&self, table: &str, id: i64) -> Result<Option<Product>, BoxError> {
        let sql = self.sql(table);
        Ok(
            sqlx::query_as::<_, PgProduct>(sqlx::AssertSqlSafe(sql.get.clone()))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .map(pg_product),
        )
    }
    async fn scan(&self, table: &str, after: i64, limit: usize) -> Result<Vec<Product>, BoxError> {
        Ok(sqlx::query_as::<_, PgProduct>(sqlx::AssertSqlSafe(format!(
            "SELECT id, name, price, payload FROM \"{table}\" WHERE id > $1 ORDER BY id LIMIT $2"
        )))
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(pg_product)
        .collect())
    }
    async fn upsert(&self, table: &str, p: &Product) -> Result<(), BoxError> {
        let sql = self.sql(table);
        sqlx::query(sqlx::AssertSqlSafe(sql.upsert.clone()))
            .bind(p.id)
            .bind(p.name.as_str())
            .bind(p.price)
            .bind(p.payload.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
    async fn upsert_many(&self, table: &str, ps: &[Product]) -> Result<(), BoxError> {
        let sql = self.sql(table);
        let ids: Vec<i64> = ps.iter().map(|p| p.id).collect();
        let names: Vec<&str> = ps.iter().map(|p| p.name.as_str()).collect();
        let prices: Vec<f64> = ps.iter().map(|p| p.price).collect();
        let payloads: Vec<&str> = ps.iter().map(|p| p.payload.as_str()).collect();
        sqlx::query(sqlx::AssertSqlSafe(sql.upsert_many.clone()))
            .bind(ids)
            .bind(names)
            .bind(prices)
            .bind(payloads)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
    async fn update_price(
        &self,
        table: &str,
        id: i64,
        price: f64,
    ) -> Result<Option<Product>, BoxError> {
        let sql = self.sql(table);
        Ok(
            sqlx::query_as::<_, PgProduct>(sqlx::AssertSqlSafe(sql.update_price.clone()))
                .bind(price)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .map(pg_product),
        )
    }
    async fn delete(&self, table: &str, id: i64) -> Result<bool, BoxError> {
        let sql = self.sql(table);
        let r = sqlx::query(sqlx::AssertSqlSafe(sql.delete.clone()))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }
}
