//! The distributed topology: gateways and workers sharing only Redis and Postgres.
//! In-process nodes for the sharing tests; real processes (killed with SIGKILL) for crashes.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

use crate::{
    helpers::*,
    servers::{OwnPostgres, OwnRedis},
};

/// A gateway or worker binary of this workspace as a child process, on the test's database and
/// Redis prefix.
pub struct Node {
    child: Child,
    pub port: Option<u16>,
    /// What a gateway printed before it listened (a bootstrap tenant's key, say).
    pub startup: Vec<String>,
    /// Everything else the process printed (stdout and stderr), as it prints it.
    pub output: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Collects a child's output lines on a thread of their own (the pipe never fills).
fn collect(
    from: impl std::io::Read + Send + 'static,
    into: &std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let into = into.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            into.lock().unwrap().push(line);
        }
    });
}

impl Node {
    pub fn spawn(binary: &str, db_url: &str) -> Node {
        Self::spawn_with(binary, db_url, &[])
    }

    /// As [`Node::spawn`], with extra environment variables.
    pub fn spawn_with(binary: &str, db_url: &str, env: &[(&str, &str)]) -> Node {
        let path = PathBuf::from(env!("CARGO_BIN_EXE_gateway")).with_file_name(binary);
        assert!(
            path.exists(),
            "{} is missing: build it first (cargo build -p {binary})",
            path.display()
        );
        let db = db_url.rsplit('/').next().unwrap();
        let mut child = Command::new(path)
            .env("PARLEY_DATABASE_URL", db_url)
            .env("PARLEY_REDIS_URL", redis_url())
            .env("PARLEY_REDIS_PREFIX", format!("test:{db}:"))
            .env("PARLEY_CLUSTER__LEASE_SECS", "3")
            .env("PARLEY_CLUSTER__RECLAIM_AFTER_SECS", "1")
            .env("PARLEY_BIND", "127.0.0.1:0")
            .env("PARLEY_METRICS_BIND", "127.0.0.1:0")
            .env("PARLEY_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node starts");
        let mut port = None;
        let mut startup = Vec::new();
        let output = std::sync::Arc::default();
        collect(child.stderr.take().unwrap(), &output);
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        if binary == "gateway" {
            let mut line = String::new();
            while stdout.read_line(&mut line).unwrap_or(0) > 0 {
                let text = std::mem::take(&mut line);
                if text.contains("parley gateway listening") {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    port = v["port"].as_u64().map(|p| p as u16);
                    output.lock().unwrap().push(text);
                    break;
                }
                startup.push(text.trim_end().to_owned());
            }
        } else {
            std::thread::sleep(Duration::from_millis(500));
        }
        collect(stdout, &output);
        Node {
            child,
            port,
            startup,
            output,
        }
    }

