//! Property tests on Moka + SQLite: random sequences of operations, with
//! cache faults and commits of unknown outcome mixed in. After every step,
//! reading any key through the engine returns exactly what the database holds.

use std::sync::Arc;

use proptest::prelude::*;
use writethrough::moka::MokaCache;
use writethrough::sqlite::SqliteStore;
use writethrough::{Engine, Handle, Patch, TableOptions};
use writethrough_testkit::faults::{FaultyCache, FaultyDb};
use writethrough_testkit::suite::engine::{Item, in_db, item};
use writethrough_testkit::suite::{Pair, unique};

const KEYS: i64 = 5;

#[derive(Debug, Clone)]
enum Op {
    Put(i64, u8),
    Update(i64, u8),
    Delete(i64),
    Get(i64),
    PutMany(Vec<i64>, u8),
    Tx { put: i64, delete: i64, commit: bool },
    CacheWritesFail(bool),
    NextCommitInDoubt,
    Resync,
}

fn op() -> impl Strategy<Value = Op> {
    let k = || 0..KEYS;
    prop_oneof![
        4 => (k(), any::<u8>()).prop_map(|(k, p)| Op::Put(k, p)),
        3 => (k(), any::<u8>()).prop_map(|(k, p)| Op::Update(k, p)),
        2 => k().prop_map(Op::Delete),
        4 => k().prop_map(Op::Get),
        1 => (proptest::collection::btree_set(k(), 1..4), any::<u8>())
            .prop_map(|(ks, p)| Op::PutMany(ks.into_iter().collect(), p)),
        1 => (k(), k(), any::<bool>()).prop_map(|(put, delete, commit)| Op::Tx { put, delete, commit }),
        1 => any::<bool>().prop_map(Op::CacheWritesFail),
        1 => Just(Op::NextCommitInDoubt),
        1 => Just(Op::Resync),
    ]
}

struct World {
    pair: Pair,
    engine: Engine,
    items: Handle<Item>,
    cache: FaultyCache,
    db: FaultyDb,
}

async fn world() -> World {
    let cache = FaultyCache::new(Arc::new(MokaCache::default()));
    let db = FaultyDb::new(Arc::new(SqliteStore::open_temporary().unwrap()));
    let pair = Pair::new(Arc::new(cache.clone()), Arc::new(db.clone()));
    let engine = pair.builder().build().unwrap();
    let table = <Item as writethrough::Entity>::table()
        .renamed(&unique("prop"))
        .unwrap();
    let items = engine
        .register_in(table, TableOptions::new())
        .await
        .unwrap();
    World {
        pair,
        engine,
        items,
        cache,
        db,
    }
}

impl World {
    async fn step(&self, op: &Op) {
        // Writes may fail only where a fault was injected; what matters is
        // what reads return afterwards.
        match op {
            Op::Put(k, p) => {
                let _ = self.items.put(&item(*k, f64::from(*p))).await;
            }
            Op::Update(k, p) => {
                let _ = self
                    .items
                    .update(*k, Patch::new().set("price", f64::from(*p)))
                    .await;
            }
            Op::Delete(k) => {
                let _ = self.items.delete(*k).await;
            }
            Op::Get(k) => {
                let _ = self.items.get(*k).await;
            }
            Op::PutMany(ks, p) => {
                let batch: Vec<Item> = ks.iter().map(|k| item(*k, f64::from(*p))).collect();
                let _ = self.items.put_many(&batch).await;
            }
            Op::Tx {
                put,
                delete,
                commit,
            } => {
                let mut tx = self.engine.begin().await.unwrap();
                tx.put(&self.items, &item(*put, 77.0)).await.unwrap();
                tx.delete(&self.items, *delete).await.unwrap();
                if *commit {
                    let _ = tx.commit().await;
                } else {
                    tx.rollback().await.unwrap();
                }
            }
            Op::CacheWritesFail(on) => self.cache.faults().fail_writes(*on),
            Op::NextCommitInDoubt => self.db.faults().in_doubt_writes(true),
            Op::Resync => {
                self.engine.resync_now().await;
            }
        }
        if !matches!(op, Op::NextCommitInDoubt) {
            self.db.faults().in_doubt_writes(false);
        }
    }

    async fn check(&self, after: &Op) {
        for k in 0..KEYS {
            let via_engine = self.items.get(k).await.unwrap();
            let in_db = in_db(&self.pair, &self.items, k).await.map(|(i, _)| i);
            assert_eq!(via_engine, in_db, "key {k} after {after:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn reads_through_the_engine_always_return_what_the_database_holds(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let w = world().await;
            for op in &ops {
                w.step(op).await;
                w.check(op).await;
            }
            // When the faults stop, the cache converges to the database.
            w.cache.faults().heal();
            w.engine.resync_now().await;
            w.check(&Op::Resync).await;
        });
    }
}
