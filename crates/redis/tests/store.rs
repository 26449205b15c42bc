//! `RedisCache` against a real redis-server: every `CacheStore` call, the
//! fencing rule, NOSCRIPT recovery, TTLs and prefix clearing.

mod common;

use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::AsyncCommands;
use writethrough_core::ErrorKind;
use writethrough_core::backend::codec::{self, HEADER_LEN};
use writethrough_core::backend::{CacheItem, CacheStore, Fence, KeyRule};
use writethrough_redis::{DEFAULT_MAX_VALUE_LEN, MAX_KEY_LEN, RedisCache};

use common::*;

#[tokio::test]
async fn set_and_set_many_store_unconditionally_with_their_ttls() {
    let srv = server().await;
    let cache = cache(&srv).await;
    let mut raw = raw(&srv).await;
    // Unconditional: an older version overwrites a newer one.
    cache.set("k", entry(9, "new"), None).await.unwrap();
    cache.set("k", entry(1, "old"), None).await.unwrap();
    assert_eq!(version_of(cache.get("k").await.unwrap().as_ref()), Some(1));
    let ttl: i64 = raw.pttl("k").await.unwrap();
    assert_eq!(ttl, -1, "no TTL means no expiry");

    cache
        .set_many(vec![
            item("m1", entry(3, "x"), Some(Duration::from_secs(600))),
            item("m2", entry(4, "y"), None),
            item("k", entry(0, "z"), None),
        ])
        .await
        .unwrap();
    cache.set_many(Vec::new()).await.unwrap();
    let got = cache
        .get_many(&["m1".into(), "m2".into(), "k".into()])
        .await
        .unwrap();
    let versions: Vec<_> = got.iter().map(|b| version_of(b.as_ref())).collect();
    assert_eq!(versions, vec![Some(3), Some(4), Some(0)]);
    let m1: i64 = raw.pttl("m1").await.unwrap();
    assert!(m1 > 0 && m1 <= 600_000, "PTTL {m1}");
    let m2: i64 = raw.pttl("m2").await.unwrap();
    assert_eq!(m2, -1);
}

#[tokio::test]
async fn ping_answers_and_capabilities_describe_redis() {
    let srv = server().await;
    let cache = cache(&srv).await;
    cache.ping().await.unwrap();
    assert_eq!(cache.name(), "redis");
    let caps = cache.capabilities();
    assert!(caps.atomic_fencing);
    assert!(!caps.in_process);
    assert_eq!(caps.ttl_granularity, Duration::from_millis(1));
    assert!(caps.max_ttl >= Duration::from_secs(10 * 365 * 86_400));
    assert_eq!(caps.key_rule, KeyRule::Any);
    assert_eq!(caps.max_key_len, MAX_KEY_LEN);
    assert_eq!(caps.max_value_len, DEFAULT_MAX_VALUE_LEN);
    // The capability limits are the ones the adapter enforces.
    let big = Bytes::from(vec![b'x'; caps.max_value_len + 1]);
    let e = cache.set("big", big, None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge);
    assert_eq!(cache.get("big").await.unwrap(), None);
}

