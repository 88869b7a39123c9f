//! What operators watch: the Prometheus `/metrics` endpoint.

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
