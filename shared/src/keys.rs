//! Tenant API keys: generated with 256 bits of entropy, stored only as a SHA-256 hash.
//!
//! A fast hash is right here (unlike for passwords): keys are random, so there is nothing to
//! brute-force, and the hash is used as an index to find the tenant in one lookup. The final
//! equality check is constant-time so that response timing says nothing about the stored hash.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The stored hash of a tenant's API key. Besides finding the tenant, it seeds the tenant's
/// client-token secret (`gateway::tokens`), so it changes with every key rotation; its `Debug`
/// form never shows it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct KeyHash(pub String);

impl std::fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHash(..)")
    }
}

/// Prefix that makes Parley keys recognisable in secret scanners.
const PREFIX: &str = "pk_";

/// Generates a new random API key (`pk_` + 64 hex characters).
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{PREFIX}{}", hex::encode(bytes))
}

/// Whether `key` has the shape of a Parley key (`pk_` + 64 lowercase hex characters). Anything
/// else is refused before any lookup, so that made-up keys cost no store query.
pub fn looks_like_key(key: &str) -> bool {
    key.strip_prefix(PREFIX).is_some_and(|rest| {
        rest.len() == 64 && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The hex SHA-256 of a key, as stored.
pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Compares two stored hashes without leaking where they differ.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_shape_of_a_generated_key_looks_like_a_key() {
        assert!(looks_like_key(&generate()));
        for bad in [
            "",
            "pk_",
            "nope",
            "pk_abc",
            &generate().to_uppercase(),
            &format!("{}0", generate()),
        ] {
            assert!(!looks_like_key(bad), "{bad}");
        }
    }

    #[test]
    fn keys_are_unique_and_hash_stably() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX) && a.len() == 67);
        assert!(hashes_equal(&hash(&a), &hash(&a)));
        assert!(!hashes_equal(&hash(&a), &hash(&b)));
    }
}
