//! Prometheus metrics of a gateway or worker process, served on `PARLEY_METRICS_BIND`.
//!
//! One registry per process ([`metrics`]), reached from wherever something is counted; every
//! name starts with `parley_`. Labels take values from closed sets only (refusal reasons are
//! error codes, model errors are kinds), never chat, user or tenant ids, so a series count does
//! not grow with traffic. A process exposes every family, the ones of the other role staying at
//! zero, so dashboards need not know which binary they scrape.
//!
//! Latency sources: time to first token is measured by the worker from `Job::enqueued_at` (the
//! gateway's clock when the message was saved) to the first token's publish; token delivery by
//! the gateway from the publish time the worker stamps on each broker message to the moment it
//! is handed to the sockets. Both cross processes, so they rely on synchronized clocks (NTP), as
//! any cross-host latency does.

use std::sync::{Arc, OnceLock};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Label of an outcome or failure reason (values from a closed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// `accepted`, or the refusal's error code (`CONNECTION_LIMIT`, `CHAT_IN_USE`, …).
    pub reason: &'static str,
}

/// The kinds of model failure (the `kind` label of `model_errors`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelErrorKind {
    /// The model took longer than its time limit.
    Timeout,
    /// The model failed.
    Failed,
    /// The tenant's agent names a provider the worker does not have.
    UnknownProvider,
}

impl ModelErrorKind {
    /// Every kind, for series that exist from the start.
    pub const ALL: [Self; 3] = [Self::Timeout, Self::Failed, Self::UnknownProvider];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Failed => "failed",
            Self::UnknownProvider => "unknown_provider",
        }
    }
}

/// Label of a model failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// `timeout`, `failed` or `unknown_provider`.
    pub kind: &'static str,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// Sockets open on this gateway now.
    pub open_sockets: Gauge,
    /// WebSocket handshakes by outcome (`accepted` or the refusal's error code).
    pub connects: Family<Reason, Counter>,
    /// User messages saved and queued.
    pub messages_received: Counter,
    /// Token events handed to sockets (one per token per socket).
    pub tokens_forwarded: Counter,
    /// Message enqueued → first token published, seconds (worker).
    pub time_to_first_token: Histogram,
    /// Token published → handed to the gateway's sockets, seconds (gateway).
    pub token_delivery: Histogram,
    /// Jobs this worker holds that wait for their turn or a free slot.
    pub queue_depth: Gauge,
    /// Message enqueued → taken by a worker, seconds.
    pub queue_lag: Histogram,
    /// Jobs taken over from a silent worker.
    pub jobs_reclaimed: Counter,
    /// Jobs moved to the dead-letter stream after too many attempts.
    pub jobs_dead_lettered: Counter,
    /// Failed model calls by kind.
    pub model_errors: Family<Kind, Counter>,
    /// Failed Redis commands.
    pub redis_errors: Counter,
    /// Failed database statements.
    pub database_errors: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut m = Self {
            open_sockets: Gauge::default(),
            connects: Family::default(),
            messages_received: Counter::default(),
            tokens_forwarded: Counter::default(),
            // 0.5 ms … 16 s
            time_to_first_token: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            // 0.1 ms … 1.6 s
            token_delivery: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            queue_depth: Gauge::default(),
            queue_lag: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            jobs_reclaimed: Counter::default(),
            jobs_dead_lettered: Counter::default(),
            model_errors: Family::default(),
            redis_errors: Counter::default(),
            database_errors: Counter::default(),
            registry: Registry::with_prefix("parley"),
        };
        m.register_all();
        // Series that exist from the start, so dashboards and alerts see zeros, not gaps.
        m.connect_count("accepted");
        for kind in ModelErrorKind::ALL {
            drop(m.model_errors.get_or_create(&Kind {
                kind: kind.as_str(),
            }));
        }
        m
    }

    fn register_all(&mut self) {
        let r = &mut self.registry;
        r.register(
            "open_sockets",
            "Sockets open on this gateway",
            self.open_sockets.clone(),
        );
        r.register(
            "socket_connects",
            "WebSocket handshakes by outcome",
            self.connects.clone(),
        );
        r.register(
            "messages_received",
            "User messages saved and queued",
            self.messages_received.clone(),
        );
        r.register(
            "tokens_forwarded",
            "Token events handed to sockets",
            self.tokens_forwarded.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Message enqueued to first token published",
            self.time_to_first_token.clone(),
        );
        r.register(
            "token_delivery_seconds",
            "Token published to handed to the gateway's sockets",
            self.token_delivery.clone(),
        );
        r.register(
            "queue_depth",
            "Jobs held by this worker, not yet answering",
            self.queue_depth.clone(),
        );
        r.register(
            "queue_lag_seconds",
            "Message enqueued to taken by a worker",
            self.queue_lag.clone(),
        );
        r.register(
            "jobs_reclaimed",
            "Jobs taken over from a silent worker",
            self.jobs_reclaimed.clone(),
        );
        r.register(
            "jobs_dead_lettered",
            "Jobs dead-lettered",
            self.jobs_dead_lettered.clone(),
        );
        r.register(
            "model_errors",
            "Failed model calls by kind",
            self.model_errors.clone(),
        );
        r.register(
            "redis_errors",
            "Failed Redis commands",
            self.redis_errors.clone(),
        );
        r.register(
            "database_errors",
            "Failed database statements",
            self.database_errors.clone(),
        );
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a handshake outcome.
    pub fn connect(&self, reason: &'static str) {
        self.connect_count(reason).inc();
    }

    fn connect_count(&self, reason: &'static str) -> Counter {
        self.connects.get_or_create(&Reason { reason }).clone()
    }

    /// Counts a model failure.
    pub fn model_error(&self, kind: ModelErrorKind) {
        self.model_errors
            .get_or_create(&Kind {
                kind: kind.as_str(),
            })
            .inc();
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Seconds since a wall-clock instant (zero if the clock went backwards).
pub fn seconds_since(t: chrono::DateTime<chrono::Utc>) -> f64 {
    let micros = (chrono::Utc::now() - t)
        .num_microseconds()
        .unwrap_or(0)
        .max(0);
    // Microsecond counts of latencies fit an f64 exactly.
    #[allow(clippy::cast_precision_loss)]
    let seconds = micros as f64 / 1e6;
    seconds
}

/// Serves `GET /metrics` on `bind` until the returned server is stopped; the bound port is
/// returned too (for `:0`). With `health`, also `/healthz` and `/readyz` ([`crate::health`]):
/// the worker's probes, which has no other listener.
pub fn serve(
    bind: &str,
    health: Option<Arc<crate::health::Readiness>>,
) -> std::io::Result<(actix_web::dev::Server, u16)> {
    use actix_web::{App, HttpResponse, HttpServer, web};
    let server = HttpServer::new(move || {
        let app = App::new().route(
            "/metrics",
            web::get().to(|| async {
                HttpResponse::Ok()
                    .content_type("text/plain; version=0.0.4; charset=utf-8")
                    .body(metrics().render())
            }),
        );
        match &health {
            Some(readiness) => app
                .app_data(web::Data::from(readiness.clone()))
                .route("/healthz", web::get().to(crate::health::healthz))
                .route("/readyz", web::get().to(crate::health::readyz)),
            None => app,
        }
    })
    .workers(1)
    .disable_signals()
    .bind(bind)?;
    let port = server.addrs().first().map_or(0, std::net::SocketAddr::port);
    Ok((server.run(), port))
}
