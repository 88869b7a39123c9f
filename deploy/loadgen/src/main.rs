//! Parley's load generator.
//!
//! Opens N sockets over K chats (spread over several source addresses when asked, since one
//! address reaches one port over ~28k ephemeral ports, and over several gateways), then each
//! chat's first socket sends M messages, either back to back (the next after the previous
//! answer ended: closed loop) or paced at a total rate (open loop). Every socket checks the
//! protocol (event order, `message_stream_ended.content` equal to its tokens, `seq` without gap
//! or duplicate) and reconnects with `last_seq` when closed early ([`socket`]). The report
//! ([`stats`]) gives connect, ack, TTFT, inter-token and end-to-end latency percentiles,
//! throughput, goodput, errors and refusals by code, and what the run was; thresholds
//! ([`thresholds`]) set the exit code. The deadline and Ctrl-C end a run with a partial report. `--idle` only holds sockets
//! open, for memory measurements. `loadgen drill` runs fault drills instead ([`drill`]),
//! `loadgen storm` a resume storm ([`storm`]), `loadgen flood` a handshake flood with made-up
//! keys beside a real client ([`flood`]).

mod drill;
mod flood;
mod live;
mod report;
mod scenario;
mod setup;
mod shards;
mod socket;
mod stats;
mod storm;
mod thresholds;

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use tokio::sync::{Barrier, mpsc};

/// Command-line options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Gateway base URLs, comma-separated (or the flag repeated): sockets are spread over them
    /// round robin and the report merges them all. Setup calls go to the first.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8000")]
    pub url: Vec<String>,
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
    /// Total messages per second across all chats (open loop); 0 sends back to back (closed
    /// loop).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Open-loop stages `DURATION:RATE` (repeat the flag): ramps and spikes, the rate moving
    /// linearly to each stage's target ([`scenario`]); the run lasts as long as they do.
    #[arg(long = "stage")]
    pub stages: Vec<scenario::Stage>,
    /// Run for this long (`10m`, `1h`: a soak), each chat sending until then instead of
    /// `--messages` times; the sockets are stopped at the end (answers in flight are not counted).
    #[arg(long, value_parser = scenario::parse_duration)]
    pub duration: Option<Duration>,
    /// A TOML file of these settings by name (see [`scenario`]); flags on the command line win.
    #[arg(long)]
    pub scenario: Option<String>,
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
    /// Open the sockets at this many per second (open loop, each at its own scheduled time, still
    /// at most `--connect-concurrency` at once); 0 opens them as fast as the concurrency allows.
    /// A socket's connect latency then counts from its scheduled time, so a server that falls
    /// behind shows as latency rather than as a slower schedule.
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,
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
    /// Write `report.json`, `timeseries.csv` and `report.html` (plots) into this directory;
    /// `{time}` in it becomes the run's start (UTC, `20261202T153000Z`), one folder per run.
    #[arg(long)]
    pub out: Option<String>,
    /// Pass/fail criteria such as `ttft_p99<50ms` or `errors==0` (repeat the flag); a broken
    /// one makes the exit code 99 ([`thresholds`]).
    #[arg(long = "threshold")]
    pub thresholds: Vec<thresholds::Threshold>,
    /// An answer that ends within this many milliseconds of its message counts as goodput.
    #[arg(long, default_value_t = 10_000)]
    pub goodput_ms: u64,
    /// Keep the tenant (and its chats) this run created; by default it is deleted at the end.
    #[arg(long)]
    pub keep_tenant: bool,
    /// Reconnect storms: at each of these times after the sockets opened (repeat the flag), the
    /// storm's sockets close at once and reconnect at once with `last_seq` ([`socket`]).
    #[arg(long = "storm-at", value_parser = scenario::parse_duration)]
    pub storm_at: Vec<Duration>,
    /// The share of the sockets in each storm (0 to 1), spread over the chats.
    #[arg(long, default_value_t = 1.0)]
    pub storm_share: f64,
    /// Generator processes to spread the sockets over, one merged report ([`shards`]); 0
    /// takes as many as the sockets need under the open-files limit.
    #[arg(long, default_value_t = 0)]
    pub processes: usize,
    /// This process is shard I of N of a parent's run (set by the parent).
    #[arg(long, hide = true)]
    pub shard: Option<shards::Shard>,
    /// The chats of the parent's run, one id a line (set by the parent for its shards).
    #[arg(long, hide = true)]
    pub chat_ids_file: Option<std::path::PathBuf>,
}

