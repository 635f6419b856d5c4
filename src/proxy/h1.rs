//! The instance side of HTTP/1.1: a pooled connection owned by the request using it. The
//! request head is written straight from the header map, the answer's head is parsed with
//! `httparse` into header values that share the read buffer (or kept as the instance's own
//! lines, `RawFields`, when the gateway's client loop writes them out), and the body is streamed
//! back by its framing; at the end of a reusable body the connection returns to the instance's
//! pool.
//! hyper's client would add a task per connection and channel hand-offs per request, which
//! cost several times the CPU of the exchange itself on a busy proxy.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH};
use http::request::Parts;
use http::{response, Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;

use super::body::{BoxError, ClientBodyFailure, ForwardBody};
use super::connect::InstanceStream;
use super::deadline::{LazyDeadline, PauseLimit, PAUSED};
use super::headers::{has, ForwardedFields};
use super::pipeline::LineHold;
use super::upstream::InFlightGuard;
use crate::http1::{
    parse_response, response_framing, BodyFraming, BodyProgress, Codings, FieldKind, FieldSpans,
    Framing, MAX_HEAD,
};

/// Header fields of an answer parsed on the stack; more are parsed again on the heap, with
/// room for as many as the bytes read so far can hold, so that the head's size is the one
/// limit, as it is for nginx.
const STACK_HEADERS: usize = 128;
const READ_CHUNK: usize = 16 * 1024;
/// Chunks of an upload up to this size are framed and written in one call.
const SMALL_CHUNK: usize = 8 * 1024;

/// One HTTP/1.1 connection to an instance, plain or TLS. Boxed once when opened: a request
/// moves its connection from the pool into the answer's body and back, several times over.
pub struct InstanceConn {
    stream: InstanceStream,
    read: BytesMut,
    write: Vec<u8>,
    /// The response timeout, one timer for the connection's life.
    deadline: LazyDeadline,
    /// Requests sent on it (`keepalive_requests`).
    requests: u64,
    /// An answer head was read on it ([`InstanceConn::answered_any`]).
    answered: bool,
    /// The size of its last request's body ([`InstanceConn::uploaded`]).
    uploaded: u64,
}

/// How an exchange with an instance failed.
#[derive(Debug)]
pub enum SendError {
    /// Nothing reached the instance: the request may go to another one as it is.
    Unsent(io::Error),
    /// The instance may have seen the request; no answer came back.
    Sent(String),
    /// Part of an answer head came back, then the connection broke.
    BrokeOff(String),
    /// The answer head is not valid HTTP/1.1.
    Invalid(String),
    /// The instance closed or reset the connection without a byte of answer. On a reused
    /// connection this is most often the instance closing it while idle, just as it was taken.
    NoAnswer(String),
    /// The client's body failed: not the instance's fault.
    Client(ClientBodyFailure),
    /// No answer head before the response timeout.
    TimedOut,
    /// Part of an answer head (or an interim answer) came, not the whole final head, before
    /// the response timeout: never sent again, like [`SendError::BrokeOff`].
    TimedOutMidHead,
}

/// A request as it goes to an instance.
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    pub parts: &'a Parts,
    /// The gateway's own fields, written after the client's; `None` when they are in the map.
    pub fields: Option<&'a ForwardedFields>,
    /// The answer's fields may stay as the instance wrote them ([`RawFields`]): the gateway's
    /// HTTP/1.1 loop writes them to the client and nothing else reads them.
    pub raw_answer: bool,
}

/// An instance's answer head, and how to read the body that follows it.
pub struct AnswerHead {
    /// The status and the fields, unless they stayed raw: then the map is empty.
    pub head: response::Parts,
    pub raw_fields: Option<RawFields>,
    pub framing: BodyFraming,
    /// The whole request went out, so the connection is in a known state after the answer.
    pub request_complete: bool,
}

/// An answer's end-to-end fields as the instance wrote them: whole `Name: value` lines of its
/// head, in runs of consecutive lines, without the hop-by-hop fields, Content-Length (the
/// client's side frames the body itself) and X-Request-ID (the gateway's own goes out with
/// them). Writing the runs as they are saves building a header map only to encode it again,
/// which was about a sixth of the gateway's instructions per request.
pub struct RawFields {
    head: Bytes,
    runs: [(u16, u16); RAW_RUNS],
    len: u8,
    dated: bool,
    request_id: HeaderValue,
}

/// The most runs of kept lines a raw answer may have; an answer whose dropped fields split its
/// lines further goes through the map.
const RAW_RUNS: usize = 4;

