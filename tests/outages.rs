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
    let world = World::start_with(4, Redis::start_persistent());
    let tierd = Tierd::spawn(&world, "[ingest]\nbatch_max_events = 100\n");
    tierd.wait_partitions(4, Duration::from_secs(60));
    let mut ends = BTreeMap::new();
    merge(&mut ends, world.produce_json(&events(0, 10_000)));
    // Redis dies while commits are in flight; acknowledged writes survive in its AOF.
    world.redis.restart_persistent();
    merge(&mut ends, world.produce_json(&events(10_000, 20_000)));
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(180));
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

/// A Redis down for a few seconds (a restart, a failover) holds tierd up for about as long,
/// not minutes. redis-rs's connection manager, left at its defaults, retries a lost connection
/// after 1–2 s and then only every 60–120 s: every partition waited up to two minutes after
/// Redis was back (this test failed with nothing applied 30 s after Redis returned), and the
/// calls waiting on the reconnection reported nothing more after their first failure.
#[test]
fn a_redis_down_for_seconds_is_caught_up_seconds_after_it_returns() {
    let world = World::start_with(2, Redis::start_persistent());
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(2, Duration::from_secs(60));
    let mut ends = world.produce_json(&events(0, 200));
    world.wait_applied(&ends, Duration::from_secs(60));
    world.redis.kill();
    // Purchases arrive while Redis is down: tierd's calls fail and it reconnects, in vain.
    merge(&mut ends, world.produce_json(&events(200, 400)));
    std::thread::sleep(Duration::from_secs(2));
    let early = tierd.metric("tierd_redis_errors_total");
    std::thread::sleep(Duration::from_secs(6));
    // Visible while it lasts: calls keep failing (and are retried), not waiting silently
    // after their first failure.
    assert!(
        tierd.metric("tierd_redis_errors_total") > early,
        "failed Redis calls counted all through the outage"
    );
    world.redis.start_again();
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(30));
    assert_each_counted_once(&world, 4);
}

/// tierd's Redis user deleted (its connections closed) and only created again 12 s later, as
/// when an operator re-provisions ACL users or a managed Redis comes back before its users:
/// tierd's reconnection is refused meanwhile, and once the user is back it goes on by itself.
/// redis-rs's connection manager keeps the last refusal of a failed reconnection for good when
/// it is not an I/O error (here "authentication failed"): with the reconnection rounds of a few
/// seconds (see the test above) every call failed with it until tierd was restarted (this test
/// failed with nothing applied 30 s after the user was back); with redis-rs 0.32's defaults the
/// round's third attempt came 61–122 s after the first, so a user gone for over five minutes
/// did the same.
#[test]
fn tierds_redis_user_deleted_and_created_again_is_reconnected() {
    let (redis, admin) = Redis::start_as_acl_user();
    let acl = |args: &[&str]| support::acl(&admin, args);
    let create = || acl(&["SETUSER", "tierd", "on", ">pw", "~*", "&*", "+@all"]);
    let world = World::start_with(2, redis);
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(2, Duration::from_secs(60));
    let mut ends = world.produce_json(&events(0, 200));
    world.wait_applied(&ends, Duration::from_secs(60));
    // Deleting the user closes its connections: tierd reconnects and is refused.
    acl(&["DELUSER", "tierd"]);
    merge(&mut ends, world.produce_json(&events(200, 400)));
    std::thread::sleep(Duration::from_secs(12));
    create();
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(30));
    assert_each_counted_once(&world, 4);
}

