//! Redis Cluster: tierd on a real local cluster (3 masters, 3 replicas, Debian's
//! redis-server) over 8 input partitions, whose keys the cluster spreads over its masters.
//! What spans partitions — a customer looked up in every partition, the tier sizes, the
//! operator tools' scans, the eviction check — is checked here against the same stream on the
//! pure engine. (The kill -9 exactly-once test, the rules sweep and the timers run on a
//! cluster in their own files.)

mod support;

use std::collections::HashMap;
use std::time::Duration;
use support::exact::{assert_exact, b2b_rules, reference, stream};
use support::{Redis, Tierd, World};
use tierd::model::CustomerState;

/// An export's output (`out`, its log `err`) holds every expected customer once, with their
/// tier.
fn assert_exported(out: &str, err: &str, expected: &HashMap<String, CustomerState>) {
    let mut exported: HashMap<String, Option<String>> = HashMap::new();
    for line in out.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let id = v["customer_id"].as_str().unwrap().to_owned();
        let tier = v["tier"].as_str().map(str::to_owned);
        assert!(exported.insert(id.clone(), tier).is_none(), "{id} twice");
    }
    assert_eq!(exported.len(), expected.len(), "{err}");
    for (customer, state) in expected {
        assert_eq!(exported[customer], state.tier, "{customer}");
    }
}

/// `n` events of `customers` customers (`seed`) applied by one tierd on a cluster, 8
/// partitions: exact. The world, the tierd and each customer's expected state.
fn applied_on_a_cluster(
    n: usize,
    customers: u32,
    seed: u64,
) -> (World, Tierd, HashMap<String, CustomerState>) {
    let world = World::start_with(8, Redis::start_cluster());
    let events = stream(n, customers, seed);
    let (expected, changes) = reference(&events, &b2b_rules());
    let tierd = Tierd::spawn(&world, "");
    let ends = world.produce_json(&events);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(120));
    assert_exact(&world, &expected, &changes);
    (world, tierd, expected)
}

#[test]
fn the_api_and_the_tools_read_every_partition_across_the_cluster() {
    let (world, tierd, expected) = applied_on_a_cluster(4_000, 400, 13);
    let masters = world.redis.masters_holding(&format!("{}:*", world.prefix));
    assert!(
        masters >= 2,
        "the partitions' keys are on {masters} master(s)"
    );

    // A lookup asks every partition at once (one pipeline, split by slot).
    for (customer, state) in expected.iter().take(40) {
        let (status, body) = tierd.get(&format!("/v1/customers/{customer}"));
        assert_eq!(status, 200, "{customer}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["tier"].as_str(),
            state.tier.as_deref(),
            "{customer}: {body}"
        );
    }
    let (status, body) = tierd.get("/v1/customers/nobody-at-all");
    assert_eq!(status, 404, "{body}");

    // Tier sizes summed over every partition's counts.
    let mut sizes: HashMap<String, i64> = HashMap::new();
    for s in expected.values() {
        *sizes.entry(s.tier.clone().unwrap()).or_default() += 1;
    }
    let (status, body) = tierd.get("/v1/tiers");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for t in v["tiers"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        assert_eq!(
            t["customers"].as_i64().unwrap(),
            sizes.get(name).copied().unwrap_or(0),
            "tier {name}: {body}"
        );
    }

    // The per-partition gauges of a scrape (one pipeline over the owned partitions, split
    // by slot): every partition's tier counts, summed, are the tier sizes.
    let (status, text) = tierd.get("/metrics");
    assert_eq!(status, 200);
    let mut scraped: HashMap<String, i64> = HashMap::new();
    let mut partitions = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("tierd_tier_customers{") else {
            continue;
        };
        let (labels, value) = rest.rsplit_once("} ").unwrap();
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                .unwrap()
                .trim_end_matches('"')
                .to_owned()
        };
        partitions.insert(label("partition").parse::<i32>().unwrap());
        *scraped.entry(label("tier")).or_default() += value.parse::<i64>().unwrap();
    }
    assert_eq!(partitions.len(), 8, "{text}");
    scraped.retain(|_, n| *n > 0);
    assert_eq!(
        scraped, sizes,
        "tierd_tier_customers summed over partitions"
    );
    for p in 0..8 {
        assert!(
            text.contains(&format!("tierd_timers_pending{{partition=\"{p}\"}}")),
            "partition {p}'s pending timers:\n{text}"
        );
    }

    // The export scans each partition on the master of its slot: every customer, once.
    let dir = tempfile::tempdir().unwrap();
    let config = world.config_file(dir.path());
    let (code, out, err) = support::tierd_cli(&["export", "--config", &config]);
    assert_eq!(code, 0, "{err}");
    assert_exported(&out, &err, &expected);
    // A stored customer explained by the tool (found across the partitions).
    let customer = expected.keys().next().unwrap();
    let (code, out, err) = support::tierd_cli(&["rules", "explain", customer, "--config", &config]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(customer.as_str()), "{out}");
}

