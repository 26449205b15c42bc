//! `redis+unix://` and `unix://` URLs reach a server on a Unix socket.

use std::process::Stdio;
use std::time::Duration;

use writethrough_core::backend::{CacheStore, Fence};
use writethrough_redis::RedisCache;

mod common;

#[tokio::test]
async fn unix_socket_urls_connect_and_fence() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("redis.sock");
    let mut child = tokio::process::Command::new("redis-server")
        .args(["--port", "0", "--save", "", "--appendonly", "no"])
        .arg("--unixsocket")
        .arg(&sock)
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is not installed (apt-get install redis-server)");
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for url in [
        format!("redis+unix://{}", sock.display()),
        format!("unix://{}?db=1", sock.display()),
    ] {
        let cache = RedisCache::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        cache.ping().await.unwrap();
        assert_eq!(
            cache.set_if_newer(common::row_item("k", 1)).await.unwrap(),
            Fence::Applied,
            "{url}"
        );
        assert!(cache.get("k").await.unwrap().is_some());
    }
    child.kill().await.unwrap();
}
