//! Service configuration: one TOML file, every field overridable by a `TIERD_…` environment
//! variable (`TIERD_KAFKA__BROKERS` sets `kafka.brokers`; `__` separates levels), defaults that
//! are safe, and validation that names the bad field.

mod defaults;
mod validate;

use defaults::*;
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable could not be parsed into the schema
    /// (the message names the key and where it came from).
    #[error("configuration: {0}")]
    Parse(String),
    /// A field has a value outside its allowed range.
    #[error("configuration field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka cluster, topics and client properties.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Redis connection and key namespace.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Batching and input validation.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// The currency amounts are in.
    #[serde(default)]
    pub money: MoneyConfig,
    /// Duplicate detection and allowed lateness.
    #[serde(default)]
    pub dedup: DedupConfig,
    /// Which tier rules to run.
    #[serde(default)]
    pub rules: RulesConfig,
    /// Engine time: what "now" is when rules read recency, windows and validity, and when
    /// timers fire.
    #[serde(default)]
    pub clock: ClockConfig,
    /// Rank-based tiers: when cut-offs are recomputed.
    #[serde(default)]
    pub ranks: RanksConfig,
    /// Outbox → Kafka publishing.
    #[serde(default)]
    pub publish: PublishConfig,
    /// HTTP API.
    #[serde(default)]
    pub api: ApiConfig,
}

/// Kafka settings. Nothing here is broker-specific: any Kafka-API cluster works.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated. Default `127.0.0.1:9092`.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Consumer group id; also part of every Redis key, so two groups never share state.
    /// Default `tierd`.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Topic of purchase events (README "Contracts"). Default `purchases`.
    #[serde(default = "default_input_topic")]
    pub input_topic: String,
    /// Topic tier-change events are published to. Default `tier-changes`.
    #[serde(default = "default_output_topic")]
    pub output_topic: String,
    /// Topic rejected input goes to, with its original bytes. Default `purchases-dlq`.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Topic of the partitions' replay history: each publish round that moved rank cut-offs,
    /// fired wall-clock timers or started a rules sweep writes them there, in its
    /// transaction. The published position's offset metadata keeps only the newest
    /// (`publish.position_metadata_bytes`); when Redis loses more than that (a backup
    /// restored from long ago), the replay reads the rest here, so changes published before
    /// come out again with the same bodies. An input partition's records go to the partition
    /// of that number modulo this topic's partition count (do not add partitions to it
    /// later); `cleanup.policy` must be `delete`, and its retention as long as the oldest
    /// Redis backup you may restore. `""` turns it off (the replay reaches as far as the
    /// metadata). Default `tier-history`.
    #[serde(default = "default_history_topic")]
    pub history_topic: String,
    /// Topic of at-risk notices (rules `[policy] at_risk_days`). Default: the output topic
    /// (notices carry `"type": "at_risk"`).
    #[serde(default)]
    pub at_risk_topic: Option<String>,
    /// librdkafka consumer properties, passed through (e.g. `"security.protocol" = "SASL_SSL"`,
    /// `"group.protocol" = "consumer"` for KIP-848). They override tierd's defaults
    /// (`statistics.interval.ms = 2000`, `queued.max.messages.kbytes = 16384`,
    /// `queued.min.messages = 10000`, `fetch.queue.backoff.ms = 10`; under the classic
    /// group protocol also
    /// `partition.assignment.strategy = cooperative-sticky`, `session.timeout.ms = 10000`,
    /// `heartbeat.interval.ms = 1000`, which KIP-848 leaves to the broker). `group.id`,
    /// `bootstrap.servers`, `enable.auto.commit`, `enable.auto.offset.store`,
    /// `auto.offset.reset` and `enable.partition.eof` are tierd's own and cannot be set here.
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// librdkafka producer properties, passed through. They override tierd's defaults
    /// (`acks = all`, `linger.ms = 5`, `compression.type = lz4`, `transaction.timeout.ms =
    /// 10000`); `enable.idempotence` is always true.
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
}

