//! A customer's RFM state and the pure, deterministic transition one event makes to it.
//!
//! This is the only place purchases and refunds change state; the pipeline, replays and
//! tests all call [`CustomerState::apply`].

use super::calendar::{self, Unit};
use super::change::{ChangeReason, Direction};
use super::event::{Event, EventKind};
use crate::rules::operand::Facts;
use crate::rules::policy::{Downgrade, Review};
use crate::rules::rank::Cutoffs;
use crate::rules::{Evaluation, Rules, TimeCause};
use serde::{Deserialize, Serialize};

/// How duplicate `event_id`s are recognised, and how late an event may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupPolicy {
    /// An event is deduplicated if its id was seen within this much event time before the
    /// customer's latest event; older events are rejected as `too_late` (they could no longer
    /// be told apart from duplicates). Milliseconds.
    pub horizon_ms: i64,
    /// At most this many remembered ids per customer; when more arrive within the horizon,
    /// the oldest are forgotten and events at or before their time become `too_late`.
    pub max_ids: usize,
}

/// One bucket of window history: (bucket index, purchases, net sum in minor units).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket(pub i32, pub u64, pub i128);

/// How a manual pin holds a customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinMode {
    /// The customer is at least in the pinned tier (rules may place them higher).
    Floor,
    /// The customer is exactly in the pinned tier.
    Fixed,
}

/// A manual pin set by an `override` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The pinned tier's name.
    pub tier: String,
    /// Floor or fixed.
    pub mode: PinMode,
    /// When the pin lapses (Unix ms); `None`: until cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// The `event_id` of the override that set it.
    pub by: String,
}

/// What an `override` event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinRequest {
    /// Pin to a tier.
    Set(Pin),
    /// Remove the pin.
    Clear,
}

/// Persistent state of one customer (stored as JSON in Redis).
///
/// Memory: about 200 bytes of JSON plus ~30 bytes per remembered event id (at most
/// `dedup.max_ids_per_customer`) plus ~16 bytes per window bucket kept, see `docs/rules.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerState {
    /// Earliest purchase, event time (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<i64>,
    /// Latest purchase, event time (Unix ms); never moves backwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<i64>,
    /// Lifetime purchase count (F). Refunds do not change it.
    #[serde(default)]
    pub count: u64,
    /// Lifetime purchase sum, minor units.
    #[serde(default)]
    pub sum: i128,
    /// Lifetime refund count.
    #[serde(default)]
    pub refunds: u64,
    /// Lifetime refunded sum, minor units.
    #[serde(default)]
    pub refunded: i128,
    /// Day buckets (only when the rules declare a day window), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wd: Vec<Bucket>,
    /// Month buckets (only when the rules declare a month or calendar window), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wm: Vec<Bucket>,
    /// Current tier name (None before the first event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Since when the customer is in `tier` (engine time, Unix ms).
    #[serde(default)]
    pub since: i64,
    /// When the tier is next reviewed (its validity ends), engine time; None: continuous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<i64>,
    /// Since when a downgrade is pending in its grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<i64>,
    /// The customer's next time-driven evaluation (mirrored in the partition's timer index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<(i64, TimeCause)>,
    /// The downgrade moment an at-risk notice was sent for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified: Option<i64>,
    /// A manual pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<Pin>,
    /// Hash of the rules version that last evaluated the customer.
    #[serde(default)]
    pub rv: u32,
    /// The customer's value in each rank of the rules at the latest evaluation (mirrored in
    /// the partition's rank sorted sets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rk: Vec<Option<i128>>,
    /// Version of the rank cut-offs of the latest evaluation (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cv: u64,
    /// Engine time of the customer's latest evaluation: a customer's time never runs
    /// backwards, whatever order events and timers come in.
    #[serde(default = "floor_min", skip_serializing_if = "is_floor_min")]
    pub at: i64,
    /// Number of tier changes so far; the last change's sequence.
    #[serde(default)]
    pub seq: u64,
    /// The customer's event-time clock: the latest `occurred_at` of any applied event.
    #[serde(default = "floor_min")]
    pub clock: i64,
    /// Remembered event ids: (xxh3-64 of `event_id`, occurred_at ms), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<(u64, i64)>,
    /// Events with `occurred_at` at or before this (Unix ms) are `too_late`.
    #[serde(default = "floor_min", skip_serializing_if = "is_floor_min")]
    pub floor: i64,
}

