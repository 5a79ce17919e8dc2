//! The consumer thread: group membership and per-partition batching.
//!
//! One OS thread polls a [`BaseConsumer`] (so the rebalance callback may block on Redis while
//! the [`Supervisor`] claims partitions) and cuts each partition's messages into size- and
//! time-bounded batches for that partition's runner; a partition whose runner's queue is full
//! is paused alone (backpressure) while the others flow. On assignment the consumer starts each partition at the offset stored in
//! Redis with its claim; Kafka's committed offsets are written for lag dashboards only. On
//! revocation the partition's in-flight batches are finished and its outbox flushed before it
//! is released.

use super::record::{add_position, Record};
use crate::liveness::Liveness;
use crate::partition::runner::{Batch, RunnerExit};
use crate::partition::supervisor::{NotClaimed, Released, Supervisor};
use crate::partition::NOT_DRAINED;
use crate::store::partition::Claim;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Messages per batch.
    pub max_events: usize,
    /// Value + key bytes per batch.
    pub max_bytes: usize,
    /// Oldest message's maximum wait.
    pub max_wait: Duration,
    /// Batches queued per partition.
    pub queue: usize,
}

/// The batch being cut for one started partition, and where to send it.
struct Pending {
    tx: mpsc::Sender<Batch>,
    messages: Vec<Record>,
    bytes: usize,
    since: Option<Instant>,
    /// The runner's queue was full: `messages` wait for room and the partition is paused
    /// (only this one: the others keep flowing, and the consumer keeps polling).
    held: Held,
    /// One past the last offset polled for the partition since its claim (-1: none): how far
    /// it is drained when librdkafka reports its end.
    polled_until: i64,
    /// librdkafka reported the partition's end and no message was polled since (so the
    /// partition's `drained_until` is set and the next message clears it).
    drained: bool,
}

/// Whether a partition's messages are held back because its runner's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Flowing.
    No,
    /// Held; the partition must be paused.
    ToPause,
    /// Held and paused; resumed once the batch is handed over.
    Paused,
}

impl Pending {
    fn new(tx: mpsc::Sender<Batch>) -> Self {
        Self {
            tx,
            messages: Vec::new(),
            bytes: 0,
            since: None,
            held: Held::No,
            polled_until: -1,
            drained: false,
        }
    }
}

/// What handing a batch to a runner did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Handed over (or dropped because the service stops).
    Yes,
    /// The runner's queue is full: the batch is held.
    Held,
    /// The runner has stopped.
    RunnerGone,
}

/// What [`IngestContext::claim_all`] returns.
struct Claimed {
    /// To assign, each at its start offset.
    assign: TopicPartitionList,
    /// Assigned too, but to pause: their claim was refused.
    refused: TopicPartitionList,
}

/// A partition held paused until librdkafka accepts a seek to its claimed start.
#[derive(Debug, Clone, Copy)]
struct Seek {
    offset: Offset,
    /// The leader epoch of the record before `offset`, if known: the seek then validates the
    /// start with the leader ([`add_position`]).
    leader_epoch: Option<i32>,
    /// When the seek was first tried: after the assignment, since a rebalance's claims (up to
    /// the rebalance callback's patience) come before it, so they do not use up the deadline.
    since: Option<Instant>,
    /// Whether librdkafka refused it yet because the fetch had not started (logged once).
    deferred: bool,
}

/// The consumer's context: batches messages and handles rebalances through the supervisor.
pub struct IngestContext {
    topic: String,
    supervisor: Supervisor,
    batching: Batching,
    shutdown: Arc<AtomicBool>,
    pending: Mutex<HashMap<i32, Pending>>,
    /// Fenced partitions this instance still holds, with when to claim them again.
    reclaims: Mutex<HashMap<i32, Instant>>,
    /// When each partition was fenced and given a re-claim (the recent ones). Re-claims after
    /// Redis or Kafka was unavailable are not counted: an outage must not use up the allowance
    /// of a partition that something keeps claiming.
    fences: Mutex<HashMap<i32, Vec<Instant>>>,
    /// A partition was just held back and is to be paused (see [`Self::flow`]).
    hold_pending: AtomicBool,
    /// Since when an offset-out-of-range report is not attributed to a partition yet (the
    /// report does not name it): the statistics then tell which partition stopped fetching.
    offset_error: Mutex<Option<Instant>>,
    /// While an offset error is unattributed: the owned partitions the latest statistics
    /// showed as not fetching (librdkafka's fetch state `none`), and those shown so by two
    /// reports in a row (to be stopped; a partition just assigned passes through `none`).
    not_fetching: Mutex<(Vec<i32>, Vec<i32>)>,
    /// Partitions held paused until a seek to their claimed start is accepted. Only a seek
    /// validates a start with the leader epoch (an assignment's start offset is not
    /// validated), and librdkafka refuses a seek (`__STATE`) while it defers a new
    /// assignment's fetch start (an offset commit in flight, revoked partitions still
    /// stopping): the seek is retried from the poll loop, and the partition fetches nothing
    /// before it is accepted.
    seeks: Mutex<HashMap<i32, Seek>>,
    /// Offset commits sent and not answered yet. A periodic commit waits for the previous
    /// one's answer: librdkafka completes a rebalance only at a moment with no commit in
    /// flight, and the coordinator answers a connection's requests one at a time (a commit
    /// waits for the offsets topic's replicas), so commits sent on a timer regardless would
    /// starve the rebalance and queue the heartbeats behind them until the session expires.
    commits_in_flight: AtomicUsize,
    /// When the latest commit was sent (see [`COMMIT_ANSWER_DEADLINE`]).
    commit_sent: Mutex<Option<Instant>>,
    /// How long a partition waits for librdkafka to accept the seek to its claimed start
    /// before it is stopped (visibly: `/readyz/ingest`) instead of staying paused while shown as
    /// processed (`ingest.seek_deadline_s`).
    seek_deadline: Duration,
    /// A rebalance of the group is under way for this member: from the subscription, a
    /// revocation, or statistics showing a join round in progress, until the assignment
    /// callback that ends it (every classic rebalance ends with one, possibly empty) or
    /// statistics showing it steady. See [`Self::finish_rebalance`].
    rebalancing: AtomicBool,
    /// Assignment callbacks still to come in the rebalance under way: one per join round;
    /// two after a cooperative revocation (not a loss), as librdkafka follows the assignment
    /// after it with a second join round to hand the revoked partitions over.
    assigns_expected: AtomicU8,
    /// An assignment callback was served since the subscription (a first join completed).
    joined: AtomicBool,
    /// When the latest statistics report served was taken, on librdkafka's clock (see
    /// [`Self::finish_rebalance`]).
    report_taken_us: AtomicI64,
    /// The classic group protocol (not KIP-848): see [`Self::finish_rebalance`].
    classic: bool,
}

