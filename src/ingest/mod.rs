//! Ingest: the Kafka consumer, message decoding and dead-letter records.

pub mod consumer;
pub mod dead_letter;
pub mod decode;