/// Issue 11, item 8: one partition that cannot make progress (here its Redis keys become
/// forbidden to tierd's ACL user, as when one Redis Cluster shard is down) fills its queue.
/// Only that partition waits (paused); the consumer keeps polling and the other partition is
/// applied. Once its keys are allowed again it catches up, every event counted once.
#[test]
fn one_stuck_partition_does_not_stall_the_others() {
    let (redis, admin) = Redis::start_as_acl_user();
    let acl = |rules: &[&str]| support::acl(&admin, &[&["SETUSER", "tierd"], rules].concat());
    let world = World::start_with(2, redis);
    let [a, b]: [String; 2] = world.customer_per_partition().try_into().unwrap();
    let tierd = Tierd::spawn(
        &world,
        "[ingest]\nbatch_max_events = 100\nqueue_batches = 2\n",
    );
    tierd.wait_partitions(2, Duration::from_secs(60));

    // Partition 0's keys become forbidden: its runner retries, its queue fills up.
    let p1 = format!("{}*", world.keys(1).meta.trim_end_matches(":meta"));
    acl(&["resetkeys", &format!("~{p1}")]);
    // Distinct times: the bounded id memory never refuses one as too late.
    let many: Vec<serde_json::Value> = events(0, 3000)
        .into_iter()
        .map(|mut e| {
            e["customer_id"] = a.as_str().into();
            e
        })
        .collect();
    let mut ends = world.produce_json(&many);
    std::thread::sleep(Duration::from_secs(3));
    let more = world.produce_json(&[purchase("b1", &b, "1", "2026-11-01T10:00:00Z")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut conn = redis::Client::open(admin.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    loop {
        let next: Option<i64> = redis::cmd("HGET")
            .arg(world.keys(1).meta)
            .arg("next_offset")
            .query(&mut conn)
            .unwrap();
        if next >= Some(more[&1]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "partition 1 stalled behind partition 0:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Partition 0 may use its keys again: it catches up, each event once.
    acl(&["resetkeys", "~*"]);
    merge(&mut ends, more);
    world.wait_applied(&ends, Duration::from_secs(120));
    assert_eq!(world.customer_state(&a).unwrap().count, 3000);
    assert_eq!(world.customer_state(&b).unwrap().count, 1);
}

/// Issue 11, item 11, for what tierd decides without input: a rules change re-evaluates every
/// customer (a sweep), and here it moves all 600 of them while the output topic refuses every
/// change. The sweep stops at the outbox bound like input does, and goes on as the outbox
/// drains: the outbox stays near `publish.outbox_max_entries` (before: timers, sweeps and
/// re-rankings went on past it, and the outbox took one change per customer, 600 here).
#[test]
fn a_rules_sweep_stops_at_the_outbox_bound_while_changes_cannot_be_published() {
    let mut world = World::start(1);
    let rules = |version: &str, gold: &str| {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(
            &mut file,
            format!("version = \"{version}\"\n[[tiers]]\nname = \"gold\"\nwhen = [\"sum >= {gold}\"]\n[[tiers]]\nname = \"basic\"\n").as_bytes(),
        )
        .unwrap();
        file
    };
    let first = rules("sweep-1", "100");
    world.rules = first.path().to_owned();
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let events: Vec<serde_json::Value> = (0..600)
        .map(|i| {
            purchase(
                &format!("e{i}"),
                &format!("c{i}"),
                "50.00",
                "2026-11-10T00:00:00Z",
            )
        })
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));

    // Every customer moves up under the new rules; the output topic refuses every change.
    world
        .broker
        .alter_topic_config(&world.output, "max.message.bytes", "100");
    let second = rules("sweep-2", "10");
    world.rules = second.path().to_owned();
    tierd = Tierd::spawn(
        &world,
        "[publish]\noutbox_max_entries = 100\nparked_retry_ms = 300\n[rules]\nsweep_per_second = 500\n",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_full") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox never reached its bound:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The sweep holds at the bound (plus the page it was committing), and stays there.
    std::thread::sleep(Duration::from_secs(3));
    let depth = world.outbox_len(0);
    assert!(
        depth < 200,
        "the outbox grew to {depth}:\n{}",
        tierd.log_text()
    );
    assert_eq!(tierd.metric("tierd_rules_sweep_partitions_done"), 0.0);

    // The topic takes the changes again: the sweep completes, every customer told once.
    world
        .broker
        .alter_topic_config(&world.output, "max.message.bytes", "1048588");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while tierd.metric("tierd_rules_sweep_partitions_done") < 1.0 || world.outbox_len(0) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sweep did not complete:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let moved = world
        .read_all(&world.output)
        .iter()
        .map(support::Record::json)
        .filter(|v| v["reason"] == "rules_changed" && v["tier"] == "gold")
        .count();
    assert_eq!(moved, 600, "every customer moved once");
    world.assert_one_body_per_change_id();
}

/// The same bound for wall-clock timers: 600 customers' recency timers come due one every
/// 30 ms while the output topic refuses every change. Timer passes stop at the outbox bound
/// (the pass under way runs to its end) and go on as the outbox drains: the outbox stays near
/// `publish.outbox_max_entries`, where without the bound it takes every lapse (600 here).
#[test]
fn wall_clock_timers_stop_at_the_outbox_bound_while_changes_cannot_be_published() {
    let mut world = World::start(1);
    let mut rules = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    // `active` while the latest purchase is under two days old.
    std::io::Write::write_all(
        &mut rules,
        b"version = \"timers-bound-1\"\n[scores.R]\nmetric = \"recency_days\"\nbins = [{ score = 2, max = 1 }, { score = 1 }]\n[[tiers]]\nname = \"active\"\nwhen = [\"score.R >= 2\"]\n[[tiers]]\nname = \"none\"\n",
    )
    .unwrap();
    world.rules = rules.path().to_owned();
    let tierd = Tierd::spawn(
        &world,
        "[publish]\noutbox_max_entries = 100\nparked_retry_ms = 300\n[clock]\ntick_ms = 200\n",
    );
    tierd.wait_partitions(1, Duration::from_secs(60));
    // Customer i's timer comes due 45 s + i × 30 ms from now (two days after the purchase):
    // time to apply and publish the 600 first changes on a loaded machine.
    let first_due = tierd::model::time::now_ms() + 45_000;
    let events: Vec<serde_json::Value> = (0..600)
        .map(|i| {
            purchase(
                &format!("e{i}"),
                &format!("c{i}"),
                "10.00",
                &tierd::model::time::format_ms(first_due - 2 * 86_400_000 + i * 30),
            )
        })
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(60));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while world.outbox_len(0) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first changes were not published:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        tierd::model::time::now_ms() < first_due - 2_000,
        "too slow to refuse the changes before the first timer is due"
    );
    world
        .broker
        .alter_topic_config(&world.output, "max.message.bytes", "100");

    // Every timer is due 63 s from the start; the passes stop at the bound.
    let all_due = first_due + 600 * 30;
    let mut deepest = 0;
    while tierd::model::time::now_ms() < all_due + 3_000 {
        deepest = deepest.max(world.outbox_len(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        tierd.metric("tierd_outbox_full") >= 1.0,
        "the outbox never reached its bound:\n{}",
        tierd.log_text()
    );
    assert!(
        deepest < 200,
        "the outbox grew to {deepest}:\n{}",
        tierd.log_text()
    );

    // The topic takes the changes again: every customer's lapse is published once.
    world
        .broker
        .alter_topic_config(&world.output, "max.message.bytes", "1048588");
    let lapsed = || {
        world
            .read_all(&world.output)
            .iter()
            .map(support::Record::json)
            .filter(|v| v["reason"] == "recency" && v["tier"] == "none")
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while world.outbox_len(0) > 0 || lapsed() < 600 {
        assert!(
            std::time::Instant::now() < deadline,
            "the lapses were not all published ({} of 600):\n{}",
            lapsed(),
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(lapsed(), 600, "every customer's lapse once");
    world.assert_one_body_per_change_id();
}

/// Issue 11, item 11: while publishing cannot keep up (here every change is refused by the
/// output topic), the outbox in Redis grows only to about `publish.outbox_max_entries`: the
/// partition then takes no input, says so on `/readyz/ingest` and `tierd_outbox_full`,
/// and resumes when the outbox drains — every event still counted once, every change
/// published once.
#[test]
fn an_outbox_that_cannot_drain_pauses_input_at_its_bound() {
    let world = World::start(1);
    world
        .broker
        .alter_topic_config(&world.output, "max.message.bytes", "100");
    let tierd = Tierd::spawn(
        &world,
        "[publish]\noutbox_max_entries = 100\nparked_retry_ms = 300\n[ingest]\nbatch_max_events = 20\n",
    );
    tierd.wait_partitions(1, Duration::from_secs(60));
    let events: Vec<serde_json::Value> = (0..1000)
        .map(|i| {
            purchase(
                &format!("e{i}"),
                &format!("c{i}"),
                "10.00",
                "2026-11-10T00:00:00Z",
            )
        })
        .collect();
    let ends = world.produce_json(&events);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = tierd.get("/readyz/ingest");
        if status == 503 && body.contains("over publish.outbox_max_entries") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no backpressure: {body}\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tierd.metric("tierd_outbox_full"), 1.0);
    // Bounded: the bound plus what was already on its way (the batch being applied, and
    // messages fetched before the pause took effect), and no longer growing.
    std::thread::sleep(Duration::from_secs(1));
    let depth = world.outbox_len(0);
    assert!(depth < 300, "the outbox grew to {depth}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(world.outbox_len(0), depth, "input stays paused");
    assert!(
        world.partition_meta(0).1 < ends[&0],
        "input is paused before the end"
    );

    // The topic accepts the changes again: the outbox drains, input resumes.
    world
        .broker
        .alter_topic_config(&world.output, "max.message.bytes", "1048588");
    world.wait_applied(&ends, Duration::from_secs(120));
    // The flag clears at the runner's next outbox check (it may have passed the bound again
    // on the way: the input resumes at half).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tierd.metric("tierd_outbox_full") != 0.0 {
        assert!(std::time::Instant::now() < deadline, "still flagged full");
        std::thread::sleep(Duration::from_millis(100));
    }
    let changes = world.read_all(&world.output);
    assert_eq!(changes.len(), 1000, "one initial placement each, once");
    for i in [0, 500, 999] {
        assert_eq!(world.customer_state(&format!("c{i}")).unwrap().count, 1);
    }
}

/// Issue 11, item 2: partitions handed to an instance while Redis does not answer (frozen by
/// SIGSTOP) cannot be claimed. The claim gives up after a third of `max.poll.interval.ms`, so
/// the consumer thread keeps polling; the partitions are held and shown as assigned but not
/// processed (before: the claim retried inside the rebalance callback for as long as Redis was
/// away, and the partitions were nowhere to be seen: neither processed nor reported). Once
/// Redis answers, they are claimed and every event counts once.
#[test]
fn partitions_assigned_while_redis_is_frozen_are_shown_and_claimed_when_it_returns() {
    assigned_while_frozen(World::start(4));
}

/// The same on a Redis Cluster, every node frozen. redis-rs's synchronous cluster connection
/// retries a timed-out call and, connecting again, sends a `PING` with no timeout, which a
/// frozen node (its kernel accepts the connection) never answers: before each claim call ran
/// on a thread of its own, given up at its deadline, the claim held the consumer thread until
/// the cluster returned, past `max.poll.interval.ms`.
#[test]
fn partitions_assigned_while_a_redis_cluster_is_frozen_are_shown_and_claimed_when_it_returns() {
    assigned_while_frozen(World::start_with(4, Redis::start_cluster()));
}

fn assigned_while_frozen(world: World) {
    let holder = support::GroupHolder::join(&world);
    let tierd = Tierd::spawn_with(&world, "\"max.poll.interval.ms\" = \"10000\"", "");
    tierd.wait_partitions(2, Duration::from_secs(60));
    let mut ends = world.produce_json(&events(0, 400));

    world.redis.pause();
    holder.leave();
    // The holder's two partitions reach tierd, which cannot claim them: held and reported.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while (
        tierd.metric("tierd_partitions_assigned"),
        tierd.metric("tierd_partitions_stopped"),
    ) != (4.0, 2.0)
    {
        if std::time::Instant::now() > deadline {
            world.redis.resume();
            panic!(
                "the partitions handed over while Redis was frozen were not shown: {} assigned, {} not processed; log:\n{}",
                tierd.metric("tierd_partitions_assigned"),
                tierd.metric("tierd_partitions_stopped"),
                tierd.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(tierd.log_text().contains("did not answer in time"));
    // Frozen past max.poll.interval.ms.
    std::thread::sleep(Duration::from_secs(12));
    world.redis.resume();

    merge(&mut ends, world.produce_json(&events(400, 800)));
    world.wait_applied(&ends, Duration::from_secs(90));
    tierd.wait_partitions(4, Duration::from_secs(30));
    assert_eq!(tierd.metric("tierd_partitions_stopped"), 0.0);
    assert_each_counted_once(&world, 8);
    assert!(
        !tierd.log_text().contains("maximum poll interval"),
        "evicted from the group:\n{}",
        tierd.log_text()
    );
}

/// The release side of the same edge: partitions revoked while Redis is frozen are released
/// within a third of `max.poll.interval.ms` (their publisher, stuck on Redis, is aborted; the
/// next owner's producer aborts its open transaction), so the instance stays in its group
/// (before: a release waited 30 s for the runner and 30 s for the publisher, and librdkafka
/// left the group). Every event still counts once.
#[test]
fn partitions_revoked_while_redis_is_frozen_are_released_in_time() {
    revoked_while_frozen(World::start(4));
}

/// The same on a Redis Cluster, every node frozen.
#[test]
fn partitions_revoked_while_a_redis_cluster_is_frozen_are_released_in_time() {
    revoked_while_frozen(World::start_with(4, Redis::start_cluster()));
}

fn revoked_while_frozen(world: World) {
    let tierd = Tierd::spawn_with(&world, "\"max.poll.interval.ms\" = \"10000\"", "");
    tierd.wait_partitions(4, Duration::from_secs(60));
    let mut ends = world.produce_json(&events(0, 400));
    world.wait_applied(&ends, Duration::from_secs(60));

    world.redis.pause();
    // A new member: tierd must give two partitions up while Redis does not answer.
    let holder = support::GroupHolder::join(&world);
    std::thread::sleep(Duration::from_secs(12));
    world.redis.resume();
    holder.leave();

    merge(&mut ends, world.produce_json(&events(400, 800)));
    world.wait_applied(&ends, Duration::from_secs(90));
    tierd.wait_partitions(4, Duration::from_secs(30));
    assert_each_counted_once(&world, 8);
    assert!(
        !tierd.log_text().contains("maximum poll interval"),
        "evicted from the group:\n{}",
        tierd.log_text()
    );
}

/// Waits until `cond` holds (checked every 100 ms), or fails with `what` and tierd's log.
fn wait_for(tierd: &Tierd, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}; log:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A partition whose claim found Redis frozen is claimed again once Redis answers; that
/// re-claim is not a fence and must not use up the partition's fence allowance (3 re-claims
/// after fences a minute). Here the partition is then fenced three times (a stale claim
/// raising its epoch): each time tierd claims it back; the fourth fence within the minute
/// leaves it stopped and reported. Before, the re-claim after the outage was counted and the
/// third fence already left the partition stopped.
#[test]
fn a_reclaim_after_an_outage_does_not_use_up_the_fence_allowance() {
    let world = World::start(2);
    let holder = support::GroupHolder::join(&world);
    let tierd = Tierd::spawn_with(&world, "\"max.poll.interval.ms\" = \"10000\"", "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    // The partition tierd has not claimed is the holder's.
    let p = (0..2).find(|&p| world.partition_meta(p).0 == 0).unwrap();

    world.redis.pause();
    holder.leave();
    wait_for(
        &tierd,
        "the handed-over partition was not shown as not processed",
        Duration::from_secs(40),
        || tierd.metric("tierd_partitions_stopped") == 1.0,
    );
    world.redis.resume();
    wait_for(
        &tierd,
        "the partition was not claimed after Redis returned",
        Duration::from_secs(30),
        || world.partition_meta(p).0 > 0 && tierd.metric("tierd_partitions_stopped") == 0.0,
    );

    let fence = || -> i64 {
        redis::cmd("HINCRBY")
            .arg(world.keys(p).meta)
            .arg("epoch")
            .arg(1)
            .query(&mut world.redis.conn())
            .unwrap()
    };
    for n in 1..=3 {
        let stale = fence();
        wait_for(
            &tierd,
            &format!("fence {n}: the partition was not claimed back"),
            Duration::from_secs(20),
            || world.partition_meta(p).0 > stale && tierd.metric("tierd_partitions_stopped") == 0.0,
        );
    }
    let ends = world.produce_json(&events(0, 200));
    world.wait_applied(&ends, Duration::from_secs(30));

    fence();
    wait_for(
        &tierd,
        "the fourth fence within a minute did not stop the partition",
        Duration::from_secs(20),
        || tierd.metric("tierd_partitions_stopped") == 1.0,
    );
    let (status, body) = tierd.get("/readyz/ingest");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("fenced 3 times within 60 s"), "{body}");
}
