//! `/healthz` tells the truth (issue 14): it fails when the consumer thread, a partition's
//! runner or its publisher has died or the consumer thread is stuck, and tierd stops when the
//! consumer thread ends — each caused for real inside a running tierd by fault injection
//! (fail-rs points, compiled in by the test build's `--features failpoints`), and nothing is
//! lost or counted twice once a healthy tierd takes over.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::{purchase, Tierd, World};

const EVENT_CLOCK: &str = "[clock]\nmode = \"event\"\nlateness_s = 0\n";

/// One purchase each for `n` new customers named `prefix-i`.
fn purchases(prefix: &str, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            purchase(
                &format!("{prefix}-e{i}"),
                &format!("{prefix}-{i}"),
                "100.00",
                "2026-11-01T10:00:00Z",
            )
        })
        .collect()
}

/// Polls `f` until it gives `Some`, at most `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = f() {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A healthy tierd applies everything produced: each customer's one purchase counted once,
/// and the output topic holds one initial change per customer, each id with one body.
fn healthy_tierd_applies_each_once(
    world: &World,
    ends: &BTreeMap<i32, i64>,
    prefix: &str,
    n: usize,
) {
    let tierd = Tierd::spawn(world, EVENT_CLOCK);
    world.wait_applied_by(&tierd, ends, Duration::from_secs(90));
    for i in 0..n {
        let state = world
            .customer_state(&format!("{prefix}-{i}"))
            .unwrap_or_else(|| panic!("{prefix}-{i} stored"));
        assert_eq!(state.count, 1, "{prefix}-{i}'s purchase counted once");
    }
    for p in ends.keys() {
        world.wait_outbox_drained(*p, Duration::from_secs(60));
    }
    let (last, _) = world.assert_fresh_ids_in_order();
    let told = last.keys().filter(|c| c.starts_with(prefix)).count();
    assert_eq!(told, n, "every customer's initial change published");
    assert_eq!(tierd.get("/healthz"), (200, "ok\n".into()));
    // An orderly stop is no death.
    let mut tierd = tierd;
    assert_eq!(tierd.terminate(), Some(0));
    let log = tierd.log_text();
    assert!(!log.contains("A task of tierd died"), "{log}");
}

#[test]
fn the_consumer_threads_death_stops_tierd_and_nothing_is_lost() {
    let world = World::start(2);
    // The fourth record the consumer thread polls panics it.
    let mut tierd = Tierd::spawn_env(
        &world,
        "",
        EVENT_CLOCK,
        &[("FAILPOINTS", "ingest-record=3*off->panic")],
    );
    tierd.wait_partitions(2, Duration::from_secs(60));
    assert_eq!(tierd.get("/healthz"), (200, "ok\n".into()));
    let ends = world.produce_json(&purchases("dies", 8));

    let code = tierd.wait_exit(Duration::from_secs(60));
    let log = tierd.log_text();
    assert_eq!(code, Some(1), "tierd exits with an error; log:\n{log}");
    assert!(
        log.contains("fatal: the Kafka consumer thread ended"),
        "the exit names the consumer thread; log:\n{log}"
    );
    assert!(
        log.contains("the consumer thread panicked"),
        "the death is logged; log:\n{log}"
    );
    healthy_tierd_applies_each_once(&world, &ends, "dies", 8);
}

