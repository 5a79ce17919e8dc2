//! Why a customer is where they are, and what moves them next: the API's customer view and
//! `tierd rules explain`. Pure: a state, the rules and an engine time in, a value out.

use super::changes::evaluation_maps;
use super::transition::Trigger;
use crate::engine::rules::rank::Cutoffs;
use crate::engine::rules::{Rules, TimeCause};
use crate::model::change::{Direction, MetricsView, MoneyFormat};
use crate::model::state::{rules_hash, CustomerState, Pin, PinMode};
use crate::model::time::format_ms;
use serde::Serialize;

/// The explanation of one customer.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The customer.
    pub customer_id: String,
    /// Current tier (null before the first event).
    pub tier: Option<String>,
    /// Its display name.
    pub tier_display_name: Option<String>,
    /// Since when (engine time).
    pub tier_since: Option<String>,
    /// Number of tier changes so far.
    pub tier_changes: u64,
    /// The running rules version.
    pub rules_version: String,
    /// Whether the customer was last evaluated under the running rules version (false until
    /// the rules sweep or their next event reaches them).
    pub evaluated_under_current_rules: bool,
    /// Engine time the values below are computed at.
    pub as_of: String,
    /// Lifetime metrics.
    pub metrics: MetricsView,
    /// Every metric the rules read, at `as_of`.
    pub values: serde_json::Map<String, serde_json::Value>,
    /// Scores at `as_of` (with `cell` and `product` when declared).
    pub scores: serde_json::Map<String, serde_json::Value>,
    /// Per rank: the customer's ranked value and the smallest top band they are in (e.g.
    /// `"1%"`), under the cut-offs of version `cutoffs_version`.
    pub ranks: serde_json::Map<String, serde_json::Value>,
    /// Version of the rank cut-offs used (0: none yet).
    pub cutoffs_version: u64,
    /// The rule that places the customer by their metrics at `as_of` (before policy).
    pub placed_by: String,
    /// The current tier's downgrade policy.
    pub policy: Option<String>,
    /// End of the current validity period (next review), if the tier is reviewed.
    pub valid_until: Option<String>,
    /// A downgrade waiting out its grace period since then.
    pub downgrade_pending_since: Option<String>,
    /// A manual pin.
    pub pin: Option<PinView>,
    /// The next moment time alone re-evaluates the customer, and what it would do if
    /// nothing else happened before.
    pub next: Option<NextMove>,
    /// What it takes to reach the next better tier now: its failing conditions with the value
    /// and what is missing.
    pub to_reach: Option<Target>,
}

/// A manual pin as shown.
#[derive(Debug, Clone, Serialize)]
pub struct PinView {
    /// Pinned tier.
    pub tier: String,
    /// `floor` or `fixed`.
    pub mode: &'static str,
    /// When it lapses.
    pub expires_at: Option<String>,
    /// The override event that set it.
    pub set_by: String,
}

/// The next time-driven evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct NextMove {
    /// When.
    pub at: String,
    /// Why then.
    pub cause: TimeCause,
    /// The tier the customer would be in after it.
    pub projected_tier: String,
    /// `up`, `down` or null (no change).
    pub direction: Option<Direction>,
    /// If it is a downgrade: what it takes to stay (failing conditions of the current tier at
    /// that moment, with the value and what is missing).
    pub to_stay: Vec<serde_json::Value>,
}

/// A better tier and what it takes.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The tier.
    pub tier: String,
    /// Its failing conditions now.
    pub missing: Vec<serde_json::Value>,
}

impl From<&Pin> for PinView {
    fn from(p: &Pin) -> Self {
        Self {
            tier: p.tier.clone(),
            mode: match p.mode {
                PinMode::Floor => "floor",
                PinMode::Fixed => "fixed",
            },
            expires_at: p.until.map(format_ms),
            set_by: p.by.clone(),
        }
    }
}

/// Ranked values and bands of an evaluation, by rank name.
pub fn rank_view(
    rules: &Rules,
    eval: &crate::engine::rules::Evaluation,
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for (r, rank) in rules.ranks().iter().enumerate() {
        let band = rules
            .cut_points()
            .iter()
            .enumerate()
            .filter(|(i, p)| p.rank == r && eval.in_top[*i])
            .min_by(|a, b| a.1.pct.cmp(&b.1.pct))
            .map(|(_, p)| p.describe());
        out.insert(
            rank.name.clone(),
            serde_json::json!({
                "value": eval.ranks[r].map(|v| v.to_string()),
                "top": band,
            }),
        );
    }
    out
}

