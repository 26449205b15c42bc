//! Runs of upserts go through multi-row statements; their versions and
//! outbox records must be exactly those of one-by-one writes.

use std::time::Duration;

use writethrough_core::backend::{DbStore, TxOptions, Write, WriteOp};
use writethrough_core::{ColumnType, Key, Row, Table};
use writethrough_sqlite::SqliteStore;

fn table(name: &str) -> Table {
    Table::builder(name)
        .key("id", ColumnType::Int)
        .column("v", ColumnType::Text)
        .build()
        .unwrap()
}

fn upsert(t: &Table, id: i64, v: &str) -> Write {
    Write {
        table: t.clone(),
        op: WriteOp::Upsert(Row::new().set("id", id).set("v", v)),
    }
}

#[tokio::test]
async fn a_batch_gets_consecutive_versions_and_matching_outbox_records() {
    let db = SqliteStore::open_temporary().unwrap();
    let (a, b) = (table("a"), table("b"));
    db.ensure_table(&a).await.unwrap();
    db.ensure_table(&b).await.unwrap();
    // 150 rows of a (three chunks), one of b, 2 more of a: three runs.
    let mut writes: Vec<Write> = (0..150).map(|i| upsert(&a, i, "x")).collect();
    writes.push(upsert(&b, 1, "y"));
    writes.push(upsert(&a, 1000, "z"));
    writes.push(upsert(&a, 1001, "z"));
    let out = db
        .execute(writes.clone(), TxOptions::with_outbox(true))
        .await
        .unwrap();
    assert_eq!(out.len(), writes.len());
    for pair in out.windows(2) {
        assert_eq!(
            pair[1].version,
            pair[0].version + 1,
            "consecutive, in order"
        );
    }
    let pending = db
        .outbox_pending(None, Duration::ZERO, 10_000)
        .await
        .unwrap();
    assert_eq!(pending.len(), writes.len());
    for (w, o) in writes.iter().zip(&out) {
        let WriteOp::Upsert(row) = &w.op else {
            unreachable!()
        };
        let key = Key::from_value(row.get("id").unwrap()).unwrap();
        let rec = pending
            .iter()
            .find(|e| Some(e.id) == o.outbox_id)
            .expect("an outbox record per write");
        assert_eq!(
            (rec.table.as_str(), &rec.key, rec.version),
            (w.table.name().as_str(), &key, o.version)
        );
        let stored = db.get(&w.table, &key).await.unwrap().unwrap();
        assert_eq!(stored.version, o.version);
        assert_eq!(&stored.row, row);
    }
}

#[tokio::test]
async fn a_failing_row_rolls_back_the_whole_batch() {
    let db = SqliteStore::open_temporary().unwrap();
    let t = table("t");
    db.ensure_table(&t).await.unwrap();
    let mut writes: Vec<Write> = (0..10).map(|i| upsert(&t, i, "x")).collect();
    // NULL in a NOT NULL column, as only a buggy caller could send.
    writes.push(Write {
        table: t.clone(),
        op: WriteOp::Upsert(
            Row::new()
                .set("id", 99)
                .set("v", writethrough_core::Value::Null),
        ),
    });
    assert!(
        db.execute(writes, TxOptions::with_outbox(true))
            .await
            .is_err()
    );
    assert!(db.scan(&t, None, 100).await.unwrap().is_empty());
    assert!(
        db.outbox_pending(None, Duration::ZERO, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

mod scopes_and_schemas {
    //! Issue 10 on SQLite: a write beside an open scope from its own owner
    //! (a task, or a thread outside any task) fails at once; ensure_table
    //! checks types; errors carry messages.

    use std::time::{Duration, Instant};

    use writethrough_core::backend::{DbStore, TxOptions};
    use writethrough_core::{ColumnType, ErrorKind, Key, Row, Table};
    use writethrough_sqlite::SqliteStore;

    use super::{table, upsert};

    /// A `#[tokio::main]` body runs in `block_on`, which is not a task: the
    /// owner of its scope is the thread.
    #[test]
    fn a_write_beside_a_scope_in_a_block_on_body_fails_at_once() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(tokio::task::try_id().is_none(), "block_on is not a task");
            let db = SqliteStore::open_temporary().unwrap();
            let t = table("t");
            db.ensure_table(&t).await.unwrap();
            let mut tx = db.begin(TxOptions::default()).await.unwrap();
            tx.apply(&upsert(&t, 1, "in scope")).await.unwrap();
            let started = Instant::now();
            let e = db
                .execute(vec![upsert(&t, 2, "beside")], TxOptions::default())
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::WouldDeadlock, "{e}");
            let Err(e) = db.begin(TxOptions::default()).await else {
                panic!("a second scope from the same owner began")
            };
            assert_eq!(e.kind(), ErrorKind::WouldDeadlock, "{e}");
            assert!(started.elapsed() < Duration::from_secs(1));
            // A task of the same runtime is someone else: it waits.
            let other = tokio::spawn({
                let (db, t) = (db.clone(), t.clone());
                async move {
                    db.execute(vec![upsert(&t, 3, "other task")], TxOptions::default())
                        .await
                }
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!other.is_finished());
            tx.commit().await.unwrap();
            other.await.unwrap().unwrap();
            db.execute(vec![upsert(&t, 4, "after")], TxOptions::default())
                .await
                .expect("the scope ended");
            assert!(db.get(&t, &Key::Int(2)).await.unwrap().is_none());
            assert!(db.get(&t, &Key::Int(3)).await.unwrap().is_some());
        });
    }

    /// A current-thread runtime's test body is not a task either.
    #[tokio::test]
    async fn a_second_scope_from_the_same_test_body_fails_at_once() {
        let db = SqliteStore::open_temporary().unwrap();
        let t = table("t");
        db.ensure_table(&t).await.unwrap();
        let tx = db.begin(TxOptions::default()).await.unwrap();
        let Err(e) = db.begin(TxOptions::default()).await else {
            panic!("a second scope from the same owner began")
        };
        assert_eq!(e.kind(), ErrorKind::WouldDeadlock, "{e}");
        drop(tx);
        let tx = db
            .begin(TxOptions::default())
            .await
            .expect("a dropped scope frees the thread");
        tx.rollback().await.unwrap();
    }

    /// A file that is not a database is a configuration error with a message.
    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_a_config_error_with_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.db");
        std::fs::write(&path, vec![b'x'; 8192]).unwrap();
        let e = SqliteStore::open(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(e.message().contains("not a SQLite database"), "{e}");
    }

    /// A table made by hand with affinity-compatible types passes; one
    /// whose types do not fit fails with `SchemaMismatch`.
    #[tokio::test]
    async fn ensure_table_accepts_compatible_affinities_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hand.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE hand (id INT PRIMARY KEY, name VARCHAR(20) NOT NULL, price DOUBLE);
             CREATE TABLE wrong (id INTEGER PRIMARY KEY, name INTEGER NOT NULL);",
        )
        .unwrap();
        drop(conn);
        let db = SqliteStore::open(&path).unwrap();
        let schema = |name: &str| {
            Table::builder(name)
                .key("id", ColumnType::Int)
                .column("name", ColumnType::Text)
                .nullable("price", ColumnType::Float)
                .build()
                .unwrap()
        };
        db.ensure_table(&schema("hand")).await.unwrap();
        let row = Row::new().set("id", 1).set("name", "pen").set("price", 1.5);
        let (_, row) = schema("hand").normalize_row(row).unwrap();
        db.execute(
            vec![writethrough_core::backend::Write {
                table: schema("hand"),
                op: writethrough_core::backend::WriteOp::Upsert(row),
            }],
            TxOptions::default(),
        )
        .await
        .unwrap();
        let e = db.ensure_table(&schema("wrong")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::SchemaMismatch, "{e}");
    }
}

