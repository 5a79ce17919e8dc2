//! Wiring: connects Redis and Kafka, checks the topics, starts the API and the consumer
//! thread, and stops them in order when the shutdown future resolves.

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::engine::rules::{Rules, RulesError};
use crate::ingest::consumer::{self, Batching, IngestContext};
use crate::ingest::stalls::{LogEnds, Probe, StallAlarm, Watch};
use crate::liveness::Liveness;
use crate::partition::supervisor::{Supervisor, SupervisorParts};
use crate::partition::{Ownership, Pipeline};
use crate::publish::position::OutboxPositions;
use crate::publish::publisher::Publisher;
use crate::store::connection::Connection;
use crate::telemetry::Telemetry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Why the service could not start (or stopped abnormally). Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The rules file is invalid.
    #[error(transparent)]
    Rules(#[from] RulesError),
    /// A field is invalid (a client cannot be built from it).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Redis is unreachable at `redis.url`.
    #[error("redis.url: cannot use Redis: {0}")]
    Redis(redis::RedisError),
    /// Redis may evict tierd's keys under memory pressure.
    #[error("redis.url: the server's maxmemory-policy is `{policy}`, which may evict tierd's keys (customer state, partition offsets, the outbox) and lose them without a trace; set maxmemory-policy to `noeviction` (or a `volatile-*` policy: tierd's keys have no TTL, but for an export's snapshot, whose eviction only makes the export read again)")]
    Eviction {
        /// The server's policy.
        policy: String,
    },
    /// A Kafka client could not be created (bad pass-through property, …).
    #[error("kafka.{client}: cannot create the {client}: {error}")]
    KafkaClient {
        client: &'static str,
        error: rdkafka::error::KafkaError,
    },
    /// A configured topic does not exist or the cluster is unreachable.
    #[error("{field}: {message}")]
    Topic {
        field: &'static str,
        message: String,
    },
    /// The API cannot listen.
    #[error("api.listen: cannot listen on {addr}: {error}")]
    Listen { addr: String, error: std::io::Error },
    /// A component failed for good while running; tierd stopped in order and must be
    /// restarted (nothing is lost: state, offsets and undelivered changes are in Redis).
    #[error("fatal: {0}")]
    Fatal(String),
    /// A task failed.
    #[error("internal: {0}")]
    Internal(String),
}

/// `publish.position_metadata_bytes` must be below the brokers' `offset.metadata.max.bytes`:
/// every publish round commits a position of up to that size, and the brokers would refuse
/// them all. Not checked (a warning) when the cluster does not say.
async fn check_position_budget(config: &Config) -> Result<(), StartError> {
    let budget = config.publish.position_metadata_bytes;
    match crate::kafka::offset_metadata_max_bytes(&config.kafka).await {
        Ok(max) if budget >= max => Err(crate::config::ConfigError::Invalid {
            field: "publish.position_metadata_bytes",
            message: format!("{budget} is not below the brokers' offset.metadata.max.bytes ({max}): they would refuse every publish round; lower it, or raise the brokers' setting first"),
        }
        .into()),
        Ok(_) => Ok(()),
        Err(error) => {
            warn!(%error, budget, "Cannot read the brokers' offset.metadata.max.bytes: make sure publish.position_metadata_bytes is below it, or publishing will be refused.");
            Ok(())
        }
    }
}

/// Refuses an input topic that Kafka compacts: compaction keeps only the latest record of
/// each key, so a customer's earlier purchases could be removed before tierd applied them —
/// skipped without a trace (a batch would merely start after a gap). Likewise a compacted
/// history topic: it would keep only each partition's latest round. A cluster that does not
/// say (no `DescribeConfigs` permission) gets a warning instead.
async fn check_cleanup(config: &Config) -> Result<(), StartError> {
    let mut topics = vec![(
        "kafka.input_topic",
        &config.kafka.input_topic,
        "compaction keeps only each customer's latest record and could remove purchases before tierd applies them",
    )];
    if !config.kafka.history_topic.is_empty() {
        topics.push((
            "kafka.history_topic",
            &config.kafka.history_topic,
            "compaction keeps only each input partition's latest round, and a replay needs them all",
        ));
    }
    for (field, topic, why) in topics {
        match crate::kafka::cleanup_policy(&config.kafka, topic).await {
            Ok(policy) if policy.contains("compact") => {
                return Err(StartError::Topic {
                    field,
                    message: format!(
                        "topic {topic:?} has cleanup.policy={policy}: {why}; use cleanup.policy=delete (retention)"
                    ),
                })
            }
            Ok(_) => {}
            Err(error) => {
                warn!(%error, topic, field, "Cannot read the topic's cleanup.policy: make sure it is `delete`.");
            }
        }
    }
    Ok(())
}

