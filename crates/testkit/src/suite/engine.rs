//! The engine suite: every operation of the write-through pattern and every
//! rule of the design, on any cache + database pair.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use serde::{Deserialize, Serialize};
use writethrough_core::codec::{self, Decoded};
use writethrough_core::{
    BreakerState, ColumnType, Consistency, Engine, Entity, ErrorKind, Handle, Key, KeyRule, Patch,
    Row, Table, TableOptions, TxOptions, Value, Write, WriteOp, WriteOptions,
};

use super::{Case, Outcome, Pair, eventually, unique};
use crate::faults::{FaultyCache, FaultyDb};

/// Every case of the engine suite.
pub fn cases() -> Vec<Case> {
    crate::cases![
        put_then_get_is_a_cache_hit,
        cold_read_misses_loads_once_then_hits,
        missing_key_reads_none,
        update_reads_back_the_whole_row_and_caches_it,
        update_of_a_missing_row_returns_none,
        delete_reports_existence_and_leaves_a_tombstone,
        put_many_is_one_transaction_and_one_cache_round_trip,
        put_many_with_one_bad_row_writes_nothing,
        put_many_refuses_a_key_twice,
        validation_failure_writes_nothing,
        validated_update_that_fails_is_rolled_back,
        conditional_caching_writes_the_db_and_caches_only_when_told,
        ttl_comes_from_call_then_computed_then_table_then_default,
        entries_expire_after_their_ttl,
        db_failure_leaves_the_cache_without_the_new_value,
        db_commit_in_doubt_never_serves_the_old_value,
        cache_failure_after_commit_keeps_the_write_and_serves_no_stale_value,
        transaction_scope_applies_cache_effects_only_after_commit,
        transaction_scope_rollback_leaves_both_stores_untouched,
        dropped_transaction_scope_rolls_back,
        hundred_concurrent_cold_reads_cause_one_db_load,
        corrupt_or_foreign_cache_bytes_read_as_a_miss_and_are_repaired,
        bad_input_is_refused_before_any_side_effect,
        keys_the_cache_cannot_hold_are_refused,
        get_or_load_caches_the_loaded_value_below_any_write,
        typed_and_row_handles_see_the_same_rows,
        applied_outbox_records_are_removed,
        reconcile_replays_what_a_crashed_writer_left,
        cache_outage_opens_the_breaker_and_resyncs_before_serving,
        audit_finds_and_repairs_a_divergent_entry,
        warm_loads_rows_into_an_empty_cache,
        health_reports_throughput_latency_and_failures,
    ]
}

/// The typed row the suite writes: one column of every type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Key.
    pub id: i64,
    /// Text.
    pub name: String,
    /// Float.
    pub price: f64,
    /// Integer.
    pub qty: i64,
    /// Boolean.
    pub active: bool,
    /// Nullable text.
    pub note: Option<String>,
    /// JSON.
    pub tags: serde_json::Value,
    /// Nullable bytes.
    pub blob: Option<Vec<u8>>,
}

impl Entity for Item {
    fn table() -> Table {
        Table::builder("items")
            .key("id", ColumnType::Int)
            .column("name", ColumnType::Text)
            .column("price", ColumnType::Float)
            .column("qty", ColumnType::Int)
            .column("active", ColumnType::Bool)
            .nullable("note", ColumnType::Text)
            .column("tags", ColumnType::Json)
            .nullable("blob", ColumnType::Bytes)
            .build()
            .expect("a valid schema")
    }
}

/// An item with recognisable values.
pub fn item(id: i64, price: f64) -> Item {
    Item {
        id,
        name: format!("item {id} ✓"),
        price,
        qty: id % 7,
        active: id % 2 == 0,
        note: (id % 3 == 0).then(|| format!("note {id}")),
        tags: serde_json::json!({"id": id, "t": ["a", "b"]}),
        blob: (id % 2 == 1).then(|| vec![0, 1, 2, 255]),
    }
}

/// A fresh table of items with its own name, and an engine over `pair`.
pub async fn setup(pair: &Pair, opts: TableOptions<Item>) -> (Engine, Handle<Item>) {
    setup_with(pair, |_| {}, opts).await
}

/// [`setup`] with the engine's settings edited first.
pub async fn setup_with(
    pair: &Pair,
    configure: impl FnOnce(&mut writethrough_core::Config),
    opts: TableOptions<Item>,
) -> (Engine, Handle<Item>) {
    let engine = pair
        .builder()
        .configure(configure)
        .build()
        .expect("engine builds");
    // The first epoch check writes the cache's epoch record: done here, so
    // that the cases count only their own cache calls.
    engine
        .check_cache_epoch()
        .await
        .expect("the cache's epoch is checked");
    let table = Item::table().renamed(&unique("items")).expect("valid name");
    let items = engine
        .register_in(table, opts)
        .await
        .expect("table registers");
    (engine, items)
}

/// What the cache holds for `key`: `Some((is_row, version))`, or `None`.
pub async fn cached<R: writethrough_core::Record>(
    pair: &Pair,
    h: &Handle<R>,
    key: impl Into<Key>,
) -> Option<(bool, u64)> {
    let ck = h.cache_key(key).expect("valid key");
    let bytes = pair.cache.get(&ck).await.expect("cache answers")?;
    match codec::decode(&bytes) {
        Decoded::Row { version, .. } => Some((true, version)),
        Decoded::Tombstone { version, .. } => Some((false, version)),
        Decoded::Corrupt => panic!("the cache holds unreadable bytes at {ck}"),
    }
}

