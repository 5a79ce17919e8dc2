//! The rank cut-off search is the one piece of logic that lives in Lua (it must read every
//! partition's sorted sets at one atomic moment). This property test runs that script itself,
//! through a real redis-server, against a full sort: over values split across partitions, with
//! ties, small and wide value ranges, every band share. The same for the search a Redis
//! Cluster runs instead (the bisection in Rust, verified per partition), on a real cluster,
//! and under commits racing it.

mod support;

use proptest::prelude::*;
use support::Redis;
use tierd::engine::rules::rank::{cutoff, cutoffs_from_values, CutPoint, Ties};
use tierd::engine::rules::value::Ratio;
use tierd::store::connection::Connection;
use tierd::store::cutoffs::{count_at_or_above, search, search_across_nodes, Search};

/// Writes `parts` (one list of values per partition) as sorted sets under fresh keys.
fn write(conn: &mut tierd::store::client::SyncConnection, parts: &[Vec<i64>]) -> Vec<String> {
    let prefix = support::unique("rank");
    parts
        .iter()
        .enumerate()
        .map(|(p, values)| {
            let key = format!("{prefix}:{p}");
            for (i, v) in values.iter().enumerate() {
                let _: () = redis::cmd("ZADD")
                    .arg(&key)
                    .arg(*v)
                    .arg(format!("c{p}-{i}"))
                    .query(conn)
                    .unwrap();
            }
            key
        })
        .collect()
}

/// 2^53 - 1: the largest magnitude tierd ranks (`engine::MAX_EXACT_TOTAL`); every whole number
/// up to one above it is exact as a sorted-set score.
const EXACT: i64 = (1 << 53) - 1;

fn values() -> impl Strategy<Value = Vec<Vec<i64>>> {
    prop_oneof![
        // Small range: many ties.
        proptest::collection::vec(proptest::collection::vec(-50i64..50, 0..40), 1..6),
        // Wide range (money in minor units), still exact as doubles (|v| < 2^53).
        proptest::collection::vec(
            proptest::collection::vec(-1_000_000_000_000_000i64..1_000_000_000_000_000, 0..40),
            1..6
        ),
        // The whole ranked range, its ends included (where a bisection's midpoint is hardest
        // to keep whole, and a cut-off one above the top value must still be exact).
        proptest::collection::vec(
            proptest::collection::vec(
                prop_oneof![
                    -EXACT..=EXACT,
                    Just(EXACT),
                    Just(-EXACT),
                    Just(EXACT - 1),
                    Just(-EXACT + 1)
                ],
                0..40
            ),
            1..6
        ),
    ]
}

/// A fresh Redis, a runtime, and one shared async connection to it.
fn redis_and_runtime() -> (
    Redis,
    tokio::runtime::Runtime,
    redis::aio::MultiplexedConnection,
) {
    let redis = Redis::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shared = rt
        .block_on(redis.client().get_multiplexed_async_connection_with_config(
            &tierd::store::connection::direct_config(),
        ))
        .unwrap();
    (redis, rt, shared)
}

/// A Redis Cluster, a runtime, and tierd's connection to it.
fn cluster_and_runtime() -> (Redis, tokio::runtime::Runtime, Connection) {
    connected(Redis::start_cluster())
}

/// `redis`, a runtime, and tierd's connection to it.
fn connected(redis: Redis) -> (Redis, tokio::runtime::Runtime, Connection) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = tierd::store::client::client(&redis.config("t")).unwrap();
    let conn = rt.block_on(Connection::connect(client)).unwrap();
    (redis, rt, conn)
}

/// The search a deployment runs: the script on one Redis, the verified search across the
/// nodes on a cluster.
async fn run_search<C: redis::aio::ConnectionLike + Clone>(
    across_nodes: bool,
    conn: &mut C,
    keys: &[String],
    pct: Ratio,
) -> redis::RedisResult<Option<Search>> {
    if across_nodes {
        search_across_nodes(conn, keys, pct).await
    } else {
        search(conn, keys, pct).await
    }
}

/// The script's cut-off equals the k-th value of a full sort (and the in-memory cut-offs
/// `tierd simulate` uses); "value >= cut-off" is exactly the band a full sort gives when ties
/// go to the higher band; the lower tie rule never gives a band more than its share.
#[test]
fn the_cutoff_script_equals_a_full_sort() {
    let (redis, rt, shared) = redis_and_runtime();
    equals_a_full_sort(&redis, &rt, shared, false, 200);
}

/// The same for the search across a Redis Cluster's nodes (its bisection in Rust, verified
/// per partition), over sorted sets the cluster spreads over its masters.
#[test]
fn the_search_across_a_clusters_nodes_equals_a_full_sort() {
    let (redis, rt, conn) = cluster_and_runtime();
    equals_a_full_sort(&redis, &rt, conn, true, 80);
}

