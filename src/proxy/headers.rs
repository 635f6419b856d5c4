//! Header rules of a proxy (RFC 9110 §7.6): hop-by-hop fields removed in both directions, the
//! X-Forwarded-* fields, request IDs, and refusing messages whose framing is ambiguous.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

use crate::http1::{has_token, is_connection_option, tokens, FieldKind};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Set by a route with `strip_prefix`; a client's own is never passed on, as for the others
/// (an application building links from it would build them for whoever sent it).
pub static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// Heads with at most this many field lines are searched by a scan instead of a hashed lookup.
const SCAN_LIMIT: usize = 16;

/// The values of `name` in `headers`. `HeaderMap` hashes the name on every lookup; the heads a
/// proxy sees mostly have a handful of fields, and comparing names (an enum comparison for the
/// standard ones) over all of them costs a fraction of a hash. Larger heads use the map's index.
pub fn values<'a>(headers: &'a HeaderMap, name: &'a HeaderName) -> Values<'a> {
    if headers.len() <= SCAN_LIMIT {
        Values::Scan(headers.iter(), name)
    } else {
        Values::Indexed(headers.get_all(name).into_iter())
    }
}

/// The first value of `name` in `headers` (see [`values`]).
pub fn value<'a>(headers: &'a HeaderMap, name: &'a HeaderName) -> Option<&'a HeaderValue> {
    values(headers, name).next()
}

/// Whether `headers` has a field `name` (see [`values`]).
pub fn has(headers: &HeaderMap, name: &HeaderName) -> bool {
    value(headers, name).is_some()
}

/// The values [`values`] finds, by scanning the fields or through the map's index.
pub enum Values<'a> {
    Scan(header::Iter<'a, HeaderValue>, &'a HeaderName),
    Indexed(header::ValueIter<'a, HeaderValue>),
}

impl<'a> Iterator for Values<'a> {
    type Item = &'a HeaderValue;

    fn next(&mut self) -> Option<&'a HeaderValue> {
        match self {
            Values::Scan(fields, name) => fields.find(|(field, _)| field == name).map(|(_, v)| v),
            Values::Indexed(values) => values.next(),
        }
    }
}

/// Removes hop-by-hop fields (`FieldKind::is_hop_by_hop`), including every field named in
/// `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds what is there: most messages carry no hop-by-hop field or
    // only `Connection: keep-alive`, and a hashed lookup per listed name would cost more.
    let present: SmallVec<[HeaderName; 4]> = headers
        .keys()
        .filter(|name| FieldKind::of(name.as_str()).is_hop_by_hop())
        .cloned()
        .collect();
    if present.is_empty() {
        return;
    }
    if present.contains(&header::CONNECTION) {
        let named: SmallVec<[HeaderName; 4]> = values(headers, &header::CONNECTION)
            .flat_map(|v| tokens(v.as_bytes()))
            // A Keep-Alive field goes anyway; Host is the request's, never the hop's.
            .filter(|token| !is_connection_option(token) && !token.eq_ignore_ascii_case(b"host"))
            .filter_map(|token| HeaderName::from_bytes(token).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in present {
        headers.remove(name);
    }
}

/// Removes the fields whose names hold `_`, as nginx does unless `underscores_in_headers`:
/// CGI-style instances read `X_Forwarded_For` as `X-Forwarded-For`, which would undo the
/// fields the gateway sets. (The HTTP/1.1 loop leaves them out as it parses.)
pub fn drop_underscored(headers: &mut HeaderMap) {
    let underscored = |name: &HeaderName| name.as_str().contains('_');
    if !headers.keys().any(underscored) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| underscored(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// The protocol a message asks to switch to (`Connection: upgrade` with `Upgrade: X`), if any.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    // Most messages have no Upgrade field: look for it before parsing Connection.
    let protocol = value(headers, &header::UPGRADE)?;
    values(headers, &header::CONNECTION)
        .any(|v| has_token(v.as_bytes(), b"upgrade"))
        .then(|| protocol.clone())
}

/// The upgrade a request may make through the gateway: WebSocket alone, as Envoy and Traefik
/// allow by default. Any other (h2c above all: RFC 9113 §3.1 deprecates it, and its tunnel would
/// carry the client's later requests past routing, authentication and rate limits) is dropped
/// with the other hop-by-hop fields, and the request goes on as a plain one, as in nginx.
pub fn websocket_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    requested_upgrade(headers).filter(is_websocket)
}

/// Whether an `Upgrade` value names WebSocket.
pub fn is_websocket(protocol: &HeaderValue) -> bool {
    protocol
        .as_bytes()
        .trim_ascii()
        .eq_ignore_ascii_case(b"websocket")
}

/// Puts `Connection: upgrade` and `Upgrade` back after hop-by-hop fields were stripped.
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// The value of cookie `name` in the request's `Cookie` fields (the first one if repeated).
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Why a request head is refused before it reaches any instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// Both Content-Length and Transfer-Encoding: the classic smuggling shape.
    LengthAndChunked,
    /// Several Content-Length values that disagree.
    ConflictingLengths,
    /// A Content-Length that is not plain digits (a sign, hex, nothing) or does not fit.
    InvalidLength,
    /// A transfer coding other than one `chunked`: the gateway cannot pass other codings on
    /// (Transfer-Encoding is hop-by-hop), and a doubled `chunked` is framed differently by
    /// different parsers.
    UnsupportedTransferCoding,
}

