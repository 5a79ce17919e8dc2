//! The one place the Redis client is built: the URL (one server, or a Redis Cluster's seed
//! nodes), and for `rediss://` / `rediss+cluster://` the TLS trust (`redis.tls_ca_file`) and an
//! optional client certificate (`redis.tls_cert_file` + `redis.tls_key_file`). Used by the
//! service and the operator tools alike.

use crate::config::{ConfigError, RedisConfig};
use std::path::Path;
use std::time::Duration;

/// The Redis deployment tierd talks to: one server, or a Redis Cluster.
///
/// Every key of one input partition carries the partition's hash tag
/// ([`crate::store::keys`]), so each partition lives in one cluster slot: a partition's
/// commit, claim, timers and outbox are single-slot scripts and commands wherever its slot is.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // built a few times per process, never in a hot path
pub enum RedisClient {
    /// One server (`redis://`, `rediss://`, `unix://`).
    Single(redis::Client),
    /// A Redis Cluster (`redis+cluster://`, `rediss+cluster://`), reached through its seed
    /// nodes.
    Cluster(ClusterClients),
}

/// The clients of one Redis Cluster.
#[derive(Clone)]
pub struct ClusterClients {
    /// Every request's: to the masters, routed by key.
    pub routed: redis::cluster::ClusterClient,
    /// A seed's URL up to its host (scheme and credentials): with a node's `host:port`, the
    /// URL of that node alone.
    node_prefix: String,
    certs: Option<redis::TlsCertificates>,
}

impl ClusterClients {
    /// A client of the one node at `host:port` (a check of every node, replicas included:
    /// redis-rs's cluster client holds connections to the masters only).
    ///
    /// # Errors
    /// The client's (a TLS setup error).
    pub fn node(&self, host_port: &str) -> redis::RedisResult<redis::Client> {
        let url = format!("{}{host_port}", self.node_prefix);
        match &self.certs {
            Some(certs) => redis::Client::build_with_tls(url, certs.clone()),
            None => redis::Client::open(url),
        }
    }
}

/// A synchronous connection (the claims', which run on the consumer thread), every call
/// bounded by its timeout.
pub enum SyncConnection {
    /// To one server (the socket's timeouts).
    Single(redis::Connection),
    /// To a Redis Cluster (routed by key; each call on a thread of its own, see
    /// [`BoundedCluster`]).
    Cluster(BoundedCluster),
}

/// A synchronous cluster connection whose every call, and its making, ends within a timeout.
///
/// Socket timeouts do not bound redis-rs's synchronous cluster connection: a call that times
/// out is retried (up to [`CLUSTER_RETRIES`] times, reconnecting), and a node connection it
/// makes sends a `PING` before any timeout is set — to a node that accepts connections but does
/// not answer (a frozen or stalled process: its kernel still accepts), that `PING` waits for as
/// long as the node is away, and the consumer thread with it (evicted from the group after
/// `max.poll.interval.ms`). So each call runs on a thread of its own and is given up after the
/// timeout: the connection is then dropped with that thread (which ends when the node answers
/// or the socket fails), and the next call fails so the caller connects anew.
pub struct BoundedCluster {
    conn: Option<Box<redis::cluster::ClusterConnection>>,
    timeout: Duration,
}

impl BoundedCluster {
    /// Runs `call` on the connection on a thread of its own, within the timeout.
    fn call<T: Send + 'static>(
        &mut self,
        call: impl FnOnce(&mut redis::cluster::ClusterConnection) -> redis::RedisResult<T>
            + Send
            + 'static,
    ) -> redis::RedisResult<T> {
        let mut conn = self.conn.take().ok_or_else(|| {
            io_error(
                std::io::ErrorKind::NotConnected,
                "an earlier call on this Redis Cluster connection did not end in time",
            )
        })?;
        let (conn, result) = within(self.timeout, move || {
            let result = call(&mut conn);
            (conn, result)
        })?;
        self.conn = Some(conn);
        result
    }
}

/// Calls [`within`] runs at once at most (those given up on included, until the node answers
/// or their socket fails): while the cluster does not answer, a claim retried every few
/// hundred milliseconds would otherwise leave a thread and a socket behind each time.
const MAX_RUNNING: usize = 16;

