//! Model endpoints: the OpenAI-compatible servers an operator lets tenants use.
//!
//! A tenant's `agent.provider` names an endpoint (or `mock`); the endpoint's URL and the name of
//! the environment variable holding its key come from here, never from a tenant. The key itself
//! is read from that variable when the worker starts and is never logged or returned.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One OpenAI-compatible Chat Completions endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelEndpoint {
    /// Base URL up to and including the version, e.g. `https://api.openai.com/v1` or
    /// `http://localhost:11434/v1` (Ollama); `/chat/completions` is appended.
    pub base_url: String,
    /// Name of the environment variable holding the API key; none (or an unset variable)
    /// sends no `Authorization` header, as local servers expect.
    pub api_key_env: Option<String>,
    /// Model used when the tenant's agent names none.
    pub default_model: Option<String>,
    /// Milliseconds to establish the TCP (and TLS) connection.
    pub connect_timeout_ms: u64,
    /// Milliseconds from sending the request to the first token.
    pub first_token_timeout_ms: u64,
    /// Longest silence, in milliseconds, between two tokens.
    pub idle_timeout_ms: u64,
    /// Retries after a connection error, a 429 or a 5xx, all before the first token.
    pub max_retries: u32,
    /// Milliseconds before the first retry; each next one waits twice as long (or what the
    /// server's `Retry-After` asks, when longer).
    pub retry_backoff_ms: u64,
    /// Characters of earlier messages sent as context at most (the newest are kept).
    pub context_budget_chars: usize,
}

impl Default for ModelEndpoint {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            api_key_env: None,
            default_model: None,
            connect_timeout_ms: 5_000,
            first_token_timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            max_retries: 2,
            retry_backoff_ms: 250,
            context_budget_chars: 32_000,
        }
    }
}

/// The endpoints of a default configuration: `openai`, keyed by `OPENAI_API_KEY`.
pub fn default_endpoints() -> BTreeMap<String, ModelEndpoint> {
    let openai = ModelEndpoint {
        api_key_env: Some("OPENAI_API_KEY".into()),
        default_model: Some("gpt-4o-mini".into()),
        ..ModelEndpoint::default()
    };
    BTreeMap::from([("openai".to_owned(), openai)])
}
