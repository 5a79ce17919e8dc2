//! Tier rules: pure placement of a customer on a tier from their metrics and scores, the
//! downgrade policy of each tier, and the moments at which time alone can move a customer.
//! No I/O and no clock: `now` is always an argument, so the live pipeline, replays,
//! `tierd simulate` and tests run exactly the same code.
//!
//! A [`Rules`] value is loaded once from a versioned TOML rules file (reference:
//! `docs/rules.md`). Tiers are ordered best first: index 0 is the top tier, and a move to a
//! lower index is an upgrade.

pub mod condition;
mod evaluate;
pub mod filter;
pub mod operand;
mod parse;
pub mod policy;
pub mod rank;
pub mod score;
pub mod value;
pub mod window;

use crate::model::calendar::Unit;
use crate::model::money;
pub use crate::model::state::TimeCause;
use condition::{Clause, Condition};
use operand::{Operand, Type};
use policy::{Review, TierPolicy};
use rank::{CutPoint, Rank};
use score::Score;
use std::path::Path;
use value::Value;
use window::Window;

pub use evaluate::Evaluation;

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
    when: Vec<Clause>,
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
    /// The program's time zone (`time_zone`; UTC by default).
    calendar: crate::model::calendar::Calendar,
    windows: Vec<Window>,
    /// The window series customers keep (filtered windows, windows read for points).
    series: Vec<window::SeriesDef>,
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
    /// The text it was parsed from: each partition keeps it in Redis, so that a replay of
    /// input applied before a rules change can run under the rules it first ran under.
    text: String,
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
    /// A clause as shown in rule texts (`(a or b)` for a group).
    fn describe_clause(&self, clause: &Clause) -> String {
        clause.describe(&|c| {
            describe(
                c,
                &self.windows,
                &self.score_names,
                &self.rank_names,
                &self.cut_points,
                self.fraction_digits,
            )
        })
    }

    /// The program's calendar (`time_zone`): day and month buckets, calendar windows and
    /// reviews, anniversaries.
    pub fn calendar(&self) -> &crate::model::calendar::Calendar {
        &self.calendar
    }

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

    /// The text the rules were parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The currency's minor-unit exponent the rules were read with.
    pub fn fraction_digits(&self) -> u32 {
        self.fraction_digits
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

    /// The declared windows.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// The window series a customer keeps, in order.
    pub fn series(&self) -> &[window::SeriesDef] {
        &self.series
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

    /// Whether these rules rank customers exactly as `other` does: the same ranks, ties and
    /// metrics, a window metric's window defined alike (span, filter and points series; its
    /// name and position in the file may differ).
    pub fn ranks_like(&self, other: &Rules) -> bool {
        self.ranks.len() == other.ranks.len()
            && self.ranks.iter().zip(&other.ranks).all(|(a, b)| {
                a.name == b.name
                    && a.ties == b.ties
                    && match (a.metric, b.metric) {
                        (Operand::Window(i, f), Operand::Window(j, g)) => {
                            let (w, v) = (&self.windows[i], &other.windows[j]);
                            f == g
                                && w.span == v.span
                                && w.filter == v.filter
                                && w.series == v.series
                        }
                        (m, n) => m == n,
                    }
            })
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
}

#[cfg(test)]
mod tests;
