//! tierd's connection to Redis: redis-rs's multiplexed, reconnecting `ConnectionManager`, with
//! the reconnection tuned ([`manager_config`]) and one gap closed ([`Connection`]), or on a
//! Redis Cluster redis-rs's cluster connection, with the requests that span partitions routed
//! slot by slot (see [`Connection`]). Every long-lived Redis user of the service (partitions,
//! publishers, rank duty, stall watch, API) holds a clone; the operator tools hold one too.

use super::client::RedisClient;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How tierd's connections to Redis reconnect after losing the server (a restart, a failover):
/// a round of three attempts, 1–2 s then 2–4 s apart (a delay of 1 s doubled up to 2 s, each
/// jittered by up to as much again), after which the calls waiting on it fail with the
/// connection error, which the callers retry (starting the next round): a partition's calls
/// log it and count it in `tierd_redis_errors_total`, a publisher's in
/// `tierd_publish_errors_total`, the API answers 503. A connection attempt that hangs (an unreachable host) is abandoned after
/// [`CONNECT_TIMEOUT`].
///
/// Not redis-rs's defaults: 0.32's retried after 1–2 s and then only every 60–120 s (a
/// backoff from 1 s multiplied by 100, capped at 60 s, over six retries), so a Redis down for
/// eight seconds held every partition for up to two minutes after it was back, every call
/// waiting on the reconnection with nothing more logged after its first failure; 1.x's
/// (six retries from 100 ms, doubling: a round of 6–13 s) hold the calls waiting on a round
/// about twice as long as this one (3–6 s).
///
/// No response timeout: a command's outcome is then never in doubt because of tierd (a frozen
/// Redis holds tierd until it answers or its connection drops; the API bounds its own waits).
/// A Redis Cluster's calls are bounded ([`CLUSTER_CALL_TIMEOUT`]): redis-rs's cluster
/// connection can stop for good.
pub fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_secs(1))
        .set_exponent_base(2.0)
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(2)
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        // redis-rs 1.x times responses out after 500 ms by default: a commit or cut-off
        // script may run longer, and its outcome must never be in doubt because of tierd.
        .set_response_timeout(None)
}

/// The configuration of a plain multiplexed connection (the tools', the benches'): like
/// [`manager_config`], no response timeout (redis-rs 1.x would otherwise give a script
/// 500 ms) and connection attempts bounded by [`CONNECT_TIMEOUT`].
pub fn direct_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None)
}

/// How long one connection attempt to Redis may take (TCP, TLS and the handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often at most a refused connection is replaced (see [`Connection`]).
const REPLACE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// A shared connection to Redis: a `ConnectionManager` that is replaced by a new one when its
/// reconnection was refused for good; on a Redis Cluster, a cluster connection.
///
/// **On a Redis Cluster** every key of one partition is in one slot, and most requests name one
/// partition: the cluster connection routes them by their key. Two kinds of request span
/// partitions, and this connection routes them itself:
/// - a pipeline (not a transaction) whose commands name keys in several slots (a customer
///   looked up in every partition, the tier sizes of all partitions) is split by slot, the
///   parts sent at once, the replies put back in the pipeline's order (redis-rs refuses such a
///   pipeline);
/// - a `SCAN` is sent to the master of the slot its `MATCH` pattern's hash tag names (every
///   scan tierd makes is of one partition's keys); a `SCAN` without one is refused rather than
///   sent to a node at random (which would see a part of the keys).
///
/// A cursor of `SCAN` is one server process's: [`super::scan`] scans so that every key is
/// seen across restarts, failovers and slot migrations.
///
/// redis-rs's manager keeps the outcome of its last reconnection round and starts another only
/// after an I/O error. A round whose last attempt reached Redis and was refused otherwise — its
/// user or password not (yet) valid: a user deleted and created again, a Redis restarted or
/// failed over before its ACL users are back — leaves that refusal in place: every call fails
/// with it until the process restarts, while Redis may long be fine again. Such an error
/// (authentication failed — `AUTH`'s refusal, or a `WRONGPASS`/`NOAUTH` reply, which redis-rs
/// classifies otherwise under RESP3 — or a reply that cannot be parsed: errors redis-rs itself
/// answers by reconnecting, but not when they end a reconnection) makes this connection build a new
/// manager in the background (at most once every [`REPLACE_AT_MOST_EVERY`]); the calls that
/// follow use it once it is connected. The error is still returned: the callers' retries go
/// on as for any failed call.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

