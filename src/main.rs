//! The `tierd` command: `run`, `check-config`, `rules check`, `rules explain`, `simulate`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tierd::config::Config;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// mimalloc instead of the system allocator: tierd allocates per event (decoded events, states,
/// JSON buffers, Redis arguments) from several threads, and glibc malloc took ~29 % of its CPU
/// in profiles (issue 12); see docs/performance.md for the measured difference. Built with
/// `no_thp`: mimalloc otherwise asks for transparent huge pages on its arenas, and a 2 MiB page
/// partly in use counts whole in the resident set (peak RSS 247 → 201 MiB in the 1M-customer
/// bench, same CPU). On a host with THP set to `always`, `MIMALLOC_ALLOW_THP=0` in the
/// environment turns them off for the process.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tierd",
    version,
    about = "Real-time customer tiering from Kafka purchases into Redis."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TIERD_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Run {
        /// Configuration file (TOML); `TIERD_…` environment variables override it.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the configuration and the rules file it names, then exit.
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Send purchase history (JSON Lines or CSV, gzip accepted) into the input topic, keyed
    /// by customer: every row checked as tierd would, rejected rows written with their reason,
    /// resumable from a checkpoint, counted once by `event_id` (README "Backfilling history").
    Backfill {
        /// Configuration file of the deployment (TOML): the input topic, Kafka settings,
        /// money and ingest limits, the rules (an override must name one of their tiers).
        #[arg(long, short)]
        config: PathBuf,
        /// The partitioner the live producers of the input topic use: a customer's history
        /// must land on the partition of their live events.
        #[arg(long, value_enum)]
        partitioner: Partitioner,
        /// Format of the files (default: from each name: .jsonl/.ndjson/.json, .csv; .gz).
        #[arg(long, value_parser = ["jsonl", "csv"])]
        format: Option<String>,
        /// Where a contract field is: `FIELD=COLUMN` (CSV column or JSON field), repeatable,
        /// e.g. `--map customer_id=member_no --map occurred_at=paid_at`.
        #[arg(long = "map", value_name = "FIELD=COLUMN")]
        map: Vec<String>,
        /// An event attribute read from a column (CSV) or field (JSON Lines): `NAME=COLUMN`,
        /// repeatable, e.g. `--attribute category=product_group --attribute channel=channel`.
        #[arg(long = "attribute", value_name = "NAME=COLUMN")]
        attribute: Vec<String>,
        /// CSV field delimiter (one ASCII character).
        #[arg(long, default_value = ",")]
        delimiter: char,
        /// How far each file got: read to resume, written after every acknowledged chunk.
        #[arg(long, default_value = "tierd-backfill.checkpoint.json")]
        checkpoint: PathBuf,
        /// Rejected rows with their reason are appended here (JSON Lines).
        #[arg(long, default_value = "tierd-backfill.rejects.jsonl")]
        rejects: PathBuf,
        /// Stop after this many rows (resume later with the same command).
        #[arg(long)]
        stop_after: Option<u64>,
        /// Rows per acknowledged chunk: the most a killed run sends again.
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        chunk_rows: u64,
        /// Check the rows only: nothing is produced and no checkpoint written.
        #[arg(long)]
        dry_run: bool,
        /// The history files, sent in this order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Every stored customer as JSON Lines (tier, metrics, scores, rule, next move: what the
    /// API shows, plus `partition`), read-only, each partition a consistent snapshot.
    Export {
        /// Configuration file of the running deployment (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Where to write (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Reads of a partition again after an inconsistent one (new rank cut-offs published
        /// during it, or its snapshot lease lapsed), before giving up.
        #[arg(long, default_value_t = 5)]
        retries: u32,
        /// Write a partition whose every read was inconsistent anyway (marked in the report).
        #[arg(long)]
        allow_inconsistent: bool,
    },
    /// Where each input partition stands: the offset tierd stored in Redis with the state,
    /// the log's start and end, the lag, how far published changes reach, the group's
    /// members.
    Offsets {
        #[command(subcommand)]
        command: OffsetsCommand,
    },
    /// Rules files and how they place customers.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Against the live state in Redis, without changing anything: the transition matrix
    /// (current tier × tier under NEW rules) and a sample of customers who would move.
    Simulate {
        /// The new rules file.
        #[arg(long)]
        rules: PathBuf,
        /// Configuration file of the running deployment (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// How many movers to list.
        #[arg(long, default_value_t = 20)]
        sample: usize,
    },
}

/// librdkafka's partitioners (`partitioner`) for keyed records, by the clients that use
/// each by default.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Partitioner {
    /// Java clients, Kafka Connect, Kafka Streams, kafka-console-producer (murmur2 of the key).
    #[value(name = "murmur2_random")]
    Murmur2,
    /// librdkafka-based clients: confluent-kafka (Python, Go, .NET), rust-rdkafka, kcat
    /// (CRC32 of the key).
    #[value(name = "consistent_random")]
    Crc32,
}

