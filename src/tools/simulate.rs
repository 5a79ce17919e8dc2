//! `tierd simulate --rules NEW.toml`: what a rules change would do to the live population,
//! without changing anything — the transition matrix (current tier × tier under the new
//! rules) and a sample of movers. Streams the customers (bounded memory).

use super::{Store, ToolError};
use crate::config::{ClockMode, Config};
use crate::engine::rules::operand::Operand;
use crate::engine::rules::rank::{cutoffs_from_values, Cutoffs, Ties};
use crate::engine::rules::Rules;
use crate::engine::Trigger;
use crate::model::calendar::Unit;
use crate::model::CustomerState;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A customer who would move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mover {
    /// The customer.
    pub customer_id: String,
    /// Tier now (`-` if none).
    pub from: String,
    /// Tier under the new rules.
    pub to: String,
    /// The rule of the new rules that placed them.
    pub rule: String,
}

/// Counts of (current tier, new tier) and a sample of movers.
#[derive(Debug, Default)]
pub struct Matrix {
    /// (from index, to index) → customers; index `None` = a tier the new rules lack / none.
    pub counts: BTreeMap<(String, String), u64>,
    /// Customers seen.
    pub total: u64,
    /// The first movers, up to the sample size.
    pub movers: Vec<Mover>,
    /// Rank cut-offs of the new rules over the stored population (rank-based rules).
    pub cutoffs: Cutoffs,
    sample: usize,
}

impl Matrix {
    /// An empty matrix keeping up to `sample` movers.
    pub fn new(sample: usize) -> Self {
        Self {
            sample,
            ..Self::default()
        }
    }

    /// Places one stored customer under `new` at `now` (a copy: nothing is written).
    pub fn add(&mut self, customer_id: &str, state: &CustomerState, new: &Rules, now: i64) {
        let from = state.tier.clone().unwrap_or_else(|| "-".into());
        let mut copy = state.clone();
        let at = now.max(state.at).max(state.clock);
        let outcome = copy.evaluate(new, at, Trigger::RulesChanged, &self.cutoffs);
        let to = copy.tier.clone().unwrap_or_else(|| "-".into());
        if from != to && self.movers.len() < self.sample {
            self.movers.push(Mover {
                customer_id: customer_id.to_owned(),
                from: from.clone(),
                to: to.clone(),
                rule: outcome.transition.map(|t| t.rule).unwrap_or_default(),
            });
        }
        *self.counts.entry((from, to)).or_default() += 1;
        self.total += 1;
    }

    /// The matrix as a text table (rows: current tier, columns: new tier; counts and row
    /// percentages), in the tier order of the rules.
    pub fn render(&self, current: &Rules, new: &Rules) -> String {
        let mut rows: Vec<String> = current.tiers().iter().map(|t| t.name.clone()).collect();
        let mut cols: Vec<String> = new.tiers().iter().map(|t| t.name.clone()).collect();
        for (f, t) in self.counts.keys() {
            if !rows.contains(f) {
                rows.push(f.clone());
            }
            if !cols.contains(t) {
                cols.push(t.clone());
            }
        }
        let width = cols.iter().map(String::len).max().unwrap_or(4).max(14);
        let mut out = String::new();
        let _ = write!(out, "{:<16}", "now \\ new");
        for c in &cols {
            let _ = write!(out, " {c:>width$}");
        }
        let _ = writeln!(out, " {:>width$}", "total");
        for r in &rows {
            let row_total: u64 = cols
                .iter()
                .map(|c| {
                    self.counts
                        .get(&(r.clone(), c.clone()))
                        .copied()
                        .unwrap_or(0)
                })
                .sum();
            if row_total == 0 {
                continue;
            }
            let _ = write!(out, "{r:<16}");
            for c in &cols {
                let n = self
                    .counts
                    .get(&(r.clone(), c.clone()))
                    .copied()
                    .unwrap_or(0);
                let cell = format!("{n} ({:.1}%)", 100.0 * n as f64 / row_total as f64);
                let _ = write!(out, " {cell:>width$}");
            }
            let _ = writeln!(out, " {row_total:>width$}");
        }
        let moved: u64 = self
            .counts
            .iter()
            .filter(|((f, t), _)| f != t)
            .map(|(_, n)| n)
            .sum();
        let _ = writeln!(
            out,
            "{} customers, {} would move ({:.2}%)",
            self.total,
            moved,
            if self.total == 0 {
                0.0
            } else {
                100.0 * moved as f64 / self.total as f64
            }
        );
        out
    }
}