struct Shared {
    client: RedisClient,
    /// A plain multiplexed connection to one server ([`Connection::connect_direct`]).
    direct: bool,
    current: RwLock<Link>,
    /// The runtime the managers run on (their I/O driver and reconnections).
    runtime: tokio::runtime::Handle,
    replacing: AtomicBool,
    last_replaced: Mutex<Option<Instant>>,
}

/// One link to Redis (cheap to clone: each is a handle to a multiplexed connection).
#[derive(Clone)]
enum Link {
    /// One server, reconnecting.
    Managed(ConnectionManager),
    /// One server, without reconnection (the operator tools: a call fails when the connection
    /// is lost).
    Direct(MultiplexedConnection),
    /// A Redis Cluster (redis-rs reconnects to its nodes and follows `MOVED`/`ASK`).
    Cluster(ClusterLink),
}

/// How many requests at most one cluster connection has on its way at once (each part of a
/// pipeline split by slot counts as one); the others wait their turn.
///
/// redis-rs 1.8's cluster connection can stop for good while the cluster's slots move: after a
/// `MOVED` its task refreshes its slot map and stops polling its requests meanwhile, and a
/// request it no longer polls can hold what the refresh waits for (a place in a node
/// connection's queue of 50, the lock of the connection map: both are handed to the first
/// waiter, polled or not; redis-rs pull request 882 fixed one case of it). Every call on the
/// connection, and every later one, then waits forever, with nothing logged. Measured with a
/// standalone program (256 single-slot `EXISTS` at once on a fresh connection, again and again,
/// while `redis-cli --cluster reshard` moved 2,000 slots back and forth between two masters
/// holding 250,000 keys): with no bound, or 48, 40 or 32 at once, it stopped in every run, after
/// 20–82 s; with 16 at once it never stopped (two runs of 60 s and two of 120 s, ~11,000
/// rounds). The bound makes a stop rare, not impossible: [`CLUSTER_CALL_TIMEOUT`] ends one.
///
/// The price: the places are shared by every master's calls. A master that does not answer (a
/// frozen process, its connections open) holds the places its calls took until they time out
/// ([`CLUSTER_CALL_TIMEOUT`]); calls to the other masters wait for a place meanwhile if 16 of
/// them wait on it (with 8 partitions over 3 masters, a master's partitions make 6 or so).
pub const CLUSTER_CALLS_AT_ONCE: usize = 16;

/// How long a call of the service on a Redis Cluster may go unanswered once it has its place
/// ([`CLUSTER_CALLS_AT_ONCE`]). Then it fails with a timeout, and the connection is replaced by
/// a new one (at most once every [`REPLACE_AT_MOST_EVERY`]): a connection stopped for good is
/// left behind, and the callers' retries go on on the new one. A timed-out call's outcome is
/// in doubt like that of a call whose connection dropped, and it may even run later (sent to a
/// node that answers late): a commit recognises its own lost reply and refuses a stale
/// position, a publication of cut-offs one that arrives after a later one, and trims, parks
/// and snapshot closes only move forward. Far above any call tierd makes on a healthy cluster
/// (a commit of a batch, a page of a scan, a step of a cut-off search: milliseconds).
pub const CLUSTER_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// [`CLUSTER_CALL_TIMEOUT`] for the operator tools, whose calls may run long (an
/// `offsets reset` deletes a whole partition in one script).
pub const CLUSTER_TOOL_CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// A cluster connection and the places of its calls ([`CLUSTER_CALLS_AT_ONCE`]).
#[derive(Clone)]
struct ClusterLink {
    conn: ClusterConnection,
    calls: Arc<tokio::sync::Semaphore>,
    /// How long a call may go unanswered once it has its place: [`CLUSTER_CALL_TIMEOUT`], or
    /// for the operator tools [`CLUSTER_TOOL_CALL_TIMEOUT`].
    timeout: Duration,
    /// Set when a call went unanswered (the link is then replaced, see [`Connection::after`]).
    stalled: Arc<AtomicBool>,
}

impl ClusterLink {
    fn new(conn: ClusterConnection, timeout: Duration) -> Self {
        Self {
            conn,
            calls: Arc::new(tokio::sync::Semaphore::new(CLUSTER_CALLS_AT_ONCE)),
            timeout,
            stalled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether `self` and `other` are the same cluster connection.
    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.calls, &other.calls)
    }

