//! The database store suite: the [`DbStore`] and [`Transaction`] contracts,
//! on any backend. Cases use `pair.db` only.
//!
//! [`Transaction`]: writethrough_core::backend::Transaction

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use writethrough_core::backend::{DbStore, TxOptions, Write, WriteOp};
use writethrough_core::{ColumnType, ErrorKind, Key, Patch, Row, Table, Value};

use super::{Case, Outcome, Pair, unique};

/// Every case of the database suite.
pub fn cases() -> Vec<Case> {
    crate::cases![
        ensure_table_is_idempotent_and_checks_columns,
        ensure_table_refuses_other_column_types_and_key_types,
        get_for_update_locks_a_key_until_the_transaction_ends,
        rows_of_every_type_round_trip,
        versions_rise_per_key_across_writes_deletes_and_reinserts,
        update_returns_the_whole_row_or_none_with_a_version,
        delete_says_whether_a_row_was_there,
        execute_is_all_or_nothing,
        transactions_see_their_writes_and_commit_or_roll_back,
        a_dropped_transaction_rolls_back,
        outbox_records_appear_with_their_writes_and_can_be_removed,
        scan_pages_in_key_order,
        sample_picks_distinct_rows_by_seed_and_count_counts,
        get_many_answers_each_key_in_order,
        insert_creates_rows_or_writes_nothing,
        concurrent_writes_to_one_key_get_distinct_versions_and_the_last_wins,
        nul_bytes_in_text_follow_the_capabilities,
        unfenced_writes_store_rows_with_rising_versions,
        ping_answers,
    ]
}

/// A table with a column of every type.
pub fn table(name: &str) -> Table {
    Table::builder(name)
        .key("id", ColumnType::Int)
        .column("t", ColumnType::Text)
        .nullable("f", ColumnType::Float)
        .nullable("b", ColumnType::Bool)
        .nullable("y", ColumnType::Bytes)
        .nullable("j", ColumnType::Json)
        .nullable("n", ColumnType::Int)
        .build()
        .expect("schema")
}

fn row(id: i64, t: &str) -> Row {
    Row::new()
        .set("id", id)
        .set("t", t)
        .set("f", 1.25)
        .set("b", true)
        .set("y", vec![0u8, 1, 254, 255])
        .set("j", serde_json::json!({"k": [1, "two", null]}))
        .set("n", Value::Null)
}

fn upsert(t: &Table, r: Row) -> Write {
    let (_, r) = t.normalize_row(r).expect("a valid row");
    Write {
        table: t.clone(),
        op: WriteOp::Upsert(r),
    }
}

async fn fresh(db: &Arc<dyn DbStore>, base: &str) -> Table {
    let t = table(&unique(base));
    db.ensure_table(&t).await.unwrap();
    t
}

async fn put(db: &Arc<dyn DbStore>, t: &Table, r: Row) -> u64 {
    db.execute(vec![upsert(t, r)], TxOptions::default())
        .await
        .unwrap()[0]
        .version
}

/// `ensure_table` creates, may run again, and refuses a table that lacks a column.
pub async fn ensure_table_is_idempotent_and_checks_columns(pair: Pair) -> Outcome {
    let db = &pair.db;
    let name = unique("ens");
    let narrow = Table::builder(&name)
        .key("id", ColumnType::Int)
        .column("t", ColumnType::Text)
        .build()
        .unwrap();
    db.ensure_table(&narrow).await.unwrap();
    db.ensure_table(&narrow).await.unwrap();
    let wider = Table::builder(&name)
        .key("id", ColumnType::Int)
        .column("t", ColumnType::Text)
        .column("missing", ColumnType::Int)
        .build()
        .unwrap();
    let e = db.ensure_table(&wider).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SchemaMismatch, "{e}");
    let tasks = (0..8).map(|_| {
        let (db, t) = (db.clone(), table(&format!("{name}_c")));
        tokio::spawn(async move { db.ensure_table(&t).await })
    });
    for r in join_all(tasks).await {
        r.unwrap()
            .expect("concurrent ensure_table calls all succeed");
    }
    Outcome::Passed
}

