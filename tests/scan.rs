//! A scan of a partition's customer keys (`store::scan`, what the rules sweep, `tierd export`,
//! `simulate` and `offsets reset` read the partition by) returns every key present throughout
//! it while its keys move: a Redis restarted from its append-only file between two pages, the
//! partition's slot migrating to another master of a Redis Cluster (keys moved one by one)
//! during the scan, and the slot moved back between two pages. A `SCAN` cursor is one server
//! process's position: taken to another, it skips keys, and a scan of the old master misses
//! the keys already migrated.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};
use support::{ClusterNode, Redis};
use tierd::store::connection::Connection;
use tierd::store::keys::{Keyspace, PartitionKeys};
use tierd::store::scan::{self, Restart, ScanCursor};

const CUSTOMERS: usize = 4_000;

struct Scanner {
    runtime: tokio::runtime::Runtime,
    conn: Connection,
    keys: PartitionKeys,
    /// Scans the fields of the partition's snapshot hash (an export's saved values) instead of
    /// its customer keys.
    hash: bool,
}

impl Scanner {
    fn new(redis: &Redis) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = tierd::store::client::client(&redis.config("tierd")).unwrap();
        let conn = runtime.block_on(Connection::connect(client)).unwrap();
        let keys = Keyspace::new("tierd", "g", "purchases").partition(0);
        Self {
            runtime,
            conn,
            keys,
            hash: false,
        }
    }

    /// A scanner of the partition's snapshot hash.
    fn of_hash(redis: &Redis) -> Self {
        Self {
            hash: true,
            ..Self::new(redis)
        }
    }

    /// Writes the partition's customer keys (or, scanning the snapshot hash, its fields named
    /// so); returns them.
    fn fill(&mut self, redis: &Redis) -> HashSet<String> {
        let all: HashSet<String> = (0..CUSTOMERS)
            .map(|i| self.keys.customer(&format!("c{i}")))
            .collect();
        let mut pipe = redis::pipe();
        for key in &all {
            if self.hash {
                pipe.hset(&self.keys.snapshot, key, "1").ignore();
            } else {
                pipe.set(key, "1").ignore();
            }
        }
        pipe.query::<()>(&mut redis.conn()).unwrap();
        all
    }

    fn try_page(&mut self, at: &ScanCursor) -> redis::RedisResult<scan::Page> {
        let (conn, keys) = (&mut self.conn, &self.keys);
        if !self.hash {
            return self
                .runtime
                .block_on(scan::customer_keys(conn, keys, at, 100));
        }
        let page =
            self.runtime
                .block_on(scan::hash_entries(conn, keys, &keys.snapshot, at, 100))?;
        Ok(scan::Page {
            keys: page.keys.into_iter().map(|(field, _)| field).collect(),
            next: page.next,
            restarted: page.restarted,
        })
    }

    /// The next page (a failed call, while Redis restarts, is tried again as tierd's callers do).
    fn page(&mut self, at: &ScanCursor) -> scan::Page {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.try_page(at) {
                Ok(page) => return page,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("page failed, tried again: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

/// Pages until `stop(found, restarts)` says so after a page (or the scan is complete):
/// where the scan stands.
fn pages(
    scanner: &mut Scanner,
    mut at: ScanCursor,
    found: &mut HashSet<String>,
    restarts: &mut Vec<Restart>,
    mut stop: impl FnMut(&HashSet<String>, &[Restart]) -> bool,
) -> Option<ScanCursor> {
    loop {
        let page = scanner.page(&at);
        found.extend(page.keys);
        restarts.extend(page.restarted);
        at = page.next?;
        if stop(found, restarts) {
            return Some(at);
        }
    }
}

/// A scan started and read until it found at least `keys` keys: (found, restarts, where it
/// stands).
fn begun(scanner: &mut Scanner, keys: usize) -> (HashSet<String>, Vec<Restart>, ScanCursor) {
    let (mut found, mut restarts) = (HashSet::new(), Vec::new());
    let at = pages(
        scanner,
        ScanCursor::start(),
        &mut found,
        &mut restarts,
        |f, _| f.len() >= keys,
    )
    .expect("the scan is under way");
    (found, restarts, at)
}

/// A whole scan: (found, restarts).
fn whole(scanner: &mut Scanner) -> (HashSet<String>, Vec<Restart>) {
    let (mut found, mut restarts) = (HashSet::new(), Vec::new());
    let rest = pages(
        scanner,
        ScanCursor::start(),
        &mut found,
        &mut restarts,
        |_, _| false,
    );
    assert_eq!(rest, None);
    (found, restarts)
}

fn missing(all: &HashSet<String>, found: &HashSet<String>) -> usize {
    all.difference(found).count()
}

#[test]
fn a_scan_sees_every_key_across_a_redis_restart() {
    let redis = Redis::start_persistent();
    let mut scanner = Scanner::new(&redis);
    let all = scanner.fill(&redis);
    let (mut found, mut restarts, at) = begun(&mut scanner, CUSTOMERS / 2);
    // Another process, another hash seed: the cursor is a position in another table.
    redis.restart_persistent();
    let rest = pages(&mut scanner, at, &mut found, &mut restarts, |_, _| false);
    assert_eq!(rest, None);
    assert_eq!(missing(&all, &found), 0, "keys the scan did not return");
    assert_eq!(restarts, vec![Restart::OtherConnection]);
}

#[test]
fn a_scan_sees_every_key_while_its_slot_migrates_and_after_it_moved() {
    let redis = Redis::start_cluster();
    let mut scanner = Scanner::new(&redis);
    let all = scanner.fill(&redis);
    let pattern = scanner.keys.customer_pattern();
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&scanner.keys.meta)
        .query(&mut redis.conn())
        .unwrap();
    let source = redis.master_holding(&scanner.keys.meta);
    let target = other_master(&redis, source);

    // 1. The slot migrates during the scan: half its keys are moved while the scan reads the
    //    old master, which the scan then completes; then the migration completes.
    let (mut found, mut restarts, at) = begun(&mut scanner, CUSTOMERS / 4);
    begin_migration(slot, source, target);
    move_keys(slot, source, target, CUSTOMERS / 2);
    // The pages go to either master (a request naming a key the old one no longer has is
    // redirected to the new one) until a scan ends, complete without the check, with keys on
    // the other master unseen.
    let at = pages(&mut scanner, at, &mut found, &mut restarts, |_, r| {
        r.contains(&Restart::SlotMigrating)
    });
    assert!(
        restarts.contains(&Restart::SlotMigrating),
        "the end of a scan of a migrating slot starts it again (restarts {restarts:?}, {} keys \
         unseen)",
        missing(&all, &found)
    );
    assert!(at.is_some_and(|at| at.is_start()));
    move_keys(slot, source, target, usize::MAX);
    end_migration(&redis, slot, target);
    let (found, restarts) = whole(&mut scanner);
    assert_eq!(missing(&all, &found), 0);
    assert!(restarts.is_empty(), "{restarts:?}");
    assert_eq!(redis.scan(&pattern).len(), CUSTOMERS);

    // 2. The slot moves back between two pages: the cursor is the other master's.
    let (mut found, mut restarts, at) = begun(&mut scanner, CUSTOMERS / 2);
    begin_migration(slot, target, source);
    move_keys(slot, target, source, usize::MAX);
    end_migration(&redis, slot, source);
    let rest = pages(&mut scanner, at, &mut found, &mut restarts, |_, _| false);
    assert_eq!(rest, None);
    assert_eq!(missing(&all, &found), 0, "keys the scan did not return");
    assert_eq!(restarts, vec![Restart::OtherConnection]);

    // 3. A migration begins and ends during one scan: pages are read from the new master
    //    (redirected) while keys still arrive there, and the last page finds no migration.
    let (mut found, mut restarts, at) = begun(&mut scanner, CUSTOMERS / 4);
    begin_migration(slot, source, target);
    move_keys(slot, source, target, CUSTOMERS / 4);
    let mut read = 0;
    let at = pages(&mut scanner, at, &mut found, &mut restarts, |_, _| {
        read += 1;
        read == 8
    })
    .expect("the scan is under way on the new master");
    move_keys(slot, source, target, usize::MAX);
    end_migration(&redis, slot, target);
    let rest = pages(&mut scanner, at, &mut found, &mut restarts, |_, _| false);
    assert_eq!(rest, None);
    assert_eq!(
        missing(&all, &found),
        0,
        "keys the scan did not return (restarts {restarts:?})"
    );
    assert!(restarts.contains(&Restart::SlotMigrating), "{restarts:?}");
}

/// `tierd export`'s second pass reads the values a snapshot saved with `HSCAN` of one hash:
/// its cursor is one server process's too, and the hash moves whole with its slot. A Redis
/// restarted between two pages, and the slot moved to another master between two pages: the
/// scan starts again and returns every field.
#[test]
fn a_hash_scan_sees_every_field_across_a_restart_and_a_move() {
    let redis = Redis::start_persistent();
    let mut scanner = Scanner::of_hash(&redis);
    let all = scanner.fill(&redis);
    let (mut found, mut restarts, at) = begun(&mut scanner, CUSTOMERS / 2);
    redis.restart_persistent();
    let rest = pages(&mut scanner, at, &mut found, &mut restarts, |_, _| false);
    assert_eq!(rest, None);
    assert_eq!(missing(&all, &found), 0, "fields the scan did not return");
    assert_eq!(restarts, vec![Restart::OtherConnection]);

    let redis = Redis::start_cluster();
    let mut scanner = Scanner::of_hash(&redis);
    let all = scanner.fill(&redis);
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&scanner.keys.snapshot)
        .query(&mut redis.conn())
        .unwrap();
    let source = redis.master_holding(&scanner.keys.snapshot);
    let target = other_master(&redis, source);
    let (mut found, mut restarts, at) = begun(&mut scanner, CUSTOMERS / 2);
    begin_migration(slot, source, target);
    move_keys(slot, source, target, usize::MAX);
    end_migration(&redis, slot, target);
    let rest = pages(&mut scanner, at, &mut found, &mut restarts, |_, _| false);
    assert_eq!(rest, None);
    assert_eq!(missing(&all, &found), 0, "fields the scan did not return");
    assert_eq!(restarts, vec![Restart::OtherConnection]);
}

/// A master of `redis` other than `node`.
fn other_master<'a>(redis: &'a Redis, node: &ClusterNode) -> &'a ClusterNode {
    redis
        .nodes()
        .iter()
        .find(|n| n.is_master() && n.port != node.port)
        .expect("another master")
}

