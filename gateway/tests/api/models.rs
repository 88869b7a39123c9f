//! Real models: the `openai` provider against the mock OpenAI-compatible server over HTTP.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use mockllm::{Fault, FaultKind, MockLlm, Settings};
use serde_json::{Value, json};
use shared::config::ModelEndpoint;

use crate::helpers::*;

/// A mock model server and an app whose `llm` endpoint points at it.
async fn app_with_model(settings: Settings) -> (TestApp, MockLlm) {
    app_with_endpoint(settings, |_| {}).await
}

/// The same, with the endpoint's settings adjusted by `tweak`.
async fn app_with_endpoint(
    settings: Settings,
    tweak: impl FnOnce(&mut ModelEndpoint),
) -> (TestApp, MockLlm) {
    let mock = MockLlm::start("127.0.0.1:0", settings).unwrap();
    let mut endpoint = ModelEndpoint {
        base_url: mock.base_url(),
        api_key_env: None,
        first_token_timeout_ms: 3_000,
        idle_timeout_ms: 400,
        retry_backoff_ms: 10,
        ..ModelEndpoint::default()
    };
    tweak(&mut endpoint);
    let app = spawn_with(|c| {
        c.worker.models.insert("llm".into(), endpoint);
    })
    .await;
    (app, mock)
}

/// A tenant answered by the `llm` endpoint; returns its key and a chat of `u1`.
async fn llm_tenant(app: &TestApp, extra: Value) -> (String, String) {
    let mut agent = json!({"provider": "llm", "model": "gpt-test", "history_messages": 10});
    if let (Some(a), Some(e)) = (agent.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    let key = app.tenant_with(json!({"agent": agent})).await;
    let chat = app.chat_as(&key, "u1").await;
    (key, chat)
}

/// Sends one message; the events up to the end of its answer (a failed answer ends with its
/// `error` event, after the `message_stream_ended` of a partial answer).
/// An app and a `u1` chat whose model endpoint will misbehave `times` in a row.
async fn with_fault(
    fault: FaultKind,
    after_tokens: u64,
    times: u32,
) -> (TestApp, MockLlm, String, String) {
    let (app, mock) = app_with_model(Settings::default()).await;
    let (key, chat) = llm_tenant(&app, json!({})).await;
    mock.push_fault(Fault {
        fault,
        after_tokens,
        times,
    });
    (app, mock, key, chat)
}

async fn ask(app: &TestApp, key: &str, chat: &str, content: &str) -> Vec<Value> {
    let mut ws = app.ws(key, "u1", chat).await;
    ws.until("connection_established").await;
    ws.send_json(json!({ "content": content })).await;
    let mut events = Vec::new();
    loop {
        let e = ws.next().await;
        let last = e["event_type"] == "error"
            || (e["event_type"] == "message_stream_ended" && e["finish_reason"] != "error");
        events.push(e);
        if last {
            return events;
        }
    }
}

async fn messages(app: &TestApp, key: &str, chat: &str) -> Vec<Value> {
    let res = app
        .get(key, &format!("/api/v1/chats/{chat}/messages?limit=100"))
        .await;
    let body: Value = res.json().await.unwrap();
    body["messages"].as_array().unwrap().clone()
}

#[tokio::test]
async fn an_answer_streams_token_by_token_with_context_in_order() -> TestResult {
    let (app, mock) = app_with_model(Settings::default()).await;
    let (key, chat) = llm_tenant(&app, json!({"system_prompt": "Be brief."})).await;
    let first = ask(&app, &key, &chat, "hello").await;
    let expected = shared::mocktext::reply_tokens("gpt-test", "hello", 24);
    let tokens: Vec<&str> = first
        .iter()
        .filter(|e| e["event_type"] == "message_stream_token")
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens, expected, "one event per upstream delta, in order");
    let ended = first.last().unwrap();
    assert_eq!(ended["content"], expected.concat());
    assert_eq!(ended["finish_reason"], "stop");

    ask(&app, &key, &chat, "and again").await;
    let sent = mock.requests();
    let second = &sent[1];
    assert_eq!(second["model"], "gpt-test");
    assert_eq!(second["stream"], true);
    assert_eq!(second["stream_options"]["include_usage"], true);
    let roles: Vec<(&str, &str)> = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    let answer = expected.concat();
    assert_eq!(
        roles,
        vec![
            ("system", "Be brief."),
            ("user", "hello"),
            ("assistant", answer.as_str()),
            ("user", "and again"),
        ]
    );

    // Usage: recorded on the message and in the tenant's daily totals.
    let saved = messages(&app, &key, &chat).await;
    assert_eq!(saved[1]["metadata"]["model"], "gpt-test");
    assert_eq!(saved[1]["metadata"]["tokens_used"], 24);
    let usage = usage_when(&app, &key, |u| u["total"]["messages"] == 2).await;
    assert_eq!(usage["total"]["completion_tokens"], 48);
    assert!(usage["total"]["prompt_tokens"].as_u64().unwrap() > 0);
    Ok(())
}

