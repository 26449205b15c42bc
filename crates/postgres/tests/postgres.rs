//! `PostgresStore` against a real PostgreSQL server (one per test, started by
//! the testkit): values, versions, locks and interleavings, atomicity, the
//! outbox, `ensure_table`, and error kinds.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use writethrough_core::backend::{DbStore, TxOptions, WriteOutcome};
use writethrough_core::{ColumnType, ErrorKind, Key, Patch, Row, Table, Value};

use common::*;

fn full_row(id: i64) -> Row {
    Row::new()
        .set("id", id)
        .set("b", true)
        .set("i", i64::MIN)
        .set("f", -0.0)
        .set("s", "héllo ✓ 'quoted' \"double\" \\ ; DROP TABLE x; --")
        .set("y", (0u8..=255).collect::<Vec<u8>>())
        .set(
            "j",
            json!({"a": [1, 2.5, "x", null, {"deep": true}], "n": i64::MAX, "u": "✓", "e": {}}),
        )
        .set("nb", false)
        .set("ni", i64::MAX)
        .set("nf", 5e-324)
        .set("ns", "")
        .set("ny", Vec::<u8>::new())
        .set("nj", json!([]))
}

#[tokio::test]
async fn every_column_type_round_trips_with_nulls_and_json() {
    let pg = pg().await;
    let t = all_types(&unique("types"));
    pg.store.ensure_table(&t).await.unwrap();

    let row = full_row(1);
    let out = pg
        .store
        .execute(vec![upsert(&t, row.clone())], TxOptions::default())
        .await
        .unwrap();
    assert!(!out[0].existed);
    let got = pg.store.get(&t, &Key::Int(1)).await.unwrap().unwrap();
    let (_, expected) = t.normalize_row(row).unwrap();
    assert_eq!(got.row, expected);
    assert_eq!(got.version, out[0].version);
    assert!(matches!(got.row.get("f"), Some(Value::Float(f)) if f.is_sign_negative()));

    // Absent nullable columns are stored as NULL.
    let sparse = Row::new()
        .set("id", 2)
        .set("b", false)
        .set("i", 0)
        .set("f", 1e308)
        .set("s", "x")
        .set("y", vec![0u8])
        .set("j", json!("just a string"));
    pg.store
        .execute(vec![upsert(&t, sparse.clone())], TxOptions::default())
        .await
        .unwrap();
    let got = pg.store.get(&t, &Key::Int(2)).await.unwrap().unwrap();
    for c in ["nb", "ni", "nf", "ns", "ny", "nj"] {
        assert_eq!(got.row.get(c), Some(&Value::Null), "{c}");
    }
    assert_eq!(got.row.get("j"), Some(&Value::Json(json!("just a string"))));

    // An update sets some columns to NULL and others to new values, and
    // returns the whole row.
    let patch = Patch::new()
        .set("nj", Value::Null)
        .set("ny", Value::Null)
        .set("s", "updated")
        .set("j", json!({"k": [true, false]}));
    let out = pg
        .store
        .execute(vec![update(&t, 1, patch)], TxOptions::default())
        .await
        .unwrap();
    assert!(out[0].existed);
    let returned = out[0].row.clone().unwrap();
    let got = pg.store.get(&t, &Key::Int(1)).await.unwrap().unwrap();
    assert_eq!(returned, got.row);
    assert_eq!(got.version, out[0].version);
    assert_eq!(got.row.get("nj"), Some(&Value::Null));
    assert_eq!(got.row.get("ny"), Some(&Value::Null));
    assert_eq!(got.row.get("s"), Some(&Value::Text("updated".into())));
    assert_eq!(
        got.row.get("j"),
        Some(&Value::Json(json!({"k": [true, false]})))
    );
    assert_eq!(got.row.get("ni"), Some(&Value::Int(i64::MAX)));

    // Delete, then the row is gone.
    let out = pg
        .store
        .execute(vec![delete(&t, 1)], TxOptions::default())
        .await
        .unwrap();
    assert!(out[0].existed);
    assert_eq!(pg.store.get(&t, &Key::Int(1)).await.unwrap(), None);
}

#[tokio::test]
async fn text_keys_round_trip_and_scan_pages_in_byte_order() {
    let pg = pg().await;
    let t = Table::builder(&unique("Texts"))
        .key("Key", ColumnType::Text)
        .nullable("Val", ColumnType::Int)
        .build()
        .unwrap();
    pg.store.ensure_table(&t).await.unwrap();
    let keys = ["b", "a", "B", "é", "a b", "z", "Z", "aa", "✓", "1"];
    let writes = keys
        .iter()
        .enumerate()
        .map(|(i, k)| upsert(&t, Row::new().set("Key", *k).set("Val", i as i64)))
        .collect();
    pg.store
        .execute(writes, TxOptions::default())
        .await
        .unwrap();
    let got = pg.store.get(&t, &Key::from("é")).await.unwrap().unwrap();
    assert_eq!(got.row.get("Val"), Some(&Value::Int(3)));

    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = pg.store.scan(&t, after.clone(), 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        for vr in &page {
            let k = Key::from_value(vr.row.get("Key").unwrap()).unwrap();
            seen.push(k.clone());
            after = Some(k);
        }
    }
    let mut expected: Vec<Key> = keys.iter().map(|k| Key::from(*k)).collect();
    expected.sort();
    assert_eq!(seen, expected, "scan must page in Key order");
}

#[tokio::test]
async fn versions_strictly_increase_per_key_across_every_kind_of_write() {
    let pg = pg().await;
    let t = items(&unique("versions"));
    pg.store.ensure_table(&t).await.unwrap();
    let opts = TxOptions::default();
    let run = |w| {
        let store = pg.store.clone();
        async move { store.execute(vec![w], opts).await.unwrap().remove(0) }
    };
    let steps: Vec<(&str, WriteOutcome)> = vec![
        ("insert", run(upsert(&t, item(1, "a"))).await),
        ("upsert", run(upsert(&t, item(1, "b"))).await),
        (
            "update",
            run(update(&t, 1, Patch::new().set("qty", 5))).await,
        ),
        ("delete", run(delete(&t, 1)).await),
        ("delete again", run(delete(&t, 1)).await),
        (
            "update missing",
            run(update(&t, 1, Patch::new().set("qty", 6))).await,
        ),
        ("re-insert", run(upsert(&t, item(1, "c"))).await),
    ];
    let existed: Vec<bool> = steps.iter().map(|(_, o)| o.existed).collect();
    assert_eq!(existed, [false, true, true, true, false, false, false]);
    assert_eq!(steps[5].1.row, None);
    for pair in steps.windows(2) {
        assert!(
            pair[1].1.version > pair[0].1.version,
            "{} ({}) must be newer than {} ({})",
            pair[1].0,
            pair[1].1.version,
            pair[0].0,
            pair[0].1.version
        );
    }
    let got = pg.store.get(&t, &Key::Int(1)).await.unwrap().unwrap();
    assert_eq!(got.version, steps[6].1.version);

    // The interactive and batch paths draw from the same sequence.
    let mut tx = pg.store.begin(opts).await.unwrap();
    let a = tx.apply(&delete(&t, 1)).await.unwrap();
    let b = tx.apply(&upsert(&t, item(1, "d"))).await.unwrap();
    tx.commit().await.unwrap();
    assert!(a.version > steps[6].1.version && b.version > a.version);
    let batch = pg
        .store
        .execute(
            vec![upsert(&t, item(1, "e")), upsert(&t, item(2, "f"))],
            opts,
        )
        .await
        .unwrap();
    assert!(batch[0].version > b.version);
    assert_ne!(batch[0].version, batch[1].version);
}

