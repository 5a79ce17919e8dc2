//! Internal events, one struct each (as Vector does): `emit` writes the event's log line and
//! updates its metrics together, so a log line never exists without its metric and the other
//! way round. Events on the hot path (a committed batch) update metrics only.

use super::Telemetry;
use std::fmt::Display;
use tracing::{debug, error, info, warn};

/// A Redis call failed and is retried after a backoff.
pub struct RedisCallFailed<'a> {
    /// The partition whose call failed.
    pub partition: i32,
    /// What Redis said.
    pub error: &'a dyn Display,
}

impl RedisCallFailed<'_> {
    /// Logs and counts it.
    pub fn emit(self, t: &Telemetry) {
        t.redis_errors.inc();
        warn!(partition = self.partition, error = %self.error, "Redis call failed; retrying.");
    }
}

/// Claiming a partition in Redis failed; the claim is retried.
pub struct ClaimFailed<'a> {
    /// The partition being claimed.
    pub partition: i32,
    /// What Redis said.
    pub error: &'a dyn Display,
}

/// Reading how far a partition's outbox was published (from Kafka) failed; the claim waits.
pub struct PublishedPositionUnknown<'a> {
    /// The partition being claimed.
    pub partition: i32,
    /// What Kafka said.
    pub error: &'a dyn Display,
}

impl PublishedPositionUnknown<'_> {
    /// Logs and counts it.
    pub fn emit(self, t: &Telemetry) {
        t.publish_errors.inc();
        error!(partition = self.partition, error = %self.error, "Reading the published outbox position from Kafka failed; retrying the claim.");
    }
}

impl ClaimFailed<'_> {
    /// Logs and counts it.
    pub fn emit(self, t: &Telemetry) {
        t.redis_errors.inc();
        error!(partition = self.partition, error = %self.error, "Claiming the partition in Redis failed; retrying.");
    }
}

/// Why a partition stopped processing while still assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// Another owner claimed it.
    Fenced,
    /// Redis holds another next offset than this owner committed.
    Diverged,
    /// A stored state cannot be read.
    Corrupt,
}

impl StopCause {
    /// Every cause, for the metric's series.
    pub const ALL: [Self; 3] = [Self::Fenced, Self::Diverged, Self::Corrupt];

    /// The `cause` label of `tierd_partition_stops_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fenced => "fenced",
            Self::Diverged => "diverged",
            Self::Corrupt => "corrupt",
        }
    }
}

/// A partition's runner stopped on an error.
pub struct PartitionStopped<'a> {
    /// The partition.
    pub partition: i32,
    /// Why.
    pub cause: StopCause,
    /// The error.
    pub error: &'a dyn Display,
}

impl PartitionStopped<'_> {
    /// Logs and counts it.
    pub fn emit(self, t: &Telemetry) {
        let (partition, error) = (self.partition, self.error);
        t.partition_stops
            .with_label_values(&[self.cause.as_str()])
            .inc();
        match self.cause {
            StopCause::Fenced => {
                t.apply_fenced.inc();
                error!(partition, %error, "Partition stopped: another owner took over.");
            }
            StopCause::Diverged => {
                error!(partition, %error, "Redis diverged from this owner's state; reloading.");
            }
            StopCause::Corrupt => {
                error!(partition, %error, "Partition stopped: its state in Redis cannot be read.");
            }
        }
    }
}

/// A batch starts after an offset gap: offsets the consumer never delivers. A gap of one is
/// the commit marker of a transactional producer's transaction (one per partition it wrote
/// to); a longer one an aborted transaction's records and its marker, or records removed by
/// compaction. (Records deleted by retention before they were applied are not a gap: the
/// stored offset is then outside the log and the partition stops, see the consumer.)
pub struct OffsetGap {
    /// The partition.
    pub partition: i32,
    /// The offset the owner expected next.
    pub expected: i64,
    /// The batch's first offset.
    pub first_offset: i64,
}

impl OffsetGap {
    /// Logs and counts it.
    pub fn emit(self, t: &Telemetry) {
        t.offset_gaps.inc();
        if self.first_offset - self.expected == 1 {
            // Every transaction of a transactional producer: not worth a warning each.
            debug!(
                partition = self.partition,
                offset = self.expected,
                "Offset gap of one: a transaction's commit marker."
            );
        } else {
            warn!(
                partition = self.partition,
                expected = self.expected,
                first_offset = self.first_offset,
                "Offset gap: offsets not delivered (transaction markers, an aborted transaction's records, or records removed by compaction)."
            );
        }
    }
}

