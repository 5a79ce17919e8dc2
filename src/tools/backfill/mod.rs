//! `tierd backfill FILE…`: purchase history from JSON Lines or CSV files (gzip accepted) into
//! the input topic, keyed by customer, as tierd's own input events.
//!
//! Every row is checked against the input contract with the decoder tierd ingests with
//! ([`crate::ingest::decode`]): a row tierd would dead-letter is not produced but written to a
//! rejects file with its reason. The rows go out in chunks; after the broker acknowledged a
//! chunk, the checkpoint records how far each file got ([`checkpoint`]), so a run stopped or
//! killed resumes after its last acknowledged chunk. A chunk sent but not recorded (a kill in
//! between) is sent again and counted once: tierd deduplicates by `event_id`
//! (`dedup.horizon_s`, `dedup.max_ids_per_customer`), as for any producer's retry.

pub mod checkpoint;
pub mod rows;

use crate::config::Config;
use crate::engine::rules::Rules;
use crate::ingest::decode::DecodeLimits;
use checkpoint::{Checkpoint, CheckpointError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rows::{Format, Mapping, Row, Rows};
use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to backfill and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The history files, in the order to send them.
    pub files: Vec<PathBuf>,
    /// Their format (default: from each file's name).
    pub format: Option<Format>,
    /// Which column or field holds each contract field.
    pub mapping: Mapping,
    /// CSV field delimiter.
    pub delimiter: u8,
    /// librdkafka's `partitioner`: must be the one the live producers use, or a customer's
    /// history and live events land on different partitions.
    pub partitioner: String,
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// Where rejected rows are appended (JSON Lines).
    pub rejects: PathBuf,
    /// Stop (resumable) after this many rows of this run.
    pub stop_after: Option<u64>,
    /// Rows per acknowledged chunk (and checkpoint).
    pub chunk_rows: u64,
    /// Check the rows only: nothing produced, no checkpoint.
    pub dry_run: bool,
}

/// Progress of a run, reported after every chunk.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Bytes of the files read so far (as stored: compressed for gzip).
    pub bytes: u64,
    /// Bytes of all the files.
    pub total_bytes: u64,
    /// Rows read by this run.
    pub rows: u64,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Rows read by this run (not counting those a checkpoint had done).
    pub rows: u64,
    /// Rows produced (acknowledged by the broker).
    pub produced: u64,
    /// Rows skipped because the checkpoint had them done.
    pub resumed: u64,
    /// Files the checkpoint had done whole.
    pub files_done_before: usize,
    /// Rejected rows by reason.
    pub rejected: BTreeMap<&'static str, u64>,
    /// How long the run took.
    pub elapsed: Duration,
    /// The run stopped at `--stop-after` before the end.
    pub stopped_early: bool,
}

impl Report {
    /// Rejected rows in all.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Why a backfill stopped before the end.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// A history or rejects file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A history file cannot be read as rows (unknown format, a CSV header without a
    /// required column).
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The checkpoint cannot be used.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Kafka refused or failed (the checkpoint holds what was acknowledged before).
    #[error("kafka: {0} (the checkpoint holds every row acknowledged before: run the same command again to resume)")]
    Kafka(String),
}

/// An open history file and the count of its stored bytes read.
fn open(path: &Path, read: Arc<AtomicU64>) -> Result<Box<dyn std::io::BufRead>, BackfillError> {
    struct Counting<R> {
        inner: R,
        read: Arc<AtomicU64>,
    }
    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.fetch_add(n as u64, Ordering::Relaxed);
            Ok(n)
        }
    }
    let file = std::fs::File::open(path).map_err(|source| BackfillError::Io {
        path: path.to_owned(),
        source,
    })?;
    let counted = Counting { inner: file, read };
    Ok(if rows::is_gzip(path) {
        Box::new(BufReader::with_capacity(
            256 * 1024,
            flate2::read::MultiGzDecoder::new(BufReader::new(counted)),
        ))
    } else {
        Box::new(BufReader::with_capacity(256 * 1024, counted))
    })
}

