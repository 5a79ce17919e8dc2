//! What the output topic last told consumers of each customer: read back after a replay that
//! could not decide the lost input as it first was, so that a customer the first run moved
//! and the replay did not is told their tier again ([`crate::engine::restate`]).
//!
//! Only committed transactions count (`read_committed`: an aborted round was never seen by
//! consumers). Before reading, the reader waits until every output partition's last stable
//! offset has reached the high watermark it saw first: every round committed by then (this
//! partition's publisher has published its whole outbox) is readable, however long other
//! partitions' rounds stayed open. It then reads each partition from the first record at or
//! after a time to the end it reports.

use super::position::OutboxPositions;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The most customers a read-back holds (their ids and tiers): a restore from long ago over a
/// busy output topic is reported instead of filling memory.
pub const MAX_CUSTOMERS: usize = 2_000_000;

/// What the output topic last said of one customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Told {
    /// The tier of the last change; `None` after an erasure (a tombstone).
    pub tier: Option<String>,
    /// The output partition and the record's timestamp: only a topic whose partition count
    /// grew holds one customer's records in two partitions, and then the later one counts.
    at: (i32, i64),
}

/// The part of a record read back: a tier change's tier (an at-risk notice, on a shared
/// topic, says `"type": "at_risk"` and is not a change).
#[derive(Deserialize)]
struct Body {
    tier: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

/// How the reader of the output topic is configured (see [`OutboxPositions::new`]).
pub(super) fn reader_config(kafka: &crate::config::KafkaConfig) -> rdkafka::ClientConfig {
    crate::kafka::consumer_config(kafka)
        .set("group.id", format!("{}.readback", kafka.group_id))
        .set("statistics.interval.ms", "0")
        .set("enable.partition.eof", "true")
        // Records deleted by retention under the reader: read on from the oldest kept.
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .clone()
}

impl OutboxPositions {
    /// What the output topic last says of each customer with a record at or after `since_ms`
    /// (Unix ms of the record timestamps; 0: from the start), until `give_up` at the latest
    /// or until `abort` is set. Blocks.
    ///
    /// # Errors
    /// The broker did not answer in time or reported an error, the read was aborted, or more
    /// than [`MAX_CUSTOMERS`] customers were read.
    pub fn last_told(
        &self,
        since_ms: i64,
        give_up: Instant,
        abort: &AtomicBool,
    ) -> Result<HashMap<String, Told>, String> {
        let (config, topic) = self.output_reader();
        let consumer: BaseConsumer<crate::kafka::EofExpected> = config
            .create_with_context(crate::kafka::EofExpected)
            .map_err(|e| format!("creating a reader: {e}"))?;
        let left = || give_up.saturating_duration_since(Instant::now());
        let step = || left().min(Duration::from_secs(10));
        let metadata = consumer
            .fetch_metadata(Some(topic), step())
            .map_err(|e| format!("reading the metadata of {topic}: {e}"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(format!("{topic} has no partitions"));
        }
        // The first record at or after `since_ms` in each partition.
        let mut at = TopicPartitionList::new();
        for &p in &partitions {
            at.add_partition_offset(topic, p, Offset::Offset(since_ms.max(0)))
                .map_err(|e| e.to_string())?;
        }
        let starts = consumer
            .offsets_for_times(at, step())
            .map_err(|e| format!("looking up the offsets of {topic} at {since_ms}: {e}"))?;
        let mut assignment = TopicPartitionList::new();
        let mut open = Vec::new();
        for &p in &partitions {
            // The high watermark itself (a read_committed query answers the last stable
            // offset, which an open transaction holds back).
            let (_, high) = self
                .unstable_consumer()
                .fetch_watermarks(topic, p, step())
                .map_err(|e| format!("reading the high watermark of {topic} {p}: {e}"))?;
            let Some(element) = starts.find_partition(topic, p) else {
                return Err(format!(
                    "looking up the offset of {topic} {p} at {since_ms}: no answer for it"
                ));
            };
            if let Err(e) = element.error() {
                return Err(format!(
                    "looking up the offset of {topic} {p} at {since_ms}: {e}"
                ));
            }
            let start = match element.offset() {
                Offset::Offset(o) if o >= 0 => o,
                // No record at or after the time: nothing to read there.
                Offset::End => high,
                other => {
                    return Err(format!(
                        "looking up the offset of {topic} {p} at {since_ms}: {other:?}"
                    ))
                }
            };
            if start >= high {
                continue;
            }
            // Every round committed before the read began becomes readable once the last
            // stable offset passes the high watermark seen now.
            loop {
                if abort.load(Ordering::Relaxed) {
                    return Err("aborted (the partition was released)".to_owned());
                }
                let (_, stable) = consumer
                    .fetch_watermarks(topic, p, step())
                    .map_err(|e| format!("reading the stable offset of {topic} {p}: {e}"))?;
                if stable >= high {
                    break;
                }
                if left().is_zero() {
                    return Err(format!(
                        "{topic} {p}: a transaction stayed open below offset {high}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assignment
                .add_partition_offset(topic, p, Offset::Offset(start))
                .map_err(|e| e.to_string())?;
            open.push(p);
        }
        let mut told: HashMap<String, Told> = HashMap::new();
        if open.is_empty() {
            return Ok(told);
        }
        // Assigned only now: the first end each partition reports is at or after its last
        // stable offset checked above.
        consumer.assign(&assignment).map_err(|e| e.to_string())?;
        while !open.is_empty() {
            if abort.load(Ordering::Relaxed) {
                return Err("aborted (the partition was released)".to_owned());
            }
            if left().is_zero() {
                return Err(format!(
                    "{topic} not read to its end in time ({} customers read)",
                    told.len()
                ));
            }
            match consumer.poll(left().min(Duration::from_millis(200))) {
                Some(Ok(m)) => {
                    let Some(key) = m.key() else { continue };
                    let tier = match m.payload() {
                        None => None,
                        Some(payload) => match serde_json::from_slice::<Body>(payload) {
                            Ok(body) if body.kind.is_some() => continue,
                            Ok(body) => Some(body.tier),
                            Err(e) => {
                                return Err(format!(
                                    "{topic} {} offset {}: not a tier change: {e}",
                                    m.partition(),
                                    m.offset()
                                ))
                            }
                        },
                    };
                    let at = (m.partition(), m.timestamp().to_millis().unwrap_or(0));
                    let customer = String::from_utf8_lossy(key);
                    let count = told.len();
                    match told.get_mut(customer.as_ref()) {
                        Some(known) => {
                            if known.at.0 == at.0 || known.at.1 <= at.1 {
                                *known = Told { tier, at };
                            }
                        }
                        None if count >= MAX_CUSTOMERS => {
                            return Err(format!(
                                "more than {MAX_CUSTOMERS} customers since {since_ms}"
                            ));
                        }
                        None => {
                            told.insert(customer.into_owned(), Told { tier, at });
                        }
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => open.retain(|&o| o != p),
                Some(Err(e)) => return Err(format!("reading {topic}: {e}")),
                None => {}
            }
        }
        Ok(told)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_body_gives_its_tier() {
        let body: Body = serde_json::from_str(
            r#"{"event_id":"x","customer_id":"c","tier":"gold","sequence":3}"#,
        )
        .unwrap();
        assert_eq!(body.tier, "gold");
        assert_eq!(body.kind, None);
        assert!(serde_json::from_str::<Body>(r#"{"customer_id":"c"}"#).is_err());
        // An at-risk notice names a tier too: told apart by its type.
        let notice: Body =
            serde_json::from_str(r#"{"type":"at_risk","customer_id":"c","tier":"gold"}"#).unwrap();
        assert_eq!(notice.kind.as_deref(), Some("at_risk"));
    }
}
