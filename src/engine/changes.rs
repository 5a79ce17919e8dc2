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
    /// The published notice, for the incarnation `origin` of the customer.
    pub fn new(customer_id: &str, origin: Option<u64>, notice: &Notice, rules: &Rules) -> Self {
        Self {
            kind: "at_risk",
            event_id: at_risk_id(customer_id, origin, notice.at),
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
