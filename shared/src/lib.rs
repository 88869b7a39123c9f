//! Parley's shared library: everything the gateway and the worker both speak.
//!
//! - [`protocol`]: the one definition of every wire event, client frame, job and error code.
//! - [`config`]: layered configuration (defaults, optional file, `PARLEY_*` environment).
//! - [`store`]: the durable store trait and its SQLite implementation.
//! - [`broker`]: job queue, chat fan-out and cancel signals, with an in-process implementation.
//! - [`limits`]: tenant connection leases and request-rate windows.
//! - [`keys`]: API key generation and hashing.
//! - [`mocktext`]: the deterministic words of the mock models.
//! - [`telemetry`]: tracing set-up.
//! - [`shutdown`]: the stop signal shared by every long-running task.

pub mod broker;
pub mod config;
pub mod keys;
pub mod limits;
pub mod mocktext;
pub mod protocol;
pub mod shutdown;
pub mod store;
pub mod telemetry;

/// A Redis connection pool. Each pooled connection is multiplexed, but a command holds its
/// connection until it answers; with hundreds of chats publishing at once a small pool becomes
/// the queue, so it is sized well above deadpool's default.
fn redis_pool(
    url: impl Into<String>,
) -> Result<deadpool_redis::Pool, deadpool_redis::CreatePoolError> {
    let mut config = deadpool_redis::Config::from_url(url);
    config.pool = Some(deadpool_redis::PoolConfig::new(REDIS_POOL_SIZE));
    config.create_pool(Some(deadpool_redis::Runtime::Tokio1))
}

/// Connections per Redis pool.
const REDIS_POOL_SIZE: usize = 64;
