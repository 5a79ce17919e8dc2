//! Evaluating the rules for one customer at one moment: metric values, rank values and
//! top-band membership under the cut-offs in force, scores and cell, the tier the entry
//! conditions place them in; whether they may stay (hysteresis), what they miss to stay, and
//! when time alone next changes a metric.

use super::condition::{self, Clause, Condition};
use super::operand::{self, Facts, Operand};
use super::rank::Cutoffs;
use super::value::{Ratio, Value};
use super::{describe, Rules, ScoreDef, TimeCause};
use crate::model::calendar::{Unit, DAY_MS};

/// The result of evaluating the rules for one customer at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// Every metric the rules reference, with its value.
    pub values: Vec<(Operand, Value)>,
    /// Each score, in declaration (name) order.
    pub scores: Vec<u8>,
    /// The cell, if `cell` is declared.
    pub cell: Option<String>,
    /// The tier the entry conditions place the customer in (before policy).
    pub tier: usize,
    /// The customer's value in each rank (`None`: not ranked, e.g. no purchase yet).
    pub ranks: Vec<Option<i128>>,
    /// Per cut point of the rules: whether the customer is in that top band.
    pub in_top: Vec<bool>,
    /// Version of the cut-offs used (0: none yet).
    pub cutoffs_version: u64,
}

impl Rules {
    /// Evaluates metrics, ranks, scores and the entry placement at `now`, with the rank
    /// cut-offs in force (ignored if they belong to another rules version).
    pub fn evaluate(&self, facts: &Facts<'_>, now: i64, cutoffs: &Cutoffs) -> Evaluation {
        let valid =
            cutoffs.rules == self.version_hash && cutoffs.values.len() == self.cut_points.len();
        let cut = |point: usize| if valid { cutoffs.value(point) } else { None };
        let mut ranks: Vec<Option<i128>> = self
            .ranks
            .iter()
            .map(|r| match r.metric {
                Operand::Product => None,
                m => facts
                    .read(m, &self.windows, &self.calendar, now)
                    .num()
                    .map(Ratio::floor),
            })
            .collect();
        let mut in_top: Vec<bool> = self
            .cut_points
            .iter()
            .enumerate()
            .map(|(i, p)| matches!((ranks[p.rank], cut(i)), (Some(v), Some(c)) if v >= c))
            .collect();
        let scores: Vec<u8> = self
            .scores
            .iter()
            .map(|s| match s {
                ScoreDef::Fixed(s) => {
                    s.score(&facts.read(s.metric, &self.windows, &self.calendar, now))
                }
                ScoreDef::Ranked { bins, .. } => bins
                    .iter()
                    .find(|(_, point)| point.is_none_or(|p| in_top[p]))
                    .map_or(1, |(score, _)| *score),
            })
            .collect();
        let cell = (!self.cell.is_empty()).then(|| {
            self.cell
                .iter()
                .map(|&i| char::from(b'0' + scores[i]))
                .collect::<String>()
        });
        let product: i128 = self.cell.iter().map(|&i| i128::from(scores[i])).product();
        for (i, r) in self.ranks.iter().enumerate() {
            if r.metric == Operand::Product {
                ranks[i] = Some(product);
            }
        }
        for (i, p) in self.cut_points.iter().enumerate() {
            in_top[i] = matches!((ranks[p.rank], cut(i)), (Some(v), Some(c)) if v >= c);
        }
        let values: Vec<(Operand, Value)> = self
            .operands
            .iter()
            .map(|&op| {
                let v = match op {
                    Operand::Score(i) => Value::Num(Ratio::int(i128::from(scores[i]))),
                    Operand::Cell => cell.clone().map_or(Value::Undefined, Value::Text),
                    Operand::Product => Value::Num(Ratio::int(product)),
                    Operand::Rank(r) => {
                        ranks[r].map_or(Value::Undefined, |v| Value::Num(Ratio::int(v)))
                    }
                    base => facts.read(base, &self.windows, &self.calendar, now),
                };
                (op, v)
            })
            .collect();
        let tier = self
            .tiers
            .iter()
            .position(|t| Self::all_hold(&t.when, &values, &in_top))
            .unwrap_or(self.tiers.len() - 1);
        Evaluation {
            values,
            scores,
            cell,
            tier,
            ranks,
            in_top,
            cutoffs_version: if valid { cutoffs.version } else { 0 },
        }
    }

    fn value(values: &[(Operand, Value)], op: Operand) -> &Value {
        values
            .iter()
            .find(|(o, _)| *o == op)
            .map_or(&Value::Undefined, |(_, v)| v)
    }

    fn all_hold(conds: &[Clause], values: &[(Operand, Value)], in_top: &[bool]) -> bool {
        conds
            .iter()
            .all(|c| c.holds(&|op| Self::value(values, op), in_top))
    }

    /// Whether a customer in `tier` keeps it by its hysteresis (`stay`) conditions.
    pub fn stays(&self, tier: usize, eval: &Evaluation) -> bool {
        let stay = &self.tiers[tier].policy.stay;
        !stay.is_empty() && Self::all_hold(stay, &eval.values, &eval.in_top)
    }

