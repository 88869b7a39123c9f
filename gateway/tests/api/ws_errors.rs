//! Every WebSocket error of API.md §4: handshake refusals (then close 1008) and message-level
//! errors that keep the socket open.

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    },
};

use crate::helpers::*;

async fn refused(app: &TestApp, query: &str) -> (Value, u16) {
    let url = format!("ws://127.0.0.1:{}/ws/chat?{query}", app.port);
    let (inner, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade succeeds");
    let mut ws = Ws { inner };
    let event = ws.next().await;
    let (code, _) = ws.closed().await;
    (event, code)
}

#[tokio::test]
async fn handshake_failures_are_reported_then_closed_with_1008() -> TestResult {
    let app = spawn_app().await;
    let other = app.tenant_with(json!({})).await;
    let chat = app.chat("u1").await;
    let theirs = app.chat_as(&other, "u1").await;
    let key = &app.api_key;
    let missing = [
        (format!("user_id=u1&chat_id={chat}"), "api_key", "X-API-Key"),
        (
            format!("api_key={key}&chat_id={chat}"),
            "user_id",
            "X-User-ID",
        ),
        (format!("api_key={key}&user_id=u1"), "chat_id", "X-Chat-ID"),
    ];
    for (query, name, header) in missing {
        let (e, code) = refused(&app, &query).await;
        assert_eq!(code, 1008);
        assert_eq!(e["event_type"], "error");
        assert_eq!(e["error_code"], "AUTH_ERROR");
        assert_eq!(e["error_message"], format!("Missing {name} parameter"));
        let fix = e["details"]["fix"].as_str().unwrap();
        assert!(
            fix.contains(&format!("?{name}=")) && fix.contains(header),
            "{fix}"
        );
    }
    let (e, code) = refused(&app, &format!("api_key=nope&user_id=u1&chat_id={chat}")).await;
    assert_eq!(
        (e["error_code"].as_str(), e["error_message"].as_str(), code),
        (Some("AUTH_ERROR"), Some("Invalid API key"), 1008)
    );
    for missing_chat in [
        theirs.as_str(),
        "00000000-0000-4000-8000-000000000000",
        "not-a-uuid",
    ] {
        let (e, code) = refused(
            &app,
            &format!("api_key={key}&user_id=u1&chat_id={missing_chat}"),
        )
        .await;
        assert_eq!(code, 1008);
        assert_eq!(e["error_code"], "CHAT_NOT_FOUND");
        assert_eq!(
            e["error_message"],
            format!(
                "Chat with chat_id '{missing_chat}' not found or does not belong to your tenant"
            )
        );
        assert_eq!(
            e["details"]["fix"],
            "Create the chat first using POST /api/v1/chats/ endpoint"
        );
    }
    let (e, _) = refused(
        &app,
        &format!("api_key={key}&user_id={}&chat_id={chat}", "x".repeat(129)),
    )
    .await;
    assert_eq!(e["error_code"], "AUTH_ERROR");
    Ok(())
}

#[tokio::test]
async fn the_tenant_connection_limit_holds_and_slots_come_back() -> TestResult {
    let app = spawn_app().await;
    let key = app.tenant_with(json!({"max_connections": 2})).await;
    let chat = app.chat_as(&key, "u1").await;
    for _ in 0..30 {
        let mut ws = app.ws(&key, "u1", &chat).await;
        ws.next().await;
        ws.inner.close(None).await?;
        ws.closed().await;
    }
    // Closing is asynchronous on the server; give it a moment to release the last slot.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut a = app.ws(&key, "u1", &chat).await;
    let mut b = app.ws(&key, "u1", &chat).await;
    assert_eq!(a.next().await["event_type"], "connection_established");
    assert_eq!(b.next().await["event_type"], "connection_established");
    let (e, code) = refused(&app, &format!("api_key={key}&user_id=u1&chat_id={chat}")).await;
    assert_eq!(
        (e["error_code"].as_str(), code),
        (Some("CONNECTION_LIMIT"), 1008)
    );
    assert!(e["error_message"].as_str().unwrap().contains('2'));
    // Another tenant is not affected.
    let other_chat = app.chat("u1").await;
    let mut c = app.ws(&app.api_key, "u1", &other_chat).await;
    assert_eq!(c.next().await["event_type"], "connection_established");
    Ok(())
}

#[tokio::test]
async fn malformed_frames_get_invalid_message_and_the_socket_stays_usable() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("u1").await;
    let mut ws = app.ws(&app.api_key, "u1", &chat).await;
    ws.next().await;
    let bad_texts = [
        "not json",
        "[1,2,3]",
        "\"just a string\"",
        "{}",
        r#"{"content": ""}"#,
        r#"{"content": 42}"#,
        r#"{"content": "x", "metadata": "nope"}"#,
        r#"{"type": "dance"}"#,
    ];
    for text in bad_texts {
        ws.send(Message::text(text)).await;
        let e = ws.next().await;
        assert_eq!(
            (e["event_type"].as_str(), e["error_code"].as_str()),
            (Some("error"), Some("INVALID_MESSAGE")),
            "{text}"
        );
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await;
    assert_eq!(ws.next().await["error_code"], "INVALID_MESSAGE");
    let invalid_utf8 = Frame::message(vec![0xffu8, 0xfe, b'{'], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(invalid_utf8)).await;
    assert_eq!(ws.next().await["error_code"], "INVALID_MESSAGE");
    let too_long = json!({"content": "y".repeat(40 * 1024)});
    ws.send_json(too_long).await;
    let e = ws.next().await;
    assert_eq!(e["error_code"], "MESSAGE_TOO_LARGE");

    ws.send_json(json!({"content": "still here?"})).await;
    let events = ws.until("message_stream_ended").await;
    assert_eq!(events[0]["event_type"], "message_received");
    let saved: Value = app
        .get(&app.api_key, &format!("/api/v1/chats/{chat}/messages"))
        .await
        .json()
        .await?;
    assert_eq!(
        saved["total"], 2,
        "only the valid message and its answer were saved"
    );
    Ok(())
}

#[tokio::test]
async fn a_frame_over_64_kib_is_refused_and_the_socket_closed() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("u1").await;
    let mut ws = app.ws(&app.api_key, "u1", &chat).await;
    ws.next().await;
    ws.send_json(json!({"content": "z".repeat(100 * 1024)}))
        .await;
    let e = ws.next().await;
    assert_eq!(e["error_code"], "MESSAGE_TOO_LARGE");
    assert_eq!(ws.closed().await.0, 1009);
    Ok(())
}

