//! Errors the gateway answers itself: where they came from (client, routing, instance) and the
//! one status each maps to. Every error response is a small JSON body carrying the request ID.

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::{ClientBodyFailure, ClientLeft, GatewayBody};
use super::headers::X_REQUEST_ID;

/// nginx's status for a request whose client left before its answer.
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a status"),
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Logged as nginx logs it; nobody is left to read the answer.
    #[error("the client closed the request")]
    ClientLeft,
    #[error("request body is too large")]
    BodyTooLarge,
    #[error("request body arrived too slowly")]
    BodyTooSlow,
    #[error("request URI is too long")]
    UriTooLong,
    #[error("request header fields are too large or too many")]
    HeadersTooLarge,
    #[error("method not allowed: {0}")]
    MethodNotAllowed(&'static str),
    #[error(
        "HTTP version not supported: this connection speaks HTTP/1.x (HTTP/2 comes by its preface \
         in cleartext, by ALPN h2 over TLS)"
    )]
    VersionNotSupported,
    #[error("no route matches this request")]
    NoRoute,
    #[error("no healthy instance")]
    NoHealthyInstance,
    #[error("no instance answered: {0}")]
    InstanceFailed(String),
    #[error("instance did not answer in time")]
    InstanceTimeout,
    #[error("could not connect to an instance in time")]
    ConnectTimeout,
    /// With the challenge its answer carries (RFC 9110 §15.5.2: the header the key goes in).
    #[error("{reason}")]
    Unauthorized {
        reason: &'static str,
        challenge: HeaderValue,
    },
    #[error("rate limit exceeded, retry in {retry_after} s")]
    RateLimited {
        retry_after: u64,
        policy: HeaderValue,
        state: HeaderValue,
    },
    #[error("too many requests in flight, retry in {retry_after} s")]
    Overloaded { retry_after: u64 },
    #[error("the gateway is short of resources (file descriptors or memory), retry in 1 s")]
    GatewayShortage,
    /// A request a rate limit would hold past the end of the stop under way.
    #[error("the gateway is stopping before this request's turn: retry")]
    ShuttingDown,
    /// A connection over `max_connections` or `max_connections_per_ip`, refused before any
    /// request was read.
    #[error("{0}")]
    TooManyConnections(&'static str),
}

impl From<ClientBodyFailure> for ProxyError {
    fn from(failure: ClientBodyFailure) -> ProxyError {
        match failure {
            ClientBodyFailure::TooLarge => ProxyError::BodyTooLarge,
            ClientBodyFailure::TooSlow => ProxyError::BodyTooSlow,
            ClientBodyFailure::Left => ProxyError::ClientLeft,
            ClientBodyFailure::Broken(reason) => {
                tracing::debug!(%reason, "client request body failed");
                ProxyError::BadRequest("the request body is malformed")
            }
        }
    }
}

/// The second (since the epoch) of the last gateway-shortage failure logged.
static SHORTAGE_LOGGED: AtomicU64 = AtomicU64::new(0);

