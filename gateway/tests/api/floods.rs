//! Handshake floods and the operator surface (issue 12): failed authentications throttled per
//! source address (trusted proxies' `X-Forwarded-For` believed, anyone else's ignored), stalled
//! upgrades dropped, a real client's handshake unaffected by a flood of made-up keys, the
//! operator API on its own listener, and short admin tokens refused at start.

use std::{net::IpAddr, time::Duration};

use gateway::Application;
use shared::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

const MADE_UP: &str = "pk_0000000000000000000000000000000000000000000000000000000000000000";

fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source.parse::<IpAddr>().ok())
        .build()
        .expect("client")
}

async fn get_chat(
    http: &reqwest::Client,
    app: &TestApp,
    key: &str,
    chat: &str,
) -> reqwest::Response {
    http.get(app.url(&format!("/api/v1/chats/{chat}")))
        .header("X-API-Key", key)
        .send()
        .await
        .expect("request")
}

async fn assert_throttled(res: reqwest::Response) {
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let body = body(res).await;
    assert_error(&body, "RATE_LIMITED");
    assert!(
        body["details"]["retry_after_ms"].as_u64().unwrap() >= 1000,
        "{body}"
    );
}

/// Sends an upgrade from `source` over plain TCP and reads until the server closes (within 2 s),
/// never answering anything.
async fn raw_refusal_from(source: &str, app: &TestApp, chat: &str) -> std::io::Result<Vec<u8>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("address"))?;
    let mut tcp = socket
        .connect(format!("127.0.0.1:{}", app.port).parse().expect("address"))
        .await?;
    let head = format!(
        "GET /ws/chat?api_key={}&user_id=u&chat_id={chat} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        app.api_key
    );
    tcp.write_all(head.as_bytes()).await?;
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut seen))
        .await
        .map_err(|_| std::io::Error::other("the server kept the connection open"))??;
    Ok(seen)
}

#[tokio::test]
async fn failed_authentications_are_throttled_per_address_on_rest_sockets_and_admin() -> TestResult
{
    let app = spawn_with(|c| {
        c.auth.failure_burst = 3;
        c.auth.failures_per_minute = 1;
    })
    .await;
    let chat = app.chat("u").await;
    let guesser = client_from("127.0.0.2");
    for _ in 0..3 {
        let res = get_chat(&guesser, &app, MADE_UP, &chat).await;
        assert_eq!(res.status(), 401);
    }
    // Out of allowance: refused before any lookup, whatever the key.
    assert_throttled(get_chat(&guesser, &app, &app.api_key, &chat).await).await;
    // A socket from there is told why, after the upgrade as every handshake failure is.
    let mut ws = Ws::open_from("127.0.0.2", app.ws_request(&app.api_key, "u", &chat)).await;
    let (events, code, reason) = ws.events_then_close().await;
    assert_error(&events[0], "RATE_LIMITED");
    assert!(events[0]["details"]["retry_after_ms"].as_u64().unwrap() >= 1000);
    assert_eq!((code, reason.as_str()), (1008, "RATE_LIMITED"));
    // The whole refusal comes at once and the server hangs up without waiting for the client
    // to answer the close frame: a guesser that never does holds nothing open.
    let raw = raw_refusal_from("127.0.0.2", &app, &chat).await?;
    assert!(
        raw.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let frames = &raw[raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    let (header, len) = match frames[1] {
        126 => (4, usize::from(u16::from_be_bytes([frames[2], frames[3]]))),
        n => (2, usize::from(n)),
    };
    let (text, close) = frames.split_at(header + len);
    assert_eq!(frames[0], 0x81, "one unfragmented text frame first");
    assert!(String::from_utf8_lossy(text).contains("\"error_code\":\"RATE_LIMITED\""));
    assert_eq!(
        &close[..4],
        &[0x88, 14, 0x03, 0xf0],
        "then close 1008 'RATE_LIMITED'"
    );
    // Every other address is served as before.
    assert_eq!(
        get_chat(&app.http, &app, &app.api_key, &chat)
            .await
            .status(),
        200
    );
    app.ws(&app.api_key, "u", &chat)
        .await
        .until("connection_established")
        .await;
    let mut ws = Ws::open_from("127.0.0.4", app.ws_request(&app.api_key, "u", &chat)).await;
    ws.until("connection_established").await;

    // Wrong admin tokens count the same way.
    let operator = client_from("127.0.0.3");
    let tenants = app.admin_url("/admin/v1/tenants");
    for _ in 0..3 {
        let res = operator.get(&tenants).bearer_auth("wrong").send().await?;
        assert_eq!(res.status(), 401);
    }
    assert_throttled(operator.get(&tenants).bearer_auth(ADMIN).send().await?).await;
    assert_eq!(
        app.http
            .get(&tenants)
            .bearer_auth(ADMIN)
            .send()
            .await?
            .status(),
        200
    );
    Ok(())
}

#[tokio::test]
async fn forwarded_for_is_believed_from_trusted_proxies_only() -> TestResult {
    let behind_proxy = spawn_with(|c| {
        c.auth.failure_burst = 2;
        c.auth.trusted_proxies = "127.0.0.1, 10.0.0.0/8".into();
    })
    .await;
    let chat = behind_proxy.chat("u").await;
    let via_proxy = |client: &'static str, key: &str| {
        behind_proxy
            .http
            .get(behind_proxy.url(&format!("/api/v1/chats/{chat}")))
            .header("X-API-Key", key)
            .header("X-Forwarded-For", format!("{client}, 10.1.1.1"))
            .send()
    };
    for _ in 0..2 {
        assert_eq!(via_proxy("203.0.113.7", MADE_UP).await?.status(), 401);
    }
    assert_throttled(via_proxy("203.0.113.7", &behind_proxy.api_key).await?).await;
    assert_eq!(
        via_proxy("203.0.113.8", &behind_proxy.api_key)
            .await?
            .status(),
        200
    );

    // Without trusted proxies a forged header changes nothing: the peer's address counts.
    let direct = spawn_with(|c| c.auth.failure_burst = 2).await;
    let chat = direct.chat("u").await;
    let forger = client_from("127.0.0.5");
    for n in 0..3 {
        let res = forger
            .get(direct.url(&format!("/api/v1/chats/{chat}")))
            .header("X-API-Key", MADE_UP)
            .header("X-Forwarded-For", format!("198.51.100.{n}"))
            .send()
            .await?;
        if n < 2 {
            assert_eq!(res.status(), 401);
        } else {
            assert_throttled(res).await;
        }
    }
    Ok(())
}

/// Reads until the server closes the connection; the bytes it sent, or `None` past `limit`.
async fn read_to_close(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut got))
        .await
        .ok()
        .map(|_| got)
}

