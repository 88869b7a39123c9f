//! Local fan-out: every socket subscribed to a chat on this process has its own bounded queue.
//!
//! A chat's entry exists while at least one [`Subscription`] to it is alive, so memory follows
//! open chats, not history. Each event is serialized once ([`Frame`]) and its bytes are shared
//! by all queues. A queue is a `flume` channel, which allocates as it fills, so an idle socket
//! costs a couple of hundred bytes however large the bound. A socket whose queue is full when an
//! event arrives has missed it: it is dropped from the chat, drains what it has, then sees the end
//! of its subscription and is closed with `SLOW_CONSUMER`; a slow client never grows the
//! process's memory beyond its bound.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use dashmap::DashMap;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::protocol::Frame;

struct Subscriber {
    id: u64,
    tx: flume::Sender<Frame>,
}

/// Per-process registry of chat subscribers.
#[derive(Clone)]
pub struct Hub {
    chats: Arc<DashMap<Uuid, Vec<Subscriber>>>,
    next_id: Arc<AtomicU64>,
    capacity: usize,
    emptied: Option<mpsc::UnboundedSender<Uuid>>,
}

impl Hub {
    /// A hub whose per-socket queues hold up to `capacity` events.
    pub fn new(capacity: usize) -> Self {
        Self {
            chats: Arc::new(DashMap::new()),
            next_id: Arc::new(AtomicU64::new(0)),
            capacity: capacity.max(1),
            emptied: None,
        }
    }

    /// A hub that reports on `emptied` every chat whose last local subscriber left (a networked
    /// broker then unsubscribes upstream).
    pub fn with_listener(capacity: usize, emptied: mpsc::UnboundedSender<Uuid>) -> Self {
        Self {
            emptied: Some(emptied),
            ..Self::new(capacity)
        }
    }

    /// Whether the chat has local subscribers now.
    pub fn has_subscribers(&self, chat_id: Uuid) -> bool {
        self.chats.contains_key(&chat_id)
    }

    /// The chats with local subscribers now.
    pub fn chat_ids(&self) -> Vec<Uuid> {
        self.chats.iter().map(|e| *e.key()).collect()
    }

    /// Subscribes to a chat's events; the second value is true when this is the chat's first
    /// local subscriber (a networked broker then subscribes upstream).
    pub fn subscribe(&self, chat_id: Uuid) -> (Subscription, bool) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = flume::bounded(self.capacity);
        let mut subs = self.chats.entry(chat_id).or_default();
        let first = subs.is_empty();
        subs.push(Subscriber { id, tx });
        drop(subs);
        let guard = SubscriptionGuard {
            hub: self.clone(),
            chat_id,
            id,
        };
        (Subscription { rx, _guard: guard }, first)
    }

    /// Queues a frame for every local subscriber of the chat; false when there are none.
    /// Subscribers whose queue is full are dropped from the chat.
    pub fn send(&self, chat_id: Uuid, frame: Frame) -> bool {
        let mut slow = Vec::new();
        {
            let Some(subs) = self.chats.get(&chat_id) else {
                return false;
            };
            for s in subs.iter() {
                if let Err(flume::TrySendError::Full(_)) = s.tx.try_send(frame.clone()) {
                    slow.push(s.id);
                }
            }
        }
        if !slow.is_empty()
            && let Some(mut subs) = self.chats.get_mut(&chat_id)
        {
            subs.retain(|s| !slow.contains(&s.id));
        }
        true
    }

    /// Number of chats with local subscribers.
    pub fn chat_count(&self) -> usize {
        self.chats.len()
    }

    /// Removes one subscriber; true when it was the chat's last (a networked broker then
    /// unsubscribes upstream).
    fn release(&self, chat_id: Uuid, id: u64) -> bool {
        let emptied = self
            .chats
            .remove_if_mut(&chat_id, |_, subs| {
                subs.retain(|s| s.id != id);
                subs.is_empty()
            })
            .is_some();
        if emptied && let Some(tx) = &self.emptied {
            let _ = tx.send(chat_id);
        }
        emptied
    }
}

/// A live subscription to one chat's events.
pub struct Subscription {
    rx: flume::Receiver<Frame>,
    _guard: SubscriptionGuard,
}

impl Subscription {
    /// The next event; `None` once this subscriber was dropped for falling behind.
    pub async fn recv(&mut self) -> Option<Frame> {
        self.rx.recv_async().await.ok()
    }
}

struct SubscriptionGuard {
    hub: Hub,
    chat_id: Uuid,
    id: u64,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.hub.release(self.chat_id, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_live_exactly_as_long_as_their_subscribers() {
        let hub = Hub::new(4);
        let chat = Uuid::new_v4();
        let (mut a, first_a) = hub.subscribe(chat);
        let (b, first_b) = hub.subscribe(chat);
        assert!(first_a && !first_b);
        assert!(hub.send(chat, Frame::from("x")));
        assert_eq!(a.recv().await.as_deref(), Some("x"));
        drop(b);
        assert_eq!(hub.chat_count(), 1);
        drop(a);
        assert_eq!(hub.chat_count(), 0);
        assert!(!hub.send(chat, Frame::from("y")));
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_dropped_after_draining() {
        let hub = Hub::new(2);
        let chat = Uuid::new_v4();
        let (mut slow, _) = hub.subscribe(chat);
        for i in 0..3 {
            hub.send(chat, Frame::from(format!("{i}")));
        }
        assert_eq!(slow.recv().await.as_deref(), Some("0"));
        assert_eq!(slow.recv().await.as_deref(), Some("1"));
        assert_eq!(slow.recv().await, None);
    }
}
