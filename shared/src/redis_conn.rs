//! Connections to Redis: one multiplexed connection for quick commands, a pool for blocking ones.
//!
//! A pooled connection serves one caller at a time, and deadpool checks it with a round trip
//! (`UNWATCH` + `PING`) on every checkout: at thousands of commands per second those checks were
//! half of all Redis round trips. Quick commands (publishes, scripts, counters) therefore share
//! one multiplexed connection ([`ConnectionManager`]): concurrent callers' commands are
//! pipelined on it, so many leave in one write, and it reconnects by itself after an I/O error
//! (a Redis restart). A blocking command (`XREADGROUP … BLOCK`) would hold up every reply queued
//! behind it there, so it takes a pooled connection of its own.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Pooled connections, for blocking commands only.
const POOL_SIZE: usize = 8;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Failures to set up connections (a malformed URL); failures to reach Redis show up per command.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// The URL or client settings were refused.
    #[error("redis: {0}")]
    Client(#[from] redis::RedisError),
    /// The pool could not be built.
    #[error("redis pool: {0}")]
    Pool(#[from] deadpool_redis::CreatePoolError),
}

/// The multiplexed connection alone, for a user that runs no blocking command (the limits);
/// it connects on first use. A command waits at most `timeout` for its reply, then fails (and
/// `/readyz` turns not-ready) rather than hold its caller.
pub fn shared_connection(
    url: &str,
    timeout: Duration,
) -> Result<ConnectionManager, RedisSetupError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_max_delay(Duration::from_secs(2));
    Ok(ConnectionManager::new_lazy_with_config(client, config)?)
}

/// A process's connections to one Redis.
#[derive(Clone)]
pub struct Redis {
    shared: ConnectionManager,
    pool: deadpool_redis::Pool,
}

impl Redis {
    /// Sets up the connections to `url`; they connect on first use. Quick commands wait at
    /// most `timeout` for their reply.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, RedisSetupError> {
        let shared = shared_connection(url, timeout)?;
        let mut pool = deadpool_redis::Config::from_url(url);
        pool.pool = Some(deadpool_redis::PoolConfig::new(POOL_SIZE));
        let pool = pool.create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
        Ok(Self { shared, pool })
    }

    /// The shared multiplexed connection (a cheap handle) for commands that answer at once.
    pub fn shared(&self) -> ConnectionManager {
        self.shared.clone()
    }

    /// A pooled connection of its own, for a blocking command.
    pub async fn dedicated(&self) -> Result<deadpool_redis::Connection, deadpool_redis::PoolError> {
        self.pool.get().await
    }
}
