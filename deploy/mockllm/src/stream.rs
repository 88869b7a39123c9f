//! The answer to one request: its tokens, and the server-sent event stream that carries them.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use actix_web::web::Bytes;
use futures_util::{Stream, stream};
use serde_json::{Value, json};
use shared::mocktext::{count_words, reply_tokens};

use crate::{Fault, FaultKind, Settings, State};

/// What one request will be answered with.
pub struct Plan {
    model: String,
    tokens: Vec<String>,
    finish_reason: &'static str,
    prompt_tokens: u32,
    include_usage: bool,
    fault: Option<Fault>,
    first_delay: Duration,
    delay: Duration,
    clock: bool,
}

impl Plan {
    /// The answer to `body` under `settings`, with the fault this request drew, if any.
    pub fn new(settings: &Settings, body: &Value, fault: Option<Fault>) -> Plan {
        let model = body["model"].as_str().unwrap_or("mock").to_owned();
        let messages = body["messages"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let last = messages
            .last()
            .and_then(|m| m["content"].as_str())
            .unwrap_or("");
        let limit = body["max_tokens"]
            .as_u64()
            .or_else(|| body["max_completion_tokens"].as_u64());
        let count = limit.map_or(settings.reply_tokens, |m| m.min(settings.reply_tokens));
        let prompt_tokens = messages
            .iter()
            .filter_map(|m| m["content"].as_str())
            .map(count_words)
            .sum();
        Plan {
            tokens: reply_tokens(&model, last, count),
            model,
            finish_reason: if count < settings.reply_tokens {
                "length"
            } else {
                "stop"
            },
            prompt_tokens,
            include_usage: body["stream_options"]["include_usage"]
                .as_bool()
                .unwrap_or(false),
            fault,
            first_delay: settings.first_token_delay,
            delay: settings.token_delay,
            clock: settings.clock_tokens,
        }
    }

    fn usage(&self) -> Value {
        let completion = u32::try_from(self.tokens.len()).unwrap_or(u32::MAX);
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens.saturating_add(completion),
        })
    }

    /// The whole answer as one `chat.completion` (a request without `stream`).
    pub fn completion(&self) -> Value {
        json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": now_secs(),
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": self.tokens.concat()},
                "finish_reason": self.finish_reason,
            }],
            "usage": self.usage(),
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Bytes {
        sse(&json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": now_secs(),
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }))
    }

    fn token(&self, i: usize) -> String {
        if self.clock {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            return format!(" {nanos}");
        }
        self.tokens.get(i).cloned().unwrap_or_default()
    }

    /// Where a mid-stream fault strikes: before token `n`.
    fn fault_at(&self) -> Option<(FaultKind, usize)> {
        let f = self.fault?;
        let at = usize::try_from(f.after_tokens).unwrap_or(usize::MAX);
        matches!(
            f.fault,
            FaultKind::Cut | FaultKind::Stall | FaultKind::Error
        )
        .then_some((f.fault, at.min(self.tokens.len())))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// Counts the stream as completed or abandoned when it is dropped.
struct Watch {
    state: Arc<State>,
    done: bool,
}

impl Watch {
    fn complete(&mut self) {
        self.done = true;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let done = self.done;
        let at = self.state.started.elapsed();
        self.state.count(|s| {
            if done {
                s.completed += 1;
            } else {
                s.abandoned += 1;
                s.last_abandoned = Some(at);
            }
        });
    }
}

/// Steps of the stream, in order.
enum Step {
    KeepAlive,
    Role,
    Token(usize),
    Finish,
    Usage,
    Done,
    End,
}

/// The event stream of a plan: a keep-alive comment, the role, the tokens (each event written
/// in two pieces, so clients meet events split across reads), the finish chunk, the usage chunk
/// when asked for, then `[DONE]`; or the plan's fault.
pub fn events(
    state: Arc<State>,
    plan: Plan,
) -> impl Stream<Item = Result<Bytes, actix_web::Error>> {
    let watch = Watch { state, done: false };
    stream::unfold(
        (plan, watch, Step::KeepAlive, Vec::<Bytes>::new()),
        |(plan, mut watch, step, mut pending)| async move {
            if let Some(piece) = pending.pop() {
                return Some((Ok(piece), (plan, watch, step, pending)));
            }
            let (bytes, next) = match step {
                Step::KeepAlive => (Bytes::from_static(b": keep-alive\n\n"), Step::Role),
                Step::Role => (
                    plan.chunk(json!({"role": "assistant", "content": ""}), None),
                    Step::Token(0),
                ),
                Step::Token(i) => {
                    if let Some((kind, at)) = plan.fault_at()
                        && at == i
                    {
                        return fault(kind, plan, watch, pending).await;
                    }
                    if i == plan.tokens.len() {
                        (
                            plan.chunk(json!({}), Some(plan.finish_reason)),
                            Step::Finish,
                        )
                    } else {
                        let delay = if i == 0 { plan.first_delay } else { plan.delay };
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let event = plan.chunk(json!({"content": plan.token(i)}), None);
                        let half = event.len() / 2;
                        pending.push(event.slice(half..));
                        (event.slice(..half), Step::Token(i + 1))
                    }
                }
                Step::Finish if plan.include_usage => (
                    sse(&json!({
                        "id": "chatcmpl-mock",
                        "object": "chat.completion.chunk",
                        "created": now_secs(),
                        "model": plan.model,
                        "choices": [],
                        "usage": plan.usage(),
                    })),
                    Step::Usage,
                ),
                Step::Finish | Step::Usage => (Bytes::from_static(b"data: [DONE]\n\n"), Step::Done),
                Step::Done => {
                    watch.complete();
                    return None;
                }
                Step::End => return None,
            };
            Some((Ok(bytes), (plan, watch, next, pending)))
        },
    )
}

type Next = Option<(
    Result<Bytes, actix_web::Error>,
    (Plan, Watch, Step, Vec<Bytes>),
)>;

async fn fault(kind: FaultKind, plan: Plan, mut watch: Watch, pending: Vec<Bytes>) -> Next {
    match kind {
        FaultKind::Stall => {
            // Holds the connection open until the client gives up.
            std::future::pending::<()>().await;
            None
        }
        FaultKind::Error => {
            let error =
                json!({"error": {"message": "The model is overloaded", "type": "server_error"}});
            watch.complete();
            Some((Ok(sse(&error)), (plan, watch, Step::End, pending)))
        }
        _ => {
            // What was sent must reach the client first: waiting lets the server flush it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            // An error from the body makes the server drop the connection mid-response.
            watch.complete();
            let cut = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "cut");
            Some((Err(cut.into()), (plan, watch, Step::End, pending)))
        }
    }
}
