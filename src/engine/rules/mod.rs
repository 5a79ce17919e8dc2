//! Tier rules: pure placement of a customer on a tier from their metrics and scores, the
//! downgrade policy of each tier, and the moments at which time alone can move a customer.
//! No I/O and no clock: `now` is always an argument, so the live pipeline, replays,
//! `tierd simulate` and tests run exactly the same code.
//!
//! A [`Rules`] value is loaded once from a versioned TOML rules file (reference:
//! `docs/rules.md`). Tiers are ordered best first: index 0 is the top tier, and a move to a
//! lower index is an upgrade.

pub mod condition;
mod file;
pub mod operand;
pub mod policy;
pub mod rank;
pub mod score;
pub mod value;
pub mod window;

use crate::model::calendar::{self, Period, Unit, DAY_MS};
use crate::model::money;
pub use crate::model::state::TimeCause;
use condition::Condition;
use operand::{Facts, Operand, Type};
use policy::{Downgrade, Review, TierPolicy};
use rank::{CutPoint, Cutoffs, Rank};
use score::{Bin, Bound, Score};
use std::cell::RefCell;
use std::path::Path;
use toml::Spanned;
use value::{Ratio, Value};
use window::{Span, Window};

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
    keep: [u32; 2],
    at_risk_ms: i64,
    fraction_digits: u32,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

fn parse_length(text: &str) -> Result<(u32, Unit), String> {
    let mut parts = text.split_whitespace();
    let (Some(n), Some(unit), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{text:?}: expected \"<N> days\" or \"<N> months\""));
    };
    let n: u32 = n
        .parse()
        .map_err(|_| format!("{text:?}: {n:?} is not a whole number"))?;
    if n == 0 || n > 1200 {
        return Err(format!("{text:?}: length must be 1..=1200"));
    }
    let unit = match unit {
        "day" | "days" => Unit::Day,
        "month" | "months" => Unit::Month,
        _ => return Err(format!("{text:?}: unit must be days or months")),
    };
    Ok((n, unit))
}

fn parse_unit(text: &str) -> Result<Unit, String> {
    match text {
        "day" => Ok(Unit::Day),
        "month" => Ok(Unit::Month),
        _ => Err(format!("{text:?}: bucket must be \"day\" or \"month\"")),
    }
}

fn parse_period(text: &str) -> Result<Period, String> {
    match text {
        "month" => Ok(Period::Month),
        "quarter" => Ok(Period::Quarter),
        "year" => Ok(Period::Year),
        _ => Err(format!(
            "{text:?}: calendar must be \"month\", \"quarter\" or \"year\""
        )),
    }
}

/// Reads a literal of a metric type: money as an exact decimal in currency units, the rest as
/// whole numbers.
fn literal(kind: Type, text: &str, fraction_digits: u32) -> Result<Ratio, String> {
    match kind {
        Type::Money => {
            let (neg, digits) = text.strip_prefix('-').map_or((false, text), |t| (true, t));
            let minor =
                money::parse_threshold(digits, fraction_digits).map_err(|e| e.to_string())?;
            Ok(Ratio::int(if neg {
                -i128::from(minor)
            } else {
                i128::from(minor)
            }))
        }
        Type::Count | Type::Days | Type::Score => text
            .parse::<i64>()
            .map(|v| Ratio::int(i128::from(v)))
            .map_err(|_| format!("{text:?} is not a whole number")),
        Type::Cell => Err("a cell has no numeric value".into()),
        Type::Time | Type::Percent => Err("not compared with literals".into()),
    }
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

fn toml_literal(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(_) => Err(
            "write fractional bounds as strings (\"500.50\"): binary floats are not exact".into(),
        ),
        other => Err(format!("{other} is not a number")),
    }
}

/// Interval view of a conjunction of numeric conditions, for reachability checks.
#[derive(Debug, Clone, Copy, Default)]
struct Interval {
    lo: Option<(Ratio, bool)>,
    hi: Option<(Ratio, bool)>,
}

