//! Prometheus metrics (one registry) and the internal events that update them together with
//! their log line ([`events`]), so logs and metrics never drift apart.

pub mod events;
pub mod recent;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;

/// All of tierd's metrics. Labels come from small fixed sets: partition, reason, tier names.
#[derive(Debug, Clone)]
pub struct Telemetry {
    registry: Registry,
    /// Input messages received from Kafka.
    pub events_consumed: IntCounterVec,
    /// Input events counted into customer state.
    pub events_applied: IntCounterVec,
    /// Input events recognised as duplicates of an already counted `event_id`.
    pub events_deduplicated: IntCounterVec,
    /// Input messages sent to the dead-letter topic, by reason.
    pub events_dead_lettered: IntCounterVec,
    /// Tier changes committed, by from/to/reason.
    pub tier_changes: IntCounterVec,
    /// Wall time of one batch's decode + load + commit.
    pub batch_apply_seconds: Histogram,
    /// Events per applied batch.
    pub batch_events: Histogram,
    /// Messages between the partition's high watermark and the next offset to apply.
    pub consumer_lag: IntGaugeVec,
    /// Outbox entries not yet acknowledged by Kafka.
    pub outbox_depth: IntGaugeVec,
    /// Outbox entries published and acknowledged, by kind (`change`, `dead_letter`).
    pub outbox_published: IntCounterVec,
    /// Publish attempts that failed and will be retried.
    pub publish_errors: IntCounter,
    /// Records Kafka refused permanently (too large, not authorized, …), by kind.
    pub publish_refused: IntCounterVec,
    /// Dead letters set aside after a permanent refusal, awaiting a retry.
    pub outbox_parked: IntGaugeVec,
    /// Retries of parked dead letters, by result (`delivered`, `refused`, `failed`, and
    /// `removed`: delivered before, its removal from Redis had failed).
    pub parked_retries: IntCounterVec,
    /// 1 while a partition's outbox is blocked by a change Kafka refuses permanently.
    pub outbox_blocked: IntGaugeVec,
    /// `tierd_outbox_full{partition}`.
    pub outbox_full: IntGaugeVec,
    /// What a partition's state cache holds, bytes as counted against `ingest.cache_bytes`.
    pub state_cache_bytes: IntGaugeVec,
    /// Customers in a partition's state cache.
    pub state_cache_customers: IntGaugeVec,
    /// Outbox producers that found themselves fenced by a newer owner's producer.
    pub publish_fenced: IntCounter,
    /// Commits refused because another owner claimed the partition.
    pub apply_fenced: IntCounter,
    /// Redis calls that failed and were retried.
    pub redis_errors: IntCounter,
    /// Partitions currently owned.
    pub partitions_assigned: IntGauge,
    /// Assigned partitions that are not processed (their runner stopped).
    pub partitions_stopped: IntGauge,
    /// Input partitions with records to apply whose stored offset has not moved for
    /// `ingest.stall_alarm_s` (whoever owns them, or nobody).
    pub input_partitions_stalled: IntGauge,
    /// Offsets skipped between batches (transaction markers, aborted transactions' records,
    /// compaction).
    pub offset_gaps: IntCounter,
    /// Offset commits to Kafka (for lag dashboards) sent and not answered yet: one periodic
    /// commit at most, plus one at a revocation (a commit that stays in flight means the group
    /// coordinator does not answer).
    pub kafka_commits_in_flight: IntGauge,
    /// Timers fired (time-driven evaluations), by cause.
    pub timers_fired: IntCounterVec,
    /// At-risk notices committed.
    pub at_risk_notices: IntCounter,
    /// Customers re-evaluated by a rules-version sweep.
    pub rules_sweep_customers: IntCounter,
    /// Partitions whose rules-version sweep is complete.
    pub rules_sweep_done: IntGauge,
    /// Customers re-evaluated because rank cut-offs moved.
    pub rank_reevaluated: IntCounter,
    /// Rank cut-off searches across a Redis Cluster's nodes repeated because their
    /// verification found the counts moved around the value (commits meanwhile).
    pub cutoff_searches_repeated: IntCounter,
    /// Published cut-offs switches applied again by a replay after Redis lost writes.
    pub cutoffs_replayed: IntCounter,
    /// Claims whose replay after Redis lost writes fell back to the running rules (or whose
    /// Redis lost a raised floor): the partition's sequence floor was raised.
    pub sequence_floors_raised: IntCounter,
    /// Customers told their tier again after a replay (see [`crate::engine::restate`]).
    pub tiers_restated: IntCounter,
    /// Read-backs of the output topic for a restatement that failed (retried).
    pub restate_failures: IntCounter,
    /// Time to compute rank cut-offs (partition 0's owner).
    pub rank_recompute_seconds: Histogram,
    /// 1, labelled with tierd's version and the rules version it runs.
    pub build_info: IntGaugeVec,
    /// Time to answer an HTTP request, by route (the matched pattern) and status code.
    pub http_request_seconds: HistogramVec,
    /// Customers per tier in each owned partition (read from Redis at each scrape: the
    /// pyramid is the sum over partitions, of the max over the instances reporting each).
    pub tier_customers: IntGaugeVec,
    /// Customers of each owned partition with a pending time-driven evaluation (read from
    /// Redis at each scrape).
    pub timers_pending: IntGaugeVec,
    /// When the rank cut-offs in force were computed, Unix seconds (read from Redis at each
    /// scrape, under rank-based rules only: no series otherwise, nor before the first
    /// computation).
    pub cutoffs_computed: GaugeVec,
    /// Partitions that stopped processing while assigned, by cause (`fenced`: another owner
    /// claimed it; `diverged`: Redis holds another offset than this owner committed, e.g. it
    /// lost writes; `corrupt`: a stored state cannot be read).
    pub partition_stops: IntCounterVec,
    /// Tasks that died (`consumer`: the Kafka consumer thread; `runner`, `publisher`: a
    /// partition's), each also failing `/healthz` (see [`crate::liveness`]).
    pub tasks_died: IntCounterVec,
    /// The latest tier changes this instance committed (the status page).
    pub recent: std::sync::Arc<recent::RecentChanges>,
    /// Flows between tiers over the last hour (the status page).
    pub flows: std::sync::Arc<recent::FlowHistory>,
    /// Every metric name registered, for checks that dashboards and alerts only use real ones.
    names: Vec<String>,
}