/// Holds the key lock of `key` in an open transaction (by writing it), and
/// returns the transaction and its write's version.
async fn hold_key(
    pg: &Pg,
    t: &Table,
    write: writethrough_core::backend::Write,
) -> (Box<dyn writethrough_core::backend::Transaction>, u64) {
    let mut holder = pg.store.begin(TxOptions::default()).await.unwrap();
    let v = holder.apply(&write).await.unwrap().version;
    let _ = t;
    (holder, v)
}

/// A write that waits for its key lock draws its version only once the
/// lock is granted: a version drawn by a third session while it waits is
/// lower than the write's. Were `nextval` evaluated before the lock, the
/// blocked write's version would be the lower one.
#[tokio::test]
async fn a_blocked_write_draws_its_version_after_the_key_lock() {
    let pg = pg().await;
    let t = items(&unique("order"));
    pg.store.ensure_table(&t).await.unwrap();
    pg.store
        .execute(
            vec![upsert(&t, item(1, "a")), upsert(&t, item(2, "b"))],
            TxOptions::default(),
        )
        .await
        .unwrap();
    let cases: Vec<(&str, Vec<writethrough_core::backend::Write>, bool)> = vec![
        ("upsert", vec![upsert(&t, item(1, "x"))], false),
        ("upsert+outbox", vec![upsert(&t, item(1, "x"))], true),
        (
            "update",
            vec![update(&t, 1, Patch::new().set("qty", 1))],
            false,
        ),
        (
            "update+outbox",
            vec![update(&t, 1, Patch::new().set("qty", 2))],
            true,
        ),
        ("delete", vec![delete(&t, 1)], false),
        ("delete+outbox", vec![delete(&t, 1)], true),
        (
            "batch upsert",
            vec![upsert(&t, item(2, "y")), upsert(&t, item(1, "y"))],
            false,
        ),
        (
            "batch upsert+outbox",
            vec![upsert(&t, item(2, "y")), upsert(&t, item(1, "y"))],
            true,
        ),
        (
            "mixed batch",
            vec![upsert(&t, item(2, "z")), delete(&t, 1)],
            false,
        ),
    ];
    for (name, writes, outbox) in cases {
        let (holder, held) = hold_key(&pg, &t, upsert(&t, item(1, "held"))).await;
        let store = pg.store.clone();
        let blocked =
            tokio::spawn(
                async move { store.execute(writes, TxOptions::with_outbox(outbox)).await },
            );
        wait_for_lock_waiters(pg.store.pool(), 1).await;
        let drawn_meanwhile = pg.nextval().await as u64;
        assert!(!blocked.is_finished(), "{name}: must wait for the key lock");
        holder.commit().await.unwrap();
        let out = blocked.await.unwrap().unwrap();
        for o in &out {
            assert!(
                o.version > drawn_meanwhile && drawn_meanwhile > held,
                "{name}: held {held}, drawn while blocked {drawn_meanwhile}, blocked write got {}",
                o.version
            );
        }
    }
}

/// The case row locks alone get wrong: an insert that waits for a
/// concurrent delete of its key must commit a higher version than the delete.
#[tokio::test]
async fn an_insert_waiting_for_a_concurrent_delete_gets_the_higher_version() {
    let pg = pg().await;
    let t = items(&unique("insdel"));
    pg.store.ensure_table(&t).await.unwrap();
    pg.store
        .execute(vec![upsert(&t, item(1, "old"))], TxOptions::default())
        .await
        .unwrap();

    let (holder, delete_version) = hold_key(&pg, &t, delete(&t, 1)).await;
    let store = pg.store.clone();
    let t2 = t.clone();
    let insert = tokio::spawn(async move {
        store
            .execute(vec![upsert(&t2, item(1, "new"))], TxOptions::default())
            .await
    });
    wait_for_lock_waiters(pg.store.pool(), 1).await;
    holder.commit().await.unwrap();
    let out = insert.await.unwrap().unwrap().remove(0);
    assert!(out.version > delete_version);
    assert!(
        !out.existed,
        "the delete committed first: the insert found no row"
    );
    let got = pg.store.get(&t, &Key::Int(1)).await.unwrap().unwrap();
    assert_eq!(got.version, out.version);
    assert_eq!(got.row.get("name"), Some(&Value::Text("new".into())));
}

/// An update or delete that waited for the lock of a key whose row did not
/// exist when it started, while the lock's holder inserted it, must act on
/// that row: its statement snapshot cannot see the row, and the
/// fresh-snapshot check makes it run again.
#[tokio::test]
async fn updates_and_deletes_waiting_for_an_insert_act_on_the_inserted_row() {
    let pg = pg().await;
    let t = items(&unique("snap"));
    pg.store.ensure_table(&t).await.unwrap();
    for (id, is_delete, outbox) in [
        (1, true, false),
        (2, false, false),
        (3, true, true),
        (4, false, true),
    ] {
        let (holder, insert_version) = hold_key(&pg, &t, upsert(&t, item(id, "inserted"))).await;
        let w = if is_delete {
            delete(&t, id)
        } else {
            update(&t, id, Patch::new().set("qty", 7))
        };
        let store = pg.store.clone();
        let waiting =
            tokio::spawn(
                async move { store.execute(vec![w], TxOptions::with_outbox(outbox)).await },
            );
        wait_for_lock_waiters(pg.store.pool(), 1).await;
        holder.commit().await.unwrap();
        let out = waiting.await.unwrap().unwrap().remove(0);
        assert!(
            out.existed,
            "key {id}: the write must see the committed insert"
        );
        assert!(out.version > insert_version);
        assert_eq!(out.outbox_id.is_some(), outbox);
        let got = pg.store.get(&t, &Key::Int(id)).await.unwrap();
        if is_delete {
            assert_eq!(
                got, None,
                "key {id}: the delete must remove the inserted row"
            );
        } else {
            let got = got.unwrap();
            assert_eq!(got.version, out.version);
            assert_eq!(got.row.get("qty"), Some(&Value::Int(7)));
            assert_eq!(got.row.get("name"), Some(&Value::Text("inserted".into())));
            assert_eq!(out.row, Some(got.row));
        }
    }
}

