//! Choosing backends at run time, from URLs.

use std::sync::Arc;

use writethrough_core::backend::{CacheStore, DbStore};
use writethrough_core::{Engine, EngineBuilder, Error, ErrorKind, Result};

fn scheme(url: &str) -> &str {
    url.split_once(':').map_or("", |(s, _)| s)
}

// Unused when every backend is built in.
#[allow(dead_code)]
fn not_built(what: &str, url: &str, feature: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        format!("{what} URL {url:?} needs the `{feature}` feature of the writethrough crate"),
    )
}

/// Opens the cache backend a URL names:
///
/// | URL                                         | backend (feature)        |
/// |---------------------------------------------|--------------------------|
/// | `moka://` or `moka://?max_bytes=67108864`   | in-process Moka (`moka`) |
/// | `redis://host:6379/0`, `rediss://`, `redis+unix:///path` | Redis (`redis`) |
/// | `redis+cluster://h1:6379,h2:6379`, `rediss+cluster://` | Redis Cluster (`redis`) |
/// | `memcached://h1:11211,h2:11211`             | Memcached (`memcached`)  |
pub async fn open_cache(url: &str) -> Result<Arc<dyn CacheStore>> {
    match scheme(url) {
        "moka" => {
            #[cfg(feature = "moka")]
            {
                let mut b = writethrough_moka::MokaCache::builder();
                if let Some((_, q)) = url.split_once('?') {
                    for (k, v) in q.split('&').filter_map(|kv| kv.split_once('=')) {
                        let n: u64 = v.parse().map_err(|_| {
                            Error::new(ErrorKind::Config, format!("{k}={v:?} is not a number"))
                        })?;
                        b = match k {
                            "max_bytes" => b.max_capacity_bytes(n),
                            "max_value_len" => {
                                b.max_value_len(usize::try_from(n).unwrap_or(usize::MAX))
                            }
                            _ => {
                                return Err(Error::new(
                                    ErrorKind::Config,
                                    format!("unknown moka option {k:?} (max_bytes, max_value_len)"),
                                ));
                            }
                        };
                    }
                }
                Ok(Arc::new(b.build()))
            }
            #[cfg(not(feature = "moka"))]
            Err(not_built("cache", url, "moka"))
        }
        "redis" | "rediss" | "redis+unix" | "unix" | "redis+cluster" | "rediss+cluster" => {
            #[cfg(feature = "redis")]
            {
                Ok(Arc::new(
                    writethrough_redis::RedisCache::connect(url).await?,
                ))
            }
            #[cfg(not(feature = "redis"))]
            Err(not_built("cache", url, "redis"))
        }
        "memcached" | "memcache" => {
            #[cfg(feature = "memcached")]
            {
                Ok(Arc::new(
                    writethrough_memcached::MemcachedCache::connect(url).await?,
                ))
            }
            #[cfg(not(feature = "memcached"))]
            Err(not_built("cache", url, "memcached"))
        }
        other => Err(Error::new(
            ErrorKind::Config,
            format!(
                "unknown cache URL scheme {other:?} in {url:?}: use moka://, redis:// or memcached://"
            ),
        )),
    }
}

/// Opens the database backend a URL names:
///
/// | URL                                      | backend (feature)      |
/// |------------------------------------------|------------------------|
/// | `sqlite://app.db`, `sqlite:///abs/app.db` | SQLite file (`sqlite`) |
/// | `sqlite::temp:`                           | SQLite in a temporary directory, removed on drop (`sqlite`) |
/// | `postgres://user@host/db`, `postgresql://` | PostgreSQL (`postgres`) |
pub async fn open_db(url: &str) -> Result<Arc<dyn DbStore>> {
    match scheme(url) {
        "sqlite" => {
            #[cfg(feature = "sqlite")]
            {
                let rest = &url["sqlite:".len()..];
                if rest == ":temp:" {
                    return Ok(Arc::new(writethrough_sqlite::SqliteStore::open_temporary()?));
                }
                let path = rest.strip_prefix("//").unwrap_or(rest);
                if path.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!("{url:?} names no file"),
                    ));
                }
                Ok(Arc::new(writethrough_sqlite::SqliteStore::open(path)?))
            }
            #[cfg(not(feature = "sqlite"))]
            Err(not_built("database", url, "sqlite"))
        }
        "postgres" | "postgresql" => {
            #[cfg(feature = "postgres")]
            {
                Ok(Arc::new(
                    writethrough_postgres::PostgresStore::connect(url).await?,
                ))
            }
            #[cfg(not(feature = "postgres"))]
            Err(not_built("database", url, "postgres"))
        }
        other => Err(Error::new(
            ErrorKind::Config,
            format!(
                "unknown database URL scheme {other:?} in {url:?}: use sqlite:// or postgres://"
            ),
        )),
    }
}

/// Opens a cache and a database from two URLs and returns an engine builder
/// over them, to configure and [`EngineBuilder::build`].
///
/// ```no_run
/// # async fn demo() -> writethrough::Result<()> {
/// let engine = writethrough::open("redis://127.0.0.1:6379", "postgres://app@db/app")
///     .await?
///     .namespace("shop")
///     .build()?;
/// # Ok(()) }
/// ```
pub async fn open(cache_url: &str, db_url: &str) -> Result<EngineBuilder> {
    let cache = open_cache(cache_url).await?;
    let db = open_db(db_url).await?;
    Ok(Engine::builder_dyn(cache, db))
}
