//! The partition worker: owns one partition between its assignment and its revocation,
//! keeps a bounded cache of its customers, turns each batch into one fenced commit, and fires
//! the partition's due timers through the same commit.
//!
//! Engine time (`clock.mode`): in `wall` mode it is the wall clock and a tick fires due
//! timers; in `event` mode it is the partition's latest event time minus the allowed lateness,
//! and timers due before an event's engine time fire before the event is applied — so the
//! sequence of evaluations depends only on the input, never on batching or restarts.

use super::{PartitionStatus, Pipeline};
use crate::config::ClockMode;
use crate::domain::change::{AtRiskNotice, Cause, TierChange};
use crate::domain::state::{rules_hash, Outcome, Trigger};
use crate::domain::{time, Applied, CustomerState};
use crate::ingest::dead_letter::{self, Source};
use crate::ingest::decode::{self, Reason, Rejection};
use crate::rules::rank::Cutoffs;
use crate::store::keys::PartitionKeys;
use crate::store::outbox::{EntryKind, OutboxEntry};
use crate::store::partition::{self as store, ApplyError, CommitBatch, Committed};
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

/// How often a rules sweep takes its next page (`rules.sweep_per_second` / 10 customers).
const SWEEP_TICK: Duration = Duration::from_millis(100);

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

/// A customer loaded for the current batch; `dirty` if it must be written.
struct Loaded {
    state: CustomerState,
    dirty: bool,
    /// The due time the partition's timer index holds for the customer.
    indexed: Option<i64>,
    /// The values the partition's rank sorted sets hold for the customer.
    ranked: Vec<Option<i128>>,
    /// The tier counted for the customer in the partition's tier counts.
    counted: Option<String>,
}

impl Loaded {
    fn new(state: CustomerState) -> Self {
        let indexed = state.timer.map(|(due, _)| due);
        let ranked = state.rk.clone();
        let counted = state.tier.clone();
        Self {
            state,
            dirty: false,
            indexed,
            ranked,
            counted,
        }
    }
}

/// What one commit will write, accumulated while applying.
#[derive(Default)]
struct Draft {
    first_offset: i64,
    end_offset: i64,
    messages: u64,
    outbox: Vec<OutboxEntry>,
    applied: u64,
    duplicates: u64,
    rejected: Vec<Reason>,
    changes: Vec<(String, String, &'static str)>,
    notices: u64,
    swept_rules: Option<u32>,
    applied_cutoffs: Option<String>,
    /// Timer index entries without a stored customer, to remove.
    orphans: Vec<String>,
    /// Changes under rank-based rules awaiting their exact rank positions: (outbox index,
    /// ranked values, change).
    ranked: Vec<(usize, Vec<Option<i128>>, TierChange)>,
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
    /// Commits stored for this partition, as far as this owner knows.
    commits: i64,
    /// The partition's event-time clock (`event` mode).
    clock: Option<i64>,
    /// A lower bound of the earliest timer's due time (`None`: no timers).
    min_due: Option<i64>,
    /// While a rules-version sweep is under way: its SCAN cursor.
    sweep: Option<u64>,
    /// The rank cut-offs evaluations use.
    cutoffs: Arc<Cutoffs>,
    /// The partition's rank sorted sets, in the rules' rank order.
    rank_keys: Vec<String>,
    /// Partition 0's owner: when cut-offs were last computed, and the populations then.
    last_compute: Option<(Instant, Vec<u64>)>,
}

impl Worker {
    /// A worker for a partition we just claimed.
    pub fn new(
        partition: i32,
        keys: PartitionKeys,
        conn: ConnectionManager,
        pipeline: Arc<Pipeline>,
        status: Arc<PartitionStatus>,
        published: Arc<Notify>,
        claim: &store::Claim,
    ) -> Self {
        let cap = NonZeroUsize::new(pipeline.cache_customers).unwrap_or(NonZeroUsize::MIN);
        let sweep = (claim.swept_rules != Some(rules_hash(pipeline.rules.version()))).then_some(0);
        let rank_keys = pipeline
            .rules
            .ranks()
            .iter()
            .map(|r| keys.rank(&r.name))
            .collect();
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
            commits: claim.commits,
            clock: claim.clock,
            min_due: Some(i64::MIN),
            sweep,
            cutoffs: Arc::new(claim.cutoffs.clone().unwrap_or_default()),
            rank_keys,
            last_compute: None,
        }
    }

