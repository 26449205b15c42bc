//! The write-through engine.
//!
//! A write commits to the database first, then writes the cache; a read is
//! served from the cache and falls back to the database on a miss. The
//! mechanisms that make this safe under concurrency and faults are described
//! on [`Consistency`] and in the README's "Guarantees" section.

mod audit;
mod breaker;
mod config;
mod epoch;
mod external;
mod flight;
mod guarded;
mod handle;
mod hooks;
mod maintenance;
mod metrics;
mod monitor;
mod read;
mod shard;
mod stats;
mod table;
mod tx;
mod write;
pub(crate) use write::{CACHE_CHUNK_ITEMS, Effect};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

pub use audit::{
    AuditReport, AuditRun, Divergence, DivergenceKind, ExtraScan, Inspection, Verdict, WarmRun,
};
pub use breaker::BreakerState;
pub use config::{BreakerConfig, Config, Consistency, RetryPolicy};
pub use handle::{Handle, Read};
#[cfg(not(feature = "test-hooks"))]
pub(crate) use hooks::HookPoint;
#[cfg(feature = "test-hooks")]
pub use hooks::{HookPoint, Hooks};
pub use maintenance::ReconcileReport;
pub use metrics::{Health, HealthMonitor};
pub use monitor::{ConsistencyReport, MonitorConfig, SeenDivergence};
pub use stats::Stats;
pub use table::{TableOptions, WriteOptions};
pub use tx::{TableWrites, Tx, TxTable};

use crate::cache::{CacheCapabilities, CacheItem, CacheStore, Fence};
use crate::codec::{self, Payload};
use crate::db::{DbCapabilities, DbStore, TxOptions, Write, WriteOp, WriteOutcome};
use crate::entity::{Entity, Record};
use crate::error::{Error, ErrorKind, Result};
use crate::schema::Table;
use crate::value::{Key, Row, Value, VersionedRow};
use breaker::{Breaker, ResyncSet};
pub(crate) use flight::{Flights, Issue, Joined, LoadResult};
use metrics::{EngineMetrics, TableMetrics};
use stats::Counters;
use table::{TableState, Validator};

/// The write-through engine over one cache and one database.
///
/// Cheap to clone; clones share everything. Build one with
/// [`Engine::builder`], then register tables to get [`Handle`]s.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cache", &self.inner.cache_store.name())
            .field("db", &self.inner.db_store.name())
            .field("namespace", &self.inner.cfg.namespace)
            .finish()
    }
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    cache: Arc<dyn CacheStore>,
    db: Arc<dyn DbStore>,
    cfg: Config,
    #[cfg(feature = "test-hooks")]
    hooks: Option<Arc<dyn Hooks>>,
}

