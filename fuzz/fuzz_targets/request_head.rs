//! A request head as a client may send it: read by the gateway's own HTTP/1.1 parser (the one
//! plain client connections use), then through its head handling — framing checks, hop-by-hop
//! stripping, X-Forwarded-*, request IDs, upgrade detection and routing — and whatever follows
//! the head through the chunked decoder. None of it may panic.
#![no_main]

use std::time::Duration;

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use scalegate::config::Config;
use scalegate::http1::declared_chunked_length;
use scalegate::proxy::client_h1::{read_request_head, ClientLimits};
use scalegate::proxy::headers::{
    check_framing, drop_underscored, is_sane_request_id, websocket_upgrade, ForwardedFields,
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
    let limits = ClientLimits {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_head: 8192,
        max_headers: 100,
        max_uri: 4096,
        underscores_in_headers: false,
        max_body: 1 << 20,
    };
    let parsed = read_request_head(data, &limits);
    // What follows a complete head is a body; anything else is fed to the decoder whole.
    let body = match &parsed {
        Ok(Some((_, head_len))) => &data[*head_len..],
        _ => data,
    };
    let _ = declared_chunked_length(body);
    let Ok(Some((request, _))) = parsed else {
        return;
    };
    let mut headers = request.headers;
    let _ = check_framing(&mut headers);
    if let Some(id) = headers.get("x-request-id") {
        let _ = is_sane_request_id(id);
    }
    let host = headers.get(http::header::HOST).map(HeaderValue::as_bytes);
    let config = Config::from_toml(ROUTES).expect("the fuzz routes are valid");
    let _ = match_route(&config.routes, host, request.uri.path());
    let upgrade = websocket_upgrade(&headers);
    let mut forwarded = headers.clone();
    // What the HTTP/2 path does to the same fields.
    drop_underscored(&mut forwarded);
    let _ = ForwardedFields::take(
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