/// The rules versions of `rules.history`.
///
/// # Errors
/// [`RulesError`] naming the file that is unreadable or invalid.
pub fn load_history(config: &Config) -> Result<Vec<Rules>, RulesError> {
    config
        .rules
        .history
        .iter()
        .map(|path| Rules::load(path, config.money.fraction_digits))
        .collect()
}

/// The API's bearer tokens (`api.token_file`), if any.
///
/// # Errors
/// [`crate::config::ConfigError`] naming `api.token_file`.
pub fn load_tokens(
    config: &Config,
) -> Result<Option<crate::api::auth::Tokens>, crate::config::ConfigError> {
    config
        .api
        .token_file
        .as_deref()
        .map(crate::api::auth::Tokens::load)
        .transpose()
}

/// Runs tierd until `shutdown` resolves.
///
/// # Errors
/// [`StartError`] naming the configuration field to fix.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let rules = Arc::new(Rules::load(
        &config.rules.path,
        config.money.fraction_digits,
    )?);
    info!(
        version = rules.version(),
        tiers = rules.tiers().len(),
        "Rules loaded."
    );
    let history = load_history(&config)?;
    let tokens = load_tokens(&config)?;
    let tls = crate::api::tls::server_config(&config.api)?;

    crate::kafka::check_clients(&config.kafka)?;
    let client = crate::store::client::client(&config.redis)?;
    let redis = connect(client.clone()).await?;
    match crate::store::client::eviction_policy(&redis).await {
        Ok(policy) if crate::store::client::may_evict_tierd_keys(&policy) => {
            return Err(StartError::Eviction { policy });
        }
        Ok(_) => {}
        // A least-privilege ACL user may not run INFO (`@dangerous`): say what to check.
        // (Any error reply of the server, e.g. NOPERM; a connection error still stops startup.)
        Err(error) if error.code().is_some() => {
            warn!(%error, "Cannot read Redis's maxmemory-policy; make sure it is `noeviction` or a `volatile-*` policy (an `allkeys-*` policy may evict tierd's keys).");
        }
        Err(error) => return Err(StartError::Redis(error)),
    }

    let telemetry = Telemetry::new();
    telemetry.show_build(rules.version());
    let pipeline = Arc::new(Pipeline::new(
        &config,
        Arc::clone(&rules),
        telemetry.clone(),
    ));
    for rules in history {
        pipeline.know_rules(rules);
    }
    let (money, keyspace) = (pipeline.money.clone(), pipeline.keyspace.clone());

    let fatal = Arc::new(tokio::sync::Notify::new());
    let liveness = Liveness::new(
        crate::kafka::max_poll_interval(&config.kafka),
        telemetry.clone(),
    );
    let producer_config = crate::kafka::producer_config(&config.kafka);
    let positions = Arc::new(
        OutboxPositions::new(&config.kafka, config.publish.position_metadata_bytes).map_err(
            |error| StartError::KafkaClient {
                client: "consumer",
                error,
            },
        )?,
    );
    let publisher = Publisher {
        producer_config,
        positions: Arc::clone(&positions),
        output_topic: config.kafka.output_topic.clone(),
        dead_letter_topic: config.kafka.dead_letter_topic.clone(),
        at_risk_topic: config
            .kafka
            .at_risk_topic
            .clone()
            .unwrap_or_else(|| config.kafka.output_topic.clone()),
        batch_max: config.publish.batch_max,
        interval: Duration::from_millis(config.publish.interval_ms),
        parked_retry: Duration::from_millis(config.publish.parked_retry_ms),
        rules_text: {
            let pipeline = Arc::clone(&pipeline);
            Arc::new(move |hash| {
                if pipeline.rules.version_hash() == hash {
                    return Some(pipeline.rules.text().to_owned());
                }
                pipeline.known_rules(hash).map(|r| r.text().to_owned())
            })
        },
        telemetry: telemetry.clone(),
        fatal: Arc::clone(&fatal),
    };
    let ownership = Ownership::default();
    let stop = Arc::new(AtomicBool::new(false));
    let supervisor = Supervisor::new(SupervisorParts {
        rt: tokio::runtime::Handle::current(),
        redis_client: client.clone(),
        redis: redis.clone(),
        duty_redis: connect(client.clone()).await?,
        pipeline: Arc::clone(&pipeline),
        publisher,
        positions: Arc::clone(&positions),
        ownership: Arc::clone(&ownership),
        queue: config.ingest.queue_batches,
        shutdown: Arc::clone(&stop),
        callback_patience: crate::kafka::callback_patience(&config.kafka),
        liveness: Arc::clone(&liveness),
    });
    let context = IngestContext::new(
        config.kafka.input_topic.clone(),
        supervisor,
        Batching {
            max_events: config.ingest.batch_max_events,
            max_bytes: config.ingest.batch_max_bytes,
            max_wait: Duration::from_millis(config.ingest.batch_max_wait_ms),
            queue: config.ingest.queue_batches,
        },
        Duration::from_secs(config.ingest.seek_deadline_s),
        Arc::clone(&stop),
        crate::kafka::classic_protocol(&config.kafka),
    );
    let consumer: BaseConsumer<IngestContext> = crate::kafka::consumer_config(&config.kafka)
        // Reports of a partition's end tell wall-clock timers the backlog is applied
        // (`PartitionStatus::caught_up`); not left to `[kafka.consumer]`.
        .set("enable.partition.eof", "true")
        .create_with_context(context)
        .map_err(|error| StartError::KafkaClient {
            client: "consumer",
            error,
        })?;

    let (consumer, partitions) = {
        let kafka = config.kafka.clone();
        let positions = Arc::clone(&positions);
        tokio::task::spawn_blocking(move || {
            let partitions = topic_partitions(&consumer, &kafka.input_topic, "kafka.input_topic")?;
            topic_partitions(&consumer, &kafka.output_topic, "kafka.output_topic")?;
            topic_partitions(
                &consumer,
                &kafka.dead_letter_topic,
                "kafka.dead_letter_topic",
            )?;
            if let Some(topic) = &kafka.at_risk_topic {
                topic_partitions(&consumer, topic, "kafka.at_risk_topic")?;
            }
            if !kafka.history_topic.is_empty() {
                positions.set_history_partitions(topic_partitions(
                    &consumer,
                    &kafka.history_topic,
                    "kafka.history_topic",
                )?);
            }
            Ok::<_, StartError>((consumer, partitions))
        })
        .await
        .map_err(|e| StartError::Internal(e.to_string()))??
    };
    check_position_budget(&config).await?;
    check_cleanup(&config).await?;
    pipeline
        .partitions
        .store(partitions, std::sync::atomic::Ordering::Relaxed);
    info!(
        topic = config.kafka.input_topic,
        partitions, "Input topic found."
    );

    // The shutdown signal's listeners are registered when its future is first polled: from
    // here on SIGTERM/SIGINT stops tierd cleanly. Until now their default action ends the
    // process at once, which holds nothing yet (no API, no claim, not in the group) — and
    // a start waiting on an unreachable Kafka or Redis can be interrupted.
    if futures::FutureExt::now_or_never(shutdown.as_mut()).is_some() {
        info!("Shutdown requested while starting.");
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(&config.api.listen)
        .await
        .map_err(|error| StartError::Listen {
            addr: config.api.listen.clone(),
            error,
        })?;
    info!(addr = %config.api.listen, "API listening.");
    let stall_alarm = Arc::new(StallAlarm::default());
    let log_ends = Arc::new(LogEnds::default());
    let probe = Probe::new(&config.kafka).map_err(|error| StartError::KafkaClient {
        client: "consumer",
        error,
    })?;
    let watch = tokio::spawn(
        Watch {
            redis: redis.clone(),
            keyspace: keyspace.clone(),
            partitions,
            ownership: Arc::clone(&ownership),
            after: Duration::from_secs(config.ingest.stall_alarm_s),
            probe,
            alarm: Arc::clone(&stall_alarm),
            telemetry: telemetry.clone(),
            log_ends: Arc::clone(&log_ends),
        }
        .run(),
    );
    // The status page's flows over the last hour: a snapshot of the tier-change counter a
    // minute.
    let flow_snapshots = {
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let mut minute = tokio::time::interval(Duration::from_secs(60));
            minute.tick().await;
            loop {
                minute.tick().await;
                let totals = crate::telemetry::recent::FlowHistory::totals(&telemetry.tier_changes);
                telemetry.flows.snapshot(std::time::Instant::now(), totals);
            }
        })
    };
    let (ready_max_lag, wall_clock, redis_timeout) = (
        config.api.ready_max_lag,
        config.clock.mode == crate::config::ClockMode::Wall,
        Duration::from_millis(config.api.redis_timeout_ms),
    );
    let api_liveness = Arc::clone(&liveness);
    let history_changes = config.api.history_changes;
    let api = ApiThread::start(listener, client, tls, move |redis| ApiState {
        redis,
        history_changes,
        keyspace,
        partitions,
        ownership,
        ready_max_lag,
        redis_timeout,
        rules,
        money,
        telemetry,
        wall_clock,
        stall_alarm,
        liveness: api_liveness,
        tokens,
        log_ends,
    })
    .await
    .inspect_err(|_| {
        watch.abort();
        flow_snapshots.abort();
    })?;

    // Fault injection for the tests (`--features failpoints`): a slow start.
    fail::fail_point!("starting");
    // Stopped while starting: the consumer never joins the group. (Polled only from the
    // `select!` below, a signal arriving after the consumer thread subscribed would be seen
    // once the group join is under way.)
    if futures::FutureExt::now_or_never(shutdown.as_mut()).is_some() {
        info!("Shutdown requested while starting.");
        watch.abort();
        flow_snapshots.abort();
        api.stop().await;
        info!("Stopped.");
        return Ok(());
    }
    let ingest = {
        let topic = config.kafka.input_topic.clone();
        let commit_interval = Duration::from_millis(config.ingest.kafka_commit_interval_ms);
        let leave_patience = crate::kafka::leave_patience(&config.kafka);
        let report_every = crate::kafka::statistics_interval(&config.kafka);
        let liveness = Arc::clone(&liveness);
        std::thread::Builder::new()
            .name("tierd-ingest".into())
            .spawn(move || {
                consumer::run(
                    consumer,
                    &topic,
                    commit_interval,
                    leave_patience,
                    report_every,
                    &liveness,
                )
            })
            .map_err(|e| StartError::Internal(e.to_string()))?
    };

    let outcome = tokio::select! {
        () = shutdown.as_mut() => {
            info!("Shutdown requested.");
            Ok(())
        }
        () = fatal.notified() => Err(StartError::Fatal("an outbox producer could not be created or initialised (the log says why); fix it and restart tierd".into())),
        () = liveness.consumer_ended() => Err(StartError::Fatal("the Kafka consumer thread ended (the log says why): nothing would be consumed; restart tierd (nothing is lost)".into())),
    };
    liveness.stopping();
    stop.store(true, Ordering::Relaxed);
    let joined = tokio::task::spawn_blocking(move || ingest.join())
        .await
        .map_err(|e| StartError::Internal(e.to_string()))?;
    if joined.is_err() && outcome.is_ok() {
        return Err(StartError::Internal("ingest thread panicked".into()));
    }
    watch.abort();
    flow_snapshots.abort();
    api.stop().await;
    info!("Stopped.");
    outcome
}

