//! The raw side: what a careful user would write by hand with the drivers,
//! doing the same work as the engine (without its consistency machinery).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The benchmark's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

/// A database driver used directly.
#[async_trait]
pub(crate) trait RawDb: Send + Sync {
    /// Creates the table.
    async fn setup(&self, table: &str) -> Result<(), BoxError>;
    /// SELECT by key.
    async fn get(&self, table: &str, id: i64) -> Result<Option<Product>, BoxError>;
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

/// Moka used directly.
pub(crate) struct RawMoka(pub moka::future::Cache<String, Bytes>);

#[async_trait]
impl RawCache for RawMoka {
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
