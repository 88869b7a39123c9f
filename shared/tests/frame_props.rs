//! Property tests of the client frame parser (API.md §4): whatever a client sends, parsing
//! never panics, and what it accepts meets every rule of a message. Bounded for CI (256 cases
//! per property); run longer by hand with `PROPTEST_CASES=100000 cargo test -p shared --test
//! frame_props`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use shared::protocol::{ClientFrame, FrameError, parse_client_frame, text::has_refused_control};

const MAX: usize = 1024;

/// Any JSON value, a few levels deep, its strings drawn from every kind of character.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::from),
        prop_oneof![Just("message"), Just("ping"), Just("cancel"), Just("")].prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Object keys: the protocol's own names often, anything otherwise.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop_oneof![
            Just("type"),
            Just("content"),
            Just("metadata"),
            Just("client_message_id")
        ]
        .prop_map(str::to_owned),
        any::<String>(),
    ]
}

/// Text a client may send: no refused control character, not blank.
fn allowed_text(max_chars: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 1..max_chars)
        .prop_map(|cs| {
            cs.into_iter()
                .filter(|c| !has_refused_control(&c.to_string()))
                .collect()
        })
        .prop_filter("not blank", |s: &String| !s.trim().is_empty())
}

fn check_accepted(frame: &ClientFrame) {
    if let ClientFrame::Message {
        content,
        metadata,
        client_message_id,
    } = frame
    {
        assert!(!content.trim().is_empty());
        assert!(content.len() <= MAX);
        assert!(!has_refused_control(content));
        assert!(!shared::protocol::text::map_has_refused_control(metadata));
        if let Some(id) = client_message_id {
            assert!((1..=64).contains(&id.chars().count()));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_parses_or_is_refused_without_panicking(text in any::<String>()) {
        if let Ok(frame) = parse_client_frame(&text, MAX) {
            check_accepted(&frame);
        }
    }

    #[test]
    fn any_json_parses_or_is_refused_and_what_passes_is_a_valid_frame(value in any_json()) {
        if let Ok(frame) = parse_client_frame(&value.to_string(), MAX) {
            check_accepted(&frame);
        }
    }

    #[test]
    fn any_object_with_a_string_content_is_judged_by_the_rules(
        content in any::<String>(),
        metadata in prop::option::of(prop::collection::btree_map(any::<String>(), any::<String>(), 0..4)),
    ) {
        let mut frame = json!({"content": content});
        if let Some(m) = &metadata {
            frame["metadata"] = json!(m);
        }
        let bad_meta = metadata.iter().flatten().any(|(k, v)| has_refused_control(k) || has_refused_control(v));
        match parse_client_frame(&frame.to_string(), MAX) {
            Ok(parsed) => {
                check_accepted(&parsed);
                prop_assert!(!bad_meta);
            }
            Err(FrameError::TooLarge { size, max }) => {
                prop_assert_eq!(size, content.len());
                prop_assert!(size > max);
            }
            Err(FrameError::Invalid(_)) => prop_assert!(
                content.trim().is_empty() || has_refused_control(&content) || bad_meta
            ),
        }
    }

    #[test]
    fn a_valid_message_comes_back_as_sent(
        content in allowed_text(200),
        metadata in prop::collection::btree_map(allowed_text(12), allowed_text(12), 0..4),
        id in prop::option::of("[^\\p{Cc}]{1,64}"),
        typed in any::<bool>(),
    ) {
        let mut frame = json!({"content": content, "metadata": metadata});
        if typed {
            frame["type"] = json!("message");
        }
        if let Some(id) = &id {
            frame["client_message_id"] = json!(id);
        }
        let metadata: Map<String, Value> =
            metadata.into_iter().map(|(k, v)| (k, Value::from(v))).collect();
        let parsed = parse_client_frame(&frame.to_string(), MAX);
        if content.len() > MAX {
            let too_large = matches!(parsed, Err(FrameError::TooLarge { .. }));
            prop_assert!(too_large);
        } else {
            prop_assert_eq!(
                parsed.unwrap(),
                ClientFrame::Message { content, metadata, client_message_id: id }
            );
        }
    }

    #[test]
    fn one_refused_control_character_anywhere_refuses_the_message(
        content in allowed_text(50),
        at in any::<prop::sample::Index>(),
        control in (0u32..0x20).prop_filter("refused", |c| ![9, 10, 13].contains(c)),
        place in 0..3usize,
    ) {
        let bad = {
            let mut chars: Vec<char> = content.chars().collect();
            chars.insert(at.index(chars.len() + 1), char::from_u32(control).unwrap());
            chars.into_iter().collect::<String>()
        };
        let frame = match place {
            0 => json!({"content": bad}),
            1 => json!({"content": content, "metadata": {bad.clone(): 1}}),
            _ => json!({"content": content, "metadata": {"k": [{"deep": bad}]}}),
        };
        let refused = matches!(parse_client_frame(&frame.to_string(), MAX), Err(FrameError::Invalid(_)));
        prop_assert!(refused);
    }
}
