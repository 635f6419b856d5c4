//! The client side of HTTP/1.1, plain or over TLS: reads request heads with `httparse`,
//! streams request bodies by their framing, writes answers (head and the first body bytes in
//! one write when they are at hand), keeps connections alive, and hands upgraded connections
//! to the tunnel. HTTP/2 (prior knowledge or TLS ALPN h2) stays with hyper's server; this path
//! costs a fraction of hyper's per-request dispatch, and holds HTTPS clients to the same rules.
//!
//! Limits: a new connection must bring a complete head within `header_read_timeout`; an idle
//! keep-alive connection is closed after `idle_timeout`, and once its next head has started it
//! too has `header_read_timeout`. Heads larger than `max_header_size` get 431, a request line
//! longer than `max_uri_length` 414, more than `max_headers` fields 431, malformed heads and
//! ambiguous framing (Content-Length with Transfer-Encoding, conflicting lengths, codings
//! other than one `chunked`) 400 — each with a JSON body carrying a request ID, then the
//! connection is closed. A client that takes none of an answer for `idle_timeout` is cut off.
//! When an answer comes before the request body was read to its end, the rest of the body is
//! discarded (up to `DISCARD_LIMIT`) to keep the connection; otherwise it is closed after the
//! answer, reading and discarding what the client still sends for a moment so the answer is
//! not lost to a reset.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;

use super::body::{BoxError, ClientBody, ClientLeft, GatewayBody};
use super::client_io::{ClientRead, ClientStream, ClientWrite};
use super::connections::ConnectionPermit;
use super::deadline::LazyDeadline;
use super::error::ProxyError;
use super::forward::{self, ClientAddr};
use super::h1::{chunk_header, RawFields, LAST_CHUNK};
use super::headers::{check_framing, client_request_id, has, value, values};
use super::record::RequestRecord;
use super::tunnel::Handover;
use super::Gateway;
use crate::config::ServerConfig;
use crate::http1::{has_token, recycle_map, BodyProgress, ConnectionOptions, FieldSpans, Framing};

const READ_CHUNK: usize = 8 * 1024;
/// Body bytes up to this size are copied behind the head (or the previous bytes) and go out in
/// one write; larger ones are written from their own buffer.
const COALESCE: usize = 16 * 1024;
/// A large body goes to a TLS client in slices of this size, each given the idle timeout.
const TLS_SLICE: usize = 64 * 1024;
/// Header fields parsed on the stack; a larger `max_headers` parses into a vector.
const STACK_HEADERS: usize = crate::config::DEFAULT_MAX_HEADERS;
/// How long a connection closed with unread client bytes keeps reading (and discarding) them.
const LINGER: Duration = Duration::from_secs(2);
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// How long an idle keep-alive connection is kept once the gateway drains: a request the client
/// sent before it could see the drain is on its way, and is served (with `Connection: close`)
/// instead of meeting a closed connection.
const DRAIN_LINGER: Duration = Duration::from_secs(1);
/// Most request-body bytes read and dropped after an early answer to keep the connection.
const DISCARD_LIMIT: usize = 1024 * 1024;

/// What the client side needs from `[server]`, read once per connection.
#[derive(Clone, Copy)]
pub struct ClientLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_head: usize,
    pub max_headers: usize,
    pub max_uri: usize,
    pub underscores_in_headers: bool,
    pub max_body: u64,
}

impl ClientLimits {
    pub fn of(server: &ServerConfig) -> ClientLimits {
        ClientLimits {
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            max_head: server.max_header_bytes,
            max_headers: server.max_headers,
            max_uri: server.max_uri_length,
            underscores_in_headers: server.underscores_in_headers,
            max_body: server.max_body,
        }
    }
}

/// The read side of a client connection and what was read but not yet used.
pub struct ConnReader {
    half: ClientRead,
    buf: BytesMut,
}

impl ConnReader {
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        poll_read_buf(Pin::new(&mut self.half), cx, &mut self.buf)
    }
}

