//! The runner of one owned partition: between its assignment and its release it owns the
//! partition's customers (a bounded cache of the committed states) and waits on its
//! triggers — input batches, the timer tick, the rules sweep, the rank check — each of which
//! builds a [`Draft`] that `Runner::commit`, the only writer, commits fenced and atomic.
//!
//! Engine time (`clock.mode`): in `wall` mode it is the wall clock and a tick fires due
//! timers; in `event` mode it is the partition's latest event time minus the allowed lateness,
//! and timers due before an event's engine time fire before the event is applied — so the
//! sequence of evaluations depends only on the input, never on batching or restarts.

use super::cache::StateCache;
use super::draft::{Draft, Loaded, Position, Working};
use super::restate::{Restate, RESTATE_TICK};
use super::sweep::{Sweep, SweepState};
use super::timers::EarliestDue;
use super::{PartitionStatus, Pipeline};
use crate::config::ClockMode;
use crate::engine::rules::rank::{Cutoffs, CutoffsSwitch};
use crate::engine::rules::Rules;
use crate::engine::{Outcome, Trigger};
use crate::ingest::record::Record;
use crate::model::state::rules_hash;
use crate::model::stored::StoredStateError;
use crate::model::time;
use crate::publish::position::OutboxPositions;
use crate::store::outbox::{EntryKind, RulesSweep, TimerPass};
use crate::store::partition::{ApplyError, Claim, Committed, PartitionStore};
use crate::telemetry::events::{self, StopCause};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tracing::info;

/// A recorded rules sweep a replay starts again, with the rules it moves customers to
/// (`None`: the running ones).
pub(super) type ReplayLink = (RulesSweep, Option<Arc<Rules>>);

/// A replay from before `last`, the pending sweep of the running rules: the rules the input
/// before the first sweep to start again ran under, and the sweeps to start again, oldest
/// first — each stretch of input between two of them under the rules it first ran under.
/// The chain goes back through the sweeps the published position keeps to the rules the
/// restored partition had completed; every version on it must be known (the partition's
/// previous text, `rules.history`, or one a claim returned since this process started) and
/// must not rank customers (a replay under earlier rank-based rules would need their rank
/// sets and cut-offs too: not yet). Otherwise the running rules replay everything before
/// `last`, as the warning says.
fn replay_chain(
    pipeline: &Pipeline,
    claim: &Claim,
    partition: i32,
    last: RulesSweep,
) -> (Option<Arc<Rules>>, VecDeque<ReplayLink>) {
    let next_offset = claim.next_offset.unwrap_or(-1);
    let mut chain: VecDeque<ReplayLink> = VecDeque::from([(last, None)]);
    let first = chain_first(pipeline, claim, next_offset, &mut chain).and_then(|first| {
        // Every sweep recorded after the restored offset must be on the chain (one still under
        // way when the next version took over is not: its stretch of input ran under a mix),
        // and the restored partition must not be in the middle of an earlier sweep.
        if let Some(skipped) = off_chain_sweep(claim, &chain) {
            return Err(format!(
                "the rules sweep that started at offset {} was still under way when the next rules version took over",
                skipped.offset
            ));
        }
        match claim.sweep {
            Some(s)
                if !chain.iter().any(|(c, _)| c.rules == s.rules)
                    && Some(s.rules) != claim.swept_rules =>
            {
                Err(format!(
                "the restored partition was in the middle of the rules sweep that started at offset {}",
                s.offset
            ))
            }
            _ => Ok(first),
        }
    });
    let (offset, changes) = match &first {
        Ok(_) => (chain.front().expect("non-empty").0.offset, chain.len()),
        Err(_) => (last.offset, 1),
    };
    events::ReplayBeforeRulesChange {
        partition,
        offset,
        changes,
        under: first.as_ref().map(|r| r.version()).map_err(String::as_str),
    }
    .emit(&pipeline.telemetry);
    match first {
        Ok(first) => (Some(first), chain),
        Err(_) => (None, VecDeque::from([(last, None)])),
    }
}

/// The previous rules version's sweep with its rules, if it was still under way when the
/// running version first claimed the partition (a rolling upgrade while it ran, or two
/// changes in quick succession): it completes first, under its rules (its pages skip the
/// customers it already reached), and the running version's sweep starts where it completes.
/// So every stretch of input ran under one version, which a replay after Redis lost writes
/// reproduces (before, the new sweep started at once, the stretch since the previous start
/// had run under a mix of the two, and a replay over it fell back to the running rules).
/// Not when either version ranks customers (the earlier one's pages would wait for its own
/// cut-offs, which no one computes any more; while the earlier rules are in force the
/// partition takes no new cut-offs of the running ones) nor when the earlier text is unknown:
/// the running version's sweep starts at once, as before.
fn unfinished_predecessor(
    pipeline: &Pipeline,
    claim: &Claim,
    running: u32,
) -> Option<(RulesSweep, Arc<Rules>)> {
    if pipeline.rules.uses_ranks() {
        return None;
    }
    let before = claim
        .sweep
        .filter(|s| s.rules != running && claim.swept_rules != Some(s.rules))?;
    let rules = pipeline
        .known_rules(before.rules)
        .filter(|r| !r.uses_ranks())?;
    Some((before, rules))
}

/// A published sweep a replay from `claim` would skip with `chain`: one started at or after
/// the restored offset (one started right there counts too, unless the restored partition
/// completed it) that is not on the chain.
fn off_chain_sweep<'c>(claim: &'c Claim, chain: &VecDeque<ReplayLink>) -> Option<&'c RulesSweep> {
    let next_offset = claim.next_offset.unwrap_or(-1);
    published_sweeps(claim).find(|e| {
        e.offset >= next_offset
            && Some(e.rules) != claim.swept_rules
            && !chain.iter().any(|(c, _)| c.rules == e.rules)
    })
}

