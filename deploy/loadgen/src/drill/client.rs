//! One drill client: a chat's socket that survives faults as a careful client would.
//!
//! It sends its messages one after another (each with a `client_message_id`, sent again after a
//! reconnect until acknowledged), follows the answers, and on a lost connection waits, then
//! reconnects to the next gateway with `last_seq`. After `RESUME_UNAVAILABLE` it reloads the
//! history, as API.md tells clients to. It records what a client would hold: the text of each
//! answer whose `message_stream_started` it saw (reset on every restart), and every `seq` seen
//! twice.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// What one client does.
pub struct Plan {
    /// Gateway base URLs.
    pub urls: Vec<String>,
    /// The gateway it starts on.
    pub first: usize,
    /// The tenant key.
    pub api_key: String,
    /// Its chat.
    pub chat_id: String,
    /// Its user.
    pub user_id: String,
    /// Messages to send.
    pub messages: usize,
    /// Names its messages and their `client_message_id`s.
    pub tag: String,
    /// Wait before reconnecting.
    pub backoff: Duration,
    /// Give up then.
    pub deadline: Instant,
}

/// What the client saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Its chat.
    pub chat_id: String,
    /// Ids of its acknowledged messages.
    pub acknowledged: Vec<String>,
    /// Answer id → the text the client holds (answers whose start it saw).
    pub texts: HashMap<String, String>,
    /// When each answer ended.
    pub ended_at: Vec<Instant>,
    /// Events whose `seq` came twice.
    pub duplicate_events: u64,
    /// `RESUME_UNAVAILABLE` errors.
    pub resume_unavailable: u64,
    /// Connections lost and opened again.
    pub reconnects: u64,
}

/// The client's progress through its messages.
struct Progress {
    next: usize,
    acked: Option<String>,
    last_seq: Option<u64>,
    seqs: HashSet<u64>,
    /// Answer id → the user message it answers.
    replies: HashMap<String, String>,
    /// Answers whose end the client saw.
    ended: HashSet<String>,
}

/// Runs the client until its messages are answered or the deadline passes.
pub async fn run(plan: Plan) -> anyhow::Result<Seen> {
    let mut seen = Seen {
        chat_id: plan.chat_id.clone(),
        ..Seen::default()
    };
    let mut p = Progress {
        next: 0,
        acked: None,
        last_seq: None,
        seqs: HashSet::new(),
        replies: HashMap::new(),
        ended: HashSet::new(),
    };
    let http = reqwest::Client::new();
    let mut gateway = plan.first;
    while p.next < plan.messages && Instant::now() < plan.deadline {
        let base = &plan.urls[gateway % plan.urls.len()];
        if session(&plan, base, &http, &mut p, &mut seen)
            .await
            .is_err()
        {
            seen.reconnects += 1;
            tokio::time::sleep(plan.backoff).await;
            gateway += 1;
        }
    }
    Ok(seen)
}

/// One connection: `Ok` once every message is answered, `Err` when the connection is lost.
async fn session(
    plan: &Plan,
    base: &str,
    http: &reqwest::Client,
    p: &mut Progress,
    seen: &mut Seen,
) -> anyhow::Result<()> {
    let mut url = format!(
        "{}/ws/chat?api_key={}&user_id={}&chat_id={}",
        base.replacen("http", "ws", 1),
        plan.api_key,
        plan.user_id,
        plan.chat_id
    );
    if let Some(n) = p.last_seq {
        url.push_str(&format!("&last_seq={n}"));
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    let hello = next_event(&mut ws, plan.deadline).await?;
    anyhow::ensure!(
        hello["event_type"] == "connection_established",
        "refused: {hello}"
    );
    if p.acked.is_none() {
        send(&mut ws, plan, p.next).await?;
    }
    while p.next < plan.messages {
        let e = next_event(&mut ws, plan.deadline).await?;
        if let Some(seq) = e["seq"].as_u64() {
            if !p.seqs.insert(seq) {
                seen.duplicate_events += 1;
                continue;
            }
            p.last_seq = p.last_seq.max(Some(seq));
        }
        if on_event(plan, p, seen, &e, base, http).await? {
            send(&mut ws, plan, p.next).await?;
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// Applies one event; true when the next message is due.
async fn on_event(
    plan: &Plan,
    p: &mut Progress,
    seen: &mut Seen,
    e: &Value,
    base: &str,
    http: &reqwest::Client,
) -> anyhow::Result<bool> {
    let id = e["message_id"].as_str().unwrap_or_default().to_owned();
    match e["event_type"].as_str().unwrap_or_default() {
        "message_received" if e["content"] == content(plan, p.next) && p.acked.is_none() => {
            seen.acknowledged.push(id.clone());
            p.acked = Some(id);
        }
        "message_stream_started" => {
            if let Some(reply_to) = e["reply_to"].as_str() {
                p.replies.insert(id.clone(), reply_to.to_owned());
            }
            seen.texts.insert(id, String::new());
        }
        "message_stream_token" => {
            if let Some(text) = seen.texts.get_mut(&id) {
                text.push_str(e["token"].as_str().unwrap_or_default());
            }
        }
        "message_stream_ended" => {
            seen.ended_at.push(Instant::now());
            p.ended.insert(id.clone());
            if p.acked.is_some() && p.replies.get(&id) == p.acked.as_ref() {
                return Ok(advance(p));
            }
        }
        "error" if e["error_code"] == "RESUME_UNAVAILABLE" => {
            seen.resume_unavailable += 1;
            // What streamed meanwhile is unknown: drop unfinished texts, reload the history.
            seen.texts.retain(|id, _| p.ended.contains(id));
            if answered_in_history(plan, p, base, http).await? {
                return Ok(advance(p));
            }
        }
        "error" if e["error_code"] == "AI_ERROR" && e.get("seq").is_some() => {
            return Ok(p.acked.is_some() && advance(p));
        }
        _ => {}
    }
    Ok(false)
}

/// Moves to the next message; true while one is left.
fn advance(p: &mut Progress) -> bool {
    p.next += 1;
    p.acked = None;
    true
}

/// Whether the acknowledged message already has a saved answer.
async fn answered_in_history(
    plan: &Plan,
    p: &Progress,
    base: &str,
    http: &reqwest::Client,
) -> anyhow::Result<bool> {
    let Some(acked) = &p.acked else {
        return Ok(false);
    };
    let url = format!("{base}/api/v1/chats/{}/messages?limit=100", plan.chat_id);
    let body: Value = http
        .get(url)
        .header("X-API-Key", &plan.api_key)
        .send()
        .await?
        .json()
        .await?;
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    Ok(messages
        .iter()
        .position(|m| m["id"] == acked.as_str())
        .and_then(|i| messages.get(i + 1))
        .is_some_and(|m| m["sender_role"] == "assistant"))
}

fn content(plan: &Plan, n: usize) -> String {
    format!("{} message {n}", plan.tag)
}

async fn send<S>(ws: &mut S, plan: &Plan, n: usize) -> anyhow::Result<()>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    if n >= plan.messages {
        return Ok(());
    }
    let frame =
        json!({"content": content(plan, n), "client_message_id": format!("{}-{n}", plan.tag)});
    ws.send(Message::text(frame.to_string())).await?;
    Ok(())
}

/// The next JSON event; `Err` when the connection ends or the deadline passes.
async fn next_event<S>(ws: &mut S, deadline: Instant) -> anyhow::Result<Value>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next()).await;
        match msg {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t)?),
            Ok(Some(Ok(Message::Close(_))) | None) => anyhow::bail!("closed"),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e.into()),
            Err(_) => anyhow::bail!("deadline passed"),
        }
    }
}
