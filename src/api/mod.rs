//! The HTTP API: customer lookup, health, readiness and Prometheus metrics.

use crate::engine::rules::Rules;
use crate::model::change::MoneyFormat;
use crate::model::time;
use crate::partition::Ownership;
use crate::store::keys::Keyspace;
use crate::store::views::{self, ViewError};
use crate::telemetry::Telemetry;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use redis::aio::ConnectionManager;
use serde::Serialize;
use std::sync::Arc;

/// What the handlers need.
#[derive(Clone)]
pub struct ApiState {
    /// Redis, for lookups and readiness.
    pub redis: ConnectionManager,
    /// Key names.
    pub keyspace: Keyspace,
    /// Number of input partitions (a customer may live in any of them).
    pub partitions: i32,
    /// Owned partitions and their lag.
    pub ownership: Ownership,
    /// Readiness lag bound.
    pub ready_max_lag: i64,
    /// Rules (for display names and version).
    pub rules: Arc<Rules>,
    /// Amount formatting.
    pub money: MoneyFormat,
    /// Metrics.
    pub telemetry: Telemetry,
    /// Whether engine time is the wall clock (`clock.mode = "wall"`).
    pub wall_clock: bool,
}

/// The router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/customers/{customer_id}", get(customer))
        .route("/v1/tiers", get(tiers))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
}

fn error(status: StatusCode, error: &'static str, message: String) -> Response {
    (status, Json(ErrorBody { error, message })).into_response()
}

async fn customer(State(s): State<ApiState>, Path(customer_id): Path<String>) -> Response {
    if customer_id.is_empty() || customer_id.chars().count() > crate::ingest::decode::MAX_ID_CHARS {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "customer_id must be 1..=128 characters".into(),
        );
    }
    // Wall mode: as of now. Event mode: as of the customer's own engine time (the wall clock
    // would decay a replayed history that event time has not reached).
    let now = if s.wall_clock {
        time::now_ms()
    } else {
        i64::MIN
    };
    let mut conn = s.redis.clone();
    match views::explained_customer(
        &mut conn,
        &s.keyspace,
        s.partitions,
        &s.rules,
        &s.money,
        now,
        &customer_id,
    )
    .await
    {
        Ok(Some(body)) => Json(body).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no customer {customer_id:?}"),
        ),
        Err(ViewError::Corrupt { key, message }) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "corrupt_state",
            format!("{key}: {message}"),
        ),
        Err(ViewError::Redis(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis_unavailable",
            e.to_string(),
        ),
    }
}

/// `GET /v1/tiers`: the rank cut-offs in force and the number of customers in each tier.
async fn tiers(State(s): State<ApiState>) -> Response {
    let mut conn = s.redis.clone();
    let counts = match views::tier_sizes(&mut conn, &s.keyspace, s.partitions).await {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "redis_unavailable",
                e.to_string(),
            )
        }
    };
    let mut sizes = serde_json::Map::new();
    for t in s.rules.tiers() {
        let n: i64 = counts.get(&t.name).copied().unwrap_or(0);
        sizes.insert(t.name.clone(), n.into());
    }
    let cutoffs = views::cutoffs(&mut conn, &s.keyspace)
        .await
        .ok()
        .flatten()
        .filter(|c| c.rules == crate::model::state::rules_hash(s.rules.version()));
    let points: Vec<serde_json::Value> = s
        .rules
        .cut_points()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            serde_json::json!({
                "rank": s.rules.ranks()[p.rank].name,
                "top": p.describe(),
                "cutoff": cutoffs.as_ref().and_then(|c| c.value(i)).map(|v| v.to_string()),
                "at_or_above": cutoffs.as_ref().and_then(|c| c.at_or_above.get(i).copied()),
            })
        })
        .collect();
    Json(serde_json::json!({
        "rules_version": s.rules.version(),
        "tiers": s.rules.tiers().iter().map(|t| serde_json::json!({
            "name": t.name, "display_name": t.display(), "customers": sizes[&t.name],
        })).collect::<Vec<_>>(),
        "cutoffs": {
            "version": cutoffs.as_ref().map_or(0, |c| c.version),
            "computed_at": cutoffs.as_ref().map(|c| time::format_ms(c.computed_at)),
            "population": cutoffs.as_ref().map(|c| c.population.clone()),
            "points": points,
        },
    }))
    .into_response()
}

async fn readyz(State(s): State<ApiState>) -> Response {
    let mut conn = s.redis.clone();
    if let Err(e) = views::ping(&mut conn).await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("redis unreachable: {e}\n"),
        )
            .into_response();
    }
    let ownership = s.ownership.read().expect("ownership lock");
    if ownership.is_empty() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no partitions assigned\n").into_response();
    }
    for (p, status) in ownership.iter() {
        match status.lag() {
            None => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("partition {p}: lag not known yet\n"),
                )
                    .into_response()
            }
            Some(lag) if lag > s.ready_max_lag => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("partition {p}: lag {lag} > {}\n", s.ready_max_lag),
                )
                    .into_response()
            }
            Some(_) => {}
        }
    }
    (
        StatusCode::OK,
        format!("ready: {} partitions\n", ownership.len()),
    )
        .into_response()
}

async fn metrics(State(s): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.telemetry.render(),
    )
        .into_response()
}
