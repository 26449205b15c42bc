//! Runs the `http_catalogue` example as a child process (Moka + a temporary
//! SQLite database) and exercises every route over HTTP.
//!
//! The example's binary is the one cargo builds for `cargo test` of this
//! package (examples are built before the tests run); this test builds
//! nothing itself.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

/// The running service; killed when dropped, so a failed assertion leaves no process behind.
struct Service {
    child: Child,
    addr: String,
}

impl Service {
    fn start() -> Service {
        Service::start_with(&[])
    }

    /// The service with `env` over the defaults (Moka, a temporary SQLite).
    fn start_with(env: &[(&str, &str)]) -> Service {
        let mut child = Command::new(common::example_binary("http_catalogue", &["lib.rs"]))
            .env("WT_LISTEN", "127.0.0.1:0")
            .env("WT_CACHE_URL", "moka://")
            .env("WT_DB_URL", "sqlite::temp:")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the http_catalogue example");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Keep reading stdout to its end, so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let mut service = Service {
            child,
            addr: String::new(),
        };
        // A bound on waiting, not a timing assertion: a broken start must not hang the suite.
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(addr) => service.addr = addr,
            Err(_) => {
                let status = service.child.try_wait().ok().flatten();
                panic!("the service printed no `listening on` line (exit status: {status:?})");
            }
        }
        service
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        http(&self.addr, method, path, body)
    }

    fn json(&self, method: &str, path: &str, body: Value) -> Response {
        self.request(method, path, Some(&body.to_string()))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `error` field of a JSON error body.
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {:?}", self.body))
            .to_owned()
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`).
fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Response {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no end of headers in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: bad status line in {head:?}"));
    let chunked = lines.any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Response { status, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("a chunk size line");
        let n = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
            .expect("a hexadecimal chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

/// The sum of the samples of `metric` whose labels include every one of `labels`.
fn metric_sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn product(id: i64, name: &str, price: f64, stock: i64) -> Value {
    json!({ "id": id, "name": name, "price": price, "stock": stock })
}

#[test]
fn every_route_of_the_http_catalogue() {
    let svc = Service::start();

    // GET of a missing product, and of an id that is not one.
    let r = svc.request("GET", "/products/1", None);
    assert_eq!((r.status, r.error().as_str()), (404, "not_found"), "{r:?}");
    let r = svc.request("GET", "/products/abc", None);
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.error(), "invalid_key");

    // PUT: create, then bad input of every sort.
    let pen = product(1, "Fountain pen", 12.5, 40);
    let r = svc.json("PUT", "/products/1", pen.clone());
    assert_eq!(r.status, 200, "{r:?}");
    let v1 = r.json()["version"].as_u64().expect("a version");
    assert!(v1 >= 1, "{r:?}");
    let r = svc.json("PUT", "/products/2", pen.clone());
    assert_eq!(
        (r.status, r.error().as_str()),
        (400, "id_mismatch"),
        "{r:?}"
    );
    let r = svc.json("PUT", "/products/3", product(3, "Broken", -1.0, 0));
    assert_eq!((r.status, r.error().as_str()), (422, "validation"), "{r:?}");
    let r = svc.request("PUT", "/products/3", Some("{not json"));
    assert_eq!(
        (r.status, r.error().as_str()),
        (400, "invalid_body"),
        "{r:?}"
    );
    let r = svc.json("PUT", "/products/3", json!({ "id": 3, "name": "No price" }));
    assert_eq!(
        (r.status, r.error().as_str()),
        (422, "invalid_body"),
        "{r:?}"
    );
    assert_eq!(svc.request("GET", "/products/3", None).status, 404);

    // GET returns what was put; twice more, and the hit counters grow.
    let r = svc.request("GET", "/products/1", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), pen);
    let m = svc.request("GET", "/metrics", None);
    assert_eq!(m.status, 200, "{m:?}");
    let hit = [r#"op="get""#, r#"table="products""#, r#"outcome="hit""#];
    let ops_before = metric_sum(&m.body, "writethrough_operations_total", &hit);
    let hits_before = metric_sum(
        &m.body,
        "writethrough_cache_hits_total",
        &[r#"table="products""#],
    );
    for _ in 0..2 {
        assert_eq!(svc.request("GET", "/products/1", None).json(), pen);
    }
    let m = svc.request("GET", "/metrics", None);
    let ops_after = metric_sum(&m.body, "writethrough_operations_total", &hit);
    let hits_after = metric_sum(
        &m.body,
        "writethrough_cache_hits_total",
        &[r#"table="products""#],
    );
    assert!(
        ops_after >= ops_before + 2.0,
        "get hits {ops_before} -> {ops_after} in\n{}",
        m.body
    );
    assert!(
        hits_after >= hits_before + 2.0,
        "cache hits {hits_before} -> {hits_after}"
    );
    for name in [
        "writethrough_operation_seconds",
        "writethrough_db_call_seconds",
        "writethrough_breaker_state",
    ] {
        assert!(m.body.contains(name), "{name} missing from\n{}", m.body);
    }

    // PATCH: a column, then bad patches, then a missing row.
    let r = svc.json("PATCH", "/products/1", json!({ "price": 9.5 }));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), product(1, "Fountain pen", 9.5, 40));
    assert_eq!(
        svc.request("GET", "/products/1", None).json()["price"],
        json!(9.5)
    );
    for (patch, status, error) in [
        (json!({ "price": "cheap" }), 422, "invalid_value"),
        (json!({ "stock": null }), 422, "invalid_value"),
        (json!({ "colour": "red" }), 422, "schema_mismatch"),
        (json!({ "id": 5 }), 422, "schema_mismatch"),
        (json!({}), 422, "schema_mismatch"),
        (json!({ "bad name": 1 }), 400, "invalid_identifier"),
        (json!({ "name": " " }), 422, "validation"),
        (json!([1, 2]), 400, "invalid_body"),
    ] {
        let r = svc.json("PATCH", "/products/1", patch.clone());
        assert_eq!(
            (r.status, r.error().as_str()),
            (status, error),
            "{patch}: {r:?}"
        );
    }
    assert_eq!(
        svc.request("GET", "/products/1", None).json(),
        product(1, "Fountain pen", 9.5, 40),
        "a refused patch changes nothing"
    );
    let r = svc.json("PATCH", "/products/99", json!({ "price": 1.0 }));
    assert_eq!((r.status, r.error().as_str()), (404, "not_found"), "{r:?}");

    // Batch: one write of several products, then a batch that repeats a key.
    let batch = json!([product(10, "Ink", 4.0, 100), product(11, "Nib", 2.25, 7)]);
    let r = svc.json("POST", "/products:batch", batch);
    assert_eq!(r.status, 200, "{r:?}");
    let versions = r.json()["versions"].as_array().expect("versions").len();
    assert_eq!(versions, 2, "{r:?}");
    assert_eq!(
        svc.request("GET", "/products/11", None).json(),
        product(11, "Nib", 2.25, 7)
    );
    let twice = json!([product(12, "A", 1.0, 1), product(12, "B", 1.0, 1)]);
    let r = svc.json("POST", "/products:batch", twice);
    assert_eq!(
        (r.status, r.error().as_str()),
        (400, "invalid_key"),
        "{r:?}"
    );
    assert_eq!(svc.request("GET", "/products/12", None).status, 404);
    let r = svc.json("POST", "/products:batch", json!([]));
    assert_eq!((r.status, r.json()), (200, json!({ "versions": [] })));

    // DELETE: once, then again, then a read.
    let r = svc.request("DELETE", "/products/1", None);
    assert_eq!((r.status, r.body.as_str()), (204, ""), "{r:?}");
    let r = svc.request("DELETE", "/products/1", None);
    assert_eq!((r.status, r.error().as_str()), (404, "not_found"), "{r:?}");
    assert_eq!(svc.request("GET", "/products/1", None).status, 404);

    // Health: the breaker is closed, and the figures are there.
    let r = svc.request("GET", "/health", None);
    assert_eq!(r.status, 200, "{r:?}");
    let h = r.json();
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["breaker"], "closed", "{h}");
    assert_eq!(
        (h["cache"].as_str(), h["db"].as_str()),
        (Some("moka"), Some("sqlite"))
    );
    assert!(h["stats"]["hits"].as_u64().unwrap() >= 2, "{h}");
    assert!(h["stats"]["writes"].as_u64().unwrap() >= 4, "{h}");
    for field in [
        "throughput",
        "read_p50_ms",
        "read_p99_ms",
        "write_p99_ms",
        "pending_resync",
    ] {
        assert!(h[field].is_number(), "{field} in {h}");
    }

    assert_eq!(svc.request("GET", "/nowhere", None).status, 404);

    stop_gracefully(svc);
}

/// The consistency monitor re-checks every hit; a cache entry corrupted
/// behind the service's back (in Redis, with Redis's own client) is served
/// once, found, and `/health` answers 503 `unhealthy` with the divergence.
#[test]
fn health_turns_unhealthy_when_the_monitor_finds_the_cache_wrong() {
    use writethrough::Entity;
    use writethrough::codec::{self, Codec, Decoded};

    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let redis = rt
        .block_on(writethrough_testkit::server::RedisServer::start())
        .unwrap_or_else(|e| panic!("{e}"));
    let url = redis.url();
    let svc = Service::start_with(&[
        ("WT_CACHE_URL", &url),
        ("WT_MONITOR_RATE", "1"),
        ("WT_MONITOR_SETTLE_MS", "50"),
        ("WT_MIN_NINES", "2"),
    ]);
    let r = svc.json("PUT", "/products/1", product(1, "Fountain pen", 12.5, 40));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        svc.request("GET", "/products/1", None).json()["price"],
        12.5
    );
    let healthy = |svc: &Service| svc.request("GET", "/health", None);
    let r = wait_for(|| {
        let r = healthy(&svc);
        (r.json()["consistency"]["checks"].as_u64() >= Some(1)).then_some(r)
    });
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("ok")),
        "{r:?}"
    );
    assert_eq!(r.json()["consistency"]["divergences"], 0, "{r:?}");

    // The entry at its own version and epoch, with another price.
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .expect("a Redis connection");
    let key = "catalogue:products:1";
    let bytes: Vec<u8> = redis::cmd("GET").arg(key).query(&mut conn).expect("GET");
    let Decoded::Row { version, epoch, .. } = codec::decode(&bytes) else {
        panic!("the entry is a row: {bytes:?}");
    };
    let row = writethrough::Row::new()
        .set("id", 1)
        .set("name", "Fountain pen")
        .set("price", 0.01)
        .set("stock", 40);
    let wrong = Codec::Json
        .encode(&writethrough_examples::Product::table(), &row)
        .expect("encode")
        .into_entry_at(version, epoch);
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(wrong.as_ref())
        .query(&mut conn)
        .expect("SET");
    assert_eq!(
        svc.request("GET", "/products/1", None).json()["price"],
        0.01
    );

    let r = wait_for(|| {
        let r = healthy(&svc);
        (r.status == 503).then_some(r)
    });
    let h = r.json();
    assert_eq!(h["status"], "unhealthy", "{h}");
    assert_eq!(h["consistency"]["divergences"], 1, "{h}");
    let last = &h["consistency"]["last_divergence"];
    assert_eq!(
        (&last["table"], &last["key"], &last["kind"]),
        (&json!("products"), &json!("1"), &json!("differs")),
        "{h}"
    );
    assert!(h["consistency"]["nines"].as_f64().unwrap() < 2.0, "{h}");
    stop_gracefully(svc);
}

/// Polls `f` every 20 ms until it gives a value, for at most 20 s.
fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "no answer in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ctrl-C (SIGINT) stops the service cleanly.
#[cfg(unix)]
fn stop_gracefully(mut svc: Service) {
    let pid = svc.child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status();
    assert!(
        matches!(sent, Ok(s) if s.success()),
        "kill -INT {pid}: {sent:?}"
    );
    // A bound on waiting, not a timing assertion.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = svc.child.try_wait().expect("wait for the service") {
            assert!(
                status.success(),
                "the service exited with {status} after SIGINT"
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the service did not exit after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(not(unix))]
fn stop_gracefully(svc: Service) {
    drop(svc);
}
