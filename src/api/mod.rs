//! The HTTP API: customer lookup, health, readiness and Prometheus metrics.

use crate::apply::keys::Keyspace;
use crate::apply::Ownership;
use crate::domain::change::MoneyFormat;
use crate::domain::{explain, time, CustomerState};
use crate::rules::Rules;
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
    // The customer lives in exactly one partition; which one depends on the producer's
    // partitioner, so look in all of them at once (one GET per partition, pipelined).
    let mut pipe = redis::pipe();
    for p in 0..s.partitions {
        pipe.get(s.keyspace.partition(p).customer(&customer_id));
    }
    let mut conn = s.redis.clone();
    let found: Vec<Option<Vec<u8>>> = match pipe.query_async(&mut conn).await {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "redis_unavailable",
                e.to_string(),
            )
        }
    };
    let Some((partition, bytes)) = found
        .into_iter()
        .enumerate()
        .find_map(|(p, v)| v.map(|b| (p, b)))
    else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no customer {customer_id:?}"),
        );
    };
    let state: CustomerState = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt_state",
                e.to_string(),
            )
        }
    };
    // Wall mode: as of now. Event mode: as of the customer's own engine time (the wall clock
    // would decay a replayed history that event time has not reached).
    let now = if s.wall_clock {
        time::now_ms()
    } else {
        i64::MIN
    };
    let zero = s.keyspace.partition(0);
    let cutoffs = match crate::apply::store::load_cutoffs(&mut conn, &zero).await {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "redis_unavailable",
                e.to_string(),
            )
        }
    };
    let view = explain::explain(&customer_id, &state, &s.rules, &s.money, now, &cutoffs);
    let mut body = serde_json::to_value(view).unwrap_or_default();
    body["partition"] = partition.into();
    // The exact position in each rank: customers strictly above, summed over partitions.
    for (r, rank) in s.rules.ranks().iter().enumerate() {
        let Some(Some(value)) = state.rk.get(r) else {
            continue;
        };
        let mut pipe = redis::pipe();
        for p in 0..s.partitions {
            let key = s.keyspace.partition(p).rank(&rank.name);
            pipe.zcount(&key, format!("({value}"), "+inf").zcard(&key);
        }
        if let Ok(counts) = pipe.query_async::<Vec<u64>>(&mut conn).await {
            let above: u64 = counts.iter().step_by(2).sum();
            let population: u64 = counts.iter().skip(1).step_by(2).sum();
            let entry = &mut body["ranks"][rank.name.as_str()];
            entry["position"] = (above + 1).into();
            entry["population"] = population.into();
            if population > 0 {
                entry["top_percent"] =
                    (((above + 1) as f64 * 10_000.0 / population as f64).round() / 100.0).into();
            }
        }
    }
    Json(body).into_response()
}

/// `GET /v1/tiers`: the rank cut-offs in force and the number of customers in each tier.
async fn tiers(State(s): State<ApiState>) -> Response {
    let mut conn = s.redis.clone();
    let mut pipe = redis::pipe();
    for p in 0..s.partitions {
        pipe.hgetall(s.keyspace.partition(p).tier_counts);
    }
    let counts: Vec<std::collections::HashMap<String, i64>> =
        match pipe.query_async(&mut conn).await {
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
        let n: i64 = counts.iter().filter_map(|m| m.get(&t.name)).sum();
        sizes.insert(t.name.clone(), n.into());
    }
    let cutoffs = crate::apply::store::load_cutoffs(&mut conn, &s.keyspace.partition(0))
        .await
        .ok()
        .flatten()
        .filter(|c| c.rules == crate::domain::state::rules_hash(s.rules.version()));
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
    if let Err(e) = redis::cmd("PING").query_async::<String>(&mut conn).await {
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
