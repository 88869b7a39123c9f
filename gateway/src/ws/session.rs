//! One socket's life: handshake, then a loop over client frames, chat events, heartbeats and
//! the shutdown signal.
//!
//! Outbound events come from the chat's bounded hub channel and go straight to the socket; a
//! socket that falls more than `chat_buffer` events behind is sent `SLOW_CONSUMER` and closed.
//! Heartbeats: a WebSocket ping every `heartbeat_interval_secs`; a socket silent for
//! `idle_timeout_secs` (no frame at all, pongs included) is closed with 1000 "idle timeout".
//! Shutdown closes with 1012 so that clients reconnect to another gateway: at once for an idle
//! socket, after the answer it is streaming ends for a busy one (within `drain_timeout_secs`).

use std::{
    num::NonZeroU32,
    ops::ControlFlow,
    sync::Arc,
    time::{Duration, Instant},
};

use actix_ws::{
    AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, ProtocolError, Session,
};
use chrono::Utc;
use governor::{Quota, RateLimiter, clock::Clock, clock::DefaultClock};
use serde_json::{Map, Value};
use shared::protocol::{
    ClientFrame, ErrorCode, ErrorDetails, Frame, FrameError, Job, ServerEvent, frame_event_type,
    parse_client_frame,
};

use super::handshake::{self, Accepted, HandshakeParams};
use crate::{error::ApiError, state::AppState};
use shared::broker::Subscription;
use shared::metrics::metrics;
use shared::telemetry::trace;
use tracing::Instrument as _;

/// Runs a socket until it closes.
///
/// A plain function returning an `async move` block, and `serve` borrowing the connection:
/// an `async fn` keeps its by-value arguments twice in its state (as arguments and as moved
/// locals), which doubled the long-lived task of every idle socket.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would store its arguments twice"
)]
pub fn run(
    state: Arc<AppState>,
    params: HandshakeParams,
    session: Session,
    mut stream: AggregatedMessageStream,
) -> impl std::future::Future<Output = ()> {
    async move {
        let accepted = {
            let _turn = state.handshakes.acquire().await;
            Box::pin(handshake::accept(&state, params)).await
        };
        match accepted {
            Ok(accepted) => {
                metrics().connect("accepted");
                let mut connection = Connection::new(state, accepted, session);
                connection.serve(&mut stream).await;
            }
            Err(err) => {
                metrics().connect(err.code().as_str());
                Box::pin(refuse(session, &err)).await;
            }
        }
    }
}

/// Reports a handshake failure, then closes with 1008 (1013 when the gateway cannot serve now).
async fn refuse(mut session: Session, err: &ApiError) {
    let code = match err {
        ApiError::Unavailable(_) => CloseCode::Again,
        _ => CloseCode::Policy,
    };
    if session.text(err.to_event().to_frame()).await.is_ok() {
        let _ = session.close(Some(close(code, err.code().as_str()))).await;
    }
}

fn close(code: CloseCode, description: &str) -> CloseReason {
    CloseReason {
        code,
        description: Some(description.to_owned()),
    }
}

type MessageLimiter = governor::DefaultDirectRateLimiter;

struct Connection {
    state: Arc<AppState>,
    accepted: Accepted,
    session: Session,
    limiter: MessageLimiter,
    _open: OpenSocket,
}

/// What a forwarded event means to the socket's own bookkeeping.
enum Forwarded {
    Token,
    Started,
    /// The answer ended, completely or with an error.
    Ended,
    Other,
}

impl Forwarded {
    fn of(frame: &Frame) -> Self {
        match frame_event_type(frame) {
            Some("message_stream_token") => Self::Token,
            Some("message_stream_started") => Self::Started,
            Some("message_stream_ended" | "error") => Self::Ended,
            _ => Self::Other,
        }
    }
}

/// Tokens written to this socket and not yet added to `tokens_forwarded`: the shared counter
/// is bumped once per answer (and when the socket ends) rather than once per token.
#[derive(Default)]
struct TokenTally(u64);

