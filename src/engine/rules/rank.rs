//! Rank-based (relative) tiers: percentile bands over a metric across the whole population.
//!
//! A rank orders customers by one metric, highest first. A band "top p%" holds every customer
//! whose value is at least the **cut-off** of p: the value of the customer at position
//! `k = ceil(p · N)` in that order (N = customers with a value). Ties at a cut-off go to the
//! higher band, so a band may hold slightly more than its share — exactly what a full sort
//! gives when equal values are never split.
//!
//! The live service computes cut-offs without sorting anyone: a binary search over values with
//! `ZCOUNT` summed over the partitions' sorted sets, inside one Lua script
//! (`store/lua/cutoff.lua`, property-tested against [`cutoffs_from_values`] through a real
//! Redis in `tests/cutoff_script.rs`).

use super::value::Ratio;
use serde::{Deserialize, Serialize};

/// Where customers tied at a cut-off go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ties {
    /// All to the higher band: a band holds at least its share.
    #[default]
    Higher,
    /// All to the lower band: a band holds at most its share.
    Lower,
}

/// A declared rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rank {
    /// Name (`rank.<name>`).
    pub name: String,
    /// The metric ranked (higher first); its value is ranked at whole minor units or counts.
    pub metric: super::operand::Operand,
    /// The tie rule.
    pub ties: Ties,
}

/// The cut-off of a band from the k-th largest value `kth` and the number of customers with
/// a value at least `kth`: with [`Ties::Lower`] a tie group that does not fit in the band is
/// left out (values are whole numbers, so "above `kth`" is "at least `kth + 1`").
pub fn cutoff(kth: i128, at_or_above_kth: u64, k: u64, ties: Ties) -> i128 {
    match ties {
        Ties::Higher => kth,
        Ties::Lower if at_or_above_kth > k => kth + 1,
        Ties::Lower => kth,
    }
}

/// One cut point: "the top `pct` of rank `rank`".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutPoint {
    /// Index of the rank.
    pub rank: usize,
    /// Share of the population from the top, 0 < pct ≤ 1.
    pub pct: Ratio,
}

impl CutPoint {
    /// How many customers from the top the band must hold: `ceil(pct · n)`, at least 1.
    pub fn k(&self, n: u64) -> u64 {
        let n = i128::from(n);
        let k = (self.pct.n * n + self.pct.d - 1).div_euclid(self.pct.d);
        u64::try_from(k.clamp(1, n.max(1))).unwrap_or(u64::MAX)
    }

    /// As written: `"20%"`.
    pub fn describe(&self) -> String {
        let hundredths = self.pct.n * 10_000 / self.pct.d;
        if hundredths % 100 == 0 {
            format!("{}%", hundredths / 100)
        } else {
            let text = format!("{}.{:02}", hundredths / 100, hundredths % 100);
            format!("{}%", text.trim_end_matches('0'))
        }
    }
}

/// Parses `"20%"`, `"0.5%"`, `"100%"` into a share of 1.
///
/// # Errors
/// A message when the text is not a percentage in (0, 100].
pub fn parse_percent(text: &str) -> Result<Ratio, String> {
    let bad = || format!("{text:?}: expected a percentage like \"20%\" (0 < p <= 100)");
    let number = text.trim().strip_suffix('%').ok_or_else(bad)?.trim();
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty()
        || frac.len() > 4
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let scale = 10i128.pow(u32::try_from(frac.len()).unwrap_or(0));
    let n = int.parse::<i128>().unwrap_or(0) * scale + frac.parse::<i128>().unwrap_or(0);
    let d = 100 * scale;
    let g = gcd(n, d).max(1);
    let pct = Ratio::new(n / g, d / g).ok_or_else(bad)?;
    if pct <= Ratio::int(0) || pct > Ratio::int(1) {
        return Err(bad());
    }
    Ok(pct)
}

fn gcd(a: i128, b: i128) -> i128 {
    if b == 0 {
        a.abs()
    } else {
        gcd(b, a % b)
    }
}

/// The cut-offs in force: one value per cut point of the rules, computed over the whole
/// population at one moment and versioned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cutoffs {
    /// Increases with every published computation (0: none yet).
    pub version: u64,
    /// Hash of the rules version the cut points belong to.
    pub rules: u32,
    /// Customers ranked, per rank.
    pub population: Vec<u64>,
    /// Cut-off value per cut point (`None`: nobody ranked yet).
    pub values: Vec<Option<i128>>,
    /// Customers at or above each cut-off when computed (the band sizes, cumulative).
    pub at_or_above: Vec<u64>,
    /// When computed (wall clock, Unix ms).
    pub computed_at: i64,
}

impl Cutoffs {
    /// The cut-off of a cut point, if known.
    pub fn value(&self, point: usize) -> Option<i128> {
        self.values.get(point).copied().flatten()
    }
}

/// A partition moving to new cut-offs before its input offset `offset`: recorded with the
/// changes it decides (in the outbox, then in the published position kept in Kafka), so a
/// replay after Redis lost writes applies the same cut-offs at the same point of the input
/// and re-publishes every change with the same body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutoffsSwitch {
    /// The first input offset evaluated with `cutoffs`.
    pub offset: i64,
    /// The cut-offs.
    pub cutoffs: Cutoffs,
    /// Engine time of the re-evaluations the move made (Unix ms).
    pub at_ms: i64,
}

/// Cut-offs computed in memory from every customer's ranked values (one list per rank, any
/// order) by a full sort — what `tierd simulate` uses for new rules, and the reference the
/// live computation must equal.
pub fn cutoffs_from_values(
    points: &[CutPoint],
    ties: &[Ties],
    rules_hash: u32,
    values: &mut [Vec<i128>],
) -> Cutoffs {
    for v in values.iter_mut() {
        v.sort_unstable_by(|a, b| b.cmp(a));
    }
    let mut out = Cutoffs {
        rules: rules_hash,
        population: values.iter().map(|v| v.len() as u64).collect(),
        ..Cutoffs::default()
    };
    for p in points {
        let sorted = &values[p.rank];
        if sorted.is_empty() {
            out.values.push(None);
            out.at_or_above.push(0);
            continue;
        }
        let n = sorted.len() as u64;
        let k = p.k(n);
        let kth = sorted[usize::try_from(k).unwrap_or(usize::MAX).min(sorted.len()) - 1];
        let count_ge = |v: i128| sorted.partition_point(|&x| x >= v) as u64;
        let value = cutoff(kth, count_ge(kth), k, ties[p.rank]);
        out.values.push(Some(value));
        out.at_or_above.push(count_ge(value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("20%").unwrap(), Ratio::new(1, 5).unwrap());
        assert_eq!(parse_percent("0.5%").unwrap(), Ratio::new(1, 200).unwrap());
        assert_eq!(parse_percent("100%").unwrap(), Ratio::int(1));
        for bad in ["0%", "101%", "20", "x%", "1.23456%", "%"] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
        let p = CutPoint {
            rank: 0,
            pct: parse_percent("1%").unwrap(),
        };
        assert_eq!((p.k(1), p.k(100), p.k(101), p.k(0)), (1, 1, 2, 1));
        assert_eq!(p.describe(), "1%");
        assert_eq!(
            CutPoint {
                rank: 0,
                pct: parse_percent("12.5%").unwrap()
            }
            .describe(),
            "12.5%"
        );
    }
}
