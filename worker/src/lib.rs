//! Parley's worker: takes queued user messages, asks the tenant's model, streams the answer to
//! the chat's sockets token by token and saves it.
//!
//! - [`dispatch`]: one chat's messages one at a time in arrival order, different chats in parallel.
//! - [`answer`]: answering one message (context, streaming, cancel, errors).
//! - [`finish`]: saving the answer and announcing its end.
//! - [`publisher`]: an attempt's events, fenced, numbered and retried.
//! - [`usage`]: per-tenant daily usage, written once a second.
//! - [`sweep`]: queues again saved messages that have neither an answer nor a live job.
//! - [`provider`]: the model seam (`mock` built in, `openai` for configured endpoints).
//!
//! In the embedded mode the gateway runs [`Worker::run`] in its own process.

pub mod answer;
pub mod dispatch;
pub mod finish;
pub mod provider;
pub mod publisher;
pub mod sweep;
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
    unanswered_after: std::time::Duration,
}

/// Why a stand-alone worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Without Redis there is nothing to consume: the gateway answers in-process.
    #[error("the worker needs PARLEY_REDIS_URL (without it the gateway answers in-process)")]
    NoRedis,
    /// The store could not be opened.
    #[error("opening the store")]
    Store(#[source] shared::store::StoreError),
    /// The broker could not be reached.
    #[error("connecting to the broker")]
    Broker(#[source] shared::broker::BrokerError),
}

impl Worker {
    /// A stand-alone worker as the configuration describes it: its store, its broker (as a
    /// worker, holding a liveness lease) and the configured models. The `worker` binary and
    /// the tests start workers this way.
    pub async fn build(config: &shared::config::Config) -> Result<Self, BuildError> {
        if config.redis_url.is_none() {
            return Err(BuildError::NoRedis);
        }
        let store = shared::store::open(config)
            .await
            .map_err(BuildError::Store)?;
        let broker = shared::broker::connect(config, store.clone(), shared::broker::Role::Worker)
            .await
            .map_err(BuildError::Broker)?;
        let cache = std::time::Duration::from_secs(config.limits.tenant_cache_secs);
        let tenants = TenantCache::new(store, cache);
        Ok(Self::new(tenants, broker, config))
    }

    /// A worker with the built-in providers and the configured model endpoints, reading tenants through `tenants` (and the store
    /// behind it).
    pub fn new(
        tenants: TenantCache,
        broker: Arc<dyn Broker>,
        config: &shared::config::Config,
    ) -> Self {
        let unanswered_after =
            std::time::Duration::from_secs(config.delivery.unanswered_after_secs);
        let config = config.worker.clone();
        Self {
            unanswered_after,
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

    /// What the worker's `/readyz` checks: its store and broker, and `draining`.
    pub fn readiness(
        &self,
        timeouts: shared::config::TimeoutsConfig,
        draining: Arc<std::sync::atomic::AtomicBool>,
    ) -> shared::health::Readiness {
        shared::health::Readiness::new(
            self.ctx.store.clone(),
            self.ctx.broker.clone(),
            timeouts,
            draining,
        )
    }

    /// Consumes jobs until `shutdown` fires (or the broker closes), then lets the answers in
    /// progress finish (see [`dispatch`]); `Shutdown::stop` waits for them, so bound it by the
    /// drain timeout. Spawns its tasks on `shutdown`.
    pub async fn run(self, shutdown: shared::shutdown::Shutdown) {
        let cancels = answer::listen_for_cancels(self.ctx.clone(), shutdown.token.clone());
        shutdown.tracker.spawn(cancels);
        let (usage, store) = (self.ctx.usage.clone(), self.ctx.store.clone());
        usage::start_flushing(usage, store, self.ctx.answering.clone(), &shutdown);
        let sweep = sweep::run(
            self.ctx.clone(),
            shutdown.token.clone(),
            self.unanswered_after,
        );
        shutdown.tracker.spawn(sweep);
        dispatch::run(self.ctx, shutdown).await;
    }
}
