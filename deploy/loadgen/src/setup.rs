//! Preparing a run: a tenant (created through the admin API when a token is given) and chats.

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::Args;

/// Where the sockets connect.
pub struct Target {
    ws_bases: Vec<String>,
    /// The tenant's key.
    pub api_key: String,
    /// The chat ids.
    pub chats: Vec<String>,
    /// The tenant this run created (deleted at the end unless `--keep-tenant`).
    pub created_tenant: Option<String>,
}

impl Target {
    /// The socket URL for chat `i` (user `lg-<i>`), on the `n`th gateway (round robin).
    pub fn ws_url(&self, i: usize, n: usize) -> String {
        format!(
            "{}/ws/chat?api_key={}&user_id=lg-{i}&chat_id={}",
            self.ws_bases[n % self.ws_bases.len()],
            self.api_key,
            self.chats[i]
        )
    }
}

/// Deletes the tenant the run created (and with it its chats and messages).
pub async fn cleanup(args: &Args, target: &Target) -> anyhow::Result<()> {
    let (Some(id), Some(token)) = (&target.created_tenant, &args.admin_token) else {
        return Ok(());
    };
    let res = reqwest::Client::new()
        .delete(format!("{}/admin/v1/tenants/{id}", args.url[0]))
        .bearer_auth(token)
        .send()
        .await?;
    anyhow::ensure!(
        res.status().is_success(),
        "deleting the tenant: {}",
        res.status()
    );
    Ok(())
}

/// Creates the tenant (if asked) and the chats.
pub async fn prepare(args: &Args) -> anyhow::Result<Target> {
    if let (Some(path), Some(key)) = (&args.chat_ids_file, &args.api_key) {
        // A shard: the parent process made the tenant and the chats.
        let chats: Vec<String> = std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .map(str::to_owned)
            .collect();
        anyhow::ensure!(
            chats.len() == args.chats,
            "{} lists {} chats",
            path.display(),
            chats.len()
        );
        return Ok(Target {
            ws_bases: ws_bases(args),
            api_key: key.clone(),
            chats,
            created_tenant: None,
        });
    }
    let http = reqwest::Client::new();
    let url = &args.url[0];
    let mut created_tenant = None;
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
            let (id, key) = create_tenant_with_id(&http, url, token, "loadgen", settings).await?;
            created_tenant = Some(id);
            key
        }
        (None, None) => bail!("give --admin-token (or PARLEY_ADMIN_TOKEN) or --api-key"),
    };
    let mut chats = Vec::with_capacity(args.chats);
    for i in 0..args.chats {
        chats.push(create_chat(&http, url, &api_key, &format!("lg-{i}")).await?);
    }
    Ok(Target {
        ws_bases: ws_bases(args),
        api_key,
        chats,
        created_tenant,
    })
}

fn ws_bases(args: &Args) -> Vec<String> {
    args.url
        .iter()
        .map(|u| u.replacen("http", "ws", 1))
        .collect()
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
    Ok(
        create_tenant_with_id(http, url, admin_token, name, settings)
            .await?
            .1,
    )
}

/// As [`create_tenant`]; returns the tenant's id and key.
pub async fn create_tenant_with_id(
    http: &reqwest::Client,
    url: &str,
    admin_token: &str,
    name: &str,
    settings: Value,
) -> anyhow::Result<(String, String)> {
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
    let field = |name: &str| {
        body[name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("{name} in the response"))
    };
    Ok((field("id")?, field("api_key")?))
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
