//! Time moves tiers under both clocks, through the real pipeline:
//! - `wall`: a validity period ending a few seconds from now downgrades the customer at that
//!   wall time, with no event of theirs;
//! - `event`: replaying the same input gives identical tier changes and at-risk notices (ids
//!   and contents), whether it runs in large batches in one go or in tiny batches with
//!   kill -9 twice on the way.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};
use support::{purchase, refund, Tierd, World};
use tierd::model::time;

fn rules_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn wall_clock_timers_downgrade_at_wall_time() {
    wall_clock_timers_downgrade_at_wall_time_on(World::start(1));
}

/// The same on a Redis Cluster (the timer index is the partition's sorted set, in its slot).
#[test]
fn wall_clock_timers_downgrade_at_wall_time_on_a_redis_cluster() {
    wall_clock_timers_downgrade_at_wall_time_on(World::start_with(
        1,
        support::Redis::start_cluster(),
    ));
}

fn wall_clock_timers_downgrade_at_wall_time_on(mut world: World) {
    let rules = rules_file(
        r#"
version = "wall-1"
[policy]
review = "days:1"
[[tiers]]
name = "active"
when = ["recency_days < 1"]
[[tiers]]
name = "lapsed"
"#,
    );
    world.rules = rules.path().to_owned();
    let tierd = Tierd::spawn(&world, "[clock]\nmode = \"wall\"\ntick_ms = 200\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    // Bought a day ago minus 4 s: active until the 1-day review, 4 s from now.
    let bought = time::now_ms() - 86_400_000 + 4_000;
    let due = bought + 86_400_000;
    let ends = world.produce_json(&[purchase("w1", "wendy", "10", &time::format_ms(bought))]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    let changes = loop {
        let changes: Vec<serde_json::Value> = world
            .read_all(&world.output)
            .iter()
            .map(support::Record::json)
            .collect();
        if changes.len() >= 2 {
            break changes;
        }
        assert!(
            Instant::now() < deadline,
            "no time-driven change: {changes:?}\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        time::now_ms() >= due,
        "the timer must not fire before it is due"
    );
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[0]["tier"], "active");
    assert_eq!(changes[0]["occurred_at"], time::format_ms(bought));
    let down = &changes[1];
    assert_eq!(
        (&down["tier"], &down["direction"], &down["reason"]),
        (&"lapsed".into(), &"down".into(), &"validity_expired".into())
    );
    assert_eq!(
        down["occurred_at"],
        time::format_ms(due),
        "evaluated at its due time"
    );
    assert_eq!(down["cause"], serde_json::Value::Null, "no event caused it");
    assert_eq!(down["policy"], "downgrade=replace review=days:1");
    assert!(tierd.metric("tierd_timers_fired_total") >= 1.0);
    let state = world.customer_state("wendy").unwrap();
    assert_eq!(
        state.timer, None,
        "lapsed is the base tier: nothing left to schedule"
    );
}

const DETERMINISM_RULES: &str = r#"
version = "det-1"
[windows.m3]
length = "3 months"
[windows.d30]
length = "30 days"
[scores.R]
metric = "recency_days"
bins = [{ score = 3, max = 10 }, { score = 2, max = 40 }, { score = 1 }]
[policy]
at_risk_days = 3
[[tiers]]
name = "gold"
when = ["window.m3.sum >= 3000", "score.R >= 2"]
review = "days:20"
[[tiers]]
name = "silver"
when = ["window.d30.sum >= 500"]
grace_days = 3
[[tiers]]
name = "bronze"
when = ["score.R >= 3"]
[[tiers]]
name = "none"
"#;

/// A year and a half of purchases (and some refunds and re-sent duplicates) of 300
/// customers, in event-time order up to an hour of disorder; then a clock event.
fn history() -> Vec<serde_json::Value> {
    let mut rng = StdRng::seed_from_u64(42);
    let start = time::parse_rfc3339_ms("2025-01-01T00:00:00Z").unwrap();
    let step = 540 * 86_400_000 / 3000;
    let mut out = Vec::new();
    for i in 0..3000i64 {
        let c = format!("c{}", rng.random_range(0..300));
        let at = time::format_ms(start + i * step - rng.random_range(0..3_600_000));
        let amount = format!(
            "{}.{:02}",
            rng.random_range(10..1500),
            rng.random_range(0..100)
        );
        let e = if rng.random_bool(0.05) {
            refund(&format!("e{i}"), &c, &amount, &at)
        } else {
            purchase(&format!("e{i}"), &c, &amount, &at)
        };
        out.push(e.clone());
        if rng.random_bool(0.02) {
            out.push(e);
        }
    }
    for p in 0..2 {
        // One clock event per partition key space: customers hash over both partitions.
        out.push(purchase(
            &format!("clock{p}"),
            &format!("~clock{p}"),
            "0",
            "2026-11-20T00:00:00Z",
        ));
    }
    out
}

/// Runs the history; returns every published change and notice by id (contents without
/// the run-specific topic name), checking that duplicates are identical.
fn run(batch: usize, kills: usize) -> BTreeMap<String, serde_json::Value> {
    run_on(batch, kills, World::start(2))
}

/// [`run`] in `world`.
fn run_on(batch: usize, kills: usize, mut world: World) -> BTreeMap<String, serde_json::Value> {
    let rules = rules_file(DETERMINISM_RULES);
    let partitions = world.partitions;
    world.rules = rules.path().to_owned();
    let extra = format!(
        "[clock]\nmode = \"event\"\nlateness_s = 7200\n[ingest]\nbatch_max_events = {batch}\n"
    );
    let mut tierd = Tierd::spawn(&world, &extra);
    tierd.wait_partitions(i64::from(partitions), Duration::from_secs(60));
    let events = history();
    let ends = world.produce_json(&events);
    let total: i64 = ends.values().sum();
    for k in 1..=kills {
        // Kill at k/(kills+1) of the input, mid-stream.
        let target = total * k as i64 / (kills as i64 + 1);
        let deadline = Instant::now() + Duration::from_secs(120);
        while (0..partitions)
            .map(|p| world.partition_meta(p).1.max(0))
            .sum::<i64>()
            < target
        {
            assert!(Instant::now() < deadline, "stalled:\n{}", tierd.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        tierd.kill9();
        tierd = Tierd::spawn(&world, &extra);
    }
    world.wait_applied(&ends, Duration::from_secs(180));
    let mut by_id: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for r in world.read_all(&world.output) {
        let mut v = r.json();
        if let Some(cause) = v.get_mut("cause").and_then(|c| c.as_object_mut()) {
            cause.remove("topic");
        }
        let id = v["event_id"].as_str().unwrap().to_owned();
        if let Some(previous) = by_id.insert(id, v.clone()) {
            assert_eq!(previous, v, "a duplicate publication must be identical");
        }
    }
    assert_eq!(
        world.read_all(&world.dlq).len(),
        0,
        "nothing is late or invalid"
    );
    drop(tierd);
    by_id
}

#[test]
fn event_clock_replays_identically_however_batched_or_interrupted() {
    let one_go = run(2000, 0);
    let reasons: std::collections::BTreeSet<&str> = one_go
        .values()
        .map(|v| v["reason"].as_str().unwrap_or("at_risk"))
        .collect();
    // The history exercises every time-driven path, not just purchases.
    for r in [
        "purchase",
        "refund",
        "recency",
        "window_expiry",
        "validity_expired",
        "grace_ended",
        "at_risk",
    ] {
        assert!(reasons.contains(r), "{r} missing from {reasons:?}");
    }
    let interrupted = run(7, 2);
    assert_eq!(
        one_go.len(),
        interrupted.len(),
        "same number of distinct changes"
    );
    for (id, v) in &one_go {
        assert_eq!(Some(v), interrupted.get(id), "change {id} differs");
    }
}

/// The event clock's history on a Redis Cluster over 4 partitions, interrupted by kills,
/// publishes exactly the changes it publishes on a single Redis in one go.
#[test]
fn event_clock_on_a_redis_cluster_replays_as_on_a_single_redis() {
    let single = run_on(2000, 0, World::start(4));
    let cluster = run_on(
        100,
        2,
        World::start_with(4, support::Redis::start_cluster()),
    );
    assert_eq!(
        single.len(),
        cluster.len(),
        "same number of distinct changes"
    );
    for (id, v) in &single {
        assert_eq!(Some(v), cluster.get(id), "change {id} differs");
    }
}

#[test]
fn at_risk_notices_go_to_their_own_topic_when_configured() {
    let rules = rules_file(
        r#"
version = "risk-1"
[windows.d30]
length = "30 days"
[policy]
at_risk_days = 5
[[tiers]]
name = "gold"
when = ["window.d30.sum >= 100"]
[[tiers]]
name = "basic"
"#,
    );
    let mut world = World::start(1);
    world.rules = rules.path().to_owned();
    let topic = support::unique("at-risk");
    world.broker.create_topics(&[&topic], 1);
    world.kafka_extra = format!("at_risk_topic = \"{topic}\"");
    let tierd = Tierd::spawn(&world, "[clock]\nmode = \"event\"\nlateness_s = 0\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let ends = world.produce_json(&[
        purchase("g1", "gina", "100", "2026-01-01T10:00:00Z"),
        purchase("t1", "~clock", "1", "2026-03-01T00:00:00Z"),
    ]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let notices: Vec<serde_json::Value> = world
        .read_all(&topic)
        .iter()
        .map(support::Record::json)
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    let n = &notices[0];
    assert_eq!(
        (&n["type"], &n["customer_id"], &n["falls_to"]),
        (&"at_risk".into(), &"gina".into(), &"basic".into())
    );
    // 1 Jan's bucket leaves the 30-day window on 31 Jan; the notice comes 5 days before.
    assert_eq!(n["downgrade_at"], "2026-01-31T00:00:00.000Z");
    assert_eq!(n["occurred_at"], "2026-01-26T00:00:00.000Z");
    assert_eq!(n["to_stay"][0]["missing"], "100.00");
    let changes: Vec<serde_json::Value> = world
        .read_all(&world.output)
        .iter()
        .map(support::Record::json)
        .collect();
    assert!(
        changes.iter().all(|c| c["type"] != "at_risk"),
        "notices are not on the change topic"
    );
    assert!(changes
        .iter()
        .any(|c| c["customer_id"] == "gina" && c["reason"] == "window_expiry"));
    assert_eq!(tierd.metric("tierd_at_risk_notices_total"), 1.0);
}

#[test]
fn a_timer_of_a_deleted_customer_is_dropped_without_stalling_the_partition() {
    let rules = rules_file(
        "version = \"gone-1\"\n[[tiers]]\nname = \"active\"\nwhen = [\"recency_days < 1\"]\n[[tiers]]\nname = \"lapsed\"\n",
    );
    let mut world = World::start(1);
    world.rules = rules.path().to_owned();
    let mut tierd = Tierd::spawn(&world, "[clock]\nmode = \"wall\"\ntick_ms = 100\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let bought = time::now_ms() - 86_400_000 + 3_000;
    let ends = world.produce_json(&[purchase("d1", "dora", "10", &time::format_ms(bought))]);
    world.wait_applied(&ends, Duration::from_secs(60));
    // While tierd is stopped, an operator erases the customer (e.g. a deletion request) but
    // not their timer entry. (A running owner keeps its cached copy: erase with it stopped.)
    assert_eq!(tierd.terminate(), Some(0));
    let key = world.keys(0).customer("dora");
    let timers = world.keys(0).timers;
    let mut conn = world.redis.conn();
    let _: () = redis::cmd("DEL").arg(&key).query(&mut conn).unwrap();
    let tierd = Tierd::spawn(&world, "[clock]\nmode = \"wall\"\ntick_ms = 100\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    // After the timer is due, the partition still applies new events...
    std::thread::sleep(Duration::from_millis(4_000));
    let more = world.produce_json(&[purchase(
        "o1",
        "otto",
        "10",
        &time::format_ms(time::now_ms()),
    )]);
    world.wait_applied(&more, Duration::from_secs(30));
    // ...the stale entry is gone and no empty state was written back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(&timers)
            .arg("dora")
            .query(&mut conn)
            .unwrap();
        if score.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stale timer entry kept:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let exists: bool = redis::cmd("EXISTS").arg(&key).query(&mut conn).unwrap();
    assert!(!exists, "no state is recreated for an erased customer");
    assert!(
        tierd.log_text().matches("out of step").count() < 5,
        "no spinning"
    );
}

/// Customer ids come from producers: one carrying a newline or an ANSI escape must not forge
/// or colour tierd's log lines. A timer entry of a customer with no state (an id tierd only
/// learns from Redis) makes the runner log the id; it appears escaped on its own line.
#[test]
fn ids_with_control_characters_are_logged_escaped() {
    let rules = rules_file(
        "version = \"esc-1\"\n[[tiers]]\nname = \"active\"\nwhen = [\"recency_days < 1\"]\n[[tiers]]\nname = \"lapsed\"\n",
    );
    let mut world = World::start(1);
    world.rules = rules.path().to_owned();
    let evil = "x\nFORGED tierd line\u{1b}[31m";
    let _: () = redis::cmd("ZADD")
        .arg(world.keys(0).timers)
        .arg(1)
        .arg(evil)
        .query(&mut world.redis.conn())
        .unwrap();
    let tierd = Tierd::spawn(&world, "[clock]\nmode = \"wall\"\ntick_ms = 100\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    tierd.wait_log("out of step", Duration::from_secs(30));
    let log = tierd.log_text();
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a forged log line:\n{log}"
    );
    assert!(!log.contains('\u{1b}'), "a raw escape character:\n{log:?}");
    assert!(log.contains(r"x\nFORGED tierd line\u{1b}[31m"), "{log}");
}

/// Wall mode on an input written by a transactional producer: its log ends with a commit
/// marker that is never delivered, so the lag to the high watermark never reaches 0. The
/// partition still counts as caught up (librdkafka reports its end, and everything handed
/// over is applied), so a timer fires when it comes due instead of waiting for the next
/// purchase.
#[test]
fn wall_clock_timers_fire_on_a_transactionally_written_input() {
    let rules = rules_file(
        "version = \"tx-1\"\n[[tiers]]\nname = \"active\"\nwhen = [\"recency_days < 1\"]\n[[tiers]]\nname = \"lapsed\"\n",
    );
    let mut world = World::start(1);
    world.rules = rules.path().to_owned();
    let tierd = Tierd::spawn(&world, "[clock]\nmode = \"wall\"\ntick_ms = 100\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    // Tina's recency bound (1 day after this purchase) comes due in 10 s (time for the
    // transaction and its apply on a loaded machine).
    let due = time::now_ms() + 10_000;
    world.produce_in_transaction(&[purchase(
        "t1",
        "tina",
        "10",
        &time::format_ms(due - 86_400_000),
    )]);
    // Not before it is due: only the purchase's change in any read that ended before then.
    loop {
        let changes = world.tiers_and_reasons();
        let read_by = time::now_ms();
        if read_by >= due {
            break;
        }
        assert!(
            changes.len() <= 1,
            "a change {} ms before the due time: {changes:?}",
            due - read_by
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let changes = loop {
        let changes = world.tiers_and_reasons();
        if changes.len() >= 2 {
            break changes;
        }
        assert!(
            Instant::now() < deadline,
            "no time-driven change on a transactional input: {changes:?}\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        time::now_ms() >= due,
        "the timer must not fire before it is due"
    );
    assert_eq!(
        changes,
        vec![
            ("active".to_owned(), "purchase".to_owned()),
            ("lapsed".to_owned(), "recency".to_owned())
        ]
    );
    // The log does end with the marker: the lag stays 1.
    assert_eq!(tierd.metric("tierd_consumer_lag_messages"), 1.0);
    // The reports of the partition's end are expected, not logged as errors.
    let log = tierd.log_text();
    assert!(!log.contains("PartitionEOF"), "{log}");
}

/// Wall mode after a restart with a backlog: a customer whose recency timer came due while
/// tierd was down, but who bought again before it (that purchase still in the backlog), is
/// not moved down and back up. The timer waits until the partition has applied everything
/// that happened before its due time; once the purchase is applied there is nothing to fire.
#[test]
fn wall_clock_timers_wait_for_the_backlog_after_a_restart() {
    let rules = rules_file(
        "version = \"backlog-1\"\n[[tiers]]\nname = \"active\"\nwhen = [\"recency_days < 1\"]\n[[tiers]]\nname = \"lapsed\"\n",
    );
    let mut world = World::start(1);
    world.rules = rules.path().to_owned();
    let config = "[clock]\nmode = \"wall\"\ntick_ms = 100\n";
    let mut tierd = Tierd::spawn(&world, config);
    tierd.wait_partitions(1, Duration::from_secs(60));
    // Kim's recency bound (1 day after this purchase) comes due in 8 s.
    let due = time::now_ms() + 8_000;
    let ends = world.produce_json(&[purchase(
        "k1",
        "kim",
        "10",
        &time::format_ms(due - 86_400_000),
    )]);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));
    // While tierd is down Kim buys again (before the bound), then the bound passes.
    world.produce_json(&[purchase(
        "k2",
        "kim",
        "10",
        &time::format_ms(time::now_ms()),
    )]);
    while time::now_ms() < due + 2_000 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let tierd = Tierd::spawn(&world, config);
    tierd.wait_partitions(1, Duration::from_secs(60));
    world.wait_applied(&BTreeMap::from([(0, 2)]), Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(2_000)); // ticks after catching up
    let changes = world.tiers_and_reasons();
    assert_eq!(
        changes,
        vec![("active".to_owned(), "purchase".to_owned())],
        "{}",
        tierd.log_text()
    );
    assert_eq!(
        world.customer_state("kim").unwrap().tier.as_deref(),
        Some("active")
    );
}

/// Timers due together fire in commits of `clock.timer_batch` (here 1), each atomic: killed
/// (kill -9) between two of them, the restarted instance fires the rest — every customer moved
/// by time exactly once, none twice, a repeat only byte-identical.
#[test]
fn timers_due_together_fire_in_commits_and_a_kill_between_them_loses_and_repeats_none() {
    const N: usize = 2_000;
    let rules = rules_file(
        r#"
version = "chunks-1"
[scores.R]
metric = "recency_days"
bins = [{ score = 2, max = 1 }, { score = 1 }]
[[tiers]]
name = "active"
when = ["score.R >= 2"]
[[tiers]]
name = "none"
"#,
    );
    let mut world = World::start(1);
    world.rules = rules.path().to_owned();
    let extra = "[clock]\nmode = \"event\"\ntimer_batch = 1\n";
    let mut tierd = Tierd::spawn(&world, extra);
    tierd.wait_partitions(1, Duration::from_secs(60));
    let customers: Vec<String> = (0..N).map(|i| format!("c{i:04}")).collect();
    let events: Vec<serde_json::Value> = customers
        .iter()
        .map(|c| purchase(&format!("p-{c}"), c, "100", "2026-11-01T10:00:00Z"))
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(120));

    // Event time moves three days on: every customer's recency timer (two days) is due.
    world.produce_json(&[purchase("clock", "~clock", "0", "2026-11-04T10:00:00Z")]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let fired = loop {
        // A timer is counted as it fires, before its commit: 20 fired, 19 committed.
        let fired = tierd.metric("tierd_timers_fired_total");
        if fired >= 20.0 {
            break fired;
        }
        assert!(
            Instant::now() < deadline,
            "no timer fired:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // Redis frozen first, so the kill lands between two commits whatever the machine's load
    // (the commit in flight, if any, is applied whole or not at all).
    world.redis.pause();
    tierd.kill9();
    world.redis.resume();
    // The kill came between two commits: some customers' moves are stored, not all.
    let moved = customers
        .iter()
        .filter(|c| world.customer_state(c).is_some_and(|s| s.seq == 2))
        .count();
    assert!(
        moved > 0 && moved < N,
        "{moved} of {N} moves committed before the kill ({fired} timers fired)"
    );
    let tierd = Tierd::spawn(&world, extra);
    tierd.wait_partitions(1, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(120);
    while customers
        .iter()
        .any(|c| world.customer_state(c).is_none_or(|s| s.seq != 2))
    {
        assert!(
            Instant::now() < deadline,
            "not every timer fired after the restart:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        tierd.metric("tierd_timers_fired_total") >= 1.0,
        "the restarted instance fired none: the kill came after the last commit"
    );
    world.wait_applied(&BTreeMap::new(), Duration::from_secs(60));

    let mut by_id: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut seqs: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for r in world.read_all(&world.output) {
        let v = r.json();
        let id = v["event_id"].as_str().unwrap().to_owned();
        if let Some(first) = by_id.get(&id) {
            assert_eq!(
                first, &r.value,
                "change {id} published again with another body"
            );
            continue;
        }
        by_id.insert(id, r.value.clone());
        seqs.entry(v["customer_id"].as_str().unwrap().to_owned())
            .or_default()
            .push((
                v["sequence"].as_u64().unwrap(),
                v["reason"].as_str().unwrap().to_owned(),
            ));
    }
    for c in &customers {
        assert_eq!(
            seqs.get(c).map(Vec::as_slice),
            Some(&[(1, "purchase".to_owned()), (2, "recency".to_owned())][..]),
            "{c}: up by the purchase, down by time, once each"
        );
        assert_eq!(world.customer_state(c).unwrap().timer, None, "{c}");
    }
    eprintln!("{moved} of {N} moves committed before the kill");
}
