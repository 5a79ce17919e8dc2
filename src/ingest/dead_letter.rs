//! Dead-letter records: the original message bytes plus headers saying where it came from
//! and why it was rejected (the Kafka Connect convention, so standard tooling can re-drive it).

use super::decode::Rejection;
use crate::publish::outbox::{EntryKind, OutboxEntry};

/// Header names on dead-letter records.
pub mod headers {
    /// Machine-readable reason code (`invalid_json`, …).
    pub const REASON: &str = "tierd.reason";
    /// Human-readable detail naming the field.
    pub const DETAIL: &str = "tierd.detail";
    /// Source topic.
    pub const TOPIC: &str = "tierd.source.topic";
    /// Source partition.
    pub const PARTITION: &str = "tierd.source.partition";
    /// Source offset.
    pub const OFFSET: &str = "tierd.source.offset";
    /// Source message timestamp (Unix ms), if it had one.
    pub const TIMESTAMP: &str = "tierd.source.timestamp";
    /// Present when the value was cut to `publish.dead_letter_max_bytes`: the original length.
    pub const TRUNCATED_FROM: &str = "tierd.truncated_from";
}

/// Where a rejected message came from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// Input topic.
    pub topic: &'a str,
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
    /// Message timestamp, Unix ms.
    pub timestamp_ms: Option<i64>,
}

/// Builds the outbox entry of a rejected message.
pub fn entry(
    source: Source<'_>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    rejection: &Rejection,
    max_bytes: usize,
) -> OutboxEntry {
    let value = value.unwrap_or_default();
    let mut pairs: Vec<(&str, String)> = vec![
        (headers::REASON, rejection.reason.as_str().to_owned()),
        (headers::DETAIL, rejection.detail.clone()),
        (headers::TOPIC, source.topic.to_owned()),
        (headers::PARTITION, source.partition.to_string()),
        (headers::OFFSET, source.offset.to_string()),
    ];
    if let Some(ts) = source.timestamp_ms {
        pairs.push((headers::TIMESTAMP, ts.to_string()));
    }
    let kept = if value.len() > max_bytes {
        pairs.push((headers::TRUNCATED_FROM, value.len().to_string()));
        &value[..max_bytes]
    } else {
        value
    };
    OutboxEntry {
        kind: if key.is_some() {
            EntryKind::DeadLetter
        } else {
            EntryKind::DeadLetterNoKey
        },
        key: key.unwrap_or_default().to_vec(),
        value: kept.to_vec(),
        headers: serde_json::to_vec(&pairs).unwrap_or_default(),
    }
}
