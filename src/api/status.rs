//! The status page: `GET /status` is a self-contained HTML page (no external assets, no data
//! in it) that shows what `GET /v1/status` answers — the pyramid, the rank cut-offs and rules
//! version (from Redis: every instance's customers), and this instance's partitions with their
//! lag, the flows between tiers it decided over the last hour and its latest tier changes.
//! `/v1/status` holds customer data and so needs the bearer token like every `/v1/…` route;
//! the page takes it from the URL's fragment (`/status#token=…`, never sent to a server or
//! logged) or asks for it, and refreshes every 5 s.

use super::error::ApiError;
use super::ApiState;
use crate::model::time;
use crate::telemetry::recent::FlowHistory;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// The page (`src/api/status.html`).
const PAGE: &str = include_str!("status.html");

/// `GET /status`.
pub(super) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing but the page's own script and style, and fetches to this origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
        ],
        PAGE,
    )
}

/// `GET /v1/status`.
pub(super) async fn get(
    State(s): State<Arc<ApiState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut body = super::tiers::view(&s).await?;
    let partitions: Vec<serde_json::Value> = s
        .ownership
        .read()
        .expect("ownership lock")
        .iter()
        .map(|(p, status)| {
            serde_json::json!({
                "partition": p,
                "lag": status.lag(),
                "next_offset": status.next_offset.load(Ordering::Relaxed),
                "stopped": status.stopped,
            })
        })
        .collect();
    let now = Instant::now();
    let totals = FlowHistory::totals(&s.telemetry.tier_changes);
    let (flows, covered) = s.telemetry.flows.since_baseline(now, &totals);
    body["generated_at"] = time::format_ms(time::now_ms()).into();
    body["instance"] = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "partitions": partitions,
    });
    body["flows"] = serde_json::json!({
        "seconds": covered.as_secs(),
        "between": flows.iter().map(|((from, to), count)| serde_json::json!({
            "from": from, "to": to, "count": count,
        })).collect::<Vec<_>>(),
    });
    body["recent_changes"] = s.telemetry.recent.latest().into();
    Ok(Json(body))
}