    /// `call` once it has a place among the calls on their way, within the link's timeout
    /// from then (the wait for a place is not counted: it ends when a call on its way ends).
    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = RedisResult<T>>,
    ) -> RedisResult<T> {
        let _place = self
            .calls
            .acquire()
            .await
            .map_err(|_| closed_cluster_link())?;
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => {
                self.stalled.store(true, Ordering::Release);
                Err(stalled_cluster_call(self.timeout))
            }
        }
    }

    /// `cmd`, routed by redis-rs (by its key).
    async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let mut conn = self.conn.clone();
        self.call(async move { conn.req_packed_command(cmd).await })
            .await
    }

    /// `pipeline`, routed by redis-rs (one slot's, or keyless).
    async fn pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let mut conn = self.conn.clone();
        self.call(async move { conn.req_packed_commands(pipeline, offset, count).await })
            .await
    }

    /// `pipeline` sent to the master of `route`'s slot.
    async fn pipeline_to(
        &self,
        pipeline: Pipeline,
        offset: usize,
        count: usize,
        route: Route,
    ) -> RedisResult<Vec<Value>> {
        let mut conn = self.conn.clone();
        self.call(async move {
            conn.route_pipeline(
                pipeline,
                offset,
                count,
                SingleNodeRoutingInfo::SpecificNode(route),
            )
            .await
        })
        .await
    }
}

/// The places of a cluster link are never closed; this is the error if they were.
fn closed_cluster_link() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the cluster connection is closed",
    ))
}

/// The error of a call on a Redis Cluster unanswered within `timeout`.
fn stalled_cluster_call(timeout: Duration) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "no answer from the Redis Cluster within {} s (connecting afresh)",
            timeout.as_secs()
        ),
    ))
}

impl Link {
    async fn open(client: &RedisClient, direct: bool) -> RedisResult<Self> {
        Ok(match client {
            RedisClient::Single(client) if direct => Self::Direct(
                client
                    .get_multiplexed_async_connection_with_config(&direct_config())
                    .await?,
            ),
            RedisClient::Single(client) => Self::Managed(
                ConnectionManager::new_with_config(client.clone(), manager_config()).await?,
            ),
            // Bounded like a call: redis-rs's cluster connection may itself stop while the
            // slots move (see [`CLUSTER_CALLS_AT_ONCE`]).
            RedisClient::Cluster(clients) => {
                let timeout = if direct {
                    CLUSTER_TOOL_CALL_TIMEOUT
                } else {
                    CLUSTER_CALL_TIMEOUT
                };
                let conn = tokio::time::timeout(
                    CLUSTER_CALL_TIMEOUT,
                    clients.routed.get_async_connection(),
                )
                .await
                .unwrap_or_else(|_| Err(stalled_cluster_call(CLUSTER_CALL_TIMEOUT)))?;
                Self::Cluster(ClusterLink::new(conn, timeout))
            }
        })
    }
}

impl Connection {
    /// Connects to Redis on the calling runtime (its I/O driver runs there), bounded by
    /// [`CONNECT_TIMEOUT`] per attempt; a single server's connection reconnects
    /// ([`manager_config`]).
    ///
    /// # Errors
    /// The last connection error.
    pub async fn connect(client: RedisClient) -> RedisResult<Self> {
        Self::open(client, false).await
    }

    /// Like [`Connection::connect`], but to a single server without reconnection
    /// ([`direct_config`]): the operator tools', which fail rather than wait for Redis.
    ///
    /// # Errors
    /// The connection error.
    pub async fn connect_direct(client: RedisClient) -> RedisResult<Self> {
        Self::open(client, true).await
    }

