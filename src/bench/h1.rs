//! The load generator's HTTP/1.1 exchange: a request serialized once and written as is, the
//! answer's head parsed with `httparse` and its body skipped by its framing (length, chunked
//! or until close). hyper's client spends several times more CPU per request on channels,
//! header maps and task hand-offs than this, which a load generator cannot afford: its own
//! cost caps what it can measure. HTTP/2 goes through hyper.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::report::ErrorKind;
use super::runner::ByteCounts;

/// Most header lines an answer may have.
const MAX_HEADERS: usize = 64;
/// Largest answer head accepted.
const MAX_HEAD: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;

/// How an answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// The server closes the connection after the body.
    UntilClose,
}

/// A parsed answer head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// Bytes the head took.
    pub len: usize,
    pub framing: Framing,
    pub keep_alive: bool,
}

/// Parses an answer head at the start of `buf`: `Ok(None)` until it is complete.
/// `head_request` answers carry no body whatever their headers say.
pub fn parse_head(buf: &[u8], head_request: bool) -> Result<Option<Head>, ErrorKind> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        _ => return Err(ErrorKind::Other),
    };
    let status = response.code.unwrap_or(0);
    let mut keep_alive = response.version == Some(1);
    let mut length = None;
    let mut chunked = false;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value).map_err(|_| ErrorKind::Other)?;
            length = Some(value.trim().parse::<u64>().map_err(|_| ErrorKind::Other)?);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = ends_with_token(header.value, b"chunked");
        } else if header.name.eq_ignore_ascii_case("connection") {
            if has_token(header.value, b"close") {
                keep_alive = false;
            } else if has_token(header.value, b"keep-alive") {
                keep_alive = true;
            }
        }
    }
    let framing = if head_request || status / 100 == 1 || status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    Ok(Some(Head {
        status,
        len,
        framing,
        keep_alive,
    }))
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

fn ends_with_token(value: &[u8], token: &[u8]) -> bool {
    tokens(value)
        .last()
        .is_some_and(|t| t.eq_ignore_ascii_case(token))
}

/// Where a chunked body stands while it is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes plus its CRLF are left.
    Data(u64),
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

impl Chunked {
    /// Consumes what it can from the front of `buf`; returns the bytes used. Stops when done or
    /// when `buf` ends in the middle of a line.
    pub fn skip(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        let mut used = 0;
        loop {
            let rest = &buf[used..];
            match *self {
                Chunked::Done => return Ok(used),
                Chunked::Data(left) => {
                    let take = left.min(rest.len() as u64);
                    used += take as usize;
                    *self = if take == left {
                        Chunked::Size
                    } else {
                        Chunked::Data(left - take)
                    };
                    if take < left {
                        return Ok(used);
                    }
                }
                Chunked::Size | Chunked::Trailers => {
                    let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                        return if rest.len() > MAX_HEAD {
                            Err(ErrorKind::Other)
                        } else {
                            Ok(used)
                        };
                    };
                    let line = &rest[..end];
                    used += end + 2;
                    *self = match *self {
                        Chunked::Trailers if line.is_empty() => Chunked::Done,
                        Chunked::Trailers => Chunked::Trailers,
                        _ => match chunk_size(line)? {
                            0 => Chunked::Trailers,
                            size => Chunked::Data(size + 2),
                        },
                    };
                }
            }
        }
    }
}

fn chunk_size(line: &[u8]) -> Result<u64, ErrorKind> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let text = std::str::from_utf8(digits).map_err(|_| ErrorKind::Other)?;
    u64::from_str_radix(text, 16).map_err(|_| ErrorKind::Other)
}

/// Why an exchange got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection was closed before any byte of the answer: on a reused connection the
    /// server had given up on it, so the request may be sent again on a new one.
    Closed,
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
        self.buf.clear();
        // A write refused by a closed connection never reached the server: like an idle
        // connection closed under us, it may be sent again on a new one.
        self.stream
            .write_all(request)
            .await
            .map_err(|err| match io_failure(err) {
                Failure::Error(ErrorKind::Reset) => Failure::Closed,
                other => other,
            })?;
        self.counts.add_written(request.len());
        let head = loop {
            if let Some(head) = parse_head(&self.buf, head_request).map_err(Failure::Error)? {
                if head.status / 100 == 1 && head.status != 101 {
                    // An interim answer (100 Continue, 103 Early Hints): the real one follows.
                    self.buf.advance(head.len);
                    continue;
                }
                break head;
            }
            if self.fill().await? == 0 {
                return Err(if self.buf.is_empty() {
                    Failure::Closed
                } else {
                    Failure::Error(ErrorKind::Reset)
                });
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
                    let used = chunked.skip(&self.buf).map_err(Failure::Error)?;
                    self.buf.advance(used);
                    if chunked == Chunked::Done {
                        break;
                    }
                    if self.fill().await? == 0 {
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
        Ok(Answer {
            status: head.status,
            keep_alive: head.keep_alive,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_with_their_framing() {
        let head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false)
            .unwrap()
            .unwrap();
        assert_eq!(
            head,
            Head {
                status: 200,
                len: 38,
                framing: Framing::Length(2),
                keep_alive: true
            }
        );
        let chunked =
            b"HTTP/1.1 503 x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n";
        let head = parse_head(chunked, false).unwrap().unwrap();
        assert_eq!(
            (head.status, head.framing, head.keep_alive),
            (503, Framing::Chunked, false)
        );
        let old = parse_head(b"HTTP/1.0 200 OK\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!((old.framing, old.keep_alive), (Framing::UntilClose, false));
        let kept = parse_head(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(kept.unwrap().unwrap().keep_alive);
    }

    #[test]
    fn some_answers_have_no_body() {
        let with_length = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n";
        assert_eq!(
            parse_head(with_length, true).unwrap().unwrap().framing,
            Framing::Length(0)
        );
        for status in ["204", "304", "100"] {
            let text = format!("HTTP/1.1 {status} x\r\nContent-Length: 5\r\n\r\n");
            let head = parse_head(text.as_bytes(), false).unwrap().unwrap();
            assert_eq!(head.framing, Framing::Length(0), "{status}");
        }
    }

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

    #[test]
    fn chunked_bodies_are_skipped_across_reads() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for split in 0..body.len() - 4 {
            let mut state = Chunked::Size;
            let mut buf = body[..split].to_vec();
            let used = state.skip(&buf).unwrap();
            buf.drain(..used);
            buf.extend_from_slice(&body[split..]);
            let used = state.skip(&buf).unwrap();
            assert_eq!(state, Chunked::Done, "split at {split}");
            assert_eq!(&buf[used..], b"NEXT", "split at {split}");
        }
        let mut state = Chunked::Size;
        assert_eq!(state.skip(b"zz\r\n"), Err(ErrorKind::Other));
    }
}
