//! How far each partition's outbox has been published, kept in Kafka itself: every publish
//! transaction also commits, for the consumer group `<kafka.group_id>.outbox`, the input
//! partition's entry whose offset metadata is the last outbox stream id in the round. The
//! record batch and that position become visible atomically, so the next owner of a partition
//! knows exactly which outbox entries went out even when the previous owner died between its
//! commit and its trim: the claim trims them instead of publishing them again, and consumers
//! never see a change re-published after a later one.
//!
//! Under rank-based rules the metadata also carries the partition's latest cut-offs switches
//! ([`CutoffsSwitch`]: which cut-offs, from which input offset): the changes already published
//! were decided under them, so a replay after Redis lost writes applies the same cut-offs at
//! the same offsets and re-publishes each change with the same body. The metadata is bounded
//! (`offset.metadata.max.bytes`, 4096 by default): the oldest switches give way first, and
//! the newest forgotten offset is kept so a replay reaching back before it is reported.
//!
//! On the wall clock it also carries the partition's latest timer passes ([`TimerPass`]:
//! where in the input timers fired, up to which due time), for the same reason: a replay
//! fires the timers at the same offsets and horizons, so time-driven changes come out the
//! same although the replay runs at another time. They share the budget with the switches.

use crate::config::KafkaConfig;
use crate::engine::rules::rank::CutoffsSwitch;
use crate::ingest::topic_id::{topic_id, TopicId};
use crate::store::outbox::{RulesSweep, TimerPass};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};
use tracing::warn;

/// How long reading the published positions may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a claim waits for the input topic's id (see [`OutboxPositions::input_topic_id`]).
const TOPIC_ID_TIMEOUT: Duration = Duration::from_secs(3);

/// How long an answer (or a failure) about the input topic's id is reused by later claims.
const TOPIC_ID_REUSE: Duration = Duration::from_secs(10);

/// Rules sweeps kept before the latest one: a replay reaches back over this many rules
/// changes and one more (each ~70 bytes of metadata).
pub const EARLIER_SWEEPS: usize = 3;

/// The metadata's default size bound (`publish.position_metadata_bytes`): Kafka's default
/// `offset.metadata.max.bytes` is 4096.
#[cfg(test)]
const METADATA_BUDGET: usize = 3500;

/// The part of a metadata budget timer passes may take (13/35: ~30 passes of the default),
/// so that frequent passes never crowd out the rarer, larger cut-offs switches (about 15
/// moves of the pyramid fit in the rest of the default).
fn passes_budget(budget: usize) -> usize {
    budget.saturating_mul(13) / 35
}

/// One publish round's cut-offs switches, timer passes and rules sweeps, as written to the
/// history topic (`kafka.history_topic`) in the round's transaction: the offset metadata
/// keeps only the newest of them, the topic every one (within its retention), so a replay
/// reaching back further than the metadata still re-publishes each change with its body.
/// Keyed by the input partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// The input offset the round's last entry left the partition at.
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub through: Option<i64>,
    /// The round's cut-offs switches, in order.
    #[serde(rename = "k", default, skip_serializing_if = "Vec::is_empty")]
    pub switches: Vec<CutoffsSwitch>,
    /// The round's timer passes, in order.
    #[serde(rename = "t", default, skip_serializing_if = "Vec::is_empty")]
    pub passes: Vec<TimerPass>,
    /// The round's rules sweeps, in order.
    #[serde(rename = "s", default, skip_serializing_if = "Vec::is_empty")]
    pub sweeps: Vec<RulesSweep>,
}

impl HistoryRecord {
    /// Whether the round recorded anything a replay needs.
    pub fn is_empty(&self) -> bool {
        self.switches.is_empty() && self.passes.is_empty() && self.sweeps.is_empty()
    }

    /// The lowest input offset the record names.
    fn first_offset(&self) -> Option<i64> {
        let switches = self.switches.iter().map(|s| s.offset);
        let passes = self.passes.iter().map(|p| p.offset);
        let sweeps = self.sweeps.iter().map(|s| s.offset);
        switches.chain(passes).chain(sweeps).min()
    }
}

/// What Kafka holds about a partition's published outbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The last outbox stream id published (`None`: nothing yet).
    #[serde(rename = "id")]
    pub last_id: Option<String>,
    /// The newest cut-offs switches of the published changes, oldest first.
    #[serde(rename = "k", default, skip_serializing_if = "Vec::is_empty")]
    pub switches: Vec<CutoffsSwitch>,
    /// The newest wall-clock timer passes of the published changes, oldest first; passes at
    /// one offset under the same cut-offs are kept as the latest one (firing up to a later
    /// horizon covers an earlier one: each timer is evaluated at its own due time).
    #[serde(rename = "t", default, skip_serializing_if = "Vec::is_empty")]
    pub passes: Vec<TimerPass>,
    /// From which input offset on `passes` holds every pass that fired anything: the first
    /// pass recorded, raised past each pass dropped for room. Below it (an older binary, a
    /// history cut for room) a replay cannot know where timers fired, and fires them as the
    /// backlog is applied.
    #[serde(rename = "tc", default, skip_serializing_if = "Option::is_none")]
    pub passes_from: Option<i64>,
    /// The latest rules sweep started (the first record of a rules version is kept: a resumed
    /// sweep keeps its time), and where it completed.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<RulesSweep>,
    /// The sweeps before `sweep`, oldest first (at most [`EARLIER_SWEEPS`]): a replay reaching
    /// back over several rules changes applies each stretch of input under the rules it first
    /// ran under, and starts each sweep again where (and at the time) it first started.
    #[serde(rename = "se", default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_sweeps: Vec<RulesSweep>,
    /// The offset of the newest switch or pass dropped for room: a replay from before it
    /// cannot be reproduced exactly.
    #[serde(rename = "f", default, skip_serializing_if = "Option::is_none")]
    pub forgotten: Option<i64>,
    /// The input offset the commit of the last published entry left the partition at: a
    /// replay must not take cut-offs the first run did not have before it gets there.
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub through: Option<i64>,
}

