//! The partition worker: owns one partition between its assignment and its revocation,
//! keeps a bounded cache of its customers, and turns each batch into one fenced commit.

use super::keys::PartitionKeys;
use super::store::{self, ApplyError, CommitBatch, Committed};
use super::{PartitionStatus, Pipeline};
use crate::domain::change::{Cause, TierChange};
use crate::domain::{time, Applied, CustomerState};
use crate::ingest::dead_letter::{self, Source};
use crate::ingest::decode::{self, Reason, Rejection};
use crate::publish::outbox::{EntryKind, OutboxEntry};
use lru::LruCache;
use rdkafka::message::{Message, OwnedMessage};
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tracing::{error, info, warn};

/// A batch of consecutive messages of one partition, in offset order.
pub type Batch = Vec<OwnedMessage>;

/// Why a partition worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Its queue was closed (revocation, shutdown) and every queued batch was applied.
    Finished,
    /// Another owner claimed the partition: let the group rebalance hand it over.
    Fenced,
    /// Redis holds another next offset than this owner committed: claim again, seek to it.
    Diverged {
        /// The next offset stored in Redis.
        stored: i64,
    },
    /// A customer state in Redis is unreadable: the partition stays stopped (operator action).
    Failed,
}

/// Applies the batches of one owned partition.
pub struct Worker {
    partition: i32,
    epoch: i64,
    keys: PartitionKeys,
    conn: ConnectionManager,
    cache: LruCache<String, CustomerState>,
    pipeline: Arc<Pipeline>,
    status: Arc<PartitionStatus>,
    published: Arc<Notify>,
    partition_label: String,
}

impl Worker {
    /// A worker for a partition we just claimed with `status.epoch`.
    pub fn new(
        partition: i32,
        keys: PartitionKeys,
        conn: ConnectionManager,
        pipeline: Arc<Pipeline>,
        status: Arc<PartitionStatus>,
        published: Arc<Notify>,
    ) -> Self {
        let cap = NonZeroUsize::new(pipeline.cache_customers).unwrap_or(NonZeroUsize::MIN);
        Self {
            partition,
            epoch: status.epoch,
            keys,
            conn,
            cache: LruCache::new(cap),
            pipeline,
            status,
            published,
            partition_label: partition.to_string(),
        }
    }

    /// Applies batches until the sender is dropped (revocation or shutdown) or the partition
    /// cannot go on. Redis errors are retried with backoff: a batch is never skipped.
    pub async fn run(mut self, mut batches: mpsc::Receiver<Batch>) -> WorkerExit {
        while let Some(batch) = batches.recv().await {
            if batch.is_empty() {
                continue;
            }
            if let Err(error) = self.apply_batch(batch).await {
                let exit = match &error {
                    ApplyError::Fenced { .. } => {
                        self.pipeline.telemetry.apply_fenced.inc();
                        error!(partition = self.partition, %error, "Partition stopped: another owner took over.");
                        WorkerExit::Fenced
                    }
                    ApplyError::Diverged { stored, .. } => {
                        error!(partition = self.partition, %error, "Redis diverged from this owner's state; reloading.");
                        WorkerExit::Diverged { stored: *stored }
                    }
                    ApplyError::CorruptState { .. } | ApplyError::Redis(_) => {
                        error!(partition = self.partition, %error, "Partition stopped: its state in Redis cannot be read.");
                        WorkerExit::Failed
                    }
                };
                return exit;
            }
        }
        info!(partition = self.partition, "Partition worker finished.");
        WorkerExit::Finished
    }