/// `ensure_table` over an existing table whose column has another type, or
/// whose key has another type, fails with `SchemaMismatch` (SQLite checked
/// names only).
pub async fn ensure_table_refuses_other_column_types_and_key_types(pair: Pair) -> Outcome {
    let db = &pair.db;
    let name = unique("types");
    let t = Table::builder(&name)
        .key("id", ColumnType::Int)
        .column("t", ColumnType::Text)
        .nullable("f", ColumnType::Float)
        .build()
        .unwrap();
    db.ensure_table(&t).await.unwrap();
    let other_column = Table::builder(&name)
        .key("id", ColumnType::Int)
        .column("t", ColumnType::Int)
        .nullable("f", ColumnType::Float)
        .build()
        .unwrap();
    let other_float = Table::builder(&name)
        .key("id", ColumnType::Int)
        .column("t", ColumnType::Text)
        .nullable("f", ColumnType::Bytes)
        .build()
        .unwrap();
    let text_key = Table::builder(&name)
        .key("id", ColumnType::Text)
        .column("t", ColumnType::Text)
        .build()
        .unwrap();
    let key_not_key = Table::builder(&name)
        .key("t", ColumnType::Text)
        .column("id", ColumnType::Int)
        .build()
        .unwrap();
    for (what, other) in [
        ("a text column declared Int", other_column),
        ("a float column declared Bytes", other_float),
        ("an integer key declared Text", text_key),
        ("a plain column declared the key", key_not_key),
    ] {
        let e = db.ensure_table(&other).await.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::SchemaMismatch, "{what}: {e}");
        assert!(!e.message().is_empty(), "{what}");
    }
    db.ensure_table(&t)
        .await
        .expect("the right schema still passes");
    Outcome::Passed
}

/// A row read with `get_for_update` — present or missing — cannot be
/// written by another transaction until the reading one ends, and the
/// reader then sees its own value (no lost update).
pub async fn get_for_update_locks_a_key_until_the_transaction_ends(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "gfu").await;
    put(db, &t, row(1, "before")).await;
    for key in [1, 2] {
        let mut tx = db.begin(TxOptions::default()).await.unwrap();
        let seen = tx.get_for_update(&t, &Key::Int(key)).await.unwrap();
        assert_eq!(seen.is_some(), key == 1);
        let writer = {
            let (db, t) = (db.clone(), t.clone());
            tokio::spawn(async move { put(&db, &t, row(key, "other")).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !writer.is_finished(),
            "key {key}: a write went through a locking read's lock"
        );
        tx.apply(&upsert(&t, row(key, "locked"))).await.unwrap();
        tx.commit().await.unwrap();
        let other = writer.await.unwrap();
        let last = db.get(&t, &Key::Int(key)).await.unwrap().unwrap();
        assert_eq!(
            last.version, other,
            "key {key}: the waiting write came after"
        );
        assert_eq!(last.row.get("t"), Some(&Value::Text("other".into())));
    }
    Outcome::Passed
}

/// Every column type, NULLs, Unicode, bytes and JSON come back as written.
pub async fn rows_of_every_type_round_trip(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "rt").await;
    let mut nulls = row(2, "");
    for c in ["f", "b", "y", "j", "n"] {
        nulls.insert(writethrough_core::Ident::new(c).unwrap(), Value::Null);
    }
    let wide = row(3, "ünïcödé ✓ 'quotes' \"double\" \\ ; DROP TABLE x; --")
        .set("f", f64::MAX)
        .set("n", i64::MIN)
        .set("y", Vec::<u8>::new());
    for r in [row(1, "plain"), nulls, wide] {
        let (key, want) = t.normalize_row(r.clone()).unwrap();
        let v = put(db, &t, r).await;
        let got = db.get(&t, &key).await.unwrap().expect("stored");
        assert_eq!(got.row, want);
        assert_eq!(got.version, v);
    }
    assert_eq!(db.get(&t, &Key::Int(404)).await.unwrap(), None);
    Outcome::Passed
}

