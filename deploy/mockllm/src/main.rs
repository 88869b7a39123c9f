//! The `mock-llm` binary: a mock OpenAI-compatible server on the command line's address.

use std::time::Duration;

use clap::Parser;
use mockllm::{MockLlm, Settings};

/// Serves `POST /v1/chat/completions` like an OpenAI-compatible endpoint, deterministically.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Listen address.
    #[arg(long, env = "MOCK_LLM_BIND", default_value = "127.0.0.1:8090")]
    bind: String,
    /// Tokens per answer.
    #[arg(long, env = "MOCK_LLM_REPLY_TOKENS", default_value_t = 24)]
    reply_tokens: u64,
    /// Milliseconds before the first token.
    #[arg(long, env = "MOCK_LLM_FIRST_TOKEN_DELAY_MS", default_value_t = 0)]
    first_token_delay_ms: u64,
    /// Milliseconds between tokens.
    #[arg(long, env = "MOCK_LLM_TOKEN_DELAY_MS", default_value_t = 0)]
    token_delay_ms: u64,
    /// Tokens carry their send time in Unix nanoseconds (for latency benchmarks).
    #[arg(long)]
    clock_tokens: bool,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings {
        reply_tokens: args.reply_tokens,
        first_token_delay: Duration::from_millis(args.first_token_delay_ms),
        token_delay: Duration::from_millis(args.token_delay_ms),
        clock_tokens: args.clock_tokens,
    };
    let (mock, server) = MockLlm::bind(&args.bind, settings)?;
    println!("mock-llm listening on {}", mock.base_url());
    let handle = server.handle();
    // Without actix's signal handling (the library disables it for embedding), stop on
    // Ctrl-C or SIGTERM here.
    tokio::spawn(async move {
        shutdown_signal().await;
        handle.stop(true).await;
    });
    server.await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