impl Published {
    /// Parses the offset metadata: a bare stream id (no switch recorded) or the JSON form.
    pub fn parse(metadata: &str) -> Self {
        if metadata.is_empty() {
            return Self::default();
        }
        if metadata.starts_with('{') {
            if let Ok(p) = serde_json::from_str(metadata) {
                return p;
            }
        }
        Self {
            last_id: Some(metadata.to_owned()),
            ..Self::default()
        }
    }

    /// The position after a round ending at `last_id` that moved to `switches` (in order),
    /// within `budget` bytes of metadata: the oldest switches give way (remembered in
    /// `forgotten`).
    /// A switch already known (same offset and version: a replay or a resumed pass records it
    /// again) is kept once.
    #[must_use]
    pub fn after(
        &self,
        last_id: &str,
        through: Option<i64>,
        switches: &[CutoffsSwitch],
        passes: &[TimerPass],
        sweep: Option<RulesSweep>,
        budget: usize,
    ) -> Self {
        let mut next = self.clone();
        next.add(last_id, through, switches, passes, sweep, Some(budget));
        next
    }

    /// [`Self::after`] in place; with no `budget`, nothing is dropped for room, and (the
    /// history topic's fold, [`Self::with_history`]) `switches` must hold only switches not
    /// recorded yet — checking that here would make the fold quadratic.
    fn add(
        &mut self,
        last_id: &str,
        through: Option<i64>,
        switches: &[CutoffsSwitch],
        passes: &[TimerPass],
        sweep: Option<RulesSweep>,
        budget: Option<usize>,
    ) {
        let next = self;
        next.last_id = Some(last_id.to_owned());
        // Never backwards: a replay's first commits (cut-offs re-applied at the replay's
        // start offset) are published with a lower end offset than the changes already
        // published, and the next claim must still keep to the recorded cut-offs up to the
        // furthest published input.
        next.through = through.max(next.through);
        let over = |next: &Self| budget.is_some_and(|budget| next.metadata().len() > budget);
        if let Some(sweep) = sweep {
            // A resumed sweep (another owner, a replay of an earlier one) keeps its first
            // start; its completion is added. Each rules version runs a partition once (an
            // older one is refused at the claim), so the version names the sweep.
            match next
                .earlier_sweeps
                .iter_mut()
                .chain(next.sweep.as_mut())
                .find(|known| known.rules == sweep.rules)
            {
                Some(known) => known.done = known.done.or(sweep.done),
                // A newer version's sweep; or an older one a replay records again after it
                // was dropped for room: it goes back in its place, never before the latest.
                None => match next.sweep {
                    Some(latest) if sweep.offset < latest.offset => {
                        let at = next
                            .earlier_sweeps
                            .partition_point(|e| e.offset <= sweep.offset);
                        next.earlier_sweeps.insert(at, sweep);
                    }
                    _ => {
                        if let Some(latest) = next.sweep.replace(sweep) {
                            next.earlier_sweeps.push(latest);
                        }
                    }
                },
            }
            while budget.is_some() && next.earlier_sweeps.len() > EARLIER_SWEEPS {
                next.earlier_sweeps.remove(0);
            }
            while over(next) && !next.earlier_sweeps.is_empty() {
                next.earlier_sweeps.remove(0);
            }
        }
        if switches.is_empty() && passes.is_empty() {
            return;
        }
        // At the offset a rules sweep started, the previous owner's passes (before the sweep's
        // time, under the earlier rules) and the new owner's (after its sweep) stay apart: a
        // replay fires the first before the sweep starts again, the others after it. Several
        // sweeps may start at one offset (a quiet partition): a pass is placed by how many of
        // them started at or before its horizon.
        let sweeps: Vec<RulesSweep> = next.sweeps().collect();
        let side = |p: &TimerPass| {
            let here: Vec<&RulesSweep> = sweeps.iter().filter(|s| s.offset == p.offset).collect();
            (!here.is_empty()).then(|| here.iter().filter(|s| s.at <= p.upto).count())
        };
        for pass in passes {
            // Passes are kept in offset order: a known one is among the last.
            if let Some(known) = next
                .passes
                .iter_mut()
                .rev()
                .take_while(|k| k.offset >= pass.offset)
                .find(|k| {
                    k.offset == pass.offset && k.cutoffs == pass.cutoffs && side(k) == side(pass)
                })
            {
                known.upto = known.upto.max(pass.upto);
            } else if next
                .passes
                .last()
                .is_none_or(|last| last.offset <= pass.offset)
            {
                next.passes.push(*pass);
                next.passes_from = next.passes_from.or(Some(pass.offset));
            }
            // Otherwise an older pass fired again by a replay whose entry was dropped for
            // room: it stays forgotten.
        }
        if let Some(budget) = budget {
            while serde_json::to_string(&next.passes).map_or(0, |s| s.len()) > passes_budget(budget)
            {
                let dropped = next.passes.remove(0);
                next.passes_from = next.passes_from.max(Some(dropped.offset + 1));
            }
        }
        for s in switches {
            let known = budget.is_some()
                && next
                    .switches
                    .iter()
                    .any(|k| k.offset == s.offset && k.cutoffs.version == s.cutoffs.version);
            if !known {
                next.switches.push(s.clone());
            }
        }
        while over(next) && !next.switches.is_empty() {
            let dropped = next.switches.remove(0);
            next.forgotten = next.forgotten.max(Some(dropped.offset));
        }
        while over(next) && !next.earlier_sweeps.is_empty() {
            next.earlier_sweeps.remove(0);
        }
    }

