//! Crash safety: `kill -9` tierd repeatedly while tens of thousands of events flow (with
//! re-sent duplicates). After the last restart every customer's state equals the reference
//! exactly, and every expected tier change is on the output topic exactly once, each
//! customer's changes in order on every record a read_committed consumer reads.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use support::{purchase, refund, Tierd, World};
use tierd::engine::rules::Rules;
use tierd::engine::Applied;
use tierd::model::{time, CustomerState, DedupPolicy, Event, EventKind};

/// Expected changes per customer: (sequence, previous tier, tier).
type Changes = HashMap<String, Vec<(u64, Option<String>, String)>>;

/// A generated stream: the JSON events in production order.
fn stream(n: usize, customers: u32, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    let base = time::parse_rfc3339_ms("2026-11-01T00:00:00Z").unwrap();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let c = format!("c{}", rng.random_range(0..customers));
        // Event time mostly increasing, sometimes up to 2 days out of order.
        let at = time::format_ms(
            base + i as i64 * 20_000
                - if rng.random_bool(0.1) {
                    rng.random_range(0..172_800_000)
                } else {
                    0
                },
        );
        let amount = if rng.random_bool(0.05) {
            format!(
                "{}.{:02}",
                rng.random_range(100_000..400_000),
                rng.random_range(0..100)
            )
        } else {
            format!(
                "{}.{:02}",
                rng.random_range(1..20_000),
                rng.random_range(0..100)
            )
        };
        let e = if rng.random_bool(0.04) {
            refund(&format!("e{i}"), &c, &amount, &at)
        } else {
            purchase(&format!("e{i}"), &c, &amount, &at)
        };
        out.push(e.clone());
        if rng.random_bool(0.02) {
            out.push(e); // the producer re-sends: same event_id at a later offset
        }
    }
    out
}

/// The reference: the same stream applied in order, with the same pure transition function.
fn reference(
    events: &[serde_json::Value],
    rules: &Rules,
) -> (HashMap<String, CustomerState>, Changes) {
    let policy = DedupPolicy {
        horizon_ms: 7 * 86_400_000,
        max_ids: 64,
    };
    let mut states: HashMap<String, CustomerState> = HashMap::new();
    let mut changes: Changes = HashMap::new();
    for e in events {
        let event = Event {
            event_id: e["event_id"].as_str().unwrap().into(),
            customer_id: e["customer_id"].as_str().unwrap().into(),
            kind: if e["type"] == "refund" {
                EventKind::Refund
            } else {
                EventKind::Purchase
            },
            amount_minor: tierd::model::money::parse_minor(
                e["amount"].as_str().unwrap(),
                2,
                i64::MAX,
            )
            .unwrap(),
            occurred_at_ms: time::parse_rfc3339_ms(e["occurred_at"].as_str().unwrap()).unwrap(),
            pin: None,
        };
        let state = states.entry(event.customer_id.clone()).or_default();
        let now = event.occurred_at_ms;
        let applied = state.apply(&event, rules, policy, now, &Default::default());
        if let Applied::Counted(outcome) = applied {
            let Some(t) = outcome.transition else {
                continue;
            };
            changes.entry(event.customer_id.clone()).or_default().push((
                state.seq,
                t.previous,
                rules.tiers()[t.tier].name.clone(),
            ));
        }
    }
    (states, changes)
}

fn b2b_rules() -> Rules {
    Rules::load(
        std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/rules/b2b-lifetime.toml"
        )),
        2,
    )
    .unwrap()
}

#[test]
fn kill_9_repeatedly_loses_nothing_and_counts_everything_once() {
    kill_9_repeatedly("");
}

/// The same under the KIP-848 consumer group protocol (Kafka 4, broker-side assignment).
#[test]
fn kill_9_repeatedly_under_kip848_loses_nothing_and_counts_everything_once() {
    kill_9_repeatedly("\"group.protocol\" = \"consumer\"");
}

fn kill_9_repeatedly(consumer: &str) {
    let world = World::start(4);
    let events = stream(30_000, 3_000, 7);
    let (expected_states, expected_changes) = reference(&events, &b2b_rules());
    assert!(
        expected_states.len() > 2_900,
        "the stream covers the customers"
    );

    // Small batches so that many commits are in flight when the process dies.
    let extra = "[ingest]\nbatch_max_events = 200\n";
    let mut tierd = Tierd::spawn_with(&world, consumer, extra);
    // Produce in the background at a bounded rate while tierd is killed and restarted.
    let ends = std::thread::scope(|s| {
        let producer = s.spawn(|| {
            let mut ends = BTreeMap::new();
            // About 1000 events/s for ~30 s, so that every restart lands in a live stream.
            for chunk in events.chunks(1_000) {
                for (p, e) in world.produce_json(chunk) {
                    ends.insert(p, e);
                }
                std::thread::sleep(Duration::from_millis(800));
            }
            ends
        });
        let mut rng = StdRng::seed_from_u64(99);
        let mut kills = 0u32;
        let started = Instant::now();
        while kills < 4 || !producer.is_finished() {
            // Kill while it works: after it owns the partitions (a killed member's partitions
            // come back only after the session timeout) and has been processing for a while.
            tierd.wait_partitions(4, Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(rng.random_range(100..2000)));
            tierd.kill9();
            kills += 1;
            tierd = Tierd::spawn_with(&world, consumer, extra);
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "producer did not finish"
            );
        }
        eprintln!("killed tierd {kills} times");
        producer.join().unwrap()
    });
    world.wait_applied(&ends, Duration::from_secs(180));
    for p in 0..4 {
        assert!(
            world.partition_meta(p).0 >= 5,
            "partition {p} was claimed by every restarted instance"
        );
    }

    assert_exact(&world, &expected_states, &expected_changes);
}

