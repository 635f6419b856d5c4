//! The load generator's HTTP/1.1 exchange: a request serialized once and written as is, the
//! answer's head parsed with `httparse` and its body skipped by its framing (length, chunked
//! or until close). hyper's client spends several times more CPU per request on channels,
//! header maps and task hand-offs than this, which a load generator cannot afford: its own
//! cost caps what it can measure. HTTP/2 goes through hyper.

use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use futures_util::FutureExt as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use super::report::ErrorKind;
use super::runner::ByteCounts;
use crate::http1::{parse_response, response_framing, Chunked, Codings, Framing, MAX_HEAD};

/// Most header lines an answer may have (hyper's client allows 100).
const MAX_HEADERS: usize = 128;
const READ_CHUNK: usize = 16 * 1024;
/// Requests longer than this are written while the answer is watched for.
const WATCHED_WRITE: usize = 64 * 1024;

/// A parsed answer head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// Bytes the head took.
    pub len: usize,
    pub framing: Framing,
    pub keep_alive: bool,
}

impl Head {
    /// An interim answer (100 Continue, 103 Early Hints): the real one follows.
    fn is_interim(&self) -> bool {
        self.status / 100 == 1 && self.status != 101
    }
}

/// Parses an answer head at the start of `buf`: `Ok(None)` until it is complete.
/// `head_request` answers carry no body whatever their headers say.
pub fn parse_head(buf: &[u8], head_request: bool) -> Result<Option<Head>, ErrorKind> {
    let mut fields = [MaybeUninit::uninit(); MAX_HEADERS];
    let (response, parsed) = parse_response(buf, &mut fields);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        _ => return Err(ErrorKind::Other),
    };
    let status = response.code.unwrap_or(0);
    let body = response_framing(
        status,
        response.version.unwrap_or(0),
        response.headers,
        head_request,
        Codings::Any,
    )
    .map_err(|_| ErrorKind::Other)?;
    Ok(Some(Head {
        status,
        len,
        framing: body.framing,
        keep_alive: body.keep_alive,
    }))
}

/// Why an exchange got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request could not be written: the server had closed the connection before it, so
    /// it never got the request, which may go again on a new connection.
    Unsent,
    Error(ErrorKind),
}

/// An answer that was read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub keep_alive: bool,
}

/// One HTTP/1.1 client connection.
pub struct Http1 {
    stream: TcpStream,
    buf: BytesMut,
    counts: Arc<ByteCounts>,
}

impl Http1 {
    pub fn new(stream: TcpStream, counts: Arc<ByteCounts>) -> Http1 {
        Http1 {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            counts,
        }
    }

