//! The product catalogue as an HTTP service, with Prometheus metrics and a
//! health report.
//!
//! `cargo run --example http_catalogue`, then for instance
//!
//! ```text
//! curl -X PUT localhost:3000/products/1 -H 'content-type: application/json' \
//!      -d '{"id":1,"name":"Fountain pen","price":12.5,"stock":40}'
//! curl localhost:3000/products/1
//! curl -X PATCH localhost:3000/products/1 -H 'content-type: application/json' -d '{"price":9.5}'
//! curl -X POST localhost:3000/products:batch -H 'content-type: application/json' \
//!      -d '[{"id":2,"name":"Ink","price":4,"stock":100}]'
//! curl -X DELETE localhost:3000/products/1
//! curl localhost:3000/health
//! curl localhost:3000/metrics
//! ```
//!
//! Settings, from the environment:
//!
//! | variable       | default          | meaning |
//! |----------------|------------------|---------|
//! | `WT_CACHE_URL` | `moka://`        | the cache, see `writethrough::open_cache` |
//! | `WT_DB_URL`    | `sqlite::temp:`  | the database, see `writethrough::open_db` (`sqlite::temp:` is removed at exit) |
//! | `WT_LISTEN`    | `127.0.0.1:3000` | the address to listen on; port 0 picks a free one |
//! | `RUST_LOG`     | `info`           | the log filter (logs go to stderr) |
//! | `WT_MONITOR_RATE` | `0.01`        | the share of cache hits the consistency monitor re-checks; `0` turns it off |
//! | `WT_MONITOR_SETTLE_MS` | `1000`   | how long after a hit the monitor looks |
//! | `WT_MIN_NINES` | `3`              | `/health` answers 503 `unhealthy` once the measured consistency is below this many nines |
//!
//! The bound address is printed on stdout as `listening on http://ADDR`.
//! Ctrl-C (or SIGTERM) stops taking connections, finishes the requests in
//! flight and exits.
//!
//! The examples package builds every backend in, so any pair works, e.g.
//! `WT_CACHE_URL=redis://127.0.0.1:6379 WT_DB_URL=postgres://postgres@127.0.0.1/postgres`.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{Value as JsonValue, json};
use writethrough::{
    BreakerState, Engine, ErrorKind, Handle, MonitorConfig, Patch, TableOptions, Value,
};
use writethrough_examples::{Product, validate};

/// What every request handler shares.
#[derive(Clone)]
struct App {
    engine: Engine,
    products: Handle<Product>,
    prometheus: PrometheusHandle,
    /// `/health` is unhealthy below this measured consistency.
    min_nines: f64,
}

/// An error response: a status and a JSON body `{"error": kind, "message": ...}`.
struct ApiError {
    status: StatusCode,
    error: &'static str,
    message: String,
    in_doubt: bool,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            message: message.into(),
            in_doubt: false,
        }
    }

    fn not_found(id: i64) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no product {id}"),
        )
    }
}

