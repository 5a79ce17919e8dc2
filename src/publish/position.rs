//! How far each partition's outbox has been published, kept in Kafka itself: every publish
//! transaction also commits, for the consumer group `<kafka.group_id>.outbox`, the input
//! partition's entry whose offset metadata is the last outbox stream id in the round. The
//! record batch and that position become visible atomically, so the next owner of a partition
//! knows exactly which outbox entries went out even when the previous owner died between its
//! commit and its trim: the claim trims them instead of publishing them again, and consumers
//! never see a change re-published after a later one.

use crate::config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::time::Duration;

/// How long reading the published positions may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads and writes the published outbox positions.
pub struct OutboxPositions {
    consumer: BaseConsumer,
    group: ConsumerGroupMetadata,
    topic: String,
}

impl OutboxPositions {
    /// The positions of `kafka.input_topic`'s partitions (never subscribes: the client only
    /// reads committed offsets and names the group in publish transactions).
    ///
    /// # Errors
    /// librdkafka refused the settings.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer = crate::kafka::consumer_config(kafka)
            .set("group.id", Self::group_id(kafka))
            // Never polled: no statistics events may pile up in its queue.
            .set("statistics.interval.ms", "0")
            // Read only stable positions (a transaction still committing is waited for).
            .set("isolation.level", "read_committed")
            .create()?;
        let group = consumer
            .group_metadata()
            .ok_or(KafkaError::Global(rdkafka::types::RDKafkaErrorCode::Fail))?;
        Ok(Self {
            consumer,
            group,
            topic: kafka.input_topic.clone(),
        })
    }

    /// The consumer group the positions are committed for.
    pub fn group_id(kafka: &KafkaConfig) -> String {
        format!("{}.outbox", kafka.group_id)
    }

    /// The last outbox stream id of `partition` that a committed transaction published, if
    /// any. Blocks (the claim runs on the consumer thread).
    ///
    /// # Errors
    /// The broker did not answer.
    pub fn published(&self, partition: i32) -> Result<Option<String>, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        let committed = self.consumer.committed_offsets(tpl, READ_TIMEOUT)?;
        let id = committed
            .find_partition(&self.topic, partition)
            .map(|e| e.metadata().to_owned())
            .filter(|m| !m.is_empty());
        Ok(id)
    }

    /// The offsets to commit with a round whose last outbox entry is `last_id` (`ms-seq`).
    pub fn round_offsets(&self, partition: i32, last_id: &str) -> TopicPartitionList {
        // The offset itself only needs to be valid and to grow: the id's millisecond part.
        let ms = last_id
            .split_once('-')
            .and_then(|(ms, _)| ms.parse::<i64>().ok())
            .unwrap_or(0);
        let mut tpl = TopicPartitionList::new();
        // Adding a partition to a fresh list cannot fail.
        let _ = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(ms));
        if let Some(mut e) = tpl.find_partition(&self.topic, partition) {
            e.set_metadata(last_id);
        }
        tpl
    }

    /// The group named in publish transactions.
    pub fn group(&self) -> &ConsumerGroupMetadata {
        &self.group
    }
}
