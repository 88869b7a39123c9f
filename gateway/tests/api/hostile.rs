//! Careless and hostile input: control characters in every text a client or operator sends are
//! refused with a clear error on every store (Postgres refuses NUL itself, SQLite does not),
//! nothing is saved, and a socket that sent one keeps working.

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::helpers::*;

/// Texts no client may send: NUL, another C0 control, an escape sequence.
const BAD: [&str; 3] = ["a\u{0}b", "bell\u{7}", "\u{1b}[31mred"];

#[tokio::test]
async fn control_characters_in_a_socket_message_are_invalid_and_the_socket_keeps_working()
-> TestResult {
    let app = spawn_app().await;
    // Every frame counts against the rate, refused ones too: room for the dozen sent here.
    let key = app.tenant_with(json!({"messages_per_second": 1000})).await;
    let chat = app.chat_as(&key, "u1").await;
    let mut ws = app.ws(&key, "u1", &chat).await;
    ws.until("connection_established").await;
    for bad in BAD {
        for frame in [
            json!({"content": bad}),
            json!({"content": "fine", "metadata": {"k": bad}}),
            json!({"content": "fine", "metadata": {bad: 1}}),
            json!({"content": "fine", "metadata": {"deep": [{"k": bad}]}}),
        ] {
            ws.send_json(frame).await;
            let e = ws.next().await;
            assert_eq!(e["error_code"], "INVALID_MESSAGE", "{e}");
            let message = e["error_message"].as_str().unwrap_or_default();
            assert!(message.contains("control characters"), "{message}");
        }
    }
    // Tab, newline and carriage return are text.
    ws.send_json(json!({"content": "two\tcolumns\r\nand lines", "metadata": {"k": "v\n"}}))
        .await;
    let events = ws.until("message_stream_ended").await;
    assert_eq!(events[0]["event_type"], "message_received");
    assert_eq!(events[0]["content"], "two\tcolumns\r\nand lines");
    let v = body(
        app.get(&key, &format!("/api/v1/chats/{chat}/messages"))
            .await,
    )
    .await;
    assert_eq!(
        v["total"], 2,
        "only the good message and its answer were saved"
    );
    Ok(())
}

#[tokio::test]
async fn control_characters_in_rest_and_admin_input_are_400_and_save_nothing() -> TestResult {
    let app = spawn_app().await;
    for bad in BAD {
        for body_ in [
            json!({"user_id": bad}),
            json!({"user_id": "u1", "title": bad}),
            json!({"user_id": "u1", "metadata": {"k": bad}}),
            json!({"user_id": "u1", "metadata": {bad: "v"}}),
        ] {
            let res = app.post_chat(&app.api_key, body_.clone()).await;
            assert_eq!(res.status(), 400, "{body_}");
            let v: Value = res.json().await?;
            assert_error(&v, "INVALID_REQUEST");
        }
        let path = format!("/api/v1/chats/user/{}", urlencode(bad));
        let res = app.get(&app.api_key, &path).await;
        assert_eq!(res.status(), 400, "{path}");

        for tenant in [
            json!({"name": bad}),
            json!({"name": "t", "settings": {"agent": {"system_prompt": bad}}}),
            json!({"name": "t", "settings": {"agent": {"options": {bad: 1}}}}),
        ] {
            let res = app
                .http
                .post(app.url("/admin/v1/tenants"))
                .bearer_auth(ADMIN)
                .json(&tenant)
                .send()
                .await?;
            assert_eq!(res.status(), 400, "{tenant}");
            assert_error(&res.json().await?, "INVALID_REQUEST");
        }
    }
    let res = app.get(&app.api_key, "/api/v1/chats/user/u1").await;
    assert_eq!(res.status(), 404, "no chat was created");
    let tenants = app.admin_tenants().await;
    let names: Vec<&str> = tenants["tenants"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(!names.contains(&"t"), "{tenants}");
    Ok(())
}

/// A client that closes and reconnects in a loop: each close handshake ends with the server
/// closing the TCP connection right away (API.md §4), not after a second of waiting for the
/// client to go first.
#[tokio::test]
async fn connect_close_cycles_are_not_held_open_after_the_closing_handshake() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("u1").await;
    let started = std::time::Instant::now();
    for _ in 0..200 {
        let mut ws = app.ws(&app.api_key, "u1", &chat).await;
        ws.until("connection_established").await;
        ws.inner.close(None).await?;
        // The server's Close frame, then the end of the TCP stream.
        while let Some(frame) = tokio::time::timeout(WAIT, ws.inner.next()).await? {
            if frame.is_err() {
                break;
            }
        }
    }
    let took = started.elapsed();
    // Generous for a shared machine: with the connection held a second after each close, the
    // loop takes over 200 s.
    assert!(
        took < std::time::Duration::from_secs(10),
        "200 cycles took {took:?}"
    );
    Ok(())
}

