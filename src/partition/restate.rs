//! Telling customers their tier again after a replay that could not reproduce what was
//! published (see [`crate::engine::restate`]).
//!
//! When Redis lost writes and the replay falls back to the running rules, the changes the
//! first run published for the lost input stay on the output topic, and a customer the first
//! run moved but the replay does not is left with a last change naming another tier than the
//! one they are in. Once the replay is through the published input (and the running rules'
//! sweep is complete), the partition stops taking input until its outbox is published, reads
//! back what the output topic last told of each customer since a little before the restored
//! outbox's last entry, and publishes a `rules_changed` change for each of its customers told
//! another tier. The restatement is recorded in the partition's meta hash (`restate`) when it
//! is decided, and cleared when done: an owner that stops before then leaves it to the next.
//! It is idempotent (a customer told their tier is not told again), so doing it twice costs a
//! read only.

use super::draft::Working;
use super::runner::{Batch, Runner};
use super::sweep::SweepState;
use crate::engine::Outcome;
use crate::publish::readback::Told;
use crate::store::outbox::{EntryKind, OutboxEntry};
use crate::store::partition::{ApplyError, Claim};
use crate::telemetry::events;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How far before the restored outbox's last entry the output topic is read from: a margin for
/// the clocks of Redis (which dates the outbox's entries) and of the producers (which date
/// the records) differing.
const CLOCK_MARGIN_MS: i64 = 5 * 60_000;

/// How long input is held for the outbox to be published before a read-back; longer (Kafka
/// down), the partition takes input again and tries later.
const DRAIN_WAIT: Duration = Duration::from_secs(30);

/// How long one read-back of the output topic may take (it runs beside the partition's
/// work: a restore from long ago reads much of the topic).
const READ_TIMEOUT: Duration = Duration::from_secs(600);

/// Attempts one owner makes before it leaves the restatement (recorded) to the next owner or
/// a restart.
const ATTEMPTS: u32 = 5;

/// How often a pending restatement is looked at.
pub(super) const RESTATE_TICK: Duration = Duration::from_millis(200);

/// A restatement pending on a partition.
#[derive(Debug)]
pub(super) struct Restate {
    /// Read the output topic from this record time on (Unix ms).
    since_ms: i64,
    /// The highest sequence the partition published, as the claim knew it: the changes are
    /// numbered above it (a replay that reaches past forgotten history without falling back
    /// keeps the floor it had, and may have decided fewer changes than were published).
    published_sequence: u64,
    /// Whether Redis keeps it (meta `restate`).
    recorded: bool,
    /// Where it stands.
    phase: Phase,
    /// Not tried again before this (after a failure).
    not_before: Option<Instant>,
    /// Failed attempts.
    failures: u32,
}

/// Where a restatement stands.
#[derive(Debug)]
enum Phase {
    /// Not started (or to be tried again).
    Waiting,
    /// Input held since then, for the outbox to be published.
    Draining(Instant),
    /// The output topic being read beside the partition's work.
    Reading(Reading),
}

/// A read-back under way; dropped (the partition released, the runner gone), it is aborted.
#[derive(Debug)]
struct Reading {
    read: JoinHandle<Result<HashMap<String, Told>, String>>,
    abort: Arc<AtomicBool>,
    /// Customers with a change committed since the read began: their last change names the
    /// tier they are in, whatever the read finds.
    touched: HashSet<String>,
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.abort.store(true, Ordering::Relaxed);
    }
}

impl Restate {
    /// The restatement a claimed partition owes: one an earlier owner recorded, or one its
    /// replay makes necessary (`inexact`: it falls back to the running rules after Redis lost
    /// writes); both read from the earlier of their times.
    pub(super) fn after_claim(claim: &Claim, inexact: bool) -> Option<Self> {
        let replaying = claim
            .replay_through
            .is_some_and(|through| through > claim.next_offset.unwrap_or(-1));
        // Redis found behind at this claim (its lost writes may be sweeps alone, at the
        // restored offset), or a replay an earlier claim began going on.
        let lost = (inexact && (claim.outbox_behind || replaying)).then(|| {
            claim
                .restored_outbox_ms
                .unwrap_or(0)
                .saturating_sub(CLOCK_MARGIN_MS)
                .max(0)
        });
        let since_ms = match (lost, claim.restate_since) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(Self {
            since_ms,
            published_sequence: claim.published_sequence,
            recorded: claim.restate_since == Some(since_ms),
            phase: Phase::Waiting,
            not_before: None,
            failures: 0,
        })
    }

