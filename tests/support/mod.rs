//! Test harness: real `redis-server` and `tansu` broker processes on free loopback ports (or
//! external ones through `REDIS_URL` / `KAFKA_HOST`), a unique topic set, group and key prefix
//! per test, and the `tierd` binary driven as a user would drive it.
#![allow(dead_code)]

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback TCP port (bound and released; the OS does not hand it out again soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A unique name for this test run.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A Redis server owned by the test (killed on drop), or an external one.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    pub url: String,
    dir: tempfile::TempDir,
}

impl Redis {
    /// A Redis without persistence (tests that never restart it).
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A Redis that fsyncs every write to its append-only file, so [`Redis::restart`] loses
    /// nothing that was acknowledged.
    pub fn start_persistent() -> Self {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        if let Ok(url) = std::env::var("REDIS_URL") {
            return Self {
                child: None,
                port: 0,
                url,
                dir,
            };
        }
        let port = free_port();
        let mut r = Self {
            child: None,
            port,
            url: format!("redis://127.0.0.1:{port}"),
            dir,
        };
        r.spawn(persistent);
        r
    }

    fn spawn(&mut self, persistent: bool) {
        let aof: &[&str] = if persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(aof)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (bash scripts/test.sh installs it)");
        self.child = Some(child);
        wait_port(self.port, "redis-server", Duration::from_secs(10));
    }

    /// Kills Redis (SIGKILL) and starts it again on the same port from its append-only file.
    pub fn restart_persistent(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn(true);
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The Tansu binary: `TANSU_BIN`, else `tansu` on PATH, else `~/.cargo/bin/tansu`.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_bin = Path::new(&home).join(".cargo/bin/tansu");
    if cargo_bin.exists() {
        cargo_bin
    } else {
        "tansu".into()
    }
}

/// A Kafka-API broker owned by the test (Tansu, sqlite storage), or an external one.
pub struct Broker {
    child: Option<Child>,
    port: u16,
    pub addr: String,
    dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        if let Ok(addr) = std::env::var("KAFKA_HOST") {
            return Self {
                child: None,
                port: 0,
                addr,
                dir,
            };
        }
        let port = free_port();
        let mut b = Self {
            child: None,
            port,
            addr: format!("127.0.0.1:{port}"),
            dir,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.path().join("tansu.log")).unwrap();
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tansu must be installed (bash scripts/test.sh installs it)");
        self.child = Some(child);
        wait_port(self.port, "tansu broker", Duration::from_secs(30));
    }

    /// Kills the broker (SIGKILL) and starts it again on the same port and storage.
    pub fn restart(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::thread::sleep(Duration::from_millis(200));
        self.spawn();
    }

