//! Read-only views of the stored state, shared by the HTTP API and the operator tools so that
//! both show the same thing: a customer found across partitions, their exact rank positions,
//! the cut-offs in force, tier sizes, and a paged scan of every stored customer.

use super::connection::Connection;
use super::keys::{Keyspace, PartitionKeys};
use super::scan::{self, ScanCursor};
use crate::engine::rules::rank::Cutoffs;
use crate::engine::rules::Rules;
use crate::model::CustomerState;
use crate::telemetry::PartitionGauges;
use redis::aio::ConnectionLike;
use std::collections::HashMap;

/// Why a view could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// Redis refused or was unreachable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored state is unreadable.
    #[error("stored state {key:?} is corrupt: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// The parser's message.
        message: String,
    },
}

/// A customer's place in one rank, over all partitions.
#[derive(Debug, Clone, PartialEq)]
pub struct RankPosition {
    /// The rank's name.
    pub rank: String,
    /// 1 + the customers strictly above.
    pub position: u64,
    /// Everyone ranked.
    pub population: u64,
    /// `position / population` in percent, two decimals (none for an empty population).
    pub top_percent: Option<f64>,
}

impl RankPosition {
    /// The position of a customer with `above` customers strictly above them, among
    /// `population`: the one formula the API, the tools and the tier-change events share.
    pub fn new(rank: &str, above: u64, population: u64) -> Self {
        Self {
            rank: rank.to_owned(),
            position: above + 1,
            population,
            top_percent: (population > 0)
                .then(|| ((above + 1) as f64 * 10_000.0 / population as f64).round() / 100.0),
        }
    }

    /// Writes `position`, `population` and `top_percent` into a rank's JSON entry.
    pub fn write_to(&self, entry: &mut serde_json::Value) {
        entry["position"] = self.position.into();
        entry["population"] = self.population.into();
        if let Some(top) = self.top_percent {
            entry["top_percent"] = top.into();
        }
    }
}

/// Finds a customer in whichever partition holds them: `(partition, state)`, with the
/// cut-offs in force when `with_cutoffs` (default ones if none were published). The partition
/// depends on the producer's partitioner, so every partition is asked at once: one round trip,
/// a GET per partition (and the cut-offs' HMGET) in one pipeline.
///
/// # Errors
/// [`ViewError`].
pub async fn find_customer<C: ConnectionLike>(
    conn: &mut C,
    keyspace: &Keyspace,
    partitions: i32,
    customer_id: &str,
    with_cutoffs: bool,
) -> Result<Option<(i32, CustomerState, Cutoffs)>, ViewError> {
    let mut pipe = redis::pipe();
    for p in 0..partitions {
        pipe.get(keyspace.customer(p, customer_id));
    }
    if with_cutoffs {
        pipe.cmd("HMGET")
            .arg(keyspace.cutoffs())
            .arg("version")
            .arg("data");
    }
    let mut replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let cutoffs = if with_cutoffs {
        let (version, data): (Option<u64>, Option<String>) =
            redis::from_redis_value_ref(&replies.pop().unwrap_or(redis::Value::Nil))
                .map_err(redis::RedisError::from)?;
        super::cutoffs::parse_cutoffs(version, data.as_deref())
    } else {
        None
    };
    for (p, reply) in replies.into_iter().enumerate() {
        let Some(bytes) = redis::from_redis_value_ref::<Option<Vec<u8>>>(&reply)
            .map_err(redis::RedisError::from)?
        else {
            continue;
        };
        let p = i32::try_from(p).unwrap_or(0);
        let state = crate::model::stored::decode(&bytes).map_err(|e| ViewError::Corrupt {
            key: keyspace.customer(p, customer_id),
            message: e.to_string(),
        })?;
        return Ok(Some((p, state, cutoffs.unwrap_or_default())));
    }
    Ok(None)
}