    /// [`Self::after`] for a round that recorded several rules sweeps (in order): one
    /// version's completion and the next one's start may be published together.
    #[must_use]
    pub fn after_sweeps(
        &self,
        last_id: &str,
        through: Option<i64>,
        switches: &[CutoffsSwitch],
        passes: &[TimerPass],
        sweeps: &[RulesSweep],
        budget: usize,
    ) -> Self {
        let mut next = self.clone();
        next.add_round(last_id, through, switches, passes, sweeps, Some(budget));
        next
    }

    /// [`Self::after_sweeps`] in place (see [`Self::add`] for no `budget`).
    fn add_round(
        &mut self,
        last_id: &str,
        through: Option<i64>,
        switches: &[CutoffsSwitch],
        passes: &[TimerPass],
        sweeps: &[RulesSweep],
        budget: Option<usize>,
    ) {
        let (last, first) = match sweeps.split_last() {
            Some((last, first)) => (Some(*last), first),
            None => (None, &[][..]),
        };
        for sweep in first {
            self.add(last_id, through, &[], &[], Some(*sweep), budget);
        }
        self.add(last_id, through, switches, passes, last, budget);
    }

    /// Whether a replay from `next_offset` (`None`: from the partition's start) reaches
    /// further back than the metadata keeps: a cut-off switch, a timer pass or a rules sweep
    /// it needs may have been dropped for room (then only the history topic has it — or
    /// there was none: the first pass recorded, the partition's first rules).
    pub fn reach_exceeded(&self, next_offset: Option<i64>) -> bool {
        let from = next_offset.unwrap_or(i64::MIN);
        self.forgotten.is_some_and(|f| f >= from)
            || self.passes_from.is_some_and(|f| f > from)
            || self
                .sweeps()
                .next()
                .is_some_and(|oldest| oldest.offset > from)
    }

    /// This position with the switches and timer passes the metadata dropped for room put
    /// back from `history` (the partition's history records, oldest first; `trimmed`: the
    /// topic's retention deleted older ones). The history is aligned with the metadata at the
    /// metadata's oldest entry: when it does not reach that far (its newest rounds not read
    /// yet), the metadata is kept as it is for what it lacks.
    #[must_use]
    pub fn with_history(&self, history: &[HistoryRecord], trimmed: bool) -> Self {
        // A replay records switches again: each is kept once.
        let mut seen = std::collections::HashSet::new();
        let mut full = Self::default();
        for record in history {
            let switches: Vec<CutoffsSwitch> = record
                .switches
                .iter()
                .filter(|s| seen.insert((s.offset, s.cutoffs.version)))
                .cloned()
                .collect();
            full.add_round(
                "",
                record.through,
                &switches,
                &record.passes,
                &record.sweeps,
                None,
            );
        }
        // Records before the first one kept are gone: a replay from at or before its
        // offsets cannot know what they held.
        let lost = if trimmed {
            history.iter().find_map(HistoryRecord::first_offset)
        } else {
            None
        };
        let mut merged = self.clone();
        let switch_at = match self.switches.first() {
            None => Some(full.switches.len()),
            Some(first) => full.switches.iter().position(|s| {
                s.offset == first.offset && s.cutoffs.version == first.cutoffs.version
            }),
        };
        if let Some(at) = switch_at {
            merged.switches = full.switches[..at]
                .iter()
                .chain(&self.switches)
                .cloned()
                .collect();
            merged.forgotten = lost;
        }
        let pass_at = match self.passes.first() {
            None => Some(full.passes.len()),
            Some(first) => full
                .passes
                .iter()
                .position(|p| p.offset == first.offset && p.cutoffs == first.cutoffs),
        };
        if let Some(at) = pass_at {
            merged.passes = full.passes[..at]
                .iter()
                .chain(&self.passes)
                .copied()
                .collect();
            merged.passes_from = match (full.passes_from.or(self.passes_from), lost) {
                (Some(from), Some(lost)) => Some(from.max(lost + 1)),
                (from, _) => from,
            };
        }
        // Sweeps: the metadata keeps the last few; the history every one.
        if let Some(oldest) = self.sweeps().next() {
            let all: Vec<RulesSweep> = full.sweeps().collect();
            if let Some(at) = all.iter().position(|s| s.rules == oldest.rules) {
                merged.earlier_sweeps = all[..at]
                    .iter()
                    .chain(&self.earlier_sweeps)
                    .copied()
                    .collect();
            }
        }
        merged
    }