/// Each write of a key gets a higher version than the last, a delete's
/// and a re-insert's included.
pub async fn versions_rise_per_key_across_writes_deletes_and_reinserts(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "ver").await;
    let mut last = 0;
    let mut check = |v: u64, what: &str| {
        assert!(v > last, "{what}: {v} after {last}");
        last = v;
    };
    check(put(db, &t, row(1, "a")).await, "insert");
    check(put(db, &t, row(1, "b")).await, "upsert");
    let one = |op| {
        vec![Write {
            table: t.clone(),
            op,
        }]
    };
    let o = db
        .execute(
            one(WriteOp::Update(Key::Int(1), Patch::new().set("t", "c"))),
            TxOptions::default(),
        )
        .await
        .unwrap();
    check(o[0].version, "update");
    let o = db
        .execute(one(WriteOp::Delete(Key::Int(1))), TxOptions::default())
        .await
        .unwrap();
    check(o[0].version, "delete");
    let o = db
        .execute(one(WriteOp::Delete(Key::Int(1))), TxOptions::default())
        .await
        .unwrap();
    check(o[0].version, "delete of nothing");
    check(put(db, &t, row(1, "again")).await, "re-insert");
    assert_eq!(
        db.get(&t, &Key::Int(1)).await.unwrap().unwrap().version,
        last
    );
    Outcome::Passed
}

/// An update returns the whole new row; of a missing row, `None` but still a version.
pub async fn update_returns_the_whole_row_or_none_with_a_version(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "upd").await;
    put(db, &t, row(1, "a")).await;
    let patch = t
        .normalize_patch(Patch::new().set("t", "z").set("n", 7))
        .unwrap();
    let w = Write {
        table: t.clone(),
        op: WriteOp::Update(Key::Int(1), patch.clone()),
    };
    let o = db
        .execute(vec![w], TxOptions::default())
        .await
        .unwrap()
        .remove(0);
    assert!(o.existed);
    let mut want = t.normalize_row(row(1, "a")).unwrap().1;
    patch.apply_to(&mut want);
    assert_eq!(o.row.as_ref(), Some(&want));
    assert_eq!(db.get(&t, &Key::Int(1)).await.unwrap().unwrap().row, want);
    let w = Write {
        table: t.clone(),
        op: WriteOp::Update(Key::Int(2), patch),
    };
    let o = db
        .execute(vec![w], TxOptions::default())
        .await
        .unwrap()
        .remove(0);
    assert!(!o.existed && o.row.is_none() && o.version > 0);
    assert_eq!(db.get(&t, &Key::Int(2)).await.unwrap(), None);
    Outcome::Passed
}

/// A delete says whether a row was there.
pub async fn delete_says_whether_a_row_was_there(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "del").await;
    put(db, &t, row(1, "a")).await;
    let del = || Write {
        table: t.clone(),
        op: WriteOp::Delete(Key::Int(1)),
    };
    assert!(db.execute(vec![del()], TxOptions::default()).await.unwrap()[0].existed);
    assert!(!db.execute(vec![del()], TxOptions::default()).await.unwrap()[0].existed);
    assert_eq!(db.get(&t, &Key::Int(1)).await.unwrap(), None);
    Outcome::Passed
}

/// `execute` commits every write or none: a NULL in a NOT NULL column
/// (only a buggy caller sends one; the engine checks first) fails the lot.
pub async fn execute_is_all_or_nothing(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "atom").await;
    put(db, &t, row(1, "before")).await;
    let bad = Write {
        table: t.clone(),
        op: WriteOp::Upsert(Row::new().set("id", 3).set("t", Value::Null)),
    };
    for writes in [
        vec![
            upsert(&t, row(1, "after")),
            upsert(&t, row(2, "new")),
            bad.clone(),
        ],
        vec![
            upsert(&t, row(1, "after")),
            Write {
                table: t.clone(),
                op: WriteOp::Delete(Key::Int(1)),
            },
            bad,
        ],
    ] {
        assert!(
            db.execute(writes, TxOptions::with_outbox(true))
                .await
                .is_err()
        );
        let r1 = db.get(&t, &Key::Int(1)).await.unwrap().expect("kept");
        assert_eq!(r1.row.get("t"), Some(&Value::Text("before".into())));
        assert_eq!(db.get(&t, &Key::Int(2)).await.unwrap(), None);
    }
    Outcome::Passed
}