/// A connection to Redis (multiplexed, reconnecting), made on the calling runtime: its I/O
/// driver runs there.
async fn connect(client: crate::store::client::RedisClient) -> Result<Connection, StartError> {
    tokio::time::timeout(Duration::from_secs(10), Connection::connect(client))
        .await
        .map_err(|_| {
            StartError::Redis(redis::RedisError::from((
                redis::ErrorKind::Io,
                "connect timed out",
            )))
        })?
        .map_err(StartError::Redis)
}

/// How long a stopping API may take to finish its requests in flight.
const API_STOP_PATIENCE: Duration = Duration::from_secs(5);

/// The API, served on a thread of its own (a single-threaded runtime) with a Redis
/// connection of its own. A lookup then does not queue behind the partition runners' work:
/// not for a worker thread busy applying a batch, nor behind their commit scripts queued on
/// the shared connection (one multiplexed connection answers in order, so a lookup's GET
/// would come back only after every commit sent before it). Redis still runs one command at
/// a time: a lookup arriving during a commit script waits for that script.
struct ApiThread {
    thread: std::thread::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl ApiThread {
    /// Starts serving on `listener` (bound on the caller's runtime) once the thread's Redis
    /// connection is made; `state` builds the handlers' state around it.
    async fn start(
        listener: tokio::net::TcpListener,
        client: crate::store::client::RedisClient,
        tls: Option<Arc<rustls::ServerConfig>>,
        state: impl FnOnce(Connection) -> ApiState + Send + 'static,
    ) -> Result<Self, StartError> {
        use axum::serve::ListenerExt;
        let listener = listener
            .into_std()
            .map_err(|e| StartError::Internal(format!("api listener: {e}")))?;
        let (started, started_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tierd-api".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ =
                            started.send(Err(StartError::Internal(format!("api runtime: {e}"))));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let setup = async {
                        let redis = connect(client).await?;
                        let listener = tokio::net::TcpListener::from_std(listener)
                            .map_err(|e| StartError::Internal(format!("api listener: {e}")))?;
                        Ok::<_, StartError>((redis, listener))
                    };
                    let (redis, listener) = match setup.await {
                        Ok(parts) => parts,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    let _ = started.send(Ok(()));
                    if let Some(tls) = tls {
                        serve_tls(listener, tls, api::router(state(redis)), stopped).await;
                        return;
                    }
                    // Answers are written whole: no Nagle delay waiting for an ACK.
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    let served = axum::serve(listener, api::router(state(redis)))
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                    if let Err(error) = served {
                        warn!(%error, "The API stopped serving.");
                    }
                });
            })
            .map_err(|e| StartError::Internal(format!("api thread: {e}")))?;
        match started_rx.await {
            Ok(Ok(())) => Ok(Self { thread, stop }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StartError::Internal(
                "api thread ended while starting".into(),
            )),
        }
    }

    /// Stops serving (in-flight requests finish) and waits for the thread, at most
    /// `API_STOP_PATIENCE`: a client that keeps a connection open, or a lookup waiting for an
    /// unresponsive Redis, must not hold up the shutdown.
    async fn stop(self) {
        let _ = self.stop.send(());
        let thread = self.thread;
        let joined = tokio::time::timeout(
            API_STOP_PATIENCE,
            tokio::task::spawn_blocking(move || thread.join()),
        )
        .await;
        if joined.is_err() {
            warn!(
                seconds = API_STOP_PATIENCE.as_secs(),
                "The API did not stop in time (a connection still open, or a lookup waiting for Redis); not waiting for it."
            );
        }
    }
}

