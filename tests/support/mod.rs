//! Test harness: real `redis-server` and Apache Kafka (KRaft) processes on free loopback ports
//! (or external ones through `REDIS_URL` / `KAFKA_HOST`), a unique topic set, group and key prefix
//! per test, and the `tierd` binary driven as a user would drive it.
#![allow(dead_code)]

pub mod exact;
pub mod kafka_proxy;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A free loopback TCP port for a server a test starts: bound and released, and below the
/// kernel's ephemeral range (`ip_local_port_range`), which every outgoing connection of every
/// process takes its local port from. A port from `bind(0)` is in that range, and a node of a
/// 3-node Kafka cluster once failed to start because a connection had taken its port
/// meanwhile ("Address already in use"); below it, only another test's random pick can
/// collide.
pub fn free_port() -> u16 {
    use rand::Rng;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 12_000 {
        for _ in 0..100 {
            let port = rand::rng().random_range(10_000..low);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
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

/// Creates (or resets) the ACL user `tierd-app` / `app-secret` without the `@dangerous`
/// commands (no `INFO`, no `CONFIG`) on the server `conn` reaches: the least privilege tierd
/// runs with.
pub fn add_user_without_dangerous_commands(conn: &mut impl redis::ConnectionLike) {
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("tierd-app")
        .arg("on")
        .arg(">app-secret")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-@dangerous")
        .query(conn)
        .unwrap();
}

/// `ACL ARGS…` as the default user of the Redis at `admin_url`.
pub fn acl(admin_url: &str, args: &[&str]) {
    let mut admin = redis::Client::open(admin_url)
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("ACL").arg(args).query(&mut admin).unwrap();
}

/// A Redis server owned by the test (killed on drop), or an external one.
pub struct Redis {
    child: Mutex<Option<Child>>,
    port: u16,
    pub url: String,
    dir: tempfile::TempDir,
    /// `Some((certs, user, password))`: TLS only (no plain port) and an ACL user; the default
    /// user is disabled.
    tls: Option<(Certs, String, String)>,
    /// Clients must present a certificate signed by the CA (`tls-auth-clients yes`).
    client_certs: bool,
    /// `appendfsync` of the append-only file, if persistent.
    appendfsync: Option<&'static str>,
    /// The nodes of a Redis Cluster ([`Redis::start_cluster`]; empty for one server).
    cluster: Vec<ClusterNode>,
}

/// One node of a test's Redis Cluster.
pub struct ClusterNode {
    pub port: u16,
    /// The cluster bus port (given explicitly: the default, port + 10000, may not exist).
    bus_port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
    /// `Some((certs, user, password))`: TLS only (clients, replication and the cluster bus)
    /// and an ACL user; the default user is disabled.
    tls: Option<(Certs, String, String)>,
    /// With TLS: every client must present a certificate signed by the CA
    /// (`tls-auth-clients yes`; the nodes present theirs to each other).
    client_certs: bool,
}

/// Where [`Redis::move_every_slot_of`] moved a master's slots: from and to which node
/// (ports).
pub struct Moved {
    pub from: u16,
    pub to: u16,
}

impl ClusterNode {
    fn spawn(&self) {
        let mut security: Vec<String> = vec!["--port".into(), self.port.to_string()];
        if let Some((certs, user, password)) = &self.tls {
            security = [
                "--port",
                "0",
                "--tls-port",
                &self.port.to_string(),
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
                "--tls-cert-file",
                &certs.server_cert.display().to_string(),
                "--tls-key-file",
                &certs.server_key.display().to_string(),
                "--tls-ca-cert-file",
                &certs.ca.display().to_string(),
                "--tls-auth-clients",
                if self.client_certs { "yes" } else { "no" },
                "--user",
                "default",
                "off",
                "--user",
                user,
                "on",
                &format!(">{password}"),
                "~*",
                "&*",
                "+@all",
                // Replicas log in to their master as that user.
                "--masteruser",
                user,
                "--masterauth",
                password,
            ]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        }
        let child = Command::new("redis-server")
            .args(&security)
            .args(["--cluster-port", &self.bus_port.to_string()])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            // A master that stops answering is failed over after 2 s (default 15 s).
            .args(["--cluster-node-timeout", "2000"])
            // A replica whose link to its master was cut for a while may still take over
            // (the failover tests cut it on purpose).
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (bash scripts/test.sh installs it)");
        *self.child.lock().unwrap() = Some(child);
        wait_port(
            self.port,
            "redis-server (cluster node)",
            Duration::from_secs(10),
        );
    }

    /// A connection to this node alone (over TLS as the ACL user on a TLS cluster).
    pub fn conn(&self) -> redis::Connection {
        let config = match &self.tls {
            None => tierd::config::RedisConfig {
                url: format!("redis://127.0.0.1:{}", self.port),
                ..tierd::config::RedisConfig::default()
            },
            Some((certs, user, password)) => tierd::config::RedisConfig {
                url: format!("rediss://{user}:{password}@127.0.0.1:{}", self.port),
                tls_ca_file: Some(certs.ca.clone()),
                tls_cert_file: self.client_certs.then(|| certs.client_cert.clone()),
                tls_key_file: self.client_certs.then(|| certs.client_key.clone()),
                ..tierd::config::RedisConfig::default()
            },
        };
        match tierd::store::client::client(&config).unwrap() {
            tierd::store::client::RedisClient::Single(c) => c
                .get_connection_with_timeout(Duration::from_secs(5))
                .unwrap(),
            tierd::store::client::RedisClient::Cluster(_) => unreachable!("one node's URL"),
        }
    }

    /// This node's cluster id (`CLUSTER MYID`).
    pub fn id(&self) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.conn())
            .unwrap()
    }

    /// Whether this node is a master now (`ROLE`).
    pub fn is_master(&self) -> bool {
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut self.conn()).unwrap();
        matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master")
            || matches!(role.first(), Some(redis::Value::SimpleString(r)) if r == "master")
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) this node.
    pub fn signal(&self, sig: &str) {
        let pid = self
            .child
            .lock()
            .unwrap()
            .as_ref()
            .expect("a running node")
            .id();
        signal(pid, sig);
    }

    /// The port of the master this node replicates (`None`: it is a master).
    pub fn master_port(&self) -> Option<u16> {
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut self.conn()).unwrap();
        let replica = matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"slave")
            || matches!(role.first(), Some(redis::Value::SimpleString(r)) if r == "slave");
        if !replica {
            return None;
        }
        redis::from_redis_value_ref::<u16>(role.get(2)?).ok()
    }

    /// Kills this node (SIGKILL): not running from then on.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Redis {
    /// A Redis without persistence (tests that never restart it).
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A Redis whose `url` logs in as the ACL user `tierd` (every key and command), and the
    /// default user's URL, for [`acl`] to change the user's rights while tierd runs.
    pub fn start_as_acl_user() -> (Self, String) {
        let mut redis = Self::start();
        let admin = redis.url.clone();
        acl(
            &admin,
            &["SETUSER", "tierd", "on", ">pw", "~*", "&*", "+@all"],
        );
        redis.url = admin.replacen("redis://", "redis://tierd:pw@", 1);
        (redis, admin)
    }

    /// A Redis that fsyncs every write to its append-only file, so [`Redis::restart`] loses
    /// nothing that was acknowledged.
    pub fn start_persistent() -> Self {
        Self::start_with(Some("always"))
    }

    /// A Redis that fsyncs its append-only file once a second, as most deployments run it:
    /// a `kill -9` ([`Redis::restart_persistent`]) loses the last acknowledged writes.
    pub fn start_everysec() -> Self {
        Self::start_with(Some("everysec"))
    }

    fn start_with(appendfsync: Option<&'static str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        if let Ok(url) = std::env::var("REDIS_URL") {
            return Self {
                child: Mutex::new(None),
                port: 0,
                url,
                dir,
                tls: None,
                client_certs: false,
                appendfsync,
                cluster: Vec::new(),
            };
        }
        let port = free_port();
        let r = Self {
            child: Mutex::new(None),
            port,
            url: format!("redis://127.0.0.1:{port}"),
            dir,
            tls: None,
            client_certs: false,
            appendfsync,
            cluster: Vec::new(),
        };
        r.spawn();
        r
    }

    /// A Redis that speaks only TLS (certificates signed by `certs`' CA) and admits only the
    /// ACL user `user`; `url` is `rediss://user:password@127.0.0.1:port`.
    pub fn start_tls(certs: &Certs, user: &str, password: &str) -> Self {
        Self::start_tls_with(certs, user, password, false)
    }

    /// [`Redis::start_tls`] that also requires a client certificate signed by the CA
    /// (`tls-auth-clients yes`); [`Redis::config`] then names `certs`' client certificate.
    pub fn start_mutual_tls(certs: &Certs, user: &str, password: &str) -> Self {
        Self::start_tls_with(certs, user, password, true)
    }

    fn start_tls_with(certs: &Certs, user: &str, password: &str, client_certs: bool) -> Self {
        let port = free_port();
        let r = Self {
            child: Mutex::new(None),
            port,
            url: format!("rediss://{user}:{password}@127.0.0.1:{port}"),
            dir: tempfile::tempdir().unwrap(),
            tls: Some((certs.clone(), user.to_owned(), password.to_owned())),
            client_certs,
            appendfsync: None,
            cluster: Vec::new(),
        };
        r.spawn();
        r
    }

    /// The `[redis]` section tierd is given for this server (TLS trust included).
    pub fn config(&self, key_prefix: &str) -> tierd::config::RedisConfig {
        tierd::config::RedisConfig {
            url: self.url.clone(),
            key_prefix: key_prefix.to_owned(),
            tls_ca_file: self.tls.as_ref().map(|(certs, ..)| certs.ca.clone()),
            tls_cert_file: self
                .tls
                .as_ref()
                .filter(|_| self.client_certs)
                .map(|(certs, ..)| certs.client_cert.clone()),
            tls_key_file: self
                .tls
                .as_ref()
                .filter(|_| self.client_certs)
                .map(|(certs, ..)| certs.client_key.clone()),
        }
    }

    fn spawn(&self) {
        let aof: Vec<&str> = match self.appendfsync {
            Some(fsync) => vec!["--appendonly", "yes", "--appendfsync", fsync],
            None => vec!["--appendonly", "no"],
        };
        let mut args: Vec<String> = vec!["--port".into(), self.port.to_string()];
        if let Some((certs, user, password)) = &self.tls {
            args = vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                self.port.to_string(),
                "--tls-cert-file".into(),
                certs.server_cert.display().to_string(),
                "--tls-key-file".into(),
                certs.server_key.display().to_string(),
                "--tls-ca-cert-file".into(),
                certs.ca.display().to_string(),
                "--tls-auth-clients".into(),
                if self.client_certs { "yes" } else { "no" }.into(),
                "--user".into(),
                "default".into(),
                "off".into(),
                "--user".into(),
                user.clone(),
                "on".into(),
                format!(">{password}"),
                "~*".into(),
                "&*".into(),
                "+@all".into(),
            ];
        }
        let child = Command::new("redis-server")
            .args(&args)
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(aof)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (bash scripts/test.sh installs it)");
        *self.child.lock().unwrap() = Some(child);
        wait_port(self.port, "redis-server", Duration::from_secs(10));
        if self.appendfsync.is_some() {
            // Restarted from its append-only file: it answers LOADING until the data is in.
            let deadline = Instant::now() + Duration::from_secs(60);
            while self
                .client()
                .get_connection()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_err()
            {
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not load its AOF"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Freezes Redis (SIGSTOP; every node of a cluster): connections stay open (and new ones
    /// are accepted by the kernel) and nothing answers, like a stalled or partitioned server.
    /// [`Redis::resume`] lets it go on with everything intact.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Resumes a paused Redis (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if !self.cluster.is_empty() {
            for node in &self.cluster {
                node.signal(sig);
            }
            return;
        }
        let pid = self
            .child
            .lock()
            .unwrap()
            .as_ref()
            .expect("a Redis started by the test")
            .id();
        signal(pid, sig);
    }

    /// Crashes Redis the way a power loss does under `appendfsync everysec`: kills it
    /// (SIGKILL), cuts up to `bytes` off the end of its append-only file — the writes it had
    /// acknowledged but not yet synced to disk (a killed process alone loses nothing: its
    /// writes are in the kernel's page cache) — and starts it again. Returns the bytes cut.
    pub fn crash_losing_tail(&self, bytes: u64) -> u64 {
        self.kill();
        let dir = self.dir.path().join("appendonlydir");
        let newest = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(".incr.aof"))
            .max_by_key(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.split('.').rev().nth(2))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .expect("an incremental AOF file");
        let len = std::fs::metadata(&newest).unwrap().len();
        let cut = bytes.min(len);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&newest)
            .unwrap()
            .set_len(len - cut)
            .unwrap();
        self.spawn();
        cut
    }

    /// Kills Redis (SIGKILL) and starts it again on the same port from its append-only file.
    pub fn restart_persistent(&self) {
        self.kill();
        self.start_again();
    }

    /// Kills Redis (SIGKILL): down until [`Redis::start_again`].
    pub fn kill(&self) {
        if let Some(c) = self.child.lock().unwrap().as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed Redis again on the same port (from its append-only file, if it has one).
    pub fn start_again(&self) {
        self.spawn();
    }

    /// The client tierd would build for this server (TLS trust included); not for a cluster.
    pub fn client(&self) -> redis::Client {
        match tierd::store::client::client(&self.config("tierd")).unwrap() {
            tierd::store::client::RedisClient::Single(client) => client,
            tierd::store::client::RedisClient::Cluster(_) => {
                panic!("Redis::client is one server's: use Redis::conn on a cluster")
            }
        }
    }

    /// A connection as tierd's claims make it (a cluster connection on a cluster).
    pub fn conn(&self) -> tierd::store::client::SyncConnection {
        tierd::store::client::client(&self.config("tierd"))
            .unwrap()
            .sync_connection(Duration::from_secs(5))
            .unwrap()
    }

    /// A Redis Cluster of 3 masters and 3 replicas (`redis-cli --cluster create
    /// --cluster-replicas 1`) on loopback, without persistence; `url` is its
    /// `redis+cluster://` form with the three replicas as seeds.
    pub fn start_cluster() -> Self {
        Self::start_cluster_with(None, false)
    }

    /// [`Redis::start_cluster`] speaking only TLS (clients, replication, cluster bus;
    /// certificates signed by `certs`' CA) and admitting only the ACL user `user`; `url` is
    /// `rediss+cluster://user:password@…`.
    pub fn start_cluster_tls(certs: &Certs, user: &str, password: &str) -> Self {
        Self::start_cluster_with(
            Some((certs.clone(), user.to_owned(), password.to_owned())),
            false,
        )
    }

    /// [`Self::start_cluster_tls`], and every node requires a client certificate signed by
    /// the CA (`tls-auth-clients yes`): `config` gives tierd's.
    pub fn start_cluster_mutual_tls(certs: &Certs, user: &str, password: &str) -> Self {
        Self::start_cluster_with(
            Some((certs.clone(), user.to_owned(), password.to_owned())),
            true,
        )
    }

    fn start_cluster_with(tls: Option<(Certs, String, String)>, client_certs: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Twelve distinct ports (each picked free, but none bound until the nodes start).
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 12 {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let cluster: Vec<ClusterNode> = (0..6)
            .map(|i| {
                let node_dir = dir.path().join(format!("node{i}"));
                std::fs::create_dir(&node_dir).unwrap();
                ClusterNode {
                    port: ports[2 * i],
                    bus_port: ports[2 * i + 1],
                    dir: node_dir,
                    child: Mutex::new(None),
                    tls: tls.clone(),
                    client_certs,
                }
            })
            .collect();
        for node in &cluster {
            node.spawn();
        }
        let addrs: Vec<String> = cluster
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut cli = Command::new("redis-cli");
        if let Some((certs, user, password)) = &tls {
            cli.args(["--tls", "--cacert"]).arg(&certs.ca).args([
                "--user",
                user,
                "--pass",
                password,
                "--no-auth-warning",
            ]);
            if client_certs {
                cli.arg("--cert")
                    .arg(&certs.client_cert)
                    .arg("--key")
                    .arg(&certs.client_key);
            }
        }
        let out = cli
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The seeds are the replicas (`redis-cli` makes the first three nodes the masters):
        // the masters, which serve every command, are found through them.
        let url = match &tls {
            None => format!("redis+cluster://{}", addrs[3..].join(",")),
            Some((_, user, password)) => {
                format!(
                    "rediss+cluster://{user}:{password}@{}",
                    addrs[3..].join(",")
                )
            }
        };
        let redis = Self {
            child: Mutex::new(None),
            port: cluster[0].port,
            url,
            dir,
            tls,
            client_certs,
            appendfsync: None,
            cluster,
        };
        redis.wait_cluster_ok(Duration::from_secs(60));
        redis
    }

    /// The running master of a cluster that serves `key` (the others answer `MOVED`); not
    /// while its slot migrates (the old master answers `ASK` for a key it no longer has).
    pub fn master_holding(&self, key: &str) -> &ClusterNode {
        self.nodes()
            .iter()
            .find(|n| {
                n.child.lock().unwrap().is_some()
                    && n.is_master()
                    && redis::cmd("EXISTS")
                        .arg(key)
                        .query::<i64>(&mut n.conn())
                        .is_ok()
            })
            .expect("the master holding the key")
    }

    /// Moves `slots` slots of master `from` to master `to` (`redis-cli --cluster reshard`, keys
    /// moved one by one, a slot migrating at a time). Non-TLS clusters only. Waits (up to 30 s)
    /// for the nodes to agree on the slots first (right after a reshard they may not yet:
    /// `redis-cli` then refuses to start).
    ///
    /// # Errors
    /// `redis-cli`'s output when it fails.
    pub fn reshard(from: &ClusterNode, to: &ClusterNode, slots: u32) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let out = Command::new("redis-cli")
                .args(["--cluster", "reshard", &format!("127.0.0.1:{}", from.port)])
                .args(["--cluster-from", &from.id(), "--cluster-to", &to.id()])
                .args(["--cluster-slots", &slots.to_string()])
                .arg("--cluster-yes")
                .output()
                .unwrap();
            if out.status.success() {
                return Ok(());
            }
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if !said.contains("fix your cluster problems")
                || started.elapsed() > Duration::from_secs(30)
            {
                return Err(said);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `redis-cli --cluster fix` through `node`: slots left open or unagreed by a reshard
    /// that failed are settled.
    pub fn fix_cluster(node: &ClusterNode) {
        let out = Command::new("redis-cli")
            .args(["--cluster", "fix", &format!("127.0.0.1:{}", node.port)])
            .arg("--cluster-yes")
            .output()
            .unwrap();
        eprintln!("cluster fix: {}", out.status);
    }

    /// Moves every slot of the master holding `key` to another master with
    /// `redis-cli --cluster reshard` (keys move one by one with `MIGRATE`; commands on a slot
    /// in migration are redirected with `ASK` or told `TRYAGAIN`); returns when it is done.
    /// A cluster without TLS (`redis-cli` is given no certificates or user).
    pub fn move_every_slot_of(&self, key: &str) -> Moved {
        let from = self.master_holding(key);
        let to = self
            .nodes()
            .iter()
            .find(|n| n.child.lock().unwrap().is_some() && n.is_master() && n.port != from.port)
            .expect("another master");
        let id = from.id();
        // The slots the node serves, from `CLUSTER NODES` (ranges `a-b` or single slots).
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut from.conn())
            .unwrap();
        let line = text.lines().find(|l| l.starts_with(&id)).unwrap();
        let slots: u32 = line
            .split_whitespace()
            .skip(8)
            .filter(|r| !r.starts_with('['))
            .map(|r| match r.split_once('-') {
                Some((a, b)) => b.parse::<u32>().unwrap() - a.parse::<u32>().unwrap() + 1,
                None => 1,
            })
            .sum();
        let started = Instant::now();
        Self::reshard(from, to, slots).unwrap_or_else(|e| panic!("reshard failed: {e}"));
        eprintln!(
            "moved the {slots} slots of {} to {} in {:?}",
            from.port,
            to.port,
            started.elapsed()
        );
        Moved {
            from: from.port,
            to: to.port,
        }
    }

    /// Fails over the master holding `key` (a cluster's) so that it loses its last
    /// acknowledged writes: its replica is frozen and its replication link cut, a second
    /// later the master is killed (`kill -9`) and the replica let go; waits until the replica
    /// is promoted (`CLUSTER FAILOVER TAKEOVER` if no election within 30 s on a loaded
    /// machine) and the cluster is ok.
    pub fn fail_over_losing_writes(&self, key: &str) {
        let victim = self.master_holding(key);
        let replicas: Vec<&ClusterNode> = self
            .nodes()
            .iter()
            .filter(|n| n.child.lock().unwrap().is_some() && n.master_port() == Some(victim.port))
            .collect();
        let replica = *replicas.first().expect("the master's replica");
        // Its replicas miss the master's last second of writes, then the master dies: frozen
        // (all of them: any one may be elected), and their replication links cut (what the
        // kernel had buffered for them would otherwise still reach them).
        for r in &replicas {
            r.signal("-STOP");
        }
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("replica")
            .query(&mut victim.conn())
            .unwrap();
        std::thread::sleep(Duration::from_secs(1));
        eprintln!("killing the master on port {}", victim.port);
        victim.kill();
        for r in &replicas {
            r.signal("-CONT");
        }
        // The failover: the other masters mark the dead one failed after the node timeout,
        // and its replica takes over its slots.
        let started = std::time::Instant::now();
        let mut took_over = false;
        while !replicas.iter().any(|r| r.is_master()) {
            // Under a loaded machine an election can keep failing; the replica then takes
            // over by itself, as an operator would make it (`CLUSTER FAILOVER TAKEOVER`).
            if started.elapsed() > Duration::from_secs(30) && !took_over {
                eprintln!("no election after 30 s: CLUSTER FAILOVER TAKEOVER");
                let () = redis::cmd("CLUSTER")
                    .arg("FAILOVER")
                    .arg("TAKEOVER")
                    .query(&mut replica.conn())
                    .unwrap();
                took_over = true;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "the replica was not promoted"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("replica promoted after {:?}", started.elapsed());
        self.wait_cluster_ok(Duration::from_secs(60));
    }

    /// The nodes of a cluster (empty for one server).
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.cluster
    }

    /// Waits until every running node of the cluster says `cluster_state:ok`.
    pub fn wait_cluster_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let states: Vec<String> = self
                .cluster
                .iter()
                .filter(|n| n.child.lock().unwrap().is_some())
                .map(|n| {
                    redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query::<String>(&mut n.conn())
                        .map(|i| {
                            i.lines()
                                .find(|l| l.starts_with("cluster_state:"))
                                .unwrap_or("")
                                .trim()
                                .to_owned()
                        })
                        .unwrap_or_else(|e| e.to_string())
                })
                .collect();
            if states.iter().all(|s| s == "cluster_state:ok") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster is not ok within {timeout:?}: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// How many masters of the cluster hold a key matching `pattern`.
    pub fn masters_holding(&self, pattern: &str) -> usize {
        self.cluster
            .iter()
            .filter(|n| n.child.lock().unwrap().is_some() && n.is_master())
            .filter(|n| {
                let (_, found): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(0)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(100_000)
                    .query(&mut n.conn())
                    .unwrap();
                !found.is_empty()
            })
            .count()
    }

    /// Every key matching `pattern`: one SCAN over the server, or over each master of a
    /// cluster (each node asked directly, not through tierd's routing).
    pub fn scan(&self, pattern: &str) -> Vec<String> {
        fn scan_one(conn: &mut impl redis::ConnectionLike, pattern: &str) -> Vec<String> {
            let (mut cursor, mut out) = (0u64, Vec::new());
            loop {
                let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(conn)
                    .unwrap();
                out.extend(found);
                if next == 0 {
                    return out;
                }
                cursor = next;
            }
        }
        if self.cluster.is_empty() {
            return scan_one(&mut self.conn(), pattern);
        }
        let mut out = Vec::new();
        for node in self
            .cluster
            .iter()
            .filter(|n| n.child.lock().unwrap().is_some())
        {
            if node.is_master() {
                out.extend(scan_one(&mut node.conn(), pattern));
            }
        }
        out
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(c) = self.child.lock().unwrap().as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for node in &self.cluster {
            node.kill();
        }
    }
}

/// Test certificates made with `openssl`: a CA, and a server certificate for 127.0.0.1 /
/// localhost signed by it (PEM files, plus a PKCS12 keystore for the Kafka broker).
#[derive(Clone)]
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate (and its key) signed by the CA, for `tls-auth-clients yes`.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// PKCS12 keystore (server key + certificate chain), password [`Certs::STORE_PASSWORD`].
    pub keystore: PathBuf,
}

impl Certs {
    pub const STORE_PASSWORD: &'static str = "tierd-test-store";

    pub fn make(dir: &Path) -> Self {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl must be installed (bash scripts/install-deps.sh)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=tierd test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        // `name`.key and `name`.pem, signed by the CA with the extensions `ext`.
        let issue = |name: &str, subject: &str, ext: &str| {
            let cnf = format!("{name}.cnf");
            std::fs::write(dir.join(&cnf), ext).unwrap();
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            run(&[
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out",
                &csr,
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &cnf,
                "-out",
                &pem,
            ]);
        };
        issue(
            "server",
            "/CN=127.0.0.1",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
        );
        issue(
            "client",
            "/CN=tierd test client",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        );
        let pass = format!("pass:{}", Self::STORE_PASSWORD);
        run(&[
            "pkcs12",
            "-export",
            "-in",
            "server.pem",
            "-inkey",
            "server.key",
            "-certfile",
            "ca.pem",
            "-name",
            "broker",
            "-passout",
            &pass,
            "-out",
            "server.p12",
        ]);
        Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            keystore: dir.join("server.p12"),
        }
    }
}

