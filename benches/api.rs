//! API latency under ingestion (issue 12): `GET /v1/customers/{id}` at a fixed rate, open
//! loop (each lookup starts at its scheduled moment whether or not earlier ones answered, and
//! its latency runs from that moment), while tierd ingests purchases at a fixed rate.
//!
//! `cargo bench --bench api` (env: BENCH_API_RATE lookups/s, default 10000; BENCH_SECS,
//! default 20; BENCH_INGEST_RATE purchases/s during the lookups, default 20000;
//! BENCH_CUSTOMERS, default 100000 — all of them stored before the lookups start;
//! BENCH_WARMUP_SECS of ingestion before the lookups, default 60 (none without ingestion);
//! BENCH_API_PATH, to request that one path instead, e.g. `/healthz` for the floor of HTTP
//! on the machine without Redis; BENCH_TIERD_TOML, extra tierd configuration). Starts its
//! own redis-server, Apache Kafka broker and tierd, like the tests.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use common::{
    env_or, http_load, ms, print_percentiles, process_cpu, processes_cpu, produce, redis_cpu,
};
use std::time::{Duration, Instant};
use support::{Tierd, World};

fn applied(world: &World, partitions: i32) -> i64 {
    (0..partitions)
        .map(|p| world.partition_meta(p).1.max(0))
        .sum()
}

/// This process's CPU time (the load generator's thread is most of it while it runs).
fn own_cpu() -> f64 {
    process_cpu(&std::process::id().to_string())
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --all-targets` / nextest probing the bench: nothing to list.
    }
    let rate = env_or("BENCH_API_RATE", 10_000).max(1);
    let secs = env_or("BENCH_SECS", 20).max(1);
    let ingest_rate = env_or("BENCH_INGEST_RATE", 20_000);
    let customers = env_or("BENCH_CUSTOMERS", 100_000).max(1);
    let partitions = 4;
    let world = World::start(partitions);
    let extra = std::env::var("BENCH_TIERD_TOML")
        .unwrap_or_default()
        .replace("\\n", "\n");
    let tierd = Tierd::spawn(&world, &extra);
    tierd.wait_partitions(i64::from(partitions), Duration::from_secs(120));

    // Every customer stored first (3 purchases each on average).
    let preload = 3 * customers;
    eprintln!("storing {customers} customers ({preload} purchases)…");
    assert!(
        produce(&world.broker.addr, &world.input, preload, customers, 0, 1)
            .wait()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    while applied(&world, partitions) < preload as i64 {
        assert!(Instant::now() < deadline, "the preload was not applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Ingestion at a fixed rate for the warm-up and the whole measured window. The broker is
    // a fresh JVM: its JIT compiler takes about half a core for its first ~30 s of load, so
    // the lookups start after a warm-up of ingestion (see benches/latency.rs).
    let warmup = if ingest_rate > 0 {
        env_or("BENCH_WARMUP_SECS", 60)
    } else {
        0
    };
    let mut ingest = (ingest_rate > 0).then(|| {
        produce(
            &world.broker.addr,
            &world.input,
            ingest_rate * (warmup + secs + 2),
            customers,
            ingest_rate,
            2,
        )
    });
    if warmup > 0 {
        eprintln!("warming up: ingesting {ingest_rate} purchases/s for {warmup} s…");
    }
    std::thread::sleep(Duration::from_secs(warmup.max(1)));
    let before = applied(&world, partitions);

    eprintln!("{rate} lookups/s for {secs} s while ingesting {ingest_rate} purchases/s…");
    let api: std::net::SocketAddr = tierd
        .api
        .trim_start_matches("http://")
        .parse()
        .expect("the API's address");
    let tierd_pid = tierd.pid().expect("tierd runs").to_string();
    let cpu_before = (
        process_cpu(&tierd_pid),
        redis_cpu(&mut world.redis.conn()),
        own_cpu(),
        processes_cpu("java"),
    );
    let total = (rate * secs) as usize;
    let started = Instant::now();
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let fixed_path = std::env::var("BENCH_API_PATH").ok();
    let load = http_load::open_loop(api, rate, total, Duration::from_secs(30), |_| {
        if let Some(path) = &fixed_path {
            return path.clone();
        }
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        let customer = rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % customers;
        format!("/v1/customers/cust-{customer:06}")
    });
    let (results, behind) = (load.results, load.behind);
    let elapsed = started.elapsed();
    let cpu = (
        process_cpu(&tierd_pid) - cpu_before.0,
        redis_cpu(&mut world.redis.conn()) - cpu_before.1,
        own_cpu() - cpu_before.2,
        processes_cpu("java") - cpu_before.3,
    );
    let ingested = applied(&world, partitions) - before;
    if let Some(child) = ingest.as_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut latencies: Vec<Duration> = results.iter().map(|(d, _)| *d).collect();
    latencies.sort();
    let count = |f: &dyn Fn(u16) -> bool| results.iter().filter(|(_, s)| f(*s)).count();
    let (ok, not_found, none) = (
        count(&|s| s == 200),
        count(&|s| s == 404),
        count(&|s| s == 0),
    );

    println!("## tierd API latency under ingestion (open loop)");
    println!();
    println!(
        "- scenario: GET /v1/customers/{{id}} at {rate}/s for {secs} s over {customers} stored customers, while purchases are produced at {ingest_rate}/s; broker {}, Redis 7 on loopback",
        support::broker_description()
    );
    println!(
        "- {} lookups: {ok} answered 200, {not_found} 404 (a customer without purchases: the ids are drawn from all {customers}), {none} no answer, {} another status; the scheduler was at most {} behind; tierd applied {ingested} purchases meanwhile ({:.0}/s)",
        results.len(),
        results.len() - ok - not_found - none,
        ms(behind),
        ingested as f64 / elapsed.as_secs_f64()
    );
    let per = |seconds: f64| seconds * 1e6 / results.len().max(1) as f64;
    println!(
        "- CPU while looking up ({:.1} s): tierd {:.1} s, Redis {:.1} s, the broker (java) {:.1} s, the load generator {:.1} s ({} connections); with no ingestion that is {:.0} µs of tierd and {:.0} µs of Redis per lookup",
        elapsed.as_secs_f64(),
        cpu.0,
        cpu.1,
        cpu.3,
        cpu.2,
        load.connections,
        per(cpu.0),
        per(cpu.1)
    );
    println!();
    print_percentiles("lookup scheduled → answer read", &latencies);
}
