//! The cache store suite: the [`CacheStore`] contract, on any backend.
//! Cases use `pair.cache` only.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use writethrough_core::ErrorKind;
use writethrough_core::backend::codec;
use writethrough_core::backend::{CacheItem, CacheStore, Fence, KeyRule, ScanCursor};

use super::{Case, Outcome, Pair, eventually, unique};

/// Every case of the cache suite.
pub fn cases() -> Vec<Case> {
    crate::cases![
        get_returns_the_bytes_last_stored,
        get_of_an_absent_key_is_none,
        get_many_answers_in_order_with_gaps,
        set_many_stores_every_item,
        set_if_newer_lands_only_over_older_absent_or_unreadable,
        set_many_if_newer_answers_per_item_in_order,
        racing_fenced_writes_leave_the_highest_version,
        replace_if_unchanged_swaps_only_the_expected_bytes,
        delete_says_whether_something_was_there,
        clear_removes_the_prefix_and_nothing_else,
        scan_keys_lists_the_prefix_and_nothing_else,
        entries_with_a_ttl_expire,
        values_up_to_the_item_limit_round_trip,
        keys_the_capabilities_allow_round_trip,
        ping_answers,
    ]
}

fn entry(version: u64, body: &str) -> Bytes {
    let t = writethrough_core::Table::builder("t")
        .key("id", writethrough_core::ColumnType::Int)
        .column("b", writethrough_core::ColumnType::Text)
        .build()
        .expect("schema");
    let row = writethrough_core::Row::new().set("id", 1).set("b", body);
    codec::Codec::Json
        .encode(&t, &row)
        .expect("encodes")
        .into_entry(version)
}

fn item(key: &str, version: u64) -> CacheItem {
    CacheItem {
        key: key.to_owned(),
        entry: entry(version, &format!("v{version}")),
        version,
        ttl: None,
    }
}

fn version_of(b: &Option<Bytes>) -> Option<u64> {
    b.as_deref().and_then(codec::entry_version)
}

fn ns() -> String {
    unique("cs") + ":"
}

/// `set` then `get` gives back exactly the bytes, binary included.
pub async fn get_returns_the_bytes_last_stored(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let k = ns() + "k";
    let binary: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    for v in [
        Bytes::from_static(b"x"),
        Bytes::from(binary),
        entry(3, "é ✓"),
    ] {
        c.set(&k, v.clone(), None).await.unwrap();
        assert_eq!(c.get(&k).await.unwrap(), Some(v));
    }
    Outcome::Passed
}

/// A key never written reads as `None`.
pub async fn get_of_an_absent_key_is_none(pair: Pair) -> Outcome {
    assert_eq!(pair.cache.get(&(ns() + "none")).await.unwrap(), None);
    Outcome::Passed
}

/// `get_many` answers one slot per key, in the order asked.
pub async fn get_many_answers_in_order_with_gaps(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let p = ns();
    let keys: Vec<String> = (0..20).map(|i| format!("{p}{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        if i % 3 != 1 {
            c.set(k, Bytes::from(format!("value {i}")), None)
                .await
                .unwrap();
        }
    }
    let got = c.get_many(&keys).await.unwrap();
    assert_eq!(got.len(), keys.len());
    for (i, g) in got.iter().enumerate() {
        let want = (i % 3 != 1).then(|| Bytes::from(format!("value {i}")));
        assert_eq!(g, &want, "slot {i}");
    }
    assert!(c.get_many(&[]).await.unwrap().is_empty());
    Outcome::Passed
}

/// `set_many` stores every item.
pub async fn set_many_stores_every_item(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let p = ns();
    let items: Vec<CacheItem> = (1..=50).map(|i| item(&format!("{p}{i}"), i)).collect();
    c.set_many(items.clone()).await.unwrap();
    for it in &items {
        assert_eq!(c.get(&it.key).await.unwrap(), Some(it.entry.clone()));
    }
    Outcome::Passed
}

