//! The outbox publisher against the real broker: each partition publishes through its own
//! transactional producer, so a newer owner's producer fences an older one at the broker.
//! A fenced publisher whose Redis claim is gone stops (its records never become visible); one
//! that is still the claimed owner replaces its producer and goes on; a producer that cannot
//! be created at all stops the service instead of spinning.

mod support;

use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::ClientConfig;
use std::sync::Arc;
use std::time::Duration;
use support::{Broker, Redis};
use tierd::publish::health::PublishHealth;
use tierd::publish::position::OutboxPositions;
use tierd::publish::producer::{TxnError, TxnProducer};
use tierd::publish::publisher::{Publisher, Target};
use tierd::store::keys::{Keyspace, PartitionKeys};
use tierd::store::outbox::RulesSweep;
use tierd::telemetry::Telemetry;
use tokio::sync::{watch, Notify};

struct Setup {
    broker: Broker,
    redis: Redis,
    topic: String,
    keys: PartitionKeys,
    publisher: Publisher,
}

fn setup(producer_config: Option<ClientConfig>) -> Setup {
    let broker = Broker::shared();
    let redis = Redis::start();
    let topic = support::unique("changes");
    broker.create_topics(&[&topic], 1);
    let keys = Keyspace::new(&support::unique("t"), "g", "in").partition(0);
    let config = producer_config.unwrap_or_else(|| {
        let mut kafka = tierd::config::Config::default().kafka;
        kafka.brokers = broker.addr.clone();
        tierd::kafka::producer_config(&kafka)
    });
    let mut kafka = tierd::config::Config::default().kafka;
    kafka.brokers = broker.addr.clone();
    kafka.group_id = support::unique("g");
    // Positions are kept per input partition: here the one partition of the test topic.
    kafka.input_topic = topic.clone();
    let publisher = Publisher {
        positions: Arc::new(OutboxPositions::new(&kafka, 3500).unwrap()),
        producer_config: config,
        output_topic: topic.clone(),
        dead_letter_topic: topic.clone(),
        at_risk_topic: topic.clone(),
        batch_max: 100,
        interval: Duration::from_millis(50),
        parked_retry: Duration::from_secs(1),
        rules_text: Arc::new(|_| None),
        telemetry: Telemetry::new(),
        fatal: Arc::new(Notify::new()),
    };
    Setup {
        broker,
        redis,
        topic,
        keys,
        publisher,
    }
}

fn add_change(
    conn: &mut tierd::store::client::SyncConnection,
    outbox: &str,
    customer: &str,
    body: &str,
) {
    let _: String = redis::cmd("XADD")
        .arg(outbox)
        .arg("*")
        .arg("t")
        .arg("c")
        .arg("k")
        .arg(customer)
        .arg("v")
        .arg(body)
        .arg("h")
        .arg("")
        .query(conn)
        .unwrap();
}

fn set_epoch(conn: &mut tierd::store::client::SyncConnection, meta: &str, epoch: i64) {
    let _: () = redis::cmd("HSET")
        .arg(meta)
        .arg("epoch")
        .arg(epoch)
        .query(conn)
        .unwrap();
}

fn outbox_len(conn: &mut tierd::store::client::SyncConnection, outbox: &str) -> i64 {
    redis::cmd("XLEN").arg(outbox).query(conn).unwrap()
}

/// Starts the publisher of partition 0 as the owner of claim `epoch`.
fn spawn(
    s: &Setup,
    rt: &tokio::runtime::Runtime,
    epoch: i64,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<Notify>,
    watch::Sender<bool>,
) {
    let target = Target {
        partition: 0,
        keys: s.keys.clone(),
        epoch,
        health: Arc::new(PublishHealth::default()),
    };
    let wake = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let client = tierd::store::client::RedisClient::Single(s.redis.client());
    let publisher = s.publisher.clone();
    let w = Arc::clone(&wake);
    let task = rt.spawn(async move {
        let conn = tierd::store::connection::Connection::connect(client)
            .await
            .unwrap();
        publisher.run(target, conn, w, stop_rx).await;
    });
    (task, wake, stop_tx)
}

