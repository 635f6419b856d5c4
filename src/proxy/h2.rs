//! The instance side of HTTP/2 (`protocol = "h2"` over TLS, `"h2c"` over TCP) with hyper's
//! client: multiplexed connections per instance, opened on first use, again once one closed,
//! and another whenever each open one carries [`STREAMS_PER_CONNECTION`] requests, or the
//! instance's own stream limit when that is lower (as Envoy opens another at the instance's
//! limit, rather than queueing: hyper would hold the request, and fail it unsent, though
//! counted as sent, when a GOAWAY came first). The answer body is
//! hyper's, wrapped so it holds the request's in-flight guard and stream slot to its end.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::HOST;
use http::request::Parts;
use http::uri::{Authority, Scheme};
use http::{Request, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::body::{BoxError, ClientBodyFailure, ForwardBody};
use super::connect::{ConnectError, Connector};
use super::error::described;
use super::headers::ForwardedFields;
use crate::http1::MAX_HEAD;

/// Requests one connection to an instance carries at once; past it another connection opens.
/// Below the stream limits servers advertise (nginx 128, Go 250, h2o and Apache 100), so
/// requests do not queue unseen for a stream slot at the instance, their wait counted against
/// it.
pub const STREAMS_PER_CONNECTION: usize = 100;

/// Flow-control windows towards instances: hyper's defaults (64 KiB) cap a stream at a window
/// per round trip, far below loopback or LAN bandwidth. The connection's window covers every
/// stream's: a stream's unread data holds the connection's window too (until the gateway's
/// client reads it), so with less a few stalled downloads would stop every other answer on
/// the connection. What it may hold is bounded by the streams' windows all the same.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = STREAM_WINDOW * STREAMS_PER_CONNECTION as u32;

/// The HTTP/2 connections to one instance.
pub struct Http2Connections {
    connections: ArcSwap<Vec<Arc<Http2Connection>>>,
    /// Held while connecting only, so a burst of requests opens one new connection, not one
    /// each; requests that find a free stream slot never take it.
    connecting: tokio::sync::Mutex<()>,
    /// The streams each connection may carry: [`STREAMS_PER_CONNECTION`], or the instance's
    /// SETTINGS_MAX_CONCURRENT_STREAMS when lower, as its connections' tasks last read it (a
    /// new connection takes it before its own SETTINGS came).
    limit: Arc<AtomicUsize>,
}

impl Default for Http2Connections {
    fn default() -> Self {
        Http2Connections {
            connections: ArcSwap::default(),
            connecting: tokio::sync::Mutex::default(),
            limit: Arc::new(AtomicUsize::new(STREAMS_PER_CONNECTION)),
        }
    }
}

/// One HTTP/2 connection and the requests it carries.
struct Http2Connection {
    sender: SendRequest<Upload>,
    streams: AtomicUsize,
}

/// A request's place on a connection, held until its answer ends.
pub struct StreamSlot(Arc<Http2Connection>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How sending on the shared connection failed.
pub enum Http2Error {
    /// The request never reached the instance.
    NotSent(String),
    Sent(String),
    /// The instance reset the stream: `refused` (REFUSED_STREAM) means it did not process the
    /// request at all (RFC 9113 §8.7); either way the connection, and the instance, are fine.
    Reset {
        reason: String,
        refused: bool,
    },
    /// The instance went away (a graceful GOAWAY) before it took the stream up: it did not
    /// process the request (RFC 9113 §6.8), which may go again on a new connection.
    GoneAway(String),
    /// The client's body failed: not the instance's fault.
    Client(ClientBodyFailure),
    /// The instance took longer than the response timeout over a part of the body or the answer.
    TimedOut,
}

impl Http2Connections {
    /// A sender and a stream slot on a live connection with room, connecting first when there
    /// is none.
    pub async fn sender(
        &self,
        connector: &Connector,
    ) -> Result<(SendRequest<Upload>, StreamSlot), ConnectError> {
        if let Some(slot) = self.free_slot() {
            return Ok(slot);
        }
        // Another request is connecting: wait for it, but no longer than a connect may take,
        // so requests do not queue behind a run of connect timeouts to a dead instance.
        let _connecting = tokio::time::timeout(connector.timeout(), self.connecting.lock())
            .await
            .map_err(|_| ConnectError::Timeout)?;
        if let Some(slot) = self.free_slot() {
            return Ok(slot);
        }
        let stream = connector.connect().await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            // As much of an answer head as an HTTP/1.1 instance may send.
            .max_header_list_size(MAX_HEAD as u32)
            // Until its SETTINGS come, the limit the instance's other connections told.
            .initial_max_send_streams(self.limit.load(Ordering::Relaxed))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|err| ConnectError::Http2(described(&err)))?;
        let published = self.limit.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            // The instance's stream limit may come with any SETTINGS frame: read on each poll.
            let ended = std::future::poll_fn(|cx| {
                let polled = std::future::Future::poll(connection.as_mut(), cx);
                let allowed = connection.current_max_send_streams().max(1);
                published.store(allowed.min(STREAMS_PER_CONNECTION), Ordering::Relaxed);
                polled
            })
            .await;
            if let Err(err) = ended {
                tracing::debug!(%err, "HTTP/2 connection to an instance ended with an error");
            }
        });
        let connection = Arc::new(Http2Connection {
            sender: sender.clone(),
            streams: AtomicUsize::new(1),
        });
        self.connections.rcu(|connections| {
            let mut kept: Vec<Arc<Http2Connection>> = connections
                .iter()
                .filter(|connection| !connection.sender.is_closed())
                .cloned()
                .collect();
            kept.push(connection.clone());
            kept
        });
        Ok((sender, StreamSlot(connection)))
    }

    /// Drops the connection of `slot`, which a GOAWAY ended (it takes no new stream), so that
    /// the next request opens a new one rather than wait for its last streams to finish.
    pub fn forget(&self, slot: &StreamSlot) {
        self.connections.rcu(|connections| {
            connections
                .iter()
                .filter(|connection| !Arc::ptr_eq(connection, &slot.0))
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// Closes the connections a burst opened beside the first once they carry nothing (and
    /// drops closed ones): requests fill the first with room, so the others would sit idle
    /// for good. A request that took a slot on one meanwhile finishes on it.
    pub fn close_idle(&self) {
        let connections = self.connections.load();
        let idle = |connection: &Arc<Http2Connection>| {
            connection.sender.is_closed() || connection.streams.load(Ordering::Relaxed) == 0
        };
        if !connections.iter().skip(1).any(idle) {
            return;
        }
        self.connections.rcu(|connections| {
            connections
                .iter()
                .enumerate()
                .filter(|(at, connection)| {
                    !connection.sender.is_closed() && (*at == 0 || !idle(connection))
                })
                .map(|(_, connection)| connection.clone())
                .collect::<Vec<_>>()
        });
    }

    /// A live connection's sender with a stream slot taken on it, if one has room.
    fn free_slot(&self) -> Option<(SendRequest<Upload>, StreamSlot)> {
        let connections = self.connections.load();
        let limit = self.limit.load(Ordering::Relaxed);
        connections.iter().find_map(|connection| {
            if connection.sender.is_closed() {
                return None;
            }
            connection
                .streams
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |taken| {
                    (taken < limit).then_some(taken + 1)
                })
                .ok()?;
            Some((
                SendRequest::clone(&connection.sender),
                StreamSlot(connection.clone()),
            ))
        })
    }
}

/// How long a failed exchange may take to give its body back: hyper drops it from the task
/// that sent it once the stream ended, which follows the failure at once.
const GIVE_BACK_WAIT: Duration = Duration::from_millis(100);

/// Sends one request with `body`, `started` now; resolves with the answer head, or `TimedOut`
/// once the instance kept the gateway waiting for `timeout` (see `UploadWatch`). A failed
/// exchange gives the body back when hyper lets it go (else it is left `Spent`), so it can be
/// rewound for another attempt.
pub async fn send(
    mut sender: SendRequest<Upload>,
    request: Request<()>,
    body: &mut ForwardBody,
    started: Instant,
    timeout: Duration,
) -> Result<hyper::Response<Incoming>, Http2Error> {
    let (upload, mut given_back) = Upload::take(body, started);
    let watch = upload.watch.clone();
    let request = request.map(|()| upload);
    let expired = async {
        match &watch {
            Some(watch) => watch.expired(timeout).await,
            None => tokio::time::sleep_until(started + timeout).await,
        }
    };
    let answer = tokio::select! {
        biased;
        answer = sender.try_send_request(request) => answer,
        () = expired => {
            // A body all sent before the wait for the answer began is back already.
            if let Some(Ok(back)) = given_back.as_mut().map(oneshot::Receiver::try_recv) {
                *body = back;
            }
            return Err(Http2Error::TimedOut);
        }
    };
    let failure = match answer {
        Ok(response) => return Ok(response),
        Err(err) => sort_failure(err, watch.as_deref()),
    };
    if let Some(given_back) = given_back {
        if let Ok(Ok(back)) = tokio::time::timeout(GIVE_BACK_WAIT, given_back).await {
            *body = back;
        }
    }
    Err(failure)
}

/// What a failed exchange means for the request.
fn sort_failure(
    mut err: hyper::client::conn::TrySendError<Request<Upload>>,
    watch: Option<&UploadWatch>,
) -> Http2Error {
    if let Some(request) = err.take_message() {
        // Dropped, the request gives its body back.
        drop(request);
        return Http2Error::NotSent(described(&err.into_error()));
    }
    if let Some(failure) = watch.and_then(|watch| watch.failure.get().cloned()) {
        return Http2Error::Client(failure);
    }
    let error = err.into_error();
    let reason = described(&error);
    match h2_cause(&error) {
        Some(h2) if h2.is_reset() => Http2Error::Reset {
            refused: h2.reason() == Some(h2::Reason::REFUSED_STREAM),
            reason,
        },
        // A GOAWAY without an error only ends streams above its last one, which the
        // instance never took up; one with an error may end streams it was processing.
        Some(h2)
            if h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR) =>
        {
            Http2Error::GoneAway(reason)
        }
        _ => Http2Error::Sent(reason),
    }
}

