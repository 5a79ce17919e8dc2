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
}
