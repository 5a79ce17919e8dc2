//! Open-loop latency bench (issue 12): purchases are produced at a fixed rate, each at its
//! scheduled moment whether or not tierd keeps up (so a stall shows in the figures instead of
//! slowing the producer down: no coordinated omission). For every tier change on the output
//! topic, a `read_committed` consumer (what the output contract asks of consumers) takes the
//! time from its purchase's *scheduled* send to the change's arrival. Prints p50 / p99 /
//! p99.9 / max.
//!
//! `cargo bench --bench latency` (env: BENCH_RATE events/s, default 40000 — about half of
//! tierd's measured maximum on the development machine, see docs/performance.md;
//! BENCH_SECS measured, default 20, after BENCH_WARMUP_SECS, default 60, at the same rate
//! and left out of the figures (most purchases of the first seconds are customers' first,
//! each with an `initial` change, and the caches are cold; above all the broker is a fresh
//! JVM: its JIT compiler took half a core for the first ~30 s, and with a 10 s warm-up the
//! broker's CPU over the measured 20 s was 19–22 s instead of ~11 s, its p99 twice as long);
//! BENCH_CUSTOMERS, default 100000;
//! BENCH_PARTITIONS, default 4; BENCH_MAX_AMOUNT, default 100000 CNY;
//! BENCH_PRODUCER_LINGER_MS, default 5; BENCH_TIERD_TOML, extra tierd configuration). Starts its own redis-server, Apache Kafka
//! broker and tierd, like the tests.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use common::{
    env_or, machine_cpu, ms, percentile, print_percentiles, process_cpu, processes_cpu, Rng,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Tierd, World};

/// Reads the output topic until `stop` is set and nothing more arrives; returns each tier
/// change's arrival time with the index of the purchase that caused it (`L<index>`).
fn read_changes(
    brokers: String,
    topic: String,
    partitions: i32,
    stop: Arc<AtomicBool>,
) -> Vec<(Instant, u64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", support::unique("latency"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set(
            "fetch.min.bytes",
            std::env::var("BENCH_READER_MIN_BYTES").unwrap_or_else(|_| "1".into()),
        )
        .set(
            "fetch.wait.max.ms",
            std::env::var("BENCH_READER_WAIT_MS").unwrap_or_else(|_| "500".into()),
        )
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen = Vec::new();
    let mut quiet_since: Option<Instant> = None;
    loop {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                let at = Instant::now();
                quiet_since = None;
                let Some(payload) = m.payload() else { continue };
                let Ok(change) = serde_json::from_slice::<serde_json::Value>(payload) else {
                    continue;
                };
                let index = change["cause"]["event_id"]
                    .as_str()
                    .and_then(|id| id.strip_prefix('L'))
                    .and_then(|i| i.parse().ok());
                if let Some(index) = index {
                    seen.push((at, index));
                }
            }
            _ if stop.load(Ordering::Relaxed) => {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(3) {
                    return seen;
                }
            }
            _ => {}
        }
    }
}