impl FramingError {
    pub fn reason(self) -> &'static str {
        match self {
            FramingError::LengthAndChunked => "both Content-Length and Transfer-Encoding",
            FramingError::ConflictingLengths => "conflicting Content-Length values",
            FramingError::InvalidLength => "a Content-Length that is not a number of bytes",
            FramingError::UnsupportedTransferCoding => {
                "Transfer-Encoding other than a single chunked"
            }
        }
    }
}

/// Checks message framing and returns the declared Content-Length, if any. A length repeated
/// with the same value (RFC 9110 §8.6 lets a recipient take it) is collapsed into one field, as
/// some instances refuse a repeated Content-Length outright; one written with leading zeros is
/// written plainly, as nginx does, for an instance that would read `010` otherwise (as octal).
pub fn check_framing(headers: &mut HeaderMap) -> Result<Option<u64>, FramingError> {
    let mut length: Option<u64> = None;
    let mut rewrite = false;
    for value in values(headers, &header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            rewrite |= length.is_some();
            let part = part.trim_ascii();
            rewrite |= part.len() > 1 && part[0] == b'0';
            // Digits only: `u64::from_str` would also take a leading `+`.
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Err(FramingError::InvalidLength);
            }
            let parsed: u64 = std::str::from_utf8(part)
                .ok()
                .and_then(|digits| digits.parse().ok())
                .ok_or(FramingError::InvalidLength)?;
            match length {
                Some(previous) if previous != parsed => {
                    return Err(FramingError::ConflictingLengths)
                }
                _ => length = Some(parsed),
            }
        }
    }
    let mut codings = values(headers, &header::TRANSFER_ENCODING);
    if let Some(first) = codings.next() {
        if length.is_some() {
            return Err(FramingError::LengthAndChunked);
        }
        if codings.next().is_some()
            || !first
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked")
        {
            return Err(FramingError::UnsupportedTransferCoding);
        }
    }
    if let Some(length) = length.filter(|_| rewrite) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    Ok(length)
}

/// The fields the gateway sets on a request to an instance: X-Forwarded-For (the client's
/// address appended to what came), X-Forwarded-Proto, X-Forwarded-Host and X-Request-ID. They
/// are written straight into the instance's head, not into the client's header map, where each
/// would cost a hashed insert of a custom name.
pub struct ForwardedFields {
    forwarded_for: HeaderValue,
    proto: HeaderValue,
    host: Option<HeaderValue>,
    request_id: HeaderValue,
}

impl ForwardedFields {
    /// Prepares a client's request head for an instance: hop-by-hop fields and any of the
    /// gateway's fields the client sent come out of `headers` (X-Forwarded-For is carried over
    /// into the new value), and the fields to add are returned.
    pub fn take(
        headers: &mut HeaderMap,
        client_ip: &HeaderValue,
        proto: &'static str,
        host: Option<HeaderValue>,
        request_id: &HeaderValue,
    ) -> ForwardedFields {
        strip_hop_by_hop(headers);
        let ours = [
            &X_FORWARDED_FOR,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
            &X_FORWARDED_PREFIX,
            &X_REQUEST_ID,
        ];
        // One pass finds whether the client sent any; most requests carry none of them.
        let sent = headers.keys().any(|name| ours.contains(&name));
        let existing = sent.then(|| value(headers, &X_FORWARDED_FOR)).flatten();
        let forwarded_for = match existing {
            Some(existing) => {
                let mut joined = Vec::with_capacity(existing.len() + 2 + client_ip.len());
                for (i, v) in values(headers, &X_FORWARDED_FOR).enumerate() {
                    if i > 0 {
                        joined.extend_from_slice(b", ");
                    }
                    joined.extend_from_slice(v.as_bytes());
                }
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(client_ip.as_bytes());
                HeaderValue::from_maybe_shared(bytes::Bytes::from(joined))
                    .unwrap_or_else(|_| client_ip.clone())
            }
            None => client_ip.clone(),
        };
        if sent {
            for name in ours {
                headers.remove(name);
            }
        }
        ForwardedFields {
            forwarded_for,
            proto: HeaderValue::from_static(proto),
            host,
            request_id: request_id.clone(),
        }
    }

