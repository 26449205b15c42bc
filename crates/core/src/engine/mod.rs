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
mod flight;
mod handle;
mod hooks;
mod maintenance;
mod metrics;
mod read;
mod shard;
mod stats;
mod table;
mod tx;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

pub use audit::AuditReport;
pub use breaker::BreakerState;
pub use config::{BreakerConfig, Config, Consistency, RetryPolicy};
pub use handle::{Handle, Read};
#[cfg(not(feature = "test-hooks"))]
pub(crate) use hooks::HookPoint;
#[cfg(feature = "test-hooks")]
pub use hooks::{HookPoint, Hooks};
pub use maintenance::ReconcileReport;
pub use metrics::{Health, HealthMonitor};
pub use stats::Stats;
pub use table::{TableOptions, WriteOptions};
pub use tx::Tx;

use crate::cache::{CacheCapabilities, CacheItem, CacheStore, Fence};
use crate::codec::{self, Payload};
use crate::db::{DbCapabilities, DbStore, TxOptions, Write, WriteOp, WriteOutcome};
use crate::entity::{Entity, Record};
use crate::error::{Error, ErrorKind, Result};
use crate::schema::Table;
use crate::value::{Key, Row, Value, VersionedRow};
use breaker::{Breaker, ResyncSet};
pub(crate) use flight::{Flights, Issue, Joined, LoadResult};
pub(crate) use metrics::{CacheCall, DbCall};
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
            .field("cache", &(*self.inner.cache).name())
            .field("db", &(*self.inner.db).name())
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
        let caps = (*self.cache).capabilities();
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
        let metrics = EngineMetrics::new((*self.cache).name(), (*self.db).name());
        let inner = Arc::new(Inner {
            caps,
            db_caps: (*self.db).capabilities(),
            cache: self.cache,
            db: self.db,
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
            cfg: self.cfg,
        });
        let task = runtime.spawn(maintenance::run(Arc::downgrade(&inner)));
        *inner.background.lock() = Some(task);
        Ok(Engine { inner })
    }
}

pub(crate) struct Inner {
    cache: Arc<dyn CacheStore>,
    db: Arc<dyn DbStore>,
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
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.background.lock().take() {
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
            inner
                .db_call(DbCall::EnsureTable, (*inner.db).ensure_table(&table))
                .await?;
        }
        let (cache_if, ttl_fn) = opts.erase(&table);
        let st = Arc::new(TableState {
            prefix: format!("{}:{}:", inner.cfg.namespace, table.name()),
            metrics: TableMetrics::new(
                table.name().as_str(),
                (*inner.cache).name(),
                (*inner.db).name(),
            ),
            table,
            ttl,
            ttl_fn,
            cache_if,
        });
        inner
            .tables
            .write()
            .insert(st.table.name().as_str().to_owned(), st.clone());
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
        let tx = self
            .inner
            .db_call(DbCall::Begin, (*self.inner.db).begin(opts))
            .await?;
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
    /// more epoch checks, resyncs, breaker probes or outbox replays from
    /// this engine. Call it last, when the program is done with the
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
        let task = self.inner.background.lock().take();
        if let Some(task) = task {
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
        (*self.inner.cache).name()
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
        (*self.inner.db).name()
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
        &self.inner.cache
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
        &self.inner.db
    }
}

/// An outbox record whose cache effect was applied, waiting to be removed.
pub(crate) struct Ack {
    pub(crate) id: i64,
    pub(crate) at: Instant,
}

/// A write ready to go: checked, encoded, with its cache key and TTL.
pub(crate) struct Prepared {
    pub(crate) key: Key,
    pub(crate) cache_key: String,
    pub(crate) row: Row,
    /// The encoded row if it is to be cached; `None` invalidates instead.
    pub(crate) payload: Option<Payload>,
    pub(crate) ttl: Option<Duration>,
}

/// Most effects in one cache call, and most entry bytes: a pipeline of
/// 100,000 fenced writes outlasts any timeout (and the breaker never learns
/// why), while a few hundred cost one round trip like one write.
const CACHE_CHUNK_ITEMS: usize = 500;
const CACHE_CHUNK_BYTES: usize = 4 << 20;

