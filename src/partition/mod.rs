//! A partition's lifecycle, from its assignment to its release. The [`supervisor`] claims a
//! partition in Redis (raising its fencing epoch) and starts its [`runner`] and publisher; the
//! runner owns the partition's customers and turns each trigger — an input [`batch`], due
//! [`timers`], a rules-version [`sweep`], new rank cut-offs ([`ranks`]) — into a [`draft`],
//! which it commits to Redis atomically, fenced, with the partition's position.

pub mod batch;
pub mod draft;
pub mod ranks;
pub mod runner;
pub mod supervisor;
pub mod sweep;
pub mod timers;

use crate::engine::rules::Rules;
use crate::ingest::decode::DecodeLimits;
use crate::model::change::MoneyFormat;
use crate::model::DedupPolicy;
use crate::telemetry::Telemetry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

/// What every partition worker shares: rules, limits, metrics.
#[derive(Debug)]
pub struct Pipeline {
    /// The tier rules.
    pub rules: Arc<Rules>,
    /// Input validation limits.
    pub limits: DecodeLimits,
    /// Duplicate detection.
    pub dedup: DedupPolicy,
    /// How amounts are shown.
    pub money: MoneyFormat,
    /// Input topic name (for causes and dead letters).
    pub input_topic: String,
    /// Dead-letter values are cut to this size.
    pub dead_letter_max_bytes: usize,
    /// LRU size of each worker's state cache.
    pub cache_customers: usize,
    /// Engine time and timers.
    pub clock: crate::config::ClockConfig,
    /// Customers re-evaluated per second and partition after a rules version change.
    pub sweep_per_second: u32,
    /// Rank cut-off computation and application.
    pub ranks: crate::config::RanksConfig,
    /// Key names.
    pub keyspace: crate::store::keys::Keyspace,
    /// Partitions of the input topic, set once at startup after the topic's metadata was read
    /// (the owner of partition 0 computes rank cut-offs over all of them).
    pub partitions: std::sync::atomic::AtomicI32,
    /// Metrics.
    pub telemetry: Telemetry,
}

/// Live status of an owned partition, shared with the API and the lag gauge.
#[derive(Debug)]
pub struct PartitionStatus {
    /// Our fencing epoch.
    pub epoch: i64,
    /// Next offset to apply (-1 until known).
    pub next_offset: AtomicI64,
    /// High watermark last reported by the consumer (-1 until known).
    pub high_watermark: AtomicI64,
}

impl PartitionStatus {
    /// Messages not applied yet, if both ends are known.
    pub fn lag(&self) -> Option<i64> {
        let (next, high) = (
            self.next_offset.load(Ordering::Relaxed),
            self.high_watermark.load(Ordering::Relaxed),
        );
        (high >= 0).then(|| (high - next.max(0)).max(0))
    }
}

/// The partitions this instance owns, by partition number.
pub type Ownership = Arc<RwLock<BTreeMap<i32, Arc<PartitionStatus>>>>;
