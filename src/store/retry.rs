//! The one retry policy for Redis calls that must not give up (a partition's loads, commits
//! and scans): exponential backoff from 50 ms to 2 s, with full jitter so that the partitions
//! of every instance do not retry in lock-step after a Redis restart.

use rand::Rng;
use std::time::Duration;

/// First delay.
const FIRST: Duration = Duration::from_millis(50);
/// Longest delay.
const MAX: Duration = Duration::from_secs(2);

/// The delays of one retried call.
#[derive(Debug, Clone)]
pub struct Backoff {
    ceiling: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { ceiling: FIRST }
    }
}

impl Backoff {
    /// Delays that start at `first` (rather than 50 ms), for retries that each cost more
    /// than a Redis call (a publish round, a producer).
    pub fn starting_at(first: Duration) -> Self {
        Self {
            ceiling: first.min(MAX),
        }
    }

    /// The next delay: uniform in `[ceiling / 2, ceiling]`, then the ceiling doubles (up to
    /// 2 s). Half the ceiling at least, so a retry storm never degenerates into a busy loop.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (ceiling * 2).min(MAX);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
    }

    /// Sleeps for the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_ceiling_and_stay_jittered_within_it() {
        let mut b = Backoff::default();
        let mut ceiling = FIRST;
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(MAX);
        }
        assert_eq!(ceiling, MAX);
    }
}
