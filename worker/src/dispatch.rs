//! Taking jobs and starting answers: per-chat order, a cap per tenant, fair turns between
//! tenants.
//!
//! A chat's jobs are answered one at a time, in the order they were delivered; different chats
//! run in parallel up to `max_concurrent_chats`, and one tenant's chats at most up to its
//! `max_concurrent_answers` setting: in this worker's scheduler, and across every worker by the
//! broker's answer permits (an answer takes one of its tenant's `max_concurrent_answers`
//! permits before it streams, renews it while it runs and gives it back; a worker's job waits,
//! polling, while other workers hold them all). Whenever a slot frees, the tenants
//! with a chat waiting take turns (round robin; a tenant's own chats take turns too), so a
//! tenant that floods its chats with slow answers holds at most its cap, and another tenant's
//! job starts at once. The reader keeps taking jobs while some wait for a slot (up to
//! [`waiting_bound`] of them), so one tenant's waiting jobs never hide another's behind them
//! in the queue. The scheduling itself is [`Scheduler`], free of I/O.
//!
//! Draining: once the stop signal fires no job is taken and none started; each answer being
//! streamed finishes (so its clients see a complete answer). The jobs left unacknowledged are
//! reclaimed by other workers. The process bounds the drain by `drain_timeout_secs`.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use shared::{
    broker::Delivery,
    shutdown::{CancellationToken, Shutdown},
    store::TenantSettings,
};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::{Context, answer};
use shared::metrics::{metrics, seconds_since};

/// How many taken jobs may wait for a slot before the reader pauses: four rounds of slots, so
/// that the jobs of tenants at their cap do not stop the reader from reaching the others'.
pub fn waiting_bound(slots: usize) -> usize {
    slots.saturating_mul(4).max(256)
}

/// Takes jobs from the broker until shutdown and starts their answers as slots allow.
pub async fn run(ctx: Arc<Context>, shutdown: Shutdown) {
    let slots = ctx.config.max_concurrent_chats.max(1);
    let sched = Arc::new(Shared {
        state: Mutex::new(Scheduler::new(slots)),
        room: Notify::new(),
    });
    let bound = waiting_bound(slots);
    loop {
        while sched.lock().waiting() >= bound {
            tokio::select! {
                () = shutdown.token.cancelled() => return,
                () = sched.room.notified() => {}
            }
        }
        let delivery = tokio::select! {
            () = shutdown.token.cancelled() => return,
            next = ctx.broker.next_job() => next,
        };
        let delivery = match delivery {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "could not take a job; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        if delivery.attempt == 1 {
            metrics()
                .queue_lag
                .observe(seconds_since(delivery.job.enqueued_at));
        }
        metrics().queue_depth.inc();
        let cap = tenant_cap(&ctx, delivery.job.tenant_id).await;
        let start = sched.lock().push(delivery, cap);
        for delivery in start {
            spawn_answer(&ctx, &sched, delivery, &shutdown);
        }
    }
}

/// The tenant's `max_concurrent_answers`; the default when the tenant cannot be read now (its
/// answer reads it again and fails properly if it is gone).
async fn tenant_cap(ctx: &Context, tenant_id: Uuid) -> usize {
    let cap = match ctx.tenants.by_id(tenant_id).await {
        Ok(Some(t)) => t.settings.max_concurrent_answers,
        _ => TenantSettings::default().max_concurrent_answers,
    };
    usize::try_from(cap).unwrap_or(usize::MAX).max(1)
}

/// The scheduler and the reader's wake-up.
struct Shared {
    state: Mutex<Scheduler>,
    /// Signalled when a waiting job starts (room for the reader).
    room: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Scheduler> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Answers `delivery` on the tracker (the stop signal must not abort an answer), then starts
/// what its slot allows next.
fn spawn_answer(ctx: &Arc<Context>, sched: &Arc<Shared>, delivery: Delivery, shutdown: &Shutdown) {
    let (ctx, sched, inner) = (ctx.clone(), sched.clone(), shutdown.clone());
    let stop = shutdown.token.clone();
    shutdown.tracker.spawn(async move {
        let (tenant, chat) = (delivery.job.tenant_id, delivery.job.chat_id);
        sched.room.notify_one();
        let turn = tokio::select! {
            () = stop.cancelled() => false,
            () = wait_for_turn(&ctx, &delivery) => true,
        };
        let permits = ctx.broker.permit_renewal();
        if turn && (permits.is_none() || take_permit(&ctx, &delivery, &stop).await) {
            metrics().queue_depth.dec();
            answer_holding_permit(&ctx, delivery, permits).await;
        }
        if stop.is_cancelled() {
            return;
        }
        let next = sched.lock().finished(tenant, chat);
        for delivery in next {
            spawn_answer(&ctx, &sched, delivery, &inner);
        }
    });
}

/// Waits for one of the tenant's answer permits, shared by every worker; false when the stop
/// signal came first. A broker that cannot be asked lets the answer go ahead: the cap is
/// fairness, the answer is the promise.
async fn take_permit(ctx: &Context, delivery: &Delivery, stop: &CancellationToken) -> bool {
    let tenant = delivery.job.tenant_id;
    let cap = u32::try_from(tenant_cap(ctx, tenant).await).unwrap_or(u32::MAX);
    let mut wait = Duration::from_millis(20);
    loop {
        match ctx.broker.take_permit(tenant, &delivery.id, cap).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not take an answer permit; answering anyway");
                return true;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_millis(250));
    }
}

