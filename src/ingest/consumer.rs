//! The consumer thread: group membership, partition claims, and per-partition batching.
//!
//! One OS thread polls a [`BaseConsumer`] (so the rebalance callback may block on Redis while
//! it claims partitions) and cuts each partition's messages into size- and time-bounded
//! batches for that partition's [`Worker`]. On assignment a partition is claimed in Redis
//! (bumping its fencing epoch) and the consumer starts at the offset stored there; Kafka's
//! committed offsets are written for lag dashboards only. On revocation the partition's
//! in-flight batches are finished and its outbox flushed before it is released.

use crate::apply::keys::Keyspace;
use crate::apply::store;
use crate::apply::worker::{Batch, Worker};
use crate::apply::{Ownership, PartitionStatus, Pipeline};
use crate::publish::publisher::Publisher;
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

/// How long a revocation waits for a partition's in-flight work and final outbox drain.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

/// A partition this instance owns.
struct Assigned {
    tx: mpsc::Sender<Batch>,
    pending: Vec<OwnedMessage>,
    pending_since: Option<Instant>,
    worker: JoinHandle<()>,
    publisher: JoinHandle<()>,
    stop_publisher: watch::Sender<bool>,
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Messages per batch.
    pub max_events: usize,
    /// Oldest message's maximum wait.
    pub max_wait: Duration,
    /// Batches queued per partition.
    pub queue: usize,
}

/// The consumer's context: owns the partition registry and handles rebalances.
pub struct IngestContext {
    rt: tokio::runtime::Handle,
    claims: Mutex<redis::Connection>,
    keyspace: Keyspace,
    topic: String,
    pipeline: Arc<Pipeline>,
    publisher: Publisher,
    redis: ConnectionManager,
    ownership: Ownership,
    batching: Batching,
    registry: Mutex<HashMap<i32, Assigned>>,
}