fn equals_a_full_sort<C: redis::aio::ConnectionLike + Clone>(
    redis: &Redis,
    rt: &tokio::runtime::Runtime,
    shared: C,
    across_nodes: bool,
    cases: u32,
) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases));
    let result = runner.run(&(values(), 1u32..=100), |(parts, pct)| {
        let (mut conn, mut aconn) = (redis.conn(), shared.clone());
        let keys = write(&mut conn, &parts);
        let all: Vec<i128> = parts.iter().flatten().map(|&v| i128::from(v)).collect();
        let point = CutPoint {
            rank: 0,
            pct: Ratio::new(i128::from(pct), 100).unwrap(),
        };
        let found = rt
            .block_on(run_search(across_nodes, &mut aconn, &keys, point.pct))
            .unwrap();
        if all.is_empty() {
            prop_assert!(found.is_none());
            return Ok(());
        }
        let found = found.expect("a ranked population has a cut-off");
        let k = point.k(all.len() as u64);
        let mut sorted = all.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let kth = sorted[usize::try_from(k).unwrap() - 1];
        let count_ge = |v: i128| all.iter().filter(|&&x| x >= v).count() as u64;
        prop_assert_eq!(found.population, all.len() as u64);
        prop_assert_eq!(found.k, k);
        prop_assert_eq!(found.kth, kth);
        prop_assert_eq!(found.at_or_above_kth, count_ge(kth));
        if let Some(above) = found.above_kth {
            prop_assert_eq!(above, count_ge(kth + 1));
        }
        let in_memory = cutoffs_from_values(&[point], &[Ties::Higher], 0, &mut [all.clone()]);
        prop_assert_eq!(in_memory.values[0], Some(found.kth));
        // Band by full sort: the first k, plus everyone tied with the k-th.
        prop_assert!(count_ge(found.kth) >= k);
        // The other tie rule: the band never holds more than its share, and only a tie group
        // that does not fit is left out.
        let lower = cutoff(found.kth, found.at_or_above_kth, k, Ties::Lower);
        let lower_band = rt
            .block_on(count_at_or_above(&mut aconn, &keys, lower))
            .unwrap();
        prop_assert_eq!(lower_band, count_ge(lower));
        prop_assert!(lower_band <= k);
        prop_assert!(lower_band == k || found.at_or_above_kth > k);
        let in_memory = cutoffs_from_values(&[point], &[Ties::Lower], 0, &mut [all.clone()]);
        prop_assert_eq!(in_memory.values[0], Some(lower));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Scores beyond ±(2^53 - 1) (which tierd never writes, see `engine::MAX_EXACT_TOTAL`) are
/// refused with an error at once. The first pair made the old search loop forever: its
/// midpoint 2^53 + 1 rounds back to 2^53, the lower end.
#[test]
fn the_cutoff_script_refuses_values_beyond_2_pow_53_instead_of_hanging() {
    let (redis, rt, aconn) = redis_and_runtime();
    refuses_values_beyond_2_pow_53(&redis, &rt, aconn, false);
}

/// The same for the search across a cluster's nodes.
#[test]
fn the_search_across_a_clusters_nodes_refuses_values_beyond_2_pow_53() {
    let (redis, rt, conn) = cluster_and_runtime();
    refuses_values_beyond_2_pow_53(&redis, &rt, conn, true);
}

fn refuses_values_beyond_2_pow_53<C: redis::aio::ConnectionLike + Clone>(
    redis: &Redis,
    rt: &tokio::runtime::Runtime,
    mut aconn: C,
    across_nodes: bool,
) {
    for parts in [
        vec![vec![EXACT + 1, EXACT + 3]],
        vec![vec![-EXACT - 1], vec![5]],
        vec![vec![i64::MAX / 2, 1]],
    ] {
        let keys = write(&mut redis.conn(), &parts);
        let pct = Ratio::new(1, 100).unwrap();
        let result = rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                run_search(across_nodes, &mut aconn, &keys, pct),
            )
            .await
        });
        let error = result
            .expect("the search must end, not block Redis")
            .expect_err("values beyond 2^53 are refused");
        assert!(error.to_string().contains("beyond +-(2^53 - 1)"), "{error}");
    }
    // A fractional score (tierd writes whole numbers only): the old midpoint 0.5 + ⌊0.75⌋
    // stayed at 0.5 for ever.
    let key = support::unique("rank");
    let _: () = redis::cmd("ZADD")
        .arg(&key)
        .arg("0.5")
        .arg("a")
        .arg("1")
        .arg("b")
        .query(&mut redis.conn())
        .unwrap();
    let result = rt.block_on(async {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            run_search(
                across_nodes,
                &mut aconn,
                &[key],
                Ratio::new(1, 100).unwrap(),
            ),
        )
        .await
    });
    let error = result
        .expect("the search must end, not block Redis")
        .expect_err("fractional scores are refused");
    assert!(error.to_string().contains("not whole"), "{error}");
}

