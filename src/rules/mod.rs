//! Tier rules: pure placement of a customer on a tier from their metrics. No I/O, no clock.
//!
//! A [`Rules`] value is loaded once from a versioned TOML rules file and shared by the live
//! pipeline, tests and tools, so the rules exist exactly once. A scheme is one implementation
//! of [`Scheme`]; the file's `[scheme] kind` picks it. Tiers are ordered best first: index 0
//! is the top tier, and a move to a lower index is an upgrade.

mod thresholds;

pub use thresholds::Thresholds;

use crate::domain::Metrics;
use serde::Deserialize;
use std::path::Path;

/// A tier as the rules file declares it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierDef {
    /// Stable identifier on change events and in the API (e.g. `"A"`, `"vip"`).
    pub name: String,
    /// Human-readable name; defaults to `name`.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Inclusive lower bound on the scheme's metric to be placed in this tier (for
    /// `thresholds`): a decimal string in currency units for `monetary`, an integer for
    /// `frequency`. Omitted on the last tier, which takes everyone else.
    #[serde(default)]
    pub min: Option<String>,
}

/// Where the rules placed a customer, and which rule did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement<'r> {
    /// Index into [`Rules::tiers`] (0 = best).
    pub tier: usize,
    /// The rule that decided, e.g. `"tiers[0]: monetary >= 1000000.00"`.
    pub rule: &'r str,
}

/// A tiering scheme: maps metrics to a tier index.
pub trait Scheme: Send + Sync + std::fmt::Debug {
    /// Places a customer. Must be deterministic: same metrics, same placement.
    fn place(&self, metrics: &Metrics) -> Placement<'_>;
}

/// Error in a rules file, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file could not be read.
    #[error("rules file {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the rules schema.
    #[error("rules file {file}: {message}")]
    Parse { file: String, message: String },
    /// A field has an invalid value.
    #[error("rules file {file}: field `{field}`: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    version: String,
    #[serde(default)]
    description: Option<String>,
    scheme: SchemeFile,
    tiers: Vec<TierDef>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum SchemeFile {
    /// Ordered absolute thresholds on one lifetime metric.
    Thresholds { metric: thresholds::Metric },
}

/// A loaded, validated rules file.
#[derive(Debug)]
pub struct Rules {
    version: String,
    description: Option<String>,
    tiers: Vec<TierDef>,
    scheme: Box<dyn Scheme>,
}

impl Rules {
    /// Loads and validates a rules file. `fraction_digits` is the currency's minor-unit
    /// exponent, used to read monetary thresholds exactly.
    ///
    /// # Errors
    /// [`RulesError`] naming the file and the offending field.
    pub fn load(path: &Path, fraction_digits: u32) -> Result<Self, RulesError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file, fraction_digits)
    }

    /// Parses rules from text; `file` names the source in errors.
    ///
    /// # Errors
    /// [`RulesError`] naming the file and the offending field.
    pub fn parse(text: &str, file: &str, fraction_digits: u32) -> Result<Self, RulesError> {
        let raw: RulesFile = toml::from_str(text).map_err(|e| RulesError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |field: &str, message: String| RulesError::Invalid {
            file: file.to_owned(),
            field: field.to_owned(),
            message,
        };
        if raw.version.trim().is_empty() {
            return Err(invalid("version", "must not be empty".into()));
        }
        if raw.tiers.is_empty() {
            return Err(invalid("tiers", "at least one tier is required".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in raw.tiers.iter().enumerate() {
            if t.name.is_empty() || t.name.len() > 64 {
                return Err(invalid(
                    &format!("tiers[{i}].name"),
                    "must be 1-64 characters".into(),
                ));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(invalid(
                    &format!("tiers[{i}].name"),
                    format!("duplicate tier {:?}", t.name),
                ));
            }
        }
        let scheme: Box<dyn Scheme> = match raw.scheme {
            SchemeFile::Thresholds { metric } => Box::new(
                Thresholds::new(metric, &raw.tiers, fraction_digits)
                    .map_err(|(f, m)| invalid(&f, m))?,
            ),
        };
        Ok(Self {
            version: raw.version,
            description: raw.description,
            tiers: raw.tiers,
            scheme,
        })
    }

    /// The rules version, carried on every change event.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Free-text description from the file.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The tiers, best first.
    pub fn tiers(&self) -> &[TierDef] {
        &self.tiers
    }

    /// Index of a tier by name.
    pub fn tier_index(&self, name: &str) -> Option<usize> {
        self.tiers.iter().position(|t| t.name == name)
    }

    /// Places a customer.
    pub fn place(&self, metrics: &Metrics) -> Placement<'_> {
        self.scheme.place(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B2B: &str = r#"
version = "b2b-1"
[scheme]
kind = "thresholds"
metric = "monetary"
[[tiers]]
name = "A"
min = "1000000"
[[tiers]]
name = "B"
min = "500000"
[[tiers]]
name = "C"
min = "200000"
[[tiers]]
name = "D"
"#;

    fn metrics(monetary_minor: i128) -> Metrics {
        Metrics {
            monetary_minor,
            ..Metrics::default()
        }
    }

    #[test]
    fn b2b_table_places_on_inclusive_lower_bounds() {
        let rules = Rules::parse(B2B, "b2b.toml", 2).unwrap();
        let name = |m: i128| rules.tiers()[rules.place(&metrics(m)).tier].name.clone();
        assert_eq!(name(100_000_000), "A");
        assert_eq!(name(99_999_999), "B");
        assert_eq!(name(50_000_000), "B");
        assert_eq!(name(49_999_999), "C");
        assert_eq!(name(20_000_000), "C");
        assert_eq!(name(19_999_999), "D");
        assert_eq!(name(0), "D");
        assert_eq!(name(-500), "D");
        assert_eq!(
            rules.place(&metrics(100_000_000)).rule,
            "tiers[0]: monetary >= 1000000.00"
        );
        assert_eq!(rules.place(&metrics(5)).rule, "tiers[3]: otherwise");
    }

    #[test]
    fn frequency_thresholds() {
        let text = B2B
            .replace("\"monetary\"", "\"frequency\"")
            .replace("1000000", "10")
            .replace("500000", "5")
            .replace("200000", "2");
        let rules = Rules::parse(&text, "f.toml", 2).unwrap();
        let m = Metrics {
            frequency: 5,
            ..Metrics::default()
        };
        assert_eq!(rules.place(&m).tier, 1);
    }

    #[test]
    fn errors_name_the_field() {
        let err = |text: &str| Rules::parse(text, "r.toml", 2).unwrap_err().to_string();
        assert!(
            err(&B2B.replace("500000", "2000000")).contains("`tiers[1].min`"),
            "{}",
            err(&B2B.replace("500000", "2000000"))
        );
        assert!(err(&B2B.replace("\"200000\"", "\"2x\"")).contains("`tiers[2].min`"));
        assert!(err(&B2B.replace("name = \"C\"", "name = \"A\"")).contains("`tiers[2].name`"));
        assert!(err(&B2B.replace("\"b2b-1\"", "\"\"")).contains("`version`"));
        assert!(err(&B2B.replace("metric = \"monetary\"", "metric = \"mood\"")).contains("mood"));
        assert!(err(&format!("{B2B}\nmin = \"1\"")).contains("`tiers[3].min`"));
        assert!(
            err(&B2B.replace("name = \"D\"", "name = \"D\"\nmin = \"0\""))
                .contains("`tiers[3].min`")
        );
        assert!(err(&B2B.replace("version", "versoin")).contains("versoin"));
    }
}
