//! Faults as they happen in production, on the distributed wiring: real processes killed with
//! SIGKILL, pub/sub connections killed, a Redis restarted empty. Each test then checks what a
//! client holds against what was saved.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::{cluster::Node, helpers::*, servers::OwnRedis};

/// A socket on `port`, resuming after `last_seq` when given.
async fn open(port: u16, key: &str, chat: &str, last_seq: Option<u64>) -> Ws {
    let mut url = format!("ws://127.0.0.1:{port}/ws/chat?api_key={key}&user_id=u1&chat_id={chat}");
    if let Some(n) = last_seq {
        url.push_str(&format!("&last_seq={n}"));
    }
    Ws::open(url.into_client_request().unwrap()).await
}

/// Reads events until the socket closes or `message_stream_ended` arrives; never panics on a
/// dead connection (the gateway behind it may have been killed).
async fn read_until_end_or_gone(ws: &mut Ws, into: &mut Vec<Value>) -> bool {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let msg = match tokio::time::timeout(WAIT, ws.inner.next()).await {
            Ok(Some(Ok(msg))) => msg,
            _ => return false,
        };
        match msg {
            Message::Text(t) => {
                let e: Value = serde_json::from_str(&t).unwrap();
                let ended = e["event_type"] == "message_stream_ended";
                into.push(e);
                if ended {
                    return true;
                }
            }
            Message::Close(_) => return false,
            _ => {}
        }
    }
}

/// The highest `seq` a client holds.
fn last_seq(events: &[Value]) -> u64 {
    events
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Checks what a client holds: no `seq` twice, and the text after the answer's last
/// `message_stream_started` equals `message_stream_ended.content`; returns that content.
fn consistent_answer(events: &[Value]) -> String {
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    let mut unique = seqs.clone();
    unique.dedup();
    assert_eq!(seqs, unique, "no seq twice, in order");
    let last_start = events
        .iter()
        .rposition(|e| e["event_type"] == "message_stream_started")
        .expect("a started answer");
    let after = &events[last_start..];
    let ended = after
        .iter()
        .find(|e| e["event_type"] == "message_stream_ended")
        .expect("an ended answer");
    let content = ended["content"].as_str().unwrap().to_owned();
    assert_eq!(tokens_of(after), content, "the tokens after the last start");
    content
}

/// A gateway (with its worker) on the test's own Redis; returns it and that Redis's URL.
async fn on_own_redis(db: &TestDb, redis: &OwnRedis) -> (TestApp, String) {
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let gw = start(&db.url, |c| {
        use_redis(c);
        c.redis_url = Some(url.clone());
    })
    .await;
    (gw, url)
}

/// The chat's saved messages.
async fn saved(app: &TestApp, key: &str, chat: &str) -> Value {
    app.get(key, &format!("/api/v1/chats/{chat}/messages"))
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_client_resumes_on_another_gateway_after_its_gateway_is_killed_mid_answer() -> TestResult
{
    let db = TestDb::postgres().await;
    let gw = start(&db.url, use_redis).await;
    let key = gw
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 60, "token_delay_ms": 30}}}))
        .await;
    let chat = gw.chat_as(&key, "u1").await;
    let mut doomed = Node::spawn("gateway", &db.url);
    let mut ws = open(doomed.port.unwrap(), &key, &chat, None).await;
    ws.next().await;
    ws.send_json(json!({"content": "a long answer please"}))
        .await;
    let mut held = ws.until("message_stream_token").await;
    for _ in 0..10 {
        held.push(ws.next().await);
    }
    doomed.kill();
    read_until_end_or_gone(&mut ws, &mut held).await;
    // The seed's client waits a second before it reconnects, to another gateway.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut back = open(gw.port, &key, &chat, Some(last_seq(&held))).await;
    assert_eq!(back.next().await["event_type"], "connection_established");
    assert!(read_until_end_or_gone(&mut back, &mut held).await);
    let content = consistent_answer(&held);
    let saved = saved(&gw, &key, &chat).await;
    assert_eq!(saved["total"], 2, "{saved}");
    assert_eq!(
        saved["messages"][1]["content"], content,
        "the client holds the saved answer"
    );
    Ok(())
}

