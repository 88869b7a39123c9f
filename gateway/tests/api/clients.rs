//! The seed document's Python and JavaScript clients, unmodified, against the app.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

use crate::helpers::*;

fn harness(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

async fn messages(app: &TestApp, chat: &str) -> Value {
    app.get(&app.api_key, &format!("/api/v1/chats/{chat}/messages"))
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_seed_python_client_converses() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("user123").await;
    let port = app.port.to_string();
    let out = tokio::task::spawn_blocking({
        let args = [
            harness("run_seed_python.py").display().to_string(),
            port,
            app.api_key.clone(),
            "user123".into(),
            chat.clone(),
        ];
        move || Command::new("python3").args(args).output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = messages(&app, &chat).await;
    assert!(stdout.contains("Connection established"), "{stdout}");
    assert!(
        stdout.contains("Message received: Hello, I need help!"),
        "{stdout}"
    );
    let answer = saved["messages"][1]["content"].as_str().unwrap();
    assert!(
        stdout.contains(&format!("AI response complete: {answer}")),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test]
async fn the_seed_javascript_client_converses() -> TestResult {
    let app = spawn_app().await;
    let chat = app.chat("user123").await;
    let port = app.port.to_string();
    let out = tokio::task::spawn_blocking({
        let args = [
            harness("run_seed_js.js").display().to_string(),
            port,
            app.api_key.clone(),
            "user123".into(),
            chat.clone(),
        ];
        move || {
            // Node 20 and 21 need the flag for the global WebSocket; later versions have it by default.
            let flagged = Command::new("node")
                .arg("--experimental-websocket")
                .args(&args)
                .output()?;
            let bad_flag = String::from_utf8_lossy(&flagged.stderr).contains("bad option");
            if bad_flag {
                Command::new("node").args(&args).output()
            } else {
                Ok(flagged)
            }
        }
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "js client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Connected to chat") && stdout.contains("Connection established"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Message received: Hello, I need help with my account"),
        "{stdout}"
    );
    let saved = messages(&app, &chat).await;
    let answer = saved["messages"][1]["content"].as_str().unwrap();
    assert!(
        stdout.contains(&format!("AI response complete: {answer}")),
        "{stdout}"
    );
    Ok(())
}
