//! Client tokens (API.md §6) and browsers as clients (CORS, the WebSocket's `Origin`), driven
//! as a tenant's backend and a browser page would.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::*;

/// `POST /api/v1/tokens` with `key`.
async fn mint_raw(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.http
        .post(app.url("/api/v1/tokens"))
        .header("X-API-Key", key)
        .json(&body)
        .send()
        .await
        .expect("request")
}

/// A token for `body`, checked to be 201 with the documented fields.
async fn mint(app: &TestApp, key: &str, body: Value) -> String {
    let res = mint_raw(app, key, body.clone()).await;
    assert_eq!(res.status(), 201);
    let minted = self::body(res).await;
    assert_eq!(minted["user_id"], body["user_id"], "{minted}");
    assert_eq!(
        minted["chat_id"],
        body.get("chat_id").cloned().unwrap_or(Value::Null)
    );
    assert!(
        minted["expires_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{minted}"
    );
    minted["token"].as_str().expect("token").to_owned()
}

/// A socket opened with `token` (and the given extra query, e.g. `&chat_id=...`).
async fn ws_token(app: &TestApp, token: &str, extra: &str) -> Ws {
    let url = format!("ws://127.0.0.1:{}/ws/chat?token={token}{extra}", app.port);
    Ws::open(url.into_client_request().expect("request")).await
}

/// The socket is refused with `AUTH_ERROR` (close 1008); returns the error's message.
async fn refused(mut ws: Ws) -> String {
    let (events, code, reason) = ws.events_then_close().await;
    assert_eq!((code, reason.as_str()), (1008, "AUTH_ERROR"), "{events:?}");
    let error = events.last().expect("an error event");
    assert_error(error, "AUTH_ERROR");
    error["error_message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `GET path` with `Authorization: Bearer token`.
async fn get_bearer(app: &TestApp, token: &str, path: &str) -> reqwest::Response {
    app.http
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn a_minted_token_opens_its_users_socket_by_query_or_header_and_is_answered() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("alice").await;
    let token = mint(&app, &app.api_key, json!({"user_id": "alice"})).await;

    let mut ws = ws_token(&app, &token, &format!("&chat_id={chat}")).await;
    let hello = ws.until("connection_established").await;
    let hello = hello.last().expect("established");
    assert_eq!(hello["user_id"], "alice");
    assert_eq!(hello["tenant_id"], app.tenant_id.as_str());
    ws.send_json(json!({"content": "hi from a browser"})).await;
    let events = ws.until("message_stream_ended").await;
    let ended = events.last().expect("ended");
    assert_eq!(ended["user_id"], "alice");
    assert_eq!(
        tokens_of(&events),
        ended["content"].as_str().expect("content")
    );

    // The header form, with the user named too (the token's own: allowed).
    let url = format!(
        "ws://127.0.0.1:{}/ws/chat?chat_id={chat}&user_id=alice",
        app.port
    );
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse()?);
    let mut by_header = Ws::open(req).await;
    by_header.until("connection_established").await;

    // A user_id other than the token's is refused, not silently replaced.
    let other = ws_token(&app, &token, &format!("&chat_id={chat}&user_id=mallory")).await;
    assert!(refused(other).await.contains("alice"));
    Ok(())
}

#[tokio::test]
async fn a_token_opens_only_its_chat_or_its_users_chats() -> TestResult {
    let app = spawn_app().await;
    let alices = app.chat("alice").await;
    let bobs = app.chat("bob").await;

    // Bound to Bob's chat (the backend chose to let Alice in): that chat only, chat_id optional.
    let bound = mint(
        &app,
        &app.api_key,
        json!({"user_id": "alice", "chat_id": bobs}),
    )
    .await;
    let mut ws = ws_token(&app, &bound, "").await;
    let hello = ws.until("connection_established").await;
    assert_eq!(hello.last().expect("established")["chat_id"], bobs.as_str());
    refused(ws_token(&app, &bound, &format!("&chat_id={alices}")).await).await;

    // Unbound: Alice's own chats, not Bob's; a chat is needed.
    let unbound = mint(&app, &app.api_key, json!({"user_id": "alice"})).await;
    ws_token(&app, &unbound, &format!("&chat_id={alices}"))
        .await
        .until("connection_established")
        .await;
    refused(ws_token(&app, &unbound, &format!("&chat_id={bobs}")).await).await;
    let message = refused(ws_token(&app, &unbound, "").await).await;
    assert!(message.contains("chat_id"), "{message}");
    Ok(())
}

#[tokio::test]
async fn expired_tampered_and_foreign_tokens_are_refused() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("alice").await;
    let short = mint(
        &app,
        &app.api_key,
        json!({"user_id": "alice", "ttl_seconds": 1}),
    )
    .await;

    // Tampered: the payload changed to another user, the signature kept.
    let token = mint(&app, &app.api_key, json!({"user_id": "alice"})).await;
    let parts: Vec<&str> = token.split('.').collect();
    let forged_claims =
        json!({"sub": "bob", "iat": 0, "exp": 4_000_000_000u64, "aud": "parley-client"});
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(forged_claims.to_string().as_bytes()),
        parts[2]
    );
    let message = refused(ws_token(&app, &tampered, &format!("&chat_id={chat}")).await).await;
    assert_eq!(message, "Invalid or expired token");

    // Signed with another tenant's secret (as its own would be derived: the documented
    // HMAC of its key hash under the default pepper), naming this tenant.
    let other_key = app.tenant_with(json!({})).await;
    let other_secret = jsonwebtoken::crypto::sign(
        hex(&Sha256::digest(other_key.as_bytes())).as_bytes(),
        &EncodingKey::from_secret(b"parley client tokens v1")?,
        Algorithm::HS256,
    )?;
    let header = Header {
        kid: Some(app.tenant_id.clone()),
        ..Header::new(Algorithm::HS256)
    };
    let claims = json!({"sub": "alice", "iat": 0, "exp": 4_000_000_000u64, "aud": "parley-client"});
    let foreign = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(other_secret.as_bytes())?,
    )?;
    refused(ws_token(&app, &foreign, &format!("&chat_id={chat}")).await).await;
    // The same claims under the other tenant's own id are a valid token of that tenant: the
    // derivation is the one documented, and the refusal above was the signature's.
    let own = jsonwebtoken::encode(
        &Header {
            kid: Some(other_tenant_id(&app, &other_key).await),
            ..Header::new(Algorithm::HS256)
        },
        &claims,
        &EncodingKey::from_secret(other_secret.as_bytes())?,
    )?;
    let res = get_bearer(&app, &own, "/api/v1/chats/user/alice").await;
    assert_eq!(res.status(), 404, "a valid token of a tenant with no chats");

    refused(ws_token(&app, "not-a-jwt", &format!("&chat_id={chat}")).await).await;
    let res = get_bearer(&app, &tampered, &format!("/api/v1/chats/{chat}")).await;
    assert_eq!(res.status(), 401);
    assert_error(&body(res).await, "AUTH_ERROR");

    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let message = refused(ws_token(&app, &short, &format!("&chat_id={chat}")).await).await;
    assert_eq!(message, "Invalid or expired token");
    assert_eq!(
        get_bearer(&app, &short, &format!("/api/v1/chats/{chat}"))
            .await
            .status(),
        401
    );
    Ok(())
}