/// The fence: over nothing, unreadable bytes or an older version, the
/// write lands; over the same or a newer version, it does not. Tombstones
/// fence like rows.
pub async fn set_if_newer_lands_only_over_older_absent_or_unreadable(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let k = ns() + "f";
    assert_eq!(
        c.set_if_newer(item(&k, 5)).await.unwrap(),
        Fence::Applied,
        "over nothing"
    );
    assert_eq!(
        c.set_if_newer(item(&k, 4)).await.unwrap(),
        Fence::Stale,
        "older"
    );
    assert_eq!(
        c.set_if_newer(item(&k, 5)).await.unwrap(),
        Fence::Stale,
        "equal"
    );
    assert_eq!(version_of(&c.get(&k).await.unwrap()), Some(5));
    assert_eq!(
        c.set_if_newer(item(&k, 6)).await.unwrap(),
        Fence::Applied,
        "newer"
    );
    let tomb = CacheItem {
        key: k.clone(),
        entry: codec::tombstone(9),
        version: 9,
        ttl: Some(Duration::from_secs(60)),
    };
    assert_eq!(
        c.set_if_newer(tomb).await.unwrap(),
        Fence::Applied,
        "a newer tombstone"
    );
    assert_eq!(
        c.set_if_newer(item(&k, 8)).await.unwrap(),
        Fence::Stale,
        "under a tombstone"
    );
    assert_eq!(
        c.set_if_newer(item(&k, 10)).await.unwrap(),
        Fence::Applied,
        "over a tombstone"
    );
    let inv = CacheItem {
        key: k.clone(),
        entry: codec::invalidation(12),
        version: 12,
        ttl: Some(Duration::from_secs(60)),
    };
    assert_eq!(
        c.set_if_newer(inv).await.unwrap(),
        Fence::Applied,
        "an invalidation"
    );
    assert_eq!(
        c.set_if_newer(item(&k, 11)).await.unwrap(),
        Fence::Stale,
        "older than an invalidation"
    );
    assert_eq!(
        c.set_if_newer(item(&k, 12)).await.unwrap(),
        Fence::Applied,
        "an invalidation lets the row of its own version in"
    );
    assert_eq!(
        c.set_if_newer(item(&k, 12)).await.unwrap(),
        Fence::Stale,
        "but a row keeps its tie"
    );
    for junk in [
        &b"plain"[..],
        b"",
        b"wt1V0000000000000000099",
        b"wt1X00000000000000000099j0000",
    ] {
        c.set(&k, Bytes::copy_from_slice(junk), None).await.unwrap();
        assert_eq!(
            c.set_if_newer(item(&k, 1)).await.unwrap(),
            Fence::Applied,
            "over {junk:?}"
        );
    }
    let max = CacheItem {
        key: k.clone(),
        entry: codec::tombstone(u64::MAX),
        version: u64::MAX,
        ttl: Some(Duration::from_secs(60)),
    };
    assert_eq!(c.set_if_newer(max).await.unwrap(), Fence::Applied);
    assert_eq!(
        c.set_if_newer(item(&k, u64::MAX - 1)).await.unwrap(),
        Fence::Stale,
        "20-digit versions compare exactly"
    );
    Outcome::Passed
}

/// A fenced batch decides per item and answers in order.
pub async fn set_many_if_newer_answers_per_item_in_order(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let p = ns();
    for i in 0..10u64 {
        c.set(&format!("{p}{i}"), entry(10, "x"), None)
            .await
            .unwrap();
    }
    let items: Vec<CacheItem> = (0..20u64)
        .map(|i| item(&format!("{p}{i}"), 5 + i))
        .collect();
    let got = c.set_many_if_newer(items).await.unwrap();
    let want: Vec<Fence> = (0..20u64)
        .map(|i| {
            if i < 10 && 5 + i <= 10 {
                Fence::Stale
            } else {
                Fence::Applied
            }
        })
        .collect();
    assert_eq!(got, want);
    for i in 0..20u64 {
        let v = version_of(&c.get(&format!("{p}{i}")).await.unwrap());
        assert_eq!(
            v,
            Some(if i < 10 { (5 + i).max(10) } else { 5 + i }),
            "key {i}"
        );
    }
    assert!(c.set_many_if_newer(Vec::new()).await.unwrap().is_empty());
    Outcome::Passed
}

