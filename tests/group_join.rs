//! Group membership on Apache Kafka with tierd's default session settings, under both group
//! protocols (issue 11, item 15): a `kill -9` followed by an immediate restart (what a
//! supervisor does), a kill in the middle of the group join, and one of two instances killed.
//! Each time the survivors own every partition within the session timeout plus a rebalance,
//! and every event still counts once. (The stand-in broker this project once tested against
//! wedged here: the dead member stayed leader and nobody got a partition again.)

mod support;

use std::time::{Duration, Instant};
use support::kafka_proxy::{self, KafkaProxy};
use support::{purchase, Broker, Redis, Tierd, World};

/// Classic protocol: tierd's `session.timeout.ms` default.
const CLASSIC: (&str, u64) = ("", 10);
/// KIP-848: the broker's `group.consumer.session.timeout.ms` default.
const KIP848: (&str, u64) = ("\"group.protocol\" = \"consumer\"", 45);

/// Apache Kafka's own defaults for KIP-848 group timing (the shared test broker shortens
/// them; later keys win over `scripts/kafka/broker.sh`'s).
const KAFKA_GROUP_DEFAULTS: &str = "group.consumer.session.timeout.ms=45000\ngroup.consumer.min.session.timeout.ms=45000\ngroup.consumer.heartbeat.interval.ms=5000\ngroup.consumer.min.heartbeat.interval.ms=5000\n";

/// The session timeout plus time for one rebalance and the claims.
fn within(session_s: u64) -> Duration {
    Duration::from_secs(session_s + 30)
}

/// Four partitions; tierd runs with its default session settings, and under KIP-848 on a
/// broker of its own with Kafka's default group timing.
fn world(consumer: &str) -> World {
    let mut world = if consumer.contains("group.protocol") {
        World::start_on(
            4,
            Redis::start(),
            Broker::start_with(KAFKA_GROUP_DEFAULTS, &[]),
        )
    } else {
        World::start(4)
    };
    world.default_sessions = true;
    world
}

/// `n` purchases of 1.00 over 100 customers, ids from `from`, distinct times.
fn purchases(world: &World, from: usize, n: usize) -> std::collections::BTreeMap<i32, i64> {
    let base = tierd::model::time::parse_rfc3339_ms("2026-11-10T00:00:00Z").unwrap();
    let events: Vec<serde_json::Value> = (from..from + n)
        .map(|i| {
            let at = tierd::model::time::format_ms(base + i as i64 * 1000);
            purchase(&format!("e{i}"), &format!("c{}", i % 100), "1.00", &at)
        })
        .collect();
    world.produce_json(&events)
}

fn assert_counted_once(world: &World, per_customer: u64) {
    for c in 0..100 {
        let s = world.customer_state(&format!("c{c}")).unwrap();
        assert_eq!(s.count, per_customer, "c{c}");
    }
}

/// Waits until `tierd` owns all four partitions; returns how long it took.
fn owns_all(tierd: &Tierd, since: Instant, session_s: u64) -> Duration {
    tierd.wait_partitions(4, within(session_s));
    let took = since.elapsed();
    eprintln!("all 4 partitions owned {took:?} after the kill");
    took
}

fn restart_at_once((consumer, session): (&str, u64)) {
    let world = world(consumer);
    let mut first = Tierd::spawn_with(&world, consumer, "");
    first.wait_partitions(4, Duration::from_secs(120));
    world.wait_applied(&purchases(&world, 0, 400), Duration::from_secs(60));
    first.kill9();
    let killed = Instant::now();
    let second = Tierd::spawn_with(&world, consumer, "");
    owns_all(&second, killed, session);
    world.wait_applied(&purchases(&world, 400, 400), Duration::from_secs(60));
    assert_counted_once(&world, 8);
}

/// The first instance is killed in the middle of its join: the coordinator's answer that ends
/// it (classic: SyncGroup; KIP-848: the joining heartbeat) is held back by a proxy, so the
/// coordinator holds the member while it never learns its assignment.
fn kill_during_the_join((consumer, session): (&str, u64)) {
    let kip848 = consumer.contains("group.protocol");
    let (proxy, broker) =
        KafkaProxy::with_broker_props(if kip848 { KAFKA_GROUP_DEFAULTS } else { "" });
    let mut world = World::start_on(4, Redis::start(), broker);
    world.default_sessions = true;
    let ends = purchases(&world, 0, 400);
    let join_answer = if kip848 {
        kafka_proxy::CONSUMER_GROUP_HEARTBEAT
    } else {
        kafka_proxy::SYNC_GROUP
    };
    proxy.hold_client(join_answer, "first", 0);
    let mut first = Tierd::spawn_with(
        &world,
        &format!("{consumer}\n\"client.id\" = \"first\"\n"),
        "",
    );
    proxy.wait_held("first", || first.log_text());
    first.kill9();
    let killed = Instant::now();
    proxy.release();
    assert!(
        !first.log_text().contains("Partition assigned"),
        "{}",
        first.log_text()
    );
    let second = Tierd::spawn_with(&world, consumer, "");
    owns_all(&second, killed, session);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_counted_once(&world, 4);
}

