//! Layered configuration: built-in defaults, then an optional TOML file named by `PARLEY_CONFIG`,
//! then `PARLEY_*` environment variables (nested fields with `__`, e.g.
//! `PARLEY_LIMITS__MAX_CONTENT_BYTES=65536`).

mod endpoints;

use std::collections::BTreeMap;

pub use endpoints::{ModelEndpoint, default_endpoints};
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

/// The whole configuration of a gateway or worker process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Gateway HTTP/WebSocket listen address (`PARLEY_BIND`).
    pub bind: String,
    /// Connections the kernel queues for the gateway before it accepts them
    /// (`PARLEY_LISTEN_BACKLOG`); capped by the host's `net.core.somaxconn`. A burst of
    /// reconnects (a gateway restart, a network blip) arrives faster than it is accepted: a full
    /// queue drops SYNs and each dropped client waits a second or more to retry.
    pub listen_backlog: u32,
    /// Bearer token that enables `/admin/v1` (`PARLEY_ADMIN_TOKEN`); unset or empty keeps the
    /// admin API off. At least [`MIN_ADMIN_TOKEN_CHARS`] characters, or the gateway refuses to start.
    pub admin_token: Option<String>,
    /// Serve `/admin/v1` on this address only, off the public port (`PARLEY_ADMIN_BIND`, e.g.
    /// `127.0.0.1:8001`); unset serves it on the main port.
    pub admin_bind: Option<String>,
    /// `sqlite://path` (embedded) or `postgres://…` (`PARLEY_DATABASE_URL`).
    pub database_url: String,
    /// `redis://…` selects the distributed broker (`PARLEY_REDIS_URL`); unset runs in-process.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel (`PARLEY_REDIS_PREFIX`), so that deployments (or
    /// tests) can share one Redis.
    pub redis_prefix: String,
    /// Prometheus `/metrics` listen address (`PARLEY_METRICS_BIND`).
    pub metrics_bind: String,
    /// Log filter in `RUST_LOG` syntax (`PARLEY_LOG`).
    pub log: String,
    /// Base URL of an OTLP/HTTP trace receiver, e.g. `http://otel-collector:4318`
    /// (`PARLEY_OTLP_ENDPOINT`); unset exports no traces unless the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: Option<String>,
    /// HTTP/WebSocket worker threads (`PARLEY_HTTP_WORKERS`); 0 means one per CPU core.
    pub http_workers: usize,
    /// On first start with an empty store, create a `default` tenant and print its key once.
    pub bootstrap_tenant: bool,
    /// Seconds a stopping gateway lets answers being streamed to its sockets finish before it
    /// closes them with 1012 (`PARLEY_DRAIN_TIMEOUT_SECS`); idle sockets close at once.
    pub drain_timeout_secs: u64,
    /// Protocol limits that are the same for every tenant.
    pub limits: LimitsConfig,
    /// Throttling of failed authentications and the handshake's time limits.
    pub auth: AuthConfig,
    /// Time limits on calls to the store and to Redis.
    pub timeouts: TimeoutsConfig,
    /// The in-process or stand-alone worker.
    pub worker: WorkerConfig,
    /// Timings of the distributed mode.
    pub cluster: ClusterConfig,
    /// The chat log and the delivery guarantees built on it (API.md §4.1).
    pub delivery: DeliveryConfig,
}

/// The chat log (every chat event with its `seq`, kept for resume, late join and slow
/// readers) and the bounds of fault recovery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DeliveryConfig {
    /// Events of a chat kept at least (`PARLEY_DELIVERY__LOG_EVENTS`); API.md's minimum is 10,000.
    pub log_events: u64,
    /// Seconds a chat's events are kept at least (`PARLEY_DELIVERY__LOG_SECS`); API.md's
    /// minimum is 600. An event goes once it is older than this *and* beyond `log_events`.
    pub log_secs: u64,
    /// Seconds after a chat's last event when its whole log is dropped (at least `log_secs`).
    pub log_idle_secs: u64,
    /// Seconds a socket may take to accept one write before it is closed with
    /// `SLOW_CONSUMER` (a client that stopped reading).
    pub write_timeout_secs: u64,
    /// Seconds after which a saved user message with no answer and no live job is queued again
    /// by the workers' sweep (after Redis lost its data, or any crash window).
    pub unanswered_after_secs: u64,
    /// Milliseconds of a worker's liveness lease; a worker silent this long has its jobs taken
    /// over by another.
    pub worker_lease_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            log_events: 10_000,
            log_secs: 600,
            log_idle_secs: 3_600,
            write_timeout_secs: 10,
            unanswered_after_secs: 30,
            worker_lease_ms: 3_000,
        }
    }
}

