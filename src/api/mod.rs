//! The HTTP API: the router and the state its handlers share; one file per resource
//! (`customers`, `tiers`, `health`: liveness, readiness, metrics) and one error type
//! ([`error::ApiError`]).

pub mod auth;
mod customers;
pub mod error;
mod health;
mod status;
mod tiers;
pub mod tls;

use crate::api::error::ApiError;
use crate::engine::rules::Rules;
use crate::model::change::MoneyFormat;
use crate::partition::Ownership;
use crate::store::connection::Connection;
use crate::store::keys::Keyspace;
use crate::telemetry::Telemetry;
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

/// What the handlers need.
#[derive(Clone)]
pub struct ApiState {
    /// Redis, for lookups and readiness.
    pub redis: Connection,
    /// Key names.
    pub keyspace: Keyspace,
    /// Number of input partitions (a customer may live in any of them).
    pub partitions: i32,
    /// Owned partitions and their lag.
    pub ownership: Ownership,
    /// Readiness lag bound.
    pub ready_max_lag: i64,
    /// How long a request waits for Redis (`api.redis_timeout_ms`).
    pub redis_timeout: std::time::Duration,
    /// Rules (for display names and version).
    pub rules: Arc<Rules>,
    /// Amount formatting.
    pub money: MoneyFormat,
    /// Metrics.
    pub telemetry: Telemetry,
    /// Whether engine time is the wall clock (`clock.mode = "wall"`).
    pub wall_clock: bool,
    /// Raised while this instance owns nothing and input partitions are stalled.
    pub stall_alarm: Arc<crate::ingest::stalls::StallAlarm>,
    /// Whether the tasks that must keep running do (`/healthz`).
    pub liveness: Arc<crate::liveness::Liveness>,
    /// The bearer tokens `/v1/…` requires (`api.token_file`); `None`: open.
    pub tokens: Option<auth::Tokens>,
    /// Every input partition's log end, as last read (the status page's lag).
    pub log_ends: Arc<crate::ingest::stalls::LogEnds>,
    /// Tier changes each customer's state keeps (`api.history_changes`).
    pub history_changes: usize,
}

impl ApiState {
    /// Awaits a read from Redis for at most `redis_timeout`: a frozen or unreachable Redis
    /// is answered 503 `redis_unavailable` in bounded time instead of holding the caller.
    ///
    /// # Errors
    /// The read's own error, or [`ApiError::RedisUnavailable`] when it takes too long.
    pub async fn within<T, E: Into<ApiError>>(
        &self,
        read: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.redis_timeout, read).await {
            Ok(result) => result.map_err(Into::into),
            Err(_) => Err(ApiError::RedisUnavailable(format!(
                "Redis did not answer within {} ms",
                self.redis_timeout.as_millis()
            ))),
        }
    }
}

/// The router. Handlers share the state behind one `Arc` (axum clones it per request).
/// Every request's time is observed by route pattern and status code.
pub fn router(state: ApiState) -> Router {
    let seconds = state.telemetry.http_request_seconds.clone();
    let mut customer_data = Router::new()
        .route("/v1/customers/{customer_id}", get(customers::get))
        .route(
            "/v1/customers/{customer_id}/history",
            get(customers::history),
        )
        .route("/v1/tiers", get(tiers::get))
        .route("/v1/status", get(status::get));
    if let Some(tokens) = state.tokens.clone() {
        customer_data = customer_data.route_layer(axum::middleware::from_fn_with_state(
            tokens,
            auth::require_token,
        ));
    }
    Router::new()
        .merge(customer_data)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/readyz/ingest", get(health::readyz_ingest))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi))
        .route("/status", get(status::page))
        .with_state(Arc::new(state))
        .layer(axum::middleware::from_fn(move |request, next| {
            timed(seconds.clone(), request, next)
        }))
}

/// The API's OpenAPI 3.0 document (`src/api/openapi.json`, checked against this server by
/// schemathesis in `tests/operate.rs`).
pub const OPENAPI: &str = include_str!("openapi.json");

/// `GET /openapi.json`.
async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}

/// Answers `request` and observes how long it took in `tierd_http_request_duration_seconds`,
/// labelled with the route pattern (not the path: one series per route, whatever the ids)
/// or `unmatched`.
async fn timed(
    seconds: prometheus::HistogramVec,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    seconds
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}
