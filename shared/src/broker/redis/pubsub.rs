//! The process's pub/sub side of the Redis broker: one connection that carries every chat's
//! events into the hub and cancel requests to the workers, subscribing chats as their first
//! local socket arrives and unsubscribing after their last.

use std::{sync::Weak, time::Duration};

use bytestring::ByteString;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{Control, RedisBroker, STAMP};
use crate::metrics::{metrics, seconds_since};
use crate::telemetry::trace;

/// Turns the hub's "chat emptied" reports into subscriber requests.
pub(super) async fn forward_emptied(
    mut emptied: mpsc::UnboundedReceiver<Uuid>,
    control: mpsc::WeakUnboundedSender<Control>,
) {
    while let Some(chat) = emptied.recv().await {
        let Some(control) = control.upgrade() else {
            return;
        };
        let _ = control.send(Control::Emptied(chat));
    }
}

/// The process's one pub/sub connection: forwards chat events into the hub and cancels to the
/// workers; subscribes and unsubscribes chats as sockets come and go; reconnects and
/// resubscribes every chat of the hub after a lost connection. Requests are handled in order,
/// so a socket's subscribe request is answered only once its chat's channel is live.
pub(super) async fn subscriber(
    broker: Weak<RedisBroker>,
    client: redis::Client,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let mut pending: Option<Control> = None;
    loop {
        let Some(b) = broker.upgrade() else { return };
        let (prefix, cancel_channel) = (b.key("chat:"), b.key("cancel"));
        let chats = b.hub.chat_ids();
        drop(b);
        let pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "redis pub/sub unavailable; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut live: std::collections::HashSet<Uuid> = chats.iter().copied().collect();
        let mut channels: Vec<String> = chats.iter().map(|c| format!("{prefix}{c}")).collect();
        channels.push(cancel_channel.clone());
        if sink.subscribe(&channels).await.is_err() {
            continue;
        }
        loop {
            let request = match pending.take() {
                Some(r) => r,
                None => tokio::select! {
                    msg = stream.next() => {
                        let Some(msg) = msg else { break };
                        let Some(b) = broker.upgrade() else { return };
                        deliver(&b, &prefix, &cancel_channel, &msg);
                        continue;
                    }
                    request = control.recv() => match request {
                        Some(r) => r,
                        None => return,
                    },
                },
            };
            let (chat, wanted) = match &request {
                Control::Subscribe(chat, _) => (*chat, true),
                Control::Emptied(chat) => {
                    let Some(b) = broker.upgrade() else { return };
                    (*chat, b.hub.has_subscribers(*chat))
                }
            };
            let channel = format!("{prefix}{chat}");
            let applied = match (wanted, live.contains(&chat)) {
                (true, false) => sink
                    .subscribe(&channel)
                    .await
                    .map(|()| live.insert(chat))
                    .map(drop),
                (false, true) => sink
                    .unsubscribe(&channel)
                    .await
                    .map(|()| live.remove(&chat))
                    .map(drop),
                _ => Ok(()),
            };
            if applied.is_err() {
                pending = Some(request);
                break;
            }
            if let Control::Subscribe(_, done) = request {
                let _ = done.send(());
            }
        }
        tracing::warn!("redis pub/sub connection lost; reconnecting");
    }
}

fn deliver(b: &RedisBroker, prefix: &str, cancel_channel: &str, msg: &redis::Msg) {
    let channel = msg.get_channel_name();
    if channel == cancel_channel {
        if let Ok(chat) = std::str::from_utf8(msg.get_payload_bytes()).map(Uuid::parse_str) {
            let _ = chat.map(|c| b.cancels.send(c));
        }
        return;
    }
    let Some(chat) = channel
        .strip_prefix(prefix)
        .and_then(|c| Uuid::parse_str(c).ok())
    else {
        return;
    };
    // One copy of the payload; each frame is then a view of it.
    let payload = bytes::Bytes::copy_from_slice(msg.get_payload_bytes());
    let mut lines = payload.split(|b| *b == b'\n').peekable();
    let stamp = lines.next_if(|line| line.starts_with(STAMP.as_bytes()));
    let _forwarding = stamp
        .and_then(read_stamp)
        .map(|t| trace::forward_first_token(chat, t).entered());
    for line in lines.filter(|line| !line.is_empty()) {
        // Each line is a whole JSON text, so valid UTF-8 on its own.
        if let Ok(frame) = ByteString::try_from(payload.slice_ref(line)) {
            b.hub.send(chat, frame);
        }
    }
}

/// Observes token delivery from a stamp line (`@<unix micros>[ <traceparent>]`); returns the
/// trace context it carries, if any.
fn read_stamp(stamp: &[u8]) -> Option<&str> {
    let stamp = std::str::from_utf8(stamp.strip_prefix(STAMP.as_bytes())?).ok()?;
    let (published, trace) = stamp.split_once(' ').unwrap_or((stamp, ""));
    let published = published
        .parse()
        .ok()
        .and_then(chrono::DateTime::from_timestamp_micros);
    if let Some(t) = published {
        metrics().token_delivery.observe(seconds_since(t));
    }
    (!trace.is_empty()).then_some(trace)
}
