//! The distributed broker: jobs on a Redis Stream with a consumer group, chat events in a
//! per-chat log published on pub/sub channels keyed by chat id ([`log`]), cancels on one pub/sub
//! channel.
//!
//! - **Jobs** (`{prefix}jobs`, group `workers`): delivered at least once and acknowledged (and
//!   deleted) only after the answer is saved. A job whose worker went silent for `reclaim_after`
//!   is claimed by another worker; workers keep their in-flight jobs fresh with `XCLAIM … JUSTID`
//!   so a long answer is never taken away. A job delivered `max_attempts` times goes to
//!   `{prefix}jobs:dead` and its chat gets an `AI_ERROR`.
//! - **Order per chat across workers**: enqueueing assigns the job the chat's next number
//!   (`INCR`, `XADD` and `ZADD` to the chat's outstanding jobs in one script); a worker answers
//!   job *n* only once no job of the chat with a smaller number is outstanding, and
//!   acknowledging removes it. Chats run in parallel; a chat's messages never do, whichever
//!   workers hold them. A set rather than a "done" counter, so that a Redis that lost part of
//!   its data never leaves a chat waiting for a job that no longer exists.
//! - **Events**: appended to the chat's log and published in one script ([`log`]). One pub/sub
//!   connection per process multiplexes every chat with a local socket: `SUBSCRIBE` on the
//!   chat's first local subscriber, `UNSUBSCRIBE` after its last. It is pinged every few
//!   seconds; after a lost connection the subscriber reconnects, subscribes again to every chat
//!   in the hub and tells their feeds the chats' latest `seq`s, so sockets read what they
//!   missed from the log. Tokens ready at the same moment travel in one pub/sub message
//!   (newline-separated frames) and are split back into one socket event each.
//! - **Answer permits** ([`permits`]): a tenant's `max_concurrent_answers` counts its answers
//!   on every worker together.
//! - **Liveness** ([`lease`]): workers hold short leases; the jobs of a worker whose lease
//!   lapsed are taken over within a lease, and the unanswered sweep queues again every saved
//!   message that has neither an answer nor a live job.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use dashmap::DashMap;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use tokio::sync::{broadcast, mpsc, oneshot};
use uuid::Uuid;

mod batch;
mod jobs;
mod lease;
mod log;
mod permits;
mod pubsub;

use super::{Broker, BrokerError, CancelBus, Delivery, Hub, PublishOptions};
use crate::metrics::metrics;
use crate::protocol::{Job, ServerEvent};
use crate::store::Store;

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
    /// Recent events kept per chat for this process's sockets (see [`Hub`]).
    pub chat_buffer: usize,
    /// A job idle this long in a silent worker's hands is given to another worker.
    pub reclaim_after: Duration,
    /// Deliveries after which a job is dead-lettered.
    pub max_attempts: u32,
    /// This process's consumer name in the group.
    pub consumer: String,
    /// Chat log retention and recovery bounds.
    pub delivery: crate::config::DeliveryConfig,
    /// How long a quick command may wait for its reply.
    pub command_timeout: Duration,
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
            delivery: config.delivery.clone(),
            command_timeout: config.timeouts.redis(),
        }
    }
}

/// The channel chat deletions are announced on ([`crate::broker::ChatLog::forget`]), under the
/// prefix.
const DELETED_CHANNEL: &str = "deleted";

/// Redis-backed [`Broker`].
pub struct RedisBroker {
    redis: crate::redis_conn::Redis,
    cfg: RedisBrokerConfig,
    hub: Hub,
    control: mpsc::UnboundedSender<Control>,
    cancels: broadcast::Sender<Uuid>,
    deletions: broadcast::Sender<crate::broker::Deletion>,
    in_flight: Arc<DashMap<String, ()>>,
    buffered: tokio::sync::Mutex<std::collections::VecDeque<Delivery>>,
    /// The last sequence number this worker acknowledged, per chat (a shortcut for `turn`).
    acked: DashMap<Uuid, u64>,
    last_reclaim: std::sync::Mutex<std::time::Instant>,
    last_takeover: std::sync::Mutex<std::time::Instant>,
    scripts: Scripts,
    log: LogSettings,
    store: Arc<dyn Store>,
    /// Whether the pub/sub connection is up (for `/readyz`).
    live: std::sync::atomic::AtomicBool,
}

/// The Lua scripts, loaded once.
struct Scripts {
    publish: Script,
    enqueue: Script,
    init: Script,
    read: Script,
    ack: Script,
    permit: Script,
}

