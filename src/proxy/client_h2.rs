//! HTTP/2 clients (prior-knowledge h2c on the plain listener, ALPN h2 over TLS), served by
//! hyper, with the connection timers hyper's server lacks: a connection that opens no stream
//! within `header_read_timeout` (a preface sent in part included), one idle for `idle_timeout`,
//! and one whose client took no answer bytes for `idle_timeout` while every stream's answer
//! waited for it (nginx's `send_timeout`) are closed; a single stream paused that long among
//! served ones has its answer's source dropped (hyper offers no way to reset one stream from
//! outside it: it ends when hyper next asks it for data). PINGs only find peers that are gone.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::body::{BoxError, ClientBody, GatewayBody};
use super::client_h1::ClientLimits;
use super::error::{described, ProxyError};
use super::h2::h2_cause;
use super::record::RequestRecord;
use super::{forward, headers, Gateway};
use crate::config::ServerConfig;

/// How long a connection closed by its timers gets to say GOAWAY and end before it is dropped
/// (unless a stream came meanwhile): a client sending only part of the preface never lets hyper
/// get that far.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The timers of one connection, from the `[server]` settings it was accepted under.
#[derive(Debug, Clone, Copy)]
pub struct Http2Timers {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Http2Timers {
    fn of(limits: &ClientLimits) -> Http2Timers {
        Http2Timers {
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
        }
    }
}

/// hyper's own limit on a decoded header block, answered with a bare 431: this many times
/// `max_header_size`, so that blocks over the gateway's limit but under hyper's get the JSON
/// answer, log line and request ID every refusal has, while a huge one is cut while decoded.
const HYPER_HEADER_LIST_FACTOR: usize = 2;

/// Answer bytes hyper holds per HTTP/2 stream beyond what the client's window took (its default
/// is 400 KiB): a client reading slowly on many streams would otherwise hold that much of the
/// gateway's memory per stream. Two default-sized frames keep a fast client's stream busy.
const H2_SEND_BUFFER: usize = 32 << 10;

/// hyper's HTTP/2 server as `[server]` and `[server.http2]` set it.
pub fn server(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new()).http2_only();
    let h2 = server.http2;
    let header_list = server
        .max_header_bytes
        .saturating_mul(HYPER_HEADER_LIST_FACTOR);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(header_list.try_into().unwrap_or(u32::MAX))
        .max_concurrent_streams(h2.max_concurrent_streams)
        .initial_stream_window_size(h2.initial_stream_window)
        .initial_connection_window_size(h2.initial_connection_window)
        .max_frame_size(h2.max_frame_size)
        .max_send_buf_size(H2_SEND_BUFFER)
        .keep_alive_interval(h2.keep_alive_interval)
        .keep_alive_timeout(h2.keep_alive_timeout);
    builder
}

/// Whether a request head is over the limits an HTTP/1.1 client gets: `max_headers` fields, or
/// `max_header_size` bytes counted as HTTP/1.1 would carry them (request line, `Host`, one
/// `name: value` line per field and the empty line), so that both protocols meet the same
/// bound. Cookie crumbs, which HTTP/2 clients may send one per field (RFC 9113 §8.2.3), count
/// as the one `Cookie` field they are joined into.
fn head_too_large(parts: &http::request::Parts, limits: &ClientLimits) -> bool {
    let crumbs = parts.headers.get_all(http::header::COOKIE).iter().count();
    let joined = crumbs.saturating_sub(1);
    if parts.headers.len() - joined > limits.max_headers {
        return true;
    }
    // `METHOD target HTTP/1.1` and `Host: authority`, each with its CRLF.
    let target = parts
        .uri
        .path_and_query()
        .map_or(1, |target| target.as_str().len());
    let authority = parts.uri.authority().map_or(0, |a| a.as_str().len() + 8);
    let request_line = parts.method.as_str().len() + target + 12 + authority;
    let lines: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    // A joined crumb takes "; " instead of a line of its own ("cookie: " and CRLF).
    request_line + lines + 2 - joined * ("cookie: \r\n".len() - "; ".len()) > limits.max_head
}