/// The usage report once `ready` holds (workers write usage once a second).
async fn usage_when(app: &TestApp, key: &str, ready: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..50 {
        let usage = tenant_usage(app, key).await;
        if ready(&usage) {
            return usage;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("usage never reached the expected totals");
}

/// The usage report of the tenant owning `key` (found through the admin list).
async fn tenant_usage(app: &TestApp, key: &str) -> Value {
    let list: Value = app
        .http
        .get(app.url("/admin/v1/tenants"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let chats: Value = app
        .get(key, "/api/v1/chats/user/u1")
        .await
        .json()
        .await
        .unwrap();
    let tenant_id = chats["chats"][0]["tenant_id"].as_str().unwrap().to_owned();
    assert!(list.to_string().contains(&tenant_id));
    app.http
        .get(app.url(&format!("/admin/v1/tenants/{tenant_id}/usage")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_429_then_success_is_retried_and_answered_once() -> TestResult {
    let (app, mock, key, chat) = with_fault(FaultKind::RateLimited, 0, 1).await;
    let events = ask(&app, &key, &chat, "hello").await;
    assert!(events.iter().all(|e| e["event_type"] != "error"));
    assert_eq!(events.last().unwrap()["finish_reason"], "stop");
    assert_eq!(mock.stats().requests, 2, "one refused, one answered");
    assert_eq!(messages(&app, &key, &chat).await.len(), 2);
    Ok(())
}

/// A fault after 3 tokens ends in `AI_ERROR`, with the partial answer and the question saved.
async fn partial_answer_after(kind: FaultKind) {
    let (app, mock, key, chat) = with_fault(kind, 3, 1).await;
    let events = ask(&app, &key, &chat, "hello").await;
    let n = events.len();
    assert_eq!(
        events[n - 2]["event_type"],
        "message_stream_ended",
        "{events:#?}"
    );
    assert_eq!(events[n - 2]["finish_reason"], "error");
    assert_eq!(events[n - 1]["error_code"], "AI_ERROR", "{kind:?}");
    let partial = shared::mocktext::reply_tokens("gpt-test", "hello", 3).concat();
    assert_eq!(events[n - 2]["content"], partial);
    let saved = messages(&app, &key, &chat).await;
    assert_eq!(saved.len(), 2, "the question and the partial answer");
    assert_eq!(saved[1]["content"], partial);
    assert_eq!(saved[1]["metadata"]["finish_reason"], "error");
    assert_eq!(mock.stats().requests, 1, "no retry after tokens went out");
}

#[tokio::test]
async fn a_cut_stream_ends_in_ai_error_with_the_partial_answer_saved() {
    partial_answer_after(FaultKind::Cut).await;
}

#[tokio::test]
async fn a_stalled_stream_ends_in_ai_error_with_the_partial_answer_saved() {
    partial_answer_after(FaultKind::Stall).await;
}

#[tokio::test]
async fn an_error_object_mid_stream_ends_in_ai_error() {
    partial_answer_after(FaultKind::Error).await;
}

#[tokio::test]
async fn cancel_closes_the_upstream_connection_and_saves_the_partial_answer() -> TestResult {
    let (app, mock) = app_with_model(Settings {
        reply_tokens: 200,
        token_delay: Duration::from_millis(20),
        ..Settings::default()
    })
    .await;
    let (key, chat) = llm_tenant(&app, json!({})).await;
    let mut ws = app.ws(&key, "u1", &chat).await;
    ws.until("connection_established").await;
    ws.send_json(json!({"content": "tell me everything"})).await;
    ws.until("message_stream_token").await;
    let sent_at = mock.elapsed();
    ws.send_json(json!({"type": "cancel"})).await;
    let events = ws.until("message_stream_ended").await;
    let ended = events.last().unwrap();
    assert_eq!(ended["finish_reason"], "cancelled");
    let mut closed = None;
    for _ in 0..100 {
        if let Some(at) = mock.stats().last_abandoned {
            closed = Some(at);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let closed = closed.expect("the upstream request was abandoned");
    println!(
        "cancel sent → upstream closed: {:?}",
        closed.saturating_sub(sent_at)
    );
    // Generous for a shared machine; the README reports the measured figure.
    assert!(closed.saturating_sub(sent_at) < Duration::from_secs(1));
    let saved = messages(&app, &key, &chat).await;
    assert_eq!(saved[1]["metadata"]["finish_reason"], "cancelled");
    assert_eq!(saved[1]["content"], ended["content"]);
    Ok(())
}

#[tokio::test]
async fn a_spent_daily_quota_refuses_messages_without_saving_them() -> TestResult {
    let (app, _mock) = app_with_model(Settings::default()).await;
    let (key, chat) = llm_tenant(&app, json!({})).await;
    let tenant_id = tenant_usage(&app, &key).await["tenant_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.http
        .patch(app.url(&format!("/admin/v1/tenants/{tenant_id}")))
        .bearer_auth(ADMIN)
        .json(&json!({"settings": {"daily_token_quota": 10}}))
        .send()
        .await?;
    ask(&app, &key, &chat, "hello").await; // 24 tokens and more: the quota is spent
    usage_when(&app, &key, |u| {
        u["total"]["total_tokens"].as_u64() >= Some(10)
    })
    .await;
    // Past the gateway's one-second reading of the tenant's usage.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut ws = app.ws(&key, "u1", &chat).await;
    ws.until("connection_established").await;
    ws.send_json(json!({"content": "one more"})).await;
    let e = ws.next().await;
    assert_eq!(e["error_code"], "QUOTA_EXCEEDED");
    assert_eq!(messages(&app, &key, &chat).await.len(), 2, "nothing saved");
    Ok(())
}

#[tokio::test]
async fn the_usage_report_rejects_bad_dates() -> TestResult {
    let app = spawn_app().await;
    let url = app.url(&format!(
        "/admin/v1/tenants/{}/usage?from=yesterday",
        app.tenant_id
    ));
    let res = app.http.get(url).bearer_auth(ADMIN).send().await?;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await?;
    assert_eq!(body["error_code"], "INVALID_REQUEST");
    Ok(())
}

/// Everything a child process writes, collected by a thread per stream.
fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let mut all = into.lock().unwrap();
            all.push_str(&line);
            all.push('\n');
        }
    });
}

#[tokio::test]
async fn the_model_key_stays_out_of_logs_events_and_responses() -> TestResult {
    const KEY: &str = "sk-parley-test-5ecr3t-k3y";
    let mock = MockLlm::start("127.0.0.1:0", Settings::default())?;
    let dir = tempfile::TempDir::new()?;
    let gateway = std::path::PathBuf::from(env!("CARGO_BIN_EXE_gateway"));
    let mut child = Command::new(gateway)
        .env(
            "PARLEY_DATABASE_URL",
            format!("sqlite://{}/p.db", dir.path().display()),
        )
        .env("PARLEY_BIND", "127.0.0.1:0")
        .env("PARLEY_METRICS_BIND", "127.0.0.1:0")
        .env("PARLEY_ADMIN_TOKEN", ADMIN)
        .env("PARLEY_LOG", "debug")
        .env_remove("PARLEY_REDIS_URL")
        .env("PARLEY_WORKER__MODELS__LLM__BASE_URL", mock.base_url())
        .env(
            "PARLEY_WORKER__MODELS__LLM__API_KEY_ENV",
            "PARLEY_TEST_LLM_KEY",
        )
        .env("PARLEY_TEST_LLM_KEY", KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let output = Arc::new(Mutex::new(String::new()));
    collect(child.stderr.take().unwrap(), output.clone());
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut port = None;
    let mut line = String::new();
    while port.is_none() && stdout.read_line(&mut line)? > 0 {
        if line.contains("parley gateway listening") {
            let v: Value = serde_json::from_str(&line)?;
            port = v["port"].as_u64();
        }
        output.lock().unwrap().push_str(&line);
        line.clear();
    }
    collect(stdout.into_inner(), output.clone());
    let app = TestApp::attach(u16::try_from(port.unwrap())?);
    let (key, chat) = llm_tenant(&app, json!({})).await;

    mock.push_fault(Fault {
        fault: FaultKind::Unauthorized,
        after_tokens: 0,
        times: 1,
    });
    let refused = ask(&app, &key, &chat, "who am I?").await;
    let answered = ask(&app, &key, &chat, "hello").await;
    assert_eq!(answered.last().unwrap()["finish_reason"], "stop");
    let upstream = mock.requests();
    assert_eq!(upstream.len(), 2, "a 401 is not retried");

    let mut seen = serde_json::to_string(&refused)? + &serde_json::to_string(&answered)?;
    for path in ["/admin/v1/tenants", "/healthz", "/readyz"] {
        let res = app
            .http
            .get(app.url(path))
            .bearer_auth(ADMIN)
            .send()
            .await?;
        seen += &res.text().await?;
    }
    let _ = child.kill();
    let _ = child.wait();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = output.lock().unwrap().clone();
    assert!(
        logs.contains("model endpoint refused"),
        "the 401 was logged"
    );
    assert!(refused.iter().any(|e| e["error_code"] == "AI_ERROR"));
    assert!(!seen.contains(KEY), "key in a response or event");
    assert!(!logs.contains(KEY), "key in the logs");
    assert!(!logs.contains("5ecr3t"), "part of the key in the logs");
    Ok(())
}

#[tokio::test]
async fn server_errors_past_the_retries_end_in_ai_error_and_keep_the_question() -> TestResult {
    let (app, mock, key, chat) = with_fault(FaultKind::ServerError, 0, 3).await;
    let events = ask(&app, &key, &chat, "hello").await;
    assert_eq!(events.last().unwrap()["error_code"], "AI_ERROR");
    assert_eq!(mock.stats().requests, 3, "the first try and two retries");
    let saved = messages(&app, &key, &chat).await;
    assert_eq!(saved.len(), 1, "the question stays, no answer");
    let again = ask(&app, &key, &chat, "hello?").await;
    assert_eq!(again.last().unwrap()["finish_reason"], "stop");
    Ok(())
}

#[tokio::test]
async fn no_first_token_in_time_ends_in_ai_error_without_retrying() -> TestResult {
    let slow = Settings {
        first_token_delay: Duration::from_secs(3),
        ..Settings::default()
    };
    let (app, mock) = app_with_endpoint(slow, |e| e.first_token_timeout_ms = 300).await;
    let (key, chat) = llm_tenant(&app, json!({})).await;
    let events = ask(&app, &key, &chat, "hello").await;
    let last = events.last().unwrap();
    assert_eq!(last["error_code"], "AI_ERROR");
    assert!(
        last["error_message"]
            .as_str()
            .unwrap()
            .contains("first token")
    );
    assert!(
        events
            .iter()
            .all(|e| e["event_type"] != "message_stream_token")
    );
    assert_eq!(mock.stats().requests, 1);
    assert_eq!(
        messages(&app, &key, &chat).await.len(),
        1,
        "the question stays"
    );
    Ok(())
}
