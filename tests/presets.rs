//! Every rules preset in `config/rules/` replayed through the real pipeline (Apache Kafka + Redis +
//! tierd, `clock.mode = "event"`): a small hand-checked history per preset, and the exact
//! tier-change sequence it must give — time-driven changes included. A last "clock" event
//! moves the partition's event time forward so the timers due before it fire.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use support::{purchase, refund, Tierd, World};

type Log = BTreeMap<String, Vec<(String, String, String)>>;

/// Runs `events` (in order, on one partition) through tierd with `preset`; returns the
/// changes per customer as (tier, reason, date of occurred_at) and the at-risk notices.
fn replay(preset: &str, events: &[serde_json::Value]) -> (Log, Vec<serde_json::Value>) {
    let (log, notices, _) = replay_in(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config/rules")
            .join(preset),
        events,
    );
    (log, notices)
}

/// [`replay`] with the rules file `rules`, also giving the world (its topics and Redis).
fn replay_in(rules: &Path, events: &[serde_json::Value]) -> (Log, Vec<serde_json::Value>, World) {
    let mut world = World::start(1);
    world.rules = rules.to_path_buf();
    let mut tierd = Tierd::spawn(&world, "[clock]\nmode = \"event\"\nlateness_s = 0\n");
    tierd.wait_partitions(1, Duration::from_secs(60));
    let mut all = events.to_vec();
    all.push(purchase("clock", "~clock", "0", "2026-11-20T00:00:00Z"));
    let ends = world.produce_json(&all);
    world.wait_applied(&ends, Duration::from_secs(60));
    let version = tierd::engine::rules::Rules::load(&world.rules, 2)
        .unwrap()
        .version()
        .to_owned();
    let mut log = Log::new();
    let mut notices = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for record in world.read_all(&world.output) {
        let v = record.json();
        assert!(
            ids.insert(v["event_id"].as_str().unwrap().to_owned()),
            "no duplicate: {v}"
        );
        if v["type"] == "at_risk" {
            notices.push(v);
            continue;
        }
        let customer = v["customer_id"].as_str().unwrap().to_owned();
        if customer == "~clock" {
            continue;
        }
        assert_eq!(v["rules_version"], version.as_str());
        log.entry(customer).or_default().push((
            v["tier"].as_str().unwrap().to_owned(),
            v["reason"].as_str().unwrap().to_owned(),
            v["occurred_at"].as_str().unwrap()[..10].to_owned(),
        ));
    }
    assert_eq!(tierd.terminate(), Some(0));
    (log, notices, world)
}

