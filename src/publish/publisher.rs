//! The outbox publisher of one partition.
//!
//! Reads the outbox stream from its start and publishes it in rounds. A round is one Kafka
//! transaction of the partition's own producer ([`TxnProducer`]): every entry produced in
//! stream order (a customer's changes keep their order: same key → same output partition),
//! then committed, then trimmed from the outbox. A crash between commit and trim re-publishes
//! the same entries with the same deterministic `event_id`s; a round that fails is aborted,
//! so `read_committed` consumers never see its records.
//!
//! Only the partition's current owner publishes: a new owner's producer fences the previous
//! one at the broker, and a fenced publisher whose Redis claim is no longer current stops.
//!
//! A record Kafka refuses for good (too large for the topic, not authorized) is isolated: a
//! dead letter is parked in a side stream (retried every `publish.parked_retry_ms`) so the
//! rest flows on; a change or at-risk notice blocks its partition's outbox (its customers'
//! order matters more than progress) and is retried alone at the same pace. Both show on
//! `/readyz/ingest` and in metrics; neither re-sends the records around it.

use super::health::PublishHealth;
use super::position::{OutboxPositions, Published, PARKED_LETTERS_KEPT};
use super::producer::{self, RoundPosition, TxnError, TxnProducer};
use crate::engine::rules::rank::CutoffsSwitch;
use crate::store::connection::Connection;
use crate::store::keys::PartitionKeys;
use crate::store::outbox::{self, EntryKind, OutboxError, RulesSweep, StoredEntry, TimerPass};
use crate::store::retry::Backoff;
use crate::telemetry::{events, Telemetry};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::ClientConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Bytes produced per round at most (unless one entry alone is larger): under librdkafka's
/// default `batch.size` (1 MB) so that a round needs one produce request per partition.
const ROUND_MAX_BYTES: usize = 512 * 1024;

/// How long a stopping publisher keeps retrying its final drain.
const FINAL_DRAIN: Duration = Duration::from_secs(10);

/// The rules texts one history record carries at most, in bytes (see
/// [`super::position::HistoryRecord::rules`]).
const HISTORY_RULES_TEXTS_MAX: usize = 256 * 1024;

/// Pause after a failed round or producer initialisation (jittered); doubled after each
/// further failure in a row, up to 2 s ([`Backoff`]).
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// What every partition publisher shares.
#[derive(Clone)]
pub struct Publisher {
    /// Producer settings ([`crate::kafka::producer_config`]); each partition's producer adds
    /// its `transactional.id` (the outbox key name).
    pub producer_config: ClientConfig,
    /// Topic of tier-change events.
    pub output_topic: String,
    /// Topic of dead letters.
    pub dead_letter_topic: String,
    /// Topic of at-risk notices.
    pub at_risk_topic: String,
    /// Entries per round.
    pub batch_max: usize,
    /// Poll interval when not woken.
    pub interval: Duration,
    /// How often a parked dead letter or a blocking record is tried again.
    pub parked_retry: Duration,
    /// Where each transaction records the last outbox id it published.
    pub positions: Arc<OutboxPositions>,
    /// The text of a rules version by its hash, if this process knows it (the running rules,
    /// an earlier version a claim or `rules.history` supplied): written with the sweeps of
    /// that version to the history topic ([`super::position::HistoryRecord::rules`]).
    pub rules_text: RulesTexts,
    /// Metrics.
    pub telemetry: Telemetry,
    /// Signalled when a producer cannot even be created or initialised for a reason retrying
    /// cannot fix (a configuration or authorization error): the service stops naming it; the
    /// undelivered records stay in the outbox.
    pub fatal: Arc<Notify>,
}

/// Looks up the text of a rules version by its hash ([`Publisher::rules_text`]).
pub type RulesTexts = Arc<dyn Fn(u32) -> Option<String> + Send + Sync>;

/// The partition a publisher publishes, and as whom.
pub struct Target {
    /// The input partition.
    pub partition: i32,
    /// Its keys (outbox, parked stream, meta hash with the claim epoch).
    pub keys: PartitionKeys,
    /// The claim epoch this instance holds.
    pub epoch: i64,
    /// Where publishing problems are reported.
    pub health: Arc<PublishHealth>,
}

impl From<OutboxError> for PublishError {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Redis(e) => Self::Redis(e),
            OutboxError::Malformed { id, message } => Self::Malformed { id, message },
        }
    }
}

