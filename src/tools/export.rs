//! `tierd export`: every stored customer as JSON Lines (tier, metrics, scores, the rule that
//! placed them, their next move: what the API shows), read-only, consistent per partition.
//!
//! Each partition is read through a snapshot ([`crate::store::snapshot`]): opened in one
//! atomic step with the partition's position (its stored next offset), read while tierd keeps
//! committing (a commit saves what it overwrites first), so every partition's lines are its
//! stored states at the moment that offset was stored (the input before it applied; timers,
//! a rules sweep or a re-ranking may also have changed states since the offset last moved),
//! however busy its input. Under rank
//! rules the values and scores shown are computed under the cut-offs published when the read
//! began; a read during which new ones were published, or whose snapshot lease lapsed (the
//! export stalled for longer than its time to live), is not consistent and is read again (its
//! lines are staged in a temporary file and written out only once a read was consistent), up
//! to `retries` times; then the export fails naming the partition, unless inconsistent
//! partitions are allowed (marked in the report).

use super::{Store, ToolError};
use crate::config::{ClockMode, Config};
use crate::engine::rules::Rules;
use crate::model::CustomerState;
use crate::store::scan::ScanCursor;
use crate::store::snapshot::{Opened, SnapshotError};
use std::io::{Seek, Write};

/// How one partition was exported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionExport {
    /// The partition.
    pub partition: i32,
    /// Customers written.
    pub customers: u64,
    /// The input offset the snapshot is after (the partition's stored next offset).
    pub next_offset: Option<i64>,
    /// Reads it took.
    pub reads: u32,
    /// No commit happened during the read that was written.
    pub consistent: bool,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading Redis failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// Writing the output failed.
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    /// Every read of a partition was inconsistent.
    #[error("partition {partition}: each of its {reads} reads was inconsistent (new rank cut-offs published during it, or its snapshot lease lapsed): raise --retries, or pass --allow-inconsistent (the partition is then marked inconsistent in the report)")]
    Busy {
        /// The partition.
        partition: i32,
        /// Reads tried.
        reads: u32,
    },
    /// Another export holds the partition's snapshot.
    #[error("partition {partition}: another export ({holder}) is reading it: wait for it to finish (its lease lapses {lease_s} s after it stops)")]
    Exporting {
        /// The partition.
        partition: i32,
        /// The other export's id.
        holder: String,
        /// The lease's time to live, seconds.
        lease_s: u64,
    },
    /// The snapshot script replied something unexpected.
    #[error("partition {partition}: {message}")]
    Snapshot {
        /// The partition.
        partition: i32,
        /// What happened.
        message: String,
    },
}

/// Exports every customer of `config`'s deployment to `out`, explained under `rules` (the
/// running rules); `progress` gets the customers written so far.
///
/// # Errors
/// [`ExportError`].
pub fn run(
    config: &Config,
    rules: &Rules,
    out: &mut dyn Write,
    retries: u32,
    allow_inconsistent: bool,
    mut progress: impl FnMut(u64),
) -> Result<Vec<PartitionExport>, ExportError> {
    let mut store = Store::open(config)?;
    let now = match config.clock.mode {
        ClockMode::Wall => crate::model::time::now_ms(),
        ClockMode::Event => i64::MIN,
    };
    let money = crate::model::change::MoneyFormat {
        currency: config.money.currency.clone(),
        fraction_digits: config.money.fraction_digits,
    };
    let mut report = Vec::new();
    let mut written = 0;
    // Unique per run (a random part: two containers may share a pid, a host name and a
    // millisecond): a lease is only ever this run's or another's.
    let id = format!(
        "tierd-export:{}:{}:{:016x}",
        hostname(),
        std::process::id(),
        {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_i64(crate::model::time::now_ms());
            h.finish()
        }
    );
    for partition in 0..store.partitions {
        let mut reads = 0;
        let (staged, customers, next_offset, consistent) = loop {
            reads += 1;
            // Cut-offs in force for the ranks this read shows (rules without ranks: none).
            let ranked = !rules.ranks().is_empty();
            let cutoffs = if ranked {
                store.cutoffs()?
            } else {
                Default::default()
            };
            let mut staged = std::io::BufWriter::new(tempfile::tempfile()?);
            let mut customers = 0u64;
            let mut emit = |id: &str, state: &CustomerState| -> std::io::Result<()> {
                let view = crate::engine::explain::explain(id, state, rules, &money, now, &cutoffs);
                let mut line = serde_json::to_value(view).unwrap_or_default();
                line["partition"] = partition.into();
                serde_json::to_writer(&mut staged, &line)?;
                staged.write_all(b"\n")?;
                customers += 1;
                Ok(())
            };
            let read = read_partition(&mut store, partition, &id, &mut emit);
            // Closed whatever happened (a lease left behind would lapse by itself).
            let closed = store.snapshot_close(partition, &id);
            let (opened, held) = read?;
            closed.map_err(|e| snapshot_error(&store, partition, e))?;
            // The values and scores shown were computed under `cutoffs`: new ones published
            // during the read make it another moment's too.
            let same_cutoffs = !ranked || store.cutoffs()?.version == cutoffs.version;
            let consistent = held && same_cutoffs;
            if consistent || reads > retries {
                if !consistent && !allow_inconsistent {
                    return Err(ExportError::Busy { partition, reads });
                }
                break (staged, customers, opened.next_offset, consistent);
            }
        };
        let mut file = staged.into_inner().map_err(|e| e.into_error())?;
        file.rewind()?;
        std::io::copy(&mut file, out)?;
        written += customers;
        progress(written);
        report.push(PartitionExport {
            partition,
            customers,
            next_offset,
            reads,
            consistent,
        });
    }
    out.flush()?;
    Ok(report)
}

