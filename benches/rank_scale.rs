//! Rank cut-offs at 1M and 10M customers, Redis only (issue 12: "a recompute and its
//! re-evaluation stay proportional to the customers that cross, at 1M and 10M customers").
//!
//! For each population size, the rank sorted sets of 4 partitions are filled straight in Redis
//! (ranked values are whole amounts in minor units, log-uniform between 1 and 10^9, as net
//! spend is), then tierd's own code is timed on them:
//! - **the cut-off search** (`store::cutoffs::search`: the Lua script the owner of partition 0
//!   runs for each band of the pyramid presets, top 1 %, 20 % and 50 %), median of 5 runs;
//! - **the crossers' paging** (`store::rank_pages::page`: how the partition owners list the
//!   customers between an old and a new cut-off to re-evaluate them, in pages of
//!   `ranks.reevaluate_page`, default 500) for 1,000 and 10,000 crossers below the top-20 %
//!   cut-off, per customer crossed.
//!
//! Both must not grow with the population: the search is a bisection of `ZCOUNT`s (each
//! O(log N)), a page is one O(log N + page) range read.
//!
//! `cargo bench --bench rank_scale` (env: BENCH_RANK_SCALE_SIZES, default 100000,1000000,10000000).
//! Starts its own redis-server for each size; with `BENCH_REDIS=cluster` a local Redis Cluster
//! (3 masters, 3 replicas) instead, the partitions' sets in their own slots, and the search is
//! the one tierd runs there (`store::cutoffs::search_across_nodes`: the bisection in tierd, a
//! round trip to every partition's node per step, then a verification).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use common::{ms, Rng};
use std::time::{Duration, Instant};
use tierd::engine::rules::value::Ratio;
use tierd::store::keys::Keyspace;

