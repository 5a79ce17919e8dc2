//! Trigger: a new rules version. The partition's customers last evaluated under another
//! version are re-evaluated a page at a time (`rules.sweep_per_second`), one commit per page.
//! Restartable: customers already evaluated under this version are skipped, so a crash
//! mid-sweep neither loses nor repeats a change; the completed sweep is recorded in the
//! partition's meta so a restart does not scan again.
//!
//! Reproducible: every customer is re-evaluated at one engine time, the sweep's start
//! ([`RulesSweep`], recorded with the first commit after it and resumed by every later owner
//! and replay), and a customer still under another version is re-evaluated before anything
//! else touches them — an event, a timer, a re-ranking — if no page reached them yet. So each
//! sweep change is the same whichever comes first, and a replay after Redis lost writes
//! publishes it again with the same body.

use super::draft::{Draft, Loaded, Working};
use super::runner::Runner;
use crate::config::ClockMode;
use crate::engine::Trigger;
use crate::store::outbox::{EntryKind, OutboxEntry, RulesSweep};
use crate::store::partition::{ApplyError, Claim};
use crate::store::scan::ScanCursor;
use crate::telemetry::events;
use std::sync::Arc;

/// A rules sweep under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Where the scan of the partition's customers stands.
    pub cursor: ScanCursor,
    /// The input offset it started at.
    pub offset: i64,
    /// The engine time every customer is re-evaluated at.
    pub at: i64,
    /// The hash of the rules version it moves customers to (the running one).
    pub rules: u32,
    /// The hash of the rules version it moves customers from (see [`RulesSweep::from`]).
    pub from: Option<u32>,
    /// The start to record with this owner's next commit (a sweep this owner started).
    pub record: Option<RulesSweep>,
    /// A replay: the input offset the sweep first completed at, where it completes again.
    pub done: Option<i64>,
}

/// Where a partition stands with the running rules version's sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepState {
    /// Done (or nothing to sweep).
    Done,
    /// Under way. Timers wait meanwhile: pages set new timers, and which timer pass fires
    /// them must not depend on how far the pages got.
    Running(Sweep),
    /// A replay after Redis lost writes: the recorded sweep starts again when the input
    /// reaches its offset.
    Pending(RulesSweep),
}

impl SweepState {
    /// The state a claim leaves the partition in, for rules version hash `rules` and engine
    /// time `now` (a sweep started now is recorded at the claimed offset), and whether the
    /// sweep is to start afresh once a replay reaches it ([`Runner::resume_pending_sweep`]).
    pub fn after_claim(claim: &Claim, rules: u32, now: i64) -> (Self, bool) {
        if claim.swept_rules == Some(rules) {
            return (Self::Done, false);
        }
        let of_rules = |s: Option<RulesSweep>| s.filter(|s| s.rules == rules);
        let next_offset = claim.next_offset.unwrap_or(-1);
        match of_rules(claim.published_sweep).or(of_rules(claim.sweep)) {
            Some(recorded) if recorded.offset > next_offset => (Self::Pending(recorded), false),
            // Recorded right at the restored offset, moving customers from rules the restored
            // partition had not completed (two versions took over one after the other with no
            // input between them, and Redis lost the first one's sweep): the replay goes
            // through the sweeps in between first, as the first run did.
            Some(recorded)
                if recorded.offset == next_offset
                    && claim.sweep.is_none_or(|s| s.rules != rules)
                    && recorded.from.is_some_and(|f| Some(f) != claim.swept_rules) =>
            {
                (Self::Pending(recorded), false)
            }
            Some(recorded) => (
                Self::Running(Sweep::resumed(not_before_through(
                    recorded,
                    next_offset,
                    claim.replay_through,
                ))),
                false,
            ),
            None => match claim
                .replay_through
                .filter(|&through| through > next_offset)
            {
                // Redis lost writes whose changes were published, none of them under these
                // rules (a sweep's start is committed with its first changes and published
                // ahead of them): they ran under the rules of the latest sweep published if it
                // had completed (if not, the replay chain finds it unfinished and falls back,
                // see `Self::started`), and the replay applies their input under those. This
                // sweep starts where the published changes end, as if it had been claimed
                // there. A position without any sweep (written by an older binary) says
                // nothing of the rules: started now.
                Some(through) if claim.published_sweep.is_some() => (
                    Self::Pending(RulesSweep {
                        offset: through,
                        at: now,
                        rules,
                        from: claim
                            .published_sweep
                            .filter(|s| s.done.is_some())
                            .map(|s| s.rules)
                            .or(claim.swept_rules),
                        done: None,
                    }),
                    true,
                ),
                _ => (Self::started(claim, rules, now), false),
            },
        }
    }

