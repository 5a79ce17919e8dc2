//! The `tierd` command: `tierd run --config FILE`, `tierd check-config --config FILE`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tierd::config::Config;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,librdkafka=warn".into());
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    match cli.command {
        Command::Run { config } => {
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
            let rules = tierd::rules::Rules::load(&cfg.rules.path, cfg.money.fraction_digits)?;
            println!(
                "ok: {} (rules {} version {}, {} tiers)",
                config.display(),
                cfg.rules.path.display(),
                rules.version(),
                rules.tiers().len()
            );
            Ok(())
        }
    }
}