/// What the streams of one connection did, as offsets from when it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamsSeen {
    pub opened: bool,
    /// Streams from the request's arrival to the end (or drop) of its answer.
    pub live: u32,
    /// Streams whose answer handed hyper a frame it has not yet come back for: hyper comes
    /// back once the client's flow-control window took it.
    pub waiting_on_client: u32,
    /// When a stream last opened or ended.
    pub last_change: Duration,
    /// When the client last took answer data, or the first answer began waiting for it.
    pub last_client_progress: Duration,
}

/// Why a connection's timers close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// No stream within `header_read_timeout` of the connection's start.
    NoRequest,
    /// No stream for `idle_timeout`.
    Idle,
    /// Every stream's answer waited on the client for `idle_timeout`, and it took nothing.
    ClientStalled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerVerdict {
    /// Nothing to do before this offset; look again then.
    LookAt(Duration),
    Close(Closing),
}

/// What a connection's timers decide at `now` (an offset from its start). Streams waiting on
/// their instance are left to the upstream's own timeouts, and while one does, or the client
/// takes data on any stream, the connection stays: closing it would end streams that are
/// doing well along with one the client paused (a video it stopped reading, say).
pub fn judge_connection(seen: StreamsSeen, now: Duration, timers: Http2Timers) -> TimerVerdict {
    let (deadline, closing) = if !seen.opened {
        (timers.header_read_timeout, Closing::NoRequest)
    } else if seen.live == 0 {
        (seen.last_change + timers.idle_timeout, Closing::Idle)
    } else if seen.waiting_on_client == seen.live {
        let deadline = seen.last_client_progress + timers.idle_timeout;
        (deadline, Closing::ClientStalled)
    } else {
        return TimerVerdict::LookAt(now + timers.idle_timeout);
    };
    if now >= deadline {
        TimerVerdict::Close(closing)
    } else {
        // Never later than `idle_timeout` from now: the streams do not wake the timers, and a
        // deadline the next change brings is at least that far off (a stream opening while
        // `header_read_timeout` still runs can bring one sooner).
        TimerVerdict::LookAt(deadline.min(now + timers.idle_timeout))
    }
}

/// Whether a client that reset `premature` of the `streams` it opened, within a second and
/// before their answer came, is abusing the connection (HTTP/2 rapid reset, CVE-2023-44487):
/// each such stream may have cost a request to an instance and its connection. Envoy's rule,
/// from 100 such resets rather than its 500 streams: at least half of all. Browsers cancelling
/// navigations stay far below it. `streams` leaves out those the gateway answered itself
/// without an instance (a 405, a cache hit, a 429): they cost next to nothing, and a flood
/// padded with two of them per reset stream used to stay under half for good.
pub fn resets_abusive(streams: u64, premature: u64) -> bool {
    premature >= 100 && premature * 2 >= streams
}

/// A stream reset this soon after it opened, before its answer, counts as premature
/// ([`resets_abusive`]); a client giving up on a slow answer later does not (Envoy's rule).
const PREMATURE_RESET: Duration = Duration::from_secs(1);

/// A stream's request as it is being answered: dropped before [`Answering::answered`], it
/// was reset by the client before its answer head (or the connection went).
struct Answering {
    activity: Arc<StreamActivity>,
    /// When it opened, from the connection's start.
    opened: Duration,
    answered: bool,
}