impl RawFields {
    /// The lines to keep of `head`, which `httparse` parsed into `fields`; `None` when a line
    /// does not end in CRLF (the map path normalises those) or there are too many runs.
    fn find(
        fields: &[httparse::Header<'_>],
        head: &[u8],
        request_id: &HeaderValue,
    ) -> Option<RawFields> {
        // Offsets are 16 bits: a head of 64 KiB exactly (the most allowed) takes the map.
        if !head.ends_with(b"\r\n\r\n") || head.len() > usize::from(u16::MAX) {
            return None;
        }
        let base = head.as_ptr() as usize;
        let start_of =
            |field: &httparse::Header<'_>| (field.name.as_ptr() as usize).wrapping_sub(base);
        let mut raw = RawFields {
            head: Bytes::new(),
            runs: [(0, 0); RAW_RUNS],
            len: 0,
            dated: false,
            request_id: request_id.clone(),
        };
        for (at, field) in fields.iter().enumerate() {
            // A line ends where the next one starts; the last one before the empty line.
            let start = start_of(field);
            let end = fields.get(at + 1).map_or(head.len() - 2, start_of);
            if !head.get(start..end)?.ends_with(b"\r\n") {
                return None;
            }
            match FieldKind::of(field.name) {
                FieldKind::Other => {}
                FieldKind::Date => raw.dated = true,
                _ => continue,
            }
            let (start, end) = (start as u16, end as u16);
            match raw.runs[..usize::from(raw.len)].last_mut() {
                Some(run) if run.1 == start => run.1 = end,
                _ if usize::from(raw.len) == RAW_RUNS => return None,
                _ => {
                    raw.runs[usize::from(raw.len)] = (start, end);
                    raw.len += 1;
                }
            }
        }
        Some(raw)
    }

    /// Appends the kept lines and the request ID, each ending in CRLF.
    pub fn write(&self, out: &mut Vec<u8>) {
        for &(start, end) in &self.runs[..usize::from(self.len)] {
            out.extend_from_slice(&self.head[usize::from(start)..usize::from(end)]);
        }
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(self.request_id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// Whether the instance sent a `Date`.
    pub fn has_date(&self) -> bool {
        self.dated
    }
}

/// How an answer head is read.
#[derive(Clone, Copy)]
struct Reading<'a> {
    /// The answer to a HEAD request: no body, whatever its fields say.
    head_request: bool,
    /// The fields may stay raw ([`Outgoing::raw_answer`]), to go out with this request ID.
    raw_fields: Option<&'a HeaderValue>,
}

impl<'a> Reading<'a> {
    fn of(head: Outgoing<'a>) -> Reading<'a> {
        Reading {
            head_request: head.parts.method == Method::HEAD,
            raw_fields: head
                .fields
                .filter(|_| head.raw_answer)
                .map(ForwardedFields::request_id),
        }
    }
}

impl InstanceConn {
    pub fn new(stream: InstanceStream) -> InstanceConn {
        InstanceConn {
            stream,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: Vec::with_capacity(1024),
            // Armed by the first request; until then the timer is not in the wheel.
            deadline: LazyDeadline::new(Instant::now() + Duration::from_secs(3600)),
            requests: 0,
            answered: false,
            uploaded: 0,
        }
    }

    /// Requests sent on this connection so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Whether an answer came on this connection before: the instance closing it now without
    /// one is the close of a kept-alive connection (a stale one), not a failure of the request
    /// alone. On a new connection the first request has no such excuse.
    pub fn answered_any(&self) -> bool {
        self.answered
    }

    /// The size of its last request's body: an instance that answered before it read all of
    /// it may close the connection after its answer (hyper does when the rest of a body is not
    /// in yet; the larger the body, the likelier).
    pub fn uploaded(&self) -> u64 {
        self.uploaded
    }

    /// A connection whose last request uploaded `bytes` (tests of the pool's handling).
    #[cfg(test)]
    pub fn with_upload(mut self: Box<Self>, bytes: u64) -> Box<Self> {
        self.uploaded = bytes;
        self
    }

    /// The read side of this connection's stream as a line takes it over, still knowing
    /// whether an answer came on it ([`InstanceConn::answered_any`]).
    pub fn read_side(
        read: tokio::net::tcp::OwnedReadHalf,
        answered_any: bool,
    ) -> Box<InstanceConn> {
        let mut reader = Box::new(InstanceConn::new(InstanceStream::PipedRead(read)));
        reader.answered = answered_any;
        reader
    }

    /// A connection that carried `requests` already (tests of the limits on that count).
    #[cfg(test)]
    pub fn with_requests(mut self: Box<Self>, requests: u64) -> Box<Self> {
        self.requests = requests;
        self
    }

    /// False once the instance closed the idle connection or sent something unasked.
    pub fn is_open(&mut self) -> bool {
        self.stream.is_open()
    }

    /// Like `is_open`, asking the kernel (one system call).
    pub fn probe_open(&self) -> bool {
        self.stream.probe_open()
    }

    /// Whether bytes the instance sent are waiting to be read as an answer.
    pub fn has_buffered(&self) -> bool {
        !self.read.is_empty()
    }

    /// The local port, which tells connections apart in tests and logs.
    pub fn local_port(&self) -> u16 {
        self.stream.local_port()
    }

    /// The connection and whatever the instance sent after its answer head (an upgraded
    /// protocol's first bytes).
    pub fn into_parts(self) -> (InstanceStream, Bytes) {
        (self.stream, self.read.freeze())
    }

    /// Writes the request and reads the answer's head. The instance has `timeout` to answer
    /// once the whole request went out (counted from `started` for a request without a body,
    /// which goes out at once), and while a body goes out, that long to take each
    /// part of it (nginx's `proxy_read_timeout` and `proxy_send_timeout`); the time a slow
    /// client takes to send its body is not held against the instance. An answer that comes
    /// before the whole body went out (an early 413, say) is taken as it is; the connection
    /// is then not reused.
    pub async fn send(
        &mut self,
        head: Outgoing<'_>,
        body: &mut ForwardBody,
        started: Instant,
        timeout: Duration,
    ) -> Result<AnswerHead, SendError> {
        let InstanceConn {
            stream,
            read,
            write,
            deadline,
            requests,
            answered,
            uploaded,
        } = self;
        *requests += 1;
        *uploaded = 0;
        let parts = head.parts;
        let reading = Reading::of(head);
        let chunked = !body.is_end_stream() && !has(&parts.headers, &CONTENT_LENGTH);
        write.clear();
        encode_head(write, parts, head.fields, chunked);
        // Back to the front of the buffer once the last answer's bytes were released, so each
        // exchange reuses the same (cache-warm) memory instead of walking through all of it.
        read.clear();
        read.reserve(READ_CHUNK);
        if body.is_end_stream() {
            let due = started + timeout;
            let answer_started = AtomicBool::new(false);
            let answer = tokio::select! {
                biased;
                answer = send_head(stream, read, write, reading, &answer_started) => answer,
                () = deadline.wait(due) => Err(SendError::TimedOut),
            };
            let answer = mid_head(answer, answer_started.load(Relaxed));
            *answered |= answer.is_ok();
            return answer;
        }
        // A body that could not go again is not read ahead: a head that fails to go out
        // leaves it whole for another attempt.
        let ready = if body.keeps_replay() {
            take_ready(body, chunked, write)
                .map_err(|err| SendError::Client(ClientBodyFailure::of(&err)))?
        } else {
            Ready::More
        };
        let sent = write_first(stream, write).await;
        // What a large body left in the buffer is not kept with the pooled connection.
        if write.capacity() > KEPT_WRITE {
            *write = Vec::with_capacity(KEPT_WRITE);
        }
        sent?;
        let upload = Upload {
            body,
            chunked,
            timeout,
            ready,
        };
        let answer = match stream {
            InstanceStream::Tcp(tcp) => {
                let (reader, writer) = tcp.split();
                exchange(reader, writer, read, write, upload, deadline, reading).await
            }
            InstanceStream::Tls(tls) => {
                let (reader, writer) = tokio::io::split(&mut **tls);
                exchange(reader, writer, read, write, upload, deadline, reading).await
            }
            // Only body-less requests are pipelined.
            InstanceStream::PipedRead(_) => Err(SendError::Sent(
                "a request with a body on a pipelined connection".to_owned(),
            )),
        };
        *uploaded = body.bytes_read();
        *answered |= answer.is_ok();
        answer
    }

    /// Reads a pipelined request's answer head on the read side its turn brought (the bytes
    /// left after the answers before it are the start of its own): its first byte (an interim
    /// answer's included) is due at `start_due`, the whole head at `due`.
    pub async fn read_answer(
        &mut self,
        head: Outgoing<'_>,
        start_due: Instant,
        due: Instant,
    ) -> Result<AnswerHead, SendError> {
        let InstanceConn {
            stream,
            read,
            deadline,
            answered,
            ..
        } = self;
        let answer_started = AtomicBool::new(false);
        let reading = read_head(stream, read, Reading::of(head), &answer_started);
        tokio::pin!(reading);
        let mut until = start_due.min(due);
        let answer = loop {
            tokio::select! {
                biased;
                answer = &mut reading => break answer,
                () = deadline.wait(until) => {
                    if answer_started.load(Relaxed) && until < due {
                        until = due;
                        continue;
                    }
                    break Err(SendError::TimedOut);
                }
            }
        };
        let answer = mid_head(answer, answer_started.load(Relaxed));
        *answered |= answer.is_ok();
        answer
    }

    /// Reads the next answer, head and body, and throws it away, by `due`: the answer to a
    /// pipelined request (never a HEAD) given up while it waited. `Ok(true)` when it ended as
    /// framed within `most` bytes of body and left the connection open.
    pub async fn skip_answer(&mut self, due: Instant, most: u64) -> Result<bool, SendError> {
        let reading = Reading {
            head_request: false,
            raw_fields: None,
        };
        let InstanceConn {
            stream,
            read,
            deadline,
            answered,
            ..
        } = self;
        let skipped = async {
            let answer = read_head(stream, read, reading, &AtomicBool::new(false)).await?;
            *answered = true;
            let body = BodyProgress::of(answer.framing.framing);
            let ended = discard_body(stream, read, body, most).await?;
            Ok(ended && answer.framing.keep_alive)
        };
        tokio::select! {
            biased;
            skipped = skipped => skipped,
            () = deadline.wait(due) => Err(SendError::TimedOut),
        }
    }

    /// Reads the rest of an answer's body, `body` of it still to come, and throws it away,
    /// within `due` and `most` bytes; true once it ended.
    pub async fn skip_body(
        &mut self,
        body: BodyProgress,
        due: Instant,
        most: u64,
    ) -> Result<bool, SendError> {
        let InstanceConn {
            stream,
            read,
            deadline,
            ..
        } = self;
        tokio::select! {
            biased;
            skipped = discard_body(stream, read, body, most) => skipped,
            () = deadline.wait(due) => Err(SendError::TimedOut),
        }
    }
}

/// Reads `body` to its end out of `read`, then `stream`, throwing it away; false when it is
/// over `most` bytes, ends only at the close, or the connection closes first.
async fn discard_body(
    stream: &mut InstanceStream,
    read: &mut BytesMut,
    mut body: BodyProgress,
    most: u64,
) -> Result<bool, SendError> {
    let mut taken = 0;
    loop {
        // Every run of body already here (one chunk each), then the socket.
        loop {
            let run = body.take(read).map_err(|err| invalid_answer(&err))?;
            if run.is_empty() {
                break;
            }
            taken += run.len() as u64;
        }
        if body.is_done() {
            return Ok(true);
        }
        if taken > most || body == BodyProgress::UntilClose {
            return Ok(false);
        }
        make_room(read);
        match stream.read_buf(read).await {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(err) => return Err(SendError::BrokeOff(err.to_string())),
        }
    }
}

/// A timeout once the answer `started` (part of its head, or an interim answer, came) is
/// never sent again.
fn mid_head(answer: Result<AnswerHead, SendError>, started: bool) -> Result<AnswerHead, SendError> {
    match answer {
        Err(SendError::TimedOut) if started => Err(SendError::TimedOutMidHead),
        answer => answer,
    }
}

/// Appends the head of a body-less request as it goes to an instance.
pub fn encode_bodiless(out: &mut Vec<u8>, head: Outgoing<'_>) {
    encode_head(out, head.parts, head.fields, false);
}

/// A body-less request: the head goes out, the answer head comes back.
async fn send_head(
    stream: &mut InstanceStream,
    read: &mut BytesMut,
    write: &[u8],
    reading: Reading<'_>,
    started: &AtomicBool,
) -> Result<AnswerHead, SendError> {
    write_first(stream, write).await?;
    read_head(stream, read, reading, started).await
}

/// A request body on its way to an instance.
struct Upload<'a> {
    body: &'a mut ForwardBody,
    /// Chunk-framed: its length is unknown.
    chunked: bool,
    /// How long the instance may take to accept each part of it.
    timeout: Duration,
    /// What of it was taken before the head went out.
    ready: Ready,
}

/// At most this much of a request body goes out in the head's write.
const WITH_HEAD: usize = 64 * 1024;
/// The most of its write buffer a connection keeps between requests.
const KEPT_WRITE: usize = 4 * 1024;

/// What of a request body was taken, without waiting, before its head went out.
#[derive(Debug, PartialEq)]
enum Ready {
    /// What was here (maybe nothing) went with the head; the rest is still to come.
    More,
    /// A part too large to go with the head: it goes next.
    Part(Bytes),
    /// The whole body went with the head.
    Whole,
}

/// Adds to the head in `out` the body bytes that are already here (all of a small body, read
/// before the instance was picked), as nginx and HAProxy send a buffered body with its head.
/// An instance that answers after reading the head alone, the body not yet in, may close the
/// connection after its answer without a `Connection: close` (hyper does): the next request
/// on the pooled connection then meets that close, and is lost if it cannot be sent again.
fn take_ready<B>(body: &mut B, chunked: bool, out: &mut Vec<u8>) -> Result<Ready, BoxError>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    // Polled without a waker: a body with nothing here is polled again by the upload.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    loop {
        let frame = match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Pending => return Ok(Ready::More),
            Poll::Ready(None) => break,
            Poll::Ready(Some(frame)) => frame?,
        };
        // Trailers are dropped, as by the upload.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let framing = if chunked { 16 + 2 } else { 0 };
        if out.len() + data.len() + framing > WITH_HEAD {
            return Ok(Ready::Part(data));
        }
        if chunked {
            push_chunk(out, &data);
        } else {
            out.extend_from_slice(&data);
        }
        if body.is_end_stream() {
            break;
        }
    }
    if chunked {
        out.extend_from_slice(LAST_CHUNK);
    }
    Ok(Ready::Whole)
}