/// A request head as the gateway needs it to answer.
struct RequestHead {
    parts: http::request::Parts,
    body: BodyKind,
    /// The client allows another request on this connection.
    keep_alive: bool,
    expect_continue: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

/// Serves one client connection until it closes, fails, idles out or the gateway drains.
pub async fn serve(
    stream: ClientStream,
    gateway: Arc<Gateway>,
    (client, permit): (ClientAddr, ConnectionPermit),
    limits: ClientLimits,
    drain: watch::Receiver<bool>,
) {
    // Held while the connection is open, then by the tunnel an upgrade hands it to.
    let mut permit = Some(permit);
    let client = client.answered_raw();
    let (half, writer) = stream.split();
    let mut conn = ClientConn {
        reader: Some(ConnReader {
            half,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }),
        unread_body: None,
        writer,
        out: Vec::with_capacity(1024),
        deadline: LazyDeadline::new(Instant::now() + limits.header_read_timeout),
        limits,
        drained: Box::pin(drained(drain.clone())),
        draining: false,
        drain,
    };
    let mut first = true;
    loop {
        let head = match conn.next_head(first).await {
            NextHead::Request(head) => head,
            NextHead::Closed => return conn.close().await,
            // Logged and counted, with no answer: the client is too slow to be worth one.
            NextHead::TimedOut => {
                let status = StatusCode::REQUEST_TIMEOUT;
                let request_id = gateway.new_request_id();
                let mut record = forward::refused_record(&gateway, &client, status, request_id);
                // It waited out the head's time, as nginx's `$request_time` shows.
                record.began(conn.limits.header_read_timeout);
                drop(record);
                return conn.close().await;
            }
            NextHead::Refused(HeadRefusal {
                error,
                request_id,
                head_request,
            }) => {
                let request_id = request_id.unwrap_or_else(|| gateway.new_request_id());
                let response = error.response(&request_id);
                let mut record =
                    forward::refused_record(&gateway, &client, error.status(), request_id);
                let _ = conn
                    .write_response(response, &mut record, false, head_request, false, None)
                    .await;
                drop(record);
                conn.linger().await;
                return;
            }
        };
        first = false;
        let RequestHead {
            parts,
            body,
            keep_alive,
            expect_continue,
        } = head;
        let head_request = parts.method == Method::HEAD;
        let http10 = parts.version == Version::HTTP_10;
        let back = (body != BodyKind::None).then(|| Arc::new(BodyReturn::default()));
        let body = match (body, &back) {
            (BodyKind::None, _) | (_, None) => ClientBody::Empty,
            (kind, Some(back)) => ClientBody::Http1(RequestBody {
                reader: conn.reader.take(),
                progress: BodyProgress::of(match kind {
                    BodyKind::Length(length) => Framing::Length(length),
                    _ => Framing::Chunked,
                }),
                back: back.clone(),
                send_continue: expect_continue,
            }),
        };
        // Any Upgrade field gets a way to hand the connection over; forward() reads whether the
        // request really asks to switch (Connection: upgrade too) and drops it otherwise.
        let (upgrade_tx, upgrade) = if has(&parts.headers, &header::UPGRADE) {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // Dropped once the answer went out, or with the connection when the client left first.
        let mut record = forward::request_record(&gateway, &parts, &client);
        let request = Request::from_parts(parts, body);
        let answer = {
            let handled = forward::handle(&gateway, request, &client, upgrade, &mut record);
            // Pinned here, once: each branch only borrows it, so the task holds one such future.
            tokio::pin!(handled);
            match &back {
                // Boxed: inline, this branch's state would grow every connection task.
                Some(back) => Box::pin(conn.handle_with_body(handled, back, expect_continue)).await,
                None => conn.unless_client_leaves(handled).await,
            }
        };
        let Some(response) = answer else {
            tracing::debug!("client left before its answer; its request was dropped");
            return;
        };
        conn.take_back(back.as_deref());
        // A body left unread that cannot be discarded closes the connection: the answer says so.
        let keep_alive = keep_alive
            && !*conn.drain.borrow()
            && conn.unread_body.as_ref().is_none_or(Returned::discardable);
        let after = conn
            .write_response(
                response,
                &mut record,
                keep_alive,
                head_request,
                http10,
                upgrade_tx,
            )
            .await;
        let after = match after {
            Ok(After::Upgrade(tx, held)) => {
                if let Some(reader) = conn.reader.take() {
                    let early = reader.buf.freeze();
                    if let (Some(stream), Some(permit)) =
                        (reader.half.reunite(conn.writer), permit.take())
                    {
                        // The tunnel writes the record when it closes, with its whole time and
                        // the bytes it carried to the client, as nginx logs a WebSocket.
                        record.switched_protocols();
                        let _ = tx.send(Handover {
                            client: stream,
                            early,
                            permit,
                            record,
                            drain: conn.drain.clone(),
                            cut: gateway.cut.clone(),
                            held,
                        });
                    }
                }
                return;
            }
            Ok(after) => after,
            Err(err) => {
                tracing::debug!(%err, peer = %client.addr, "client connection broke while answering");
                // Logged with the answer's time, not the close's linger.
                drop(record);
                return conn.close().await;
            }
        };
        // The request is over: its last byte went out, or never will.
        drop(record);
        // An HTTP/2 instance's connection may finish reading the body while the answer streams;
        // an early answer leaves the rest of the body to discard.
        conn.take_back(back.as_deref());
        if let (After::KeepAlive, Some(unread)) = (&after, conn.unread_body.take()) {
            conn.reader = conn.discard(unread).await;
        }
        match (&after, &conn.reader) {
            (After::KeepAlive, Some(_)) => {}
            // Unread client bytes (a body not read to its end, pipelined requests after a
            // close): without lingering, closing would reset the connection under the answer.
            (_, None) => return conn.linger().await,
            (_, Some(reader)) if !reader.buf.is_empty() => return conn.linger().await,
            (_, Some(_)) => return conn.close().await,
        }
    }
}

enum NextHead {
    Request(RequestHead),
    /// The client closed, went quiet past a timeout, or the gateway drains.
    Closed,
    /// `header_read_timeout` ran out with part of a head read (slowloris): nginx's 408.
    TimedOut,
    /// A head the gateway refuses (400, 413, 414, 431, 505).
    Refused(HeadRefusal),
}

/// What happens to the connection after an answer.
enum After {
    KeepAlive,
    Close,
    /// The instance switched protocols: the connection goes to the tunnel, with what the
    /// answer's body held.
    Upgrade(oneshot::Sender<Handover>, GatewayBody),
}

struct ClientConn {
    /// `None` while a request body owns it.
    reader: Option<ConnReader>,
    /// A request body dropped before its end (the answer came first), to discard.
    unread_body: Option<Returned>,
    writer: ClientWrite,
    out: Vec<u8>,
    deadline: LazyDeadline,
    limits: ClientLimits,
    drain: watch::Receiver<bool>,
    /// Completes when the gateway drains. One waiter for the connection's life: waiting on
    /// `drain.changed()` afresh registered and removed a waiter at every idle wait.
    drained: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// `drained` completed: idle waits are cut to `DRAIN_LINGER`.
    draining: bool,
}

impl ClientConn {
    /// Takes the reader back from a request body that ended or was dropped.
    fn take_back(&mut self, back: Option<&BodyReturn>) {
        let Some(back) = back else {
            return;
        };
        let Some(mut returned) = back.reader.lock().expect("body return").take() else {
            return;
        };
        // Asked for, but the answer came before it could be written.
        returned.awaiting_continue |= back.continue_unsent.load(Ordering::Relaxed);
        if returned.left.is_done() {
            self.reader = Some(returned.reader);
        } else {
            self.unread_body = Some(returned);
        }
    }

    /// Reads and drops the rest of a request body the answer did not need, so the connection
    /// can carry the next request (nginx discards such bodies too). Gives up — the connection
    /// then closes — past `DISCARD_LIMIT` bytes, after `header_read_timeout`, or when the
    /// client still waits for a 100 Continue it never got.
    async fn discard(&mut self, unread: Returned) -> Option<ConnReader> {
        if !unread.discardable() {
            return None;
        }
        let Returned {
            mut reader,
            mut left,
            ..
        } = unread;
        let due = Instant::now() + self.limits.header_read_timeout;
        let mut budget = DISCARD_LIMIT;
        loop {
            let dropped = left.take(&mut reader.buf).ok()?;
            budget = budget.checked_sub(dropped.len())?;
            if left.is_done() {
                return Some(reader);
            }
            if dropped.is_empty() && !fill_before(&mut reader, &mut self.deadline, due).await {
                return None;
            }
        }
    }

    /// Reads until the next request head is complete.
    async fn next_head(&mut self, first: bool) -> NextHead {
        let Some(reader) = self.reader.as_mut() else {
            return NextHead::Closed;
        };
        // Back to the front of the buffer once the last request's bytes were released, so each
        // request reuses the same memory.
        if reader.buf.is_empty() {
            reader.buf.clear();
            reader.buf.reserve(READ_CHUNK);
        }
        let mut head_started = first.then(Instant::now);
        loop {
            if !reader.buf.is_empty() {
                match parse_head(&mut reader.buf, &self.limits) {
                    Ok(Some(head)) => {
                        return match check_buffered_chunks(&head, &reader.buf, &self.limits) {
                            Ok(()) => NextHead::Request(head),
                            Err(error) => {
                                let parts = &head.parts;
                                NextHead::Refused(HeadRefusal::of(
                                    error,
                                    &parts.method,
                                    &parts.headers,
                                ))
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(refusal) => return NextHead::Refused(*refusal),
                }
            }
            let idle = reader.buf.is_empty() && head_started.is_none();
            let due = match head_started {
                Some(started) => started + self.limits.header_read_timeout,
                None if idle && self.draining => {
                    Instant::now() + DRAIN_LINGER.min(self.limits.idle_timeout)
                }
                None if idle => Instant::now() + self.limits.idle_timeout,
                None => *head_started.insert(Instant::now()) + self.limits.header_read_timeout,
            };
            tokio::select! {
                biased;
                more = fill_before(reader, &mut self.deadline, due) => if !more {
                    let partial = !reader.buf.is_empty() && Instant::now() >= due;
                    return if partial { NextHead::TimedOut } else { NextHead::Closed };
                },
                () = &mut self.drained, if idle && !self.draining => self.draining = true,
            }
        }
    }

    /// Writes an answer; its body streams to the end before the next request is read.
    async fn write_response(
        &mut self,
        response: Response<GatewayBody>,
        record: &mut RequestRecord,
        mut keep_alive: bool,
        head_request: bool,
        http10: bool,
        upgrade: Option<oneshot::Sender<Handover>>,
    ) -> io::Result<After> {
        let (head, mut body) = response.into_parts();
        let status = head.status;
        // The client closed its connection inside its body: nobody reads an answer. (An
        // instance's own 499 is an answer like any other.)
        if head.extensions.get::<ClientLeft>().is_some() {
            return Ok(After::Close);
        }
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(tx) = upgrade {
                encode_head(&mut self.out, status, (&head.headers, None), None, false);
                self.flush().await?;
                return Ok(After::Upgrade(tx, body));
            }
        }
        let bodyless = head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let framing = if bodyless {
            let length = (head_request && !has(&head.headers, &header::CONTENT_LENGTH))
                .then(|| body.held_length())
                .flatten();
            AnswerFraming::Bodyless(length)
        } else if let Some(length) = body.size_hint().exact() {
            AnswerFraming::Length(length)
        } else if !http10 {
            AnswerFraming::Chunked
        } else {
            keep_alive = false;
            AnswerFraming::UntilClose
        };
        let keep_alive = encode_head(
            &mut self.out,
            status,
            (&head.headers, body.raw_fields()),
            Some((framing, keep_alive)),
            http10,
        );
        recycle_map(head.headers);
        if let AnswerFraming::Bodyless(_) = framing {
            self.flush().await?;
            return Ok(if keep_alive {
                After::KeepAlive
            } else {
                After::Close
            });
        }
        let chunked = framing == AnswerFraming::Chunked;
        // Body bytes in `out` not yet written: logged as sent once they are.
        let mut unsent = 0;
        loop {
            // With bytes waiting to go out, only take frames that are ready now; otherwise wait.
            let frame = if self.out.is_empty() {
                body.frame().await
            } else {
                match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)))
                    .await
                {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        self.flush_body(record, &mut unsent).await?;
                        continue;
                    }
                }
            };
            match frame {
                None => break,
                Some(Err(err)) => {
                    record.broke_off(&*err);
                    // Cut short: the client must not take a partial body for a whole one.
                    let _ = self.flush_body(record, &mut unsent).await;
                    return Err(io::Error::other(err));
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        chunk_header(&mut self.out, data.len());
                    }
                    if data.len() <= COALESCE {
                        self.out.extend_from_slice(&data);
                        unsent += data.len();
                    } else {
                        self.flush_body(record, &mut unsent).await?;
                        let mut written = 0;
                        let write = self.write_within_idle(&data, &mut written).await;
                        record.sent(written);
                        write?;
                    }
                    if chunked {
                        self.out.extend_from_slice(b"\r\n");
                    }
                    if self.out.len() > COALESCE {
                        self.flush_body(record, &mut unsent).await?;
                    }
                }
            }
        }
        if chunked {
            self.out.extend_from_slice(LAST_CHUNK);
        }
        self.flush_body(record, &mut unsent).await?;
        Ok(if keep_alive {
            After::KeepAlive
        } else {
            After::Close
        })
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let written = self.write_within_idle(&out, &mut 0).await;
        self.out = out;
        self.out.clear();
        written
    }

    /// [`Self::flush`], the `unsent` body bytes among what it wrote then counted as sent.
    async fn flush_body(
        &mut self,
        record: &mut RequestRecord,
        unsent: &mut usize,
    ) -> io::Result<()> {
        self.flush().await?;
        record.sent(std::mem::take(unsent));
        Ok(())
    }

    /// Writes all of `bytes`, counting in `written` what went out, giving up when the client
    /// takes none of them for `idle_timeout`
    /// (nginx's `send_timeout`): a client that stops reading must not hold the connection and
    /// the instance's answer forever.
    async fn write_within_idle(&mut self, bytes: &[u8], written: &mut usize) -> io::Result<()> {
        let writer = match &mut self.writer {
            ClientWrite::Tcp(writer) => writer,
            // TLS writes through the session, which does not say how much went out: each slice
            // (and the records it leaves buffered) must go out within the time, so a client
            // that reads slowly but steadily is not cut off in the middle of a large body.
            tls @ ClientWrite::Tls(_) => {
                for slice in bytes.chunks(TLS_SLICE) {
                    let due = Instant::now() + self.limits.idle_timeout;
                    let write = async {
                        tls.write_all(slice).await?;
                        tls.flush().await
                    };
                    tokio::select! {
                        biased;
                        done = write => done?,
                        () = self.deadline.wait(due) => return Err(client_stopped_reading()),
                    }
                    *written += slice.len();
                }
                return Ok(());
            }
        };
        let mut rest = bytes;
        while !rest.is_empty() {
            match writer.try_write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(wrote) => {
                    rest = &rest[wrote..];
                    *written += wrote;
                }
                // Only a blocked write starts the clock: most go out at once.
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    let due = Instant::now() + self.limits.idle_timeout;
                    tokio::select! {
                        biased;
                        ready = writer.writable() => ready?,
                        () = self.deadline.wait(due) => return Err(client_stopped_reading()),
                    }
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Waits for the answer to a request with a body. A client that expects 100 Continue gets it
    /// when the body first wants bytes, unless the answer came first: written here, on the
    /// writing side, for plain and TLS connections alike (a TLS session's reading half cannot
    /// write records), and never after the answer. Once the body has been read to its end, the
    /// client is watched as for a request without one.
    async fn handle_with_body<F: Future>(
        &mut self,
        handled: F,
        back: &BodyReturn,
        mut expect_continue: bool,
    ) -> Option<F::Output> {
        tokio::pin!(handled);
        loop {
            tokio::select! {
                biased;
                answer = &mut handled => return Some(answer),
                () = back.continue_wanted.notified(), if expect_continue => {
                    expect_continue = false;
                    // A client gone is the body's failure to report, not this write's.
                    let _ = self.write_within_idle(CONTINUE, &mut 0).await;
                    back.continue_unsent.store(false, Ordering::Relaxed);
                }
                () = back.returned.notified() => break,
            }
        }
        self.take_back(Some(back));
        self.unless_client_leaves(handled).await
    }

    /// Runs `handled` unless the client leaves first: a request (whose body, if any, was read)
    /// whose client closes or breaks the connection while it waits is dropped, which cancels it at the
    /// instance and frees its in-flight and queue places (nginx's default,
    /// `proxy_ignore_client_abort off`; HTTP/2 clients cancel by resetting the stream). Bytes
    /// pipelined meanwhile stay buffered for the next request; past a head's worth, the watch
    /// stops. Watching adds no wake-up: the socket is read when tokio reports it readable, at
    /// most once (an EAGAIN) before the answer when nothing more arrived.
    async fn unless_client_leaves<F: Future>(&mut self, handled: F) -> Option<F::Output> {
        let Some(reader) = self.reader.as_mut() else {
            return Some(handled.await);
        };
        let max_head = self.limits.max_head;
        let left = async {
            while reader.buf.len() <= max_head {
                match std::future::poll_fn(|cx| reader.poll_fill(cx)).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            std::future::pending().await
        };
        tokio::select! {
            biased;
            answer = handled => Some(answer),
            () = left => None,
        }
    }

    /// Closes after an answer while the client may still be sending (an unread body, a
    /// refused head): the write side is shut and what arrives is discarded for a moment, so
    /// the kernel does not reset the connection before the client read the answer.
    async fn linger(self) {
        let ClientConn {
            reader,
            unread_body,
            mut writer,
            ..
        } = self;
        if writer.shutdown().await.is_err() {
            return;
        }
        let reader = reader.or(unread_body.map(|unread| unread.reader));
        let until = Instant::now() + LINGER;
        // On the heap: a buffer here would grow every connection task's future.
        let mut scratch = vec![0u8; 4096];
        match (&writer, reader) {
            // The socket itself, whether or not a request body kept the reading half.
            (ClientWrite::Tcp(writer), _) => {
                let stream = writer.as_ref();
                while let Ok(Ok(())) = tokio::time::timeout_at(until, stream.readable()).await {
                    match stream.try_read(&mut scratch) {
                        Ok(0) => break,
                        Err(err) if err.kind() != io::ErrorKind::WouldBlock => break,
                        _ => {}
                    }
                }
            }
            (ClientWrite::Tls(_), Some(mut reader)) => {
                while let Ok(Ok(read)) =
                    tokio::time::timeout_at(until, reader.half.read(&mut scratch)).await
                {
                    if read == 0 {
                        break;
                    }
                }
            }
            (ClientWrite::Tls(_), None) => {}
        }
    }

    /// Closes with nothing left to read: over TLS the close_notify alert goes first, so the
    /// client can tell the end of an answer read to the close from a cut-off one.
    async fn close(mut self) {
        let _ = tokio::time::timeout(LINGER, self.writer.shutdown()).await;
    }
}

fn client_stopped_reading() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")
}

/// Reads more of the client's bytes; false when the client closed, the read failed or `due`
/// passed first.
async fn fill_before(reader: &mut ConnReader, deadline: &mut LazyDeadline, due: Instant) -> bool {
    let filled = std::future::poll_fn(|cx| reader.poll_fill(cx));
    tokio::select! {
        biased;
        filled = filled => matches!(filled, Ok(read) if read > 0),
        () = deadline.wait(due) => false,
    }
}

/// Completes once `drain` turns true (or its sender is gone), and never again: a connection
/// returns after it.
async fn drained(mut drain: watch::Receiver<bool>) {
    let _ = drain.wait_for(|draining| *draining).await;
}

/// How an answer's body is framed towards the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AnswerFraming {
    /// No body (HEAD, 1xx, 204, 304); a HEAD answer the gateway made gets its length.
    Bodyless(Option<u64>),
    Length(u64),
    Chunked,
    /// An HTTP/1.0 client and a body of unknown length: it ends with the connection.
    UntilClose,
}

