//! API.md §4.1 on every wiring: `seq` on every chat event, resume with `last_seq`, late join,
//! bursts to clients that read at their own pace, stalled clients, resume beyond retention.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::*;

/// The `seq` of an event.
fn seq(e: &Value) -> u64 {
    e["seq"].as_u64().unwrap_or_else(|| panic!("no seq on {e}"))
}

/// Asserts that the events' `seq`s increase by exactly one.
fn assert_consecutive(events: &[Value]) {
    for pair in events.windows(2) {
        assert_eq!(
            seq(&pair[1]),
            seq(&pair[0]) + 1,
            "{} then {}",
            pair[0],
            pair[1]
        );
    }
}

/// Opens a socket resuming after `last_seq`.
async fn resume(app: &TestApp, key: &str, chat: &str, last_seq: u64) -> Ws {
    let url = format!(
        "ws://127.0.0.1:{}/ws/chat?api_key={key}&user_id=u1&chat_id={chat}&last_seq={last_seq}",
        app.port
    );
    Ws::open(url.into_client_request().unwrap()).await
}

#[tokio::test]
async fn every_chat_event_carries_the_next_seq_and_its_answer_id() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("u1").await;
    let mut ws = app.ws(&app.api_key, "u1", &chat).await;
    let hello = ws.next().await;
    assert_eq!(hello["event_type"], "connection_established");
    assert_eq!(hello["seq"], 0, "a new chat starts at 0");
    ws.send_json(json!({"type": "ping"})).await;
    let pong = ws.next().await;
    assert!(pong.get("seq").is_none(), "socket-only events carry no seq");
    ws.send_json(json!({"content": "count with me"})).await;
    let events = ws.until("message_stream_ended").await;
    assert_eq!(seq(&events[0]), 1);
    assert_consecutive(&events);
    let started = &events[1];
    assert_eq!(started["event_type"], "message_stream_started");
    assert_eq!(started["attempt"], 1);
    let answer = started["message_id"].as_str().unwrap();
    for e in &events[2..] {
        assert_eq!(
            e["message_id"], answer,
            "stream events carry the answer's id: {e}"
        );
    }
    let ended = events.last().unwrap();
    assert_eq!(ended["content"], tokens_of(&events));
    // A socket joining now starts at the chat's latest seq.
    let mut late = app.ws(&app.api_key, "u1", &chat).await;
    assert_eq!(late.next().await["seq"], seq(ended));
    Ok(())
}

#[tokio::test]
async fn a_client_that_resumes_gets_exactly_what_it_missed_then_live_events() -> TestResult {
    let app = spawn_app().await;
    let key = app
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 30, "token_delay_ms": 10}}}))
        .await;
    let chat = app.chat_as(&key, "u1").await;
    let mut watcher = app.ws(&key, "u1", &chat).await;
    watcher.next().await;
    let mut ws = app.ws(&key, "u1", &chat).await;
    ws.next().await;
    ws.send_json(json!({"content": "tell me a story"})).await;
    let mut before = ws.until("message_stream_token").await;
    before.push(ws.next().await);
    let last_seen = seq(before.last().unwrap());
    drop(ws);
    let all = watcher.until("message_stream_ended").await;

    let mut back = resume(&app, &key, &chat, last_seen).await;
    let hello = back.next().await;
    assert_eq!(hello["event_type"], "connection_established");
    assert_eq!(hello["seq"], seq(all.last().unwrap()));
    let missed = back.until("message_stream_ended").await;
    assert_eq!(seq(&missed[0]), last_seen + 1, "nothing lost at the start");
    assert_consecutive(&missed);
    let expected: Vec<&Value> = all.iter().filter(|e| seq(e) > last_seen).collect();
    assert_eq!(missed.len(), expected.len(), "exactly the missed events");
    let text = tokens_of(&before) + &tokens_of(&missed);
    assert_eq!(
        text,
        missed.last().unwrap()["content"],
        "the client holds the whole answer"
    );

    // Then live, with no duplicate at the seam.
    back.send_json(json!({"content": "and another"})).await;
    let live = back.until("message_stream_ended").await;
    assert_eq!(seq(&live[0]), seq(missed.last().unwrap()) + 1);
    assert_consecutive(&live);

    // The header form resumes the same way.
    let mut req = format!(
        "ws://127.0.0.1:{}/ws/chat?api_key={key}&user_id=u1&chat_id={chat}",
        app.port
    )
    .into_client_request()?;
    req.headers_mut()
        .insert("X-Last-Seq", last_seen.to_string().parse()?);
    let mut by_header = Ws::open(req).await;
    by_header.next().await;
    assert_eq!(seq(&by_header.next().await), last_seen + 1);
    Ok(())
}

