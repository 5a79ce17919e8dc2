//! Publish: drain each owned partition's Redis outbox to Kafka with an idempotent producer,
//! in order, trimming only what the broker acknowledged.

pub mod publisher;