impl Interval {
    fn of(conds: &[Condition], op: Operand) -> Self {
        let mut iv = Self::default();
        for c in conds {
            if let Condition::Compare {
                operand,
                cmp,
                value,
            } = c
            {
                if *operand != op {
                    continue;
                }
                use condition::Cmp::*;
                let (lo, hi) = match cmp {
                    Ge => (Some((*value, false)), None),
                    Gt => (Some((*value, true)), None),
                    Le => (None, Some((*value, false))),
                    Lt => (None, Some((*value, true))),
                    Eq => (Some((*value, false)), Some((*value, false))),
                    Ne => (None, None),
                };
                if let Some(l) = lo {
                    iv.lo = Some(
                        iv.lo
                            .map_or(l, |c| if (l.0, l.1) > (c.0, c.1) { l } else { c }),
                    );
                }
                if let Some(h) = hi {
                    iv.hi = Some(iv.hi.map_or(h, |c| {
                        if h.0 < c.0 || (h.0 == c.0 && h.1) {
                            h
                        } else {
                            c
                        }
                    }));
                }
            }
        }
        iv
    }

    fn empty(self) -> bool {
        matches!((self.lo, self.hi), (Some((l, ls)), Some((h, hs))) if l > h || (l == h && (ls || hs)))
    }

