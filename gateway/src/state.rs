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
    draining: Arc<AtomicBool>,
}

impl AppState {
    /// Assembles the state.
    pub fn new(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        limits: Arc<dyn Limits>,
        config: Arc<Config>,
        tenants: TenantCache,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            store,
            broker,
            limits,
            config,
            tenants,
            shutdown,
            quotas: Arc::default(),
            draining: Arc::new(AtomicBool::new(false)),
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
