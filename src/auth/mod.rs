//! API keys: which configured key a request presents, compared in constant time. Keys are
//! identified by their position in the list from here on, so nothing downstream (rate-limit
//! keys, logs) ever sees a key itself.

use http::{HeaderMap, HeaderName};

use crate::config::limits::AuthConfig;

/// The configured API keys and the header that carries them.
pub struct ApiKeys {
    header: HeaderName,
    keys: Vec<Box<[u8]>>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Wrong,
}

impl ApiKeys {
    pub fn new(config: &AuthConfig) -> ApiKeys {
        ApiKeys {
            header: config.header.clone(),
            keys: config
                .api_keys
                .iter()
                .map(|k| k.as_bytes().into())
                .collect(),
        }
    }

    /// Position of the key the request presents. Every configured key is compared, in
    /// constant time, so timing reveals neither a key nor which one matched.
    pub fn identify(&self, headers: &HeaderMap) -> Result<usize, AuthFailure> {
        let presented = headers.get(&self.header).ok_or(AuthFailure::Missing)?;
        let mut found = None;
        for (index, key) in self.keys.iter().enumerate() {
            if constant_time_eq(presented.as_bytes(), key) {
                found = Some(index);
            }
        }
        found.ok_or(AuthFailure::Wrong)
    }
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
    use http::HeaderValue;

    #[test]
    fn keys_are_identified_by_position() {
        let keys = ApiKeys::new(&AuthConfig {
            header: HeaderName::from_static("x-api-key"),
            api_keys: vec!["first-key-1".into(), "second-key-2".into()],
        });
        let mut headers = HeaderMap::new();
        assert_eq!(keys.identify(&headers), Err(AuthFailure::Missing));
        headers.insert("x-api-key", HeaderValue::from_static("second-key-2"));
        assert_eq!(keys.identify(&headers), Ok(1));
        headers.insert("x-api-key", HeaderValue::from_static("second-key-"));
        assert_eq!(keys.identify(&headers), Err(AuthFailure::Wrong));
    }

    #[test]
    fn constant_time_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
