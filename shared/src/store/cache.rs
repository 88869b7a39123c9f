//! A short-lived cache of tenants, by API key hash and by id.
//!
//! The socket and REST paths resolve a key on every request and the worker reads the tenant's
//! agent settings for every answer; caching them for a few seconds keeps the database off those
//! hot paths. Changes made through this process's admin API clear the cache at once (the
//! embedded worker shares the gateway's instance); changes from another process (the CLI, another
//! gateway) apply within the time-to-live.

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

/// Tenants by key hash and by id, each entry fresh for `ttl`.
#[derive(Clone)]
pub struct TenantCache {
    store: Arc<dyn Store>,
    ttl: Duration,
    by_key: Arc<DashMap<String, (Instant, Tenant)>>,
    by_id: Arc<DashMap<Uuid, (Instant, Tenant)>>,
}

impl TenantCache {
    /// A cache in front of `store`.
    pub fn new(store: Arc<dyn Store>, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            by_key: Arc::new(DashMap::new()),
            by_id: Arc::new(DashMap::new()),
        }
    }

    /// The tenant owning `api_key`, if any.
    pub async fn by_key(&self, api_key: &str) -> StoreResult<Option<Tenant>> {
        let hash = keys::hash(api_key);
        if let Some(hit) = fresh(&self.by_key, &hash, self.ttl) {
            return Ok(Some(hit));
        }
        let found = self.store.tenant_by_key_hash(&hash).await?;
        if let Some(t) = &found {
            insert(&self.by_key, hash, t.clone());
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
