//! The default of every configuration field (safe for production unless the README's
//! configuration reference says otherwise), and `Default` for every section.

use super::*;

pub(super) fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
pub(super) fn default_group_id() -> String {
    "tierd".into()
}
pub(super) fn default_input_topic() -> String {
    "purchases".into()
}
pub(super) fn default_output_topic() -> String {
    "tier-changes".into()
}
pub(super) fn default_dead_letter_topic() -> String {
    "purchases-dlq".into()
}
pub(super) fn default_history_topic() -> String {
    "tier-history".into()
}
pub(super) fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".into()
}
pub(super) fn default_key_prefix() -> String {
    "tierd".into()
}
pub(super) const fn default_batch_max_events() -> usize {
    2000
}
pub(super) const fn default_batch_max_bytes() -> usize {
    4 * 1024 * 1024
}
pub(super) const fn default_batch_max_wait_ms() -> u64 {
    20
}
pub(super) const fn default_queue_batches() -> usize {
    16
}
pub(super) const fn default_max_message_bytes() -> usize {
    65536
}
pub(super) const fn default_cache_customers() -> usize {
    100_000
}
pub(super) const fn default_cache_bytes() -> usize {
    64 * 1024 * 1024
}
pub(super) const fn default_max_future_skew_s() -> u64 {
    86_400
}
pub(super) fn default_min_occurred_at() -> String {
    "2000-01-01T00:00:00Z".into()
}
pub(super) const fn default_stall_alarm_s() -> u64 {
    90
}
pub(super) const fn default_seek_deadline_s() -> u64 {
    60
}
pub(super) const fn default_commit_interval_ms() -> u64 {
    5000
}
pub(super) fn default_currency() -> String {
    "EUR".into()
}
pub(super) const fn default_fraction_digits() -> u32 {
    2
}
pub(super) fn default_max_amount() -> String {
    "1000000000".into()
}
pub(super) const fn default_horizon_s() -> u64 {
    7 * 86_400
}
pub(super) const fn default_max_ids() -> usize {
    64
}
pub(super) const fn default_sweep_rate() -> u32 {
    5000
}
pub(super) fn default_rules_path() -> PathBuf {
    "config/rules/b2b.toml".into()
}
pub(super) const fn default_publish_batch() -> usize {
    2000
}
pub(super) const fn default_publish_interval_ms() -> u64 {
    500
}
pub(super) const fn default_parked_retry_ms() -> u64 {
    30_000
}
pub(super) const fn default_outbox_max_entries() -> u64 {
    100_000
}
pub(super) const fn default_position_metadata_bytes() -> usize {
    3500
}
pub(super) const fn default_dlq_max_bytes() -> usize {
    900_000
}
pub(super) const fn default_rank_interval_ms() -> u64 {
    10_000
}
pub(super) const fn default_rank_population_change() -> f64 {
    0.01
}
pub(super) const fn default_rank_check_ms() -> u64 {
    1000
}
pub(super) const fn default_rank_page() -> usize {
    500
}
pub(super) const fn default_clock_mode() -> ClockMode {
    ClockMode::Wall
}
pub(super) const fn default_clock_lateness_s() -> u64 {
    60
}
pub(super) const fn default_timer_tick_ms() -> u64 {
    1000
}
pub(super) const fn default_timer_batch() -> usize {
    500
}
pub(super) fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
pub(super) const fn default_ready_lag() -> i64 {
    10_000
}
pub(super) const fn default_api_redis_timeout_ms() -> u64 {
    1000
}

pub(super) const fn default_history_changes() -> usize {
    0
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                // Every field has a serde default, so an empty table deserializes (the defaults
                // are not validated here: `Config::load` does that).
                toml::from_str("").expect("all fields have defaults")
            }
        }
    )*};
}
default_from_serde!(
    Config,
    KafkaConfig,
    RedisConfig,
    IngestConfig,
    MoneyConfig,
    DedupConfig,
    RulesConfig,
    ClockConfig,
    RanksConfig,
    PublishConfig,
    ApiConfig
);