/// Splits effects into runs of at most [`CACHE_CHUNK_ITEMS`] effects and
/// about [`CACHE_CHUNK_BYTES`] of entries (a single larger entry is a run
/// of its own).
fn cache_chunks(effects: &[Effect]) -> impl Iterator<Item = &[Effect]> {
    let mut rest = effects;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len() && n < CACHE_CHUNK_ITEMS {
            bytes += match &rest[n].kind {
                EffectKind::Put(entry, _) => entry.len(),
                _ => codec::HEADER_LEN,
            };
            if n > 0 && bytes > CACHE_CHUNK_BYTES {
                break;
            }
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// How often a reader that joined a load too late tries again before
/// reading the database alone.
const MAX_LATE_JOINS: usize = 3;

/// How often `invalidate` looks again when the entry changed under it.
const INVALIDATE_ATTEMPTS: usize = 5;

/// What a cache lookup found.
pub(crate) enum Lookup<R> {
    /// A readable row.
    Hit(R),
    /// Nothing usable; the bytes found if they were not a readable entry.
    Miss(Option<Bytes>),
}

/// What a committed write does to the cache.
pub(crate) enum EffectKind {
    /// Store this entry.
    Put(Bytes, Option<Duration>),
    /// The row exists at the write's version but is not to be cached: an
    /// invalidation marker when fenced, which lets a later read cache it.
    Invalidate,
    /// There is no row as of the write's version: a tombstone when fenced.
    Tombstone,
}

pub(crate) struct Effect {
    pub(crate) cache_key: String,
    pub(crate) key: Key,
    pub(crate) table: Arc<TableState>,
    pub(crate) version: u64,
    /// The cache epoch known before the write committed.
    pub(crate) epoch: u64,
    pub(crate) kind: EffectKind,
    pub(crate) outbox_id: Option<i64>,
}

/// Marks keys for resync if dropped while armed: a write cancelled between
/// its commit and its cache write, or during a commit whose outcome is
/// therefore unknown, still gets its cache entry repaired.
pub(crate) struct ResyncGuard<'a> {
    inner: &'a Inner,
    keys: Vec<(String, Arc<TableState>, Key)>,
}

impl ResyncGuard<'_> {
    pub(crate) fn disarm(mut self) {
        self.keys.clear();
    }

    /// Settles the guard for a commit that failed with `e`, and hands `e`
    /// back: a commit known not to have happened wrote nothing to repair;
    /// one in doubt marks its keys (the guard is dropped armed).
    pub(crate) fn failed(self, e: Error) -> Error {
        if !e.is_in_doubt() {
            self.disarm();
        }
        e
    }
}