#[tokio::test]
async fn a_late_joiner_sees_the_answer_so_far_then_the_rest() -> TestResult {
    let app = spawn_app().await;
    let key = app
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 30, "token_delay_ms": 20}}}))
        .await;
    let chat = app.chat_as(&key, "u1").await;
    let mut first = app.ws(&key, "u1", &chat).await;
    first.next().await;
    first.send_json(json!({"content": "go slowly"})).await;
    let mut seen = first.until("message_stream_token").await;
    for _ in 0..5 {
        seen.push(first.next().await);
    }
    let mut late = app.ws(&key, "u1", &chat).await;
    assert_eq!(late.next().await["event_type"], "connection_established");
    let joined = late.until("message_stream_ended").await;
    let started = seen
        .iter()
        .find(|e| e["event_type"] == "message_stream_started")
        .unwrap();
    assert_eq!(joined[0]["event_type"], "message_stream_started");
    assert_eq!(seq(&joined[0]), seq(started), "the same started event");
    assert_consecutive(&joined);
    assert_eq!(tokens_of(&joined), joined.last().unwrap()["content"]);
    let rest = first.until("message_stream_ended").await;
    assert_eq!(
        rest.last(),
        joined.last(),
        "every socket ends with the same text"
    );
    Ok(())
}

#[tokio::test]
async fn a_burst_reaches_a_client_that_reads_at_ordinary_speed() -> TestResult {
    // A small feed, so that the reader falls behind it and reads the log instead.
    let app = spawn_with(|c| c.limits.chat_buffer = 64).await;
    let key = app
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 2000}}}))
        .await;
    let chat = app.chat_as(&key, "u1").await;
    let mut ws = app.ws(&key, "u1", &chat).await;
    ws.next().await;
    ws.send_json(json!({"content": "all at once"})).await;
    let mut events = Vec::new();
    loop {
        let e = ws.next().await;
        let done = e["event_type"] == "message_stream_ended";
        events.push(e);
        if done {
            break;
        }
        if events.len() % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(
        events.iter().all(|e| e["event_type"] != "error"),
        "no SLOW_CONSUMER"
    );
    assert_consecutive(&events);
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event_type"] == "message_stream_token")
            .count(),
        2000
    );
    assert_eq!(tokens_of(&events), events.last().unwrap()["content"]);
    Ok(())
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_its_slots_freed() -> TestResult {
    let app = spawn_with(|c| c.delivery.write_timeout_secs = 1).await;
    let key = app
        .tenant_with(json!({"max_connections": 1, "agent": {"options": {"reply_tokens": 200000}}}))
        .await;
    let stalled_chat = app.chat_as(&key, "u1").await;
    let other_chat = app.chat_as(&key, "u1").await;
    let mut stalled = app.ws(&key, "u1", &stalled_chat).await;
    stalled.next().await;
    stalled.send_json(json!({"content": "flood me"})).await;
    // From here on the client reads nothing.
    let mut freed = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut probe = app.ws(&key, "u1", &other_chat).await;
        if probe.next().await["event_type"] == "connection_established" {
            freed = true;
            break;
        }
    }
    assert!(freed, "the stalled socket's tenant slot was freed");
    let deleted = app
        .delete(&key, &format!("/api/v1/chats/{stalled_chat}"))
        .await;
    assert_eq!(deleted.status(), 200, "the chat's socket count was freed");
    // What the client finally reads ends with the close.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(msg)) = stalled.inner.next().await {
            if msg.is_close() {
                return true;
            }
        }
        true
    })
    .await;
    assert!(ended.is_ok(), "the stalled socket is closed");
    Ok(())
}