/// The database's row for `key` through a plain read, with its version.
pub async fn in_db(pair: &Pair, h: &Handle<Item>, key: i64) -> Option<(Item, u64)> {
    let vr = pair
        .db
        .get(h.table(), &Key::Int(key))
        .await
        .expect("database answers")?;
    let json: serde_json::Map<String, serde_json::Value> = vr
        .row
        .iter()
        .map(|(c, v)| (c.as_str().to_owned(), codec::value_to_json(v)))
        .collect();
    Some((
        serde_json::from_value(json.into()).expect("row fits Item"),
        vr.version,
    ))
}

/// Writes `item` into the database only, as another application would.
async fn db_only_put(pair: &Pair, h: &Handle<Item>, it: &Item) -> u64 {
    let row = writethrough_core::Record::to_row(it).expect("row");
    let (_, row) = h.table().normalize_row(row).expect("normalizes");
    let out = pair
        .db
        .execute(
            vec![Write {
                table: h.table().clone(),
                op: WriteOp::Upsert(row),
            }],
            TxOptions::default(),
        )
        .await
        .expect("direct write");
    out[0].version
}

/// A put is written through: the next read is served from the cache.
pub async fn put_then_get_is_a_cache_hit(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let v = items.put(&item(1, 1.5)).await.unwrap();
    assert!(v > 0, "versions start above 0");
    assert_eq!(cached(&pair, &items, 1).await, Some((true, v)));
    let before = engine.stats();
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 1.5)));
    let after = engine.stats();
    assert_eq!(after.hits - before.hits, 1);
    assert_eq!(after.loads, before.loads, "a hit does not load");
    Outcome::Passed
}

/// A row the cache lacks is loaded once, cached at its version, then hit.
pub async fn cold_read_misses_loads_once_then_hits(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let v = db_only_put(&pair, &items, &item(7, 3.0)).await;
    assert_eq!(cached(&pair, &items, 7).await, None);
    assert_eq!(items.get(7).await.unwrap(), Some(item(7, 3.0)));
    let s = engine.stats();
    assert_eq!((s.misses, s.loads, s.populates), (1, 1, 1));
    assert_eq!(cached(&pair, &items, 7).await, Some((true, v)));
    assert_eq!(items.get(7).await.unwrap(), Some(item(7, 3.0)));
    assert_eq!(engine.stats().hits, 1);
    assert_eq!(engine.stats().loads, 1);
    Outcome::Passed
}

/// A key with no row reads as `None` and leaves the cache empty.
pub async fn missing_key_reads_none(pair: Pair) -> Outcome {
    let (_, items) = setup(&pair, TableOptions::new()).await;
    assert_eq!(items.get(404).await.unwrap(), None);
    assert_eq!(cached(&pair, &items, 404).await, None);
    Outcome::Passed
}

/// An update sets some columns, returns the whole new row, and caches it.
pub async fn update_reads_back_the_whole_row_and_caches_it(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let v1 = items.put(&item(2, 10.0)).await.unwrap();
    let new = items
        .update(2, Patch::new().set("price", 12.25).set("note", "sale"))
        .await
        .unwrap()
        .expect("row exists");
    let mut want = item(2, 12.25);
    want.note = Some("sale".into());
    assert_eq!(new, want, "the other columns are kept");
    let (db_row, v2) = in_db(&pair, &items, 2).await.unwrap();
    assert_eq!(db_row, want);
    assert!(v2 > v1);
    assert_eq!(cached(&pair, &items, 2).await, Some((true, v2)));
    let hits = engine.stats().hits;
    assert_eq!(items.get(2).await.unwrap(), Some(want));
    assert_eq!(engine.stats().hits, hits + 1);
    Outcome::Passed
}

/// Updating a row that does not exist returns `None` and writes nothing readable.
pub async fn update_of_a_missing_row_returns_none(pair: Pair) -> Outcome {
    let (_, items) = setup(&pair, TableOptions::new()).await;
    assert_eq!(
        items.update(5, Patch::new().set("qty", 1)).await.unwrap(),
        None
    );
    assert_eq!(in_db(&pair, &items, 5).await, None);
    assert!(matches!(
        cached(&pair, &items, 5).await,
        None | Some((false, _))
    ));
    assert_eq!(items.get(5).await.unwrap(), None);
    Outcome::Passed
}

/// A delete says whether it removed a row and fences the key with a tombstone.
pub async fn delete_reports_existence_and_leaves_a_tombstone(pair: Pair) -> Outcome {
    let (_, items) = setup(&pair, TableOptions::new()).await;
    let v = items.put(&item(3, 1.0)).await.unwrap();
    assert!(items.delete(3).await.unwrap());
    match cached(&pair, &items, 3).await {
        Some((false, tv)) => assert!(tv > v, "the tombstone is newer than the row"),
        other => panic!("expected a tombstone, found {other:?}"),
    }
    assert_eq!(items.get(3).await.unwrap(), None);
    assert_eq!(in_db(&pair, &items, 3).await, None);
    assert!(!items.delete(3).await.unwrap(), "nothing left to delete");
    let v2 = items.put(&item(3, 2.0)).await.unwrap();
    assert_eq!(items.get(3).await.unwrap(), Some(item(3, 2.0)));
    assert_eq!(cached(&pair, &items, 3).await, Some((true, v2)));
    Outcome::Passed
}