/// Why a publish round failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Reading or trimming the outbox failed.
    #[error("outbox: {0}")]
    Redis(#[from] redis::RedisError),
    /// Kafka did not take a record, or the transaction failed (it was aborted).
    #[error("produce: {0}")]
    Kafka(#[from] KafkaError),
    /// The producer is unusable; a new one is created on the next attempt.
    #[error("producer: {0}")]
    Producer(TxnError),
    /// An outbox entry is malformed (written by an incompatible version).
    #[error("malformed outbox entry {id}: {message}")]
    Malformed { id: String, message: String },
    /// The round's history record (`kafka.history_topic`) was not taken; the round was
    /// aborted.
    #[error("history topic (kafka.history_topic): {0}")]
    History(KafkaError),
}

/// Why a publisher ends before it is told to stop.
#[derive(Debug)]
enum Stop {
    /// A newer owner's producer fenced ours, or our Redis claim is no longer current.
    Fenced(String),
    /// No producer can be created (configuration, authorization).
    Fatal(TxnError),
}

/// What a drain attempt ended with.
enum DrainError {
    Retry(PublishError),
    Stop(Stop),
}

impl<E: Into<PublishError>> From<E> for DrainError {
    fn from(e: E) -> Self {
        Self::Retry(e.into())
    }
}

/// How one round (one transaction) went.
enum Round {
    /// Committed: entries by kind (change, dead letter, at-risk).
    Committed([u64; 3]),
    /// Aborted because Kafka refused the entry at `index` for good.
    Refused { index: usize, error: KafkaError },
    /// Aborted because Kafka refused the round's history record for good.
    HistoryRefused(KafkaError),
}

/// A change or at-risk notice that Kafka refuses, holding up its outbox.
struct Blocked {
    id: String,
    reason: String,
    retry_at: Instant,
}

/// One partition's publishing state.
struct PartitionPublisher {
    shared: Publisher,
    target: Target,
    label: String,
    conn: Connection,
    producer: Option<TxnProducer>,
    blocked: Option<Blocked>,
    parked: i64,
    parked_reason: String,
    next_parked_try: Instant,
    /// The published position with its cut-offs switches, as committed in Kafka.
    position: Published,
    /// The last outbox id known published (committed by this publisher, or read from Kafka
    /// when its producer was initialised).
    published: Option<(u64, u64)>,
    /// The last outbox id this publisher removed from the outbox itself (`None` until its
    /// first): trimmed through after a round, or parked (every entry before a parked one was
    /// trimmed or parked already). Entries at or before it that are read again were brought
    /// back by Redis losing writes:
    /// among them may be dead letters that were parked, never delivered, and whose parking
    /// Redis lost as well. Entries after it and at or before `published` were delivered and
    /// only their trim is pending (a trim that failed, a claim read before a predecessor's
    /// transaction completed).
    trimmed: Option<(u64, u64)>,
    /// Outbox ids of dead letters this publisher parked since its last committed round: the
    /// next round's position records them ([`Published::parked_letters`]), so that a claim
    /// after Redis lost the parking parks them again instead of trimming them.
    parked_unrecorded: Vec<String>,
    /// Whether the parked stream's letters were read for parkings no round recorded (once,
    /// before the first outbox read and the first round: see `read_origins`).
    origins_read: bool,
    /// Producers replaced in a row.
    producer_failures: ProducerFailures,
}

/// Producers replaced in a row (fatal, stuck) before the service is stopped instead.
const MAX_PRODUCER_FAILURES: u32 = 5;

/// Counts a partition's producers replaced in a row without a round committed in between,
/// each failure within [`PRODUCER_FAILURES_WINDOW`] of the previous one. Clock-injected.
#[derive(Debug, Default)]
struct ProducerFailures {
    count: u32,
    last: Option<Instant>,
}

impl ProducerFailures {
    /// Whether no failure is counted.
    fn none(&self) -> bool {
        self.count == 0
    }

    /// A producer failed at `now`: whether that makes [`MAX_PRODUCER_FAILURES`] in a row
    /// (the service stops instead of replacing it again).
    fn failed(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) >= PRODUCER_FAILURES_WINDOW)
        {
            self.count = 0;
        }
        self.last = Some(now);
        self.count += 1;
        self.count >= MAX_PRODUCER_FAILURES
    }

    /// A round committed: the producer works.
    fn committed(&mut self) {
        self.count = 0;
    }
}

/// A producer failure this long after the previous one starts a new count: a partition that
/// commits nothing for days (its outbox blocked by a refused change, re-initialising its
/// producer after each refusal) is not stopped by five unrelated failures over those days,
/// while a producer stuck every 45 s still stops the service within minutes.
const PRODUCER_FAILURES_WINDOW: Duration = Duration::from_secs(600);

impl Publisher {
    /// Drains the target's outbox whenever woken (or every `interval`) until `stop` turns
    /// true (or its sender is dropped); then makes final drain attempts for up to
    /// `FINAL_DRAIN` so a clean shutdown leaves nothing behind. Whatever is left is published
    /// by the next owner.
    pub async fn run(
        self,
        target: Target,
        conn: Connection,
        wake: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
    ) {
        let partition = target.partition;
        let mut p = PartitionPublisher {
            label: partition.to_string(),
            shared: self,
            target,
            conn,
            producer: None,
            blocked: None,
            parked: 0,
            parked_unrecorded: Vec::new(),
            origins_read: false,
            parked_reason: String::new(),
            next_parked_try: Instant::now(),
            published: None,
            trimmed: None,
            position: Published::default(),
            producer_failures: ProducerFailures::default(),
        };
        let _gauges = GaugeCleanup {
            telemetry: p.shared.telemetry.clone(),
            label: p.label.clone(),
        };
        let mut stopping_since: Option<Instant> = None;
        let mut backoff = Backoff::starting_at(RETRY_DELAY);
        loop {
            let drained = p.drain().await;
            if drained.is_ok() {
                backoff = Backoff::starting_at(RETRY_DELAY);
            }
            match drained {
                Ok(()) if stopping_since.is_some() => return,
                Ok(()) => {}
                Err(DrainError::Stop(Stop::Fenced(error))) => {
                    events::PublisherFenced {
                        partition,
                        error: &error,
                    }
                    .emit(&p.shared.telemetry);
                    return;
                }
                Err(DrainError::Stop(Stop::Fatal(error))) => {
                    error!(partition, %error, "No outbox producer can be created; stopping the service (the outbox keeps every undelivered record).");
                    p.shared.fatal.notify_one();
                    return;
                }
                Err(DrainError::Retry(error)) => {
                    events::PublishFailed {
                        partition,
                        error: &error,
                    }
                    .emit(&p.shared.telemetry);
                    if stopping_since.is_some_and(|t| t.elapsed() >= FINAL_DRAIN) {
                        warn!(
                            partition,
                            "Giving up the final outbox drain; the next owner publishes the rest."
                        );
                        return;
                    }
                    // Doubling while the failures go on (a Redis or broker outage): a few lines
                    // a second per partition at first, one every 1–2 s after.
                    backoff.wait().await;
                    continue;
                }
            }
            if stopping_since.is_some() {
                // Blocked by a refused record: what is left is the next owner's.
                return;
            }
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(p.shared.interval) => {}
                // A dropped sender means the partition was released: stop as well.
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        stopping_since = Some(Instant::now());
                    }
                }
            }
        }
    }
}

