//! Correct under Redis data loss: Redis is rolled back to an earlier snapshot while tierd
//! runs (a restored backup, a failover to a lagging replica). tierd must notice that Redis no
//! longer holds what it committed, drop its cache, re-read from the restored offset, and end
//! with exactly the state of counting every event once — re-publishing lost changes with the
//! same ids.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use support::{purchase, Tierd, World};
use tierd::model::time;

fn phase(world: &World, from: usize, to: usize) -> BTreeMap<i32, i64> {
    let events: Vec<_> = (from..to)
        .map(|i| {
            purchase(
                &format!("e{i}"),
                &format!("c{}", i % 50),
                "50000",
                "2026-11-10T10:00:00Z",
            )
        })
        .collect();
    world.produce_json(&events)
}

#[test]
fn a_redis_rollback_is_detected_and_replayed_exactly() {
    let world = World::start(2);
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(2, Duration::from_secs(60));

    world.wait_applied(&phase(&world, 0, 500), Duration::from_secs(60));
    let before = world.snapshot();
    let mut ends_b = phase(&world, 500, 1000);
    // Customers first seen in phase B: their creation is lost too and replayed, so their
    // change ids (which include the event that created them) must come out the same.
    let newcomers: Vec<serde_json::Value> = (0..10)
        .map(|i| {
            purchase(
                &format!("n{i}"),
                &format!("new{i}"),
                "50000",
                "2026-11-10T11:00:00Z",
            )
        })
        .collect();
    for (p, end) in world.produce_json(&newcomers) {
        let e = ends_b.entry(p).or_insert(end);
        *e = (*e).max(end);
    }
    world.wait_applied(&ends_b, Duration::from_secs(60));
    let changes_before_rollback = world.read_all(&world.output).len();

    // Redis loses everything phase B wrote.
    world.restore(&before);
    assert!(
        (0..2).all(|p| world.partition_meta(p).1 < ends_b[&p]),
        "rolled back"
    );

    // New events arrive; tierd's next commit finds Redis behind its own last commit.
    let ends_c = phase(&world, 1000, 1500);
    world.wait_applied(&ends_c, Duration::from_secs(90));

    for c in 0..50 {
        let s = world.customer_state(&format!("c{c}")).unwrap();
        assert_eq!(
            (s.count, s.sum),
            (30, 30 * 5_000_000),
            "c{c}: every event counted exactly once"
        );
        assert_eq!(s.tier.as_deref(), Some("A"));
    }
    assert!(
        tierd.log_text().contains("Redis diverged"),
        "the divergence was detected"
    );
    assert!(
        tierd.metric_labeled("tierd_partition_stops_total", "cause=\"diverged\"") >= 1.0,
        "the divergence was counted"
    );
    assert!(
        tierd.metric("tierd_partitions_assigned") >= 2.0,
        "the partitions were claimed again"
    );

    // Phase B's changes were re-published with the same ids; none is missing.
    let records = world.read_all(&world.output);
    assert!(records.len() > changes_before_rollback);
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    let mut by_sequence: HashMap<(String, u64), String> = HashMap::new();
    for r in &records {
        let v = r.json();
        let id = v["event_id"].as_str().unwrap().to_owned();
        let sequence = (
            v["customer_id"].as_str().unwrap().to_owned(),
            v["sequence"].as_u64().unwrap(),
        );
        if let Some(prev) = by_sequence.insert(sequence.clone(), id.clone()) {
            assert_eq!(prev, id, "{sequence:?} re-published under another id");
        }
        if let Some(prev) = by_id.insert(id, v.clone()) {
            assert_eq!(prev, v, "a re-published change is identical");
        }
    }
    let customers = (0..50)
        .map(|c| format!("c{c}"))
        .chain((0..10).map(|i| format!("new{i}")));
    for c in customers {
        let state = world.customer_state(&c).unwrap();
        assert!(state.seq >= 1 && state.origin.is_some(), "{c}: {state:?}");
        for n in 1..=state.seq {
            let id = tierd::model::change::change_id(&c, state.origin, n);
            assert!(by_id.contains_key(&id), "{c} change {n} published");
        }
    }
}