/// The rules sweeps the published position keeps, oldest first.
fn published_sweeps(claim: &Claim) -> impl DoubleEndedIterator<Item = &RulesSweep> {
    claim
        .published_earlier_sweeps
        .iter()
        .chain(&claim.published_sweep)
}

/// Builds `chain` back from its last link through the recorded sweeps to the rules the
/// restored partition had completed; returns those rules (see [`replay_chain`]).
fn chain_first(
    pipeline: &Pipeline,
    claim: &Claim,
    next_offset: i64,
    chain: &mut VecDeque<ReplayLink>,
) -> Result<Arc<Rules>, String> {
    let usable = |rules: Option<Arc<Rules>>, from: u32, until: i64| {
        match rules {
        None => Err(format!(
            "the rules version the input before offset {until} first ran under (version hash {from:08x}) is not known to this process: the partition no longer keeps its text; list its file in rules.history"
        )),
        // The rank sets hold one value per customer and rank of the running rules: earlier
        // rules that rank may rank only as they do (the same ranks, metrics and ties) for a
        // replay under them to keep those sets as the first run did (rules that rank no one
        // write none, as they first did).
        Some(r) if r.uses_ranks() && !r.ranks_like(&pipeline.rules) => Err(format!(
            "the earlier rules {:?} rank customers other than the running rules do: replays under earlier rules with other ranks are not supported yet",
            r.version()
        )),
        Some(r) => Ok(r),
    }
    };
    loop {
        let sweep = chain.front().expect("the chain ends with `last`").0;
        let Some(from) = sweep.from else {
            return Err("the rules sweep's record does not say which rules it moved customers from (recorded by an older tierd)".to_owned());
        };
        let rules = pipeline.known_rules(from);
        if claim.swept_rules == Some(from) {
            // The restored partition had completed the sweep of `from`: the input before
            // this sweep ran under it.
            return usable(rules, from, sweep.offset);
        }
        match published_sweeps(claim).rev().find(|e| e.rules == from) {
            // Started after the restored offset, or right at it by an owner after the restored
            // partition's (which had not started it).
            Some(earlier)
                if earlier.offset > next_offset
                    || (earlier.offset == next_offset
                        && claim.sweep.is_none_or(|s| s.rules != from)) =>
            {
                match usable(rules, from, sweep.offset) {
                    Ok(r) => chain.push_front((*earlier, Some(r))),
                    Err(reason) => return Err(reason),
                }
            }
            // The restored partition was in the middle of that sweep, which first completed
            // before the next change: it goes on (its pages skip the customers it already
            // re-evaluated) under its rules and completes where it first completed.
            Some(earlier)
                if earlier.done.is_some()
                    && claim
                        .sweep
                        .is_some_and(|s| s.rules == from && s.offset == earlier.offset) =>
            {
                let r = usable(rules, from, sweep.offset)?;
                chain.push_front((*earlier, Some(Arc::clone(&r))));
                return Ok(r);
            }
            Some(_) => {
                return Err(format!(
                    "the restored partition had not completed the sweep of {}, the rules before the change at offset {}",
                    rules.map_or_else(|| format!("version hash {from:08x}"), |r| format!("{:?}", r.version())),
                    sweep.offset
                ))
            }
            None => {
                return Err(format!(
                    "neither the published position nor the history topic keeps a record of the sweep to the rules before the change at offset {} (the position keeps the last {} sweeps; the history topic the others within its retention, when kafka.history_topic is set and could be read)",
                    sweep.offset,
                    crate::publish::position::EARLIER_SWEEPS + 1
                ))
            }
        }
    }
}

/// How often a rules sweep takes its next page (`rules.sweep_per_second` / 10 customers).
pub const SWEEP_TICK: Duration = Duration::from_millis(100);

/// A batch of consecutive messages of one partition, in offset order.
pub type Batch = Vec<Record>;

/// Why a runner stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerExit {
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
    /// The runner panicked (a bug): the partition stays stopped and `/healthz` fails, so the
    /// instance is restarted.
    Panicked,
}