impl Partitioner {
    fn name(self) -> &'static str {
        match self {
            Self::Murmur2 => "murmur2_random",
            Self::Crc32 => "consistent_random",
        }
    }
}

#[derive(Subcommand)]
enum OffsetsCommand {
    /// Every partition of the input topic (read-only).
    Show {
        /// Configuration file of the deployment (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move the stored offsets of a stopped group (every tierd instance stopped): forward
    /// keeps the state (the input skipped is never applied); backward needs --clear-state
    /// (the partitions' state is removed and their input counted again).
    #[command(group(clap::ArgGroup::new("target").required(true).args(["to_earliest", "to_offset", "to_time"])))]
    Reset {
        /// Configuration file of the deployment (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// To the log's first offset still held.
        #[arg(long)]
        to_earliest: bool,
        /// To this offset (within the log).
        #[arg(long)]
        to_offset: Option<i64>,
        /// To the first record at or after this time (RFC 3339; the log end if none).
        #[arg(long)]
        to_time: Option<String>,
        /// Only this partition (repeatable; default: every partition).
        #[arg(long)]
        partition: Vec<i32>,
        /// Remove each partition's state (customers, timers, rank entries, tier counts) so
        /// its input is counted again from the new offset.
        #[arg(long)]
        clear_state: bool,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate a rules file; print every problem with file, line and field.
    Check {
        /// The rules file.
        file: PathBuf,
        /// Fraction digits of the currency (money bounds are read exactly in minor units).
        #[arg(long, default_value_t = 2)]
        fraction_digits: u32,
    },
    /// A stored customer's metrics, scores, the rule that placed them, and when and why they
    /// would move next (JSON).
    Explain {
        /// The customer.
        customer_id: String,
        /// Configuration file of the running deployment (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,librdkafka=warn".into());
    // The service logs to standard output; the tools to standard error, as their output is
    // data (an export's JSON lines, an explanation): a log line there (redis-rs warns when a
    // cluster's slots move) corrupted it.
    let service = matches!(cli.command, Command::Run { .. });
    let (writer, terminal) = if service {
        (
            BoxMakeWriter::new(std::io::stdout),
            std::io::IsTerminal::is_terminal(&std::io::stdout()),
        )
    } else {
        (
            BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
    };
    match cli.log_format {
        // Colours only on a terminal: log files and collectors get plain text.
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(terminal)
            .with_writer(writer)
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_writer(writer)
            .with_env_filter(filter)
            .init(),
    }
    match cli.command {
        Command::Run { config } => {
            // The test suite's fault injection: `FAILPOINTS` in the environment, read only
            // by a build with `--features failpoints` (never a release build).
            #[cfg(feature = "failpoints")]
            let _failpoints = fail::FailScenario::setup();
            let config = Config::load(Some(&config))
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(tierd::app::run(config, tierd::shutdown::signal()))?;
            Ok(())
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(Some(&config))
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            let rules =
                tierd::engine::rules::Rules::load(&cfg.rules.path, cfg.money.fraction_digits)?;
            tierd::app::load_history(&cfg)?;
            tierd::app::load_tokens(&cfg)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            tierd::api::tls::server_config(&cfg.api)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            // Build (without connecting) every client the service would: a property that
            // cannot work is refused here, naming the field.
            tierd::kafka::check_clients(&cfg.kafka)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            tierd::store::client::client(&cfg.redis)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            println!(
                "ok: {} (rules {} version {}, {} tiers)",
                config.display(),
                cfg.rules.path.display(),
                rules.version(),
                rules.tiers().len()
            );
            Ok(())
        }
        Command::Rules {
            command:
                RulesCommand::Check {
                    file,
                    fraction_digits,
                },
        } => match tierd::engine::rules::Rules::load(&file, fraction_digits) {
            Ok(rules) => {
                println!(
                    "ok: {} version {}: {} tiers ({}){}",
                    file.display(),
                    rules.version(),
                    rules.tiers().len(),
                    rules
                        .tiers()
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    if rules.uses_time() {
                        "; time moves tiers (timers)"
                    } else {
                        ""
                    }
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        },
        Command::Rules {
            command:
                RulesCommand::Explain {
                    customer_id,
                    config,
                },
        } => {
            let cfg = Config::load(Some(&config))
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            let rules =
                tierd::engine::rules::Rules::load(&cfg.rules.path, cfg.money.fraction_digits)?;
            let view = tierd::tools::explain::run(&cfg, &rules, &customer_id)?;
            println!("{}", serde_json::to_string_pretty(&view)?);
            Ok(())
        }
        Command::Backfill {
            config,
            partitioner,
            format,
            map,
            attribute,
            delimiter,
            checkpoint,
            rejects,
            stop_after,
            chunk_rows,
            dry_run,
            files,
        } => {
            use tierd::tools::backfill::{self, rows};
            let cfg = Config::load(Some(&config))
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            let rules =
                tierd::engine::rules::Rules::load(&cfg.rules.path, cfg.money.fraction_digits)?;
            let mapping = rows::Mapping::parse(&map)
                .and_then(|m| m.with_attributes(&attribute))
                .map_err(anyhow::Error::msg)?;
            let delimiter = u8::try_from(delimiter)
                .ok()
                .filter(u8::is_ascii)
                .context("--delimiter must be one ASCII character")?;
            let opts = backfill::Options {
                files,
                format: format.map(|f| {
                    if f == "csv" {
                        rows::Format::Csv
                    } else {
                        rows::Format::Jsonl
                    }
                }),
                mapping,
                delimiter,
                partitioner: partitioner.name().to_owned(),
                checkpoint,
                rejects: rejects.clone(),
                stop_after,
                chunk_rows,
                dry_run,
            };
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {msg} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let started = std::time::Instant::now();
            let report = backfill::run(&cfg, &rules, &opts, |p| {
                bar.set_length(p.total_bytes);
                bar.set_position(p.bytes);
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                bar.set_message(format!("{} rows ({:.0}/s)", p.rows, p.rows as f64 / secs));
            })?;
            bar.finish_and_clear();
            let secs = report.elapsed.as_secs_f64().max(1e-3);
            println!(
                "{} {} rows {} {} in {:.1} s ({:.0} rows/s): {} {}, {} rejected",
                if dry_run { "checked" } else { "backfilled" },
                report.rows,
                if dry_run { "for" } else { "into" },
                cfg.kafka.input_topic,
                secs,
                report.rows as f64 / secs,
                report.produced,
                if dry_run {
                    "valid (dry run: nothing sent)"
                } else {
                    "produced"
                },
                report.rejected_total(),
            );
            if report.resumed > 0 || report.files_done_before > 0 {
                println!(
                    "resumed: {} rows and {} whole files were done by an earlier run",
                    report.resumed, report.files_done_before
                );
            }
            for (reason, n) in &report.rejected {
                println!("  rejected {reason}: {n}");
            }
            if report.rejected_total() > 0 {
                println!("rejected rows, each with its reason: {}", rejects.display());
            }
            if report.stopped_early {
                println!(
                    "stopped after {} rows (--stop-after): run the same command again to go on",
                    report.rows
                );
            }
            Ok(())
        }
        Command::Export {
            config,
            output,
            retries,
            allow_inconsistent,
        } => {
            let cfg = Config::load(Some(&config))
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            let rules =
                tierd::engine::rules::Rules::load(&cfg.rules.path, cfg.money.fraction_digits)?;
            // A file is written beside its name and renamed over it once the export is
            // whole: a failed export never leaves a partial file that looks complete.
            let staged = output.as_ref().map(|path| {
                let mut tmp = path.as_os_str().to_owned();
                tmp.push(".partial");
                std::path::PathBuf::from(tmp)
            });
            let mut out: Box<dyn std::io::Write> = match &staged {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("--output {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {pos} customers {per_sec}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            let exported = tierd::tools::export::run(
                &cfg,
                &rules,
                &mut out,
                retries,
                allow_inconsistent,
                |n| bar.set_position(n),
            );
            bar.finish_and_clear();
            drop(out);
            let report = match exported {
                Ok(report) => report,
                Err(e) => {
                    if let Some(staged) = &staged {
                        let _ = std::fs::remove_file(staged);
                    }
                    return Err(e.into());
                }
            };
            if let (Some(staged), Some(path)) = (&staged, &output) {
                std::fs::rename(staged, path)
                    .with_context(|| format!("--output {}", path.display()))?;
            }
            for p in &report {
                eprintln!(
                    "partition {}: {} customers, input applied before offset {} ({}, {} read{})",
                    p.partition,
                    p.customers,
                    p.next_offset
                        .map_or_else(|| "none".to_owned(), |o| o.to_string()),
                    if p.consistent {
                        "consistent"
                    } else {
                        "INCONSISTENT: new cut-offs or a lapsed snapshot during the read"
                    },
                    p.reads,
                    if p.reads == 1 { "" } else { "s" },
                );
            }
            Ok(())
        }
        Command::Offsets {
            command:
                OffsetsCommand::Reset {
                    config,
                    to_earliest,
                    to_offset,
                    to_time,
                    partition,
                    clear_state,
                },
        } => {
            use tierd::tools::offsets::{self, Target};
            let cfg = Config::load(Some(&config))
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            let target = match (to_earliest, to_offset, to_time) {
                (true, _, _) => Target::Earliest,
                (_, Some(o), _) => Target::Offset(o),
                (_, _, Some(t)) => Target::Time(
                    tierd::model::time::parse_rfc3339_ms(&t)
                        .map_err(|e| anyhow::anyhow!("--to-time {t:?}: {e}"))?,
                ),
                _ => unreachable!("clap requires one target"),
            };
            for m in offsets::reset(&cfg, target, &partition, clear_state)? {
                println!(
                    "partition {}: {} -> {}{}",
                    m.partition,
                    m.from.map_or_else(|| "-".to_owned(), |o| o.to_string()),
                    m.to,
                    if clear_state {
                        format!(
                            " ({} customers removed; changes numbered above sequence {})",
                            m.customers_removed, m.sequence_floor
                        )
                    } else {
                        String::new()
                    }
                );
            }
            Ok(())
        }
        Command::Offsets {
            command: OffsetsCommand::Show { config, json },
        } => {
            let cfg = Config::load(Some(&config))
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            let offsets = tierd::tools::offsets::show(&cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&offsets)?);
            } else {
                print!("{}", offsets.render());
            }
            Ok(())
        }
        Command::Simulate {
            rules,
            config,
            sample,
        } => {
            let cfg = Config::load(Some(&config))
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            let current =
                tierd::engine::rules::Rules::load(&cfg.rules.path, cfg.money.fraction_digits)?;
            let new = tierd::engine::rules::Rules::load(&rules, cfg.money.fraction_digits)?;
            for w in tierd::tools::simulate::warnings(&current, &new) {
                eprintln!("warning: {w}");
            }
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {pos} customers {per_sec}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            let matrix = tierd::tools::simulate::run(&cfg, &new, sample, |n| bar.set_position(n))?;
            bar.finish_and_clear();
            println!(
                "Rules {} -> {} ({}), as stored in Redis:",
                current.version(),
                new.version(),
                rules.display()
            );
            print!("{}", matrix.render(&current, &new));
            if !matrix.movers.is_empty() {
                println!("Sample of movers:");
                for m in &matrix.movers {
                    println!("  {}: {} -> {} ({})", m.customer_id, m.from, m.to, m.rule);
                }
            }
            Ok(())
        }
    }
}
