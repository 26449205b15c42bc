//! The engine suite: every operation of the write-through pattern and every
//! rule of the design, on any cache + database pair.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde::{Deserialize, Serialize};
use writethrough_core::backend::codec::{self, Decoded};
use writethrough_core::backend::{KeyRule, TxOptions, Write, WriteOp};
use writethrough_core::{
    BreakerState, Codec, ColumnType, Consistency, Engine, Entity, Error, ErrorKind, Handle, Key,
    Patch, Record, Row, Table, TableOptions, Tx, Value, WriteOptions,
};

use super::{Case, Outcome, Pair, eventually, unique};
use crate::faults::{FaultyCache, FaultyDb};

/// Every case of the engine suite.
pub fn cases() -> Vec<Case> {
    crate::cases![
        put_then_get_is_a_cache_hit,
        get_arc_shares_a_decoded_hit_and_never_serves_it_after_a_write,
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
        concurrent_read_modify_write_scopes_lose_no_money,
        transaction_closure_commits_rolls_back_and_retries_within_its_bound,
        any_failure_in_a_scope_poisons_it_and_commit_writes_nothing,
        a_write_beside_an_open_sqlite_scope_in_its_own_task_fails_at_once,
        put_many_of_a_hundred_thousand_rows_commits_and_caches_every_row,
        a_cache_failure_of_a_batch_counts_in_stats_health_and_the_breaker,
        a_cached_payload_that_does_not_fit_the_entity_is_replaced,
        get_many_is_one_cache_round_trip_and_one_query_for_the_misses,
        delete_many_is_one_transaction_and_leaves_every_tombstone,
        insert_creates_only_and_one_of_racing_inserts_wins,
        invalidate_makes_the_next_read_load_and_fences_older_rows,
        shutdown_flushes_the_outbox_and_stops_the_background_work,
        a_handle_and_a_scope_share_one_write_api,
    ]
}

/// The typed row the suite writes: one column of every type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Entity)]
#[writethrough(table = "items", crate = "writethrough_core")]
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

/// What a writer that crashed right after its commit leaves: `it` upserted
/// in the database with its outbox record, straight through the database
/// (no engine, so no cache write). Returns the committed version.
pub async fn commit_without_cache_write(pair: &Pair, h: &Handle<Item>, it: &Item) -> u64 {
    let (_, row) = h
        .table()
        .normalize_row(it.to_row().expect("an item is a row"))
        .expect("an item fits its table");
    let write = Write {
        table: h.table().clone(),
        op: WriteOp::Upsert(row),
    };
    let out = pair
        .db
        .execute(vec![write], TxOptions::with_outbox(true))
        .await
        .expect("the database commits");
    assert!(
        out[0].outbox_id.is_some(),
        "the write left its outbox record"
    );
    out[0].version
}

/// What the cache holds for `key`: `Some((is_row, version))`, or `None`.
pub async fn cached<R: writethrough_core::Record>(
    pair: &Pair,
    h: &Handle<R>,
    key: impl writethrough_core::KeyArg<R::Key>,
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

/// `get_arc` reads what `get` reads. On an in-process cache the second hit
/// on an entry is the same shared value (decoded once); after a write, or
/// a delete, the next read is the new row or none, never the value kept
/// for the entry the write replaced. Misses and hits count as for `get`.
pub async fn get_arc_shares_a_decoded_hit_and_never_serves_it_after_a_write(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let in_process = pair.cache.capabilities().in_process;
    assert_eq!(items.get_arc(1).await.unwrap(), None);
    items.put(&item(1, 1.5)).await.unwrap();
    let before = engine.stats();
    let a = items.get_arc(1).await.unwrap().expect("a row");
    let b = items.get_arc(1).await.unwrap().expect("a row");
    assert_eq!(*a, item(1, 1.5));
    assert_eq!(a, b);
    assert_eq!(
        Arc::ptr_eq(&a, &b),
        in_process,
        "an in-process cache shares the decoded entry; others decode each hit"
    );
    let after = engine.stats();
    assert_eq!((after.hits - before.hits, after.loads), (2, before.loads));
    for round in 0..3 {
        let price = 2.0 + f64::from(round);
        items.put(&item(1, price)).await.unwrap();
        let c = items.get_arc(1).await.unwrap().expect("a row");
        assert_eq!(
            *c,
            item(1, price),
            "the write's row, not the entry it replaced"
        );
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(items.get(1).await.unwrap().as_ref(), Some(&*c));
    }
    items
        .update(1, Patch::new().set("price", 9.0))
        .await
        .unwrap();
    assert_eq!(items.get_arc(1).await.unwrap().expect("a row").price, 9.0);
    items.delete(1).await.unwrap();
    assert_eq!(items.get_arc(1).await.unwrap(), None);
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
        // Entries of an earlier epoch (built here at epoch 0) read as
        // misses too; either way the read does not trust them.
        let unusable = |s: writethrough_core::Stats| s.corrupt_entries + s.old_epoch_entries;
        let corrupt = unusable(engine.stats());
        assert_eq!(items.get(1).await.unwrap(), Some(item(1, 1.0)), "{bytes:?}");
        assert_eq!(unusable(engine.stats()), corrupt + 1);
        // Replaced by that read, or at the latest by the next one.
        let _ = items.get(1).await.unwrap();
        assert_eq!(cached(&pair, &items, 1).await, Some((true, v)), "repaired");
    }
    Outcome::Passed
}