    /// SIGTERM, as a rolling restart sends; true once the process has exited within `within`.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL: no goodbye to Redis
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn strip_timestamps(mut events: Vec<Value>) -> Vec<Value> {
    for e in &mut events {
        e.as_object_mut().unwrap().remove("timestamp");
    }
    events
}

#[tokio::test]
async fn sockets_on_two_gateways_see_the_same_stream_and_each_message_is_answered_once()
-> TestResult {
    let db = TestDb::postgres().await;
    let a = start(&db.url, use_redis).await;
    let b = start(&db.url, use_redis).await;
    let chat = a.chat("u1").await;
    let mut on_a = a.ws(&a.api_key, "u1", &chat).await;
    let mut on_b = b.ws(&a.api_key, "u1", &chat).await;
    on_a.next().await;
    on_b.next().await;
    for text in ["one", "two", "three"] {
        on_b.send_json(json!({"content": text})).await;
    }
    let mut seen = Vec::new();
    for ws in [&mut on_a, &mut on_b] {
        let mut events = Vec::new();
        for _ in 0..3 {
            events.extend(ws.until("message_stream_ended").await);
        }
        seen.push(strip_timestamps(events));
    }
    assert_eq!(
        seen[0], seen[1],
        "both gateways deliver the identical stream"
    );
    let received: Vec<&Value> = seen[0]
        .iter()
        .filter(|e| e["event_type"] == "message_received")
        .map(|e| &e["message_id"])
        .collect();
    let answered: Vec<&Value> = seen[0]
        .iter()
        .filter(|e| e["event_type"] == "message_stream_started")
        .map(|e| &e["reply_to"])
        .collect();
    assert_eq!(
        received, answered,
        "answered one at a time, in arrival order"
    );
    let saved: Value = a
        .get(&a.api_key, &format!("/api/v1/chats/{chat}/messages"))
        .await
        .json()
        .await?;
    assert_eq!(
        saved["total"], 6,
        "three messages, three answers, nothing twice"
    );
    Ok(())
}

#[tokio::test]
async fn the_connection_limit_spans_gateways_and_a_crashed_gateways_slots_come_back() -> TestResult
{
    let db = TestDb::postgres().await;
    let a = start(&db.url, use_redis).await;
    let b = start(&db.url, use_redis).await;
    let key = a.tenant_with(json!({"max_connections": 2})).await;
    let chat = a.chat_as(&key, "u1").await;
    {
        let mut x = a.ws(&key, "u1", &chat).await;
        let mut y = b.ws(&key, "u1", &chat).await;
        assert_eq!(x.next().await["event_type"], "connection_established");
        assert_eq!(y.next().await["event_type"], "connection_established");
        let mut z = a.ws(&key, "u1", &chat).await;
        let e = z.next().await;
        assert_eq!(e["error_code"], "CONNECTION_LIMIT", "{e}");
        x.inner.close(None).await?;
        y.inner.close(None).await?;
        x.closed().await;
        y.closed().await;
    }
    // A third gateway, a real process, takes both slots and dies without a word.
    let mut crashed = Node::spawn("gateway", &db.url);
    let port = crashed.port.expect("gateway port");
    let url =
        |p: u16| format!("ws://127.0.0.1:{p}/ws/chat?api_key={key}&user_id=u1&chat_id={chat}");
    let mut held = Vec::new();
    for _ in 0..50 {
        let (inner, _) = tokio_tungstenite::connect_async(url(port)).await?;
        let mut ws = Ws { inner };
        if ws.next().await["event_type"] == "connection_established" {
            held.push(ws);
            if held.len() == 2 {
                break;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(held.len(), 2);
    crashed.kill();
    let started = std::time::Instant::now();
    loop {
        let mut ws = a.ws(&key, "u1", &chat).await;
        if ws.next().await["event_type"] == "connection_established" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "slots of a dead gateway must come back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_chat_deleted_through_one_gateway_is_refused_by_another_that_knew_it() -> TestResult {
    let db = TestDb::postgres().await;
    let a = start(&db.url, use_redis).await;
    let b = start(&db.url, use_redis).await;
    let chat = a.chat("u1").await;
    // B learns the chat's owner from a socket of its own, then that socket closes.
    let mut on_b = b.ws(&a.api_key, "u1", &chat).await;
    assert_eq!(on_b.next().await["event_type"], "connection_established");
    on_b.inner.close(None).await?;
    on_b.closed().await;
    // Deletion waits for B's slot to be released.
    let started = std::time::Instant::now();
    while a
        .delete(&a.api_key, &format!("/api/v1/chats/{chat}"))
        .await
        .status()
        != 200
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "slot never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B was told: the chat is gone there too, for its owner as for anyone, and nothing opens.
    for user in ["u1", "u2"] {
        let mut late = b.ws(&a.api_key, user, &chat).await;
        let e = late.next().await;
        assert_error(&e, "CHAT_NOT_FOUND");
        assert_eq!(late.closed().await.0, 1008);
    }
    Ok(())
}

#[tokio::test]
async fn a_tenants_answer_cap_holds_across_workers() -> TestResult {
    let db = TestDb::postgres().await;
    // Two gateways, each with its worker in process: without a shared count each worker
    // would let the tenant run two answers, four in all.
    let a = start(&db.url, use_redis).await;
    let b = start(&db.url, use_redis).await;
    let slow =
        json!({"max_concurrent_answers": 2, "agent": {"options": {"first_token_delay_ms": 1200}}});
    let key = a.tenant_with(slow).await;
    let mut sockets = Vec::new();
    for i in 0..6 {
        let user = format!("u{i}");
        let chat = a.chat_as(&key, &user).await;
        let gateway = if i % 2 == 0 { &a } else { &b };
        let mut ws = gateway.ws(&key, &user, &chat).await;
        ws.until("connection_established").await;
        ws.send_json(json!({"content": "slow please"})).await;
        ws.until("message_received").await;
        sockets.push(ws);
    }
    // Each answer's span, by the workers' own timestamps on its first and last event.
    let at =
        |e: &Value| chrono::DateTime::parse_from_rfc3339(e["timestamp"].as_str().unwrap()).unwrap();
    let mut spans = Vec::new();
    for ws in &mut sockets {
        let events = ws.until("message_stream_ended").await;
        let started = events
            .iter()
            .find(|e| e["event_type"] == "message_stream_started")
            .expect("started");
        spans.push((at(started), at(events.last().unwrap())));
    }
    let most = spans
        .iter()
        .map(|(start, _)| {
            spans
                .iter()
                .filter(|(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap();
    assert!(most <= 2, "{most} answers at once: {spans:?}");
    Ok(())
}

#[tokio::test]
async fn a_worker_stopped_mid_answer_finishes_it_once_then_exits() -> TestResult {
    let db = TestDb::postgres().await;
    let gw = start(&db.url, use_redis).await;
    gw.stop_worker().await;
    let key = gw
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 30, "token_delay_ms": 40}}}))
        .await;
    let chat = gw.chat_as(&key, "u1").await;
    let mut worker = Node::spawn("worker", &db.url);
    let mut ws = gw.ws(&key, "u1", &chat).await;
    ws.next().await;
    ws.send_json(json!({"content": "finish what you started"}))
        .await;
    ws.until("message_stream_token").await;
    // The answer streams for about a second more: the drain lets it end.
    let exited = tokio::task::spawn_blocking(move || worker.terminate(Duration::from_secs(10)));
    let ended = ws.until("message_stream_ended").await;
    let ended = ended.last().unwrap();
    assert_eq!(ended["finish_reason"], "stop");
    assert!(exited.await?, "the worker exits once its answer is done");
    let saved: Value = gw
        .get(&key, &format!("/api/v1/chats/{chat}/messages"))
        .await
        .json()
        .await?;
    assert_eq!(saved["total"], 2, "one message, one answer: {saved}");
    assert_eq!(saved["messages"][1]["metadata"]["tokens_used"], 30);
    Ok(())
}

#[tokio::test]
async fn a_stopping_gateway_finishes_streams_then_sends_clients_elsewhere() -> TestResult {
    let db = TestDb::postgres().await;
    let gw = start(&db.url, use_redis).await;
    let key = gw
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 30, "token_delay_ms": 40}}}))
        .await;
    let chat = gw.chat_as(&key, "u1").await;
    let quiet_chat = gw.chat_as(&key, "u2").await;
    let mut doomed = Node::spawn("gateway", &db.url);
    let leaving = TestApp::attach(doomed.port.unwrap());
    let mut quiet = leaving.ws(&key, "u2", &quiet_chat).await;
    quiet.next().await;
    let mut ws = leaving.ws(&key, "u1", &chat).await;
    ws.next().await;
    ws.send_json(json!({"content": "keep going"})).await;
    ws.until("message_stream_token").await;
    // A rolling restart: SIGTERM while the answer streams for about a second more.
    let exited = tokio::task::spawn_blocking(move || doomed.terminate(Duration::from_secs(15)));
    let restart = (1012, "server restarting; reconnect".to_owned());
    assert_eq!(
        quiet.closed().await,
        restart,
        "an idle socket leaves at once"
    );
    let ended = ws.until("message_stream_ended").await;
    assert_eq!(
        ended.last().unwrap()["finish_reason"],
        "stop",
        "the stream completes"
    );
    assert_eq!(
        ws.closed().await,
        restart,
        "then its socket is sent elsewhere"
    );
    assert!(exited.await?, "the gateway exits");
    let saved: Value = gw
        .get(&key, &format!("/api/v1/chats/{chat}/messages"))
        .await
        .json()
        .await?;
    assert_eq!(saved["total"], 2, "answered once: {saved}");
    assert_eq!(saved["messages"][1]["metadata"]["tokens_used"], 30);
    Ok(())
}

