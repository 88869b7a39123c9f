//! Preparing a run: a tenant (created through the admin API when a token is given) and chats.

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::Args;

/// Where the sockets connect.
pub struct Target {
    ws_base: String,
    api_key: String,
    /// The chat ids.
    pub chats: Vec<String>,
}

impl Target {
    /// The socket URL for chat `i` (user `lg-<i>`).
    pub fn ws_url(&self, i: usize) -> String {
        format!(
            "{}/ws/chat?api_key={}&user_id=lg-{i}&chat_id={}",
            self.ws_base, self.api_key, self.chats[i]
        )
    }
}

/// Creates the tenant (if asked) and the chats.
pub async fn prepare(args: &Args) -> anyhow::Result<Target> {
    let http = reqwest::Client::new();
    let api_key = match (&args.api_key, &args.admin_token) {
        (Some(key), _) => key.clone(),
        (None, Some(token)) => {
            let settings = json!({
                "max_connections": args.sockets + 100,
                "messages_per_second": 10_000,
                "requests_per_minute": 1_000_000,
                "max_concurrent_answers": args.concurrent_answers,
                "max_queued_messages": 1_000_000,
                "agent": {"provider": "mock", "options": {
                    "reply_tokens": args.reply_tokens,
                    "token_delay_ms": args.token_delay_ms,
                }},
            });
            create_tenant(&http, &args.url, token, "loadgen", settings).await?
        }
        (None, None) => bail!("give --admin-token (or PARLEY_ADMIN_TOKEN) or --api-key"),
    };
    let mut chats = Vec::with_capacity(args.chats);
    for i in 0..args.chats {
        chats.push(create_chat(&http, &args.url, &api_key, &format!("lg-{i}")).await?);
    }
    let ws_base = args.url.replacen("http", "ws", 1);
    Ok(Target {
        ws_base,
        api_key,
        chats,
    })
}

/// Creates a tenant through the admin API; returns its key.
///
/// Tenant names are unique, and a run may meet the tenants of earlier runs on the same database,
/// so the name gets the time and the process id (`loadgen-1764669600123-4242`).
pub async fn create_tenant(
    http: &reqwest::Client,
    url: &str,
    admin_token: &str,
    name: &str,
    settings: Value,
) -> anyhow::Result<String> {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = format!("{name}-{millis}-{}", std::process::id());
    let res = http
        .post(format!("{url}/admin/v1/tenants"))
        .bearer_auth(admin_token)
        .json(&json!({"name": name, "settings": settings}))
        .send()
        .await
        .with_context(|| format!("creating the {name} tenant"))?;
    if !res.status().is_success() {
        bail!("creating the tenant failed: {}", res.text().await?);
    }
    let body: Value = res.json().await?;
    Ok(body["api_key"]
        .as_str()
        .context("api_key in the response")?
        .to_owned())
}

/// Creates a chat for `user_id`; returns its id.
pub async fn create_chat(
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    user_id: &str,
) -> anyhow::Result<String> {
    let res = http
        .post(format!("{url}/api/v1/chats/"))
        .header("X-API-Key", api_key)
        .json(&json!({"user_id": user_id}))
        .send()
        .await?;
    if res.status().as_u16() != 201 {
        bail!("creating a chat failed: {}", res.text().await?);
    }
    let body: Value = res.json().await?;
    Ok(body["id"].as_str().context("chat id")?.to_owned())
}