/// Every row the README's bad-input table refuses, for key `key`, with the
/// kind of its refusal: tried by plain writes and inside scopes.
fn bad_rows(
    key: i64,
    caps: &writethrough_core::backend::CacheCapabilities,
    db_caps: &writethrough_core::backend::DbCapabilities,
) -> Vec<(&'static str, Row, ErrorKind)> {
    let good = || writethrough_core::Record::to_row(&item(key, 1.0)).unwrap();
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
        (
            "a column name that is not an identifier",
            good().set("price; DROP TABLE x", 1),
            ErrorKind::InvalidIdentifier,
        ),
    ];
    let mut missing = good();
    missing.remove("name");
    cases.push(("missing column", missing, ErrorKind::InvalidValue));
    if !db_caps.text_allows_nul {
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
    cases
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
    let cases = bad_rows(1, &caps, &pair.db.capabilities());
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
    // A typed handle takes only its key type (a compile-time check); the
    // untyped view checks at run time.
    let e = items.rows().get(Key::Text("1".into())).await.unwrap_err();
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
    let e = items
        .update(1, Patch::new().set("bad name", 1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidIdentifier, "{e}");
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
    let v2 = commit_without_cache_write(&pair, &items, &item(1, 2.0)).await;
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

/// An account of the seed's `FinancialTransactionService`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Entity)]
#[writethrough(table = "accounts", crate = "writethrough_core")]
pub struct Account {
    /// Key.
    pub id: i64,
    /// The balance, in cents.
    pub balance: i64,
}

/// A money movement recorded with the balance it changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Entity)]
#[writethrough(table = "transfers", crate = "writethrough_core")]
pub struct Transfer {
    /// Key.
    pub id: i64,
    /// The account credited.
    pub account: i64,
    /// The amount, in cents.
    pub amount: i64,
}

/// What [`money_flow`] found afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoneyReport {
    /// The sum of the amounts of every acknowledged transfer.
    pub expected: i64,
    /// The sum of the balances the database holds.
    pub in_db: i64,
    /// Transfers whose row the database lacks.
    pub missing_transfers: usize,
    /// Accounts whose cache entry is not the database's row.
    pub stale_cache: usize,
    /// Runs of a closure started again (serialization failures, deadlocks, busy).
    pub retries: u64,
}

/// The seed's financial flow: `tasks` tasks run `transfers` transfers in
/// all on `accounts` accounts, each in its own [`Engine::transaction`]:
/// read the balance (for update, when `locking`), add the amount, write it
/// back, and insert the transfer row.
pub async fn money_flow(
    pair: &Pair,
    tasks: i64,
    accounts_n: i64,
    transfers_n: i64,
    locking: bool,
) -> MoneyReport {
    let engine = pair.builder().build().expect("engine builds");
    let accounts = engine
        .register_in(
            Account::table().renamed(&unique("accounts")).unwrap(),
            TableOptions::<Account>::new(),
        )
        .await
        .unwrap();
    let transfers = engine
        .register_in(
            Transfer::table().renamed(&unique("transfers")).unwrap(),
            TableOptions::<Transfer>::new(),
        )
        .await
        .unwrap();
    for id in 1..=accounts_n {
        accounts.put(&Account { id, balance: 0 }).await.unwrap();
    }
    let amount = |id: i64| 10 + (id * 37) % 400;
    let per_task = transfers_n / tasks;
    let runs: Vec<_> = (0..tasks)
        .map(|t| {
            let (engine, accounts, transfers) =
                (engine.clone(), accounts.clone(), transfers.clone());
            // Spawned: the transaction's future must be Send.
            tokio::spawn(async move {
                for n in 0..per_task {
                    let id = t * per_task + n + 1;
                    let account = id % accounts_n + 1;
                    engine
                        .transaction(|tx| {
                            let (accounts, transfers) = (accounts.clone(), transfers.clone());
                            Box::pin(async move {
                                let current = if locking {
                                    tx.get_for_update(&accounts, account).await?
                                } else {
                                    tx.get(&accounts, account).await?
                                };
                                let balance = current.map_or(0, |a| a.balance);
                                tx.put(
                                    &accounts,
                                    &Account {
                                        id: account,
                                        balance: balance + amount(id),
                                    },
                                )
                                .await?;
                                tx.put(
                                    &transfers,
                                    &Transfer {
                                        id,
                                        account,
                                        amount: amount(id),
                                    },
                                )
                                .await?;
                                Ok(())
                            })
                        })
                        .await
                        .unwrap_or_else(|e| panic!("transfer {id} was not acknowledged: {e}"));
                }
            })
        })
        .collect();
    for r in join_all(runs).await {
        r.expect("a transfer task panicked");
    }
    engine.flush().await.unwrap();
    let expected: i64 = (1..=per_task * tasks).map(amount).sum();
    let mut in_db = 0;
    let mut stale_cache = 0;
    for id in 1..=accounts_n {
        let vr = pair
            .db
            .get(accounts.table(), &Key::Int(id))
            .await
            .unwrap()
            .expect("the account exists");
        let Some(Value::Int(balance)) = vr.row.get("balance") else {
            panic!("account {id} has no integer balance: {:?}", vr.row);
        };
        in_db += balance;
        let read = accounts.get(id).await.unwrap().map(|a| a.balance);
        if cached(pair, &accounts, id).await != Some((true, vr.version)) || read != Some(*balance) {
            stale_cache += 1;
        }
    }
    let mut missing_transfers = 0;
    for id in 1..=per_task * tasks {
        if pair
            .db
            .get(transfers.table(), &Key::Int(id))
            .await
            .unwrap()
            .is_none()
        {
            missing_transfers += 1;
        }
    }
    MoneyReport {
        expected,
        in_db,
        missing_transfers,
        stale_cache,
        retries: engine.stats().transaction_retries,
    }
}

/// The seed's financial flow, 200 transfers from 8 tasks on 5 accounts,
/// each a scope that reads the balance with `get_for_update`, adds and
/// writes it back: no money is lost, every transfer row exists, and every
/// cached balance is the database's.
pub async fn concurrent_read_modify_write_scopes_lose_no_money(pair: Pair) -> Outcome {
    let r = money_flow(&pair, 8, 5, 200, true).await;
    println!("{}: {r:?}", pair.name);
    assert_eq!(
        r.in_db, r.expected,
        "the balances lost money: {r:?} ({} of {})",
        r.in_db, r.expected
    );
    assert_eq!(r.missing_transfers, 0, "{r:?}");
    assert_eq!(r.stale_cache, 0, "{r:?}");
    Outcome::Passed
}

fn forced(kind: ErrorKind) -> Error {
    Error::new(kind, "forced by the test")
}

/// `Engine::transaction` commits when its closure returns `Ok`, rolls back
/// and returns the error when it returns `Err`, runs it again after a
/// retryable failure, and stops at its bound; its future can be spawned.
pub async fn transaction_closure_commits_rolls_back_and_retries_within_its_bound(
    pair: Pair,
) -> Outcome {
    let (engine, items) = setup_with(
        &pair,
        |c| {
            c.transaction_retry.attempts = 4;
            c.transaction_retry.base_delay = Duration::from_millis(1);
        },
        TableOptions::new(),
    )
    .await;
    let (e2, i2) = (engine.clone(), items.clone());
    let spawned = tokio::spawn(async move {
        let mut runs = 0;
        let r = e2
            .transaction(|tx| {
                runs += 1;
                let (n, i2) = (runs, i2.clone());
                Box::pin(async move {
                    tx.put(&i2, &item(1, f64::from(n))).await?;
                    match n {
                        1 => Err(forced(ErrorKind::SerializationFailure)),
                        2 => Err(forced(ErrorKind::Deadlock)),
                        3 => Err(forced(ErrorKind::Busy)),
                        _ => Ok(n),
                    }
                })
            })
            .await;
        (r, runs)
    });
    let (r, runs) = spawned.await.expect("the spawned transaction finished");
    assert_eq!(r.unwrap(), 4, "the fourth run commits");
    assert_eq!(runs, 4);
    assert_eq!(engine.stats().transaction_retries, 3);
    let (row, v) = in_db(&pair, &items, 1).await.expect("committed");
    assert_eq!(row, item(1, 4.0), "only the last run's write");
    assert_eq!(cached(&pair, &items, 1).await, Some((true, v)));

    let mut runs = 0;
    let e = engine
        .transaction(|tx| {
            runs += 1;
            let items = items.clone();
            Box::pin(async move {
                tx.put(&items, &item(2, 1.0)).await?;
                Err::<(), _>(forced(ErrorKind::Validation))
            })
        })
        .await
        .unwrap_err();
    assert_eq!((e.kind(), runs), (ErrorKind::Validation, 1), "not retried");
    assert_eq!(in_db(&pair, &items, 2).await, None, "rolled back");
    assert_eq!(cached(&pair, &items, 2).await, None);

    let mut runs = 0;
    let e = engine
        .transaction(|tx| {
            runs += 1;
            let items = items.clone();
            Box::pin(async move {
                tx.put(&items, &item(3, 1.0)).await?;
                Err::<(), _>(forced(ErrorKind::Deadlock))
            })
        })
        .await
        .unwrap_err();
    assert_eq!((e.kind(), runs), (ErrorKind::Deadlock, 4), "bounded");
    assert_eq!(in_db(&pair, &items, 3).await, None);

    // A failure the closure swallowed still poisons the scope: its commit
    // fails with that kind, which is retried too.
    let mut runs = 0;
    let r = engine
        .transaction(|tx| {
            runs += 1;
            let (n, items) = (runs, items.clone());
            Box::pin(async move {
                if n == 1 {
                    let _ = tx.get(&items.rows(), "not an int key").await;
                }
                tx.put(&items, &item(4, 1.0)).await.ok();
                Ok(n)
            })
        })
        .await;
    assert_eq!(
        r.unwrap_err().kind(),
        ErrorKind::InvalidKey,
        "a swallowed error fails the commit"
    );
    assert_eq!(runs, 1, "an input error is not retried");
    assert_eq!(in_db(&pair, &items, 4).await, None);
    Outcome::Passed
}

/// Runs `$bad` (an expression over `$tx: &mut Tx` giving a `Result`) in a
/// scope after a good write, then checks with [`after_poison`].
macro_rules! poisons {
    ($pair:expr, $engine:expr, $items:expr, $what:expr, $kind:expr, |$tx:ident| $bad:expr) => {{
        let mut scope = $engine.begin().await.unwrap();
        scope.put($items, &item(100, 1.0)).await.unwrap();
        let first: writethrough_core::Result<()> = {
            let $tx = &mut scope;
            ($bad).map(drop)
        };
        after_poison($pair, $items, $what, $kind, scope, first).await;
    }};
}

/// Checks that `first` failed with `kind`, that the scope is poisoned
/// (later writes, reads and `commit` fail with the same kind, `commit`
/// carrying the first error as its source), and that nothing was written.
async fn after_poison(
    pair: &Pair,
    items: &Handle<Item>,
    what: &str,
    kind: ErrorKind,
    mut tx: Tx,
    first: writethrough_core::Result<()>,
) {
    let first = first.expect_err(what);
    assert_eq!(first.kind(), kind, "{what}: {first}");
    assert!(!first.message().is_empty(), "{what}: an empty message");
    let later = tx.put(items, &item(101, 1.0)).await.expect_err(what);
    assert_eq!(
        later.kind(),
        kind,
        "{what}: a later write fails with the first kind: {later}"
    );
    let read = tx.get(items, 100).await.expect_err(what);
    assert_eq!(read.kind(), kind, "{what}: {read}");
    let e = tx.commit().await.expect_err(what);
    assert_eq!(
        e.kind(),
        kind,
        "{what}: commit fails with the first kind: {e}"
    );
    assert_eq!(e.status(), first.status(), "{what}");
    let source = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<Error>())
        .unwrap_or_else(|| panic!("{what}: the first error is the source of {e:?}"));
    assert_eq!(source.kind(), kind, "{what}");
    assert_eq!(source.message(), first.message(), "{what}");
    for k in [100, 101] {
        assert_eq!(
            in_db(pair, items, k).await,
            None,
            "{what}: key {k} was written"
        );
        assert_eq!(
            cached(pair, items, k).await,
            None,
            "{what}: key {k} was cached"
        );
    }
}

