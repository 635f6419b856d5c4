//! HTTP/1.1 message framing (RFC 9112 §6): how an answer's body ends, whether its connection
//! can carry another request, the chunked decoder, and parsed heads as header maps. Pure
//! functions over bytes, shared by the proxy's client and instance connections and the load
//! generator, which all parse with `httparse` instead of going through hyper.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

/// Largest answer head (and chunk-size or trailer line) accepted.
pub const MAX_HEAD: usize = 64 * 1024;

/// Why an answer cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("malformed response head")]
    Head,
    #[error("response head larger than 64 KiB")]
    HeadTooLarge,
    #[error("invalid or conflicting Content-Length")]
    Length,
    #[error("malformed chunked body")]
    Chunk,
    #[error("Transfer-Encoding other than one chunked")]
    Coding,
}

/// How an answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// The server closes the connection after the body.
    UntilClose,
}

/// The framing of an answer and whether its connection may be reused afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyFraming {
    pub framing: Framing,
    pub keep_alive: bool,
    /// A `Connection` field names fields besides its options (`close`, `keep-alive`): those
    /// are hop-by-hop too. Found in the same pass over the fields, which a proxy needs anyway.
    pub names_fields: bool,
    /// The one length every Content-Length value gave (`5, 5` or two fields of 5 are 5), also
    /// where it frames no body (HEAD, 204, 304): what goes on as one field.
    pub content_length: Option<u64>,
}

/// The fields the gateway reads or drops, told apart by a field name's length and at most two
/// comparisons: every head's every field goes through here, several times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    ContentLength,
    TransferEncoding,
    Connection,
    /// Another hop-by-hop field (RFC 9110 §7.6.1, and Proxy-Authorization and Expect, which
    /// only the next hop reads).
    HopByHop,
    RequestId,
    Date,
    Other,
}

impl FieldKind {
    pub fn of(name: &str) -> FieldKind {
        let is = |known: &str| is_named(name.as_bytes(), known.as_bytes());
        match name.len() {
            2 if is("te") => FieldKind::HopByHop,
            4 if is("date") => FieldKind::Date,
            6 if is("expect") => FieldKind::HopByHop,
            7 if is("trailer") || is("upgrade") => FieldKind::HopByHop,
            10 if is("connection") => FieldKind::Connection,
            10 if is("keep-alive") => FieldKind::HopByHop,
            12 if is("x-request-id") => FieldKind::RequestId,
            14 if is("content-length") => FieldKind::ContentLength,
            16 if is("proxy-connection") => FieldKind::HopByHop,
            17 if is("transfer-encoding") => FieldKind::TransferEncoding,
            19 if is("proxy-authorization") => FieldKind::HopByHop,
            _ => FieldKind::Other,
        }
    }

    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            FieldKind::Connection | FieldKind::TransferEncoding | FieldKind::HopByHop
        )
    }
}

/// Whether `name` is `known` (lowercase letters and `-`, as long as `name`), ignoring ASCII
/// case. Setting bit 0x20 folds case eight bytes at a time; it only makes other characters
/// equal to `-` or a letter that no field name (an RFC 9110 token) may hold.
fn is_named(name: &[u8], known: &[u8]) -> bool {
    const FOLD: u64 = 0x2020_2020_2020_2020;
    let len = name.len();
    if len != known.len() {
        return false;
    }
    if len < 8 {
        return name.eq_ignore_ascii_case(known);
    }
    let word = |bytes: &[u8], at: usize| {
        u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes")) | FOLD
    };
    // Whole words, then one that ends with the last byte (overlapping the one before).
    (0..len - 8)
        .step_by(8)
        .chain([len - 8])
        .all(|at| word(name, at) == word(known, at))
}

/// Which Transfer-Encoding an answer may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codings {
    /// One `chunked` and nothing else: a proxy re-frames the body towards its client, and any
    /// other coding would reach it applied and unnamed (nginx refuses them too).
    ChunkedOnly,
    /// Any list (a reader that only measures the body): chunked framing when `chunked` is the
    /// last coding, else the body runs until the connection closes (RFC 9112 §6.3).
    Any,
}

