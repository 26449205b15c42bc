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
    Health, HealthMonitor, HookPoint, ReconcileReport, RetryPolicy, Stats, TableOptions, Tx,
    WriteOptions,
};
pub use entity::{Entity, Record};
pub use error::{Error, ErrorKind, Result, Status};
pub use schema::{Column, ColumnType, Table, TableBuilder};
pub use value::{Ident, Key, MAX_IDENT_LEN, Patch, RESERVED_PREFIX, Row, Value, VersionedRow};

/// Re-exported so adapters implement the traits with the same macro version.
pub use async_trait::async_trait;
