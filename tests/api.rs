//! The HTTP API's answers at its edges, through the real tierd, Kafka and Redis: a bad id, an
//! unknown customer, a frozen Redis (a lookup is answered 503 within `api.redis_timeout_ms`,
//! never held), readiness against `api.ready_max_lag`, and readiness to serve lookups apart
//! from readiness of ingestion.

mod support;

use std::time::{Duration, Instant};
use support::{purchase, Tierd, World};

/// `GET path` with a client that gives up after 20 s (status 0 then): a request tierd holds
/// is seen as such instead of hanging the test.
fn get(tierd: &Tierd, path: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        match client.get(format!("{}{path}", tierd.api)).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    });
    (status, body, started.elapsed())
}

fn error_code(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .map(|v| v["error"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// A caller that routes on the answer gets one in bounded time: 400 for an id the contract
/// refuses, 404 for a customer never seen, and 503 `redis_unavailable` within the configured
/// wait while Redis is frozen (before `api.redis_timeout_ms`, such a lookup waited for as
/// long as Redis did); `/readyz` and `/v1/tiers` too. Once Redis goes on, so do lookups.
#[test]
fn lookups_are_answered_in_bounded_time_also_while_redis_is_frozen() {
    let world = World::start(1);
    let tierd = Tierd::spawn(&world, "[api]\nredis_timeout_ms = 300\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let ends = world.produce_json(&[purchase("a1", "ann", "10", "2026-11-01T10:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));

    let (status, body, _) = get(&tierd, "/v1/customers/ann");
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["customer_id"], "ann", "{body}");

    let long = "x".repeat(129);
    let (status, body, _) = get(&tierd, &format!("/v1/customers/{long}"));
    assert_eq!(
        (status, error_code(&body)),
        (400, "invalid_id".into()),
        "{body}"
    );
    let (status, body, _) = get(&tierd, "/v1/customers/nobody");
    assert_eq!(
        (status, error_code(&body)),
        (404, "not_found".into()),
        "{body}"
    );

    world.redis.pause();
    let (status, body, took) = get(&tierd, "/v1/customers/ann");
    let (ready, ready_body, ready_took) = get(&tierd, "/readyz");
    let (ingest, ingest_body, _) = get(&tierd, "/readyz/ingest");
    let (tiers, tiers_body, _) = get(&tierd, "/v1/tiers");
    let (status_code, status_body, status_took) = get(&tierd, "/v1/status");
    world.redis.resume();
    assert_eq!(
        (status, error_code(&body)),
        (503, "redis_unavailable".into()),
        "a lookup while Redis is frozen (after {took:?}): {body}"
    );
    assert!(body.contains("within 300 ms"), "{body}");
    // Bounded: the 20 s client timeout would show as status 0 above; this only guards
    // against a wait far beyond the configured one.
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(ready, 503, "{ready_body} after {ready_took:?}");
    assert!(ready_body.starts_with("redis unreachable"), "{ready_body}");
    assert_eq!(ingest, 503, "{ingest_body}");
    assert!(
        ingest_body.starts_with("redis unreachable"),
        "{ingest_body}"
    );
    assert_eq!(
        (tiers, error_code(&tiers_body)),
        (503, "redis_unavailable".into()),
        "{tiers_body}"
    );
    assert_eq!(
        (status_code, error_code(&status_body)),
        (503, "redis_unavailable".into()),
        "{status_body}"
    );
    assert!(status_took < Duration::from_secs(10), "{status_took:?}");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body, _) = get(&tierd, "/v1/customers/ann");
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lookups did not recover: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `/readyz/ingest` holds an instance back while a partition lags more than
/// `api.ready_max_lag` and names the lag; at or under the bound it is ready. `/readyz` (ready
/// to serve lookups) stays 200 meanwhile: a catching-up instance still serves lookups. (A transactional producer's commit
/// marker is an offset no consumer receives: the lag stays 1 after it, which the bound of 0
/// here shows, until a plain record follows it.)
#[test]
fn readiness_names_a_lag_over_the_bound() {
    let world = World::start(1);
    let tierd = Tierd::spawn(&world, "[api]\nready_max_lag = 0\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    world.produce_in_transaction(&[purchase("t1", "tom", "10", "2026-11-01T10:00:00Z")]);

    let wait_for = |want: u16, text: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body, _) = get(&tierd, "/readyz/ingest");
            if status == want && body.contains(text) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz/ingest never {want} {text:?}: {status} {body}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // The record (offset 0) applied, the marker (offset 1) never delivered: lag 1 > 0.
    world.wait_applied(
        &std::collections::BTreeMap::from([(0, 1)]),
        Duration::from_secs(60),
    );
    wait_for(503, "partition 0: lag 1 > 0");
    let (status, body, _) = get(&tierd, "/readyz");
    assert_eq!(
        (status, body.as_str()),
        (200, "ready to serve lookups\n"),
        "lookups are served while ingestion lags"
    );
    // A plain record after the marker: applied, the lag is 0.
    world.produce_json(&[purchase("t2", "tom", "10", "2026-11-01T11:00:00Z")]);
    wait_for(200, "ready: 1 partitions");
    // The marker is a gap of one between the two records, counted but not warned about (a
    // transactional producer writes one per transaction).
    assert_eq!(tierd.metric("tierd_offset_gaps_total"), 1.0);
    let log = tierd.log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("WARN") && l.contains("Offset gap")),
        "{log}"
    );
}

