//! Rank cut-offs over all partitions, exact and without sorting anyone.
//!
//! Each partition keeps its customers' ranked values in one sorted set per rank (written by
//! the same atomic commit as their state). The value at position k from the top of the whole
//! population is found by a binary search over values: `count_ge(v)` is the sum over the
//! partitions of `ZCOUNT rank v +inf` (O(log N) each), so one cut-off costs
//! O(P · log N · log(value range)) — about 50 rounds of P `ZCOUNT`s for money values —
//! however many customers there are. The search runs inside one Lua script per cut-off, so
//! the population and every count come from one consistent moment even while partitions keep
//! committing (a search spread over many round trips would mix moments and place customers
//! around the cut-off wrongly until the next computation). Mergeable histograms would be cheaper still but
//! approximate at the cut-off; an exact band was chosen (see docs/rules.md).

use super::keys::PartitionKeys;
use crate::rules::rank::{CutPoint, Cutoffs};
use crate::rules::Rules;
use redis::aio::ConnectionManager;

/// Customers ranked per rank, summed over the partitions.
///
/// # Errors
/// The Redis error.
pub async fn populations(
    conn: &mut ConnectionManager,
    partitions: &[PartitionKeys],
    rules: &Rules,
) -> Result<Vec<u64>, redis::RedisError> {
    let mut pipe = redis::pipe();
    for r in rules.ranks() {
        for p in partitions {
            pipe.zcard(p.rank(&r.name));
        }
    }
    let counts: Vec<u64> = pipe.query_async(conn).await?;
    Ok(counts
        .chunks(partitions.len().max(1))
        .map(|c| c.iter().sum())
        .collect())
}

static CUTOFF: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("lua/cutoff.lua")));

async fn count_ge(
    conn: &mut ConnectionManager,
    keys: &[String],
    v: i128,
) -> Result<u64, redis::RedisError> {
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.zcount(k, v.to_string(), "+inf");
    }
    let counts: Vec<u64> = pipe.query_async(conn).await?;
    Ok(counts.iter().sum())
}

/// Computes every cut-off of the rules over all partitions.
///
/// # Errors
/// The Redis error.
pub async fn compute(
    conn: &mut ConnectionManager,
    partitions: &[PartitionKeys],
    rules: &Rules,
) -> Result<Cutoffs, redis::RedisError> {
    let mut population = vec![0u64; rules.ranks().len()];
    let mut values = Vec::with_capacity(rules.cut_points().len());
    let mut at_or_above = Vec::with_capacity(rules.cut_points().len());
    for &CutPoint { rank, pct } in rules.cut_points() {
        let name = &rules.ranks()[rank].name;
        let keys: Vec<String> = partitions.iter().map(|p| p.rank(name)).collect();
        // One atomic script per cut-off: population, extremes and counts from one moment.
        let mut inv = CUTOFF.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        let reply: Vec<String> = inv
            .arg(pct.n.to_string())
            .arg(pct.d.to_string())
            .invoke_async(conn)
            .await?;
        let num = |i: usize| reply.get(i).and_then(|s| s.parse::<i128>().ok());
        let n = num(0).map_or(0, |n| u64::try_from(n).unwrap_or(0));
        population[rank] = population[rank].max(n);
        let (Some(kth), Some(at_kth), Some(k)) = (num(1), num(2), num(3)) else {
            values.push(None);
            at_or_above.push(0);
            continue;
        };
        let (at_kth, k) = (
            u64::try_from(at_kth).unwrap_or(0),
            u64::try_from(k).unwrap_or(0),
        );
        let value = crate::rules::rank::cutoff(kth, at_kth, k, rules.ranks()[rank].ties);
        values.push(Some(value));
        at_or_above.push(if value == kth {
            at_kth
        } else {
            count_ge(conn, &keys, value).await?
        });
    }
    Ok(Cutoffs {
        version: 0,
        rules: rules.version_hash(),
        population,
        values,
        at_or_above,
        computed_at: crate::domain::time::now_ms(),
    })
}
