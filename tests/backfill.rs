//! `tierd backfill`: purchase history from files into the input topic of a real Kafka, then
//! applied by a real tierd and Redis. A backfill (stopped, resumed, a chunk sent twice)
//! followed by live traffic gives the same states and changes as the whole history streamed
//! live, and both equal the pure engine's reference.

mod support;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use support::exact::{assert_exact, b2b_rules, reference, stream};
use support::{Tierd, World};

/// The next offset of every input partition (what a tierd must apply up to).
fn input_ends(world: &World) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &world.broker.addr)
        .create()
        .unwrap();
    (0..world.partitions)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(&world.input, p, Duration::from_secs(10))
                .unwrap();
            (p, high)
        })
        .collect()
}

fn backfill(config: &str, dir: &Path, extra: &[&str], file: &Path) -> (i32, String, String) {
    let checkpoint = dir.join("cp.json").display().to_string();
    let rejects = dir.join("rejects.jsonl").display().to_string();
    let file = file.display().to_string();
    let mut args = vec![
        "backfill",
        "--config",
        config,
        "--partitioner",
        // What the tests' own producer (librdkafka's default) uses: the live events below.
        "consistent_random",
        "--checkpoint",
        &checkpoint,
        "--rejects",
        &rejects,
        "--map",
        "event_id=order_no",
        "--map",
        "customer_id=member",
        "--map",
        "amount=total",
        "--map",
        "occurred_at=paid_at",
        "--map",
        "type=kind",
    ];
    args.extend_from_slice(extra);
    args.push(&file);
    support::tierd_cli(&args)
}

#[test]
fn a_backfill_then_live_traffic_gives_the_tiers_of_the_whole_history_streamed_live() {
    let events = stream(3000, 200, 41);
    let (history, live) = events.split_at(2000);

    // The history as an export might have it: other column names, gzip, and three rows
    // tierd would refuse (not produced; written to the rejects file with their reasons).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("history.csv.gz");
    {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&file).unwrap(),
            flate2::Compression::default(),
        );
        let mut w = csv::Writer::from_writer(gz);
        w.write_record(["order_no", "member", "kind", "total", "paid_at", "channel"])
            .unwrap();
        for (i, e) in history.iter().enumerate() {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            let kind = if e["type"] == "refund" {
                "refund"
            } else {
                "purchase"
            };
            w.write_record([
                s("event_id"),
                s("customer_id"),
                kind.into(),
                s("amount"),
                s("occurred_at"),
                "app".into(),
            ])
            .unwrap();
            match i {
                100 => w.write_record([
                    "bad1",
                    "c1",
                    "purchase",
                    "-5.00",
                    "2026-10-01T00:00:00Z",
                    "app",
                ]),
                900 => w.write_record([
                    "bad2",
                    "c2",
                    "purchase",
                    "5.00",
                    "2026-13-01T00:00:00Z",
                    "app",
                ]),
                1500 => w.write_record([
                    "bad3",
                    "",
                    "purchase",
                    "5.00",
                    "2026-10-01T00:00:00Z",
                    "app",
                ]),
                _ => Ok(()),
            }
            .unwrap();
        }
        w.into_inner().unwrap().finish().unwrap();
    }

    let world = World::start(2);
    let config = world.config_file(dir.path());
    // The first run stops after 700 rows; the second goes on to 1,300; then its checkpoint
    // is put back to the first one's, as a kill after the broker acknowledged rows 701–1,300
    // but before their checkpoint was written would leave it: the third run sends them again.
    let (code, out, err) = backfill(
        &config,
        dir.path(),
        &["--stop-after", "700", "--chunk-rows", "200"],
        &file,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("stopped after 700 rows"), "{out}");
    let first_checkpoint = std::fs::read(dir.path().join("cp.json")).unwrap();
    let (code, out, err) = backfill(
        &config,
        dir.path(),
        &["--stop-after", "600", "--chunk-rows", "200"],
        &file,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resumed: 700 rows"), "{out}");
    std::fs::write(dir.path().join("cp.json"), first_checkpoint).unwrap();
    let (code, out, err) = backfill(&config, dir.path(), &[], &file);
    eprintln!("the resumed run's report:\n{out}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resumed: 700 rows"), "{out}");
    // 2,003 rows in the file: 700 done before, 1,303 read by this run (bad2 and bad3 in them).
    assert!(out.contains("backfilled 1303 rows"), "{out}");
    assert!(out.contains("1301 produced, 2 rejected"), "{out}");
    for reason in ["invalid_timestamp: 1", "missing_field: 1"] {
        assert!(out.contains(&format!("rejected {reason}")), "{out}");
    }
    // A run over a finished file sends nothing.
    let (code, out, _) = backfill(&config, dir.path(), &[], &file);
    assert_eq!(code, 0);
    assert!(
        out.contains("backfilled 0 rows") && out.contains("1 whole files"),
        "{out}"
    );

    let rejects: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("rejects.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let reasons: Vec<(&str, u64)> = rejects
        .iter()
        .map(|r| (r["reason"].as_str().unwrap(), r["line"].as_u64().unwrap()))
        .collect();
    // The header is line 1; each bad row follows the good row it was written after. bad2 was
    // in the stretch sent twice, so it was written twice.
    assert_eq!(
        reasons,
        [
            ("negative_amount", 103),
            ("invalid_timestamp", 904),
            ("invalid_timestamp", 904),
            ("missing_field", 1505)
        ]
    );
    assert!(
        rejects[0]["detail"].as_str().unwrap().contains("amount"),
        "{:?}",
        rejects[0]
    );
    // Each with the row as it was in the file.
    assert_eq!(
        rejects[0]["row"],
        "bad1,c1,purchase,-5.00,2026-10-01T00:00:00Z,app"
    );
    assert_eq!(
        rejects[3]["row"],
        "bad3,,purchase,5.00,2026-10-01T00:00:00Z,app"
    );

    // Replayed on the event clock (the documented way to load history), then run live.
    let mut loader = Tierd::spawn(&world, "[clock]\nmode = \"event\"\n");
    world.wait_applied_by(&loader, &input_ends(&world), Duration::from_secs(120));
    // Every duplicate recognised: the stream's own re-sent events, and the 599 valid rows of
    // the stretch sent twice (rows 701–1,300, bad2 among them).
    let own = history.len()
        - history
            .iter()
            .map(|e| e["event_id"].as_str().unwrap())
            .collect::<std::collections::HashSet<_>>()
            .len();
    assert_eq!(
        loader.metric("tierd_events_deduplicated_total"),
        (own + 599) as f64,
        "the rows sent twice were not all recognised ({own} re-sent by the stream itself)"
    );
    assert_eq!(loader.terminate(), Some(0));
    let tierd = Tierd::spawn(&world, "");
    let ends = world.produce_json(live);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(120));

    // The whole history streamed live, into another deployment.
    let streamed = World::start(2);
    let streamed_tierd = Tierd::spawn(&streamed, "");
    let ends = streamed.produce_json(&events);
    streamed.wait_applied_by(&streamed_tierd, &ends, Duration::from_secs(120));

    // Both equal the pure engine over the same events (the rejected rows were never events):
    // every state, and every change published once, in per-customer order.
    let (states, changes) = reference(&events, &b2b_rules());
    assert_exact(&world, &states, &changes);
    assert_exact(&streamed, &states, &changes);
    for customer in states.keys() {
        assert_eq!(
            world.customer_state(customer).map(|s| s.tier),
            streamed.customer_state(customer).map(|s| s.tier),
            "{customer}"
        );
    }
}