/// Redis settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Connection URL: one server (`redis://`, `rediss://` for TLS, with user/password if
    /// needed), or a Redis Cluster (`redis+cluster://[user:password@]host:port,host:port,…`,
    /// `rediss+cluster://` for TLS: seed nodes, the rest of the cluster is discovered; no
    /// database number). Default `redis://127.0.0.1:6379`.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// Prefix of every key tierd writes. Default `tierd`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// PEM file of the certificate authority that signed the Redis server's certificate
    /// (`rediss://` only). Default: none, the system's trust store is used.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for Redis servers that require one (`tls-auth-clients yes`);
    /// set together with `tls_key_file`. Default: none.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`. Default: none.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
}

/// Ingest batching and input limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// A partition's batch is applied when it holds this many messages. Default 2000.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// …or when its messages (key + value bytes) reach this size, so one commit stays far
    /// below Redis's 1 GB query-buffer limit. Default 4194304 (4 MiB).
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// …or when its oldest message has waited this long, milliseconds. Default 20.
    #[serde(default = "default_batch_max_wait_ms")]
    pub batch_max_wait_ms: u64,
    /// Batches queued per partition before that partition (alone) is paused (backpressure).
    /// Default 16: a pause makes librdkafka drop the partition's prefetched messages and fetch
    /// them again on resume, so a short queue that pauses often halves throughput (1M-event
    /// bench: 44k events/s at 4, 57k at 8, 86k at 16 and 32).
    #[serde(default = "default_queue_batches")]
    pub queue_batches: usize,
    /// Messages larger than this (value bytes) are dead-lettered as `oversize`. Default 65536.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Customer states cached per owned partition (LRU); misses are loaded with one MGET per
    /// batch. Default 100000.
    #[serde(default = "default_cache_customers")]
    pub cache_customers_per_partition: usize,
    /// Memory for all the partitions' state caches together, bytes: shared evenly by the
    /// partitions this instance runs, so the instance's cache takes the same memory whatever it
    /// owns. Each cached customer costs its id, its stored state (~70–350 B, see README
    /// "Memory") and ~128 B of the cache's own. Default 67108864 (64 MiB: ~200k customers of
    /// ~200 B).
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: usize,
    /// `occurred_at` may be at most this far after the Kafka message timestamp or tierd's own
    /// clock, whichever is earlier, seconds. Later is `timestamp_out_of_range`. Default 86400.
    #[serde(default = "default_max_future_skew_s")]
    pub max_future_skew_s: u64,
    /// `occurred_at` before this RFC 3339 instant is `timestamp_out_of_range`.
    /// Default `2000-01-01T00:00:00Z`.
    #[serde(default = "default_min_occurred_at")]
    pub min_occurred_at: String,
    /// How often the applied offsets are committed to Kafka (for lag dashboards only; tierd
    /// resumes from the offsets stored in Redis), milliseconds. Default 5000.
    #[serde(default = "default_commit_interval_ms")]
    pub kafka_commit_interval_ms: u64,
    /// A partition of the input topic whose stored offset has not moved for this long while
    /// it holds records to apply is reported as stalled (`tierd_input_partitions_stalled`, a
    /// log line); an instance that owns no partition while some are stalled says so on
    /// `/readyz/ingest` (the group is not handing them to a live member). Longer than a session
    /// timeout plus a rebalance, so a normal takeover never raises it. Seconds. Default 90.
    #[serde(default = "default_stall_alarm_s")]
    pub stall_alarm_s: u64,
    /// How long a newly claimed partition waits for librdkafka to accept the seek to the
    /// offset stored in Redis (counted from the first try, after the assignment) before it is
    /// stopped (`/readyz/ingest`, `tierd_partitions_stopped`) and claimed again 3 s later, instead
    /// of staying paused while shown as processed. librdkafka refuses the seek while it defers
    /// the partition's fetch start (an offset commit in flight at a slow group coordinator,
    /// partitions still stopping). An unanswered commit ends at the consumer's
    /// `socket.timeout.ms` (60 s by default): only a deadline below it stops the partition
    /// for that cause. Seconds, 5..=3600. Default 60.
    #[serde(default = "default_seek_deadline_s")]
    pub seek_deadline_s: u64,
}

