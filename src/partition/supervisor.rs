//! The partition supervisor: claims a partition in Redis when the group assigns it (raising
//! its fencing epoch), starts its [`Runner`] and outbox publisher, and on release lets the
//! runner finish the batches already handed to it and the publisher drain, then forgets the
//! partition. It knows nothing of Kafka: the consumer asks it to start and stop partitions.

use super::runner::{Batch, Runner, RunnerExit};
use super::{Ownership, PartitionStatus, Pipeline};
use crate::engine::rules::Rules;
use crate::liveness::{Liveness, Task};
use crate::publish::position::{History, OutboxPositions, Published};
use crate::publish::publisher::{Publisher, Target};
use crate::store::connection::Connection;
use crate::store::partition::{
    self as store, Claim, ClaimError, OlderRules, PartitionStore, TopicRecreated,
};
use crate::store::retry::Backoff;
use crate::telemetry::events;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

/// The tasks of a started partition.
struct Running {
    runner: JoinHandle<RunnerExit>,
    publisher: JoinHandle<()>,
    stop_publisher: watch::Sender<bool>,
}

/// Runs a partition's `task`; a panic is caught, recorded in `liveness` (`/healthz` fails) and
/// turned into `panicked` (a runner's [`RunnerExit::Panicked`]: the partition is then
/// reported stopped, not just released).
async fn watched<T>(
    liveness: Arc<Liveness>,
    task: Task,
    partition: i32,
    panicked: T,
    run: impl std::future::Future<Output = T>,
) -> T {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(run).catch_unwind().await {
        Ok(done) => done,
        Err(panic) => {
            liveness.died(
                task,
                format!(
                    "partition {partition}'s {} panicked: {}",
                    task.as_str(),
                    crate::liveness::panic_message(panic.as_ref())
                ),
            );
            panicked
        }
    }
}

/// The ownership gauges' event for the current map.
fn owned_event(
    ownership: &std::collections::BTreeMap<i32, Arc<PartitionStatus>>,
) -> events::PartitionsOwned {
    events::PartitionsOwned {
        owned: ownership.len(),
        stopped: ownership.values().filter(|s| s.stopped.is_some()).count(),
    }
}

/// A released partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The partition.
    pub partition: i32,
    /// Why its runner stopped.
    pub exit: RunnerExit,
    /// The next offset it had applied up to (-1 if none).
    pub next_offset: i64,
}

/// What the supervisor needs to start partitions.
pub struct SupervisorParts {
    /// Runtime the partition tasks run on.
    pub rt: tokio::runtime::Handle,
    /// Redis client (claims open their own synchronous connection from it).
    pub redis_client: crate::store::client::RedisClient,
    /// Shared async connection for runners and publishers.
    pub redis: Connection,
    /// A connection of its own for the rank cut-off duty (the computation over every
    /// partition, and each owner's check for new cut-offs): on the shared one it waited
    /// behind every commit sent before it (a recompute over 1M customers took ~0.4 s there
    /// while the search itself takes under 1 ms), with partition 0's runner waiting too.
    pub duty_redis: Connection,
    /// Rules, limits, metrics.
    pub pipeline: Arc<Pipeline>,
    /// Outbox publishing.
    pub publisher: Publisher,
    /// How far each outbox was published (read at claim time).
    pub positions: Arc<OutboxPositions>,
    /// Owned partitions, shared with the API.
    pub ownership: Ownership,
    /// Batches queued per partition.
    pub queue: usize,
    /// Set when the service is stopping.
    pub shutdown: Arc<AtomicBool>,
    /// How long the claims of one rebalance callback may keep retrying, and how long a release
    /// waits for a partition's runner, then for its publisher, before aborting them (safe: an
    /// aborted commit happened atomically or not at all, and the next owner's producer aborts
    /// an open publish transaction). Both run on the consumer thread, which must poll again
    /// within `max.poll.interval.ms` or the instance is evicted from its group.
    pub callback_patience: Duration,
    /// What `/healthz` reports: a runner or publisher that panics is recorded there.
    pub liveness: Arc<Liveness>,
}