/// Redis loses the last writes of partitions that then receive no more input (the end of a
/// burst, a quiet night): tierd notices by itself, without waiting for new input, and applies
/// the lost events again. (Before: the partitions stayed behind until their next event, with
/// the lost purchases missing from the state and the API.)
#[test]
fn a_rollback_of_quiet_partitions_is_replayed_without_new_input() {
    let world = World::start(2);
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(2, Duration::from_secs(60));
    world.wait_applied(&phase(&world, 0, 500), Duration::from_secs(60));
    let before = world.snapshot();
    let ends = phase(&world, 500, 1000);
    world.wait_applied(&ends, Duration::from_secs(60));

    world.restore(&before);
    assert!(
        (0..2).all(|p| world.partition_meta(p).1 < ends[&p]),
        "rolled back"
    );
    // No new event: the partitions must find out on their own.
    world.wait_applied(&ends, Duration::from_secs(60));
    for c in 0..50 {
        let s = world.customer_state(&format!("c{c}")).unwrap();
        assert_eq!(
            (s.count, s.sum),
            (20, 20 * 5_000_000),
            "c{c}: every event counted exactly once"
        );
    }
    assert!(
        tierd.log_text().contains("Redis diverged"),
        "the divergence was detected"
    );
}

/// A claim between the snapshot and the rollback: tierd restarts (its claims raise the
/// partitions' epochs), then Redis comes back with the older epochs and offsets (an
/// `everysec` AOF, a lagging replica). The running owner must not stay fenced by the epoch
/// Redis forgot: it claims the partitions again and replays what was lost, every event once.
#[test]
fn a_rollback_across_a_claim_is_replayed_exactly() {
    let world = World::start(2);
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(2, Duration::from_secs(60));
    world.wait_applied(&phase(&world, 0, 500), Duration::from_secs(60));
    let before = world.snapshot();
    let epochs: Vec<i64> = (0..2).map(|p| world.partition_meta(p).0).collect();

    assert_eq!(tierd.terminate(), Some(0));
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(2, Duration::from_secs(60));
    let ends = phase(&world, 500, 1000);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert!(
        (0..2).all(|p| world.partition_meta(p).0 > epochs[p as usize]),
        "claimed again after the restart"
    );

    world.restore(&before);
    assert!(
        (0..2).all(|p| world.partition_meta(p).0 == epochs[p as usize]
            && world.partition_meta(p).1 < ends[&p]),
        "rolled back to the older epochs and offsets"
    );
    let ends = phase(&world, 1000, 1500);
    world.wait_applied(&ends, Duration::from_secs(90));
    for c in 0..50 {
        let s = world.customer_state(&format!("c{c}")).unwrap();
        assert_eq!(
            (s.count, s.sum),
            (30, 30 * 5_000_000),
            "c{c}: every event counted exactly once"
        );
    }
    assert_eq!(tierd.metric("tierd_partitions_stopped"), 0.0);
}