/// The one currency of this deployment: sums across currencies are not meaningful without
/// an exchange rate, so other currencies are rejected (`unknown_currency`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoneyConfig {
    /// ISO 4217 code; events without `currency` are in it. Default `EUR`.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Fraction digits of the currency (2 for EUR/USD/CNY, 0 for JPY, 3 for KWD). Default 2.
    #[serde(default = "default_fraction_digits")]
    pub fraction_digits: u32,
    /// Largest single amount accepted, in currency units (decimal string); larger is
    /// `amount_out_of_range`. Default `"1000000000"` (one billion).
    #[serde(default = "default_max_amount")]
    pub max_amount: String,
}

/// Duplicate detection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// An `event_id` re-sent within this much event time of the customer's latest event is
    /// counted once; events older than that are dead-lettered as `too_late`. Seconds.
    /// Default 604800 (7 days).
    #[serde(default = "default_horizon_s")]
    pub horizon_s: u64,
    /// Ids remembered per customer (~30 bytes each in Redis). Default 64.
    #[serde(default = "default_max_ids")]
    pub max_ids_per_customer: usize,
}

/// Rules selection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Path of the rules file, relative to the working directory.
    /// Default `config/rules/b2b.toml`.
    #[serde(default = "default_rules_path")]
    pub path: PathBuf,
    /// When the rules version changes, each partition re-evaluates its stored customers at
    /// most this many per second (a paced sweep that interleaves with live traffic).
    /// Default 5000.
    #[serde(default = "default_sweep_rate")]
    pub sweep_per_second: u32,
    /// Files of rules versions that ran before the current one (any order). A replay after
    /// Redis lost writes reaching back over several rules changes applies each stretch of
    /// input under the rules it first ran under; the partition keeps the text of its previous
    /// version and tierd remembers every version it saw claimed since it started, so these are
    /// needed only for versions older than that (e.g. after tierd itself restarted).
    /// Default none.
    #[serde(default)]
    pub history: Vec<PathBuf>,
}

/// Outbox publishing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// Outbox entries read and produced per round. Default 2000.
    #[serde(default = "default_publish_batch")]
    pub batch_max: usize,
    /// A partition's outbox is checked at least this often, milliseconds. Default 500.
    #[serde(default = "default_publish_interval_ms")]
    pub interval_ms: u64,
    /// Dead-letter values are cut to this many bytes (header `tierd.truncated` says so).
    /// Default 900000, under Kafka's default 1 MB message limit.
    #[serde(default = "default_dlq_max_bytes")]
    pub dead_letter_max_bytes: usize,
    /// A record Kafka refuses for good (too large for the topic, not authorized) is tried
    /// again this often, milliseconds: a parked dead letter, or a change that blocks its
    /// partition's outbox. Default 30000.
    #[serde(default = "default_parked_retry_ms")]
    pub parked_retry_ms: u64,
    /// Entries a partition's outbox may hold before the partition stops taking input
    /// (backpressure while publishing does not keep up, e.g. Kafka unreachable): it resumes
    /// once the outbox is down to half. Bounds Redis memory. Default 100000.
    #[serde(default = "default_outbox_max_entries")]
    pub outbox_max_entries: u64,
    /// Bytes the published position's offset metadata may take (committed with every publish
    /// round): it keeps the latest rank cut-off moves and wall-clock timer passes, which a
    /// replay after Redis lost writes needs to publish changes again with the same bodies.
    /// The default holds about 15 moves of the pyramid and 30 timer passes. It must stay
    /// below the brokers' `offset.metadata.max.bytes` (4096 by default; startup checks it when
    /// the broker's configuration is readable): raise both together to reach further back.
    /// Default 3500 (1000..=1000000).
    #[serde(default = "default_position_metadata_bytes")]
    pub position_metadata_bytes: usize,
}