/// The re-ranking's pages (`lua/ranked_after.lua`, the other Lua that holds logic): paging
/// through a value range by (value, customer) cursor returns exactly the range of a full sort,
/// in order (ties by customer id bytes, ids with non-ASCII bytes and prefixes of each other
/// included), whatever the page size; and re-scoring customers already passed (what a
/// re-evaluation may do) neither skips nor repeats any other customer.
#[test]
fn rank_pages_by_cursor_equal_a_full_sort() {
    let (redis, rt, shared) = redis_and_runtime();
    let ids = prop_oneof![
        "[a-c]{0,3}".prop_map(|s| format!("c{s}")),
        "[a-c\u{e9}\u{4e2d}]{1,3}",
    ];
    let entries = proptest::collection::btree_map(ids, -5i64..5, 0..60);
    let strategy = (
        entries,
        -6i64..6,
        proptest::option::of(-6i64..6),
        1usize..8,
        any::<bool>(),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(200));
    let result = runner.run(&strategy, |(entries, lo, hi, page, rescore)| {
        let mut conn = redis.conn();
        let mut aconn = shared.clone();
        let key = support::unique("pages");
        for (id, v) in &entries {
            let _: () = redis::cmd("ZADD")
                .arg(&key)
                .arg(*v)
                .arg(id)
                .query(&mut conn)
                .unwrap();
        }
        let in_range = |v: i64| v >= lo && hi.is_none_or(|h| v <= h);
        let mut expected: Vec<(String, i128)> = entries
            .iter()
            .filter(|(_, v)| in_range(**v))
            .map(|(id, v)| (id.clone(), i128::from(*v)))
            .collect();
        expected.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.as_bytes().cmp(b.0.as_bytes())));
        let (lo, hi) = (i128::from(lo), hi.map(i128::from));
        let mut got: Vec<(String, i128)> = Vec::new();
        let mut cursor: Option<(i128, String)> = None;
        let mut rescored = std::collections::BTreeSet::new();
        loop {
            let next = rt
                .block_on(tierd::store::rank_pages::page(
                    &mut aconn,
                    &key,
                    lo,
                    hi,
                    cursor.as_ref().map(|(v, c)| (*v, c.as_str())),
                    page,
                ))
                .unwrap();
            prop_assert!(next.len() <= page);
            let Some(last) = next.last().cloned() else {
                break;
            };
            cursor = Some((last.1, last.0.clone()));
            got.extend(next);
            if rescore && !rescored.contains(&last.0) {
                // Move the page's last customer elsewhere in the set, as a re-evaluation can.
                let _: () = redis::cmd("ZADD")
                    .arg(&key)
                    .arg(last.1 as i64 * 3 - 7)
                    .arg(&last.0)
                    .query(&mut conn)
                    .unwrap();
                rescored.insert(last.0);
            }
        }
        if rescore {
            // Everyone not re-scored exactly once, in order; a re-scored customer at most twice.
            let keep = |e: &(String, i128)| !rescored.contains(&e.0);
            let got_kept: Vec<_> = got.iter().filter(|e| keep(e)).cloned().collect();
            let expected_kept: Vec<_> = expected.iter().filter(|e| keep(e)).cloned().collect();
            prop_assert_eq!(got_kept, expected_kept);
            for id in &rescored {
                prop_assert!(got.iter().filter(|e| &e.0 == id).count() <= 2);
            }
        } else {
            prop_assert_eq!(got, expected);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The verification of the search across a cluster's nodes, under commits that race it:
/// partitions' ranked sets each flip, in one transaction, between a low and a high population
/// (a few milliseconds apart, so some searches run between flips and others across them).
/// Every cut-off the search returns is the exact cut-off of one combination of the
/// partitions' states (a cut): never a value bisected from different moments of a partition,
/// which can lie in a gap no population has. A search that cannot verify says so (an error),
/// and the caller keeps the cut-offs in force.
#[test]
fn the_search_across_nodes_under_racing_commits_returns_only_cut_offs_of_a_cut() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, Ordering};
    let (redis, rt, mut conn) = cluster_and_runtime();
    let prefix = support::unique("flip");
    let parts = 4usize;
    let keys: Vec<String> = (0..parts).map(|p| format!("{prefix}:{p}")).collect();
    let values = |p: usize, high: bool| -> Vec<i64> {
        let base = if high { 1_000_000 } else { 0 };
        (0..200)
            .map(|i| base + (p as i64) * 1_000 + i * 3)
            .collect()
    };
    let write = |conn: &mut tierd::store::client::SyncConnection, p: usize, high: bool| {
        let mut pipe = redis::pipe();
        pipe.atomic().del(&keys[p]).ignore();
        for (i, v) in values(p, high).into_iter().enumerate() {
            pipe.zadd(&keys[p], format!("c{i}"), v).ignore();
        }
        let () = pipe.query(conn).unwrap();
    };
    let mut sync = redis.conn();
    for p in 0..parts {
        write(&mut sync, p, false);
    }
    let pct = Ratio::new(1, 2).unwrap();
    let point = CutPoint { rank: 0, pct };
    // The cut-off of every combination of low and high partitions.
    let valid: std::collections::BTreeSet<i128> = (0..1u32 << parts)
        .map(|combo| {
            let mut all: Vec<i128> = (0..parts)
                .flat_map(|p| values(p, combo & (1 << p) != 0))
                .map(i128::from)
                .collect();
            all.sort_unstable_by(|a, b| b.cmp(a));
            all[usize::try_from(point.k(all.len() as u64)).unwrap() - 1]
        })
        .collect();
    let stop = AtomicBool::new(false);
    let (verified, refused, repeated) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut sync = redis.conn();
            while !stop.load(Ordering::Relaxed) {
                let p = rng.random_range(0..parts);
                write(&mut sync, p, rng.random_bool(0.5));
                std::thread::sleep(std::time::Duration::from_micros(rng.random_range(0..6_000)));
            }
        });
        let (mut verified, mut refused, mut repeated) = (0, 0, 0);
        for _ in 0..60 {
            match rt.block_on(search_across_nodes(&mut conn, &keys, pct)) {
                Ok(Some(found)) => {
                    repeated += found.repeated;
                    assert!(
                        valid.contains(&found.kth),
                        "{} is the cut-off of no combination of the partitions' states: {valid:?}",
                        found.kth
                    );
                    verified += 1;
                }
                Err(e) if tierd::store::cutoffs::unverified(&e) => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        (verified, refused, repeated)
    });
    eprintln!("{verified} searches verified ({repeated} repeated before), {refused} gave up");
    assert!(verified > 0, "no search verified");
    // The racing commits do fail verifications, and the searches that verified say so (the
    // count behind `tierd_rank_cutoff_searches_repeated_total`).
    assert!(
        repeated > 0 || refused > 0,
        "no verification failed: the commits did not race the searches"
    );
}

