//! Server → client events (API.md §4), every one with `event_type` and `timestamp`.

use bytestring::ByteString;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ErrorCode, ErrorDetails};

/// An event serialized once, ready to be written to any number of sockets (cheap to clone).
pub type Frame = ByteString;

/// Token accounting of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the request sent to the model.
    pub prompt_tokens: u32,
    /// Tokens in the answer.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

/// Every event the server sends. Field names are the seed document's; the extra fields
/// (`message_id` and `reply_to` on `message_stream_started`, `finish_reason`, `usage`) are additive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", rename_all = "snake_case")]
pub enum ServerEvent {
    /// First event of a successful handshake.
    ConnectionEstablished {
        /// When it was sent.
        timestamp: DateTime<Utc>,
        /// The handshake's user.
        user_id: String,
        /// The handshake's chat.
        chat_id: Uuid,
        /// The tenant the key resolved to.
        tenant_id: Uuid,
        /// The chat's latest `seq` when the socket joined (0 for a new chat; API.md §4.1).
        seq: u64,
    },
    /// Sent once, on the connection that created the user.
    UserCreated {
        /// When it was sent.
        timestamp: DateTime<Utc>,
        /// The new user.
        user_id: String,
    },
    /// The user message is durably saved.
    MessageReceived {
        /// When it was sent.
        timestamp: DateTime<Utc>,
        /// The saved message's id.
        message_id: String,
        /// Its chat.
        chat_id: Uuid,
        /// Its sender.
        user_id: String,
        /// Its text.
        content: String,
    },
    /// The model started answering.
    MessageStreamStarted {
        /// When it was sent.
        timestamp: DateTime<Utc>,
        /// The chat.
        chat_id: Uuid,
        /// The user whose message is being answered.
        user_id: String,
        /// The id the answer will be saved under.
        message_id: String,
        /// The user message being answered.
        reply_to: String,
        /// 1 for the first try; 2 and more when the answer restarted (its worker died), in
        /// which case clients reset the answer's text (API.md §4.1).
        attempt: u32,
    },
    /// One token of the answer.
    MessageStreamToken {
        /// When it was sent.
        timestamp: DateTime<Utc>,
        /// The chat.
        chat_id: Uuid,
        /// The answer this token belongs to (the id of its `message_stream_started`).
        message_id: String,
        /// The token text.
        token: String,
    },
    /// The answer is complete and saved; `content` equals the concatenated tokens.
    MessageStreamEnded {
        /// When it was sent.
        timestamp: DateTime<Utc>,
        /// The saved answer's id.
        message_id: String,
        /// The chat.
        chat_id: Uuid,
        /// The user whose message was answered.
        user_id: String,
        /// The whole answer.
        content: String,
        /// `stop`, `length`, `cancelled` or `error`.
        finish_reason: String,
        /// Token accounting, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
    },
    /// Something went wrong; see `error_code`.
    Error {
        /// When it was sent.
        timestamp: DateTime<Utc>,
        /// Machine-readable code.
        error_code: ErrorCode,
        /// Human-readable message.
        error_message: String,
        /// What to do about it.
        details: ErrorDetails,
    },
    /// Answer to a client `{"type": "ping"}`.
    Pong {
        /// When it was sent.
        timestamp: DateTime<Utc>,
    },
}

