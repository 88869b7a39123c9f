//! `loadgen drill`: fault drills against a running deployment.
//!
//! Each drill drives chats (one resilient client per chat, spread over the given gateways) while
//! it runs a fault command (kill a gateway, a worker, Redis, the pub/sub connections) and later
//! an optional recovery command (start it again). Clients behave as the seed page tells them to:
//! on a lost connection they wait a second and reconnect, here to the next gateway, resuming with
//! `last_seq`; a message not yet acknowledged is sent again with the same `client_message_id`.
//! After the drill every acknowledged message is checked against the saved history. The report
//! (one JSON object per drill) gives: acknowledged, answered, lost, answered twice, answers whose
//! client text differs from the saved one (tokens lost or duplicated on resume), events seen
//! twice, `RESUME_UNAVAILABLE`s, reconnects, and the time from the fault to the first answer
//! completed after it (per chat: median and maximum). The exit code is 1 when any drill lost,
//! doubled or garbled an answer.

mod client;

use crate::setup;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// `loadgen drill` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DrillArgs {
    /// Gateway base URLs, comma-separated; clients spread over them and reconnect to the next.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8000")]
    pub urls: Vec<String>,
    /// Admin token: the drill creates its own tenant.
    #[arg(long, env = "PARLEY_ADMIN_TOKEN")]
    pub admin_token: String,
    /// A drill as `NAME|FAULT COMMAND[|RECOVERY COMMAND]` (shell commands); repeatable.
    #[arg(long = "drill", required = true)]
    pub drills: Vec<String>,
    /// Chats driven at once.
    #[arg(long, default_value_t = 20)]
    pub chats: usize,
    /// Messages each chat sends per drill, one after the other's answer.
    #[arg(long, default_value_t = 4)]
    pub messages: usize,
    /// Tokens per answer (mock model).
    #[arg(long, default_value_t = 30)]
    pub reply_tokens: u32,
    /// Milliseconds between tokens (mock model), so that faults hit answers mid-stream.
    #[arg(long, default_value_t = 20)]
    pub token_delay_ms: u64,
    /// Milliseconds after the drill starts when the fault command runs.
    #[arg(long, default_value_t = 700)]
    pub fault_after_ms: u64,
    /// Milliseconds after the fault when the recovery command runs.
    #[arg(long, default_value_t = 1000)]
    pub recover_after_ms: u64,
    /// Milliseconds a client waits before reconnecting.
    #[arg(long, default_value_t = 1000)]
    pub backoff_ms: u64,
    /// Seconds a drill may take before what is missing counts as lost.
    #[arg(long, default_value_t = 90)]
    pub timeout: u64,
}

/// One drill as given on the command line.
struct Drill {
    name: String,
    fault: String,
    recovery: Option<String>,
}

fn parse_drill(spec: &str) -> anyhow::Result<Drill> {
    let mut parts = spec.splitn(3, '|');
    let name = parts.next().unwrap_or_default().trim().to_owned();
    let fault = parts.next().context("a drill needs NAME|FAULT COMMAND")?;
    if name.is_empty() {
        bail!("a drill needs a name: {spec}");
    }
    Ok(Drill {
        name,
        fault: fault.to_owned(),
        recovery: parts.next().map(str::to_owned),
    })
}

/// Runs every drill in turn; prints one JSON report per drill.
pub async fn run(args: DrillArgs) -> anyhow::Result<()> {
    let drills: Vec<Drill> = args
        .drills
        .iter()
        .map(|s| parse_drill(s))
        .collect::<anyhow::Result<_>>()?;
    let http = reqwest::Client::new();
    let key = create_tenant(&http, &args).await?;
    let mut failed = false;
    for drill in &drills {
        let report = run_drill(&http, &args, &key, drill).await?;
        failed |= [
            "lost",
            "answered_twice",
            "differing_from_saved",
            "duplicate_events",
        ]
        .iter()
        .any(|k| report[k].as_u64().unwrap_or(0) > 0);
        println!("{report}");
    }
    if failed {
        bail!("a drill lost, doubled or garbled answers");
    }
    Ok(())
}