/// Many tasks race fenced writes of random versions on one key: the
/// highest version is what remains (the check and the write are atomic).
pub async fn racing_fenced_writes_leave_the_highest_version(pair: Pair) -> Outcome {
    let c: Arc<dyn CacheStore> = pair.cache.clone();
    let k = ns() + "race";
    let versions: Vec<u64> = (0..400)
        .map(|_| rand::random::<u64>() % 1_000_000 + 1)
        .collect();
    let max = *versions.iter().max().expect("some");
    let tasks = versions.chunks(25).map(|chunk| {
        let (c, k, chunk) = (c.clone(), k.clone(), chunk.to_vec());
        tokio::spawn(async move {
            for v in chunk {
                c.set_if_newer(item(&k, v)).await.unwrap();
            }
        })
    });
    for t in join_all(tasks).await {
        t.unwrap();
    }
    assert_eq!(version_of(&c.get(&k).await.unwrap()), Some(max));
    Outcome::Passed
}

/// Compare-and-set on bytes, where the backend has it.
pub async fn replace_if_unchanged_swaps_only_the_expected_bytes(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let k = ns() + "cas";
    let old = Bytes::from_static(b"unreadable bytes");
    c.set(&k, old.clone(), None).await.unwrap();
    match c
        .replace_if_unchanged(Bytes::from_static(b"other"), item(&k, 3))
        .await
    {
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            return Outcome::NotApplicable("no compare-and-set on bytes".into());
        }
        r => assert_eq!(r.unwrap(), Fence::Stale, "other bytes stored"),
    }
    assert_eq!(c.get(&k).await.unwrap(), Some(old.clone()));
    assert_eq!(
        c.replace_if_unchanged(old, item(&k, 3)).await.unwrap(),
        Fence::Applied
    );
    assert_eq!(version_of(&c.get(&k).await.unwrap()), Some(3));
    let absent = ns() + "absent";
    assert_eq!(
        c.replace_if_unchanged(Bytes::from_static(b"x"), item(&absent, 1))
            .await
            .unwrap(),
        Fence::Stale,
        "nothing stored is not the expected bytes"
    );
    assert_eq!(c.get(&absent).await.unwrap(), None);
    Outcome::Passed
}

/// `delete` removes the key and says whether it was there.
pub async fn delete_says_whether_something_was_there(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let k = ns() + "d";
    c.set(&k, Bytes::from_static(b"x"), None).await.unwrap();
    assert!(c.delete(&k).await.unwrap());
    assert_eq!(c.get(&k).await.unwrap(), None);
    assert!(!c.delete(&k).await.unwrap());
    Outcome::Passed
}

/// `clear(prefix)` removes the keys under the prefix, glob characters in
/// it taken literally, and keeps the others.
pub async fn clear_removes_the_prefix_and_nothing_else(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let base = unique("cl");
    let prefix = format!("{base}:a*?[x]:");
    let keep = [
        format!("{base}:a:1"),
        format!("{base}:aXY[x]:1"),
        format!("{base}-a*?[x]:1"),
    ];
    let gone: Vec<String> = (0..30).map(|i| format!("{prefix}{i}")).collect();
    for k in keep.iter().chain(&gone) {
        c.set(k, Bytes::from_static(b"x"), None).await.unwrap();
    }
    c.clear(&prefix).await.unwrap();
    for k in &gone {
        assert_eq!(c.get(k).await.unwrap(), None, "{k}");
    }
    for k in &keep {
        assert!(
            c.get(k).await.unwrap().is_some(),
            "{k} is outside the prefix"
        );
    }
    Outcome::Passed
}