    /// Whether input (and timers) wait: the outbox is being published for a read-back.
    pub(super) fn holds_input(&self) -> bool {
        matches!(self.phase, Phase::Draining(_))
    }

    /// Notes the customers a commit published a change (or an erasure) of, while a read is
    /// under way.
    pub(super) fn committed(&mut self, outbox: &[OutboxEntry]) {
        if let Phase::Reading(reading) = &mut self.phase {
            for e in outbox {
                if matches!(e.kind, EntryKind::Change | EntryKind::Erased) {
                    reading
                        .touched
                        .insert(String::from_utf8_lossy(&e.key).into_owned());
                }
            }
        }
    }
}

impl Runner {
    /// Whether the partition is where a restatement can be decided: the replay is through the
    /// published input (or the log ends first) and no rules sweep is pending or running, so
    /// every customer is in the running rules' tier.
    fn restate_due(&self) -> bool {
        matches!(self.sweep, SweepState::Done)
            && self.replay_chain.is_empty()
            && self.replay_rules.is_none()
            && (self
                .replay_through
                .is_none_or(|through| self.next_offset() >= through)
                || self.status.caught_up())
    }

    /// Records a restatement decided at the claim in the partition's meta hash, before the
    /// replay commits anything (the next claim may not find Redis behind any more).
    pub(super) async fn record_restate(&mut self) -> Result<(), ApplyError> {
        if let Some(r) = self.restate.as_mut().filter(|r| !r.recorded) {
            let since = r.since_ms;
            r.recorded = true;
            self.store.set_restate(Some(since)).await?;
        }
        Ok(())
    }

    /// Moves a pending restatement on: once it is due, holds input until the outbox is
    /// published, then reads the output topic back beside the partition's work, and once the
    /// read is done commits the changes. `batches` is only looked at: a partition being
    /// released is not held.
    pub(super) async fn restate_step(
        &mut self,
        batches: &mpsc::Receiver<Batch>,
    ) -> Result<(), ApplyError> {
        let Some(mut r) = self.restate.take() else {
            return Ok(());
        };
        let result = self.restate_with(&mut r, batches).await;
        if !matches!(result, Ok(true)) {
            self.restate = Some(r);
        }
        result.map(|_| ())
    }

    /// [`Self::restate_step`] on `r`; `Ok(true)` once it is done.
    async fn restate_with(
        &mut self,
        r: &mut Restate,
        batches: &mpsc::Receiver<Batch>,
    ) -> Result<bool, ApplyError> {
        match &r.phase {
            Phase::Waiting => {
                // Not while the partition is being released, nor while the outbox is blocked
                // (the publisher reports why) or after this owner's last attempt.
                if !batches.is_closed()
                    && r.failures < ATTEMPTS
                    && r.not_before.is_none_or(|t| Instant::now() >= t)
                    && self.status.publishing.problem().is_none()
                    && self.restate_due()
                {
                    r.phase = Phase::Draining(Instant::now());
                }
                Ok(false)
            }
            Phase::Draining(since) => {
                if batches.is_closed() {
                    r.phase = Phase::Waiting;
                    return Ok(false);
                }
                // Everything this partition decided is on the output topic before the read.
                if self.store.outbox_len().await? > 0 {
                    if since.elapsed() >= DRAIN_WAIT {
                        self.restate_failed(r, "the outbox was not published within 30 s");
                    }
                    return Ok(false);
                }
                tracing::info!(
                    partition = self.partition,
                    since_ms = r.since_ms,
                    "Reading back the output topic (every partition, to its end when the read \
                     begins) for the tier last published to each customer."
                );
                let abort = Arc::new(AtomicBool::new(false));
                let (positions, stop, since_ms) =
                    (Arc::clone(&self.positions), Arc::clone(&abort), r.since_ms);
                let read = tokio::task::spawn_blocking(move || {
                    // Fault injection for the tests (`--features failpoints`).
                    fail::fail_point!("restate-read", |_| Err("injected".to_owned()));
                    positions.last_told(since_ms, Instant::now() + READ_TIMEOUT, &stop)
                });
                r.phase = Phase::Reading(Reading {
                    read,
                    abort,
                    touched: HashSet::new(),
                });
                Ok(false)
            }
            Phase::Reading(reading) => {
                if !reading.read.is_finished() {
                    return Ok(false);
                }
                let Phase::Reading(mut reading) = std::mem::replace(&mut r.phase, Phase::Waiting)
                else {
                    unreachable!("matched above");
                };
                let touched = std::mem::take(&mut reading.touched);
                match (&mut reading.read).await {
                    Ok(Ok(told)) => {
                        self.restate_from(&told, &touched, r.published_sequence)
                            .await?;
                        Ok(true)
                    }
                    Ok(Err(error)) => {
                        self.restate_failed(r, &error);
                        Ok(false)
                    }
                    Err(join) => {
                        self.restate_failed(r, &join.to_string());
                        Ok(false)
                    }
                }
            }
        }
    }

