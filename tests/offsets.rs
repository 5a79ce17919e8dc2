//! A partition whose stored offset its log no longer holds (issue 11, item 10): records
//! deleted before tierd applied them, or a topic deleted and recreated. tierd must stop that
//! partition with a clear reason — never skip the gap silently, never loop between a reset and a
//! re-claim — and keep processing the others.

mod support;

use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};
use support::{purchase, Tierd, World};

/// Waits until `tierd` reports `n` partitions assigned but not processed; returns `/readyz`.
fn wait_stopped(tierd: &Tierd, n: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_partitions_stopped") < n {
        assert!(
            Instant::now() < deadline,
            "no partition reported stopped:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = tierd.get("/readyz");
    assert_eq!(status, 503, "{body}");
    body
}

#[test]
fn records_deleted_before_they_were_applied_stop_the_partition() {
    let world = World::start(2);
    let [a, b]: [String; 2] = world.customer_per_partition().try_into().unwrap();
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(2, Duration::from_secs(60));
    let ends = world.produce_json(&[purchase("a1", &a, "100", "2026-11-01T10:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));
    let (_, stored) = world.partition_meta(0);

    // While tierd is down, three more purchases of `a`, then retention deletes two of them.
    let ends = world.produce_json(&[
        purchase("a2", &a, "100", "2026-11-01T11:00:00Z"),
        purchase("a3", &a, "100", "2026-11-01T12:00:00Z"),
        purchase("a4", &a, "100", "2026-11-01T13:00:00Z"),
    ]);
    let end = ends[&0];
    let (admin, rt) = world.broker.admin();
    let mut upto = TopicPartitionList::new();
    upto.add_partition_offset(&world.input, 0, Offset::Offset(end - 1))
        .unwrap();
    rt.block_on(admin.delete_records(&upto, &AdminOptions::new()))
        .unwrap();

    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(2, Duration::from_secs(60));
    let body = wait_stopped(&tierd, 1.0);
    assert!(
        body.contains("partition 0")
            && body.contains(&format!("offsets {stored} to {} were deleted", end - 2)),
        "{body}"
    );
    // Nothing after the gap was applied (before: a4 was counted with a warning)...
    std::thread::sleep(Duration::from_secs(2));
    let s = world.customer_state(&a).unwrap();
    assert_eq!(s.count, 1, "a1 only: {s:?}");
    assert_eq!(world.partition_meta(0).1, stored);
    // ...and the other partition goes on.
    let ends = world.produce_json(&[purchase("b1", &b, "100", "2026-11-01T10:00:00Z")]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.partition_meta(1).1 < ends[&1] {
        assert!(Instant::now() < deadline, "{}", tierd.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stored_offset_beyond_a_recreated_topics_end_stops_the_partition() {
    let world = World::start(1);
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let events: Vec<serde_json::Value> = (0..5)
        .map(|i| purchase(&format!("e{i}"), "ann", "100", "2026-11-01T10:00:00Z"))
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));

    // The input topic is deleted and created again; two new records.
    let (admin, rt) = world.broker.admin();
    rt.block_on(admin.delete_topics(&[&world.input], &AdminOptions::new()))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let topic = NewTopic::new(&world.input, 1, TopicReplication::Fixed(1));
        let created = rt
            .block_on(admin.create_topics(&[topic], &AdminOptions::new()))
            .unwrap();
        if created.iter().all(Result::is_ok) {
            break;
        }
        assert!(Instant::now() < deadline, "recreating failed: {created:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    world.broker.create_topics(&[&world.input], 1);
    world.produce_json(&[
        purchase("n1", "ann", "100", "2026-11-02T10:00:00Z"),
        purchase("n2", "ann", "100", "2026-11-02T11:00:00Z"),
    ]);

    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let body = wait_stopped(&tierd, 1.0);
    assert!(
        body.contains("offset 5 is beyond the end of the partition's log (2)"),
        "{body}"
    );
    // No loop of resets and re-claims (before: the epoch climbed with every DIVERGED commit).
    let (epoch, _) = world.partition_meta(0);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        world.partition_meta(0),
        (epoch, 5),
        "stored offset and epoch unchanged"
    );
    assert_eq!(world.customer_state("ann").unwrap().count, 5);
}
