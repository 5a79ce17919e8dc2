//! tierd's connection to a Redis Cluster keeps answering while the cluster's slots move.
//!
//! redis-rs 1.8's cluster connection could stop for good during a slot migration: a call
//! spanning every partition (one request per slot, 256 at once), made again and again while
//! `redis-cli --cluster reshard` moved slots, was never answered, nor was any later call on the
//! connection (see `store::connection::CLUSTER_CALLS_AT_ONCE`). `tierd export` hung in its first
//! call this way. tierd now bounds the requests a cluster connection has on their way, and
//! replaces a connection that leaves a call unanswered for `CLUSTER_CALL_TIMEOUT`.

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::Redis;
use tierd::store::connection::{Connection, CLUSTER_CALL_TIMEOUT};
use tierd::store::keys::Keyspace;

/// Sets the flag to false when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// One `EXISTS` per possible partition (what `Store::open` asks a tool's fresh connection):
/// 256 single-slot requests at once on a cluster.
fn every_partition() -> redis::Pipeline {
    let keyspace = Keyspace::new("tierd", "g", "purchases");
    let mut pipe = redis::pipe();
    for p in 0..256 {
        pipe.cmd("EXISTS").arg(keyspace.partition(p).meta);
    }
    pipe
}

/// Calls across every partition, on a fresh connection each time (a tool's) and on one
/// long-lived connection (the service's), for 60 s while 1,000 slots move back and forth
/// between two masters holding 200,000 keys. No call may go unanswered for longer than a
/// call's timeout and a reconnection (a connection stopped for good would hold it forever);
/// the long-lived connection answers once the slots stop moving.
///
/// Without the bound and the timeout the test fails within 10 s of moves (2 of 2 runs, debug);
/// with the timeout alone a call failed after 20 s about every 20 s (3 in a run), each followed
/// by answers on the replaced connection; with both, no call failed (2,332 rounds).
#[test]
fn calls_across_every_partition_are_answered_while_slots_move() {
    let redis = Redis::start_cluster();
    let port = redis.nodes()[0].port.to_string();
    let filled = Command::new("redis-benchmark")
        .args(["-p", &port, "--cluster", "-t", "set", "-n", "200000"])
        .args(["-r", "200000", "-q"])
        .output()
        .unwrap();
    assert!(filled.status.success(), "{filled:?}");
    let masters: Vec<_> = redis.nodes().iter().filter(|n| n.is_master()).collect();
    let (a, b) = (masters[0], masters[1]);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = tierd::store::client::client(&redis.config("tierd")).unwrap();
    let long_lived = runtime
        .block_on(Connection::connect(client.clone()))
        .unwrap();
    // Longer than any answer of a connection that works: a call's timeout, the connection's
    // replacement (at most one more), and a margin for a debug build beside other tests.
    let unanswered = CLUSTER_CALL_TIMEOUT * 2 + Duration::from_secs(20);
    let moving = AtomicBool::new(true);
    // Whether a reshard is running (rounds that begin then overlap a migration).
    let resharding = AtomicBool::new(false);
    let moves = AtomicUsize::new(0);
    let (mut rounds, mut overlapping, mut errors) = (0, 0, 0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut way = (a, b);
            while moving.load(Ordering::SeqCst) {
                // redis-cli sometimes finds the nodes disagreeing on the slots for long after a
                // reshard; the cluster is then fixed and the slots move on.
                resharding.store(true, Ordering::SeqCst);
                let moved = Redis::reshard(way.0, way.1, 1_000);
                resharding.store(false, Ordering::SeqCst);
                match moved {
                    Ok(()) => {
                        moves.fetch_add(1, Ordering::SeqCst);
                        way = (way.1, way.0);
                    }
                    Err(e) => {
                        eprintln!("reshard failed: {e}");
                        Redis::fix_cluster(a);
                    }
                }
            }
        });
        // The moves stop however this thread ends (a failed assertion included).
        let _stop = StopOnDrop(&moving);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if resharding.load(Ordering::SeqCst) {
                overlapping += 1;
            }
            let round = async {
                let mut fresh = Connection::connect(client.clone()).await?;
                let v: Vec<bool> = every_partition().query_async(&mut fresh).await?;
                assert_eq!(v.len(), 256);
                let v: Vec<bool> = every_partition()
                    .query_async(&mut long_lived.clone())
                    .await?;
                assert_eq!(v.len(), 256);
                Ok::<_, redis::RedisError>(())
            };
            match runtime.block_on(async { tokio::time::timeout(unanswered, round).await }) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    errors += 1;
                    eprintln!("round {rounds}: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(_) => {
                    panic!(
                        "round {rounds}: a call on the cluster went unanswered for {unanswered:?} \
                         ({} reshards done)",
                        moves.load(Ordering::SeqCst)
                    );
                }
            }
            rounds += 1;
        }
    });
    eprintln!(
        "{rounds} rounds ({overlapping} begun during a reshard), {errors} failed, {} reshards \
         of 1,000 slots",
        moves.load(Ordering::SeqCst)
    );
    assert!(moves.load(Ordering::SeqCst) >= 2, "the slots moved");
    assert!(
        overlapping >= 20,
        "{overlapping} rounds overlapped a reshard"
    );
    // The bound keeps the connection from stopping: a stop ended by the timeout (a failed
    // call) is let pass once, not more.
    assert!(errors <= 1, "{errors} of {rounds} rounds failed");
    // A connection that stopped in the last moves answers after its replacement: a call at most
    // fails first (its timeout).
    let answered = (0..2).find_map(|_| {
        let answer = runtime.block_on(async {
            tokio::time::timeout(
                unanswered,
                every_partition().query_async::<Vec<bool>>(&mut long_lived.clone()),
            )
            .await
        });
        match answer.expect("answered") {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("after the moves: {e}");
                None
            }
        }
    });
    let answered = answered.expect("the long-lived connection works once the slots stop moving");
    assert_eq!(answered.len(), 256);
}