#[tokio::test]
async fn a_killed_subscriber_connection_loses_nothing() -> TestResult {
    let redis = OwnRedis::start();
    let db = TestDb::postgres().await;
    let (gw, url) = on_own_redis(&db, &redis).await;
    let key = gw
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 60, "token_delay_ms": 30}}}))
        .await;
    let chat = gw.chat_as(&key, "u1").await;
    let mut ws = open(gw.port, &key, &chat, None).await;
    ws.next().await;
    ws.send_json(json!({"content": "keep talking"})).await;
    let mut held = ws.until("message_stream_token").await;
    held.push(ws.next().await);
    let mut admin = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await?;
    assert!(killed >= 1);
    // Either the gap is filled from the log, or the socket is sent to resume (1012).
    if !read_until_end_or_gone(&mut ws, &mut held).await {
        let mut back = open(gw.port, &key, &chat, Some(last_seq(&held))).await;
        back.next().await;
        assert!(read_until_end_or_gone(&mut back, &mut held).await);
    }
    let content = consistent_answer(&held);
    let first = held.iter().filter_map(|e| e["seq"].as_u64()).min().unwrap();
    assert_eq!(
        held.iter().filter(|e| e.get("seq").is_some()).count() as u64,
        last_seq(&held) - first + 1,
        "no gap"
    );
    assert_eq!(
        saved(&gw, &key, &chat).await["messages"][1]["content"],
        content
    );
    Ok(())
}

#[tokio::test]
async fn acknowledged_messages_survive_redis_restarted_empty() -> TestResult {
    let mut redis = OwnRedis::start();
    let db = TestDb::postgres().await;
    let (gw, url) = on_own_redis(&db, &redis).await;
    gw.stop_worker().await;
    let chat = gw.chat("u1").await;
    let mut ws = open(gw.port, &gw.api_key, &chat, None).await;
    ws.next().await;
    let mut held = Vec::new();
    for n in 0..3 {
        ws.send_json(json!({"content": format!("question {n}")}))
            .await;
        let received = ws.next().await;
        assert_eq!(received["event_type"], "message_received");
        held.push(received);
    }
    let before = last_seq(&held);
    drop(ws);
    redis.stop();
    redis.restart();
    let _worker = Node::spawn_with(
        "worker",
        &db.url,
        &[
            ("PARLEY_REDIS_URL", url.as_str()),
            ("PARLEY_DELIVERY__UNANSWERED_AFTER_SECS", "1"),
        ],
    );
    let started = Instant::now();
    loop {
        let saved = saved(&gw, &gw.api_key, &chat).await;
        if saved["total"] == 6 {
            let answers = by_role(&saved, "assistant").len();
            assert_eq!(
                answers, 3,
                "each acknowledged message answered once: {saved}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not answered: {saved}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A client resuming from before the loss is told, then follows live events. It may need
    // a retry while the gateway's own Redis connections come back.
    let mut back = open(gw.port, &gw.api_key, &chat, Some(before)).await;
    for _ in 0..20 {
        if back.next().await["event_type"] == "connection_established" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        back = open(gw.port, &gw.api_key, &chat, Some(before)).await;
    }
    let told = back.next().await;
    assert_eq!(told["error_code"], "RESUME_UNAVAILABLE", "{told}");
    let latest = told["details"]["seq"].as_u64().unwrap();
    assert!(latest > before, "seq never goes backwards");
    back.send_json(json!({"content": "and now?"})).await;
    let live = back.until("message_stream_ended").await;
    assert!(live.iter().all(|e| e["seq"].as_u64().unwrap() > latest));
    Ok(())
}

#[tokio::test]
async fn a_killed_worker_is_replaced_within_its_lease_and_the_answer_restarts() -> TestResult {
    let db = TestDb::postgres().await;
    let gw = start(&db.url, use_redis).await;
    gw.stop_worker().await;
    let key = gw
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 40, "token_delay_ms": 50}}}))
        .await;
    let chat = gw.chat_as(&key, "u1").await;
    // Only the liveness lease can bring the job back quickly: the idle reclaim is a minute.
    let slow_reclaim = [("PARLEY_CLUSTER__RECLAIM_AFTER_SECS", "60")];
    let mut first = Node::spawn_with("worker", &db.url, &slow_reclaim);
    let mut ws = gw.ws(&key, "u1", &chat).await;
    ws.next().await;
    ws.send_json(json!({"content": "survive this"})).await;
    let mut held = ws.until("message_stream_token").await;
    held.extend([ws.next().await, ws.next().await]);
    first.kill();
    let killed = Instant::now();
    let _second = Node::spawn_with("worker", &db.url, &slow_reclaim);
    assert!(read_until_end_or_gone(&mut ws, &mut held).await);
    // 5 s to take the job over, plus the answer's own 2 s, plus slack for a loaded machine.
    assert!(
        killed.elapsed() < Duration::from_secs(9),
        "{:?}",
        killed.elapsed()
    );
    let restarts: Vec<&Value> = held
        .iter()
        .filter(|e| e["event_type"] == "message_stream_started")
        .collect();
    assert!(restarts.len() >= 2, "the answer restarted: {restarts:?}");
    let last = restarts.last().unwrap();
    assert!(last["attempt"].as_u64().unwrap() >= 2);
    assert_eq!(
        last["message_id"], restarts[0]["message_id"],
        "the same answer id"
    );
    let content = consistent_answer(&held);
    let saved = saved(&gw, &key, &chat).await;
    assert_eq!(saved["total"], 2, "{saved}");
    assert_eq!(saved["messages"][1]["content"], content);
    assert_eq!(saved["messages"][1]["id"], last["message_id"]);
    Ok(())
}