/// Every refusal of the README's bad-input table, a validator's refusal
/// and a database failure, each inside a scope: the scope is poisoned, its
/// commit fails with the first error's kind and source, and writes nothing.
pub async fn any_failure_in_a_scope_poisons_it_and_commit_writes_nothing(pair: Pair) -> Outcome {
    let db = FaultyDb::new(pair.db.clone());
    let p = pair.with_db(Arc::new(db.clone()));
    let (engine, items) = setup(
        &p,
        TableOptions::new().validate(|i: &Item| {
            if i.qty < 0 {
                Err("negative quantity".into())
            } else {
                Ok(())
            }
        }),
    )
    .await;
    let rows = engine
        .register_table(
            Item::table().renamed(&unique("rows")).unwrap(),
            TableOptions::new(),
        )
        .await
        .unwrap();
    let named = engine
        .register_table(
            Table::builder(&unique("named"))
                .key("k", ColumnType::Text)
                .column("v", ColumnType::Int)
                .build()
                .unwrap(),
            TableOptions::new(),
        )
        .await
        .unwrap();
    let caps = pair.cache.capabilities();
    let bad_rows = bad_rows(100, &caps, &pair.db.capabilities());
    for (what, row, kind) in bad_rows {
        let rows = &rows;
        poisons!(&pair, engine, &items, what, kind, |tx| tx
            .put(rows, &row)
            .await);
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
        poisons!(&pair, engine, &items, what, ErrorKind::InvalidTtl, |tx| tx
            .put_with(&items, &item(1, 1.0), WriteOptions::new().ttl(ttl))
            .await);
    }
    let i = &items;
    poisons!(
        &pair,
        engine,
        i,
        "tx.get of a key of the wrong type",
        ErrorKind::InvalidKey,
        |tx| tx.get(&i.rows(), "1").await
    );
    poisons!(
        &pair,
        engine,
        i,
        "tx.get_for_update of a key of the wrong type",
        ErrorKind::InvalidKey,
        |tx| tx.get_for_update(&i.rows(), "1").await
    );
    poisons!(
        &pair,
        engine,
        i,
        "tx.delete of a key of the wrong type",
        ErrorKind::InvalidKey,
        |tx| tx.delete(&i.rows(), "1").await
    );
    poisons!(
        &pair,
        engine,
        i,
        "a patch that sets the key",
        ErrorKind::SchemaMismatch,
        |tx| tx.update(i, 100, Patch::new().set("id", 2)).await
    );
    poisons!(
        &pair,
        engine,
        i,
        "a patch with NaN",
        ErrorKind::InvalidValue,
        |tx| tx.update(i, 100, Patch::new().set("price", f64::NAN)).await
    );
    poisons!(
        &pair,
        engine,
        i,
        "a patch of an unknown column",
        ErrorKind::SchemaMismatch,
        |tx| tx.update(i, 100, Patch::new().set("colour", "red")).await
    );
    poisons!(
        &pair,
        engine,
        i,
        "a patch with a bad column name",
        ErrorKind::InvalidIdentifier,
        |tx| tx.update(i, 100, Patch::new().set("bad name", 1)).await
    );
    let mut negative = item(5, 1.0);
    negative.qty = -1;
    poisons!(
        &pair,
        engine,
        i,
        "a put the validator refuses",
        ErrorKind::Validation,
        |tx| tx.put(i, &negative).await
    );
    poisons!(
        &pair,
        engine,
        i,
        "an update the validator refuses",
        ErrorKind::Validation,
        |tx| tx.update(i, 100, Patch::new().set("qty", -5)).await
    );
    let named = &named;
    let mut bad_keys: Vec<String> = vec![String::new()];
    if caps.max_key_len < 1 << 20 {
        bad_keys.push("k".repeat(caps.max_key_len));
    }
    if caps.key_rule == KeyRule::NoSpaceOrControl {
        bad_keys.extend(["a b".into(), "nl\n".into()]);
    }
    for k in bad_keys {
        let what = format!(
            "a key the cache cannot hold: {:?}",
            k.get(..10).unwrap_or(&k)
        );
        let row = Row::new().set("k", k.as_str()).set("v", 1);
        poisons!(&pair, engine, i, &what, ErrorKind::InvalidKey, |tx| tx
            .put(named, &row)
            .await);
        poisons!(&pair, engine, i, &what, ErrorKind::InvalidKey, |tx| tx
            .delete(named, k.as_str())
            .await);
    }
    // A database failure inside the scope: its kind, not Validation.
    let faults = db.faults().clone();
    poisons!(
        &pair,
        engine,
        i,
        "a database failure",
        ErrorKind::Unavailable,
        |tx| {
            faults.fail_scope_writes(true);
            let r = tx.put(i, &item(6, 1.0)).await;
            faults.fail_scope_writes(false);
            r
        }
    );
    // And the scope still works when nothing fails.
    let mut tx = engine.begin().await.unwrap();
    tx.put(i, &item(100, 1.0)).await.unwrap();
    tx.commit().await.unwrap();
    assert!(in_db(&pair, i, 100).await.is_some());
    Outcome::Passed
}

