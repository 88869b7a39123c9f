//! The OpenAI streaming format: server-sent events whose data is a `chat.completion.chunk`.
//!
//! Framing (events split across reads, comments such as `: keep-alive`, `\r\n` line ends) is
//! the `eventsource-stream` crate's; this module reads what each event means: a text delta, a
//! finish reason, a usage report (the final chunk with empty `choices` that
//! `stream_options.include_usage` asks for), an error object sent mid-stream, or `[DONE]`.

use serde::Deserialize;
use shared::protocol::Usage;

/// What one event carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// `data: [DONE]`: the stream is complete.
    Done,
    /// A `chat.completion.chunk`; any part may be absent.
    Data {
        /// Text to forward.
        content: Option<String>,
        /// `stop`, `length`, … on the choice's last chunk.
        finish_reason: Option<String>,
        /// Token accounting (usually its own final chunk).
        usage: Option<Usage>,
    },
    /// The server reported a failure inside the stream.
    Error(String),
}

#[derive(Deserialize)]
struct RawChunk {
    #[serde(default)]
    choices: Vec<RawChoice>,
    usage: Option<Usage>,
    error: Option<RawError>,
}

#[derive(Deserialize)]
struct RawChoice {
    #[serde(default)]
    delta: RawDelta,
    finish_reason: Option<String>,
}

#[derive(Default, Deserialize)]
struct RawDelta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    message: String,
}

/// Reads one event (its `event` name and `data`).
pub fn parse(event: &str, data: &str) -> Result<Chunk, String> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(Chunk::Done);
    }
    let raw: RawChunk = match serde_json::from_str(data) {
        Ok(raw) => raw,
        Err(_) if event == "error" => return Ok(Chunk::Error(data.to_owned())),
        Err(e) => return Err(format!("unreadable chunk: {e}")),
    };
    if let Some(error) = raw.error {
        return Ok(Chunk::Error(error.message));
    }
    if event == "error" {
        return Ok(Chunk::Error(data.to_owned()));
    }
    let (content, finish_reason) = raw
        .choices
        .into_iter()
        .next()
        .map_or((None, None), |c| (c.delta.content, c.finish_reason));
    Ok(Chunk::Data {
        content: content.filter(|c| !c.is_empty()),
        finish_reason,
        usage: raw.usage,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use eventsource_stream::Eventsource;
    use futures_util::{StreamExt, stream};

    use super::*;

    const BODY: &str = ": keep-alive\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo é\"},\"finish_reason\":null}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n\
        data: [DONE]\n\n";

    /// Parses a body delivered in pieces of `size` bytes (UTF-8 characters split too).
    async fn chunks_of(body: &'static str, size: usize) -> Vec<Chunk> {
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> = body
            .as_bytes()
            .chunks(size)
            .map(|c| Ok(c.to_vec()))
            .collect();
        stream::iter(pieces)
            .eventsource()
            .map(|e| {
                let e = e.unwrap();
                parse(&e.event, &e.data).unwrap()
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn events_split_anywhere_read_the_same() {
        let whole = chunks_of(BODY, BODY.len()).await;
        assert_eq!(
            whole,
            vec![
                Chunk::Data {
                    content: None,
                    finish_reason: None,
                    usage: None
                },
                Chunk::Data {
                    content: Some("Hel".into()),
                    finish_reason: None,
                    usage: None
                },
                Chunk::Data {
                    content: Some("lo é".into()),
                    finish_reason: None,
                    usage: None
                },
                Chunk::Data {
                    content: None,
                    finish_reason: Some("stop".into()),
                    usage: None
                },
                Chunk::Data {
                    content: None,
                    finish_reason: None,
                    usage: Some(Usage {
                        prompt_tokens: 3,
                        completion_tokens: 2,
                        total_tokens: 5
                    })
                },
                Chunk::Done,
            ]
        );
        for size in 1..40 {
            assert_eq!(chunks_of(BODY, size).await, whole, "pieces of {size} bytes");
        }
    }

    #[test]
    fn an_error_object_mid_stream_is_an_error() {
        let chunk = parse(
            "",
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
        );
        assert_eq!(chunk, Ok(Chunk::Error("overloaded".into())));
        let named = parse("error", r#"{"message":"boom"}"#);
        assert!(matches!(named, Ok(Chunk::Error(_))));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(parse("", "{not json").is_err());
    }
}
