//! One load socket: connect (from a chosen source address), then send and/or check events.
//!
//! A socket never ends the run without a result: a refused handshake is counted by its error
//! code (and the socket still reports to the start barrier, so the others go on), and a socket
//! closed before its answers are all in (1012 from a draining gateway, 1013, a dropped
//! connection) reconnects as a real client would, resuming with `last_seq` and resending its
//! unacknowledged messages under the same `client_message_id` (saved once), up to
//! [`MAX_RECONNECTS`] times with backoff. The stop signal (the run's deadline, Ctrl-C) ends it
//! at once with what it has.
//!
//! A reconnect storm (`--storm-at`) closes the storm's sockets at once, cleanly (a close
//! frame, then the server's), and each reconnects at once with `last_seq`, as clients do when
//! their gateway goes: the time from the close to `connection_established` again is
//! `storm_reconnect_ms`, and the resumed stream is checked as any other (no gap, no duplicate,
//! tokens adding up to the ended message).

use std::{
    borrow::Cow,
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::{
    net::TcpSocket,
    sync::{Barrier, Semaphore, mpsc, watch},
};
use tokio_tungstenite::tungstenite::{Message, protocol::CloseFrame};

use crate::{live::Live, stats::Report};

/// Reconnections a socket tries before it gives up on its chat.
pub const MAX_RECONNECTS: u64 = 10;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

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
    /// An answer that ends within this long of its message counts towards goodput.
    pub goodput_within: Duration,
    /// The run's live counters.
    pub live: Arc<Live>,
    /// Whether this socket takes part in the run's reconnect storms (`--storm-at`).
    pub storms: bool,
    /// When this socket is due to open (`--connect-rate`); `None` opens it as soon as the
    /// connect gate lets it.
    pub open_at: Option<tokio::time::Instant>,
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
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    error_code: Option<Cow<'a, str>>,
}

/// Opens a socket to `ws_url` from the local address `source`.
pub async fn connect_from(ws_url: &str, source: IpAddr) -> anyhow::Result<Ws> {
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

/// How a connect failed, as `connect` and the OS error's kind (`connect:ConnectionRefused`,
/// `connect:AddrInUse`, ...), or `connect:websocket` when TCP connected but the upgrade failed.
fn connect_failure(e: &anyhow::Error) -> String {
    let io = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>());
    match io {
        Some(io) => format!("connect:{:?}", io.kind()),
        None if e
            .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
            .is_some() =>
        {
            "connect:websocket".to_owned()
        }
        None => "connect".to_owned(),
    }
}

/// Connects and waits for `connection_established`; a refusal is counted in `report` by its
/// error code (`connect:…` when no socket opened, `closed` when it closed without a word). Its
/// connect latency counts from `due` (a scheduled first open) or from now.
async fn open(
    plan: &Plan,
    last_seq: Option<u64>,
    due: Option<tokio::time::Instant>,
    report: &mut Report,
) -> Option<Ws> {
    let url = match last_seq {
        Some(seq) => format!("{}&last_seq={seq}", plan.ws_url),
        None => plan.ws_url.clone(),
    };
    let started = due.map_or_else(Instant::now, tokio::time::Instant::into_std);
    let mut ws = match connect_from(&url, plan.source).await {
        Ok(ws) => ws,
        Err(e) => {
            Report::count(&mut report.refused, &connect_failure(&e));
            Live::add(&plan.live.errors);
            return None;
        }
    };
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(e) = serde_json::from_str::<Event>(&text) else {
            report.violations += 1;
            continue;
        };
        match e.event_type.as_ref() {
            "connection_established" => {
                report.connect_us.record(started.elapsed());
                plan.live
                    .open
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Some(ws);
            }
            "error" => {
                Report::count(
                    &mut report.refused,
                    e.error_code.as_deref().unwrap_or("error"),
                );
                Live::add(&plan.live.errors);
                return None;
            }
            _ => {}
        }
    }
    Report::count(&mut report.refused, "closed");
    Live::add(&plan.live.errors);
    None
}

/// The sender's bookkeeping: sends by content, then by message id, for latency.
#[derive(Default)]
struct Pending {
    sent: usize,
    /// Sent, not yet acknowledged: content → (frame, sent at).
    unacked: HashMap<String, (String, Instant)>,
    by_id: HashMap<String, Instant>,
}

