//! A customer's stored state: RFM counters, window buckets, tier, timer, pin and dedup memory
//! (the data only: how events and time change it is `engine::transition`).

use serde::{Deserialize, Serialize};

/// How duplicate `event_id`s are recognised, and how late an event may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupPolicy {
    /// An event is deduplicated if its id was seen within this much event time before the
    /// customer's latest event; older events are rejected as `too_late` (they could no longer
    /// be told apart from duplicates). Milliseconds.
    pub horizon_ms: i64,
    /// At most this many remembered ids per customer; when more arrive within the horizon,
    /// the oldest are forgotten and events at or before their time become `too_late`.
    pub max_ids: usize,
}

/// One bucket of window history. Stored compactly as `[index, purchases, net]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(i32, u64, i128)", into = "(i32, u64, i128)")]
pub struct Bucket {
    /// The day or month index (`calendar::index`).
    pub index: i32,
    /// Purchases in the bucket.
    pub purchases: u64,
    /// Net spend in the bucket (purchases − refunds), minor units.
    pub net_minor: i128,
}

impl From<(i32, u64, i128)> for Bucket {
    fn from((index, purchases, net_minor): (i32, u64, i128)) -> Self {
        Self {
            index,
            purchases,
            net_minor,
        }
    }
}

impl From<Bucket> for (i32, u64, i128) {
    fn from(b: Bucket) -> Self {
        (b.index, b.purchases, b.net_minor)
    }
}

/// One bucket of a window series: purchases, net spend and net points of the events a
/// series counts. Stored compactly as `[index, purchases, net, points]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(i32, u64, i128, i128)", into = "(i32, u64, i128, i128)")]
pub struct SeriesBucket {
    /// The day or month index (`calendar::index`).
    pub index: i32,
    /// Purchases in the bucket.
    pub purchases: u64,
    /// Net spend in the bucket (purchases − refunds), minor units.
    pub net_minor: i128,
    /// Net points in the bucket (purchases' points − refunds' points).
    pub points: i128,
}

impl From<(i32, u64, i128, i128)> for SeriesBucket {
    fn from((index, purchases, net_minor, points): (i32, u64, i128, i128)) -> Self {
        Self {
            index,
            purchases,
            net_minor,
            points,
        }
    }
}

impl From<SeriesBucket> for (i32, u64, i128, i128) {
    fn from(b: SeriesBucket) -> Self {
        (b.index, b.purchases, b.net_minor, b.points)
    }
}

/// The bucketed history of the events one window series counts (a window with an attribute
/// filter, or one read for points): the rules' series key (its unit and filter hashed), then
/// the buckets, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Series {
    /// Which series of the rules (`Rules::series`): unit and filter, hashed.
    pub key: u64,
    /// Buckets with at least one event, oldest first.
    pub buckets: Vec<SeriesBucket>,
}

/// How a manual pin holds a customer. The binary state form stores the variant's position:
/// append new variants, never reorder (pinned by `model::stored`'s tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinMode {
    /// The customer is at least in the pinned tier (rules may place them higher).
    Floor,
    /// The customer is exactly in the pinned tier.
    Fixed,
}

/// A manual pin set by an `override` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The pinned tier's name.
    pub tier: String,
    /// Floor or fixed.
    pub mode: PinMode,
    /// When the pin lapses (Unix ms); `None`: until cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// The `event_id` of the override that set it.
    pub by: String,
}

/// What an `override` event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinRequest {
    /// Pin to a tier.
    Set(Pin),
    /// Remove the pin.
    Clear,
}

/// One of a customer's latest tier changes, kept in their state for the API
/// (`GET /v1/customers/{id}/history`; at most `api.history_changes` of them, oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierStep {
    /// The change's sequence (its id is derived from it and the customer's origin).
    pub seq: u64,
    /// When it happened, engine time (Unix ms).
    pub at: i64,
    /// Tier before (none: the first placement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Tier after.
    pub tier: String,
    /// Which way.
    pub direction: super::change::Direction,
    /// Why.
    pub reason: super::change::ChangeReason,
}

