//! The records the store keeps, in the shapes the API returns.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// A tenant's limits and model choice (API.md §3); every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TenantSettings {
    /// Sockets the tenant may hold open at once, across all gateways.
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub max_connections: u32,
    /// Chat messages per second per connection.
    #[schema(minimum = 1, maximum = 10_000)]
    pub messages_per_second: u32,
    /// REST requests per minute, across all gateways.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub requests_per_minute: u32,
    /// Answers of this tenant streamed at once, all workers together; its other chats wait for
    /// a slot while other tenants' chats start at once (the workers' fairness between tenants).
    #[schema(minimum = 1, maximum = 100_000)]
    pub max_concurrent_answers: u32,
    /// Messages saved and waiting for their answer, all gateways together; one more is refused
    /// with `RATE_LIMITED` and not saved.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_queued_messages: u32,
    /// The model that answers this tenant's chats.
    pub agent: AgentSettings,
    /// Model tokens (prompt and answer) the tenant may use per UTC day; none: no quota.
    /// Once spent, messages are refused with `QUOTA_EXCEEDED` until midnight UTC.
    pub daily_token_quota: Option<u64>,
    /// Web origins (`https://app.example.com`, scheme, host and port only) whose pages may call
    /// the tenant API from a browser (CORS) and open its WebSockets; empty: no browser origin
    /// is allowed by CORS and any `Origin` may open a socket (API.md §6).
    #[schema(value_type = Vec<Origin>, max_items = 100)]
    pub allowed_origins: Vec<String>,
}

impl Default for TenantSettings {
    fn default() -> Self {
        Self {
            max_connections: 50,
            messages_per_second: 10,
            requests_per_minute: 100,
            max_concurrent_answers: 256,
            max_queued_messages: 1_000,
            agent: AgentSettings::default(),
            daily_token_quota: None,
            allowed_origins: Vec::new(),
        }
    }
}

/// Which model answers, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    /// `mock` (built in) or `openai` (an operator-configured endpoint).
    #[schema(min_length = 1, max_length = 64, pattern = r"^[a-z0-9_-]+$")]
    pub provider: String,
    /// The model name passed to the provider.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F]*$"
    )]
    pub model: String,
    /// Sent first in the conversation, when set.
    #[schema(
        max_length = 8192,
        pattern = r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F]*$"
    )]
    pub system_prompt: Option<String>,
    /// Sampling temperature, when set.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    /// Upper bound on answer tokens, when set.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_tokens: Option<u32>,
    /// How many earlier messages of the chat to send as context.
    #[schema(minimum = 0, maximum = 1_000)]
    pub history_messages: u32,
    /// Provider-specific options (for `mock`: `reply_tokens`, `first_token_delay_ms`,
    /// `token_delay_ms`, `fail_after_tokens`).
    #[schema(value_type = Object)]
    pub options: Map<String, Value>,
}

/// An entry of `allowed_origins`, as its schema documents it (`scheme://host[:port]`); saved in
/// the canonical form browsers send (`HTTPS://App.Example.com:443` is saved as
/// `https://app.example.com`).
pub struct Origin;

/// `scheme://host[:port]`: an IPv4 address or a host name ending in a letter, a valid port.
const ORIGIN_PATTERN: &str = r"^https?://(((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])|([a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?\.)*[a-zA-Z]([a-zA-Z0-9-]*[a-zA-Z0-9])?)(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?$";

impl utoipa::PartialSchema for Origin {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(ORIGIN_PATTERN))
            .examples(["https://app.example.com"])
            .description(Some("A web origin: scheme, host and optional port."))
            .into()
    }
}

impl utoipa::ToSchema for Origin {}

/// A setting outside its documented range, named with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingOutOfRange(pub String);

fn within<T: PartialOrd + std::fmt::Display>(
    name: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), SettingOutOfRange> {
    if value < min || value > max {
        return Err(SettingOutOfRange(format!(
            "{name} must be between {min} and {max} (got {value})"
        )));
    }
    Ok(())
}

impl TenantSettings {
    /// Checks every setting against its documented range (README, "Configuration"): what an
    /// operator may set without one tenant's settings costing the others (a history read of a
    /// million messages, a system prompt of megabytes sent with every answer).
    pub fn check(&self) -> Result<(), SettingOutOfRange> {
        within("max_connections", self.max_connections, 0, 1_000_000)?;
        within("messages_per_second", self.messages_per_second, 1, 10_000)?;
        within(
            "requests_per_minute",
            self.requests_per_minute,
            1,
            1_000_000,
        )?;
        within(
            "max_concurrent_answers",
            self.max_concurrent_answers,
            1,
            100_000,
        )?;
        within(
            "max_queued_messages",
            self.max_queued_messages,
            1,
            1_000_000,
        )?;
        let agent = &self.agent;
        within("agent.history_messages", agent.history_messages, 0, 1_000)?;
        within("agent.provider length", agent.provider.len(), 1, 64)?;
        within("agent.model length", agent.model.len(), 1, 200)?;
        if let Some(prompt) = &agent.system_prompt {
            within("agent.system_prompt bytes", prompt.len(), 0, 32_768)?;
        }
        if let Some(t) = agent.temperature {
            within("agent.temperature", t, 0.0, 2.0)?;
        }
        if let Some(m) = agent.max_tokens {
            within("agent.max_tokens", m, 1, 1_000_000)?;
        }
        let options = serde_json::to_string(&agent.options).map_or(0, |o| o.len());
        within("agent.options bytes", options, 0, 16_384)?;
        within(
            "allowed_origins entries",
            self.allowed_origins.len(),
            0,
            100,
        )?;
        self.allowed_origins
            .iter()
            .try_for_each(|o| check_origin(o))
    }