/// A batch commits in one transaction and reaches the cache in one call.
pub async fn put_many_is_one_transaction_and_one_cache_round_trip(pair: Pair) -> Outcome {
    let faulty = FaultyCache::new(pair.cache.clone());
    let counted = pair.with_cache(Arc::new(faulty.clone()));
    let db = FaultyDb::new(pair.db.clone());
    let counted = counted.with_db(Arc::new(db.clone()));
    let (engine, items) = setup(&counted, TableOptions::new()).await;
    faulty.faults().calls.reset();
    db.faults().calls.reset();
    let batch: Vec<Item> = (1..=50).map(|i| item(i, i as f64)).collect();
    let versions = items.put_many(&batch).await.unwrap();
    assert_eq!(versions.len(), 50);
    assert_eq!(
        db.faults().calls.get("execute"),
        1,
        "one database transaction"
    );
    let calls = &faulty.faults().calls;
    assert_eq!(calls.get("set_many_if_newer"), 1, "one cache round trip");
    assert_eq!(
        calls.get("set_if_newer") + calls.get("set") + calls.get("set_many"),
        0
    );
    for (it, v) in batch.iter().zip(&versions) {
        assert_eq!(cached(&pair, &items, it.id).await, Some((true, *v)));
    }
    let hits = engine.stats().hits;
    for it in &batch {
        assert_eq!(items.get(it.id).await.unwrap().as_ref(), Some(it));
    }
    assert_eq!(engine.stats().hits, hits + 50);
    Outcome::Passed
}

/// One bad row fails the whole batch before anything is written.
pub async fn put_many_with_one_bad_row_writes_nothing(pair: Pair) -> Outcome {
    let (_, items) = setup(&pair, TableOptions::new()).await;
    let mut batch: Vec<Item> = (1..=10).map(|i| item(i, 1.0)).collect();
    batch[6].price = f64::NAN;
    let e = items.put_many(&batch).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidValue, "{e}");
    for i in 1..=10 {
        assert_eq!(in_db(&pair, &items, i).await, None);
        assert_eq!(cached(&pair, &items, i).await, None);
    }
    Outcome::Passed
}

/// A batch that names a key twice is refused.
pub async fn put_many_refuses_a_key_twice(pair: Pair) -> Outcome {
    let (_, items) = setup(&pair, TableOptions::new()).await;
    let e = items
        .put_many(&[item(1, 1.0), item(2, 1.0), item(1, 2.0)])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidKey, "{e}");
    assert_eq!(in_db(&pair, &items, 2).await, None);
    Outcome::Passed
}

fn no_negative_prices(i: &Item) -> Result<(), String> {
    if i.price < 0.0 {
        Err(format!("negative price {}", i.price))
    } else {
        Ok(())
    }
}

/// A value the validator rejects reaches neither store.
pub async fn validation_failure_writes_nothing(pair: Pair) -> Outcome {
    let (_, items) = setup(&pair, TableOptions::new().validate(no_negative_prices)).await;
    let e = items.put(&item(1, -5.0)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Validation);
    assert!(e.to_string().contains("negative price"), "{e}");
    assert_eq!(in_db(&pair, &items, 1).await, None);
    assert_eq!(cached(&pair, &items, 1).await, None);
    let e = items
        .put_many(&[item(2, 1.0), item(3, -1.0)])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Validation);
    assert_eq!(in_db(&pair, &items, 2).await, None);
    Outcome::Passed
}

/// An update whose result fails validation is rolled back in the database
/// and leaves the cached row as it was.
pub async fn validated_update_that_fails_is_rolled_back(pair: Pair) -> Outcome {
    let (_, items) = setup(&pair, TableOptions::new().validate(no_negative_prices)).await;
    let v = items.put(&item(1, 5.0)).await.unwrap();
    let e = items
        .update(1, Patch::new().set("price", -1.0))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Validation);
    assert_eq!(in_db(&pair, &items, 1).await, Some((item(1, 5.0), v)));
    assert_eq!(cached(&pair, &items, 1).await, Some((true, v)));
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 5.0)));
    Outcome::Passed
}

/// With a caching predicate, every write reaches the database, but only
/// rows it accepts are cached; a row it rejects invalidates the old entry.
pub async fn conditional_caching_writes_the_db_and_caches_only_when_told(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new().cache_if(|i: &Item| i.qty > 0)).await;
    let mut it = item(1, 1.0);
    it.qty = 5;
    let v1 = items.put(&it).await.unwrap();
    assert_eq!(cached(&pair, &items, 1).await, Some((true, v1)));
    it.qty = 0;
    let v2 = items.put(&it).await.unwrap();
    assert_eq!(in_db(&pair, &items, 1).await, Some((it.clone(), v2)));
    assert!(
        matches!(cached(&pair, &items, 1).await, None | Some((false, _))),
        "the old entry is invalidated"
    );
    let loads = engine.stats().loads;
    assert_eq!(items.get(1).await.unwrap(), Some(it.clone()));
    assert_eq!(items.get(1).await.unwrap(), Some(it));
    assert_eq!(
        engine.stats().loads,
        loads + 2,
        "uncached rows are read from the database"
    );
    let skip = items
        .put_with(&item(2, 1.0), WriteOptions::new().skip_cache())
        .await
        .unwrap();
    assert!(skip > 0);
    // Not cached by the write (an outbox replay may cache it since, as a read would).
    assert!(matches!(
        cached(&pair, &items, 2).await,
        None | Some((false, _)) | Some((true, _))
    ));
    assert!(
        cached(&pair, &items, 2)
            .await
            .is_none_or(|(_, v)| v == skip)
    );
    // The invalidation lets the row of that version in: a read caches it.
    items.get(2).await.unwrap();
    let hits = engine.stats().hits;
    assert_eq!(items.get(2).await.unwrap(), Some(item(2, 1.0)));
    assert_eq!(
        engine.stats().hits,
        hits + 1,
        "the second read after skip_cache hits"
    );
    assert_eq!(cached(&pair, &items, 2).await, Some((true, skip)));
    Outcome::Passed
}

