//! [`PartitionStore`]: a partition's store as its owner uses it, every call retried with the
//! one [`Backoff`] policy while Redis fails.

use super::{commit, load, ApplyError, CommitBatch, Committed};
use crate::store::connection::Connection;
use crate::store::keys::PartitionKeys;
use crate::store::retry::Backoff;
use crate::store::scan::{self, ScanCursor};
use crate::telemetry::{events, Telemetry};

/// Evaluates `$call` (a `Result<_, ApplyError>`) until it succeeds or fails for a reason
/// retrying cannot fix, backing off in between. (A macro rather than a function taking an
/// async closure: futures of async closures over borrowed connections are not provably `Send`
/// yet, and the runner's future must be.)
macro_rules! retrying {
    ($store:expr, $call:expr) => {{
        let mut backoff = Backoff::default();
        loop {
            let result: Result<_, ApplyError> = $call;
            match result {
                Err(error) if error.is_retriable() => $store.failed(&mut backoff, &error).await,
                other => break other,
            }
        }
    }};
}

/// The pause before a scan goes round again because its slot was migrating.
const MIGRATING_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// A partition's store as its owner uses it: every call is retried with [`Backoff`] while
/// Redis fails (a batch is never skipped); fencing, divergence and corrupt states are returned
/// at once.
pub struct PartitionStore {
    conn: Connection,
    /// The cut-off duty's connection (see [`Self::connection`]).
    duty: Connection,
    keys: PartitionKeys,
    rank_keys: Vec<String>,
    partition: i32,
    epoch: i64,
    telemetry: Telemetry,
}

impl PartitionStore {
    /// The store of `partition`, claimed with `epoch`; `rank_keys` are its rank sorted sets in
    /// the rules' rank order.
    pub fn new(
        conn: Connection,
        duty: Connection,
        keys: PartitionKeys,
        rank_keys: Vec<String>,
        partition: i32,
        epoch: i64,
        telemetry: Telemetry,
    ) -> Self {
        Self {
            conn,
            duty,
            keys,
            rank_keys,
            partition,
            epoch,
            telemetry,
        }
    }

    /// The partition's keys.
    pub fn keys(&self) -> &PartitionKeys {
        &self.keys
    }

    /// The partition's rank sorted sets, in the rules' rank order.
    pub fn rank_keys(&self) -> &[String] {
        &self.rank_keys
    }

