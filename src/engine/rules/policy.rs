//! Downgrade policy: how and when a customer leaves a tier (upgrades are always immediate).

use super::condition::Clause;
use crate::model::calendar::{Calendar, Period, DAY_MS};

/// Where a downgrade lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Downgrade {
    /// Re-place by current metrics (may drop several tiers at once).
    Replace,
    /// One tier down at a time ("soft landing"); the next step waits for the next review.
    Step,
    /// Straight to the base (last) tier.
    Base,
}

impl Downgrade {
    /// As written in rules files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replace => "replace",
            Self::Step => "step",
            Self::Base => "base",
        }
    }
}

/// When a tier is reviewed: between reviews a customer keeps the tier even if their metrics
/// drop (its validity); at a review they keep it only if they still qualify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Review {
    /// Every evaluation is a review: metrics dropping below the tier downgrade at once
    /// (subject to grace and minimum stay). Rolling windows make this a rolling review.
    Continuous,
    /// Valid for N days from entering (or renewing) the tier — the travel site's 60 days.
    Days(u32),
    /// On calendar boundaries; the customer is re-placed from the closing period's metrics.
    Calendar(Period),
    /// Yearly on the anniversary of the customer's first purchase (join date).
    Anniversary,
    /// Yearly on a fixed date (`MM-DD`, UTC).
    Date {
        /// Month 1-12.
        month: u8,
        /// Day 1-31.
        day: u8,
    },
}

impl Review {
    /// Parses `continuous`, `days:N`, `month`, `quarter`, `year`, `anniversary`, `date:MM-DD`.
    ///
    /// # Errors
    /// A message listing the accepted forms.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("{text:?}: expected continuous, days:<N>, month, quarter, year, anniversary or date:<MM-DD>")
        };
        Ok(match text {
            "continuous" => Self::Continuous,
            "month" => Self::Calendar(Period::Month),
            "quarter" => Self::Calendar(Period::Quarter),
            "year" => Self::Calendar(Period::Year),
            "anniversary" => Self::Anniversary,
            _ => {
                if let Some(n) = text.strip_prefix("days:") {
                    let n: u32 = n.parse().map_err(|_| bad())?;
                    if n == 0 || n > 36_600 {
                        return Err(format!("{text:?}: days must be 1..=36600"));
                    }
                    Self::Days(n)
                } else if let Some(md) = text.strip_prefix("date:") {
                    let (m, d) = md.split_once('-').ok_or_else(bad)?;
                    let (month, day): (u8, u8) =
                        (m.parse().map_err(|_| bad())?, d.parse().map_err(|_| bad())?);
                    let max = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
                    if !(1..=12).contains(&month) || day == 0 || day > max[usize::from(month) - 1] {
                        return Err(format!("{text:?}: not a calendar date"));
                    }
                    Self::Date { month, day }
                } else {
                    return Err(bad());
                }
            }
        })
    }

    /// The next review after `now` for a customer entering or renewing the tier at `now`
    /// (`first_purchase` anchors anniversaries). `None`: continuous.
    pub fn next(self, cal: &Calendar, now: i64, first_purchase: Option<i64>) -> Option<i64> {
        match self {
            Self::Continuous => None,
            Self::Days(n) => Some(now.saturating_add(i64::from(n) * DAY_MS)),
            Self::Calendar(p) => Some(p.next_start(cal, now)),
            Self::Anniversary => {
                let (m, d) = cal.month_day(first_purchase.unwrap_or(now));
                Some(cal.next_yearly(now, m, d))
            }
            Self::Date { month, day } => Some(cal.next_yearly(now, month, day)),
        }
    }

    /// Calendar reviews judge the period that just closed: metrics are read 1 ms before it.
    pub fn judges_closing_period(self) -> bool {
        matches!(self, Self::Calendar(_))
    }

    /// As written in rules files.
    pub fn describe(self) -> String {
        match self {
            Self::Continuous => "continuous".into(),
            Self::Days(n) => format!("days:{n}"),
            Self::Calendar(Period::Month) => "month".into(),
            Self::Calendar(Period::Quarter) => "quarter".into(),
            Self::Calendar(Period::Year) => "year".into(),
            Self::Anniversary => "anniversary".into(),
            Self::Date { month, day } => format!("date:{month:02}-{day:02}"),
        }
    }
}

/// The resolved policy of one tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierPolicy {
    /// Where a downgrade from this tier lands.
    pub downgrade: Downgrade,
    /// A downgrade takes effect only after the customer failed to qualify this long
    /// (cancelled if they requalify meanwhile). Milliseconds.
    pub grace_ms: i64,
    /// No downgrade before the customer spent this long in the tier. Milliseconds.
    pub min_stay_ms: i64,
    /// When the tier is reviewed.
    pub review: Review,
    /// Hysteresis: once in the tier, the customer stays while these all hold (a lower bar
    /// than the tier's entry conditions). Empty: the entry conditions.
    pub stay: Vec<Clause>,
    /// Whether an upgrade into this tier starts a new validity period (otherwise the
    /// current review date is kept).
    pub upgrade_restarts_review: bool,
    /// How the policy reads on change events, e.g. `"downgrade=step review=days:60"`.
    pub text: String,
}
