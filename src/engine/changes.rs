//! The published events of an evaluation: a tier change built from a transition, an at-risk
//! notice from a notice (their shapes and ids are [`crate::model::change`]).

use super::rules::Rules;
use super::transition::{Notice, Transition};
use crate::model::change::{
    at_risk_id, change_id, AtRiskNotice, Cause, MetricsView, MoneyFormat, TierChange,
};
use crate::model::state::CustomerState;
use crate::model::time::format_ms;

impl TierChange {
    /// The change event of a transition just applied to `state` (which is the state after it).
    pub fn new(
        customer_id: &str,
        state: &CustomerState,
        transition: &Transition,
        rules: &Rules,
        money: &MoneyFormat,
        cause: Option<Cause>,
    ) -> Self {
        let tier = &rules.tiers()[transition.tier];
        let (values, scores) = evaluation_maps(rules, &transition.eval);
        Self {
            event_id: change_id(customer_id, state.origin, state.seq),
            customer_id: customer_id.to_owned(),
            sequence: state.seq,
            previous_tier: transition.previous.clone(),
            tier: tier.name.clone(),
            tier_display_name: tier.display().to_owned(),
            direction: transition.direction,
            reason: transition.reason,
            occurred_at: format_ms(transition.at),
            rules_version: rules.version().to_owned(),
            rule: transition.rule.clone(),
            policy: transition.policy.clone(),
            metrics: MetricsView::of(state, money),
            values,
            scores,
            ranks: super::explain::rank_view(rules, &transition.eval),
            cutoffs_version: rules
                .uses_ranks()
                .then_some(transition.eval.cutoffs_version),
            cause,
        }
    }
}

/// Numbers the change just decided for `state` (its `seq` already counts it) above the
/// partition's sequence floor `floor` (0: none), if it is not above it already.
///
/// A replay after Redis lost writes publishes again the changes of the input it re-applies.
/// When it can reproduce them (the same rules, cut-offs and timer passes), they come out byte
/// for byte with the same ids. When it falls back to the running rules, none is decided as
/// it first was, and a change numbered as before would carry an id already published for
/// another body, and a sequence below the customer's last one published. So such a replay
/// sets the floor to the highest sequence the partition ever published, and from then on
/// every customer's next change is numbered above it: a new id, and a sequence that never
/// goes backwards on the output topic (it jumps once per customer and raise).
pub fn number_above(state: &mut CustomerState, floor: u64) {
    if state.seq <= floor {
        state.seq = floor + 1;
    }
}

/// Metric values and scores of an evaluation as JSON maps (for events and the API).
pub fn evaluation_maps(
    rules: &Rules,
    eval: &super::rules::Evaluation,
) -> (
    serde_json::Map<String, serde_json::Value>,
    serde_json::Map<String, serde_json::Value>,
) {
    use super::rules::operand::Operand;
    let mut values = serde_json::Map::new();
    let mut scores = serde_json::Map::new();
    for (i, name) in rules.score_names().iter().enumerate() {
        scores.insert(name.clone(), eval.scores[i].into());
    }
    for (op, v) in &eval.values {
        match op {
            Operand::Score(_) | Operand::Rank(_) => {}
            Operand::Cell | Operand::Product => {
                scores.insert(rules.operand_name(*op), rules.show(*op, v));
            }
            _ => {
                values.insert(rules.operand_name(*op), rules.show(*op, v));
            }
        }
    }
    if let Some(cell) = &eval.cell {
        scores.insert("cell".into(), cell.clone().into());
    }
    (values, scores)
}

impl AtRiskNotice {
    /// The published notice, for the incarnation `origin` of the customer, under the
    /// partition's sequence floor `floor` (see [`number_above`]).
    pub fn new(
        customer_id: &str,
        origin: Option<u64>,
        notice: &Notice,
        rules: &Rules,
        floor: u64,
    ) -> Self {
        Self {
            kind: "at_risk",
            event_id: at_risk_id(customer_id, origin, notice.at, floor),
            customer_id: customer_id.to_owned(),
            tier: rules.tiers()[notice.tier].name.clone(),
            falls_to: rules.tiers()[notice.falls_to].name.clone(),
            downgrade_at: format_ms(notice.at),
            cause: notice.cause,
            to_stay: notice.shortfall.clone(),
            occurred_at: format_ms(notice.now),
            rules_version: rules.version().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::number_above;
    use crate::model::CustomerState;

    #[test]
    fn a_change_below_the_floor_is_numbered_above_it_once() {
        let numbered = |seq: u64, floor: u64| {
            let mut state = CustomerState {
                seq,
                ..CustomerState::default()
            };
            number_above(&mut state, floor);
            state.seq
        };
        // No floor: numbered as decided.
        assert_eq!(numbered(1, 0), 1);
        assert_eq!(numbered(5, 0), 5);
        // The first change at or below the floor jumps just above it (a new customer too)...
        assert_eq!(numbered(1, 40), 41);
        assert_eq!(numbered(40, 40), 41);
        // ...and the customer's next ones follow on from there.
        assert_eq!(numbered(42, 40), 42);
        assert_eq!(numbered(41, 40), 41);
    }
}