/// Uploads the body while reading the answer head, on the two halves of one connection; the
/// answer is due `upload.timeout` after the upload ended. An answer head that does not refuse
/// the request (below 400) and is not followed by its whole body lets the upload go on to its
/// end first: the instance may read the body while it answers (a streaming endpoint), and
/// cutting the body off would leave it waiting for bytes that never come.
async fn exchange<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut reader: R,
    mut writer: W,
    read: &mut BytesMut,
    write: &mut Vec<u8>,
    upload: Upload<'_>,
    deadline: &mut LazyDeadline,
    reading: Reading<'_>,
) -> Result<AnswerHead, SendError> {
    let timeout = upload.timeout;
    let upload = write_body(&mut writer, upload, write);
    tokio::pin!(upload);
    let mut due = None;
    let mut request_complete = false;
    let mut answer = {
        let answer_started = AtomicBool::new(false);
        let answer = read_head(&mut reader, read, reading, &answer_started);
        tokio::pin!(answer);
        loop {
            tokio::select! {
                biased;
                answer = &mut answer => break answer?,
                sent = &mut upload, if due.is_none() => {
                    due = Some(Instant::now() + timeout);
                    match sent {
                        Ok(()) => request_complete = true,
                        // The instance stopped reading; it may still have answered.
                        Err(UploadError::Instance) => {}
                        Err(UploadError::Stalled) => {
                            return mid_head(Err(SendError::TimedOut), answer_started.load(Relaxed))
                        }
                        Err(UploadError::Client(failure)) => {
                            return Err(SendError::Client(failure))
                        }
                    }
                }
                () = deadline.wait(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    // Part of an answer head came: the instance acted on the request.
                    return mid_head(Err(SendError::TimedOut), answer_started.load(Relaxed));
                }
            }
        }
    };
    let status = answer.head.status;
    if due.is_none() && status.as_u16() < 400 && status != StatusCode::SWITCHING_PROTOCOLS {
        let framing = answer.framing.framing;
        request_complete = finish_upload(&mut reader, read, framing, upload).await?;
    }
    answer.request_complete = request_complete;
    Ok(answer)
}

