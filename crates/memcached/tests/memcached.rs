//! The Memcached adapter against real `memcached` processes started by the
//! testkit (install with `apt-get install -y memcached`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use writethrough_core::ErrorKind;
use writethrough_core::backend::codec::{self, Decoded};
use writethrough_core::backend::{CacheItem, CacheStore, Fence, KeyRule, ScanCursor};
use writethrough_memcached::{MemcachedCache, MemcachedConfig};
use writethrough_testkit::server::MemcachedServer;

async fn server() -> MemcachedServer {
    MemcachedServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot start memcached (apt-get install -y memcached): {e}"))
}

async fn cache(s: &MemcachedServer) -> MemcachedCache {
    MemcachedCache::connect(&s.url()).await.expect("connect")
}

/// A row entry at `version`, built the way the codec lays it out.
fn row(version: u64, payload: &str) -> Bytes {
    let tomb = codec::tombstone(version);
    let mut e = tomb.to_vec();
    e[3] = b'V';
    e[25..29].copy_from_slice(&crc32fast::hash(payload.as_bytes()).to_be_bytes());
    e.extend_from_slice(payload.as_bytes());
    assert!(matches!(codec::decode(&e), Decoded::Row { .. }));
    Bytes::from(e)
}

fn item(key: &str, entry: Bytes, ttl: Option<Duration>) -> CacheItem {
    let version = codec::entry_version(&entry).expect("an entry");
    CacheItem {
        key: key.to_owned(),
        entry,
        version,
        ttl,
    }
}

fn version_of(bytes: Option<Bytes>) -> Option<u64> {
    bytes.as_deref().and_then(codec::entry_version)
}

/// Sends one text-protocol command to `s` and returns the first answer line.
async fn raw_line(s: &MemcachedServer, cmd: &str) -> String {
    let stream = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let mut stream = BufReader::new(stream);
    stream.get_mut().write_all(cmd.as_bytes()).await.unwrap();
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    line.trim_end().to_owned()
}

/// The remaining TTL memcached reports for `key` (`-1`: none), if stored.
async fn remaining_ttl(s: &MemcachedServer, key: &str) -> Option<i64> {
    let line = raw_line(s, &format!("mg {key} t\r\n")).await;
    let t = line.strip_prefix("HD t")?;
    Some(t.parse().unwrap())
}

#[tokio::test]
async fn get_set_delete_round_trip() {
    let s = server().await;
    let c = cache(&s).await;
    assert_eq!(c.name(), "memcached");
    assert_eq!(c.get("k").await.unwrap(), None);
    c.set("k", Bytes::from_static(b"v1"), None).await.unwrap();
    assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
    // Binary values, CRLF and empty values included, come back byte for byte.
    let odd = Bytes::from_static(b"\r\nEND\r\n\0\xff");
    c.set("odd", odd.clone(), None).await.unwrap();
    assert_eq!(c.get("odd").await.unwrap(), Some(odd));
    c.set("empty", Bytes::new(), None).await.unwrap();
    assert_eq!(c.get("empty").await.unwrap(), Some(Bytes::new()));
    assert!(c.delete("k").await.unwrap());
    assert!(!c.delete("k").await.unwrap(), "second delete finds nothing");
    assert_eq!(c.get("k").await.unwrap(), None);
    c.ping().await.unwrap();
    // Usable as a trait object, as the facade picks backends at run time.
    let dynamic: Arc<dyn CacheStore> = Arc::new(c);
    assert_eq!(dynamic.get("odd").await.unwrap().unwrap().len(), 9);
}