    async fn open(client: RedisClient, direct: bool) -> RedisResult<Self> {
        let link = Link::open(&client, direct).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                direct,
                current: RwLock::new(link),
                runtime: tokio::runtime::Handle::current(),
                replacing: AtomicBool::new(false),
                last_replaced: Mutex::new(None),
            }),
        })
    }

    /// Whether this is a connection to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.shared.client.is_cluster()
    }

    /// `cmd` (a command without keys) on every node, replicas included: each node's address
    /// and reply (on a single server, its one reply). On a cluster each node is asked on a
    /// connection of its own, all at once, each within [`CONNECT_TIMEOUT`] to connect and as
    /// long again to answer.
    ///
    /// # Errors
    /// A single server's error; on a cluster, `CLUSTER NODES`' (each node's own error is its
    /// reply's).
    pub async fn on_every_node(&self, cmd: &Cmd) -> RedisResult<Vec<(String, RedisResult<Value>)>> {
        let Link::Cluster(link) = self.link() else {
            return Ok(vec![(
                "redis.url".to_owned(),
                Ok(cmd.query_async(&mut self.clone()).await?),
            )]);
        };
        let RedisClient::Cluster(clients) = &self.shared.client else {
            unreachable!("a cluster link comes from a cluster client")
        };
        // The nodes as the cluster lists them: redis-rs's cluster client holds connections to
        // the masters only.
        let nodes: String =
            redis::from_redis_value(link.command(redis::cmd("CLUSTER").arg("NODES")).await?)?;
        let asks = node_addresses(&nodes)
            .into_iter()
            .map(|address| async move {
                let reply = async {
                    let mut node = clients
                        .node(&address)?
                        .get_multiplexed_async_connection_with_config(&direct_config())
                        .await?;
                    cmd.query_async(&mut node).await
                };
                let reply = match tokio::time::timeout(2 * CONNECT_TIMEOUT, reply).await {
                    Ok(reply) => reply,
                    Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the node did not answer in time",
                    ))),
                };
                (address, reply)
            });
        Ok(futures::future::join_all(asks).await)
    }

    fn link(&self) -> Link {
        self.shared.current.read().expect("connection lock").clone()
    }

    /// Replaces the manager after an error its own reconnection does not get past, and a
    /// cluster connection after a call it did not answer ([`CLUSTER_CALL_TIMEOUT`]) if that
    /// connection (`used`) is still the current one.
    fn after<T>(&self, used: &Link, result: &RedisResult<T>) {
        let Err(error) = result else { return };
        let refused = matches!(error.code(), Some("WRONGPASS" | "NOAUTH"));
        let stalled = match (used, &self.link()) {
            (Link::Cluster(used), Link::Cluster(current)) => {
                used.stalled.load(Ordering::Acquire) && used.same(current)
            }
            _ => false,
        };
        if !stalled && (error.is_io_error() || !(error.is_unrecoverable_error() || refused)) {
            return;
        }
        {
            let mut last = self.shared.last_replaced.lock().expect("replaced lock");
            if last.is_some_and(|t| t.elapsed() < REPLACE_AT_MOST_EVERY) {
                return;
            }
            if self.shared.replacing.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Some(Instant::now());
        }
        if stalled {
            warn!(%error, "A call on the Redis Cluster was not answered; connecting afresh.");
        } else {
            warn!(%error, "A Redis connection was refused; connecting afresh.");
        }
        let shared = Arc::clone(&self.shared);
        self.shared.runtime.spawn(async move {
            // Cleared however the task ends (a panic included): the next refusal tries again.
            let _replacing = Replacing(&shared.replacing);
            match Link::open(&shared.client, shared.direct).await {
                Ok(link) => {
                    let old = std::mem::replace(
                        &mut *shared.current.write().expect("connection lock"),
                        link,
                    );
                    drop(old);
                    info!("Connected to Redis afresh.");
                }
                Err(error) => {
                    warn!(%error, "Connecting to Redis afresh failed; trying again at the next refused call.");
                }
            }
        });
    }
}

/// Clears the replacing flag when dropped.
struct Replacing<'a>(&'a AtomicBool);

impl Drop for Replacing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let link = self.link();
            let result = match &link {
                Link::Managed(c) => c.clone().req_packed_command(cmd).await,
                Link::Direct(c) => c.clone().req_packed_command(cmd).await,
                Link::Cluster(c) => match command_name(cmd).as_deref() {
                    Some(b"SCAN") => match scan_key(cmd) {
                        Some(tag) => {
                            let mut pipe = redis::pipe();
                            pipe.add_command(cmd.clone());
                            guarded_scan(c, &pipe, &tag, 0, 1)
                                .await
                                .map(|mut v| v.pop().unwrap_or(Value::Nil))
                        }
                        None => Err(unscoped_scan()),
                    },
                    _ => c.command(cmd).await,
                },
            };
            self.after(&link, &result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let link = self.link();
            let result = match &link {
                Link::Managed(c) => c.clone().req_packed_commands(cmd, offset, count).await,
                Link::Direct(c) => c.clone().req_packed_commands(cmd, offset, count).await,
                Link::Cluster(c) => cluster_pipeline(c, cmd, offset, count).await,
            };
            self.after(&link, &result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        match self.link() {
            Link::Managed(c) => c.get_db(),
            Link::Direct(c) => c.get_db(),
            Link::Cluster(c) => c.conn.get_db(),
        }
    }
}