/// The id of the tenant whose key is `key` (from its chats' `tenant_id`).
async fn other_tenant_id(app: &TestApp, key: &str) -> String {
    let chat = app.chat_as(key, "carol").await;
    let got = body(app.get(key, &format!("/api/v1/chats/{chat}")).await).await;
    app.delete(key, &format!("/api/v1/chats/{chat}")).await;
    got["tenant_id"].as_str().expect("tenant id").to_owned()
}

fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn gateways_with_the_same_token_secret_accept_each_others_tokens_and_others_do_not()
-> TestResult {
    let a = spawn_with(|c| c.auth.token_secret = "pepper-one-0123456789".into()).await;
    let same = start(&a.db_url, |c| {
        c.auth.token_secret = "pepper-one-0123456789".into()
    })
    .await;
    let other = start(&a.db_url, |c| {
        c.auth.token_secret = "pepper-two-0123456789".into()
    })
    .await;
    let chat = a.chat("alice").await;
    let token = mint(&a, &a.api_key, json!({"user_id": "alice"})).await;
    let path = format!("/api/v1/chats/{chat}");
    assert_eq!(get_bearer(&same, &token, &path).await.status(), 200);
    assert_eq!(get_bearer(&other, &token, &path).await.status(), 401);
    // Without a pepper of its own, a gateway refuses tokens minted under one.
    assert_eq!(
        get_bearer(&start(&a.db_url, |_| {}).await, &token, &path)
            .await
            .status(),
        401
    );
    same.stop().await;
    other.stop().await;
    Ok(())
}

