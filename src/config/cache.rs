//! The cache's config: the top-level `[cache]` table and each route's `cache = { ... }`, as
//! written (serde types with the documented defaults) and validated.

use std::time::Duration;

use serde::Deserialize;

use super::{parse_hash_key, Problems};
use crate::balance::HashKey;

/// `[cache]`: the store all cached routes share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Bound on the stored bytes (bodies, headers and keys).
    pub max_size: u64,
    pub store: CacheStoreKind,
}

/// Where entries live besides this process's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStoreKind {
    Memory,
    /// Memory first, then Redis (`[state] redis_url`), shared by every replica.
    Redis,
}

/// A route's `cache = { ... }`: routes without it are never cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCacheConfig {
    /// Freshness when the response gives none (or always, with `override_ttl`).
    pub ttl: Duration,
    /// The statuses `ttl` applies to; `None`: those a cache may store on its own.
    pub ttl_statuses: Option<Vec<u16>>,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Larger bodies stream through uncached.
    pub max_body: u64,
    /// Added to method + host + path + query.
    pub key: Vec<HashKey>,
    pub override_ttl: bool,
    pub cache_set_cookie: bool,
    pub allow_authorization: bool,
    /// Paths fetched at start and kept fresh.
    pub warm: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawCache {
    #[serde(deserialize_with = "super::units::size_text")]
    pub max_size: String,
    pub store: String,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            max_size: "256MiB".into(),
            store: "memory".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawRouteCache {
    pub ttl: String,
    pub ttl_statuses: Option<Vec<u16>>,
    pub stale_while_revalidate: String,
    pub stale_if_error: String,
    #[serde(deserialize_with = "super::units::size_text")]
    pub max_body: String,
    pub key: Vec<String>,
    #[serde(rename = "override")]
    pub override_ttl: bool,
    pub cache_set_cookie: bool,
    pub allow_authorization: bool,
    pub warm: Vec<String>,
}

impl Default for RawRouteCache {
    fn default() -> Self {
        RawRouteCache {
            ttl: "60s".into(),
            ttl_statuses: None,
            stale_while_revalidate: "0s".into(),
            stale_if_error: "0s".into(),
            max_body: "1MiB".into(),
            key: Vec::new(),
            override_ttl: false,
            cache_set_cookie: false,
            allow_authorization: false,
            warm: Vec::new(),
        }
    }
}

/// `has_redis`: whether `[state] redis_url` is set.
pub(super) fn validate_cache(p: &mut Problems, raw: &RawCache, has_redis: bool) -> CacheConfig {
    let max_size = p.size("cache.max_size", &raw.max_size);
    if max_size == 0 {
        p.push_unless_reported("cache.max_size", "must be more than 0");
    }
    let store = match raw.store.as_str() {
        "memory" => CacheStoreKind::Memory,
        "redis" => {
            if !has_redis {
                p.push("cache.store", "\"redis\" needs state.redis_url");
            }
            CacheStoreKind::Redis
        }
        other => {
            p.push(
                "cache.store",
                format!("`{other}`: expected memory or redis"),
            );
            CacheStoreKind::Memory
        }
    };
    CacheConfig { max_size, store }
}

/// `key` is the route's key, e.g. `routes[0].cache`; `host` the route's host pattern.
pub(super) fn validate_route_cache(
    p: &mut Problems,
    key: &str,
    raw: &RawRouteCache,
    host: Option<&str>,
) -> RouteCacheConfig {
    for (i, path) in raw.warm.iter().enumerate() {
        if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
            p.push(
                format!("{key}.warm[{i}]"),
                format!("`{path}` is not a path starting with /"),
            );
        }
    }
    if !raw.warm.is_empty() && host.is_none_or(|h| h.starts_with('*')) {
        p.push(
            format!("{key}.warm"),
            "only a route with an exact `host` can be warmed: entries are kept per Host, and \
             which one would it be?",
        );
    }
    for (i, status) in raw.ttl_statuses.iter().flatten().enumerate() {
        if !(200..=599).contains(status) || matches!(status, 206 | 304) {
            p.push(
                format!("{key}.ttl_statuses[{i}]"),
                format!("{status}: a final status of a whole answer (200-599, not 206 or 304)"),
            );
        }
    }
    let max_body = p.size(&format!("{key}.max_body"), &raw.max_body);
    if max_body > u64::from(u32::MAX / 2) {
        p.push(format!("{key}.max_body"), "must be at most 2GiB");
    }
    RouteCacheConfig {
        ttl: p.duration(&format!("{key}.ttl"), &raw.ttl),
        ttl_statuses: raw.ttl_statuses.clone(),
        stale_while_revalidate: p.duration(
            &format!("{key}.stale_while_revalidate"),
            &raw.stale_while_revalidate,
        ),
        stale_if_error: p.duration(&format!("{key}.stale_if_error"), &raw.stale_if_error),
        max_body,
        key: raw
            .key
            .iter()
            .enumerate()
            .map(|(i, part)| parse_hash_key(p, &format!("{key}.key[{i}]"), part))
            .collect(),
        override_ttl: raw.override_ttl,
        cache_set_cookie: raw.cache_set_cookie,
        allow_authorization: raw.allow_authorization,
        warm: raw.warm.clone(),
    }
}
