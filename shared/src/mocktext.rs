//! The deterministic text of the mock models: the built-in `mock` provider and the mock
//! OpenAI-compatible server answer the same request with the same words, so tests and load
//! runs can predict every token.

const WORDS: &[&str] = &[
    "I'd",
    "be",
    "happy",
    "to",
    "help",
    "you",
    "with",
    "your",
    "account",
    "question",
    "today",
    "let",
    "me",
    "check",
    "that",
    "for",
    "now",
    "thanks",
    "waiting",
    "here",
    "is",
    "what",
    "found",
    "it",
    "looks",
    "like",
    "everything",
    "works",
    "as",
    "expected",
    "please",
    "try",
    "again",
    "later",
];

/// FNV-1a: a tiny stable hash, so the same request gives the same reply on every platform.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The reply tokens for a model and the last message of a conversation (the first without, the
/// others with, a leading space).
pub fn reply_tokens(model: &str, last: &str, count: u64) -> Vec<String> {
    let mut seed = fnv1a(&[model, last]);
    (0..count)
        .map(|i| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let idx = usize::try_from((seed >> 33) % WORDS.len() as u64).unwrap_or(0);
            let word = if i == 0 { WORDS[0] } else { WORDS[idx] };
            if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            }
        })
        .collect()
}

/// A rough token count (whitespace-separated words), for providers that report no usage.
pub fn count_words(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}