fn begin_migration(slot: u16, from: &ClusterNode, to: &ClusterNode) {
    let setslot = |node: &ClusterNode, state: &str, id: &str| {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(state)
            .arg(id)
            .query::<()>(&mut node.conn())
            .unwrap();
    };
    setslot(to, "IMPORTING", &from.id());
    setslot(from, "MIGRATING", &to.id());
}

/// Moves up to `at_most` of the slot's keys (`MIGRATE`, as `redis-cli --cluster reshard` does).
fn move_keys(slot: u16, from: &ClusterNode, to: &ClusterNode, at_most: usize) {
    let mut moved = 0;
    while moved < at_most {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100.min(at_most - moved))
            .query(&mut from.conn())
            .unwrap();
        if keys.is_empty() {
            return;
        }
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to.port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query::<()>(&mut from.conn())
            .unwrap();
        moved += keys.len();
    }
}

/// Gives the slot to `to` on every master (as `redis-cli --cluster reshard` ends), and waits
/// until the cluster agrees.
fn end_migration(redis: &Redis, slot: u16, to: &ClusterNode) {
    let id = to.id();
    for node in redis.nodes().iter().filter(|n| n.is_master()) {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("NODE")
            .arg(&id)
            .query::<()>(&mut node.conn())
            .unwrap();
    }
    redis.wait_cluster_ok(Duration::from_secs(30));
}