/// The shared database suite (crates/testkit/src/suite/db.rs) on SQLite.
#[tokio::test(flavor = "multi_thread")]
async fn the_shared_db_suite_passes_on_sqlite() {
    let db = SqliteStore::open_temporary().unwrap();
    let cache = writethrough_moka::MokaCache::default();
    let pair =
        writethrough_testkit::suite::Pair::new(std::sync::Arc::new(cache), std::sync::Arc::new(db));
    writethrough_testkit::suite::assert_conformance(
        "db suite: sqlite",
        pair,
        writethrough_testkit::suite::db::cases(),
    )
    .await;
}

/// A write that finds the writer idle runs on the caller's thread; one that
/// meets another process's write lock does not wait for it there (the
/// caller's runtime keeps running) but queues for the writer thread, and
/// commits once the lock is free.
#[tokio::test]
async fn an_idle_writer_lends_its_connection_and_a_busy_file_never_blocks_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inline.db");
    let db = SqliteStore::with_config(writethrough_sqlite::SqliteConfig::new(&path)).unwrap();
    let t = table("t");
    db.ensure_table(&t).await.unwrap();
    // The writer thread lets go of the connection just after it replies to
    // ensure_table; one of the next writes finds it idle.
    for _ in 0..100 {
        db.execute(vec![upsert(&t, 1, "a")], TxOptions::with_outbox(true))
            .await
            .unwrap();
        if db.writes_inline() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let inline = db.writes_inline();
    assert!(inline >= 1, "no write ran inline");

    // Another connection, as another process would, holds the write lock.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let write = {
        let (db, w) = (db.clone(), upsert(&t, 2, "b"));
        tokio::spawn(async move { db.execute(vec![w], TxOptions::default()).await })
    };
    // This single-threaded runtime still runs: the write is not blocking it.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!write.is_finished(), "the write waits for the lock");
    other.execute_batch("COMMIT").unwrap();
    write.await.unwrap().expect("commits once the lock is free");
    assert_eq!(
        db.writes_inline(),
        1,
        "the busy write went to the writer thread"
    );
    let row = db.get(&t, &Key::Int(2)).await.unwrap().unwrap();
    assert_eq!(row.row.get("v"), Some(&writethrough_core::Value::from("b")));

    // Off: every write through the writer thread.
    drop(db);
    let db = SqliteStore::with_config(
        writethrough_sqlite::SqliteConfig::new(&path).inline_writes(false),
    )
    .unwrap();
    db.execute(vec![upsert(&t, 3, "c")], TxOptions::default())
        .await
        .unwrap();
    assert_eq!(db.writes_inline(), 0);
}