/// Initialises another producer of the outbox, as a new owner's publisher does: it fences
/// every earlier one.
fn fence(s: &Setup) -> FutureProducer {
    let newer: FutureProducer = s
        .publisher
        .producer_config
        .clone()
        .set("transactional.id", &s.keys.outbox)
        .create()
        .unwrap();
    newer.init_transactions(Duration::from_secs(30)).unwrap();
    newer
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a read_committed consumer sees on the topic, as (key, value) strings.
fn visible(s: &Setup) -> Vec<(String, String)> {
    support::read_all(&s.broker.addr, &s.topic, 1)
        .into_iter()
        .map(|r| {
            (
                String::from_utf8(r.key.unwrap_or_default()).unwrap(),
                String::from_utf8(r.value).unwrap(),
            )
        })
        .collect()
}

/// A newer owner claimed the partition and initialised its producer (as a new owner's
/// publisher does): the old publisher's next round is refused by the broker, its records stay
/// invisible and in the outbox for the new owner, and the old publisher stops.
#[test]
fn a_publisher_fenced_by_a_newer_owner_stops_and_its_records_never_show() {
    let s = setup(None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut conn = s.redis.conn();
    set_epoch(&mut conn, &s.keys.meta, 1);
    add_change(&mut conn, &s.keys.outbox, "alice", "first");
    let (task, wake, _stop) = spawn(&s, &rt, 1);
    wait_until("first change published", Duration::from_secs(30), || {
        outbox_len(&mut conn, &s.keys.outbox) == 0
    });

    // The new owner: a claim raises the epoch, then its producer fences ours.
    set_epoch(&mut conn, &s.keys.meta, 2);
    let _newer = fence(&s);

    add_change(
        &mut conn,
        &s.keys.outbox,
        "alice",
        "second, written by the old owner",
    );
    wake.notify_one();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the fenced publisher stops")
            .unwrap();
    });
    assert_eq!(
        visible(&s),
        vec![("alice".to_owned(), "first".to_owned())],
        "only the first change is visible: the fenced round was aborted"
    );
    assert_eq!(
        outbox_len(&mut conn, &s.keys.outbox),
        1,
        "left for the new owner"
    );
    assert_eq!(
        tierd::telemetry::Telemetry::render(&s.publisher.telemetry)
            .lines()
            .find(|l| l.starts_with("tierd_publish_fenced_total"))
            .unwrap(),
        "tierd_publish_fenced_total 1"
    );
}

/// Fenced while its claim is still the current one (nothing newer owns the partition, e.g. a
/// leftover producer with the same id): the publisher replaces its producer and goes on, and
/// every change is visible exactly once.
#[test]
fn a_publisher_fenced_while_still_the_owner_replaces_its_producer() {
    let s = setup(None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut conn = s.redis.conn();
    set_epoch(&mut conn, &s.keys.meta, 1);
    add_change(&mut conn, &s.keys.outbox, "bob", "1");
    let (task, wake, stop) = spawn(&s, &rt, 1);
    wait_until("first change published", Duration::from_secs(30), || {
        outbox_len(&mut conn, &s.keys.outbox) == 0
    });
    let _other = fence(&s);
    add_change(&mut conn, &s.keys.outbox, "bob", "2");
    add_change(&mut conn, &s.keys.outbox, "bob", "3");
    wake.notify_one();
    wait_until("the rest published", Duration::from_secs(60), || {
        outbox_len(&mut conn, &s.keys.outbox) == 0
    });
    assert!(!task.is_finished(), "the owner keeps publishing");
    let _ = stop.send(true);
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await })
        .expect("stops when told")
        .unwrap();
    let values: Vec<String> = visible(&s).into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, ["1", "2", "3"], "each change once, in order");
}