/// Wall clock (the default): a timer fires when the partition is caught up, so which input
/// precedes it depends on when it ran. Here Kim buys, her recency bound fires (lapsed), then
/// a purchase dated just before the bound arrives late (active again). Redis then loses all
/// three.
/// The replay reads the late purchase at once, long after the bound: fired after it, the
/// timer would find nothing to do, and the published lapse would never be decided again —
/// its id reused for another change, the state not the one the published changes describe.
/// tierd records each wall-clock pass (input offset, horizon) in the published position, and
/// the replay fires it at the same offset.
#[test]
fn a_rollback_replays_wall_clock_timers_where_they_first_fired() {
    let (world, _rules) = lapse_world();
    let tierd = Tierd::spawn(&world, "[clock]\nmode = \"wall\"\ntick_ms = 100\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    // Redis will lose everything from here: the replay applies Kim's first purchase, then
    // must fire the recorded pass at the next offset, before the late purchase.
    let before = world.snapshot();
    let due = time::now_ms() + 5_000;
    let ends = world.produce_json(&[purchase(
        "k1",
        "kim",
        "10",
        &time::format_ms(due - 86_400_000),
    )]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let changes = |n: usize| changes_at_least(&world, &tierd, n);
    assert_eq!(changes(2)[1]["tier"], "lapsed");
    let ends = world.produce_json(&[purchase("k2", "kim", "10", &time::format_ms(due - 2_000))]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let published = changes(3);
    assert_eq!(published.len(), 3, "{published:?}");
    assert_eq!(published[2]["tier"], "active");
    let live = world.customer_state("kim").unwrap();

    // Redis loses the lapse and the late purchase; tierd notices by itself (no new input).
    world.restore(&before);
    wait_replayed(&world, &tierd, ends[&0]);
    let replayed = world.customer_state("kim").unwrap();
    assert_eq!(replayed, live, "the replay ends in the live state");
    assert!(
        tierd
            .log_text()
            .contains("firing the timers of a published pass"),
        "{}",
        tierd.log_text()
    );
    // Every change id carries one body, and every change of the state is on the topic.
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    for v in changes(3) {
        let id = v["event_id"].as_str().unwrap().to_owned();
        if let Some(prev) = by_id.insert(id, v.clone()) {
            assert_eq!(prev, v, "a re-published change is identical");
        }
    }
    assert_eq!(by_id.len(), 3, "{by_id:?}");
}

/// The same beyond the offset metadata: with the smallest position budget (about ten timer
/// passes) sixteen customers lapse one after the other, each bought again by a purchase dated
/// before their bound that arrives after the lapse; then Redis loses everything. The passes
/// the metadata dropped are read back from the history topic (`kafka.history_topic`), so
/// each lapse is decided again where it first was and every change id keeps its body.
/// Without them the replay applied the late purchases before the early timers fired: no lapse,
/// and change ids carried other bodies.
#[test]
fn a_rollback_beyond_the_positions_metadata_replays_timer_passes_from_the_history_topic() {
    let (world, _rules) = lapse_world();
    let (tierd, run) = lapses(&world);
    // Redis loses everything; tierd notices by itself (no new input).
    let log = roll_back(&world, &tierd, &run);
    assert!(log.contains(HISTORY_READ), "{log}");
    assert_lapses_replayed(&world, &run, 0..LAPSES);
}

/// The history topic's retention deleted the records of the first three lapses (here
/// `DeleteRecords`, as retention does): the read uses the run of records still there, so the
/// three lapses after them, which neither the metadata (about ten passes) nor anything else
/// keeps, are still decided again where they first were. (Before them, timers fire as the
/// backlog is applied, as documented.) Without the history read, `k3` ended in another state.
#[test]
fn a_rollback_beyond_the_history_topics_retention_replays_what_it_still_keeps() {
    let (world, _rules) = lapse_world();
    let (tierd, run) = lapses(&world);
    // `k{i}`'s lapse fired with its purchase at input offset 2i applied (next offset 2i + 1).
    let history = world.read_all(&world.history);
    let first_kept = history
        .iter()
        .find(|r| {
            r.json()["t"]
                .as_array()
                .is_some_and(|t| t.iter().any(|p| p["o"].as_i64() >= Some(7)))
        })
        .expect("a record with k3's lapse")
        .offset;
    world.broker.delete_records(&world.history, 0, first_kept);
    let log = roll_back(&world, &tierd, &run);
    assert!(log.contains(HISTORY_READ), "{log}");
    assert_lapses_replayed(&world, &run, 3..LAPSES);
}

/// Every history record deleted: the read cannot find the position's last record, is tried
/// three times, then the replay goes on with what the metadata keeps (logged as an error
/// naming `kafka.history_topic`): the partition is processed, and the lapses the metadata
/// keeps (the last ten or so) are decided again where they first were.
#[test]
fn a_history_topic_read_that_fails_falls_back_to_the_metadata_and_goes_on() {
    let (world, _rules) = lapse_world();
    let (tierd, run) = lapses(&world);
    let end = world.read_all(&world.history).last().unwrap().offset + 1;
    world.broker.delete_records(&world.history, 0, end);
    let log = roll_back(&world, &tierd, &run);
    assert!(
        log.contains("Cannot read the partition's replay history from the history topic (kafka.history_topic)"),
        "{log}"
    );
    assert_eq!(tierd.metric("tierd_partitions_stopped"), 0.0);
    assert_lapses_replayed(&world, &run, LAPSES - 6..LAPSES);
}

/// What tierd logs once it read a partition's history.
const HISTORY_READ: &str = "Read the partition's replay history from the history topic";

/// Redis loses everything [`lapses`] wrote; returns `tierd`'s log once it replayed.
fn roll_back(world: &World, tierd: &Tierd, run: &LapseRun) -> String {
    world.restore(&run.before);
    wait_replayed(world, tierd, run.end);
    tierd.log_text()
}

/// Customers lapsing one after the other in [`lapses`].
const LAPSES: usize = 16;

/// What [`lapses`] ran.
struct LapseRun {
    /// Redis before the first purchase.
    before: Vec<(String, Vec<u8>)>,
    /// The input end after the last purchase.
    end: i64,
    /// Each customer's live state.
    live: Vec<tierd::model::CustomerState>,
    /// Every change published.
    published: Vec<serde_json::Value>,
}

/// With the smallest position budget (about ten timer passes), [`LAPSES`] customers `k{i}`
/// lapse one after the other, each bought again by a purchase dated before their bound that
/// arrives after the lapse.
fn lapses(world: &World) -> (Tierd, LapseRun) {
    let tierd = Tierd::spawn(
        world,
        "[clock]\nmode = \"wall\"\ntick_ms = 100\n[publish]\nposition_metadata_bytes = 1000\n",
    );
    tierd.wait_partitions(1, Duration::from_secs(60));
    let before = world.snapshot();
    let changes = |n: usize| changes_at_least(world, &tierd, n);
    let mut ends = BTreeMap::new();
    for i in 0..LAPSES {
        let customer = format!("k{i}");
        let due = time::now_ms() + 1_000;
        let bought = |id: &str, at: i64| purchase(id, &customer, "10", &time::format_ms(at));
        world.produce_json(&[bought(&format!("{customer}a"), due - 86_400_000)]);
        let lapsed = changes(3 * i + 2);
        assert_eq!(lapsed[3 * i + 1]["tier"], "lapsed", "{lapsed:?}");
        ends = world.produce_json(&[bought(&format!("{customer}b"), due - 500)]);
        assert_eq!(changes(3 * i + 3)[3 * i + 2]["tier"], "active");
    }
    world.wait_applied(&ends, Duration::from_secs(60));
    let live = (0..LAPSES)
        .map(|i| world.customer_state(&format!("k{i}")).unwrap())
        .collect();
    let published = changes(3 * LAPSES);
    let run = LapseRun {
        before,
        end: ends[&0],
        live,
        published,
    };
    (tierd, run)
}

/// The customers `k{i}` for `i` in `customers` end in their live state, and each of their
/// changes on the output topic carries the body it was first published with (no other
/// change of theirs).
fn assert_lapses_replayed(world: &World, run: &LapseRun, customers: std::ops::Range<usize>) {
    let ours = |v: &serde_json::Value| {
        customers
            .clone()
            .any(|i| v["customer_id"] == format!("k{i}"))
    };
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    for v in world
        .read_all(&world.output)
        .iter()
        .map(support::Record::json)
        .filter(ours)
    {
        let id = v["event_id"].as_str().unwrap().to_owned();
        if let Some(prev) = by_id.insert(id, v.clone()) {
            assert_eq!(prev, v, "a re-published change is identical");
        }
    }
    let first = run.published.iter().filter(|v| ours(v)).count();
    assert_eq!(by_id.len(), first, "no other change: {by_id:?}");
    for i in customers {
        let replayed = world.customer_state(&format!("k{i}")).unwrap();
        assert_eq!(
            replayed, run.live[i],
            "k{i}: the replay ends in the live state"
        );
    }
}

/// One partition running `lapse-1` on the wall clock: `active` within a day of the latest
/// purchase, `lapsed` after. Keep the file while the world runs.
fn lapse_world() -> (World, tempfile::NamedTempFile) {
    let rules = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        rules.path(),
        "version = \"lapse-1\"\n[[tiers]]\nname = \"active\"\nwhen = [\"recency_days < 1\"]\n[[tiers]]\nname = \"lapsed\"\n",
    )
    .unwrap();
    let mut world = World::start(1);
    world.rules = rules.path().to_owned();
    (world, rules)
}

/// The changes on the output topic once there are at least `n`.
fn changes_at_least(world: &World, tierd: &Tierd, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let records: Vec<serde_json::Value> = world
            .read_all(&world.output)
            .iter()
            .map(support::Record::json)
            .collect();
        if records.len() >= n {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{records:?}\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until partition 0's stored offset is back at `end`, then for ticks after it.
fn wait_replayed(world: &World, tierd: &Tierd, end: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.partition_meta(0).1 < end {
        assert!(
            Instant::now() < deadline,
            "not replayed:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2)); // ticks after catching up
}
