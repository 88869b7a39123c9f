//! Parley's load generator.
//!
//! Opens N sockets over K chats (spread over several source addresses when asked, since one
//! address reaches one port over ~28k ephemeral ports), then each chat's first socket sends M
//! messages, either back to back (the next after the previous answer ended) or paced at a
//! total rate. Every socket checks the protocol (event order, `message_stream_ended.content`
//! equal to its tokens). The report gives ack latency and time to first token (p50/p99), tokens
//! per second delivered to all sockets, and protocol violations. `--idle` only holds sockets
//! open, for memory measurements. `loadgen drill` runs fault drills instead ([`drill`]),
//! `loadgen storm` a resume storm ([`storm`]), `loadgen flood` a handshake flood with made-up
//! keys beside a real client ([`flood`]).

mod drill;
mod flood;
mod setup;
mod socket;
mod stats;
mod storm;

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use tokio::sync::{Barrier, mpsc};

/// Command-line options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Admin token: the load generator creates its own tenant with high limits.
    #[arg(long, env = "PARLEY_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Use this tenant key instead of creating a tenant (its limits must allow the load).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Sockets to open.
    #[arg(long, default_value_t = 200)]
    pub sockets: usize,
    /// Chats the sockets are spread over (each chat's first socket sends).
    #[arg(long, default_value_t = 200)]
    pub chats: usize,
    /// Messages each chat sends.
    #[arg(long, default_value_t = 10)]
    pub messages: usize,
    /// Total messages per second across all chats; 0 sends back to back.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Tokens per answer (mock model option, set on the created tenant).
    #[arg(long, default_value_t = 50)]
    pub reply_tokens: u32,
    /// Milliseconds between answer tokens (mock model option): slow answers hold worker slots.
    #[arg(long, default_value_t = 0)]
    pub token_delay_ms: u64,
    /// The created tenant's `max_concurrent_answers` (answers at once per worker).
    #[arg(long, default_value_t = 100_000)]
    pub concurrent_answers: u32,
    /// Only open the sockets and hold them this many seconds (no messages).
    #[arg(long)]
    pub idle: Option<u64>,
    /// Comma-separated local addresses to spread sockets over (e.g. 127.0.0.1,127.0.0.2).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub source_ips: Vec<IpAddr>,
    /// Sockets opened at the same time while connecting.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Wait this many seconds after creating the tenant and chats, before opening sockets
    /// (lets a memory measurement take its baseline with the chats already in place).
    #[arg(long, default_value_t = 0)]
    pub setup_wait: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Also write the JSON report here.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
}

/// The command line: a load run (the flags above), or a subcommand.
#[derive(Debug, Parser)]
#[command(name = "loadgen", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    load: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Fault drills: drive chats while killing and restarting parts of a deployment, then
    /// check every acknowledged message against the saved history.
    Drill(drill::DrillArgs),
    /// A resume storm: N sockets dropped and reconnected at once with `last_seq`.
    Storm(storm::StormArgs),
    /// A handshake flood with made-up keys, with a real client's handshakes timed beside it.
    Flood(flood::FloodArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Drill(args)) => drill::run(args).await,
        Some(Command::Storm(args)) => storm::run(args).await,
        Some(Command::Flood(args)) => flood::run(args).await,
        None => load(cli.load).await,
    }
}

async fn load(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.chats >= 1 && args.sockets >= args.chats,
        "need sockets >= chats >= 1"
    );
    let target = setup::prepare(&args).await?;
    eprintln!("tenant ready, {} chats created", target.chats.len());
    tokio::time::sleep(Duration::from_secs(args.setup_wait)).await;
    eprintln!("opening {} sockets", args.sockets);
    let ready = Arc::new(Barrier::new(args.sockets + 1));
    let (pace_txs, pace_rxs): (Vec<_>, Vec<_>) =
        (0..args.chats).map(|_| mpsc::channel::<()>(1024)).unzip();
    let mut pace_rxs: Vec<Option<mpsc::Receiver<()>>> = pace_rxs.into_iter().map(Some).collect();
    let connect_gate = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.sockets {
        let chat = i % args.chats;
        let plan = socket::Plan {
            ws_url: target.ws_url(chat),
            source: args.source_ips[i % args.source_ips.len()],
            sender: i < args.chats,
            messages: args.messages,
            chat_index: chat,
            paced: args.rate > 0.0,
            idle: args.idle.is_some(),
        };
        let pace = if plan.sender {
            pace_rxs[chat].take()
        } else {
            None
        };
        let (ready, gate) = (ready.clone(), connect_gate.clone());
        tasks.spawn(socket::run(plan, pace, ready, gate));
    }
    ready.wait().await;
    eprintln!("all sockets open");
    let started = Instant::now();
    if let Some(hold) = args.idle {
        eprintln!("holding {} idle sockets for {hold}s", args.sockets);
        tokio::time::sleep(Duration::from_secs(hold)).await;
        tasks.abort_all();
        println!(
            "{}",
            serde_json::json!({"mode": "idle", "sockets": args.sockets, "held_secs": hold})
        );
        return Ok(());
    }
    if args.rate > 0.0 {
        tokio::spawn(pace(pace_txs, args.rate, args.messages));
    } else {
        drop(pace_txs);
    }
    let mut total = stats::Report::new()?;
    let deadline = Duration::from_secs(args.timeout);
    while let Some(done) = tokio::time::timeout(deadline, tasks.join_next())
        .await
        .context("load run timed out")?
    {
        total.merge(done??);
    }
    let summary = total.summary(&args, started.elapsed());
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(path) = &args.report {
        std::fs::write(path, text)?;
    }
    Ok(())
}

/// Sends one tick to each chat in turn at `rate` ticks per second until each had `messages`.
async fn pace(senders: Vec<mpsc::Sender<()>>, rate: f64, messages: usize) {
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..messages {
        for tx in &senders {
            interval.tick().await;
            let _ = tx.send(()).await;
        }
    }
}