/// Answer bytes read ahead while the rest of a request body goes out after the answer head.
const READ_AHEAD: usize = 64 * 1024;

/// Drives the upload to its end after the answer head came, reading up to `READ_AHEAD` of the
/// answer body meanwhile so an instance that writes while it reads is not blocked on us. Gives
/// up the upload (the connection is then not reused) once the answer's whole sized body is
/// here (the instance answered without the rest, as before an early 413), when that much is
/// waiting, or when the instance closes, stops reading, or takes no part of the body for the
/// timeout; the answer stands either way. Returns whether the whole body went out.
async fn finish_upload<R: AsyncRead + Unpin>(
    reader: &mut R,
    read: &mut BytesMut,
    framing: Framing,
    mut upload: Pin<&mut impl Future<Output = Result<(), UploadError>>>,
) -> Result<bool, SendError> {
    let answered =
        |read: &BytesMut| matches!(framing, Framing::Length(n) if read.len() as u64 >= n);
    read.reserve(READ_AHEAD.saturating_sub(read.len()));
    while read.len() < READ_AHEAD && !answered(read) {
        tokio::select! {
            biased;
            sent = &mut upload => {
                return match sent {
                    Ok(()) => Ok(true),
                    Err(UploadError::Client(failure)) => Err(SendError::Client(failure)),
                    Err(UploadError::Instance | UploadError::Stalled) => Ok(false),
                };
            }
            more = reader.read_buf(read) => {
                if !matches!(more, Ok(read) if read > 0) {
                    return Ok(false);
                }
            }
        }
    }
    Ok(false)
}