/// Many clients write a few keys at once; afterwards each key holds what
/// its highest-versioned write left (the versions are the commit order),
/// and no two writes share a version.
#[tokio::test]
async fn concurrent_writers_leave_each_key_as_its_highest_version_says() {
    let pg = pg_with(|c| c.max_connections(8)).await;
    let t = items(&unique("stress"));
    pg.store.ensure_table(&t).await.unwrap();
    let mut tasks = Vec::new();
    for client in 0..8i64 {
        let store = pg.store.clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut log = Vec::new();
            for i in 0..60i64 {
                let key = (client * 7 + i) % 3;
                let w = match (client + i) % 4 {
                    0 | 1 => upsert(&t, item(key, &format!("c{client}i{i}"))),
                    2 => update(&t, key, Patch::new().set("qty", client * 1000 + i)),
                    _ => delete(&t, key),
                };
                let mut batch = vec![w.clone()];
                if i % 10 == 9 {
                    // A mixed batch now and then.
                    batch.push(upsert(&t, item((key + 1) % 3, &format!("b{client}i{i}"))));
                }
                let out = store
                    .execute(batch.clone(), TxOptions::default())
                    .await
                    .unwrap();
                for (w, o) in batch.into_iter().zip(out) {
                    log.push((w, o));
                }
            }
            log
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let mut versions: Vec<u64> = all.iter().map(|(_, o)| o.version).collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), all.len(), "versions are unique");
    for key in 0..3i64 {
        let last = all
            .iter()
            .filter(|(w, _)| match &w.op {
                writethrough_core::backend::WriteOp::Upsert(r) => {
                    r.get("id") == Some(&Value::Int(key))
                }
                writethrough_core::backend::WriteOp::Update(k, _)
                | writethrough_core::backend::WriteOp::Delete(k) => *k == Key::Int(key),
            })
            .max_by_key(|(_, o)| o.version)
            .unwrap();
        let got = pg.store.get(&t, &Key::Int(key)).await.unwrap();
        match (&last.0.op, got) {
            (writethrough_core::backend::WriteOp::Delete(_), got) => {
                assert_eq!(got, None, "key {key}")
            }
            (writethrough_core::backend::WriteOp::Update(..), got) if !last.1.existed => {
                assert_eq!(
                    got, None,
                    "key {key}: the last write was an update that found nothing"
                )
            }
            (_, Some(got)) => assert_eq!(got.version, last.1.version, "key {key}"),
            (_, None) => panic!("key {key}: the last write left a row, the table has none"),
        }
    }
}

#[tokio::test]
async fn execute_is_atomic_when_one_write_fails() {
    let pg = pg().await;
    let t = Table::builder(&unique("atomic"))
        .key("id", ColumnType::Int)
        .column("email", ColumnType::Text)
        .build()
        .unwrap();
    pg.store.ensure_table(&t).await.unwrap();
    pg.exec(&format!(
        "ALTER TABLE \"{}\" ADD CONSTRAINT \"{}_email\" UNIQUE (email)",
        t.name(),
        t.name()
    ))
    .await;
    let row = |id: i64, email: &str| Row::new().set("id", id).set("email", email);
    pg.store
        .execute(vec![upsert(&t, row(1, "one@x"))], TxOptions::default())
        .await
        .unwrap();
    let before = pg.store.get(&t, &Key::Int(1)).await.unwrap().unwrap();

    // The batch statement (upserts of one table).
    let e = pg
        .store
        .execute(
            vec![
                upsert(&t, row(2, "two@x")),
                upsert(&t, row(3, "three@x")),
                upsert(&t, row(4, "one@x")),
            ],
            TxOptions::with_outbox(true),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConstraintViolation, "{e}");
    assert!(!e.is_in_doubt());
    // The general path (a mix), the failing write last.
    let e = pg
        .store
        .execute(
            vec![
                upsert(&t, row(5, "five@x")),
                update(&t, 1, Patch::new().set("email", "changed@x")),
                delete(&t, 1),
                upsert(&t, row(6, "five@x")),
            ],
            TxOptions::with_outbox(true),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConstraintViolation, "{e}");
    for id in 2..=6 {
        assert_eq!(pg.store.get(&t, &Key::Int(id)).await.unwrap(), None, "{id}");
    }
    assert_eq!(pg.store.get(&t, &Key::Int(1)).await.unwrap(), Some(before));
    let pending = pg
        .store
        .outbox_pending(None, Duration::ZERO, 1000)
        .await
        .unwrap();
    assert!(
        pending.iter().all(|p| p.table != t.name().as_str()),
        "no outbox record of a failed batch: {pending:?}"
    );
}

#[tokio::test]
async fn outbox_records_appear_with_their_writes_and_are_removed() {
    let pg = pg().await;
    let t = items(&unique("outbox"));
    pg.store.ensure_table(&t).await.unwrap();
    let opts = TxOptions::with_outbox(true);
    let mut outcomes = Vec::new();
    outcomes.extend(
        pg.store
            .execute(vec![upsert(&t, item(1, "a"))], opts)
            .await
            .unwrap(),
    );
    outcomes.extend(
        pg.store
            .execute(vec![update(&t, 1, Patch::new().set("qty", 2))], opts)
            .await
            .unwrap(),
    );
    outcomes.extend(pg.store.execute(vec![delete(&t, 1)], opts).await.unwrap());
    outcomes.extend(
        pg.store
            .execute(
                (10..20).map(|i| upsert(&t, item(i, "batch"))).collect(),
                opts,
            )
            .await
            .unwrap(),
    );
    outcomes.extend(
        pg.store
            .execute(vec![upsert(&t, item(30, "m")), delete(&t, 10)], opts)
            .await
            .unwrap(),
    );
    let mut tx = pg.store.begin(opts).await.unwrap();
    outcomes.push(tx.apply(&delete(&t, 11)).await.unwrap());
    tx.commit().await.unwrap();
    // Without the option, no record.
    let plain = pg
        .store
        .execute(vec![upsert(&t, item(40, "plain"))], TxOptions::default())
        .await
        .unwrap();
    assert_eq!(plain[0].outbox_id, None);

    let pending: Vec<_> = pg
        .store
        .outbox_pending(None, Duration::ZERO, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.table == t.name().as_str())
        .collect();
    assert_eq!(pending.len(), outcomes.len());
    let by_id: HashMap<i64, _> = pending.iter().map(|p| (p.id, p)).collect();
    for o in &outcomes {
        let rec = by_id[&o.outbox_id.expect("every write has a record")];
        assert_eq!(rec.version, o.version);
    }
    assert!(
        pending.windows(2).all(|w| w[0].id < w[1].id),
        "oldest first"
    );
    let keys: Vec<&Key> = pending.iter().map(|p| &p.key).collect();
    assert_eq!(keys[0], &Key::Int(1));
    assert!(keys.contains(&&Key::Int(19)));

    // Too young for a long minimum age; the limit is honoured.
    assert!(
        pg.store
            .outbox_pending(None, Duration::from_secs(3600), 1000)
            .await
            .unwrap()
            .iter()
            .all(|p| p.table != t.name().as_str())
    );
    assert_eq!(
        pg.store
            .outbox_pending(None, Duration::ZERO, 3)
            .await
            .unwrap()
            .len(),
        3
    );

    let ids: Vec<i64> = pending.iter().map(|p| p.id).collect();
    pg.store.outbox_remove(ids[..5].to_vec()).await.unwrap();
    let left = pg
        .store
        .outbox_pending(None, Duration::ZERO, 1000)
        .await
        .unwrap();
    assert!(left.iter().all(|p| !ids[..5].contains(&p.id)));
    assert!(left.iter().any(|p| p.id == ids[5]));
    pg.store.outbox_remove(ids).await.unwrap();
    pg.store.outbox_remove(Vec::new()).await.unwrap();
    assert!(
        pg.store
            .outbox_pending(None, Duration::ZERO, 1000)
            .await
            .unwrap()
            .iter()
            .all(|p| p.table != t.name().as_str())
    );
}

