//! Startup fails fast with a message naming the bad field.

mod support;

use std::process::Command;

/// (config file, environment, what the error must name)
type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

fn run(config: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tierd.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tierd"))
        .args(["run", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A start that should have been refused but runs is a failure, not a hung test.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    if status.is_none() {
        stderr.push_str("\n(still running after 60 s: killed)");
    }
    (status, stderr)
}

#[test]
fn bad_fields_are_named() {
    let cases: [Case; 12] = [
        ("[kafka]\nbrokers = 9092\n", &[], "kafka.brokers"),
        ("[kafka]\nbrokrs = \"x\"\n", &[], "brokrs"),
        (
            "",
            &[("TIERD_INGEST__BATCH_MAX_EVENTS", "0")],
            "ingest.batch_max_events",
        ),
        ("", &[("TIERD_MONEY__CURRENCY", "yuan")], "money.currency"),
        // An unknown variable is an error too, as an unknown key in the file is.
        ("", &[("TIERD_KAFKA__BROKRS", "x")], "brokrs"),
        ("[ingest]\ncache_bytes = 4096\n", &[], "ingest.cache_bytes"),
        ("[api]\nlisten = \"everywhere\"\n", &[], "api.listen"),
        ("[api]\nredis_timeout_ms = 0\n", &[], "api.redis_timeout_ms"),
        ("[dedup]\nhorizon_s = -1\n", &[], "dedup.horizon_s"),
        (
            "[kafka.consumer]\n\"statistics.interval.ms\" = \"0\"\n",
            &[],
            "statistics.interval.ms",
        ),
        (
            "[rules]\npath = \"config/tierd.toml\"\n",
            &[],
            "config/tierd.toml",
        ),
        (
            "[rules]\nhistory = [\"config/rules/b2b.toml\", \"config/tierd.toml\"]\n",
            &[],
            "config/tierd.toml",
        ),
    ];
    for (config, env, field) in cases {
        let (code, stderr) = run(config, env);
        assert_ne!(code, Some(0), "{config:?} {env:?} must fail");
        assert!(
            stderr.contains(field),
            "{config:?} {env:?}: stderr must name {field}:\n{stderr}"
        );
    }
}

#[test]
fn unreachable_redis_and_missing_topics_are_named() {
    let port = support::free_port();
    let (code, stderr) = run(
        &format!("[redis]\nurl = \"redis://127.0.0.1:{port}\"\n"),
        &[],
    );
    assert_ne!(code, Some(0));
    assert!(stderr.contains("redis.url"), "{stderr}");

    let world = support::World::start(1);
    let config = world
        .config(support::free_port(), "")
        .replace(&world.output, "no-such-topic");
    let (code, stderr) = run(&config, &[]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("kafka.output_topic") && stderr.contains("no-such-topic"),
        "{stderr}"
    );
}

#[test]
fn check_config_accepts_the_shipped_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_tierd"))
        .args(["check-config", "--config", "config/tierd.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("b2b-annual-1"));
}

/// The README's configuration reference names exactly the fields tierd reads: a field renamed
/// or added in the `Config` type without the reference (which users' files follow) fails here.
#[test]
fn the_readme_documents_every_config_field_and_nothing_else() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("## Configuration reference")
        .expect("reference section");
    let end = start + readme[start..].find("### Rules file").expect("section end");
    let mut documented: Vec<String> = readme[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .flat_map(|l| {
            let first_column = l.split(" |").next().unwrap_or("");
            first_column
                .split(", ")
                .map(|k| k.trim_matches('`').to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    documented.sort();
    // Every field of every section, `None` options included (JSON keeps them as null).
    let config = serde_json::to_value(tierd::config::Config::default()).unwrap();
    let mut fields: Vec<String> = config
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(section, table)| {
            table
                .as_object()
                .unwrap()
                .keys()
                .map(move |field| format!("{section}.{field}"))
        })
        .collect();
    fields.sort();
    assert_eq!(documented, fields);
}

/// tierd's keys carry no TTL and hold what must never vanish (customer state, offsets, the
/// outbox): a Redis whose `maxmemory-policy` may evict any key is refused at startup, naming
/// the setting; `volatile-*` (and `noeviction`) cannot touch them and are accepted.
#[test]
fn a_redis_that_may_evict_tierds_keys_is_refused_naming_maxmemory_policy() {
    let world = support::World::start(1);
    let set_policy = |policy: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg(policy)
            .query(&mut world.redis.conn())
            .unwrap();
    };
    set_policy("allkeys-lru");
    let (code, stderr) = run(&world.config(support::free_port(), ""), &[]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("maxmemory-policy is `allkeys-lru`"),
        "{stderr}"
    );
    set_policy("volatile-lru");
    let tierd = support::Tierd::spawn(&world, "");
    tierd.wait_partitions(1, std::time::Duration::from_secs(60));
}

/// Every publish round commits the published position with up to
/// `publish.position_metadata_bytes` of offset metadata: a budget the brokers'
/// `offset.metadata.max.bytes` (4096 here, Kafka's default) cannot hold would make them refuse
/// every round. Startup refuses it, naming the field and the brokers' limit; below it, tierd
/// starts.
#[test]
fn a_position_budget_the_brokers_cannot_hold_is_refused_naming_the_field() {
    let world = support::World::start(1);
    let config = world.config(
        support::free_port(),
        "[publish]\nposition_metadata_bytes = 5000\n",
    );
    let (code, stderr) = run(&config, &[]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("publish.position_metadata_bytes")
            && stderr.contains("offset.metadata.max.bytes (4096)"),
        "{stderr}"
    );
    let tierd = support::Tierd::spawn(&world, "[publish]\nposition_metadata_bytes = 4000\n");
    tierd.wait_partitions(1, std::time::Duration::from_secs(60));
}

/// A least-privilege Redis user without the `@dangerous` commands (no `INFO`, no `CONFIG`)
/// cannot read `maxmemory-policy`: tierd starts with a warning that names what to check, and
/// the whole pipeline runs under that user.
#[test]
fn a_redis_user_without_info_gets_a_warning_and_the_pipeline_runs() {
    let mut world = support::World::start(1);
    if !world.redis.url.starts_with("redis://") || world.redis.url.contains('@') {
        eprintln!(
            "skipped: REDIS_URL {} has credentials or is not redis://",
            world.redis.url
        );
        return;
    }
    support::add_user_without_dangerous_commands(&mut world.redis.conn());
    // tierd and this test's reads go through the restricted user (they need no more).
    world.redis.url = world
        .redis
        .url
        .replacen("redis://", "redis://tierd-app:app-secret@", 1);
    let refused: redis::RedisResult<String> = redis::cmd("INFO")
        .arg("memory")
        .query(&mut world.redis.conn());
    assert!(refused.is_err(), "the user must not run INFO");

    let tierd = support::Tierd::spawn(&world, "");
    tierd.wait_partitions(1, std::time::Duration::from_secs(60));
    let ends = world.produce_json(&[support::purchase("l1", "lia", "10", "2026-11-01T10:00:00Z")]);
    world.wait_applied(&ends, std::time::Duration::from_secs(60));
    assert_eq!(world.customer_state("lia").unwrap().count, 1);
    let log = tierd.log_text();
    assert!(
        log.contains("Cannot read Redis's maxmemory-policy; make sure it is `noeviction`"),
        "{log}"
    );
}

/// An input topic that Kafka compacts could lose a customer's earlier purchases before
/// tierd applies them (compaction keeps each key's latest record): startup refuses it,
/// naming `kafka.input_topic` and the policy.
#[test]
fn a_compacted_input_topic_is_refused_naming_cleanup_policy() {
    let mut world = support::World::start(1);
    let input = support::unique("purchases-compacted");
    world
        .broker
        .create_topics_with(&[&input], 1, 1, &[("cleanup.policy", "compact")]);
    world.input = input;
    let (code, stderr) = run(&world.config(support::free_port(), ""), &[]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("kafka.input_topic") && stderr.contains("cleanup.policy=compact"),
        "{stderr}"
    );
}

/// The history topic too: compaction would keep only each input partition's latest round
/// of replay history. And a history topic that does not exist is named at startup.
#[test]
fn a_compacted_or_missing_history_topic_is_refused_naming_it() {
    let mut world = support::World::start(1);
    let history = support::unique("history-compacted");
    world
        .broker
        .create_topics_with(&[&history], 1, 1, &[("cleanup.policy", "compact")]);
    world.history = history;
    let (code, stderr) = run(&world.config(support::free_port(), ""), &[]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("kafka.history_topic") && stderr.contains("cleanup.policy=compact"),
        "{stderr}"
    );
    world.history = support::unique("history-missing");
    let (code, stderr) = run(&world.config(support::free_port(), ""), &[]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("kafka.history_topic") && stderr.contains("does not exist"),
        "{stderr}"
    );
}

/// A fatal producer error stops the binary with exit code 1, naming it in the log: here the
/// brokers refuse the outbox producer's transactions (`transaction.timeout.ms` above their
/// `transaction.max.timeout.ms`, 15 minutes) once a partition is claimed and has something to
/// publish. The outbox keeps the undelivered change.
#[test]
fn a_fatal_producer_error_stops_the_binary_with_exit_code_1() {
    let world = support::World::start(1);
    let config = world.config(
        support::free_port(),
        "[kafka.producer]\n\"transaction.timeout.ms\" = \"1000000\"\n",
    );
    world.produce_json(&[support::purchase(
        "e1",
        "alice",
        "100.00",
        "2026-11-01T10:00:00Z",
    )]);
    let (code, stderr) = run(&config, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("an outbox producer could not be created or initialised"),
        "{stderr}"
    );
    // Nothing was published; the change (with the rules sweep's records) stays in the outbox.
    assert!(world.read_all(&world.output).is_empty());
    assert!(world.outbox_len(0) >= 1, "the change stays in the outbox");
}
