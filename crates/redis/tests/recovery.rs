//! The adapter under server failures: killed, restarted, paused, absent at start.

mod common;

use std::time::Duration;

use writethrough_core::ErrorKind;
use writethrough_core::backend::{CacheStore, Fence};
use writethrough_redis::{RedisCache, RedisConfig};

use common::*;

/// Retries `ping` until it succeeds, failing the test after many attempts.
async fn until_it_answers(cache: &RedisCache, srv: &RedisServer) {
    let mut last = None;
    for _ in 0..300 {
        match cache.ping().await {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "the cache never came back: {:?}\nserver log:\n{}",
        last,
        srv.log()
    );
}

#[tokio::test]
async fn the_same_cache_works_again_after_the_server_is_killed_and_restarted() {
    let mut srv = server().await;
    let cache = cache(&srv).await;
    cache.set_if_newer(row_item("k", 1)).await.unwrap();

    srv.kill().await.unwrap();
    // While the server is down every kind of call fails, typed and temporary.
    for _ in 0..3 {
        let e = cache.get("k").await.unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
            "{e}"
        );
        assert!(e.is_temporary(), "{e}");
        assert_eq!(e.backend(), Some("redis"));
        assert_eq!(e.key(), Some("k"));
    }
    let e = cache.set_if_newer(row_item("k", 2)).await.unwrap_err();
    assert!(e.is_temporary(), "{e}");
    let e = cache.set_many(vec![row_item("k", 2)]).await.unwrap_err();
    assert!(e.is_temporary(), "{e}");
    assert!(cache.ping().await.unwrap_err().is_temporary());

    srv.restart().await.unwrap();
    until_it_answers(&cache, &srv).await;

    // The restarted server is empty and has no script: the fenced write
    // loads it again (NOSCRIPT) without the caller noticing.
    assert_eq!(cache.get("k").await.unwrap(), None);
    assert_eq!(
        cache.set_if_newer(row_item("k", 3)).await.unwrap(),
        Fence::Applied
    );
    assert_eq!(
        cache
            .set_many_if_newer(vec![row_item("k", 2), row_item("j", 1)])
            .await
            .unwrap(),
        vec![Fence::Stale, Fence::Applied]
    );
    assert_eq!(version_of(cache.get("k").await.unwrap().as_ref()), Some(3));
}

#[tokio::test]
async fn a_paused_server_times_out_and_the_cache_recovers_when_it_resumes() {
    let srv = server().await;
    let cache =
        RedisCache::with_config(config(&srv).with_response_timeout(Duration::from_millis(200)))
            .await
            .unwrap();
    cache.set("k", "v".into(), None).await.unwrap();

    srv.pause().unwrap();
    let e = cache.get("k").await.unwrap_err();
    srv.resume().unwrap();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.is_temporary());

    until_it_answers(&cache, &srv).await;
    assert_eq!(cache.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
}

#[tokio::test]
async fn a_lazy_cache_starts_without_a_server_and_connects_when_it_appears() {
    let mut srv = server().await;
    srv.kill().await.unwrap();
    let cache = RedisCache::with_config_lazy(config(&srv)).unwrap();
    let e = cache.get("k").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");

    // An eager connect to a dead server fails the same typed way.
    let e = RedisCache::with_config(config(&srv)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");

    srv.restart().await.unwrap();
    until_it_answers(&cache, &srv).await;
    assert_eq!(
        cache.set_if_newer(row_item("k", 1)).await.unwrap(),
        Fence::Applied
    );
}

#[tokio::test]
async fn connecting_to_nothing_is_unavailable_and_a_wrong_password_is_a_config_error() {
    let srv = server().await;
    // No server listens on port 1.
    let e = RedisCache::with_config(
        RedisConfig::from_url("redis://127.0.0.1:1")
            .unwrap()
            .with_reconnect_retries(0),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_temporary());

    // The test server has no password: AUTH with one is refused.
    let url = srv.url().replace("redis://", "redis://:p4ss-xyzzy@");
    let e = RedisCache::connect(&url).await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Config | ErrorKind::Backend),
        "{e}"
    );
    assert!(
        !e.to_string().contains("p4ss-xyzzy"),
        "the password leaked: {e}"
    );
}
