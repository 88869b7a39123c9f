//! Answering one message: context, model stream, cancel, save, events.
//!
//! Event order on the chat: `message_stream_started`, the tokens, then `message_stream_ended`
//! (sent only after the answer is saved, its `content` equal to the tokens). On a model failure
//! the partial answer (if any tokens went out) is saved with `finish_reason: "error"` and
//! announced with `message_stream_ended`; an `error` event with `AI_ERROR` always closes the
//! stream. A message that already has a saved answer is never answered again.
//!
//! Restarts and fencing (API.md §4.1): the answer's id is derived from the user message, so
//! every attempt streams under the same `message_id`, and `message_stream_started` carries the
//! delivery's `attempt`. Every publish is fenced by that attempt: once a newer attempt of the
//! job (another worker took it over) has published, this attempt's publishes are refused and
//! it stops at once, saving nothing and acknowledging nothing. If a newer attempt finds the
//! answer already saved by an older one as it finishes, it streams the saved text as one more
//! restart, so clients always end with the saved answer. A message whose model failed before
//! any token is recorded as given up, so the unanswered sweep leaves it alone.

use shared::metrics::{metrics, seconds_since};
use shared::telemetry::trace;
use std::sync::Arc;
use tracing::Instrument as _;

use chrono::Utc;
use futures_util::{FutureExt, StreamExt};

use shared::{
    broker::Delivery,
    mocktext::count_words,
    protocol::{ErrorCode, Job, ServerEvent, Usage, answer_id},
    shutdown::CancellationToken,
    store::{Message, Role, StoreError},
};

use crate::{
    Context,
    provider::{ChatMessage, ChatRequest, Provider, ProviderError, StreamItem},
    publisher::{Publisher, Stop},
};

/// How a stream ended.
pub(crate) struct Outcome {
    pub(crate) content: String,
    pub(crate) tokens: u32,
    pub(crate) finish_reason: &'static str,
    pub(crate) usage: Option<Usage>,
    pub(crate) error: Option<ProviderError>,
    /// Whether time to first token was recorded.
    first_token_out: bool,
    /// The attempt must stop (taken over, or its events cannot be published): save nothing.
    stopped: Option<Stop>,
}

impl Outcome {
    /// Publishes the outbox as one broker message and empties it. The message that carries
    /// the answer's first token also carries the trace context and records time to first
    /// token.
    async fn flush(
        &mut self,
        publisher: &mut Publisher<'_>,
        job: &Job,
        outbox: &mut Vec<ServerEvent>,
    ) {
        if outbox.is_empty() || self.stopped.is_some() {
            return;
        }
        let first = self.tokens > 0 && !self.first_token_out;
        let trace = first
            .then(|| trace::traceparent(&tracing::Span::current()))
            .flatten();
        if let Err(stop) = publisher.publish(outbox, trace.as_deref()).await {
            self.stopped = Some(stop);
        }
        outbox.clear();
        if first {
            self.first_token_out = true;
            metrics()
                .time_to_first_token
                .observe(seconds_since(job.enqueued_at));
            tracing::debug!(target: trace::TARGET, "first_token");
        }
    }
}

