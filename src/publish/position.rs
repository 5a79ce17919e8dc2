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
use crate::store::outbox::{RulesSweep, StoredEntry, TimerPass};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};
use tracing::warn;

/// How long a history read goes on polling after reaching the partition's end without the
/// position's last record (a transaction of another partition's round still open before it;
/// they time out after `transaction.timeout.ms`, 10 s by default).
const HISTORY_END_GRACE: Duration = Duration::from_secs(30);

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

/// What a partition's history records hold for a replay: the published position completed
/// from them ([`Published::with_history`]) and the texts of the rules versions they name
/// ([`HistoryRecord::rules`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// The published position with what its metadata dropped put back.
    pub published: Published,
    /// Rules texts by version hash.
    pub rules: BTreeMap<u32, String>,
}

/// One publish round's cut-offs switches, timer passes and rules sweeps, as written to the
/// history topic (`kafka.history_topic`) in the round's transaction: the offset metadata
/// keeps only the newest of them, the topic every one (within its retention), so a replay
/// reaching back further than the metadata still re-publishes each change with its body.
/// Keyed by the partition's outbox key (prefix, group, topic and partition).
///
/// Records are numbered per partition (`n`, 1, 2, …; the published position keeps the last,
/// [`Published::history_records`]), and each says what was recorded before it (`pk`, `pp`):
/// a reader knows whether it holds every record since a point and what came before that
/// point, whatever retention deleted, whenever the topic was first used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// Its number among the partition's records (a run restarts at 1 after rounds that
    /// wrote none: an older binary, no history topic).
    pub n: u64,
    /// The newest input offset of a cut-offs switch recorded before this record (kept in
    /// the position or dropped from it), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pk: Option<i64>,
    /// The same for timer passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pp: Option<i64>,
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
    /// The texts of the rules the round's sweeps moved customers to and from (those the
    /// publishing process knows), by version hash: a replay over several rules changes finds
    /// every version it needs here, also one no running process has a file of any more.
    #[serde(rename = "r", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<u32, String>,
}

impl HistoryRecord {
    /// Whether the round recorded anything a replay needs.
    pub fn is_empty(&self) -> bool {
        self.switches.is_empty() && self.passes.is_empty() && self.sweeps.is_empty()
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
    /// How many history records in a row the partition's rounds wrote, up to this position
    /// (0: the last round with anything to record wrote none; see [`HistoryRecord`]).
    #[serde(rename = "hn", default, skip_serializing_if = "is_zero")]
    pub history_records: u64,
    /// The last parked dead letter delivered (its id in the parked stream): a retry finds it
    /// here if removing it from Redis failed after Kafka took it, and only removes it.
    #[serde(rename = "pk", default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<String>,
    /// The outbox ids of the newest dead letters the partition's publishers parked (Kafka
    /// refused them), oldest first, at most [`PARKED_LETTERS_KEPT`]. Redis restored from
    /// before a parking brings the letter back into the outbox below the published id, where
    /// it would be taken for one that went out and trimmed; a claim or publisher finding one
    /// of these ids there parks it again instead.
    #[serde(rename = "pd", default, skip_serializing_if = "Vec::is_empty")]
    pub parked_letters: Vec<String>,
    /// The highest tier-change sequence the partition published (0: none recorded, or only by
    /// older binaries): a replay that cannot reproduce what was published numbers its changes
    /// above it (`engine::changes::number_above`).
    #[serde(rename = "q", default, skip_serializing_if = "is_zero")]
    pub max_sequence: u64,
    /// The highest sequence floor published changes were numbered above (0: none): a claim
    /// finding Redis keeps a lower one knows Redis lost the commit that raised it.
    #[serde(rename = "sf", default, skip_serializing_if = "is_zero")]
    pub sequence_floor: u64,
}

/// How many parked dead letters' outbox ids the published position keeps
/// ([`Published::parked_letters`]; about 20 bytes each).
pub const PARKED_LETTERS_KEPT: usize = 8;

fn is_zero(n: &u64) -> bool {
    *n == 0
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
        if let Some(budget) = budget {
            next.make_room(budget);
        }
    }

