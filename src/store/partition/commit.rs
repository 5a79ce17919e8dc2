//! The fenced, atomic commit of one batch (`lua/commit.lua`): customer states, timer-index and
//! rank-set entries, tier counts, outbox entries and the partition's new position, applied
//! only if the caller's epoch is current and the stored position is the one it expects.

use super::ApplyError;
use crate::store::connection::Connection;
use crate::store::keys::PartitionKeys;
use crate::store::outbox::OutboxEntry;
use std::sync::LazyLock;

static COMMIT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/commit.lua")));

/// The result of a successful commit call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Written now; the outbox holds this many entries.
    Applied { outbox_len: u64 },
    /// Already applied by an earlier call of ours whose reply was lost.
    AlreadyApplied,
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
    /// For a batch with input: the leader epoch of its last record (`Some(None)`: unknown,
    /// forget the stored one — an older epoch must never be paired with a newer offset).
    /// `None`: no input, the stored epoch stays.
    pub leader_epoch: Option<Option<i32>>,
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
    /// The re-ranking's progress to store (JSON); `Some("")` removes it (done).
    pub rerank: Option<String>,
    /// Customer states to write: (key, stored form; empty: delete the key).
    pub states: Vec<(String, Vec<u8>)>,
    /// The highest sequence among the batch's tier changes, written with its outbox entries
    /// (field `q`) for the publisher to keep in the published position.
    pub max_sequence: Option<u64>,
    /// The partition's sequence floor the batch's changes were numbered above (0: none),
    /// stored in the meta hash and written with its outbox entries (field `f`).
    pub seq_floor: u64,
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
    /// Its 1-based position among the commit script's `KEYS` (meta, outbox, tier counts,
    /// the export snapshot's lease and hash, then the timer index and the rank sets).
    fn key_index(self) -> usize {
        match self {
            Self::Timers => 6,
            Self::Rank(r) => 7 + r,
        }
    }
}

/// Commits a batch atomically, fenced by `epoch` and the stored next offset. `rank_keys` are
/// the partition's rank sorted sets, in the rules' rank order.
///
/// # Errors
/// [`ApplyError::Fenced`] (stop the partition), [`ApplyError::Diverged`] (reload) or
/// [`ApplyError::Redis`] (retry: the call is idempotent).
pub async fn commit(
    conn: &mut Connection,
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
        .key(&keys.snapshot_lease)
        .key(&keys.snapshot)
        .key(&keys.timers);
    for k in rank_keys {
        inv.key(k);
    }
    let first_state = 7 + rank_keys.len();
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
        .arg(first_state)
        .arg(match batch.rerank.as_deref() {
            None => "",
            Some("") => "-",
            Some(progress) => progress,
        })
        .arg(match batch.leader_epoch {
            None => "-".to_owned(),
            Some(None) => String::new(),
            Some(Some(epoch)) => epoch.to_string(),
        });
    inv.arg(
        batch
            .max_sequence
            .map(|q| q.to_string())
            .unwrap_or_default(),
    )
    .arg(match batch.seq_floor {
        0 => String::new(),
        floor => floor.to_string(),
    });
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
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected commit script reply",
            format!("{reply:?}"),
        )))),
    }
}
