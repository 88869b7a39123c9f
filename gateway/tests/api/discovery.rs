//! Discovery (API.md §7): the OpenAPI document agrees with the routes the gateway serves, and
//! the reference page and the playground are served by the gateway itself.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::*;

/// Every REST operation of API.md §2, §3 and §6.
const OPERATIONS: [(&str, &str); 13] = [
    ("post", "/api/v1/chats/"),
    ("get", "/api/v1/chats/user/{user_id}"),
    ("get", "/api/v1/chats/{chat_id}"),
    ("get", "/api/v1/chats/{chat_id}/messages"),
    ("delete", "/api/v1/chats/{chat_id}"),
    ("post", "/api/v1/tokens"),
    ("post", "/admin/v1/tenants"),
    ("get", "/admin/v1/tenants"),
    ("get", "/admin/v1/tenants/{id}"),
    ("patch", "/admin/v1/tenants/{id}"),
    ("post", "/admin/v1/tenants/{id}/rotate-key"),
    ("delete", "/admin/v1/tenants/{id}"),
    ("get", "/admin/v1/tenants/{id}/usage"),
];

async fn document(app: &TestApp) -> Value {
    let res = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 200);
    body(res).await
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            ops.insert((method.clone(), path.clone()));
        }
    }
    ops
}

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_rest_operations_and_each_is_routed() -> TestResult {
    let app = spawn_app().await;
    let doc = document(&app).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let expected: BTreeSet<(String, String)> = OPERATIONS
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented(&doc), expected);

    // Each documented operation reaches a handler: without credentials it is refused with 401,
    // where a path the gateway does not route would be 404 "No route".
    for (method, path) in &expected {
        let concrete = path
            .replace("{user_id}", "someone")
            .replace("{chat_id}", &uuid::Uuid::new_v4().to_string())
            .replace("{id}", &uuid::Uuid::new_v4().to_string());
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())?;
        let res = app
            .http
            .request(method.clone(), app.url(&concrete))
            .json(&serde_json::json!({}))
            .send()
            .await?;
        assert_eq!(res.status(), 401, "{method} {concrete}");
        let op = &doc["paths"][path.as_str()][method.as_str().to_lowercase()];
        assert!(
            op["responses"]["401"].is_object(),
            "{method} {path}: 401 documented"
        );
        assert!(
            op["security"].as_array().is_some_and(|s| !s.is_empty()),
            "{method} {path}"
        );
        if path.starts_with("/api/") {
            let ok = op["responses"]
                .as_object()
                .and_then(|r| r.iter().find(|(s, _)| s.starts_with('2')))
                .map(|(_, r)| r)
                .expect("a success response");
            for header in [
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
            ] {
                assert!(
                    ok["headers"][header].is_object(),
                    "{method} {path}: {header}"
                );
            }
            assert!(op["responses"]["429"]["headers"]["Retry-After"].is_object());
        }
    }
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["api_key"]["name"], "X-API-Key");
    assert_eq!(schemes["client_token"]["scheme"], "bearer");
    assert_eq!(schemes["admin_token"]["scheme"], "bearer");
    let error = &doc["components"]["schemas"]["ErrorBody"]["properties"];
    for field in ["error_code", "error_message", "details"] {
        assert!(error[field].is_object(), "ErrorBody.{field}");
    }
    Ok(())
}

#[tokio::test]
async fn the_reference_page_shows_every_operation_and_schema() -> TestResult {
    let app = spawn_app().await;
    let doc = document(&app).await;
    let res = app.http.get(app.url("/docs")).send().await?;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()?
            .starts_with("text/html")
    );
    let html = res.text().await?;
    for (_, path) in OPERATIONS {
        assert!(html.contains(&format!("<code>{path}</code>")), "{path}");
    }
    for name in doc["components"]["schemas"]
        .as_object()
        .expect("schemas")
        .keys()
    {
        assert!(html.contains(&format!("id=\"schema-{name}\"")), "{name}");
    }
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(
            !html.contains(external),
            "nothing fetched from elsewhere: {external}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_playground_is_one_page_that_loads_nothing_from_elsewhere() -> TestResult {
    let app = spawn_app().await;
    let res = app.http.get(app.url("/playground")).send().await?;
    assert_eq!(res.status(), 200);
    let csp = res.headers()["content-security-policy"]
        .to_str()?
        .to_owned();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let html = res.text().await?;
    assert!(html.contains("<title>Parley playground</title>"));
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    Ok(())
}

#[tokio::test]
async fn a_usage_range_that_ends_before_it_starts_is_400() -> TestResult {
    // The one rule of the document that OpenAPI cannot state (scripts/schemathesis.toml).
    let app = spawn_app().await;
    let res = app
        .http
        .get(app.admin_url(&format!(
            "/admin/v1/tenants/{}/usage?from=2026-12-02&to=2026-12-01",
            app.tenant_id
        )))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    assert_eq!(res.status(), 400);
    assert_error(&body(res).await, "INVALID_REQUEST");
    Ok(())
}