/// A command's name, upper case.
fn command_name(cmd: &Cmd) -> Option<Vec<u8>> {
    match cmd.args_iter().next()? {
        redis::Arg::Simple(name) => Some(name.to_ascii_uppercase()),
        _ => None,
    }
}

/// The `n`th argument of a command (0: its name).
fn argument(cmd: &Cmd, n: usize) -> Option<&[u8]> {
    match cmd.args_iter().nth(n)? {
        redis::Arg::Simple(arg) => Some(arg),
        _ => None,
    }
}

/// The `host:port` of each node `CLUSTER NODES` lists, but those marked failed or without an
/// address.
fn node_addresses(nodes: &str) -> Vec<String> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let address = fields.nth(1)?;
            let flags = fields.next()?;
            if flags
                .split(',')
                .any(|f| matches!(f, "fail" | "fail?" | "noaddr" | "handshake"))
            {
                return None;
            }
            // `host:port@bus-port[,hostname]`; an IPv6 host has colons of its own (bracketed
            // for a URL).
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            if host.is_empty() || !port.parse::<u16>().is_ok_and(|p| p > 0) {
                return None;
            }
            Some(if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                address.to_owned()
            })
        })
        .collect()
}

/// The hash tag (`{…}`, braces included) a `SCAN`'s `MATCH` pattern names, the glob escapes of
/// the pattern undone (a key name holds the character itself): a key of that slot.
fn scan_tag(cmd: &Cmd) -> Option<Vec<u8>> {
    let at = cmd
        .args_iter()
        .position(|a| matches!(a, redis::Arg::Simple(a) if a.eq_ignore_ascii_case(b"MATCH")))?;
    let pattern = argument(cmd, at + 1)?;
    let (open, close) = (
        pattern.iter().position(|&b| b == b'{')?,
        pattern.iter().position(|&b| b == b'}')?,
    );
    if close <= open + 1 {
        return None;
    }
    let mut tag = Vec::with_capacity(close - open + 1);
    let mut escaped = false;
    for &b in &pattern[open..=close] {
        if b == b'\\' && !escaped {
            escaped = true;
            continue;
        }
        escaped = false;
        tag.push(b);
    }
    Some(tag)
}

/// Whether a command is a cursor scan of one slot: `SCAN` (its pattern names the slot) or
/// `HSCAN` (of one key). A pipeline holding one goes whole to the slot's master
/// ([`guarded_scan`]), so that the commands with it (`CLIENT INFO`, `CLUSTER NODES`, see
/// [`super::scan`]) are answered by the node that gave out the cursor.
fn is_scan(cmd: &Cmd) -> bool {
    matches!(command_name(cmd).as_deref(), Some(b"SCAN" | b"HSCAN"))
}

/// A key of the slot a scan reads: a `SCAN`'s pattern's hash tag ([`scan_tag`]), an `HSCAN`'s
/// key.
fn scan_key(cmd: &Cmd) -> Option<Vec<u8>> {
    match command_name(cmd).as_deref() {
        Some(b"HSCAN") => argument(cmd, 1).map(<[u8]>::to_vec),
        _ => scan_tag(cmd),
    }
}

/// The master of the slot a scan reads ([`scan_key`]).
fn scan_route(cmd: &Cmd) -> Option<Route> {
    scan_key(cmd).map(|key| Route::with_key(key, SlotAddr::Master))
}

/// A pipeline holding scans of the slot of `tag` (a key of it, [`scan_key`]), sent to that
/// slot's master behind an `EXISTS tag`: a `SCAN` names no key, so a node that does not
/// serve the slot (redis-rs falls back to a replica or another node while the master's
/// connection is down; a slot that moved) would answer it from its own keys; the `EXISTS` makes such a node answer `MOVED`, and the
/// pipeline is sent again to the slot's master. Returns the replies of `pipeline`'s own
/// commands from `offset`, `count` of them.
async fn guarded_scan(
    link: &ClusterLink,
    pipeline: &Pipeline,
    tag: &[u8],
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let mut guarded = redis::pipe();
    guarded.cmd("EXISTS").arg(tag);
    for cmd in pipeline.cmd_iter() {
        guarded.add_command(cmd.clone());
    }
    let n = guarded.cmd_iter().count();
    let values = link
        .pipeline_to(guarded, 0, n, Route::with_key(tag, SlotAddr::Master))
        .await?;
    Ok(values.into_iter().skip(1 + offset).take(count).collect())
}