/// One of the gateway's own answers, whole, for a connection it closes after writing it (a
/// refusal sent before any request was read). Written like every answer of this loop.
pub fn closing_answer_bytes(response: &Response<GatewayBody>) -> Vec<u8> {
    let body = match response.body() {
        GatewayBody::Full(Some(body)) => body.clone(),
        _ => Bytes::new(),
    };
    let mut out = Vec::with_capacity(256 + body.len());
    let framing = (AnswerFraming::Length(body.len() as u64), false);
    encode_head(
        &mut out,
        response.status(),
        (response.headers(), None),
        Some(framing),
        false,
    );
    out.extend_from_slice(&body);
    out
}

/// The status line and fields; with `framing`, the framing and connection fields the gateway
/// decides (the answer's own `Connection` and `Content-Length` are replaced). Returns whether
/// the connection stays open: a `Connection: close` in the answer (the gateway's refusals carry
/// one) closes it.
fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    (headers, raw): (&HeaderMap, Option<&RawFields>),
    framing: Option<(AnswerFraming, bool)>,
    http10: bool,
) -> bool {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // Answers to HEAD and 304s keep the instance's Content-Length (what a GET would carry); a
    // 1xx or 204 must not have one (RFC 9110 §8.6).
    let keeps_length = matches!(framing, Some((AnswerFraming::Bodyless(None), _)))
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT;
    let framed_here = |name: &header::HeaderName| {
        framing.is_some()
            && (name == header::CONNECTION || (name == header::CONTENT_LENGTH && !keeps_length))
    };
    let mut dated = false;
    let mut closes = false;
    for (name, value) in headers {
        if name == header::CONNECTION {
            closes |= has_token(value.as_bytes(), b"close");
        }
        if framed_here(name) {
            continue;
        }
        dated |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(raw) = raw {
        dated |= raw.has_date();
        raw.write(out);
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        http_date::write(out);
        out.extend_from_slice(b"\r\n");
    }
    let mut keep_alive = !closes;
    if let Some((framing, asked)) = framing {
        keep_alive &= asked;
        match framing {
            AnswerFraming::Length(length) | AnswerFraming::Bodyless(Some(length)) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            AnswerFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            AnswerFraming::Bodyless(None) | AnswerFraming::UntilClose => {}
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    keep_alive
}

/// The gateway's reading of a request head at the front of `bytes` and the head's length:
/// `Ok(None)` while it is incomplete, the refusal the client would get otherwise. For the
/// fuzzer.
pub fn read_request_head(
    bytes: &[u8],
    limits: &ClientLimits,
) -> Result<Option<(http::request::Parts, usize)>, ProxyError> {
    let mut buf = BytesMut::from(bytes);
    let head = parse_head(&mut buf, limits).map_err(|refusal| refusal.error)?;
    Ok(head.map(|head| (head.parts, bytes.len() - buf.len())))
}

/// A request line whose version httparse (HTTP/1.0 and 1.1 only) refused.
#[derive(Debug, PartialEq, Eq)]
enum UnparsedVersion {
    /// The line has not ended yet.
    Incomplete,
    /// `HTTP/1.x` with x above 1: the minor digit is at this index.
    LaterMinor(usize),
    /// `HTTP/2` and up: 505.
    OtherMajor,
    Malformed,
}

fn unparsed_version(buf: &[u8]) -> UnparsedVersion {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return UnparsedVersion::Incomplete;
    };
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(space) = line.iter().rposition(|&b| b == b' ') else {
        return UnparsedVersion::Malformed;
    };
    match &line[space + 1..] {
        // Above 1 only: httparse may have refused a 1.0 or 1.1 line for something else (two
        // spaces before the version), and rewriting its digit would change nothing.
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor] if (b'2'..=b'9').contains(minor) => {
            UnparsedVersion::LaterMinor(space + 8)
        }
        [b'H', b'T', b'T', b'P', b'/', major, rest @ ..]
            if (b'2'..=b'9').contains(major) && matches!(rest, [] | [b'.', b'0'..=b'9']) =>
        {
            UnparsedVersion::OtherMajor
        }
        _ => UnparsedVersion::Malformed,
    }
}

/// The part of a chunked body that came with its head, checked before the request goes
/// anywhere: broken framing gets 400 and chunk sizes that already add up past `max_body` 413,
/// and no instance sees the head of a request the gateway refuses. (Framing that breaks
/// later cuts the request off; nginx, which reads whole bodies first, never sends one.)
fn check_buffered_chunks(
    head: &RequestHead,
    buffered: &[u8],
    limits: &ClientLimits,
) -> Result<(), ProxyError> {
    if head.body != BodyKind::Chunked {
        return Ok(());
    }
    match crate::http1::declared_chunked_length(buffered) {
        Ok(declared) if declared > limits.max_body => Err(ProxyError::BodyTooLarge),
        Ok(_) => Ok(()),
        Err(_) => Err(ProxyError::BadRequest("malformed chunked body")),
    }
}

/// Parses a request head at the front of `buf`, taking it out of the buffer when complete.
fn parse_head(
    buf: &mut BytesMut,
    limits: &ClientLimits,
) -> Result<Option<RequestHead>, Box<HeadRefusal>> {
    // Uninitialised: parsing fills what it uses, and most heads have a handful of fields.
    let mut stack = [MaybeUninit::<httparse::Header<'_>>::uninit(); STACK_HEADERS];
    let mut heap = Vec::new();
    let fields = if limits.max_headers <= STACK_HEADERS {
        &mut stack[..limits.max_headers]
    } else {
        heap.resize(limits.max_headers, MaybeUninit::uninit());
        &mut heap[..]
    };
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, fields) {
        Ok(httparse::Status::Complete(len)) if len <= limits.max_head => len,
        Ok(httparse::Status::Complete(_)) => return Err(refused(buf, too_large(buf, limits))),
        Ok(httparse::Status::Partial) if buf.len() <= limits.max_head => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(refused(buf, too_large(buf, limits))),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refused(buf, ProxyError::HeadersTooLarge))
        }
        Err(httparse::Error::Version) => {
            return match unparsed_version(buf) {
                UnparsedVersion::Incomplete if buf.len() <= limits.max_head => Ok(None),
                UnparsedVersion::LaterMinor(at) => {
                    // Read as HTTP/1.1 (RFC 9110 §2.5); the instance gets the gateway's own
                    // request line in any case.
                    buf[at] = b'1';
                    parse_head(buf, limits)
                }
                UnparsedVersion::OtherMajor => Err(refused(buf, ProxyError::VersionNotSupported)),
                _ => Err(refused(
                    buf,
                    ProxyError::BadRequest("malformed request head"),
                )),
            };
        }
        Err(_) => {
            return Err(refused(
                buf,
                ProxyError::BadRequest("malformed request head"),
            ))
        }
    };
    let malformed = |_| ProxyError::BadRequest("malformed request head");
    let method = Method::from_bytes(request.method.unwrap_or_default().as_bytes())
        .map_err(|_| ProxyError::BadRequest("malformed request method"))?;
    let version = match request.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let target = request.path.unwrap_or_default();
    let target_start = (target.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    let target_end = target_start + target.len();
    let mut spans = FieldSpans::default();
    spans.record(request.headers, buf.as_ptr(), |name| {
        limits.underscores_in_headers || !name.contains('_')
    });
    let head = buf.split_to(len).freeze();
    // Room for X-Forwarded-For, -Proto, -Host and X-Request-ID.
    let mut headers = spans.to_map(&head, 4).map_err(malformed)?;
    let target = head.slice(target_start..target_end);
    let checked = match checked_head(&method, version, target, &mut headers) {
        Ok(checked) => checked,
        Err(error) => return Err(Box::new(HeadRefusal::of(error, &method, &headers))),
    };
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = checked.uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(RequestHead {
        parts,
        body: checked.body,
        keep_alive: checked.keep_alive,
        expect_continue: checked.expect_continue,
    }))
}

