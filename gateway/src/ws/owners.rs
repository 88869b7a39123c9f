//! Chats' owners as handshakes (and the chats' creation) found them, so that a socket
//! connecting to its chat costs no store query.
//!
//! A chat never changes tenant or owner, but it can be deleted. Deletions are announced to
//! every process on the broker ([`shared::broker::ChatLog::forget`]) and forgotten here as they
//! arrive; when announcements may have been missed (the pub/sub connection was lost, or this
//! listener fell behind) everything is forgotten. An entry is also believed for a bounded time
//! only (`limits.chat_owner_cache_secs`), a backstop for an announcement that was never sent
//! (the broker was unreachable as the chat was deleted). Even then a stale entry opens nothing:
//! the deleted chat's log is gone, and joining it ends in `CHAT_NOT_FOUND`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use shared::broker::Deletion;
use shared::shutdown::CancellationToken;
use tokio::sync::broadcast::{self, error::RecvError};
use uuid::Uuid;

/// The owners, each believed for `ttl`.
pub struct ChatOwners {
    ttl: Duration,
    chats: dashmap::DashMap<Uuid, Owner>,
}

/// What a handshake learnt of a chat.
struct Owner {
    tenant: Uuid,
    user: Arc<str>,
    seen: Instant,
}

/// Bound on remembered chats; past it the map starts over.
const MAX_OWNERS: usize = 200_000;

impl ChatOwners {
    /// Owners believed for `ttl` each.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            chats: dashmap::DashMap::new(),
        }
    }

    /// The user `chat` was created for, when `tenant` is known to own it (and was lately).
    pub fn user_of(&self, tenant: Uuid, chat: Uuid) -> Option<Arc<str>> {
        self.chats
            .get(&chat)
            .filter(|owner| owner.tenant == tenant && owner.seen.elapsed() < self.ttl)
            .map(|owner| owner.user.clone())
    }

    /// Remembers that `tenant` owns `chat`, created for `user`.
    pub fn learn(&self, tenant: Uuid, chat: Uuid, user: Arc<str>) {
        if self.chats.len() >= MAX_OWNERS {
            self.chats.clear();
        }
        let seen = Instant::now();
        self.chats.insert(chat, Owner { tenant, user, seen });
    }

    /// Forgets a deleted chat.
    pub fn forget(&self, chat: Uuid) {
        self.chats.remove(&chat);
    }

    /// Applies announced deletions until `stop` is cancelled or the broker closes.
    pub async fn follow(
        self: Arc<Self>,
        mut deletions: broadcast::Receiver<Deletion>,
        stop: CancellationToken,
    ) {
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = deletions.recv() => next,
            };
            match next {
                Ok(Deletion::Chat(chat)) => self.forget(chat),
                Ok(Deletion::Missed) | Err(RecvError::Lagged(_)) => self.chats.clear(),
                Err(RecvError::Closed) => return,
            }
        }
    }
}