#[tokio::test]
async fn a_stopping_worker_still_hears_a_cancel() -> TestResult {
    let db = TestDb::postgres().await;
    let gw = start(&db.url, use_redis).await;
    gw.stop_worker().await;
    let key = gw
        .tenant_with(json!({"agent": {"options": {"reply_tokens": 100, "token_delay_ms": 50}}}))
        .await;
    let chat = gw.chat_as(&key, "u1").await;
    let mut worker = Node::spawn("worker", &db.url);
    let mut ws = gw.ws(&key, "u1", &chat).await;
    ws.next().await;
    ws.send_json(json!({"content": "stop when I say"})).await;
    ws.until("message_stream_token").await;
    let exited = tokio::task::spawn_blocking(move || worker.terminate(Duration::from_secs(15)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send_json(json!({"type": "cancel"})).await;
    let ended = ws.until("message_stream_ended").await;
    assert_eq!(ended.last().unwrap()["finish_reason"], "cancelled");
    assert!(exited.await?, "the worker exits once its answer is done");
    Ok(())
}

async fn ready(app: &TestApp) -> u16 {
    match app.http.get(app.url("/readyz")).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Waits until `/readyz` answers `want`; returns its body.
async fn wait_ready(app: &TestApp, want: u16) -> Value {
    for _ in 0..100 {
        if ready(app).await == want {
            let res = app.http.get(app.url("/readyz")).send().await.unwrap();
            return res.json().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never answered {want}");
}

#[tokio::test]
async fn gateway_and_worker_ride_out_a_redis_restart() -> TestResult {
    let mut redis = OwnRedis::start();
    let db = TestDb::postgres().await;
    let port = redis.port;
    let app = start_on_redis(&db.url, port).await;
    let chat = app.chat("u1").await;
    wait_ready(&app, 200).await;

    redis.stop();
    let v = wait_ready(&app, 503).await;
    assert_eq!(v["checks"]["broker"], false);

    redis.restart();
    wait_ready(&app, 200).await;
    // Sockets, fan-out, jobs and leases all work again on the fresh Redis.
    assert!(
        answered_after_restart(&app, &chat).await,
        "a message is answered after the restart"
    );
    Ok(())
}

/// Sends one message on a fresh socket, retrying while the gateway settles; true once answered.
async fn answered_after_restart(app: &TestApp, chat: &str) -> bool {
    for _ in 0..50 {
        let mut ws = app.ws(&app.api_key, "u1", chat).await;
        if ws.next().await["event_type"] != "connection_established" {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        ws.send_json(json!({"content": "are you back?"})).await;
        let events = ws.until("message_stream_ended").await;
        assert_eq!(events[0]["event_type"], "message_received");
        return true;
    }
    false
}

#[tokio::test]
async fn gateway_and_worker_ride_out_a_postgres_restart() -> TestResult {
    let mut pg = OwnPostgres::start();
    let url = pg.url();
    let port = pg.port;
    let app = start(&url, |c| {
        use_redis(c);
        c.redis_prefix = format!("test:ownpg{port}:");
    })
    .await;
    let chat = app.chat("u1").await;
    wait_ready(&app, 200).await;

    pg.stop();
    let v = wait_ready(&app, 503).await;
    assert_eq!(v["checks"]["store"], false);
    assert_eq!(v["checks"]["broker"], true);
    // A REST call meanwhile gets a clear error, not a hang.
    let r = app
        .get(&app.api_key, &format!("/api/v1/chats/{chat}"))
        .await;
    assert_eq!(r.status(), 503);

    pg.restart();
    wait_ready(&app, 200).await;
    assert!(
        answered_after_restart(&app, &chat).await,
        "a message is answered after the restart"
    );
    Ok(())
}

#[tokio::test]
async fn three_gateways_started_at_once_on_an_empty_database_create_one_default_tenant()
-> TestResult {
    let db = TestDb::postgres().await;
    let url = db.url.clone();
    let nodes: Vec<Node> = std::thread::scope(|s| {
        let started: Vec<_> = (0..3)
            .map(|_| s.spawn(|| Node::spawn("gateway", &url)))
            .collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let printed = nodes
        .iter()
        .filter(|n| n.startup.iter().any(|l| l.contains("shown only this once")))
        .count();
    assert_eq!(printed, 1, "exactly one gateway prints the key");
    let key = nodes
        .iter()
        .flat_map(|n| n.startup.iter())
        .skip_while(|l| !l.contains("shown only this once"))
        .map(|l| l.trim())
        .find(|l| !l.is_empty() && !l.contains("shown only this once"))
        .unwrap()
        .to_owned();
    for node in &nodes {
        let client = TestApp::attach(node.port.unwrap());
        assert_eq!(client.get(&key, "/api/v1/chats/user/x").await.status(), 404);
    }
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await?;
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM tenants")
        .fetch_all(&mut conn)
        .await?;
    assert_eq!(names, ["default"]);
    Ok(())
}
