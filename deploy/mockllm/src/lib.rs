//! A mock OpenAI-compatible Chat Completions server, for tests, docker-compose and load tests.
//!
//! `POST /v1/chat/completions` answers like OpenAI, vLLM or Ollama do: with `stream: true` a
//! server-sent event stream of `chat.completion.chunk` objects (a keep-alive comment first, a
//! final usage chunk with empty `choices` when `stream_options.include_usage` is set, then
//! `data: [DONE]`); without it one `chat.completion` object. The words are those of Parley's
//! built-in `mock` provider for the same model and last message ([`shared::mocktext`]).
//!
//! Faults on demand, each taken by the next request: `POST /_mock/faults` with
//! `{"fault": "429" | "500" | "401" | "cut" | "stall" | "error", "after_tokens": n, "times": n}`.
//! `cut` ends the connection part way, `stall` stops sending without closing, `error` sends an
//! OpenAI error object mid-stream. `GET /_mock/requests` returns the bodies received (newest
//! last), `GET /_mock/stats` counts requests and streams completed or abandoned by the client.

mod stream;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix_web::{App, HttpResponse, HttpServer, dev::ServerHandle, web};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// How the server answers when no fault is queued.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Tokens per answer (a request's smaller `max_tokens` wins, with `finish_reason: "length"`).
    pub reply_tokens: u64,
    /// Delay before the first token.
    pub first_token_delay: Duration,
    /// Delay between tokens.
    pub token_delay: Duration,
    /// Tokens carry the time they were sent (` <unix nanos>`) instead of words, for latency
    /// benchmarks of a client.
    pub clock_tokens: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            reply_tokens: 24,
            first_token_delay: Duration::ZERO,
            token_delay: Duration::ZERO,
            clock_tokens: false,
        }
    }
}

/// A misbehaviour for the next request(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// HTTP 429 with `Retry-After: 0`.
    #[serde(rename = "429")]
    RateLimited,
    /// HTTP 500.
    #[serde(rename = "500")]
    ServerError,
    /// HTTP 401 whose message quotes the presented key, as OpenAI's does.
    #[serde(rename = "401")]
    Unauthorized,
    /// The connection ends after `after_tokens` tokens, without `[DONE]`.
    Cut,
    /// Nothing more is sent after `after_tokens` tokens, and the connection stays open.
    Stall,
    /// An error object is sent after `after_tokens` tokens.
    Error,
}

/// A queued fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Fault {
    /// What goes wrong.
    pub fault: FaultKind,
    /// Tokens sent before a mid-stream fault.
    #[serde(default)]
    pub after_tokens: u64,
    /// How many requests in a row get it.
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

/// Counters, readable by tests and at `GET /_mock/stats`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stats {
    /// Completion requests received.
    pub requests: u64,
    /// Streams sent to the end.
    pub completed: u64,
    /// Streams the client abandoned (closed the connection) before the end.
    pub abandoned: u64,
    /// When the last stream was abandoned, as time since the server started.
    #[serde(skip)]
    pub last_abandoned: Option<Duration>,
}

/// State shared by the handlers.
struct State {
    settings: Settings,
    started: Instant,
    faults: Mutex<VecDeque<Fault>>,
    requests: Mutex<VecDeque<Value>>,
    stats: Mutex<Stats>,
}

/// Requests remembered for `GET /_mock/requests`.
const KEEP_REQUESTS: usize = 100;

impl State {
    fn take_fault(&self) -> Option<Fault> {
        let mut faults = self.faults.lock().ok()?;
        let front = faults.front_mut()?;
        let fault = *front;
        front.times = front.times.saturating_sub(1);
        if front.times == 0 {
            faults.pop_front();
        }
        Some(fault)
    }

    fn record(&self, body: &Value) {
        if let Ok(mut r) = self.requests.lock() {
            if r.len() == KEEP_REQUESTS {
                r.pop_front();
            }
            r.push_back(body.clone());
        }
        self.count(|s| s.requests += 1);
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }
}