/// Serves `router` over TLS (`api.tls_cert_file`, and client certificates when
/// `api.tls_client_ca_file` is set) until `stopped` resolves; requests in flight get
/// [`API_STOP_PATIENCE`].
async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(error) => {
            warn!(%error, "The API cannot serve TLS.");
            return;
        }
    };
    let handle = axum_server::Handle::new();
    let stop = handle.clone();
    tokio::spawn(async move {
        let _ = stopped.await;
        stop.graceful_shutdown(Some(API_STOP_PATIENCE));
    });
    let config = axum_server::tls_rustls::RustlsConfig::from_config(tls);
    let served = match axum_server::tls_rustls::from_tcp_rustls(listener, config) {
        Ok(server) => {
            server
                .handle(handle)
                .serve(router.into_make_service())
                .await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = served {
        warn!(%error, "The API stopped serving.");
    }
}

/// Number of partitions of `topic`, or an error naming the config `field`.
fn topic_partitions(
    consumer: &BaseConsumer<IngestContext>,
    topic: &str,
    field: &'static str,
) -> Result<i32, StartError> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(15))
        .map_err(|e| StartError::Topic {
            field,
            message: format!("cannot read metadata of topic {topic:?}: {e}"),
        })?;
    match md.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(t.partitions().len() as i32)
        }
        _ => Err(StartError::Topic {
            field,
            message: format!("topic {topic:?} does not exist; create it first"),
        }),
    }
}
