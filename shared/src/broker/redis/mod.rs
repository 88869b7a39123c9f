//! The distributed broker: jobs on a Redis Stream with a consumer group, chat events on pub/sub
//! channels keyed by chat id, cancels on one pub/sub channel.
//!
//! - **Jobs** (`{prefix}jobs`, group `workers`): delivered at least once and acknowledged (and
//!   deleted) only after the answer is saved. A job whose worker went silent for `reclaim_after`
//!   is claimed by another worker; workers keep their in-flight jobs fresh with `XCLAIM … JUSTID`
//!   so a long answer is never taken away. A job delivered `max_attempts` times goes to
//!   `{prefix}jobs:dead` and its chat gets an `AI_ERROR`.
//! - **Order per chat across workers**: enqueueing assigns the job the chat's next sequence
//!   number (`INCR` and `XADD` in one script); a worker answers job *n* only once the chat's done
//!   counter reached *n − 1*, and acknowledging sets it to *n*. Chats run in parallel; a chat's
//!   messages never do, whichever workers hold them.
//! - **Events**: one pub/sub connection per process multiplexes every chat with a local socket:
//!   `SUBSCRIBE` on the chat's first local subscriber, `UNSUBSCRIBE` after its last. After a lost
//!   connection the subscriber reconnects and subscribes again to every chat in the hub.
//!   Tokens ready at the same moment travel in one pub/sub message (newline-separated frames)
//!   and are split back into one socket event each.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use async_trait::async_trait;
use dashmap::DashMap;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, streams::StreamReadReply};
use tokio::sync::{broadcast, mpsc, oneshot};
use uuid::Uuid;

mod pubsub;

use super::{Broker, BrokerError, Delivery, Hub, Subscription};
use crate::metrics::metrics;
use crate::protocol::{ErrorCode, Job, ServerEvent};

const GROUP: &str = "workers";

/// Starts the first line of a chat message: the publish time in microseconds (never JSON).
const STAMP: &str = "@";

/// Chats whose last acknowledged job this process remembers.
const ACKED_MEMORY: usize = 100_000;

/// Jobs taken from the stream in one read; they stay claimed (and kept fresh) while buffered.
const READ_BATCH: usize = 64;

/// Requests to the subscriber task.
enum Control {
    /// Make sure the chat's channel is subscribed, then answer.
    Subscribe(Uuid, oneshot::Sender<()>),
    /// The chat's last local socket left: unsubscribe unless a new one arrived meanwhile.
    Emptied(Uuid),
}

/// Settings of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisBrokerConfig {
    /// `redis://…`.
    pub url: String,
    /// Prefix of every key and channel (lets several deployments or tests share one Redis).
    pub prefix: String,
    /// Events buffered per socket (see [`Hub`]).
    pub chat_buffer: usize,
    /// A job idle this long in a silent worker's hands is given to another worker.
    pub reclaim_after: Duration,
    /// Deliveries after which a job is dead-lettered.
    pub max_attempts: u32,
    /// This process's consumer name in the group.
    pub consumer: String,
}

impl RedisBrokerConfig {
    /// The broker settings of a process configuration; `consumer` names this process.
    pub fn from_config(config: &crate::config::Config, url: &str, consumer: String) -> Self {
        Self {
            url: url.to_owned(),
            prefix: config.redis_prefix.clone(),
            chat_buffer: config.limits.chat_buffer,
            reclaim_after: Duration::from_secs(config.cluster.reclaim_after_secs.max(1)),
            max_attempts: config.cluster.max_attempts.max(1),
            consumer,
        }
    }
}

/// Redis-backed [`Broker`].
pub struct RedisBroker {
    redis: crate::redis_conn::Redis,
    cfg: RedisBrokerConfig,
    hub: Hub,
    control: mpsc::UnboundedSender<Control>,
    cancels: broadcast::Sender<Uuid>,
    in_flight: Arc<DashMap<String, ()>>,
    buffered: tokio::sync::Mutex<std::collections::VecDeque<Delivery>>,
    /// The last sequence number this worker acknowledged, per chat (a shortcut for `turn`).
    acked: DashMap<Uuid, u64>,
    last_reclaim: std::sync::Mutex<std::time::Instant>,
    enqueue_script: Script,
    ack_script: Script,
}

