//! `tierd offsets show`: where each input partition stands — the offset tierd stored in Redis
//! (the real one: Kafka's committed offsets of the group are advisory, for lag dashboards),
//! the partition's log start and end, the lag, how far the published changes reach, and
//! whether the consumer group has members. Read-only.
//!
//! `tierd offsets reset`: moves the stored offsets of a stopped group. Forward, the state is
//! kept and the input skipped is never applied. Backward only with the state cleared: the
//! partition's customers, timers, rank entries and tier counts are removed and its input is
//! counted again from the new offset (over a state that counted it, events older than the
//! dedup memory would count twice); the changes it publishes again are numbered above every
//! sequence the partition published, so no change id is reused for another body.

use super::{Store, ToolError};
use crate::config::Config;
use crate::publish::position::OutboxPositions;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use std::time::Duration;

/// One input partition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionOffsets {
    /// The partition.
    pub partition: i32,
    /// The next offset tierd applies (stored in Redis with the state; none: never claimed).
    pub stored: Option<i64>,
    /// Commits of the partition's state so far.
    pub commits: Option<i64>,
    /// The log's first offset still held.
    pub log_start: i64,
    /// The log's end (the next offset a producer writes).
    pub log_end: i64,
    /// Records not applied yet (`log_end - stored`; markers of transactional producers count).
    pub lag: Option<i64>,
    /// The input offset the published tier changes reach (none: nothing published yet, or
    /// positions older than Kafka's `offsets.retention.minutes`).
    pub published_through: Option<i64>,
    /// The group's committed offset in Kafka (advisory: written for lag dashboards).
    pub kafka_committed: Option<i64>,
}

/// The whole answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Offsets {
    /// `kafka.input_topic`.
    pub topic: String,
    /// `kafka.group_id`.
    pub group: String,
    /// The group's state as the coordinator reports it (`Empty`: no member, `Stable`, …;
    /// `Dead`: unknown to the coordinator).
    pub group_state: String,
    /// Members of the group now.
    pub members: usize,
    /// Every partition of the input topic.
    pub partitions: Vec<PartitionOffsets>,
}

/// Why the offsets could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    /// Redis.
    #[error(transparent)]
    Store(#[from] ToolError),
    /// Kafka refused or did not answer.
    #[error("kafka: {0}")]
    Kafka(String),
    /// The reset cannot be done safely, and why.
    #[error("{0}")]
    Refused(String),
}

/// Where `tierd offsets reset` moves a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The log's first offset still held.
    Earliest,
    /// An offset within the log (its start to its end).
    Offset(i64),
    /// The first record at or after this time (Unix ms; the log end if none).
    Time(i64),
}

/// One partition's move.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Moved {
    /// The partition.
    pub partition: i32,
    /// The stored offset before (none: never claimed).
    pub from: Option<i64>,
    /// The stored offset now.
    pub to: i64,
    /// Customers removed with the state (0 when kept).
    pub customers_removed: u64,
    /// The sequence floor the partition's next changes are numbered above.
    pub sequence_floor: u64,
}

const TIMEOUT: Duration = Duration::from_secs(15);

