//! Partitions nobody processes. Every instance watches the whole input topic: a partition
//! whose stored offset (in Redis) has not moved for `ingest.stall_alarm_s` while records wait
//! after it is *stalled* — its owner is stuck, or the group hands it to no live member (a dead
//! member kept as leader, a wedged coordinator). Each instance counts them
//! (`tierd_input_partitions_stalled`) and logs them; one that owns no partition while some are
//! stalled says so loudly — an error in the log and the reason on `/readyz/ingest` — instead of
//! looking merely idle (issue 11, item 15).
//!
//! "Records wait" is decided by reading one: the log end alone cannot tell, because the last
//! offsets of a transactional producer's log are commit markers no consumer ever receives.

use crate::config::KafkaConfig;
use crate::partition::Ownership;
use crate::store::connection::Connection;
use crate::store::keys::Keyspace;
use crate::store::views;
use crate::telemetry::Telemetry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// How long one look at a partition's log may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Remembers since when each partition's stored offset has stayed where it is.
#[derive(Debug)]
pub struct StallTracker {
    after: Duration,
    seen: HashMap<i32, (Option<i64>, Instant)>,
}

impl StallTracker {
    /// A tracker that calls an offset stuck once it has not moved for `after`.
    pub fn new(after: Duration) -> Self {
        Self {
            after,
            seen: HashMap::new(),
        }
    }

    /// Records `partition`'s stored offset as seen at `now`; true when it has stayed there for
    /// at least the alarm time (whether records wait after it is the caller's question).
    pub fn stuck(&mut self, now: Instant, partition: i32, stored: Option<i64>) -> bool {
        let entry = self.seen.entry(partition).or_insert((stored, now));
        if entry.0 != stored {
            *entry = (stored, now);
        }
        now.duration_since(entry.1) >= self.after
    }
}

/// Reads the input topic outside the group, to tell whether records wait after an offset.
pub struct Probe {
    consumer: BaseConsumer<crate::kafka::EofExpected>,
    topic: String,
}

impl Probe {
    /// A reader of `kafka.input_topic` (never subscribes, never commits).
    ///
    /// # Errors
    /// librdkafka refused the settings.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer<crate::kafka::EofExpected> =
            crate::kafka::consumer_config(kafka)
                .set("group.id", format!("{}.watch", kafka.group_id))
                .set("statistics.interval.ms", "0")
                .set("enable.partition.eof", "true")
                // What tierd itself would read: aborted records are not waiting work.
                .set("isolation.level", "read_committed")
                .create_with_context(crate::kafka::EofExpected)?;
        Ok(Self {
            consumer,
            topic: kafka.input_topic.clone(),
        })
    }

    /// The end offset of each partition's log (`None` where the broker did not tell): one
    /// `ListOffsets` request per leader for all partitions, within [`PROBE_TIMEOUT`] in all.
    /// Blocks.
    pub fn log_ends(&self, partitions: i32) -> Vec<Option<i64>> {
        let mut latest = TopicPartitionList::new();
        for p in 0..partitions {
            if latest
                .add_partition_offset(&self.topic, p, Offset::End)
                .is_err()
            {
                return vec![None; usize::try_from(partitions).unwrap_or(0)];
            }
        }
        let found = self.consumer.offsets_for_times(latest, PROBE_TIMEOUT).ok();
        (0..partitions)
            .map(|p| {
                let element = found.as_ref()?.find_partition(&self.topic, p)?;
                match (element.error(), element.offset()) {
                    (Ok(()), Offset::Offset(end)) => Some(end),
                    _ => None,
                }
            })
            .collect()
    }

    /// Whether a record is readable at or after `from` (none: the log start) in `partition`;
    /// `None` when the broker did not tell in time. An offset before the log start counts as
    /// waiting: those records were deleted before anyone applied them. Blocks.
    pub fn waiting(&self, partition: i32, from: Option<i64>) -> Option<bool> {
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, PROBE_TIMEOUT)
            .ok()?;
        let from = from.unwrap_or(low);
        if from >= high {
            return Some(false);
        }
        if from < low {
            return Some(true);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(from))
            .ok()?;
        self.consumer.assign(&tpl).ok()?;
        let deadline = Instant::now() + PROBE_TIMEOUT;
        let found = loop {
            if Instant::now() >= deadline {
                break None;
            }
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) if m.partition() == partition => break Some(true),
                Some(Err(KafkaError::PartitionEOF(p))) if p == partition => break Some(false),
                _ => {}
            }
        };
        let _ = self.consumer.unassign();
        found
    }
}

/// Why this instance, owning no partition, is not just idle (shared with `/readyz/ingest`).
#[derive(Debug, Default)]
pub struct StallAlarm {
    reason: Mutex<Option<String>>,
}

impl StallAlarm {
    /// The reason, while raised.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().expect("stall alarm lock").clone()
    }

    fn set(&self, reason: Option<String>) {
        *self.reason.lock().expect("stall alarm lock") = reason;
    }
}

/// Each input partition's log end as the watch last read it (for the status page's lag of
/// every partition, whoever owns it).
#[derive(Debug, Default)]
pub struct LogEnds(Mutex<Option<(std::time::SystemTime, Vec<Option<i64>>)>>);

