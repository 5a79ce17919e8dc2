//! The metrics a rule can name, their types, and how they are read from a customer's facts.
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `count` | count | lifetime purchases |
//! | `sum` | money | lifetime purchases − refunds |
//! | `avg` | money | `sum / count` (undefined with no purchase) |
//! | `recency_days` | days | whole days from the last purchase to now (undefined with none) |
//! | `points` | count | lifetime points: purchases' `points` − refunds' `points` |
//! | `window.<w>.points` | count | the same inside window `<w>` |
//! | `window.<w>.count` / `.sum` / `.avg` | count / money | the same inside window `<w>` |
//! | `window.<w>.monthly_avg` | money | `sum` of a month or calendar window / its months |
//! | `score.<S>` | score | fixed-bin score `<S>` |
//! | `cell` | cell | the scores listed in `cell` as digits, e.g. `"532"` |
//! | `product` | score | the product of the scores listed in `cell` (R×F×M) |
//! | `last_purchase` | time | the latest purchase time, Unix ms (rank it for recency quintiles) |
//! | `rank.<r>` | percent | position in rank `<r>` from the top: `rank.value <= 1%` |

use super::value::{Ratio, Value};
use super::window::Window;
use crate::model::calendar::{Unit, DAY_MS};
use crate::model::state::{Bucket, Series};

/// What a window metric reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowField {
    /// Purchases in the window.
    Count,
    /// Net spend in the window.
    Sum,
    /// Net spend per purchase in the window.
    Avg,
    /// Net spend per month of the window.
    MonthlyAvg,
    /// Net points in the window.
    Points,
}

/// A metric a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operand {
    /// Lifetime purchases.
    Count,
    /// Lifetime net spend.
    Sum,
    /// Lifetime net spend per purchase.
    Avg,
    /// Whole days since the last purchase.
    RecencyDays,
    /// Lifetime net points.
    Points,
    /// A window metric (index into the rules' windows).
    Window(usize, WindowField),
    /// A score (index into the rules' scores).
    Score(usize),
    /// The RFM cell.
    Cell,
    /// The product of the cell's scores.
    Product,
    /// The latest purchase time (Unix ms).
    LastPurchase,
    /// A rank (index into the rules' ranks).
    Rank(usize),
}

/// The type of a metric, which decides how literals compared with it are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// Currency units (decimal literals, exact).
    Money,
    /// Whole numbers of purchases.
    Count,
    /// Whole days.
    Days,
    /// Whole-number scores.
    Score,
    /// Cell patterns such as `5??`.
    Cell,
    /// A moment (Unix ms); only ranked, never compared with literals.
    Time,
    /// A share of the population from the top of a rank (`1%`).
    Percent,
}

impl Operand {
    /// Parses a metric name against the declared windows and scores.
    ///
    /// # Errors
    /// A message naming what is unknown.
    pub fn parse(
        name: &str,
        windows: &[Window],
        scores: &[String],
        ranks: &[String],
    ) -> Result<Self, String> {
        Ok(match name {
            "count" => Self::Count,
            "sum" => Self::Sum,
            "avg" => Self::Avg,
            "recency_days" => Self::RecencyDays,
            "points" => Self::Points,
            "cell" => Self::Cell,
            "product" => Self::Product,
            "last_purchase" => Self::LastPurchase,
            _ => {
                if let Some(rest) = name.strip_prefix("window.") {
                    let (w, field) = rest.rsplit_once('.').ok_or_else(|| {
                        format!("unknown metric {name:?}: window metrics are window.<name>.count|sum|avg|monthly_avg|points")
                    })?;
                    let index = windows.iter().position(|x| x.name == w).ok_or_else(|| {
                        format!("unknown window {w:?} in {name:?}: declare it under [windows.{w}]")
                    })?;
                    let field = match field {
                        "count" => WindowField::Count,
                        "sum" => WindowField::Sum,
                        "avg" => WindowField::Avg,
                        "points" => WindowField::Points,
                        "monthly_avg" => {
                            if windows[index].months().is_none() {
                                return Err(format!("{name:?}: monthly_avg needs a month or calendar window, {w:?} is in days"));
                            }
                            WindowField::MonthlyAvg
                        }
                        other => return Err(format!("unknown window metric {other:?} in {name:?}: count, sum, avg, monthly_avg or points")),
                    };
                    Self::Window(index, field)
                } else if let Some(r) = name.strip_prefix("rank.") {
                    Self::Rank(ranks.iter().position(|x| x == r).ok_or_else(|| {
                        format!("unknown rank {r:?}: declare it under [ranks.{r}]")
                    })?)
                } else if let Some(s) = name.strip_prefix("score.") {
                    Self::Score(scores.iter().position(|x| x == s).ok_or_else(|| {
                        format!("unknown score {s:?}: declare it under [scores.{s}]")
                    })?)
                } else {
                    return Err(format!(
                        "unknown metric {name:?}: one of count, sum, avg, recency_days, points, last_purchase, window.<w>.<count|sum|avg|monthly_avg|points>, score.<s>, cell, product, rank.<r>"
                    ));
                }
            }
        })
    }