#[test]
fn a_stuck_consumer_thread_fails_healthz_until_it_polls_again() {
    let world = World::start(2);
    // The second record polled holds the consumer thread for 15 s: longer than
    // `max.poll.interval.ms` (the test world's session timeout is 6 s; the group needs
    // max.poll.interval.ms ≥ session.timeout.ms).
    let tierd = Tierd::spawn_env(
        &world,
        "\"max.poll.interval.ms\" = \"7000\"\n",
        EVENT_CLOCK,
        &[("FAILPOINTS", "ingest-record=1*off->1*sleep(15000)")],
    );
    tierd.wait_partitions(2, Duration::from_secs(60));
    assert_eq!(tierd.get("/healthz"), (200, "ok\n".into()));
    let ends = world.produce_json(&purchases("stuck", 6));

    let stuck = wait_for("/healthz failing", Duration::from_secs(30), || {
        let (code, body) = tierd.get("/healthz");
        (code == 503).then_some(body)
    });
    assert!(
        stuck.contains("the consumer thread has not polled Kafka for")
            && stuck.contains("max.poll.interval.ms, 7000 ms"),
        "{stuck}"
    );
    // Released, it polls again: alive, rejoins the group and applies everything.
    wait_for("/healthz ok again", Duration::from_secs(40), || {
        (tierd.get("/healthz") == (200, "ok\n".into())).then_some(())
    });
    assert_eq!(tierd.metric("tierd_tasks_died_total"), 0.0);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(90));
    drop(tierd);
    healthy_tierd_applies_each_once(&world, &ends, "stuck", 6);
}

#[test]
fn a_runner_or_publisher_that_panics_fails_healthz_and_a_restart_loses_nothing() {
    let world = World::start(2);
    // The first publish round of the process panics its publisher; the second input batch its
    // runner.
    let tierd = Tierd::spawn_env(
        &world,
        "",
        EVENT_CLOCK,
        &[(
            "FAILPOINTS",
            "runner-batch=1*off->1*panic;publisher-round=1*panic",
        )],
    );
    tierd.wait_partitions(2, Duration::from_secs(60));
    let mut ends = BTreeMap::new();
    for i in 0..6 {
        // One record at a time: each its own batch.
        ends.extend(world.produce_json(&purchases(&format!("panics{i}"), 1)));
        std::thread::sleep(Duration::from_millis(300));
    }

    let health = wait_for(
        "/healthz naming the runner and the publisher",
        Duration::from_secs(60),
        || {
            let (code, body) = tierd.get("/healthz");
            (code == 503 && body.contains("runner panicked") && body.contains("publisher panicked"))
                .then_some(body)
        },
    );
    assert!(
        health.contains("'s runner panicked: failpoint runner-batch panic")
            && health.contains("'s publisher panicked: failpoint publisher-round panic"),
        "{health}"
    );
    assert_eq!(
        tierd.metric_labeled("tierd_tasks_died_total", "task=\"runner\""),
        1.0
    );
    assert_eq!(
        tierd.metric_labeled("tierd_tasks_died_total", "task=\"publisher\""),
        1.0
    );
    assert_eq!(
        tierd.metric_labeled("tierd_tasks_died_total", "task=\"consumer\""),
        0.0
    );
    // (`/readyz/ingest` names the first partition with a problem: the other's lag may come first.)
    wait_for(
        "/readyz naming the stopped runner",
        Duration::from_secs(30),
        || {
            let (code, ready) = tierd.get("/readyz/ingest");
            (code == 503 && ready.contains("assigned but not processed: its runner panicked"))
                .then_some(())
        },
    );
    drop(tierd);
    let all: Vec<(String, usize)> = (0..6).map(|i| (format!("panics{i}"), 1)).collect();
    let t = Tierd::spawn(&world, EVENT_CLOCK);
    world.wait_applied_by(&t, &ends, Duration::from_secs(90));
    for p in ends.keys() {
        world.wait_outbox_drained(*p, Duration::from_secs(60));
    }
    for (prefix, _) in &all {
        let state = world
            .customer_state(&format!("{prefix}-0"))
            .expect("stored");
        assert_eq!(state.count, 1, "{prefix}-0's purchase counted once");
    }
    let (last, _) = world.assert_fresh_ids_in_order();
    assert_eq!(
        last.keys().filter(|c| c.starts_with("panics")).count(),
        6,
        "every customer's initial change published"
    );
    assert_eq!(t.get("/healthz"), (200, "ok\n".into()));
}
