//! The `worker` binary: answers queued messages from Redis, saving to the configured database.
//! Without `PARLEY_REDIS_URL` there is nothing to do: the gateway then runs its worker in-process.

use std::time::Duration;

use anyhow::Context as _;
use shared::{
    broker::redis::{RedisBroker, RedisBrokerConfig},
    config::Config,
    shutdown::Shutdown,
    store::{self, TenantCache},
    telemetry::TraceExport,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load()?;
    let export = TraceExport::from_config(config.otlp_endpoint.as_deref());
    // Flushes the spans still queued when main returns.
    let _telemetry = shared::telemetry::init(&config.log, export, "parley-worker")?;
    let url = config
        .redis_url
        .clone()
        .context("the worker needs PARLEY_REDIS_URL (without it the gateway answers in-process)")?;
    let store = store::connect(&config.database_url)
        .await
        .with_context(|| format!("opening the store at {}", config.database_url))?;
    let consumer = format!("worker-{}", uuid::Uuid::new_v4());
    let broker = RedisBroker::connect(RedisBrokerConfig::from_config(
        &config,
        &url,
        consumer.clone(),
    ))
    .await?;
    let tenants = TenantCache::new(store, Duration::from_secs(config.limits.tenant_cache_secs));
    let shutdown = Shutdown::new();
    let (metrics, metrics_port) = shared::metrics::serve(&config.metrics_bind)
        .with_context(|| format!("binding the metrics server to {}", config.metrics_bind))?;
    let metrics_handle = metrics.handle();
    // Stopped through its handle below.
    tokio::spawn(metrics);
    tracing::info!(%consumer, metrics_port, "parley worker started");
    let worker = worker::Worker::new(tenants, broker, config.worker.clone());
    tokio::select! {
        () = worker.run(shutdown.clone()) => {}
        () = stop_signal() => tracing::info!("stop signal received"),
    }
    let drain = Duration::from_secs(config.worker.drain_timeout_secs);
    let _ = tokio::time::timeout(drain, shutdown.stop()).await;
    metrics_handle.stop(true).await;
    Ok(())
}

async fn stop_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}