    /// The conditions of `tier` (its `stay` conditions if it has them, else `when`) that do
    /// not hold in `eval`, each with its current value and, for `>=`/`>` bounds on money,
    /// counts or points, how much is missing: what a customer in the tier misses to stay.
    pub fn shortfall(&self, tier: usize, eval: &Evaluation) -> Vec<serde_json::Value> {
        let t = &self.tiers[tier];
        let conds = if t.policy.stay.is_empty() {
            &t.when
        } else {
            &t.policy.stay
        };
        self.failing(conds, eval)
    }

    /// The entry conditions (`when`) of `tier` that do not hold in `eval`, as
    /// [`Self::shortfall`]: what a customer below the tier misses to enter it.
    pub fn missing_to_enter(&self, tier: usize, eval: &Evaluation) -> Vec<serde_json::Value> {
        self.failing(&self.tiers[tier].when, eval)
    }

    fn failing(&self, conds: &[Clause], eval: &Evaluation) -> Vec<serde_json::Value> {
        conds
            .iter()
            .filter(|c| !c.holds(&|op| Self::value(&eval.values, op), &eval.in_top))
            .map(|c| self.missing(c, eval))
            .collect()
    }

    /// What a clause that does not hold misses: a comparison's current value and, for
    /// `>=`/`>` bounds on money, counts and points, how much is missing; a group's
    /// description with what each of its failing members misses (`any`: every member fails).
    fn missing(&self, clause: &Clause, eval: &Evaluation) -> serde_json::Value {
        let c = match clause {
            Clause::One(c) => c,
            Clause::Any(members) | Clause::All(members) => {
                let key = if matches!(clause, Clause::Any(_)) {
                    "any"
                } else {
                    "all"
                };
                let failing: Vec<serde_json::Value> = members
                    .iter()
                    .filter(|m| !m.holds(&|op| Self::value(&eval.values, op), &eval.in_top))
                    .map(|m| self.missing(m, eval))
                    .collect();
                return serde_json::json!({
                    "condition": self.describe_clause(clause),
                    key: failing,
                });
            }
        };
        let op = c.operand();
        let current = Self::value(&eval.values, op);
        let mut out = serde_json::json!({
            "condition": describe(c, &self.windows, &self.score_names, &self.rank_names, &self.cut_points, self.fraction_digits),
            "value": self.show(op, current),
        });
        if let (
            Condition::Compare {
                cmp: condition::Cmp::Ge | condition::Cmp::Gt,
                value,
                ..
            },
            Some(cur),
        ) = (c, current.num())
        {
            if matches!(
                op,
                Operand::Count
                    | Operand::Sum
                    | Operand::Points
                    | Operand::Window(
                        _,
                        operand::WindowField::Count
                            | operand::WindowField::Sum
                            | operand::WindowField::Points
                    )
            ) {
                let strict = matches!(
                    c,
                    Condition::Compare {
                        cmp: condition::Cmp::Gt,
                        ..
                    }
                );
                let missing = value.floor() - cur.floor() + i128::from(strict);
                out["missing"] = self.show(op, &Value::Num(Ratio::int(missing)));
            }
        }
        out
    }

    /// The first moment after `now` at which time alone changes a metric the rules read.
    pub fn next_metric_change(&self, facts: &Facts<'_>, now: i64) -> Option<(i64, TimeCause)> {
        let mut best: Option<(i64, TimeCause)> = None;
        let mut consider = |t: i64, cause: TimeCause| {
            if t > now && best.is_none_or(|(b, _)| t < b) {
                best = Some((t, cause));
            }
        };
        if let Some(last) = facts.last_purchase {
            if let Some(t) = self
                .recency_points
                .iter()
                .map(|&p| last.saturating_add(p.saturating_mul(DAY_MS)))
                .find(|&t| t > now)
            {
                consider(t, TimeCause::Recency);
            }
        }
        for w in &self.windows {
            if let Some(t) = facts.next_change(w, &self.calendar, now) {
                consider(t, TimeCause::WindowExpiry);
            }
        }
        best
    }

    /// The lowest bucket index worth keeping at `now` for a unit.
    pub fn bucket_floor(&self, unit: Unit, now: i64) -> i32 {
        self.floor_of(unit, self.keep_buckets(unit), now)
    }

    /// The lowest bucket index worth keeping at `now` for `keep` buckets of a unit.
    pub fn floor_of(&self, unit: Unit, keep: u32, now: i64) -> i32 {
        let cur = self.calendar.index(unit, now);
        match unit {
            Unit::Day => cur.saturating_sub(i32::try_from(keep).unwrap_or(i32::MAX) - 1),
            // Calendar windows need their period's first month, which is never older than
            // `months - 1` before the current one.
            Unit::Month => cur.saturating_sub(i32::try_from(keep).unwrap_or(i32::MAX) - 1),
        }
    }
}