/// The pinned Apache Kafka version (`scripts/kafka/version.sh`), for bench reports.
pub fn kafka_version() -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka/version.sh"),
    )
    .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("KAFKA_VERSION="))
        .unwrap_or("?")
        .trim()
        .to_owned()
}

/// How the benches describe their broker: `KAFKA_HOST`'s, or the launcher's single node.
pub fn broker_description() -> String {
    match std::env::var("KAFKA_HOST") {
        Ok(h) => format!("external broker {h}"),
        Err(_) => format!(
            "Apache Kafka {} (KRaft, single combined node, 512 MiB heap, scripts/kafka/broker.sh)",
            kafka_version()
        ),
    }
}

/// `scripts/kafka/broker.sh`: the one launcher of Apache Kafka nodes for tests, demo and benches.
fn broker_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka/broker.sh")
}

/// One Apache Kafka node (KRaft, combined broker + controller) started by `broker.sh`.
struct Node {
    /// Behind a lock so that a test can kill and restart nodes while other threads produce.
    child: std::sync::Mutex<Option<Child>>,
    node_id: u32,
    port: u16,
    controller_port: u16,
    dir: PathBuf,
    /// Arguments after `--dir/--port/--controller-port/--node-id` (voters, props, heap…).
    args: Vec<String>,
}

