//! The one place where failures become responses: HTTP status and body for REST, `error`
//! events (and close codes) for WebSocket.

use actix_web::{HttpResponse, ResponseError, http::StatusCode};
use shared::{
    broker::BrokerError,
    limits::LimitsError,
    protocol::{ErrorCode, ErrorDetails, FrameError, ServerEvent},
    store::StoreError,
};

/// Every failure a client can be told about.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Request validation failed (400).
    #[error("{0}")]
    Invalid(String),
    /// No API key was sent (401).
    #[error("Missing API key")]
    MissingKey,
    /// A required WebSocket handshake parameter is missing.
    #[error("Missing {name} parameter")]
    MissingParam {
        /// The query parameter's name.
        name: &'static str,
        /// The equivalent header.
        header: &'static str,
    },
    /// A WebSocket handshake parameter is malformed.
    #[error("Invalid {name} parameter: {reason}")]
    InvalidParam {
        /// The parameter.
        name: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// The API key matches no tenant (401).
    #[error("Invalid API key")]
    InvalidKey,
    /// A client token that is malformed, forged, of a deleted tenant or an older key, or
    /// expired (401).
    #[error("Invalid or expired token")]
    InvalidToken(#[source] Option<jsonwebtoken::errors::Error>),
    /// A client token was sent where only the API key will do (401).
    #[error(
        "This call needs the tenant API key (X-API-Key); a client token only reads its own user's chats and messages"
    )]
    KeyRequired,
    /// A client token used beyond its grant: another user's chats, or a chat it is not bound
    /// to (403 on REST; `AUTH_ERROR` and close 1008 on a socket).
    #[error("{0}")]
    TokenScope(String),
    /// The socket's `Origin` is not in the tenant's `allowed_origins` (close 1008).
    #[error("Origin '{0}' is not allowed for this tenant (settings.allowed_origins)")]
    OriginNotAllowed(String),
    /// The key a socket authenticated with was rotated, or its tenant deleted (close 1008).
    #[error(
        "The API key was revoked (rotated, or its tenant deleted); reconnect with a current key"
    )]
    KeyRevoked,
    /// The chat is absent or another tenant's (404).
    #[error("Chat with chat_id '{0}' not found or does not belong to your tenant")]
    ChatNotFound(String),
    /// Some other resource is absent (404).
    #[error("{0}")]
    NotFound(String),
    /// The chat still has open sockets (409).
    #[error("Chat has open WebSocket connections; close them before deleting the chat")]
    ChatInUse,
    /// The tenant holds all its connection slots.
    #[error("Connection limit reached: this tenant may hold at most {0} open connections")]
    ConnectionLimit(u32),
    /// Too many requests (429).
    #[error("Rate limit exceeded: at most {limit} requests per minute")]
    RateLimited {
        /// The limit.
        limit: u32,
        /// Seconds until it resets.
        retry_after_secs: u64,
    },
    /// This address failed to authenticate too often; refused before any lookup (429).
    #[error("Too many failed authentications from this address; retry in {retry_after_secs} s")]
    AuthThrottled {
        /// Seconds until the address may try again.
        retry_after_secs: u64,
    },
    /// A socket sent messages faster than its tenant's `messages_per_second`.
    #[error("Rate limit exceeded: at most {per_second} messages per second")]
    TooManyMessages {
        /// The per-connection limit.
        per_second: u32,
        /// How long until the next message is accepted.
        retry_after_ms: u64,
    },
    /// The tenant's messages waiting for an answer are at its `max_queued_messages`.
    #[error(
        "{0} messages of this tenant are waiting for an answer, the most its settings allow; retry once some are answered"
    )]
    BacklogFull(u32),
    /// The tenant's daily token quota is spent.
    #[error("The daily quota of {0} tokens is spent; it renews at midnight UTC")]
    QuotaExceeded(u64),
    /// A resume asked for events the chat log no longer holds.
    #[error("Events after last_seq are no longer available; the chat is at seq {latest}")]
    ResumeUnavailable {
        /// The chat's latest `seq`.
        latest: u64,
    },
    /// Missing or wrong admin token (401).
    #[error("Invalid or missing admin token")]
    Unauthorized,
    /// Another tenant already has this name (409).
    #[error("A tenant named '{0}' already exists; tenant names are unique")]
    NameTaken(String),
    /// A client frame that is not a valid frame (`INVALID_MESSAGE`; the socket stays open).
    #[error("{0}")]
    InvalidFrame(String),
    /// A message or frame over the configured size (`MESSAGE_TOO_LARGE`).
    #[error("{0}")]
    TooLarge(String),
    /// The socket fell too far behind its chat's events (closed).
    #[error("The connection fell too far behind the chat's events; resume with last_seq")]
    SlowConsumer,
    /// A dependency is down (503). The cause is logged, never sent.
    #[error("Service temporarily unavailable")]
    Unavailable(#[source] Dependency),
}

/// What made a request fail with `SERVICE_UNAVAILABLE`, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum Dependency {
    /// The store.
    #[error(transparent)]
    Store(StoreError),
    /// The broker.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The limits.
    #[error(transparent)]
    Limits(#[from] LimitsError),
    /// This gateway (draining, or set up without what the route needs).
    #[error("{0}")]
    Gateway(&'static str),
}

impl From<FrameError> for ApiError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Invalid(m) => Self::InvalidFrame(m.to_owned()),
            e @ FrameError::TooLarge { .. } => Self::TooLarge(e.to_string()),
        }
    }
}

