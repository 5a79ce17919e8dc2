//! tierd: real-time customer tiering.
//!
//! Consumes purchase events from Kafka, keeps each customer's RFM state in Redis, places them
//! on a tier by configurable rules, and publishes a tier-change event whenever they move.
//! Every purchase counts exactly once and no change is lost, across crashes and rebalances.
//!
//! # Layout (in data-flow order)
//! - [`config`]: the configuration file and its validation.
//! - [`ingest`]: the Kafka consumer thread ([`ingest::consumer`]), decoding and validation
//!   ([`ingest::decode`]), dead-letter records ([`ingest::dead_letter`]).
//! - [`partition`]: the partition lifecycle — the supervisor claims and starts a partition, its
//!   runner turns each trigger (batch, timers, rules sweep, rank cut-offs) into one fenced,
//!   atomic Redis commit.
//! - [`domain`] and [`rules`]: pure state transitions and tier placement, no I/O, no clock.
//! - [`publish`]: the Redis outbox drained to Kafka by an idempotent producer.
//! - [`api`]: customer lookup, health, readiness, metrics.
//! - [`tools`]: read-only operator tools (`tierd rules explain`, `tierd simulate`).
//! - [`store`]: the only module that speaks to Redis: key layout, the client, the fenced
//!   partition commit, rank cut-offs, the outbox, read views for the API and tools.
//! - [`telemetry`], [`kafka`] (client settings), [`shutdown`], [`app`] (wiring).

pub mod api;
pub mod app;
pub mod config;
pub mod domain;
pub mod ingest;
pub mod kafka;
pub mod partition;
pub mod publish;
pub mod rules;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tools;
