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
//! around the cut-off wrongly until the next computation). On a Redis Cluster no script can
//! read every partition, and [`search_across_nodes`] runs the bisection here and verifies its
//! result per partition instead. Mergeable histograms would be cheaper still but
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
    /// Customers whose value is above `kth`, when the search read it with the other counts
    /// (the search across a cluster's nodes does; the script does not).
    pub above_kth: Option<u64>,
    /// Searches repeated before this one because their verification failed (across a
    /// cluster's nodes; 0 on one Redis).
    pub repeated: u32,
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
                above_kth: None,
                repeated: 0,
            })
        }
        _ => None,
    })
}

/// How many times a search across a cluster's nodes is repeated when its verification finds
/// the counts moved (see [`search_across_nodes`]) before the computation gives up for this
/// round (the cut-offs in force are kept; the next check computes again).
pub const VERIFY_ATTEMPTS: usize = 8;

/// The search of `lua/cutoff.lua` on a Redis Cluster, where one script cannot read every
/// partition's sorted set (they are in different slots, on different nodes).
///
/// The bisection runs here, each step asking every partition's count at once (one pipeline,
/// split by slot: a partition's count comes from its node). The steps are not one moment:
/// partitions commit between them, and a bisection over counts that change can end on a
/// value that is no cut-off at all (on a single Redis this once placed 3,475 of 1M customers
/// wrongly until the next computation; there the script makes it one moment). So its result
/// is **verified**: each partition's population, and its customers at and above the value,
/// are read in one transaction per partition (one slot, one moment of that partition), and
/// the value is kept only if it is exactly the k-th largest of the population those counts
/// describe: `above < k <= at_or_above` with `k = ceil(pct * population)`. That population is
/// each partition at one of its own committed states: the cut-off is exact for a cut of the
/// partitions (each a stream of its own, as Kafka orders them), never a mixture within one.
/// When the verification fails (a commit moved the counts around the value meanwhile) the
/// search is repeated, up to [`VERIFY_ATTEMPTS`] times; then the round fails with an error and
/// the cut-offs in force stay. Once the stream settles nothing moves and the first attempt
/// verifies: the cut-offs are exact, as on a single Redis.
///
/// # Errors
/// The Redis error; [`redis::ErrorKind::Client`] when no attempt verified; a value beyond
/// ±(2^53 − 1) or not whole is refused as the script refuses it.
pub async fn search_across_nodes<C: redis::aio::ConnectionLike + Clone>(
    conn: &mut C,
    keys: &[String],
    pct: crate::engine::rules::value::Ratio,
) -> Result<Option<Search>, redis::RedisError> {
    const EXACT: f64 = 9_007_199_254_740_991.0;
    let point = CutPoint { rank: 0, pct };
    for attempt in 0..VERIFY_ATTEMPTS {
        // The population and the extremes (each partition's lowest and highest value), each
        // partition's at one moment, all partitions at once.
        let firsts = per_partition(conn, keys, |pipe, key| {
            pipe.zcard(key)
                .zrange_withscores(key, 0, 0)
                .zrange_withscores(key, -1, -1);
        })
        .await?;
        let (mut population, mut bounds) = (0u64, None::<(f64, f64)>);
        for reply in firsts {
            let (card, first, last): (u64, Vec<Scored>, Vec<Scored>) =
                redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
            population += card;
            if let (Some((_, a)), Some((_, b))) = (first.first(), last.first()) {
                bounds = Some(match bounds {
                    None => (*a, *b),
                    Some((lo, hi)) => (lo.min(*a), hi.max(*b)),
                });
            }
        }
        let (lo, hi) = match bounds {
            None if population == 0 => return Ok(None),
            Some(bounds) if population > 0 => bounds,
            // Each partition's reply is one moment, so this cannot happen; read again.
            _ => continue,
        };
        if lo < -EXACT || hi > EXACT || lo.fract() != 0.0 || hi.fract() != 0.0 {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "ranked value beyond +-(2^53 - 1) or not whole in a rank sorted set",
                format!("{lo:.0} .. {hi:.0}"),
            )));
        }
        // Whole numbers within +-(2^53 - 1): exact as f64 and as i128.
        let (mut lo, mut hi) = (lo as i128, hi as i128);
        let k = point.k(population);
        // The largest v with count_ge(v) >= k (the script's bisection).
        while lo < hi {
            let mid = lo + (hi - lo + 1) / 2;
            if count_at_or_above(conn, keys, mid).await? >= k {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        // The verification: each partition's population and counts at one of its moments.
        let counts = per_partition(conn, keys, |pipe, key| {
            pipe.zcard(key).zcount(key, lo.to_string(), "+inf").zcount(
                key,
                (lo + 1).to_string(),
                "+inf",
            );
        })
        .await?;
        let (mut n, mut at_or_above, mut above) = (0u64, 0u64, 0u64);
        for reply in counts {
            let (card, ge, gt): (u64, u64, u64) =
                redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
            n += card;
            at_or_above += ge;
            above += gt;
        }
        let k = point.k(n);
        if n > 0 && above < k && k <= at_or_above {
            return Ok(Some(Search {
                population: n,
                k,
                kth: lo,
                at_or_above_kth: at_or_above,
                above_kth: Some(above),
                repeated: u32::try_from(attempt).unwrap_or(u32::MAX),
            }));
        }
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Client,
        UNVERIFIED,
        format!("{VERIFY_ATTEMPTS} attempts"),
    )))
}