    /// Writes `request` and reads the whole answer.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        head_request: bool,
    ) -> Result<Answer, Failure> {
        // A connection the server closed while it was idle (its keep-alive timeout) would take
        // the request and lose it: the close is already known here when it came while the
        // generator waited, so the request goes on a new connection instead.
        if self.read_closed() {
            return Err(Failure::Unsent);
        }
        // A large request (a body being uploaded) is written while the answer is watched for: a
        // server may answer early (413, 401) and close without reading the rest (RFC 9112
        // §9.5), and that answer is the request's result.
        let cut_short = if request.len() <= WATCHED_WRITE {
            self.stream.write_all(request).await.map_err(refused)?;
            self.counts.add_written(request.len());
            false
        } else {
            self.write_watching(request, head_request).await?
        };
        let head = loop {
            if let Some(head) = parse_head(&self.buf, head_request).map_err(Failure::Error)? {
                if head.is_interim() {
                    self.buf.advance(head.len);
                    continue;
                }
                break head;
            }
            // Closed after the request went out: the server may have acted on it, so it counts
            // as failed and is never sent twice (wrk counts such reads as errors too).
            if self.fill().await? == 0 {
                return Err(Failure::Error(ErrorKind::Reset));
            }
        };
        self.buf.advance(head.len);
        match head.framing {
            Framing::Length(mut left) => loop {
                let take = left.min(self.buf.len() as u64);
                self.buf.advance(take as usize);
                left -= take;
                if left == 0 {
                    break;
                }
                if self.fill().await? == 0 {
                    return Err(Failure::Error(ErrorKind::Reset));
                }
            },
            Framing::Chunked => {
                let mut chunked = Chunked::Size;
                loop {
                    let step = chunked
                        .decode(&self.buf)
                        .map_err(|_| Failure::Error(ErrorKind::Other))?;
                    self.buf.advance(step.used);
                    if chunked == Chunked::Done {
                        break;
                    }
                    if step.used == 0 && self.fill().await? == 0 {
                        return Err(Failure::Error(ErrorKind::Reset));
                    }
                }
            }
            Framing::UntilClose => loop {
                self.buf.clear();
                if self.fill().await? == 0 {
                    break;
                }
            },
        }
        // Bytes after the answer that no request asked for: the server's framing is broken,
        // and whatever reads this connection next would take them for the next answer.
        if !self.buf.is_empty() {
            return Err(Failure::Error(ErrorKind::Other));
        }
        Ok(Answer {
            status: head.status,
            // The rest of a request cut short would be read as the next one.
            keep_alive: head.keep_alive && !cut_short,
        })
    }

    /// Writes `request` while reading what the server sends; true when it answered (or
    /// closed) before the whole request was written, which then stops.
    async fn write_watching(
        &mut self,
        request: &[u8],
        head_request: bool,
    ) -> Result<bool, Failure> {
        let Http1 {
            stream,
            buf,
            counts,
        } = self;
        let (mut reader, mut writer) = stream.split();
        let mut written = 0;
        while written < request.len() {
            tokio::select! {
                read = reader.read_buf(buf) => {
                    let n = read.map_err(io_failure)?;
                    counts.add_read(n);
                    if n == 0 {
                        return Ok(true);
                    }
                    // An interim answer asks for the rest of the body (100 Continue) or
                    // announces the answer: the upload goes on.
                    while let Some(head) = parse_head(buf, head_request).map_err(Failure::Error)? {
                        if !head.is_interim() {
                            return Ok(true);
                        }
                        buf.advance(head.len);
                    }
                }
                wrote = writer.write(&request[written..]) => match wrote {
                    Ok(n) => {
                        written += n;
                        counts.add_written(n);
                    }
                    Err(err) if written == 0 => return Err(refused(err)),
                    // The server stopped reading: its answer may be here already.
                    Err(_) if !buf.is_empty() => return Ok(true),
                    Err(err) => return Err(io_failure(err)),
                },
            }
        }
        Ok(false)
    }

    /// Whether the peer's close has been seen by the runtime, without a system call: tokio
    /// keeps the readiness epoll reported.
    fn read_closed(&self) -> bool {
        self.stream
            .ready(Interest::READABLE)
            .now_or_never()
            .and_then(Result::ok)
            .is_some_and(|ready| ready.is_read_closed())
    }

    /// Reads what is there into the buffer; 0 at end of stream.
    async fn fill(&mut self) -> Result<usize, Failure> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(io_failure)?;
        self.counts.add_read(n);
        Ok(n)
    }
}

fn io_failure(err: io::Error) -> Failure {
    Failure::Error(super::runner::classify(&err))
}

/// A write refused before any byte of the request went: a connection the server had closed
/// never got it.
fn refused(err: io::Error) -> Failure {
    match io_failure(err) {
        Failure::Error(ErrorKind::Reset) => Failure::Unsent,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_and_broken_heads() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Le", false),
            Ok(None)
        );
        assert_eq!(parse_head(b"", false), Ok(None));
        assert_eq!(
            parse_head(b"NOT HTTP\r\n\r\n", false),
            Err(ErrorKind::Other)
        );
        let bad_length = b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n";
        assert_eq!(parse_head(bad_length, false), Err(ErrorKind::Other));
        let huge = vec![b'a'; MAX_HEAD + 1];
        assert_eq!(parse_head(&huge, false), Err(ErrorKind::Other));
    }
}