/// `tierd backfill --config CONFIG ARGS… FILE`.
fn cli(config: &str, args: &[&str], file: &Path) -> (i32, String, String) {
    let file = file.display().to_string();
    let mut all = vec!["backfill", "--config", config];
    all.extend_from_slice(args);
    all.push(&file);
    support::tierd_cli(&all)
}

#[test]
fn backfill_refuses_what_it_cannot_send_right_and_names_it() {
    let world = World::start(1);
    let dir = tempfile::tempdir().unwrap();
    let config = world.config_file(dir.path());
    let csv = dir.path().join("h.csv");
    std::fs::write(&csv, "id,who,amount,at\n1,c1,5,2026-10-01T00:00:00Z\n").unwrap();

    // A required column missing from the header: the flag that maps it.
    let (code, _, err) = cli(
        &config,
        &["--partitioner", "murmur2_random", "--dry-run"],
        &csv,
    );
    assert_eq!(code, 1);
    assert!(err.contains("--map event_id=COLUMN"), "{err}");

    // No partitioner: the live producers' must be named.
    let (code, _, err) = cli(&config, &[], &csv);
    assert_eq!(code, 2);
    assert!(err.contains("--partitioner"), "{err}");

    // An unknown format.
    let txt = dir.path().join("h.txt");
    std::fs::write(&txt, "x").unwrap();
    let (code, _, err) = cli(&config, &["--partitioner", "murmur2_random"], &txt);
    assert_eq!(code, 1);
    assert!(err.contains("--format jsonl|csv"), "{err}");

    // A dry run checks every row and sends nothing.
    let jsonl = dir.path().join("h.jsonl");
    let rejects = dir.path().join("r.jsonl").display().to_string();
    let checkpoint = dir.path().join("cp.json");
    std::fs::write(
        &jsonl,
        "{\"event_id\":\"e1\",\"customer_id\":\"c1\",\"amount\":\"5.00\",\"occurred_at\":\"2026-10-01T00:00:00Z\"}\n\
         {\"event_id\":\"e2\",\"customer_id\":\"c1\",\"amount\":\"5.001\",\"occurred_at\":\"2026-10-01T00:00:00Z\"}\n",
    )
    .unwrap();
    let checkpoint_arg = checkpoint.display().to_string();
    let base = |extra: &[&str]| {
        let mut args = vec!["--partitioner", "murmur2_random", "--rejects", &rejects];
        args.extend_from_slice(&["--checkpoint", &checkpoint_arg]);
        args.extend_from_slice(extra);
        cli(&config, &args, &jsonl)
    };
    let (code, out, err) = base(&["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("checked 2 rows")
            && out.contains("1 valid (dry run: nothing sent), 1 rejected"),
        "{out}"
    );
    assert!(out.contains("rejected invalid_amount: 1"), "{out}");
    assert_eq!(
        input_ends(&world),
        BTreeMap::from([(0, 0)]),
        "a dry run produced"
    );
    assert!(!checkpoint.exists(), "a dry run wrote a checkpoint");

    let dry_rejects = std::fs::read_to_string(&rejects).unwrap();
    assert_eq!(dry_rejects.lines().count(), 1, "{dry_rejects}");

    // Sent; a row appended later is sent by the next run, the first two skipped (checked).
    let (code, _, err) = base(&[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(input_ends(&world), BTreeMap::from([(0, 1)]));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&jsonl)
        .unwrap();
    f.write_all(
        b"{\"event_id\":\"e3\",\"customer_id\":\"c1\",\"amount\":\"7.00\",\"occurred_at\":\"2026-10-02T00:00:00Z\"}\n",
    )
    .unwrap();
    let (code, out, err) = base(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("resumed: 2 rows") && out.contains("1 produced, 0 rejected"),
        "{out}"
    );
    assert_eq!(input_ends(&world), BTreeMap::from([(0, 2)]));

    // A row edited in place (the same size, past nothing but the rows already sent): refused,
    // naming the file and the checkpoint; nothing sent.
    let edited = std::fs::read_to_string(&jsonl)
        .unwrap()
        .replacen("5.00", "6.00", 1);
    std::fs::write(&jsonl, edited).unwrap();
    let (code, _, err) = base(&[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("changed since checkpoint") && err.contains("first 3 rows"),
        "{err}"
    );
    assert_eq!(input_ends(&world), BTreeMap::from([(0, 2)]));
    // The rejected row: once by the dry run, once by the first real run (the later ones
    // skipped it).
    let all_rejects = std::fs::read_to_string(&rejects).unwrap();
    assert_eq!(all_rejects.lines().count(), 2, "{all_rejects}");

    // A row the topic refuses for its size (`max.message.bytes` 1,000; the row ~3 KB of
    // incompressible text): rejected as `refused_by_kafka`, every other row sent, also those
    // batched with it (each refused row is sent again alone before it is rejected).
    world
        .broker
        .alter_topic_config(&world.input, "max.message.bytes", "1000");
    let big = dir.path().join("big.jsonl");
    let noise: String = (0..400u64)
        .map(|i| format!("{:08x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32))
        .collect();
    let rows: Vec<String> = (0..20)
        .map(|i| {
            let mut e = serde_json::json!({"event_id": format!("b{i}"), "customer_id": format!("k{i}"),
                "amount": "1.00", "occurred_at": "2026-10-03T00:00:00Z"});
            if i == 9 {
                e["note"] = noise.clone().into();
            }
            e.to_string()
        })
        .collect();
    std::fs::write(&big, rows.join("\n")).unwrap();
    let cp3 = dir.path().join("cp3.json").display().to_string();
    let (code, out, err) = cli(
        &config,
        &[
            "--partitioner",
            "murmur2_random",
            "--checkpoint",
            &cp3,
            "--rejects",
            &rejects,
        ],
        &big,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("19 produced, 1 rejected") && out.contains("rejected refused_by_kafka: 1"),
        "{out}"
    );
    assert_eq!(input_ends(&world), BTreeMap::from([(0, 21)]));
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&rejects)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (last["reason"].as_str(), last["line"].as_u64()),
        (Some("refused_by_kafka"), Some(10))
    );
    assert!(last["row"].as_str().unwrap().contains("\"b9\""), "{last}");

    // An input topic that does not exist.
    let other = dir.path().join("other.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&world.input, "no-such-topic");
    std::fs::write(&other, text).unwrap();
    let cp2 = dir.path().join("cp2.json").display().to_string();
    let (code, _, err) = cli(
        &other.display().to_string(),
        &["--partitioner", "murmur2_random", "--checkpoint", &cp2],
        &jsonl,
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("\"no-such-topic\" (kafka.input_topic) does not exist"),
        "{err}"
    );
}
