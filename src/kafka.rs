//! The one place Kafka client settings are decided: tierd's defaults, then the operator's
//! pass-through librdkafka properties from `[kafka.consumer]` / `[kafka.producer]`.

use crate::config::{ConfigError, KafkaConfig};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext};

/// Consumer settings: manual offsets (Redis holds the real ones), cooperative rebalancing.
///
/// Under the classic group protocol (the default) tierd picks the cooperative-sticky assignor
/// and its own session timing. Under KIP-848 (`group.protocol = "consumer"`, Kafka 4) the
/// broker assigns partitions (always incrementally) and owns the session timing, so those
/// client properties are left unset (librdkafka refuses them there).
pub fn consumer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group_id)
        .set("statistics.interval.ms", "2000") // see `statistics_interval`
        .set("enable.partition.eof", "false");
    if classic_protocol(kafka) {
        c.set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000");
    }
    // Prefetch less than librdkafka's defaults (64 MiB, and at least 100,000 messages per
    // partition): tierd applies far slower than a broker serves, so a deeper prefetch only
    // holds memory (peak RSS, issue 12: ~40 MiB of librdkafka buffers and per-message
    // structures at 4 partitions); each partition also has its own queue of decoded batches
    // (`ingest.queue_batches`). Both can be set in `[kafka.consumer]`.
    c.set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "10000")
        // With a threshold above reached, librdkafka postpones the partition's next fetch
        // by this much (its default: 1000 ms). The threshold counts the consumer queue that
        // all partitions share, so under steady input a short pass over it made fetches come
        // in bursts every second: batches of ~1,700 instead of ~150 events and a median
        // purchase-to-change latency of ~850 ms instead of ~100 ms at 20k events/s
        // (`cargo bench --bench latency`, docs/performance.md). A re-check every 10 ms costs
        // nothing while the queue stays full (no request is sent).
        .set("fetch.queue.backoff.ms", "10");
    for (k, v) in &kafka.consumer {
        c.set(k, v);
    }
    // Offsets live in Redis; Kafka commits are explicit and advisory only.
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Every partition is assigned at an explicit offset (its stored one, or the beginning
        // when it has none). If the log no longer holds the stored offset (records deleted
        // before they were applied; a recreated or truncated topic), librdkafka must not jump
        // elsewhere: it reports the error and tierd stops that partition, naming why.
        .set("auto.offset.reset", "error");
    c
}

/// How long the partition claims of one rebalance callback may retry, and how long a release
/// waits for a runner and then a publisher, on the consumer thread: a third of
/// `max.poll.interval.ms` (librdkafka's default 300 s), at most 30 s, so that a claim or a
/// release stuck while Redis is down never gets the instance evicted from its group. A
/// partition not claimed in time is held, reported as not processed, and claimed again a few
/// seconds later.
pub fn callback_patience(kafka: &KafkaConfig) -> std::time::Duration {
    let max_poll_ms = u64::try_from(max_poll_interval(kafka).as_millis()).unwrap_or(u64::MAX);
    std::time::Duration::from_millis((max_poll_ms / 3).clamp(1_000, 30_000))
}

/// The consumer's `max.poll.interval.ms` (`[kafka.consumer]`, librdkafka's default 300 s):
/// the group evicts a member that does not poll for that long.
pub fn max_poll_interval(kafka: &KafkaConfig) -> std::time::Duration {
    consumer_ms(kafka, "max.poll.interval.ms", 300_000)
}

/// A duration property of `[kafka.consumer]` in milliseconds, `default` when unset (or not
/// a number: the client refuses it at creation).
fn consumer_ms(kafka: &KafkaConfig, key: &str, default: u64) -> std::time::Duration {
    std::time::Duration::from_millis(
        kafka
            .consumer
            .get(key)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default),
    )
}

/// Whether the consumer uses the classic group protocol (not KIP-848's
/// `group.protocol = "consumer"`).
pub fn classic_protocol(kafka: &KafkaConfig) -> bool {
    !kafka
        .consumer
        .get("group.protocol")
        .is_some_and(|p| p.eq_ignore_ascii_case("consumer"))
}

/// How long a stopping instance lets a rebalance in progress finish before it leaves the
/// group (classic protocol): `session.timeout.ms` (tierd's 10 s unless set in
/// `[kafka.consumer]`) — a member that joined and then went silent is kept that long — at
/// most 30 s.
pub fn leave_patience(kafka: &KafkaConfig) -> std::time::Duration {
    consumer_ms(kafka, "session.timeout.ms", 10_000).min(std::time::Duration::from_secs(30))
}

/// How often the consumer's statistics come (`statistics.interval.ms`, tierd's 2 s unless
/// set in `[kafka.consumer]`).
pub fn statistics_interval(kafka: &KafkaConfig) -> std::time::Duration {
    consumer_ms(kafka, "statistics.interval.ms", 2_000)
}

/// Producer settings: idempotent, fully acknowledged, ordered. Each partition's publisher
/// adds its own `transactional.id` (see [`crate::publish::producer`]).
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // A round's records are queued at once and the round waits for all of them: a
        // linger only delays it (25 ms before, ~30 ms of the median purchase-to-change
        // latency at 20k events/s); 5 ms still gathers a round into one request.
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        // A publisher that stalls mid-transaction (a paused process) holds back every
        // read_committed consumer of the output partitions it wrote until the broker aborts
        // the transaction: keep that short. Records time out with it (librdkafka derives
        // message.timeout.ms from it); a timed-out round is aborted as a whole and retried,
        // so no later change can overtake it.
        .set("transaction.timeout.ms", "10000");
    for (k, v) in &kafka.producer {
        c.set(k, v);
    }
    // Idempotence is what keeps order and drops broker-side duplicates on retries.
    c.set("enable.idempotence", "true");
    c
}