/// Persistent state of one customer, stored in Redis in a binary form ([`super::stored`]; the
/// serde attributes here are its JSON form, which older binaries stored and which is still
/// read).
///
/// Memory: about 60–90 bytes plus ~11 bytes per remembered event id (at most
/// `dedup.max_ids_per_customer`) plus ~6–12 bytes per window bucket kept, see `docs/rules.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerState {
    /// Earliest purchase, event time (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<i64>,
    /// Latest purchase, event time (Unix ms); never moves backwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<i64>,
    /// Lifetime purchase count (F). Refunds do not change it.
    #[serde(default)]
    pub count: u64,
    /// Lifetime purchase sum, minor units.
    #[serde(default)]
    pub sum: i128,
    /// Lifetime refund count.
    #[serde(default)]
    pub refunds: u64,
    /// Lifetime refunded sum, minor units.
    #[serde(default)]
    pub refunded: i128,
    /// Day buckets (only when the rules declare a day window), oldest first.
    #[serde(rename = "wd", default, skip_serializing_if = "Vec::is_empty")]
    pub day_buckets: Vec<Bucket>,
    /// Month buckets (only when the rules declare a month or calendar window), oldest first.
    #[serde(rename = "wm", default, skip_serializing_if = "Vec::is_empty")]
    pub month_buckets: Vec<Bucket>,
    /// Current tier name (None before the first event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Since when the customer is in `tier` (engine time, Unix ms).
    #[serde(default)]
    pub since: i64,
    /// When the tier is next reviewed (its validity ends), engine time; None: continuous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<i64>,
    /// Since when a downgrade is pending in its grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<i64>,
    /// The customer's next time-driven evaluation (mirrored in the partition's timer index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<(i64, TimeCause)>,
    /// The downgrade moment an at-risk notice was sent for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified: Option<i64>,
    /// A manual pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<Pin>,
    /// Hash of the rules version that last evaluated the customer.
    #[serde(rename = "rv", default)]
    pub rules_hash: u32,
    /// The customer's value in each rank of the rules at the latest evaluation (mirrored in
    /// the partition's rank sorted sets).
    #[serde(rename = "rk", default, skip_serializing_if = "Vec::is_empty")]
    pub ranked_values: Vec<Option<i128>>,
    /// Version of the rank cut-offs of the latest evaluation (0: none).
    #[serde(rename = "cv", default, skip_serializing_if = "is_zero")]
    pub cutoffs_version: u64,
    /// Engine time of the customer's latest evaluation: a customer's time never runs
    /// backwards, whatever order events and timers come in.
    #[serde(default = "floor_min", skip_serializing_if = "is_floor_min")]
    pub at: i64,
    /// Number of tier changes so far; the last change's sequence.
    #[serde(default)]
    pub seq: u64,
    /// The customer's event-time clock: the latest `occurred_at` of any applied event.
    #[serde(default = "floor_min")]
    pub clock: i64,
    /// Remembered event ids: (xxh3-64 of `event_id`, occurred_at ms), oldest first. Stored
    /// packed ([`super::packed_ids`]).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "super::packed_ids"
    )]
    pub ids: Vec<(u64, i64)>,
    /// Events with `occurred_at` at or before this (Unix ms) are `too_late`.
    #[serde(default = "floor_min", skip_serializing_if = "is_floor_min")]
    pub floor: i64,
    /// Which incarnation of the customer this is: a hash of the input event that created the
    /// state (see [`origin_of`]). Change ids include it, so a customer erased and created again
    /// (their sequence restarting at 1) never reuses an id; a replay recreates the same
    /// origin, hence the same ids. None for states created before it existed (their ids keep
    /// the original form).
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<u64>,
    /// `occurred_at` of the event that created this incarnation (Unix ms): an `erase` dated
    /// before it is about an earlier incarnation (a re-sent or late erase) and does nothing.
    #[serde(rename = "b", default, skip_serializing_if = "Option::is_none")]
    pub born: Option<i64>,
    /// The latest tier changes, oldest first (at most `api.history_changes`; none when 0).
    #[serde(rename = "h", default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<TierStep>,
    /// Lifetime points of purchases (their optional `points` field).
    #[serde(rename = "pe", default, skip_serializing_if = "is_zero_i128")]
    pub points_earned: i128,
    /// Lifetime points of refunds (points taken back).
    #[serde(rename = "pr", default, skip_serializing_if = "is_zero_i128")]
    pub points_refunded: i128,
    /// Window series (only when the rules filter a window by event attributes or read a
    /// window's points), in the rules' series order.
    #[serde(rename = "ws", default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<Series>,
}

impl Default for CustomerState {
    fn default() -> Self {
        Self {
            first: None,
            last: None,
            count: 0,
            sum: 0,
            refunds: 0,
            refunded: 0,
            day_buckets: Vec::new(),
            month_buckets: Vec::new(),
            tier: None,
            since: 0,
            review: None,
            pending: None,
            timer: None,
            notified: None,
            pin: None,
            rules_hash: 0,
            at: i64::MIN,
            ranked_values: Vec::new(),
            cutoffs_version: 0,
            seq: 0,
            clock: i64::MIN,
            ids: Vec::new(),
            floor: i64::MIN,
            origin: None,
            born: None,
            history: Vec::new(),
            points_earned: 0,
            points_refunded: 0,
            series: Vec::new(),
        }
    }
}

impl CustomerState {
    /// Whether this is the state of a customer never seen (or erased): what loading an absent
    /// customer gives, and what a commit stores by deleting the key.
    pub fn is_new(&self) -> bool {
        // Most states asked are not new, and differ in their clock, count or sequence: decided
        // there without building and comparing a whole default state (profiled: ~3 % of
        // tierd's CPU when every call compared everything).
        self.clock == i64::MIN && self.count == 0 && self.seq == 0 && *self == Self::default()
    }
}