/// What the checks on a head's target and fields found.
struct CheckedHead {
    uri: Uri,
    body: BodyKind,
    keep_alive: bool,
    expect_continue: bool,
}

/// A refused request head, with the client's request ID when the head got as far as its
/// fields.
#[derive(Debug)]
struct HeadRefusal {
    error: ProxyError,
    request_id: Option<HeaderValue>,
    /// Refused HEAD: answered without the body (RFC 9110 §9.3.2).
    head_request: bool,
}

impl HeadRefusal {
    /// The refusal of a head with this method and fields: the client's own request ID, if sane,
    /// goes on the answer and its log line.
    fn of(error: ProxyError, method: &Method, headers: &HeaderMap) -> HeadRefusal {
        HeadRefusal {
            error,
            request_id: client_request_id(headers).cloned(),
            head_request: method == Method::HEAD,
        }
    }
}

// Boxed: refusals are rare, and a large error would widen every parse's result.
impl From<ProxyError> for Box<HeadRefusal> {
    fn from(error: ProxyError) -> Box<HeadRefusal> {
        Box::new(HeadRefusal {
            error,
            request_id: None,
            head_request: false,
        })
    }
}

/// The refusal of a head refused before its method was read: answered as a HEAD's (no body)
/// when it starts as one, after the empty lines a request may follow (RFC 9112 §2.2). Looked
/// at only then, not for every head.
fn refused(buf: &[u8], error: ProxyError) -> Box<HeadRefusal> {
    let head_request = buf
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .is_some_and(|start| buf[start..].starts_with(b"HEAD "));
    Box::new(HeadRefusal {
        error,
        request_id: None,
        head_request,
    })
}