fn expect(log: &Log, customer: &str, want: &[(&str, &str, &str)]) {
    let got: Vec<(&str, &str, &str)> = log
        .get(customer)
        .map(|v| {
            v.iter()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(got, want, "{customer}");
}

#[test]
fn b2b_annual_classes_fall_as_months_leave_the_window() {
    let (log, _) = replay(
        "b2b.toml",
        &[
            purchase("a1", "acme", "600000", "2025-03-10T10:00:00Z"),
            purchase("a2", "acme", "500000", "2025-09-01T10:00:00Z"),
            purchase("b1", "bolt", "1000000", "2026-05-01T10:00:00Z"),
        ],
    );
    // March 2025 leaves the 12-month window on 1 Mar 2026, September on 1 Sep 2026.
    expect(
        &log,
        "acme",
        &[
            ("B", "purchase", "2025-03-10"),
            ("A", "purchase", "2025-09-01"),
            ("B", "window_expiry", "2026-03-01"),
            ("D", "window_expiry", "2026-09-01"),
        ],
    );
    expect(&log, "bolt", &[("A", "purchase", "2026-05-01")]);
}

#[test]
fn b2b_lifetime_classes_never_move_by_time() {
    let (log, _) = replay(
        "b2b-lifetime.toml",
        &[
            purchase("a1", "acme", "600000", "2024-03-10T10:00:00Z"),
            purchase("a2", "acme", "500000", "2024-09-01T10:00:00Z"),
            refund("r1", "acme", "100000.01", "2025-01-01T10:00:00Z"),
        ],
    );
    expect(
        &log,
        "acme",
        &[
            ("B", "purchase", "2024-03-10"),
            ("A", "purchase", "2024-09-01"),
            ("B", "refund", "2025-01-01"),
        ],
    );
}

#[test]
fn telecom_average_monthly_spend() {
    let (log, _) = replay(
        "telecom.toml",
        &[
            purchase("t1", "tom", "1200", "2026-01-15T10:00:00Z"),
            purchase("t2", "tom", "700", "2026-02-10T10:00:00Z"),
            purchase("n1", "ann", "1800", "2026-03-01T10:00:00Z"),
        ],
    );
    // tom: 1200/6 = 200 VIP; 1900/6 = 316.66… platinum; January leaves on 1 Jul (700/6),
    // February on 1 Aug. ann: exactly 300 a month is VIP, not platinum.
    expect(
        &log,
        "tom",
        &[
            ("vip", "purchase", "2026-01-15"),
            ("platinum_vip", "purchase", "2026-02-10"),
            ("vip", "window_expiry", "2026-07-01"),
            ("ordinary", "window_expiry", "2026-08-01"),
        ],
    );
    expect(
        &log,
        "ann",
        &[
            ("vip", "purchase", "2026-03-01"),
            ("ordinary", "window_expiry", "2026-09-01"),
        ],
    );
}

/// Richer conditions (docs/rules.md §4): an `any` group of points OR segments (with a nested
/// `all` at lower bars), a qualifying spend that leaves gift cards out (`exclude`), and a
/// store-only window (`only`) — events carry `points` and `attributes`; bad ones are
/// dead-lettered with their reason and nothing else stops.
#[test]
fn points_or_segments_and_attribute_filters() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("status.toml");
    std::fs::write(
        &rules,
        r#"
version = "status-1"
[windows.year]
length = "12 months"
[windows.qualifying]
length = "12 months"
exclude = { category = ["gift_card"] }
[windows.store]
length = "30 days"
only = { channel = ["store"] }
[[tiers]]
name = "gold"
when = [{ any = ["window.year.points >= 50000", "window.year.count >= 30", { all = ["window.year.points >= 25000", "window.year.count >= 15"] }] }, "window.qualifying.sum >= 1000"]
[[tiers]]
name = "silver"
when = [{ any = ["window.year.points >= 25000", "window.store.count >= 3"] }]
[[tiers]]
name = "member"
"#,
    )
    .unwrap();
    let with = |mut v: serde_json::Value, extra: serde_json::Value| {
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let store = serde_json::json!({"attributes": {"channel": "store"}});
    let events = [
        with(
            purchase("a1", "ana", "2000", "2026-01-10T10:00:00Z"),
            serde_json::json!({"points": 60000, "attributes": {"category": "gift_card"}}),
        ),
        with(
            purchase("a2", "ana", "1000", "2026-01-20T10:00:00Z"),
            serde_json::json!({"attributes": {"category": "fuel", "channel": "web"}}),
        ),
        with(
            refund("a3", "ana", "2000", "2026-02-01T10:00:00Z"),
            serde_json::json!({"points": "40000", "attributes": {"category": "gift_card"}}),
        ),
        with(
            purchase("b1", "bo", "10", "2026-03-01T10:00:00Z"),
            store.clone(),
        ),
        with(
            purchase("b2", "bo", "10", "2026-03-02T10:00:00Z"),
            store.clone(),
        ),
        with(purchase("b3", "bo", "10", "2026-03-03T10:00:00Z"), store),
        with(
            purchase("x1", "cy", "10", "2026-03-04T10:00:00Z"),
            serde_json::json!({"attributes": {"category": 5}}),
        ),
        with(
            purchase("x2", "cy", "10", "2026-03-04T11:00:00Z"),
            serde_json::json!({"points": -3}),
        ),
        with(
            purchase("x3", "cy", "10", "2026-03-04T12:00:00Z"),
            serde_json::json!({"points": 1.5}),
        ),
    ];
    let (log, _, world) = replay_in(&rules, &events);
    for (customer, changes) in &log {
        eprintln!("{customer}: {changes:?}");
    }
    // ana: 60,000 points make her silver, not gold (the gift card is no qualifying spend);
    // 1,000 of fuel qualifies her; the refund takes 40,000 points back.
    expect(
        &log,
        "ana",
        &[
            ("silver", "purchase", "2026-01-10"),
            ("gold", "purchase", "2026-01-20"),
            ("member", "refund", "2026-02-01"),
        ],
    );
    // bo: three store purchases in 30 days; the first leaves the store window on 31 March.
    expect(
        &log,
        "bo",
        &[
            ("member", "purchase", "2026-03-01"),
            ("silver", "purchase", "2026-03-03"),
            ("member", "window_expiry", "2026-03-31"),
        ],
    );
    expect(&log, "cy", &[]);
    let dead: Vec<(String, String)> = world
        .read_all(&world.dlq)
        .iter()
        .map(|r| {
            (
                r.json()["event_id"].as_str().unwrap().to_owned(),
                r.headers["tierd.reason"].clone(),
            )
        })
        .collect();
    eprintln!("dead letters: {dead:?}");
    assert_eq!(
        dead,
        [
            ("x1".to_owned(), "invalid_attributes".to_owned()),
            ("x2".to_owned(), "points_out_of_range".to_owned()),
            ("x3".to_owned(), "invalid_points".to_owned()),
        ]
    );
    // The points and the series are stored in Redis (binary version 3) and read back.
    let ana = world.customer_state("ana").expect("ana is stored");
    assert_eq!((ana.points_earned, ana.points_refunded), (60_000, 40_000));
    assert_eq!(
        ana.series.len(),
        2,
        "year (points) and qualifying: {:?}",
        ana.series
    );
}

/// The bank preset with `time_zone = "Asia/Shanghai"`: the quarterly reviews fall at 00:00
/// Beijing time, 16:00 UTC the day before (with UTC, below, on the 1st at 00:00 UTC).
#[test]
fn a_program_time_zone_counts_quarters_from_local_midnight() {
    let dir = tempfile::tempdir().unwrap();
    let preset = dir.path().join("bank-shanghai.toml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/bank.toml"),
    )
    .unwrap();
    let version = text.lines().find(|l| l.starts_with("version = ")).unwrap();
    let text = text.replacen(
        version,
        "version = \"bank-shanghai-1\"\ntime_zone = \"Asia/Shanghai\"",
        1,
    );
    std::fs::write(&preset, text).unwrap();
    // `replay` joins the preset to config/rules: an absolute path stands for itself.
    let (log, _) = replay(
        preset.to_str().unwrap(),
        &[
            purchase("w1", "wang", "1200000", "2026-01-10T10:00:00Z"),
            refund("w2", "wang", "1150000", "2026-02-01T10:00:00Z"),
        ],
    );
    expect(
        &log,
        "wang",
        &[
            ("black_gold", "purchase", "2026-01-10"),
            ("platinum", "validity_expired", "2026-03-31"),
            ("gold", "validity_expired", "2026-06-30"),
        ],
    );
}

#[test]
fn bank_cards_step_down_one_level_per_quarterly_review() {
    let (log, _) = replay(
        "bank.toml",
        &[
            // In event mode a partition's clock is its latest event time, so the history
            // is given in time order.
            purchase("l1", "li", "30000", "2026-01-05T10:00:00Z"),
            purchase("w1", "wang", "1200000", "2026-01-10T10:00:00Z"),
            refund("w2", "wang", "1150000", "2026-02-01T10:00:00Z"),
            purchase("l2", "li", "180000", "2026-05-05T10:00:00Z"),
        ],
    );
    // wang keeps black-gold until the 1 Apr review (withdrawal or not), then steps down one
    // card per quarter to gold, where his 50,000 balance keeps him (renewed on 1 Oct).
    expect(
        &log,
        "wang",
        &[
            ("black_gold", "purchase", "2026-01-10"),
            ("platinum", "validity_expired", "2026-04-01"),
            ("gold", "validity_expired", "2026-07-01"),
        ],
    );
    // Upgrades are immediate.
    expect(
        &log,
        "li",
        &[
            ("silver", "purchase", "2026-01-05"),
            ("platinum", "purchase", "2026-05-05"),
        ],
    );
}

#[test]
fn rfm_segments_follow_recency_decay() {
    let events: Vec<serde_json::Value> = (1..=10)
        .map(|d| {
            purchase(
                &format!("a{d}"),
                "amy",
                "600",
                &format!("2026-01-{d:02}T10:00:00Z"),
            )
        })
        .collect();
    let (log, _) = replay("rfm-segments.toml", &events);
    // 1 Jan cell 512 promising; 5 Jan 534 loyal; 10 Jan 545 champion; R falls to 4 on
    // 18 Jan (445: still a champion), 3 on 10 Feb (loyal), 2 on 12 Mar (at risk), 1 on
    // 11 May (hibernating).
    expect(
        &log,
        "amy",
        &[
            ("promising", "purchase", "2026-01-01"),
            ("loyal", "purchase", "2026-01-05"),
            ("champions", "purchase", "2026-01-10"),
            ("loyal", "recency", "2026-02-10"),
            ("at_risk", "recency", "2026-03-12"),
            ("hibernating", "recency", "2026-05-11"),
        ],
    );
}

#[test]
fn airline_rfm_product_tiers() {
    let mut events = vec![
        purchase("z1", "zhao", "6000", "2026-01-05T10:00:00Z"),
        purchase("z2", "zhao", "6000", "2026-01-20T10:00:00Z"),
    ];
    for d in 21..=24 {
        events.push(purchase(
            &format!("z{d}"),
            "zhao",
            "6000",
            &format!("2026-01-{d}T10:00:00Z"),
        ));
    }
    let (log, _) = replay("airline.toml", &events);
    // R5 F1 M5 = 25 silver; F2 → 50 gold; 6 purchases F3 → 75 platinum; 30 days after the
    // last purchase R4 → 60 gold; R3 (day 90) and R2 (day 180) keep gold (45, 30).
    expect(
        &log,
        "zhao",
        &[
            ("silver", "purchase", "2026-01-05"),
            ("gold", "purchase", "2026-01-20"),
            ("platinum", "purchase", "2026-01-24"),
            ("gold", "recency", "2026-02-23"),
        ],
    );
}

#[test]
fn travel_membership_valid_60_days_with_at_risk_notices() {
    let (log, notices) = replay(
        "travel.toml",
        &[
            purchase("s1", "sun", "1200", "2025-03-01T10:00:00Z"),
            purchase("s2", "sun", "4000", "2025-03-15T10:00:00Z"),
        ],
    );
    // Gold from 15 Mar 2025, renewed every 60 days while the 365-day spend holds 5200; on
    // the 10 Mar 2026 review the 1 Mar 2025 purchase has left the window: silver. Silver's
    // review on 9 May 2026 finds nothing left: member.
    expect(
        &log,
        "sun",
        &[
            ("silver", "purchase", "2025-03-01"),
            ("gold", "purchase", "2025-03-15"),
            ("silver", "validity_expired", "2026-03-10"),
            ("member", "validity_expired", "2026-05-09"),
        ],
    );
    let got: Vec<(String, String, String, String, String)> = notices
        .iter()
        .map(|n| {
            (
                n["tier"].as_str().unwrap().to_owned(),
                n["falls_to"].as_str().unwrap().to_owned(),
                n["downgrade_at"].as_str().unwrap()[..10].to_owned(),
                n["occurred_at"].as_str().unwrap()[..10].to_owned(),
                n["to_stay"][0]["missing"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let s = |v: &str| v.to_owned();
    assert_eq!(
        got,
        [
            (
                s("gold"),
                s("silver"),
                s("2026-03-10"),
                s("2026-03-03"),
                s("1000.00")
            ),
            (
                s("silver"),
                s("member"),
                s("2026-05-09"),
                s("2026-05-02"),
                s("1000.00")
            ),
        ]
    );
}
