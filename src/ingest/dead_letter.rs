//! Dead-letter records: the original message bytes plus headers saying where it came from
//! and why it was rejected (the Kafka Connect convention, so standard tooling can re-drive it).

use super::decode::Rejection;
use crate::store::outbox::{EntryKind, OutboxEntry};

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
    /// Present when the key was cut to [`super::MAX_KEY_BYTES`]: the original length.
    pub const KEY_TRUNCATED_FROM: &str = "tierd.key_truncated_from";
}

/// Dead-letter keys are cut to this many bytes, so key + value + headers always stay under
/// Kafka's default 1 MB record limit (a record the broker refuses would block the outbox).
pub const MAX_KEY_BYTES: usize = 1024;

/// `tierd.detail` is cut to this many characters.
const MAX_DETAIL_CHARS: usize = 512;

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
        (
            headers::DETAIL,
            rejection.detail.chars().take(MAX_DETAIL_CHARS).collect(),
        ),
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
    let key_bytes = key.unwrap_or_default();
    if key_bytes.len() > MAX_KEY_BYTES {
        pairs.push((headers::KEY_TRUNCATED_FROM, key_bytes.len().to_string()));
    }
    OutboxEntry {
        kind: if key.is_some() {
            EntryKind::DeadLetter
        } else {
            EntryKind::DeadLetterNoKey
        },
        key: key_bytes[..key_bytes.len().min(MAX_KEY_BYTES)].to_vec(),
        value: kept.to_vec(),
        headers: serde_json::to_vec(&pairs).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::decode::Reason;

    #[test]
    fn key_value_and_detail_are_bounded() {
        let source = Source {
            topic: "in",
            partition: 1,
            offset: 7,
            timestamp_ms: Some(5),
        };
        let rejection = Rejection {
            reason: Reason::KeyMismatch,
            detail: "x".repeat(10_000),
        };
        let e = entry(
            source,
            Some(&[b'k'; 5000]),
            Some(&[b'v'; 5000]),
            &rejection,
            2000,
        );
        assert_eq!((e.key.len(), e.value.len()), (MAX_KEY_BYTES, 2000));
        let headers: Vec<(String, String)> = serde_json::from_slice(&e.headers).unwrap();
        let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get(headers::KEY_TRUNCATED_FROM).as_deref(), Some("5000"));
        assert_eq!(get(headers::TRUNCATED_FROM).as_deref(), Some("5000"));
        assert_eq!(
            get(headers::DETAIL).map(|d| d.len()),
            Some(MAX_DETAIL_CHARS)
        );
        assert_eq!(get(headers::OFFSET).as_deref(), Some("7"));
        assert_eq!(e.kind, EntryKind::DeadLetter);
    }
}
