//! The Redis side of one partition: claim ownership, load customer states, commit a batch,
//! list due timers and scan customers — as free functions (one call each) and as a
//! [`PartitionStore`], the owner's handle that retries every call it cannot do without.

use super::keys::PartitionKeys;
use super::retry::Backoff;
use crate::engine::rules::rank::Cutoffs;
use crate::model::CustomerState;
use crate::store::outbox::OutboxEntry;
use crate::telemetry::{events, Telemetry};
use redis::aio::ConnectionManager;
use std::sync::LazyLock;

static COMMIT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/commit.lua")));
static CLAIM: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/claim.lua")));
static PUBLISH_CUTOFFS: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/publish_cutoffs.lua")));

/// Why a partition batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Another consumer claimed the partition after us: stop, do not retry.
    #[error("partition {partition} fenced: our epoch {ours}, stored epoch {stored}")]
    Fenced {
        partition: i32,
        ours: i64,
        stored: String,
    },
    /// Redis does not hold the offset this owner committed last (lost writes, a restored
    /// backup) or the batch overlaps it: drop the cache, claim again and seek to `stored`.
    #[error("partition {partition}: stored next offset {stored}, expected {expected}")]
    Diverged {
        partition: i32,
        stored: i64,
        expected: i64,
    },
    /// A stored customer state is not valid JSON: data corruption, stop the partition.
    #[error("partition {partition}: stored state of {key} is corrupt: {error}")]
    CorruptState {
        partition: i32,
        key: String,
        error: String,
    },
    /// Redis was unreachable or refused the call: retry with backoff.
    #[error("redis call failed: {0}")]
    Redis(#[from] redis::RedisError),
}

impl ApplyError {
    /// Whether retrying the same call may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Redis(_))
    }
}

/// The result of a successful commit call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Written now; the outbox holds this many entries.
    Applied { outbox_len: u64 },
    /// Already applied by an earlier call of ours whose reply was lost.
    AlreadyApplied,
}

/// Where a claimed partition resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Our fencing epoch.
    pub epoch: i64,
    /// The next offset to apply, `None` if nothing was ever applied.
    pub next_offset: Option<i64>,
    /// Commits stored so far (event batches and fired timers).
    pub commits: i64,
    /// The partition's event-time clock (`clock.mode = "event"`), if one was stored.
    pub clock: Option<i64>,
    /// Hash of the rules version whose sweep completed on this partition.
    pub swept_rules: Option<u32>,
    /// The rank cut-offs this partition last finished applying.
    pub cutoffs: Option<Cutoffs>,
}

/// Claims `keys`' partition synchronously (used in the rebalance callback, which runs on the
/// consumer thread).
///
/// # Errors
/// The Redis error.
pub fn claim(
    conn: &mut redis::Connection,
    keys: &PartitionKeys,
) -> Result<Claim, redis::RedisError> {
    let (epoch, next, commits, clock, rules, cutoffs): (i64, i64, i64, String, String, String) =
        CLAIM.key(&keys.meta).invoke(conn)?;
    Ok(Claim {
        epoch,
        next_offset: (next >= 0).then_some(next),
        commits,
        clock: clock.parse().ok(),
        swept_rules: rules.parse().ok(),
        cutoffs: serde_json::from_str(&cutoffs).ok(),
    })
}

/// Loads customer states by key with one MGET (all keys share the partition's slot).
///
/// # Errors
/// [`ApplyError::Redis`] or [`ApplyError::CorruptState`].
pub async fn load(
    conn: &mut ConnectionManager,
    partition: i32,
    keys: &[String],
) -> Result<Vec<Option<CustomerState>>, ApplyError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(keys).query_async(conn).await?;
    raw.into_iter()
        .zip(keys)
        .map(|(v, key)| {
            v.map(|bytes| serde_json::from_slice(&bytes))
                .transpose()
                .map_err(|e| ApplyError::CorruptState {
                    partition,
                    key: key.clone(),
                    error: e.to_string(),
                })
        })
        .collect()
}

