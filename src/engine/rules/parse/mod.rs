//! Parsing and validating a rules file, in the order its parts depend on each other: the
//! [`file`] as written, then [`windows`], [`ranks`], [`scores`] (and the cell), [`tiers`]
//! with their policies, and the cross-checks ([`checks`]: unreachable tiers, undeclared
//! cells, unused windows). Every step records all its problems with file line and field
//! instead of stopping at the first, so one `tierd rules check` names everything to fix.

mod checks;
pub(super) mod file;
mod ranks;
mod scores;
mod tiers;
mod windows;

use super::operand::{Operand, Type, WindowField};
use super::rank::{CutPoint, Rank};
use super::value::Ratio;
use super::window::{SeriesDef, Window};
use super::{BucketsKept, Problem, Rules, RulesError, ScoreDef, Tier};
use crate::model::calendar::Calendar;
use crate::model::calendar::{Period, Unit, DAY_MS};
use crate::model::money;
use std::cell::RefCell;
use std::ops::Range;

/// The parts parsed so far, and the problems found.
struct Parser<'t> {
    text: &'t str,
    fraction_digits: u32,
    problems: Vec<Problem>,
    windows: Vec<Window>,
    score_names: Vec<String>,
    rank_names: Vec<String>,
    /// Every metric the rules read, in first-use order.
    operands: Vec<Operand>,
    /// Rank bands (interior mutability: condition parsing registers them through a `&dyn Fn`).
    cut_points: RefCell<Vec<CutPoint>>,
    ranks: Vec<Rank>,
    scores: Vec<ScoreDef>,
    cell: Vec<usize>,
    tiers: Vec<Tier>,
}

/// Parses and validates rules from text; `file` names the source in errors.
pub(super) fn parse(text: &str, file: &str, fraction_digits: u32) -> Result<Rules, RulesError> {
    let raw: file::RulesFile = toml::from_str(text).map_err(|e| RulesError::Parse {
        file: file.to_owned(),
        message: e.to_string(),
    })?;
    let mut p = Parser {
        text,
        fraction_digits,
        problems: Vec::new(),
        windows: Vec::new(),
        score_names: raw.scores.keys().cloned().collect(),
        rank_names: raw.ranks.keys().cloned().collect(),
        operands: Vec::new(),
        cut_points: RefCell::new(Vec::new()),
        ranks: Vec::new(),
        scores: Vec::new(),
        cell: Vec::new(),
        tiers: Vec::new(),
    };
    if raw.version.get_ref().trim().is_empty() || raw.version.get_ref().len() > 64 {
        p.problem(
            Some(raw.version.span()),
            "version".into(),
            "must be 1-64 characters".into(),
        );
    }
    let calendar = match &raw.time_zone {
        None => Calendar::utc(),
        Some(zone) => Calendar::named(zone.get_ref()).unwrap_or_else(|message| {
            p.problem(Some(zone.span()), "time_zone".into(), message);
            Calendar::utc()
        }),
    };
    p.windows(&raw.windows);
    p.ranks(&raw.ranks);
    p.scores(&raw.scores);
    p.cell(raw.cell.as_ref());
    let defaults = raw
        .policy
        .as_ref()
        .map(|p| p.get_ref().clone())
        .unwrap_or_default();
    p.tiers(
        &raw.tiers,
        &defaults,
        raw.policy.as_ref().map(toml::Spanned::span),
    );
    p.checks(&raw);
    if !p.problems.is_empty() {
        return Err(RulesError::Invalid {
            file: file.to_owned(),
            problems: p.problems,
        });
    }
    let series = p.series();
    let recency_points = p.recency_points();
    let keep = p.buckets_kept();
    let tier_defs = p.tiers.iter().map(|t| t.def.clone()).collect();
    Ok(Rules {
        version_hash: crate::model::state::rules_hash(raw.version.get_ref()),
        version: raw.version.into_inner(),
        description: raw.description,
        calendar,
        windows: p.windows,
        series,
        score_names: p.score_names,
        scores: p.scores,
        rank_names: p.rank_names,
        ranks: p.ranks,
        cut_points: p.cut_points.into_inner(),
        cell: p.cell,
        operands: p.operands,
        tiers: p.tiers,
        tier_defs,
        recency_points,
        keep,
        at_risk_ms: i64::from(defaults.at_risk_days.unwrap_or(0)) * DAY_MS,
        fraction_digits,
        text: text.to_owned(),
    })
}

