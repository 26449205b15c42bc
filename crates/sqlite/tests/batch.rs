//! Runs of upserts go through multi-row statements; their versions and
//! outbox records must be exactly those of one-by-one writes.

use std::time::Duration;

use writethrough_core::{ColumnType, DbStore, Key, Row, Table, TxOptions, Write, WriteOp};
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
