//! Parley's shared library: everything the gateway and the worker both speak.
//!
//! - [`protocol`]: the one definition of every wire event, client frame, job and error code.
//! - [`config`]: layered configuration (defaults, optional file, `PARLEY_*` environment).
//! - [`store`]: the durable store trait and its SQLite implementation.
//! - [`broker`]: job queue, chat fan-out and cancel signals, with an in-process implementation.
//! - [`limits`]: tenant connection leases and request-rate windows.
//! - [`keys`]: API key generation and hashing.
//! - [`metrics`]: the Prometheus metrics and their `/metrics` server.
//! - [`health`]: `/healthz` and `/readyz`, for the gateway and the worker alike.
//! - [`mocktext`]: the deterministic words of the mock models.
//! - [`redis_conn`]: the connections to Redis of the distributed broker and limits.
//! - [`telemetry`]: tracing set-up.
//! - [`shutdown`]: the stop signal shared by every long-running task.

pub mod broker;
pub mod config;
pub mod health;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod mocktext;
pub mod protocol;
pub mod redis_conn;
pub mod shutdown;
pub mod store;
pub mod telemetry;

/// The cause of a failure of a dependency (Redis, a lock), kept as the `#[source]` of the error
/// that reports it, so that the one place mapping errors to responses can log the whole chain.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;