/// The command line: a load run (the flags above), or a subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    args_conflicts_with_subcommands = true,
    args_override_self = true
)]
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
    let cli = Cli::parse_from(with_scenario(std::env::args().collect())?);
    match cli.command {
        Some(Command::Drill(args)) => drill::run(args).await,
        Some(Command::Storm(args)) => storm::run(args).await,
        Some(Command::Flood(args)) => flood::run(args).await,
        None => load(cli.load).await,
    }
}

/// The command line with a `--scenario` file's settings put ahead of its own flags.
fn with_scenario(argv: Vec<String>) -> anyhow::Result<Vec<String>> {
    let at = argv
        .iter()
        .position(|a| a == "--scenario" || a.starts_with("--scenario="));
    let Some(at) = at else { return Ok(argv) };
    let path = match argv[at].strip_prefix("--scenario=") {
        Some(p) => p.to_owned(),
        None => argv
            .get(at + 1)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("--scenario needs a file"))?,
    };
    let mut out = vec![argv[0].clone()];
    out.extend(scenario::file_args(&path)?);
    out.extend(argv.into_iter().skip(1));
    Ok(out)
}

async fn load(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.chats >= 1 && args.sockets >= args.chats,
        "need sockets >= chats >= 1"
    );
    let started_at = std::time::SystemTime::now();
    let cpu_before = stats::own_cpu_seconds();
    let target = setup::prepare(&args).await?;
    let processes = shards::processes(&args);
    anyhow::ensure!(
        processes == 1 || args.idle.is_none(),
        "--idle runs in one process (--processes 1)"
    );
    if args.shard.is_none() {
        eprintln!("tenant ready, {} chats created", target.chats.len());
    }
    tokio::time::sleep(Duration::from_secs(args.setup_wait)).await;
    let run = if processes > 1 {
        eprintln!(
            "opening {} sockets over {processes} processes",
            args.sockets
        );
        shards::run(&args, &target, processes).await?
    } else {
        match sockets(&args, &target).await? {
            Some(run) => run,
            None => return Ok(()),
        }
    };
    if args.shard.is_some() {
        let cpu = stats::own_cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);
        return shards::emit_report(&run.report, run.partial.as_deref(), cpu);
    }
    finish(&args, &target, run, started_at, cpu_before).await
}

