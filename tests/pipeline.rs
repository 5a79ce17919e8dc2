//! End to end: a hand-checked stream of purchases, refunds, a duplicate and an out-of-order
//! event yields the exact expected customer states, tier-change events and API answers.

mod support;

use std::time::Duration;
use support::{purchase, refund, Tierd, World};
use tierd::model::change::change_id;
use tierd::model::time::parse_rfc3339_ms;

#[test]
fn purchases_refunds_duplicates_and_late_events_give_the_exact_states_and_changes() {
    let world = World::start(3);
    // Event time drives the engine, so change times are the events' times.
    let mut tierd = Tierd::spawn(&world, "[clock]\nmode = \"event\"\nlateness_s = 0\n");
    tierd.wait_partitions(3, Duration::from_secs(60));

    let events = vec![
        purchase("a1", "alice", "150000.00", "2026-11-01T10:00:00Z"), // initial D
        purchase("a2", "alice", "60000.50", "2026-11-02T10:00:00Z"),  // 210000.50 → up C
        purchase("a3", "alice", "300000", "2026-11-03T10:00:00Z"),    // 510000.50 → up B
        refund("ar1", "alice", "20000", "2026-11-04T10:00:00Z"),      // 490000.50 → down C (refund)
        purchase("a2", "alice", "60000.50", "2026-11-02T10:00:00Z"),  // duplicate: counted once
        purchase("a0", "alice", "10", "2026-10-31T09:00:00+01:00"), // out of order: 490010.50, still C
        purchase("b1", "bob", "1000000", "2026-11-05T00:00:00Z"),   // initial A (inclusive bound)
        purchase("c1", "carol", "199999.99", "2026-11-05T00:00:00Z"), // initial D
        purchase("c2", "carol", "0.01", "2026-11-06T00:00:00Z"),    // exactly 200000 → up C
    ];
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));

    // Customer state in Redis.
    let alice = world.customer_state("alice").expect("alice stored");
    assert_eq!(
        (alice.count, alice.sum, alice.refunds, alice.refunded),
        (4, 51_001_050, 1, 2_000_000)
    );
    assert_eq!(alice.sum - alice.refunded, 49_001_050);
    assert_eq!(
        alice.first,
        Some(parse_rfc3339_ms("2026-10-31T08:00:00Z").unwrap())
    );
    assert_eq!(
        alice.last,
        Some(parse_rfc3339_ms("2026-11-03T10:00:00Z").unwrap()),
        "out-of-order purchase must not move last back"
    );
    assert_eq!((alice.tier.as_deref(), alice.seq), (Some("C"), 4));
    let carol = world.customer_state("carol").unwrap();
    assert_eq!(
        (carol.tier.as_deref(), carol.sum, carol.seq),
        (Some("C"), 20_000_000, 2)
    );

    // Tier-change events: exact sequence per customer.
    let changes: Vec<serde_json::Value> = world
        .read_all(&world.output)
        .iter()
        .map(|r| {
            assert_eq!(
                r.key.as_deref(),
                r.json()["customer_id"].as_str().map(str::as_bytes),
                "keyed by customer"
            );
            r.json()
        })
        .collect();
    let of = |c: &str| -> Vec<(u64, Option<String>, String, String, String, String)> {
        changes
            .iter()
            .filter(|e| e["customer_id"] == c)
            .map(|e| {
                (
                    e["sequence"].as_u64().unwrap(),
                    e["previous_tier"].as_str().map(str::to_owned),
                    e["tier"].as_str().unwrap().to_owned(),
                    e["direction"].as_str().unwrap().to_owned(),
                    e["reason"].as_str().unwrap().to_owned(),
                    e["cause"]["event_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let s = |v: &str| v.to_owned();
    assert_eq!(
        of("alice"),
        vec![
            (1, None, s("D"), s("initial"), s("purchase"), s("a1")),
            (2, Some(s("D")), s("C"), s("up"), s("purchase"), s("a2")),
            (3, Some(s("C")), s("B"), s("up"), s("purchase"), s("a3")),
            (4, Some(s("B")), s("C"), s("down"), s("refund"), s("ar1")),
        ]
    );
    assert_eq!(
        of("bob"),
        vec![(1, None, s("A"), s("initial"), s("purchase"), s("b1"))]
    );
    assert_eq!(
        of("carol"),
        vec![
            (1, None, s("D"), s("initial"), s("purchase"), s("c1")),
            (2, Some(s("D")), s("C"), s("up"), s("purchase"), s("c2"))
        ]
    );
    assert_eq!(changes.len(), 7);
    let down = changes
        .iter()
        .find(|e| e["customer_id"] == "alice" && e["sequence"] == 4)
        .unwrap();
    let origin = world.customer_state("alice").unwrap().origin;
    assert!(
        origin.is_some(),
        "a new customer records the event that created them"
    );
    assert_eq!(down["event_id"], change_id("alice", origin, 4));
    assert_eq!(down["metrics"]["monetary"], "490000.50");
    assert_eq!(down["metrics"]["frequency"], 3);
    assert_eq!(down["metrics"]["currency"], "CNY");
    assert_eq!(down["rules_version"], "b2b-lifetime-1");
    assert_eq!(down["rule"], "tiers[2] C: sum >= 200000.00");
    assert_eq!(down["policy"], "downgrade=replace");
    assert_eq!(down["values"]["sum"], "490000.50");
    assert_eq!(down["occurred_at"], "2026-11-04T10:00:00.000Z");
    assert_eq!(down["cause"]["topic"], world.input.as_str());
    let (p, o) = (
        down["cause"]["partition"].as_i64().unwrap(),
        down["cause"]["offset"].as_i64().unwrap(),
    );
    assert!(
        (0..3).contains(&p) && o >= 0,
        "cause names the input position"
    );

    // API.
    let (status, body) = tierd.get("/v1/customers/alice");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["tier"], "C");
    assert_eq!(v["tier_display_name"], "C: regular account");
    assert_eq!(v["metrics"]["monetary"], "490010.50");
    assert_eq!(v["metrics"]["frequency"], 4);
    assert_eq!(
        v["metrics"]["first_purchase_at"],
        "2026-10-31T08:00:00.000Z"
    );
    assert_eq!(v["metrics"]["last_purchase_at"], "2026-11-03T10:00:00.000Z");
    assert_eq!(v["tier_since"], "2026-11-04T10:00:00.000Z");
    assert_eq!(tierd.get("/v1/customers/nobody").0, 404);
    assert_eq!(tierd.get("/healthz").0, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tierd.get("/readyz/ingest").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {}",
            tierd.get("/readyz/ingest").1
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Metrics.
    assert_eq!(tierd.metric("tierd_events_applied_total"), 8.0);
    assert_eq!(tierd.metric("tierd_events_deduplicated_total"), 1.0);
    assert_eq!(tierd.metric("tierd_tier_changes_total"), 7.0);
    assert_eq!(tierd.metric("tierd_events_dead_lettered_total"), 0.0);
    // Every input record consumed (the duplicate too), every change published, none left
    // (the publisher counts and measures after its trim, which `wait_applied` sees: settle).
    let produced = ends.values().sum::<i64>() as f64;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = tierd.get("/metrics").1;
        let settled = tierd.metric("tierd_events_consumed_total") == produced
            && tierd.metric("tierd_batch_events_sum") == produced
            && metrics.contains("tierd_outbox_published_total{kind=\"change\"} 7")
            && tierd.metric("tierd_outbox_depth") == 0.0
            && metrics.contains("tierd_batch_apply_duration_seconds_bucket");
        if settled {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Clean shutdown: events produced just before SIGTERM are either applied with their
    // changes published, or left for the next owner — never applied with changes stranded.
    let more: Vec<_> = (0..300)
        .map(|i| {
            purchase(
                &format!("late-{i}"),
                &format!("d{}", i % 30),
                "100000",
                "2026-11-07T00:00:00Z",
            )
        })
        .collect();
    world.produce_json(&more);
    assert_eq!(tierd.terminate(), Some(0));
    assert!(tierd.log_text().contains("Stopped."));
    for p in 0..3 {
        assert_eq!(
            world.outbox_len(p),
            0,
            "partition {p}: outbox flushed on shutdown"
        );
    }
    let published = world.read_all(&world.output).len();
    let changed: u64 = (0..30)
        .filter_map(|c| world.customer_state(&format!("d{c}")))
        .map(|s| s.seq)
        .sum();
    assert_eq!(
        published as u64,
        7 + changed,
        "every committed change was published before exit"
    );
}

/// A partition whose runner stops for good (here: a customer's stored state is corrupt) stays
/// assigned to this instance without being processed. That must be visible: `/readyz/ingest` fails
/// naming the partition and why, and `tierd_partitions_stopped` counts it — while the other
/// partition keeps being processed. (Before, the stopped partition simply vanished from the
/// instance's view and `/readyz/ingest` answered 200.)
#[test]
fn a_partition_that_stops_is_shown_by_readyz_and_a_metric() {
    let world = World::start(2);
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(2, Duration::from_secs(60));
    let ends = world.produce_json(&[
        purchase("a1", "ann", "5", "2026-11-01T10:00:00Z"),
        purchase("b1", "bob", "5", "2026-11-01T10:00:00Z"),
    ]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tierd.get("/readyz/ingest").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            tierd.get("/readyz/ingest").1
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A state that is not JSON, for a customer no runner has cached (in both partitions: the
    // producer's partitioner decides which one the customer's events go to).
    let mut conn = world.redis.conn();
    for p in 0..2 {
        let _: () = redis::cmd("SET")
            .arg(world.keys(p).customer("zed"))
            .arg("{not json")
            .query(&mut conn)
            .unwrap();
    }
    let zed = world.produce_json(&[purchase("z1", "zed", "5", "2026-11-02T10:00:00Z")]);
    let (&stopped, _) = zed.iter().next().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = tierd.get("/readyz/ingest");
        if status == 503 && body.contains("not processed") {
            assert!(
                body.contains(&format!("partition {stopped}")) && body.contains("cannot be read"),
                "{body}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stopped partition is not visible: {status} {body}\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(tierd.metric("tierd_partitions_stopped"), 1.0);
    assert_eq!(tierd.metric("tierd_partitions_assigned"), 2.0);
    assert_eq!(
        tierd.metric_labeled("tierd_partition_stops_total", "cause=\"corrupt\""),
        1.0
    );
    // Only the running partition counts as swept (the stopped runner gave its count back).
    assert_eq!(tierd.metric("tierd_rules_sweep_partitions_done"), 1.0);
    // The other partition is still processed.
    let other = 1 - stopped;
    let customer = ["ann", "bob", "cat", "dan", "eve", "fay", "gus", "hal"]
        .into_iter()
        .find(|c| {
            let ends =
                world.produce_json(&[purchase(&format!("{c}-2"), c, "1", "2026-11-03T10:00:00Z")]);
            ends.contains_key(&other)
        })
        .expect("some customer maps to the other partition");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while world
        .customer_state(customer)
        .is_none_or(|s| s.last != Some(parse_rfc3339_ms("2026-11-03T10:00:00Z").unwrap()))
    {
        assert!(std::time::Instant::now() < deadline, "{}", tierd.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A stale claim cannot stop the rightful owner. An instance that lost the partition long ago
/// (a zombie whose claim was stuck while Redis was down, say) claims it in Redis, raising the
/// epoch: the owner's next commit is fenced. The owner, still assigned the partition by the
/// group, shows it as stopped for a moment, claims it again and goes on from the offset in
/// Redis; every event is counted once. (Before, the partition stayed stopped for good.)
#[test]
fn a_stale_claim_cannot_stop_the_rightful_owner() {
    let world = World::start(1);
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let ends = world.produce_json(&[purchase("a1", "ann", "5", "2026-11-01T10:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));

    // The stale claim.
    let stale = tierd::store::partition::claim(
        &mut world.redis.conn(),
        &world.keys(0),
        None,
        &[],
        "b2b-lifetime-1",
        "",
        None,
    )
    .unwrap();
    let ends = world.produce_json(&[
        purchase("a2", "ann", "5", "2026-11-01T11:00:00Z"),
        purchase("b1", "bob", "7", "2026-11-01T11:00:00Z"),
    ]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let (epoch, _) = world.partition_meta(0);
    assert!(epoch > stale.epoch, "claimed again after the stale claim");
    assert_eq!(world.customer_state("ann").unwrap().count, 2);
    assert_eq!(world.customer_state("bob").unwrap().count, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tierd.get("/readyz/ingest").0 != 200 || tierd.metric("tierd_partitions_stopped") != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            tierd.get("/readyz/ingest").1
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(tierd
        .log_text()
        .contains("Partition claimed again (after a fence"));
    assert_eq!(tierd.metric("tierd_apply_fenced_total"), 1.0);
    assert_eq!(
        tierd.metric_labeled("tierd_partition_stops_total", "cause=\"fenced\""),
        1.0
    );
    // Published once each, in order.
    let seqs: Vec<(String, u64)> = world
        .read_all(&world.output)
        .iter()
        .map(|r| {
            let v = r.json();
            (
                v["customer_id"].as_str().unwrap().to_owned(),
                v["sequence"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seqs.len(), "no change twice: {seqs:?}");
}

/// A state an older tierd stored as JSON is read as it is (the purchase counts on top of it)
/// and written back in the binary form with the customer's next change.
#[test]
fn a_state_stored_as_json_by_an_older_tierd_is_read_and_written_back_binary() {
    let world = World::start(1);
    // Kim's state as an older binary left it: two purchases of 300,000.00 EUR, tier B, with
    // their ids remembered in the JSON array form.
    let at = parse_rfc3339_ms("2026-11-01T10:00:00Z").unwrap();
    let json = serde_json::json!({
        "first": at, "last": at, "count": 2, "sum": 60_000_000, "refunds": 0, "refunded": 0,
        "tier": "B", "since": at, "rv": tierd::model::state::rules_hash("b2b-lifetime-1"),
        "at": at, "seq": 1, "clock": at, "ids": [[1, at], [2, at]]
    });
    let key = world.keys(0).customer("kim");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(serde_json::to_vec(&json).unwrap())
        .query(&mut world.redis.conn())
        .unwrap();
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let ends = world.produce_json(&[purchase("k3", "kim", "250000", "2026-11-02T10:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let stored: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query(&mut world.redis.conn())
        .unwrap();
    assert_eq!(stored.first(), Some(&1), "written back in the binary form");
    let kim = world.customer_state("kim").unwrap();
    assert_eq!(
        (kim.count, kim.sum),
        (3, 85_000_000),
        "counted on top of the JSON state"
    );
    assert_eq!(kim.tier.as_deref(), Some("B"), "850,000.00: still B");
    assert_eq!(kim.ids.len(), 3, "the remembered ids kept");
}

/// The state caches hold at most `ingest.cache_bytes` for the whole instance (here the 1 MiB
/// minimum over two partitions, against ~2.5 MB of customers), and a customer the cache let go
/// is read back from Redis exactly: every second purchase counts on the first.
#[test]
fn the_state_caches_stay_within_the_instance_budget_and_evicted_customers_count_exactly() {
    const BUDGET: f64 = 1_048_576.0;
    const CUSTOMERS: usize = 12_000;
    let world = World::start(2);
    let tierd = Tierd::spawn(&world, "[ingest]\ncache_bytes = 1048576\n");
    tierd.wait_partitions(2, Duration::from_secs(60));
    for round in 0..2 {
        let events: Vec<serde_json::Value> = (0..CUSTOMERS)
            .map(|i| {
                purchase(
                    &format!("r{round}-{i}"),
                    &format!("customer-{i:05}"),
                    "100",
                    "2026-11-01T10:00:00Z",
                )
            })
            .collect();
        let ends = world.produce_json(&events);
        world.wait_applied(&ends, Duration::from_secs(120));
        let (bytes, cached) = (
            tierd.metric("tierd_state_cache_bytes"),
            tierd.metric("tierd_state_cache_customers"),
        );
        assert!(
            bytes <= BUDGET,
            "round {round}: the caches hold {bytes} B over a budget of {BUDGET}"
        );
        // Each partition has ~1.2 MB of customers: both caches are full to within an entry
        // (half the budget each; a share too small, or a cache counted twice, shows here).
        assert!(
            bytes >= BUDGET - 2.0 * 1024.0,
            "round {round}: the caches hold only {bytes} B of a budget of {BUDGET}"
        );
        assert!(
            cached > 1000.0 && cached < CUSTOMERS as f64 / 2.0,
            "round {round}: {cached} customers cached"
        );
    }
    for i in 0..CUSTOMERS {
        let id = format!("customer-{i:05}");
        let state = world.customer_state(&id).expect("stored");
        assert_eq!((state.count, state.sum), (2, 20_000), "{id}");
    }
}

/// The budget is shared among the partitions an instance runs *now*: when a rebalance hands
/// a full instance more partitions, the caches it already had shrink to their new share even
/// while their partitions get no input, so the new partitions fill within the budget. Two
/// instances each fill two of four partitions (1 MiB each: 512 KiB per cache); one leaves;
/// then only the partitions it had get input. Without the quiet caches' trim the survivor
/// would hold ~1.5 MiB.
#[test]
fn a_full_instance_given_more_partitions_stays_within_its_cache_budget() {
    const BUDGET: f64 = 1_048_576.0;
    let world = World::start(4);
    let extra = "[ingest]\ncache_bytes = 1048576\n";
    let survivor = Tierd::spawn(&world, extra);
    survivor.wait_partitions(4, Duration::from_secs(60));
    let mut leaver = Tierd::spawn(&world, extra);
    leaver.wait_partitions(2, Duration::from_secs(60));
    survivor.wait_partitions(2, Duration::from_secs(60));
    // ~6,000 customers per partition (~1.2 MB of cached states each): every cache fills.
    let customers = world.customers_per_partition("c", &[6_000; 4]);
    let fill = |round: &str, partitions: &[usize]| {
        let events: Vec<serde_json::Value> = partitions
            .iter()
            .flat_map(|&p| &customers[p])
            .map(|c| purchase(&format!("{round}-{c}"), c, "100", "2026-11-01T10:00:00Z"))
            .collect();
        let ends = world.produce_json(&events);
        world.wait_applied(&ends, Duration::from_secs(120));
    };
    fill("r1", &[0, 1, 2, 3]);
    let owned_by = |t: &Tierd| -> Vec<usize> {
        t.get("/metrics")
            .1
            .lines()
            .filter(|l| l.starts_with("tierd_state_cache_bytes{"))
            .filter_map(|l| l.split('"').nth(1)?.parse().ok())
            .collect()
    };
    let settled = |t: &Tierd, what: &str| -> f64 {
        // The caches report what they hold every 2 s.
        std::thread::sleep(Duration::from_secs(5));
        let bytes = t.metric("tierd_state_cache_bytes");
        assert!(
            (BUDGET - 4.0 * 1024.0..=BUDGET).contains(&bytes),
            "{what}: the caches hold {bytes} B of a budget of {BUDGET}"
        );
        bytes
    };
    settled(&survivor, "two partitions each");
    let mut kept = owned_by(&survivor);
    kept.sort_unstable();
    assert_eq!(kept.len(), 2, "{kept:?}");

    assert_eq!(leaver.terminate(), Some(0));
    survivor.wait_partitions(4, Duration::from_secs(60));
    let handed: Vec<usize> = (0..4).filter(|p| !kept.contains(p)).collect();
    fill("r2", &handed);
    settled(
        &survivor,
        "four partitions, input on the two handed over only",
    );
    // Each cache within its share now: a quarter of the budget (and one entry).
    for line in survivor.get("/metrics").1.lines() {
        if let Some(rest) = line.strip_prefix("tierd_state_cache_bytes{") {
            let bytes: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(bytes <= BUDGET / 4.0 + 1024.0, "{line}");
        }
    }
}