/// The checks on a head whose fields were read: its target, its framing, its connection
/// options.
fn checked_head(
    method: &Method,
    version: Version,
    target: Bytes,
    headers: &mut HeaderMap,
) -> Result<CheckedHead, ProxyError> {
    // A target is ASCII (RFC 3986); the parser below lets UTF-8 through, which the HTTP/2
    // listener refuses (`http2_malformation`): both refuse it.
    if !target.is_ascii() {
        return Err(ProxyError::BadRequest("the path is not ASCII"));
    }
    let uri = Uri::from_maybe_shared(target)
        .map_err(|_| ProxyError::BadRequest("malformed request target"))?;
    // Origin-form or absolute-form (RFC 9112 §3.2); authority-form is CONNECT's alone (which
    // gets 405) and `*` OPTIONS' alone.
    let target_form_fits = uri.path().starts_with('/')
        || uri.scheme().is_some()
        || method == Method::CONNECT
        || (method == Method::OPTIONS && uri == "*");
    if !target_form_fits {
        return Err(ProxyError::BadRequest(
            "the request target is neither a path nor an absolute URI",
        ));
    }
    let uri = with_root_path(uri);

    let declared = check_framing(headers).map_err(|err| ProxyError::BadRequest(err.reason()))?;
    let chunked = has(headers, &header::TRANSFER_ENCODING);
    if chunked && version == Version::HTTP_10 {
        return Err(ProxyError::BadRequest(
            "Transfer-Encoding in an HTTP/1.0 request",
        ));
    }
    let body = match declared {
        _ if chunked => BodyKind::Chunked,
        Some(0) | None => BodyKind::None,
        Some(length) => BodyKind::Length(length),
    };
    let mut connection = ConnectionOptions::default();
    for value in values(headers, &header::CONNECTION) {
        connection.read(value.as_bytes());
    }
    let keep_alive = connection.keep_alive(version == Version::HTTP_11);
    // 100-continue means nothing to an HTTP/1.0 client (RFC 9110 §10.1.1).
    let expect_continue = version == Version::HTTP_11
        && body != BodyKind::None
        && value(headers, &header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    Ok(CheckedHead {
        uri,
        body,
        keep_alive,
        expect_continue,
    })
}

/// An absolute-form target with an empty path (`http://a?x=1`) given the path `/`, which its
/// origin form must have (RFC 9112 §3.2.1): sent as it is, an instance would get `GET ?x=1`.
fn with_root_path(uri: Uri) -> Uri {
    let Some(pq) = uri
        .path_and_query()
        .filter(|pq| pq.as_str().starts_with('?'))
    else {
        return uri;
    };
    let Ok(rooted) = format!("/{}", pq.as_str()).parse() else {
        return uri;
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(rooted);
    Uri::from_parts(parts).unwrap_or(uri)
}

/// A head over `max_header_size`: 414 when its target (what `max_uri_length` bounds; the whole
/// line when it has no space) is over `max_uri_length`.
fn too_large(buf: &[u8], limits: &ClientLimits) -> ProxyError {
    let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let line = &buf[..line_end];
    let target = line.splitn(3, |&b| b == b' ').nth(1).unwrap_or(line);
    if target.len() > limits.max_uri {
        ProxyError::UriTooLong
    } else {
        ProxyError::HeadersTooLarge
    }
}

/// Where the connection's reader goes back when a request body ended or was dropped, and the
/// body's ask for a 100 Continue. The body may be read on another thread (by an HTTP/2
/// instance connection's task), so both go through the connection task.
#[derive(Default)]
struct BodyReturn {
    reader: Mutex<Option<Returned>>,
    /// The body wants its first bytes: the connection writes the 100 Continue.
    continue_wanted: Notify,
    /// Asked for and not written (the answer came first): the client may still be waiting.
    continue_unsent: AtomicBool,
    /// The body gave the reader back.
    returned: Notify,
}

/// The connection's reader as a request body gave it back, with what was left of the body.
struct Returned {
    reader: ConnReader,
    left: BodyProgress,
    /// The client was told to wait for a 100 Continue that was never sent.
    awaiting_continue: bool,
}

impl Returned {
    /// Whether the rest of the body may be read and dropped to keep the connection: not when
    /// the client waits for a 100 Continue (it may never send the body) unless the body came
    /// whole all the same, nor past `DISCARD_LIMIT` bytes it announced, nor when it announced
    /// no length (chunked) and its end is not here yet: how much more comes is not known, and
    /// a discard that gave up past the limit closed a connection its answer had kept alive.
    fn discardable(&self) -> bool {
        match self.left.exact_left() {
            Some(left) => {
                let all_here = left <= self.reader.buf.len() as u64;
                (!self.awaiting_continue || all_here) && left <= DISCARD_LIMIT as u64
            }
            None => self.ends_in_buffer(),
        }
    }

    /// Whether what is buffered holds the rest of the body, its end included (read on a copy).
    fn ends_in_buffer(&self) -> bool {
        let mut left = self.left;
        let mut buf = self.reader.buf.clone();
        loop {
            match left.take(&mut buf) {
                Ok(_) if left.is_done() => return true,
                Ok(data) if !data.is_empty() => {}
                Ok(_) | Err(_) => return false,
            }
        }
    }
}

/// A request body read from the client connection by its framing. At its end the connection's
/// reader (with any pipelined bytes after the body) goes back for the next request.
pub struct RequestBody {
    reader: Option<ConnReader>,
    progress: BodyProgress,
    back: Arc<BodyReturn>,
    send_continue: bool,
}

impl RequestBody {
    /// The next data out of what is buffered (empty when more bytes are needed); at the body's
    /// end the reader goes back to the connection.
    fn take_buffered(&mut self) -> Result<Bytes, crate::http1::ParseError> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(Bytes::new());
        };
        let data = self.progress.take(&mut reader.buf)?;
        if self.progress.is_done() {
            self.give_back();
        }
        Ok(data)
    }

    /// Hands the reader back to the connection with what is left of the body.
    fn give_back(&mut self) {
        if let Some(reader) = self.reader.take() {
            *self.back.reader.lock().expect("body return") = Some(Returned {
                reader,
                left: self.progress,
                awaiting_continue: self.send_continue,
            });
            self.back.returned.notify_one();
        }
    }

    /// The body broke: the connection cannot be read for another request.
    fn fail(&mut self, error: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.progress = BodyProgress::Done;
        self.reader = None;
        Poll::Ready(Some(Err(error.into())))
    }
}