    /// Creates topics (retention set explicitly, as Tansu requires), waiting until they exist.
    pub fn create_topics(&self, names: &[&str], partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .create()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| {
                NewTopic::new(n, partitions, TopicReplication::Fixed(1))
                    .set("retention.ms", "604800000")
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let result = rt.block_on(admin.create_topics(&topics, &AdminOptions::new()));
            match result {
                Ok(results)
                    if results.iter().all(|r| match r {
                        Ok(_) => true,
                        Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => true,
                        Err(_) => false,
                    }) =>
                {
                    break
                }
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "creating topics failed: {other:?}"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One test's world: broker, Redis, topics, group and key prefix.
pub struct World {
    pub broker: Broker,
    pub redis: Redis,
    pub input: String,
    pub output: String,
    pub dlq: String,
    pub group: String,
    pub prefix: String,
    pub partitions: i32,
    /// The rules file tierd runs (default: the B2B lifetime preset).
    pub rules: PathBuf,
    /// Extra lines of the `[rules]` table (e.g. `sweep_per_second = 100`).
    pub rules_extra: String,
    /// Extra lines of the `[kafka]` table (e.g. `at_risk_topic = "…"`).
    pub kafka_extra: String,
}

impl World {
    pub fn start(partitions: i32) -> Self {
        Self::start_with(partitions, Redis::start())
    }

    pub fn start_with(partitions: i32, redis: Redis) -> Self {
        let broker = Broker::start();
        let input = unique("purchases");
        let output = unique("changes");
        let dlq = unique("dlq");
        broker.create_topics(&[&input, &output, &dlq], partitions);
        Self {
            broker,
            redis,
            input,
            output,
            dlq,
            group: unique("g"),
            prefix: unique("t"),
            partitions,
            rules: Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/b2b-lifetime.toml"),
            rules_extra: String::new(),
            kafka_extra: String::new(),
        }
    }

    /// The tierd config for this world; `extra` is appended verbatim (more TOML tables).
    pub fn config(&self, api_port: u16, extra: &str) -> String {
        self.config_with(api_port, "", extra)
    }

    /// Like [`World::config`], with extra lines in the `[kafka.consumer]` table.
    pub fn config_with(&self, api_port: u16, consumer: &str, extra: &str) -> String {
        let rules = &self.rules;
        format!(
            r#"
[kafka]
brokers = "{}"
group_id = "{}"
input_topic = "{}"
output_topic = "{}"
dead_letter_topic = "{}"
{}
[kafka.consumer]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"statistics.interval.ms" = "500"
{consumer}
[redis]
url = "{}"
key_prefix = "{}"
[money]
currency = "CNY"
[rules]
path = "{}"
{}
[api]
listen = "127.0.0.1:{api_port}"
{extra}
"#,
            self.broker.addr,
            self.group,
            self.input,
            self.output,
            self.dlq,
            self.kafka_extra,
            self.redis.url,
            self.prefix,
            rules.display(),
            self.rules_extra
        )
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.broker.addr)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()
            .unwrap()
    }

    /// Produces `(key, value)` records in order; returns the next offset per partition.
    pub fn produce(&self, records: &[(Option<String>, Vec<u8>)]) -> BTreeMap<i32, i64> {
        let producer = self.producer();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut ends = BTreeMap::new();
        rt.block_on(async {
            let mut pending = Vec::with_capacity(records.len());
            for (key, value) in records {
                let mut rec: FutureRecord<'_, str, [u8]> =
                    FutureRecord::to(&self.input).payload(value.as_slice());
                if let Some(k) = key {
                    rec = rec.key(k.as_str());
                }
                loop {
                    match producer.send_result(rec) {
                        Ok(d) => {
                            pending.push(d);
                            break;
                        }
                        Err((_, r)) => {
                            rec = r;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
            for d in pending {
                let delivered = d.await.unwrap().map_err(|(e, _)| e).expect("produce");
                let e = ends.entry(delivered.partition).or_insert(0);
                *e = (*e).max(delivered.offset + 1);
            }
        });
        producer.flush(Duration::from_secs(10)).unwrap();
        ends
    }

    /// Produces JSON events keyed by their `customer_id`.
    pub fn produce_json(&self, events: &[serde_json::Value]) -> BTreeMap<i32, i64> {
        let records: Vec<_> = events
            .iter()
            .map(|e| {
                (
                    e["customer_id"].as_str().map(str::to_owned),
                    serde_json::to_vec(e).unwrap(),
                )
            })
            .collect();
        self.produce(&records)
    }

    pub fn partition_meta(&self, partition: i32) -> (i64, i64) {
        let key = format!(
            "{}:{{{}:{}:{}}}:meta",
            self.prefix, self.group, self.input, partition
        );
        let (epoch, next): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("epoch")
            .arg("next_offset")
            .query(&mut self.redis.conn())
            .unwrap();
        (epoch.unwrap_or(0), next.unwrap_or(-1))
    }

    pub fn outbox_len(&self, partition: i32) -> i64 {
        let key = format!(
            "{}:{{{}:{}:{}}}:outbox",
            self.prefix, self.group, self.input, partition
        );
        redis::cmd("XLEN")
            .arg(&key)
            .query(&mut self.redis.conn())
            .unwrap()
    }

    /// Waits until every partition has applied up to `ends` and its outbox is empty.
    pub fn wait_applied(&self, ends: &BTreeMap<i32, i64>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let applied = ends
                .iter()
                .all(|(p, end)| self.partition_meta(*p).1 >= *end);
            let published = (0..self.partitions).all(|p| self.outbox_len(p) == 0);
            if applied && published {
                return;
            }
            let state: Vec<_> = ends
                .iter()
                .map(|(p, end)| (p, self.partition_meta(*p).1, end, self.outbox_len(*p)))
                .collect();
            assert!(
                Instant::now() < deadline,
                "not applied within {timeout:?}: (partition, next, end, outbox) {state:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Customer state as stored (searching every partition).
    pub fn customer_state(&self, customer: &str) -> Option<tierd::domain::CustomerState> {
        let mut conn = self.redis.conn();
        for p in 0..self.partitions {
            let key = format!(
                "{}:{{{}:{}:{}}}:c:{}",
                self.prefix, self.group, self.input, p, customer
            );
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
            if let Some(v) = v {
                return Some(serde_json::from_slice(&v).unwrap());
            }
        }
        None
    }

    /// Every record on `topic` from the beginning up to the current high watermarks.
    pub fn read_all(&self, topic: &str) -> Vec<Record> {
        read_all(&self.broker.addr, topic, self.partitions)
    }
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).unwrap()
    }
}

pub fn read_all(brokers: &str, topic: &str, partitions: i32) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut highs = BTreeMap::new();
    for p in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        if high > 0 {
            highs.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
    }
    let mut out = Vec::new();
    if highs.is_empty() {
        return out;
    }
    consumer.assign(&tpl).unwrap();
    let mut done = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.len() < highs.len() {
        assert!(Instant::now() < deadline, "reading {topic} timed out");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    h.value
                                        .map(|v| String::from_utf8_lossy(v).into_owned())
                                        .unwrap_or_default(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
                if m.offset() + 1 >= highs[&m.partition()] {
                    done.insert(m.partition(), ());
                }
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// A running `tierd run` process (killed on drop).
pub struct Tierd {
    child: Option<Child>,
    pub api: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tierd {
    pub fn spawn(world: &World, extra: &str) -> Self {
        Self::spawn_with(world, "", extra)
    }

    /// Spawns with extra `[kafka.consumer]` properties (e.g. an eager assignor).
    pub fn spawn_with(world: &World, consumer: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("tierd.toml");
        std::fs::File::create(&config)
            .unwrap()
            .write_all(world.config_with(port, consumer, extra).as_bytes())
            .unwrap();
        let log = dir.path().join("tierd.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tierd"))
            .args(["run", "--config"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("TEST_TIERD_RUST_LOG")
                    .unwrap_or_else(|_| "info,librdkafka=warn".into()),
            )
            .env("TIERD_PUBLISH__INTERVAL_MS", "100")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut t = Self {
            child: Some(child),
            api: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = t.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tierd exited with {status} at startup:\n{}", t.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "tierd API did not listen within 60 s:\n{}",
                t.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        t
    }

    /// Process id of the running tierd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Value of an unlabelled metric (or the sum over its labels).
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").1;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until this instance owns `n` partitions.
    pub fn wait_partitions(&self, n: i64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.metric("tierd_partitions_assigned") as i64 != n {
            assert!(
                Instant::now() < deadline,
                "tierd did not own {n} partitions in {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET path` → (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            match reqwest::get(format!("{}{path}", self.api)).await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            }
        })
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("tierd did not stop within 60 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tierd {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.starts_with("  "))
                .rev()
                .take(40)
                .collect();
            eprintln!("--- last lines of tierd's log ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A purchase event as JSON.
pub fn purchase(event_id: &str, customer: &str, amount: &str, at: &str) -> serde_json::Value {
    serde_json::json!({"event_id": event_id, "customer_id": customer, "amount": amount, "currency": "CNY", "occurred_at": at})
}

/// A refund event as JSON.
pub fn refund(event_id: &str, customer: &str, amount: &str, at: &str) -> serde_json::Value {
    serde_json::json!({"event_id": event_id, "customer_id": customer, "amount": amount, "occurred_at": at, "type": "refund"})
}