impl ApiError {
    /// The wire error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidRequest,
            Self::MissingKey
            | Self::MissingParam { .. }
            | Self::InvalidParam { .. }
            | Self::InvalidKey
            | Self::InvalidToken(_)
            | Self::KeyRequired
            | Self::TokenScope(_)
            | Self::OriginNotAllowed(_)
            | Self::KeyRevoked => ErrorCode::AuthError,
            Self::ChatNotFound(_) => ErrorCode::ChatNotFound,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::ChatInUse => ErrorCode::ChatInUse,
            Self::ConnectionLimit(_) => ErrorCode::ConnectionLimit,
            Self::RateLimited { .. }
            | Self::TooManyMessages { .. }
            | Self::AuthThrottled { .. }
            | Self::BacklogFull(_) => ErrorCode::RateLimited,
            Self::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
            Self::ResumeUnavailable { .. } => ErrorCode::ResumeUnavailable,
            Self::Unauthorized => ErrorCode::Unauthorized,
            Self::NameTaken(_) => ErrorCode::NameTaken,
            Self::InvalidFrame(_) => ErrorCode::InvalidMessage,
            Self::TooLarge(_) => ErrorCode::MessageTooLarge,
            Self::SlowConsumer => ErrorCode::SlowConsumer,
            Self::Unavailable(_) => ErrorCode::ServiceUnavailable,
        }
    }

    /// The `details` object.
    pub fn details(&self) -> ErrorDetails {
        match self {
            Self::MissingParam { name, header } => ErrorDetails::fix(format!(
                "Add {name} parameter: ?{name}=your_{name} or {header} header"
            )),
            Self::MissingKey => ErrorDetails::fix(
                "Send your tenant API key in the X-API-Key header, or a client token as Authorization: Bearer <token> (reads only)",
            ),
            Self::InvalidToken(_) => ErrorDetails::fix(
                "Mint a new token with POST /api/v1/tokens (tokens expire, and a key rotation revokes them)",
            ),
            Self::KeyRequired => {
                ErrorDetails::fix("Make this call from your backend with the X-API-Key header")
            }
            Self::OriginNotAllowed(_) => {
                ErrorDetails::fix("Add the page's origin to the tenant's settings.allowed_origins")
            }
            Self::RateLimited {
                retry_after_secs, ..
            }
            | Self::AuthThrottled { retry_after_secs } => ErrorDetails {
                retry_after_ms: Some(retry_after_secs * 1000),
                ..ErrorDetails::fix(ErrorCode::RateLimited.default_fix())
            },
            Self::BacklogFull(_) => ErrorDetails {
                retry_after_ms: Some(1_000),
                ..ErrorDetails::fix(
                    "Wait for answers to arrive before sending more, or raise the tenant's max_queued_messages",
                )
            },
            Self::TooManyMessages { retry_after_ms, .. } => ErrorDetails {
                retry_after_ms: Some(*retry_after_ms),
                ..ErrorDetails::fix(ErrorCode::RateLimited.default_fix())
            },
            Self::ResumeUnavailable { latest } => ErrorDetails {
                seq: Some(*latest),
                ..ErrorDetails::fix(ErrorCode::ResumeUnavailable.default_fix())
            },
            other => ErrorDetails::fix(other.code().default_fix()),
        }
    }

    /// The WebSocket `error` event for this failure.
    pub fn to_event(&self) -> ServerEvent {
        self.log_cause();
        ServerEvent::error_with(self.code(), self.to_string(), self.details())
    }

    /// Logs what a client is not told: the cause of a `SERVICE_UNAVAILABLE`.
    fn log_cause(&self) {
        if let Self::Unavailable(cause) = self {
            tracing::error!(cause = %Chain(cause), "dependency unavailable");
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Invalid(_) | Self::InvalidParam { .. } | Self::InvalidFrame(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::SlowConsumer => StatusCode::CONFLICT,
            Self::MissingKey
            | Self::MissingParam { .. }
            | Self::InvalidKey
            | Self::InvalidToken(_)
            | Self::KeyRequired
            | Self::KeyRevoked
            | Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::TokenScope(_) | Self::OriginNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::ChatNotFound(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::ChatInUse | Self::NameTaken(_) => StatusCode::CONFLICT,
            Self::ConnectionLimit(_)
            | Self::RateLimited { .. }
            | Self::TooManyMessages { .. }
            | Self::AuthThrottled { .. }
            | Self::BacklogFull(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::QuotaExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::ResumeUnavailable { .. } => StatusCode::GONE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        self.log_cause();
        let mut res = HttpResponse::build(self.status_code());
        if let Self::RateLimited {
            retry_after_secs, ..
        }
        | Self::AuthThrottled { retry_after_secs } = self
        {
            res.insert_header(("Retry-After", retry_after_secs.to_string()));
        }
        res.json(ErrorBody {
            error_code: self.code(),
            error_message: self.to_string(),
            details: self.details(),
        })
    }
}

/// The error body of every REST failure (API.md §2): the WebSocket `error` event's fields.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error code.
    pub error_code: ErrorCode,
    /// What went wrong, for a person.
    pub error_message: String,
    /// What to do about it (`fix`), and for some codes `retry_after_ms` or `seq`.
    pub details: ErrorDetails,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken(name) => Self::NameTaken(name),
            e => Self::Unavailable(Dependency::Store(e)),
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            // A chat deleted while a socket was joining it.
            BrokerError::NoSuchChat(chat) => Self::ChatNotFound(chat.to_string()),
            e => Self::Unavailable(e.into()),
        }
    }
}

impl From<LimitsError> for ApiError {
    fn from(e: LimitsError) -> Self {
        Self::Unavailable(e.into())
    }
}

pub use shared::telemetry::Chain;