/// A batch of input messages was decoded, applied and committed.
pub struct BatchApplied<'a> {
    /// The partition's label.
    pub partition: &'a str,
    /// Messages in the batch.
    pub messages: usize,
    /// Seconds from receipt to commit.
    pub seconds: f64,
}

impl BatchApplied<'_> {
    /// Counts it (hot path: no log line).
    pub fn emit(self, t: &Telemetry) {
        t.events_consumed
            .with_label_values(&[self.partition])
            .inc_by(self.messages as u64);
        t.batch_events.observe(self.messages as f64);
        t.batch_apply_seconds.observe(self.seconds);
    }
}

/// A commit was written (events, fired timers or re-evaluations).
pub struct Committed<'a> {
    /// The partition's label.
    pub partition: &'a str,
    /// Events counted into states.
    pub applied: u64,
    /// Events recognised as duplicates.
    pub duplicates: u64,
    /// Reasons of the messages dead-lettered.
    pub rejected: &'a [&'static str],
    /// Tier changes: (from, to, reason).
    pub changes: &'a [(String, String, &'static str)],
    /// At-risk notices.
    pub notices: u64,
    /// Outbox length after the commit.
    pub outbox_len: u64,
}

impl Committed<'_> {
    /// Counts it (hot path: no log line).
    pub fn emit(self, t: &Telemetry) {
        let label = [self.partition];
        t.events_applied
            .with_label_values(&label)
            .inc_by(self.applied);
        t.events_deduplicated
            .with_label_values(&label)
            .inc_by(self.duplicates);
        for reason in self.rejected {
            t.events_dead_lettered.with_label_values(&[reason]).inc();
        }
        for (from, to, reason) in self.changes {
            t.tier_changes
                .with_label_values(&[from.as_str(), to.as_str(), reason])
                .inc();
        }
        t.at_risk_notices.inc_by(self.notices);
        t.outbox_depth
            .with_label_values(&label)
            .set(i64::try_from(self.outbox_len).unwrap_or(i64::MAX));
    }
}

/// A due timer was evaluated.
pub struct TimerFired {
    /// What the timer was for (`TimeCause::as_str`).
    pub cause: &'static str,
}

impl TimerFired {
    /// Counts it (hot path: no log line).
    pub fn emit(self, t: &Telemetry) {
        t.timers_fired.with_label_values(&[self.cause]).inc();
    }
}

/// The timer index named a due time the customer's state does not hold; it was re-indexed.
pub struct TimerOutOfStep<'a> {
    /// The partition.
    pub partition: i32,
    /// The customer.
    pub customer: &'a str,
    /// The due time the index held.
    pub indexed: i64,
    /// The state's own timer.
    pub state: &'a dyn std::fmt::Debug,
}

impl TimerOutOfStep<'_> {
    /// Logs it.
    pub fn emit(self, _: &Telemetry) {
        // `?`: the id comes from a producer; Debug escapes control characters (no forged
        // lines, no terminal escapes).
        warn!(partition = self.partition, customer = ?self.customer, indexed = self.indexed, state = ?self.state, "Timer index out of step with the customer state; re-indexed.");
    }
}

/// A page of a rules-version sweep was re-evaluated.
pub struct RulesSwept {
    /// The partition.
    pub partition: i32,
    /// Customers re-evaluated in this page.
    pub customers: u64,
    /// The rules version, when this page completed the sweep.
    pub completed: Option<String>,
}

impl RulesSwept {
    /// Counts it; logs the sweep's completion.
    pub fn emit(self, t: &Telemetry) {
        t.rules_sweep_customers.inc_by(self.customers);
        // Counted in `tierd_rules_sweep_partitions_done` by the runner (it gives the count
        // back when it ends).
        if let Some(version) = self.completed {
            info!(partition = self.partition, version, "Rules sweep complete.");
        }
    }
}