/// Why a partition was not claimed.
#[derive(Debug, Clone)]
pub enum NotClaimed {
    /// A newer rules version ran the partition.
    OlderRules(OlderRules),
    /// The input topic was recreated since the partition's offset was stored.
    TopicRecreated(TopicRecreated),
    /// Redis or Kafka did not answer within the claim's patience: to be tried again later.
    Unavailable(String),
}

impl NotClaimed {
    /// The offset stored in Redis, when the refusal told it.
    pub fn next_offset(&self) -> Option<i64> {
        match self {
            Self::OlderRules(older) => older.next_offset,
            Self::TopicRecreated(recreated) => Some(recreated.next_offset),
            Self::Unavailable(_) => None,
        }
    }
}

impl std::fmt::Display for NotClaimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OlderRules(older) => older.fmt(f),
            Self::TopicRecreated(recreated) => recreated.fmt(f),
            Self::Unavailable(why) => write!(f, "not claimed yet: {why}; trying again"),
        }
    }
}

/// Starts and stops the partitions this instance owns.
pub struct Supervisor {
    parts: SupervisorParts,
    /// Synchronous connection for claims (rebalance callbacks run on the consumer thread);
    /// `None` after an error, reopened on the next claim.
    claims: Mutex<Option<crate::store::client::SyncConnection>>,
    running: Mutex<HashMap<i32, Running>>,
    /// Published positions of claimed partitions whose replay reaches further back than
    /// their metadata keeps, for [`Self::start`] to complete from the history topic.
    histories: Mutex<HashMap<i32, Published>>,
}

impl Supervisor {
    /// A supervisor owning nothing yet.
    pub fn new(parts: SupervisorParts) -> Self {
        Self {
            parts,
            claims: Mutex::new(None),
            running: Mutex::new(HashMap::new()),
            histories: Mutex::new(HashMap::new()),
        }
    }

    /// The partitions owned, shared with the API.
    pub fn ownership(&self) -> &Ownership {
        &self.parts.ownership
    }

    /// When claims that start now must give up (see [`SupervisorParts::callback_patience`]): one
    /// deadline for every claim of a rebalance callback or a round of re-claims.
    pub fn claims_give_up_at(&self) -> Instant {
        Instant::now() + self.parts.callback_patience
    }

