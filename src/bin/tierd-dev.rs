//! `tierd-dev`: developer tooling for demos, tests and benchmarks — create topics, produce a
//! generated purchase stream, tail the tier-change topic. Not part of the service.

use clap::{Parser, Subcommand};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use std::time::{Duration, Instant};
use tierd::model::time;

#[derive(Parser)]
#[command(
    name = "tierd-dev",
    about = "Developer tooling: topics, generated purchases, tail of tier changes."
)]
struct Cli {
    /// Bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092", global = true)]
    brokers: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create topics (existing ones are left as they are).
    CreateTopics {
        /// Partitions per topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Topic names.
        topics: Vec<String>,
    },
    /// Produce a generated, reproducible stream of purchases (and ~3% refunds).
    Produce {
        /// Topic to produce to.
        #[arg(long, default_value = "purchases")]
        topic: String,
        /// Number of distinct customers.
        #[arg(long, default_value_t = 1000)]
        customers: u64,
        /// Number of events.
        #[arg(long, default_value_t = 10_000)]
        events: u64,
        /// Events per second (0 = as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Random seed: the same seed gives the same events (and event ids).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Currency code on the events.
        #[arg(long, default_value = "CNY")]
        currency: String,
    },
    /// Print tier-change events as they arrive.
    Tail {
        /// Topic to read.
        #[arg(long, default_value = "tier-changes")]
        topic: String,
        /// Stop after this many records (0 = never).
        #[arg(long, default_value_t = 0)]
        max: u64,
    },
}

/// One generated event: (key, JSON value).
fn generate(
    rng: &mut StdRng,
    i: u64,
    customers: u64,
    seed: u64,
    base_ms: i64,
    currency: &str,
) -> (String, String) {
    let customer = format!("cust-{:06}", rng.random_range(0..customers));
    let refund = rng.random_bool(0.03);
    // Mostly small baskets, sometimes a large B2B order: tiers A–D all get populated.
    let yuan: u64 = if !refund && rng.random_bool(0.03) {
        rng.random_range(50_000..400_000)
    } else {
        rng.random_range(10..8_000)
    };
    let fen: u64 = rng.random_range(0..100);
    let at = time::format_ms(base_ms + i64::try_from(i).unwrap_or(0) * 10);
    let kind = if refund { "refund" } else { "purchase" };
    let value = format!(
        r#"{{"event_id":"gen-{seed}-{i}","customer_id":"{customer}","amount":"{yuan}.{fen:02}","currency":"{currency}","occurred_at":"{at}","type":"{kind}"}}"#
    );
    (customer, value)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CreateTopics { partitions, topics } => {
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", &cli.brokers)
                .create()?;
            let new: Vec<NewTopic<'_>> = topics
                .iter()
                .map(|t| {
                    NewTopic::new(t, partitions, TopicReplication::Fixed(1))
                        .set("retention.ms", "604800000")
                })
                .collect();
            for result in admin.create_topics(&new, &AdminOptions::new()).await? {
                match result {
                    Ok(t) => println!("created {t}"),
                    Err((t, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                        println!("exists {t}")
                    }
                    Err((t, e)) => anyhow::bail!("creating topic {t}: {e}"),
                }
            }
        }
        Command::Produce {
            topic,
            customers,
            events,
            rate,
            seed,
            currency,
        } => {
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &cli.brokers)
                .set("enable.idempotence", "true")
                .set("linger.ms", "20")
                .set("compression.type", "lz4")
                .set("queue.buffering.max.messages", "1000000")
                .create()?;
            let mut rng = StdRng::seed_from_u64(seed);
            let base_ms = time::now_ms() - 86_400_000;
            let started = Instant::now();
            let bar = indicatif::ProgressBar::new(events);
            bar.set_style(indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
            )?);
            bar.set_message(format!("producing to {topic}"));
            let mut pending = std::collections::VecDeque::new();
            for i in 0..events {
                let (key, value) = generate(&mut rng, i, customers, seed, base_ms, &currency);
                loop {
                    match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&value)) {
                        Ok(delivery) => {
                            pending.push_back(delivery);
                            break;
                        }
                        Err((
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull,
                            ),
                            _,
                        )) => {
                            if let Some(d) = pending.pop_front() {
                                d.await?.map_err(|(e, _)| e)?;
                            }
                        }
                        Err((e, _)) => return Err(e.into()),
                    }
                }
                while pending.len() > 100_000 {
                    if let Some(d) = pending.pop_front() {
                        d.await?.map_err(|(e, _)| e)?;
                    }
                }
                if rate > 0 {
                    let due = Duration::from_secs_f64((i + 1) as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                bar.inc(1);
            }
            for d in pending {
                d.await?.map_err(|(e, _)| e)?;
            }
            producer.flush(Duration::from_secs(30))?;
            bar.finish();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "produced {events} events for {customers} customers in {secs:.2} s ({:.0}/s)",
                events as f64 / secs
            );
        }
        Command::Tail { topic, max } => {
            let consumer: StreamConsumer = ClientConfig::new()
                .set("bootstrap.servers", &cli.brokers)
                .set("group.id", format!("tierd-dev-tail-{}", std::process::id()))
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "false")
                .create()?;
            consumer.subscribe(&[&topic])?;
            let mut n = 0;
            loop {
                let m = consumer.recv().await?;
                let value = m.payload().map(String::from_utf8_lossy).unwrap_or_default();
                match serde_json::from_str::<serde_json::Value>(&value) {
                    Ok(v) if v.get("tier").is_some() => println!(
                        "{:<12} {:>9} → {:<2} {:<7} {:<8} monetary {:>14} {}",
                        v["customer_id"].as_str().unwrap_or("?"),
                        v["previous_tier"].as_str().unwrap_or("-"),
                        v["tier"].as_str().unwrap_or("?"),
                        v["direction"].as_str().unwrap_or("?"),
                        v["reason"].as_str().unwrap_or("?"),
                        v["metrics"]["monetary"].as_str().unwrap_or("?"),
                        v["occurred_at"].as_str().unwrap_or("?"),
                    ),
                    _ => {
                        let reason = m
                            .headers()
                            .and_then(|h| h.iter().find(|h| h.key == "tierd.reason"))
                            .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()));
                        println!("dead letter ({}): {value}", reason.unwrap_or_default());
                    }
                }
                n += 1;
                if max > 0 && n >= max {
                    break;
                }
            }
        }
    }
    Ok(())
}
