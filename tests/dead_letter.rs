//! Every class of bad input goes to the dead-letter topic with its original bytes, its source
//! position and its reason; the service keeps going and counts each reason.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;
use support::{purchase, Redis, Tierd, World};

#[test]
fn every_bad_input_class_is_dead_lettered_with_its_reason_and_nothing_stops() {
    let world = World::start(2);
    let tierd = Tierd::spawn(
        &world,
        "[ingest]\nmax_message_bytes = 1024\n[publish]\ndead_letter_max_bytes = 1500\n",
    );
    tierd.wait_partitions(2, Duration::from_secs(60));

    let ok =
        |id: &str| serde_json::to_vec(&purchase(id, "k", "1.00", "2026-11-10T10:00:00Z")).unwrap();
    let text = |id: &str, body: &str| body.replace("ID", id).into_bytes();
    let k = Some("k".to_owned());
    let cases: Vec<(&str, Option<String>, Vec<u8>)> = vec![
        (
            "oversize",
            k.clone(),
            format!(r#"{{"pad":"{}"}}"#, "x".repeat(3000)).into_bytes(),
        ),
        ("invalid_json", k.clone(), b"{not json".to_vec()),
        ("invalid_json", k.clone(), vec![0xff, 0xfe, 0x00]),
        ("invalid_json", k.clone(), Vec::new()),
        ("not_object", k.clone(), b"[1,2,3]".to_vec()),
        (
            "missing_field",
            k.clone(),
            text(
                "m1",
                r#"{"event_id":"ID","customer_id":"k","occurred_at":"2026-11-10T10:00:00Z"}"#,
            ),
        ),
        (
            "invalid_field",
            k.clone(),
            text(
                "f1",
                r#"{"event_id":"ID","customer_id":"k","amount":[1],"occurred_at":"2026-11-10T10:00:00Z"}"#,
            ),
        ),
        (
            "invalid_id",
            k.clone(),
            text(
                "",
                r#"{"event_id":"","customer_id":"k","amount":1,"occurred_at":"2026-11-10T10:00:00Z"}"#,
            ),
        ),
        (
            "negative_amount",
            k.clone(),
            text(
                "n1",
                r#"{"event_id":"ID","customer_id":"k","amount":"-5","occurred_at":"2026-11-10T10:00:00Z"}"#,
            ),
        ),
        (
            "invalid_amount",
            k.clone(),
            text(
                "p1",
                r#"{"event_id":"ID","customer_id":"k","amount":1.001,"occurred_at":"2026-11-10T10:00:00Z"}"#,
            ),
        ),
        (
            "amount_out_of_range",
            k.clone(),
            text(
                "r1",
                r#"{"event_id":"ID","customer_id":"k","amount":"5000000000","occurred_at":"2026-11-10T10:00:00Z"}"#,
            ),
        ),
        (
            "unknown_currency",
            k.clone(),
            text(
                "u1",
                r#"{"event_id":"ID","customer_id":"k","amount":1,"currency":"USD","occurred_at":"2026-11-10T10:00:00Z"}"#,
            ),
        ),
        (
            "invalid_timestamp",
            k.clone(),
            text(
                "t1",
                r#"{"event_id":"ID","customer_id":"k","amount":1,"occurred_at":"10 Nov 2026"}"#,
            ),
        ),
        (
            "timestamp_out_of_range",
            k.clone(),
            text(
                "t2",
                r#"{"event_id":"ID","customer_id":"k","amount":1,"occurred_at":"1970-01-01T00:00:00Z"}"#,
            ),
        ),
        (
            "timestamp_out_of_range",
            k.clone(),
            text(
                "t3",
                r#"{"event_id":"ID","customer_id":"k","amount":1,"occurred_at":"2099-01-01T00:00:00Z"}"#,
            ),
        ),
        (
            "unknown_type",
            k.clone(),
            text(
                "y1",
                r#"{"event_id":"ID","customer_id":"k","amount":1,"type":"gift","occurred_at":"2026-11-10T10:00:00Z"}"#,
            ),
        ),
        (
            "invalid_override",
            k.clone(),
            text(
                "y2",
                r#"{"event_id":"ID","customer_id":"k","type":"override","tier":"Z","occurred_at":"2026-11-10T10:00:00Z"}"#,
            ),
        ),
        ("key_mismatch", Some("other".into()), ok("km1")),
        ("key_mismatch", None, ok("km2")),
    ];
    let mut records: Vec<(Option<String>, Vec<u8>)> = vec![(k.clone(), ok("good-before"))];
    records.extend(cases.iter().map(|(_, key, v)| (key.clone(), v.clone())));
    // Too late: more than the 7-day dedup horizon behind the customer's latest event.
    records.push((
        k.clone(),
        serde_json::to_vec(&purchase("late", "k", "1.00", "2026-11-01T10:00:00Z")).unwrap(),
    ));
    records.push((k.clone(), ok("good-after")));
    let ends = world.produce(&records);
    world.wait_applied(&ends, Duration::from_secs(60));

    let dead = world.read_all(&world.dlq);
    let input = world.read_all(&world.input);
    assert_eq!(
        dead.len(),
        cases.len() + 1,
        "one dead letter per bad message"
    );
    // Dead letters of one input partition keep input order; match them by original bytes.
    let mut expected: Vec<(&str, Option<String>, Vec<u8>)> = cases.clone();
    expected.push(("too_late", k.clone(), records[records.len() - 2].1.clone()));
    for (reason, key, value) in &expected {
        let record = dead
            .iter()
            .find(|r| {
                r.headers["tierd.reason"] == *reason
                    && (r.value == *value
                        || r.headers.contains_key("tierd.truncated_from")
                            && value.starts_with(&r.value))
            })
            .unwrap_or_else(|| {
                panic!(
                    "no dead letter {reason} for {:?}",
                    String::from_utf8_lossy(value)
                )
            });
        assert_eq!(
            record
                .key
                .as_ref()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            key.clone(),
            "{reason}: original key kept"
        );
        assert_eq!(record.headers["tierd.source.topic"], world.input);
        let (p, o): (i32, i64) = (
            record.headers["tierd.source.partition"].parse().unwrap(),
            record.headers["tierd.source.offset"].parse().unwrap(),
        );
        assert!(!record.headers["tierd.detail"].is_empty());
        // The source position points at the original message.
        let original = input
            .iter()
            .find(|r| r.partition == p && r.offset == o)
            .unwrap();
        assert_eq!(
            &original.value, value,
            "{reason}: source partition/offset identify the original"
        );
    }
    let oversize = dead
        .iter()
        .find(|r| r.headers["tierd.reason"] == "oversize")
        .unwrap();
    assert_eq!(
        oversize.value.len(),
        1500,
        "cut to publish.dead_letter_max_bytes"
    );
    assert_eq!(oversize.headers["tierd.truncated_from"], "3010");
    let detail = &dead
        .iter()
        .find(|r| r.headers["tierd.reason"] == "invalid_amount")
        .unwrap()
        .headers["tierd.detail"];
    assert_eq!(
        detail,
        "field `amount`: 3 fraction digits, the currency allows 2"
    );

    // The good events around them were applied; the bad ones changed nothing.
    let k_state = world.customer_state("k").unwrap();
    assert_eq!((k_state.count, k_state.sum), (2, 200));

    // Counted by reason.
    let metrics = tierd.get("/metrics").1;
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for (reason, _, _) in &expected {
        *by_reason.entry((*reason).to_owned()).or_default() += 1;
    }
    for (reason, n) in by_reason {
        let line = format!("tierd_events_dead_lettered_total{{reason=\"{reason}\"}} {n}");
        assert!(metrics.contains(&line), "missing `{line}`");
    }
}

/// A producer sets both `occurred_at` and the Kafka message timestamp: one record dated 2100
/// must not move the customer's event clock (and dedup floor) to 2100, which would refuse all
/// their real purchases as `too_late` (and, in `event` mode, move the partition clock and fire
/// every timer at once). The future is bounded by tierd's own clock too: the record is
/// dead-lettered `timestamp_out_of_range`, and the customer's real purchase counts.
#[test]
fn a_record_dated_in_the_far_future_is_refused_against_tierds_clock() {
    far_future("");
}

/// The same on the event clock (`clock.mode = "event"`), where the record would have moved
/// the partition's clock: the clock stays where the real purchase put it.
#[test]
fn a_record_dated_in_the_far_future_does_not_move_the_event_clock() {
    far_future("[clock]\nmode = \"event\"\n");
}

fn far_future(extra: &str) {
    use rdkafka::producer::{FutureRecord, Producer};
    let mut world = World::start(1);
    // Apache Kafka 4 refuses message timestamps more than an hour ahead by default
    // (`message.timestamp.after.max.ms`, KIP-937); before 4.0 there was no bound, and a topic
    // may still lift it. tierd must not rely on the broker's setting.
    let input = support::unique("purchases");
    world.broker.create_topics_with(
        &[&input],
        1,
        1,
        &[("message.timestamp.after.max.ms", "9223372036854775807")],
    );
    world.input = input;
    let tierd = Tierd::spawn(&world, extra);
    tierd.wait_partitions(1, Duration::from_secs(60));
    let year_2100 = tierd::model::time::parse_rfc3339_ms("2100-01-01T00:00:00Z").unwrap();
    let now = tierd::model::time::now_ms();
    let producer = world.producer();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (value, timestamp) in [
            (
                purchase("p1", "tara", "5.00", "2100-01-01T00:00:00Z"),
                year_2100,
            ),
            (
                purchase(
                    "p2",
                    "tara",
                    "7.00",
                    &tierd::model::time::format_ms(now - 3_600_000),
                ),
                now,
            ),
        ] {
            let bytes = serde_json::to_vec(&value).unwrap();
            producer
                .send(
                    FutureRecord::to(&world.input)
                        .key("tara")
                        .payload(&bytes)
                        .timestamp(timestamp),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    });
    producer.flush(Duration::from_secs(10)).unwrap();
    world.wait_applied(&BTreeMap::from([(0, 2)]), Duration::from_secs(60));

    let dead = world.read_all(&world.dlq);
    let reasons: Vec<_> = dead
        .iter()
        .map(|r| {
            (
                r.json()["event_id"].clone(),
                r.headers["tierd.reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![(serde_json::json!("p1"), "timestamp_out_of_range".to_owned())]
    );
    assert!(
        dead[0].headers["tierd.detail"].contains("tierd's clock"),
        "{:?}",
        dead[0].headers
    );
    let tara = world.customer_state("tara").unwrap();
    assert_eq!((tara.count, tara.sum), (1, 700), "the real purchase counts");
    if !extra.is_empty() {
        // The partition's event clock: by the real purchase's time, an hour ago (less the
        // allowed lateness), not 2100.
        let clock: Option<String> = redis::cmd("HGET")
            .arg(world.keys(0).meta)
            .arg("clock")
            .query(&mut world.redis.conn())
            .unwrap();
        let clock: i64 = clock.expect("an event clock").parse().unwrap();
        assert!(
            clock < now && clock > now - 7 * 86_400_000,
            "the partition's clock moved to {}",
            tierd::model::time::format_ms(clock)
        );
    }
}

/// A dead letter the dead-letter topic refuses for good (larger than its `max.message.bytes`):
/// it is parked with Kafka's reason, `/readyz/ingest` and `tierd_outbox_parked` say so, the records
/// around it are published exactly once (before: the whole round was produced again every
/// 200 ms, for ever, and the outbox never drained), and once the topic accepts it, the retry
/// delivers it and readiness returns.
#[test]
fn a_dead_letter_kafka_refuses_is_parked_and_the_rest_flows_exactly_once() {
    use rand::distr::{Alphanumeric, SampleString};
    let world = World::start(1);
    let (dlq, tierd) = small_dead_letter_topic(&world, 500);

    // Incompressible, so that even lz4 leaves it above the topic's 2000 bytes.
    let big = Alphanumeric.sample_string(&mut rand::rng(), 8000);
    let mut records =
        support::ten_purchases_around(vec![(Some("c9".into()), big.clone().into_bytes())]);
    records.push((Some("c9".into()), b"{small and bad".to_vec()));
    let ends = world.produce(&records);
    world.wait_applied(&ends, Duration::from_secs(60));

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_parked") < 1.0 || world.outbox_len(0) > 0 {
        assert!(std::time::Instant::now() < deadline, "not parked");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, body) = tierd.get("/readyz/ingest");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("parked"), "{body}");
    assert!(tierd.metric("tierd_publish_refused_total") >= 1.0);
    // Let the retries run a while: nothing around the refused record is produced again.
    std::thread::sleep(Duration::from_secs(3));
    world.assert_changes_once(10);
    let letters = support::read_all(&world.broker.addr, &dlq, 1);
    assert_eq!(letters.len(), 1, "the small dead letter went through");
    assert_eq!(letters[0].value, b"{small and bad");

    // The topic is fixed: the parked dead letter goes out on its next retry.
    world
        .broker
        .alter_topic_config(&dlq, "max.message.bytes", "1000000");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_parked") > 0.0 || tierd.get("/readyz/ingest").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "parked letter never delivered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let letters = support::read_all(&world.broker.addr, &dlq, 1);
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[1].value, big.as_bytes());
    assert_eq!(world.read_all(&world.output).len(), 10);
}

/// A parked dead letter retried while the dead-letter topic still refuses it does not hold
/// up what comes after it: dead letters and changes published after the parking go out while
/// the retries go on (every 100 ms here). Before: a refused record left the producer's
/// sequence numbers for that topic partition one ahead of the broker's, so the next dead
/// letter's transaction failed (out of order, purged), and with the retry due before every
/// outbox round, nothing after the parked letter was published again.
#[test]
fn retrying_a_parked_dead_letter_does_not_hold_the_dead_letters_after_it() {
    let world = World::start(1);
    let (dlq, tierd) = small_dead_letter_topic(&world, 100);
    park_a_big_dead_letter(&world, &tierd);

    let at = "2026-11-10T10:00:00Z";
    let json = |e: serde_json::Value| serde_json::to_vec(&e).unwrap();
    let refused =
        || tierd.metric_labeled("tierd_outbox_parked_retries_total", "result=\"refused\"");
    let mut retries = refused();
    for round in 0..3 {
        let ends = world.produce(&[
            (Some("d".into()), format!("{{bad {round}").into_bytes()),
            (
                Some(format!("c{round}")),
                json(purchase(
                    &format!("a{round}"),
                    &format!("c{round}"),
                    "1.00",
                    at,
                )),
            ),
        ]);
        world.wait_applied(&ends, Duration::from_secs(30));
        let letters = support::read_all(&world.broker.addr, &dlq, 1);
        assert_eq!(
            letters.len(),
            round + 1,
            "every small dead letter so far went through"
        );
        assert_eq!(world.read_all(&world.output).len(), round + 1);
        // The parked letter's retries went on meanwhile (refused each time).
        let now = refused();
        assert!(now > retries, "retried during round {round}: {now}");
        retries = now;
    }
    assert_eq!(tierd.metric("tierd_outbox_parked"), 1.0, "still parked");
}

/// A parked dead letter is retried on time also while the outbox never empties: here one
/// entry per round (`publish.batch_max = 1`) and hundreds of changes waiting, so every read
/// of the outbox is full and the drain goes on for seconds. Before: the retry was due only
/// when a drain started, and waited until the outbox was empty.
#[test]
fn a_parked_dead_letter_is_retried_while_the_outbox_stays_full() {
    let world = World::start(1);
    let dlq = support::unique("dlq-small");
    world
        .broker
        .create_topics_with(&[&dlq], 1, 1, &[("max.message.bytes", "2000")]);
    let tierd = Tierd::spawn(
        &world,
        &format!(
            "[kafka]\ndead_letter_topic = \"{dlq}\"\n[publish]\nparked_retry_ms = 200\nbatch_max = 1\n"
        ),
    );
    tierd.wait_partitions(1, Duration::from_secs(60));
    park_a_big_dead_letter(&world, &tierd);

    let at = "2026-11-10T10:00:00Z";
    let events: Vec<serde_json::Value> = (0..500)
        .map(|i| purchase(&format!("a{i}"), &format!("c{i}"), "1.00", at))
        .collect();
    let ends = world.produce_json(&events);
    // Once everything is applied, the outbox only shrinks. The drain that started with the
    // last commit is under way once it shrank by 20 (its start retried the letter before the
    // fix too).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while world.partition_meta(0).1 < ends[&0] {
        assert!(std::time::Instant::now() < deadline, "not applied");
        std::thread::sleep(Duration::from_millis(10));
    }
    let applied = world.outbox_len(0);
    assert!(
        applied >= 200,
        "applied faster than published: {applied} waiting"
    );
    while world.outbox_len(0) > applied - 20 {
        assert!(std::time::Instant::now() < deadline, "not draining");
        std::thread::sleep(Duration::from_millis(10));
    }
    let refused =
        || tierd.metric_labeled("tierd_outbox_parked_retries_total", "result=\"refused\"");
    let before = refused();
    // A retry counted, then the outbox seen non-empty: it was non-empty at the retry.
    loop {
        let retried = refused() > before;
        let left = world.outbox_len(0);
        if retried {
            assert!(
                left > 0,
                "the letter was retried only once the outbox was empty"
            );
            break;
        }
        assert!(
            left > 0,
            "the outbox emptied with no retry of the letter meanwhile (from {applied} entries)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    world.wait_applied(&ends, Duration::from_secs(120));
    assert_eq!(
        world.read_all(&world.output).len(),
        500,
        "every change once"
    );
    assert_eq!(tierd.metric("tierd_outbox_parked"), 1.0, "still parked");
}

/// A parked dead letter Kafka took, whose removal from Redis then fails, is not published
/// again: the transaction that delivers it also commits its id with the outbox position, and
/// the next retry finds it there and only removes it — also in the next process, which reads
/// the position from Kafka. Here the delete is refused (tierd's ACL user loses XDEL on the
/// parked stream for a while); in production, Redis going down between Kafka's commit and the
/// delete. Before: every retry delivered it again.
#[test]
fn a_parked_dead_letter_delivered_is_not_delivered_again_when_removing_it_fails() {
    let (redis, admin) = Redis::start_as_acl_user();
    let acl = |rules: &[&str]| support::acl(&admin, &[&["SETUSER", "tierd"], rules].concat());
    let world = World::start_with(1, redis);
    let (dlq, mut tierd) = small_dead_letter_topic(&world, 100);
    let big = park_a_big_dead_letter(&world, &tierd);

    // XDEL stays allowed on the outbox only: the parked letter cannot be removed.
    let failed =
        |t: &Tierd| t.metric_labeled("tierd_outbox_parked_retries_total", "result=\"failed\"");
    let failed_before = failed(&tierd);
    acl(&["-xdel", "(~*:outbox +xdel)"]);
    world
        .broker
        .alter_topic_config(&dlq, "max.message.bytes", "1000000");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while support::read_all(&world.broker.addr, &dlq, 1).is_empty() {
        assert!(std::time::Instant::now() < deadline, "never delivered");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Retries due every 100 ms for a few seconds, then another process's.
    std::thread::sleep(Duration::from_secs(3));
    assert!(failed(&tierd) > failed_before, "removing it was refused");
    assert_eq!(tierd.metric("tierd_outbox_parked"), 1.0, "not removed yet");
    tierd.kill9();
    let tierd = small_dead_letter_tierd(&world, &dlq, 100);
    std::thread::sleep(Duration::from_secs(3));
    assert!(failed(&tierd) > 0.0, "the next process tried to remove it");
    assert_eq!(
        support::read_all(&world.broker.addr, &dlq, 1).len(),
        1,
        "not delivered again"
    );
    acl(&["+xdel", "clearselectors"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_parked") > 0.0 || tierd.get("/readyz/ingest").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never removed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let letters = support::read_all(&world.broker.addr, &dlq, 1);
    assert_eq!(letters.len(), 1, "delivered once");
    assert_eq!(letters[0].value, big.as_bytes());
}

/// A parked dead letter whose parking Redis then loses (rolled back to before it: a restored
/// backup, a failover to a lagging replica) is parked again and delivered, while tierd keeps
/// running: its publisher reads the letter back at or before what it already trimmed.
/// Before: the letter was back in the outbox below the published position, taken for one
/// that went out, and trimmed: lost.
#[test]
fn a_parked_dead_letter_redis_loses_is_parked_again_while_running() {
    a_parked_dead_letter_redis_loses_is_parked_again(Loss::Running);
}

/// The same, with tierd killed (kill -9) before the rollback and started again: the claim
/// finds the outbox behind the published position and parks the dead letters among the
/// entries it trims. Before: the claim trimmed it.
#[test]
fn a_parked_dead_letter_redis_loses_is_parked_again_by_the_next_claim() {
    a_parked_dead_letter_redis_loses_is_parked_again(Loss::Restart);
}

/// The same, when the round after the letter went out but could not be trimmed (XTRIM
/// refused for a while: in production the Redis crash that loses the parking), and Redis comes
/// back from a moment that held both, the letter and that round: the letter is parked again,
/// the round (published) only trimmed. Before the publisher counted a parked letter as gone
/// from the outbox, the letter was taken for part of the pending trim and lost.
#[test]
fn a_parked_dead_letter_redis_loses_with_a_trim_pending_is_parked_again() {
    a_parked_dead_letter_redis_loses_is_parked_again(Loss::TrimPending);
}

/// The same with tierd killed (kill -9) and started again, when Redis comes back from a moment
/// that held the letter and the round after it, the last Kafka took: the outbox is not behind
/// the published position, so the claim found nothing to tell the letter from part of a round
/// whose trim a crash prevented, trimmed it, and it was lost. The published position now
/// records the ids of the letters parked, and the claim parks those again.
#[test]
fn a_parked_dead_letter_redis_loses_with_the_round_after_it_is_parked_again_by_the_next_claim() {
    a_parked_dead_letter_redis_loses_is_parked_again(Loss::RestartWithTheRoundAfter);
}

/// The same moment restored while the next owner runs (tierd killed and started again first,
/// its publisher up, with no parking of its own): that publisher reads the letter back before
/// the partition is claimed again. The published position names the letter, so the publisher
/// parks it (refused: the claim is no longer current, which stops the publisher) instead of
/// trimming it, and the claim after it parks it. Before, that publisher trimmed it: lost.
#[test]
fn a_parked_dead_letter_redis_loses_under_the_next_owner_is_parked_again() {
    a_parked_dead_letter_redis_loses_is_parked_again(Loss::UnderTheNextOwner);
}

#[derive(PartialEq)]
enum Loss {
    Running,
    Restart,
    TrimPending,
    RestartWithTheRoundAfter,
    UnderTheNextOwner,
}

fn a_parked_dead_letter_redis_loses_is_parked_again(loss: Loss) {
    use rand::distr::{Alphanumeric, SampleString};
    let (redis, admin) = Redis::start_as_acl_user();
    let acl = |rules: &[&str]| support::acl(&admin, &[&["SETUSER", "tierd"], rules].concat());
    let world = World::start_with(1, redis);
    let (dlq, mut tierd) = small_dead_letter_topic(&world, 100);
    let at = "2026-11-10T10:00:00Z";
    let c1 = (
        Some("c1".to_owned()),
        serde_json::to_vec(&purchase("a1", "c1", "1.00", at)).unwrap(),
    );

    // The publisher cannot read the outbox for a while, so that a snapshot holds the letter
    // in the outbox, before it is parked.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while world.outbox_len(0) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox never drained"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    acl(&["-xrange"]);
    let big = Alphanumeric.sample_string(&mut rand::rng(), 8000);
    let mut input = vec![(Some("c9".to_owned()), big.clone().into_bytes())];
    let round_after = matches!(
        loss,
        Loss::TrimPending | Loss::RestartWithTheRoundAfter | Loss::UnderTheNextOwner
    );
    if round_after {
        // The round after it is in the snapshot too.
        input.push(c1.clone());
    }
    let mut ends = world.produce(&input);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while world.partition_meta(0).1 < ends[&0] {
        assert!(std::time::Instant::now() < deadline, "not applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    let waiting = world.outbox_len(0);
    assert!(waiting >= 1, "the letter waits in the outbox");
    let before = world.snapshot();
    if loss == Loss::TrimPending {
        acl(&["-xtrim", "+xrange"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while tierd.metric("tierd_outbox_parked") < 1.0 || world.read_all(&world.output).is_empty()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "not parked and published (parked {}, outbox {})\ntierd's log:\n{}",
                tierd.metric("tierd_outbox_parked"),
                world.outbox_len(0),
                tierd.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            world.outbox_len(0) > 0,
            "the published round is not trimmed"
        );
    } else {
        acl(&["+xrange"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while tierd.metric("tierd_outbox_parked") < 1.0 || world.outbox_len(0) > 0 {
            assert!(std::time::Instant::now() < deadline, "not parked");
            std::thread::sleep(Duration::from_millis(100));
        }
        if !round_after {
            // Rounds after it go out: the published position passes it.
            ends = world.produce(&[c1.clone(), (Some("d".into()), b"{small and bad".to_vec())]);
            world.wait_applied(&ends, Duration::from_secs(60));
        }
    }
    assert_eq!(world.read_all(&world.output).len(), 1);

    let restart = matches!(loss, Loss::Restart | Loss::RestartWithTheRoundAfter);
    if restart {
        tierd.kill9();
    }
    if loss == Loss::UnderTheNextOwner {
        tierd.kill9();
        // Retries 5 s apart: a refused retry replaces the producer, and a publisher making a
        // new one checks its claim first (a stale one stops it before it reads the outbox,
        // leaving the letter to the claim). Between two retries it keeps its producer and
        // reads the outbox straight away.
        tierd = small_dead_letter_tierd(&world, &dlq, 5000);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while tierd.metric_labeled("tierd_outbox_parked_retries_total", "result=\"refused\"") < 1.0
        {
            assert!(std::time::Instant::now() < deadline, "no retry");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Three drains: the producer is made again and kept.
        std::thread::sleep(Duration::from_millis(1500));
    }
    world.restore(&before);
    if restart {
        assert_eq!(world.outbox_len(0), waiting, "the letter is back");
        tierd = small_dead_letter_tierd(&world, &dlq, 100);
    }
    if loss == Loss::TrimPending {
        acl(&["+xtrim"]);
    }
    // The topic takes it now: delivered once it is parked again.
    world
        .broker
        .alter_topic_config(&dlq, "max.message.bytes", "1000000");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let delivered = || copies(&world, &dlq, &big);
    while delivered() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the letter Redis lost was never delivered\ntierd's log:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The input after the rollback point is applied again; nothing else is lost.
    world.wait_applied(&ends, Duration::from_secs(60));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_parked") > 0.0 || tierd.get("/readyz/ingest").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "still parked");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(delivered(), 1, "delivered once");
    if loss == Loss::UnderTheNextOwner {
        // The running publisher read it first and tried to park it (refused on its stale
        // claim, which stopped it), rather than being stopped by its claim check before
        // reading.
        assert!(
            tierd.log_text().contains("claimed again (ours "),
            "the publisher's parking was not what stopped it:\n{}",
            tierd.log_text()
        );
    }
    let state = world.customer_state("c1").unwrap();
    assert_eq!((state.count, state.sum), (1, 100), "counted once");
    if round_after {
        // Redis did not lose the state here: nothing is applied again, and the published
        // round is not published again.
        assert_eq!(world.read_all(&world.output).len(), 1, "not re-sent");
    } else {
        // Applied and published again after the rollback (byte-identical, the same ids).
        let letters = support::read_all(&world.broker.addr, &dlq, 1);
        assert!(
            letters.iter().any(|l| l.value == b"{small and bad"),
            "the later dead letter is there"
        );
    }
}

/// A letter parked by an owner that was killed before any round recorded the parking: the next
/// owner's first round records it (from the parked stream, where each parked entry keeps its
/// outbox id), so that after Redis is restored from before the parking — a moment that held the
/// letter and the round after it, the last Kafka took — the claim parks it again. Before: the
/// next owner's round did not name it, and the claim after the rollback trimmed it: lost.
#[test]
fn a_letter_parked_by_an_owner_killed_before_recording_it_survives_a_rollback() {
    let (redis, admin) = Redis::start_as_acl_user();
    let acl = |rules: &[&str]| support::acl(&admin, &[&["SETUSER", "tierd"], rules].concat());
    let world = World::start_with(1, redis);
    let (dlq, mut tierd) = small_dead_letter_topic(&world, 100);
    // The output topic refuses the change for now (set early: the broker applies it shortly
    // after): the letter is parked and no round commits.
    world
        .broker
        .alter_topic_config(&world.output, "max.message.bytes", "100");
    let (big, before) = a_letter_and_a_change_waiting(&world, &acl);
    acl(&["+xrange"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_parked") < 1.0 || tierd.metric("tierd_outbox_blocked") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "not parked and blocked\ntierd's log:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The next owner publishes the change (the letter stays parked: its topic still refuses).
    tierd = the_next_owner_publishes_the_change(&world, &dlq, tierd);
    tierd.kill9();
    world.restore(&before);
    assert_eq!(world.outbox_len(0), 2, "the letter is back");
    tierd = small_dead_letter_tierd(&world, &dlq, 100);
    world
        .broker
        .alter_topic_config(&dlq, "max.message.bytes", "1000000");
    let delivered = || copies(&world, &dlq, &big);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while delivered() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the letter Redis lost was never delivered\ntierd's log:\n{}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_parked") > 0.0 || tierd.get("/readyz/ingest").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "still parked");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(delivered(), 1, "delivered once");
    let state = world.customer_state("c1").unwrap();
    assert_eq!((state.count, state.sum), (1, 100), "counted once");
    assert_eq!(
        world.read_all(&world.output).len(),
        1,
        "the change not re-sent"
    );
}

/// A big dead letter (the small topic refuses it) and a change after it, applied and waiting
/// in the outbox while tierd's ACL user cannot read it (`-xrange`, left so): returns the
/// letter and a snapshot of Redis holding both.
fn a_letter_and_a_change_waiting(
    world: &World,
    acl: &dyn Fn(&[&str]),
) -> (String, Vec<(String, Vec<u8>)>) {
    use rand::distr::{Alphanumeric, SampleString};
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while world.outbox_len(0) > 0 {
        assert!(std::time::Instant::now() < deadline, "never drained");
        std::thread::sleep(Duration::from_millis(100));
    }
    acl(&["-xrange"]);
    let big = Alphanumeric.sample_string(&mut rand::rng(), 8000);
    let c1 = serde_json::to_vec(&purchase("a1", "c1", "1.00", "2026-11-10T10:00:00Z")).unwrap();
    let ends = world.produce(&[
        (Some("c9".to_owned()), big.clone().into_bytes()),
        (Some("c1".to_owned()), c1),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while world.partition_meta(0).1 < ends[&0] {
        assert!(std::time::Instant::now() < deadline, "not applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(world.outbox_len(0), 2, "the letter and the change wait");
    (big, world.snapshot())
}

/// A parked letter a retry delivered is forgotten by the published position: when Redis comes
/// back from before its parking (a moment holding it and the round after it) and the claim
/// reads the outbox, it is trimmed with that round, not parked and delivered again (recording
/// the parked letters for the claim without forgetting the delivered ones delivered it twice).
#[test]
fn a_parked_letter_delivered_before_a_rollback_is_not_delivered_again() {
    let (redis, admin) = Redis::start_as_acl_user();
    let acl = |rules: &[&str]| support::acl(&admin, &[&["SETUSER", "tierd"], rules].concat());
    let world = World::start_with(1, redis);
    let (dlq, mut tierd) = small_dead_letter_topic(&world, 100);
    let (big, before) = a_letter_and_a_change_waiting(&world, &acl);
    acl(&["+xrange"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_parked") < 1.0
        || world.read_all(&world.output).is_empty()
        || world.outbox_len(0) > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not parked and published"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    world
        .broker
        .alter_topic_config(&dlq, "max.message.bytes", "1000000");
    let delivered = || copies(&world, &dlq, &big);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while delivered() == 0 || tierd.metric("tierd_outbox_parked") > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the letter not delivered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    tierd.kill9();
    world.restore(&before);
    assert_eq!(world.outbox_len(0), 2, "the letter is back");
    let _tierd = restarted_with_the_letter_delivered_once(&world, &dlq, &big);
    let state = world.customer_state("c1").unwrap();
    assert_eq!((state.count, state.sum), (1, 100), "counted once");
    assert_eq!(
        world.read_all(&world.output).len(),
        1,
        "the change not re-sent"
    );
}

/// The same when removing the delivered letter from the parked stream failed and the next owner
/// took over: that owner finds the letter still parked (with the outbox id it had) but the
/// position names it as delivered, so it does not record it as parked again. Before, its first
/// round recorded it, and after Redis came back from before the parking the claim parked it
/// and it was delivered twice.
#[test]
fn a_parked_letter_delivered_whose_removal_failed_is_not_delivered_again_after_a_rollback() {
    let (redis, admin) = Redis::start_as_acl_user();
    let acl = |rules: &[&str]| support::acl(&admin, &[&["SETUSER", "tierd"], rules].concat());
    let world = World::start_with(1, redis);
    let (dlq, mut tierd) = small_dead_letter_topic(&world, 100);
    // The change after the letter is held (its topic refuses it) until the next owner.
    world
        .broker
        .alter_topic_config(&world.output, "max.message.bytes", "100");
    let (big, before) = a_letter_and_a_change_waiting(&world, &acl);
    // XDEL stays allowed on the outbox only: the delivered letter cannot be removed.
    acl(&["+xrange", "-xdel", "(~*:outbox +xdel)"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_parked") < 1.0 || tierd.metric("tierd_outbox_blocked") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "not parked and blocked"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    world
        .broker
        .alter_topic_config(&dlq, "max.message.bytes", "1000000");
    let delivered = || copies(&world, &dlq, &big);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while delivered() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the letter not delivered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The next owner publishes the change; the letter is still in the parked stream.
    tierd = the_next_owner_publishes_the_change(&world, &dlq, tierd);
    assert_eq!(tierd.metric("tierd_outbox_parked"), 1.0, "not removed");
    tierd.kill9();
    world.restore(&before);
    acl(&["+xdel", "clearselectors"]);
    assert_eq!(world.outbox_len(0), 2, "the letter is back");
    let _tierd = restarted_with_the_letter_delivered_once(&world, &dlq, &big);
    assert_eq!(
        world.read_all(&world.output).len(),
        1,
        "the change not re-sent"
    );
}

/// Kills `tierd` (kill -9), lets the output topic take the change it held, and starts the next
/// owner: returned once the change is published and the outbox is empty.
fn the_next_owner_publishes_the_change(world: &World, dlq: &str, mut tierd: Tierd) -> Tierd {
    tierd.kill9();
    world
        .broker
        .alter_topic_config(&world.output, "max.message.bytes", "1000000");
    let tierd = small_dead_letter_tierd(world, dlq, 100);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while world.read_all(&world.output).is_empty() || world.outbox_len(0) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the change not published"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    tierd
}

/// How many copies of the letter `big` the dead-letter topic `dlq` holds.
fn copies(world: &World, dlq: &str, big: &str) -> usize {
    support::read_all(&world.broker.addr, dlq, 1)
        .iter()
        .filter(|l| l.value == big.as_bytes())
        .count()
}

/// tierd started again after a rollback brought the delivered letter `big` back into the
/// outbox: once it is ready with the outbox empty, and twenty retry periods later (a letter
/// parked again would be delivered by then), the letter was delivered once and nothing is
/// parked.
fn restarted_with_the_letter_delivered_once(world: &World, dlq: &str, big: &str) -> Tierd {
    let tierd = small_dead_letter_tierd(world, dlq, 100);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.get("/readyz/ingest").0 != 200 || world.outbox_len(0) > 0 {
        assert!(std::time::Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let parked: i64 = redis::cmd("XLEN")
        .arg(&world.keys(0).parked)
        .query(&mut world.redis.conn())
        .unwrap();
    assert_eq!(
        (copies(world, dlq, big), parked),
        (1, 0),
        "delivered once, nothing parked"
    );
    tierd
}

/// A dead-letter topic that refuses records above 2000 bytes, and tierd writing to it,
/// retrying parked letters every `parked_retry_ms`.
fn small_dead_letter_topic(world: &World, parked_retry_ms: u64) -> (String, Tierd) {
    let dlq = support::unique("dlq-small");
    world
        .broker
        .create_topics_with(&[&dlq], 1, 1, &[("max.message.bytes", "2000")]);
    let tierd = small_dead_letter_tierd(world, &dlq, parked_retry_ms);
    (dlq, tierd)
}

/// tierd writing dead letters to `dlq`, retrying parked letters every `parked_retry_ms`.
fn small_dead_letter_tierd(world: &World, dlq: &str, parked_retry_ms: u64) -> Tierd {
    let tierd = Tierd::spawn(
        world,
        &format!(
            "[kafka]\ndead_letter_topic = \"{dlq}\"\n[publish]\nparked_retry_ms = {parked_retry_ms}\n"
        ),
    );
    tierd.wait_partitions(1, Duration::from_secs(60));
    // Its partition's rules sweep done: a new partition commits the sweep's start and end
    // with no input, and the tests that hold the outbox count on those entries being out.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_rules_sweep_partitions_done") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the rules sweep never completed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    tierd
}

/// A bad input record the small dead-letter topic refuses: returns it once it is parked.
fn park_a_big_dead_letter(world: &World, tierd: &Tierd) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    // Incompressible, so that even lz4 leaves it above the topic's 2000 bytes.
    let big = Alphanumeric.sample_string(&mut rand::rng(), 8000);
    let ends = world.produce(&[(Some("c9".into()), big.clone().into_bytes())]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_parked") < 1.0 || world.outbox_len(0) > 0 {
        assert!(std::time::Instant::now() < deadline, "not parked");
        std::thread::sleep(Duration::from_millis(100));
    }
    big
}

/// A tier change the output topic refuses for good (here: larger than its `max.message.bytes`)
/// holds its partition's outbox: the changes before it are published once, the one after it
/// waits (a customer's order matters more than progress), `tierd_outbox_blocked`,
/// `tierd_publish_refused_total` and `/readyz/ingest` say so; once the topic accepts it, it and the
/// held change go out in order, and nothing is published twice.
#[test]
fn a_change_kafka_refuses_holds_the_outbox_in_order_and_nothing_is_sent_twice() {
    use rand::distr::{Alphanumeric, SampleString};
    let world = World::start(1);
    // Uncompressed, so that the record batch's size is known from the records.
    let tierd = Tierd::spawn_with(
        &world,
        "",
        "[kafka.producer]\n\"compression.type\" = \"none\"\n[publish]\nparked_retry_ms = 300\n",
    );
    tierd.wait_partitions(1, Duration::from_secs(60));
    let at = "2026-11-10T10:00:00Z";
    let ends = world.produce_json(&[purchase("a1", "ann", "1.00", at)]);
    world.wait_applied(&ends, Duration::from_secs(60));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(r) = world.read_all(&world.output).into_iter().next() {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ann's change not published"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // A batch holding one change like ann's fits (batch header 61 B, the record's framing
    // ~10 B; changes carry no headers): ~200 B to spare. One whose customer id (in the key
    // and the value) and event id (the cause's, in the value) are 128 random characters is
    // ~376 B larger: ~170 B over. The 120 B leave room for bob's id and amounts.
    let size = first.key.as_ref().map_or(0, Vec::len)
        + first.value.len()
        + first
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    let limit = size + 61 + 100 + 120;
    world
        .broker
        .alter_topic_config(&world.output, "max.message.bytes", &limit.to_string());

    let long = Alphanumeric.sample_string(&mut rand::rng(), 128);
    let long_event = Alphanumeric.sample_string(&mut rand::rng(), 128);
    let ends = world.produce_json(&[
        purchase(&long_event, &long, "1.00", at),
        purchase("b1", "bob", "1.00", at),
    ]);
    // Applied (the outbox cannot drain: `wait_applied` would wait for that too).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while world.partition_meta(0).1 < ends[&0] {
        assert!(std::time::Instant::now() < deadline, "not applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_blocked") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox was never reported blocked: {}",
            tierd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, body) = tierd.get("/readyz/ingest");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("outbox blocked at entry"), "{body}");
    assert!(tierd.metric("tierd_publish_refused_total") >= 1.0);
    // Retries run meanwhile (each an aborted transaction: its abort marker keeps the log end
    // moving, so the output is read once the outbox flows again): bob's change stays in the
    // outbox behind the refused one.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        world.outbox_len(0),
        2,
        "the refused change and bob's after it"
    );
    let customers = |records: &[support::Record]| -> Vec<String> {
        records
            .iter()
            .map(|r| r.json()["customer_id"].as_str().unwrap().to_owned())
            .collect()
    };

    world
        .broker
        .alter_topic_config(&world.output, "max.message.bytes", "1048588");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tierd.metric("tierd_outbox_blocked") > 0.0 || tierd.get("/readyz/ingest").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox never flowed again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while world.outbox_len(0) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox never drained"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // In order, each once: ann's was not published again by the retries.
    assert_eq!(
        customers(&world.read_all(&world.output)),
        vec!["ann".to_owned(), long.clone(), "bob".to_owned()]
    );
}

/// `occurred_at` is bounded by the Kafka message timestamp (not only by tierd's clock) and by
/// `ingest.min_occurred_at`, both as configured: a record whose timestamp is ten days old and
/// whose event time lies two hours after it (but still in the past) is refused under
/// `max_future_skew_s = 3600`, one thirty minutes after it is applied; an event before the
/// configured floor is refused, one after it applied.
#[test]
fn occurred_at_is_bounded_by_the_message_timestamp_and_the_configured_floor() {
    use rdkafka::producer::{FutureRecord, Producer};
    use tierd::model::time::{format_ms, now_ms, parse_rfc3339_ms};
    let world = World::start(1);
    let tierd = Tierd::spawn(
        &world,
        "[ingest]\nmax_future_skew_s = 3600\nmin_occurred_at = \"2020-01-01T00:00:00Z\"\n",
    );
    tierd.wait_partitions(1, Duration::from_secs(60));
    let now = now_ms();
    let ten_days_ago = now - 10 * 86_400_000;
    let floor = parse_rfc3339_ms("2020-01-01T00:00:00Z").unwrap();
    // (Two customers: an event years before another one of the same customer would be
    // `too_late` for its dedup horizon.)
    let records = [
        (
            "r1",
            "uma",
            format_ms(ten_days_ago + 2 * 3_600_000),
            ten_days_ago,
        ),
        (
            "r2",
            "uma",
            format_ms(ten_days_ago + 1_800_000),
            ten_days_ago,
        ),
        ("r3", "vic", format_ms(floor - 86_400_000), now),
        ("r4", "vic", format_ms(floor + 86_400_000), now),
    ];
    let producer = world.producer();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (id, customer, at, timestamp) in &records {
            let bytes = serde_json::to_vec(&purchase(id, customer, "5.00", at)).unwrap();
            producer
                .send(
                    FutureRecord::to(&world.input)
                        .key(*customer)
                        .payload(&bytes)
                        .timestamp(*timestamp),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    });
    producer.flush(Duration::from_secs(10)).unwrap();
    world.wait_applied(&BTreeMap::from([(0, 4)]), Duration::from_secs(60));

    let dead: Vec<(String, String, String)> = world
        .read_all(&world.dlq)
        .iter()
        .map(|r| {
            (
                r.json()["event_id"].as_str().unwrap().to_owned(),
                r.headers["tierd.reason"].clone(),
                r.headers["tierd.detail"].clone(),
            )
        })
        .collect();
    let ids: Vec<(&str, &str)> = dead
        .iter()
        .map(|(id, reason, _)| (id.as_str(), reason.as_str()))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("r1", "timestamp_out_of_range"),
            ("r3", "timestamp_out_of_range")
        ]
    );
    assert!(
        dead[0].2.contains("more than 3600 s after")
            && dead[0].2.contains(&format_ms(ten_days_ago)),
        "measured from the message timestamp: {}",
        dead[0].2
    );
    assert!(dead[1].2.contains("is before 2020-01-01"), "{}", dead[1].2);
    let uma = world.customer_state("uma").unwrap();
    assert_eq!((uma.count, uma.sum), (1, 500), "r2 counts");
    let vic = world.customer_state("vic").unwrap();
    assert_eq!((vic.count, vic.sum), (1, 500), "r4 counts");
}
