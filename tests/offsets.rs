//! A partition whose stored offset its log no longer holds (issue 11, item 10): records
//! deleted before tierd applied them, or a topic deleted and recreated. tierd must stop that
//! partition with a clear reason — never skip the gap silently, never loop between a reset and a
//! re-claim — and keep processing the others.

mod support;

use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};
use support::{purchase, unique, Broker, Redis, Tierd, World};

/// Waits until `tierd` reports `n` partitions assigned but not processed; returns `/readyz/ingest`.
fn wait_stopped(tierd: &Tierd, n: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    while tierd.metric("tierd_partitions_stopped") < n {
        assert!(
            Instant::now() < deadline,
            "no partition reported stopped:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = tierd.get("/readyz/ingest");
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
    let world = five_purchases_applied();

    // The input topic is deleted and created again; two new records.
    recreate_input(&world);
    world.produce_json(&[
        purchase("n1", "ann", "100", "2026-11-02T10:00:00Z"),
        purchase("n2", "ann", "100", "2026-11-02T11:00:00Z"),
    ]);

    // The claim tells the new topic by its id.
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let body = wait_stopped(&tierd, 1.0);
    assert!(
        body.contains("the input topic was deleted and created again since offset 5"),
        "{body}"
    );
    assert_eq!(tierd.terminate(), Some(0));

    // Without the id (the offset stored by an older tierd, which did not pair it), the log
    // end tells: the offset is beyond it.
    let _: () = redis::cmd("HDEL")
        .arg(&world.keys(0).meta)
        .arg("offset_topic")
        .query(&mut world.redis.conn())
        .unwrap();
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

/// A one-partition world where tierd applied five purchases of `ann` (stored offset 5) and
/// stopped.
fn five_purchases_applied() -> World {
    let world = World::start(1);
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let events: Vec<serde_json::Value> = (0..5)
        .map(|i| purchase(&format!("e{i}"), "ann", "100", "2026-11-01T10:00:00Z"))
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));
    world
}

/// Deletes the (one-partition) input topic and creates it again under the same name.
fn recreate_input(world: &World) {
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
}

/// The recreated topic is refilled past the stored offset before tierd starts again. Both
/// logs are at leader epoch 0, so the leader-epoch validation accepts the start (before the
/// topic id was paired with the stored offset, tierd read offsets 5–7 of the new topic as if
/// they followed what it had applied, and skipped 0–4). The claim sees the new topic id and
/// leaves the partition stopped; the documented way out (move the stored offset) resumes it.
#[test]
fn a_stored_offset_inside_a_recreated_and_refilled_topic_stops_the_partition() {
    let world = five_purchases_applied();

    recreate_input(&world);
    let refill: Vec<serde_json::Value> = (0..8)
        .map(|i| purchase(&format!("n{i}"), "ann", "100", "2026-11-02T10:00:00Z"))
        .collect();
    let ends = world.produce_json(&refill);
    assert_eq!(ends[&0], 8);

    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let body = wait_stopped(&tierd, 1.0);
    assert!(
        body.contains("partition 0")
            && body.contains(
                "the input topic was deleted and created again since offset 5 was stored"
            ),
        "{body}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        world.partition_meta(0).1,
        5,
        "nothing read from the new topic"
    );
    assert_eq!(world.customer_state("ann").unwrap().count, 5);
    assert_eq!(tierd.terminate(), Some(0));

    // The operator accepts the new topic from its beginning (README "Operating notes").
    let _: () = redis::cmd("HSET")
        .arg(&world.keys(0).meta)
        .arg("next_offset")
        .arg(0)
        .query(&mut world.redis.conn())
        .unwrap();
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(world.customer_state("ann").unwrap().count, 13);
    assert_eq!(tierd.metric("tierd_partitions_stopped"), 0.0);
}

/// A world on a 3-node cluster whose input partition lives on nodes 1 (its leader) and 2 only,
/// with unclean leader elections allowed (node 3 keeps the controller quorum).
fn unclean_world() -> World {
    let mut world = World::start_on(1, Redis::start(), Broker::cluster(3));
    world.input = unique("purchases");
    world.broker.create_topics_on(
        &[&world.input],
        &[&[1, 2]],
        &[
            ("min.insync.replicas", "1"),
            ("unclean.leader.election.enable", "true"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.broker.leader(&world.input, 0) != 1 {
        assert!(Instant::now() < deadline, "node 1 did not lead the input");
        std::thread::sleep(Duration::from_millis(200));
    }
    world
}

fn purchases(prefix: &str, n: usize, at: &str) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| purchase(&format!("{prefix}{i}"), "ann", "100", at))
        .collect()
}

/// Node 2 dies and leaves the in-sync replicas; four purchases land on node 1 alone.
fn write_to_the_leader_alone(world: &World) -> std::collections::BTreeMap<i32, i64> {
    world.broker.kill_node(2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.broker.isr(&world.input, 0) != [1] {
        assert!(Instant::now() < deadline, "node 2 did not leave the ISR");
        std::thread::sleep(Duration::from_millis(200));
    }
    world.produce_json(&purchases("lost", 4, "2026-11-01T11:00:00Z"))
}

/// Node 1 dies and node 2 comes back: the controller elects node 2 uncleanly, and its log
/// ends before the four purchases only node 1 held. Six new purchases follow, so the log
/// grows past the offset tierd applied: offsets 3–6 now hold other records.
fn elect_uncleanly(world: &World) {
    world.broker.kill_node(1);
    world.broker.start_node(2);
    world.broker.wait_leader_other_than(&world.input, 0, 1);
    let ends = world.produce_json(&purchases("new", 6, "2026-11-02T10:00:00Z"));
    assert_eq!(ends[&0], 9, "node 2's log: 3 old and 6 new records");
}

/// Checks that `tierd` stopped `partition` for the truncation and read nothing past it: the
/// stored offset stays 7 and `customer` counts the 7 purchases applied before.
fn stopped_at_the_truncation(world: &World, tierd: &Tierd, partition: i32, customer: &str) {
    let body = wait_stopped(tierd, 1.0);
    assert!(
        body.contains(&format!("partition {partition}"))
            && body.contains("librdkafka stopped fetching it"),
        "{body}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        world.partition_meta(partition).1,
        7,
        "nothing read past the truncation"
    );
    assert_eq!(world.customer_state(customer).unwrap().count, 7);
}

/// An unclean leader election truncates the log under a running tierd, and the new leader's
/// log grows past tierd's position before tierd fetches again (here: tierd stopped with
/// SIGSTOP meanwhile), so the log bounds do not explain the error: librdkafka detects the
/// truncation by the leader epoch, and the partition stops with a clear reason instead of
/// reading offsets 7 and 8 as if they followed what it applied.
#[test]
fn an_unclean_election_under_a_running_tierd_stops_the_partition() {
    let world = unclean_world();
    // A session that outlives the SIGSTOP: the partition stays with this instance.
    let tierd = Tierd::spawn_with(&world, "\"session.timeout.ms\" = \"120000\"\n", "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let kept = world.produce_json(&purchases("kept", 3, "2026-11-01T10:00:00Z"));
    world.wait_applied(&kept, Duration::from_secs(60));
    let lost = write_to_the_leader_alone(&world);
    world.wait_applied(&lost, Duration::from_secs(60));
    assert_eq!(world.partition_meta(0).1, 7);

    tierd.signal("-STOP");
    elect_uncleanly(&world);
    tierd.signal("-CONT");

    stopped_at_the_truncation(&world, &tierd, 0, "ann");
}

/// The same election while no instance owns the partition: tierd starts on the stored offset
/// 7, which the new leader's log holds with other records. The stored leader epoch lets
/// librdkafka see that offset 7 is not where the applied records ended; without it, tierd
/// would read offsets 7 and 8 as the continuation.
#[test]
fn an_unclean_election_while_tierd_is_down_stops_the_partition() {
    let world = unclean_world();
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let kept = world.produce_json(&purchases("kept", 3, "2026-11-01T10:00:00Z"));
    world.wait_applied(&kept, Duration::from_secs(60));
    let lost = write_to_the_leader_alone(&world);
    world.wait_applied(&lost, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));

    elect_uncleanly(&world);
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    stopped_at_the_truncation(&world, &tierd, 0, "ann");
}

/// The stored leader epoch counts only with the offset it was stored with. An operator who
/// moves the stored offset by hand (README "Operating notes"), or an older tierd that commits
/// without the epoch, leaves an epoch from before: paired with the moved offset, librdkafka
/// would see a start beyond that epoch's end and report a truncation that did not happen,
/// stopping a healthy partition for good.
#[test]
fn a_stored_offset_moved_by_hand_is_not_taken_for_a_truncation() {
    let world = unclean_world();
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let kept = world.produce_json(&purchases("kept", 3, "2026-11-01T10:00:00Z"));
    world.wait_applied(&kept, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));

    // A clean leader change (node 2 is in sync): a new leader epoch from offset 3 on.
    world.broker.kill_node(1);
    world.broker.wait_leader_other_than(&world.input, 0, 1);
    let ends = world.produce_json(&purchases("later", 4, "2026-11-02T10:00:00Z"));
    assert_eq!(ends[&0], 7);
    // The operator skips offsets 3 and 4.
    let _: () = redis::cmd("HSET")
        .arg(world.keys(0).meta)
        .arg("next_offset")
        .arg(5)
        .query(&mut world.redis.conn())
        .unwrap();

    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.partition_meta(0).1 < 7 {
        assert!(
            Instant::now() < deadline,
            "offsets 5 and 6 not applied (readyz: {:?}):\n{}",
            tierd.get("/readyz/ingest"),
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tierd.metric("tierd_partitions_stopped"), 0.0);
    assert_eq!(world.customer_state("ann").unwrap().count, 5, "3 kept + 2");
}

/// Events of `partition` applied by `tierd` (0 if it never applied any).
fn applied_on(tierd: &Tierd, partition: i32) -> f64 {
    let label = format!("partition=\"{partition}\"");
    tierd
        .get("/metrics")
        .1
        .lines()
        .filter(|l| l.starts_with("tierd_events_applied_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A start handed over while librdkafka defers the fetch start of a new assignment (here: an
/// offset commit in flight, which the taking-over instance has almost always with
/// `kafka_commit_interval_ms = 0`) is validated all the same. librdkafka refuses a seek
/// (`__STATE`) until the fetch has started, so a seek issued once, right after the
/// assignment, would be lost and the partition would start unvalidated: it would read
/// offsets 7 and 8 of the uncleanly elected leader as the continuation of what it applied.
#[test]
fn a_start_deferred_by_an_offset_commit_is_still_validated() {
    let mut world = World::start_on(2, Redis::start(), Broker::cluster(3));
    world.input = unique("purchases");
    // Partition 0 led by node 3 (it keeps its leader), partition 1 on nodes 1 and 2.
    world.broker.create_topics_on(
        &[&world.input],
        &[&[3, 1], &[1, 2]],
        &[
            ("min.insync.replicas", "1"),
            ("unclean.leader.election.enable", "true"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.broker.leader(&world.input, 1) != 1 {
        assert!(Instant::now() < deadline, "node 1 did not lead partition 1");
        std::thread::sleep(Duration::from_millis(200));
    }
    let [a, b]: [String; 2] = world.customer_per_partition().try_into().unwrap();
    let of = |prefix: &str, n: usize, at: &str| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| purchase(&format!("{prefix}{i}"), &b, "100", at))
            .collect()
    };
    // Sessions that outlast the election below; commits all the time.
    let consumer = "\"session.timeout.ms\" = \"25000\"\n";
    let extra = "[ingest]\nkafka_commit_interval_ms = 0\n";
    let first = Tierd::spawn_with(&world, consumer, extra);
    first.wait_partitions(2, Duration::from_secs(60));
    let second = Tierd::spawn_with(&world, consumer, extra);
    second.wait_partitions(1, Duration::from_secs(60));
    first.wait_partitions(1, Duration::from_secs(60));
    let ends = world.produce_json(&[purchase("a0", &a, "100", "2026-11-01T10:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let kept = world.produce_json(&of("kept", 3, "2026-11-01T10:00:00Z"));
    world.wait_applied(&kept, Duration::from_secs(60));
    let (owner, taker) = if applied_on(&first, 1) > 0.0 {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(applied_on(&owner, 1), 3.0);

    // Four purchases on node 1 alone, applied by the owner (stored: offset 7, epoch 0).
    world.broker.kill_node(2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.broker.isr(&world.input, 1) != [1] {
        assert!(Instant::now() < deadline, "node 2 did not leave the ISR");
        std::thread::sleep(Duration::from_millis(200));
    }
    let lost = world.produce_json(&of("lost", 4, "2026-11-01T11:00:00Z"));
    world.wait_applied(&lost, Duration::from_secs(60));
    assert_eq!(world.partition_meta(1).1, 7);

    // The owner dies; node 2 is elected uncleanly and its log grows past offset 7 before
    // the owner's session expires and the group hands partition 1 to the other instance.
    owner.signal("-KILL");
    world.broker.kill_node(1);
    world.broker.start_node(2);
    world.broker.wait_leader_other_than(&world.input, 1, 1);
    let ends = world.produce_json(&of("new", 6, "2026-11-02T10:00:00Z"));
    assert_eq!(ends[&1], 9, "node 2's log: 3 old and 6 new records");

    stopped_at_the_truncation(&world, &taker, 1, &b);
    drop(owner);
}

/// A seek librdkafka keeps refusing does not leave a newly claimed partition paused while it
/// looks owned: after `ingest.seek_deadline_s` it is stopped (`tierd_partitions_stopped`, the
/// reason on `/readyz/ingest`) and claimed again 3 s later, and once librdkafka accepts the seek it
/// is processed from the offset stored in Redis, nothing lost or counted twice.
///
/// librdkafka refuses the seek (`__STATE`) while it defers a new assignment's fetch start,
/// which it does while an offset commit of the consumer is unanswered. The broker's answers
/// to offset commits are held back here by a proxy in front of its listener (everything else
/// passes), while the instance that takes the partition over has its commit in flight. (Under
/// the cooperative assignor tierd uses, gaining a partition needs no unassign, which would
/// wait for the commit too.)
#[test]
fn a_seek_refused_past_its_deadline_stops_the_partition_until_it_is_accepted() {
    let (proxy, broker) = support::kafka_proxy::KafkaProxy::with_broker();
    let world = World::start_on(2, Redis::start(), broker);
    let [a, b]: [String; 2] = world.customer_per_partition().try_into().unwrap();
    // The tests' 6 s sessions: the group hands the dead owner's partition over within seconds.
    // Commits all the time, so the taker always has one in flight; held back longer than
    // librdkafka's default request timeout (60 s) would let it wait.
    let consumer = "\"socket.timeout.ms\" = \"300000\"\n";
    let named = |id: &str| format!("{consumer}\"client.id\" = \"{id}\"\n");
    let extra = "[ingest]\nkafka_commit_interval_ms = 0\nseek_deadline_s = 5\n";
    let first = Tierd::spawn_with(&world, &named("first"), extra);
    first.wait_partitions(2, Duration::from_secs(60));
    let second = Tierd::spawn_with(&world, &named("second"), extra);
    second.wait_partitions(1, Duration::from_secs(60));
    first.wait_partitions(1, Duration::from_secs(60));
    let ends = world.produce_json(&[
        purchase("a0", &a, "100", "2026-11-01T10:00:00Z"),
        purchase("b0", &b, "100", "2026-11-01T10:00:00Z"),
    ]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let (owner, taker, taker_id) = if applied_on(&first, 1) > 0.0 {
        (first, second, "second")
    } else {
        (second, first, "first")
    };

    // The taker's next offset commit goes unanswered; then partition 1's owner dies.
    proxy.hold_commits();
    proxy.wait_held(taker_id, || taker.log_text());
    owner.signal("-KILL");
    let more = world.produce_json(&[
        purchase("b1", &b, "100", "2026-11-02T10:00:00Z"),
        purchase("b2", &b, "100", "2026-11-03T10:00:00Z"),
    ]);

    // Claimed, refused its seek past the deadline: stopped, visibly, with the reason.
    let body = wait_stopped(&taker, 1.0);
    assert!(
        body.contains(
            "partition 1: assigned but not processed: seeking to the offset stored in Redis failed"
        ) && body.contains("Erroneous state"),
        "not stopped by the deadline on librdkafka's `__STATE` refusal: {body}"
    );
    assert_eq!(
        world.partition_meta(1).1,
        1,
        "nothing of partition 1 applied while its seek is refused"
    );
    assert!(
        taker.log_text().contains("Seek deferred"),
        "the seek was not deferred:\n{}",
        taker.log_text()
    );

    // The commit answered: claimed again, sought, processed from the stored offset.
    proxy.release();
    world.wait_applied_by(&taker, &more, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(30);
    while taker.metric("tierd_partitions_stopped") > 0.0 || taker.get("/readyz/ingest").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "partition 1 still shown stopped: {:?}",
            taker.get("/readyz/ingest")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        world.customer_state(&b).unwrap().count,
        3,
        "b0, b1, b2 once each"
    );
    assert_eq!(world.customer_state(&a).unwrap().count, 1);
    assert_eq!(
        taker.metric_labeled("tierd_events_deduplicated_total", "partition=\"1\""),
        0.0,
        "partition 1 read again from before the stored offset"
    );
    drop(owner);
}

/// Waits until the group's committed offsets of the input's partitions equal `want`
/// (partition order).
fn wait_committed(world: &World, want: &[i64]) {
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let reader: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &world.broker.addr)
        .set("group.id", &world.group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..want.len() as i32 {
        tpl.add_partition(&world.input, p);
    }
    let want: Vec<Option<i64>> = want.iter().copied().map(Some).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let committed = reader
            .committed_offsets(tpl.clone(), Duration::from_secs(10))
            .unwrap();
        let got: Vec<Option<i64>> = (0..want.len() as i32)
            .map(
                |p| match committed.find_partition(&world.input, p)?.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                },
            )
            .collect();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed {got:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kafka's committed offsets of tierd's group follow the offsets applied in Redis (every
/// `ingest.kafka_commit_interval_ms`), so the lag tools and dashboards that read a group's
/// commits (`kafka-consumer-groups.sh`, exporters) see tierd's real position.
#[test]
fn the_groups_committed_offsets_follow_the_applied_ones_for_lag_dashboards() {
    let world = World::start(2);
    let tierd = Tierd::spawn_with(&world, "", "[ingest]\nkafka_commit_interval_ms = 200\n");
    tierd.wait_partitions(2, Duration::from_secs(60));
    let [a, b]: [String; 2] = world.customer_per_partition().try_into().unwrap();
    let events: Vec<serde_json::Value> = (0..5)
        .map(|i| purchase(&format!("a{i}"), &a, "10", "2026-11-01T10:00:00Z"))
        .chain((0..3).map(|i| purchase(&format!("b{i}"), &b, "10", "2026-11-01T10:00:00Z")))
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));

    // The applied offsets Redis holds, committed to Kafka.
    let stored: Vec<i64> = (0..2).map(|p| world.partition_meta(p).1).collect();
    assert_eq!(stored, vec![ends[&0], ends[&1]]);
    wait_committed(&world, &stored);
}

/// Offset commits for lag dashboards wait for the previous one's answer. Sent on a timer
/// regardless, they pile up while the group coordinator is slow: librdkafka completes a
/// rebalance only at a moment with no commit in flight, and the coordinator answers one
/// request of a connection at a time, so the heartbeats queue behind the commits until the
/// session expires (seen in CI: an instance lost its partitions and was not given them back
/// for minutes). Here the broker is frozen while tierd commits as often as it can.
#[test]
fn offset_commits_wait_for_the_previous_answer_while_the_coordinator_is_frozen() {
    let world = World::start_on(1, Redis::start(), Broker::start());
    let tierd = Tierd::spawn_with(&world, "", "[ingest]\nkafka_commit_interval_ms = 0\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let [a]: [String; 1] = world.customer_per_partition().try_into().unwrap();
    let ends = world.produce_json(&[purchase("a1", &a, "10", "2026-11-01T10:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));

    // Frozen well within the tests' 6 s session (a lost session's revocation commits too).
    world.broker.freeze_node(1);
    let frozen = Instant::now();
    let mut most = 0.0_f64;
    while frozen.elapsed() < Duration::from_millis(2_500) {
        std::thread::sleep(Duration::from_millis(100));
        most = most.max(tierd.metric("tierd_kafka_offset_commits_in_flight"));
    }
    world.broker.thaw_node(1);
    assert_eq!(
        most, 1.0,
        "commits in flight while the coordinator was frozen"
    );

    // Commits go on once it answers: the group's committed offset follows a new purchase.
    let ends = world.produce_json(&[purchase("a2", &a, "10", "2026-11-01T11:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));
    wait_committed(&world, &[ends[&0]]);
    assert_eq!(tierd.metric("tierd_partitions_stopped"), 0.0);
}