/// Rank cut-offs were computed over all partitions.
pub struct CutoffsComputed {
    /// Seconds the computation (and publication) took.
    pub seconds: f64,
    /// Searches repeated because their verification failed (on a Redis Cluster).
    pub repeated: u64,
    /// The published version; `None` if the values were unchanged or not published.
    pub published: Option<u64>,
}

impl CutoffsComputed {
    /// Measures it; logs a publication.
    pub fn emit(self, t: &Telemetry) {
        t.rank_recompute_seconds.observe(self.seconds);
        t.cutoff_searches_repeated.inc_by(self.repeated);
        if let Some(version) = self.published {
            info!(version, seconds = self.seconds, "Rank cut-offs published.");
        }
    }
}

/// A page of customers between old and new cut-offs was re-evaluated.
pub struct RankReevaluated {
    /// Customers in the page.
    pub customers: u64,
}

impl RankReevaluated {
    /// Counts it.
    pub fn emit(self, t: &Telemetry) {
        t.rank_reevaluated.inc_by(self.customers);
    }
}

/// A partition's outbox passed `publish.outbox_max_entries`: it takes no input until it drains.
pub struct OutboxFull {
    /// The partition.
    pub partition: i32,
    /// Entries in the outbox.
    pub entries: u64,
    /// The bound.
    pub max: u64,
}

impl OutboxFull {
    /// Logs and shows it.
    pub fn emit(self, t: &Telemetry) {
        t.outbox_full
            .with_label_values(&[&self.partition.to_string()])
            .set(1);
        warn!(
            partition = self.partition,
            entries = self.entries,
            max = self.max,
            "Outbox over publish.outbox_max_entries: input paused until publishing catches up."
        );
    }
}

/// A partition's outbox drained to half its bound: input resumes.
pub struct OutboxDrained {
    /// The partition.
    pub partition: i32,
    /// Entries left.
    pub entries: u64,
}

impl OutboxDrained {
    /// Logs and shows it.
    pub fn emit(self, t: &Telemetry) {
        t.outbox_full
            .with_label_values(&[&self.partition.to_string()])
            .set(0);
        info!(
            partition = self.partition,
            entries = self.entries,
            "Outbox drained: input resumes."
        );
    }
}

/// An owner resumed a re-ranking a previous owner of the partition had started.
pub struct RerankResumed {
    /// The partition.
    pub partition: i32,
    /// The cut-offs version it moves to.
    pub version: u64,
    /// The moved range it resumes in.
    pub range: usize,
}

impl RerankResumed {
    /// Logs it.
    pub fn emit(self, _t: &Telemetry) {
        info!(
            partition = self.partition,
            version = self.version,
            range = self.range,
            "Resuming the re-ranking where the previous owner stopped."
        );
    }
}

/// A replay applied a published cut-offs switch at its input offset again.
pub struct CutoffsReplayed {
    /// The partition.
    pub partition: i32,
    /// The cut-offs' version.
    pub version: u64,
    /// The input offset it applies before.
    pub offset: i64,
}

impl CutoffsReplayed {
    /// Counts and logs it.
    pub fn emit(self, t: &Telemetry) {
        t.cutoffs_replayed.inc();
        info!(
            partition = self.partition,
            version = self.version,
            offset = self.offset,
            "Replaying: applying the published cut-offs at the input offset they applied at before."
        );
    }
}

/// A replay fires the timers of a recorded wall-clock pass at its input offset.
pub struct TimersReplayed {
    /// The partition.
    pub partition: i32,
    /// The input offset the pass ran at.
    pub offset: i64,
    /// Its horizon (Unix ms).
    pub upto: i64,
}

impl TimersReplayed {
    /// Logs it.
    pub fn emit(self, _t: &Telemetry) {
        info!(
            partition = self.partition,
            offset = self.offset,
            upto = self.upto,
            "Replaying: firing the timers of a published pass at the input offset it ran at before."
        );
    }
}

/// A rules sweep recorded earlier goes on at the engine time it started at: an owner resumes
/// it, or a replay reached the input offset where it started.
pub struct SweepResumed {
    /// The partition.
    pub partition: i32,
    /// The input offset it goes on from.
    pub offset: i64,
    /// Its engine time (Unix ms).
    pub at: i64,
}

impl SweepResumed {
    /// Logs it.
    pub fn emit(self, _t: &Telemetry) {
        info!(
            partition = self.partition,
            offset = self.offset,
            at = self.at,
            "Resuming the recorded rules sweep: customers still under other rules are re-evaluated at its start time."
        );
    }
}