#[tokio::test]
async fn the_same_client_message_id_through_two_gateways_is_answered_once() -> TestResult {
    let db = TestDb::postgres().await;
    let a = start(&db.url, use_redis).await;
    let b = start(&db.url, use_redis).await;
    let chat = a.chat("u1").await;
    let mut on_a = a.ws(&a.api_key, "u1", &chat).await;
    let mut on_b = b.ws(&a.api_key, "u1", &chat).await;
    on_a.next().await;
    on_b.next().await;
    let frame = json!({"content": "once", "client_message_id": "retry-7"});
    on_a.send_json(frame.clone()).await;
    on_b.send_json(frame).await;
    on_a.until("message_stream_ended").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let saved = saved(&a, &a.api_key, &chat).await;
    assert_eq!(saved["total"], 2, "one message, one answer: {saved}");
    Ok(())
}

/// Connection counts in Redis heal from each gateway's own: after `FLUSHALL` (Redis forgets
/// every slot) within a heartbeat, and after counts drifted (a release that never landed, a
/// take whose answer was lost; here written into Redis by the test) within a full write-back
/// (4 heartbeats of 1 s here). The test waits a little longer than each.
#[tokio::test]
async fn connection_counts_heal_after_flushall_and_drift() -> TestResult {
    let redis = OwnRedis::start();
    let db = TestDb::postgres().await;
    let port = redis.port;
    let app = start_on_redis(&db.url, port).await;
    let key = app.tenant_with(json!({"max_connections": 2})).await;
    let chat = app.chat_as(&key, "u1").await;
    let mut first = open(app.port, &key, &chat, None).await;
    first.until("connection_established").await;
    let mut second = open(app.port, &key, &chat, None).await;
    second.until("connection_established").await;
    let path = format!("/api/v1/chats/{chat}");
    let refused = |mut ws: Ws| async move {
        let (events, _, _) = ws.events_then_close().await;
        assert_error(&events[0], "CONNECTION_LIMIT");
    };

    let mut admin = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection()
        .await?;
    let () = redis::cmd("FLUSHALL").query_async(&mut admin).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    refused(open(app.port, &key, &chat, None).await).await;
    assert_eq!(app.delete(&key, &path).await.status(), 409);

    // Drift: the tenant's count says none, the chat's says nine.
    let tenant_id = body(app.get(&key, &path).await).await["tenant_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let prefix = format!("test:{}:", db.url.rsplit('/').next().unwrap());
    let tenant_key = format!("{prefix}conns:{tenant_id}");
    let chat_key = format!("{prefix}chatconns:{chat}");
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&tenant_key)
        .query_async(&mut admin)
        .await?;
    assert_eq!(fields.len(), 1, "one gateway's field: {fields:?}");
    let () = redis::cmd("HSET")
        .arg(&tenant_key)
        .arg(&fields[0])
        .arg(0)
        .query_async(&mut admin)
        .await?;
    let () = redis::cmd("HSET")
        .arg(&chat_key)
        .arg(&fields[0])
        .arg(9)
        .query_async(&mut admin)
        .await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    refused(open(app.port, &key, &chat, None).await).await;
    // Every socket closed: the chat can go.
    first.inner.close(None).await?;
    second.inner.close(None).await?;
    let mut deleted = false;
    for _ in 0..50 {
        if app.delete(&key, &path).await.status() == 200 {
            deleted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(deleted, "the chat stayed in use with every socket closed");
    app.stop().await;
    Ok(())
}
