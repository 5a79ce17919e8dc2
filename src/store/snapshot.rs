//! A consistent snapshot of one partition's customer states, read while tierd keeps committing
//! to it (`tierd export`): copy-on-write through the commit script (`lua/snapshot.lua`,
//! `lua/commit.lua`).
//!
//! The reader opens the snapshot (a lease with a time to live, in one atomic step with reading
//! the partition's position), reads every customer key found by `SCAN` through the script —
//! the value saved for the key if a commit wrote it since, else its current value — then the
//! saved values of keys `SCAN` no longer found (customers erased during the read), checks the
//! lease is still its own, and closes. Commits pay one `EXISTS` when no snapshot is open, and
//! while one is, one saved copy per customer they write (kept until the snapshot closes or its
//! lease lapses: Redis memory grows by the states written during the read).
//!
//! Why not compare commit counts before and after a read (the form before): a partition whose
//! input never pauses for the length of a read could never be exported.

use super::connection::Connection;
use super::keys::PartitionKeys;
use super::scan::{self, Page, ScanCursor};
use redis::aio::ConnectionLike;
use std::sync::LazyLock;

static SNAPSHOT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/snapshot.lua")));

/// How long a snapshot's lease lives without a read renewing it: an export that dies leaves
/// commits saving copies for at most this long.
pub const LEASE_MS: u64 = 30_000;

/// An open snapshot: the partition's position when it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The partition's commit count.
    pub commits: Option<i64>,
    /// Its stored next offset: the snapshot holds the input before it.
    pub next_offset: Option<i64>,
}

/// Why a snapshot could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Redis refused or was unreachable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Another export holds the partition's lease.
    #[error("another export ({0}) is reading this partition")]
    Busy(String),
    /// The script replied something else (a script of another version?).
    #[error("unexpected reply from the snapshot script: {0}")]
    Reply(String),
}

/// Values read through the snapshot, in the order asked (`None`: absent at the snapshot), and
/// whether they are the snapshot's (`false`: the lease was lost, they are current values).
pub type Read = (bool, Vec<Option<Vec<u8>>>);

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// Opens a snapshot of `keys`' partition for the export `id`.
///
/// # Errors
/// [`SnapshotError`].
pub async fn open<C: ConnectionLike>(
    conn: &mut C,
    keys: &PartitionKeys,
    id: &str,
) -> Result<Opened, SnapshotError> {
    let reply: Vec<Vec<u8>> = call(keys, "open", id, &[]).invoke_async(conn).await?;
    match reply.as_slice() {
        [ok, commits, next] if ok == b"OK" => {
            let number = |v: &[u8]| text(v).parse::<i64>().ok();
            Ok(Opened {
                commits: number(commits),
                next_offset: number(next),
            })
        }
        [busy, holder] if busy == b"BUSY" => Err(SnapshotError::Busy(text(holder))),
        other => Err(SnapshotError::Reply(format!(
            "{:?}",
            other.iter().map(|v| text(v)).collect::<Vec<_>>()
        ))),
    }
}

/// Reads `state_keys` as they were when the snapshot opened (and renews the lease); with no
/// keys, only checks the lease is still this export's.
///
/// # Errors
/// [`SnapshotError`].
pub async fn read<C: ConnectionLike>(
    conn: &mut C,
    keys: &PartitionKeys,
    id: &str,
    state_keys: &[String],
) -> Result<Read, SnapshotError> {
    let mut reply: Vec<Vec<u8>> = call(keys, "read", id, state_keys)
        .invoke_async(conn)
        .await?;
    if reply.len() != state_keys.len() + 1 {
        return Err(SnapshotError::Reply(format!(
            "{} values for {} keys",
            reply.len().saturating_sub(1),
            state_keys.len()
        )));
    }
    let held = reply[0] == b"OK";
    let values = reply
        .drain(1..)
        .map(|v| (!v.is_empty()).then_some(v))
        .collect();
    Ok((held, values))
}

/// The values saved for state keys written since the snapshot opened, a page at a time from
/// `at` ([`ScanCursor::start`] to start): the (key, value at the snapshot) of the keys present
/// then. The scan starts again (its page says why) when its cursor comes from another
/// connection (a restart, a failover, the slot moved: [`scan::hash_entries`]): a key may come
/// twice.
///
/// # Errors
/// [`SnapshotError::Redis`].
pub async fn saved(
    conn: &mut Connection,
    keys: &PartitionKeys,
    at: &ScanCursor,
    page: usize,
) -> Result<Page<(String, Vec<u8>)>, SnapshotError> {
    let mut found = scan::hash_entries(conn, keys, &keys.snapshot, at, page).await?;
    found.keys.retain(|(_, v)| !v.is_empty());
    Ok(found)
}

/// Closes the snapshot (removes the lease and the saved values, if still this export's).
///
/// # Errors
/// [`SnapshotError::Redis`].
pub async fn close<C: ConnectionLike>(
    conn: &mut C,
    keys: &PartitionKeys,
    id: &str,
) -> Result<(), SnapshotError> {
    let _: Vec<Vec<u8>> = call(keys, "close", id, &[]).invoke_async(conn).await?;
    Ok(())
}

fn call<'a>(
    keys: &'a PartitionKeys,
    mode: &str,
    id: &str,
    state_keys: &'a [String],
) -> redis::ScriptInvocation<'a> {
    let mut inv = SNAPSHOT.prepare_invoke();
    inv.key(&keys.meta)
        .key(&keys.snapshot_lease)
        .key(&keys.snapshot);
    for k in state_keys {
        inv.key(k);
    }
    inv.arg(mode).arg(id).arg(LEASE_MS);
    inv
}