    /// The shared pipeline.
    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.parts.pipeline
    }

    /// Claims a partition in Redis, reconnecting and retrying until it succeeds, is refused
    /// (a newer rules version ran the partition), runs out of patience (Redis or Kafka down:
    /// the caller holds the partition and tries again later, so the consumer thread keeps
    /// polling), or the service stops (`None`). First reads from Kafka how far its outbox was
    /// published, so the claim trims what went out already.
    pub fn claim(&self, partition: i32, give_up: Instant) -> Option<Result<Claim, NotClaimed>> {
        // A position left by an earlier claim that was never started is not this claim's.
        self.histories
            .lock()
            .expect("histories lock")
            .remove(&partition);
        let keys = self.parts.pipeline.keyspace.partition(partition);
        let telemetry = &self.parts.pipeline.telemetry;
        let version = self.parts.pipeline.rules.version();
        let text = self.parts.pipeline.rules.text();
        // A refusal is an answer, not a failure to retry.
        let claim = |conn: &mut crate::store::client::SyncConnection,
                     published: &Published,
                     topic: Option<&str>| {
            let (last, parked) = (published.last_id.as_deref(), &published.parked_letters);
            match store::claim(conn, &keys, last, parked, version, text, topic) {
                Ok(claim) => Ok(Ok(claim)),
                Err(ClaimError::OlderRules(refused)) => Ok(Err(NotClaimed::OlderRules(refused))),
                Err(ClaimError::TopicRecreated(refused)) => {
                    Ok(Err(NotClaimed::TopicRecreated(refused)))
                }
                Err(ClaimError::Redis(e)) => Err(e),
            }
        };
        // One attempt must not run far past `give_up` either (a Redis that accepts connections
        // but does not answer).
        let io_timeout = || {
            give_up
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(200), Duration::from_secs(10))
        };
        let unavailable = |what: &str| {
            Some(Err(NotClaimed::Unavailable(format!(
                "{what} did not answer in time (claims give up after {:.1} s, a third of max.poll.interval.ms)",
                self.parts.callback_patience.as_secs_f64()
            ))))
        };
        let Some(published) = self.retrying(
            give_up,
            || self.parts.positions.published(partition),
            |error| events::PublishedPositionUnknown { partition, error }.emit(telemetry),
        )?
        else {
            return unavailable("Kafka (the published outbox position)");
        };
        // The input topic's id, to tell a recreated topic from the one the stored offset was
        // read from (`None`: unknown, and the claim does not compare).
        let topic_id = self.parts.positions.input_topic_id(give_up);
        let Some(claim) = self.retrying(
            give_up,
            || {
                let mut slot = self.claims.lock().expect("claims lock");
                let timeout = io_timeout();
                let result = match slot.as_mut() {
                    Some(conn) => conn.set_timeouts(timeout).and_then(|()| {
                        claim(conn, &published, topic_id.as_ref().map(|t| t.0.as_str()))
                    }),
                    None => self
                        .parts
                        .redis_client
                        .sync_connection(timeout.min(Duration::from_secs(5)))
                        .and_then(|mut conn| {
                            conn.set_timeouts(timeout)?;
                            let claim = claim(
                                &mut conn,
                                &published,
                                topic_id.as_ref().map(|t| t.0.as_str()),
                            );
                            *slot = Some(conn);
                            claim
                        }),
                };
                if result.is_err() {
                    // Reconnect on the next attempt.
                    *slot = None;
                }
                result
            },
            |error| events::ClaimFailed { partition, error }.emit(telemetry),
        )?
        else {
            return unavailable("Redis");
        };
        let mut claim = claim;
        if let Ok(claim) = &mut claim {
            if (published.reach_exceeded(claim.next_offset)
                || self.needs_rules_texts(claim, &published))
                && published.history_records > 0
                && self
                    .parts
                    .positions
                    .history_target(partition, &keys.outbox)
                    .is_some()
            {
                // The replay reaches further back than the metadata keeps, or over a rules
                // version this process has no text of: the runner reads the rest from the
                // history topic before it starts (not here: claims run on the consumer
                // thread, one deadline for all of a rebalance's claims).
                self.histories
                    .lock()
                    .expect("histories lock")
                    .insert(partition, published.clone());
            } else {
                fill_replay(partition, claim, &published);
            }
        }
        match &claim {
            Ok(claim) if claim.outbox_behind => {
                warn!(partition, published = published.last_id, replayed_cutoffs = claim.replay_cutoffs.len(), replayed_timer_passes = claim.replay_passes.len(), dead_letters_parked_again = claim.parked_again, "The outbox is behind what Kafka has published: Redis lost writes. Entries already published were trimmed (dead letters among them parked again: their parking may be lost too); new ones follow the published position.");
            }
            Ok(claim) if claim.parked_again > 0 => {
                warn!(partition, published = published.last_id, dead_letters_parked_again = claim.parked_again, "Dead letters the published position records as parked were back in the outbox (Redis lost writes: restored from before their parking): parked again, not trimmed.");
            }
            Ok(_) => {}
            Err(refused) => {
                error!(partition, %refused, "Claim refused: the partition is left stopped.")
            }
        }
        Some(claim)
    }

    /// Whether a replay from `claim` goes over a rules sweep naming a version (moved to or
    /// from) this process has no text of: the history topic has the text
    /// ([`crate::publish::position::HistoryRecord::rules`]).
    fn needs_rules_texts(&self, claim: &Claim, published: &Published) -> bool {
        let pipeline = &self.parts.pipeline;
        let unknown = |hash: u32| {
            hash != pipeline.rules.version_hash() && pipeline.known_rules(hash).is_none()
        };
        // Sweeps the restored partition had not completed (as `off_chain_sweep` counts them).
        let mut missing = published
            .sweeps()
            .filter(|s| {
                s.offset >= claim.next_offset.unwrap_or(-1) && Some(s.rules) != claim.swept_rules
            })
            .flat_map(|s| [Some(s.rules), s.from])
            .flatten()
            .filter(|&hash| unknown(hash))
            .peekable();
        if missing.peek().is_none() {
            return false;
        }
        // The partition's previous text counts as known (the runner makes it known); parsed
        // only when some version is missing (claims run under the rebalance's deadline).
        let prior = claim.prior_rules.as_deref().and_then(|text| {
            Rules::parse(text, "", pipeline.rules.fraction_digits())
                .ok()
                .map(|r| r.version_hash())
        });
        missing.any(|hash| Some(hash) != prior)
    }

    /// Calls `attempt` until it succeeds (`Some(Some(value))`), reporting each failure and
    /// backing off, until `give_up` (`Some(None)`); `None` once the service is stopping.
    /// Blocking: claims run in the rebalance callback, on the consumer thread.
    fn retrying<T, E: std::fmt::Display>(
        &self,
        give_up: Instant,
        mut attempt: impl FnMut() -> Result<T, E>,
        report: impl Fn(&dyn std::fmt::Display),
    ) -> Option<Option<T>> {
        let mut backoff = Backoff::default();
        loop {
            match attempt() {
                Ok(value) => return Some(Some(value)),
                Err(error) => {
                    report(&error);
                    if self.parts.shutdown.load(Ordering::Relaxed) {
                        return None;
                    }
                    let now = Instant::now();
                    if now >= give_up {
                        return Some(None);
                    }
                    std::thread::sleep(backoff.next_delay().min(give_up - now));
                }
            }
        }
    }

    /// Starts the runner and publisher of a claimed partition; returns the sender of its
    /// batches. Dropping every sender lets the runner finish (see [`Self::stop`]).
    pub fn start(&self, partition: i32, claim: &Claim) -> mpsc::Sender<Batch> {
        let p = &self.parts;
        let keys = p.pipeline.keyspace.partition(partition);
        let status = Arc::new(PartitionStatus::new(
            claim.epoch,
            claim.next_offset.unwrap_or(-1),
            None,
        ));
        {
            let mut ownership = p.ownership.write().expect("ownership lock");
            ownership.insert(partition, Arc::clone(&status));
            owned_event(&ownership).emit(&p.pipeline.telemetry);
        }
        let (tx, rx) = mpsc::channel(p.queue);
        let wake = Arc::new(Notify::new());
        let (stop_publisher, stop_rx) = watch::channel(false);
        let rank_keys = p
            .pipeline
            .rules
            .ranks()
            .iter()
            .map(|r| keys.rank(&r.name))
            .collect();
        let store = PartitionStore::new(
            p.redis.clone(),
            p.duty_redis.clone(),
            keys.clone(),
            rank_keys,
            partition,
            claim.epoch,
            p.pipeline.telemetry.clone(),
        );
        let health = Arc::clone(&status.publishing);
        let history = self
            .histories
            .lock()
            .expect("histories lock")
            .remove(&partition);
        let (pipeline, positions, wake_runner) = (
            Arc::clone(&p.pipeline),
            Arc::clone(&p.positions),
            Arc::clone(&wake),
        );
        let epoch = claim.epoch;
        let mut claim = claim.clone();
        let outbox_key = keys.outbox.clone();
        let liveness = Arc::clone(&p.liveness);
        let runner = p.rt.spawn(watched(
            liveness,
            Task::Runner,
            partition,
            RunnerExit::Panicked,
            async move {
                if let Some(published) = history {
                    let full =
                        read_history(&positions, partition, &outbox_key, &published, &rx).await;
                    if rx.is_closed() {
                        // Released while reading: nothing to apply, nothing to commit.
                        return RunnerExit::Finished;
                    }
                    if let Some(history) = &full {
                        know_rules_texts(&pipeline, partition, &history.rules);
                    }
                    let full = full.map(|h| h.published);
                    fill_replay(partition, &mut claim, full.as_ref().unwrap_or(&published));
                }
                let runner = Runner::new(
                    store,
                    pipeline,
                    status,
                    wake_runner,
                    positions,
                    &claim,
                    partition,
                );
                runner.run(rx).await
            },
        ));
        let target = Target {
            partition,
            keys: keys.clone(),
            epoch,
            health,
        };
        let publisher = p.rt.spawn(watched(
            Arc::clone(&p.liveness),
            Task::Publisher,
            partition,
            (),
            p.publisher
                .clone()
                .run(target, p.redis.clone(), wake, stop_rx),
        ));
        self.running.lock().expect("running lock").insert(
            partition,
            Running {
                runner,
                publisher,
                stop_publisher,
            },
        );
        tx
    }

    /// Partitions whose runner has stopped although they were not released.
    pub fn stopped(&self) -> Vec<i32> {
        self.running
            .lock()
            .expect("running lock")
            .iter()
            .filter(|(_, r)| r.runner.is_finished())
            .map(|(p, _)| *p)
            .collect()
    }

    /// Every partition started and not released.
    pub fn started(&self) -> Vec<i32> {
        self.running
            .lock()
            .expect("running lock")
            .keys()
            .copied()
            .collect()
    }

    /// Releases `partitions`: waits for each runner to finish the batches already handed to
    /// it (the caller has dropped its batch senders), stops the publisher after a final
    /// drain, and forgets the partition. Returns how each runner stopped and where.
    pub fn stop(&self, partitions: &[i32]) -> Vec<Released> {
        let stopping: Vec<(i32, Running)> = {
            let mut running = self.running.lock().expect("running lock");
            partitions
                .iter()
                .filter_map(|p| running.remove(p).map(|r| (*p, r)))
                .collect()
        };
        if stopping.is_empty() {
            return Vec::new();
        }
        let patience = self.parts.callback_patience;
        let exits = self.parts.rt.block_on(async {
            let stops = stopping.into_iter().map(|(p, r)| async move {
                let mut runner = r.runner;
                let exit = match tokio::time::timeout(patience, &mut runner).await {
                    Ok(Ok(exit)) => exit,
                    Ok(Err(_)) => RunnerExit::Failed,
                    Err(_) => {
                        warn!(
                            partition = p,
                            "Partition runner did not finish in time; aborting it."
                        );
                        runner.abort();
                        RunnerExit::Failed
                    }
                };
                let _ = r.stop_publisher.send(true);
                let mut publisher = r.publisher;
                if tokio::time::timeout(patience, &mut publisher)
                    .await
                    .is_err()
                {
                    warn!(
                        partition = p,
                        "Outbox publisher did not finish in time; aborting it."
                    );
                    publisher.abort();
                }
                (p, exit)
            });
            futures::future::join_all(stops).await
        });
        let telemetry = &self.parts.pipeline.telemetry;
        let mut ownership = self.parts.ownership.write().expect("ownership lock");
        let released = exits
            .into_iter()
            .map(|(partition, exit)| {
                let next_offset = ownership
                    .remove(&partition)
                    .map_or(-1, |s| s.next_offset.load(Ordering::Relaxed));
                events::PartitionReleased {
                    partition,
                    exit: &exit,
                }
                .emit(telemetry);
                Released {
                    partition,
                    exit,
                    next_offset,
                }
            })
            .collect();
        owned_event(&ownership).emit(telemetry);
        released
    }

    /// Records that a released partition stays assigned to this instance without being
    /// processed (its runner stopped for `reason` and is not restarted): `/readyz/ingest` and
    /// `tierd_partitions_stopped` show it until the group takes it away ([`Self::forget`]).
    pub fn mark_stopped(&self, released: &Released, reason: String) {
        self.mark_not_processed(released.partition, released.next_offset, reason);
    }

    /// Records that `partition`, assigned to this instance, is not processed (at
    /// `next_offset`, -1 if unknown), and why.
    pub fn mark_not_processed(&self, partition: i32, next_offset: i64, reason: String) {
        let mut ownership = self.parts.ownership.write().expect("ownership lock");
        events::PartitionNotProcessed {
            partition,
            reason: &reason,
        }
        .emit(&self.parts.pipeline.telemetry);
        ownership.insert(
            partition,
            Arc::new(PartitionStatus::new(-1, next_offset, Some(reason))),
        );
        owned_event(&ownership).emit(&self.parts.pipeline.telemetry);
    }

    /// Forgets partitions the group took away that were assigned but stopped.
    pub fn forget(&self, partitions: &[i32]) {
        let mut ownership = self.parts.ownership.write().expect("ownership lock");
        let before = ownership.len();
        ownership.retain(|p, s| !(partitions.contains(p) && s.stopped.is_some()));
        if ownership.len() != before {
            owned_event(&ownership).emit(&self.parts.pipeline.telemetry);
        }
    }

    /// Claims a partition again after its runner stopped on divergence; returns the claim
    /// and the new batch sender (`None` when stopping).
    pub fn restart(
        &self,
        partition: i32,
        give_up: Instant,
    ) -> Option<Result<(Claim, mpsc::Sender<Batch>), NotClaimed>> {
        let claim = match self.claim(partition, give_up)? {
            Ok(claim) => claim,
            Err(refused) => return Some(Err(refused)),
        };
        info!(partition, epoch = claim.epoch, next_offset = ?claim.next_offset, "Partition claimed again.");
        let tx = self.start(partition, &claim);
        Some(Ok((claim, tx)))
    }

    /// The next offsets applied so far of the owned partitions (of `only`, unless empty).
    pub fn applied_offsets(&self, only: &[i32]) -> Vec<(i32, i64)> {
        self.parts
            .ownership
            .read()
            .expect("ownership lock")
            .iter()
            .map(|(p, s)| (*p, s.next_offset.load(Ordering::Relaxed)))
            .filter(|(p, next)| *next >= 0 && (only.is_empty() || only.contains(p)))
            .collect()
    }
}