/// Calls [`within`] is running.
static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `work` on a thread of its own; its result if it ends within `timeout` (else the thread
/// is left to end by itself, its result dropped). Refused while [`MAX_RUNNING`] calls run.
fn within<T: Send + 'static>(
    timeout: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> redis::RedisResult<T> {
    use std::sync::atomic::Ordering;
    if RUNNING.fetch_add(1, Ordering::SeqCst) >= MAX_RUNNING {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        return Err(io_error(
            std::io::ErrorKind::WouldBlock,
            "too many calls to the Redis Cluster still wait for an answer",
        ));
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("tierd-claim-redis".into())
        .spawn(move || {
            let _ = tx.send(work());
            RUNNING.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(error) = spawned {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        return Err(error.into());
    }
    rx.recv_timeout(timeout).map_err(|_| {
        io_error(
            std::io::ErrorKind::TimedOut,
            "the Redis Cluster did not answer in time",
        )
    })
}

fn io_error(kind: std::io::ErrorKind, message: &'static str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(kind, message))
}

impl RedisClient {
    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// A synchronous connection, each attempt bounded by `timeout`.
    ///
    /// # Errors
    /// The connection error.
    pub fn sync_connection(&self, timeout: Duration) -> redis::RedisResult<SyncConnection> {
        match self {
            Self::Single(c) => c
                .get_connection_with_timeout(timeout)
                .map(SyncConnection::Single),
            Self::Cluster(c) => {
                let client = c.routed.clone();
                let conn = within(timeout, move || -> redis::RedisResult<_> {
                    let conn = client.get_connection()?;
                    conn.set_read_timeout(Some(timeout))?;
                    conn.set_write_timeout(Some(timeout))?;
                    Ok(Box::new(conn))
                })??;
                Ok(SyncConnection::Cluster(BoundedCluster {
                    conn: Some(conn),
                    timeout,
                }))
            }
        }
    }
}

impl SyncConnection {
    /// Bounds every read and write of this connection by `timeout`.
    ///
    /// # Errors
    /// The socket's error.
    pub fn set_timeouts(&mut self, timeout: Duration) -> redis::RedisResult<()> {
        match self {
            Self::Single(c) => {
                c.set_read_timeout(Some(timeout))?;
                c.set_write_timeout(Some(timeout))
            }
            Self::Cluster(c) => {
                c.timeout = timeout;
                match &c.conn {
                    Some(conn) => {
                        conn.set_read_timeout(Some(timeout))?;
                        conn.set_write_timeout(Some(timeout))
                    }
                    None => Ok(()),
                }
            }
        }
    }
}

impl redis::ConnectionLike for SyncConnection {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => {
                let cmd = cmd.to_vec();
                c.call(move |conn| conn.req_packed_command(&cmd))
            }
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => {
                let cmd = cmd.to_vec();
                c.call(move |conn| conn.req_packed_commands(&cmd, offset, count))
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(_) => 0,
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Self::Single(c) => c.check_connection(),
            Self::Cluster(c) => c.call(|conn| Ok(conn.check_connection())).unwrap_or(false),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Self::Single(c) => c.is_open(),
            Self::Cluster(c) => c.conn.as_ref().is_some_and(|conn| conn.is_open()),
        }
    }
}

/// The seed nodes of a `redis+cluster://` or `rediss+cluster://` URL as one URL each
/// (`redis://[user:password@]host:port`), with TLS or not; `None` for a single server's URL.
///
/// # Errors
/// What is wrong with the URL.
fn cluster_nodes(url: &str) -> Result<Option<(Vec<String>, bool)>, String> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        (rest, true)
    } else {
        return Ok(None);
    };
    // Credentials end at the last `@` (a password may hold one; hosts cannot).
    let (user_info, hosts) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
    if hosts.contains('/') || hosts.contains('?') {
        return Err(
            "a Redis Cluster has no database number or options after its nodes: \
             redis+cluster://[user:password@]host:port,host:port"
                .into(),
        );
    }
    let scheme = if tls { "rediss" } else { "redis" };
    let mut nodes = Vec::new();
    for host in hosts.split(',') {
        let host = host.trim();
        let port_ok = host
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            return Err(format!(
                "cluster node {host:?} is not host:port (redis+cluster://host:port,host:port)"
            ));
        }
        nodes.push(match user_info {
            Some(user_info) => format!("{scheme}://{user_info}@{host}"),
            None => format!("{scheme}://{host}"),
        });
    }
    Ok(Some((nodes, tls)))
}

