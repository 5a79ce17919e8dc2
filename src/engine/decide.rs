//! Tier policy: where an evaluation places a customer (the rules' target, then upgrade,
//! stay, validity and review periods, minimum stay, grace, step/replace/base downgrades and
//! manual pins), when time alone could next move them, and whether an at-risk notice is due.

use super::rules::policy::{Downgrade, Review};
use super::rules::rank::Cutoffs;
use super::rules::Rules;
use super::transition::{Notice, Transition, Trigger};
use crate::model::change::{ChangeReason, Direction};
use crate::model::state::{CustomerState, PinMode, TimeCause};

impl CustomerState {
    #[allow(clippy::too_many_lines)]
    pub(super) fn decide(
        &mut self,
        rules: &Rules,
        now: i64,
        trigger: Trigger,
        cutoffs: &Cutoffs,
    ) -> Option<Transition> {
        // The first evaluation under a new rules version reports its change as `rules_changed`.
        let new_rules = self.tier.is_some() && self.rules_hash != rules.version_hash();
        self.rules_hash = rules.version_hash();
        let last_tier = rules.tiers().len() - 1;
        let cur = self.tier.as_deref().and_then(|t| rules.tier_index(t));
        let reviewing = cur.is_some() && self.review.is_some_and(|r| r <= now);
        let eval_at = match (cur, self.review) {
            (Some(c), Some(r)) if reviewing && rules.policy(c).review.judges_closing_period() => {
                r - 1
            }
            _ => now,
        };
        // Drop buckets no window can read any more — as of the moment the metrics are read
        // (a calendar review reads the closing period, before `now`).
        self.prune(rules, eval_at);
        let eval = rules.evaluate(&self.facts(), eval_at, cutoffs);
        self.cutoffs_version = eval.cutoffs_version;
        self.ranked_values.clone_from(&eval.ranks);
        let target = eval.tier;
        let mut policy_text = "initial".to_owned();
        let mut rule_tier = target;
        let mut new = match cur {
            None => target,
            Some(c) if target < c => {
                policy_text = "upgrade".into();
                self.pending = None;
                target
            }
            Some(c) if target == c || rules.stays(c, &eval) => {
                self.pending = None;
                if reviewing
                    || (self.review.is_none() && rules.policy(c).review != Review::Continuous)
                {
                    self.review = rules
                        .policy(c)
                        .review
                        .next(rules.calendar(), now, self.first);
                }
                c
            }
            Some(c) => {
                let p = rules.policy(c);
                policy_text.clone_from(&p.text);
                if self.review.is_some_and(|r| r > now)
                    || self.since.saturating_add(p.min_stay_ms) > now
                {
                    c
                } else if p.grace_ms > 0
                    && self
                        .pending
                        .is_none_or(|since| since.saturating_add(p.grace_ms) > now)
                {
                    self.pending.get_or_insert(now);
                    c
                } else {
                    self.pending = None;
                    let to = match p.downgrade {
                        Downgrade::Replace => target,
                        Downgrade::Step => c + 1,
                        Downgrade::Base => last_tier,
                    };
                    rule_tier = to;
                    to
                }
            }
        };
        // A manual pin overrides the rules: fixed exactly, floor from below.
        let mut reason = ChangeReason::of(trigger);
        if new_rules && reason != ChangeReason::Manual {
            reason = ChangeReason::RulesChanged;
        }
        if let Some(pin) = &self.pin {
            if pin.until.is_some_and(|u| u <= now) {
                self.pin = None;
                if trigger == Trigger::Time(TimeCause::ManualExpired)
                    || reason != ChangeReason::Manual
                {
                    reason = ChangeReason::ManualExpired;
                }
            } else if let Some(p) = rules.tier_index(&pin.tier) {
                let pinned = match pin.mode {
                    PinMode::Fixed => p,
                    PinMode::Floor => new.min(p),
                };
                if pinned != new {
                    new = pinned;
                    policy_text = format!(
                        "manual pin ({}) by {}",
                        if pin.mode == PinMode::Fixed {
                            "fixed"
                        } else {
                            "floor"
                        },
                        pin.by
                    );
                    rule_tier = pinned;
                }
                if trigger == Trigger::Manual {
                    reason = ChangeReason::Manual;
                }
            }
        }
        if cur == Some(new) {
            return None;
        }
        let direction = match cur {
            None if self.tier.is_none() => Direction::Initial,
            // A tier the current rules no longer know ranks below all known tiers.
            None => Direction::Up,
            Some(c) if c < new => Direction::Down,
            Some(_) => Direction::Up,
        };
        let keep_review = direction == Direction::Up
            && !rules.policy(new).upgrade_restarts_review
            && self.review.is_some_and(|r| r > now);
        let pinned = self.pin.is_some() && policy_text.starts_with("manual pin");
        if pinned {
            // A pin is not a qualification: no validity period starts, so when it lapses the
            // customer is re-placed at once (`manual_expired`).
            self.review = None;
        } else if !keep_review {
            self.review = rules
                .policy(new)
                .review
                .next(rules.calendar(), now, self.first);
        }
        // A step down that still leaves the customer above their placement waits out the new
        // tier's grace period before the next step (review and minimum stay pace it too).
        self.pending = (direction == Direction::Down
            && new < target
            && rules.policy(new).grace_ms > 0
            && !pinned)
            .then_some(now);
        let previous = self.tier.replace(rules.tiers()[new].name.clone());
        self.seq += 1;
        self.since = now;
        Some(Transition {
            previous,
            tier: new,
            rule: if rule_tier == target {
                rules.rule(target).to_owned()
            } else {
                format!("{} (by policy)", rules.rule(rule_tier))
            },
            policy: policy_text,
            direction,
            reason,
            at: now,
            eval,
        })
    }