impl Answering {
    /// The answer head is ready; `locally` when no instance was asked for it.
    fn answered(mut self, locally: bool) {
        self.answered = true;
        if locally {
            self.activity
                .answered_locally
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        let lived = || self.activity.started.elapsed().saturating_sub(self.opened);
        if !self.answered && lived() < PREMATURE_RESET {
            let activity = &self.activity;
            let premature = activity.premature.fetch_add(1, Ordering::Relaxed) + 1;
            if resets_abusive(activity.costly_streams(), premature) {
                activity.abused.notify_one();
            }
        }
    }
}

/// The shared record behind [`StreamsSeen`], written by the streams as they go. One lock
/// keeps each change whole for the timers: a count seen without the time that goes with it
/// could close a healthy connection. Uncontended, and only on the HTTP/2 path.
struct StreamActivity {
    started: Instant,
    state: Mutex<Streams>,
    /// Streams opened, those of them answered without an instance, and those dropped before
    /// their answer ([`resets_abusive`]).
    streams: AtomicU64,
    answered_locally: AtomicU64,
    premature: AtomicU64,
    abused: Notify,
}

impl StreamActivity {
    fn new(started: Instant) -> StreamActivity {
        StreamActivity {
            started,
            streams: AtomicU64::new(0),
            answered_locally: AtomicU64::new(0),
            premature: AtomicU64::new(0),
            abused: Notify::new(),
            state: Mutex::new(Streams {
                seen: StreamsSeen {
                    opened: false,
                    live: 0,
                    waiting_on_client: 0,
                    last_change: Duration::ZERO,
                    last_client_progress: Duration::ZERO,
                },
                parked: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Streams> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn seen(&self) -> StreamsSeen {
        self.lock().seen
    }

    /// Drops the answer source of every stream that has waited on the client since `stalled`
    /// or before: its instance connection (or cache fill) is let go, as nginx's per-stream
    /// `send_timeout` ends the stream; the rest of the connection is served on. hyper offers
    /// no way to reset the stream itself, so it ends when hyper next asks it for data.
    fn cut_stalled(&self, stalled: Duration) -> usize {
        let cut: Vec<Parked> = {
            let mut state = self.lock();
            let (cut, kept): (HashMap<_, _>, _) = std::mem::take(&mut state.parked)
                .into_iter()
                .partition(|(_, p)| p.since <= stalled);
            state.parked = kept;
            cut.into_values().collect()
        };
        let sources: Vec<GatewayBody> = cut
            .iter()
            .filter_map(|p| p.source.upgrade()?.lock().ok()?.take())
            .collect();
        let count = sources.len();
        // Dropped with no lock held: an instance connection's drop may do some work.
        drop(sources);
        count
    }

    /// A new stream: its place among the live ones, and its watch for a premature reset.
    /// Streams opened that the gateway did not answer alone: an instance was asked, or is
    /// being asked, or they were reset before their answer.
    fn costly_streams(&self) -> u64 {
        let opened = self.streams.load(Ordering::Relaxed);
        opened.saturating_sub(self.answered_locally.load(Ordering::Relaxed))
    }

    fn open(self: &Arc<Self>) -> (StreamGuard, Answering) {
        let id = self.streams.fetch_add(1, Ordering::Relaxed);
        let now = self.started.elapsed();
        let mut state = self.lock();
        state.seen.opened = true;
        state.seen.live += 1;
        state.seen.last_change = now;
        drop(state);
        let stream = StreamGuard {
            activity: Arc::clone(self),
            waiting: false,
            id,
            source: Weak::new(),
        };
        let answering = Answering {
            activity: Arc::clone(self),
            opened: now,
            answered: false,
        };
        (stream, answering)
    }
}

/// One stream's place in its connection's [`StreamActivity`], from the request's arrival until its
/// answer body is done or dropped (or the request is abandoned before it has one).
struct StreamGuard {
    activity: Arc<StreamActivity>,
    waiting: bool,
    /// This stream's number among the connection's, its key in [`Streams::parked`].
    id: u64,
    /// Its answer's source, once it has one.
    source: Weak<AnswerSource>,
}

/// What the streams did ([`StreamsSeen`], for the timers), and which of them wait on the
/// client now (their answers' sources the timers drop after `idle_timeout`).
struct Streams {
    seen: StreamsSeen,
    /// By stream number: a stream parks and leaves at every frame the client holds up, and a
    /// list of a busy connection's streams was searched each time.
    parked: HashMap<u64, Parked>,
}

/// A stream's answer body, in a slot the connection's timers can empty.
type AnswerSource = Mutex<Option<GatewayBody>>;

/// A stream whose answer waits on the client.
struct Parked {
    since: Duration,
    source: Weak<AnswerSource>,
}

impl StreamGuard {
    /// hyper came back for more: h2 took what it had, within the client's window.
    fn client_took(&mut self) {
        if std::mem::take(&mut self.waiting) {
            let now = self.activity.started.elapsed();
            let mut state = self.activity.lock();
            state.seen.last_client_progress = now;
            state.seen.waiting_on_client -= 1;
            state.parked.remove(&self.id);
        }
    }

    /// hyper holds a frame for the client.
    fn wait_on_client(&mut self) {
        if !self.waiting {
            self.waiting = true;
            let now = self.activity.started.elapsed();
            let mut state = self.activity.lock();
            // The first to wait starts the clock: time the client spent with nothing to take
            // does not count against it.
            if state.seen.waiting_on_client == 0 {
                state.seen.last_client_progress = now;
            }
            state.seen.waiting_on_client += 1;
            let source = self.source.clone();
            state.parked.insert(self.id, Parked { since: now, source });
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let now = self.activity.started.elapsed();
        let mut state = self.activity.lock();
        if self.waiting {
            state.seen.waiting_on_client -= 1;
            // hyper lets an answer go once its last piece went into the client's window (or
            // the client reset it): progress too. Short answers end so, never coming back for
            // more, and a client taking them beside a paused stream lost its connection.
            state.seen.last_client_progress = now;
            state.parked.remove(&self.id);
        }
        state.seen.live -= 1;
        state.seen.last_change = now;
    }
}

/// Serves one HTTP/2 connection until it ends, its timers close it, or `drain` (the gateway's
/// shutdown) turns true, which closes it gracefully: open streams finish.
pub async fn serve<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    gateway: Arc<Gateway>,
    client: forward::ClientAddr,
    limits: ClientLimits,
    accepted: Instant,
    mut drain: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = client.addr;
    let timers = Http2Timers::of(&limits);
    let activity = Arc::new(StreamActivity::new(accepted));
    let streams = Arc::clone(&activity);
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (gateway, client) = (gateway.clone(), client.clone());
        let (stream, answering) = streams.open();
        async move {
            let (mut parts, body) = req.into_parts();
            let head_request = parts.method == http::Method::HEAD;
            // What hyper let through that the gateway refuses, as client_h1 refuses it when it
            // reads a head: framing (codings other than one `chunked`, signed lengths) and the
            // malformations of RFC 9113 §8 hyper does not check.
            let refused = if head_too_large(&parts, &limits) {
                Err(ProxyError::HeadersTooLarge)
            } else {
                headers::check_framing(&mut parts.headers)
                    .map_err(|err| err.reason())
                    .and_then(|_| forward::http2_malformation(&parts))
                    .map_err(ProxyError::BadRequest)
            };
            if let Err(refusal) = refused {
                // Logged with its method and target, which are known here.
                let mut record = forward::request_record(&gateway, &parts, &client);
                record.answered(refusal.status());
                let response = refusal.response(&record.request_id);
                answering.answered(true);
                return Ok(response.map(|body| RecordedBody::new(body, record, stream)));
            }
            // client_h1 leaves such fields out as it parses.
            if !limits.underscores_in_headers {
                headers::drop_underscored(&mut parts.headers);
            }
            // HTTP/2 has no Upgrade: there is no connection to hand over.
            let mut record = forward::request_record(&gateway, &parts, &client);
            let req = http::Request::from_parts(parts, ClientBody::Hyper(body));
            let mut response = forward::handle(&gateway, req, &client, None, &mut record).await;
            // A 204 must not have one (RFC 9110 §8.6), and HTTP/2 clients refuse the stream if
            // it does; the HTTP/1.1 writer leaves it out as it writes the head.
            if response.status() == http::StatusCode::NO_CONTENT {
                response.headers_mut().remove(http::header::CONTENT_LENGTH);
            }
            let response = if head_request {
                headers_only(response)
            } else {
                response
            };
            answering.answered(record.served.attempts == 0);
            Ok::<_, Infallible>(response.map(|body| RecordedBody::new(body, record, stream)))
        }
    });
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut look_at = activity.started;
    // Closing (GOAWAY sent): when to look whether it is done with. hyper ends a connection it
    // closes once the client acknowledges the PING sent with the GOAWAY; a client that never
    // does (frozen, gone without a FIN) would hold it, and a drain, until the shutdown grace.
    let mut close_check: Option<Instant> = None;
    // Closed for abuse: dropped once the grace passed, whatever streams it keeps open.
    let mut abused = false;
    let mut draining = *drain.borrow();
    if draining {
        connection.as_mut().graceful_shutdown();
        close_check = Some(Instant::now() + CLOSE_GRACE);
    }
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(err) = ended {
                    let flooded = h2_cause(&*err).is_some_and(|h2| {
                        h2.is_go_away()
                            && h2.is_library()
                            && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
                    });
                    // The h2 codec's own limits (CONTINUATION or reset floods) close such a
                    // client: an operator hears of it with its address, as of a rapid reset.
                    if flooded {
                        tracing::warn!(client = %peer, error = %described(&*err), "HTTP/2 client flooded the connection: closed");
                    } else {
                        tracing::debug!(%err, %peer, "client connection ended with an error");
                    }
                }
                return;
            }
            () = activity.abused.notified(), if !abused => {
                abused = true;
                tracing::warn!(
                    client = %peer,
                    streams = activity.costly_streams(),
                    reset_before_answer = activity.premature.load(Ordering::Relaxed),
                    "HTTP/2 client reset most of its streams before their answers (rapid reset): connection closed"
                );
                connection.as_mut().graceful_shutdown();
                close_check = Some(Instant::now() + CLOSE_GRACE);
            }
            changed = drain.changed(), if !draining => {
                // A closed channel means the gateway is gone: close as on a drain.
                draining = changed.is_err() || *drain.borrow();
                if draining {
                    connection.as_mut().graceful_shutdown();
                    close_check.get_or_insert(Instant::now() + CLOSE_GRACE);
                }
            }
            () = tokio::time::sleep_until(close_check.map_or(look_at, |at| at.min(look_at))) => {
                let at = Instant::now();
                if close_check.is_some_and(|check| check <= at) {
                    // Streams that came as the connection was closed are let finish (looked
                    // at again until they have), unless the client was closed for abuse (it
                    // may ignore the GOAWAY and keep one open).
                    if abused || activity.seen().live == 0 {
                        tracing::debug!(%peer, "closed connection did not finish: dropped");
                        return;
                    }
                    close_check = Some(at + CLOSE_GRACE);
                }
                if at < look_at {
                    continue;
                }
                let now = activity.started.elapsed();
                if let Some(stalled) = now.checked_sub(timers.idle_timeout) {
                    let cut = activity.cut_stalled(stalled);
                    if cut > 0 {
                        tracing::debug!(%peer, streams = cut, "streams whose client took nothing for idle_timeout: their answers dropped");
                    }
                }
                match judge_connection(activity.seen(), now, timers) {
                    TimerVerdict::LookAt(at) => look_at = activity.started + at,
                    TimerVerdict::Close(Closing::ClientStalled) => {
                        tracing::debug!(%peer, "client took no answer data: connection dropped");
                        return;
                    }
                    TimerVerdict::Close(closing) => {
                        tracing::debug!(%peer, ?closing, "closing the connection");
                        connection.as_mut().graceful_shutdown();
                        // Judged again when next looked at, not at once: its verdict stands.
                        look_at = *close_check.get_or_insert(Instant::now() + CLOSE_GRACE);
                    }
                }
            }
        }
    }
}

