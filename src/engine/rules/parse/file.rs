//! The rules file as written (TOML), before validation. Field docs are the file reference.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

/// A rules file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// Version label, carried on every change event and in the API. Change it whenever the
    /// rules change: customers are re-evaluated under the new version.
    pub version: Spanned<String>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// The program's time zone (IANA name, e.g. `"Asia/Shanghai"`): calendar windows, day and
    /// month buckets, calendar reviews and anniversaries follow its local dates. Default UTC.
    #[serde(default)]
    pub time_zone: Option<Spanned<String>>,
    /// Scores making up the RFM cell and product, in digit order (e.g. `["R", "F", "M"]`).
    #[serde(default)]
    pub cell: Option<Spanned<Vec<String>>>,
    /// Named windows (`window.<name>.…` metrics).
    #[serde(default)]
    pub windows: BTreeMap<String, Spanned<WindowFile>>,
    /// Named fixed-bin or rank-based scores (`score.<name>`).
    #[serde(default)]
    pub scores: BTreeMap<String, Spanned<ScoreFile>>,
    /// Named ranks (`rank.<name>`): percentile bands over a metric across all customers.
    #[serde(default)]
    pub ranks: BTreeMap<String, Spanned<RankFile>>,
    /// Default downgrade policy of every tier.
    #[serde(default)]
    pub policy: Option<Spanned<PolicyFile>>,
    /// Tiers, best first; the first whose conditions all hold places the customer.
    pub tiers: Vec<Spanned<TierFile>>,
}

/// `[windows.<name>]`: either `length` (rolling) or `calendar`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowFile {
    /// Rolling length: `"<N> days"` or `"<N> months"` (the current bucket counts as one).
    #[serde(default)]
    pub length: Option<String>,
    /// Bucket granularity `"day"` or `"month"`; default: the length's unit.
    #[serde(default)]
    pub bucket: Option<String>,
    /// Calendar period to date: `"month"`, `"quarter"` or `"year"`.
    #[serde(default)]
    pub calendar: Option<String>,
    /// Count only events whose attributes have, for every key listed, one of its values
    /// (e.g. `{ channel = ["store", "app"] }`).
    #[serde(default)]
    pub only: Option<BTreeMap<String, Vec<String>>>,
    /// Leave out events whose attribute, for any key listed, has one of its values (e.g.
    /// `{ category = ["gift_card"] }`).
    #[serde(default)]
    pub exclude: Option<BTreeMap<String, Vec<String>>>,
}

/// `[ranks.<name>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankFile {
    /// The metric ranked, highest first (money ranked at whole minor units). For recency
    /// use `last_purchase` (the latest purchase time: most recent first).
    pub metric: String,
    /// Customers tied at a cut-off: `"higher"` (default) all go to the higher band (a band
    /// may hold slightly more than its share), `"lower"` all go to the lower band (a band
    /// may hold slightly less).
    #[serde(default)]
    pub ties: Option<crate::engine::rules::rank::Ties>,
}

/// `[scores.<name>]`: fixed bins over a `metric`, or rank bands of a `rank` (quintiles).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreFile {
    /// The metric scored (any metric but scores, `cell` and `product`).
    #[serde(default)]
    pub metric: Option<String>,
    /// The rank scored: bins give `top = "p%"` bands instead of bounds.
    #[serde(default)]
    pub rank: Option<String>,
    /// Bins tried in order; the first that holds gives its score; the last has no bound.
    pub bins: Vec<Spanned<BinFile>>,
}

/// One bin: a score and at most one bound.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinFile {
    /// The score (1-9).
    pub score: u8,
    /// `value >= min`.
    #[serde(default)]
    pub min: Option<toml::Value>,
    /// `value > above`.
    #[serde(default)]
    pub above: Option<toml::Value>,
    /// `value <= max`.
    #[serde(default)]
    pub max: Option<toml::Value>,
    /// `value < below`.
    #[serde(default)]
    pub below: Option<toml::Value>,
    /// Rank scores: the customer is in the top `top` (e.g. `"20%"`) of the rank.
    #[serde(default)]
    pub top: Option<String>,
}