async fn run_drill(
    http: &reqwest::Client,
    args: &DrillArgs,
    key: &str,
    drill: &Drill,
) -> anyhow::Result<Value> {
    let base = args.urls.first().context("at least one --urls")?;
    let mut chats = Vec::with_capacity(args.chats);
    for i in 0..args.chats {
        chats.push(setup::create_chat(http, base, key, &format!("drill-{i}")).await?);
    }
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for (i, chat) in chats.iter().enumerate() {
        let plan = client::Plan {
            urls: args.urls.clone(),
            first: i % args.urls.len(),
            api_key: key.to_owned(),
            chat_id: chat.clone(),
            user_id: format!("drill-{i}"),
            messages: args.messages,
            tag: format!("{}-{i}", drill.name),
            backoff: Duration::from_millis(args.backoff_ms),
            deadline: started + Duration::from_secs(args.timeout),
        };
        clients.spawn(client::run(plan));
    }
    tokio::time::sleep(Duration::from_millis(args.fault_after_ms)).await;
    let fault_at = Instant::now();
    shell(&drill.fault).await?;
    if let Some(recovery) = &drill.recovery {
        tokio::time::sleep(Duration::from_millis(args.recover_after_ms)).await;
        shell(recovery).await?;
    }
    let mut tally = Tally::default();
    while let Some(done) = clients.join_next().await {
        let seen = done??;
        let saved = saved_messages(http, base, key, &seen.chat_id).await?;
        tally.add(&seen, &saved, fault_at);
    }
    Ok(tally.report(&drill.name, started.elapsed()))
}

/// Runs a shell command; its failure fails the drill.
async fn shell(command: &str) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .await?;
    if !status.success() {
        bail!("`{command}` failed: {status}");
    }
    Ok(())
}

/// What the drill's clients saw, checked against what was saved.
#[derive(Default)]
struct Tally {
    acknowledged: u64,
    answered: u64,
    answered_twice: u64,
    differing: u64,
    duplicates: u64,
    resume_unavailable: u64,
    reconnects: u64,
    recovery_ms: Vec<u64>,
}

impl Tally {
    fn add(&mut self, seen: &client::Seen, saved: &[Value], fault_at: Instant) {
        self.acknowledged += seen.acknowledged.len() as u64;
        self.duplicates += seen.duplicate_events;
        self.resume_unavailable += seen.resume_unavailable;
        self.reconnects += seen.reconnects;
        if let Some(at) = seen.ended_at.iter().find(|t| **t > fault_at) {
            self.recovery_ms
                .push(u64::try_from(at.duration_since(fault_at).as_millis()).unwrap_or(u64::MAX));
        }
        for (i, m) in saved.iter().enumerate() {
            let is_acked = m["sender_role"] == "user"
                && seen.acknowledged.iter().any(|id| m["id"] == id.as_str());
            if !is_acked {
                continue;
            }
            let answers: Vec<&Value> = saved[i + 1..]
                .iter()
                .take_while(|n| n["sender_role"] == "assistant")
                .collect();
            match answers.as_slice() {
                [] => {}
                [answer, rest @ ..] => {
                    self.answered += 1;
                    self.answered_twice += u64::from(!rest.is_empty());
                    let id = answer["id"].as_str().unwrap_or_default();
                    if let Some(text) = seen.texts.get(id) {
                        self.differing += u64::from(answer["content"] != text.as_str());
                    }
                }
            }
        }
    }

    fn report(&mut self, name: &str, took: Duration) -> Value {
        self.recovery_ms.sort_unstable();
        let median = self.recovery_ms.get(self.recovery_ms.len() / 2).copied();
        json!({
            "drill": name,
            "acknowledged": self.acknowledged,
            "answered": self.answered,
            "lost": self.acknowledged.saturating_sub(self.answered),
            "answered_twice": self.answered_twice,
            "differing_from_saved": self.differing,
            "duplicate_events": self.duplicates,
            "resume_unavailable": self.resume_unavailable,
            "reconnects": self.reconnects,
            "recovery_ms_median": median,
            "recovery_ms_max": self.recovery_ms.last(),
            "took_ms": took.as_millis(),
        })
    }
}

async fn create_tenant(http: &reqwest::Client, args: &DrillArgs) -> anyhow::Result<String> {
    let base = args.urls.first().context("at least one --urls")?;
    let settings = json!({
        "max_connections": args.chats * 4 + 100,
        "messages_per_second": 1000,
        "requests_per_minute": 1_000_000,
        "agent": {"provider": "mock", "options": {
            "reply_tokens": args.reply_tokens, "token_delay_ms": args.token_delay_ms}},
    });
    setup::create_tenant(http, base, &args.admin_token, "fault-drill", settings).await
}

/// The chat's saved messages, oldest first (retrying while the deployment recovers).
async fn saved_messages(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    chat: &str,
) -> anyhow::Result<Vec<Value>> {
    let url = format!("{base}/api/v1/chats/{chat}/messages?limit=100");
    for _ in 0..50 {
        if let Ok(res) = http.get(&url).header("X-API-Key", key).send().await
            && res.status().is_success()
        {
            let body: Value = res.json().await?;
            return Ok(body["messages"].as_array().cloned().unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("could not read the history of chat {chat}")
}