    /// Applies batches until the sender is dropped (revocation or shutdown) or the partition
    /// cannot go on; in `wall` mode fires due timers every `clock.tick_ms`. Redis errors are
    /// retried with backoff: a batch is never skipped.
    pub async fn run(mut self, mut batches: mpsc::Receiver<Batch>) -> WorkerExit {
        let p = Arc::clone(&self.pipeline);
        // Pins can expire under any rules, so wall mode always ticks (a due check is a
        // comparison with the earliest known timer).
        let ticking = p.clock.mode == ClockMode::Wall;
        let mut tick = tokio::time::interval(Duration::from_millis(p.clock.tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep_tick = tokio::time::interval(SWEEP_TICK);
        sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ranked = p.rules.uses_ranks();
        let mut rank_tick = tokio::time::interval(Duration::from_millis(p.ranks.check_interval_ms));
        rank_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if self.sweep.is_none() {
            p.telemetry.rules_sweep_done.inc();
        }
        loop {
            let result = tokio::select! {
                batch = batches.recv() => match batch {
                    Some(batch) if batch.is_empty() => continue,
                    Some(batch) => self.apply_batch(batch).await,
                    None => break,
                },
                _ = tick.tick(), if ticking => {
                    let mut work = HashMap::new();
                    let r = self.fire_due(time::now_ms(), &mut work).await;
                    self.keep(work);
                    r
                }
                // Under rank-based rules the sweep waits for cut-offs of the running rules, so
                // it does not place everyone with no cut-offs first.
                _ = sweep_tick.tick(), if self.sweep.is_some()
                    && (!ranked || self.cutoffs.rules == rules_hash(p.rules.version())) => {
                    self.sweep_step().await
                }
                _ = rank_tick.tick(), if ranked => self.rank_step().await,
            };
            if let Err(error) = result {
                return self.exit(&error);
            }
        }
        info!(partition = self.partition, "Partition worker finished.");
        if self.sweep.is_none() {
            p.telemetry.rules_sweep_done.dec();
        }
        WorkerExit::Finished
    }

    /// Rank cut-offs: the owner of partition 0 recomputes them when due and publishes them;
    /// every owner applies a newer published version to its customers between the old and
    /// the new cut-offs.
    async fn rank_step(&mut self) -> Result<(), ApplyError> {
        let p = Arc::clone(&self.pipeline);
        let partitions = p.partitions.load(Ordering::Relaxed);
        let zero = p.keyspace.partition(0);
        if self.partition == 0 && partitions > 0 {
            let all: Vec<_> = (0..partitions).map(|q| p.keyspace.partition(q)).collect();
            let population =
                match crate::store::cutoffs::populations(&mut self.conn, &all, &p.rules).await {
                    Ok(v) => v,
                    Err(e) => {
                        self.pause(&mut Duration::from_millis(50), &ApplyError::Redis(e))
                            .await;
                        return Ok(());
                    }
                };
            let due = match &self.last_compute {
                None => true,
                Some((at, before)) => {
                    at.elapsed() >= Duration::from_millis(p.ranks.recompute_interval_ms)
                        || population.iter().zip(before).any(|(&n, &b)| {
                            n.abs_diff(b) as f64 > p.ranks.recompute_population_change * b as f64
                        })
                }
            };
            if due {
                let started = Instant::now();
                match crate::store::cutoffs::compute(&mut self.conn, &all, &p.rules).await {
                    Ok(new) => {
                        self.last_compute = Some((Instant::now(), population));
                        let current = store::load_cutoffs(&mut self.conn, &zero)
                            .await
                            .ok()
                            .flatten();
                        // A new population is published too (even with the same values): the
                        // published cut-offs always say over how many customers they hold.
                        let changed = current.as_ref().is_none_or(|c| {
                            c.values != new.values
                                || c.rules != new.rules
                                || c.population != new.population
                        });
                        if changed {
                            match store::publish_cutoffs(&mut self.conn, &zero, self.epoch, &new)
                                .await
                            {
                                Ok(Some(version)) => info!(
                                    version,
                                    seconds = started.elapsed().as_secs_f64(),
                                    "Rank cut-offs published."
                                ),
                                Ok(None) => warn!(
                                    "Rank cut-offs not published: partition 0 has another owner now."
                                ),
                                Err(e) => {
                                    // Retried at the next check (the computation is repeated).
                                    self.last_compute = None;
                                    self.pause(&mut Duration::from_millis(50), &ApplyError::Redis(e))
                                        .await;
                                }
                            }
                        }
                        p.telemetry
                            .rank_recompute_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                    Err(e) => {
                        self.pause(&mut Duration::from_millis(50), &ApplyError::Redis(e))
                            .await
                    }
                }
            }
        }
        let global = match store::load_cutoffs(&mut self.conn, &zero).await {
            Ok(g) => g,
            Err(e) => {
                self.pause(&mut Duration::from_millis(50), &ApplyError::Redis(e))
                    .await;
                return Ok(());
            }
        };
        if let Some(new) = global {
            if new.version > self.cutoffs.version && new.rules == rules_hash(p.rules.version()) {
                self.apply_cutoffs(new).await?;
            }
        }
        Ok(())
    }

    /// Moves the partition to new cut-offs: from now on evaluations use them, and every
    /// customer whose ranked value lies between an old and a new cut-off is re-evaluated
    /// (reason `rank_shift`), a page per commit. The last commit records the cut-offs as
    /// applied; a crash before that re-does the pass, which is idempotent (a customer already
    /// moved does not move again), so no change is lost or doubled.
    async fn apply_cutoffs(&mut self, new: Cutoffs) -> Result<(), ApplyError> {
        let p = Arc::clone(&self.pipeline);
        let old = std::mem::replace(&mut self.cutoffs, Arc::new(new.clone()));
        let old_valid = old.rules == new.rules && old.values.len() == new.values.len();
        let mut ranges: Vec<(usize, i128, Option<i128>)> = Vec::new();
        for (i, point) in p.rules.cut_points().iter().enumerate() {
            let before = if old_valid { old.value(i) } else { None };
            let after = new.value(i);
            let range = match (before, after) {
                (Some(a), Some(b)) if a == b => None,
                (Some(a), Some(b)) => Some((a.min(b), Some(a.max(b)))),
                (None, Some(b)) => Some((b, None)),
                (Some(a), None) => Some((a, None)),
                (None, None) => None,
            };
            if let Some((lo, hi)) = range {
                ranges.push((point.rank, lo, hi));
            }
        }
        let page = p.ranks.reevaluate_page;
        let mut moved = 0u64;
        let mut evaluated = 0u64;
        let mut seen = std::collections::HashSet::new();
        // First list every customer in the moved ranges (nothing is committed while listing,
        // so offset paging over the sorted sets is stable), then re-evaluate them a page per
        // commit: a re-evaluation can change a customer's ranked value and would shift pages.
        let mut crossing: Vec<String> = Vec::new();
        for (rank, lo, hi) in ranges {
            let key = self.rank_keys[rank].clone();
            let mut offset = 0usize;
            loop {
                let mut delay = Duration::from_millis(50);
                let ids: Vec<String> = loop {
                    let r = redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(lo.to_string())
                        .arg(hi.map_or_else(|| "+inf".to_owned(), |h| h.to_string()))
                        .arg("BYSCORE")
                        .arg("LIMIT")
                        .arg(offset)
                        .arg(page)
                        .query_async(&mut self.conn)
                        .await;
                    match r {
                        Ok(v) => break v,
                        Err(e) => self.pause(&mut delay, &ApplyError::Redis(e)).await,
                    }
                };
                if ids.is_empty() {
                    break;
                }
                offset += ids.len();
                crossing.extend(ids.into_iter().filter(|id| seen.insert(id.clone())));
            }
        }
        for fresh in crossing.chunks(page) {
            let mut work = HashMap::new();
            self.load(fresh.iter().cloned(), &mut work).await?;
            let mut draft = self.new_draft();
            for id in fresh {
                let loaded = work.get_mut(id.as_str()).expect("loaded above");
                let outcome = self.reevaluate(&mut draft, id, loaded, Trigger::RankShift);
                evaluated += 1;
                moved += u64::from(outcome.transition.is_some());
            }
            self.commit(&mut draft, &mut work).await?;
            self.keep(work);
            p.telemetry.rank_reevaluated.inc_by(fresh.len() as u64);
        }
        // Record the cut-offs as applied (with the last page or on their own).
        let mut draft = self.new_draft();
        draft.applied_cutoffs = Some(serde_json::to_string(&new).expect("cut-offs serialize"));
        self.commit(&mut draft, &mut HashMap::new()).await?;
        info!(
            partition = self.partition,
            version = new.version,
            evaluated,
            moved,
            "Rank cut-offs applied."
        );
        Ok(())
    }

    /// Re-evaluates the next page of the partition's customers under the running rules
    /// version (those last evaluated under another version), in one commit. Restartable:
    /// customers already evaluated under this version are skipped, so a crash mid-sweep
    /// neither loses nor repeats a change; the completed sweep is recorded in the partition's
    /// meta so a restart does not scan again.
    async fn sweep_step(&mut self) -> Result<(), ApplyError> {
        let Some(cursor) = self.sweep else {
            return Ok(());
        };
        let p = Arc::clone(&self.pipeline);
        let page = (u64::from(p.sweep_per_second) * SWEEP_TICK.as_millis() as u64 / 1000).max(1);
        let pattern = self.keys.customer_pattern();
        let mut delay = Duration::from_millis(50);
        let (next, keys): (u64, Vec<String>) = loop {
            let r = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(page)
                .query_async(&mut self.conn)
                .await;
            match r {
                Ok(v) => break v,
                Err(e) => self.pause(&mut delay, &ApplyError::Redis(e)).await,
            }
        };
        let ids: Vec<String> = keys
            .iter()
            .filter_map(|k| self.keys.customer_id(k).map(str::to_owned))
            .collect();
        let mut work = HashMap::new();
        self.load(ids.iter().cloned(), &mut work).await?;
        let hash = rules_hash(p.rules.version());
        let mut draft = self.new_draft();
        let mut swept = 0u64;
        for id in &ids {
            let loaded = work.get_mut(id.as_str()).expect("loaded above");
            if loaded.state.rv == hash {
                continue;
            }
            self.reevaluate(&mut draft, id, loaded, Trigger::RulesChanged);
            swept += 1;
        }
        let done = next == 0;
        if swept > 0 || done {
            draft.swept_rules = done.then_some(hash);
            self.commit(&mut draft, &mut work).await?;
        }
        self.keep(work);
        p.telemetry.rules_sweep_customers.inc_by(swept);
        self.sweep = (!done).then_some(next);
        if done {
            p.telemetry.rules_sweep_done.inc();
            info!(
                partition = self.partition,
                version = p.rules.version(),
                "Rules sweep complete."
            );
        }
        Ok(())
    }

    fn exit(&self, error: &ApplyError) -> WorkerExit {
        match error {
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
        }
    }

    /// Keeps a batch's customers cached (they are the committed truth).
    fn keep(&mut self, work: HashMap<String, Loaded>) {
        for (id, loaded) in work {
            self.cache.put(id, loaded.state);
        }
    }

    /// Makes sure `ids` are in `work`: from the cache, or loaded with one MGET.
    async fn load(
        &mut self,
        ids: impl IntoIterator<Item = String>,
        work: &mut HashMap<String, Loaded>,
    ) -> Result<(), ApplyError> {
        let mut missing: Vec<String> = Vec::new();
        for id in ids {
            if work.contains_key(&id) {
                continue;
            }
            if let Some(state) = self.cache.pop(&id) {
                work.insert(id, Loaded::new(state));
            } else {
                work.insert(id.clone(), Loaded::new(CustomerState::default()));
                missing.push(id);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = missing.iter().map(|id| self.keys.customer(id)).collect();
        let partition = self.partition;
        let mut delay = Duration::from_millis(50);
        let loaded = loop {
            match store::load(&mut self.conn, partition, &keys).await {
                Err(error) if error.is_retriable() => self.pause(&mut delay, &error).await,
                other => break other?,
            }
        };
        for (id, state) in missing.into_iter().zip(loaded) {
            if let Some(state) = state {
                work.insert(id, Loaded::new(state));
            }
        }
        Ok(())
    }

    fn next_offset(&self) -> i64 {
        self.status.next_offset.load(Ordering::Relaxed)
    }

    fn new_draft(&self) -> Draft {
        let next = self.next_offset();
        Draft {
            first_offset: next,
            end_offset: next,
            ..Draft::default()
        }
    }

    /// Re-evaluates a stored customer for an operator-level trigger (rules sweep, new rank
    /// cut-offs) at engine time now: the wall clock, or the partition's event-time clock
    /// (the customer's own engine time never runs backwards, see `CustomerState::evaluate`).
    fn reevaluate(
        &self,
        draft: &mut Draft,
        id: &str,
        loaded: &mut Loaded,
        trigger: Trigger,
    ) -> Outcome {
        let p = &self.pipeline;
        let now = match p.clock.mode {
            ClockMode::Wall => time::now_ms(),
            ClockMode::Event => self.clock.unwrap_or(i64::MIN),
        };
        let outcome = loaded.state.evaluate(&p.rules, now, trigger, &self.cutoffs);
        loaded.dirty = true;
        self.record(draft, id, &loaded.state, &outcome, None);
        outcome
    }

    /// Adds an evaluation's change and notice to the draft.
    fn record(
        &self,
        draft: &mut Draft,
        customer_id: &str,
        state: &CustomerState,
        outcome: &Outcome,
        cause: Option<Cause>,
    ) {
        let p = &self.pipeline;
        if let Some(t) = &outcome.transition {
            let change = TierChange::new(customer_id, state, t, &p.rules, &p.money, cause);
            draft.changes.push((
                change
                    .previous_tier
                    .clone()
                    .unwrap_or_else(|| "none".into()),
                change.tier.clone(),
                change.reason.as_str(),
            ));
            let value = if p.rules.uses_ranks() {
                // Serialized at commit, once the exact rank positions are known.
                draft
                    .ranked
                    .push((draft.outbox.len(), t.eval.ranks.clone(), change.clone()));
                Vec::new()
            } else {
                serde_json::to_vec(&change).expect("change events serialize")
            };
            draft.outbox.push(OutboxEntry {
                kind: EntryKind::Change,
                key: customer_id.as_bytes().to_vec(),
                value,
                headers: Vec::new(),
            });
        }
        if let Some(n) = &outcome.notice {
            let notice = AtRiskNotice::new(customer_id, n, &p.rules);
            draft.notices += 1;
            draft.outbox.push(OutboxEntry {
                kind: EntryKind::AtRisk,
                key: customer_id.as_bytes().to_vec(),
                value: serde_json::to_vec(&notice).expect("notices serialize"),
                headers: Vec::new(),
            });
        }
    }

    async fn apply_batch(&mut self, messages: Batch) -> Result<(), ApplyError> {
        let started = Instant::now();
        let p = Arc::clone(&self.pipeline);
        let first_offset = messages[0].offset();
        let expected = self.next_offset();
        if expected >= 0 && first_offset > expected {
            p.telemetry.offset_gaps.inc();
            warn!(
                partition = self.partition,
                expected,
                first_offset,
                "Offset gap: messages were removed by retention or compaction."
            );
        }

        let wall_now = time::now_ms();
        let decoded: Vec<Result<crate::domain::Event, Rejection>> = messages
            .iter()
            .map(|m| {
                decode::decode(
                    m.key(),
                    m.payload(),
                    m.timestamp().to_millis().unwrap_or(wall_now),
                    &p.limits,
                )
            })
            .collect();

        let mut work: HashMap<String, Loaded> = HashMap::new();
        let ids: Vec<String> = decoded
            .iter()
            .flatten()
            .map(|e| e.customer_id.clone())
            .collect();
        self.load(ids, &mut work).await?;

        let event_mode = p.clock.mode == ClockMode::Event;
        let cutoffs = Arc::clone(&self.cutoffs);
        let lateness = i64::try_from(p.clock.lateness_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        let mut draft = Draft {
            first_offset,
            end_offset: first_offset,
            ..Draft::default()
        };
        for (message, decoded) in messages.iter().zip(&decoded) {
            if let (true, Ok(event)) = (event_mode, decoded) {
                let t = event.occurred_at_ms.saturating_sub(lateness);
                if self.clock.is_none_or(|c| t > c) {
                    if self.min_due.is_some_and(|d| d <= t) {
                        // Timers due before this event's engine time fire first.
                        if draft.messages > 0 {
                            self.commit(&mut draft, &mut work).await?;
                            draft = Draft {
                                first_offset: message.offset(),
                                end_offset: message.offset(),
                                ..Draft::default()
                            };
                        }
                        self.fire_due(t, &mut work).await?;
                    }
                    self.clock = Some(t);
                }
            }
            // Events are evaluated at their own event time; in `event` mode never before the
            // partition's clock.
            let now = if event_mode {
                self.clock.unwrap_or(i64::MIN)
            } else {
                i64::MIN
            };
            draft.messages += 1;
            draft.end_offset = message.offset() + 1;
            let source = Source {
                topic: &p.input_topic,
                partition: self.partition,
                offset: message.offset(),
                timestamp_ms: message.timestamp().to_millis(),
            };
            let rejection = match decoded {
                Err(rejection) => Some(rejection.clone()),
                Ok(event) => {
                    let loaded = work
                        .get_mut(event.customer_id.as_str())
                        .expect("loaded above");
                    match loaded.state.apply(event, &p.rules, p.dedup, now, &cutoffs) {
                        Applied::Counted(outcome) => {
                            loaded.dirty = true;
                            draft.applied += 1;
                            if let Some((due, _)) = loaded.state.timer {
                                self.min_due = Some(self.min_due.map_or(due, |d| d.min(due)));
                            }
                            if outcome.transition.is_some() || outcome.notice.is_some() {
                                let cause = Cause {
                                    event_id: event.event_id.clone(),
                                    topic: p.input_topic.clone(),
                                    partition: self.partition,
                                    offset: message.offset(),
                                };
                                self.record(
                                    &mut draft,
                                    &event.customer_id,
                                    &loaded.state,
                                    &outcome,
                                    Some(cause),
                                );
                            }
                            None
                        }
                        Applied::Duplicate => {
                            draft.duplicates += 1;
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
                draft.outbox.push(dead_letter::entry(
                    source,
                    message.key(),
                    message.payload(),
                    &rejection,
                    p.dead_letter_max_bytes,
                ));
                draft.rejected.push(rejection.reason);
            }
        }
        self.commit(&mut draft, &mut work).await?;
        self.keep(work);
        let t = &p.telemetry;
        t.events_consumed
            .with_label_values(&[self.partition_label.as_str()])
            .inc_by(messages.len() as u64);
        t.batch_events.observe(messages.len() as f64);
        t.batch_apply_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Fires every timer due at or before `upto`, in chunks of `clock.timer_batch` per
    /// commit. Each customer is evaluated at its own due time, so the result does not depend
    /// on when the timer is fired.
    async fn fire_due(
        &mut self,
        upto: i64,
        work: &mut HashMap<String, Loaded>,
    ) -> Result<(), ApplyError> {
        if self.min_due.is_none_or(|d| d > upto) {
            return Ok(());
        }
        let p = Arc::clone(&self.pipeline);
        loop {
            let mut delay = Duration::from_millis(50);
            let due: Vec<(String, i64)> = loop {
                let r: Result<Vec<(String, i64)>, redis::RedisError> = redis::cmd("ZRANGE")
                    .arg(&self.keys.timers)
                    .arg("-inf")
                    .arg(upto)
                    .arg("BYSCORE")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(p.clock.timer_batch)
                    .arg("WITHSCORES")
                    .query_async(&mut self.conn)
                    .await;
                match r {
                    Ok(v) => break v,
                    Err(e) => self.pause(&mut delay, &ApplyError::Redis(e)).await,
                }
            };
            if due.is_empty() {
                break;
            }
            self.load(due.iter().map(|(id, _)| id.clone()), work)
                .await?;
            let mut draft = self.new_draft();
            for (id, at) in &due {
                let loaded = work.get_mut(id.as_str()).expect("loaded above");
                loaded.dirty = true;
                match loaded.state.timer {
                    Some((d, cause)) if d == *at => {
                        let outcome =
                            loaded
                                .state
                                .evaluate(&p.rules, d, Trigger::Time(cause), &self.cutoffs);
                        p.telemetry
                            .timers_fired
                            .with_label_values(&[cause_label(cause)])
                            .inc();
                        self.record(&mut draft, id, &loaded.state, &outcome, None);
                    }
                    // The index disagrees with the state (manual edits, a deleted state):
                    // re-index the state's real timer, or drop the entry.
                    other => {
                        warn!(partition = self.partition, customer = %id, indexed = at, state = ?other, "Timer index out of step with the customer state; re-indexed.");
                        loaded.indexed = Some(*at);
                        if loaded.state == CustomerState::default() {
                            // No stored customer: remove the entry, write no state.
                            loaded.dirty = false;
                            draft.orphans.push(id.clone());
                        }
                    }
                }
            }
            self.commit(&mut draft, work).await?;
        }
        self.min_due = self.earliest_timer().await?;
        Ok(())
    }

    async fn earliest_timer(&mut self) -> Result<Option<i64>, ApplyError> {
        let mut delay = Duration::from_millis(50);
        loop {
            let r: Result<Vec<(String, i64)>, redis::RedisError> = redis::cmd("ZRANGE")
                .arg(&self.keys.timers)
                .arg(0)
                .arg(0)
                .arg("WITHSCORES")
                .query_async(&mut self.conn)
                .await;
            match r {
                Ok(v) => return Ok(v.first().map(|(_, d)| *d)),
                Err(e) => self.pause(&mut delay, &ApplyError::Redis(e)).await,
            }
        }
    }

    /// Commits a draft: dirty states, their timers, the outbox entries and the new position,
    /// fenced and atomic. Retried on Redis errors (the script recognises its own lost reply).
    async fn commit(
        &mut self,
        draft: &mut Draft,
        work: &mut HashMap<String, Loaded>,
    ) -> Result<(), ApplyError> {
        let p = Arc::clone(&self.pipeline);
        if self.min_due == Some(i64::MIN) {
            // First commit of this owner: learn where the timers stand.
            self.min_due = self.earliest_timer().await?;
            for loaded in work.values().filter(|l| l.dirty) {
                if let Some((due, _)) = loaded.state.timer {
                    self.min_due = Some(self.min_due.map_or(due, |d| d.min(due)));
                }
            }
        }
        if !draft.ranked.is_empty() {
            self.rank_positions(draft).await?;
        }
        let mut batch = CommitBatch {
            expected_offset: self.next_offset(),
            first_offset: draft.first_offset,
            end_offset: draft.end_offset,
            expected_commits: self.commits,
            clock: self.clock.filter(|_| p.clock.mode == ClockMode::Event),
            outbox: std::mem::take(&mut draft.outbox),
            swept_rules: draft.swept_rules,
            applied_cutoffs: draft.applied_cutoffs.take(),
            ..CommitBatch::default()
        };
        for id in draft.orphans.drain(..) {
            batch.zrem.push((0, id));
        }
        for (id, loaded) in work.iter().filter(|(_, l)| l.dirty) {
            // Every timer set by any evaluation (events, timers, sweeps, re-rankings) lowers
            // the bound of the earliest due time, so none can be overlooked.
            if let Some((due, _)) = loaded.state.timer {
                self.min_due = Some(self.min_due.map_or(due, |d| d.min(due)));
            }
            batch.states.push((
                self.keys.customer(id),
                serde_json::to_vec(&loaded.state).expect("state serializes"),
            ));
            match (loaded.state.timer, loaded.indexed) {
                (Some((due, _)), Some(indexed)) if due == indexed => {}
                (Some((due, _)), _) => batch.zadd.push((0, i128::from(due), id.clone())),
                (None, Some(_)) => batch.zrem.push((0, id.clone())),
                (None, None) => {}
            }
            for r in 0..self.rank_keys.len() {
                let now = loaded.state.rk.get(r).copied().flatten();
                let indexed = loaded.ranked.get(r).copied().flatten();
                match (now, indexed) {
                    (Some(v), Some(i)) if v == i => {}
                    (Some(v), _) => batch.zadd.push((1 + r, v, id.clone())),
                    (None, Some(_)) => batch.zrem.push((1 + r, id.clone())),
                    (None, None) => {}
                }
            }
            if loaded.state.tier != loaded.counted {
                if let Some(old) = &loaded.counted {
                    batch.tier_deltas.push((old.clone(), -1));
                }
                if let Some(new) = &loaded.state.tier {
                    batch.tier_deltas.push((new.clone(), 1));
                }
            }
        }
        let (partition, epoch) = (self.partition, self.epoch);
        let mut delay = Duration::from_millis(50);
        let committed = loop {
            match store::commit(
                &mut self.conn,
                &self.keys,
                &self.rank_keys,
                partition,
                epoch,
                &batch,
            )
            .await
            {
                // Retrying is safe: the script skips a commit that an earlier, lost call applied.
                Err(error) if error.is_retriable() => self.pause(&mut delay, &error).await,
                other => break other?,
            }
        };
        self.commits += 1;
        for loaded in work.values_mut() {
            if loaded.dirty {
                loaded.indexed = loaded.state.timer.map(|(due, _)| due);
                loaded.ranked.clone_from(&loaded.state.rk);
                loaded.counted.clone_from(&loaded.state.tier);
                loaded.dirty = false;
            }
        }
        self.status
            .next_offset
            .store(draft.end_offset, Ordering::Relaxed);
        let t = &p.telemetry;
        let label = [self.partition_label.as_str()];
        if let Committed::Applied { outbox_len } = committed {
            t.events_applied
                .with_label_values(&label)
                .inc_by(draft.applied);
            t.events_deduplicated
                .with_label_values(&label)
                .inc_by(draft.duplicates);
            for reason in &draft.rejected {
                t.events_dead_lettered
                    .with_label_values(&[reason.as_str()])
                    .inc();
            }
            for (from, to, reason) in &draft.changes {
                t.tier_changes
                    .with_label_values(&[from.as_str(), to.as_str(), reason])
                    .inc();
            }
            t.at_risk_notices.inc_by(draft.notices);
            t.outbox_depth
                .with_label_values(&label)
                .set(i64::try_from(outbox_len).unwrap_or(i64::MAX));
        }
        if !batch.outbox.is_empty() {
            self.published.notify_one();
        }
        Ok(())
    }

    /// Adds each pending rank-based change's exact position in every rank (customers with a
    /// strictly higher value, summed over the partitions, plus one) and serializes it.
    async fn rank_positions(&mut self, draft: &mut Draft) -> Result<(), ApplyError> {
        let p = Arc::clone(&self.pipeline);
        let partitions = p.partitions.load(Ordering::Relaxed).max(1);
        let ranks = p.rules.ranks();
        let mut pipe = redis::pipe();
        for r in ranks {
            for q in 0..partitions {
                pipe.zcard(p.keyspace.partition(q).rank(&r.name));
            }
        }
        for (_, values, _) in &draft.ranked {
            for (r, rank) in ranks.iter().enumerate() {
                if let Some(Some(v)) = values.get(r) {
                    for q in 0..partitions {
                        pipe.zcount(
                            p.keyspace.partition(q).rank(&rank.name),
                            format!("({v}"),
                            "+inf",
                        );
                    }
                }
            }
        }
        let mut delay = Duration::from_millis(50);
        let counts: Vec<u64> = loop {
            match pipe.query_async(&mut self.conn).await {
                Ok(v) => break v,
                Err(e) => self.pause(&mut delay, &ApplyError::Redis(e)).await,
            }
        };
        let parts = usize::try_from(partitions).unwrap_or(1);
        let mut next = counts.chunks(parts).map(|c| c.iter().sum::<u64>());
        let population: Vec<u64> = (0..ranks.len()).map(|_| next.next().unwrap_or(0)).collect();
        for (index, values, mut change) in std::mem::take(&mut draft.ranked) {
            for (r, rank) in ranks.iter().enumerate() {
                if let Some(Some(_)) = values.get(r) {
                    let above = next.next().unwrap_or(0);
                    // A new customer's own value is not committed yet: count them in.
                    let n =
                        (population[r] + u64::from(change.previous_tier.is_none())).max(above + 1);
                    if let Some(entry) = change.ranks.get_mut(&rank.name) {
                        entry["position"] = (above + 1).into();
                        entry["population"] = n.into();
                        entry["top_percent"] =
                            (((above + 1) as f64 * 10_000.0 / n as f64).round() / 100.0).into();
                    }
                }
            }
            draft.outbox[index].value =
                serde_json::to_vec(&change).expect("change events serialize");
        }
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

fn cause_label(cause: crate::rules::TimeCause) -> &'static str {
    use crate::rules::TimeCause::*;
    match cause {
        Recency => "recency",
        WindowExpiry => "window_expiry",
        ValidityExpired => "validity_expired",
        GraceEnded => "grace_ended",
        MinStayEnded => "min_stay_ended",
        ManualExpired => "manual_expired",
        AtRisk => "at_risk",
    }
}