/// Runs this process's sockets (all of them, or its shard's) to the run's end; `None` for an
/// `--idle` run, which only holds them.
async fn sockets(args: &Args, target: &setup::Target) -> anyhow::Result<Option<shards::Merged>> {
    // A run bounded by time: a soak (--duration) or a schedule of stages.
    let bounded = args
        .duration
        .or((!args.stages.is_empty()).then(|| scenario::total(&args.stages)));
    let messages = if bounded.is_some() {
        usize::MAX
    } else {
        args.messages
    };
    let paced = args.rate > 0.0 || !args.stages.is_empty();
    let shard = args.shard.unwrap_or(shards::Shard { index: 0, of: 1 });
    let mine: Vec<usize> = (0..args.sockets).filter(|&i| shard.owns(i)).collect();
    if args.shard.is_none() {
        eprintln!("opening {} sockets", args.sockets);
    }
    let opening = Instant::now();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (storm_tx, storm) = tokio::sync::watch::channel(0u64);
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let live = live::Live::new()?;
    let ready = Arc::new(Barrier::new(mine.len() + 1));
    let mut pace_txs = Vec::new();
    let connect_gate = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    // This process's share of the opening rate; its k-th socket is due k / rate in.
    let per_process = args.connect_rate / shard.of as f64;
    let opening_at = tokio::time::Instant::now();
    for (k, &i) in mine.iter().enumerate() {
        let chat = i % args.chats;
        let open_at = (per_process > 0.0)
            .then(|| opening_at + Duration::from_secs_f64(k as f64 / per_process));
        let plan = socket::Plan {
            ws_url: target.ws_url(chat, i),
            source: args.source_ips[i % args.source_ips.len()],
            sender: i < args.chats,
            messages,
            chat_index: chat,
            paced,
            idle: args.idle.is_some(),
            goodput_within: Duration::from_millis(args.goodput_ms),
            live: live.clone(),
            storms: scenario::in_storm(i, args.storm_share),
            open_at,
        };
        let pace = plan.sender.then(|| {
            let (tx, rx) = mpsc::channel::<()>(4);
            pace_txs.push(tx);
            rx
        });
        let (ready, gate) = (ready.clone(), connect_gate.clone());
        tasks.spawn(socket::run(
            plan,
            pace,
            ready,
            go.clone(),
            gate,
            stop.clone(),
            storm.clone(),
        ));
    }
    let (sampled_tx, sampled) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(live.clone().sample(sampled, args.shard.is_some()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut partial = tokio::select! {
        _ = ready.wait() => None,
        () = tokio::time::sleep_until(deadline) => Some("the deadline passed while opening sockets"),
        _ = tokio::signal::ctrl_c() => Some("interrupted (Ctrl-C) while opening sockets"),
    };
    let opened_in = opening.elapsed();
    if partial.is_none() {
        if args.shard.is_some() {
            shards::emit(&serde_json::json!({"open": true}));
            partial = shards::start_signal(deadline).await;
        } else {
            eprintln!("all sockets open");
        }
    }
    let _ = go_tx.send(true);
    let started = Instant::now();
    if let Some(hold) = args.idle.filter(|_| partial.is_none()) {
        eprintln!("holding {} idle sockets for {hold}s", args.sockets);
        tokio::time::sleep(Duration::from_secs(hold)).await;
        tasks.abort_all();
        println!(
            "{}",
            serde_json::json!({"mode": "idle", "sockets": args.sockets, "held_secs": hold})
        );
        return Ok(None);
    }
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // This process's share of the schedule: its senders' share of the chats.
    let share = pace_txs.len() as f64 / args.chats as f64;
    let pacer = paced.then(|| {
        let stages = args
            .stages
            .iter()
            .map(|s| scenario::Stage {
                target: s.target * share,
                ..*s
            })
            .collect();
        tokio::spawn(scenario::pace(
            pace_txs,
            args.rate * share,
            stages,
            messages,
            dropped.clone(),
        ))
    });
    let storms = tokio::spawn(scenario::storms(args.storm_at.clone(), storm_tx));
    let run_end = bounded.map_or(deadline, |b| {
        (tokio::time::Instant::now() + b).min(deadline)
    });
    let mut total = stats::Report::new()?;
    while partial.is_none() {
        tokio::select! {
            done = tasks.join_next() => match done {
                Some(done) => total.merge(done??),
                None => break,
            },
            () = tokio::time::sleep_until(run_end) => {
                if bounded.is_some() && run_end < deadline {
                    break;
                }
                partial = Some("the deadline (--timeout) passed");
            }
            _ = tokio::signal::ctrl_c() => partial = Some("interrupted (Ctrl-C)"),
        }
    }
    if partial.is_some() || bounded.is_some() {
        if let Some(why) = partial {
            eprintln!("{why}: stopping the sockets and writing a partial report");
        }
        let _ = stop_tx.send(true);
        let grace = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                done = tasks.join_next() => match done {
                    Some(Ok(Ok(report))) => total.merge(report),
                    Some(_) => {}
                    None => break,
                },
                () = &mut grace => { tasks.abort_all(); break; }
            }
        }
    }
    let _ = sampled_tx.send(true);
    let rows = sampler.await.unwrap_or_default();
    if let Some(pacer) = pacer {
        pacer.abort();
    }
    storms.abort();
    total.dropped_sends += dropped.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Some(shards::Merged {
        report: total,
        rows,
        opened_in,
        ran_for: started.elapsed(),
        partial: partial.map(str::to_owned),
        shard_cpu_s: None,
    }))
}

