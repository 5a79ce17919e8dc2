//! The transition: how one event, or time, changes a customer's state — dedup and lateness,
//! RFM counters and window buckets, then an evaluation ([`CustomerState::evaluate`]: tier
//! placement and policy in [`super::decide`], the next timer, an at-risk notice).
//!
//! This is the only place purchases and refunds change state; the pipeline, replays, tools
//! and tests all call [`CustomerState::apply`]. Pure and clock-injected: engine time is an
//! argument.

use super::rules::operand::Facts;
use super::rules::rank::Cutoffs;
use super::rules::{Evaluation, Rules};
use crate::model::calendar::Unit;
use crate::model::change::{ChangeReason, Direction};
use crate::model::event::{Event, EventKind};
use crate::model::state::{
    Bucket, CustomerState, DedupPolicy, PinRequest, Series, SeriesBucket, TimeCause,
};

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
    /// Counting it would take the customer's lifetime purchases or refunds (or the points of
    /// either) beyond [`MAX_EXACT_TOTAL`]: not counted, dead-lettered by the caller.
    BeyondExactRange {
        /// The total the event would have made, minor units (or points).
        total_minor: i128,
        /// `"purchases"`, `"refunds"`, `"purchase points"` or `"refunded points"`.
        total: &'static str,
        /// Whether the total is of points (the event's `points` field), not money.
        points: bool,
    },
    /// An `erase` event: the state is now the default (what an absent customer loads as).
    Erased {
        /// The tier the customer had; None if there was nothing stored to erase.
        tier: Option<String>,
        /// Whether there was a customer to erase.
        existed: bool,
    },
}