const UNVERIFIED: &str = "rank cut-off search across the cluster's nodes: the counts moved around the value in every verification; the cut-offs in force are kept and computed again at the next check";

/// Whether `error` is [`search_across_nodes`]'s when no attempt verified.
pub fn unverified(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::Client && error.to_string().contains(UNVERIFIED)
}

/// A sorted-set member with its score, as `ZRANGE … WITHSCORES` returns it.
type Scored = (String, f64);

/// One transaction per key (so per partition: one slot, one moment of it) built by `build`,
/// all sent at once; each transaction's replies as one value.
async fn per_partition<C: redis::aio::ConnectionLike + Clone>(
    conn: &C,
    keys: &[String],
    build: impl Fn(&mut redis::Pipeline, &str),
) -> Result<Vec<redis::Value>, redis::RedisError> {
    let pipes: Vec<redis::Pipeline> = keys
        .iter()
        .map(|key| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            build(&mut pipe, key);
            pipe
        })
        .collect();
    futures::future::try_join_all(pipes.iter().map(|pipe| {
        let mut conn = conn.clone();
        async move { pipe.query_async::<redis::Value>(&mut conn).await }
    }))
    .await
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

/// Computes every cut-off of the rules over all partitions; also returns how many searches
/// were repeated (their verification failed, on a cluster).
///
/// # Errors
/// The Redis error.
pub async fn compute(
    conn: &mut Connection,
    partitions: &[PartitionKeys],
    rules: &Rules,
) -> Result<(Cutoffs, u64), redis::RedisError> {
    let mut repeated = 0u64;
    let mut population = vec![0u64; rules.ranks().len()];
    let mut values = Vec::with_capacity(rules.cut_points().len());
    let mut at_or_above = Vec::with_capacity(rules.cut_points().len());
    for &CutPoint { rank, pct } in rules.cut_points() {
        let name = &rules.ranks()[rank].name;
        let keys: Vec<String> = partitions.iter().map(|p| p.rank(name)).collect();
        // On one Redis, one atomic script per cut-off: population, extremes and counts from
        // one moment. On a cluster, verified per partition (see `search_across_nodes`).
        let found = if conn.is_cluster() {
            search_across_nodes(conn, &keys, pct).await?
        } else {
            search(conn, &keys, pct).await?
        };
        let Some(found) = found else {
            values.push(None);
            at_or_above.push(0);
            continue;
        };
        repeated += u64::from(found.repeated);
        population[rank] = population[rank].max(found.population);
        let value = crate::engine::rules::rank::cutoff(
            found.kth,
            found.at_or_above_kth,
            found.k,
            rules.ranks()[rank].ties,
        );
        values.push(Some(value));
        at_or_above.push(match found.above_kth {
            _ if value == found.kth => found.at_or_above_kth,
            // Ties to the lower band: the cut-off is one above the k-th value.
            Some(above) if value == found.kth + 1 => above,
            _ => count_at_or_above(conn, &keys, value).await?,
        });
    }
    let cutoffs = Cutoffs {
        version: 0,
        rules: rules.version_hash(),
        population,
        values,
        at_or_above,
        computed_at: crate::model::time::now_ms(),
    };
    Ok((cutoffs, repeated))
}

static PUBLISH_CUTOFFS: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("lua/publish_cutoffs.lua")));

/// What became of a publication of cut-offs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publication {
    /// Published under this version.
    Published(u64),
    /// Not published: another owner took partition 0.
    Fenced,
    /// Not published: the stored version is no longer the one the cut-offs were computed
    /// after (another publication came first: this one arrived late).
    Superseded,
}

/// Publishes rank cut-offs as the owner of partition 0 (`keys` are partition 0's) under a
/// version above both the stored one and `floor`, if the stored version is still `after` (the
/// one loaded before computing them; 0 for none).
///
/// # Errors
/// The Redis error.
pub async fn publish_cutoffs(
    conn: &mut Connection,
    keys: &PartitionKeys,
    epoch: i64,
    floor: u64,
    after: u64,
    cutoffs: &Cutoffs,
) -> Result<Publication, redis::RedisError> {
    let json = serde_json::to_string(cutoffs).expect("cut-offs serialize");
    let version: i64 = PUBLISH_CUTOFFS
        .key(&keys.meta)
        .key(&keys.cutoffs)
        .arg(epoch)
        .arg(json)
        .arg(floor)
        .arg(after)
        .invoke_async(conn)
        .await?;
    Ok(match version {
        -1 => Publication::Fenced,
        -2 => Publication::Superseded,
        v => Publication::Published(u64::try_from(v).unwrap_or_default()),
    })
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
