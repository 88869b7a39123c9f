//! The in-process broker of the embedded mode: a bounded job queue, the local [`Hub`] for events
//! and a broadcast channel for cancels. Nothing leaves the process.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tokio::sync::{Mutex, broadcast, mpsc};
use uuid::Uuid;

use super::{Broker, BrokerError, Delivery, Hub, Subscription};
use crate::protocol::{Job, ServerEvent};

/// Jobs waiting for the worker before `enqueue` starts to wait (back-pressure on senders).
const QUEUE_CAPACITY: usize = 65_536;

/// In-process [`Broker`].
pub struct MemoryBroker {
    jobs_tx: mpsc::Sender<Job>,
    jobs_rx: Mutex<mpsc::Receiver<Job>>,
    next_id: AtomicU64,
    hub: Hub,
    cancels: broadcast::Sender<Uuid>,
}

impl MemoryBroker {
    /// A broker whose chat channels buffer `chat_buffer` events per slow socket.
    pub fn new(chat_buffer: usize) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::channel(QUEUE_CAPACITY);
        Self {
            jobs_tx,
            jobs_rx: Mutex::new(jobs_rx),
            next_id: AtomicU64::new(1),
            hub: Hub::new(chat_buffer),
            cancels: broadcast::channel(1024).0,
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn enqueue(&self, job: Job) -> Result<(), BrokerError> {
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

    async fn ack(&self, _delivery: &Delivery) -> Result<(), BrokerError> {
        // A job leaves the in-process queue when it is delivered; nothing to acknowledge.
        Ok(())
    }

    async fn publish(&self, chat_id: Uuid, event: &ServerEvent) -> Result<(), BrokerError> {
        // Serialize only for a chat someone is watching (answers stream to nobody after a
        // chat's last socket closes).
        if self.hub.has_subscribers(chat_id) {
            self.hub.send(chat_id, event.to_frame());
        }
        Ok(())
    }

    async fn subscribe(&self, chat_id: Uuid) -> Result<Subscription, BrokerError> {
        Ok(self.hub.subscribe(chat_id).0)
    }

    async fn cancel(&self, chat_id: Uuid) -> Result<(), BrokerError> {
        // No receiver just means no worker is running; nothing to cancel then.
        let _ = self.cancels.send(chat_id);
        Ok(())
    }

    fn cancels(&self) -> broadcast::Receiver<Uuid> {
        self.cancels.subscribe()
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        if self.jobs_tx.is_closed() {
            return Err(BrokerError::Closed);
        }
        Ok(())
    }
}