/// What an instance reads from Redis for `/metrics` about one owned partition.
#[derive(Debug, Clone, Default)]
pub struct PartitionGauges {
    /// The partition.
    pub partition: i32,
    /// Customers per tier name.
    pub tiers: HashMap<String, i64>,
    /// Members of the partition's timer index.
    pub timers: i64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Never in practice: metric names are static and registered once per registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let names = std::cell::RefCell::new(Vec::<String>::new());
        let register = |c: Box<dyn prometheus::core::Collector>| {
            names
                .borrow_mut()
                .extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(c).expect("unique metric");
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(g.clone()));
            g
        };
        let batch_apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tierd_batch_apply_duration_seconds",
                "Time to decode, load and commit one partition batch.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("valid metric");
        register(Box::new(batch_apply_seconds.clone()));
        let batch_events = Histogram::with_opts(
            HistogramOpts::new(
                "tierd_batch_events",
                "Input messages per applied partition batch.",
            )
            .buckets(vec![1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0]),
        )
        .expect("valid metric");
        register(Box::new(batch_events.clone()));
        let partitions_assigned = IntGauge::new(
            "tierd_partitions_assigned",
            "Input partitions owned by this instance.",
        )
        .expect("valid metric");
        register(Box::new(partitions_assigned.clone()));

        // Process CPU, memory, open file descriptors and threads (`process_*`).
        #[cfg(target_os = "linux")]
        register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let t = Self {
            events_consumed: counter_vec(
                "tierd_events_consumed_total",
                "Input messages received from Kafka.",
                &["partition"],
            ),
            events_applied: counter_vec(
                "tierd_events_applied_total",
                "Input events counted into customer state.",
                &["partition"],
            ),
            events_deduplicated: counter_vec(
                "tierd_events_deduplicated_total",
                "Input events whose event_id was already counted.",
                &["partition"],
            ),
            events_dead_lettered: counter_vec(
                "tierd_events_dead_lettered_total",
                "Input messages sent to the dead-letter topic.",
                &["reason"],
            ),
            tier_changes: counter_vec(
                "tierd_tier_changes_total",
                "Tier changes committed.",
                &["from", "to", "reason"],
            ),
            batch_apply_seconds,
            batch_events,
            consumer_lag: gauge_vec(
                "tierd_consumer_lag_messages",
                "Messages between the high watermark and the next offset to apply.",
                &["partition"],
            ),
            outbox_depth: gauge_vec(
                "tierd_outbox_depth",
                "Outbox entries awaiting publication.",
                &["partition"],
            ),
            outbox_published: counter_vec(
                "tierd_outbox_published_total",
                "Outbox entries acknowledged by Kafka.",
                &["kind"],
            ),
            publish_errors: counter(
                "tierd_publish_errors_total",
                "Failed publish attempts (retried).",
            ),
            publish_refused: counter_vec(
                "tierd_publish_refused_total",
                "Outbox records Kafka refused permanently (parked or blocking; see /readyz/ingest).",
                &["kind"],
            ),
            outbox_parked: gauge_vec(
                "tierd_outbox_parked",
                "Dead letters set aside after a permanent refusal, retried periodically.",
                &["partition"],
            ),
            parked_retries: counter_vec(
                "tierd_outbox_parked_retries_total",
                "Retries of parked dead letters, by result (delivered, refused, failed, removed).",
                &["result"],
            ),
            outbox_blocked: gauge_vec(
                "tierd_outbox_blocked",
                "1 while the partition's outbox waits on a change Kafka refuses permanently.",
                &["partition"],
            ),
            outbox_full: gauge_vec(
                "tierd_outbox_full",
                "1 while the partition's outbox is over publish.outbox_max_entries and it takes no input.",
                &["partition"],
            ),
            state_cache_bytes: gauge_vec(
                "tierd_state_cache_bytes",
                "Bytes the partition's customer state cache holds, as counted against ingest.cache_bytes (ids, stored states and ~128 B per entry).",
                &["partition"],
            ),
            state_cache_customers: gauge_vec(
                "tierd_state_cache_customers",
                "Customers in the partition's state cache.",
                &["partition"],
            ),
            publish_fenced: counter(
                "tierd_publish_fenced_total",
                "Outbox producers fenced by a newer owner of their partition.",
            ),
            apply_fenced: counter(
                "tierd_apply_fenced_total",
                "Commits refused because another owner claimed the partition.",
            ),
            redis_errors: counter("tierd_redis_errors_total", "Failed Redis calls (retried)."),
            partitions_assigned,
            partitions_stopped: {
                let g = IntGauge::new(
                    "tierd_partitions_stopped",
                    "Input partitions assigned to this instance but not processed (fenced or failed; see /readyz/ingest).",
                )
                .expect("valid metric");
                register(Box::new(g.clone()));
                g
            },
            input_partitions_stalled: {
                let g = IntGauge::new(
                    "tierd_input_partitions_stalled",
                    "Input partitions with records to apply whose stored offset has not moved for ingest.stall_alarm_s (owned by any member of the group, or by none).",
                )
                .expect("valid metric");
                register(Box::new(g.clone()));
                g
            },
            kafka_commits_in_flight: {
                let g = IntGauge::new(
                    "tierd_kafka_offset_commits_in_flight",
                    "Offset commits to Kafka (for lag dashboards) not answered yet.",
                )
                .expect("valid metric");
                register(Box::new(g.clone()));
                g
            },
            offset_gaps: counter(
                "tierd_offset_gaps_total",
                "Offset gaps between applied batches.",
            ),
            timers_fired: counter_vec(
                "tierd_timers_fired_total",
                "Time-driven evaluations (timers fired).",
                &["cause"],
            ),
            at_risk_notices: counter(
                "tierd_at_risk_notices_total",
                "At-risk notices committed to the outbox.",
            ),
            rules_sweep_customers: counter(
                "tierd_rules_sweep_customers_total",
                "Customers re-evaluated by a rules-version sweep.",
            ),
            cutoffs_replayed: counter(
                "tierd_cutoffs_replayed_total",
                "Published rank cut-offs switches applied again at their input offsets by a replay after Redis lost writes.",
            ),
            rank_reevaluated: counter(
                "tierd_rank_reevaluated_total",
                "Customers re-evaluated because rank cut-offs moved.",
            ),
            cutoff_searches_repeated: counter(
                "tierd_rank_cutoff_searches_repeated_total",
                "Rank cut-off searches across a Redis Cluster's nodes repeated because their verification found the counts moved around the value (commits meanwhile); after 8 in a row the round keeps the cut-offs in force.",
            ),
            sequence_floors_raised: counter(
                "tierd_sequence_floors_raised_total",
                "Claims whose replay could not reproduce the published changes, or that found Redis had lost a raised floor: later changes are numbered above every published sequence.",
            ),
            tiers_restated: counter(
                "tierd_tiers_restated_total",
                "Customers told their tier again after a replay that could not reproduce the published changes: the last change published for them named another tier.",
            ),
            restate_failures: counter(
                "tierd_restate_failures_total",
                "Read-backs of the output topic for a restatement after a replay that failed (retried).",
            ),
            rank_recompute_seconds: {
                let h = Histogram::with_opts(HistogramOpts::new(
                    "tierd_rank_recompute_seconds",
                    "Time to compute the rank cut-offs over all partitions.",
                ))
                .expect("valid metric");
                register(Box::new(h.clone()));
                h
            },
            rules_sweep_done: {
                let g = IntGauge::new(
                    "tierd_rules_sweep_partitions_done",
                    "Owned partitions whose rules-version sweep is complete.",
                )
                .expect("valid metric");
                register(Box::new(g.clone()));
                g
            },
            build_info: gauge_vec(
                "tierd_build_info",
                "1, labelled with tierd's version and the rules version it runs.",
                &["version", "rules_version"],
            ),
            http_request_seconds: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "tierd_http_request_duration_seconds",
                        "Time to answer an HTTP request, by route pattern and status code.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    ]),
                    &["route", "code"],
                )
                .expect("valid metric");
                register(Box::new(h.clone()));
                h
            },
            tier_customers: gauge_vec(
                "tierd_tier_customers",
                "Customers per tier in each partition this instance owns (read from Redis at each scrape; the pyramid: sum by tier of the max by partition and tier, as old and new owner may both report a partition during a handover).",
                &["partition", "tier"],
            ),
            timers_pending: gauge_vec(
                "tierd_timers_pending",
                "Customers of each owned partition with a pending time-driven evaluation (read from Redis at each scrape).",
                &["partition"],
            ),
            cutoffs_computed: {
                let g = GaugeVec::new(
                    Opts::new(
                        "tierd_rank_cutoffs_computed_timestamp_seconds",
                        "When the rank cut-offs in force were computed, Unix seconds (rank-based rules only; read from Redis at each scrape).",
                    ),
                    &[],
                )
                .expect("valid metric");
                register(Box::new(g.clone()));
                g
            },
            partition_stops: counter_vec(
                "tierd_partition_stops_total",
                "Partitions that stopped processing while assigned, by cause (fenced, diverged, corrupt).",
                &["cause"],
            ),
            tasks_died: counter_vec(
                "tierd_tasks_died_total",
                "Tasks that died (panicked or ended unexpectedly), by task (consumer, runner, publisher); /healthz fails after one.",
                &["task"],
            ),
            recent: std::sync::Arc::default(),
            flows: std::sync::Arc::default(),
            names: Vec::new(),
            registry,
        };
        let mut t = t;
        t.names = names.take();
        for reason in crate::ingest::decode::Reason::ALL {
            t.events_dead_lettered.with_label_values(&[reason.as_str()]);
        }
        for cause in events::StopCause::ALL {
            t.partition_stops.with_label_values(&[cause.as_str()]);
        }
        for task in crate::liveness::Task::ALL {
            t.tasks_died.with_label_values(&[task.as_str()]);
        }
        for cause in crate::model::state::TimeCause::ALL {
            t.timers_fired.with_label_values(&[cause.as_str()]);
        }
        // Records the outbox holds, as labelled by the publisher.
        for kind in ["change", "dead_letter", "at_risk"] {
            t.outbox_published.with_label_values(&[kind]);
            t.publish_refused.with_label_values(&[kind]);
        }
        t
    }

    /// Every metric name registered (histograms without their `_bucket`/`_sum`/`_count`).
    pub fn metric_names(&self) -> &[String] {
        &self.names
    }

    /// The names of the histograms among them (the ones exposed as `_bucket`, `_sum` and
    /// `_count` series).
    pub fn histogram_names(&self) -> Vec<String> {
        use prometheus::core::Collector;
        let histograms: [&dyn Collector; 4] = [
            &self.batch_apply_seconds,
            &self.batch_events,
            &self.rank_recompute_seconds,
            &self.http_request_seconds,
        ];
        histograms
            .iter()
            .flat_map(|h| h.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect()
    }

    /// Sets `tierd_build_info` for the rules version `rules_version`.
    pub fn show_build(&self, rules_version: &str) {
        self.build_info.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), rules_version])
            .set(1);
    }

    /// Shows what was read from Redis for this scrape about the owned partitions: customers
    /// per tier (every tier of `tiers` has a series, 0 if empty) and pending timers. `None`
    /// (Redis did not answer): no series, rather than stale figures, and partitions no longer
    /// owned drop out either way.
    pub fn show_partitions(&self, read: Option<&[PartitionGauges]>, tiers: &[&str]) {
        self.tier_customers.reset();
        self.timers_pending.reset();
        for p in read.unwrap_or_default() {
            let partition = p.partition.to_string();
            for tier in tiers {
                let n = p.tiers.get(*tier).copied().unwrap_or(0);
                self.tier_customers
                    .with_label_values(&[partition.as_str(), tier])
                    .set(n);
            }
            self.timers_pending
                .with_label_values(&[partition.as_str()])
                .set(p.timers);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
