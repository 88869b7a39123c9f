//! Client → server frames and their validation (API.md §4).

use serde_json::{Map, Value};

/// A valid client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// A chat message (`type` absent or `"message"`).
    Message {
        /// The text, non-empty.
        content: String,
        /// Client metadata saved with the message (an empty object when absent).
        metadata: Map<String, Value>,
        /// The sender's idempotency key (1 to 64 characters, API.md §4.1).
        client_message_id: Option<String>,
    },
    /// `{"type": "ping"}`.
    Ping,
    /// `{"type": "cancel"}`: stop the answer being generated for this chat.
    Cancel,
}

/// Why a text frame was refused; each maps to an error event and leaves the socket open.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    /// `INVALID_MESSAGE` with this message.
    #[error("{0}")]
    Invalid(&'static str),
    /// `MESSAGE_TOO_LARGE`: content of this many bytes over the maximum.
    #[error("Message content is {size} bytes; the maximum is {max} bytes")]
    TooLarge {
        /// The content's size in bytes.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
}

/// Parses one text frame, enforcing `max_content_bytes` on the content.
pub fn parse_client_frame(text: &str, max_content_bytes: usize) -> Result<ClientFrame, FrameError> {
    let value: Value =
        serde_json::from_str(text).map_err(|_| FrameError::Invalid("Message is not valid JSON"))?;
    let Value::Object(mut obj) = value else {
        return Err(FrameError::Invalid("Message must be a JSON object"));
    };
    match obj.get("type") {
        None => {}
        Some(Value::String(t)) if t == "message" => {}
        Some(Value::String(t)) if t == "ping" => return Ok(ClientFrame::Ping),
        Some(Value::String(t)) if t == "cancel" => return Ok(ClientFrame::Cancel),
        Some(_) => {
            return Err(FrameError::Invalid(
                "Unknown message type; expected \"message\", \"ping\" or \"cancel\"",
            ));
        }
    }
    let content = match obj.remove("content") {
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err(FrameError::Invalid("Message content must not be empty"));
        }
        Some(Value::String(s)) => s,
        Some(_) => return Err(FrameError::Invalid("Message content must be a string")),
        None => return Err(FrameError::Invalid("Message content is required")),
    };
    if super::text::has_refused_control(&content) {
        return Err(FrameError::Invalid(
            "Message content must not contain control characters other than tab, newline and carriage return",
        ));
    }
    if content.len() > max_content_bytes {
        return Err(FrameError::TooLarge {
            size: content.len(),
            max: max_content_bytes,
        });
    }
    let metadata = match obj.remove("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) if super::text::map_has_refused_control(&m) => {
            return Err(FrameError::Invalid(
                "Message metadata must not contain control characters other than tab, newline and carriage return",
            ));
        }
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(FrameError::Invalid(
                "Message metadata must be a JSON object",
            ));
        }
    };
    let client_message_id = match obj.remove("client_message_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id))
            if (1..=64).contains(&id.chars().count()) && !id.chars().any(char::is_control) =>
        {
            Some(id)
        }
        Some(_) => {
            return Err(FrameError::Invalid(
                "client_message_id must be a string of 1 to 64 characters",
            ));
        }
    };
    Ok(ClientFrame::Message {
        content,
        metadata,
        client_message_id,
    })
}

/// Checks a tenant-chosen `user_id`: 1 to 128 characters, no control characters.
pub fn validate_user_id(user_id: &str) -> Result<(), &'static str> {
    let len = user_id.chars().count();
    if len == 0 {
        return Err("user_id must not be empty");
    }
    if len > 128 {
        return Err("user_id must be at most 128 characters");
    }
    if user_id.chars().any(char::is_control) {
        return Err("user_id must not contain control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_seed_forms_and_refuses_the_rest() {
        assert!(matches!(
            parse_client_frame(r#"{"content":"hi","metadata":{"a":1}}"#, 10),
            Ok(ClientFrame::Message { .. })
        ));
        assert_eq!(
            parse_client_frame(r#"{"type":"ping"}"#, 10),
            Ok(ClientFrame::Ping)
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"cancel"}"#, 10),
            Ok(ClientFrame::Cancel)
        );
        for bad in [
            "nope",
            "[1]",
            "{}",
            r#"{"content":""}"#,
            r#"{"content":5}"#,
            r#"{"content":"x","metadata":[]}"#,
            r#"{"content":"x","client_message_id":""}"#,
            r#"{"content":"a\u0000b"}"#,
            r#"{"content":"\u001b[31m"}"#,
            r#"{"content":"x","metadata":{"k":"\u0000"}}"#,
            r#"{"content":"x","metadata":{"\u0000":1}}"#,
            r#"{"content":"x","metadata":{"k":[{"d":"\u0007"}]}}"#,
            r#"{"content":"x","client_message_id":7}"#,
        ] {
            assert!(
                matches!(parse_client_frame(bad, 10), Err(FrameError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_client_frame(r#"{"content":"12345678901"}"#, 10),
            Err(FrameError::TooLarge { size: 11, max: 10 })
        ));
    }
}
