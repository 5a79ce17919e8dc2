//! Operator tools that read the live state in Redis without changing it:
//! `tierd rules explain` ([`explain`]) and `tierd simulate` ([`simulate`]).

pub mod explain;
pub mod simulate;

use crate::apply::keys::{Keyspace, PartitionKeys};
use crate::config::Config;
use crate::domain::CustomerState;

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
    #[error("stored state {key} is corrupt: {message}")]
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

/// A read-only view of one deployment's stored state.
pub struct Store {
    conn: redis::Connection,
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
        let client = crate::redis_client::client(&config.redis).map_err(ToolError::Config)?;
        let mut conn = client
            .get_connection_with_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        let keyspace = Keyspace::new(
            &config.redis.key_prefix,
            &config.kafka.group_id,
            &config.kafka.input_topic,
        );
        // Partitions are numbered from 0: probe meta keys in chunks until a chunk has none.
        let mut partitions = 0;
        let chunk = 256;
        loop {
            let mut pipe = redis::pipe();
            for p in partitions..partitions + chunk {
                pipe.exists(keyspace.partition(p).meta);
            }
            let found: Vec<bool> = pipe.query(&mut conn).map_err(err)?;
            match found.iter().rposition(|&f| f) {
                Some(last) => partitions += i32::try_from(last).unwrap_or(0) + 1,
                None => break,
            }
            if found.iter().filter(|&&f| f).count() < found.len() {
                break;
            }
        }
        if partitions == 0 {
            return Err(ToolError::NoPartitions(keyspace.partition(0).meta));
        }
        Ok(Self {
            conn,
            url,
            keyspace,
            partitions,
        })
    }

    fn redis_err(&self, source: redis::RedisError) -> ToolError {
        ToolError::Redis {
            url: self.url.clone(),
            source,
        }
    }

    /// The keys of a partition.
    pub fn keys(&self, partition: i32) -> PartitionKeys {
        self.keyspace.partition(partition)
    }

    /// The rank cut-offs in force (none: default).
    ///
    /// # Errors
    /// [`ToolError::Redis`].
    pub fn cutoffs(&mut self) -> Result<crate::rules::rank::Cutoffs, ToolError> {
        let (version, data): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(self.keys(0).cutoffs)
            .arg("version")
            .arg("data")
            .query(&mut self.conn)
            .map_err(|e| self.redis_err(e))?;
        Ok(match (version, data) {
            (Some(v), Some(d)) => serde_json::from_str::<crate::rules::rank::Cutoffs>(&d)
                .map(|mut c| {
                    c.version = v;
                    c
                })
                .unwrap_or_default(),
            _ => crate::rules::rank::Cutoffs::default(),
        })
    }

    /// Finds a customer: (partition, state).
    ///
    /// # Errors
    /// [`ToolError::NotFound`], [`ToolError::Corrupt`] or [`ToolError::Redis`].
    pub fn customer(&mut self, id: &str) -> Result<(i32, CustomerState), ToolError> {
        let mut pipe = redis::pipe();
        for p in 0..self.partitions {
            pipe.get(self.keys(p).customer(id));
        }
        let found: Vec<Option<Vec<u8>>> =
            pipe.query(&mut self.conn).map_err(|e| self.redis_err(e))?;
        let (p, bytes) = found
            .into_iter()
            .enumerate()
            .find_map(|(p, v)| v.map(|b| (p, b)))
            .ok_or_else(|| ToolError::NotFound(id.to_owned()))?;
        let p = i32::try_from(p).unwrap_or(0);
        let state = serde_json::from_slice(&bytes).map_err(|e| ToolError::Corrupt {
            key: self.keys(p).customer(id),
            message: e.to_string(),
        })?;
        Ok((p, state))
    }

    /// Streams every stored customer of every partition, a page at a time (bounded memory):
    /// calls `each(customer_id, state)`.
    ///
    /// # Errors
    /// [`ToolError::Corrupt`] or [`ToolError::Redis`].
    pub fn for_each_customer(
        &mut self,
        page: usize,
        mut each: impl FnMut(&str, CustomerState),
    ) -> Result<(), ToolError> {
        for p in 0..self.partitions {
            let keys = self.keys(p);
            let pattern = keys.customer_pattern();
            let mut cursor: u64 = 0;
            loop {
                let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(page)
                    .query(&mut self.conn)
                    .map_err(|e| self.redis_err(e))?;
                if !found.is_empty() {
                    let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                        .arg(&found)
                        .query(&mut self.conn)
                        .map_err(|e| self.redis_err(e))?;
                    for (key, value) in found.iter().zip(values) {
                        let (Some(id), Some(bytes)) = (keys.customer_id(key), value) else {
                            continue;
                        };
                        let state =
                            serde_json::from_slice(&bytes).map_err(|e| ToolError::Corrupt {
                                key: key.clone(),
                                message: e.to_string(),
                            })?;
                        each(id, state);
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }
}