/// An answer to HEAD without its body, which hyper's HTTP/2 server would send (a stream error
/// for the client): the fields stay, with the length a GET would carry when the gateway holds
/// the body (its own answers, cache hits).
fn headers_only(mut response: Response<GatewayBody>) -> Response<GatewayBody> {
    if !response
        .headers()
        .contains_key(http::header::CONTENT_LENGTH)
    {
        if let Some(length) = response.body().held_length() {
            response
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, length.into());
        }
    }
    *response.body_mut() = GatewayBody::Full(None);
    response
}

/// The most answer data handed to hyper at once. hyper passes a whole frame to h2 once the
/// client's window has room for one byte of it, and h2 keeps what the window does not take yet:
/// a large frame (a cache hit, the gateway's own answers) would sit in h2 whole, beyond
/// `H2_SEND_BUFFER`, and the stream would look finished to the timers while the client still
/// reads it. Pieces of one default HTTP/2 frame keep both true to the client's pace.
const MAX_PIECE: usize = 16 << 10;

/// An answer body for hyper's HTTP/2 server: hands the data over in pieces of at most
/// [`MAX_PIECE`], counts the bytes, writes the request's record once the body has ended, failed
/// or been dropped, and tells the connection's timers when the client took data.
struct RecordedBody {
    /// Shared with the connection's timers, which take it out (dropping it) once the stream has
    /// waited on the client for `idle_timeout` ([`StreamActivity::cut_stalled`]).
    body: Arc<AnswerSource>,
    record: Option<RequestRecord>,
    stream: StreamGuard,
    /// The rest of a frame larger than a piece.
    pending: Option<Bytes>,
}

