//! Exact values rules compare: rationals of integers (money in minor units, counts, days,
//! scores) so averages are compared without division or rounding.

use std::cmp::Ordering;

/// `n / d` with `d > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio {
    /// Numerator.
    pub n: i128,
    /// Denominator, always positive.
    pub d: i128,
}

impl Ratio {
    /// A whole number.
    pub const fn int(n: i128) -> Self {
        Self { n, d: 1 }
    }

    /// `n / d`; `None` when `d` is zero (an average of nothing is undefined).
    pub fn new(n: i128, d: i128) -> Option<Self> {
        match d.cmp(&0) {
            Ordering::Equal => None,
            Ordering::Greater => Some(Self { n, d }),
            Ordering::Less => Some(Self { n: -n, d: -d }),
        }
    }

    /// Rounded towards negative infinity.
    pub fn floor(self) -> i128 {
        self.n.div_euclid(self.d)
    }
}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ratio {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.n.checked_mul(other.d), other.n.checked_mul(self.d)) {
            (Some(a), Some(b)) => a.cmp(&b),
            // Beyond i128: fall back to floors (values this large are never thresholds).
            _ => self.floor().cmp(&other.floor()),
        }
    }
}

/// A metric value as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Not defined (an average with no purchases, recency with no purchase): every
    /// comparison with it is false, and a score over it is its last (worst) bin.
    Undefined,
    /// A number.
    Num(Ratio),
    /// An RFM cell such as `"532"`.
    Text(String),
}

impl Value {
    /// The number, if this is one.
    pub fn num(&self) -> Option<Ratio> {
        match self {
            Self::Num(r) => Some(*r),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_exactly_without_division() {
        let third = Ratio::new(1, 3).unwrap();
        assert!(third < Ratio::new(334, 1000).unwrap());
        assert!(third > Ratio::new(333, 1000).unwrap());
        assert_eq!(Ratio::new(2, 6).unwrap().cmp(&third), Ordering::Equal);
        assert_eq!(Ratio::new(-7, 2).unwrap().floor(), -4);
        assert_eq!(Ratio::new(1, -2).unwrap(), Ratio { n: -1, d: 2 });
        assert!(Ratio::new(1, 0).is_none());
    }
}