/// The TTL of an entry is the call's, else the computed one, else the
/// table's, else the engine's default.
pub async fn ttl_comes_from_call_then_computed_then_table_then_default(pair: Pair) -> Outcome {
    let faulty = FaultyCache::new(pair.cache.clone());
    let p = pair.with_cache(Arc::new(faulty.clone()));
    let g = p
        .cache
        .capabilities()
        .ttl_granularity
        .max(Duration::from_secs(1));
    let (engine, items) = setup_with(
        &p,
        |c| {
            c.default_ttl = Some(g * 400);
            // No outbox replay: its writes would add TTLs to the record.
            c.reconcile_interval = None;
        },
        TableOptions::new()
            .ttl(g * 300)
            .ttl_with(move |i: &Item| (i.price > 100.0).then_some(g * 200)),
    )
    .await;
    // The epoch record's write (no TTL) came before.
    let setup_ttls = faulty.faults().ttls().len();
    let plain = engine
        .register_in(
            Item::table().renamed(&unique("plain")).unwrap(),
            TableOptions::new(),
        )
        .await
        .unwrap();
    items
        .put_with(&item(1, 1.0), WriteOptions::new().ttl(g * 100))
        .await
        .unwrap();
    items.put(&item(2, 500.0)).await.unwrap();
    items.put(&item(3, 1.0)).await.unwrap();
    plain.put(&item(4, 1.0)).await.unwrap();
    let ttls: Vec<Option<Duration>> = faulty.faults().ttls().split_off(setup_ttls);
    assert_eq!(
        ttls,
        vec![Some(g * 100), Some(g * 200), Some(g * 300), Some(g * 400)]
    );
    Outcome::Passed
}

/// An entry with a TTL disappears from the cache after it.
pub async fn entries_expire_after_their_ttl(pair: Pair) -> Outcome {
    let g = pair
        .cache
        .capabilities()
        .ttl_granularity
        .max(Duration::from_millis(500));
    let (_, items) = setup_with(
        &pair,
        |c| {
            c.load_deadline = g;
            c.tombstone_ttl = g * 4;
        },
        TableOptions::new(),
    )
    .await;
    items
        .put_with(&item(1, 1.0), WriteOptions::new().ttl(g))
        .await
        .unwrap();
    assert!(cached(&pair, &items, 1).await.is_some());
    let gone = eventually(g * 6, || async { cached(&pair, &items, 1).await.is_none() }).await;
    assert!(gone, "the entry outlived its TTL of {g:?} six times over");
    assert_eq!(
        items.get(1).await.unwrap(),
        Some(item(1, 1.0)),
        "the database still has it"
    );
    Outcome::Passed
}

/// When the database refuses a write, the cache keeps the old, still
/// correct value and never sees the new one.
pub async fn db_failure_leaves_the_cache_without_the_new_value(pair: Pair) -> Outcome {
    let db = FaultyDb::new(pair.db.clone());
    let p = pair.with_db(Arc::new(db.clone()));
    let (_, items) = setup(&p, TableOptions::new()).await;
    let v1 = items.put(&item(1, 1.0)).await.unwrap();
    db.faults().fail_writes(true);
    assert!(items.put(&item(1, 2.0)).await.is_err());
    assert!(items.put(&item(2, 2.0)).await.is_err());
    assert!(items.delete(1).await.is_err());
    db.faults().heal();
    assert_eq!(cached(&pair, &items, 1).await, Some((true, v1)));
    assert_eq!(cached(&pair, &items, 2).await, None);
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 1.0)));
    assert_eq!(items.get(2).await.unwrap(), None);
    Outcome::Passed
}

/// When a commit's outcome is unknown (it did commit, but the answer was
/// lost), reads never return the old cached value, and the cache is repaired.
pub async fn db_commit_in_doubt_never_serves_the_old_value(pair: Pair) -> Outcome {
    let db = FaultyDb::new(pair.db.clone());
    let p = pair.with_db(Arc::new(db.clone()));
    let (engine, items) = setup(&p, TableOptions::new()).await;
    let v1 = items.put(&item(1, 1.0)).await.unwrap();
    db.faults().in_doubt_writes(true);
    let e = items.put(&item(1, 2.0)).await.unwrap_err();
    assert!(e.is_in_doubt(), "{e}");
    db.faults().heal();
    assert_eq!(
        items.get(1).await.unwrap(),
        Some(item(1, 2.0)),
        "the committed value, not the cached one"
    );
    let repaired = eventually(Duration::from_secs(5), || async {
        engine.pending_resync() == 0
            && matches!(cached(&pair, &items, 1).await, Some((true, v)) if v > v1)
    })
    .await;
    assert!(repaired, "the cache entry was not repaired");
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 2.0)));
    Outcome::Passed
}