/// Builds both Kafka clients from the configuration without connecting, so that a property
/// librdkafka refuses (an unknown name, `security.protocol = "SASL_SSL"` without a CA file it
/// can read, …) stops startup naming the table to fix.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `kafka.consumer` or `kafka.producer`.
pub fn check_clients(kafka: &KafkaConfig) -> Result<(), ConfigError> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::BaseProducer;
    let invalid = |field, e: rdkafka::error::KafkaError| ConfigError::Invalid {
        field,
        message: e.to_string(),
    };
    consumer_config(kafka)
        .create::<BaseConsumer>()
        .map_err(|e| invalid("kafka.consumer", e))?;
    producer_config(kafka)
        .set("transactional.id", "tierd-config-check")
        .create::<BaseProducer>()
        .map_err(|e| invalid("kafka.producer", e))?;
    Ok(())
}

/// librdkafka's `builtin.features` as built into tierd (e.g. `ssl`, `sasl_scram`, `zstd`).
pub fn builtin_features() -> Vec<String> {
    ClientConfig::new()
        .create_native_config()
        .and_then(|c| c.get("builtin.features"))
        .map(|f| f.split(',').map(str::to_owned).collect())
        .unwrap_or_default()
}

/// One resource's configuration entries (DescribeConfigs), read with the producer's client
/// settings: the first broker of the cluster's metadata, or a topic.
///
/// # Errors
/// The cluster did not answer, or refused the request (no `DescribeConfigs` permission).
async fn describe(
    kafka: &KafkaConfig,
    topic: Option<&str>,
) -> Result<std::collections::HashMap<String, Option<String>>, String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    use std::time::Duration;
    let admin: AdminClient<DefaultClientContext> =
        producer_config(kafka).create().map_err(|e| e.to_string())?;
    let admin = std::sync::Arc::new(admin);
    let broker = match topic {
        Some(_) => None,
        None => {
            let admin = std::sync::Arc::clone(&admin);
            Some(
                tokio::task::spawn_blocking(move || {
                    admin
                        .inner()
                        .fetch_metadata(None, Duration::from_secs(10))
                        .map_err(|e| e.to_string())?
                        .brokers()
                        .first()
                        .map(rdkafka::metadata::MetadataBroker::id)
                        .ok_or_else(|| "no broker in the metadata".to_owned())
                })
                .await
                .map_err(|e| e.to_string())??,
            )
        }
    };
    let resource = match (topic, broker) {
        (Some(topic), _) => ResourceSpecifier::Topic(topic),
        (None, Some(broker)) => ResourceSpecifier::Broker(broker),
        (None, None) => unreachable!("a broker id is read when no topic is given"),
    };
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = admin
        .describe_configs(&[resource], &options)
        .await
        .map_err(|e| e.to_string())?;
    let resource = described
        .into_iter()
        .next()
        .ok_or_else(|| "no answer".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(resource
        .entries
        .into_iter()
        .map(|entry| (entry.name, entry.value))
        .collect())
}

/// The brokers' `offset.metadata.max.bytes`, as the first broker of the cluster's metadata
/// reports it (DescribeConfigs): what a committed offset's metadata may take.
///
/// # Errors
/// The cluster did not answer, refused the request (no `DescribeConfigs` permission), or did
/// not report the setting.
pub async fn offset_metadata_max_bytes(kafka: &KafkaConfig) -> Result<usize, String> {
    describe(kafka, None)
        .await?
        .remove("offset.metadata.max.bytes")
        .flatten()
        .ok_or_else(|| "offset.metadata.max.bytes not reported".to_owned())?
        .parse()
        .map_err(|e: std::num::ParseIntError| e.to_string())
}

/// A topic's `cleanup.policy` (DescribeConfigs).
///
/// # Errors
/// The cluster did not answer, refused the request, or did not report the setting.
pub async fn cleanup_policy(kafka: &KafkaConfig, topic: &str) -> Result<String, String> {
    describe(kafka, Some(topic))
        .await?
        .remove("cleanup.policy")
        .flatten()
        .ok_or_else(|| "cleanup.policy not reported".to_owned())
}

#[cfg(test)]
mod tests {
    /// SASL_SSL with SCRAM, TLS and zstd need these in the bundled librdkafka (its crate
    /// features `ssl` and `zstd`); a build without them could not honour the README.
    #[test]
    fn librdkafka_is_built_with_tls_scram_and_zstd() {
        let features = super::builtin_features();
        for f in ["ssl", "sasl_scram", "sasl_plain", "zstd", "lz4"] {
            assert!(
                features.iter().any(|x| x == f),
                "{f} missing from {features:?}"
            );
        }
    }
}

/// Logs a librdkafka error as rust-rdkafka's default context does (same target), except a
/// report of a partition's end: tierd's consumers that ask for those
/// (`enable.partition.eof`) expect them, and rust-rdkafka passes every consumer error
/// through the context's error callback before the poll returns it.
pub fn log_client_error(error: &KafkaError, reason: &str) {
    if !matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
        tracing::error!(target: "rdkafka::client", "librdkafka: {error}: {reason}");
    }
}

/// The context of a plain consumer that asks for reports of a partition's end.
#[derive(Debug, Clone, Copy, Default)]
pub struct EofExpected;

impl ClientContext for EofExpected {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }
}

impl ConsumerContext for EofExpected {}
