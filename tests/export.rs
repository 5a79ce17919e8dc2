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

    // 3,000 customers placed, then input that never pauses while exports run: purchases,
    // and erases of customers who buy again after, so that customers change, appear and
    // disappear during every read. Erases are dated after every purchase, so each one removes
    // the customer whatever incarnation they are in.
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
                for _ in 0..40 {
                    // Each customer gets both purchases and erases (11 is prime to the 3,000
                    // customers), so customers are erased, created again and changed during
                    // the reads; purchases are a millisecond apart (none too late for the
                    // dedup memory) and erases dated after all of them.
                    let c = format!("c{}", (i * 7) % 3000);
                    let e = if i % 11 == 10 {
                        serde_json::json!({"event_id": format!("x{i}"), "customer_id": c,
                            "type": "erase", "occurred_at": "2026-11-04T00:00:00Z"})
                    } else {
                        let ms = 1_793_664_000_000 + i64::try_from(i).unwrap(); // 2026-11-03
                        purchase(
                            &format!("b{i}"),
                            &c,
                            "7000.00",
                            &tierd::model::time::format_ms(ms),
                        )
                    }
                    .to_string();
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
                std::thread::sleep(Duration::from_millis(5));
            }
            producer.flush(Duration::from_secs(30)).unwrap();
            i
        })
    };
    let mut exports = Vec::new();
    for _ in 0..6 {
        let started = std::time::Instant::now();
        let (code, customers, report, err) = export(&config, &["--retries", "0"]);
        eprintln!("export took {:?}: {err}", started.elapsed());
        assert_eq!(code, 0, "{err}");
        assert_eq!(report.len(), 2, "{err}");
        assert!(report.values().all(|r| r.2), "{err}");
        assert!(err.contains("(consistent, 1 read)"), "{err}");
        exports.push((customers, report));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = feeder.join().unwrap();

    // Every export is, per partition, exactly the customers the input before its reported
    // offset leaves (purchases counted, erased customers gone), read back from the topic.
    let input = world.read_all(&world.input);
    let mut moved = 0;
    for (customers, report) in &exports {
        for (p, (n, offset, _)) in report {
            let mut expected: HashMap<String, u64> = HashMap::new();
            for r in input
                .iter()
                .filter(|r| r.partition == *p && r.offset < *offset)
            {
                let v = r.json();
                let c = v["customer_id"].as_str().unwrap().to_owned();
                if v["type"] == "erase" {
                    expected.remove(&c);
                } else {
                    *expected.entry(c).or_default() += 1;
                }
            }
            let got: HashMap<String, u64> = customers
                .iter()
                .filter(|(_, v)| v["partition"] == *p)
                .map(|(c, v)| (c.clone(), v["metrics"]["frequency"].as_u64().unwrap()))
                .collect();
            assert_eq!(got.len() as u64, *n);
            assert!(
                got == expected,
                "partition {p} at offset {offset}: {} customers exported, {} expected; first differences: {:?}",
                got.len(),
                expected.len(),
                expected
                    .iter()
                    .filter(|(c, f)| got.get(*c) != Some(f))
                    .take(5)
                    .map(|(c, f)| (c, f, got.get(c)))
                    .collect::<Vec<_>>()
            );
            moved += 1;
        }
    }
    // The snapshots are closed: nothing is left saved in Redis.
    let mut conn = world.redis.conn();
    for p in 0..world.partitions {
        let keys = world.keys(p);
        let left: i64 = redis::cmd("EXISTS")
            .arg(&keys.snapshot)
            .arg(&keys.snapshot_lease)
            .query(&mut conn)
            .unwrap();
        assert_eq!(left, 0, "partition {p} left a snapshot");
    }
    eprintln!("{moved} partition snapshots equal the input before their offsets; {sent} events sent during the exports");

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
    let mut expected: HashMap<String, u64> = HashMap::new();
    for r in &input {
        let v = r.json();
        let c = v["customer_id"].as_str().unwrap().to_owned();
        if v["type"] == "erase" {
            expected.remove(&c);
        } else {
            *expected.entry(c).or_default() += 1;
        }
    }
    assert_eq!(lines.len(), expected.len());
    for line in &lines {
        let id = line["customer_id"].as_str().unwrap();
        let state = world.customer_state(id).unwrap();
        assert_eq!(line["tier"].as_str(), state.tier.as_deref(), "{id}");
        assert_eq!(line["metrics"]["frequency"], state.count, "{id}");
        assert_eq!(Some(state.count), expected.get(id).copied(), "{id}");
        let (_, api) = tierd.get(&format!("/v1/customers/{id}"));
        let api: serde_json::Value = serde_json::from_str(&api).unwrap();
        assert_eq!(api["tier"], line["tier"], "{id}");
        assert_eq!(api["metrics"], line["metrics"], "{id}");
        assert_eq!(api["partition"], line["partition"], "{id}");
    }
    let total: u64 = report.values().map(|r| r.0).sum();
    assert_eq!(total as usize, expected.len());
    assert_eq!(
        report.values().map(|r| r.1).sum::<i64>(),
        ends.values().sum::<i64>()
    );
}

