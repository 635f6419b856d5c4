//! Bench targets: the URLs checked once up front and turned into request templates, so each
//! request is a few reference-count bumps instead of parsing and formatting.

use std::net::{SocketAddr, ToSocketAddrs};

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
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
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Template {
    /// A fresh request: the URI, header map and body are cheap clones of the template's.
    pub fn request(&self) -> Request<Full<Bytes>> {
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
    pub http2: bool,
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
    let port = authority.port_u16().unwrap_or(80);
    let path_and_query = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Ok(ParsedUrl {
        authority,
        port,
        path_and_query,
    })
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
    (host, parsed.port)
        .to_socket_addrs()
        .map_err(|err| format!("`{url}`: cannot resolve `{host}`: {err}"))?
        .next()
        .ok_or_else(|| format!("`{url}`: `{host}` has no address"))
}

/// HTTP/1.1 sends the origin form with a Host header; HTTP/2 sends the full URI (its
/// `:authority`), so no Host header is added there.
fn template(origin: usize, parsed: ParsedUrl, parts: &RequestParts) -> Template {
    let mut headers = parts.headers.clone();
    let uri = if parts.http2 {
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(parsed.authority)
            .path_and_query(parsed.path_and_query)
            .build()
            .expect("parts of a parsed URI form a URI")
    } else {
        if !headers.contains_key(HOST) {
            let host = HeaderValue::from_str(parsed.authority.as_str())
                .expect("a parsed authority is a valid header value");
            headers.insert(HOST, host);
        }
        Uri::from(parsed.path_and_query)
    };
    Template {
        origin,
        method: parts.method.clone(),
        uri,
        headers,
        body: parts.body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(http2: bool) -> RequestParts {
        RequestParts {
            method: Method::POST,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"hi"),
            http2,
        }
    }

    #[test]
    fn urls_are_checked() {
        let parsed = parse_url("http://127.0.0.1:8080/a?b=1").unwrap();
        assert_eq!(parsed.port, 8080);
        assert_eq!(parsed.path_and_query.as_str(), "/a?b=1");
        assert_eq!(parse_url("http://localhost").unwrap().port, 80);
        assert_eq!(parse_url("http://localhost").unwrap().path_and_query, "/");
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
    fn same_authority_shares_an_origin() {
        let urls = vec![
            "http://127.0.0.1:9/a".to_string(),
            "http://127.0.0.1:9/b".to_string(),
            "http://127.0.0.1:10/".to_string(),
        ];
        let (templates, origins) = build(&urls, &parts(false)).unwrap();
        assert_eq!(origins.len(), 2);
        assert_eq!(
            templates.iter().map(|t| t.origin).collect::<Vec<_>>(),
            [0, 0, 1]
        );
        assert_eq!(origins[1].addr, "127.0.0.1:10".parse().unwrap());
    }

    #[test]
    fn http1_requests_carry_host_and_origin_form() {
        let (templates, _) = build(&["http://127.0.0.1:9/p?q".into()], &parts(false)).unwrap();
        let request = templates[0].request();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "/p?q");
        assert_eq!(request.headers()[HOST], "127.0.0.1:9");
    }

    #[test]
    fn a_given_host_header_wins() {
        let mut given = parts(false);
        given
            .headers
            .insert(HOST, HeaderValue::from_static("example.test"));
        let (templates, _) = build(&["http://127.0.0.1:9/".into()], &given).unwrap();
        assert_eq!(templates[0].request().headers()[HOST], "example.test");
    }

    #[test]
    fn http2_requests_carry_the_full_uri() {
        let (templates, _) = build(&["http://127.0.0.1:9/p".into()], &parts(true)).unwrap();
        let request = templates[0].request();
        assert_eq!(request.uri(), "http://127.0.0.1:9/p");
        assert!(!request.headers().contains_key(HOST));
    }
}
