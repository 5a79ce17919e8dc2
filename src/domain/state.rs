//! A customer's RFM state and the pure, deterministic transition one event makes to it.
//!
//! This is the only place purchases and refunds change state; the pipeline, replays and
//! tests all call [`CustomerState::apply`].

use super::change::{ChangeReason, Direction};
use super::event::{Event, EventKind};
use crate::rules::Rules;
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

/// Persistent state of one customer (stored as JSON in Redis).
///
/// Memory: about 200 bytes of JSON plus ~30 bytes per remembered event id (at most
/// `dedup.max_ids_per_customer`), see the README's memory section.
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
    /// Current tier name (None before the first event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Since when the customer is in `tier` (engine time, Unix ms).
    #[serde(default)]
    pub since: i64,
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
            tier: None,
            since: 0,
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

fn is_floor_min(v: &i64) -> bool {
    *v == i64::MIN
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

/// What applying one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied<'r> {
    /// Counted; `Some` if the customer's tier changed.
    Counted(Option<Transition<'r>>),
    /// Same `event_id` seen within the horizon: not counted again.
    Duplicate,
    /// Older than the dedup horizon allows: not counted, dead-lettered by the caller.
    TooLate {
        /// The customer's floor the event fell at or below (Unix ms).
        floor_ms: i64,
    },
}

/// A tier change decided by [`CustomerState::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition<'r> {
    /// Tier before (None on first placement).
    pub previous: Option<String>,
    /// Index of the new tier in the rules.
    pub tier: usize,
    /// The rule that placed the customer.
    pub rule: &'r str,
    /// Which way.
    pub direction: Direction,
    /// Why.
    pub reason: ChangeReason,
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

    /// Applies one event: dedup, lateness, RFM update, re-placement. Deterministic: the same
    /// state and event always give the same result.
    pub fn apply<'r>(
        &mut self,
        event: &Event,
        rules: &'r Rules,
        dedup: DedupPolicy,
    ) -> Applied<'r> {
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
        match event.kind {
            EventKind::Purchase => {
                self.count += 1;
                self.sum += i128::from(event.amount_minor);
                self.first = Some(self.first.map_or(at, |f| f.min(at)));
                self.last = Some(self.last.map_or(at, |l| l.max(at)));
            }
            EventKind::Refund => {
                self.refunds += 1;
                self.refunded += i128::from(event.amount_minor);
            }
        }
        self.clock = self.clock.max(at);
        self.remember(id, at, dedup);

        let reason = match event.kind {
            EventKind::Purchase => ChangeReason::Purchase,
            EventKind::Refund => ChangeReason::Refund,
        };
        Applied::Counted(self.replace(rules, reason))
    }

    /// Re-places the customer by the rules; records and returns the change if the tier moved.
    fn replace<'r>(&mut self, rules: &'r Rules, reason: ChangeReason) -> Option<Transition<'r>> {
        let placement = rules.place(&self.metrics());
        let new_name = &rules.tiers()[placement.tier].name;
        if self.tier.as_deref() == Some(new_name.as_str()) {
            return None;
        }
        let direction = match self.tier.as_deref() {
            None => Direction::Initial,
            // A tier the current rules no longer know ranks below all known tiers.
            Some(old) => match rules.tier_index(old) {
                Some(old_index) if old_index < placement.tier => Direction::Down,
                _ => Direction::Up,
            },
        };
        let previous = self.tier.replace(new_name.clone());
        self.seq += 1;
        self.since = self.clock;
        Some(Transition {
            previous,
            tier: placement.tier,
            rule: placement.rule,
            direction,
            reason,
        })
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
[scheme]
kind = "thresholds"
metric = "monetary"
[[tiers]]
name = "gold"
min = "100"
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
        }
    }

    #[test]
    fn purchases_upgrade_and_refunds_downgrade() {
        let rules = rules();
        let mut s = CustomerState::default();
        let Applied::Counted(Some(t)) = s.apply(
            &ev("e1", EventKind::Purchase, 5_000, 10 * DAY),
            &rules,
            POLICY,
        ) else {
            panic!("first event places the customer")
        };
        assert_eq!(
            (t.previous, t.tier, t.direction),
            (None, 1, Direction::Initial)
        );
        let Applied::Counted(Some(t)) = s.apply(
            &ev("e2", EventKind::Purchase, 5_000, 11 * DAY),
            &rules,
            POLICY,
        ) else {
            panic!("reaching 100.00 upgrades")
        };
        assert_eq!(
            (t.previous.as_deref(), t.tier, t.direction),
            (Some("basic"), 0, Direction::Up)
        );
        assert_eq!(t.rule, "tiers[0]: monetary >= 100.00");
        let Applied::Counted(Some(t)) =
            s.apply(&ev("r1", EventKind::Refund, 1, 12 * DAY), &rules, POLICY)
        else {
            panic!("refund below the bar downgrades")
        };
        assert_eq!(
            (t.direction, t.reason),
            (Direction::Down, ChangeReason::Refund)
        );
        assert_eq!(
            (s.count, s.sum, s.refunds, s.refunded, s.seq),
            (2, 10_000, 1, 1, 3)
        );
        assert_eq!(s.last, Some(11 * DAY), "refunds do not move recency");
    }

    #[test]
    fn out_of_order_never_moves_last_purchase_backwards() {
        let rules = rules();
        let mut s = CustomerState::default();
        s.apply(&ev("a", EventKind::Purchase, 1, 10 * DAY), &rules, POLICY);
        s.apply(&ev("b", EventKind::Purchase, 1, 8 * DAY), &rules, POLICY);
        assert_eq!(
            (s.first, s.last, s.clock),
            (Some(8 * DAY), Some(10 * DAY), 10 * DAY)
        );
    }

    #[test]
    fn duplicates_count_once_and_late_events_are_refused() {
        let rules = rules();
        let mut s = CustomerState::default();
        s.apply(&ev("a", EventKind::Purchase, 1, 10 * DAY), &rules, POLICY);
        assert_eq!(
            s.apply(&ev("a", EventKind::Purchase, 1, 10 * DAY), &rules, POLICY),
            Applied::Duplicate
        );
        assert_eq!(s.count, 1);
        // Beyond the horizon behind the customer's clock: too late, whatever the id.
        assert!(matches!(
            s.apply(&ev("z", EventKind::Purchase, 1, 2 * DAY), &rules, POLICY),
            Applied::TooLate { .. }
        ));
        // The count bound forgets the oldest ids and raises the floor over them.
        for (i, d) in [11, 12, 13, 14].iter().enumerate() {
            s.apply(
                &ev(&format!("n{i}"), EventKind::Purchase, 1, d * DAY),
                &rules,
                POLICY,
            );
        }
        assert_eq!(s.ids.len(), 4);
        assert!(matches!(
            s.apply(&ev("a", EventKind::Purchase, 1, 10 * DAY), &rules, POLICY),
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
            for e in &events { once.apply(e, &rules, policy); }
            let mut twice = once.clone();
            for e in &events {
                prop_assert!(!matches!(twice.apply(e, &rules, policy), Applied::Counted(_)));
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