/// Warnings about what the stored state cannot tell the new rules.
pub fn warnings(current: &Rules, new: &Rules) -> Vec<String> {
    let mut out = Vec::new();

    for (unit, name) in [(Unit::Day, "day"), (Unit::Month, "month")] {
        let (have, need) = (current.keep_buckets(unit), new.keep_buckets(unit));
        if need > have {
            out.push(format!(
                "the new rules read {need} {name} buckets; stored customers keep {have} (under {}): window metrics older than that are not known and count as zero",
                current.version()
            ));
        }
    }
    for def in new.series() {
        if current.series().iter().any(|c| c.key == def.key) {
            continue;
        }
        let windows: Vec<&str> = new
            .windows()
            .iter()
            .filter(|w| w.series == Some(def.key))
            .map(|w| w.name.as_str())
            .collect();
        let what = if def.filter.is_empty() {
            "points".to_owned()
        } else {
            format!("the events of filter `{}`", def.filter.describe())
        };
        out.push(format!(
            "window {} counts {what}, which stored customers have not kept (under {}): it starts from zero for the events applied before the change (a full re-count fills it: tierd offsets reset --to-earliest --clear-state)",
            windows.join(", "),
            current.version()
        ));
    }
    out
}

/// The new rules' rank cut-offs over the stored population, by full sorts in memory (16 bytes
/// per customer and rank): one pass over the customers, and a second one when a rank orders
/// the R×F×M product (its values depend on the other ranks' cut-offs).
fn rank_cutoffs(store: &mut Store, new: &Rules, now: i64) -> Result<Cutoffs, ToolError> {
    let ties: Vec<Ties> = new.ranks().iter().map(|r| r.ties).collect();
    let collect = |store: &mut Store, cutoffs: &Cutoffs| -> Result<Vec<Vec<i128>>, ToolError> {
        let mut values = vec![Vec::new(); new.ranks().len()];
        store.for_each_customer(1000, |_, state| {
            let at = now.max(state.at).max(state.clock);
            let eval = new.evaluate(&state.facts(), at, cutoffs);
            for (r, v) in eval.ranks.iter().enumerate() {
                if let Some(v) = v {
                    values[r].push(*v);
                }
            }
        })?;
        Ok(values)
    };
    let mut values = collect(store, &Cutoffs::default())?;
    let mut cutoffs = cutoffs_from_values(new.cut_points(), &ties, new.version_hash(), &mut values);
    if new.ranks().iter().any(|r| r.metric == Operand::Product) {
        let mut values = collect(store, &cutoffs)?;
        cutoffs = cutoffs_from_values(new.cut_points(), &ties, new.version_hash(), &mut values);
    }
    Ok(cutoffs)
}

/// Runs the simulation over every stored customer; `progress` is called with the count so far.
///
/// # Errors
/// [`ToolError`] when Redis cannot be read.
pub fn run(
    config: &Config,
    new: &Rules,
    sample: usize,
    mut progress: impl FnMut(u64),
) -> Result<Matrix, ToolError> {
    let mut store = Store::open(config)?;
    let now = match config.clock.mode {
        ClockMode::Wall => crate::model::time::now_ms(),
        ClockMode::Event => i64::MIN,
    };
    let mut matrix = Matrix::new(sample);
    if new.uses_ranks() {
        matrix.cutoffs = rank_cutoffs(&mut store, new, now)?;
    }
    store.for_each_customer(1000, |id, state| {
        matrix.add(id, &state, new, now);
        if matrix.total.is_multiple_of(1000) {
            progress(matrix.total);
        }
    })?;
    progress(matrix.total);
    Ok(matrix)
}
