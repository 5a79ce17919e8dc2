//! End-to-end throughput bench, in one run on this machine:
//!   (a) the raw consume ceiling: an rdkafka consumer that only reads the input topic,
//!   (b) tierd's sustained applied throughput on the same topic and broker,
//!   (c) tierd's peak RSS, (d) Redis memory per customer.
//!
//! `cargo bench --bench pipeline` (env: BENCH_EVENTS=1000000 BENCH_CUSTOMERS=100000
//! BENCH_PARTITIONS=4; BENCH_INSTANCES=1 tierd processes in one group; BENCH_REDIS=cluster for a
//! local 6-node Redis Cluster instead of one redis-server). Starts its own Redis and Apache
//! Kafka broker (scripts/kafka/broker.sh).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use common::{env_or, process_cpu, produce, redis_cpu, stat_cpu};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use std::time::{Duration, Instant};
use support::{Redis, Tierd, World};

/// Reads `n` messages of `topic` from the beginning as fast as possible; returns msgs/s and
/// the average value size.
fn raw_consume(brokers: &str, topic: &str, partitions: i32, n: u64) -> (f64, usize) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", support::unique("raw"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let (mut read, mut bytes) = (0u64, 0usize);
    let mut started = None;
    while read < n {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            started.get_or_insert_with(Instant::now);
            bytes += m.payload().map_or(0, <[u8]>::len);
            read += 1;
        }
    }
    let secs = started.unwrap().elapsed().as_secs_f64();
    eprintln!("raw consume: {read} messages, {bytes} bytes in {secs:.2} s");
    (read as f64 / secs, bytes / read.max(1) as usize)
}

/// `INFO section` of the server, or of each master of a cluster.
fn infos(world: &World, section: &str) -> Vec<String> {
    if world.redis.nodes().is_empty() {
        return vec![redis::cmd("INFO")
            .arg(section)
            .query(&mut world.redis.conn())
            .unwrap()];
    }
    world
        .redis
        .nodes()
        .iter()
        .filter(|n| n.is_master())
        .map(|n| {
            redis::cmd("INFO")
                .arg(section)
                .query(&mut n.conn())
                .unwrap()
        })
        .collect()
}

/// `used_memory` of the server (summed over a cluster's masters).
fn redis_used_memory(world: &World) -> i64 {
    infos(world, "memory")
        .iter()
        .map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .unwrap()
                .trim()
                .parse::<i64>()
                .unwrap()
        })
        .sum()
}

/// Redis's CPU seconds so far: the server's, or every node's of a cluster (masters and the
/// replicas they feed).
fn redis_cpu_all(world: &World) -> f64 {
    if world.redis.nodes().is_empty() {
        return redis_cpu(&mut world.redis.conn());
    }
    world
        .redis
        .nodes()
        .iter()
        .map(|n| redis_cpu(&mut n.conn()))
        .sum()
}