/// SQLite has one writer, which an open scope holds: a write, a batch or a
/// second scope from the same task would wait for it forever. They fail at
/// once with `WouldDeadlock` and never commit; another task's write waits
/// for the scope and then commits.
pub async fn a_write_beside_an_open_sqlite_scope_in_its_own_task_fails_at_once(
    pair: Pair,
) -> Outcome {
    if pair.db.name() != "sqlite" {
        return Outcome::NotApplicable(format!(
            "{} has no single writer: a write beside a scope waits only for the keys the scope locked",
            pair.db.name()
        ));
    }
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let mut tx = engine.begin().await.unwrap();
    tx.put(&items, &item(1, 1.0)).await.unwrap();
    let started = Instant::now();
    let e = items.put(&item(2, 1.0)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldDeadlock, "{e}");
    assert!(!e.message().is_empty() && !e.is_in_doubt(), "{e:?}");
    let e = items
        .put_many(&[item(3, 1.0), item(4, 1.0)])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldDeadlock, "{e}");
    let e = items.delete(1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldDeadlock, "{e}");
    let e = engine.begin().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldDeadlock, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once, not after a timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(items.get(1).await.unwrap(), None, "reads still work");
    let other = tokio::spawn({
        let items = items.clone();
        async move { items.put(&item(5, 1.0)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !other.is_finished(),
        "another task's write waits for the scope"
    );
    tx.commit().await.unwrap();
    other
        .await
        .unwrap()
        .expect("another task's write commits after the scope");
    // Refused writes never commit later.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for k in [2, 3, 4] {
        assert_eq!(in_db(&pair, &items, k).await, None, "key {k}");
    }
    assert!(in_db(&pair, &items, 1).await.is_some());
    assert!(in_db(&pair, &items, 5).await.is_some());
    // A dropped scope frees its task at once, and so does the closure form.
    {
        let mut tx = engine.begin().await.unwrap();
        tx.put(&items, &item(6, 1.0)).await.unwrap();
    }
    items
        .put(&item(7, 1.0))
        .await
        .expect("the scope was dropped");
    let e = engine
        .transaction(|tx| {
            let items = items.clone();
            Box::pin(async move {
                tx.put(&items, &item(8, 1.0)).await?;
                items.put(&item(9, 1.0)).await?;
                Ok(())
            })
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldDeadlock, "{e}");
    assert_eq!(engine.stats().transaction_retries, 0, "not retried");
    assert_eq!(in_db(&pair, &items, 8).await, None);
    assert_eq!(in_db(&pair, &items, 9).await, None);
    Outcome::Passed
}

/// A batch of 100,000 rows commits on every pair (PostgreSQL locks a
/// bounded set of key slots, not one lock per key) and every row reaches
/// the cache (the engine splits the cache writes into pieces).
pub async fn put_many_of_a_hundred_thousand_rows_commits_and_caches_every_row(
    pair: Pair,
) -> Outcome {
    const N: i64 = 100_000;
    // Fenced, without the outbox: 100,000 outbox records in the shared
    // database would crowd out the records other suites' cases look for
    // with `outbox_pending(None, ..)` while this runs. The outbox path of a
    // batch this size is proven on a server of its own by the PostgreSQL
    // adapter's `transactions_of_any_size_stay_within_the_lock_table`.
    let (engine, items) = setup_with(
        &pair,
        |c| {
            c.consistency = Consistency::fenced();
            // A debug build on a loaded machine takes tens of seconds.
            c.db_timeout = Duration::from_secs(180);
        },
        TableOptions::new(),
    )
    .await;
    let rows: Vec<Item> = (1..=N).map(|i| item(i, 1.0)).collect();
    let started = Instant::now();
    let versions = items
        .put_many(&rows)
        .await
        .expect("a batch of 100,000 rows");
    println!(
        "{}: put_many of {N} rows in {:?}",
        pair.name,
        started.elapsed()
    );
    assert_eq!(versions.len(), N as usize);
    let s = engine.stats();
    assert_eq!(s.cache_write_failures, 0, "{s:?}");
    assert_eq!(engine.pending_resync(), 0);
    assert_eq!(engine.breaker_state(), BreakerState::Closed);
    for k in [1, 2, N / 2, N - 1, N] {
        let (_, v) = in_db(&pair, &items, k).await.expect("committed");
        assert_eq!(versions[k as usize - 1], v);
        assert_eq!(
            cached(&pair, &items, k).await,
            Some((true, v)),
            "key {k} cached"
        );
    }
    let tail = pair
        .db
        .scan(items.table(), Some(Key::Int(N - 10)), 100)
        .await
        .unwrap();
    assert_eq!(tail.len(), 10);
    let hits = engine.stats().hits;
    for k in (1..=N).step_by(997) {
        assert_eq!(items.get(k).await.unwrap(), Some(item(k, 1.0)));
    }
    assert_eq!(
        engine.stats().hits - hits,
        (1..=N).step_by(997).count() as u64
    );
    Outcome::Passed
}

/// When the cache fails a batch's writes, the batch still commits, and the
/// failure shows: in the stats, in the health report's cache failure rate,
/// and in the breaker, which opens after failing batches as after failing
/// single writes.
pub async fn a_cache_failure_of_a_batch_counts_in_stats_health_and_the_breaker(
    pair: Pair,
) -> Outcome {
    let faulty = FaultyCache::new(pair.cache.clone());
    let p = pair.with_cache(Arc::new(faulty.clone()));
    let (engine, items) = setup(&p, TableOptions::new()).await;
    let _ = engine.health();
    faulty.faults().fail_writes(true);
    // Two chunks per batch; resync, one key at a time, repairs 1,200 keys
    // within the bound below even on a loaded machine.
    let rows: Vec<Item> = (1..=600).map(|i| item(i, 1.0)).collect();
    items
        .put_many(&rows)
        .await
        .expect("the batch commits without the cache");
    assert_eq!(engine.stats().cache_write_failures, 600);
    assert_eq!(engine.pending_resync(), 600);
    let rows: Vec<Item> = (601..=1_200).map(|i| item(i, 1.0)).collect();
    items
        .put_many(&rows)
        .await
        .expect("the batch commits without the cache");
    let h = engine.health();
    assert!(h.cache_failure_rate > 0.0, "{h:?}");
    assert_eq!(engine.breaker_state(), BreakerState::Open, "{h:?}");
    assert!(engine.breaker_trips() >= 1);
    for k in [1, 1_199] {
        assert_eq!(
            items.get(k).await.unwrap(),
            Some(item(k, 1.0)),
            "served from the database"
        );
    }
    faulty.faults().heal();
    let healed = eventually(Duration::from_secs(60), || async {
        engine.pending_resync() == 0 && engine.breaker_state() == BreakerState::Closed
    })
    .await;
    assert!(healed, "pending {}", engine.pending_resync());
    for k in [1, 600, 1_200] {
        let (_, v) = in_db(&pair, &items, k).await.unwrap();
        assert_eq!(
            cached(&pair, &items, k).await,
            Some((true, v)),
            "key {k} resynced"
        );
    }
    Outcome::Passed
}

/// An entry whose header and checksum are sound but whose payload does not
/// decode into the entity (another table's row, at the current version) is
/// a miss like corrupt bytes, and the read replaces it with the database's row.
pub async fn a_cached_payload_that_does_not_fit_the_entity_is_replaced(pair: Pair) -> Outcome {
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    let v = items.put(&item(1, 1.0)).await.unwrap();
    let ck = items.cache_key(1).unwrap();
    let other = Table::builder("other")
        .key("id", ColumnType::Int)
        .column("label", ColumnType::Text)
        .build()
        .unwrap();
    let (_, row) = other
        .normalize_row(Row::new().set("id", 1).set("label", "not an item"))
        .unwrap();
    let foreign = engine
        .config()
        .codec
        .encode(&other, &row)
        .unwrap()
        .into_entry_at(v, engine.cache_epoch());
    assert!(
        matches!(codec::decode(&foreign), Decoded::Row { version, .. } if version == v),
        "a sound entry at the current version"
    );
    pair.cache.set(&ck, foreign, None).await.unwrap();
    let corrupt = engine.stats().corrupt_entries;
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 1.0)));
    assert_eq!(engine.stats().corrupt_entries, corrupt + 1);
    let hits = engine.stats().hits;
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 1.0)));
    assert_eq!(
        engine.stats().hits,
        hits + 1,
        "replaced: the next read hits"
    );
    assert_eq!(cached(&pair, &items, 1).await, Some((true, v)));
    Outcome::Passed
}