/// A publisher whose claim is no longer current (a newer owner claimed the partition while it
/// started) stands down before it initialises a producer: initialising would fence the
/// rightful owner's producer and abort its open transaction. Before: it initialised first
/// and checked its claim after, and the owner's commit here failed, fenced.
#[test]
fn a_publisher_whose_claim_is_gone_does_not_fence_the_owner() {
    use rdkafka::producer::FutureRecord;
    let s = setup(None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut conn = s.redis.conn();
    set_epoch(&mut conn, &s.keys.meta, 2);
    // The owner (claim 2) has a transaction open.
    let owner = fence(&s);
    owner.begin_transaction().unwrap();
    rt.block_on(owner.send(
        FutureRecord::to(&s.topic).key("owner").payload("o1"),
        Duration::from_secs(10),
    ))
    .unwrap();
    add_change(&mut conn, &s.keys.outbox, "stale", "x");

    // An earlier owner's publisher (claim 1) starts.
    let (task, _wake, _stop) = spawn(&s, &rt, 1);
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await })
        .expect("the stale publisher stands down")
        .unwrap();
    owner
        .commit_transaction(Duration::from_secs(30))
        .expect("the owner was not fenced");
    assert_eq!(
        visible(&s),
        [("owner".to_owned(), "o1".to_owned())],
        "only the owner's record"
    );
    assert_eq!(
        outbox_len(&mut conn, &s.keys.outbox),
        1,
        "left to the owner"
    );
}

/// A producer that cannot even be created (here: librdkafka refuses the settings) stops the
/// service, naming the problem in the log, instead of retrying for ever; the outbox keeps the
/// undelivered record.
#[test]
fn a_producer_that_cannot_be_created_stops_the_service_and_keeps_the_outbox() {
    let mut bad = ClientConfig::new();
    bad.set("bootstrap.servers", "127.0.0.1:1")
        .set("transaction.timeout.ms", "5000")
        .set("message.timeout.ms", "60000");
    let s = setup(Some(bad));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut conn = s.redis.conn();
    set_epoch(&mut conn, &s.keys.meta, 1);
    add_change(&mut conn, &s.keys.outbox, "carol", "x");
    let fatal = Arc::clone(&s.publisher.fatal);
    let (task, _wake, _stop) = spawn(&s, &rt, 1);
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), fatal.notified())
            .await
            .expect("the service is told to stop");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the publisher stops")
            .unwrap();
    });
    assert_eq!(outbox_len(&mut conn, &s.keys.outbox), 1);
}

/// Adds a rules-sweep record (never produced: it goes into the published position).
fn add_sweep(conn: &mut tierd::store::client::SyncConnection, outbox: &str, sweep: &RulesSweep) {
    let _: String = redis::cmd("XADD")
        .arg(outbox)
        .arg("*")
        .arg("t")
        .arg("s")
        .arg("k")
        .arg("")
        .arg("v")
        .arg(serde_json::to_string(sweep).unwrap())
        .arg("h")
        .arg("")
        .query(conn)
        .unwrap();
}

/// One rules version's completion and the next one's start published in one round (an owner
/// killed after its completing commit, the next version's owner publishing both): the
/// published position keeps both, the completion with the earlier sweep. It kept only the
/// later one, and a replay over them could not tell the earlier sweep had completed.
#[test]
fn a_sweeps_completion_and_the_next_start_published_together_are_both_recorded() {
    let s = setup(None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut conn = s.redis.conn();
    set_epoch(&mut conn, &s.keys.meta, 1);
    let sweep = |offset, rules, done| RulesSweep {
        offset,
        at: 1_000,
        rules,
        from: Some(3),
        done,
    };
    add_sweep(&mut conn, &s.keys.outbox, &sweep(10, 7, Some(25)));
    add_change(&mut conn, &s.keys.outbox, "alice", "1");
    add_sweep(&mut conn, &s.keys.outbox, &sweep(30, 8, None));
    add_change(&mut conn, &s.keys.outbox, "bob", "2");
    let (task, _wake, stop) = spawn(&s, &rt, 1);
    wait_until("published", Duration::from_secs(60), || {
        outbox_len(&mut conn, &s.keys.outbox) == 0
    });
    let _ = stop.send(true);
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await })
        .expect("stops when told")
        .unwrap();
    let published = s.publisher.positions.published(0).unwrap();
    assert_eq!(published.earlier_sweeps, vec![sweep(10, 7, Some(25))]);
    assert_eq!(published.sweep, Some(sweep(30, 8, None)));
}

