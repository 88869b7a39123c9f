//! Finishing an answer: saving it, announcing its end (or its failure), recording a message
//! given up on, and replaying an answer another attempt saved first.

use chrono::Utc;
use serde_json::{Map, Value, json};
use shared::{
    metrics::metrics,
    protocol::{ErrorCode, Job, ServerEvent, Usage},
    store::{NewAnswer, StoreError},
    telemetry::trace,
};
use tracing::Instrument as _;

use crate::{
    Context,
    answer::{Done, Outcome},
    publisher::{Publisher, Stop},
};

/// The answer being finished.
pub(crate) struct Answer<'a> {
    pub(crate) id: String,
    pub(crate) model: &'a str,
    pub(crate) prompt_estimate: u32,
}

pub(crate) async fn finish(
    ctx: &Context,
    publisher: &mut Publisher<'_>,
    job: &Job,
    answer: Answer<'_>,
    out: Outcome,
) -> Result<Done, StoreError> {
    let announce = out.error.is_none() || out.tokens > 0;
    if announce {
        let usage = out.usage.unwrap_or(Usage {
            prompt_tokens: answer.prompt_estimate,
            completion_tokens: out.tokens,
            total_tokens: answer.prompt_estimate.saturating_add(out.tokens),
        });
        let tokens_used = usage.completion_tokens;
        let mut metadata = Map::new();
        metadata.insert("model".into(), Value::from(answer.model));
        metadata.insert("tokens_used".into(), Value::from(tokens_used));
        metadata.insert("finish_reason".into(), Value::from(out.finish_reason));
        if let Some(u) = out.usage {
            metadata.insert("usage".into(), json!(u));
        }
        let saved = ctx
            .store
            .add_answer(&NewAnswer {
                id: answer.id.clone(),
                chat_id: job.chat_id,
                user_id: job.user_id.clone(),
                reply_to: job.message_id.clone(),
                content: out.content.clone(),
                metadata,
            })
            .instrument(tracing::debug_span!(target: trace::TARGET, "store.save_answer"))
            .await?;
        if !saved {
            return replay_saved(ctx, publisher, job).await;
        }
        ctx.usage.add(job.tenant_id, &usage);
        let ended = ServerEvent::MessageStreamEnded {
            timestamp: Utc::now(),
            message_id: answer.id,
            chat_id: job.chat_id,
            user_id: job.user_id.clone(),
            content: out.content,
            finish_reason: out.finish_reason.into(),
            usage: out.usage,
        };
        // Saved: a lost `message_stream_ended` is still in the history, so the job is done.
        let _ = publisher.publish(&[ended], None).await;
    }
    if let Some(e) = out.error {
        metrics().model_error(e.kind());
        tracing::Span::current().record("otel.status_code", "ERROR");
        tracing::warn!(error = %e, chat_id = %job.chat_id, "model failed");
        if !announce {
            // Nothing was saved: record the outcome, or the unanswered sweep would ask again.
            ctx.store.give_up(&job.message_id).await?;
        }
        let failed = ServerEvent::error(ErrorCode::AiError, format!("The AI model failed: {e}"));
        let _ = publisher.publish(&[failed], None).await;
    }
    Ok(Done::Answered)
}

/// Another attempt saved its answer first: stream the saved text as one more restart, so that
/// the last `message_stream_started` of the answer is followed by exactly the saved text.
async fn replay_saved(
    ctx: &Context,
    publisher: &mut Publisher<'_>,
    job: &Job,
) -> Result<Done, StoreError> {
    let Some(saved) = ctx.store.answer_to(&job.message_id).await? else {
        return Ok(Done::Answered);
    };
    let finish_reason = saved
        .metadata
        .get("finish_reason")
        .and_then(Value::as_str)
        .unwrap_or("stop")
        .to_owned();
    let events = [
        ServerEvent::MessageStreamStarted {
            timestamp: Utc::now(),
            chat_id: job.chat_id,
            user_id: job.user_id.clone(),
            message_id: saved.id.clone(),
            reply_to: job.message_id.clone(),
            attempt: publisher.attempt(),
        },
        ServerEvent::token(job.chat_id, &saved.id, saved.content.clone()),
        ServerEvent::MessageStreamEnded {
            timestamp: Utc::now(),
            message_id: saved.id,
            chat_id: job.chat_id,
            user_id: job.user_id.clone(),
            content: saved.content,
            finish_reason,
            usage: None,
        },
    ];
    match publisher.publish(&events, None).await {
        Err(Stop::TakenOver) => Ok(Done::Left(Stop::TakenOver)),
        Err(Stop::Unreachable) | Ok(()) => Ok(Done::Answered),
    }
}
