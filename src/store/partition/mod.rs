//! The Redis side of one partition: claim ownership and load customer states (here), commit a
//! batch ([`commit`]) — one call each — and [`PartitionStore`], the owner's handle that also
//! lists due timers and scans customers, retrying every call it cannot do without.

mod commit;
mod owned;

pub use commit::{commit, CommitBatch, Committed, SortedSet};
pub use owned::PartitionStore;

use crate::engine::rules::rank::{Cutoffs, CutoffsSwitch};
use crate::store::connection::Connection;
use crate::store::keys::PartitionKeys;
use crate::store::outbox::RulesSweep;
use std::sync::LazyLock;

static CLAIM: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/claim.lua")));

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
    /// A stored customer state is unreadable (see [`crate::model::stored`]): data corruption,
    /// stop the partition.
    #[error("partition {partition}: stored state of {key:?} is corrupt: {error}")]
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

/// Where a claimed partition resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Our fencing epoch.
    pub epoch: i64,
    /// The next offset to apply, `None` if nothing was ever applied.
    pub next_offset: Option<i64>,
    /// The leader epoch of the record before `next_offset`, if it was stored together with
    /// that offset (an offset moved by hand starts unvalidated): a start there is
    /// validated against the leader's log ([`crate::ingest::record::add_position`]).
    pub offset_epoch: Option<i32>,
    /// Commits stored so far (event batches and fired timers).
    pub commits: i64,
    /// The partition's event-time clock (`clock.mode = "event"`), if one was stored.
    pub clock: Option<i64>,
    /// Hash of the rules version whose sweep completed on this partition.
    pub swept_rules: Option<u32>,
    /// The rank cut-offs this partition last finished applying.
    pub cutoffs: Option<Cutoffs>,
    /// Whether the outbox was behind what Kafka has published (Redis lost writes).
    pub outbox_behind: bool,
    /// The Redis time (Unix ms) of the last entry the outbox had added when a claim last
    /// found it behind (0: it had none; meta `restored_at`): every change Redis lost then was
    /// added, and published, after it.
    pub restored_outbox_ms: Option<i64>,
    /// Whether the replay reaches back further than the published position and the history
    /// topic keep (filled by the supervisor): it may not decide the earliest changes as they
    /// first were, so it is followed by a restatement.
    pub beyond_history: bool,
    /// A restatement an earlier owner recorded and did not complete: the time from which
    /// the output topic is read back (see [`crate::engine::restate`]).
    pub restate_since: Option<i64>,
    /// Dead letters the claim parked again because the outbox was behind, or because the
    /// published position lists them as parked (Redis may have lost their parking): retried
    /// like every parked letter.
    pub parked_again: u64,
    /// Cut-offs switches of changes already published from input at or after `next_offset`
    /// (Redis lost writes): the runner applies them at the same offsets (filled by the
    /// supervisor from the published position).
    pub replay_cutoffs: Vec<CutoffsSwitch>,
    /// Wall-clock timer passes of changes already published, at or after `next_offset`: the
    /// runner fires timers at the same offsets and horizons (filled by the supervisor).
    pub replay_passes: Vec<crate::store::outbox::TimerPass>,
    /// From which input offset on the recorded passes are complete (see
    /// `publish::position::Published::passes_from`).
    pub replay_passes_from: Option<i64>,
    /// The input offset the published changes reach (filled with `replay_cutoffs`): up to it a
    /// replay keeps to the recorded cut-offs and timer passes.
    pub replay_through: Option<i64>,
    /// The latest rules sweep started on the partition, as Redis keeps it.
    pub sweep: Option<RulesSweep>,
    /// The latest rules sweep started, as the published position keeps it (filled by the
    /// supervisor): after Redis lost writes, the sweep to resume at the same time.
    pub published_sweep: Option<RulesSweep>,
    /// The sweeps before it the published position keeps, oldest first: a replay over several
    /// rules changes starts each again where it first started.
    pub published_earlier_sweeps: Vec<RulesSweep>,
    /// The text of the rules version that ran the partition before its latest one, if the
    /// partition kept it: a replay from before the latest rules change applies the input up
    /// to the change under it.
    pub prior_rules: Option<String>,
    /// The partition's sequence floor as Redis keeps it (0: none): changes are numbered above
    /// it (see `engine::changes::number_above`).
    pub seq_floor: u64,
    /// The highest change sequence the partition ever published (filled by the supervisor
    /// from the published position): the floor a replay that cannot reproduce what was
    /// published numbers its changes above.
    pub published_sequence: u64,
    /// The highest sequence floor the published changes were numbered above (filled by the
    /// supervisor): above the floor Redis keeps, Redis lost the commit that raised it.
    pub published_floor: u64,
}

/// A claim refused because a newer rules version already ran the partition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this instance's rules version {ours:?} is older than {latest:?}, which ran the partition after it: upgrade this instance to the newer rules (to roll back, give the old rules a new version string)")]
pub struct OlderRules {
    /// Our rules version.
    pub ours: String,
    /// The latest version that claimed the partition.
    pub latest: String,
    /// The partition's stored next offset (`None`: nothing applied yet), where to hold it.
    pub next_offset: Option<i64>,
}