const PARTITIONS: i32 = 4;
const PAGE: usize = 500;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A connection to each server holding data: the one Redis, or each master of a cluster.
fn servers(redis: &support::Redis) -> Vec<redis::Connection> {
    if redis.nodes().is_empty() {
        let client = redis::Client::open(redis.url.as_str()).unwrap();
        return vec![client.get_connection().unwrap()];
    }
    redis
        .nodes()
        .iter()
        .filter(|n| n.is_master())
        .map(support::ClusterNode::conn)
        .collect()
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --all-targets` / nextest probing the bench: nothing to list.
    }
    let sizes: Vec<u64> = std::env::var("BENCH_RANK_SCALE_SIZES")
        .unwrap_or_else(|_| "100000,1000000,10000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keyspace = Keyspace::new("tierd", "tierd", "purchases");
    let keys: Vec<String> = (0..PARTITIONS).map(|p| keyspace.rank(p, "value")).collect();
    let bands = [(1, 100), (20, 100), (50, 100)];

    let cluster = std::env::var("BENCH_REDIS").is_ok_and(|r| r == "cluster");
    let on = if cluster {
        "a Redis Cluster of 3 masters and 3 replicas"
    } else {
        "one Redis"
    };
    println!("## Rank cut-offs at scale ({on}, tierd's search and paging code)");
    println!();
    println!(
        "| customers | search, top 1 % | top 20 % | top 50 % | ZCOUNT rounds | list 1,000 crossers | list 10,000 crossers | per crosser (10,000) | Redis memory |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in &sizes {
        let redis = if cluster {
            support::Redis::start_cluster()
        } else {
            support::Redis::start()
        };
        let mut sync = redis.conn();
        let mut rng = Rng(0x5eed_0000 ^ n);
        let loading = Instant::now();
        let chunk = 10_000u64;
        let mut i = 0u64;
        while i < n {
            let mut pipe = redis::pipe();
            let end = (i + chunk).min(n);
            let p = (i / chunk) as usize % keys.len();
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(&keys[p]);
            for c in i..end {
                // log-uniform in [1, 10^9): exp(u · ln 10^9)
                let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                let value = (u * 1e9f64.ln()).exp().floor() as i64;
                cmd.arg(value).arg(format!("cust-{c:09}"));
            }
            pipe.add_command(cmd).ignore();
            pipe.query::<()>(&mut sync).unwrap();
            i = end;
        }
        let used: u64 = servers(&redis)
            .iter_mut()
            .map(|c| {
                let info: String = redis::cmd("INFO").arg("memory").query(c).unwrap();
                info.lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum();
        for mut c in servers(&redis) {
            let () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut c).unwrap();
        }
        eprintln!(
            "{n} customers loaded in {:.1} s",
            loading.elapsed().as_secs_f64()
        );

        let client = tierd::store::client::client(&redis.config("tierd")).unwrap();
        let (searches, rounds, paging) = rt.block_on(async {
            let mut conn = tierd::store::connection::Connection::connect(client)
                .await
                .unwrap();
            let mut searches = Vec::new();
            let mut twenty = None;
            for &(num, den) in &bands {
                let mut runs = Vec::new();
                let mut found = None;
                for _ in 0..5 {
                    let t = Instant::now();
                    let pct = Ratio { n: num, d: den };
                    found = if cluster {
                        tierd::store::cutoffs::search_across_nodes(&mut conn, &keys, pct).await
                    } else {
                        tierd::store::cutoffs::search(&mut conn, &keys, pct).await
                    }
                    .unwrap();
                    runs.push(t.elapsed());
                }
                let found = found.expect("a population");
                assert_eq!(found.population, n, "every customer is ranked");
                if num == 20 {
                    twenty = Some(found.kth);
                }
                searches.push(median(runs));
            }
            // The bisection's rounds, counted by Redis: ZCOUNT calls per search and partition.
            let zcounts: u64 = servers(&redis)
                .iter_mut()
                .map(|c| {
                    let stats: String = redis::cmd("INFO").arg("commandstats").query(c).unwrap();
                    stats
                        .lines()
                        .find_map(|l| l.strip_prefix("cmdstat_zcount:calls="))
                        .and_then(|v| v.split(',').next()?.parse::<u64>().ok())
                        .unwrap_or(0)
                })
                .sum();
            let rounds = zcounts / (5 * bands.len() as u64 * keys.len() as u64);
            // Crossers: the customers just below the top-20 % cut-off, as if it had moved down
            // past m of them. Listed from the new (lower) cut-off up to the old one, the way a
            // partition owner pages them, over every partition.
            let cut = twenty.expect("the top-20 % cut-off");
            let mut paging = Vec::new();
            for m in [1_000usize, 10_000] {
                // The value below which m customers lie under the cut-off, over all partitions.
                let per = m.div_ceil(keys.len());
                let mut lo = cut;
                for key in &keys {
                    let below: Vec<(String, i64)> = redis::cmd("ZREVRANGEBYSCORE")
                        .arg(key)
                        .arg(format!("({cut}"))
                        .arg("-inf")
                        .arg("WITHSCORES")
                        .arg("LIMIT")
                        .arg(per - 1)
                        .arg(1)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    if let Some((_, v)) = below.first() {
                        lo = lo.min(i128::from(*v));
                    }
                }
                let hi = cut - 1;
                let t = Instant::now();
                let mut listed = 0usize;
                for key in &keys {
                    let mut cursor: Option<(i128, String)> = None;
                    loop {
                        let page = tierd::store::rank_pages::page(
                            &mut conn,
                            key,
                            lo,
                            Some(hi),
                            cursor.as_ref().map(|(v, m)| (*v, m.as_str())),
                            PAGE,
                        )
                        .await
                        .unwrap();
                        listed += page.len();
                        match page.last() {
                            Some((member, v)) if page.len() == PAGE => {
                                cursor = Some((*v, member.clone()));
                            }
                            _ => break,
                        }
                    }
                }
                let took = t.elapsed();
                assert!(listed >= m, "{listed} listed, {m} expected at least");
                paging.push((took, listed));
            }
            (searches, rounds, paging)
        });
        println!(
            "| {n} | {} | {} | {} | {rounds} × {PARTITIONS} | {} ({} listed) | {} ({} listed) | {:.1} µs | {:.0} MiB |",
            ms(searches[0]),
            ms(searches[1]),
            ms(searches[2]),
            ms(paging[0].0),
            paging[0].1,
            ms(paging[1].0),
            paging[1].1,
            paging[1].0.as_secs_f64() * 1e6 / paging[1].1.max(1) as f64,
            used as f64 / (1024.0 * 1024.0),
        );
    }
}
