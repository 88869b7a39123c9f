//! Which characters Parley takes in the text that clients and operators send: everything but
//! the C0 control characters other than tab, newline and carriage return (U+0000–U+001F less
//! U+0009, U+000A, U+000D). NUL in particular: PostgreSQL refuses it in `text` and `jsonb`, so
//! a store-independent check here is what keeps such input a 400 (or `INVALID_MESSAGE`) on
//! every store instead of a server error on one. Checked on message content and metadata, chat
//! titles and metadata, user ids, tenant names and settings; the other C0 characters are
//! refused with NUL because no text a person writes holds them and terminals and logs misread
//! them.

use serde_json::{Map, Value};

/// Whether `c` is refused in text (see the module docs).
fn refused(c: char) -> bool {
    c < '\u{20}' && !matches!(c, '\t' | '\n' | '\r')
}

/// Whether a text holds a refused control character.
pub fn has_refused_control(text: &str) -> bool {
    text.chars().any(refused)
}

/// Whether a JSON value holds a refused control character in any string or object key, at any
/// depth.
pub fn json_has_refused_control(value: &Value) -> bool {
    match value {
        Value::String(s) => has_refused_control(s),
        Value::Array(items) => items.iter().any(json_has_refused_control),
        Value::Object(map) => map_has_refused_control(map),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// [`json_has_refused_control`] of an object.
pub fn map_has_refused_control(map: &Map<String, Value>) -> bool {
    map.iter()
        .any(|(k, v)| has_refused_control(k) || json_has_refused_control(v))
}

/// The sentence every refusal uses, after the name of what was refused.
pub const REFUSED_CONTROL: &str =
    "must not contain control characters other than tab, newline and carriage return";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_and_c0_are_refused_tab_newline_and_return_are_not() {
        assert!(has_refused_control("a\u{0}b"));
        assert!(has_refused_control("\u{1b}[31m"));
        assert!(!has_refused_control("line\nnext\r\n\ttabbed é ✓"));
        assert!(json_has_refused_control(
            &json!({"k": ["ok", {"deep": "\u{0}"}]})
        ));
        assert!(json_has_refused_control(&json!({"bad\u{0}key": 1})));
        assert!(!json_has_refused_control(
            &json!({"k": [1, true, null, "fine\n"]})
        ));
    }
}