    /// The settings with every origin in canonical form (lowercase host, no default port),
    /// or the first entry that is not an origin at all.
    pub fn normalized(mut self) -> Result<Self, SettingOutOfRange> {
        for origin in &mut self.allowed_origins {
            *origin = canonical_origin(origin)?;
        }
        Ok(self)
    }
}

/// `origin` as a browser sends it in `Origin`.
fn canonical_origin(origin: &str) -> Result<String, SettingOutOfRange> {
    let refuse = |why: &str| {
        SettingOutOfRange(format!(
            "allowed_origins entry '{origin}' {why}; write it as a browser sends Origin, e.g. https://app.example.com or http://localhost:3000"
        ))
    };
    let url = url::Url::parse(origin).map_err(|_| refuse("is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refuse("must use http or https"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(refuse("must not have a path, query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refuse("must not carry credentials"));
    }
    Ok(url.origin().ascii_serialization())
}

/// Whether `origin` is in canonical form (what [`TenantSettings::normalized`] saves).
fn check_origin(origin: &str) -> Result<(), SettingOutOfRange> {
    if canonical_origin(origin)? != origin {
        return Err(SettingOutOfRange(format!(
            "allowed_origins entry '{origin}' is not in canonical form"
        )));
    }
    Ok(())
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            provider: "mock".into(),
            model: "parley-mock-1".into(),
            system_prompt: None,
            temperature: None,
            max_tokens: None,
            history_messages: 20,
            options: Map::new(),
        }
    }
}

/// A tenant as the admin API shows it (never with its key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Tenant {
    /// Tenant id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Limits and model choice.
    pub settings: TenantSettings,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The hash of its current API key (never serialized).
    #[serde(skip)]
    pub key_hash: crate::keys::KeyHash,
}

/// A chat with its message count.
#[derive(Debug, Clone, PartialEq)]
pub struct Chat {
    /// Chat id.
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// The user it was created for.
    pub user_id: String,
    /// Title (generated when not given).
    pub title: String,
    /// Client metadata given at creation.
    pub metadata: Map<String, Value>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change (a new message counts).
    pub updated_at: DateTime<Utc>,
    /// Time of the newest message, if any.
    pub last_message_at: Option<DateTime<Utc>>,
    /// Number of messages.
    pub message_count: i64,
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The tenant's user.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The stored and wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// A saved message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `msg-<uuid>`.
    pub id: String,
    /// Its chat.
    pub chat_id: Uuid,
    /// Sender role.
    pub role: Role,
    /// The user who sent it, or on whose behalf the model answered.
    pub user_id: String,
    /// Text.
    pub content: String,
    /// For a user message, the client's metadata; for an answer, at least `model` and `tokens_used`.
    pub metadata: Map<String, Value>,
    /// For an answer, the user message it answers.
    pub reply_to: Option<String>,
    /// For a user message, the sender's idempotency key, if it sent one (API.md §4.1).
    pub client_message_id: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// A window of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Items to skip.
    pub offset: i64,
    /// Most items to return.
    pub limit: i64,
    /// Newest first when true.
    pub descending: bool,
}

impl Page {
    /// The total to report beside a page of `rows` rows, from a count taken just before the
    /// page was read: never less than the page shows. Counted first, a row added in between
    /// can only raise the page's end, so `total` and `has_more` never contradict the rows a
    /// client holds (the count and the page are two statements, each with its own snapshot).
    pub fn total_with(&self, counted: i64, rows: usize) -> i64 {
        let shown = self
            .offset
            .saturating_add(i64::try_from(rows).unwrap_or(i64::MAX));
        if rows == 0 {
            counted
        } else {
            counted.max(shown)
        }
    }
}

/// A tenant's model usage on one UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DailyUsage {
    /// The day.
    pub date: NaiveDate,
    /// Answers saved.
    pub messages: u64,
    /// Tokens sent to the model.
    pub prompt_tokens: u64,
    /// Tokens of the answers.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
}

impl DailyUsage {
    /// A row of the `tenant_usage` table.
    pub fn from_row(date: NaiveDate, messages: i64, prompt: i64, completion: i64) -> Self {
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Self {
            date,
            messages: n(messages),
            prompt_tokens: n(prompt),
            completion_tokens: n(completion),
            total_tokens: n(prompt).saturating_add(n(completion)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Page;

    #[test]
    fn a_pages_total_never_contradicts_its_rows() {
        let page = |offset| Page {
            offset,
            limit: 50,
            descending: false,
        };
        // Counted 6, then a 7th saved before the page was read: the page shows 7.
        assert_eq!(page(0).total_with(6, 7), 7);
        assert_eq!(page(0).total_with(6, 6), 6);
        // A short page past other rows keeps the count.
        assert_eq!(page(10).total_with(20, 5), 20);
        assert_eq!(page(10).total_with(12, 5), 15);
        // Nothing on the page: the count stands (the offset may be past the end).
        assert_eq!(page(100).total_with(6, 0), 6);
    }
}
