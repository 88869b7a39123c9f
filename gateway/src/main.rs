//! The `gateway` binary: parse the command line, load configuration, run.

use clap::Parser;
use gateway::cli::{Cli, run};
use shared::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load()?;
    shared::telemetry::init(&config.log);
    run(cli, config).await
}