/// The owner of one partition's customers and commits.
pub struct Runner {
    pub(super) partition: i32,
    pub(super) store: PartitionStore,
    /// The partition's customers as committed, in their stored form (empty: not stored): a
    /// decoded state takes 3–4 times the memory, and a hit costs one decode (a miss costs a
    /// Redis read and the same decode).
    cache: StateCache,
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) status: Arc<PartitionStatus>,
    published: Arc<Notify>,
    label: String,
    /// Commits stored for this partition, as far as this owner knows.
    commits: i64,
    /// The partition's event-time clock (`event` mode).
    pub(super) clock: Option<i64>,
    /// A lower bound of the earliest timer's due time.
    pub(super) earliest_due: EarliestDue,
    /// `wall` mode: the latest Kafka message time applied (capped at the wall clock then):
    /// while the partition lags, everything that happened before it has been applied.
    pub(super) applied_until: Option<i64>,
    /// The running rules version's sweep on this partition.
    pub(super) sweep: SweepState,
    /// The rank cut-offs evaluations use.
    pub(super) cutoffs: Arc<Cutoffs>,
    /// Partition 0's owner: when cut-offs were last computed, and the populations then.
    pub(super) last_compute: Option<(Instant, Vec<u64>)>,
    /// Entries in the outbox after this owner's last commit (or last check).
    outbox_len: u64,
    /// When this owner last committed (or verified its position).
    last_commit: Instant,
    /// Cut-offs switches of changes already published from input still to be applied again
    /// (Redis lost writes), in order: each applies before its input offset.
    pub(super) replay: VecDeque<CutoffsSwitch>,
    /// Wall-clock timer passes of changes already published, still to be fired again at
    /// their input offsets (Redis lost writes), in order.
    replay_passes: VecDeque<TimerPass>,
    /// From which input offset on the recorded passes are complete.
    replay_passes_from: Option<i64>,
    /// The input offset the changes already published reach: below it, no cut-offs but the
    /// recorded ones apply.
    pub(super) replay_through: Option<i64>,
    /// What Kafka holds of every partition's published outbox (read by partition 0 before it
    /// publishes new cut-offs).
    pub(super) positions: Arc<OutboxPositions>,
    /// Since when partition 0 holds new cut-offs back for another partition's replay.
    pub(super) replay_wait: Option<Instant>,
    /// During a replay from before a rules change: the rules in force instead of the running
    /// ones (those the input being replayed first ran under), until the running rules' sweep
    /// starts again.
    pub(super) replay_rules: Option<Arc<Rules>>,
    /// During a replay from before a rules change: the recorded sweeps still to start again
    /// (the front one pending or running), oldest first.
    pub(super) replay_chain: VecDeque<ReplayLink>,
    /// During a replay: the running rules' sweep (the chain's last link) was never published,
    /// so it starts afresh where the published changes end (see `SweepState::after_claim`).
    pub(super) sweep_afresh: bool,
    /// The previous rules version's sweep is completing first ([`unfinished_predecessor`]):
    /// the running version's sweep starts where it completes.
    pub(super) finish_predecessor: bool,
    /// The partition's sequence floor: changes are numbered above it (see
    /// [`crate::engine::changes::number_above`] and [`sequence_floor`]).
    pub(super) seq_floor: u64,
    /// A restatement the partition owes its customers ([`super::restate`]).
    pub(super) restate: Option<Restate>,
    /// `event` mode: the rules whose completed sweep the claimed partition ends with, if the
    /// timers it held may not have fired yet ([`Self::fire_held_timers`]).
    held_timers: Option<Arc<Rules>>,
    /// This runner's count in `tierd_rules_sweep_partitions_done`.
    pub(super) sweep_done: SweepDoneGauge,
}

/// Counts a runner in `tierd_rules_sweep_partitions_done` once its sweep is complete (at its
/// start, or when the sweep completes) and gives the count back when the runner ends, however
/// it ends: returned, stopped on an error, aborted or panicked (dropped).
pub(super) struct SweepDoneGauge {
    gauge: prometheus::IntGauge,
    counted: bool,
}

impl SweepDoneGauge {
    /// Counts the runner, once.
    pub(super) fn count(&mut self) {
        if !self.counted {
            self.gauge.inc();
            self.counted = true;
        }
    }
}

impl Drop for SweepDoneGauge {
    fn drop(&mut self) {
        if self.counted {
            self.gauge.dec();
        }
    }
}

/// The sequence floor a claimed partition's changes are numbered above: the one Redis keeps,
/// raised to the highest sequence the partition ever published when its replay cannot
/// reproduce the changes it publishes again (`inexact`: it falls back to the running rules,
/// so none of them is decided as it first was), or when Redis lost the commit that raised
/// it (the published changes were numbered above a higher floor than Redis keeps: numbered
/// from the lower one, the replay would reuse their ids). Otherwise a replay numbers its
/// changes as they first were, and publishes them again byte for byte.
fn sequence_floor(claim: &Claim, inexact: bool) -> u64 {
    if inexact || claim.published_floor > claim.seq_floor {
        claim.seq_floor.max(claim.published_sequence)
    } else {
        claim.seq_floor
    }
}

/// `event` mode: the rules of the sweep the claimed partition completed last, if no later one
/// started (see [`Runner::fire_held_timers`]) and this process knows them.
fn held_timers_rules(pipeline: &Pipeline, claim: &Claim) -> Option<Arc<Rules>> {
    if pipeline.clock.mode != ClockMode::Event || claim.clock.is_none() {
        return None;
    }
    let swept = claim.swept_rules?;
    if claim.sweep.is_some_and(|s| s.rules != swept) {
        return None;
    }
    if swept == pipeline.rules.version_hash() {
        return Some(Arc::clone(&pipeline.rules));
    }
    // Earlier rules that rank otherwise would write their values into the running rules'
    // rank sets (as the replay chain, these are not used).
    pipeline
        .known_rules(swept)
        .filter(|r| !r.uses_ranks() || r.ranks_like(&pipeline.rules))
}