/// How long one read of a partition's history may take.
const HISTORY_READ_LIMIT: Duration = Duration::from_secs(300);

/// Reads of a partition's history tried before its replay goes on without it.
const HISTORY_READ_ATTEMPTS: u32 = 3;

/// The pause between two reads of a partition's history.
const HISTORY_READ_RETRY: Duration = Duration::from_secs(5);

/// `published` completed from the history topic ([`OutboxPositions::with_history`]), on a
/// blocking thread; tried [`HISTORY_READ_ATTEMPTS`] times, then `None` (logged as an error:
/// the replay reaches as far as the metadata). Stops early once `batches` is closed (the
/// partition was released).
async fn read_history(
    positions: &Arc<OutboxPositions>,
    partition: i32,
    key: &str,
    published: &Published,
    batches: &mpsc::Receiver<Batch>,
) -> Option<History> {
    let mut error = String::new();
    for attempt in 1..=HISTORY_READ_ATTEMPTS {
        let abort = Arc::new(AtomicBool::new(false));
        let read = tokio::task::spawn_blocking({
            let (positions, key, published, abort) = (
                Arc::clone(positions),
                key.to_owned(),
                published.clone(),
                Arc::clone(&abort),
            );
            move || {
                let give_up = Instant::now() + HISTORY_READ_LIMIT;
                positions.with_history(partition, &key, &published, give_up, &abort)
            }
        });
        tokio::pin!(read);
        let result = loop {
            tokio::select! {
                done = &mut read => break done.unwrap_or_else(|e| Err(e.to_string())),
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if batches.is_closed() {
                        // The blocking read sees it within a poll and ends on its own.
                        abort.store(true, Ordering::Relaxed);
                        return None;
                    }
                }
            }
        };
        match result {
            Ok(full) => {
                info!(
                    partition,
                    switches = full.published.switches.len(),
                    passes = full.published.passes.len(),
                    sweeps = full.published.sweeps().count(),
                    rules_texts = full.rules.len(),
                    "Read the partition's replay history from the history topic."
                );
                return Some(full);
            }
            Err(e) => error = e,
        }
        if batches.is_closed() {
            return None;
        }
        warn!(partition, attempt, %error, "Reading the partition's replay history from the history topic failed; trying again.");
        if attempt < HISTORY_READ_ATTEMPTS {
            tokio::time::sleep(HISTORY_READ_RETRY).await;
        }
    }
    error!(partition, %error, "Cannot read the partition's replay history from the history topic (kafka.history_topic): the replay reaches only as far as the published position's metadata.");
    None
}