impl EngineBuilder {
    /// Replaces every setting.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// println!("cache timeout {:?}", engine.config().cache_timeout);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn config(mut self, cfg: Config) -> Self {
        self.cfg = cfg;
        self
    }

    /// Edits the settings in place.
    #[must_use]
    pub fn configure(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.cfg);
        self
    }

    /// The prefix of every cache key.
    #[must_use]
    pub fn namespace(mut self, ns: &str) -> Self {
        self.cfg.namespace = ns.to_owned();
        self
    }

    /// TTL of cached rows when neither call nor table sets one (`None`: no expiry).
    #[must_use]
    pub fn default_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.cfg.default_ttl = ttl;
        self
    }

    /// Which consistency mechanisms are on.
    #[must_use]
    pub fn consistency(mut self, c: Consistency) -> Self {
        self.cfg.consistency = c;
        self
    }

    /// Installs test hooks.
    #[cfg(feature = "test-hooks")]
    #[must_use]
    pub fn hooks(mut self, hooks: Arc<dyn Hooks>) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// Checks the settings against the backends and starts the engine's
    /// background work (resync, outbox replay). Must be called inside a Tokio runtime.
    pub fn build(self) -> Result<Engine> {
        self.cfg.check()?;
        let caps = self.cache.capabilities();
        let tombstone_ttl = caps.check_ttl(self.cfg.tombstone_ttl).map_err(|e| {
            Error::new(ErrorKind::Config, format!("tombstone_ttl: {}", e.message()))
        })?;
        let default_ttl = self
            .cfg
            .default_ttl
            .map(|t| check_ttl(&caps, &self.cfg, t))
            .transpose()
            .map_err(|e| Error::new(ErrorKind::Config, format!("default_ttl: {}", e.message())))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::new(
                ErrorKind::Config,
                "Engine::build must be called inside a Tokio runtime",
            )
        })?;
        let metrics = EngineMetrics::new(self.cache.name(), self.db.name());
        let monitor_cfg = self.cfg.monitor;
        let inner = Arc::new_cyclic(|weak| Inner {
            monitor: monitor_cfg.map(|m| monitor::Monitor::start(m, &runtime, weak.clone())),
            caps,
            db_caps: self.db.capabilities(),
            cache_store: self.cache,
            db_store: self.db,
            tombstone_ttl,
            default_ttl,
            tables: RwLock::new(HashMap::new()),
            flights: Flights::default(),
            breaker: Breaker::new(self.cfg.breaker),
            resync: ResyncSet::new(self.cfg.max_resync_keys),
            acks: Mutex::new(Vec::new()),
            epochs: epoch::Epochs::new(
                !caps.in_process && self.cfg.consistency.epochs,
                &self.cfg.namespace,
                self.cfg.epoch_check_interval,
            ),
            stats: Counters::default(),
            metrics,
            started: Instant::now(),
            health_mark: Mutex::new(metrics::HealthMark::new()),
            #[cfg(feature = "test-hooks")]
            hooks: self.hooks,
            background: Mutex::new(None),
            follower: Mutex::new(None),
            cfg: self.cfg,
        });
        let task = runtime.spawn(maintenance::run(Arc::downgrade(&inner)));
        *inner.background.lock() = Some(task);
        Ok(Engine { inner })
    }
}

pub(crate) struct Inner {
    /// The stores themselves: called only through `cache()` / `db()`
    /// (engine/guarded.rs), which guard every call.
    cache_store: Arc<dyn CacheStore>,
    db_store: Arc<dyn DbStore>,
    caps: CacheCapabilities,
    db_caps: DbCapabilities,
    cfg: Config,
    tombstone_ttl: Duration,
    default_ttl: Option<Duration>,
    tables: RwLock<HashMap<String, Arc<TableState>>>,
    flights: Flights,
    breaker: Breaker,
    resync: ResyncSet,
    /// Outbox records whose cache effect was applied, to remove in the next batch.
    acks: Mutex<Vec<Ack>>,
    epochs: epoch::Epochs,
    stats: Counters,
    metrics: EngineMetrics,
    started: Instant,
    health_mark: Mutex<metrics::HealthMark>,
    #[cfg(feature = "test-hooks")]
    hooks: Option<Arc<dyn Hooks>>,
    background: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The follower of writes made outside the engine, started with the
    /// first table that tracks them.
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The consistency monitor, when configured.
    monitor: Option<monitor::Monitor>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.background.lock().take() {
            task.abort();
        }
        if let Some(task) = self.follower.lock().take() {
            task.abort();
        }
    }
}

fn check_ttl(caps: &CacheCapabilities, cfg: &Config, ttl: Duration) -> Result<Duration> {
    let ttl = caps.check_ttl(ttl)?;
    if ttl < cfg.load_deadline {
        return Err(Error::new(
            ErrorKind::InvalidTtl,
            format!(
                "a TTL of {ttl:?} is shorter than the load deadline of {:?}: a slow read could \
                 outlive the entries that fence it (lower Config::load_deadline to allow it)",
                cfg.load_deadline
            ),
        ));
    }
    Ok(ttl)
}

impl Engine {
    /// Starts building an engine over `cache` and `db`.
    pub fn builder(cache: impl CacheStore, db: impl DbStore) -> EngineBuilder {
        Self::builder_dyn(Arc::new(cache), Arc::new(db))
    }

    /// Starts building an engine over backends chosen at run time.
    pub fn builder_dyn(cache: Arc<dyn CacheStore>, db: Arc<dyn DbStore>) -> EngineBuilder {
        EngineBuilder {
            cache,
            db,
            cfg: Config::default(),
            #[cfg(feature = "test-hooks")]
            hooks: None,
        }
    }

