//! Tenant-wide limits: connection slots (leases) and request-rate windows.
//!
//! Per-connection message rate is not here: it is local to a socket and uses `governor` in the
//! gateway. These limits span the tenant, so in the distributed product they live in Redis; the
//! embedded [`memory::MemoryLimits`] keeps them in the process.

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

/// Limit-store failures.
#[derive(Debug, thiserror::Error)]
#[error("limits unavailable: {0}")]
pub struct LimitsError(#[source] pub crate::Cause);

impl LimitsError {
    /// A failure caused by `cause`.
    pub fn new(cause: impl Into<crate::Cause>) -> Self {
        Self(cause.into())
    }
}

/// A held connection slot; dropping it gives the slot back.
pub struct ConnectionLease {
    _release: Box<dyn Send + Sync>,
}

impl ConnectionLease {
    /// Wraps a guard whose `Drop` releases the slot.
    pub fn new(release: impl Send + Sync + 'static) -> Self {
        Self {
            _release: Box::new(release),
        }
    }
}

/// The outcome of counting one request against a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The window's limit.
    pub limit: u32,
    /// Requests left in the current window.
    pub remaining: u32,
    /// Time until the window resets.
    pub reset_after: Duration,
}

/// The tenant-wide limit interface.
#[async_trait]
pub trait Limits: Send + Sync + 'static {
    /// Takes one of the tenant's `max` connection slots for a socket on `chat_id`;
    /// `None` when all are taken.
    async fn acquire_connection(
        &self,
        tenant_id: Uuid,
        chat_id: Uuid,
        max: u32,
    ) -> Result<Option<ConnectionLease>, LimitsError>;
    /// Sockets the tenant holds now.
    async fn tenant_connections(&self, tenant_id: Uuid) -> Result<u32, LimitsError>;
    /// Sockets open on the chat (all gateways together).
    async fn chat_connections(&self, chat_id: Uuid) -> Result<u32, LimitsError>;
    /// Counts one request against `key`'s fixed window of `window` allowing `limit` requests.
    async fn hit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, LimitsError>;
}
