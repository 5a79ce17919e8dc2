//! Erasing a customer (a deletion request) while tierd runs: an `erase` event removes the
//! state, the timer, the rank entries and the tier count through the fenced commit, publishes a
//! tombstone, and a customer created again later never reuses a change id of the erased one
//! (issue 11, items 7 and 12).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::time::Duration;
use support::{purchase, Record, Tierd, World};

const EVENT_CLOCK: &str = "[clock]\nmode = \"event\"\nlateness_s = 0\n";

fn erase(event_id: &str, customer: &str, at: &str) -> serde_json::Value {
    serde_json::json!({"event_id": event_id, "customer_id": customer, "type": "erase", "occurred_at": at})
}

/// The records keyed by `customer` on `records`, in partition order.
fn of<'r>(records: &'r [Record], customer: &str) -> Vec<&'r Record> {
    let mut mine: Vec<&Record> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some(customer.as_bytes()))
        .collect();
    mine.sort_by_key(|r| (r.partition, r.offset));
    mine
}

fn tier_counts(world: &World) -> BTreeMap<String, i64> {
    redis::cmd("HGETALL")
        .arg(world.keys(0).tier_counts)
        .query(&mut world.redis.conn())
        .unwrap()
}

#[test]
fn an_erased_customer_is_gone_and_a_new_one_never_reuses_an_id() {
    erased(World::start(1));
}

#[test]
fn an_erased_customer_is_gone_and_a_new_one_never_reuses_an_id_on_a_redis_cluster() {
    erased(World::start_with(1, support::Redis::start_cluster()));
}

fn erased(mut world: World) {
    let mut rules = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    rules
        .write_all(
            b"version = \"erase-1\"\n[[tiers]]\nname = \"gold\"\nwhen = [\"sum >= 1000\", \"recency_days < 30\"]\n[[tiers]]\nname = \"basic\"\n",
        )
        .unwrap();
    world.rules = rules.path().to_owned();
    let tierd = Tierd::spawn(&world, EVENT_CLOCK);
    tierd.wait_partitions(1, Duration::from_secs(60));
    let ends = world.produce_json(&[
        purchase("a1", "ann", "100", "2026-05-01T10:00:00Z"),
        purchase("a2", "ann", "2000", "2026-05-02T10:00:00Z"),
        purchase("b1", "bob", "50", "2026-05-02T11:00:00Z"),
    ]);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(
        world.customer_state("ann").unwrap().tier.as_deref(),
        Some("gold")
    );
    let keys = world.keys(0);
    let mut conn = world.redis.conn();
    let timer: Option<f64> = redis::cmd("ZSCORE")
        .arg(&keys.timers)
        .arg("ann")
        .query(&mut conn)
        .unwrap();
    assert!(timer.is_some(), "gold holds while recent: a recency timer");
    assert_eq!(
        tier_counts(&world),
        BTreeMap::from([("basic".into(), 1), ("gold".into(), 1)])
    );

    // Erased, and the erase re-sent: one tombstone, nothing of ann left.
    let ends = world.produce_json(&[
        erase("x1", "ann", "2026-05-03T10:00:00Z"),
        erase("x1", "ann", "2026-05-03T10:00:00Z"),
        erase("x2", "nobody", "2026-05-03T10:00:00Z"),
    ]);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert!(world.customer_state("ann").is_none(), "state deleted");
    let timer: Option<f64> = redis::cmd("ZSCORE")
        .arg(&keys.timers)
        .arg("ann")
        .query(&mut conn)
        .unwrap();
    assert_eq!(timer, None, "timer entry removed");
    assert_eq!(
        tier_counts(&world),
        BTreeMap::from([("basic".into(), 1), ("gold".into(), 0)]),
        "ann left the tier counts"
    );
    assert!(world.customer_state("nobody").is_none(), "nothing created");
    assert_eq!(tierd.get("/v1/customers/ann").0, 404);
    // Gone from the status page's latest changes too (bob's stay).
    let (code, status) = tierd.get("/v1/status");
    assert_eq!(code, 200, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let shown: Vec<&str> = status["recent_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["customer_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        shown,
        ["bob"],
        "the erased customer's changes are not shown"
    );
    // Counted as a move to "erased" (once: the re-sent erase is a duplicate).
    let erased: f64 = tierd
        .get("/metrics")
        .1
        .lines()
        .filter(|l| {
            l.starts_with("tierd_tier_changes_total{")
                && l.contains("reason=\"erased\"")
                && l.contains("to=\"erased\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(erased, 1.0);
    let records = world.read_all(&world.output);
    let anns = of(&records, "ann");
    let first_ids: Vec<String> = anns
        .iter()
        .filter(|r| !r.value.is_empty())
        .map(|r| r.json()["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(first_ids.len(), 2, "initial, then up: {anns:?}");
    assert_eq!(
        anns.iter().filter(|r| r.value.is_empty()).count(),
        1,
        "one tombstone"
    );
    assert!(anns.last().unwrap().value.is_empty(), "the tombstone last");
    assert!(of(&records, "nobody").is_empty());

    // Time passes for the partition (bob's purchase a month later): no timer brings ann back.
    let ends = world.produce_json(&[purchase("b2", "bob", "50", "2026-06-20T10:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert!(world.customer_state("ann").is_none(), "no resurrection");

    // Ann comes back as a new customer: her changes restart at sequence 1 with new ids. The
    // first erase, re-sent late (a producer retry), is about the earlier incarnation: it
    // leaves the new one alone.
    let ends = world.produce_json(&[
        purchase("a3", "ann", "100", "2026-06-21T10:00:00Z"),
        purchase("a4", "ann", "2000", "2026-06-22T10:00:00Z"),
        erase("x1", "ann", "2026-05-03T10:00:00Z"),
    ]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let records = world.read_all(&world.output);
    let again: Vec<serde_json::Value> = of(&records, "ann")
        .into_iter()
        .skip(3)
        .filter(|r| !r.value.is_empty())
        .map(Record::json)
        .collect();
    assert_eq!(
        again
            .iter()
            .map(|v| (v["sequence"].as_u64().unwrap(), v["tier"].as_str().unwrap()))
            .collect::<Vec<_>>(),
        [(1, "basic"), (2, "gold")]
    );
    let mut ids: HashSet<String> = first_ids.into_iter().collect();
    for v in &again {
        assert!(
            ids.insert(v["event_id"].as_str().unwrap().to_owned()),
            "change id {} reused for a different change: {v}",
            v["event_id"]
        );
    }
    assert_eq!(
        world.customer_state("ann").unwrap().count,
        2,
        "not erased again"
    );
    assert_eq!(
        of(&records, "ann")
            .iter()
            .filter(|r| r.value.is_empty())
            .count(),
        1,
        "still one tombstone"
    );
    assert_eq!(
        tier_counts(&world),
        BTreeMap::from([("basic".into(), 1), ("gold".into(), 1)])
    );
}
