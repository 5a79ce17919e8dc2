//! tierd: real-time customer tiering.
//!
//! Consumes purchase events from Kafka, keeps each customer's RFM state in Redis, places them
//! on a tier by configurable rules, and publishes a tier-change event whenever they move.
//! Every purchase counts exactly once and no change is lost, across crashes and rebalances.
//!
//! # Layout, in the order the data moves
//! - [`config`]: the configuration file, validated once at startup; [`kafka`]: client settings.
//! - [`ingest`]: the Kafka consumer thread that cuts each partition's messages into batches
//!   ([`ingest::consumer`]), decoding and validation ([`ingest::decode`]), dead-letter records
//!   ([`ingest::dead_letter`]).
//! - [`partition`]: the partition lifecycle. The [`partition::supervisor`] claims and starts a
//!   partition; its [`partition::runner`] turns each trigger — an input batch, due timers, a
//!   rules sweep, new rank cut-offs — into a draft and commits it fenced and atomic.
//! - [`engine`]: the tier rules and the pure state transition (no I/O, clock injected), over
//!   [`model`]: the nouns (events, customer state, tier changes, money, time, calendar).
//! - [`store`]: the only module that speaks to Redis: key layout, the client, the partition
//!   store with its one retry policy, rank cut-offs, the outbox, read views for the API and tools.
//! - [`publish`]: the Redis outbox drained to Kafka by an idempotent producer.
//! - [`api`]: customer lookup, health, readiness, metrics; [`tools`]: read-only operator tools
//!   (`tierd rules explain`, `tierd simulate`).
//! - [`telemetry`]: metrics and the internal events that log and count together; [`liveness`]:
//!   what `/healthz` reports (the tasks that must keep running); [`shutdown`];
//!   [`app`]: the wiring.

pub mod api;
pub mod app;
pub mod config;
pub mod engine;
pub mod ingest;
pub mod kafka;
pub mod liveness;
pub mod model;
pub mod partition;
pub mod publish;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tools;
