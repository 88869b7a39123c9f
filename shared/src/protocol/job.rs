//! The job a gateway queues for a worker: answer one saved user message.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One user message to answer. Everything else (the tenant's agent settings, the history) the
/// worker reads from the store when it starts, so that settings changes apply without a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The saved user message (`msg-<uuid>`).
    pub message_id: String,
    /// The chat it belongs to; jobs of one chat are answered one at a time, in order.
    pub chat_id: Uuid,
    /// The chat's tenant.
    pub tenant_id: Uuid,
    /// The user who sent the message.
    pub user_id: String,
    /// The message text.
    pub content: String,
    /// When the gateway queued it, for queue-lag measurements.
    pub enqueued_at: DateTime<Utc>,
    /// W3C `traceparent` of the gateway span that queued it, when traces are exported: the
    /// worker's spans join the message's trace (see `telemetry::trace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Attempts made before this job was queued again by the unanswered sweep (after Redis lost
    /// it): its deliveries count on from there, so its answer restarts with `attempt` ≥ 2.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub earlier_attempts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A new message id in the wire form `msg-<uuid>` (UUIDv7, so ids sort by creation time).
pub fn message_id() -> String {
    format!("msg-{}", Uuid::now_v7())
}

/// The id of the answer to a user message: the same on every attempt (API.md §4.1: a restarted
/// answer begins again under the same `message_id`), so that whichever attempt saves it, the
/// saved answer carries the id clients saw streaming.
pub fn answer_id(user_message_id: &str) -> String {
    format!(
        "msg-{}",
        Uuid::new_v5(&ANSWER_NAMESPACE, user_message_id.as_bytes())
    )
}

/// The UUIDv5 namespace of answer ids.
const ANSWER_NAMESPACE: Uuid = Uuid::from_u128(0x5d1f_1c3e_8b0e_4b4a_9a61_0c8e_7f3b_2a19);