/// The request line and fields, then the gateway's `fields`; `chunked` adds the framing of a
/// body of unknown length.
fn encode_head(out: &mut Vec<u8>, parts: &Parts, fields: Option<&ForwardedFields>, chunked: bool) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(fields) = fields {
        fields.write(out);
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the head; a failure before its first byte went out leaves the request unsent.
async fn write_first(stream: &mut InstanceStream, head: &[u8]) -> Result<(), SendError> {
    let written = stream.write(head).await.map_err(SendError::Unsent)?;
    if written == 0 {
        return Err(SendError::Unsent(io::ErrorKind::WriteZero.into()));
    }
    let sent = |err: io::Error| SendError::Sent(err.to_string());
    stream.write_all(&head[written..]).await.map_err(sent)?;
    // TLS may hold records back when the socket is full; plain TCP flushes at once.
    stream.flush().await.map_err(sent)
}

enum UploadError {
    /// The instance closed or reset the connection.
    Instance,
    /// The instance took none of a part of the body for the whole timeout.
    Stalled,
    Client(ClientBodyFailure),
}

/// Streams the client's body to the instance, chunk-framed when its length is unknown. Request
/// trailers are dropped, whatever the client's protocol, as nginx does: an HTTP/2 client's
/// would otherwise reach the instance past every check its header fields go through.
async fn write_body<W: AsyncWrite + Unpin>(
    writer: &mut W,
    upload: Upload<'_>,
    scratch: &mut Vec<u8>,
) -> Result<(), UploadError> {
    let Upload {
        body,
        chunked,
        timeout,
        ready,
    } = upload;
    let mut next = match ready {
        Ready::Whole => return Ok(()),
        Ready::More => None,
        Ready::Part(data) => Some(data),
    };
    loop {
        let data = match next.take() {
            Some(data) => data,
            None => match body.frame().await {
                None => break,
                Some(frame) => {
                    let frame =
                        frame.map_err(|err| UploadError::Client(ClientBodyFailure::of(&err)))?;
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    data
                }
            },
        };
        if data.is_empty() {
            continue;
        }
        within(timeout, async {
            if !chunked {
                writer.write_all(&data).await?;
            } else if data.len() <= SMALL_CHUNK {
                scratch.clear();
                push_chunk(scratch, &data);
                writer.write_all(scratch).await?;
            } else {
                scratch.clear();
                chunk_header(scratch, data.len());
                writer.write_all(scratch).await?;
                writer.write_all(&data).await?;
                writer.write_all(b"\r\n").await?;
            }
            writer.flush().await
        })
        .await?;
    }
    if chunked {
        within(timeout, async {
            writer.write_all(LAST_CHUNK).await?;
            writer.flush().await
        })
        .await?;
    }
    Ok(())
}

/// Runs a write to the instance, which fails as stalled when it takes longer than `timeout`.
async fn within(
    timeout: Duration,
    write: impl Future<Output = io::Result<()>>,
) -> Result<(), UploadError> {
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(UploadError::Instance),
        Err(_) => Err(UploadError::Stalled),
    }
}

/// The last chunk of a chunked body, with no trailers.
pub(super) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// `data` as one chunk: its size line, the bytes and CRLF.
fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    chunk_header(out, data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// A chunk-size line: the length in hex and CRLF.
pub(super) fn chunk_header(out: &mut Vec<u8>, len: usize) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut rest = len;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// Room for the next read from an instance: another chunk once less than a quarter of one is
/// left.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// Reads until an answer head (other than 1xx interim ones) is complete. `started` is set once
/// a byte of answer is here, an interim one's included: a timeout then cuts an answer off.
async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    reading: Reading<'_>,
    started: &AtomicBool,
) -> Result<AnswerHead, SendError> {
    if !buf.is_empty() {
        started.store(true, Relaxed);
    }
    loop {
        if !buf.is_empty() {
            match parse_head(buf, reading)? {
                Some(Parsed::Interim(len)) => {
                    buf.advance(len);
                    continue;
                }
                Some(Parsed::Final(answer)) => return Ok(answer),
                None => {}
            }
        }
        make_room(buf);
        let read = match reader.read_buf(buf).await {
            Ok(read) => read,
            Err(err) if !started.load(Relaxed) => return Err(SendError::NoAnswer(err.to_string())),
            Err(err) => return Err(SendError::BrokeOff(err.to_string())),
        };
        if read == 0 {
            return Err(if started.load(Relaxed) {
                SendError::BrokeOff(
                    "instance closed the connection inside its answer head".to_owned(),
                )
            } else {
                SendError::NoAnswer("instance closed the connection without answering".to_owned())
            });
        }
        started.store(true, Relaxed);
    }
}

// Returned once per answer and taken apart at once: boxing the answer would allocate for it.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// A 1xx interim answer of this many bytes: the real one follows.
    Interim(usize),
    /// The answer; `request_complete` is for the caller to say.
    Final(AnswerHead),
}

/// Parses an answer head at the front of `buf`, taking it out of the buffer when complete. The
/// header values are slices of the head's bytes, not copies.
fn parse_head(buf: &mut BytesMut, reading: Reading<'_>) -> Result<Option<Parsed>, SendError> {
    parse_head_in(buf, reading, false)
}

/// `many`: the fields did not fit on the stack, parse them on the heap.
fn parse_head_in(
    buf: &mut BytesMut,
    reading: Reading<'_>,
    many: bool,
) -> Result<Option<Parsed>, SendError> {
    let mut stack = [MaybeUninit::<httparse::Header<'_>>::uninit(); STACK_HEADERS];
    let mut heap = Vec::new();
    let fields = if many {
        // A field takes at least 3 bytes (`a:` and a line end).
        heap.resize(buf.len().min(MAX_HEAD) / 3 + 1, MaybeUninit::uninit());
        &mut heap[..]
    } else {
        &mut stack[..]
    };
    let (answer, parsed) = parse_response(buf, fields);
    let len = match parsed {
        // The limit holds however the head arrived (in one read, it would parse whole).
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            return Err(invalid_answer(&"head larger than 64 KiB"))
        }
        Ok(httparse::Status::Complete(len)) => len,
        // Many cookies, CSP or tracing fields make a valid answer, however rare.
        Err(httparse::Error::TooManyHeaders) if !many => return parse_many_fields(buf, reading),
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(invalid_answer(&"head larger than 64 KiB")),
        Err(err) => return Err(invalid_answer(&err)),
    };
    let code = answer.code.unwrap_or(0);
    if code / 100 == 1 && code != 101 {
        return Ok(Some(Parsed::Interim(len)));
    }
    let status = StatusCode::from_u16(code).map_err(|err| invalid_answer(&err))?;
    let framing = response_framing(
        code,
        answer.version.unwrap_or(1),
        answer.headers,
        reading.head_request,
        Codings::ChunkedOnly,
    )
    .map_err(|err| invalid_answer(&err))?;
    // The gateway frames the body itself towards the client.
    let framed_by_length = matches!(framing.framing, Framing::Length(_));
    // Hop-by-hop fields are left out here, unless `Connection` names other fields to drop or
    // the protocol switches; `strip_hop_by_hop` then takes them out of the map.
    let skip_hop_by_hop = code != 101 && !framing.names_fields;
    // Answers without a body (HEAD, 204, 304) keep the instance's Content-Length, which only
    // the map path does.
    let raw_fields = reading
        .raw_fields
        .filter(|_| skip_hop_by_hop && !reading.head_request && !matches!(code, 204 | 304))
        .and_then(|request_id| RawFields::find(answer.headers, &buf[..len], request_id));
    let (map, raw_fields) = match raw_fields {
        Some(mut raw) => {
            raw.head = buf.split_to(len).freeze();
            (HeaderMap::new(), Some(raw))
        }
        None => {
            let mut spans = FieldSpans::default();
            spans.record(answer.headers, buf.as_ptr(), |name| {
                let kind = FieldKind::of(name);
                !(skip_hop_by_hop && kind.is_hop_by_hop()) && kind != FieldKind::ContentLength
            });
            let head_bytes = buf.split_to(len).freeze();
            let mut map = spans
                .to_map(&head_bytes, 3)
                .map_err(|err| invalid_answer(&err))?;
            // One field with one number, whatever repetition the instance wrote: an HTTP/2
            // client takes `5, 5` or two fields as malformed (RFC 9113 §8.1.1), and a HEAD
            // answer or a stored one would pass them on.
            if let Some(length) = framing.content_length.filter(|_| framed_by_length) {
                map.insert(CONTENT_LENGTH, HeaderValue::from(length));
            }
            (map, None)
        }
    };
    let (mut head, ()) = Response::new(()).into_parts();
    head.status = status;
    head.headers = map;
    Ok(Some(Parsed::Final(AnswerHead {
        head,
        raw_fields,
        framing,
        request_complete: true,
    })))
}

