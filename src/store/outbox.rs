//! A partition's outbox stream: the entry codec (what the commit script appends and the
//! publisher turns into Kafka records), and the reads and trims the publisher makes.

use crate::store::connection::Connection;
use redis::streams::StreamRangeReply;
use redis::Value;

/// The reason a dead letter brought back by Redis losing writes is parked with (by the
/// publisher, and by the claim script, which is given it).
pub const LOST_WRITES: &str =
    "brought back by Redis losing writes, possibly delivered before (parked so it is not lost)";

/// What an outbox entry is, and so which topic it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A tier-change event → `kafka.output_topic`, keyed by customer.
    Change,
    /// A rejected input message with a key → `kafka.dead_letter_topic`.
    DeadLetter,
    /// A rejected input message that had no key.
    DeadLetterNoKey,
    /// An at-risk notice → `kafka.at_risk_topic` (default the output topic), keyed by customer.
    AtRisk,
    /// An erased customer's tombstone → `kafka.output_topic`: their key with no value.
    Erased,
    /// The partition moved to new rank cut-offs (a [`CutoffsSwitch`] as JSON): not a record;
    /// the publisher keeps it in the published position (see `publish::position`).
    ///
    /// [`CutoffsSwitch`]: crate::engine::rules::rank::CutoffsSwitch
    Cutoffs,
    /// A wall-clock timer pass (a [`TimerPass`] as JSON): not a record; the publisher keeps
    /// it in the published position, like a cut-offs switch.
    TimerPass,
    /// A rules sweep started (a [`RulesSweep`] as JSON): not a record; the commit script also
    /// keeps it in the partition's meta, and the publisher in the published position.
    RulesSweep,
}

/// Where, in the partition's input, a wall-clock timer pass fired, and up to which due time.
/// On the wall clock, which input precedes a time-driven change depends on when the pass ran
/// (how far the partition had caught up, which late events had arrived): a replay after
/// Redis lost writes fires its timers at the recorded offsets and horizons instead, so each
/// change already published is decided again on the same input and comes out the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimerPass {
    /// The partition's next input offset when the pass ran (the input before it was applied).
    #[serde(rename = "o")]
    pub offset: i64,
    /// Every timer due at or before this time fired (Unix ms).
    #[serde(rename = "u")]
    pub upto: i64,
    /// The version of the rank cut-offs the pass evaluated with (orders it among the cut-offs
    /// switches at the same offset).
    #[serde(rename = "v", default)]
    pub cutoffs: u64,
}

/// Where, in the partition's input, a rules-version sweep started, and the engine time every
/// customer it re-evaluates is re-evaluated at. A sweep pages through the customers while
/// input goes on, so which page reaches a customer when, and before or after their next event,
/// depends on timing: instead, each customer still under another rules version is re-evaluated
/// at `at` before anything else touches them (an event, a timer, a re-ranking) or when a page
/// reaches them, whichever comes first — the same change either way. A resumed sweep (a
/// restart, a handover, a replay after Redis lost writes) keeps the recorded time. Recorded
/// again, with `done`, by the commit that completes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RulesSweep {
    /// The partition's next input offset when the sweep started.
    #[serde(rename = "o")]
    pub offset: i64,
    /// The engine time customers are re-evaluated at (Unix ms).
    #[serde(rename = "a")]
    pub at: i64,
    /// The hash of the rules version the sweep moves customers to.
    #[serde(rename = "r")]
    pub rules: u32,
    /// The hash of the rules version whose sweep the partition had completed when this one
    /// started (the rules the input before `offset` ran under), if any: a replay from before
    /// `offset` uses the earlier rules the partition kept only if they are this version.
    /// Absent in records of older binaries.
    #[serde(rename = "f", default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u32>,
    /// The input offset the sweep completed at. Timers wait while a sweep runs (a page sets
    /// new timers, and which pass would fire them must not depend on page timing): a replay
    /// completes the sweep at this offset, then timers fire as they first did.
    #[serde(rename = "d", default, skip_serializing_if = "Option::is_none")]
    pub done: Option<i64>,
}

impl EntryKind {
    /// A dead letter (with or without a key).
    pub fn is_dead_letter(self) -> bool {
        matches!(self, Self::DeadLetter | Self::DeadLetterNoKey)
    }

