//! Operator tools. Reading the live state in Redis without changing it: `tierd rules explain`
//! ([`explain`]), `tierd simulate` ([`simulate`]), `tierd export` ([`export`]) and `tierd
//! offsets show` ([`offsets`]). Writing the input topic: `tierd
//! backfill` ([`backfill`]).

pub mod backfill;
pub mod explain;
pub mod export;
pub mod offsets;
pub mod simulate;

use crate::config::Config;
use crate::model::CustomerState;
use crate::store::keys::Keyspace;
use crate::store::scan::{self, ScanCursor};
use crate::store::snapshot::{self, SnapshotError};
use crate::store::views::{self, ViewError};

/// Why a tool failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Redis was unreachable or refused a call.
    #[error("redis ({url}): {source}")]
    Redis {
        /// `redis.url`.
        url: String,
        /// The error.
        source: redis::RedisError,
    },
    /// The Redis client cannot be built from the configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A stored state is unreadable.
    #[error("stored state {key:?} is corrupt: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// The parser's message.
        message: String,
    },
    /// The customer is not stored.
    #[error("no customer {0:?} in any partition")]
    NotFound(String),
    /// Nothing is stored for this deployment (wrong group, topic or prefix?).
    #[error("no partition state under {0}: check kafka.group_id, kafka.input_topic and redis.key_prefix")]
    NoPartitions(String),
}

/// A read-only view of one deployment's stored state, on the same views as the API
/// ([`crate::store::views`]), driven by a private single-thread runtime.
pub struct Store {
    runtime: tokio::runtime::Runtime,
    conn: crate::store::connection::Connection,
    url: String,
    keyspace: Keyspace,
    /// Partitions with stored state (0..n).
    pub partitions: i32,
}

