//! The broker: how a gateway hands jobs to workers ([`JobQueue`]), how chat events reach every
//! socket of a chat and stay recoverable by `seq` ([`ChatLog`]), and how a cancel reaches the
//! worker answering a chat ([`CancelBus`]).
//!
//! One interface per concern, one implementation per wiring, chosen by configuration (as in
//! Centrifugo): [`memory::MemoryBroker`] for the embedded single process, [`redis::RedisBroker`]
//! for the distributed product; [`connect`] picks one. Gateways fan events out to their local
//! sockets through a [`feed::Hub`], which both implementations share.
//!
//! The chat log is the heart of delivery (API.md §4.1): every chat event gets the chat's next
//! `seq` and is appended to the chat's bounded log in the same atomic step that publishes it.
//! `seq`s are taken in blocks reserved in the store ([`seqs`]), so a chat's `seq` never goes
//! backwards, even after the log was lost.

pub mod feed;
pub mod memory;
pub mod redis;
pub mod seqs;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::protocol::{Frame, Job, ServerEvent};
use crate::store::{Store, StoreError};
pub use feed::{Hub, Next, Subscription};

/// Broker failures.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker was shut down.
    #[error("broker closed")]
    Closed,
    /// The backing service is unreachable, or answered what the broker cannot use.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// A Redis command (or taking a connection for it) failed.
    #[error("broker unavailable: {0}")]
    Redis(#[source] crate::Cause),
    /// A publish or save for a job attempt that another attempt has taken over.
    #[error("attempt {attempt} of the job was taken over by a newer attempt")]
    Fenced {
        /// The refused attempt.
        attempt: u32,
    },
    /// The chat does not exist (any more), so it has no `seq`s to give.
    #[error("chat {0} does not exist")]
    NoSuchChat(Uuid),
    /// The store that keeps `seq` reservations failed.
    #[error("reserving seqs: {0}")]
    Store(#[source] StoreError),
}

impl BrokerError {
    /// Whether the backing service hung (a command past `timeouts.redis_ms`) rather than failed.
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::Redis(cause) => cause
                .downcast_ref::<::redis::RedisError>()
                .is_some_and(::redis::RedisError::is_timeout),
            Self::Store(e) => e.is_timeout(),
            _ => false,
        }
    }
}

/// A job handed to a worker; acknowledge it once the answer is saved.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Broker-specific id used to acknowledge.
    pub id: String,
    /// How many times this job has been delivered (1 on the first delivery); it fences the
    /// job: publishes of an older attempt are refused once a newer one published.
    pub attempt: u32,
    /// The job's place in its chat's order (1, 2, …); 0 where the broker orders by itself.
    pub seq: u64,
    /// The job.
    pub job: Job,
}

/// The job queue: at-least-once delivery, one chat's jobs in order.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Queues a job. Jobs of one chat are delivered in the order they were queued.
    async fn enqueue(&self, job: Job) -> Result<(), BrokerError>;
    /// Waits for the next job; `None` once the broker is closed.
    async fn next_job(&self) -> Result<Option<Delivery>, BrokerError>;
    /// Waits until every earlier job of the delivery's chat is done, whichever worker holds it.
    /// The in-process broker has a single consumer that already keeps each chat in order.
    async fn turn(&self, _delivery: &Delivery) -> Result<(), BrokerError> {
        Ok(())
    }
    /// Marks a job done so that it is never delivered again.
    async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError>;
    /// The tenant's messages queued and not yet answered (acknowledged), all processes together.
    async fn backlog(&self, tenant_id: Uuid) -> Result<u64, BrokerError>;
    /// Whether the message has a job queued or in a worker's hands (the unanswered sweep
    /// queues a message again only when it has none).
    async fn has_live_job(&self, _message_id: &str) -> Result<bool, BrokerError> {
        Ok(true)
    }
    /// Takes one of the tenant's `cap` answer permits for `holder` (a delivery's id), shared
    /// by every worker; false while all are held. A permit lapses unless renewed
    /// ([`JobQueue::renew_permit`]) within the worker lease, so a dead worker's come back. The
    /// in-process queue has one worker, whose scheduler already holds the tenant to its cap.
    async fn take_permit(
        &self,
        _tenant_id: Uuid,
        _holder: &str,
        _cap: u32,
    ) -> Result<bool, BrokerError> {
        Ok(true)
    }
    /// Keeps a permit taken with [`JobQueue::take_permit`] from lapsing.
    async fn renew_permit(&self, _tenant_id: Uuid, _holder: &str) -> Result<(), BrokerError> {
        Ok(())
    }
    /// Gives a permit back.
    async fn release_permit(&self, _tenant_id: Uuid, _holder: &str) -> Result<(), BrokerError> {
        Ok(())
    }
    /// How often a held permit must be renewed; `None` where answers need no permits (the
    /// in-process queue), so a worker skips taking them altogether.
    fn permit_renewal(&self) -> Option<std::time::Duration> {
        None
    }
    /// Whether this process is the one to run the unanswered sweep for the next `period`
    /// (one process at a time).
    async fn lead_sweep(&self, _period: std::time::Duration) -> Result<bool, BrokerError> {
        Ok(false)
    }
}

/// A publish's fence: the job attempt on whose behalf events are published.
#[derive(Debug, Clone, Copy)]
pub struct Fence<'a> {
    /// The user message being answered.
    pub message_id: &'a str,
    /// The publishing attempt.
    pub attempt: u32,
    /// The attempt's publish number (1, 2, …): a publish repeated after a lost reply is
    /// applied once.
    pub batch: u32,
}

