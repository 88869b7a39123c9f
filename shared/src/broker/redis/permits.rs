//! Answer permits: a tenant's `max_concurrent_answers` held across every worker.
//!
//! Each tenant has a sorted set (`{prefix}answering:{tenant}`) of the answers running for it,
//! scored by when their permit lapses (Redis's own clock, so workers' clocks never disagree). A
//! worker takes a permit before it streams an answer, renews it while the answer runs (a third of
//! the worker lease at a time) and gives it back at the end; a dead worker's permits lapse within
//! a lease, so they never leak. Taking, renewing and pruning lapsed permits are one script.

use redis::Script;
use uuid::Uuid;

use super::{RedisBroker, unavailable};
use crate::broker::BrokerError;

/// KEYS: the tenant's set. ARGV: holder, cap (0: renew only, whatever the count), lease ms.
/// Returns 1 when the holder has the permit.
pub(super) fn permit_script() -> Script {
    Script::new(
        "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) \
         local lease = tonumber(ARGV[3]) \
         redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) \
         local held = redis.call('ZSCORE', KEYS[1], ARGV[1]) \
         if not held and tonumber(ARGV[2]) > 0 \
            and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end \
         redis.call('ZADD', KEYS[1], now + lease, ARGV[1]) \
         redis.call('PEXPIRE', KEYS[1], lease * 2) return 1",
    )
}

impl RedisBroker {
    fn answering_key(&self, tenant: Uuid) -> String {
        self.key(&format!("answering:{tenant}"))
    }

    /// Runs the permit script; `cap` 0 renews.
    pub(super) async fn permit(
        &self,
        tenant: Uuid,
        holder: &str,
        cap: u32,
    ) -> Result<bool, BrokerError> {
        let lease = self.cfg.delivery.worker_lease_ms.max(300);
        let held: i64 = self
            .scripts
            .permit
            .key(self.answering_key(tenant))
            .arg(holder)
            .arg(cap)
            .arg(lease)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(held == 1)
    }

    /// Gives a permit back.
    pub(super) async fn drop_permit(&self, tenant: Uuid, holder: &str) -> Result<(), BrokerError> {
        let _: i64 = redis::cmd("ZREM")
            .arg(self.answering_key(tenant))
            .arg(holder)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