/// Customer keys read per page (and per snapshot read).
const PAGE: usize = 1000;

/// Reads every customer of `partition` as of a snapshot opened now, passing each to `emit`:
/// the keys `SCAN` finds, read through the snapshot, then the saved values of keys it did not
/// find (erased during the read). Returns the snapshot's position and whether its lease held
/// throughout (else the values are partly current ones).
fn read_partition(
    store: &mut Store,
    partition: i32,
    id: &str,
    emit: &mut dyn FnMut(&str, &CustomerState) -> std::io::Result<()>,
) -> Result<(Opened, bool), ExportError> {
    let opened = store
        .snapshot_open(partition, id)
        .map_err(|e| snapshot_error(store, partition, e))?;
    let keys = store.partition_keys(partition);
    // A scan may return a key twice (the keyspace resized meanwhile, the scan started again
    // after a failover or during a slot migration): one line each.
    let mut seen = std::collections::HashSet::new();
    let mut held = true;
    let mut each = |key: &str, bytes: &[u8]| -> Result<(), ExportError> {
        let Some(customer) = keys.customer_id(key) else {
            return Ok(());
        };
        if !seen.insert(xxhash_rust::xxh3::xxh3_128(key.as_bytes())) {
            return Ok(());
        }
        let state = crate::model::stored::decode(bytes).map_err(|e| ToolError::Corrupt {
            key: key.to_owned(),
            message: e.to_string(),
        })?;
        emit(customer, &state)?;
        Ok(())
    };
    // Every page renews the lease (a page of SCAN may find no key of this partition).
    let mut at = ScanCursor::start();
    loop {
        let (next, found) = store.customer_keys(partition, &at, PAGE)?;
        let (ok, values) = store
            .snapshot_read(partition, id, &found)
            .map_err(|e| snapshot_error(store, partition, e))?;
        held &= ok;
        for (key, value) in found.iter().zip(values) {
            if let Some(bytes) = value {
                each(key, &bytes)?;
            }
        }
        match next {
            Some(next) => at = next,
            None => break,
        }
    }
    let mut at = ScanCursor::start();
    loop {
        let saved = store
            .snapshot_saved(partition, &at, PAGE)
            .map_err(|e| snapshot_error(store, partition, e))?;
        for (key, bytes) in saved.keys {
            each(&key, &bytes)?;
        }
        // Renewed, and checked: the saved values live as long as the lease, so held after
        // this page, they were all there for it.
        let (ok, _) = store
            .snapshot_read(partition, id, &[])
            .map_err(|e| snapshot_error(store, partition, e))?;
        held &= ok;
        match saved.next {
            Some(next) => at = next,
            None => break,
        }
    }
    Ok((opened, held))
}

fn snapshot_error(store: &Store, partition: i32, e: SnapshotError) -> ExportError {
    match e {
        SnapshotError::Redis(source) => ExportError::Tool(ToolError::Redis {
            url: store.url().to_owned(),
            source,
        }),
        SnapshotError::Busy(holder) => ExportError::Exporting {
            partition,
            holder,
            lease_s: crate::store::snapshot::LEASE_MS / 1000,
        },
        SnapshotError::Reply(message) => ExportError::Snapshot { partition, message },
    }
}

/// This host's name, for the export's id (empty if unknown).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}
