//! The instance side of HTTP/2 (`protocol = "h2"` over TLS, `"h2c"` over TCP) with hyper's
//! client: one multiplexed connection per instance, opened on first use and again once it
//! closed; requests run concurrently on it. The answer body is hyper's, wrapped so it holds
//! the request's in-flight guard to its end.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::HOST;
use http::request::Parts;
use http::uri::{Authority, Scheme};
use http::{Request, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::body::{BoxError, ClientBodyFailure, ForwardBody};
use super::connect::{ConnectError, Connector};
use super::headers::ForwardedFields;

/// Flow-control windows towards instances: hyper's defaults (64 KiB) cap a stream at a window
/// per round trip, far below loopback or LAN bandwidth.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// The shared HTTP/2 connection to one instance.
#[derive(Default)]
pub struct Http2Conn {
    sender: ArcSwapOption<SendRequest<Upload>>,
    /// Held while (re)connecting only, so a burst of requests on a closed connection opens one
    /// new connection, not one each; requests on a live connection never take it.
    connecting: tokio::sync::Mutex<()>,
}

/// How sending on the shared connection failed.
pub enum Http2Error {
    /// The request never reached the instance; its body is given back for a retry.
    NotSent(String, ForwardBody),
    Sent(String),
    /// The instance reset the stream: `refused` (REFUSED_STREAM) means it did not process the
    /// request at all (RFC 9113 §8.7); either way the connection, and the instance, are fine.
    Reset {
        reason: String,
        refused: bool,
    },
    /// The client's body failed: not the instance's fault.
    Client(ClientBodyFailure),
}

impl Http2Conn {
    /// A sender on the live connection, connecting first when there is none.
    pub async fn sender(&self, connector: &Connector) -> Result<SendRequest<Upload>, ConnectError> {
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        // Another request is connecting: wait for it, but no longer than a connect may take,
        // so requests do not queue behind a run of connect timeouts to a dead instance.
        let _connecting = tokio::time::timeout(connector.timeout(), self.connecting.lock())
            .await
            .map_err(|_| ConnectError::Timeout)?;
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let stream = connector.connect().await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|err| ConnectError::Http2(err.to_string()))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "HTTP/2 connection to an instance ended with an error");
            }
        });
        self.sender.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    fn live(&self) -> Option<SendRequest<Upload>> {
        self.sender
            .load()
            .as_ref()
            .filter(|sender| !sender.is_closed())
            .map(|sender| SendRequest::clone(sender))
    }
}

/// Sends one request; resolves with the answer head.
pub async fn send(
    mut sender: SendRequest<Upload>,
    request: Request<ForwardBody>,
) -> Result<hyper::Response<Incoming>, Http2Error> {
    let outcome = (!request.body().is_end_stream()).then(Arc::default);
    let request = request.map(|body| Upload {
        body,
        outcome: outcome.clone(),
    });
    sender.try_send_request(request).await.map_err(|mut err| {
        if let Some(request) = err.take_message() {
            return Http2Error::NotSent(err.into_error().to_string(), request.into_body().body);
        }
        if let Some(failure) = outcome.and_then(|outcome| outcome.get().cloned()) {
            return Http2Error::Client(failure);
        }
        let error = err.into_error();
        match stream_reset(&error) {
            Some(reason) => Http2Error::Reset {
                refused: reason == h2::Reason::REFUSED_STREAM,
                reason: error.to_string(),
            },
            None => Http2Error::Sent(error.to_string()),
        }
    })
}

/// The reason of a stream the instance reset on its own (not the whole connection going away).
fn stream_reset(error: &hyper::Error) -> Option<h2::Reason> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.is_reset().then(|| h2.reason()).flatten();
        }
        source = cause.source();
    }
    None
}

/// The client's body on its way to an HTTP/2 instance. hyper sends it from a task of its own
/// and then only reports a broken stream; the outcome noted here tells a body over `max_body`
/// (413) or a client gone from an instance failure.
pub struct Upload {
    body: ForwardBody,
    /// `None` for an empty body, which cannot fail.
    outcome: Option<Arc<OnceLock<ClientBodyFailure>>>,
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let (Some(Err(err)), Some(outcome)) = (&frame, &this.outcome) {
            let _ = outcome.set(ClientBodyFailure::of(err));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The HTTP/2 form of a request's head: absolute URI with the Host header (else the instance)
/// as authority, the other fields as they are; hyper leaves out the HTTP/1.1 connection fields.
/// Host itself goes: some servers (nginx) refuse it next to `:authority` as a duplicate.
pub fn request(
    parts: &Parts,
    fields: Option<&ForwardedFields>,
    tls: bool,
    instance: &str,
) -> Result<Request<()>, String> {
    let authority = parts
        .headers
        .get(HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        .map_or_else(|| Authority::try_from(instance), Ok)
        .map_err(|err| format!("no authority for the instance: {err}"))?;
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(if tls { Scheme::HTTPS } else { Scheme::HTTP })
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|err| err.to_string())?;
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_2;
    *request.headers_mut() = parts.headers.clone();
    request.headers_mut().remove(HOST);
    if let Some(fields) = fields {
        fields.insert_into(request.headers_mut());
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_get_an_absolute_uri_from_the_host() {
        let (mut parts, ()) = Request::get("/a?b=1")
            .header(HOST, "api.test")
            .header("x-one", "1")
            .body(())
            .unwrap()
            .into_parts();
        let with_host = request(&parts, None, true, "127.0.0.1:9").unwrap();
        assert_eq!(with_host.uri(), "https://api.test/a?b=1");
        assert_eq!(with_host.version(), Version::HTTP_2);
        assert_eq!(with_host.headers()["x-one"], "1");
        assert!(!with_host.headers().contains_key(HOST));
        parts.headers.remove(HOST);
        let without = request(&parts, None, false, "127.0.0.1:9").unwrap();
        assert_eq!(without.uri(), "http://127.0.0.1:9/a?b=1");
    }
}