#[tokio::test]
async fn set_many_stores_every_item_with_its_own_ttl() {
    let s = server().await;
    let c = cache(&s).await;
    let items: Vec<CacheItem> = (0..200u64)
        .map(|i| {
            let ttl = i.is_multiple_of(2).then_some(Duration::from_secs(100));
            item(&format!("m{i}"), row(i + 1, "{}"), ttl)
        })
        .collect();
    c.set_many(items).await.unwrap();
    let keys: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    let got = c.get_many(&keys).await.unwrap();
    for (i, v) in got.into_iter().enumerate() {
        assert_eq!(version_of(v), Some(i as u64 + 1));
    }
    // One extra second covers memcached's once-a-second clock.
    let t = remaining_ttl(&s, "m0").await.unwrap();
    assert!((99..=101).contains(&t), "ttl {t}");
    assert_eq!(remaining_ttl(&s, "m1").await, Some(-1));
    c.set_many(Vec::new()).await.unwrap();
}

#[tokio::test]
async fn fencing_refuses_older_and_equal_versions_and_applies_newer() {
    let s = server().await;
    let c = cache(&s).await;
    let k = "fenced";
    assert_eq!(
        c.set_if_newer(item(k, row(5, "five"), None)).await.unwrap(),
        Fence::Applied
    );
    assert_eq!(
        c.set_if_newer(item(k, row(4, "four"), None)).await.unwrap(),
        Fence::Stale
    );
    assert_eq!(
        c.set_if_newer(item(k, row(5, "again"), None))
            .await
            .unwrap(),
        Fence::Stale
    );
    assert_eq!(
        c.get(k).await.unwrap(),
        Some(row(5, "five")),
        "stale writes changed nothing"
    );
    assert_eq!(
        c.set_if_newer(item(k, row(6, "six"), None)).await.unwrap(),
        Fence::Applied
    );
    assert_eq!(c.get(k).await.unwrap(), Some(row(6, "six")));
    // The largest version the envelope holds still compares correctly.
    let max = codec::MAX_VERSION;
    assert_eq!(
        c.set_if_newer(item(k, row(max, "max"), None))
            .await
            .unwrap(),
        Fence::Applied
    );
    assert_eq!(
        c.set_if_newer(item(k, row(max - 1, "x"), None))
            .await
            .unwrap(),
        Fence::Stale
    );
}

#[tokio::test]
async fn fencing_replaces_foreign_bytes_and_respects_tombstones() {
    let s = server().await;
    let c = cache(&s).await;
    c.set("foreign", Bytes::from_static(b"not an entry"), None)
        .await
        .unwrap();
    assert_eq!(
        c.set_if_newer(item("foreign", row(1, "one"), None))
            .await
            .unwrap(),
        Fence::Applied
    );
    assert_eq!(c.get("foreign").await.unwrap(), Some(row(1, "one")));

    let k = "deleted";
    assert_eq!(
        c.set_if_newer(item(k, codec::tombstone(7), None))
            .await
            .unwrap(),
        Fence::Applied
    );
    // A reader's late populate of an older row cannot undo the delete.
    assert_eq!(
        c.set_if_newer(item(k, row(6, "old"), None)).await.unwrap(),
        Fence::Stale
    );
    assert_eq!(
        c.set_if_newer(item(k, row(7, "same"), None)).await.unwrap(),
        Fence::Stale
    );
    assert_eq!(c.get(k).await.unwrap(), Some(codec::tombstone(7)));
    assert_eq!(
        c.set_if_newer(item(k, row(8, "new"), None)).await.unwrap(),
        Fence::Applied
    );
    assert_eq!(
        c.set_if_newer(item(k, codec::tombstone(9), None))
            .await
            .unwrap(),
        Fence::Applied
    );
    assert_eq!(version_of(c.get(k).await.unwrap()), Some(9));
}