impl Runner {
    /// The runner of a partition we just claimed.
    pub fn new(
        store: PartitionStore,
        pipeline: Arc<Pipeline>,
        status: Arc<PartitionStatus>,
        published: Arc<Notify>,
        positions: Arc<OutboxPositions>,
        claim: &Claim,
        partition: i32,
    ) -> Self {
        let (running, now) = (
            rules_hash(pipeline.rules.version()),
            Self::engine_time(pipeline.clock.mode, claim.clock),
        );
        let (sweep, mut sweep_afresh) = SweepState::after_claim(claim, running, now);
        if let Some(text) = claim.prior_rules.as_deref() {
            // Kept for a later replay over more than one rules change (after the next
            // rollback the partition may no longer keep it).
            match Rules::parse(
                text,
                "the earlier rules kept in Redis",
                pipeline.rules.fraction_digits(),
            ) {
                Ok(prior) => pipeline.know_rules(prior),
                Err(error) => {
                    tracing::warn!(partition, %error, "The earlier rules text the partition keeps is invalid now: a replay cannot use it.");
                }
            }
        }
        let predecessor = match sweep {
            SweepState::Running(s) if s.record.is_some() => {
                unfinished_predecessor(&pipeline, claim, running).map(|(b, r)| (b, r, None))
            }
            // Redis lost writes while this version was completing the previous version's
            // sweep first, before the completion was published (the changes of its pages and
            // of the input meanwhile, all under the previous rules, were): the replay does the
            // same, and completes that sweep no earlier than the input those changes reach.
            SweepState::Pending(_) if sweep_afresh => {
                unfinished_predecessor(&pipeline, claim, running)
                    .filter(|(before, _)| {
                        claim.published_sweep.is_some_and(|p| {
                            p.rules == before.rules && p.offset == before.offset && p.done.is_none()
                        })
                    })
                    .map(|(b, r)| (b, r, claim.replay_through))
            }
            _ => None,
        };
        let finish_predecessor = predecessor.is_some();
        let held_timers = held_timers_rules(&pipeline, claim);
        // Whether the replay cannot reproduce what was published (see `sequence_floor`).
        let mut inexact = false;
        let (replay_rules, replay_chain, sweep) = match sweep {
            SweepState::Running(_) | SweepState::Pending(_) if predecessor.is_some() => {
                let (before, rules, not_before) = predecessor.expect("checked");
                tracing::info!(partition, offset = before.offset, version = rules.version(), "The previous rules version's sweep was still under way: it completes first, under its rules; this version's sweep starts where it completes.");
                sweep_afresh = true;
                let next = RulesSweep {
                    rules: running,
                    from: Some(before.rules),
                    done: None,
                    ..before
                };
                (
                    Some(Arc::clone(&rules)),
                    VecDeque::from([(before, Some(rules)), (next, None)]),
                    SweepState::Running(Sweep::resumed(RulesSweep {
                        done: not_before,
                        ..before
                    })),
                )
            }
            SweepState::Pending(recorded) => {
                let (rules, chain) = replay_chain(&pipeline, claim, partition, recorded);
                // No rules: the replay falls back to the running ones.
                inexact |= rules.is_none();
                if sweep_afresh && rules.is_none() {
                    // The fallback: the running rules replay the input from the claimed
                    // offset, and their sweep (never published) starts there.
                    sweep_afresh = false;
                    (
                        None,
                        VecDeque::new(),
                        SweepState::started(claim, running, now),
                    )
                } else {
                    let front = chain.front().expect("non-empty").0;
                    // A sweep the restored partition was in the middle of goes on at once; one
                    // recorded right at its offset that it had not started starts there, as a
                    // pending one does.
                    let next = claim.next_offset.unwrap_or(-1);
                    let started = claim.sweep.is_some_and(|s| s.rules == front.rules);
                    let first = if front.offset < next || (front.offset == next && started) {
                        SweepState::Running(Sweep::resumed(front))
                    } else {
                        SweepState::Pending(front)
                    };
                    (rules, chain, first)
                }
            }
            other => (None, VecDeque::new(), other),
        };
        let seq_floor = sequence_floor(claim, inexact);
        if seq_floor > claim.seq_floor {
            events::SequenceFloorRaised {
                partition,
                from: claim.seq_floor,
                to: seq_floor,
                lost: !inexact,
            }
            .emit(&pipeline.telemetry);
        }
        let telemetry_sweep_done = pipeline.telemetry.rules_sweep_done.clone();
        Self {
            partition,
            store,
            cache: StateCache::new(pipeline.cache_customers, Arc::clone(&pipeline.cache_budget)),
            pipeline,
            status,
            published,
            label: partition.to_string(),
            commits: claim.commits,
            clock: claim.clock,
            earliest_due: EarliestDue::Unknown,
            applied_until: None,
            sweep,
            cutoffs: Arc::new(claim.cutoffs.clone().unwrap_or_default()),
            last_compute: None,
            outbox_len: 0,
            replay: claim.replay_cutoffs.iter().cloned().collect(),
            replay_passes: claim.replay_passes.iter().copied().collect(),
            replay_passes_from: claim.replay_passes_from,
            replay_through: claim.replay_through,
            positions,
            replay_wait: None,
            replay_rules,
            replay_chain,
            sweep_afresh,
            finish_predecessor,
            seq_floor,
            restate: Restate::after_claim(claim, inexact || claim.beyond_history),
            held_timers,
            last_commit: Instant::now(),
            sweep_done: SweepDoneGauge {
                gauge: telemetry_sweep_done,
                counted: false,
            },
        }
    }

    /// The rules evaluations are under now: the running ones, except in a replay of input
    /// applied before a rules change (see [`replay_chain`]).
    pub(super) fn rules(&self) -> &Rules {
        self.replay_rules.as_deref().unwrap_or(&self.pipeline.rules)
    }