    /// Sets the next timer; returns an at-risk notice when one is due now.
    pub(super) fn schedule(
        &mut self,
        rules: &Rules,
        now: i64,
        cutoffs: &Cutoffs,
    ) -> Option<Notice> {
        self.timer = self.next_moment(rules, now);
        let lead = rules.at_risk_ms();
        let (due, cause) = self.timer?;
        if lead == 0 || self.notified == Some(due) {
            return None;
        }
        // Project: what would the timer do if nothing else happened before it?
        let mut projected = self.clone();
        let t = projected.decide(rules, due, Trigger::Time(cause), cutoffs)?;
        if t.direction != Direction::Down {
            return None;
        }
        let tier = self.tier.as_deref().and_then(|n| rules.tier_index(n))?;
        let notice_at = due - lead;
        if notice_at > now {
            self.timer = Some((notice_at, TimeCause::AtRisk));
            return None;
        }
        self.notified = Some(due);
        Some(Notice {
            tier,
            falls_to: t.tier,
            at: due,
            cause,
            shortfall: rules.shortfall(tier, &t.eval),
            now,
        })
    }

    /// The next moment time alone could change this customer's tier.
    fn next_moment(&self, rules: &Rules, now: i64) -> Option<(i64, TimeCause)> {
        let cur = self.tier.as_deref().and_then(|t| rules.tier_index(t))?;
        let mut best: Option<(i64, TimeCause)> = None;
        let mut consider = |t: i64, cause: TimeCause| {
            if t > now && best.is_none_or(|(b, _)| t < b) {
                best = Some((t, cause));
            }
        };
        if let Some(until) = self.pin.as_ref().and_then(|p| p.until) {
            consider(until, TimeCause::ManualExpired);
        }
        let base = cur == rules.tiers().len() - 1;
        let p = rules.policy(cur);
        if let Some(since) = self.pending {
            consider(since.saturating_add(p.grace_ms), TimeCause::GraceEnded);
        }
        let in_validity = self.review.is_some_and(|r| r > now);
        if !base {
            if let Some(r) = self.review {
                consider(r, TimeCause::ValidityExpired);
            }
            let stay_end = self.since.saturating_add(p.min_stay_ms);
            if stay_end > now && !in_validity {
                consider(stay_end, TimeCause::MinStayEnded);
            }
        }
        // Metric changes matter outside a validity period (for the base tier too: time can
        // raise a customer, e.g. when a refund leaves a window or a recency bound is crossed).
        if !in_validity {
            if let Some((t, cause)) = rules.next_metric_change(&self.facts(), now) {
                consider(t, cause);
            }
        }
        best
    }
}