/// The scan reads its connection's identity and, on a cluster, the slot's state with commands
/// a least-privileged user may run (`+@all -@dangerous`: no `INFO`, no `CLIENT LIST`).
#[test]
fn a_scan_runs_as_a_user_without_dangerous_commands() {
    for mut redis in [Redis::start(), Redis::start_cluster()] {
        let admin: Vec<redis::Connection> = if redis.nodes().is_empty() {
            vec![redis::Client::open(redis.url.as_str())
                .unwrap()
                .get_connection()
                .unwrap()]
        } else {
            redis.nodes().iter().map(ClusterNode::conn).collect()
        };
        for mut conn in admin {
            let () = redis::cmd("ACL")
                .arg(&["SETUSER", "tierd-app", "on", ">app-secret", "~*", "&*"][..])
                .arg(&["+@all", "-@dangerous"][..])
                .query(&mut conn)
                .unwrap();
        }
        let scheme = redis.url.split("://").next().unwrap().to_owned();
        redis.url = redis.url.replacen(
            &format!("{scheme}://"),
            &format!("{scheme}://tierd-app:app-secret@"),
            1,
        );
        let mut scanner = Scanner::new(&redis);
        let all = scanner.fill(&redis);
        let refused: redis::RedisResult<redis::Value> =
            redis::cmd("CLIENT").arg("LIST").query(&mut redis.conn());
        assert!(refused.is_err(), "the user must not run CLIENT LIST");
        let (found, restarts) = whole(&mut scanner);
        assert_eq!(missing(&all, &found), 0);
        assert!(restarts.is_empty());
    }
}
