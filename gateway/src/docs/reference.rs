//! `GET /docs`: the API reference, rendered on the server from the OpenAPI document (no
//! script, nothing fetched): one section per tag, one card per operation (parameters, body,
//! responses with their headers), then every schema with its fields.

use std::fmt::Write;

use actix_web::HttpResponse;
use serde_json::{Map, Value};

/// The page, rendered once.
pub async fn page() -> HttpResponse {
    static PAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let html = PAGE.get_or_init(|| {
        let doc = serde_json::to_value(super::document()).unwrap_or(Value::Null);
        render(&doc)
    });
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(html.as_str())
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Inline `code` spans of a description.
fn prose(s: &str) -> String {
    esc(s)
        .split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                format!("<code>{part}</code>")
            } else {
                part.to_owned()
            }
        })
        .collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn render(doc: &Value) -> String {
    let mut out = String::with_capacity(64 * 1024);
    let info = &doc["info"];
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} API reference</title><link rel=\"icon\" href=\"data:,\"><style>{STYLE}</style></head><body>\
         <header><h1>{title} API reference <small>v{version}</small></h1><p>{description}</p>\
         <p><a href=\"/openapi.json\">openapi.json</a> · <a href=\"/playground\">Playground</a></p></header><main>",
        title = esc(str_of(info, "title")),
        version = esc(str_of(info, "version")),
        description = prose(str_of(info, "description")),
    );
    security_section(&mut out, &doc["components"]["securitySchemes"]);
    let tags = doc["tags"].as_array().cloned().unwrap_or_default();
    for tag in &tags {
        let name = str_of(tag, "name");
        let _ = write!(
            out,
            "<section id=\"tag-{n}\"><h2>{n}</h2><p>{d}</p>",
            n = esc(name),
            d = prose(str_of(tag, "description"))
        );
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in ["get", "post", "patch", "delete"] {
                let Some(op) = item.get(method) else { continue };
                let tagged = op["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|x| x == name));
                if tagged {
                    operation(&mut out, method, path, op);
                }
            }
        }
        out.push_str("</section>");
    }
    schemas_section(&mut out, &doc["components"]["schemas"]);
    out.push_str("</main></body></html>");
    out
}

fn security_section(out: &mut String, schemes: &Value) {
    out.push_str("<section id=\"auth\"><h2>Authentication</h2><dl>");
    for (name, scheme) in schemes.as_object().into_iter().flatten() {
        let how = match str_of(scheme, "type") {
            "apiKey" => format!("header <code>{}</code>", esc(str_of(scheme, "name"))),
            _ => "header <code>Authorization: Bearer …</code>".to_owned(),
        };
        let _ = write!(
            out,
            "<dt><code>{}</code> — {how}</dt><dd>{}</dd>",
            esc(name),
            prose(str_of(scheme, "description"))
        );
    }
    out.push_str("</dl></section>");
}

fn operation(out: &mut String, method: &str, path: &str, op: &Value) {
    let id = str_of(op, "operationId");
    let _ = write!(
        out,
        "<article class=\"op\" id=\"op-{id}\"><h3><span class=\"m {method}\">{M}</span> <code>{path}</code></h3><p class=\"summary\">{summary}</p>",
        id = esc(id),
        M = method.to_uppercase(),
        path = esc(path),
        summary = prose(str_of(op, "summary")),
    );
    if let Some(d) = op.get("description").and_then(Value::as_str) {
        let _ = write!(out, "<p>{}</p>", prose(d));
    }
    let auth: Vec<String> = op["security"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_object().and_then(|o| o.keys().next().cloned()))
        .map(|k| format!("<code>{}</code>", esc(&k)))
        .collect();
    if !auth.is_empty() {
        let _ = write!(
            out,
            "<p class=\"auth\">Authentication: {}</p>",
            auth.join(" or ")
        );
    }
    if let Some(params) = op["parameters"].as_array() {
        out.push_str("<h4>Parameters</h4><table><tr><th>name</th><th>in</th><th>type</th><th>description</th></tr>");
        for p in params {
            let _ = write!(
                out,
                "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(str_of(p, "name")),
                if p["required"] == true {
                    " <em>required</em>"
                } else {
                    ""
                },
                esc(str_of(p, "in")),
                type_of(&p["schema"]),
                prose(str_of(p, "description"))
            );
        }
        out.push_str("</table>");
    }
    if let Some(body) = op["requestBody"]["content"]["application/json"]["schema"].as_object() {
        let _ = write!(
            out,
            "<h4>Body</h4><p>{}</p>",
            type_of(&Value::Object(body.clone()))
        );
    }
    out.push_str(
        "<h4>Responses</h4><table><tr><th>status</th><th>body</th><th>description</th></tr>",
    );
    for (status, r) in op["responses"].as_object().into_iter().flatten() {
        let schema = &r["content"]["application/json"]["schema"];
        let headers: Vec<String> = r["headers"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(h, _)| format!("<code>{}</code>", esc(h)))
            .collect();
        let headers = if headers.is_empty() {
            String::new()
        } else {
            format!("<br><small>headers: {}</small>", headers.join(", "))
        };
        let _ = write!(
            out,
            "<tr><td class=\"s{}\">{}</td><td>{}</td><td>{}{headers}</td></tr>",
            &status[..1],
            esc(status),
            if schema.is_null() {
                "—".to_owned()
            } else {
                type_of(schema)
            },
            prose(str_of(r, "description"))
        );
    }
    out.push_str("</table></article>");
}