/// A cache that fails after the commit does not fail the write, and the
/// stale entry it still holds is never served; the cache is resynced when
/// it works again.
pub async fn cache_failure_after_commit_keeps_the_write_and_serves_no_stale_value(
    pair: Pair,
) -> Outcome {
    let faulty = FaultyCache::new(pair.cache.clone());
    let p = pair.with_cache(Arc::new(faulty.clone()));
    let (engine, items) = setup(&p, TableOptions::new()).await;
    let v1 = items.put(&item(1, 1.0)).await.unwrap();
    faulty.faults().fail_writes(true);
    let v2 = items
        .put(&item(1, 2.0))
        .await
        .expect("the write succeeds without the cache");
    assert!(v2 > v1);
    assert_eq!(in_db(&pair, &items, 1).await, Some((item(1, 2.0), v2)));
    assert_eq!(
        cached(&pair, &items, 1).await,
        Some((true, v1)),
        "the cache still holds the old row"
    );
    assert_eq!(
        items.get(1).await.unwrap(),
        Some(item(1, 2.0)),
        "but it is not served"
    );
    assert!(engine.pending_resync() >= 1);
    faulty.faults().heal();
    let healed = eventually(Duration::from_secs(5), || async {
        engine.pending_resync() == 0
            && engine.breaker_state() == BreakerState::Closed
            && cached(&pair, &items, 1).await == Some((true, v2))
    })
    .await;
    assert!(
        healed,
        "the key was not resynced: {:?}",
        cached(&pair, &items, 1).await
    );
    let hits = engine.stats().hits;
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 2.0)));
    assert_eq!(engine.stats().hits, hits + 1);
    Outcome::Passed
}

/// A transaction scope's writes reach the cache only when it commits.
pub async fn transaction_scope_applies_cache_effects_only_after_commit(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let vb = items.put(&item(2, 2.0)).await.unwrap();
    let vc = items.put(&item(3, 3.0)).await.unwrap();
    let mut tx = engine.begin().await.unwrap();
    tx.put(&items, &item(1, 1.0)).await.unwrap();
    let b = tx
        .update(&items, 2, Patch::new().set("qty", 99))
        .await
        .unwrap();
    assert_eq!(b.map(|b| b.qty), Some(99));
    assert!(tx.delete(&items, 3).await.unwrap());
    assert_eq!(
        tx.get(&items, 2).await.unwrap().map(|b| b.qty),
        Some(99),
        "reads its own writes"
    );
    assert_eq!(cached(&pair, &items, 1).await, None);
    assert_eq!(cached(&pair, &items, 2).await, Some((true, vb)));
    assert_eq!(cached(&pair, &items, 3).await, Some((true, vc)));
    tx.commit().await.unwrap();
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 1.0)));
    assert_eq!(items.get(2).await.unwrap().map(|b| b.qty), Some(99));
    assert_eq!(items.get(3).await.unwrap(), None);
    assert!(matches!(cached(&pair, &items, 2).await, Some((true, v)) if v > vb));
    assert!(matches!(cached(&pair, &items, 3).await, Some((false, v)) if v > vc));
    Outcome::Passed
}

/// Rolling a scope back leaves both stores exactly as they were.
pub async fn transaction_scope_rollback_leaves_both_stores_untouched(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let va = items.put(&item(1, 1.0)).await.unwrap();
    let mut tx = engine.begin().await.unwrap();
    tx.put(&items, &item(1, 9.0)).await.unwrap();
    tx.put(&items, &item(2, 9.0)).await.unwrap();
    tx.delete(&items, 1).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(in_db(&pair, &items, 1).await, Some((item(1, 1.0), va)));
    assert_eq!(in_db(&pair, &items, 2).await, None);
    assert_eq!(cached(&pair, &items, 1).await, Some((true, va)));
    assert_eq!(cached(&pair, &items, 2).await, None);
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 1.0)));
    Outcome::Passed
}

/// Dropping an open scope rolls it back, and the database is free again.
pub async fn dropped_transaction_scope_rolls_back(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    {
        let mut tx = engine.begin().await.unwrap();
        tx.put(&items, &item(1, 1.0)).await.unwrap();
    }
    let v = items
        .put(&item(2, 2.0))
        .await
        .expect("the database is not left locked");
    assert!(v > 0);
    assert_eq!(in_db(&pair, &items, 1).await, None);
    assert_eq!(items.get(1).await.unwrap(), None);
    Outcome::Passed
}

/// A hundred concurrent reads of one cold key share a single database load.
pub async fn hundred_concurrent_cold_reads_cause_one_db_load(pair: Pair) -> Outcome {
    let db = FaultyDb::new(pair.db.clone());
    let p = pair.with_db(Arc::new(db.clone()));
    let (engine, items) = setup(&p, TableOptions::new()).await;
    db_only_put(&pair, &items, &item(1, 1.0)).await;
    db.faults().calls.reset();
    // Hold the load open long enough for every reader to arrive.
    db.faults().delay_reads(Duration::from_millis(200));
    let reads = (0..100).map(|_| {
        let items = items.clone();
        tokio::spawn(async move { items.get(1).await })
    });
    for r in join_all(reads).await {
        assert_eq!(r.unwrap().unwrap(), Some(item(1, 1.0)));
    }
    assert_eq!(db.faults().calls.get("get"), 1, "one database read");
    assert_eq!(engine.stats().loads, 1);
    Outcome::Passed
}