/// Everything one batch writes.
#[derive(Debug, Default)]
pub struct CommitBatch {
    /// The next offset the owner believes is stored (its last commit's end, or the claimed
    /// offset; -1 if nothing was ever applied).
    pub expected_offset: i64,
    /// First offset of the batch.
    pub first_offset: i64,
    /// One past the last offset of the batch (equal to `first_offset` for fired timers only).
    pub end_offset: i64,
    /// Commits the owner believes are stored (its claim's count plus its own commits).
    pub expected_commits: i64,
    /// The partition's event-time clock after this commit, if it is tracked.
    pub clock: Option<i64>,
    /// The rules version hash whose sweep this commit completes.
    pub swept_rules: Option<u32>,
    /// Outbox entries in order.
    pub outbox: Vec<OutboxEntry>,
    /// Sorted-set upserts: (set, score, member).
    pub zadd: Vec<(SortedSet, i128, String)>,
    /// Sorted-set removals: (set, member).
    pub zrem: Vec<(SortedSet, String)>,
    /// Tier population deltas of this partition: (tier, delta).
    pub tier_deltas: Vec<(String, i64)>,
    /// Rank cut-offs this commit finishes applying.
    pub applied_cutoffs: Option<String>,
    /// Customer states to write: (key, JSON).
    pub states: Vec<(String, Vec<u8>)>,
}

/// One of a partition's sorted sets, each keyed by customer id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortedSet {
    /// The timer index: score = the customer's next due time (ms).
    Timers,
    /// Rank `r` of the rules (in the rules' rank order): score = the customer's ranked value.
    Rank(usize),
}

impl SortedSet {
    /// Its 1-based position among the commit script's `KEYS` (meta, outbox, tier counts, then
    /// the timer index and the rank sets).
    fn key_index(self) -> usize {
        match self {
            Self::Timers => 4,
            Self::Rank(r) => 5 + r,
        }
    }
}

/// Publishes rank cut-offs as the owner of partition 0 (`keys` are partition 0's); returns
/// the new version, `None` when fenced (another owner took partition 0).
///
/// # Errors
/// The Redis error.
pub async fn publish_cutoffs(
    conn: &mut ConnectionManager,
    keys: &PartitionKeys,
    epoch: i64,
    cutoffs: &Cutoffs,
) -> Result<Option<u64>, redis::RedisError> {
    let json = serde_json::to_string(cutoffs).expect("cut-offs serialize");
    let version: i64 = PUBLISH_CUTOFFS
        .key(&keys.meta)
        .key(&keys.cutoffs)
        .arg(epoch)
        .arg(json)
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
    Ok(match (version, data) {
        (Some(v), Some(d)) => serde_json::from_str::<Cutoffs>(&d).ok().map(|mut c| {
            c.version = v;
            c
        }),
        _ => None,
    })
}

/// Commits a batch atomically, fenced by `epoch` and the stored next offset. `rank_keys` are
/// the partition's rank sorted sets, in the rules' rank order.
///
/// # Errors
/// [`ApplyError::Fenced`] (stop the partition), [`ApplyError::Diverged`] (reload) or
/// [`ApplyError::Redis`] (retry: the call is idempotent).
pub async fn commit(
    conn: &mut ConnectionManager,
    keys: &PartitionKeys,
    rank_keys: &[String],
    partition: i32,
    epoch: i64,
    batch: &CommitBatch,
) -> Result<Committed, ApplyError> {
    let mut inv = COMMIT.prepare_invoke();
    inv.key(&keys.meta)
        .key(&keys.outbox)
        .key(&keys.tier_counts)
        .key(&keys.timers);
    for k in rank_keys {
        inv.key(k);
    }
    let first_state = 5 + rank_keys.len();
    for (k, _) in &batch.states {
        inv.key(k);
    }
    inv.arg(epoch)
        .arg(batch.expected_offset)
        .arg(batch.first_offset)
        .arg(batch.end_offset)
        .arg(batch.expected_commits)
        .arg(batch.clock.map(|c| c.to_string()).unwrap_or_default())
        .arg(batch.swept_rules.map(|c| c.to_string()).unwrap_or_default())
        .arg(batch.applied_cutoffs.clone().unwrap_or_default())
        .arg(first_state);
    inv.arg(batch.outbox.len());
    for e in &batch.outbox {
        inv.arg(e.kind.code())
            .arg(&e.key)
            .arg(&e.value)
            .arg(&e.headers);
    }
    inv.arg(batch.zadd.len());
    for (set, score, member) in &batch.zadd {
        inv.arg(set.key_index()).arg(score.to_string()).arg(member);
    }
    inv.arg(batch.zrem.len());
    for (set, member) in &batch.zrem {
        inv.arg(set.key_index()).arg(member);
    }
    inv.arg(batch.tier_deltas.len());
    for (tier, delta) in &batch.tier_deltas {
        inv.arg(tier).arg(*delta);
    }
    for (_, v) in &batch.states {
        inv.arg(v);
    }
    let reply: Vec<String> = inv.invoke_async(conn).await?;
    let num = |i: usize| {
        reply
            .get(i)
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(-1)
    };
    match reply.first().map(String::as_str) {
        Some("OK") => Ok(Committed::Applied {
            outbox_len: u64::try_from(num(2)).unwrap_or(0),
        }),
        Some("ALREADY") => Ok(Committed::AlreadyApplied),
        Some("FENCED") => Err(ApplyError::Fenced {
            partition,
            ours: epoch,
            stored: reply.get(1).cloned().unwrap_or_default(),
        }),
        Some("DIVERGED") => Err(ApplyError::Diverged {
            partition,
            stored: num(1),
            expected: batch.expected_offset,
        }),
        _ => Err(ApplyError::Redis(redis::RedisError::from((
            redis::ErrorKind::TypeError,
            "unexpected commit script reply",
            format!("{reply:?}"),
        )))),
    }
}