impl RecordedBody {
    fn new(body: GatewayBody, record: RequestRecord, mut stream: StreamGuard) -> RecordedBody {
        // Written at once for an empty body: hyper may keep a finished body a while.
        let record = (!body.is_end_stream()).then_some(record);
        let body = Arc::new(Mutex::new(Some(body)));
        stream.source = Arc::downgrade(&body);
        RecordedBody {
            body,
            record,
            stream,
            pending: None,
        }
    }

    fn source(&self) -> MutexGuard<'_, Option<GatewayBody>> {
        self.body.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next piece of `data`, the rest kept for the next poll; `source_ended`: the source
    /// has nothing after `data`.
    fn piece_of(&mut self, mut data: Bytes, source_ended: bool) -> Frame<Bytes> {
        if data.len() > MAX_PIECE {
            self.pending = Some(data.split_off(MAX_PIECE));
        }
        if let Some(record) = &mut self.record {
            record.sent(data.len());
        }
        if self.pending.is_none() && source_ended {
            self.record = None;
        }
        if !data.is_empty() {
            // Even the last piece: hyper waits for window before it hands it over.
            self.stream.wait_on_client();
        }
        Frame::data(data)
    }
}

/// The instance's answer failed midway (the cause is in the log under the request ID).
#[derive(Debug, thiserror::Error)]
#[error("the instance's answer broke off")]
struct AnswerBrokeOff;