/// The producer, the deliveries not yet awaited (with their rows' line numbers) and the rows
/// the broker refused for good.
struct Sender {
    producer: FutureProducer,
    topic: String,
    pending: Vec<(DeliveryFuture, u64)>,
    /// (line, the row as sent, the broker's error) of rows refused for a reason sending them
    /// again cannot change: rejected, like a row tierd would refuse.
    refused: Vec<(u64, String, String)>,
}

/// Whether the broker refused one record for what it is (too large, invalid): the row is
/// rejected and the backfill goes on. Any other error (authorization, a broker down, a
/// timeout) stops the run, naming the row: the next run sends the same rows again.
fn refuses_the_row(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

impl Sender {
    fn new(config: &Config, partitioner: &str) -> Result<Self, BackfillError> {
        let producer: FutureProducer = crate::kafka::producer_config(&config.kafka)
            .set("partitioner", partitioner)
            // Never create the input topic (with the broker's default partition count) by
            // asking for its metadata: a missing topic is refused below.
            .set("allow.auto.create.topics", "false")
            .create()
            .map_err(|e| BackfillError::Kafka(format!("kafka.producer: {e}")))?;
        let topic = config.kafka.input_topic.clone();
        let metadata = producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(15))
            .map_err(|e| BackfillError::Kafka(format!("metadata of {topic:?}: {e}")))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
        if !found {
            return Err(BackfillError::Kafka(format!(
                "the input topic {topic:?} (kafka.input_topic) does not exist"
            )));
        }
        Ok(Self {
            producer,
            topic,
            pending: Vec::new(),
            refused: Vec::new(),
        })
    }

    /// Sends the row at `line` of `file`.
    fn send(
        &mut self,
        file: &Path,
        line: u64,
        key: &str,
        value: &[u8],
    ) -> Result<(), BackfillError> {
        loop {
            let record = FutureRecord::to(&self.topic).key(key).payload(value);
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.pending.push((delivery, line));
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.acknowledged(file)?;
                }
                Err((e, _)) if refuses_the_row(&e) => {
                    let raw = String::from_utf8_lossy(value).into_owned();
                    self.refused.push((line, raw, e.to_string()));
                    return Ok(());
                }
                Err((e, _)) => {
                    return Err(BackfillError::Kafka(format!(
                        "{}:{line}: {e}",
                        file.display()
                    )))
                }
            }
        }
    }

    /// Waits until the broker acknowledged every record sent (of `file`), or refused its row
    /// for good (kept in `refused`). The broker judges a batch of records as a whole (its
    /// size against the topic's `max.message.bytes`), so each refused row is sent again
    /// alone, and rejected only if refused alone too (it then comes after rows sent after
    /// it: a customer's events may arrive out of order, which tierd accepts within
    /// `dedup.horizon_s`).
    ///
    /// # Errors
    /// Any other failure, naming the first row it hit.
    fn acknowledged(&mut self, file: &Path) -> Result<(), BackfillError> {
        use rdkafka::Message;
        let (deliveries, lines): (Vec<_>, Vec<_>) = self.pending.drain(..).unzip();
        let delivered = futures::executor::block_on(futures::future::join_all(deliveries));
        let failed = |line: u64, e: &KafkaError| {
            BackfillError::Kafka(format!("{}:{line}: {e}", file.display()))
        };
        for (delivery, line) in delivered.into_iter().zip(lines) {
            match delivery {
                Ok(Ok(_)) => {}
                Ok(Err((e, message))) if refuses_the_row(&e) => {
                    let key = message.key().unwrap_or_default();
                    let value = message.payload().unwrap_or_default();
                    let alone = FutureRecord::to(&self.topic).key(key).payload(value);
                    match futures::executor::block_on(
                        self.producer.send(alone, Duration::from_secs(60)),
                    ) {
                        Ok(_) => {}
                        Err((e, _)) if refuses_the_row(&e) => {
                            let raw = String::from_utf8_lossy(value).into_owned();
                            self.refused.push((line, raw, e.to_string()));
                        }
                        Err((e, _)) => return Err(failed(line, &e)),
                    }
                }
                Ok(Err((e, _))) => return Err(failed(line, &e)),
                Err(_) => return Err(BackfillError::Kafka("the producer was dropped".into())),
            }
        }
        Ok(())
    }
}