/// Policy fields, in `[policy]` (defaults) or on a tier (overrides).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// `"replace"` (default), `"step"` or `"base"`.
    #[serde(default)]
    pub downgrade: Option<crate::engine::rules::policy::Downgrade>,
    /// Days a downgrade waits; cancelled if the customer requalifies. Default 0.
    #[serde(default)]
    pub grace_days: Option<u32>,
    /// Days a customer stays in a tier at least. Default 0.
    #[serde(default)]
    pub min_stay_days: Option<u32>,
    /// `continuous` (default), `days:N`, `month`, `quarter`, `year`, `anniversary`,
    /// `date:MM-DD`.
    #[serde(default)]
    pub review: Option<String>,
    /// Whether an upgrade starts a new validity period. Default true.
    #[serde(default)]
    pub upgrade_restarts_review: Option<bool>,
    /// `[policy]` only: days before a time-driven downgrade that an `at_risk` notice is sent
    /// (0: none).
    #[serde(default)]
    pub at_risk_days: Option<u32>,
}

/// `[[tiers]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierFile {
    /// Stable identifier on change events and in the API (1-64 characters).
    pub name: String,
    /// Human-readable name; default `name`.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Entry conditions, all must hold. Omitted on the last tier only (it takes the rest).
    #[serde(default)]
    pub when: Option<Vec<Spanned<ClauseFile>>>,
    /// Hysteresis: conditions to keep the tier once in it (a lower bar than `when`).
    #[serde(default)]
    pub stay: Option<Vec<Spanned<ClauseFile>>>,
    // The policy overrides repeat `PolicyFile`'s fields because serde's `flatten` cannot be
    // combined with `deny_unknown_fields` (a typo must stay an error).
    /// Overrides `[policy].downgrade` for this tier.
    #[serde(default)]
    pub downgrade: Option<crate::engine::rules::policy::Downgrade>,
    /// Overrides `[policy].grace_days` for this tier.
    #[serde(default)]
    pub grace_days: Option<u32>,
    /// Overrides `[policy].min_stay_days` for this tier.
    #[serde(default)]
    pub min_stay_days: Option<u32>,
    /// Overrides `[policy].review` for this tier.
    #[serde(default)]
    pub review: Option<String>,
    /// Overrides `[policy].upgrade_restarts_review` for this tier.
    #[serde(default)]
    pub upgrade_restarts_review: Option<bool>,
}

/// One entry of a `when` or `stay` list: a condition string, or a group table
/// `{ any = [...] }` (at least one member holds) / `{ all = [...] }` (every member holds),
/// whose members are again strings or groups.
#[derive(Debug)]
pub enum ClauseFile {
    /// `"<metric> <op> <value>"`.
    Text(String),
    /// `{ any = [...] }`.
    Any(Vec<Spanned<ClauseFile>>),
    /// `{ all = [...] }`.
    All(Vec<Spanned<ClauseFile>>),
}

impl<'de> Deserialize<'de> for ClauseFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ClauseVisitor)
    }
}

struct ClauseVisitor;

impl<'de> serde::de::Visitor<'de> for ClauseVisitor {
    type Value = ClauseFile;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a condition string or a group { any = [...] } / { all = [...] }")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ClauseFile, E> {
        Ok(ClauseFile::Text(v.to_owned()))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ClauseFile, A::Error> {
        use serde::de::Error;
        let Some(key) = map.next_key::<String>()? else {
            return Err(A::Error::custom(
                "an empty table is not a condition: write { any = [...] } or { all = [...] }",
            ));
        };
        let members: Vec<Spanned<ClauseFile>> = match key.as_str() {
            "any" | "all" => map.next_value()?,
            other => {
                return Err(A::Error::custom(format!(
                    "unknown key `{other}` in a condition group: expected `any` or `all`"
                )))
            }
        };
        if let Some(more) = map.next_key::<String>()? {
            return Err(A::Error::custom(format!(
                "a condition group has one key, `any` or `all` (found `{key}` and `{more}`): nest a group to combine them"
            )));
        }
        Ok(if key == "any" {
            ClauseFile::Any(members)
        } else {
            ClauseFile::All(members)
        })
    }
}