/// A transaction reads its own writes; commit makes them visible,
/// rollback leaves nothing.
pub async fn transactions_see_their_writes_and_commit_or_roll_back(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "tx").await;
    for commit in [true, false] {
        let id = if commit { 1 } else { 2 };
        let mut tx = db.begin(TxOptions::default()).await.unwrap();
        let o = tx.apply(&upsert(&t, row(id, "in tx"))).await.unwrap();
        let seen = tx.get(&t, &Key::Int(id)).await.unwrap().expect("own write");
        assert_eq!(seen.version, o.version);
        let patched = tx
            .apply(&Write {
                table: t.clone(),
                op: WriteOp::Update(
                    Key::Int(id),
                    t.normalize_patch(Patch::new().set("t", "x")).unwrap(),
                ),
            })
            .await
            .unwrap();
        assert!(patched.version > o.version);
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        let after = db.get(&t, &Key::Int(id)).await.unwrap();
        assert_eq!(after.is_some(), commit);
        if let Some(r) = after {
            assert_eq!(r.version, patched.version);
        }
    }
    Outcome::Passed
}

/// Dropping an open transaction rolls it back and frees the database.
pub async fn a_dropped_transaction_rolls_back(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "drop").await;
    {
        let mut tx = db.begin(TxOptions::default()).await.unwrap();
        tx.apply(&upsert(&t, row(1, "dropped"))).await.unwrap();
    }
    put(db, &t, row(2, "after")).await;
    assert_eq!(db.get(&t, &Key::Int(1)).await.unwrap(), None);
    Outcome::Passed
}

/// With the outbox on, each write leaves a record (table, key, version)
/// in the same transaction; records can be removed; a rolled-back
/// transaction leaves none.
pub async fn outbox_records_appear_with_their_writes_and_can_be_removed(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "ob").await;
    let name = t.name().as_str().to_owned();
    let mine = |all: Vec<writethrough_core::backend::OutboxEntry>| -> Vec<writethrough_core::backend::OutboxEntry> {
        all.into_iter().filter(|e| e.table == name).collect()
    };
    let out = db
        .execute(
            vec![
                upsert(&t, row(1, "a")),
                upsert(&t, row(2, "b")),
                Write {
                    table: t.clone(),
                    op: WriteOp::Delete(Key::Int(3)),
                },
            ],
            TxOptions::with_outbox(true),
        )
        .await
        .unwrap();
    let pending = mine(
        db.outbox_pending(None, Duration::ZERO, 100_000)
            .await
            .unwrap(),
    );
    assert_eq!(pending.len(), 3);
    for (o, key) in out.iter().zip([1, 2, 3]) {
        let rec = pending
            .iter()
            .find(|e| Some(e.id) == o.outbox_id)
            .expect("a record per write");
        assert_eq!((rec.key.clone(), rec.version), (Key::Int(key), o.version));
    }
    let only_mine = db
        .outbox_pending(Some(std::slice::from_ref(&name)), Duration::ZERO, 100_000)
        .await
        .unwrap();
    assert_eq!(only_mine.len(), 3, "records filtered by table");
    let other = db
        .outbox_pending(Some(&[format!("{name}_other")]), Duration::ZERO, 100_000)
        .await
        .unwrap();
    assert!(other.is_empty(), "no record of another table");
    let young = mine(
        db.outbox_pending(None, Duration::from_secs(3600), 100_000)
            .await
            .unwrap(),
    );
    assert!(
        young.is_empty(),
        "records younger than min_age are not pending"
    );
    let mut tx = db.begin(TxOptions::with_outbox(true)).await.unwrap();
    tx.apply(&upsert(&t, row(9, "rolled back"))).await.unwrap();
    tx.rollback().await.unwrap();
    db.outbox_remove(pending.iter().map(|e| e.id).collect())
        .await
        .unwrap();
    assert!(
        mine(
            db.outbox_pending(None, Duration::ZERO, 100_000)
                .await
                .unwrap()
        )
        .is_empty()
    );
    put(db, &t, row(4, "no outbox")).await;
    assert!(
        mine(
            db.outbox_pending(None, Duration::ZERO, 100_000)
                .await
                .unwrap()
        )
        .is_empty()
    );
    Outcome::Passed
}