/// Makes the rules texts read from the history topic known to `pipeline` for a replay, for
/// versions it does not know yet (a text that no longer parses is reported). A version
/// known already keeps its text: a `rules.history` file of the same version name is taken
/// to be the same rules (the partition's own kept text, applied by the runner after, wins
/// over both).
fn know_rules_texts(pipeline: &Pipeline, partition: i32, texts: &BTreeMap<u32, String>) {
    for (&hash, text) in texts {
        // A version known already keeps its text (a claim's or a `rules.history` file's).
        if hash == pipeline.rules.version_hash() || pipeline.known_rules(hash).is_some() {
            continue;
        }
        match Rules::parse(
            text,
            "a rules version read from the history topic",
            pipeline.rules.fraction_digits(),
        ) {
            Ok(rules) if rules.version_hash() == hash => pipeline.know_rules(rules),
            Ok(rules) => {
                warn!(partition, version = rules.version(), "A rules text in the history topic is filed under another version's hash: not used.");
            }
            Err(error) => {
                warn!(partition, %error, "A rules text read from the history topic is invalid now: a replay cannot use it.");
            }
        }
    }
}

/// Fills `claim`'s replay fields from the published position: changes published from input
/// the partition will apply again (Redis lost writes) were decided under these cut-offs,
/// timer passes and rules sweeps, and the replay applies them at the same offsets, so each
/// change is published again with the same body.
fn fill_replay(partition: i32, claim: &mut Claim, published: &Published) {
    let applied = claim.cutoffs.as_ref().map_or(0, |c| c.version);
    claim.replay_cutoffs = published.switches_from(claim.next_offset, applied);
    claim.replay_passes = published.passes_to_replay(claim.next_offset);
    claim.replay_passes_from = published.passes_from;
    claim.replay_through = published.through;
    claim.published_sweep = published.sweep;
    claim.published_earlier_sweeps = published.earlier_sweeps.clone();
    claim.published_sequence = published.max_sequence;
    claim.published_floor = published.sequence_floor;
    // Only a replay counts (Redis lost writes: the published changes reach further than the
    // restored offset); a claim that applied everything published re-decides nothing.
    let replaying = published
        .through
        .is_some_and(|through| through > claim.next_offset.unwrap_or(-1));
    if let Some(forgotten) = published
        .forgotten
        .filter(|&f| replaying && f >= claim.next_offset.unwrap_or(0))
    {
        claim.beyond_history = true;
        error!(partition, forgotten, next_offset = ?claim.next_offset, "Redis lost writes further back than the cut-offs switches and timer passes kept in the published position and the history topic: rank-based and wall-clock time-driven changes published before that offset may be published again with other contents. Keep the history topic (kafka.history_topic) as long as the oldest Redis backup you may restore.");
    }
}
