//! `tierd export` against a running tierd on a real Kafka and Redis: every customer as JSON
//! Lines, each partition a consistent snapshot while purchases keep arriving.

mod support;

use rdkafka::producer::Producer;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{purchase, Tierd, World};

/// Per partition, its report line's (customers, next offset, consistent).
type Report = BTreeMap<i32, (u64, i64, bool)>;

/// Runs `tierd export` (extra flags `args`): exit code, the customers by id, the report and
/// the standard error.
fn export(
    config: &str,
    args: &[&str],
) -> (i32, HashMap<String, serde_json::Value>, Report, String) {
    let mut all = vec!["export", "--config", config];
    all.extend_from_slice(args);
    let (code, out, err) = support::tierd_cli(&all);
    let customers = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["customer_id"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    let mut report = BTreeMap::new();
    for line in err.lines().filter(|l| l.starts_with("partition ")) {
        // "partition P: N customers, input applied before offset O (consistent, …)"
        let words: Vec<&str> = line
            .split([' ', ':', ',', '('])
            .filter(|w| !w.is_empty())
            .collect();
        let p: i32 = words[1].parse().unwrap();
        let n: u64 = words[2].parse().unwrap();
        let o: i64 = words[8].parse().unwrap();
        report.insert(p, (n, o, words[9] == "consistent"));
    }
    (code, customers, report, err)
}

#[test]
fn an_export_is_every_customer_and_each_partition_a_consistent_snapshot_under_ingestion() {
    let world = World::start(2);
    let dir = tempfile::tempdir().unwrap();
    let config = world.config_file(dir.path());
    let tierd = Tierd::spawn(&world, "");

    // 3,000 customers placed, then purchases keep arriving in bursts while exports run.
    // Every event is a distinct purchase, so a partition that applied input up to offset O
    // has counted exactly O purchases: the frequencies of a consistent snapshot sum to O.
    let at = "2026-11-01T00:00:00Z";
    let first: Vec<_> = (0..3000)
        .map(|i| purchase(&format!("a{i}"), &format!("c{i}"), "100.00", at))
        .collect();
    let ends = world.produce_json(&first);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(60));

    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        let input = world.input.clone();
        let brokers = world.broker.addr.clone();
        std::thread::spawn(move || {
            let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", "1")
                .create()
                .unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..300 {
                    let c = format!("c{}", i % 3000);
                    let e = purchase(&format!("b{i}"), &c, "7000.00", at).to_string();
                    producer
                        .send(
                            rdkafka::producer::BaseRecord::to(&input)
                                .key(&c)
                                .payload(&e),
                        )
                        .unwrap();
                    i += 1;
                }
                producer.poll(Duration::from_millis(0));
                std::thread::sleep(Duration::from_millis(700));
            }
            producer.flush(Duration::from_secs(30)).unwrap();
            i
        })
    };
    let (mut consistent, mut inconsistent) = (0, 0);
    for _ in 0..8 {
        let started = std::time::Instant::now();
        let (code, customers, report, err) =
            export(&config, &["--allow-inconsistent", "--retries", "0"]);
        eprintln!("export took {:?}: {err}", started.elapsed());
        assert_eq!(code, 0, "{err}");
        assert_eq!(report.len(), 2, "{err}");
        for (p, (n, offset, is_consistent)) in &report {
            let mine: Vec<&serde_json::Value> = customers
                .values()
                .filter(|v| v["partition"] == *p)
                .collect();
            assert_eq!(mine.len() as u64, *n);
            let counted: u64 = mine
                .iter()
                .map(|v| v["metrics"]["frequency"].as_u64().unwrap())
                .sum();
            if *is_consistent {
                consistent += 1;
                assert_eq!(
                    counted as i64, *offset,
                    "partition {p} reported consistent but its customers counted {counted} purchases, not the {offset} before its offset"
                );
            } else {
                inconsistent += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = feeder.join().unwrap();
    assert!(consistent > 0, "no read was consistent");
    eprintln!("{consistent} consistent, {inconsistent} inconsistent partition reads; {sent} purchases sent");

    // Quiet: the export is every stored customer as the API shows them.
    let ends: BTreeMap<i32, i64> = (0..world.partitions)
        .map(|p| {
            let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &world.broker.addr)
                .create()
                .unwrap();
            use rdkafka::consumer::Consumer;
            (
                p,
                consumer
                    .fetch_watermarks(&world.input, p, Duration::from_secs(10))
                    .unwrap()
                    .1,
            )
        })
        .collect();
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(60));
    let out = dir.path().join("export.jsonl");
    let (code, _, report, err) = export(&config, &["--output", &out.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(report.values().all(|r| r.2), "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3000);
    for line in &lines {
        let id = line["customer_id"].as_str().unwrap();
        let state = world.customer_state(id).unwrap();
        assert_eq!(line["tier"].as_str(), state.tier.as_deref(), "{id}");
        assert_eq!(line["metrics"]["frequency"], state.count, "{id}");
        let (_, api) = tierd.get(&format!("/v1/customers/{id}"));
        let api: serde_json::Value = serde_json::from_str(&api).unwrap();
        assert_eq!(api["tier"], line["tier"], "{id}");
        assert_eq!(api["metrics"], line["metrics"], "{id}");
        assert_eq!(api["partition"], line["partition"], "{id}");
    }
    let total: u64 = report.values().map(|r| r.0).sum();
    assert_eq!(total, 3000);
    assert_eq!(
        report.values().map(|r| r.1).sum::<i64>(),
        ends.values().sum::<i64>()
    );
}

/// A partition that commits during every read (its commit count moved on meanwhile, here
/// by hand, deterministically) is read again up to `--retries`, then the export stops naming
/// it and leaves no output file; `--allow-inconsistent` writes it marked as such.
#[test]
fn a_partition_that_commits_during_every_read_is_refused_or_marked() {
    let world = World::start(2);
    let dir = tempfile::tempdir().unwrap();
    let config = world.config_file(dir.path());
    let mut tierd = Tierd::spawn(&world, "");
    let events: Vec<_> = (0..400)
        .map(|i| {
            purchase(
                &format!("a{i}"),
                &format!("c{i}"),
                "100.00",
                "2026-11-01T00:00:00Z",
            )
        })
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(60));
    assert_eq!(tierd.terminate(), Some(0));

    // Partition 0's commit count moves on without pause, as under a commit per millisecond.
    let stop = Arc::new(AtomicBool::new(false));
    let bumper = {
        let stop = stop.clone();
        let meta = world.keys(0).meta;
        let mut conn = world.redis.conn();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _: i64 = redis::cmd("HINCRBY")
                    .arg(&meta)
                    .arg("commits")
                    .arg(1)
                    .query(&mut conn)
                    .unwrap();
            }
        })
    };
    let out = dir.path().join("export.jsonl");
    let out_arg = out.display().to_string();
    let (code, _, _, err) = export(&config, &["--retries", "2", "--output", &out_arg]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("partition 0 committed during each of its 3 reads"),
        "{err}"
    );
    assert!(!out.exists(), "a failed export left {}", out.display());
    assert!(
        !dir.path().join("export.jsonl.partial").exists(),
        "a failed export left its partial file"
    );

    let (code, _, report, err) = export(
        &config,
        &[
            "--retries",
            "1",
            "--allow-inconsistent",
            "--output",
            &out_arg,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("INCONSISTENT: committed during the read, 2 reads"),
        "{err}"
    );
    assert!(!report[&0].2 && report[&1].2, "{err}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().lines().count(),
        400,
        "every customer once"
    );
    stop.store(true, Ordering::Relaxed);
    bumper.join().unwrap();
    let (code, _, report, err) = export(&config, &["--output", &out_arg]);
    assert_eq!(code, 0, "{err}");
    assert!(report.values().all(|r| r.2), "{err}");
}
