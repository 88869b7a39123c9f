//! The process's pub/sub side of the Redis broker: one connection that carries every chat's
//! events into the hub and cancel requests to the workers, subscribing chats as their first
//! local socket arrives and unsubscribing after their last.

use std::{
    sync::{Weak, atomic::Ordering},
    time::Duration,
};

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{Control, RedisBroker, STAMP};
use crate::broker::{BrokerError, Deletion, Subscription};
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
        let names = Channels {
            chat_prefix: b.key("chat:"),
            cancel: b.key("cancel"),
            deleted: b.key(super::DELETED_CHANNEL),
        };
        let prefix = names.chat_prefix.clone();
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
        channels.push(names.cancel.clone());
        channels.push(names.deleted.clone());
        if sink.subscribe(&channels).await.is_err() {
            continue;
        }
        let Some(b) = broker.upgrade() else { return };
        b.live.store(true, Ordering::Release);
        // Deletions announced while the connection was down reached nobody here.
        let _ = b.deletions.send(Deletion::Missed);
        // Events published while the connection was down reached no feed: tell the feeds the
        // chats' latest `seq`s, and their sockets read the rest from the log.
        hint_latest(&b, &chats).await;
        drop(b);
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            let request = match pending.take() {
                Some(r) => r,
                None => tokio::select! {
                    msg = stream.next() => {
                        let Some(msg) = msg else { break };
                        let Some(b) = broker.upgrade() else { return };
                        deliver(&b, &names, &msg);
                        continue;
                    }
                    _ = keepalive.tick() => {
                        let pong = tokio::time::timeout(KEEPALIVE, sink.ping::<redis::Value>()).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            tracing::warn!("redis pub/sub connection unresponsive");
                            break;
                        }
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
        if let Some(b) = broker.upgrade() {
            b.live.store(false, Ordering::Release);
        }
        tracing::warn!("redis pub/sub connection lost; reconnecting");
    }
}

/// How often the pub/sub connection is pinged, and how long a ping may take.
const KEEPALIVE: Duration = Duration::from_secs(3);

/// Hints every feed with the chat's latest `seq` (after a reconnect). When that cannot be read
/// (the first commands after a Redis restart may fail), the feeds are told events were lost.
async fn hint_latest(b: &RedisBroker, chats: &[Uuid]) {
    if chats.is_empty() {
        return;
    }
    let mut latest = b.latest_seqs(chats).await;
    for wait in [50, 200, 500] {
        if latest.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(wait)).await;
        latest = b.latest_seqs(chats).await;
    }
    match latest {
        Ok(latest) => {
            for (chat, seq) in chats.iter().zip(latest) {
                // A chat whose meta Redis lost starts again past every `seq` it issued: its
                // sockets then find the events they lack unavailable and are sent to resume.
                let seq = match seq {
                    Some(seq) => seq,
                    None => match crate::broker::ChatLog::head(b, *chat).await {
                        Ok(head) => head.latest,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not restart a chat's log");
                            continue;
                        }
                    },
                };
                b.hub.hint(*chat, seq);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read the chats' latest seqs; sending sockets to resume");
            b.hub.lost();
        }
    }
}

impl RedisBroker {
    /// Subscribes a socket to the chat's feed, and the process to its channel if it is the
    /// chat's first local socket; returns once the channel is live.
    pub(super) async fn subscribe_live(&self, chat_id: Uuid) -> Result<Subscription, BrokerError> {
        let (sub, _) = self.hub.subscribe(chat_id);
        let (done, live) = oneshot::channel();
        self.control
            .send(Control::Subscribe(chat_id, done))
            .map_err(|_| BrokerError::Closed)?;
        live.await
            .map_err(|_| BrokerError::Unavailable("redis pub/sub unavailable".into()))?;
        Ok(sub)
    }
}

/// The channels the process's pub/sub connection follows, by their full names.
struct Channels {
    /// Each chat's channel is this and its id.
    chat_prefix: String,
    /// Cancel requests for workers.
    cancel: String,
    /// Chat deletions.
    deleted: String,
}

fn deliver(b: &RedisBroker, names: &Channels, msg: &redis::Msg) {
    let channel = msg.get_channel_name();
    let chat_of = || {
        std::str::from_utf8(msg.get_payload_bytes())
            .ok()
            .and_then(|c| Uuid::parse_str(c).ok())
    };
    if channel == names.cancel {
        let _ = chat_of().map(|c| b.cancels.send(c));
        return;
    }
    if channel == names.deleted {
        let _ = chat_of().map(|c| b.deletions.send(Deletion::Chat(c)));
        return;
    }
    let Some(chat) = channel
        .strip_prefix(names.chat_prefix.as_str())
        .and_then(|c| Uuid::parse_str(c).ok())
    else {
        return;
    };
    // The first line is the stamp: publish time, first `seq`, then the trace context if any.
    let payload = msg.get_payload_bytes();
    let (stamp, frames) = match payload.iter().position(|b| *b == b'\n') {
        Some(i) => (&payload[..i], &payload[i + 1..]),
        None => return,
    };
    let Some((first, trace)) = read_stamp(stamp) else {
        return;
    };
    let _forwarding = trace.map(|t| trace::forward_first_token(chat, t).entered());
    let events = super::batch::decode(first, frames);
    b.hub.push(chat, events);
}

/// Reads a stamp line (`@<unix micros> <first seq>[ <traceparent>]`), observing token
/// delivery; returns the batch's first `seq` and the trace context it carries, if any.
fn read_stamp(stamp: &[u8]) -> Option<(u64, Option<&str>)> {
    let stamp = std::str::from_utf8(stamp.strip_prefix(STAMP.as_bytes())?).ok()?;
    let mut parts = stamp.split(' ');
    let published = parts
        .next()?
        .parse()
        .ok()
        .and_then(chrono::DateTime::from_timestamp_micros);
    if let Some(t) = published {
        metrics().token_delivery.observe(seconds_since(t));
    }
    // The script appends the first `seq` after the worker's stamp (and its trace context).
    let first: u64 = parts.next_back()?.parse().ok()?;
    let trace = parts.next().filter(|t| !t.is_empty());
    Some((first, trace))
}