    /// Whether every value in the interval satisfies `c`.
    fn implies(self, c: &Condition) -> bool {
        let Condition::Compare { cmp, value, .. } = c else {
            return false;
        };
        use condition::Cmp::*;
        match cmp {
            Ge => self.lo.is_some_and(|(l, _)| l >= *value),
            Gt => self
                .lo
                .is_some_and(|(l, s)| l > *value || (l == *value && s)),
            Le => self.hi.is_some_and(|(h, _)| h <= *value),
            Lt => self
                .hi
                .is_some_and(|(h, s)| h < *value || (h == *value && s)),
            Eq | Ne => false,
        }
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
    #[allow(clippy::too_many_lines)]
    pub fn parse(text: &str, file: &str, fraction_digits: u32) -> Result<Self, RulesError> {
        let raw: file::RulesFile = toml::from_str(text).map_err(|e| RulesError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        let mut problems: Vec<Problem> = Vec::new();
        let mut problem = |span: Option<std::ops::Range<usize>>, field: String, message: String| {
            problems.push(Problem {
                line: span.map(|s| line_of(text, s.start)),
                field,
                message,
            });
        };
        if raw.version.get_ref().trim().is_empty() || raw.version.get_ref().len() > 64 {
            problem(
                Some(raw.version.span()),
                "version".into(),
                "must be 1-64 characters".into(),
            );
        }

        // Windows.
        let mut windows = Vec::new();
        for (name, w) in &raw.windows {
            let field = format!("windows.{name}");
            let span = Some(w.span());
            let w = w.get_ref();
            let span_kind = match (&w.length, &w.calendar) {
                (Some(length), None) => parse_length(length).and_then(|(n, len_unit)| {
                    let bucket = w.bucket.as_deref().map_or(Ok(len_unit), parse_unit)?;
                    match (len_unit, bucket) {
                        (a, b) if a == b => Ok(Span::Rolling { unit: b, length: n }),
                        (Unit::Day, Unit::Month) if n % 30 == 0 => Err(format!(
                            "length {length:?} is given in days but bucket is month: write \"{} months\"",
                            n / 30
                        )),
                        (Unit::Day, Unit::Month) => Err(format!(
                            "the window ({length}) is shorter than or not a whole number of its bucket (month)"
                        )),
                        _ => Err(format!("length {length:?} in months needs bucket = \"month\"")),
                    }
                }),
                (None, Some(cal)) => {
                    if w.bucket.as_deref().is_some_and(|b| b != "month") {
                        Err("calendar windows are bucketed by month".into())
                    } else {
                        parse_period(cal).map(Span::Calendar)
                    }
                }
                _ => Err("give either `length` (rolling) or `calendar`".into()),
            };
            match span_kind {
                Ok(span_kind) => windows.push(Window {
                    name: name.clone(),
                    span: span_kind,
                }),
                Err(m) => problem(span, field, m),
            }
        }
        let score_names: Vec<String> = raw.scores.keys().cloned().collect();
        let rank_names: Vec<String> = raw.ranks.keys().cloned().collect();

        let mut operands: Vec<Operand> = Vec::new();
        let mut intern = |op: Operand| {
            if !operands.contains(&op) {
                operands.push(op);
            }
        };
        let resolve = |name: &str| Operand::parse(name, &windows, &score_names, &rank_names);
        let cut_points: RefCell<Vec<CutPoint>> = RefCell::new(Vec::new());
        let cut_point = |rank: usize, text: &str| -> Result<usize, String> {
            let pct = rank::parse_percent(text)?;
            let mut points = cut_points.borrow_mut();
            Ok(points
                .iter()
                .position(|c| c.rank == rank && c.pct == pct)
                .unwrap_or_else(|| {
                    points.push(CutPoint { rank, pct });
                    points.len() - 1
                }))
        };

        // Ranks.
        let mut ranks = Vec::new();
        for (name, r) in &raw.ranks {
            let field = format!("ranks.{name}.metric");
            match resolve(&r.get_ref().metric) {
                Ok(Operand::Rank(_) | Operand::Score(_) | Operand::Cell) => problem(
                    Some(r.span()),
                    field,
                    "a rank orders a metric (count, sum, a window metric, last_purchase, product …), not a score, cell or rank".into(),
                ),
                Ok(m) => {
                    intern(m);
                    ranks.push(Rank {
                        name: name.clone(),
                        metric: m,
                        ties: r.get_ref().ties.unwrap_or_default(),
                    });
                }
                Err(m) => problem(Some(r.span()), field, m),
            }
        }

        // Scores.
        let mut scores = Vec::new();
        for (name, s) in &raw.scores {
            let field = format!("scores.{name}");
            let span = s.span();
            let s = s.get_ref();
            let metric = match (&s.metric, &s.rank) {
                (Some(metric), None) => match resolve(metric) {
                    Ok(m) => m,
                    Err(m) => {
                        problem(Some(span), format!("{field}.metric"), m);
                        continue;
                    }
                },
                (None, Some(rank)) => {
                    let Some(r) = rank_names.iter().position(|n| n == rank) else {
                        problem(
                            Some(span),
                            format!("{field}.rank"),
                            format!("unknown rank {rank:?}: declare it under [ranks.{rank}]"),
                        );
                        continue;
                    };
                    if ranks
                        .get(r)
                        .is_some_and(|x: &Rank| x.metric == Operand::Product)
                    {
                        problem(Some(span), format!("{field}.rank"), "a score cannot band a rank of `product` (the product is made of scores)".into());
                        continue;
                    }
                    let last = s.bins.len().saturating_sub(1);
                    let mut bins = Vec::new();
                    let mut prev: Option<Ratio> = None;
                    for (i, b) in s.bins.iter().enumerate() {
                        let bspan = Some(b.span());
                        let b = b.get_ref();
                        let f = format!("{field}.bins[{i}]");
                        if b.min.is_some()
                            || b.above.is_some()
                            || b.max.is_some()
                            || b.below.is_some()
                        {
                            problem(
                                bspan.clone(),
                                f.clone(),
                                "rank scores give `top = \"p%\"` bands, not min/above/max/below"
                                    .into(),
                            );
                        }
                        if !(1..=9).contains(&b.score) {
                            problem(
                                bspan.clone(),
                                f.clone(),
                                "scores are single digits 1-9".into(),
                            );
                        }
                        match (&b.top, i == last) {
                            (Some(_), true) => problem(
                                bspan,
                                f,
                                "the last bin takes everyone below the other bands: remove `top`"
                                    .into(),
                            ),
                            (None, false) => problem(
                                bspan,
                                f,
                                "`top` is required on every bin but the last".into(),
                            ),
                            (None, true) => bins.push((b.score, None)),
                            (Some(top), false) => match cut_point(r, top) {
                                Ok(point) => {
                                    let pct = cut_points.borrow()[point].pct;
                                    if prev.is_some_and(|p| pct <= p) {
                                        problem(bspan, f, "bands must grow down the bins (20%, 40%, …): this one is unreachable".into());
                                    }
                                    prev = Some(pct);
                                    bins.push((b.score, Some(point)));
                                }
                                Err(m) => problem(bspan, format!("{f}.top"), m),
                            },
                        }
                    }
                    intern(Operand::Rank(r));
                    scores.push(ScoreDef::Ranked { rank: r, bins });
                    continue;
                }
                _ => {
                    problem(
                        Some(span),
                        field,
                        "give either `metric` (fixed bins) or `rank` (rank bands)".into(),
                    );
                    continue;
                }
            };
            let mut bins = Vec::new();
            let mut ok = true;
            for (i, b) in s.bins.iter().enumerate() {
                let bspan = b.span();
                let b = b.get_ref();
                let bounds: Vec<(&str, &toml::Value)> = [
                    ("min", &b.min),
                    ("above", &b.above),
                    ("max", &b.max),
                    ("below", &b.below),
                ]
                .into_iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
                .collect();
                let bound = match bounds.as_slice() {
                    [] => None,
                    [(k, v)] => match toml_literal(v)
                        .and_then(|t| literal(metric.kind(), &t, fraction_digits))
                    {
                        Ok(x) => Some(match *k {
                            "min" => Bound::Min(x),
                            "above" => Bound::Above(x),
                            "max" => Bound::Max(x),
                            _ => Bound::Below(x),
                        }),
                        Err(m) => {
                            problem(Some(bspan), format!("{field}.bins[{i}].{k}"), m);
                            ok = false;
                            None
                        }
                    },
                    _ => {
                        problem(
                            Some(bspan),
                            format!("{field}.bins[{i}]"),
                            "give at most one of min, above, max, below".into(),
                        );
                        ok = false;
                        None
                    }
                };
                bins.push(Bin {
                    score: b.score,
                    bound,
                });
            }
            if !ok {
                continue;
            }
            if s.bins.iter().any(|b| b.get_ref().top.is_some()) {
                problem(
                    Some(span),
                    format!("{field}.bins"),
                    "`top` bands need `rank = …` instead of `metric`".into(),
                );
                continue;
            }
            match Score::new(name.clone(), metric, bins) {
                Ok(score) => {
                    intern(metric);
                    scores.push(ScoreDef::Fixed(score));
                }
                Err((bin, m)) => {
                    let (span, f) = match bin {
                        Some(i) => (s.bins[i].span(), format!("{field}.bins[{i}]")),
                        None => (span, field),
                    };
                    problem(Some(span), f, m);
                }
            }
        }
        let cell: Vec<usize> = match &raw.cell {
            None => (0..score_names.len()).collect(),
            Some(c) => {
                let mut idx = Vec::new();
                for n in c.get_ref() {
                    match score_names.iter().position(|s| s == n) {
                        Some(i) => idx.push(i),
                        None => problem(
                            Some(c.span()),
                            "cell".into(),
                            format!("unknown score {n:?}"),
                        ),
                    }
                }
                idx
            }
        };

        // Policy defaults.
        let defaults = raw
            .policy
            .as_ref()
            .map(|p| p.get_ref().clone())
            .unwrap_or_default();
        let default_span = raw.policy.as_ref().map(toml::Spanned::span);
        let default_review = match defaults.review.as_deref().map(Review::parse).transpose() {
            Ok(r) => r.unwrap_or(Review::Continuous),
            Err(m) => {
                problem(default_span.clone(), "policy.review".into(), m);
                Review::Continuous
            }
        };
        // Tiers.
        if raw.tiers.is_empty() {
            problem(None, "tiers".into(), "at least one tier is required".into());
        }
        let mut tiers: Vec<Tier> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let last = raw.tiers.len().saturating_sub(1);
        for (i, t) in raw.tiers.iter().enumerate() {
            let span = t.span();
            let t = t.get_ref();
            let field = format!("tiers[{i}]");
            if t.name.is_empty()
                || t.name.chars().count() > 64
                || t.name.chars().any(char::is_whitespace)
            {
                problem(
                    Some(span.clone()),
                    format!("{field}.name"),
                    "must be 1-64 characters without spaces".into(),
                );
            }
            if !seen.insert(t.name.clone()) {
                problem(
                    Some(span.clone()),
                    format!("{field}.name"),
                    format!("duplicate tier {:?}", t.name),
                );
            }
            let mut parse_conds = |key: &str,
                                   list: &[Spanned<String>],
                                   problem: &mut dyn FnMut(
                Option<std::ops::Range<usize>>,
                String,
                String,
            )| {
                let mut out = Vec::new();
                for (j, c) in list.iter().enumerate() {
                    let cspan = Some(c.span());
                    match Condition::parse(
                        c.get_ref(),
                        &resolve,
                        &|k, v| literal(k, v, fraction_digits),
                        &cut_point,
                        cell.len(),
                    ) {
                        Ok(cond) => {
                            if cond.operand() == Operand::Cell && cell.is_empty() {
                                problem(
                                    cspan,
                                    format!("{field}.{key}[{j}]"),
                                    "`cell` needs declared scores".into(),
                                );
                            }
                            intern(cond.operand());
                            out.push(cond);
                        }
                        Err(m) => problem(cspan, format!("{field}.{key}[{j}]"), m),
                    }
                }
                out
            };
            let when = match (&t.when, i == last) {
                (Some(_), true) => {
                    problem(Some(span.clone()), format!("{field}.when"), "the last tier takes every customer the others do not: remove `when`, or add a tier after it".into());
                    Vec::new()
                }
                (None, false) => {
                    problem(Some(span.clone()), format!("{field}.when"), "required on every tier but the last (without it, every later tier is unreachable)".into());
                    Vec::new()
                }
                (Some(list), false) if list.is_empty() => {
                    problem(
                        Some(span.clone()),
                        format!("{field}.when"),
                        "must hold at least one condition".into(),
                    );
                    Vec::new()
                }
                (Some(list), false) => parse_conds("when", list, &mut problem),
                (None, true) => Vec::new(),
            };
            let stay = t
                .stay
                .as_deref()
                .map(|l| parse_conds("stay", l, &mut problem))
                .unwrap_or_default();
            let review = match t.review.as_deref().map(Review::parse).transpose() {
                Ok(r) => r.unwrap_or(default_review),
                Err(m) => {
                    problem(Some(span.clone()), format!("{field}.review"), m);
                    default_review
                }
            };
            let downgrade = t
                .downgrade
                .or(defaults.downgrade)
                .unwrap_or(Downgrade::Replace);
            let grace_days = t.grace_days.or(defaults.grace_days).unwrap_or(0);
            let min_stay_days = t.min_stay_days.or(defaults.min_stay_days).unwrap_or(0);
            if downgrade == Downgrade::Step
                && review == Review::Continuous
                && min_stay_days == 0
                && grace_days == 0
                && i < last
            {
                problem(Some(span.clone()), format!("{field}.downgrade"), "\"step\" needs a review, grace_days or min_stay_days to pace the steps (otherwise it is \"replace\")".into());
            }
            let mut text = format!("downgrade={}", downgrade.as_str());
            if review != Review::Continuous {
                text.push_str(&format!(" review={}", review.describe()));
            }
            if grace_days > 0 {
                text.push_str(&format!(" grace={grace_days}d"));
            }
            if min_stay_days > 0 {
                text.push_str(&format!(" min_stay={min_stay_days}d"));
            }
            if !stay.is_empty() {
                text.push_str(" stay=hysteresis");
            }
            let rule = if when.is_empty() {
                format!("tiers[{i}] {}: otherwise", t.name)
            } else {
                let parts: Vec<String> = when
                    .iter()
                    .map(|c| {
                        describe(
                            c,
                            &windows,
                            &score_names,
                            &rank_names,
                            &cut_points.borrow(),
                            fraction_digits,
                        )
                    })
                    .collect();
                format!("tiers[{i}] {}: {}", t.name, parts.join(" and "))
            };
            tiers.push(Tier {
                def: TierDef {
                    name: t.name.clone(),
                    display_name: t.display_name.clone(),
                },
                when,
                rule,
                policy: TierPolicy {
                    downgrade,
                    grace_ms: i64::from(grace_days) * DAY_MS,
                    min_stay_ms: i64::from(min_stay_days) * DAY_MS,
                    review,
                    stay,
                    upgrade_restarts_review: t
                        .upgrade_restarts_review
                        .or(defaults.upgrade_restarts_review)
                        .unwrap_or(true),
                    text,
                },
            });
        }
        // Reachability: a tier whose conditions imply an earlier tier's can never be reached.
        for j in 0..tiers.len().saturating_sub(1) {
            let tj = &tiers[j];
            let ops: Vec<Operand> = tj.when.iter().map(Condition::operand).collect();
            if ops.iter().any(|&o| Interval::of(&tj.when, o).empty()) {
                problem(
                    Some(raw.tiers[j].span()),
                    format!("tiers[{j}].when"),
                    "the conditions contradict each other: the tier is unreachable".into(),
                );
                continue;
            }
            for (i, ti) in tiers.iter().enumerate().take(j) {
                let implied = !ti.when.is_empty()
                    && ti.when.iter().all(|c| match c {
                        Condition::CellIn { .. } => tj.when.contains(c),
                        Condition::InTop { rank, point, negate: false } => {
                            let points = cut_points.borrow();
                            tj.when.iter().any(|d| matches!(d, Condition::InTop { rank: r2, point: q, negate: false } if r2 == rank && points[*q].pct <= points[*point].pct))
                        }
                        Condition::InTop { .. } => tj.when.contains(c),
                        Condition::Compare { operand, .. } => {
                            Interval::of(&tj.when, *operand).implies(c)
                        }
                    });
                if implied {
                    problem(
                        Some(raw.tiers[j].span()),
                        format!("tiers[{j}].when"),
                        format!("every customer it takes is taken first by tiers[{i}] ({:?}): the tier is unreachable (order tiers best first, with stricter bounds first)", ti.def.name),
                    );
                    break;
                }
            }
        }
        if raw.cell.is_none()
            && score_names.len() > 1
            && operands
                .iter()
                .any(|o| matches!(o, Operand::Cell | Operand::Product))
        {
            problem(
                None,
                "cell".into(),
                format!(
                    "`cell` or `product` is used with {} scores: declare their digit order, e.g. cell = [\"R\", \"F\", \"M\"]",
                    score_names.len()
                ),
            );
        }
        // Unused windows would only cost memory.
        for (wi, w) in windows.iter().enumerate() {
            if !operands
                .iter()
                .any(|o| matches!(o, Operand::Window(i, _) if *i == wi))
            {
                problem(
                    Some(raw.windows[&w.name].span()),
                    format!("windows.{}", w.name),
                    "not used by any score or tier: remove it (windows cost memory per customer)"
                        .into(),
                );
            }
        }
        if !problems.is_empty() {
            return Err(RulesError::Invalid {
                file: file.to_owned(),
                problems,
            });
        }

        let mut recency_points: Vec<i64> = Vec::new();
        for s in scores.iter().filter_map(|s| match s {
            ScoreDef::Fixed(s) if s.metric == Operand::RecencyDays => Some(s),
            _ => None,
        }) {
            recency_points.extend(
                s.bins
                    .iter()
                    .filter_map(|b| b.bound)
                    .map(|b| i64::try_from(b.flip_point()).unwrap_or(i64::MAX)),
            );
        }
        for t in &tiers {
            for c in t
                .when
                .iter()
                .chain(&t.policy.stay)
                .filter(|c| c.operand() == Operand::RecencyDays)
            {
                recency_points.extend(
                    c.flip_points()
                        .into_iter()
                        .map(|p| i64::try_from(p).unwrap_or(i64::MAX)),
                );
            }
        }
        recency_points.retain(|&p| p > 0);
        recency_points.sort_unstable();
        recency_points.dedup();
        let mut keep = [0u32; 2];
        for w in &windows {
            let (slot, n) = match w.span {
                Span::Rolling {
                    unit: Unit::Day,
                    length,
                } => (0, length),
                Span::Rolling {
                    unit: Unit::Month,
                    length,
                } => (1, length),
                Span::Calendar(p) => (1, p.months().unsigned_abs()),
            };
            keep[slot] = keep[slot].max(n);
        }
        let tier_defs = tiers.iter().map(|t| t.def.clone()).collect();
        Ok(Self {
            version_hash: crate::model::state::rules_hash(raw.version.get_ref()),
            version: raw.version.into_inner(),
            description: raw.description,
            windows,
            score_names,
            scores,
            rank_names,
            ranks,
            cut_points: cut_points.into_inner(),
            cell,
            operands,
            tiers,
            tier_defs,
            recency_points,
            keep,
            at_risk_ms: i64::from(defaults.at_risk_days.unwrap_or(0)) * DAY_MS,
            fraction_digits,
        })
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
            Unit::Day => self.keep[0],
            Unit::Month => self.keep[1],
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
