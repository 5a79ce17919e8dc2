//! `tierd export`: every stored customer as JSON Lines (tier, metrics, scores, the rule that
//! placed them, their next move: what the API shows), read-only, consistent per partition.
//!
//! A partition is read with `SCAN` while tierd may commit to it. Every write of a customer's
//! state goes through the commit script, which counts it in the partition's meta (`commits`),
//! so a partition whose count (and stored offset) is the same before and after its read was
//! read between two commits: a consistent snapshot of its stored states after the input before
//! `next_offset`. Under rank rules the values and scores shown are computed under the cut-offs
//! published when the read began, and a read during which new ones were published counts as
//! raced too.
//! A partition that committed meanwhile is read again (its lines are staged in a temporary
//! file and written out only once a read was consistent), up to `retries` times; then the
//! export fails naming it, unless inconsistent partitions are allowed (marked in the report).

use super::{Store, ToolError};
use crate::config::{ClockMode, Config};
use crate::engine::rules::Rules;
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
    /// A partition committed during every read.
    #[error("partition {partition} committed during each of its {reads} reads: export while its input is quieter, raise --retries, or pass --allow-inconsistent (the partition is then marked inconsistent in the report)")]
    Busy {
        /// The partition.
        partition: i32,
        /// Reads tried.
        reads: u32,
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
    for partition in 0..store.partitions {
        let mut reads = 0;
        let (staged, customers, next_offset, consistent) = loop {
            reads += 1;
            let before = store.commit_mark(partition)?;
            // Cut-offs in force for the ranks this read shows (rules without ranks: none).
            let ranked = !rules.ranks().is_empty();
            let cutoffs = if ranked {
                store.cutoffs()?
            } else {
                Default::default()
            };
            // SCAN may return a key twice (the keyspace resized meanwhile): one line each.
            let mut seen = std::collections::HashSet::new();
            let mut staged = std::io::BufWriter::new(tempfile::tempfile()?);
            let mut customers = 0u64;
            let mut failed: Option<std::io::Error> = None;
            store.for_each_customer_of(partition, 1000, |id, state| {
                if failed.is_some() || !seen.insert(xxhash_rust::xxh3::xxh3_128(id.as_bytes())) {
                    return;
                }
                let view =
                    crate::engine::explain::explain(id, &state, rules, &money, now, &cutoffs);
                let mut line = serde_json::to_value(view).unwrap_or_default();
                line["partition"] = partition.into();
                let result = serde_json::to_writer(&mut staged, &line)
                    .map_err(std::io::Error::from)
                    .and_then(|()| staged.write_all(b"\n"));
                match result {
                    Ok(()) => customers += 1,
                    Err(e) => failed = Some(e),
                }
            })?;
            if let Some(e) = failed {
                return Err(e.into());
            }
            let after = store.commit_mark(partition)?;
            // The values and scores shown were computed under `cutoffs`: new ones published
            // during the read make it another moment's too.
            let same_cutoffs = !ranked || store.cutoffs()?.version == cutoffs.version;
            let consistent = before == after && same_cutoffs;
            if consistent || reads > retries {
                if !consistent && !allow_inconsistent {
                    return Err(ExportError::Busy { partition, reads });
                }
                break (staged, customers, after.1, consistent);
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
