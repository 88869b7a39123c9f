//! Cluster-wide limits in Redis: connection slots counted per gateway with a liveness lease,
//! and atomic REST windows.
//!
//! A tenant's open sockets are a hash (`{prefix}conns:{tenant}`) of per-gateway counts; a chat's
//! are another (`{prefix}chatconns:{chat}`). Each gateway keeps a liveness key
//! (`{prefix}alive:{gateway}`) alive with one `SET … PX` every third of `lease_ttl`, whatever
//! its number of sockets. Counting (in one script, so gateways never race) adds the counts of
//! live gateways and drops those of dead ones: the slots of a gateway that crashed free
//! themselves within `lease_ttl`. Dropping a [`ConnectionLease`] gives its slot back at once
//! (one task writes releases back in order, as the counts this gateway then holds).
//!
//! Counts heal: each gateway keeps its own sockets per tenant and per chat in memory (the
//! truth) and writes them back to Redis with its heartbeat whenever Redis may have lost them:
//! at once when its liveness key was gone (Redis restarted empty, `FLUSHALL`, or a lease that
//! lapsed while Redis was unreachable), for the slots whose release or take did not get an
//! answer (the release is retried that way), and all of them every
//! [`FULL_REASSERT_EVERY`]th heartbeat. A count taken or given back while the write-back is on
//! its way can be off by that one slot until the next full write-back.
//!
//! The scripts read the liveness keys of other gateways, which suits a single Redis (or a
//! primary with replicas), not Redis Cluster.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use async_trait::async_trait;
use dashmap::DashMap;
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

/// Heartbeats between two write-backs of every count this gateway holds (20 s with the default
/// 15 s lease).
pub const FULL_REASSERT_EVERY: u64 = 4;

/// Commands per write-back pipeline.
const REASSERT_CHUNK: usize = 512;

/// One slot: a tenant's socket on a chat.
type Slot = (Uuid, Uuid);

/// This gateway's own sockets, the truth its counts in Redis are healed to.
#[derive(Default)]
struct Held {
    tenants: DashMap<Uuid, u32>,
    chats: DashMap<Uuid, u32>,
    /// Slots whose take or release got no answer from Redis: written back at the next heartbeat.
    unsure: Mutex<HashSet<Slot>>,
}

impl Held {
    fn add(&self, (tenant, chat): Slot) {
        *self.tenants.entry(tenant).or_default() += 1;
        *self.chats.entry(chat).or_default() += 1;
    }