/// Leader failover of a replicated cluster: 3 Apache Kafka nodes, every topic with
/// replication factor 3 and `min.insync.replicas = 2`. While events flow, the leader of an
/// input partition is killed (SIGKILL); once leadership has moved and the node is back in
/// every in-sync replica set, the leader of an output partition is killed the same way. tierd
/// rides through both. Final state equals the reference, every expected tier change is on the
/// output topic in per-customer order, and any duplicate is the identical record.
#[test]
fn leader_failover_on_a_replicated_cluster_loses_nothing_and_doubles_nothing() {
    let world = World::start_on(4, support::Redis::start(), support::Broker::cluster(3));
    let events = stream(12_000, 1_500, 11);
    let (expected_states, expected_changes) = reference(&events, &b2b_rules());
    assert!(
        expected_states.len() > 1_400,
        "the stream covers the customers"
    );
    let extra = "[ingest]\nbatch_max_events = 200\n";
    let tierd = Tierd::spawn(&world, extra);
    tierd.wait_partitions(4, Duration::from_secs(90));

    // Produce in the background, ~400 events a second, while leaders are killed.
    let produced = std::sync::atomic::AtomicUsize::new(0);
    let input = world.input.clone();
    let output = world.output.clone();
    let (ends, kills) = std::thread::scope(|s| {
        let producer = s.spawn(|| {
            let mut ends = BTreeMap::new();
            for chunk in events.chunks(400) {
                for (p, e) in world.produce_json(chunk) {
                    ends.insert(p, e);
                }
                produced.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(700));
            }
            ends
        });
        let wait_produced = |n: usize| {
            while produced.load(std::sync::atomic::Ordering::Relaxed) < n {
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let mut kills = Vec::new();
        for (after, topic, partition) in [(1_200, &input, 0), (0, &output, 1)] {
            wait_produced(after);
            let leader = world.broker.leader(topic, partition);
            assert!(
                !producer.is_finished(),
                "events must still flow when node {leader} dies"
            );
            eprintln!("killing node {leader}, leader of {topic}[{partition}]");
            world.broker.kill_node(leader);
            // Leadership moves to a surviving replica (the controller fences the dead node).
            let moved = world
                .broker
                .wait_leader_other_than(topic, partition, leader);
            eprintln!("{topic}[{partition}]: leader {leader} -> {moved}");
            std::thread::sleep(Duration::from_secs(1));
            world.broker.start_node(leader);
            world.broker.wait_full_isr(&[&input, &output]);
            kills.push((leader, moved));
        }
        (producer.join().unwrap(), kills)
    });
    assert_eq!(kills.len(), 2);
    world.wait_applied(&ends, Duration::from_secs(180));
    assert_exact(&world, &expected_states, &expected_changes);
}

/// After the stream: every customer's state equals the reference, every expected change was
/// published exactly once as expected, in per-customer order on every record.
fn assert_exact(
    world: &World,
    expected_states: &HashMap<String, CustomerState>,
    expected_changes: &Changes,
) {
    // Exact state per customer.
    for (customer, expected) in expected_states {
        let got = world
            .customer_state(customer)
            .unwrap_or_else(|| panic!("{customer} missing"));
        assert_eq!(
            (
                got.count,
                got.sum,
                got.refunds,
                got.refunded,
                got.first,
                got.last,
                &got.tier,
                got.seq
            ),
            (
                expected.count,
                expected.sum,
                expected.refunds,
                expected.refunded,
                expected.first,
                expected.last,
                &expected.tier,
                expected.seq
            ),
            "{customer}"
        );
    }

    // Every expected change published exactly once, and per-customer order on every record as
    // a read_committed consumer reads the topic: each publish transaction commits its outbox
    // position with its records, so a crash between Kafka commit and trim re-publishes nothing,
    // and a crashed owner's open transaction is aborted by the next owner's producer.
    let records = world.read_all(&world.output);
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    let mut first_seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut sorted = records.clone();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in &sorted {
        let v = r.json();
        let id = v["event_id"].as_str().unwrap().to_owned();
        assert!(
            !by_id.contains_key(&id),
            "change {id} published twice: {v} (partition {} offset {})",
            r.partition,
            r.offset
        );
        let seqs = first_seen
            .entry(v["customer_id"].as_str().unwrap().to_owned())
            .or_default();
        let seq = v["sequence"].as_u64().unwrap();
        assert!(
            seqs.last().is_none_or(|last| *last < seq),
            "{}: sequence {seq} after {seqs:?} (partition {} offset {})",
            v["customer_id"],
            r.partition,
            r.offset
        );
        seqs.push(seq);
        by_id.insert(id, v);
    }
    let expected_total: usize = expected_changes.values().map(Vec::len).sum();
    assert_eq!(by_id.len(), expected_total, "distinct changes published");
    for (customer, changes) in expected_changes {
        let seqs: Vec<u64> = changes.iter().map(|c| c.0).collect();
        assert_eq!(
            first_seen.get(customer),
            Some(&seqs),
            "{customer}: changes in order, none missing"
        );
        for (seq, previous, tier) in changes {
            let v = &by_id[&tierd::model::change::change_id(customer, *seq)];
            assert_eq!(
                (v["previous_tier"].as_str(), v["tier"].as_str()),
                (previous.as_deref(), Some(tier.as_str())),
                "{customer} #{seq}"
            );
        }
    }
    eprintln!(
        "published {} records for {} distinct changes, none twice",
        records.len(),
        by_id.len()
    );
}
