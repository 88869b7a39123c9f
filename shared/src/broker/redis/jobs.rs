//! The job side of the Redis broker: reading, reclaiming, ordering, acknowledging and
//! dead-lettering jobs (see the parent module for the scheme).

use std::{sync::Weak, time::Duration};

use async_trait::async_trait;
use redis::{AsyncCommands, streams::StreamReadReply};

use super::{ACKED_MEMORY, GROUP, READ_BATCH, RedisBroker, unavailable};
use crate::broker::{BrokerError, ChatLog, Delivery, JobQueue, PublishOptions};
use crate::metrics::metrics;
use crate::protocol::{ErrorCode, Job, ServerEvent};
use uuid::Uuid;

/// How long a waiting message counts in its tenant's backlog at most (an hour).
const BACKLOG_STALE_MS: i64 = 3_600_000;

impl RedisBroker {
    /// Whether it is time to look for jobs left by silent workers (twice per reclaim period).
    fn reclaim_due(&self) -> bool {
        let mut last = self
            .last_reclaim
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.elapsed() < self.cfg.reclaim_after / 2 {
            return false;
        }
        *last = std::time::Instant::now();
        true
    }

    /// New jobs for this consumer: up to a batch, waiting briefly when there are none.
    async fn read_new(&self) -> Result<Vec<Delivery>, BrokerError> {
        let mut c = self.redis.dedicated().await.map_err(unavailable)?;
        let reply: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.cfg.consumer)
            .arg("COUNT")
            .arg(READ_BATCH)
            .arg("BLOCK")
            // Below the client's response timeout (500 ms) so a quiet queue is not an error.
            .arg(250)
            .arg("STREAMS")
            .arg(self.key("jobs"))
            .arg(">")
            .query_async(&mut *c)
            .await;
        let reply = match reply {
            // Redis lost its data (a restart without persistence): set the group up again.
            Err(e) if e.code() == Some("NOGROUP") => {
                drop(c);
                self.create_group().await?;
                return Ok(Vec::new());
            }
            other => other.map_err(unavailable)?,
        };
        let entries = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids);
        let mut deliveries = Vec::new();
        for entry in entries {
            match self.delivery(&entry, 1) {
                Ok(d) => deliveries.push(d),
                // One bad entry never stalls the jobs read with it.
                Err(e) => self.set_aside(&entry, &e).await,
            }
        }
        Ok(deliveries)
    }

    /// A job left by a silent worker, if any (claimed for this consumer).
    async fn reclaim(&self) -> Result<Option<Delivery>, BrokerError> {
        let mut c = self.conn();
        let reply: redis::streams::StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(self.key("jobs"))
            .arg(GROUP)
            .arg(&self.cfg.consumer)
            .arg(u64::try_from(self.cfg.reclaim_after.as_millis()).unwrap_or(u64::MAX))
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let Some(entry) = reply.claimed.into_iter().next() else {
            return Ok(None);
        };
        let pending: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(self.key("jobs"))
            .arg(GROUP)
            .arg(&entry.id)
            .arg(&entry.id)
            .arg(1)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let attempt = pending.ids.first().map_or(2, |p| p.times_delivered);
        metrics().jobs_reclaimed.inc();
        match self.delivery(&entry, u32::try_from(attempt).unwrap_or(u32::MAX)) {
            Ok(d) => Ok(Some(d)),
            Err(e) => {
                self.set_aside(&entry, &e).await;
                Ok(None)
            }
        }
    }

    pub(super) fn delivery(
        &self,
        entry: &redis::streams::StreamId,
        attempt: u32,
    ) -> Result<Delivery, BrokerError> {
        let raw: String = entry
            .get("job")
            .ok_or_else(|| BrokerError::Unavailable("job entry without a job".into()))?;
        let job: Job = serde_json::from_str(&raw)
            .map_err(|e| BrokerError::Unavailable(format!("job entry does not parse: {e}")))?;
        let seq: u64 = entry.get("seq").unwrap_or(0);
        let attempt = attempt.saturating_add(job.earlier_attempts);
        self.in_flight.insert(entry.id.clone(), ());
        Ok(Delivery {
            id: entry.id.clone(),
            attempt,
            seq,
            job,
        })
    }

    /// Gives up on a job that failed too often: dead-letters it and tells its chat.
    async fn dead_letter(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let mut c = self.conn();
        let job = serde_json::to_string(&delivery.job).map_err(unavailable)?;
        let _: String = c
            .xadd(
                self.key("jobs:dead"),
                "*",
                &[("job", job), ("attempts", delivery.attempt.to_string())],
            )
            .await
            .map_err(unavailable)?;
        tracing::error!(chat_id = %delivery.job.chat_id, attempts = delivery.attempt, "job dead-lettered");
        metrics().jobs_dead_lettered.inc();
        // Recorded, so that the unanswered sweep does not queue it again.
        if let Err(e) = self.store.give_up(&delivery.job.message_id).await {
            tracing::warn!(error = %e, "could not record a dead-lettered message");
        }
        let event = ServerEvent::error(
            ErrorCode::AiError,
            "The message could not be answered; it was set aside",
        );
        let events = std::slice::from_ref(&event);
        let published = self.publish(delivery.job.chat_id, events, PublishOptions::default());
        if let Err(e) = published.await {
            tracing::warn!(error = %e, "could not tell the chat of a dead-lettered job");
        }
        self.ack(delivery).await
    }

    /// Moves a job entry that cannot be read to the dead letters, logged, and acknowledges it.
    pub(super) async fn set_aside(&self, entry: &redis::streams::StreamId, error: &BrokerError) {
        tracing::error!(id = %entry.id, error = %error, "unreadable job entry dead-lettered");
        metrics().jobs_dead_lettered.inc();
        let raw: String = entry.get("job").unwrap_or_default();
        // The job's chat and number travel beside it, so its turn is released all the same.
        let chat: Option<String> = entry.get("chat");
        let seq: Option<u64> = entry.get("seq");
        if let (Some(chat), Some(seq)) = (chat, seq) {
            let released: redis::RedisResult<()> = self
                .conn()
                .zrem(self.key(&format!("chatjobs:{chat}")), seq)
                .await;
            if let Err(e) = released {
                tracing::warn!(error = %e, "could not release the turn of an unreadable job");
            }
        }
        let moved: redis::RedisResult<()> = redis::pipe()
            .xadd(self.key("jobs:dead"), "*", &[("raw", raw)])
            .ignore()
            .xack(self.key("jobs"), GROUP, &[&entry.id])
            .ignore()
            .xdel(self.key("jobs"), &[&entry.id])
            .ignore()
            .query_async(&mut self.conn())
            .await;
        if let Err(e) = moved {
            tracing::warn!(error = %e, "could not set an unreadable job entry aside");
        }
    }
}

