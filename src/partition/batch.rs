//! Trigger: a batch of input messages. Each is decoded (or dead-lettered with its reason) and
//! applied to its customer's state; the batch becomes one commit together with the partition's
//! new position. In `event` mode, timers due before an event's engine time fire first.

use super::draft::{Draft, Working};
use super::runner::{Batch, Runner};
use crate::config::ClockMode;
use crate::engine::{Applied, MAX_EXACT_TOTAL};
use crate::ingest::dead_letter::{self, Source};
use crate::ingest::decode::{self, Reason, Rejection};
use crate::model::change::Cause;
use crate::model::event::EventKind;
use crate::model::state::origin_of;
use crate::model::{time, Event};
use crate::store::partition::ApplyError;
use crate::telemetry::events;
use std::sync::Arc;
use std::time::Instant;

impl Runner {
    /// Applies one batch of consecutive messages.
    pub(super) async fn apply_batch(&mut self, messages: Batch) -> Result<(), ApplyError> {
        let started = Instant::now();
        let p = Arc::clone(&self.pipeline);
        let first_offset = messages[0].offset();
        let expected = self.next_offset();
        if expected >= 0 && first_offset > expected {
            events::OffsetGap {
                partition: self.partition,
                expected,
                first_offset,
            }
            .emit(&p.telemetry);
        }

        let wall_now = time::now_ms();
        let decoded: Vec<Result<Event, Rejection>> = messages
            .iter()
            .map(|m| {
                // The reference `occurred_at` may not run ahead of: the message timestamp (so
                // replays decide alike), but never later than this instance's clock — the
                // producer sets both timestamps, and one record dated 2100 must not move a
                // customer's (or, in event mode, the partition's) clock for good.
                let reference = m
                    .timestamp()
                    .to_millis()
                    .map_or(wall_now, |t| t.min(wall_now));
                decode::decode(m.key(), m.payload(), reference, &p.limits)
            })
            .collect();

        let mut work = Working::default();
        let ids: Vec<String> = decoded
            .iter()
            .flatten()
            .map(|e| e.customer_id.clone())
            .collect();
        self.load(ids, &mut work).await?;

        let event_mode = p.clock.mode == ClockMode::Event;
        let cutoffs = Arc::clone(&self.cutoffs);
        let lateness = p.clock.lateness_ms;
        let mut draft = Draft::at(first_offset, self.seq_floor);
        for (message, decoded) in messages.iter().zip(&decoded) {
            if let (true, Ok(event)) = (event_mode, decoded) {
                let t = event.occurred_at_ms.saturating_sub(lateness);
                if self.clock.is_none_or(|c| t > c) {
                    if self.earliest_due.is_due(t) && !self.sweep.holds_timers() {
                        // Timers due before this event's engine time fire first (a rules
                        // sweep under way holds them until it completes).
                        if draft.messages > 0 {
                            self.commit(&mut draft, &mut work).await?;
                            draft = Draft::at(message.offset(), self.seq_floor);
                        }
                        self.fire_due(t, &mut work, None).await?;
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
            draft.leader_epoch = message.leader_epoch;
            let rejection = match decoded {
                Err(rejection) => Some(rejection.clone()),
                Ok(event) => {
                    let loaded = work
                        .get_mut(event.customer_id.as_str())
                        .expect("loaded above");
                    // During a rules sweep: moved to the new rules first, as a page would have
                    // (not for an erasure: nothing of the customer may be published after it).
                    if event.kind != EventKind::Erase {
                        self.sweep_first(&mut draft, &event.customer_id, loaded);
                    }
                    let fresh = loaded.state.is_new();
                    match loaded.state.apply(event, self.rules(), p.dedup, now, &cutoffs) {
                        Applied::Counted(outcome) => {
                            if fresh {
                                // A new incarnation: its change ids are its own.
                                loaded.state.origin =
                                    Some(origin_of(&event.event_id, message.offset()));
                                loaded.state.born = Some(event.occurred_at_ms);
                            }
                            loaded.dirty = true;
                            draft.applied += 1;
                            if let Some((due, _)) = loaded.state.timer {
                                self.earliest_due.lower(due);
                            }
                            if outcome.transition.is_some() || outcome.notice.is_some() {
                                let cause = Cause {
                                    event_id: event.event_id.clone(),
                                    topic: p.input_topic.clone(),
                                    partition: self.partition,
                                    offset: message.offset(),
                                };
                                draft.record(
                                    &p,
                                    self.rules(),
                                    &event.customer_id,
                                    &mut loaded.state,
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
                        Applied::Erased { tier, existed } => {
                            draft.applied += 1;
                            if existed {
                                // The commit deletes the state and its index entries; the
                                // tombstone tells consumers (and compaction) they are gone.
                                loaded.dirty = true;
                                draft.erase(&event.customer_id, tier);
                            }
                            None
                        }
                        Applied::BeyondExactRange {
                            total_minor,
                            total,
                            points: false,
                        } => Some(Rejection {
                            reason: Reason::AmountOutOfRange,
                            detail: format!(
                                "field `amount`: the customer's lifetime {total} would reach {total_minor} minor units, above {MAX_EXACT_TOTAL} (2^53 - 1), the most ranks order exactly"
                            ),
                        }),
                        Applied::BeyondExactRange {
                            total_minor,
                            total,
                            points: true,
                        } => Some(Rejection {
                            reason: Reason::PointsOutOfRange,
                            detail: format!(
                                "field `points`: the customer's lifetime {total} would reach {total_minor}, above {MAX_EXACT_TOTAL} (2^53 - 1), the most ranks order exactly"
                            ),
                        }),
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
                let source = Source {
                    topic: &p.input_topic,
                    partition: self.partition,
                    offset: message.offset(),
                    timestamp_ms: message.timestamp().to_millis(),
                };
                draft.outbox.push(dead_letter::entry(
                    source,
                    message.key(),
                    message.payload(),
                    &rejection,
                    p.dead_letter_max_bytes,
                ));
                draft.rejected.push(rejection.reason.as_str());
            }
        }
        self.commit(&mut draft, &mut work).await?;
        self.keep(work);
        let latest = messages
            .iter()
            .filter_map(|m| m.timestamp().to_millis())
            .max()
            .map(|t| t.min(wall_now));
        self.applied_until = self.applied_until.max(latest);
        events::BatchApplied {
            partition: self.label(),
            messages: messages.len(),
            seconds: started.elapsed().as_secs_f64(),
        }
        .emit(&p.telemetry);
        Ok(())
    }
}
