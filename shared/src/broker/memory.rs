//! The in-process broker of the embedded mode: a bounded job queue, an in-memory chat log with
//! the Redis log's semantics, the local [`Hub`] for live events and a broadcast channel for
//! cancels. Nothing leaves the process.
//!
//! The log keeps each chat's events as a ring with the configured retention (at least
//! `log_events` events and `log_secs` seconds) and drops a chat's ring after `log_idle_secs`
//! without events. `seq`s come from blocks reserved in the store ([`super::seqs`]), so a restarted
//! process continues each chat past every `seq` it issued before. Publishes are never fenced:
//! the in-process queue hands each job out once, so no attempt is ever taken over. The queue
//! knows which messages have a job (queued or being answered), so the workers' unanswered
//! sweep runs here too.

use std::collections::VecDeque;
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::sync::{Mutex, broadcast, mpsc};
use tracing::Instrument as _;
use uuid::Uuid;

use super::{
    Broker, BrokerError, CancelBus, ChatLog, Deletion, Delivery, Head, Hub, JobQueue,
    PublishOptions, Read, Sequenced, Subscription, seqs,
};
use crate::protocol::{AnswerMark, Job, ServerEvent, with_seq};
use crate::store::Store;

/// Jobs waiting for the worker before `enqueue` starts to wait (back-pressure on senders).
const QUEUE_CAPACITY: usize = 65_536;

/// Publishes between two sweeps of idle chat logs.
const SWEEP_EVERY: u64 = 4_096;

/// One chat's log.
struct ChatRing {
    seq: u64,
    limit: u64,
    open: Option<u64>,
    events: VecDeque<(Instant, Sequenced)>,
    touched: Instant,
}

impl ChatRing {
    fn new(block: seqs::Block) -> Self {
        Self {
            seq: block.start,
            limit: block.limit,
            open: None,
            events: VecDeque::new(),
            touched: Instant::now(),
        }
    }

    fn head(&self) -> Head {
        Head {
            latest: self.seq,
            open_answer: self.open,
        }
    }

    fn read(&self, after: u64, limit: usize) -> Read {
        let first_kept = self.events.front().map_or(self.seq + 1, |(_, e)| e.seq);
        if after > self.seq || after + 1 < first_kept {
            return Read::Unavailable { latest: self.seq };
        }
        let from = self.events.partition_point(|(_, e)| e.seq <= after);
        Read::Events {
            events: self
                .events
                .range(from..)
                .take(limit)
                .map(|(_, e)| e.clone())
                .collect(),
            latest: self.seq,
        }
    }
}

/// Retention of the in-memory log.
struct Retention {
    events: usize,
    age: Duration,
    idle: Duration,
}

/// In-process [`Broker`].
pub struct MemoryBroker {
    jobs_tx: mpsc::Sender<Job>,
    jobs_rx: Mutex<mpsc::Receiver<Job>>,
    next_id: AtomicU64,
    hub: Hub,
    chats: DashMap<Uuid, ChatRing>,
    retention: Retention,
    publishes: AtomicU64,
    store: Arc<dyn Store>,
    cancels: broadcast::Sender<Uuid>,
    deletions: broadcast::Sender<Deletion>,
    /// Messages queued and not acknowledged, by tenant.
    backlog: DashMap<Uuid, u64>,
    /// Messages with a job queued or being answered (the unanswered sweep skips them).
    live: DashMap<String, ()>,
}

impl MemoryBroker {
    /// A broker with the configuration's feed size and log retention; `seq` blocks are
    /// reserved in `store`.
    pub fn new(config: &crate::config::Config, store: Arc<dyn Store>) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::channel(QUEUE_CAPACITY);
        let d = &config.delivery;
        Self {
            backlog: DashMap::new(),
            live: DashMap::new(),
            jobs_tx,
            jobs_rx: Mutex::new(jobs_rx),
            next_id: AtomicU64::new(1),
            hub: Hub::new(config.limits.chat_buffer),
            chats: DashMap::new(),
            retention: Retention {
                events: usize::try_from(d.log_events).unwrap_or(usize::MAX),
                age: Duration::from_secs(d.log_secs),
                idle: Duration::from_secs(d.log_idle_secs.max(d.log_secs)),
            },
            publishes: AtomicU64::new(0),
            store,
            cancels: broadcast::channel(1024).0,
            deletions: broadcast::channel(1024).0,
        }
    }

    /// Reserves a new block for the chat and records it (a first block, or the next one).
    async fn extend(&self, chat_id: Uuid) -> Result<(), BrokerError> {
        let block = seqs::reserve(self.store.as_ref(), chat_id).await?;
        self.chats
            .entry(chat_id)
            .and_modify(|ring| ring.limit = ring.limit.max(block.limit))
            .or_insert_with(|| ChatRing::new(block));
        Ok(())
    }

    /// Appends the events if the chat's block has room for them; `None` when it has not.
    fn try_append(&self, chat_id: Uuid, events: &[ServerEvent]) -> Option<u64> {
        let mut ring = self.chats.get_mut(&chat_id)?;
        let n = events.len() as u64;
        if ring.seq + n > ring.limit {
            return None;
        }
        let now = Instant::now();
        let mut sequenced = Vec::with_capacity(events.len());
        for event in events {
            ring.seq += 1;
            let seq = ring.seq;
            match event.answer_mark() {
                AnswerMark::Opens => ring.open = Some(seq),
                AnswerMark::Closes => ring.open = None,
                AnswerMark::Neither => {}
            }
            let e = Sequenced {
                seq,
                frame: with_seq(&event.to_frame(), seq),
            };
            ring.events.push_back((now, e.clone()));
            sequenced.push(e);
        }
        while ring.events.len() > self.retention.events
            && ring
                .events
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > self.retention.age)
        {
            ring.events.pop_front();
        }
        ring.touched = now;
        let last = ring.seq;
        // Still under the chat's lock, so that the feed sees every chat's events in order.
        self.hub.push(chat_id, sequenced);
        drop(ring);
        Some(last)
    }

    fn sweep_idle(&self) {
        if !self
            .publishes
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY)
        {
            return;
        }
        let idle = self.retention.idle;
        self.chats.retain(|_, ring| ring.touched.elapsed() < idle);
    }
}