/// The rejects file, opened on the first rejected row.
struct Rejects {
    path: PathBuf,
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl Rejects {
    fn write(
        &mut self,
        file: &Path,
        line: u64,
        reason: &str,
        detail: &str,
        raw: &str,
    ) -> Result<(), BackfillError> {
        let io = |source| BackfillError::Io {
            path: self.path.clone(),
            source,
        };
        if self.out.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(io)?;
            self.out = Some(std::io::BufWriter::new(f));
        }
        let record = serde_json::json!({
            "file": file, "line": line, "reason": reason, "detail": detail, "row": raw,
        });
        let out = self.out.as_mut().expect("opened above");
        serde_json::to_writer(&mut *out, &record).map_err(|e| io(e.into()))?;
        out.write_all(b"\n").map_err(io)
    }

    /// Writes the rows rejected so far to disk (synced: the checkpoint saved after it says
    /// they are done).
    fn flush(&mut self) -> Result<(), BackfillError> {
        if let Some(out) = &mut self.out {
            out.flush()
                .and_then(|()| out.get_ref().sync_data())
                .map_err(|source| BackfillError::Io {
                    path: self.path.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// The reason code of rows the broker refused for good.
pub const REFUSED_BY_KAFKA: &str = "refused_by_kafka";

/// Runs a backfill of `opts.files` into `config`'s input topic, checking rows as tierd under
/// `rules` would; `progress` is called after every chunk.
///
/// # Errors
/// [`BackfillError`]: a file, the checkpoint or Kafka. Rows tierd would refuse are not
/// errors: they are counted in the report and written to the rejects file.
pub fn run(
    config: &Config,
    rules: &Rules,
    opts: &Options,
    mut progress: impl FnMut(&Progress),
) -> Result<Report, BackfillError> {
    let started = Instant::now();
    let limits = DecodeLimits::new(config, rules);
    let mut files = Vec::with_capacity(opts.files.len());
    let mut total_bytes = 0;
    for path in &opts.files {
        let io = |source| BackfillError::Io {
            path: path.clone(),
            source,
        };
        let path = path.canonicalize().map_err(io)?;
        total_bytes += std::fs::metadata(&path).map_err(io)?.len();
        let format = opts
            .format
            .or_else(|| Format::of_path(&path))
            .ok_or_else(|| BackfillError::File {
                path: path.clone(),
                message: "unknown format (not .jsonl, .ndjson, .json or .csv, optionally .gz): name it with --format jsonl|csv".into(),
            })?;
        files.push((path, format));
    }
    let mut checkpoint = if opts.dry_run {
        Checkpoint::default()
    } else {
        Checkpoint::load(&opts.checkpoint, &config.kafka.input_topic)?
    };
    let mut sender = if opts.dry_run {
        // A dry run's rejects file is this run's findings alone.
        match std::fs::remove_file(&opts.rejects) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BackfillError::Io {
                    path: opts.rejects.clone(),
                    source: e,
                })
            }
            _ => None,
        }
    } else {
        Some(Sender::new(config, &opts.partitioner)?)
    };
    let mut rejects = Rejects {
        path: opts.rejects.clone(),
        out: None,
    };
    let mut report = Report::default();
    let mut bytes_before = 0;
    let now_ms = || crate::model::time::now_ms();
    'files: for (path, format) in &files {
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        let (mark, unchanged) = checkpoint.mark(path)?;
        if unchanged {
            report.files_done_before += 1;
            bytes_before += size;
            continue;
        }
        let read = Arc::new(AtomicU64::new(0));
        let reader = open(path, read.clone())?;
        let mut rows =
            Rows::new(reader, *format, &opts.mapping, opts.delimiter).map_err(|message| {
                BackfillError::File {
                    path: path.clone(),
                    message,
                }
            })?;
        let skip = checkpoint.files[mark].rows;
        let recorded = checkpoint.files[mark].prefix.clone();
        let mut prefix = xxhash_rust::xxh3::Xxh3Default::new();
        let (mut n, mut line, mut in_chunk) = (0u64, 0u64, 0u64);
        let mut at = |sender: &mut Option<Sender>,
                      rejects: &mut Rejects,
                      report: &mut Report,
                      checkpoint: &mut Checkpoint,
                      n: u64,
                      prefix: &xxhash_rust::xxh3::Xxh3Default,
                      done: bool|
         -> Result<(), BackfillError> {
            record(sender, rejects, report, path, opts.dry_run)?;
            if !opts.dry_run {
                let m = &mut checkpoint.files[mark];
                m.rows = n;
                m.prefix = checkpoint::prefix_hex(prefix);
                m.done = done;
                checkpoint.save(&opts.checkpoint)?;
            }
            progress(&Progress {
                bytes: bytes_before
                    + if done {
                        size
                    } else {
                        read.load(Ordering::Relaxed)
                    },
                total_bytes,
                rows: report.rows,
            });
            Ok(())
        };
        loop {
            let row = rows
                .next_row(&opts.mapping, now_ms(), &limits, &mut line, &mut prefix)
                .map_err(|source| BackfillError::Io {
                    path: path.clone(),
                    source,
                })?;
            let Some(row) = row else { break };
            n += 1;
            if n <= skip {
                report.resumed += 1;
                if n == skip && checkpoint::prefix_hex(&prefix) != recorded {
                    return Err(checkpoint.changed(mark, &opts.checkpoint).into());
                }
                continue;
            }
            report.rows += 1;
            in_chunk += 1;
            match row {
                Row::Event { key, value } => {
                    if let Some(sender) = &mut sender {
                        sender.send(path, line, &key, &value)?;
                    }
                    report.produced += 1;
                }
                Row::Bad {
                    reason,
                    detail,
                    raw,
                } => {
                    *report.rejected.entry(reason).or_default() += 1;
                    rejects.write(path, line, reason, &detail, &raw)?;
                }
            }
            let stop = opts.stop_after.is_some_and(|s| report.rows >= s);
            if in_chunk >= opts.chunk_rows || stop {
                at(
                    &mut sender,
                    &mut rejects,
                    &mut report,
                    &mut checkpoint,
                    n,
                    &prefix,
                    false,
                )?;
                in_chunk = 0;
            }
            if stop {
                report.stopped_early = true;
                break 'files;
            }
        }
        if n < skip {
            // The file ends before the rows recorded as done.
            return Err(checkpoint.changed(mark, &opts.checkpoint).into());
        }
        at(
            &mut sender,
            &mut rejects,
            &mut report,
            &mut checkpoint,
            n,
            &prefix,
            true,
        )?;
        bytes_before += size;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Waits for the broker to acknowledge everything sent of `file` and writes the rejected rows
/// (those the broker refused for good too) to disk: what the next checkpoint may record.
fn record(
    sender: &mut Option<Sender>,
    rejects: &mut Rejects,
    report: &mut Report,
    file: &Path,
    dry_run: bool,
) -> Result<(), BackfillError> {
    debug_assert!(sender.is_some() != dry_run);
    if let Some(sender) = sender {
        sender.acknowledged(file)?;
        for (line, raw, error) in sender.refused.drain(..) {
            report.produced -= 1;
            *report.rejected.entry(REFUSED_BY_KAFKA).or_default() += 1;
            rejects.write(file, line, REFUSED_BY_KAFKA, &error, &raw)?;
        }
    }
    rejects.flush()
}