impl Default for CustomerState {
    fn default() -> Self {
        Self {
            first: None,
            last: None,
            count: 0,
            sum: 0,
            refunds: 0,
            refunded: 0,
            wd: Vec::new(),
            wm: Vec::new(),
            tier: None,
            since: 0,
            review: None,
            pending: None,
            timer: None,
            notified: None,
            pin: None,
            rv: 0,
            at: i64::MIN,
            rk: Vec::new(),
            cv: 0,
            seq: 0,
            clock: i64::MIN,
            ids: Vec::new(),
            floor: i64::MIN,
        }
    }
}

fn floor_min() -> i64 {
    i64::MIN
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_floor_min(v: &i64) -> bool {
    *v == i64::MIN
}

/// The short hash of a rules version stored per customer.
pub fn rules_hash(version: &str) -> u32 {
    // Never 0, so a state written before versions were tracked is always re-evaluated.
    (xxhash_rust::xxh3::xxh3_64(version.as_bytes()) as u32).max(1)
}

/// The metrics rules can read, derived from a state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Lifetime purchases.
    pub frequency: u64,
    /// Lifetime net spend (purchases − refunds), minor units.
    pub monetary_minor: i128,
    /// Latest purchase time (Unix ms).
    pub last_purchase_ms: Option<i64>,
}

/// What made tierd evaluate a customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A purchase or refund of the customer.
    Event(EventKind),
    /// An override event.
    Manual,
    /// Time (a timer fired).
    Time(TimeCause),
    /// A new rules version.
    RulesChanged,
    /// New rank cut-offs.
    RankShift,
}

/// What applying one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Counted; what the evaluation decided.
    Counted(Box<Outcome>),
    /// Same `event_id` seen within the horizon: not counted again.
    Duplicate,
    /// Older than the dedup horizon allows: not counted, dead-lettered by the caller.
    TooLate {
        /// The customer's floor the event fell at or below (Unix ms).
        floor_ms: i64,
    },
}

/// The result of one evaluation: maybe a tier change, maybe an at-risk notice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The tier change, if the tier moved.
    pub transition: Option<Transition>,
    /// An at-risk notice due now.
    pub notice: Option<Notice>,
}

/// A tier change decided by an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Tier before (None on first placement).
    pub previous: Option<String>,
    /// Index of the new tier in the rules.
    pub tier: usize,
    /// The rule that placed the customer.
    pub rule: String,
    /// The policy that decided (e.g. `"downgrade=step review=days:60"`, `"upgrade"`).
    pub policy: String,
    /// Which way.
    pub direction: Direction,
    /// Why.
    pub reason: ChangeReason,
    /// Engine time of the change (Unix ms).
    pub at: i64,
    /// Metrics and scores at the decision.
    pub eval: Evaluation,
}

/// A time-driven downgrade is coming: sent `at_risk_days` before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The customer's tier now.
    pub tier: usize,
    /// The tier they will fall to.
    pub falls_to: usize,
    /// When (engine time, Unix ms).
    pub at: i64,
    /// What will cause it.
    pub cause: TimeCause,
    /// What it takes to stay: the failing conditions with the value and what is missing.
    pub shortfall: Vec<serde_json::Value>,
    /// Engine time of the notice.
    pub now: i64,
}

impl ChangeReason {
    fn of(trigger: Trigger) -> Self {
        match trigger {
            Trigger::Event(EventKind::Purchase) => Self::Purchase,
            Trigger::Event(EventKind::Refund) => Self::Refund,
            Trigger::Manual | Trigger::Event(EventKind::Override) => Self::Manual,
            Trigger::RulesChanged => Self::RulesChanged,
            Trigger::RankShift => Self::RankShift,
            Trigger::Time(c) => match c {
                TimeCause::Recency => Self::Recency,
                TimeCause::WindowExpiry | TimeCause::AtRisk => Self::WindowExpiry,
                TimeCause::ValidityExpired => Self::ValidityExpired,
                TimeCause::GraceEnded => Self::GraceEnded,
                TimeCause::MinStayEnded => Self::MinStayEnded,
                TimeCause::ManualExpired => Self::ManualExpired,
            },
        }
    }
}