/// A running mock server; it stops when dropped.
pub struct MockLlm {
    state: Arc<State>,
    port: u16,
    handle: ServerHandle,
}

impl MockLlm {
    /// Binds (port 0 picks a free port) and serves in the background of the current runtime.
    pub fn start(bind: &str, settings: Settings) -> std::io::Result<MockLlm> {
        let (mock, server) = Self::bind(bind, settings)?;
        tokio::spawn(server);
        Ok(mock)
    }

    /// Binds and returns the handle with the server, for a binary to run in the foreground.
    pub fn bind(
        bind: &str,
        settings: Settings,
    ) -> std::io::Result<(MockLlm, actix_web::dev::Server)> {
        let state = Arc::new(State {
            settings,
            started: Instant::now(),
            faults: Mutex::default(),
            requests: Mutex::default(),
            stats: Mutex::default(),
        });
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::JsonConfig::default().limit(16 << 20))
                .route("/v1/chat/completions", web::post().to(completions))
                .route("/v1/models", web::get().to(models))
                .route("/_mock/faults", web::post().to(add_fault))
                .route("/_mock/requests", web::get().to(requests))
                .route("/_mock/stats", web::get().to(stats))
        })
        .workers(2)
        .disable_signals()
        .bind(bind)?;
        let port = server.addrs().first().map_or(0, |a| a.port());
        let server = server.run();
        let handle = server.handle();
        Ok((
            MockLlm {
                state,
                port,
                handle,
            },
            server,
        ))
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>/v1`, the base URL a client is configured with.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// Queues a fault for the next request(s).
    pub fn push_fault(&self, fault: Fault) {
        if let Ok(mut f) = self.state.faults.lock() {
            f.push_back(fault);
        }
    }

    /// The request bodies received, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.state
            .requests
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.state.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Time since the server started (the clock of [`Stats::last_abandoned`]).
    pub fn elapsed(&self) -> Duration {
        self.state.started.elapsed()
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

fn openai_error(status: u16, message: &str, kind: &str) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status)
        .insert_header(("Retry-After", "0"))
        .json(json!({"error": {"message": message, "type": kind, "code": null}}))
}

async fn completions(
    state: web::Data<State>,
    req: actix_web::HttpRequest,
    body: web::Json<Value>,
) -> HttpResponse {
    let body = body.into_inner();
    state.record(&body);
    let fault = state.take_fault();
    match fault.map(|f| f.fault) {
        Some(FaultKind::RateLimited) => {
            return openai_error(429, "Rate limit reached", "rate_limit_exceeded");
        }
        Some(FaultKind::ServerError) => {
            return openai_error(500, "The server had an error", "server_error");
        }
        Some(FaultKind::Unauthorized) => {
            let key = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let message = format!("Incorrect API key provided: {key}");
            return openai_error(401, &message, "invalid_request_error");
        }
        _ => {}
    }
    let plan = stream::Plan::new(&state.settings, &body, fault);
    if body["stream"].as_bool().unwrap_or(false) {
        HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(("Cache-Control", "no-cache"))
            .streaming(stream::events(state.into_inner(), plan))
    } else {
        HttpResponse::Ok().json(plan.completion())
    }
}

async fn models() -> HttpResponse {
    HttpResponse::Ok().json(json!({"object": "list", "data": [{"id": "mock", "object": "model"}]}))
}

async fn add_fault(state: web::Data<State>, fault: web::Json<Fault>) -> HttpResponse {
    if let Ok(mut f) = state.faults.lock() {
        f.push_back(fault.into_inner());
    }
    HttpResponse::NoContent().finish()
}

async fn requests(state: web::Data<State>) -> HttpResponse {
    let all: Vec<Value> = state
        .requests
        .lock()
        .map(|r| r.iter().cloned().collect())
        .unwrap_or_default();
    HttpResponse::Ok().json(all)
}

async fn stats(state: web::Data<State>) -> HttpResponse {
    let s = state.stats.lock().map(|s| *s).unwrap_or_default();
    HttpResponse::Ok().json(s)
}
