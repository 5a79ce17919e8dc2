//! An exact reference for crash and failover tests: a generated stream (with re-sent
//! duplicates and out-of-order events), the states and changes the pure engine gives for it,
//! and the check that what tierd stored and published equals them, on every record.

use super::{purchase, refund, World};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use tierd::engine::rules::Rules;
use tierd::engine::Applied;
use tierd::model::{time, CustomerState, DedupPolicy, Event, EventKind};

/// Expected changes per customer: (sequence, previous tier, tier).
pub type Changes = HashMap<String, Vec<(u64, Option<String>, String)>>;

/// A generated stream: the JSON events in production order.
pub fn stream(n: usize, customers: u32, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    // The whole stream lies in the past (tierd refuses events dated more than a day after its
    // own clock): from 1 October 2026, 20 s apart, closer for streams longer than 50 days.
    let base = time::parse_rfc3339_ms("2026-10-01T00:00:00Z").unwrap();
    let step = (50 * 86_400_000 / n.max(1) as i64).min(20_000);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let c = format!("c{}", rng.random_range(0..customers));
        // Event time mostly increasing, sometimes up to 2 days out of order.
        let at = time::format_ms(
            base + i as i64 * step
                - if rng.random_bool(0.1) {
                    rng.random_range(0..172_800_000)
                } else {
                    0
                },
        );
        let amount = if rng.random_bool(0.05) {
            format!(
                "{}.{:02}",
                rng.random_range(100_000..400_000),
                rng.random_range(0..100)
            )
        } else {
            format!(
                "{}.{:02}",
                rng.random_range(1..20_000),
                rng.random_range(0..100)
            )
        };
        let e = if rng.random_bool(0.04) {
            refund(&format!("e{i}"), &c, &amount, &at)
        } else {
            purchase(&format!("e{i}"), &c, &amount, &at)
        };
        out.push(e.clone());
        if rng.random_bool(0.02) {
            out.push(e); // the producer re-sends: same event_id at a later offset
        }
    }
    out
}

/// The reference: the same stream applied in order, with the same pure transition function.
pub fn reference(
    events: &[serde_json::Value],
    rules: &Rules,
) -> (HashMap<String, CustomerState>, Changes) {
    let policy = DedupPolicy {
        horizon_ms: 7 * 86_400_000,
        max_ids: 64,
    };
    let mut states: HashMap<String, CustomerState> = HashMap::new();
    let mut changes: Changes = HashMap::new();
    for e in events {
        let event = Event {
            event_id: e["event_id"].as_str().unwrap().into(),
            customer_id: e["customer_id"].as_str().unwrap().into(),
            kind: if e["type"] == "refund" {
                EventKind::Refund
            } else {
                EventKind::Purchase
            },
            amount_minor: tierd::model::money::parse_minor(
                e["amount"].as_str().unwrap(),
                2,
                i64::MAX,
            )
            .unwrap(),
            occurred_at_ms: time::parse_rfc3339_ms(e["occurred_at"].as_str().unwrap()).unwrap(),
            pin: None,
            points: e["points"]
                .as_i64()
                .or_else(|| e["points"].as_str().and_then(|p| p.parse().ok()))
                .unwrap_or(0),
            attributes: e["attributes"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let state = states.entry(event.customer_id.clone()).or_default();
        let now = event.occurred_at_ms;
        let applied = state.apply(&event, rules, policy, now, &Default::default());
        if let Applied::Counted(outcome) = applied {
            let Some(t) = outcome.transition else {
                continue;
            };
            changes.entry(event.customer_id.clone()).or_default().push((
                state.seq,
                t.previous,
                rules.tiers()[t.tier].name.clone(),
            ));
        }
    }
    (states, changes)
}

pub fn b2b_rules() -> Rules {
    Rules::load(
        std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/rules/b2b-lifetime.toml"
        )),
        2,
    )
    .unwrap()
}

/// What a customer's state has counted and decided: counts, sums, first and last purchase,
/// tier and change sequence (what two runs over the same input must agree on).
pub type Counted = (
    u64,
    i128,
    u64,
    i128,
    Option<i64>,
    Option<i64>,
    Option<String>,
    u64,
);

