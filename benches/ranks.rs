//! Rank cut-off cost as the population grows (default 10k → 100k → 1M customers, 4
//! partitions, the pyramid preset). For each size: customer states and rank sorted sets are
//! written straight into Redis (each state built by the real engine from one purchase),
//! tierd places everyone (first cut-offs), then 1% newcomers with random values arrive
//! through Kafka. Reported for that perturbation: cut-off recompute time, customers
//! re-evaluated, and customers that actually changed tier (`rank_shift`) — the re-evaluation
//! must track the crossers, not N.
//!
//! `cargo bench --bench ranks` (env: BENCH_RANK_SIZES=10000,100000,1000000 BENCH_PARTITIONS=4).

#[path = "../tests/support/mod.rs"]
mod support;

use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};
use support::{purchase, Tierd, World};
use tierd::engine::rules::rank::Cutoffs;
use tierd::engine::rules::Rules;
use tierd::model::state::{CustomerState, DedupPolicy};
use tierd::model::{Event, EventKind};
use tierd::store::keys::Keyspace;

fn metric_sum(tierd: &Tierd, name: &str, label: Option<&str>) -> f64 {
    let text = tierd.get("/metrics").1;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter(|l| label.is_none_or(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn settled(world: &World, population: u64) -> Option<u64> {
    let mut conn = world.redis.conn();
    let key = world.keys(0).cutoffs;
    let (version, data): (Option<u64>, Option<String>) = redis::cmd("HMGET")
        .arg(key)
        .arg("version")
        .arg("data")
        .query(&mut conn)
        .ok()?;
    let c: Cutoffs = serde_json::from_str(&data?).ok()?;
    if c.population.first() != Some(&population) {
        return None;
    }
    let version = version?;
    (0..world.partitions)
        .all(|p| {
            let meta = world.keys(p).meta;
            let json: Option<String> = redis::cmd("HGET")
                .arg(meta)
                .arg("cutoffs")
                .query(&mut conn)
                .unwrap_or(None);
            json.and_then(|j| serde_json::from_str::<Cutoffs>(&j).ok())
                .is_some_and(|c| c.version == version)
        })
        .then_some(version)
}

fn wait_settled(world: &World, population: u64) {
    let deadline = Instant::now() + Duration::from_secs(900);
    while settled(world, population).is_none() {
        assert!(Instant::now() < deadline, "did not settle");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let sizes: Vec<u64> = std::env::var("BENCH_RANK_SIZES")
        .unwrap_or_else(|_| "10000,100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let partitions = std::env::var("BENCH_PARTITIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    println!("## tierd rank cut-off bench (pyramid 1/19/30/50 %, {partitions} partitions)");
    println!("- broker: {}", support::broker_description());
    println!();
    println!("| customers | newcomers | recomputes | recompute time (mean) | re-evaluated | changed tier (rank_shift) | initial placement pass |");
    println!("|---|---|---|---|---|---|---|");
    for n in sizes {
        let mut world = World::start(partitions);
        world.rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/pyramid.toml");
        let rules = Rules::load(&world.rules, 2).unwrap();
        let keyspace = Keyspace::new(&world.prefix, &world.group, &world.input);
        let mut rng = rand::rngs::StdRng::seed_from_u64(n);
        let t0 = tierd::model::time::parse_rfc3339_ms("2026-11-01T10:00:00Z").unwrap();
        let mut conn = world.redis.conn();
        let mut pipe = redis::pipe();
        for i in 0..n {
            let p = (i % partitions as u64) as i32;
            let keys = keyspace.partition(p);
            let id = format!("customer-{i:08}");
            let mut s = CustomerState::default();
            let e = Event {
                event_id: format!("order-{i}"),
                customer_id: id.clone(),
                kind: EventKind::Purchase,
                amount_minor: rng.random_range(1..100_000_000),
                occurred_at_ms: t0,
                pin: None,
                points: 0,
                attributes: Vec::new(),
            };
            s.apply(
                &e,
                &rules,
                DedupPolicy {
                    horizon_ms: 86_400_000,
                    max_ids: 8,
                },
                t0,
                &Cutoffs::default(),
            );
            pipe.set(keys.customer(&id), tierd::model::stored::to_vec(&s))
                .ignore();
            pipe.zadd(
                keys.rank("value"),
                &id,
                s.ranked_values[0].unwrap().to_string(),
            )
            .ignore();
            pipe.hincr(&keys.tier_counts, s.tier.clone().unwrap(), 1)
                .ignore();
            if i % 20_000 == 19_999 {
                pipe.query::<()>(&mut conn).unwrap();
                pipe = redis::pipe();
            }
        }
        pipe.query::<()>(&mut conn).unwrap();
        world.rules_extra = "sweep_per_second = 1000000".into();
        let tierd = Tierd::spawn(&world, "[ranks]\nrecompute_interval_ms = 1000\ncheck_interval_ms = 100\nreevaluate_page = 1000\n[ingest]\ncache_customers_per_partition = 300000\ncache_bytes = 1073741824\n");
        tierd.wait_partitions(i64::from(partitions), Duration::from_secs(60));
        let start = Instant::now();
        wait_settled(&world, n);
        let initial = start.elapsed().as_secs_f64();
        let (re0, moved0) = (
            metric_sum(&tierd, "tierd_rank_reevaluated_total", None),
            metric_sum(
                &tierd,
                "tierd_tier_changes_total",
                Some("reason=\"rank_shift\""),
            ),
        );
        let (sum0, count0) = (
            metric_sum(&tierd, "tierd_rank_recompute_seconds_sum", None),
            metric_sum(&tierd, "tierd_rank_recompute_seconds_count", None),
        );
        let newcomers = (n / 100).max(1);
        let events: Vec<serde_json::Value> = (0..newcomers)
            .map(|i| {
                let units = rng.random_range(1..1_000_000);
                purchase(
                    &format!("new-{i}"),
                    &format!("newcomer-{i}"),
                    &units.to_string(),
                    "2026-11-02T10:00:00Z",
                )
            })
            .collect();
        let ends = world.produce_json(&events);
        world.wait_applied(&ends, Duration::from_secs(600));
        wait_settled(&world, n + newcomers);
        let reevaluated = metric_sum(&tierd, "tierd_rank_reevaluated_total", None) - re0;
        let moved = metric_sum(
            &tierd,
            "tierd_tier_changes_total",
            Some("reason=\"rank_shift\""),
        ) - moved0;
        let recomputes = metric_sum(&tierd, "tierd_rank_recompute_seconds_count", None) - count0;
        let secs = metric_sum(&tierd, "tierd_rank_recompute_seconds_sum", None) - sum0;
        println!(
            "| {n} | {newcomers} | {recomputes} | {:.1} ms | {reevaluated} | {moved} | {initial:.1} s |",
            secs * 1000.0 / recomputes.max(1.0)
        );
        if std::env::var("BENCH_RANK_DETAIL").is_ok() {
            for l in
                tierd.get("/metrics").1.lines().filter(|l| {
                    l.starts_with("tierd_tier_changes_total") && l.contains("rank_shift")
                })
            {
                eprintln!("{l}");
            }
            for l in tierd
                .log_text()
                .lines()
                .filter(|l| l.contains("Rank cut-offs"))
            {
                eprintln!("{l}");
            }
        }
        drop(tierd);
    }
}
