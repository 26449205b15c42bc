//! writethrough-core: keep a cache and a database consistent by writing through.
//!
//! A write commits to the database first, then updates the cache; a read is
//! served from the cache and falls back to the database on a miss. This
//! crate holds the backend traits ([`CacheStore`], [`DbStore`],
//! [`Transaction`]), the [`Engine`] that implements the pattern on any pair
//! of them, the [`Error`] type, the cache entry [`codec`], and the rows and
//! typed [`Entity`] mapping.
//!
//! Adapters live in their own crates (`writethrough-moka`,
//! `writethrough-sqlite`, ...); most applications depend on the
//! `writethrough` facade crate instead of this one.

pub mod cache;
pub mod codec;
pub mod db;
mod engine;
mod entity;
mod error;
mod mapping;
mod schema;
mod value;

pub use cache::{CacheCapabilities, CacheItem, CacheStore, Fence, KeyRule};
pub use codec::Codec;
pub use db::{
    DbCapabilities, DbStore, OUTBOX_TABLE, OutboxEntry, Transaction, TxOptions, VERSION_COLUMN,
    Write, WriteOp, WriteOutcome,
};
#[cfg(feature = "test-hooks")]
pub use engine::Hooks;
pub use engine::{
    AuditReport, BreakerConfig, BreakerState, Config, Consistency, Engine, EngineBuilder, Handle,
    Health, HealthMonitor, HookPoint, Read, ReconcileReport, RetryPolicy, Stats, TableOptions, Tx,
    WriteOptions,
};
pub use entity::{Entity, Record};
pub use error::{Error, ErrorKind, Result, Status};
pub use mapping::{ColumnKind, KeyArg, KeyType};
pub use schema::{Column, ColumnType, Table, TableBuilder};
pub use value::{Ident, Key, MAX_IDENT_LEN, Patch, RESERVED_PREFIX, Row, Value, VersionedRow};
/// Derives [`Entity`] from a struct's fields; see the trait's documentation.
pub use writethrough_derive::Entity;

/// Re-exported so adapters implement the traits with the same macro version.
pub use async_trait::async_trait;

/// What `#[derive(Entity)]` expands to calls; not part of the API.
#[doc(hidden)]
pub mod __private {
    use crate::schema::{ColumnType, Table};

    /// The table of a derived entity: `(name, type, nullable, is_key)` per
    /// column. The derive checked every name at compile time by the rules
    /// [`Table::builder`] applies, and a key's type is always int or text.
    pub fn derived_table(name: &str, columns: &[(&str, ColumnType, bool, bool)]) -> Table {
        let mut b = Table::builder(name);
        for &(col, ty, nullable, key) in columns {
            b = match (key, nullable) {
                (true, _) => b.key(col, ty),
                (false, false) => b.column(col, ty),
                (false, true) => b.nullable(col, ty),
            };
        }
        b.build()
            .unwrap_or_else(|e| unreachable!("derive(Entity) checked this schema: {e}"))
    }
}