/// Explains `state` at engine time `now` (never before the customer's last evaluation).
pub fn explain(
    customer_id: &str,
    state: &CustomerState,
    rules: &Rules,
    money: &MoneyFormat,
    now: i64,
    cutoffs: &Cutoffs,
) -> Explanation {
    let now = now.max(state.at).max(state.clock);
    let eval = rules.evaluate(&state.facts(), now, cutoffs);
    let (values, scores) = evaluation_maps(rules, &eval);
    let current = state.tier.as_deref().and_then(|t| rules.tier_index(t));
    let next = state.timer.map(|(due, cause)| {
        let mut projected = state.clone();
        let outcome = projected.evaluate(rules, due, Trigger::Time(cause), cutoffs);
        let after = projected.tier.clone().unwrap_or_default();
        let direction = outcome.transition.as_ref().map(|t| t.direction);
        let to_stay = match (&outcome.transition, current) {
            (Some(t), Some(c)) if t.direction == Direction::Down => rules.shortfall(c, &t.eval),
            _ => Vec::new(),
        };
        NextMove {
            at: format_ms(due),
            cause,
            projected_tier: after,
            direction,
            to_stay,
        }
    });
    let to_reach = current.filter(|&c| c > 0).map(|c| Target {
        tier: rules.tiers()[c - 1].name.clone(),
        missing: rules.missing_to_enter(c - 1, &eval),
    });
    Explanation {
        customer_id: customer_id.to_owned(),
        tier: state.tier.clone(),
        tier_display_name: current.map(|c| rules.tiers()[c].display().to_owned()),
        tier_since: state.tier.as_ref().map(|_| format_ms(state.since)),
        tier_changes: state.seq,
        rules_version: rules.version().to_owned(),
        evaluated_under_current_rules: state.rules_hash == rules_hash(rules.version()),
        as_of: format_ms(now),
        metrics: MetricsView::of(state, money),
        values,
        scores,
        ranks: rank_view(rules, &eval),
        cutoffs_version: eval.cutoffs_version,
        placed_by: rules.rule(eval.tier).to_owned(),
        policy: current.map(|c| rules.policy(c).text.clone()),
        valid_until: state.review.map(format_ms),
        downgrade_pending_since: state.pending.map(format_ms),
        pin: state.pin.as_ref().map(PinView::from),
        next,
        to_reach,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state::DedupPolicy;
    use crate::model::time::parse_rfc3339_ms;
    use crate::model::{Event, EventKind};

    #[test]
    fn shows_the_next_move_and_what_it_takes_to_stay_or_climb() {
        let rules = Rules::parse(
            r#"
version = "x"
[windows.d30]
length = "30 days"
[[tiers]]
name = "gold"
when = ["window.d30.sum >= 1000"]
# What it takes to climb is the entry bar, never the lower bar of staying.
stay = ["window.d30.sum >= 200"]
[[tiers]]
name = "silver"
when = ["window.d30.sum >= 300"]
[[tiers]]
name = "basic"
"#,
            "x.toml",
            2,
        )
        .unwrap();
        let at = |s: &str| parse_rfc3339_ms(s).unwrap();
        let mut s = CustomerState::default();
        for (i, (when, amount)) in [
            ("2026-01-01T00:00:00Z", 30_000),
            ("2026-01-20T00:00:00Z", 5_000),
        ]
        .iter()
        .enumerate()
        {
            let e = Event {
                event_id: format!("e{i}"),
                customer_id: "c".into(),
                kind: EventKind::Purchase,
                amount_minor: *amount,
                occurred_at_ms: at(when),
                pin: None,
                points: 0,
                attributes: Vec::new(),
            };
            s.apply(
                &e,
                &rules,
                DedupPolicy {
                    horizon_ms: 1 << 40,
                    max_ids: 8,
                },
                i64::MIN,
                &Cutoffs::default(),
            );
        }
        let money = MoneyFormat {
            currency: "EUR".into(),
            fraction_digits: 2,
        };
        let x = explain(
            "c",
            &s,
            &rules,
            &money,
            at("2026-01-25T00:00:00Z"),
            &Cutoffs::default(),
        );
        assert_eq!(x.tier.as_deref(), Some("silver"));
        assert_eq!(x.values["window.d30.sum"], "350.00");
        let next = x.next.expect("the 1 Jan purchase leaves the window");
        assert_eq!(next.at, "2026-01-31T00:00:00.000Z");
        assert_eq!(next.projected_tier, "basic");
        assert_eq!(next.direction, Some(Direction::Down));
        assert_eq!(next.to_stay[0]["missing"], "250.00");
        let reach = x.to_reach.expect("gold is above");
        assert_eq!(
            (reach.tier.as_str(), &reach.missing[0]["missing"]),
            ("gold", &serde_json::json!("650.00"))
        );
    }
}
