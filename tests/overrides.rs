//! Manual pins: `override` events flow through the same exactly-once path as purchases,
//! show in the API, and produce changes with reasons `manual` and `manual_expired`.

mod support;

use std::time::Duration;
use support::{purchase, Tierd, World};

fn override_event(
    id: &str,
    customer: &str,
    at: &str,
    fields: serde_json::Value,
) -> serde_json::Value {
    let mut e = serde_json::json!({"event_id": id, "customer_id": customer, "type": "override", "occurred_at": at});
    for (k, v) in fields.as_object().unwrap() {
        e[k] = v.clone();
    }
    e
}

#[test]
fn pins_are_applied_once_shown_in_the_api_and_expire() {
    pins(World::start(1));
}

#[test]
fn pins_are_applied_once_shown_in_the_api_and_expire_on_a_redis_cluster() {
    pins(World::start_with(1, support::Redis::start_cluster()));
}

fn pins(world: World) {
    let mut tierd = Tierd::spawn(&world, "[clock]\nmode = \"event\"\nlateness_s = 0\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let pin = override_event(
        "o1",
        "vic",
        "2026-05-01T09:00:00Z",
        serde_json::json!({"tier": "A", "mode": "floor", "expires_at": "2026-06-01T00:00:00Z"}),
    );
    let ends = world.produce_json(&[
        purchase("p1", "vic", "100", "2026-04-01T10:00:00Z"),
        pin.clone(),
        pin, // re-sent: counted once
        purchase("p2", "vic", "100", "2026-05-10T10:00:00Z"),
        override_event(
            "bad",
            "vic",
            "2026-05-11T00:00:00Z",
            serde_json::json!({"tier": "Z"}),
        ),
        purchase("c1", "carl", "2000000", "2026-05-12T10:00:00Z"),
        override_event(
            "o2",
            "carl",
            "2026-05-13T00:00:00Z",
            serde_json::json!({"tier": "C", "mode": "fixed"}),
        ),
        purchase("c2", "carl", "1", "2026-05-14T10:00:00Z"),
    ]);
    world.wait_applied(&ends, Duration::from_secs(60));

    let (status, body) = tierd.get("/v1/customers/vic");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["tier"], "A");
    assert_eq!(v["pin"]["tier"], "A");
    assert_eq!(v["pin"]["mode"], "floor");
    assert_eq!(v["pin"]["expires_at"], "2026-06-01T00:00:00.000Z");
    assert_eq!(v["pin"]["set_by"], "o1");
    assert_eq!(v["next"]["cause"], "manual_expired");
    assert_eq!(v["next"]["at"], "2026-06-01T00:00:00.000Z");
    assert_eq!(v["next"]["projected_tier"], "D");
    assert_eq!(v["next"]["direction"], "down");
    assert_eq!(v["placed_by"], "tiers[3] D: otherwise");
    assert_eq!(v["evaluated_under_current_rules"], true);
    let (_, body) = tierd.get("/v1/customers/carl");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["tier"].as_str(), v["pin"]["mode"].as_str()),
        (Some("C"), Some("fixed"))
    );
    assert_eq!(v["to_reach"]["tier"], "B");
    assert_eq!(
        v["to_reach"]["missing"],
        serde_json::json!([]),
        "carl qualifies for more; the pin holds him"
    );

    // Time passes (another customer's event moves the partition's clock): the pin lapses.
    let more = world.produce_json(&[
        override_event(
            "o3",
            "carl",
            "2026-05-20T00:00:00Z",
            serde_json::json!({"mode": "clear"}),
        ),
        purchase("t1", "~clock", "1", "2026-07-01T00:00:00Z"),
    ]);
    world.wait_applied(&more, Duration::from_secs(60));

    let changes: Vec<(String, String, String, String)> = world
        .read_all(&world.output)
        .iter()
        .map(|r| r.json())
        .filter(|v| v["customer_id"] != "~clock")
        .map(|v| {
            (
                v["customer_id"].as_str().unwrap().to_owned(),
                v["tier"].as_str().unwrap().to_owned(),
                v["reason"].as_str().unwrap().to_owned(),
                v["occurred_at"].as_str().unwrap()[..10].to_owned(),
            )
        })
        .collect();
    let c = |a: &str, b: &str, r: &str, d: &str| {
        (a.to_owned(), b.to_owned(), r.to_owned(), d.to_owned())
    };
    assert_eq!(
        changes,
        [
            c("vic", "D", "purchase", "2026-04-01"),
            c("vic", "A", "manual", "2026-05-01"),
            c("carl", "A", "purchase", "2026-05-12"),
            c("carl", "C", "manual", "2026-05-13"),
            c("carl", "A", "manual", "2026-05-20"),
            c("vic", "D", "manual_expired", "2026-06-01"),
        ]
    );
    let manual = world
        .read_all(&world.output)
        .iter()
        .map(|r| r.json())
        .find(|v| v["customer_id"] == "vic" && v["reason"] == "manual")
        .unwrap();
    assert_eq!(manual["cause"]["event_id"], "o1");
    assert_eq!(manual["policy"], "manual pin (floor) by o1");
    let dead = world.read_all(&world.dlq);
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].headers.get("tierd.reason").map(String::as_str),
        Some("invalid_override")
    );
    assert_eq!(tierd.terminate(), Some(0));
}
