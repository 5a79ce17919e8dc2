//! Crash safety: `kill -9` tierd repeatedly while tens of thousands of events flow (with
//! re-sent duplicates). After the last restart every customer's state equals the reference
//! exactly, and every expected tier change is on the output topic exactly once, each
//! customer's changes in order on every record a read_committed consumer reads.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::exact::{assert_exact, b2b_rules, reference, stream};
use support::{Redis, Tierd, World};

#[test]
fn kill_9_repeatedly_loses_nothing_and_counts_everything_once() {
    kill_9_repeatedly("", World::start(4));
}

/// The same under the KIP-848 consumer group protocol (Kafka 4, broker-side assignment).
#[test]
fn kill_9_repeatedly_under_kip848_loses_nothing_and_counts_everything_once() {
    kill_9_repeatedly("\"group.protocol\" = \"consumer\"", World::start(4));
}

/// The same on a Redis Cluster (3 masters, 3 replicas) over 8 partitions, whose keys the
/// cluster spreads over its masters.
#[test]
fn kill_9_repeatedly_on_a_redis_cluster_loses_nothing_and_counts_everything_once() {
    let world = World::start_with(8, Redis::start_cluster());
    kill_9_repeatedly("", world);
}

fn kill_9_repeatedly(consumer: &str, world: World) {
    let partitions = world.partitions;
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
            tierd.wait_partitions(i64::from(partitions), Duration::from_secs(60));
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
    for p in 0..partitions {
        assert!(
            world.partition_meta(p).0 >= 5,
            "partition {p} was claimed by every restarted instance"
        );
    }

    assert_exact(&world, &expected_states, &expected_changes);
    if !world.redis.nodes().is_empty() {
        let masters = world.redis.masters_holding(&format!("{}:*", world.prefix));
        assert!(
            masters >= 2,
            "the partitions' keys are on {masters} master(s)"
        );
    }
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
    if !world.redis.nodes().is_empty() {
        let masters = world.redis.masters_holding(&format!("{}:*", world.prefix));
        assert!(
            masters >= 2,
            "the partitions' keys are on {masters} master(s)"
        );
    }
}
