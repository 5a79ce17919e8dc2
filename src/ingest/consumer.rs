//! The consumer thread: group membership, partition claims, and per-partition batching.
//!
//! One OS thread polls a [`BaseConsumer`] (so the rebalance callback may block on Redis while
//! it claims partitions) and cuts each partition's messages into size- and time-bounded
//! batches for that partition's [`Worker`]. On assignment a partition is claimed in Redis
//! (bumping its fencing epoch) and the consumer starts at the offset stored there; Kafka's
//! committed offsets are written for lag dashboards only. On revocation the partition's
//! in-flight batches are finished and its outbox flushed before it is released.

use crate::apply::worker::{Batch, Worker, WorkerExit};
use crate::apply::{Ownership, PartitionStatus, Pipeline};
use crate::publish::publisher::Publisher;
use crate::store::keys::Keyspace;
use crate::store::partition as store;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

/// How long a revocation waits for a partition's in-flight batches before aborting the worker
/// (safe: an aborted commit either happened atomically or not at all).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// A partition this instance owns.
struct Assigned {
    tx: mpsc::Sender<Batch>,
    pending: Vec<OwnedMessage>,
    pending_bytes: usize,
    pending_since: Option<Instant>,
    worker: JoinHandle<WorkerExit>,
    publisher: JoinHandle<()>,
    stop_publisher: watch::Sender<bool>,
}

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

/// The consumer's context: owns the partition registry and handles rebalances.
pub struct IngestContext {
    rt: tokio::runtime::Handle,
    redis_client: redis::Client,
    /// Synchronous connection for claims (rebalance callbacks run on the consumer thread);
    /// `None` after an error, reopened on the next claim.
    claims: Mutex<Option<redis::Connection>>,
    keyspace: Keyspace,
    topic: String,
    pipeline: Arc<Pipeline>,
    publisher: Publisher,
    redis: ConnectionManager,
    ownership: Ownership,
    batching: Batching,
    shutdown: Arc<AtomicBool>,
    registry: Mutex<HashMap<i32, Assigned>>,
}

/// Everything the consumer thread needs besides the consumer itself.
pub struct IngestParts {
    /// Runtime the partition tasks run on.
    pub rt: tokio::runtime::Handle,
    /// Redis client (claims open their own synchronous connection from it).
    pub redis_client: redis::Client,
    /// Shared async connection for workers and publishers.
    pub redis: ConnectionManager,
    /// Key names.
    pub keyspace: Keyspace,
    /// Input topic.
    pub topic: String,
    /// Rules, limits, metrics.
    pub pipeline: Arc<Pipeline>,
    /// Outbox publishing.
    pub publisher: Publisher,
    /// Owned partitions, shared with the API.
    pub ownership: Ownership,
    /// Batching limits.
    pub batching: Batching,
    /// Set when the service is stopping.
    pub shutdown: Arc<AtomicBool>,
}

impl IngestContext {
    /// A context from its parts.
    pub fn new(parts: IngestParts) -> Self {
        Self {
            rt: parts.rt,
            redis_client: parts.redis_client,
            claims: Mutex::new(None),
            keyspace: parts.keyspace,
            topic: parts.topic,
            pipeline: parts.pipeline,
            publisher: parts.publisher,
            redis: parts.redis,
            ownership: parts.ownership,
            batching: parts.batching,
            shutdown: parts.shutdown,
            registry: Mutex::new(HashMap::new()),
        }
    }

