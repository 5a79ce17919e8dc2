//! Restating a customer's tier to consumers who were told another one.
//!
//! After Redis lost writes, a replay that cannot decide the lost input as it first was (it
//! falls back to the running rules) may leave a customer in another tier than the last change
//! published for them says, without deciding any change for them: the first run moved them,
//! the replay does not. Consumers would keep the first run's tier for good. The partition
//! reads back what the output topic last says of each customer and, where it differs from the
//! tier the customer is in, publishes one change from the published tier to the stored one
//! ([`CustomerState::restate`]).

use super::rules::rank::Cutoffs;
use super::rules::Rules;
use super::transition::Transition;
use crate::model::change::{ChangeReason, Direction};
use crate::model::state::CustomerState;

/// The `policy` text of a restated change.
pub const RESTATED: &str = "restated: the tier last published differed after a replay";

impl CustomerState {
    /// The change that tells consumers who were last told `published` (`None`: nothing, or
    /// the customer's erasure) the tier this customer is in, at engine time `now`; `None` if
    /// they were told this tier already, or the customer has no tier (never placed). The
    /// state keeps its tier and its policy clocks; only its change sequence counts the change
    /// (and its engine time never runs backwards). The change is `rules_changed`: only a
    /// replay under other rules than the first run's leaves such a difference.
    pub fn restate(
        &mut self,
        rules: &Rules,
        published: Option<&str>,
        now: i64,
        cutoffs: &Cutoffs,
    ) -> Option<Transition> {
        let current = self.tier.as_deref()?;
        if published == Some(current) {
            return None;
        }
        let tier = rules.tier_index(current)?;
        let now = self.at.max(now);
        self.at = now;
        let direction = match published.map(|p| rules.tier_index(p)) {
            None => Direction::Initial,
            // A tier the running rules no longer know ranks below all known tiers (as in
            // `decide`).
            Some(None) => Direction::Up,
            Some(Some(p)) if p < tier => Direction::Down,
            Some(Some(_)) => Direction::Up,
        };
        let eval = rules.evaluate(&self.facts(), now, cutoffs);
        self.seq += 1;
        Some(Transition {
            previous: published.map(str::to_owned),
            tier,
            rule: rules.rule(tier).to_owned(),
            policy: RESTATED.to_owned(),
            direction,
            reason: ChangeReason::RulesChanged,
            at: now,
            eval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Event, EventKind};
    use crate::model::state::DedupPolicy;

    const DAY: i64 = 86_400_000;

    fn rules() -> Rules {
        Rules::parse(
            "version = \"t1\"\n[[tiers]]\nname = \"gold\"\nwhen = [\"sum >= 100\"]\n[[tiers]]\nname = \"silver\"\nwhen = [\"sum >= 50\"]\n[[tiers]]\nname = \"basic\"\n",
            "t.toml",
            2,
        )
        .unwrap()
    }

    /// A customer placed in silver by one purchase at day 10.
    fn silver() -> CustomerState {
        let rules = rules();
        let mut state = CustomerState::default();
        let event = Event {
            event_id: "e1".into(),
            customer_id: "c".into(),
            kind: EventKind::Purchase,
            amount_minor: 6000,
            occurred_at_ms: 10 * DAY,
            pin: None,
            points: 0,
            attributes: Vec::new(),
        };
        let policy = DedupPolicy {
            horizon_ms: 7 * DAY,
            max_ids: 4,
        };
        state.apply(&event, &rules, policy, 10 * DAY, &Cutoffs::default());
        assert_eq!(state.tier.as_deref(), Some("silver"));
        state
    }

    #[test]
    fn a_customer_told_another_tier_is_told_theirs_once() {
        let rules = rules();
        let mut state = silver();
        let before = state.clone();
        let t = state
            .restate(&rules, Some("gold"), 12 * DAY, &Cutoffs::default())
            .expect("told gold, in silver");
        assert_eq!(t.previous.as_deref(), Some("gold"));
        assert_eq!(rules.tiers()[t.tier].name, "silver");
        assert_eq!(t.direction, Direction::Down);
        assert_eq!(t.reason, ChangeReason::RulesChanged);
        assert_eq!(t.policy, RESTATED);
        assert_eq!(t.at, 12 * DAY);
        assert_eq!(t.eval.tier, t.tier);
        // Only the sequence and the engine time moved: tier, policy clocks and timer stay.
        assert_eq!(state.seq, before.seq + 1);
        assert_eq!(
            CustomerState {
                seq: before.seq,
                at: before.at,
                ..state.clone()
            },
            before
        );
        // Told silver now (the change above), nothing more to tell.
        assert_eq!(
            state.restate(&rules, Some("silver"), 13 * DAY, &Cutoffs::default()),
            None
        );
    }

    #[test]
    fn directions_follow_the_running_rules_order() {
        let rules = rules();
        let told = |published: Option<&str>| {
            silver()
                .restate(&rules, published, 12 * DAY, &Cutoffs::default())
                .map(|t| t.direction)
        };
        assert_eq!(told(Some("basic")), Some(Direction::Up));
        assert_eq!(told(Some("gold")), Some(Direction::Down));
        // Erased (a tombstone) or never told: the tier comes as a first placement.
        assert_eq!(told(None), Some(Direction::Initial));
        // A tier the running rules do not know ranks below every known one.
        assert_eq!(told(Some("platinum-of-old-rules")), Some(Direction::Up));
        assert_eq!(told(Some("silver")), None);
    }

    #[test]
    fn a_customer_never_placed_has_nothing_to_restate() {
        let rules = rules();
        let mut state = CustomerState::default();
        assert_eq!(
            state.restate(&rules, Some("gold"), DAY, &Cutoffs::default()),
            None
        );
        assert_eq!(state, CustomerState::default());
    }

    #[test]
    fn engine_time_never_runs_backwards() {
        let rules = rules();
        let mut state = silver();
        let t = state
            .restate(&rules, Some("gold"), DAY, &Cutoffs::default())
            .unwrap();
        assert_eq!(t.at, 10 * DAY, "the customer's own time, not before it");
    }
}