    /// The code stored in the stream's `t` field.
    pub fn code(self) -> &'static str {
        match self {
            Self::Change => "c",
            Self::DeadLetter => "d",
            Self::DeadLetterNoKey => "dn",
            Self::AtRisk => "n",
            Self::Erased => "e",
            Self::Cutoffs => "k",
            Self::TimerPass => "t",
            Self::RulesSweep => "s",
        }
    }

    /// Parses a stored code.
    pub fn from_code(code: &[u8]) -> Option<Self> {
        match code {
            b"c" => Some(Self::Change),
            b"d" => Some(Self::DeadLetter),
            b"dn" => Some(Self::DeadLetterNoKey),
            b"n" => Some(Self::AtRisk),
            b"e" => Some(Self::Erased),
            b"k" => Some(Self::Cutoffs),
            b"t" => Some(Self::TimerPass),
            b"s" => Some(Self::RulesSweep),
            _ => None,
        }
    }
}

/// One record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Change or dead letter.
    pub kind: EntryKind,
    /// Kafka key bytes.
    pub key: Vec<u8>,
    /// Kafka value bytes.
    pub value: Vec<u8>,
    /// Kafka headers as a JSON array of `[name, value]` string pairs (empty for none).
    pub headers: Vec<u8>,
}

impl OutboxEntry {
    /// Key + value + header bytes (what a produce round is sized by).
    pub fn size(&self) -> usize {
        self.key.len() + self.value.len() + self.headers.len()
    }

    /// The Kafka headers as `(name, value)` pairs.
    ///
    /// # Errors
    /// The stored header JSON is not an array of string pairs.
    pub fn header_pairs(&self) -> Result<Vec<(String, String)>, serde_json::Error> {
        if self.headers.is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_slice(&self.headers)
    }
}

/// An entry as stored, with its stream id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// The stream id (`ms-seq`).
    pub id: String,
    /// The record.
    pub entry: OutboxEntry,
    /// The input offset the commit that wrote it left the partition at (absent in entries
    /// written by older versions, and in parked dead letters).
    pub end_offset: Option<i64>,
    /// In a parked entry, the outbox id it had (field `i`; absent in the outbox, and in
    /// entries parked by older binaries).
    pub origin: Option<String>,
    /// The highest tier-change sequence of the commit that wrote it (field `q`; absent when
    /// the commit had no change, and in entries of older binaries).
    pub max_sequence: Option<u64>,
    /// The sequence floor the commit's changes were numbered above (field `f`; absent: none).
    pub seq_floor: Option<u64>,
}

/// Why the outbox could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Redis refused or was unreachable.
    #[error("outbox: {0}")]
    Redis(#[from] redis::RedisError),
    /// An entry is malformed (written by an incompatible version).
    #[error("malformed outbox entry {id}: {message}")]
    Malformed {
        /// The stream id.
        id: String,
        /// What is wrong.
        message: String,
    },
}

/// The first `count` entries of `outbox`, in stream order.
///
/// # Errors
/// [`OutboxError`].
pub async fn read(
    conn: &mut Connection,
    outbox: &str,
    count: usize,
) -> Result<Vec<StoredEntry>, OutboxError> {
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(outbox)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    reply
        .ids
        .into_iter()
        .map(|mut stored| {
            let mut field = |name: &str| match stored.map.remove(name) {
                Some(Value::BulkString(b)) => Ok(b),
                _ => Err(OutboxError::Malformed {
                    id: stored.id.clone(),
                    message: format!("field {name} missing"),
                }),
            };
            let kind =
                EntryKind::from_code(&field("t")?).ok_or_else(|| OutboxError::Malformed {
                    id: stored.id.clone(),
                    message: "unknown kind".into(),
                })?;
            let (key, value, headers) = (field("k")?, field("v")?, field("h")?);
            let end_offset = field("o")
                .ok()
                .and_then(|o| std::str::from_utf8(&o).ok()?.parse().ok());
            let origin = field("i").ok().and_then(|i| String::from_utf8(i).ok());
            let number = |b: Vec<u8>| std::str::from_utf8(&b).ok()?.parse().ok();
            let max_sequence = field("q").ok().and_then(number);
            let seq_floor = field("f").ok().and_then(number);
            Ok(StoredEntry {
                end_offset,
                origin,
                max_sequence,
                seq_floor,
                id: stored.id,
                entry: OutboxEntry {
                    kind,
                    key,
                    value,
                    headers,
                },
            })
        })
        .collect()
}

