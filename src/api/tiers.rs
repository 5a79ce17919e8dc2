//! `GET /v1/tiers`: the pyramid — customers per tier, and the rank cut-offs in force.

use super::error::ApiError;
use super::ApiState;
use crate::model::time;
use crate::store::views;
use axum::extract::State;
use axum::Json;
use std::sync::Arc;

/// The handler: the rank cut-offs in force and the number of customers in each tier.
pub(super) async fn get(
    State(s): State<Arc<ApiState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    view(&s).await.map(Json)
}

/// The pyramid as `/v1/tiers` answers it (also part of `/v1/status`).
pub(super) async fn view(s: &ApiState) -> Result<serde_json::Value, ApiError> {
    let mut conn = s.redis.clone();
    // Both reads within one `api.redis_timeout_ms`.
    let (counts, cutoffs) = s
        .within(async {
            let counts = views::tier_sizes(&mut conn, &s.keyspace, s.partitions).await?;
            let cutoffs = match views::cutoffs(&mut conn, &s.keyspace).await {
                Ok(cutoffs) => cutoffs,
                // Redis unreachable: 503, as for the counts.
                Err(e)
                    if e.is_io_error()
                        || e.is_connection_dropped()
                        || e.is_connection_refusal()
                        || e.is_timeout() =>
                {
                    return Err(e)
                }
                // Cut-offs that cannot be read are shown as none.
                Err(_) => None,
            };
            Ok::<_, redis::RedisError>((counts, cutoffs))
        })
        .await?;
    let mut sizes = serde_json::Map::new();
    for t in s.rules.tiers() {
        let n: i64 = counts.get(&t.name).copied().unwrap_or(0);
        sizes.insert(t.name.clone(), n.into());
    }
    let cutoffs = cutoffs.filter(|c| c.rules == crate::model::state::rules_hash(s.rules.version()));
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
    Ok(serde_json::json!({
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
}
