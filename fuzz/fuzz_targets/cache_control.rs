//! Response headers as an instance may send them, through the cache's RFC 9111 decisions:
//! Cache-Control parsing, storability and freshness, Vary; and the same fields as a client's
//! conditions and Range against a stored answer. None of it may panic, and a range served is
//! always inside the stored body.
#![no_main]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use scalegate::cache::policy::{
    precondition, range_answer, storable, vary_names, vary_values, CacheControl, RangeAnswer,
};
use scalegate::config::Config;

const ROUTE: &str = r#"
[upstreams.app]
instances = ["127.0.0.1:1"]
[[routes]]
upstream = "app"
cache = { ttl = "60s", stale_while_revalidate = "30s", stale_if_error = "5m" }
"#;

fuzz_target!(|data: &[u8]| {
    // Header lines "name: value" separated by newlines; the first byte picks the status.
    let Some((&status_byte, rest)) = data.split_first() else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in rest.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) {
            headers.append(name, value);
        }
    }
    let _ = CacheControl::parse(&headers);
    let config = Config::from_toml(ROUTE).expect("the fuzz route is valid");
    let rules = config.routes[0].cache.as_ref().expect("the route caches");
    let status = StatusCode::from_u16(200 + u16::from(status_byte) % 400).unwrap_or(StatusCode::OK);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(freshness) = storable(status, &headers, status_byte & 1 == 1, rules, now) {
        let _ = freshness.keep_for();
    }
    if let Some(names) = vary_names(&headers) {
        let _ = vary_values(&names, &headers);
    }
    let _ = precondition(&headers, status, &headers);
    let length = u64::from(status_byte);
    if let RangeAnswer::Part { first, last } = range_answer(&headers, status, &headers, length) {
        assert!(first <= last && last < length, "{first}-{last} of {length}");
    }
});
