//! An input record as the runners receive it: the message, detached from librdkafka's buffer,
//! with the leader epoch it was written in. The epoch is stored with the partition's position
//! so that a later start there can be validated against the leader's log (KIP-320): after an
//! unclean leader election the same offsets can hold other records.

use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use std::ops::Deref;

/// One consumed input record.
#[derive(Debug)]
pub struct Record {
    message: OwnedMessage,
    /// The partition leader epoch the record was written in; `None` if the broker did not say.
    pub leader_epoch: Option<i32>,
}

impl Record {
    /// Detaches a consumed message, keeping its leader epoch.
    pub fn detach(message: &BorrowedMessage<'_>) -> Self {
        // SAFETY: `ptr()` is the live message `message` borrows; the call only reads it.
        // (rust-rdkafka 0.39 does not expose the epoch.)
        let epoch = unsafe { rdkafka::bindings::rd_kafka_message_leader_epoch(message.ptr()) };
        Self {
            message: message.detach(),
            leader_epoch: (epoch >= 0).then_some(epoch),
        }
    }

    /// A record without a known leader epoch (tests, tools).
    pub fn new(message: OwnedMessage) -> Self {
        Self {
            message,
            leader_epoch: None,
        }
    }
}

impl Deref for Record {
    type Target = OwnedMessage;

    fn deref(&self) -> &OwnedMessage {
        &self.message
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