/// Which clock drives time-dependent rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockMode {
    /// Live: engine time is the wall clock; timers fire at wall time.
    Wall,
    /// Replayable: a partition's engine time is the latest `occurred_at` it applied minus
    /// `clock.lateness_s`; timers fire as event time passes them. Replaying the same input
    /// gives identical tier changes (ids included), however it is batched or interrupted.
    /// Timers of a partition with no new events do not fire.
    Event,
}

/// Engine time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// `wall` (default) or `event`.
    #[serde(default = "default_clock_mode")]
    pub mode: ClockMode,
    /// `event` mode: how far a partition's clock trails its latest event time, seconds, so
    /// events arriving up to this late are applied before timers due before them fire.
    /// Default 60.
    #[serde(default = "default_clock_lateness_s")]
    pub lateness_s: u64,
    /// `wall` mode: how often each partition looks for due timers, milliseconds. Default 1000.
    #[serde(default = "default_timer_tick_ms")]
    pub tick_ms: u64,
    /// Timers fired per atomic commit (bounds the script's run time). Default 500.
    #[serde(default = "default_timer_batch")]
    pub timer_batch: usize,
}

/// Rank cut-offs (rules with `[ranks]`): computed by the owner of input partition 0,
/// applied by every partition owner to the customers between the old and new cut-offs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RanksConfig {
    /// Cut-offs are recomputed at least this often, milliseconds. Default 10000.
    #[serde(default = "default_rank_interval_ms")]
    pub recompute_interval_ms: u64,
    /// … and as soon as a rank's population changed by more than this fraction since the
    /// last computation. Default 0.01.
    #[serde(default = "default_rank_population_change")]
    pub recompute_population_change: f64,
    /// How often owners look for new cut-offs (and partition 0's owner for a due
    /// recomputation), milliseconds. Default 1000.
    #[serde(default = "default_rank_check_ms")]
    pub check_interval_ms: u64,
    /// Customers re-evaluated per commit when cut-offs move. Default 500.
    #[serde(default = "default_rank_page")]
    pub reevaluate_page: usize,
}

/// HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address. Default `127.0.0.1:8080` (loopback only).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `/readyz/ingest` fails while any owned partition lags more than this many messages.
    /// Default 10000.
    #[serde(default = "default_ready_lag")]
    pub ready_max_lag: i64,
    /// How long a request waits for Redis, milliseconds: a lookup (or the readiness check)
    /// that gets no answer in time is answered 503 `redis_unavailable` (a frozen or
    /// partitioned Redis must not hold a caller that routes on the answer). Default 1000.
    #[serde(default = "default_api_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// File holding the bearer tokens that the routes serving customer data (`/v1/…`)
    /// require as `Authorization: Bearer <token>`: one per line (blank lines and `#`
    /// comments ignored), each at least 32 printable characters. Several lines let a token
    /// be rotated: add the new one, restart, move the clients over, remove the old one. Read
    /// at startup. Health, readiness, metrics and the OpenAPI document stay open (no customer
    /// data). Required when `listen` is not a loopback address, unless
    /// `allow_unauthenticated`. Default: none.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Serve `/v1/…` without a token on a `listen` address other than loopback (behind a
    /// proxy that authenticates, say). Default false: such a configuration is refused at
    /// startup, naming `api.token_file`.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// PEM certificate chain the API presents: with `tls_key_file`, the API serves HTTPS
    /// only. Read at startup. Default: none (plain HTTP).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file` (set together). Default: none.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificate(s): with TLS on, only clients presenting a certificate signed by
    /// one of them are admitted (mutual TLS, for every route). Such an API needs no token
    /// on an address other than loopback (the tokens still apply when `token_file` is set).
    /// Default: none.
    #[serde(default)]
    pub tls_client_ca_file: Option<PathBuf>,
    /// How many of a customer's latest tier changes their state keeps, for
    /// `GET /v1/customers/{id}/history` (0–100; 0 keeps none). Each costs 8–14 bytes plus
    /// its two tier names in the customer's stored state (README "Memory"). A state keeping
    /// history is stored in version 2 of the binary form, which tierd binaries older than
    /// this field cannot read: raise it only once every instance runs a binary that has it
    /// (a rollback to an older binary needs it back at 0 and every state rewritten). Lowered,
    /// each customer's list is trimmed the next time their state is written. Default 0.
    #[serde(default = "default_history_changes")]
    pub history_changes: usize,
}

