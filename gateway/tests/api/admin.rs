//! The operator API (API.md §3) and the command line.

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn the_admin_api_is_off_without_a_token_and_guarded_with_one() -> TestResult {
    let off = spawn_with(|c| c.admin_token = None).await;
    let res = off
        .http
        .post(off.url("/admin/v1/tenants"))
        .json(&json!({"name": "x"}))
        .send()
        .await?;
    assert_eq!(res.status(), 404);
    let app = spawn_app().await;
    let res = app.http.get(app.url("/admin/v1/tenants")).send().await?;
    assert_eq!(res.status(), 401);
    let res = app
        .http
        .get(app.url("/admin/v1/tenants"))
        .bearer_auth("wrong")
        .send()
        .await?;
    assert_eq!(res.status(), 401);
    let v: Value = res.json().await?;
    assert_eq!(v["error_code"], "UNAUTHORIZED");
    Ok(())
}

#[tokio::test]
async fn tenants_can_be_created_listed_changed_rotated_and_deleted() -> TestResult {
    let app = spawn_app().await;
    let created = app
        .create_tenant(json!({"name": "acme", "settings": {"max_connections": 7}}))
        .await;
    let id = created["id"].as_str().unwrap();
    let key = created["api_key"].as_str().unwrap().to_owned();
    assert_eq!(created["settings"]["max_connections"], 7);
    assert_eq!(created["settings"]["messages_per_second"], 10);
    assert!(created["created_at"].is_string());

    let list = app.admin_tenants().await;
    let names: Vec<&str> = list["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"acme"));
    assert!(
        list["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.get("api_key").is_none())
    );

    let url = app.url(&format!("/admin/v1/tenants/{id}"));
    let got: Value = app
        .http
        .get(&url)
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(got["name"], "acme");
    assert!(got.get("api_key").is_none());

    let patched: Value = app
        .http
        .patch(&url)
        .bearer_auth(ADMIN)
        .json(&json!({"name": "acme2", "settings": {"agent": {"model": "m2"}}}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(patched["name"], "acme2");
    assert_eq!(patched["settings"]["agent"]["model"], "m2");
    assert_eq!(
        patched["settings"]["max_connections"], 7,
        "unmentioned settings are kept"
    );

    let bad = app
        .http
        .patch(&url)
        .bearer_auth(ADMIN)
        .json(&json!({"settings": {"max_connections": "many"}}))
        .send()
        .await?;
    assert_eq!(bad.status(), 400);
    let bad = app
        .http
        .patch(&url)
        .bearer_auth(ADMIN)
        .json(&json!({"settings": {"typo": 1}}))
        .send()
        .await?;
    assert_eq!(bad.status(), 400);
    let bad = app
        .http
        .post(app.url("/admin/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(bad.status(), 400);

    assert_eq!(app.get(&key, "/api/v1/chats/user/x").await.status(), 404);
    let rotated: Value = app
        .http
        .post(app.url(&format!("/admin/v1/tenants/{id}/rotate-key")))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .json()
        .await?;
    let new_key = rotated["api_key"].as_str().unwrap();
    assert_ne!(new_key, key);
    assert_eq!(app.get(&key, "/api/v1/chats/user/x").await.status(), 401);
    assert_eq!(app.get(new_key, "/api/v1/chats/user/x").await.status(), 404);

    let res = app.http.delete(&url).bearer_auth(ADMIN).send().await?;
    assert_eq!(res.status(), 200);
    assert_eq!(app.get(new_key, "/api/v1/chats/user/x").await.status(), 401);
    assert_eq!(
        app.http.get(&url).bearer_auth(ADMIN).send().await?.status(),
        404
    );
    Ok(())
}

#[tokio::test]
async fn the_cli_creates_a_tenant_the_server_accepts() -> TestResult {
    let app = spawn_app().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "tenant",
            "create",
            "--name",
            "cli-co",
            "--settings",
            r#"{"max_connections": 3}"#,
        ])
        .env("PARLEY_DATABASE_URL", &app.db_url)
        .env("PARLEY_LOG", "error")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tenant: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(tenant["name"], "cli-co");
    assert_eq!(tenant["settings"]["max_connections"], 3);
    let key = tenant["api_key"].as_str().unwrap();
    assert_eq!(
        app.post_chat(key, json!({"user_id": "u"})).await.status(),
        201
    );
    Ok(())
}

#[tokio::test]
async fn tenant_names_are_unique_on_the_admin_api_and_the_cli() -> TestResult {
    let app = spawn_app().await;
    app.create_tenant(json!({"name": "acme"})).await;
    let other = app.create_tenant(json!({"name": "other"})).await;
    let res = app
        .http
        .post(app.url("/admin/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": " acme "}))
        .send()
        .await?;
    assert_eq!(res.status(), 409);
    let v = body(res).await;
    assert_error(&v, "NAME_TAKEN");
    assert!(v["error_message"].as_str().unwrap().contains("acme"), "{v}");
    let rename = app
        .http
        .patch(app.url(&format!(
            "/admin/v1/tenants/{}",
            other["id"].as_str().unwrap()
        )))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "acme"}))
        .send()
        .await?;
    assert_eq!(rename.status(), 409);
    assert_error(&body(rename).await, "NAME_TAKEN");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["tenant", "create", "--name", "acme"])
        .env("PARLEY_DATABASE_URL", &app.db_url)
        .env("PARLEY_LOG", "error")
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("A tenant named 'acme' already exists"),
        "{stderr}"
    );

    // Nothing changed: one acme, and `other` kept its name.
    let names: Vec<String> = app.admin_tenants().await["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.iter().filter(|n| *n == "acme").count(), 1);
    assert!(names.contains(&"other".to_owned()));
    Ok(())
}
