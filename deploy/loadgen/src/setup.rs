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
                "agent": {"provider": "mock", "options": {"reply_tokens": args.reply_tokens}},
            });
            let res = http
                .post(format!("{}/admin/v1/tenants", args.url))
                .bearer_auth(token)
                .json(&json!({"name": "loadgen", "settings": settings}))
                .send()
                .await
                .context("creating the load tenant")?;
            if !res.status().is_success() {
                bail!("creating the tenant failed: {}", res.text().await?);
            }
            let body: Value = res.json().await?;
            body["api_key"]
                .as_str()
                .context("api_key in the response")?
                .to_owned()
        }
        (None, None) => bail!("give --admin-token (or PARLEY_ADMIN_TOKEN) or --api-key"),
    };
    let mut chats = Vec::with_capacity(args.chats);
    for i in 0..args.chats {
        let res = http
            .post(format!("{}/api/v1/chats/", args.url))
            .header("X-API-Key", &api_key)
            .json(&json!({"user_id": format!("lg-{i}"), "title": format!("load {i}")}))
            .send()
            .await?;
        if res.status().as_u16() != 201 {
            bail!("creating a chat failed: {}", res.text().await?);
        }
        let body: Value = res.json().await?;
        chats.push(body["id"].as_str().context("chat id")?.to_owned());
    }
    let ws_base = args.url.replacen("http", "ws", 1);
    Ok(Target {
        ws_base,
        api_key,
        chats,
    })
}