/// One master that may evict keys (`allkeys-lru`) is enough for tierd to refuse to start:
/// the check reads every master's policy.
#[test]
fn a_cluster_with_one_evicting_node_is_refused_replicas_included() {
    let world = World::start_with(2, Redis::start_cluster());
    let policy = |node: &support::ClusterNode, policy: &str| {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg(policy)
            .query(&mut node.conn())
            .unwrap();
    };
    let dir = tempfile::tempdir().unwrap();
    let config = world.config_file(dir.path());
    let nodes = world.redis.nodes();
    // A replica keeps its policy when it is promoted: checked too.
    let replica = nodes.iter().find(|n| !n.is_master()).expect("a replica");
    let master = nodes
        .iter()
        .rev()
        .find(|n| n.is_master())
        .expect("a master");
    for (node, what) in [(replica, "replica"), (master, "master")] {
        policy(node, "allkeys-lru");
        let (code, log) = run(&config);
        assert!(
            matches!(code, Some(c) if c != 0),
            "tierd started with an evicting {what}: {code:?}\n{log}"
        );
        assert!(log.contains("maxmemory-policy is `allkeys-lru`"), "{log}");
        policy(node, "noeviction");
    }
    // A node that does not answer (a frozen replica: its kernel still accepts connections)
    // does not hold the start: its policy is unread (a warning, if the cluster does not
    // already list it as failing).
    replica.signal("-STOP");
    let tierd = Tierd::spawn(&world, "");
    tierd.wait_partitions(2, Duration::from_secs(45));
    replica.signal("-CONT");
    eprintln!(
        "frozen replica's policy unread, warned: {}",
        tierd
            .log_text()
            .contains("Cannot read this Redis node's maxmemory-policy")
    );
}

/// `tierd run --config <config>`, expected to refuse to start: its exit code (`None`: still
/// running after 60 s, then killed) and its output.
fn run(config: &str) -> (Option<i32>, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tierd"))
        .args(["run", "--config", config])
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (code, std::fs::read_to_string(log.path()).unwrap())
}

/// A master killed (`kill -9`) while events flow, its replica promoted (the cluster's
/// failover, 2 s node timeout) without the last writes the master acknowledged: Redis
/// replicates asynchronously, and here the replica is frozen and its link cut for the last
/// second before the kill, so those writes are surely lost. tierd rides through it: its calls to the lost node
/// fail and are retried, the cluster client follows the slots to the new master, and each
/// partition whose offset went back with the lost writes is found diverged, claimed again and
/// replayed. After the stream every state equals the pure engine's and every change is
/// published, any repeat being the identical record.
#[test]
fn a_master_killed_during_ingestion_fails_over_and_loses_nothing() {
    let world = World::start_with(8, Redis::start_cluster());
    let events = stream(20_000, 2_000, 23);
    let (expected, changes) = reference(&events, &b2b_rules());
    let tierd = Tierd::spawn(&world, "[ingest]\nbatch_max_events = 200\n");
    tierd.wait_partitions(8, Duration::from_secs(60));
    // The master holding partition 0's keys: the node that answers for its meta key (the
    // others answer MOVED).
    let meta = world.keys(0).meta;
    let ends = std::thread::scope(|s| {
        let producer = s.spawn(|| world.produce_paced(&events, 400));
        std::thread::sleep(Duration::from_secs(3));
        world.redis.fail_over_losing_writes(&meta);
        producer.join().unwrap()
    });
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(180));
    support::exact::assert_exact_with(
        &world,
        &expected,
        &changes,
        support::exact::Duplicates::IdenticalOnly,
    );
    assert!(
        tierd.metric("tierd_redis_errors_total") + tierd.metric("tierd_publish_errors_total") > 0.0,
        "the failover hit tierd while it worked"
    );
    tierd.assert_lost_writes_noticed();
    assert_eq!(tierd.metric("tierd_partitions_assigned") as i64, 8);
}