/// librdkafka answers every offset commit within the session and socket timeouts; one still
/// unanswered after this long is taken as lost (a warning), so that commits for the lag
/// dashboards do not stop for good.
const COMMIT_ANSWER_DEADLINE: Duration = Duration::from_secs(300);

/// At most how long a stop waits for a statistics report taken at the stop (see
/// [`IngestContext::finish_rebalance`]).
const FRESH_REPORT_WAIT: Duration = Duration::from_secs(3);

/// librdkafka's clock (`rd_clock()`: `CLOCK_MONOTONIC` in microseconds on Linux), the one its
/// statistics' `ts` is taken on.
fn librdkafka_clock_us() -> i64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC is always available.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now);
    }
    now.tv_sec * 1_000_000 + now.tv_nsec / 1_000
}

/// How long an unattributed offset-out-of-range report is looked for in the statistics.
const OFFSET_ERROR_WINDOW: Duration = Duration::from_secs(30);

/// How long a fenced partition waits before it is claimed again. Long enough for an instance
/// that lost its group session without knowing (a zombie) to learn it from its next heartbeat
/// and let go, so that it never takes a partition back from its rightful owner.
const RECLAIM_DELAY: Duration = Duration::from_secs(3);

/// Re-claims after fences allowed per partition within [`FENCE_WINDOW`]; beyond, the
/// partition stays stopped (something keeps claiming it: visible on `/readyz/ingest`).
const FENCES_PER_WINDOW: usize = 3;
const FENCE_WINDOW: Duration = Duration::from_secs(60);

/// How long one seek call waits for librdkafka's answer (the consumer thread waits with it).
const SEEK_TIMEOUT: Duration = Duration::from_secs(1);

/// How often held seeks are tried again.
const SEEK_RETRY: Duration = Duration::from_millis(100);

impl IngestContext {
    /// A context for `topic` over a supervisor; a claimed partition whose seek librdkafka
    /// has not accepted within `seek_deadline` is stopped.
    pub fn new(
        topic: String,
        supervisor: Supervisor,
        batching: Batching,
        seek_deadline: Duration,
        shutdown: Arc<AtomicBool>,
        classic: bool,
    ) -> Self {
        Self {
            topic,
            supervisor,
            batching,
            shutdown,
            pending: Mutex::new(HashMap::new()),
            reclaims: Mutex::new(HashMap::new()),
            fences: Mutex::new(HashMap::new()),
            hold_pending: AtomicBool::new(false),
            offset_error: Mutex::new(None),
            not_fetching: Mutex::new((Vec::new(), Vec::new())),
            seeks: Mutex::new(HashMap::new()),
            commits_in_flight: AtomicUsize::new(0),
            commit_sent: Mutex::new(None),
            seek_deadline,
            rebalancing: AtomicBool::new(false),
            assigns_expected: AtomicU8::new(0),
            joined: AtomicBool::new(false),
            report_taken_us: AtomicI64::new(i64::MIN),
            classic,
        }
    }

    /// Claims each of our topic's partitions in `tpl` and starts it; returns the list to
    /// assign, with each partition's start offset from Redis, the partitions whose claim was
    /// refused (assigned too, to be paused: visibly not processed). Those whose start has a
    /// known leader epoch are held for a validating seek ([`Self::seek_due`]).
    fn claim_all(&self, tpl: &TopicPartitionList) -> Claimed {
        let mut assign = TopicPartitionList::new();
        let mut refused = TopicPartitionList::new();
        let give_up = self.supervisor.claims_give_up_at();
        for e in tpl.elements() {
            if e.topic() != self.topic {
                continue;
            }
            let partition = e.partition();
            let claim = match self.supervisor.claim(partition, give_up) {
                None => continue,
                Some(Ok(claim)) => claim,
                Some(Err(not_claimed)) => {
                    let next = not_claimed.next_offset();
                    self.supervisor.mark_not_processed(
                        partition,
                        next.unwrap_or(-1),
                        not_claimed.to_string(),
                    );
                    self.retry_claim_later(&not_claimed, partition);
                    // Held (paused) at its stored offset, like every assigned partition.
                    let offset = next.map_or(Offset::Beginning, Offset::Offset);
                    if assign
                        .add_partition_offset(&self.topic, partition, offset)
                        .is_ok()
                    {
                        refused.add_partition(&self.topic, partition);
                    }
                    continue;
                }
            };
            let offset = claim.next_offset.map_or(Offset::Beginning, Offset::Offset);
            if let Err(error) = assign.add_partition_offset(&self.topic, partition, offset) {
                error!(partition, %error, "Setting the start offset failed.");
                continue;
            }
            if claim.next_offset.is_some() && claim.offset_epoch.is_some() {
                self.hold_for_seek(partition, offset, claim.offset_epoch);
            }
            info!(partition, epoch = claim.epoch, next_offset = ?claim.next_offset, offset_epoch = ?claim.offset_epoch, "Partition assigned.");
            let tx = self.supervisor.start(partition, &claim);
            self.pending
                .lock()
                .expect("pending lock")
                .insert(partition, Pending::new(tx));
        }
        Claimed { assign, refused }
    }

    /// Holds `partition` for a seek to `offset` ([`Self::seek_due`]); the caller pauses it.
    fn hold_for_seek(&self, partition: i32, offset: Offset, leader_epoch: Option<i32>) {
        self.seeks.lock().expect("seeks lock").insert(
            partition,
            Seek {
                offset,
                leader_epoch,
                since: None,
                deferred: false,
            },
        );
    }