/// `scan` returns rows in key order, page by page.
pub async fn scan_pages_in_key_order(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "scan").await;
    let ids = [5i64, -3, 42, 0, 7, 1000, 8];
    let writes: Vec<Write> = ids.iter().map(|i| upsert(&t, row(*i, "x"))).collect();
    db.execute(writes, TxOptions::default()).await.unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = db.scan(&t, after.clone(), 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        for vr in &page {
            seen.push(Key::from_value(vr.row.get("id").unwrap()).unwrap());
        }
        after = seen.last().cloned();
    }
    let mut want: Vec<Key> = ids.iter().map(|i| Key::Int(*i)).collect();
    want.sort();
    assert_eq!(seen, want);
    Outcome::Passed
}

/// `sample` returns `n` distinct rows of the table (all of them when it
/// has fewer), the same ones for the same seed and others for another
/// seed; `count` counts the rows exactly. Text keys are ranked too.
pub async fn sample_picks_distinct_rows_by_seed_and_count_counts(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "sample").await;
    let ids = |rows: &[writethrough_core::VersionedRow]| -> Vec<Key> {
        rows.iter()
            .map(|vr| Key::from_value(vr.row.get("id").unwrap()).unwrap())
            .collect()
    };
    match db.sample(&t, 5, 1).await {
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            return Outcome::NotApplicable("the backend cannot sample rows".into());
        }
        r => assert!(r.unwrap().is_empty(), "an empty table samples nothing"),
    }
    assert_eq!(db.count(&t).await.unwrap(), 0);
    let writes: Vec<Write> = (1..=300).map(|i| upsert(&t, row(i, "x"))).collect();
    db.execute(writes, TxOptions::default()).await.unwrap();
    assert_eq!(db.count(&t).await.unwrap(), 300);
    let a = ids(&db.sample(&t, 20, 7).await.unwrap());
    assert_eq!(a.len(), 20);
    let distinct: std::collections::BTreeSet<&Key> = a.iter().collect();
    assert_eq!(distinct.len(), 20, "distinct rows: {a:?}");
    assert_eq!(ids(&db.sample(&t, 20, 7).await.unwrap()), a, "same seed");
    let b = ids(&db.sample(&t, 20, 8).await.unwrap());
    assert_ne!(a, b, "another seed, another sample");
    // Not the first rows in key order.
    let first: Vec<Key> = (1..=20).map(Key::Int).collect();
    let mut sorted = a.clone();
    sorted.sort();
    assert_ne!(sorted, first);
    assert_eq!(db.sample(&t, 1000, 7).await.unwrap().len(), 300);
    assert!(db.sample(&t, 0, 7).await.unwrap().is_empty());

    let texts = Table::builder(&unique("sample_text"))
        .key("k", ColumnType::Text)
        .column("v", ColumnType::Int)
        .build()
        .expect("schema");
    db.ensure_table(&texts).await.unwrap();
    let writes: Vec<Write> = (0..50)
        .map(|i| {
            upsert(
                &texts,
                Row::new().set("k", format!("key {i} ✓")).set("v", i),
            )
        })
        .collect();
    db.execute(writes, TxOptions::default()).await.unwrap();
    let picked = db.sample(&texts, 10, 3).await.unwrap();
    assert_eq!(picked.len(), 10);
    assert_eq!(db.count(&texts).await.unwrap(), 50);
    Outcome::Passed
}

/// `get_many` answers each key in the order given, absent and repeated
/// keys included, with the rows and versions `get` returns; a key of the
/// wrong type is refused.
pub async fn get_many_answers_each_key_in_order(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "getmany").await;
    let writes: Vec<Write> = [3i64, 1, 2]
        .iter()
        .map(|i| upsert(&t, row(*i, "x")))
        .collect();
    db.execute(writes, TxOptions::default()).await.unwrap();
    let keys: Vec<Key> = [2i64, 9, 1, 2, 3].iter().map(|i| Key::Int(*i)).collect();
    let many = db.get_many(&t, &keys).await.unwrap();
    assert_eq!(many.len(), keys.len());
    for (k, got) in keys.iter().zip(&many) {
        assert_eq!(got, &db.get(&t, k).await.unwrap(), "key {k}");
    }
    assert!(many[1].is_none() && many[0].is_some());
    assert_eq!(db.get_many(&t, &[]).await.unwrap(), vec![]);
    let e = db
        .get_many(&t, &[Key::Int(1), Key::Text("1".into())])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidKey, "{e}");
    Outcome::Passed
}

