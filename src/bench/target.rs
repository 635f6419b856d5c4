//! Bench targets: the URLs checked once up front and turned into request templates, so each
//! request is written from bytes made once (HTTP/1.1) or from cheap clones (HTTP/2).

use std::net::{SocketAddr, ToSocketAddrs};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, Method, Request, Uri};

use crate::http1::has_token;
use http_body_util::Full;

/// A server to connect to; URLs with the same authority share one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub authority: Authority,
    pub addr: SocketAddr,
}

/// Everything one request to one URL is made of, built once.
#[derive(Debug, Clone)]
pub struct Template {
    /// Index into the origin list.
    pub origin: usize,
    /// The whole HTTP/1.1 request, head and body.
    http1: Bytes,
    method: Method,
    /// Absolute form, for HTTP/2's `:scheme` and `:authority`.
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    /// The request says `Connection: close`: its connection is not used again.
    closes: bool,
}

impl Template {
    /// Whether the connection ends with this request's answer (RFC 9112 §9.6).
    pub fn closes(&self) -> bool {
        self.closes
    }

    /// The HTTP/1.1 request as it goes on the wire.
    pub fn http1(&self) -> &[u8] {
        &self.http1
    }

    /// Whether the answer has no body whatever its headers say.
    pub fn is_head(&self) -> bool {
        self.method == Method::HEAD
    }

