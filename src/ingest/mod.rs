//! Ingest: the Kafka consumer, message decoding, dead-letter records and the watch for input
//! partitions nobody processes.

pub mod consumer;
pub mod dead_letter;
pub mod decode;
pub mod record;
pub mod stalls;
pub mod topic_id;