/// Whether this is the first call this second for `last`, which it then marks.
fn first_this_second(last: &AtomicU64) -> bool {
    let now = crate::clock::unix_ms_now() / 1000;
    last.swap(now, Ordering::Relaxed) != now
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ClientLeft => CLIENT_CLOSED_REQUEST,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::VersionNotSupported => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoHealthyInstance => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::InstanceFailed(_) => StatusCode::BAD_GATEWAY,
            ProxyError::InstanceTimeout | ProxyError::ConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Overloaded { .. }
            | ProxyError::GatewayShortage
            | ProxyError::ShuttingDown
            | ProxyError::TooManyConnections(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::ClientLeft => "client_closed_request",
            ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::BodyTooSlow => "body_too_slow",
            ProxyError::UriTooLong => "uri_too_long",
            ProxyError::HeadersTooLarge => "headers_too_large",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::VersionNotSupported => "version_not_supported",
            ProxyError::NoRoute => "no_route",
            ProxyError::NoHealthyInstance => "no_healthy_instance",
            ProxyError::InstanceFailed(_) => "bad_gateway",
            ProxyError::InstanceTimeout | ProxyError::ConnectTimeout => "gateway_timeout",
            ProxyError::Unauthorized { .. } => "unauthorized",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::GatewayShortage => "gateway_short_of_resources",
            ProxyError::ShuttingDown => "shutting_down",
            ProxyError::TooManyConnections(_) => "too_many_connections",
        }
    }

    /// Logs a failure on the gateway's or the instances' side (5xx) under the request ID.
    /// Overload refusals are expected under load: logging each would add to it.
    #[cold]
    pub fn log_failure(&self, request_id: &HeaderValue) {
        if !self.status().is_server_error() || matches!(self, ProxyError::Overloaded { .. }) {
            return;
        }
        // A shortage of the gateway's own descriptors fails every request at once: once a
        // second says it (hundreds of lines within a millisecond said nothing more).
        if matches!(self, ProxyError::GatewayShortage) && !first_this_second(&SHORTAGE_LOGGED) {
            return;
        }
        tracing::warn!(request_id = request_id.to_str().unwrap_or_default(), error = %self, "request failed");
    }

    /// The response for this error.
    #[cold]
    pub fn response(&self, request_id: &HeaderValue) -> Response<GatewayBody> {
        // What went wrong with an instance is for the log (under the request ID): its first
        // clause only goes to the client, not the names and addresses of the instances behind
        // (a certificate's), as nginx's 502 page says nothing of them.
        let reason = match self {
            ProxyError::InstanceFailed(reason) => {
                let clause = reason.split(": ").next().unwrap_or_default();
                format!("no instance answered: {clause}")
            }
            other => other.to_string(),
        };
        let body = serde_json::json!({
            "error": self.code(),
            "reason": reason,
            "request_id": request_id.to_str().unwrap_or_default(),
        });
        let mut response = Response::new(GatewayBody::full(body.to_string()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        if let ProxyError::Unauthorized { challenge, .. } = self {
            headers.insert(header::WWW_AUTHENTICATE, challenge.clone());
        }
        match self {
            ProxyError::RateLimited {
                retry_after,
                policy,
                state,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
                headers.insert(crate::ratelimit::RATELIMIT_POLICY.clone(), policy.clone());
                headers.insert(crate::ratelimit::RATELIMIT.clone(), state.clone());
            }
            ProxyError::Overloaded { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            // A stopping gateway's peers (or its restart) take the retry.
            ProxyError::GatewayShortage
            | ProxyError::TooManyConnections(_)
            | ProxyError::ShuttingDown => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            // RFC 9110 §15.5.6: a 405 lists what the target allows; CONNECT and TRACE are the
            // methods the gateway refuses for every target.
            ProxyError::MethodNotAllowed(_) => {
                headers.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            _ => {}
        }
        if matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::ClientLeft
                | ProxyError::VersionNotSupported
                | ProxyError::BodyTooLarge
                | ProxyError::BodyTooSlow
                | ProxyError::UriTooLong
                | ProxyError::HeadersTooLarge
                | ProxyError::TooManyConnections(_)
                | ProxyError::GatewayShortage
                | ProxyError::ShuttingDown
        ) {
            // The rest of the connection cannot be trusted to be framed as the client meant,
            // or there is to be no rest (out of descriptors, closing frees one; the gateway
            // stopping).
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if *self == ProxyError::ClientLeft {
            response.extensions_mut().insert(ClientLeft);
        }
        response
    }
}

/// `error` with its causes: hyper's own text is often only "http2 error" or "connection
/// error", the cause says which (a stream reset and its code, a GOAWAY, a TLS alert).
pub fn described(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_one_status_and_carries_the_request_id() {
        let id = HeaderValue::from_static("req-1");
        let cases = [
            (ProxyError::BadRequest("x"), 400),
            (ProxyError::BodyTooLarge, 413),
            (ProxyError::BodyTooSlow, 408),
            (ProxyError::UriTooLong, 414),
            (ProxyError::HeadersTooLarge, 431),
            (ProxyError::NoRoute, 404),
            (ProxyError::NoHealthyInstance, 503),
            (ProxyError::InstanceFailed("refused".into()), 502),
            (ProxyError::InstanceTimeout, 504),
            (ProxyError::ConnectTimeout, 504),
            (
                ProxyError::Unauthorized {
                    reason: "missing API key",
                    challenge: HeaderValue::from_static("ApiKey header=\"x-api-key\""),
                },
                401,
            ),
            (
                ProxyError::RateLimited {
                    retry_after: 3,
                    policy: HeaderValue::from_static("\"r\";q=20;w=60"),
                    state: HeaderValue::from_static("\"r\";r=0;t=3"),
                },
                429,
            ),
            (ProxyError::Overloaded { retry_after: 1 }, 503),
            (ProxyError::GatewayShortage, 503),
            (ProxyError::TooManyConnections("x"), 503),
        ];
        for (error, status) in cases {
            let response = error.response(&id);
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers()["x-request-id"], "req-1");
            if status == 429 {
                assert_eq!(response.headers()["retry-after"], "3");
                assert_eq!(response.headers()["ratelimit"], "\"r\";r=0;t=3");
            }
            let GatewayBody::Full(Some(body)) = response.into_body() else {
                panic!("expected a body")
            };
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["request_id"], "req-1");
        }
    }

    #[test]
    fn an_instance_failure_tells_the_client_its_kind_not_its_details() {
        let id = HeaderValue::from_static("req-1");
        let failed = ProxyError::InstanceFailed(
            "TLS handshake with the instance failed: invalid peer certificate: certificate not \
             valid for name \"db.internal\""
                .into(),
        );
        // The log line keeps it all.
        assert!(failed.to_string().contains("db.internal"));
        let GatewayBody::Full(Some(body)) = failed.response(&id).into_body() else {
            panic!("expected a body")
        };
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["reason"],
            "no instance answered: TLS handshake with the instance failed"
        );
    }
}
