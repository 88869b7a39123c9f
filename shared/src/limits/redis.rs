//! Cluster-wide limits in Redis: connection slots counted per gateway with a liveness lease,
//! and atomic REST windows.
//!
//! A tenant's open sockets are a hash (`{prefix}conns:{tenant}`) of per-gateway counts; a chat's
//! are another (`{prefix}chatconns:{chat}`). Each gateway keeps a liveness key
//! (`{prefix}alive:{gateway}`) alive with one `SET … PX` every third of `lease_ttl`, whatever
//! its number of sockets. Counting (in one script, so gateways never race) adds the counts of
//! live gateways and drops those of dead ones: the slots of a gateway that crashed free
//! themselves within `lease_ttl`. Dropping a [`ConnectionLease`] gives its slot back at once.
//!
//! The scripts read the liveness keys of other gateways, which suits a single Redis (or a
//! primary with replicas), not Redis Cluster.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use async_trait::async_trait;
use redis::Script;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{ConnectionLease, Limits, LimitsError, RateDecision};

/// Sums the live gateways' counts of a hash (dropping dead gateways' fields).
const LIVE_SUM: &str = "local function live_sum(key, alive) \
       local total = 0 local f = redis.call('HGETALL', key) \
       for i = 1, #f, 2 do \
         if redis.call('EXISTS', alive .. f[i]) == 1 then total = total + tonumber(f[i + 1]) \
         else redis.call('HDEL', key, f[i]) end \
       end return total end ";

/// Redis-backed [`Limits`].
pub struct RedisLimits {
    redis: ConnectionManager,
    prefix: String,
    gateway: String,
    lease_ttl: Duration,
    releases: mpsc::UnboundedSender<(Uuid, Uuid)>,
    acquire: Script,
    release: Script,
    count: Script,
    window: Script,
}

/// Every failed Redis command passes here, so this is where `redis_errors` counts them.
fn err(e: impl Into<crate::Cause>) -> LimitsError {
    crate::metrics::metrics().redis_errors.inc();
    LimitsError::new(e)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Gives a slot back when the socket's lease is dropped.
struct Release {
    slot: (Uuid, Uuid),
    tx: mpsc::UnboundedSender<(Uuid, Uuid)>,
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self.tx.send(self.slot);
    }
}

impl RedisLimits {
    /// Connects, marks this gateway alive and starts the task that keeps it so and gives slots
    /// back (it ends when the limits are dropped).
    pub async fn connect(
        url: &str,
        prefix: &str,
        lease_ttl: Duration,
        command_timeout: Duration,
    ) -> Result<Arc<Self>, LimitsError> {
        let redis = crate::redis_conn::shared_connection(url, command_timeout).map_err(err)?;
        let (releases, rx) = mpsc::unbounded_channel();
        let limits = Arc::new(Self {
            redis,
            prefix: prefix.to_owned(),
            gateway: Uuid::new_v4().to_string(),
            lease_ttl,
            releases,
            acquire: Script::new(&format!(
                "{LIVE_SUM} if live_sum(KEYS[1], ARGV[3]) >= tonumber(ARGV[1]) then return 0 end \
                 redis.call('HINCRBY', KEYS[1], ARGV[2], 1) redis.call('HINCRBY', KEYS[2], ARGV[2], 1) \
                 return 1"
            )),
            release: Script::new(
                "for _, key in ipairs(KEYS) do \
                   if redis.call('HINCRBY', key, ARGV[1], -1) <= 0 then redis.call('HDEL', key, ARGV[1]) end \
                 end return 1",
            ),
            count: Script::new(&format!("{LIVE_SUM} return live_sum(KEYS[1], ARGV[1])")),
            window: Script::new(
                "local c = redis.call('INCR', KEYS[1]) \
                 if c == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end \
                 return {c, redis.call('PTTL', KEYS[1])}",
            ),
        });
        limits.heartbeat().await?;
        tokio::spawn(keeper(Arc::downgrade(&limits), rx));
        Ok(limits)
    }