/// Every failed Redis command passes here, so this is where `redis_errors` counts them.
fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    metrics().redis_errors.inc();
    BrokerError::Unavailable(e.to_string())
}

impl RedisBroker {
    /// Connects, creates the consumer group if needed and starts the subscriber task. The
    /// background tasks end once the broker is dropped.
    pub async fn connect(cfg: RedisBrokerConfig) -> Result<Arc<Self>, BrokerError> {
        let redis = crate::redis_conn::Redis::new(&cfg.url).map_err(unavailable)?;
        let (control, control_rx) = mpsc::unbounded_channel();
        let (emptied, emptied_rx) = mpsc::unbounded_channel();
        tokio::spawn(pubsub::forward_emptied(emptied_rx, control.downgrade()));
        let broker = Arc::new(Self {
            redis,
            hub: Hub::with_listener(cfg.chat_buffer, emptied),
            control,
            cancels: broadcast::channel(1024).0,
            in_flight: Arc::new(DashMap::new()),
            buffered: tokio::sync::Mutex::new(std::collections::VecDeque::new()),
            acked: DashMap::new(),
            last_reclaim: std::sync::Mutex::new(std::time::Instant::now()),
            enqueue_script: Script::new(
                "if ARGV[2] ~= '' then redis.call('PUBLISH', KEYS[3], ARGV[2]) end \
                 local seq = redis.call('INCR', KEYS[1]) redis.call('EXPIRE', KEYS[1], 604800) \
                 redis.call('XADD', KEYS[2], '*', 'job', ARGV[1], 'seq', seq) return seq",
            ),
            ack_script: Script::new(
                "local done = tonumber(redis.call('GET', KEYS[1]) or '0') \
                 if tonumber(ARGV[2]) > done then redis.call('SET', KEYS[1], ARGV[2], 'EX', 604800) end \
                 redis.call('XACK', KEYS[2], ARGV[3], ARGV[1]) redis.call('XDEL', KEYS[2], ARGV[1]) return 1",
            ),
            cfg,
        });
        broker.create_group().await?;
        let client = redis::Client::open(broker.cfg.url.as_str()).map_err(unavailable)?;
        tokio::spawn(pubsub::subscriber(
            Arc::downgrade(&broker),
            client,
            control_rx,
        ));
        tokio::spawn(keep_fresh(Arc::downgrade(&broker)));
        Ok(broker)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.cfg.prefix)
    }

    fn chat_channel(&self, chat_id: Uuid) -> String {
        self.key(&format!("chat:{chat_id}"))
    }

    /// The shared connection, for every command but the blocking read (see `redis_conn`).
    fn conn(&self) -> ConnectionManager {
        self.redis.shared()
    }

    async fn create_group(&self) -> Result<(), BrokerError> {
        let mut c = self.conn();
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.key("jobs"))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other.map_err(unavailable),
        }
    }

    /// Queues a job (after publishing `announce` to its chat, if given) in one script.
    async fn run_enqueue(
        &self,
        announce: Option<&ServerEvent>,
        job: Job,
    ) -> Result<(), BrokerError> {
        let payload = serde_json::to_string(&job).map_err(unavailable)?;
        let announce = announce
            .map(|e| e.to_frame().to_string())
            .unwrap_or_default();
        let mut c = self.conn();
        let _: u64 = self
            .enqueue_script
            .key(self.key(&format!("chatseq:{}", job.chat_id)))
            .key(self.key("jobs"))
            .key(self.chat_channel(job.chat_id))
            .arg(payload)
            .arg(announce)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

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
        entries.map(|entry| self.delivery(&entry, 1)).collect()
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
        Ok(Some(self.delivery(
            &entry,
            u32::try_from(attempt).unwrap_or(u32::MAX),
        )?))
    }

    fn delivery(
        &self,
        entry: &redis::streams::StreamId,
        attempt: u32,
    ) -> Result<Delivery, BrokerError> {
        let raw: String = entry
            .get("job")
            .ok_or_else(|| unavailable("job entry without a job"))?;
        let job: Job = serde_json::from_str(&raw).map_err(unavailable)?;
        let seq: u64 = entry.get("seq").unwrap_or(0);
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
        let event = ServerEvent::error(
            ErrorCode::AiError,
            "The message could not be answered; it was set aside",
        );
        self.publish(delivery.job.chat_id, &event).await?;
        self.ack(delivery).await
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn enqueue(&self, job: Job) -> Result<(), BrokerError> {
        self.run_enqueue(None, job).await
    }

    async fn announce_and_enqueue(
        &self,
        received: &ServerEvent,
        job: Job,
    ) -> Result<(), BrokerError> {
        self.run_enqueue(Some(received), job).await
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

    async fn turn(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        // This worker acknowledged the chat's previous job itself: no need to ask Redis.
        if self
            .acked
            .get(&delivery.job.chat_id)
            .is_some_and(|s| *s + 1 >= delivery.seq)
        {
            return Ok(());
        }
        let key = self.key(&format!("chatdone:{}", delivery.job.chat_id));
        let mut wait = Duration::from_millis(2);
        loop {
            let done: Option<u64> = self.conn().get(&key).await.map_err(unavailable)?;
            if done.unwrap_or(0) + 1 >= delivery.seq {
                return Ok(());
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(100));
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let mut c = self.conn();
        let _: i64 = self
            .ack_script
            .key(self.key(&format!("chatdone:{}", delivery.job.chat_id)))
            .key(self.key("jobs"))
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

    async fn publish(&self, chat_id: Uuid, event: &ServerEvent) -> Result<(), BrokerError> {
        self.publish_all(chat_id, std::slice::from_ref(event), None)
            .await
    }

    async fn publish_all(
        &self,
        chat_id: Uuid,
        events: &[ServerEvent],
        first_token_trace: Option<&str>,
    ) -> Result<(), BrokerError> {
        if events.is_empty() {
            return Ok(());
        }
        // Frames are JSON, which never holds a raw newline: newline-separated frames split
        // back exactly on the receiving gateway. The first line is the stamp: the publish time
        // (for the `token_delivery_seconds` metric), then the trace context if any.
        let mut payload = format!("{STAMP}{}", chrono::Utc::now().timestamp_micros());
        if let Some(trace) = first_token_trace {
            payload.push(' ');
            payload.push_str(trace);
        }
        for event in events {
            payload.push('\n');
            payload.push_str(&event.to_frame());
        }
        let mut c = self.conn();
        let _: i64 = c
            .publish(self.chat_channel(chat_id), payload)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn subscribe(&self, chat_id: Uuid) -> Result<Subscription, BrokerError> {
        let (sub, _) = self.hub.subscribe(chat_id);
        let (done, live) = oneshot::channel();
        self.control
            .send(Control::Subscribe(chat_id, done))
            .map_err(|_| BrokerError::Closed)?;
        live.await
            .map_err(|_| BrokerError::Unavailable("redis pub/sub unavailable".into()))?;
        Ok(sub)
    }

    async fn cancel(&self, chat_id: Uuid) -> Result<(), BrokerError> {
        let mut c = self.conn();
        let _: i64 = c
            .publish(self.key("cancel"), chat_id.to_string())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn cancels(&self) -> broadcast::Receiver<Uuid> {
        self.cancels.subscribe()
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let mut c = self.conn();
        let _: String = redis::cmd("PING")
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// Keeps in-flight jobs from looking abandoned while they are being answered.
async fn keep_fresh(broker: Weak<RedisBroker>) {
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