impl Node {
    fn spawn(&self, detached: bool) {
        let mut cmd = Command::new("bash");
        cmd.arg(broker_script())
            .arg("--dir")
            .arg(&self.dir)
            .args(["--port", &self.port.to_string()])
            .args(["--controller-port", &self.controller_port.to_string()])
            .args(["--node-id", &self.node_id.to_string()])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if detached {
            // Outlives this test process: its own process group (a test runner that kills a
            // timed-out test's group leaves it alone); stopped by the watchdog of broker.sh.
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        } else {
            cmd.args(["--watch-pid", &std::process::id().to_string()]);
        }
        *self.child.lock().unwrap() =
            Some(cmd.spawn().expect(
                "bash scripts/kafka/broker.sh (bash scripts/install-deps.sh fetches Kafka)",
            ));
    }

    fn log(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGKILL, as a crashed machine.
    fn kill9(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self
            .child
            .lock()
            .unwrap()
            .as_ref()
            .expect("a running node")
            .id();
        signal(pid, sig);
    }

    fn exited(&self) -> Option<std::process::ExitStatus> {
        self.child
            .lock()
            .unwrap()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

/// Waits until `brokers` serves metadata listing `expect` live brokers.
fn wait_serving<N: std::borrow::Borrow<Node>>(
    brokers: &str,
    expect: usize,
    nodes: &[N],
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    for n in nodes.iter().map(N::borrow) {
        while TcpStream::connect(("127.0.0.1", n.port)).is_err() {
            if let Some(status) = n.exited() {
                panic!(
                    "Apache Kafka node {} exited with {status}; {}:\n{}",
                    n.node_id,
                    n.log().display(),
                    n.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "Apache Kafka node {} did not listen on {} within {timeout:?}; {}:\n{}",
                n.node_id,
                n.port,
                n.log().display(),
                n.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    loop {
        match consumer.fetch_metadata(None, Duration::from_secs(5)) {
            Ok(md) if md.brokers().len() >= expect => return,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "Apache Kafka at {brokers} did not serve {expect} brokers within {timeout:?}: {:?}",
                    other.map(|m| m.brokers().len())
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// An Apache Kafka broker for a test: the run's shared one ([`Broker::shared`]), one owned by
/// the test (killed on drop, restartable), a 3-node cluster, or an external one (`KAFKA_HOST`).
pub struct Broker {
    nodes: Vec<Node>,
    pub addr: String,
    /// Kept for owned brokers; the shared broker's directory outlives the test.
    _dir: Option<tempfile::TempDir>,
}

const START_TIMEOUT: Duration = Duration::from_secs(90);

impl Broker {
    /// The broker every test of this run shares (unique topics and groups keep tests apart):
    /// the first test process of a run starts it, detached, and later ones find it through a
    /// file under the temp dir keyed by the test runner's pid; it stops once the runner
    /// (nextest or cargo) exits. `KAFKA_HOST` names an external broker instead.
    pub fn shared() -> Self {
        if let Ok(addr) = std::env::var("KAFKA_HOST") {
            return Self {
                nodes: vec![],
                addr,
                _dir: None,
            };
        }
        let runner = std::os::unix::process::parent_id();
        // Keyed by the runner's pid and start time, so a later run that reuses the pid never
        // finds this run's broker (or a port something else took since).
        let started = std::fs::read_to_string(format!("/proc/{runner}/stat"))
            .ok()
            .and_then(|st| {
                st.rsplit(')')
                    .next()?
                    .split_whitespace()
                    .nth(19)
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("tierd-kafka-shared-{runner}-{started}"));
        std::fs::create_dir_all(&dir).unwrap();
        let lock = std::fs::File::create(dir.join("lock")).unwrap();
        lock.lock().unwrap();
        let addr_file = dir.join("addr");
        if let Ok(addr) = std::fs::read_to_string(&addr_file) {
            if TcpStream::connect(addr.trim()).is_ok() {
                return Self {
                    nodes: vec![],
                    addr: addr.trim().to_owned(),
                    _dir: None,
                };
            }
        }
        // First test of the run (or the shared broker died): start it, watched by the runner.
        let node = Node {
            child: Default::default(),
            node_id: 1,
            port: free_port(),
            controller_port: free_port(),
            dir: dir.join(format!("node-{}", std::process::id())),
            args: vec![
                "--heap".into(),
                "512m".into(),
                "--watch-pid".into(),
                runner.to_string(),
                "--drop-data".into(),
            ],
        };
        node.spawn(true);
        let addr = format!("127.0.0.1:{}", node.port);
        let nodes = [node];
        wait_serving(&addr, 1, &nodes, START_TIMEOUT);
        std::fs::write(&addr_file, &addr).unwrap();
        eprintln!(
            "shared Apache Kafka broker at {addr}; log: {}",
            nodes[0].log().display()
        );
        // Not ours to kill: leave the child running when this process ends.
        let [node] = nodes;
        std::mem::forget(node.child.lock().unwrap().take());
        Self {
            nodes: vec![],
            addr,
            _dir: None,
        }
    }

    /// A single-node broker owned by this test (for tests that kill or restart it).
    pub fn start() -> Self {
        Self::start_with("", &[])
    }

    /// An owned single node with extra server properties (appended to the generated ones;
    /// `{port}` and `{controller_port}` stand for the node's PLAINTEXT and CONTROLLER ports)
    /// and extra `StorageTool format` arguments (e.g. SCRAM credentials).
    pub fn start_with(props: &str, format_args: &[String]) -> Self {
        Self::start_on_port(free_port(), props, format_args)
    }

    /// [`Broker::start_with`] on a PLAINTEXT port chosen by the caller (e.g. one a proxy in
    /// front of it forwards to).
    pub fn start_on_port(port: u16, props: &str, format_args: &[String]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tierd-kafka")
            .tempdir()
            .unwrap();
        let controller_port = free_port();
        let mut args: Vec<String> = vec!["--heap".into(), "384m".into()];
        if !props.is_empty() {
            let file = dir.path().join("extra.properties");
            let props = props
                .replace("{port}", &port.to_string())
                .replace("{controller_port}", &controller_port.to_string());
            std::fs::write(&file, props).unwrap();
            args.extend(["--props".into(), file.display().to_string()]);
        }
        for a in format_args {
            args.extend(["--format-arg".into(), a.clone()]);
        }
        let node = Node {
            child: Default::default(),
            node_id: 1,
            port,
            controller_port,
            dir: dir.path().join("node-1"),
            args,
        };
        node.spawn(false);
        let addr = format!("127.0.0.1:{}", node.port);
        let b = Self {
            nodes: vec![node],
            addr,
            _dir: Some(dir),
        };
        wait_serving(&b.addr, 1, &b.nodes, START_TIMEOUT);
        b
    }

    /// A 3-node KRaft cluster (each node broker + controller, static quorum), owned by this
    /// test; `addr` lists all three as bootstrap servers.
    pub fn cluster(n: u32) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tierd-kafka")
            .tempdir()
            .unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = "dGllcmQtdGVzdC1jbHVzdA".to_owned(); // 16 bytes, base64url
                                                              // The controller fences a dead broker after this long (default 9 s), so leadership
                                                              // moves within seconds of a kill.
        let props = dir.path().join("cluster.properties");
        std::fs::write(
            &props,
            "broker.session.timeout.ms=4000\nbroker.heartbeat.interval.ms=500\n",
        )
        .unwrap();
        let nodes: Vec<Node> = ports
            .iter()
            .enumerate()
            .map(|(i, (p, c))| Node {
                child: Default::default(),
                node_id: i as u32 + 1,
                port: *p,
                controller_port: *c,
                dir: dir.path().join(format!("node-{}", i + 1)),
                args: vec![
                    "--heap".into(),
                    "320m".into(),
                    "--voters".into(),
                    voters.clone(),
                    "--cluster-id".into(),
                    cluster_id.clone(),
                    "--props".into(),
                    props.display().to_string(),
                ],
            })
            .collect();
        for node in &nodes {
            node.spawn(false);
        }
        let addr = ports
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let b = Self {
            nodes,
            addr,
            _dir: Some(dir),
        };
        wait_serving(&b.addr, n as usize, &b.nodes, START_TIMEOUT);
        b
    }

    fn node(&self, id: i32) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.node_id as i32 == id)
            .expect("an owned node")
    }

    /// SIGKILL of node `id` (1-based), as a crashed machine; its log directory stays.
    pub fn kill_node(&self, id: i32) {
        self.node(id).kill9();
    }

    /// Freezes node `id` (SIGSTOP): its connections stay open and nothing answers, like a
    /// stalled machine. [`Broker::thaw_node`] lets it go on.
    pub fn freeze_node(&self, id: i32) {
        self.node(id).signal("-STOP");
    }

    /// Resumes a frozen node (SIGCONT).
    pub fn thaw_node(&self, id: i32) {
        self.node(id).signal("-CONT");
    }

    /// Starts node `id` again on its directory and ports; waits until the cluster serves it
    /// and every other running node.
    pub fn start_node(&self, id: i32) {
        self.node(id).spawn(false);
        let running: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| n.child.lock().unwrap().is_some())
            .collect();
        wait_serving(&self.addr, running.len(), &running, START_TIMEOUT);
    }

    /// The in-sync replicas of `topic`'s `partition` (node ids).
    pub fn isr(&self, topic: &str, partition: i32) -> Vec<i32> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let mut isr = md.topics()[0]
            .partitions()
            .iter()
            .find(|p| p.id() == partition)
            .map_or(Vec::new(), |p| p.isr().to_vec());
        isr.sort_unstable();
        isr
    }

    /// Waits until `topic[partition]` has a live leader other than `old`; returns it.
    pub fn wait_leader_other_than(&self, topic: &str, partition: i32, old: i32) -> i32 {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let leader = self.leader(topic, partition);
            if leader >= 0 && leader != old {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "{topic}[{partition}]: leadership did not move off node {old}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every partition of `topics` has all owned nodes in its in-sync replica set
    /// (a restarted node has caught up).
    pub fn wait_full_isr(&self, topics: &[&str]) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .create()
            .unwrap();
        let deadline = Instant::now() + START_TIMEOUT;
        for topic in topics {
            loop {
                let full = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .ok()
                    .is_some_and(|md| {
                        md.topics()[0]
                            .partitions()
                            .iter()
                            .all(|p| p.isr().len() == self.nodes.len())
                    });
                if full {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{topic}: a restarted node did not rejoin every ISR"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// Kills the (single, owned) broker with SIGKILL and starts it again on the same ports
    /// and log directory.
    pub fn restart(&self) {
        assert_eq!(
            self.nodes.len(),
            1,
            "restart needs an owned single-node broker"
        );
        self.nodes[0].kill9();
        std::thread::sleep(Duration::from_millis(200));
        self.start_node(1);
    }

    /// The leader broker id of `topic`'s `partition`.
    pub fn leader(&self, topic: &str, partition: i32) -> i32 {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        // -1 also while the answering broker does not know the partition yet.
        md.topics()[0]
            .partitions()
            .iter()
            .find(|p| p.id() == partition)
            .map_or(-1, |p| p.leader())
    }

    /// Creates topics (replicated on every node of an owned cluster, at most 3, with
    /// `min.insync.replicas` = 2 then), waiting until they exist.
    pub fn create_topics(&self, names: &[&str], partitions: i32) {
        let rf = self.nodes.len().clamp(1, 3) as i32;
        let isr = if rf >= 3 { "2" } else { "1" };
        self.create_topics_with(names, partitions, rf, &[("min.insync.replicas", isr)]);
    }

    /// An admin client of this broker, with a runtime to drive its futures.
    pub fn admin(&self) -> (AdminClient<DefaultClientContext>, tokio::runtime::Runtime) {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .create()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (admin, rt)
    }

    /// Sets one config of an existing topic.
    pub fn alter_topic_config(&self, topic: &str, key: &str, value: &str) {
        let (admin, rt) = self.admin();
        let alter =
            rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(topic))
                .set(key, value);
        let result = rt
            .block_on(admin.alter_configs(&[alter], &AdminOptions::new()))
            .unwrap();
        assert!(result.iter().all(Result::is_ok), "{result:?}");
    }

    /// Deletes the records of `topic`'s `partition` before `offset` (`DeleteRecords`, what
    /// retention does to old segments): its log start moves to `offset`.
    pub fn delete_records(&self, topic: &str, partition: i32, offset: i64) {
        let (admin, rt) = self.admin();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))
            .unwrap();
        let result = rt
            .block_on(admin.delete_records(&tpl, &AdminOptions::new()))
            .unwrap();
        for e in result.elements() {
            assert!(e.error().is_ok(), "deleting records of {topic}: {e:?}");
        }
    }

    /// Creates topics with a replication factor and topic configs, waiting until they exist.
    pub fn create_topics_with(
        &self,
        names: &[&str],
        partitions: i32,
        replication: i32,
        configs: &[(&str, &str)],
    ) {
        self.create_replicated(names, partitions, replication, None, configs);
    }

    /// Creates topics whose partition `i` lives on the nodes `assignment[i]` (the first one
    /// its preferred leader), with topic configs, waiting until they exist.
    pub fn create_topics_on(
        &self,
        names: &[&str],
        assignment: &[&[i32]],
        configs: &[(&str, &str)],
    ) {
        let partitions = assignment.len() as i32;
        self.create_replicated(names, partitions, 0, Some(assignment), configs);
    }

    fn create_replicated(
        &self,
        names: &[&str],
        partitions: i32,
        replication: i32,
        assignment: Option<&[&[i32]]>,
        configs: &[(&str, &str)],
    ) {
        let (admin, rt) = self.admin();
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| {
                configs.iter().fold(
                    NewTopic::new(
                        n,
                        partitions,
                        assignment.map_or(TopicReplication::Fixed(replication), |a| {
                            TopicReplication::Variable(a)
                        }),
                    ),
                    |t, (k, v)| t.set(k, v),
                )
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
        // Wait until every partition has a leader, so the first produce does not race it.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .create()
            .unwrap();
        for n in names {
            loop {
                let ready = consumer
                    .fetch_metadata(Some(n), Duration::from_secs(5))
                    .ok()
                    .is_some_and(|md| {
                        md.topics().first().is_some_and(|t| {
                            t.error().is_none()
                                && t.partitions().len() == partitions as usize
                                && t.partitions().iter().all(|p| p.leader() >= 0)
                        })
                    });
                if ready {
                    break;
                }
                assert!(Instant::now() < deadline, "topic {n} got no leaders");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The broker logs of the owned nodes (printed when a test fails).
    pub fn logs(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(Node::log).collect()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for n in &self.nodes {
            n.kill9();
            if panicking {
                eprintln!(
                    "--- Apache Kafka node {} log ({}) ---\n{}",
                    n.node_id,
                    n.log().display(),
                    n.log_tail()
                );
            }
        }
        if panicking {
            // Keep the logs of a failed test.
            if let Some(d) = self._dir.take() {
                let kept = d.keep();
                eprintln!("broker directories kept in {}", kept.display());
            }
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
    /// The history topic (`kafka.history_topic`).
    pub history: String,
    pub group: String,
    pub prefix: String,
    pub partitions: i32,
    /// The rules file tierd runs (default: the B2B lifetime preset).
    pub rules: PathBuf,
    /// Extra lines of the `[rules]` table (e.g. `sweep_per_second = 100`).
    pub rules_extra: String,
    /// Extra lines of the `[kafka]` table (e.g. `at_risk_topic = "…"`).
    pub kafka_extra: String,
    /// The bootstrap servers tierd is given (default: `broker.addr`; e.g. a SASL_SSL listener
    /// while the test itself produces and reads on PLAINTEXT).
    pub tierd_brokers: Option<String>,
    /// Extra librdkafka properties of the test's own producer (e.g. `compression.type`).
    pub producer_props: Vec<(String, String)>,
    /// Run tierd with its own default session timing (else the tests' shorter sessions).
    pub default_sessions: bool,
}

impl World {
    pub fn start(partitions: i32) -> Self {
        Self::start_with(partitions, Redis::start())
    }

    pub fn start_with(partitions: i32, redis: Redis) -> Self {
        Self::start_on(partitions, redis, Broker::shared())
    }

    /// A world on a given broker (an owned one for tests that kill it, or a cluster).
    pub fn start_on(partitions: i32, redis: Redis, broker: Broker) -> Self {
        let input = unique("purchases");
        let output = unique("changes");
        let dlq = unique("dlq");
        let history = unique("history");
        broker.create_topics(&[&input, &output, &dlq, &history], partitions);
        Self {
            broker,
            redis,
            input,
            output,
            dlq,
            history,
            group: unique("g"),
            prefix: unique("t"),
            partitions,
            rules: Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules/b2b-lifetime.toml"),
            rules_extra: String::new(),
            kafka_extra: String::new(),
            tierd_brokers: None,
            producer_props: Vec::new(),
            default_sessions: false,
        }
    }

    /// [`World::config`] (on a free API port, nothing extra) written to `dir/tierd.toml`, for
    /// the operator tools' `--config`: its path.
    pub fn config_file(&self, dir: &Path) -> String {
        let path = dir.join("tierd.toml");
        std::fs::write(&path, self.config(free_port(), "")).unwrap();
        path.display().to_string()
    }

    /// The tierd config for this world; `extra` is appended verbatim (more TOML tables).
    pub fn config(&self, api_port: u16, extra: &str) -> String {
        self.config_with(api_port, "", extra)
    }

    /// Like [`World::config`], with extra lines in the `[kafka.consumer]` table. The base is
    /// a [`tierd::config::Config`] value (field names checked by the compiler); the world's
    /// extra lines and `extra` tables are merged over it.
    pub fn config_with(&self, api_port: u16, consumer: &str, extra: &str) -> String {
        use tierd::config::{ApiConfig, Config, KafkaConfig, MoneyConfig, RulesConfig};
        let mut consumer_props =
            BTreeMap::from([("statistics.interval.ms".to_owned(), "500".to_owned())]);
        // Short sessions so a killed member's partitions move on quickly. Under KIP-848
        // (`group.protocol = "consumer"`) the broker owns session timing (broker.sh sets it).
        if !consumer.contains("group.protocol") && !self.default_sessions {
            consumer_props.insert("session.timeout.ms".into(), "6000".into());
            consumer_props.insert("heartbeat.interval.ms".into(), "500".into());
        }
        let config = Config {
            kafka: KafkaConfig {
                brokers: self
                    .tierd_brokers
                    .clone()
                    .unwrap_or_else(|| self.broker.addr.clone()),
                group_id: self.group.clone(),
                input_topic: self.input.clone(),
                output_topic: self.output.clone(),
                dead_letter_topic: self.dlq.clone(),
                history_topic: self.history.clone(),
                consumer: consumer_props,
                ..KafkaConfig::default()
            },
            redis: self.redis.config(&self.prefix),
            money: MoneyConfig {
                currency: "CNY".into(),
                ..MoneyConfig::default()
            },
            rules: RulesConfig {
                path: self.rules.clone(),
                ..RulesConfig::default()
            },
            api: ApiConfig {
                listen: format!("127.0.0.1:{api_port}"),
                ..ApiConfig::default()
            },
            ..Config::default()
        };
        let mut table = toml::Table::try_from(&config).expect("config serializes");
        let fragment = |text: &str| -> toml::Table { toml::from_str(text).expect("extra TOML") };
        merge(
            &mut table,
            fragment(&format!("[kafka]\n{}", self.kafka_extra)),
        );
        merge(
            &mut table,
            fragment(&format!("[kafka.consumer]\n{consumer}")),
        );
        merge(
            &mut table,
            fragment(&format!("[rules]\n{}", self.rules_extra)),
        );
        merge(&mut table, fragment(extra));
        toml::to_string(&table).expect("config serializes")
    }

    pub fn producer(&self) -> FutureProducer {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.broker.addr)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5");
        for (k, v) in &self.producer_props {
            c.set(k, v);
        }
        c.create().unwrap()
    }

    /// One customer id per input partition (index = partition); see [`Self::partitions_of`].
    pub fn customer_per_partition(&self) -> Vec<String> {
        let wanted = vec![1; self.partitions as usize];
        self.customers_per_partition("k", &wanted)
            .into_iter()
            .map(|mut ids| ids.remove(0))
            .collect()
    }

    /// Customer ids `{prefix}0`, `{prefix}1`, … picked per input partition: the first
    /// `wanted[p]` of them that fall on partition `p` (index = partition).
    pub fn customers_per_partition(&self, prefix: &str, wanted: &[usize]) -> Vec<Vec<String>> {
        let mut found: Vec<Vec<String>> = vec![Vec::new(); wanted.len()];
        let mut next = 0usize;
        while found.iter().zip(wanted).any(|(f, &w)| f.len() < w) {
            let keys: Vec<String> = (next..next + 1000)
                .map(|i| format!("{prefix}{i}"))
                .collect();
            next += 1000;
            for (key, p) in keys.iter().zip(self.partitions_of(&keys)) {
                let p = p as usize;
                if p < wanted.len() && found[p].len() < wanted[p] {
                    found[p].push(key.clone());
                }
            }
        }
        found
    }

    /// The input partition of each key, found by producing each once to a scratch topic
    /// with as many partitions (the partitioner depends only on the key and the partition
    /// count), so the input topic is left untouched.
    pub fn partitions_of(&self, keys: &[String]) -> Vec<i32> {
        let scratch = unique("scratch");
        self.broker.create_topics(&[&scratch], self.partitions);
        let producer = self.producer();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(futures::future::join_all(keys.iter().map(|key| {
            producer.send(
                FutureRecord::<str, [u8]>::to(&scratch)
                    .key(key)
                    .payload(b"".as_slice()),
                Duration::from_secs(30),
            )
        })))
        .into_iter()
        .map(|sent| sent.unwrap().partition)
        .collect()
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

    /// Produces `events` 1,000 at a time, `pause_ms` apart (a stream that lasts while a test
    /// breaks things); the end offsets.
    pub fn produce_paced(&self, events: &[serde_json::Value], pause_ms: u64) -> BTreeMap<i32, i64> {
        let mut ends = BTreeMap::new();
        for chunk in events.chunks(1_000) {
            ends.extend(self.produce_json(chunk));
            std::thread::sleep(Duration::from_millis(pause_ms));
        }
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

    /// Produces JSON events keyed by their `customer_id` in one committed transaction of a
    /// transactional producer: each partition written to then ends with a commit marker,
    /// an offset no `read_committed` consumer receives.
    pub fn produce_in_transaction(&self, events: &[serde_json::Value]) {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.broker.addr)
            .set("transactional.id", unique("tx"))
            .create()
            .unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        producer.begin_transaction().unwrap();
        for e in events {
            let key = e["customer_id"].as_str().unwrap_or_default().to_owned();
            let value = serde_json::to_vec(e).unwrap();
            producer
                .send(BaseRecord::to(&self.input).key(&key).payload(&value))
                .map_err(|(e, _)| e)
                .unwrap();
        }
        producer
            .commit_transaction(Duration::from_secs(30))
            .unwrap();
    }

    /// The changes on the output topic as (tier, reason), in order.
    pub fn tiers_and_reasons(&self) -> Vec<(String, String)> {
        self.read_all(&self.output)
            .iter()
            .map(|r| {
                let c = r.json();
                (
                    c["tier"].as_str().unwrap_or_default().to_owned(),
                    c["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// The Redis keys of `partition`, by tierd's own key layout.
    pub fn keys(&self, partition: i32) -> tierd::store::keys::PartitionKeys {
        tierd::store::keys::Keyspace::new(&self.prefix, &self.group, &self.input)
            .partition(partition)
    }

    pub fn partition_meta(&self, partition: i32) -> (i64, i64) {
        let key = self.keys(partition).meta;
        let (epoch, next): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("epoch")
            .arg("next_offset")
            .query(&mut self.redis.conn())
            .unwrap();
        (epoch.unwrap_or(0), next.unwrap_or(-1))
    }

    /// Waits until `partition`'s outbox is empty (everything committed was published).
    pub fn wait_outbox_drained(&self, partition: i32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.outbox_len(partition) > 0 {
            assert!(
                Instant::now() < deadline,
                "the outbox of partition {partition} did not drain"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn outbox_len(&self, partition: i32) -> i64 {
        let key = self.keys(partition).outbox;
        redis::cmd("XLEN")
            .arg(&key)
            .query(&mut self.redis.conn())
            .unwrap()
    }

    /// Reads the output topic and checks that it holds `n` changes, each once (no id twice).
    pub fn assert_changes_once(&self, n: usize) {
        let mut ids: Vec<String> = self
            .read_all(&self.output)
            .iter()
            .map(|r| r.json()["event_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), n, "changes on the output topic: {ids:?}");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "a change published twice");
    }

    /// Reads the output topic and checks that every change id on it carries one body (a
    /// change published again, after Redis lost writes, is identical); returns the records.
    pub fn assert_one_body_per_change_id(&self) -> Vec<Record> {
        let records = self.read_all(&self.output);
        let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
        for r in &records {
            let v = r.json();
            let id = v["event_id"].as_str().unwrap().to_owned();
            if let Some(prev) = by_id.insert(id, v.clone()) {
                assert_eq!(prev, v, "a change published again is identical");
            }
        }
        records
    }

    /// Reads the output topic as a `read_committed` consumer does and checks what a consumer
    /// relies on after any replay, on every record: each id (a change's or an at-risk
    /// notice's) carries one body, byte for byte; a customer's change sequence rises along
    /// the topic, except where a change is repeated byte for byte (a replay that reproduced
    /// it). Returns the tier of each customer's last change (by sequence) and the number of
    /// records read.
    pub fn assert_fresh_ids_in_order(&self) -> (HashMap<String, String>, usize) {
        let records = self.read_all(&self.output);
        let mut sorted = records.clone();
        sorted.sort_by_key(|r| (r.partition, r.offset));
        let mut bodies: HashMap<String, Vec<u8>> = HashMap::new();
        let mut last: HashMap<String, (u64, String)> = HashMap::new();
        for r in sorted.iter().filter(|r| !r.value.is_empty()) {
            let v = r.json();
            let id = v["event_id"].as_str().unwrap().to_owned();
            if let Some(first) = bodies.get(&id) {
                assert!(
                    *first == r.value,
                    "id {id} published with two bodies: {} then {v} (partition {} offset {})",
                    String::from_utf8_lossy(first),
                    r.partition,
                    r.offset
                );
                continue;
            }
            bodies.insert(id, r.value.clone());
            let Some(seq) = v["sequence"].as_u64() else {
                continue; // an at-risk notice
            };
            let customer = v["customer_id"].as_str().unwrap().to_owned();
            let tier = v["tier"].as_str().unwrap().to_owned();
            if let Some((before, _)) = last.get(&customer) {
                assert!(
                    seq > *before,
                    "{customer}: a new change with sequence {seq} after {before} (partition {} offset {}): {v}",
                    r.partition,
                    r.offset
                );
            }
            last.insert(customer, (seq, tier));
        }
        (
            last.into_iter().map(|(c, (_, tier))| (c, tier)).collect(),
            records.len(),
        )
    }

    /// The rank cut-offs published in partition 0's keys, with their version.
    pub fn cutoffs(&self) -> Option<tierd::engine::rules::rank::Cutoffs> {
        let key = self.keys(0).cutoffs;
        let (version, data): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(key)
            .arg("version")
            .arg("data")
            .query(&mut self.redis.conn())
            .unwrap();
        let mut c: tierd::engine::rules::rank::Cutoffs = serde_json::from_str(&data?).ok()?;
        c.version = version?;
        Some(c)
    }

    /// The version of the cut-offs `partition` last finished applying (0: none).
    pub fn applied_cutoffs_version(&self, partition: i32) -> u64 {
        let key = self.keys(partition).meta;
        let json: Option<String> = redis::cmd("HGET")
            .arg(key)
            .arg("cutoffs")
            .query(&mut self.redis.conn())
            .unwrap();
        json.and_then(|j| serde_json::from_str::<tierd::engine::rules::rank::Cutoffs>(&j).ok())
            .map_or(0, |c| c.version)
    }

    /// Every key of this world in Redis, dumped (`DUMP`) in one script, so at one moment
    /// between tierd's atomic commits: a backup to roll back to.
    pub fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        let flat: Vec<redis::Value> = redis::Script::new(
            "local out = {} for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
             out[#out + 1] = k out[#out + 1] = redis.call('DUMP', k) end return out",
        )
        .arg(format!("{}:*", self.prefix))
        .invoke(&mut self.redis.conn())
        .unwrap();
        flat.chunks(2)
            .map(|kv| {
                let key: String = redis::from_redis_value_ref(&kv[0]).unwrap();
                let dump: Vec<u8> = redis::from_redis_value_ref(&kv[1]).unwrap();
                (key, dump)
            })
            .collect()
    }

    /// Rolls Redis back to `snapshot` in one transaction, as a restored backup or a failover
    /// to a lagging replica does: everything written since is lost.
    pub fn restore(&self, snapshot: &[(String, Vec<u8>)]) {
        let mut conn = self.redis.conn();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut conn)
            .unwrap();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for k in keys {
            pipe.del(k).ignore();
        }
        for (k, dump) in snapshot {
            pipe.cmd("RESTORE")
                .arg(k)
                .arg(0)
                .arg(dump)
                .arg("REPLACE")
                .ignore();
        }
        let () = pipe.query(&mut conn).unwrap();
    }

    /// [`World::wait_applied`], with `tierd`'s log in the failure message.
    pub fn wait_applied_by(&self, tierd: &Tierd, ends: &BTreeMap<i32, i64>, timeout: Duration) {
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.wait_applied(ends, timeout)
        }));
        if let Err(panic) = waited {
            let why = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            panic!("{why}\ntierd's log:\n{}", tierd.log_text());
        }
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
    pub fn customer_state(&self, customer: &str) -> Option<tierd::model::CustomerState> {
        let mut conn = self.redis.conn();
        for p in 0..self.partitions {
            let key = self.keys(p).customer(customer);
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
            if let Some(v) = v {
                return Some(tierd::model::stored::decode(&v).unwrap());
            }
        }
        None
    }

    /// Every customer state stored under `partition`'s keys, by customer id.
    pub fn stored_customers(&self, partition: i32) -> HashMap<String, tierd::model::CustomerState> {
        let keys = self.keys(partition);
        let mut conn = self.redis.conn();
        let mut out = HashMap::new();
        let found = self.redis.scan(&keys.customer_pattern());
        for page in found.chunks(1000) {
            let values: Vec<Vec<u8>> = redis::cmd("MGET").arg(page).query(&mut conn).unwrap();
            for (key, v) in page.iter().zip(values) {
                let id = keys.customer_id(key).expect("a customer key").to_owned();
                out.insert(id, tierd::model::stored::decode(&v).unwrap());
            }
        }
        out
    }

    /// Every record on `topic` from the beginning up to the current high watermarks.
    pub fn read_all(&self, topic: &str) -> Vec<Record> {
        read_all(&self.broker.addr, topic, self.topic_partitions(topic))
    }

    /// How many partitions `topic` has (the input's count when the broker does not say).
    pub fn topic_partitions(&self, topic: &str) -> i32 {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.broker.addr)
            .create()
            .unwrap();
        consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .ok()
            .and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map(|t| i32::try_from(t.partitions().len()).unwrap())
            })
            .filter(|n| *n > 0)
            .unwrap_or(self.partitions)
    }

    /// Opens a transaction of a producer of its own on the output topic (as another
    /// instance's publisher has while it publishes) with one change of an unrelated customer
    /// in each of the topic's partitions, and keeps it open: every `read_committed` reader
    /// stops at it until [`OpenTransaction::commit`].
    pub fn open_output_transaction(&self) -> OpenTransaction {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.broker.addr)
            .set("transactional.id", unique("open"))
            .set("transaction.timeout.ms", "300000")
            .create()
            .unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        producer.begin_transaction().unwrap();
        for p in 0..self.topic_partitions(&self.output) {
            let customer = format!("zz-open-{p}");
            let change = serde_json::json!({
                "event_id": format!("open-{p}"),
                "customer_id": customer,
                "sequence": 1,
                "tier": "basic",
            });
            producer
                .send(
                    BaseRecord::to(&self.output)
                        .partition(p)
                        .key(&customer)
                        .payload(&serde_json::to_vec(&change).unwrap()),
                )
                .map_err(|(e, _)| e)
                .unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        OpenTransaction(producer)
    }
}

/// A transaction left open on the output topic ([`World::open_output_transaction`]).
pub struct OpenTransaction(
    rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
);

impl OpenTransaction {
    pub fn commit(self) {
        use rdkafka::producer::Producer;
        self.0.commit_transaction(Duration::from_secs(30)).unwrap();
    }
}

/// Merges `over` into `base`, table by table; values in `over` win.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
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
    /// The message timestamp (ms), when it has one.
    pub timestamp: Option<i64>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).unwrap()
    }
}

/// Everything a `read_committed` consumer (librdkafka's default, and what tierd's output
/// contract asks of consumers) sees on `topic`, up to the end of each partition. The end is
/// librdkafka's end-of-partition event: with transactional writes the last offsets are commit
/// markers that are never delivered.
pub fn read_all(brokers: &str, topic: &str, partitions: i32) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    // A transaction's commit markers reach its partitions shortly after the commit returns:
    // until then its records are not readable yet (the last stable offset, which is what a
    // read_committed consumer's watermark query answers, lags the high watermark). Wait for
    // them, up to the producer's transaction timeout and a margin.
    let uncommitted: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", "read_uncommitted")
        .create()
        .unwrap();
    let settled = Instant::now() + Duration::from_secs(30);
    let stable = |p: i32| {
        let committed = consumer.fetch_watermarks(topic, p, Duration::from_secs(10));
        let all = uncommitted.fetch_watermarks(topic, p, Duration::from_secs(10));
        matches!((committed, all), (Ok((_, c)), Ok((_, a))) if c == a)
    };
    while !(0..partitions).all(stable) && Instant::now() < settled {
        std::thread::sleep(Duration::from_millis(50));
    }
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
                    timestamp: m.timestamp().to_millis(),
                });
                if m.offset() + 1 >= highs[&m.partition()] {
                    done.insert(m.partition(), ());
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                done.insert(p, ());
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
        Self::spawn_env(world, consumer, extra, &[])
    }

    /// Spawns with extra environment variables too (e.g. `FAILPOINTS`: the tests' tierd is
    /// built with `--features failpoints`).
    pub fn spawn_env(world: &World, consumer: &str, extra: &str, env: &[(&str, &str)]) -> Self {
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
            .envs(env.iter().copied())
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

    /// Sends `sig` (e.g. `-STOP`, `-CONT`) to the running tierd.
    pub fn signal(&self, sig: &str) {
        signal(self.pid().expect("tierd is running"), sig);
    }

    /// Process id of the running tierd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until tierd's log contains `needle` (at most `timeout`, then fails showing it).
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in tierd's log within {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

    /// The value of metric `name`'s series whose labels include `label` (`key="value"`).
    pub fn metric_labeled(&self, name: &str, label: &str) -> f64 {
        let text = self.get("/metrics").1;
        text.lines()
            .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until this instance owns `n` partitions.
    /// Asserts that a Redis that lost acknowledged writes was noticed: a partition was found
    /// diverged (its stored offset went back) or its fence went back
    /// (`tierd_partition_stops_total{cause="diverged"|"fenced"}`).
    pub fn assert_lost_writes_noticed(&self) {
        let stops = |cause: &str| {
            self.metric_labeled("tierd_partition_stops_total", &format!("cause=\"{cause}\""))
        };
        assert!(
            stops("diverged") + stops("fenced") >= 1.0,
            "the lost writes were noticed (a partition diverged or its fence went back)"
        );
    }

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

    /// Waits up to `timeout` for the process to exit by itself: its exit code (`None`: still
    /// running, or killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
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
        // A test failing while this tierd still runs: what each of its threads is doing (a
        // wedged thread is otherwise invisible once the process is killed).
        let threads = match self.pid() {
            Some(pid) if std::thread::panicking() => thread_dump(pid),
            _ => String::new(),
        };
        self.kill9();
        if std::thread::panicking() {
            let mut log = self.log_text();
            if !threads.is_empty() {
                log.push_str("\n--- threads of the running tierd (gdb) ---\n");
                log.push_str(&threads);
            }
            // The whole log outlives the test's temp dir, for a post-mortem.
            let keep = std::env::temp_dir().join(format!(
                "tierd-failed-{}-{}.log",
                std::process::id(),
                unique("t")
            ));
            if std::fs::write(&keep, &log).is_ok() {
                eprintln!("tierd's whole log: {}", keep.display());
            }
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

/// Every thread's backtrace of the running process `pid`, by gdb (bounded to 30 s; empty when
/// gdb is missing or cannot attach).
fn thread_dump(pid: u32) -> String {
    Command::new("timeout")
        .args(["30", "gdb", "-p", &pid.to_string(), "-batch", "-nx"])
        .args(["-ex", "set pagination off", "-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Runs the `tierd` command with `args` (from the project root): (exit code, stdout, stderr).
pub fn tierd_cli(args: &[&str]) -> (i32, String, String) {
    tierd_cli_env(args, &[])
}

/// [`tierd_cli`] with environment variables set.
pub fn tierd_cli_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    command_output(
        Command::new(env!("CARGO_BIN_EXE_tierd"))
            .args(args)
            .envs(env.iter().copied()),
    )
}

/// Runs `command` in the crate's directory: its exit code (-1 if killed by a signal), standard
/// output and standard error.
pub fn command_output(command: &mut Command) -> (i32, String, String) {
    let out = command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A purchase event as JSON.
/// Keyed input records: first purchases `a0`..`a9` by `c0`..`c9` (1.00 each, one first-tier
/// change each), with `middle` between the fifth and the sixth (a record refused downstream,
/// with changes on both sides of it).
pub fn ten_purchases_around(
    middle: Vec<(Option<String>, Vec<u8>)>,
) -> Vec<(Option<String>, Vec<u8>)> {
    let record = |i: usize| {
        let c = format!("c{i}");
        let e = purchase(&format!("a{i}"), &c, "1.00", "2026-11-10T10:00:00Z");
        (Some(c), serde_json::to_vec(&e).unwrap())
    };
    let mut records: Vec<_> = (0..5).map(record).collect();
    records.extend(middle);
    records.extend((5..10).map(record));
    records
}

pub fn purchase(event_id: &str, customer: &str, amount: &str, at: &str) -> serde_json::Value {
    serde_json::json!({"event_id": event_id, "customer_id": customer, "amount": amount, "currency": "CNY", "occurred_at": at})
}

/// A refund event as JSON.
pub fn refund(event_id: &str, customer: &str, amount: &str, at: &str) -> serde_json::Value {
    serde_json::json!({"event_id": event_id, "customer_id": customer, "amount": amount, "occurred_at": at, "type": "refund"})
}

/// Sends `sig` (e.g. `-STOP`, `-CONT`) to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// A plain member of a tierd group (classic protocol, cooperative-sticky like tierd) that
/// holds what the group gives it and never processes it: a wedged or stuck member as the
/// others see it. Leaves the group when dropped.
pub struct GroupHolder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GroupHolder {
    /// Joins `world`'s group and returns once it holds at least one partition.
    pub fn join(world: &World) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (joined_tx, joined) = std::sync::mpsc::channel();
        let (brokers, group, topic, flag) = (
            world.broker.addr.clone(),
            world.group.clone(),
            world.input.clone(),
            std::sync::Arc::clone(&stop),
        );
        let thread = std::thread::spawn(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group)
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set("session.timeout.ms", "6000")
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            consumer.subscribe(&[&topic]).unwrap();
            let mut told = false;
            while !flag.load(Ordering::Relaxed) {
                let _ = consumer.poll(Duration::from_millis(100));
                if !told && consumer.assignment().unwrap().count() > 0 {
                    let _ = joined_tx.send(());
                    told = true;
                }
            }
        });
        joined
            .recv_timeout(Duration::from_secs(60))
            .expect("the holder joined the group");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Leaves the group (and waits until it has).
    pub fn leave(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for GroupHolder {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// A directory `scripts/install-deps.sh` installs tools into: `$var` if set, else
/// `$HOME/default` (the Python tools' virtualenv: `PY_TOOLS_DIR`, `.cache/tierd/py-tools`; the
/// npm packages: `NODE_TOOLS_DIR`, `.cache/tierd/node-tools`).
pub fn tools_dir(var: &str, default: &str) -> PathBuf {
    let path = std::env::var(var).map_or_else(
        |_| Path::new(&std::env::var("HOME").unwrap()).join(default),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: bash scripts/install-deps.sh installs it",
        path.display()
    );
    path
}

/// A command of the Python tools' virtualenv (schemathesis, kubernetes-validate, python).
pub fn py_tool(name: &str) -> PathBuf {
    tools_dir("PY_TOOLS_DIR", ".cache/tierd/py-tools")
        .join("bin")
        .join(name)
}