/// Where a customer's Redis bytes are: the mean `MEMORY USAGE` and value length of up to 500
/// of partition 0's customer state keys (the rest of the per-customer figure is the timer
/// and rank sorted-set entries, tier counts and the outbox).
fn state_key_sample(world: &World) -> (f64, f64) {
    let pattern = world.keys(0).customer_pattern();
    let mut conn = world.redis.conn();
    let keys = world.redis.scan(&pattern);
    let keys = &keys[..keys.len().min(500)];
    let (mut usage, mut len) = (0i64, 0i64);
    for key in keys {
        let u: Option<i64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(0)
            .query(&mut conn)
            .unwrap();
        usage += u.unwrap_or(0);
        len += redis::cmd("STRLEN")
            .arg(key)
            .query::<i64>(&mut conn)
            .unwrap();
    }
    let n = keys.len().max(1) as f64;
    (usage as f64 / n, len as f64 / n)
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds per thread name of a process, e.g. `rdk:broker111=1.2 tokio-rt-worker=2.0`.
fn thread_cpu(pid: u32) -> String {
    let mut by_name: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let ticks = (stat_cpu(&std::fs::read_to_string(path.join("stat")).unwrap_or_default())
            * 100.0)
            .round() as u64;
        let tid = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
        *by_name
            .entry(if name.starts_with("rdk:broker") {
                format!("{name}/{tid}")
            } else {
                name
            })
            .or_default() += ticks;
    }
    by_name
        .iter()
        .filter(|(_, t)| **t > 0)
        .map(|(n, t)| format!("{n}={:.1}", *t as f64 / 100.0))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --all-targets` / nextest probing the bench: nothing to list.
    }
    let events = env_or("BENCH_EVENTS", 1_000_000);
    let customers = env_or("BENCH_CUSTOMERS", 100_000);
    let partitions = env_or("BENCH_PARTITIONS", 4) as i32;
    let instances = env_or("BENCH_INSTANCES", 1) as usize;
    let cluster = std::env::var("BENCH_REDIS").is_ok_and(|r| r == "cluster");
    let world = if cluster {
        World::start_with(partitions, Redis::start_cluster())
    } else {
        World::start(partitions)
    };
    // Live: the instances join the group on the empty topic and the stream is produced while
    // they run (several instances: otherwise the first would apply nearly everything before
    // the others joined). Else the stream is in the topic before tierd starts.
    let live = instances > 1 || std::env::var("BENCH_LIVE").is_ok();
    let mut measured_first = None;
    if !live {
        eprintln!(
            "producing {events} events for {customers} customers into {partitions} partitions…"
        );
        let produced = produce(&world.broker.addr, &world.input, events, customers, 0, 1).wait();
        assert!(produced.unwrap().success());
        measured_first = Some(raw_consume(
            &world.broker.addr,
            &world.input,
            partitions,
            events,
        ));
    }

    let redis_before = redis_used_memory(&world);
    let redis_cpu_before = redis_cpu_all(&world);
    let extra = std::env::var("BENCH_TIERD_TOML")
        .unwrap_or_default()
        .replace("\\n", "\n");
    let all: Vec<Tierd> = (0..instances)
        .map(|_| Tierd::spawn(&world, &extra))
        .collect();
    // Every instance owns its share before the input is counted from.
    for t in &all {
        t.wait_partitions(
            i64::from(partitions) / instances as i64,
            Duration::from_secs(120),
        );
    }
    let tierd = &all[0];
    let pid = tierd.pid().unwrap();
    let applied = || -> i64 {
        (0..partitions)
            .map(|p| world.partition_meta(p).1.max(0))
            .sum()
    };
    let producer = live.then(|| {
        eprintln!(
            "producing {events} events for {customers} customers into {partitions} partitions while {instances} instance(s) run…"
        );
        produce(&world.broker.addr, &world.input, events, customers, 0, 1)
    });
    // Counted from the first applied batch (the group join excluded).
    let mut first: Option<(Instant, i64)> = None;
    loop {
        let done = applied();
        if first.is_none() && done > 0 {
            first = Some((Instant::now(), done));
        }
        if done >= events as i64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (t0, at_t0) = first.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let throughput = (events as i64 - at_t0) as f64 / secs;
    let ends = (0..partitions)
        .map(|p| (p, world.partition_meta(p).1))
        .collect();
    world.wait_applied(&ends, Duration::from_secs(300));
    // Until every change is published too (the outboxes are empty).
    let published_secs = t0.elapsed().as_secs_f64();
    let published_throughput = (events as i64 - at_t0) as f64 / published_secs;
    if let Some(mut producer) = producer {
        assert!(producer.wait().unwrap().success());
    }
    let (ceiling, sample) = measured_first
        .unwrap_or_else(|| raw_consume(&world.broker.addr, &world.input, partitions, events));
    let rss_peak = all
        .iter()
        .map(|t| proc_status_kib(t.pid().unwrap(), "VmHWM:"))
        .max()
        .unwrap_or(0);
    let tierd_cpu: f64 = all
        .iter()
        .map(|t| process_cpu(&t.pid().unwrap().to_string()))
        .sum();
    let threads = thread_cpu(pid);
    if std::env::var("BENCH_KEEP_LOG").is_ok() {
        let _ = std::fs::copy(&tierd.log, "/tmp/bench-tierd.log");
    }
    let redis_after = redis_used_memory(&world);
    let redis_cpu_secs = redis_cpu_all(&world) - redis_cpu_before;
    let changes: f64 = all
        .iter()
        .map(|t| t.metric("tierd_tier_changes_total"))
        .sum();
    let per_customer = (redis_after - redis_before) as f64 / customers as f64;
    let (state_key, state_value) = state_key_sample(&world);

    println!("## tierd pipeline bench");
    println!();
    println!(
        "- scenario: {events} events (~{sample} B JSON each), {customers} customers, {partitions} partitions, {instances} tierd instance(s){}, broker {}, {} on loopback",
        if live {
            " (live: produced while tierd ran)"
        } else {
            ""
        },
        support::broker_description(),
        if cluster {
            "a Redis 7 Cluster (3 masters, 3 replicas)"
        } else {
            "Redis 7"
        }
    );
    println!(
        "- machine: {} cores",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| (a) raw consume ceiling (rdkafka, read only) | {ceiling:.0} msg/s |");
    println!("| (b) tierd sustained applied throughput | {throughput:.0} events/s |");
    println!("| (b)/(a) | {:.0} % |", 100.0 * throughput / ceiling);
    println!(
        "| (b') tierd sustained throughput until every change is published | {published_throughput:.0} events/s |"
    );
    println!(
        "| (c) tierd peak RSS (VmHWM, the largest instance) | {:.1} MiB |",
        rss_peak as f64 / 1024.0
    );
    println!("| (d) Redis memory per customer | {per_customer:.1} B |");
    println!(
        "| (d) of which the state key (`MEMORY USAGE`, sample) | {state_key:.0} B, its stored value {state_value:.0} B |"
    );
    println!("| tier changes published | {changes:.0} |");
    println!(
        "| tierd CPU time (user+sys, every instance) | {tierd_cpu:.1} s = {:.2} µs per event |",
        tierd_cpu * 1e6 / events as f64
    );
    println!(
        "| Redis CPU time (`INFO cpu`, during tierd's run; every node of a cluster) | {redis_cpu_secs:.1} s = {:.2} µs per event |",
        redis_cpu_secs * 1e6 / events as f64
    );
    println!();
    println!("tierd CPU by thread (s): {threads}");
}
