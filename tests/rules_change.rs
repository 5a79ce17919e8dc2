//! A new rules version re-evaluates every stored customer in a paced sweep, emitting
//! `rules_changed` changes exactly once — even when tierd is killed in the middle of it.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};
use support::kafka_proxy::{self, KafkaProxy};
use support::{purchase, Tierd, World};
use tierd::model::time;

const V2: &str = r#"
version = "b2b-lifetime-2"
[[tiers]]
name = "A"
when = ["sum >= 800000"]
[[tiers]]
name = "B"
when = ["sum >= 300000"]
[[tiers]]
name = "C"
when = ["sum >= 100000"]
[[tiers]]
name = "D"
"#;

/// Recency rules: active within a day of the last purchase, lapsed after.
const RECENCY_2: &str = "version = \"recency-2\"\n[[tiers]]\nname = \"active\"\nwhen = [\"recency_days < 1\"]\n[[tiers]]\nname = \"lapsed\"\n";

/// Recency rules `version`: active within `days` of the last purchase, lapsed after.
fn recency(version: &str, days: u32) -> String {
    format!("version = \"{version}\"\n[[tiers]]\nname = \"active\"\nwhen = [\"recency_days < {days}\"]\n[[tiers]]\nname = \"lapsed\"\n")
}

/// How many of `c0..c{n-1}` are stored as lapsed.
fn lapsed_of(world: &World, n: i64) -> i64 {
    (0..n)
        .filter(|i| {
            world
                .customer_state(&format!("c{i}"))
                .is_some_and(|s| s.tier.as_deref() == Some("lapsed"))
        })
        .count() as i64
}

/// Writes `text` to a rules file `world`'s next tierd runs (kept while the file lives).
fn use_rules(world: &mut World, text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    world.rules = file.path().to_owned();
    file
}

fn tier(units: i64, bounds: [i64; 3]) -> &'static str {
    ["A", "B", "C", "D"][bounds.iter().position(|&b| units >= b).unwrap_or(3)]
}

/// One purchase per customer `c0..c{n-1}` (event ids `{prefix}{i}`), customer `i` spending
/// `amount(i)` at `at`.
fn purchases(
    prefix: &str,
    customers: impl Iterator<Item = i64>,
    amount: impl Fn(i64) -> String,
    at: &str,
) -> Vec<serde_json::Value> {
    customers
        .map(|i| purchase(&format!("{prefix}{i}"), &format!("c{i}"), &amount(i), at))
        .collect()
}

/// The stored states of `c0..c{n-1}`.
fn states(world: &World, n: i64) -> Vec<tierd::model::CustomerState> {
    (0..n)
        .map(|i| world.customer_state(&format!("c{i}")).unwrap())
        .collect()
}

/// Whether every one of `c0..c{n-1}` is under rules `version` (the replay went through its
/// sweep).
fn swept_to(version: &str, n: i64) -> impl Fn(&World) -> bool {
    let hash = tierd::model::state::rules_hash(version);
    move |world| states(world, n).iter().all(|s| s.rules_hash == hash)
}