impl PartitionPublisher {
    /// Publishes everything in the outbox (up to a blocking record), and retries the first
    /// parked dead letter when due.
    async fn drain(&mut self) -> Result<(), DrainError> {
        if self.producer.is_none() {
            // Read before the producer is made: a failed read is tried again with it (read
            // after it, a failure left the count unread while that producer lived).
            self.parked = outbox::len(&mut self.conn, &self.target.keys.parked).await?;
            self.init_producer().await?;
            self.report();
        }
        if !self.origins_read {
            // Before the outbox is read: `trim_stale` looks the letters up too.
            self.read_origins().await?;
        }
        let outbox_key = self.target.keys.outbox.clone();
        loop {
            // Before every read, not only when a drain starts: under sustained input every
            // read is full and the drain does not return.
            if self.parked > 0 && Instant::now() >= self.next_parked_try {
                self.retry_parked().await?;
            }
            let entries = outbox::read(&mut self.conn, &outbox_key, self.shared.batch_max).await?;
            let read = entries.len();
            let mut rest = entries.as_slice();
            // Entries at or before what Kafka took went out already (nothing can be appended
            // before them: new entries sort after the published position), never again.
            let stale = rest
                .iter()
                .take_while(|e| self.published.is_some_and(|p| stream_id(&e.id) <= Some(p)))
                .count();
            if stale > 0 {
                self.trim_stale(&rest[..stale]).await?;
                rest = &rest[stale..];
            }
            // Entries the next round may take at most (a refused record's prefix, or itself).
            let mut limit = usize::MAX;
            while let Some(head) = rest.first() {
                let blocking = self.blocked.as_ref().filter(|b| b.id == head.id);
                if blocking.is_some_and(|b| Instant::now() < b.retry_at) {
                    return Ok(());
                }
                let head_blocked = blocking.is_some();
                let n = if head_blocked {
                    1
                } else {
                    round_len(rest).min(limit)
                };
                limit = usize::MAX;
                match self.round(&rest[..n], true).await? {
                    Round::Committed(counts) => {
                        self.published = stream_id(&rest[n - 1].id);
                        outbox::trim_through(&mut self.conn, &outbox_key, &rest[n - 1].id).await?;
                        self.trimmed = self.published;
                        self.count(counts);
                        debug!(
                            outbox = outbox_key,
                            published = n,
                            "Outbox round published."
                        );
                        if head_blocked {
                            info!(
                                partition = self.target.partition,
                                id = head.id,
                                "The refused outbox record went through; the outbox flows again."
                            );
                            self.blocked = None;
                            self.report();
                        }
                        rest = &rest[n..];
                    }
                    // Publish what precedes the refused record first.
                    Round::Refused { index, .. } if index > 0 => limit = index,
                    // Refused within a larger round (a whole producer batch can be refused
                    // for one record's size): try it alone before judging it.
                    Round::Refused { .. } if n > 1 => limit = 1,
                    // The history topic refuses what the replay history needs: the outbox holds
                    // here (no change may go out without it), retried and reported like a
                    // refused change.
                    Round::HistoryRefused(error) => {
                        error!(partition = self.target.partition, %error, "The history topic (kafka.history_topic) refuses this partition's history record: its outbox is held until it takes it.");
                        self.blocked = Some(Blocked {
                            id: head.id.clone(),
                            reason: format!(
                                "the history topic (kafka.history_topic) refuses the round's history record: {error}"
                            ),
                            retry_at: Instant::now() + self.shared.parked_retry,
                        });
                        self.report();
                        return Ok(());
                    }
                    Round::Refused { error, .. } => {
                        self.refused(head, &error).await?;
                        if self.blocked.is_some() {
                            return Ok(());
                        }
                        rest = &rest[1..];
                    }
                }
            }
            if read < self.shared.batch_max {
                let depth = outbox::len(&mut self.conn, &outbox_key).await?;
                self.shared
                    .telemetry
                    .outbox_depth
                    .with_label_values(&[&self.label])
                    .set(depth);
                if depth == 0 {
                    return Ok(());
                }
            }
        }
    }

    /// Removes `stale`, the outbox's first entries, all at or before the published position.
    /// Those after [`Self::trimmed`] were delivered and only their trim is pending. Those at
    /// or before it were trimmed once and brought back by Redis losing writes: the changes
    /// among them went out, but a dead letter may have been parked (never delivered) with its
    /// parking lost too. Dead letters brought back are parked again, so none is lost; one
    /// that had been delivered goes out once more, byte-identical (the claim does the same
    /// when it finds the outbox behind the published position).
    async fn trim_stale(&mut self, stale: &[StoredEntry]) -> Result<(), DrainError> {
        let back = stale
            .iter()
            .take_while(|e| self.trimmed.is_some_and(|t| stream_id(&e.id) <= Some(t)))
            .count();
        // Only by the current owner (a newer owner's claim parks them itself), and each once.
        // Also a letter the published position records as parked: brought back by a Redis
        // restored from before its parking, from a moment that already held the round after
        // it, and read by a publisher that did not park it (a restart, a handover).
        let mut parked = 0;
        for (i, e) in stale.iter().enumerate() {
            let listed = self.position.parked_letters.contains(&e.id)
                || self.parked_unrecorded.contains(&e.id);
            if !e.entry.kind.is_dead_letter() || !(i < back || listed) {
                continue;
            }
            parked += u64::from(self.park(e, outbox::LOST_WRITES).await?);
        }
        if parked > 0 {
            // Before the trim: a trim that fails leaves these letters out of the next read.
            self.parked += i64::try_from(parked).unwrap_or(i64::MAX);
            if let Ok(n) = outbox::len(&mut self.conn, &self.target.keys.parked).await {
                self.parked = n;
            }
            self.parked_reason = outbox::LOST_WRITES.to_owned();
            self.next_parked_try = Instant::now();
            self.report();
        }
        let last = &stale[stale.len() - 1].id;
        outbox::trim_through(&mut self.conn, &self.target.keys.outbox, last).await?;
        // Trimmed now, by this publisher: seen again, they too were brought back.
        self.trimmed = self.trimmed.max(stream_id(last));
        if back > 0 || parked > 0 {
            warn!(
                partition = self.target.partition,
                entries = back,
                parked,
                "Outbox entries already trimmed reappeared (Redis lost writes): the changes among them went out and are trimmed; the dead letters are parked again, since Redis may have lost their parking too."
            );
        }
        Ok(())
    }