    /// A connection for calls the owner makes once and retries at its own pace (cut-off
    /// duty): not the commits' connection, so that they do not wait behind its commits.
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.duty
    }

    /// Records a failed call and waits before it is retried.
    pub async fn failed(&self, backoff: &mut Backoff, error: &(dyn std::fmt::Display + Sync)) {
        events::RedisCallFailed {
            partition: self.partition,
            error,
        }
        .emit(&self.telemetry);
        backoff.wait().await;
    }

    /// Reads the states of `ids` in their stored form (`None`: not stored).
    pub async fn load(&mut self, ids: &[String]) -> Result<Vec<Option<Vec<u8>>>, ApplyError> {
        let keys: Vec<String> = ids.iter().map(|id| self.keys.customer(id)).collect();
        retrying!(self, load(&mut self.conn, &keys).await)
    }

    /// Commits a batch, fenced by this owner's epoch. Retrying is safe: the script recognises
    /// a commit that an earlier call applied although its reply was lost.
    ///
    /// # Errors
    /// [`ApplyError::Fenced`] or [`ApplyError::Diverged`].
    pub async fn commit(&mut self, batch: &CommitBatch) -> Result<Committed, ApplyError> {
        let (partition, epoch) = (self.partition, self.epoch);
        retrying!(
            self,
            commit(
                &mut self.conn,
                &self.keys,
                &self.rank_keys,
                partition,
                epoch,
                batch
            )
            .await
        )
    }

    /// Up to `limit` timers due at or before `upto`, earliest first: `(customer_id, due)`.
    ///
    /// # Errors
    /// None in practice (Redis errors are retried); the type is shared with the other calls.
    pub async fn due_timers(
        &mut self,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, ApplyError> {
        retrying!(self, {
            redis::cmd("ZRANGE")
                .arg(&self.keys.timers)
                .arg("-inf")
                .arg(upto)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .arg("WITHSCORES")
                .query_async(&mut self.conn)
                .await
                .map_err(ApplyError::from)
        })
    }

    /// The earliest due time in the timer index.
    ///
    /// # Errors
    /// None in practice (Redis errors are retried).
    pub async fn earliest_timer(&mut self) -> Result<Option<i64>, ApplyError> {
        let first: Vec<(String, i64)> = retrying!(self, {
            redis::cmd("ZRANGE")
                .arg(&self.keys.timers)
                .arg(0)
                .arg(0)
                .arg("WITHSCORES")
                .query_async(&mut self.conn)
                .await
                .map_err(ApplyError::from)
        })?;
        Ok(first.first().map(|(_, due)| *due))
    }

    /// One page of a scan of the partition's customer keys ([`scan::customer_keys`]): where
    /// the next page starts (`None` when the scan is complete) and the customer ids found.
    ///
    /// # Errors
    /// None in practice (Redis errors are retried).
    pub async fn scan_customer_ids(
        &mut self,
        at: &ScanCursor,
        count: u64,
    ) -> Result<(Option<ScanCursor>, Vec<String>), ApplyError> {
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        let page = retrying!(self, {
            scan::customer_keys(&mut self.conn, &self.keys, at, count)
                .await
                .map_err(ApplyError::from)
        })?;
        match page.restarted {
            Some(why @ scan::Restart::SlotMigrating) => {
                // Round again after a pause: a slot left migrating would otherwise have the
                // partition re-read its keys in a tight loop.
                tracing::warn!(
                    partition = self.partition,
                    reason = why.as_str(),
                    "The scan of the partition's customers starts again (a rules sweep completes only with a pass that saw no migration; a slot left migrating needs `redis-cli --cluster fix`)."
                );
                tokio::time::sleep(MIGRATING_PAUSE).await;
            }
            Some(why) => tracing::info!(
                partition = self.partition,
                reason = why.as_str(),
                "The scan of the partition's customers starts again."
            ),
            None => {}
        }
        let ids = page
            .keys
            .iter()
            .filter_map(|k| self.keys.customer_id(k).map(str::to_owned))
            .collect();
        Ok((page.next, ids))
    }

    /// The next page of the partition's rank `rank` between `lo` and `hi` after `cursor`
    /// (see [`crate::store::rank_pages::page`]), each customer with their ranked value.
    ///
    /// # Errors
    /// None in practice (Redis errors are retried).
    pub async fn ranked_after(
        &mut self,
        rank: usize,
        lo: i128,
        hi: Option<i128>,
        cursor: Option<(i128, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, i128)>, ApplyError> {
        retrying!(self, {
            crate::store::rank_pages::page(
                &mut self.conn,
                &self.rank_keys[rank],
                lo,
                hi,
                cursor,
                limit,
            )
            .await
            .map_err(ApplyError::from)
        })
    }

    /// Entries in the partition's outbox.
    ///
    /// # Errors
    /// None in practice (Redis errors are retried).
    pub async fn outbox_len(&mut self) -> Result<u64, ApplyError> {
        retrying!(self, {
            redis::cmd("XLEN")
                .arg(&self.keys.outbox)
                .query_async(&mut self.conn)
                .await
                .map_err(ApplyError::from)
        })
    }

    /// Checks that Redis still holds what this owner committed: its epoch, the next offset
    /// `expected` and `expected_commits` commits. An owner that commits learns it from the
    /// commit script; a quiet partition (no input, no timer) would otherwise never notice that
    /// Redis lost its last writes (a crash under `appendfsync everysec`, a failover to a lagging
    /// replica, a restored backup) and leave those events unapplied until its next input.
    ///
    /// # Errors
    /// [`ApplyError::Fenced`] or [`ApplyError::Diverged`], as a commit would return them
    /// (Redis errors are retried).
    pub async fn verify(&mut self, expected: i64, expected_commits: i64) -> Result<(), ApplyError> {
        let (epoch, stored, commits): (Option<String>, Option<i64>, Option<i64>) =
            retrying!(self, {
                redis::cmd("HMGET")
                    .arg(&self.keys.meta)
                    .arg("epoch")
                    .arg("next_offset")
                    .arg("commits")
                    .query_async(&mut self.conn)
                    .await
                    .map_err(ApplyError::from)
            })?;
        if epoch.as_deref() != Some(self.epoch.to_string().as_str()) {
            return Err(ApplyError::Fenced {
                partition: self.partition,
                ours: self.epoch,
                stored: epoch.unwrap_or_default(),
            });
        }
        let stored = stored.unwrap_or(-1);
        if stored != expected || commits.unwrap_or(0) != expected_commits {
            return Err(ApplyError::Diverged {
                partition: self.partition,
                stored,
                expected,
            });
        }
        Ok(())
    }

    /// Records (`Some`: the time from which the output topic is read back) or clears
    /// (`None`) the partition's pending restatement (see [`crate::engine::restate`]), kept
    /// with the partition so that a restart before it is done does it again; only while
    /// this owner's epoch is stored (a later owner keeps its own).
    ///
    /// # Errors
    /// None in practice (Redis errors are retried).
    pub async fn set_restate(&mut self, since_ms: Option<i64>) -> Result<(), ApplyError> {
        static SET: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                "if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end \
                 if ARGV[2] == '' then redis.call('HDEL', KEYS[1], 'restate') \
                 else redis.call('HSET', KEYS[1], 'restate', ARGV[2]) end return 1",
            )
        });
        let value = since_ms.map(|ms| ms.to_string()).unwrap_or_default();
        let _: i64 = retrying!(self, {
            SET.key(&self.keys.meta)
                .arg(self.epoch)
                .arg(&value)
                .invoke_async(&mut self.conn)
                .await
                .map_err(ApplyError::from)
        })?;
        Ok(())
    }

    /// The stored progress of the re-ranking under way (`None` if none).
    ///
    /// # Errors
    /// None in practice (Redis errors are retried).
    pub async fn rerank_progress(&mut self) -> Result<Option<String>, ApplyError> {
        retrying!(self, {
            redis::cmd("HGET")
                .arg(&self.keys.meta)
                .arg("rerank")
                .query_async(&mut self.conn)
                .await
                .map_err(ApplyError::from)
        })
    }
}