/// Every slot of the master holding partition 0 moved to another master
/// (`redis-cli --cluster reshard`) while events flow: keys move one by one, commands on a
/// slot in migration are redirected (`ASK`) or told to try again (`TRYAGAIN`, a script whose
/// keys are split between the two nodes), and tierd's calls follow. Nothing is lost or
/// counted twice.
#[test]
fn a_slot_migration_during_ingestion_loses_nothing() {
    let world = World::start_with(8, Redis::start_cluster());
    let events = stream(20_000, 2_000, 29);
    let (expected, changes) = reference(&events, &b2b_rules());
    let tierd = Tierd::spawn(&world, "[ingest]\nbatch_max_events = 200\n");
    tierd.wait_partitions(8, Duration::from_secs(60));
    let meta = world.keys(0).meta;
    let (moved, ends) = std::thread::scope(|s| {
        let producer = s.spawn(|| world.produce_paced(&events, 400));
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            !producer.is_finished(),
            "the migration starts while events flow"
        );
        let moved = world.redis.move_every_slot_of(&meta);
        eprintln!(
            "events still flowing after the move: {}",
            !producer.is_finished()
        );
        (moved, producer.join().unwrap())
    });
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(180));
    assert_exact(&world, &expected, &changes);
    assert_eq!(
        world.redis.master_holding(&meta).port,
        moved.to,
        "partition 0's slot moved from {} to {}",
        moved.from,
        moved.to
    );
}

/// `tierd export` run again and again while every slot of partition 0's master moves to
/// another master (`redis-cli --cluster reshard`, keys moved one by one): each export ends
/// within 2 minutes and holds every customer once, with their tier (its scans start again on
/// the new master). Before the cluster connection bounded its requests
/// (`store::connection::CLUSTER_CALLS_AT_ONCE`), an export hung for good in its first call in
/// 3 of 4 runs.
#[test]
fn exports_during_a_slot_migration_end_and_hold_every_customer_once() {
    let (world, _tierd, expected) = applied_on_a_cluster(6_000, 600, 43);
    let dir = tempfile::tempdir().unwrap();
    let config = world.config_file(dir.path());
    let export = || {
        // `timeout` (coreutils) ends an export that hangs: exit code 124.
        let (code, out, err) = support::command_output(
            std::process::Command::new("timeout")
                .arg("120")
                .arg(env!("CARGO_BIN_EXE_tierd"))
                .args(["export", "--config", &config]),
        );
        assert_ne!(code, 124, "the export hung: {err}");
        assert_eq!(code, 0, "{err}");
        assert_exported(&out, &err, &expected);
    };
    let meta = world.keys(0).meta;
    let during = std::thread::scope(|s| {
        let moving = s.spawn(|| world.redis.move_every_slot_of(&meta));
        let mut during = 0;
        while !moving.is_finished() {
            export();
            during += 1;
        }
        moving.join().unwrap();
        during
    });
    eprintln!("{during} exports during the migration");
    assert!(during >= 1, "an export ran while the slots moved");
    export();
}

/// A cluster that speaks only TLS (clients, replication and the cluster bus) and admits only
/// an ACL user: `rediss+cluster://user:password@…` with `redis.tls_ca_file`. The nodes tierd
/// discovers beyond its seeds are reached the same way.
#[test]
fn a_cluster_with_tls_and_an_acl_user_is_run_exactly() {
    run_exactly_over_tls(false);
}

/// The same cluster requiring a client certificate signed by its CA from every client
/// (`tls-auth-clients yes`): tierd presents `redis.tls_cert_file` / `redis.tls_key_file` to
/// every node it discovers; without them a node refuses the connection.
#[test]
fn a_cluster_requiring_client_certificates_is_run_exactly() {
    run_exactly_over_tls(true);
}

fn run_exactly_over_tls(client_certs: bool) {
    let dir = tempfile::tempdir().unwrap();
    let certs = support::Certs::make(dir.path());
    let (user, password) = ("tierd-app", "cluster-secret");
    let redis = if client_certs {
        Redis::start_cluster_mutual_tls(&certs, user, password)
    } else {
        Redis::start_cluster_tls(&certs, user, password)
    };
    let world = World::start_with(8, redis);
    assert!(world
        .redis
        .url
        .starts_with("rediss+cluster://tierd-app:cluster-secret@"));
    let config = world.redis.config("tierd");
    assert_eq!(config.tls_cert_file.is_some(), client_certs);
    // The nodes really require TLS and the user (the default user is refused), and a client
    // certificate when they say so.
    let node = &world.redis.nodes()[3];
    let ping = |url: String, with_cert: bool| {
        tierd::store::client::client(&tierd::config::RedisConfig {
            url,
            tls_ca_file: Some(certs.ca.clone()),
            tls_cert_file: with_cert.then(|| certs.client_cert.clone()),
            tls_key_file: with_cert.then(|| certs.client_key.clone()),
            ..tierd::config::RedisConfig::default()
        })
        .unwrap()
        .sync_connection(Duration::from_secs(5))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
    };
    let as_user = format!("rediss://{user}:{password}@127.0.0.1:{}", node.port);
    assert!(
        ping(format!("rediss://127.0.0.1:{}", node.port), client_certs).is_err(),
        "the default user must be refused"
    );
    assert_eq!(ping(as_user.clone(), client_certs).unwrap(), "PONG");
    if client_certs {
        assert!(
            ping(as_user, false).is_err(),
            "a client without a certificate must be refused"
        );
    }

    let events = stream(3_000, 300, 31);
    let (expected, changes) = reference(&events, &b2b_rules());
    let tierd = Tierd::spawn(&world, "");
    let ends = world.produce_json(&events);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(120));
    assert_exact(&world, &expected, &changes);
    let (status, body) = tierd.get(&format!(
        "/v1/customers/{}",
        expected.keys().next().unwrap()
    ));
    assert_eq!(status, 200, "{body}");
}