/// The newest `count` parked entries of `parked`, oldest first: each one's id in `parked` and
/// the outbox id it had before it was parked (field `i`; entries parked by older binaries,
/// which have none, are left out). Reads the whole entries (letters up to
/// `publish.dlq_max_bytes` each): called once per publisher.
///
/// # Errors
/// Redis errors.
pub async fn parked_origins(
    conn: &mut Connection,
    parked: &str,
    count: usize,
) -> redis::RedisResult<Vec<(String, String)>> {
    let reply: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(parked)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    Ok(reply
        .ids
        .into_iter()
        .rev()
        .filter_map(|mut e| match e.map.remove("i") {
            Some(Value::BulkString(b)) => Some((e.id, String::from_utf8(b).ok()?)),
            _ => None,
        })
        .collect())
}

/// Entries left in `outbox`.
///
/// # Errors
/// Redis errors.
pub async fn len(conn: &mut Connection, outbox: &str) -> redis::RedisResult<i64> {
    redis::cmd("XLEN").arg(outbox).query_async(conn).await
}

/// Removes every entry up to and including `last_id`.
///
/// # Errors
/// Redis errors.
pub async fn trim_through(
    conn: &mut Connection,
    outbox: &str,
    last_id: &str,
) -> redis::RedisResult<()> {
    let _: i64 = redis::cmd("XTRIM")
        .arg(outbox)
        .arg("MINID")
        .arg(next_stream_id(last_id))
        .query_async(conn)
        .await?;
    Ok(())
}

static PARK: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("lua/park.lua")));

/// What [`park`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parked {
    /// Moved to the parked stream.
    Parked,
    /// No longer in the outbox (parked or trimmed by someone else): nothing done.
    Gone,
    /// The partition's claim is no longer `epoch`: nothing done.
    Fenced,
}

/// Moves the entry `stored` of `keys.outbox` to `keys.parked` with `reason`, atomically (the
/// keys share the partition's hash tag) and only for the owner of claim `epoch` and while the
/// entry is still in the outbox (`lua/park.lua`): the rest of the outbox flows on, and the
/// entry is kept until a retry delivers it, never parked twice.
///
/// # Errors
/// Redis errors.
pub async fn park(
    conn: &mut Connection,
    keys: &crate::store::keys::PartitionKeys,
    epoch: i64,
    stored: &StoredEntry,
    reason: &str,
) -> redis::RedisResult<Parked> {
    let e = &stored.entry;
    let done: i64 = PARK
        .key(&keys.outbox)
        .key(&keys.parked)
        .key(&keys.meta)
        .arg(&stored.id)
        .arg(epoch)
        .arg(e.kind.code())
        .arg(&e.key)
        .arg(&e.value)
        .arg(&e.headers)
        .arg(reason)
        .invoke_async(conn)
        .await?;
    Ok(match done {
        1 => Parked::Parked,
        0 => Parked::Gone,
        _ => Parked::Fenced,
    })
}

/// Removes one entry (a parked entry that was finally delivered).
///
/// # Errors
/// Redis errors.
pub async fn delete(conn: &mut Connection, stream: &str, id: &str) -> redis::RedisResult<()> {
    let _: i64 = redis::cmd("XDEL")
        .arg(stream)
        .arg(id)
        .query_async(conn)
        .await?;
    Ok(())
}

/// The fencing epoch currently claimed for the partition whose meta hash is `meta` (0: none).
///
/// # Errors
/// Redis errors.
pub async fn owner_epoch(conn: &mut Connection, meta: &str) -> redis::RedisResult<i64> {
    let epoch: Option<i64> = redis::cmd("HGET")
        .arg(meta)
        .arg("epoch")
        .query_async(conn)
        .await?;
    Ok(epoch.unwrap_or(0))
}

/// The smallest stream id after `id` (`"5-3"` → `"5-4"`): XTRIM MINID keeps ids ≥ it.
fn next_stream_id(id: &str) -> String {
    match id
        .split_once('-')
        .and_then(|(ms, seq)| Some((ms, seq.parse::<u64>().ok()?)))
    {
        Some((ms, seq)) => format!("{ms}-{}", seq + 1),
        None => id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn next_stream_id_increments_the_sequence() {
        assert_eq!(super::next_stream_id("1700000000000-0"), "1700000000000-1");
        assert_eq!(super::next_stream_id("5-41"), "5-42");
    }
}