    /// Parks the outbox entry `e` with `reason` ([`outbox::park`]): whether it was parked
    /// (false: no longer in the outbox, someone else parked or trimmed it).
    async fn park(&mut self, e: &StoredEntry, reason: &str) -> Result<bool, DrainError> {
        let keys = &self.target.keys;
        match outbox::park(&mut self.conn, keys, self.target.epoch, e, reason).await? {
            outbox::Parked::Parked => {
                self.parked_unrecorded.push(e.id.clone());
                Ok(true)
            }
            outbox::Parked::Gone => Ok(false),
            outbox::Parked::Fenced => Err(DrainError::Stop(Stop::Fenced(format!(
                "the partition was claimed again (ours {})",
                self.target.epoch
            )))),
        }
    }

    /// Creates and initialises the partition's producer, fencing any earlier producer of this
    /// outbox (which waits for, or aborts, that producer's open transaction).
    async fn init_producer(&mut self) -> Result<(), DrainError> {
        let config = self.shared.producer_config.clone();
        let id = self.target.keys.outbox.clone();
        let positions = Arc::clone(&self.shared.positions);
        let partition = self.target.partition;
        // Initialising fences the outbox's earlier producer, which may be the rightful
        // owner's: only while Redis answers that this instance's claim is current (with
        // Redis down, each round would otherwise fence the owner, fail the check below and
        // try again).
        self.check_owner().await?;
        // Initialise, then read the published position: once this producer is initialised,
        // every earlier transaction of the outbox is either committed or aborted (one in
        // PrepareCommit is completed, not aborted), and no earlier producer can commit again,
        // so the position read now is final for everything before us.
        let created = producer::within_deadline(move || {
            let p = TxnProducer::init_blocking(&config, &id)?;
            let published = positions.published(partition).map_err(TxnError::Failed)?;
            Ok((p, published))
        })
        .await;
        let (created, published) = match created {
            Ok(ok) => ok,
            Err(e @ TxnError::Fatal(_)) if self.producer_failures.none() => {
                return Err(DrainError::Stop(Stop::Fatal(e)))
            }
            Err(e) => return Err(self.producer_failed(e)),
        };
        // Initialising fenced whoever published before; if that was the rightful owner (this
        // instance's claim is no longer current), stand down: the owner re-initialises.
        self.check_owner().await?;
        if let Some(id) = published.last_id.as_deref().and_then(stream_id) {
            if self.published.is_none_or(|p| p < id) {
                self.published = Some(id);
            }
        }
        self.position = published;
        self.producer = Some(created);
        Ok(())
    }

    /// A producer could not be made or became unusable: retried, but a producer that keeps
    /// failing (calls stuck in librdkafka, each leaving a thread behind) stops the service.
    fn producer_failed(&mut self, error: TxnError) -> DrainError {
        self.release_producer();
        if self.producer_failures.failed(Instant::now()) {
            return DrainError::Stop(Stop::Fatal(error));
        }
        DrainError::Retry(PublishError::Producer(error))
    }

    /// Publishes `round` in one transaction, which also commits the position it leaves the
    /// outbox at: the round's last outbox id, or (a parked dead letter's round) the parked id
    /// delivered.
    async fn round(
        &mut self,
        round: &[StoredEntry],
        from_outbox: bool,
    ) -> Result<Round, DrainError> {
        // Fault injection for the tests (`--features failpoints`).
        fail::fail_point!("publisher-round");
        if self.producer.is_none() {
            self.init_producer().await?;
        }
        if !self.origins_read {
            self.read_origins().await?;
        }
        let result = self.transaction(round, from_outbox).await;
        if let Ok(Round::Committed(_)) = result {
            // Not on a refusal: a parked letter refused every 30 s must not hide a producer
            // that gets stuck committing every round.
            self.producer_failures.committed();
        }
        if let Ok(Round::Refused { .. } | Round::HistoryRefused(_)) = result {
            // A record the broker refused keeps its sequence number in the producer (librdkafka
            // does not bump the epoch after a refusal), so the producer's next transaction to
            // that topic partition fails as out of order, is purged and aborted: each retry of
            // a parked letter would then cost the next round of the outbox. A new producer
            // (a new epoch, sequences from 0) starts clean.
            self.release_producer();
        }
        result
    }

    /// Reads the letters parked and not delivered yet whose parking no committed round
    /// recorded (an earlier owner stopped right after parking them), for the next round to
    /// record. After this publisher's producer fenced every earlier one (no delivery can
    /// commit any more), before its first outbox read and round; not the letter the position names as
    /// delivered (its removal may have failed: recorded again, a rollback would bring it back
    /// to be delivered twice). Once per publisher: later, its own parkings are in
    /// `parked_unrecorded`, and the letters are large to read. A failed read is retried
    /// before the next round, with the producer kept.
    async fn read_origins(&mut self) -> Result<(), DrainError> {
        let origins = outbox::parked_origins(
            &mut self.conn,
            &self.target.keys.parked,
            PARKED_LETTERS_KEPT,
        )
        .await?;
        for (parked_id, id) in origins {
            if self.position.parked.as_deref() != Some(parked_id.as_str())
                && !self.position.parked_letters.contains(&id)
                && !self.parked_unrecorded.contains(&id)
            {
                self.parked_unrecorded.push(id);
            }
        }
        self.origins_read = true;
        Ok(())
    }

    /// Lets the partition's producer go (its last handle destroys the client off the async
    /// workers, see [`TxnProducer`]).
    fn release_producer(&mut self) {
        self.producer = None;
    }

