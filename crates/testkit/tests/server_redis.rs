//! `RedisServer`: starts, answers, pauses, dies, comes back on its port.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use writethrough_testkit::server::RedisServer;

/// Sends an inline command and reads one reply line.
async fn command(conn: &mut BufReader<TcpStream>, line: &str) -> std::io::Result<String> {
    conn.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await?;
    read_line(conn).await
}

async fn read_line(conn: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut reply = String::new();
    conn.read_line(&mut reply).await?;
    Ok(reply.trim_end().to_owned())
}

async fn connect(redis: &RedisServer) -> BufReader<TcpStream> {
    BufReader::new(
        TcpStream::connect(redis.addr())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", redis.url(), redis.log())),
    )
}

#[tokio::test]
async fn redis_starts_on_a_free_port_and_answers_ping() {
    let redis = RedisServer::start().await.unwrap();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert_eq!(redis.addr().port(), redis.port());
    assert!(redis.addr().ip().is_loopback());
    assert!(!redis.is_external());

    let mut conn = connect(&redis).await;
    assert_eq!(command(&mut conn, "PING").await.unwrap(), "+PONG");
    assert_eq!(command(&mut conn, "SET k v").await.unwrap(), "+OK");
    assert_eq!(command(&mut conn, "GET k").await.unwrap(), "$1");
    assert_eq!(read_line(&mut conn).await.unwrap(), "v");
    assert!(
        redis.log().contains("Ready to accept connections"),
        "{}",
        redis.log()
    );
}

#[tokio::test]
async fn two_redis_servers_run_side_by_side() {
    let (a, b) = tokio::join!(RedisServer::start(), RedisServer::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.port(), b.port());
    let mut conn_a = connect(&a).await;
    let mut conn_b = connect(&b).await;
    assert_eq!(
        command(&mut conn_a, "SET only-in-a 1").await.unwrap(),
        "+OK"
    );
    assert_eq!(
        command(&mut conn_b, "EXISTS only-in-a").await.unwrap(),
        ":0"
    );
}

#[tokio::test]
async fn paused_redis_does_not_answer_until_resumed() {
    let redis = RedisServer::start().await.unwrap();
    let mut conn = connect(&redis).await;
    assert_eq!(command(&mut conn, "PING").await.unwrap(), "+PONG");

    redis.pause().unwrap();
    let stalled =
        tokio::time::timeout(Duration::from_millis(300), command(&mut conn, "PING")).await;
    assert!(stalled.is_err(), "a paused server answered: {stalled:?}");

    redis.resume().unwrap();
    // The PING sent while paused is answered now, then new ones are.
    assert_eq!(read_line(&mut conn).await.unwrap(), "+PONG");
    assert_eq!(command(&mut conn, "PING").await.unwrap(), "+PONG");
}

#[tokio::test]
async fn killed_redis_refuses_connections_and_restarts_empty_on_the_same_port() {
    let mut redis = RedisServer::start().await.unwrap();
    let port = redis.port();
    let mut conn = connect(&redis).await;
    assert_eq!(command(&mut conn, "SET k v").await.unwrap(), "+OK");

    redis.kill().await.unwrap();
    assert!(TcpStream::connect(redis.addr()).await.is_err());
    let dead = command(&mut conn, "PING").await;
    assert!(
        dead.as_deref().map_or(true, str::is_empty),
        "old connection still answers: {dead:?}"
    );
    // Killing twice is harmless; pausing a dead server is an error.
    redis.kill().await.unwrap();
    assert!(redis.pause().is_err());

    redis.restart().await.unwrap();
    assert_eq!(redis.port(), port);
    let mut conn = connect(&redis).await;
    assert_eq!(command(&mut conn, "GET k").await.unwrap(), "$-1");
}

#[tokio::test]
async fn stopped_redis_can_be_restarted_and_a_paused_one_stopped() {
    let mut redis = RedisServer::start().await.unwrap();
    redis.pause().unwrap();
    redis.stop().await.unwrap();
    assert!(TcpStream::connect(redis.addr()).await.is_err());
    assert!(redis.log().contains("ready to exit"), "{}", redis.log());

    redis.restart().await.unwrap();
    let mut conn = connect(&redis).await;
    assert_eq!(command(&mut conn, "PING").await.unwrap(), "+PONG");

    // Restarting a running server restarts it.
    redis.restart().await.unwrap();
    let mut conn = connect(&redis).await;
    assert_eq!(command(&mut conn, "PING").await.unwrap(), "+PONG");
}

#[tokio::test]
async fn dropping_redis_kills_it() {
    let redis = RedisServer::start().await.unwrap();
    let addr = redis.addr();
    drop(redis);
    assert!(TcpStream::connect(addr).await.is_err());
}
