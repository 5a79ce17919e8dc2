//! Tier rules: pure placement of a customer on a tier from their metrics and scores, the
//! downgrade policy of each tier, and the moments at which time alone can move a customer.
//! No I/O and no clock: `now` is always an argument, so the live pipeline, replays,
//! `tierd simulate` and tests run exactly the same code.
//!
//! A [`Rules`] value is loaded once from a versioned TOML rules file (reference:
//! `docs/rules.md`). Tiers are ordered best first: index 0 is the top tier, and a move to a
//! lower index is an upgrade.

pub mod condition;
pub mod operand;
mod parse;
pub mod policy;
pub mod rank;
pub mod score;
pub mod value;
pub mod window;

use crate::model::calendar::{self, Unit, DAY_MS};
use crate::model::money;
pub use crate::model::state::TimeCause;
use condition::Condition;
use operand::{Facts, Operand, Type};
use policy::{Review, TierPolicy};
use rank::{CutPoint, Cutoffs, Rank};
use score::Score;
use std::path::Path;
use value::{Ratio, Value};
use window::Window;

/// A tier as declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierDef {
    /// Stable identifier on change events and in the API (e.g. `"A"`, `"vip"`).
    pub name: String,
    /// Human-readable name; defaults to `name`.
    pub display_name: Option<String>,
}

impl TierDef {
    /// The display name, or the name.
    pub fn display(&self) -> &str {
        self.display_name.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Debug)]
struct Tier {
    def: TierDef,
    when: Vec<Condition>,
    rule: String,
    policy: TierPolicy,
}

