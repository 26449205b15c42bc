//! `rediss://` through rustls, against a redis-server with a self-signed
//! certificate; without the `tls` feature, a typed refusal.

use writethrough_core::ErrorKind;
use writethrough_redis::RedisCache;

#[cfg(feature = "tls")]
mod common;

#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn rediss_urls_without_the_tls_feature_are_config_errors_naming_it() {
    let e = RedisCache::connect("rediss://127.0.0.1:6380")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("`tls` feature"), "{e}");
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn rediss_urls_connect_over_tls() {
    use std::net::TcpListener;
    use std::process::{Command, Stdio};
    use std::time::Duration;
    use writethrough_core::backend::{CacheStore, Fence};

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is not installed (apt-get install openssl)");
    assert!(status.success(), "openssl could not make a certificate");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-auth-clients",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&cert)
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is not installed (apt-get install redis-server)");
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The certificate is self-signed: verification refuses it...
    let e = RedisCache::connect(&format!("rediss://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Backend),
        "{e}"
    );
    // ...and `#insecure` skips it, with the feature that allows it.
    let insecure = format!("rediss://127.0.0.1:{port}/#insecure");
    if !cfg!(feature = "tls-insecure") {
        let e = RedisCache::connect(&insecure).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        return;
    }
    let cache = RedisCache::connect(&insecure)
        .await
        .unwrap_or_else(|e| panic!("TLS connect: {e}"));
    cache.ping().await.unwrap();
    assert_eq!(
        cache.set_if_newer(common::row_item("k", 1)).await.unwrap(),
        Fence::Applied
    );
    assert!(cache.get("k").await.unwrap().is_some());
    child.kill().await.unwrap();
}