/// A claim refused because the partition's stored offset was read from another topic of the
/// same name: the input topic was deleted and created again since (its offsets now name other
/// records, even where the leader-epoch validation cannot tell: both logs at epoch 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the input topic was deleted and created again since offset {next_offset} was stored (topic id {stored} then, {current} now): that offset names other records in the new topic. Nothing is read; decide where to resume and move the stored offset (README \"Operating notes\": an offset outside the log)")]
pub struct TopicRecreated {
    /// The id of the topic the stored offset was read from.
    pub stored: String,
    /// The topic's id now.
    pub current: String,
    /// The partition's stored next offset, where to hold it.
    pub next_offset: i64,
}

/// Why a claim failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Refused for good (until this instance runs newer rules): leave the partition stopped.
    #[error(transparent)]
    OlderRules(#[from] OlderRules),
    /// Refused for good (until an operator moves the stored offset): leave it stopped.
    #[error(transparent)]
    TopicRecreated(#[from] TopicRecreated),
    /// Redis was unreachable or refused the call: retry.
    #[error("redis call failed: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Claims `keys`' partition synchronously (used in the rebalance callback, which runs on the
/// consumer thread) for an instance running `rules_version`. `published` is the last outbox
/// id a committed Kafka transaction holds ([`crate::publish::position`]): the entries up to it
/// are trimmed, never published again, except the dead letters among them that
/// `parked_letters` (the position's [`crate::publish::position::Published::parked_letters`])
/// names: they are parked again. `rules_text` is the text of the rules named
/// `rules_version` (kept with the partition, see [`Claim::prior_rules`]). `topic` is the input topic's id now (`None`: unknown,
/// not checked); the stored offset is paired with the id it was read from.
///
/// # Errors
/// [`ClaimError::OlderRules`] if a newer rules version ran the partition after ours,
/// [`ClaimError::TopicRecreated`] if the stored offset was read from another topic of the same
/// name (nothing changed in either case), or the Redis error.
pub fn claim(
    conn: &mut impl redis::ConnectionLike,
    keys: &PartitionKeys,
    published: Option<&str>,
    parked_letters: &[String],
    rules_version: &str,
    rules_text: &str,
    topic: Option<&str>,
) -> Result<Claim, ClaimError> {
    let reply: Vec<String> = CLAIM
        .key(&keys.meta)
        .key(&keys.outbox)
        .key(&keys.parked)
        .arg(published.unwrap_or(""))
        .arg(rules_version)
        .arg(topic.unwrap_or(""))
        .arg(rules_text)
        .arg(super::outbox::LOST_WRITES)
        .arg(parked_letters.join(" "))
        .invoke(conn)?;
    let field = |i: usize| reply.get(i).map_or("", String::as_str);
    if let (Some(current), "RECREATED") = (topic, field(0)) {
        return Err(TopicRecreated {
            stored: field(1).to_owned(),
            current: current.to_owned(),
            next_offset: field(2).parse().unwrap_or(-1),
        }
        .into());
    }
    if field(0) == "OLDER" {
        return Err(OlderRules {
            ours: rules_version.to_owned(),
            latest: field(1).to_owned(),
            next_offset: field(2).parse().ok().filter(|&o: &i64| o >= 0),
        }
        .into());
    }
    let number = |i: usize| {
        field(i).parse::<i64>().map_err(|_| {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected claim reply",
                format!("{reply:?}"),
            ))
        })
    };
    let next = number(1)?;
    Ok(Claim {
        epoch: number(0)?,
        next_offset: (next >= 0).then_some(next),
        offset_epoch: field(7).parse().ok().filter(|&e: &i32| e >= 0),
        commits: number(2)?,
        clock: field(3).parse().ok(),
        swept_rules: field(4).parse().ok(),
        cutoffs: serde_json::from_str(field(5)).ok(),
        outbox_behind: field(6) == "behind",
        restored_outbox_ms: field(12).parse().ok(),
        restate_since: field(13).parse().ok(),
        beyond_history: false,
        parked_again: field(10).parse().unwrap_or(0),
        replay_cutoffs: Vec::new(),
        replay_passes: Vec::new(),
        replay_passes_from: None,
        replay_through: None,
        sweep: serde_json::from_str(field(8)).ok(),
        published_sweep: None,
        published_earlier_sweeps: Vec::new(),
        prior_rules: Some(field(9)).filter(|t| !t.is_empty()).map(str::to_owned),
        seq_floor: field(11).parse().unwrap_or(0),
        published_sequence: 0,
        published_floor: 0,
    })
}

/// Reads customer states by key with one MGET (all keys share the partition's slot), in
/// their stored form (`None`: not stored); [`crate::model::stored::decode`] reads them.
///
/// # Errors
/// [`ApplyError::Redis`].
pub async fn load(
    conn: &mut Connection,
    keys: &[String],
) -> Result<Vec<Option<Vec<u8>>>, ApplyError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    Ok(redis::cmd("MGET").arg(keys).query_async(conn).await?)
}