#[tokio::test]
async fn fenced_writes_keep_their_ttl() {
    let s = server().await;
    let c = cache(&s).await;
    let ttl = Some(Duration::from_secs(50));
    c.set_if_newer(item("t", row(1, "a"), ttl)).await.unwrap();
    let t = remaining_ttl(&s, "t").await.unwrap();
    assert!((49..=51).contains(&t), "after add: {t}");
    c.set_if_newer(item("t", row(2, "b"), Some(Duration::from_secs(500))))
        .await
        .unwrap();
    let t = remaining_ttl(&s, "t").await.unwrap();
    assert!((499..=501).contains(&t), "after cas: {t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_batches_end_with_the_highest_version_of_every_key() {
    let s = server().await;
    let c = cache(&s).await;
    let tasks: Vec<_> = (1..=16u64)
        .map(|v| {
            let c = c.clone();
            tokio::spawn(async move {
                let items = (0..20)
                    .map(|k| item(&format!("b{k}"), row(v, "x"), None))
                    .collect();
                c.set_many_if_newer(items).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("no contention failure");
    }
    let keys: Vec<String> = (0..20).map(|k| format!("b{k}")).collect();
    for v in c.get_many(&keys).await.unwrap() {
        assert_eq!(version_of(v), Some(16));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_never_sees_a_version_older_than_an_acknowledged_fenced_write() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let s = server().await;
    let clients = [cache(&s).await, cache(&s).await];
    let next = Arc::new(AtomicU64::new(1));
    let acked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (c, next, acked) = (clients[t % 2].clone(), next.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut checks = 0u64;
            while Instant::now() < deadline {
                if t % 2 == 0 {
                    let v = next.fetch_add(1, Ordering::SeqCst);
                    let entry = if v % 5 == 0 {
                        codec::tombstone(v)
                    } else {
                        row(v, "w")
                    };
                    c.set_if_newer(item("hot", entry, None)).await.unwrap();
                    acked.fetch_max(v, Ordering::SeqCst);
                } else {
                    let floor = acked.load(Ordering::SeqCst);
                    let got = version_of(c.get("hot").await.unwrap()).unwrap_or(0);
                    assert!(
                        got >= floor,
                        "read version {got} after version {floor} was acknowledged"
                    );
                    checks += 1;
                }
            }
            checks
        }));
    }
    let mut checks = 0;
    for t in tasks {
        checks += t.await.unwrap();
    }
    assert!(checks > 100, "only {checks} reads checked");
    let last = version_of(clients[0].get("hot").await.unwrap()).unwrap();
    assert_eq!(
        last,
        next.load(Ordering::SeqCst) - 1,
        "the highest version won"
    );
}

#[tokio::test]
async fn set_many_if_newer_is_pipelined_not_one_round_trip_per_item() {
    let s = server().await;
    let c = cache(&s).await;
    let n = 1000;
    let batch = |base: u64, p: &str| -> Vec<CacheItem> {
        (0..n)
            .map(|i| item(&format!("{p}{i}"), row(base, "payload"), None))
            .collect()
    };
    // Warm the connection, then time both ways over the same number of keys.
    c.set_many_if_newer(batch(1, "w")).await.unwrap();
    let t = Instant::now();
    for it in batch(1, "seq") {
        c.set_if_newer(it).await.unwrap();
    }
    let sequential = t.elapsed();
    let t = Instant::now();
    let fences = c.set_many_if_newer(batch(1, "pipe")).await.unwrap();
    let pipelined = t.elapsed();
    assert!(fences.iter().all(|f| *f == Fence::Applied));
    eprintln!("{n} fenced writes: sequential {sequential:?}, one batch {pipelined:?}");
    assert!(
        pipelined * 4 < sequential,
        "a batch of {n} took {pipelined:?}, {n} single calls {sequential:?}"
    );
}

#[tokio::test]
async fn two_servers_share_the_keys_and_get_many_keeps_order_across_them() {
    let (a, b) = (server().await, server().await);
    let url = format!("memcached://{},{}", a.addr(), b.addr());
    let c = MemcachedCache::connect(&url).await.unwrap();
    let only_a = cache(&a).await;
    let only_b = cache(&b).await;
    let keys: Vec<String> = (0..200).map(|i| format!("spread:{i}")).collect();
    let items: Vec<CacheItem> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| item(k, row(i as u64 + 1, "x"), None))
        .collect();
    c.set_many(items).await.unwrap();
    let (mut on_a, mut on_b) = (0, 0);
    for k in &keys {
        let (in_a, in_b) = (only_a.get(k).await.unwrap(), only_b.get(k).await.unwrap());
        assert!(
            in_a.is_some() != in_b.is_some(),
            "{k} is on exactly one server"
        );
        let expected = if in_a.is_some() { a.addr() } else { b.addr() };
        assert_eq!(c.server_for(k), expected.to_string());
        if in_a.is_some() {
            on_a += 1;
        } else {
            on_b += 1;
        }
    }
    assert!(on_a > 60 && on_b > 60, "uneven spread: {on_a} / {on_b}");
    // Interleave keys of both servers with misses: answers keep the order.
    let mut asked: Vec<String> = keys.iter().rev().cloned().collect();
    asked.insert(10, "missing".into());
    let got = c.get_many(&asked).await.unwrap();
    for (k, v) in asked.iter().zip(got) {
        let want = k
            .strip_prefix("spread:")
            .map(|i| i.parse::<u64>().unwrap() + 1);
        assert_eq!(version_of(v), want, "{k}");
    }
    // Fenced batches and clears span both servers too.
    let fences = c
        .set_many_if_newer(keys.iter().map(|k| item(k, row(1000, "y"), None)).collect())
        .await
        .unwrap();
    assert!(fences.iter().all(|f| *f == Fence::Applied));
    c.clear("spread:").await.unwrap();
    assert!(c.get_many(&keys).await.unwrap().iter().all(Option::is_none));
}

#[tokio::test]
async fn ttl_over_thirty_days_is_sent_as_absolute_time_and_does_not_expire() {
    let s = server().await;
    let c = cache(&s).await;
    let days31 = Duration::from_secs(31 * 86_400);
    assert_eq!(c.capabilities().check_ttl(days31).unwrap(), days31);
    c.set("long", row(1, "x"), Some(days31)).await.unwrap();
    c.set_if_newer(item("long-fenced", row(1, "x"), Some(days31)))
        .await
        .unwrap();
    c.set_many(vec![item("long-many", row(1, "x"), Some(days31))])
        .await
        .unwrap();
    for k in ["long", "long-fenced", "long-many"] {
        assert!(c.get(k).await.unwrap().is_some(), "{k} expired at once");
        // Sent as a delay, memcached would have read 2,678,400 s as a date in 1970.
        let t = remaining_ttl(&s, k).await.unwrap();
        assert!(
            (31 * 86_400 - 5..=31 * 86_400 + 2).contains(&t),
            "{k}: ttl {t}"
        );
    }
    // Exactly 30 days is still a delay and also lives.
    c.set(
        "thirty",
        row(1, "x"),
        Some(Duration::from_secs(30 * 86_400)),
    )
    .await
    .unwrap();
    let t = remaining_ttl(&s, "thirty").await.unwrap();
    assert!((30 * 86_400 - 5..=30 * 86_400 + 2).contains(&t), "ttl {t}");
    // The longest TTL accepted works too; one past it is refused.
    let max = c.capabilities().max_ttl;
    c.set("max", row(1, "x"), Some(max)).await.unwrap();
    assert!(c.get("max").await.unwrap().is_some());
    let e = c
        .set("over", row(1, "x"), Some(max + Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidTtl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ttls_last_at_least_their_ttl_then_expire() {
    let s = server().await;
    let c = cache(&s).await;
    // Writes spread over a second, so that some land just before a tick of
    // memcached's once-a-second clock. Each must outlive its TTL (a tombstone
    // that vanished early would let a late populate resurrect a deleted
    // row), and be gone a little later.
    let tasks: Vec<_> = (0..4u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(250 * i)).await;
                let k = format!("short{i}");
                c.set(&k, row(1, "x"), Some(Duration::from_secs(1)))
                    .await
                    .unwrap();
                assert!(c.get(&k).await.unwrap().is_some(), "{k} expired at once");
                tokio::time::sleep(Duration::from_millis(950)).await;
                assert!(
                    c.get(&k).await.unwrap().is_some(),
                    "{k} expired before its TTL"
                );
                tokio::time::sleep(Duration::from_millis(1300)).await;
                assert_eq!(
                    c.get(&k).await.unwrap(),
                    None,
                    "{k} outlived its TTL by over a second"
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn sub_second_and_zero_ttls_are_refused() {
    let s = server().await;
    let c = cache(&s).await;
    let caps = c.capabilities();
    assert_eq!(caps.ttl_granularity, Duration::from_secs(1));
    for bad in [
        Duration::ZERO,
        Duration::from_millis(999),
        Duration::from_millis(1),
    ] {
        assert_eq!(
            caps.check_ttl(bad).unwrap_err().kind(),
            ErrorKind::InvalidTtl,
            "{bad:?}"
        );
        // The adapter refuses them too, before writing anything.
        let e = c.set("k", row(1, "x"), Some(bad)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTtl);
        let e = c
            .set_if_newer(item("k", row(1, "x"), Some(bad)))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidTtl);
    }
    assert_eq!(
        caps.check_ttl(Duration::from_millis(1500)).unwrap(),
        Duration::from_secs(2)
    );
    assert_eq!(c.get("k").await.unwrap(), None, "nothing was written");
}

#[tokio::test]
async fn keys_memcached_cannot_hold_are_refused_before_any_side_effect() {
    let s = server().await;
    let c = cache(&s).await;
    let caps = c.capabilities();
    assert_eq!(caps.max_key_len, 250);
    assert_eq!(caps.key_rule, KeyRule::NoSpaceOrControl);
    let long = "k".repeat(300);
    for bad in [
        long.as_str(),
        "a b",
        "a\r\nflush_all",
        "tab\tkey",
        "",
        "nbsp\u{a0}x",
    ] {
        assert_eq!(
            caps.check_key(bad).unwrap_err().kind(),
            ErrorKind::InvalidKey,
            "{bad:?}"
        );
    }
    c.set("victim", row(1, "x"), None).await.unwrap();
    // Through the adapter, a key that would inject a command is refused whole.
    for bad in [long.as_str(), "a b", "a\r\nflush_all"] {
        assert_eq!(c.get(bad).await.unwrap_err().kind(), ErrorKind::InvalidKey);
        assert_eq!(
            c.set(bad, row(1, "x"), None).await.unwrap_err().kind(),
            ErrorKind::InvalidKey
        );
        assert_eq!(
            c.delete(bad).await.unwrap_err().kind(),
            ErrorKind::InvalidKey
        );
        let e = c
            .get_many(&["victim".into(), bad.into()])
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidKey);
        let e = c
            .set_many(vec![
                item("fine", row(1, "x"), None),
                item(bad, row(1, "x"), None),
            ])
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidKey);
        let e = c
            .set_many_if_newer(vec![item(bad, row(1, "x"), None)])
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidKey);
    }
    assert!(
        c.get("victim").await.unwrap().is_some(),
        "nothing was flushed"
    );
    assert_eq!(
        c.get("fine").await.unwrap(),
        None,
        "a refused batch wrote nothing"
    );
    // 250 bytes and non-ASCII text are fine.
    let max = "k".repeat(250);
    c.set(&max, row(1, "x"), None).await.unwrap();
    assert!(c.get(&max).await.unwrap().is_some());
    c.set("ünïcode:ключ", row(1, "x"), None).await.unwrap();
    assert!(c.get("ünïcode:ключ").await.unwrap().is_some());
}

#[tokio::test]
async fn values_over_the_item_limit_are_value_too_large() {
    let s = server().await;
    let c = cache(&s).await;
    let limit = c.capabilities().max_value_len;
    // Read from `stats settings`: memcached's default 1 MiB, less a margin.
    assert!(limit < 1 << 20 && limit > (1 << 20) - 1024, "{limit}");
    // The margin is enough: the largest value under the longest key fits.
    let key = "k".repeat(250);
    c.set(&key, Bytes::from(vec![b'x'; limit]), None)
        .await
        .unwrap();
    assert_eq!(c.get(&key).await.unwrap().map(|v| v.len()), Some(limit));
    assert!(c.capabilities().check_value_len(limit + 1).is_err());
    let big = Bytes::from(vec![b'x'; limit + 1]);
    let e = c.set("big", big.clone(), None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge);
    let mut it = item("big", row(1, "x"), None);
    it.entry = big;
    let e = c.set_if_newer(it.clone()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge);
    let e = c.set_many(vec![it]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge);

    // With the check lifted, memcached itself refuses, and that maps the same.
    let mut config = MemcachedConfig::from_url(&s.url()).unwrap();
    config.max_value_len = Some(8 << 20);
    let loose = MemcachedCache::connect_with(config).await.unwrap();
    let e = loose
        .set("huge", Bytes::from(vec![b'x'; 2 << 20]), None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge, "{e}");
    let mut it = item("huge", row(1, "x"), None);
    it.entry = Bytes::from(vec![b'x'; 2 << 20]);
    let e = loose.set_if_newer(it).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge, "{e}");
    // The connection stays in step after the refusal.
    loose.set("after", row(2, "x"), None).await.unwrap();
    assert_eq!(version_of(loose.get("after").await.unwrap()), Some(2));
    assert_eq!(loose.get("huge").await.unwrap(), None);
}

#[tokio::test]
async fn a_larger_item_size_max_is_read_at_connect() {
    // A server started by hand with -I 4m: the limit follows it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new("memcached")
        .args([
            "-l",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "0",
            "-I",
            "4m",
            "-u",
            "root",
        ])
        .kill_on_drop(true)
        .spawn()
        .expect("memcached (apt-get install -y memcached)");
    let url = format!("memcached://127.0.0.1:{port}");
    let mut c = None;
    for _ in 0..100 {
        if let Ok(ok) = MemcachedCache::connect(&url).await {
            c = Some(ok);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = c.expect("memcached -I 4m came up");
    let limit = c.capabilities().max_value_len;
    assert!(limit > 4 << 19 && limit < 4 << 20, "{limit}");
    c.set("three-mib", Bytes::from(vec![b'x'; 3 << 20]), None)
        .await
        .unwrap();
    assert_eq!(
        c.get("three-mib").await.unwrap().map(|v| v.len()),
        Some(3 << 20)
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn the_client_recovers_after_the_server_is_killed_and_restarted() {
    let mut s = server().await;
    let c = MemcachedCache::connect(&format!("{}?timeout=500ms", s.url()))
        .await
        .unwrap();
    c.set("k", row(1, "x"), None).await.unwrap();
    s.kill().await.unwrap();
    let e = c.get("k").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_temporary());
    let e = c
        .set_if_newer(item("k", row(2, "x"), None))
        .await
        .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Unavailable), "{e}");
    assert!(c.ping().await.is_err());
    s.restart().await.unwrap();
    // Same client: it dials again. The restarted server is empty.
    assert_eq!(c.get("k").await.unwrap(), None, "{}", s.log());
    assert_eq!(
        c.set_if_newer(item("k", row(3, "x"), None)).await.unwrap(),
        Fence::Applied
    );
    assert_eq!(version_of(c.get("k").await.unwrap()), Some(3));
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_times_out_and_answers_again_once_resumed() {
    let s = server().await;
    let c = MemcachedCache::connect(&format!("{}?timeout=300ms", s.url()))
        .await
        .unwrap();
    c.set("k", row(1, "x"), None).await.unwrap();
    s.pause().unwrap();
    let t = Instant::now();
    let e = c.get("k").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.is_temporary());
    assert!(t.elapsed() < Duration::from_secs(2));
    // A fenced write that times out leaves no doubt about ordering: its
    // compare-and-swap fails if anything was written meanwhile.
    assert_eq!(
        c.set_if_newer(item("k", row(2, "x"), None))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Timeout
    );
    s.resume().unwrap();
    // The timed-out answers are consumed in order; later calls get their own.
    let mut ok = false;
    for _ in 0..20 {
        if let Ok(Some(v)) = c.get("k").await {
            assert!(matches!(version_of(Some(v)), Some(1 | 2)));
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "no answer after resume: {}", s.log());
    assert_eq!(
        c.set_if_newer(item("k", row(3, "x"), None)).await.unwrap(),
        Fence::Applied
    );
    assert_eq!(version_of(c.get("k").await.unwrap()), Some(3));
}

#[tokio::test]
async fn a_server_that_accepts_but_never_answers_times_out() {
    // A listener that takes connections and reads nothing: every request
    // must still end, with Timeout, shortly after its deadline.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let t = Instant::now();
    let e = MemcachedCache::connect(&format!("memcached://{addr}?timeout=200ms"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    hold.abort();
}

#[tokio::test]
async fn connect_fails_unavailable_when_no_server_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = MemcachedCache::connect(&format!("memcached://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let e = MemcachedCache::connect("redis://127.0.0.1:1")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
}

#[tokio::test]
async fn one_server_down_at_connect_fails_only_its_own_keys() {
    let a = server().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = format!("127.0.0.1:{port}");
    let c = MemcachedCache::connect(&format!("memcached://{},{down}", a.addr()))
        .await
        .unwrap();
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let (mut up, mut failed) = (0, 0);
    for k in &keys {
        if c.server_for(k) == down {
            assert_eq!(
                c.set(k, row(1, "x"), None).await.unwrap_err().kind(),
                ErrorKind::Unavailable
            );
            failed += 1;
        } else {
            c.set(k, row(1, "x"), None).await.unwrap();
            up += 1;
        }
    }
    assert!(up > 0 && failed > 0);
    assert!(c.ping().await.is_err(), "ping names the down server");
}

#[tokio::test]
async fn clear_with_a_prefix_removes_only_matching_keys() {
    let s = server().await;
    let c = cache(&s).await;
    for k in ["app:a", "app:b", "app:ü", "appx", "other:app:c"] {
        c.set(k, row(1, "x"), None).await.unwrap();
    }
    for i in 0..500 {
        c.set(&format!("app:n{i}"), row(1, "x"), None)
            .await
            .unwrap();
    }
    c.clear("app:").await.unwrap();
    for k in ["app:a", "app:b", "app:ü", "app:n0", "app:n499"] {
        assert_eq!(c.get(k).await.unwrap(), None, "{k} survived");
    }
    for k in ["appx", "other:app:c"] {
        assert!(c.get(k).await.unwrap().is_some(), "{k} was cleared");
    }
    // An empty prefix empties the whole server.
    c.clear("").await.unwrap();
    for k in ["appx", "other:app:c"] {
        assert_eq!(c.get(k).await.unwrap(), None, "{k} survived flush_all");
    }
}

#[tokio::test]
async fn capabilities_describe_memcached() {
    let s = server().await;
    let caps = cache(&s).await.capabilities();
    assert!(caps.atomic_fencing);
    assert!(!caps.in_process);
    assert_eq!(caps.ttl_granularity, Duration::from_secs(1));
    assert!(caps.max_ttl >= Duration::from_secs(31 * 86_400));
    assert_eq!(caps.max_key_len, 250);
    assert_eq!(caps.key_rule, KeyRule::NoSpaceOrControl);
}

#[test]
fn a_cache_outlives_the_runtime_that_first_used_it() {
    // The connection's task dies with the runtime it was spawned on; the
    // next runtime must dial again rather than find a dead handle.
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = rt();
    let (s, c) = first.block_on(async {
        let s = server().await;
        let c = cache(&s).await;
        c.set("k", row(1, "x"), None).await.unwrap();
        (s, c)
    });
    drop(first);
    rt().block_on(async {
        assert_eq!(version_of(c.get("k").await.unwrap()), Some(1));
        drop(s);
    });
}

/// The shared cache suite (crates/testkit/src/suite/cache.rs) on Memcached.
#[tokio::test(flavor = "multi_thread")]
async fn the_shared_cache_suite_passes_on_memcached() {
    let s = server().await;
    let cache = cache(&s).await;
    let db = writethrough_sqlite::SqliteStore::open_temporary().unwrap();
    let pair = writethrough_testkit::suite::Pair::new(Arc::new(cache), Arc::new(db));
    writethrough_testkit::suite::assert_conformance(
        "cache suite: memcached",
        pair,
        writethrough_testkit::suite::cache::cases(),
    )
    .await;
}

/// Lists every key under a prefix across two servers, a server a page,
/// whatever `count` says; a bad cursor is refused.
#[tokio::test]
async fn scan_keys_lists_the_prefix_of_every_server_a_server_a_page() {
    let (a, b) = (server().await, server().await);
    let url = format!("memcached://{},{}", a.addr(), b.addr());
    let c = MemcachedCache::connect(&url).await.unwrap();
    let mut want: Vec<String> = (0..40).map(|i| format!("scan:t:{i}")).collect();
    for k in want
        .iter()
        .chain(&["scan:u:1".to_owned(), "other".to_owned()])
    {
        c.set(k, Bytes::from_static(b"x"), None).await.unwrap();
    }
    let (mut got, mut pages, mut cursor) = (Vec::new(), 0, ScanCursor::start());
    loop {
        let page = c.scan_keys("scan:t:", cursor, 5).await.unwrap();
        pages += 1;
        got.extend(page.keys);
        match page.next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!(pages, 2, "one page per server");
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let e = c
        .scan_keys("scan:", ScanCursor::at("7"), 5)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidValue, "{e}");
}

/// A memcached without the LRU crawler cannot list its keys: the typed
/// `Unsupported`, saying why.
#[tokio::test]
async fn scan_keys_without_the_lru_crawler_is_unsupported() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new("memcached")
        .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0"])
        .args(["-o", "no_lru_crawler", "-u", "root"])
        .kill_on_drop(true)
        .spawn()
        .expect("memcached (apt-get install -y memcached)");
    let url = format!("memcached://127.0.0.1:{port}");
    let mut c = None;
    for _ in 0..100 {
        if let Ok(ok) = MemcachedCache::connect(&url).await {
            c = Some(ok);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = c.expect("memcached -o no_lru_crawler came up");
    c.set("k", Bytes::from_static(b"x"), None).await.unwrap();
    let e = c.scan_keys("", ScanCursor::start(), 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("lru_crawler metadump"), "{e}");
    // The connection is still in step.
    assert!(c.get("k").await.unwrap().is_some());
    child.kill().await.unwrap();
}

/// `time_to_live` reads the seconds left (`mg <key> t`): none for an item
/// without expiry or no item.
#[tokio::test]
async fn time_to_live_reads_the_seconds_left() {
    let s = server().await;
    let c = cache(&s).await;
    c.set(
        "ttl:some",
        Bytes::from_static(b"x"),
        Some(Duration::from_secs(600)),
    )
    .await
    .unwrap();
    c.set("ttl:none", Bytes::from_static(b"x"), None)
        .await
        .unwrap();
    let left = c.time_to_live("ttl:some").await.unwrap().expect("a TTL");
    // Sent one second longer than asked; memcached's clock ticks in seconds.
    assert!(
        (Duration::from_secs(595)..=Duration::from_secs(601)).contains(&left),
        "{left:?}"
    );
    assert_eq!(c.time_to_live("ttl:none").await.unwrap(), None);
    assert_eq!(c.time_to_live("ttl:absent").await.unwrap(), None);
    assert_eq!(
        c.time_to_live("bad key").await.unwrap_err().kind(),
        ErrorKind::InvalidKey
    );
}