/// A schema's type in a few words, linking to named schemas.
fn type_of(schema: &Value) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("<a href=\"#schema-{n}\">{n}</a>", n = esc(name));
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            let parts: Vec<String> = alts.iter().map(type_of).collect();
            return parts.join(" | ");
        }
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        let vals: Vec<String> = values
            .iter()
            .map(|v| format!("<code>{}</code>", esc(&v.to_string())))
            .collect();
        return vals.join(" | ");
    }
    let ty = match &schema["type"] {
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" | "),
        _ => "any".to_owned(),
    };
    if ty.starts_with("array") {
        return format!("array of {}", type_of(&schema["items"]));
    }
    match schema.get("format").and_then(Value::as_str) {
        Some(f) => format!("{} ({})", esc(&ty), esc(f)),
        None => esc(&ty),
    }
}

fn schemas_section(out: &mut String, schemas: &Value) {
    out.push_str("<section id=\"schemas\"><h2>Schemas</h2>");
    for (name, schema) in schemas.as_object().into_iter().flatten() {
        let _ = write!(
            out,
            "<article class=\"schema\" id=\"schema-{n}\"><h3>{n}</h3><p>{d}</p>",
            n = esc(name),
            d = prose(str_of(schema, "description"))
        );
        fields(out, schema);
        out.push_str("</article>");
    }
    out.push_str("</section>");
}

fn fields(out: &mut String, schema: &Value) {
    let mut props = Map::new();
    let mut required: Vec<Value> = Vec::new();
    let parts = schema["allOf"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| vec![schema.clone()]);
    for part in &parts {
        if let Some(p) = part["properties"].as_object() {
            props.extend(p.clone());
        }
        required.extend(part["required"].as_array().cloned().unwrap_or_default());
        if part.get("$ref").is_some() {
            let _ = write!(out, "<p>All fields of {}, and:</p>", type_of(part));
        }
    }
    if props.is_empty() {
        let _ = write!(out, "<p>{}</p>", type_of(schema));
        return;
    }
    out.push_str("<table><tr><th>field</th><th>type</th><th>description</th></tr>");
    for (field, p) in &props {
        let req = required.iter().any(|r| r == field);
        let _ = write!(
            out,
            "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td></tr>",
            esc(field),
            if req { " <em>required</em>" } else { "" },
            type_of(p),
            prose(str_of(p, "description"))
        );
    }
    out.push_str("</table>");
}

const STYLE: &str = "\
:root{color-scheme:light dark;--fg:#1b1f24;--bg:#fff;--muted:#57606a;--line:#d0d7de;--card:#f6f8fa;--accent:#0969da}\
@media(prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--muted:#8d96a0;--line:#30363d;--card:#161b22;--accent:#4493f8}}\
body{margin:0;font:15px/1.5 system-ui,sans-serif;color:var(--fg);background:var(--bg)}\
header,main{max-width:980px;margin:0 auto;padding:0 20px}header{padding-top:24px}\
h1 small{font-size:.5em;color:var(--muted)}a{color:var(--accent)}\
code{font:13px ui-monospace,monospace;background:var(--card);padding:1px 4px;border-radius:4px}\
.op,.schema{border:1px solid var(--line);border-radius:8px;padding:4px 16px 12px;margin:16px 0;background:var(--bg)}\
.m{display:inline-block;min-width:64px;text-align:center;border-radius:4px;color:#fff;font-size:13px;padding:2px 6px}\
.get{background:#1f883d}.post{background:#0969da}.patch{background:#9a6700}.delete{background:#cf222e}\
table{border-collapse:collapse;width:100%;font-size:14px}th,td{border-top:1px solid var(--line);text-align:left;padding:6px 8px;vertical-align:top}\
.s2{color:#1f883d}.s4{color:#9a6700}.s5{color:#cf222e}.summary{font-weight:600}.auth{color:var(--muted)}";
