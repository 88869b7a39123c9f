//! Cluster-wide limits in Redis: connection slots as leases that expire, and atomic REST windows.
//!
//! A tenant's slots are a sorted set (`{prefix}conns:{tenant}`) of lease ids scored by their
//! expiry; a chat's open sockets are another (`{prefix}chatconns:{chat}`). Taking a slot drops
//! expired leases and counts the rest in one script, with Redis's own clock, so every gateway
//! sees the same count. Each gateway refreshes its live leases every third of the lease time;
//! the leases of a gateway that died expire by themselves within `lease_ttl`. Dropping a
//! [`ConnectionLease`] removes it at once.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use async_trait::async_trait;
use dashmap::DashMap;
use deadpool_redis::{Config as PoolConfig, Pool, Runtime};
use redis::Script;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{ConnectionLease, Limits, LimitsError, RateDecision};

/// Redis-backed [`Limits`].
pub struct RedisLimits {
    pool: Pool,
    prefix: String,
    lease_ttl: Duration,
    live: DashMap<Uuid, (Uuid, Uuid)>,
    releases: mpsc::UnboundedSender<Uuid>,
    acquire: Script,
    window: Script,
}

fn err(e: impl std::fmt::Display) -> LimitsError {
    LimitsError(e.to_string())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Release {
    id: Uuid,
    tx: mpsc::UnboundedSender<Uuid>,
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self.tx.send(self.id);
    }
}

impl RedisLimits {
    /// Connects and starts the task that refreshes and releases this process's leases (it ends
    /// when the limits are dropped).
    pub async fn connect(
        url: &str,
        prefix: &str,
        lease_ttl: Duration,
    ) -> Result<Arc<Self>, LimitsError> {
        let pool = PoolConfig::from_url(url)
            .create_pool(Some(Runtime::Tokio1))
            .map_err(err)?;
        let (releases, rx) = mpsc::unbounded_channel();
        let limits = Arc::new(Self {
            pool,
            prefix: prefix.to_owned(),
            lease_ttl,
            live: DashMap::new(),
            releases,
            acquire: Script::new(
                "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) \
                 redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) \
                 if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end \
                 local exp = now + tonumber(ARGV[2]) \
                 redis.call('ZADD', KEYS[1], exp, ARGV[3]) redis.call('PEXPIRE', KEYS[1], ARGV[2]) \
                 redis.call('ZADD', KEYS[2], exp, ARGV[3]) redis.call('PEXPIRE', KEYS[2], ARGV[2]) \
                 return 1",
            ),
            window: Script::new(
                "local c = redis.call('INCR', KEYS[1]) \
                 if c == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end \
                 return {c, redis.call('PTTL', KEYS[1])}",
            ),
        });
        tokio::spawn(keeper(Arc::downgrade(&limits), rx));
        Ok(limits)
    }

    fn tenant_key(&self, tenant_id: Uuid) -> String {
        format!("{}conns:{tenant_id}", self.prefix)
    }

    fn chat_key(&self, chat_id: Uuid) -> String {
        format!("{}chatconns:{chat_id}", self.prefix)
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, LimitsError> {
        self.pool.get().await.map_err(err)
    }

    /// Live (unexpired) members of a lease set.
    async fn count_live(&self, key: &str) -> Result<u32, LimitsError> {
        let mut c = self.conn().await?;
        let (secs, micros): (u64, u64) =
            redis::cmd("TIME").query_async(&mut *c).await.map_err(err)?;
        let now = secs * 1000 + micros / 1000;
        redis::cmd("ZCOUNT")
            .arg(key)
            .arg(now)
            .arg("+inf")
            .query_async(&mut *c)
            .await
            .map_err(err)
    }

    async fn refresh_all(&self) -> Result<(), LimitsError> {
        if self.live.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let (secs, micros): (u64, u64) =
            redis::cmd("TIME").query_async(&mut *c).await.map_err(err)?;
        let exp = secs * 1000 + micros / 1000 + ms(self.lease_ttl);
        let mut pipe = redis::pipe();
        for entry in &self.live {
            let (id, (tenant, chat)) = (entry.key(), entry.value());
            for key in [self.tenant_key(*tenant), self.chat_key(*chat)] {
                pipe.cmd("ZADD")
                    .arg(&key)
                    .arg("XX")
                    .arg(exp)
                    .arg(id.to_string())
                    .ignore();
                pipe.cmd("PEXPIRE")
                    .arg(&key)
                    .arg(ms(self.lease_ttl))
                    .ignore();
            }
        }
        pipe.query_async::<()>(&mut *c).await.map_err(err)
    }

    async fn release(&self, id: Uuid) -> Result<(), LimitsError> {
        let Some((_, (tenant, chat))) = self.live.remove(&id) else {
            return Ok(());
        };
        let mut c = self.conn().await?;
        redis::pipe()
            .cmd("ZREM")
            .arg(self.tenant_key(tenant))
            .arg(id.to_string())
            .ignore()
            .cmd("ZREM")
            .arg(self.chat_key(chat))
            .arg(id.to_string())
            .ignore()
            .query_async::<()>(&mut *c)
            .await
            .map_err(err)
    }
}

/// Refreshes live leases every third of their lifetime and removes released ones at once.
async fn keeper(limits: Weak<RedisLimits>, mut releases: mpsc::UnboundedReceiver<Uuid>) {
    let period = limits
        .upgrade()
        .map_or(Duration::from_secs(5), |l| l.lease_ttl / 3);
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            released = releases.recv() => {
                let (Some(id), Some(l)) = (released, limits.upgrade()) else { return };
                if let Err(e) = l.release(id).await {
                    tracing::warn!(error = %e, "could not release a connection lease; it will expire");
                }
            }
            _ = tick.tick() => {
                let Some(l) = limits.upgrade() else { return };
                if let Err(e) = l.refresh_all().await {
                    tracing::warn!(error = %e, "could not refresh connection leases");
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
        let id = Uuid::new_v4();
        let mut c = self.conn().await?;
        let taken: i64 = self
            .acquire
            .key(self.tenant_key(tenant_id))
            .key(self.chat_key(chat_id))
            .arg(max)
            .arg(ms(self.lease_ttl))
            .arg(id.to_string())
            .invoke_async(&mut *c)
            .await
            .map_err(err)?;
        if taken == 0 {
            return Ok(None);
        }
        self.live.insert(id, (tenant_id, chat_id));
        Ok(Some(ConnectionLease::new(Release {
            id,
            tx: self.releases.clone(),
        })))
    }

    async fn tenant_connections(&self, tenant_id: Uuid) -> Result<u32, LimitsError> {
        self.count_live(&self.tenant_key(tenant_id)).await
    }

    async fn chat_has_connections(&self, chat_id: Uuid) -> Result<bool, LimitsError> {
        Ok(self.count_live(&self.chat_key(chat_id)).await? > 0)
    }

    async fn hit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, LimitsError> {
        let mut c = self.conn().await?;
        let (count, ttl): (u64, i64) = self
            .window
            .key(format!("{}rate:{key}", self.prefix))
            .arg(ms(window))
            .invoke_async(&mut *c)
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