    /// Runs the triggers until the batch sender is dropped (revocation or shutdown) or the
    /// partition cannot go on; in `wall` mode fires due timers every `clock.tick_ms`. Redis
    /// errors are retried with backoff: a batch is never skipped.
    pub async fn run(mut self, mut batches: mpsc::Receiver<Batch>) -> RunnerExit {
        let p = Arc::clone(&self.pipeline);
        // Pins can expire under any rules, so wall mode always ticks (a due check is a
        // comparison with the earliest known timer).
        let ticking = p.clock.mode == ClockMode::Wall;
        let mut tick = interval(p.clock.tick);
        let mut sweep_tick = interval(SWEEP_TICK);
        let ranked = p.rules.uses_ranks();
        let mut rank_tick = interval(p.ranks.check_every);
        let mut outbox_tick = interval(OUTBOX_CHECK);
        let mut verify_tick = interval(VERIFY_EVERY);
        let mut restate_tick = interval(RESTATE_TICK);
        match self.sweep {
            SweepState::Done => self.sweep_done.count(),
            SweepState::Running(sweep) if sweep.record.is_none() => events::SweepResumed {
                partition: self.partition,
                offset: self.next_offset(),
                at: sweep.at,
            }
            .emit(&p.telemetry),
            _ => {}
        }
        if let Err(error) = self.record_restate().await {
            return self.exit(&error);
        }
        if let Err(error) = self.fire_held_timers().await {
            return self.exit(&error);
        }
        if let Err(error) = self.finish_stored_pass().await {
            return self.exit(&error);
        }
        if let Err(error) = self.replay_switches_through(self.next_offset()).await {
            return self.exit(&error);
        }
        loop {
            let full = self.status.outbox_full.load(Ordering::Relaxed) > 0;
            // While a restatement waits for the outbox to be published, nothing is decided.
            let held = self.restate.as_ref().is_some_and(Restate::holds_input);
            let result = tokio::select! {
                // Past the outbox bound nothing new is decided (the consumer pauses the
                // partition once its queue fills): no input, and no timer pass, sweep page or
                // re-ranking either — a sweep or a re-ranking may move every customer, and a
                // day of wall-clock timers as many. Each goes on once the outbox drains to half
                // (a timer pass or re-ranking already started runs to its end).
                batch = batches.recv(), if !full && !held => match batch {
                    Some(batch) if batch.is_empty() => continue,
                    Some(batch) => {
                        // Fault injection for the tests (`--features failpoints`).
                        fail::fail_point!("runner-batch");
                        self.apply_input(batch).await
                    }
                    None => break,
                },
                // While a replay is inside the published changes' input, timers fire only at
                // the recorded passes (see `replay_switches_through`).
                _ = tick.tick(), if ticking && !full && !held && !self.ticks_held() => {
                    let upto = self.wall_timer_horizon(time::now_ms());
                    self.fire_pass(upto).await
                }
                _ = sweep_tick.tick(), if !full && self.sweep_running().is_some() => {
                    self.sweep_step().await
                }
                _ = rank_tick.tick(), if ranked && !held => self.rank_step(full).await,
                _ = restate_tick.tick(), if self.restate.is_some() => {
                    self.restate_step(&batches).await
                }
                _ = outbox_tick.tick(), if full => self.recheck_outbox().await,
                _ = verify_tick.tick() => {
                    // A quiet partition gives back what its share lost to partitions started
                    // since (it trims itself only when it caches a customer).
                    self.cache.trim();
                    self.metric_cache();
                    self.verify_if_quiet().await
                }
            };
            if let Err(error) = result {
                return self.exit(&error);
            }
            self.bound_outbox();
        }
        info!(partition = self.partition, "Partition runner finished.");
        RunnerExit::Finished
    }

    /// A partition that has not committed for [`VERIFY_EVERY`] checks that Redis still holds
    /// its position (see [`PartitionStore::verify`]): lost writes are then replayed without
    /// waiting for new input.
    async fn verify_if_quiet(&mut self) -> Result<(), ApplyError> {
        if self.last_commit.elapsed() < VERIFY_EVERY {
            return Ok(());
        }
        self.store.verify(self.next_offset(), self.commits).await?;
        self.last_commit = Instant::now();
        Ok(())
    }

    /// Whether timers wait: for a rules sweep under way, or because the partition is replaying
    /// input whose changes were already published (Redis lost writes) and whose wall-clock
    /// timer passes are all recorded: timers fire there only at the recorded passes. Where the
    /// record is incomplete (before its first pass: an older binary; a history cut for room)
    /// they fire as the backlog is applied.
    fn ticks_held(&self) -> bool {
        if self.sweep.holds_timers() {
            return true;
        }
        let next = self.next_offset();
        self.replay_passes_from.is_some_and(|from| next >= from)
            && (!self.replay_passes.is_empty()
                || self.replay_through.is_some_and(|through| next < through))
    }

    /// `event` mode: fires the timers due by the claimed partition's clock under the rules
    /// whose sweep it last completed, before anything else — a sweep may have been completed
    /// by the partition's last commit, and the timers it held fire right after it, under its
    /// rules (see `sweep_step`). An owner stopped (or a Redis snapshot taken) between the two
    /// commits would otherwise leave them to the next version's sweep, which a new owner
    /// starts at once on a quiet partition: a replay after Redis lost the timers' commit then
    /// decided them after that sweep, under the newer rules, and published their ids with
    /// other bodies. Otherwise nothing is due by the clock at a claim (timers due before an
    /// event fire ahead of it), so this fires nothing.
    async fn fire_held_timers(&mut self) -> Result<(), ApplyError> {
        let (Some(rules), Some(clock)) = (self.held_timers.take(), self.clock) else {
            return Ok(());
        };
        // Before the sweep a new version (or a replay of it) starts here: as if not started
        // yet (its start is recorded with its first commit after these).
        let in_force = self.replay_rules.replace(rules);
        let sweep = std::mem::replace(&mut self.sweep, SweepState::Done);
        let mut work = Working::default();
        let fired = self.fire_due(clock, &mut work, None).await;
        self.replay_rules = in_force;
        self.sweep = sweep;
        fired?;
        self.keep(work);
        Ok(())
    }

    /// Fires the timers due up to `upto` (a wall-clock pass), recording the pass with its
    /// commit so that a replay fires them at the same input offset.
    async fn fire_pass(&mut self, upto: i64) -> Result<(), ApplyError> {
        let mut work = Working::default();
        let pass = TimerPass {
            offset: self.next_offset(),
            upto,
            cutoffs: self.cutoffs.version,
        };
        self.fire_due(upto, &mut work, Some(pass)).await?;
        self.keep(work);
        Ok(())
    }

