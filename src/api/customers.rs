//! `GET /v1/customers/{customer_id}`: the customer as `tierd rules explain` shows them — tier,
//! metrics, scores, the rule that placed them, their next time-driven move, rank positions.
//! `GET /v1/customers/{customer_id}/history`: their latest tier changes.

use super::error::ApiError;
use super::ApiState;
use crate::model::time;
use crate::store::views;
use axum::extract::{Path, State};
use axum::Json;
use std::sync::Arc;

/// An id the input contract refuses.
fn check_id(customer_id: &str) -> Result<(), ApiError> {
    if customer_id.is_empty() || customer_id.chars().count() > crate::ingest::decode::MAX_ID_CHARS {
        return Err(ApiError::InvalidId(
            "customer_id must be 1..=128 characters".into(),
        ));
    }
    Ok(())
}

/// The handler.
pub(super) async fn get(
    State(s): State<Arc<ApiState>>,
    Path(customer_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_id(&customer_id)?;
    // Wall mode: as of now. Event mode: as of the customer's own engine time (the wall clock
    // would decay a replayed history that event time has not reached).
    let now = if s.wall_clock {
        time::now_ms()
    } else {
        i64::MIN
    };
    let mut conn = s.redis.clone();
    s.within(views::explained_customer(
        &mut conn,
        &s.keyspace,
        s.partitions,
        &s.rules,
        &s.money,
        now,
        &customer_id,
    ))
    .await?
    .map(Json)
    .ok_or_else(|| ApiError::NotFound(format!("no customer {customer_id:?}")))
}

/// The history handler: the tier changes the customer's state keeps (at most
/// `api.history_changes`), newest first, each with the id and fields of the change event
/// published for it.
pub(super) async fn history(
    State(s): State<Arc<ApiState>>,
    Path(customer_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_id(&customer_id)?;
    let mut conn = s.redis.clone();
    let (partition, state, _) = s
        .within(views::find_customer(
            &mut conn,
            &s.keyspace,
            s.partitions,
            &customer_id,
            false,
        ))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no customer {customer_id:?}")))?;
    let changes: Vec<serde_json::Value> = state
        .history
        .iter()
        .rev()
        // A list written under a larger setting is trimmed at the customer's next write.
        .take(s.history_changes)
        .map(|step| {
            serde_json::json!({
                "event_id": crate::model::change::change_id(&customer_id, state.origin, step.seq),
                "sequence": step.seq,
                "occurred_at": time::format_ms(step.at),
                "previous_tier": step.previous,
                "tier": step.tier,
                "direction": step.direction,
                "reason": step.reason,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "customer_id": customer_id,
        "partition": partition,
        "kept": s.history_changes,
        "changes": changes,
    })))
}