/// The error of a scan on a cluster that reads no single slot (a `SCAN` whose pattern names no
/// slot, or a scan in a transaction or with another slot's commands).
fn unscoped_scan() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "a scan on a Redis Cluster must read one slot (a SCAN must match one hash tag, one partition's keys; no transaction, no other slot's commands with it)",
    ))
}

/// The master of the slot a command's keys are in, by its first key; `None` for a command
/// without keys.
fn command_route(cmd: &Cmd) -> Option<Route> {
    let name = command_name(cmd)?;
    let key = match name.as_slice() {
        b"SCAN" => return scan_route(cmd),
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let keys: usize = std::str::from_utf8(argument(cmd, 2)?).ok()?.parse().ok()?;
            if keys == 0 {
                return None;
            }
            argument(cmd, 3)?
        }
        b"PING" | b"INFO" | b"SCRIPT" | b"FUNCTION" | b"TIME" | b"DBSIZE" | b"CLUSTER"
        | b"CONFIG" | b"CLIENT" | b"ACL" | b"MEMORY" | b"WAIT" | b"MULTI" | b"EXEC" => return None,
        _ => argument(cmd, 1)?,
    };
    Some(Route::with_key(key, SlotAddr::Master))
}

/// A pipeline on a cluster: as is when it is a transaction or its commands are in one slot (or
/// name none); otherwise split by slot, the parts sent to their masters at once and the replies
/// put back in order.
async fn cluster_pipeline(
    link: &ClusterLink,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let slots: Vec<Option<Route>> = pipeline.cmd_iter().map(command_route).collect();
    let first = slots.first().copied().flatten();
    let one_slot = slots.iter().all(|s| s.is_none() || *s == first);
    if let Some(scan) = pipeline.cmd_iter().find(|c| is_scan(c)) {
        // Only one slot's commands (and commands without keys, answered by the same node) may
        // go with a scan, and not in a transaction.
        let route = scan_route(scan);
        return match scan_key(scan) {
            Some(tag)
                if !pipeline.is_transaction()
                    && slots.iter().all(|s| s.is_none() || *s == route) =>
            {
                guarded_scan(link, pipeline, &tag, offset, count).await
            }
            _ => Err(unscoped_scan()),
        };
    }
    if pipeline.is_transaction() || one_slot || slots.iter().any(Option::is_none) {
        // A transaction is one slot's by nature (Redis refuses it otherwise); a keyless
        // command in a multi-slot pipeline cannot be placed, and redis-rs says so.
        return link.pipeline(pipeline, offset, count).await;
    }
    let mut parts: Vec<(Route, Vec<usize>, Pipeline)> = Vec::new();
    for (i, (cmd, slot)) in pipeline.cmd_iter().zip(&slots).enumerate() {
        let slot = slot.expect("every command has a slot");
        let at = match parts.iter().position(|(s, ..)| *s == slot) {
            Some(at) => at,
            None => {
                parts.push((slot, Vec::new(), redis::pipe()));
                parts.len() - 1
            }
        };
        parts[at].1.push(i);
        parts[at].2.add_command(cmd.clone());
    }
    // Each part takes a place of its own ([`CLUSTER_CALLS_AT_ONCE`]): a pipeline of 256
    // partitions' keys goes out 16 parts at a time at most.
    let replies = futures::future::try_join_all(parts.iter().map(|(route, positions, part)| {
        link.pipeline_to(part.clone(), 0, positions.len(), *route)
    }))
    .await?;
    let mut out = vec![Value::Nil; slots.len()];
    for ((_, positions, _), values) in parts.iter().zip(replies) {
        for (&i, v) in positions.iter().zip(values) {
            out[i] = v;
        }
    }
    Ok(out.into_iter().skip(offset).take(count).collect())
}

#[cfg(test)]
mod tests {
    use super::node_addresses;

    #[test]
    fn the_nodes_listed_with_an_address_and_not_failed() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002,node-b.example master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7003@17003 slave a1 0 1 3 connected
d4 127.0.0.1:7004@17004 master,fail - 0 1 4 disconnected
e5 :0@0 master,noaddr - 0 1 5 disconnected
f6 127.0.0.1:7006@17006 slave,fail? a1 0 1 6 connected
g7 ::1:7007@17007 slave b2 0 1 7 connected
";
        assert_eq!(
            node_addresses(nodes),
            [
                "127.0.0.1:7001",
                "127.0.0.1:7002",
                "127.0.0.1:7003",
                "[::1]:7007"
            ]
        );
    }
}
