//! The tier-change event (README "Contracts": output) and its deterministic id.

use serde::Serialize;

/// Namespace of tier-change event ids (UUID v5): fixed forever, so ids are stable.
const CHANGE_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x7d1e_4c2a_9b3f_4e61_a0c8_5f2d_3b9e_1a47);

/// Which way a customer moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// First placement of a new customer (`previous_tier` is null).
    Initial,
    /// To a better tier.
    Up,
    /// To a worse tier.
    Down,
}

impl Direction {
    /// Every direction, in the order of their stored codes (a customer's tier history stores
    /// the position: append, never reorder).
    pub const ALL: [Self; 3] = [Self::Initial, Self::Up, Self::Down];

    /// The stored code (its position in [`Self::ALL`]; a new variant fails to compile here
    /// until it has one).
    pub fn code(self) -> u8 {
        match self {
            Self::Initial => 0,
            Self::Up => 1,
            Self::Down => 2,
        }
    }

    /// The direction of a stored code.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }

    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// Why a tier changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeReason {
    /// A purchase of the customer.
    Purchase,
    /// A refund of the customer.
    Refund,
    /// Days since the last purchase crossed a bound (recency decay).
    Recency,
    /// Purchases left a rolling window (or a calendar period ended).
    WindowExpiry,
    /// The tier's validity ended and the review did not renew it.
    ValidityExpired,
    /// A downgrade's grace period ended without the customer requalifying.
    GraceEnded,
    /// The tier's minimum stay ended (a downgrade held back by it took effect).
    MinStayEnded,
    /// A manual pin (`override` event) set or cleared.
    Manual,
    /// A manual pin lapsed.
    ManualExpired,
    /// A new rules version re-placed the customer.
    RulesChanged,
    /// Rank cut-offs moved (others overtook the customer, or the customer overtook others).
    RankShift,
}

impl ChangeReason {
    /// Every reason, in the order of their stored codes (a customer's tier history stores
    /// the position: append, never reorder).
    pub const ALL: [Self; 11] = [
        Self::Purchase,
        Self::Refund,
        Self::Recency,
        Self::WindowExpiry,
        Self::ValidityExpired,
        Self::GraceEnded,
        Self::MinStayEnded,
        Self::Manual,
        Self::ManualExpired,
        Self::RulesChanged,
        Self::RankShift,
    ];

    /// The stored code (its position in [`Self::ALL`]; a new variant fails to compile here
    /// until it has one).
    pub fn code(self) -> u8 {
        match self {
            Self::Purchase => 0,
            Self::Refund => 1,
            Self::Recency => 2,
            Self::WindowExpiry => 3,
            Self::ValidityExpired => 4,
            Self::GraceEnded => 5,
            Self::MinStayEnded => 6,
            Self::Manual => 7,
            Self::ManualExpired => 8,
            Self::RulesChanged => 9,
            Self::RankShift => 10,
        }
    }

    /// The reason of a stored code.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }

    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Purchase => "purchase",
            Self::Refund => "refund",
            Self::Recency => "recency",
            Self::WindowExpiry => "window_expiry",
            Self::ValidityExpired => "validity_expired",
            Self::GraceEnded => "grace_ended",
            Self::MinStayEnded => "min_stay_ended",
            Self::Manual => "manual",
            Self::ManualExpired => "manual_expired",
            Self::RulesChanged => "rules_changed",
            Self::RankShift => "rank_shift",
        }
    }
}

/// The input event that caused a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cause {
    /// `event_id` of the triggering input event.
    pub event_id: String,
    /// Input topic.
    pub topic: String,
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
}

/// Metrics that decided a change, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricsView {
    /// Lifetime purchases.
    pub frequency: u64,
    /// Lifetime net spend (purchases − refunds), decimal string in `currency`.
    pub monetary: String,
    /// Lifetime refunds.
    pub refund_count: u64,
    /// Lifetime refunded amount, decimal string.
    pub refunded: String,
    /// ISO 4217 code of the amounts.
    pub currency: String,
    /// Earliest purchase (event time), RFC 3339; null if none.
    pub first_purchase_at: Option<String>,
    /// Latest purchase (event time), RFC 3339; null if none.
    pub last_purchase_at: Option<String>,
}

