//! Publish: drain each owned partition's Redis outbox to Kafka, in order, through a
//! transactional producer per partition (fenced when the partition changes owner), trimming
//! only what the broker committed.

pub mod health;
pub mod position;
pub mod producer;
pub mod publisher;
pub mod readback;
