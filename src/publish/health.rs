//! What a partition's publisher reports to `/readyz/ingest`: a record Kafka refuses permanently,
//! blocking the outbox, or dead letters parked after such a refusal.

use std::sync::Mutex;

/// The publishing problem of one partition, if any (shared with the API).
#[derive(Debug, Default)]
pub struct PublishHealth {
    problem: Mutex<Option<String>>,
}

impl PublishHealth {
    /// Why this partition's outbox does not fully flow, if it does not.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().expect("publish health lock").clone()
    }

    pub(super) fn set(&self, problem: Option<String>) {
        *self.problem.lock().expect("publish health lock") = problem;
    }
}
