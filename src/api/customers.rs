//! `GET /v1/customers/{customer_id}`: the customer as `tierd rules explain` shows them — tier,
//! metrics, scores, the rule that placed them, their next time-driven move, rank positions.

use super::error::ApiError;
use super::ApiState;
use crate::model::time;
use crate::store::views;
use axum::extract::{Path, State};
use axum::Json;
use std::sync::Arc;

/// The handler.
pub(super) async fn get(
    State(s): State<Arc<ApiState>>,
    Path(customer_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if customer_id.is_empty() || customer_id.chars().count() > crate::ingest::decode::MAX_ID_CHARS {
        return Err(ApiError::InvalidId(
            "customer_id must be 1..=128 characters".into(),
        ));
    }
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
