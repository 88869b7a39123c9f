//! One load socket: connect (from a chosen source address), then send and/or check events.

use std::{
    borrow::Cow,
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::{
    net::TcpSocket,
    sync::{Barrier, Semaphore, mpsc},
};
use tokio_tungstenite::tungstenite::Message;

use crate::stats::Report;

/// What one socket does.
pub struct Plan {
    /// Full socket URL.
    pub ws_url: String,
    /// Local address to connect from.
    pub source: IpAddr,
    /// Whether this socket sends its chat's messages.
    pub sender: bool,
    /// Messages (and so answers) per chat.
    pub messages: usize,
    /// The chat's index (names its messages).
    pub chat_index: usize,
    /// Sends on pace ticks instead of back to back.
    pub paced: bool,
    /// Only hold the socket open.
    pub idle: bool,
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
}

async fn connect(
    plan: &Plan,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    connect_from(&plan.ws_url, plan.source).await
}

/// Opens a socket to `ws_url` from the local address `source`.
pub async fn connect_from(
    ws_url: &str,
    source: IpAddr,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    let rest = ws_url.strip_prefix("ws://").context("ws:// URL")?;
    let host = rest.split('/').next().context("host")?;
    let addr: SocketAddr = tokio::net::lookup_host(host)
        .await?
        .next()
        .context("address")?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async(ws_url, stream).await?;
    Ok(ws)
}

/// The sender's bookkeeping: sends by content, then by message id, for latency.
#[derive(Default)]
struct Pending {
    sent: usize,
    by_content: HashMap<String, Instant>,
    by_id: HashMap<String, Instant>,
    awaiting_first_token: Option<Instant>,
}

/// Runs the socket to completion and reports what it saw.
pub async fn run(
    plan: Plan,
    mut pace: Option<mpsc::Receiver<()>>,
    ready: Arc<Barrier>,
    gate: Arc<Semaphore>,
) -> anyhow::Result<Report> {
    let ws = {
        let _permit = gate.acquire().await?;
        connect(&plan).await?
    };
    let (mut tx, mut rx) = ws.split();
    loop {
        let msg = rx
            .next()
            .await
            .context("closed before connection_established")??;
        if let Message::Text(t) = msg {
            let e: Event = serde_json::from_str(&t)?;
            anyhow::ensure!(e.event_type != "error", "refused: {t}");
            if e.event_type == "connection_established" {
                break;
            }
        }
    }
    ready.wait().await;
    let mut report = Report::new()?;
    report.sockets = 1;
    if plan.idle {
        while rx.next().await.is_some() {}
        return Ok(report);
    }
    let mut pending = Pending::default();
    let (mut in_stream, mut streamed, mut first_token) = (false, String::new(), false);
    let mut current: Option<String> = None;
    if plan.sender && !plan.paced {
        send_next(&plan, &mut pending, &mut tx).await?;
    }
    while (report.answers as usize) < plan.messages {
        let msg = tokio::select! {
            msg = rx.next() => msg,
            Some(()) = async { match pace.as_mut() { Some(p) => p.recv().await, None => None } } => {
                if pending.sent < plan.messages {
                    send_next(&plan, &mut pending, &mut tx).await?;
                }
                continue;
            }
        };
        let Some(msg) = msg else { break };
        let Message::Text(text) = msg? else { continue };
        let Ok(e) = serde_json::from_str::<Event>(&text) else {
            report.violations += 1;
            continue;
        };
        match e.event_type.as_ref() {
            "message_received" if plan.sender => {
                let content = e.content.as_deref().unwrap_or_default();
                if let (Some(at), Some(id)) = (pending.by_content.remove(content), e.message_id) {
                    Report::record(&mut report.ack_us, at.elapsed());
                    pending.by_id.insert(id, at);
                }
            }
            "message_stream_started" => {
                // A restarted answer (its worker died) starts again under the same id.
                let restart = in_stream && e.message_id == current;
                current.clone_from(&e.message_id);
                report.violations += u64::from(in_stream && !restart);
                (in_stream, first_token) = (true, true);
                streamed.clear();
                pending.awaiting_first_token = e.reply_to.and_then(|r| pending.by_id.remove(&r));
            }
            "message_stream_token" => {
                report.violations += u64::from(!in_stream);
                report.tokens += 1;
                streamed.push_str(e.token.as_deref().unwrap_or_default());
                if std::mem::take(&mut first_token)
                    && let Some(at) = pending.awaiting_first_token.take()
                {
                    Report::record(&mut report.ttft_us, at.elapsed());
                }
            }
            "message_stream_ended" => {
                report.violations +=
                    u64::from(!in_stream || e.content.as_deref() != Some(streamed.as_str()));
                in_stream = false;
                report.answers += 1;
                if plan.sender && !plan.paced && pending.sent < plan.messages {
                    send_next(&plan, &mut pending, &mut tx).await?;
                }
            }
            "error" => report.errors += 1,
            _ => {}
        }
    }
    let _ = tx.close().await;
    Ok(report)
}

async fn send_next<S>(plan: &Plan, pending: &mut Pending, tx: &mut S) -> anyhow::Result<()>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let content = format!("lg-{}-{}", plan.chat_index, pending.sent);
    let frame = serde_json::json!({ "content": content }).to_string();
    pending.by_content.insert(content, Instant::now());
    pending.sent += 1;
    tx.send(Message::text(frame)).await?;
    Ok(())
}
