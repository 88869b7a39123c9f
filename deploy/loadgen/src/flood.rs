//! `loadgen flood`: a handshake flood, as from a botnet guessing keys, with a real client
//! beside it.
//!
//! For `--duration` seconds, upgrades with made-up keys (well-formed `pk_` + 64 random hex,
//! so that each one would cost a store lookup) arrive at `--rate` per second, spread over
//! `--source-ips`; each is read until the server closes it. Meanwhile a real client opens a
//! socket with a valid key every `--probe-ms` and times its handshake, from the TCP connect to
//! `connection_established`. The report gives the flood's achieved rate and how it was refused
//! (`AUTH_ERROR` after the upgrade, `HTTP 429` before it once an address is throttled, other),
//! and the real
//! handshakes' p50/p99/max. `--rate 0` measures the real handshakes alone, for comparison.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::{setup, socket::connect_from};

/// `loadgen flood` options.
#[derive(Debug, Clone, clap::Args)]
pub struct FloodArgs {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Admin token: the real client's tenant is created with it.
    #[arg(long, env = "PARLEY_ADMIN_TOKEN")]
    pub admin_token: String,
    /// Upgrades with made-up keys per second; 0 runs the real client alone.
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
    /// Seconds the flood lasts.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Comma-separated local addresses the flood comes from.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.2")]
    pub source_ips: Vec<IpAddr>,
    /// Flood upgrades in flight at most (more are counted as skipped).
    #[arg(long, default_value_t = 4_000)]
    pub in_flight: usize,
    /// Milliseconds between the real client's handshakes.
    #[arg(long, default_value_t = 20)]
    pub probe_ms: u64,
    /// The real client's local address.
    #[arg(long, default_value = "127.0.0.1")]
    pub probe_ip: IpAddr,
    /// Also write the JSON report here.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
}

/// Runs the flood and the probe, and prints the report.
pub async fn run(args: FloodArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let settings = json!({"max_connections": 100_000, "requests_per_minute": 1_000_000});
    let key = setup::create_tenant(&http, &args.url, &args.admin_token, "flood", settings).await?;
    let chat = setup::create_chat(&http, &args.url, &key, "probe").await?;
    let ws_base = args.url.replacen("http", "ws", 1);
    let real = format!("{ws_base}/ws/chat?api_key={key}&user_id=probe&chat_id={chat}");
    let fake = format!("{ws_base}/ws/chat?user_id=x&chat_id={chat}&api_key=");
    let until = Instant::now() + Duration::from_secs(args.duration);
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let flood = tokio::spawn(flood(args.clone(), fake, until, outcomes.clone()));
    let probe = probe(&args, &real, until).await?;
    let sent = flood.await??;
    let outcomes = outcomes.lock().await.clone();
    let report = json!({
        "mode": "flood",
        "flood": {
            "target_rate": args.rate,
            "sent": sent,
            "achieved_rate": sent as f64 / args.duration as f64,
            "source_ips": args.source_ips.len(),
            "outcomes": outcomes,
        },
        "real_handshake_ms": probe,
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.report {
        std::fs::write(path, text)?;
    }
    Ok(())
}

/// Sends made-up upgrades at the rate until `until`; returns how many went out.
async fn flood(
    args: FloodArgs,
    base: String,
    until: Instant,
    outcomes: Arc<Mutex<BTreeMap<String, u64>>>,
) -> anyhow::Result<u64> {
    if args.rate <= 0.0 {
        return Ok(0);
    }
    let gate = Arc::new(Semaphore::new(args.in_flight));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < until {
        tick.tick().await;
        let Ok(permit) = gate.clone().try_acquire_owned() else {
            *outcomes.lock().await.entry("skipped".into()).or_default() += 1;
            continue;
        };
        let url = format!("{base}pk_{}", hex::encode(rand::random::<[u8; 32]>()));
        let source = args.source_ips[sent as usize % args.source_ips.len()];
        let outcomes = outcomes.clone();
        tasks.spawn(async move {
            let outcome = refused_with(&url, source).await;
            drop(permit);
            *outcomes.lock().await.entry(outcome).or_default() += 1;
        });
        sent += 1;
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Ok(sent)
}

/// The error code a made-up upgrade was refused with (or what went wrong instead).
async fn refused_with(url: &str, source: IpAddr) -> String {
    let mut ws =
        match tokio::time::timeout(Duration::from_secs(10), connect_from(url, source)).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                return match e.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
                    Some(tokio_tungstenite::tungstenite::Error::Http(res)) => {
                        format!("HTTP {}", res.status().as_u16())
                    }
                    _ => "connect_failed".into(),
                };
            }
            Err(_) => return "connect_timed_out".into(),
        };
    let mut code = String::from("closed_without_error");
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap_or_default();
                if let Some(c) = v["error_code"].as_str() {
                    code = c.to_owned();
                } else if v["event_type"] == "connection_established" {
                    return "ACCEPTED".into();
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    code
}

/// Real handshakes every `probe_ms` until `until`: p50, p99 and max in milliseconds.
async fn probe(args: &FloodArgs, url: &str, until: Instant) -> anyhow::Result<Value> {
    let mut times = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut failed = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(args.probe_ms.max(1)));
    // The first second warms the gateway's caches; it is not counted.
    let counted_from = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        tick.tick().await;
        let started = Instant::now();
        match handshake(url, args.probe_ip).await {
            Ok(()) if started >= counted_from => {
                times.record(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))?;
            }
            Ok(()) => {}
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("real handshake failed: {e:#}");
                }
            }
        }
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(json!({
        "count": times.len(),
        "failed": failed,
        "p50": ms(times.value_at_quantile(0.5)),
        "p99": ms(times.value_at_quantile(0.99)),
        "max": ms(times.max()),
    }))
}

/// One real handshake, to `connection_established`.
async fn handshake(url: &str, source: IpAddr) -> anyhow::Result<()> {
    let mut ws = tokio::time::timeout(Duration::from_secs(10), connect_from(url, source))
        .await
        .context("connect timed out")??;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no connection_established in time")?
            .context("closed")??;
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t)?;
            anyhow::ensure!(v["event_type"] == "connection_established", "refused: {v}");
            let _ = ws.close(None).await;
            return Ok(());
        }
    }
}