/// How a cluster client retries a request that failed on a node (a connection lost,
/// `TRYAGAIN`, `CLUSTERDOWN` while a replica is promoted; a `MOVED`/`ASK` is followed at once):
/// up to `CLUSTER_RETRIES` times, each wait drawn from 100 ms up to `10 ms · 2^retry` capped at
/// 2 s (about 0.1, 0.1, 0.1, ≤ 0.16, ≤ 0.32, ≤ 0.64 s: 0.6–1.4 s in all; redis-rs's defaults
/// are 16 retries with waits up to 655 s, which would hold a partition for minutes after a
/// failover); after that the call fails and the caller's own retries take over, as on a single
/// server.
const CLUSTER_RETRIES: u32 = 6;

/// Builds the Redis client (no connection yet): a bad URL or an unreadable certificate file is
/// refused here, naming the field.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `redis.url`, `redis.tls_ca_file`, `redis.tls_cert_file` or
/// `redis.tls_key_file`.
pub fn client(cfg: &RedisConfig) -> Result<RedisClient, ConfigError> {
    // rustls needs a process-wide crypto provider; only `ring` is built in. Installing it
    // twice is harmless (the second call reports the first and changes nothing).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let invalid = |field, message: String| ConfigError::Invalid { field, message };
    let tls_files = cfg.tls_ca_file.is_some() || cfg.tls_cert_file.is_some();
    let cluster = cluster_nodes(&cfg.url).map_err(|m| invalid("redis.url", m))?;
    let tls_url = match &cluster {
        Some((_, tls)) => *tls,
        None => cfg
            .url
            .get(..9)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss://")),
    };
    if tls_files && !tls_url {
        let field = if cfg.tls_ca_file.is_some() {
            "redis.tls_ca_file"
        } else {
            "redis.tls_cert_file"
        };
        return Err(invalid(
            field,
            "is set but redis.url is not rediss:// or rediss+cluster:// (TLS)".into(),
        ));
    }
    if cfg.tls_cert_file.is_some() != cfg.tls_key_file.is_some() {
        return Err(invalid(
            "redis.tls_key_file",
            "redis.tls_cert_file and redis.tls_key_file are set together (client certificate)"
                .into(),
        ));
    }
    let url_error = |e: redis::RedisError| invalid("redis.url", e.to_string());
    if let Some((nodes, _)) = cluster {
        let certs = if tls_files {
            Some(certificates(cfg)?)
        } else {
            None
        };
        return cluster_client(nodes, certs).map_err(|e| tls_error(e.to_string()));
    }
    if !tls_files {
        return redis::Client::open(cfg.url.as_str())
            .map(RedisClient::Single)
            .map_err(url_error);
    }
    redis::Client::build_with_tls(cfg.url.as_str(), certificates(cfg)?)
        .map(RedisClient::Single)
        .map_err(|e| tls_error(e.to_string()))
}

/// A cluster client over `nodes` (with `certs` for TLS), its retries and connection attempts
/// bounded as tierd's single-server connections are.
fn cluster_client(
    nodes: Vec<String>,
    certs: Option<redis::TlsCertificates>,
) -> redis::RedisResult<RedisClient> {
    let builder = || {
        let builder = redis::cluster::ClusterClient::builder(nodes.clone())
            .connection_timeout(crate::store::connection::CONNECT_TIMEOUT)
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(100)
            .max_retry_wait(2_000);
        match certs.clone() {
            Some(certs) => builder.certs(certs),
            None => builder,
        }
    };
    let seed = nodes.first().map(String::as_str).unwrap_or_default();
    let node_prefix = match seed.rfind('@') {
        Some(at) => &seed[..=at],
        None => &seed[..seed.find("://").map_or(0, |i| i + 3)],
    };
    Ok(RedisClient::Cluster(ClusterClients {
        routed: builder().build()?,
        node_prefix: node_prefix.to_owned(),
        certs,
    }))
}

/// The field a TLS setup error is about, from redis-rs's message.
fn tls_error(message: String) -> ConfigError {
    let field = if message.contains("root certificate") || message.contains("trust") {
        "redis.tls_ca_file"
    } else if message.contains("client certificate") {
        "redis.tls_cert_file"
    } else if message.contains("private key") {
        "redis.tls_key_file"
    } else {
        "redis.url"
    };
    ConfigError::Invalid { field, message }
}