/// The answer being streamed to this socket.
#[derive(Default)]
struct Answer {
    id: Option<String>,
    /// The user message it answers.
    reply_to: Option<String>,
    text: String,
    /// When its message was sent (the sender's own answers only).
    sent_at: Option<Instant>,
    awaiting_first_token: bool,
    last_token_at: Option<Instant>,
}

/// Runs the socket to completion (or until `stop`) and reports what it saw: opens it (on its
/// schedule, through the connect `gate`), meets the others at `ready`, and starts on `go`.
pub async fn run(
    plan: Plan,
    mut pace: Option<mpsc::Receiver<()>>,
    ready: Arc<Barrier>,
    mut go: watch::Receiver<bool>,
    gate: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    mut storm: watch::Receiver<u64>,
) -> anyhow::Result<Report> {
    let mut report = Report::new()?;
    let opened = {
        if let Some(due) = plan.open_at {
            tokio::time::sleep_until(due).await;
        }
        // Waiting for the gate delays a scheduled socket as the server's slowness would.
        let _permit = gate.acquire().await?;
        open(&plan, None, plan.open_at, &mut report).await
    };
    // Always: the run goes on with the sockets that did open, once every process's are open
    // (or some never will; a closed `go` starts it too).
    ready.wait().await;
    let _ = go.wait_for(|&go| go).await;
    let Some(ws) = opened else { return Ok(report) };
    report.sockets = 1;
    let (mut tx, mut rx) = ws.split();
    if plan.idle {
        tokio::select! {
            _ = async { while rx.next().await.is_some() {} } => {}
            _ = stop.changed() => {}
        }
        return Ok(report);
    }
    let mut pending = Pending::default();
    let mut answer = Answer::default();
    let mut last_seq: Option<u64> = None;
    let mut connected = true;
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
            Ok(()) = storm.changed(), if plan.storms => {
                let at = Instant::now();
                let _ = tx.close().await;
                // The server's close: the old socket (and its connection slot) is gone.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Some(Ok(_)) = rx.next().await {}
                })
                .await;
                plan.live.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                let Some(ws) = open(&plan, last_seq, None, &mut report).await else {
                    connected = false;
                    break;
                };
                report.storm_us.record(at.elapsed());
                (tx, rx) = ws.split();
                resend_unacked(&mut pending, &mut tx).await?;
                continue;
            }
            _ = stop.changed() => break,
        };
        let received = match msg {
            Some(Ok(Message::Text(text))) => Ok(text),
            Some(Ok(Message::Close(frame))) => Err(close_code(frame.as_ref())),
            None | Some(Err(_)) => Err(1006),
            Some(Ok(_)) => continue,
        };
        let text = match received {
            Ok(text) => text,
            Err(code) => {
                connected = false;
                if !closed(&plan, code, &mut report) {
                    break;
                }
                let Some(ws) = reopen(&plan, last_seq, &mut report, &mut stop).await else {
                    break;
                };
                connected = true;
                (tx, rx) = ws.split();
                resend_unacked(&mut pending, &mut tx).await?;
                continue;
            }
        };
        let Ok(e) = serde_json::from_str::<Event>(&text) else {
            report.violations += 1;
            continue;
        };
        if let Some(seq) = e.seq.filter(|_| e.event_type != "connection_established") {
            // Each chat event is the one after the last: no gap, no duplicate, across resumes.
            report.violations += u64::from(last_seq.is_some_and(|last| seq != last + 1));
            last_seq = Some(seq);
        } else if e.event_type == "connection_established" {
            last_seq = last_seq.or(e.seq);
        }
        let ended = on_event(&plan, &e, &mut pending, &mut answer, &mut report);
        if ended && plan.sender && !plan.paced && pending.sent < plan.messages {
            send_next(&plan, &mut pending, &mut tx).await?;
        }
    }
    if connected {
        let _ = tx.close().await;
        plan.live
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(report)
}