fn ids(conn: &mut tierd::store::client::SyncConnection, stream: &str) -> Vec<String> {
    entries(conn, stream)
        .ids
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// Empties `outbox` and writes the entries `written` back into it: a change, a dead letter and
/// a change (as a Redis restored from before their trim would hold them).
fn refill(conn: &mut tierd::store::client::SyncConnection, outbox: &str, written: &[String]) {
    let _: i64 = redis::cmd("DEL").arg(outbox).query(conn).unwrap();
    for (id, code) in written.iter().zip(["c", "d", "c"]) {
        add_entry(conn, outbox, id, code, "x");
    }
}

/// Every entry of `stream`, with its fields.
fn entries(
    conn: &mut tierd::store::client::SyncConnection,
    stream: &str,
) -> redis::streams::StreamRangeReply {
    redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap()
}

fn add_with_id(
    conn: &mut tierd::store::client::SyncConnection,
    outbox: &str,
    id: &str,
    body: &str,
) {
    add_entry(conn, outbox, id, "c", body);
}

/// Adds an entry of kind `code` (`c` change, `d` dead letter) with the id `id`.
fn add_entry(
    conn: &mut tierd::store::client::SyncConnection,
    outbox: &str,
    id: &str,
    code: &str,
    body: &str,
) {
    let _: String = redis::cmd("XADD")
        .arg(outbox)
        .arg(id)
        .arg("t")
        .arg(code)
        .arg("k")
        .arg("dave")
        .arg("v")
        .arg(body)
        .arg("h")
        .arg("")
        .query(conn)
        .unwrap();
}

/// Each publish transaction commits the round's last outbox id to Kafka with its records. A
/// publisher that died between its Kafka commit and its trim leaves published entries in the
/// outbox: the next claim trims them (read from Kafka) instead of publishing them again. And
/// when Redis lost writes so that the outbox is behind what Kafka has, the claim trims what is
/// left and moves the stream's id past the published one, so a new entry is never taken for
/// an old one.
#[test]
fn the_published_position_lives_in_kafka_and_a_claim_trims_what_went_out() {
    let s = setup(None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut conn = s.redis.conn();
    set_epoch(&mut conn, &s.keys.meta, 1);
    for body in ["1", "2", "3"] {
        add_change(&mut conn, &s.keys.outbox, "dave", body);
    }
    let written = ids(&mut conn, &s.keys.outbox);
    let (task, _wake, stop) = spawn(&s, &rt, 1);
    wait_until("published", Duration::from_secs(30), || {
        outbox_len(&mut conn, &s.keys.outbox) == 0
    });
    let _ = stop.send(true);
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await })
        .unwrap()
        .unwrap();
    let published = s.publisher.positions.published(0).unwrap();
    assert_eq!(published.last_id.as_deref(), Some(written[2].as_str()));

    // The trim "did not happen": the same entries are back (a crash between commit and trim).
    let restore = |conn: &mut tierd::store::client::SyncConnection| {
        let _: i64 = redis::cmd("DEL").arg(&s.keys.outbox).query(conn).unwrap();
        for (id, body) in written.iter().zip(["1", "2", "3"]) {
            add_with_id(conn, &s.keys.outbox, id, body);
        }
    };
    restore(&mut conn);
    // A publisher started on them (the owner restarted without a new claim, or a claim that
    // read the position before the old producer's last commit) reads the position after
    // initialising its producer and publishes none of them again.
    let (task, _wake, stop) = spawn(&s, &rt, 1);
    wait_until("stale entries trimmed", Duration::from_secs(30), || {
        outbox_len(&mut conn, &s.keys.outbox) == 0
    });
    let _ = stop.send(true);
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await })
        .unwrap()
        .unwrap();
    let values: Vec<String> = visible(&s).into_iter().map(|(_, v)| v).collect();
    assert_eq!(values, ["1", "2", "3"], "nothing published twice");

    // A claim trims them too, before anyone publishes. A dead letter among them went out
    // with its round: trimmed as well, not parked.
    refill(&mut conn, &s.keys.outbox, &written);
    let claim = tierd::store::partition::claim(
        &mut conn,
        &s.keys,
        published.last_id.as_deref(),
        &[],
        "v1",
        "",
        None,
    )
    .unwrap();
    assert!(!claim.outbox_behind);
    assert!(
        ids(&mut conn, &s.keys.outbox).is_empty(),
        "published entries trimmed"
    );
    assert_eq!(claim.parked_again, 0);
    assert!(ids(&mut conn, &s.keys.parked).is_empty(), "nothing parked");

    // The same entries brought back by a Redis restored from before the dead letter's parking
    // (the stream not behind): the published position names it as parked, so it is parked
    // again; a listed id after the published one is not published yet, left in the outbox.
    refill(&mut conn, &s.keys.outbox, &written);
    let later = format!("{}-0", super_id(&written[2]).0 + 1000);
    add_entry(&mut conn, &s.keys.outbox, &later, "d", "y");
    let listed = [written[1].clone(), later.clone(), "1-0".to_owned()];
    let claim = tierd::store::partition::claim(
        &mut conn,
        &s.keys,
        published.last_id.as_deref(),
        &listed,
        "v1",
        "",
        None,
    )
    .unwrap();
    assert!(!claim.outbox_behind);
    assert_eq!(claim.parked_again, 1);
    assert_eq!(
        ids(&mut conn, &s.keys.outbox),
        [later],
        "published trimmed, the later kept"
    );
    let parked = entries(&mut conn, &s.keys.parked);
    assert_eq!(parked.ids.len(), 1, "the listed letter parked again");
    let origin: String = parked.ids[0].get("i").unwrap();
    assert_eq!(origin, written[1], "with the outbox id it had");
    let _: i64 = redis::cmd("DEL")
        .arg(&s.keys.parked)
        .arg(&s.keys.outbox)
        .query(&mut conn)
        .unwrap();

    // Redis lost writes: the stream is behind what Kafka has. The published id is put an hour
    // ahead, so that only the claim's XSETID can make a new entry sort after it.
    let ahead = format!("{}-5", super_id(&written[2]).0 + 3_600_000);
    let _: i64 = redis::cmd("DEL")
        .arg(&s.keys.outbox)
        .query(&mut conn)
        .unwrap();
    add_with_id(&mut conn, &s.keys.outbox, &written[0], "1");
    // A dead letter brought back may have been parked, its parking lost too: parked again.
    add_entry(&mut conn, &s.keys.outbox, &written[1], "d", "bad");
    let claim =
        tierd::store::partition::claim(&mut conn, &s.keys, Some(&ahead), &[], "v1", "", None)
            .unwrap();
    assert!(claim.outbox_behind);
    assert!(ids(&mut conn, &s.keys.outbox).is_empty());
    assert_eq!(claim.parked_again, 1);
    let parked = entries(&mut conn, &s.keys.parked);
    assert_eq!(parked.ids.len(), 1, "the dead letter is parked again");
    let field = |name: &str| -> String { parked.ids[0].get(name).unwrap() };
    assert_eq!(
        (field("t"), field("k"), field("v"), field("h")),
        (
            "d".to_owned(),
            "dave".to_owned(),
            "bad".to_owned(),
            String::new()
        )
    );
    assert!(field("e").contains("Redis losing writes"), "{}", field("e"));
    assert_eq!(field("i"), written[1], "with the outbox id it had");
    let _: i64 = redis::cmd("DEL")
        .arg(&s.keys.parked)
        .query(&mut conn)
        .unwrap();
    add_change(&mut conn, &s.keys.outbox, "dave", "4");
    let new = ids(&mut conn, &s.keys.outbox);
    assert!(
        super_id(&new[0]) > super_id(&ahead),
        "a new entry sorts after the published position: {new:?} vs {ahead}"
    );

    // The same with no stream at all (Redis lost everything).
    let _: i64 = redis::cmd("DEL")
        .arg(&s.keys.outbox)
        .query(&mut conn)
        .unwrap();
    let claim =
        tierd::store::partition::claim(&mut conn, &s.keys, Some(&ahead), &[], "v1", "", None)
            .unwrap();
    assert!(claim.outbox_behind);
    add_change(&mut conn, &s.keys.outbox, "dave", "5");
    let new = ids(&mut conn, &s.keys.outbox);
    assert!(super_id(&new[0]) > super_id(&ahead), "{new:?}");
}