/// With more instances than partitions, the one owning none is not ready to ingest
/// (`/readyz/ingest` 503, saying so) but is ready to serve lookups (`/readyz` 200) and answers
/// them: a Kubernetes Service routing on `/readyz` keeps it in rotation.
#[test]
fn an_instance_owning_no_partition_still_serves_lookups() {
    let world = World::start(1);
    let owner = Tierd::spawn(&world, "");
    owner.wait_partitions(1, Duration::from_secs(60));
    let spare = Tierd::spawn(&world, "");
    let ends = world.produce_json(&[purchase("s1", "sue", "10", "2026-11-01T10:00:00Z")]);
    world.wait_applied(&ends, Duration::from_secs(60));
    // One of the two owns the partition (the cooperative assignor leaves it with the first).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (owner, spare) = loop {
        let (a, b) = (
            owner.metric("tierd_partitions_assigned"),
            spare.metric("tierd_partitions_assigned"),
        );
        if a + b == 1.0 {
            break if a == 1.0 {
                (owner, spare)
            } else {
                (spare, owner)
            };
        }
        assert!(Instant::now() < deadline, "no settled split: {a} {b}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let (status, body, _) = get(&spare, "/readyz/ingest");
    assert_eq!((status, body.as_str()), (503, "no partitions assigned\n"));
    let (status, body, _) = get(&spare, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready to serve lookups\n"));
    let (status, body, _) = get(&spare, "/v1/customers/sue");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["customer_id"],
        "sue"
    );
    let (status, body, _) = get(&owner, "/readyz/ingest");
    assert_eq!((status, body.as_str()), (200, "ready: 1 partitions\n"));
}

/// `GET /v1/customers/{id}/history`: the latest `api.history_changes` tier changes the
/// customer's state keeps, newest first, each equal to the change event published for it
/// (id, sequence, tiers, direction, reason, time); gone with the customer when erased.
#[test]
fn a_customers_history_is_their_latest_published_changes_newest_first() {
    let world = World::start(1);
    let tierd = Tierd::spawn(&world, "[api]\nhistory_changes = 3\n");
    let at = |i: u32| format!("2026-11-01T00:{i:02}:00Z");
    // D (initial) → C → B → A, then a refund back to C: five changes; c2 is placed once.
    let mut events = vec![
        purchase("h1", "c1", "100", &at(1)),
        purchase("h2", "c1", "200000", &at(2)),
        purchase("h3", "c1", "300000", &at(3)),
        purchase("h4", "c1", "600000", &at(4)),
        support::refund("h5", "c1", "800000", &at(5)),
        purchase("k1", "c2", "5", &at(6)),
    ];
    let ends = world.produce_json(&events);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(60));

    let published: Vec<serde_json::Value> = world
        .read_all(&world.output)
        .iter()
        .map(support::Record::json)
        .filter(|c| c["customer_id"] == "c1")
        .collect();
    assert_eq!(published.len(), 5, "{published:#?}");
    let (status, body, _) = get(&tierd, "/v1/customers/c1/history");
    assert_eq!(status, 200, "{body}");
    let history: serde_json::Value = serde_json::from_str(&body).unwrap();
    eprintln!("GET /v1/customers/c1/history:\n{history:#}");
    assert_eq!(history["kept"], 3);
    assert_eq!(history["partition"], 0);
    let changes = history["changes"].as_array().unwrap();
    let newest_first: Vec<&serde_json::Value> = published.iter().rev().take(3).collect();
    assert_eq!(changes.len(), 3, "{body}");
    for (kept, change) in changes.iter().zip(newest_first) {
        for field in [
            "event_id",
            "sequence",
            "occurred_at",
            "previous_tier",
            "tier",
            "direction",
            "reason",
        ] {
            assert_eq!(kept[field], change[field], "{field}: {kept} vs {change}");
        }
    }
    assert_eq!(changes[0]["reason"], "refund");
    assert_eq!(changes[0]["tier"], "C");
    assert_eq!(changes[2]["tier"], "B");

    let (status, body, _) = get(&tierd, "/v1/customers/c2/history");
    assert_eq!(status, 200, "{body}");
    let c2: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(c2["changes"].as_array().unwrap().len(), 1);
    assert_eq!(c2["changes"][0]["direction"], "initial");
    assert_eq!(c2["changes"][0]["previous_tier"], serde_json::Value::Null);

    // Unknown, refused and erased customers.
    let (status, body, _) = get(&tierd, "/v1/customers/nobody/history");
    assert_eq!((status, error_code(&body).as_str()), (404, "not_found"));
    let long = "x".repeat(129);
    let (status, body, _) = get(&tierd, &format!("/v1/customers/{long}/history"));
    assert_eq!((status, error_code(&body).as_str()), (400, "invalid_id"));
    events.clear();
    events.push(serde_json::json!({"event_id": "x1", "customer_id": "c1", "type": "erase", "occurred_at": at(7)}));
    let ends = world.produce_json(&events);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(60));
    let (status, _, _) = get(&tierd, "/v1/customers/c1/history");
    assert_eq!(status, 404);
}
