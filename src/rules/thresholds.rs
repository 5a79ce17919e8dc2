//! Ordered absolute thresholds on one lifetime metric (the B2B annual-sales table, DESIGN §2).

use super::{Placement, Scheme, TierDef};
use crate::domain::{money, Metrics};
use serde::Deserialize;

/// The metric a threshold scheme compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Lifetime net spend: purchases minus refunds, in currency units.
    Monetary,
    /// Lifetime number of purchases (refunds do not change it).
    Frequency,
}

/// Tiers by inclusive lower bounds, best first; the last tier has no bound and takes the rest.
#[derive(Debug)]
pub struct Thresholds {
    metric: Metric,
    /// Inclusive lower bounds of tiers `0..n-1`, strictly decreasing (minor units or counts).
    mins: Vec<i128>,
    /// Pre-rendered rule descriptions, one per tier.
    rules: Vec<String>,
}

impl Thresholds {
    /// Builds the scheme from the tiers of a rules file.
    ///
    /// # Errors
    /// `(field, message)` for the first invalid tier bound.
    pub fn new(
        metric: Metric,
        tiers: &[TierDef],
        fraction_digits: u32,
    ) -> Result<Self, (String, String)> {
        let last = tiers.len() - 1;
        let mut mins = Vec::with_capacity(last);
        let mut rules = Vec::with_capacity(tiers.len());
        for (i, tier) in tiers.iter().enumerate() {
            let field = format!("tiers[{i}].min");
            match (&tier.min, i == last) {
                (None, true) => rules.push(format!("tiers[{i}]: otherwise")),
                (Some(_), true) => {
                    return Err((
                        field,
                        "the last tier takes everyone below the others: remove `min`".into(),
                    ))
                }
                (None, false) => return Err((field, "required on every tier but the last".into())),
                (Some(text), false) => {
                    let min: i128 = match metric {
                        Metric::Monetary => money::parse_threshold(text, fraction_digits)
                            .map_err(|e| (field.clone(), e.to_string()))?
                            .into(),
                        Metric::Frequency => text
                            .parse::<u64>()
                            .map_err(|_| {
                                (
                                    field.clone(),
                                    format!("{text:?} is not a whole number of purchases"),
                                )
                            })?
                            .into(),
                    };
                    if let Some(&prev) = mins.last() {
                        if min >= prev {
                            return Err((
                                field,
                                format!("{text} must be lower than tiers[{}].min", i - 1),
                            ));
                        }
                    }
                    let shown = match metric {
                        Metric::Monetary => {
                            format!("monetary >= {}", money::format_minor(min, fraction_digits))
                        }
                        Metric::Frequency => format!("frequency >= {min}"),
                    };
                    rules.push(format!("tiers[{i}]: {shown}"));
                    mins.push(min);
                }
            }
        }
        Ok(Self {
            metric,
            mins,
            rules,
        })
    }
}

impl Scheme for Thresholds {
    fn place(&self, metrics: &Metrics) -> Placement<'_> {
        let value = match self.metric {
            Metric::Monetary => metrics.monetary_minor,
            Metric::Frequency => i128::from(metrics.frequency),
        };
        let tier = self
            .mins
            .iter()
            .position(|&min| value >= min)
            .unwrap_or(self.mins.len());
        Placement {
            tier,
            rule: &self.rules[tier],
        }
    }
}
