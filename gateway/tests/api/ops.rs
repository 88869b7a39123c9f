//! What operators rely on: the Prometheus `/metrics` endpoint, a gateway's drain, and the
//! worker's health endpoints.

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

#[tokio::test]
async fn a_draining_gateway_says_so_on_readyz_and_turns_new_sockets_away_until_it_stops()
-> TestResult {
    let app = spawn_with(|c| c.drain_timeout_secs = 10).await;
    let key = app
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 30, "token_delay_ms": 60}}}))
        .await;
    let chat = app.chat_as(&key, "u1").await;
    let mut ws = app.ws(&key, "u1", &chat).await;
    ws.next().await;
    ws.send_json(json!({"content": "finish me"})).await;
    ws.until("message_stream_token").await;
    let (http, readyz) = (app.http.clone(), app.url("/readyz"));
    let late = app.ws_request(&key, "u1", &chat);
    let stopping = tokio::spawn(async move {
        app.stop().await;
        app
    });

    // While the answer streams: still listening, not ready, saying why.
    let mut draining = None;
    for _ in 0..50 {
        let res = http.get(&readyz).send().await?;
        if res.status() == 503 {
            draining = Some(body(res).await);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let draining = draining.expect("/readyz turns 503 while draining");
    assert_eq!(draining["failing"]["draining"], "draining", "{draining}");
    assert_eq!(draining["checks"]["draining"], true);
    // A new socket is told to try again elsewhere.
    let (events, code, _) = Ws::open(late).await.events_then_close().await;
    assert_eq!(code, 1013, "{events:?}");
    assert_error(events.last().expect("an error"), "SERVICE_UNAVAILABLE");

    // The streaming socket gets its whole answer, then 1012; then the listener closes.
    let (events, code, reason) = ws.events_then_close().await;
    assert!(
        events
            .iter()
            .any(|e| e["event_type"] == "message_stream_ended")
    );
    assert_eq!(
        (code, reason.as_str()),
        (1012, "server restarting; reconnect")
    );
    drop(stopping.await?);
    assert!(
        http.get(&readyz).send().await.is_err(),
        "closed after the drain"
    );
    Ok(())
}

#[tokio::test]
async fn a_worker_serves_healthz_and_readyz_and_is_not_ready_without_redis() -> TestResult {
    use crate::{cluster::Node, servers::OwnRedis};
    let db = TestDb::postgres().await;
    let mut redis = OwnRedis::start();
    let redis_url = format!("redis://127.0.0.1:{}", redis.port);
    let bind = format!("127.0.0.1:{}", crate::servers::free_port());
    let mut worker = Node::spawn_with(
        "worker",
        &db.url,
        &[
            ("PARLEY_REDIS_URL", &redis_url),
            ("PARLEY_METRICS_BIND", &bind),
            ("PARLEY_TIMEOUTS__REDIS_MS", "500"),
        ],
    );
    let http = reqwest::Client::new();
    let ready = |want: u16| {
        let (http, url) = (http.clone(), format!("http://{bind}/readyz"));
        async move {
            for _ in 0..100 {
                if let Ok(res) = http.get(&url).send().await
                    && res.status() == want
                {
                    return res.json::<serde_json::Value>().await.expect("json");
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("/readyz never answered {want}");
        }
    };
    let up = ready(200).await;
    assert_eq!(
        up["checks"],
        json!({"store": true, "broker": true, "draining": false})
    );
    let health = http.get(format!("http://{bind}/healthz")).send().await?;
    assert_eq!(health.status(), 200);

    redis.stop();
    let down = ready(503).await;
    assert!(down["failing"]["broker"].is_string(), "{down}");
    assert_eq!(down["checks"]["store"], true);
    redis.restart();
    ready(200).await;
    assert!(worker.terminate(std::time::Duration::from_secs(10)));
    Ok(())
}