    fn tenant_key(&self, tenant_id: Uuid) -> String {
        format!("{}conns:{tenant_id}", self.prefix)
    }

    fn chat_key(&self, chat_id: Uuid) -> String {
        format!("{}chatconns:{chat_id}", self.prefix)
    }

    fn alive_prefix(&self) -> String {
        format!("{}alive:", self.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.redis.clone()
    }

    /// Marks this gateway alive for another `lease_ttl`.
    async fn heartbeat(&self) -> Result<(), LimitsError> {
        let mut c = self.conn();
        redis::cmd("SET")
            .arg(format!("{}{}", self.alive_prefix(), self.gateway))
            .arg(1)
            .arg("PX")
            .arg(ms(self.lease_ttl))
            .query_async::<()>(&mut c)
            .await
            .map_err(err)
    }

    async fn give_back(&self, (tenant, chat): (Uuid, Uuid)) -> Result<(), LimitsError> {
        let mut c = self.conn();
        self.release
            .key(self.tenant_key(tenant))
            .key(self.chat_key(chat))
            .arg(&self.gateway)
            .invoke_async::<i64>(&mut c)
            .await
            .map(drop)
            .map_err(err)
    }

    async fn live_count(&self, key: String) -> Result<u32, LimitsError> {
        let mut c = self.conn();
        self.count
            .key(key)
            .arg(self.alive_prefix())
            .invoke_async(&mut c)
            .await
            .map_err(err)
    }
}

/// Keeps this gateway alive every third of the lease time and gives released slots back.
async fn keeper(limits: Weak<RedisLimits>, mut releases: mpsc::UnboundedReceiver<(Uuid, Uuid)>) {
    let period = limits
        .upgrade()
        .map_or(Duration::from_secs(5), |l| l.lease_ttl / 3);
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            released = releases.recv() => {
                let (Some(slot), Some(l)) = (released, limits.upgrade()) else { return };
                if let Err(e) = l.give_back(slot).await {
                    tracing::warn!(error = %e, "could not give a connection slot back");
                }
            }
            _ = tick.tick() => {
                let Some(l) = limits.upgrade() else { return };
                if let Err(e) = l.heartbeat().await {
                    tracing::warn!(error = %e, "could not renew this gateway's connection lease");
                }
            }
        }
    }
}

#[async_trait]
impl Limits for RedisLimits {
    async fn acquire_connection(
        &self,
        tenant_id: Uuid,
        chat_id: Uuid,
        max: u32,
    ) -> Result<Option<ConnectionLease>, LimitsError> {
        let mut c = self.conn();
        let taken: i64 = self
            .acquire
            .key(self.tenant_key(tenant_id))
            .key(self.chat_key(chat_id))
            .arg(max)
            .arg(&self.gateway)
            .arg(self.alive_prefix())
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        if taken == 0 {
            return Ok(None);
        }
        Ok(Some(ConnectionLease::new(Release {
            slot: (tenant_id, chat_id),
            tx: self.releases.clone(),
        })))
    }

    async fn tenant_connections(&self, tenant_id: Uuid) -> Result<u32, LimitsError> {
        self.live_count(self.tenant_key(tenant_id)).await
    }

    async fn chat_connections(&self, chat_id: Uuid) -> Result<u32, LimitsError> {
        self.live_count(self.chat_key(chat_id)).await
    }

    async fn hit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, LimitsError> {
        let mut c = self.conn();
        let (count, ttl): (u64, i64) = self
            .window
            .key(format!("{}rate:{key}", self.prefix))
            .arg(ms(window))
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        let used = u32::try_from(count).unwrap_or(u32::MAX);
        Ok(RateDecision {
            allowed: used <= limit,
            limit,
            remaining: limit.saturating_sub(used),
            reset_after: Duration::from_millis(u64::try_from(ttl.max(0)).unwrap_or(0)),
        })
    }
}