/// Evaluates `$call` (a `Result<_, ApplyError>`) until it succeeds or fails for a reason
/// retrying cannot fix, backing off in between. (A macro rather than a function taking an
/// async closure: futures of async closures over borrowed connections are not provably `Send`
/// yet, and the runner's future must be.)
macro_rules! retrying {
    ($store:expr, $call:expr) => {{
        let mut backoff = Backoff::default();
        loop {
            let result: Result<_, ApplyError> = $call;
            match result {
                Err(error) if error.is_retriable() => $store.failed(&mut backoff, &error).await,
                other => break other,
            }
        }
    }};
}

/// A partition's store as its owner uses it: every call is retried with [`Backoff`] while
/// Redis fails (a batch is never skipped); fencing, divergence and corrupt states are returned
/// at once.
pub struct PartitionStore {
    conn: ConnectionManager,
    keys: PartitionKeys,
    rank_keys: Vec<String>,
    partition: i32,
    epoch: i64,
    telemetry: Telemetry,
}

impl PartitionStore {
    /// The store of `partition`, claimed with `epoch`; `rank_keys` are its rank sorted sets in
    /// the rules' rank order.
    pub fn new(
        conn: ConnectionManager,
        keys: PartitionKeys,
        rank_keys: Vec<String>,
        partition: i32,
        epoch: i64,
        telemetry: Telemetry,
    ) -> Self {
        Self {
            conn,
            keys,
            rank_keys,
            partition,
            epoch,
            telemetry,
        }
    }

    /// The partition's keys.
    pub fn keys(&self) -> &PartitionKeys {
        &self.keys
    }

    /// The partition's rank sorted sets, in the rules' rank order.
    pub fn rank_keys(&self) -> &[String] {
        &self.rank_keys
    }

    /// A connection for calls the owner makes once and retries at its own pace (cut-off duty).
    pub fn connection(&mut self) -> &mut ConnectionManager {
        &mut self.conn
    }

    /// Records a failed call and waits before it is retried.
    pub async fn failed(&self, backoff: &mut Backoff, error: &(dyn std::fmt::Display + Sync)) {
        events::RedisCallFailed {
            partition: self.partition,
            error,
        }
        .emit(&self.telemetry);
        backoff.wait().await;
    }

    /// Loads the states of `ids` (`None`: not stored).
    ///
    /// # Errors
    /// [`ApplyError::CorruptState`].
    pub async fn load(&mut self, ids: &[String]) -> Result<Vec<Option<CustomerState>>, ApplyError> {
        let keys: Vec<String> = ids.iter().map(|id| self.keys.customer(id)).collect();
        let partition = self.partition;
        retrying!(self, load(&mut self.conn, partition, &keys).await)
    }

