//! The WebSocket conversation: events and their order, fan-out, ordering, cancel, failures.

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::*;

fn types(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_message_is_saved_announced_streamed_and_saved_again() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("owner").await;
    let mut ws = app.ws(&app.api_key, "newcomer", &chat).await;
    let hello = ws.next().await;
    assert_eq!(hello["event_type"], "connection_established");
    assert_eq!(
        (hello["user_id"].as_str(), hello["chat_id"].as_str()),
        (Some("newcomer"), Some(chat.as_str()))
    );
    assert_eq!(hello["tenant_id"], app.tenant_id.as_str());
    assert_eq!(ws.next().await["event_type"], "user_created");

    ws.send_json(json!({"content": "Hello, I need help", "metadata": {"urgency": "high"}}))
        .await;
    let events = ws.until("message_stream_ended").await;
    let kinds = types(&events);
    assert_eq!(kinds[..2], ["message_received", "message_stream_started"]);
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "message_stream_token")
            .count(),
        24
    );
    let received = &events[0];
    assert_eq!(received["content"], "Hello, I need help");
    assert_eq!(received["user_id"], "newcomer");
    assert!(received["message_id"].as_str().unwrap().starts_with("msg-"));
    let ended = events.last().unwrap();
    assert_eq!(ended["content"].as_str().unwrap(), tokens_of(&events));
    assert_eq!(ended["finish_reason"], "stop");
    assert!(
        events
            .iter()
            .all(|e| e["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')))
    );

    let saved: Value = app
        .get(&app.api_key, &format!("/api/v1/chats/{chat}/messages"))
        .await
        .json()
        .await?;
    assert_eq!(saved["messages"][0]["id"], received["message_id"]);
    assert_eq!(saved["messages"][1]["id"], ended["message_id"]);
    assert_eq!(saved["messages"][1]["content"], ended["content"]);

    // A second connection of the same user is not told the user was created.
    let mut again = app.ws(&app.api_key, "newcomer", &chat).await;
    again.next().await;
    again.send_json(json!({"type": "ping"})).await;
    assert_eq!(again.next().await["event_type"], "pong");
    Ok(())
}

#[tokio::test]
async fn headers_work_for_the_handshake_and_the_query_wins() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("u1").await;
    let mut req =
        format!("ws://127.0.0.1:{}/ws/chat?user_id=from-query", app.port).into_client_request()?;
    req.headers_mut().insert("X-API-Key", app.api_key.parse()?);
    req.headers_mut()
        .insert("X-User-ID", "from-header".parse()?);
    req.headers_mut().insert("X-Chat-ID", chat.parse()?);
    let mut ws = Ws::open(req).await;
    let hello = ws.next().await;
    assert_eq!(hello["event_type"], "connection_established");
    assert_eq!(hello["user_id"], "from-query");
    Ok(())
}

#[tokio::test]
async fn three_back_to_back_messages_are_answered_in_order() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("u1").await;
    let mut ws = app.ws(&app.api_key, "u1", &chat).await;
    ws.next().await;
    for text in ["one", "two", "three"] {
        ws.send_json(json!({"content": text})).await;
    }
    let mut received = Vec::new();
    let mut answered = Vec::new();
    let mut open_stream = false;
    while answered.len() < 3 {
        let e = ws.next().await;
        match e["event_type"].as_str().unwrap() {
            "message_received" => received.push(e["message_id"].as_str().unwrap().to_owned()),
            "message_stream_started" => {
                assert!(!open_stream, "streams must not interleave");
                open_stream = true;
                answered.push(e["reply_to"].as_str().unwrap().to_owned());
            }
            "message_stream_ended" => open_stream = false,
            _ => {}
        }
    }
    assert_eq!(received, answered);
    Ok(())
}

#[tokio::test]
async fn every_socket_of_the_chat_receives_the_same_stream() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("u1").await;
    let mut a = app.ws(&app.api_key, "u1", &chat).await;
    let mut b = app.ws(&app.api_key, "u2", &chat).await;
    a.next().await;
    b.until("user_created").await;
    a.send_json(json!({"content": "for everyone"})).await;
    let mut from_a = a.until("message_stream_ended").await;
    let mut from_b = b.until("message_stream_ended").await;
    for events in [&mut from_a, &mut from_b] {
        for e in events.iter_mut() {
            e.as_object_mut().unwrap().remove("timestamp");
        }
    }
    assert_eq!(from_a, from_b);
    assert_eq!(from_b[0]["content"], "for everyone");
    Ok(())
}

#[tokio::test]
async fn cancel_stops_the_answer_and_saves_what_was_said() -> TestResult {
    let app = spawn_app().await;
    let key = app
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 500, "token_delay_ms": 20}}}))
        .await;
    let chat = app.chat_as(&key, "u1").await;
    let mut ws = app.ws(&key, "u1", &chat).await;
    ws.next().await;
    ws.send_json(json!({"content": "talk a lot"})).await;
    let mut events = ws.until("message_stream_token").await;
    ws.send_json(json!({"type": "cancel"})).await;
    events.extend(ws.until("message_stream_ended").await);
    let ended = events.last().unwrap();
    assert_eq!(ended["finish_reason"], "cancelled");
    assert_eq!(ended["content"].as_str().unwrap(), tokens_of(&events));
    let count = events
        .iter()
        .filter(|e| e["event_type"] == "message_stream_token")
        .count();
    assert!(count < 500, "stopped early ({count} tokens)");
    let saved: Value = app
        .get(&key, &format!("/api/v1/chats/{chat}/messages"))
        .await
        .json()
        .await?;
    assert_eq!(
        saved["messages"][1]["metadata"]["finish_reason"],
        "cancelled"
    );
    assert_eq!(saved["messages"][1]["content"], ended["content"]);
    Ok(())
}

#[tokio::test]
async fn a_failing_model_ends_with_ai_error_and_keeps_the_message() -> TestResult {
    let app = spawn_app().await;
    let key = app
        .tenant_with(json!({"agent": {"options": {"fail_after_tokens": 3}}}))
        .await;
    let chat = app.chat_as(&key, "u1").await;
    let mut ws = app.ws(&key, "u1", &chat).await;
    ws.until("connection_established").await;
    ws.send_json(json!({"content": "break"})).await;
    let events = ws.until("error").await;
    let kinds = types(&events);
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "message_stream_token")
            .count(),
        3
    );
    assert_eq!(kinds[kinds.len() - 2], "message_stream_ended");
    assert_eq!(events[events.len() - 2]["finish_reason"], "error");
    assert_eq!(events.last().unwrap()["error_code"], "AI_ERROR");
    let saved: Value = app
        .get(&key, &format!("/api/v1/chats/{chat}/messages"))
        .await
        .json()
        .await?;
    assert_eq!(saved["messages"][0]["content"], "break");
    assert_eq!(saved["messages"][1]["metadata"]["finish_reason"], "error");
    // The socket still works.
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next().await["event_type"], "pong");
    Ok(())
}

#[tokio::test]
async fn settings_changes_apply_without_a_restart() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("u1").await;
    let res = app
        .http
        .patch(app.url(&format!("/admin/v1/tenants/{}", app.tenant_id)))
        .bearer_auth(ADMIN)
        .json(&json!({"settings": {"agent": {"options": {"reply_tokens": 5}}}}))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    let mut ws = app.ws(&app.api_key, "u1", &chat).await;
    ws.send_json(json!({"content": "short please"})).await;
    let events = ws.until("message_stream_ended").await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event_type"] == "message_stream_token")
            .count(),
        5
    );
    Ok(())
}