/// The [`Counted`] part of a state.
pub fn counted(s: &CustomerState) -> Counted {
    (
        s.count,
        s.sum,
        s.refunds,
        s.refunded,
        s.first,
        s.last,
        s.tier.clone(),
        s.seq,
    )
}

/// After the stream: every customer's state equals the reference, every expected change was
/// published exactly once as expected, in per-customer order on every record.
pub fn assert_exact(
    world: &World,
    expected_states: &HashMap<String, CustomerState>,
    expected_changes: &Changes,
) {
    assert_exact_with(world, expected_states, expected_changes, Duplicates::Never);
}

/// Whether a change may appear twice on the output topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicates {
    /// Never (every failure tierd survives without Redis losing acknowledged writes).
    Never,
    /// Only as the byte-identical record, at the same place in the customer's order: after
    /// Redis lost acknowledged writes, the window it lost is replayed and its changes may be
    /// published again.
    IdenticalOnly,
}

/// [`assert_exact`], with the duplicates `duplicates` allows.
pub fn assert_exact_with(
    world: &World,
    expected_states: &HashMap<String, CustomerState>,
    expected_changes: &Changes,
    duplicates: Duplicates,
) {
    // Exact state per customer; on a mismatch, every customer that differs is counted and the
    // first ones are shown with their dead letters.
    let key = counted;
    let mut wrong: Vec<String> = Vec::new();
    for (customer, expected) in expected_states {
        let got = world.customer_state(customer);
        if got.as_ref().map(key) != Some(key(expected)) {
            if wrong.len() < 5 {
                wrong.push(format!(
                    "{customer}: stored {:?}, expected {:?}",
                    got.as_ref().map(key),
                    key(expected)
                ));
            } else {
                wrong.push(customer.clone());
            }
        }
    }
    if !wrong.is_empty() {
        let dead: Vec<String> = world
            .read_all(&world.dlq)
            .iter()
            .take(20)
            .map(|r| format!("{:?} {}", r.headers, String::from_utf8_lossy(&r.value)))
            .collect();
        panic!(
            "{} of {} customers differ from the reference:\n{}\ndead letters (first 20): {dead:#?}",
            wrong.len(),
            expected_states.len(),
            wrong.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
        );
    }

    // Every expected change published exactly once, and per-customer order on every record as
    // a read_committed consumer reads the topic: each publish transaction commits its outbox
    // position with its records, so a crash between Kafka commit and trim re-publishes nothing,
    // and a crashed owner's open transaction is aborted by the next owner's producer.
    let records = world.read_all(&world.output);
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    let mut first_seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut first_bytes: HashMap<String, Vec<u8>> = HashMap::new();
    let mut sorted = records.clone();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut twice = 0usize;
    let mut order = Order::default();
    for r in &sorted {
        let v = r.json();
        let id = v["event_id"].as_str().unwrap().to_owned();
        let customer = v["customer_id"].as_str().unwrap().to_owned();
        let seq = v["sequence"].as_u64().unwrap();
        order.record(
            &customer,
            seq,
            !by_id.contains_key(&id),
            &format!("partition {} offset {}", r.partition, r.offset),
        );
        let seqs = first_seen.entry(customer).or_default();
        if let Some(first) = by_id.get(&id) {
            assert!(
                duplicates == Duplicates::IdenticalOnly
                    && r.value == *first_bytes.get(&id).unwrap(),
                "change {id} published twice: {first} then {v} (partition {} offset {})",
                r.partition,
                r.offset
            );
            // A replayed window's change, byte for byte: a consumer that keeps the latest
            // change per id sees nothing new. Every first occurrence below is in order.
            assert!(
                seqs.contains(&seq),
                "{id}: repeated before it was first published"
            );
            twice += 1;
            continue;
        }
        assert!(
            seqs.last().is_none_or(|last| *last < seq),
            "{}: sequence {seq} after {seqs:?} (partition {} offset {})",
            v["customer_id"],
            r.partition,
            r.offset
        );
        seqs.push(seq);
        first_bytes.insert(id.clone(), r.value.clone());
        by_id.insert(id, v);
    }
    order.assert_settled();
    let expected_total: usize = expected_changes.values().map(Vec::len).sum();
    assert_eq!(by_id.len(), expected_total, "distinct changes published");
    for (customer, changes) in expected_changes {
        let seqs: Vec<u64> = changes.iter().map(|c| c.0).collect();
        assert_eq!(
            first_seen.get(customer),
            Some(&seqs),
            "{customer}: changes in order, none missing"
        );
        let origin = world.customer_state(customer).and_then(|s| s.origin);
        for (seq, previous, tier) in changes {
            let v = &by_id[&tierd::model::change::change_id(customer, origin, *seq)];
            assert_eq!(
                (v["previous_tier"].as_str(), v["tier"].as_str()),
                (previous.as_deref(), Some(tier.as_str())),
                "{customer} #{seq}"
            );
        }
    }
    eprintln!(
        "published {} records for {} distinct changes, {twice} repeated byte for byte",
        records.len(),
        by_id.len()
    );
}