/// A partition whose snapshot lease is lost during every read (deleted by hand, without
/// pause, as if the export stalled past its time to live each time) is read again up to
/// `--retries`, then the export stops naming it and leaves no output file;
/// `--allow-inconsistent` writes it marked as such. A partition another export holds is
/// refused naming that export.
/// The tools log to standard error: their standard output is data (JSON), also with every
/// library's logging on (a log line there once broke an export's lines on a
/// Redis Cluster whose slots moved: redis-rs warns then).
#[test]
fn the_tools_log_to_standard_error_and_their_output_stays_data() {
    let world = World::start(2);
    let dir = tempfile::tempdir().unwrap();
    let config = world.config_file(dir.path());
    let tierd = Tierd::spawn(&world, "");
    let events: Vec<_> = (0..20)
        .map(|i| {
            purchase(
                &format!("l{i}"),
                &format!("c{i}"),
                "10.00",
                "2026-11-01T00:00:00Z",
            )
        })
        .collect();
    let ends = world.produce_json(&events);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(60));
    // Every library's logging on: librdkafka's client (the offsets tool) logs at trace level.
    let trace = [("RUST_LOG", "trace")];
    let run = |args: &[&str]| {
        let (code, out, err) = support::tierd_cli_env(args, &trace);
        assert_eq!(code, 0, "{args:?}: {err}");
        (out, err)
    };
    let (out, err) = run(&["offsets", "show", "--config", &config, "--json"]);
    assert!(err.contains(" TRACE "), "the tool logged nothing: {err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let (out, _) = run(&["rules", "explain", "c1", "--config", &config]);
    serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let (out, _) = run(&["export", "--config", &config]);
    assert_eq!(out.lines().count(), 20, "{out}");
    for line in out.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["customer_id"].is_string(), "{line}");
    }
}

#[test]
fn a_partition_whose_snapshot_lapses_during_every_read_is_refused_or_marked() {
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

    let out = dir.path().join("export.jsonl");
    let out_arg = out.display().to_string();
    // Another export's lease on partition 1.
    let mut conn = world.redis.conn();
    let lease = world.keys(1).snapshot_lease;
    let _: () = redis::cmd("SET")
        .arg(&lease)
        .arg("tierd-export:other")
        .arg("PX")
        .arg(60_000)
        .query(&mut conn)
        .unwrap();
    let (code, _, _, err) = export(&config, &["--output", &out_arg]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("partition 1: another export (tierd-export:other) is reading it"),
        "{err}"
    );
    assert!(!out.exists(), "a failed export left {}", out.display());
    // A reset that would remove the state under an export's snapshot waits for it.
    let (code, _, err) = support::tierd_cli(&[
        "offsets",
        "reset",
        "--config",
        &config,
        "--to-earliest",
        "--clear-state",
        "--partition",
        "1",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("partition 1 is being read by an export (tierd-export:other)"),
        "{err}"
    );
    assert!(world.customer_state("c1").is_some() || world.customer_state("c0").is_some());
    let _: () = redis::cmd("DEL").arg(&lease).query(&mut conn).unwrap();

    // Partition 0's lease disappears without pause.
    let stop = Arc::new(AtomicBool::new(false));
    let remover = {
        let stop = stop.clone();
        let lease = world.keys(0).snapshot_lease;
        let mut conn = world.redis.conn();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _: i64 = redis::cmd("DEL").arg(&lease).query(&mut conn).unwrap();
            }
        })
    };
    let (code, _, _, err) = export(&config, &["--retries", "2", "--output", &out_arg]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("partition 0: each of its 3 reads was inconsistent"),
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
        err.contains("INCONSISTENT: new cut-offs or a lapsed snapshot during the read, 2 reads"),
        "{err}"
    );
    assert!(!report[&0].2 && report[&1].2, "{err}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().lines().count(),
        400,
        "every customer once"
    );
    stop.store(true, Ordering::Relaxed);
    remover.join().unwrap();
    // The saved copies evicted (a `volatile-*` policy may evict them; the lease stays): the
    // read is void too.
    let stop = Arc::new(AtomicBool::new(false));
    let evictor = {
        let stop = stop.clone();
        let hash = world.keys(0).snapshot;
        let mut conn = world.redis.conn();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _: i64 = redis::cmd("DEL").arg(&hash).query(&mut conn).unwrap();
            }
        })
    };
    let (code, _, _, err) = export(&config, &["--retries", "0", "--output", &out_arg]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("partition 0: each of its 1 reads was inconsistent"),
        "{err}"
    );
    stop.store(true, Ordering::Relaxed);
    evictor.join().unwrap();
    let (code, _, report, err) = export(&config, &["--output", &out_arg]);
    assert_eq!(code, 0, "{err}");
    assert!(report.values().all(|r| r.2), "{err}");
}