impl ServerEvent {
    /// An `error` event with the code's default fix.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::error_with(code, message, ErrorDetails::fix(code.default_fix()))
    }

    /// An `error` event with explicit details.
    pub fn error_with(code: ErrorCode, message: impl Into<String>, details: ErrorDetails) -> Self {
        Self::Error {
            timestamp: Utc::now(),
            error_code: code,
            error_message: message.into(),
            details,
        }
    }

    /// A `message_stream_token` event of the answer `message_id`.
    pub fn token(chat_id: Uuid, message_id: &str, token: impl Into<String>) -> Self {
        Self::MessageStreamToken {
            timestamp: Utc::now(),
            chat_id,
            message_id: message_id.to_owned(),
            token: token.into(),
        }
    }

    /// How the event changes whether an answer is streaming on its chat (the chat log keeps
    /// where the open answer began, for sockets that join mid-answer).
    pub fn answer_mark(&self) -> AnswerMark {
        match self {
            Self::MessageStreamStarted { .. } => AnswerMark::Opens,
            Self::MessageStreamEnded { .. } | Self::Error { .. } => AnswerMark::Closes,
            _ => AnswerMark::Neither,
        }
    }

    /// Serializes the event once into a frame that can be sent to many sockets.
    pub fn to_frame(&self) -> Frame {
        // Serializing these plain structs cannot fail; fall back to an empty object regardless.
        ByteString::from(serde_json::to_string(self).unwrap_or_else(|_| String::from("{}")))
    }
}

/// What a chat event does to the chat's open answer (see [`ServerEvent::answer_mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerMark {
    /// `message_stream_started`: an answer begins (or begins again).
    Opens,
    /// `message_stream_ended`, or the `error` that ends an answer.
    Closes,
    /// Anything else.
    Neither,
}

/// The frame of a chat event with its `seq` (API.md §4.1) added as the last field. Frames made
/// by [`ServerEvent::to_frame`] are JSON objects, so the closing brace is replaced. The chat
/// logs store frames without their `seq`; whoever reads them (a gateway's feed, a log read)
/// writes it in here.
pub fn with_seq(frame: &str, seq: u64) -> Frame {
    sequenced_frame(&[frame.strip_suffix('}').unwrap_or(frame)], seq)
}

/// A frame from its parts (a JSON object without its closing brace, in pieces) and its `seq`,
/// written as the last field. On every event to every gateway: one sized copy, not the
/// formatting machinery.
pub fn sequenced_frame(parts: &[&str], seq: u64) -> Frame {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(seq);
    let len = parts.iter().map(|p| p.len()).sum::<usize>() + digits.len() + 8;
    let mut out = String::with_capacity(len);
    for part in parts {
        out.push_str(part);
    }
    out.push_str(",\"seq\":");
    out.push_str(digits);
    out.push('}');
    ByteString::from(out)
}

/// The `event_type` of a frame made by [`ServerEvent::to_frame`] (serde writes the tag first),
/// so a gateway can tell what it forwards without parsing it.
pub fn frame_event_type(frame: &Frame) -> Option<&str> {
    let rest = frame.strip_prefix(r#"{"event_type":""#)?;
    rest.split_once('"').map(|(event_type, _)| event_type)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn frames_tell_their_event_type_without_parsing() {
        let chat = uuid::Uuid::nil();
        let token = ServerEvent::token(chat, "msg-1", "hi").to_frame();
        assert_eq!(frame_event_type(&token), Some("message_stream_token"));
        let sequenced = with_seq(&token, 42);
        assert_eq!(frame_event_type(&sequenced), Some("message_stream_token"));
        let v: serde_json::Value = serde_json::from_str(&sequenced).unwrap_or_default();
        assert_eq!(v["seq"], 42);
        assert_eq!(v["token"], "hi");
        let pong = ServerEvent::Pong {
            timestamp: chrono::Utc::now(),
        };
        assert_eq!(frame_event_type(&pong.to_frame()), Some("pong"));
    }

    #[test]
    fn events_carry_the_seed_field_names() -> Result<(), serde_json::Error> {
        let chat_id = Uuid::nil();
        let frame = ServerEvent::token(chat_id, "msg-1", "I'd").to_frame();
        let v: Value = serde_json::from_str(&frame)?;
        assert_eq!(v["event_type"], "message_stream_token");
        assert_eq!(v["token"], "I'd");
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        let err: Value =
            serde_json::to_value(ServerEvent::error(ErrorCode::AuthError, "Invalid API key"))?;
        assert_eq!(err["error_code"], "AUTH_ERROR");
        assert_eq!(
            err["details"],
            json!({"fix": ErrorCode::AuthError.default_fix()})
        );
        Ok(())
    }
}