/// Handles one chat event; true when it ended an answer.
fn on_event(
    plan: &Plan,
    e: &Event<'_>,
    pending: &mut Pending,
    answer: &mut Answer,
    report: &mut Report,
) -> bool {
    match e.event_type.as_ref() {
        "message_received" if plan.sender => {
            let content = e.content.as_deref().unwrap_or_default();
            if let (Some((_, at)), Some(id)) = (pending.unacked.remove(content), &e.message_id) {
                report.ack_us.record(at.elapsed());
                Live::add(&plan.live.messages);
                pending.by_id.insert(id.clone(), at);
            }
        }
        "message_stream_started" => {
            // A restarted answer (its worker died) starts again under the same id.
            let restart = answer.id.is_some() && e.message_id == answer.id;
            report.violations += u64::from(answer.id.is_some() && !restart);
            let sent_at = e
                .reply_to
                .as_ref()
                .and_then(|r| pending.by_id.get(r).copied());
            *answer = Answer {
                id: e.message_id.clone(),
                reply_to: e.reply_to.clone(),
                sent_at: sent_at.or(if restart { answer.sent_at } else { None }),
                awaiting_first_token: !restart || answer.awaiting_first_token,
                ..Answer::default()
            };
        }
        "message_stream_token" => {
            report.violations += u64::from(answer.id.is_none());
            report.tokens += 1;
            Live::add(&plan.live.tokens);
            answer.text.push_str(e.token.as_deref().unwrap_or_default());
            let now = Instant::now();
            if let Some(prev) = answer.last_token_at.replace(now) {
                report.itl_us.record(now - prev);
            }
            if std::mem::take(&mut answer.awaiting_first_token)
                && let Some(at) = answer.sent_at
            {
                report.ttft_us.record(at.elapsed());
                plan.live.ttft(at.elapsed());
            }
        }
        "message_stream_ended" => {
            report.violations += u64::from(
                answer.id.is_none() || e.content.as_deref() != Some(answer.text.as_str()),
            );
            if let Some(at) = answer.sent_at {
                let e2e = at.elapsed();
                report.e2e_us.record(e2e);
                report.good_answers += u64::from(e2e <= plan.goodput_within);
            }
            if let Some(r) = &answer.reply_to {
                pending.by_id.remove(r);
            }
            *answer = Answer::default();
            report.answers += 1;
            Live::add(&plan.live.answers);
            return true;
        }
        "error" => {
            let code = e.error_code.as_deref().unwrap_or("error");
            Report::count(&mut report.errors, code);
            Live::add(&plan.live.errors);
            // The events after last_seq are gone: the answer in progress cannot be checked.
            if code == "RESUME_UNAVAILABLE" {
                *answer = Answer::default();
            }
        }
        _ => {}
    }
    false
}

fn close_code(frame: Option<&CloseFrame>) -> u16 {
    frame.map_or(1005, |f| u16::from(f.code))
}

/// Counts a close; true when a client would reconnect after it (not after a refusal).
fn closed(plan: &Plan, code: u16, report: &mut Report) -> bool {
    Report::count(&mut report.errors, &format!("closed_{code}"));
    Live::add(&plan.live.errors);
    plan.live
        .open
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    // Counted open again only once a reconnect succeeds (in `open`).
    !matches!(code, 1008 | 1009) && report.reconnects < MAX_RECONNECTS
}

/// Reconnects with `last_seq`, with backoff (0.1 s doubling to 2 s), until it opens, the
/// attempts are spent, or the run stops.
async fn reopen(
    plan: &Plan,
    last_seq: Option<u64>,
    report: &mut Report,
    stop: &mut watch::Receiver<bool>,
) -> Option<Ws> {
    let mut backoff = Duration::from_millis(100);
    while report.reconnects < MAX_RECONNECTS {
        report.reconnects += 1;
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return None,
        }
        if let Some(ws) = open(plan, last_seq, None, report).await {
            return Some(ws);
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    None
}

async fn resend_unacked<S>(pending: &mut Pending, tx: &mut S) -> anyhow::Result<()>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    for (frame, _) in pending.unacked.values() {
        // A failure here is the next close, handled by the loop.
        if tx.send(Message::text(frame.clone())).await.is_err() {
            break;
        }
    }
    Ok(())
}

async fn send_next<S>(plan: &Plan, pending: &mut Pending, tx: &mut S) -> anyhow::Result<()>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let content = format!("lg-{}-{}", plan.chat_index, pending.sent);
    // The content doubles as the idempotency key: a resend after a reconnect is saved once.
    let frame = serde_json::json!({ "content": content, "client_message_id": content }).to_string();
    pending.sent += 1;
    pending
        .unacked
        .insert(content, (frame.clone(), Instant::now()));
    if tx.send(Message::text(frame)).await.is_err() {
        // Closed under us: the frame stays unacknowledged and goes again after the reconnect.
        return Ok(());
    }
    Ok(())
}
