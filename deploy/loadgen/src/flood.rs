//! `loadgen flood`: a handshake flood, as from a botnet guessing keys, with a real client
//! beside it.
//!
//! For `--duration` seconds, upgrades with made-up keys (well-formed `pk_` + 64 random hex,
//! so that each one would cost a store lookup) arrive at `--rate` per second, spread over
//! `--source-ips`, written over plain TCP as a key guesser would (no WebSocket library, the
//! close frame never answered); each is read until the server closes it. Meanwhile a real
//! client opens a socket with a valid key every `--probe-ms` and times its handshake, from the
//! TCP connect to `connection_established`. The report gives the flood's achieved rate and how
//! it was refused (`AUTH_ERROR`, or `RATE_LIMITED` once an address is throttled, after the
//! upgrade; `HTTP <status>` before it; other), and the real handshakes' p50/p99/max.
//! `--rate 0` measures the real handshakes alone, for comparison.

use std::{
    collections::BTreeMap,
    io::Cursor,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
    sync::{Mutex, Semaphore},
};
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::frame::{
        FrameHeader,
        coding::{Data, OpCode},
    },
};

use crate::{setup, socket::connect_from};

/// `loadgen flood` options.
#[derive(Debug, Clone, clap::Args)]
pub struct FloodArgs {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Admin token: the real client's tenant is created with it.
    #[arg(
        long,
        env = "PARLEY_ADMIN_TOKEN",
        default_value = "",
        hide_default_value = true
    )]
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
    /// The flood alone: no tenant, no chat, no real client (its chat id made up too), so that
    /// it can hit any server, such as `examples/bare_refuser.rs`, the cost floor.
    #[arg(long)]
    pub no_probe: bool,
    /// Also write the JSON report here.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
}

/// Runs the flood and the probe, and prints the report.
pub async fn run(args: FloodArgs) -> anyhow::Result<()> {
    let (real, chat) = if args.no_probe {
        (None, "00000000-0000-4000-8000-000000000000".to_owned())
    } else {
        let http = reqwest::Client::new();
        let settings = json!({"max_connections": 100_000, "requests_per_minute": 1_000_000});
        let key =
            setup::create_tenant(&http, &args.url, &args.admin_token, "flood", settings).await?;
        let chat = setup::create_chat(&http, &args.url, &key, "probe").await?;
        let ws_base = args.url.replacen("http", "ws", 1);
        let real = format!("{ws_base}/ws/chat?api_key={key}&user_id=probe&chat_id={chat}");
        (Some(real), chat)
    };
    let fake = format!("/ws/chat?user_id=x&chat_id={chat}&api_key=");
    let until = Instant::now() + Duration::from_secs(args.duration);
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let flood = tokio::spawn(flood(args.clone(), fake, until, outcomes.clone()));
    let probe = match &real {
        Some(real) => probe(&args, real, until).await?,
        None => {
            tokio::time::sleep_until(until.into()).await;
            Value::Null
        }
    };
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
    path: String,
    until: Instant,
    outcomes: Arc<Mutex<BTreeMap<String, u64>>>,
) -> anyhow::Result<u64> {
    if args.rate <= 0.0 {
        return Ok(0);
    }
    let target = Arc::new(Target::of(&args.url).await?);
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
        let request = target.upgrade(&path, &hex::encode(rand::random::<[u8; 32]>()));
        let target = target.clone();
        let source = args.source_ips[sent as usize % args.source_ips.len()];
        let outcomes = outcomes.clone();
        tasks.spawn(async move {
            let outcome = refused_with(&request, target.addr, source).await;
            drop(permit);
            *outcomes.lock().await.entry(outcome).or_default() += 1;
        });
        sent += 1;
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Ok(sent)
}

/// Where the flood goes: the gateway's address and its `Host`.
struct Target {
    addr: SocketAddr,
    host: String,
}

impl Target {
    async fn of(url: &str) -> anyhow::Result<Self> {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let host = rest.split('/').next().context("host in --url")?.to_owned();
        let addr = tokio::net::lookup_host(&host)
            .await?
            .next()
            .context("an address for --url")?;
        Ok(Self { addr, host })
    }

