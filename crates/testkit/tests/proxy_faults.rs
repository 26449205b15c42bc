//! `FaultProxy`: forwards bytes, and injects latency, blackholes, resets,
//! refusals and slow closes on command.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use writethrough_testkit::proxy::FaultProxy;
use writethrough_testkit::server::RedisServer;

/// How long a test waits to decide that nothing arrives.
const SILENCE: Duration = Duration::from_millis(300);

/// An echo server; returns its address.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut read, mut write) = conn.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// A server that sends `greeting` to each client and closes at once.
async fn greet_and_close_server(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let _ = conn.write_all(greeting).await;
        }
    });
    addr
}

async fn round_trip(conn: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
    conn.write_all(message).await?;
    let mut reply = vec![0; message.len()];
    conn.read_exact(&mut reply).await?;
    Ok(reply)
}

/// Polls until `check` holds, for up to 5 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn proxy_passes_bytes_both_ways_unchanged() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    assert!(proxy.addr().ip().is_loopback());
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut conn, b"hello").await.unwrap(), b"hello");

    // Large enough to be forwarded in many chunks.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut read, mut write) = conn.split();
    let send = async {
        write.write_all(&big).await.unwrap();
    };
    let receive = async {
        let mut got = vec![0; big.len()];
        read.read_exact(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(send, receive);
    assert!(got == big, "the echoed bytes differ");
}

#[tokio::test]
async fn proxy_counts_open_connections() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    assert_eq!(proxy.connections(), 0);
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut conn, b"x").await.unwrap();
        conns.push(conn);
    }
    assert_eq!(proxy.connections(), 3);
    drop(conns);
    eventually("connections to close", || proxy.connections() == 0).await;
}

#[tokio::test]
async fn latency_delays_each_round_trip_by_at_least_twice_the_setting() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut conn, b"warm").await.unwrap();

    let latency = Duration::from_millis(100);
    proxy.set_latency(latency);
    let started = Instant::now();
    assert_eq!(round_trip(&mut conn, b"slow").await.unwrap(), b"slow");
    let elapsed = started.elapsed();
    // Once on the way up, once on the way back. No upper bound: the
    // machine may be busy.
    assert!(elapsed >= 2 * latency, "round trip took {elapsed:?}");

    proxy.heal();
    assert_eq!(round_trip(&mut conn, b"fast").await.unwrap(), b"fast");
}

#[tokio::test]
async fn blackhole_stalls_open_and_new_connections_without_an_error() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut open, b"before").await.unwrap();

    proxy.set_blackhole(true);
    let stalled = tokio::time::timeout(SILENCE, round_trip(&mut open, b"held")).await;
    assert!(
        stalled.is_err(),
        "a blackholed connection answered: {stalled:?}"
    );

    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    let stalled = tokio::time::timeout(SILENCE, round_trip(&mut fresh, b"held")).await;
    assert!(stalled.is_err(), "a new connection answered: {stalled:?}");
    assert_eq!(proxy.connections(), 2);

    // After healing, what was held arrives first, in order, as TCP would
    // deliver it after a partition; then new bytes flow.
    proxy.heal();
    for conn in [&mut open, &mut fresh] {
        let mut held = [0; 4];
        conn.read_exact(&mut held).await.unwrap();
        assert_eq!(&held, b"held");
        assert_eq!(round_trip(conn, b"after").await.unwrap(), b"after");
    }
    let mut third = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut third, b"new").await.unwrap(), b"new");
}

#[tokio::test]
async fn blackhole_holds_back_a_close() {
    // A server that closes its connection when told to.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        conn.write_all(b"hi").await.unwrap();
        let _ = close_rx.await;
        drop(conn);
    });
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut greeting = [0; 2];
    conn.read_exact(&mut greeting).await.unwrap();

    proxy.set_blackhole(true);
    close_tx.send(()).unwrap();
    let mut rest = Vec::new();
    let stalled = tokio::time::timeout(SILENCE, conn.read_to_end(&mut rest)).await;
    assert!(stalled.is_err(), "the close got through: {stalled:?}");
    proxy.heal();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
    assert_eq!(read.unwrap().unwrap(), 0);
}

#[tokio::test]
async fn reset_all_breaks_open_connections_with_a_reset() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut a, b"a").await.unwrap();
    round_trip(&mut b, b"b").await.unwrap();

    proxy.reset_all();
    for conn in [&mut a, &mut b] {
        let mut buf = [0; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("no reset arrived");
        let err = read.expect_err("the connection was closed, not reset");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    }
    eventually("connections to close", || proxy.connections() == 0).await;

    // New connections work.
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut c, b"c").await.unwrap(), b"c");
}

#[tokio::test]
async fn refuse_resets_new_connections_but_keeps_open_ones() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut open, b"x").await.unwrap();

    proxy.set_refuse(true);
    let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), round_trip(&mut refused, b"y"))
        .await
        .expect("a refused connection stalled");
    let err = result.expect_err("a refused connection answered");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
        ),
        "{err:?}"
    );
    assert_eq!(round_trip(&mut open, b"still").await.unwrap(), b"still");

    proxy.heal();
    let mut accepted = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut accepted, b"z").await.unwrap(), b"z");
}

#[tokio::test]
async fn slow_close_delays_the_servers_close() {
    let proxy = FaultProxy::start(greet_and_close_server(b"bye").await)
        .await
        .unwrap();
    let delay = Duration::from_millis(200);
    proxy.set_slow_close(Some(delay));
    let started = Instant::now();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(got, b"bye");
    assert!(elapsed >= delay, "the close arrived after {elapsed:?}");

    proxy.set_slow_close(None);
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");
}

#[tokio::test]
async fn a_dead_upstream_resets_the_client() {
    // A port nobody listens on.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = FaultProxy::start(addr).await.unwrap();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = [0; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("no reset arrived");
    assert_eq!(read.unwrap_err().kind(), ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_connections_and_port() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let addr = proxy.addr();
    let mut conn = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut conn, b"x").await.unwrap();
    drop(proxy);
    let mut buf = [0; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("the connection stayed open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    eventually("the port to close", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
}

#[tokio::test]
async fn url_points_at_the_proxy() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let port = proxy.addr().port();
    assert_eq!(
        proxy.url("postgres://postgres@127.0.0.1:5432/postgres"),
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );
    assert_eq!(
        proxy.url("redis://127.0.0.1:6379"),
        format!("redis://127.0.0.1:{port}")
    );
}

/// Sends a Redis PING and reads the 7-byte `+PONG\r\n`.
async fn ping(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    conn.write_all(b"PING\r\n").await?;
    let mut reply = vec![0; 7];
    conn.read_exact(&mut reply).await?;
    Ok(reply)
}

#[tokio::test]
async fn proxy_in_front_of_a_real_redis() {
    let redis = RedisServer::start().await.unwrap();
    let proxy = FaultProxy::start(redis.addr()).await.unwrap();
    assert_eq!(
        proxy.url(&redis.url()),
        format!("redis://127.0.0.1:{}", proxy.addr().port())
    );
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(ping(&mut conn).await.unwrap(), b"+PONG\r\n");

    proxy.set_blackhole(true);
    let stalled = tokio::time::timeout(SILENCE, ping(&mut conn)).await;
    assert!(stalled.is_err(), "{stalled:?}");
    proxy.reset_all();
    proxy.heal();
    let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(ping(&mut conn).await.unwrap(), b"+PONG\r\n");
}
