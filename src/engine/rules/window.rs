//! Rolling and calendar windows over bucketed purchase history.

use super::filter::Filter;
use crate::model::calendar::{Calendar, Period, Unit};
use crate::model::state::{Bucket, SeriesBucket};

/// What a window covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// The current bucket and the `length - 1` before it (e.g. 12 months: this month and the
    /// 11 before; 30 days: today and the 29 days before).
    Rolling {
        /// Bucket granularity.
        unit: Unit,
        /// Number of buckets.
        length: u32,
    },
    /// The current calendar period (month-to-date, quarter-to-date, year-to-date).
    Calendar(Period),
}

/// A declared window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Its name in the rules file (`window.<name>.sum`).
    pub name: String,
    /// What it covers.
    pub span: Span,
    /// Which events it counts (`only` / `exclude`; default: all).
    pub filter: Filter,
    /// The key of the window series it reads: with a filter, everything it counts; without,
    /// only its points, when they are read (its count and sum always come from the
    /// customer's plain day or month buckets). `None`: no series.
    pub series: Option<u64>,
}

/// Count, net sum and net points inside a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Purchases.
    pub count: u64,
    /// Purchases minus refunds, minor units.
    pub sum: i128,
    /// Purchases' points minus refunds' points (0 for plain buckets, which keep no points).
    pub points: i128,
}

/// A bucket a window can total: the plain buckets, or a series' buckets (with points).
pub trait Counts {
    /// The day or month index.
    fn index(&self) -> i32;
    /// Purchases in the bucket.
    fn purchases(&self) -> u64;
    /// Net spend, minor units.
    fn net_minor(&self) -> i128;
    /// Net points.
    fn points(&self) -> i128;
}

impl Counts for Bucket {
    fn index(&self) -> i32 {
        self.index
    }
    fn purchases(&self) -> u64 {
        self.purchases
    }
    fn net_minor(&self) -> i128 {
        self.net_minor
    }
    fn points(&self) -> i128 {
        0
    }
}

impl Counts for SeriesBucket {
    fn index(&self) -> i32 {
        self.index
    }
    fn purchases(&self) -> u64 {
        self.purchases
    }
    fn net_minor(&self) -> i128 {
        self.net_minor
    }
    fn points(&self) -> i128 {
        self.points
    }
}

/// A window series the rules keep per customer: the buckets of the events one filter admits,
/// in one unit, as many as its longest window needs. Windows with the same unit and filter
/// share a series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesDef {
    /// Hash of the unit and the filter's canonical text: stored with the series, so a rules
    /// change that alters either starts a new series (and the old one is dropped).
    pub key: u64,
    /// Bucket granularity.
    pub unit: Unit,
    /// Which events it counts.
    pub filter: Filter,
    /// Buckets kept (the longest window reading it).
    pub keep: u32,
}

impl SeriesDef {
    /// The key of a series of `unit` and `filter`.
    pub fn key_of(unit: Unit, filter: &Filter) -> u64 {
        let unit = match unit {
            Unit::Day => "day",
            Unit::Month => "month",
        };
        // JSON: names and values are quoted and escaped, so no two filters share a text
        // (a value "app|store" is not the values "app" and "store").
        let text =
            serde_json::to_string(&(unit, &filter.only, &filter.exclude)).expect("strings encode");
        xxhash_rust::xxh3::xxh3_64(text.as_bytes())
    }
}

impl Window {
    /// How many buckets of its unit the window needs (a calendar month, quarter or year
    /// window: 1, 3 or 12 months).
    pub fn kept(&self) -> u32 {
        match self.span {
            Span::Rolling { length, .. } => length,
            Span::Calendar(p) => p.months().unsigned_abs(),
        }
    }

    /// The bucket unit this window reads.
    pub fn unit(&self) -> Unit {
        match self.span {
            Span::Rolling { unit, .. } => unit,
            Span::Calendar(_) => Unit::Month,
        }
    }

    /// Lowest bucket index inside the window at `now` (in `cal`).
    pub fn low(&self, cal: &Calendar, now: i64) -> i32 {
        match self.span {
            Span::Rolling { unit, length } => cal
                .index(unit, now)
                .saturating_sub(i32::try_from(length).unwrap_or(i32::MAX) - 1),
            Span::Calendar(p) => p.of_month(cal.month_index(now)) * p.months(),
        }
    }

    /// Highest bucket index inside the window at `now` (rolling windows include buckets
    /// ahead of `now`, i.e. events within the allowed lateness ahead of the clock).
    fn high(&self, cal: &Calendar, now: i64) -> i32 {
        match self.span {
            Span::Rolling { .. } => i32::MAX,
            Span::Calendar(p) => (p.of_month(cal.month_index(now)) + 1) * p.months() - 1,
        }
    }

