//! The status page: `GET /status` is a self-contained HTML page (no external assets, no data
//! in it) that shows what `GET /v1/status` answers — the pyramid, the rank cut-offs and rules
//! version (from Redis: every instance's customers), every input partition's lag (its stored
//! offset against its log end, whoever owns it), and this instance's partitions, the flows
//! between tiers it decided over the last hour and its latest tier changes.
//! `/v1/status` holds customer data and so needs the bearer token like every `/v1/…` route;
//! the page takes it from the URL's fragment (`/status#token=…`, never sent to a server or
//! logged) or asks for it, and refreshes every 5 s.

use super::error::ApiError;
use super::ApiState;
use crate::model::time;
use crate::store::views;
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
    let recent = s.telemetry.recent.latest();
    // Both Redis reads within one `api.redis_timeout_ms`.
    let (mut body, stored, present) = s
        .within(async {
            let body = super::tiers::view(&s).await?;
            let mut conn = s.redis.clone();
            let stored = views::stored_offsets(&mut conn, &s.keyspace, s.partitions).await?;
            // Customers erased since (on whichever instance): their changes are not shown.
            let present = views::customers_exist(
                &mut conn,
                &s.keyspace,
                recent
                    .iter()
                    .map(|(p, c)| (*p, c["customer_id"].as_str().unwrap_or_default())),
            )
            .await?;
            Ok::<_, ApiError>((body, stored, present))
        })
        .await?;
    let (ends_at, ends) = s
        .log_ends
        .latest()
        .map_or((None, Vec::new()), |(at, ends)| (Some(at), ends));
    let input: Vec<serde_json::Value> = stored
        .iter()
        .enumerate()
        .map(|(p, next)| {
            let end = ends.get(p).copied().flatten();
            serde_json::json!({
                "partition": p,
                "next_offset": next,
                "log_end": end,
                // The log end is read every few seconds: never below 0 meanwhile.
                "lag": end.map(|end| (end - next.unwrap_or(0)).max(0)),
            })
        })
        .collect();
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
    body["input"] = serde_json::json!({
        "log_ends_at": ends_at.map(|at| time::format_ms(
            i64::try_from(at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(i64::MAX)
        )),
        "partitions": input,
    });
    body["flows"] = serde_json::json!({
        "seconds": covered.as_secs(),
        "between": flows.iter().map(|((from, to), count)| serde_json::json!({
            "from": from, "to": to, "count": count,
        })).collect::<Vec<_>>(),
    });
    body["recent_changes"] = recent
        .into_iter()
        .zip(present)
        .filter_map(|((_, change), present)| present.then_some(change))
        .collect::<Vec<_>>()
        .into();
    Ok(Json(body))
}
