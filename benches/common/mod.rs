//! What the benches share: settings from the environment, a deterministic generator,
//! percentiles, CPU time from `/proc` and Redis's `INFO cpu`.
#![allow(dead_code)]

pub mod http_load;

use std::time::Duration;

/// The number in environment variable `name`, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator (xorshift64*): the same input every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The `p`-th percentile of `sorted` (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `d` in milliseconds, two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Prints the p50 / p99 / p99.9 / max rows of a markdown table of sorted `latencies`, under
/// a header naming what was measured.
pub fn print_percentiles(what: &str, latencies: &[Duration]) {
    println!("| {what} | value |");
    println!("|---|---|");
    for (name, p) in [("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9)] {
        println!("| {name} | {} |", ms(percentile(latencies, p)));
    }
    println!(
        "| max | {} |",
        ms(latencies.last().copied().unwrap_or_default())
    );
}

/// Redis's own CPU so far (`used_cpu_user` + `used_cpu_sys` of `INFO cpu`), in seconds.
pub fn redis_cpu(conn: &mut impl redis::ConnectionLike) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query(conn).unwrap();
    ["used_cpu_user:", "used_cpu_sys:"]
        .iter()
        .map(|field| {
            info.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .sum()
}

/// CPU seconds of process `pid` so far (user + sys, `/proc/<pid>/stat`; `self` for this one).
pub fn process_cpu(pid: &str) -> f64 {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// CPU seconds (user + sys) in the text of a `/proc/…/stat` file (of a process or a thread).
pub fn stat_cpu(stat: &str) -> f64 {
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// Starts `tierd-dev produce`: `events` generated purchases of `customers` customers into
/// `topic` at `rate` per second (0: as fast as possible), from random seed `seed`.
pub fn produce(
    brokers: &str,
    topic: &str,
    events: u64,
    customers: u64,
    rate: u64,
    seed: u64,
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_tierd-dev"))
        .args(["--brokers", brokers, "produce", "--topic", topic])
        .args(["--events", &events.to_string()])
        .args(["--customers", &customers.to_string()])
        .args(["--rate", &rate.to_string()])
        .args(["--seed", &seed.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tierd-dev starts")
}

/// CPU seconds so far of every process whose command name is `name`.
pub fn processes_cpu(name: &str) -> f64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .map(|pid| process_cpu(&pid))
        .sum()
}

/// The machine's (busy, total) CPU seconds so far, over all cores (`/proc/stat`).
pub fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    ((total - idle) as f64 / 100.0, total as f64 / 100.0)
}