/// Per-customer order as a consumer reads the output topic, on every record, repeats
/// included. A customer's changes rise in sequence; a replay after Redis lost writes may
/// publish a stretch again (byte for byte, checked elsewhere): it goes back to a change
/// published before and climbs, one published change after the next, to the newest again
/// (or starts over, a second loss during the replay) before anything new is published. So a
/// consumer keeping each customer's latest record (a compacted topic, a KTable) is never left
/// on a stale change, and a stale repeat after newer changes (1 2 3 2) fails.
#[derive(Default)]
pub struct Order {
    /// Per customer: the sequences first published, in order, and the index among them of the
    /// last repeat while a replay has not reached the newest.
    customers: HashMap<String, (Vec<u64>, Option<usize>)>,
}

impl Order {
    /// The next record of `customer` on the topic, with sequence `seq`; `first`: the first
    /// record of its change id. `at` names the record.
    pub fn record(&mut self, customer: &str, seq: u64, first: bool, at: &str) {
        let (seqs, replay) = self.customers.entry(customer.to_owned()).or_default();
        if first {
            assert!(
                replay.is_none(),
                "{customer}: new change {seq} ({at}) while a replay of {seqs:?} stands at #{}",
                replay.map_or(0, |i| seqs[i])
            );
            assert!(
                seqs.last().is_none_or(|last| *last < seq),
                "{customer}: sequence {seq} after {seqs:?} ({at})"
            );
            seqs.push(seq);
            return;
        }
        let Some(i) = seqs.iter().position(|s| *s == seq) else {
            panic!("{customer}: change {seq} repeated before it was first published ({at})");
        };
        // Going on with the replay, or (re)starting one at or before where it stands.
        let next = replay.map_or(seqs.len(), |r| r + 1);
        assert!(
            i <= next,
            "{customer}: repeat of {seq} ({at}) skips {:?} of the replay of {seqs:?}",
            &seqs[next..i]
        );
        *replay = (i + 1 < seqs.len()).then_some(i);
    }

    /// Every replay reached the customer's newest change: each customer's last record is it.
    pub fn assert_settled(&self) {
        let stale: Vec<String> = self
            .customers
            .iter()
            .filter_map(|(c, (seqs, replay))| {
                replay.map(|i| format!("{c}: last record #{} of {seqs:?}", seqs[i]))
            })
            .take(10)
            .collect();
        assert!(
            stale.is_empty(),
            "customers left on a stale change: {stale:?}"
        );
    }
}

/// What the pure engine gives an event-clock run: every partition's customers and their
/// whole states, and every change (by id, as published, the input topic left out of its
/// cause).
pub struct EventClockReference {
    pub states: BTreeMap<i32, HashMap<String, CustomerState>>,
    pub changes: HashMap<String, serde_json::Value>,
}

