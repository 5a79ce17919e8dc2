//! Fixed-bin scores (R, F, M 1–5 tables) with explicit bound inclusivity.

use super::operand::{Operand, Type};
use super::value::{Ratio, Value};

/// One bound of a bin. Lower bounds (`min`, `above`) score higher values better; upper
/// bounds (`max`, `below`) score lower values better (recency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// `value >= x`.
    Min(Ratio),
    /// `value > x`.
    Above(Ratio),
    /// `value <= x`.
    Max(Ratio),
    /// `value < x`.
    Below(Ratio),
}

impl Bound {
    /// Whether `v` is inside the bound.
    pub fn holds(self, v: Ratio) -> bool {
        match self {
            Self::Min(x) => v >= x,
            Self::Above(x) => v > x,
            Self::Max(x) => v <= x,
            Self::Below(x) => v < x,
        }
    }

    fn is_lower(self) -> bool {
        matches!(self, Self::Min(_) | Self::Above(_))
    }

    /// Ordering key: for lower bounds a later bin must have a strictly smaller key, for upper
    /// bounds a strictly larger one, or it is unreachable.
    fn key(self) -> (Ratio, u8) {
        match self {
            Self::Min(x) | Self::Below(x) => (x, 0),
            Self::Above(x) | Self::Max(x) => (x, 1),
        }
    }

    /// The whole value at which the bound's truth flips (for integer metrics such as days).
    pub fn flip_point(self) -> i128 {
        match self {
            Self::Min(x) | Self::Below(x) => x.floor() + i128::from(x.n.rem_euclid(x.d) != 0),
            Self::Above(x) | Self::Max(x) => x.floor() + 1,
        }
    }

    /// As written in rules files.
    pub fn describe(self, show: &dyn Fn(Ratio) -> String) -> String {
        match self {
            Self::Min(x) => format!(">= {}", show(x)),
            Self::Above(x) => format!("> {}", show(x)),
            Self::Max(x) => format!("<= {}", show(x)),
            Self::Below(x) => format!("< {}", show(x)),
        }
    }
}

/// One bin: the score it gives and its bound (the last bin has none and takes the rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bin {
    /// Score given.
    pub score: u8,
    /// Bound, `None` on the last bin.
    pub bound: Option<Bound>,
}

/// A fixed-bin score over one metric: bins are tried in order, the first that holds wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Score {
    /// Name (`score.<name>`).
    pub name: String,
    /// The metric scored.
    pub metric: Operand,
    /// Bins in order.
    pub bins: Vec<Bin>,
}

impl Score {
    /// Validates bins: one direction, strictly ordered (no unreachable bin), the last one
    /// unbounded (no gap). Errors are `(index of the bin or None, message)`.
    ///
    /// # Errors
    /// The first problem found.
    pub fn new(
        name: String,
        metric: Operand,
        bins: Vec<Bin>,
    ) -> Result<Self, (Option<usize>, String)> {
        if matches!(metric.kind(), Type::Cell | Type::Score) {
            return Err((
                None,
                "a score cannot be computed from scores, cells or products".into(),
            ));
        }
        if bins.is_empty() {
            return Err((None, "at least one bin is required".into()));
        }
        let last = bins.len() - 1;
        let mut prev: Option<Bound> = None;
        for (i, bin) in bins.iter().enumerate() {
            if !(1..=9).contains(&bin.score) {
                return Err((Some(i), "scores are single digits 1-9".into()));
            }
            match (bin.bound, i == last) {
                (Some(_), true) => return Err((Some(i), "the last bin must take every remaining value (remove its bound), or values beyond it get no score: the bins leave a gap".into())),
                (None, false) => return Err((Some(i), "only the last bin may be unbounded: every later bin is unreachable".into())),
                (None, true) => {}
                (Some(b), false) => {
                    if let Some(p) = prev {
                        if p.is_lower() != b.is_lower() {
                            return Err((Some(i), "mixes lower bounds (min/above) and upper bounds (max/below) in one score".into()));
                        }
                        let ok = if b.is_lower() { b.key() < p.key() } else { b.key() > p.key() };
                        if !ok {
                            return Err((Some(i), "overlaps the bin before it: it is unreachable (bounds must be strictly ordered)".into()));
                        }
                    }
                    prev = Some(b);
                }
            }
        }
        Ok(Self { name, metric, bins })
    }

    /// The score of a value; an undefined value gets the last bin.
    pub fn score(&self, v: &Value) -> u8 {
        let Some(v) = v.num() else {
            return self.bins[self.bins.len() - 1].score;
        };
        self.bins
            .iter()
            .find(|b| b.bound.is_none_or(|bound| bound.holds(v)))
            .map_or(0, |b| b.score)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(n: i128) -> Ratio {
        Ratio::int(n)
    }

    fn recency() -> Score {
        let bins = [
            (5, Some(Bound::Max(r(7)))),
            (4, Some(Bound::Max(r(30)))),
            (3, Some(Bound::Max(r(60)))),
            (2, Some(Bound::Max(r(120)))),
            (1, None),
        ]
        .into_iter()
        .map(|(score, bound)| Bin { score, bound })
        .collect();
        Score::new("R".into(), Operand::RecencyDays, bins).unwrap()
    }

    #[test]
    fn r_table_of_the_seeds() {
        let s = recency();
        let score = |d| s.score(&Value::Num(r(d)));
        assert_eq!(
            [
                score(0),
                score(7),
                score(8),
                score(30),
                score(31),
                score(60),
                score(61),
                score(120),
                score(121)
            ],
            [5, 5, 4, 4, 3, 3, 2, 2, 1]
        );
        assert_eq!(s.score(&Value::Undefined), 1);
        assert_eq!(Bound::Max(r(7)).flip_point(), 8);
        assert_eq!(Bound::Below(r(30)).flip_point(), 30);
    }

    #[test]
    fn gaps_and_unreachable_bins_are_refused() {
        let mk = |bins: Vec<(u8, Option<Bound>)>| {
            Score::new(
                "F".into(),
                Operand::Count,
                bins.into_iter()
                    .map(|(score, bound)| Bin { score, bound })
                    .collect(),
            )
            .map(|_| ())
            .unwrap_err()
        };
        assert!(mk(vec![
            (5, Some(Bound::Min(r(10)))),
            (1, Some(Bound::Min(r(0))))
        ])
        .1
        .contains("gap"));
        assert!(mk(vec![
            (5, Some(Bound::Min(r(10)))),
            (4, Some(Bound::Above(r(10)))),
            (1, None)
        ])
        .1
        .contains("unreachable"));
        assert!(mk(vec![(5, None), (1, None)]).1.contains("unreachable"));
        assert!(mk(vec![
            (5, Some(Bound::Min(r(10)))),
            (4, Some(Bound::Max(r(5)))),
            (1, None)
        ])
        .1
        .contains("mixes"));
        // `min 10` then `above 9` is fine: 9 < x < 10 is reachable for money.
        assert!(Score::new(
            "M".into(),
            Operand::Sum,
            vec![
                Bin {
                    score: 2,
                    bound: Some(Bound::Min(r(10)))
                },
                Bin {
                    score: 1,
                    bound: Some(Bound::Above(r(9)))
                },
                Bin {
                    score: 1,
                    bound: None
                }
            ]
        )
        .is_ok());
    }
}