/// `get_many` answers every key in order (duplicates and absent keys
/// included) with one cache call and one database query for the misses,
/// whose rows it caches in one fenced batch: the next `get_many` hits.
pub async fn get_many_is_one_cache_round_trip_and_one_query_for_the_misses(pair: Pair) -> Outcome {
    let faulty = FaultyCache::new(pair.cache.clone());
    let db = FaultyDb::new(pair.db.clone());
    let counted = pair
        .with_cache(Arc::new(faulty.clone()))
        .with_db(Arc::new(db.clone()));
    let (_, items) = setup(&counted, TableOptions::new()).await;
    let batch: Vec<Item> = (1..=10).map(|i| item(i, i as f64)).collect();
    items.put_many(&batch).await.unwrap();
    for k in [2, 5, 7] {
        pair.cache
            .delete(&items.cache_key(k).unwrap())
            .await
            .unwrap();
    }
    faulty.faults().calls.reset();
    db.faults().calls.reset();
    let keys = [1, 2, 99, 5, 3, 7, 2];
    let reads = items.read_many(keys).await.unwrap();
    let values: Vec<Option<Item>> = reads.iter().map(|r| r.value.clone()).collect();
    let expected: Vec<Option<Item>> = keys
        .iter()
        .map(|&k| (k <= 10).then(|| item(k, k as f64)))
        .collect();
    assert_eq!(values, expected, "one answer per key, in order");
    let hits: Vec<bool> = reads.iter().map(|r| r.hit).collect();
    assert_eq!(hits, [true, false, false, false, true, false, false]);
    let calls = &faulty.faults().calls;
    assert_eq!(calls.get("get_many"), 1, "one cache round trip");
    assert_eq!(calls.get("get"), 0);
    assert_eq!(calls.get("set_many_if_newer"), 1, "one fenced populate");
    assert_eq!(calls.get("set_if_newer"), 0);
    assert_eq!(
        db.faults().calls.get("get_many"),
        1,
        "one query for the misses"
    );
    assert_eq!(db.faults().calls.get("get"), 0);
    for k in [2, 5, 7] {
        let (_, v) = in_db(&pair, &items, k).await.unwrap();
        assert_eq!(
            cached(&pair, &items, k).await,
            Some((true, v)),
            "key {k} re-cached"
        );
    }
    let again = items.read_many([2, 5, 7]).await.unwrap();
    assert!(again.iter().all(|r| r.hit), "the misses were cached");
    assert_eq!(items.get_many(Vec::<i64>::new()).await.unwrap(), vec![]);
    Outcome::Passed
}

