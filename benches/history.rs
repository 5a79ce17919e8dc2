//! What a claim pays to read a partition's replay history from the history topic
//! (`kafka.history_topic`) when Redis lost more than the published position's offset metadata
//! keeps: N history records (default 86,400 — a day of wall-clock ticks that each fired
//! something, one pass per record, and a pyramid cut-off move in every tenth) are written to
//! a real Apache Kafka topic as tierd writes them (JSON, keyed by the input partition), then
//! `OutboxPositions::with_history` reads them back and merges them with the metadata — the
//! call the claim makes, on the consumer thread, within its deadline.
//!
//! `cargo bench --bench history` (env: BENCH_HISTORY_RECORDS=86400). Prints the bytes
//! written, the read-and-merge time (best of 3) and what it put back.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use common::env_or;
use rdkafka::producer::{FutureRecord, Producer};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use support::World;
use tierd::config::KafkaConfig;
use tierd::engine::rules::rank::{Cutoffs, CutoffsSwitch};
use tierd::publish::position::{OutboxPositions, Published};

/// The partition's outbox key, which keys its history records.
const KEY: &str = "tierd:{g:purchases:0}:outbox";
use tierd::store::outbox::TimerPass;

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --all-targets` / nextest probing the bench: nothing to list.
    }
    let n = env_or("BENCH_HISTORY_RECORDS", 86_400) as i64;
    let world = World::start(1);
    let producer = world.producer();
    let mut metadata = Published::default();
    let mut bytes = 0usize;
    let mut deliveries = Vec::new();
    for i in 0..n {
        let offset = i * 20;
        let switches = if i % 10 == 0 {
            vec![CutoffsSwitch {
                offset,
                cutoffs: Cutoffs {
                    version: i as u64 / 10 + 1,
                    rules: 7,
                    population: vec![1_000_000 + i as u64],
                    values: vec![Some(123_456_789 + i as i128), Some(98_765 + i as i128)],
                    at_or_above: vec![10_000, 200_000],
                    computed_at: 1_790_000_000_000 + i * 1_000,
                },
                at_ms: 1_790_000_000_500 + i * 1_000,
            }]
        } else {
            Vec::new()
        };
        let passes = [TimerPass {
            offset: offset + 1,
            upto: 1_790_000_000_000 + i * 1_000,
            cutoffs: i as u64 / 10 + 1,
        }];
        // As the publisher writes them.
        let record = metadata.history_record(Some(offset + 19), &switches, &passes, &[]);
        metadata = metadata.after(
            &format!("{i}-0"),
            record.through,
            &record.switches,
            &record.passes,
            None,
            3500,
        );
        metadata.history_records = record.n;
        let value = serde_json::to_vec(&record).unwrap();
        bytes += value.len();
        let send = producer.send_result(
            FutureRecord::to(&world.history)
                .partition(0)
                .key(KEY)
                .payload(&value),
        );
        deliveries.push(send.unwrap_or_else(|(e, _)| panic!("{e}")));
        if deliveries.len() >= 10_000 {
            for d in deliveries.drain(..) {
                futures::executor::block_on(d).unwrap().unwrap();
            }
        }
    }
    for d in deliveries.drain(..) {
        futures::executor::block_on(d).unwrap().unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let kafka = KafkaConfig {
        brokers: world.broker.addr.clone(),
        group_id: world.group.clone(),
        input_topic: world.input.clone(),
        history_topic: world.history.clone(),
        ..KafkaConfig::default()
    };
    let positions = OutboxPositions::new(&kafka, 3500).unwrap();
    positions.set_history_partitions(1);
    assert!(metadata.reach_exceeded(Some(0)));
    let mut best = Duration::MAX;
    let mut full = Published::default();
    for _ in 0..3 {
        let t = Instant::now();
        full = positions
            .with_history(
                0,
                KEY,
                &metadata,
                Instant::now() + Duration::from_secs(300),
                &AtomicBool::new(false),
            )
            .unwrap()
            .published;
        best = best.min(t.elapsed());
    }
    println!(
        "history records: {n} ({:.1} MB of JSON values)",
        bytes as f64 / 1e6
    );
    println!(
        "metadata keeps: {} switches, {} passes",
        metadata.switches.len(),
        metadata.passes.len()
    );
    println!(
        "read and merged (best of 3): {:.2} s, {:.1} µs per record",
        best.as_secs_f64(),
        best.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "put back: {} switches, {} passes",
        full.switches.len(),
        full.passes.len()
    );
    assert_eq!(full.passes.len() as i64, n);
}