    /// Records the sequences of a round's published outbox entries (each carries the highest
    /// sequence of the commit that wrote it, and the floor it was numbered above): both only
    /// ever rise. Within `budget` bytes of metadata (the oldest switches and sweeps give way,
    /// as in [`Self::after`]).
    pub fn add_sequences(&mut self, round: &[StoredEntry], budget: usize) {
        let before = (self.max_sequence, self.sequence_floor);
        for e in round {
            self.max_sequence = self.max_sequence.max(e.max_sequence.unwrap_or(0));
            self.sequence_floor = self.sequence_floor.max(e.seq_floor.unwrap_or(0));
        }
        if (self.max_sequence, self.sequence_floor) != before {
            self.make_room(budget);
        }
    }

    /// The position after a round that delivered the parked dead letter `id` (the outbox is
    /// where it was), within `budget` bytes of metadata.
    #[must_use]
    pub fn after_parked(&self, id: &str, budget: usize) -> Self {
        let mut next = self.clone();
        next.parked = Some(id.to_owned());
        next.make_room(budget);
        next
    }

    /// Records the outbox ids `ids` of dead letters parked since this position was committed
    /// (kept: the newest [`PARKED_LETTERS_KEPT`]), within `budget` bytes of metadata.
    pub fn add_parked_letters(&mut self, ids: &[String], budget: usize) {
        if ids.is_empty() {
            return;
        }
        for id in ids {
            // A letter parked again counts as the newest.
            self.parked_letters.retain(|p| p != id);
            self.parked_letters.push(id.clone());
        }
        let over = self
            .parked_letters
            .len()
            .saturating_sub(PARKED_LETTERS_KEPT);
        self.parked_letters.drain(..over);
        self.make_room(budget);
    }

    /// Forgets the parked letter that had the outbox id `id`: Kafka has it (a retry delivered
    /// it), so one Redis brings back is trimmed like the rest of its round, not parked and
    /// delivered again.
    pub fn forget_parked_letter(&mut self, id: &str) {
        self.parked_letters.retain(|p| p != id);
    }