/// The shortest admin token a gateway accepts: a token an attacker could guess is worse than none.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 32;

/// Throttling of failed authentications per source address, and the handshake's time limits.
///
/// Each failed authentication (an unknown API key on REST or WebSocket, a wrong admin token)
/// takes one from its address's allowance of `failure_burst`, which refills at
/// `failures_per_minute`; an address with none left is refused at once (429 / `RATE_LIMITED`
/// with `retry_after_ms`) without any lookup, whatever key it sends, until it has one again.
/// Successful authentications cost nothing, so a busy NAT of honest clients is never throttled.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthConfig {
    /// Failed authentications an address may make in a row (`PARLEY_AUTH__FAILURE_BURST`).
    pub failure_burst: u32,
    /// Failed authentications per minute an address regains (`PARLEY_AUTH__FAILURES_PER_MINUTE`).
    pub failures_per_minute: u32,
    /// Comma-separated addresses or CIDR ranges of the reverse proxies in front of the gateway
    /// (`PARLEY_AUTH__TRUSTED_PROXIES=10.0.0.0/8,127.0.0.1`). A request from one of them is
    /// attributed to the last address in its `X-Forwarded-For` that is not a trusted proxy;
    /// anyone else's `X-Forwarded-For` is ignored, so it cannot be used to dodge the throttle.
    pub trusted_proxies: String,
    /// Seconds a client has to send its request head after connecting, and a WebSocket
    /// handshake to be checked (waiting for a turn included) before it is refused with
    /// `SERVICE_UNAVAILABLE` and close 1013 (`PARLEY_AUTH__HANDSHAKE_TIMEOUT_SECS`).
    pub handshake_timeout_secs: u64,
    /// The pepper client tokens' per-tenant secrets are derived under
    /// (`PARLEY_AUTH__TOKEN_SECRET`), the same on every gateway. Unset, a tenant's secret
    /// derives from its key hash alone, so whoever can read the database can mint tokens.
    pub token_secret: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            failure_burst: 20,
            failures_per_minute: 30,
            trusted_proxies: String::new(),
            handshake_timeout_secs: 5,
            token_secret: String::new(),
        }
    }
}

/// Time limits on every call to a dependency, so that a hung one fails requests fast (503
/// `SERVICE_UNAVAILABLE`) and turns `/readyz` not-ready, naming it, instead of piling them up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TimeoutsConfig {
    /// Milliseconds one store statement may take (`PARLEY_TIMEOUTS__STORE_MS`): Postgres'
    /// `statement_timeout` (a lock wait included) and the wait for a pooled connection; SQLite's
    /// wait for its write lock.
    pub store_ms: u64,
    /// Milliseconds a Redis command may wait for its reply (`PARLEY_TIMEOUTS__REDIS_MS`); the
    /// blocking job read is bounded by its own `BLOCK` time instead.
    pub redis_ms: u64,
    /// Milliseconds a REST or admin request, or accepting a socket's message, may take in all
    /// (`PARLEY_TIMEOUTS__REQUEST_MS`):
    /// the bound for a dependency that hangs without an error (a network that drops packets).
    pub request_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            store_ms: 5_000,
            redis_ms: 2_000,
            request_ms: 10_000,
        }
    }
}

impl TimeoutsConfig {
    /// The store's limit (at least 100 ms).
    pub fn store(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.store_ms.max(100))
    }

    /// A REST request's limit (at least 100 ms).
    pub fn request(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.request_ms.max(100))
    }

    /// Redis' limit (at least 100 ms).
    pub fn redis(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.redis_ms.max(100))
    }
}

/// Timings of the distributed mode (Redis).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterConfig {
    /// Lifetime of a connection slot's lease; a crashed gateway's slots free themselves within it.
    pub lease_secs: u64,
    /// A job silent this long in a worker's hands is given to another worker.
    pub reclaim_after_secs: u64,
    /// Deliveries after which a job is dead-lettered.
    pub max_attempts: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            lease_secs: 15,
            reclaim_after_secs: 30,
            max_attempts: 5,
        }
    }
}