impl Drop for ResyncGuard<'_> {
    fn drop(&mut self) {
        for (ck, st, key) in self.keys.drain(..) {
            self.inner.flights.forget(&ck);
            self.inner.resync.mark(&ck, &st, key.clone(), 0);
        }
    }
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

    pub(crate) fn guard(&self, mut keys: Vec<(String, Arc<TableState>, Key)>) -> ResyncGuard<'_> {
        if !self.cfg.consistency.resync {
            keys.clear();
        }
        ResyncGuard { inner: self, keys }
    }

    /// Runs a cache call under the cache timeout, feeding the breaker and the metrics.
    async fn cache_call<T>(
        &self,
        call: CacheCall,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let r = if self.caps.in_process {
            // In-process calls cannot stall on a network: no timeout, and no
            // clock reads (they would cost as much as the call itself).
            let r = f.await;
            self.metrics.cache_call(call, None, r.is_ok());
            r
        } else {
            let started = Instant::now();
            let r = match tokio::time::timeout(self.cfg.cache_timeout, f).await {
                Ok(r) => r,
                Err(_) => Err(Error::new(
                    ErrorKind::Timeout,
                    format!("no answer within {:?}", self.cfg.cache_timeout),
                )),
            };
            self.metrics
                .cache_call(call, Some(started.elapsed()), r.is_ok());
            r
        };
        match r {
            Ok(v) => {
                self.breaker.record_success();
                Ok(v)
            }
            Err(e) => {
                Counters::add(&self.stats.cache_errors, 1);
                if e.is_temporary() && self.breaker.record_failure() {
                    self.metrics.breaker_trips.increment(1);
                    self.metrics.breaker_state.set(2.0);
                }
                Err(e
                    .with_operation(call.name())
                    .with_backend((*self.cache).name()))
            }
        }
    }

    /// Runs a database call under the database timeout. A timeout leaves the
    /// outcome of a write unknown, so it is marked in doubt.
    pub(crate) async fn db_call<T>(
        &self,
        call: DbCall,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let r = match tokio::time::timeout(self.cfg.db_timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("no answer within {:?}", self.cfg.db_timeout),
            )
            .in_doubt()),
        };
        self.metrics.db_call(call, started.elapsed(), r.is_ok());
        r.map_err(|e| {
            Counters::add(&self.stats.db_errors, 1);
            e.with_operation(call.name())
                .with_backend((*self.db).name())
        })
    }

    fn table_state(&self, name: &str) -> Option<Arc<TableState>> {
        self.tables.read().get(name).cloned()
    }

    /// Checks everything about a write that can be checked without a side effect.
    pub(crate) fn prepare<R: Record>(
        &self,
        st: &TableState,
        validate: Option<&Validator<R>>,
        record: &R,
        opts: &crate::engine::WriteOptions,
    ) -> Result<Prepared> {
        let (key, row) = st.table.normalize_row(record.to_row()?)?;
        let cache_key = st.cache_key(&key);
        self.caps.check_key(&cache_key)?;
        self.check_db_values(row.iter().map(|(_, v)| v))?;
        if let Some(v) = validate {
            v(record).map_err(|m| Error::new(ErrorKind::Validation, m))?;
        }
        let call_ttl = opts
            .ttl
            .map(|t| check_ttl(&self.caps, &self.cfg, t))
            .transpose()?;
        let (payload, ttl) = if !opts.skip_cache && st.caches(&row) {
            let ttl = self.resolve_ttl(st, &row, call_ttl)?;
            let payload = self.cfg.codec.encode(&st.table, &row)?;
            self.caps.check_value_len(payload.entry_len())?;
            (Some(payload), ttl)
        } else {
            (None, None)
        };
        Ok(Prepared {
            key,
            cache_key,
            row,
            payload,
            ttl,
        })
    }

    fn resolve_ttl(
        &self,
        st: &TableState,
        row: &Row,
        call: Option<Duration>,
    ) -> Result<Option<Duration>> {
        if call.is_some() {
            return Ok(call);
        }
        if let Some(f) = &st.ttl_fn
            && let Some(t) = f(row)
        {
            return check_ttl(&self.caps, &self.cfg, t).map(Some);
        }
        Ok(st.ttl.or(self.default_ttl))
    }

    pub(crate) fn check_db_values<'v>(
        &self,
        values: impl Iterator<Item = &'v Value>,
    ) -> Result<()> {
        if self.db_caps.text_allows_nul {
            return Ok(());
        }
        for v in values {
            let has_nul = match v {
                Value::Text(s) => s.contains('\0'),
                Value::Json(j) => j.to_string().contains("\\u0000"),
                _ => false,
            };
            if has_nul {
                return Err(Error::new(
                    ErrorKind::InvalidValue,
                    format!(
                        "{} cannot store text containing a NUL byte",
                        (*self.db).name()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks a key for `st` and returns its cache key.
    pub(crate) fn key_for(&self, st: &TableState, key: &Key) -> Result<String> {
        st.table.check_key(key)?;
        let ck = st.cache_key(key);
        self.caps.check_key(&ck)?;
        Ok(ck)
    }

    /// Upserts the prepared rows in one transaction, then applies their cache effects.
    pub(crate) async fn commit_upserts(
        &self,
        st: &Arc<TableState>,
        prepared: Vec<Prepared>,
    ) -> Result<Vec<WriteOutcome>> {
        let opts = self.tx_options();
        self.commit_prepared(st, prepared, |writes| {
            self.db_call(DbCall::Execute, (*self.db).execute(writes, opts))
        })
        .await
    }

    /// Inserts one prepared row that must not exist yet: in a transaction
    /// that takes the key's lock and reads it first, so that two inserts of
    /// one key cannot both succeed. A row already there is a `Conflict`.
    pub(crate) async fn commit_insert(
        &self,
        st: &Arc<TableState>,
        prepared: Prepared,
    ) -> Result<WriteOutcome> {
        let opts = self.tx_options();
        let mut out = self
            .commit_prepared(st, vec![prepared], |writes| {
                self.db_call(DbCall::Execute, (*self.db).insert(writes, opts))
            })
            .await?;
        out.pop()
            .ok_or_else(|| Error::new(ErrorKind::Backend, "the database returned no outcome"))
    }

    /// Commits the prepared rows with `run` (given their writes), then
    /// applies their cache effects.
    async fn commit_prepared<F>(
        &self,
        st: &Arc<TableState>,
        mut prepared: Vec<Prepared>,
        run: impl FnOnce(Vec<Write>) -> F,
    ) -> Result<Vec<WriteOutcome>>
    where
        F: Future<Output = Result<Vec<WriteOutcome>>>,
    {
        let writes = prepared
            .iter_mut()
            .map(|p| Write {
                table: st.table.clone(),
                op: WriteOp::Upsert(std::mem::take(&mut p.row)),
            })
            .collect();
        let guard = self.guard(
            prepared
                .iter()
                .map(|p| (p.cache_key.clone(), st.clone(), p.key.clone()))
                .collect(),
        );
        let epoch = self.epoch_for_write().await;
        let outcomes = match run(writes).await {
            Ok(o) => o,
            Err(e) => return Err(guard.failed(e)),
        };
        Counters::add(&self.stats.writes, outcomes.len() as u64);
        let effects = prepared
            .into_iter()
            .zip(&outcomes)
            .map(|(p, o)| {
                let kind = match p.payload {
                    Some(payload) => {
                        EffectKind::Put(payload.into_entry_at(o.version, epoch), p.ttl)
                    }
                    None => EffectKind::Invalidate,
                };
                Effect {
                    cache_key: p.cache_key,
                    key: p.key,
                    table: st.clone(),
                    version: o.version,
                    epoch,
                    kind,
                    outbox_id: o.outbox_id,
                }
            })
            .collect();
        self.apply_effects(effects, guard).await;
        Ok(outcomes)
    }

    /// Commits one update or delete of `key` under a resync guard, then
    /// applies its cache effect (see [`Inner::effect_of`]).
    pub(crate) async fn commit_one(
        &self,
        st: &Arc<TableState>,
        key: Key,
        cache_key: String,
        commit: impl Future<Output = Result<WriteOutcome>>,
    ) -> Result<WriteOutcome> {
        let shown = cache_key.clone();
        let mut out = self
            .commit_many(st, vec![(key, cache_key)], async {
                commit.await.map(|o| vec![o])
            })
            .await
            .map_err(|e| e.with_key(&shown))?;
        out.pop()
            .ok_or_else(|| Error::new(ErrorKind::Backend, "the database returned no outcome"))
    }

    /// Commits updates or deletes of `keys` (one outcome per key, in order)
    /// under a resync guard, then applies their cache effects.
    pub(crate) async fn commit_many(
        &self,
        st: &Arc<TableState>,
        keys: Vec<(Key, String)>,
        commit: impl Future<Output = Result<Vec<WriteOutcome>>>,
    ) -> Result<Vec<WriteOutcome>> {
        let guard = self.guard(
            keys.iter()
                .map(|(k, ck)| (ck.clone(), st.clone(), k.clone()))
                .collect(),
        );
        let epoch = self.epoch_for_write().await;
        let outcomes = match commit.await {
            Ok(o) if o.len() == keys.len() => o,
            Ok(_) => {
                let e = Error::new(ErrorKind::Backend, "the database returned too few outcomes");
                return Err(guard.failed(e.in_doubt()));
            }
            Err(e) => return Err(guard.failed(e)),
        };
        Counters::add(&self.stats.writes, outcomes.len() as u64);
        let effects = keys
            .into_iter()
            .zip(&outcomes)
            .map(|((key, ck), o)| self.effect_of(st, key, ck, o, epoch))
            .collect();
        self.apply_effects(effects, guard).await;
        Ok(outcomes)
    }

    /// The cache effect of an update or delete, from its outcome.
    pub(crate) fn effect_of(
        &self,
        st: &Arc<TableState>,
        key: Key,
        cache_key: String,
        o: &WriteOutcome,
        epoch: u64,
    ) -> Effect {
        let kind = match &o.row {
            Some(row) if st.caches(row) => match self.entry_for(st, row, o.version, epoch) {
                Some((entry, ttl)) => EffectKind::Put(entry, ttl),
                None => EffectKind::Invalidate,
            },
            Some(_) => EffectKind::Invalidate,
            None => EffectKind::Tombstone,
        };
        Effect {
            cache_key,
            key,
            table: st.clone(),
            version: o.version,
            epoch,
            kind,
            outbox_id: o.outbox_id,
        }
    }

    /// The cache entry for a row read back from the database, or `None` when
    /// it cannot be cached (too large, or a computed TTL the cache refuses).
    fn entry_for(
        &self,
        st: &TableState,
        row: &Row,
        version: u64,
        epoch: u64,
    ) -> Option<(Bytes, Option<Duration>)> {
        let ttl = self.resolve_ttl(st, row, None).ok()?;
        let payload = self.cfg.codec.encode(&st.table, row).ok()?;
        self.caps.check_value_len(payload.entry_len()).ok()?;
        Some((payload.into_entry_at(version, epoch), ttl))
    }

    /// Applies committed writes' cache effects, retrying transient failures;
    /// what still fails is remembered for resync. Never fails: the writes
    /// are committed and acknowledged whatever the cache does.
    pub(crate) async fn apply_effects(&self, effects: Vec<Effect>, guard: ResyncGuard<'_>) {
        self.flights
            .forget_all(effects.iter().map(|e| e.cache_key.as_str()));
        for e in &effects {
            self.hook(HookPoint::AfterCommit, &e.cache_key).await;
        }
        if effects.is_empty() {
            guard.disarm();
            return;
        }
        let committed = self.epochs.watched.then(Instant::now);
        for e in &effects {
            self.epochs.wrote(&e.cache_key, &e.table, &e.key);
        }
        let mut attempt = 1;
        let ok = loop {
            if !self.breaker.allows() {
                break false;
            }
            if committed.is_some_and(|at| at.elapsed() > self.cfg.effective_write_deadline()) {
                // Too late to write what was prepared: the cache may have
                // forgotten a newer entry meanwhile (a tombstone expired, a
                // restart). Resync re-reads the rows instead.
                Counters::add(&self.stats.late_effects, effects.len() as u64);
                self.metrics.late_effects.increment(effects.len() as u64);
                tracing::warn!(
                    keys = effects.len(),
                    "cache write past the write deadline; the rows are re-read instead"
                );
                break false;
            }
            for e in &effects {
                self.hook(HookPoint::BeforeCacheWrite, &e.cache_key).await;
            }
            match self.write_effects(&effects).await {
                Ok(()) => break true,
                Err(e) if e.is_temporary() && attempt < self.cfg.retry.attempts => {
                    tokio::time::sleep(self.cfg.retry.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cache write failed after commit; keys queued for resync");
                    break false;
                }
            }
        };
        guard.disarm();
        if ok {
            let at = Instant::now();
            let mut ids = effects
                .iter()
                .filter_map(|e| e.outbox_id)
                .map(|id| Ack { id, at })
                .peekable();
            if ids.peek().is_some() {
                self.acks.lock().extend(ids);
            }
        } else {
            Counters::add(&self.stats.cache_write_failures, effects.len() as u64);
            if !self.cfg.consistency.resync {
                return;
            }
            for e in &effects {
                self.resync
                    .mark(&e.cache_key, &e.table, e.key.clone(), e.version);
            }
        }
    }

    fn item(&self, cache_key: &str, version: u64, epoch: u64, kind: &EffectKind) -> CacheItem {
        match kind {
            EffectKind::Put(entry, ttl) => CacheItem {
                key: cache_key.to_owned(),
                entry: entry.clone(),
                version,
                ttl: *ttl,
            },
            EffectKind::Invalidate => CacheItem {
                key: cache_key.to_owned(),
                entry: codec::invalidation_at(version, epoch),
                version,
                ttl: Some(self.tombstone_ttl),
            },
            EffectKind::Tombstone => CacheItem {
                key: cache_key.to_owned(),
                entry: codec::tombstone_at(version, epoch),
                version,
                ttl: Some(self.tombstone_ttl),
            },
        }
    }

    /// Writes the effects in pieces a server takes in one call (see
    /// [`cache_chunks`]); each piece is a cache call of its own, with its
    /// timeout, its metrics and its say in the breaker.
    async fn write_effects(&self, effects: &[Effect]) -> Result<()> {
        for chunk in cache_chunks(effects) {
            self.write_chunk(chunk).await?;
        }
        Ok(())
    }

    async fn write_chunk(&self, effects: &[Effect]) -> Result<()> {
        if self.cfg.consistency.fence {
            let mut items: Vec<CacheItem> = effects
                .iter()
                .map(|e| self.item(&e.cache_key, e.version, e.epoch, &e.kind))
                .collect();
            let fences = if items.len() == 1 {
                let item = items.pop().expect("one item");
                vec![
                    self.cache_call(CacheCall::SetIfNewer, (*self.cache).set_if_newer(item))
                        .await?,
                ]
            } else {
                self.cache_call(
                    CacheCall::SetManyIfNewer,
                    (*self.cache).set_many_if_newer(items),
                )
                .await?
            };
            let stale = fences.iter().filter(|f| **f == Fence::Stale).count();
            Counters::add(&self.stats.stale_refused, stale as u64);
            self.metrics.stale_refused.increment(stale as u64);
            return Ok(());
        }
        // Unfenced: the textbook write-through, with its races.
        let mut puts = Vec::new();
        for e in effects {
            match &e.kind {
                EffectKind::Put(..) => {
                    puts.push(self.item(&e.cache_key, e.version, e.epoch, &e.kind))
                }
                EffectKind::Invalidate | EffectKind::Tombstone => {
                    self.cache_call(CacheCall::Delete, (*self.cache).delete(&e.cache_key))
                        .await?;
                }
            }
        }
        match puts.len() {
            0 => Ok(()),
            1 => {
                let it = puts.pop().expect("one item");
                self.cache_call(CacheCall::Set, (*self.cache).set(&it.key, it.entry, it.ttl))
                    .await
            }
            _ => {
                self.cache_call(CacheCall::SetMany, (*self.cache).set_many(puts))
                    .await
            }
        }
    }

    /// Turns the cache entry of `ck` into a miss without opening the door
    /// to an older row: a row entry of version `v` is swapped, only if it
    /// is still exactly those bytes, for an invalidation at `v`, which
    /// refuses every populate older than `v` and lets the database's row
    /// back in on the next read. A tombstone or an invalidation is already
    /// a miss and stays. Returns whether an entry was invalidated.
    pub(crate) async fn invalidate(&self, ck: &str) -> Result<bool> {
        if !self.breaker.allows() {
            return Err(Error::new(
                ErrorKind::CircuitOpen,
                "the cache is not being called; nothing was invalidated",
            ));
        }
        self.flights.forget_all(std::iter::once(ck));
        for _ in 0..INVALIDATE_ATTEMPTS {
            let Some(bytes) = self
                .cache_call(CacheCall::Get, (*self.cache).get(ck))
                .await?
            else {
                return Ok(false);
            };
            let version = match codec::decode(&bytes) {
                codec::Decoded::Row { version, .. } => version,
                codec::Decoded::Tombstone { .. } => return Ok(false),
                // Unreadable bytes: no version to keep, any row may replace them.
                codec::Decoded::Corrupt => 0,
            };
            let item = CacheItem {
                key: ck.to_owned(),
                entry: codec::invalidation_at(version, self.epochs.current()),
                version,
                ttl: Some(self.tombstone_ttl),
            };
            match self
                .cache_call(
                    CacheCall::ReplaceIfUnchanged,
                    (*self.cache).replace_if_unchanged(bytes, item),
                )
                .await?
            {
                Fence::Applied => return Ok(true),
                // A write or a load replaced the entry meanwhile: look again.
                Fence::Stale => continue,
            }
        }
        Err(Error::new(
            ErrorKind::Busy,
            format!("the entry changed under each of {INVALIDATE_ATTEMPTS} attempts"),
        ))
    }

    /// Makes the cache entry of `ck` agree with `row`, the current database
    /// row (or its absence, as of `gone_version` if known), read in `epoch`.
    pub(crate) async fn repair(
        &self,
        st: &TableState,
        ck: &str,
        row: Option<VersionedRow>,
        gone_version: u64,
        epoch: u64,
    ) -> Result<()> {
        let item = match &row {
            Some(vr) => match st
                .caches(&vr.row)
                .then(|| self.entry_for(st, &vr.row, vr.version, epoch))
            {
                Some(Some((entry, ttl))) => Some(CacheItem {
                    key: ck.to_owned(),
                    entry,
                    version: vr.version,
                    ttl,
                }),
                _ => None,
            },
            None => None,
        };
        let version = row.as_ref().map_or(gone_version, |vr| vr.version);
        if !self.cfg.consistency.fence || (item.is_none() && version == 0) {
            // Nothing to fence with: remove whatever is there.
            return match item {
                Some(it) if !self.cfg.consistency.fence => {
                    self.cache_call(CacheCall::Set, (*self.cache).set(ck, it.entry, it.ttl))
                        .await
                }
                _ => self
                    .cache_call(CacheCall::Delete, (*self.cache).delete(ck))
                    .await
                    .map(drop),
            };
        }
        let kind = if row.is_some() {
            EffectKind::Invalidate
        } else {
            EffectKind::Tombstone
        };
        let item = item.unwrap_or_else(|| self.item(ck, version, epoch, &kind));
        self.cache_call(CacheCall::SetIfNewer, (*self.cache).set_if_newer(item))
            .await
            .map(drop)
    }
}