/// Retention of the chat log, as the scripts take it.
struct LogSettings {
    events: u64,
    keep_ms: u64,
    idle_ms: u64,
}

/// Every failed Redis command passes here, so this is where `redis_errors` counts them.
fn unavailable(e: impl Into<crate::Cause>) -> BrokerError {
    metrics().redis_errors.inc();
    BrokerError::Redis(e.into())
}

impl RedisBroker {
    /// Connects, creates the consumer group if needed and starts the subscriber task. The
    /// background tasks end once the broker is dropped.
    pub async fn connect(
        cfg: RedisBrokerConfig,
        store: Arc<dyn Store>,
    ) -> Result<Arc<Self>, BrokerError> {
        let redis =
            crate::redis_conn::Redis::new(&cfg.url, cfg.command_timeout).map_err(unavailable)?;
        let (control, control_rx) = mpsc::unbounded_channel();
        let (emptied, emptied_rx) = mpsc::unbounded_channel();
        tokio::spawn(pubsub::forward_emptied(emptied_rx, control.downgrade()));
        let d = &cfg.delivery;
        let broker = Arc::new(Self {
            redis,
            hub: Hub::with_listener(cfg.chat_buffer, emptied),
            control,
            cancels: broadcast::channel(1024).0,
            deletions: broadcast::channel(1024).0,
            in_flight: Arc::new(DashMap::new()),
            buffered: tokio::sync::Mutex::new(std::collections::VecDeque::new()),
            acked: DashMap::new(),
            last_reclaim: std::sync::Mutex::new(std::time::Instant::now()),
            last_takeover: std::sync::Mutex::new(std::time::Instant::now()),
            scripts: Scripts {
                publish: log::publish_script(),
                enqueue: log::enqueue_script(),
                init: log::init_script(),
                read: log::read_script(),
                permit: permits::permit_script(),
                ack: Script::new(
                    "redis.call('ZREM', KEYS[1], ARGV[2]) \
                     redis.call('DEL', KEYS[3]) redis.call('ZREM', KEYS[4], KEYS[3]) \
                     redis.call('XACK', KEYS[2], ARGV[3], ARGV[1]) redis.call('XDEL', KEYS[2], ARGV[1]) return 1",
                ),
            },
            log: LogSettings {
                events: d.log_events,
                keep_ms: d.log_secs.saturating_mul(1000),
                idle_ms: d.log_idle_secs.max(d.log_secs).saturating_mul(1000),
            },
            store,
            live: std::sync::atomic::AtomicBool::new(false),
            cfg,
        });
        broker.create_group().await?;
        let client = redis::Client::open(broker.cfg.url.as_str()).map_err(unavailable)?;
        tokio::spawn(pubsub::subscriber(
            Arc::downgrade(&broker),
            client,
            control_rx,
        ));
        tokio::spawn(jobs::keep_fresh(Arc::downgrade(&broker)));
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

    /// Queues a job (after appending `announce` to its chat's log, if given) in one script.
    async fn run_enqueue(
        &self,
        announce: Option<&ServerEvent>,
        job: Job,
    ) -> Result<(), BrokerError> {
        let payload = serde_json::to_string(&job).map_err(unavailable)?;
        let events = announce.map(std::slice::from_ref).unwrap_or_default();
        let enqueue = log::Enqueue { job: &job, payload };
        self.append(
            job.chat_id,
            events,
            PublishOptions::default(),
            Some(enqueue),
        )
        .await?;
        Ok(())
    }

    /// A tenant's waiting messages (their `queued` markers scored by enqueue time), counted
    /// against its `max_queued_messages`.
    fn backlog_key(&self, tenant_id: Uuid) -> String {
        self.key(&format!("backlog:{tenant_id}"))
    }

    /// The marker that a message has a job queued or in a worker's hands.
    fn queued_key(&self, message_id: &str) -> String {
        self.key(&format!("queued:{message_id}"))
    }
}

#[async_trait]
impl CancelBus for RedisBroker {
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
}

#[async_trait]
impl Broker for RedisBroker {
    async fn announce_and_enqueue(
        &self,
        received: &ServerEvent,
        job: Job,
    ) -> Result<(), BrokerError> {
        self.run_enqueue(Some(received), job).await
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        if !self.live.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BrokerError::Unavailable(
                "redis pub/sub connection is down".into(),
            ));
        }
        let mut c = self.conn();
        let _: String = redis::cmd("PING")
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