/// The HTTP/2 error behind `error` (itself or a cause of it), if that is what ended it.
pub(crate) fn h2_cause<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e h2::Error> {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = cause.source();
    }
    None
}

/// The client's body on its way to an HTTP/2 instance. hyper sends it from a task of its own
/// and then only reports a broken stream; the outcome noted here tells a body over `max_body`
/// (413) or a client gone from an instance failure. Dropped, it gives the body back to the
/// exchange (`give_back`), which may send it again.
pub struct Upload {
    body: ForwardBody,
    /// `None` for an empty body, which cannot fail and is never polled.
    watch: Option<Arc<UploadWatch>>,
    give_back: Option<oneshot::Sender<ForwardBody>>,
}

impl Upload {
    /// Takes `body` for one exchange `started` now, leaving it `Spent` until given back by
    /// the receiver returned with it (`None` for an empty body, which stays where it is).
    fn take(
        body: &mut ForwardBody,
        started: Instant,
    ) -> (Upload, Option<oneshot::Receiver<ForwardBody>>) {
        if body.is_end_stream() {
            let empty = Upload {
                body: ForwardBody::Empty,
                watch: None,
                give_back: None,
            };
            return (empty, None);
        }
        let (give_back, given_back) = oneshot::channel();
        let upload = Upload {
            body: std::mem::replace(body, ForwardBody::Spent),
            watch: Some(Arc::new(UploadWatch::new(started))),
            give_back: Some(give_back),
        };
        (upload, Some(given_back))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(give_back) = self.give_back.take() {
            // Nobody waits for it once the exchange succeeded.
            let _ = give_back.send(std::mem::replace(&mut self.body, ForwardBody::Spent));
        }
    }
}

