//! One socket's life: handshake, then a loop over client frames, chat events, heartbeats and
//! the shutdown signal. Transport only: what a message frame triggers is [`crate::messages`],
//! which events to write next is the socket's [`ChatCursor`].
//!
//! Chat events are written as the cursor hands them over, each write bounded by
//! `delivery.write_timeout_secs`: a client that stops reading for that long is sent
//! `SLOW_CONSUMER` (if it still can be) and closed with 1008; it can resume.
//! Heartbeats: a WebSocket ping every `heartbeat_interval_secs`; a socket silent for
//! `idle_timeout_secs` (no frame at all, pongs included) is closed with 1000 "idle timeout".
//! Shutdown closes with 1012 so that clients reconnect to another gateway: at once for an idle
//! socket, after the answer it is streaming ends for a busy one (within `drain_timeout_secs`).

use std::{
    ops::ControlFlow,
    sync::Arc,
    time::{Duration, Instant},
};

use actix_ws::{
    AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, ProtocolError, Session,
};
use chrono::Utc;
use shared::protocol::{
    ClientFrame, ErrorCode, Frame, ServerEvent, frame_event_type, parse_client_frame,
};

use super::cursor::{self, ChatCursor, CursorEnd, Step};
use super::handshake::{self, Accepted, HandshakeParams};
use crate::messages::{self, MessageLimiter, NewMessage, Outcome, Sender};
use crate::{error::ApiError, state::AppState};
use shared::broker::Subscription;
use shared::metrics::metrics;

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
    mut stream: Box<AggregatedMessageStream>,
) -> impl std::future::Future<Output = ()> {
    async move {
        let accepted = Box::pin(checked(&state, params)).await;
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

/// The handshake, bounded: the turn and the checks together take at most
/// `auth.handshake_timeout_secs` (a flood cannot queue real clients without bound). A throttled
/// address never gets here: [`super::ws_chat`] refuses it in the upgrade response itself.
async fn checked(state: &AppState, params: HandshakeParams) -> Result<Accepted, ApiError> {
    let limit = Duration::from_secs(state.config.auth.handshake_timeout_secs.max(1));
    let handshake = async {
        let _turn = state.handshakes.acquire().await;
        handshake::accept(state, params).await
    };
    tokio::time::timeout(limit, handshake)
        .await
        .unwrap_or(Err(ApiError::Unavailable(
            crate::error::Dependency::Gateway("the handshake timed out: the gateway is busy"),
        )))
}

/// Reports a handshake failure, then closes with 1008 (1013 when the gateway cannot serve now).
/// Both writes are bounded: a client that does not read is dropped.
async fn refuse(mut session: Session, err: &ApiError) {
    let (frame, reason) = last_words(err);
    if let Ok(Ok(())) = tokio::time::timeout(CLOSE_TIMEOUT, session.text(frame)).await {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, session.close(Some(reason))).await;
    }
}

/// What a refused socket is told: its `error` event, then the close frame (1008; 1013 when
/// the gateway cannot serve now) naming the error code.
pub(super) fn last_words(err: &ApiError) -> (Frame, CloseReason) {
    let code = match err {
        ApiError::Unavailable(_) => CloseCode::Again,
        _ => CloseCode::Policy,
    };
    (err.to_event().to_frame(), close(code, err.code().as_str()))
}

/// How long the last words to a socket may take (its error event, its close frame).
const CLOSE_TIMEOUT: Duration = Duration::from_millis(200);

fn close(code: CloseCode, description: &str) -> CloseReason {
    CloseReason {
        code,
        description: Some(description.to_owned()),
    }
}

struct Connection {
    state: Arc<AppState>,
    accepted: Accepted,
    session: Session,
    limiter: MessageLimiter,
    /// A write timed out: the client stopped reading.
    stalled: bool,
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

/// The answer streaming to a socket, as far as its writes tell.
#[derive(Default)]
struct AnswerState {
    /// Whether an answer is streaming (a chat's answers never overlap).
    streaming: bool,
    tokens: TokenTally,
}

/// How writing a step ended.
enum Written {
    /// Every event went out.
    All,
    /// The socket is gone or stalled.
    Gone,
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
        Self {
            limiter: messages::limiter(accepted.messages_per_second),
            stalled: false,
            state,
            accepted,
            session,
            _open: OpenSocket::new(),
        }
    }

    async fn send(&mut self, event: ServerEvent) -> ControlFlow<()> {
        self.write(event.to_frame()).await
    }

    /// Writes one frame within the write timeout; `Break` when the socket is gone or stalled.
    async fn write(&mut self, frame: Frame) -> ControlFlow<()> {
        let timeout = Duration::from_secs(self.state.config.delivery.write_timeout_secs.max(1));
        match tokio::time::timeout(timeout, self.session.text(frame)).await {
            Ok(Ok(())) => ControlFlow::Continue(()),
            Ok(Err(_)) => ControlFlow::Break(()),
            Err(_) => {
                self.stalled = true;
                ControlFlow::Break(())
            }
        }
    }

    async fn serve(&mut self, stream: &mut AggregatedMessageStream) {
        let joined = Box::pin(self.join()).await;
        let (mut events, mut cursor, latest) = match joined {
            Ok(joined) => joined,
            Err(e) => {
                Box::pin(refuse(self.session.clone(), &e)).await;
                return;
            }
        };
        // The greeting and the close run once; boxing them keeps the long-lived task small.
        if Box::pin(self.greet(latest)).await.is_break() {
            return;
        }
        let reason = self.event_loop(&mut events, &mut cursor, stream).await;
        let reason = match reason {
            _ if self.stalled => Some(Box::pin(self.slow_consumer()).await),
            reason => reason,
        };
        if let Some(reason) = reason {
            // Bounded: a client that stopped reading takes no close frame either; dropping the
            // session then ends the connection.
            let closing = self.session.clone().close(Some(reason));
            let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, closing)).await;
        }
    }

    /// Follows the chat (live first, so that nothing published afterwards is missed), then
    /// places the socket's cursor; the third value is the chat's latest `seq`.
    async fn join(&self) -> Result<(Subscription, ChatCursor, u64), ApiError> {
        let chat_id = self.accepted.chat_id;
        let events = self.state.broker.subscribe(chat_id).await?;
        if let Some(n) = self.accepted.last_seq {
            let batch = usize::try_from(cursor::LOG_BATCH).unwrap_or(cursor::BATCH);
            let read = self.state.broker.read(chat_id, n, batch).await?;
            let (cursor, latest) = ChatCursor::resumed(chat_id, n, read);
            return Ok((events, cursor, latest));
        }
        let head = self.state.broker.head(chat_id).await?;
        let cursor = ChatCursor::start(chat_id, head);
        Ok((events, cursor, head.latest))
    }

    /// `AUTH_ERROR` for a revoked key (at once, even mid-answer), and the close to send.
    async fn revoked(&mut self) -> CloseReason {
        let event = ApiError::KeyRevoked.to_event();
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.session.text(event.to_frame())).await;
        close(CloseCode::Policy, ErrorCode::AuthError.as_str())
    }

    /// `SLOW_CONSUMER`, if the client still takes it, and the close to send.
    async fn slow_consumer(&mut self) -> CloseReason {
        let slow = ApiError::SlowConsumer.to_event();
        let _ = tokio::time::timeout(
            Duration::from_millis(100),
            self.session.text(slow.to_frame()),
        )
        .await;
        close(CloseCode::Policy, "slow consumer")
    }

    /// `connection_established` (with the chat's latest `seq`), then `user_created` if this
    /// connection created the user.
    async fn greet(&mut self, latest: u64) -> ControlFlow<()> {
        let established = ServerEvent::ConnectionEstablished {
            timestamp: Utc::now(),
            user_id: self.accepted.user_id.clone(),
            chat_id: self.accepted.chat_id,
            tenant_id: self.accepted.tenant_id,
            seq: latest,
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
        cursor: &mut ChatCursor,
        stream: &mut AggregatedMessageStream,
    ) -> Option<CloseReason> {
        let broker = self.state.broker.clone();
        let limits = &self.state.config.limits;
        let period = Duration::from_secs(limits.heartbeat_interval_secs.max(1));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut last_seen = Instant::now();
        // Cancelled on shutdown, and when the socket's key is revoked.
        let stop = self.accepted.watch.token().clone();
        let mut answer = AnswerState::default();
        // Set once the gateway stops: the socket then lives until its answer ends, or this.
        // Boxed: an idle socket's task then carries a pointer, not a timer.
        let mut drain_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let restart = || close(CloseCode::Restart, "server restarting; reconnect");
        loop {
            let draining = drain_timer.is_some();
            let flow = tokio::select! {
                () = stop.cancelled(), if drain_timer.is_none() => {
                    if !self.state.shutdown.token.is_cancelled() {
                        return Some(Box::pin(self.revoked()).await);
                    }
                    if !answer.streaming {
                        return Some(restart());
                    }
                    let drain = Duration::from_secs(self.state.config.drain_timeout_secs);
                    drain_timer = Some(Box::pin(tokio::time::sleep(drain)));
                    ControlFlow::Continue(())
                }
                () = async { if let Some(t) = drain_timer.as_mut() { t.await } }, if drain_timer.is_some() => {
                    return Some(restart());
                }
                step = cursor.pull(events, broker.as_ref()) => match step {
                    // Boxed: an idle socket's task then carries none of the write path's state.
                    Ok(step) => match Box::pin(self.write_step(step, &mut answer)).await {
                        Written::All if draining && !answer.streaming => return Some(restart()),
                        Written::All => ControlFlow::Continue(()),
                        Written::Gone => return None,
                    },
                    Err(CursorEnd::SlowConsumer) => {
                        self.stalled = true;
                        return None;
                    }
                    Err(CursorEnd::Resync) => {
                        return Some(close(CloseCode::Restart, "events lost; resume with last_seq"));
                    }
                },
                msg = stream.recv() => {
                    last_seen = Instant::now();
                    match msg {
                        None => return None,
                        // Boxed: an idle socket's task then carries none of the message path's state.
                        Some(msg) => match Box::pin(self.on_frame(msg, answer.streaming)).await {
                            Ok(flow) => flow,
                            Err(reason) => return reason,
                        },
                    }
                }
                _ = heartbeat.tick() => {
                    let idle_timeout = self.state.config.limits.idle_timeout_secs;
                    if last_seen.elapsed() >= Duration::from_secs(idle_timeout) {
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

    /// Writes a step's notice and events, keeping track of the answer they belong to.
    async fn write_step(&mut self, step: Step, answer: &mut AnswerState) -> Written {
        if let Some(notice) = step.notice
            && self.send(notice.to_event()).await.is_break()
        {
            return Written::Gone;
        }
        for event in step.events {
            let forwarded = Forwarded::of(&event.frame);
            if self.write(event.frame).await.is_break() {
                return Written::Gone;
            }
            match forwarded {
                Forwarded::Token => answer.tokens.0 += 1,
                Forwarded::Started => answer.streaming = true,
                Forwarded::Ended => {
                    answer.streaming = false;
                    answer.tokens.flush();
                }
                Forwarded::Other => {}
            }
        }
        Written::All
    }

    /// Handles one client frame; `Err` ends the socket (with a close reason to send, if any).
    async fn on_frame(
        &mut self,
        msg: Result<AggregatedMessage, ProtocolError>,
        streaming: bool,
    ) -> Result<ControlFlow<()>, Option<CloseReason>> {
        let invalid = |m: &str| ApiError::InvalidFrame(m.to_owned()).to_event();
        Ok(match msg {
            Ok(AggregatedMessage::Text(text)) => self.on_text(&text, streaming).await,
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
                let too_large =
                    ApiError::TooLarge(format!("Frame larger than {max} bytes refused"));
                let _ = self.send(too_large.to_event()).await;
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

    /// Handles a text frame; `streaming` tells whether an answer is streaming to this socket.
    async fn on_text(&mut self, text: &str, streaming: bool) -> ControlFlow<()> {
        let frame = parse_client_frame(text, self.state.config.limits.max_content_bytes);
        // A message is counted by `messages::accept`, every other frame here.
        if !matches!(frame, Ok(ClientFrame::Message { .. }))
            && let Err(e) = messages::count_frame(&self.limiter, self.accepted.messages_per_second)
        {
            return self.send(e.to_event()).await;
        }
        match frame {
            // Nothing to stop: a cancel goes out to the workers only while an answer streams.
            Ok(ClientFrame::Cancel) if !streaming => ControlFlow::Continue(()),
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
            Ok(ClientFrame::Message {
                content,
                metadata,
                client_message_id,
            }) => {
                let sender = Sender {
                    tenant_id: self.accepted.tenant_id,
                    chat_id: self.accepted.chat_id,
                    user_id: &self.accepted.user_id,
                    limiter: &self.limiter,
                    per_second: self.accepted.messages_per_second,
                };
                let message = NewMessage {
                    content,
                    metadata,
                    client_message_id,
                };
                // Boxed: the socket's task then carries a pointer while idle, not this future.
                match Box::pin(messages::accept(&self.state, &sender, message)).await {
                    Ok(Outcome::Queued) => ControlFlow::Continue(()),
                    Ok(Outcome::Repeat(original)) => self.send(original).await,
                    Err(e) => self.send(e.to_event()).await,
                }
            }
            Err(e) => self.send(ApiError::from(e).to_event()).await,
        }
    }
}
