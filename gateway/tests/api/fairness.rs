//! Fairness between tenants in the workers (issue 12): a tenant's backlog is capped (over it a
//! message is refused with `RATE_LIMITED` and not saved), and a tenant that fills the workers
//! with slow answers holds at most its `max_concurrent_answers`, so another tenant is answered
//! at once.

use serde_json::{Value, json};

use crate::helpers::*;

/// The user messages saved in a chat.
async fn user_messages(app: &TestApp, key: &str, chat: &str) -> Vec<String> {
    let page = body(
        app.get(key, &format!("/api/v1/chats/{chat}/messages"))
            .await,
    )
    .await;
    by_role(&page, "user")
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_tenant_over_its_backlog_cap_is_refused_while_another_is_answered() -> TestResult {
    let app = spawn_app().await;
    let slow =
        json!({"max_queued_messages": 2, "agent": {"options": {"first_token_delay_ms": 1500}}});
    let flooder = app.tenant_with(slow).await;
    let chat = app.chat_as(&flooder, "u").await;
    let mut ws = app.ws(&flooder, "u", &chat).await;
    ws.until("connection_established").await;
    for text in ["one", "two"] {
        ws.send_json(json!({"content": text})).await;
        ws.until("message_received").await;
    }
    ws.send_json(json!({"content": "three"})).await;
    let refused = ws.next().await;
    assert_error(&refused, "RATE_LIMITED");
    assert!(
        refused["details"]["retry_after_ms"].as_u64().is_some(),
        "{refused}"
    );
    assert!(
        refused["error_message"]
            .as_str()
            .unwrap()
            .contains("waiting for an answer"),
        "{refused}"
    );
    assert_eq!(user_messages(&app, &flooder, &chat).await, ["one", "two"]);

    // Another tenant is answered meanwhile.
    let other_chat = app.chat("v").await;
    let mut other = app.ws(&app.api_key, "v", &other_chat).await;
    other.until("connection_established").await;
    other.send_json(json!({"content": "hello"})).await;
    other.until("message_stream_ended").await;

    // Once the backlog is answered, the same socket may send again.
    let ended: Vec<Value> = ws.until("message_stream_ended").await;
    assert!(!ended.is_empty());
    ws.until("message_stream_ended").await;
    ws.send_json(json!({"content": "four"})).await;
    ws.until("message_received").await;
    assert_eq!(
        user_messages(&app, &flooder, &chat).await,
        ["one", "two", "four"]
    );
    Ok(())
}

#[tokio::test]
async fn a_tenant_filling_the_workers_with_slow_answers_does_not_hold_up_another() -> TestResult {
    let app = spawn_with(|c| c.worker.max_concurrent_chats = 4).await;
    let slow =
        json!({"max_concurrent_answers": 2, "agent": {"options": {"first_token_delay_ms": 3000}}});
    let flooder = app.tenant_with(slow).await;
    let mut chats = Vec::new();
    let mut sockets = Vec::new();
    for i in 0..6 {
        let user = format!("f{i}");
        let chat = app.chat_as(&flooder, &user).await;
        let mut ws = app.ws(&flooder, &user, &chat).await;
        ws.until("connection_established").await;
        ws.send_json(json!({"content": "slow please"})).await;
        ws.until("message_received").await;
        chats.push(chat);
        sockets.push(ws);
    }
    let chat = app.chat("v").await;
    let mut ws = app.ws(&app.api_key, "v", &chat).await;
    ws.until("connection_established").await;
    ws.send_json(json!({"content": "hello"})).await;
    ws.until("message_stream_ended").await;
    // The other tenant's answer is complete while none of the flooder's (3 s each) is: it did
    // not wait for a slot behind them.
    for chat in &chats {
        let page = body(
            app.get(&flooder, &format!("/api/v1/chats/{chat}/messages"))
                .await,
        )
        .await;
        let answers = by_role(&page, "assistant").len();
        assert_eq!(
            answers, 0,
            "a 3 s answer ended before the other tenant's instant one"
        );
    }
    // And every one of the flooder's messages is answered in the end.
    for ws in &mut sockets {
        ws.until("message_stream_ended").await;
    }
    Ok(())
}
