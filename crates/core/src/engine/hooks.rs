//! Points inside the engine where a test can pause an operation to force an
//! interleaving. Compiled in only with the `test-hooks` feature; without it
//! the calls are empty and vanish.

/// Where an operation is when the hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[cfg_attr(not(feature = "test-hooks"), allow(unreachable_pub))]
pub enum HookPoint {
    /// A read missed and loaded its row from the database; it has not yet
    /// put it in the cache. (Races R2, R6.)
    AfterLoad,
    /// A write's transaction committed; its cache effect is not yet applied.
    /// (Races R1, R3, R5.)
    AfterCommit,
    /// A read is about to load from the database on a miss. (Race R7.)
    BeforeLoad,
    /// A read missed in the cache and is about to join or start a load. (Race R7.)
    Miss,
    /// A committed write passed its write deadline check and is about to
    /// send its cache effect. (The cache that forgets.)
    BeforeCacheWrite,
}

/// Called at every [`HookPoint`] with the cache key concerned.
#[cfg(feature = "test-hooks")]
#[async_trait::async_trait]
pub trait Hooks: Send + Sync + 'static {
    /// Runs at `point` for `key`; the operation waits until it returns.
    async fn at(&self, point: HookPoint, key: &str);
}
