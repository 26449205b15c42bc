//! # writethrough
//!
//! Keep a cache and a database consistent by writing through: a write
//! commits to the database first, then updates the cache; a read is served
//! from the cache and falls back to the database on a miss. Any cache
//! backend composes with any database backend, each behind a cargo feature:
//!
//! | feature     | backend                          |
//! |-------------|----------------------------------|
//! | `moka`      | Moka, an in-process cache        |
//! | `redis`     | Redis                            |
//! | `memcached` | Memcached, one or many servers   |
//! | `sqlite`    | SQLite                           |
//! | `postgres`  | PostgreSQL                       |
//!
//! ```
//! # #[cfg(all(feature = "moka", feature = "sqlite"))]
//! # #[tokio::main(flavor = "multi_thread")]
//! # async fn main() -> writethrough::Result<()> {
//! use serde::{Deserialize, Serialize};
//! use writethrough::{Engine, Entity, TableOptions};
//!
//! #[derive(Entity, Serialize, Deserialize, Debug, PartialEq)]
//! #[writethrough(table = "products")]
//! struct Product {
//!     #[writethrough(key)]
//!     id: i64,
//!     name: String,
//!     price: f64,
//! }
//!
//! let cache = writethrough::moka::MokaCache::default();
//! let db = writethrough::sqlite::SqliteStore::open_temporary()?;
//! let engine = Engine::builder(cache, db).build()?;
//! let products = engine.register::<Product>(TableOptions::new()).await?;
//!
//! products.put(&Product { id: 1, name: "pen".into(), price: 1.5 }).await?;
//! let pen = products.get(1).await?; // served from the cache; the key is an i64
//! assert_eq!(pen.map(|p| p.price), Some(1.5));
//! # Ok(()) }
//! # #[cfg(not(all(feature = "moka", feature = "sqlite")))] fn main() {}
//! ```

pub use writethrough_core::*;

#[cfg(feature = "memcached")]
pub use writethrough_memcached as memcached;
#[cfg(feature = "moka")]
pub use writethrough_moka as moka;
#[cfg(feature = "postgres")]
pub use writethrough_postgres as postgres;
#[cfg(feature = "redis")]
pub use writethrough_redis as redis;
#[cfg(feature = "sqlite")]
pub use writethrough_sqlite as sqlite;

mod open;
pub use open::{open, open_cache, open_db};
