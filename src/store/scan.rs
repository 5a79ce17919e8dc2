//! A scan of one partition's customer keys (or of a hash of its: an export's saved values) that
//! returns every key present throughout it, on one Redis or a Redis Cluster, across Redis
//! restarts, failovers and slot migrations.
//!
//! `SCAN`'s guarantee (every key present from the start to the end of a full iteration is
//! returned) holds only on the server process that gave out the cursor: a cursor is a position
//! in that process's hash table, whose hash function is seeded at random when Redis starts. A
//! cursor taken to another process — Redis restarted, a replica promoted, the partition's slot
//! moved to another master — skips keys. And while a slot migrates, its keys are moved to the
//! new master one by one: they are on two nodes, and a scan of either misses the other's (the
//! page's guard, an `EXISTS` of the slot's hash tag, is redirected to the new master once the
//! tag is not on the old one).
//!
//! So every page also reads the identity of the connection that served it (`CLIENT INFO`: its
//! id and the addresses of both ends; a new process, another node or a reconnection gives
//! another one — the same only if a new connection got both the old one's id and its client
//! port — and the least-privileged user tierd runs as may run it, unlike `INFO`), and on a
//! cluster, after its `SCAN`, whether the slot is migrating from or to the node that answered
//! (`CLUSTER NODES`). A cursor given out on another connection starts the scan again from 0; a
//! scan during which any page found its slot migrating starts again at its end, and so
//! completes only with a pass that saw no migration, on the slot's master. A scan that starts
//! again returns keys it returned before: callers tolerate repeats (`SCAN` itself may repeat a
//! key). A slot left migrating (a reshard that died half-way, until `redis-cli --cluster fix`)
//! keeps a scan going round: callers pause between rounds and say so.

use super::connection::Connection;
use super::keys::PartitionKeys;
use redis::{ErrorKind, RedisError, RedisResult, Value};

/// Where a scan stands: `SCAN`'s cursor and the connection that gave it out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanCursor {
    position: u64,
    /// A hash of `CLIENT INFO`'s `id`, `addr` and `laddr` of the connection that gave out
    /// `position` (a hash: the cursor is `Copy`, and lives with a sweep's state).
    issuer: u64,
    /// Whether a page of this scan found its slot migrating.
    saw_migration: bool,
}

impl ScanCursor {
    /// The start of a scan.
    pub fn start() -> Self {
        Self::default()
    }

    /// Whether this is the start of a scan (a first page, or a scan started again).
    pub fn is_start(&self) -> bool {
        self.position == 0
    }
}

/// One page of a scan: of customer keys, or of a hash's entries (`T = (field, value)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T = String> {
    /// The keys (or entries) found (possibly some found before).
    pub keys: Vec<T>,
    /// Where the next page starts; `None` when the scan is complete.
    pub next: Option<ScanCursor>,
    /// Why the scan started again at this page, if it did.
    pub restarted: Option<Restart>,
}

/// Why a scan started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// The cursor was given out on another connection (Redis restarted, failed over, the slot
    /// moved, or the connection was made again).
    OtherConnection,
    /// A page of the scan found the partition's slot migrating between two masters.
    SlotMigrating,
}

impl Restart {
    /// Why, in words, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::OtherConnection => "the cursor was given out on another connection",
            Restart::SlotMigrating => "the partition's slot is migrating",
        }
    }
}

/// The next page of `keys`' customer keys from `at`, about `count` keys examined.
///
/// # Errors
/// Redis's, or a reply of an unexpected shape.
pub async fn customer_keys(
    conn: &mut Connection,
    keys: &PartitionKeys,
    at: &ScanCursor,
    count: usize,
) -> RedisResult<Page> {
    let pattern = keys.customer_pattern();
    next_page(conn, keys, at, true, |position| {
        let mut scan = redis::cmd("SCAN");
        scan.arg(position)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(count);
        scan
    })
    .await
}

/// The next page of the entries (field, value) of `hash`, one of `keys`' partition's keys
/// (in its slot), from `at`, about `count` entries examined. `HSCAN` has `SCAN`'s guarantee
/// on one server process's table only, so its cursor is checked the same way; a slot
/// migration needs no check of its own: the hash moves whole (one `MIGRATE`), and the pages
/// after it are answered by the new master, on another connection.
///
/// # Errors
/// Redis's, or a reply of an unexpected shape.
pub async fn hash_entries(
    conn: &mut Connection,
    keys: &PartitionKeys,
    hash: &str,
    at: &ScanCursor,
    count: usize,
) -> RedisResult<Page<(String, Vec<u8>)>> {
    next_page(conn, keys, at, false, |position| {
        let mut scan = redis::cmd("HSCAN");
        scan.arg(hash).arg(position).arg("COUNT").arg(count);
        scan
    })
    .await
}