    /// Every sweep kept, oldest first.
    pub fn sweeps(&self) -> impl Iterator<Item = RulesSweep> + '_ {
        self.earlier_sweeps.iter().chain(&self.sweep).copied()
    }

    /// The metadata to commit: the bare id when no switch is recorded, otherwise JSON.
    pub fn metadata(&self) -> String {
        if self.switches.is_empty()
            && self.passes.is_empty()
            && self.passes_from.is_none()
            && self.sweep.is_none()
            && self.earlier_sweeps.is_empty()
            && self.forgotten.is_none()
            && self.through.is_none()
        {
            return self.last_id.clone().unwrap_or_default();
        }
        serde_json::to_string(self).expect("positions serialize")
    }

    /// The switches a replay from `next_offset` must apply: those at or after it that the
    /// partition has not applied yet (a version above `applied`, the version its stored state
    /// finished applying — several moves can share one offset, some of them before the state
    /// Redis kept), in order.
    pub fn switches_from(&self, next_offset: Option<i64>, applied: u64) -> Vec<CutoffsSwitch> {
        let from = next_offset.unwrap_or(i64::MIN);
        self.switches
            .iter()
            .filter(|s| s.offset >= from && s.cutoffs.version > applied)
            .cloned()
            .collect()
    }

    /// The newest cut-offs version the published changes of a partition were decided under
    /// (0: none recorded). Kafka keeps it when Redis loses writes: cut-offs are never numbered
    /// at or below it again.
    pub fn newest_cutoffs_version(&self) -> u64 {
        self.switches
            .iter()
            .map(|s| s.cutoffs.version)
            .max()
            .unwrap_or(0)
    }

    /// The timer passes a replay from `next_offset` must fire again, in order: those at or
    /// after it (one at `next_offset` itself may be in the stored state already; firing it
    /// again finds nothing due).
    pub fn passes_to_replay(&self, next_offset: Option<i64>) -> Vec<TimerPass> {
        let from = next_offset.unwrap_or(i64::MIN);
        self.passes
            .iter()
            .filter(|p| p.offset >= from)
            .copied()
            .collect()
    }
}

/// Reads and writes the published outbox positions.
pub struct OutboxPositions {
    consumer: BaseConsumer,
    /// The same group read without waiting for transactions in flight
    /// ([`Self::last_published`]).
    unstable: BaseConsumer,
    group: ConsumerGroupMetadata,
    topic: String,
    /// When the input topic's id was last asked for, and the last id read
    /// ([`Self::input_topic_id`]).
    topic_id: std::sync::Mutex<(Option<Instant>, Option<TopicId>)>,
    /// `publish.position_metadata_bytes`.
    budget: usize,
    /// The history topic, if one is configured.
    history: Option<HistoryTopic>,
}

/// The history topic (`kafka.history_topic`): an input partition's records go to the
/// partition of that number modulo the topic's partition count, keyed by the input partition.
struct HistoryTopic {
    /// Reads it (assigned on demand, never subscribed, never commits).
    consumer: BaseConsumer<crate::kafka::EofExpected>,
    topic: String,
    /// Its partition count, once startup read it (0 until then: nothing is written).
    partitions: AtomicI32,
}

/// Where an input partition's history records go, or are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryTarget<'a> {
    /// The history topic.
    pub topic: &'a str,
    /// Its partition holding the input partition's records.
    pub partition: i32,
    /// The records' key: the input partition's number.
    pub key: String,
}