#[tokio::test]
async fn rotating_the_key_revokes_its_tokens_and_closes_their_sockets() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("alice").await;
    let token = mint(&app, &app.api_key, json!({"user_id": "alice"})).await;
    let mut open = ws_token(&app, &token, &format!("&chat_id={chat}")).await;
    open.until("connection_established").await;

    let res = app
        .http
        .post(app.admin_url(&format!("/admin/v1/tenants/{}/rotate-key", app.tenant_id)))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    let (events, code, _) = open.events_then_close().await;
    assert_eq!(code, 1008, "{events:?}");
    refused(ws_token(&app, &token, &format!("&chat_id={chat}")).await).await;
    assert_eq!(
        get_bearer(&app, &token, &format!("/api/v1/chats/{chat}"))
            .await
            .status(),
        401
    );
    Ok(())
}

#[tokio::test]
async fn a_token_reads_its_users_chats_and_writes_nothing() -> TestResult {
    let app = spawn_app().await;
    let alices = app.chat("alice").await;
    let bobs = app.chat("bob").await;
    let token = mint(&app, &app.api_key, json!({"user_id": "alice"})).await;

    let res = get_bearer(&app, &token, "/api/v1/chats/user/alice").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-ratelimit-remaining"));
    assert_eq!(body(res).await["total"], 1);
    assert_eq!(
        get_bearer(&app, &token, &format!("/api/v1/chats/{alices}"))
            .await
            .status(),
        200
    );
    let page = get_bearer(&app, &token, &format!("/api/v1/chats/{alices}/messages")).await;
    assert_eq!(page.status(), 200);

    // Bob's chat is as absent as another tenant's; Bob's list is out of the token's scope.
    let res = get_bearer(&app, &token, &format!("/api/v1/chats/{bobs}")).await;
    assert_eq!(res.status(), 404);
    assert_error(&body(res).await, "CHAT_NOT_FOUND");
    let res = get_bearer(&app, &token, &format!("/api/v1/chats/{bobs}/messages")).await;
    assert_eq!(res.status(), 404);
    let res = get_bearer(&app, &token, "/api/v1/chats/user/bob").await;
    assert_eq!(res.status(), 403);
    assert_error(&body(res).await, "AUTH_ERROR");

    // Every write needs the key.
    let writes = [
        app.http
            .post(app.url("/api/v1/chats/"))
            .json(&json!({"user_id": "alice"})),
        app.http.delete(app.url(&format!("/api/v1/chats/{alices}"))),
        app.http
            .post(app.url("/api/v1/tokens"))
            .json(&json!({"user_id": "alice"})),
    ];
    for write in writes {
        let res = write.bearer_auth(&token).send().await?;
        assert_eq!(res.status(), 401);
        let error = body(res).await;
        assert_error(&error, "AUTH_ERROR");
        assert!(
            error["error_message"]
                .as_str()
                .is_some_and(|m| m.contains("X-API-Key"))
        );
    }
    assert_eq!(
        app.get(&app.api_key, &format!("/api/v1/chats/{alices}"))
            .await
            .status(),
        200
    );
    Ok(())
}

#[tokio::test]
async fn bad_token_requests_are_400_or_404_and_need_the_key() -> TestResult {
    let app = spawn_app().await;
    let other_key = app.tenant_with(json!({})).await;
    let foreign_chat = app.chat_as(&other_key, "alice").await;
    for bad in [
        json!({}),
        json!({"user_id": ""}),
        json!({"user_id": "a\u{0}b"}),
        json!({"user_id": "alice", "ttl_seconds": 0}),
        json!({"user_id": "alice", "ttl_seconds": 86_401}),
        json!({"user_id": "alice", "ttl": 60}),
        json!({"user_id": 7}),
    ] {
        let res = mint_raw(&app, &app.api_key, bad.clone()).await;
        assert_eq!(res.status(), 400, "{bad}");
        assert_error(&body(res).await, "INVALID_REQUEST");
    }
    let res = mint_raw(
        &app,
        &app.api_key,
        json!({"user_id": "alice", "chat_id": foreign_chat}),
    )
    .await;
    assert_eq!(res.status(), 404);
    assert_error(&body(res).await, "CHAT_NOT_FOUND");
    let res = mint_raw(&app, "pk_wrong", json!({"user_id": "alice"})).await;
    assert_eq!(res.status(), 401);
    let long = mint(
        &app,
        &app.api_key,
        json!({"user_id": "alice", "ttl_seconds": 86_400}),
    )
    .await;
    assert!(!long.is_empty());
    Ok(())
}

