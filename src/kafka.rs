//! The one place Kafka client settings are decided: tierd's defaults, then the operator's
//! pass-through librdkafka properties from `[kafka.consumer]` / `[kafka.producer]`.

use crate::config::KafkaConfig;
use rdkafka::ClientConfig;

/// Consumer settings: manual offsets (Redis holds the real ones), cooperative rebalancing.
pub fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", "2000")
        .set("enable.partition.eof", "false");
    for (k, v) in &kafka.consumer {
        c.set(k, v);
    }
    // Offsets live in Redis; Kafka commits are explicit and advisory only.
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c
}

/// Producer settings: idempotent, fully acknowledged, ordered.
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "25")
        .set("compression.type", "lz4")
        // Never time a record out: a timed-out change followed by a delivered later change of
        // the same customer would be re-published out of order. Records wait in the outbox
        // (and the producer queue) until the broker takes them.
        .set("message.timeout.ms", "0");
    for (k, v) in &kafka.producer {
        c.set(k, v);
    }
    // Idempotence is what keeps order and drops broker-side duplicates on retries.
    c.set("enable.idempotence", "true");
    c
}