/// The reference of a run in `event` clock mode, computed without Kafka, Redis or tierd's
/// runner: each partition's records, as the broker holds them, decoded and applied in
/// offset order by the engine's pure functions. A partition's engine time is its latest
/// event time minus the allowed lateness (it never goes back); before an event that moves
/// it, every timer due at or before the new time fires, evaluated at its own due time; the
/// event is then applied at the engine time. This is the order tierd documents for the
/// event clock, written out independently of the runner it checks (a run without rules
/// changes: no sweep holds timers); the per-customer code (decoder, engine, change builder)
/// is tierd's own, checked by the engine's tests and the threshold run's reference. `extra` is the TOML the instances ran with (lateness,
/// money, dedup); the world's rules file is the rules.
pub fn event_clock_reference(world: &World, extra: &str) -> EventClockReference {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use tierd::config::Config;
    use tierd::engine::rules::rank::Cutoffs;
    use tierd::engine::Trigger;
    use tierd::model::state::origin_of;
    use tierd::model::Cause;
    use tierd::partition::draft::Draft;
    use tierd::partition::Pipeline;
    use tierd::store::outbox::EntryKind;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tierd.toml");
    std::fs::write(&path, world.config(0, extra)).unwrap();
    let config = Config::load(Some(&path)).expect("the run's config");
    assert_eq!(config.clock.mode, tierd::config::ClockMode::Event);
    let rules =
        Arc::new(Rules::load(&world.rules, config.money.fraction_digits).expect("the run's rules"));
    let p = Pipeline::new(&config, Arc::clone(&rules), Default::default());
    let cutoffs = Cutoffs::default();
    assert!(
        rules.ranks().is_empty(),
        "an event-clock reference without rank sets"
    );

    let mut records = world.read_all(&world.input);
    records.sort_by_key(|r| (r.partition, r.offset));
    let mut out = EventClockReference {
        states: BTreeMap::new(),
        changes: HashMap::new(),
    };
    let mut draft = Draft::at(0, 0);
    for partition in records.chunk_by(|a, b| a.partition == b.partition) {
        let states = out.states.entry(partition[0].partition).or_default();
        let mut clock: Option<i64> = None;
        // The partition's timer index: (due, customer).
        let mut timers: BTreeSet<(i64, String)> = BTreeSet::new();
        for r in partition {
            let Ok(event) = tierd::ingest::decode::decode(
                r.key.as_deref(),
                Some(&r.value),
                r.timestamp.unwrap_or(i64::MAX),
                &p.limits,
            ) else {
                continue;
            };
            let t = event.occurred_at_ms.saturating_sub(p.clock.lateness_ms);
            if clock.is_none_or(|c| t > c) {
                while timers.first().is_some_and(|(due, _)| *due <= t) {
                    let (due, id) = timers.pop_first().unwrap();
                    let state = states.get_mut(&id).unwrap();
                    let (at, cause) = state.timer.unwrap();
                    assert_eq!(at, due, "{id}: the index follows the state");
                    let outcome = state.evaluate(&rules, due, Trigger::Time(cause), &cutoffs);
                    draft.record(&p, &rules, &id, state, &outcome, None);
                    if let Some((next, _)) = state.timer {
                        timers.insert((next, id));
                    }
                }
                clock = Some(t);
            }
            let id = event.customer_id.clone();
            let state = states.entry(id.clone()).or_default();
            let (fresh, before) = (state.is_new(), state.timer);
            if let Applied::Counted(outcome) =
                state.apply(&event, &rules, p.dedup, clock.unwrap(), &cutoffs)
            {
                if fresh {
                    state.origin = Some(origin_of(&event.event_id, r.offset));
                    state.born = Some(event.occurred_at_ms);
                }
                let cause = Cause {
                    event_id: event.event_id.clone(),
                    topic: world.input.clone(),
                    partition: r.partition,
                    offset: r.offset,
                };
                draft.record(&p, &rules, &id, state, &outcome, Some(cause));
            }
            if state.timer != before {
                if let Some((due, _)) = before {
                    timers.remove(&(due, id.clone()));
                }
                if let Some((due, _)) = state.timer {
                    timers.insert((due, id));
                }
            }
        }
        // A customer never stored (their only events refused) is no state.
        states.retain(|_, s| !s.is_new());
    }
    out.changes = draft
        .outbox
        .iter()
        .filter(|e| e.kind == EntryKind::Change)
        .map(|e| {
            let mut v: serde_json::Value = serde_json::from_slice(&e.value).unwrap();
            v["cause"].as_object_mut().map(|c| c.remove("topic"));
            (v["event_id"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    out
}