#[tokio::test]
async fn bad_ttls_and_oversized_items_are_refused_before_anything_is_written() {
    let srv = server().await;
    let cache = RedisCache::with_config(config(&srv).with_max_value_len(1024))
        .await
        .unwrap();
    let e = cache
        .set("k", "v".into(), Some(Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidTtl);
    let e = cache
        .set_many_if_newer(vec![
            row_item("ok", 1),
            item("big", entry_of_len(1, 2048), None),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge);
    assert_eq!(e.key(), Some("big"));
    let e = cache
        .set_many(vec![
            row_item("ok", 1),
            item("z", entry(1, "v"), Some(Duration::ZERO)),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidTtl);
    // Nothing of either batch reached the server.
    assert_eq!(cache.get("ok").await.unwrap(), None);
    assert_eq!(cache.get("big").await.unwrap(), None);
}

#[tokio::test]
async fn fenced_writes_apply_newer_and_refuse_older_or_equal_versions() {
    let srv = server().await;
    let cache = cache(&srv).await;
    assert_eq!(
        cache.set_if_newer(row_item("k", 5)).await.unwrap(),
        Fence::Applied,
        "absent"
    );
    assert_eq!(
        cache.set_if_newer(row_item("k", 4)).await.unwrap(),
        Fence::Stale
    );
    assert_eq!(
        cache.set_if_newer(row_item("k", 5)).await.unwrap(),
        Fence::Stale
    );
    assert_eq!(version_of(cache.get("k").await.unwrap().as_ref()), Some(5));
    assert_eq!(
        cache.set_if_newer(row_item("k", 6)).await.unwrap(),
        Fence::Applied
    );
    assert_eq!(version_of(cache.get("k").await.unwrap().as_ref()), Some(6));
    // Across the 10-digit halves, and at the very top.
    for (old, new) in [
        (9_999_999_999, 10_000_000_000),
        (10_000_000_000, 10_000_000_001),
        (19_999_999_999, 20_000_000_000),
        (u64::MAX - 1, u64::MAX),
    ] {
        let key = format!("edge:{new}");
        assert_eq!(
            cache.set_if_newer(row_item(&key, old)).await.unwrap(),
            Fence::Applied
        );
        assert_eq!(
            cache.set_if_newer(row_item(&key, new)).await.unwrap(),
            Fence::Applied,
            "{old} -> {new}"
        );
        assert_eq!(
            cache.set_if_newer(row_item(&key, old)).await.unwrap(),
            Fence::Stale,
            "{new} -> {old}"
        );
        assert_eq!(
            version_of(cache.get(&key).await.unwrap().as_ref()),
            Some(new)
        );
    }
}

#[tokio::test]
async fn tombstones_fence_like_values() {
    let srv = server().await;
    let cache = cache(&srv).await;
    assert_eq!(
        cache.set_if_newer(tomb_item("k", 5)).await.unwrap(),
        Fence::Applied
    );
    for v in [4, 5] {
        assert_eq!(
            cache.set_if_newer(row_item("k", v)).await.unwrap(),
            Fence::Stale,
            "a populate at {v} must not undo the delete at 5"
        );
    }
    assert_eq!(
        cache.get("k").await.unwrap(),
        Some(codec::tombstone(5)),
        "the tombstone is kept"
    );
    assert_eq!(
        cache.set_if_newer(row_item("k", 6)).await.unwrap(),
        Fence::Applied
    );
    assert_eq!(
        cache.set_if_newer(tomb_item("k", 6)).await.unwrap(),
        Fence::Stale
    );
    assert_eq!(
        cache.set_if_newer(tomb_item("k", 7)).await.unwrap(),
        Fence::Applied
    );
    assert_eq!(cache.get("k").await.unwrap(), Some(codec::tombstone(7)));
}

#[tokio::test]
async fn corrupt_foreign_or_other_typed_values_are_replaced() {
    let srv = server().await;
    let cache = cache(&srv).await;
    let mut raw = raw(&srv).await;
    let good = entry(50, "v").to_vec();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("foreign text", b"hello".to_vec()),
        ("empty", Vec::new()),
        ("truncated header", good[..HEADER_LEN - 1].to_vec()),
    ];
    let mut wrong_magic = good.clone();
    wrong_magic[2] = b'0';
    cases.push(("old envelope format", wrong_magic));
    let mut wrong_kind = good.clone();
    wrong_kind[3] = b'X';
    cases.push(("unknown kind", wrong_kind));
    let mut non_digit = good.clone();
    non_digit[23] = b'a';
    cases.push(("non-digit in version", non_digit));
    let mut space = good.clone();
    space[4] = b' ';
    cases.push(("space in version", space));
    let mut too_big = good.clone();
    too_big[4..24].copy_from_slice(b"99999999999999999999");
    cases.push(("version past u64::MAX", too_big));
    let mut just_over = good.clone();
    just_over[4..24].copy_from_slice(b"18446744073709551616");
    cases.push(("u64::MAX + 1", just_over));

    for (what, stored) in cases {
        let key = format!("corrupt:{what}");
        let () = raw.set(&key, stored.as_slice()).await.unwrap();
        assert!(
            codec::replaces(Some(&stored), 0, 1),
            "{what}: the codec calls it unreadable"
        );
        assert_eq!(
            cache.set_if_newer(row_item(&key, 1)).await.unwrap(),
            Fence::Applied,
            "{what}"
        );
        assert_eq!(version_of(cache.get(&key).await.unwrap().as_ref()), Some(1));
    }

    // A checksum mismatch does not matter for fencing: the header is readable.
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let () = raw.set("flipped", flipped.as_slice()).await.unwrap();
    assert_eq!(
        cache.set_if_newer(row_item("flipped", 50)).await.unwrap(),
        Fence::Stale
    );

    // Keys of other types are not entries either.
    let _: i64 = raw.rpush("a-list", "x").await.unwrap();
    let _: i64 = raw.hset("a-hash", "f", "v").await.unwrap();
    let _: i64 = raw.sadd("a-set", "m").await.unwrap();
    for key in ["a-list", "a-hash", "a-set"] {
        assert_eq!(
            cache.set_if_newer(tomb_item(key, 1)).await.unwrap(),
            Fence::Applied,
            "{key}"
        );
        assert_eq!(cache.get(key).await.unwrap(), Some(codec::tombstone(1)));
    }
}

/// Stored bytes near the envelope: valid headers with versions around the
/// 10-digit halves and `u64::MAX`, and every kind of damage.
fn arbitrary_stored(rng: &mut StdRng) -> Vec<u8> {
    let version: u64 = match rng.random_range(0..6) {
        0 => rng.random_range(0..100),
        1 => rng.random_range(9_999_999_990..10_000_000_010),
        2 => u64::MAX - rng.random_range(0..100),
        3 => 1_844_674_407_000_000_000 + rng.random_range(0..10_000_000_000),
        _ => rng.random(),
    };
    let epoch: u64 = rng.random_range(0..3);
    let mut b = match rng.random_range(0..3) {
        0 => codec::tombstone_at(version, epoch).to_vec(),
        1 => codec::invalidation_at(version, epoch).to_vec(),
        _ => entry_at(version, epoch, "row").to_vec(),
    };
    match rng.random_range(0..12) {
        0 => b.truncate(rng.random_range(0..HEADER_LEN)),
        1 => b[rng.random_range(0..4)] = rng.random(),
        2 => b[rng.random_range(4..24)] = rng.random(),
        3 => {
            // Twenty digits that may exceed u64::MAX.
            let hi: u64 = rng.random_range(1_844_674_400..1_844_674_415);
            let lo: u64 = rng.random_range(0..10_000_000_000);
            b[4..24].copy_from_slice(format!("{hi:010}{lo:010}").as_bytes());
        }
        4 => b[rng.random_range(4..24)] = [b'/', b':', b' ', 0, 0xd9][rng.random_range(0..5)],
        6 if b.len() >= HEADER_LEN => b[rng.random_range(29..39)] = rng.random(),
        5 => b = (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
        _ => {}
    }
    b
}

#[tokio::test]
async fn the_script_decides_exactly_like_codec_replaces() {
    let srv = server().await;
    let cache = cache(&srv).await;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let n = 3000;
    let stored: Vec<Vec<u8>> = (0..n).map(|_| arbitrary_stored(&mut rng)).collect();
    let items: Vec<CacheItem> = stored
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let near = codec::entry_version(s).unwrap_or_else(|| rng.random());
            let version = match rng.random_range(0..4) {
                0 => near,
                1 => near.saturating_add(rng.random_range(0..3)),
                2 => near.saturating_sub(rng.random_range(0..3)),
                _ => rng.random(),
            };
            let epoch = match rng.random_range(0..3) {
                0 => codec::entry_epoch(s).unwrap_or(0),
                _ => rng.random_range(0..3),
            };
            item(&format!("p:{i}"), entry_at(version, epoch, "v"), None)
        })
        .collect();
    cache
        .set_many(
            stored
                .iter()
                .enumerate()
                .map(|(i, s)| CacheItem {
                    key: format!("p:{i}"),
                    entry: Bytes::from(s.clone()),
                    version: 0,
                    ttl: None,
                })
                .collect(),
        )
        .await
        .unwrap();
    let fences = cache.set_many_if_newer(items.clone()).await.unwrap();
    let keys: Vec<String> = items.iter().map(|it| it.key.clone()).collect();
    let after = cache.get_many(&keys).await.unwrap();
    let mut applied = 0;
    for i in 0..n {
        let expect = codec::replaces(Some(&stored[i]), items[i].epoch(), items[i].version);
        assert_eq!(
            fences[i] == Fence::Applied,
            expect,
            "stored {:?}, new version {}",
            String::from_utf8_lossy(&stored[i][..stored[i].len().min(HEADER_LEN)]),
            items[i].version
        );
        let now = after[i].as_deref().unwrap();
        if expect {
            applied += 1;
            assert_eq!(now, &items[i].entry[..]);
        } else {
            assert_eq!(now, &stored[i][..]);
        }
    }
    // The generator must exercise both outcomes for the comparison to mean anything.
    assert!(applied > n / 10 && applied < n * 9 / 10, "{applied} of {n}");
}

#[tokio::test]
async fn fenced_writes_recover_after_script_flush() {
    let srv = server().await;
    let cache = cache(&srv).await;
    let mut raw = raw(&srv).await;
    let sha = redis::Script::new(writethrough_redis::FENCING_SCRIPT)
        .get_hash()
        .to_owned();
    let loaded = |mut raw: redis::aio::MultiplexedConnection, sha: String| async move {
        let exists: Vec<bool> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(&sha)
            .query_async(&mut raw)
            .await
            .unwrap();
        exists[0]
    };
    assert!(loaded(raw.clone(), sha.clone()).await, "connect loads it");

    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(!loaded(raw.clone(), sha.clone()).await);
    assert_eq!(
        cache.set_if_newer(row_item("k", 2)).await.unwrap(),
        Fence::Applied
    );
    assert!(loaded(raw.clone(), sha.clone()).await, "reloaded");
    assert_eq!(
        cache.set_if_newer(row_item("k", 1)).await.unwrap(),
        Fence::Stale
    );

    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap();
    let fences = cache
        .set_many_if_newer(vec![
            row_item("k", 1),
            row_item("k", 3),
            row_item("j", 1),
            row_item("k", 3),
        ])
        .await
        .unwrap();
    assert_eq!(
        fences,
        vec![Fence::Stale, Fence::Applied, Fence::Applied, Fence::Stale]
    );
    assert_eq!(version_of(cache.get("k").await.unwrap().as_ref()), Some(3));
    assert!(loaded(raw, sha).await);
}

#[tokio::test]
async fn entries_with_a_ttl_expire_and_fenced_writes_honour_it() {
    let srv = server().await;
    let cache = cache(&srv).await;
    let mut raw = raw(&srv).await;
    let ttl = Duration::from_millis(200);
    cache.set("plain", entry(1, "v"), Some(ttl)).await.unwrap();
    cache
        .set_if_newer(item("fenced", entry(1, "v"), Some(ttl)))
        .await
        .unwrap();
    cache
        .set_many_if_newer(vec![item("batch", entry(1, "v"), Some(ttl))])
        .await
        .unwrap();
    cache
        .set_if_newer(item("forever", entry(1, "v"), None))
        .await
        .unwrap();
    for key in ["plain", "fenced", "batch"] {
        // -2 if it already expired on a slow machine; otherwise at most the TTL.
        let pttl: i64 = raw.pttl(key).await.unwrap();
        assert!(
            pttl == -2 || (0..=200).contains(&pttl),
            "{key}: PTTL {pttl}"
        );
    }
    let pttl: i64 = raw.pttl("forever").await.unwrap();
    assert_eq!(pttl, -1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for key in ["plain", "fenced", "batch"] {
        while cache.get(key).await.unwrap().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{key} never expired"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(cache.get("forever").await.unwrap().is_some());
    // Once expired, the key is absent again, so an old version may fill it.
    assert_eq!(
        cache.set_if_newer(row_item("fenced", 0)).await.unwrap(),
        Fence::Applied
    );
}

#[tokio::test]
async fn clear_removes_the_prefix_only_even_with_glob_characters() {
    let srv = server().await;
    let cache = cache(&srv).await;
    let prefix = r"ns*?[ab]\:";
    let inside: Vec<String> = (0..2500)
        .map(|i| format!("{prefix}{i}"))
        .chain([prefix.to_owned()])
        .collect();
    let outside: Vec<String> = [
        r"nsX?[ab]\:1", // '*' taken as a glob would match
        r"ns*X[ab]\:1", // '?' taken as a glob would match
        r"ns*?a\:1",    // '[ab]' taken as a class would match
        r"ns*?[ab]:1",  // '\:' taken as an escape would match
        r"ns*?[ab]\",   // shorter than the prefix
        "ns",
        "other:1",
        r"Ns*?[ab]\:1", // case matters
    ]
    .map(String::from)
    .to_vec();
    let all: Vec<CacheItem> = inside
        .iter()
        .chain(&outside)
        .map(|k| item(k, entry(1, "v"), None))
        .collect();
    cache.set_many(all).await.unwrap();

    cache.clear(prefix).await.unwrap();

    let gone = cache.get_many(&inside).await.unwrap();
    assert!(gone.iter().all(Option::is_none), "a prefixed key survived");
    let kept = cache.get_many(&outside).await.unwrap();
    for (k, v) in outside.iter().zip(&kept) {
        assert!(v.is_some(), "{k:?} is outside the prefix but was removed");
    }
    cache.clear("nothing-here:").await.unwrap();
    assert!(cache.get_many(&outside).await.unwrap()[0].is_some());
    // An empty prefix clears everything: only on a server of our own.
    if !srv.is_external() {
        cache.clear("").await.unwrap();
        let kept = cache.get_many(&outside).await.unwrap();
        assert!(
            kept.iter().all(Option::is_none),
            "an empty prefix clears all"
        );
    }
}

#[tokio::test]
async fn large_entries_are_fenced_without_reading_them_whole() {
    let srv = server().await;
    let cache = cache(&srv).await;
    let big = entry_of_len(7, 4 << 20);
    assert_eq!(
        cache
            .set_if_newer(item("big", big.clone(), None))
            .await
            .unwrap(),
        Fence::Applied
    );
    assert_eq!(
        cache.set_if_newer(row_item("big", 6)).await.unwrap(),
        Fence::Stale
    );
    assert_eq!(cache.get("big").await.unwrap(), Some(big));
}

/// The shared cache suite (crates/testkit/src/suite/cache.rs) on Redis.
#[tokio::test(flavor = "multi_thread")]
async fn the_shared_cache_suite_passes_on_redis() {
    let s = server().await;
    let cache = cache(&s).await;
    let db = writethrough_sqlite::SqliteStore::open_temporary().unwrap();
    let pair =
        writethrough_testkit::suite::Pair::new(std::sync::Arc::new(cache), std::sync::Arc::new(db));
    writethrough_testkit::suite::assert_conformance(
        "cache suite: redis",
        pair,
        writethrough_testkit::suite::cache::cases(),
    )
    .await;
}
