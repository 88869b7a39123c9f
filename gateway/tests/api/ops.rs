//! What operators rely on: the Prometheus `/metrics` endpoint and a gateway's drain.

use serde_json::json;

use crate::helpers::*;

/// Every family the operations guide lists.
const FAMILIES: &[&str] = &[
    "parley_open_sockets",
    "parley_socket_connects",
    "parley_messages_received",
    "parley_tokens_forwarded",
    "parley_time_to_first_token_seconds",
    "parley_token_delivery_seconds",
    "parley_queue_depth",
    "parley_queue_lag_seconds",
    "parley_jobs_reclaimed",
    "parley_jobs_dead_lettered",
    "parley_model_errors",
    "parley_redis_errors",
    "parley_database_errors",
];

/// The value of the first sample whose line starts with `series`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

#[tokio::test]
async fn metrics_show_sockets_refusals_messages_and_tokens_after_traffic() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("owner").await;
    let mut refused = app.ws("wrong-key", "owner", &chat).await;
    assert_eq!(refused.next().await["error_code"], "AUTH_ERROR");
    let mut ws = app.ws(&app.api_key, "owner", &chat).await;
    ws.until("connection_established").await;
    ws.send_json(json!({"content": "count me"})).await;
    ws.until("message_stream_ended").await;

    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", app.metrics_port))
        .await?
        .text()
        .await?;
    for family in FAMILIES {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing from\n{text}"
        );
    }
    // The registry is per process and tests share it: counts only grow.
    assert!(sample(&text, "parley_open_sockets ") >= 1.0);
    assert!(sample(&text, r#"parley_socket_connects_total{reason="accepted"}"#) >= 1.0);
    assert!(
        sample(
            &text,
            r#"parley_socket_connects_total{reason="AUTH_ERROR"}"#
        ) >= 1.0
    );
    assert!(sample(&text, "parley_messages_received_total ") >= 1.0);
    assert!(sample(&text, "parley_tokens_forwarded_total ") >= 24.0);
    assert!(sample(&text, "parley_time_to_first_token_seconds_count ") >= 1.0);
    assert!(sample(&text, "parley_queue_lag_seconds_count ") >= 1.0);
    if distributed() {
        assert!(sample(&text, "parley_token_delivery_seconds_count ") >= 1.0);
    }
    assert!(
        !text.contains(&chat) && !text.contains(&app.api_key),
        "no ids or keys in labels"
    );
    Ok(())
}

#[tokio::test]
async fn a_stopping_gateway_cuts_a_stream_longer_than_its_drain_timeout() -> TestResult {
    let app = spawn_with(|c| c.drain_timeout_secs = 1).await;
    let key = app
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 100, "token_delay_ms": 100}}}))
        .await;
    let chat = app.chat_as(&key, "u1").await;
    let mut ws = app.ws(&key, "u1", &chat).await;
    ws.next().await;
    ws.send_json(json!({"content": "a long one"})).await;
    ws.until("message_stream_token").await;
    let stopping = tokio::spawn(async move {
        app.stop().await;
        app
    });
    let (events, code, reason) = ws.events_then_close().await;
    assert_eq!(
        (code, reason.as_str()),
        (1012, "server restarting; reconnect")
    );
    assert!(
        events
            .iter()
            .all(|e| e["event_type"] != "message_stream_ended"),
        "a 10 s answer cannot end within a 1 s drain"
    );
    drop(stopping.await?);
    Ok(())
}
