//! Instructions per event of tierd's own per-event work, counted by valgrind's callgrind on a
//! fixed input: a figure the noise of a shared machine cannot move (issue 12), tracked in
//! docs/performance.md so that a regression shows.
//!
//! The workload is what a partition runner does with an input batch, minus the I/O: decode
//! each message (`ingest::decode`), apply it to its customer's state (the engine), record the
//! tier changes as outbox entries (`Draft::record`: the change events' JSON), and turn the
//! batch into a commit (`Draft::take_batch`: every touched customer's state serialised, the
//! index and tier-count differences). States stay in memory between batches in their stored
//! form, as in the
//! runner's cache. Redis, Kafka and tokio are not in it: their costs show in the pipeline
//! bench's CPU figures.
//!
//! `cargo bench --bench instructions` (env BENCH_EVENTS, default 100000; BENCH_CUSTOMERS,
//! default 10000; BENCH_RULES, default `config/rules/b2b-lifetime.toml`; BENCH_HISTORY, the
//! tier changes each state keeps, `api.history_changes`, default 0). The figure is the
//! difference between a run of 2N events and one of N, divided by N, counting only the
//! instructions inside `process_batch` (callgrind `--toggle-collect`): generating the input
//! and loading the rules are not in it, and customers' first purchases weigh as in a steady
//! state. Needs `valgrind` (Debian package).

#[path = "common/mod.rs"]
mod common;

use common::{env_or, Rng};
use figment::providers::{Format, Toml};
use figment::Figment;
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use tierd::config::Config;
use tierd::engine::rules::rank::Cutoffs;
use tierd::engine::rules::Rules;
use tierd::engine::Applied;
use tierd::ingest::decode;
use tierd::model::change::Cause;
use tierd::model::state::origin_of;
use tierd::partition::draft::{Draft, Loaded, Position, Working};
use tierd::partition::Pipeline;
use tierd::store::keys::PartitionKeys;
use tierd::telemetry::Telemetry;

// As in tierd's binary (src/main.rs): the allocator is part of the per-event cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: u64 = 2000;

/// One input message: key, value, and the message timestamp (ms).
type Message = (String, Vec<u8>, i64);

/// The fixed input: `events` purchases of `customers` customers, one second apart from
/// 2026-11-01T00:00:00Z, amounts up to 100,000 CNY.
fn input(events: u64, customers: u64) -> Vec<Message> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let start_ms = 1_793_491_200_000_i64;
    (0..events)
        .map(|index| {
            let customer = format!("c{}", rng.next() % customers);
            let amount = 1 + rng.next() % 100_000;
            let at = start_ms + index as i64 * 1000;
            let when = time::OffsetDateTime::from_unix_timestamp(at / 1000)
                .expect("a valid time")
                .format(&time::format_description::well_known::Rfc3339)
                .expect("formats");
            let value = format!(
                r#"{{"event_id":"e{index}","customer_id":"{customer}","amount":"{amount}.00","currency":"CNY","occurred_at":"{when}"}}"#
            );
            (customer, value.into_bytes(), at)
        })
        .collect()
}

/// What a partition runner keeps between batches.
struct Partition {
    p: Pipeline,
    keys: PartitionKeys,
    cutoffs: Cutoffs,
    cache: HashMap<String, Box<[u8]>>,
    commits: i64,
}

/// The measured work: one batch starting at input offset `first` (the only function whose
/// instructions callgrind counts, `--toggle-collect`). Returns the bytes it would write.
#[inline(never)]
fn process_batch(part: &mut Partition, messages: &[Message], first: i64) -> usize {
    let p = &part.p;
    let mut work = Working::default();
    let mut draft = Draft::at(first, 0);
    for (offset, (key, value, at)) in (first..).zip(messages) {
        let decoded = decode::decode(Some(key.as_bytes()), Some(value), *at, &p.limits);
        draft.messages += 1;
        draft.end_offset = offset + 1;
        let Ok(event) = decoded else {
            continue;
        };
        let cache = &mut part.cache;
        let loaded = work.entry(event.customer_id.clone()).or_insert_with(|| {
            // As the runner's cache: the stored form, decoded on a hit.
            match cache.get(&event.customer_id) {
                Some(stored) => Loaded::from_cache(stored),
                None => Loaded::from_redis(None),
            }
            .expect("a stored state")
        });
        let fresh = loaded.state.is_new();
        if let Applied::Counted(outcome) =
            loaded
                .state
                .apply(&event, &p.rules, p.dedup, i64::MIN, &part.cutoffs)
        {
            if fresh {
                loaded.state.origin = Some(origin_of(&event.event_id, offset));
                loaded.state.born = Some(event.occurred_at_ms);
            }
            loaded.dirty = true;
            draft.applied += 1;
            if outcome.transition.is_some() || outcome.notice.is_some() {
                let cause = Cause {
                    event_id: event.event_id.clone(),
                    topic: p.input_topic.clone(),
                    partition: 0,
                    offset,
                };
                draft.record(
                    p,
                    &p.rules,
                    &event.customer_id,
                    &mut loaded.state,
                    &outcome,
                    Some(cause),
                );
            }
        }
    }
    let position = Position {
        expected_offset: first,
        expected_commits: part.commits,
        clock: None,
    };
    // Every input event is a new purchase: a bench that measured rejections instead (its
    // currency not the deployment's, as it once did) fails here.
    assert_eq!(
        draft.applied as usize,
        messages.len(),
        "every purchase is applied"
    );
    let batch = draft.take_batch(
        position,
        &mut work,
        &part.keys,
        p.rules.ranks().len(),
        p.history_changes,
    );
    part.commits += 1;
    for (id, mut loaded) in work {
        loaded.committed();
        if let Some(stored) = loaded.into_cache() {
            part.cache.insert(id, stored);
        }
    }
    batch.states.iter().map(|(_, v)| v.len()).sum::<usize>()
        + batch.outbox.iter().map(|e| e.value.len()).sum::<usize>()
}