    /// [`Self::round`]'s transaction, on the initialised producer.
    async fn transaction(
        &mut self,
        round: &[StoredEntry],
        from_outbox: bool,
    ) -> Result<Round, DrainError> {
        // Everything that can be malformed is read before the transaction begins (an error
        // inside it would leave it open): the position entries and each record's headers.
        let mut switches = Vec::new();
        let mut passes = Vec::new();
        let mut sweeps: Vec<RulesSweep> = Vec::new();
        let mut headers = Vec::with_capacity(round.len());
        for stored in round {
            let mut pairs = Vec::new();
            match stored.entry.kind {
                // Not records: they go into the position committed with the round.
                EntryKind::Cutoffs => switches.push(position_entry::<CutoffsSwitch>(stored)?),
                EntryKind::TimerPass => passes.push(position_entry::<TimerPass>(stored)?),
                EntryKind::RulesSweep => {
                    let started = position_entry::<RulesSweep>(stored)?;
                    // The first one of a version counts, with its completion (see
                    // `Published::after`); one version's completion and the next one's start
                    // may share a round.
                    match sweeps.iter_mut().find(|known| known.rules == started.rules) {
                        Some(known) => known.done = known.done.or(started.done),
                        None => sweeps.push(started),
                    }
                }
                _ => {
                    pairs = stored
                        .entry
                        .header_pairs()
                        .map_err(|e| PublishError::Malformed {
                            id: stored.id.clone(),
                            message: e.to_string(),
                        })?;
                }
            }
            headers.push(pairs);
        }
        let producer = self.producer.clone().expect("producer initialised");
        if let Err(e) = producer.begin() {
            return Err(self.txn_failed(e).await);
        }
        let mut deliveries = Vec::with_capacity(round.len());
        let mut failed: Option<(usize, KafkaError)> = None;
        for (index, (stored, pairs)) in round.iter().zip(&headers).enumerate() {
            let entry = &stored.entry;
            let topic = match entry.kind {
                EntryKind::Change | EntryKind::Erased => &self.shared.output_topic,
                EntryKind::DeadLetter | EntryKind::DeadLetterNoKey => {
                    &self.shared.dead_letter_topic
                }
                EntryKind::AtRisk => &self.shared.at_risk_topic,
                EntryKind::Cutoffs | EntryKind::TimerPass | EntryKind::RulesSweep => continue,
            };
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if entry.kind != EntryKind::Erased {
                record = record.payload(&entry.value);
            }
            if entry.kind != EntryKind::DeadLetterNoKey {
                record = record.key(&entry.key);
            }
            if !pairs.is_empty() {
                let mut h = OwnedHeaders::new_with_capacity(pairs.len());
                for (k, v) in pairs {
                    h = h.insert(Header {
                        key: k,
                        value: Some(v.as_bytes()),
                    });
                }
                record = record.headers(h);
            }
            // Queue in stream order; the delivery futures are awaited below.
            match producer.producer().send_result(record) {
                Ok(delivery) => deliveries.push((index, entry.kind, delivery)),
                Err((e, _)) => {
                    failed = Some((index, e));
                    break;
                }
            }
        }
        // What a replay needs of this round goes to the history topic too, in the same
        // transaction (`HistoryRecord`): the metadata below keeps only the newest of it.
        let mut record = self.position.history_record(
            round[round.len() - 1].end_offset,
            &switches,
            &passes,
            &sweeps,
        );
        let mut texts = 0;
        for hash in sweeps
            .iter()
            .flat_map(|s| [Some(s.rules), s.from])
            .flatten()
        {
            if record.rules.contains_key(&hash) {
                continue;
            }
            if let Some(text) = (self.shared.rules_text)(hash) {
                // Bounded, so a record stays far below Kafka's default 1 MB message limit; a
                // text left out is looked for in `rules.history` (its absence is a warning).
                if texts + text.len() <= HISTORY_RULES_TEXTS_MAX {
                    texts += text.len();
                    record.rules.insert(hash, text);
                }
            }
        }
        let target = self
            .shared
            .positions
            .history_target(self.target.partition, &self.target.keys.outbox)
            .filter(|_| from_outbox && failed.is_none() && !record.is_empty());
        let written = target.is_some();
        let history = match target {
            Some(target) => {
                let value = serde_json::to_vec(&record).expect("history records serialize");
                let record = FutureRecord::<[u8], [u8]>::to(target.topic)
                    .partition(target.partition)
                    .key(target.key.as_bytes())
                    .payload(&value);
                match producer.producer().send_result(record) {
                    Ok(delivery) => Some(delivery),
                    Err((e, _)) => {
                        if let Err(e) = producer.abort().await {
                            return Err(self.txn_failed(e).await);
                        }
                        if producer::is_permanent(&e) {
                            // Refused when queued (too large for the producer): held, as
                            // when the broker refuses it.
                            return Ok(Round::HistoryRefused(e));
                        }
                        return Err(DrainError::Retry(PublishError::History(e)));
                    }
                }
            }
            None => None,
        };
        let mut counts = [0u64; 3];
        for (index, kind, delivery) in deliveries {
            match delivery.await {
                Ok(Ok(_)) => counts[kind_index(kind)] += 1,
                Ok(Err((e, _))) => keep_cause(&mut failed, index, e),
                Err(_) => {
                    failed.get_or_insert((index, KafkaError::Canceled));
                }
            }
        }
        let history_failed = match history {
            Some(delivery) => match delivery.await {
                Ok(Ok(_)) => None,
                Ok(Err((e, _))) => Some(e),
                Err(_) => Some(KafkaError::Canceled),
            },
            None => None,
        };
        if let (None, Some(error)) = (&failed, history_failed) {
            // Not a record of the round's own: nothing to isolate. The round is tried again
            // whole; a history topic that refuses for good holds the outbox, reported.
            let (error, from_txn) = judged_by(&producer, error);
            self.abort_failed(&producer, from_txn).await?;
            if producer::is_fence(&error) {
                return Err(self.txn_failed(TxnError::Fenced(error)).await);
            }
            if producer::is_permanent(&error) {
                return Ok(Round::HistoryRefused(error));
            }
            return Err(DrainError::Retry(PublishError::History(error)));
        }
        if let Some((index, error)) = failed {
            // Every record purged, the transaction refused as a whole: which of the round's
            // topics refused is not told, so the round is split at a suspect, and a record is
            // judged only once refused alone (see `drain`): a wrong suspect costs rounds,
            // never a wrong judgement.
            let (error, from_txn) = judged_by(&producer, error);
            let index = if from_txn { suspect(round) } else { index };
            self.abort_failed(&producer, from_txn).await?;
            if producer::is_fence(&error) {
                return Err(self.txn_failed(TxnError::Fenced(error)).await);
            }
            if producer::is_permanent(&error) {
                return Ok(Round::Refused { index, error });
            }
            return Err(DrainError::Retry(error.into()));
        }
        let mut position = if from_outbox {
            let mut published = self.position.after_sweeps(
                &round[round.len() - 1].id,
                round[round.len() - 1].end_offset,
                &switches,
                &passes,
                &sweeps,
                self.shared.positions.budget(),
            );
            if written {
                published.history_records = record.n;
            } else if !record.is_empty() {
                // Recorded without a history record: the next one starts a new run.
                published.history_records = 0;
            }
            published.add_sequences(round, self.shared.positions.budget());
            published
        } else {
            // A parked dead letter: alone in its round.
            self.position
                .after_parked(&round[0].id, self.shared.positions.budget())
        };
        // A listed letter this round delivers is forgotten (a parked one retried, or one Redis
        // brought back after the published id and now published from the outbox): brought
        // back by Redis again, it would otherwise be parked and delivered again.
        let delivered: Vec<&str> = if from_outbox {
            round
                .iter()
                .filter(|e| e.entry.kind.is_dead_letter())
                .map(|e| e.id.as_str())
                .collect()
        } else {
            round[0].origin.as_deref().into_iter().collect()
        };
        let unrecorded: Vec<String> = self
            .parked_unrecorded
            .iter()
            .filter(|u| !delivered.contains(&u.as_str()))
            .cloned()
            .collect();
        position.add_parked_letters(&unrecorded, self.shared.positions.budget());
        for id in delivered {
            position.forget_parked_letter(id);
        }
        let committed = RoundPosition {
            positions: Arc::clone(&self.shared.positions),
            partition: self.target.partition,
            published: position.clone(),
        };
        if let Err(e) = producer.commit(Some(committed)).await {
            return Err(self.txn_failed(e).await);
        }
        self.position = position;
        self.parked_unrecorded.clear();
        Ok(Round::Committed(counts))
    }