/// A tier-change event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TierChange {
    /// Deterministic id: UUID v5 of (`customer_id`, `sequence`).
    pub event_id: String,
    /// The customer.
    pub customer_id: String,
    /// Per-customer change sequence, 1 for the first placement.
    pub sequence: u64,
    /// Tier before; null on first assignment.
    pub previous_tier: Option<String>,
    /// Tier after.
    pub tier: String,
    /// Display name of `tier`.
    pub tier_display_name: String,
    /// `initial`, `up` or `down`.
    pub direction: Direction,
    /// What moved the customer.
    pub reason: ChangeReason,
    /// Engine time of the change (the customer's event-time clock), RFC 3339.
    pub occurred_at: String,
    /// Version of the rules file that decided.
    pub rules_version: String,
    /// The rule that placed the customer in `tier`.
    pub rule: String,
    /// The policy that decided (`initial`, `upgrade`, a tier's downgrade policy such as
    /// `downgrade=step review=days:60`, or a manual pin).
    pub policy: String,
    /// The lifetime metrics.
    pub metrics: MetricsView,
    /// Every metric the rules read, as they were at the decision (money as decimal strings).
    pub values: serde_json::Map<String, serde_json::Value>,
    /// Scores at the decision (`cell` and `product` included when declared).
    pub scores: serde_json::Map<String, serde_json::Value>,
    /// Per rank: the customer's ranked value and the smallest top band they are in.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub ranks: serde_json::Map<String, serde_json::Value>,
    /// Version of the rank cut-offs that placed the customer (rank-based rules only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cutoffs_version: Option<u64>,
    /// The triggering input event.
    pub cause: Option<Cause>,
}

/// The deterministic id of the `sequence`-th change of a customer's incarnation `origin`
/// (`CustomerState::origin`): the same change gets the same id across crashes and replays, so
/// consumers can drop duplicates; a customer erased and created again starts a new
/// incarnation, so its sequence restarting at 1 never reuses an id for a different change.
/// Without an origin (states created before origins existed) the id keeps its first form.
pub fn change_id(customer_id: &str, origin: Option<u64>, sequence: u64) -> String {
    let mut name = Vec::with_capacity(customer_id.len() + 18);
    name.extend_from_slice(customer_id.as_bytes());
    name.push(0);
    name.extend_from_slice(&sequence.to_be_bytes());
    if let Some(origin) = origin {
        name.extend_from_slice(&origin.to_be_bytes());
    }
    v5(&name)
}

/// The UUID v5 (RFC 9562 §5.5) of `name` in [`CHANGE_ID_NAMESPACE`], hyphenated. The same
/// value as `uuid::Uuid::new_v5` (tested), hashed with RustCrypto's `sha1`, which uses the
/// SHA extensions of an x86-64 CPU that has them (detected at run time; elsewhere its portable
/// code): `new_v5` hashes with a portable SHA-1 (`sha1_smol`), and an id is made for every
/// change and notice.
fn v5(name: &[u8]) -> String {
    use sha1::{Digest, Sha1};
    let mut hasher = Sha1::new();
    hasher.update(CHANGE_ID_NAMESPACE.as_bytes());
    hasher.update(name);
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_codes_are_the_positions_in_all_and_round_trip() {
        for (i, d) in Direction::ALL.iter().enumerate() {
            assert_eq!(usize::from(d.code()), i);
            assert_eq!(Direction::from_code(d.code()), Some(*d));
        }
        for (i, r) in ChangeReason::ALL.iter().enumerate() {
            assert_eq!(usize::from(r.code()), i);
            assert_eq!(ChangeReason::from_code(r.code()), Some(*r));
        }
        assert_eq!(Direction::from_code(3), None);
        assert_eq!(ChangeReason::from_code(11), None);
    }

    #[test]
    fn change_ids_are_deterministic_and_distinct() {
        assert_eq!(change_id("c1", None, 1), change_id("c1", None, 1));
        assert_ne!(change_id("c1", None, 1), change_id("c1", None, 2));
        assert_ne!(change_id("c1", None, 1), change_id("c2", None, 1));
        // Separator prevents ("c1", x) and ("c", ...) from colliding by concatenation.
        assert_ne!(change_id("c1", None, 0), change_id("c", None, 0x31 << 56));
        // Ids of states without an origin are what they always were.
        assert_eq!(
            change_id("c1", None, 1),
            "2e073c11-7bdc-5719-9216-026e7394448b",
            "stored ids must not change"
        );
        assert_eq!(
            change_id("c1", Some(7), 1),
            "cf1bb23d-e712-58a2-a0f1-79a16d8ebfe2",
            "stored ids must not change"
        );
        assert_eq!(
            at_risk_id("c1", Some(7), 1_764_000_000_000, 0),
            "cb4503f4-de28-57d6-8869-b6d2b59a612b",
            "stored ids must not change"
        );
        // Each incarnation has its own ids; the same incarnation always the same.
        assert_eq!(change_id("c1", Some(7), 1), change_id("c1", Some(7), 1));
        assert_ne!(change_id("c1", Some(7), 1), change_id("c1", Some(8), 1));
        assert_ne!(change_id("c1", Some(7), 1), change_id("c1", None, 1));
    }

    proptest::proptest! {
        #[test]
        fn ids_are_the_uuid_crates_v5(name in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            proptest::prop_assert_eq!(
                v5(&name),
                uuid::Uuid::new_v5(&CHANGE_ID_NAMESPACE, &name).to_string()
            );
        }
    }

    #[test]
    fn notice_ids_differ_per_incarnation() {
        assert_eq!(at_risk_id("c1", None, 5, 0), at_risk_id("c1", None, 5, 0));
        assert_ne!(
            at_risk_id("c1", Some(1), 5, 0),
            at_risk_id("c1", None, 5, 0)
        );
        assert_ne!(
            at_risk_id("c1", Some(1), 5, 0),
            at_risk_id("c1", Some(2), 5, 0)
        );
        // Under a sequence floor, a notice has an id of its own (per floor).
        assert_ne!(
            at_risk_id("c1", Some(1), 5, 9),
            at_risk_id("c1", Some(1), 5, 0)
        );
        assert_ne!(
            at_risk_id("c1", Some(1), 5, 9),
            at_risk_id("c1", Some(1), 5, 10)
        );
    }
}