/// A replay after Redis lost writes starts before the latest rules change: the input up to
/// the change is applied under the rules it first ran under, if the partition kept them.
pub struct ReplayBeforeRulesChange<'a> {
    /// The partition.
    pub partition: i32,
    /// The input offset the first rules change to replay took effect at.
    pub offset: i64,
    /// The rules changes the replay goes through (1: the latest only).
    pub changes: usize,
    /// The rules version the input before it is replayed under, or why the running rules
    /// replay it instead.
    pub under: Result<&'a str, &'a str>,
}

impl ReplayBeforeRulesChange<'_> {
    /// Logs it.
    pub fn emit(self, _t: &Telemetry) {
        match self.under {
            Ok(version) => info!(
                partition = self.partition,
                offset = self.offset,
                version,
                changes = self.changes,
                "Replaying the input before the rules change under the rules it first ran under (and each stretch after it under its own, through every recorded change)."
            ),
            Err(reason) => warn!(
                partition = self.partition,
                offset = self.offset,
                reason,
                "Replaying the input before the rules change under the running rules: its changes are published again under the running rules version."
            ),
        }
    }
}

/// A claimed partition's sequence floor was raised (see `engine::changes::number_above`).
pub struct SequenceFloorRaised {
    /// The partition.
    pub partition: i32,
    /// The floor Redis kept.
    pub from: u64,
    /// The floor now: the highest sequence the partition published.
    pub to: u64,
    /// Raised because Redis lost the commit that had raised it (not because the replay
    /// cannot reproduce what was published).
    pub lost: bool,
}

impl SequenceFloorRaised {
    /// Counts and logs it.
    pub fn emit(self, t: &Telemetry) {
        t.sequence_floors_raised.inc();
        warn!(
            partition = self.partition,
            from = self.from,
            to = self.to,
            "Changes are numbered above sequence {} from now on: {}, so a change decided again could carry an id already published for another body. Each customer's next change gets a new id and a sequence above every one published (it jumps).",
            self.to,
            if self.lost {
                "Redis lost the commit that had raised the partition's sequence floor"
            } else {
                "the replay cannot reproduce the changes already published"
            }
        );
    }
}

/// A partition read back what the output topic last told of its customers and told the
/// ones it named another tier the tier they are in.
pub struct TiersRestated {
    /// The partition.
    pub partition: i32,
    /// Customers the output topic named since the time read from (of every partition).
    pub read: usize,
    /// Of them, customers of this partition told their tier again.
    pub restated: u64,
}

impl TiersRestated {
    /// Counts and logs it.
    pub fn emit(self, t: &Telemetry) {
        t.tiers_restated.inc_by(self.restated);
        let (partition, read, restated) = (self.partition, self.read, self.restated);
        if restated > 0 {
            warn!(partition, read, restated, "Customers the replay left in another tier than the last change published for them were told their tier (rules_changed changes).");
        } else {
            info!(partition, read, "Every customer's last published change names the tier they are in: nothing to restate.");
        }
    }
}

/// A read-back of the output topic for a restatement failed.
pub struct RestateFailed<'a> {
    /// The partition.
    pub partition: i32,
    /// Why.
    pub error: &'a str,
    /// Failures so far.
    pub failures: u32,
    /// Whether it was this owner's last attempt.
    pub last: bool,
}

impl RestateFailed<'_> {
    /// Counts and logs it.
    pub fn emit(self, t: &Telemetry) {
        t.restate_failures.inc();
        let (partition, failures) = (self.partition, self.failures);
        if self.last {
            error!(partition, failures, error = self.error, "Cannot read back the output topic after a replay that could not reproduce the published changes: customers it left in another tier than the last change published for them are not told. This owner gives up; the restatement stays recorded with the partition for the next owner or a restart.");
        } else {
            error!(partition, failures, error = self.error, "Cannot read back the output topic after a replay that could not reproduce the published changes: customers it left in another tier than the last change published for them are not told yet (retried).");
        }
    }
}

/// A partition finished moving to new cut-offs.
pub struct CutoffsApplied {
    /// The partition.
    pub partition: i32,
    /// The cut-offs' version.
    pub version: u64,
    /// Customers re-evaluated.
    pub evaluated: u64,
    /// Of them, customers who changed tier.
    pub moved: u64,
}

