//! tierd's connection to Redis: redis-rs's multiplexed, reconnecting `ConnectionManager`, with
//! the reconnection tuned ([`manager_config`]) and one gap closed ([`Connection`]). Every
//! long-lived Redis user of the service (partitions, publishers, rank duty, stall watch, API)
//! holds a clone.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
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
/// reconnection was refused for good.
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
    client: redis::Client,
    current: RwLock<ConnectionManager>,
    /// The runtime the managers run on (their I/O driver and reconnections).
    runtime: tokio::runtime::Handle,
    replacing: AtomicBool,
    last_replaced: Mutex<Option<Instant>>,
}

impl Connection {
    /// Connects to Redis on the calling runtime (its I/O driver runs there), bounded by
    /// [`CONNECT_TIMEOUT`] per attempt.
    ///
    /// # Errors
    /// The last connection error.
    pub async fn connect(client: redis::Client) -> RedisResult<Self> {
        let manager = ConnectionManager::new_with_config(client.clone(), manager_config()).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                current: RwLock::new(manager),
                runtime: tokio::runtime::Handle::current(),
                replacing: AtomicBool::new(false),
                last_replaced: Mutex::new(None),
            }),
        })
    }

    fn manager(&self) -> ConnectionManager {
        self.shared.current.read().expect("connection lock").clone()
    }

    /// Replaces the manager after an error its own reconnection does not get past.
    fn after<T>(&self, result: &RedisResult<T>) {
        let Err(error) = result else { return };
        let refused = matches!(error.code(), Some("WRONGPASS" | "NOAUTH"));
        if error.is_io_error() || !(error.is_unrecoverable_error() || refused) {
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
        warn!(%error, "A Redis connection was refused; connecting afresh.");
        let shared = Arc::clone(&self.shared);
        self.shared.runtime.spawn(async move {
            // Cleared however the task ends (a panic included): the next refusal tries again.
            let _replacing = Replacing(&shared.replacing);
            match ConnectionManager::new_with_config(shared.client.clone(), manager_config()).await
            {
                Ok(manager) => {
                    let old = std::mem::replace(
                        &mut *shared.current.write().expect("connection lock"),
                        manager,
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
            let result = self.manager().req_packed_command(cmd).await;
            self.after(&result);
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
            let result = self.manager().req_packed_commands(cmd, offset, count).await;
            self.after(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.manager().get_db()
    }
}
