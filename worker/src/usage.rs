//! Usage accounting: each saved answer adds to in-memory totals per tenant and UTC day, which
//! go to the store once a second (and once more when the worker stops).
//!
//! One write per tenant and second, instead of one per answer, keeps accounting off the store's
//! hot path (a write per answer halved the embedded throughput). A worker that crashes loses at
//! most its last second of counts; a failed write is kept and retried with the next flush.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicUsize},
    time::Duration,
};

use chrono::{NaiveDate, Utc};
use shared::{
    protocol::Usage,
    shutdown::Shutdown,
    store::{DailyUsage, Store},
};
use uuid::Uuid;

/// How often totals are written.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Totals not yet written, by tenant and day.
#[derive(Default)]
pub struct UsageMeter {
    pending: Mutex<HashMap<(Uuid, NaiveDate), DailyUsage>>,
}

impl UsageMeter {
    /// Counts one saved answer.
    pub fn add(&self, tenant_id: Uuid, usage: &Usage) {
        let date = Utc::now().date_naive();
        let prompt = i64::from(usage.prompt_tokens);
        let completion = i64::from(usage.completion_tokens);
        self.accumulate(tenant_id, DailyUsage::from_row(date, 1, prompt, completion));
    }

    /// Adds `delta` to the pending total of its tenant and day.
    fn accumulate(&self, tenant_id: Uuid, delta: DailyUsage) {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = pending
            .entry((tenant_id, delta.date))
            .or_insert_with(|| DailyUsage::from_row(delta.date, 0, 0, 0));
        entry.messages += delta.messages;
        entry.prompt_tokens += delta.prompt_tokens;
        entry.completion_tokens += delta.completion_tokens;
        entry.total_tokens = entry.prompt_tokens + entry.completion_tokens;
    }

    /// Writes the pending totals; those that fail stay pending.
    pub async fn flush(&self, store: &dyn Store) {
        let batch = std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for ((tenant_id, _), delta) in batch {
            if let Err(e) = store.add_usage(tenant_id, &delta).await {
                tracing::warn!(error = %e, %tenant_id, "could not record usage; will retry");
                self.accumulate(tenant_id, delta);
            }
        }
    }
}

/// Flushes every second until `shutdown`, then until the answers still finishing (`busy`)
/// are done, then once more; on the shutdown's tracker, so a stop waits for the last write.
pub fn start_flushing(
    meter: Arc<UsageMeter>,
    store: Arc<dyn Store>,
    busy: Arc<AtomicUsize>,
    shutdown: &Shutdown,
) {
    let token = shutdown.token.clone();
    shutdown.tracker.spawn(async move {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                _ = tick.tick() => meter.flush(store.as_ref()).await,
            }
        }
        crate::answers_done(&busy).await;
        meter.flush(store.as_ref()).await;
    });
}