impl CutoffsApplied {
    /// Logs it.
    pub fn emit(self, _: &Telemetry) {
        info!(
            partition = self.partition,
            version = self.version,
            evaluated = self.evaluated,
            moved = self.moved,
            "Rank cut-offs applied."
        );
    }
}

/// The partitions assigned to this instance changed.
pub struct PartitionsOwned {
    /// How many are assigned now (processed or not).
    pub owned: usize,
    /// Of them, how many are not processed (their runner stopped).
    pub stopped: usize,
}

impl PartitionsOwned {
    /// Sets the gauges.
    pub fn emit(self, t: &Telemetry) {
        t.partitions_assigned
            .set(i64::try_from(self.owned).unwrap_or(i64::MAX));
        t.partitions_stopped
            .set(i64::try_from(self.stopped).unwrap_or(i64::MAX));
    }
}

/// A partition stays assigned to this instance but is no longer processed.
pub struct PartitionNotProcessed<'a> {
    /// The partition.
    pub partition: i32,
    /// Why.
    pub reason: &'a str,
}

impl PartitionNotProcessed<'_> {
    /// Logs it (the gauge is set by [`PartitionsOwned`]).
    pub fn emit(self, _: &Telemetry) {
        error!(
            partition = self.partition,
            reason = self.reason,
            "Partition assigned to this instance but not processed; /readyz/ingest fails until the group moves it or tierd restarts."
        );
    }
}

/// A partition was released (revoked, shutting down, or stopped).
pub struct PartitionReleased<'a> {
    /// The partition.
    pub partition: i32,
    /// Why its runner stopped.
    pub exit: &'a dyn std::fmt::Debug,
}

impl PartitionReleased<'_> {
    /// Logs it and drops the partition's lag, cache and outbox-bound series (another
    /// instance reports them now: a stale 1 would keep `TierdOutboxBlocked` firing).
    pub fn emit(self, t: &Telemetry) {
        let label = self.partition.to_string();
        let _ = t.consumer_lag.remove_label_values(&[&label]);
        let _ = t.outbox_full.remove_label_values(&[&label]);
        let _ = t.state_cache_bytes.remove_label_values(&[&label]);
        let _ = t.state_cache_customers.remove_label_values(&[&label]);
        info!(partition = self.partition, exit = ?self.exit, "Partition released.");
    }
}

/// A publish round failed; it is retried.
pub struct PublishFailed<'a> {
    /// The partition whose outbox was being published.
    pub partition: i32,
    /// The error.
    pub error: &'a dyn Display,
}

impl PublishFailed<'_> {
    /// Logs and counts it.
    pub fn emit(self, t: &Telemetry) {
        t.publish_errors.inc();
        warn!(partition = self.partition, error = %self.error, "Publishing the outbox failed; retrying.");
    }
}

/// Kafka refused an outbox record for a reason retrying cannot change.
pub struct PublishRefused<'a> {
    /// The partition whose outbox holds it.
    pub partition: i32,
    /// `change`, `dead_letter` or `at_risk`.
    pub kind: &'static str,
    /// Its outbox stream id.
    pub id: &'a str,
    /// What happens to it (`parked`, `blocking the outbox`).
    pub action: &'static str,
    /// Kafka's reason.
    pub error: &'a dyn Display,
}

impl PublishRefused<'_> {
    /// Logs and counts it.
    pub fn emit(self, t: &Telemetry) {
        t.publish_refused.with_label_values(&[self.kind]).inc();
        error!(partition = self.partition, kind = self.kind, id = self.id, action = self.action, error = %self.error, "Kafka refused an outbox record permanently.");
    }
}

/// A partition's outbox producer was fenced by a newer owner's producer: it stops publishing.
pub struct PublisherFenced<'a> {
    /// The partition.
    pub partition: i32,
    /// The fencing error.
    pub error: &'a dyn Display,
}

impl PublisherFenced<'_> {
    /// Logs and counts it.
    pub fn emit(self, t: &Telemetry) {
        t.publish_fenced.inc();
        warn!(partition = self.partition, error = %self.error, "Outbox producer fenced by a newer owner of the partition; this instance stops publishing it.");
    }
}