/// `delete_many` deletes in one transaction and leaves a tombstone per key
/// in one cache round trip; a key given twice is refused before anything
/// is deleted.
pub async fn delete_many_is_one_transaction_and_leaves_every_tombstone(pair: Pair) -> Outcome {
    let faulty = FaultyCache::new(pair.cache.clone());
    let db = FaultyDb::new(pair.db.clone());
    let counted = pair
        .with_cache(Arc::new(faulty.clone()))
        .with_db(Arc::new(db.clone()));
    let (_, items) = setup(&counted, TableOptions::new()).await;
    let batch: Vec<Item> = (1..=5).map(|i| item(i, 1.0)).collect();
    let versions = items.put_many(&batch).await.unwrap();
    let e = items.delete_many([1, 2, 1]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidKey, "{e}");
    assert!(in_db(&pair, &items, 1).await.is_some(), "nothing deleted");
    faulty.faults().calls.reset();
    db.faults().calls.reset();
    let existed = items.delete_many([1, 2, 9]).await.unwrap();
    assert_eq!(existed, [true, true, false]);
    assert_eq!(
        db.faults().calls.get("execute"),
        1,
        "one database transaction"
    );
    assert_eq!(
        faulty.faults().calls.get("set_many_if_newer"),
        1,
        "one cache round trip"
    );
    for (k, v) in [(1, versions[0]), (2, versions[1])] {
        assert_eq!(in_db(&pair, &items, k).await, None);
        match cached(&pair, &items, k).await {
            Some((false, tv)) => assert!(tv > v, "the tombstone of {k} is newer than its row"),
            other => panic!("expected a tombstone for {k}, found {other:?}"),
        }
        assert_eq!(items.get(k).await.unwrap(), None);
    }
    assert_eq!(items.get(3).await.unwrap(), Some(item(3, 1.0)));
    Outcome::Passed
}

