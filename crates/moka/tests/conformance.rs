//! The shared cache suite (crates/testkit/src/suite/cache.rs) on Moka.

use std::sync::Arc;

use writethrough_moka::MokaCache;
use writethrough_sqlite::SqliteStore;
use writethrough_testkit::suite::{self, Pair};

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_cache_suite_passes_on_moka() {
    let db = SqliteStore::open_temporary().unwrap();
    let pair = Pair::new(Arc::new(MokaCache::default()), Arc::new(db));
    suite::assert_conformance("cache suite: moka", pair, suite::cache::cases()).await;
}
