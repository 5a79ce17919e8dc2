//! Operator tools: `tierd rules check` on every preset and on broken files; `tierd rules
//! explain` and `tierd simulate` against a live state, which they must not change.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;
use support::{purchase, Tierd, World};

fn tierd(args: &[&str]) -> (i32, String, String) {
    support::tierd_cli(args)
}

#[test]
fn rules_check_accepts_the_presets_and_names_file_line_and_field() {
    for preset in [
        "b2b",
        "b2b-lifetime",
        "telecom",
        "bank",
        "rfm-segments",
        "airline",
        "travel",
    ] {
        let path = format!("config/rules/{preset}.toml");
        let (code, out, err) = tierd(&["rules", "check", &path]);
        assert_eq!(code, 0, "{path}: {err}");
        assert!(out.starts_with(&format!("ok: {path} version ")), "{out}");
    }
    let mut bad = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    bad.write_all(
        br#"version = "bad-1"
[windows.w]
length = "10 days"
bucket = "month"
[scores.R]
metric = "recency_days"
bins = [{ score = 5, max = 30 }, { score = 4, max = 7 }, { score = 1 }]
[[tiers]]
name = "gold"
when = ["sum >= 100", "mood > 3"]
[[tiers]]
name = "silver"
when = ["sum >= 200"]
[[tiers]]
name = "basic"
"#,
    )
    .unwrap();
    let file = bad.path().display().to_string();
    let (code, out, err) = tierd(&["rules", "check", &file]);
    assert_eq!(code, 1, "{out}");
    for expected in [
        format!("{file}:2: field `windows.w`"),
        format!("{file}:7: field `scores.R.bins[1]`: overlaps the bin before it"),
        format!("{file}:10: field `tiers[0].when[1]`: unknown metric \"mood\""),
        format!(
            "{file}:11: field `tiers[1].when`: every customer it takes is taken first by tiers[0]"
        ),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
    let (code, _, err) = tierd(&["rules", "check", "config/rules/nope.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("nope.toml"), "{err}");
}

/// A row of the printed transition matrix, whitespace-normalised.
fn matrix_row(out: &str, name: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no row {name}:\n{out}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn snapshot(world: &World) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut conn = world.redis.conn();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    keys.into_iter()
        .map(|k| {
            let v: Vec<u8> = redis::cmd("DUMP").arg(&k).query(&mut conn).unwrap();
            (k, v)
        })
        .collect()
}

#[test]
fn explain_and_simulate_read_the_live_state_without_changing_it() {
    let world = World::start(2);
    let mut service = Tierd::spawn(&world, "[clock]\nmode = \"event\"\nlateness_s = 0\n");
    service.wait_partitions(2, Duration::from_secs(60));
    // 100 customers with 10,000 × i units: D below 200k, C to 500k, B to 1M, A from 1M.
    let events: Vec<serde_json::Value> = (1..=100)
        .map(|i| {
            purchase(
                &format!("e{i}"),
                &format!("c{i}"),
                &(i * 10_000).to_string(),
                "2026-11-01T10:00:00Z",
            )
        })
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));
    assert_eq!(service.terminate(), Some(0));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tierd.toml");
    std::fs::write(
        &config,
        world.config(support::free_port(), "[clock]\nmode = \"event\"\n"),
    )
    .unwrap();
    let config = config.display().to_string();
    let before = snapshot(&world);

    let (code, out, err) = tierd(&["rules", "explain", "c42", "--config", &config]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tier"], "C");
    assert_eq!(v["values"]["sum"], "420000.00");
    assert_eq!(v["placed_by"], "tiers[2] C: sum >= 200000.00");
    assert_eq!(v["to_reach"]["tier"], "B");
    assert_eq!(v["to_reach"]["missing"][0]["missing"], "80000.00");
    assert!(v["partition"].as_i64().is_some());
    let (code, _, err) = tierd(&["rules", "explain", "nobody", "--config", &config]);
    assert_eq!(code, 1);
    assert!(err.contains("no customer \"nobody\""), "{err}");

    // New bounds: A ≥ 800k, B ≥ 300k, C ≥ 100k.
    let mut new = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    new.write_all(
        br#"version = "v2"
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
"#,
    )
    .unwrap();
    let (code, out, err) = tierd(&[
        "simulate",
        "--rules",
        &new.path().display().to_string(),
        "--config",
        &config,
        "--sample",
        "5",
    ]);
    assert_eq!(code, 0, "{err}");
    // Now: D 1-19 (19), C 20-49 (30), B 50-99 (50), A 100 (1).
    // New: D 1-9, C 10-29, B 30-79, A 80-100.
    let row = |name: &str| matrix_row(&out, name);
    assert_eq!(
        row("A "),
        "A 1 (100.0%) 0 (0.0%) 0 (0.0%) 0 (0.0%) 1",
        "{out}"
    );
    assert_eq!(
        row("B "),
        "B 20 (40.0%) 30 (60.0%) 0 (0.0%) 0 (0.0%) 50",
        "{out}"
    );
    assert_eq!(
        row("C "),
        "C 0 (0.0%) 20 (66.7%) 10 (33.3%) 0 (0.0%) 30",
        "{out}"
    );
    assert_eq!(
        row("D "),
        "D 0 (0.0%) 0 (0.0%) 10 (52.6%) 9 (47.4%) 19",
        "{out}"
    );
    assert!(
        out.contains("100 customers, 50 would move (50.00%)"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with("  c")).count(),
        5,
        "sample of 5 movers:\n{out}"
    );
    // Rank-based rules: the pyramid's cut-offs over the stored population (1 / 19 / 30 / 50 %
    // of the 100 by sum).
    let pyramid = format!("{}/config/rules/pyramid.toml", env!("CARGO_MANIFEST_DIR"));
    let (code, out, err) = tierd(&["simulate", "--rules", &pyramid, "--config", &config]);
    assert_eq!(code, 0, "{err}");
    // Now A is c100, B c50-c99, C c20-c49, D c1-c19; the pyramid: vip c100, key c81-c99,
    // ordinary c51-c80, small c1-c50.
    assert_eq!(
        matrix_row(&out, "A "),
        "A 1 (100.0%) 0 (0.0%) 0 (0.0%) 0 (0.0%) 1",
        "{out}"
    );
    assert_eq!(
        matrix_row(&out, "B "),
        "B 0 (0.0%) 19 (38.0%) 30 (60.0%) 1 (2.0%) 50",
        "{out}"
    );
    assert_eq!(
        matrix_row(&out, "C "),
        "C 0 (0.0%) 0 (0.0%) 0 (0.0%) 30 (100.0%) 30",
        "{out}"
    );
    // Rules that read 24 monthly buckets the running rules never kept: a warning.
    let airline = format!("{}/config/rules/airline.toml", env!("CARGO_MANIFEST_DIR"));
    let (code, out, err) = tierd(&["simulate", "--rules", &airline, "--config", &config]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: the new rules read 24 month buckets; stored customers keep 0 (under b2b-lifetime-1)"),
        "{out}\n{err}"
    );
    assert_eq!(
        snapshot(&world),
        before,
        "tools must not change the stored state"
    );
}
