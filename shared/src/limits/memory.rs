//! In-process limits for the embedded mode: counters behind RAII leases and fixed windows.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use dashmap::DashMap;
use uuid::Uuid;

use super::{ConnectionLease, Limits, LimitsError, RateDecision};

#[derive(Default)]
struct Counters {
    tenants: DashMap<Uuid, u32>,
    chats: DashMap<Uuid, u32>,
}

impl Counters {
    fn decrement(map: &DashMap<Uuid, u32>, key: Uuid) {
        map.remove_if_mut(&key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

struct Slot {
    counters: Arc<Counters>,
    tenant_id: Uuid,
    chat_id: Uuid,
}

impl Drop for Slot {
    fn drop(&mut self) {
        Counters::decrement(&self.counters.tenants, self.tenant_id);
        Counters::decrement(&self.counters.chats, self.chat_id);
    }
}

/// In-process [`Limits`].
#[derive(Default)]
pub struct MemoryLimits {
    counters: Arc<Counters>,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl MemoryLimits {
    /// Empty limits.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Limits for MemoryLimits {
    async fn acquire_connection(
        &self,
        tenant_id: Uuid,
        chat_id: Uuid,
        max: u32,
    ) -> Result<Option<ConnectionLease>, LimitsError> {
        {
            let mut held = self.counters.tenants.entry(tenant_id).or_insert(0);
            if *held >= max {
                drop(held);
                // Undo the entry we may just have created.
                self.counters.tenants.remove_if(&tenant_id, |_, n| *n == 0);
                return Ok(None);
            }
            *held += 1;
        }
        *self.counters.chats.entry(chat_id).or_insert(0) += 1;
        Ok(Some(ConnectionLease::new(Slot {
            counters: self.counters.clone(),
            tenant_id,
            chat_id,
        })))
    }

    async fn tenant_connections(&self, tenant_id: Uuid) -> Result<u32, LimitsError> {
        Ok(self.counters.tenants.get(&tenant_id).map_or(0, |n| *n))
    }

    async fn chat_connections(&self, chat_id: Uuid) -> Result<u32, LimitsError> {
        Ok(self.counters.chats.get(&chat_id).map_or(0, |n| *n))
    }

    async fn hit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, LimitsError> {
        let now = Instant::now();
        let mut windows = self
            .windows
            .lock()
            .map_err(|e| LimitsError::new(e.to_string()))?;
        if windows.len() > 10_000 {
            windows.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let (start, count) = windows.entry(key.to_owned()).or_insert((now, 0));
        if now.duration_since(*start) >= window {
            *start = now;
            *count = 0;
        }
        let allowed = *count < limit;
        if allowed {
            *count += 1;
        }
        Ok(RateDecision {
            allowed,
            limit,
            remaining: limit.saturating_sub(*count),
            reset_after: window.saturating_sub(now.duration_since(*start)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_come_back_when_leases_drop() -> Result<(), LimitsError> {
        let limits = MemoryLimits::new();
        let (tenant, chat) = (Uuid::new_v4(), Uuid::new_v4());
        let a = limits.acquire_connection(tenant, chat, 2).await?;
        let b = limits.acquire_connection(tenant, chat, 2).await?;
        assert!(a.is_some() && b.is_some());
        assert!(limits.acquire_connection(tenant, chat, 2).await?.is_none());
        assert_eq!(limits.chat_connections(chat).await?, 2);
        drop((a, b));
        assert_eq!(limits.tenant_connections(tenant).await?, 0);
        assert_eq!(limits.chat_connections(chat).await?, 0);
        Ok(())
    }

    #[tokio::test]
    async fn windows_count_and_refuse() -> Result<(), LimitsError> {
        let limits = MemoryLimits::new();
        let w = Duration::from_secs(60);
        assert_eq!(limits.hit("k", 2, w).await?.remaining, 1);
        assert!(limits.hit("k", 2, w).await?.allowed);
        let refused = limits.hit("k", 2, w).await?;
        assert!(!refused.allowed && refused.remaining == 0);
        Ok(())
    }
}
