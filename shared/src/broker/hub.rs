//! Local fan-out: one bounded broadcast channel per chat that has sockets on this process.
//!
//! A chat's channel exists while at least one [`Subscription`] to it is alive, so memory follows
//! open chats, not history. Each event is serialized once ([`Frame`]) and shared by all sockets.
//! The channel's capacity is the per-socket outbound bound: a socket that falls further behind
//! sees `Lagged` and is closed, so a slow client never grows the process's memory.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::protocol::Frame;

/// Per-process registry of chat channels.
#[derive(Clone)]
pub struct Hub {
    chats: Arc<DashMap<Uuid, broadcast::Sender<Frame>>>,
    capacity: usize,
}

impl Hub {
    /// A hub whose chat channels hold up to `capacity` events for the slowest socket.
    pub fn new(capacity: usize) -> Self {
        Self {
            chats: Arc::new(DashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// Subscribes to a chat's events; the second value is true when this is the chat's first
    /// local subscriber (a networked broker then subscribes upstream).
    pub fn subscribe(&self, chat_id: Uuid) -> (Subscription, bool) {
        let mut first = false;
        let rx = self
            .chats
            .entry(chat_id)
            .or_insert_with(|| {
                first = true;
                broadcast::channel(self.capacity).0
            })
            .subscribe();
        let sub = Subscription {
            rx,
            _guard: SubscriptionGuard {
                hub: self.clone(),
                chat_id,
            },
        };
        (sub, first)
    }

    /// Delivers a frame to the chat's local subscribers; false when there are none.
    pub fn send(&self, chat_id: Uuid, frame: Frame) -> bool {
        match self.chats.get(&chat_id) {
            Some(tx) => tx.send(frame).is_ok(),
            None => false,
        }
    }

    /// Number of chats with local subscribers.
    pub fn chat_count(&self) -> usize {
        self.chats.len()
    }

    /// Removes the chat's channel if nobody listens any more; true when removed (a networked
    /// broker then unsubscribes upstream).
    fn release(&self, chat_id: Uuid) -> bool {
        self.chats
            .remove_if(&chat_id, |_, tx| tx.receiver_count() == 0)
            .is_some()
    }
}

/// A live subscription to one chat's events.
pub struct Subscription {
    // Declared first so the receiver is dropped before the guard counts receivers.
    rx: broadcast::Receiver<Frame>,
    _guard: SubscriptionGuard,
}

impl Subscription {
    /// The next event, or `Lagged` when this subscriber fell more than the capacity behind.
    pub async fn recv(&mut self) -> Result<Frame, broadcast::error::RecvError> {
        self.rx.recv().await
    }
}

struct SubscriptionGuard {
    hub: Hub,
    chat_id: Uuid,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.hub.release(self.chat_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn channels_live_exactly_as_long_as_their_subscribers()
    -> Result<(), broadcast::error::RecvError> {
        let hub = Hub::new(4);
        let chat = Uuid::new_v4();
        let (mut a, first_a) = hub.subscribe(chat);
        let (b, first_b) = hub.subscribe(chat);
        assert!(first_a && !first_b);
        assert!(hub.send(chat, Frame::from("x")));
        assert_eq!(a.recv().await?, "x");
        drop(b);
        assert_eq!(hub.chat_count(), 1);
        drop(a);
        assert_eq!(hub.chat_count(), 0);
        assert!(!hub.send(chat, Frame::from("y")));
        Ok(())
    }
}
