//! The least a server can do per refused upgrade, to measure what a handshake flood costs any
//! server on this machine (the kernel's TCP accept, read, write and close, and a little
//! user time) beside what it costs the gateway: `deploy/bench.sh flood-floor`.
//!
//! One thread; every connection has its request head read, is answered with a fixed `101`,
//! an `error` event and a close frame in one write, and is closed. No routing, no parsing,
//! no state: nothing a real gateway could do without.
//!
//! `cargo run --release -p loadgen --example bare_refuser -- 127.0.0.1:18300`

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const EVENT: &str = r#"{"event_type":"error","timestamp":"2026-12-04T20:28:50.604468Z","error_code":"RATE_LIMITED","error_message":"Too many failed authentications from this address","details":{"fix":"Retry after retry_after_ms","retry_after_ms":2000}}"#;

fn answer() -> Vec<u8> {
    let mut out =
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
        sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
            .to_vec();
    out.extend([0x81, 126]);
    out.extend(u16::try_from(EVENT.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend(EVENT.as_bytes());
    out.extend([0x88, 14, 0x03, 0xf0]);
    out.extend(b"RATE_LIMITED");
    out
}

async fn refuse(mut tcp: TcpStream, answer: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 4096];
    let mut len = 0;
    while !head[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut head[len..]).await? {
            0 => return Ok(()),
            n => len += n,
        }
        if len == head.len() {
            return Ok(());
        }
    }
    tcp.write_all(answer).await?;
    tcp.shutdown().await
}

fn main() -> anyhow::Result<()> {
    let bind = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18300".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&bind).await?;
        let answer: &'static [u8] = answer().leak();
        loop {
            let (tcp, _) = listener.accept().await?;
            // Each connection is short and ends on its own; the process is killed to stop.
            tokio::spawn(async move {
                let _ = refuse(tcp, answer).await;
            });
        }
    })
}