/// What the upload of a body to an HTTP/2 instance tells the exchange: how the client's body
/// failed (hyper then only reports a broken stream), and since when the gateway waits on the
/// instance. The response timeout counts only that wait, as over HTTP/1.1: for the instance
/// to take the last part of the body (hyper polls for the next part once the flow-control
/// window lets it send), then for the answer head once the body is all out. While the next
/// part is still on its way from the client, no clock runs.
struct UploadWatch {
    failure: OnceLock<ClientBodyFailure>,
    /// Since when the instance is waited on; `None` while the client's next part is awaited.
    /// Receivers hear of a change only when the wait goes back to the instance.
    waiting_on_instance_since: watch::Sender<Option<Instant>>,
}

impl UploadWatch {
    fn new(head_sent: Instant) -> Self {
        UploadWatch {
            failure: OnceLock::new(),
            waiting_on_instance_since: watch::Sender::new(Some(head_sent)),
        }
    }

    /// Notes whether the last poll of the body waits on the client (`Pending`) or handed a
    /// part (or the end) to the instance.
    fn polled(&self, waiting_on_client: bool) {
        let now = (!waiting_on_client).then(Instant::now);
        self.waiting_on_instance_since.send_if_modified(|since| {
            let resumed = since.is_none() && now.is_some();
            *since = now;
            resumed
        });
    }

    /// Completes once one wait on the instance lasted `timeout`.
    async fn expired(&self, timeout: Duration) {
        let mut since = self.waiting_on_instance_since.subscribe();
        loop {
            let waiting = *since.borrow_and_update();
            match waiting {
                // The sender lives as long as `self`: `changed` cannot fail here.
                None => {
                    let _ = since.changed().await;
                }
                Some(from) => {
                    tokio::time::sleep_until(from + timeout).await;
                    if *since.borrow() == Some(from) {
                        return;
                    }
                }
            }
        }
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let Some(watch) = &this.watch else {
            return polled;
        };
        watch.polled(polled.is_pending());
        let frame = ready!(polled);
        if let Some(Err(err)) = &frame {
            let _ = watch.failure.set(ClientBodyFailure::of(err));
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

    /// The timeout counts each wait on the instance on its own and never a wait on the client.
    #[tokio::test(start_paused = true)]
    async fn only_waits_on_the_instance_expire() {
        let second = Duration::from_secs(1);
        let start = Instant::now();
        let watch = UploadWatch::new(start);
        let expired = watch.expired(second);
        tokio::pin!(expired);
        let steps = async {
            tokio::time::sleep(second / 2).await;
            watch.polled(false); // the instance took a part, and the next one is handed over
            tokio::time::sleep(second / 2).await;
            watch.polled(true); // the client's next part is not here yet
            tokio::time::sleep(second * 5).await;
            watch.polled(false); // it came, and went to the instance
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = &mut expired => {}
            () = steps => unreachable!(),
        }
        assert_eq!(Instant::now() - start, second * 7);
    }

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