    /// Claims a partition in Redis, reconnecting and retrying until it succeeds or the
    /// service stops (`None`).
    fn claim(&self, partition: i32) -> Option<store::Claim> {
        let keys = self.keyspace.partition(partition);
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut slot = self.claims.lock().expect("claims lock");
            let result = match slot.as_mut() {
                Some(conn) => store::claim(conn, &keys),
                None => self
                    .redis_client
                    .get_connection_with_timeout(Duration::from_secs(5))
                    .and_then(|mut conn| {
                        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
                        conn.set_write_timeout(Some(Duration::from_secs(10)))?;
                        let claim = store::claim(&mut conn, &keys);
                        *slot = Some(conn);
                        claim
                    }),
            };
            match result {
                Ok(claim) => return Some(claim),
                Err(error) => {
                    *slot = None;
                    drop(slot);
                    self.pipeline.telemetry.redis_errors.inc();
                    error!(partition, %error, "Claiming the partition in Redis failed; retrying.");
                    if self.shutdown.load(Ordering::Relaxed) {
                        return None;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Claims each of our topic's partitions in `tpl`; returns the list to assign, with each
    /// partition's start offset from Redis.
    fn claim_all(&self, tpl: &TopicPartitionList) -> TopicPartitionList {
        let mut assign = TopicPartitionList::new();
        for e in tpl.elements() {
            if e.topic() != self.topic {
                continue;
            }
            let partition = e.partition();
            let Some(claim) = self.claim(partition) else {
                continue;
            };
            let offset = claim.next_offset.map_or(Offset::Beginning, Offset::Offset);
            if let Err(error) = assign.add_partition_offset(&self.topic, partition, offset) {
                error!(partition, %error, "Setting the start offset failed.");
                continue;
            }
            info!(partition, epoch = claim.epoch, next_offset = ?claim.next_offset, "Partition assigned.");
            self.start(partition, claim);
        }
        assign
    }

    fn start(&self, partition: i32, claim: store::Claim) {
        let keys = self.keyspace.partition(partition);
        let status = Arc::new(PartitionStatus {
            epoch: claim.epoch,
            next_offset: AtomicI64::new(claim.next_offset.unwrap_or(-1)),
            high_watermark: AtomicI64::new(-1),
        });
        self.ownership
            .write()
            .expect("ownership lock")
            .insert(partition, Arc::clone(&status));
        let (tx, rx) = mpsc::channel(self.batching.queue);
        let wake = Arc::new(Notify::new());
        let (stop_publisher, stop_rx) = watch::channel(false);
        let worker = Worker::new(
            partition,
            keys.clone(),
            self.redis.clone(),
            Arc::clone(&self.pipeline),
            status,
            Arc::clone(&wake),
            &claim,
        );
        let worker = self.rt.spawn(worker.run(rx));
        let publisher = self.rt.spawn(self.publisher.clone().run(
            partition,
            keys.outbox,
            self.redis.clone(),
            wake,
            stop_rx,
        ));
        self.registry.lock().expect("registry lock").insert(
            partition,
            Assigned {
                tx,
                pending: Vec::new(),
                pending_bytes: 0,
                pending_since: None,
                worker,
                publisher,
                stop_publisher,
            },
        );
        self.pipeline
            .telemetry
            .partitions_assigned
            .set(self.ownership.read().expect("ownership lock").len() as i64);
    }

    /// Lets the workers of `partitions` finish the batches already handed to them (messages
    /// not yet batched are dropped: the next owner reads them again from the stored offset),
    /// stops their publishers after a final drain, and commits their applied offsets to Kafka
    /// for lag dashboards. Returns why each worker stopped.
    fn release(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) -> Vec<(i32, WorkerExit)> {
        let released: Vec<(i32, Assigned)> = {
            let mut registry = self.registry.lock().expect("registry lock");
            partitions
                .iter()
                .filter_map(|p| registry.remove(p).map(|a| (*p, a)))
                .collect()
        };
        if released.is_empty() {
            return Vec::new();
        }
        let exits = self.rt.block_on(async {
            let stops = released.into_iter().map(|(p, a)| async move {
                drop(a.tx);
                let mut worker = a.worker;
                let exit = match tokio::time::timeout(RELEASE_TIMEOUT, &mut worker).await {
                    Ok(Ok(exit)) => exit,
                    Ok(Err(_)) => WorkerExit::Failed,
                    Err(_) => {
                        warn!(
                            partition = p,
                            "Partition worker did not finish in time; aborting it."
                        );
                        worker.abort();
                        WorkerExit::Failed
                    }
                };
                let _ = a.stop_publisher.send(true);
                let mut publisher = a.publisher;
                if tokio::time::timeout(RELEASE_TIMEOUT, &mut publisher)
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
        let tpl = self.applied_offsets(partitions);
        if tpl.count() > 0 {
            if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
                warn!(%error, "Advisory offset commit failed (lag dashboards only).");
            }
        }
        let mut ownership = self.ownership.write().expect("ownership lock");
        for (p, exit) in &exits {
            ownership.remove(p);
            let _ = self
                .pipeline
                .telemetry
                .consumer_lag
                .remove_label_values(&[&p.to_string()]);
            info!(partition = p, ?exit, "Partition released.");
        }
        self.pipeline
            .telemetry
            .partitions_assigned
            .set(ownership.len() as i64);
        exits
    }

    fn release_all(&self, consumer: &BaseConsumer<Self>) {
        let all: Vec<i32> = self
            .registry
            .lock()
            .expect("registry lock")
            .keys()
            .copied()
            .collect();
        self.release(consumer, &all);
    }

    /// Restarts partitions whose worker stopped while we still own them: a diverged one is
    /// claimed again and the consumer seeks to the offset stored in Redis; a fenced or failed
    /// one stays stopped until the group hands it over (or an operator intervenes).
    fn recover(&self, consumer: &BaseConsumer<Self>, dead: &[i32]) {
        for (partition, exit) in self.release(consumer, dead) {
            if let WorkerExit::Diverged { .. } = exit {
                let Some(claim) = self.claim(partition) else {
                    continue;
                };
                let offset = claim.next_offset.map_or(Offset::Beginning, Offset::Offset);
                info!(partition, epoch = claim.epoch, next_offset = ?claim.next_offset, "Partition claimed again after divergence.");
                self.start(partition, claim);
                if let Err(error) =
                    consumer.seek(&self.topic, partition, offset, Duration::from_secs(10))
                {
                    error!(partition, %error, "Seeking after divergence failed; releasing the partition.");
                    self.release(consumer, &[partition]);
                }
            }
        }
    }

    /// Adds a message to its partition's batch, sending the batch when full. Returns the
    /// partition if its worker has stopped.
    fn push(&self, message: OwnedMessage) -> Option<i32> {
        let partition = message.partition();
        let mut registry = self.registry.lock().expect("registry lock");
        let a = registry.get_mut(&partition)?;
        if a.pending.is_empty() {
            a.pending_since = Some(Instant::now());
        }
        a.pending_bytes +=
            message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        a.pending.push(message);
        let full = a.pending.len() >= self.batching.max_events
            || a.pending_bytes >= self.batching.max_bytes;
        (full && !self.send(partition, a)).then_some(partition)
    }

    /// Sends every batch that has waited long enough; returns partitions whose worker stopped
    /// (noticed here even when no message arrives for them).
    fn flush_due(&self) -> Vec<i32> {
        let mut registry = self.registry.lock().expect("registry lock");
        let mut dead = Vec::new();
        for (p, a) in registry.iter_mut() {
            let stopped = a.worker.is_finished()
                || (a
                    .pending_since
                    .is_some_and(|t| t.elapsed() >= self.batching.max_wait)
                    && !self.send(*p, a));
            if stopped {
                dead.push(*p);
            }
        }
        dead
    }

    /// Hands the pending batch to the worker, waiting while its queue is full (backpressure)
    /// but giving up when the service stops. Returns false if the worker has stopped.
    fn send(&self, partition: i32, a: &mut Assigned) -> bool {
        let batch = std::mem::take(&mut a.pending);
        a.pending_bytes = 0;
        a.pending_since = None;
        loop {
            // The timer must be created inside the runtime's context, i.e. in the block.
            let reserved = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(100), a.tx.reserve()).await
            });
            match reserved {
                Ok(Ok(permit)) => {
                    permit.send(batch);
                    return true;
                }
                Ok(Err(_)) => {
                    error!(partition, "Partition worker has stopped.");
                    return false;
                }
                // Stopping: drop the batch; the next owner reads it again from Redis' offset.
                Err(_) if self.shutdown.load(Ordering::Relaxed) => return true,
                Err(_) => {}
            }
        }
    }

    /// The next offsets applied so far of `partitions`, for the advisory Kafka commit.
    fn applied_offsets(&self, partitions: &[i32]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, status) in self.ownership.read().expect("ownership lock").iter() {
            let next = status.next_offset.load(Ordering::Relaxed);
            if next >= 0 && (partitions.is_empty() || partitions.contains(p)) {
                let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(next));
            }
        }
        tpl
    }
}

impl ClientContext for IngestContext {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let ownership = self.ownership.read().expect("ownership lock");
        for (p, part) in &topic.partitions {
            if let Some(status) = ownership.get(p) {
                if part.hi_offset >= 0 {
                    status
                        .high_watermark
                        .store(part.hi_offset, Ordering::Relaxed);
                }
                if let Some(lag) = status.lag() {
                    self.pipeline
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
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let assign = self.claim_all(tpl);
                let result = if cooperative {
                    consumer.incremental_assign(&assign)
                } else {
                    consumer.assign(&assign)
                };
                if let Err(error) = result {
                    error!(%error, "Assigning partitions failed.");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
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

/// Polls until the context's shutdown flag is set, then finishes in-flight work and leaves
/// the group.
pub fn run(consumer: BaseConsumer<IngestContext>, topic: &str, commit_interval: Duration) {
    if let Err(error) = consumer.subscribe(&[topic]) {
        error!(%error, "Subscribing to the input topic failed.");
        return;
    }
    let ctx = consumer.context();
    let mut last_flush_check = Instant::now();
    let mut last_commit = Instant::now();
    while !ctx.shutdown.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(5)) {
            Some(Ok(message)) => {
                if let Some(dead) = ctx.push(message.detach()) {
                    ctx.recover(&consumer, &[dead]);
                }
            }
            Some(Err(error)) => warn!(%error, "Consumer error."),
            None => {}
        }
        if last_flush_check.elapsed() >= Duration::from_millis(1) {
            let dead = ctx.flush_due();
            if !dead.is_empty() {
                ctx.recover(&consumer, &dead);
            }
            last_flush_check = Instant::now();
        }
        if last_commit.elapsed() >= commit_interval {
            let tpl = ctx.applied_offsets(&[]);
            if tpl.count() > 0 {
                if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
                    warn!(%error, "Advisory offset commit failed (lag dashboards only).");
                }
            }
            last_commit = Instant::now();
        }
    }
    info!("Shutting down: finishing in-flight batches and flushing outboxes.");
    ctx.release_all(&consumer);
    consumer.unsubscribe();
}