impl Store {
    /// Connects and finds how many partitions have stored state.
    ///
    /// # Errors
    /// [`ToolError::Redis`] or [`ToolError::NoPartitions`].
    pub fn open(config: &Config) -> Result<Self, ToolError> {
        let url = config.redis.url.clone();
        let err = |source| ToolError::Redis {
            url: url.clone(),
            source,
        };
        let client = crate::store::client::client(&config.redis).map_err(ToolError::Config)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(e.into()))?;
        let keyspace = Keyspace::new(
            &config.redis.key_prefix,
            &config.kafka.group_id,
            &config.kafka.input_topic,
        );
        let (conn, partitions) = runtime
            .block_on(async {
                let mut conn = crate::store::connection::Connection::connect_direct(client).await?;
                let partitions = views::stored_partitions(&mut conn, &keyspace).await?;
                Ok::<_, redis::RedisError>((conn, partitions))
            })
            .map_err(err)?;
        if partitions == 0 {
            return Err(ToolError::NoPartitions(keyspace.partition(0).meta));
        }
        Ok(Self {
            runtime,
            conn,
            url,
            keyspace,
            partitions,
        })
    }

    fn view_err(&self, e: ViewError) -> ToolError {
        match e {
            ViewError::Redis(source) => ToolError::Redis {
                url: self.url.clone(),
                source,
            },
            ViewError::Corrupt { key, message } => ToolError::Corrupt { key, message },
        }
    }

    /// The rank cut-offs in force (none: default).
    ///
    /// # Errors
    /// [`ToolError::Redis`].
    pub fn cutoffs(&mut self) -> Result<crate::engine::rules::rank::Cutoffs, ToolError> {
        let found = self
            .runtime
            .block_on(views::cutoffs(&mut self.conn, &self.keyspace));
        Ok(found
            .map_err(|e| self.view_err(e.into()))?
            .unwrap_or_default())
    }

    /// The customer as the API shows it ([`views::explained_customer`]).
    ///
    /// # Errors
    /// [`ToolError::NotFound`], [`ToolError::Corrupt`] or [`ToolError::Redis`].
    pub fn explained_customer(
        &mut self,
        rules: &crate::engine::rules::Rules,
        money: &crate::model::change::MoneyFormat,
        now: i64,
        id: &str,
    ) -> Result<serde_json::Value, ToolError> {
        let found = self.runtime.block_on(views::explained_customer(
            &mut self.conn,
            &self.keyspace,
            self.partitions,
            rules,
            money,
            now,
            id,
        ));
        found
            .map_err(|e| self.view_err(e))?
            .ok_or_else(|| ToolError::NotFound(id.to_owned()))
    }

    /// Streams every stored customer of every partition, a page at a time: calls
    /// `each(customer_id, state)` once per customer. Memory: the pages, and a 16-byte hash per
    /// customer of a partition in a hash set (about 32 bytes each: the customers already
    /// passed, as a scan may find one again).
    ///
    /// # Errors
    /// [`ToolError::Corrupt`] or [`ToolError::Redis`].
    pub fn for_each_customer(
        &mut self,
        page: usize,
        mut each: impl FnMut(&str, CustomerState),
    ) -> Result<(), ToolError> {
        for p in 0..self.partitions {
            self.for_each_customer_of(p, page, &mut each)?;
        }
        Ok(())
    }

    /// [`Self::for_each_customer`] over one partition.
    ///
    /// # Errors
    /// [`ToolError::Corrupt`] or [`ToolError::Redis`].
    pub fn for_each_customer_of(
        &mut self,
        partition: i32,
        page: usize,
        mut each: impl FnMut(&str, CustomerState),
    ) -> Result<(), ToolError> {
        let keys = self.keyspace.partition(partition);
        let mut passed = std::collections::HashSet::new();
        let mut at = ScanCursor::start();
        loop {
            let found =
                self.runtime
                    .block_on(views::scan_customers(&mut self.conn, &keys, &at, page));
            let (next, customers) = found.map_err(|e| self.view_err(e))?;
            for (id, state) in customers {
                if passed.insert(xxhash_rust::xxh3::xxh3_128(id.as_bytes())) {
                    each(&id, state);
                }
            }
            match next {
                Some(next) => {
                    pause_if_restarted(&next);
                    at = next;
                }
                None => return Ok(()),
            }
        }
    }

    /// The highest change sequence among a partition's stored states, and the keys of those
    /// that cannot be read (their sequence unknown).
    ///
    /// # Errors
    /// [`ToolError::Redis`].
    pub fn highest_sequence(&mut self, partition: i32) -> Result<(u64, Vec<String>), ToolError> {
        let (mut at, mut highest, mut unreadable) = (ScanCursor::start(), 0u64, Vec::new());
        loop {
            let (next, found) = self.customer_keys(partition, &at, 1000)?;
            if !found.is_empty() {
                let (values,): (Vec<Option<Vec<u8>>>,) =
                    self.query(redis::pipe().cmd("MGET").arg(&found))?;
                for (key, value) in found.into_iter().zip(values) {
                    match value.map(|v| crate::model::stored::decode(&v)) {
                        Some(Ok(state)) => highest = highest.max(state.seq),
                        Some(Err(_)) if !unreadable.contains(&key) => unreadable.push(key),
                        _ => {}
                    }
                }
            }
            match next {
                Some(next) => at = next,
                None => return Ok((highest, unreadable)),
            }
        }
    }

    /// The deployment's key names.
    pub fn keyspace(&self) -> &Keyspace {
        &self.keyspace
    }

    /// Runs `pipe` (a write: only tools that require the group stopped use it).
    ///
    /// # Errors
    /// [`ToolError::Redis`].
    pub fn query<T: redis::FromRedisValue>(
        &mut self,
        pipe: &redis::Pipeline,
    ) -> Result<T, ToolError> {
        let found = self.runtime.block_on(pipe.query_async(&mut self.conn));
        found.map_err(|source| ToolError::Redis {
            url: self.url.clone(),
            source,
        })
    }

    /// Runs a script invocation (a write: only tools that require the group stopped use it).
    ///
    /// # Errors
    /// [`ToolError::Redis`].
    pub fn invoke<T: redis::FromRedisValue>(
        &mut self,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, ToolError> {
        let found = self.runtime.block_on(call.invoke_async(&mut self.conn));
        found.map_err(|source| ToolError::Redis {
            url: self.url.clone(),
            source,
        })
    }

    /// Opens a snapshot of `partition` for the export `id` ([`snapshot::open`]).
    ///
    /// # Errors
    /// [`SnapshotError`].
    pub fn snapshot_open(
        &mut self,
        partition: i32,
        id: &str,
    ) -> Result<snapshot::Opened, SnapshotError> {
        let keys = self.keyspace.partition(partition);
        self.runtime
            .block_on(snapshot::open(&mut self.conn, &keys, id))
    }

    /// The next page of a scan of `partition`'s customer keys ([`scan::customer_keys`]): where
    /// the next page starts (`None` when the scan is complete; after a pause and a warning
    /// if it starts again at its end) and the keys (some possibly found before).
    ///
    /// # Errors
    /// [`ToolError::Redis`].
    pub fn customer_keys(
        &mut self,
        partition: i32,
        at: &ScanCursor,
        page: usize,
    ) -> Result<(Option<ScanCursor>, Vec<String>), ToolError> {
        let keys = self.keyspace.partition(partition);
        let found = self
            .runtime
            .block_on(scan::customer_keys(&mut self.conn, &keys, at, page));
        let found = found.map_err(|source| ToolError::Redis {
            url: self.url.clone(),
            source,
        })?;
        restarted(partition, &found);
        Ok((found.next, found.keys))
    }

    /// Reads state keys of `partition` through the export `id`'s snapshot
    /// ([`snapshot::read`]).
    ///
    /// # Errors
    /// [`SnapshotError`].
    pub fn snapshot_read(
        &mut self,
        partition: i32,
        id: &str,
        state_keys: &[String],
    ) -> Result<snapshot::Read, SnapshotError> {
        let keys = self.keyspace.partition(partition);
        self.runtime
            .block_on(snapshot::read(&mut self.conn, &keys, id, state_keys))
    }

    /// A page of the values saved for `partition`'s snapshot ([`snapshot::saved`]); a scan
    /// that starts again is logged.
    ///
    /// # Errors
    /// [`SnapshotError`].
    pub fn snapshot_saved(
        &mut self,
        partition: i32,
        at: &ScanCursor,
        page: usize,
    ) -> Result<scan::Page<(String, Vec<u8>)>, SnapshotError> {
        let keys = self.keyspace.partition(partition);
        let found = self
            .runtime
            .block_on(snapshot::saved(&mut self.conn, &keys, at, page))?;
        restarted(partition, &found);
        Ok(found)
    }

    /// Closes the export `id`'s snapshot of `partition`.
    ///
    /// # Errors
    /// [`SnapshotError`].
    pub fn snapshot_close(&mut self, partition: i32, id: &str) -> Result<(), SnapshotError> {
        let keys = self.keyspace.partition(partition);
        self.runtime
            .block_on(snapshot::close(&mut self.conn, &keys, id))
    }

    /// The keys of `partition`.
    pub fn partition_keys(&self, partition: i32) -> crate::store::keys::PartitionKeys {
        self.keyspace.partition(partition)
    }

    /// `redis.url`, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A partition's commit count and stored next offset (`commits`, `next_offset` of its
    /// meta): equal before and after a read, no commit happened in between.
    ///
    /// # Errors
    /// [`ToolError::Redis`].
    pub fn commit_mark(&mut self, partition: i32) -> Result<(Option<i64>, Option<i64>), ToolError> {
        let meta = self.keyspace.partition(partition).meta;
        let found = self.runtime.block_on(
            redis::cmd("HMGET")
                .arg(&meta)
                .arg("commits")
                .arg("next_offset")
                .query_async::<(Option<i64>, Option<i64>)>(&mut self.conn),
        );
        found.map_err(|source| ToolError::Redis {
            url: self.url.clone(),
            source,
        })
    }
}

/// Says why a scan of `partition` started again, if it did; one that starts again at its end
/// (its slot was migrating) goes round once more after a pause, rather than re-reading a
/// partition in a tight loop while the migration runs (a slot left migrating keeps it going
/// round until `redis-cli --cluster fix`).
fn restarted<T>(partition: i32, page: &scan::Page<T>) {
    if let Some(why) = page.restarted {
        tracing::warn!(
            partition,
            why = why.as_str(),
            "A scan of the partition starts again."
        );
    }
    if let Some(next) = &page.next {
        pause_if_restarted(next);
    }
}

/// The pause of [`restarted`] before a scan goes round once more.
fn pause_if_restarted(next: &ScanCursor) {
    if next.is_start() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
