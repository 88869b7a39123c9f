//! The load generator against a deliberately broken server: a test double speaking Parley's wire
//! protocol (the chat-creating REST call and the WebSocket events, with `seq`) that can drop a
//! token from an answer or close a socket with 1012 mid-run, as a draining gateway does.
//! What a load tester must learn from the report: a dropped token is a protocol violation, and a
//! 1012 is a reconnect with `last_seq` that loses nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::{
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::tungstenite::{
    Message,
    handshake::server::{Request, Response},
    protocol::{CloseFrame, frame::coding::CloseCode},
};

/// How the double misbehaves.
#[derive(Clone, Copy)]
enum Fault {
    /// Every answer is missing its second token (`message_stream_ended.content` has it).
    DropToken,
    /// The first socket is closed with 1012 right after its first answer.
    RestartAfterFirstAnswer,
}

const CHAT: &str = "00000000-0000-4000-8000-000000000001";

/// The double's state: one chat, its `seq`, and the query strings of every socket it accepted.
struct Double {
    fault: Fault,
    seq: AtomicU64,
    sockets: AtomicUsize,
    queries: Mutex<Vec<String>>,
}

async fn spawn_double(fault: Fault) -> (String, Arc<Double>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let double = Arc::new(Double {
        fault,
        seq: AtomicU64::new(0),
        sockets: AtomicUsize::new(0),
        queries: Mutex::new(Vec::new()),
    });
    let d = double.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, d.clone()));
        }
    });
    (url, double)
}

/// A WebSocket upgrade goes to [`socket`]; anything else is `POST /api/v1/chats`.
async fn serve(mut stream: TcpStream, double: Arc<Double>) {
    let mut head = [0u8; 2048];
    let n = stream.peek(&mut head).await.unwrap_or(0);
    let text = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    if text.contains("upgrade: websocket") {
        socket(stream, double).await;
        return;
    }
    // Read the request (head and its small JSON body) and answer with the one chat.
    let mut buf = vec![0u8; 4096];
    let _ = stream.read(&mut buf).await;
    let body = json!({"id": CHAT}).to_string();
    let res = format!(
        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(res.as_bytes()).await;
}

fn event(double: &Double, mut e: Value) -> Message {
    e["seq"] = json!(double.seq.fetch_add(1, Ordering::SeqCst) + 1);
    e["timestamp"] = json!("2026-12-03T00:00:00Z");
    Message::text(e.to_string())
}

#[allow(clippy::result_large_err, reason = "tungstenite's callback type")]
async fn socket(stream: TcpStream, double: Arc<Double>) {
    let mut query = String::new();
    let callback = |req: &Request, res: Response| {
        query = req.uri().query().unwrap_or_default().to_owned();
        Ok(res)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    double.queries.lock().unwrap().push(query);
    let nth = double.sockets.fetch_add(1, Ordering::SeqCst);
    let latest = double.seq.load(Ordering::SeqCst);
    let hello = json!({"event_type": "connection_established", "chat_id": CHAT, "user_id": "lg-0",
                       "tenant_id": CHAT, "seq": latest, "timestamp": "2026-12-03T00:00:00Z"});
    ws.send(Message::text(hello.to_string())).await.unwrap();
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(text) = msg else { continue };
        let frame: Value = serde_json::from_str(&text).unwrap();
        let content = frame["content"].as_str().unwrap_or_default().to_owned();
        let (question, answer) = (format!("q-{content}"), format!("a-{content}"));
        let tokens = ["Hel", "lo", " there"];
        let mut events = vec![
            json!({"event_type": "message_received", "message_id": question, "chat_id": CHAT,
                   "user_id": "lg-0", "content": content}),
            json!({"event_type": "message_stream_started", "message_id": answer, "reply_to": question}),
        ];
        for (i, token) in tokens.iter().enumerate() {
            if i == 1 && matches!(double.fault, Fault::DropToken) {
                continue;
            }
            events.push(
                json!({"event_type": "message_stream_token", "message_id": answer, "token": token}),
            );
        }
        events.push(
            json!({"event_type": "message_stream_ended", "message_id": answer,
                           "content": tokens.concat(), "reply_to": question}),
        );
        for e in events {
            ws.send(event(&double, e)).await.unwrap();
        }
        if nth == 0 && matches!(double.fault, Fault::RestartAfterFirstAnswer) {
            let close = CloseFrame {
                code: CloseCode::Restart,
                reason: "server restarting; reconnect".into(),
            };
            let _ = ws.close(Some(close)).await;
            return;
        }
    }
}

/// Runs the loadgen binary against the double; returns its exit code and its report.
fn loadgen(url: &str, extra: &[&str]) -> (i32, Value) {
    let dir = tempfile::TempDir::new().unwrap();
    let report = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "--url",
            url,
            "--api-key",
            "pk_test",
            "--sockets",
            "1",
            "--chats",
            "1",
        ])
        .args(["--messages", "3", "--timeout", "30"])
        .args(extra)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&report).unwrap_or_else(|_| {
        panic!(
            "no report; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(&text).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_drops_a_token_is_reported_as_a_protocol_violation() {
    let (url, _double) = spawn_double(Fault::DropToken).await;
    let (code, report) = tokio::task::spawn_blocking(move || {
        loadgen(&url, &["--threshold", "protocol_violations==0"])
    })
    .await
    .unwrap();
    assert_eq!(report["answers"], 3, "{report}");
    // Each answer's tokens differ from its `message_stream_ended.content`.
    assert_eq!(report["protocol_violations"], 3, "{report}");
    assert_eq!(report["thresholds"][0]["passed"], false, "{report}");
    assert_eq!(code, 99, "a broken threshold sets the exit code");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1012_close_is_a_counted_reconnect_with_last_seq_that_loses_nothing() {
    let (url, double) = spawn_double(Fault::RestartAfterFirstAnswer).await;
    let (code, report) = tokio::task::spawn_blocking(move || loadgen(&url, &[]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["answers"], 3, "{report}");
    assert_eq!(report["reconnects"], 1, "{report}");
    assert_eq!(report["errors_by_code"]["closed_1012"], 1, "{report}");
    assert_eq!(report["protocol_violations"], 0, "{report}");
    let queries = double.queries.lock().unwrap().clone();
    assert_eq!(queries.len(), 2, "{queries:?}");
    assert!(!queries[0].contains("last_seq"), "{queries:?}");
    // The first answer was events 1..=6 (received, started, three tokens, ended).
    assert!(queries[1].ends_with("&last_seq=6"), "{queries:?}");
}
