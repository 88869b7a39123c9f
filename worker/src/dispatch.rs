//! Per-chat ordering: a chat's jobs are answered one at a time, in the order they were
//! delivered; different chats run in parallel up to `max_concurrent_chats`.
//!
//! The first job of an idle chat starts a task for that chat; later jobs of a busy chat wait in
//! its queue, and the task takes them in turn until the queue is empty.
//!
//! Draining: once the stop signal fires no job is taken, each chat task finishes the answer it
//! is streaming (so its clients see a complete answer) and starts no other; the jobs it leaves
//! unacknowledged are reclaimed by other workers. The process bounds the drain by
//! `drain_timeout_secs`.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use shared::{
    broker::Delivery,
    shutdown::{CancellationToken, Shutdown},
};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::{Context, answer};
use shared::metrics::{metrics, seconds_since};

type Queues = Arc<Mutex<HashMap<Uuid, VecDeque<Delivery>>>>;

/// Takes jobs from the broker until shutdown and hands them to per-chat tasks.
pub async fn run(ctx: Arc<Context>, shutdown: Shutdown) {
    let queues: Queues = Arc::default();
    let permits = Arc::new(Semaphore::new(ctx.config.max_concurrent_chats.max(1)));
    loop {
        let delivery = tokio::select! {
            () = shutdown.token.cancelled() => return,
            next = ctx.broker.next_job() => next,
        };
        let delivery = match delivery {
            Ok(Some(d)) => {
                if d.attempt == 1 {
                    metrics()
                        .queue_lag
                        .observe(seconds_since(d.job.enqueued_at));
                }
                metrics().queue_depth.inc();
                d
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "could not take a job; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        if let Some(first) = enqueue(&queues, delivery) {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (ctx, queues, stop) = (ctx.clone(), queues.clone(), shutdown.token.clone());
            // On the tracker, not `Shutdown::spawn`: the stop signal must not abort an answer.
            shutdown.tracker.spawn(async move {
                drain_chat(ctx, queues, first, stop).await;
                drop(permit);
            });
        }
    }
}

/// Adds the job to its chat's queue; returns it when the chat was idle and needs a task.
fn enqueue(queues: &Queues, delivery: Delivery) -> Option<Delivery> {
    let mut map = queues
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match map.get_mut(&delivery.job.chat_id) {
        Some(queue) => {
            queue.push_back(delivery);
            None
        }
        None => {
            map.insert(delivery.job.chat_id, VecDeque::new());
            Some(delivery)
        }
    }
}

/// Answers `first`, then the chat's queued jobs in order, then retires the chat; after `stop`
/// it starts no further job.
async fn drain_chat(ctx: Arc<Context>, queues: Queues, first: Delivery, stop: CancellationToken) {
    let chat_id = first.job.chat_id;
    let mut next = Some(first);
    while let Some(delivery) = next {
        tokio::select! {
            () = stop.cancelled() => return,
            () = wait_for_turn(&ctx, &delivery) => {}
        }
        metrics().queue_depth.dec();
        answer::answer(&ctx, delivery).await;
        let mut map = queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        next = map.get_mut(&chat_id).and_then(VecDeque::pop_front);
        if next.is_none() || stop.is_cancelled() {
            map.remove(&chat_id);
            return;
        }
    }
}

/// Waits until the chat's earlier jobs are done on whichever worker holds them.
async fn wait_for_turn(ctx: &Context, delivery: &Delivery) {
    let mut backoff = std::time::Duration::from_millis(100);
    while let Err(e) = ctx.broker.turn(delivery).await {
        tracing::warn!(error = %e, "could not check the chat's order; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}