/// The largest lifetime purchase total and refund total a customer may reach, in minor units:
/// 2^53 − 1. Every money metric the rules can read (net spend, a window's net sum) then lies
/// within ±2^53, where a Redis sorted-set score (a double) holds every whole number exactly —
/// so ranks order customers exactly and the cut-off search always ends. In a currency with two
/// minor digits that is about 90 trillion per customer.
pub const MAX_EXACT_TOTAL: i128 = (1 << 53) - 1;

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
    pub(super) fn of(trigger: Trigger) -> Self {
        match trigger {
            Trigger::Event(EventKind::Purchase) => Self::Purchase,
            Trigger::Event(EventKind::Refund) => Self::Refund,
            Trigger::Manual | Trigger::Event(EventKind::Override | EventKind::Erase) => {
                Self::Manual
            }
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

/// The refusal of an event whose `add` would take the lifetime purchases or refunds total
/// (`totals`, named `names`; of points when `points`) beyond [`MAX_EXACT_TOTAL`].
fn beyond(
    kind: EventKind,
    (bought, refunded): (i128, i128),
    add: i128,
    names: [&'static str; 2],
    points: bool,
) -> Option<Applied> {
    let (total_minor, total) = match kind {
        EventKind::Purchase => (bought + add, names[0]),
        EventKind::Refund => (refunded + add, names[1]),
        EventKind::Override | EventKind::Erase => return None,
    };
    (total_minor > MAX_EXACT_TOTAL).then_some(Applied::BeyondExactRange {
        total_minor,
        total,
        points,
    })
}

impl CustomerState {
    /// What the rules read.
    pub fn facts(&self) -> Facts<'_> {
        Facts {
            count: self.count,
            sum: self.sum - self.refunded,
            last_purchase: self.last,
            days: &self.day_buckets,
            months: &self.month_buckets,
            points: self.points_earned - self.points_refunded,
            series: &self.series,
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
        if event.kind == EventKind::Erase {
            // An erase dated before this incarnation began is about an earlier one (a re-sent
            // or late copy after the customer came back): it does nothing.
            if self.born.is_some_and(|born| event.occurred_at_ms < born) {
                return Applied::Erased {
                    tier: None,
                    existed: false,
                };
            }
            // Otherwise nothing of the customer is kept, not even the ids that would recognise
            // a duplicate (a re-sent erase is recognised by its date, above).
            let existed = !self.is_new();
            let tier = std::mem::take(self).tier;
            return Applied::Erased { tier, existed };
        }
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
        let amount = i128::from(event.amount_minor);
        let points = i128::from(event.points);
        let refused = beyond(
            event.kind,
            (self.sum, self.refunded),
            amount,
            ["purchases", "refunds"],
            false,
        )
        .or_else(|| {
            let totals = (self.points_earned, self.points_refunded);
            let names = ["purchase points", "refunded points"];
            (points != 0)
                .then(|| beyond(event.kind, totals, points, names, true))
                .flatten()
        });
        if let Some(refused) = refused {
            return refused;
        }
        let trigger = match (&event.kind, &event.pin) {
            (EventKind::Purchase, _) => {
                self.count += 1;
                self.sum += i128::from(event.amount_minor);
                self.first = Some(self.first.map_or(at, |f| f.min(at)));
                self.last = Some(self.last.map_or(at, |l| l.max(at)));
                self.points_earned += points;
                self.add_to_buckets(rules, event, 1, amount, points);
                Trigger::Event(EventKind::Purchase)
            }
            (EventKind::Refund, _) => {
                self.refunds += 1;
                self.refunded += i128::from(event.amount_minor);
                self.points_refunded += points;
                self.add_to_buckets(rules, event, 0, -amount, -points);
                Trigger::Event(EventKind::Refund)
            }
            (EventKind::Override | EventKind::Erase, pin) => {
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

    /// Adds an event (`n` purchases, net `s` minor units and `p` points) to the buckets of
    /// its day and month, and to every window series whose filter admits it.
    fn add_to_buckets(&mut self, rules: &Rules, event: &Event, n: u64, s: i128, p: i128) {
        let at = event.occurred_at_ms;
        for def in rules.series() {
            if !def.filter.admits(&event.attributes) {
                continue;
            }
            let i = rules.calendar().index(def.unit, at);
            let series = match self.series.iter().position(|x| x.key == def.key) {
                Some(pos) => &mut self.series[pos],
                None => {
                    self.series.push(Series {
                        key: def.key,
                        buckets: Vec::new(),
                    });
                    self.series.last_mut().expect("just pushed")
                }
            };
            let buckets = &mut series.buckets;
            let pos = buckets.partition_point(|b| b.index < i);
            match buckets.get_mut(pos) {
                Some(b) if b.index == i => {
                    b.purchases += n;
                    b.net_minor += s;
                    b.points += p;
                }
                _ => buckets.insert(pos, SeriesBucket::from((i, n, s, p))),
            }
        }
        for (unit, buckets) in [
            (Unit::Day, &mut self.day_buckets),
            (Unit::Month, &mut self.month_buckets),
        ] {
            if rules.keep_buckets(unit) == 0 {
                continue;
            }
            let i = rules.calendar().index(unit, at);
            let pos = buckets.partition_point(|b| b.index < i);
            match buckets.get_mut(pos) {
                Some(b) if b.index == i => {
                    b.purchases += n;
                    b.net_minor += s;
                }
                _ => buckets.insert(pos, Bucket::from((i, n, s))),
            }
        }
    }

    pub(super) fn prune(&mut self, rules: &Rules, now: i64) {
        for (unit, buckets) in [
            (Unit::Day, &mut self.day_buckets),
            (Unit::Month, &mut self.month_buckets),
        ] {
            if rules.keep_buckets(unit) == 0 {
                buckets.clear();
                continue;
            }
            let floor = rules.bucket_floor(unit, now);
            let expired = buckets.partition_point(|b| b.index < floor);
            buckets.drain(..expired);
        }
        // Series the rules no longer keep go (a rules change); the rest lose their expired
        // buckets, and a series left empty is not stored. Kept in the rules' order, so that
        // equal histories store equal bytes.
        if !self.series.is_empty() {
            let defs = rules.series();
            self.series.retain_mut(|x| {
                let Some(def) = defs.iter().find(|d| d.key == x.key) else {
                    return false;
                };
                let floor = rules.floor_of(def.unit, def.keep, now);
                let expired = x.buckets.partition_point(|b| b.index < floor);
                x.buckets.drain(..expired);
                !x.buckets.is_empty()
            });
            self.series
                .sort_by_key(|x| defs.iter().position(|d| d.key == x.key));
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
            points: 0,
            attributes: Vec::new(),
        }
    }

    fn change(s: &mut CustomerState, e: &Event, rules: &Rules) -> Option<Transition> {
        match s.apply(e, rules, POLICY, e.occurred_at_ms, &Cutoffs::default()) {
            Applied::Counted(o) => o.transition.clone(),
            other => panic!("not counted: {other:?}"),
        }
    }

    #[test]
    fn lifetime_points_stop_below_2_pow_53() {
        let rules = rules();
        let mut s = CustomerState::default();
        let with_points = |id: &str, kind: EventKind, points: i64, at: i64| Event {
            points,
            ..ev(id, kind, 100, at)
        };
        // 10^15 points (the most one event carries), nine times: 9×10^15 ≤ 2^53 − 1.
        for i in 0..9 {
            change(
                &mut s,
                &with_points(
                    &format!("p{i}"),
                    EventKind::Purchase,
                    1_000_000_000_000_000,
                    DAY + i,
                ),
                &rules,
            );
        }
        let before = s.clone();
        let refused = s.apply(
            &with_points("p9", EventKind::Purchase, 1_000_000_000_000_000, DAY + 9),
            &rules,
            POLICY,
            0,
            &Cutoffs::default(),
        );
        assert_eq!(
            refused,
            Applied::BeyondExactRange {
                total_minor: 10_000_000_000_000_000,
                total: "purchase points",
                points: true,
            }
        );
        assert_eq!(s, before, "a refused event changes nothing");
        // Refunded points have their own total, checked alike.
        s.points_refunded = MAX_EXACT_TOTAL;
        assert!(matches!(
            s.apply(
                &with_points("r1", EventKind::Refund, 1, DAY + 10),
                &rules,
                POLICY,
                0,
                &Cutoffs::default()
            ),
            Applied::BeyondExactRange {
                total: "refunded points",
                points: true,
                ..
            }
        ));
    }

    #[test]
    fn lifetime_totals_stop_below_2_pow_53() {
        let rules = rules();
        let big = 1_000_000_000_000_000; // 10^15, the largest single amount config allows
        let mut s = CustomerState::default();
        for i in 0..9 {
            change(
                &mut s,
                &ev(&format!("p{i}"), EventKind::Purchase, big, DAY + i),
                &rules,
            );
        }
        let before = s.clone();
        let refused = s.apply(
            &ev("p9", EventKind::Purchase, big, DAY + 9),
            &rules,
            POLICY,
            0,
            &Cutoffs::default(),
        );
        assert_eq!(
            refused,
            Applied::BeyondExactRange {
                total_minor: 10 * i128::from(big),
                total: "purchases",
                points: false,
            }
        );
        assert_eq!(
            s, before,
            "a refused event changes nothing (not even the dedup memory)"
        );
        // Exactly at the bound is still counted; one more minor unit is not.
        let rest = i64::try_from(MAX_EXACT_TOTAL - s.sum).unwrap();
        change(
            &mut s,
            &ev("p10", EventKind::Purchase, rest, DAY + 10),
            &rules,
        );
        assert_eq!(s.sum, MAX_EXACT_TOTAL);
        assert!(matches!(
            s.apply(
                &ev("p11", EventKind::Purchase, 1, DAY + 11),
                &rules,
                POLICY,
                0,
                &Cutoffs::default()
            ),
            Applied::BeyondExactRange {
                total: "purchases",
                ..
            }
        ));
        // Refunds are bounded the same way (net spend stays within -2^53).
        for i in 0..9 {
            change(
                &mut s,
                &ev(&format!("r{i}"), EventKind::Refund, big, DAY + 20 + i),
                &rules,
            );
        }
        assert!(matches!(
            s.apply(
                &ev("r9", EventKind::Refund, big, DAY + 29),
                &rules,
                POLICY,
                0,
                &Cutoffs::default()
            ),
            Applied::BeyondExactRange {
                total: "refunds",
                ..
            }
        ));
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
        assert!(
            s.day_buckets.is_empty() && s.month_buckets.is_empty(),
            "no window, no buckets"
        );
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