/// The TLS trust and client certificate the `redis.tls_*` files name, each checked to hold what
/// it should.
fn certificates(cfg: &RedisConfig) -> Result<redis::TlsCertificates, ConfigError> {
    let invalid = |field, message: String| ConfigError::Invalid { field, message };
    let read = |field, path: &Path| {
        std::fs::read(path)
            .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))
    };
    let root_cert = cfg
        .tls_ca_file
        .as_deref()
        .map(|p| read("redis.tls_ca_file", p))
        .transpose()?;
    // redis-rs silently trusts nothing (or presents no certificate) when a file holds no PEM
    // certificate at all: refuse that here rather than at the first handshake.
    let has_pem_cert = |pem: &[u8]| {
        pem.windows(b"-----BEGIN CERTIFICATE-----".len())
            .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    };
    if let (Some(pem), Some(path)) = (&root_cert, &cfg.tls_ca_file) {
        if !has_pem_cert(pem) {
            return Err(invalid(
                "redis.tls_ca_file",
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
    }
    let client_tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => {
            let client_cert = read("redis.tls_cert_file", cert)?;
            if !has_pem_cert(&client_cert) {
                return Err(invalid(
                    "redis.tls_cert_file",
                    format!("{} holds no PEM certificate", cert.display()),
                ));
            }
            Some(redis::ClientTlsConfig {
                client_cert,
                client_key: read("redis.tls_key_file", key)?,
            })
        }
        _ => None,
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

/// Redis's `maxmemory-policy` (from `INFO memory`, which managed Redis services keep even when
/// they rename or block `CONFIG`). On a cluster, every node's, replicas included (a replica
/// promoted keeps its own policy): the first that may evict tierd's keys, else the first read;
/// nodes that cannot be read are named in a warning, unless no node could be read at all.
///
/// # Errors
/// The Redis error (on a cluster: `CLUSTER NODES`', or the first node's when none answered).
pub async fn eviction_policy(
    conn: &crate::store::connection::Connection,
) -> Result<String, redis::RedisError> {
    let replies = conn.on_every_node(redis::cmd("INFO").arg("memory")).await?;
    let (mut policies, mut unread) = (Vec::new(), Vec::new());
    for (node, reply) in replies {
        let text = reply.and_then(|v| redis::from_redis_value::<String>(v).map_err(Into::into));
        match text {
            Ok(info) => policies.push(
                info.lines()
                    .find_map(|l| l.strip_prefix("maxmemory_policy:"))
                    .unwrap_or("unknown")
                    .trim()
                    .to_owned(),
            ),
            Err(error) => unread.push((node, error)),
        }
    }
    if policies.is_empty() {
        if let Some((_, error)) = unread.into_iter().next() {
            return Err(error);
        }
        return Ok("unknown".to_owned());
    }
    for (node, error) in &unread {
        tracing::warn!(%node, %error, "Cannot read this Redis node's maxmemory-policy; make sure it is `noeviction` or a `volatile-*` policy (an `allkeys-*` policy may evict tierd's keys).");
    }
    // The worst node's: one node that may evict is enough to lose keys.
    Ok(policies
        .iter()
        .find(|p| may_evict_tierd_keys(p))
        .unwrap_or(&policies[0])
        .clone())
}

/// Whether a `maxmemory-policy` may evict tierd's keys. They carry no TTL, so `noeviction` and
/// the `volatile-*` policies never touch them; the `allkeys-*` policies may drop a customer's
/// state, a partition's offset or its outbox without a trace.
pub fn may_evict_tierd_keys(policy: &str) -> bool {
    policy.starts_with("allkeys-")
}

#[cfg(test)]
mod tests {
    use super::{may_evict_tierd_keys, within, MAX_RUNNING};
    use std::time::Duration;

    #[test]
    fn a_call_given_up_on_keeps_its_thread_and_counts_until_it_ends() {
        let slow = || {
            within(Duration::from_millis(20), || {
                std::thread::sleep(Duration::from_millis(1500))
            })
        };
        for _ in 0..MAX_RUNNING {
            let e = slow().unwrap_err();
            assert_eq!(e.kind(), redis::ErrorKind::Io, "{e}");
            assert!(e.to_string().contains("did not answer in time"), "{e}");
        }
        // Every slot is held by a call still waiting: refused at once.
        let e = within(Duration::from_secs(5), || 1).unwrap_err();
        assert!(e.to_string().contains("still wait for an answer"), "{e}");
        std::thread::sleep(Duration::from_millis(1800));
        assert_eq!(within(Duration::from_secs(5), || 7).unwrap(), 7);
    }

    #[test]
    fn only_allkeys_policies_can_evict_keys_without_ttl() {
        for p in ["allkeys-lru", "allkeys-lfu", "allkeys-random"] {
            assert!(may_evict_tierd_keys(p), "{p}");
        }
        for p in [
            "noeviction",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
        ] {
            assert!(!may_evict_tierd_keys(p), "{p}");
        }
    }
}