/// The error and close a socket gets when its key is revoked.
async fn revoked(ws: &mut Ws) {
    let (events, code, reason) = ws.events_then_close().await;
    assert_eq!((code, reason.as_str()), (1008, "AUTH_ERROR"), "{events:?}");
    let last = events.last().expect("an error before the close");
    assert_eq!(last["error_code"], "AUTH_ERROR", "{last}");
    assert!(
        last["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("revoked")),
        "{last}"
    );
}

#[tokio::test]
async fn rotating_a_key_or_deleting_its_tenant_closes_its_sockets_on_every_gateway() -> TestResult {
    let a = spawn_app().await;
    // A second gateway on the same store: it learns of the change only from the store.
    let b = start(&a.db_url, |_| {}).await;
    let chat = a.chat("u1").await;
    let bystander_key = a.tenant_with(json!({})).await;
    let bystander_chat = a.chat_as(&bystander_key, "u2").await;
    let mut bystander = b.ws(&bystander_key, "u2", &bystander_chat).await;
    bystander.until("connection_established").await;

    let mut on_a = a.ws(&a.api_key, "u1", &chat).await;
    let mut on_b = b.ws(&a.api_key, "u1", &chat).await;
    on_a.until("connection_established").await;
    on_b.until("connection_established").await;
    let rotated: Value = a
        .http
        .post(a.url(&format!("/admin/v1/tenants/{}/rotate-key", a.tenant_id)))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?;
    let new_key = rotated["api_key"].as_str().expect("new key").to_owned();
    revoked(&mut on_a).await;
    revoked(&mut on_b).await;

    // The new key works, and other tenants' sockets were left alone.
    let mut again = b.ws(&new_key, "u1", &chat).await;
    again.until("connection_established").await;
    bystander.send_json(json!({"type": "ping"})).await;
    assert_eq!(bystander.next().await["event_type"], "pong");

    let res = a
        .http
        .delete(a.url(&format!("/admin/v1/tenants/{}", a.tenant_id)))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    revoked(&mut again).await;
    bystander.send_json(json!({"type": "ping"})).await;
    assert_eq!(bystander.next().await["event_type"], "pong");
    b.stop().await;
    Ok(())
}

#[tokio::test]
async fn pings_and_cancels_count_against_the_connection_rate() -> TestResult {
    let app = spawn_app().await;
    let key = app.tenant_with(json!({"messages_per_second": 2})).await;
    let chat = app.chat_as(&key, "u1").await;
    let mut ws = app.ws(&key, "u1", &chat).await;
    ws.until("connection_established").await;
    for frame in [json!({"type": "ping"}), json!({"type": "cancel"})] {
        for _ in 0..6 {
            ws.send_json(frame.clone()).await;
        }
        // Pings answer with pong, cancels (no answer streaming) with nothing; over the rate,
        // both with RATE_LIMITED.
        let mut limited = 0;
        while limited == 0 {
            let e = ws.next().await;
            if e["error_code"] == "RATE_LIMITED" {
                assert!(e["details"]["retry_after_ms"].as_u64().is_some(), "{e}");
                limited += 1;
            } else {
                assert_eq!(e["event_type"], "pong", "{e}");
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        ws.send_json(json!({"type": "ping"})).await;
        loop {
            let e = ws.next().await;
            if e["event_type"] == "pong" {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn settings_outside_their_documented_ranges_are_400() -> TestResult {
    let app = spawn_app().await;
    let long = "x".repeat(40_000);
    for settings in [
        json!({"max_connections": 2_000_000}),
        json!({"messages_per_second": 0}),
        json!({"requests_per_minute": 0}),
        json!({"max_concurrent_answers": 0}),
        json!({"max_queued_messages": 2_000_000}),
        json!({"agent": {"history_messages": 5_000}}),
        json!({"agent": {"system_prompt": long}}),
        json!({"agent": {"temperature": 3.5}}),
        json!({"agent": {"max_tokens": 0}}),
        json!({"agent": {"model": ""}}),
        json!({"agent": {"options": {"blob": long}}}),
    ] {
        let res = app
            .http
            .post(app.url("/admin/v1/tenants"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": "bounded", "settings": settings}))
            .send()
            .await?;
        assert_eq!(res.status(), 400, "{settings}");
        let v: Value = res.json().await?;
        assert_error(&v, "INVALID_REQUEST");
        assert!(
            v["error_message"]
                .as_str()
                .unwrap_or_default()
                .contains("between"),
            "{v}"
        );
    }
    // The edges are allowed.
    let ok = json!({"max_connections": 1_000_000, "agent": {"history_messages": 1_000, "temperature": 2.0}});
    app.tenant_with(ok).await;
    Ok(())
}

#[tokio::test]
async fn a_database_password_never_appears_in_a_start_up_error() {
    let config = shared::config::Config {
        bind: "127.0.0.1:0".into(),
        metrics_bind: "127.0.0.1:0".into(),
        database_url: "postgres://postgres:s3cret-pw@127.0.0.1:5432/parley_no_such_database".into(),
        bootstrap_tenant: false,
        ..shared::config::Config::default()
    };
    let Err(err) = gateway::Application::build(config).await else {
        panic!("a missing database must fail the start");
    };
    let shown = format!("{err:#} {err:?}");
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    assert!(shown.contains("postgres://postgres:***@"), "{shown}");
}

/// A Postgres that hangs (here: a lock the test holds on the tables every request reads) makes
/// requests fail with 503 within the statement timeout, and `/readyz` names the store; all is
/// well again once the lock goes.
#[tokio::test]
async fn a_stalled_postgres_fails_requests_within_the_statement_timeout() -> TestResult {
    use sqlx::{Connection, Executor};
    let db = TestDb::postgres().await;
    let app = start(&db.url, |c| c.timeouts.store_ms = 1_000).await;
    let chat = app.chat("u").await;
    let path = format!("/api/v1/chats/{chat}");
    let mut locker = sqlx::PgConnection::connect(&db.url).await?;
    locker
        .execute("BEGIN; LOCK TABLE tenants, chats IN ACCESS EXCLUSIVE MODE")
        .await?;
    let started = std::time::Instant::now();
    let res = app.get(&app.api_key, &path).await;
    let took = started.elapsed();
    assert_eq!(res.status(), 503);
    assert_error(&body(res).await, "SERVICE_UNAVAILABLE");
    // The lock is held for as long as the test likes; the request deadline is 10 s.
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    let ready = app.http.get(app.url("/readyz")).send().await?;
    assert_eq!(ready.status(), 503);
    let ready = body(ready).await;
    assert_eq!(ready["failing"]["store"], "timed out", "{ready}");
    assert_eq!(ready["checks"]["broker"], true, "{ready}");
    locker.execute("ROLLBACK").await?;
    assert_eq!(app.get(&app.api_key, &path).await.status(), 200);
    let ready = app.http.get(app.url("/readyz")).send().await?;
    assert_eq!(ready.status(), 200);
    app.stop().await;
    Ok(())
}

/// A socket's message whose save hangs (a lock the test holds) is refused with
/// `SERVICE_UNAVAILABLE` within the request deadline, not the far longer statement timeout; the
/// socket stays open, and once the lock goes a resend under the same `client_message_id` leaves
/// exactly one saved message, answered.
#[tokio::test]
async fn a_socket_message_stuck_in_the_store_fails_within_the_request_deadline() -> TestResult {
    use sqlx::{Connection, Executor};
    let db = TestDb::postgres().await;
    let app = start(&db.url, |c| {
        c.timeouts.store_ms = 30_000;
        c.timeouts.request_ms = 1_000;
        c.delivery.unanswered_after_secs = 1;
    })
    .await;
    let chat = app.chat("u").await;
    let mut ws = app.ws(&app.api_key, "u", &chat).await;
    ws.until("connection_established").await;
    let mut locker = sqlx::PgConnection::connect(&db.url).await?;
    locker
        .execute("BEGIN; LOCK TABLE messages, chats IN ACCESS EXCLUSIVE MODE")
        .await?;
    let message = json!({"content": "stuck", "client_message_id": "c-1"});
    let started = std::time::Instant::now();
    ws.send_json(message.clone()).await;
    let refused = ws.next().await;
    let took = started.elapsed();
    assert_error(&refused, "SERVICE_UNAVAILABLE");
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    locker.execute("ROLLBACK").await?;
    ws.send_json(message).await;
    ws.until("message_received").await;
    // Answered: at once if the resend saved it, by the unanswered sweep if the stuck save
    // went through after all.
    ws.until("message_stream_ended").await;
    let page = body(
        app.get(&app.api_key, &format!("/api/v1/chats/{chat}/messages"))
            .await,
    )
    .await;
    let saved: Vec<&Value> = by_role(&page, "user");
    assert_eq!(saved.len(), 1, "{page}");
    assert_eq!(saved[0]["content"], "stuck");
    Ok(())
}

/// A gateway and a worker at `debug` level, driven through every path that handles a secret
/// (the admin token on good and bad requests, a key on REST and WebSocket, in the query and
/// in a header, right and wrong, a client token and its pepper, a database URL with a
/// password): none of them ever shows in what the processes print.
#[tokio::test]
async fn keys_admin_tokens_and_database_passwords_never_appear_in_logs() -> TestResult {
    use crate::cluster::Node;
    let db = TestDb::postgres().await;
    let password = "db-pass-S3CRET-4711";
    let url = db.url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{password}@"),
        1,
    );
    assert!(url.contains(password), "{url}");
    let token = "admin-token-S3CRET-0123456789abcdef-0815";
    let pepper = "token-pepper-S3CRET-2718";
    let env = [
        ("PARLEY_ADMIN_TOKEN", token),
        ("PARLEY_LOG", "debug"),
        ("PARLEY_BOOTSTRAP_TENANT", "false"),
    ];
    let mut gateway_env = env.to_vec();
    gateway_env.push(("PARLEY_AUTH__TOKEN_SECRET", pepper));
    let mut gateway = Node::spawn_with("gateway", &url, &gateway_env);
    let mut worker = Node::spawn_with("worker", &url, &env[1..]);
    let app = TestApp::attach(gateway.port.expect("port"));
    let res = app
        .http
        .post(app.url("/admin/v1/tenants"))
        .bearer_auth(token)
        .json(&json!({"name": unique("secrets")}))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let key = body(res).await["api_key"].as_str().unwrap().to_owned();
    let wrong = app
        .http
        .get(app.url("/admin/v1/tenants"))
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    let chat = app.chat_as(&key, "u").await;
    let mut ws = app.ws(&key, "u", &chat).await;
    ws.until("connection_established").await;
    ws.send_json(json!({"content": "hello"})).await;
    ws.until("message_stream_ended").await;
    let mut header =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://127.0.0.1:{}/ws/chat?user_id=u&chat_id={chat}",
            app.port
        ))?;
    header.headers_mut().insert("X-API-Key", key.parse()?);
    Ws::open(header).await.until("connection_established").await;
    let last = if key.ends_with('0') { '1' } else { '0' };
    let almost = format!("{}{last}", &key[..key.len() - 1]);
    assert_eq!(
        app.get(&almost, &format!("/api/v1/chats/{chat}"))
            .await
            .status(),
        401
    );
    let mut refused = app.ws(&almost, "u", &chat).await;
    refused.closed().await;
    // A client token, minted, used on a socket and on a read, and one forged from it.
    let res = app
        .http
        .post(app.url("/api/v1/tokens"))
        .header("X-API-Key", &key)
        .json(&json!({"user_id": "u"}))
        .send()
        .await?;
    let client_token = body(res).await["token"].as_str().unwrap().to_owned();
    let url = format!(
        "ws://127.0.0.1:{}/ws/chat?token={client_token}&chat_id={chat}",
        app.port
    );
    Ws::open(tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?)
        .await
        .until("connection_established")
        .await;
    let forged = format!("{client_token}x");
    let read = app
        .http
        .get(app.url(&format!("/api/v1/chats/{chat}")))
        .bearer_auth(&forged)
        .send()
        .await?;
    assert_eq!(read.status(), 401);
    assert!(gateway.terminate(std::time::Duration::from_secs(10)));
    assert!(worker.terminate(std::time::Duration::from_secs(10)));
    let mut printed = gateway.output.lock().unwrap().clone();
    printed.extend(worker.output.lock().unwrap().iter().cloned());
    assert!(
        printed.len() > 10,
        "debug logging printed next to nothing: {printed:?}"
    );
    for line in &printed {
        for secret in [
            password,
            token,
            pepper,
            key.as_str(),
            almost.as_str(),
            client_token.as_str(),
            forged.as_str(),
        ] {
            assert!(!line.contains(secret), "a secret in the output: {line}");
        }
    }
    Ok(())
}