    /// The sweep of rules version hash `rules` started now, at the claimed offset, at engine
    /// time `now` (recorded with the next commit). Also the fallback of a replay that cannot
    /// reproduce the rules the published changes ran under: the running rules replay the input
    /// from the claimed offset.
    pub fn started(claim: &Claim, rules: u32, now: i64) -> Self {
        let start = RulesSweep {
            offset: claim.next_offset.unwrap_or(-1),
            at: now,
            rules,
            from: claim.swept_rules,
            done: None,
        };
        Self::Running(Sweep {
            record: Some(start),
            ..Sweep::resumed(start)
        })
    }

    /// Whether timers wait for the sweep.
    pub fn holds_timers(&self) -> bool {
        matches!(self, Self::Running(_))
    }

    /// The input offset a replayed sweep completes at, if it is running.
    pub fn completes_at(&self) -> Option<i64> {
        match self {
            Self::Running(sweep) => sweep.done,
            _ => None,
        }
    }
}

/// A recorded sweep going on from input offset `from`, with the offset it completes at no
/// earlier than `through`, the input the published changes reach, when its completion was not
/// published and `from` is below it (a replay: Redis lost writes): the publisher publishes the
/// outbox in order, so that completion came at or after `through` (and the timers it held
/// stayed held up to there). Outside a replay (`through` at or below `from`, as after any
/// handover) nothing is held: the sweep goes on paced.
pub(super) fn not_before_through(
    recorded: RulesSweep,
    from: i64,
    through: Option<i64>,
) -> RulesSweep {
    RulesSweep {
        done: recorded.done.or(through.filter(|&t| t > from)),
        ..recorded
    }
}

impl Sweep {
    /// A recorded sweep, going on from its first page.
    pub(super) fn resumed(recorded: RulesSweep) -> Self {
        Self {
            cursor: ScanCursor::start(),
            offset: recorded.offset,
            at: recorded.at,
            rules: recorded.rules,
            from: recorded.from,
            record: None,
            done: recorded.done,
        }
    }
}

impl Runner {
    /// The sweep under way, if it may re-evaluate customers now: under rank-based rules it
    /// waits for cut-offs of the running rules, so it does not place everyone with no
    /// cut-offs first.
    pub(super) fn sweep_running(&self) -> Option<Sweep> {
        let SweepState::Running(sweep) = self.sweep else {
            return None;
        };
        (!self.rules().uses_ranks() || self.cutoffs.rules == sweep.rules).then_some(sweep)
    }

    /// During a sweep, re-evaluates a stored customer still under another rules version at
    /// the sweep's time, before a trigger touches them. Returns whether it did.
    pub(super) fn sweep_first(&self, draft: &mut Draft, id: &str, loaded: &mut Loaded) -> bool {
        let Some(sweep) = self.sweep_running() else {
            return false;
        };
        if loaded.state.is_new() || loaded.state.rules_hash == sweep.rules {
            return false;
        }
        self.reevaluate_at(draft, id, loaded, Trigger::RulesChanged, sweep.at);
        self.pipeline.telemetry.rules_sweep_customers.inc();
        true
    }

    /// The sweep's start to commit with the next commit, if this owner started it: the
    /// commit script keeps it in the meta, the publisher in the published position.
    pub(super) fn take_sweep_record(&mut self) -> Option<OutboxEntry> {
        let SweepState::Running(sweep) = &mut self.sweep else {
            return None;
        };
        sweep.record.take().map(sweep_entry)
    }

    /// A replay reached the offset a recorded sweep started at: it starts again, at its time.
    /// The running rules' sweep if no published change recorded it (`sweep_afresh`) starts
    /// here for the first time, at the engine time now, and is recorded with the next commit.
    pub(super) fn resume_pending_sweep(&mut self) {
        if let SweepState::Pending(recorded) = self.sweep {
            // The sweep's rules take over here, as they did the first time.
            self.replay_rules = self
                .replay_chain
                .front()
                .and_then(|(_, rules)| rules.clone());
            if self.sweep_afresh && self.replay_chain.len() <= 1 {
                self.sweep_afresh = false;
                let start = RulesSweep {
                    at: Self::engine_time(self.pipeline.clock.mode, self.clock),
                    ..recorded
                };
                self.sweep = SweepState::Running(Sweep {
                    record: Some(start),
                    ..Sweep::resumed(start)
                });
                return;
            }
            events::SweepResumed {
                partition: self.partition,
                offset: recorded.offset,
                at: recorded.at,
            }
            .emit(&self.pipeline.telemetry);
            self.sweep = SweepState::Running(Sweep::resumed(not_before_through(
                recorded,
                recorded.offset,
                self.replay_through,
            )));
        }
    }