    /// The input offset of the next recorded switch, pass or sweep start to replay.
    fn next_replay_offset(&self) -> Option<i64> {
        let sweep = match self.sweep {
            SweepState::Pending(recorded) => Some(recorded.offset),
            other => other.completes_at(),
        };
        [
            self.replay.front().map(|s| s.offset),
            self.replay_passes.front().map(|p| p.offset),
            sweep,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Applies a batch; during a replay, the published cut-offs switches and timer passes it
    /// reaches apply before their input offsets (the batch is split there), as they did the
    /// first time — one at the offset right after the batch as soon as the batch is applied
    /// (no later message may be coming).
    async fn apply_input(&mut self, mut batch: Batch) -> Result<(), ApplyError> {
        loop {
            let Some(at) = self.next_replay_offset() else {
                return self.apply_batch(batch).await;
            };
            let split = batch.partition_point(|m| m.offset() < at);
            let rest = batch.split_off(split);
            if !batch.is_empty() {
                self.apply_batch(batch).await?;
            }
            if rest.is_empty() {
                return self.replay_switches_through(self.next_offset()).await;
            }
            self.replay_switches_through(at).await?;
            batch = rest;
        }
    }

    /// Applies the replayed switches and fires the replayed timer passes whose offset is at or
    /// before `offset`, in the order they first ran: at one offset, a pass evaluated with
    /// cut-offs version v follows the switches up to v and precedes the later ones.
    async fn replay_switches_through(&mut self, offset: i64) -> Result<(), ApplyError> {
        loop {
            // Where a running sweep first completed, it completes again (before the timers it
            // held fire, and before the next rules change recorded at the same offset). Under
            // rank-based rules its pages first ran once the new rules' first cut-offs were
            // applied, which may be at this very offset (no input came between them): those
            // apply first, and the newer ones recorded here after the completion, as they did
            // the first time.
            if self.sweep.completes_at().is_some_and(|at| at <= offset) {
                while self.sweep_running().is_none()
                    && self.replay.front().is_some_and(|s| s.offset <= offset)
                {
                    self.replay_switch().await?;
                }
                self.finish_sweep().await?;
                continue;
            }
            // A recorded sweep start goes first at its offset: the owner that started it did
            // so when it claimed the partition, before any pass or switch of its own; no pass
            // ran while it was under way.
            let SweepState::Pending(start) = self.sweep else {
                break;
            };
            if start.offset > offset {
                break;
            }
            // Except what the previous owner did there after its last input, under the
            // earlier rules, in the order it did: the timer passes it fired (they ran before
            // the sweep's start, so their horizon is earlier than its time; the new owner's
            // passes come after its sweep, later than that time; this assumes the two hosts'
            // clocks agree to the millisecond order of a restart) and the cut-offs it moved
            // to (of the earlier rules: the new owner applies only its own rules' cut-offs).
            loop {
                let switch = self
                    .replay
                    .front()
                    .filter(|s| s.offset == start.offset && s.cutoffs.rules != start.rules)
                    .map(|s| s.cutoffs.version);
                let pass = self
                    .replay_passes
                    .front()
                    .filter(|p| p.offset == start.offset && p.upto < start.at)
                    .copied();
                match (switch, pass) {
                    (None, None) => break,
                    (Some(version), Some(pass)) if version <= pass.cutoffs => {
                        self.replay_switch().await?
                    }
                    (None, Some(pass)) | (Some(_), Some(pass)) => {
                        self.replay_passes.pop_front();
                        self.replay_pass(pass).await?;
                    }
                    (Some(_), None) => self.replay_switch().await?,
                }
            }
            self.resume_pending_sweep();
        }
        loop {
            let switch = self
                .replay
                .front()
                .filter(|s| s.offset <= offset)
                .map(|s| (s.offset, s.cutoffs.version));
            let pass = self
                .replay_passes
                .front()
                .filter(|p| p.offset <= offset)
                .copied();
            let pass_first = match (switch, pass) {
                (None, None) => return Ok(()),
                (Some((at, version)), Some(p)) => {
                    p.offset < at || (p.offset == at && version > p.cutoffs)
                }
                (None, Some(_)) => true,
                (Some(_), None) => false,
            };
            if pass_first {
                let pass = self.replay_passes.pop_front().expect("checked");
                self.replay_pass(pass).await?;
                continue;
            }
            self.replay_switch().await?;
        }
    }

    /// Fires a recorded wall-clock timer pass again.
    async fn replay_pass(&mut self, pass: TimerPass) -> Result<(), ApplyError> {
        events::TimersReplayed {
            partition: self.partition,
            offset: pass.offset,
            upto: pass.upto,
        }
        .emit(&self.pipeline.telemetry);
        self.fire_pass(pass.upto).await
    }

    /// Applies the next replayed cut-offs switch.
    async fn replay_switch(&mut self) -> Result<(), ApplyError> {
        let Some(switch) = self.replay.pop_front() else {
            return Ok(());
        };
        events::CutoffsReplayed {
            partition: self.partition,
            version: switch.cutoffs.version,
            offset: switch.offset,
        }
        .emit(&self.pipeline.telemetry);
        self.apply_cutoffs_of(switch.cutoffs, switch.offset, switch.at_ms)
            .await
    }

    fn exit(&self, error: &ApplyError) -> RunnerExit {
        let (cause, exit) = match error {
            ApplyError::Fenced { .. } => (StopCause::Fenced, RunnerExit::Fenced),
            ApplyError::Diverged { stored, .. } => (
                StopCause::Diverged,
                RunnerExit::Diverged { stored: *stored },
            ),
            ApplyError::CorruptState { .. } | ApplyError::Redis(_) => {
                (StopCause::Corrupt, RunnerExit::Failed)
            }
        };
        events::PartitionStopped {
            partition: self.partition,
            cause,
            error,
        }
        .emit(&self.pipeline.telemetry);
        exit
    }

    /// `wall` mode: the latest due time a timer may fire at now. A timer due at T fires only
    /// once the partition has applied everything that happened before T: at once when the
    /// partition is caught up (see `PartitionStatus::caught_up`), otherwise up to the latest
    /// message time applied — so
    /// after a restart or an outage a customer is not moved down for lack of a purchase that
    /// is still in the backlog (and then up again when it is applied).
    fn wall_timer_horizon(&self, now: i64) -> i64 {
        if self.status.caught_up() {
            now
        } else {
            self.applied_until.map_or(i64::MIN, |t| t.min(now))
        }
    }

    /// Keeps a trigger's customers cached (they are the committed truth).
    pub(super) fn keep(&mut self, work: Working) {
        for (id, loaded) in work {
            if let Some(stored) = loaded.into_cache() {
                // In place when the customer is cached already (no entry freed and made).
                self.cache.put(id, stored);
            }
        }
        self.metric_cache();
    }

    /// Shows what the cache holds (`tierd_state_cache_bytes`, `tierd_state_cache_customers`).
    fn metric_cache(&self) {
        let t = &self.pipeline.telemetry;
        let bytes = i64::try_from(self.cache.bytes()).unwrap_or(i64::MAX);
        let customers = i64::try_from(self.cache.len()).unwrap_or(i64::MAX);
        t.state_cache_bytes
            .with_label_values(&[&self.label])
            .set(bytes);
        t.state_cache_customers
            .with_label_values(&[&self.label])
            .set(customers);
    }

    /// Makes sure `ids` are in `work`: from the cache, or loaded with one MGET.
    pub(super) async fn load(
        &mut self,
        ids: impl IntoIterator<Item = String>,
        work: &mut Working,
    ) -> Result<(), ApplyError> {
        let mut missing: Vec<String> = Vec::new();
        for id in ids {
            if work.contains_key(&id) {
                continue;
            }
            // Taken by reference: the entry stays (no entry freed and made again for a
            // customer touched once more), `keep` replaces its value if the state changed.
            if let Some(decoded) = self.cache.get(&id).map(Loaded::from_cache) {
                let loaded = decoded.map_err(|e| self.corrupt(&id, "cached", &e))?;
                work.insert(id, loaded);
            } else {
                // A placeholder until the MGET: a customer with several events in the batch
                // is read once.
                work.insert(id.clone(), Loaded::new(Box::default()));
                missing.push(id);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let loaded = self.store.load(&missing).await?;
        for (id, stored) in missing.into_iter().zip(loaded) {
            let loaded = Loaded::from_redis(stored).map_err(|e| self.corrupt(&id, "stored", &e))?;
            work.insert(id, loaded);
        }
        Ok(())
    }

    /// A customer's state that cannot be read (`what`: "stored" in Redis, or "cached").
    fn corrupt(&self, id: &str, what: &str, error: &StoredStateError) -> ApplyError {
        ApplyError::CorruptState {
            partition: self.partition,
            key: self.store.keys().customer(id),
            error: format!("{what}: {error}"),
        }
    }

    /// The next input offset to apply (-1 until known).
    pub(super) fn next_offset(&self) -> i64 {
        self.status.next_offset.load(Ordering::Relaxed)
    }

    /// An empty draft at the partition's position.
    pub(super) fn new_draft(&self) -> Draft {
        Draft::at(self.next_offset(), self.seq_floor)
    }

    /// Engine time now for operator-level triggers: the wall clock, or the partition's
    /// event-time clock.
    pub(super) fn engine_now(&self) -> i64 {
        Self::engine_time(self.pipeline.clock.mode, self.clock)
    }

    /// [`Self::engine_now`] in `mode` for a partition whose event-time clock is `clock`.
    pub(super) fn engine_time(mode: ClockMode, clock: Option<i64>) -> i64 {
        match mode {
            ClockMode::Wall => time::now_ms(),
            ClockMode::Event => clock.unwrap_or(i64::MIN),
        }
    }

    /// Re-evaluates a stored customer for an operator-level trigger (rules sweep, new rank
    /// cut-offs) at engine time `now` (the customer's own engine time never runs backwards,
    /// see `CustomerState::evaluate`).
    pub(super) fn reevaluate_at(
        &self,
        draft: &mut Draft,
        id: &str,
        loaded: &mut Loaded,
        trigger: Trigger,
        now: i64,
    ) -> Outcome {
        let rules = self.rules();
        let outcome = loaded.state.evaluate(rules, now, trigger, &self.cutoffs);
        loaded.dirty = true;
        draft.record(&self.pipeline, rules, id, &mut loaded.state, &outcome, None);
        outcome
    }

    /// Commits a draft: dirty states, their timers and rank entries, the outbox entries and the
    /// new position, fenced and atomic. Redis errors are retried (the script recognises its own
    /// lost reply).
    pub(super) async fn commit(
        &mut self,
        draft: &mut Draft,
        work: &mut Working,
    ) -> Result<(), ApplyError> {
        let p = Arc::clone(&self.pipeline);
        if self.earliest_due == EarliestDue::Unknown {
            // First commit of this owner: learn where the timers stand.
            self.earliest_due = EarliestDue::from(self.store.earliest_timer().await?);
        }
        // Every timer set by any evaluation (events, timers, sweeps, re-rankings) lowers the
        // bound of the earliest due time, so none can be overlooked.
        for loaded in work.values().filter(|l| l.dirty) {
            if let Some((due, _)) = loaded.state.timer {
                self.earliest_due.lower(due);
            }
        }
        let position = Position {
            expected_offset: self.next_offset(),
            expected_commits: self.commits,
            clock: self.clock.filter(|_| p.clock.mode == ClockMode::Event),
        };
        if let Some(record) = self.take_sweep_record() {
            draft.outbox.insert(0, record);
        }
        let ranks = self.store.rank_keys().len();
        let batch = draft.take_batch(position, work, self.store.keys(), ranks, p.history_changes);
        let committed = self.store.commit(&batch).await?;
        if let Some(r) = self.restate.as_mut() {
            r.committed(&batch.outbox);
        }
        self.commits += 1;
        self.last_commit = Instant::now();
        work.values_mut().for_each(Loaded::committed);
        self.status
            .next_offset
            .store(draft.end_offset, Ordering::Relaxed);
        if let Committed::Applied { outbox_len } = committed {
            self.outbox_len = outbox_len;
            events::Committed {
                partition: &self.label,
                applied: draft.applied,
                duplicates: draft.duplicates,
                rejected: &draft.rejected,
                changes: &draft.changes,
                notices: draft.notices,
                outbox_len,
            }
            .emit(&p.telemetry);
            let recent = &p.telemetry.recent;
            recent.record(
                self.partition,
                batch
                    .outbox
                    .iter()
                    .rev()
                    .filter(|e| e.kind == EntryKind::Change)
                    .map(|e| e.value.as_slice()),
            );
        }
        if !batch.outbox.is_empty() {
            self.published.notify_one();
        }
        Ok(())
    }

    /// Stops taking input while the outbox is over `publish.outbox_max_entries` (Redis memory
    /// stays bounded while publishing cannot keep up, e.g. Kafka unreachable).
    fn bound_outbox(&self) {
        let max = self.pipeline.outbox_max_entries;
        if self.outbox_len > max && self.status.outbox_full.load(Ordering::Relaxed) == 0 {
            self.status
                .outbox_full
                .store(self.outbox_len, Ordering::Relaxed);
            events::OutboxFull {
                partition: self.partition,
                entries: self.outbox_len,
                max,
            }
            .emit(&self.pipeline.telemetry);
        }
    }

    /// While over the bound: takes input again once the outbox is down to half of it.
    async fn recheck_outbox(&mut self) -> Result<(), ApplyError> {
        self.outbox_len = self.store.outbox_len().await?;
        let max = self.pipeline.outbox_max_entries;
        if self.outbox_len <= max / 2 {
            self.status.outbox_full.store(0, Ordering::Relaxed);
            events::OutboxDrained {
                partition: self.partition,
                entries: self.outbox_len,
            }
            .emit(&self.pipeline.telemetry);
        } else {
            self.status
                .outbox_full
                .store(self.outbox_len, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The partition's label for metrics.
    pub(super) fn label(&self) -> &str {
        &self.label
    }
}

/// How long a partition may go without a commit before it checks that Redis still holds its
/// position.
const VERIFY_EVERY: Duration = Duration::from_secs(2);

/// How often an outbox over its bound is checked again.
const OUTBOX_CHECK: Duration = Duration::from_millis(200);

fn interval(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

#[cfg(test)]
mod tests {
    use super::super::sweep::tests::{claim as restored, sweep};
    use super::*;

    /// A claim restored at offset 100 under completed rules 1 (its sweep recorded), the
    /// published changes reaching offset 150 with `published` the latest sweep they record.
    fn claim(published: RulesSweep) -> Claim {
        Claim {
            sweep: Some(sweep(40, 1, Some(50))),
            ..restored(Some(150), Some(published))
        }
    }

    #[test]
    fn the_sequence_floor_rises_to_the_highest_published_only_when_a_replay_cannot_reproduce() {
        let claim = |seq_floor: u64, published_floor: u64| Claim {
            seq_floor,
            published_floor,
            published_sequence: 90,
            ..restored(Some(150), None)
        };
        // A replay that reproduces what was published numbers its changes as they first were.
        assert_eq!(sequence_floor(&claim(0, 0), false), 0);
        assert_eq!(sequence_floor(&claim(30, 30), false), 30);
        // One that cannot numbers them above everything published.
        assert_eq!(sequence_floor(&claim(0, 0), true), 90);
        assert_eq!(sequence_floor(&claim(30, 30), true), 90);
        // Redis lost the commit that raised the floor the published changes were numbered
        // above: numbered from the one Redis keeps, they would reuse those changes' ids.
        assert_eq!(sequence_floor(&claim(0, 30), false), 90);
        assert_eq!(sequence_floor(&claim(20, 30), false), 90);
        // Never lowered.
        assert_eq!(sequence_floor(&claim(95, 30), true), 95);
    }

    #[test]
    fn an_unfinished_sweep_started_at_the_restored_offset_is_not_skipped() {
        // Rules 2's sweep started right where Redis was restored to and never completed; the
        // next version's sweep (3) starts where the published changes end.
        let chain = VecDeque::from([(sweep(150, 3, None), None)]);
        let at_restored = claim(sweep(100, 2, None));
        assert_eq!(
            off_chain_sweep(&at_restored, &chain),
            Some(&sweep(100, 2, None))
        );
        let after = claim(sweep(120, 2, None));
        assert_eq!(off_chain_sweep(&after, &chain), Some(&sweep(120, 2, None)));
        // On the chain, before the restored offset, or completed by the restored partition:
        // not skipped.
        let on_chain = VecDeque::from([
            (sweep(120, 2, Some(130)), None),
            (sweep(150, 3, None), None),
        ]);
        assert_eq!(off_chain_sweep(&after, &on_chain), None);
        assert_eq!(off_chain_sweep(&claim(sweep(90, 2, None)), &chain), None);
        assert_eq!(
            off_chain_sweep(&claim(sweep(100, 1, Some(100))), &chain),
            None
        );
    }
}
