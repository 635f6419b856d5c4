//! Body types of the proxy: what goes to an instance (the client's body, streamed and held to
//! `max_body` and to a minimum arrival rate) and what goes back to the client (the instance's body, streamed, returning the
//! connection to the pool at its end; or a small body the gateway made itself).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::client_h1::RequestBody;
use super::deadline::{LazyDeadline, PauseLimit, PAUSED};
use super::h1::{InstanceBody, RawFields};
use super::upstream::InFlightGuard;
use crate::ratelimit::Slots;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body grew past `server.max_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// The client sent its request body slower than `server.min_body_rate`.
#[derive(Debug, thiserror::Error)]
#[error("request body arrived slower than {min_bytes} bytes in {window:?}")]
pub struct BodyTooSlow {
    pub min_bytes: u64,
    pub window: Duration,
}

/// The client closed its connection inside its request body. Also the mark on the gateway's
/// answer for such a request (a response extension): nobody is left to write it to.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("client closed the connection inside its body")]
pub struct ClientLeft;

/// Why the client's body could not be passed on to an instance: never the instance's fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientBodyFailure {
    /// More than `server.max_body` (413).
    TooLarge,
    /// Slower than `server.min_body_rate` (408).
    TooSlow,
    /// The client went away: closed its connection or reset its stream (nginx's 499).
    Left,
    /// Malformed (a bad chunk size) (400).
    Broken(String),
}

impl ClientBodyFailure {
    /// Sorts an error read from [`ForwardBody`].
    pub fn of(err: &BoxError) -> ClientBodyFailure {
        if err.is::<BodyTooLarge>() {
            ClientBodyFailure::TooLarge
        } else if err.is::<BodyTooSlow>() {
            ClientBodyFailure::TooSlow
        } else if client_left(&**err) {
            ClientBodyFailure::Left
        } else {
            ClientBodyFailure::Broken(err.to_string())
        }
    }
}

/// Whether a request body's error says its client went away (its connection closed or reset,
/// its HTTP/2 stream or connection ended from its side) rather than sent something wrong.
fn client_left(err: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(h2) = super::h2::h2_cause(err) {
        return h2.is_io() || (h2.is_remote() && (h2.is_reset() || h2.is_go_away()));
    }
    let mut cause = Some(err);
    while let Some(err) = cause {
        if err.is::<ClientLeft>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
            return matches!(io.kind(), ConnectionReset | BrokenPipe | UnexpectedEof);
        }
        cause = err.source();
    }
    false
}

/// How fast a request body must arrive: at least `min_bytes` in every `window`
/// (`server.body_read_timeout`, and `server.min_body_rate` × that window but at least one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPace {
    pub window: Duration,
    pub min_bytes: u64,
}

impl BodyPace {
    /// The pace of `server`'s keys; `None` when `body_read_timeout` is 0 (no check).
    pub fn from_config(server: &crate::config::ServerConfig) -> Option<BodyPace> {
        let window = server.body_read_timeout;
        if window.is_zero() {
            return None;
        }
        let per_window = (server.min_body_rate as f64 * window.as_secs_f64()).ceil() as u64;
        Some(BodyPace {
            window,
            min_bytes: per_window.max(1),
        })
    }
}

/// One window of a body's pace: when it ends and the bytes that came in it so far, and since
/// when the client has sent nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PaceWindow {
    ends: Instant,
    bytes: u64,
    /// The gateway's first wait after the client's last bytes.
    quiet_since: Instant,
    /// The window's bytes by then.
    bytes_when_quiet: u64,
}

impl PaceWindow {
    fn start(now: Instant, pace: &BodyPace) -> PaceWindow {
        PaceWindow {
            ends: now + pace.window,
            bytes: 0,
            quiet_since: now,
            bytes_when_quiet: 0,
        }
    }

    /// Called while the gateway waits for the client's next bytes: a whole window without a
    /// byte means the client is too slow (nginx's `client_body_timeout` between two reads:
    /// windows alone let a byte at one's start and the next at the following one's end pass,
    /// almost two windows apart); before the window ends, wait on (until the returned
    /// instant); after it, a window short of `min_bytes` means the client is too slow, a full
    /// one starts the next window now. Judging only while waiting on the client keeps time the
    /// instance spent not reading from counting against the client.
    fn judge(&mut self, now: Instant, pace: &BodyPace) -> Result<Instant, BodyTooSlow> {
        let too_slow = BodyTooSlow {
            min_bytes: pace.min_bytes,
            window: pace.window,
        };
        if self.bytes != self.bytes_when_quiet {
            (self.quiet_since, self.bytes_when_quiet) = (now, self.bytes);
        }
        let silence_ends = self.quiet_since + pace.window;
        if now >= silence_ends {
            return Err(too_slow);
        }
        if now >= self.ends {
            if self.bytes < pace.min_bytes {
                return Err(too_slow);
            }
            let quiet_since = self.quiet_since;
            *self = PaceWindow::start(now, pace);
            self.quiet_since = quiet_since;
        }
        Ok(self.ends.min(silence_ends))
    }
}

/// The pace check of one streamed body; its first window starts when the gateway first waits
/// for the client's bytes.
pub struct PaceCheck {
    pace: BodyPace,
    window: Option<PaceWindow>,
    /// Wakes the body at the window's end when the client sends nothing.
    timer: Option<Pin<Box<Sleep>>>,
}

impl PaceCheck {
    fn new(pace: BodyPace) -> PaceCheck {
        PaceCheck {
            pace,
            window: None,
            timer: None,
        }
    }

    fn arrived(&mut self, bytes: usize) {
        if let Some(window) = &mut self.window {
            window.bytes += bytes as u64;
        }
    }

    /// The client has nothing more for now: judge the window and arm the timer for its end.
    fn waiting(&mut self, cx: &mut Context<'_>) -> Result<(), BodyTooSlow> {
        let now = Instant::now();
        let window = self
            .window
            .get_or_insert_with(|| PaceWindow::start(now, &self.pace));
        let deadline = window.judge(now, &self.pace)?;
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        // Pending (deadline > now): registers the wake-up at the window's end.
        let _ = timer.as_mut().poll(cx);
        Ok(())
    }
}

/// A client's request body, read by the gateway's own HTTP/1.1 server (plain or TLS) or by
/// hyper (HTTP/2).
pub enum ClientBody {
    Empty,
    Http1(RequestBody),
    Hyper(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Http1(body) => Pin::new(body).poll_frame(cx),
            ClientBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Http1(body) => body.is_end_stream(),
            ClientBody::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Http1(body) => body.size_hint(),
            ClientBody::Hyper(body) => body.size_hint(),
        }
    }
}

/// Request body sent to an instance.
// Held in place by its request for the request's life, never moved per frame: boxing the
// stream's state would allocate for every request with a body.
#[allow(clippy::large_enum_variant)]
pub enum ForwardBody {
    Empty,
    /// Streamed from the client, failing with [`BodyTooLarge`] once more than `limit` bytes came
    /// and with [`BodyTooSlow`] when they come slower than the pace. Its first
    /// [`REPLAY_LIMIT`] bytes are kept (`replay`, `None` once it grew past them), so that an
    /// attempt that fails with it can be followed by another.
    Stream {
        inner: ClientBody,
        seen: u64,
        limit: u64,
        pace: Option<PaceCheck>,
        replay: Option<Replay>,
    },
    /// Went with an attempt that kept it (an HTTP/2 exchange that did not give it back): it
    /// cannot go again.
    Spent,
}

/// How much of a request body is kept to send again, as nginx's in-memory body buffer, Envoy's
/// retry buffer and HAProxy's `l7-retries` buffer allow: a request whose body grew past this
/// has gone out in part and cannot be retried; a larger upload streams through once, in
/// bounded memory.
pub const REPLAY_LIMIT: usize = 64 * 1024;

impl ForwardBody {
    pub fn stream(inner: ClientBody, limit: u64, pace: Option<BodyPace>) -> ForwardBody {
        // A body announced larger than what is kept is not copied at all. (Room is made as
        // bytes come, not as announced: an announcement costs the gateway nothing.)
        let replay = (inner.size_hint().lower() <= REPLAY_LIMIT as u64).then(Replay::default);
        ForwardBody::Stream {
            inner,
            seen: 0,
            limit,
            pace: pace.map(PaceCheck::new),
            replay,
        }
    }

    /// Reads a body whose declared length is at most [`REPLAY_LIMIT`] to its end, kept, and
    /// starts it again; other bodies, and one read so already, are left as they are.
    pub async fn read_if_small(&mut self) -> Result<(), BoxError> {
        let small = matches!(
            self,
            ForwardBody::Stream {
                replay: Some(_),
                inner,
                ..
            } if !inner.is_end_stream()
        ) && self
            .size_hint()
            .exact()
            .is_some_and(|length| length <= REPLAY_LIMIT as u64);
        if small {
            while let Some(frame) = http_body_util::BodyExt::frame(self).await {
                frame?;
            }
            self.rewind();
        }
        Ok(())
    }

    /// How many bytes of it came from the client so far.
    pub fn bytes_read(&self) -> u64 {
        match self {
            ForwardBody::Stream { seen, .. } => *seen,
            ForwardBody::Empty | ForwardBody::Spent => 0,
        }
    }

    /// Whether what is read of it is kept, so that it can start again after some of it went
    /// out ([`ForwardBody::rewind`]).
    pub fn keeps_replay(&self) -> bool {
        match self {
            ForwardBody::Empty => true,
            ForwardBody::Spent => false,
            ForwardBody::Stream { replay, .. } => replay.is_some(),
        }
    }

    /// Makes the body start again from its first byte for another attempt, what came before
    /// handed out from what was kept and the rest still read from the client. False when that
    /// cannot be done: more went out than [`REPLAY_LIMIT`], or an attempt kept it.
    pub fn rewind(&mut self) -> bool {
        match self {
            ForwardBody::Empty => true,
            ForwardBody::Spent => false,
            ForwardBody::Stream { replay, seen, .. } => match replay {
                Some(replay) => {
                    replay.again = Again::Data;
                    true
                }
                // Nothing of it went out yet.
                None => *seen == 0,
            },
        }
    }
}

/// The part of a request body that went out, kept to send again. Copied rather than the
/// client's buffers held: a body of many tiny chunks would otherwise pin a buffer per chunk.
#[derive(Default)]
pub struct Replay {
    kept: BytesMut,
    trailers: Option<Box<HeaderMap>>,
    again: Again,
}

/// What of the kept body is still to hand out again after a rewind.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Again {
    #[default]
    Nothing,
    Data,
    Trailers,
}

impl Replay {
    /// Keeps `frame` as it goes out; false once the body outgrew [`REPLAY_LIMIT`].
    fn keep(&mut self, frame: &Frame<Bytes>) -> bool {
        if let Some(data) = frame.data_ref() {
            if self.kept.len() + data.len() > REPLAY_LIMIT {
                return false;
            }
            self.kept.extend_from_slice(data);
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers = Some(Box::new(trailers.clone()));
        }
        true
    }

    /// The next kept frame to hand out again, if a rewind left any.
    fn next_again(&mut self) -> Option<Frame<Bytes>> {
        loop {
            match self.again {
                Again::Nothing => return None,
                Again::Data => {
                    self.again = Again::Trailers;
                    if !self.kept.is_empty() {
                        return Some(Frame::data(Bytes::copy_from_slice(&self.kept)));
                    }
                }
                Again::Trailers => {
                    self.again = Again::Nothing;
                    if let Some(trailers) = &self.trailers {
                        return Some(Frame::trailers(HeaderMap::clone(trailers)));
                    }
                }
            }
        }
    }

    /// Bytes still to hand out again.
    fn pending(&self) -> u64 {
        match self.again {
            Again::Data => self.kept.len() as u64,
            Again::Nothing | Again::Trailers => 0,
        }
    }

    /// Whether a frame is still to hand out again.
    fn has_pending(&self) -> bool {
        match self.again {
            Again::Nothing => false,
            Again::Data => !self.kept.is_empty() || self.trailers.is_some(),
            Again::Trailers => self.trailers.is_some(),
        }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ForwardBody::Empty => Poll::Ready(None),
            ForwardBody::Spent => Poll::Ready(Some(Err("the request body was spent".into()))),
            ForwardBody::Stream {
                inner,
                seen,
                limit,
                pace,
                replay,
            } => {
                if let Some(again) = replay.as_mut().and_then(Replay::next_again) {
                    return Poll::Ready(Some(Ok(again)));
                }
                // What the body declares still to come counts too: a chunk whose size line
                // takes it past the limit is refused as that line is read, as nginx refuses
                // it, not once that much of it went on (a client that stopped there held the
                // request open until `body_read_timeout`).
                let over = |seen: u64, inner: &ClientBody| {
                    seen.saturating_add(inner.size_hint().lower()) > *limit
                };
                match Pin::new(&mut *inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            *seen += data.len() as u64;
                            if over(*seen, inner) {
                                return Poll::Ready(Some(Err(
                                    BodyTooLarge { limit: *limit }.into()
                                )));
                            }
                            if let Some(pace) = pace {
                                pace.arrived(data.len());
                            }
                        }
                        if replay.as_mut().is_some_and(|kept| !kept.keep(&frame)) {
                            *replay = None;
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err))),
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending if over(*seen, inner) => {
                        Poll::Ready(Some(Err(BodyTooLarge { limit: *limit }.into())))
                    }
                    Poll::Pending => match pace.as_mut().map(|pace| pace.waiting(cx)) {
                        Some(Err(too_slow)) => Poll::Ready(Some(Err(too_slow.into()))),
                        _ => Poll::Pending,
                    },
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ForwardBody::Empty | ForwardBody::Spent => true,
            ForwardBody::Stream { inner, replay, .. } => {
                !replay.as_ref().is_some_and(Replay::has_pending) && inner.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ForwardBody::Empty | ForwardBody::Spent => SizeHint::with_exact(0),
            ForwardBody::Stream { inner, replay, .. } => {
                let again = replay.as_ref().map_or(0, Replay::pending);
                let rest = inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + again);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + again);
                }
                hint
            }
        }
    }
}

/// A body that keeps `token` (an in-flight guard, concurrency slots) until it ends, fails or is
/// dropped, so what the token counts covers the whole answer, not just its head.
/// With `pause`, the body also fails when it waits too long for its next frame (an instance's
/// body, see `PauseLimit`).
pub struct Holding<B, T> {
    body: B,
    token: Option<T>,
    pause: Option<(PauseLimit, LazyDeadline)>,
}

impl<B: Body, T> Holding<B, T> {
    pub fn new(body: B, token: T) -> Holding<B, T> {
        let token = (!body.is_end_stream()).then_some(token);
        Holding {
            body,
            token,
            pause: None,
        }
    }

    /// `body`, keeping `token` until it is dropped even when it has no bytes (a 101's, which
    /// its tunnel holds).
    pub fn until_dropped(body: B, token: T) -> Holding<B, T> {
        Holding {
            body,
            token: Some(token),
            pause: None,
        }
    }

    /// An instance's body, which fails once it has waited `limit` for its next frame.
    pub fn paced(body: B, token: T, limit: Duration) -> Holding<B, T> {
        // Not in the timer wheel until the body first waits.
        let timer = LazyDeadline::new(Instant::now() + limit);
        Holding {
            pause: Some((PauseLimit::new(limit), timer)),
            ..Holding::new(body, token)
        }
    }
}

impl<B, T> Body for Holding<B, T>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    T: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some((pause, _)) = &mut this.pause {
                    pause.progressed();
                }
                frame.map(|frame| frame.map_err(Into::into))
            }
            Poll::Pending => {
                let Some((pause, timer)) = &mut this.pause else {
                    return Poll::Pending;
                };
                ready!(pause.poll_expired(cx, timer));
                Some(Err(PAUSED.into()))
            }
        };
        if !matches!(frame, Some(Ok(_))) || this.body.is_end_stream() {
            this.token = None;
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

/// Response body sent to the client.
pub enum GatewayBody {
    /// A body the gateway wrote (errors, admin answers).
    Full(Option<Bytes>),
    /// An instance's body, streamed.
    Upstream(InstanceBody),
    /// An HTTP/2 instance's body, streamed, counting the request in flight until it ends.
    Http2(Holding<Incoming, (InFlightGuard, super::h2::StreamSlot)>),
    /// Chunks the gateway produces over time (server-sent events); ends when the sender drops.
    Channel(tokio::sync::mpsc::Receiver<Bytes>),
    /// Chunks relayed by a task reading an instance's body (the cache storing a response while
    /// the client streams it); an `Err` breaks the body off.
    Relay(
        tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>,
        /// The length the instance announced, if any.
        Option<u64>,
    ),
    /// Another body, holding the request's concurrency slots until it ends (or is dropped).
    Holding(Box<Holding<GatewayBody, Slots>>),
}

impl GatewayBody {
    pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
        GatewayBody::Full(Some(bytes.into()))
    }

    /// This body, keeping `slots` taken until it ends; or, under a 101 (`tunnel`), for as long
    /// as the tunnel that holds it ([`super::tunnel::Handover`]) lasts, though it has no bytes.
    pub fn holding(self, slots: Slots, tunnel: bool) -> GatewayBody {
        if tunnel {
            return GatewayBody::Holding(Box::new(Holding::until_dropped(self, slots)));
        }
        if self.is_end_stream() {
            return self;
        }
        GatewayBody::Holding(Box::new(Holding::new(self, slots)))
    }

    /// The length of a body the gateway holds whole (its own answers); `None` for streamed
    /// ones. An answer to HEAD carries this length, never a streamed body's empty size hint.
    pub fn held_length(&self) -> Option<u64> {
        match self {
            GatewayBody::Full(bytes) => Some(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            GatewayBody::Holding(holding) => holding.body.held_length(),
            _ => None,
        }
    }

    /// An instance's answer fields still as it wrote them (see `RawFields`).
    pub fn raw_fields(&self) -> Option<&RawFields> {
        match self {
            GatewayBody::Upstream(body) => body.raw_fields(),
            GatewayBody::Holding(holding) => holding.body.raw_fields(),
            _ => None,
        }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            GatewayBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            GatewayBody::Channel(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
            GatewayBody::Relay(rx, _) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| b.map(Frame::data))),
            GatewayBody::Holding(body) => Pin::new(body.as_mut()).poll_frame(cx),
            GatewayBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            GatewayBody::Http2(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Full(bytes) => bytes.is_none(),
            GatewayBody::Upstream(body) => body.is_end_stream(),
            GatewayBody::Http2(body) => body.is_end_stream(),
            GatewayBody::Channel(_) | GatewayBody::Relay(..) => false,
            GatewayBody::Holding(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            GatewayBody::Full(None) => SizeHint::with_exact(0),
            GatewayBody::Upstream(body) => body.size_hint(),
            GatewayBody::Http2(body) => body.size_hint(),
            GatewayBody::Relay(_, Some(length)) => SizeHint::with_exact(*length),
            GatewayBody::Channel(_) | GatewayBody::Relay(_, None) => SizeHint::default(),
            GatewayBody::Holding(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACE: BodyPace = BodyPace {
        window: Duration::from_secs(1),
        min_bytes: 10,
    };

    #[tokio::test(start_paused = true)]
    async fn a_window_short_of_its_bytes_is_too_slow_and_a_full_one_starts_the_next() {
        let t0 = Instant::now();
        let mut window = PaceWindow::start(t0, &PACE);
        let half = t0 + Duration::from_millis(500);
        assert_eq!(window.judge(half, &PACE).unwrap(), t0 + PACE.window);
        window.bytes += 10;
        // Noticed late: the next window starts when the gateway judged, not at the old end.
        let late = t0 + Duration::from_millis(1200);
        assert_eq!(window.judge(late, &PACE).unwrap(), late + PACE.window);
        assert_eq!(window.bytes, 0);
        window.bytes += 9;
        let err = window.judge(late + PACE.window, &PACE).unwrap_err();
        assert_eq!((err.min_bytes, err.window), (10, PACE.window));
    }

    /// A window's worth of silence is too slow whatever the windows hold: bytes enough at
    /// one's start, then none until the next one's end, are almost two windows apart.
    #[tokio::test(start_paused = true)]
    async fn a_whole_window_without_a_byte_is_too_slow() {
        let t0 = Instant::now();
        let mut window = PaceWindow::start(t0, &PACE);
        window.bytes += 10;
        let soon = t0 + Duration::from_millis(100);
        // Quiet from here: the wake-up comes a window later, before the second window's end.
        assert_eq!(window.judge(soon, &PACE).unwrap(), t0 + PACE.window);
        let next = window.judge(t0 + PACE.window, &PACE).unwrap();
        assert_eq!(next, soon + PACE.window);
        let err = window.judge(soon + PACE.window, &PACE).unwrap_err();
        assert_eq!(err.window, PACE.window);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_cut_when_its_window_ends_without_more_bytes() {
        let mut check = PaceCheck::new(PACE);
        let t0 = Instant::now();
        std::future::poll_fn(|cx| Poll::Ready(check.waiting(cx)))
            .await
            .unwrap();
        check.arrived(4);
        // Nothing else comes: only the timer wakes the body, at the end of the window.
        let err = std::future::poll_fn(|cx| match check.waiting(cx) {
            Ok(()) => Poll::Pending,
            Err(too_slow) => Poll::Ready(too_slow),
        })
        .await;
        assert_eq!(Instant::now() - t0, PACE.window);
        assert_eq!(err.min_bytes, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_body_is_never_cut() {
        let mut check = PaceCheck::new(PACE);
        for _ in 0..50 {
            std::future::poll_fn(|cx| Poll::Ready(check.waiting(cx)))
                .await
                .unwrap();
            tokio::time::advance(Duration::from_millis(100)).await;
            check.arrived(1);
        }
    }

    #[test]
    fn a_kept_body_comes_again_whole_until_it_outgrows_the_limit() {
        let mut replay = Replay::default();
        assert!(replay.next_again().is_none());
        assert!(replay.keep(&Frame::data(Bytes::from_static(b"abc"))));
        assert!(replay.keep(&Frame::data(Bytes::from_static(b"def"))));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("1"));
        assert!(replay.keep(&Frame::trailers(trailers)));
        replay.again = Again::Data;
        assert_eq!(replay.pending(), 6);
        let data = replay.next_again().unwrap().into_data().unwrap();
        assert_eq!(&data[..], b"abcdef");
        assert!(replay.has_pending());
        let trailers = replay.next_again().unwrap().into_trailers().unwrap();
        assert_eq!(trailers["x-sum"], "1");
        assert!(!replay.has_pending());
        assert!(replay.next_again().is_none());
        let up_to_the_limit = Bytes::from(vec![0u8; REPLAY_LIMIT - 6]);
        assert!(replay.keep(&Frame::data(up_to_the_limit)));
        assert!(!replay.keep(&Frame::data(Bytes::from_static(b"x"))));
    }

    #[test]
    fn pace_from_config_needs_at_least_one_byte_per_window() {
        let mut server = crate::config::Config::from_flags(
            "127.0.0.1:0",
            "127.0.0.1:0",
            &["127.0.0.1:1".into()],
        )
        .unwrap()
        .server;
        server.body_read_timeout = Duration::from_secs(30);
        server.min_body_rate = 0;
        assert_eq!(BodyPace::from_config(&server).unwrap().min_bytes, 1);
        server.min_body_rate = 1024;
        assert_eq!(BodyPace::from_config(&server).unwrap().min_bytes, 30 * 1024);
        server.body_read_timeout = Duration::ZERO;
        assert_eq!(BodyPace::from_config(&server), None);
    }
}
