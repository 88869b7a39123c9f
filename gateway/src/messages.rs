//! Accepting a chat message: the domain step behind a socket's message frame, callable without
//! a socket. In order: the connection's rate, the tenant's daily quota, the durable save, then
//! one broker step that appends `message_received` to the chat's log and queues the job, so that
//! `message_received` is only ever sent for a saved message and precedes its answer on every
//! socket. Without the broker the message stays saved but unannounced: the sender is told the
//! service is unavailable instead, and the workers' unanswered sweep answers it later.
//!
//! The whole step runs within `timeouts.request_ms`, as a REST request does: each store
//! statement and Redis command has its own limit, but several slow ones in a row must not hold
//! the sender for their sum. Past the deadline the sender gets `SERVICE_UNAVAILABLE` (the
//! socket stays open); a save that completed all the same is then a saved, unannounced message
//! as above, and a resend under the same `client_message_id` finds it.
//!
//! Idempotent send: a message carrying a `client_message_id` already saved in the chat (the
//! store's unique key, so across gateways, kept as long as the message) saves nothing and starts
//! no answer; the sender gets the original `message_received` again, without a `seq` (it is
//! that socket's event alone; the original, with its `seq`, is in the chat log).

use std::num::NonZeroU32;

use chrono::Utc;
use governor::{Quota, RateLimiter, clock::Clock, clock::DefaultClock};
use serde_json::{Map, Value};
use shared::protocol::{Job, ServerEvent};
use shared::store::{Message, NewUserMessage, Saved};
use shared::telemetry::trace;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{error::ApiError, state::AppState};

/// A connection's message rate limiter.
pub type MessageLimiter = governor::DefaultDirectRateLimiter;

/// The clock every connection's limiter reads: one per process, since making a clock
/// calibrates it (a `cpuid` and a few reads of the time, a visible share of a handshake).
static CLOCK: std::sync::LazyLock<DefaultClock> = std::sync::LazyLock::new(DefaultClock::default);

/// A limiter allowing `per_second` messages per second (at least one).
pub fn limiter(per_second: u32) -> MessageLimiter {
    let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct_with_clock(Quota::per_second(per_second), CLOCK.clone())
}

/// Counts one client frame against the connection's rate. Every text frame counts (messages,
/// pings, cancels, frames refused as invalid), so that no kind of frame can be sent without
/// bound; WebSocket control frames do not.
pub fn count_frame(limiter: &MessageLimiter, per_second: u32) -> Result<(), ApiError> {
    limiter.check().map_err(|not_until| {
        let wait = not_until.wait_time_from(CLOCK.now());
        ApiError::TooManyMessages {
            per_second,
            retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
        }
    })
}

/// Who sends a message, and the limits that apply to their connection.
pub struct Sender<'a> {
    /// The tenant.
    pub tenant_id: Uuid,
    /// The chat.
    pub chat_id: Uuid,
    /// The user.
    pub user_id: &'a str,
    /// The connection's limiter.
    pub limiter: &'a MessageLimiter,
    /// The limit it enforces (for the error message).
    pub per_second: u32,
}

/// A message to accept.
pub struct NewMessage {
    /// The text.
    pub content: String,
    /// The client's metadata.
    pub metadata: Map<String, Value>,
    /// The sender's idempotency key.
    pub client_message_id: Option<String>,
}

/// What accepting a message did.
#[derive(Debug)]
pub enum Outcome {
    /// Saved and queued; its `message_received` reaches every socket of the chat.
    Queued,
    /// Its `client_message_id` was seen before in the chat (on any gateway): nothing saved,
    /// no answer started; this is the original `message_received`, for the sender alone.
    Repeat(ServerEvent),
}

/// Accepts one chat message.
pub async fn accept(
    state: &AppState,
    sender: &Sender<'_>,
    message: NewMessage,
) -> Result<Outcome, ApiError> {
    count_frame(sender.limiter, sender.per_second)?;
    let limit = state.config.timeouts.request();
    tokio::time::timeout(limit, checked_save(state, sender, message))
        .await
        .unwrap_or_else(|_| {
            let cause = crate::error::Dependency::Gateway("accepting the message timed out");
            Err(ApiError::Unavailable(cause))
        })
}

/// The tenant's limits, then the save and the announcement.
async fn checked_save(
    state: &AppState,
    sender: &Sender<'_>,
    message: NewMessage,
) -> Result<Outcome, ApiError> {
    check_tenant_limits(state, sender.tenant_id).await?;
    let span = tracing::debug_span!(
        target: trace::TARGET,
        "message",
        chat.id = %sender.chat_id,
        tenant.id = %sender.tenant_id,
        message.id = tracing::field::Empty,
    );
    save_and_queue(state, sender, message)
        .instrument(span)
        .await
}

/// Refuses the message when the tenant's daily token quota is spent, or when as many of its
/// messages as `max_queued_messages` allows already wait for an answer (nothing is saved then).
async fn check_tenant_limits(state: &AppState, tenant_id: Uuid) -> Result<(), ApiError> {
    let Some(tenant) = state.tenants.by_id(tenant_id).await? else {
        return Ok(());
    };
    if let Some(quota) = tenant.settings.daily_token_quota {
        let store = state.store.as_ref();
        if state.quotas.exhausted(store, tenant_id, quota).await? {
            return Err(ApiError::QuotaExceeded(quota));
        }
    }
    let limit = tenant.settings.max_queued_messages;
    if state.broker.backlog(tenant_id).await? >= u64::from(limit) {
        return Err(ApiError::BacklogFull(limit));
    }
    Ok(())
}

fn received(saved: &Message) -> ServerEvent {
    ServerEvent::MessageReceived {
        timestamp: Utc::now(),
        message_id: saved.id.clone(),
        chat_id: saved.chat_id,
        user_id: saved.user_id.clone(),
        content: saved.content.clone(),
    }
}

async fn save_and_queue(
    state: &AppState,
    sender: &Sender<'_>,
    message: NewMessage,
) -> Result<Outcome, ApiError> {
    let (chat_id, user_id) = (sender.chat_id, sender.user_id.to_owned());
    let new = NewUserMessage {
        chat_id,
        user_id: &user_id,
        content: &message.content,
        metadata: &message.metadata,
        client_message_id: message.client_message_id.as_deref(),
    };
    let saved = state
        .store
        .save_user_message(&new)
        .instrument(tracing::debug_span!(target: trace::TARGET, "store.save_message"))
        .await?;
    let saved = match saved {
        Saved::New(saved) => saved,
        Saved::Repeat(original) => return Ok(Outcome::Repeat(received(&original))),
    };
    tracing::Span::current().record("message.id", saved.id.as_str());
    let received = received(&saved);
    let enqueue =
        tracing::debug_span!(target: trace::TARGET, "broker.enqueue", otel.kind = "producer");
    let job = Job {
        message_id: saved.id,
        chat_id,
        tenant_id: sender.tenant_id,
        user_id,
        content: message.content,
        enqueued_at: Utc::now(),
        trace: trace::traceparent(&enqueue),
        earlier_attempts: 0,
    };
    state
        .broker
        .announce_and_enqueue(&received, job)
        .instrument(enqueue)
        .await?;
    shared::metrics::metrics().messages_received.inc();
    Ok(Outcome::Queued)
}