#[tokio::test]
async fn batches_of_a_hundred_upserts_report_each_row() {
    let pg = pg().await;
    let t = all_types(&unique("hundred"));
    pg.store.ensure_table(&t).await.unwrap();
    let rows: Vec<Row> = (0..100).map(full_row).collect();
    let writes = || rows.iter().map(|r| upsert(&t, r.clone())).collect();
    let first = pg
        .store
        .execute(writes(), TxOptions::with_outbox(true))
        .await
        .unwrap();
    assert_eq!(first.len(), 100);
    assert!(first.iter().all(|o| !o.existed && o.outbox_id.is_some()));
    let second = pg
        .store
        .execute(writes(), TxOptions::default())
        .await
        .unwrap();
    assert!(second.iter().all(|o| o.existed && o.outbox_id.is_none()));
    let max_first = first.iter().map(|o| o.version).max().unwrap();
    assert!(second.iter().all(|o| o.version > max_first));
    for (i, o) in second.iter().enumerate() {
        let got = pg
            .store
            .get(&t, &Key::Int(i as i64))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.version, o.version, "row {i}");
        assert_eq!(got.row, t.normalize_row(rows[i].clone()).unwrap().1);
    }
    // A batch that repeats a key takes the general path; the later write wins.
    let out = pg
        .store
        .execute(
            vec![
                upsert(&t, full_row(5).set("i", 1)),
                upsert(&t, full_row(5).set("i", 2)),
            ],
            TxOptions::default(),
        )
        .await
        .unwrap();
    assert!(out[1].version > out[0].version);
    let got = pg.store.get(&t, &Key::Int(5)).await.unwrap().unwrap();
    assert_eq!(got.row.get("i"), Some(&Value::Int(2)));
}

#[tokio::test]
async fn transactions_see_their_writes_commit_and_roll_back() {
    let pg = pg().await;
    let t = items(&unique("tx"));
    pg.store.ensure_table(&t).await.unwrap();

    let mut tx = pg.store.begin(TxOptions::default()).await.unwrap();
    let w = tx.apply(&upsert(&t, item(1, "a"))).await.unwrap();
    let seen = tx.get(&t, &Key::Int(1)).await.unwrap().unwrap();
    assert_eq!(seen.version, w.version);
    assert_eq!(pg.store.get(&t, &Key::Int(1)).await.unwrap(), None);
    let u = tx
        .apply(&update(&t, 1, Patch::new().set("qty", 3)))
        .await
        .unwrap();
    assert!(u.existed && u.version > w.version);
    tx.commit().await.unwrap();
    assert_eq!(
        pg.store
            .get(&t, &Key::Int(1))
            .await
            .unwrap()
            .unwrap()
            .version,
        u.version
    );

    let mut tx = pg.store.begin(TxOptions::default()).await.unwrap();
    tx.apply(&delete(&t, 1)).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(pg.store.get(&t, &Key::Int(1)).await.unwrap().is_some());
}

#[tokio::test]
async fn a_dropped_transaction_rolls_back_and_releases_its_keys() {
    let pg = pg_with(|c| c.max_connections(2)).await;
    let t = items(&unique("dropped"));
    pg.store.ensure_table(&t).await.unwrap();
    let mut tx = pg.store.begin(TxOptions::with_outbox(true)).await.unwrap();
    tx.apply(&upsert(&t, item(1, "never"))).await.unwrap();
    drop(tx);
    assert_eq!(pg.store.get(&t, &Key::Int(1)).await.unwrap(), None);
    // The key lock went with it: a write of the key does not wait.
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        pg.store
            .execute(vec![upsert(&t, item(1, "now"))], TxOptions::default()),
    )
    .await
    .expect("the dropped transaction's lock must be released")
    .unwrap();
    assert!(!out[0].existed);
    assert!(
        pg.store
            .outbox_pending(None, Duration::ZERO, 100)
            .await
            .unwrap()
            .iter()
            .all(|p| p.table != t.name().as_str())
    );
}

#[tokio::test]
async fn ensure_table_is_idempotent_and_checks_existing_tables() {
    let pg = pg().await;
    let t = items(&unique("ensure"));
    pg.store.ensure_table(&t).await.unwrap();
    pg.store
        .execute(vec![upsert(&t, item(1, "kept"))], TxOptions::default())
        .await
        .unwrap();
    pg.store.ensure_table(&t).await.unwrap();
    assert!(pg.store.get(&t, &Key::Int(1)).await.unwrap().is_some());

    // A table made elsewhere, with other integer and text types, gets the
    // version column and works.
    let legacy = unique("Legacy");
    pg.exec(&format!(
        "CREATE TABLE \"{legacy}\" (\"Id\" integer PRIMARY KEY, \"Name\" varchar(20) NOT NULL, doc json, extra text);
         INSERT INTO \"{legacy}\" VALUES (1, 'pre-existing', '{{\"a\": 1}}', 'x')"
    ))
    .await;
    let lt = Table::builder(&legacy)
        .key("Id", ColumnType::Int)
        .column("Name", ColumnType::Text)
        .nullable("doc", ColumnType::Json)
        .build()
        .unwrap();
    pg.store.ensure_table(&lt).await.unwrap();
    let got = pg.store.get(&lt, &Key::Int(1)).await.unwrap().unwrap();
    assert_eq!(got.version, 0);
    assert_eq!(got.row.get("doc"), Some(&Value::Json(json!({"a": 1}))));
    let out = pg
        .store
        .execute(
            vec![upsert(&lt, Row::new().set("Id", 2).set("Name", "new"))],
            TxOptions::default(),
        )
        .await
        .unwrap();
    assert!(out[0].version > 0);
    // varchar(20) refuses a longer value: a bad value, not a backend failure.
    let e = pg
        .store
        .execute(
            vec![upsert(
                &lt,
                Row::new().set("Id", 3).set("Name", "x".repeat(30)),
            )],
            TxOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidValue, "{e}");

    // Names are case-sensitive: "name" is not "Name".
    let wrong_case = Table::builder(&legacy)
        .key("Id", ColumnType::Int)
        .column("name", ColumnType::Text)
        .build()
        .unwrap();
    let e = pg.store.ensure_table(&wrong_case).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SchemaMismatch, "{e}");

    // A missing column.
    let missing = Table::builder(&legacy)
        .key("Id", ColumnType::Int)
        .column("Name", ColumnType::Text)
        .column("price", ColumnType::Float)
        .build()
        .unwrap();
    let e = pg.store.ensure_table(&missing).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SchemaMismatch);
    assert!(e.to_string().contains("price"), "{e}");

    // A column whose type cannot hold the declared one (floats would be rounded).
    let wrong_type = Table::builder(&legacy)
        .key("Id", ColumnType::Int)
        .column("Name", ColumnType::Text)
        .nullable("extra", ColumnType::Float)
        .build()
        .unwrap();
    let e = pg.store.ensure_table(&wrong_type).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SchemaMismatch, "{e}");

    // A key without a unique index cannot be upserted.
    let nokey = unique("nokey");
    pg.exec(&format!("CREATE TABLE \"{nokey}\" (id bigint, name text)"))
        .await;
    let e = pg.store.ensure_table(&items(&nokey)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SchemaMismatch, "{e}");
}

