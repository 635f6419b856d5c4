//! A request head as a client may send it: parsed like hyper does (httparse), then through the
//! gateway's own head handling — framing checks, hop-by-hop stripping, X-Forwarded-*, request
//! IDs, upgrade detection and routing. None of it may panic.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use scalegate::config::Config;
use scalegate::proxy::headers::{
    check_framing, forward_request_headers, is_sane_request_id, requested_upgrade, strip_hop_by_hop,
};
use scalegate::proxy::router::match_route;

const ROUTES: &str = r#"
[upstreams.app]
instances = ["127.0.0.1:1"]
[[routes]]
host = "*.example.com"
path_prefix = "/api"
upstream = "app"
[[routes]]
upstream = "app"
"#;

fuzz_target!(|data: &[u8]| {
    let mut parsed = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut parsed);
    if !matches!(request.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let mut headers = HeaderMap::new();
    for h in request.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            headers.append(name, value);
        }
    }
    let _ = check_framing(&headers);
    if let Some(id) = headers.get("x-request-id") {
        let _ = is_sane_request_id(id);
    }
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.split(':').next().unwrap_or(h).to_string());
    let config = Config::from_toml(ROUTES).expect("the fuzz routes are valid");
    let _ = match_route(&config.routes, host.as_deref(), request.path.unwrap_or("/"));
    let upgrade = requested_upgrade(&headers);
    let mut forwarded = headers.clone();
    strip_hop_by_hop(&mut forwarded);
    forward_request_headers(
        &mut forwarded,
        &HeaderValue::from_static("192.0.2.1"),
        "http",
        headers.get(http::header::HOST).cloned(),
        &HeaderValue::from_static("fuzz"),
    );
    if let Some(protocol) = upgrade {
        scalegate::proxy::headers::restore_upgrade(&mut forwarded, protocol);
    }
});