fn super_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// A transactional call that fails in a way neither a retry nor an abort handles (librdkafka's
/// `__STATE` here: a commit with no transaction begun, a begin inside an open one) leaves the
/// transaction's state unknown. The producer must be replaced (fatal: a new producer's
/// initialisation ends whatever is open), never reused as if its transaction were aborted.
#[test]
fn a_transactional_call_failing_in_an_unknown_state_is_fatal_for_its_producer() {
    let broker = Broker::shared();
    let mut kafka = tierd::config::Config::default().kafka;
    kafka.brokers = broker.addr.clone();
    let config = tierd::kafka::producer_config(&kafka);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let producer = TxnProducer::init_blocking(&config, &support::unique("txn")).unwrap();

    let committed = runtime.block_on(producer.commit(None));
    assert!(
        matches!(committed, Err(TxnError::Fatal(_))),
        "a commit with no transaction begun: {committed:?}"
    );
    producer.begin().unwrap();
    let begun = producer.begin();
    assert!(
        matches!(begun, Err(TxnError::Fatal(_))),
        "a begin inside an open transaction: {begun:?}"
    );
}

/// A history read whose partition holds another partition's transaction still open before the
/// position's record (instances sharing a history partition; an owner killed mid-round): a
/// `read_committed` reader stops at that transaction, and must wait for it (here it commits
/// 3 s later) instead of taking the end it sees for the end of the topic. Before, the read
/// compared its position with the last stable offset, took the record for missing at once,
/// and the replay fell back to the metadata.
#[test]
fn a_history_read_waits_for_a_transaction_open_before_the_positions_record() {
    use tierd::publish::position::{HistoryRecord, Published};
    let broker = Broker::shared();
    let history = support::unique("history");
    broker.create_topics(&[&history], 1);
    let transactional = |id: &str| {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &broker.addr)
            .set("transactional.id", support::unique(id))
            .create()
            .unwrap();
        p.init_transactions(Duration::from_secs(10)).unwrap();
        p.begin_transaction().unwrap();
        p
    };
    let send = |p: &FutureProducer, key: &str, record: &HistoryRecord| {
        let value = serde_json::to_vec(record).unwrap();
        let delivery = p
            .send_result(
                rdkafka::producer::FutureRecord::to(&history)
                    .partition(0)
                    .key(key.as_bytes())
                    .payload(&value),
            )
            .unwrap_or_else(|(e, _)| panic!("{e}"));
        futures::executor::block_on(delivery).unwrap().unwrap();
    };
    let record = |n: u64| HistoryRecord {
        n,
        through: Some(10 * n as i64),
        ..HistoryRecord::default()
    };
    let ours = transactional("ours");
    send(&ours, "our-outbox", &record(1));
    ours.commit_transaction(Duration::from_secs(10)).unwrap();
    // Another partition's round, open before our next one.
    let open = transactional("other");
    send(&open, "other-outbox", &record(1));
    ours.begin_transaction().unwrap();
    send(&ours, "our-outbox", &record(2));
    ours.commit_transaction(Duration::from_secs(10)).unwrap();
    let committer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        open.commit_transaction(Duration::from_secs(10)).unwrap();
    });

    let mut kafka = tierd::config::Config::default().kafka;
    kafka.brokers = broker.addr.clone();
    kafka.group_id = support::unique("g");
    kafka.history_topic = history.clone();
    let positions = OutboxPositions::new(&kafka, 3500).unwrap();
    positions.set_history_partitions(1);
    let published = Published {
        history_records: 2,
        ..Published::default()
    };
    let read = positions.with_history(
        0,
        "our-outbox",
        &published,
        std::time::Instant::now() + Duration::from_secs(60),
        &std::sync::atomic::AtomicBool::new(false),
    );
    committer.join().unwrap();
    assert!(read.is_ok(), "{read:?}");
}