#[tokio::test]
async fn a_resume_beyond_retention_is_told_then_follows_live() -> TestResult {
    let app = spawn_with(|c| {
        c.delivery.log_events = 5;
        c.delivery.log_secs = 0;
    })
    .await;
    let chat = app.chat("u1").await;
    let mut ws = app.ws(&app.api_key, "u1", &chat).await;
    ws.next().await;
    // Two answers: the log keeps whole batches, so the first answer's go once the second's
    // make up the last 5 events.
    ws.send_json(json!({"content": "fill the log"})).await;
    ws.until("message_stream_ended").await;
    ws.send_json(json!({"content": "and more"})).await;
    let events = ws.until("message_stream_ended").await;
    let latest = seq(events.last().unwrap());
    assert!(latest > 10);
    drop(ws);
    let mut back = resume(&app, &app.api_key, &chat, 1).await;
    assert_eq!(back.next().await["event_type"], "connection_established");
    let told = back.next().await;
    assert_eq!(told["event_type"], "error");
    assert_eq!(told["error_code"], "RESUME_UNAVAILABLE");
    assert_eq!(told["details"]["seq"], latest);
    assert!(told.get("seq").is_none());
    back.send_json(json!({"content": "still here?"})).await;
    let live = back.until("message_stream_ended").await;
    assert_eq!(
        seq(&live[0]),
        latest + 1,
        "then live events, with larger seqs"
    );
    Ok(())
}

#[tokio::test]
async fn a_malformed_last_seq_is_refused_at_the_handshake() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("u1").await;
    let url = format!(
        "ws://127.0.0.1:{}/ws/chat?api_key={}&user_id=u1&chat_id={chat}&last_seq=ten",
        app.port, app.api_key
    );
    let mut ws = Ws::open(url.into_client_request()?).await;
    let (events, code, _) = ws.events_then_close().await;
    assert_eq!(events[0]["error_code"], "AUTH_ERROR");
    assert!(
        events[0]["error_message"]
            .as_str()
            .unwrap()
            .contains("last_seq")
    );
    assert_eq!(code, 1008);
    Ok(())
}

#[tokio::test]
async fn a_repeated_client_message_id_saves_nothing_and_answers_once() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("u1").await;
    let mut ws = app.ws(&app.api_key, "u1", &chat).await;
    ws.next().await;
    let frame = json!({"content": "only once", "client_message_id": "c-1"});
    ws.send_json(frame.clone()).await;
    let first = ws.until("message_stream_ended").await;
    // Resent on another socket, as a client that reconnected before it saw the answer would.
    let mut again = app.ws(&app.api_key, "u1", &chat).await;
    again.next().await;
    again.send_json(frame).await;
    let repeat = again.next().await;
    assert_eq!(repeat["event_type"], "message_received");
    assert_eq!(repeat["message_id"], first[0]["message_id"]);
    assert!(repeat.get("seq").is_none(), "the sender's copy only");
    again.send_json(json!({"type": "ping"})).await;
    assert_eq!(
        again.next().await["event_type"],
        "pong",
        "no answer started"
    );
    let saved: Value = app
        .get(&app.api_key, &format!("/api/v1/chats/{chat}/messages"))
        .await
        .json()
        .await?;
    assert_eq!(saved["total"], 2, "one message, one answer: {saved}");
    ws.send_json(json!({"content": "x", "client_message_id": ""}))
        .await;
    assert_eq!(ws.next().await["error_code"], "INVALID_MESSAGE");
    Ok(())
}
