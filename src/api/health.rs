//! Liveness (`/healthz`: the tasks that must keep running do, see [`crate::liveness`]),
//! readiness to serve lookups (`/readyz`: Redis answers), readiness of ingestion
//! (`/readyz/ingest`: Redis answers and every owned partition's lag is known and within
//! `api.ready_max_lag`, none is stopped and every outbox flows; an instance owning none says
//! why, loudly when input partitions are stalled) and `/metrics`.
//!
//! The two readinesses are apart so that a load balancer (a Kubernetes Service) keeps sending
//! lookups to an instance that owns no partition (more replicas than partitions) or is
//! catching up: lookups read Redis, whoever owns the customer.

use super::ApiState;
use crate::store::views;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Liveness, as plain text: 503 naming what died or is stuck (see [`crate::liveness`]).
pub(super) async fn healthz(State(s): State<Arc<ApiState>>) -> Response {
    match s.liveness.check() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(problem) => (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")).into_response(),
    }
}

/// Readiness to serve lookups, as plain text: Redis answers within `api.redis_timeout_ms`.
pub(super) async fn readyz(State(s): State<Arc<ApiState>>) -> Response {
    let mut conn = s.redis.clone();
    match s.within(views::ping(&mut conn)).await {
        Ok(()) => (StatusCode::OK, "ready to serve lookups\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("redis unreachable: {e}\n"),
        )
            .into_response(),
    }
}

/// Readiness of ingestion, as plain text.
pub(super) async fn readyz_ingest(State(s): State<Arc<ApiState>>) -> Response {
    let mut conn = s.redis.clone();
    if let Err(e) = s.within(views::ping(&mut conn)).await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("redis unreachable: {e}\n"),
        )
            .into_response();
    }
    let ownership = s.ownership.read().expect("ownership lock");
    if ownership.is_empty() {
        let reason = s
            .stall_alarm
            .reason()
            .unwrap_or_else(|| "no partitions assigned".to_owned());
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response();
    }
    for (p, status) in ownership.iter() {
        if let Some(reason) = &status.stopped {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("partition {p}: assigned but not processed: {reason}\n"),
            )
                .into_response();
        }
        let full = status
            .outbox_full
            .load(std::sync::atomic::Ordering::Relaxed);
        if full > 0 {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("partition {p}: its outbox holds {full} entries, over publish.outbox_max_entries: input paused until publishing catches up (is Kafka reachable?)\n"),
            )
                .into_response();
        }
        if let Some(problem) = status.publishing.problem() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("partition {p}: {problem}\n"),
            )
                .into_response();
        }
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

/// The longest a scrape waits for Redis (less if `api.redis_timeout_ms` is shorter).
const METRICS_REDIS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The Prometheus text exposition, with what this instance's owned partitions hold in Redis
/// read now (customers per tier, pending timers; the rank cut-offs' time under rank-based
/// rules), read within `api.redis_timeout_ms` (at most 2 s; left out when Redis does not
/// answer in time).
pub(super) async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    let owned: Vec<i32> = s
        .ownership
        .read()
        .expect("ownership lock")
        .keys()
        .copied()
        .collect();
    let mut conn = s.redis.clone();
    let ranks = s.rules.uses_ranks();
    // Both reads within one `api.redis_timeout_ms`, at most 2 s: a scrape must not time out
    // (Prometheus's default is 10 s) and lose every other metric while Redis is slow.
    let read = tokio::time::timeout(s.redis_timeout.min(METRICS_REDIS_WAIT), async {
        let gauges = views::partition_gauges(&mut conn, &s.keyspace, &owned).await?;
        let cutoffs = if ranks {
            views::cutoffs(&mut conn, &s.keyspace).await?
        } else {
            None
        };
        Ok::<_, redis::RedisError>((gauges, cutoffs))
    })
    .await
    .ok()
    .and_then(Result::ok);
    let tiers: Vec<&str> = s.rules.tiers().iter().map(|t| t.name.as_str()).collect();
    s.telemetry
        .show_partitions(read.as_ref().map(|(g, _)| g.as_slice()), &tiers);
    match &read {
        Some((_, Some(cutoffs))) => {
            #[allow(clippy::cast_precision_loss)] // Unix ms: far below 2^53
            s.telemetry
                .cutoffs_computed
                .with_label_values(&[] as &[&str])
                .set(cutoffs.computed_at as f64 / 1000.0);
        }
        _ => s.telemetry.cutoffs_computed.reset(),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.telemetry.render(),
    )
        .into_response()
}