/// An outbox entry the publisher cannot read (headers that are not JSON: corruption, or a
/// binary that writes another layout) fails its round before the transaction begins. Before,
/// the round began its transaction, failed inside it and left it open; the next round's
/// begin then failed, the producer was replaced again and again, and the fifth replacement
/// stopped the whole service. Now the partition's publisher retries (reported), the service
/// runs on, and nothing is lost.
#[test]
fn an_unreadable_outbox_entry_does_not_stop_the_service() {
    let s = setup(None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut conn = s.redis.conn();
    set_epoch(&mut conn, &s.keys.meta, 1);
    let _: String = redis::cmd("XADD")
        .arg(&s.keys.outbox)
        .arg("*")
        .arg("t")
        .arg("c")
        .arg("k")
        .arg("dave")
        .arg("v")
        .arg("x")
        .arg("h")
        .arg("{not json")
        .query(&mut conn)
        .unwrap();
    let fatal = Arc::clone(&s.publisher.fatal);
    let (task, _wake, _stop) = spawn(&s, &rt, 1);
    rt.block_on(async {
        let stopped = tokio::time::timeout(Duration::from_secs(20), fatal.notified()).await;
        assert!(stopped.is_err(), "the service was told to stop");
    });
    assert!(!task.is_finished(), "the publisher runs on");
    assert_eq!(outbox_len(&mut conn, &s.keys.outbox), 1);
}

/// The parking script (`src/store/lua/park.lua`): an entry moves to the parked stream once,
/// with its fields and the reason, and only for the partition's current claim. A second
/// parking of the same entry (a claim and a publisher racing after Redis lost writes) does
/// nothing: parked twice, a letter would be delivered twice.
#[test]
fn parking_moves_an_entry_once_and_only_for_the_current_claim() {
    use tierd::store::outbox::{self, Parked};
    let redis = Redis::start();
    let keys = Keyspace::new(&support::unique("t"), "g", "in").partition(0);
    let mut conn = redis.conn();
    set_epoch(&mut conn, &keys.meta, 3);
    add_entry(&mut conn, &keys.outbox, "5-1", "d", "bad bytes");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = tierd::store::client::RedisClient::Single(redis.client());
    let (fenced, first, again) = rt.block_on(async {
        let mut c = tierd::store::connection::Connection::connect(client.clone())
            .await
            .unwrap();
        let entry = outbox::read(&mut c, &keys.outbox, 1)
            .await
            .unwrap()
            .remove(0);
        let fenced = outbox::park(&mut c, &keys, 2, &entry, "refused")
            .await
            .unwrap();
        let first = outbox::park(&mut c, &keys, 3, &entry, "refused")
            .await
            .unwrap();
        let again = outbox::park(&mut c, &keys, 3, &entry, "refused")
            .await
            .unwrap();
        (fenced, first, again)
    });
    assert_eq!(
        (fenced, first, again),
        (Parked::Fenced, Parked::Parked, Parked::Gone)
    );
    assert!(ids(&mut conn, &keys.outbox).is_empty());
    let parked = entries(&mut conn, &keys.parked);
    assert_eq!(parked.ids.len(), 1, "parked once");
    let field = |name: &str| -> String { parked.ids[0].get(name).unwrap() };
    assert_eq!(
        (field("t"), field("k"), field("v"), field("h"), field("e")),
        (
            "d".to_owned(),
            "dave".to_owned(),
            "bad bytes".to_owned(),
            String::new(),
            "refused".to_owned()
        )
    );
    // With the outbox id it had, read back as the entry's origin.
    assert_eq!(field("i"), "5-1");
    let origin = rt.block_on(async {
        let mut c = tierd::store::connection::Connection::connect(client)
            .await
            .unwrap();
        outbox::read(&mut c, &keys.parked, 1).await.unwrap()[0]
            .origin
            .clone()
    });
    assert_eq!(origin.as_deref(), Some("5-1"));
}