/// Decides an answer's framing from its status, minor version and fields. Answers to HEAD
/// (`head_request`), 1xx, 204 and 304 have no body whatever their fields say; Transfer-Encoding
/// (as `codings` allows) wins over Content-Length, and a message carrying both closes its
/// connection, as RFC 9112 §6.3 asks, so nothing smuggled after it can be read as another
/// answer.
pub fn response_framing(
    status: u16,
    minor_version: u8,
    headers: &[httparse::Header<'_>],
    head_request: bool,
    codings: Codings,
) -> Result<BodyFraming, ParseError> {
    let mut connection = ConnectionOptions::default();
    let mut length: Option<u64> = None;
    let mut chunked = false;
    // A coding list whose last coding is not chunked (`Codings::Any` only).
    let mut unframed = false;
    for header in headers {
        match FieldKind::of(header.name) {
            FieldKind::ContentLength => {
                for part in header.value.split(|&b| b == b',') {
                    let parsed = parse_decimal(part.trim_ascii()).ok_or(ParseError::Length)?;
                    if length.is_some_and(|seen| seen != parsed) {
                        return Err(ParseError::Length);
                    }
                    length = Some(parsed);
                }
            }
            FieldKind::TransferEncoding if codings == Codings::Any => {
                // Fields are one list in order: the last coding of the last field decides.
                let last = header
                    .value
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .rfind(|coding| !coding.is_empty());
                if let Some(last) = last {
                    chunked = last.eq_ignore_ascii_case(b"chunked");
                    unframed = !chunked;
                }
            }
            FieldKind::TransferEncoding
                if !chunked && header.value.trim_ascii().eq_ignore_ascii_case(b"chunked") =>
            {
                chunked = true;
            }
            FieldKind::TransferEncoding => return Err(ParseError::Coding),
            FieldKind::Connection => connection.read(header.value),
            _ => {}
        }
    }
    // Transfer-Encoding in an HTTP/1.0 message is faulty framing: the connection ends after
    // it (RFC 9112 §6.1), as nginx ends it.
    let mut keep_alive =
        connection.keep_alive(minor_version == 1) && !(minor_version == 0 && (chunked || unframed));
    let framing = if head_request || status / 100 == 1 || status == 204 || status == 304 {
        Framing::Length(0)
    } else if unframed {
        keep_alive = false;
        Framing::UntilClose
    } else if chunked {
        if length.is_some() {
            keep_alive = false;
        }
        Framing::Chunked
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    Ok(BodyFraming {
        framing,
        keep_alive,
        names_fields: connection.names_fields,
        content_length: length,
    })
}

/// What a message's `Connection` fields say, read in one pass over their tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionOptions {
    close: bool,
    keep_alive: bool,
    /// They name fields besides the options, which are hop-by-hop then.
    pub names_fields: bool,
}

impl ConnectionOptions {
    /// Adds one `Connection` field's value.
    pub fn read(&mut self, value: &[u8]) {
        for token in tokens(value) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else {
                self.names_fields = true;
            }
        }
    }

    /// Whether the connection stays open, `by_default` being what the protocol version says:
    /// `close` in any of the fields wins (RFC 9112 §9.6).
    pub fn keep_alive(self, by_default: bool) -> bool {
        !self.close && (self.keep_alive || by_default)
    }
}

/// `close` and `keep-alive` in a `Connection` field are options, not names of fields to drop.
pub fn is_connection_option(token: &[u8]) -> bool {
    token.eq_ignore_ascii_case(b"close") || token.eq_ignore_ascii_case(b"keep-alive")
}

/// Parses an answer head with `fields` as `httparse`'s field storage, left uninitialised by
/// the caller: parsing fills what it uses, and zeroing a hundred fields per answer is not free.
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> (httparse::Response<'h, 'b>, httparse::Result<usize>) {
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        fields,
    );
    (response, parsed)
}

/// Where each field of a parsed head sits in the head's bytes, taken while `httparse` still
/// borrows the buffer, so the map can be built from the frozen head without copying values.
/// Offsets only (16 bytes a field): the caller keeps this on its stack and it is never moved.
#[derive(Default)]
pub struct FieldSpans(SmallVec<[FieldSpan; 32]>);

#[derive(Clone, Copy)]
struct FieldSpan {
    name: (u32, u32),
    value: (u32, u32),
}