impl TokenTally {
    fn flush(&mut self) {
        if self.0 > 0 {
            metrics()
                .tokens_forwarded
                .inc_by(std::mem::take(&mut self.0));
        }
    }
}

impl Drop for TokenTally {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Counts the socket in `open_sockets` while it lives.
struct OpenSocket;

impl OpenSocket {
    fn new() -> Self {
        metrics().open_sockets.inc();
        Self
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        metrics().open_sockets.dec();
    }
}

impl Connection {
    fn new(state: Arc<AppState>, accepted: Accepted, session: Session) -> Self {
        let per_second = NonZeroU32::new(accepted.messages_per_second).unwrap_or(NonZeroU32::MIN);
        Self {
            state,
            accepted,
            session,
            limiter: RateLimiter::direct(Quota::per_second(per_second)),
            _open: OpenSocket::new(),
        }
    }

    async fn send(&mut self, event: ServerEvent) -> ControlFlow<()> {
        match self.session.text(event.to_frame()).await {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    async fn serve(&mut self, stream: &mut AggregatedMessageStream) {
        let mut events = match self.state.broker.subscribe(self.accepted.chat_id).await {
            Ok(events) => events,
            Err(e) => {
                let _ = Box::pin(self.send(ApiError::from(e).to_event())).await;
                let _ = Box::pin(
                    self.session
                        .clone()
                        .close(Some(close(CloseCode::Again, "SERVICE_UNAVAILABLE"))),
                )
                .await;
                return;
            }
        };
        // The greeting and the close run once; boxing them keeps the long-lived task small.
        if Box::pin(self.greet()).await.is_break() {
            return;
        }
        let reason = self.event_loop(&mut events, stream).await;
        if let Some(reason) = reason {
            let _ = Box::pin(self.session.clone().close(Some(reason))).await;
        }
    }

    /// `connection_established`, then `user_created` if this connection created the user.
    async fn greet(&mut self) -> ControlFlow<()> {
        let established = ServerEvent::ConnectionEstablished {
            timestamp: Utc::now(),
            user_id: self.accepted.user_id.clone(),
            chat_id: self.accepted.chat_id,
            tenant_id: self.accepted.tenant_id,
        };
        self.send(established).await?;
        if self.accepted.user_created {
            let created = ServerEvent::UserCreated {
                timestamp: Utc::now(),
                user_id: self.accepted.user_id.clone(),
            };
            self.send(created).await?;
        }
        ControlFlow::Continue(())
    }

    /// Runs until the socket should close; returns the close reason to send, if any.
    async fn event_loop(
        &mut self,
        events: &mut Subscription,
        stream: &mut AggregatedMessageStream,
    ) -> Option<CloseReason> {
        let limits = &self.state.config.limits;
        let idle_timeout = Duration::from_secs(limits.idle_timeout_secs);
        let period = Duration::from_secs(limits.heartbeat_interval_secs.max(1));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut last_seen = Instant::now();
        let stop = self.state.shutdown.token.clone();
        let drain = Duration::from_secs(self.state.config.drain_timeout_secs);
        // Whether an answer is streaming to this socket (a chat's answers never overlap).
        let mut streaming = false;
        let mut tokens = TokenTally::default();
        // Set once the gateway stops: the socket then lives until its answer ends, or this.
        // Boxed: an idle socket's task then carries a pointer, not a timer.
        let mut drain_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let restart = || close(CloseCode::Restart, "server restarting; reconnect");
        loop {
            let flow = tokio::select! {
                () = stop.cancelled(), if drain_timer.is_none() => {
                    if !streaming {
                        return Some(restart());
                    }
                    drain_timer = Some(Box::pin(tokio::time::sleep(drain)));
                    ControlFlow::Continue(())
                }
                () = async { if let Some(t) = drain_timer.as_mut() { t.await } }, if drain_timer.is_some() => {
                    return Some(restart());
                }
                event = events.recv() => match event {
                    Some(frame) => {
                        let forwarded = Forwarded::of(&frame);
                        if self.session.text(frame).await.is_err() {
                            return None;
                        }
                        match forwarded {
                            Forwarded::Token => tokens.0 += 1,
                            Forwarded::Started => streaming = true,
                            Forwarded::Ended => {
                                streaming = false;
                                tokens.flush();
                                if drain_timer.is_some() {
                                    return Some(restart());
                                }
                            }
                            Forwarded::Other => {}
                        }
                        ControlFlow::Continue(())
                    }
                    None => {
                        let slow = ServerEvent::error(ErrorCode::SlowConsumer, "Too many unread events; closing");
                        let _ = Box::pin(self.send(slow)).await;
                        return Some(close(CloseCode::Policy, "slow consumer"));
                    }
                },
                msg = stream.recv() => {
                    last_seen = Instant::now();
                    match msg {
                        None => return None,
                        // Boxed: an idle socket's task then carries none of the message path's state.
                        Some(msg) => match Box::pin(self.on_frame(msg)).await {
                            Ok(flow) => flow,
                            Err(reason) => return reason,
                        },
                    }
                }
                _ = heartbeat.tick() => {
                    if last_seen.elapsed() >= idle_timeout {
                        return Some(close(CloseCode::Normal, "idle timeout"));
                    }
                    match Box::pin(self.session.ping(b"")).await {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(_) => return None,
                    }
                }
            };
            if flow.is_break() {
                return None;
            }
        }
    }

    /// Handles one client frame; `Err` ends the socket (with a close reason to send, if any).
    async fn on_frame(
        &mut self,
        msg: Result<AggregatedMessage, ProtocolError>,
    ) -> Result<ControlFlow<()>, Option<CloseReason>> {
        let invalid = |m: &str| ServerEvent::error(ErrorCode::InvalidMessage, m);
        Ok(match msg {
            Ok(AggregatedMessage::Text(text)) => self.on_text(&text).await,
            Ok(AggregatedMessage::Binary(_)) => {
                self.send(invalid(
                    "Binary frames are not supported; send JSON text frames",
                ))
                .await
            }
            Ok(AggregatedMessage::Ping(bytes)) => match self.session.pong(&bytes).await {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            },
            Ok(AggregatedMessage::Pong(_)) => ControlFlow::Continue(()),
            // Answer the client's close so that it sees a clean closing handshake.
            Ok(AggregatedMessage::Close(reason)) => {
                return Err(Some(reason.unwrap_or_else(|| CloseCode::Normal.into())));
            }
            Err(ProtocolError::Overflow) => {
                let max = self.state.config.limits.max_frame_bytes;
                let message = format!("Frame larger than {max} bytes refused");
                let _ = self
                    .send(ServerEvent::error(ErrorCode::MessageTooLarge, message))
                    .await;
                return Err(Some(close(CloseCode::Size, "frame too large")));
            }
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                self.send(invalid("Text frame is not valid UTF-8")).await
            }
            Err(e) => {
                tracing::debug!(error = %e, "websocket protocol error");
                return Err(Some(close(CloseCode::Protocol, "protocol error")));
            }
        })
    }

    async fn on_text(&mut self, text: &str) -> ControlFlow<()> {
        match parse_client_frame(text, self.state.config.limits.max_content_bytes) {
            Ok(ClientFrame::Ping) => {
                self.send(ServerEvent::Pong {
                    timestamp: Utc::now(),
                })
                .await
            }
            Ok(ClientFrame::Cancel) => {
                match self.state.broker.cancel(self.accepted.chat_id).await {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => self.send(ApiError::from(e).to_event()).await,
                }
            }
            Ok(ClientFrame::Message { content, metadata }) => {
                self.on_message(content, metadata).await
            }
            Err(e @ FrameError::Invalid(_)) => {
                self.send(ServerEvent::error(ErrorCode::InvalidMessage, e.to_string()))
                    .await
            }
            Err(e @ FrameError::TooLarge { .. }) => {
                self.send(ServerEvent::error(
                    ErrorCode::MessageTooLarge,
                    e.to_string(),
                ))
                .await
            }
        }
    }

    /// Rate-checks, saves, announces and queues a chat message, in that order, so that
    /// `message_received` is only ever sent for a saved message and precedes its answer.
    async fn on_message(
        &mut self,
        content: String,
        metadata: Map<String, Value>,
    ) -> ControlFlow<()> {
        if let Err(not_until) = self.limiter.check() {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let per_second = self.accepted.messages_per_second;
            let details = ErrorDetails {
                fix: ErrorCode::RateLimited.default_fix().into(),
                retry_after_ms: Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)),
            };
            let message = format!("Rate limit exceeded: at most {per_second} messages per second");
            return self
                .send(ServerEvent::error_with(
                    ErrorCode::RateLimited,
                    message,
                    details,
                ))
                .await;
        }
        if let Some(refusal) = self.quota_refusal().await {
            return self.send(refusal).await;
        }
        let span = tracing::debug_span!(
            target: trace::TARGET,
            "message",
            chat.id = %self.accepted.chat_id,
            tenant.id = %self.accepted.tenant_id,
            message.id = tracing::field::Empty,
        );
        // Boxed: the socket's task then carries a pointer while idle, not this future.
        match Box::pin(self.save_and_queue(content, metadata).instrument(span)).await {
            Ok(()) => {
                metrics().messages_received.inc();
                ControlFlow::Continue(())
            }
            Err(e) => self.send(e.to_event()).await,
        }
    }

