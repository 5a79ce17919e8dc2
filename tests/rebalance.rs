//! Ownership: two tierd instances in one group split and hand over partitions without
//! double-applying anything, and a fenced stale owner cannot write.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;
use support::{purchase, Redis, Tierd, World};
use tierd::store::keys::Keyspace;
use tierd::store::partition::{self as store, ApplyError, CommitBatch, Committed};

#[test]
fn cooperative_rebalance_shares_and_hands_over_partitions_without_double_applying() {
    share_and_hand_over("");
}

/// KIP-848: the broker assigns (incrementally) under `group.protocol = "consumer"`.
#[test]
fn kip848_rebalance_shares_and_hands_over_partitions_without_double_applying() {
    share_and_hand_over("\"group.protocol\" = \"consumer\"");
}

#[test]
fn eager_rebalance_shares_and_hands_over_partitions_without_double_applying() {
    share_and_hand_over("\"partition.assignment.strategy\" = \"range\"");
}

fn share_and_hand_over(consumer: &str) {
    let eager = consumer.contains("range");
    let world = World::start(4);
    let a = Tierd::spawn_with(&world, consumer, "");
    a.wait_partitions(4, Duration::from_secs(60));

    let batch = |from: usize, to: usize| -> Vec<serde_json::Value> {
        (from..to)
            .map(|i| {
                purchase(
                    &format!("e{i}"),
                    &format!("c{}", i % 200),
                    "10.00",
                    "2026-11-10T10:00:00Z",
                )
            })
            .collect()
    };
    let mut ends = BTreeMap::new();
    let produce = |ends: &mut BTreeMap<i32, i64>, events: Vec<serde_json::Value>| {
        for (p, e) in world.produce_json(&events) {
            ends.insert(p, e);
        }
    };
    produce(&mut ends, batch(0, 3_000));

    // A second member joins: half of the partitions move to it (eager: all are revoked and
    // reassigned).
    let mut b = Tierd::spawn_with(&world, consumer, "");
    b.wait_partitions(2, Duration::from_secs(60));
    a.wait_partitions(2, Duration::from_secs(60));
    produce(&mut ends, batch(3_000, 6_000));
    world.wait_applied(&ends, Duration::from_secs(60));
    // Each instance shows a state cache for the partitions it runs, and none for those it
    // gave away (their series leave with them).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (on_a, on_b) = (cache_partitions(&a), cache_partitions(&b));
        if on_a.len() == 2 && on_b.len() == 2 && on_a.iter().all(|p| !on_b.contains(p)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cache series: first instance {on_a:?}, joiner {on_b:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The joiner's partitions were claimed again: their epoch moved past the first owner's.
    let epochs: Vec<i64> = (0..4).map(|p| world.partition_meta(p).0).collect();
    let reclaimed = epochs.iter().filter(|e| **e >= 2).count();
    if eager {
        assert_eq!(
            reclaimed, 4,
            "eager: every partition was revoked and claimed again: {epochs:?}"
        );
    } else {
        assert_eq!(
            reclaimed, 2,
            "cooperative / KIP-848: only the two moved partitions changed owner: {epochs:?}"
        );
    }

    // The joiner leaves cleanly: the first member takes everything back.
    assert_eq!(b.terminate(), Some(0));
    a.wait_partitions(4, Duration::from_secs(60));
    produce(&mut ends, batch(6_000, 9_000));
    world.wait_applied(&ends, Duration::from_secs(60));

    // Each of 200 customers got 45 purchases of 10.00, each exactly once.
    for c in 0..200 {
        let s = world.customer_state(&format!("c{c}")).unwrap();
        assert_eq!((s.count, s.sum), (45, 45_000), "c{c}");
    }
    assert_eq!(world.read_all(&world.dlq).len(), 0);
}

/// The partitions `tierd` shows a state cache for (`tierd_state_cache_customers{partition}`).
fn cache_partitions(tierd: &Tierd) -> Vec<String> {
    tierd
        .get("/metrics")
        .1
        .lines()
        .filter_map(|l| l.strip_prefix("tierd_state_cache_customers{partition=\""))
        .filter_map(|l| l.split('"').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_stale_owner_is_fenced_and_a_lost_reply_is_not_applied_twice() {
    let redis = Redis::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = Keyspace::new(&support::unique("t"), "g", "in").partition(0);
    let mut sync = redis.conn();
    let old = store::claim(&mut sync, &keys, None, &[], "v1", "", None).unwrap();
    assert_eq!(old.next_offset, None);
    let batch = |expected: i64, first: i64, end: i64, value: &str| CommitBatch {
        expected_offset: expected,
        expected_commits: i64::from(expected >= 0),
        first_offset: first,
        end_offset: end,
        states: vec![(keys.customer("c1"), value.as_bytes().to_vec())],
        ..CommitBatch::default()
    };
    rt.block_on(async {
        let mut conn = tierd::store::connection::Connection::connect(
            tierd::store::client::RedisClient::Single(redis.client()),
        )
        .await
        .unwrap();
        assert_eq!(
            store::commit(
                &mut conn,
                &keys,
                &[],
                0,
                old.epoch,
                &batch(-1, 0, 10, "{\"count\":1}")
            )
            .await
            .unwrap(),
            Committed::Applied { outbox_len: 0 }
        );
        // The same call again (a retry after a lost reply) changes nothing.
        assert_eq!(
            store::commit(
                &mut conn,
                &keys,
                &[],
                0,
                old.epoch,
                &batch(-1, 0, 10, "{\"count\":99}")
            )
            .await
            .unwrap(),
            Committed::AlreadyApplied
        );
        // A batch overlapping what was applied is refused.
        assert!(matches!(
            store::commit(&mut conn, &keys, &[], 0, old.epoch, &batch(10, 5, 15, "{}")).await,
            Err(ApplyError::Diverged { stored: 10, .. })
        ));
        // So is a batch from an owner whose idea of the stored offset is wrong (Redis lost
        // writes, or was restored from a backup): its cache cannot be trusted.
        assert!(matches!(
            store::commit(&mut conn, &keys, &[], 0, old.epoch, &batch(7, 10, 20, "{}")).await,
            Err(ApplyError::Diverged {
                stored: 10,
                expected: 7,
                ..
            })
        ));

        // A new owner claims the partition and resumes where the old one stopped.
        let new = store::claim(&mut sync, &keys, None, &[], "v1", "", None).unwrap();
        assert_eq!(
            (new.epoch, new.next_offset, new.commits),
            (old.epoch + 1, Some(10), 1)
        );
        // The old owner (a zombie after a rebalance) can no longer write, even at the right offset.
        let err = store::commit(
            &mut conn,
            &keys,
            &[],
            0,
            old.epoch,
            &batch(10, 10, 20, "{\"count\":2}"),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ApplyError::Fenced { .. }), "{err}");
        assert!(!err.is_retriable());
        let stored: String = redis::cmd("GET")
            .arg(keys.customer("c1"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(stored, "{\"count\":1}");
        assert_eq!(
            store::commit(
                &mut conn,
                &keys,
                &[],
                0,
                new.epoch,
                &batch(10, 10, 20, "{\"count\":2}")
            )
            .await
            .unwrap(),
            Committed::Applied { outbox_len: 0 }
        );
    });
}

/// A zombie: an instance paused (SIGSTOP) past its session timeout while events flow, so the
/// other instance takes its partitions over and publishes; then resumed. The resumed instance
/// still believes it owns them for a moment: its runner's commits are refused by the Redis
/// epoch, and its publisher's transactions by the broker (the new owner's producer fenced it).
/// Exact state, and on the output topic every change exactly once in per-customer order on
/// every record. (Before the fencing, the resumed publisher produced the new owner's
/// untrimmed outbox entries again after newer ones: duplicates and sequences going back.)
#[test]
fn a_zombie_resumed_after_its_partitions_moved_publishes_nothing() {
    let world = World::start(2);
    let events = support::exact::stream(24_000, 2_000, 11);
    assert!(events.len() >= 24_000);
    let (states, changes) = support::exact::reference(&events, &support::exact::b2b_rules());
    let consumer = "\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n";
    // Small batches and rounds: many commits and publish rounds in flight at any moment.
    let extra = "[ingest]\nbatch_max_events = 100\n[publish]\nbatch_max = 50\n";
    let zombie = Tierd::spawn_with(&world, consumer, extra);
    zombie.wait_partitions(2, Duration::from_secs(60));
    let other = Tierd::spawn_with(&world, consumer, extra);
    other.wait_partitions(1, Duration::from_secs(60));
    zombie.wait_partitions(1, Duration::from_secs(60));
    let signal = |sig: &str| zombie.signal(sig);

    let mut ends = BTreeMap::new();
    let mut chunks = events.chunks(4_000);
    let mut produce = |ends: &mut BTreeMap<i32, i64>| {
        let Some(chunk) = chunks.next() else {
            return false;
        };
        for (p, e) in world.produce_json(chunk) {
            ends.insert(p, e);
        }
        true
    };
    for _ in 0..2 {
        // A burst: the zombie is in the middle of applying and publishing a backlog (rounds
        // produced and not yet trimmed, records in flight) when it is paused.
        assert!(produce(&mut ends));
        std::thread::sleep(Duration::from_millis(400));
        signal("-STOP");
        // The other instance takes both partitions over and works on them for a while.
        other.wait_partitions(2, Duration::from_secs(60));
        assert!(produce(&mut ends));
        std::thread::sleep(Duration::from_secs(3));
        signal("-CONT");
        // The zombie rejoins and gets a partition back.
        zombie.wait_partitions(1, Duration::from_secs(60));
    }
    while produce(&mut ends) {}
    world.wait_applied(&ends, Duration::from_secs(120));
    support::exact::assert_exact(&world, &states, &changes);
}

/// The old owner's rounds stuck behind a stalled broker during a handover (issue 11, item 5):
/// on a 3-node cluster the node leading output partition 0 is frozen (SIGSTOP) while the
/// only instance is in the middle of publishing a backlog, and a second instance joins, so
/// one input partition is handed over while the first one's rounds to the frozen node are
/// queued or in flight. The controller moves the frozen node's leaderships (after its 4 s
/// broker session), the new owner publishes newer changes, then the node resumes and the
/// queued requests reach it. Only the current owner's records become visible: the new
/// owner's producer initialisation fenced the old one's `transactional.id` and aborted its
/// open transaction (its late records are refused or land aborted). Exact state, and on
/// the output topic every change exactly once, in per-customer order on every record.
#[test]
fn a_handover_while_a_broker_is_stalled_keeps_every_change_once_and_in_order() {
    let world = World::start_on(2, Redis::start(), support::Broker::cluster(3));
    let events = support::exact::stream(12_000, 1_000, 17);
    let (states, changes) = support::exact::reference(&events, &support::exact::b2b_rules());
    let consumer = "\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n";
    // Small batches and rounds: many commits and publish rounds in flight at any moment.
    let extra = "[ingest]\nbatch_max_events = 100\n[publish]\nbatch_max = 50\n";
    let first = Tierd::spawn_with(&world, consumer, extra);
    first.wait_partitions(2, Duration::from_secs(60));
    let mut chunks = events.chunks(4_000);
    let mut ends = BTreeMap::new();
    ends.extend(world.produce_json(chunks.next().unwrap()));
    std::thread::sleep(Duration::from_millis(400));
    let stalled = world.broker.leader(&world.output, 0);
    assert!(stalled > 0, "output partition 0 has a leader");
    world.broker.freeze_node(stalled);
    // Rounds are stuck behind the frozen node: the outboxes hold what they could not publish.
    std::thread::sleep(Duration::from_secs(1));
    let stuck: i64 = (0..2).map(|p| world.outbox_len(p)).sum();
    assert!(
        stuck > 0,
        "nothing was waiting to be published when the node froze"
    );
    let second = Tierd::spawn_with(&world, consumer, extra);
    second.wait_partitions(1, Duration::from_secs(90));
    first.wait_partitions(1, Duration::from_secs(90));
    ends.extend(world.produce_json(chunks.next().unwrap()));
    // The new owner publishes newer changes while the node is still frozen.
    std::thread::sleep(Duration::from_secs(3));
    world.broker.thaw_node(stalled);
    for chunk in chunks {
        ends.extend(world.produce_json(chunk));
    }
    world.wait_applied(&ends, Duration::from_secs(180));
    support::exact::assert_exact(&world, &states, &changes);
}

/// `claim.lua`'s rules-version fence: versions are ordered by their first claim of the
/// partition; an older one is refused without touching the epoch; a version never seen is
/// newer (a rollback is a new version string).
#[test]
fn a_claim_by_an_older_rules_version_is_refused_and_changes_nothing() {
    let redis = Redis::start();
    let keys = Keyspace::new(&support::unique("t"), "g", "in").partition(0);
    let mut conn = redis.conn();
    let refused =
        |conn: &mut tierd::store::client::SyncConnection, version: &str| match store::claim(
            conn,
            &keys,
            None,
            &[],
            version,
            &format!("text of {version}"),
            None,
        ) {
            Err(store::ClaimError::OlderRules(o)) => Some(o.latest),
            Ok(_) => None,
            Err(e) => panic!("{e}"),
        };
    assert_eq!(refused(&mut conn, "v1"), None);
    assert_eq!(refused(&mut conn, "v1"), None, "the same version again");
    assert_eq!(refused(&mut conn, "v2"), None, "a new version");
    let epoch: i64 = redis::cmd("HGET")
        .arg(&keys.meta)
        .arg("epoch")
        .query(&mut conn)
        .unwrap();
    assert_eq!(epoch, 3);
    assert_eq!(refused(&mut conn, "v1"), Some("v2".to_owned()));
    let after: i64 = redis::cmd("HGET")
        .arg(&keys.meta)
        .arg("epoch")
        .query(&mut conn)
        .unwrap();
    assert_eq!(after, epoch, "a refused claim fences nobody");
    assert_eq!(refused(&mut conn, "v1-rollback"), None);
    assert_eq!(refused(&mut conn, "v2"), Some("v1-rollback".to_owned()));
    // Only the latest 32 versions are remembered: one that fell off counts as new again.
    for i in 0..32 {
        assert_eq!(refused(&mut conn, &format!("w{i}")), None);
    }
    assert_eq!(refused(&mut conn, "v1"), None, "forgotten");
    assert_eq!(refused(&mut conn, "w5"), Some("v1".to_owned()));
}

/// Each partition keeps the text of its latest rules version and of the one before it; a claim
/// returns the one before (what a replay from before the latest rules change runs under).
#[test]
fn a_claim_returns_the_rules_text_the_partition_ran_before_its_latest_version() {
    let redis = Redis::start();
    let keys = Keyspace::new(&support::unique("t"), "g", "in").partition(0);
    let mut conn = redis.conn();
    let prior = |conn: &mut tierd::store::client::SyncConnection, version: &str, text: &str| {
        store::claim(conn, &keys, None, &[], version, text, None)
            .unwrap()
            .prior_rules
    };
    assert_eq!(
        prior(&mut conn, "v1", "one"),
        None,
        "the first version has none before it"
    );
    assert_eq!(prior(&mut conn, "v1", "one again"), None);
    assert_eq!(
        prior(&mut conn, "v2", "two").as_deref(),
        Some("one"),
        "the first text kept"
    );
    assert_eq!(
        prior(&mut conn, "v2", "two").as_deref(),
        Some("one"),
        "kept across the new version's later claims"
    );
    assert_eq!(prior(&mut conn, "v3", "three").as_deref(), Some("two"));
    // A text that is not the latest version's (an older tierd claimed that version without
    // keeping its text) is never handed on as the version before the next one.
    let _: () = redis::cmd("HSET")
        .arg(&keys.meta)
        .arg("rules_text_of")
        .arg("v2")
        .query(&mut conn)
        .unwrap();
    assert_eq!(prior(&mut conn, "v4", "four"), None);
    assert_eq!(prior(&mut conn, "v5", "five").as_deref(), Some("four"));
}