fn one_of_two_killed((consumer, session): (&str, u64)) {
    let world = world(consumer);
    let mut a = Tierd::spawn_with(&world, consumer, "");
    a.wait_partitions(4, Duration::from_secs(120));
    let b = Tierd::spawn_with(&world, consumer, "");
    b.wait_partitions(2, within(session));
    a.wait_partitions(2, within(session));
    world.wait_applied(&purchases(&world, 0, 400), Duration::from_secs(60));
    a.kill9();
    let killed = Instant::now();
    owns_all(&b, killed, session);
    world.wait_applied(&purchases(&world, 400, 400), Duration::from_secs(60));
    assert_counted_once(&world, 8);
}

#[test]
fn classic_restart_at_once_after_kill_9() {
    restart_at_once(CLASSIC);
}

#[test]
fn kip848_restart_at_once_after_kill_9() {
    restart_at_once(KIP848);
}

#[test]
fn classic_kill_during_the_join() {
    kill_during_the_join(CLASSIC);
}

#[test]
fn kip848_kill_during_the_join() {
    kill_during_the_join(KIP848);
}

#[test]
fn classic_one_of_two_instances_killed() {
    one_of_two_killed(CLASSIC);
}

#[test]
fn kip848_one_of_two_instances_killed() {
    one_of_two_killed(KIP848);
}

/// A member of tierd's group that holds the input's only partition and never processes it
/// (what a wedged or stuck member looks like from the outside). An instance that owns nothing
/// meanwhile must say so loudly (metric, log, `/readyz/ingest` reason), not look merely idle — and
/// must not cry wolf once everything is applied, although a transactional producer's log ends
/// with a commit marker that no consumer ever receives (the stored offset then stays one below
/// the log end for good).
#[test]
fn an_idle_instance_says_loudly_when_the_group_leaves_partitions_unprocessed() {
    let world = World::start(1);
    let holder = support::GroupHolder::join(&world);

    let tierd = Tierd::spawn(&world, "[ingest]\nstall_alarm_s = 5\n");
    // Purchases in one transaction: the log ends with its commit marker.
    let base = tierd::model::time::parse_rfc3339_ms("2026-11-10T00:00:00Z").unwrap();
    let events: Vec<serde_json::Value> = (0..10)
        .map(|i| {
            let at = tierd::model::time::format_ms(base + i * 1000);
            purchase(&format!("e{i}"), &format!("c{i}"), "1.00", &at)
        })
        .collect();
    world.produce_in_transaction(&events);

    // Held elsewhere and not processed: the idle instance raises the alarm.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = tierd.get("/readyz/ingest");
        if tierd.metric("tierd_input_partitions_stalled") == 1.0
            && status == 503
            && body.contains("owns no partition while partitions [0] have records waiting")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no stall alarm: /readyz {status} {body:?}; log:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(tierd.metric("tierd_partitions_assigned"), 0.0);
    assert!(tierd.log_text().contains("Input partitions stalled."));
    // The holder leaves: tierd takes the partition over, applies it, and the alarm clears
    // for good although the stored offset stays below the log end (the commit marker).
    holder.leave();
    tierd.wait_partitions(1, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.customer_state("c9").is_none_or(|s| s.count != 1) {
        assert!(
            Instant::now() < deadline,
            "not applied; log:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        world.partition_meta(0).1,
        10,
        "ten records applied; the marker at 10 is never delivered"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while tierd.metric("tierd_input_partitions_stalled") != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the alarm did not clear; log:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Well past the alarm time with the offset standing still.
    let quiet_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < quiet_until {
        assert_eq!(
            tierd.metric("tierd_input_partitions_stalled"),
            0.0,
            "a false alarm on a fully applied partition; log:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(tierd.get("/readyz/ingest").0, 200);
    // The probe (which read up to the end of the partition meanwhile) and the consumer
    // report the partition's end: expected, never logged as errors.
    let log = tierd.log_text();
    assert!(!log.contains("PartitionEOF"), "{log}");
}
