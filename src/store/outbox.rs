//! Outbox entries: what the commit script appends to a partition's stream and the publisher
//! turns into Kafka records.

/// What an outbox entry is, and so which topic it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A tier-change event → `kafka.output_topic`, keyed by customer.
    Change,
    /// A rejected input message with a key → `kafka.dead_letter_topic`.
    DeadLetter,
    /// A rejected input message that had no key.
    DeadLetterNoKey,
    /// An at-risk notice → `kafka.at_risk_topic` (default the output topic), keyed by customer.
    AtRisk,
}

impl EntryKind {
    /// The code stored in the stream's `t` field.
    pub fn code(self) -> &'static str {
        match self {
            Self::Change => "c",
            Self::DeadLetter => "d",
            Self::DeadLetterNoKey => "dn",
            Self::AtRisk => "n",
        }
    }

    /// Parses a stored code.
    pub fn from_code(code: &[u8]) -> Option<Self> {
        match code {
            b"c" => Some(Self::Change),
            b"d" => Some(Self::DeadLetter),
            b"dn" => Some(Self::DeadLetterNoKey),
            b"n" => Some(Self::AtRisk),
            _ => None,
        }
    }
}

/// One record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Change or dead letter.
    pub kind: EntryKind,
    /// Kafka key bytes.
    pub key: Vec<u8>,
    /// Kafka value bytes.
    pub value: Vec<u8>,
    /// Kafka headers as a JSON array of `[name, value]` string pairs (empty for none).
    pub headers: Vec<u8>,
}
