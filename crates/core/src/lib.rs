//! writethrough-core: keep a cache and a database consistent by writing through.
//!
//! A write commits to the database first, then updates the cache; a read is
//! served from the cache and falls back to the database on a miss. This
//! crate holds the [`Engine`] that implements the pattern on any pair of
//! backends, the typed [`Entity`] mapping and rows, the [`Error`] type, and,
//! apart in [`backend`], the interface adapters implement
//! ([`backend::CacheStore`], [`backend::DbStore`], [`backend::Transaction`])
//! with the cache entry [`codec`].
//!
//! Adapters live in their own crates (`writethrough-moka`,
//! `writethrough-sqlite`, ...); most applications depend on the
//! `writethrough` facade crate instead of this one.

mod engine;
mod entity;
mod error;
mod mapping;
mod schema;
mod value;

mod cache;
/// The cache entry format; reach it as [`backend::codec`].
#[doc(hidden)]
pub mod codec;
mod db;
pub use codec::Codec;
pub use engine::{
    AuditReport, AuditRun, BreakerConfig, BreakerState, Config, Consistency, Engine, EngineBuilder,
    Handle, Health, HealthMonitor, Read, ReconcileReport, RetryPolicy, Stats, TableOptions,
    TableWrites, Tx, TxTable, WriteOptions,
};
pub use engine::{
    ConsistencyReport, Divergence, DivergenceKind, ExtraScan, Inspection, MonitorConfig,
    SeenDivergence, Verdict, WarmRun,
};
#[cfg(feature = "test-hooks")]
pub use engine::{HookPoint, Hooks};
pub use entity::{Entity, Record};
pub use error::{Error, ErrorKind, Result, Status};
pub use mapping::{ColumnKind, KeyArg, KeyType};
pub use schema::{Column, ColumnType, Table, TableBuilder};
pub use value::{Ident, Key, MAX_IDENT_LEN, Patch, RESERVED_PREFIX, Row, Value, VersionedRow};
/// Derives [`Entity`] from a struct's fields; see the trait's documentation.
pub use writethrough_derive::Entity;

/// The adapter interface: what a cache or database backend implements,
/// and the types the engine hands it. Applications use the engine and
/// never call a backend directly (that would bypass the fences); adapter
/// authors start here (see CONTRIBUTING.md, "Adding a backend").
pub mod backend {
    pub use crate::cache::{
        CacheCapabilities, CacheItem, CacheStore, DecodedSlot, Fence, KeyRule, ScanCursor, ScanPage,
    };
    pub use crate::codec;
    pub use crate::db::{
        Bells, CHANGES_TABLE, ChangePage, ChangeRange, DbCapabilities, DbStore, ExternalChange,
        OUTBOX_TABLE, OutboxEntry, OutboxSummary, Transaction, TxOptions, VERSION_COLUMN,
        WeakBells, Write, WriteOp, WriteOutcome,
    };
    /// Re-exported so adapters implement the traits with the same macro version.
    pub use async_trait::async_trait;
}

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

/// The entity the API's doc examples use; not part of the API.
#[doc(hidden)]
pub mod __doc {
    use serde::{Deserialize, Serialize};

    /// A product of the doc examples.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, crate::Entity)]
    #[writethrough(table = "products", crate = "crate")]
    pub struct Product {
        /// The key.
        pub id: i64,
        /// Its name.
        pub name: String,
        /// Its price.
        pub price: f64,
    }

    /// A product with key `id`.
    pub fn product(id: i64, price: f64) -> Product {
        Product {
            id,
            name: format!("product {id}"),
            price,
        }
    }
}