impl OutboxPositions {
    /// The positions of `kafka.input_topic`'s partitions (never subscribes: the client only
    /// reads committed offsets and names the group in publish transactions).
    ///
    /// # Errors
    /// librdkafka refused the settings.
    pub fn new(kafka: &KafkaConfig, budget: usize) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer = crate::kafka::consumer_config(kafka)
            .set("group.id", Self::group_id(kafka))
            // Never polled: no statistics events may pile up in its queue.
            .set("statistics.interval.ms", "0")
            // Read only stable positions (a transaction still committing is waited for).
            .set("isolation.level", "read_committed")
            .create()?;
        let unstable: BaseConsumer = crate::kafka::consumer_config(kafka)
            .set("group.id", Self::group_id(kafka))
            .set("statistics.interval.ms", "0")
            .set("isolation.level", "read_uncommitted")
            .create()?;
        let group = consumer
            .group_metadata()
            .ok_or(KafkaError::Global(rdkafka::types::RDKafkaErrorCode::Fail))?;
        let history = match kafka.history_topic.as_str() {
            "" => None,
            topic => Some(HistoryTopic {
                consumer: crate::kafka::consumer_config(kafka)
                    .set("group.id", format!("{}.history", kafka.group_id))
                    .set("statistics.interval.ms", "0")
                    .set("enable.partition.eof", "true")
                    // Rounds aborted (a fenced owner, a retried round) never happened.
                    .set("isolation.level", "read_committed")
                    .create_with_context(crate::kafka::EofExpected)?,
                topic: topic.to_owned(),
                partitions: AtomicI32::new(0),
            }),
        };
        Ok(Self {
            consumer,
            unstable,
            group,
            topic: kafka.input_topic.clone(),
            topic_id: std::sync::Mutex::new((None, None)),
            budget,
            history,
        })
    }

    /// Records the history topic's partition count (read at startup).
    pub fn set_history_partitions(&self, partitions: i32) {
        if let Some(history) = &self.history {
            history.partitions.store(partitions, Ordering::Relaxed);
        }
    }

    /// Where `partition`'s history records go (`None`: no history topic).
    pub fn history_target(&self, partition: i32) -> Option<HistoryTarget<'_>> {
        let history = self.history.as_ref()?;
        let count = history.partitions.load(Ordering::Relaxed);
        (count > 0).then(|| HistoryTarget {
            topic: &history.topic,
            partition: partition.rem_euclid(count),
            key: partition.to_string(),
        })
    }

    /// `published` with what its metadata dropped for room put back from the history topic
    /// (see [`Published::with_history`]), reading `partition`'s records until `give_up` at
    /// the latest. Blocks (the claim runs on the consumer thread).
    ///
    /// # Errors
    /// No history topic is configured, the broker did not answer in time, or a record of
    /// the partition is not a history record.
    pub fn with_history(
        &self,
        partition: i32,
        published: &Published,
        give_up: Instant,
    ) -> Result<Published, String> {
        let Some(target) = self.history_target(partition) else {
            return Err("no kafka.history_topic".to_owned());
        };
        let history = self.history.as_ref().expect("a target has a topic");
        let consumer = &history.consumer;
        let left = || give_up.saturating_duration_since(Instant::now());
        let (low, high) = consumer
            .fetch_watermarks(target.topic, target.partition, left())
            .map_err(|e| format!("reading the watermarks of {}: {e}", target.topic))?;
        let mut records = Vec::new();
        if high > low {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(target.topic, target.partition, Offset::Offset(low))
                .map_err(|e| e.to_string())?;
            consumer.assign(&tpl).map_err(|e| e.to_string())?;
            let read = loop {
                if left().is_zero() {
                    break Err(format!(
                        "{} partition {} not read to its end in time ({} records read)",
                        target.topic,
                        target.partition,
                        records.len()
                    ));
                }
                match consumer.poll(left().min(Duration::from_millis(200))) {
                    Some(Ok(m)) if m.key() == Some(target.key.as_bytes()) => {
                        match serde_json::from_slice::<HistoryRecord>(m.payload().unwrap_or(b"")) {
                            Ok(record) => records.push(record),
                            Err(e) => {
                                break Err(format!(
                                    "{} partition {} offset {}: not a history record: {e}",
                                    target.topic,
                                    target.partition,
                                    m.offset()
                                ))
                            }
                        }
                    }
                    Some(Err(KafkaError::PartitionEOF(p))) if p == target.partition => break Ok(()),
                    Some(Err(e)) => {
                        warn!(error = %e, topic = target.topic, "Reading the history topic.")
                    }
                    _ => {}
                }
            };
            let _ = consumer.unassign();
            read?;
        }
        Ok(published.with_history(&records, low > 0))
    }

    /// The bytes a position's metadata may take (`publish.position_metadata_bytes`).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// The consumer group the positions are committed for.
    pub fn group_id(kafka: &KafkaConfig) -> String {
        format!("{}.outbox", kafka.group_id)
    }

    /// What committed transactions published of `partition`'s outbox. Blocks (the claim
    /// runs on the consumer thread).
    ///
    /// # Errors
    /// The broker did not answer.
    pub fn published(&self, partition: i32) -> Result<Published, KafkaError> {
        Ok(self
            .read(&self.consumer, &[partition], READ_TIMEOUT)?
            .remove(0))
    }

    /// What committed transactions last published of each of `partitions`' outboxes (in that
    /// order), with one request of at most `timeout`, not waiting for transactions in flight
    /// (a stable read waits while any of the partitions has one, which under steady
    /// publishing is nearly always). Blocks.
    ///
    /// # Errors
    /// The broker did not answer.
    pub fn last_published(
        &self,
        partitions: &[i32],
        timeout: Duration,
    ) -> Result<Vec<Published>, KafkaError> {
        self.read(&self.unstable, partitions, timeout)
    }

    fn read(
        &self,
        consumer: &BaseConsumer,
        partitions: &[i32],
        timeout: Duration,
    ) -> Result<Vec<Published>, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for &partition in partitions {
            tpl.add_partition(&self.topic, partition);
        }
        let committed = consumer.committed_offsets(tpl, timeout)?;
        Ok(partitions
            .iter()
            .map(|&partition| {
                committed
                    .find_partition(&self.topic, partition)
                    .map(|e| Published::parse(e.metadata()))
                    .unwrap_or_default()
            })
            .collect())
    }

    /// The input topic's id ([`crate::ingest::topic_id`]). Asked for at most once per
    /// [`TOPIC_ID_REUSE`] (a rebalance claims its partitions one after the other, on the
    /// consumer thread), for at most [`TOPIC_ID_TIMEOUT`] and never past `give_up` (the
    /// claims' own deadline); otherwise, or when the cluster does not answer (a broker down:
    /// the request may wait for that one), the last id known to this process, and `None` if
    /// there is none or the broker reports no ids. A claim must not wait on it: it only
    /// guards against a topic recreated while tierd was down. Blocks, like [`Self::published`].
    pub fn input_topic_id(&self, give_up: Instant) -> Option<TopicId> {
        let mut known = self.topic_id.lock().expect("topic id lock");
        let (asked, id) = &mut *known;
        let timeout = give_up
            .saturating_duration_since(Instant::now())
            .min(TOPIC_ID_TIMEOUT);
        if asked.is_some_and(|at| at.elapsed() < TOPIC_ID_REUSE) || timeout.is_zero() {
            return id.clone();
        }
        *asked = Some(Instant::now());
        match topic_id(self.consumer.client(), &self.topic, timeout) {
            Ok(now) => {
                id.clone_from(&now);
                now
            }
            Err(error) => {
                warn!(%error, known = ?*id, "Reading the input topic's id failed; a claim compares the stored offset's topic with the last id known to this process (none: not compared).");
                id.clone()
            }
        }
    }

    /// The offsets to commit with a round that leaves the outbox at `published`.
    pub fn round_offsets(&self, partition: i32, published: &Published) -> TopicPartitionList {
        let last_id = published.last_id.as_deref().unwrap_or_default();
        // The offset itself only needs to be valid and to grow: the id's millisecond part.
        let ms = last_id
            .split_once('-')
            .and_then(|(ms, _)| ms.parse::<i64>().ok())
            .unwrap_or(0);
        let mut tpl = TopicPartitionList::new();
        // Adding a partition to a fresh list cannot fail.
        let _ = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(ms));
        if let Some(mut e) = tpl.find_partition(&self.topic, partition) {
            e.set_metadata(published.metadata());
        }
        tpl
    }

    /// The group named in publish transactions.
    pub fn group(&self) -> &ConsumerGroupMetadata {
        &self.group
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rules::rank::Cutoffs;

    fn switch(offset: i64, version: u64) -> CutoffsSwitch {
        CutoffsSwitch {
            offset,
            cutoffs: Cutoffs {
                version,
                rules: 7,
                population: vec![1_000_000],
                values: vec![Some(123_456_789_012), Some(98_765_432), None],
                at_or_above: vec![10_000, 200_000, 500_000],
                computed_at: 1_790_000_000_000,
            },
            at_ms: 1_790_000_000_500,
        }
    }

    /// The history topic's records put back what the metadata dropped for room: folded with
    /// no budget and aligned at the metadata's oldest entry, they give every switch and pass;
    /// a history that does not reach the metadata's oldest entry changes nothing; a history
    /// its retention trimmed reports the replay from before its first record as forgotten.
    #[test]
    fn the_history_puts_back_what_the_metadata_dropped() {
        let mut inline = Published::default();
        let mut history = Vec::new();
        for i in 0..60 {
            let record = HistoryRecord {
                through: Some(i * 10 + 5),
                switches: vec![switch(i * 10, i as u64 + 1)],
                passes: vec![pass(i * 10 + 1, 1_000 + i, i as u64 + 1)],
                sweeps: Vec::new(),
            };
            inline = inline.after(
                &format!("{i}-0"),
                record.through,
                &record.switches,
                &record.passes,
                None,
                1000,
            );
            history.push(record);
        }
        assert!(inline.switches.len() < 60 && inline.passes.len() < 60);
        assert!(inline.reach_exceeded(Some(0)));
        assert!(!inline.reach_exceeded(Some(595)));

        let full = inline.with_history(&history, false);
        assert_eq!(full.switches.len(), 60);
        assert_eq!(full.passes.len(), 60);
        assert_eq!(full.forgotten, None);
        assert_eq!(full.passes_from, Some(1));
        assert_eq!(full.switches_from(Some(0), 0).len(), 60);
        assert_eq!(full.passes_to_replay(Some(0)).len(), 60);
        // The metadata's own part and position stay as they are.
        assert_eq!(full.last_id, inline.last_id);
        assert_eq!(
            full.switches[60 - inline.switches.len()..],
            inline.switches[..]
        );
        assert!(!full.reach_exceeded(Some(1)));

        // Only the oldest ten rounds read: nothing to align with.
        assert_eq!(inline.with_history(&history[..10], false), inline);

        // Retention deleted the first twenty rounds.
        let trimmed = inline.with_history(&history[20..], true);
        assert_eq!(trimmed.switches.len(), 40);
        assert_eq!(trimmed.forgotten, Some(200));
        assert_eq!(trimmed.passes_from, Some(201));
        assert!(trimmed.reach_exceeded(Some(150)));
        assert!(!trimmed.reach_exceeded(Some(201)));
    }

    #[test]
    fn a_bare_id_is_still_read_and_written_as_before() {
        let p = Published::parse("1700000000000-3");
        assert_eq!(p.last_id.as_deref(), Some("1700000000000-3"));
        assert!(p.switches.is_empty());
        assert_eq!(p.metadata(), "1700000000000-3");
        assert_eq!(Published::parse(""), Published::default());
    }

    #[test]
    fn switches_round_trip_once_each_and_filter_by_offset() {
        let p = Published::default()
            .after(
                "1-0",
                Some(10),
                &[switch(10, 1)],
                &[],
                None,
                METADATA_BUDGET,
            )
            .after(
                "2-0",
                Some(25),
                &[switch(10, 1), switch(20, 2)],
                &[],
                None,
                METADATA_BUDGET,
            );
        assert_eq!(p.switches, vec![switch(10, 1), switch(20, 2)]);
        let back = Published::parse(&p.metadata());
        assert_eq!(back, p);
        assert_eq!(back.last_id.as_deref(), Some("2-0"));
        assert_eq!(back.through, Some(25));
        // A replay publishes from further back: the published input's end stays where it was.
        assert_eq!(
            back.after("3-0", Some(12), &[], &[], None, METADATA_BUDGET)
                .through,
            Some(25)
        );
        assert_eq!(back.switches_from(Some(11), 0), vec![switch(20, 2)]);
        assert_eq!(back.switches_from(None, 0).len(), 2);
        // Two moves at one offset, the first already in the stored state.
        let p = Published::default().after(
            "3-0",
            Some(30),
            &[switch(30, 3), switch(30, 4)],
            &[],
            None,
            METADATA_BUDGET,
        );
        assert_eq!(p.switches_from(Some(30), 3), vec![switch(30, 4)]);
    }

    #[test]
    fn the_metadata_stays_within_kafkas_bound_forgetting_the_oldest() {
        let mut p = Published::default();
        for i in 0..200 {
            p = p.after(
                &format!("{i}-0"),
                Some(i * 10),
                &[switch(i * 10, i as u64)],
                &[],
                None,
                METADATA_BUDGET,
            );
        }
        let m = p.metadata();
        assert!(m.len() <= METADATA_BUDGET, "{}", m.len());
        assert_eq!(
            p.after("200-0", Some(1990), &[], &[], None, METADATA_BUDGET)
                .metadata()
                .len(),
            m.len()
        );
        let back = Published::parse(&m);
        let kept = back.switches.len();
        assert!(kept >= 8, "room for a useful history: {kept}");
        assert_eq!(back.switches.last(), Some(&switch(1990, 199)));
        assert_eq!(back.forgotten, Some(back.switches[0].offset - 10));
    }

    fn pass(offset: i64, upto: i64, cutoffs: u64) -> TimerPass {
        TimerPass {
            offset,
            upto,
            cutoffs,
        }
    }

    #[test]
    fn timer_passes_round_trip_merge_per_offset_and_share_the_budget() {
        let p = Published::default()
            .after(
                "1-0",
                Some(10),
                &[],
                &[pass(10, 1_000, 0), pass(10, 2_000, 0)],
                None,
                METADATA_BUDGET,
            )
            .after(
                "2-0",
                Some(12),
                &[switch(12, 1)],
                &[pass(12, 3_000, 0)],
                None,
                METADATA_BUDGET,
            )
            .after(
                "3-0",
                Some(12),
                &[],
                &[pass(12, 4_000, 1), pass(12, 4_000, 1)],
                None,
                METADATA_BUDGET,
            );
        // One per offset and cut-offs version, at the latest horizon.
        assert_eq!(
            p.passes,
            vec![pass(10, 2_000, 0), pass(12, 3_000, 0), pass(12, 4_000, 1)]
        );
        let back = Published::parse(&p.metadata());
        assert_eq!(back, p);
        assert_eq!(back.passes_to_replay(Some(11)).len(), 2);
        assert_eq!(back.passes_to_replay(None).len(), 3);
        assert_eq!(back.passes_from, Some(10));
        // A replay fires a known pass again, and an older one whose entry was dropped: neither
        // is added twice or out of order.
        let again = back.after(
            "4-0",
            Some(12),
            &[],
            &[pass(10, 2_000, 0), pass(9, 500, 0)],
            None,
            METADATA_BUDGET,
        );
        assert_eq!(again.passes, back.passes);
        // Passes keep to their share: switches keep their room, and the passes' coverage moves
        // past what they dropped.
        let mut p = Published::default();
        for i in 0..400 {
            let switches = if i % 10 == 0 {
                vec![switch(i, i as u64)]
            } else {
                vec![]
            };
            p = p.after(
                &format!("{i}-0"),
                Some(i),
                &switches,
                &[pass(i, i * 1_000, 0)],
                None,
                METADATA_BUDGET,
            );
        }
        assert!(p.metadata().len() <= METADATA_BUDGET);
        assert!(serde_json::to_string(&p.passes).unwrap().len() <= passes_budget(METADATA_BUDGET));
        assert!(
            p.switches.len() >= 8,
            "switches keep room: {}",
            p.switches.len()
        );
        assert!(p.passes.len() >= 25, "{}", p.passes.len());
        assert_eq!(p.passes_from, Some(p.passes[0].offset));
        assert_eq!(p.passes.last(), Some(&pass(399, 399_000, 0)));
    }

    #[test]
    fn a_rules_sweep_keeps_its_first_record_per_rules_version() {
        let sweep = |offset, at, rules| RulesSweep {
            offset,
            at,
            rules,
            from: Some(3),
            done: None,
        };
        let p = Published::default().after(
            "1-0",
            Some(10),
            &[],
            &[],
            Some(sweep(10, 1_000, 7)),
            METADATA_BUDGET,
        );
        let back = Published::parse(&p.metadata());
        assert_eq!(back.sweep, Some(sweep(10, 1_000, 7)));
        // A resumed sweep recorded again (another owner, a replay) keeps the first time.
        let again = back.after(
            "2-0",
            Some(12),
            &[],
            &[],
            Some(sweep(12, 2_000, 7)),
            METADATA_BUDGET,
        );
        assert_eq!(again.sweep, Some(sweep(10, 1_000, 7)));
        assert_eq!(
            again
                .after("3-0", Some(12), &[], &[], None, METADATA_BUDGET)
                .sweep,
            again.sweep
        );
        // A newer rules version replaces it.
        let next = again.after(
            "4-0",
            Some(20),
            &[],
            &[],
            Some(sweep(20, 3_000, 8)),
            METADATA_BUDGET,
        );
        assert_eq!(next.sweep, Some(sweep(20, 3_000, 8)));
        assert_eq!(next.earlier_sweeps, vec![sweep(10, 1_000, 7)]);
    }

    #[test]
    fn a_sweeps_completion_and_the_next_ones_start_in_one_round_are_both_kept() {
        let sweep = |offset, rules, done| RulesSweep {
            offset,
            at: 1_000,
            rules,
            from: Some(3),
            done,
        };
        let p = Published::default().after(
            "1-0",
            Some(10),
            &[],
            &[],
            Some(sweep(10, 7, None)),
            METADATA_BUDGET,
        );
        let both = p.after_sweeps(
            "2-0",
            Some(30),
            &[],
            &[],
            &[sweep(10, 7, Some(25)), sweep(30, 8, None)],
            METADATA_BUDGET,
        );
        assert_eq!(both.earlier_sweeps, vec![sweep(10, 7, Some(25))]);
        assert_eq!(both.sweep, Some(sweep(30, 8, None)));
        assert_eq!(both.through, Some(30));
    }

    #[test]
    fn earlier_sweeps_are_kept_for_replays_over_several_rules_changes() {
        let sweep = |offset, rules| RulesSweep {
            offset,
            at: offset * 1_000,
            rules,
            from: Some(rules - 1),
            done: None,
        };
        let mut p = Published::default();
        for v in 1..=6u32 {
            let o = i64::from(v) * 10;
            p = p.after(
                &format!("{v}-0"),
                Some(o),
                &[],
                &[],
                Some(sweep(o, v)),
                METADATA_BUDGET,
            );
        }
        let p = Published::parse(&p.metadata());
        assert_eq!(p.sweep, Some(sweep(60, 6)));
        assert_eq!(
            p.earlier_sweeps,
            vec![sweep(30, 3), sweep(40, 4), sweep(50, 5)]
        );
        // The history topic has the two the metadata dropped: a replay from before the
        // oldest kept one reads it, and gets all six.
        assert!(p.reach_exceeded(Some(25)) && !p.reach_exceeded(Some(30)));
        let history: Vec<HistoryRecord> = (1..=6u32)
            .map(|v| HistoryRecord {
                through: Some(i64::from(v) * 10),
                sweeps: vec![sweep(i64::from(v) * 10, v)],
                ..HistoryRecord::default()
            })
            .collect();
        let full = p.with_history(&history, false);
        assert_eq!(full.sweep, p.sweep);
        assert_eq!(
            full.earlier_sweeps,
            (1..=5).map(|v| sweep(v * 10, v as u32)).collect::<Vec<_>>()
        );
        // A replay completing an earlier sweep records it again: it completes that one, the
        // latest stays the latest.
        let replayed = p.after(
            "7-0",
            Some(45),
            &[],
            &[],
            Some(RulesSweep {
                done: Some(45),
                ..sweep(40, 4)
            }),
            METADATA_BUDGET,
        );
        assert_eq!(replayed.sweep, Some(sweep(60, 6)));
        assert_eq!(replayed.earlier_sweeps[1].done, Some(45));
        assert_eq!(
            replayed.sweeps().map(|s| s.rules).collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
        // An older sweep dropped for room and recorded again by a replay goes back in its
        // place: the latest stays the latest.
        let mut trimmed = replayed.clone();
        trimmed.earlier_sweeps.remove(1);
        let back = trimmed.after(
            "8-0",
            Some(46),
            &[],
            &[],
            Some(sweep(40, 4)),
            METADATA_BUDGET,
        );
        assert_eq!(back.sweep, Some(sweep(60, 6)));
        assert_eq!(
            back.sweeps().map(|s| s.rules).collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
    }

    #[test]
    fn passes_between_two_sweeps_started_at_one_offset_stay_apart() {
        // A quiet partition: v2's sweep starts at offset 10 (time 1,000), v3's at the same
        // offset (time 3,000); a pass v2 fired between them and one v3 fired after its own.
        let sweep = |at, rules| RulesSweep {
            offset: 10,
            at,
            rules,
            from: Some(rules - 1),
            done: Some(10),
        };
        let p = Published::default()
            .after(
                "1-0",
                Some(10),
                &[],
                &[],
                Some(sweep(1_000, 2)),
                METADATA_BUDGET,
            )
            .after(
                "2-0",
                Some(10),
                &[],
                &[pass(10, 2_000, 0)],
                Some(sweep(3_000, 3)),
                METADATA_BUDGET,
            )
            .after(
                "3-0",
                Some(10),
                &[],
                &[pass(10, 4_000, 0)],
                None,
                METADATA_BUDGET,
            );
        assert_eq!(p.passes, vec![pass(10, 2_000, 0), pass(10, 4_000, 0)]);
    }

    #[test]
    fn passes_on_either_side_of_a_sweep_start_at_one_offset_stay_apart() {
        let start = RulesSweep {
            offset: 10,
            at: 5_000,
            rules: 8,
            from: Some(7),
            done: None,
        };
        // The previous owner's pass at offset 10 (under the earlier rules), then the new
        // owner's sweep start there and, after its sweep, its own pass at the same offset.
        let p = Published::default()
            .after(
                "1-0",
                Some(10),
                &[],
                &[pass(10, 4_000, 0)],
                None,
                METADATA_BUDGET,
            )
            .after("2-0", Some(10), &[], &[], Some(start), METADATA_BUDGET)
            .after(
                "3-0",
                Some(10),
                &[],
                &[pass(10, 6_000, 0)],
                None,
                METADATA_BUDGET,
            );
        assert_eq!(p.passes, vec![pass(10, 4_000, 0), pass(10, 6_000, 0)]);
        // Fired again by a replay: each merges with its own side.
        let again = p.after(
            "4-0",
            Some(10),
            &[],
            &[pass(10, 4_000, 0), pass(10, 6_500, 0)],
            None,
            METADATA_BUDGET,
        );
        assert_eq!(again.passes, vec![pass(10, 4_000, 0), pass(10, 6_500, 0)]);
    }
}