/// `scan_keys` lists every key under the prefix (glob characters in it
/// taken literally), and none outside it, page by page until the cursor
/// runs out; a backend that cannot list keys says so with `Unsupported`.
pub async fn scan_keys_lists_the_prefix_and_nothing_else(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let base = unique("sk");
    let prefix = format!("{base}:a*?[x]:");
    let outside = [
        format!("{base}:a:1"),
        format!("{base}:aXY[x]:1"),
        format!("{base}-a*?[x]:1"),
    ];
    let inside: Vec<String> = (0..130).map(|i| format!("{prefix}{i}")).collect();
    for k in outside.iter().chain(&inside) {
        c.set(k, Bytes::from_static(b"x"), None).await.unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor = ScanCursor::start();
    for _ in 0..100_000 {
        let page = match c.scan_keys(&prefix, cursor, 50).await {
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                return Outcome::NotApplicable("the cache cannot list its keys".into());
            }
            r => r.unwrap(),
        };
        for k in page.keys {
            assert!(k.starts_with(&prefix), "{k:?} is outside {prefix:?}");
            seen.insert(k);
        }
        match page.next {
            Some(next) => cursor = next,
            None => {
                let want: std::collections::BTreeSet<String> = inside.into_iter().collect();
                assert_eq!(seen, want);
                return Outcome::Passed;
            }
        }
    }
    panic!("the scan did not end");
}

/// An entry set with a TTL is gone after it; one without stays.
pub async fn entries_with_a_ttl_expire(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let caps = c.capabilities();
    let ttl = caps
        .check_ttl(caps.ttl_granularity.max(Duration::from_millis(300)))
        .unwrap();
    let (k, stays) = (ns() + "ttl", ns() + "stays");
    c.set(&k, Bytes::from_static(b"x"), Some(ttl))
        .await
        .unwrap();
    c.set_if_newer(CacheItem {
        ttl: Some(ttl),
        ..item(&(k.clone() + "f"), 1)
    })
    .await
    .unwrap();
    c.set(&stays, Bytes::from_static(b"x"), None).await.unwrap();
    let gone = eventually(ttl * 8, || async {
        c.get(&k).await.unwrap().is_none() && c.get(&(k.clone() + "f")).await.unwrap().is_none()
    })
    .await;
    assert!(
        gone,
        "entries outlived their TTL of {ttl:?} eight times over"
    );
    assert!(c.get(&stays).await.unwrap().is_some());
    Outcome::Passed
}

/// Values up to the declared item limit (capped at 4 MiB here) round-trip.
pub async fn values_up_to_the_item_limit_round_trip(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let n = c.capabilities().max_value_len.min(4 << 20);
    let v = Bytes::from(vec![b'v'; n]);
    let k = ns() + "big";
    c.set(&k, v.clone(), None).await.unwrap();
    assert_eq!(c.get(&k).await.unwrap().map(|b| b.len()), Some(n));
    assert_eq!(c.get(&k).await.unwrap(), Some(v));
    Outcome::Passed
}

/// Keys the capabilities accept (the longest, the widest characters) work.
pub async fn keys_the_capabilities_allow_round_trip(pair: Pair) -> Outcome {
    let c = &pair.cache;
    let caps = c.capabilities();
    let p = ns();
    let mut keys = vec![format!(
        "{p}{}",
        "k".repeat(caps.max_key_len.min(8192) - p.len())
    )];
    keys.push(format!("{p}ünïcödé-✓"));
    if caps.key_rule == KeyRule::Any {
        keys.push(format!("{p}with space\tand tab"));
    }
    for k in keys {
        caps.check_key(&k).unwrap();
        c.set(&k, Bytes::from_static(b"x"), None).await.unwrap();
        assert_eq!(
            c.get(&k).await.unwrap(),
            Some(Bytes::from_static(b"x")),
            "{k:?}"
        );
    }
    Outcome::Passed
}

/// `ping` answers.
pub async fn ping_answers(pair: Pair) -> Outcome {
    pair.cache.ping().await.unwrap();
    Outcome::Passed
}
