//! Shared setup: a throwaway PostgreSQL server per test, tables, and a
//! second connection to force interleavings.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row as _};
use writethrough_core::backend::{Write, WriteOp};
use writethrough_core::{ColumnType, Key, Patch, Row, Table};
use writethrough_postgres::{PostgresConfig, PostgresStore};
use writethrough_testkit::server::PostgresServer;

/// A server of the test's own and a store on it.
pub(crate) struct Pg {
    pub(crate) server: PostgresServer,
    pub(crate) store: PostgresStore,
}

/// Starts a server and connects a store with default settings.
pub(crate) async fn pg() -> Pg {
    pg_with(|c| c).await
}

/// Starts a server and connects a store with adjusted settings.
pub(crate) async fn pg_with(adjust: impl FnOnce(PostgresConfig) -> PostgresConfig) -> Pg {
    let server = PostgresServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
    let cfg = adjust(PostgresConfig::from_url(&server.url()).expect("the testkit URL parses"));
    let store = PostgresStore::with_config(cfg)
        .await
        .unwrap_or_else(|e| panic!("cannot connect: {e}\nserver log:\n{}", server.log()));
    Pg { server, store }
}

impl Pg {
    /// A second store on the same server, with its own pool.
    pub(crate) async fn other_store(
        &self,
        adjust: impl FnOnce(PostgresConfig) -> PostgresConfig,
    ) -> PostgresStore {
        let cfg = adjust(PostgresConfig::from_url(&self.server.url()).unwrap());
        PostgresStore::with_config(cfg).await.unwrap()
    }

    /// Runs SQL text (no parameters) on the store's pool.
    pub(crate) async fn exec(&self, sql: &str) {
        sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
            .execute(self.store.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// `SELECT nextval` on the version sequence, from the pool.
    pub(crate) async fn nextval(&self) -> i64 {
        sqlx::query_scalar("SELECT nextval('_wt_version_seq')")
            .fetch_one(self.store.pool())
            .await
            .unwrap()
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A table name unique in this process (tests may share an external server).
pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A table with every column type, NOT NULL and nullable.
pub(crate) fn all_types(name: &str) -> Table {
    Table::builder(name)
        .key("id", ColumnType::Int)
        .column("b", ColumnType::Bool)
        .column("i", ColumnType::Int)
        .column("f", ColumnType::Float)
        .column("s", ColumnType::Text)
        .column("y", ColumnType::Bytes)
        .column("j", ColumnType::Json)
        .nullable("nb", ColumnType::Bool)
        .nullable("ni", ColumnType::Int)
        .nullable("nf", ColumnType::Float)
        .nullable("ns", ColumnType::Text)
        .nullable("ny", ColumnType::Bytes)
        .nullable("nj", ColumnType::Json)
        .build()
        .unwrap()
}

/// A simple table: `id` int key, `name` text, nullable `qty` int.
pub(crate) fn items(name: &str) -> Table {
    Table::builder(name)
        .key("id", ColumnType::Int)
        .column("name", ColumnType::Text)
        .nullable("qty", ColumnType::Int)
        .build()
        .unwrap()
}

pub(crate) fn item(id: i64, name: &str) -> Row {
    Row::new().set("id", id).set("name", name)
}

pub(crate) fn upsert(t: &Table, row: Row) -> Write {
    Write {
        table: t.clone(),
        op: WriteOp::Upsert(row),
    }
}

pub(crate) fn update(t: &Table, key: impl Into<Key>, patch: Patch) -> Write {
    Write {
        table: t.clone(),
        op: WriteOp::Update(key.into(), patch),
    }
}

pub(crate) fn delete(t: &Table, key: impl Into<Key>) -> Write {
    Write {
        table: t.clone(),
        op: WriteOp::Delete(key.into()),
    }
}

/// Waits until `n` sessions wait for an advisory lock (a write blocked on
/// its key lock), so a test can act while the write is provably blocked.
pub(crate) async fn wait_for_lock_waiters(pool: &PgPool, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no write started waiting for its key lock within 20 s ({waiting} waiting)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The backend pid of the session waiting for an advisory lock.
pub(crate) async fn lock_waiter_pid(pool: &PgPool) -> i32 {
    sqlx::query("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted LIMIT 1")
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0)
}