#[async_trait]
impl JobQueue for RedisBroker {
    async fn enqueue(&self, job: Job) -> Result<(), BrokerError> {
        self.run_enqueue(None, job).await
    }

    async fn next_job(&self) -> Result<Option<Delivery>, BrokerError> {
        let mut buffered = self.buffered.lock().await;
        loop {
            if let Some(d) = buffered.pop_front() {
                if d.attempt > self.cfg.max_attempts {
                    self.dead_letter(&d).await?;
                    continue;
                }
                return Ok(Some(d));
            }
            if self.takeover_due() {
                buffered.extend(self.take_over().await?);
                if !buffered.is_empty() {
                    continue;
                }
            }
            if self.reclaim_due() {
                while let Some(d) = self.reclaim().await? {
                    buffered.push_back(d);
                }
                if !buffered.is_empty() {
                    continue;
                }
            }
            buffered.extend(self.read_new().await?);
        }
    }

    async fn take_permit(
        &self,
        tenant_id: Uuid,
        holder: &str,
        cap: u32,
    ) -> Result<bool, BrokerError> {
        self.permit(tenant_id, holder, cap.max(1)).await
    }

    async fn renew_permit(&self, tenant_id: Uuid, holder: &str) -> Result<(), BrokerError> {
        self.permit(tenant_id, holder, 0).await.map(drop)
    }

