//! Every rank-based preset replayed through the real pipeline on a small population, each
//! customer's settled tier compared with a reference computed here by full sorts (ties to the
//! higher band): ABC, the pyramid's two other namings, RFM quintiles (125 cells → segments)
//! and the R×F×M retain / develop / avoid ranking.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};
use support::{purchase, Tierd, World};
use tierd::engine::rules::rank::Cutoffs;
use tierd::model::time;

const N: i64 = 40;

/// (last purchase ms, purchase count, amount per purchase in units) of customer i.
fn customer(i: i64) -> (i64, i64, i64) {
    let base = time::parse_rfc3339_ms("2026-09-01T00:00:00Z").unwrap();
    (
        base + (i * 13 % 40) * 86_400_000 + i * 1000,
        1 + i * 7 % 5,
        i * 37 % 100 + 1,
    )
}

fn events() -> Vec<serde_json::Value> {
    let mut all: Vec<(i64, serde_json::Value)> = Vec::new();
    for i in 0..N {
        let (last, count, amount) = customer(i);
        for j in 0..count {
            let at = last - j * 3_600_000;
            all.push((
                at,
                purchase(
                    &format!("e{i}-{j}"),
                    &format!("c{i}"),
                    &amount.to_string(),
                    &time::format_ms(at),
                ),
            ));
        }
    }
    all.sort_by_key(|(at, _)| *at);
    all.into_iter().map(|(_, e)| e).collect()
}

/// Whether `v` is in the top `pct` of `all` (ties to the higher band).
fn in_top(all: &[i64], v: i64, pct: f64) -> bool {
    let mut sorted = all.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let k = ((pct * sorted.len() as f64 - 1e-9).ceil() as usize).max(1);
    v >= sorted[k - 1]
}

fn quintile(all: &[i64], v: i64) -> i64 {
    [0.2, 0.4, 0.6, 0.8]
        .iter()
        .position(|&p| in_top(all, v, p))
        .map_or(1, |i| 5 - i as i64)
}

fn settled_tiers(preset: &str) -> Vec<String> {
    let mut world = World::start(2);
    world.rules = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/rules")
        .join(preset);
    let tierd = Tierd::spawn(&world, "[ranks]\nrecompute_interval_ms = 200\ncheck_interval_ms = 50\n[clock]\nmode = \"event\"\nlateness_s = 0\n");
    tierd.wait_partitions(2, Duration::from_secs(60));
    let ends = world.produce_json(&events());
    world.wait_applied(&ends, Duration::from_secs(60));
    // Settled: the published cut-offs stop changing and every partition applied them.
    let key = world.keys(0).cutoffs;
    let meta = |p: i32| world.keys(p).meta;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = (0u64, Instant::now());
    loop {
        let mut conn = world.redis.conn();
        let version: Option<u64> = redis::cmd("HGET")
            .arg(&key)
            .arg("version")
            .query(&mut conn)
            .unwrap();
        let version = version.unwrap_or(0);
        let applied = (0..2).all(|p| {
            let json: Option<String> = redis::cmd("HGET")
                .arg(meta(p))
                .arg("cutoffs")
                .query(&mut conn)
                .unwrap();
            json.and_then(|j| serde_json::from_str::<Cutoffs>(&j).ok())
                .is_some_and(|c| c.version == version)
        });
        if version != last.0 {
            last = (version, Instant::now());
        } else if version > 0 && applied && last.1.elapsed() > Duration::from_millis(1500) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cut-offs did not settle:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (0..N)
        .map(|i| {
            world
                .customer_state(&format!("c{i}"))
                .unwrap()
                .tier
                .unwrap()
        })
        .collect()
}

fn sums() -> Vec<i64> {
    (0..N).map(|i| customer(i).1 * customer(i).2).collect()
}

#[test]
fn abc_and_the_pyramid_namings() {
    let sums = sums();
    let abc = settled_tiers("abc.toml");
    for i in 0..N as usize {
        let want = if in_top(&sums, sums[i], 0.2) {
            "A"
        } else if in_top(&sums, sums[i], 0.9) {
            "B"
        } else {
            "C"
        };
        assert_eq!(abc[i], want, "abc c{i}");
    }
    for (preset, names) in [
        ("pyramid-metals.toml", ["platinum", "gold", "iron", "lead"]),
        ("pyramid-gems.toml", ["diamond", "gold", "brass", "lead"]),
    ] {
        let got = settled_tiers(preset);
        for i in 0..N as usize {
            let band = [0.01, 0.2, 0.5]
                .iter()
                .position(|&p| in_top(&sums, sums[i], p))
                .unwrap_or(3);
            assert_eq!(got[i], names[band], "{preset} c{i}");
        }
    }
}

#[test]
fn rfm_quintile_cells_and_the_product_ranking() {
    let lasts: Vec<i64> = (0..N).map(|i| customer(i).0).collect();
    let counts: Vec<i64> = (0..N).map(|i| customer(i).1).collect();
    let sums = sums();
    let scores: Vec<(i64, i64, i64)> = (0..N as usize)
        .map(|i| {
            (
                quintile(&lasts, lasts[i]),
                quintile(&counts, counts[i]),
                quintile(&sums, sums[i]),
            )
        })
        .collect();
    let segment = |(r, f, m): (i64, i64, i64)| {
        // Cell patterns 55?, 54?, 45?, 44? with M >= 4.
        if (r == 5 || r == 4) && (f == 5 || f == 4) && m >= 4 {
            "champions"
        } else if r >= 3 && f >= 3 {
            "loyal"
        } else if r >= 4 {
            "promising"
        } else if r == 2 {
            "at_risk"
        } else if r == 1 && f >= 2 {
            "hibernating"
        } else {
            "lost"
        }
    };
    let got = settled_tiers("rfm-quintiles.toml");
    for i in 0..N as usize {
        assert_eq!(
            got[i],
            segment(scores[i]),
            "rfm-quintiles c{i} scores {:?}",
            scores[i]
        );
    }
    let products: Vec<i64> = scores.iter().map(|(r, f, m)| r * f * m).collect();
    let got = settled_tiers("rfm-product.toml");
    for i in 0..N as usize {
        let want = if in_top(&products, products[i], 0.2) {
            "retain"
        } else if in_top(&products, products[i], 0.8) {
            "develop"
        } else {
            "avoid"
        };
        assert_eq!(got[i], want, "rfm-product c{i} product {}", products[i]);
    }
}