    /// Totals at `now` over `buckets` (of this window's unit).
    pub fn totals<B: Counts>(&self, buckets: &[B], cal: &Calendar, now: i64) -> Totals {
        let (lo, hi) = (self.low(cal, now), self.high(cal, now));
        buckets
            .iter()
            .filter(|b| b.index() >= lo && b.index() <= hi)
            .fold(Totals::default(), |t, b| Totals {
                count: t.count + b.purchases(),
                sum: t.sum + b.net_minor(),
                points: t.points + b.points(),
            })
    }

    /// Months the window spans, for monthly averages (`None` for day windows).
    pub fn months(&self) -> Option<u32> {
        match self.span {
            Span::Rolling {
                unit: Unit::Month,
                length,
            } => Some(length),
            Span::Rolling {
                unit: Unit::Day, ..
            } => None,
            Span::Calendar(p) => Some(p.months().unsigned_abs()),
        }
    }

    /// The first moment after `now` at which the window's totals change by time alone:
    /// the oldest non-empty bucket leaving it, or a later bucket's period starting.
    pub fn next_change<B: Counts>(&self, buckets: &[B], cal: &Calendar, now: i64) -> Option<i64> {
        let (lo, hi) = (self.low(cal, now), self.high(cal, now));
        let unit = self.unit();
        let mut next: Option<i64> = None;
        let mut consider = |t: i64| {
            if t > now {
                next = Some(next.map_or(t, |n: i64| n.min(t)));
            }
        };
        match self.span {
            Span::Rolling { length, .. } => {
                if let Some(oldest) = buckets
                    .iter()
                    .filter(|b| {
                        b.index() >= lo
                            && (b.purchases() > 0 || b.net_minor() != 0 || b.points() != 0)
                    })
                    .map(Counts::index)
                    .min()
                {
                    let leaves = oldest.saturating_add(i32::try_from(length).unwrap_or(i32::MAX));
                    consider(cal.bucket_start(unit, leaves));
                }
            }
            Span::Calendar(p) => {
                if buckets.iter().any(|b| b.index() >= lo && b.index() <= hi) {
                    consider(p.next_start(cal, now));
                }
                if let Some(ahead) = buckets
                    .iter()
                    .filter(|b| b.index() > hi)
                    .map(Counts::index)
                    .min()
                {
                    consider(cal.month_start(p.of_month(ahead) * p.months()));
                }
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::calendar::{Calendar, DAY_MS};

    fn utc() -> Calendar {
        Calendar::utc()
    }

    fn day_index(ms: i64) -> i32 {
        utc().day_index(ms)
    }

    fn month_index(ms: i64) -> i32 {
        utc().month_index(ms)
    }
    use crate::model::time::parse_rfc3339_ms;

    fn at(s: &str) -> i64 {
        parse_rfc3339_ms(s).unwrap()
    }

    #[test]
    fn rolling_day_window_expires_bucket_by_bucket() {
        let w = Window {
            name: "d30".into(),
            span: Span::Rolling {
                unit: Unit::Day,
                length: 30,
            },
            filter: Filter::default(),
            series: None,
        };
        let t0 = at("2026-01-10T12:00:00Z");
        let buckets = vec![
            Bucket::from((day_index(t0), 1, 100)),
            Bucket::from((day_index(t0) + 5, 2, 50)),
        ];
        assert_eq!(
            w.totals(&buckets, &utc(), t0 + 5 * DAY_MS),
            Totals {
                count: 3,
                sum: 150,
                points: 0
            }
        );
        // The first bucket leaves when its day + 30 starts.
        let leaves = at("2026-02-09T00:00:00Z");
        assert_eq!(w.next_change(&buckets, &utc(), t0), Some(leaves));
        assert_eq!(w.totals(&buckets, &utc(), leaves - 1).count, 3);
        assert_eq!(
            w.totals(&buckets, &utc(), leaves),
            Totals {
                count: 2,
                sum: 50,
                points: 0
            }
        );
        assert_eq!(
            w.next_change(&buckets, &utc(), leaves),
            Some(leaves + 5 * DAY_MS)
        );
        assert_eq!(w.next_change(&buckets, &utc(), leaves + 5 * DAY_MS), None);
    }

    #[test]
    fn calendar_quarter_window() {
        let w = Window {
            name: "q".into(),
            span: Span::Calendar(Period::Quarter),
            filter: Filter::default(),
            series: None,
        };
        let t = at("2026-05-17T00:00:00Z");
        let buckets = vec![
            Bucket::from((month_index(at("2026-03-31T00:00:00Z")), 1, 7)),
            Bucket::from((month_index(t), 1, 10)),
            Bucket::from((month_index(at("2026-06-30T00:00:00Z")), 1, 20)),
        ];
        assert_eq!(
            w.totals(&buckets, &utc(), t),
            Totals {
                count: 2,
                sum: 30,
                points: 0
            }
        );
        assert_eq!(
            w.next_change(&buckets, &utc(), t),
            Some(at("2026-07-01T00:00:00Z"))
        );
        assert_eq!(w.months(), Some(3));
    }
}
