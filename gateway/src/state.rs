//! The state every request and socket shares.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use shared::{
    broker::Broker,
    config::Config,
    limits::Limits,
    shutdown::Shutdown,
    store::{Store, TenantCache},
};

/// Shared, cheaply cloned application state.
#[derive(Clone)]
pub struct AppState {
    /// The durable store.
    pub store: Arc<dyn Store>,
    /// Jobs and chat events.
    pub broker: Arc<dyn Broker>,
    /// Tenant-wide limits.
    pub limits: Arc<dyn Limits>,
    /// The configuration this process started with.
    pub config: Arc<Config>,
    /// Tenants by API key, briefly cached.
    pub tenants: TenantCache,
    /// Stop signal and task tracker for sockets and background tasks.
    pub shutdown: Shutdown,
    /// Tenants' daily token quotas.
    pub quotas: Arc<crate::quota::Quotas>,
    /// The API keys open sockets use, to close them when a key is revoked.
    pub revocations: Arc<crate::revocation::Revocations>,
    /// Failed authentications per source address.
    pub throttle: Arc<crate::throttle::AuthThrottle>,
    /// Chats' owners, checked before a connection slot is taken.
    pub chat_owners: Arc<crate::ws::ChatOwners>,
    /// Handshakes checked at once (see [`HANDSHAKES_IN_FLIGHT`]).
    pub handshakes: Arc<tokio::sync::Semaphore>,
    /// Mints and verifies client tokens.
    pub tokens: Arc<crate::tokens::TokenKeys>,
    /// Origins any tenant allows, for CORS preflights (answered before authentication).
    pub origins: Arc<crate::cors::KnownOrigins>,
    /// What `/readyz` checks.
    pub readiness: Arc<shared::health::Readiness>,
    draining: Arc<AtomicBool>,
}

/// How many WebSocket handshakes a gateway checks at once. The upgrade answers at once and the
/// checks (key, limits, chat, user) run afterwards, so a connect storm (clients reconnecting
/// after a restart) would otherwise hold one store query in progress, a few KiB each, per
/// socket; the rest wait their turn in their task. The store's pool bounds the pace anyway.
pub const HANDSHAKES_IN_FLIGHT: usize = 64;

impl AppState {
    /// Assembles the state.
    pub fn new(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        limits: Arc<dyn Limits>,
        config: Arc<Config>,
        tenants: TenantCache,
        shutdown: Shutdown,
        throttle: crate::throttle::AuthThrottle,
    ) -> Self {
        let draining = Arc::new(AtomicBool::new(false));
        let chat_owners = Arc::new(crate::ws::ChatOwners::new(std::time::Duration::from_secs(
            config.limits.chat_owner_cache_secs,
        )));
        Self {
            readiness: Arc::new(shared::health::Readiness::new(
                store.clone(),
                broker.clone(),
                config.timeouts.clone(),
                draining.clone(),
            )),
            tokens: Arc::new(crate::tokens::TokenKeys::new(&config.auth.token_secret)),
            origins: Arc::new(crate::cors::KnownOrigins::new(
                store.clone(),
                std::time::Duration::from_secs(config.limits.tenant_cache_secs.max(1)),
            )),
            throttle: Arc::new(throttle),
            revocations: Arc::new(crate::revocation::Revocations::new(shutdown.token.clone())),
            store,
            broker,
            limits,
            config,
            tenants,
            shutdown,
            quotas: Arc::default(),
            chat_owners,
            handshakes: Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT)),
            draining,
        }
    }

    /// Marks the process as stopping: `/readyz` fails and new sockets are refused.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the process is stopping.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
