//! Calendar arithmetic in the program's time zone (`time_zone` of the rules file; UTC by
//! default): day and month bucket indexes, period boundaries, anniversaries. Pure functions of
//! Unix milliseconds and a [`Calendar`]; rolling windows and reviews are built on them.
//!
//! A zone's days and months are its local calendar's: a day bucket holds the events of one
//! local date, a month starts at local midnight of its first day (08:00 the previous day UTC
//! in Shanghai), and a day can be 23 or 25 hours long across a DST change. Local midnights that
//! do not exist (a zone whose clocks skip from 00:00 to 01:00) start at the first local time
//! after the gap (jiff's "compatible" rule). Where clocks go back across midnight, an instant
//! belongs to the local date its offset gives (the day index can step back for the repeated
//! stretch) and a window expiry at that midnight may be decided late, at the customer's next
//! event: untested, and no zone is known to do this today. The zone database is compiled in
//! (jiff's bundled tzdb), so every instance and every replay of one binary computes the same
//! boundaries whatever the host's `/usr/share/zoneinfo` says.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// The program's calendar: UTC, or an IANA time zone.
#[derive(Debug, Clone, Default)]
pub struct Calendar {
    /// `None`: UTC (plain arithmetic, no zone lookups).
    zone: Option<jiff::tz::TimeZone>,
    /// The IANA name as configured (`"UTC"` when none).
    name: String,
}

impl PartialEq for Calendar {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Calendar {}

impl Calendar {
    /// UTC.
    pub fn utc() -> Self {
        Self::default()
    }

    /// The calendar of IANA time zone `name` (e.g. `"Asia/Shanghai"`; `"UTC"` is UTC).
    ///
    /// # Errors
    /// A message naming the zone when the bundled database does not know it.
    pub fn named(name: &str) -> Result<Self, String> {
        if name == "UTC" {
            return Ok(Self::utc());
        }
        // The bundled database explicitly (not `jiff::tz::db()`, which would prefer the host's
        // zoneinfo if another crate enabled jiff's `tzdb-zoneinfo`): every instance and
        // replay of one binary must draw the same boundaries.
        static BUNDLED: std::sync::LazyLock<jiff::tz::TimeZoneDatabase> =
            std::sync::LazyLock::new(jiff::tz::TimeZoneDatabase::bundled);
        let zone = BUNDLED.get(name).map_err(|e| {
            format!("{name:?} is not an IANA time zone name (e.g. \"Asia/Shanghai\", \"Europe/Berlin\", \"UTC\"): {e}")
        })?;
        Ok(Self {
            zone: Some(zone),
            name: name.to_owned(),
        })
    }

    /// The zone's IANA name (`"UTC"` for UTC).
    pub fn name(&self) -> &str {
        if self.zone.is_none() {
            "UTC"
        } else {
            &self.name
        }
    }

    /// `ms` on the local wall clock, as the Unix ms of the same wall-clock reading in UTC.
    fn local(&self, ms: i64) -> i64 {
        let Some(zone) = &self.zone else { return ms };
        let Ok(ts) = jiff::Timestamp::from_millisecond(ms) else {
            return ms;
        };
        ms.saturating_add(i64::from(zone.to_offset(ts).seconds()) * 1000)
    }

    /// The instant at which the local wall clock reads `wall` (given as the Unix ms of the same
    /// reading in UTC); a reading inside a gap is the first instant after it.
    fn instant(&self, wall: i64) -> i64 {
        let Some(zone) = &self.zone else { return wall };
        let t = datetime(wall);
        let civil = jiff::civil::DateTime::new(
            i16::try_from(t.year()).unwrap_or(i16::MAX),
            i8::try_from(u8::from(t.month())).unwrap_or(1),
            i8::try_from(t.day()).unwrap_or(1),
            i8::try_from(t.hour()).unwrap_or(0),
            i8::try_from(t.minute()).unwrap_or(0),
            i8::try_from(t.second()).unwrap_or(0),
            0,
        );
        civil
            .and_then(|c| zone.to_ambiguous_zoned(c).compatible())
            .map_or(wall, |z| z.timestamp().as_millisecond())
    }