impl FieldSpans {
    /// Records the spans of the `fields` whose names `keep` accepts; `httparse` parsed them out
    /// of the buffer starting at `base`.
    pub fn record(
        &mut self,
        fields: &[httparse::Header<'_>],
        base: *const u8,
        keep: impl Fn(&str) -> bool,
    ) {
        let base = base as usize;
        let span = |bytes: &[u8]| {
            let start = (bytes.as_ptr() as usize).wrapping_sub(base);
            // Heads are limited far below 4 GiB; an impossible span becomes an empty one.
            let start = u32::try_from(start).unwrap_or(u32::MAX);
            (start, start.saturating_add(bytes.len() as u32))
        };
        self.0.clear();
        self.0.extend(
            fields
                .iter()
                .filter(|field| keep(field.name))
                .map(|field| FieldSpan {
                    name: span(field.name.as_bytes()),
                    value: span(field.value),
                }),
        );
    }

    /// The header map, its values slices of `head` (the bytes the spans were taken from), with
    /// room for `extra` fields the caller adds, so adding them does not grow the map.
    pub fn to_map(&self, head: &Bytes, extra: usize) -> Result<HeaderMap, http::Error> {
        let range = |(start, end): (u32, u32)| {
            let (start, end) = (start as usize, end as usize);
            (start <= end && end <= head.len()).then_some(start..end)
        };
        let mut map = spare_map(self.0.len() + extra);
        for span in &self.0 {
            let name = HeaderName::from_bytes(range(span.name).map_or(&[][..], |r| &head[r]))?;
            let value = match range(span.value) {
                Some(r) => HeaderValue::from_maybe_shared(head.slice(r))?,
                None => HeaderValue::from_static(""),
            };
            map.append(name, value);
        }
        Ok(map)
    }
}

thread_local! {
    /// Header maps of finished messages, cleared, for the next heads parsed on this thread:
    /// making a map allocates its index and its entries, and most heads fit the same room.
    static SPARE_MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}
/// Maps kept per thread, and the most fields a kept map may have room for.
const SPARE_MAPS_KEPT: usize = 256;
const SPARE_MAP_ROOM: usize = 64;

/// An empty header map with room for `fields`, reused when one is at hand.
fn spare_map(fields: usize) -> HeaderMap {
    match SPARE_MAPS.with_borrow_mut(Vec::pop) {
        Some(mut map) => {
            map.reserve(fields);
            map
        }
        None => HeaderMap::with_capacity(fields),
    }
}

/// Gives a message's header map back once the message is written, for the next head.
pub fn recycle_map(mut map: HeaderMap) {
    // A map that never held a field has nothing allocated to reuse.
    if map.capacity() == 0 || map.capacity() > SPARE_MAP_ROOM {
        return;
    }
    map.clear();
    SPARE_MAPS.with_borrow_mut(|spare| {
        if spare.len() < SPARE_MAPS_KEPT {
            spare.push(map);
        }
    });
}

/// Digits only: no sign, no spaces inside, no overflow.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The comma-separated elements of a field value, trimmed.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// Where a body stands while it is read by its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyProgress {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// Everything until the connection closes.
    UntilClose,
    Done,
}

impl BodyProgress {
    pub fn of(framing: Framing) -> BodyProgress {
        match framing {
            Framing::Length(0) => BodyProgress::Done,
            Framing::Length(length) => BodyProgress::Length(length),
            Framing::Chunked => BodyProgress::Chunked(Chunked::Size),
            Framing::UntilClose => BodyProgress::UntilClose,
        }
    }

    /// Takes the next run of body data off the front of `buf` (empty when more bytes are
    /// needed or the body is done), leaving whatever follows the body in `buf`. The data shares
    /// the buffer's memory.
    pub fn take(&mut self, buf: &mut BytesMut) -> Result<Bytes, ParseError> {
        let data = match self {
            BodyProgress::Done => return Ok(Bytes::new()),
            BodyProgress::Length(left) => {
                let take = (*left).min(buf.len() as u64);
                *left -= take;
                if *left == 0 {
                    *self = BodyProgress::Done;
                }
                buf.split_to(take as usize).freeze()
            }
            BodyProgress::Chunked(decoder) => {
                let step = decoder.decode(buf)?;
                buf.advance(step.data.start);
                let data = buf.split_to(step.data.len()).freeze();
                buf.advance(step.used - step.data.end);
                if *decoder == Chunked::Done {
                    *self = BodyProgress::Done;
                }
                data
            }
            BodyProgress::UntilClose => buf.split().freeze(),
        };
        Ok(data)
    }