#[tokio::test]
async fn a_stalled_upgrade_is_dropped_after_the_handshake_timeout() -> TestResult {
    let app = spawn_with(|c| c.auth.handshake_timeout_secs = 1).await;
    let chat = app.chat("u").await;
    // Half a request head, then silence.
    let mut half = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await?;
    let head = format!(
        "GET /ws/chat?api_key={}&user_id=u&chat_id={chat} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
        app.api_key
    );
    half.write_all(head.as_bytes()).await?;
    // Nothing at all.
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", app.port)).await?;
    // Generous bounds for a shared machine; without the timeout both stay open for good.
    let limit = Duration::from_secs(8);
    assert!(
        read_to_close(&mut half, limit).await.is_some(),
        "half-sent upgrade still open"
    );
    assert!(
        read_to_close(&mut silent, limit).await.is_some(),
        "silent connection still open"
    );
    // Real clients are served meanwhile.
    app.ws(&app.api_key, "u", &chat)
        .await
        .until("connection_established")
        .await;
    Ok(())
}

/// A flood of upgrades with made-up keys from many tasks at other addresses, while a real
/// client connects again and again: each real handshake completes, and the flood is refused
/// (`AUTH_ERROR`, then `RATE_LIMITED` once its address is out of allowance).
#[tokio::test]
async fn a_flood_of_made_up_keys_does_not_hold_up_a_real_clients_handshake() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("u").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = tokio::task::JoinSet::new();
    for n in 0..16 {
        let req = app.ws_request(MADE_UP, "x", &chat);
        let stop = stop.clone();
        flood.spawn(async move {
            let mut refused = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let source = format!("127.0.1.{}", n + 1);
                let mut ws = Ws::open_from(&source, req.clone()).await;
                let (events, code, _) = ws.events_then_close().await;
                assert_eq!(code, 1008);
                refused.insert(events[0]["error_code"].as_str().unwrap().to_owned());
            }
            refused
        });
    }
    for _ in 0..30 {
        let started = std::time::Instant::now();
        let mut ws = app.ws(&app.api_key, "u", &chat).await;
        ws.until("connection_established").await;
        // Very loose (the machine is shared): a flood that queued real handshakes behind it
        // would take the whole handshake timeout (5 s).
        assert!(started.elapsed() < Duration::from_secs(4));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut codes = std::collections::BTreeSet::new();
    while let Some(refused) = flood.join_next().await {
        codes.extend(refused?);
    }
    assert!(codes.contains("RATE_LIMITED"), "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| c == "RATE_LIMITED" || c == "AUTH_ERROR"),
        "{codes:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_operator_api_can_listen_off_the_public_port() -> TestResult {
    let app = spawn_with(|c| c.admin_bind = Some("127.0.0.1:0".into())).await;
    assert_ne!(app.admin_port, app.port);
    let on_public = app
        .http
        .get(app.url("/admin/v1/tenants"))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    assert_eq!(on_public.status(), 404);
    assert_error(&body(on_public).await, "NOT_FOUND");
    let tenants = app.admin_tenants().await;
    assert!(
        !tenants["tenants"].as_array().unwrap().is_empty(),
        "{tenants}"
    );
    // The public API is where it was.
    let chat = app.chat("u").await;
    assert_eq!(
        app.get(&app.api_key, &format!("/api/v1/chats/{chat}"))
            .await
            .status(),
        200
    );
    let on_admin = app
        .http
        .get(app.admin_url(&format!("/api/v1/chats/{chat}")))
        .header("X-API-Key", &app.api_key)
        .send()
        .await?;
    assert_eq!(on_admin.status(), 404);
    Ok(())
}

#[tokio::test]
async fn an_admin_token_shorter_than_32_characters_is_refused_at_start() {
    let db = TestDb::new().await;
    let config = |token: &str| Config {
        bind: "127.0.0.1:0".into(),
        metrics_bind: "127.0.0.1:0".into(),
        database_url: db.url.clone(),
        admin_token: Some(token.into()),
        bootstrap_tenant: false,
        ..Config::default()
    };
    let Err(err) = Application::build(config("change-me")).await else {
        panic!("a 9-character admin token was accepted");
    };
    assert!(format!("{err:#}").contains("32 characters"), "{err:#}");
    // Empty keeps the admin API off, as unset does.
    let app = Application::build(config(""))
        .await
        .expect("empty token: admin off");
    drop(app);
}
