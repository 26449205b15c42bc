//! Backend pairs for the cross-backend tests.

use std::sync::Arc;

use writethrough::moka::MokaCache;
use writethrough::sqlite::SqliteStore;
use writethrough_testkit::suite::Pair;

/// Moka + SQLite (a fresh temporary database): no server needed.
pub fn embedded_pair() -> Pair {
    Pair::new(
        Arc::new(MokaCache::default()),
        Arc::new(SqliteStore::open_temporary().expect("a temporary SQLite database")),
    )
}
