//! A short-lived cache of tenants, by API key hash and by id.
//!
//! The socket and REST paths resolve a key on every request and the worker reads the tenant's
//! agent settings for every answer; caching them for a few seconds keeps the database off those
//! hot paths. Changes made through this process's admin API clear the cache at once (the
//! embedded worker shares the gateway's instance); changes from another process (the CLI, another
//! gateway) apply within the time-to-live.
//!
//! Unknown keys are cached too (a bounded negative cache, same time-to-live), and a key that
//! cannot be a Parley key is refused without a lookup: a flood of made-up keys costs no store
//! query per handshake. A key created on another process is therefore refused for up to the
//! time-to-live if it was tried just before it existed.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use dashmap::DashMap;
use uuid::Uuid;

use super::{Store, StoreResult, Tenant};
use crate::keys;

/// Bound on cached entries; past it the cache starts over (tenants are few, keys fewer).
const MAX_ENTRIES: usize = 100_000;

/// Bound on remembered unknown keys; past it they are forgotten at once.
const MAX_MISSES: usize = 10_000;

/// Tenants by key hash and by id, each entry fresh for `ttl`.
#[derive(Clone)]
pub struct TenantCache {
    store: Arc<dyn Store>,
    ttl: Duration,
    by_key: Arc<DashMap<String, (Instant, Tenant)>>,
    by_id: Arc<DashMap<Uuid, (Instant, Tenant)>>,
    misses: Arc<DashMap<String, Instant>>,
}

impl TenantCache {
    /// A cache in front of `store`.
    pub fn new(store: Arc<dyn Store>, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            by_key: Arc::new(DashMap::new()),
            by_id: Arc::new(DashMap::new()),
            misses: Arc::new(DashMap::new()),
        }
    }

    /// The tenant owning `api_key`, if any.
    pub async fn by_key(&self, api_key: &str) -> StoreResult<Option<Tenant>> {
        if !keys::looks_like_key(api_key) {
            return Ok(None);
        }
        let hash = keys::hash(api_key);
        if let Some(hit) = fresh(&self.by_key, &hash, self.ttl) {
            return Ok(Some(hit));
        }
        if self
            .misses
            .get(&hash)
            .is_some_and(|at| at.elapsed() < self.ttl)
        {
            return Ok(None);
        }
        let found = self.store.tenant_by_key_hash(&hash).await?;
        match &found {
            Some(t) => insert(&self.by_key, hash, t.clone()),
            None => {
                if self.misses.len() >= MAX_MISSES {
                    self.misses.clear();
                }
                self.misses.insert(hash, Instant::now());
            }
        }
        Ok(found)
    }

    /// The tenant with this id, if any.
    pub async fn by_id(&self, id: Uuid) -> StoreResult<Option<Tenant>> {
        if let Some(hit) = fresh(&self.by_id, &id, self.ttl) {
            return Ok(Some(hit));
        }
        let found = self.store.get_tenant(id).await?;
        if let Some(t) = &found {
            insert(&self.by_id, id, t.clone());
        }
        Ok(found)
    }

    /// The store behind the cache.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Forgets every cached tenant (after an admin change).
    pub fn invalidate(&self) {
        self.by_key.clear();
        self.by_id.clear();
        self.misses.clear();
    }
}

fn fresh<K: std::hash::Hash + Eq>(
    map: &DashMap<K, (Instant, Tenant)>,
    key: &K,
    ttl: Duration,
) -> Option<Tenant> {
    map.get(key)
        .filter(|e| e.0.elapsed() < ttl)
        .map(|e| e.1.clone())
}

fn insert<K: std::hash::Hash + Eq>(map: &DashMap<K, (Instant, Tenant)>, key: K, tenant: Tenant) {
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
    map.insert(key, (Instant::now(), tenant));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TenantSettings;

    #[tokio::test]
    async fn unknown_keys_are_remembered_until_the_cache_is_invalidated() -> StoreResult<()> {
        let dir = tempfile::TempDir::new()
            .map_err(|e| super::super::StoreError::Corrupt(e.to_string()))?;
        let store =
            crate::store::connect(&format!("sqlite://{}", dir.path().join("c.db").display()))
                .await?;
        let cache = TenantCache::new(store.clone(), Duration::from_secs(60));
        assert!(cache.by_key("not a key").await?.is_none());
        let key = keys::generate();
        assert!(cache.by_key(&key).await?.is_none());
        // The key now exists, but its miss is remembered: no lookup until the entry expires or
        // an admin change clears the cache.
        let tenant = store
            .create_tenant("t", &TenantSettings::default(), &keys::hash(&key))
            .await?;
        assert!(cache.by_key(&key).await?.is_none());
        cache.invalidate();
        assert_eq!(cache.by_key(&key).await?.map(|t| t.id), Some(tenant.id));
        Ok(())
    }
}