    /// A fresh HTTP/2 request: the URI, header map and body are cheap clones of the template's.
    pub fn http2(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// What every request shares, apart from its URL.
#[derive(Debug, Clone)]
pub struct RequestParts {
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A URL split into the origin to connect to and the request target to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUrl {
    pub authority: Authority,
    pub port: u16,
    pub path_and_query: PathAndQuery,
}

/// Checks one URL: plain `http://` with a host; the port defaults to 80, the path to `/`.
pub fn parse_url(url: &str) -> Result<ParsedUrl, String> {
    if !url.contains("://") {
        return Err(format!(
            "`{url}` needs a scheme and host, like http://127.0.0.1:8080/"
        ));
    }
    let uri: Uri = url
        .parse()
        .map_err(|err| format!("`{url}` is not a URL: {err}"))?;
    match uri.scheme() {
        Some(scheme) if *scheme == Scheme::HTTP => {}
        Some(scheme) if *scheme == Scheme::HTTPS => {
            return Err(format!(
                "`{url}`: https is not supported by scalegate bench; use an http:// URL"
            ))
        }
        _ => return Err(format!("`{url}`: unsupported scheme; use http://")),
    }
    let authority = uri
        .authority()
        .filter(|a| !a.host().is_empty())
        .ok_or_else(|| format!("`{url}` has no host"))?
        .clone();
    if authority.as_str().contains('@') {
        return Err(format!(
            "`{url}`: credentials in the URL are not supported; use -H"
        ));
    }
    // Read from the text: `Authority::port` takes a port that is no u16 (99999) for none.
    let text = authority.as_str();
    let after_host = text.rsplit_once(']').map_or(text, |(_, rest)| rest);
    let port = match after_host.rsplit_once(':') {
        None | Some((_, "")) => 80,
        Some((_, port)) => port
            .parse::<u16>()
            .ok()
            .filter(|port| *port > 0)
            .ok_or_else(|| format!("`{url}`: `{port}` is not a port (1–65535)"))?,
    };
    // An empty path is `/` (RFC 9110 §4.2.3): `http://h?a=1` asks for `/?a=1`, never `?a=1`.
    let path_and_query = match uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
        Some(pq) => PathAndQuery::try_from(format!("/{}", pq.as_str()))
            .map_err(|err| format!("`{url}`: {err}"))?,
        None => PathAndQuery::from_static("/"),
    };
    Ok(ParsedUrl {
        authority,
        port,
        path_and_query,
    })
}

/// Refuses `-H` headers that would make the request other than it says: the body's framing is
/// the generator's own (Content-Length from the body), and HTTP/2 has no connection-specific
/// fields (RFC 9113 §8.2.2).
pub fn check_headers(headers: &HeaderMap, http2: bool) -> Result<(), String> {
    for name in [CONTENT_LENGTH, TRANSFER_ENCODING] {
        if headers.contains_key(&name) {
            return Err(format!(
                "-H {name}: scalegate bench frames the body itself (Content-Length of --body or --body-file)"
            ));
        }
    }
    if http2 {
        let specific = [CONNECTION, UPGRADE, TE].into_iter().find(|name| {
            headers
                .get_all(name)
                .iter()
                .any(|value| *name != TE || !value.as_bytes().eq_ignore_ascii_case(b"trailers"))
        });
        let named = ["keep-alive", "proxy-connection"]
            .into_iter()
            .find(|name| headers.contains_key(*name));
        if let Some(name) = specific.as_ref().map(HeaderName::as_str).or(named) {
            return Err(format!(
                "-H {name}: a connection-specific field, which HTTP/2 does not carry"
            ));
        }
    }
    Ok(())
}

/// Parses, resolves and templates every URL; the error names the first unusable one.
pub fn build(
    urls: &[String],
    parts: &RequestParts,
) -> Result<(Vec<Template>, Vec<Origin>), String> {
    let mut origins: Vec<Origin> = Vec::new();
    let mut templates = Vec::with_capacity(urls.len());
    for url in urls {
        let parsed = parse_url(url)?;
        let origin = match origins.iter().position(|o| o.authority == parsed.authority) {
            Some(index) => index,
            None => {
                origins.push(Origin {
                    addr: resolve(&parsed, url)?,
                    authority: parsed.authority.clone(),
                });
                origins.len() - 1
            }
        };
        templates.push(template(origin, parsed, parts));
    }
    Ok((templates, origins))
}

fn resolve(parsed: &ParsedUrl, url: &str) -> Result<SocketAddr, String> {
    let host = parsed
        .authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (host, parsed.port)
        .to_socket_addrs()
        .map_err(|err| format!("`{url}`: cannot resolve `{host}`: {err}"))?
        .collect();
    let connects = |addr: &SocketAddr| {
        std::net::TcpStream::connect_timeout(addr, std::time::Duration::from_secs(1)).is_ok()
    };
    pick_address(&addrs, connects).ok_or_else(|| format!("`{url}`: `{host}` has no address"))
}

/// Of a name's addresses, the first that takes a connection, as wrk picks (a server on
/// 127.0.0.1 alone, with `localhost` resolving to ::1 first, got connect errors only); the
/// first when none does, so the run reports why. One address is taken untried.
fn pick_address(
    addrs: &[SocketAddr],
    connects: impl FnMut(&SocketAddr) -> bool,
) -> Option<SocketAddr> {
    match addrs {
        [] => None,
        [only] => Some(*only),
        [first, ..] => Some(addrs.iter().copied().find(connects).unwrap_or(*first)),
    }
}

fn template(origin: usize, parsed: ParsedUrl, parts: &RequestParts) -> Template {
    let uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(parsed.authority.clone())
        .path_and_query(parsed.path_and_query.clone())
        .build()
        .expect("parts of a parsed URI form a URI");
    Template {
        origin,
        http1: http1_bytes(&parsed, parts),
        method: parts.method.clone(),
        uri,
        headers: parts.headers.clone(),
        body: parts.body.clone(),
        closes: parts
            .headers
            .get_all(CONNECTION)
            .iter()
            .any(|value| has_token(value.as_bytes(), b"close")),
    }
}

/// The HTTP/1.1 request: origin form, a Host header unless one was given, and a
/// Content-Length whenever there is a body or the method expects one.
fn http1_bytes(parsed: &ParsedUrl, parts: &RequestParts) -> Bytes {
    let mut out = Vec::with_capacity(256 + parts.body.len());
    let line = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parsed.path_and_query.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(HOST) {
        line(&mut out, b"host", parsed.authority.as_str().as_bytes());
    }
    for (name, value) in &parts.headers {
        line(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    let expects_body = [Method::POST, Method::PUT, Method::PATCH].contains(&parts.method);
    if expects_body || !parts.body.is_empty() {
        line(
            &mut out,
            b"content-length",
            parts.body.len().to_string().as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&parts.body);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn parts(method: Method, body: &'static str) -> RequestParts {
        RequestParts {
            method,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn urls_are_checked() {
        let parsed = parse_url("http://127.0.0.1:8080/a?b=1").unwrap();
        assert_eq!(parsed.port, 8080);
        assert_eq!(parsed.path_and_query.as_str(), "/a?b=1");
        assert_eq!(parse_url("http://localhost").unwrap().port, 80);
        for bad in ["http://127.0.0.1:99999/", "http://127.0.0.1:0/"] {
            assert!(parse_url(bad).unwrap_err().contains("not a port"), "{bad}");
        }
        assert_eq!(parse_url("http://localhost").unwrap().path_and_query, "/");
        let query_only = parse_url("http://localhost:8080?a=1").unwrap();
        assert_eq!(query_only.path_and_query, "/?a=1");
        assert!(parse_url("https://x/").unwrap_err().contains("https"));
        let err = parse_url("127.0.0.1:80/x").unwrap_err();
        assert!(err.contains("scheme"), "{err}");
        assert!(parse_url("ftp://x/").unwrap_err().contains("scheme"));
        assert!(parse_url("not a url").is_err());
        assert!(parse_url("http://u:p@x/")
            .unwrap_err()
            .contains("credentials"));
    }

    #[test]
    fn the_first_address_taking_a_connection_is_used() {
        let listening = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listening.local_addr().unwrap();
        let closed = {
            let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            gone.local_addr().unwrap()
        };
        let connects = |addr: &SocketAddr| std::net::TcpStream::connect(addr).is_ok();
        assert_eq!(pick_address(&[closed, open], connects), Some(open));
        assert_eq!(pick_address(&[closed, closed], connects), Some(closed));
        assert_eq!(pick_address(&[closed], |_| unreachable!()), Some(closed));
        assert_eq!(pick_address(&[], connects), None);
    }

    #[test]
    fn same_authority_shares_an_origin() {
        let urls = vec![
            "http://127.0.0.1:9/a".to_string(),
            "http://127.0.0.1:9/b".to_string(),
            "http://127.0.0.1:10/".to_string(),
        ];
        let (templates, origins) = build(&urls, &parts(Method::GET, "")).unwrap();
        assert_eq!(origins.len(), 2);
        assert_eq!(
            templates.iter().map(|t| t.origin).collect::<Vec<_>>(),
            [0, 0, 1]
        );
        assert_eq!(origins[1].addr, "127.0.0.1:10".parse().unwrap());
    }

    #[test]
    fn http1_requests_are_written_once() {
        let mut given = parts(Method::POST, "hi");
        given.headers.append("x-a", HeaderValue::from_static("1"));
        given.headers.append("x-a", HeaderValue::from_static("2"));
        let (templates, _) = build(&["http://127.0.0.1:9/p?q".into()], &given).unwrap();
        assert_eq!(
            std::str::from_utf8(templates[0].http1()).unwrap(),
            "POST /p?q HTTP/1.1\r\nhost: 127.0.0.1:9\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 2\r\n\r\nhi"
        );
        let (templates, _) =
            build(&["http://127.0.0.1:9".into()], &parts(Method::GET, "")).unwrap();
        assert_eq!(
            templates[0].http1(),
            b"GET / HTTP/1.1\r\nhost: 127.0.0.1:9\r\n\r\n"
        );
        assert!(!templates[0].is_head());
        let (templates, _) = build(&["http://127.0.0.1/".into()], &parts(Method::PUT, "")).unwrap();
        assert!(std::str::from_utf8(templates[0].http1())
            .unwrap()
            .contains("content-length: 0\r\n"));
    }

    #[test]
    fn a_given_host_wins_and_framing_headers_are_refused() {
        let mut given = parts(Method::POST, "hi");
        given
            .headers
            .insert(HOST, HeaderValue::from_static("example.test"));
        let (templates, _) = build(&["http://127.0.0.1:9/".into()], &given).unwrap();
        let text = std::str::from_utf8(templates[0].http1()).unwrap();
        assert_eq!(text.matches("host").count(), 1, "{text}");
        assert!(text.contains("host: example.test\r\n"));
        assert!(!templates[0].closes());
        let one = |name: &'static str, value: &'static str| {
            HeaderMap::from_iter([(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            )])
        };
        for (name, value) in [("content-length", "3"), ("transfer-encoding", "chunked")] {
            let err = check_headers(&one(name, value), false).unwrap_err();
            assert!(err.contains(name), "{err}");
        }
        assert!(check_headers(&one("connection", "close"), false).is_ok());
        for (name, value) in [("connection", "close"), ("te", "gzip"), ("keep-alive", "5")] {
            let err = check_headers(&one(name, value), true).unwrap_err();
            assert!(err.contains(name), "{err}");
        }
        assert!(check_headers(&one("te", "trailers"), true).is_ok());
        let mut closing = parts(Method::GET, "");
        closing
            .headers
            .insert(CONNECTION, HeaderValue::from_static("keep-alive, Close"));
        let (templates, _) = build(&["http://127.0.0.1:9/".into()], &closing).unwrap();
        assert!(templates[0].closes());
    }

    #[test]
    fn http2_requests_carry_the_full_uri() {
        let (templates, _) =
            build(&["http://127.0.0.1:9/p".into()], &parts(Method::GET, "")).unwrap();
        let request = templates[0].http2();
        assert_eq!(request.uri(), "http://127.0.0.1:9/p");
        assert!(!request.headers().contains_key(HOST));
    }
}