    /// A replay reached the offset the sweep first completed at: its remaining pages run now,
    /// unpaced, so timers fire after it as they first did. If it cannot run (rank-based rules
    /// still without the new rules' cut-offs) it goes on paced.
    pub(super) async fn finish_sweep(&mut self) -> Result<(), ApplyError> {
        // Its completion is due now (see `sweep_step`).
        if let SweepState::Running(sweep) = &mut self.sweep {
            sweep.done = None;
        }
        while self.sweep_running().is_some() {
            self.sweep_step().await?;
        }
        Ok(())
    }

    /// Re-evaluates the next page of the sweep, if one is under way.
    pub(super) async fn sweep_step(&mut self) -> Result<(), ApplyError> {
        let Some(sweep) = self.sweep_running() else {
            return Ok(());
        };
        let p = Arc::clone(&self.pipeline);
        let (next, ids) = self
            .store
            .scan_customer_ids(&sweep.cursor, p.sweep_page)
            .await?;
        let mut work = Working::default();
        self.load(ids.iter().cloned(), &mut work).await?;
        let hash = sweep.rules;
        let mut draft = self.new_draft();
        let mut swept = 0u64;
        for id in &ids {
            let loaded = work.get_mut(id.as_str()).expect("loaded above");
            if loaded.state.is_new() || loaded.state.rules_hash == hash {
                continue;
            }
            self.reevaluate_at(&mut draft, id, loaded, Trigger::RulesChanged, sweep.at);
            swept += 1;
        }
        // A replayed sweep completes where it first completed (or, that unpublished, not
        // before the input the published changes reach), not before: its paced pages may run
        // ahead of the input being replayed, and its completion releases the held timers and
        // (finishing a previous version's sweep first) starts the next sweep. Until the input
        // gets there its pages go round again (finding no one) and `finish_sweep` completes
        // it; so does reaching the log's end below that offset (a truncated log).
        let done = next.is_none()
            && sweep
                .done
                .is_none_or(|at| self.next_offset() >= at || self.status.caught_up());
        if done {
            draft.swept_rules = Some(hash);
            draft.outbox.push(sweep_entry(RulesSweep {
                offset: sweep.offset,
                at: sweep.at,
                rules: hash,
                from: sweep.from,
                done: Some(self.next_offset()),
            }));
        }
        if swept > 0 || done {
            self.commit(&mut draft, &mut work).await?;
        }
        self.keep(work);
        if let SweepState::Running(s) = &mut self.sweep {
            s.cursor = next.unwrap_or_default();
        }
        // The running rules' sweep (not one replayed on the way to it).
        let completed =
            (done && self.replay_rules.is_none()).then(|| self.rules().version().to_owned());
        if completed.is_some() {
            self.sweep_done.count();
        }
        events::RulesSwept {
            partition: self.partition,
            customers: swept,
            completed,
        }
        .emit(&p.telemetry);
        if done {
            // In a replay over several rules changes the next recorded sweep is pending now;
            // its rules take over where it first started.
            self.replay_chain.pop_front();
            self.sweep = match self.replay_chain.front() {
                Some((next, _)) => SweepState::Pending(*next),
                None => SweepState::Done,
            };
            // Fault injection for the tests (`--features failpoints`): a moment between the
            // completion's commit and the held timers'.
            fail::fail_point!("sweep-completed");
            // The timers that waited for the sweep: in `event` mode those due by the
            // partition's clock fire now (an owner claiming the partition right after the
            // completion's commit fires them first, see `Runner::fire_held_timers`); in
            // `wall` mode the next tick fires them.
            if let (ClockMode::Event, Some(clock)) = (p.clock.mode, self.clock) {
                let mut work = Working::default();
                self.fire_due(clock, &mut work, None).await?;
                self.keep(work);
            }
            if std::mem::take(&mut self.finish_predecessor) {
                // The previous version's sweep completed: the running version's starts here.
                let at = self.next_offset();
                if let SweepState::Pending(next) = &mut self.sweep {
                    next.offset = at;
                }
                self.resume_pending_sweep();
            }
        }
        Ok(())
    }
}

