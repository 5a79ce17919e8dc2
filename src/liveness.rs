//! What `/healthz` reports: whether the tasks that must keep running still do — the consumer
//! thread (it polls Kafka at least every `max.poll.interval.ms`, or the group evicts this
//! instance), each owned partition's runner and outbox publisher.
//!
//! A task that died is a bug (a panic) or a path that should not end: restarting the process
//! is the remedy (nothing is lost: state, offsets and undelivered changes are in Redis), so
//! `/healthz` fails and a supervisor (Kubernetes' liveness probe, systemd's watchdog through a
//! probe) restarts tierd. The consumer thread's end also stops tierd at once
//! ([`crate::app::run`] exits with an error): without it nothing is consumed.

use crate::telemetry::Telemetry;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::error;

/// The tasks whose death fails `/healthz` (the `task` label of `tierd_tasks_died_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// The Kafka consumer thread.
    Consumer,
    /// A partition's runner.
    Runner,
    /// A partition's outbox publisher.
    Publisher,
}

impl Task {
    /// Every task, for pre-initialised metric series.
    pub const ALL: [Task; 3] = [Task::Consumer, Task::Runner, Task::Publisher];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Consumer => "consumer",
            Task::Runner => "runner",
            Task::Publisher => "publisher",
        }
    }
}

/// How many deaths `/healthz` names (the count is in the metric).
const NAMED_DEATHS: usize = 4;

/// Shared by the consumer thread, the supervisor and the API.
pub struct Liveness {
    started: Instant,
    /// Milliseconds since `started` at the consumer thread's latest loop turn.
    polled_ms: AtomicU64,
    /// The consumer thread may go this long without a loop turn (`max.poll.interval.ms`).
    stall_limit: Duration,
    /// Set once the service is stopping: the consumer thread's end is then expected.
    stopping: AtomicBool,
    /// Why tasks died, the first few.
    deaths: Mutex<Vec<String>>,
    /// Notified when the consumer thread ends.
    consumer_ended: Notify,
    consumer_gone: AtomicBool,
    telemetry: Telemetry,
}

impl Liveness {
    /// A liveness whose consumer thread must turn at least every `stall_limit`.
    pub fn new(stall_limit: Duration, telemetry: Telemetry) -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            polled_ms: AtomicU64::new(0),
            stall_limit,
            stopping: AtomicBool::new(false),
            deaths: Mutex::new(Vec::new()),
            consumer_ended: Notify::new(),
            consumer_gone: AtomicBool::new(false),
            telemetry,
        })
    }

    /// The consumer thread turned its loop (polled Kafka).
    pub fn polled(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.polled_ms.store(ms, Ordering::Relaxed);
    }

    /// The service is stopping: the consumer thread's end is expected from now on.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Records that `task` died, and why (`what` names it: "partition 3's runner panicked: …").
    pub fn died(&self, task: Task, what: String) {
        error!(task = task.as_str(), what, "A task of tierd died; /healthz fails until tierd is restarted (nothing is lost: state, offsets and undelivered changes are in Redis).");
        self.telemetry
            .tasks_died
            .with_label_values(&[task.as_str()])
            .inc();
        let mut deaths = self.deaths.lock().expect("deaths lock");
        if deaths.len() < NAMED_DEATHS {
            deaths.push(what);
        }
    }

    /// A guard the consumer thread holds: when it is dropped — the thread returned or
    /// unwound from a panic — and the service is not stopping, the death is recorded and
    /// [`Self::consumer_ended`] resolves.
    pub fn consumer_guard(self: &Arc<Self>) -> ConsumerGuard {
        self.polled();
        ConsumerGuard(Arc::clone(self))
    }

    /// Resolves when the consumer thread has ended while the service was not stopping.
    pub async fn consumer_ended(&self) {
        loop {
            let ended = self.consumer_ended.notified();
            if self.consumer_gone.load(Ordering::Relaxed) {
                return;
            }
            ended.await;
        }
    }

    /// `Ok` while every task lives, or why not.
    ///
    /// # Errors
    /// What died or is stuck, in words.
    pub fn check(&self) -> Result<(), String> {
        let mut problems: Vec<String> = self.deaths.lock().expect("deaths lock").clone();
        if !self.consumer_gone.load(Ordering::Relaxed) {
            let polled = Duration::from_millis(self.polled_ms.load(Ordering::Relaxed));
            let idle = self.started.elapsed().saturating_sub(polled);
            if idle > self.stall_limit {
                problems.push(format!(
                    "the consumer thread has not polled Kafka for {} s (over max.poll.interval.ms, {} ms): it is stuck, and the group has evicted this instance",
                    idle.as_secs(),
                    self.stall_limit.as_millis()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Held by the consumer thread for as long as it runs (see [`Liveness::consumer_guard`]).
pub struct ConsumerGuard(Arc<Liveness>);

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        let live = &self.0;
        if live.stopping.load(Ordering::Relaxed) {
            return;
        }
        let how = if std::thread::panicking() {
            "panicked (the log has its message)"
        } else {
            "ended (the log says why)"
        };
        live.died(Task::Consumer, format!("the consumer thread {how}"));
        live.consumer_gone.store(true, Ordering::Relaxed);
        live.consumer_ended.notify_waiters();
    }
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_thread_that_ends_or_stalls_fails_the_check_unless_stopping() {
        let live = Liveness::new(Duration::from_millis(50), Telemetry::new());
        assert_eq!(live.check(), Ok(()));
        std::thread::sleep(Duration::from_millis(80));
        let stuck = live.check().unwrap_err();
        assert!(stuck.contains("has not polled Kafka"), "{stuck}");
        live.polled();
        assert_eq!(live.check(), Ok(()));

        let guard = live.consumer_guard();
        let thread = std::thread::spawn(move || {
            let _guard = guard;
            panic!("boom");
        });
        assert!(thread.join().is_err());
        let dead = live.check().unwrap_err();
        assert!(dead.contains("the consumer thread panicked"), "{dead}");
        assert!(!dead.contains("has not polled"), "{dead}");

        let calm = Liveness::new(Duration::from_secs(60), Telemetry::new());
        let guard = calm.consumer_guard();
        calm.stopping();
        drop(guard);
        assert_eq!(calm.check(), Ok(()));
    }

    #[tokio::test]
    async fn consumer_ended_resolves_after_the_end_even_when_awaited_late() {
        let live = Liveness::new(Duration::from_secs(60), Telemetry::new());
        drop(live.consumer_guard());
        tokio::time::timeout(Duration::from_secs(1), live.consumer_ended())
            .await
            .expect("resolved");
    }
}