/// A problem in a rules file: where (line, field) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field, e.g. `tiers[2].when[0]`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Error in a rules file, naming the file, line and field.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file could not be read.
    #[error("rules file {file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the rules schema.
    #[error("rules file {file}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// The TOML parser's message (with line and column).
        message: String,
    },
    /// Fields with invalid values (all of them, not just the first).
    #[error("{}", render(file, problems))]
    Invalid {
        /// The file.
        file: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

fn render(file: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| match p.line {
            Some(line) => format!(
                "rules file {file}:{line}: field `{}`: {}",
                p.field, p.message
            ),
            None => format!("rules file {file}: field `{}`: {}", p.field, p.message),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

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

/// A score: fixed bins over a metric, or bands of a rank.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ScoreDef {
    Fixed(Score),
    /// (score, cut point) per bin, best first; the last bin has no cut point.
    Ranked {
        rank: usize,
        bins: Vec<(u8, Option<usize>)>,
    },
}

/// How many day and month buckets a customer's state keeps (0: that unit is not used).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct BucketsKept {
    days: u32,
    months: u32,
}

/// A loaded, validated rules file.
#[derive(Debug)]
pub struct Rules {
    version: String,
    version_hash: u32,
    description: Option<String>,
    windows: Vec<Window>,
    score_names: Vec<String>,
    scores: Vec<ScoreDef>,
    rank_names: Vec<String>,
    ranks: Vec<Rank>,
    cut_points: Vec<CutPoint>,
    cell: Vec<usize>,
    operands: Vec<Operand>,
    tiers: Vec<Tier>,
    tier_defs: Vec<TierDef>,
    recency_points: Vec<i64>,
    /// Buckets the longest window of each unit needs.
    keep: BucketsKept,
    at_risk_ms: i64,
    fraction_digits: u32,
}

/// A condition as shown in rule texts.
fn describe(
    c: &Condition,
    windows: &[Window],
    scores: &[String],
    ranks: &[String],
    cut_points: &[CutPoint],
    fraction_digits: u32,
) -> String {
    let op = c.operand();
    let name = op.name(windows, scores, ranks);
    match c {
        Condition::InTop { point, negate, .. } => format!(
            "{name} {} {}",
            if *negate { ">" } else { "<=" },
            cut_points[*point].describe()
        ),
        _ => c.describe(&name, &|r| match op.kind() {
            Type::Money => money::format_minor(r.floor(), fraction_digits),
            _ => r.floor().to_string(),
        }),
    }
}

impl Rules {
    /// Loads and validates a rules file. `fraction_digits` is the currency's minor-unit
    /// exponent, used to read monetary bounds exactly.
    ///
    /// # Errors
    /// [`RulesError`] naming the file, line and field of every problem.
    pub fn load(path: &Path, fraction_digits: u32) -> Result<Self, RulesError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file, fraction_digits)
    }

    /// Parses rules from text; `file` names the source in errors.
    ///
    /// # Errors
    /// [`RulesError`] naming the file, line and field of every problem.
    pub fn parse(text: &str, file: &str, fraction_digits: u32) -> Result<Self, RulesError> {
        parse::parse(text, file, fraction_digits)
    }

    /// The rules version, carried on every change event.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The short hash of the version stored per customer.
    pub fn version_hash(&self) -> u32 {
        self.version_hash
    }

    /// Free-text description from the file.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The tiers, best first.
    pub fn tiers(&self) -> &[TierDef] {
        &self.tier_defs
    }

    /// Index of a tier by name.
    pub fn tier_index(&self, name: &str) -> Option<usize> {
        self.tier_defs.iter().position(|t| t.name == name)
    }

    /// The rule text of a tier's entry conditions.
    pub fn rule(&self, tier: usize) -> &str {
        &self.tiers[tier].rule
    }

    /// The downgrade policy of a tier.
    pub fn policy(&self, tier: usize) -> &TierPolicy {
        &self.tiers[tier].policy
    }

    /// Lead time of at-risk notices (0: none), ms.
    pub fn at_risk_ms(&self) -> i64 {
        self.at_risk_ms
    }

    /// How many day and month buckets a customer keeps (0: that unit is not used).
    pub fn keep_buckets(&self, unit: Unit) -> u32 {
        match unit {
            Unit::Day => self.keep.days,
            Unit::Month => self.keep.months,
        }
    }

    /// Whether time alone can change anything for anyone under these rules.
    pub fn uses_time(&self) -> bool {
        !self.recency_points.is_empty()
            || !self.windows.is_empty()
            || self.tiers.iter().any(|t| {
                t.policy.review != Review::Continuous
                    || t.policy.grace_ms > 0
                    || t.policy.min_stay_ms > 0
            })
    }

    /// The metric name of an operand.
    pub fn operand_name(&self, op: Operand) -> String {
        op.name(&self.windows, &self.score_names, &self.rank_names)
    }

    /// The declared ranks.
    pub fn ranks(&self) -> &[Rank] {
        &self.ranks
    }

    /// The cut points the rules use (each needs a cut-off value).
    pub fn cut_points(&self) -> &[CutPoint] {
        &self.cut_points
    }

    /// Whether any tier or score is rank-based.
    pub fn uses_ranks(&self) -> bool {
        !self.ranks.is_empty()
    }

    /// Score names, in cell order first and then the rest, with their indexes.
    pub fn score_names(&self) -> &[String] {
        &self.score_names
    }

    /// A value shown as on change events: money as a decimal string, the rest as numbers.
    pub fn show(&self, op: Operand, v: &Value) -> serde_json::Value {
        match v {
            Value::Undefined => serde_json::Value::Null,
            Value::Text(s) => serde_json::Value::String(s.clone()),
            Value::Num(r) => match op.kind() {
                Type::Money => {
                    serde_json::Value::String(money::format_minor(r.floor(), self.fraction_digits))
                }
                _ => serde_json::Value::from(i64::try_from(r.floor()).unwrap_or(i64::MAX)),
            },
        }
    }

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
                m => facts.read(m, &self.windows, now).num().map(Ratio::floor),
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
                ScoreDef::Fixed(s) => s.score(&facts.read(s.metric, &self.windows, now)),
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
                    base => facts.read(base, &self.windows, now),
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

    fn all_hold(conds: &[Condition], values: &[(Operand, Value)], in_top: &[bool]) -> bool {
        conds
            .iter()
            .all(|c| c.holds(Self::value(values, c.operand()), in_top))
    }

    /// Whether a customer in `tier` keeps it by its hysteresis (`stay`) conditions.
    pub fn stays(&self, tier: usize, eval: &Evaluation) -> bool {
        let stay = &self.tiers[tier].policy.stay;
        !stay.is_empty() && Self::all_hold(stay, &eval.values, &eval.in_top)
    }

    /// The conditions of `tier` (its `stay` conditions if it has them, else `when`) that do
    /// not hold in `eval`, each with its current value and, for `>=`/`>` bounds on money or
    /// counts, how much is missing.
    pub fn shortfall(&self, tier: usize, eval: &Evaluation) -> Vec<serde_json::Value> {
        let t = &self.tiers[tier];
        let conds = if t.policy.stay.is_empty() {
            &t.when
        } else {
            &t.policy.stay
        };
        conds
            .iter()
            .filter(|c| !c.holds(Self::value(&eval.values, c.operand()), &eval.in_top))
            .map(|c| {
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
                            | Operand::Window(
                                _,
                                operand::WindowField::Count | operand::WindowField::Sum
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
            })
            .collect()
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
            let buckets = match w.unit() {
                Unit::Day => facts.days,
                Unit::Month => facts.months,
            };
            if let Some(t) = w.next_change(buckets, now) {
                consider(t, TimeCause::WindowExpiry);
            }
        }
        best
    }

    /// The lowest bucket index worth keeping at `now` for a unit.
    pub fn bucket_floor(&self, unit: Unit, now: i64) -> i32 {
        let keep = self.keep_buckets(unit);
        let cur = calendar::index(unit, now);
        match unit {
            Unit::Day => cur.saturating_sub(i32::try_from(keep).unwrap_or(i32::MAX) - 1),
            // Calendar windows need their period's first month, which is never older than
            // `months - 1` before the current one.
            Unit::Month => cur.saturating_sub(i32::try_from(keep).unwrap_or(i32::MAX) - 1),
        }
    }
}

#[cfg(test)]
mod tests;