    /// Pauses `partition` and seeks it to where `claim` resumes it, validated with the leader
    /// when the claim knows the leader epoch there; it fetches again once the seek is accepted.
    fn seek_claimed(&self, consumer: &BaseConsumer<Self>, partition: i32, claim: &Claim) {
        let offset = claim.next_offset.map_or(Offset::Beginning, Offset::Offset);
        self.hold_for_seek(partition, offset, claim.offset_epoch);
        self.pause(consumer, partition);
        self.seek_due(consumer);
    }

    /// Seeks every held partition to its start and resumes those librdkafka accepted. A seek
    /// refused because the partition's fetch has not started yet (`__STATE`), is still
    /// stopping (`__PREV_IN_PROGRESS`) or did not answer in time is tried again on the next
    /// call; any other error, or no acceptance within `seek_deadline`, stops the partition
    /// (and claims it again after [`RECLAIM_DELAY`] if the group still assigns it here).
    fn seek_due(&self, consumer: &BaseConsumer<Self>) {
        let now = Instant::now();
        let due: Vec<(i32, Seek)> = self
            .seeks
            .lock()
            .expect("seeks lock")
            .iter_mut()
            .map(|(&p, s)| {
                s.since.get_or_insert(now);
                (p, *s)
            })
            .collect();
        let overdue = |seek: &Seek| {
            seek.since
                .is_some_and(|t| t.elapsed() >= self.seek_deadline)
        };
        if due.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, seek) in &due {
            let added = add_position(
                &mut tpl,
                &self.topic,
                *partition,
                seek.offset,
                seek.leader_epoch,
            );
            if let Err(error) = added {
                self.stop_unsought(consumer, *partition, &error.to_string());
            }
        }
        let sought = match consumer.seek_partitions(tpl, SEEK_TIMEOUT) {
            Ok(sought) => sought,
            Err(error) => {
                // A timeout of the whole call (librdkafka reports it for the call, not per
                // partition): the deadline still applies to each.
                warn!(%error, "Seeking to the claimed start offsets failed; trying again.");
                for (partition, seek) in &due {
                    if overdue(seek) {
                        self.stop_unsought(consumer, *partition, &error.to_string());
                    }
                }
                return;
            }
        };
        let mut resume = TopicPartitionList::new();
        for e in sought.elements() {
            let partition = e.partition();
            match e.error() {
                Ok(()) => {
                    self.seeks.lock().expect("seeks lock").remove(&partition);
                    resume.add_partition(&self.topic, partition);
                }
                Err(KafkaError::OffsetFetch(
                    RDKafkaErrorCode::State
                    | RDKafkaErrorCode::PreviousInProgress
                    | RDKafkaErrorCode::OperationTimedOut,
                )) if due.iter().any(|(p, s)| *p == partition && !overdue(s)) => {
                    if let Some(seek) = self
                        .seeks
                        .lock()
                        .expect("seeks lock")
                        .get_mut(&partition)
                        .filter(|s| !s.deferred)
                    {
                        seek.deferred = true;
                        info!(partition, error = %e.error().unwrap_err(), "Seek deferred: librdkafka has not started fetching the partition yet (an offset commit in flight, or partitions still stopping); held paused and trying again.");
                    }
                }
                Err(error) => self.stop_unsought(consumer, partition, &error.to_string()),
            }
        }
        if resume.count() > 0 {
            if let Err(error) = consumer.resume(&resume) {
                warn!(%error, "Resuming partitions after their seek failed.");
            }
        }
    }

    /// Stops (releases, reports and pauses) a partition librdkafka did not seek to its start.
    fn stop_unsought(&self, consumer: &BaseConsumer<Self>, partition: i32, error: &str) {
        self.seeks.lock().expect("seeks lock").remove(&partition);
        error!(partition, %error, "Seeking to the offset stored in Redis failed; partition stopped.");
        for released in self.release(consumer, &[partition]) {
            self.supervisor.mark_stopped(
                &released,
                format!(
                    "seeking to the offset stored in Redis failed: {error}; claiming it again in {} s if the group still assigns it here",
                    RECLAIM_DELAY.as_secs()
                ),
            );
        }
        self.pause(consumer, partition);
        self.reclaims
            .lock()
            .expect("reclaims lock")
            .insert(partition, Instant::now() + RECLAIM_DELAY);
    }

    /// Releases `partitions`: drops their unsent messages (the next owner reads them again
    /// from the stored offset), lets the supervisor finish and stop them, and commits their
    /// applied offsets to Kafka for lag dashboards.
    fn release(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) -> Vec<Released> {
        {
            let mut reclaims = self.reclaims.lock().expect("reclaims lock");
            for p in partitions {
                reclaims.remove(p);
            }
        }
        {
            let mut pending = self.pending.lock().expect("pending lock");
            for p in partitions {
                pending.remove(p);
            }
        }
        {
            let mut seeks = self.seeks.lock().expect("seeks lock");
            for p in partitions {
                seeks.remove(p);
            }
        }
        let released = self.supervisor.stop(partitions);
        self.supervisor.forget(partitions);
        let mut tpl = TopicPartitionList::new();
        for r in released.iter().filter(|r| r.next_offset >= 0) {
            let _ =
                tpl.add_partition_offset(&self.topic, r.partition, Offset::Offset(r.next_offset));
        }
        self.advisory_commit(consumer, &tpl);
        released
    }

    fn release_all(&self, consumer: &BaseConsumer<Self>) {
        self.release(consumer, &self.supervisor.started());
    }

    /// A rebalance begins for this member, ending after `assigns` assignment callbacks.
    fn rebalance_begins(&self, assigns: u8) {
        self.rebalancing.store(true, Ordering::Relaxed);
        self.assigns_expected.store(assigns, Ordering::Relaxed);
    }

    /// An assignment callback is through: the rebalance is over, unless a second join round
    /// follows a cooperative revocation.
    fn rebalance_step_done(&self) {
        self.joined.store(true, Ordering::Relaxed);
        let left = self
            .assigns_expected
            .load(Ordering::Relaxed)
            .saturating_sub(1);
        self.assigns_expected.store(left, Ordering::Relaxed);
        if left == 0 {
            self.rebalancing.store(false, Ordering::Relaxed);
        }
    }

    /// Lets a rebalance in progress finish before the instance leaves its group, for at most
    /// `patience`, taking nothing it is given (see the assignment callback).
    ///
    /// librdkafka (2.12, classic protocol) closed in the middle of a join — between its
    /// JoinGroup and the SyncGroup answer — terminates without the LeaveGroup it owes (the
    /// unsubscription is postponed while a rebalance is in progress, and the termination
    /// skips both the rejoin and the leave): the coordinator keeps the member until its
    /// session times out, and meanwhile the partitions the group gave it are processed by no
    /// one (and `tierd offsets reset` refuses, a member being in the group). Once the
    /// rebalance has ended, the unsubscription leaves the group at once.
    ///
    /// A rebalance another member starts shows only in librdkafka's statistics: the decision
    /// waits for a report taken now (at most `report_every` and a margin, at most 3 s; with
    /// longer intervals the latest report tells). What remains is the moment between that
    /// report and the unsubscription.
    fn finish_rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        patience: Duration,
        report_every: Duration,
    ) {
        // KIP-848 leaves by a heartbeat, from any state.
        if !self.classic {
            return;
        }
        // Fetching stops (the partitions stay assigned: membership is untouched); a record
        // polled now is dropped, the partition's next owner reads it again from the offset
        // stored in Redis.
        if let Ok(assigned) = consumer.assignment() {
            let _ = consumer.pause(&assigned);
        }
        let now = librdkafka_clock_us();
        let fresh_by =
            Instant::now() + (report_every + Duration::from_millis(500)).min(FRESH_REPORT_WAIT);
        while self.report_taken_us.load(Ordering::Relaxed) <= now && Instant::now() < fresh_by {
            let _ = consumer.poll(Duration::from_millis(50));
        }
        if !self.rebalancing.load(Ordering::Relaxed) {
            return;
        }
        info!("Shutting down: letting the group's rebalance finish before leaving the group.");
        let deadline = Instant::now() + patience;
        while self.rebalancing.load(Ordering::Relaxed) && Instant::now() < deadline {
            let _ = consumer.poll(Duration::from_millis(50));
        }
        if self.rebalancing.load(Ordering::Relaxed) {
            warn!(
                waited_ms = u64::try_from(patience.as_millis()).unwrap_or(u64::MAX),
                "The group's rebalance did not finish: the group may keep this instance as a \
                 member until its session times out."
            );
        }
    }

    /// Restarts partitions whose runner stopped while we still own them: a diverged one is
    /// claimed again and the consumer seeks to the offset stored in Redis. A fenced one (a
    /// stale claim by an instance that no longer holds it, or Redis restoring an older epoch)
    /// is claimed again after [`RECLAIM_DELAY`] if the group still gives it to this instance,
    /// at most [`FENCES_PER_WINDOW`] times a minute. Until then, and a failed one for good,
    /// it stays stopped — paused, and shown by `/readyz/ingest` and `tierd_partitions_stopped` —
    /// until the group hands it over (or an operator intervenes).
    fn recover(&self, consumer: &BaseConsumer<Self>, dead: &[i32]) {
        for released in self.release(consumer, dead) {
            let partition = released.partition;
            let reason = match released.exit {
                RunnerExit::Diverged { .. } => {
                    let give_up = self.supervisor.claims_give_up_at();
                    let (claim, tx) = match self.supervisor.restart(partition, give_up) {
                        None => continue,
                        Some(Ok(claimed)) => claimed,
                        Some(Err(not_claimed)) => {
                            self.supervisor
                                .mark_stopped(&released, not_claimed.to_string());
                            self.retry_claim_later(&not_claimed, partition);
                            self.pause(consumer, partition);
                            continue;
                        }
                    };
                    self.pending
                        .lock()
                        .expect("pending lock")
                        .insert(partition, Pending::new(tx));
                    // Resumed once sought: it may have been paused while its queue was full.
                    self.seek_claimed(consumer, partition, &claim);
                    continue;
                }
                RunnerExit::Fenced => {
                    let now = Instant::now();
                    let mut fences = self.fences.lock().expect("fences lock");
                    let recent = fences.entry(partition).or_default();
                    recent.retain(|t| now.duration_since(*t) < FENCE_WINDOW);
                    if recent.len() < FENCES_PER_WINDOW {
                        recent.push(now);
                        self.reclaims
                            .lock()
                            .expect("reclaims lock")
                            .insert(partition, now + RECLAIM_DELAY);
                        format!(
                            "fenced: another claim in Redis after this instance's; claiming it again in {} s if the group still assigns it here",
                            RECLAIM_DELAY.as_secs()
                        )
                    } else {
                        format!(
                            "fenced {FENCES_PER_WINDOW} times within {} s: something keeps claiming it; left stopped",
                            FENCE_WINDOW.as_secs()
                        )
                    }
                }
                RunnerExit::Failed => {
                    "failed: its state in Redis cannot be read (see the log)".to_owned()
                }
                RunnerExit::Finished => "its runner finished unexpectedly".to_owned(),
                RunnerExit::Panicked => {
                    "its runner panicked (a bug: the log has the message); /healthz fails so that tierd is restarted".to_owned()
                }
            };
            self.supervisor.mark_stopped(&released, reason);
            self.pause(consumer, partition);
        }
    }

    /// After librdkafka reported that a partition's fetch offset is not in its log (and
    /// stopped fetching it: `auto.offset.reset = error`), finds the owned partitions whose
    /// stored or fetch offset lies outside their log and stops each with the reason: records
    /// deleted before they were applied (retention, delete-records), or an offset beyond the
    /// log end (a recreated topic, an unclean leader election). Neither is skipped nor
    /// re-read silently; an operator decides (see README "Operations").
    fn stop_out_of_range(&self, consumer: &BaseConsumer<Self>) {
        let positions = consumer.position().unwrap_or_default();
        let mut found = false;
        let mut unsure = false;
        for partition in self.supervisor.started() {
            let (low, high) =
                match consumer.fetch_watermarks(&self.topic, partition, Duration::from_secs(10)) {
                    Ok(w) => w,
                    Err(error) => {
                        warn!(partition, %error, "Reading the partition's log bounds failed.");
                        unsure = true;
                        continue;
                    }
                };
            let stored = self
                .supervisor
                .applied_offsets(&[partition])
                .first()
                .map(|(_, next)| *next);
            let fetching = positions
                .find_partition(&self.topic, partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            // Where it fetches from; before its first fetch, its stored offset. (An applied
            // offset below the log start with the fetch position inside it is fine: those
            // records are already in memory.)
            let Some(at) = fetching.or(stored).filter(|&o| o < low || o > high) else {
                continue;
            };
            found = true;
            let reason = if at < low {
                format!(
                    "offsets {at} to {} were deleted from the topic (retention or delete-records) before tierd applied them; their events are missing from the state. Restore them to the topic, or accept the loss and move the stored offset (README \"Operating notes\": an offset outside the log)",
                    low - 1
                )
            } else {
                format!(
                    "offset {at} is beyond the end of the partition's log ({high}): the topic was deleted and recreated, or truncated by an unclean leader election. Nothing is skipped or re-read; decide where to resume and move the stored offset (README \"Operating notes\": an offset outside the log)"
                )
            };
            self.stop_outside_log(consumer, partition, &reason);
        }
        if !found || unsure {
            // E.g. a truncation detected by the leader epoch while the log has grown past the
            // position again: the statistics will show which partition stopped fetching.
            warn!("librdkafka reported an offset outside a partition's log that the log bounds do not explain; looking for the partition that stopped fetching.");
            *self.offset_error.lock().expect("offset error lock") = Some(Instant::now());
        }
    }

    /// Stops the partitions that the statistics showed as no longer fetching after an
    /// unattributed offset-out-of-range report (see [`Self::stop_out_of_range`]).
    fn stop_not_fetching(&self, consumer: &BaseConsumer<Self>) {
        let partitions =
            std::mem::take(&mut self.not_fetching.lock().expect("not fetching lock").1);
        {
            let mut since = self.offset_error.lock().expect("offset error lock");
            if since.is_some_and(|t| t.elapsed() > OFFSET_ERROR_WINDOW) {
                *since = None;
            }
        }
        let started = self.supervisor.started();
        for partition in partitions.into_iter().filter(|p| started.contains(p)) {
            let reason = "librdkafka stopped fetching it: its offset is not in the log (truncated by an unclean leader election, or records deleted or replaced). Nothing is skipped or re-read; decide where to resume and move the stored offset (README \"Operating notes\": an offset outside the log)".to_owned();
            self.stop_outside_log(consumer, partition, &reason);
        }
    }

    /// Stops (releases, reports and pauses) a partition whose offset is not in its log.
    fn stop_outside_log(&self, consumer: &BaseConsumer<Self>, partition: i32, reason: &str) {
        error!(
            partition,
            reason, "Partition stopped: its offset is not in the log."
        );
        for released in self.release(consumer, &[partition]) {
            self.supervisor.mark_stopped(&released, reason.to_owned());
        }
        self.pause(consumer, partition);
    }

    /// Pauses a partition this instance holds but does not process.
    fn pause(&self, consumer: &BaseConsumer<Self>, partition: i32) {
        self.undrain(Some(partition));
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        if let Err(error) = consumer.pause(&tpl) {
            warn!(partition, %error, "Pausing the stopped partition failed.");
        }
    }

    /// Schedules another claim of a partition held here whose claim found Redis or Kafka
    /// unavailable (a refusal by rules version is final until the group moves the partition).
    fn retry_claim_later(&self, not_claimed: &NotClaimed, partition: i32) {
        if matches!(not_claimed, NotClaimed::Unavailable(_)) {
            self.reclaims
                .lock()
                .expect("reclaims lock")
                .insert(partition, Instant::now() + RECLAIM_DELAY);
        }
    }

    /// Claims again the fenced partitions (and those whose claim found Redis or Kafka
    /// unavailable) whose delay is over, if the group still assigns them to this instance;
    /// seeks each to the offset stored in Redis and resumes it.
    fn reclaim_due(&self, consumer: &BaseConsumer<Self>) {
        let due: Vec<i32> = {
            let mut reclaims = self.reclaims.lock().expect("reclaims lock");
            let now = Instant::now();
            let due: Vec<i32> = reclaims
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(p, _)| *p)
                .collect();
            for p in &due {
                reclaims.remove(p);
            }
            due
        };
        if due.is_empty() {
            return;
        }
        let assigned = consumer.assignment().unwrap_or_default();
        let give_up = self.supervisor.claims_give_up_at();
        for partition in due {
            if assigned.find_partition(&self.topic, partition).is_none() {
                continue;
            }
            let (claim, tx) = match self.supervisor.restart(partition, give_up) {
                None => continue,
                Some(Ok(claimed)) => claimed,
                Some(Err(not_claimed)) => {
                    self.supervisor
                        .mark_not_processed(partition, -1, not_claimed.to_string());
                    self.retry_claim_later(&not_claimed, partition);
                    continue;
                }
            };
            self.pending
                .lock()
                .expect("pending lock")
                .insert(partition, Pending::new(tx));
            info!(partition, epoch = claim.epoch, next_offset = ?claim.next_offset, "Partition claimed again (after a fence, or a claim Redis or Kafka did not answer).");
            self.seek_claimed(consumer, partition, &claim);
        }
    }

    /// Adds a message to its partition's batch, sending the batch when full. Returns the
    /// partition if its runner has stopped.
    fn push(&self, message: Record) -> Option<i32> {
        let partition = message.partition();
        let mut pending = self.pending.lock().expect("pending lock");
        let b = pending.get_mut(&partition)?;
        if b.messages.is_empty() {
            b.since = Some(Instant::now());
        }
        b.polled_until = b.polled_until.max(message.offset() + 1);
        if std::mem::take(&mut b.drained) {
            // Before the message can reach its runner: it is past the reported end.
            self.set_drained(partition, NOT_DRAINED);
        }
        b.bytes += message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        b.messages.push(message);
        let full =
            b.messages.len() >= self.batching.max_events || b.bytes >= self.batching.max_bytes;
        // A held partition's batch waits for room (see `flow`); a message fetched before its
        // pause took effect just joins it.
        (full && b.held == Held::No && self.send(partition, b) == Sent::RunnerGone)
            .then_some(partition)
    }

    /// librdkafka reported that the fetcher reached `partition`'s readable end: everything
    /// before it has been polled (the report is queued behind those messages). Records how
    /// far, for [`crate::partition::PartitionStatus::caught_up`].
    fn reached_end(&self, partition: i32) {
        let until = {
            let mut pending = self.pending.lock().expect("pending lock");
            let Some(b) = pending.get_mut(&partition) else {
                return;
            };
            b.drained = true;
            b.polled_until
        };
        self.set_drained(partition, until);
    }

    /// Withdraws the report of `partition`'s end (`None`: of every partition held here): a
    /// pause or seek, and librdkafka's own pause of the assignment while a rebalance runs,
    /// drop the messages fetched past the polls, which the fetcher then reads again.
    fn undrain(&self, partition: Option<i32>) {
        let mut pending = self.pending.lock().expect("pending lock");
        for (&p, b) in pending.iter_mut() {
            if partition.is_none_or(|only| only == p) && std::mem::take(&mut b.drained) {
                self.set_drained(p, NOT_DRAINED);
            }
        }
    }

    /// Sets the partition's `drained_until` (the pending lock may be held: nothing takes it
    /// while holding the ownership lock).
    fn set_drained(&self, partition: i32, until: i64) {
        let ownership = self.supervisor.ownership().read().expect("ownership lock");
        if let Some(status) = ownership.get(&partition) {
            // Release, with the runner's acquire: published after the polls it counts.
            status.drained_until.store(until, Ordering::Release);
        }
    }

    /// Pauses partitions whose batch was just held back (their runner's queue is full) and
    /// hands held batches over once there is room, resuming their partition. Only the slow
    /// partition waits: the consumer keeps polling the others (and the group), where blocking
    /// the thread on one full queue would stall every partition and, past
    /// `max.poll.interval.ms`, get the instance evicted from the group. Returns partitions
    /// whose runner has stopped.
    fn flow(&self, consumer: &BaseConsumer<Self>) -> Vec<i32> {
        let mut dead = Vec::new();
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        {
            let mut pending = self.pending.lock().expect("pending lock");
            for (&p, b) in pending.iter_mut() {
                match b.held {
                    Held::No => {}
                    Held::ToPause => {
                        pause.add_partition(&self.topic, p);
                        b.held = Held::Paused;
                        // The pause drops what librdkafka fetched past the polls: a report of
                        // the end before it no longer stands.
                        if std::mem::take(&mut b.drained) {
                            self.set_drained(p, NOT_DRAINED);
                        }
                    }
                    Held::Paused => match self.try_send(b) {
                        Sent::Yes => {
                            resume.add_partition(&self.topic, p);
                            b.held = Held::No;
                        }
                        Sent::Held => {}
                        Sent::RunnerGone => dead.push(p),
                    },
                }
            }
        }
        if pause.count() > 0 {
            if let Err(error) = consumer.pause(&pause) {
                warn!(%error, "Pausing partitions with a full queue failed.");
            }
        }
        if resume.count() > 0 {
            if let Err(error) = consumer.resume(&resume) {
                warn!(%error, "Resuming partitions failed.");
            }
        }
        dead
    }

    /// Sends every batch that has waited long enough; returns partitions whose runner stopped
    /// (noticed here even when no message arrives for them).
    fn flush_due(&self) -> Vec<i32> {
        let mut dead = self.supervisor.stopped();
        let mut pending = self.pending.lock().expect("pending lock");
        for (p, b) in pending.iter_mut() {
            let due = b
                .since
                .is_some_and(|t| t.elapsed() >= self.batching.max_wait);
            if due
                && b.held == Held::No
                && !dead.contains(p)
                && self.send(*p, b) == Sent::RunnerGone
            {
                dead.push(*p);
            }
        }
        dead
    }

    /// Hands the pending batch to the runner. If its queue is full (backpressure) the batch is
    /// held and the partition is to be paused (see [`Self::flow`]); the consumer thread never
    /// waits for one partition.
    fn send(&self, partition: i32, b: &mut Pending) -> Sent {
        let sent = self.try_send(b);
        match sent {
            Sent::Held => {
                b.held = Held::ToPause;
                self.hold_pending.store(true, Ordering::Relaxed);
            }
            Sent::RunnerGone => error!(partition, "Partition runner has stopped."),
            Sent::Yes => {}
        }
        sent
    }

    /// Hands the pending batch over if the runner's queue has room.
    fn try_send(&self, b: &mut Pending) -> Sent {
        if self.shutdown.load(Ordering::Relaxed) {
            // Stopping: drop the batch; the next owner reads it again from Redis' offset.
            b.messages.clear();
            b.bytes = 0;
            b.since = None;
            return Sent::Yes;
        }
        match b.tx.try_reserve() {
            Ok(permit) => {
                permit.send(std::mem::take(&mut b.messages));
                b.bytes = 0;
                b.since = None;
                Sent::Yes
            }
            Err(mpsc::error::TrySendError::Full(())) => Sent::Held,
            Err(mpsc::error::TrySendError::Closed(())) => Sent::RunnerGone,
        }
    }

    /// Commits the applied offsets in `tpl` to Kafka (for lag dashboards only); answered in
    /// [`ConsumerContext::commit_callback`].
    fn advisory_commit(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        if tpl.count() > 0 {
            match commit_answered(consumer, tpl) {
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR => self.count_commit(true),
                code => {
                    let error = KafkaError::ConsumerCommit(code.into());
                    warn!(%error, "Advisory offset commit failed (lag dashboards only).");
                }
            }
        }
    }

    /// Counts a commit sent (`true`) or answered (`false`).
    fn count_commit(&self, sent: bool) {
        if sent {
            *self.commit_sent.lock().expect("commit sent lock") = Some(Instant::now());
        }
        let update = |n: usize| Some(if sent { n + 1 } else { n.saturating_sub(1) });
        let before = self
            .commits_in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, update)
            .unwrap_or(0);
        self.show_commits_in_flight(update(before).unwrap_or(0));
    }

    fn show_commits_in_flight(&self, n: usize) {
        self.supervisor
            .pipeline()
            .telemetry
            .kafka_commits_in_flight
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Whether a periodic commit may be sent now: no commit is waiting for its answer (or
    /// the one waiting is taken as lost, see [`COMMIT_ANSWER_DEADLINE`]).
    fn commit_idle(&self) -> bool {
        if self.commits_in_flight.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let sent = *self.commit_sent.lock().expect("commit sent lock");
        if sent.is_some_and(|at| at.elapsed() >= COMMIT_ANSWER_DEADLINE) {
            warn!(
                deadline_s = COMMIT_ANSWER_DEADLINE.as_secs(),
                "An offset commit for the lag dashboards has had no answer: taken as lost, committing again."
            );
            self.commits_in_flight.store(0, Ordering::Relaxed);
            self.show_commits_in_flight(0);
            return true;
        }
        false
    }

    /// The next offsets applied so far of every owned partition.
    fn applied_offsets(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, next) in self.supervisor.applied_offsets(&[]) {
            let _ = tpl.add_partition_offset(&self.topic, p, Offset::Offset(next));
        }
        tpl
    }
}