impl IngestContext {
    /// A context; `claims` is a synchronous Redis connection used only in rebalances.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rt: tokio::runtime::Handle,
        claims: redis::Connection,
        keyspace: Keyspace,
        topic: String,
        pipeline: Arc<Pipeline>,
        publisher: Publisher,
        redis: ConnectionManager,
        ownership: Ownership,
        batching: Batching,
    ) -> Self {
        Self {
            rt,
            claims: Mutex::new(claims),
            keyspace,
            topic,
            pipeline,
            publisher,
            redis,
            ownership,
            batching,
            registry: Mutex::new(HashMap::new()),
        }
    }

    /// Claims each partition in `tpl` and sets its start offset from Redis.
    fn claim_all(&self, tpl: &mut TopicPartitionList) {
        let partitions: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        for partition in partitions {
            let keys = self.keyspace.partition(partition);
            let mut backoff = Duration::from_millis(100);
            let claim = loop {
                let result = store::claim(&mut self.claims.lock().expect("claims lock"), &keys);
                match result {
                    Ok(c) => break c,
                    Err(error) => {
                        self.pipeline.telemetry.redis_errors.inc();
                        error!(partition, %error, "Claiming the partition in Redis failed; retrying.");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            let offset = claim.next_offset.map_or(Offset::Beginning, Offset::Offset);
            if let Err(error) = tpl.set_partition_offset(&self.topic, partition, offset) {
                error!(partition, %error, "Setting the start offset failed.");
            }
            info!(partition, epoch = claim.epoch, next_offset = ?claim.next_offset, "Partition assigned.");
            self.start(partition, claim.epoch, claim.next_offset.unwrap_or(-1));
        }
    }

    fn start(&self, partition: i32, epoch: i64, next_offset: i64) {
        let keys = self.keyspace.partition(partition);
        let status = Arc::new(PartitionStatus {
            epoch,
            next_offset: AtomicI64::new(next_offset),
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

    /// Finishes the in-flight work of `partitions` and stops their tasks.
    fn release(&self, partitions: &[i32]) {
        let mut released = Vec::new();
        {
            let mut registry = self.registry.lock().expect("registry lock");
            for p in partitions {
                if let Some(mut a) = registry.remove(p) {
                    if !a.pending.is_empty() {
                        let _ = a.tx.blocking_send(std::mem::take(&mut a.pending));
                    }
                    released.push((*p, a));
                }
            }
        }
        if released.is_empty() {
            return;
        }
        self.rt.block_on(async {
            let mut stops = Vec::new();
            for (p, a) in released {
                drop(a.tx);
                stops.push(async move {
                    if tokio::time::timeout(RELEASE_TIMEOUT, a.worker)
                        .await
                        .is_err()
                    {
                        warn!(partition = p, "Partition worker did not finish in time.");
                    }
                    let _ = a.stop_publisher.send(true);
                    if tokio::time::timeout(RELEASE_TIMEOUT, a.publisher)
                        .await
                        .is_err()
                    {
                        warn!(partition = p, "Outbox publisher did not finish in time.");
                    }
                });
            }
            futures::future::join_all(stops).await;
        });
        let mut ownership = self.ownership.write().expect("ownership lock");
        for p in partitions {
            ownership.remove(p);
            let _ = self
                .pipeline
                .telemetry
                .consumer_lag
                .remove_label_values(&[&p.to_string()]);
            info!(partition = p, "Partition released.");
        }
        self.pipeline
            .telemetry
            .partitions_assigned
            .set(ownership.len() as i64);
    }

    fn release_all(&self) {
        let all: Vec<i32> = self
            .registry
            .lock()
            .expect("registry lock")
            .keys()
            .copied()
            .collect();
        self.release(&all);
    }

    /// Adds a message to its partition's batch, sending the batch when full.
    fn push(&self, message: OwnedMessage) {
        let partition = message.partition();
        let mut registry = self.registry.lock().expect("registry lock");
        let Some(a) = registry.get_mut(&partition) else {
            return;
        };
        if a.pending.is_empty() {
            a.pending_since = Some(Instant::now());
        }
        a.pending.push(message);
        if a.pending.len() >= self.batching.max_events && !Self::send(partition, a) {
            registry.remove(&partition);
        }
    }

    /// Sends every batch that has waited long enough.
    fn flush_due(&self) {
        let mut registry = self.registry.lock().expect("registry lock");
        let mut dead = Vec::new();
        for (p, a) in registry.iter_mut() {
            if a.pending_since
                .is_some_and(|t| t.elapsed() >= self.batching.max_wait)
                && !Self::send(*p, a)
            {
                dead.push(*p);
            }
        }
        for p in dead {
            registry.remove(&p);
        }
    }

    /// Hands the pending batch to the worker (blocking when its queue is full: backpressure).
    /// Returns false if the worker has stopped (fenced).
    fn send(partition: i32, a: &mut Assigned) -> bool {
        a.pending_since = None;
        if a.tx.blocking_send(std::mem::take(&mut a.pending)).is_err() {
            error!(partition, "Partition worker has stopped; dropping the partition's messages until the next rebalance.");
            return false;
        }
        true
    }

    /// The next offsets applied so far, for the advisory Kafka commit.
    fn applied_offsets(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, status) in self.ownership.read().expect("ownership lock").iter() {
            let next = status.next_offset.load(Ordering::Relaxed);
            if next >= 0 {
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
                self.claim_all(tpl);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
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
                self.release(&partitions);
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
                self.release_all();
                let _ = consumer.unassign();
            }
        }
    }
}

/// Polls until `shutdown` is set, then finishes in-flight work and leaves the group.
pub fn run(
    consumer: BaseConsumer<IngestContext>,
    topic: &str,
    shutdown: &AtomicBool,
    commit_interval: Duration,
) {
    if let Err(error) = consumer.subscribe(&[topic]) {
        error!(%error, "Subscribing to the input topic failed.");
        return;
    }
    let ctx = consumer.context();
    let mut last_flush_check = Instant::now();
    let mut last_commit = Instant::now();
    while !shutdown.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(5)) {
            Some(Ok(message)) => ctx.push(message.detach()),
            Some(Err(error)) => warn!(%error, "Consumer error."),
            None => {}
        }
        if last_flush_check.elapsed() >= Duration::from_millis(1) {
            ctx.flush_due();
            last_flush_check = Instant::now();
        }
        if last_commit.elapsed() >= commit_interval {
            commit_advisory(&consumer);
            last_commit = Instant::now();
        }
    }
    info!("Shutting down: finishing in-flight batches and flushing outboxes.");
    ctx.release_all();
    commit_advisory(&consumer);
    consumer.unsubscribe();
}

fn commit_advisory(consumer: &BaseConsumer<IngestContext>) {
    let tpl = consumer.context().applied_offsets();
    if tpl.count() > 0 {
        if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
            warn!(%error, "Advisory offset commit failed (lag dashboards only).");
        }
    }
}
