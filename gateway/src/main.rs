//! The `gateway` binary: parse the command line, load configuration, run.

use clap::Parser;
use gateway::cli::{Cli, run};
use shared::{config::Config, telemetry::TraceExport};

/// jemalloc, configured in `.cargo/config.toml` to return freed pages promptly: it keeps the
/// memory of idle sockets low after connect storms.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load()?;
    let export = TraceExport::from_config(config.otlp_endpoint.as_deref());
    // Flushes the spans still queued when main returns.
    let _telemetry = shared::telemetry::init(&config.log, export, "parley-gateway")?;
    run(cli, config).await
}