/// `insert` creates a row and refuses, with `Conflict` and no side effect,
/// a key that exists; of eight concurrent inserts of one new key exactly
/// one succeeds. After a delete, the key can be inserted again.
pub async fn insert_creates_only_and_one_of_racing_inserts_wins(pair: Pair) -> Outcome {
    let (_, items) = setup(&pair, TableOptions::new()).await;
    let v = items.insert(&item(1, 1.0)).await.unwrap();
    assert_eq!(cached(&pair, &items, 1).await, Some((true, v)));
    let e = items.insert(&item(1, 2.0)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert_eq!(in_db(&pair, &items, 1).await, Some((item(1, 1.0), v)));
    assert_eq!(cached(&pair, &items, 1).await, Some((true, v)));
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 1.0)));

    let racers = (0..8).map(|n| {
        let items = items.clone();
        async move { items.insert(&item(2, f64::from(n))).await }
    });
    let results = join_all(racers).await;
    let won: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_ok()).collect();
    assert_eq!(won.len(), 1, "exactly one insert wins: {results:?}");
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        }
    }
    let winner = item(2, won[0] as f64);
    assert_eq!(
        in_db(&pair, &items, 2).await.map(|(i, _)| i),
        Some(winner.clone())
    );
    assert_eq!(items.get(2).await.unwrap(), Some(winner));

    assert!(items.delete(1).await.unwrap());
    let v3 = items.insert(&item(1, 3.0)).await.unwrap();
    assert!(v3 > v);
    assert_eq!(items.get(1).await.unwrap(), Some(item(1, 3.0)));
    Outcome::Passed
}