/// Options of [`ChatLog::publish`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishOptions<'a> {
    /// Refuse the publish (with [`BrokerError::Fenced`]) when a newer attempt of this job has
    /// published; the first publish of an attempt raises the fence to it. A batch the attempt
    /// already published is not published again (the answer is then 0).
    pub fence: Option<Fence<'a>>,
    /// Set on the publish that carries an answer's first token: the `traceparent` of the
    /// publishing span, under which each gateway traces handing that token to its sockets
    /// ([`crate::telemetry::trace::forward_first_token`]). It never reaches a client.
    pub first_token_trace: Option<&'a str>,
}

/// One event of a chat's log: its `seq` and its frame (which carries the `seq` too).
#[derive(Debug, Clone, PartialEq)]
pub struct Sequenced {
    /// The event's place in its chat.
    pub seq: u64,
    /// The serialized event, `seq` included.
    pub frame: Frame,
}

/// Where a chat's log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The chat's latest `seq` (0 for a chat without events).
    pub latest: u64,
    /// The `seq` of the `message_stream_started` of the answer streaming now, if any.
    pub open_answer: Option<u64>,
}

/// The answer to [`ChatLog::read`].
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    /// The events after the cursor, in order, without a gap (empty when there are none).
    Events {
        /// The events.
        events: Vec<Sequenced>,
        /// The chat's latest `seq`.
        latest: u64,
    },
    /// The events after the cursor are no longer all retained (trimmed, or the log was lost).
    Unavailable {
        /// The chat's latest `seq`.
        latest: u64,
    },
}

/// The chat log with its live fan-out.
#[async_trait]
pub trait ChatLog: Send + Sync + 'static {
    /// Gives the events the chat's next `seq`s, appends them to its log and sends them to every
    /// socket of the chat on every gateway, in one atomic step; returns the last `seq`. A
    /// networked log carries a batch in one message (tokens coalesced on the wire); sockets
    /// still get one event each.
    async fn publish(
        &self,
        chat_id: Uuid,
        events: &[ServerEvent],
        options: PublishOptions<'_>,
    ) -> Result<u64, BrokerError>;
    /// Up to `limit` events with `seq > after`, oldest first.
    async fn read(&self, chat_id: Uuid, after: u64, limit: usize) -> Result<Read, BrokerError>;
    /// The chat's latest `seq` and its open answer.
    async fn head(&self, chat_id: Uuid) -> Result<Head, BrokerError>;
    /// Follows the chat's live events on this process until the subscription is dropped.
    /// Returns once the subscription is live, so that no event published afterwards is missed.
    async fn subscribe(&self, chat_id: Uuid) -> Result<Subscription, BrokerError>;
    /// Takes the block of `seq`s the store reserved as it created the chat ([`seqs::FIRST`]);
    /// a chat the log already knows keeps its state.
    async fn adopt(&self, chat_id: Uuid, block: seqs::Block) -> Result<(), BrokerError>;
    /// The chat was deleted: drops its log and tells every process ([`ChatLog::deletions`]).
    async fn forget(&self, chat_id: Uuid) -> Result<(), BrokerError>;
    /// Chat deletions as announced to this process, its own included.
    fn deletions(&self) -> broadcast::Receiver<Deletion>;
}

/// An announcement of [`ChatLog::deletions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// This chat was deleted.
    Chat(Uuid),
    /// Announcements may have been missed (the process's pub/sub connection was lost, or its
    /// receiver fell behind): whatever was remembered of any chat may be stale.
    Missed,
}

/// Cancel requests, from any gateway to whichever worker answers the chat.
#[async_trait]
pub trait CancelBus: Send + Sync + 'static {
    /// Asks whichever worker answers the chat to stop.
    async fn cancel(&self, chat_id: Uuid) -> Result<(), BrokerError>;
    /// Cancel requests, for workers.
    fn cancels(&self) -> broadcast::Receiver<Uuid>;
}

/// The three concerns behind one handle, as both wirings provide them.
#[async_trait]
pub trait Broker: JobQueue + ChatLog + CancelBus {
    /// Announces a saved message to the chat and queues its job, the announcement first (so
    /// it precedes the answer on every socket). A networked broker does both in one round trip.
    async fn announce_and_enqueue(
        &self,
        received: &ServerEvent,
        job: Job,
    ) -> Result<(), BrokerError> {
        self.publish(
            job.chat_id,
            std::slice::from_ref(received),
            PublishOptions::default(),
        )
        .await?;
        self.enqueue(job).await
    }
    /// Reachability check for `/readyz`: the backing service, and the live event feed.
    async fn ping(&self) -> Result<(), BrokerError>;
}

/// What a process does with the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Queues jobs and follows chats.
    Gateway,
    /// Takes jobs, and holds a liveness lease while it lives.
    Worker,
}

/// The broker the configuration names: Redis when `redis_url` is set, else the in-process one.
/// The store keeps `seq` reservations. Both binaries and the tests build their broker here.
pub async fn connect(
    config: &crate::config::Config,
    store: Arc<dyn Store>,
    role: Role,
) -> Result<Arc<dyn Broker>, BrokerError> {
    match &config.redis_url {
        Some(url) => {
            let name = match role {
                Role::Gateway => "gateway",
                Role::Worker => "worker",
            };
            let consumer = format!("{name}-{}", Uuid::new_v4());
            let cfg = redis::RedisBrokerConfig::from_config(config, url, consumer);
            let broker = redis::RedisBroker::connect(cfg, store).await?;
            if role == Role::Worker {
                broker.hold_lease();
            }
            Ok(broker)
        }
        None => Ok(Arc::new(memory::MemoryBroker::new(config, store))),
    }
}