    async fn release_permit(&self, tenant_id: Uuid, holder: &str) -> Result<(), BrokerError> {
        self.drop_permit(tenant_id, holder).await
    }

    fn permit_renewal(&self) -> Option<Duration> {
        Some(Duration::from_millis(
            self.cfg.delivery.worker_lease_ms.max(300) / 3,
        ))
    }

    async fn turn(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        // This worker acknowledged the chat's previous job itself: no need to ask Redis.
        if self
            .acked
            .get(&delivery.job.chat_id)
            .is_some_and(|s| *s + 1 >= delivery.seq)
        {
            return Ok(());
        }
        // The chat's turn: no job of the chat with a smaller number is still outstanding.
        // Outstanding jobs are a set, not a counter, so a chat whose bookkeeping Redis lost
        // goes on (an unknown job does not hold the ones after it).
        let key = self.key(&format!("chatjobs:{}", delivery.job.chat_id));
        let mut wait = Duration::from_millis(2);
        loop {
            let first: Vec<u64> = self.conn().zrange(&key, 0, 0).await.map_err(unavailable)?;
            if first.first().is_none_or(|n| *n >= delivery.seq) {
                return Ok(());
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(100));
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let mut c = self.conn();
        let _: i64 = self
            .scripts
            .ack
            .key(self.key(&format!("chatjobs:{}", delivery.job.chat_id)))
            .key(self.key("jobs"))
            .key(self.queued_key(&delivery.job.message_id))
            .key(self.backlog_key(delivery.job.tenant_id))
            .arg(&delivery.id)
            .arg(delivery.seq)
            .arg(GROUP)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        self.in_flight.remove(&delivery.id);
        if self.acked.len() >= ACKED_MEMORY {
            self.acked.clear();
        }
        self.acked.insert(delivery.job.chat_id, delivery.seq);
        Ok(())
    }

    async fn backlog(&self, tenant_id: Uuid) -> Result<u64, BrokerError> {
        // Entries older than BACKLOG_STALE are forgotten: a job Redis lost, or one whose
        // acknowledgement never came, cannot hold a tenant's backlog full for good.
        let stale = chrono::Utc::now().timestamp_millis() - BACKLOG_STALE_MS;
        let key = self.backlog_key(tenant_id);
        let (_, count): (i64, u64) = redis::pipe()
            .atomic()
            .zrembyscore(&key, "-inf", stale)
            .zcard(&key)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(count)
    }

    async fn lead_sweep(&self, period: Duration) -> Result<bool, BrokerError> {
        self.lead(period).await
    }

    async fn has_live_job(&self, message_id: &str) -> Result<bool, BrokerError> {
        let exists: bool = self
            .conn()
            .exists(self.queued_key(message_id))
            .await
            .map_err(unavailable)?;
        Ok(exists)
    }
}

/// Keeps in-flight jobs from looking abandoned while they are being answered.
pub(super) async fn keep_fresh(broker: Weak<RedisBroker>) {
    loop {
        let Some(b) = broker.upgrade() else { return };
        let period = b.cfg.reclaim_after / 3;
        let ids: Vec<String> = b.in_flight.iter().map(|e| e.key().clone()).collect();
        if !ids.is_empty() {
            let claimed: redis::RedisResult<redis::Value> = redis::cmd("XCLAIM")
                .arg(b.key("jobs"))
                .arg(GROUP)
                .arg(&b.cfg.consumer)
                .arg(0)
                .arg(&ids)
                .arg("JUSTID")
                .query_async(&mut b.conn())
                .await;
            if let Err(e) = claimed {
                tracing::warn!(error = %e, "could not refresh in-flight jobs");
            }
        }
        drop(b);
        tokio::time::sleep(period).await;
    }
}
