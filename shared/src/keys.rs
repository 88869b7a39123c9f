//! Tenant API keys: generated with 256 bits of entropy, stored only as a SHA-256 hash.
//!
//! A fast hash is right here (unlike for passwords): keys are random, so there is nothing to
//! brute-force, and the hash is used as an index to find the tenant in one lookup. The final
//! equality check is constant-time so that response timing says nothing about the stored hash.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix that makes Parley keys recognisable in secret scanners.
const PREFIX: &str = "pk_";

/// Generates a new random API key (`pk_` + 64 hex characters).
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{PREFIX}{}", hex::encode(bytes))
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
    fn keys_are_unique_and_hash_stably() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX) && a.len() == 67);
        assert!(hashes_equal(&hash(&a), &hash(&a)));
        assert!(!hashes_equal(&hash(&a), &hash(&b)));
    }
}
