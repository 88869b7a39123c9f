//! The `openai` provider: any OpenAI-compatible Chat Completions endpoint, streamed.
//!
//! One call: `POST {base_url}/chat/completions` with `stream: true` and
//! `stream_options.include_usage`, then the server-sent events read by [`super::sse`].
//!
//! - Time limits (per endpoint): connect, request to first token, silence between tokens.
//! - Retries, with doubling backoff (or the server's longer `Retry-After`), only before the
//!   first token has been produced: on connection errors, 429 and 5xx, and on a stream that
//!   breaks before its first token. Nothing is retried once a token may have reached a client.
//! - A stream that ends without `[DONE]`, breaks, stalls or carries an error object fails.
//! - Dropping the answer stream drops the HTTP response, which closes the connection: that is
//!   how a cancel stops the upstream request.
//! - The key is sent as a bearer token (a header marked sensitive) and never appears in errors
//!   or logs: upstream error bodies are logged only with the key scrubbed out.

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt, stream};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use shared::{config::ModelEndpoint, protocol::Usage};

use super::{AnswerStream, ChatRequest, Provider, ProviderError, StreamItem, sse};

/// An operator-configured endpoint.
pub struct OpenAiProvider(Arc<Endpoint>);

/// The endpoint's settings and HTTP client, shared by its calls.
struct Endpoint {
    name: String,
    url: String,
    key: Option<SecretString>,
    endpoint: ModelEndpoint,
    client: reqwest::Client,
}

impl OpenAiProvider {
    /// The provider for endpoint `name`; reads its key from the environment variable it names.
    pub fn new(name: &str, endpoint: ModelEndpoint) -> Result<Self, ProviderError> {
        Endpoint::new(name, endpoint).map(|e| Self(Arc::new(e)))
    }
}

impl Endpoint {
    fn new(name: &str, endpoint: ModelEndpoint) -> Result<Self, ProviderError> {
        let key = endpoint
            .api_key_env
            .as_deref()
            .and_then(|var| std::env::var(var).ok())
            .filter(|k| !k.is_empty())
            .map(SecretString::from);
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(endpoint.connect_timeout_ms))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ProviderError::Failed(format!("HTTP client: {e}")))?;
        Ok(Self {
            name: name.to_owned(),
            url: format!(
                "{}/chat/completions",
                endpoint.base_url.trim_end_matches('/')
            ),
            key,
            endpoint,
            client,
        })
    }

    fn model_for(&self, requested: &str) -> String {
        match &self.endpoint.default_model {
            Some(default) if requested.is_empty() => default.clone(),
            _ => requested.to_owned(),
        }
    }

    fn body(&self, request: &ChatRequest) -> Value {
        let model = self.model_for(&request.model);
        let messages: Vec<Value> = request
            .messages
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect();
        let mut body = Map::new();
        // Tenant options first, so that they can add parameters but never replace these.
        body.extend(request.options.clone());
        body.insert("model".into(), model.into());
        body.insert("messages".into(), messages.into());
        body.insert("stream".into(), true.into());
        body.insert("stream_options".into(), json!({"include_usage": true}));
        if let Some(t) = request.temperature {
            body.insert("temperature".into(), t.into());
        }
        if let Some(m) = request.max_tokens {
            body.insert("max_tokens".into(), m.into());
        }
        Value::Object(body)
    }

    /// Sends the request, retrying what may be retried; the response of a 2xx.
    async fn open(&self, body: &Value, deadline: Instant) -> Result<reqwest::Response, Failure> {
        let mut request = self.client.post(&self.url).json(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key.expose_secret());
        }
        let sent = tokio::time::timeout_at(deadline.into(), request.send()).await;
        let response = match sent {
            Err(_) => {
                return Err(Failure::fatal(
                    "no answer within the first-token time limit",
                ));
            }
            // Tenants' clients see these messages: no URL (it may name internal hosts).
            Ok(Err(e)) if e.is_connect() || e.is_request() => {
                tracing::warn!(provider = %self.name, error = %e, "model endpoint unreachable");
                return Err(Failure::retry("could not reach the model"));
            }
            Ok(Err(e)) => {
                tracing::warn!(provider = %self.name, error = %e, "model request failed");
                return Err(Failure::fatal("the model request failed"));
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        tracing::warn!(provider = %self.name, %status, body = %self.scrub(&text), "model endpoint refused");
        let message = format!("the model endpoint answered HTTP {}", status.as_u16());
        if status.as_u16() == 429 || status.is_server_error() {
            Err(Failure {
                message,
                retry: true,
                retry_after,
            })
        } else {
            Err(Failure::fatal(message))
        }
    }

    /// Text with the key (if any) replaced, for logs.
    fn scrub(&self, text: &str) -> String {
        let mut text: String = text.chars().take(500).collect();
        if let Some(key) = &self.key {
            text = text.replace(key.expose_secret(), "[redacted]");
        }
        text
    }

    fn backoff(&self, attempt: u32, asked: Option<Duration>) -> Duration {
        let base = Duration::from_millis(self.endpoint.retry_backoff_ms);
        let doubled = base.saturating_mul(2u32.saturating_pow(attempt));
        asked.map_or(doubled, |a| a.max(doubled))
    }
}

/// Why an attempt failed, and whether another may follow.
struct Failure {
    message: String,
    retry: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: false,
            retry_after: None,
        }
    }

    fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: true,
            retry_after: None,
        }
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<eventsource_stream::Event, String>> + Send>>;