/// `insert` creates rows that do not exist; if one key of the batch exists,
/// it fails with `Conflict` and writes nothing.
pub async fn insert_creates_rows_or_writes_nothing(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "insert").await;
    let out = db
        .insert(vec![upsert(&t, row(1, "a"))], TxOptions::default())
        .await
        .unwrap();
    assert_eq!(out.len(), 1);
    assert!(!out[0].existed);
    let e = db
        .insert(
            vec![upsert(&t, row(2, "b")), upsert(&t, row(1, "c"))],
            TxOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(
        db.get(&t, &Key::Int(2)).await.unwrap().is_none(),
        "all or nothing"
    );
    let kept = db.get(&t, &Key::Int(1)).await.unwrap().unwrap();
    assert_eq!(
        kept.version, out[0].version,
        "the existing row is untouched"
    );
    Outcome::Passed
}

/// Many tasks write one key at once: every write gets its own version and
/// the row left is the one with the highest.
pub async fn concurrent_writes_to_one_key_get_distinct_versions_and_the_last_wins(
    pair: Pair,
) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "conc").await;
    let tasks = (0..40).map(|i| {
        let (db, t) = (db.clone(), t.clone());
        tokio::spawn(async move {
            let v = put(&db, &t, row(1, &format!("writer {i}"))).await;
            (v, i)
        })
    });
    let mut results: Vec<(u64, i32)> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    results.sort();
    results.dedup_by_key(|(v, _)| *v);
    assert_eq!(results.len(), 40, "versions are distinct");
    let (top, writer) = *results.last().unwrap();
    let stored = db.get(&t, &Key::Int(1)).await.unwrap().unwrap();
    assert_eq!(stored.version, top);
    assert_eq!(
        stored.row.get("t"),
        Some(&Value::Text(format!("writer {writer}")))
    );
    Outcome::Passed
}

/// Text with a NUL byte is stored where the capabilities say it can be,
/// and refused with `InvalidValue` where they say it cannot.
pub async fn nul_bytes_in_text_follow_the_capabilities(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "nul").await;
    let r = db
        .execute(vec![upsert(&t, row(1, "a\0b"))], TxOptions::default())
        .await;
    if db.capabilities().text_allows_nul {
        r.unwrap();
        let got = db.get(&t, &Key::Int(1)).await.unwrap().unwrap();
        assert_eq!(got.row.get("t"), Some(&Value::Text("a\0b".into())));
    } else {
        assert_eq!(r.unwrap_err().kind(), ErrorKind::InvalidValue);
        assert_eq!(db.get(&t, &Key::Int(1)).await.unwrap(), None);
    }
    Outcome::Passed
}

/// With fencing off (`TxOptions::fence` false) an adapter may take a
/// cheaper path; rows are still stored and versions still rise.
pub async fn unfenced_writes_store_rows_with_rising_versions(pair: Pair) -> Outcome {
    let db = &pair.db;
    let t = fresh(db, "unf").await;
    let opts = TxOptions::default().fenced(false);
    let mut last = 0;
    for i in 0..3 {
        let o = db
            .execute(vec![upsert(&t, row(1, &format!("v{i}")))], opts)
            .await
            .unwrap()
            .remove(0);
        assert!(o.version > last, "{} after {last}", o.version);
        last = o.version;
    }
    let got = db.get(&t, &Key::Int(1)).await.unwrap().unwrap();
    assert_eq!(
        (got.version, got.row.get("t")),
        (last, Some(&Value::Text("v2".into())))
    );
    Outcome::Passed
}

/// `ping` answers.
pub async fn ping_answers(pair: Pair) -> Outcome {
    pair.db.ping().await.unwrap();
    Outcome::Passed
}