    /// The metric's type.
    pub fn kind(self) -> Type {
        match self {
            Self::Count
            | Self::Points
            | Self::Window(_, WindowField::Count | WindowField::Points) => Type::Count,
            Self::Sum | Self::Avg | Self::Window(..) => Type::Money,
            Self::RecencyDays => Type::Days,
            Self::Score(_) | Self::Product => Type::Score,
            Self::Cell => Type::Cell,
            Self::LastPurchase => Type::Time,
            Self::Rank(_) => Type::Percent,
        }
    }

    /// The metric's name as written in rules files.
    pub fn name(self, windows: &[Window], scores: &[String], ranks: &[String]) -> String {
        match self {
            Self::Count => "count".into(),
            Self::Sum => "sum".into(),
            Self::Avg => "avg".into(),
            Self::RecencyDays => "recency_days".into(),
            Self::Points => "points".into(),
            Self::Cell => "cell".into(),
            Self::Product => "product".into(),
            Self::LastPurchase => "last_purchase".into(),
            Self::Rank(i) => format!("rank.{}", ranks[i]),
            Self::Score(i) => format!("score.{}", scores[i]),
            Self::Window(i, f) => format!(
                "window.{}.{}",
                windows[i].name,
                match f {
                    WindowField::Count => "count",
                    WindowField::Sum => "sum",
                    WindowField::Avg => "avg",
                    WindowField::MonthlyAvg => "monthly_avg",
                    WindowField::Points => "points",
                }
            ),
        }
    }
}

/// What rules read of a customer: lifetime counters and bucketed history.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    /// Lifetime purchases.
    pub count: u64,
    /// Lifetime net spend, minor units.
    pub sum: i128,
    /// Latest purchase (Unix ms).
    pub last_purchase: Option<i64>,
    /// Day buckets (only kept when a day window is declared).
    pub days: &'a [Bucket],
    /// Month buckets (only kept when a month or calendar window is declared).
    pub months: &'a [Bucket],
    /// Lifetime net points.
    pub points: i128,
    /// Window series (filtered windows and windows read for points), by key.
    pub series: &'a [Series],
}

impl Facts<'_> {
    /// Reads a base metric (not a score, cell or product) at `now`.
    pub fn read(
        &self,
        op: Operand,
        windows: &[Window],
        cal: &crate::model::calendar::Calendar,
        now: i64,
    ) -> Value {
        let avg = |sum: i128, count: u64| {
            Ratio::new(sum, i128::from(count)).map_or(Value::Undefined, Value::Num)
        };
        match op {
            Operand::Count => Value::Num(Ratio::int(i128::from(self.count))),
            Operand::Sum => Value::Num(Ratio::int(self.sum)),
            Operand::Avg => avg(self.sum, self.count),
            Operand::RecencyDays => self.last_purchase.map_or(Value::Undefined, |last| {
                Value::Num(Ratio::int(i128::from((now - last).max(0) / DAY_MS)))
            }),
            Operand::Points => Value::Num(Ratio::int(self.points)),
            Operand::Window(i, field) => {
                let w = &windows[i];
                let t = self.totals(w, field == WindowField::Points, cal, now);
                match field {
                    WindowField::Count => Value::Num(Ratio::int(i128::from(t.count))),
                    WindowField::Sum => Value::Num(Ratio::int(t.sum)),
                    WindowField::Avg => avg(t.sum, t.count),
                    WindowField::MonthlyAvg => avg(t.sum, u64::from(w.months().unwrap_or(1))),
                    WindowField::Points => Value::Num(Ratio::int(t.points)),
                }
            }
            Operand::LastPurchase => self
                .last_purchase
                .map_or(Value::Undefined, |t| Value::Num(Ratio::int(i128::from(t)))),
            Operand::Score(_) | Operand::Cell | Operand::Product | Operand::Rank(_) => {
                Value::Undefined
            }
        }
    }
}

impl Facts<'_> {
    /// The buckets of series `key` (none yet: empty).
    pub fn series_of(&self, key: u64) -> &[crate::model::state::SeriesBucket] {
        self.series
            .iter()
            .find(|x| x.key == key)
            .map_or(&[], |x| x.buckets.as_slice())
    }

    /// The plain buckets of a window's unit.
    fn plain(&self, w: &Window) -> &[Bucket] {
        match w.unit() {
            Unit::Day => self.days,
            Unit::Month => self.months,
        }
    }

    /// Window `w`'s totals at `now`: a filtered window's from its series; any other's count
    /// and sum from the plain buckets (so reading a window's points never hides the history
    /// it counted before), or, when `points` are asked, from its points series (then only
    /// `points` is meaningful).
    pub fn totals(
        &self,
        w: &Window,
        points: bool,
        cal: &crate::model::calendar::Calendar,
        now: i64,
    ) -> super::window::Totals {
        match w.series {
            Some(key) if points || !w.filter.is_empty() => w.totals(self.series_of(key), cal, now),
            _ => w.totals(self.plain(w), cal, now),
        }
    }

    /// The first moment after `now` at which window `w`'s totals change by time alone.
    pub fn next_change(
        &self,
        w: &Window,
        cal: &crate::model::calendar::Calendar,
        now: i64,
    ) -> Option<i64> {
        match w.series {
            Some(key) if !w.filter.is_empty() => w.next_change(self.series_of(key), cal, now),
            series => {
                let plain = w.next_change(self.plain(w), cal, now);
                let points = series.and_then(|key| w.next_change(self.series_of(key), cal, now));
                match (plain, points) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }
}
