//! Liveness (`/healthz`, in the router), readiness (`/readyz`: Redis answers and every owned
//! partition's lag is known and within `api.ready_max_lag`, none is stopped and
//! every outbox flows; an instance owning none says why, loudly when input partitions are
//! stalled) and `/metrics`.

use super::ApiState;
use crate::store::views;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Readiness, as plain text.
pub(super) async fn readyz(State(s): State<Arc<ApiState>>) -> Response {
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

/// The Prometheus text exposition.
pub(super) async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.telemetry.render(),
    )
        .into_response()
}