/// Bytes in the cache that are not a readable entry are a miss, and the
/// load that follows replaces them.
pub async fn corrupt_or_foreign_cache_bytes_read_as_a_miss_and_are_repaired(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let v = items.put(&item(1, 1.0)).await.unwrap();
    let ck = items.cache_key(1).unwrap();
    let good = pair.cache.get(&ck).await.unwrap().unwrap();
    let mut flipped = good.to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x20;
    let mut old_format = good.to_vec();
    old_format[2] = b'0';
    let junk: Vec<Vec<u8>> = vec![
        b"{\"id\": 1, \"price\": 666}".to_vec(),
        good[..good.len() / 2].to_vec(),
        flipped,
        old_format,
        vec![0xff, 0xfe, 0x00],
    ];
    for bytes in junk {
        pair.cache
            .set(&ck, bytes.clone().into(), None)
            .await
            .unwrap();
        let corrupt = engine.stats().corrupt_entries;
        assert_eq!(items.get(1).await.unwrap(), Some(item(1, 1.0)), "{bytes:?}");
        assert_eq!(engine.stats().corrupt_entries, corrupt + 1);
        assert_eq!(cached(&pair, &items, 1).await, Some((true, v)), "repaired");
    }
    Outcome::Passed
}

/// Bad input fails with a typed error, and nothing reaches either store.
pub async fn bad_input_is_refused_before_any_side_effect(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let rows = engine
        .register_table(
            Item::table().renamed(&unique("rows")).unwrap(),
            TableOptions::new(),
        )
        .await
        .unwrap();
    let caps = pair.cache.capabilities();
    let good = || writethrough_core::Record::to_row(&item(1, 1.0)).unwrap();
    let mut cases: Vec<(&str, Row, ErrorKind)> = vec![
        (
            "NaN",
            good().set("price", f64::NAN),
            ErrorKind::InvalidValue,
        ),
        (
            "infinity",
            good().set("price", f64::INFINITY),
            ErrorKind::InvalidValue,
        ),
        (
            "-infinity",
            good().set("price", f64::NEG_INFINITY),
            ErrorKind::InvalidValue,
        ),
        (
            "text key in an int table",
            good().set("id", "1"),
            ErrorKind::InvalidValue,
        ),
        (
            "null in a NOT NULL column",
            good().set("name", Value::Null),
            ErrorKind::InvalidValue,
        ),
        (
            "unknown column",
            good().set("colour", "red"),
            ErrorKind::SchemaMismatch,
        ),
        (
            "wrong type",
            good().set("qty", "many"),
            ErrorKind::InvalidValue,
        ),
    ];
    let mut missing = good();
    missing.remove("name");
    cases.push(("missing column", missing, ErrorKind::InvalidValue));
    if !pair.db.capabilities().text_allows_nul {
        cases.push((
            "NUL byte in text",
            good().set("name", "a\0b"),
            ErrorKind::InvalidValue,
        ));
    }
    if caps.max_value_len <= 64 << 20 {
        let big = "x".repeat(caps.max_value_len + 1);
        cases.push((
            "value over the item limit",
            good().set("name", big),
            ErrorKind::ValueTooLarge,
        ));
    }
    for (what, row, kind) in cases {
        let e = rows.put(&row).await.expect_err(what);
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert_eq!(e.status(), writethrough_core::Status::Permanent, "{what}");
    }
    let g = caps.ttl_granularity;
    let mut ttls = vec![
        ("zero TTL", Duration::ZERO),
        (
            "TTL over the backend's limit",
            caps.max_ttl + Duration::from_secs(1),
        ),
        (
            "TTL below the load deadline",
            Pair::config().load_deadline / 2,
        ),
    ];
    if g > Duration::from_millis(1) {
        ttls.push(("TTL finer than the backend's granularity", g / 2));
    }
    for (what, ttl) in ttls {
        let e = items
            .put_with(&item(1, 1.0), WriteOptions::new().ttl(ttl))
            .await
            .expect_err(what);
        assert_eq!(e.kind(), ErrorKind::InvalidTtl, "{what}: {e}");
    }
    let e = items.get(Key::Text("1".into())).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidKey);
    let e = items
        .update(1, Patch::new().set("id", 2))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SchemaMismatch);
    let e = items
        .update(1, Patch::new().set("price", f64::NAN))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidValue);
    assert_eq!(in_db(&pair, &items, 1).await, None);
    assert_eq!(cached(&pair, &items, 1).await, None);
    assert_eq!(cached(&pair, &rows, 1).await, None);
    assert!(
        pair.db
            .scan(rows.table(), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    Outcome::Passed
}

/// Keys the cache backend cannot hold are refused with `InvalidKey`.
pub async fn keys_the_cache_cannot_hold_are_refused(pair: Pair) -> Outcome {
    let engine = pair.builder().build().unwrap();
    let table = Table::builder(&unique("named"))
        .key("k", ColumnType::Text)
        .column("v", ColumnType::Int)
        .build()
        .unwrap();
    let named = engine
        .register_table(table, TableOptions::new())
        .await
        .unwrap();
    let caps = pair.cache.capabilities();
    let mut bad: Vec<String> = vec![String::new()];
    if caps.max_key_len < 1 << 20 {
        bad.push("k".repeat(caps.max_key_len));
    }
    if caps.key_rule == KeyRule::NoSpaceOrControl {
        bad.extend([
            "a b".into(),
            "tab\there".into(),
            "nl\n".into(),
            "bell\u{7}".into(),
        ]);
    }
    for k in &bad {
        let row = Row::new().set("k", k.as_str()).set("v", 1);
        let e = named.put(&row).await.expect_err(k);
        assert_eq!(e.kind(), ErrorKind::InvalidKey, "{k:?}: {e}");
        let e = named.get(k.as_str()).await.expect_err(k);
        assert_eq!(e.kind(), ErrorKind::InvalidKey, "{k:?}: {e}");
    }
    assert!(
        pair.db
            .scan(named.table(), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let ok = Row::new().set("k", "ünïcode-ok").set("v", 1);
    named.put(&ok).await.unwrap();
    assert_eq!(named.get("ünïcode-ok").await.unwrap(), Some(ok));
    Outcome::Passed
}

/// A caller's loader fills the cache on a miss, below any database version.
pub async fn get_or_load_caches_the_loaded_value_below_any_write(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let loaded = items
        .get_or_load(1, |k| async move {
            assert_eq!(k, Key::Int(1));
            Ok(Some(item(1, 42.0)))
        })
        .await
        .unwrap();
    assert_eq!(loaded, Some(item(1, 42.0)));
    assert_eq!(cached(&pair, &items, 1).await, Some((true, 0)));
    let hits = engine.stats().hits;
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 42.0)));
    assert_eq!(engine.stats().hits, hits + 1);
    let v = items.put(&item(1, 1.0)).await.unwrap();
    assert_eq!(
        cached(&pair, &items, 1).await,
        Some((true, v)),
        "a write replaces it"
    );
    let e = items
        .get_or_load(2, |_| async { Ok(Some(item(3, 1.0))) })
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::InvalidValue,
        "a loader must return the key's row"
    );
    Outcome::Passed
}