const ALLOWED: &str = "https://app.example.com";
const REFUSED: &str = "https://evil.example.net";

#[tokio::test]
async fn cors_answers_preflights_for_allowed_origins_before_authentication() -> TestResult {
    let app = spawn_app().await;
    let key = app.tenant_with(json!({"allowed_origins": [ALLOWED]})).await;
    let preflight = |origin: &str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/api/v1/chats/"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "x-api-key, content-type")
            .send()
    };
    let res = preflight(ALLOWED).await?;
    assert_eq!(res.status(), 204);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], ALLOWED);
    assert!(h["access-control-allow-methods"].to_str()?.contains("POST"));
    assert!(
        h["access-control-allow-headers"]
            .to_str()?
            .contains("x-api-key")
    );
    assert!(
        h["access-control-allow-headers"]
            .to_str()?
            .contains("authorization")
    );
    let res = preflight(REFUSED).await?;
    assert_eq!(res.status(), 403);
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    assert_error(&body(res).await, "AUTH_ERROR");

    // Actual requests: the headers for the tenant's origin, none for another.
    let res = app
        .http
        .post(app.url("/api/v1/chats/"))
        .header("X-API-Key", &key)
        .header("Origin", ALLOWED)
        .json(&json!({"user_id": "web"}))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["access-control-allow-origin"], ALLOWED);
    assert!(
        res.headers()["access-control-expose-headers"]
            .to_str()?
            .contains("x-ratelimit-remaining")
    );
    let res = app
        .http
        .get(app.url("/api/v1/chats/user/web"))
        .header("X-API-Key", &key)
        .header("Origin", REFUSED)
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    // A tenant that lists no origin gets no CORS headers, even for an origin another allows.
    let res = app
        .http
        .get(app.url("/api/v1/chats/user/web"))
        .header("X-API-Key", &app.api_key)
        .header("Origin", ALLOWED)
        .send()
        .await?;
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    // A bad key from an allowed origin: the page can read the 401.
    let res = app
        .http
        .get(app.url("/api/v1/chats/user/web"))
        .header("X-API-Key", "pk_nope")
        .header("Origin", ALLOWED)
        .send()
        .await?;
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["access-control-allow-origin"], ALLOWED);

    let res = app
        .http
        .patch(app.admin_url(&format!("/admin/v1/tenants/{}", app.tenant_id)))
        .bearer_auth(ADMIN)
        .json(&json!({"settings": {"allowed_origins": ["https://app.example.com/app"]}}))
        .send()
        .await?;
    assert_eq!(res.status(), 400, "an origin with a path");
    // Origins are saved as browsers send them.
    let res = app
        .http
        .patch(app.admin_url(&format!("/admin/v1/tenants/{}", app.tenant_id)))
        .bearer_auth(ADMIN)
        .json(&json!({"settings": {"allowed_origins": ["HTTPS://App.Example.com:443/"]}}))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    assert_eq!(
        body(res).await["settings"]["allowed_origins"],
        json!([ALLOWED])
    );
    Ok(())
}

#[tokio::test]
async fn a_socket_from_an_origin_the_tenant_does_not_allow_is_refused() -> TestResult {
    let app = spawn_app().await;
    let key = app.tenant_with(json!({"allowed_origins": [ALLOWED]})).await;
    let chat = app.chat_as(&key, "web").await;
    let from = |origin: Option<&str>| {
        let mut req = app.ws_request(&key, "web", &chat);
        if let Some(o) = origin {
            req.headers_mut()
                .insert("Origin", o.parse().expect("origin"));
        }
        Ws::open(req)
    };
    let message = refused(from(Some(REFUSED)).await).await;
    assert!(message.contains(REFUSED), "{message}");
    from(Some(ALLOWED))
        .await
        .until("connection_established")
        .await;
    from(None).await.until("connection_established").await;
    // The gateway's own pages (the playground) are allowed: Origin names the Host.
    let own = format!("http://127.0.0.1:{}", app.port);
    from(Some(&own)).await.until("connection_established").await;
    // A tenant with no list takes any origin.
    let open_chat = app.chat("web").await;
    let mut req = app.ws_request(&app.api_key, "web", &open_chat);
    req.headers_mut().insert("Origin", REFUSED.parse()?);
    Ws::open(req).await.until("connection_established").await;
    Ok(())
}
