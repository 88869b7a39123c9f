//! Local fan-out: a process's sockets of one chat read that chat's recent events from one
//! shared, bounded feed, each at its own cursor (the last `seq` it was sent).
//!
//! A chat's feed exists while at least one [`Subscription`] to it is alive, so memory follows
//! open chats, not sockets: a socket holds a cursor and a watch receiver, never a queue of its
//! own. The feed keeps the chat's last `chat_buffer` events in `seq` order; a socket that keeps
//! up reads them from there; one that falls behind the feed (a slow reader), or finds a hole in
//! it (a `seq` jump after lost pub/sub messages, a late join, a resume), is told by
//! [`Next::Gap`] to read that range from the chat log, then comes back here. A burst therefore
//! never needs to sit whole in any queue, and nothing but the chat log's retention bounds how
//! far a reading socket may lag.

use std::collections::VecDeque;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::Sequenced;

/// One chat's recent events on this process.
#[derive(Debug, Default)]
pub struct FeedState {
    ring: VecDeque<Sequenced>,
    /// The highest `seq` known to exist (from an event, or a hint after a reconnect).
    head: u64,
    /// The highest `seq` pushed out of the ring by newer events.
    evicted: u64,
    /// Times this process found it may have missed events it cannot name (see [`Hub::lost`]).
    losses: u64,
    capacity: usize,
}

impl FeedState {
    fn push(&mut self, event: Sequenced) {
        // Pub/sub delivers a chat's events in `seq` order; anything older is a repeat.
        if self.ring.back().is_some_and(|last| last.seq >= event.seq) {
            return;
        }
        self.head = self.head.max(event.seq);
        self.ring.push_back(event);
        while self.ring.len() > self.capacity {
            if let Some(old) = self.ring.pop_front() {
                self.evicted = old.seq;
            }
        }
    }

    /// The index of the first event after `cursor`. Usually the ring holds consecutive `seq`s,
    /// so the index is computed; after a hole, searched.
    fn position_after(&self, cursor: u64) -> usize {
        let guess = self
            .ring
            .front()
            .and_then(|front| usize::try_from((cursor + 1).checked_sub(front.seq)?).ok());
        match guess {
            Some(i) if self.ring.get(i).is_some_and(|e| e.seq == cursor + 1) => i,
            _ => self.ring.partition_point(|e| e.seq <= cursor),
        }
    }

    /// What a socket whose cursor is `cursor` should do next.
    fn next(&self, cursor: u64, max: usize) -> Next {
        if self.head <= cursor {
            return Next::UpToDate;
        }
        let from = self.position_after(cursor);
        let Some(first) = self.ring.get(from) else {
            return Next::Gap {
                until: self.head,
                slow: false,
            };
        };
        if first.seq != cursor + 1 {
            return Next::Gap {
                until: first.seq - 1,
                slow: cursor < self.evicted,
            };
        }
        let mut expected = cursor + 1;
        let events = self
            .ring
            .range(from..)
            .take(max)
            .take_while(|e| {
                let contiguous = e.seq == expected;
                expected += 1;
                contiguous
            })
            .cloned()
            .collect();
        Next::Ready(events)
    }
}

/// What a socket reads next (see [`Subscription::next`]).
#[derive(Debug, PartialEq)]
pub enum Next {
    /// The events right after the cursor, in order.
    Ready(Vec<Sequenced>),
    /// The feed lacks the events after the cursor up to `until` (inclusive): read them from the
    /// chat log. `slow` when the feed held them but the socket read too slowly.
    Gap {
        /// The last `seq` of the hole.
        until: u64,
        /// Whether the socket fell behind (rather than the feed missing events).
        slow: bool,
    },
    /// The socket has every event there is.
    UpToDate,
    /// This process may have missed events of the chat and cannot tell which: the socket
    /// should be closed with 1012 so that its client resumes.
    Lost,
}

struct ChatEntry {
    feed: Arc<watch::Sender<FeedState>>,
    subscribers: usize,
}

/// Per-process registry of chat feeds.
#[derive(Clone)]
pub struct Hub {
    chats: Arc<DashMap<Uuid, ChatEntry>>,
    capacity: usize,
    emptied: Option<mpsc::UnboundedSender<Uuid>>,
}