#[cold]
fn parse_many_fields(
    buf: &mut BytesMut,
    reading: Reading<'_>,
) -> Result<Option<Parsed>, SendError> {
    parse_head_in(buf, reading, true)
}

#[cold]
fn invalid_answer(what: &dyn std::fmt::Display) -> SendError {
    SendError::Invalid(format!("invalid answer: {what}"))
}

/// An instance's answer body, streamed to the client. Holds the connection and the request's
/// in-flight guard; at the end of the body a reusable connection goes back to the pool.
pub struct InstanceBody {
    conn: Option<Box<InstanceConn>>,
    progress: BodyProgress,
    reusable: bool,
    guard: Option<InFlightGuard>,
    /// The request's place on a pipelined line: the connection goes on to the next request.
    line: Option<LineHold>,
    raw_fields: Option<RawFields>,
    /// Timed with the connection's own timer.
    pause: PauseLimit,
    /// Bytes read from the instance since the head (up to `u32::MAX`), for a body whose
    /// length is not known.
    came: u32,
}

/// The most of an answer's body the requests queued behind it on its line wait for while it is
/// already here: reading on then holds no one up; a larger answer's pace is its client's.
const QUEUE_WAITS_FOR: u64 = 64 * 1024;

impl InstanceBody {
    /// The body of `answer`, which takes the answer's raw fields along and fails once it has
    /// waited `pause_limit` for the instance's next bytes.
    pub fn new(
        conn: Box<InstanceConn>,
        line: Option<LineHold>,
        answer: &mut AnswerHead,
        guard: InFlightGuard,
        pause_limit: Duration,
    ) -> InstanceBody {
        let mut body = InstanceBody {
            conn: Some(conn),
            progress: BodyProgress::of(answer.framing.framing),
            reusable: answer.framing.keep_alive && answer.request_complete,
            guard: Some(guard),
            line,
            raw_fields: answer.raw_fields.take(),
            pause: PauseLimit::new(pause_limit),
            came: 0,
        };
        if body.progress.is_done() {
            body.finish();
        } else if body.progress == BodyProgress::UntilClose {
            // The line ends with it (pipelining to the instance ended as its head came): the
            // requests not yet written behind it go elsewhere now.
            if let Some(line) = body.line.as_mut() {
                line.release_queue();
            }
        }
        body
    }

    /// The instance's fields, when they stayed raw.
    pub fn raw_fields(&self) -> Option<&RawFields> {
        self.raw_fields.as_ref()
    }

    /// The body ended as framed: the connection is pooled if it may carry another request and
    /// the instance sent nothing past the answer.
    fn finish(&mut self) {
        self.progress = BodyProgress::Done;
        if let (Some(conn), Some(guard)) = (self.conn.take(), self.guard.take()) {
            match self.line.take() {
                Some(line) => line.hand_on(conn, self.reusable),
                None if self.reusable && conn.read.is_empty() => guard.instance.pool.checkin(conn),
                None => {}
            }
        }
    }

    /// The connection broke: dropped, never pooled.
    fn fail(&mut self, error: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.progress = BodyProgress::Done;
        self.conn = None;
        self.guard = None;
        self.line = None;
        Poll::Ready(Some(Err(error.into())))
    }

    /// The next data out of what is buffered (empty when more bytes are needed).
    fn take_buffered(&mut self) -> Result<Bytes, crate::http1::ParseError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Bytes::new());
        };
        let data = self.progress.take(&mut conn.read)?;
        if self.progress.is_done() {
            self.finish();
        }
        Ok(data)
    }
}

impl Drop for InstanceBody {
    /// Its client left mid-answer. Requests written behind it on its line get their answers
    /// once the rest of this one is thrown away ([`LineHold::skip_rest`]): dropped with the
    /// line, they went again elsewhere, and ran twice. Otherwise the connection closes.
    fn drop(&mut self) {
        if let (Some(conn), Some(line)) = (self.conn.take(), self.line.take()) {
            if line.written_behind() {
                line.skip_rest(conn, self.progress, self.reusable);
            }
        }
    }
}