    /// Drops the oldest switches (remembered in `forgotten`), then the oldest earlier sweeps,
    /// until the metadata fits in `budget` bytes.
    fn make_room(&mut self, budget: usize) {
        let over = |p: &Self| p.metadata().len() > budget;
        while over(self) && !self.switches.is_empty() {
            let dropped = self.switches.remove(0);
            self.forgotten = self.forgotten.max(Some(dropped.offset));
        }
        while over(self) && !self.earlier_sweeps.is_empty() {
            self.earlier_sweeps.remove(0);
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

    /// Whether a replay from `next_offset` (`None`: nothing applied) re-applies published
    /// input further back than the metadata keeps: a cut-off switch, a timer pass or a rules
    /// sweep it needs may have been dropped for room (then only the history topic has it —
    /// or there was none: the first pass recorded, the partition's first rules). Only a
    /// replay counts (Redis lost writes: its offset is below what the published changes
    /// reach); a claim that applied everything published reads nothing.
    pub fn reach_exceeded(&self, next_offset: Option<i64>) -> bool {
        let from = next_offset.unwrap_or(-1);
        self.through.is_some_and(|through| from < through)
            && (self.forgotten.is_some_and(|f| f >= from)
                || self.passes_from.is_some_and(|f| f > from)
                || self
                    .sweeps()
                    .next()
                    .is_some_and(|oldest| oldest.offset > from))
    }

    /// The history record of a round that records `switches`, `passes` and `sweeps` on top
    /// of this position (the next number; what was recorded before it).
    pub fn history_record(
        &self,
        through: Option<i64>,
        switches: &[CutoffsSwitch],
        passes: &[TimerPass],
        sweeps: &[RulesSweep],
    ) -> HistoryRecord {
        HistoryRecord {
            n: self.history_records + 1,
            pk: self
                .switches
                .iter()
                .map(|s| s.offset)
                .max()
                .max(self.forgotten),
            pp: self
                .passes
                .iter()
                .map(|p| p.offset)
                .max()
                .or(self.passes_from.map(|from| from - 1)),
            through,
            switches: switches.to_vec(),
            passes: passes.to_vec(),
            sweeps: sweeps.to_vec(),
            rules: BTreeMap::new(),
        }
    }

    /// This position with what its metadata dropped for room put back from `history` (the
    /// partition's history records as read, oldest first).
    ///
    /// The records used are the last unbroken run of numbers, which must end at this
    /// position's last record (otherwise the read is incomplete: an error). Folded with no
    /// budget, they hold every switch, pass and sweep recorded since the run's first record;
    /// what the metadata keeps from before that record stays in front. What neither holds is
    /// reported as before: a switch recorded before the run and no longer kept sets
    /// `forgotten` (the run's first record says where the newest was), and passes count as
    /// complete only after the newest such pass.
    ///
    /// # Errors
    /// The records read end before this position's last one.
    pub fn with_history(&self, history: &[HistoryRecord]) -> Result<Self, String> {
        if self.history_records == 0 {
            // The last rounds wrote no history (an older binary, no history topic).
            return Ok(self.clone());
        }
        // The run ends at this position's last record (the partition's publisher may have
        // written newer ones since: they are not this position's).
        let Some(end) = history.iter().rposition(|r| r.n == self.history_records) else {
            return Err(format!(
                "the history topic does not hold the partition's record number {} (read {} of its records, the last numbered {})",
                self.history_records,
                history.len(),
                history.last().map_or(0, |r| r.n)
            ));
        };
        let mut start = end;
        while start > 0 && history[start - 1].n + 1 == history[start].n {
            start -= 1;
        }
        let run = &history[start..=end];
        let first = &run[0];
        // A replay records switches again: each is kept once.
        let mut seen = std::collections::HashSet::new();
        let mut full = Self::default();
        for record in run {
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
        let mut merged = self.clone();
        // What the metadata keeps from before the run goes first.
        let before: Vec<CutoffsSwitch> = self
            .switches
            .iter()
            .filter(|s| !seen.contains(&(s.offset, s.cutoffs.version)))
            .cloned()
            .collect();
        // The metadata drops its oldest first: if it keeps any switch from before the run,
        // every switch it dropped is from before the run, and its `forgotten` stands.
        // Otherwise what it dropped after the run began is in the run, and before it the
        // newest switch recorded is the first record's.
        merged.forgotten = if before.is_empty() {
            // Both bound what is missing (the merge holds all the metadata holds): the lower.
            first.pk.zip(self.forgotten).map(|(a, b)| a.min(b))
        } else {
            self.forgotten
        };
        merged.switches = before
            .into_iter()
            .chain(full.switches.iter().cloned())
            .collect();
        // A replay in the run may have recorded an older switch again after newer ones.
        merged
            .switches
            .sort_by_key(|s| (s.offset, s.cutoffs.version));
        let mut all: Vec<RulesSweep> = self
            .sweeps()
            .filter(|s| !full.sweeps().any(|f| f.rules == s.rules))
            .chain(full.sweeps())
            .collect();
        // In the order they started (a replay in the run may have recorded an earlier
        // sweep's completion again).
        all.sort_by_key(|s| (s.offset, s.at));
        if let Some((latest, earlier)) = all.split_last() {
            merged.sweep = Some(*latest);
            merged.earlier_sweeps = earlier.to_vec();
        }
        // Passes at an offset where sweeps started are told apart by the side of them they
        // fired on (as in `add`).
        let side = |p: &TimerPass| {
            let here = all.iter().filter(|s| s.offset == p.offset);
            let (count, before) =
                here.fold((0, 0), |(n, b), s| (n + 1, b + usize::from(s.at <= p.upto)));
            (count > 0).then_some(before)
        };
        let in_run = |p: &TimerPass| {
            full.passes
                .iter()
                .any(|f| f.offset == p.offset && f.cutoffs == p.cutoffs && side(f) == side(p))
        };
        let before: Vec<TimerPass> = self.passes.iter().filter(|p| !in_run(p)).copied().collect();
        merged.passes_from = if before.is_empty() {
            let from_run = match first.pp {
                // Complete after the newest pass recorded before the run.
                Some(newest) => Some(newest + 1),
                None => full.passes_from,
            };
            // Both are complete from their bound (the merge holds all the metadata holds).
            match (from_run, self.passes_from) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        } else {
            self.passes_from
        };
        merged.passes = before
            .into_iter()
            .chain(full.passes.iter().copied())
            .collect();
        merged.passes.sort_by_key(|p| p.offset);
        Ok(merged)
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
            && self.history_records == 0
            && self.parked.is_none()
            && self.parked_letters.is_empty()
            && self.max_sequence == 0
            && self.sequence_floor == 0
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
        let mut switches: Vec<CutoffsSwitch> = self
            .switches
            .iter()
            .filter(|s| s.offset >= from && s.cutoffs.version > applied)
            .cloned()
            .collect();
        // In the order the replay meets them (a dropped switch recorded again by a replay is
        // appended after newer ones).
        switches.sort_by_key(|s| (s.offset, s.cutoffs.version));
        switches
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
    /// The settings of the output topic's readers ([`Self::last_told`]) and its name.
    output: (rdkafka::ClientConfig, String),
}

/// The history topic (`kafka.history_topic`): an input partition's records go to the
/// partition of that number modulo the topic's partition count, keyed by the partition's
/// outbox key.
struct HistoryTopic {
    /// The settings of its readers (one per read: reads of several partitions may run at
    /// once; assigned, never subscribed, never committing).
    reader: rdkafka::ClientConfig,
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
    /// The records' key: the partition's outbox key.
    pub key: &'a str,
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
                reader: crate::kafka::consumer_config(kafka)
                    .set("group.id", format!("{}.history", kafka.group_id))
                    .set("statistics.interval.ms", "0")
                    .set("enable.partition.eof", "true")
                    // Records deleted by retention under the reader: an error, not a jump.
                    .set("auto.offset.reset", "error")
                    // Rounds aborted (a fenced owner, a retried round) never happened.
                    .set("isolation.level", "read_committed")
                    .clone(),
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
            output: (
                super::readback::reader_config(kafka),
                kafka.output_topic.clone(),
            ),
        })
    }

    /// The output topic's reader settings and name.
    pub(super) fn output_reader(&self) -> (&rdkafka::ClientConfig, &str) {
        (&self.output.0, &self.output.1)
    }

    /// The client that reads without waiting for transactions in flight (high watermarks).
    pub(super) fn unstable_consumer(&self) -> &BaseConsumer {
        &self.unstable
    }

    /// Records the history topic's partition count (read at startup).
    pub fn set_history_partitions(&self, partitions: i32) {
        if let Some(history) = &self.history {
            history.partitions.store(partitions, Ordering::Relaxed);
        }
    }

    /// Where `partition`'s history records go (`None`: no history topic); `key` is the
    /// partition's outbox key.
    pub fn history_target<'a>(&'a self, partition: i32, key: &'a str) -> Option<HistoryTarget<'a>> {
        let history = self.history.as_ref()?;
        let count = history.partitions.load(Ordering::Relaxed);
        (count > 0).then(|| HistoryTarget {
            topic: &history.topic,
            partition: partition.rem_euclid(count),
            key,
        })
    }

    /// `published` with what its metadata dropped for room put back from the history topic
    /// (see [`Published::with_history`]), with the rules texts the records hold: reads the
    /// records of the partition whose outbox key is `key` from the start of their history
    /// partition to its end, until `give_up` at the latest or until `abort` is set. Blocks.
    ///
    /// # Errors
    /// No history topic is configured, the broker did not answer in time or reported an
    /// error, the read was aborted, or the records read end before the position's last.
    pub fn with_history(
        &self,
        partition: i32,
        key: &str,
        published: &Published,
        give_up: Instant,
        abort: &AtomicBool,
    ) -> Result<History, String> {
        let (Some(history), Some(target)) =
            (self.history.as_ref(), self.history_target(partition, key))
        else {
            return Err("no kafka.history_topic".to_owned());
        };
        let consumer: BaseConsumer<crate::kafka::EofExpected> = history
            .reader
            .create_with_context(crate::kafka::EofExpected)
            .map_err(|e| format!("creating a reader: {e}"))?;
        let left = || give_up.saturating_duration_since(Instant::now());
        let (low, _) = consumer
            .fetch_watermarks(
                target.topic,
                target.partition,
                left().min(Duration::from_secs(10)),
            )
            .map_err(|e| format!("reading the watermarks of {}: {e}", target.topic))?;
        // The high watermark itself (a read_committed query answers the last stable offset,
        // which an open transaction holds back).
        let (_, high) = self
            .unstable
            .fetch_watermarks(
                target.topic,
                target.partition,
                left().min(Duration::from_secs(10)),
            )
            .map_err(|e| format!("reading the high watermark of {}: {e}", target.topic))?;
        let mut records = Vec::new();
        if high > low {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(target.topic, target.partition, Offset::Offset(low))
                .map_err(|e| e.to_string())?;
            consumer.assign(&tpl).map_err(|e| e.to_string())?;
            // The end a read_committed reader sees is the first transaction still open: one of
            // another partition's rounds may hide this position's last record for a moment.
            let mut end_seen: Option<Instant> = None;
            let last = published.history_records;
            let at = |offset: i64| {
                format!(
                    "{} partition {} offset {offset}",
                    target.topic, target.partition
                )
            };
            loop {
                if abort.load(Ordering::Relaxed) {
                    return Err("aborted (the partition was released)".to_owned());
                }
                if left().is_zero() {
                    return Err(format!(
                        "{} partition {} not read to its end in time ({} records of this partition read)",
                        target.topic,
                        target.partition,
                        records.len()
                    ));
                }
                match consumer.poll(left().min(Duration::from_millis(200))) {
                    Some(Ok(m)) if m.key() == Some(target.key.as_bytes()) => {
                        match serde_json::from_slice::<HistoryRecord>(m.payload().unwrap_or(b"")) {
                            Ok(record) => {
                                records.push(record);
                                // The end moved on: it is looked for again.
                                end_seen = None;
                            }
                            Err(e) => {
                                return Err(format!(
                                    "{}: not a history record: {e}",
                                    at(m.offset())
                                ))
                            }
                        }
                    }
                    Some(Ok(_)) | None => {}
                    Some(Err(KafkaError::PartitionEOF(p))) if p == target.partition => {
                        if records.iter().any(|r| r.n == last) {
                            break;
                        }
                        // Past the high watermark read before the read began (the position's
                        // record was committed before it, so it is below): every transaction
                        // below it is decided and visible, so the record is not in the topic
                        // (retention deleted it, or it was never written there).
                        let position = consumer.position().ok().and_then(|tpl| {
                            tpl.find_partition(target.topic, target.partition)
                                .and_then(|e| e.offset().to_raw())
                        });
                        if position.is_some_and(|at| at >= high) {
                            return Err(format!(
                                "{} partition {}: read to its end (offset {high}) without the partition's record number {last}",
                                target.topic, target.partition
                            ));
                        }
                        end_seen.get_or_insert_with(Instant::now);
                    }
                    Some(Err(e)) => return Err(format!("reading {}: {e}", target.topic)),
                }
                // Checked on every poll: librdkafka reports the end once, not again until
                // more records arrive.
                if end_seen.is_some_and(|since| since.elapsed() >= HISTORY_END_GRACE) {
                    return Err(format!(
                        "{} partition {}: its end reached without the partition's record number {last}",
                        target.topic, target.partition
                    ));
                }
            }
        }
        let full = published.with_history(&records)?;
        // Every text read counts, in or out of the run used: a text is its version's.
        let rules = records.into_iter().flat_map(|r| r.rules).collect();
        Ok(History {
            published: full,
            rules,
        })
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
        partitions
            .iter()
            .map(
                |&partition| match committed.find_partition(&self.topic, partition) {
                    // A partition's own error (the request as a whole answered): taken as
                    // "nothing published", the next round would commit a position that forgot
                    // everything recorded.
                    Some(e) => e.error().map(|()| Published::parse(e.metadata())),
                    None => Ok(Published::default()),
                },
            )
            .collect()
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

    /// Rounds `rounds` as the publisher records them: a switch and a pass per round, the
    /// metadata within 1000 bytes; with `history`, each round's record is written too.
    fn publish_rounds(
        mut p: Published,
        rounds: std::ops::Range<i64>,
        history: Option<&mut Vec<HistoryRecord>>,
    ) -> Published {
        let mut written = Vec::new();
        for i in rounds {
            let (switches, passes) = (
                vec![switch(i * 10, i as u64 + 1)],
                vec![pass(i * 10 + 1, 1_000 + i, i as u64 + 1)],
            );
            let record = p.history_record(Some(i * 10 + 5), &switches, &passes, &[]);
            p = p.after(
                &format!("{i}-0"),
                Some(i * 10 + 5),
                &switches,
                &passes,
                None,
                1000,
            );
            p.history_records = if history.is_some() { record.n } else { 0 };
            written.push(record);
        }
        if let Some(history) = history {
            history.extend(written);
        }
        p
    }

    /// The history topic's records put back what the metadata dropped for room: the last
    /// unbroken run of record numbers, folded with no budget, gives every switch and pass
    /// since its first record, and that record says what came before it (retention deleted
    /// records, or the topic was first used later); a read that does not reach the
    /// position's last record is refused.
    #[test]
    fn the_history_puts_back_what_the_metadata_dropped() {
        let mut history = Vec::new();
        let inline = publish_rounds(Published::default(), 0..60, Some(&mut history));
        assert_eq!(inline.history_records, 60);
        assert!(inline.switches.len() < 60 && inline.passes.len() < 60);
        // Only a replay of published input reads the history.
        assert!(inline.reach_exceeded(Some(0)) && inline.reach_exceeded(None));
        assert!(!inline.reach_exceeded(Some(595)));
        assert!(!inline.reach_exceeded(Some(700)));

        let full = inline.with_history(&history).unwrap();
        assert_eq!(full.switches.len(), 60);
        assert_eq!(full.passes.len(), 60);
        assert_eq!((full.forgotten, full.passes_from), (None, Some(1)));
        assert_eq!(full.switches_from(Some(0), 0).len(), 60);
        assert_eq!(full.passes_to_replay(Some(0)).len(), 60);
        // The metadata's own part and position stay as they are.
        assert_eq!(full.last_id, inline.last_id);
        assert_eq!(
            full.switches[60 - inline.switches.len()..],
            inline.switches[..]
        );
        assert!(!full.reach_exceeded(Some(1)));

        // A read that ends before the position's last record.
        assert!(inline.with_history(&history[..59]).is_err());
        // Records the partition's new publisher wrote after this position are not its.
        let mut newer = history.clone();
        let after = publish_rounds(inline.clone(), 60..62, Some(&mut newer));
        assert_eq!(after.history_records, 62);
        assert_eq!(inline.with_history(&newer).unwrap(), full);
        // A switch a replay recorded again after newer ones is replayed in its place.
        let mut replayed = full.clone();
        replayed.switches.push(switch(5, 900));
        let order: Vec<i64> = replayed
            .switches_from(Some(0), 0)
            .iter()
            .map(|s| s.offset)
            .collect();
        assert_eq!(order[..3], [0, 5, 10]);

        // Retention deleted the first twenty records: before the rest, the newest switch
        // recorded was at 190, the newest pass at 191.
        let trimmed = inline.with_history(&history[20..]).unwrap();
        assert_eq!(trimmed.switches.len(), 40);
        assert_eq!(
            (trimmed.forgotten, trimmed.passes_from),
            (Some(190), Some(192))
        );
        assert!(trimmed.reach_exceeded(Some(150)));
        assert!(!trimmed.reach_exceeded(Some(192)));

        // Records of another run before (an older incarnation, a run cut by rounds without
        // a history topic) count for nothing.
        let mut two_runs = history[..10].to_vec();
        two_runs.extend(history.iter().cloned());
        assert_eq!(inline.with_history(&two_runs).unwrap(), full);

        // The topic first used after thirty rounds: what the metadata dropped before then is
        // reported forgotten, as without the topic.
        let mut later = Vec::new();
        let before = publish_rounds(Published::default(), 0..30, None);
        let inline = publish_rounds(before, 30..60, Some(&mut later));
        assert_eq!(
            (later[0].n, later[0].pk, later[0].pp),
            (1, Some(290), Some(291))
        );
        let merged = inline.with_history(&later).unwrap();
        assert_eq!(merged.switches.len(), 30);
        assert_eq!(
            (merged.forgotten, merged.passes_from),
            (Some(290), Some(292))
        );

        // No record written since the last round (no history topic): the metadata alone.
        let mut off = inline.clone();
        off.history_records = 0;
        assert_eq!(off.with_history(&later).unwrap(), off);
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

    /// The position after 200 rounds that each moved the cut-offs: full to the budget.
    fn full_of_switches() -> Published {
        (0..200).fold(Published::default(), |p, i| {
            p.after(
                &format!("{i}-0"),
                Some(i * 10),
                &[switch(i * 10, i as u64)],
                &[],
                None,
                METADATA_BUDGET,
            )
        })
    }

    #[test]
    fn the_metadata_stays_within_kafkas_bound_forgetting_the_oldest() {
        let p = full_of_switches();
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

    #[test]
    fn the_highest_sequence_and_floor_published_only_rise_and_survive_the_metadata() {
        use crate::store::outbox::{EntryKind, OutboxEntry};
        let entry = |q: Option<u64>, f: Option<u64>| StoredEntry {
            id: "1-0".into(),
            entry: OutboxEntry {
                kind: EntryKind::Change,
                key: b"c".to_vec(),
                value: b"{}".to_vec(),
                headers: Vec::new(),
            },
            end_offset: Some(1),
            origin: None,
            max_sequence: q,
            seq_floor: f,
        };
        let mut p = Published::default();
        p.add_sequences(
            &[
                entry(Some(7), None),
                entry(None, None),
                entry(Some(4), None),
            ],
            METADATA_BUDGET,
        );
        assert_eq!((p.max_sequence, p.sequence_floor), (7, 0));
        p.add_sequences(&[entry(Some(3), Some(2))], METADATA_BUDGET);
        assert_eq!((p.max_sequence, p.sequence_floor), (7, 2), "never lowered");
        p.add_sequences(&[entry(Some(12), Some(7))], METADATA_BUDGET);
        let back = Published::parse(&p.metadata());
        assert_eq!((back.max_sequence, back.sequence_floor), (12, 7));
        // Carried on by the next round, and absent from positions that never recorded one
        // (an older binary's read as none).
        let next = back.after("2-0", Some(2), &[], &[], None, METADATA_BUDGET);
        assert_eq!((next.max_sequence, next.sequence_floor), (12, 7));
        assert!(!Published::default()
            .after("1-0", None, &[], &[], None, 100)
            .metadata()
            .contains("\"q\""));
        assert_eq!(Published::parse("{\"id\":\"5-0\"}").max_sequence, 0);
        // A position filled to its budget stays within it: the oldest switch gives way.
        let mut full = full_of_switches();
        let (switches, tight) = (full.switches.len(), full.metadata().len() + 10);
        full.add_sequences(&[entry(Some(123_456_789), Some(99_999))], tight);
        assert!(full.metadata().len() <= tight);
        assert_eq!(full.switches.len(), switches - 1);
        assert_eq!(Published::parse(&full.metadata()).max_sequence, 123_456_789);
    }

    #[test]
    fn parked_letters_are_kept_newest_last_within_their_bound_and_the_budget() {
        let mut p = Published::default();
        p.add_parked_letters(&["5-0".to_owned()], 3500);
        let back = Published::parse(&p.metadata());
        assert_eq!(
            back.parked_letters,
            ["5-0"],
            "kept with nothing else recorded"
        );
        let ids: Vec<String> = (0..20).map(|i| format!("17000000000{i:02}-{i}")).collect();
        p.add_parked_letters(&ids, 3500);
        p.add_parked_letters(&ids[19..], 3500);
        assert_eq!(
            p.parked_letters,
            ids[20 - PARKED_LETTERS_KEPT..],
            "the newest, once each"
        );
        p.add_parked_letters(&ids[15..16], 3500);
        assert_eq!(
            p.parked_letters.last(),
            Some(&ids[15]),
            "parked again: the newest"
        );
        assert_eq!(p.parked_letters.len(), PARKED_LETTERS_KEPT);
        p.forget_parked_letter(&ids[15]);
        assert!(!p.parked_letters.contains(&ids[15]), "delivered: forgotten");
        p.add_parked_letters(&ids[15..16], 3500);
        // Carried on by the next round, within the budget (switches give way first).
        let mut full = full_of_switches();
        let switches = full.switches.len();
        full.add_parked_letters(&ids, METADATA_BUDGET);
        assert!(full.metadata().len() <= METADATA_BUDGET);
        assert!(
            full.switches.len() < switches,
            "the oldest switches gave way"
        );
        let next = full.after("300-0", Some(3000), &[], &[], None, METADATA_BUDGET);
        assert_eq!(
            Published::parse(&next.metadata()).parked_letters,
            ids[20 - PARKED_LETTERS_KEPT..]
        );
    }

    #[test]
    fn a_delivered_parked_letter_is_kept_within_the_budget_and_carried_on() {
        assert_eq!(
            Published::parse(&Published::default().after_parked("5-0", 3500).metadata())
                .parked
                .as_deref(),
            Some("5-0"),
            "kept with nothing else recorded"
        );
        let p = full_of_switches();
        let full = p.switches.len();
        // No room to spare: the parked id takes the oldest switch's.
        let budget = p.metadata().len() + 5;
        let parked = p.after_parked("1700000000000-12", budget);
        assert!(parked.metadata().len() <= budget);
        assert_eq!(
            parked.switches.len(),
            full - 1,
            "the oldest switch gave way"
        );
        assert_eq!(
            parked.last_id, p.last_id,
            "the outbox position is unchanged"
        );
        let back = Published::parse(&parked.metadata());
        assert_eq!(back.parked.as_deref(), Some("1700000000000-12"));
        // The outbox's next rounds carry it on.
        let next = back.after("201-0", Some(2010), &[], &[], None, METADATA_BUDGET);
        assert_eq!(next.parked.as_deref(), Some("1700000000000-12"));
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
                n: u64::from(v),
                through: Some(i64::from(v) * 10),
                sweeps: vec![sweep(i64::from(v) * 10, v)],
                ..HistoryRecord::default()
            })
            .collect();
        let mut p = p;
        p.history_records = 6;
        let full = p.with_history(&history).unwrap();
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