impl LogEnds {
    /// When read, and the end offset of each partition.
    pub fn latest(&self) -> Option<(std::time::SystemTime, Vec<Option<i64>>)> {
        self.0.lock().expect("log ends lock").clone()
    }

    fn set(&self, ends: Vec<Option<i64>>) {
        *self.0.lock().expect("log ends lock") = Some((std::time::SystemTime::now(), ends));
    }
}

/// What the watch needs.
pub struct Watch {
    /// Redis, for the stored offsets.
    pub redis: Connection,
    /// Key names.
    pub keyspace: Keyspace,
    /// Partitions of the input topic.
    pub partitions: i32,
    /// What this instance owns.
    pub ownership: Ownership,
    /// `ingest.stall_alarm_s`.
    pub after: Duration,
    /// The reader of the input topic.
    pub probe: Probe,
    /// Where the alarm is raised.
    pub alarm: Arc<StallAlarm>,
    /// The gauge.
    pub telemetry: Telemetry,
    /// Where each round's log ends are kept.
    pub log_ends: Arc<LogEnds>,
}

impl Watch {
    /// Watches until the task is dropped.
    pub async fn run(mut self) {
        let every = (self.after / 6).clamp(Duration::from_secs(1), Duration::from_secs(15));
        let mut tracker = StallTracker::new(self.after);
        let probe = Arc::new(self.probe);
        let mut reported: Option<(Vec<i32>, bool)> = None;
        loop {
            tokio::time::sleep(every).await;
            let stored =
                match views::stored_offsets(&mut self.redis, &self.keyspace, self.partitions).await
                {
                    Ok(stored) => stored,
                    // Redis trouble is reported by every other path; nothing can be judged now.
                    Err(_) => continue,
                };
            let ends = {
                let (probe, partitions) = (Arc::clone(&probe), self.partitions);
                tokio::task::spawn_blocking(move || probe.log_ends(partitions)).await
            };
            // Kept only when the broker told something (the time says when).
            if let Some(ends) = ends.ok().filter(|e| e.iter().any(Option::is_some)) {
                self.log_ends.set(ends);
            }
            let now = Instant::now();
            let suspects: Vec<(i32, Option<i64>)> = (0..self.partitions)
                .zip(stored)
                .filter(|&(p, s)| tracker.stuck(now, p, s))
                .collect();
            let stalled = if suspects.is_empty() {
                Vec::new()
            } else {
                let probe = Arc::clone(&probe);
                tokio::task::spawn_blocking(move || {
                    suspects
                        .into_iter()
                        .filter(|&(p, from)| probe.waiting(p, from) == Some(true))
                        .map(|(p, _)| p)
                        .collect::<Vec<i32>>()
                })
                .await
                .unwrap_or_default()
            };
            self.telemetry
                .input_partitions_stalled
                .set(i64::try_from(stalled.len()).unwrap_or(i64::MAX));
            let idle = self.ownership.read().expect("ownership lock").is_empty();
            let reason = (idle && !stalled.is_empty()).then(|| {
                format!(
                    "this instance owns no partition while partitions {stalled:?} have records waiting and their stored offsets have not moved for {} s: the group hands them to no live member (a dead member kept as leader, a wedged coordinator) or their owner is stuck; describe the group (kafka-consumer-groups.sh --describe), then restart the member that holds them",
                    self.after.as_secs()
                )
            });
            let now_reported = (stalled.clone(), idle);
            if reported.as_ref() != Some(&now_reported) {
                match (&reason, stalled.is_empty()) {
                    (Some(reason), _) => error!(reason, "Input partitions stalled."),
                    (None, false) => {
                        warn!(partitions = ?stalled, after_s = self.after.as_secs(), "Input partitions stalled: records wait and their stored offsets do not move.");
                    }
                    (None, true) if reported.as_ref().is_some_and(|r| !r.0.is_empty()) => {
                        info!("No input partition is stalled any more.");
                    }
                    (None, true) => {}
                }
                reported = Some(now_reported);
            }
            self.alarm.set(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_is_stuck_only_after_staying_put_for_the_alarm_time() {
        let t0 = Instant::now();
        let after = Duration::from_secs(90);
        let mut tracker = StallTracker::new(after);
        assert!(!tracker.stuck(t0, 0, Some(5)));
        assert!(!tracker.stuck(t0 + Duration::from_secs(89), 0, Some(5)));
        assert!(tracker.stuck(t0 + after, 0, Some(5)));
        // It moved: the clock starts again.
        assert!(!tracker.stuck(t0 + Duration::from_secs(100), 0, Some(6)));
        assert!(tracker.stuck(t0 + Duration::from_secs(190), 0, Some(6)));
        // Never claimed counts as a position too; partitions are independent.
        assert!(!tracker.stuck(t0 + Duration::from_secs(100), 1, None));
        assert!(tracker.stuck(t0 + Duration::from_secs(190), 1, None));
        assert!(!tracker.stuck(t0 + Duration::from_secs(191), 1, Some(0)));
    }
}