/// The HTTP status of an engine error.
fn status_of(e: &writethrough::Error) -> StatusCode {
    match e.kind() {
        // Well-formed requests whose content the catalogue cannot take.
        ErrorKind::Validation
        | ErrorKind::InvalidValue
        | ErrorKind::SchemaMismatch
        | ErrorKind::ValueTooLarge => StatusCode::UNPROCESSABLE_ENTITY,
        // `Config` counts as input for `is_input`, but no request can cause
        // it: it is the server's own settings.
        ErrorKind::Config => StatusCode::INTERNAL_SERVER_ERROR,
        k if k.is_input() => StatusCode::BAD_REQUEST,
        ErrorKind::Timeout
        | ErrorKind::Unavailable
        | ErrorKind::Busy
        | ErrorKind::PoolExhausted => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::ConstraintViolation => StatusCode::CONFLICT,
        // Serialization failures and the like: a retry may succeed.
        _ if e.is_temporary() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<writethrough::Error> for ApiError {
    fn from(e: writethrough::Error) -> Self {
        let status = status_of(&e);
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        } else {
            tracing::debug!(error = %e, "request refused");
        }
        // The message, not the whole error: its source (a driver's error)
        // is for the log, not for clients.
        let message = match (e.message(), e.operation()) {
            ("", "") => format!("{} error", e.kind()),
            ("", op) => format!("{op} failed"),
            (m, _) => m.to_owned(),
        };
        ApiError {
            status,
            error: e.kind().as_str(),
            message,
            in_doubt: e.is_in_doubt(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self::new(r.status(), "invalid_body", r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_key", r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error, "message": self.message });
        if self.in_doubt {
            // The commit's outcome is unknown: read the row back before retrying.
            body["in_doubt"] = json!(true);
        }
        let mut res = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        res
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn get_product(
    State(app): State<App>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<Product>> {
    let Path(id) = id?;
    match app.products.get(id).await? {
        Some(p) => Ok(Json(p)),
        None => Err(ApiError::not_found(id)),
    }
}

async fn put_product(
    State(app): State<App>,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<Product>, JsonRejection>,
) -> ApiResult<Json<JsonValue>> {
    let Path(id) = id?;
    let Json(product) = body?;
    if product.id != id {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "id_mismatch",
            format!(
                "the path names product {id}, the body product {}",
                product.id
            ),
        ));
    }
    let version = app.products.put(&product).await?;
    Ok(Json(json!({ "version": version })))
}

async fn patch_product(
    State(app): State<App>,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<JsonValue>, JsonRejection>,
) -> ApiResult<Json<Product>> {
    let Path(id) = id?;
    let Json(body) = body?;
    let JsonValue::Object(columns) = body else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "a patch is a JSON object of the columns to set",
        ));
    };
    let mut patch = Patch::new();
    for (column, value) in columns {
        // Names come from the client: `try_set` refuses a bad identifier here, with a
        // 400 (`set` would too, but only when the update runs).
        // The engine converts the JSON value to the column's type, or refuses it.
        patch.try_set(&column, Value::Json(value))?;
    }
    match app.products.update(id, patch).await? {
        Some(p) => Ok(Json(p)),
        None => Err(ApiError::not_found(id)),
    }
}

async fn delete_product(
    State(app): State<App>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(id) = id?;
    if app.products.delete(id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(id))
    }
}

async fn put_batch(
    State(app): State<App>,
    body: Result<Json<Vec<Product>>, JsonRejection>,
) -> ApiResult<Json<JsonValue>> {
    let Json(products) = body?;
    let versions = app.products.put_many(&products).await?;
    Ok(Json(json!({ "versions": versions })))
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.prometheus.render(),
    )
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn health(State(app): State<App>) -> (StatusCode, Json<JsonValue>) {
    // Note: each call reports the window since the previous call, whoever made it.
    let h = app.engine.health();
    let s = app.engine.stats();
    // The monitor found the cache wrong more often than the threshold allows.
    let inconsistent = h
        .consistency
        .as_ref()
        .is_some_and(|c| c.divergences > 0 && c.nines.is_some_and(|n| n < app.min_nines));
    let (code, status) = if inconsistent {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    } else if h.breaker == BreakerState::Closed {
        (StatusCode::OK, "ok")
    } else {
        // The cache is being bypassed: reads and writes go to the database.
        (StatusCode::OK, "degraded")
    };
    let consistency = h.consistency.as_ref().map(|c| {
        json!({
            "checks": c.checks,
            "divergences": c.divergences,
            "dropped": c.dropped,
            "nines": c.nines,
            "min_nines": app.min_nines,
            "last_divergence": c.last_divergence.as_ref().map(|d| json!({
                "table": d.table,
                "key": d.key,
                "kind": d.kind,
                "seconds_ago": d.ago.as_secs_f64(),
            })),
        })
    });
    let body = Json(json!({
        "status": status,
        "consistency": consistency,
        "cache": app.engine.cache_name(),
        "db": app.engine.db_name(),
        "breaker": h.breaker.as_str(),
        "breaker_trips": h.breaker_trips,
        "pending_resync": h.pending_resync,
        "uptime_seconds": h.uptime.as_secs_f64(),
        "window_seconds": h.window.as_secs_f64(),
        "operations": h.operations,
        "throughput": h.throughput,
        "read_p50_ms": millis(h.read_p50),
        "read_p99_ms": millis(h.read_p99),
        "write_p50_ms": millis(h.write_p50),
        "write_p99_ms": millis(h.write_p99),
        "cache_failure_rate": h.cache_failure_rate,
        "db_failure_rate": h.db_failure_rate,
        "stats": {
            "hits": s.hits,
            "misses": s.misses,
            "hit_ratio": s.hit_ratio(),
            "loads": s.loads,
            "populates": s.populates,
            "stale_refused": s.stale_refused,
            "writes": s.writes,
            "cache_write_failures": s.cache_write_failures,
            "cache_errors": s.cache_errors,
            "db_errors": s.db_errors,
            "corrupt_entries": s.corrupt_entries,
            "resynced": s.resynced,
            "replayed": s.replayed,
            "late_loads": s.late_loads,
        },
    }));
    (code, body)
}

fn router(app: App) -> Router {
    Router::new()
        .route(
            "/products/{id}",
            get(get_product)
                .put(put_product)
                .patch(patch_product)
                .delete(delete_product),
        )
        .route("/products:batch", post(put_batch))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(app)
}

/// The Prometheus recorder, installed globally. It must exist before the
/// engine is built: the engine registers its metric handles then, and
/// handles registered without a recorder stay no-ops.
fn install_prometheus() -> Result<PrometheusHandle, Box<dyn std::error::Error>> {
    const BUCKETS: [f64; 14] = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        1.0, 5.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)?
        .install_recorder()?;
    // Without the exporter's own HTTP listener nobody runs the upkeep
    // (which drains histogram samples between scrapes): do it here.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down: finishing the requests in flight");
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let cache_url = env_or("WT_CACHE_URL", "moka://");
    let db_url = env_or("WT_DB_URL", "sqlite::temp:");
    let listen = env_or("WT_LISTEN", "127.0.0.1:3000");
    let number = |name: &str, default: &str| {
        env_or(name, default)
            .parse::<f64>()
            .map_err(|_| format!("{name} must be a number"))
    };
    let monitor_rate = number("WT_MONITOR_RATE", "0.01")?;
    let settle = Duration::from_millis(number("WT_MONITOR_SETTLE_MS", "1000")? as u64);
    let min_nines = number("WT_MIN_NINES", "3")?;

    let prometheus = install_prometheus()?;
    let engine = writethrough::open(&cache_url, &db_url)
        .await?
        .namespace("catalogue")
        .default_ttl(Some(Duration::from_secs(600)))
        .configure(|c| {
            c.monitor =
                (monitor_rate > 0.0).then(|| MonitorConfig::sampling(monitor_rate).settle(settle));
        })
        .build()?;
    let products = engine
        .register::<Product>(TableOptions::new().validate(validate))
        .await?;
    tracing::info!(cache = %cache_url, db = %db_url, "engine ready");

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    // On stdout, for whoever started us with port 0 (the tests do).
    println!("listening on http://{}", listener.local_addr()?);

    let app = App {
        min_nines,
        engine,
        products,
        prometheus,
    };
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}
