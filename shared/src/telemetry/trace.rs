//! The spans of one user message, and how their context crosses processes.
//!
//! One trace per message: the gateway's `message` span (with `store.save_message` and
//! `broker.enqueue` under it), the worker's `answer` span (with `model.call`, whose
//! `first_token` event marks the first token's publish, and `store.save_answer`), and on every
//! gateway holding a socket of the chat a `forward_first_token` span around handing the
//! answer's first token to its sockets. The context crosses the broker as a W3C `traceparent`
//! string: inside the [`Job`](crate::protocol::Job) (gateway → worker) and on the broker
//! message that carries the first token (worker → gateways), never in a client-visible event.
//!
//! Spans carry ids only (chat, message, tenant, attempt, model name): never a tenant key, a
//! user id, message content or a model secret.

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator as _},
    trace::TraceContextExt as _,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

/// Target of every message span; the trace exporter's filter enables it at `DEBUG`.
pub const TARGET: &str = "parley::trace";

const TRACEPARENT: &str = "traceparent";

/// The span's context as a `traceparent` value, or `None` when the span is not exported
/// (no exporter configured, or filtered out).
pub fn traceparent(span: &Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Carrier(None);
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.0
}

/// Makes `span` a child of the remote span that `traceparent` names (call it before the span
/// is first entered). A missing or malformed value leaves the span a root.
pub fn follow(span: &Span, traceparent: Option<&str>) {
    if let Some(value) = traceparent {
        let cx = TraceContextPropagator::new().extract(&Carrier(Some(value.to_owned())));
        if cx.span().span_context().is_valid() {
            // Fails only when the span is disabled, and then there is nothing to link.
            let _ = span.set_parent(cx);
        }
    }
}

/// The gateway's span around handing an answer's first token to its local sockets, a child of
/// the worker's model call.
pub fn forward_first_token(chat_id: Uuid, traceparent: &str) -> Span {
    let span = tracing::debug_span!(target: TARGET, "forward_first_token", chat.id = %chat_id);
    follow(&span, Some(traceparent));
    span
}

/// One `traceparent` value as a propagation carrier.
struct Carrier(Option<String>);

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0.as_deref()).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}