    /// Stops (fenced) unless this instance's claim of the partition is still the current one.
    async fn check_owner(&mut self) -> Result<(), DrainError> {
        let epoch = outbox::owner_epoch(&mut self.conn, &self.target.keys.meta).await?;
        if epoch != self.target.epoch {
            return Err(DrainError::Stop(Stop::Fenced(format!(
                "the partition was claimed again (epoch {epoch}, ours {})",
                self.target.epoch
            ))));
        }
        Ok(())
    }

    /// Aborts a failed round's transaction. After a refusal read from the transaction itself
    /// (`from_txn`, see [`judged_by`]), librdkafka 2.12 ends it with an EndTxn the coordinator
    /// refuses (`INVALID_TXN_STATE`: the transaction has no partition added), a fatal error:
    /// tolerated there, as the producer is replaced after every refusal (`round`).
    async fn abort_failed(
        &mut self,
        producer: &TxnProducer,
        from_txn: bool,
    ) -> Result<(), DrainError> {
        match producer.abort().await {
            Ok(()) => Ok(()),
            Err(TxnError::Fatal(e)) if from_txn => {
                warn!(partition = self.target.partition, error = %e, "Aborting the refused round's transaction failed; the producer is replaced.");
                Ok(())
            }
            Err(e) => Err(self.txn_failed(e).await),
        }
    }

    /// A transactional call failed: a fenced producer whose claim is gone stops; otherwise
    /// the producer is replaced (fatal or fenced while still the owner) or the round retried.
    async fn txn_failed(&mut self, error: TxnError) -> DrainError {
        match error {
            TxnError::Failed(e) => DrainError::Retry(PublishError::Kafka(e)),
            TxnError::Fatal(_) | TxnError::Stuck(_) => self.producer_failed(error),
            TxnError::Fenced(_) => {
                self.release_producer();
                match outbox::owner_epoch(&mut self.conn, &self.target.keys.meta).await {
                    Ok(epoch) if epoch != self.target.epoch => {
                        DrainError::Stop(Stop::Fenced(error.to_string()))
                    }
                    // Still the claimed owner (nothing newer claimed the partition): a new
                    // producer takes over.
                    Ok(_) => DrainError::Retry(PublishError::Producer(error)),
                    Err(e) => DrainError::Retry(PublishError::Redis(e)),
                }
            }
        }
    }

    /// `head` was refused for good on its own: park a dead letter, block on anything else.
    async fn refused(&mut self, head: &StoredEntry, error: &KafkaError) -> Result<(), DrainError> {
        let reason = error.to_string();
        let kind = head.entry.kind;
        let parks = kind.is_dead_letter();
        events::PublishRefused {
            partition: self.target.partition,
            kind: kind_label(kind),
            id: &head.id,
            action: if parks {
                "parked"
            } else {
                "blocking the outbox"
            },
            error,
        }
        .emit(&self.shared.telemetry);
        if parks {
            let parked = self.park(head, &reason).await?;
            // Everything before it left the outbox already (rounds trimmed, letters parked):
            // read again, it was brought back by Redis, its parking maybe lost.
            self.trimmed = self.trimmed.max(stream_id(&head.id));
            self.parked += i64::from(parked);
            self.parked_reason = reason;
            if self.parked == 1 {
                self.next_parked_try = Instant::now() + self.shared.parked_retry;
            }
        } else {
            self.blocked = Some(Blocked {
                id: head.id.clone(),
                reason,
                retry_at: Instant::now() + self.shared.parked_retry,
            });
        }
        self.report();
        Ok(())
    }

