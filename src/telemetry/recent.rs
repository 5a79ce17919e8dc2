//! What the status page shows of this instance's own work besides the metrics: the latest
//! tier changes it decided ([`RecentChanges`]) and the flows between tiers over the last hour
//! ([`FlowHistory`], from snapshots of `tierd_tier_changes_total`).

use prometheus::core::Collector;
use prometheus::IntCounterVec;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many recent changes are kept.
pub const RECENT: usize = 20;

/// The latest tier changes this instance committed: their input partition and JSON body
/// (newest first). Whoever shows them leaves out customers erased since (their state is gone
/// from Redis: `/v1/status` checks).
#[derive(Debug, Default)]
pub struct RecentChanges(Mutex<VecDeque<(i32, Vec<u8>)>>);

impl RecentChanges {
    /// Records a commit's changes in `partition` (`bodies` newest first; at most [`RECENT`]
    /// are read, so a commit of many changes costs no more than a small one).
    pub fn record<'a>(&self, partition: i32, bodies: impl Iterator<Item = &'a [u8]>) {
        let newest: Vec<Vec<u8>> = bodies.take(RECENT).map(<[u8]>::to_vec).collect();
        if newest.is_empty() {
            return;
        }
        let mut kept = self.0.lock().expect("recent lock");
        for body in newest.into_iter().rev() {
            kept.push_front((partition, body));
        }
        kept.truncate(RECENT);
    }

    /// The kept changes, newest first, parsed, with their partition.
    pub fn latest(&self) -> Vec<(i32, serde_json::Value)> {
        self.0
            .lock()
            .expect("recent lock")
            .iter()
            .filter_map(|(p, b)| Some((*p, serde_json::from_slice(b).ok()?)))
            .collect()
    }
}

/// Counts per (from, to) tier.
pub type Flows = BTreeMap<(String, String), u64>;

/// Snapshots of the tier-change counter, one a minute for the last hour.
#[derive(Debug)]
pub struct FlowHistory {
    window: Duration,
    snapshots: Mutex<VecDeque<(Instant, Flows)>>,
}

impl Default for FlowHistory {
    fn default() -> Self {
        Self::new(Duration::from_secs(3600))
    }
}

impl FlowHistory {
    /// Flows over the last `window`, starting empty now.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            snapshots: Mutex::new(VecDeque::from([(Instant::now(), Flows::new())])),
        }
    }

    /// The counter's totals per (from, to), summed over reasons.
    pub fn totals(counter: &IntCounterVec) -> Flows {
        let mut flows = Flows::new();
        for family in counter.collect() {
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                let count = metric.get_counter().get_value() as u64;
                if count > 0 {
                    *flows.entry((label("from"), label("to"))).or_default() += count;
                }
            }
        }
        flows
    }

    /// Takes a snapshot of `totals` at `now` (every minute), dropping those no longer needed:
    /// the newest one at least `window` old is kept as the baseline.
    pub fn snapshot(&self, now: Instant, totals: Flows) {
        let mut snapshots = self.snapshots.lock().expect("flows lock");
        snapshots.push_back((now, totals));
        while snapshots.len() > 1 && now.duration_since(snapshots[1].0) >= self.window {
            snapshots.pop_front();
        }
    }

    /// The flows between `totals` (now) and the baseline, and how long that covers.
    pub fn since_baseline(&self, now: Instant, totals: &Flows) -> (Flows, Duration) {
        let snapshots = self.snapshots.lock().expect("flows lock");
        let (at, base) = snapshots.front().expect("a baseline is always kept");
        let mut flows = Flows::new();
        for (pair, count) in totals {
            let delta = count.saturating_sub(base.get(pair).copied().unwrap_or(0));
            if delta > 0 {
                flows.insert(pair.clone(), delta);
            }
        }
        (flows, now.duration_since(*at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flows(pairs: &[(&str, &str, u64)]) -> Flows {
        pairs
            .iter()
            .map(|(f, t, n)| ((f.to_string(), t.to_string()), *n))
            .collect()
    }

    #[test]
    fn recent_changes_keep_the_newest_twenty_newest_first() {
        let recent = RecentChanges::default();
        for commit in 0..3 {
            let bodies: Vec<Vec<u8>> = (0..10)
                .rev()
                .map(|i| format!("{{\"n\":{}}}", commit * 10 + i).into_bytes())
                .collect();
            recent.record(0, bodies.iter().map(Vec::as_slice));
        }
        let latest = recent.latest();
        assert_eq!(latest.len(), RECENT);
        assert_eq!(latest[0].1["n"], 29);
        assert_eq!(latest[19].1["n"], 10);
    }

    #[test]
    fn flows_are_counted_since_the_newest_snapshot_a_window_old() {
        let t0 = Instant::now();
        let history = FlowHistory::new(Duration::from_secs(3600));
        let minute = Duration::from_secs(60);
        // Totals after each minute: 1 up A→B per minute.
        for m in 1..=90u64 {
            history.snapshot(t0 + minute * m as u32, flows(&[("B", "A", m)]));
        }
        let now = t0 + minute * 90;
        let (f, covered) = history.since_baseline(now, &flows(&[("B", "A", 90), ("C", "B", 2)]));
        assert_eq!(covered, Duration::from_secs(3600));
        assert_eq!(f, flows(&[("B", "A", 60), ("C", "B", 2)]));
        // Young: since the start.
        let young = FlowHistory::new(Duration::from_secs(3600));
        let (f, _) = young.since_baseline(Instant::now(), &flows(&[("B", "A", 3)]));
        assert_eq!(f, flows(&[("B", "A", 3)]));
    }
}