/// How amounts are shown on change events and in the API.
#[derive(Debug, Clone)]
pub struct MoneyFormat {
    /// ISO 4217 code.
    pub currency: String,
    /// Fraction digits.
    pub fraction_digits: u32,
}

impl MetricsView {
    /// The published view of a customer state.
    pub fn of(state: &super::CustomerState, money: &MoneyFormat) -> Self {
        Self {
            frequency: state.count,
            monetary: super::money::format_minor(state.sum - state.refunded, money.fraction_digits),
            refund_count: state.refunds,
            refunded: super::money::format_minor(state.refunded, money.fraction_digits),
            currency: money.currency.clone(),
            first_purchase_at: state.first.map(super::time::format_ms),
            last_purchase_at: state.last.map(super::time::format_ms),
        }
    }
}

/// An at-risk notice (README "Contracts"): a time-driven downgrade is coming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AtRiskNotice {
    /// Always `"at_risk"` (tells notices from tier changes on a shared topic).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Deterministic id: UUID v5 of (`customer_id`, the downgrade moment).
    pub event_id: String,
    /// The customer.
    pub customer_id: String,
    /// Tier now.
    pub tier: String,
    /// Tier the customer will fall to.
    pub falls_to: String,
    /// When, RFC 3339 (engine time).
    pub downgrade_at: String,
    /// Why: `recency`, `window_expiry`, `validity_expired`, `grace_ended`, `min_stay_ended`
    /// or `manual_expired` (the time-driven evaluation that will downgrade).
    pub cause: super::state::TimeCause,
    /// What it takes to stay: each failing condition with the value it will have and, for
    /// lower bounds on spend or counts, what is missing.
    pub to_stay: Vec<serde_json::Value>,
    /// Engine time of the notice, RFC 3339.
    pub occurred_at: String,
    /// Rules version.
    pub rules_version: String,
}

/// The id of the at-risk notice of the downgrade due at `downgrade_at_ms` (UUID v5), for the
/// customer's incarnation `origin` (see [`change_id`]), under the partition's sequence floor
/// `floor` (0: none; see `engine::changes::number_above`): a notice decided again by a replay
/// that could not reproduce what was published gets an id of its own.
pub fn at_risk_id(
    customer_id: &str,
    origin: Option<u64>,
    downgrade_at_ms: i64,
    floor: u64,
) -> String {
    let mut name = customer_id.as_bytes().to_vec();
    name.extend_from_slice(b"\0at_risk\0");
    name.extend_from_slice(&downgrade_at_ms.to_be_bytes());
    if let Some(origin) = origin {
        name.extend_from_slice(&origin.to_be_bytes());
    }
    if floor > 0 {
        name.extend_from_slice(b"\0floor\0");
        name.extend_from_slice(&floor.to_be_bytes());
    }
    v5(&name)
}