    /// Registers the table of entity `E` (creating it in the database unless
    /// told not to) and returns a typed handle to it.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// use writethrough_core::TableOptions;
    /// let products = engine.register::<Product>(TableOptions::new()).await?;
    /// products.put(&product(1, 1.5)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn register<E: Entity>(&self, opts: TableOptions<E>) -> Result<Handle<E>> {
        self.register_as(E::table(), opts).await
    }

    /// Registers entity `E` in `table` instead of `E::table()`: for one
    /// entity stored in several tables (see [`Table::renamed`]).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// use writethrough_core::{Entity, TableOptions};
    /// let table = Product::table().renamed("products_eu")?;
    /// let eu = engine.register_in::<Product>(table, TableOptions::new()).await?;
    /// eu.put(&product(1, 1.4)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn register_in<E: Entity>(
        &self,
        table: Table,
        opts: TableOptions<E>,
    ) -> Result<Handle<E>> {
        self.register_as(table, opts).await
    }

    /// Registers `table` for plain [`Row`]s.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// use writethrough_core::{ColumnType, Row, Table, TableOptions};
    /// let notes = Table::builder("notes")
    ///     .key("id", ColumnType::Int)
    ///     .column("text", ColumnType::Text)
    ///     .build()?;
    /// let notes = engine.register_table(notes, TableOptions::new()).await?;
    /// notes.put(&Row::new().set("id", 1).set("text", "hello")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn register_table(
        &self,
        table: Table,
        opts: TableOptions<Row>,
    ) -> Result<Handle<Row>> {
        self.register_as(table, opts).await
    }

    async fn register_as<R: Record>(
        &self,
        table: Table,
        opts: TableOptions<R>,
    ) -> Result<Handle<R>> {
        let inner = &self.inner;
        let ttl = opts
            .ttl
            .map(|t| check_ttl(&inner.caps, &inner.cfg, t))
            .transpose()
            .map_err(|e| e.with_operation("register"))?;
        if opts.create {
            inner.db().ensure_table(&table).await?;
        }
        let floor = if opts.external {
            inner
                .db()
                .track_external(&table)
                .await
                .map_err(|e| e.with_operation("register"))?
        } else {
            0
        };
        let (cache_if, ttl_fn) = opts.erase(&table);
        let st = Arc::new(TableState {
            prefix: format!("{}:{}:", inner.cfg.namespace, table.name()),
            metrics: TableMetrics::new(
                table.name().as_str(),
                inner.cache_store.name(),
                inner.db_store.name(),
            ),
            table,
            ttl,
            ttl_fn,
            cache_if,
            external: opts.external,
            floor: std::sync::atomic::AtomicU64::new(floor),
        });
        inner
            .tables
            .write()
            .insert(st.table.name().as_str().to_owned(), st.clone());
        if opts.external {
            external::start(&self.inner, st.table.name().as_str())
                .await
                .map_err(|e| e.with_operation("register"))?;
        }
        Ok(Handle::new(self.inner.clone(), st, opts.validate))
    }

    /// Opens a transaction scope: several writes in one database
    /// transaction, whose cache effects apply only after it commits.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let mut tx = engine.begin().await?;
    /// tx.put(&products, &product(1, 1.5)).await?;
    /// tx.put(&products, &product(2, 3.0)).await?;
    /// tx.commit().await?; // both or neither; the cache changes after the commit
    /// # Ok(()) }
    /// ```
    pub async fn begin(&self) -> Result<Tx> {
        self.inner.epoch_for_write().await;
        let opts = self.inner.tx_options();
        let tx = self.inner.db().begin(opts).await?;
        Ok(Tx::new(self.inner.clone(), tx))
    }

    /// What the engine did so far.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let s = engine.stats();
    /// println!("hits {} misses {}", s.hits, s.misses);
    /// # Ok(()) }
    /// ```
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot()
    }

    /// The cache circuit breaker's state.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// println!("breaker: {:?}", engine.breaker_state());
    /// # Ok(()) }
    /// ```
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// Throughput, latency percentiles, failure rates and breaker state
    /// over the window since the previous call (or since the start). The
    /// window is shared by every caller of this method; give each reader
    /// its own with [`Engine::health_monitor`].
    ///
    /// ```no_run
    /// # fn f(engine: writethrough_core::Engine) {
    /// let h = engine.health();
    /// println!("{:.0} ops/s, read p99 {:?}, cache failures {:.1}%",
    ///     h.throughput, h.read_p99, 100.0 * h.cache_failure_rate);
    /// # }
    /// ```
    pub fn health(&self) -> Health {
        self.health_over(&mut self.inner.health_mark.lock())
    }

    /// A health window of its own, for one reader of the health report.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let mut monitor = engine.health_monitor();
    /// // ... some time later: what happened since the monitor was made
    /// println!("{:?}", monitor.report());
    /// # Ok(()) }
    /// ```
    pub fn health_monitor(&self) -> HealthMonitor {
        let mut mark = metrics::HealthMark::new();
        // Its window starts now.
        self.inner.metrics.window(&mut mark);
        HealthMonitor {
            engine: self.clone(),
            mark,
        }
    }

    fn health_over(&self, mark: &mut metrics::HealthMark) -> Health {
        let inner = &self.inner;
        let (window, operations, [read_p50, read_p99, write_p50, write_p99], cache_rate, db_rate) =
            inner.metrics.window(mark);
        Health {
            breaker: inner.breaker.state(),
            breaker_trips: inner.breaker.times_opened(),
            pending_resync: inner.resync.len(),
            window,
            operations,
            throughput: operations as f64 / window.as_secs_f64().max(1e-9),
            read_p50,
            read_p99,
            write_p50,
            write_p99,
            cache_failure_rate: cache_rate,
            db_failure_rate: db_rate,
            uptime: inner.started.elapsed(),
            consistency: inner.monitor.as_ref().map(monitor::Monitor::report),
        }
    }

    /// How many times the breaker has opened.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// println!("the breaker opened {} times", engine.breaker_trips());
    /// # Ok(()) }
    /// ```
    pub fn breaker_trips(&self) -> u64 {
        self.inner.breaker.times_opened()
    }

    /// Keys waiting to be resynced into the cache.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// if engine.pending_resync() > 0 {
    ///     println!("some keys are read from the database until they are resynced");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn pending_resync(&self) -> usize {
        self.inner.resync.len()
    }

    /// Replays outbox records older than the grace period now, as the
    /// background reconciler does every `reconcile_interval`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let report = engine.reconcile().await?;
    /// println!("replayed {} outbox records", report.replayed);
    /// # Ok(()) }
    /// ```
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        self.inner.reconcile(self.inner.cfg.outbox_grace).await
    }

    /// Replays every outbox record now, however young: what an engine does
    /// when it starts, to repair what a crashed process left behind.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let report = engine.reconcile_all().await?;
    /// println!("replayed {} outbox records", report.replayed);
    /// # Ok(()) }
    /// ```
    pub async fn reconcile_all(&self) -> Result<ReconcileReport> {
        self.inner.reconcile(Duration::ZERO).await
    }

    /// Finishes what the background work would do later: removes the
    /// outbox records of writes whose cache effects applied, and resyncs
    /// the keys waiting for it. Call it before a short-lived program exits,
    /// so that it leaves no outbox records for others to replay.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// products.put(&product(1, 1.5)).await?;
    /// engine.flush().await?; // a short-lived program leaves no outbox records behind
    /// # Ok(()) }
    /// ```
    pub async fn flush(&self) -> Result<()> {
        self.inner.resync_pass().await;
        self.inner.flush_acks(true).await
    }

    /// Flushes (see [`Engine::flush`]) and stops the background work: no
    /// more epoch checks, resyncs, breaker probes, outbox replays or
    /// following of external writes from this engine. Call it last, when the program is done with the
    /// engine; reads and writes still work after it, but what a failed
    /// cache write leaves is then repaired only by other engines' outbox
    /// replays. Returns the flush's error, if any, after stopping.
    ///
    /// ```no_run
    /// # async fn demo(engine: writethrough_core::Engine) -> writethrough_core::Result<()> {
    /// engine.shutdown().await?;
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self) -> Result<()> {
        let flushed = self.flush().await;
        if let Some(m) = &self.inner.monitor {
            m.stop();
        }
        let task = self.inner.background.lock().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        let follower = self.inner.follower.lock().take();
        if let Some(task) = follower {
            task.abort();
            let _ = task.await;
        }
        flushed
    }

    /// Resyncs every key waiting for it, if the cache answers; returns how many are left.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let left = engine.resync_now().await;
    /// println!("{left} keys still waiting for the cache");
    /// # Ok(()) }
    /// ```
    pub async fn resync_now(&self) -> usize {
        self.inner.resync_pass().await;
        self.inner.resync.len()
    }

    /// The cache epoch this engine prepares entries in (0 for an
    /// in-process cache, or before the first check). See
    /// [`Consistency::epochs`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// println!("epoch {}", engine.cache_epoch());
    /// # Ok(()) }
    /// ```
    pub fn cache_epoch(&self) -> u64 {
        self.inner.epochs.current()
    }

    /// Checks the cache's epoch record and identity now, as the background
    /// task does every `epoch_check_interval`, and returns the epoch.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// let epoch = engine.check_cache_epoch().await?;
    /// println!("epoch {epoch}");
    /// # Ok(()) }
    /// ```
    pub async fn check_cache_epoch(&self) -> Result<u64> {
        if self.inner.epochs.watched {
            self.inner.check_epoch().await?;
        }
        Ok(self.inner.epochs.current())
    }

    /// The settings.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// println!("cache timeout {:?}", engine.config().cache_timeout);
    /// # Ok(()) }
    /// ```
    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// The cache backend's name (`"redis"`, `"moka"`, ...).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// println!("{} over {}", engine.cache_name(), engine.db_name());
    /// # Ok(()) }
    /// ```
    pub fn cache_name(&self) -> &'static str {
        self.inner.cache_store.name()
    }

    /// The database backend's name (`"postgres"`, `"sqlite"`).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// println!("{} over {}", engine.cache_name(), engine.db_name());
    /// # Ok(()) }
    /// ```
    pub fn db_name(&self) -> &'static str {
        self.inner.db_store.name()
    }

    /// The cache backend itself. Calls on it bypass the engine — no fence,
    /// no epoch, no breaker — so an application that writes through it can
    /// break every guarantee; it is for tests and tools that inspect or
    /// damage the cache on purpose.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// // A test that damages the cache behind the engine's back:
    /// let ck = products.cache_key(1)?;
    /// engine.raw_cache().delete(&ck).await?;
    /// # Ok(()) }
    /// ```
    pub fn raw_cache(&self) -> &Arc<dyn CacheStore> {
        &self.inner.cache_store
    }

    /// The database backend itself; see [`Engine::raw_cache`] for why an
    /// application does not write through it.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use writethrough_core::__doc::{Product, product};
    /// # async fn demo(
    /// #     engine: writethrough_core::Engine,
    /// #     products: writethrough_core::Handle<Product>,
    /// # ) -> writethrough_core::Result<()> {
    /// # let _ = (&engine, &products, product(0, 0.0));
    /// println!("database: {}", engine.raw_db().name());
    /// # Ok(()) }
    /// ```
    pub fn raw_db(&self) -> &Arc<dyn DbStore> {
        &self.inner.db_store
    }
}

/// An outbox record whose cache effect was applied, waiting to be removed.
pub(crate) struct Ack {
    pub(crate) id: i64,
    pub(crate) at: Instant,
}

/// How often a reader that joined a load too late tries again before
/// reading the database alone.
const MAX_LATE_JOINS: usize = 3;

/// What a cache lookup found.
pub(crate) enum Lookup<R> {
    /// A readable row.
    Hit(R),
    /// Nothing usable; the bytes found if they were not a readable entry.
    Miss(Option<Bytes>),
}

impl Inner {
    #[cfg(feature = "test-hooks")]
    async fn hook(&self, point: HookPoint, key: &str) {
        if let Some(h) = &self.hooks {
            h.at(point, key).await;
        }
    }

    #[cfg(not(feature = "test-hooks"))]
    #[inline(always)]
    async fn hook(&self, _: HookPoint, _: &str) {}

    /// The database options of this engine's writes.
    pub(crate) fn tx_options(&self) -> TxOptions {
        TxOptions::with_outbox(self.cfg.consistency.outbox).fenced(self.cfg.consistency.fence)
    }

    fn table_state(&self, name: &str) -> Option<Arc<TableState>> {
        self.tables.read().get(name).cloned()
    }
}
