//! Rank cut-offs over all partitions, exact and without sorting anyone.
//!
//! Each partition keeps its customers' ranked values in one sorted set per rank (written by
//! the same atomic commit as their state). The value at position k from the top of the whole
//! population is found by a binary search over values: `count_ge(v)` is the sum over the
//! partitions of `ZCOUNT rank v +inf` (O(log N) each), so one cut-off costs
//! O(P · log N · log(value range)) — about 50 rounds of P pipelined `ZCOUNT`s for money
//! values — however many customers there are. Mergeable histograms would be cheaper still but
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

async fn extreme(
    conn: &mut ConnectionManager,
    keys: &[String],
    index: i64,
) -> Result<Vec<i128>, redis::RedisError> {
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.cmd("ZRANGE")
            .arg(k)
            .arg(index)
            .arg(index)
            .arg("WITHSCORES");
    }
    let found: Vec<Vec<(String, f64)>> = pipe.query_async(conn).await?;
    Ok(found
        .into_iter()
        .flatten()
        .map(|(_, s)| s as i128)
        .collect())
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
    let population = populations(conn, partitions, rules).await?;
    let mut values = Vec::with_capacity(rules.cut_points().len());
    let mut at_or_above = Vec::with_capacity(rules.cut_points().len());
    for &CutPoint { rank, pct } in rules.cut_points() {
        let name = &rules.ranks()[rank].name;
        let keys: Vec<String> = partitions.iter().map(|p| p.rank(name)).collect();
        let n = population[rank];
        if n == 0 {
            values.push(None);
            at_or_above.push(0);
            continue;
        }
        let lows = extreme(conn, &keys, 0).await?;
        let highs = extreme(conn, &keys, -1).await?;
        let (mut lo, mut hi) = (
            lows.into_iter().min().unwrap_or(0),
            highs.into_iter().max().unwrap_or(0),
        );
        let k = CutPoint { rank, pct }.k(n);
        // Binary search for the largest v with count_ge(v) >= k (see rank::kth_largest).
        while lo < hi {
            let mid = lo + (hi - lo + 1) / 2;
            if count_ge(conn, &keys, mid).await? >= k {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let at_kth = count_ge(conn, &keys, lo).await?;
        let value = crate::rules::rank::cutoff(lo, at_kth, k, rules.ranks()[rank].ties);
        values.push(Some(value));
        at_or_above.push(if value == lo {
            at_kth
        } else {
            count_ge(conn, &keys, value).await?
        });
    }
    Ok(Cutoffs {
        version: 0,
        rules: crate::domain::state::rules_hash(rules.version()),
        population,
        values,
        at_or_above,
        computed_at: crate::domain::time::now_ms(),
    })
}
