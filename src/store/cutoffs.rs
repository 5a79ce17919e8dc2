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
use crate::engine::rules::rank::{CutPoint, Cutoffs};
use crate::engine::rules::Rules;
use crate::store::connection::Connection;

/// Customers ranked per rank, summed over the partitions.
///
/// # Errors
/// The Redis error.
pub async fn populations(
    conn: &mut Connection,
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

/// What one run of the cut-off script found, at one atomic moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Search {
    /// Customers ranked (over every partition).
    pub population: u64,
    /// The band's size by share: `ceil(pct · population)`, at least 1.
    pub k: u64,
    /// The value at position `k` from the top.
    pub kth: i128,
    /// Customers whose value is at least `kth` (more than `k` when tied at it).
    pub at_or_above_kth: u64,
}

/// Runs the cut-off search (`lua/cutoff.lua`) over one rank's sorted sets (`keys`, one per
/// partition) for a band of share `pct`; `None` when nobody is ranked.
///
/// # Errors
/// The Redis error.
pub async fn search<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &[String],
    pct: crate::engine::rules::value::Ratio,
) -> Result<Option<Search>, redis::RedisError> {
    let mut inv = CUTOFF.prepare_invoke();
    for k in keys {
        inv.key(k);
    }
    let reply: Vec<String> = inv
        .arg(pct.n.to_string())
        .arg(pct.d.to_string())
        .invoke_async(conn)
        .await?;
    let num = |i: usize| reply.get(i).and_then(|s| s.parse::<i128>().ok());
    let count = |i: usize| num(i).and_then(|n| u64::try_from(n).ok());
    Ok(match (count(0), num(1), count(2), count(3)) {
        (Some(population), Some(kth), Some(at_or_above_kth), Some(k)) if population > 0 => {
            Some(Search {
                population,
                k,
                kth,
                at_or_above_kth,
            })
        }
        _ => None,
    })
}

/// Customers whose value in one rank is at least `v`, over every partition.
///
/// # Errors
/// The Redis error.
pub async fn count_at_or_above<C: redis::aio::ConnectionLike>(
    conn: &mut C,
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
    conn: &mut Connection,
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
        let Some(found) = search(conn, &keys, pct).await? else {
            values.push(None);
            at_or_above.push(0);
            continue;
        };
        population[rank] = population[rank].max(found.population);
        let value = crate::engine::rules::rank::cutoff(
            found.kth,
            found.at_or_above_kth,
            found.k,
            rules.ranks()[rank].ties,
        );
        values.push(Some(value));
        at_or_above.push(if value == found.kth {
            found.at_or_above_kth
        } else {
            count_at_or_above(conn, &keys, value).await?
        });
    }
    Ok(Cutoffs {
        version: 0,
        rules: rules.version_hash(),
        population,
        values,
        at_or_above,
        computed_at: crate::model::time::now_ms(),
    })
}

static PUBLISH_CUTOFFS: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("lua/publish_cutoffs.lua")));

/// Publishes rank cut-offs as the owner of partition 0 (`keys` are partition 0's) under a
/// version above both the stored one and `floor`; returns the new version, `None` when fenced
/// (another owner took partition 0).
///
/// # Errors
/// The Redis error.
pub async fn publish_cutoffs(
    conn: &mut Connection,
    keys: &PartitionKeys,
    epoch: i64,
    floor: u64,
    cutoffs: &Cutoffs,
) -> Result<Option<u64>, redis::RedisError> {
    let json = serde_json::to_string(cutoffs).expect("cut-offs serialize");
    let version: i64 = PUBLISH_CUTOFFS
        .key(&keys.meta)
        .key(&keys.cutoffs)
        .arg(epoch)
        .arg(json)
        .arg(floor)
        .invoke_async(conn)
        .await?;
    Ok(u64::try_from(version).ok())
}

/// The cut-offs in force (partition 0's hash), with their version.
///
/// # Errors
/// The Redis error.
pub async fn load_cutoffs<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &PartitionKeys,
) -> Result<Option<Cutoffs>, redis::RedisError> {
    let (version, data): (Option<u64>, Option<String>) = redis::cmd("HMGET")
        .arg(&keys.cutoffs)
        .arg("version")
        .arg("data")
        .query_async(conn)
        .await?;
    Ok(parse_cutoffs(version, data.as_deref()))
}

/// The cut-offs from the `version` and `data` fields of their hash (`None` if either is
/// missing or the data unreadable).
pub fn parse_cutoffs(version: Option<u64>, data: Option<&str>) -> Option<Cutoffs> {
    let mut c = serde_json::from_str::<Cutoffs>(data?).ok()?;
    c.version = version?;
    Some(c)
}