/// Rows written through a typed handle read back through a row handle and
/// the other way round.
pub async fn typed_and_row_handles_see_the_same_rows(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let rows = engine
        .register_table(items.table().clone(), TableOptions::new())
        .await
        .unwrap();
    items.put(&item(1, 1.0)).await.unwrap();
    let row = rows.get(1).await.unwrap().expect("row");
    let (_, want) = items
        .table()
        .normalize_row(writethrough_core::Record::to_row(&item(1, 1.0)).unwrap())
        .unwrap();
    assert_eq!(row, want);
    rows.put(&row.clone().set("price", 7.5)).await.unwrap();
    assert_eq!(items.get(1).await.unwrap().map(|i| i.price), Some(7.5));
    Outcome::Passed
}

/// With the outbox on, a write's record is removed once its cache effect applied.
pub async fn applied_outbox_records_are_removed(pair: Pair) -> Outcome {
    let (_, items) = setup_with(
        &pair,
        |c| c.consistency = Consistency::strict(),
        TableOptions::new(),
    )
    .await;
    items.put(&item(1, 1.0)).await.unwrap();
    let table = items.table().name().as_str().to_owned();
    let cleared = eventually(Duration::from_secs(5), || async {
        let pending = pair
            .db
            .outbox_pending(None, Duration::ZERO, 10_000)
            .await
            .unwrap();
        !pending.iter().any(|e| e.table == table)
    })
    .await;
    assert!(cleared, "the outbox record of an applied write stayed");
    Outcome::Passed
}

/// A writer that died between its commit and its cache write left an
/// outbox record; the reconciler replays it and the stale entry goes.
pub async fn reconcile_replays_what_a_crashed_writer_left(pair: Pair) -> Outcome {
    let (engine, items) =
        setup_with(&pair, |c| c.reconcile_interval = None, TableOptions::new()).await;
    let v1 = items.put(&item(1, 1.0)).await.unwrap();
    // What a crash right after the commit leaves: the row, its outbox record, the old entry.
    let (_, row) = items
        .table()
        .normalize_row(writethrough_core::Record::to_row(&item(1, 2.0)).unwrap())
        .unwrap();
    let out = pair
        .db
        .execute(
            vec![Write {
                table: items.table().clone(),
                op: WriteOp::Upsert(row),
            }],
            TxOptions::with_outbox(true),
        )
        .await
        .unwrap();
    let v2 = out[0].version;
    assert!(out[0].outbox_id.is_some());
    assert_eq!(
        cached(&pair, &items, 1).await,
        Some((true, v1)),
        "stale, as a crash leaves it"
    );
    let report = engine.reconcile_all().await.unwrap();
    assert!(report.replayed >= 1);
    assert_eq!(cached(&pair, &items, 1).await, Some((true, v2)));
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 2.0)));
    let table = items.table().name().as_str().to_owned();
    let pending = pair
        .db
        .outbox_pending(None, Duration::ZERO, 10_000)
        .await
        .unwrap();
    assert!(
        !pending.iter().any(|e| e.table == table),
        "replayed records are removed"
    );
    Outcome::Passed
}