    /// Saves the message, then announces and queues it. Without the broker the message stays
    /// saved but unannounced: the client is told the service is unavailable instead of
    /// receiving `message_received`.
    async fn save_and_queue(
        &self,
        content: String,
        metadata: Map<String, Value>,
    ) -> Result<(), ApiError> {
        let (chat_id, user_id) = (self.accepted.chat_id, self.accepted.user_id.clone());
        let saved = self
            .state
            .store
            .add_user_message(chat_id, &user_id, &content, &metadata)
            .instrument(tracing::debug_span!(target: trace::TARGET, "store.save_message"))
            .await?;
        tracing::Span::current().record("message.id", saved.id.as_str());
        let received = ServerEvent::MessageReceived {
            timestamp: Utc::now(),
            message_id: saved.id.clone(),
            chat_id,
            user_id: user_id.clone(),
            content: content.clone(),
        };
        let enqueue =
            tracing::debug_span!(target: trace::TARGET, "broker.enqueue", otel.kind = "producer");
        let job = Job {
            message_id: saved.id,
            chat_id,
            tenant_id: self.accepted.tenant_id,
            user_id,
            content,
            enqueued_at: Utc::now(),
            trace: trace::traceparent(&enqueue),
        };
        self.state
            .broker
            .announce_and_enqueue(&received, job)
            .instrument(enqueue)
            .await?;
        Ok(())
    }

    /// The error to answer instead of taking a message, when the tenant's daily token quota
    /// is spent (or cannot be checked).
    async fn quota_refusal(&self) -> Option<ServerEvent> {
        let tenant_id = self.accepted.tenant_id;
        let tenant = match self.state.tenants.by_id(tenant_id).await {
            Ok(t) => t?,
            Err(e) => return Some(ApiError::from(e).to_event()),
        };
        let quota = tenant.settings.daily_token_quota?;
        let store = self.state.store.as_ref();
        match self.state.quotas.exhausted(store, tenant_id, quota).await {
            Ok(false) => None,
            Ok(true) => Some(ServerEvent::error(
                ErrorCode::QuotaExceeded,
                format!("The daily quota of {quota} tokens is spent; it renews at midnight UTC"),
            )),
            Err(e) => Some(ApiError::from(e).to_event()),
        }
    }
}
