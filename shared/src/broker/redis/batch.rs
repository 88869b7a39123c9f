//! How one publish batch travels through Redis (its log entry and its pub/sub message): one
//! line per event, without `seq`s, and a run of tokens of one answer written once as a
//! template and then one short line per token.
//!
//! Lines:
//! - `{…}`: a whole event frame (made by [`ServerEvent::to_frame`]);
//! - `T{…"token":`: the template of the tokens that follow: a token frame up to its text (not
//!   an event, it takes no `seq`);
//! - `t"…"`: a token, its text as a JSON string: the frame is the template, the text, the `seq`.
//!
//! Why: a token frame repeats its event type, chat, answer id and timestamp (about 160 bytes
//! for a one-word token), and every byte of a batch is copied and hashed by the append script
//! (Redis's Lua hashes each string whole), stored, and sent to every gateway. With templates a
//! batch of 17 tokens is about 400 bytes instead of 2,700. The tokens of one template share its
//! timestamp: they were ready at the same moment (the worker batches what the model has ready
//! without waiting).

use crate::broker::Sequenced;
use crate::protocol::{ServerEvent, sequenced_frame, with_seq};

/// The batch's lines, joined by newlines (JSON never holds a raw newline).
pub(super) fn encode(events: &[ServerEvent]) -> String {
    let mut out = String::new();
    let mut template_of: Option<&str> = None;
    for event in events {
        if let ServerEvent::MessageStreamToken {
            message_id, token, ..
        } = event
        {
            if template_of != Some(message_id.as_str())
                && let Some(template) = template(event)
            {
                line(&mut out).push('T');
                out.push_str(&template);
                template_of = Some(message_id);
            }
            if template_of == Some(message_id.as_str()) {
                line(&mut out).push('t');
                out.push_str(&serde_json::to_string(token).unwrap_or_else(|_| "\"\"".into()));
                continue;
            }
        }
        line(&mut out).push_str(&event.to_frame());
    }
    out
}

/// Starts a new line (after the first) and hands the buffer back.
fn line(out: &mut String) -> &mut String {
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// A token frame up to (and including) `"token":`.
fn template(token: &ServerEvent) -> Option<String> {
    let mut blank = token.clone();
    if let ServerEvent::MessageStreamToken { token, .. } = &mut blank {
        token.clear();
    }
    let frame = blank.to_frame();
    frame.strip_suffix("\"\"}").map(str::to_owned)
}

/// The events of a batch whose first `seq` is `first`, each frame with its `seq`.
pub(super) fn decode(first: u64, batch: &[u8]) -> Vec<Sequenced> {
    let mut events = Vec::new();
    let mut template = "";
    let mut seq = first;
    for line in batch.split(|b| *b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        let frame = match line.as_bytes().first() {
            Some(b'T') => {
                template = &line[1..];
                continue;
            }
            Some(b't') => sequenced_frame(&[template, &line[1..]], seq),
            _ => with_seq(line, seq),
        };
        events.push(Sequenced { seq, frame });
        seq += 1;
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;
    use serde_json::Value;
    use uuid::Uuid;

    fn json(frame: &str) -> Value {
        serde_json::from_str(frame).unwrap_or_default()
    }

    #[test]
    fn a_batch_decodes_to_the_frames_it_was_made_of_with_consecutive_seqs() {
        let chat = Uuid::new_v4();
        let mut events = vec![ServerEvent::token(chat, "a1", "hé \"quoted\"\n")];
        events.push(ServerEvent::token(chat, "a1", " two"));
        events.push(ServerEvent::error(ErrorCode::AiError, "x"));
        events.push(ServerEvent::token(chat, "a2", "other answer"));
        let encoded = encode(&events);
        assert_eq!(encoded.lines().filter(|l| l.starts_with('T')).count(), 2);
        let decoded = decode(7, encoded.as_bytes());
        assert_eq!(decoded.len(), 4);
        let first_time = json(&events[0].to_frame())["timestamp"].clone();
        for (i, (event, got)) in events.iter().zip(&decoded).enumerate() {
            let seq = 7 + i as u64;
            assert_eq!(got.seq, seq);
            let mut want: Value = json(&with_seq(&event.to_frame(), seq));
            let got = json(&got.frame);
            assert!(got.is_object());
            if i == 1 {
                // Tokens of one template share its timestamp.
                want["timestamp"] = first_time.clone();
            }
            assert_eq!(got, want);
        }
        // Same bytes as a frame made directly, field order included.
        assert_eq!(decoded[0].frame, with_seq(&events[0].to_frame(), 7));
    }
}
