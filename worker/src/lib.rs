//! Parley's worker: takes queued user messages, asks the tenant's model, streams the answer to
//! the chat's sockets token by token and saves it.
//!
//! - [`dispatch`]: one chat's messages one at a time in arrival order, different chats in parallel.
//! - [`answer`]: answering one message (context, streaming, cancel, saving, errors).
//! - [`usage`]: per-tenant daily usage, written once a second.
//! - [`provider`]: the model seam (`mock` built in, `openai` for configured endpoints).
//!
//! In the embedded mode the gateway runs [`Worker::run`] in its own process.

pub mod answer;
pub mod dispatch;
pub mod provider;
pub mod usage;

use std::sync::Arc;

use dashmap::DashMap;
use shared::{
    broker::Broker,
    config::WorkerConfig,
    shutdown::CancellationToken,
    store::{Store, TenantCache},
};
use uuid::Uuid;

pub use provider::Providers;

/// What every answer needs, shared by all tasks of one worker.
pub struct Context {
    /// The durable store.
    pub store: Arc<dyn Store>,
    /// Tenants (for their agent settings), briefly cached.
    pub tenants: TenantCache,
    /// Jobs in, events out.
    pub broker: Arc<dyn Broker>,
    /// The models.
    pub providers: Providers,
    /// Cancel handles of the answers in progress, by chat.
    pub active: DashMap<Uuid, CancellationToken>,
    /// Usage not yet written to the store.
    pub usage: Arc<usage::UsageMeter>,
    /// Answers in progress (a stopping worker flushes usage once they are done).
    pub answering: Arc<std::sync::atomic::AtomicUsize>,
    /// Worker settings.
    pub config: WorkerConfig,
}

/// Resolves once no answer is in progress (polled: it only runs while a worker stops).
async fn answers_done(answering: &std::sync::atomic::AtomicUsize) {
    while answering.load(std::sync::atomic::Ordering::Acquire) > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A worker bound to a store and a broker.
pub struct Worker {
    ctx: Arc<Context>,
}

impl Worker {
    /// A worker with the built-in providers and the configured model endpoints, reading tenants through `tenants` (and the store
    /// behind it).
    pub fn new(tenants: TenantCache, broker: Arc<dyn Broker>, config: WorkerConfig) -> Self {
        Self {
            ctx: Arc::new(Context {
                store: tenants.store(),
                tenants,
                broker,
                providers: Providers::from_config(&config.models),
                active: DashMap::new(),
                usage: Arc::default(),
                answering: Arc::default(),
                config,
            }),
        }
    }

    /// Consumes jobs until `shutdown` fires (or the broker closes), then lets the answers in
    /// progress finish (see [`dispatch`]); `Shutdown::stop` waits for them, so bound it by the
    /// drain timeout. Spawns its tasks on `shutdown`.
    pub async fn run(self, shutdown: shared::shutdown::Shutdown) {
        let cancels = answer::listen_for_cancels(self.ctx.clone(), shutdown.token.clone());
        shutdown.tracker.spawn(cancels);
        let (usage, store) = (self.ctx.usage.clone(), self.ctx.store.clone());
        usage::start_flushing(usage, store, self.ctx.answering.clone(), &shutdown);
        dispatch::run(self.ctx, shutdown).await;
    }
}
