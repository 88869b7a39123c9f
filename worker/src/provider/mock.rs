//! The built-in deterministic model for demos, tests and load tests.
//!
//! Its answer is a pure function of the request (the model name and the last message), so tests
//! can predict it. Options (tenant `agent.options`): `reply_tokens` [24], `first_token_delay_ms`
//! [0], `token_delay_ms` [0], `fail_after_tokens` [none].

use std::time::Duration;

use futures_util::{StreamExt, stream};
use serde_json::{Map, Value};
use shared::{mocktext::reply_tokens, protocol::Usage};

use super::{AnswerStream, ChatRequest, Provider, ProviderError, StreamItem};

/// The `mock` provider.
pub struct MockProvider;

/// Parsed mock options.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MockOptions {
    reply_tokens: u64,
    first_token_delay: Duration,
    token_delay: Duration,
    fail_after_tokens: Option<u64>,
}

impl MockOptions {
    fn from(options: &Map<String, Value>) -> Self {
        let get = |k: &str| options.get(k).and_then(Value::as_u64);
        Self {
            reply_tokens: get("reply_tokens").unwrap_or(24),
            first_token_delay: Duration::from_millis(get("first_token_delay_ms").unwrap_or(0)),
            token_delay: Duration::from_millis(get("token_delay_ms").unwrap_or(0)),
            fail_after_tokens: get("fail_after_tokens"),
        }
    }
}

impl Provider for MockProvider {
    fn uses_history(&self) -> bool {
        false
    }

    fn stream(&self, request: ChatRequest) -> AnswerStream {
        let opts = MockOptions::from(&request.options);
        let count = request
            .max_tokens
            .map_or(opts.reply_tokens, |m| opts.reply_tokens.min(u64::from(m)));
        let emitted = opts.fail_after_tokens.map_or(count, |n| n.min(count));
        let last = request.messages.last().map_or("", |m| m.content.as_str());
        let tokens = reply_tokens(&request.model, last, emitted);
        let prompt_tokens: usize = request
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count())
            .sum();
        let usage = Usage {
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(count).unwrap_or(u32::MAX),
            total_tokens: u32::try_from(prompt_tokens as u64 + count).unwrap_or(u32::MAX),
        };
        let finish_reason = if count < opts.reply_tokens {
            "length"
        } else {
            "stop"
        };
        let done = StreamItem::Done {
            finish_reason: finish_reason.into(),
            usage: Some(usage),
        };
        let last = match opts.fail_after_tokens {
            Some(n) => Err(ProviderError::Failed(format!(
                "mock failure after {n} tokens"
            ))),
            None => Ok(done),
        };
        let items = tokens
            .into_iter()
            .map(|t| Ok(StreamItem::Delta(t)))
            .chain(std::iter::once(last));
        let zero_delay = opts.first_token_delay.is_zero() && opts.token_delay.is_zero();
        if zero_delay {
            return stream::iter(items).boxed();
        }
        stream::iter(items.enumerate())
            .then(move |(i, item)| async move {
                let delay = if i == 0 {
                    opts.first_token_delay
                } else {
                    opts.token_delay
                };
                if !delay.is_zero() && matches!(item, Ok(StreamItem::Delta(_))) {
                    tokio::time::sleep(delay).await;
                }
                item
            })
            .boxed()
    }
}