    /// Tells each of the partition's customers in `told` (but those in `touched`, told since)
    /// whose last change names another tier the one they are in, a page of customers per
    /// commit, numbered above `published` (the highest sequence published as the claim knew
    /// it) and the partition's floor; then clears the record.
    async fn restate_from(
        &mut self,
        told: &HashMap<String, Told>,
        touched: &HashSet<String>,
        published: u64,
    ) -> Result<(), ApplyError> {
        // Every restated change gets a new id and a sequence above the customer's last one on
        // the topic, whatever the replay before it decided.
        self.seq_floor = self.seq_floor.max(published);
        let mut ids: Vec<&String> = told.keys().filter(|id| !touched.contains(*id)).collect();
        ids.sort_unstable();
        let page = usize::try_from(self.pipeline.sweep_page)
            .unwrap_or(usize::MAX)
            .max(1);
        let mut restated = 0u64;
        for chunk in ids.chunks(page) {
            let mut work = Working::default();
            self.load(chunk.iter().map(|id| (*id).clone()), &mut work)
                .await?;
            let mut draft = self.new_draft();
            let now = self.engine_now();
            for &id in chunk {
                let loaded = work.get_mut(id.as_str()).expect("loaded above");
                // Another partition's customer (or one erased here and on the topic alike).
                if loaded.state.is_new() {
                    continue;
                }
                let tier = told[id].tier.as_deref();
                let rules = self.rules();
                let Some(t) = loaded.state.restate(rules, tier, now, &self.cutoffs) else {
                    continue;
                };
                loaded.dirty = true;
                let outcome = Outcome {
                    transition: Some(t),
                    notice: None,
                };
                draft.record(&self.pipeline, rules, id, &mut loaded.state, &outcome, None);
                restated += 1;
            }
            if let Some(max) = draft.max_sequence {
                // Raised over these changes: if Redis loses this commit, the next claim finds
                // the published floor above its own and numbers every change above them (a
                // replay does not decide them again, and would reuse their ids).
                self.seq_floor = self.seq_floor.max(max);
                draft.seq_floor = self.seq_floor;
                self.commit(&mut draft, &mut work).await?;
            }
            // Other partitions' customers are not cached here.
            work.retain(|_, loaded| !loaded.state.is_new());
            self.keep(work);
        }
        self.store.set_restate(None).await?;
        events::TiersRestated {
            partition: self.partition,
            read: told.len(),
            restated,
        }
        .emit(&self.pipeline.telemetry);
        Ok(())
    }

    /// Reports a failed attempt; input flows again and the next attempt waits a while (after
    /// the last one this owner makes, the record waits for the next owner or a restart).
    fn restate_failed(&self, r: &mut Restate, error: &str) {
        r.failures += 1;
        r.phase = Phase::Waiting;
        let wait = Duration::from_secs(5 * u64::from(r.failures.min(12)));
        r.not_before = Some(Instant::now() + wait);
        events::RestateFailed {
            partition: self.partition,
            error,
            failures: r.failures,
            last: r.failures >= ATTEMPTS,
        }
        .emit(&self.pipeline.telemetry);
    }
}

