//! Validation of a loaded configuration: every field outside its allowed range is refused with
//! its name, before anything is started.

use super::{Config, ConfigError};

/// Properties tierd sets itself; passing them through would break its guarantees.
const RESERVED_CONSUMER_KEYS: [(&str, &str); 6] = [
    ("group.id", "is set by tierd itself (use kafka.group_id)"),
    ("bootstrap.servers", "is set by tierd itself (use kafka.brokers)"),
    ("enable.auto.commit", "is set by tierd itself (offsets live in Redis)"),
    ("enable.auto.offset.store", "is set by tierd itself (offsets live in Redis)"),
    (
        "auto.offset.reset",
        "is set by tierd itself: a new partition starts at its beginning, and a partition whose stored offset the log no longer holds is stopped with an error instead of skipping or re-reading events",
    ),
    (
        "enable.partition.eof",
        "is set by tierd itself: its reports of a partition's end tell wall-clock timers that the backlog is applied",
    ),
];

impl Config {
    /// Checks every field's range and the cross-field rules.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad field.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.to_owned(),
            })
        };
        let k = &self.kafka;
        for (field, v) in [
            ("kafka.brokers", &k.brokers),
            ("kafka.group_id", &k.group_id),
            ("kafka.input_topic", &k.input_topic),
            ("kafka.output_topic", &k.output_topic),
            ("kafka.dead_letter_topic", &k.dead_letter_topic),
            ("redis.key_prefix", &self.redis.key_prefix),
        ] {
            if v.trim().is_empty() {
                return bad(field, "must not be empty");
            }
            if v.contains(['{', '}']) && field != "kafka.brokers" {
                return bad(
                    field,
                    "must not contain `{` or `}` (they delimit Redis Cluster hash tags)",
                );
            }
        }
        if !k.history_topic.is_empty() {
            if k.history_topic.trim().is_empty() {
                return bad(
                    "kafka.history_topic",
                    "must be a topic name, or \"\" for none",
                );
            }
            let others = [
                Some(&k.input_topic),
                Some(&k.output_topic),
                Some(&k.dead_letter_topic),
                k.at_risk_topic.as_ref(),
            ];
            if others.into_iter().flatten().any(|t| *t == k.history_topic) {
                return bad(
                    "kafka.history_topic",
                    "must differ from the input, output, dead-letter and at-risk topics",
                );
            }
        }
        if k.input_topic == k.output_topic || k.input_topic == k.dead_letter_topic {
            return bad(
                "kafka.input_topic",
                "must differ from kafka.output_topic and kafka.dead_letter_topic",
            );
        }
        if let Some((key, why)) = RESERVED_CONSUMER_KEYS
            .iter()
            .find(|(key, _)| k.consumer.contains_key(*key))
        {
            return Err(ConfigError::Invalid {
                field: "kafka.consumer",
                message: format!("`{key}` {why}"),
            });
        }
        if k.consumer
            .get("statistics.interval.ms")
            .is_some_and(|v| v.trim().parse::<u64>().is_ok_and(|ms| ms == 0))
        {
            return bad(
                "kafka.consumer",
                "`statistics.interval.ms` = 0 turns off the lag reports that tell a partition it \
                 is caught up (wall-clock timers wait for that, and /readyz/ingest needs the lag)",
            );
        }
        if k.producer.contains_key("transactional.id") {
            return bad(
                "kafka.producer",
                "`transactional.id` is set by tierd: each partition's outbox has its own \
                 (the outbox key name), which fences the partition's previous owner",
            );
        }
        if ![
            "redis://",
            "rediss://",
            "unix://",
            "redis+cluster://",
            "rediss+cluster://",
        ]
        .iter()
        .any(|scheme| self.redis.url.starts_with(scheme))
        {
            return bad(
                "redis.url",
                "must start with redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://",
            );
        }
        let i = &self.ingest;
        if i.batch_max_events == 0 || i.batch_max_events > 100_000 {
            return bad("ingest.batch_max_events", "must be 1..=100000");
        }
        if !(65_536..=268_435_456).contains(&i.batch_max_bytes) {
            return bad("ingest.batch_max_bytes", "must be 65536..=268435456");
        }
        if i.queue_batches == 0 {
            return bad("ingest.queue_batches", "must be at least 1");
        }
        if i.max_message_bytes < 256 {
            return bad("ingest.max_message_bytes", "must be at least 256");
        }
        if !(5..=86_400).contains(&i.stall_alarm_s) {
            return bad("ingest.stall_alarm_s", "must be 5..=86400");
        }
        if !(5..=3600).contains(&i.seek_deadline_s) {
            return bad("ingest.seek_deadline_s", "must be 5..=3600");
        }
        if i.cache_customers_per_partition == 0 {
            return bad("ingest.cache_customers_per_partition", "must be at least 1");
        }
        if i.cache_bytes < 1024 * 1024 {
            return bad("ingest.cache_bytes", "must be at least 1048576 (1 MiB)");
        }
        if crate::model::time::parse_rfc3339_ms(&i.min_occurred_at).is_err() {
            return bad(
                "ingest.min_occurred_at",
                "must be an RFC 3339 timestamp with offset",
            );
        }
        let m = &self.money;
        if m.currency.len() != 3 || !m.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return bad(
                "money.currency",
                "must be a 3-letter upper-case ISO 4217 code",
            );
        }
        if m.fraction_digits > 6 {
            return bad("money.fraction_digits", "must be 0..=6");
        }
        match crate::model::money::parse_threshold(&m.max_amount, m.fraction_digits) {
            Ok(v) if v > 0 && v <= 1_000_000_000_000_000 => {}
            _ => {
                return bad(
                    "money.max_amount",
                    "must be a positive decimal up to 10^15 minor units",
                )
            }
        }
        if self.dedup.horizon_s == 0 {
            return bad("dedup.horizon_s", "must be at least 1");
        }
        if self.dedup.max_ids_per_customer == 0 || self.dedup.max_ids_per_customer > 10_000 {
            return bad("dedup.max_ids_per_customer", "must be 1..=10000");
        }
        let r = &self.ranks;
        if !(100..=86_400_000).contains(&r.recompute_interval_ms) {
            return bad("ranks.recompute_interval_ms", "must be 100..=86400000");
        }
        if !(0.0..=1.0).contains(&r.recompute_population_change) {
            return bad("ranks.recompute_population_change", "must be 0..=1");
        }
        if !(10..=60_000).contains(&r.check_interval_ms) {
            return bad("ranks.check_interval_ms", "must be 10..=60000");
        }
        if !(1..=100_000).contains(&r.reevaluate_page) {
            return bad("ranks.reevaluate_page", "must be 1..=100000");
        }
        if !(10..=1_000_000).contains(&self.rules.sweep_per_second) {
            return bad("rules.sweep_per_second", "must be 10..=1000000");
        }
        if self.clock.lateness_s > 30 * 86_400 {
            return bad("clock.lateness_s", "must be at most 2592000 (30 days)");
        }
        if !(10..=3_600_000).contains(&self.clock.tick_ms) {
            return bad("clock.tick_ms", "must be 10..=3600000");
        }
        if !(1..=100_000).contains(&self.clock.timer_batch) {
            return bad("clock.timer_batch", "must be 1..=100000");
        }
        if self
            .kafka
            .at_risk_topic
            .as_deref()
            .is_some_and(str::is_empty)
        {
            return bad("kafka.at_risk_topic", "must not be empty");
        }
        if self.publish.batch_max == 0 {
            return bad("publish.batch_max", "must be at least 1");
        }
        if !(100..=3_600_000).contains(&self.publish.parked_retry_ms) {
            return bad("publish.parked_retry_ms", "must be 100..=3600000");
        }
        if !(100..=100_000_000).contains(&self.publish.outbox_max_entries) {
            return bad("publish.outbox_max_entries", "must be 100..=100000000");
        }
        if !(1000..=1_000_000).contains(&self.publish.position_metadata_bytes) {
            return bad("publish.position_metadata_bytes", "must be 1000..=1000000");
        }
        if self.publish.interval_ms == 0 {
            return bad("publish.interval_ms", "must be at least 1");
        }
        if !(1024..=900_000).contains(&self.publish.dead_letter_max_bytes) {
            return bad(
                "publish.dead_letter_max_bytes",
                "must be 1024..=900000 (key, headers and value must fit Kafka's default 1 MB record limit)",
            );
        }
        if self.api.history_changes > 100 {
            return bad("api.history_changes", "must be 0..=100");
        }
        let Ok(listen) = self.api.listen.parse::<std::net::SocketAddr>() else {
            return bad("api.listen", "must be an IP:port socket address");
        };
        if self.api.tls_cert_file.is_some() != self.api.tls_key_file.is_some() {
            return bad(
                "api.tls_key_file",
                "api.tls_cert_file and api.tls_key_file are set together (the API's certificate)",
            );
        }
        if self.api.tls_client_ca_file.is_some() && self.api.tls_cert_file.is_none() {
            return bad(
                "api.tls_client_ca_file",
                "client certificates need TLS: set api.tls_cert_file and api.tls_key_file too",
            );
        }
        if !listen.ip().is_loopback()
            && self.api.token_file.is_none()
            && self.api.tls_client_ca_file.is_none()
            && !self.api.allow_unauthenticated
        {
            return bad(
                "api.token_file",
                &format!("api.listen {listen} is reachable from other hosts and the API serves customers' spend: set api.token_file (bearer tokens) or api.tls_client_ca_file (client certificates), or api.allow_unauthenticated = true behind a proxy that authenticates"),
            );
        }
        if self.api.ready_max_lag < 0 {
            return bad("api.ready_max_lag", "must not be negative");
        }
        if !(10..=60_000).contains(&self.api.redis_timeout_ms) {
            return bad("api.redis_timeout_ms", "must be 10..=60000");
        }
        Ok(())
    }
}