/// A plain HTTP/1.0 GET (the body, or nothing on an error).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --all-targets` / nextest probing the bench: nothing to list.
    }
    let rate = env_or("BENCH_RATE", 40_000).max(1);
    let secs = env_or("BENCH_SECS", 20).max(1);
    let customers = env_or("BENCH_CUSTOMERS", 100_000).max(1);
    let partitions = env_or("BENCH_PARTITIONS", 4) as i32;
    let warmup = env_or("BENCH_WARMUP_SECS", 60);
    // Amounts up to 100,000 CNY: under the default rules (B2B classes by lifetime spend, from
    // 200,000 CNY for C to 1,000,000 for A) customers keep moving up through the run, so the
    // measured window has upgrades, not only first placements.
    let max_amount = env_or("BENCH_MAX_AMOUNT", 100_000).max(1);
    let total = rate * (warmup + secs);
    let measured_from = rate * warmup;
    let world = World::start(partitions);
    let extra = std::env::var("BENCH_TIERD_TOML")
        .unwrap_or_default()
        .replace("\\n", "\n");
    let tierd = Tierd::spawn(&world, &extra);
    tierd.wait_partitions(i64::from(partitions), Duration::from_secs(120));

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (brokers, topic, stop) = (
            world.broker.addr.clone(),
            world.output.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || read_changes(brokers, topic, partitions, stop))
    };
    // The producer lingers 5 ms (Apache Kafka 4's default for its own producer; librdkafka's
    // is 5 ms too): producing each record alone (0) costs the broker several times the CPU on
    // this 2-core machine, which tierd then lacks. BENCH_PRODUCER_LINGER_MS to change it.
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &world.broker.addr)
        .set("enable.idempotence", "true")
        .set(
            "linger.ms",
            std::env::var("BENCH_PRODUCER_LINGER_MS").unwrap_or_else(|_| "5".into()),
        )
        .create()
        .unwrap();
    eprintln!("producing {total} purchases at {rate}/s for {warmup} + {secs} s ({customers} customers, {partitions} partitions)…");
    // What tierd shows meanwhile, once a second (stderr): where a latency builds up.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (addr, sampling) = (
            tierd.api.trim_start_matches("http://").to_owned(),
            sampling.clone(),
        );
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                let text = http_get(&addr, "/metrics");
                let metric = |name: &str| -> f64 {
                    text.lines()
                        .filter(|l| l.split([' ', '{']).next() == Some(name))
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .sum()
                };
                eprintln!(
                    "lag {:.0} · outbox {:.0} · applied {:.0} · published {:.0} · batches {:.0} (mean {:.0} events, {:.1} ms)",
                    metric("tierd_consumer_lag_messages"),
                    metric("tierd_outbox_depth"),
                    metric("tierd_events_applied_total"),
                    metric("tierd_outbox_published_total"),
                    metric("tierd_batch_events_count"),
                    metric("tierd_batch_events_sum") / metric("tierd_batch_events_count").max(1.0),
                    1000.0 * metric("tierd_batch_apply_duration_seconds_sum")
                        / metric("tierd_batch_apply_duration_seconds_count").max(1.0),
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut payload = String::with_capacity(200);
    // Produces purchases `from..to` on the schedule that starts at `t0`; returns how far the
    // producer fell behind it at most.
    let mut produce = |from: u64, to: u64, t0: Instant| -> Duration {
        let mut behind = Duration::ZERO;
        for i in from..to {
            let scheduled = t0 + interval.mul_f64((i - from) as f64);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            } else {
                behind = behind.max(now - scheduled);
            }
            let customer = format!("c{}", rng.next() % customers);
            let amount = 1 + rng.next() % max_amount;
            let at = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            payload.clear();
            payload.push_str(&format!(
                r#"{{"event_id":"L{i}","customer_id":"{customer}","amount":"{amount}.00","currency":"CNY","occurred_at":"{at}"}}"#
            ));
            let mut record = BaseRecord::to(&world.input)
                .key(customer.as_str())
                .payload(payload.as_str());
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        behind
    };
    // Waits until tierd applied the first `n` purchases and published every change.
    let caught_up = |n: u64| {
        producer.flush(Duration::from_secs(60)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        while (0..partitions)
            .map(|p| world.partition_meta(p).1.max(0))
            .sum::<i64>()
            < n as i64
        {
            assert!(Instant::now() < deadline, "tierd did not apply everything");
            std::thread::sleep(Duration::from_millis(50));
        }
        while (0..partitions).any(|p| world.outbox_len(p) > 0) {
            assert!(Instant::now() < deadline, "the outboxes did not drain");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Warm-up at the same rate (new customers, cold caches, the publishers' first
    // transactions, the broker's transaction log created), then everything applied and
    // published before the measured phase starts.
    produce(0, measured_from, Instant::now());
    caught_up(measured_from);

    let tierd_pid = tierd.pid().unwrap().to_string();
    let cpu_before = (
        process_cpu(&tierd_pid),
        process_cpu("self"),
        machine_cpu(),
        processes_cpu("java"),
        processes_cpu("redis-server"),
    );
    let t0 = Instant::now() + Duration::from_millis(100);
    let behind = produce(measured_from, total, t0);
    let produced_in = t0.elapsed();
    let (machine_busy, machine_total) = machine_cpu();
    let cpu = (
        process_cpu(&tierd_pid) - cpu_before.0,
        process_cpu("self") - cpu_before.1,
        machine_busy - cpu_before.2 .0,
        machine_total - cpu_before.2 .1,
        processes_cpu("java") - cpu_before.3,
        processes_cpu("redis-server") - cpu_before.4,
    );
    caught_up(total);
    let scheduled = |i: u64| t0 + interval.mul_f64((i - measured_from) as f64);
    stop.store(true, Ordering::Relaxed);
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let seen = reader.join().unwrap();
    let changes = tierd.metric("tierd_tier_changes_total");
    let mut latencies: Vec<Duration> = seen
        .iter()
        .filter(|(_, i)| *i >= measured_from)
        .map(|(at, i)| at.saturating_duration_since(scheduled(*i)))
        .collect();
    latencies.sort();

    println!("## tierd latency bench (open loop)");
    println!();
    println!(
        "- scenario: purchases at {rate}/s for {secs} s, after a warm-up of {warmup} s at that rate (applied and published before the measured phase starts), {customers} customers, {partitions} partitions, broker {}, Redis 7 on loopback",
        support::broker_description()
    );
    println!(
        "- producing took {:.2} s (the producer was at most {} behind its schedule)",
        produced_in.as_secs_f64(),
        ms(behind)
    );
    println!(
        "- CPU while producing: machine {:.0} % busy ({:.1} of {:.1} core-seconds); tierd {:.1} s, the broker (java) {:.1} s, Redis {:.1} s, this bench (producer and reader) {:.1} s, the rest {:.1} s",
        100.0 * cpu.2 / cpu.3.max(0.01),
        cpu.2,
        cpu.3,
        cpu.0,
        cpu.4,
        cpu.5,
        cpu.1,
        cpu.2 - cpu.0 - cpu.1 - cpu.4 - cpu.5
    );
    println!(
        "- tier changes: {changes:.0} published, {} of them caused by a measured purchase",
        latencies.len()
    );
    println!();
    print_percentiles(
        "purchase scheduled → its tier change read (read_committed)",
        &latencies,
    );
    // Whether the latency is steady or grows over the run (a backlog building up).
    let mut by_second: Vec<Vec<Duration>> = vec![Vec::new(); secs as usize];
    for (at, i) in seen.iter().filter(|(_, i)| *i >= measured_from) {
        if let Some(v) = by_second.get_mut(((*i - measured_from) / rate) as usize) {
            v.push(at.saturating_duration_since(scheduled(*i)));
        }
    }
    let line: Vec<String> = by_second
        .iter_mut()
        .map(|v| {
            v.sort();
            format!("{:.0}", percentile(v, 50.0).as_secs_f64() * 1000.0)
        })
        .collect();
    println!();
    println!(
        "p50 by second of the measured schedule (ms): {}",
        line.join(" ")
    );
}
