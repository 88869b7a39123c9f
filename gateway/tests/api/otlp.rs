//! Trace export over OTLP/HTTP, end to end: a gateway process and a worker process post their
//! spans to a receiver in the test, and one message's spans from both share one trace.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use actix_web::{App, HttpResponse, HttpServer, web};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use serde_json::json;

use crate::{cluster::Node, helpers::*};

/// Every span received: (service name, span name, trace id).
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// An OTLP/HTTP trace receiver on a free port; returns its base URL.
fn receiver(received: Received) -> String {
    let server = HttpServer::new(move || {
        let received = received.clone();
        App::new().route(
            "/v1/traces",
            web::post().to(move |body: web::Bytes| {
                let received = received.clone();
                async move {
                    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    let mut out = received.lock().unwrap();
                    for resource in request.resource_spans {
                        let service = resource
                            .resource
                            .iter()
                            .flat_map(|r| r.attributes.iter())
                            .find(|kv| kv.key == "service.name")
                            .and_then(|kv| kv.value.as_ref())
                            .map(|v| format!("{:?}", v.value))
                            .unwrap_or_default();
                        for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                            out.push((service.clone(), span.name, span.trace_id));
                        }
                    }
                    HttpResponse::Ok()
                        .content_type("application/x-protobuf")
                        .finish()
                }
            }),
        )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    format!("http://127.0.0.1:{port}")
}

#[tokio::test]
async fn gateway_and_worker_processes_export_one_trace_per_message_over_otlp() -> TestResult {
    let received = Received::default();
    let endpoint = receiver(received.clone());
    let db = TestDb::postgres().await;
    let admin = start(&db.url, use_redis).await;
    admin.stop_worker().await;
    let chat = admin.chat("u1").await;
    let env = [
        ("PARLEY_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let mut worker = Node::spawn_with("worker", &db.url, &env);
    let mut gateway = Node::spawn_with("gateway", &db.url, &env);
    let client = TestApp::attach(gateway.port.unwrap());
    let mut ws = client.ws(&admin.api_key, "u1", &chat).await;
    ws.next().await;
    ws.send_json(json!({"content": "trace me"})).await;
    ws.until("message_stream_ended").await;

    let wanted = [
        ("parley-gateway", "message"),
        ("parley-gateway", "broker.enqueue"),
        ("parley-worker", "answer"),
        ("parley-worker", "model.call"),
        ("parley-gateway", "forward_first_token"),
    ];
    let mut traces = HashSet::new();
    for _ in 0..100 {
        let spans = received.lock().unwrap().clone();
        let of = |service: &str, name: &str| {
            spans
                .iter()
                .find(|(s, n, _)| s.contains(service) && n == name)
                .map(|(_, _, t)| t.clone())
        };
        let found: Option<Vec<Vec<u8>>> = wanted.iter().map(|(s, n)| of(s, n)).collect();
        if let Some(ids) = found {
            traces = ids.into_iter().collect();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        traces.len(),
        1,
        "gateway and worker spans of the message in one trace: {:?}",
        received.lock().unwrap()
    );
    // A stopping process flushes what it still holds.
    assert!(gateway.terminate(Duration::from_secs(10)));
    assert!(worker.terminate(Duration::from_secs(10)));
    Ok(())
}
