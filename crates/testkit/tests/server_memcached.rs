//! `MemcachedServer`: starts, answers, pauses, dies, comes back on its port.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use writethrough_testkit::server::MemcachedServer;

async fn connect(memcached: &MemcachedServer) -> BufReader<TcpStream> {
    BufReader::new(
        TcpStream::connect(memcached.addr())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", memcached.url(), memcached.log())),
    )
}

async fn send(conn: &mut BufReader<TcpStream>, text: &str) -> std::io::Result<()> {
    conn.get_mut().write_all(text.as_bytes()).await
}

async fn read_line(conn: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut reply = String::new();
    conn.read_line(&mut reply).await?;
    Ok(reply.trim_end().to_owned())
}

async fn set(conn: &mut BufReader<TcpStream>, key: &str, value: &str) {
    send(
        conn,
        &format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()),
    )
    .await
    .unwrap();
    assert_eq!(read_line(conn).await.unwrap(), "STORED");
}

/// The value under `key`, or `None` on a miss.
async fn get(conn: &mut BufReader<TcpStream>, key: &str) -> Option<String> {
    send(conn, &format!("get {key}\r\n")).await.unwrap();
    let header = read_line(conn).await.unwrap();
    if header == "END" {
        return None;
    }
    assert!(header.starts_with(&format!("VALUE {key} ")), "{header}");
    let value = read_line(conn).await.unwrap();
    assert_eq!(read_line(conn).await.unwrap(), "END");
    Some(value)
}

#[tokio::test]
async fn memcached_starts_on_a_free_port_and_stores_values() {
    let memcached = MemcachedServer::start().await.unwrap();
    assert_eq!(
        memcached.url(),
        format!("memcached://127.0.0.1:{}", memcached.port())
    );
    assert!(!memcached.is_external());

    let mut conn = connect(&memcached).await;
    send(&mut conn, "version\r\n").await.unwrap();
    assert!(read_line(&mut conn).await.unwrap().starts_with("VERSION "));
    set(&mut conn, "k", "v").await;
    assert_eq!(get(&mut conn, "k").await.as_deref(), Some("v"));
}

#[tokio::test]
async fn paused_memcached_does_not_answer_until_resumed() {
    let memcached = MemcachedServer::start().await.unwrap();
    let mut conn = connect(&memcached).await;
    set(&mut conn, "k", "v").await;

    memcached.pause().unwrap();
    send(&mut conn, "version\r\n").await.unwrap();
    let stalled = tokio::time::timeout(Duration::from_millis(300), read_line(&mut conn)).await;
    assert!(stalled.is_err(), "a paused server answered: {stalled:?}");

    memcached.resume().unwrap();
    assert!(read_line(&mut conn).await.unwrap().starts_with("VERSION "));
    assert_eq!(get(&mut conn, "k").await.as_deref(), Some("v"));
}

#[tokio::test]
async fn killed_memcached_refuses_connections_and_restarts_empty_on_the_same_port() {
    let mut memcached = MemcachedServer::start().await.unwrap();
    let port = memcached.port();
    let mut conn = connect(&memcached).await;
    set(&mut conn, "k", "v").await;

    memcached.kill().await.unwrap();
    assert!(TcpStream::connect(memcached.addr()).await.is_err());

    memcached.restart().await.unwrap();
    assert_eq!(memcached.port(), port);
    let mut conn = connect(&memcached).await;
    assert_eq!(get(&mut conn, "k").await, None);
}

#[tokio::test]
async fn stopped_memcached_can_be_restarted() {
    let mut memcached = MemcachedServer::start().await.unwrap();
    memcached.stop().await.unwrap();
    assert!(TcpStream::connect(memcached.addr()).await.is_err());
    memcached.restart().await.unwrap();
    let mut conn = connect(&memcached).await;
    set(&mut conn, "k", "v").await;
}
