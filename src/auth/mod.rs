//! API keys: which configured key a request presents, found by the SHA-256 digest of what it
//! sent, so the time taken tells nothing of any key and does not grow with their number. Keys
//! are identified by a fingerprint from here on ([`ApiKeyId`]), so nothing downstream
//! (rate-limit keys, logs) ever sees a key itself.

use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::limits::AuthConfig;

/// The configured API keys and the header that carries them.
pub struct ApiKeys {
    header: HeaderName,
    /// What a 401 says of how to authenticate: the header the key goes in.
    pub challenge: HeaderValue,
    /// By the SHA-256 digest of each key.
    keys: HashMap<[u8; 32], ApiKeyId>,
}

/// Which API key a request presents: a 64-bit fingerprint of the key. It stays the key's
/// however the list is edited and reloaded (a position would pass one client's rate-limit
/// counters to another when a key before it is removed), and tells nothing usable of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApiKeyId(pub u64);

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Wrong,
}

impl ApiKeys {
    pub fn new(config: &AuthConfig) -> ApiKeys {
        let challenge = format!("ApiKey header=\"{}\"", config.header);
        ApiKeys {
            challenge: HeaderValue::try_from(challenge).expect("a header name is a valid value"),
            header: config.header.clone(),
            keys: config
                .api_keys
                .iter()
                .map(|k| {
                    let id = ApiKeyId(crate::balance::hash_bytes(k.as_bytes()));
                    (digest(k.as_bytes()), id)
                })
                .collect(),
        }
    }

    /// The key the request presents. One digest of what it sent and one lookup, whatever the
    /// number of keys: timing tells nothing usable (finding a digest close to a key's is
    /// finding the key), and a long value costs a hash, not a comparison with every key.
    pub fn identify(&self, headers: &HeaderMap) -> Result<ApiKeyId, AuthFailure> {
        let presented = headers.get(&self.header).ok_or(AuthFailure::Missing)?;
        let found = self.keys.get(&digest(presented.as_bytes()));
        found.copied().ok_or(AuthFailure::Wrong)
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, key);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Equality whose time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_challenge_names_the_configured_header() {
        let keys = ApiKeys::new(&AuthConfig {
            header: HeaderName::from_static("x-client-token"),
            api_keys: vec!["a-key-of-some-length".into()],
        });
        assert_eq!(keys.challenge, "ApiKey header=\"x-client-token\"");
    }

    #[test]
    fn keys_are_identified_by_a_fingerprint_that_outlives_list_edits() {
        let keys = |list: &[&str]| {
            ApiKeys::new(&AuthConfig {
                header: HeaderName::from_static("x-api-key"),
                api_keys: list.iter().map(|k| (*k).to_owned()).collect(),
            })
        };
        let before = keys(&["first-key-1", "second-key-2"]);
        let mut headers = HeaderMap::new();
        assert_eq!(before.identify(&headers), Err(AuthFailure::Missing));
        headers.insert("x-api-key", HeaderValue::from_static("second-key-2"));
        let second = before.identify(&headers).unwrap();
        // The first key removed, another added behind: the second, now first in the list, is
        // still itself, and the new one, where it stood, is not.
        let after = keys(&["second-key-2", "third-key-3"]);
        assert_eq!(after.identify(&headers), Ok(second));
        headers.insert("x-api-key", HeaderValue::from_static("third-key-3"));
        assert_ne!(after.identify(&headers).unwrap(), second);
        headers.insert("x-api-key", HeaderValue::from_static("second-key-"));
        assert_eq!(after.identify(&headers), Err(AuthFailure::Wrong));
    }

    #[test]
    fn constant_time_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
