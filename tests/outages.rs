//! Outages of the components tierd depends on: the broker or Redis is killed (SIGKILL) and
//! restarted while events flow. tierd reconnects by itself and every event still counts once.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;
use support::{purchase, Broker, Redis, Tierd, World};

/// Purchases of 10.00 spread over 100 customers, ids `e{from}`…, one second apart (so the
/// bounded per-customer id memory never has to refuse one as too late).
fn events(from: usize, to: usize) -> Vec<serde_json::Value> {
    let base = tierd::model::time::parse_rfc3339_ms("2026-11-10T00:00:00Z").unwrap();
    (from..to)
        .map(|i| {
            let at = tierd::model::time::format_ms(base + i as i64 * 1000);
            purchase(&format!("e{i}"), &format!("c{}", i % 100), "10.00", &at)
        })
        .collect()
}

fn merge(into: &mut BTreeMap<i32, i64>, ends: BTreeMap<i32, i64>) {
    for (p, e) in ends {
        let v = into.entry(p).or_insert(0);
        *v = (*v).max(e);
    }
}

fn assert_each_counted_once(world: &World, per_customer: u64) {
    for c in 0..100 {
        let s = world.customer_state(&format!("c{c}")).unwrap();
        assert_eq!(
            (s.count, s.sum),
            (per_customer, i128::from(per_customer as i32) * 1000),
            "c{c}"
        );
    }
}

#[test]
fn broker_killed_and_restarted_mid_stream_loses_nothing() {
    // A broker of its own (the shared one must not be killed); restarted on its log directory.
    let world = World::start_on(4, Redis::start(), Broker::start());
    // A backlog first: 30k events waiting before tierd starts, applied 100 at a time.
    let mut ends = BTreeMap::new();
    merge(&mut ends, world.produce_json(&events(0, 30_000)));
    let tierd = Tierd::spawn(&world, "[ingest]\nbatch_max_events = 100\n");
    let applied = |world: &World| -> i64 { (0..4).map(|p| world.partition_meta(p).1.max(0)).sum() };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while applied(&world) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "tierd applied nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Kill the broker while tierd is still working through the backlog.
    let at_kill = applied(&world);
    assert!(
        at_kill < 30_000,
        "the kill must land in the backlog ({at_kill} applied)"
    );
    world.broker.restart();
    merge(&mut ends, world.produce_json(&events(30_000, 40_000)));
    world.wait_applied(&ends, Duration::from_secs(180));
    assert_each_counted_once(&world, 400);
    assert_eq!(world.read_all(&world.dlq).len(), 0);
    assert_eq!(tierd.metric("tierd_partitions_assigned") as i64, 4);
}

#[test]
fn redis_killed_and_restarted_mid_stream_loses_nothing() {
    let mut world = World::start_with(4, Redis::start_persistent());
    let tierd = Tierd::spawn(&world, "[ingest]\nbatch_max_events = 100\n");
    tierd.wait_partitions(4, Duration::from_secs(60));
    let mut ends = BTreeMap::new();
    merge(&mut ends, world.produce_json(&events(0, 10_000)));
    // Redis dies while commits are in flight; acknowledged writes survive in its AOF.
    world.redis.restart_persistent();
    merge(&mut ends, world.produce_json(&events(10_000, 20_000)));
    world.wait_applied(&ends, Duration::from_secs(180));
    assert_each_counted_once(&world, 200);
    assert_eq!(world.read_all(&world.dlq).len(), 0);
    let failed_calls =
        tierd.metric("tierd_redis_errors_total") + tierd.metric("tierd_publish_errors_total");
    assert!(failed_calls > 0.0, "the outage hit tierd while it worked");
    assert!(
        tierd.metric("tierd_partitions_assigned") as i64 == 4,
        "still owns its partitions"
    );
}