/// Waits until `tierd`'s sweeps re-evaluated at least `customers` customers.
fn wait_swept(tierd: &Tierd, customers: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_rules_sweep_customers_total") < customers {
        assert!(
            Instant::now() < deadline,
            "sweep did not start:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `tierd` completed the sweep of `partitions` partitions (within 120 s).
fn wait_sweeps_done(tierd: &Tierd, partitions: f64) {
    wait_sweeps_done_within(tierd, partitions, Duration::from_secs(120));
}

/// [`wait_sweeps_done`] within `timeout`.
fn wait_sweeps_done_within(tierd: &Tierd, partitions: f64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while tierd.metric("tierd_rules_sweep_partitions_done") < partitions {
        assert!(
            Instant::now() < deadline,
            "sweep did not finish:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After a Redis rollback: waits until the replay applied up to `end`, `replayed` holds and the
/// outbox drained; then checks it ended in the `live` states and that every change id on the
/// output topic (more than `published` records now) carries one body.
fn assert_replayed_identically(
    world: &World,
    tierd: &Tierd,
    ends: &BTreeMap<i32, i64>,
    replayed: impl Fn(&World) -> bool,
    live: &[tierd::model::CustomerState],
    published: usize,
) {
    assert_replayed_identically_by(world, tierd, ends, replayed, live, published, true);
}

/// [`assert_replayed_identically`] by `tierd` running when Redis lost the writes (`reclaimed`:
/// fenced by the restored epoch, it claims the partition again) or started after.
fn assert_replayed_identically_by(
    world: &World,
    tierd: &Tierd,
    ends: &BTreeMap<i32, i64>,
    replayed: impl Fn(&World) -> bool,
    live: &[tierd::model::CustomerState],
    published: usize,
    reclaimed: bool,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while ends
        .iter()
        .any(|(&p, &end)| world.partition_meta(p).1 < end || world.outbox_len(p) > 0)
        || !replayed(world)
    {
        assert!(
            Instant::now() < deadline,
            "not replayed:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1)); // ticks after the replay
    world.wait_applied(ends, Duration::from_secs(60));
    // The restored epoch is older than the running owner's: fenced, claimed again.
    let log = tierd.log_text();
    assert!(
        !reclaimed || log.contains("Partition claimed again"),
        "{log}"
    );
    assert!(log.contains("Resuming the recorded rules sweep"), "{log}");
    for (i, (replayed, live)) in states(world, live.len() as i64)
        .iter()
        .zip(live)
        .enumerate()
    {
        assert_eq!(replayed, live, "c{i}: the replay ends in the live state");
    }
    assert_one_body_per_change_id(world, published);
}

/// Checks that the output topic holds more than `published` records now, and that every
/// change id on it carries one body.
fn assert_one_body_per_change_id(world: &World, published: usize) {
    let records = world.assert_one_body_per_change_id();
    assert!(records.len() > published, "changes were published again");
}

#[test]
fn a_rules_change_sweeps_every_customer_once_across_a_crash() {
    sweeps_every_customer_once_through(World::start(2), Fault::Kill9);
}

/// The same on a Redis Cluster over 8 partitions: each partition's sweep scans its keys on the
/// master of its slot.
#[test]
fn a_rules_change_on_a_redis_cluster_sweeps_every_customer_once_across_a_crash() {
    sweeps_every_customer_once_through(
        World::start_with(8, support::Redis::start_cluster()),
        Fault::Kill9,
    );
}

/// On a Redis Cluster, every slot of partition 0's master moves to another master
/// (`redis-cli --cluster reshard`) while the partitions sweep: their scans start again on the
/// new master and every customer is swept, its change published once.
#[test]
fn a_rules_change_on_a_redis_cluster_sweeps_every_customer_once_through_a_slot_migration() {
    sweeps_every_customer_once_through(
        World::start_with(8, support::Redis::start_cluster()),
        Fault::SlotMigration,
    );
}

/// On a Redis Cluster, partition 0's master is killed while the partitions sweep, and its
/// replica, promoted, lacks the master's last second of writes (swept customers, the sweep's
/// progress): the partitions on it are found diverged and replayed, their sweeps resumed, and
/// every customer ends under the new rules, its change published once (a repeat identical).
#[test]
fn a_rules_change_on_a_redis_cluster_sweeps_every_customer_once_through_a_failover() {
    sweeps_every_customer_once_through(
        World::start_with(8, support::Redis::start_cluster()),
        Fault::Failover,
    );
}

/// What happens to a rules sweep under way.
enum Fault {
    /// Its instance is killed (`kill -9`) and another one finishes it.
    Kill9,
    /// Every slot of partition 0's master moves to another master.
    SlotMigration,
    /// Partition 0's master fails over to a replica that lacks its last writes.
    Failover,
}

fn sweeps_every_customer_once_through(mut world: World, fault: Fault) {
    let partitions = world.partitions;
    let n = 3000i64;
    let amount = |i: i64| (i * 7919) % 1_200_000;
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(i64::from(partitions), Duration::from_secs(60));
    let events = purchases("e", 0..n, |i| amount(i).to_string(), "2026-11-01T10:00:00Z");
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(120));
    assert_eq!(tierd.terminate(), Some(0));
    let before = world.read_all(&world.output).len();
    assert_eq!(before as i64, n, "one initial placement each");

    let _rules = use_rules(&mut world, V2);
    // A slow sweep, broken in the middle (a reshard takes seconds: slower still).
    let rate = match fault {
        Fault::Kill9 => 300,
        Fault::SlotMigration | Fault::Failover => 20,
    };
    world.rules_extra = format!("sweep_per_second = {rate}");
    let mut tierd = Tierd::spawn(&world, "");
    wait_swept(&tierd, 600.0);
    // Each partition has ~375 customers to sweep: at 20 a second, ~15 s are left.
    assert!(
        tierd.metric("tierd_rules_sweep_partitions_done") == 0.0,
        "the fault comes while every partition sweeps"
    );
    let meta = world.keys(0).meta;
    let tierd = match fault {
        Fault::Kill9 => {
            tierd.kill9();
            world.rules_extra = "sweep_per_second = 5000".into();
            Tierd::spawn(&world, "")
        }
        Fault::SlotMigration => {
            world.redis.move_every_slot_of(&meta);
            tierd
        }
        Fault::Failover => {
            world.redis.fail_over_losing_writes(&meta);
            tierd
        }
    };
    // Slow sweeps (20 customers a second), and a partition whose scan saw its slot migrating
    // sweeps once more: in a debug build beside other tests (CI), 8 partitions took up to
    // 110 s, and partition 0's second pass went past 120 s.
    wait_sweeps_done_within(&tierd, f64::from(partitions), Duration::from_secs(420));
    if matches!(fault, Fault::Failover) {
        tierd.assert_lost_writes_noticed();
    }
    // Every stored customer is now placed by v2.
    let hash = tierd::model::state::rules_hash("b2b-lifetime-2");
    let mut expected_changes = HashMap::new();
    for i in 0..n {
        let c = format!("c{i}");
        let s = world.customer_state(&c).unwrap();
        let units = amount(i);
        let (old, new) = (
            tier(units, [1_000_000, 500_000, 200_000]),
            tier(units, [800_000, 300_000, 100_000]),
        );
        assert_eq!((s.tier.as_deref(), s.rules_hash), (Some(new), hash), "{c}");
        if old != new {
            expected_changes.insert(c, (old, new));
        }
    }
    assert!(
        expected_changes.len() > 500,
        "the new bounds move many customers"
    );
    // Wait for the outbox to drain, then check the published changes.
    world.wait_applied(&BTreeMap::new(), Duration::from_secs(60));
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    for r in world.read_all(&world.output) {
        let v = r.json();
        if v["reason"] != "rules_changed" {
            continue;
        }
        if let Some(prev) = by_id.insert(v["event_id"].as_str().unwrap().to_owned(), v.clone()) {
            assert_eq!(prev, v, "a duplicate publication must be identical");
        }
    }
    assert_eq!(
        by_id.len(),
        expected_changes.len(),
        "one rules_changed change per moved customer"
    );
    for v in by_id.values() {
        let c = v["customer_id"].as_str().unwrap();
        let (old, new) = expected_changes[c];
        assert_eq!(
            (
                v["previous_tier"].as_str(),
                v["tier"].as_str(),
                v["sequence"].as_u64(),
                v["rules_version"].as_str()
            ),
            (Some(old), Some(new), Some(2), Some("b2b-lifetime-2")),
            "{c}"
        );
    }
}

#[test]
fn timers_set_by_a_rules_sweep_fire() {
    let mut world = World::start(1);
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    // Bought a day ago minus 4 s: under v2 they are active for 4 more seconds.
    let bought = tierd::model::time::now_ms() - 86_400_000 + 4_000;
    let events: Vec<serde_json::Value> = (0..6)
        .map(|i| {
            purchase(
                &format!("e{i}"),
                &format!("c{i}"),
                "10",
                &tierd::model::time::format_ms(bought + i),
            )
        })
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));
    let _rules = use_rules(&mut world, RECENCY_2);
    let tierd = Tierd::spawn(&world, "[clock]\nmode = \"wall\"\ntick_ms = 100\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lapsed = (0..6)
            .filter(|i| {
                world
                    .customer_state(&format!("c{i}"))
                    .and_then(|s| s.tier)
                    .as_deref()
                    == Some("lapsed")
            })
            .count();
        if lapsed == 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{lapsed} of 6 lapsed:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    world.wait_applied(&BTreeMap::new(), Duration::from_secs(60));
    let reasons: Vec<String> = world
        .read_all(&world.output)
        .iter()
        .map(|r| r.json()["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| *r == "rules_changed").count(),
        6,
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| *r == "recency").count(),
        6,
        "{reasons:?}"
    );
}

/// Issue 11, item 13: a rolling restart with two rules versions. An instance on the new
/// version takes some partitions and re-places their customers; when it leaves, the instance
/// still on the old version is assigned them but may not claim them (that would move the
/// customers back: a flap); it shows them as not processed until it is upgraded too.
#[test]
fn an_older_rules_version_cannot_take_back_a_partition_a_newer_one_ran() {
    let mut world = World::start(4);
    let mut old = Tierd::spawn(&world, "");
    old.wait_partitions(4, Duration::from_secs(60));
    // 400,000: C under v1 (C from 200,000, B from 500,000), B under v2 (B from 300,000).
    let customers: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    let events: Vec<serde_json::Value> = customers
        .iter()
        .map(|c| purchase(&format!("e-{c}"), c, "400000", "2026-11-01T10:00:00Z"))
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));

    let _rules = use_rules(&mut world, V2);
    let mut new = Tierd::spawn(&world, "");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (o, n) = (
            old.metric("tierd_partitions_assigned"),
            new.metric("tierd_partitions_assigned"),
        );
        if n >= 1.0 && o + n == 4.0 && new.metric("tierd_rules_sweep_partitions_done") >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new instance did not take and sweep partitions:\n{}",
            new.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let taken = new.metric("tierd_partitions_assigned");
    let tier_of = |c: &str| world.customer_state(c).unwrap().tier.unwrap();
    let upgraded: Vec<&String> = customers.iter().filter(|c| tier_of(c) == "B").collect();
    assert!(
        !upgraded.is_empty(),
        "the new instance re-placed its customers"
    );

    // The new instance leaves (e.g. its rollout is paused): the old one is assigned all four.
    assert_eq!(new.terminate(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    while old.metric("tierd_partitions_assigned") < 4.0
        || old.metric("tierd_partitions_stopped") < taken
    {
        // Without the fence the old instance claims them and sweeps the customers back.
        let flapped: Vec<&&String> = upgraded.iter().filter(|c| tier_of(c) != "B").collect();
        assert!(flapped.is_empty(), "moved back to v1: {flapped:?}");
        assert!(
            Instant::now() < deadline,
            "the old instance did not report the refused partitions:\n{}",
            old.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    for c in &upgraded {
        assert_eq!(tier_of(c), "B", "{c} moved back to v1");
    }
    let (status, body) = old.get("/readyz/ingest");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("\"b2b-lifetime-1\" is older than \"b2b-lifetime-2\""),
        "{body}"
    );

    // The old instance is upgraded too: every partition runs v2, everyone is B, and no
    // customer ever moved back and forth.
    assert_eq!(old.terminate(), Some(0));
    let upgraded_too = Tierd::spawn(&world, "");
    upgraded_too.wait_partitions(4, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    while customers.iter().any(|c| tier_of(c) != "B") {
        assert!(Instant::now() < deadline, "{}", upgraded_too.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(upgraded_too.metric("tierd_partitions_stopped"), 0.0);
    world.wait_applied(&BTreeMap::new(), Duration::from_secs(60));
    let mut tiers: HashMap<String, Vec<String>> = HashMap::new();
    for r in world.read_all(&world.output) {
        let v = r.json();
        tiers
            .entry(v["customer_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(v["tier"].as_str().unwrap().to_owned());
    }
    for c in &customers {
        assert_eq!(tiers[c], ["C", "B"], "{c}: placed, then moved once");
    }
}

/// Issue 11, items 9 and 12 on a rules sweep: its pages run while input goes on, so which
/// customers a page reaches before their next purchase, and when, depends on timing. Redis
/// then loses the whole sweep (a restored backup): the replay must publish every change
/// again with the same body — the sweep re-evaluates at its recorded start time, and a
/// customer a purchase reaches first is moved to the new rules before the purchase, as a page
/// would have done.
#[test]
fn a_rollback_during_a_rules_sweep_republishes_its_changes_identically() {
    let mut world = World::start(1);
    let n = 200i64;
    let amount = |i: i64| (i * 7919) % 1_200_000;
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let events = purchases("e", 0..n, |i| amount(i).to_string(), "2026-11-01T10:00:00Z");
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(120));
    assert_eq!(tierd.terminate(), Some(0));
    // Redis will lose everything from here on.
    let before = world.snapshot();

    let _rules = use_rules(&mut world, V2);
    // 2 customers per 100 ms: the sweep takes about 10 s.
    world.rules_extra = "sweep_per_second = 20".into();
    let tierd = Tierd::spawn(&world, "");
    wait_swept(&tierd, 20.0);
    // Mid-sweep: purchases of every fifth customer, some of them reached by a page already.
    let late = purchases(
        "f",
        (0..n).step_by(5),
        |_| "150000".into(),
        "2026-11-02T10:00:00Z",
    );
    let ends = world.produce_json(&late);
    world.wait_applied(&ends, Duration::from_secs(60));
    let swept_before_purchases = tierd.metric("tierd_rules_sweep_customers_total");
    wait_sweeps_done(&tierd, 1.0);
    world.wait_applied(&ends, Duration::from_secs(60));
    let live = states(&world, n);
    let published = world.read_all(&world.output).len();
    assert!(
        live.iter().step_by(5).all(|s| s.count == 2),
        "purchases applied"
    );
    assert!(
        swept_before_purchases < n as f64,
        "the purchases came while the sweep was under way"
    );

    // Redis loses the whole sweep and the purchases; tierd notices by itself and replays.
    world.restore(&before);
    let swept = swept_to("b2b-lifetime-2", n);
    assert_replayed_identically(&world, &tierd, &ends, swept, &live, published);
}

/// Redis's keys as `World::snapshot` dumps them.
type Snapshot = Vec<(String, Vec<u8>)>;

/// Customer `i`'s first purchase in [`lost_under_b2b_1`].
fn first_spend(i: i64) -> i64 {
    (i * 7919) % 1_200_000
}

/// Under `b2b-lifetime-1` (tierd with config `extra`): `c0..c{N-1}` placed, Redis
/// snapshotted, then every other customer buys again, some crossing its bounds (200,000 /
/// 500,000 / 1,000,000, not the later versions'); tierd stopped. Returns the snapshot and the
/// input's ends.
fn lost_under_b2b_1(world: &World, extra: &str) -> (Snapshot, BTreeMap<i32, i64>) {
    let mut tierd = Tierd::spawn(world, extra);
    tierd.wait_partitions(1, Duration::from_secs(60));
    let first = purchases(
        "e",
        0..N,
        |i| first_spend(i).to_string(),
        "2026-11-01T10:00:00Z",
    );
    world.wait_applied(&world.produce_json(&first), Duration::from_secs(120));
    // Redis will lose everything from here on, the input below included.
    let before = world.snapshot();
    let second = purchases(
        "g",
        (0..N).step_by(2),
        |_| "150000".into(),
        "2026-11-01T12:00:00Z",
    );
    let ends = world.produce_json(&second);
    world.wait_applied(&ends, Duration::from_secs(60));
    let moved_under_v1 = world
        .read_all(&world.output)
        .iter()
        .map(support::Record::json)
        .filter(|c| {
            c["cause"]["event_id"]
                .as_str()
                .is_some_and(|e| e.starts_with('g'))
        })
        .count();
    assert!(moved_under_v1 > 0, "the second purchases moved customers");
    assert_eq!(tierd.terminate(), Some(0));
    (before, ends)
}

/// A rollback to before the rules change itself: the input the earlier rules applied is lost
/// with it. The partition keeps the earlier rules' text, so the replay applies that input under
/// them, then resumes the sweep at the offset (and time) it first started, then the input
/// after it: every change comes out as it first did, its `rules_version` included.
#[test]
fn a_rollback_to_before_a_rules_change_replays_the_earlier_input_under_the_earlier_rules() {
    let mut world = World::start(1);
    let n = N;
    let (before, _) = lost_under_b2b_1(&world, "");

    let _rules = use_rules(&mut world, V2);
    let tierd = Tierd::spawn(&world, "");
    wait_sweeps_done(&tierd, 1.0);
    let third = purchases(
        "f",
        (0..n).step_by(5),
        |_| "150000".into(),
        "2026-11-02T10:00:00Z",
    );
    let ends = world.produce_json(&third);
    world.wait_applied(&ends, Duration::from_secs(60));
    let live = states(&world, n);
    let published = world.read_all(&world.output).len();

    world.restore(&before);
    let swept = swept_to("b2b-lifetime-2", n);
    assert_replayed_identically(&world, &tierd, &ends, swept, &live, published);
    let log = tierd.log_text();
    assert!(
        log.contains(
            "Replaying the input before the rules change under the rules it first ran under"
        ),
        "{log}"
    );
}

#[test]
fn a_rollback_before_the_new_rules_published_anything_replays_under_the_earlier_rules() {
    // Redis loses writes whose changes were published under v1, and v2 takes over before
    // anything of it was published (a failover during a rolling upgrade): the published
    // position records no sweep of v2, yet those changes must come out again as they were.
    let mut world = World::start(1);
    let n = N;
    let (before, ends) = lost_under_b2b_1(&world, "");
    let published_v1 = world.read_all(&world.output);

    world.restore(&before);
    let _rules = use_rules(&mut world, V2);
    let tierd = Tierd::spawn(&world, "");
    wait_sweeps_done(&tierd, 1.0);
    world.wait_applied(&ends, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.outbox_len(0) > 0 {
        assert!(Instant::now() < deadline, "{}", tierd.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every change is published again with its first body, then the sweep moves everyone to
    // v2's tier of their spend.
    let records = world.assert_one_body_per_change_id();
    let log = tierd.log_text();
    assert!(
        log.contains(
            "Replaying the input before the rules change under the rules it first ran under"
        ),
        "{log}"
    );
    assert!(
        records.len() > published_v1.len(),
        "the sweep published changes"
    );
    let hash = tierd::model::state::rules_hash("b2b-lifetime-2");
    for (i, state) in states(&world, n).iter().enumerate() {
        assert_eq!(state.rules_hash, hash, "c{i} swept to v2");
        let spent = first_spend(i as i64) + if i % 2 == 0 { 150_000 } else { 0 };
        assert_eq!(
            state.tier.as_deref(),
            Some(tier(spent, [800_000, 300_000, 100_000])),
            "c{i} is in v2's tier of {spent}"
        );
    }
}

/// A third rules version: other bounds again.
fn v3() -> String {
    V2.replace("b2b-lifetime-2", "b2b-lifetime-3")
        .replace("800000", "600000")
        .replace("300000", "250000")
        .replace("100000", "50000")
}

/// Input under three rules versions, each change followed by purchases that cross the bounds of
/// the version they run under; a snapshot taken under the first. Returns the snapshot, the
/// live states, the number of records published and the last input ends, with `tierd`
/// (running `b2b-lifetime-3`) and the rules files.
struct ThreeVersions {
    before: Vec<(String, Vec<u8>)>,
    live: Vec<tierd::model::CustomerState>,
    published: usize,
    ends: BTreeMap<i32, i64>,
    tierd: Tierd,
    files: Vec<tempfile::NamedTempFile>,
}

const N: i64 = 120;

fn three_versions(world: &mut World) -> ThreeVersions {
    versions(world, 3)
}

/// Rules version `b2b-lifetime-{version}` (2 or more): [`V2`] with its own name, and the
/// bounds of [`v3`] for odd versions.
fn version_text(version: u32) -> String {
    let text = if version % 2 == 1 {
        v3()
    } else {
        V2.to_owned()
    };
    text.replace(
        &format!("b2b-lifetime-{}", 2 + version % 2),
        &format!("b2b-lifetime-{version}"),
    )
}

/// [`three_versions`] over `b2b-lifetime-1` to `-{last}`; the last tierd runs with the files
/// of the versions before it in `rules.history` (it saw only its predecessor's claimed).
fn versions(world: &mut World, last: u32) -> ThreeVersions {
    let amount = |i: i64| (i * 7919) % 1_200_000;
    let mut tierd = Tierd::spawn(world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let first = purchases("e", 0..N, |i| amount(i).to_string(), "2026-11-01T10:00:00Z");
    world.wait_applied(&world.produce_json(&first), Duration::from_secs(120));
    // Redis will lose everything from here on.
    let before = world.snapshot();
    let under_v1 = purchases(
        "g",
        (0..N).step_by(2),
        |_| "150000".into(),
        "2026-11-01T12:00:00Z",
    );
    world.wait_applied(&world.produce_json(&under_v1), Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));
    let mut files = Vec::new();
    let mut tierd = None;
    for version in 2..=last {
        let history: Vec<String> = files
            .iter()
            .map(|f: &tempfile::NamedTempFile| format!("{:?}", f.path().display().to_string()))
            .collect();
        files.push(use_rules(world, &version_text(version)));
        let prefix = format!("v{version}-");
        let extra = if version == last && last > 3 {
            format!("[rules]\nhistory = [{}]\n", history.join(", "))
        } else {
            String::new()
        };
        let t = Tierd::spawn(world, &extra);
        wait_sweeps_done(&t, 1.0);
        let more = purchases(
            &prefix,
            (0..N).step_by(3),
            |_| "120000".into(),
            &format!("2026-11-0{version}T10:00:00Z"),
        );
        let ends = world.produce_json(&more);
        world.wait_applied(&ends, Duration::from_secs(60));
        let moved = world
            .read_all(&world.output)
            .iter()
            .map(support::Record::json)
            .filter(|c| {
                c["rules_version"] == format!("b2b-lifetime-{version}") && c["reason"] == "purchase"
            })
            .count();
        assert!(
            moved > 0,
            "purchases under b2b-lifetime-{version} moved customers"
        );
        if version < last {
            let mut t = t;
            assert_eq!(t.terminate(), Some(0));
        } else {
            tierd = Some((t, ends));
        }
    }
    let (tierd, ends) = tierd.expect("the third version runs");
    ThreeVersions {
        before,
        live: states(world, N),
        published: world.read_all(&world.output).len(),
        ends,
        tierd,
        files,
    }
}

/// A world whose `N` customers were placed under `b2b-lifetime-1` by a tierd since stopped.
fn placed_under_v1() -> World {
    let world = World::start(1);
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let first = purchases(
        "e",
        0..N,
        |i| ((i * 7919) % 1_200_000).to_string(),
        "2026-11-01T10:00:00Z",
    );
    world.wait_applied(&world.produce_json(&first), Duration::from_secs(120));
    assert_eq!(tierd.terminate(), Some(0));
    world
}

/// The replay went through both recorded rules changes: every customer is under the third.
fn swept_to_v3(world: &World) -> bool {
    let hash = tierd::model::state::rules_hash("b2b-lifetime-3");
    states(world, N).iter().all(|s| s.rules_hash == hash)
}

/// A rollback over two rules changes (a snapshot under the first version, then a change to
/// the second and one to the third, each with input that crosses its own bounds): the replay
/// applies each stretch of input under the rules it first ran under and starts each sweep
/// again where and when it first started, so every change comes out as it first did. The
/// partition keeps only the first version's text by then; the running process remembers the
/// second's from its first claim.
#[test]
fn a_rollback_over_two_rules_changes_replays_each_stretch_under_its_own_rules() {
    let mut world = World::start(1);
    let run = three_versions(&mut world);
    world.restore(&run.before);
    assert_replayed_identically(
        &world,
        &run.tierd,
        &run.ends,
        swept_to_v3,
        &run.live,
        run.published,
    );
    let log = run.tierd.log_text();
    assert!(log.contains("changes=2"), "{log}");
    drop(run.files);
}

/// Over five rules changes, one more than the published position's metadata keeps sweeps
/// of: the claim reads the oldest sweep from the history topic (`kafka.history_topic`), and
/// every stretch runs under its own rules again. Before the history topic the chain stopped
/// at four changes and replayed the rest under the running rules, with a warning.
#[test]
fn a_rollback_over_five_rules_changes_reads_the_oldest_sweep_from_the_history_topic() {
    let mut world = World::start(1);
    let run = versions(&mut world, 6);
    world.restore(&run.before);
    assert_replayed_identically(
        &world,
        &run.tierd,
        &run.ends,
        swept_to("b2b-lifetime-6", N),
        &run.live,
        run.published,
    );
    let log = run.tierd.log_text();
    assert!(log.contains("changes=5"), "{log}");
    assert!(
        log.contains("Read the partition's replay history from the history topic"),
        "{log}"
    );
    drop(run.files);
}

/// The same after tierd itself restarted: the new process never saw the second version, and the
/// restored partition keeps only the first's text; with the second version's file in
/// `rules.history` every change comes out as it first did.
#[test]
fn after_a_restart_rules_history_supplies_the_rules_a_replay_needs() {
    replayed_after_a_restart(|run| {
        let v2 = run.files[0].path().display().to_string();
        format!("[rules]\nhistory = [{v2:?}]\n")
    });
}

/// [`three_versions`], tierd stopped, Redis rolled back to before `-2` and tierd started again
/// with the extra config `extra` gives: every change comes out as it first did, each stretch
/// under its own rules. Returns the new tierd's log.
fn replayed_after_a_restart(extra: impl Fn(&ThreeVersions) -> String) -> String {
    let mut world = World::start(1);
    let mut run = three_versions(&mut world);
    assert_eq!(run.tierd.terminate(), Some(0));
    world.restore(&run.before);
    let tierd = Tierd::spawn(&world, &extra(&run));
    assert_replayed_identically_by(
        &world,
        &tierd,
        &run.ends,
        swept_to_v3,
        &run.live,
        run.published,
        false,
    );
    let log = tierd.log_text();
    assert!(log.contains("changes=2"), "{log}");
    drop(run.files);
    log
}

/// The same with no `rules.history` at all: each sweep's record in the history topic carries
/// the texts of its rules, and the claim reads the middle version's from there. Before, the
/// replay warned (naming `rules.history`) and ran under the running rules.
#[test]
fn after_a_restart_the_history_topic_supplies_the_rules_a_replay_needs() {
    let log = replayed_after_a_restart(|_| String::new());
    assert!(
        log.contains("rules_texts=") && !log.contains("rules_texts=0"),
        "{log}"
    );
    assert!(!log.contains("list its file in rules.history"), "{log}");
}

/// Without the middle version's text anywhere (no history topic, no `rules.history`), the
/// replay must not take another version for it: it warns, naming `rules.history`, and replays
/// under the running rules.
#[test]
fn a_replay_missing_a_middle_rules_version_warns_naming_rules_history() {
    let mut world = World::start(1);
    let mut run = three_versions(&mut world);
    assert_eq!(run.tierd.terminate(), Some(0));
    world.restore(&run.before);
    let tierd = Tierd::spawn(&world, "[kafka]\nhistory_topic = \"\"\n");
    tierd.wait_log("list its file in rules.history", Duration::from_secs(60));
    assert!(!tierd
        .log_text()
        .contains("under the rules it first ran under"));
    // The replay under the running rules completes.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !swept_to_v3(&world)
        || world.partition_meta(0).1 < run.ends[&0]
        || world.outbox_len(0) > 0
    {
        assert!(
            Instant::now() < deadline,
            "not replayed:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tierd.metric("tierd_partitions_stopped"), 0.0);
    assert_decided_again_under_new_ids(&world, &tierd, run.published, N);

    // Restarted without Redis losing anything, tierd numbers on above the floor Redis kept
    // (it was stored with the replay's commits): it is not raised again, and the next
    // change continues the customer's sequence.
    let floor: u64 = redis::cmd("HGET")
        .arg(world.keys(0).meta)
        .arg("seq_floor")
        .query(&mut world.redis.conn())
        .unwrap();
    assert!(floor > 0);
    let mut tierd = tierd;
    assert_eq!(tierd.terminate(), Some(0));
    let tierd = Tierd::spawn(&world, "[kafka]\nhistory_topic = \"\"\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let before = world.customer_state("c1").unwrap();
    let ends = world.produce_json(&purchases(
        "after",
        1..2,
        |_| "2000000".into(),
        "2026-11-09T10:00:00Z",
    ));
    world.wait_applied(&ends, Duration::from_secs(60));
    world.wait_outbox_drained(0, Duration::from_secs(60));
    let after = world.customer_state("c1").unwrap();
    assert_ne!(after.tier, before.tier, "the purchase moved c1");
    if after.seq != before.seq.max(floor) + 1 {
        // Once seen in a loaded CI run (6 where 4 was expected), not reproduced: say what c1
        // went through if it happens again.
        let c1: Vec<String> = world
            .read_all(&world.output)
            .iter()
            .filter(|r| !r.value.is_empty() && r.json()["customer_id"] == "c1")
            .map(|r| r.json().to_string())
            .collect();
        panic!(
            "numbered above the floor Redis kept ({floor}), not raised again: c1's sequence \
             {} before the purchase, {} after; floors raised {}; c1's changes on the topic:\n{}\n\
             log:\n{}",
            before.seq,
            after.seq,
            tierd.metric("tierd_sequence_floors_raised_total"),
            c1.join("\n"),
            tierd.log_text()
        );
    }
    assert_eq!(tierd.metric("tierd_sequence_floors_raised_total"), 0.0);
    world.assert_fresh_ids_in_order();
    drop(run.files);
}

/// After a replay that could not reproduce the published changes (it ran under the running
/// rules): what it decided again came out under new ids, numbered above every sequence
/// published, so no id carries two bodies and no customer's sequence goes back on the output
/// topic (more than `published` records now); and each of `c0..c{n-1}`'s last change places
/// them in the tier Redis holds.
fn assert_decided_again_under_new_ids(world: &World, tierd: &Tierd, published: usize, n: i64) {
    let log = tierd.log_text();
    assert!(log.contains("Changes are numbered above sequence"), "{log}");
    assert!(tierd.metric("tierd_sequence_floors_raised_total") >= 1.0);
    let (last, records) = world.assert_fresh_ids_in_order();
    assert!(records > published, "changes were published again");
    for (i, state) in states(world, n).iter().enumerate() {
        assert_eq!(
            last.get(&format!("c{i}")),
            state.tier.as_ref(),
            "c{i}: the last change published places them where Redis has them"
        );
    }
}

/// A rules sweep still under way when the next version took over (`b2b-lifetime-2` stopped
/// mid-sweep, purchases under it, then `-3`): `-3` first completes `-2`'s sweep under `-2`
/// (the partition keeps its text), then starts its own where that completes, so every stretch
/// of input ran under one version. A Redis rollback to before `-2` then replays each stretch
/// under its version and every change comes out as it first did. Before, `-3`'s sweep started
/// at once from `-1`, the input between the two starts ran under a mix of `-1` and `-2`, and
/// the replay fell back to the running rules with a warning (other bodies for those ids).
#[test]
fn a_new_rules_version_completes_an_unfinished_sweep_first_so_a_replay_over_both_is_exact() {
    let mut world = World::start(1);
    let mut tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let first = purchases(
        "e",
        0..N,
        |i| ((i * 7919) % 1_200_000).to_string(),
        "2026-11-01T10:00:00Z",
    );
    world.wait_applied(&world.produce_json(&first), Duration::from_secs(120));
    let before = world.snapshot();
    let lost = purchases(
        "g",
        (0..N).step_by(2),
        |_| "150000".into(),
        "2026-11-01T12:00:00Z",
    );
    world.wait_applied(&world.produce_json(&lost), Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));

    // `-2` sweeps 10 customers a second: stopped after its first pages.
    let _v2 = use_rules(&mut world, V2);
    world.rules_extra = "sweep_per_second = 10".into();
    let mut tierd = Tierd::spawn(&world, "");
    wait_swept(&tierd, 4.0);
    let during = purchases(
        "f",
        (0..N).step_by(3),
        |_| "120000".into(),
        "2026-11-02T10:00:00Z",
    );
    world.wait_applied(&world.produce_json(&during), Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));
    assert!(
        states(&world, N)
            .iter()
            .any(|s| s.rules_hash != tierd::model::state::rules_hash("b2b-lifetime-2")),
        "the sweep of b2b-lifetime-2 is unfinished"
    );

    let _v3 = use_rules(&mut world, &v3());
    world.rules_extra = String::new();
    let tierd = Tierd::spawn(&world, "");
    wait_sweeps_done(&tierd, 1.0);
    assert!(
        tierd
            .log_text()
            .contains("The previous rules version's sweep was still under way"),
        "{}",
        tierd.log_text()
    );
    let ends = world.produce_json(&purchases(
        "h",
        (1..N).step_by(4),
        |_| "90000".into(),
        "2026-11-03T10:00:00Z",
    ));
    world.wait_applied(&ends, Duration::from_secs(60));
    assert!(swept_to_v3(&world));
    let live = states(&world, N);
    let published = world.read_all(&world.output).len();
    world.restore(&before);
    assert_replayed_identically(&world, &tierd, &ends, swept_to_v3, &live, published);
    assert!(!tierd
        .log_text()
        .contains("was still under way when the next rules version took over"));
}

/// Redis rolled back while `-3` was still completing `-2`'s unfinished sweep, before that
/// completion was published (the changes of purchases meanwhile, applied under `-2`, were):
/// the replay completes `-2`'s sweep again under `-2`, not before the input the published
/// changes reach, and then starts `-3`'s; every change id keeps its one body. Before, `-3`'s
/// rules replayed everything from the restored offset, with a warning, and the purchases
/// first published under `-2` came out again under `-3` with the same ids.
#[test]
fn a_rollback_while_an_unfinished_sweep_is_completed_first_replays_it_under_its_rules() {
    let mut world = placed_under_v1();

    // `-2` sweeps 10 customers a second: stopped after its first pages.
    let _v2 = use_rules(&mut world, V2);
    world.rules_extra = "sweep_per_second = 10".into();
    let mut tierd = Tierd::spawn(&world, "");
    wait_swept(&tierd, 4.0);
    assert_eq!(tierd.terminate(), Some(0));

    // `-3` completes `-2`'s sweep first, as slowly; Redis is snapshotted on the way.
    let _v3 = use_rules(&mut world, &v3());
    let tierd = Tierd::spawn(&world, "");
    wait_swept(&tierd, 2.0);
    let before = world.snapshot();
    // Purchases crossing `-2`'s bounds while its sweep completes: applied under `-2`, published.
    let ends = world.produce_json(&purchases(
        "f",
        (0..N).step_by(3),
        |_| "120000".into(),
        "2026-11-02T10:00:00Z",
    ));
    world.wait_applied(&ends, Duration::from_secs(60));
    let v1 = tierd::model::state::rules_hash("b2b-lifetime-1");
    assert!(
        states(&world, N).iter().any(|s| s.rules_hash == v1),
        "`-2`'s sweep is still being completed"
    );
    world.restore(&before);

    let deadline = Instant::now() + Duration::from_secs(120);
    while world.partition_meta(0).1 < ends[&0] || world.outbox_len(0) > 0 || !swept_to_v3(&world) {
        assert!(
            Instant::now() < deadline,
            "not settled:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    world.wait_applied(&ends, Duration::from_secs(60));
    let log = tierd.log_text();
    assert!(log.contains("Partition claimed again"), "{log}");
    assert!(
        !log.contains("Replaying the input before the rules change under the running rules"),
        "{log}"
    );
    world.assert_one_body_per_change_id();
}

/// Redis restored into the middle of `b2b-lifetime-2`'s sweep (its pages had reached some
/// customers), after which the sweep completed, purchases crossed `-2`'s bounds, and `-3` took
/// over with its own sweep and purchases: the replay goes on with `-2`'s sweep from the
/// restored point, completes it where it first completed, then replays the rest under each
/// version as it first ran — every change comes out as it first did.
#[test]
fn a_rollback_into_the_middle_of_an_earlier_rules_sweep_resumes_that_sweep() {
    let mut world = placed_under_v1();

    // `-2` sweeps 20 customers a second; Redis is snapshotted after its first pages.
    let mut files = vec![use_rules(&mut world, V2)];
    world.rules_extra = "sweep_per_second = 20".into();
    let mut tierd = Tierd::spawn(&world, "");
    wait_swept(&tierd, 10.0);
    let before = world.snapshot();
    let v2 = tierd::model::state::rules_hash("b2b-lifetime-2");
    let restored = states(&world, N);
    assert!(
        restored.iter().any(|s| s.rules_hash == v2) && restored.iter().any(|s| s.rules_hash != v2),
        "the snapshot is in the middle of the sweep"
    );
    // Purchases while the sweep runs (some reach customers before its pages do), then after.
    let during = purchases(
        "f",
        (0..N).step_by(3),
        |_| "120000".into(),
        "2026-11-02T10:00:00Z",
    );
    world.wait_applied(&world.produce_json(&during), Duration::from_secs(60));
    wait_sweeps_done(&tierd, 1.0);
    let after = purchases(
        "g",
        (1..N).step_by(3),
        |_| "150000".into(),
        "2026-11-02T12:00:00Z",
    );
    world.wait_applied(&world.produce_json(&after), Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));

    files.push(use_rules(&mut world, &v3()));
    world.rules_extra = String::new();
    let tierd = Tierd::spawn(&world, "");
    wait_sweeps_done(&tierd, 1.0);
    let under_v3 = purchases(
        "h",
        (2..N).step_by(3),
        |_| "120000".into(),
        "2026-11-03T10:00:00Z",
    );
    let ends = world.produce_json(&under_v3);
    world.wait_applied(&ends, Duration::from_secs(60));
    let live = states(&world, N);
    let published = world.read_all(&world.output).len();

    world.restore(&before);
    assert_replayed_identically(&world, &tierd, &ends, swept_to_v3, &live, published);
    let log = tierd.log_text();
    assert!(log.contains("changes=2"), "{log}");
    assert!(!log.contains("under the running rules"), "{log}");
    drop(files);
}

/// The same in `wall` mode, with a timer the earlier rules fired after their last input: at
/// the offset the new rules took over at, the replay fires it (under the earlier rules) before
/// the sweep starts again, as it first ran.
#[test]
fn a_rollback_to_before_a_rules_change_fires_the_earlier_rules_timers_where_they_first_fired() {
    let mut world = World::start(1);
    let n = 50i64;
    let wall = "[clock]\nmode = \"wall\"\ntick_ms = 100\n";
    let _v1 = use_rules(&mut world, &recency("recency-1", 1));
    let mut tierd = Tierd::spawn(&world, wall);
    tierd.wait_partitions(1, Duration::from_secs(60));
    let now = time::format_ms(time::now_ms());
    world.wait_applied(
        &world.produce_json(&[purchase("w0", "w", "10", &now)]),
        Duration::from_secs(60),
    );
    // Redis will lose everything from here on.
    let before = world.snapshot();
    // Active under the earlier rules until 4 s from now, then lapsed: a timer pass after the
    // last input.
    let bought = time::now_ms() - 86_400_000 + 4_000;
    let events = purchases("e", 0..n, |_| "10".into(), &time::format_ms(bought));
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));
    let lapsed = |world: &World| lapsed_of(world, n);
    let deadline = Instant::now() + Duration::from_secs(60);
    while lapsed(&world) < n {
        assert!(Instant::now() < deadline, "no lapse:\n{}", tierd.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tierd.terminate(), Some(0));

    // Under the new rules they are active again (a `rules_changed` move of the sweep).
    let _v2 = use_rules(&mut world, &recency("recency-2", 3));
    let tierd = Tierd::spawn(&world, wall);
    wait_sweeps_done(&tierd, 1.0);
    std::thread::sleep(Duration::from_secs(1)); // ticks after the sweep
    assert_active_again_then_replayed(&world, &tierd, "recency-2", n, &before, &ends);
}

/// Checks that `c0..c{n-1}` are active under `version` after being placed and lapsed (three
/// changes each); then restores Redis to `before` and checks that `tierd` replays up to `ends`
/// into the same states, every change id with one body.
fn assert_active_again_then_replayed(
    world: &World,
    tierd: &Tierd,
    version: &str,
    n: i64,
    before: &[(String, Vec<u8>)],
    ends: &BTreeMap<i32, i64>,
) {
    assert_eq!(lapsed_of(world, n), 0, "active under {version}");
    let live = states(world, n);
    assert!(
        live.iter().all(|s| s.seq == 3),
        "placed, lapsed, active again"
    );
    let published = world.read_all(&world.output).len();
    world.restore(before);
    assert_replayed_identically(world, tierd, ends, swept_to(version, n), &live, published);
}

/// The same with timers: pages set new timers (here, when a customer's recency lapses under
/// the new rules), and which timer pass would fire them depends on how far the pages got. So
/// timers wait while a sweep runs, and a replay completes the sweep where it first completed:
/// after Redis loses the whole sweep, every change comes out the same.
#[test]
fn a_rollback_during_a_rules_sweep_that_sets_timers_republishes_identically() {
    let mut world = World::start(1);
    let n = 300i64;
    let wall = "[clock]\nmode = \"wall\"\ntick_ms = 100\n";
    let mut tierd = Tierd::spawn(&world, wall);
    tierd.wait_partitions(1, Duration::from_secs(60));
    let start = time::now_ms();
    // Under the new rules everyone is active until 17 s from now, then lapses.
    let bought = start - 86_400_000 + 17_000;
    let events = purchases("e", 0..n, |_| "10".into(), &time::format_ms(bought));
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));
    let before = world.snapshot();

    let _rules = use_rules(&mut world, RECENCY_2);
    // 300 customers at 10 per second (a page is at least one SCAN step: up to ~15 per
    // second): the sweep runs from about 11 s to 30-40 s after `start`, and the lapses come
    // due early in it.
    world.rules_extra = "sweep_per_second = 10".into();
    let until = |t: i64| {
        let now = time::now_ms();
        assert!(now < t, "the test's schedule slipped by {} ms", now - t);
        std::thread::sleep(Duration::from_millis((t - now) as u64));
    };
    until(start + 10_000);
    let tierd = Tierd::spawn(&world, wall);
    // After the lapses came due: purchases of every fifth customer.
    until(start + 19_000);
    assert!(
        tierd.metric("tierd_rules_sweep_partitions_done") < 1.0,
        "the sweep is still under way"
    );
    let now = time::format_ms(time::now_ms());
    let late = purchases("f", (0..n).step_by(5), |_| "10".into(), &now);
    let ends = world.produce_json(&late);
    let lapsed = |world: &World| lapsed_of(world, n);
    let deadline = Instant::now() + Duration::from_secs(120);
    while tierd.metric("tierd_rules_sweep_partitions_done") < 1.0 || lapsed(&world) < n - n / 5 {
        assert!(
            Instant::now() < deadline,
            "the sweep or the lapses did not finish:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(lapsed(&world), n - n / 5, "the purchasers stay active");
    // After the sweep: lapsed customers buy again. A replay must complete the sweep where it
    // first completed, so that their lapse (fired after it) comes before these purchases.
    let now = time::format_ms(time::now_ms());
    let again = purchases("g", (1..n).step_by(5), |_| "10".into(), &now);
    let ends = world.produce_json(&again);
    world.wait_applied(&ends, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1)); // ticks after the last purchase
    world.wait_applied(&ends, Duration::from_secs(60));
    let live = states(&world, n);
    let still_lapsed = n - 2 * (n / 5);
    assert_eq!(lapsed(&world), still_lapsed, "the purchasers are active");
    let published = world.read_all(&world.output).len();

    world.restore(&before);
    let hash = tierd::model::state::rules_hash("recency-2");
    let replayed = |world: &World| {
        lapsed(world) == still_lapsed && states(world, n).iter().all(|s| s.rules_hash == hash)
    };
    assert_replayed_identically(&world, &tierd, &ends, replayed, &live, published);
}

/// The pyramid's shares changed (rank-based rules on both sides).
const PYRAMID_V2: &str = r#"
version = "pyramid-2"
[ranks.value]
metric = "sum"
[[tiers]]
name = "vip"
when = ["rank.value <= 5%"]
[[tiers]]
name = "key"
when = ["rank.value <= 30%"]
[[tiers]]
name = "ordinary"
when = ["rank.value <= 60%"]
[[tiers]]
name = "small"
"#;

/// The pyramid in three bands, ranking as `pyramid-1` does.
const PYRAMID_THREE_BANDS: &str = r#"
version = "pyramid-3-bands"
[ranks.value]
metric = "sum"
[[tiers]]
name = "vip"
when = ["rank.value <= 10%"]
[[tiers]]
name = "key"
when = ["rank.value <= 40%"]
[[tiers]]
name = "small"
"#;

/// Waits until every partition applied cut-offs over `population` customers under rules
/// `rules` and they stay the same for a second: the ranking settled.
fn wait_cutoffs_settled(world: &World, tierd: &Tierd, population: u64, rules: &str) {
    let hash = tierd::model::state::rules_hash(rules);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let applied = |version: u64| {
            (0..world.partitions).all(|p| world.applied_cutoffs_version(p) == version)
        };
        let settled = world.cutoffs().filter(|c| {
            c.rules == hash && c.population.first() == Some(&population) && applied(c.version)
        });
        if let Some(c) = settled {
            std::thread::sleep(Duration::from_secs(1));
            if world.cutoffs().map(|again| again.version) == Some(c.version) && applied(c.version) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the cut-offs did not settle:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The same under rank-based rules (the pyramid, moved to other shares): purchases in the
/// middle of the sweep change the ranking, so cut-offs move while it runs. After Redis loses
/// the whole sweep the replay's pages run at other moments than the first ones did, and each
/// must still evaluate with the cut-offs it first did: a partition stays on the new rules'
/// first cut-offs until its sweep completes, then moves on.
#[test]
fn a_rollback_during_a_rank_rules_sweep_republishes_its_changes_identically() {
    rank_sweep_rolled_back(1, |_, _| true);
}

/// The same over two partitions where only partition 0's customers buy during the sweep:
/// partition 1's sweep meets no input at all, so the new rules' first cut-offs, all its pages,
/// its completion and the newer cut-offs are at one input offset. The replay must apply them
/// there in that order (the first cut-offs, the pages, then the newer ones).
#[test]
fn a_rollback_over_a_rank_rules_sweep_without_input_republishes_identically() {
    rank_sweep_rolled_back(2, |world, i| {
        redis::cmd("EXISTS")
            .arg(world.keys(0).customer(&format!("c{i}")))
            .query::<bool>(&mut world.redis.conn())
            .unwrap()
    });
}

/// 200 customers over `partitions` under the pyramid; with Redis snapshotted, the rules change
/// to other shares (a sweep of about 10 s) and the customers `buys` picks among every fifth
/// spend a lot in the middle of it, twice; then Redis is rolled back to the snapshot and the
/// replay must end in the live states with every change id carrying one body.
fn rank_sweep_rolled_back(partitions: i32, buys: impl Fn(&World, i64) -> bool) {
    let mut world = World::start(partitions);
    world.rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/pyramid.toml");
    let ranks = "[ranks]\nrecompute_interval_ms = 300\ncheck_interval_ms = 100\n";
    let n = 200i64;
    // Distinct spends, so that ranks are not ties.
    let amount = |i: i64| (i * 7919) % 1_200_000 + i;
    let mut tierd = Tierd::spawn(&world, ranks);
    tierd.wait_partitions(i64::from(partitions), Duration::from_secs(60));
    let events = purchases("e", 0..n, |i| amount(i).to_string(), "2026-11-01T10:00:00Z");
    let mut ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(120));
    wait_cutoffs_settled(&world, &tierd, n as u64, "pyramid-1");
    assert_eq!(tierd.terminate(), Some(0));
    // Redis will lose everything from here on.
    let before = world.snapshot();
    let buyers: Vec<i64> = (0..n).filter(|&i| buys(&world, i)).collect();

    let _rules = use_rules(&mut world, PYRAMID_V2);
    // 2 customers per 100 ms and partition: the sweep takes about 10 s over 200 customers.
    world.rules_extra = "sweep_per_second = 20".into();
    let tierd = Tierd::spawn(&world, ranks);
    wait_swept(&tierd, 20.0);
    let first = world.cutoffs().expect("cut-offs of the new rules").version;
    // Mid-sweep: every fifth buyer spends a lot, in two rounds a second apart; the ranking
    // changes under the sweep, twice.
    for (round, at) in ["2026-11-02T10:00:00Z", "2026-11-03T10:00:00Z"]
        .into_iter()
        .enumerate()
    {
        let late = purchases(
            &format!("f{round}-"),
            buyers.iter().copied().skip(round).step_by(5),
            |i| (1_500_000 + i * 1_000).to_string(),
            at,
        );
        ends.extend(world.produce_json(&late));
        world.wait_applied(&ends, Duration::from_secs(60));
        std::thread::sleep(Duration::from_secs(1));
    }
    let swept_when_purchases_applied = tierd.metric("tierd_rules_sweep_customers_total");
    assert!(
        world.cutoffs().expect("cut-offs").version > first,
        "the cut-offs moved during the sweep"
    );
    wait_sweeps_done(&tierd, f64::from(partitions));
    wait_cutoffs_settled(&world, &tierd, n as u64, "pyramid-2");
    let live = states(&world, n);
    let published = world.read_all(&world.output).len();
    assert!(
        swept_when_purchases_applied < n as f64,
        "the purchases came while the sweep was under way"
    );

    // Redis loses the whole sweep and the purchases; tierd notices by itself and replays.
    world.restore(&before);
    let swept = swept_to("pyramid-2", n);
    assert_replayed_identically(&world, &tierd, &ends, swept, &live, published);
}

/// Redis rolled back to before a change of the pyramid's bands, with purchases under the
/// earlier shares after the snapshot (they move customers and the cut-offs): the replay
/// applies them under `pyramid-1` with the cut-offs recorded then (those `pyramid-1`'s owner
/// moved to after its last input before the new rules' own), starts the new rules' sweep
/// where it first started, and every change comes out as it first did.
#[test]
fn a_rollback_to_before_a_rank_rules_change_replays_under_the_earlier_rank_rules() {
    // Three bands instead of four: the earlier cut-offs' moves must be paged with the earlier
    // rules' cut points.
    let run = rank_rules_change_rolled_back(PYRAMID_THREE_BANDS);
    let n = run.live.len() as i64;
    let swept = swept_to("pyramid-3-bands", n);
    assert_replayed_identically(
        &run.world,
        &run.tierd,
        &run.ends,
        swept,
        &run.live,
        run.published,
    );
    let log = run.tierd.log_text();
    assert!(!log.contains("under the running rules"), "{log}");
}

/// Earlier rules that rank by another metric kept other values in the rank sets: a replay
/// under them is not supported yet, and says so instead of replaying under the wrong sets.
#[test]
fn a_replay_under_earlier_rules_that_rank_otherwise_warns() {
    let by_count = PYRAMID_V2
        .replace("pyramid-2", "pyramid-by-count")
        .replace("metric = \"sum\"", "metric = \"count\"");
    let run = rank_rules_change_rolled_back(&by_count);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run
        .tierd
        .log_text()
        .contains("rank customers other than the running rules do")
    {
        assert!(
            Instant::now() < deadline,
            "no warning:\n{}",
            run.tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The replay under the running rules completes and the ranking settles.
    let world = &run.world;
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.partition_meta(0).1 < run.ends[&0] || !swept_to("pyramid-by-count", 200)(world) {
        assert!(
            Instant::now() < deadline,
            "not replayed:\n{}",
            run.tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_cutoffs_settled(world, &run.tierd, 200, "pyramid-by-count");
    world.wait_outbox_drained(0, Duration::from_secs(60));
    assert_decided_again_under_new_ids(world, &run.tierd, run.published, 200);
}

/// The pyramid's owner dies in the middle of a re-ranking pass whose switch (with its first
/// pages) was published, and the next owner runs rules that rank alike (three bands): it
/// finishes `pyramid-1`'s pass under `pyramid-1` before its own sweep starts, as a replay from
/// before the change does (it applies the recorded switch whole, under the earlier rules,
/// ahead of the sweep's start). After Redis loses everything, every change comes out as it
/// first did.
#[test]
fn an_earlier_rules_re_ranking_pass_left_half_done_is_finished_under_them_before_the_sweep() {
    let mut world = World::start(1);
    world.rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/pyramid.toml");
    // The first cut-offs come once the input is applied (every customer moves: a long pass).
    let config =
        "[ranks]\nrecompute_interval_ms = 8000\ncheck_interval_ms = 500\nreevaluate_page = 1\n";
    let n = 10_000i64;
    let mut tierd = Tierd::spawn(&world, config);
    tierd.wait_partitions(1, Duration::from_secs(60));
    wait_sweeps_done(&tierd, 1.0);
    // Redis will lose everything from here on.
    let before = world.snapshot();
    let events = purchases(
        "e",
        0..n,
        |i| ((i * 7919) % 1_200_000 + i).to_string(),
        "2026-11-01T10:00:00Z",
    );
    let ends = world.produce_json(&events);
    // The first cut-offs' pass (a page of one customer per commit) is under way and its
    // switch published: it is killed in the middle.
    let progress = |world: &World| -> Option<u64> {
        let json: Option<String> = redis::cmd("HGET")
            .arg(world.keys(0).meta)
            .arg("rerank")
            .query(&mut world.redis.conn())
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json?).ok()?;
        v["version"].as_u64()
    };
    let kafka = toml::from_str::<tierd::config::Config>(&world.config(0, ""))
        .unwrap()
        .kafka;
    let positions = tierd::publish::position::OutboxPositions::new(&kafka, 4096).unwrap();
    let switch_published = |version: u64| {
        positions
            .published(0)
            .is_ok_and(|p| p.switches.iter().any(|s| s.cutoffs.version == version))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "no pass:\n{}", tierd.log_text());
        if progress(&world).is_some_and(switch_published) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tierd.kill9();
    assert!(
        progress(&world).is_some(),
        "the pass completed before the kill (timing): nothing tested"
    );

    let _rules = use_rules(&mut world, PYRAMID_THREE_BANDS);
    let tierd = Tierd::spawn(&world, config);
    wait_sweeps_done(&tierd, 1.0);
    wait_cutoffs_settled(&world, &tierd, n as u64, "pyramid-3-bands");
    let live = states(&world, n);
    let published = world.read_all(&world.output).len();

    world.restore(&before);
    let swept = swept_to("pyramid-3-bands", n);
    assert_replayed_identically(&world, &tierd, &ends, swept, &live, published);
}

/// Redis rolled back to before a change from threshold rules to the pyramid: the earlier
/// rules rank no one (they wrote no rank values), so the replay applies the lost purchases
/// under them, then the pyramid's sweep and recorded cut-offs, and every change comes out as
/// it first did.
#[test]
fn a_rollback_to_before_a_change_to_rank_rules_replays_under_the_earlier_threshold_rules() {
    let mut world = World::start(1);
    let ranks = "[ranks]\nrecompute_interval_ms = 300\ncheck_interval_ms = 100\n";
    let n = N;
    let (before, ends) = lost_under_b2b_1(&world, ranks);

    world.rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/pyramid.toml");
    let tierd = Tierd::spawn(&world, ranks);
    wait_sweeps_done(&tierd, 1.0);
    wait_cutoffs_settled(&world, &tierd, n as u64, "pyramid-1");
    let live = states(&world, n);
    let published = world.read_all(&world.output).len();

    world.restore(&before);
    let swept = swept_to("pyramid-1", n);
    assert_replayed_identically(&world, &tierd, &ends, swept, &live, published);
    let log = tierd.log_text();
    assert!(!log.contains("under the running rules"), "{log}");
}

/// A running `v2` (the pyramid's rules changed) and what it published, just after Redis was
/// rolled back to under `pyramid-1`.
struct RankRulesRollback {
    world: World,
    tierd: Tierd,
    ends: BTreeMap<i32, i64>,
    live: Vec<tierd::model::CustomerState>,
    published: usize,
    _rules: tempfile::NamedTempFile,
}

/// 200 customers placed under `pyramid-1`; the snapshot; purchases under it that overtake
/// customers, in two rounds a second apart; a restart with `v2`, its sweep and settled
/// cut-offs; then Redis restored to the snapshot.
fn rank_rules_change_rolled_back(v2: &str) -> RankRulesRollback {
    let mut world = World::start(1);
    world.rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/pyramid.toml");
    let ranks = "[ranks]\nrecompute_interval_ms = 300\ncheck_interval_ms = 100\n";
    let n = 200i64;
    let amount = |i: i64| (i * 7919) % 1_200_000 + i;
    let mut tierd = Tierd::spawn(&world, ranks);
    tierd.wait_partitions(1, Duration::from_secs(60));
    let events = purchases("e", 0..n, |i| amount(i).to_string(), "2026-11-01T10:00:00Z");
    world.wait_applied(&world.produce_json(&events), Duration::from_secs(120));
    wait_cutoffs_settled(&world, &tierd, n as u64, "pyramid-1");
    // Redis will lose everything from here on.
    let before = world.snapshot();
    let mut ends = BTreeMap::new();
    for (round, at) in ["2026-11-02T10:00:00Z", "2026-11-03T10:00:00Z"]
        .into_iter()
        .enumerate()
    {
        let more = purchases(
            &format!("g{round}-"),
            (round as i64..n).step_by(7),
            |i| (1_500_000 + i * 1_000).to_string(),
            at,
        );
        ends = world.produce_json(&more);
        world.wait_applied(&ends, Duration::from_secs(60));
        std::thread::sleep(Duration::from_secs(1));
    }
    let moved_under_v1 = world
        .read_all(&world.output)
        .iter()
        .map(support::Record::json)
        .filter(|c| c["rules_version"] == "pyramid-1" && c["reason"] == "rank_shift")
        .count();
    assert!(moved_under_v1 > 0, "the purchases overtook customers");
    assert_eq!(tierd.terminate(), Some(0));

    let rules = use_rules(&mut world, v2);
    let tierd = Tierd::spawn(&world, ranks);
    wait_sweeps_done(&tierd, 1.0);
    let version = v2.split('"').nth(1).expect("a version string");
    wait_cutoffs_settled(&world, &tierd, n as u64, version);
    let live = states(&world, n);
    let published = world.read_all(&world.output).len();
    world.restore(&before);
    RankRulesRollback {
        world,
        tierd,
        ends,
        live,
        published,
        _rules: rules,
    }
}

/// Redis loses writes while partition 0's sweep still runs under the pyramid: partition 0
/// holds the new rules' first cut-offs, while partition 1 (a few customers, its sweep done)
/// applied and published the newer ones partition 0 computed. After the rollback Redis counts
/// the versions from before the rules change again, and partition 0's own published history
/// holds only the first cut-offs: numbering from there reused versions partition 1 had
/// already applied, for other values, and partition 1 (back on its newest version by its
/// replay) took no new cut-offs. Every version must keep its values, and the ranking must
/// settle on every partition.
#[test]
fn a_rollback_during_partition_0s_rank_rules_sweep_never_reuses_a_cut_offs_version() {
    let mut world = World::start(2);
    world.rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/pyramid.toml");
    let ranks = "[ranks]\nrecompute_interval_ms = 300\ncheck_interval_ms = 100\n";
    // 300 customers on partition 0, 20 on partition 1.
    let [zero, one]: [Vec<String>; 2] = world
        .customers_per_partition("c", &[300, 20])
        .try_into()
        .unwrap();
    let population = (zero.len() + one.len()) as u64;
    let mut tierd = Tierd::spawn(&world, ranks);
    tierd.wait_partitions(2, Duration::from_secs(60));
    let events: Vec<_> = zero
        .iter()
        .chain(&one)
        .enumerate()
        .map(|(i, c)| {
            // Distinct spends, so that ranks are not ties.
            let i = i as i64;
            let amount = (i * 7919) % 1_200_000 + i;
            purchase(
                &format!("e{i}"),
                c,
                &amount.to_string(),
                "2026-11-01T10:00:00Z",
            )
        })
        .collect();
    let mut ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(120));
    wait_cutoffs_settled(&world, &tierd, population, "pyramid-1");
    assert_eq!(tierd.terminate(), Some(0));
    // Redis will lose everything from here on.
    let before = world.snapshot();

    // Every version seen of the published cut-offs, with its values, all along.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (seen, stop) = (seen.clone(), stop.clone());
        let (client, key) = (world.redis.client(), world.keys(0).cutoffs);
        std::thread::spawn(move || {
            let mut conn = client.get_connection().unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (version, data): (Option<u64>, Option<String>) = redis::cmd("HMGET")
                    .arg(&key)
                    .arg("version")
                    .arg("data")
                    .query(&mut conn)
                    .unwrap();
                if let (Some(version), Some(data)) = (version, data) {
                    let c: tierd::engine::rules::rank::Cutoffs =
                        serde_json::from_str(&data).unwrap();
                    seen.lock().unwrap().push((version, c.values, c.population));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let _rules = use_rules(&mut world, PYRAMID_V2);
    // Slow sweeps (about 30 s each: both scan the whole keyspace), so the purchases below
    // fall well inside partition 0's second one.
    world.rules_extra = "sweep_per_second = 10".into();
    let tierd = Tierd::spawn(&world, ranks);
    // Two thirds through, partition 0's epoch moves on (as a claim elsewhere would): fenced,
    // its owner claims it again and sweeps from the start, so partition 1 completes first.
    wait_swept(&tierd, 200.0);
    let _: i64 = redis::cmd("HINCRBY")
        .arg(world.keys(0).meta)
        .arg("epoch")
        .arg(1)
        .query(&mut world.redis.conn())
        .unwrap();
    wait_sweeps_done(&tierd, 1.0);
    let first = world.cutoffs().expect("cut-offs of the new rules").version;
    // Partition 1's customers jump to the top, five per round, in three rounds: each moves
    // the cut-offs, and partition 1 applies and publishes each move.
    for round in 0..3 {
        let moved_from = world.cutoffs().unwrap().version;
        let late: Vec<_> = one
            .iter()
            .skip(round * 5)
            .take(5)
            .enumerate()
            .map(|(i, c)| {
                let amount = 1_500_000 + (round * 5 + i) as i64 * 1_000;
                purchase(
                    &format!("f{round}-{i}"),
                    c,
                    &amount.to_string(),
                    "2026-11-02T10:00:00Z",
                )
            })
            .collect();
        ends.extend(world.produce_json(&late));
        world.wait_applied(&ends, Duration::from_secs(60));
        // The round's move is computed (every 300 ms), then applied and published by
        // partition 1. (Waiting only for partition 1 to hold the latest version could end
        // before the move was computed: in one CI run two rounds' moves came as one.)
        let deadline = Instant::now() + Duration::from_secs(30);
        while world.cutoffs().unwrap().version <= moved_from
            || world.applied_cutoffs_version(1) != world.cutoffs().unwrap().version
            || world.outbox_len(1) > 0
        {
            assert!(
                Instant::now() < deadline,
                "partition 1 did not move:\n{}",
                tierd.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        world.applied_cutoffs_version(1) >= first + 2,
        "partition 1 applied newer cut-offs"
    );
    assert_eq!(
        world.applied_cutoffs_version(0),
        first,
        "partition 0 still holds the first cut-offs: its sweep runs"
    );
    assert!(tierd.metric("tierd_rules_sweep_partitions_done") < 2.0);
    let published = world.read_all(&world.output).len();

    // Redis loses the sweeps, the purchases and every cut-offs move since the rules change.
    let claims = tierd.log_text().matches("Partition claimed again").count();
    world.restore(&before);
    let deadline = Instant::now() + Duration::from_secs(60);
    while tierd.log_text().matches("Partition claimed again").count() < claims + 2 {
        assert!(
            Instant::now() < deadline,
            "not claimed again:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    world.wait_applied(&ends, Duration::from_secs(60));
    wait_cutoffs_settled(&world, &tierd, population, "pyramid-2");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.join().unwrap();
    let mut values = BTreeMap::new();
    for (version, cutoffs, population) in seen.lock().unwrap().iter() {
        if let Some(known) = values.insert(*version, (cutoffs, population)) {
            assert_eq!(
                known,
                (cutoffs, population),
                "cut-offs version {version} published twice, with other values"
            );
        }
    }
    assert_one_body_per_change_id(&world, published);
}

/// `gold` from `gold_from` spent (minimum stay in gold: 30 days), else `basic`.
fn gold_from(version: &str, gold_from: &str) -> String {
    format!(
        "version = \"{version}\"\n[[tiers]]\nname = \"gold\"\nwhen = [\"sum >= {gold_from}\"]\nmin_stay_days = 30\n[[tiers]]\nname = \"basic\"\n"
    )
}

/// `c0` moved by the first run and not by a replay that falls back (see
/// [`a_replay_that_falls_back_tells_customers_the_tier_it_leaves_them_in`]): Redis restored
/// to before it all, no tierd running.
struct FellBack {
    world: World,
    no_history: &'static str,
    /// The input offsets the published changes reach.
    ends: BTreeMap<i32, i64>,
    /// Records on the output topic before the replay.
    published: usize,
    /// `c0`'s and `c1`'s states before Redis was restored.
    live: HashMap<String, tierd::model::CustomerState>,
    /// A transaction left open on the output topic (see [`rolled_back_on`]).
    open: Option<support::OpenTransaction>,
    _files: Vec<tempfile::NamedTempFile>,
}

fn fell_back() -> FellBack {
    rolled_back(false, "[kafka]\nhistory_topic = \"\"\n")
}

/// The run of [`fell_back`], tierd configured with `extra`; Redis snapshotted before `c0`'s
/// second purchase, or (`after_input`) after it: then the two sweeps Redis loses both start
/// right at the restored offset.
fn rolled_back(after_input: bool, extra: &'static str) -> FellBack {
    rolled_back_on(World::start(1), after_input, extra, false)
}

/// [`rolled_back`] on `world`; with `open`, another producer's transaction is opened on the
/// output topic before the rules changes and left open ([`FellBack::open`]): every change
/// published after it, `c0`'s `gold` among them, is unreadable until it commits.
fn rolled_back_on(
    mut world: World,
    after_input: bool,
    extra: &'static str,
    open: bool,
) -> FellBack {
    let no_history = extra;
    let mut files = vec![use_rules(&mut world, &gold_from("gold-1", "100000"))];
    let mut tierd = Tierd::spawn(&world, no_history);
    tierd.wait_partitions(1, Duration::from_secs(60));
    let at = "2026-11-01T10:00:00Z";
    let placed = [
        purchase("e0", "c0", "50000", at),
        purchase("e1", "c1", "200000", at),
    ];
    world.wait_applied(&world.produce_json(&placed), Duration::from_secs(60));
    world.wait_outbox_drained(0, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));
    // Redis will lose everything from here on.
    let mut before = world.snapshot();
    tierd = Tierd::spawn(&world, no_history);
    let ends = world.produce_json(&[purchase("e2", "c0", "30000", at)]);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));
    if after_input {
        before = world.snapshot();
    }
    let open = open.then(|| world.open_output_transaction());
    for (version, bound) in [("gold-2", "70000"), ("gold-3", "100000")] {
        files.push(use_rules(&mut world, &gold_from(version, bound)));
        let mut t = Tierd::spawn(&world, no_history);
        wait_sweeps_done(&t, 1.0);
        world.wait_outbox_drained(0, Duration::from_secs(60));
        assert_eq!(t.terminate(), Some(0));
    }
    let (told, published) = if open.is_some() {
        (HashMap::new(), 0)
    } else {
        world.assert_fresh_ids_in_order()
    };
    assert!(
        open.is_some() || told["c0"] == "gold",
        "-2 moved c0 up, -3 kept them (minimum stay)"
    );
    assert_eq!(
        world.customer_state("c0").unwrap().tier.as_deref(),
        Some("gold")
    );
    let live = ["c0", "c1"]
        .iter()
        .map(|c| ((*c).to_owned(), world.customer_state(c).unwrap()))
        .collect();
    world.restore(&before);
    FellBack {
        world,
        no_history,
        ends,
        published,
        live,
        open,
        _files: files,
    }
}

impl FellBack {
    /// Waits until `tierd` replayed the published input under `-3`, then (at most 30 s) for
    /// `restated` customers told their tier; then checks that every customer's last change
    /// names the tier Redis holds (`c0`: `basic`, told by a `rules_changed` change from
    /// `gold`), with ids and sequences as ever, and that nothing is left recorded.
    fn assert_restated(&self, tierd: &Tierd, restated: f64) {
        let world = &self.world;
        let replayed = |world: &World| {
            let hash = tierd::model::state::rules_hash("gold-3");
            ["c0", "c1"]
                .iter()
                .all(|c| world.customer_state(c).unwrap().rules_hash == hash)
                && world.partition_meta(0).1 >= self.ends[&0]
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        while !replayed(world) {
            assert!(
                Instant::now() < deadline,
                "not replayed:\n{}",
                tierd.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while tierd.metric("tierd_tiers_restated_total") < restated && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        world.wait_outbox_drained(0, Duration::from_secs(60));
        let log = tierd.log_text();
        // Without the restatement, these fail (`c0`: `gold`, Redis `basic`).
        let (last, records) = world.assert_fresh_ids_in_order();
        for c in ["c0", "c1"] {
            let state = world.customer_state(c).unwrap();
            assert_eq!(
                last.get(c),
                state.tier.as_ref(),
                "{c}: told the tier Redis holds"
            );
        }
        assert!(records > self.published);
        assert_eq!(last["c0"], "basic");
        let c0: Vec<serde_json::Value> = world
            .read_all(&world.output)
            .iter()
            .filter(|r| !r.value.is_empty())
            .map(support::Record::json)
            .filter(|c| c["customer_id"] == "c0")
            .collect();
        let change = c0.last().unwrap();
        assert_eq!(change["previous_tier"], "gold", "{change}");
        assert_eq!(change["tier"], "basic", "{change}");
        assert_eq!(change["direction"], "down", "{change}");
        assert_eq!(change["reason"], "rules_changed", "{change}");
        assert_eq!(change["rules_version"], "gold-3", "{change}");
        // c0's initial placement and this one: c1 was told nothing again.
        assert_eq!(c0.iter().filter(|c| c["tier"] == "basic").count(), 2);
        assert!(log.contains("were told their tier"), "{log}");
        assert_eq!(tierd.metric("tierd_tiers_restated_total"), restated);
        assert_eq!(self.pending_restatement(), None);
    }

    /// The restatement the partition's meta hash records.
    fn pending_restatement(&self) -> Option<String> {
        redis::cmd("HGET")
            .arg(self.world.keys(0).meta)
            .arg("restate")
            .query(&mut self.world.redis.conn())
            .unwrap()
    }
}

/// The fallback's residual (issue 11): a replay that falls back to the running rules leaves a
/// customer the first run moved, and it does not, with a last change naming the first run's
/// tier. `c0` is in `basic` when Redis is snapshotted; the first run's `-2` (a lower bound)
/// sweeps them up to `gold`, and `-3` (the old bound again) keeps them there for the minimum
/// stay. Redis restored, restarted without `-2`'s text anywhere, the replay runs under `-3`:
/// `c0` never reached `gold` and no change is decided for them. After the replay tierd reads
/// the output topic back and tells `c0` `basic` (a `rules_changed` change from `gold`, with a
/// new id above every sequence published); `c1`, told the tier it is in, is not told again.
#[test]
fn a_replay_that_falls_back_tells_customers_the_tier_it_leaves_them_in() {
    let run = fell_back();
    let tierd = Tierd::spawn(&run.world, run.no_history);
    run.assert_restated(&tierd, 1.0);
    let log = tierd.log_text();
    assert!(log.contains("list its file in rules.history"), "{log}");
    assert_eq!(tierd.metric("tierd_restate_failures_total"), 0.0);
}

/// While the output topic cannot be read back, the failure is counted and logged, input flows
/// again, and the restatement stays recorded with the partition; the next owner (here after
/// a restart) does it.
#[test]
fn a_restatement_that_cannot_read_the_output_topic_is_left_to_the_next_owner() {
    let run = fell_back();
    let world = &run.world;
    let mut tierd = Tierd::spawn_env(
        world,
        "",
        run.no_history,
        &[("FAILPOINTS", "restate-read=return")],
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while tierd.metric("tierd_restate_failures_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no failure:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(tierd
        .log_text()
        .contains("Cannot read back the output topic"));
    assert!(run.pending_restatement().is_some(), "recorded");
    // Input is not held while the read-back waits for its next attempt.
    let later = world.produce_json(&[purchase("e3", "c1", "10", "2026-11-02T10:00:00Z")]);
    world.wait_applied(&later, Duration::from_secs(60));
    assert_eq!(tierd.metric("tierd_tiers_restated_total"), 0.0);
    assert_eq!(tierd.terminate(), Some(0));
    assert!(run.pending_restatement().is_some(), "still recorded");

    let tierd = Tierd::spawn(world, run.no_history);
    run.assert_restated(&tierd, 1.0);
}

/// The read-back goes over every partition of the output topic (four here; `c0`'s changes
/// are on another than partition 0), and past a transaction
/// another producer holds open on each (as another instance's publisher does while it
/// publishes): `c0`'s `gold` change is behind it, readable only once it commits. The
/// restatement waits until each partition's last stable offset reaches the end the read
/// began with; read only up to the open transaction, `c0` would look told `basic` (their
/// first change) and be left told `gold` once it commits.
#[test]
fn a_restatement_reads_every_output_partition_past_an_open_transaction() {
    let mut world = World::start(1);
    world.output = support::unique("changes");
    world.broker.create_topics(&[&world.output], 4);
    let mut run = rolled_back_on(world, false, "[kafka]\nhistory_topic = \"\"\n", true);
    let open = run.open.take().expect("a transaction left open");
    let tierd = Tierd::spawn(&run.world, run.no_history);
    tierd.wait_log("Reading back the output topic", Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        tierd.metric("tierd_tiers_restated_total"),
        0.0,
        "restated before the open transaction ended:\n{}",
        tierd.log_text()
    );
    open.commit();
    run.assert_restated(&tierd, 1.0);
    // c0's changes are on another partition than the input's only one.
    let c0: std::collections::HashSet<i32> = run
        .world
        .read_all(&run.world.output)
        .iter()
        .filter(|r| r.key.as_deref() == Some(b"c0".as_slice()))
        .map(|r| r.partition)
        .collect();
    assert!(
        !c0.is_empty() && !c0.contains(&0),
        "c0's changes on partitions {c0:?}"
    );
}

/// Input flows while the output topic is read back: `c1` (told `gold`) is pinned to `basic`
/// by an operator during the read, and that change is committed but not yet on the topic
/// when the read reaches the end (the broker's answer to tierd's produce is held back by a
/// proxy). The read still finds `c1` told `gold`, but `c1`'s last change names the tier they
/// are in: `c1` is not told `basic` a second time; `c0` is restated as ever.
#[test]
fn a_restatement_leaves_out_customers_told_during_the_read() {
    let (proxy, broker) = KafkaProxy::with_broker();
    let mut world = World::start_on(1, support::Redis::start(), broker);
    world.output = support::unique("changes");
    world.broker.create_topics(&[&world.output], 4);
    let extra = "[kafka]\nhistory_topic = \"\"\n[kafka.producer]\n\"client.id\" = \"publisher\"\n";
    let mut run = rolled_back_on(world, false, extra, true);
    let open = run.open.take().expect("a transaction left open");
    let tierd = Tierd::spawn(&run.world, run.no_history);
    tierd.wait_log("Reading back the output topic", Duration::from_secs(90));
    // The read has taken each partition's end and waits for the open transaction; tierd's
    // next round stays open (its records written, the answers held).
    proxy.hold_client(kafka_proxy::PRODUCE, "publisher", 0);
    let pin = serde_json::json!({
        "event_id": "o1", "customer_id": "c1", "type": "override",
        "occurred_at": "2026-11-02T10:00:00Z", "tier": "basic", "mode": "fixed",
    });
    let world = &run.world;
    let pinned = world.produce_json(&[pin])[&0];
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.partition_meta(0).1 < pinned {
        assert!(
            Instant::now() < deadline,
            "not applied:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        world.customer_state("c1").unwrap().tier.as_deref(),
        Some("basic")
    );
    proxy.wait_held("publisher", || tierd.log_text());
    open.commit();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tierd.metric("tierd_tiers_restated_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "not restated:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.release();
    run.assert_restated(&tierd, 1.0);
    let c1: Vec<(String, String)> = world
        .read_all(&world.output)
        .iter()
        .filter(|r| r.key.as_deref() == Some(b"c1".as_slice()) && !r.value.is_empty())
        .map(support::Record::json)
        .filter(|v| v["sequence"].is_u64())
        .map(|v| {
            (
                v["tier"].as_str().unwrap().to_owned(),
                v["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        c1.last().map(|(t, r)| (t.as_str(), r.as_str())),
        Some(("basic", "manual")),
        "c1 told basic once, by the pin: {c1:?}"
    );
}

/// Redis snapshotted after the last input, so both rules changes Redis loses start right at
/// the restored offset (the partition was quiet). Without `-2`'s text the replay cannot go
/// through `-2`'s sweep: it falls back (numbered above, restated). Before, the claim resumed
/// `-3`'s recorded sweep at once from `-1`, skipping `-2`'s without a word: no renumbering,
/// no restatement (`c0` told gold, Redis basic).
#[test]
fn two_rules_changes_at_the_restored_offset_without_the_first_ones_text_are_restated() {
    let run = rolled_back(true, "[kafka]\nhistory_topic = \"\"\n");
    let tierd = Tierd::spawn(&run.world, run.no_history);
    run.assert_restated(&tierd, 1.0);
    let log = tierd.log_text();
    assert!(log.contains("list its file in rules.history"), "{log}");
    assert!(log.contains("Changes are numbered above sequence"), "{log}");
}

/// The same with `-2`'s text known (the history topic keeps it): the replay goes through
/// `-2`'s sweep, then `-3`'s, both at the restored offset, as the first run did — every
/// change comes out again byte for byte and `c0` ends in gold again. Before, `-2`'s sweep was
/// skipped: `c0` stayed basic (`seq` 1 instead of 2).
#[test]
fn two_rules_changes_at_the_restored_offset_are_replayed_in_turn() {
    let run = rolled_back(true, "");
    let world = &run.world;
    let live: Vec<tierd::model::CustomerState> =
        ["c0", "c1"].iter().map(|c| run.live[*c].clone()).collect();
    let tierd = Tierd::spawn(world, "");
    let deadline = Instant::now() + Duration::from_secs(90);
    let hash = tierd::model::state::rules_hash("gold-3");
    while ["c0", "c1"]
        .iter()
        .any(|c| world.customer_state(c).unwrap().rules_hash != hash)
        || world.outbox_len(0) > 0
    {
        assert!(
            Instant::now() < deadline,
            "not replayed:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = tierd.log_text();
    assert!(!log.contains("under the running rules"), "{log}");
    for (c, live) in ["c0", "c1"].iter().zip(&live) {
        assert_eq!(
            &world.customer_state(c).unwrap(),
            live,
            "{c}: the replay ends in the live state"
        );
    }
    world.assert_fresh_ids_in_order();
    assert_eq!(tierd.metric("tierd_sequence_floors_raised_total"), 0.0);
    assert_eq!(tierd.metric("tierd_tiers_restated_total"), 0.0);
}

/// `event` mode: a Redis snapshot taken between a sweep's completion commit and the commit of
/// the timers it held (they fire right after, under its rules), then a new version claiming
/// the quiet partition (its sweep starts at the same input offset). A replay from that
/// snapshot fires the held timers first, under the rules whose sweep completed, then runs the
/// new version's sweep, as the first run did. Before, the new sweep ran first and the timers
/// fired after it, under the new rules: the lapses published under `ev-2` were never decided
/// again and every customer ended in another state (`seq` 1 instead of 3).
#[test]
fn a_snapshot_between_a_sweep_and_the_timers_it_held_replays_them_under_its_rules() {
    let mut world = World::start(1);
    let n = 150i64;
    let event = "[clock]\nmode = \"event\"\nlateness_s = 0\n";
    let mut files = vec![use_rules(&mut world, &recency("ev-1", 1))];
    let mut tierd = Tierd::spawn(&world, event);
    tierd.wait_partitions(1, Duration::from_secs(60));
    let bought = "2026-11-01T10:00:00Z";
    let events = purchases("e", 0..n, |_| "10".into(), bought);
    world.wait_applied(&world.produce_json(&events), Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));

    // `ev-2` sweeps 150 customers 10 a second; meanwhile one purchase three days later moves the
    // partition's clock past everyone's lapse under `ev-2`: held until the sweep completes.
    files.push(use_rules(&mut world, &recency("ev-2", 2)));
    world.rules_extra = "sweep_per_second = 10".into();
    let mut tierd = Tierd::spawn_env(
        &world,
        "",
        event,
        &[("FAILPOINTS", "sweep-completed=1*sleep(15000)")],
    );
    wait_swept(&tierd, 1.0);
    let ends = world.produce_json(&[purchase("z0", "z", "10", "2026-11-04T10:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert!(
        tierd.metric("tierd_rules_sweep_partitions_done") < 1.0,
        "the clock moved during the sweep"
    );
    let lapsed = |world: &World| lapsed_of(world, n);
    tierd.wait_log("Rules sweep complete.", Duration::from_secs(60));
    // Redis will lose everything from here on: the sweep is complete, its held timers not
    // fired yet (the fault holds them back 15 s).
    let before = world.snapshot();
    assert_eq!(lapsed(&world), 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while lapsed(&world) < n {
        assert!(Instant::now() < deadline, "no lapse:\n{}", tierd.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    world.wait_outbox_drained(0, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));

    // `ev-3` claims the quiet partition: its sweep makes everyone active again at once.
    files.push(use_rules(&mut world, &recency("ev-3", 5)));
    world.rules_extra = String::new();
    let tierd = Tierd::spawn(&world, event);
    wait_sweeps_done(&tierd, 1.0);
    world.wait_outbox_drained(0, Duration::from_secs(60));
    assert_active_again_then_replayed(&world, &tierd, "ev-3", n, &before, &ends);
    drop(files);
}
