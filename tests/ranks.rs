//! Rank-based tiers (the pyramid) through the real pipeline: cut-offs across partitions are
//! exact (every customer's tier equals a full sort's, ties to the higher band) and customers
//! overtaken by others move down with reason `rank_shift`.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use support::{purchase, Broker, Redis, Tierd, World};
use tierd::engine::rules::rank::Cutoffs;

const RANKS: &str = "[ranks]\nrecompute_interval_ms = 300\ncheck_interval_ms = 100\n[clock]\nmode = \"event\"\nlateness_s = 0\n";

fn pyramid(partitions: i32) -> World {
    pyramid_on(World::start(partitions))
}

/// `world` under the pyramid rules.
fn pyramid_on(mut world: World) -> World {
    world.rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/pyramid.toml");
    world
}

/// Waits until cut-offs computed over `population` customers (each customer has one event,
/// so the values are final) are applied by every partition; returns them.
fn wait_settled(world: &World, tierd: &Tierd, population: u64) -> Cutoffs {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(c) = world.cutoffs() {
            if c.population.first() == Some(&population)
                && (0..world.partitions).all(|p| world.applied_cutoffs_version(p) >= c.version)
            {
                // Let the outboxes drain too.
                world.wait_applied(&std::collections::BTreeMap::new(), Duration::from_secs(60));
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "cut-offs did not settle:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn changes_of(world: &World, customer: &str) -> Vec<serde_json::Value> {
    world
        .read_all(&world.output)
        .iter()
        .map(support::Record::json)
        .filter(|v| v["customer_id"] == customer)
        .collect()
}

/// Customers c1..c100 spending 100 × i each, applied and ranked; the settled cut-offs.
fn hundred_ranked(world: &World, tierd: &Tierd) -> Cutoffs {
    let ends = world.produce_json(&spenders(1..=100, |i| i * 100));
    world.wait_applied(&ends, Duration::from_secs(60));
    wait_settled(world, tierd, 100)
}

/// `kill -9` of `tierd` once it has re-evaluated `n` customers (by its counter).
fn kill_after_reevaluating(tierd: &mut Tierd, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while tierd.metric("tierd_rank_reevaluated_total") < n {
        assert!(
            Instant::now() < deadline,
            "no re-ranking:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    tierd.kill9();
}

/// One purchase each of customers `c{i}` for `i` in `ids`, of `amount(i)` units, on 1 Nov.
fn spenders(
    ids: std::ops::RangeInclusive<i64>,
    amount: impl Fn(i64) -> i64,
) -> Vec<serde_json::Value> {
    ids.map(|i| {
        purchase(
            &format!("e{i}"),
            &format!("c{i}"),
            &amount(i).to_string(),
            "2026-11-01T10:00:00Z",
        )
    })
    .collect()
}

#[test]
fn overtaken_vip_moves_down_once_with_rank_shift() {
    let world = pyramid(2);
    let tierd = Tierd::spawn(&world, RANKS);
    tierd.wait_partitions(2, Duration::from_secs(60));
    let first = hundred_ranked(&world, &tierd);
    assert_eq!(
        first.values,
        vec![Some(1_000_000), Some(810_000), Some(510_000)],
        "top 1 / 20 / 50 of 100"
    );
    // The recompute that found them is timed (the cut-off duty runs on this instance).
    assert!(tierd.metric("tierd_rank_recompute_seconds_count") >= 1.0);
    assert_eq!(
        world.customer_state("c100").unwrap().tier.as_deref(),
        Some("vip")
    );
    assert_eq!(
        world.customer_state("c81").unwrap().tier.as_deref(),
        Some("key")
    );
    assert_eq!(
        world.customer_state("c80").unwrap().tier.as_deref(),
        Some("ordinary")
    );
    assert_eq!(
        world.customer_state("c50").unwrap().tier.as_deref(),
        Some("small")
    );

    // Two big spenders arrive: 102 customers, the top 1% is now 2 customers — both new.
    let more = world.produce_json(&[
        purchase("b1", "big1", "20000", "2026-11-02T10:00:00Z"),
        purchase("b2", "big2", "30000", "2026-11-02T11:00:00Z"),
    ]);
    world.wait_applied(&more, Duration::from_secs(60));
    let second = wait_settled(&world, &tierd, 102);
    assert!(second.version > first.version);
    let c100 = changes_of(&world, "c100");
    let downs: Vec<&serde_json::Value> = c100.iter().filter(|v| v["direction"] == "down").collect();
    assert_eq!(downs.len(), 1, "exactly one move down: {c100:?}");
    let down = downs[0];
    assert_eq!(
        (&down["previous_tier"], &down["tier"], &down["reason"]),
        (&"vip".into(), &"key".into(), &"rank_shift".into())
    );
    assert_eq!(down["cutoffs_version"], second.version);
    assert_eq!(down["cause"], serde_json::Value::Null, "nothing c100 did");
    assert_eq!(down["ranks"]["value"]["top"], "20%");
    assert_eq!(down["ranks"]["value"]["value"], "1000000");
    assert!(
        down["ranks"]["value"].get("position").is_none(),
        "positions are live (the API), not in change bodies: a replay could not reproduce them"
    );
    assert_eq!(
        world.customer_state("big2").unwrap().tier.as_deref(),
        Some("vip")
    );
    // The API shows the exact position and the cut-offs; /v1/tiers the sizes.
    let v: serde_json::Value = serde_json::from_str(&tierd.get("/v1/customers/c100").1).unwrap();
    assert_eq!(v["ranks"]["value"]["position"], 3);
    assert_eq!(v["ranks"]["value"]["population"], 102);
    assert_eq!(v["cutoffs_version"], second.version);
    // `tierd rules explain` shows the API's view of the customer, rank positions included.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tierd.toml");
    std::fs::write(&config, world.config(support::free_port(), RANKS)).unwrap();
    let (code, out, err) = support::tierd_cli(&[
        "rules",
        "explain",
        "c100",
        "--config",
        &config.display().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    for field in ["ranks", "tier", "partition", "cutoffs_version", "placed_by"] {
        assert_eq!(e[field], v[field], "{field}: explain {e} vs API {v}");
    }
    let t: serde_json::Value = serde_json::from_str(&tierd.get("/v1/tiers").1).unwrap();
    let sizes: Vec<i64> = t["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["customers"].as_i64().unwrap())
        .collect();
    assert_eq!(sizes, vec![2, 19, 30, 51], "{t}");
    assert_eq!(t["cutoffs"]["version"], second.version);
}

/// Reading the cut-offs in force fails for a while (tierd's Redis user loses HMGET on the
/// cut-offs hash; in production a timeout or a failover) while partition 0's owner keeps
/// recomputing them over an unchanged population: the computation waits for the next check,
/// and no new version is published. Before: a failed read was taken as "none stored" and the
/// same cut-offs were published again as a new version at every check, a switch for every
/// partition.
#[test]
fn a_failed_cut_offs_read_publishes_no_new_version() {
    let (redis, admin) = Redis::start_as_acl_user();
    let acl = |rules: &[&str]| support::acl(&admin, &[&["SETUSER", "tierd"], rules].concat());
    let mut world = World::start_with(1, redis);
    world.rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/pyramid.toml");
    let tierd = Tierd::spawn(&world, RANKS);
    tierd.wait_partitions(1, Duration::from_secs(60));
    let settled = hundred_ranked(&world, &tierd);

    // HMGET stays allowed on the partition's meta hash (an owner's quiet check) only.
    acl(&["-hmget", "(~*:meta +hmget)"]);
    // About ten recomputations due (every 300 ms, checked every 100 ms).
    std::thread::sleep(Duration::from_secs(3));
    acl(&["+hmget", "clearselectors"]);
    assert!(
        // redis-rs 1.x shows the reply's code `NOPERM` as `NoPerm`.
        tierd.log_text().contains("NoPerm"),
        "the reads were refused:\n{}",
        tierd.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    let now = world.cutoffs().unwrap();
    assert_eq!(
        now.version, settled.version,
        "no new version over the same population and values"
    );
    assert_eq!(now.values, settled.values);
}

#[test]
fn cutoffs_across_8_partitions_equal_a_full_sort() {
    let n: i64 = std::env::var("RANK_TEST_CUSTOMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    cutoffs_equal_a_full_sort(pyramid(8), n);
}

/// The same on a Redis Cluster (3 masters, 3 replicas), where the cut-offs are searched across
/// the nodes and verified per partition (`store::cutoffs::search_across_nodes`) while the
/// partitions commit: once the stream settles, every tier equals a full sort's.
#[test]
fn cutoffs_across_a_redis_clusters_nodes_equal_a_full_sort() {
    cutoffs_equal_a_full_sort(
        pyramid_on(World::start_with(8, Redis::start_cluster())),
        60_000,
    );
}

/// Customer `i`'s one purchase amount: many ties (20,000 distinct amounts).
fn amount(i: i64) -> i64 {
    (i * 7_919 + 13) % 20_000 + 1
}

/// One purchase each for `c0..c{n-1}` of [`amount`].
fn spread(n: i64) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            purchase(
                &format!("e{i}"),
                &format!("c{i}"),
                &amount(i).to_string(),
                "2026-11-01T10:00:00Z",
            )
        })
        .collect()
}

fn cutoffs_equal_a_full_sort(world: World, n: i64) {
    let tierd = Tierd::spawn(&world, RANKS);
    tierd.wait_partitions(i64::from(world.partitions), Duration::from_secs(60));
    let ends = world.produce_json(&spread(n));
    world.wait_applied(&ends, Duration::from_secs(600));
    assert_bands_equal_a_full_sort(&world, &tierd, n);
}

/// Once the cut-offs over `c0..c{n-1}` ([`spread`]) settle, every stored customer is in the
/// band a full sort of the amounts places them in.
fn assert_bands_equal_a_full_sort(world: &World, tierd: &Tierd, n: i64) {
    let cut = wait_settled(world, tierd, n as u64);

    // The full sort, ties to the higher band.
    let mut values: Vec<i64> = (0..n).map(|i| amount(i) * 100).collect();
    values.sort_unstable_by(|a, b| b.cmp(a));
    let kth = |pct: f64| values[((pct * n as f64).ceil() as usize).max(1) - 1];
    let bounds = [kth(0.01), kth(0.20), kth(0.50)];
    assert_eq!(
        cut.values,
        bounds
            .iter()
            .map(|&b| Some(i128::from(b)))
            .collect::<Vec<_>>()
    );
    let expected = |v: i64| {
        ["vip", "key", "ordinary", "small"][bounds.iter().position(|&b| v >= b).unwrap_or(3)]
    };

    let mut checked = 0;
    let mut sizes: HashMap<String, i64> = HashMap::new();
    for p in 0..world.partitions {
        for (id, s) in world.stored_customers(p) {
            let i: i64 = id.strip_prefix('c').unwrap().parse().unwrap();
            let want = expected(amount(i) * 100);
            assert_eq!(
                s.tier.as_deref(),
                Some(want),
                "customer c{i} with {}",
                amount(i)
            );
            // Customers no cut-off crossed keep the version of their last evaluation.
            assert!(s.cutoffs_version <= cut.version);
            *sizes.entry(want.to_owned()).or_default() += 1;
            checked += 1;
        }
    }
    assert_eq!(checked, n);
    // The API's exact rank positions (counted over every partition, on a cluster every node):
    // one more than the customers with strictly more.
    for i in (0..n).step_by((n / 25).max(1) as usize) {
        let (status, body) = tierd.get(&format!("/v1/customers/c{i}"));
        assert_eq!(status, 200, "c{i}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let above = values.partition_point(|&w| w > amount(i) * 100);
        assert_eq!(
            (
                v["ranks"]["value"]["position"].as_u64(),
                v["ranks"]["value"]["population"].as_u64()
            ),
            (Some(above as u64 + 1), Some(n as u64)),
            "c{i}: {body}"
        );
    }
    // Ties make bands hold at least their share, never less.
    assert!(sizes["vip"] >= n / 100, "{sizes:?}");
    let reevaluated = tierd.metric("tierd_rank_reevaluated_total");
    let repeated = tierd.metric("tierd_rank_cutoff_searches_repeated_total");
    let recomputes = tierd.metric("tierd_rank_recompute_seconds_count");
    let seconds = tierd.metric("tierd_rank_recompute_seconds_sum");
    eprintln!("{n} customers over {} partitions: cut-offs {:?}, sizes {sizes:?}, re-evaluated {reevaluated}; {recomputes} recomputes ({:.1} ms each on average, 3 cut-offs), searches repeated (verification failed, cluster) {repeated}", world.partitions, cut.values, 1000.0 * seconds / recomputes.max(1.0));
}

/// The pyramid on a Redis Cluster through a master failover that loses acknowledged writes,
/// while customers arrive and the cut-offs move: the partitions on the lost node are found
/// diverged and replayed (their rank sets and re-rankings with them), and once the stream
/// settles every customer is in the band a full sort places them in.
#[test]
fn rank_tiers_settle_exact_after_a_master_failover_on_a_cluster() {
    let world = pyramid_on(World::start_with(8, Redis::start_cluster()));
    let tierd = settled_through(&world, |meta| world.redis.fail_over_losing_writes(meta));
    tierd.assert_lost_writes_noticed();
}

/// The pyramid on a Redis Cluster while every slot of partition 0's master moves to another
/// master (`redis-cli --cluster reshard`) and customers arrive: partition 0's rank sets,
/// timers and outbox move key by key under tierd's commits and cut-off searches (`ASK`,
/// `TRYAGAIN`), and once the stream settles every customer is in the band a full sort
/// places them in.
#[test]
fn rank_tiers_settle_exact_through_a_slot_migration_on_a_cluster() {
    let world = pyramid_on(World::start_with(8, Redis::start_cluster()));
    let meta = world.keys(0).meta;
    let mut moved = None;
    settled_through(&world, |meta| {
        moved = Some(world.redis.move_every_slot_of(meta))
    });
    let moved = moved.unwrap();
    assert_eq!(
        world.redis.master_holding(&meta).port,
        moved.to,
        "partition 0's slot moved"
    );
}

/// 30,000 customers of the pyramid ([`spread`]) produced over ~10 s to 8 partitions on a
/// cluster, `fault` done to the node of partition 0's meta key (given) 3 s in, while events
/// flow; once applied, every band equals a full sort's ([`assert_bands_equal_a_full_sort`]).
fn settled_through(world: &World, fault: impl FnOnce(&str)) -> Tierd {
    let n = 30_000;
    let config = format!("{RANKS}[ingest]\nbatch_max_events = 200\n");
    let tierd = Tierd::spawn(world, &config);
    tierd.wait_partitions(8, Duration::from_secs(60));
    let events = spread(n);
    let meta = world.keys(0).meta;
    let ends = std::thread::scope(|s| {
        let producer = s.spawn(|| world.produce_paced(&events, 300));
        std::thread::sleep(Duration::from_secs(3));
        assert!(!producer.is_finished(), "the fault comes while events flow");
        fault(&meta);
        producer.join().unwrap()
    });
    world.wait_applied_by(&tierd, &ends, Duration::from_secs(300));
    assert_bands_equal_a_full_sort(world, &tierd, n);
    tierd
}

/// Three tierd instances in one group on a Redis Cluster: the cut-off duty goes with
/// partition 0. Its owner is killed (`kill -9`) while customers arrive; the instance the
/// group gives partition 0 to publishes the cut-offs from then on (the final ones, over
/// every customer, among them), every instance published only while it held partition 0,
/// and once the stream settles every customer is in the band a full sort places them in.
#[test]
fn the_cut_off_duty_follows_partition_0_across_instances_on_a_cluster() {
    let world = pyramid_on(World::start_with(8, Redis::start_cluster()));
    let n = 24_000;
    let config = format!("{RANKS}[ingest]\nbatch_max_events = 200\n");
    let first = Tierd::spawn(&world, &config);
    first.wait_partitions(8, Duration::from_secs(60));
    let mut group = vec![
        first,
        Tierd::spawn(&world, &config),
        Tierd::spawn(&world, &config),
    ];
    let assigned = |t: &Tierd| t.metric("tierd_partitions_assigned") as i64;
    let wait_balanced = |group: &[Tierd]| {
        let deadline = Instant::now() + Duration::from_secs(90);
        while group.iter().map(assigned).sum::<i64>() != 8
            || group.iter().any(|t| assigned(t) < 8 / group.len() as i64)
            || !group.iter().any(|t| owns(t, 0))
        {
            assert!(Instant::now() < deadline, "the group did not settle");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_balanced(&group);
    let events = spread(n);
    let (victim, ends) = std::thread::scope(|s| {
        let producer = s.spawn(|| world.produce_paced(&events, 500));
        let owner = group.iter().position(|t| owns(t, 0)).unwrap();
        // Its first cut-offs over some of the newcomers.
        let deadline = Instant::now() + Duration::from_secs(60);
        while world
            .cutoffs()
            .is_none_or(|c| c.population.first() == Some(&0))
        {
            assert!(Instant::now() < deadline, "no cut-offs over the newcomers");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut victim = group.remove(owner);
        victim.kill9();
        let population = world.cutoffs().unwrap().population[0];
        assert!(
            population < n as u64,
            "partition 0's owner died before every customer arrived ({population} ranked)"
        );
        wait_balanced(&group);
        (victim, producer.join().unwrap())
    });
    let successor = group.iter().find(|t| owns(t, 0)).unwrap();
    world.wait_applied_by(successor, &ends, Duration::from_secs(300));
    assert_bands_equal_a_full_sort(&world, successor, n);
    // The cut-offs over every customer came after the victim died: from the successor, after
    // it was given partition 0.
    let (_, since) = publications_holding_0(successor);
    assert!(
        since >= 1,
        "partition 0's new owner published no cut-offs:\n{}",
        successor.log_text()
    );
    for t in group.iter().chain([&victim]) {
        publications_holding_0(t);
    }
}

/// Checks that every cut-off publication in `tierd`'s log came while it held partition 0
/// (between its assignment and its release); returns how many there were, and how many
/// since its last assignment of partition 0.
fn publications_holding_0(tierd: &Tierd) -> (usize, usize) {
    let log = tierd.log_text();
    let (mut held, mut all, mut since) = (false, 0, 0);
    for line in log.lines() {
        if line.contains("Partition assigned. partition=0 ") {
            held = true;
            since = 0;
        } else if line.contains("Partition released. partition=0 ") {
            held = false;
        } else if line.contains("Rank cut-offs published.") {
            assert!(held, "published without partition 0: {line}\n{log}");
            all += 1;
            since += 1;
        }
    }
    (all, since)
}

#[test]
fn kill_9_during_a_re_ranking_loses_and_doubles_nothing() {
    let world = pyramid(4);
    let config = RANKS.replace("[ranks]\n", "[ranks]\nreevaluate_page = 10\n");
    let mut tierd = Tierd::spawn(&world, &config);
    tierd.wait_partitions(4, Duration::from_secs(60));
    let ends = world.produce_json(&spenders(1..=4000, |i| i));
    world.wait_applied(&ends, Duration::from_secs(120));
    wait_settled(&world, &tierd, 4000);
    // 2000 newcomers above everyone: every cut-off jumps, thousands of customers cross.
    let before = tierd.metric("tierd_rank_reevaluated_total");
    let second: Vec<serde_json::Value> = (4001..=6000)
        .map(|i| {
            purchase(
                &format!("e{i}"),
                &format!("c{i}"),
                &(i + 10_000).to_string(),
                "2026-11-02T10:00:00Z",
            )
        })
        .collect();
    let ends = world.produce_json(&second);
    kill_after_reevaluating(&mut tierd, before + 300.0);
    let tierd = Tierd::spawn(&world, &config);
    world.wait_applied(&ends, Duration::from_secs(120));
    let cut = wait_settled(&world, &tierd, 6000);

    let value = |i: i64| if i <= 4000 { i } else { i + 10_000 } * 100;
    assert_pyramid_exact(&world, &cut, 6000, value);
}

/// Issue 11, item 8: the first cut-offs over an existing population re-evaluate half of it.
/// The pass pages by (value, customer) cursor and stores its progress with each page, so an
/// owner killed in the middle is followed by one that resumes there — it re-evaluates only
/// what was left (before: everything again, after listing every crosser with offset paging).
#[test]
fn a_re_ranking_resumes_where_a_killed_owner_stopped() {
    let world = pyramid(1);
    // No recomputation by interval, and by population only when it more than doubles (the
    // first check, at start, sees none of it yet; the next one all of it); small pages.
    let config = "[ranks]\nrecompute_interval_ms = 86400000\nrecompute_population_change = 1.0\ncheck_interval_ms = 8000\nreevaluate_page = 2\n[clock]\nmode = \"event\"\nlateness_s = 0\n";
    let n = 3000i64;
    let ends = world.produce_json(&spenders(1..=n, |i| i));
    let mut tierd = Tierd::spawn(&world, config);
    world.wait_applied(&ends, Duration::from_secs(120));
    // The top 50% cross the first cut-offs: 1,500 re-evaluations in pages of 2.
    kill_after_reevaluating(&mut tierd, 300.0);
    let progress: String = redis::cmd("HGET")
        .arg(world.keys(0).meta)
        .arg("rerank")
        .query(&mut world.redis.conn())
        .unwrap();
    let progress: serde_json::Value = serde_json::from_str(&progress).unwrap();

    let tierd = Tierd::spawn(&world, config);
    let cut = wait_settled(&world, &tierd, n as u64);
    assert_eq!(
        progress["version"], cut.version,
        "the same cut-offs: nothing to recompute"
    );
    let again = tierd.metric("tierd_rank_reevaluated_total");
    assert!(
        again <= 1500.0 - 300.0 + 2.0,
        "the new owner re-evaluated {again} of 1500: it started again instead of resuming"
    );
    assert!(tierd.log_text().contains("Resuming the re-ranking"));
    assert_pyramid_exact(&world, &cut, n, |i| i * 100);
    let left: Option<String> = redis::cmd("HGET")
        .arg(world.keys(0).meta)
        .arg("rerank")
        .query(&mut world.redis.conn())
        .unwrap();
    assert_eq!(left, None, "the finished pass removes its progress");
}

/// Every customer `c1..=cn` (ranked value `value(i)`) is in the tier a full sort gives under
/// the settled cut-offs `cut`, and their changes are on the output topic once each, in order
/// on every record, none missing.
fn assert_pyramid_exact(world: &World, cut: &Cutoffs, n: i64, value: impl Fn(i64) -> i64) {
    let mut values: Vec<i64> = (1..=n).map(&value).collect();
    values.sort_unstable_by(|a, b| b.cmp(a));
    let bounds = [0.01, 0.2, 0.5].map(|p: f64| values[((p * n as f64).ceil() as usize) - 1]);
    assert_eq!(
        cut.values,
        bounds
            .iter()
            .map(|&b| Some(i128::from(b)))
            .collect::<Vec<_>>()
    );
    let mut published: HashMap<String, serde_json::Value> = HashMap::new();
    let mut per_customer: HashMap<String, Vec<u64>> = HashMap::new();
    // Read as a consumer reads (each customer's changes are on one partition, in offset
    // order): never a change twice, never a sequence going backwards.
    for r in world.read_all(&world.output) {
        let v = r.json();
        let id = v["event_id"].as_str().unwrap().to_owned();
        assert!(
            published.insert(id, v.clone()).is_none(),
            "published twice: {v}"
        );
        let seqs = per_customer
            .entry(v["customer_id"].as_str().unwrap().to_owned())
            .or_default();
        let seq = v["sequence"].as_u64().unwrap();
        assert!(
            seqs.last().is_none_or(|l| *l < seq),
            "{}: {seq} after {seqs:?}",
            v["customer_id"]
        );
        seqs.push(seq);
    }
    for i in 1..=n {
        let c = format!("c{i}");
        let s = world.customer_state(&c).unwrap();
        let want = ["vip", "key", "ordinary", "small"]
            [bounds.iter().position(|&b| value(i) >= b).unwrap_or(3)];
        assert_eq!(s.tier.as_deref(), Some(want), "{c}");
        let seqs = per_customer.remove(&c).unwrap_or_default();
        assert_eq!(
            seqs,
            (1..=s.seq).collect::<Vec<_>>(),
            "{c}: every change published once, none missing"
        );
    }
}

/// A whale whose lifetime spend would pass 2^53 minor units: the purchase that would take it
/// there is dead-lettered (`amount_out_of_range`, naming the total), the whale stays ranked
/// exactly at the total below the bound, and the cut-off search over that value ends (Redis
/// keeps answering). Before the bound, the purchase was counted: a sorted-set score above 2^53
/// is not a whole number any more, and the search could bisect forever, blocking Redis.
#[test]
fn a_lifetime_total_beyond_2_pow_53_is_refused_and_ranks_stay_exact() {
    let world = pyramid(2);
    let tierd = Tierd::spawn(
        &world,
        &format!("{RANKS}[money]\nmax_amount = \"10000000000000\"\n"),
    );
    tierd.wait_partitions(2, Duration::from_secs(60));
    let mut events = Vec::new();
    for i in 0..20 {
        events.push(purchase(
            &format!("e{i}"),
            &format!("c{i}"),
            &format!("{}", i + 1),
            &format!("2026-05-01T10:{i:02}:00Z"),
        ));
    }
    // Ten purchases of 10^15 minor units (the largest single amount): nine reach 9 * 10^15,
    // below 2^53 - 1 = 9,007,199,254,740,991; the tenth would pass it.
    for j in 0..10 {
        events.push(purchase(
            &format!("w{j}"),
            "whale",
            "10000000000000",
            &format!("2026-05-02T10:{j:02}:00Z"),
        ));
    }
    let ends = world.produce_json(&events);
    world.wait_applied(&ends, Duration::from_secs(60));

    let dead: Vec<_> = world.read_all(&world.dlq);
    assert_eq!(
        dead.len(),
        1,
        "{:?}",
        dead.iter().map(|r| &r.headers).collect::<Vec<_>>()
    );
    assert_eq!(dead[0].headers["tierd.reason"], "amount_out_of_range");
    let detail = &dead[0].headers["tierd.detail"];
    assert!(
        detail.contains("lifetime purchases would reach 10000000000000000 minor units"),
        "{detail}"
    );
    assert_eq!(dead[0].json()["event_id"], "w9");
    let whale = world.customer_state("whale").unwrap();
    assert_eq!((whale.count, whale.sum), (9, 9_000_000_000_000_000));

    // The top 1% of 21 customers is the whale alone, at its exact value; every partition
    // applies those cut-offs and the whale is the VIP.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let settled = world.cutoffs().filter(|c| {
            c.values.first() == Some(&Some(9_000_000_000_000_000))
                && (0..2).all(|p| world.applied_cutoffs_version(p) >= c.version)
        });
        if settled.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cut-offs never settled on the whale's exact value: {:?}\n{}",
            world.cutoffs(),
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    world.wait_applied(&std::collections::BTreeMap::new(), Duration::from_secs(60));
    assert_eq!(
        world.customer_state("whale").unwrap().tier.as_deref(),
        Some("vip")
    );
    let pong: String = redis::cmd("PING").query(&mut world.redis.conn()).unwrap();
    assert_eq!(pong, "PONG");
}

/// Issue 11, item 7: a customer erased (by an `erase` event, or by hand with tierd stopped,
/// leaving their rank entries behind) is not brought back when moved cut-offs re-evaluate the
/// range their old value lies in, and leaves the population.
#[test]
fn re_ranking_never_resurrects_an_erased_customer() {
    let world = pyramid(2);
    let mut tierd = Tierd::spawn(&world, RANKS);
    tierd.wait_partitions(2, Duration::from_secs(60));
    hundred_ranked(&world, &tierd);

    // c100 (the VIP) is erased by an event: population 99, c99 is the new VIP.
    let erase = serde_json::json!({"event_id": "x100", "customer_id": "c100", "type": "erase", "occurred_at": "2026-11-02T00:00:00Z"});
    let ends = world.produce_json(&[erase]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let after_erase = wait_settled(&world, &tierd, 99);
    assert_eq!(after_erase.values.first(), Some(&Some(990_000)));
    assert_eq!(
        world.customer_state("c99").unwrap().tier.as_deref(),
        Some("vip")
    );
    let sizes = |tierd: &Tierd| -> Vec<i64> {
        let t: serde_json::Value = serde_json::from_str(&tierd.get("/v1/tiers").1).unwrap();
        t["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["customers"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(
        sizes(&tierd).iter().sum::<i64>(),
        99,
        "c100 left the tier counts"
    );

    // c99 is erased by hand while tierd is stopped: the state key goes, the rank entries stay.
    assert_eq!(tierd.terminate(), Some(0));
    for p in 0..2 {
        let _: () = redis::cmd("DEL")
            .arg(world.keys(p).customer("c99"))
            .query(&mut world.redis.conn())
            .unwrap();
    }
    let tierd = Tierd::spawn(&world, RANKS);
    tierd.wait_partitions(2, Duration::from_secs(60));

    // Two big spenders: the VIP cut-off moves from c99's old value (top 1% of 101 is 2
    // customers: 2,000,000), a range holding c99's leftover entry. It is dropped, not
    // re-evaluated into a new customer; then the top 1% of 100 is big2 alone.
    let more = world.produce_json(&[
        purchase("b1", "big1", "20000", "2026-11-03T10:00:00Z"),
        purchase("b2", "big2", "30000", "2026-11-03T11:00:00Z"),
    ]);
    world.wait_applied(&more, Duration::from_secs(60));
    // Once every partition applied cut-offs that moved past c99's old value...
    let deadline = Instant::now() + Duration::from_secs(120);
    while !world.cutoffs().is_some_and(|c| {
        c.values.first().is_some_and(|v| *v >= Some(2_000_000))
            && (0..2).all(|p| world.applied_cutoffs_version(p) >= c.version)
    }) {
        assert!(Instant::now() < deadline, "{}", tierd.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        world.customer_state("c99").is_none(),
        "c99 was brought back: {:?}",
        world.customer_state("c99")
    );
    // ...and the population settles without them.
    let settled = wait_settled(&world, &tierd, 100);
    assert_eq!(
        settled.values.first(),
        Some(&Some(3_000_000)),
        "top 1% of c1..c98, big1, big2"
    );
    for gone in ["c99", "c100"] {
        assert!(
            world.customer_state(gone).is_none(),
            "{gone} was brought back: {:?}",
            world.customer_state(gone)
        );
        let records = world.read_all(&world.output);
        let mut mine: Vec<&support::Record> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(gone.as_bytes()))
            .collect();
        mine.sort_by_key(|r| (r.partition, r.offset));
        let initial = mine
            .iter()
            .filter(|r| !r.value.is_empty() && r.json()["direction"] == "initial")
            .count();
        assert_eq!(initial, 1, "{gone}: placed once, never again");
    }
    let records = world.read_all(&world.output);
    let last_c100 = records
        .iter()
        .filter(|r| r.key.as_deref() == Some(b"c100".as_slice()))
        .max_by_key(|r| r.offset)
        .unwrap();
    assert!(
        last_c100.value.is_empty(),
        "c100's last record is its tombstone"
    );
    let population: u64 = redis::cmd("ZCARD")
        .arg(world.keys(0).rank("value"))
        .query::<u64>(&mut world.redis.conn())
        .unwrap()
        + redis::cmd("ZCARD")
            .arg(world.keys(1).rank("value"))
            .query::<u64>(&mut world.redis.conn())
            .unwrap();
    assert_eq!(population, 100, "c99's leftover entry is gone");
}

/// Issue 11, item 9: Redis loses writes under rank rules (wall clock, the default) after
/// several cut-offs moves were published; the replay applies each published move at the same
/// input offset and engine time, so every change published again carries the same body.
#[test]
fn a_redis_rollback_republishes_rank_changes_identically() {
    let tierd = rollback_over_cutoff_moves(&pyramid(2), "", 5);
    assert!(
        tierd.metric("tierd_cutoffs_replayed_total") >= 2.0,
        "published switches were replayed:\n{}",
        tierd.log_text()
    );
}

/// `publish.position_metadata_bytes`, raised with the brokers' `offset.metadata.max.bytes`,
/// reaches further back: a rollback over 30 cut-off moves — twice what the default keeps —
/// re-publishes every change id with its body (with the default budget the oldest moves are
/// forgotten, logged as an error at the claim, and changes come back with other bodies).
#[test]
fn a_larger_position_budget_replays_thirty_cut_off_moves_identically() {
    let mut world = World::start_on(
        2,
        Redis::start(),
        Broker::start_with("offset.metadata.max.bytes=20000\n", &[]),
    );
    world.rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/pyramid.toml");
    let tierd =
        rollback_over_cutoff_moves(&world, "[publish]\nposition_metadata_bytes = 19000\n", 30);
    let log = tierd.log_text();
    assert!(!log.contains("Redis lost writes further back"), "{log}");
    assert!(
        tierd.metric("tierd_cutoffs_replayed_total") >= 30.0,
        "{log}"
    );
}

/// Issue 11, item 9, beyond the offset metadata: with the smallest position budget (about
/// five moves of the pyramid) a rollback over twelve cut-off moves still re-publishes every
/// change id with its body — the claim reads the moves the metadata dropped from the history
/// topic (`kafka.history_topic`). Without it the oldest moves were forgotten (an error at the
/// claim) and changes came back with other bodies.
#[test]
fn a_rollback_beyond_the_positions_metadata_replays_the_moves_from_the_history_topic() {
    // Both input partitions' records share the history topic's one partition (told apart
    // by their key).
    let mut world = pyramid(2);
    world.history = support::unique("history-shared");
    world.broker.create_topics(&[&world.history], 1);
    let tierd =
        rollback_over_cutoff_moves(&world, "[publish]\nposition_metadata_bytes = 1000\n", 12);
    let log = tierd.log_text();
    assert!(!log.contains("Redis lost writes further back"), "{log}");
    assert!(
        log.contains("Read the partition's replay history from the history topic"),
        "{log}"
    );
    assert!(
        tierd.metric("tierd_cutoffs_replayed_total") >= 12.0,
        "{log}"
    );
}

/// A history topic that refuses the partition's history record for good (here: a message
/// size limit below it) holds the outbox at the round that needs it — no change decided under
/// a cut-off move goes out without its history — and says so (`/readyz/ingest`,
/// `tierd_outbox_blocked`) instead of retrying unseen; once the topic takes it, everything
/// flows and the record is there.
#[test]
fn a_history_topic_that_refuses_the_record_holds_the_outbox_visibly() {
    let world = pyramid(1);
    world
        .broker
        .alter_topic_config(&world.history, "max.message.bytes", "100");
    let tierd = Tierd::spawn_with(
        &world,
        "",
        &format!("{RANKS}[kafka.producer]\n\"compression.type\" = \"none\"\n[publish]\nparked_retry_ms = 300\n"),
    );
    tierd.wait_partitions(1, Duration::from_secs(60));
    let ends = world.produce_json(&spenders(1..=20, |i| i * 100));
    let deadline = Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_blocked") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the outbox was never reported blocked:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, body) = tierd.get("/readyz/ingest");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("kafka.history_topic"), "{body}");
    assert!(world.outbox_len(0) > 0, "the outbox holds");

    world
        .broker
        .alter_topic_config(&world.history, "max.message.bytes", "1048588");
    world.wait_applied(&ends, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_blocked") > 0.0 || tierd.get("/readyz/ingest").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the outbox never flowed again:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!world.read_all(&world.history).is_empty());
    wait_settled(&world, &tierd, 20);
}

/// 100 ranked customers, then, with Redis snapshotted, `waves` waves of newcomers that each
/// move the cut-offs; Redis is rolled back to the snapshot and the replay must re-publish
/// every change id with the body it first had. Returns the running tierd.
fn rollback_over_cutoff_moves(world: &World, extra: &str, waves: i64) -> Tierd {
    let config = format!("[ranks]\nrecompute_interval_ms = 200\ncheck_interval_ms = 50\n{extra}");
    let tierd = Tierd::spawn(world, &config);
    tierd.wait_partitions(2, Duration::from_secs(60));
    let ends = world.produce_json(&spenders(1..=100, |i| i * 100));
    world.wait_applied(&ends, Duration::from_secs(60));
    wait_settled(world, &tierd, 100);
    let before = world.snapshot();

    // Waves of newcomers, each above everyone so far: every wave moves the cut-offs
    // (a switch per partition, `rank_shift` moves) and places its newcomers with them.
    for wave in 0..waves {
        let events: Vec<serde_json::Value> = (0..20)
            .map(|j| {
                let i = 1000 + wave * 20 + j;
                purchase(
                    &format!("w{i}"),
                    &format!("n{i}"),
                    &(20_000 + i * 10).to_string(),
                    "2026-11-02T10:00:00Z",
                )
            })
            .collect();
        let ends = world.produce_json(&events);
        world.wait_applied(&ends, Duration::from_secs(60));
        wait_settled(world, &tierd, 100 + 20 * (wave as u64 + 1));
    }
    let first_run: HashMap<String, serde_json::Value> = world
        .read_all(&world.output)
        .iter()
        .map(|r| {
            let v = r.json();
            (v["event_id"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    let shifts = first_run
        .values()
        .filter(|v| v["reason"] == "rank_shift")
        .count();
    assert!(shifts > 0, "the waves moved customers by rank");

    // Redis loses everything the waves wrote, and no more input comes: the partitions find
    // out on their own, and the last wave's moves (at the end of their input) apply too.
    world.restore(&before);
    wait_settled(world, &tierd, 100 + 20 * waves as u64);
    assert!(
        tierd.log_text().contains("Redis diverged"),
        "the divergence was detected"
    );

    // Every change id carries one body, however often it was published.
    let records = world.read_all(&world.output);
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    let mut republished = 0;
    for r in &records {
        let v = r.json();
        let id = v["event_id"].as_str().unwrap().to_owned();
        if let Some(first) = by_id.get(&id) {
            republished += 1;
            if first != &v {
                let log: Vec<String> = tierd
                    .log_text()
                    .lines()
                    .filter(|l| {
                        l.contains("cut-offs")
                            || l.contains("Replaying")
                            || l.contains("diverged")
                            || l.contains("claimed")
                            || l.contains("Resuming")
                    })
                    .map(String::from)
                    .collect();
                panic!(
                    "change {id} published again with another body:\n{first}\n{v}\n{}",
                    log.join("\n")
                );
            }
        } else {
            by_id.insert(id, v);
        }
    }
    let mut copies: HashMap<String, usize> = HashMap::new();
    for r in &records {
        let id = r.json()["event_id"].as_str().unwrap().to_owned();
        *copies.entry(id).or_default() += 1;
    }
    let republished_shifts = first_run
        .iter()
        .filter(|(id, v)| v["reason"] == "rank_shift" && copies[id.as_str()] > 1)
        .count();
    assert!(
        republished > 0 && republished_shifts > 0,
        "the rollback made tierd publish changes again ({republished}, {republished_shifts} by rank)"
    );
    for (id, v) in &first_run {
        assert_eq!(by_id.get(id), Some(v), "{id} still published");
    }
    tierd
}

/// Whether `tierd`'s log shows it holding `partition` now (assigned more often than released).
fn owns(tierd: &Tierd, partition: i32) -> bool {
    let log = tierd.log_text();
    let count = |what: &str| {
        log.matches(&format!("{what} partition={partition} "))
            .count()
    };
    count("Partition assigned.") > count("Partition released.")
}

/// Issue 11, item 9: the owner of partition 1 dies in the middle of a re-ranking pass, before
/// the pass's switch was published, and partition 0's owner (another instance) publishes
/// newer cut-offs meanwhile. The next owner must finish the pass with the cut-offs it moves
/// to (stored with its progress) before anything else, as it first ran (one step at its
/// input offset), and only then move to the newer ones. A replay applies the recorded
/// switches whole: taking the newest at once decided the rest of the pass's customers under
/// other cut-offs than the replay does. After Redis loses everything, every change id is
/// published again with the same body.
#[test]
fn a_re_ranking_pass_taken_over_is_finished_with_its_own_cut_offs() {
    let world = pyramid(2);
    // 10,000 customers on partition 1 (re-ranked a page of one at a time) and up to 1,000
    // newcomers on partition 0, found by the partitioner.
    let [zero, one]: [Vec<String>; 2] = world
        .customers_per_partition("c", &[1_000, 10_000])
        .try_into()
        .unwrap();
    let buy = |prefix: &str, customers: &[String], amount: &dyn Fn(i64) -> i64| {
        customers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let i = i as i64;
                let at = "2026-11-01T10:00:00Z";
                purchase(&format!("{prefix}{i}"), c, &amount(i).to_string(), at)
            })
            .collect::<Vec<_>>()
    };
    let config = "[ranks]\nrecompute_interval_ms = 1000\ncheck_interval_ms = 500\nreevaluate_page = 1\n[clock]\nmode = \"event\"\nlateness_s = 0\n";
    let a = Tierd::spawn(&world, config);
    a.wait_partitions(2, Duration::from_secs(60));
    let b = Tierd::spawn(&world, config);
    b.wait_partitions(1, Duration::from_secs(60));
    a.wait_partitions(1, Duration::from_secs(60));
    let (mut victim, survivor) = if owns(&a, 1) { (a, b) } else { (b, a) };
    assert!(owns(&victim, 1) && owns(&survivor, 0), "one partition each");
    // Redis will lose everything from here on.
    let before = world.snapshot();

    let mut ends = world.produce_json(&buy("e", &one, &|i| 2 * i + 2));
    // Partition 1's owner is frozen as soon as a pass has committed its first page (the
    // page's commit holds the switch; its publishing takes a Kafka transaction, longer).
    let progress = |world: &World| -> Option<u64> {
        let json: Option<String> = redis::cmd("HGET")
            .arg(world.keys(1).meta)
            .arg("rerank")
            .query(&mut world.redis.conn())
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json?).unwrap();
        v["version"].as_u64()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let pass = loop {
        assert!(Instant::now() < deadline, "no pass:\n{}", victim.log_text());
        if progress(&world).is_some() {
            victim.signal("-STOP");
            if let Some(version) = progress(&world) {
                break version;
            }
            victim.signal("-CONT");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    // Partition 0's newcomers: its owner publishes newer cut-offs.
    ends.extend(world.produce_json(&buy("f", &zero, &|i| 2 * i + 1)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.cutoffs().is_none_or(|c| c.version <= pass) {
        assert!(
            Instant::now() < deadline,
            "no newer cut-offs:\n{}",
            survivor.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    victim.kill9();
    survivor.wait_partitions(2, Duration::from_secs(60));
    let population = (zero.len() + one.len()) as u64;
    world.wait_applied(&ends, Duration::from_secs(120));
    wait_settled(&world, &survivor, population);
    assert!(
        !survivor.log_text().contains(&format!(
            "they applied at before. partition=1 version={pass} "
        )),
        "the pass's switch was published before its owner froze (timing): nothing tested"
    );
    let everyone: Vec<&String> = zero.iter().chain(&one).collect();
    let states =
        |world: &World| -> Vec<_> { everyone.iter().map(|c| world.customer_state(c)).collect() };
    let live = states(&world);
    let published = world.read_all(&world.output).len();

    // Redis loses everything; the replay applies the recorded switches at their offsets.
    let claims = survivor
        .log_text()
        .matches("Partition claimed again")
        .count();
    world.restore(&before);
    let deadline = Instant::now() + Duration::from_secs(60);
    while survivor
        .log_text()
        .matches("Partition claimed again")
        .count()
        < claims + 2
    {
        assert!(
            Instant::now() < deadline,
            "not claimed again:\n{}",
            survivor.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    world.wait_applied(&ends, Duration::from_secs(120));
    wait_settled(&world, &survivor, population);
    for (c, (replayed, live)) in everyone.iter().zip(states(&world).iter().zip(&live)) {
        assert_eq!(replayed, live, "{c}: the replay ends in the live state");
    }
    let records = world.assert_one_body_per_change_id();
    assert!(records.len() > published, "changes were published again");
}