/// While the cache is down, the breaker opens, reads come from the
/// database, writes succeed; when it is back, what was written meanwhile is
/// resynced before the cache serves it.
pub async fn cache_outage_opens_the_breaker_and_resyncs_before_serving(pair: Pair) -> Outcome {
    let faulty = FaultyCache::new(pair.cache.clone());
    let p = pair.with_cache(Arc::new(faulty.clone()));
    let (engine, items) = setup(&p, TableOptions::new()).await;
    let mut v = Vec::new();
    for i in 1..=5 {
        v.push(items.put(&item(i, 1.0)).await.unwrap());
    }
    faulty.faults().fail_all(true);
    for i in 1..=5 {
        items
            .put(&item(i, 2.0))
            .await
            .expect("writes go on without the cache");
    }
    assert_eq!(engine.breaker_state(), BreakerState::Open);
    let calls = faulty.faults().calls.get("get");
    for i in 1..=5 {
        assert_eq!(items.get(i).await.unwrap(), Some(item(i, 2.0)));
    }
    assert_eq!(
        faulty.faults().calls.get("get"),
        calls,
        "an open breaker does not call the cache"
    );
    for i in 1..=5 {
        assert_eq!(
            cached(&pair, &items, i).await,
            Some((true, v[i as usize - 1])),
            "old rows wait in the cache"
        );
    }
    faulty.faults().heal();
    let closed = eventually(Duration::from_secs(5), || async {
        engine.breaker_state() == BreakerState::Closed && engine.pending_resync() == 0
    })
    .await;
    assert!(closed, "the breaker did not close");
    for i in 1..=5 {
        match cached(&pair, &items, i).await {
            Some((true, ver)) => assert!(ver > v[i as usize - 1], "key {i} was resynced"),
            other => panic!("key {i}: {other:?}"),
        }
        assert_eq!(items.get(i).await.unwrap(), Some(item(i, 2.0)));
    }
    assert!(engine.breaker_trips() >= 1);
    Outcome::Passed
}

/// The audit finds an entry older than its row (planted behind the
/// engine's back), leaves agreeing and absent entries alone, and repairs.
pub async fn audit_finds_and_repairs_a_divergent_entry(pair: Pair) -> Outcome {
    // No reconciler: its replay of the outbox would repair the planted entry first.
    let (_, items) = setup_with(&pair, |c| c.reconcile_interval = None, TableOptions::new()).await;
    for i in 1..=10 {
        items.put(&item(i, 1.0)).await.unwrap();
    }
    let ck = items.cache_key(3).unwrap();
    let old = pair.cache.get(&ck).await.unwrap().unwrap();
    let v2 = items.put(&item(3, 2.0)).await.unwrap();
    pair.cache.set(&ck, old, None).await.unwrap();
    pair.cache
        .delete(&items.cache_key(5).unwrap())
        .await
        .unwrap();
    let report = items
        .audit(100, Duration::from_millis(20), false)
        .await
        .unwrap();
    assert_eq!(report.checked, 10);
    assert_eq!(report.divergent, vec![Key::Int(3)]);
    assert_eq!((report.agree, report.absent, report.repaired), (8, 1, 0));
    let report = items
        .audit(100, Duration::from_millis(20), true)
        .await
        .unwrap();
    assert_eq!(report.repaired, 1);
    assert_eq!(cached(&pair, &items, 3).await, Some((true, v2)));
    let report = items
        .audit(100, Duration::from_millis(20), false)
        .await
        .unwrap();
    assert!(report.divergent.is_empty(), "{report:?}");
    Outcome::Passed
}

/// Warming loads rows the cache lacks, so that reads hit.
pub async fn warm_loads_rows_into_an_empty_cache(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    for i in 1..=20 {
        db_only_put(&pair, &items, &item(i, 1.0)).await;
    }
    assert_eq!(items.warm(15).await.unwrap(), 15);
    assert_eq!(
        items.warm(100).await.unwrap(),
        5,
        "already cached rows are not rewritten"
    );
    let hits = engine.stats().hits;
    for i in 1..=20 {
        assert!(items.get(i).await.unwrap().is_some());
    }
    assert_eq!(engine.stats().hits, hits + 20);
    Outcome::Passed
}

/// The health report shows the window's operations, latencies and failures.
pub async fn health_reports_throughput_latency_and_failures(pair: Pair) -> Outcome {
    let faulty = FaultyCache::new(pair.cache.clone());
    let p = pair.with_cache(Arc::new(faulty.clone()));
    let (engine, items) = setup(&p, TableOptions::new()).await;
    let _ = engine.health();
    for i in 1..=10 {
        items.put(&item(i, 1.0)).await.unwrap();
        items.get(i).await.unwrap();
    }
    let h = engine.health();
    assert_eq!(h.operations, 20);
    assert!(h.throughput > 0.0);
    assert!(h.read_p50 > Duration::ZERO && h.read_p99 >= h.read_p50);
    assert!(h.write_p50 > Duration::ZERO && h.write_p99 >= h.write_p50);
    assert_eq!((h.cache_failure_rate, h.db_failure_rate), (0.0, 0.0));
    assert_eq!(h.breaker, BreakerState::Closed);
    faulty.faults().fail_reads(true);
    items.get(1).await.unwrap();
    let h = engine.health();
    assert_eq!(h.operations, 1, "a new window");
    assert!(h.cache_failure_rate > 0.0);
    faulty.faults().heal();
    // A monitor's window is its own: the shared one does not shorten it.
    let mut monitor = engine.health_monitor();
    items.get(2).await.unwrap();
    let _ = engine.health();
    items.get(3).await.unwrap();
    assert_eq!(monitor.report().operations, 2);
    assert_eq!(monitor.report().operations, 0);
    Outcome::Passed
}