    /// Day bucket index: local days since 1970-01-01.
    pub fn day_index(&self, ms: i64) -> i32 {
        day_index(self.local(ms))
    }

    /// Month bucket index (`year * 12 + month - 1`, local).
    pub fn month_index(&self, ms: i64) -> i32 {
        month_index(self.local(ms))
    }

    /// Bucket index of `ms` in `unit`.
    pub fn index(&self, unit: Unit, ms: i64) -> i32 {
        match unit {
            Unit::Day => self.day_index(ms),
            Unit::Month => self.month_index(ms),
        }
    }

    /// Start (Unix ms) of a month bucket: local midnight of its first day.
    pub fn month_start(&self, month_index: i32) -> i64 {
        self.instant(month_start(month_index))
    }

    /// Start (Unix ms) of a bucket: local midnight.
    pub fn bucket_start(&self, unit: Unit, index: i32) -> i64 {
        match unit {
            Unit::Day => self.instant(i64::from(index) * DAY_MS),
            Unit::Month => self.month_start(index),
        }
    }

    /// The first moment strictly after `after` that falls on `month`-`day` (local midnight);
    /// 29 Feb falls on 28 Feb in other years.
    pub fn next_yearly(&self, after: i64, month: u8, day: u8) -> i64 {
        let year = datetime(self.local(after)).year();
        for y in year..=year + 1 {
            let m = Month::try_from(month).unwrap_or(Month::January);
            let d = day.min(m.length(y));
            if let Ok(date) = Date::from_calendar_date(y, m, d) {
                let at = self.instant(to_ms(date));
                if at > after {
                    return at;
                }
            }
        }
        i64::MAX
    }

    /// Month and day (local) of `ms`.
    pub fn month_day(&self, ms: i64) -> (u8, u8) {
        let t = datetime(self.local(ms));
        (u8::from(t.month()), t.day())
    }
}

/// One day in milliseconds.
pub const DAY_MS: i64 = 86_400_000;

/// The granularity of window buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// Calendar days (of the program's time zone).
    Day,
    /// Calendar months (of the program's time zone).
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

    /// Start of the period after the one containing `ms`, in `cal`.
    pub fn next_start(self, cal: &Calendar, ms: i64) -> i64 {
        let p = self.of_month(cal.month_index(ms));
        cal.month_start((p + 1) * self.months())
    }

