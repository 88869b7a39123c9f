//! The `gateway` command line: serve (default), migrate, and tenant administration that works
//! directly against the configured database, so an operator needs no HTTP client to bootstrap.

use clap::{Parser, Subcommand};
use serde_json::Value;
use shared::{config::Config, store};
use uuid::Uuid;

use crate::{startup::Application, tenants};

/// Parley gateway.
#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "Parley: a real-time gateway for AI chat"
)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
}

/// Tenant commands; each prints JSON.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and print it with its API key (shown only here).
    Create {
        /// Display name.
        #[arg(long)]
        name: String,
        /// Settings as JSON, e.g. '{"max_connections": 500}'.
        #[arg(long)]
        settings: Option<String>,
    },
    /// List tenants.
    List,
    /// Show one tenant.
    Get {
        /// Tenant id.
        id: Uuid,
    },
    /// Rename a tenant or change its settings (merged into the current ones).
    Update {
        /// Tenant id.
        id: Uuid,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// Settings to merge, as JSON.
        #[arg(long)]
        settings: Option<String>,
    },
    /// Replace a tenant's API key and print the new one.
    RotateKey {
        /// Tenant id.
        id: Uuid,
    },
    /// Delete a tenant with all its chats and messages.
    Delete {
        /// Tenant id.
        id: Uuid,
    },
}

/// Runs the parsed command line.
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Migrate => {
            store::open(&config).await?;
            println!(
                "migrations applied to {}",
                shared::config::redact_url(&config.database_url)
            );
            Ok(())
        }
        Command::Tenant(cmd) => {
            let out = tenant(cmd, &config).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let host = match config.bind.rsplit_once(':').map(|(h, _)| h) {
        None | Some("0.0.0.0" | "[::]" | "") => "127.0.0.1".to_owned(),
        Some(h) => h.to_owned(),
    };
    let app = Application::build(config).await?;
    tracing::info!(port = app.port(), "parley gateway listening");
    let base = format!("http://{host}:{}", app.port());
    println!(
        "Parley is up on {base}\n\n    Playground:    {base}/playground\n    API reference: {base}/docs\n    OpenAPI:       {base}/openapi.json\n"
    );
    let stopper = app.stopper();
    let server = tokio::spawn(app.run_until_stopped());
    shutdown_signal().await;
    tracing::info!("stop signal received; draining");
    stopper.stop().await;
    server.await??;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn json_arg(raw: Option<&str>) -> anyhow::Result<Option<Value>> {
    raw.map(|s| {
        serde_json::from_str(s).map_err(|e| anyhow::anyhow!("--settings is not valid JSON: {e}"))
    })
    .transpose()
}

async fn tenant(cmd: TenantCommand, config: &Config) -> anyhow::Result<Value> {
    let store = store::open(config).await?;
    let store = store.as_ref();
    Ok(match cmd {
        TenantCommand::Create { name, settings } => serde_json::to_value(
            tenants::create(store, &name, json_arg(settings.as_deref())?.as_ref()).await?,
        )?,
        TenantCommand::List => serde_json::to_value(store.list_tenants().await?)?,
        TenantCommand::Get { id } => serde_json::to_value(tenants::get(store, id).await?)?,
        TenantCommand::Update { id, name, settings } => {
            let settings = json_arg(settings.as_deref())?;
            serde_json::to_value(
                tenants::update(store, id, name.as_deref(), settings.as_ref()).await?,
            )?
        }
        TenantCommand::RotateKey { id } => {
            serde_json::to_value(tenants::rotate_key(store, id).await?)?
        }
        TenantCommand::Delete { id } => {
            tenants::delete(store, id).await?;
            serde_json::json!({ "success": true, "id": id })
        }
    })
}