    pub fn is_done(&self) -> bool {
        *self == BodyProgress::Done
    }

    /// The bytes left when the framing says so.
    pub fn exact_left(&self) -> Option<u64> {
        match self {
            BodyProgress::Length(left) => Some(*left),
            BodyProgress::Done => Some(0),
            BodyProgress::Chunked(_) | BodyProgress::UntilClose => None,
        }
    }

    /// The bytes still to come at least: a chunked body's declared rest of its current chunk.
    pub fn least_left(&self) -> u64 {
        match self {
            BodyProgress::Length(left) | BodyProgress::Chunked(Chunked::Data(left)) => *left,
            BodyProgress::Chunked(_) | BodyProgress::UntilClose | BodyProgress::Done => 0,
        }
    }
}

/// Where a chunked body stands while it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes are left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one, with the bytes of those so
    /// far (at most [`MAX_HEAD`], as a head: trailers are dropped, yet a client sending them
    /// without end would hold its request open for good).
    Trailers(usize),
    Done,
}

/// What one decoding step consumed from the front of the buffer: `used` bytes, of which the
/// `data` range is chunk data (empty when the step only crossed framing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkStep {
    pub used: usize,
    pub data: Range<usize>,
}

impl Chunked {
    /// Decodes from the front of `buf` up to the end of the first run of chunk data. Stops
    /// early when done or when `buf` ends inside a line (`used` is then what could be taken).
    pub fn decode(&mut self, buf: &[u8]) -> Result<ChunkStep, ParseError> {
        let mut used = 0;
        loop {
            let rest = &buf[used..];
            match *self {
                Chunked::Done => return Ok(ChunkStep { used, data: 0..0 }),
                Chunked::Data(left) => {
                    let take = left.min(rest.len() as u64) as usize;
                    *self = if take as u64 == left {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left - take as u64)
                    };
                    return Ok(ChunkStep {
                        used: used + take,
                        data: used..used + take,
                    });
                }
                Chunked::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(ChunkStep { used, data: 0..0 });
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(ParseError::Chunk);
                    }
                    used += 2;
                    *self = Chunked::Size;
                }
                Chunked::Size | Chunked::Trailers(_) => {
                    // A bare CR or LF (or another control byte) inside a line could end it
                    // for a parser in front of the gateway: such bodies are refused, as soon
                    // as the byte is seen, not when a CRLF that may never come arrives.
                    let breaks_lines = |b: &u8| (*b < b' ' && *b != b'\t') || *b == 0x7f;
                    let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                        let unended = rest.strip_suffix(b"\r").unwrap_or(rest);
                        return if rest.len() > MAX_HEAD || unended.iter().any(breaks_lines) {
                            Err(ParseError::Chunk)
                        } else {
                            Ok(ChunkStep { used, data: 0..0 })
                        };
                    };
                    let line = &rest[..end];
                    if line.iter().any(breaks_lines) {
                        return Err(ParseError::Chunk);
                    }
                    used += end + 2;
                    *self = match *self {
                        Chunked::Trailers(_) if line.is_empty() => Chunked::Done,
                        Chunked::Trailers(seen) if is_field_line(line) => {
                            let seen = seen + end + 2;
                            if seen > MAX_HEAD {
                                return Err(ParseError::Chunk);
                            }
                            Chunked::Trailers(seen)
                        }
                        Chunked::Trailers(_) => return Err(ParseError::Chunk),
                        _ => match chunk_size(line)? {
                            0 => Chunked::Trailers(0),
                            size => Chunked::Data(size),
                        },
                    };
                }
            }
        }
    }
}

/// A trailer line as RFC 9112 §7.1.2 has it, `name: value`: a field name right before the
/// colon. A line without one, or a folded one (starting with whitespace), is refused as HAProxy
/// refuses it: a parser in front of the gateway might read it otherwise.
fn is_field_line(line: &[u8]) -> bool {
    line.iter()
        .position(|&b| b == b':')
        .is_some_and(|colon| http::HeaderName::from_bytes(&line[..colon]).is_ok())
}