/// The publication of cut-offs (`publish_cutoffs.lua`): only under partition 0's owner's
/// epoch, under a version above the stored one and the floor, and only while the stored
/// version is still the one the cut-offs were computed after: a publication that arrives after
/// a later one (a call on a cluster that timed out and ran late) changes nothing.
#[test]
fn a_publication_of_cut_offs_arriving_after_a_later_one_changes_nothing() {
    use tierd::engine::rules::rank::Cutoffs;
    use tierd::store::cutoffs::{load_cutoffs, publish_cutoffs, Publication};
    let (redis, rt, mut conn) = connected(Redis::start());
    let keys = tierd::store::keys::Keyspace::new("t", "g", "purchases").partition(0);
    let () = redis::cmd("HSET")
        .arg(&keys.meta)
        .arg("epoch")
        .arg(7)
        .query(&mut redis.conn())
        .unwrap();
    let mut publish = |epoch: i64, floor: u64, after: u64, value: i128| {
        let cutoffs = Cutoffs {
            values: vec![Some(value)],
            ..Cutoffs::default()
        };
        rt.block_on(publish_cutoffs(
            &mut conn, &keys, epoch, floor, after, &cutoffs,
        ))
        .unwrap()
    };
    assert_eq!(publish(7, 0, 0, 100), Publication::Published(1));
    // Computed when none was stored, arriving after version 1.
    assert_eq!(publish(7, 0, 0, 50), Publication::Superseded);
    assert_eq!(publish(7, 0, 1, 200), Publication::Published(2));
    assert_eq!(publish(8, 0, 2, 300), Publication::Fenced);
    assert_eq!(publish(7, 10, 2, 400), Publication::Published(11));
    assert_eq!(publish(7, 0, 2, 500), Publication::Superseded);
    let stored = rt
        .block_on(load_cutoffs(&mut conn.clone(), &keys))
        .unwrap()
        .unwrap();
    assert_eq!((stored.version, stored.values), (11, vec![Some(400)]));
}
