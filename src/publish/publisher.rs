//! The outbox publisher of one partition.
//!
//! Reads the outbox stream from its start, produces every entry in stream order (so a
//! customer's changes keep their order: same key → same output partition, and the idempotent
//! producer keeps order across retries), waits for all acknowledgements, then trims up to the
//! last acknowledged entry. A crash between produce and trim re-publishes the same entries with
//! the same deterministic `event_id`s.

use crate::store::outbox::{self, EntryKind, OutboxError, StoredEntry};
use crate::telemetry::{events, Telemetry};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tracing::{debug, error, warn};

/// Bytes produced per round at most (unless one entry alone is larger): under librdkafka's
/// default `batch.size` (1 MB) so that a round needs one produce request per partition.
const ROUND_MAX_BYTES: usize = 512 * 1024;

/// How long a stopping publisher keeps retrying its final drain.
const FINAL_DRAIN: Duration = Duration::from_secs(10);

/// Where a partition's outbox goes.
#[derive(Clone)]
pub struct Publisher {
    /// Shared idempotent producer.
    pub producer: FutureProducer,
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
    /// Metrics.
    pub telemetry: Telemetry,
    /// Serialises produce rounds across partitions: one round's records are all queued, then
    /// all acknowledged, before the next round queues anything. librdkafka 2.12's idempotent
    /// producer compares the *message* count in flight per partition with its limit of five
    /// *requests*: records queued behind an in-flight request wait for its acknowledgement
    /// while the broker thread busy-polls (measured: one core spinning against a slow-acking
    /// broker). Whole rounds in lock-step avoid that queueing.
    pub lane: Arc<tokio::sync::Mutex<()>>,
    /// Signalled when the producer hit a fatal error (it can never deliver again): the service
    /// must stop and be restarted; the undelivered records stay in the outbox.
    pub fatal: Arc<Notify>,
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
    /// Kafka did not acknowledge a record.
    #[error("produce: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// An outbox entry is malformed (written by an incompatible version).
    #[error("malformed outbox entry {id}: {message}")]
    Malformed { id: String, message: String },
}

impl Publisher {
    /// Drains `outbox` whenever woken (or every `interval`) until `stop` turns true (or its
    /// sender is dropped); then makes final drain attempts for up to `FINAL_DRAIN` so a clean
    /// shutdown leaves nothing behind. Whatever is left is published by the next owner.
    pub async fn run(
        self,
        partition: i32,
        outbox: String,
        mut conn: ConnectionManager,
        wake: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
    ) {
        let label = partition.to_string();
        let mut stopping_since: Option<tokio::time::Instant> = None;
        loop {
            let stopping = stopping_since.is_some();
            match self.drain(&mut conn, &outbox, &label).await {
                Ok(()) if stopping => return,
                Ok(()) => {}
                Err(error) => {
                    events::PublishFailed {
                        partition,
                        error: &error,
                    }
                    .emit(&self.telemetry);
                    if let Some((code, reason)) = self.producer.client().fatal_error() {
                        error!(partition, ?code, reason, "The producer failed fatally; stopping the service (the outbox keeps every undelivered record).");
                        self.fatal.notify_one();
                        return;
                    }
                    if stopping_since.is_some_and(|t| t.elapsed() >= FINAL_DRAIN) {
                        warn!(
                            partition,
                            "Giving up the final outbox drain; the next owner publishes the rest."
                        );
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(self.interval) => {}
                // A dropped sender means the partition was released: stop as well.
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        stopping_since = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
    }

    /// Publishes everything in the outbox.
    ///
    /// # Errors
    /// [`PublishError`]; nothing is trimmed that was not acknowledged.
    pub async fn drain(
        &self,
        conn: &mut ConnectionManager,
        outbox: &str,
        label: &str,
    ) -> Result<(), PublishError> {
        loop {
            let entries = outbox::read(conn, outbox, self.batch_max).await?;
            let read = entries.len();
            let mut rest = entries.as_slice();
            while !rest.is_empty() {
                let n = round_len(rest);
                self.publish_round(conn, outbox, &rest[..n]).await?;
                rest = &rest[n..];
            }
            if read < self.batch_max {
                let depth = outbox::len(conn, outbox).await?;
                self.telemetry
                    .outbox_depth
                    .with_label_values(&[label])
                    .set(depth);
                if depth == 0 {
                    return Ok(());
                }
            }
        }
    }

    /// Produces one round in stream order, waits for every acknowledgement, then trims it.
    async fn publish_round(
        &self,
        conn: &mut ConnectionManager,
        outbox: &str,
        round: &[StoredEntry],
    ) -> Result<(), PublishError> {
        let lane = self.lane.lock().await;
        let mut deliveries = Vec::with_capacity(round.len());
        for StoredEntry { id, entry } in round {
            let kind = entry.kind;
            let topic = match kind {
                EntryKind::Change => &self.output_topic,
                EntryKind::DeadLetter | EntryKind::DeadLetterNoKey => &self.dead_letter_topic,
                EntryKind::AtRisk => &self.at_risk_topic,
            };
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(topic).payload(&entry.value);
            if kind != EntryKind::DeadLetterNoKey {
                record = record.key(&entry.key);
            }
            let pairs = entry.header_pairs().map_err(|e| PublishError::Malformed {
                id: id.clone(),
                message: e.to_string(),
            })?;
            if !pairs.is_empty() {
                let mut h = OwnedHeaders::new_with_capacity(pairs.len());
                for (k, v) in &pairs {
                    h = h.insert(Header {
                        key: k,
                        value: Some(v.as_bytes()),
                    });
                }
                record = record.headers(h);
            }
            // Queue in stream order; the delivery futures are awaited below.
            deliveries.push((kind, self.producer.send_result(record)));
        }
        let mut first_error = None;
        let mut counts = [0u64; 3];
        for (kind, queued) in deliveries {
            let outcome = match queued {
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(rdkafka::error::KafkaError::Canceled),
                },
                Err((e, _)) => Err(e),
            };
            match outcome {
                Ok(()) => {
                    counts[match kind {
                        EntryKind::Change => 0,
                        EntryKind::DeadLetter | EntryKind::DeadLetterNoKey => 1,
                        EntryKind::AtRisk => 2,
                    }] += 1;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        drop(lane);
        if let Some(e) = first_error {
            // Queue full or broker errors: the caller backs off and retries the round.
            return Err(e.into());
        }
        outbox::trim_through(conn, outbox, &round[round.len() - 1].id).await?;
        self.telemetry
            .outbox_published
            .with_label_values(&["change"])
            .inc_by(counts[0]);
        self.telemetry
            .outbox_published
            .with_label_values(&["dead_letter"])
            .inc_by(counts[1]);
        self.telemetry
            .outbox_published
            .with_label_values(&["at_risk"])
            .inc_by(counts[2]);
        debug!(outbox, published = round.len(), "Outbox round published.");
        Ok(())
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