impl Body for InstanceBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.take_buffered() {
                Err(err) => return this.fail(err),
                Ok(data) if !data.is_empty() => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(_) => {}
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // The body did not come whole with the head. The requests queued behind it wait
            // only while the rest is small and already here: they were sent, and sent again
            // elsewhere they would run twice (a body split by the read size alone, a few KiB,
            // sent every one of them again).
            let large = match this.progress.exact_left() {
                Some(left) => left > QUEUE_WAITS_FOR,
                None => u64::from(this.came) > QUEUE_WAITS_FOR,
            };
            if large {
                if let Some(line) = this.line.as_mut() {
                    line.release_queue();
                }
            }
            make_room(&mut conn.read);
            let before = conn.read.len();
            let read = match poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.read) {
                Poll::Ready(read) => read,
                Poll::Pending => {
                    // Still coming: the instance, not the read size, sets the pace.
                    if let Some(line) = this.line.as_mut() {
                        line.release_queue();
                    }
                    ready!(this.pause.poll_expired(cx, &mut conn.deadline));
                    return this.fail(PAUSED);
                }
            };
            this.pause.progressed();
            let read_now = u32::try_from(conn.read.len() - before).unwrap_or(u32::MAX);
            this.came = this.came.saturating_add(read_now);
            match read {
                Ok(0) if this.progress == BodyProgress::UntilClose => {
                    this.progress = BodyProgress::Done;
                    this.conn = None;
                    this.guard = None;
                    this.line = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail("instance closed the connection inside its answer body"),
                Ok(_) => debug_assert!(conn.read.len() > before),
                Err(err) => return this.fail(err),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.progress.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.progress
            .exact_left()
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: Reading = Reading {
        head_request: false,
        raw_fields: None,
    };

    fn answer(text: &[u8], reading: Reading<'_>) -> (AnswerHead, BytesMut) {
        let mut buf = BytesMut::from(text);
        match parse_head(&mut buf, reading) {
            Ok(Some(Parsed::Final(answer))) => (answer, buf),
            _ => panic!("not a final head: {:?}", String::from_utf8_lossy(text)),
        }
    }

    fn parsed(text: &[u8], head_request: bool) -> (response::Parts, BodyFraming, BytesMut) {
        let reading = Reading {
            head_request,
            ..MAP
        };
        let (answer, rest) = answer(text, reading);
        assert!(answer.raw_fields.is_none());
        (answer.head, answer.framing, rest)
    }

    /// The raw fields of an answer read for the client loop, as they would be written.
    fn raw(text: &[u8]) -> Option<String> {
        raw_answering(text, false)
    }

    fn raw_answering(text: &[u8], head_request: bool) -> Option<String> {
        let request_id = HeaderValue::from_static("ours");
        let reading = Reading {
            head_request,
            raw_fields: Some(&request_id),
        };
        let (answer, _) = answer(text, reading);
        let raw = answer.raw_fields?;
        assert!(answer.head.headers.is_empty());
        let mut out = Vec::new();
        raw.write(&mut out);
        Some(format!(
            "{}{}",
            raw.has_date(),
            String::from_utf8(out).unwrap()
        ))
    }

    #[test]
    fn raw_fields_keep_the_end_to_end_lines_as_written() {
        assert_eq!(
            raw(
                b"HTTP/1.1 200 OK\r\nServer: x\r\nDate: d\r\nContent-Length: 2\r\n\
                  Connection: keep-alive\r\nX-Request-ID: theirs\r\nX-Other:  a b\r\n\r\nok"
            )
            .as_deref(),
            Some("trueServer: x\r\nDate: d\r\nX-Other:  a b\r\nx-request-id: ours\r\n")
        );
        assert_eq!(
            raw(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n").as_deref(),
            Some("falsex-request-id: ours\r\n")
        );
        // Four runs at most.
        let many = b"HTTP/1.1 200 OK\r\nA: 1\r\nTE: x\r\nB: 2\r\nTE: x\r\nC: 3\r\nTE: x\r\n\
                     D: 4\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            raw(many).as_deref(),
            Some("falseA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nx-request-id: ours\r\n")
        );
        let too_many = b"HTTP/1.1 200 OK\r\nA: 1\r\nTE: x\r\nB: 2\r\nTE: x\r\nC: 3\r\nTE: x\r\n\
                         D: 4\r\nTE: x\r\nE: 5\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(raw(too_many), None);
    }

    #[test]
    fn answers_the_map_must_handle_do_not_stay_raw() {
        let bare_newlines: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\nA: 1\nContent-Length: 0\n\n",
            b"HTTP/1.1 200 OK\r\nA: 1\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: 1\r\nContent-Length: 0\r\n\n",
        ];
        for text in bare_newlines {
            assert_eq!(raw(text), None, "{}", String::from_utf8_lossy(text));
        }
        // Connection names a field to drop; bodiless answers keep their Content-Length.
        assert_eq!(
            raw(b"HTTP/1.1 200 OK\r\nConnection: x-a\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n"),
            None
        );
        assert_eq!(
            raw(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"),
            None
        );
        assert_eq!(raw(b"HTTP/1.1 204 No Content\r\n\r\n"), None);
        let sized = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert!(raw(sized).is_some());
        assert_eq!(raw_answering(sized, true), None);
        assert_eq!(
            raw(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n"),
            None
        );
    }

    #[test]
    fn answer_heads_become_header_maps() {
        let (head, framing, rest) = parsed(
            b"HTTP/1.1 201 Created\r\nX-A: 1\r\nx-a: 2\r\nEmpty:\r\nContent-Length: 2\r\n\r\nok",
            false,
        );
        assert_eq!(head.status, StatusCode::CREATED);
        let values: Vec<_> = head.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(head.headers["empty"], "");
        assert_eq!(head.headers[CONTENT_LENGTH], "2");
        assert_eq!(framing.framing, Framing::Length(2));
        assert_eq!(&rest[..], b"ok");
    }

    #[test]
    fn hop_by_hop_fields_are_left_out_unless_connection_names_others() {
        fn names(head: &response::Parts) -> Vec<&str> {
            let mut names: Vec<&str> = head.headers.keys().map(|k| k.as_str()).collect();
            names.sort_unstable();
            names
        }
        let (head, _, _) = parsed(
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\n\
              Server: x\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert_eq!(names(&head), ["content-length", "server"]);
        // Connection naming a field: everything stays for strip_hop_by_hop to take out.
        let (head, _, _) = parsed(
            b"HTTP/1.1 200 OK\r\nConnection: close, X-Private\r\nX-Private: 1\r\n\
              Content-Length: 0\r\n\r\n",
            false,
        );
        assert_eq!(names(&head), ["connection", "content-length", "x-private"]);
        // A protocol switch keeps Connection and Upgrade.
        let (head, _, _) = parsed(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n",
            false,
        );
        assert_eq!(names(&head), ["connection", "upgrade"]);
    }

    #[test]
    fn answers_with_more_fields_than_the_stack_holds_are_read() {
        let mut text = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..STACK_HEADERS + 22 {
            text.extend_from_slice(format!("Set-Cookie: c{i}=1\r\n").as_bytes());
        }
        text.extend_from_slice(b"Content-Length: 2\r\n\r\nok");
        let (head, _, rest) = parsed(&text, false);
        assert_eq!(head.headers.get_all("set-cookie").iter().count(), 150);
        assert_eq!(&rest[..], b"ok");
        let raw = raw(&text).unwrap();
        assert_eq!(raw.matches("Set-Cookie: ").count(), 150);
    }

    #[test]
    fn interim_and_partial_heads() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"[..]);
        assert!(matches!(
            parse_head(&mut buf, MAP),
            Ok(Some(Parsed::Interim(25)))
        ));
        buf.advance(25);
        assert!(matches!(parse_head(&mut buf, MAP), Ok(None)));
        let mut garbage = BytesMut::from(&b"SMTP ready\r\n\r\n"[..]);
        assert!(matches!(
            parse_head(&mut garbage, MAP),
            Err(SendError::Invalid(_))
        ));
        let mut huge = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX: "[..]);
        huge.extend_from_slice(&vec![b'a'; MAX_HEAD]);
        assert!(matches!(
            parse_head(&mut huge, MAP),
            Err(SendError::Invalid(_))
        ));
        // Whole in one read, it is just as much over the limit.
        huge.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
        assert!(matches!(
            parse_head(&mut huge, MAP),
            Err(SendError::Invalid(_))
        ));
    }

    #[test]
    fn rechunked_answers_lose_their_length() {
        let (head, framing, _) = parsed(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(framing.framing, Framing::Chunked);
        assert!(!framing.keep_alive);
        assert!(!head.headers.contains_key(CONTENT_LENGTH));
        let (head, framing, _) = parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true);
        assert_eq!(framing.framing, Framing::Length(0));
        assert_eq!(head.headers[CONTENT_LENGTH], "3");
        // A repeated length goes on as one field with one number, with a body or without.
        for (text, head_request) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"[..],
                false,
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", false),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3,3\r\nContent-Length: 3\r\n\r\n",
                true,
            ),
        ] {
            let (head, _, _) = parsed(text, head_request);
            let lengths: Vec<_> = head.headers.get_all(CONTENT_LENGTH).iter().collect();
            assert_eq!(lengths, ["3"], "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn request_heads_are_written_as_received() {
        let request = http::Request::builder()
            .method("POST")
            .uri("/a/b?c=d")
            .header("host", "example.test")
            .header("x-many", "1")
            .header("x-many", "2")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let mut out = Vec::new();
        encode_head(&mut out, &parts, None, true);
        assert_eq!(
            out,
            b"POST /a/b?c=d HTTP/1.1\r\nhost: example.test\r\nx-many: 1\r\nx-many: 2\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let mut header = Vec::new();
        chunk_header(&mut header, 255);
        chunk_header(&mut header, 0);
        chunk_header(&mut header, 0x10000);
        assert_eq!(header, b"ff\r\n0\r\n10000\r\n");
    }

    /// A test upload.
    type Upload = http_body_util::StreamBody<
        futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, BoxError>>,
    >;

    /// A body of these parts, the last one `Some(later)` and then its end, or `None`: all at
    /// once and then a wait for more.
    fn body_of(parts: &[&'static [u8]], last_after: Option<Duration>) -> Upload {
        use futures_util::stream::{self, StreamExt};
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|part| Ok(Frame::data(Bytes::from_static(part))))
            .collect();
        let last = frames.pop();
        let now = stream::iter(frames);
        let frames = match last_after {
            Some(Duration::ZERO) => now.chain(stream::iter(last)).boxed(),
            Some(later) => now
                .chain(stream::once(async move {
                    tokio::time::sleep(later).await;
                    last.unwrap()
                }))
                .boxed(),
            None => now
                .chain(stream::iter(last))
                .chain(stream::pending())
                .boxed(),
        };
        http_body_util::StreamBody::new(frames)
    }

    fn ready(body: &mut Upload, chunked: bool, out: &mut Vec<u8>) -> Ready {
        take_ready(body, chunked, out).unwrap()
    }

    #[tokio::test]
    async fn a_body_already_here_goes_out_with_its_head() {
        let mut out = b"HEAD\r\n\r\n".to_vec();
        let mut whole = body_of(&[b"ab", b"cde"], Some(Duration::ZERO));
        assert_eq!(ready(&mut whole, false, &mut out), Ready::Whole);
        assert_eq!(out, b"HEAD\r\n\r\nabcde");

        let mut out = Vec::new();
        let mut chunked = body_of(&[b"ab", b"", b"cde"], Some(Duration::ZERO));
        assert_eq!(ready(&mut chunked, true, &mut out), Ready::Whole);
        assert_eq!(out, b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n");

        // What is here goes; the rest is left to the upload.
        let mut out = Vec::new();
        let mut partial = body_of(&[b"ab"], None);
        assert_eq!(ready(&mut partial, true, &mut out), Ready::More);
        assert_eq!(out, b"2\r\nab\r\n");
        let mut out = Vec::new();
        let mut late = body_of(&[b"ab", b"cd"], Some(Duration::from_millis(20)));
        assert_eq!(ready(&mut late, false, &mut out), Ready::More);
        assert_eq!(out, b"ab");

        // A part the head's write has no room for is handed to the upload as it is.
        let mut out = vec![b'h'; WITH_HEAD - 2];
        let mut large = body_of(&[b"ab", b"cd"], Some(Duration::ZERO));
        let part = ready(&mut large, false, &mut out);
        assert_eq!(part, Ready::Part(Bytes::from_static(b"cd")));
        assert_eq!(out.len(), WITH_HEAD);

        let mut out = Vec::new();
        let failing = futures_util::stream::iter([Err("client left".into())]);
        let mut failing: Upload = http_body_util::StreamBody::new(Box::pin(failing));
        assert!(take_ready(&mut failing, false, &mut out).is_err());
        assert!(out.is_empty());
    }
}