    fn remove(&self, (tenant, chat): Slot) {
        fn down(map: &DashMap<Uuid, u32>, id: Uuid) {
            map.remove_if_mut(&id, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
        down(&self.tenants, tenant);
        down(&self.chats, chat);
    }

    fn mark_unsure(&self, slot: Slot) {
        if let Ok(mut unsure) = self.unsure.lock() {
            unsure.insert(slot);
        }
    }

    fn take_unsure(&self) -> HashSet<Slot> {
        self.unsure
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or_default()
    }
}

/// Redis-backed [`Limits`].
pub struct RedisLimits {
    redis: ConnectionManager,
    prefix: String,
    gateway: String,
    lease_ttl: Duration,
    releases: mpsc::UnboundedSender<Slot>,
    held: Arc<Held>,
    acquire: Script,
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

/// Gives a slot back when the socket's lease is dropped: at once in this gateway's own count,
/// then in Redis.
struct Release {
    slot: Slot,
    held: Arc<Held>,
    tx: mpsc::UnboundedSender<Slot>,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.held.remove(self.slot);
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
            held: Arc::default(),
            acquire: Script::new(&format!(
                "{LIVE_SUM} if live_sum(KEYS[1], ARGV[3]) >= tonumber(ARGV[1]) then return 0 end \
                 redis.call('HINCRBY', KEYS[1], ARGV[2], 1) redis.call('HINCRBY', KEYS[2], ARGV[2], 1) \
                 return 1"
            )),
            count: Script::new(&format!("{LIVE_SUM} return live_sum(KEYS[1], ARGV[1])")),
            window: Script::new(
                "local c = redis.call('INCR', KEYS[1]) \
                 if c == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end \
                 return {c, redis.call('PTTL', KEYS[1])}",
            ),
        });
        limits.heartbeat(0).await?;
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

    /// Marks this gateway alive for another `lease_ttl`, then writes its counts back where
    /// Redis may have lost them (see the module doc). `beat` numbers the heartbeats.
    async fn heartbeat(&self, beat: u64) -> Result<(), LimitsError> {
        let mut c = self.conn();
        let previous: Option<String> = redis::cmd("SET")
            .arg(format!("{}{}", self.alive_prefix(), self.gateway))
            .arg(1)
            .arg("PX")
            .arg(ms(self.lease_ttl))
            .arg("GET")
            .query_async(&mut c)
            .await
            .map_err(err)?;
        let everything = previous.is_none() || beat.is_multiple_of(FULL_REASSERT_EVERY);
        let unsure = self.held.take_unsure();
        if let Err(e) = self.write_back(everything, &unsure).await {
            for slot in unsure {
                self.held.mark_unsure(slot);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Sets this gateway's field of each count to what it holds (every count, or only those of
    /// `unsure` slots).
    async fn write_back(
        &self,
        everything: bool,
        unsure: &HashSet<Slot>,
    ) -> Result<(), LimitsError> {
        let count = |map: &DashMap<Uuid, u32>, id: &Uuid| map.get(id).map_or(0, |n| *n);
        let mut fields: Vec<(String, u32)> = Vec::new();
        if everything {
            let tenants = self
                .held
                .tenants
                .iter()
                .map(|e| (self.tenant_key(*e.key()), *e.value()));
            let chats = self
                .held
                .chats
                .iter()
                .map(|e| (self.chat_key(*e.key()), *e.value()));
            fields.extend(tenants.chain(chats));
        }
        for (tenant, chat) in unsure {
            fields.push((self.tenant_key(*tenant), count(&self.held.tenants, tenant)));
            fields.push((self.chat_key(*chat), count(&self.held.chats, chat)));
        }
        let mut c = self.conn();
        for chunk in fields.chunks(REASSERT_CHUNK) {
            let mut pipe = redis::pipe();
            for (key, n) in chunk {
                match n {
                    0 => pipe.hdel(key, &self.gateway).ignore(),
                    n => pipe.hset(key, &self.gateway, n).ignore(),
                };
            }
            pipe.query_async::<()>(&mut c).await.map_err(err)?;
        }
        Ok(())
    }

    /// Gives a released slot back: this gateway's fields of the slot's counts set to what it
    /// holds now (a count, not a decrement, so that a count that drifted heals too).
    async fn give_back(&self, slot: Slot) -> Result<(), LimitsError> {
        self.write_back(false, &HashSet::from([slot])).await
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

/// Keeps this gateway alive every third of the lease time and gives released slots back; a
/// release that fails is retried by the next heartbeat's write-back.
async fn keeper(limits: Weak<RedisLimits>, mut releases: mpsc::UnboundedReceiver<Slot>) {
    let period = limits
        .upgrade()
        .map_or(Duration::from_secs(5), |l| l.lease_ttl / 3);
    let mut tick = tokio::time::interval(period);
    let mut beat = 0u64;
    loop {
        tokio::select! {
            released = releases.recv() => {
                let (Some(slot), Some(l)) = (released, limits.upgrade()) else { return };
                if let Err(e) = l.give_back(slot).await {
                    l.held.mark_unsure(slot);
                    tracing::warn!(error = %e, "could not give a connection slot back; retrying with the heartbeat");
                }
            }
            _ = tick.tick() => {
                let Some(l) = limits.upgrade() else { return };
                beat += 1;
                if let Err(e) = l.heartbeat(beat).await {
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
        let slot = (tenant_id, chat_id);
        let taken: i64 = self
            .acquire
            .key(self.tenant_key(tenant_id))
            .key(self.chat_key(chat_id))
            .arg(max)
            .arg(&self.gateway)
            .arg(self.alive_prefix())
            .invoke_async(&mut c)
            .await
            .map_err(|e| {
                // The script may have run with its answer lost.
                self.held.mark_unsure(slot);
                err(e)
            })?;
        if taken == 0 {
            return Ok(None);
        }
        self.held.add(slot);
        Ok(Some(ConnectionLease::new(Release {
            slot,
            held: self.held.clone(),
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