#[async_trait]
impl JobQueue for MemoryBroker {
    async fn enqueue(&self, job: Job) -> Result<(), BrokerError> {
        *self.backlog.entry(job.tenant_id).or_default() += 1;
        self.live.insert(job.message_id.clone(), ());
        self.jobs_tx
            .send(job)
            .await
            .map_err(|_| BrokerError::Closed)
    }

    async fn next_job(&self) -> Result<Option<Delivery>, BrokerError> {
        let job = self.jobs_rx.lock().await.recv().await;
        Ok(job.map(|job| Delivery {
            id: self.next_id.fetch_add(1, Ordering::Relaxed).to_string(),
            attempt: 1,
            seq: 0,
            job,
        }))
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        // A job leaves the in-process queue when it is delivered; only the backlog counts it.
        self.live.remove(&delivery.job.message_id);
        self.backlog.remove_if_mut(&delivery.job.tenant_id, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
        Ok(())
    }

    async fn backlog(&self, tenant_id: Uuid) -> Result<u64, BrokerError> {
        Ok(self.backlog.get(&tenant_id).map_or(0, |n| *n))
    }

    async fn has_live_job(&self, message_id: &str) -> Result<bool, BrokerError> {
        Ok(self.live.contains_key(message_id))
    }

    /// The one process sweeps: a message saved while its socket's accept timed out (the save
    /// went on; `message_received` was never sent) is answered without waiting for a restart.
    async fn lead_sweep(&self, _period: Duration) -> Result<bool, BrokerError> {
        Ok(true)
    }
}

#[async_trait]
impl ChatLog for MemoryBroker {
    async fn publish(
        &self,
        chat_id: Uuid,
        events: &[ServerEvent],
        options: PublishOptions<'_>,
    ) -> Result<u64, BrokerError> {
        if events.is_empty() {
            return self.head(chat_id).await.map(|h| h.latest);
        }
        self.sweep_idle();
        // Handing an answer's first token to the sockets is traced as the gateways' part.
        let forwarding = options
            .first_token_trace
            .map_or_else(tracing::Span::none, |t| {
                crate::telemetry::trace::forward_first_token(chat_id, t)
            });
        async {
            // A block holds far more events than one publish, so this loops at most twice.
            for _ in 0..3 {
                if let Some(last) = self.try_append(chat_id, events) {
                    return Ok(last);
                }
                self.extend(chat_id).await?;
            }
            Err(BrokerError::Unavailable("could not reserve seqs".into()))
        }
        .instrument(forwarding)
        .await
    }

    async fn read(&self, chat_id: Uuid, after: u64, limit: usize) -> Result<Read, BrokerError> {
        if let Some(ring) = self.chats.get(&chat_id) {
            return Ok(ring.read(after, limit));
        }
        self.extend(chat_id).await?;
        let ring = self.chats.get(&chat_id);
        Ok(ring.map_or(Read::Unavailable { latest: 0 }, |r| r.read(after, limit)))
    }

    async fn head(&self, chat_id: Uuid) -> Result<Head, BrokerError> {
        if let Some(ring) = self.chats.get(&chat_id) {
            return Ok(ring.head());
        }
        self.extend(chat_id).await?;
        let ring = self.chats.get(&chat_id);
        Ok(ring.map_or(
            Head {
                latest: 0,
                open_answer: None,
            },
            |r| r.head(),
        ))
    }

    async fn subscribe(&self, chat_id: Uuid) -> Result<Subscription, BrokerError> {
        Ok(self.hub.subscribe(chat_id).0)
    }

    async fn adopt(&self, chat_id: Uuid, block: seqs::Block) -> Result<(), BrokerError> {
        self.chats
            .entry(chat_id)
            .or_insert_with(|| ChatRing::new(block));
        Ok(())
    }

    async fn forget(&self, chat_id: Uuid) -> Result<(), BrokerError> {
        self.chats.remove(&chat_id);
        // No receiver: no gateway in this process remembers anything.
        let _ = self.deletions.send(Deletion::Chat(chat_id));
        Ok(())
    }

    fn deletions(&self) -> broadcast::Receiver<Deletion> {
        self.deletions.subscribe()
    }
}

#[async_trait]
impl CancelBus for MemoryBroker {
    async fn cancel(&self, chat_id: Uuid) -> Result<(), BrokerError> {
        // No receiver just means no worker is running; nothing to cancel then.
        let _ = self.cancels.send(chat_id);
        Ok(())
    }

    fn cancels(&self) -> broadcast::Receiver<Uuid> {
        self.cancels.subscribe()
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn ping(&self) -> Result<(), BrokerError> {
        if self.jobs_tx.is_closed() {
            return Err(BrokerError::Closed);
        }
        Ok(())
    }
}
