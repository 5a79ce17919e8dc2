//! A decoded, validated input event (README "Contracts": input).

/// What an input event does to a customer's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A purchase: adds to frequency and monetary, moves recency.
    Purchase,
    /// A refund: subtracts its amount from monetary; frequency and recency are unchanged.
    Refund,
    /// A manual pin (or its removal) by a relationship manager; no amount.
    Override,
    /// Erase the customer (a deletion request): their state, timers, rank entries and tier
    /// count go, a tombstone is published; no amount.
    Erase,
}

/// A valid input event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The producer's idempotency key (1–128 chars).
    pub event_id: String,
    /// The customer (1–128 chars); equals the Kafka message key.
    pub customer_id: String,
    /// What the event does.
    pub kind: EventKind,
    /// Amount in minor units of the configured currency, never negative.
    pub amount_minor: i64,
    /// Event time, Unix milliseconds.
    pub occurred_at_ms: i64,
    /// For `Override`: the pin to set or clear.
    pub pin: Option<super::state::PinRequest>,
    /// Points the purchase earns (a refund: takes back); 0 when the event carries none.
    pub points: i64,
    /// The event's attributes (`attributes` object: e.g. `category`, `channel`), in the
    /// order written; windows may filter on them. At most [`MAX_ATTRIBUTES`].
    pub attributes: Vec<(String, String)>,
}

/// Most attributes one event may carry.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest attribute name, characters.
pub const MAX_ATTRIBUTE_KEY_CHARS: usize = 64;
/// Longest attribute value, characters.
pub const MAX_ATTRIBUTE_VALUE_CHARS: usize = 128;
/// The most points one event may carry: 10^15, so that totals of points stay exact.
pub const MAX_POINTS: i64 = 1_000_000_000_000_000;

/// Whether `key` may name an attribute (1–64 characters, no whitespace or control).
///
/// # Errors
/// What is wrong with it.
pub fn check_attribute_key(key: &str) -> Result<(), String> {
    let chars = key.chars().count();
    if chars == 0 || chars > MAX_ATTRIBUTE_KEY_CHARS {
        return Err(format!(
            "attribute name {key:?}: {chars} characters, must be 1..={MAX_ATTRIBUTE_KEY_CHARS}"
        ));
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "attribute name {key:?}: no whitespace or control characters"
        ));
    }
    Ok(())
}

/// Whether `value` may be an attribute's value (1–128 characters).
///
/// # Errors
/// What is wrong with it.
pub fn check_attribute_value(value: &str) -> Result<(), String> {
    let chars = value.chars().count();
    if chars == 0 || chars > MAX_ATTRIBUTE_VALUE_CHARS {
        return Err(format!(
            "attribute value {value:?}: {chars} characters, must be 1..={MAX_ATTRIBUTE_VALUE_CHARS}"
        ));
    }
    Ok(())
}