/// `invalidate` turns a cached row into a miss at its version: the next
/// read loads from the database (and says so), a populate of an older
/// row is refused, and the read after that hits again.
pub async fn invalidate_makes_the_next_read_load_and_fences_older_rows(pair: Pair) -> Outcome {
    let (_, items) = setup(&pair, TableOptions::new()).await;
    let v1 = items.put(&item(1, 1.0)).await.unwrap();
    let v2 = items.put(&item(1, 2.0)).await.unwrap();
    assert!(items.read(1).await.unwrap().hit);
    assert!(items.invalidate(1).await.unwrap(), "a row was invalidated");
    assert!(
        !items.invalidate(1).await.unwrap(),
        "an invalidation is already a miss"
    );
    let ck = items.cache_key(1).unwrap();
    let table = items.table().clone();
    let (_, old_row) = table.normalize_row(item(1, 1.0).to_row().unwrap()).unwrap();
    let old = writethrough_core::backend::CacheItem {
        key: ck.clone(),
        entry: Codec::Json.encode(&table, &old_row).unwrap().into_entry(v1),
        version: v1,
        ttl: None,
    };
    assert_eq!(
        pair.cache.set_if_newer(old).await.unwrap(),
        writethrough_core::backend::Fence::Stale,
        "an older row cannot fill the invalidated entry"
    );
    let read = items.read(1).await.unwrap();
    assert_eq!((read.value, read.hit), (Some(item(1, 2.0)), false));
    assert_eq!(cached(&pair, &items, 1).await, Some((true, v2)));
    assert!(items.read(1).await.unwrap().hit);
    assert!(!items.invalidate(42).await.unwrap(), "nothing cached");
    Outcome::Passed
}

/// `shutdown` removes the outbox records of applied writes at once (no
/// waiting for the background pass) and stops the background task: a
/// record left behind afterwards is not replayed by this engine.
pub async fn shutdown_flushes_the_outbox_and_stops_the_background_work(pair: Pair) -> Outcome {
    let (engine, items) = setup_with(
        &pair,
        |c| {
            c.consistency = Consistency::strict();
            c.reconcile_interval = Some(Duration::from_millis(50));
        },
        TableOptions::new(),
    )
    .await;
    let table = items.table().name().as_str().to_owned();
    let pending = || async {
        pair.db
            .outbox_pending(None, Duration::ZERO, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.table == table)
            .count()
    };
    items.put(&item(1, 1.0)).await.unwrap();
    engine.shutdown().await.unwrap();
    assert_eq!(
        pending().await,
        0,
        "shutdown removed the applied write's record"
    );
    // What a crashed writer leaves: a row and its outbox record, no cache write.
    commit_without_cache_write(&pair, &items, &item(2, 2.0)).await;
    // Past the grace period and several reconcile intervals.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(pending().await, 1, "no background replay after shutdown");
    assert_eq!(
        items.get(2).await.unwrap(),
        Some(item(2, 2.0)),
        "reads still work"
    );
    Outcome::Passed
}

/// The same generic code writes through a handle (each write its own
/// transaction, cached at once) and through a scope's view of the table
/// (cached only after the commit; nothing if the scope rolls back).
pub async fn a_handle_and_a_scope_share_one_write_api(pair: Pair) -> Outcome {
    use writethrough_core::TableWrites;
    async fn restock(
        w: &mut impl TableWrites<Item>,
        id: i64,
        qty: i64,
    ) -> writethrough_core::Result<()> {
        let mut it = w.get(id).await?.unwrap_or_else(|| item(id, 1.0));
        it.qty = qty;
        w.put(&it).await?;
        w.update(id, Patch::new().set("price", qty as f64)).await?;
        Ok(())
    }
    let (engine, items) = setup(&pair, TableOptions::new()).await;
    restock(&mut items.clone(), 1, 5).await.unwrap();
    let want = Item {
        qty: 5,
        price: 5.0,
        ..item(1, 1.0)
    };
    assert_eq!(items.get(1).await.unwrap(), Some(want.clone()));

    let mut tx = engine.begin().await.unwrap();
    restock(&mut tx.on(&items), 1, 7).await.unwrap();
    restock(&mut tx.on(&items), 2, 3).await.unwrap();
    let (_, v_before) = in_db(&pair, &items, 1).await.unwrap();
    assert_eq!(
        cached(&pair, &items, 1).await,
        Some((true, v_before)),
        "not before the commit"
    );
    assert_eq!(cached(&pair, &items, 2).await, None);
    tx.commit().await.unwrap();
    assert_eq!(items.get(1).await.unwrap().map(|i| i.qty), Some(7));
    assert_eq!(
        items.get(2).await.unwrap().map(|i| (i.qty, i.price)),
        Some((3, 3.0))
    );

    let mut tx = engine.begin().await.unwrap();
    let mut view = tx.on(&items);
    assert!(TableWrites::delete(&mut view, 2).await.unwrap());
    tx.rollback().await.unwrap();
    assert!(
        items.get(2).await.unwrap().is_some(),
        "a rolled back scope deletes nothing"
    );

    // insert through either: a new key is created, an existing one is a
    // Conflict, which poisons the scope (its other writes are not committed).
    TableWrites::insert(&mut items.clone(), &item(3, 1.0))
        .await
        .unwrap();
    let mut tx = engine.begin().await.unwrap();
    tx.on(&items).insert(&item(4, 1.0)).await.unwrap();
    let e = tx.on(&items).insert(&item(3, 9.0)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert_eq!(tx.commit().await.unwrap_err().kind(), ErrorKind::Conflict);
    assert_eq!(
        in_db(&pair, &items, 4).await,
        None,
        "the poisoned scope wrote nothing"
    );
    assert_eq!(items.get(3).await.unwrap(), Some(item(3, 1.0)));
    Outcome::Passed
}