impl CustomerState {
    /// The metrics of this state.
    pub fn metrics(&self) -> Metrics {
        Metrics {
            frequency: self.count,
            monetary_minor: self.sum - self.refunded,
            last_purchase_ms: self.last,
        }
    }

    /// What the rules read.
    pub fn facts(&self) -> Facts<'_> {
        Facts {
            count: self.count,
            sum: self.sum - self.refunded,
            last_purchase: self.last,
            days: &self.wd,
            months: &self.wm,
        }
    }

    /// Applies one event: dedup, lateness, RFM and window update, evaluation. The event is
    /// evaluated at the customer's event time (the latest `occurred_at` applied), or later if
    /// the customer was already evaluated later or `now` (the partition's event-time clock in
    /// `event` mode; `i64::MIN` otherwise) is later. Deterministic: the same state, event and
    /// `now` always give the same result.
    pub fn apply(
        &mut self,
        event: &Event,
        rules: &Rules,
        dedup: DedupPolicy,
        now: i64,
        cutoffs: &Cutoffs,
    ) -> Applied {
        let at = event.occurred_at_ms;
        let id = xxhash_rust::xxh3::xxh3_64(event.event_id.as_bytes());
        // A remembered id is a duplicate even at or below the floor.
        if self.ids.iter().any(|&(h, _)| h == id) {
            return Applied::Duplicate;
        }
        if at <= self.floor {
            return Applied::TooLate {
                floor_ms: self.floor,
            };
        }
        let trigger = match (&event.kind, &event.pin) {
            (EventKind::Purchase, _) => {
                self.count += 1;
                self.sum += i128::from(event.amount_minor);
                self.first = Some(self.first.map_or(at, |f| f.min(at)));
                self.last = Some(self.last.map_or(at, |l| l.max(at)));
                self.add_to_buckets(rules, at, 1, i128::from(event.amount_minor));
                Trigger::Event(EventKind::Purchase)
            }
            (EventKind::Refund, _) => {
                self.refunds += 1;
                self.refunded += i128::from(event.amount_minor);
                self.add_to_buckets(rules, at, 0, -i128::from(event.amount_minor));
                Trigger::Event(EventKind::Refund)
            }
            (EventKind::Override, pin) => {
                match pin {
                    Some(PinRequest::Set(pin)) => self.pin = Some(pin.clone()),
                    Some(PinRequest::Clear) | None => self.pin = None,
                }
                Trigger::Manual
            }
        };
        self.clock = self.clock.max(at);
        self.remember(id, at, dedup);
        Applied::Counted(Box::new(self.evaluate(
            rules,
            now.max(self.clock).max(self.at),
            trigger,
            cutoffs,
        )))
    }

    fn add_to_buckets(&mut self, rules: &Rules, at: i64, n: u64, s: i128) {
        for (unit, buckets) in [(Unit::Day, &mut self.wd), (Unit::Month, &mut self.wm)] {
            if rules.keep_buckets(unit) == 0 {
                continue;
            }
            let i = calendar::index(unit, at);
            let pos = buckets.partition_point(|b| b.0 < i);
            match buckets.get_mut(pos) {
                Some(b) if b.0 == i => {
                    b.1 += n;
                    b.2 += s;
                }
                _ => buckets.insert(pos, Bucket(i, n, s)),
            }
        }
    }

    fn prune(&mut self, rules: &Rules, now: i64) {
        for (unit, buckets) in [(Unit::Day, &mut self.wd), (Unit::Month, &mut self.wm)] {
            if rules.keep_buckets(unit) == 0 {
                buckets.clear();
                continue;
            }
            let floor = rules.bucket_floor(unit, now);
            let expired = buckets.partition_point(|b| b.0 < floor);
            buckets.drain(..expired);
        }
    }

    /// Evaluates the customer at engine time `now` (a timer firing, a rules change, or after
    /// an event): placement, downgrade policy, pin, next timer, at-risk notice.
    pub fn evaluate(
        &mut self,
        rules: &Rules,
        now: i64,
        trigger: Trigger,
        cutoffs: &Cutoffs,
    ) -> Outcome {
        // A customer's engine time never runs backwards (e.g. a sweep at wall time for a
        // customer whose last event was future-dated within the allowed skew).
        let now = self.at.max(now);
        self.at = now;
        let transition = self.decide(rules, now, trigger, cutoffs);
        let notice = self.schedule(rules, now, cutoffs);
        Outcome { transition, notice }
    }

    #[allow(clippy::too_many_lines)]
    fn decide(
        &mut self,
        rules: &Rules,
        now: i64,
        trigger: Trigger,
        cutoffs: &Cutoffs,
    ) -> Option<Transition> {
        // The first evaluation under a new rules version reports its change as `rules_changed`.
        let new_rules = self.tier.is_some() && self.rv != rules.version_hash();
        self.rv = rules.version_hash();
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
        self.cv = eval.cutoffs_version;
        self.rk.clone_from(&eval.ranks);
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
                    self.review = rules.policy(c).review.next(now, self.first);
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
            self.review = rules.policy(new).review.next(now, self.first);
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
    fn schedule(&mut self, rules: &Rules, now: i64, cutoffs: &Cutoffs) -> Option<Notice> {
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

    /// Remembers an event id, forgetting ids beyond the horizon or the count bound and raising
    /// the lateness floor accordingly (so a forgotten id can never be counted twice).
    fn remember(&mut self, id: u64, at: i64, dedup: DedupPolicy) {
        let pos = self.ids.partition_point(|&(_, t)| t <= at);
        self.ids.insert(pos, (id, at));
        let cutoff = self.clock.saturating_sub(dedup.horizon_ms);
        let expired = self.ids.partition_point(|&(_, t)| t < cutoff);
        if expired > 0 {
            self.ids.drain(..expired);
            self.floor = self.floor.max(cutoff - 1);
        }
        if self.ids.len() > dedup.max_ids {
            let excess = self.ids.len() - dedup.max_ids;
            self.floor = self.floor.max(self.ids[excess - 1].1);
            self.ids.drain(..excess);
        }
        // Events before the horizon are late even if nothing was remembered then.
        self.floor = self.floor.max(cutoff - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: i64 = 86_400_000;
    const POLICY: DedupPolicy = DedupPolicy {
        horizon_ms: 7 * DAY,
        max_ids: 4,
    };

    fn rules() -> Rules {
        Rules::parse(
            r#"
version = "t1"
[[tiers]]
name = "gold"
when = ["sum >= 100"]
[[tiers]]
name = "basic"
"#,
            "t.toml",
            2,
        )
        .unwrap()
    }

    fn ev(id: &str, kind: EventKind, amount: i64, at: i64) -> Event {
        Event {
            event_id: id.into(),
            customer_id: "c".into(),
            kind,
            amount_minor: amount,
            occurred_at_ms: at,
            pin: None,
        }
    }

    fn change(s: &mut CustomerState, e: &Event, rules: &Rules) -> Option<Transition> {
        match s.apply(e, rules, POLICY, e.occurred_at_ms, &Cutoffs::default()) {
            Applied::Counted(o) => o.transition.clone(),
            other => panic!("not counted: {other:?}"),
        }
    }

    #[test]
    fn purchases_upgrade_and_refunds_downgrade() {
        let rules = rules();
        let mut s = CustomerState::default();
        let t = change(
            &mut s,
            &ev("e1", EventKind::Purchase, 5_000, 10 * DAY),
            &rules,
        )
        .expect("first event places the customer");
        assert_eq!(
            (t.previous, t.tier, t.direction),
            (None, 1, Direction::Initial)
        );
        let t = change(
            &mut s,
            &ev("e2", EventKind::Purchase, 5_000, 11 * DAY),
            &rules,
        )
        .expect("reaching 100.00 upgrades");
        assert_eq!(
            (t.previous.as_deref(), t.tier, t.direction),
            (Some("basic"), 0, Direction::Up)
        );
        assert_eq!(t.rule, "tiers[0] gold: sum >= 100.00");
        assert_eq!(t.at, 11 * DAY);
        let t = change(&mut s, &ev("r1", EventKind::Refund, 1, 12 * DAY), &rules)
            .expect("refund below the bar downgrades");
        assert_eq!(
            (t.direction, t.reason),
            (Direction::Down, ChangeReason::Refund)
        );
        assert_eq!(
            (s.count, s.sum, s.refunds, s.refunded, s.seq),
            (2, 10_000, 1, 1, 3)
        );
        assert_eq!(s.last, Some(11 * DAY), "refunds do not move recency");
        assert_eq!(s.timer, None, "lifetime rules never need a timer");
        assert!(s.wd.is_empty() && s.wm.is_empty(), "no window, no buckets");
    }

    #[test]
    fn out_of_order_never_moves_last_purchase_backwards() {
        let rules = rules();
        let mut s = CustomerState::default();
        change(&mut s, &ev("a", EventKind::Purchase, 1, 10 * DAY), &rules);
        change(&mut s, &ev("b", EventKind::Purchase, 1, 8 * DAY), &rules);
        assert_eq!(
            (s.first, s.last, s.clock),
            (Some(8 * DAY), Some(10 * DAY), 10 * DAY)
        );
    }

    #[test]
    fn duplicates_count_once_and_late_events_are_refused() {
        let rules = rules();
        let mut s = CustomerState::default();
        let apply = |s: &mut CustomerState, e: &Event| {
            s.apply(e, &rules, POLICY, e.occurred_at_ms, &Cutoffs::default())
        };
        apply(&mut s, &ev("a", EventKind::Purchase, 1, 10 * DAY));
        assert_eq!(
            apply(&mut s, &ev("a", EventKind::Purchase, 1, 10 * DAY)),
            Applied::Duplicate
        );
        assert_eq!(s.count, 1);
        // Beyond the horizon behind the customer's clock: too late, whatever the id.
        assert!(matches!(
            apply(&mut s, &ev("z", EventKind::Purchase, 1, 2 * DAY)),
            Applied::TooLate { .. }
        ));
        // The count bound forgets the oldest ids and raises the floor over them.
        for (i, d) in [11, 12, 13, 14].iter().enumerate() {
            apply(
                &mut s,
                &ev(&format!("n{i}"), EventKind::Purchase, 1, d * DAY),
            );
        }
        assert_eq!(s.ids.len(), 4);
        assert!(matches!(
            apply(&mut s, &ev("a", EventKind::Purchase, 1, 10 * DAY)),
            Applied::TooLate { .. }
        ));
        assert_eq!(s.count, 5);
    }

    proptest! {
        /// Re-applying any already-applied suffix changes nothing: each event counts once.
        #[test]
        fn apply_is_idempotent(events in proptest::collection::vec((0u8..20, 0i64..500, 0i64..30, any::<bool>()), 1..60)) {
            let rules = rules();
            let events: Vec<Event> = events.iter().map(|&(id, amount, day, refund)| {
                ev(&format!("e{id}"), if refund { EventKind::Refund } else { EventKind::Purchase }, amount, day * DAY)
            }).collect();
            let policy = DedupPolicy { horizon_ms: 365 * DAY, max_ids: 64 };
            let mut once = CustomerState::default();
            for e in &events { once.apply(e, &rules, policy, 0, &Cutoffs::default()); }
            let mut twice = once.clone();
            for e in &events {
                prop_assert!(!matches!(twice.apply(e, &rules, policy, 0, &Cutoffs::default()), Applied::Counted(_)));
            }
            prop_assert_eq!(&once, &twice);
            // Each distinct id is counted exactly once.
            let mut seen = std::collections::HashSet::new();
            let mut expected = 0i128;
            for e in &events {
                if seen.insert(e.event_id.clone()) && e.kind == EventKind::Purchase {
                    expected += i128::from(e.amount_minor);
                }
            }
            prop_assert_eq!(once.sum, expected);
        }
    }
}