    /// Tries the oldest parked dead letter again (alone); delivered, it leaves the side stream.
    /// Parking exists so that a letter Kafka refuses never holds up the outbox: a retry that
    /// fails (Kafka or Redis) is reported and tried again when next due.
    async fn retry_parked(&mut self) -> Result<(), DrainError> {
        self.next_parked_try = Instant::now() + self.shared.parked_retry;
        let result = match self.retry_first_parked().await {
            Err(DrainError::Retry(error)) => {
                events::PublishFailed {
                    partition: self.target.partition,
                    error: &error,
                }
                .emit(&self.shared.telemetry);
                Ok(Some("failed"))
            }
            other => other,
        };
        if let Ok(Some(result)) = result {
            self.shared
                .telemetry
                .parked_retries
                .with_label_values(&[result])
                .inc();
        }
        self.report();
        result.map(|_| ())
    }

    /// [`Self::retry_parked`]'s attempt: what came of it, `None` if nothing is parked.
    async fn retry_first_parked(&mut self) -> Result<Option<&'static str>, DrainError> {
        let parked_key = self.target.keys.parked.clone();
        let Some(stored) = outbox::read(&mut self.conn, &parked_key, 1)
            .await?
            .into_iter()
            .next()
        else {
            self.parked = 0;
            return Ok(None);
        };
        // Kafka took it, and removing it failed (Redis went away after the commit): only
        // removed. The very id only: a letter parked again after Redis lost the stream may
        // have an id below it (another host's clock), and is delivered.
        if self.position.parked.as_deref() == Some(stored.id.as_str()) {
            self.remove_parked(&stored.id).await?;
            info!(
                partition = self.target.partition,
                id = stored.id,
                "A parked dead letter delivered before is removed (not delivered again)."
            );
            return Ok(Some("removed"));
        }
        match self.round(std::slice::from_ref(&stored), false).await? {
            Round::Committed(counts) => {
                self.count(counts);
                info!(
                    partition = self.target.partition,
                    id = stored.id,
                    "A parked dead letter went through."
                );
                // Kafka has it: a removal that fails is done by the next attempt, which finds
                // its id in the committed position.
                if let Err(error) = self.remove_parked(&stored.id).await {
                    events::PublishFailed {
                        partition: self.target.partition,
                        error: &error,
                    }
                    .emit(&self.shared.telemetry);
                }
                Ok(Some("delivered"))
            }
            // Parked dead letters are not from the outbox: their rounds write no history.
            Round::Refused { error, .. } | Round::HistoryRefused(error) => {
                self.parked_reason = error.to_string();
                Ok(Some("refused"))
            }
        }
    }

    /// Removes the delivered parked letter `id`; the rest of the side stream is tried next
    /// without waiting.
    async fn remove_parked(&mut self, id: &str) -> redis::RedisResult<()> {
        let parked_key = &self.target.keys.parked;
        outbox::delete(&mut self.conn, parked_key, id).await?;
        self.parked = (self.parked - 1).max(0);
        if let Ok(n) = outbox::len(&mut self.conn, parked_key).await {
            self.parked = n;
        }
        if self.parked > 0 {
            self.next_parked_try = Instant::now();
        }
        Ok(())
    }

    /// Updates `/readyz/ingest`'s view and the gauges.
    fn report(&self) {
        let t = &self.shared.telemetry;
        t.outbox_parked
            .with_label_values(&[&self.label])
            .set(self.parked);
        t.outbox_blocked
            .with_label_values(&[&self.label])
            .set(i64::from(self.blocked.is_some()));
        let mut problems = Vec::new();
        if let Some(b) = &self.blocked {
            problems.push(format!(
                "outbox blocked at entry {}: Kafka refuses it: {}",
                b.id, b.reason
            ));
        }
        if self.parked > 0 {
            problems.push(format!(
                "{} dead letter(s) parked in {} (Kafka refuses them: {})",
                self.parked, self.target.keys.parked, self.parked_reason
            ));
        }
        self.target
            .health
            .set((!problems.is_empty()).then(|| problems.join("; ")));
    }

    fn count(&self, counts: [u64; 3]) {
        let published = &self.shared.telemetry.outbox_published;
        for (kind, n) in ["change", "dead_letter", "at_risk"].iter().zip(counts) {
            published.with_label_values(&[kind]).inc_by(n);
        }
    }
}

/// Removes a released partition's publishing gauges (another instance reports it now).
struct GaugeCleanup {
    telemetry: Telemetry,
    label: String,
}

impl Drop for GaugeCleanup {
    fn drop(&mut self) {
        let t = &self.telemetry;
        let _ = t.outbox_parked.remove_label_values(&[&self.label]);
        let _ = t.outbox_blocked.remove_label_values(&[&self.label]);
        let _ = t.outbox_depth.remove_label_values(&[&self.label]);
    }
}

/// An outbox entry the publisher keeps in the published position instead of producing it
/// (a cut-offs switch, a timer pass, a rules sweep), decoded.
fn position_entry<T: serde::de::DeserializeOwned>(stored: &StoredEntry) -> Result<T, PublishError> {
    serde_json::from_slice(&stored.entry.value).map_err(|e| PublishError::Malformed {
        id: stored.id.clone(),
        message: e.to_string(),
    })
}