/// Protocol-level limits (per-tenant limits live in the tenant's settings).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Largest accepted message `content`, in bytes (`MESSAGE_TOO_LARGE` above).
    pub max_content_bytes: usize,
    /// Largest WebSocket frame; bigger frames are refused by the protocol layer and the socket closed (1009).
    pub max_frame_bytes: usize,
    /// Seconds between server WebSocket pings.
    pub heartbeat_interval_secs: u64,
    /// Seconds without any frame from the client (pongs included) after which the socket is closed.
    pub idle_timeout_secs: u64,
    /// Recent events a gateway keeps in memory per chat with a local socket: sockets that keep
    /// up read them from there, one that falls further behind reads the chat log instead.
    pub chat_buffer: usize,
    /// Seconds a cached tenant (looked up by key) stays fresh; settings changes made through another
    /// process (the CLI) apply after at most this long.
    pub tenant_cache_secs: u64,
    /// Seconds a gateway believes a chat's owner, as a handshake or the chat's creation found
    /// it (a socket on its own chat then costs no store query). Deletions are announced to
    /// every gateway and forgotten at once; this bounds an entry whose announcement was lost.
    pub chat_owner_cache_secs: u64,
}

/// Worker settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerConfig {
    /// Most chats answered at the same time by one worker.
    pub max_concurrent_chats: usize,
    /// Seconds a worker may take to finish its answers after a stop signal.
    pub drain_timeout_secs: u64,
    /// Model endpoints by the name tenants give as `agent.provider`
    /// (`PARLEY_WORKER__MODELS__<NAME>__BASE_URL=…`); `openai` is preset.
    pub models: BTreeMap<String, ModelEndpoint>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: "0.0.0.0:8000".into(),
            listen_backlog: 4096,
            admin_token: None,
            admin_bind: None,
            database_url: "sqlite://parley.db".into(),
            redis_url: None,
            redis_prefix: "parley:".into(),
            metrics_bind: "0.0.0.0:9000".into(),
            log: "info".into(),
            otlp_endpoint: None,
            http_workers: 0,
            bootstrap_tenant: true,
            drain_timeout_secs: 30,
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            timeouts: TimeoutsConfig::default(),
            worker: WorkerConfig::default(),
            cluster: ClusterConfig::default(),
            delivery: DeliveryConfig::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_content_bytes: 32 * 1024,
            max_frame_bytes: 64 * 1024,
            heartbeat_interval_secs: 30,
            idle_timeout_secs: 90,
            chat_buffer: 1024,
            tenant_cache_secs: 2,
            chat_owner_cache_secs: 600,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            max_concurrent_chats: 1024,
            drain_timeout_secs: 30,
            models: default_endpoints(),
        }
    }
}

/// A configuration that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

impl Config {
    /// Reads defaults, then the file named by `PARLEY_CONFIG` if any, then `PARLEY_*` variables.
    pub fn load() -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Ok(path) = std::env::var("PARLEY_CONFIG") {
            figment = figment.merge(Toml::file(path));
        }
        figment
            .merge(Env::prefixed("PARLEY_").ignore(&["config"]).split("__"))
            .extract()
            .map_err(|e| ConfigError(Box::new(e)))
    }
}

/// A URL fit for logs, errors and command output: its password (if any) replaced by `***`
/// (database and Redis URLs carry credentials). A URL that does not parse loses everything
/// between `://` and its last `@`.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut parsed) if parsed.password().is_some() => {
            if parsed.set_password(Some("***")).is_ok() {
                parsed.to_string()
            } else {
                String::from("<url with credentials>")
            }
        }
        Ok(_) => raw.to_owned(),
        Err(_) => match (raw.find("://"), raw.rfind('@')) {
            (Some(start), Some(at)) if at > start => {
                format!("{}***{}", &raw[..start + 3], &raw[at..])
            }
            _ => raw.to_owned(),
        },
    }
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/parley"),
            "postgres://app:***@db:5432/parley"
        );
        assert_eq!(redact_url("redis://:pw@r:6379"), "redis://:***@r:6379");
        assert_eq!(redact_url("sqlite://parley.db"), "sqlite://parley.db");
        assert!(!redact_url("postgres://a:b c@[bad/x").contains("b c"));
    }
}
