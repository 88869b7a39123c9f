//! Revoking open sockets (API.md §6): rotating a tenant's key or deleting the tenant closes the
//! sockets that authenticated with the old key, on every gateway, within 2 s.
//!
//! Each socket watches a token of the key it authenticated with, a child of the shutdown token
//! (so an idle socket waits on one token either way, and carries one pointer more). The admin
//! API revokes its own gateway's sockets at once; every gateway also checks, once a second, that
//! each key its sockets use still belongs to the same tenant (one store lookup per key in use,
//! bypassing the tenant cache), which covers the other gateways and changes made with the CLI.
//! A store that cannot be reached revokes nothing: only a key known to be gone is.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
use std::time::Duration;

use dashmap::DashMap;
use shared::shutdown::CancellationToken;
use shared::store::Store;
use uuid::Uuid;

/// How often the keys in use are checked against the store.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The keys this gateway's sockets authenticated with.
pub struct Revocations {
    keys: DashMap<String, Arc<Key>>,
    parent: CancellationToken,
}

/// One key in use: its tenant, the token its sockets watch, how many there are.
struct Key {
    tenant_id: Uuid,
    token: CancellationToken,
    sockets: AtomicUsize,
}

/// A socket's hold on its key's token; releases the key when dropped.
pub struct Watch(Arc<Key>);

impl Watch {
    /// Cancelled when the gateway stops or the key is revoked.
    pub fn token(&self) -> &CancellationToken {
        &self.0.token
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Revocations {
    /// Keys whose tokens are children of `parent` (the shutdown token).
    pub fn new(parent: CancellationToken) -> Self {
        Self {
            keys: DashMap::new(),
            parent,
        }
    }

    /// The watch of a socket that authenticated with the key of hash `key_hash` as `tenant_id`.
    pub fn watch(&self, key_hash: &str, tenant_id: Uuid) -> Watch {
        // Counted while the entry (its shard) is locked, so that `check` cannot forget a key
        // between a socket taking it and counting itself.
        let entry = self.keys.entry(key_hash.to_owned()).or_insert_with(|| {
            Arc::new(Key {
                tenant_id,
                token: self.parent.child_token(),
                sockets: AtomicUsize::new(0),
            })
        });
        entry.sockets.fetch_add(1, Ordering::Relaxed);
        Watch(entry.clone())
    }

    /// Closes every socket of the tenant on this gateway (its key was rotated, or it was
    /// deleted).
    pub fn revoke_tenant(&self, tenant_id: Uuid) {
        self.keys.retain(|_, key| {
            let keep = key.tenant_id != tenant_id;
            if !keep {
                key.token.cancel();
            }
            keep
        });
    }

    /// Checks every key in use against the store; forgets keys no socket uses.
    pub async fn check(&self, store: &dyn Store) {
        self.keys
            .retain(|_, key| key.sockets.load(Ordering::Relaxed) > 0);
        let in_use: Vec<(String, Uuid)> = self
            .keys
            .iter()
            .map(|e| (e.key().clone(), e.value().tenant_id))
            .collect();
        for (hash, tenant_id) in in_use {
            match store.tenant_by_key_hash(&hash).await {
                Ok(Some(t)) if t.id == tenant_id => {}
                Ok(_) => {
                    if let Some((_, key)) = self.keys.remove(&hash) {
                        tracing::info!(tenant_id = %tenant_id, "API key revoked; closing its sockets");
                        key.token.cancel();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not check API keys in use");
                    return;
                }
            }
        }
    }

    /// Checks the keys every [`CHECK_EVERY`] until `stop`.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, stop: CancellationToken) {
        let mut every = tokio::time::interval(CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => self.check(store.as_ref()).await,
            }
        }
    }
}
