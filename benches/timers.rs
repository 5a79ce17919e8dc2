//! Timer firing cost at scale: N customers (default 1,000,000) over P partitions whose
//! recency decays on the same days — the worst case for a timer index, a whole cohort due at
//! once. The states and timer index are written straight into Redis (each state built by the
//! real engine from one purchase), then one event per partition moves event time 32 days
//! ahead and tierd fires every due timer: two per customer (recency score 5→4 on day 8, no
//! change; 4→3 on day 31, a downgrade) — 2N evaluations, N tier changes.
//!
//! `cargo bench --bench timers` (env: BENCH_TIMER_CUSTOMERS=1000000 BENCH_PARTITIONS=4).
//! Prints the firing time, timers/s, tierd and Redis CPU, and the publish drain time.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use common::env_or;
use rdkafka::producer::{FutureRecord, Producer};
use std::path::Path;
use std::time::{Duration, Instant};
use support::{Tierd, World};
use tierd::engine::rules::Rules;
use tierd::model::state::{CustomerState, DedupPolicy};
use tierd::model::time::{format_ms, parse_rfc3339_ms};
use tierd::model::{Event, EventKind};
use tierd::store::keys::Keyspace;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn redis_pid(world: &World) -> u32 {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut world.redis.conn())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let customers = env_or("BENCH_TIMER_CUSTOMERS", 1_000_000);
    let partitions = env_or("BENCH_PARTITIONS", 4) as i32;
    let mut world = World::start(partitions);
    world.rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/rfm-segments.toml");
    let rules = Rules::load(&world.rules, 2).unwrap();
    let keyspace = Keyspace::new(&world.prefix, &world.group, &world.input);
    let t0 = parse_rfc3339_ms("2026-01-01T10:00:00Z").unwrap();
    let dedup = DedupPolicy {
        horizon_ms: 7 * 86_400_000,
        max_ids: 64,
    };

    eprintln!("writing {customers} customer states and timers into {partitions} partitions…");
    let started = Instant::now();
    let mut conn = world.redis.conn();
    let mut pipe = redis::pipe();
    let mut template = CustomerState::default();
    let event = Event {
        event_id: "order-0000000001".into(),
        customer_id: "x".into(),
        kind: EventKind::Purchase,
        amount_minor: 60_000,
        occurred_at_ms: t0,
        pin: None,
        points: 0,
        attributes: Vec::new(),
    };
    template.apply(&event, &rules, dedup, t0, &Default::default());
    let json = tierd::model::stored::to_vec(&template);
    let (due, _) = template.timer.expect("recency timer");
    for i in 0..customers {
        let p = (i % partitions as u64) as i32;
        let keys = keyspace.partition(p);
        let id = format!("customer-{i:08}");
        pipe.set(keys.customer(&id), &json).ignore();
        pipe.zadd(&keys.timers, &id, due).ignore();
        if i % 20_000 == 19_999 {
            pipe.query::<()>(&mut conn).unwrap();
            pipe = redis::pipe();
        }
    }
    pipe.query::<()>(&mut conn).unwrap();
    eprintln!(
        "written in {:.1} s (tier {:?}, first timer {})",
        started.elapsed().as_secs_f64(),
        template.tier,
        format_ms(due)
    );

    world.rules_extra = "sweep_per_second = 1000000".into();
    let tierd = Tierd::spawn(&world, "[clock]\nmode = \"event\"\nlateness_s = 0\n[ingest]\ncache_customers_per_partition = 100000\ncache_bytes = 1073741824\n");
    tierd.wait_partitions(i64::from(partitions), Duration::from_secs(60));
    // The rules sweep reads every customer once after start (they were written without a
    // rules version): wait for it, so the firing below is measured alone.
    let sweep = Instant::now();
    while tierd.metric("tierd_rules_sweep_partitions_done") < f64::from(partitions) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "startup sweep over {customers} customers: {:.1} s",
        sweep.elapsed().as_secs_f64()
    );
    let pid = tierd.pid().unwrap();
    let rpid = redis_pid(&world);
    let (cpu0, rcpu0) = (cpu_seconds(pid), cpu_seconds(rpid));

    let producer = world.producer();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let clock = format_ms(t0 + 32 * 86_400_000);
    let fire_start = Instant::now();
    rt.block_on(async {
        for p in 0..partitions {
            let key = format!("~clock{p}");
            let value = serde_json::json!({"event_id": key, "customer_id": key, "amount": "0", "occurred_at": clock}).to_string();
            producer
                .send(FutureRecord::to(&world.input).partition(p).key(&key).payload(&value), Duration::from_secs(10))
                .await
                .unwrap();
        }
    });
    producer.flush(Duration::from_secs(10)).unwrap();
    let expected = 2.0 * customers as f64;
    loop {
        let fired = tierd.metric("tierd_timers_fired_total");
        if fired >= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let fire_secs = fire_start.elapsed().as_secs_f64();
    let (cpu1, rcpu1) = (cpu_seconds(pid), cpu_seconds(rpid));
    let changes = tierd.metric("tierd_tier_changes_total");
    let drain_start = Instant::now();
    while (0..partitions).any(|p| world.outbox_len(p) > 0) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    println!("## tierd timer firing bench");
    println!();
    println!("- scenario: {customers} customers over {partitions} partitions, rules rfm-segments, all due on the same two days; event clock moved 32 days by one event per partition");
    println!("- broker: {}", support::broker_description());
    println!("- timers fired: {expected} ({customers} recency 5→4 without change, {customers} recency 4→3 with a downgrade)");
    println!("- tier changes committed: {changes}");
    println!("- firing time (clock event produced → every timer fired and committed): {fire_secs:.1} s = {:.0} timers/s", expected / fire_secs);
    println!(
        "- CPU while firing: tierd {:.1} s ({:.1} µs/timer), redis-server {:.1} s ({:.1} µs/timer)",
        cpu1 - cpu0,
        (cpu1 - cpu0) * 1e6 / expected,
        rcpu1 - rcpu0,
        (rcpu1 - rcpu0) * 1e6 / expected
    );
    println!(
        "- outbox drain after firing (publishing the changes to the broker): {drain_secs:.1} s more"
    );
}
