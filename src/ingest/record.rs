//! An input record as the runners receive it: the message, detached from librdkafka's buffer,
//! with the leader epoch it was written in. The epoch is stored with the partition's position
//! so that a later start there can be validated against the leader's log (KIP-320): after an
//! unclean leader election the same offsets can hold other records.

use rdkafka::message::{BorrowedMessage, Message, Timestamp};
use rdkafka::{Offset, TopicPartitionList};

/// One consumed input record: what the runners read of it, copied out of librdkafka's buffer
/// into one allocation (key, then value). librdkafka's own `OwnedMessage` made three per
/// message (value, key, topic name) and held ~140 bytes besides: with 16 queued batches of
/// 2,000 messages per partition, that was ~70 MiB of tierd's peak RSS in the 1M-event bench.
#[derive(Debug, Clone)]
pub struct Record {
    /// The key's bytes followed by the value's.
    bytes: Box<[u8]>,
    /// The key's length, `None` if the message has no key.
    key_len: Option<u32>,
    /// Whether the message has a value (`None`: a tombstone).
    has_payload: bool,
    offset: i64,
    partition: i32,
    timestamp: Timestamp,
    /// The partition leader epoch the record was written in; `None` if the broker did not say.
    pub leader_epoch: Option<i32>,
}

impl Record {
    /// Detaches a consumed message, keeping its leader epoch.
    pub fn detach(message: &BorrowedMessage<'_>) -> Self {
        // SAFETY: `ptr()` is the live message `message` borrows; the call only reads it.
        // (rust-rdkafka 0.39 does not expose the epoch.)
        let epoch = unsafe { rdkafka::bindings::rd_kafka_message_leader_epoch(message.ptr()) };
        let mut record = Self::new(
            message.key(),
            message.payload(),
            message.partition(),
            message.offset(),
            message.timestamp(),
        );
        record.leader_epoch = (epoch >= 0).then_some(epoch);
        record
    }

    /// A record of these parts, without a known leader epoch (tests, tools).
    pub fn new(
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        partition: i32,
        offset: i64,
        timestamp: Timestamp,
    ) -> Self {
        let (k, v) = (key.unwrap_or_default(), payload.unwrap_or_default());
        let mut bytes = Vec::with_capacity(k.len() + v.len());
        bytes.extend_from_slice(k);
        bytes.extend_from_slice(v);
        Self {
            bytes: bytes.into_boxed_slice(),
            // Keys are bounded far below 4 GiB by Kafka's message size.
            key_len: key.map(|k| u32::try_from(k.len()).unwrap_or(u32::MAX)),
            has_payload: payload.is_some(),
            offset,
            partition,
            timestamp,
            leader_epoch: None,
        }
    }

    /// The message key, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.key_len.map(|n| &self.bytes[..n as usize])
    }

    /// The message value, if any.
    pub fn payload(&self) -> Option<&[u8]> {
        let start = self.key_len.unwrap_or(0) as usize;
        self.has_payload.then(|| &self.bytes[start..])
    }

    /// The partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The offset.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The message timestamp.
    pub fn timestamp(&self) -> Timestamp {
        self.timestamp
    }
}

/// Adds `partition` at `offset` to `tpl` together with the leader epoch of the record before
/// `offset`, if known. A seek to such a position makes librdkafka validate it with the leader
/// first (OffsetForLeaderEpoch): a log truncated below it is reported as an offset error
/// instead of being read from the same offsets, which now hold other records.
///
/// # Errors
/// librdkafka's, for an invalid offset.
pub fn add_position(
    tpl: &mut TopicPartitionList,
    topic: &str,
    partition: i32,
    offset: Offset,
    leader_epoch: Option<i32>,
) -> rdkafka::error::KafkaResult<()> {
    tpl.add_partition_offset(topic, partition, offset)?;
    let Some(epoch) = leader_epoch else {
        return Ok(());
    };
    let topic = std::ffi::CString::new(topic).expect("topic names have no NUL");
    // SAFETY: `tpl.ptr()` is the list `tpl` owns; the element found is the one just added and
    // lives as long as the list. (rust-rdkafka 0.39 has no setter for the epoch.)
    unsafe {
        let elem = rdkafka::bindings::rd_kafka_topic_partition_list_find(
            tpl.ptr(),
            topic.as_ptr(),
            partition,
        );
        if !elem.is_null() {
            rdkafka::bindings::rd_kafka_topic_partition_set_leader_epoch(elem, epoch);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_absent_and_empty_keys_and_values_apart() {
        let t = Timestamp::CreateTime(5);
        let r = Record::new(Some(b"kim"), Some(b"{}"), 2, 7, t);
        assert_eq!(
            (r.key(), r.payload()),
            (Some(&b"kim"[..]), Some(&b"{}"[..]))
        );
        assert_eq!((r.partition(), r.offset(), r.timestamp()), (2, 7, t));
        let r = Record::new(None, Some(b"{}"), 0, 0, t);
        assert_eq!((r.key(), r.payload()), (None, Some(&b"{}"[..])));
        let r = Record::new(Some(b""), None, 0, 0, t);
        assert_eq!((r.key(), r.payload()), (Some(&b""[..]), None));
        let r = Record::new(Some(b"k"), Some(b""), 0, 0, t);
        assert_eq!((r.key(), r.payload()), (Some(&b"k"[..]), Some(&b""[..])));
    }
}
