//! Trigger: due timers. A customer whose tier may change without an event (recency, window
//! expiry, validity, grace, minimum stay, pins, at-risk notices) has one entry in the
//! partition's timer index; firing evaluates them at their own due time, so the result does
//! not depend on when the timer is fired.

use super::draft::Working;
use super::runner::Runner;
use crate::engine::Trigger;
use crate::store::outbox::{EntryKind, OutboxEntry, TimerPass};
use crate::store::partition::{ApplyError, SortedSet};
use crate::telemetry::events;
use std::sync::Arc;

/// What the runner knows of the earliest due time in the partition's timer index: a lower
/// bound, so that checking whether anything is due needs no Redis call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarliestDue {
    /// Not known yet (a new owner): anything may be due.
    Unknown,
    /// The index is empty.
    Empty,
    /// Nothing is due before this time.
    From(i64),
}

impl From<Option<i64>> for EarliestDue {
    fn from(due: Option<i64>) -> Self {
        due.map_or(Self::Empty, Self::From)
    }
}

impl EarliestDue {
    /// Whether a timer may be due at or before `upto`.
    pub fn is_due(self, upto: i64) -> bool {
        match self {
            Self::Unknown => true,
            Self::Empty => false,
            Self::From(due) => due <= upto,
        }
    }

    /// Takes a newly set timer into account.
    pub fn lower(&mut self, due: i64) {
        *self = match *self {
            Self::Unknown => Self::Unknown,
            Self::Empty => Self::From(due),
            Self::From(d) => Self::From(d.min(due)),
        };
    }
}

impl Runner {
    /// Fires every timer due at or before `upto`, in chunks of `clock.timer_batch` per commit.
    /// A wall-clock `pass` is recorded with the first commit (an outbox entry the publisher
    /// keeps in the published position), if anything was due.
    pub(super) async fn fire_due(
        &mut self,
        upto: i64,
        work: &mut Working,
        mut pass: Option<TimerPass>,
    ) -> Result<(), ApplyError> {
        if !self.earliest_due.is_due(upto) {
            return Ok(());
        }
        let p = Arc::clone(&self.pipeline);
        loop {
            let due = self.store.due_timers(upto, p.clock.timer_batch).await?;
            if due.is_empty() {
                break;
            }
            self.load(due.iter().map(|(id, _)| id.clone()), work)
                .await?;
            let mut draft = self.new_draft();
            if let Some(pass) = pass.take() {
                draft.outbox.push(OutboxEntry {
                    kind: EntryKind::TimerPass,
                    key: Vec::new(),
                    value: serde_json::to_vec(&pass).expect("timer passes serialize"),
                    headers: Vec::new(),
                });
            }
            for (id, at) in &due {
                let loaded = work.get_mut(id.as_str()).expect("loaded above");
                loaded.dirty = true;
                if self.sweep_first(&mut draft, id, loaded)
                    && loaded.state.timer.is_none_or(|(d, _)| d != *at)
                {
                    // Moved to the new rules first, which set another timer (or none): the
                    // commit re-indexes it.
                    continue;
                }
                match loaded.state.timer {
                    Some((d, cause)) if d == *at => {
                        let rules = self.rules();
                        let outcome =
                            loaded
                                .state
                                .evaluate(rules, d, Trigger::Time(cause), &self.cutoffs);
                        events::TimerFired {
                            cause: cause.as_str(),
                        }
                        .emit(&p.telemetry);
                        draft.record(&p, rules, id, &mut loaded.state, &outcome, None);
                    }
                    // The index disagrees with the state (manual edits, a deleted state):
                    // re-index the state's real timer, or drop the entry.
                    other => {
                        events::TimerOutOfStep {
                            partition: self.partition,
                            customer: id,
                            indexed: *at,
                            state: &other,
                        }
                        .emit(&p.telemetry);
                        loaded.indexed = Some(*at);
                        if loaded.state.is_new() {
                            // No stored customer: remove the entry, write no state.
                            loaded.dirty = false;
                            draft.orphans.push((SortedSet::Timers, id.clone()));
                        }
                    }
                }
            }
            self.commit(&mut draft, work).await?;
        }
        self.earliest_due = EarliestDue::from(self.store.earliest_timer().await?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::EarliestDue;

    #[test]
    fn the_bound_only_moves_down_once_known() {
        let mut e = EarliestDue::Unknown;
        e.lower(5);
        assert_eq!(e, EarliestDue::Unknown);
        assert!(e.is_due(i64::MIN));
        let mut e = EarliestDue::from(None);
        assert!(!e.is_due(i64::MAX));
        e.lower(9);
        e.lower(7);
        e.lower(8);
        assert_eq!(e, EarliestDue::From(7));
        assert!(e.is_due(7) && !e.is_due(6));
    }
}
