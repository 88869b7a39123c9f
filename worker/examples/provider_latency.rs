//! Benchmark: time from a token leaving the mock OpenAI-compatible server to its event being
//! ready to leave the worker (parsed by the `openai` provider and serialized as a
//! `message_stream_token` frame).
//!
//! `cargo run --release -p worker --example provider_latency -- [streams] [tokens] [delay_ms]`
//! (defaults 50, 200, 2). The server stamps each token with its send time; both run in this
//! process, so the figure includes the loopback hop and HTTP and SSE parsing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use mockllm::{MockLlm, Settings};
use shared::{config::ModelEndpoint, protocol::ServerEvent};
use worker::provider::{ChatMessage, ChatRequest, Provider, StreamItem, openai::OpenAiProvider};

fn arg(n: usize, default: u64) -> u64 {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (streams, tokens, delay) = (arg(1, 50), arg(2, 200), arg(3, 2));
    let mock = MockLlm::start(
        "127.0.0.1:0",
        Settings {
            reply_tokens: tokens,
            token_delay: Duration::from_millis(delay),
            clock_tokens: true,
            ..Settings::default()
        },
    )?;
    let endpoint = ModelEndpoint {
        base_url: mock.base_url(),
        ..ModelEndpoint::default()
    };
    let provider = std::sync::Arc::new(OpenAiProvider::new("bench", endpoint)?);
    let chat_id = uuid::Uuid::new_v4();
    let runs = (0..streams).map(|i| {
        let provider = provider.clone();
        tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3)?;
            let request = ChatRequest {
                model: "bench".into(),
                messages: vec![ChatMessage {
                    role: "user",
                    content: format!("stream {i}"),
                }],
                temperature: None,
                max_tokens: None,
                options: serde_json::Map::new(),
            };
            let mut answer = provider.stream(request);
            while let Some(item) = answer.next().await {
                if let StreamItem::Delta(token) = item? {
                    let sent: u128 = token.trim().parse()?;
                    let frame = ServerEvent::token(chat_id, "msg-bench", token).to_frame();
                    std::hint::black_box(frame);
                    let micros = now_nanos().saturating_sub(sent) / 1_000;
                    hist.record(u64::try_from(micros)?)?;
                }
            }
            anyhow::Ok(hist)
        })
    });
    let mut all = Histogram::<u64>::new(3)?;
    for run in futures_util::future::join_all(runs).await {
        all.add(run??)?;
    }
    let q = |p: f64| all.value_at_quantile(p);
    println!(
        "{{\"streams\": {streams}, \"tokens\": {}, \"token_delay_ms\": {delay}, \"p50_us\": {}, \"p99_us\": {}, \"p999_us\": {}, \"max_us\": {}}}",
        all.len(),
        q(0.5),
        q(0.99),
        q(0.999),
        all.max()
    );
    Ok(())
}