    /// A well-formed WebSocket upgrade of `path` with the made-up key `pk_<hex>`.
    fn upgrade(&self, path: &str, hex: &str) -> String {
        format!(
            "GET {path}pk_{hex} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: {}\r\n\r\n",
            self.host,
            tokio_tungstenite::tungstenite::handshake::client::generate_key()
        )
    }
}

/// The error code a made-up upgrade was refused with (or what went wrong instead).
///
/// Sent as a key guesser would: the upgrade request written over plain TCP, the answer read
/// until the server closes, nothing answered (not even the close frame), no WebSocket library
/// in between. Then its first text frame tells why.
async fn refused_with(request: &str, target: SocketAddr, source: IpAddr) -> String {
    let exchange = async {
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let mut tcp = socket.connect(target).await?;
        tcp.write_all(request.as_bytes()).await?;
        let mut answer = Vec::with_capacity(512);
        // A refusal is a few hundred bytes, then the server hangs up; a socket that was let in
        // stays open, so it is told apart as soon as it says so.
        while answer.len() < 64 * 1024 && tcp.read_buf(&mut answer).await? > 0 {
            if outcome(&answer) == "ACCEPTED" {
                break;
            }
        }
        std::io::Result::Ok(outcome(&answer))
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => "connect_failed".into(),
        Err(_) => "connect_timed_out".into(),
    }
}

/// `HTTP <status>` for a refusal before the upgrade; after it, the first text frame's
/// `error_code` (`ACCEPTED` for `connection_established`).
fn outcome(answer: &[u8]) -> String {
    let Some(head_end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return "closed_without_error".into();
    };
    let status = String::from_utf8_lossy(&answer[..head_end])
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    if status != "101" {
        return format!("HTTP {status}");
    }
    let mut frames = Cursor::new(&answer[head_end + 4..]);
    while let Ok(Some((header, len))) = FrameHeader::parse(&mut frames) {
        let at = usize::try_from(frames.position()).unwrap_or(usize::MAX);
        let Some(payload) = frames.get_ref().get(at..at.saturating_add(len as usize)) else {
            break;
        };
        if header.opcode == OpCode::Data(Data::Text) {
            let v: Value = serde_json::from_slice(payload).unwrap_or_default();
            if let Some(code) = v["error_code"].as_str() {
                return code.to_owned();
            }
            if v["event_type"] == "connection_established" {
                return "ACCEPTED".into();
            }
        }
        frames.set_position(frames.position() + len);
    }
    "closed_without_error".into()
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;

    fn upgraded(frames: Vec<Frame>) -> anyhow::Result<Vec<u8>> {
        let mut answer = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n".to_vec();
        for frame in frames {
            frame.format(&mut answer)?;
        }
        Ok(answer)
    }

    #[test]
    fn refusals_are_read_from_the_raw_answer() -> anyhow::Result<()> {
        let text = |s: &str| Frame::message(s.to_owned(), OpCode::Data(Data::Text), true);
        let refused = upgraded(vec![
            Frame::ping(vec![1]),
            text(r#"{"event_type":"error","error_code":"RATE_LIMITED"}"#),
            Frame::close(None),
        ])?;
        assert_eq!(outcome(&refused), "RATE_LIMITED");
        let accepted = upgraded(vec![text(r#"{"event_type":"connection_established"}"#)])?;
        assert_eq!(outcome(&accepted), "ACCEPTED");
        assert_eq!(
            outcome(&upgraded(vec![Frame::close(None)])?),
            "closed_without_error"
        );
        assert_eq!(
            outcome(b"HTTP/1.1 429 Too Many Requests\r\n\r\n{}"),
            "HTTP 429"
        );
        assert_eq!(outcome(b""), "closed_without_error");
        // A frame cut short by the server hanging up is not read past its end.
        let mut cut = refused.clone();
        cut.truncate(refused.len() - 40);
        assert_eq!(outcome(&cut), "closed_without_error");
        Ok(())
    }
}
