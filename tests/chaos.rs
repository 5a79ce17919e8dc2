//! The chaos run (issue 11): three tierd instances in one group over eight partitions of a
//! replicated three-node Apache Kafka cluster, a Redis with `appendfsync everysec`, a purchase
//! stream with re-sent duplicates and out-of-order events — and, while it flows, `kill -9` of
//! an instance every few seconds (restarted at once), a SIGSTOP past the session timeout (a
//! zombie, then resumed), the kill of an input partition's leader broker, and a crash of Redis
//! that loses its last acknowledged writes (as a power loss does under `appendfsync everysec`:
//! the unsynced tail of its append-only file is gone; a killed process alone loses nothing).
//! After the first round the faults come round again.
//!
//! At the end every customer's state equals the pure engine's reference, every expected tier
//! change is on the output topic, each customer's changes are in order on every record a
//! read_committed consumer reads, and a change read twice is the byte-identical record (Redis
//! lost a window that was already published, and it was replayed).
//!
//! The same chaos runs under the pyramid (rank tiers, wall clock): there the published changes
//! depend on when cut-offs moved, so the check is that every customer's metrics equal the
//! reference, every tier equals a full sort of the final values, every change is published in
//! order on every record, and a change read twice is the byte-identical record (a replay after
//! the Redis loss applies the recorded cut-off moves again).
//!
//! Bounded for CI by default; the long mode is documented in `docs/reliability.md`:
//! `CHAOS_EVENTS=1000000 CHAOS_CUSTOMERS=100000 CHAOS_RATE=5000 cargo test --release --test chaos -- --nocapture`
//! (`cargo test`: no per-test timeout; nextest stops it after 20 minutes).

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::exact::{
    assert_exact_with, b2b_rules, event_clock_reference, reference, stream, Duplicates, Order,
};
use support::{Broker, Redis, Tierd, World};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the chaos does next, in turn with instance kills.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Zombie,
    BrokerLeader,
    RedisLoss,
}

/// The instances, the faults done (one line each) and every instance's log, after the chaos
/// over `events` and the group settled again with every event applied.
struct Run {
    /// Kept running until the run is dropped (the checks may need them, e.g. to settle ranks).
    _instances: Vec<Tierd>,
    log: Vec<String>,
    logs: String,
    started: Instant,
    /// The events produced.
    events: Vec<serde_json::Value>,
    /// When their production began (wall clock, ms).
    production_start: i64,
}

fn owned(instances: &[Tierd]) -> i64 {
    instances
        .iter()
        .map(|t| t.metric("tierd_partitions_assigned") as i64)
        .sum()
}

/// Three instances with config `extra` take the 8 partitions; `events` are produced at `rate`
/// while the faults come round (a Redis crash loses up to `redis_loss` bytes of its AOF);
/// then everything is applied and published.
fn chaos(
    world: &World,
    extra: &str,
    events: &[serde_json::Value],
    rate: usize,
    redis_loss: u64,
) -> Run {
    chaos_from(world, extra, |_| events.to_vec(), rate, redis_loss)
}