impl Hub {
    /// A hub whose feeds keep each chat's last `capacity` events.
    pub fn new(capacity: usize) -> Self {
        Self {
            chats: Arc::new(DashMap::new()),
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

    /// Subscribes to a chat's feed; the second value is true when this is the chat's first
    /// local subscriber (a networked broker then subscribes upstream).
    pub fn subscribe(&self, chat_id: Uuid) -> (Subscription, bool) {
        let mut entry = self.chats.entry(chat_id).or_insert_with(|| ChatEntry {
            feed: Arc::new(watch::Sender::new(FeedState {
                capacity: self.capacity,
                ..FeedState::default()
            })),
            subscribers: 0,
        });
        entry.subscribers += 1;
        let first = entry.subscribers == 1;
        let feed = entry.feed.subscribe();
        drop(entry);
        let losses = feed.borrow().losses;
        let guard = SubscriptionGuard {
            hub: self.clone(),
            chat_id,
        };
        let sub = Subscription {
            feed,
            losses,
            _guard: guard,
        };
        (sub, first)
    }

    /// Adds events (in `seq` order) to the chat's feed and wakes its sockets; false when the
    /// chat has no local subscriber.
    pub fn push(&self, chat_id: Uuid, events: impl IntoIterator<Item = Sequenced>) -> bool {
        let Some(entry) = self.chats.get(&chat_id) else {
            return false;
        };
        entry.feed.send_modify(|state| {
            for event in events {
                state.push(event);
            }
        });
        true
    }

    /// Tells the chat's sockets that events up to `latest` exist, though this process may not
    /// have received them (its pub/sub connection was down): they read them from the log.
    pub fn hint(&self, chat_id: Uuid, latest: u64) {
        if let Some(entry) = self.chats.get(&chat_id) {
            entry.feed.send_if_modified(|state| {
                let newer = latest > state.head;
                state.head = state.head.max(latest);
                newer
            });
        }
    }

    /// Tells every socket of every chat on this process that events may have been missed
    /// that cannot be recovered here (the pub/sub connection came back but the chats' latest
    /// `seq`s could not be read): they are sent to resume.
    pub fn lost(&self) {
        for entry in self.chats.iter() {
            entry.feed.send_modify(|state| state.losses += 1);
        }
    }

    /// Number of chats with local subscribers.
    pub fn chat_count(&self) -> usize {
        self.chats.len()
    }

    /// Removes one subscriber; reports the chat when it was its last.
    fn release(&self, chat_id: Uuid) {
        let emptied = self
            .chats
            .remove_if_mut(&chat_id, |_, entry| {
                entry.subscribers = entry.subscribers.saturating_sub(1);
                entry.subscribers == 0
            })
            .is_some();
        if emptied && let Some(tx) = &self.emptied {
            let _ = tx.send(chat_id);
        }
    }
}

/// A live subscription to one chat's feed.
pub struct Subscription {
    feed: watch::Receiver<FeedState>,
    /// The feed's losses when this subscription began.
    losses: u64,
    _guard: SubscriptionGuard,
}

impl Subscription {
    /// Waits until the feed has changed since the last [`Self::next`].
    pub async fn changed(&mut self) {
        // The sender lives in the hub entry while this subscription does, so this only fails
        // if the hub itself is gone; then there is nothing more to wait for.
        if self.feed.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Up to `max` events after `cursor`, or what to do instead.
    pub fn next(&mut self, cursor: u64, max: usize) -> Next {
        let state = self.feed.borrow_and_update();
        if state.losses > self.losses {
            return Next::Lost;
        }
        state.next(cursor, max)
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

    fn event(seq: u64) -> Sequenced {
        Sequenced {
            seq,
            frame: format!("{seq}").into(),
        }
    }

    /// The `seq`s of a ready step (empty for any other step).
    fn seqs(next: Next) -> Vec<u64> {
        match next {
            Next::Ready(events) => events.into_iter().map(|e| e.seq).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn entries_live_exactly_as_long_as_their_subscribers() {
        let hub = Hub::new(4);
        let chat = Uuid::new_v4();
        let (mut a, first_a) = hub.subscribe(chat);
        let (b, first_b) = hub.subscribe(chat);
        assert!(first_a && !first_b);
        assert!(hub.push(chat, [event(1)]));
        assert_eq!(seqs(a.next(0, 10)), [1]);
        drop(b);
        assert_eq!(hub.chat_count(), 1);
        drop(a);
        assert_eq!(hub.chat_count(), 0);
        assert!(!hub.push(chat, [event(2)]));
    }

    #[test]
    fn a_reader_that_falls_behind_the_feed_is_sent_to_the_log() {
        let hub = Hub::new(3);
        let chat = Uuid::new_v4();
        let (mut slow, _) = hub.subscribe(chat);
        hub.push(chat, (1..=5).map(event));
        assert_eq!(
            slow.next(0, 10),
            Next::Gap {
                until: 2,
                slow: true
            }
        );
        assert_eq!(seqs(slow.next(2, 2)), [3, 4]);
        assert_eq!(seqs(slow.next(4, 10)), [5]);
        assert_eq!(slow.next(5, 10), Next::UpToDate);
    }

    #[test]
    fn a_seq_jump_or_a_hint_is_a_hole_to_fill_from_the_log() {
        let hub = Hub::new(8);
        let chat = Uuid::new_v4();
        let (mut sub, _) = hub.subscribe(chat);
        hub.push(chat, [event(1), event(2), event(5), event(6)]);
        assert_eq!(seqs(sub.next(0, 10)), [1, 2]);
        assert_eq!(
            sub.next(2, 10),
            Next::Gap {
                until: 4,
                slow: false
            }
        );
        assert_eq!(seqs(sub.next(4, 10)), [5, 6]);
        hub.hint(chat, 9);
        assert_eq!(
            sub.next(6, 10),
            Next::Gap {
                until: 9,
                slow: false
            }
        );
        // Repeats and older events are ignored.
        hub.push(chat, [event(6), event(10)]);
        assert_eq!(
            sub.next(9, 10),
            Next::Ready(vec![event(10)]),
            "the event after the hint is read from the feed"
        );
    }
}
