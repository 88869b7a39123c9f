//! Worker liveness: each worker holds a short lease (`worker:{consumer}`, `worker_lease_ms`),
//! renewed three times per lease. A worker looking for work also looks, once per third of a
//! lease, for jobs pending with consumers whose lease lapsed, and claims them at once: a dead
//! worker's jobs are taken over within about one lease, not after the long idle reclaim (which
//! stays as the fallback for consumers that never held a lease). A worker that was only slow
//! and loses its jobs this way is fenced: its publishes for them are refused.
//!
//! The same module elects the one worker that runs the unanswered sweep at a time.

use std::{sync::Weak, time::Duration};

use redis::AsyncCommands;

use super::{GROUP, RedisBroker, unavailable};
use crate::broker::{BrokerError, Delivery};
use crate::metrics::metrics;

/// Pending jobs claimed from one dead consumer at a time.
const TAKE_OVER_BATCH: usize = 100;

impl RedisBroker {
    fn lease_key(&self, consumer: &str) -> String {
        self.key(&format!("worker:{consumer}"))
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.cfg.delivery.worker_lease_ms.max(300))
    }

    /// Starts renewing this process's lease (workers only); ends once the broker is dropped.
    pub fn hold_lease(self: &std::sync::Arc<Self>) {
        tokio::spawn(renew(std::sync::Arc::downgrade(self)));
    }

    /// Whether it is time to look for dead workers' jobs.
    pub(super) fn takeover_due(&self) -> bool {
        let mut last = self
            .last_takeover
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.elapsed() < self.lease() / 3 {
            return false;
        }
        *last = std::time::Instant::now();
        true
    }

    /// Claims the pending jobs of consumers whose lease lapsed.
    pub(super) async fn take_over(&self) -> Result<Vec<Delivery>, BrokerError> {
        let jobs = self.key("jobs");
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(&jobs)
            .arg(GROUP)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let mut taken = Vec::new();
        for consumer in pending_consumers(&summary) {
            if consumer == self.cfg.consumer {
                continue;
            }
            let alive: bool = self
                .conn()
                .exists(self.lease_key(&consumer))
                .await
                .map_err(unavailable)?;
            if alive || !self.ever_leased(&consumer).await? {
                continue;
            }
            taken.extend(self.claim_from(&consumer).await?);
        }
        Ok(taken)
    }

    /// Whether the consumer is a worker that held a lease (gateways and old workers never do).
    async fn ever_leased(&self, consumer: &str) -> Result<bool, BrokerError> {
        self.conn()
            .sismember(self.key("workers"), consumer)
            .await
            .map_err(unavailable)
    }

    async fn claim_from(&self, consumer: &str) -> Result<Vec<Delivery>, BrokerError> {
        let jobs = self.key("jobs");
        let pending: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&jobs)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(TAKE_OVER_BATCH)
            .arg(consumer)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if pending.ids.len() < TAKE_OVER_BATCH {
            // Its last jobs: forget the dead consumer once they are claimed below.
            let forgot: redis::RedisResult<()> = redis::pipe()
                .srem(self.key("workers"), consumer)
                .ignore()
                .query_async(&mut self.conn())
                .await;
            if let Err(e) = forgot {
                tracing::debug!(error = %e, "could not forget a dead worker");
            }
        }
        if pending.ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = pending.ids.iter().map(|p| p.id.as_str()).collect();
        let claimed: redis::streams::StreamClaimReply = redis::cmd("XCLAIM")
            .arg(&jobs)
            .arg(GROUP)
            .arg(&self.cfg.consumer)
            .arg(0)
            .arg(&ids)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        tracing::warn!(
            consumer,
            jobs = claimed.ids.len(),
            "taking over the jobs of a dead worker"
        );
        let mut taken = Vec::new();
        for entry in claimed.ids {
            let before = pending
                .ids
                .iter()
                .find(|p| p.id == entry.id)
                .map_or(1, |p| p.times_delivered);
            let attempt = u32::try_from(before + 1).unwrap_or(u32::MAX);
            metrics().jobs_reclaimed.inc();
            match self.delivery(&entry, attempt) {
                Ok(d) => taken.push(d),
                Err(e) => self.set_aside(&entry, &e).await,
            }
        }
        Ok(taken)
    }

    /// Tries to become the worker that runs the unanswered sweep for the next `period`.
    pub(super) async fn lead(&self, period: Duration) -> Result<bool, BrokerError> {
        let taken: Option<String> = redis::cmd("SET")
            .arg(self.key("sweeper"))
            .arg(&self.cfg.consumer)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(period.as_millis()).unwrap_or(u64::MAX))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(taken.is_some())
    }
}

/// The consumer names in an `XPENDING key group` summary.
fn pending_consumers(summary: &redis::Value) -> Vec<String> {
    let redis::Value::Array(parts) = summary else {
        return Vec::new();
    };
    let Some(redis::Value::Array(consumers)) = parts.get(3) else {
        return Vec::new();
    };
    consumers
        .iter()
        .filter_map(|c| match c {
            redis::Value::Array(pair) => pair.first().and_then(|name| match name {
                redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                redis::Value::SimpleString(s) => Some(s.clone()),
                _ => None,
            }),
            _ => None,
        })
        .collect()
}

/// Renews the lease three times per lease until the broker is gone.
async fn renew(broker: Weak<RedisBroker>) {
    loop {
        let Some(b) = broker.upgrade() else { return };
        let lease = b.lease();
        let ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        let renewed: redis::RedisResult<()> = redis::pipe()
            .cmd("SET")
            .arg(b.lease_key(&b.cfg.consumer))
            .arg(1)
            .arg("PX")
            .arg(ms)
            .ignore()
            .sadd(b.key("workers"), &b.cfg.consumer)
            .ignore()
            .query_async(&mut b.conn())
            .await;
        if let Err(e) = renewed {
            tracing::warn!(error = %e, "could not renew the worker lease");
        }
        drop(b);
        tokio::time::sleep(lease / 3).await;
    }
}
