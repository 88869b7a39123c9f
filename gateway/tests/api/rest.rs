//! Every row of API.md's REST table, error shapes, pagination, isolation and rate limits.

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn create_chat_returns_the_documented_object_with_and_without_slash() -> TestResult {
    let app = spawn_app().await;
    let res = app
        .post_chat(
            &app.api_key,
            json!({"user_id": "u1", "title": "Billing", "metadata": {"plan": "pro"}}),
        )
        .await;
    assert_eq!(res.status(), 201);
    assert!(res.headers().contains_key("x-ratelimit-limit"));
    let chat = body(res).await;
    assert_eq!(chat["user_id"], "u1");
    assert_eq!(chat["tenant_id"], app.tenant_id.as_str());
    assert_eq!(chat["title"], "Billing");
    assert_eq!(chat["config"], json!({"metadata": {"plan": "pro"}}));
    assert!(chat["last_message_at"].is_null());
    assert!(
        chat["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    uuid::Uuid::parse_str(chat["id"].as_str().unwrap())?;

    let res = app
        .http
        .post(app.url("/api/v1/chats"))
        .header("X-API-Key", &app.api_key)
        .json(&json!({"user_id": "u1"}))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let chat = body(res).await;
    assert!(
        chat["title"].as_str().unwrap().starts_with("Chat 20"),
        "generated title: {chat}"
    );
    Ok(())
}

#[tokio::test]
async fn create_chat_refuses_bad_input_with_400_and_the_error_shape() -> TestResult {
    let app = spawn_app().await;
    let long = "x".repeat(129);
    for (bad, why) in [
        (json!({}), "user_id is required"),
        (json!({"user_id": 5}), "user_id must be a string"),
        (json!({"user_id": ""}), "user_id must not be empty"),
        (
            json!({"user_id": long}),
            "user_id must be at most 128 characters",
        ),
        (
            json!({"user_id": "a\u{0007}b"}),
            "user_id must not contain control characters",
        ),
        (
            json!({"user_id": "u", "metadata": [1]}),
            "metadata must be a JSON object",
        ),
        (
            json!({"user_id": "u", "title": 3}),
            "title must be a string",
        ),
        (json!([1, 2]), "Request body must be a JSON object"),
    ] {
        let res = app.post_chat(&app.api_key, bad.clone()).await;
        assert_eq!(res.status(), 400, "{bad}");
        let v = body(res).await;
        assert_error(&v, "INVALID_REQUEST");
        assert_eq!(v["error_message"], why);
    }
    let res = app
        .http
        .post(app.url("/api/v1/chats/"))
        .header("X-API-Key", &app.api_key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    assert_eq!(res.status(), 400);
    assert_error(&body(res).await, "INVALID_REQUEST");
    // Nothing was created by any of those.
    assert_eq!(
        app.get(&app.api_key, "/api/v1/chats/user/u").await.status(),
        404
    );
    Ok(())
}

#[tokio::test]
async fn keys_are_required_and_checked() -> TestResult {
    let app = spawn_app().await;
    let res = app.http.get(app.url("/api/v1/chats/user/u")).send().await?;
    assert_eq!(res.status(), 401);
    assert_error(&body(res).await, "AUTH_ERROR");
    let res = app.get("pk_wrong", "/api/v1/chats/user/u").await;
    assert_eq!(res.status(), 401);
    let v = body(res).await;
    assert_error(&v, "AUTH_ERROR");
    assert_eq!(v["error_message"], "Invalid API key");
    Ok(())
}

#[tokio::test]
async fn get_chat_adds_count_and_status_and_hides_other_tenants() -> TestResult {
    let app = spawn_app().await;
    let other = app.tenant_with(json!({})).await;
    let mine = app.chat("u1").await;
    let theirs = app.chat_as(&other, "u1").await;

    let v = body(
        app.get(&app.api_key, &format!("/api/v1/chats/{mine}"))
            .await,
    )
    .await;
    assert_eq!(v["message_count"], 0);
    // API.md §2: every chat that exists is "active"; whether sockets are open is open_sockets.
    assert_eq!(
        (v["status"].as_str(), v["open_sockets"].as_u64()),
        (Some("active"), Some(0))
    );

    for (key, chat) in [(&app.api_key, &theirs), (&other, &mine)] {
        for path in [
            format!("/api/v1/chats/{chat}"),
            format!("/api/v1/chats/{chat}/messages"),
        ] {
            let res = app.get(key, &path).await;
            assert_eq!(res.status(), 404, "{path}");
            assert_error(&body(res).await, "CHAT_NOT_FOUND");
        }
        assert_eq!(
            app.delete(key, &format!("/api/v1/chats/{chat}"))
                .await
                .status(),
            404
        );
    }
    // The other tenant's user list is separate too.
    let v = body(app.get(&other, "/api/v1/chats/user/u1").await).await;
    assert_eq!(v["total"], 1);
    assert_eq!(v["chats"][0]["id"], theirs.as_str());
    assert_eq!(
        app.get(&app.api_key, "/api/v1/chats/not-a-uuid")
            .await
            .status(),
        404
    );
    Ok(())
}

#[tokio::test]
async fn user_chats_paginate_and_order() -> TestResult {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.chat("pager").await);
    }
    let v = body(
        app.get(&app.api_key, "/api/v1/chats/user/pager?limit=2")
            .await,
    )
    .await;
    assert_eq!(
        (
            v["total"].as_i64(),
            v["offset"].as_i64(),
            v["limit"].as_i64()
        ),
        (Some(3), Some(0), Some(2))
    );
    assert_eq!(v["has_more"], true);
    assert_eq!(
        v["chats"][0]["id"],
        ids[2].as_str(),
        "newest first by default"
    );
    assert_eq!(v["chats"][0]["message_count"], 0);
    let v = body(
        app.get(&app.api_key, "/api/v1/chats/user/pager?offset=2&limit=2")
            .await,
    )
    .await;
    assert_eq!(v["chats"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["has_more"], false);
    let v = body(
        app.get(&app.api_key, "/api/v1/chats/user/pager?order=asc")
            .await,
    )
    .await;
    assert_eq!(v["chats"][0]["id"], ids[0].as_str());
    for bad in ["order=up", "limit=0", "limit=101", "offset=-1", "limit=x"] {
        let res = app
            .get(&app.api_key, &format!("/api/v1/chats/user/pager?{bad}"))
            .await;
        assert_eq!(res.status(), 400, "{bad}");
        assert_error(&body(res).await, "INVALID_REQUEST");
    }
    let res = app.get(&app.api_key, "/api/v1/chats/user/nobody").await;
    assert_eq!(res.status(), 404);
    assert_error(&body(res).await, "NOT_FOUND");
    Ok(())
}

#[tokio::test]
async fn hostile_user_ids_round_trip_verbatim() -> TestResult {
    let app = spawn_app().await;
    let hostile = "' OR 1=1 --";
    let id = app.chat(hostile).await;
    let v = body(
        app.get(
            &app.api_key,
            &format!("/api/v1/chats/user/{}", urlencode(hostile)),
        )
        .await,
    )
    .await;
    assert_eq!(v["total"], 1);
    assert_eq!(v["chats"][0]["user_id"], hostile);
    let mut ws = app.ws(&app.api_key, hostile, &id).await;
    assert_eq!(ws.next().await["user_id"], hostile);
    Ok(())
}

#[tokio::test]
async fn delete_removes_chat_and_messages_and_refuses_while_a_socket_is_open() -> TestResult {
    let app = spawn_app().await;
    let id = app.chat("u1").await;
    let mut ws = app.ws(&app.api_key, "u1", &id).await;
    ws.until("connection_established").await;
    ws.send_json(json!({"content": "hello"})).await;
    ws.until("message_stream_ended").await;

    let res = app
        .delete(&app.api_key, &format!("/api/v1/chats/{id}"))
        .await;
    assert_eq!(res.status(), 409);
    assert_error(&body(res).await, "CHAT_IN_USE");
    let v = body(app.get(&app.api_key, &format!("/api/v1/chats/{id}")).await).await;
    assert_eq!(
        (
            v["status"].as_str(),
            v["message_count"].as_i64(),
            v["open_sockets"].as_u64()
        ),
        (Some("active"), Some(2), Some(1))
    );

    ws.inner.close(None).await?;
    drop(ws);
    let mut status = 409;
    for _ in 0..50 {
        let res = app
            .delete(&app.api_key, &format!("/api/v1/chats/{id}"))
            .await;
        status = res.status().as_u16();
        if status == 200 {
            let v = body(res).await;
            assert_eq!(v["success"], true);
            assert_eq!(v["message"], "Chat deleted successfully");
            assert!(v["deleted_at"].is_string());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
    assert_eq!(
        app.get(&app.api_key, &format!("/api/v1/chats/{id}"))
            .await
            .status(),
        404
    );
    assert_eq!(
        app.get(&app.api_key, &format!("/api/v1/chats/{id}/messages"))
            .await
            .status(),
        404
    );
    Ok(())
}

#[tokio::test]
async fn messages_list_pages_and_validates() -> TestResult {
    let app = spawn_app().await;
    let id = app.chat("u1").await;
    let mut ws = app.ws(&app.api_key, "u1", &id).await;
    ws.send_json(json!({"content": "first", "metadata": {"k": "v"}}))
        .await;
    ws.until("message_stream_ended").await;
    let v = body(
        app.get(&app.api_key, &format!("/api/v1/chats/{id}/messages"))
            .await,
    )
    .await;
    assert_eq!(v["total"], 2);
    assert_eq!(v["has_more"], false);
    let first = &v["messages"][0];
    assert_eq!(first["content"], "first");
    assert_eq!(first["sender_role"], "user");
    assert_eq!(first["metadata"], json!({"k": "v"}));
    assert!(first["media_type"].is_null() && first["media_url"].is_null());
    assert!(first["id"].as_str().unwrap().starts_with("msg-"));
    let answer = &v["messages"][1];
    assert_eq!(answer["sender_role"], "assistant");
    assert_eq!(answer["metadata"]["model"], "parley-mock-1");
    assert_eq!(answer["metadata"]["tokens_used"], 24);
    let v = body(
        app.get(
            &app.api_key,
            &format!("/api/v1/chats/{id}/messages?order=desc&limit=1"),
        )
        .await,
    )
    .await;
    assert_eq!(v["messages"][0]["sender_role"], "assistant");
    assert_eq!(v["has_more"], true);
    for bad in ["limit=101", "order=sideways", "offset=x"] {
        let res = app
            .get(&app.api_key, &format!("/api/v1/chats/{id}/messages?{bad}"))
            .await;
        assert_eq!(res.status(), 400, "{bad}");
    }
    Ok(())
}

#[tokio::test]
async fn rest_rate_limit_refuses_with_429_and_headers() -> TestResult {
    let app = spawn_app().await;
    let key = app.tenant_with(json!({"requests_per_minute": 3})).await;
    for remaining in [2, 1, 0] {
        let res = app.get(&key, "/api/v1/chats/user/none").await;
        assert_eq!(res.status(), 404);
        assert_eq!(res.headers()["x-ratelimit-limit"], "3");
        assert_eq!(
            res.headers()["x-ratelimit-remaining"],
            remaining.to_string().as_str()
        );
    }
    let res = app.get(&key, "/api/v1/chats/user/none").await;
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=60).contains(&retry));
    assert!(res.headers().contains_key("x-ratelimit-reset"));
    assert_error(&body(res).await, "RATE_LIMITED");
    // Another tenant is not affected.
    assert_eq!(
        app.get(&app.api_key, "/api/v1/chats/user/none")
            .await
            .status(),
        404
    );
    Ok(())
}

#[tokio::test]
async fn unknown_routes_are_404_in_the_error_shape_and_health_answers() -> TestResult {
    let app = spawn_app().await;
    let res = app.http.get(app.url("/nope")).send().await?;
    assert_eq!(res.status(), 404);
    assert_error(&body(res).await, "NOT_FOUND");
    assert_eq!(
        app.http.get(app.url("/healthz")).send().await?.status(),
        200
    );
    let v = body(app.http.get(app.url("/readyz")).send().await?).await;
    assert_eq!(v["status"], "ready");
    Ok(())
}

#[tokio::test]
async fn chats_and_messages_survive_a_restart() -> TestResult {
    let db = TestDb::new().await;
    let app = start(&db.url, |_| {}).await;
    let id = app.chat("u1").await;
    let mut ws = app.ws(&app.api_key, "u1", &id).await;
    ws.send_json(json!({"content": "remember me"})).await;
    let ended = ws.until("message_stream_ended").await;
    let answer = ended.last().unwrap()["content"].clone();
    drop(ws);
    let key = app.api_key.clone();
    app.stop().await;

    let again = start(&db.url, |_| {}).await;
    let v = body(
        again
            .get(&key, &format!("/api/v1/chats/{id}/messages"))
            .await,
    )
    .await;
    assert_eq!(v["total"], 2);
    assert_eq!(v["messages"][0]["content"], "remember me");
    assert_eq!(v["messages"][1]["content"], answer);
    Ok(())
}

#[tokio::test]
async fn a_message_unanswered_at_shutdown_is_answered_after_the_restart() -> TestResult {
    let db = TestDb::new().await;
    let app = start(&db.url, |_| {}).await;
    let key = app
        .tenant_with(json!({"agent": {"options": {"first_token_delay_ms": 60_000}}}))
        .await;
    let id = app.chat_as(&key, "u1").await;
    let mut ws = app.ws(&key, "u1", &id).await;
    ws.send_json(json!({"content": "answer me later"})).await;
    ws.until("message_stream_started").await;
    drop(ws);
    app.stop().await;

    let again = start(&db.url, |_| {}).await;
    let tenant: Value = again
        .http
        .get(again.url("/admin/v1/tenants"))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?;
    let tenant_id = tenant["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str().is_some_and(|n| n.starts_with("custom-")))
        .unwrap()["id"]
        .clone();
    // The first attempt after the restart still waits a minute; speed it up and restart again.
    let res = again
        .http
        .patch(again.url(&format!(
            "/admin/v1/tenants/{}",
            tenant_id.as_str().unwrap()
        )))
        .bearer_auth(ADMIN)
        .json(&json!({"settings": {"agent": {"options": {"first_token_delay_ms": 0}}}}))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    again.stop().await;
    let third = start(&db.url, |_| {}).await;
    let mut total = 0usize;
    for _ in 0..100 {
        let v = body(
            third
                .get(&key, &format!("/api/v1/chats/{id}/messages"))
                .await,
        )
        .await;
        total = v["messages"].as_array().map_or(0, Vec::len);
        if total == 2 {
            assert_eq!(v["messages"][1]["sender_role"], "assistant");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        total, 2,
        "the message was answered exactly once after the restart"
    );
    Ok(())
}