/// What the chunked body at the front of `buf` declares as far as `buf` goes: the chunk data
/// it holds plus the rest of a chunk it ends inside. Fails where its framing does.
pub fn declared_chunked_length(buf: &[u8]) -> Result<u64, ParseError> {
    let mut decoder = Chunked::Size;
    let (mut at, mut declared) = (0, 0u64);
    loop {
        let step = decoder.decode(&buf[at..])?;
        at += step.used;
        declared = declared.saturating_add(step.data.len() as u64);
        if step.used == 0 || decoder == Chunked::Done {
            break;
        }
    }
    if let Chunked::Data(left) = decoder {
        declared = declared.saturating_add(left);
    }
    Ok(declared)
}

/// A chunk-size line: hex digits from its first byte (any number of leading zeros, at most
/// 15 more), then optionally whitespace and `;extensions` (RFC 9112 §7.1.1).
fn chunk_size(line: &[u8]) -> Result<u64, ParseError> {
    let end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(end);
    let rest = rest.trim_ascii_start();
    let zeros = digits.iter().take_while(|&&b| b == b'0').count();
    if digits.is_empty() || digits.len() - zeros > 15 || !(rest.is_empty() || rest[0] == b';') {
        return Err(ParseError::Chunk);
    }
    let text = std::str::from_utf8(digits).map_err(|_| ParseError::Chunk)?;
    u64::from_str_radix(text, 16).map_err(|_| ParseError::Chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_kinds_know_the_hop_by_hop_fields() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "expect",
        ] {
            assert!(FieldKind::of(name).is_hop_by_hop(), "{name}");
            let upper = name.to_ascii_uppercase();
            assert!(FieldKind::of(&upper).is_hop_by_hop(), "{upper}");
        }
        for name in [
            "Date",
            "x-request-id",
            "Content-Length",
            "Content-Type",
            "TEN",
            "upgrades",
        ] {
            assert!(!FieldKind::of(name).is_hop_by_hop(), "{name}");
        }
        assert_eq!(FieldKind::of("DATE"), FieldKind::Date);
        assert_eq!(FieldKind::of("X-Request-Id"), FieldKind::RequestId);
        assert_eq!(FieldKind::of("content-length"), FieldKind::ContentLength);
    }

    #[test]
    fn names_compare_folded_a_word_at_a_time() {
        for known in [
            "te",
            "date",
            "keep-alive",
            "content-length",
            "proxy-connection",
            "transfer-encoding",
            "proxy-authorization",
        ] {
            assert!(is_named(known.as_bytes(), known.as_bytes()));
            assert!(is_named(
                known.to_ascii_uppercase().as_bytes(),
                known.as_bytes()
            ));
            // Any one character changed, anywhere, tells them apart.
            for at in 0..known.len() {
                let mut other = known.as_bytes().to_vec();
                other[at] = if other[at] == b'x' { b'y' } else { b'x' };
                assert!(
                    !is_named(&other, known.as_bytes()),
                    "{}",
                    String::from_utf8_lossy(&other)
                );
            }
        }
        assert!(!is_named(b"content-lengths", b"content-length"));
        assert_eq!(
            FieldKind::of("Transfer-Encoding"),
            FieldKind::TransferEncoding
        );
        assert_eq!(FieldKind::of("Transfer-Encodinh"), FieldKind::Other);
    }

    #[test]
    fn recycled_header_maps_come_back_empty_and_large_ones_are_dropped() {
        let kept = || SPARE_MAPS.with_borrow(Vec::len);
        let mut map = HeaderMap::with_capacity(8);
        map.insert("x-a", HeaderValue::from_static("1"));
        recycle_map(map);
        assert_eq!(kept(), 1);
        let again = spare_map(4);
        assert!(again.is_empty() && again.capacity() >= 4);
        assert_eq!(kept(), 0);
        recycle_map(HeaderMap::with_capacity(4 * SPARE_MAP_ROOM));
        assert_eq!(kept(), 0);
    }

    #[test]
    fn body_progress_takes_the_body_and_leaves_what_follows() {
        let mut buf = BytesMut::from(&b"abcdeGET /next"[..]);
        let mut sized = BodyProgress::of(Framing::Length(5));
        assert_eq!(sized.exact_left(), Some(5));
        assert_eq!(&sized.take(&mut buf).unwrap()[..], b"abcde");
        assert!(sized.is_done());
        assert_eq!(&buf[..], b"GET /next");

        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\nNEXT"[..]);
        let mut chunked = BodyProgress::of(Framing::Chunked);
        assert_eq!(&chunked.take(&mut buf).unwrap()[..], b"abc");
        assert_eq!(chunked.exact_left(), None);
        assert!(chunked.take(&mut buf).unwrap().is_empty());
        assert!(chunked.is_done());
        assert_eq!(&buf[..], b"NEXT");

        let mut partial = BodyProgress::of(Framing::Length(4));
        let mut buf = BytesMut::from(&b"ab"[..]);
        assert_eq!(&partial.take(&mut buf).unwrap()[..], b"ab");
        assert_eq!(partial, BodyProgress::Length(2));
        assert!(BodyProgress::of(Framing::Length(0)).is_done());
        let mut rest = BodyProgress::of(Framing::UntilClose);
        let mut buf = BytesMut::from(&b"all of it"[..]);
        assert_eq!(&rest.take(&mut buf).unwrap()[..], b"all of it");
        assert!(!rest.is_done());
    }

    fn framing_of(head: &[u8], head_request: bool) -> Result<BodyFraming, ParseError> {
        framing_taking(head, head_request, Codings::ChunkedOnly)
    }

    fn framing_taking(
        head: &[u8],
        head_request: bool,
        codings: Codings,
    ) -> Result<BodyFraming, ParseError> {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        assert!(response.parse(head).unwrap().is_complete());
        response_framing(
            response.code.unwrap(),
            response.version.unwrap(),
            response.headers,
            head_request,
            codings,
        )
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let length = framing_of(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", false);
        assert_eq!(
            length,
            Ok(BodyFraming {
                framing: Framing::Length(2),
                keep_alive: true,
                names_fields: false,
                content_length: Some(2),
            })
        );
        let chunked = framing_of(
            b"HTTP/1.1 503 x\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(
            (chunked.framing, chunked.keep_alive),
            (Framing::Chunked, false)
        );
        let old = framing_of(b"HTTP/1.0 200 OK\r\n\r\n", false).unwrap();
        assert_eq!((old.framing, old.keep_alive), (Framing::UntilClose, false));
        let old_chunked = framing_of(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(
            (old_chunked.framing, old_chunked.keep_alive),
            (Framing::Chunked, false)
        );
        let kept = framing_of(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(kept.unwrap().keep_alive);
    }

    #[test]
    fn connection_fields_close_keep_or_name_fields() {
        let of = |head: &[u8]| {
            let framing = framing_of(head, false).unwrap();
            (framing.keep_alive, framing.names_fields)
        };
        let options = of(b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(options, (true, false));
        // close wins over keep-alive, in one field or across two.
        let both =
            of(b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(both, (false, false));
        let two = of(b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(two, (false, false));
        let named =
            of(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(named, (true, true));
        // An empty element is not an option: the map path sorts it out.
        let empty = of(b"HTTP/1.1 200 OK\r\nConnection: close,,\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(empty, (false, true));
    }

    #[test]
    fn ambiguous_answers_close_their_connection() {
        let both = framing_of(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!((both.framing, both.keep_alive), (Framing::Chunked, false));
        // Codings other than one chunked would reach the client applied and unnamed.
        for coding in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(framing_of(coding, false), Err(ParseError::Coding));
        }
        // A reader that only measures the body takes any list: chunked when it ends the list.
        let measured = |head: &[u8]| {
            let framing = framing_taking(head, false, Codings::Any).unwrap();
            (framing.framing, framing.keep_alive)
        };
        for (head, framing) in [
            (
                &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..],
                (Framing::Chunked, true),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked,\r\n\r\n",
                (Framing::Chunked, true),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\nContent-Length: 4\r\n\r\n",
                (Framing::UntilClose, false),
            ),
        ] {
            assert_eq!(measured(head), framing, "{}", String::from_utf8_lossy(head));
        }
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert_eq!(framing_of(bad, false), Err(ParseError::Length));
        }
        let same_twice = framing_of(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", false);
        assert_eq!(same_twice.unwrap().framing, Framing::Length(5));
    }

    #[test]
    fn some_answers_have_no_body() {
        let with_length = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n";
        assert_eq!(
            framing_of(with_length, true).unwrap().framing,
            Framing::Length(0)
        );
        for status in ["204", "304", "100"] {
            let text = format!("HTTP/1.1 {status} x\r\nContent-Length: 5\r\n\r\n");
            let framing = framing_of(text.as_bytes(), false).unwrap();
            assert_eq!(framing.framing, Framing::Length(0), "{status}");
        }
    }

    /// Decodes `body` fed in two pieces split at every position; returns the data and the rest.
    fn decode_split(body: &[u8], split: usize) -> (Vec<u8>, Vec<u8>) {
        let mut state = Chunked::Size;
        let mut buf = body[..split].to_vec();
        let mut data = Vec::new();
        let mut fed_all = false;
        loop {
            let step = state.decode(&buf).unwrap();
            data.extend_from_slice(&buf[step.data.clone()]);
            buf.drain(..step.used);
            if state == Chunked::Done {
                return (data, buf);
            }
            if step.used == 0 {
                assert!(!fed_all, "stuck at split {split}");
                buf.extend_from_slice(&body[split..]);
                fed_all = true;
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_across_reads() {
        let body = b"5;ext=1\r\nhello\r\n10 ; a=\"b\"\r\n0123456789abcdef\r\n0\r\nTrailer: x\ty\r\n\r\nNEXT";
        for split in 0..body.len() - 4 {
            let (data, rest) = decode_split(body, split);
            assert_eq!(data, b"hello0123456789abcdef", "split at {split}");
            assert_eq!(rest, b"NEXT", "split at {split}");
        }
    }

    #[test]
    fn broken_chunks_are_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"-5\r\n",
            b"\r\n",
            b"ffffffffffffffffff\r\n",
            b"5\r\nhelloXX",
            b"0x5\r\n",
            // Nothing before the digits; only whitespace and `;` after them.
            b" 5\r\n",
            b"5x\r\n",
            // Control bytes in size and trailer lines: a bare LF ends a line for some parsers.
            b"5;ext\nX\r\nhello\r\n0\r\n\r\n",
            b"5;a\rb\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nT: x\nGET /smuggled HTTP/1.1\r\n\r\n",
            // Trailer lines that are no field lines: no colon, folded, a space before the colon.
            b"3\r\nabc\r\n0\r\nGET /smug HTTP/1.1\r\n\r\n",
            b"3\r\nabc\r\n0\r\nX-T: 1\r\n 2\r\n\r\n",
            b"3\r\nabc\r\n0\r\nX-T : 1\r\n\r\n",
            b"3\r\nabc\r\n0\r\n: 1\r\n\r\n",
            // Lines ended by bare LFs only: refused at once, not waited on for a CRLF.
            b"3\nabc\n0\n\n",
            b"5\r\nhello\r\n0\n",
        ] {
            let result = declared_chunked_length(bad);
            assert_eq!(result, Err(ParseError::Chunk), "{:?}", bad);
        }
    }

    /// Trailers are dropped, and bounded as a head is: a client sending them without end held
    /// its request open for good (100 MB of them went through).
    #[test]
    fn trailers_are_bounded_as_a_head() {
        let line = format!("X-T: {}\r\n", "v".repeat(1000));
        let decode_all = |lines: usize| {
            let mut state = Chunked::Size;
            let mut body = b"3\r\nabc\r\n0\r\n".to_vec();
            for _ in 0..lines {
                body.extend_from_slice(line.as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            let mut at = 0;
            while state != Chunked::Done {
                at += state.decode(&body[at..])?.used;
            }
            Ok(at)
        };
        assert_eq!(decode_all(60), Ok(11 + 60 * line.len() + 2));
        assert_eq!(decode_all(70), Err(ParseError::Chunk));
    }

    #[test]
    fn a_buffered_chunked_start_declares_its_length() {
        for (buffered, declared) in [
            (&b""[..], 0),
            (b"5\r\nhel", 5),
            (b"5\r\nhello\r\n1000000\r\nab", 5 + 0x100_0000),
            (b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n", 5),
            // A line the buffer cuts between its CR and LF.
            (b"5\r\nhello\r\n0\r", 5),
            // Leading zeros are not digits that count (RFC 9112 §7.1 sets no length).
            (b"00000000000000000000005\r\nhello", 5),
            (b"fffffffffffffff\r\n", 0xfff_ffff_ffff_ffff),
        ] {
            assert_eq!(
                declared_chunked_length(buffered),
                Ok(declared),
                "{buffered:?}"
            );
        }
    }
}