/// Where a call stands.
enum Phase {
    /// Not connected yet (or connecting again), with the number of attempts made.
    Connect(u32),
    /// Reading events; `produced` once a token has gone out; the first must come by `deadline`.
    Read {
        events: Events,
        produced: bool,
        attempts: u32,
        deadline: Instant,
    },
    /// Finished: the stream returns nothing more.
    Over,
}

/// One call's state, threaded through the answer stream.
struct Call {
    provider: Arc<Endpoint>,
    body: Value,
    phase: Phase,
    finish_reason: Option<String>,
    usage: Option<Usage>,
}

impl Call {
    /// The next item of the answer stream, or `None` after the last.
    async fn next(&mut self) -> Option<Result<StreamItem, ProviderError>> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Over) {
                Phase::Over => return None,
                Phase::Connect(attempts) => {
                    if let Err(e) = self.connect(attempts).await {
                        return Some(Err(e));
                    }
                }
                Phase::Read {
                    mut events,
                    produced,
                    attempts,
                    deadline,
                } => {
                    let until = if produced {
                        Instant::now()
                            + Duration::from_millis(self.provider.endpoint.idle_timeout_ms)
                    } else {
                        deadline
                    };
                    let next = tokio::time::timeout_at(until.into(), events.next());
                    let event = match next.await {
                        Err(_) => return Some(Err(ProviderError::Timeout(timeout_kind(produced)))),
                        Ok(None) => Err("the stream ended without [DONE]".to_owned()),
                        Ok(Some(Err(e))) => {
                            tracing::warn!(provider = %self.provider.name, error = %e, "model stream broke");
                            Err("the stream broke".to_owned())
                        }
                        Ok(Some(Ok(event))) => sse::parse(&event.event, &event.data),
                    };
                    match event {
                        Err(e) if !produced && attempts <= self.provider.endpoint.max_retries => {
                            tracing::warn!(provider = %self.provider.name, error = %e, "retrying before the first token");
                            tokio::time::sleep(self.provider.backoff(attempts - 1, None)).await;
                            self.phase = Phase::Connect(attempts);
                        }
                        Err(e) => return Some(Err(ProviderError::Failed(e))),
                        Ok(chunk) => {
                            let reading = Phase::Read {
                                events,
                                produced,
                                attempts,
                                deadline,
                            };
                            if let Some(item) = self.take(chunk, reading) {
                                return Some(item);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Connects (with retries), leaving the call reading; `attempts` were made before.
    async fn connect(&mut self, mut attempts: u32) -> Result<(), ProviderError> {
        let deadline =
            Instant::now() + Duration::from_millis(self.provider.endpoint.first_token_timeout_ms);
        loop {
            attempts += 1;
            match self.provider.open(&self.body, deadline).await {
                Ok(response) => {
                    let events = response
                        .bytes_stream()
                        .eventsource()
                        .map(|e| e.map_err(|e| e.to_string()));
                    self.phase = Phase::Read {
                        events: Box::pin(events),
                        produced: false,
                        attempts,
                        deadline,
                    };
                    return Ok(());
                }
                Err(f) if f.retry && attempts <= self.provider.endpoint.max_retries => {
                    tracing::warn!(provider = %self.provider.name, error = %f.message, attempt = attempts, "retrying");
                    let wait = self.provider.backoff(attempts - 1, f.retry_after);
                    if Instant::now() + wait >= deadline {
                        return Err(ProviderError::Failed(f.message));
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(f) => return Err(ProviderError::Failed(f.message)),
            }
        }
    }

    /// Applies one chunk read in phase `reading`; `Some` when it produces an item for the
    /// answer stream.
    fn take(
        &mut self,
        chunk: sse::Chunk,
        mut reading: Phase,
    ) -> Option<Result<StreamItem, ProviderError>> {
        match chunk {
            sse::Chunk::Done => Some(Ok(StreamItem::Done {
                finish_reason: self.finish_reason.take().unwrap_or_else(|| "stop".into()),
                usage: self.usage.take(),
            })),
            sse::Chunk::Error(message) => Some(Err(ProviderError::Failed(format!(
                "the model reported an error: {}",
                self.provider.scrub(&message)
            )))),
            sse::Chunk::Data {
                content,
                finish_reason,
                usage,
            } => {
                self.finish_reason = finish_reason.or(self.finish_reason.take());
                self.usage = usage.or(self.usage.take());
                if let (Phase::Read { produced, .. }, Some(_)) = (&mut reading, &content) {
                    *produced = true;
                }
                self.phase = reading;
                content.map(|c| Ok(StreamItem::Delta(c)))
            }
        }
    }
}

fn timeout_kind(produced: bool) -> &'static str {
    if produced {
        "the model went silent between tokens"
    } else {
        "no first token within the time limit"
    }
}

impl Provider for OpenAiProvider {
    fn stream(&self, request: ChatRequest) -> AnswerStream {
        let call = Call {
            provider: self.0.clone(),
            body: self.0.body(&request),
            phase: Phase::Connect(0),
            finish_reason: None,
            usage: None,
        };
        stream::unfold(call, |mut call| async move {
            let item = call.next().await?;
            if item.is_err() {
                call.phase = Phase::Over;
            }
            Some((item, call))
        })
        .boxed()
    }

    fn model_for(&self, requested: &str) -> String {
        self.0.model_for(requested)
    }

    fn context_budget(&self) -> Option<usize> {
        Some(self.0.endpoint.context_budget_chars)
    }
}