/// Forwards cancel requests to the answer in progress on that chat, if any, until the worker
/// stops and its last answer is done (a client may still cancel an answer a stopping worker
/// finishes).
pub async fn listen_for_cancels(ctx: Arc<Context>, stop: shared::shutdown::CancellationToken) {
    let mut cancels = ctx.broker.cancels();
    let drained = async {
        stop.cancelled().await;
        crate::answers_done(&ctx.answering).await;
    };
    tokio::pin!(drained);
    loop {
        let cancel = tokio::select! {
            () = &mut drained => return,
            cancel = cancels.recv() => cancel,
        };
        match cancel {
            Ok(chat_id) => {
                if let Some(token) = ctx.active.get(&chat_id) {
                    token.cancel();
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Answers one delivery and acknowledges it. Failures are reported on the chat, never retried
/// here: the broker decides about redelivery.
pub async fn answer(ctx: &Context, delivery: Delivery) {
    let _busy = Busy::count(&ctx.answering);
    let job = &delivery.job;
    let span = tracing::debug_span!(
        target: trace::TARGET,
        "answer",
        otel.kind = "consumer",
        chat.id = %job.chat_id,
        message.id = %job.message_id,
        attempt = delivery.attempt,
        queue.wait_ms = (Utc::now() - job.enqueued_at).num_milliseconds(),
        otel.status_code = tracing::field::Empty,
    );
    trace::follow(&span, job.trace.as_deref());
    answer_and_ack(ctx, delivery).instrument(span).await;
}

async fn answer_and_ack(ctx: &Context, delivery: Delivery) {
    let mut publisher = Publisher::new(ctx, &delivery);
    match try_answer(ctx, &delivery, &mut publisher).await {
        Ok(Done::Answered) => {}
        Ok(Done::Left(stop)) => {
            tracing::warn!(chat_id = %delivery.job.chat_id, attempt = delivery.attempt, ?stop,
                "this attempt stops; the job is left to another");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, chat_id = %delivery.job.chat_id, "answer failed");
            let event = ServerEvent::error(ErrorCode::AiError, "The answer could not be produced");
            if let Err(stop) = publisher.publish(&[event], None).await {
                tracing::warn!(?stop, "could not report a failed answer");
                return;
            }
        }
    }
    ack(ctx, &delivery).await;
}

/// Acknowledges, retrying: a job left unacknowledged would hold its chat's later messages
/// until it is reclaimed.
async fn ack(ctx: &Context, delivery: &Delivery) {
    let mut wait = std::time::Duration::from_millis(50);
    for _ in 0..8 {
        match ctx.broker.ack(delivery).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "could not acknowledge a job; retrying"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(std::time::Duration::from_secs(2));
    }
    tracing::error!(chat_id = %delivery.job.chat_id, "gave up acknowledging a job; it will be reclaimed");
}

/// How an answer attempt ended.
pub(crate) enum Done {
    /// Answered (or failed and said so): acknowledge.
    Answered,
    /// Not acknowledged: a newer attempt owns the job, or the events could not be published.
    Left(Stop),
}

/// Counts an answer in progress while alive.
struct Busy<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Busy<'a> {
    fn count(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(counter)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn try_answer(
    ctx: &Context,
    delivery: &Delivery,
    publisher: &mut Publisher<'_>,
) -> Result<Done, StoreError> {
    let job = &delivery.job;
    // Only a redelivered job can already have an answer; the unique `reply_to` of the store
    // guarantees at most one saved answer either way.
    if delivery.attempt > 1 && ctx.store.answer_to(&job.message_id).await?.is_some() {
        return Ok(Done::Answered);
    }
    let Some(tenant) = ctx.tenants.by_id(job.tenant_id).await? else {
        return Ok(Done::Answered);
    };
    let agent = tenant.settings.agent;
    let provider = ctx.providers.get(&agent.provider);
    let uses_history = provider.as_ref().is_ok_and(|p| p.uses_history());
    let history = if uses_history && agent.history_messages > 0 {
        let history = ctx
            .store
            .history_before(job.chat_id, &job.message_id, agent.history_messages)
            .await?;
        within_budget(
            history,
            provider.as_ref().ok().and_then(|p| p.context_budget()),
        )
    } else {
        Vec::new()
    };
    let messages = conversation(agent.system_prompt.as_deref(), &history, &job.content);
    // What the usage counts as the prompt when the provider reports none.
    let prompt_estimate = messages.iter().map(|m| count_words(&m.content)).sum();
    let model = provider
        .as_ref()
        .map_or_else(|_| agent.model.clone(), |p| p.model_for(&agent.model));
    let request = ChatRequest {
        model: model.clone(),
        messages,
        temperature: agent.temperature,
        max_tokens: agent.max_tokens,
        options: agent.options.clone(),
    };
    let answer_id = answer_id(&job.message_id);
    // The outbox: events wait here until the stream would make us wait, then leave in one
    // broker message (`message_stream_started` travels with the first tokens when they are
    // ready at once, or alone when the model is slow to start).
    let mut outbox = vec![ServerEvent::MessageStreamStarted {
        timestamp: Utc::now(),
        chat_id: job.chat_id,
        user_id: job.user_id.clone(),
        message_id: answer_id.clone(),
        reply_to: job.message_id.clone(),
        attempt: delivery.attempt,
    }];
    let cancel = CancellationToken::new();
    ctx.active.insert(job.chat_id, cancel.clone());
    let call = tracing::debug_span!(target: trace::TARGET, "model.call", model = %model);
    let streamed = Streamed {
        answer_id: &answer_id,
        cancel: &cancel,
    };
    let outcome = async {
        let mut outcome =
            stream_answer(publisher, job, provider, request, streamed, &mut outbox).await;
        outcome.flush(publisher, job, &mut outbox).await;
        outcome
    }
    .instrument(call)
    .await;
    ctx.active.remove(&job.chat_id);
    if let Some(stop) = outcome.stopped {
        return Ok(Done::Left(stop));
    }
    let answer = crate::finish::Answer {
        id: answer_id,
        model: &model,
        prompt_estimate,
    };
    crate::finish::finish(ctx, publisher, job, answer, outcome).await
}

/// What the stream of one answer needs besides the model.
#[derive(Clone, Copy)]
struct Streamed<'a> {
    answer_id: &'a str,
    cancel: &'a CancellationToken,
}

/// The newest earlier messages whose text fits `budget` characters, in order.
fn within_budget(mut history: Vec<Message>, budget: Option<usize>) -> Vec<Message> {
    let Some(budget) = budget else {
        return history;
    };
    let mut used = 0;
    let keep = history
        .iter()
        .rev()
        .take_while(|m| {
            used += m.content.chars().count();
            used <= budget
        })
        .count();
    history.drain(..history.len() - keep);
    history
}

/// System prompt, then history in order, then the new message.
fn conversation(system: Option<&str>, history: &[Message], content: &str) -> Vec<ChatMessage> {
    let system = system.map(|s| ChatMessage {
        role: "system",
        content: s.to_owned(),
    });
    let earlier = history.iter().map(|m| ChatMessage {
        role: match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        },
        content: m.content.clone(),
    });
    let new = ChatMessage {
        role: "user",
        content: content.to_owned(),
    };
    system
        .into_iter()
        .chain(earlier)
        .chain(std::iter::once(new))
        .collect()
}

async fn stream_answer(
    publisher: &mut Publisher<'_>,
    job: &Job,
    provider: Result<Arc<dyn Provider>, ProviderError>,
    request: ChatRequest,
    streamed: Streamed<'_>,
    outbox: &mut Vec<ServerEvent>,
) -> Outcome {
    let cancel = streamed.cancel;
    let mut out = Outcome {
        content: String::new(),
        tokens: 0,
        finish_reason: "error",
        usage: None,
        error: None,
        first_token_out: false,
        stopped: None,
    };
    let mut stream = match provider {
        Ok(p) => p.stream(request),
        Err(e) => {
            out.error = Some(e);
            return out;
        }
    };
    loop {
        // Take whatever the model has ready without waiting.
        while outbox.len() < MAX_BATCH && !cancel.is_cancelled() {
            match stream.next().now_or_never() {
                Some(item) => {
                    if take(&mut out, job, streamed.answer_id, item, outbox).is_some() {
                        return out;
                    }
                }
                None => break,
            }
        }
        // About to wait: what is ready goes out first.
        out.flush(publisher, job, outbox).await;
        if out.stopped.is_some() {
            return out;
        }
        let item = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                out.finish_reason = "cancelled";
                return out;
            }
            item = stream.next() => item,
        };
        if take(&mut out, job, streamed.answer_id, item, outbox).is_some() {
            return out;
        }
    }
}

/// Most token events carried in one broker message.
const MAX_BATCH: usize = 64;

/// Applies one stream item: a token joins the batch; the end of the stream (or an error)
/// settles the outcome and returns `Some`.
fn take(
    out: &mut Outcome,
    job: &Job,
    answer_id: &str,
    item: Option<Result<StreamItem, ProviderError>>,
    batch: &mut Vec<ServerEvent>,
) -> Option<()> {
    match item {
        Some(Ok(StreamItem::Delta(token))) => {
            out.content.push_str(&token);
            out.tokens += 1;
            batch.push(ServerEvent::token(job.chat_id, answer_id, token));
            None
        }
        Some(Ok(StreamItem::Done {
            finish_reason,
            usage,
        })) => {
            out.finish_reason = if finish_reason == "length" {
                "length"
            } else {
                "stop"
            };
            out.usage = usage;
            Some(())
        }
        Some(Err(e)) => {
            out.error = Some(e);
            Some(())
        }
        None => {
            out.error = Some(ProviderError::Failed(
                "stream ended before completion".into(),
            ));
            Some(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(content: &str) -> Message {
        Message {
            id: shared::protocol::message_id(),
            chat_id: uuid::Uuid::new_v4(),
            role: Role::User,
            user_id: "u".into(),
            content: content.into(),
            metadata: serde_json::Map::new(),
            reply_to: None,
            client_message_id: None,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn the_context_keeps_the_newest_messages_that_fit_the_budget() {
        let history = vec![message("aaaa"), message("bbb"), message("cc"), message("d")];
        let texts = |h: Vec<Message>| h.into_iter().map(|m| m.content).collect::<Vec<_>>();
        assert_eq!(
            texts(within_budget(history.clone(), Some(6))),
            ["bbb", "cc", "d"]
        );
        assert_eq!(
            texts(within_budget(history.clone(), Some(0))),
            Vec::<String>::new()
        );
        assert_eq!(texts(within_budget(history.clone(), None)).len(), 4);
    }
}
