//! `PostgresServer`: starts, answers, pauses, survives a kill with its data.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use writethrough_testkit::server::PostgresServer;

fn text(rows: &[Vec<Option<String>>]) -> Vec<Vec<&str>> {
    rows.iter()
        .map(|row| row.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect())
        .collect()
}

/// A startup message for user and database `postgres` (protocol 3.0).
fn startup_message() -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0postgres\0database\0postgres\0\0");
    let mut message = i32::try_from(body.len() + 4)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    message.extend_from_slice(&body);
    message
}

#[tokio::test]
async fn postgres_starts_on_a_free_port_and_runs_queries() {
    let started = Instant::now();
    let pg = PostgresServer::start().await.unwrap();
    eprintln!("PostgreSQL ready in {:?}", started.elapsed());
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
    );
    assert!(!pg.is_external());

    let rows = pg
        .simple_query("SELECT 1 + 1, NULL::text, current_user, current_database()")
        .await
        .unwrap();
    assert_eq!(text(&rows), [["2", "NULL", "postgres", "postgres"]]);
    let settings = pg
        .simple_query("SHOW fsync; SHOW server_encoding; SHOW max_connections")
        .await
        .unwrap();
    assert_eq!(text(&settings), [["off"], ["UTF8"], ["200"]]);

    let err = pg.simple_query("SELECT * FROM missing").await.unwrap_err();
    assert!(err.to_string().contains("42P01"), "{err}");
}

/// Reads one message: its tag and body.
async fn read_message(conn: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let tag = conn.read_u8().await?;
    let len = usize::try_from(conn.read_i32().await?).unwrap() - 4;
    let mut body = vec![0; len];
    conn.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// Reads messages until ReadyForQuery.
async fn until_ready(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut tags = Vec::new();
    loop {
        let (tag, _) = read_message(conn).await?;
        tags.push(tag);
        if tag == b'Z' {
            return Ok(tags);
        }
    }
}

/// A logged-in session, ready for a query.
async fn session(pg: &PostgresServer) -> TcpStream {
    let mut conn = TcpStream::connect(pg.addr()).await.unwrap();
    conn.write_all(&startup_message()).await.unwrap();
    until_ready(&mut conn).await.unwrap();
    conn
}

fn query_message(sql: &str) -> Vec<u8> {
    let mut message = vec![b'Q'];
    message.extend_from_slice(&i32::try_from(sql.len() + 5).unwrap().to_be_bytes());
    message.extend_from_slice(sql.as_bytes());
    message.push(0);
    message
}

#[tokio::test]
async fn paused_postgres_does_not_answer_until_resumed() {
    let pg = PostgresServer::start().await.unwrap();
    // A session opened before the pause: its backend is a process of its
    // own (in a session of its own), and must be frozen too.
    let mut open = session(&pg).await;

    pg.pause().unwrap();
    open.write_all(&query_message("SELECT 1")).await.unwrap();
    let stalled = tokio::time::timeout(Duration::from_millis(300), read_message(&mut open)).await;
    assert!(stalled.is_err(), "a paused backend answered: {stalled:?}");
    // New sessions: the kernel accepts the connection; nobody answers.
    let mut fresh = TcpStream::connect(pg.addr()).await.unwrap();
    fresh.write_all(&startup_message()).await.unwrap();
    let stalled = tokio::time::timeout(Duration::from_millis(300), read_message(&mut fresh)).await;
    assert!(stalled.is_err(), "a paused server answered: {stalled:?}");

    pg.resume().unwrap();
    // What was sent while paused is answered now.
    let tags = until_ready(&mut open).await.unwrap();
    assert_eq!(tags, [b'T', b'D', b'C', b'Z']);
    until_ready(&mut fresh).await.unwrap();
    assert_eq!(text(&pg.simple_query("SELECT 1").await.unwrap()), [["1"]]);
}

#[tokio::test]
async fn killed_postgres_keeps_committed_data_after_restart_on_the_same_port() {
    let mut pg = PostgresServer::start().await.unwrap();
    let port = pg.port();
    pg.simple_query(
        "CREATE TABLE kept (id int PRIMARY KEY, name text); INSERT INTO kept VALUES (1, 'one')",
    )
    .await
    .unwrap();
    // An open session: its backend process must die with the postmaster.
    let mut open = session(&pg).await;

    pg.kill().await.unwrap();
    assert!(TcpStream::connect(pg.addr()).await.is_err());
    open.write_all(&query_message("SELECT 1")).await.ok();
    assert!(
        read_message(&mut open).await.is_err(),
        "the backend survived"
    );
    assert!(pg.simple_query("SELECT 1").await.is_err());

    let started = Instant::now();
    pg.restart().await.unwrap();
    eprintln!("PostgreSQL recovered in {:?}", started.elapsed());
    assert_eq!(pg.port(), port);
    let rows = pg.simple_query("SELECT id, name FROM kept").await.unwrap();
    assert_eq!(text(&rows), [["1", "one"]]);
    assert!(
        pg.log().contains("not properly shut down"),
        "no crash recovery in the log:\n{}",
        pg.log()
    );
}

#[tokio::test]
async fn stopped_postgres_restarts_with_its_data() {
    let mut pg = PostgresServer::start().await.unwrap();
    pg.simple_query("CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
        .await
        .unwrap();
    pg.stop().await.unwrap();
    assert!(TcpStream::connect(pg.addr()).await.is_err());
    pg.restart().await.unwrap();
    assert_eq!(
        text(&pg.simple_query("SELECT v FROM t").await.unwrap()),
        [["7"]]
    );
}