/// Runs `events` purchases of `customers` customers through the per-event path, in batches;
/// returns the bytes written (so that nothing is optimised away).
fn workload(events: u64, customers: u64, rules_path: &str) -> usize {
    let history = env_or("BENCH_HISTORY", 0);
    let config = Config::from_figment(Figment::from(Toml::string(&format!(
        "[rules]\npath = {rules_path:?}\n[money]\ncurrency = \"CNY\"\n[api]\nhistory_changes = {history}\n"
    ))))
    .expect("configuration");
    let rules = Arc::new(
        Rules::load(rules_path.as_ref(), config.money.fraction_digits).expect("rules load"),
    );
    let p = Pipeline::new(&config, rules, Telemetry::new());
    let mut part = Partition {
        keys: p.keyspace.partition(0),
        p,
        cutoffs: Cutoffs::default(),
        cache: HashMap::new(),
        commits: 0,
    };
    let messages = input(events, customers);
    let mut written = 0;
    for (n, batch) in messages.chunks(BATCH as usize).enumerate() {
        written += process_batch(&mut part, batch, (n as u64 * BATCH) as i64);
    }
    written
}

/// Instructions executed by `events` events of the workload, counted by callgrind.
fn instructions(events: u64, customers: u64, rules: &str) -> u64 {
    let out = std::env::temp_dir().join(format!(
        "tierd-callgrind-{}-{events}.out",
        std::process::id()
    ));
    let status = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--quiet",
            "--toggle-collect=*process_batch*",
        ])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(std::env::current_exe().expect("own path"))
        .env("INSTRUCTIONS_CHILD", events.to_string())
        .env("BENCH_CUSTOMERS", customers.to_string())
        .env("BENCH_RULES", rules)
        .env("BENCH_HISTORY", env_or("BENCH_HISTORY", 0).to_string())
        .status()
        .expect("valgrind runs (Debian package `valgrind`)");
    assert!(status.success(), "the workload under callgrind failed");
    let text = std::fs::read_to_string(&out).expect("callgrind output");
    let _ = std::fs::remove_file(&out);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("a callgrind summary line")
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --all-targets` / nextest probing the bench: nothing to list.
    }
    let customers = env_or("BENCH_CUSTOMERS", 10_000).max(1);
    let rules = std::env::var("BENCH_RULES").unwrap_or_else(|_| {
        format!(
            "{}/config/rules/b2b-lifetime.toml",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    if let Ok(events) = std::env::var("INSTRUCTIONS_CHILD") {
        let events = events.parse().expect("INSTRUCTIONS_CHILD is a count");
        std::hint::black_box(workload(events, customers, &rules));
        return;
    }
    let events = env_or("BENCH_EVENTS", 100_000).max(BATCH);
    let once = instructions(events, customers, &rules);
    let twice = instructions(2 * events, customers, &rules);
    let per_event = twice.saturating_sub(once) as f64 / events as f64;
    println!("## tierd instructions per event (callgrind)");
    println!();
    println!("- workload: decode, apply, record the changes, serialise the touched states; batches of {BATCH}; {customers} customers; rules {rules}; tier history kept: {}", env_or("BENCH_HISTORY", 0));
    println!(
        "- {events} events: {once} instructions; {} events: {twice}",
        2 * events
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| instructions per event (marginal) | {per_event:.0} |");
}