impl ClientContext for IngestContext {
    /// librdkafka's errors, logged as rust-rdkafka does, except its reports of a partition's
    /// end: those are expected (tierd asks for them, see `reached_end`), and rust-rdkafka
    /// passes every consumer error through here before the poll returns it.
    fn error(&self, error: KafkaError, reason: &str) {
        crate::kafka::log_client_error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        // A report is served ahead of the events queued when it was taken (librdkafka queues
        // statistics first): one showing a join round comes before the assignment that ends
        // it. While a rebalance callback is pending or running (`wait-*-call`) the callback
        // tells; `steady` only once no assignment is expected (between the two rounds of a
        // cooperative rebalance the member is steady while it commits); `init` only before the
        // first join (e.g. no coordinator: nothing to leave; later, between two rounds).
        if let Some(group) = &statistics.cgrp {
            self.report_taken_us
                .fetch_max(statistics.ts, Ordering::Relaxed);
            match group.join_state.as_str() {
                "wait-join"
                | "wait-metadata"
                | "wait-sync"
                | "wait-unassign-to-complete"
                | "wait-incr-unassign-to-complete" => {
                    self.rebalancing.store(true, Ordering::Relaxed);
                    self.assigns_expected.fetch_max(1, Ordering::Relaxed);
                }
                "steady" if self.assigns_expected.load(Ordering::Relaxed) == 0 => {
                    self.rebalancing.store(false, Ordering::Relaxed);
                }
                "init" if !self.joined.load(Ordering::Relaxed) => {
                    self.rebalancing.store(false, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        if self
            .offset_error
            .lock()
            .expect("offset error lock")
            .is_some()
        {
            let held: Vec<i32> = self
                .pending
                .lock()
                .expect("pending lock")
                .iter()
                .filter(|(_, b)| b.held != Held::No)
                .map(|(p, _)| *p)
                .collect();
            let started = self.supervisor.started();
            let now: Vec<i32> = topic
                .partitions
                .iter()
                .filter(|&(p, part)| {
                    part.fetch_state == "none" && started.contains(p) && !held.contains(p)
                })
                .map(|(p, _)| *p)
                .collect();
            let mut seen = self.not_fetching.lock().expect("not fetching lock");
            let confirmed: Vec<i32> = now.iter().copied().filter(|p| seen.0.contains(p)).collect();
            seen.1.extend(confirmed);
            seen.0 = now;
        }
        let ownership = self.supervisor.ownership().read().expect("ownership lock");
        for (p, part) in &topic.partitions {
            if let Some(status) = ownership.get(p) {
                if part.hi_offset >= 0 {
                    status
                        .high_watermark
                        .store(part.hi_offset, Ordering::Relaxed);
                    // Under `read_committed` only the last stable offset is readable.
                    let end = if part.ls_offset >= 0 {
                        part.ls_offset.min(part.hi_offset)
                    } else {
                        part.hi_offset
                    };
                    status.readable_end.store(end, Ordering::Relaxed);
                    status
                        .fetch_position
                        .store(part.next_offset, Ordering::Relaxed);
                }
                if let Some(lag) = status.lag() {
                    self.supervisor
                        .pipeline()
                        .telemetry
                        .consumer_lag
                        .with_label_values(&[&p.to_string()])
                        .set(lag);
                }
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    /// The answer to an offset commit (served by the poll): the next periodic commit may go.
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        self.count_commit(false);
        if let Err(error) = result {
            warn!(%error, "Advisory offset commit not accepted (lag dashboards only).");
        }
    }

    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        // librdkafka paused the whole assignment for the rebalance (until the assignment
        // below): what it fetched and tierd has not polled is dropped and fetched again.
        self.undrain(None);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS
                if self.shutdown.load(Ordering::Relaxed) =>
            {
                // Stopping (the end of a rebalance the shutdown waited for): nothing is
                // claimed; the partitions are taken paused at their end (no committed offset
                // looked up, none missing), only to be revoked as the instance leaves.
                let mut taken = TopicPartitionList::new();
                for e in tpl.elements() {
                    let _ = taken.add_partition_offset(e.topic(), e.partition(), Offset::End);
                }
                let result = if cooperative {
                    consumer.incremental_assign(&taken)
                } else {
                    consumer.assign(&taken)
                };
                if let Err(error) = result.and_then(|()| consumer.pause(&taken)) {
                    warn!(%error, "Taking the last assignment while stopping failed.");
                }
                self.rebalance_step_done();
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let Claimed { assign, refused } = self.claim_all(tpl);
                let result = if cooperative {
                    consumer.incremental_assign(&assign)
                } else {
                    consumer.assign(&assign)
                };
                if let Err(error) = result {
                    error!(%error, "Assigning partitions failed.");
                }
                // A partition this instance paused when its runner stopped stays paused through
                // a revocation (the pause belongs to the application): given back, it must fetch
                // — unless its claim was refused, or it waits for the seek that validates its
                // start (an assignment starts without validation; the seek makes librdkafka
                // check the leader epoch first, and an offset error follows if the log was
                // truncated under it).
                let held: Vec<i32> = self
                    .seeks
                    .lock()
                    .expect("seeks lock")
                    .keys()
                    .copied()
                    .collect();
                let mut resume = TopicPartitionList::new();
                for e in assign.elements() {
                    if held.contains(&e.partition()) {
                        self.pause(consumer, e.partition());
                    } else {
                        resume.add_partition(&self.topic, e.partition());
                    }
                }
                if resume.count() > 0 {
                    if let Err(error) = consumer.resume(&resume) {
                        warn!(%error, "Resuming assigned partitions failed.");
                    }
                }
                self.seek_due(consumer);
                if refused.count() > 0 {
                    if let Err(error) = consumer.pause(&refused) {
                        warn!(%error, "Pausing partitions whose claim was refused failed.");
                    }
                }
                self.rebalance_step_done();
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // A revocation is followed by a (re)join and an assignment; a cooperative one
                // (not a loss) by two (see `assigns_expected`).
                self.rebalance_begins(if cooperative && !consumer.assignment_lost() {
                    2
                } else {
                    1
                });
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                info!(
                    ?partitions,
                    lost = consumer.assignment_lost(),
                    "Partitions revoked."
                );
                self.release(consumer, &partitions);
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = result {
                    error!(%error, "Unassigning partitions failed.");
                }
            }
            other => {
                error!(error = ?other, "Rebalance failed; releasing all partitions.");
                self.release_all(consumer);
                let _ = consumer.unassign();
            }
        }
    }
}

/// Commits `tpl` asynchronously with its answer delivered to the consumer's poll
/// ([`ConsumerContext::commit_callback`]). rust-rdkafka's `commit(.., Async)` calls
/// `rd_kafka_commit` without a reply queue, and librdkafka then reports the answer only to a
/// callback set on the configuration, which rust-rdkafka's event-based consumer does not set:
/// the answer is dropped. `rd_kafka_commit_queue` with the main queue (forwarded to the
/// consumer queue by rust-rdkafka) and no callback turns it into the OFFSET_COMMIT event the
/// poll serves, as librdkafka's own auto-commit does.
fn commit_answered(
    consumer: &BaseConsumer<IngestContext>,
    tpl: &TopicPartitionList,
) -> RDKafkaRespErr {
    use rdkafka::bindings as rd;
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` and `tpl` are live for the calls (librdkafka copies the list); the main
    // queue handle is released after the call, the commit keeps its own reference to it.
    unsafe {
        let queue = rd::rd_kafka_queue_get_main(rk);
        let code = rd::rd_kafka_commit_queue(rk, tpl.ptr(), queue, None, std::ptr::null_mut());
        rd::rd_kafka_queue_destroy(queue);
        code
    }
}

/// Polls until the context's shutdown flag is set, then finishes in-flight work and leaves
/// the group.
pub fn run(
    consumer: BaseConsumer<IngestContext>,
    topic: &str,
    commit_interval: Duration,
    leave_patience: Duration,
    report_every: Duration,
    liveness: &Arc<Liveness>,
) {
    // Dropped however this thread ends (a return, or unwinding from a panic): `/healthz`
    // fails and tierd stops, unless it is stopping anyway.
    let _alive = liveness.consumer_guard();
    if let Err(error) = consumer.subscribe(&[topic]) {
        error!(%error, "Subscribing to the input topic failed.");
        return;
    }
    let ctx = consumer.context();
    ctx.rebalance_begins(1);
    let mut last_flush_check = Instant::now();
    let mut last_commit = Instant::now();
    let mut last_seek = Instant::now();
    while !ctx.shutdown.load(Ordering::Relaxed) {
        liveness.polled();
        match consumer.poll(Duration::from_millis(5)) {
            Some(Ok(message)) => {
                // Fault injection for the tests (`--features failpoints`).
                fail::fail_point!("ingest-record");
                if let Some(dead) = ctx.push(Record::detach(&message)) {
                    ctx.recover(&consumer, &[dead]);
                }
                // A partition just held back is paused at once: every message polled before
                // the pause joins its held batch (after it, librdkafka drops what it fetched).
                if ctx.hold_pending.swap(false, Ordering::Relaxed) {
                    let dead = ctx.flow(&consumer);
                    if !dead.is_empty() {
                        ctx.recover(&consumer, &dead);
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => ctx.reached_end(partition),
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                ctx.stop_out_of_range(&consumer);
            }
            Some(Err(error)) => warn!(%error, "Consumer error."),
            None => {}
        }
        if last_flush_check.elapsed() >= Duration::from_millis(1) {
            let mut dead = ctx.flush_due();
            dead.extend(ctx.flow(&consumer));
            dead.sort_unstable();
            dead.dedup();
            if !dead.is_empty() {
                ctx.recover(&consumer, &dead);
            }
            ctx.reclaim_due(&consumer);
            ctx.stop_not_fetching(&consumer);
            if last_seek.elapsed() >= SEEK_RETRY {
                ctx.seek_due(&consumer);
                last_seek = Instant::now();
            }
            last_flush_check = Instant::now();
        }
        // Not while a seek is held: librdkafka defers a new assignment's fetch start (and so
        // the seek) while an offset commit is in flight.
        if last_commit.elapsed() >= commit_interval
            && ctx.commit_idle()
            && ctx.seeks.lock().expect("seeks lock").is_empty()
        {
            ctx.advisory_commit(&consumer, &ctx.applied_offsets());
            last_commit = Instant::now();
        }
    }
    info!("Shutting down: finishing in-flight batches and flushing outboxes.");
    ctx.release_all(&consumer);
    ctx.finish_rebalance(&consumer, leave_patience, report_every);
    consumer.unsubscribe();
}

#[cfg(test)]
mod tests {
    use super::librdkafka_clock_us;
    use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
    use rdkafka::statistics::Statistics;
    use rdkafka::ClientContext;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct Reports(Mutex<Vec<i64>>);

    impl ClientContext for Reports {
        fn stats(&self, statistics: Statistics) {
            self.0.lock().unwrap().push(statistics.ts);
        }
    }
    impl ConsumerContext for Reports {}

    /// The statistics' `ts` is on the clock `librdkafka_clock_us` reads: a report taken
    /// between two readings falls between them (a shutdown waits for a report taken after
    /// its stop on that comparison). No broker is needed: the reports come regardless.
    #[test]
    fn statistics_are_timed_on_the_clock_a_stop_compares_with() {
        let before = librdkafka_clock_us();
        let consumer: BaseConsumer<Reports> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "clock-check")
            .set("statistics.interval.ms", "100")
            .set("log_level", "0")
            .create_with_context(Reports::default())
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while consumer.context().0.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "no statistics report");
            let _ = consumer.poll(Duration::from_millis(50));
        }
        let after = librdkafka_clock_us();
        let ts = consumer.context().0.lock().unwrap()[0];
        assert!(
            before <= ts && ts <= after,
            "report at {ts}, not between {before} and {after}"
        );
    }
}
