//! The `worker` binary: answers queued messages from Redis, saving to the configured database.
//! Without `PARLEY_REDIS_URL` there is nothing to do: the gateway then runs its worker in-process.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use shared::{config::Config, shutdown::Shutdown, telemetry::TraceExport};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load()?;
    let export = TraceExport::from_config(config.otlp_endpoint.as_deref());
    // Flushes the spans still queued when main returns.
    let _telemetry = shared::telemetry::init(&config.log, export, "parley-worker")?;
    let worker = worker::Worker::build(&config).await?;
    let shutdown = Shutdown::new();
    let draining = Arc::new(AtomicBool::new(false));
    let readiness = Arc::new(worker.readiness(config.timeouts.clone(), draining.clone()));
    let (metrics, metrics_port) = shared::metrics::serve(&config.metrics_bind, Some(readiness))
        .with_context(|| format!("binding the metrics server to {}", config.metrics_bind))?;
    let metrics_handle = metrics.handle();
    // Stopped through its handle below.
    tokio::spawn(metrics);
    tracing::info!(metrics_port, "parley worker started");
    tokio::select! {
        () = worker.run(shutdown.clone()) => {}
        () = stop_signal() => tracing::info!("stop signal received"),
    }
    // Not ready while the answers in progress finish (`/readyz` on the metrics port).
    draining.store(true, Ordering::SeqCst);
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