    fn each(&self) -> impl Iterator<Item = (&'static HeaderName, &HeaderValue)> {
        [
            (&X_FORWARDED_FOR, Some(&self.forwarded_for)),
            (&X_FORWARDED_PROTO, Some(&self.proto)),
            (&X_FORWARDED_HOST, self.host.as_ref()),
            (&X_REQUEST_ID, Some(&self.request_id)),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
    }

    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    /// Appends the fields as HTTP/1.1 field lines.
    pub fn write(&self, out: &mut Vec<u8>) {
        for (name, value) in self.each() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Adds the fields to a header map (HTTP/2 instances, cached routes).
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        for (name, value) in self.each() {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// A client-sent request ID is kept when it is 1–128 characters of letters, digits and
/// `-_.:+/=`; anything else (empty, too long, spaces, control bytes) is replaced.
pub fn is_sane_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(b))
}

/// The client's X-Request-ID, when it is one to keep.
pub fn client_request_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    value(headers, &X_REQUEST_ID).filter(|id| is_sane_request_id(id))
}

/// A new request ID: 16 hex digits from a per-process random prefix and a sequence number,
/// unique without coordination and cheap to make.
pub fn new_request_id(prefix: u32, seq: u64) -> HeaderValue {
    let value = (u64::from(prefix) << 32) ^ seq;
    let mut buf = [0u8; 16];
    for (i, slot) in buf.iter_mut().enumerate() {
        let nibble = (value >> (60 - 4 * i)) & 0xf;
        *slot = b"0123456789abcdef"[nibble as usize];
    }
    // Owned by the Bytes from the start: the request's and the answer's copies share it
    // without the promotion (a second allocation) a Vec-backed value takes on its first clone.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_needs_both_fields() {
        let ws = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested_upgrade(&ws).unwrap(), "websocket");
        assert!(requested_upgrade(&map(&[("upgrade", "websocket")])).is_none());
        assert!(requested_upgrade(&map(&[("connection", "upgrade")])).is_none());
        let mut stripped = ws.clone();
        strip_hop_by_hop(&mut stripped);
        assert!(requested_upgrade(&stripped).is_none());
        let h2c = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert_eq!(requested_upgrade(&h2c).unwrap(), "h2c");
        assert!(websocket_upgrade(&h2c).is_none());
        let both = map(&[("connection", "upgrade"), ("upgrade", "websocket, h2c")]);
        assert!(websocket_upgrade(&both).is_none());
        assert_eq!(websocket_upgrade(&ws).unwrap(), "websocket");
        restore_upgrade(&mut stripped, HeaderValue::from_static("websocket"));
        assert_eq!(requested_upgrade(&stripped).unwrap(), "websocket");
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn scanned_and_indexed_lookups_agree() {
        for filler in [2, SCAN_LIMIT + 4] {
            let mut headers = map(&[("x-a", "1"), ("Host", "h"), ("x-a", "2")]);
            for i in 0..filler {
                headers.append(
                    HeaderName::from_bytes(format!("x-filler-{i}").as_bytes()).unwrap(),
                    HeaderValue::from_static("f"),
                );
            }
            let x_a = HeaderName::from_static("x-a");
            let found: Vec<_> = values(&headers, &x_a).collect();
            assert_eq!(found, ["1", "2"], "{filler} fillers");
            assert_eq!(value(&headers, &header::HOST).unwrap(), "h");
            assert!(!has(&headers, &header::CONNECTION));
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_removed() {
        let mut headers = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("Trailer", "x-sum"),
            ("proxy-authorization", "Basic eA=="),
            ("expect", "100-continue"),
            ("x-kept", "yes"),
            ("host", "example.com"),
        ]);
        strip_hop_by_hop(&mut headers);
        let names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept", "host"]);
    }

