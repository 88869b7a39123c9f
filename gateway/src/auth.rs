//! Authentication: tenant API keys (hashed lookup, short cache) and the operator's admin token.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use dashmap::DashMap;
use shared::{
    keys,
    store::{Store, Tenant},
};

use crate::error::ApiError;

/// Tenants by key hash, each entry fresh for a few seconds so that the socket and REST paths do
/// not hit the database on every request. Admin changes in this process clear it at once;
/// changes from another process (the CLI) apply within the time-to-live.
#[derive(Clone)]
pub struct TenantCache {
    store: Arc<dyn Store>,
    ttl: Duration,
    entries: Arc<DashMap<String, (Instant, Tenant)>>,
}

impl TenantCache {
    /// A cache in front of `store`.
    pub fn new(store: Arc<dyn Store>, ttl_secs: u64) -> Self {
        Self {
            store,
            ttl: Duration::from_secs(ttl_secs),
            entries: Arc::new(DashMap::new()),
        }
    }

    /// The tenant owning `api_key`, or `InvalidKey`.
    pub async fn resolve(&self, api_key: &str) -> Result<Tenant, ApiError> {
        let hash = keys::hash(api_key);
        if let Some(entry) = self.entries.get(&hash)
            && entry.0.elapsed() < self.ttl
        {
            return Ok(entry.1.clone());
        }
        let tenant = self
            .store
            .tenant_by_key_hash(&hash)
            .await?
            .ok_or(ApiError::InvalidKey)?;
        if self.entries.len() > 100_000 {
            self.entries.clear();
        }
        self.entries.insert(hash, (Instant::now(), tenant.clone()));
        Ok(tenant)
    }

    /// Forgets every cached tenant (after an admin change).
    pub fn invalidate(&self) {
        self.entries.clear();
    }
}

/// Checks an `Authorization: Bearer` value against the configured admin token in constant time.
pub fn admin_token_matches(header: Option<&str>, configured: &str) -> bool {
    let given = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    keys::hashes_equal(&keys::hash(given), &keys::hash(configured))
}
