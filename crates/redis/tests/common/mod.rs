//! Shared helpers of the Redis adapter's tests.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use bytes::Bytes;
use writethrough_core::backend::CacheItem;
use writethrough_core::backend::codec::{self, Codec};
use writethrough_core::{ColumnType, Row, Table};
use writethrough_redis::{RedisCache, RedisConfig};

pub use writethrough_testkit::server::RedisServer;

/// Starts a private redis-server, failing the test with its message if it cannot.
pub async fn server() -> RedisServer {
    match RedisServer::start().await {
        Ok(s) => s,
        Err(e) => panic!("cannot start redis-server: {e}"),
    }
}

/// A cache on `server` with short timeouts, so failure tests do not wait long.
pub async fn cache(server: &RedisServer) -> RedisCache {
    RedisCache::with_config(config(server))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", server.log()))
}

pub fn config(server: &RedisServer) -> RedisConfig {
    RedisConfig::from_url(server.url())
        .unwrap()
        .with_response_timeout(Duration::from_millis(500))
        .with_connection_timeout(Duration::from_millis(500))
}

/// A raw connection for looking at (and vandalising) what the adapter stored.
pub async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn table() -> Table {
    Table::builder("t")
        .key("id", ColumnType::Int)
        .column("name", ColumnType::Text)
        .build()
        .unwrap()
}

/// A real row entry at `version`.
pub fn entry(version: u64, name: &str) -> Bytes {
    entry_at(version, 0, name)
}

/// A row entry of `epoch`.
pub fn entry_at(version: u64, epoch: u64, name: &str) -> Bytes {
    let row = Row::new().set("id", 1).set("name", name);
    Codec::Json
        .encode(&table(), &row)
        .unwrap()
        .into_entry_at(version, epoch)
}

/// A row entry of exactly `len` bytes (at least the empty row's size).
pub fn entry_of_len(version: u64, len: usize) -> Bytes {
    let empty = entry(version, "").len();
    let e = entry(version, &"x".repeat(len.saturating_sub(empty)));
    assert_eq!(e.len(), len.max(empty));
    e
}

pub fn item(key: &str, entry: Bytes, ttl: Option<Duration>) -> CacheItem {
    let version = codec::entry_version(&entry).expect("a readable entry");
    CacheItem {
        key: key.to_owned(),
        entry,
        version,
        ttl,
    }
}

pub fn row_item(key: &str, version: u64) -> CacheItem {
    item(key, entry(version, "v"), None)
}

pub fn tomb_item(key: &str, version: u64) -> CacheItem {
    item(key, codec::tombstone(version), None)
}

/// The version stored under `key`, read through the codec.
pub fn version_of(bytes: Option<&Bytes>) -> Option<u64> {
    bytes.and_then(|b| codec::entry_version(b))
}