    async fn apply_batch(&mut self, messages: Batch) -> Result<(), ApplyError> {
        let started = Instant::now();
        let p = Arc::clone(&self.pipeline);
        let first_offset = messages[0].offset();
        let end_offset = messages[messages.len() - 1].offset() + 1;
        let expected = self.status.next_offset.load(Ordering::Relaxed);
        if expected >= 0 && first_offset > expected {
            p.telemetry.offset_gaps.inc();
            warn!(
                partition = self.partition,
                expected,
                first_offset,
                "Offset gap: messages were removed by retention or compaction."
            );
        }

        let now = time::now_ms();
        let decoded: Vec<Result<crate::domain::Event, Rejection>> = messages
            .iter()
            .map(|m| {
                decode::decode(
                    m.key(),
                    m.payload(),
                    m.timestamp().to_millis().unwrap_or(now),
                    &p.limits,
                )
            })
            .collect();

        // Customer states touched by this batch: from the cache, or loaded with one MGET.
        let mut states: HashMap<&str, (CustomerState, bool)> = HashMap::new();
        let mut missing: Vec<&str> = Vec::new();
        for event in decoded.iter().flatten() {
            let id = event.customer_id.as_str();
            if !states.contains_key(id) {
                match self.cache.pop(id) {
                    Some(s) => {
                        states.insert(id, (s, false));
                    }
                    None => {
                        states.insert(id, (CustomerState::default(), false));
                        missing.push(id);
                    }
                }
            }
        }
        if !missing.is_empty() {
            let keys: Vec<String> = missing.iter().map(|id| self.keys.customer(id)).collect();
            let partition = self.partition;
            let mut delay = Duration::from_millis(50);
            let loaded = loop {
                match store::load(&mut self.conn, partition, &keys).await {
                    Err(error) if error.is_retriable() => self.pause(&mut delay, &error).await,
                    other => break other?,
                }
            };
            for (id, state) in missing.iter().zip(loaded) {
                if let Some(s) = state {
                    states.insert(id, (s, false));
                }
            }
        }

        let mut batch = CommitBatch {
            expected_offset: expected,
            first_offset,
            end_offset,
            ..CommitBatch::default()
        };
        let (mut applied, mut duplicates) = (0u64, 0u64);
        let mut rejected: Vec<Reason> = Vec::new();
        let mut changes: Vec<(String, String, &'static str)> = Vec::new();
        for (message, decoded) in messages.iter().zip(&decoded) {
            let source = Source {
                topic: &p.input_topic,
                partition: self.partition,
                offset: message.offset(),
                timestamp_ms: message.timestamp().to_millis(),
            };
            let rejection = match decoded {
                Err(rejection) => Some(rejection.clone()),
                Ok(event) => {
                    let (state, dirty) = states
                        .get_mut(event.customer_id.as_str())
                        .expect("loaded above");
                    match state.apply(event, &p.rules, p.dedup) {
                        Applied::Counted(transition) => {
                            *dirty = true;
                            applied += 1;
                            if let Some(t) = transition {
                                let cause = Cause {
                                    event_id: event.event_id.clone(),
                                    topic: p.input_topic.clone(),
                                    partition: self.partition,
                                    offset: message.offset(),
                                };
                                let change = TierChange::new(&event.customer_id, state, &t, &p.rules, &p.money, Some(cause));
                                changes.push((
                                    change.previous_tier.clone().unwrap_or_else(|| "none".into()),
                                    change.tier.clone(),
                                    change.reason.as_str(),
                                ));
                                batch.outbox.push(OutboxEntry {
                                    kind: EntryKind::Change,
                                    key: event.customer_id.as_bytes().to_vec(),
                                    value: serde_json::to_vec(&change).expect("change events serialize"),
                                    headers: Vec::new(),
                                });
                            }
                            None
                        }
                        Applied::Duplicate => {
                            duplicates += 1;
                            None
                        }
                        Applied::TooLate { floor_ms } => Some(Rejection {
                            reason: Reason::TooLate,
                            detail: format!(
                                "field `occurred_at`: {} is at or before {}, the customer's dedup horizon",
                                time::format_ms(event.occurred_at_ms),
                                time::format_ms(floor_ms)
                            ),
                        }),
                    }
                }
            };
            if let Some(rejection) = rejection {
                batch.outbox.push(dead_letter::entry(
                    source,
                    message.key(),
                    message.payload(),
                    &rejection,
                    p.dead_letter_max_bytes,
                ));
                rejected.push(rejection.reason);
            }
        }
        batch.states = states
            .iter()
            .filter(|(_, (_, dirty))| *dirty)
            .map(|(id, (s, _))| {
                (
                    self.keys.customer(id),
                    serde_json::to_vec(s).expect("state serializes"),
                )
            })
            .collect();

        let (partition, epoch) = (self.partition, self.epoch);
        let mut delay = Duration::from_millis(50);
        let committed = loop {
            match store::commit(&mut self.conn, &self.keys, partition, epoch, &batch).await {
                // Retrying is safe: the script skips a batch that an earlier, lost call applied.
                Err(error) if error.is_retriable() => self.pause(&mut delay, &error).await,
                other => break other?,
            }
        };

        // Committed: the states are now the durable truth; keep them cached.
        for (id, (s, _)) in states {
            self.cache.put(id.to_owned(), s);
        }
        self.status.next_offset.store(end_offset, Ordering::Relaxed);
        let t = &p.telemetry;
        let label = [self.partition_label.as_str()];
        t.events_consumed
            .with_label_values(&label)
            .inc_by(messages.len() as u64);
        if let Committed::Applied { outbox_len } = committed {
            t.events_applied.with_label_values(&label).inc_by(applied);
            t.events_deduplicated
                .with_label_values(&label)
                .inc_by(duplicates);
            for reason in rejected {
                t.events_dead_lettered
                    .with_label_values(&[reason.as_str()])
                    .inc();
            }
            for (from, to, reason) in &changes {
                t.tier_changes
                    .with_label_values(&[from.as_str(), to.as_str(), reason])
                    .inc();
            }
            t.outbox_depth
                .with_label_values(&label)
                .set(i64::try_from(outbox_len).unwrap_or(i64::MAX));
        }
        if !batch.outbox.is_empty() {
            self.published.notify_one();
        }
        t.batch_events.observe(messages.len() as f64);
        t.batch_apply_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Waits before retrying a failed Redis call (exponential backoff up to 2 s).
    async fn pause(&self, delay: &mut Duration, error: &ApplyError) {
        self.pipeline.telemetry.redis_errors.inc();
        warn!(partition = self.partition, %error, "Redis call failed; retrying.");
        tokio::time::sleep(*delay).await;
        *delay = (*delay * 2).min(Duration::from_secs(2));
    }
}