/// The whole pipeline on a cluster as a least-privileged user (`+@all -@dangerous`, on every
/// node: a cluster does not share its ACL users): commits, claims, scans, lookups and the
/// startup check run with what that user may run (`CLUSTER SLOTS`, `CLUSTER NODES`,
/// `CLUSTER KEYSLOT`, `CLIENT INFO`); `INFO` is refused on every node, and the eviction
/// check warns once.
#[test]
fn the_pipeline_runs_on_a_cluster_as_a_user_without_dangerous_commands() {
    let mut world = World::start_with(8, Redis::start_cluster());
    for node in world.redis.nodes() {
        support::add_user_without_dangerous_commands(&mut node.conn());
    }
    world.redis.url = world.redis.url.replacen(
        "redis+cluster://",
        "redis+cluster://tierd-app:app-secret@",
        1,
    );
    for node in world.redis.nodes() {
        let mut conn = redis::Client::open(format!(
            "redis://tierd-app:app-secret@127.0.0.1:{}",
            node.port
        ))
        .unwrap()
        .get_connection()
        .unwrap();
        let refused: redis::RedisResult<String> = redis::cmd("INFO").arg("memory").query(&mut conn);
        assert!(
            refused.is_err(),
            "the user must not run INFO on {}",
            node.port
        );
    }

    let events = stream(4_000, 400, 41);
    let (expected, changes) = reference(&events, &b2b_rules());
    let tierd = Tierd::spawn(&world, "");
    let ends = world.produce_json(&events);
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(120));
    assert_exact(&world, &expected, &changes);
    let customer = expected.keys().next().unwrap();
    let (status, body) = tierd.get(&format!("/v1/customers/{customer}"));
    assert_eq!(status, 200, "{body}");
    let log = tierd.log_text();
    assert_eq!(
        log.matches("Cannot read Redis's maxmemory-policy; make sure it is `noeviction`")
            .count(),
        1,
        "no node could be read: one warning\n{log}"
    );
    assert!(log.contains("NoPerm"), "{log}");
    // The tools as that user: an export scans every partition.
    let dir = tempfile::tempdir().unwrap();
    let config = world.config_file(dir.path());
    let (code, out, err) = support::tierd_cli(&["export", "--config", &config]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), expected.len(), "{err}");
}

/// Four tierd instances in one group over 8 partitions on the cluster, joining one by one and
/// leaving (two cleanly, one killed) while events flow: every partition's state moves with its
/// ownership through the cluster, and the result is exact.
#[test]
fn four_instances_join_and_leave_under_load_on_a_cluster() {
    let world = World::start_with(8, Redis::start_cluster());
    let events = stream(24_000, 2_400, 37);
    let (expected, changes) = reference(&events, &b2b_rules());
    let extra = "[ingest]\nbatch_max_events = 200\n";
    let first = Tierd::spawn(&world, extra);
    first.wait_partitions(8, Duration::from_secs(60));
    let ends = std::thread::scope(|s| {
        let producer = s.spawn(|| world.produce_paced(&events, 500));
        let mut others: Vec<Tierd> = Vec::new();
        for _ in 0..3 {
            others.push(Tierd::spawn(&world, extra));
            std::thread::sleep(Duration::from_secs(2));
        }
        // All four share the partitions: two each.
        for t in std::iter::once(&first).chain(&others) {
            t.wait_partitions(2, Duration::from_secs(60));
        }
        assert!(
            !producer.is_finished(),
            "the group changed while events flowed"
        );
        let mut killed = others.pop().unwrap();
        killed.kill9();
        for mut t in others {
            assert_eq!(t.terminate(), Some(0));
        }
        first.wait_partitions(8, Duration::from_secs(60));
        producer.join().unwrap()
    });
    world.wait_applied_by(&first, &ends, Duration::from_secs(180));
    assert_exact(&world, &expected, &changes);
}
