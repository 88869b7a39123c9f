//! The unanswered sweep: Postgres is the source of truth, Redis only a cache of work. A user
//! message saved more than `unanswered_after_secs` ago that has no answer, was not given up, and
//! has no job queued or in a worker's hands (Redis lost it, or a crash fell between saving and
//! queueing) is queued again. One worker sweeps at a time (a lease in Redis), every third of the
//! bound; the job's fence and the store's one-answer-per-message rule keep it answered once.
//! In the embedded mode the one worker sweeps (the in-process queue knows its live jobs), and
//! the gateway also queues its unanswered messages again at start-up.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use shared::shutdown::CancellationToken;

use crate::Context;

/// Messages looked at per sweep.
const SWEEP_BATCH: u32 = 1_000;

/// Sweeps until `stop`.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken, after: Duration) {
    let period = (after / 3).max(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        match sweep_once(&ctx, period, after).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                count = n,
                "queued again messages left without an answer or a job"
            ),
            Err(e) => tracing::warn!(error = %e, "unanswered sweep failed; retrying later"),
        }
    }
}

/// One sweep, if this worker leads it; returns how many messages were queued again.
async fn sweep_once(ctx: &Context, period: Duration, after: Duration) -> anyhow::Result<usize> {
    if !ctx.broker.lead_sweep(period).await? {
        return Ok(0);
    }
    let bound = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::seconds(30));
    let mut queued = 0;
    for mut job in ctx
        .store
        .unanswered(Utc::now() - bound, SWEEP_BATCH)
        .await?
    {
        if ctx.broker.has_live_job(&job.message_id).await? {
            continue;
        }
        job.enqueued_at = Utc::now();
        // At least one attempt was made (or the job was lost before one): the answer restarts.
        job.earlier_attempts = job.earlier_attempts.max(1);
        ctx.broker.enqueue(job).await?;
        queued += 1;
    }
    Ok(queued)
}
