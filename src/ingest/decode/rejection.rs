//! What a rejected input message carries: a reason code from a fixed set (the `reason` of
//! dead-letter records and a metric label) and a detail naming the field.

/// Why an input message was rejected. The set is fixed: it is the `reason` of dead-letter
/// records and a label of `tierd_events_dead_lettered_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The value is larger than `ingest.max_message_bytes`.
    Oversize,
    /// The value is empty, not UTF-8 or not JSON.
    InvalidJson,
    /// Valid JSON but not an object.
    NotObject,
    /// A required field is absent (or null).
    MissingField,
    /// A field has the wrong JSON type.
    InvalidField,
    /// `event_id` or `customer_id` is empty or longer than 128 characters.
    InvalidId,
    /// `amount` is not an exact decimal in the currency (not a number, too many fraction digits).
    InvalidAmount,
    /// A purchase or refund with a negative amount.
    NegativeAmount,
    /// `amount` is above `money.max_amount`, or counting it would take the customer's lifetime
    /// purchases or refunds above 2^53 − 1 minor units (the most ranks order exactly).
    AmountOutOfRange,
    /// `currency` is not the configured one.
    UnknownCurrency,
    /// `occurred_at` is not RFC 3339 with an offset.
    InvalidTimestamp,
    /// `occurred_at` is before `ingest.min_occurred_at` or too far in the future.
    TimestampOutOfRange,
    /// `type` is not one of the known types.
    UnknownType,
    /// An `override` names a tier the rules do not have, or an invalid `mode`/`expires_at`.
    InvalidOverride,
    /// The Kafka key is missing or differs from `customer_id` (the customer's state would be
    /// split across partitions).
    KeyMismatch,
    /// Older than the dedup horizon behind the customer's latest event (decided at apply).
    TooLate,
    /// `points` is not a whole number of points (a JSON integer or a string of digits).
    InvalidPoints,
    /// `points` is negative or above 10^15, or counting it would take the customer's
    /// lifetime purchase points or refunded points above 2^53 − 1 (decided at apply).
    PointsOutOfRange,
    /// `attributes` is not an object of string values, or has too many, too long or empty
    /// names or values.
    InvalidAttributes,
}

impl Reason {
    /// All reasons, for metric pre-registration and docs.
    pub const ALL: [Reason; 19] = [
        Self::Oversize,
        Self::InvalidJson,
        Self::NotObject,
        Self::MissingField,
        Self::InvalidField,
        Self::InvalidId,
        Self::InvalidAmount,
        Self::NegativeAmount,
        Self::AmountOutOfRange,
        Self::UnknownCurrency,
        Self::InvalidTimestamp,
        Self::TimestampOutOfRange,
        Self::UnknownType,
        Self::InvalidOverride,
        Self::KeyMismatch,
        Self::TooLate,
        Self::InvalidPoints,
        Self::PointsOutOfRange,
        Self::InvalidAttributes,
    ];

    /// The machine-readable code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::InvalidJson => "invalid_json",
            Self::NotObject => "not_object",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::InvalidId => "invalid_id",
            Self::InvalidAmount => "invalid_amount",
            Self::NegativeAmount => "negative_amount",
            Self::AmountOutOfRange => "amount_out_of_range",
            Self::UnknownCurrency => "unknown_currency",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::TimestampOutOfRange => "timestamp_out_of_range",
            Self::UnknownType => "unknown_type",
            Self::InvalidOverride => "invalid_override",
            Self::KeyMismatch => "key_mismatch",
            Self::TooLate => "too_late",
            Self::InvalidPoints => "invalid_points",
            Self::PointsOutOfRange => "points_out_of_range",
            Self::InvalidAttributes => "invalid_attributes",
        }
    }
}

/// A rejected message: the reason code and a human-readable detail naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Machine-readable reason.
    pub reason: Reason,
    /// What exactly is wrong, e.g. ``field `amount`: 3 fraction digits, the currency allows 2``.
    pub detail: String,
}

pub(super) fn reject(reason: Reason, detail: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        detail: detail.into(),
    }
}