impl Parser<'_> {
    /// Records a problem at `span` of the text.
    fn problem(&mut self, span: Option<Range<usize>>, field: String, message: String) {
        self.problems.push(Problem {
            line: span.map(|s| line_of(self.text, s.start)),
            field,
            message,
        });
    }

    /// Records that the rules read `op`.
    fn intern(&mut self, op: Operand) {
        if !self.operands.contains(&op) {
            self.operands.push(op);
        }
    }

    /// The metric a name in a condition or score refers to.
    fn resolve(&self, name: &str) -> Result<Operand, String> {
        Operand::parse(name, &self.windows, &self.score_names, &self.rank_names)
    }

    /// The index of the cut point "top `text`" of rank `rank`, registered on first use.
    fn cut_point(&self, rank: usize, text: &str) -> Result<usize, String> {
        let pct = super::rank::parse_percent(text)?;
        let mut points = self.cut_points.borrow_mut();
        Ok(points
            .iter()
            .position(|c| c.rank == rank && c.pct == pct)
            .unwrap_or_else(|| {
                points.push(CutPoint { rank, pct });
                points.len() - 1
            }))
    }

    /// Reads a literal of a metric type in this file's currency.
    fn literal(&self, kind: Type, text: &str) -> Result<Ratio, String> {
        literal(kind, text, self.fraction_digits)
    }

    /// The recency values (days) at which a score bin or a condition flips, ascending: the
    /// moments time alone can change a customer through recency.
    fn recency_points(&self) -> Vec<i64> {
        let mut points: Vec<i64> = Vec::new();
        for s in self.scores.iter().filter_map(|s| match s {
            ScoreDef::Fixed(s) if s.metric == Operand::RecencyDays => Some(s),
            _ => None,
        }) {
            points.extend(
                s.bins
                    .iter()
                    .filter_map(|b| b.bound)
                    .map(|b| i64::try_from(b.flip_point()).unwrap_or(i64::MAX)),
            );
        }
        for t in &self.tiers {
            for c in t
                .when
                .iter()
                .chain(&t.policy.stay)
                .flat_map(|c| c.leaves())
                .filter(|c| c.operand() == Operand::RecencyDays)
            {
                points.extend(
                    c.flip_points()
                        .into_iter()
                        .map(|p| i64::try_from(p).unwrap_or(i64::MAX)),
                );
            }
        }
        points.retain(|&p| p > 0);
        points.sort_unstable();
        points.dedup();
        points
    }

    /// How many plain day and month buckets the longest window of each unit needs (filtered
    /// windows, which read only their series, need none).
    fn buckets_kept(&self) -> BucketsKept {
        let mut keep = BucketsKept::default();
        for w in self.windows.iter().filter(|w| w.filter.is_empty()) {
            let slot = match w.unit() {
                Unit::Day => &mut keep.days,
                Unit::Month => &mut keep.months,
            };
            *slot = (*slot).max(w.kept());
        }
        keep
    }

    /// The window series the rules keep: one per unit and filter of the windows that have a
    /// filter or whose points are read (an unfiltered window's series serves its points
    /// only); each such window is pointed at its series.
    fn series(&mut self) -> Vec<SeriesDef> {
        let mut series: Vec<SeriesDef> = Vec::new();
        for (i, w) in self.windows.iter_mut().enumerate() {
            let points = self
                .operands
                .contains(&Operand::Window(i, WindowField::Points));
            if w.filter.is_empty() && !points {
                continue;
            }
            let key = SeriesDef::key_of(w.unit(), &w.filter);
            match series.iter_mut().find(|x| x.key == key) {
                Some(x) => x.keep = x.keep.max(w.kept()),
                None => series.push(SeriesDef {
                    key,
                    unit: w.unit(),
                    filter: w.filter.clone(),
                    keep: w.kept(),
                }),
            }
            w.series = Some(key);
        }
        series
    }
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
pub(super) fn literal(kind: Type, text: &str, fraction_digits: u32) -> Result<Ratio, String> {
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