/// A stream id (`ms-seq`) as a comparable pair.
fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The error a failed round is judged by: `error` (a record's delivery report, or the history
/// record's), or, when that is no permanent refusal, the transaction's own error if it is one
/// (`true`: read from the transaction). When a topic partition cannot be added to the
/// transaction (a topic this producer may not write to), librdkafka fails it as a whole and
/// reports every record only as purged (see [`TxnProducer::failed_transaction_error`]).
fn judged_by(producer: &TxnProducer, error: KafkaError) -> (KafkaError, bool) {
    if producer::is_permanent(&error) {
        return (error, false);
    }
    match producer
        .failed_transaction_error()
        .filter(producer::is_permanent)
    {
        Some(txn) => (txn, true),
        None => (error, false),
    }
}

/// The record of `round` suspected first when its transaction was refused as a whole: the
/// first one for another topic than the tier changes' (a dead letter or an at-risk notice: the
/// output topic is the one every round writes), else the first record.
fn suspect(round: &[StoredEntry]) -> usize {
    let record = |kinds: &[EntryKind]| round.iter().position(|s| kinds.contains(&s.entry.kind));
    record(&[
        EntryKind::DeadLetter,
        EntryKind::DeadLetterNoKey,
        EntryKind::AtRisk,
    ])
    .or_else(|| record(&[EntryKind::Change, EntryKind::Erased]))
    .unwrap_or(0)
}

/// Keeps in `failed` the failure a round is judged by: a permanent refusal before any other
/// (it fails the whole transaction, and librdkafka then purges the round's other records with
/// `PurgeQueue`, earlier ones too), then the earliest record.
fn keep_cause(failed: &mut Option<(usize, KafkaError)>, index: usize, error: KafkaError) {
    let rank = |i: usize, e: &KafkaError| (!producer::is_permanent(e), i);
    if failed
        .as_ref()
        .is_none_or(|(i, f)| rank(index, &error) < rank(*i, f))
    {
        *failed = Some((index, error));
    }
}

fn kind_index(kind: EntryKind) -> usize {
    match kind {
        EntryKind::Change | EntryKind::Erased => 0,
        EntryKind::DeadLetter | EntryKind::DeadLetterNoKey => 1,
        EntryKind::AtRisk => 2,
        // Never produced (kept in the position), so never counted.
        EntryKind::Cutoffs | EntryKind::TimerPass | EntryKind::RulesSweep => 0,
    }
}

fn kind_label(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Cutoffs => "cutoffs",
        EntryKind::TimerPass => "timer_pass",
        EntryKind::RulesSweep => "rules_sweep",
        other => ["change", "dead_letter", "at_risk"][kind_index(other)],
    }
}

/// How many leading entries form one round: at most [`ROUND_MAX_BYTES`], at least one.
fn round_len(entries: &[StoredEntry]) -> usize {
    let mut bytes = 0usize;
    let n = entries
        .iter()
        .take_while(|stored| {
            bytes += stored.entry.size();
            bytes <= ROUND_MAX_BYTES
        })
        .count();
    n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode;

    fn produce_error(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn a_round_refused_as_a_whole_is_split_at_its_first_record_for_another_topic() {
        use crate::store::outbox::OutboxEntry;
        let round = |kinds: &[EntryKind]| -> Vec<StoredEntry> {
            kinds
                .iter()
                .enumerate()
                .map(|(i, kind)| StoredEntry {
                    id: format!("1-{i}"),
                    entry: OutboxEntry {
                        kind: *kind,
                        key: Vec::new(),
                        value: Vec::new(),
                        headers: Vec::new(),
                    },
                    end_offset: None,
                    origin: None,
                    max_sequence: None,
                    seq_floor: None,
                })
                .collect()
        };
        use EntryKind::{AtRisk, Change, Cutoffs, DeadLetter, Erased, TimerPass};
        assert_eq!(suspect(&round(&[Change, Change, DeadLetter, Change])), 2);
        assert_eq!(suspect(&round(&[Cutoffs, Change, AtRisk])), 2);
        // Changes only: the first record, not the position entry before it.
        assert_eq!(suspect(&round(&[TimerPass, Erased, Change])), 1);
        assert_eq!(suspect(&round(&[Cutoffs])), 0);
    }

    #[test]
    fn five_producer_failures_in_a_row_stop_the_service_unless_far_apart_or_a_round_commits() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Stuck every 45 s: the fifth failure stops the service.
        let mut f = ProducerFailures::default();
        assert!(f.none());
        let stops: Vec<bool> = (0..5).map(|i| f.failed(at(45 * i))).collect();
        assert_eq!(stops, [false, false, false, false, true]);
        // One failure every 11 minutes (a parked letter's producer replaced now and then, an
        // init failing once a day) never adds up.
        let mut f = ProducerFailures::default();
        assert!((0..20).all(|i| !f.failed(at(660 * i))));
        // A committed round starts the count again.
        let mut f = ProducerFailures::default();
        for i in 0..4 {
            assert!(!f.failed(at(i)));
        }
        f.committed();
        assert!(f.none());
        assert!((4..8).all(|i| !f.failed(at(i))));
        assert!(f.failed(at(8)), "the fifth since the commit");
        // Exactly at the window the count starts again; just inside it, it goes on.
        let mut f = ProducerFailures::default();
        for i in 0..4 {
            assert!(!f.failed(at(599 * i)));
        }
        assert!(f.failed(at(599 * 4)));
        let mut f = ProducerFailures::default();
        for i in 0..4 {
            assert!(!f.failed(at(600 * i)));
        }
        assert!(!f.failed(at(600 * 4)));
    }

    #[test]
    fn a_round_is_judged_by_the_refusal_not_the_records_purged_because_of_it() {
        let mut failed = None;
        // Delivery reports arrive in record order: the purged earlier record first.
        keep_cause(&mut failed, 0, produce_error(RDKafkaErrorCode::PurgeQueue));
        keep_cause(
            &mut failed,
            3,
            produce_error(RDKafkaErrorCode::MessageSizeTooLarge),
        );
        keep_cause(&mut failed, 4, produce_error(RDKafkaErrorCode::PurgeQueue));
        let (index, error) = failed.as_ref().expect("a failure kept");
        assert_eq!(*index, 3);
        assert!(producer::is_permanent(error), "{error}");
        // Two refusals: the earlier one.
        keep_cause(
            &mut failed,
            1,
            produce_error(RDKafkaErrorCode::MessageSizeTooLarge),
        );
        assert_eq!(failed.as_ref().map(|(i, _)| *i), Some(1));
        // Without a refusal, the earliest failure.
        let mut failed = None;
        keep_cause(&mut failed, 2, produce_error(RDKafkaErrorCode::PurgeQueue));
        keep_cause(
            &mut failed,
            1,
            produce_error(RDKafkaErrorCode::MessageTimedOut),
        );
        assert_eq!(failed.as_ref().map(|(i, _)| *i), Some(1));
    }
}
