//! Publishing one answer attempt's events: in order, fenced by the attempt, each publish
//! numbered so that one repeated after a lost reply is applied once, and retried while the
//! broker is unreachable. An attempt whose events cannot be published must not save its answer
//! (clients would hold less than was saved): after [`PATIENCE`] it gives up and leaves the job
//! to another attempt, which restarts the answer.

use std::time::{Duration, Instant};

use shared::broker::{BrokerError, Delivery, Fence, PublishOptions};
use shared::protocol::ServerEvent;

use crate::Context;

/// How long a publish is retried while the broker is unreachable.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// Why an attempt must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A newer attempt of the job has published.
    TakenOver,
    /// The broker stayed unreachable.
    Unreachable,
}

/// One attempt's publisher.
pub struct Publisher<'a> {
    ctx: &'a Context,
    delivery: &'a Delivery,
    batch: u32,
}

impl<'a> Publisher<'a> {
    /// The publisher of a delivery's attempt.
    pub fn new(ctx: &'a Context, delivery: &'a Delivery) -> Self {
        Self {
            ctx,
            delivery,
            batch: 0,
        }
    }

    /// The attempt publishing.
    pub fn attempt(&self) -> u32 {
        self.delivery.attempt
    }

    /// Publishes events of the attempt, in one batch.
    pub async fn publish(
        &mut self,
        events: &[ServerEvent],
        first_token_trace: Option<&str>,
    ) -> Result<(), Stop> {
        self.batch += 1;
        let job = &self.delivery.job;
        let options = PublishOptions {
            fence: Some(Fence {
                message_id: &job.message_id,
                attempt: self.delivery.attempt,
                batch: self.batch,
            }),
            first_token_trace,
        };
        let give_up = Instant::now() + PATIENCE;
        let mut wait = Duration::from_millis(50);
        loop {
            match self.ctx.broker.publish(job.chat_id, events, options).await {
                Ok(_) => return Ok(()),
                Err(BrokerError::Fenced { .. }) => return Err(Stop::TakenOver),
                // The chat is gone: nobody to tell, and its answer cannot be saved either.
                Err(BrokerError::NoSuchChat(_)) => return Ok(()),
                Err(e) if Instant::now() < give_up => {
                    tracing::warn!(error = %e, chat_id = %job.chat_id, "could not publish events; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::error!(error = %e, chat_id = %job.chat_id, "could not publish events; leaving the job to another attempt");
                    return Err(Stop::Unreachable);
                }
            }
        }
    }
}