    /// Commits a batch, fenced by this owner's epoch. Retrying is safe: the script recognises
    /// a commit that an earlier call applied although its reply was lost.
    ///
    /// # Errors
    /// [`ApplyError::Fenced`] or [`ApplyError::Diverged`].
    pub async fn commit(&mut self, batch: &CommitBatch) -> Result<Committed, ApplyError> {
        let (partition, epoch) = (self.partition, self.epoch);
        retrying!(
            self,
            commit(
                &mut self.conn,
                &self.keys,
                &self.rank_keys,
                partition,
                epoch,
                batch
            )
            .await
        )
    }

    /// Up to `limit` timers due at or before `upto`, earliest first: `(customer_id, due)`.
    ///
    /// # Errors
    /// None in practice (Redis errors are retried); the type is shared with the other calls.
    pub async fn due_timers(
        &mut self,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, ApplyError> {
        retrying!(self, {
            redis::cmd("ZRANGE")
                .arg(&self.keys.timers)
                .arg("-inf")
                .arg(upto)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .arg("WITHSCORES")
                .query_async(&mut self.conn)
                .await
                .map_err(ApplyError::from)
        })
    }

    /// The earliest due time in the timer index.
    ///
    /// # Errors
    /// None in practice (Redis errors are retried).
    pub async fn earliest_timer(&mut self) -> Result<Option<i64>, ApplyError> {
        let first: Vec<(String, i64)> = retrying!(self, {
            redis::cmd("ZRANGE")
                .arg(&self.keys.timers)
                .arg(0)
                .arg(0)
                .arg("WITHSCORES")
                .query_async(&mut self.conn)
                .await
                .map_err(ApplyError::from)
        })?;
        Ok(first.first().map(|(_, due)| *due))
    }

    /// One SCAN step over the partition's customer keys: the next cursor (0 when done) and
    /// the customer ids found.
    ///
    /// # Errors
    /// None in practice (Redis errors are retried).
    pub async fn scan_customer_ids(
        &mut self,
        cursor: u64,
        count: u64,
    ) -> Result<(u64, Vec<String>), ApplyError> {
        let pattern = self.keys.customer_pattern();
        let (next, found): (u64, Vec<String>) = retrying!(self, {
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut self.conn)
                .await
                .map_err(ApplyError::from)
        })?;
        let ids = found
            .iter()
            .filter_map(|k| self.keys.customer_id(k).map(str::to_owned))
            .collect();
        Ok((next, ids))
    }

    /// Customers of rank `rank` whose value lies in `[lo, hi]` (`hi` open-ended if `None`),
    /// `limit` of them from `offset` in score order.
    ///
    /// # Errors
    /// None in practice (Redis errors are retried).
    pub async fn ranked_between(
        &mut self,
        rank: usize,
        lo: i128,
        hi: Option<i128>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<String>, ApplyError> {
        retrying!(self, {
            redis::cmd("ZRANGE")
                .arg(&self.rank_keys[rank])
                .arg(lo.to_string())
                .arg(hi.map_or_else(|| "+inf".to_owned(), |h| h.to_string()))
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(offset)
                .arg(limit)
                .query_async(&mut self.conn)
                .await
                .map_err(ApplyError::from)
        })
    }

    /// For rank-position annotation, in one pipelined round trip over every partition's rank
    /// sets (`all[q][r]`: partition q's set of rank r): each rank's population, and for each
    /// `(rank, value)` query the customers strictly above `value`.
    ///
    /// # Errors
    /// None in practice (Redis errors are retried).
    pub async fn rank_counts(
        &mut self,
        all: &[Vec<String>],
        ranks: usize,
        queries: &[(usize, i128)],
    ) -> Result<(Vec<u64>, Vec<u64>), ApplyError> {
        let mut pipe = redis::pipe();
        for r in 0..ranks {
            for sets in all {
                pipe.zcard(&sets[r]);
            }
        }
        for (r, v) in queries {
            for sets in all {
                pipe.zcount(&sets[*r], format!("({v}"), "+inf");
            }
        }
        let counts: Vec<u64> = retrying!(
            self,
            pipe.query_async(&mut self.conn)
                .await
                .map_err(ApplyError::from)
        )?;
        let mut sums = counts
            .chunks(all.len().max(1))
            .map(|c| c.iter().sum::<u64>());
        let population = sums.by_ref().take(ranks).collect();
        Ok((population, sums.collect()))
    }
}