/// The next page from `at` of the scan `scan(cursor)` (a `SCAN` or `HSCAN` of `keys`'
/// partition's slot), its cursor checked and started again as the module says; whether the
/// slot is migrating is checked when `migrations` is set (on a cluster).
async fn next_page<T: redis::FromRedisValue>(
    conn: &mut Connection,
    keys: &PartitionKeys,
    at: &ScanCursor,
    migrations: bool,
    scan: impl Fn(u64) -> redis::Cmd,
) -> RedisResult<Page<T>> {
    let watch = migrations && conn.is_cluster();
    let mut at = *at;
    let mut restarted = None;
    loop {
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT").arg("INFO");
        pipe.add_command(scan(at.position));
        if watch {
            // After the SCAN: a migration that began before its keys were read is seen.
            pipe.cmd("CLUSTER").arg("NODES");
            pipe.cmd("CLUSTER").arg("KEYSLOT").arg(&keys.meta);
        }
        let mut replies: Vec<Value> = pipe.query_async(conn).await?;
        if replies.len() != if watch { 4 } else { 2 } {
            return Err(unexpected("a reply per command"));
        }
        let slot = watch.then(|| replies.pop().expect("checked"));
        let nodes = watch.then(|| replies.pop().expect("checked"));
        let (next, found): (u64, Vec<T>) = redis::from_redis_value(replies.pop().expect("checked"))
            .map_err(|_| unexpected("the scan's (cursor, keys)"))?;
        let info: String = redis::from_redis_value(replies.pop().expect("checked"))
            .map_err(|_| unexpected("CLIENT INFO's line"))?;
        let issuer = issuer(&info).ok_or_else(|| unexpected("CLIENT INFO's id, addr, laddr"))?;
        if at.position != 0 && at.issuer != issuer {
            at = ScanCursor::start();
            restarted = Some(Restart::OtherConnection);
            continue;
        }
        let migrating_now = match (nodes, slot) {
            (Some(nodes), Some(slot)) => {
                let nodes: String = redis::from_redis_value(nodes)
                    .map_err(|_| unexpected("CLUSTER NODES' text"))?;
                let slot: u16 = redis::from_redis_value(slot)
                    .map_err(|_| unexpected("CLUSTER KEYSLOT's slot"))?;
                migrating(&nodes, slot)
            }
            _ => false,
        };
        // Sticky: a migration seen at any page, even one that ended since (its last keys
        // may have moved into the part of the new master's table this scan already passed,
        // on a connection that served the scan before and after), starts the scan again.
        let saw_migration = at.saw_migration || migrating_now;
        if next != 0 {
            return Ok(Page {
                keys: found,
                next: Some(ScanCursor {
                    position: next,
                    issuer,
                    saw_migration,
                }),
                restarted,
            });
        }
        if saw_migration {
            return Ok(Page {
                keys: found,
                next: Some(ScanCursor::start()),
                restarted: Some(Restart::SlotMigrating),
            });
        }
        return Ok(Page {
            keys: found,
            next: None,
            restarted,
        });
    }
}

/// A hash of the `id`, `addr` and `laddr` fields of a `CLIENT INFO` line.
fn issuer(info: &str) -> Option<u64> {
    fields(info).map(|f| xxhash_rust::xxh3::xxh3_64(f.as_bytes()))
}

/// The `id`, `addr` and `laddr` fields of a `CLIENT INFO` line.
fn fields(info: &str) -> Option<String> {
    let field = |name: &str| {
        info.split_ascii_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
    };
    Some(format!(
        "{} {} {}",
        field("id")?,
        field("addr")?,
        field("laddr")?
    ))
}

/// Whether `CLUSTER NODES`, as the node that answered it sees itself, shows `slot` migrating
/// from it (`[slot->-target]`) or to it (`[slot-<-source]`).
fn migrating(nodes: &str, slot: u16) -> bool {
    let (away, here) = (format!("[{slot}->-"), format!("[{slot}-<-"));
    nodes
        .lines()
        .filter(|line| {
            line.split_ascii_whitespace()
                .nth(2)
                .is_some_and(|flags| flags.split(',').any(|f| f == "myself"))
        })
        .any(|line| {
            line.split_ascii_whitespace()
                .any(|f| f.starts_with(&away) || f.starts_with(&here))
        })
}

/// The error of a reply of an unexpected shape (`what` was expected).
fn unexpected(what: &'static str) -> RedisError {
    RedisError::from((
        ErrorKind::UnexpectedReturnType,
        "a scan expected",
        what.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issuer_is_the_connections_id_and_both_addresses() {
        let info = "id=7 addr=127.0.0.1:51234 laddr=127.0.0.1:6379 fd=8 name= age=0 idle=0 \
                    flags=N db=0 cmd=client|info";
        assert_eq!(
            fields(info).as_deref(),
            Some("7 127.0.0.1:51234 127.0.0.1:6379")
        );
        assert_eq!(fields("id=7 addr=127.0.0.1:51234"), None);
        assert_eq!(issuer("id=7 addr=127.0.0.1:51234"), None);
        assert_ne!(issuer(info), issuer(&info.replace("51234", "51235")));
        // A field whose name only begins like another's is not it.
        assert_eq!(
            fields("idle=3 id=9 laddr=b addr=a").as_deref(),
            Some("9 a b")
        );
    }

    #[test]
    fn only_a_slot_migrating_from_or_to_the_answering_node_counts() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460 [866->-b2]
b2 127.0.0.1:7002@17002 master - 0 1 2 connected 5461-10922 [866-<-a1]
";
        assert!(migrating(nodes, 866));
        assert!(!migrating(nodes, 86));
        assert!(!migrating(nodes, 8660));
        let importing = "\
a1 127.0.0.1:7001@17001 master - 0 0 1 connected 0-5460 [866->-b2]
b2 127.0.0.1:7002@17002 myself,master - 0 1 2 connected 5461-10922 [866-<-a1]
";
        assert!(migrating(importing, 866));
        let elsewhere = "\
a1 127.0.0.1:7001@17001 master - 0 0 1 connected 0-5460 [866->-b2]
b2 127.0.0.1:7002@17002 master - 0 1 2 connected 5461-10922 [866-<-a1]
c3 127.0.0.1:7003@17003 myself,master - 0 1 3 connected 10923-16383
";
        assert!(!migrating(elsewhere, 866));
    }
}