/// The customer's exact position in each rank they are ranked in: customers strictly above
/// (`ZCOUNT (value +inf`) plus one, summed over every partition's sorted set.
///
/// # Errors
/// Redis errors.
pub async fn rank_positions<C: ConnectionLike>(
    conn: &mut C,
    keyspace: &Keyspace,
    partitions: i32,
    rules: &Rules,
    state: &CustomerState,
) -> Result<Vec<RankPosition>, redis::RedisError> {
    let mut out = Vec::new();
    for (r, rank) in rules.ranks().iter().enumerate() {
        let Some(Some(value)) = state.ranked_values.get(r) else {
            continue;
        };
        let mut pipe = redis::pipe();
        for p in 0..partitions {
            let key = keyspace.rank(p, &rank.name);
            pipe.zcount(&key, format!("({value}"), "+inf").zcard(&key);
        }
        let counts: Vec<u64> = pipe.query_async(conn).await?;
        let above: u64 = counts.iter().step_by(2).sum();
        let population: u64 = counts.iter().skip(1).step_by(2).sum();
        out.push(RankPosition::new(&rank.name, above, population));
    }
    Ok(out)
}

/// The cut-offs in force (partition 0's hash), with their version; `None` before the first
/// publication.
///
/// # Errors
/// Redis errors.
pub async fn cutoffs<C: ConnectionLike>(
    conn: &mut C,
    keyspace: &Keyspace,
) -> Result<Option<Cutoffs>, redis::RedisError> {
    super::cutoffs::load_cutoffs(conn, &keyspace.partition(0)).await
}

/// Customers per tier name, summed over partitions.
///
/// # Errors
/// Redis errors.
pub async fn tier_sizes<C: ConnectionLike>(
    conn: &mut C,
    keyspace: &Keyspace,
    partitions: i32,
) -> Result<HashMap<String, i64>, redis::RedisError> {
    let mut pipe = redis::pipe();
    for p in 0..partitions {
        pipe.hgetall(keyspace.partition(p).tier_counts);
    }
    let counts: Vec<HashMap<String, i64>> = pipe.query_async(conn).await?;
    let mut sizes = HashMap::new();
    for m in counts {
        for (tier, n) in m {
            *sizes.entry(tier).or_insert(0) += n;
        }
    }
    Ok(sizes)
}

/// Customers per tier and pending timers of each of `partitions` (for `/metrics`), in one
/// pipeline.
///
/// # Errors
/// Redis errors.
pub async fn partition_gauges<C: ConnectionLike>(
    conn: &mut C,
    keyspace: &Keyspace,
    partitions: &[i32],
) -> Result<Vec<PartitionGauges>, redis::RedisError> {
    if partitions.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    let keys: Vec<PartitionKeys> = partitions.iter().map(|&p| keyspace.partition(p)).collect();
    for k in &keys {
        pipe.hgetall(&k.tier_counts);
    }
    for k in &keys {
        pipe.zcard(&k.timers);
    }
    let read: Vec<redis::Value> = pipe.query_async(conn).await?;
    let (tiers, timers) = read.split_at(partitions.len().min(read.len()));
    partitions
        .iter()
        .zip(tiers.iter().zip(timers))
        .map(|(&partition, (tiers, timers))| {
            Ok(PartitionGauges {
                partition,
                tiers: redis::from_redis_value_ref(tiers).map_err(redis::RedisError::from)?,
                timers: redis::from_redis_value_ref(timers).map_err(redis::RedisError::from)?,
            })
        })
        .collect()
}

/// How many partitions have stored state (numbered from 0: meta keys are probed in chunks
/// until a chunk has none).
///
/// # Errors
/// Redis errors.
pub async fn stored_partitions<C: ConnectionLike>(
    conn: &mut C,
    keyspace: &Keyspace,
) -> Result<i32, redis::RedisError> {
    let mut partitions = 0;
    let chunk = 256;
    loop {
        let mut pipe = redis::pipe();
        for p in partitions..partitions + chunk {
            pipe.exists(keyspace.partition(p).meta);
        }
        let found: Vec<bool> = pipe.query_async(conn).await?;
        match found.iter().rposition(|f| *f) {
            Some(last) => partitions += i32::try_from(last).unwrap_or(0) + 1,
            None => return Ok(partitions),
        }
        if found.iter().any(|f| !f) {
            return Ok(partitions);
        }
    }
}

