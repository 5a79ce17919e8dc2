//! A fatal producer error (the idempotent producer can never deliver again) stops the
//! publisher and signals the service to stop, instead of retrying for ever; the undelivered
//! record stays in the outbox for the next run. The producer talks to librdkafka's mock
//! cluster and the fatal error is raised with librdkafka's own test hook.

mod support;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::ClientConfig;
use std::sync::Arc;
use std::time::Duration;
use support::Redis;
use tierd::publish::publisher::Publisher;
use tierd::telemetry::Telemetry;

#[test]
fn a_fatal_producer_error_stops_the_service_and_keeps_the_outbox() {
    let redis = Redis::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("changes", 1, 1).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let outbox = format!("{}:outbox", support::unique("t"));
    let mut conn = redis.conn();
    let _: String = redis::cmd("XADD")
        .arg(&outbox)
        .arg("*")
        .arg("t")
        .arg("c")
        .arg("k")
        .arg("alice")
        .arg("v")
        .arg("{}")
        .arg("h")
        .arg("")
        .query(&mut conn)
        .unwrap();

    // librdkafka's test hook: raise a fatal error as a broker-side sequence violation would.
    let reason = std::ffi::CString::new("injected by test").unwrap();
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            producer.client().native_ptr(),
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        );
    }
    assert!(producer.client().fatal_error().is_some());

    let fatal = Arc::new(tokio::sync::Notify::new());
    let publisher = Publisher {
        producer,
        output_topic: "changes".into(),
        dead_letter_topic: "dlq".into(),
        at_risk_topic: "changes".into(),
        batch_max: 100,
        interval: Duration::from_millis(50),
        telemetry: Telemetry::new(),
        lane: Arc::default(),
        fatal: Arc::clone(&fatal),
    };
    rt.block_on(async {
        let conn =
            redis::aio::ConnectionManager::new(redis::Client::open(redis.url.as_str()).unwrap())
                .await
                .unwrap();
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(publisher.run(
            0,
            outbox.clone(),
            conn,
            Arc::new(tokio::sync::Notify::new()),
            stop_rx,
        ));
        tokio::time::timeout(Duration::from_secs(20), fatal.notified())
            .await
            .expect("the service is told to stop");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the publisher stops")
            .unwrap();
    });
    let left: i64 = redis::cmd("XLEN").arg(&outbox).query(&mut conn).unwrap();
    assert_eq!(left, 1, "the undelivered record stays in the outbox");
}
