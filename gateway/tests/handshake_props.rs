//! Property tests of the WebSocket handshake's parameter parsing (API.md §4): from any query
//! string and headers, reading the parameters never panics; each parameter is taken from the
//! query when given there, else from its header; the first missing one is named; `last_seq`
//! is a number or refused. Bounded for CI (256 cases per property); run longer by hand with
//! `PROPTEST_CASES=100000 cargo test -p gateway --test handshake_props`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use actix_web::test::TestRequest;
use gateway::{
    error::ApiError,
    ws::{Credential, HandshakeParams, Present},
};
use proptest::prelude::*;

/// Where a test puts one parameter.
#[derive(Debug, Clone)]
enum Placed {
    Absent,
    Query(String),
    Header(String),
    /// Both, with different values: the query's must win.
    Both(String, String),
}

impl Placed {
    fn expected(&self) -> Option<String> {
        match self {
            Placed::Absent => None,
            Placed::Query(v) | Placed::Header(v) | Placed::Both(v, _) => Some(v.clone()),
        }
    }
}

/// Header-safe visible ASCII (the characters a client can put in both places).
fn value() -> impl Strategy<Value = String> + Clone {
    "[!-~]{1,60}"
}

fn placed(values: impl Strategy<Value = String> + Clone) -> impl Strategy<Value = Placed> {
    prop_oneof![
        Just(Placed::Absent),
        values.clone().prop_map(Placed::Query),
        values.clone().prop_map(Placed::Header),
        (values.clone(), values).prop_map(|(q, h)| Placed::Both(q, h)),
    ]
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn request(params: &[(&str, &str, &Placed)]) -> actix_web::HttpRequest {
    let mut query = Vec::new();
    let mut req = TestRequest::default();
    for (name, header, placed) in params {
        if let Placed::Query(v) | Placed::Both(v, _) = placed {
            query.push(format!("{name}={}", encode(v)));
        }
        if let Placed::Header(v) | Placed::Both(_, v) = placed {
            req = req.insert_header((*header, v.as_str()));
        }
    }
    req.uri(&format!("/ws/chat?{}", query.join("&")))
        .to_http_request()
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_query_string_is_read_without_panicking(query in "[a-zA-Z0-9_%=&+.~-]{0,200}") {
        let req = TestRequest::default().uri(&format!("/ws/chat?{query}")).to_http_request();
        let _ = HandshakeParams::from_request(&req).present();
    }

    #[test]
    fn each_parameter_comes_from_the_query_else_its_header(
        key in placed(value()),
        user in placed(value()),
        chat in placed(value()),
        last_seq in placed(prop_oneof![any::<u64>().prop_map(|n| n.to_string()).boxed(), value().boxed()]),
    ) {
        let req = request(&[
            ("api_key", "X-API-Key", &key),
            ("user_id", "X-User-ID", &user),
            ("chat_id", "X-Chat-ID", &chat),
            ("last_seq", "X-Last-Seq", &last_seq),
        ]);
        let got = HandshakeParams::from_request(&req).present();
        let first_missing = [("api_key", &key), ("user_id", &user), ("chat_id", &chat)]
            .into_iter()
            .find(|(_, p)| p.expected().is_none())
            .map(|(name, _)| name);
        let seq = last_seq.expected().map(|s| s.trim().parse::<u64>());
        match (first_missing, seq, got) {
            (Some(name), _, Err(ApiError::MissingParam { name: got, .. })) => prop_assert_eq!(name, got),
            (None, Some(Err(_)), Err(ApiError::InvalidParam { name, .. })) => prop_assert_eq!(name, "last_seq"),
            (None, seq, Ok(present)) => prop_assert_eq!(present, Present {
                credential: Credential::ApiKey(key.expected().unwrap()),
                user_id: user.expected(),
                chat_id: chat.expected(),
                last_seq: seq.map(Result::unwrap),
            }),
            (missing, seq, got) => prop_assert!(false, "missing {missing:?}, last_seq {seq:?}: got {got:?}"),
        }
    }

    #[test]
    fn a_token_stands_in_for_the_key_and_user_and_the_key_wins_over_it(
        token in placed(value()),
        key in prop_oneof![Just(Placed::Absent), placed(value())],
        user in placed(value()),
        chat in placed(value()),
    ) {
        // The token's header is `Authorization: Bearer`, so it is placed by hand.
        let mut query = Vec::new();
        let mut req = TestRequest::default();
        if let Placed::Query(v) | Placed::Both(v, _) = &token {
            query.push(format!("token={}", encode(v)));
        }
        if let Placed::Header(v) | Placed::Both(_, v) = &token {
            req = req.insert_header(("Authorization", format!("Bearer {v}")));
        }
        for (name, header, placed) in [("api_key", "X-API-Key", &key), ("user_id", "X-User-ID", &user), ("chat_id", "X-Chat-ID", &chat)] {
            if let Placed::Query(v) | Placed::Both(v, _) = placed {
                query.push(format!("{name}={}", encode(v)));
            }
            if let Placed::Header(v) | Placed::Both(_, v) = placed {
                req = req.insert_header((header, v.as_str()));
            }
        }
        let req = req.uri(&format!("/ws/chat?{}", query.join("&"))).to_http_request();
        let got = HandshakeParams::from_request(&req).present();
        let bearer = token.expected().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        match (key.expected(), bearer, got) {
            (Some(k), _, Ok(p)) => prop_assert_eq!(p.credential, Credential::ApiKey(k)),
            (Some(_), _, Err(ApiError::MissingParam { .. })) => prop_assert!(user.expected().is_none() || chat.expected().is_none()),
            (None, Some(t), Ok(p)) => {
                // A query token is taken as sent; a header's is trimmed like any bearer value.
                let expected = match &token { Placed::Query(v) | Placed::Both(v, _) => v.clone(), Placed::Header(_) | Placed::Absent => t };
                prop_assert_eq!(p.credential, Credential::Token(expected));
                prop_assert_eq!(p.user_id, user.expected());
                prop_assert_eq!(p.chat_id, chat.expected());
            }
            (None, None, Err(ApiError::MissingParam { name, .. })) => prop_assert_eq!(name, "api_key"),
            (k, t, got) => prop_assert!(false, "key {k:?}, token {t:?}: got {got:?}"),
        }
    }
}
