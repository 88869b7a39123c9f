//! The `gateway` binary: parse the command line, load configuration, run.

use clap::Parser;
use gateway::cli::{Cli, run};
use shared::config::Config;

/// jemalloc, configured in `.cargo/config.toml` to return freed pages promptly: it keeps the
/// memory of idle sockets low after connect storms.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load()?;
    shared::telemetry::init(&config.log);
    run(cli, config).await
}
