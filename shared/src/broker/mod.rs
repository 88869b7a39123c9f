//! The broker: how a gateway hands jobs to workers, how workers' events reach every socket of a
//! chat, and how a cancel reaches the worker answering a chat.
//!
//! One interface, chosen by configuration (as in Centrifugo): [`memory::MemoryBroker`] for the
//! embedded single process; a Redis implementation for the distributed product. Gateways fan
//! events out to their local sockets through a [`hub::Hub`], which both implementations share.

pub mod hub;
pub mod memory;
pub mod redis;

use async_trait::async_trait;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::protocol::{Job, ServerEvent};
pub use hub::{Hub, Subscription};

/// Broker failures.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker was shut down.
    #[error("broker closed")]
    Closed,
    /// The backing service is unreachable.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// A job handed to a worker; acknowledge it once the answer is saved.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Broker-specific id used to acknowledge.
    pub id: String,
    /// How many times this job has been delivered (1 on the first delivery).
    pub attempt: u32,
    /// The job's place in its chat's order (1, 2, …); 0 where the broker orders by itself.
    pub seq: u64,
    /// The job.
    pub job: Job,
}

/// The one broker interface.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Queues a job. Jobs of one chat are delivered in the order they were queued.
    async fn enqueue(&self, job: Job) -> Result<(), BrokerError>;
    /// Announces a saved message to the chat and queues its job, the announcement first (so
    /// it precedes the answer on every socket). A networked broker does both in one round trip.
    async fn announce_and_enqueue(
        &self,
        received: &ServerEvent,
        job: Job,
    ) -> Result<(), BrokerError> {
        self.publish(job.chat_id, received).await?;
        self.enqueue(job).await
    }
    /// Waits for the next job; `None` once the broker is closed.
    async fn next_job(&self) -> Result<Option<Delivery>, BrokerError>;
    /// Waits until every earlier job of the delivery's chat is done, whichever worker holds it.
    /// The in-process broker has a single consumer that already keeps each chat in order.
    async fn turn(&self, _delivery: &Delivery) -> Result<(), BrokerError> {
        Ok(())
    }
    /// Marks a job done so that it is never delivered again.
    async fn ack(&self, delivery: &Delivery) -> Result<(), BrokerError>;
    /// Sends an event to every socket of the chat, on every gateway.
    async fn publish(&self, chat_id: Uuid, event: &ServerEvent) -> Result<(), BrokerError>;
    /// Sends several events of one chat, in order. A networked broker carries them in one
    /// message (tokens coalesced on the wire); sockets still get one event each.
    ///
    /// `first_token_trace` is set on the call that carries an answer's first token: the
    /// `traceparent` of the publishing span, under which each gateway traces handing that
    /// token to its sockets ([`crate::telemetry::trace::forward_first_token`]). It never
    /// reaches a client.
    async fn publish_all(
        &self,
        chat_id: Uuid,
        events: &[ServerEvent],
        first_token_trace: Option<&str>,
    ) -> Result<(), BrokerError> {
        use tracing::Instrument as _;
        let forwarding = first_token_trace.map_or_else(tracing::Span::none, |t| {
            crate::telemetry::trace::forward_first_token(chat_id, t)
        });
        async {
            for event in events {
                self.publish(chat_id, event).await?;
            }
            Ok(())
        }
        .instrument(forwarding)
        .await
    }
    /// Receives the chat's events on this process until the subscription is dropped. Returns
    /// once the subscription is live, so that no event published afterwards is missed.
    async fn subscribe(&self, chat_id: Uuid) -> Result<Subscription, BrokerError>;
    /// Asks whichever worker answers the chat to stop.
    async fn cancel(&self, chat_id: Uuid) -> Result<(), BrokerError>;
    /// Cancel requests, for workers.
    fn cancels(&self) -> broadcast::Receiver<Uuid>;
    /// Reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), BrokerError>;
}