/// Answers, renewing the answer's permit every `permits` meanwhile, then gives the permit back
/// (one that cannot be given back lapses within a worker lease); `None`: no permit to hold.
async fn answer_holding_permit(ctx: &Context, delivery: Delivery, permits: Option<Duration>) {
    let Some(every) = permits else {
        return answer::answer(ctx, delivery).await;
    };
    let (tenant, holder) = (delivery.job.tenant_id, delivery.id.clone());
    let renew = async {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = ctx.broker.renew_permit(tenant, &holder).await {
                tracing::warn!(error = %e, "could not renew an answer permit");
            }
        }
    };
    // The renewal never ends on its own: this ends with the answer.
    tokio::select! {
        () = answer::answer(ctx, delivery) => {}
        () = renew => {}
    }
    if let Err(e) = ctx.broker.release_permit(tenant, &holder).await {
        tracing::warn!(error = %e, "could not give an answer permit back; it lapses");
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

/// A chat with jobs waiting or one being answered.
struct Chat {
    jobs: VecDeque<Delivery>,
    running: bool,
}

/// A tenant with chats waiting or answers running.
struct Tenant {
    cap: usize,
    running: usize,
    /// Its chats with a job waiting and none running, in turn order.
    ready: VecDeque<Uuid>,
    /// Whether it is in the turn order.
    queued: bool,
}

/// Which job starts next: per-chat order, per-tenant caps, round robin between tenants.
pub struct Scheduler {
    slots: usize,
    running: usize,
    waiting: usize,
    chats: HashMap<Uuid, Chat>,
    tenants: HashMap<Uuid, Tenant>,
    /// Tenants with a ready chat, in turn order.
    turns: VecDeque<Uuid>,
}

impl Scheduler {
    /// A scheduler of `slots` answers at once.
    pub fn new(slots: usize) -> Self {
        Self {
            slots,
            running: 0,
            waiting: 0,
            chats: HashMap::new(),
            tenants: HashMap::new(),
            turns: VecDeque::new(),
        }
    }

    /// Jobs taken and not started.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Answers started and not finished.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Adds a job whose tenant may run `cap` answers at once; returns the jobs to start now.
    pub fn push(&mut self, delivery: Delivery, cap: usize) -> Vec<Delivery> {
        let (tenant_id, chat_id) = (delivery.job.tenant_id, delivery.job.chat_id);
        let chat = self.chats.entry(chat_id).or_insert_with(|| Chat {
            jobs: VecDeque::new(),
            running: false,
        });
        chat.jobs.push_back(delivery);
        let newly_ready = !chat.running && chat.jobs.len() == 1;
        self.waiting += 1;
        let tenant = self.tenants.entry(tenant_id).or_insert_with(|| Tenant {
            cap,
            running: 0,
            ready: VecDeque::new(),
            queued: false,
        });
        tenant.cap = cap.max(1);
        if newly_ready {
            tenant.ready.push_back(chat_id);
            if !tenant.queued {
                tenant.queued = true;
                self.turns.push_back(tenant_id);
            }
        }
        self.take()
    }

    /// The chat's answer ended; returns the jobs to start now.
    pub fn finished(&mut self, tenant_id: Uuid, chat_id: Uuid) -> Vec<Delivery> {
        self.running = self.running.saturating_sub(1);
        let more = match self.chats.get_mut(&chat_id) {
            Some(chat) => {
                chat.running = false;
                !chat.jobs.is_empty()
            }
            None => false,
        };
        if !more {
            self.chats.remove(&chat_id);
        }
        if let Some(tenant) = self.tenants.get_mut(&tenant_id) {
            tenant.running = tenant.running.saturating_sub(1);
            if more {
                tenant.ready.push_back(chat_id);
                if !tenant.queued {
                    tenant.queued = true;
                    self.turns.push_back(tenant_id);
                }
            } else if tenant.running == 0 && tenant.ready.is_empty() {
                self.tenants.remove(&tenant_id);
            }
        }
        self.take()
    }

    /// Starts jobs while slots are free: each tenant in turn, skipping those at their cap.
    fn take(&mut self) -> Vec<Delivery> {
        let mut start = Vec::new();
        let mut passed = 0;
        while self.running < self.slots && passed < self.turns.len() {
            let Some(tenant_id) = self.turns.pop_front() else {
                break;
            };
            let Some(tenant) = self.tenants.get_mut(&tenant_id) else {
                continue;
            };
            if tenant.running >= tenant.cap {
                self.turns.push_back(tenant_id);
                passed += 1;
                continue;
            }
            let Some(chat_id) = tenant.ready.pop_front() else {
                tenant.queued = false;
                continue;
            };
            if tenant.ready.is_empty() {
                tenant.queued = false;
            } else {
                self.turns.push_back(tenant_id);
            }
            tenant.running += 1;
            let Some(delivery) = self.chats.get_mut(&chat_id).and_then(|chat| {
                chat.running = true;
                chat.jobs.pop_front()
            }) else {
                continue;
            };
            self.running += 1;
            self.waiting = self.waiting.saturating_sub(1);
            passed = 0;
            start.push(delivery);
        }
        start
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use shared::protocol::Job;

    fn job(tenant: u128, chat: u128, n: u64) -> Delivery {
        let job = Job {
            message_id: format!("m{chat}-{n}"),
            chat_id: Uuid::from_u128(chat),
            tenant_id: Uuid::from_u128(tenant),
            user_id: "u".into(),
            content: "hello".into(),
            enqueued_at: chrono::Utc::now(),
            trace: None,
            earlier_attempts: 0,
        };
        Delivery {
            id: format!("{chat}-{n}"),
            attempt: 1,
            seq: n,
            job,
        }
    }

    fn ids(started: &[Delivery]) -> Vec<String> {
        started.iter().map(|d| d.id.clone()).collect()
    }

    #[test]
    fn a_tenant_at_its_cap_leaves_the_free_slots_to_the_others() {
        let mut s = Scheduler::new(4);
        let mut started = Vec::new();
        for chat in 1..=6 {
            started.extend(s.push(job(1, chat, 1), 2));
        }
        assert_eq!(ids(&started), ["1-1", "2-1"]);
        assert_eq!(ids(&s.push(job(2, 10, 1), 2)), ["10-1"]);
        assert_eq!(s.running(), 3);
        assert_eq!(s.waiting(), 4);
        // Tenant 1's answer ends: its next chat starts in the freed slot.
        assert_eq!(
            ids(&s.finished(Uuid::from_u128(1), Uuid::from_u128(1))),
            ["3-1"]
        );
    }

    #[test]
    fn a_chats_jobs_run_one_at_a_time_in_order() {
        let mut s = Scheduler::new(8);
        assert_eq!(ids(&s.push(job(1, 1, 1), 8)), ["1-1"]);
        assert!(s.push(job(1, 1, 2), 8).is_empty());
        assert!(s.push(job(1, 1, 3), 8).is_empty());
        let (t, c) = (Uuid::from_u128(1), Uuid::from_u128(1));
        assert_eq!(ids(&s.finished(t, c)), ["1-2"]);
        assert_eq!(ids(&s.finished(t, c)), ["1-3"]);
        assert!(s.finished(t, c).is_empty());
        assert_eq!((s.running(), s.waiting()), (0, 0));
    }

    #[test]
    fn tenants_take_turns_for_freed_slots() {
        let mut s = Scheduler::new(1);
        assert_eq!(ids(&s.push(job(1, 1, 1), 10)), ["1-1"]);
        for chat in 2..=4 {
            assert!(s.push(job(1, chat, 1), 10).is_empty());
        }
        for chat in 20..=21 {
            assert!(s.push(job(2, chat, 1), 10).is_empty());
        }
        let mut order = Vec::new();
        let mut last = (1u128, 1u128);
        for _ in 0..5 {
            let next = s.finished(Uuid::from_u128(last.0), Uuid::from_u128(last.1));
            let d = &next[0];
            order.push(d.id.clone());
            last = (d.job.tenant_id.as_u128(), d.job.chat_id.as_u128());
        }
        assert_eq!(order, ["2-1", "20-1", "3-1", "21-1", "4-1"]);
    }
}
