//! `GET /ws/chat`: the WebSocket endpoint (API.md §4).
//!
//! The upgrade always succeeds; the handshake parameters are checked afterwards so that a
//! browser client can read why it was refused (an `error` event, then close code 1008). That
//! holds for an address throttled for failed authentications too ([`crate::throttle`]): it is
//! told `RATE_LIMITED` with `retry_after_ms` (an honest client behind the same NAT as a key
//! guesser learns why), at the cost of the upgrade; it takes no handshake turn and no lookup.
//! Its refusal is cheap, since a flood is mostly such upgrades: the `101` response, the `error`
//! event and the close frame go out as one write, with no socket task, and the connection
//! closes right after (the client need not answer the close frame; RFC 6455 §7.1.1 has the
//! server close the TCP connection first).

mod cursor;
mod handshake;
mod owners;
mod session;

use actix_http::{
    body::BoxBody,
    ws::{OpCode, Parser},
};
use actix_web::{HttpRequest, HttpResponse, web};
use shared::metrics::metrics;

use crate::{error::ApiError, state::AppState};

pub use handshake::{Credential, HandshakeParams, Present};
pub use owners::ChatOwners;

/// Upgrades the connection and hands the socket to its own task.
pub async fn ws_chat(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let client = state.throttle.client_addr(req.peer_addr(), req.headers());
    if let Err(err) = state.throttle.check(client) {
        metrics().connect(err.code().as_str());
        return refused_upgrade(&req, &err);
    }
    let mut params = HandshakeParams::from_request(&req);
    params.client = client;
    let (response, ws_session, stream) = actix_ws::handle(&req, body)?;
    let limits = &state.config.limits;
    let stream = stream
        .max_frame_size(limits.max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(limits.max_frame_bytes);
    let state = state.into_inner();
    // Sockets run on the worker thread that accepted them (their stream is not `Send`); the
    // tracker lets shutdown wait for them, and each watches the shutdown token itself.
    // The stream boxed: an idle socket's task is then 1,480 bytes instead of 1,696, which with
    // the allocator's size classes saves about 120 bytes per socket (`deploy/bench.sh idle`).
    state.shutdown.tracker.clone().spawn_local(session::run(
        state,
        params,
        ws_session,
        Box::new(stream),
    ));
    Ok(response)
}

/// The upgrade's `101` response carrying the whole refusal as its body: the `error` event and
/// the close frame, as [`session`] would send them, written with the head in one piece.
fn refused_upgrade(req: &HttpRequest, err: &ApiError) -> Result<HttpResponse, actix_web::Error> {
    let (frame, reason) = session::last_words(err);
    let mut body = web::BytesMut::with_capacity(frame.len() + 64);
    Parser::write_message(&mut body, frame.as_bytes(), OpCode::Text, true, false);
    Parser::write_close(&mut body, Some(reason), false);
    let response =
        actix_http::ws::handshake(req.head())?.message_body(BoxBody::new(body.freeze()))?;
    Ok(response.into())
}
