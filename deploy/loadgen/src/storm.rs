//! `loadgen storm`: a resume storm, as when a gateway dies and its sockets come back at once.
//!
//! Opens N sockets over K chats, has each chat answer one message (so that every socket has
//! seen a few events), then drops every socket at once and reconnects them all at once with
//! `last_seq` a few events back. A socket has resumed once it has received the events it
//! missed, in order, without an error. The report gives how many resumed, the errors, and the
//! time from the storm's start to each socket's resume (p50, p99, max) and to the last one.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::{setup, socket::connect_from};

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// `loadgen storm` options.
#[derive(Debug, Clone, clap::Args)]
pub struct StormArgs {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Admin token: the storm creates its own tenant.
    #[arg(long, env = "PARLEY_ADMIN_TOKEN")]
    pub admin_token: String,
    /// Sockets.
    #[arg(long, default_value_t = 10_000)]
    pub sockets: usize,
    /// Chats the sockets are spread over.
    #[arg(long, default_value_t = 100)]
    pub chats: usize,
    /// How many events back each socket resumes from.
    #[arg(long, default_value_t = 3)]
    pub back: u64,
    /// Comma-separated local addresses to spread sockets over.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub source_ips: Vec<IpAddr>,
    /// Connects in flight at once (both when opening and in the storm).
    #[arg(long, default_value_t = 1024)]
    pub connect_concurrency: usize,
    /// Seconds the storm may take.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Also write the JSON report here.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
}

/// Runs the storm and prints its report.
pub async fn run(args: StormArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let (key, chats) = prepare(&http, &args).await?;
    let ws_base = args.url.replacen("http", "ws", 1);
    let url = |i: usize, last: Option<u64>| {
        let mut u = format!(
            "{ws_base}/ws/chat?api_key={key}&user_id=storm-{c}&chat_id={}",
            chats[i % chats.len()],
            c = i % chats.len()
        );
        if let Some(n) = last {
            u.push_str(&format!("&last_seq={n}"));
        }
        u
    };
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    eprintln!("opening {} sockets", args.sockets);
    let mut open = tokio::task::JoinSet::new();
    for i in 0..args.sockets {
        let (u, src, gate) = (
            url(i, None),
            args.source_ips[i % args.source_ips.len()],
            gate.clone(),
        );
        open.spawn(async move { (i, hold(&u, src, &gate).await) });
    }
    let mut sockets: Vec<Option<Socket>> = (0..args.sockets).map(|_| None).collect();
    while let Some(done) = open.join_next().await {
        let (i, socket) = done?;
        sockets[i] = Some(socket.with_context(|| format!("opening socket {i}"))?);
    }
    eprintln!("each chat answers one message");
    let latest = answer_once(&mut sockets, chats.len()).await?;
    eprintln!("dropping every socket and resuming them all at once");
    drop(sockets);
    let started = Instant::now();
    let mut storm = tokio::task::JoinSet::new();
    for i in 0..args.sockets {
        let target = latest[i % chats.len()];
        let from = target.saturating_sub(args.back);
        let (u, src, gate) = (
            url(i, Some(from)),
            args.source_ips[i % args.source_ips.len()],
            gate.clone(),
        );
        storm.spawn(async move { resume(&u, src, &gate, from, target, started).await });
    }
    let deadline = Duration::from_secs(args.timeout);
    let mut times = hdrhistogram::Histogram::<u64>::new(3)?;
    let (mut resumed, mut errors) = (0u64, 0u64);
    while let Some(done) = tokio::time::timeout(deadline, storm.join_next())
        .await
        .context("the storm timed out")?
    {
        match done? {
            Ok(took) => {
                resumed += 1;
                times.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX))?;
            }
            Err(e) => {
                errors += 1;
                if errors <= 5 {
                    eprintln!("resume failed: {e:#}");
                }
            }
        }
    }
    let ms = |q: f64| times.value_at_quantile(q) as f64 / 1000.0;
    let report = json!({
        "mode": "storm",
        "sockets": args.sockets,
        "chats": args.chats,
        "back": args.back,
        "resumed": resumed,
        "errors": errors,
        "resume_ms_p50": ms(0.5),
        "resume_ms_p99": ms(0.99),
        "resume_ms_max": times.max() as f64 / 1000.0,
        "all_resumed_ms": started.elapsed().as_millis(),
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.report {
        std::fs::write(path, text)?;
    }
    if errors > 0 {
        bail!("{errors} sockets did not resume");
    }
    Ok(())
}

/// Opens a socket and waits for `connection_established`.
async fn hold(url: &str, source: IpAddr, gate: &Semaphore) -> anyhow::Result<Socket> {
    let mut ws = {
        let _permit = gate.acquire().await?;
        connect_from(url, source).await?
    };
    let hello = next_event(&mut ws).await?;
    if hello["event_type"] != "connection_established" {
        bail!("refused: {hello}");
    }
    Ok(ws)
}

/// Each chat's first socket sends one message; every socket reads until its chat's answer
/// ended. Returns each chat's latest `seq`.
async fn answer_once(sockets: &mut [Option<Socket>], chats: usize) -> anyhow::Result<Vec<u64>> {
    for ws in sockets.iter_mut().take(chats).flatten() {
        ws.send(Message::text(
            json!({"content": "storm warm-up"}).to_string(),
        ))
        .await?;
    }
    let mut latest = vec![0; chats];
    let reads = sockets.iter_mut().enumerate().map(|(i, ws)| async move {
        let ws = ws.as_mut().context("socket")?;
        loop {
            let e = next_event(ws).await?;
            if e["event_type"] == "message_stream_ended" {
                return anyhow::Ok((i, e["seq"].as_u64().unwrap_or(0)));
            }
        }
    });
    for done in futures_util::future::join_all(reads).await {
        let (i, seq) = done?;
        latest[i % chats] = latest[i % chats].max(seq);
    }
    Ok(latest)
}

/// Reconnects with `last_seq = from` and reads until `target`: every `seq` in order, no error.
async fn resume(
    url: &str,
    source: IpAddr,
    gate: &Semaphore,
    from: u64,
    target: u64,
    started: Instant,
) -> anyhow::Result<Duration> {
    let mut ws = hold(url, source, gate).await?;
    let mut expected = from + 1;
    while expected <= target {
        let e = next_event(&mut ws).await?;
        if e["event_type"] == "error" {
            bail!("error while resuming: {e}");
        }
        let Some(seq) = e["seq"].as_u64() else {
            continue;
        };
        if seq != expected {
            bail!("expected seq {expected}, got {seq}");
        }
        expected += 1;
    }
    let took = started.elapsed();
    let _ = ws.close(None).await;
    Ok(took)
}

async fn next_event(ws: &mut Socket) -> anyhow::Result<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("no event within 30 s")?
            .context("socket closed")??;
        if let Message::Text(t) = msg {
            return Ok(serde_json::from_str(&t)?);
        }
    }
}

async fn prepare(
    http: &reqwest::Client,
    args: &StormArgs,
) -> anyhow::Result<(String, Vec<String>)> {
    let settings = json!({
        "max_connections": args.sockets * 2 + 100,
        "messages_per_second": 1000,
        "requests_per_minute": 1_000_000,
        "agent": {"provider": "mock", "options": {"reply_tokens": 5}},
    });
    let key = setup::create_tenant(http, &args.url, &args.admin_token, "storm", settings).await?;
    let mut chats = Vec::with_capacity(args.chats);
    for i in 0..args.chats {
        chats.push(setup::create_chat(http, &args.url, &key, &format!("storm-{i}")).await?);
    }
    Ok((key, chats))
}
