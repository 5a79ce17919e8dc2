//! Calendar arithmetic in UTC: day and month bucket indexes, period boundaries, anniversaries.
//! Pure functions of Unix milliseconds; rolling windows and reviews are built on them.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// One day in milliseconds.
pub const DAY_MS: i64 = 86_400_000;

/// The granularity of window buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// UTC calendar days.
    Day,
    /// UTC calendar months.
    Month,
}

/// A calendar period for periodic reviews and calendar windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// A calendar month.
    Month,
    /// A calendar quarter (Jan–Mar, Apr–Jun, Jul–Sep, Oct–Dec).
    Quarter,
    /// A calendar year.
    Year,
}

impl Period {
    /// Months in one period.
    pub fn months(self) -> i32 {
        match self {
            Self::Month => 1,
            Self::Quarter => 3,
            Self::Year => 12,
        }
    }

    /// The period (as a month-bucket index divided by [`Period::months`]) containing a month.
    pub fn of_month(self, month_index: i32) -> i32 {
        month_index.div_euclid(self.months())
    }

    /// Start of the period after the one containing `ms`.
    pub fn next_start(self, ms: i64) -> i64 {
        let p = self.of_month(month_index(ms));
        month_start((p + 1) * self.months())
    }

    /// Start of the period containing `ms`.
    pub fn start(self, ms: i64) -> i64 {
        month_start(self.of_month(month_index(ms)) * self.months())
    }
}

fn datetime(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn to_ms(date: Date) -> i64 {
    let t = PrimitiveDateTime::new(date, Time::MIDNIGHT).assume_utc();
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Day bucket index (days since 1970-01-01 UTC).
pub fn day_index(ms: i64) -> i32 {
    i32::try_from(ms.div_euclid(DAY_MS)).unwrap_or(if ms < 0 { i32::MIN } else { i32::MAX })
}

/// Month bucket index (`year * 12 + month - 1`, UTC).
pub fn month_index(ms: i64) -> i32 {
    let t = datetime(ms);
    t.year() * 12 + i32::from(u8::from(t.month())) - 1
}

/// Bucket index of `ms` in `unit`.
pub fn index(unit: Unit, ms: i64) -> i32 {
    match unit {
        Unit::Day => day_index(ms),
        Unit::Month => month_index(ms),
    }
}

/// Start (Unix ms) of a month bucket.
pub fn month_start(month_index: i32) -> i64 {
    let year = month_index.div_euclid(12);
    let month = u8::try_from(month_index.rem_euclid(12) + 1).expect("1..=12");
    Date::from_calendar_date(year, Month::try_from(month).expect("valid month"), 1)
        .map_or(i64::MAX, to_ms)
}

/// Start (Unix ms) of a bucket.
pub fn bucket_start(unit: Unit, index: i32) -> i64 {
    match unit {
        Unit::Day => i64::from(index) * DAY_MS,
        Unit::Month => month_start(index),
    }
}

/// The first moment strictly after `after` that falls on `month`-`day` (UTC midnight); 29 Feb
/// falls on 28 Feb in other years.
pub fn next_yearly(after: i64, month: u8, day: u8) -> i64 {
    let year = datetime(after).year();
    for y in year..=year + 1 {
        let m = Month::try_from(month).unwrap_or(Month::January);
        let d = day.min(m.length(y));
        if let Ok(date) = Date::from_calendar_date(y, m, d) {
            let at = to_ms(date);
            if at > after {
                return at;
            }
        }
    }
    i64::MAX
}

/// Month and day (UTC) of `ms`.
pub fn month_day(ms: i64) -> (u8, u8) {
    let t = datetime(ms);
    (u8::from(t.month()), t.day())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::time::parse_rfc3339_ms;

    fn at(s: &str) -> i64 {
        parse_rfc3339_ms(s).unwrap()
    }

    #[test]
    fn indexes_and_boundaries() {
        let t = at("2026-05-17T13:00:00Z");
        assert_eq!(month_index(t), 2026 * 12 + 4);
        assert_eq!(month_start(month_index(t)), at("2026-05-01T00:00:00Z"));
        assert_eq!(
            bucket_start(Unit::Day, day_index(t)),
            at("2026-05-17T00:00:00Z")
        );
        assert_eq!(Period::Quarter.start(t), at("2026-04-01T00:00:00Z"));
        assert_eq!(Period::Quarter.next_start(t), at("2026-07-01T00:00:00Z"));
        assert_eq!(Period::Year.next_start(t), at("2027-01-01T00:00:00Z"));
        assert_eq!(
            Period::Month.next_start(at("2026-12-31T23:59:59Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert_eq!(day_index(-1), -1);
    }

    #[test]
    fn yearly_dates() {
        assert_eq!(
            next_yearly(at("2026-05-17T13:00:00Z"), 4, 1),
            at("2027-04-01T00:00:00Z")
        );
        assert_eq!(
            next_yearly(at("2026-03-17T13:00:00Z"), 4, 1),
            at("2026-04-01T00:00:00Z")
        );
        assert_eq!(
            next_yearly(at("2027-01-01T00:00:00Z"), 2, 29),
            at("2027-02-28T00:00:00Z")
        );
        assert_eq!(
            next_yearly(at("2027-04-01T00:00:00Z"), 4, 1),
            at("2028-04-01T00:00:00Z")
        );
    }
}