/// The origin of a state created by the input event `event_id` at `offset` of its partition
/// (a customer's partition is fixed by their key, so the pair identifies the event).
pub fn origin_of(event_id: &str, offset: i64) -> u64 {
    let mut bytes = Vec::with_capacity(event_id.len() + 9);
    bytes.extend_from_slice(event_id.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&offset.to_be_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

fn floor_min() -> i64 {
    i64::MIN
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_i128(v: &i128) -> bool {
    *v == 0
}

fn is_floor_min(v: &i64) -> bool {
    *v == i64::MIN
}

/// The short hash of a rules version stored per customer.
pub fn rules_hash(version: &str) -> u32 {
    // Never 0, so a state written before versions were tracked is always re-evaluated.
    (xxhash_rust::xxh3::xxh3_64(version.as_bytes()) as u32).max(1)
}

/// The metrics rules can read, derived from a state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Lifetime purchases.
    pub frequency: u64,
    /// Lifetime net spend (purchases − refunds), minor units.
    pub monetary_minor: i128,
    /// Latest purchase time (Unix ms).
    pub last_purchase_ms: Option<i64>,
}

impl CustomerState {
    /// The metrics of this state.
    pub fn metrics(&self) -> Metrics {
        Metrics {
            frequency: self.count,
            monetary_minor: self.sum - self.refunded,
            last_purchase_ms: self.last,
        }
    }
}

/// What can move a customer with no event of their own, and so the reason of such a change.
/// The binary state form stores the variant's position: append new variants, never reorder
/// (pinned by `model::stored`'s tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeCause {
    /// A recency bound was crossed (days since the last purchase).
    Recency,
    /// A window bucket expired (or a calendar period ended).
    WindowExpiry,
    /// The tier's validity ended / its review date came.
    ValidityExpired,
    /// A downgrade's grace period ended.
    GraceEnded,
    /// The tier's minimum stay ended.
    MinStayEnded,
    /// A manual pin expired.
    ManualExpired,
    /// An at-risk notice is due (no tier change by itself).
    AtRisk,
}

impl TimeCause {
    /// Every cause (each has a `tierd_timers_fired_total` series from the start).
    pub const ALL: [Self; 7] = [
        Self::Recency,
        Self::WindowExpiry,
        Self::ValidityExpired,
        Self::GraceEnded,
        Self::MinStayEnded,
        Self::ManualExpired,
        Self::AtRisk,
    ];

    /// The name used in metrics and events (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Recency => "recency",
            Self::WindowExpiry => "window_expiry",
            Self::ValidityExpired => "validity_expired",
            Self::GraceEnded => "grace_ended",
            Self::MinStayEnded => "min_stay_ended",
            Self::ManualExpired => "manual_expired",
            Self::AtRisk => "at_risk",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON form (what older binaries stored, still read: `model::stored`) is data
    /// deployments hold: its keys and shapes are pinned here literally (Rust names may
    /// change, the stored format may not without a migration). The binary form is pinned in
    /// `model::stored`.
    #[test]
    fn the_stored_format_is_pinned() {
        let state = CustomerState {
            first: Some(1),
            last: Some(2),
            count: 3,
            sum: 400,
            refunds: 1,
            refunded: 50,
            day_buckets: vec![Bucket::from((20_000, 2, 350))],
            month_buckets: vec![Bucket::from((660, 3, 400))],
            tier: Some("vip".into()),
            since: 5,
            review: Some(6),
            pending: Some(7),
            timer: Some((8, TimeCause::GraceEnded)),
            notified: Some(9),
            pin: Some(Pin {
                tier: "key".into(),
                mode: PinMode::Floor,
                until: Some(10),
                by: "ov-1".into(),
            }),
            rules_hash: 11,
            ranked_values: vec![Some(350), None],
            cutoffs_version: 12,
            at: 13,
            seq: 14,
            clock: 15,
            ids: vec![(16, 17)],
            floor: 18,
            origin: Some(19),
            born: Some(20),
            history: Vec::new(),
            points_earned: 0,
            points_refunded: 0,
            series: Vec::new(),
        };
        let json = r#"{"first":1,"last":2,"count":3,"sum":400,"refunds":1,"refunded":50,"wd":[[20000,2,350]],"wm":[[660,3,400]],"tier":"vip","since":5,"review":6,"pending":7,"timer":[8,"grace_ended"],"notified":9,"pin":{"tier":"key","mode":"floor","until":10,"by":"ov-1"},"rv":11,"rk":[350,null],"cv":12,"at":13,"seq":14,"clock":15,"ids":"EAAAAAAAAAAi","floor":18,"o":19,"b":20}"#;
        assert_eq!(serde_json::to_string(&state).unwrap(), json);
        assert_eq!(serde_json::from_str::<CustomerState>(json).unwrap(), state);
        // States stored before the ids were packed still read the same.
        let before = json.replace(r#""ids":"EAAAAAAAAAAi""#, r#""ids":[[16,17]]"#);
        assert_eq!(
            serde_json::from_str::<CustomerState>(&before).unwrap(),
            state
        );
        let new = r#"{"count":0,"sum":0,"refunds":0,"refunded":0,"since":0,"rv":0,"seq":0,"clock":-9223372036854775808}"#;
        assert_eq!(
            serde_json::to_string(&CustomerState::default()).unwrap(),
            new
        );
    }
}