/// [`chaos`] over the events `events` returns given the wall-clock moment (ms) their
/// production begins, once the group has settled.
fn chaos_from(
    world: &World,
    extra: &str,
    events: impl FnOnce(i64) -> Vec<serde_json::Value>,
    rate: usize,
    redis_loss: u64,
) -> Run {
    let mut instances: Vec<Tierd> = (0..3).map(|_| Tierd::spawn(world, extra)).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while owned(&instances) != 8 {
        assert!(Instant::now() < deadline, "the group never settled");
        std::thread::sleep(Duration::from_millis(200));
    }
    let production_start = tierd::model::time::now_ms();
    let events = events(production_start);
    let n = events.len();

    let produced = AtomicUsize::new(0);
    // The logs of killed instances (each instance's log dies with it).
    let mut logs = String::new();
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let (ends, log) = std::thread::scope(|s| {
        let producer = s.spawn(|| {
            let mut ends = BTreeMap::new();
            let chunk = rate.max(100) / 2;
            for part in events.chunks(chunk) {
                for (p, e) in world.produce_json(part) {
                    ends.insert(p, e);
                }
                produced.fetch_add(part.len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(500));
            }
            done.store(true, Ordering::Relaxed);
            ends
        });
        let mut rng = StdRng::seed_from_u64(7);
        let mut faults = [Fault::Zombie, Fault::BrokerLeader, Fault::RedisLoss]
            .into_iter()
            .cycle();
        let mut log: Vec<String> = Vec::new();
        let mut step = 0u32;
        // Faults begin once the stream flows.
        while produced.load(Ordering::Relaxed) < n / 20 {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Faults while the stream flows; at least one of each, and instance kills in between.
        while !done.load(Ordering::Relaxed) || step < 6 {
            std::thread::sleep(Duration::from_millis(rng.random_range(2_000..4_000)));
            let at = format!(
                "{:>5.1} s, {} produced",
                started.elapsed().as_secs_f64(),
                produced.load(Ordering::Relaxed)
            );
            step += 1;
            let fault = if step.is_multiple_of(2) {
                faults.next()
            } else {
                None
            };
            match fault {
                None => {
                    let i = rng.random_range(0..instances.len());
                    instances[i].kill9();
                    logs.push_str(&instances[i].log_text());
                    instances[i] = Tierd::spawn(world, extra);
                    log.push(format!("{at}: kill -9 of instance {i}, restarted at once"));
                }
                Some(Fault::Zombie) => {
                    let i = rng.random_range(0..instances.len());
                    instances[i].signal("-STOP");
                    // Past the tests' 6 s session timeout: the group moves its partitions.
                    std::thread::sleep(Duration::from_secs(10));
                    instances[i].signal("-CONT");
                    log.push(format!(
                        "{at}: instance {i} stopped (SIGSTOP) for 10 s, resumed"
                    ));
                }
                Some(Fault::BrokerLeader) => {
                    let leader = world.broker.leader(&world.input, 0);
                    world.broker.kill_node(leader);
                    let moved = world.broker.wait_leader_other_than(&world.input, 0, leader);
                    std::thread::sleep(Duration::from_secs(1));
                    world.broker.start_node(leader);
                    world.broker.wait_full_isr(&[&world.input, &world.output]);
                    log.push(format!(
                        "{at}: broker {leader} (leader of input partition 0) killed; leader now {moved}; restarted"
                    ));
                }
                Some(Fault::RedisLoss) => {
                    let cut = world.redis.crash_losing_tail(redis_loss);
                    log.push(format!(
                        "{at}: redis crashed losing the last {cut} bytes of its append-only file (unsynced under appendfsync everysec), restarted"
                    ));
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(1_800),
                "the chaos run did not finish"
            );
        }
        (producer.join().unwrap(), log)
    });
    for line in &log {
        eprintln!("{line}");
    }
    // The killed instances' logs, kept should the checks below fail (the running instances
    // keep their own on failure).
    let killed =
        std::env::temp_dir().join(format!("tierd-chaos-killed-{}.log", std::process::id()));
    std::fs::write(&killed, &logs).unwrap();
    eprintln!("the killed instances' logs: {}", killed.display());
    world.wait_applied(&ends, Duration::from_secs(600));
    // Settled: every partition owned and none stopped, for 5 s on end. An owner learns that a
    // Redis crash restored an older claim only at its next write (its publisher's, seconds
    // after the last commit); it then stops the partition and claims it again 3 s later.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut settled: Option<Instant> = None;
    loop {
        let stopped: f64 = instances
            .iter()
            .map(|t| t.metric("tierd_partitions_stopped"))
            .sum();
        if owned(&instances) != 8 || stopped != 0.0 {
            settled = None;
        } else if settled.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(5) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group did not settle after the chaos: {}",
            instances
                .iter()
                .enumerate()
                .map(|(i, t)| format!(
                    "instance {i} assigned {} stopped {}, /readyz {:?}",
                    t.metric("tierd_partitions_assigned"),
                    t.metric("tierd_partitions_stopped"),
                    t.get("/readyz/ingest")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for t in &instances {
        logs.push_str(&t.log_text());
    }
    let saved = std::env::temp_dir().join(format!("tierd-chaos-{}.log", std::process::id()));
    std::fs::write(&saved, &logs).unwrap();
    eprintln!("the instances' logs: {}", saved.display());
    Run {
        _instances: instances,
        log,
        logs,
        started,
        events,
        production_start,
    }
}

#[test]
fn chaos_run_loses_nothing_counts_everything_once_and_keeps_order() {
    let n = env_or("CHAOS_EVENTS", 30_000);
    let customers = env_or("CHAOS_CUSTOMERS", 3_000) as u32;
    let rate = env_or("CHAOS_RATE", 1_000);
    let world = World::start_on(8, Redis::start_everysec(), Broker::cluster(3));
    let events = stream(n, customers, 2026);
    let (expected_states, expected_changes) = reference(&events, &b2b_rules());
    // One bad purchase in every 100 events: each must reach the dead-letter topic, whatever
    // the faults (a Redis crash brings back letters it had parked, or published).
    let mut input = Vec::with_capacity(events.len() + events.len() / 100);
    let mut bad = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if i % 100 == 50 {
            let mut b = e.clone();
            b["event_id"] = format!("bad{i}").into();
            b["amount"] = "not money".into();
            bad.push(serde_json::to_vec(&b).unwrap());
            input.push(b);
        }
        input.push(e.clone());
    }
    eprintln!(
        "{} events (with re-sent duplicates) over {} customers; {} expected changes; {} bad",
        events.len(),
        expected_states.len(),
        expected_changes.values().map(Vec::len).sum::<usize>(),
        bad.len()
    );
    let run = chaos(
        &world,
        "[ingest]\nbatch_max_events = 500\n",
        &input,
        rate,
        64 * 1024,
    );
    assert_exact_with(
        &world,
        &expected_states,
        &expected_changes,
        Duplicates::IdenticalOnly,
    );
    // Every bad purchase dead-lettered, nothing else; a letter repeated is byte-identical
    // (value and headers: its reason and source position).
    let mut letters: HashMap<Vec<u8>, BTreeMap<String, String>> = HashMap::new();
    let mut repeated = 0;
    for l in support::read_all(&world.broker.addr, &world.dlq, 8) {
        assert!(
            bad.contains(&l.value),
            "an unexpected dead letter: {}",
            String::from_utf8_lossy(&l.value)
        );
        if let Some(first) = letters.insert(l.value.clone(), l.headers.clone()) {
            assert_eq!(first, l.headers, "a repeated dead letter is identical");
            repeated += 1;
        }
    }
    let missing: Vec<String> = bad
        .iter()
        .filter(|b| !letters.contains_key(*b))
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} bad purchases never dead-lettered, e.g. {:?}",
        missing.len(),
        bad.len(),
        missing.first()
    );
    eprintln!(
        "dead letters: {} bad purchases, each delivered ({repeated} repeated)",
        bad.len()
    );
    eprintln!(
        "chaos run: {} events applied exactly in {:.0} s with {} faults; Redis divergences detected and replayed: {}; commits fenced: {}",
        events.len(),
        run.started.elapsed().as_secs_f64(),
        run.log.len(),
        run.logs.matches("Redis diverged from this owner's state").count(),
        run.logs.matches("Partition stopped: another owner took over.").count()
    );
}

/// The chaos under the pyramid (rank tiers, wall clock): metrics exact, tiers equal to a full
/// sort of the final values, every change in order on every record, repeats byte-identical.
#[test]
fn chaos_run_under_the_pyramid_keeps_ranks_exact_and_replays_changes_identically() {
    let n = env_or("CHAOS_EVENTS", 30_000);
    let customers = env_or("CHAOS_CUSTOMERS", 3_000) as u32;
    let rate = env_or("CHAOS_RATE", 1_000);
    let mut world = World::start_on(8, Redis::start_everysec(), Broker::cluster(3));
    world.rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/pyramid.toml");
    let rules = tierd::engine::rules::Rules::load(&world.rules, 2).unwrap();
    let events = stream(n, customers, 2027);
    // Metrics do not depend on the tiers: the reference of any rules gives them.
    let (expected, _) = reference(&events, &rules);
    let extra = "[ingest]\nbatch_max_events = 500\n[ranks]\nrecompute_interval_ms = 300\ncheck_interval_ms = 100\n";
    // A larger loss than the threshold run's (a second or two of this stream): the window
    // lost then holds cut-off moves whose changes were published.
    let run = chaos(&world, extra, &events, rate, 1024 * 1024);

    // Settle: cut-offs over every customer, applied by every partition, twice the same.
    let population = expected.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    let cutoffs = loop {
        let settled = world.cutoffs().filter(|c| {
            c.population.first() == Some(&population)
                && (0..8).all(|p| world.applied_cutoffs_version(p) >= c.version)
        });
        if let Some(c) = settled {
            std::thread::sleep(Duration::from_secs(2));
            if world
                .cutoffs()
                .is_some_and(|again| again.values == c.values)
            {
                world.wait_applied(&BTreeMap::new(), Duration::from_secs(60));
                break c;
            }
        }
        assert!(Instant::now() < deadline, "the cut-offs did not settle");
        std::thread::sleep(Duration::from_millis(200));
    };
    // The cut-offs equal a full sort of the reference's values...
    let mut values: Vec<Vec<i128>> = vec![expected
        .values()
        .filter_map(|s| s.ranked_values.first().copied().flatten())
        .collect()];
    let ties: Vec<_> = rules.ranks().iter().map(|r| r.ties).collect();
    let sorted = tierd::engine::rules::rank::cutoffs_from_values(
        rules.cut_points(),
        &ties,
        cutoffs.rules,
        &mut values,
    );
    assert_eq!(cutoffs.values, sorted.values, "cut-offs equal a full sort");
    // ...and every customer's metrics equal the reference, and their tier the one the engine
    // gives the reference state under those cut-offs.
    let wrong = differing(
        &world,
        &expected,
        &rules,
        tierd::model::time::now_ms(),
        &cutoffs,
    );
    assert!(
        wrong.is_empty(),
        "{} of {} customers differ: {:?}",
        wrong.len(),
        expected.len(),
        &wrong[..wrong.len().min(5)]
    );

    let published = Published::read(&world);
    let (bodies, last, repeats) = (&published.bodies, &published.last, published.repeats);
    for customer in expected.keys() {
        let stored = world.customer_state(customer).unwrap();
        assert_eq!(
            last.get(customer),
            Some(&(stored.seq, stored.tier.clone().unwrap())),
            "{customer}: every change published, the last one the stored tier"
        );
    }
    eprintln!(
        "pyramid chaos run: {} events, {} customers exact in {:.0} s with {} faults; {} changes, {repeats} repeated byte for byte; Redis divergences replayed: {}; cut-off moves replayed: {}",
        events.len(),
        expected.len(),
        run.started.elapsed().as_secs_f64(),
        run.log.len(),
        bodies.len(),
        run.logs.matches("Redis diverged from this owner's state").count(),
        run.logs.matches("Replaying: applying the published cut-offs").count()
    );
}

/// The customers whose stored metrics or tier differ from the reference state evaluated by
/// the engine at `now` under `cutoffs` (one line each).
fn differing(
    world: &World,
    reference: &HashMap<String, tierd::model::CustomerState>,
    rules: &tierd::engine::rules::Rules,
    now: i64,
    cutoffs: &tierd::engine::rules::rank::Cutoffs,
) -> Vec<String> {
    let key = |s: &tierd::model::CustomerState| {
        (
            s.count,
            s.sum,
            s.refunds,
            s.refunded,
            s.first,
            s.last,
            s.tier.clone(),
        )
    };
    let mut wrong = Vec::new();
    for (customer, state) in reference {
        let mut want = state.clone();
        want.evaluate(rules, now, tierd::engine::Trigger::RankShift, cutoffs);
        let got = world.customer_state(customer).expect("stored");
        if key(&got) != key(&want) {
            wrong.push(format!(
                "{customer}: stored {:?}, expected {:?}",
                key(&got),
                key(&want)
            ));
        }
    }
    wrong
}

/// The distinct changes on a world's output topic, read as a read_committed consumer reads
/// them: each customer's changes in sequence on every record, a repeat byte-identical.
struct Published {
    /// Each change by id (raw bytes, as first read).
    bodies: HashMap<String, Vec<u8>>,
    /// Per customer: the last change's sequence and tier.
    last: HashMap<String, (u64, String)>,
    /// Records that repeated an earlier one.
    repeats: usize,
}

impl Published {
    fn read(world: &World) -> Self {
        let mut records = world.read_all(&world.output);
        records.sort_by_key(|r| (r.partition, r.offset));
        let mut out = Self {
            bodies: HashMap::new(),
            last: HashMap::new(),
            repeats: 0,
        };
        let mut order = Order::default();
        for r in &records {
            let v = r.json();
            let id = v["event_id"].as_str().unwrap().to_owned();
            order.record(
                v["customer_id"].as_str().unwrap(),
                v["sequence"].as_u64().unwrap(),
                !out.bodies.contains_key(&id),
                &format!("partition {} offset {}", r.partition, r.offset),
            );
            if let Some(first) = out.bodies.get(&id) {
                assert_eq!(
                    String::from_utf8_lossy(first),
                    String::from_utf8_lossy(&r.value),
                    "change {id} published again with another body"
                );
                out.repeats += 1;
                continue;
            }
            out.bodies.insert(id, r.value.clone());
            let customer = v["customer_id"].as_str().unwrap().to_owned();
            let seq = v["sequence"].as_u64().unwrap();
            let before = out.last.get(&customer).map_or(0, |l| l.0);
            assert_eq!(seq, before + 1, "{customer}: change {seq} after {before}");
            out.last
                .insert(customer, (seq, v["tier"].as_str().unwrap().to_owned()));
        }
        order.assert_settled();
        out
    }

    /// The changes with what names the world (the input topic in `cause`) left out.
    fn comparable(&self) -> HashMap<String, serde_json::Value> {
        self.bodies
            .iter()
            .map(|(id, bytes)| {
                let mut v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
                if let Some(cause) = v.get_mut("cause").and_then(|c| c.as_object_mut()) {
                    cause.remove("topic");
                }
                (id.clone(), v)
            })
            .collect()
    }
}

/// Time-driven rules (rolling 3-day spend, recency scores by the day, a 2-day validity review
/// and a 1-day grace period) on the event clock: every tier move that time makes is decided by
/// the input alone. (The generated stream spans about a week.)
const TIME_RULES: &str = r#"
version = "chaos-time-1"
[windows.d3]
length = "3 days"
[scores.R]
metric = "recency_days"
bins = [{ score = 3, max = 1 }, { score = 2, max = 2 }, { score = 1 }]
[[tiers]]
name = "gold"
when = ["window.d3.sum >= 40000", "score.R >= 2"]
review = "days:2"
[[tiers]]
name = "silver"
when = ["window.d3.sum >= 15000"]
grace_days = 1
[[tiers]]
name = "bronze"
when = ["score.R >= 3"]
[[tiers]]
name = "none"
"#;

/// The chaos under a time-driven preset (event clock): every customer's state and every
/// change (id and body) must equal what the pure engine gives each partition's records in
/// order (`event_clock_reference`), in order on every record, repeats byte-identical.
#[test]
fn chaos_run_under_time_driven_rules_equals_the_pure_engine() {
    let n = env_or("CHAOS_EVENTS", 30_000);
    let customers = env_or("CHAOS_CUSTOMERS", 3_000) as u32;
    let rate = env_or("CHAOS_RATE", 1_000);
    let rules = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(rules.path(), TIME_RULES).unwrap();
    let events = stream(n, customers, 2028);
    // Out-of-order events are up to two days late: all within the allowed lateness.
    let extra =
        "[ingest]\nbatch_max_events = 500\n[clock]\nmode = \"event\"\nlateness_s = 180000\n";

    let mut world = World::start_on(8, Redis::start_everysec(), Broker::cluster(3));
    world.rules = rules.path().to_owned();
    let run = chaos(&world, extra, &events, rate, 64 * 1024);
    let published = Published::read(&world);
    let reference = event_clock_reference(&world, extra);
    let reasons: std::collections::BTreeSet<&str> = reference
        .changes
        .values()
        .map(|v| v["reason"].as_str().unwrap())
        .collect();
    for r in [
        "recency",
        "window_expiry",
        "validity_expired",
        "grace_ended",
    ] {
        assert!(reasons.contains(r), "time moved no one by {r}: {reasons:?}");
    }
    let (want, got) = (&reference.changes, published.comparable());
    let differ: Vec<&String> = want
        .keys()
        .filter(|id| got.get(*id) != want.get(*id))
        .chain(got.keys().filter(|id| !want.contains_key(*id)))
        .collect();
    assert!(
        differ.is_empty(),
        "{} of {} changes differ from the pure engine's; first: {:?} vs {:?}",
        differ.len(),
        want.len(),
        want.get(differ[0]),
        got.get(differ[0])
    );
    // Whole states (metrics, dedup ids, windows, timers, review and grace marks, history,
    // origin), each under the partition the reference put them in; none stored that the
    // reference lacks.
    let mut wrong: Vec<String> = Vec::new();
    for (partition, want) in &reference.states {
        let got = world.stored_customers(*partition);
        for (c, w) in want {
            if got.get(c) != Some(w) {
                wrong.push(format!(
                    "{c} (partition {partition}): stored {:?}, the pure engine's {w:?}",
                    got.get(c)
                ));
            }
        }
        wrong.extend(
            got.keys()
                .filter(|c| !want.contains_key(*c))
                .map(|c| format!("{c} (partition {partition}): stored, not in the reference")),
        );
    }
    assert!(
        wrong.is_empty(),
        "{} customers' state differs from the pure engine's: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    let stored: usize = reference.states.values().map(HashMap::len).sum();
    eprintln!(
        "time-driven chaos run: {} events, {} customers, {} changes ({} by time) equal to the pure engine's, in {:.0} s with {} faults; {} repeated byte for byte; Redis divergences replayed: {}",
        events.len(),
        stored,
        want.len(),
        want.values().filter(|v| v["cause"].is_null()).count(),
        run.started.elapsed().as_secs_f64(),
        run.log.len(),
        published.repeats,
        run.logs.matches("Redis diverged from this owner's state").count()
    );
}

/// Time-driven rules for the wall clock: a customer is `active` (and `gold` with the spend)
/// while their latest purchase is less than two days old. Continuous review, no grace: the
/// tier is a function of the metrics at the engine time, whatever the path.
const WALL_RULES: &str = r#"
version = "chaos-wall-1"
[scores.R]
metric = "recency_days"
bins = [{ score = 2, max = 1 }, { score = 1 }]
[[tiers]]
name = "gold"
when = ["sum >= 40000", "score.R >= 2"]
[[tiers]]
name = "silver"
when = ["sum >= 15000"]
[[tiers]]
name = "active"
when = ["score.R >= 2"]
[[tiers]]
name = "none"
"#;

/// The chaos under time-driven rules on the wall clock (the default mode): events dated about
/// two days before they are produced, so each purchase's recency timer comes due seconds
/// after it lands, while the faults go on, and many fire during the chaos (a customer buys
/// every few seconds: some timers are overtaken by the next purchase, others move the
/// customer down). When they fire depends on the wall clock, so there is no reference run;
/// instead: every customer's metrics equal the pure engine's reference, their tier is the one
/// the engine gives that state now (every timer due has fired), every change is published in
/// order on every record with the stored tier last, and a change read twice is the
/// byte-identical record (a replay after the Redis loss fires its timer passes again where
/// they first fired).
#[test]
fn chaos_run_on_the_wall_clock_fires_every_timer_once_and_replays_identically() {
    let n = env_or("CHAOS_EVENTS", 30_000);
    let customers = env_or("CHAOS_CUSTOMERS", 3_000) as u32;
    let rate = env_or("CHAOS_RATE", 1_000);
    let rules_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(rules_file.path(), WALL_RULES).unwrap();
    let rules = tierd::engine::rules::Rules::load(rules_file.path(), 2).unwrap();
    let mut world = World::start_on(8, Redis::start_everysec(), Broker::cluster(3));
    world.rules = rules_file.path().to_owned();

    // Event i is produced about i / rate seconds after the instances own the partitions and
    // production starts; it is dated 2 days minus 8 s before that, and one in ten up to 6 s
    // earlier still (late, within the default lateness of 60 s): its recency timer (2 days
    // after the latest purchase) comes due ~8 s after it is produced.
    const DAY: i64 = 86_400_000;
    let dated = |start: i64| {
        let mut rng = StdRng::seed_from_u64(2029);
        let mut events = stream(n, customers, 2029);
        for (i, e) in events.iter_mut().enumerate() {
            let late = if rng.random_bool(0.1) {
                rng.random_range(0..6_000)
            } else {
                0
            };
            let at = start - 2 * DAY + 8_000 + (i as i64 * 1000) / rate as i64 - late;
            e["occurred_at"] = tierd::model::time::format_ms(at).into();
        }
        events
    };
    let run = chaos_from(
        &world,
        "[ingest]\nbatch_max_events = 500\n",
        dated,
        rate,
        64 * 1024,
    );
    let events = &run.events;
    let (reference, _) = reference(events, &rules);
    let last_due = run.production_start + 8_000 + (n as i64 * 1000) / rate as i64;

    // Every timer due has fired once the wall clock is past the last one (and a tick).
    let deadline = Instant::now() + Duration::from_secs(120);
    let (wrong, now) = loop {
        let wait = last_due + 3_000 - tierd::model::time::now_ms();
        if wait > 0 {
            std::thread::sleep(Duration::from_millis(wait as u64));
        }
        let now = tierd::model::time::now_ms();
        let wrong = differing(&world, &reference, &rules, now, &Default::default());
        if wrong.is_empty() || Instant::now() > deadline {
            break (wrong, now);
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(
        wrong.is_empty(),
        "{} of {} customers differ at {now}: {:?}",
        wrong.len(),
        reference.len(),
        &wrong[..wrong.len().min(5)]
    );
    world.wait_applied(&BTreeMap::new(), Duration::from_secs(60));

    let published = Published::read(&world);
    for customer in reference.keys() {
        let stored = world.customer_state(customer).unwrap();
        assert_eq!(
            published.last.get(customer),
            Some(&(stored.seq, stored.tier.clone().unwrap())),
            "{customer}: every change published, the last one the stored tier"
        );
    }
    let by_time = published
        .comparable()
        .values()
        .filter(|v| v["reason"] == "recency")
        .count();
    assert!(
        by_time > reference.len() / 2,
        "time moved only {by_time} customers down by recency"
    );
    eprintln!(
        "wall-clock chaos run: {} events, {} customers exact in {:.0} s with {} faults; {} changes ({by_time} by recency), {} repeated byte for byte; Redis divergences replayed: {}",
        events.len(),
        reference.len(),
        run.started.elapsed().as_secs_f64(),
        run.log.len(),
        published.bodies.len(),
        published.repeats,
        run.logs.matches("Redis diverged from this owner's state").count()
    );
}

// The order check itself, on hand-made sequences.

/// [`Order`] over one customer's records: (sequence, first record of its id).
fn order_of(records: &[(u64, bool)]) -> Order {
    let mut order = Order::default();
    for (i, (seq, first)) in records.iter().enumerate() {
        order.record("c", *seq, *first, &i.to_string());
    }
    order
}

#[test]
fn replays_climb_back_to_the_newest() {
    order_of(&[
        (1, true),
        (2, true),
        (3, true),
        (2, false),
        (3, false),
        (4, true),
    ])
    .assert_settled();
    // A second loss during the replay starts it over.
    order_of(&[
        (1, true),
        (2, true),
        (3, true),
        (2, false),
        (1, false),
        (2, false),
        (3, false),
    ])
    .assert_settled();
    // The newest alone again.
    order_of(&[(1, true), (2, true), (2, false)]).assert_settled();
}

#[test]
#[should_panic(expected = "left on a stale change")]
fn a_stale_repeat_last_fails() {
    order_of(&[(1, true), (2, true), (3, true), (2, false)]).assert_settled();
}

#[test]
#[should_panic(expected = "while a replay")]
fn a_new_change_during_a_replay_fails() {
    order_of(&[(1, true), (2, true), (3, true), (2, false), (4, true)]);
}

#[test]
#[should_panic(expected = "skips")]
fn a_replay_skipping_a_change_fails() {
    order_of(&[(1, true), (2, true), (3, true), (1, false), (3, false)]);
}