impl Config {
    /// Loads `path` (if given) and `TIERD_…` environment overrides, then validates.
    ///
    /// # Errors
    /// [`ConfigError`] naming the bad field.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_figment(Self::figment(path))
    }

    /// The layered sources: the file, then the environment.
    pub fn figment(path: Option<&Path>) -> Figment {
        let mut f = Figment::new();
        if let Some(p) = path {
            f = f.merge(Toml::file_exact(p));
        }
        // TIERD_LOG_FORMAT is a command-line setting (clap reads it), not a config field.
        f.merge(Env::prefixed("TIERD_").ignore(&["LOG_FORMAT"]).split("__"))
    }

    /// Extracts and validates from any figment (tests use inline TOML).
    ///
    /// # Errors
    /// [`ConfigError`] naming the bad field.
    pub fn from_figment(f: Figment) -> Result<Self, ConfigError> {
        let cfg: Config = f.extract().map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The largest accepted single amount in minor units (validated at load).
    pub fn max_amount_minor(&self) -> i64 {
        crate::model::money::parse_threshold(&self.money.max_amount, self.money.fraction_digits)
            .unwrap_or(i64::MAX)
    }

    /// The lower bound of `occurred_at` in Unix ms (validated at load).
    pub fn min_occurred_at_ms(&self) -> i64 {
        crate::model::time::parse_rfc3339_ms(&self.ingest.min_occurred_at).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(text: &str) -> Result<Config, ConfigError> {
        Config::from_figment(Figment::from(Toml::string(text)))
    }

    #[test]
    fn example_config_parses() {
        let cfg = Config::load(Some(Path::new("config/tierd.toml"))).unwrap();
        assert_eq!(cfg.kafka.input_topic, "purchases");
        crate::engine::rules::Rules::load(&cfg.rules.path, cfg.money.fraction_digits).unwrap();
    }

    #[test]
    fn defaults_are_safe() {
        let cfg = from("").unwrap();
        assert_eq!(cfg.api.listen, "127.0.0.1:8080");
        assert_eq!(cfg.dedup.horizon_s, 604_800);
        assert_eq!(cfg.ingest.seek_deadline_s, 60);
        assert_eq!(cfg.max_amount_minor(), 100_000_000_000);
    }

    #[test]
    fn errors_name_the_field() {
        let msg = |t: &str| from(t).unwrap_err().to_string();
        assert!(
            msg("[kafka]\nbrokers = 5").contains("kafka.brokers"),
            "{}",
            msg("[kafka]\nbrokers = 5")
        );
        assert!(msg("[kafka]\nbrokr = \"x\"").contains("brokr"));
        assert!(msg("[ingest]\nbatch_max_events = 0").contains("`ingest.batch_max_events`"));
        assert!(msg("[ingest]\nseek_deadline_s = 4").contains("`ingest.seek_deadline_s`"));
        assert!(msg("[ingest]\nseek_deadline_s = 3601").contains("`ingest.seek_deadline_s`"));
        assert!(msg("[money]\ncurrency = \"euro\"").contains("`money.currency`"));
        assert!(msg("[api]\nlisten = \"localhost\"").contains("`api.listen`"));
        // Reachable from other hosts: a token, or an explicit opt-out.
        let open = msg("[api]\nlisten = \"0.0.0.0:8080\"");
        assert!(
            open.contains("`api.token_file`") && open.contains("0.0.0.0:8080"),
            "{open}"
        );
        assert!(msg("[api]\nlisten = \"[::]:8080\"").contains("`api.token_file`"));
        for ok in [
            "[api]\nlisten = \"0.0.0.0:8080\"\ntoken_file = \"/run/secrets/tierd-api\"",
            "[api]\nlisten = \"0.0.0.0:8080\"\nallow_unauthenticated = true",
            "[api]\nlisten = \"[::1]:8080\"",
        ] {
            assert!(from(ok).is_ok(), "{ok}");
        }
        assert!(msg("[kafka.consumer]\n\"group.id\" = \"x\"").contains("`kafka.consumer`"));
        let eof = msg("[kafka.consumer]\n\"enable.partition.eof\" = \"false\"");
        assert!(
            eof.contains("`enable.partition.eof` is set by tierd"),
            "{eof}"
        );
        let reset = msg("[kafka.consumer]\n\"auto.offset.reset\" = \"latest\"");
        assert!(
            reset.contains("`kafka.consumer`")
                && reset.contains("`auto.offset.reset` is set by tierd"),
            "{reset}"
        );
        assert!(
            msg("[ingest]\nmin_occurred_at = \"yesterday\"").contains("`ingest.min_occurred_at`")
        );
        assert!(msg("[kafka]\ngroup_id = \"a{b}\"").contains("`kafka.group_id`"));
        for same in ["purchases", "tier-changes", "purchases-dlq"] {
            let m = msg(&format!("[kafka]\nhistory_topic = \"{same}\""));
            assert!(m.contains("`kafka.history_topic`"), "{m}");
        }
        let m = msg("[kafka]\nhistory_topic = \"a\"\nat_risk_topic = \"a\"");
        assert!(m.contains("`kafka.history_topic`"), "{m}");
        assert!(msg("[kafka]\nhistory_topic = \" \"").contains("`kafka.history_topic`"));
        assert_eq!(from("").unwrap().kafka.history_topic, "tier-history");
        assert_eq!(
            from("[kafka]\nhistory_topic = \"\"")
                .unwrap()
                .kafka
                .history_topic,
            ""
        );
    }

    #[test]
    fn a_history_longer_than_100_changes_is_refused_naming_the_field() {
        let m = from("[api]\nhistory_changes = 101")
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("`api.history_changes`") && m.contains("0..=100"),
            "{m}"
        );
    }
}

#[cfg(test)]
mod env_tests {
    use super::*;

    #[test]
    // figment's Jail closure must return figment's (large) error type.
    #[allow(clippy::result_large_err)]
    fn pass_through_tables_can_be_set_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "TIERD_KAFKA__CONSUMER",
                r#"{"security.protocol"="SASL_SSL","sasl.mechanisms"="PLAIN"}"#,
            );
            jail.set_env("TIERD_KAFKA__BROKERS", "10.0.0.5:9092");
            jail.set_env("TIERD_LOG_FORMAT", "json");
            let cfg = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(cfg.kafka.brokers, "10.0.0.5:9092");
            assert_eq!(
                cfg.kafka
                    .consumer
                    .get("security.protocol")
                    .map(String::as_str),
                Some("SASL_SSL")
            );
            assert_eq!(
                cfg.kafka
                    .consumer
                    .get("sasl.mechanisms")
                    .map(String::as_str),
                Some("PLAIN")
            );
            Ok(())
        });
    }
}