/// Whether each `(partition, customer_id)` has a stored state (one pipeline of `EXISTS`).
///
/// # Errors
/// Redis errors.
pub async fn customers_exist<'a, C: ConnectionLike>(
    conn: &mut C,
    keyspace: &Keyspace,
    customers: impl Iterator<Item = (i32, &'a str)>,
) -> Result<Vec<bool>, redis::RedisError> {
    let mut pipe = redis::pipe();
    let mut n = 0;
    for (partition, customer_id) in customers {
        pipe.exists(keyspace.customer(partition, customer_id));
        n += 1;
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    pipe.query_async(conn).await
}

/// The next offset to apply stored for each of partitions `0..partitions` (none for a
/// partition never claimed).
///
/// # Errors
/// Redis errors.
pub async fn stored_offsets<C: ConnectionLike>(
    conn: &mut C,
    keyspace: &Keyspace,
    partitions: i32,
) -> Result<Vec<Option<i64>>, redis::RedisError> {
    let mut pipe = redis::pipe();
    for p in 0..partitions {
        pipe.hget(keyspace.partition(p).meta, "next_offset");
    }
    let stored: Vec<Option<i64>> = pipe.query_async(conn).await?;
    Ok(stored.into_iter().map(|o| o.filter(|&o| o >= 0)).collect())
}

/// One page of a scan of a partition's stored customers ([`scan::customer_keys`]): where the
/// next page starts (`None` when the scan is complete) and the `(customer_id, state)` pairs
/// found (a customer may be found again on a later page).
///
/// # Errors
/// [`ViewError`].
pub async fn scan_customers(
    conn: &mut Connection,
    keys: &PartitionKeys,
    at: &ScanCursor,
    page: usize,
) -> Result<(Option<ScanCursor>, Vec<(String, CustomerState)>), ViewError> {
    let found = scan::customer_keys(conn, keys, at, page).await?;
    let (next, found) = (found.next, found.keys);
    let mut out = Vec::with_capacity(found.len());
    if !found.is_empty() {
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&found).query_async(conn).await?;
        for (key, value) in found.iter().zip(values) {
            let (Some(id), Some(bytes)) = (keys.customer_id(key), value) else {
                continue;
            };
            let state = crate::model::stored::decode(&bytes).map_err(|e| ViewError::Corrupt {
                key: key.clone(),
                message: e.to_string(),
            })?;
            out.push((id.to_owned(), state));
        }
    }
    Ok((next, out))
}

/// The customer as the API serves it and `tierd rules explain` prints it: the explanation of
/// their placement (metrics, scores, rule, next move) under the cut-offs in force, their
/// partition, and their exact position in each rank.
///
/// # Errors
/// [`ViewError`].
pub async fn explained_customer<C: ConnectionLike>(
    conn: &mut C,
    keyspace: &Keyspace,
    partitions: i32,
    rules: &Rules,
    money: &crate::model::change::MoneyFormat,
    now: i64,
    customer_id: &str,
) -> Result<Option<serde_json::Value>, ViewError> {
    // Rules without ranks evaluate without cut-offs.
    let with_cutoffs = !rules.ranks().is_empty();
    let Some((partition, state, cutoffs)) =
        find_customer(conn, keyspace, partitions, customer_id, with_cutoffs).await?
    else {
        return Ok(None);
    };
    let view = crate::engine::explain::explain(customer_id, &state, rules, money, now, &cutoffs);
    let mut body = serde_json::to_value(view).unwrap_or_default();
    body["partition"] = partition.into();
    for pos in rank_positions(conn, keyspace, partitions, rules, &state).await? {
        pos.write_to(&mut body["ranks"][pos.rank.as_str()]);
    }
    Ok(Some(body))
}

/// Whether Redis answers (readiness).
///
/// # Errors
/// Redis errors.
pub async fn ping<C: ConnectionLike>(conn: &mut C) -> Result<(), redis::RedisError> {
    redis::cmd("PING")
        .query_async::<String>(conn)
        .await
        .map(drop)
}