#[tokio::test]
async fn the_per_connection_message_rate_is_enforced() -> TestResult {
    let app = spawn_app().await;
    let key = app
        .tenant_with(json!({"messages_per_second": 2, "agent": {"options": {"reply_tokens": 1}}}))
        .await;
    let chat = app.chat_as(&key, "u1").await;
    let mut ws = app.ws(&key, "u1", &chat).await;
    ws.until("connection_established").await;
    for i in 0..5 {
        ws.send_json(json!({"content": format!("m{i}")})).await;
    }
    let mut limited = 0;
    let mut received = 0;
    while received + limited < 5 {
        let e = ws.next().await;
        if e["error_code"] == "RATE_LIMITED" {
            assert!(
                e["details"]["retry_after_ms"]
                    .as_u64()
                    .is_some_and(|ms| ms > 0)
            );
            limited += 1;
        } else if e["event_type"] == "message_received" {
            received += 1;
        }
    }
    assert!(
        limited >= 2 && received >= 2,
        "received {received}, limited {limited}"
    );
    Ok(())
}

#[tokio::test]
async fn an_idle_socket_is_closed() -> TestResult {
    let app = spawn_with(|c| {
        c.limits.heartbeat_interval_secs = 1;
        c.limits.idle_timeout_secs = 1;
    })
    .await;
    let chat = app.chat("u1").await;
    let mut ws = app.ws(&app.api_key, "u1", &chat).await;
    ws.next().await;
    // Not reading means not answering pings: the server must give up on us.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (code, reason) = ws.closed().await;
    assert_eq!((code, reason.as_str()), (1000, "idle timeout"));
    Ok(())
}