    /// Start of the period containing `ms`, in `cal`.
    pub fn start(self, cal: &Calendar, ms: i64) -> i64 {
        cal.month_start(self.of_month(cal.month_index(ms)) * self.months())
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

/// Day bucket index (days since 1970-01-01) of a UTC reading.
fn day_index(ms: i64) -> i32 {
    i32::try_from(ms.div_euclid(DAY_MS)).unwrap_or(if ms < 0 { i32::MIN } else { i32::MAX })
}

/// Month bucket index (`year * 12 + month - 1`) of a UTC reading; readings beyond the years
/// ±9999 (the `time` crate's range) count as January 1970, as they always did.
///
/// Integer arithmetic (H. Hinnant's `civil_from_days`, exact over the proleptic Gregorian
/// calendar) rather than a `time` date: it runs several times per event for every month
/// window (bucket, window bounds, expiry), and the date conversion was ~8 % of the
/// per-event instructions under rules with three month windows (docs/performance.md).
/// Pinned against `time` by a property test.
fn month_index(ms: i64) -> i32 {
    let z = ms.div_euclid(DAY_MS) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(-9999..=9999).contains(&year) {
        return 1970 * 12;
    }
    i32::try_from(year * 12 + month - 1).expect("years within ±9999")
}

/// Start (Unix ms) of a month bucket, UTC.
fn month_start(month_index: i32) -> i64 {
    let year = month_index.div_euclid(12);
    let month = u8::try_from(month_index.rem_euclid(12) + 1).expect("1..=12");
    Date::from_calendar_date(year, Month::try_from(month).expect("valid month"), 1)
        .map_or(i64::MAX, to_ms)
}

#[cfg(test)]
mod tests {

    #[test]
    fn month_index_at_the_edges_of_the_range() {
        let last = datetime(0)
            .replace_date(Date::from_calendar_date(9999, Month::December, 31).unwrap())
            .unix_timestamp()
            * 1000
            + DAY_MS
            - 1;
        let first = Date::from_calendar_date(-9999, Month::January, 1)
            .map(to_ms)
            .unwrap();
        for ms in [last, last + 1, first, first - 1, i64::MIN, i64::MAX, 0, -1] {
            let t = datetime(ms);
            assert_eq!(
                month_index(ms),
                t.year() * 12 + i32::from(u8::from(t.month())) - 1,
                "{ms}"
            );
        }
        assert_eq!(month_index(last), 9999 * 12 + 11);
        assert_eq!(month_index(last + 1), 1970 * 12);
    }

    proptest::proptest! {
        /// The arithmetic month index equals the `time` crate's date, over its whole range
        /// and beyond (where both give January 1970).
        #[test]
        fn month_index_is_the_calendar_month(ms in proptest::prelude::any::<i64>(), near in -400_000_000_000_000i64..400_000_000_000_000) {
            for ms in [ms, near, near - near.rem_euclid(DAY_MS), near - near.rem_euclid(DAY_MS) - 1] {
                let t = datetime(ms);
                let expected = t.year() * 12 + i32::from(u8::from(t.month())) - 1;
                proptest::prop_assert_eq!(month_index(ms), expected, "{}", ms);
            }
        }
    }

    use super::*;
    use crate::model::time::parse_rfc3339_ms;

    fn at(s: &str) -> i64 {
        parse_rfc3339_ms(s).unwrap()
    }

    #[test]
    fn indexes_and_boundaries() {
        let utc = Calendar::utc();
        let t = at("2026-05-17T13:00:00Z");
        assert_eq!(utc.month_index(t), 2026 * 12 + 4);
        assert_eq!(
            utc.month_start(utc.month_index(t)),
            at("2026-05-01T00:00:00Z")
        );
        assert_eq!(
            utc.bucket_start(Unit::Day, utc.day_index(t)),
            at("2026-05-17T00:00:00Z")
        );
        assert_eq!(Period::Quarter.start(&utc, t), at("2026-04-01T00:00:00Z"));
        assert_eq!(
            Period::Quarter.next_start(&utc, t),
            at("2026-07-01T00:00:00Z")
        );
        assert_eq!(Period::Year.next_start(&utc, t), at("2027-01-01T00:00:00Z"));
        assert_eq!(
            Period::Month.next_start(&utc, at("2026-12-31T23:59:59Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert_eq!(utc.day_index(-1), -1);
        assert_eq!(Calendar::named("UTC").unwrap(), utc);
    }

    #[test]
    fn yearly_dates() {
        let utc = Calendar::utc();
        assert_eq!(
            utc.next_yearly(at("2026-05-17T13:00:00Z"), 4, 1),
            at("2027-04-01T00:00:00Z")
        );
        assert_eq!(
            utc.next_yearly(at("2026-03-17T13:00:00Z"), 4, 1),
            at("2026-04-01T00:00:00Z")
        );
        assert_eq!(
            utc.next_yearly(at("2027-01-01T00:00:00Z"), 2, 29),
            at("2027-02-28T00:00:00Z")
        );
        assert_eq!(
            utc.next_yearly(at("2027-04-01T00:00:00Z"), 4, 1),
            at("2028-04-01T00:00:00Z")
        );
    }

    /// Shanghai (UTC+8, no DST): a quarter, a month and a day start at local midnight, 16:00
    /// UTC the day before.
    #[test]
    fn a_shanghai_quarter_starts_at_local_midnight() {
        let sh = Calendar::named("Asia/Shanghai").unwrap();
        let utc = Calendar::utc();
        // 31 March 17:00 UTC is 1 April 01:00 in Shanghai: the second quarter there.
        let t = at("2026-03-31T17:00:00Z");
        assert_eq!(sh.month_index(t), 2026 * 12 + 3);
        assert_eq!(utc.month_index(t), 2026 * 12 + 2);
        assert_eq!(Period::Quarter.start(&sh, t), at("2026-03-31T16:00:00Z"));
        assert_eq!(Period::Quarter.start(&utc, t), at("2026-01-01T00:00:00Z"));
        assert_eq!(
            Period::Quarter.next_start(&sh, t),
            at("2026-06-30T16:00:00Z")
        );
        assert_eq!(
            Period::Quarter.next_start(&sh, at("2026-03-31T15:59:59.999Z")),
            at("2026-03-31T16:00:00Z")
        );
        assert_eq!(sh.day_index(t), utc.day_index(at("2026-04-01T00:00:00Z")));
        assert_eq!(
            sh.bucket_start(Unit::Day, sh.day_index(t)),
            at("2026-03-31T16:00:00Z")
        );
        assert_eq!(sh.month_day(t), (4, 1));
        assert_eq!(sh.next_yearly(t, 4, 1), at("2027-03-31T16:00:00Z"));
        assert_eq!(
            sh.next_yearly(at("2026-03-31T15:00:00Z"), 4, 1),
            at("2026-03-31T16:00:00Z")
        );
        assert_eq!(sh.name(), "Asia/Shanghai");
    }

    /// Berlin across both DST changes of 2026: the day of the spring change has 23 hours, the
    /// autumn one 25; buckets follow the local dates.
    #[test]
    fn berlin_days_follow_the_local_date_across_dst() {
        let be = Calendar::named("Europe/Berlin").unwrap();
        let spring = be.day_index(at("2026-03-29T12:00:00Z"));
        assert_eq!(
            be.bucket_start(Unit::Day, spring),
            at("2026-03-28T23:00:00Z")
        );
        assert_eq!(
            be.bucket_start(Unit::Day, spring + 1),
            at("2026-03-29T22:00:00Z")
        );
        // 22:30 UTC on 29 March is 00:30 on the 30th in Berlin (summer time, UTC+2).
        assert_eq!(be.day_index(at("2026-03-29T22:30:00Z")), spring + 1);
        assert_eq!(be.day_index(at("2026-03-29T21:59:59Z")), spring);
        let autumn = be.day_index(at("2026-10-25T12:00:00Z"));
        assert_eq!(
            be.bucket_start(Unit::Day, autumn),
            at("2026-10-24T22:00:00Z")
        );
        assert_eq!(
            be.bucket_start(Unit::Day, autumn + 1),
            at("2026-10-25T23:00:00Z")
        );
        assert_eq!(
            be.month_start(be.month_index(at("2026-11-15T00:00:00Z"))),
            at("2026-10-31T23:00:00Z")
        );
        assert_eq!(
            be.month_start(be.month_index(at("2026-07-15T00:00:00Z"))),
            at("2026-06-30T22:00:00Z")
        );
    }

    /// A local midnight that does not exist (São Paulo's clocks went from 00:00 to 01:00 on
    /// 4 November 2018): the day starts at the first local time after the gap.
    #[test]
    fn a_day_whose_midnight_is_skipped_starts_after_the_gap() {
        let sp = Calendar::named("America/Sao_Paulo").unwrap();
        let day = sp.day_index(at("2018-11-04T12:00:00Z"));
        // 01:00 local (UTC-2 from then) is 03:00 UTC.
        assert_eq!(sp.bucket_start(Unit::Day, day), at("2018-11-04T03:00:00Z"));
        assert_eq!(sp.day_index(at("2018-11-04T02:59:59Z")), day - 1);
        assert_eq!(sp.day_index(at("2018-11-04T03:00:00Z")), day);
    }

    #[test]
    fn an_unknown_zone_is_refused_naming_it() {
        let err = Calendar::named("Asia/Beijing").unwrap_err();
        assert!(
            err.contains("\"Asia/Beijing\" is not an IANA time zone name"),
            "{err}"
        );
    }
}