/// The stream's answer waited on the client for `idle_timeout`: its source was dropped.
#[derive(Debug, thiserror::Error)]
#[error("the client took none of the answer for idle_timeout")]
struct StreamStalled;

impl Body for RecordedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        this.stream.client_took();
        // One look at the source per frame: whether it was cut, its frame, whether it ended.
        let (frame, source_ended) = {
            let mut source = this.body.lock().unwrap_or_else(PoisonError::into_inner);
            // Cut by the connection's timers while it waited: the stream ends here (reset).
            let Some(body) = source.as_mut() else {
                tracing::debug!("HTTP/2 stream stalled on its client for idle_timeout: reset");
                return Poll::Ready(Some(Err(Box::new(StreamStalled))));
            };
            if let Some(rest) = this.pending.take() {
                let source_ended = body.is_end_stream();
                drop(source);
                return Poll::Ready(Some(Ok(this.piece_of(rest, source_ended))));
            }
            let frame = std::task::ready!(Pin::new(&mut *body).poll_frame(cx));
            (frame, body.is_end_stream())
        };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(this.piece_of(data, source_ended)))),
                Err(other) => {
                    if source_ended {
                        this.record = None;
                    }
                    Poll::Ready(Some(Ok(other)))
                }
            },
            None => {
                this.record = None;
                Poll::Ready(None)
            }
            Some(Err(err)) => {
                if let Some(record) = this.record.take() {
                    record.broke_off(&*err);
                }
                // Without the cause: hyper resets the stream with the code of an h2 error it
                // finds among the causes, and an HTTP/2 instance's PROTOCOL_ERROR would then
                // tell the client that it erred. INTERNAL_ERROR, as nginx and Envoy reset.
                Poll::Ready(Some(Err(Box::new(AnswerBrokeOff))))
            }
        }
    }

    /// Never for a stream whose source was cut: hyper would end it as whole.
    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.source().as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let pending = self.pending.as_ref().map_or(0, |rest| rest.len() as u64);
        let inner = self
            .source()
            .as_ref()
            .map_or_else(SizeHint::default, Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + pending);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + pending);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMERS: Http2Timers = Http2Timers {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
    };

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_client_resetting_most_streams_before_their_answer_is_abusive() {
        assert!(!resets_abusive(99, 99), "fewer than 100");
        assert!(resets_abusive(100, 100));
        assert!(resets_abusive(200, 100), "half");
        assert!(!resets_abusive(201, 100), "under half");
        assert!(
            !resets_abusive(10_000, 150),
            "a browser cancelling now and then"
        );
    }

    fn seen(live: u32, waiting_on_client: u32) -> StreamsSeen {
        StreamsSeen {
            opened: true,
            live,
            waiting_on_client,
            last_change: secs(5),
            last_client_progress: secs(20),
        }
    }

    #[test]
    fn the_timers_close_a_connection_only_when_it_is_silent_idle_or_wholly_stalled() {
        let fresh = StreamsSeen {
            opened: false,
            ..seen(0, 0)
        };
        let cases = [
            // No stream yet: `header_read_timeout` from the start.
            (fresh, 3, TimerVerdict::LookAt(secs(10))),
            (fresh, 10, TimerVerdict::Close(Closing::NoRequest)),
            // No stream open: `idle_timeout` from the last one's end.
            (seen(0, 0), 30, TimerVerdict::LookAt(secs(65))),
            (seen(0, 0), 65, TimerVerdict::Close(Closing::Idle)),
            // Streams waiting on instances: their own timeouts bound them.
            (seen(3, 0), 500, TimerVerdict::LookAt(secs(560))),
            // Every answer waiting on the client: `idle_timeout` from its last progress.
            (seen(3, 3), 50, TimerVerdict::LookAt(secs(80))),
            (seen(3, 3), 80, TimerVerdict::Close(Closing::ClientStalled)),
            // One stream still waits on its instance: the paused ones stay with it.
            (seen(3, 2), 80, TimerVerdict::LookAt(secs(140))),
        ];
        for (seen, now, verdict) in cases {
            assert_eq!(
                judge_connection(seen, secs(now), TIMERS),
                verdict,
                "{seen:?} at {now} s"
            );
        }
        // An idle_timeout shorter than the header_read_timeout: the timers look again by then,
        // so a stream that opens and stalls meanwhile is not judged late.
        let short_idle = Http2Timers {
            idle_timeout: secs(2),
            ..TIMERS
        };
        assert_eq!(
            judge_connection(fresh, secs(1), short_idle),
            TimerVerdict::LookAt(secs(3))
        );
    }

    fn limits(max_head: usize, max_headers: usize) -> ClientLimits {
        ClientLimits {
            header_read_timeout: secs(10),
            idle_timeout: secs(60),
            max_head,
            max_headers,
            max_uri: 8192,
            underscores_in_headers: false,
            max_body: u64::MAX,
        }
    }

    #[test]
    fn a_head_is_measured_as_http1_would_carry_it_with_cookie_crumbs_joined() {
        let request = |crumbs: usize| {
            let mut builder = http::Request::get("http://a.example/p").header("x-one", "1");
            for i in 0..crumbs {
                builder = builder.header("cookie", format!("c{i}=v"));
            }
            builder.body(()).unwrap().into_parts().0
        };
        // GET /p HTTP/1.1\r\n (17) Host: a.example\r\n (17) x-one: 1\r\n (10) \r\n (2) = 46,
        // and with three crumbs `cookie: c0=v; c1=v; c2=v\r\n` (26): 72.
        assert!(!head_too_large(&request(0), &limits(46, 100)));
        assert!(head_too_large(&request(0), &limits(45, 100)));
        assert!(!head_too_large(&request(3), &limits(72, 100)));
        assert!(head_too_large(&request(3), &limits(71, 100)));
        // Three crumbs are one field, as over HTTP/1.1: two fields in all.
        assert!(!head_too_large(&request(3), &limits(1000, 2)));
        assert!(head_too_large(&request(3), &limits(1000, 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_of_a_stalled_client_starts_when_an_answer_first_waits() {
        let activity = Arc::new(StreamActivity::new(Instant::now()));
        let (mut first, _first_watch) = activity.open();
        tokio::time::advance(secs(100)).await;
        first.wait_on_client();
        let (mut second, _second_watch) = activity.open();
        tokio::time::advance(secs(30)).await;
        second.wait_on_client();
        let seen = activity.seen();
        assert_eq!((seen.live, seen.waiting_on_client), (2, 2));
        assert_eq!(seen.last_client_progress, secs(100));
        tokio::time::advance(secs(10)).await;
        first.client_took();
        assert_eq!(activity.seen().last_client_progress, secs(140));
        drop(second);
        let seen = activity.seen();
        assert_eq!((seen.live, seen.waiting_on_client), (1, 0));
        assert_eq!(seen.last_change, secs(140));
    }
}
