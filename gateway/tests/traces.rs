//! One trace per user message, from the gateway through the worker and back to every gateway
//! holding a socket of the chat, checked with an in-memory span exporter. A test binary of its
//! own: the exporter hangs off the process-wide subscriber, which the `api` tests install
//! without one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use std::{sync::OnceLock, time::Duration};

use helpers::{TestDb, TestResult, spawn_app, start, use_redis};
use opentelemetry::{Value as OtelValue, trace::SpanId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use serde_json::json;
use shared::telemetry::{self, Telemetry};

const SECRET_CONTENT: &str = "my card number is 4111-1111";

/// The process's exporter; installed before any app starts.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORT: OnceLock<(InMemorySpanExporter, Telemetry)> = OnceLock::new();
    &EXPORT
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let guard = telemetry::init_with_exporter("warn", exporter.clone());
            (exporter, guard)
        })
        .0
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a OtelValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

/// The spans of the trace whose `message` span is for `chat`, once `forward_first_token` has
/// ended on `gateways` gateways and the answer is saved (spans end asynchronously).
async fn trace_of(chat: &str, gateways: usize) -> Vec<SpanData> {
    for _ in 0..100 {
        let spans = exporter().get_finished_spans().expect("spans");
        let root = spans.iter().find(|s| {
            s.name == "message"
                && attr(s, "chat.id").map(OtelValue::as_str).as_deref() == Some(chat)
        });
        if let Some(root) = root {
            let id = root.span_context.trace_id();
            let trace: Vec<SpanData> = spans
                .into_iter()
                .filter(|s| s.span_context.trace_id() == id)
                .collect();
            let forwards = trace
                .iter()
                .filter(|s| s.name == "forward_first_token")
                .count();
            let saved = trace.iter().any(|s| s.name == "answer");
            if forwards >= gateways && saved {
                return trace;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no complete trace for chat {chat}");
}

fn one<'a>(trace: &'a [SpanData], name: &str) -> &'a SpanData {
    let found: Vec<_> = trace.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "exactly one {name} span in {trace:#?}");
    found[0]
}

fn parent(span: &SpanData) -> SpanId {
    span.parent_span_id
}

/// Checks the shape of one message's trace; returns the forward spans.
fn check_trace(trace: &[SpanData], api_key: &str) -> Vec<SpanData> {
    let message = one(trace, "message");
    let saved = one(trace, "store.save_message");
    let enqueue = one(trace, "broker.enqueue");
    let answer = one(trace, "answer");
    let call = one(trace, "model.call");
    let saved_answer = one(trace, "store.save_answer");
    assert_eq!(
        parent(message),
        SpanId::INVALID,
        "the message span is the root"
    );
    assert_eq!(parent(saved), message.span_context.span_id());
    assert_eq!(parent(enqueue), message.span_context.span_id());
    assert_eq!(
        parent(answer),
        enqueue.span_context.span_id(),
        "worker joins the trace"
    );
    assert_eq!(parent(call), answer.span_context.span_id());
    assert_eq!(parent(saved_answer), answer.span_context.span_id());
    assert!(
        call.events.iter().any(|e| e.name == "first_token"),
        "the model call marks its first token: {call:#?}"
    );
    assert!(attr(message, "message.id").is_some_and(|m| m.as_str().starts_with("msg-")));
    let forwards: Vec<SpanData> = trace
        .iter()
        .filter(|s| s.name == "forward_first_token")
        .cloned()
        .collect();
    for f in &forwards {
        assert_eq!(
            parent(f),
            call.span_context.span_id(),
            "gateway forward under the call"
        );
    }
    // Ids only: no content, no key, anywhere in the trace.
    for span in trace {
        let values = span
            .attributes
            .iter()
            .chain(span.events.iter().flat_map(|e| e.attributes.iter()))
            .map(|kv| kv.value.as_str().into_owned());
        for v in values.chain([span.name.to_string()]) {
            assert!(!v.contains(SECRET_CONTENT), "content leaked in {span:#?}");
            assert!(!v.contains(api_key), "tenant key leaked in {span:#?}");
        }
    }
    forwards
}

#[tokio::test]
async fn one_message_is_one_trace_from_gateway_to_worker_and_back() -> TestResult {
    exporter();
    let app = spawn_app().await;
    let chat = app.chat("u1").await;
    let mut ws = app.ws(&app.api_key, "u1", &chat).await;
    ws.until("connection_established").await;
    ws.send_json(json!({"content": SECRET_CONTENT})).await;
    ws.until("message_stream_ended").await;

    let trace = trace_of(&chat, 1).await;
    assert_eq!(check_trace(&trace, &app.api_key).len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_distributed_trace_spans_the_worker_and_every_gateway_of_the_chat() -> TestResult {
    exporter();
    let db = TestDb::postgres().await;
    let a = start(&db.url, use_redis).await;
    let b = start(&db.url, use_redis).await;
    let chat = a.chat("u1").await;
    let mut on_a = a.ws(&a.api_key, "u1", &chat).await;
    let mut on_b = b.ws(&a.api_key, "u2", &chat).await;
    on_a.until("connection_established").await;
    on_b.until("connection_established").await;
    on_b.send_json(json!({"content": SECRET_CONTENT})).await;
    on_a.until("message_stream_ended").await;
    on_b.until("message_stream_ended").await;

    let trace = trace_of(&chat, 2).await;
    let forwards = check_trace(&trace, &a.api_key);
    assert_eq!(
        forwards.len(),
        2,
        "one forward span per gateway of the chat"
    );
    Ok(())
}