    #[test]
    fn connection_options_alone_leave_the_other_fields() {
        let mut headers = map(&[
            ("connection", "close"),
            ("x-named", "1"),
            ("content-length", "2"),
        ]);
        strip_hop_by_hop(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["content-length", "x-named"]);

        let mut headers = map(&[("connection", "Keep-Alive, x-named"), ("x-named", "1")]);
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn forwarded_fields_replace_the_clients_and_extend_x_forwarded_for() {
        let mut headers = map(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("host", "api.test"),
            ("x-forwarded-proto", "spoofed"),
            ("X-Request-Id", "spoofed"),
        ]);
        let id = HeaderValue::from_static("abc");
        let host = headers.get("host").cloned();
        let fields = ForwardedFields::take(
            &mut headers,
            &HeaderValue::from_static("10.0.0.1"),
            "http",
            host,
            &id,
        );
        // The client's own copies are gone from its map.
        let names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host"]);
        let mut out = Vec::new();
        fields.write(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x-forwarded-for: 203.0.113.7, 10.0.0.1\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: api.test\r\nx-request-id: abc\r\n"
        );
        fields.insert_into(&mut headers);
        assert_eq!(headers["x-forwarded-for"], "203.0.113.7, 10.0.0.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "api.test");
        assert_eq!(headers["x-request-id"], "abc");

        let mut fresh = HeaderMap::new();
        let fields = ForwardedFields::take(
            &mut fresh,
            &HeaderValue::from_static("::1"),
            "https",
            None,
            &id,
        );
        fields.insert_into(&mut fresh);
        assert_eq!(fresh["x-forwarded-for"], "::1");
        assert_eq!(fresh["x-forwarded-proto"], "https");
        assert!(!fresh.contains_key("x-forwarded-host"));
    }

    #[test]
    fn several_forwarded_for_lines_are_joined() {
        let mut headers = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        let id = HeaderValue::from_static("abc");
        let fields = ForwardedFields::take(
            &mut headers,
            &HeaderValue::from_static("3.3.3.3"),
            "http",
            None,
            &id,
        );
        assert!(headers.is_empty());
        fields.insert_into(&mut headers);
        assert_eq!(headers["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3");
    }

    #[test]
    fn framing_conflicts_are_refused() {
        assert_eq!(
            check_framing(&mut map(&[("content-length", "5")])),
            Ok(Some(5))
        );
        // The same length twice, in two fields or one list, goes on as one field.
        for repeated in [
            map(&[("content-length", "5"), ("content-length", "5")]),
            map(&[("content-length", "5, 5")]),
            map(&[("content-length", "0005")]),
            map(&[("content-length", "05, 5")]),
        ] {
            let mut headers = repeated;
            assert_eq!(check_framing(&mut headers), Ok(Some(5)));
            let lengths: Vec<_> = headers.get_all("content-length").iter().collect();
            assert_eq!(lengths, ["5"]);
        }
        assert_eq!(
            check_framing(&mut map(&[
                ("content-length", "5"),
                ("content-length", "6")
            ])),
            Err(FramingError::ConflictingLengths)
        );
        assert_eq!(
            check_framing(&mut map(&[("content-length", "5, 6")])),
            Err(FramingError::ConflictingLengths)
        );
        assert_eq!(
            check_framing(&mut map(&[("content-length", "-1")])),
            Err(FramingError::InvalidLength)
        );
        assert_eq!(
            check_framing(&mut map(&[
                ("content-length", "5"),
                ("transfer-encoding", "chunked")
            ])),
            Err(FramingError::LengthAndChunked)
        );
        assert_eq!(
            check_framing(&mut map(&[("transfer-encoding", "chunked")])),
            Ok(None)
        );
        assert_eq!(
            check_framing(&mut map(&[("transfer-encoding", "Chunked")])),
            Ok(None)
        );
        for signed in ["+5", " 5 ", "5 5", "0x5", "", "99999999999999999999"] {
            let expected = if signed == " 5 " {
                Ok(Some(5))
            } else {
                Err(FramingError::InvalidLength)
            };
            assert_eq!(
                check_framing(&mut map(&[("content-length", signed)])),
                expected,
                "{signed:?}"
            );
        }
        for coding in ["gzip, chunked", "chunked, chunked", "xchunked", "identity"] {
            assert_eq!(
                check_framing(&mut map(&[("transfer-encoding", coding)])),
                Err(FramingError::UnsupportedTransferCoding),
                "{coding}"
            );
        }
        assert_eq!(
            check_framing(&mut map(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked")
            ])),
            Err(FramingError::UnsupportedTransferCoding)
        );
    }

    #[test]
    fn request_ids() {
        assert!(is_sane_request_id(&HeaderValue::from_static(
            "req-42_a.b:c"
        )));
        assert!(!is_sane_request_id(&HeaderValue::from_static("")));
        assert!(!is_sane_request_id(&HeaderValue::from_static("has space")));
        assert!(!is_sane_request_id(
            &HeaderValue::from_str(&"a".repeat(129)).unwrap()
        ));
        let id = new_request_id(0xdead_beef, 1);
        assert_eq!(id, "deadbeef00000001");
        assert_ne!(new_request_id(7, 1), new_request_id(7, 2));
    }
}