/// A sweep record as an outbox entry (never produced: see [`EntryKind::RulesSweep`]).
fn sweep_entry(record: RulesSweep) -> OutboxEntry {
    OutboxEntry {
        kind: EntryKind::RulesSweep,
        key: Vec::new(),
        value: serde_json::to_vec(&record).expect("sweeps serialize"),
        headers: Vec::new(),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A claim restored at offset 100 under rules 1, the published changes reaching `through`
    /// with `published` the latest sweep they record.
    pub(in crate::partition) fn claim(
        through: Option<i64>,
        published: Option<RulesSweep>,
    ) -> Claim {
        Claim {
            epoch: 2,
            next_offset: Some(100),
            offset_epoch: None,
            commits: 10,
            clock: None,
            swept_rules: Some(1),
            cutoffs: None,
            outbox_behind: through.is_some(),
            restored_outbox_ms: through.map(|_| 0),
            restate_since: None,
            beyond_history: false,
            parked_again: 0,
            replay_cutoffs: Vec::new(),
            replay_passes: Vec::new(),
            replay_passes_from: None,
            replay_through: through,
            sweep: None,
            published_sweep: published,
            published_earlier_sweeps: Vec::new(),
            prior_rules: None,
            seq_floor: 0,
            published_sequence: 0,
            published_floor: 0,
        }
    }

    pub(in crate::partition) fn sweep(offset: i64, rules: u32, done: Option<i64>) -> RulesSweep {
        RulesSweep {
            offset,
            at: 5,
            rules,
            from: Some(0),
            done,
        }
    }

    fn started_at(offset: i64, from: Option<u32>) -> SweepState {
        let start = RulesSweep {
            offset,
            at: 9,
            rules: 3,
            from,
            done: None,
        };
        SweepState::Running(Sweep {
            record: Some(start),
            ..Sweep::resumed(start)
        })
    }

    #[test]
    fn a_resumed_sweep_is_held_to_the_published_input_only_in_a_replay() {
        let resumed = |through| {
            let mut c = claim(through, Some(sweep(50, 3, None)));
            c.sweep = Some(sweep(50, 3, None));
            SweepState::after_claim(&c, 3, 9).0.completes_at()
        };
        // A handover mid-sweep (the published changes reach no further than the claimed
        // offset, 100): the sweep goes on paced, not completed at once.
        assert_eq!(resumed(Some(80)), None);
        assert_eq!(resumed(Some(100)), None);
        assert_eq!(resumed(None), None);
        // A replay (Redis lost writes the published changes reach up to 150), the completion
        // unpublished: it first completed at 150 or after.
        assert_eq!(resumed(Some(150)), Some(150));
    }

    #[test]
    fn without_a_replay_a_new_version_sweeps_from_the_claimed_offset() {
        assert_eq!(
            SweepState::after_claim(&claim(None, Some(sweep(50, 1, Some(60)))), 3, 9),
            (started_at(100, Some(1)), false)
        );
    }

    #[test]
    fn a_version_no_published_change_ran_under_starts_where_the_published_changes_end() {
        // The published changes reach offset 150 under rules 2, whose sweep completed.
        let (state, afresh) =
            SweepState::after_claim(&claim(Some(150), Some(sweep(120, 2, Some(130)))), 3, 9);
        assert!(afresh);
        assert_eq!(
            state,
            SweepState::Pending(RulesSweep {
                offset: 150,
                at: 9,
                rules: 3,
                from: Some(2),
                done: None,
            })
        );
        // Rules 2's sweep unfinished as far as published: its own rules are not inferred
        // (the replay chain finds it unfinished and falls back).
        let (state, _) =
            SweepState::after_claim(&claim(Some(150), Some(sweep(120, 2, None))), 3, 9);
        assert!(matches!(state, SweepState::Pending(s) if s.from == Some(1)));
        // A position without any sweep (an older binary): started now, as before.
        assert_eq!(
            SweepState::after_claim(&claim(Some(150), None), 3, 9),
            (started_at(100, Some(1)), false)
        );
    }

    #[test]
    fn a_recorded_sweep_of_the_running_rules_is_resumed_where_it_started() {
        let (state, afresh) =
            SweepState::after_claim(&claim(Some(150), Some(sweep(120, 3, None))), 3, 9);
        assert_eq!(
            (state, afresh),
            (SweepState::Pending(sweep(120, 3, None)), false)
        );
        let mut done = claim(Some(150), None);
        done.swept_rules = Some(3);
        assert_eq!(
            SweepState::after_claim(&done, 3, 9),
            (SweepState::Done, false)
        );
    }
}
