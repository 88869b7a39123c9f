//! Error codes shared by REST error bodies and WebSocket `error` events.

use serde::{Deserialize, Serialize};

/// Every error code a client can see (API.md §2 and §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Missing or unknown API key, or a missing handshake parameter.
    AuthError,
    /// The chat does not exist or belongs to another tenant.
    ChatNotFound,
    /// The tenant already holds `max_connections` sockets.
    ConnectionLimit,
    /// A malformed client frame.
    InvalidMessage,
    /// Message content over the configured maximum.
    MessageTooLarge,
    /// Too many messages or requests.
    RateLimited,
    /// The model failed or timed out.
    AiError,
    /// A REST request failed validation.
    InvalidRequest,
    /// A REST resource (route, user, tenant) does not exist.
    NotFound,
    /// The chat still has an open WebSocket.
    ChatInUse,
    /// The admin token is missing or wrong.
    Unauthorized,
    /// The socket fell too far behind the chat's events and is closed.
    SlowConsumer,
    /// The store or the broker is unavailable.
    ServiceUnavailable,
    /// A resume asked for events the chat log no longer holds (API.md §4.1).
    ResumeUnavailable,
    /// The tenant's daily token quota is spent.
    QuotaExceeded,
    /// Anything unexpected; details are logged, never sent.
    InternalError,
    /// A tenant of this name exists already (admin API; names are unique).
    NameTaken,
}

impl ErrorCode {
    /// The wire form (`AUTH_ERROR`, …), e.g. for WebSocket close reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthError => "AUTH_ERROR",
            Self::ChatNotFound => "CHAT_NOT_FOUND",
            Self::ConnectionLimit => "CONNECTION_LIMIT",
            Self::InvalidMessage => "INVALID_MESSAGE",
            Self::MessageTooLarge => "MESSAGE_TOO_LARGE",
            Self::RateLimited => "RATE_LIMITED",
            Self::AiError => "AI_ERROR",
            Self::InvalidRequest => "INVALID_REQUEST",
            Self::NotFound => "NOT_FOUND",
            Self::ChatInUse => "CHAT_IN_USE",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::SlowConsumer => "SLOW_CONSUMER",
            Self::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            Self::ResumeUnavailable => "RESUME_UNAVAILABLE",
            Self::QuotaExceeded => "QUOTA_EXCEEDED",
            Self::InternalError => "INTERNAL_ERROR",
            Self::NameTaken => "NAME_TAKEN",
        }
    }

    /// The default hint sent in `details.fix` for this code.
    pub fn default_fix(self) -> &'static str {
        match self {
            Self::AuthError => {
                "Check your tenant API key value. Each tenant has a unique API key in the tenants table."
            }
            Self::ChatNotFound => "Create the chat first using POST /api/v1/chats/ endpoint",
            Self::ConnectionLimit => {
                "Close unused connections or ask the operator to raise max_connections for your tenant"
            }
            Self::InvalidMessage => {
                "Send a JSON object text frame like {\"content\": \"Hello\", \"metadata\": {}}"
            }
            Self::MessageTooLarge => "Shorten the message content",
            Self::RateLimited => "Slow down and retry after the indicated delay",
            Self::AiError => "Retry the message; if it keeps failing, contact the operator",
            Self::InvalidRequest => "Correct the request as described in error_message",
            Self::NotFound => "Check the path and identifiers",
            Self::ChatInUse => "Close every WebSocket open on the chat, then retry",
            Self::Unauthorized => "Send Authorization: Bearer <admin token>",
            Self::SlowConsumer => "Read events faster, then reconnect",
            Self::QuotaExceeded => {
                "Wait until the quota renews at midnight UTC, or ask the operator to raise daily_token_quota"
            }
            Self::ServiceUnavailable => "Retry shortly",
            Self::ResumeUnavailable => {
                "Reload the chat's history with GET /api/v1/chats/{chat_id}/messages; live events follow"
            }
            Self::InternalError => "Retry; if it persists, contact the operator",
            Self::NameTaken => "Choose another name, or change the tenant that has this one",
        }
    }
}

/// The `details` object of an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetails {
    /// What the client can do about it.
    pub fix: String,
    /// For `RATE_LIMITED`: how long to wait before the next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// For `RESUME_UNAVAILABLE`: the chat's latest `seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl ErrorDetails {
    /// Details carrying just a fix.
    pub fn fix(fix: impl Into<String>) -> Self {
        Self {
            fix: fix.into(),
            retry_after_ms: None,
            seq: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_str_matches_the_serialized_form() -> Result<(), serde_json::Error> {
        for code in [
            ErrorCode::AuthError,
            ErrorCode::ChatInUse,
            ErrorCode::SlowConsumer,
            ErrorCode::AiError,
        ] {
            assert_eq!(serde_json::to_value(code)?, code.as_str());
        }
        Ok(())
    }
}