#[cfg(test)]
mod tests {
    use super::super::sweep::tests::claim;
    use super::*;

    #[tokio::test]
    async fn a_read_under_way_notes_the_customers_told_since_and_is_aborted_when_dropped() {
        let mut r = Restate::after_claim(
            &Claim {
                restate_since: Some(1),
                ..claim(None, None)
            },
            false,
        )
        .unwrap();
        let entry = |kind: EntryKind, key: &str| OutboxEntry {
            kind,
            key: key.as_bytes().to_vec(),
            value: Vec::new(),
            headers: Vec::new(),
        };
        let outbox = [
            entry(EntryKind::Change, "a"),
            entry(EntryKind::AtRisk, "b"),
            entry(EntryKind::Erased, "c"),
            entry(EntryKind::DeadLetter, "d"),
        ];
        // Before the read, nothing is noted.
        r.committed(&outbox);
        let abort = Arc::new(AtomicBool::new(false));
        r.phase = Phase::Reading(Reading {
            read: tokio::task::spawn_blocking(|| Ok(HashMap::new())),
            abort: Arc::clone(&abort),
            touched: HashSet::new(),
        });
        r.committed(&outbox);
        let Phase::Reading(reading) = &r.phase else {
            unreachable!()
        };
        let mut touched: Vec<&str> = reading.touched.iter().map(String::as_str).collect();
        touched.sort_unstable();
        assert_eq!(
            touched,
            ["a", "c"],
            "changes and erasures, not notices or letters"
        );
        assert!(!r.holds_input());
        drop(r);
        assert!(abort.load(Ordering::Relaxed), "a dropped read is aborted");
    }

    #[test]
    fn only_a_replay_that_falls_back_after_lost_writes_or_a_recorded_one_restates() {
        // Redis lost writes (the outbox was behind), the replay reproduces them: nothing.
        assert!(Restate::after_claim(&claim(Some(150), None), false).is_none());
        // It falls back to the running rules: from the restored outbox's time, less the margin.
        let lost = Claim {
            restored_outbox_ms: Some(1_000_000_000),
            ..claim(Some(150), None)
        };
        let r = Restate::after_claim(&lost, true).expect("owed");
        assert_eq!(r.since_ms, 1_000_000_000 - CLOCK_MARGIN_MS);
        assert!(!r.recorded && !r.holds_input());
        assert!(matches!(r.phase, Phase::Waiting));
        // An outbox that never had an entry: from the start.
        let empty = Claim {
            restored_outbox_ms: Some(0),
            ..claim(Some(150), None)
        };
        assert_eq!(Restate::after_claim(&empty, true).unwrap().since_ms, 0);
        // Nothing lost (no replay): an inexact chain alone restates nothing.
        assert!(Restate::after_claim(&claim(None, None), true).is_none());
        // A replay going on after an earlier claim (not behind any more, its time kept).
        let again = Claim {
            outbox_behind: false,
            ..lost.clone()
        };
        let r = Restate::after_claim(&again, true).expect("owed");
        assert_eq!(r.since_ms, 1_000_000_000 - CLOCK_MARGIN_MS);
        // Through the published input, Redis not behind: nothing is replayed.
        let through = Claim {
            next_offset: Some(150),
            ..again.clone()
        };
        assert!(Restate::after_claim(&through, true).is_none());
        // Behind with nothing to replay but sweeps at the restored offset: owed.
        let sweeps_only = Claim {
            next_offset: Some(150),
            ..lost.clone()
        };
        assert!(Restate::after_claim(&sweeps_only, true).is_some());
        // One an earlier owner recorded is taken up, already recorded.
        let recorded = Claim {
            restate_since: Some(7),
            ..claim(None, None)
        };
        let r = Restate::after_claim(&recorded, false).unwrap();
        assert_eq!((r.since_ms, r.recorded), (7, true));
        // Both: the earlier time, recorded again if it is the new one.
        let both = Claim {
            restate_since: Some(1_000_000_000),
            ..lost
        };
        let r = Restate::after_claim(&both, true).unwrap();
        assert_eq!(
            (r.since_ms, r.recorded),
            (1_000_000_000 - CLOCK_MARGIN_MS, false)
        );
    }
}