/// The end of a run: the tenant deleted, the summary, the report files, the thresholds'
/// verdict (the exit code).
async fn finish(
    args: &Args,
    target: &setup::Target,
    run: shards::Merged,
    started_at: std::time::SystemTime,
    cpu_before: Option<f64>,
) -> anyhow::Result<()> {
    if !args.keep_tenant
        && let Err(e) = setup::cleanup(args, target).await
    {
        eprintln!("could not delete the run's tenant: {e}");
    }
    let total = run.report;
    let mut summary = total.summary(run.ran_for);
    // Sockets opened per second while they were being opened (`connect_ms` also holds the
    // reconnects that came later).
    summary.insert(
        "connect_rate_per_s".into(),
        serde_json::json!(total.sockets as f64 / run.opened_in.as_secs_f64().max(1e-9)),
    );
    let cpu = stats::own_cpu_seconds()
        .zip(cpu_before)
        .map(|(a, b)| a - b + run.shard_cpu_s.unwrap_or(0.0));
    describe_run(&mut summary, args, started_at, cpu, run.partial.as_deref());
    let outcomes: Vec<thresholds::Outcome> = args
        .thresholds
        .iter()
        .map(|t| t.check(&serde_json::Value::Object(summary.clone())))
        .collect();
    summary.insert(
        "thresholds".into(),
        serde_json::json!(
            outcomes
                .iter()
                .map(|o| serde_json::json!({
                    "threshold": o.text, "actual": o.actual, "passed": o.passed,
                }))
                .collect::<Vec<_>>()
        ),
    );
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(path) = &args.report {
        std::fs::write(path, &text)?;
    }
    if let Some(dir) = &args.out {
        let stamp = chrono::DateTime::<chrono::Utc>::from(started_at).format("%Y%m%dT%H%M%SZ");
        let dir = std::path::PathBuf::from(dir.replace("{time}", &stamp.to_string()));
        report::write(&dir, &summary, &run.rows, &total)?;
        eprintln!("report written to {}", dir.display());
    }
    eprint!("{}", report::table(&summary));
    for o in &outcomes {
        let actual = o.actual.map_or("missing".to_owned(), |a| format!("{a:.3}"));
        eprintln!(
            "{} {} (actual {actual})",
            if o.passed { "✓" } else { "✗" },
            o.text
        );
    }
    if outcomes.iter().any(|o| !o.passed) {
        std::process::exit(thresholds::BROKEN_EXIT_CODE);
    }
    Ok(())
}

/// What the run was: when, which build, against what, with which parameters, and how much CPU
/// the generator itself used (near a core per process means the generator is the bottleneck).
fn describe_run(
    summary: &mut serde_json::Map<String, serde_json::Value>,
    args: &Args,
    started_at: std::time::SystemTime,
    cpu: Option<f64>,
    partial: Option<&str>,
) {
    let unix = started_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let fields = [
        ("started_at_unix", serde_json::json!(unix)),
        (
            "loadgen_version",
            serde_json::json!(env!("CARGO_PKG_VERSION")),
        ),
        ("targets", serde_json::json!(args.url)),
        ("chats", serde_json::json!(args.chats)),
        ("messages_per_chat", serde_json::json!(args.messages)),
        (
            "mode",
            serde_json::json!(if !args.stages.is_empty() {
                let stages: Vec<String> = args
                    .stages
                    .iter()
                    .map(|s| format!("{:?}→{}/s", s.duration, s.target))
                    .collect();
                format!("open loop, stages {}", stages.join(", "))
            } else if args.rate > 0.0 {
                format!("open loop, {} msg/s", args.rate)
            } else {
                "closed loop (back to back)".to_owned()
            }),
        ),
        (
            "duration_s",
            serde_json::json!(args.duration.map(|d| d.as_secs_f64())),
        ),
        ("parameters", serde_json::json!(format!("{args:?}"))),
        ("generator_cpu_s", serde_json::json!(cpu)),
        ("processes", serde_json::json!(shards::processes(args))),
        ("partial", serde_json::json!(partial.is_some())),
        ("partial_reason", serde_json::json!(partial)),
    ];
    for (k, v) in fields {
        summary.insert(k.to_owned(), v);
    }
}
