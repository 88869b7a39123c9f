//! `GET /playground`: one self-contained page (HTML, CSS and plain JavaScript, embedded in the
//! binary; no build step, no dependency) to try the API in a browser against this gateway:
//! paste a key or a client token, list or create chats, connect, send, watch tokens stream,
//! cancel, see the raw events with their `seq`, drop the connection and resume with
//! `last_seq`, and read the history. Tested in Chromium by `gateway/tests/browser`.

use actix_web::HttpResponse;

const PAGE: &str = include_str!("playground.html");

/// The page.
pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        // The page talks to this gateway only; nothing else may be loaded or framed.
        .insert_header((
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:; frame-ancestors 'none'",
        ))
        .body(PAGE)
}