/// `ask` again while the group's coordinator is moving or loading (a broker answers
/// `NOT_COORDINATOR` or `COORDINATOR_LOAD_IN_PROGRESS` for a while after a group or the
/// broker starts), for at most [`TIMEOUT`].
fn coordinated<T>(
    mut ask: impl FnMut() -> Result<T, rdkafka::error::KafkaError>,
) -> Result<T, rdkafka::error::KafkaError> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match ask() {
            Err(e)
                if std::time::Instant::now() < deadline
                    && matches!(
                        e.rdkafka_error_code(),
                        Some(
                            Code::NotCoordinator
                                | Code::CoordinatorLoadInProgress
                                | Code::CoordinatorNotAvailable
                        )
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// Reads where every partition of `config`'s input topic stands.
///
/// # Errors
/// [`OffsetsError`].
pub fn show(config: &Config) -> Result<Offsets, OffsetsError> {
    let kafka = |e: rdkafka::error::KafkaError| OffsetsError::Kafka(e.to_string());
    let topic = config.kafka.input_topic.clone();
    let consumer: BaseConsumer = crate::kafka::consumer_config(&config.kafka)
        .set("statistics.interval.ms", "0")
        .create()
        .map_err(kafka)?;
    let metadata = consumer
        .fetch_metadata(Some(&topic), TIMEOUT)
        .map_err(kafka)?;
    let count = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len());
    if count == 0 {
        return Err(OffsetsError::Kafka(format!(
            "the input topic {topic:?} (kafka.input_topic) does not exist"
        )));
    }
    let count = i32::try_from(count).unwrap_or(i32::MAX);
    let groups = coordinated(|| consumer.fetch_group_list(Some(&config.kafka.group_id), TIMEOUT))
        .map_err(kafka)?;
    let (group_state, members) = groups
        .groups()
        .iter()
        .find(|g| g.name() == config.kafka.group_id)
        .map_or(("Dead".to_owned(), 0), |g| {
            (g.state().to_owned(), g.members().len())
        });
    let mut assigned = TopicPartitionList::new();
    for p in 0..count {
        assigned.add_partition(&topic, p);
    }
    let committed =
        coordinated(|| consumer.committed_offsets(assigned.clone(), TIMEOUT)).map_err(kafka)?;
    let positions = OutboxPositions::new(&config.kafka, config.publish.position_metadata_bytes)
        .map_err(kafka)?;
    // A deployment that never stored anything shows every partition unclaimed.
    let mut store = match Store::open(config) {
        Ok(store) => Some(store),
        Err(ToolError::NoPartitions(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let mut partitions = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for p in 0..count {
        let (low, high) = consumer
            .fetch_watermarks(&topic, p, TIMEOUT)
            .map_err(kafka)?;
        let (commits, stored) = match &mut store {
            Some(store) if p < store.partitions => store.commit_mark(p)?,
            _ => (None, None),
        };
        let stored = stored.filter(|o| *o >= 0);
        let published = positions.published(p).map_err(kafka)?;
        partitions.push(PartitionOffsets {
            partition: p,
            stored,
            commits,
            log_start: low,
            log_end: high,
            lag: stored.map(|s| (high - s).max(0)),
            published_through: published.through,
            kafka_committed: committed
                .find_partition(&topic, p)
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0),
        });
    }
    Ok(Offsets {
        topic,
        group: config.kafka.group_id.clone(),
        group_state,
        members,
        partitions,
    })
}

/// The reset of one partition, in one atomic script (`src/store/lua/reset.lua`).
static RESET: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("../store/lua/reset.lua")));

/// Moves the stored offsets of `partitions` (all when empty) of a stopped group to `target`;
/// `clear_state` removes each partition's state (required to move backward). Every partition
/// is checked before any is changed; each is then reset in one atomic step, which re-checks
/// that no instance claimed or committed it since.
///
/// # Errors
/// [`OffsetsError::Refused`] naming what makes it unsafe (a member in the group, an offset
/// outside the log, a backward move without `clear_state`, changes not published yet, an
/// instance that claimed the partition meanwhile, unreadable states whose sequences are
/// unknown), or Kafka and Redis errors.
pub fn reset(
    config: &Config,
    target: Target,
    partitions: &[i32],
    clear_state: bool,
) -> Result<Vec<Moved>, OffsetsError> {
    let kafka = |e: rdkafka::error::KafkaError| OffsetsError::Kafka(e.to_string());
    let now = show(config)?;
    if now.members > 0 {
        return Err(OffsetsError::Refused(format!(
            "the group {} has {} member{} ({}): stop every tierd instance of the deployment first",
            now.group,
            now.members,
            if now.members == 1 { "" } else { "s" },
            now.group_state
        )));
    }
    let mut wanted: Vec<i32> = partitions.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    let selected: Vec<&PartitionOffsets> = if wanted.is_empty() {
        now.partitions.iter().collect()
    } else {
        wanted
            .iter()
            .map(|p| {
                now.partitions
                    .get(usize::try_from(*p).unwrap_or(usize::MAX))
                    .ok_or_else(|| {
                        OffsetsError::Refused(format!(
                            "--partition {p}: the input topic {} has {} partitions",
                            now.topic,
                            now.partitions.len()
                        ))
                    })
            })
            .collect::<Result<_, _>>()?
    };
    let consumer: BaseConsumer = crate::kafka::consumer_config(&config.kafka)
        .set("statistics.interval.ms", "0")
        .create()
        .map_err(kafka)?;
    let positions = OutboxPositions::new(&config.kafka, config.publish.position_metadata_bytes)
        .map_err(kafka)?;
    let mut store = Store::open(config).map_err(|e| match e {
        ToolError::NoPartitions(_) => OffsetsError::Refused(
            "nothing is stored for this deployment: there is no offset to move".into(),
        ),
        e => e.into(),
    })?;
    let mut plan = Vec::with_capacity(selected.len());
    for p in selected {
        let to = match target {
            Target::Earliest => p.log_start,
            Target::Offset(o) if (p.log_start..=p.log_end).contains(&o) => o,
            Target::Offset(o) => {
                return Err(OffsetsError::Refused(format!(
                    "--to-offset {o}: partition {} holds offsets {}..{}",
                    p.partition, p.log_start, p.log_end
                )))
            }
            Target::Time(ms) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&now.topic, p.partition, rdkafka::Offset::Offset(ms))
                    .map_err(kafka)?;
                let found = consumer.offsets_for_times(tpl, TIMEOUT).map_err(kafka)?;
                let element = found.find_partition(&now.topic, p.partition);
                if let Some(Err(e)) = element
                    .as_ref()
                    .map(rdkafka::topic_partition_list::TopicPartitionListElem::error)
                {
                    return Err(OffsetsError::Kafka(format!(
                        "the offset of partition {} at --to-time: {e}",
                        p.partition
                    )));
                }
                element
                    .and_then(|e| e.offset().to_raw())
                    .filter(|o| *o >= 0)
                    .unwrap_or(p.log_end)
            }
        };
        // (A partition never claimed has no state: it is only moved.)
        if let Some(stored) = p.stored.filter(|s| clear_state && to >= *s) {
            return Err(OffsetsError::Refused(format!(
                "partition {}: --clear-state with a move to {to}, not before the stored offset {stored}, would remove the state of input that is not counted again: clear the state only to re-count from an earlier offset",
                p.partition
            )));
        }
        if p.stored.is_some_and(|s| to < s) && !clear_state {
            return Err(OffsetsError::Refused(format!(
                "partition {} would move back from {} to {to} over a state that counted that input (events older than the dedup memory would count twice): pass --clear-state to remove the partition's state and count again from {to}",
                p.partition,
                p.stored.unwrap_or_default()
            )));
        }
        let keys = store.keyspace().partition(p.partition);
        let (epoch, stored, commits): (Option<String>, Option<String>, Option<String>) = store
            .query(
                redis::pipe()
                    .cmd("HMGET")
                    .arg(&keys.meta)
                    .arg("epoch")
                    .arg("next_offset")
                    .arg("commits"),
            )
            .map(|(fields,): ((Option<String>, Option<String>, Option<String>),)| fields)?;
        let floor = if clear_state {
            // Changes the recount publishes are numbered above every sequence the partition
            // used: the published position's highest (kept in Kafka, which expires it after
            // `offsets.retention.minutes` without a commit) and every stored state's.
            let published = positions.published(p.partition).map_err(kafka)?;
            let (highest, unreadable) = store.highest_sequence(p.partition)?;
            if let Some(key) = unreadable.first() {
                if published.max_sequence == 0 {
                    return Err(OffsetsError::Refused(format!(
                        "partition {}: {} stored state{} cannot be read (e.g. {key:?}) and the published position records no sequence: the changes of the recount could reuse their ids. Delete those keys by hand if that is acceptable, then reset",
                        p.partition,
                        unreadable.len(),
                        if unreadable.len() == 1 { "" } else { "s" }
                    )));
                }
            }
            let (stored_floor,): (Option<u64>,) =
                store.query(redis::pipe().cmd("HGET").arg(&keys.meta).arg("seq_floor"))?;
            Some(
                stored_floor
                    .unwrap_or(0)
                    .max(published.max_sequence)
                    .max(published.sequence_floor)
                    .max(highest),
            )
        } else {
            None
        };
        plan.push((
            p.partition,
            p.stored,
            to,
            keys,
            (epoch, stored, commits),
            floor,
        ));
    }
    let mut moved = Vec::with_capacity(plan.len());
    for (partition, from, to, keys, (epoch, stored, commits), floor) in plan {
        let mut rank_pattern = keys.customer_pattern();
        // `…:c:*` → `…:rank:*` (the escaped base is the same).
        rank_pattern.truncate(rank_pattern.len() - 3);
        rank_pattern.push_str("rank:*");
        let mut call = RESET.key(&keys.meta);
        call.key(&keys.outbox)
            .key(&keys.timers)
            .key(&keys.tier_counts)
            .key(&keys.snapshot_lease)
            .arg(to)
            .arg(if clear_state { "1" } else { "0" })
            .arg(epoch.unwrap_or_default())
            .arg(stored.unwrap_or_default())
            .arg(commits.unwrap_or_default())
            .arg(keys.customer_pattern())
            .arg(rank_pattern)
            .arg(floor.map_or_else(String::new, |f| f.to_string()));
        let reply: Vec<String> = store.invoke(&call)?;
        match reply.first().map(String::as_str) {
            Some("OK") => {}
            Some("EXPORTING") => {
                return Err(OffsetsError::Refused(format!(
                    "partition {partition} is being read by an export ({}): let it finish, then reset",
                    reply.get(1).map_or("?", String::as_str)
                )))
            }
            Some("OUTBOX") => {
                return Err(OffsetsError::Refused(format!(
                    "partition {partition} has {} changes not published yet: start tierd until its outbox is empty (tierd_outbox_depth 0), stop it, then reset",
                    reply.get(1).map_or("some", String::as_str)
                )))
            }
            _ => {
                return Err(OffsetsError::Refused(format!(
                    "partition {partition} was claimed or committed by an instance since the group was checked (now {reply:?}): stop every instance and run the reset again; partitions reset before it stay reset"
                )))
            }
        }
        moved.push(Moved {
            partition,
            from,
            to,
            customers_removed: reply.get(1).and_then(|n| n.parse().ok()).unwrap_or(0),
            sequence_floor: floor.unwrap_or(0),
        });
    }
    Ok(moved)
}

impl Offsets {
    /// The table `tierd offsets show` prints.
    pub fn render(&self) -> String {
        let dash = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        let mut out = format!(
            "topic {}, group {}: {} ({} member{})\n",
            self.topic,
            self.group,
            self.group_state,
            self.members,
            if self.members == 1 { "" } else { "s" }
        );
        out.push_str(&format!(
            "{:>9} {:>12} {:>12} {:>12} {:>10} {:>12} {:>12} {:>10}\n",
            "partition", "stored", "log start", "log end", "lag", "published", "kafka", "commits"
        ));
        for p in &self.partitions {
            out.push_str(&format!(
                "{:>9} {:>12} {:>12} {:>12} {:>10} {:>12} {:>12} {:>10}\n",
                p.partition,
                dash(p.stored),
                p.log_start,
                p.log_end,
                dash(p.lag),
                dash(p.published_through),
                dash(p.kafka_committed),
                dash(p.commits),
            ));
        }
        out
    }
}