impl Drop for RequestBody {
    /// Dropped before its end (an early answer): the connection may discard the rest.
    fn drop(&mut self) {
        self.give_back();
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let data = match this.take_buffered() {
                Ok(data) => data,
                Err(err) => return this.fail(err),
            };
            if !data.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            let Some(reader) = this.reader.as_mut() else {
                return Poll::Ready(None);
            };
            if std::mem::take(&mut this.send_continue) && reader.buf.is_empty() {
                this.back.continue_unsent.store(true, Ordering::Relaxed);
                this.back.continue_wanted.notify_one();
            }
            match ready!(reader.poll_fill(cx)) {
                Ok(0) => return this.fail(ClientLeft),
                Ok(_) => {}
                Err(err) => return this.fail(err),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.progress.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.progress.exact_left().map_or_else(
            || {
                // A chunk's declared size: `ForwardBody` counts it against `max_body` as soon
                // as its size line is read.
                let mut hint = SizeHint::default();
                hint.set_lower(self.progress.least_left());
                hint
            },
            SizeHint::with_exact,
        )
    }
}

/// The `Date` field's value, rendered once per second per thread.
mod http_date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static RENDERED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    pub fn write(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        RENDERED.with_borrow_mut(|(at, text)| {
            if *at != second {
                *at = second;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ClientLimits = ClientLimits {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_head: 256,
        max_headers: 8,
        max_uri: 64,
        underscores_in_headers: false,
        max_body: 100,
    };

    fn parsed(text: &[u8]) -> Result<Option<RequestHead>, ProxyError> {
        let mut buf = BytesMut::from(text);
        parse_head(&mut buf, &LIMITS).map_err(|refusal| refusal.error)
    }

    fn head(text: &[u8]) -> RequestHead {
        parsed(text).unwrap().expect("a complete head")
    }

    #[test]
    fn an_absolute_target_with_an_empty_path_gets_the_root_path() {
        // What goes to the instance: the path and query as they are held.
        let sent = |target: &'static str| {
            let uri = with_root_path(Uri::from_static(target));
            (
                uri.authority().map(ToString::to_string),
                uri.path_and_query().unwrap().as_str().to_owned(),
            )
        };
        let authority = Some("a.example".to_owned());
        assert_eq!(
            sent("http://a.example?x=1"),
            (authority.clone(), "/?x=1".into())
        );
        assert_eq!(sent("http://a.example/p?x=1"), (authority, "/p?x=1".into()));
        assert_eq!(sent("/p?x=1"), (None, "/p?x=1".into()));
    }

    #[test]
    fn later_versions_and_target_forms() {
        // A later HTTP/1 minor version is read as 1.1 (RFC 9110 §2.5); HTTP/2 and up get 505.
        let later = head(b"GET / HTTP/1.2\r\nHost: x\r\n\r\n");
        assert_eq!(later.parts.version, Version::HTTP_11);
        for other in [&b"GET / HTTP/2.0\r\n\r\n"[..], b"GET / HTTP/3\r\n\r\n"] {
            assert!(matches!(
                parsed(other),
                Err(ProxyError::VersionNotSupported)
            ));
        }
        assert!(matches!(parsed(b"GET / HTTP/1.2"), Ok(None)));
        for malformed in [
            &b"GET / HTTX/1.1\r\n\r\n"[..],
            b"GET /  HTTP/1.1\r\n\r\n",
            b"GET /  HTTP/1.2\r\n\r\n",
        ] {
            assert!(matches!(parsed(malformed), Err(ProxyError::BadRequest(_))));
        }
        // Authority-form is CONNECT's and `*` OPTIONS' (RFC 9112 §3.2).
        for refused in [
            &b"GET other.example:80 HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET foo HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert!(matches!(parsed(refused), Err(ProxyError::BadRequest(_))));
        }
        head(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n");
        head(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n");
        head(b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n");
    }

    #[test]
    fn heads_become_requests_with_their_framing_and_connection_rules() {
        let get = head(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n");
        assert_eq!(get.parts.method, Method::GET);
        assert_eq!(get.parts.uri, "/a?b=c");
        assert_eq!(get.parts.headers.get_all("x-a").iter().count(), 2);
        assert!(get.keep_alive && get.body == BodyKind::None && !get.expect_continue);

        let post = head(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
        assert!(post.body == BodyKind::Length(5) && post.expect_continue);
        let chunked = head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(chunked.body == BodyKind::Chunked);
        let empty = head(b"POST / HTTP/1.1\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n");
        assert!(empty.body == BodyKind::None && !empty.expect_continue);

        assert!(!head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        let old = head(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!old.keep_alive && old.parts.version == Version::HTTP_10);
        assert!(head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        // 100-continue is an HTTP/1.1 mechanism.
        let old_expect =
            head(b"PUT / HTTP/1.0\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n");
        assert!(!old_expect.expect_continue);
        // Underscored names are left out (nginx's default), framing ones included.
        let underscored =
            head(b"POST / HTTP/1.1\r\nX_Real_IP: 1.2.3.4\r\nTransfer_Encoding: chunked\r\n\r\n");
        assert_eq!(underscored.parts.headers.len(), 0);
        assert!(underscored.body == BodyKind::None);
    }

    #[test]
    fn a_head_is_taken_off_the_buffer_and_the_rest_stays() {
        let mut buf = BytesMut::from(&b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n"[..]);
        let first = parse_head(&mut buf, &LIMITS).unwrap().unwrap();
        assert_eq!(first.parts.uri, "/1");
        assert_eq!(&buf[..], b"GET /2 HTTP/1.1\r\n");
        assert!(parse_head(&mut buf, &LIMITS).unwrap().is_none());
    }

    #[test]
    fn ambiguous_or_oversized_heads_are_refused_with_their_status() {
        let refused = |text: &[u8]| parsed(text).err().map(|e| e.status().as_u16());
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Some(400)
        );
        assert_eq!(
            refused(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(400)
        );
        assert_eq!(refused(b"GET\r\n\r\n"), Some(400));
        assert_eq!(refused(b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n"), Some(400));
        let many: Vec<u8> = [&b"GET / HTTP/1.1\r\n"[..], &b"A: 1\r\n".repeat(9), b"\r\n"].concat();
        assert_eq!(refused(&many), Some(431));
        let big: Vec<u8> = [&b"GET / HTTP/1.1\r\nA: "[..], &[b'a'; 300], b"\r\n"].concat();
        assert_eq!(refused(&big), Some(431));
        let long: Vec<u8> = [&b"GET /"[..], &[b'a'; 300]].concat();
        assert_eq!(refused(&long), Some(414));
        // Partial and within the limits: wait for more.
        assert!(parsed(b"GET / HTTP/1.1\r\nHost:").unwrap().is_none());
    }

    fn encoded(
        status: u16,
        headers: &[(&str, &str)],
        framing: AnswerFraming,
        keep: bool,
        http10: bool,
    ) -> String {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map.insert(header::DATE, "d".parse().unwrap());
        let mut out = Vec::new();
        let status = StatusCode::from_u16(status).unwrap();
        encode_head(
            &mut out,
            status,
            (&map, None),
            Some((framing, keep)),
            http10,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn answers_are_framed_by_the_gateway() {
        assert_eq!(
            encoded(
                200,
                &[("content-length", "9"), ("connection", "x")],
                AnswerFraming::Length(2),
                true,
                false
            ),
            "HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 2\r\n\r\n"
        );
        assert_eq!(
            encoded(200, &[], AnswerFraming::Chunked, false, false),
            "HTTP/1.1 200 OK\r\ndate: d\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        // The gateway's refusals carry their own `Connection: close`.
        assert_eq!(
            encoded(
                400,
                &[("connection", "close")],
                AnswerFraming::Length(0),
                true,
                false
            ),
            "HTTP/1.1 400 Bad Request\r\ndate: d\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        // A HEAD answer keeps the instance's length; one the gateway made gets its own.
        assert_eq!(
            encoded(
                200,
                &[("content-length", "9")],
                AnswerFraming::Bodyless(None),
                true,
                false
            ),
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\ndate: d\r\n\r\n"
        );
        assert_eq!(
            encoded(404, &[], AnswerFraming::Bodyless(Some(7)), true, true),
            "HTTP/1.1 404 Not Found\r\ndate: d\r\ncontent-length: 7\r\nconnection: keep-alive\r\n\r\n"
        );
        assert_eq!(
            encoded(200, &[], AnswerFraming::UntilClose, false, true),
            "HTTP/1.1 200 OK\r\ndate: d\r\nconnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_head(
            &mut out,
            StatusCode::CREATED,
            (&HeaderMap::new(), None),
            None,
            false,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 201 Created\r\ndate: "), "{text}");
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
    }
}
