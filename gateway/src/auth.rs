//! Tokens: random API keys and the admin token, stored only as sha256
//! hashes and compared in constant time.
//!
//! Keys carry 256 random bits, so a plain sha256 is enough to make a
//! stolen database useless (no dictionary can invert it).

use anyhow::Result;
use sha2::{Digest, Sha256};

/// Prefix of tenant API keys.
pub const KEY_PREFIX: &str = "gf_";
/// Prefix of the admin token.
pub const ADMIN_PREFIX: &str = "gfadmin_";

/// Who a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The operator: manages tenants and keys, is no tenant.
    Admin,
    /// A tenant's API key.
    Tenant(String),
}

/// The sha256 of a token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

impl TokenHash {
    /// Hashes a presented token.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// From stored bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Equality that takes the same time wherever the hashes differ.
    pub fn matches(&self, other: &TokenHash) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// A fresh token: `prefix` + 64 hex digits (256 random bits).
pub fn generate(prefix: &str) -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("reading the system's random source: {e}"))?;
    Ok(format!("{prefix}{}", hex::encode(bytes)))
}

/// The short public id of a key, safe to show in listings.
pub fn key_id(key: &str) -> String {
    key.chars().take(KEY_PREFIX.len() + 8).collect()
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_long_random_and_distinct() {
        let a = generate(KEY_PREFIX).unwrap();
        let b = generate(KEY_PREFIX).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_PREFIX.len() + 64);
        assert!(a.starts_with(KEY_PREFIX));
    }

    #[test]
    fn hashes_match_only_the_same_token() {
        let hash = TokenHash::of("gf_abc");
        assert!(hash.matches(&TokenHash::of("gf_abc")));
        assert!(!hash.matches(&TokenHash::of("gf_abd")));
    }

    #[test]
    fn parses_bearer_headers() {
        assert_eq!(bearer("Bearer gf_x"), Some("gf_x"));
        assert_eq!(bearer("bearer  gf_x "), Some("gf_x"));
        assert_eq!(bearer("Basic Zm9v"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