#[tokio::test]
async fn concurrent_ensure_table_calls_from_several_tasks_all_succeed() {
    let pg = pg_with(|c| c.max_connections(10)).await;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_wt_version_seq') IS NOT NULL")
        .fetch_one(pg.store.pool())
        .await
        .unwrap();
    // A fresh server: the engine's own objects race too (unless an external
    // server was given).
    assert!(!exists || pg.server.is_external());
    let names: Vec<String> = (0..3).map(|_| unique("race")).collect();
    let mut tasks = Vec::new();
    for i in 0..12 {
        // Several stores, so that the calls really come from separate pools.
        let store = if i % 2 == 0 {
            pg.store.clone()
        } else {
            pg.other_store(|c| c.max_connections(2)).await
        };
        let t = items(&names[i % 3]);
        tasks.push(tokio::spawn(async move { store.ensure_table(&t).await }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    for name in &names {
        pg.store
            .execute(
                vec![upsert(&items(name), item(1, "x"))],
                TxOptions::default(),
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn database_errors_map_to_their_kinds() {
    let pg = pg().await;
    let t = Table::builder(&unique("errors"))
        .key("id", ColumnType::Int)
        .column("email", ColumnType::Text)
        .nullable("doc", ColumnType::Json)
        .build()
        .unwrap();
    pg.store.ensure_table(&t).await.unwrap();
    pg.exec(&format!(
        "ALTER TABLE \"{}\" ADD CONSTRAINT \"{}_email\" UNIQUE (email)",
        t.name(),
        t.name()
    ))
    .await;
    let row = |id: i64, email: &str| Row::new().set("id", id).set("email", email);
    let opts = TxOptions::default();
    pg.store
        .execute(vec![upsert(&t, row(1, "a@x"))], opts)
        .await
        .unwrap();

    // A user UNIQUE column.
    let e = pg
        .store
        .execute(vec![upsert(&t, row(2, "a@x"))], opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConstraintViolation, "{e}");
    assert!(!e.is_temporary() && !e.is_in_doubt());
    assert_eq!(e.backend(), Some("postgres"));

    // NUL bytes: PostgreSQL text cannot hold them, nor can jsonb strings.
    assert!(!pg.store.capabilities().text_allows_nul);
    let e = pg
        .store
        .execute(vec![upsert(&t, row(3, "nul\0byte"))], opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidValue, "{e}");
    assert!(!e.is_in_doubt());
    let e = pg
        .store
        .execute(
            vec![upsert(
                &t,
                row(3, "ok").set("doc", json!({"s": "nul\u{0}"})),
            )],
            opts,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidValue, "{e}");
    let e = pg
        .store
        .execute(vec![update(&t, 1, Patch::new().set("email", "x\0"))], opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidValue, "{e}");

    // A table that does not exist, and a column dropped behind our back.
    let ghost = items(&unique("ghost"));
    let e = pg.store.get(&ghost, &Key::Int(1)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SchemaMismatch, "{e}");
    pg.exec(&format!("ALTER TABLE \"{}\" DROP COLUMN doc", t.name()))
        .await;
    let e = pg
        .store
        .execute(vec![upsert(&t, row(4, "d@x"))], opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SchemaMismatch, "{e}");

    // Bad input is refused before anything is sent.
    let e = pg
        .store
        .execute(vec![upsert(&t, Row::new().set("id", 5))], opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidValue, "{e}");
    let e = pg
        .store
        .execute(vec![delete(&t, "text key")], opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidKey, "{e}");
}

#[tokio::test]
async fn a_held_connection_exhausts_a_pool_of_one() {
    let pg = pg().await;
    let t = items(&unique("exhaust"));
    pg.store.ensure_table(&t).await.unwrap();
    let small = pg
        .other_store(|c| {
            c.max_connections(1)
                .acquire_timeout(Duration::from_millis(300))
        })
        .await;
    let held = small.begin(TxOptions::default()).await.unwrap();
    let e = small
        .execute(vec![upsert(&t, item(1, "x"))], TxOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PoolExhausted, "{e}");
    assert!(e.is_temporary());
    assert!(!e.is_in_doubt(), "nothing was sent");
    let e = small.get(&t, &Key::Int(1)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PoolExhausted);
    held.rollback().await.unwrap();
    small
        .execute(vec![upsert(&t, item(1, "x"))], TxOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_deadlock_between_transactions_is_a_temporary_deadlock_error() {
    let pg = pg().await;
    let t = items(&unique("deadlock"));
    pg.store.ensure_table(&t).await.unwrap();
    let mut tx1 = pg.store.begin(TxOptions::default()).await.unwrap();
    let mut tx2 = pg.store.begin(TxOptions::default()).await.unwrap();
    tx1.apply(&upsert(&t, item(1, "tx1"))).await.unwrap();
    tx2.apply(&upsert(&t, item(2, "tx2"))).await.unwrap();
    let w2 = upsert(&t, item(2, "tx1"));
    let first = tokio::spawn(async move {
        let r = tx1.apply(&w2).await;
        // The loser's locks must go for the winner to finish.
        drop(tx1);
        r
    });
    wait_for_lock_waiters(pg.store.pool(), 1).await;
    let second = tx2.apply(&upsert(&t, item(1, "tx2"))).await;
    drop(tx2);
    let first = first.await.unwrap();
    let errors: Vec<_> = [first, second]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "PostgreSQL breaks the deadlock by failing one: {errors:?}"
    );
    assert_eq!(errors[0].kind(), ErrorKind::Deadlock, "{}", errors[0]);
    assert!(errors[0].is_temporary());
    assert!(errors[0].kind().is_retryable_transaction());
    assert!(!errors[0].message().is_empty());
}

/// A statement timeout bounds a wait for a key lock.
#[tokio::test]
async fn a_statement_timeout_bounds_a_wait_for_a_key_lock() {
    let pg = pg().await;
    let t = items(&unique("timeout"));
    pg.store.ensure_table(&t).await.unwrap();
    let impatient = pg
        .other_store(|c| c.statement_timeout(Some(Duration::from_millis(200))))
        .await;
    let (holder, _) = hold_key(&pg, &t, upsert(&t, item(1, "held"))).await;
    let e = impatient
        .execute(vec![upsert(&t, item(1, "late"))], TxOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.is_temporary() && !e.is_in_doubt());
    holder.rollback().await.unwrap();
}

/// A write whose connection dies while the statement is in flight may or
/// may not have committed: in doubt. A read is never in doubt.
#[tokio::test]
async fn a_connection_lost_mid_write_or_mid_commit_is_in_doubt() {
    let pg = pg().await;
    let t = items(&unique("doubt"));
    pg.store.ensure_table(&t).await.unwrap();

    // An autocommit write, blocked on its key lock, whose session is killed.
    let (holder, _) = hold_key(&pg, &t, upsert(&t, item(1, "held"))).await;
    let store = pg.store.clone();
    let t2 = t.clone();
    let write = tokio::spawn(async move {
        store
            .execute(vec![upsert(&t2, item(1, "lost"))], TxOptions::default())
            .await
    });
    wait_for_lock_waiters(pg.store.pool(), 1).await;
    let pid = lock_waiter_pid(pg.store.pool()).await;
    pg.exec(&format!("SELECT pg_terminate_backend({pid})"))
        .await;
    let e = write.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_in_doubt(), "{e}");
    assert!(e.is_temporary());
    holder.rollback().await.unwrap();

    // A commit whose session is killed first.
    let mut tx = pg.store.begin(TxOptions::default()).await.unwrap();
    tx.apply(&upsert(&t, item(2, "maybe"))).await.unwrap();
    pg.exec(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE state = 'idle in transaction' AND pid <> pg_backend_pid()",
    )
    .await;
    let e = tx.commit().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_in_doubt(), "{e}");
}

/// With the server gone, calls fail fast as Unavailable (reads never in
/// doubt); after a restart on the same port the pool heals and committed
/// data is still there.
#[tokio::test]
async fn the_store_reports_a_dead_server_and_recovers_after_a_restart() {
    let mut pg = pg_with(|c| c.max_connections(2).acquire_timeout(Duration::from_secs(2))).await;
    if pg.server.is_external() {
        panic!("this test kills its server: unset WT_TEST_POSTGRES_URL");
    }
    let t = items(&unique("restart"));
    pg.store.ensure_table(&t).await.unwrap();
    let before = pg
        .store
        .execute(vec![upsert(&t, item(1, "durable"))], TxOptions::default())
        .await
        .unwrap();
    pg.server.kill().await.unwrap();
    let e = pg.store.get(&t, &Key::Int(1)).await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::PoolExhausted),
        "{e}"
    );
    assert!(!e.is_in_doubt(), "a read is never in doubt: {e}");
    assert!(pg.store.ping().await.is_err());
    let e = pg
        .store
        .execute(vec![upsert(&t, item(2, "x"))], TxOptions::default())
        .await
        .unwrap_err();
    assert!(e.is_temporary(), "{e}");

    pg.server.restart().await.unwrap();
    let mut healed = None;
    for _ in 0..10 {
        match pg.store.get(&t, &Key::Int(1)).await {
            Ok(row) => {
                healed = row;
                break;
            }
            Err(e) => {
                assert!(e.is_temporary(), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let got = healed.expect("the store must recover after the restart");
    assert_eq!(got.version, before[0].version);
    let after = pg
        .store
        .execute(vec![upsert(&t, item(1, "after"))], TxOptions::default())
        .await
        .unwrap();
    assert!(after[0].version > before[0].version);
}

/// Latency on the wire makes round trips countable: with 100 ms each way,
/// a call costs about 200 ms per round trip.
#[tokio::test]
async fn single_writes_and_one_table_batches_cost_one_round_trip() {
    use writethrough_testkit::proxy::FaultProxy;

    let pg = pg().await;
    let t = items(&unique("rtt"));
    pg.store.ensure_table(&t).await.unwrap();
    let proxy = FaultProxy::start(pg.server.addr()).await.unwrap();
    let url = proxy.url(&pg.server.url());
    let cfg = writethrough_postgres::PostgresConfig::from_url(&url)
        .unwrap()
        .max_connections(1)
        .ping_idle_after(None);
    let store = writethrough_postgres::PostgresStore::with_config(cfg)
        .await
        .unwrap();
    let opts = TxOptions::with_outbox(true);
    let calls: Vec<(&str, Vec<writethrough_core::backend::Write>, u32)> = vec![
        ("upsert", vec![upsert(&t, item(1, "a"))], 1),
        ("update", vec![update(&t, 1, Patch::new().set("qty", 1))], 1),
        ("delete", vec![delete(&t, 1)], 1),
        (
            "batch of 100 upserts",
            (0..100).map(|i| upsert(&t, item(i, "b"))).collect(),
            1,
        ),
        (
            "mixed pair",
            vec![upsert(&t, item(1, "a")), delete(&t, 2)],
            5,
        ),
    ];
    // Warm up: statements are prepared on first use.
    for (_, w, _) in &calls {
        store.execute(w.clone(), opts).await.unwrap();
    }
    let one_way = Duration::from_millis(100);
    proxy.set_latency(one_way);
    for (name, w, trips) in calls {
        // Let sqlx's ping of the returned connection finish first.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let started = std::time::Instant::now();
        store.execute(w, opts).await.unwrap();
        let took = started.elapsed();
        let rtt = one_way * 2;
        assert!(
            took >= rtt * trips && took < rtt * trips + rtt * 3 / 4,
            "{name}: took {took:?}, expected {trips} round trip(s) of {rtt:?}"
        );
    }
    proxy.heal();
}

/// A transaction left idle past `idle_in_transaction_timeout` is ended by
/// the server, its locks released; its commit fails, and is not in doubt.
#[tokio::test]
async fn an_idle_transaction_is_ended_by_the_server_and_releases_its_keys() {
    let pg = pg().await;
    let t = items(&unique("idle"));
    pg.store.ensure_table(&t).await.unwrap();
    let forgetful = pg
        .other_store(|c| c.idle_in_transaction_timeout(Some(Duration::from_millis(300))))
        .await;
    let mut tx = forgetful.begin(TxOptions::default()).await.unwrap();
    tx.apply(&upsert(&t, item(1, "forgotten"))).await.unwrap();
    // Another writer of the key gets through once the server ends the session.
    tokio::time::timeout(
        Duration::from_secs(10),
        pg.store
            .execute(vec![upsert(&t, item(1, "next"))], TxOptions::default()),
    )
    .await
    .expect("the idle transaction's key lock must be released")
    .unwrap();
    let e = tx.commit().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.is_temporary(), "{e}");
    assert!(!e.is_in_doubt(), "the server rolled it back: {e}");
    let got = pg.store.get(&t, &Key::Int(1)).await.unwrap().unwrap();
    assert_eq!(got.row.get("name"), Some(&Value::Text("next".into())));
}

/// Many clients read, upsert, update and delete four hot keys straight on
/// the store (no cache); every key's history must be linearizable as a
/// register, `existed` flags included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_histories_on_the_store_alone_are_linearizable() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use writethrough_testkit::history::{Event, Op, Recorder, linearizable};

    let pg = pg_with(|c| c.max_connections(16)).await;
    let t = items(&unique("lin"));
    pg.store.ensure_table(&t).await.unwrap();
    let rec = Arc::new(Recorder::default());
    let next = Arc::new(AtomicU32::new(1));
    let ops_per_client: u32 = std::env::var("WT_HISTORY_OPS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(400, |n| n / 16);
    let mut tasks = Vec::new();
    for client in 0..16u32 {
        let (store, t, rec, next) = (pg.store.clone(), t.clone(), rec.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..ops_per_client {
                let mix = (client * 31 + i * 17) % 100;
                let key = i64::from((client + i * 7) % 4);
                let call = rec.now();
                let op = match mix {
                    0..40 => {
                        let got = store.get(&t, &Key::Int(key)).await.unwrap();
                        Op::Read(got.map(|vr| match vr.row.get("qty") {
                            Some(Value::Int(q)) => *q as u32,
                            other => panic!("qty {other:?}"),
                        }))
                    }
                    40..65 => {
                        let v = next.fetch_add(1, Ordering::SeqCst);
                        store
                            .execute(
                                vec![upsert(&t, item(key, "w").set("qty", i64::from(v)))],
                                TxOptions::default(),
                            )
                            .await
                            .unwrap();
                        Op::Write(v)
                    }
                    65..85 => {
                        let v = next.fetch_add(1, Ordering::SeqCst);
                        let out = store
                            .execute(
                                vec![update(&t, key, Patch::new().set("qty", i64::from(v)))],
                                TxOptions::default(),
                            )
                            .await
                            .unwrap();
                        Op::Update(v, out[0].existed)
                    }
                    _ => {
                        let out = store
                            .execute(vec![delete(&t, key)], TxOptions::default())
                            .await
                            .unwrap();
                        Op::Delete(out[0].existed)
                    }
                };
                let ret = rec.now();
                rec.record(Event {
                    key,
                    op,
                    call,
                    ret,
                    client,
                });
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let events = rec.events();
    assert_eq!(events.len(), 16 * ops_per_client as usize);
    for key in 0..4 {
        let mut evs: Vec<Event> = events.iter().filter(|e| e.key == key).copied().collect();
        evs.sort_by_key(|e| e.call);
        assert!(linearizable(&evs), "key {key}: not linearizable");
    }
}

#[tokio::test]
async fn connecting_to_a_closed_port_names_the_cause_at_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?acquire_timeout=5s");
    let e = writethrough_postgres::PostgresStore::connect(&url)
        .await
        .expect_err("nothing listens there");
    assert_eq!(e.kind(), writethrough_core::ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
}

/// A URL naming a database that does not exist is a configuration error
/// with a message, not an anonymous backend error.
#[tokio::test]
async fn a_database_that_does_not_exist_is_a_config_error_with_a_message() {
    let pg = pg().await;
    let url = pg.server.url();
    let (base, _) = url.rsplit_once('/').expect("a URL with a database");
    let url = format!("{base}/no_such_database");
    let e = writethrough_postgres::PostgresStore::connect(&url)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), writethrough_core::ErrorKind::Config, "{e}");
    assert!(e.message().contains("does not exist"), "{e}");
}

/// One transaction writes 20,000 distinct keys and then a batch of 100,000
/// rows commits: keys hash into a bounded set of lock slots, where one lock
/// per key exhausted the server's lock table ("out of shared memory").
#[tokio::test]
async fn transactions_of_any_size_stay_within_the_lock_table() {
    let pg = pg().await;
    let t = items(&unique("many"));
    pg.store.ensure_table(&t).await.unwrap();
    let mut tx = pg.store.begin(TxOptions::default()).await.unwrap();
    for i in 0..20_000 {
        tx.apply(&upsert(&t, item(i, "scoped"))).await.unwrap();
    }
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
            .fetch_one(pg.store.pool())
            .await
            .unwrap();
    assert!(
        held <= 1024,
        "{held} advisory locks held by one transaction"
    );
    tx.commit().await.unwrap();
    let batch: Vec<_> = (0..100_000).map(|i| upsert(&t, item(i, "batch"))).collect();
    let out = pg
        .store
        .execute(batch, TxOptions::with_outbox(true))
        .await
        .expect("a batch of 100,000 rows");
    assert_eq!(out.len(), 100_000);
    let mixed: Vec<_> = (0..15_000)
        .map(|i| upsert(&t, item(i, "mixed")))
        .chain(std::iter::once(writethrough_core::backend::Write {
            table: t.clone(),
            op: writethrough_core::backend::WriteOp::Delete(Key::Int(0)),
        }))
        .collect();
    pg.store
        .execute(mixed, TxOptions::default())
        .await
        .expect("the general path locks slots too");
}

/// The shared database suite (crates/testkit/src/suite/db.rs) on PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn the_shared_db_suite_passes_on_postgres() {
    let pg = pg().await;
    let cache = writethrough_moka::MokaCache::default();
    let pair = writethrough_testkit::suite::Pair::new(
        std::sync::Arc::new(cache),
        std::sync::Arc::new(pg.store.clone()),
    );
    writethrough_testkit::suite::assert_conformance(
        "db suite: postgres",
        pair,
        writethrough_testkit::suite::db::cases(),
    )
    .await;
}

type WriteTask = tokio::task::JoinHandle<writethrough_core::Result<Vec<WriteOutcome>>>;

/// A single upsert of `item(id, name)` with the outbox, in a task of its own.
fn spawn_upsert(
    store: &writethrough_postgres::PostgresStore,
    t: &Table,
    id: i64,
    name: &str,
) -> WriteTask {
    let (s, w) = (store.clone(), upsert(t, item(id, name)));
    tokio::spawn(async move { s.execute(vec![w], TxOptions::with_outbox(true)).await })
}

/// Writes to `keys` (with `name`s) started one after another on `store`,
/// each queued behind the blocked leader before the next starts.
async fn queue_writes(
    store: &writethrough_postgres::PostgresStore,
    t: &Table,
    writes: &[(i64, &str)],
) -> Vec<WriteTask> {
    let mut handles = Vec::new();
    for (n, &(id, name)) in writes.iter().enumerate() {
        handles.push(spawn_upsert(store, t, id, name));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while store.coalesce_stats().queued < n as u64 + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "write {n} never queued"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    handles
}

/// Concurrent single writes share one statement and one commit: while the
/// only lane waits for a key lock, fifteen writes queue, and they commit in
/// one batch once it is free, each with its own version; a key queued twice
/// keeps its order.
#[tokio::test]
async fn queued_single_writes_commit_together_and_keep_their_order_per_key() {
    let pg = pg().await;
    let t = items(&unique("coalesce"));
    pg.store.ensure_table(&t).await.unwrap();
    // One connection: no extra lane can open, so the queue waits for the
    // leader, deterministically.
    let writer = pg
        .other_store(|c| c.max_connections(1).coalesce_lanes(1))
        .await;
    let (holder, _) = hold_key(&pg, &t, upsert(&t, item(1, "held"))).await;
    let leader = spawn_upsert(&writer, &t, 1, "leader");
    wait_for_lock_waiters(pg.store.pool(), 1).await;
    let mut writes: Vec<(i64, String)> = (2..=14).map(|id| (id, format!("v{id}"))).collect();
    writes.push((2, "second".into()));
    writes.push((15, "v15".into()));
    let refs: Vec<(i64, &str)> = writes.iter().map(|(i, n)| (*i, n.as_str())).collect();
    let queued = queue_writes(&writer, &t, &refs).await;
    assert_eq!(writer.coalesce_stats().batches, 0);
    holder.commit().await.unwrap();
    let leader = leader.await.unwrap().unwrap();
    let mut outs = Vec::new();
    for h in queued {
        outs.push(h.await.unwrap().unwrap().remove(0));
    }
    let stats = writer.coalesce_stats();
    assert!(
        stats.batches >= 1 && stats.writes >= 14,
        "fifteen queued writes of fourteen keys: {stats:?}"
    );
    assert_eq!(stats.queued, 0);
    let mut versions: Vec<u64> = outs.iter().map(|o| o.version).collect();
    versions.push(leader[0].version);
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), 16, "every write its own version");
    // Key 2: "v2" queued before "second", so committed before it.
    assert!(outs[13].version > outs[0].version, "{outs:?}");
    for (id, name) in [(1, "leader"), (2, "second"), (7, "v7"), (15, "v15")] {
        let row = pg.store.get(&t, &Key::from(id)).await.unwrap().unwrap();
        assert_eq!(row.row.get("name"), Some(&Value::from(name)), "key {id}");
    }
    // Every write recorded in the outbox, coalesced or not.
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM \"_wt_outbox\"")
        .fetch_one(pg.store.pool())
        .await
        .unwrap();
    assert_eq!(pending, 16, "one outbox record per write");
}

/// A batch the database refuses as a whole commits nothing; its writes run
/// again one by one, so only the bad row's writer fails.
#[tokio::test]
async fn one_bad_row_in_a_coalesced_batch_fails_only_its_writer() {
    let pg = pg().await;
    let t = items(&unique("coalbad"));
    pg.store.ensure_table(&t).await.unwrap();
    pg.exec(&format!(
        "ALTER TABLE \"{}\" ADD CONSTRAINT \"{}_name\" CHECK (name <> 'bad')",
        t.name(),
        t.name()
    ))
    .await;
    let writer = pg
        .other_store(|c| c.max_connections(1).coalesce_lanes(1))
        .await;
    let (holder, _) = hold_key(&pg, &t, upsert(&t, item(1, "held"))).await;
    let leader = spawn_upsert(&writer, &t, 1, "leader");
    wait_for_lock_waiters(pg.store.pool(), 1).await;
    let queued = queue_writes(&writer, &t, &[(2, "ok"), (3, "bad"), (4, "ok")]).await;
    holder.commit().await.unwrap();
    leader.await.unwrap().unwrap();
    let results: Vec<_> = futures_join(queued).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    let e = results[1].as_ref().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConstraintViolation, "{e}");
    assert!(!e.is_in_doubt());
    assert_eq!(writer.coalesce_stats().batches, 1);
    assert!(pg.store.get(&t, &Key::from(3)).await.unwrap().is_none());
    for id in [2, 4] {
        let row = pg.store.get(&t, &Key::from(id)).await.unwrap().unwrap();
        assert_eq!(row.row.get("name"), Some(&Value::from("ok")));
    }
}

async fn futures_join(hs: Vec<WriteTask>) -> Vec<writethrough_core::Result<Vec<WriteOutcome>>> {
    let mut out = Vec::new();
    for h in hs {
        out.push(h.await.unwrap());
    }
    out
}

/// A lane stalled behind a long transaction does not hold the queue: a
/// queued write to another key opens one more lane and commits while the
/// lock is still held. With coalescing off nothing is ever batched.
#[tokio::test]
async fn a_stalled_lane_does_not_hold_the_queue_and_off_means_off() {
    let pg = pg().await;
    let t = items(&unique("coalstall"));
    pg.store.ensure_table(&t).await.unwrap();
    for lanes in [1, 0] {
        let writer = pg.other_store(|c| c.coalesce_lanes(lanes)).await;
        let (holder, _) = hold_key(&pg, &t, upsert(&t, item(1, "held"))).await;
        let leader = spawn_upsert(&writer, &t, 1, "leader");
        wait_for_lock_waiters(pg.store.pool(), 1).await;
        // Commits while key 1 is still held.
        let others: Vec<_> = (2..6)
            .map(|id| spawn_upsert(&writer, &t, id, "other"))
            .collect();
        for r in futures_join(others).await {
            r.unwrap();
        }
        assert!(!leader.is_finished());
        let stats = writer.coalesce_stats();
        if lanes == 0 {
            assert_eq!(stats, writethrough_postgres::CoalesceStats::default());
        } else {
            assert!(stats.extra_lanes >= 1, "{stats:?}");
        }
        holder.commit().await.unwrap();
        leader.await.unwrap().unwrap();
    }
}

/// A coalesced batch waits for each key lock only so long: with one of its
/// keys held by a long transaction, it gives up (committing nothing) and
/// its writes run one by one, so the others commit while that key is still
/// held; the held key's write commits once it is free.
#[tokio::test]
async fn a_long_held_key_splits_a_coalesced_batch_instead_of_holding_it() {
    let pg = pg().await;
    let t = items(&unique("coalsplit"));
    pg.store.ensure_table(&t).await.unwrap();
    // One lane; three connections so that the split writes can run at once.
    let writer = pg
        .other_store(|c| c.max_connections(3).coalesce_lanes(1))
        .await;
    let (leader_lock, _) = hold_key(&pg, &t, upsert(&t, item(5, "held"))).await;
    let (long_tx, _) = hold_key(&pg, &t, upsert(&t, item(1, "held long"))).await;
    let leader = spawn_upsert(&writer, &t, 5, "leader");
    wait_for_lock_waiters(pg.store.pool(), 1).await;
    // Spawned together, they queue in the same turn of this runtime, so
    // the lane opened for the stalled queue carries all three in one batch.
    let mut queued: Vec<_> = [(1, "v1"), (2, "v2"), (3, "v3")]
        .into_iter()
        .map(|(id, name)| spawn_upsert(&writer, &t, id, name))
        .collect();
    let (w2, w3) = (queued.remove(1), queued.remove(1));
    // Both commit while keys 1 and 5 are still held (were the batch to
    // wait for key 1, they would wait as long as the transaction lasts).
    for w in [w2, w3] {
        tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("a write batched with a long-held key waits for it")
            .unwrap()
            .unwrap();
    }
    let stats = writer.coalesce_stats();
    assert!(stats.batches >= 1 && stats.split >= 1, "{stats:?}");
    assert!(!queued[0].is_finished(), "key 1 is still held");
    long_tx.commit().await.unwrap();
    let w1 = queued.remove(0).await.unwrap().unwrap();
    leader_lock.commit().await.unwrap();
    leader.await.unwrap().unwrap();
    let row = pg.store.get(&t, &Key::from(1)).await.unwrap().unwrap();
    assert_eq!(row.row.get("name"), Some(&Value::from("v1")));
    assert_eq!(row.version, w1[0].version);
}
