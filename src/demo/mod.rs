//! `scalegate demo-backend`: a tiny instance used by the quickstart, the tests and the benchmarks.
//!
//! Paths: `/health` (200, or 503 after `POST /__health/fail`), `/__stats` (requests and
//! connections seen),
//! `/echo` (the request head and HTTP version as JSON), `/upgrade` (101 to the asked protocol, then a byte
//! echo), `/cache...` (caching headers taken from the query: `cc`, `vary`, `set_cookie`,
//! `expires`, `last_modified`, `status`, `bytes`, `latency_ms`, `etag` (quoted unless it is; a matching If-None-Match
//! gets 304 without a body); the body says which request of the instance it was and the
//! varying header's value); anything else answers `body_bytes` bytes after
//! `latency_ms`, failing with 500 at `fail_rate`. Request bodies are read to the end and
//! their size returned in `x-body-received`, so uploads can be checked end to end.
//!
//! It speaks HTTP/1.1 and h2c (prior knowledge) on one port, or with `--tls-cert/--tls-key`
//! HTTPS (HTTP/1.1 or h2, by ALPN), requiring client certificates under `--tls-client-ca`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// A fraction from 0 to 1 (`nan` and `1.5` are refused rather than read as never or always).
fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("`{text}`: expected a number from 0.0 to 1.0")),
    }
}

/// How the demo instance behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoConfig {
    /// Port to listen on (0 picks a free one; the chosen address is printed first).
    #[arg(long, default_value_t = 3001)]
    pub port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Added latency per request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Size of the response body in bytes (at most 1 GiB: the body is held in memory).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(..=1 << 30))]
    pub body_bytes: u32,
    /// Fraction of requests (0.0–1.0) answered with 500.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub fail_rate: f64,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by the CA(s) in this PEM file (with --tls-cert).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

struct DemoState {
    config: DemoConfig,
    body: Bytes,
    port: u16,
    requests: AtomicU64,
    connections: AtomicU64,
    healthy: AtomicBool,
}

/// Binds the listener, prints `listening on ADDR` on stdout once it can serve (its TLS files
/// read: a script waiting for the line must not see it from an instance about to exit), and
/// serves until the process ends.
pub async fn run(config: DemoConfig) -> std::io::Result<()> {
    let tls = tls_acceptor(&config).map_err(std::io::Error::other)?;
    let listener = TcpListener::bind(SocketAddr::new(config.host, config.port)).await?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    serve(listener, tls, config).await
}

/// Serves the demo instance on a bound listener.
async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    config: DemoConfig,
) -> std::io::Result<()> {
    let port = listener.local_addr()?.port();
    let body = if config.body_bytes == 2 {
        Bytes::from_static(b"ok")
    } else {
        Bytes::from(vec![b'x'; config.body_bytes as usize])
    };
    let state = Arc::new(DemoState {
        config,
        body,
        port,
        requests: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        healthy: AtomicBool::new(true),
    });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(%err, "demo-backend accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        state.connections.fetch_add(1, Ordering::Relaxed);
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(tls) = tls else {
                return serve_connection(stream, state).await;
            };
            match tls.accept(stream).await {
                Ok(stream) => serve_connection(stream, state).await,
                Err(err) => tracing::debug!(%err, "demo-backend TLS handshake failed"),
            }
        });
    }
}

/// HTTP/1.1 or HTTP/2, whichever the client's first bytes say.
async fn serve_connection<IO>(stream: IO, state: Arc<DemoState>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(state.clone(), req));
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

/// The TLS acceptor for `--tls-cert`, offering h2 and http/1.1.
fn tls_acceptor(config: &DemoConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let certified = crate::tls::load_certificate(cert, key)?;
    let client_verifier = match &config.tls_client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(crate::tls::load_certificates(ca)?);
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                crate::tls::provider(),
            )
            .build()
            .map_err(|err| format!("--tls-client-ca: {err}"))?;
            Some(verifier)
        }
        None => None,
    };
    let certificate = crate::tls::TlsCertificate {
        names: Vec::new(),
        key: certified,
        config_key: "--tls-cert".into(),
        leaf: None,
    };
    let server = crate::tls::server_config(&[certificate], client_verifier);
    Ok(Some(tokio_rustls::TlsAcceptor::from(server)))
}

async fn handle(
    state: Arc<DemoState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let response = match (req.method().as_str(), path) {
        (_, "/health") => {
            if state.healthy.load(Ordering::Relaxed) {
                text(StatusCode::OK, Bytes::from_static(b"ok"))
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::from_static(b"failing"),
                )
            }
        }
        ("POST", "/__health/fail") => {
            state.healthy.store(false, Ordering::Relaxed);
            text(StatusCode::OK, Bytes::from_static(b"failing"))
        }
        ("POST", "/__health/ok") => {
            state.healthy.store(true, Ordering::Relaxed);
            text(StatusCode::OK, Bytes::from_static(b"ok"))
        }
        (_, "/__stats") => {
            let json = serde_json::json!({
                "port": state.port,
                "requests": state.requests.load(Ordering::Relaxed),
                "connections": state.connections.load(Ordering::Relaxed),
            });
            text(StatusCode::OK, Bytes::from(json.to_string()))
        }
        (_, "/upgrade") => upgrade_echo(&state, req),
        (_, "/echo") => {
            state.requests.fetch_add(1, Ordering::Relaxed);
            let headers: Vec<(String, String)> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            let json = serde_json::json!({
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "version": format!("{:?}", req.version()),
                "headers": headers,
                "port": state.port,
            });
            text(StatusCode::OK, Bytes::from(json.to_string()))
        }
        (_, path) if path.starts_with("/cache") => return Ok(cache_answer(state, req).await),
        _ => return Ok(answer(state, req).await),
    };
    Ok(response)
}

/// Answers an `Upgrade` request with 101 and then echoes every byte back until the peer closes,
/// whatever the protocol (enough to prove a proxy tunnels upgraded connections).
fn upgrade_echo(state: &DemoState, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let Some(protocol) = req.headers().get(http::header::UPGRADE).cloned() else {
        return text(StatusCode::BAD_REQUEST, Bytes::from_static(b"no Upgrade"));
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut reader, &mut writer).await;
        }
    });
    let mut response = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let headers = response.headers_mut();
    headers.insert(http::header::UPGRADE, protocol);
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    response
}

async fn answer(state: Arc<DemoState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let latency = query_u64(req.uri().query(), "latency_ms").unwrap_or(state.config.latency_ms);
    let mut body = req.into_body();
    let mut received: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    received += data.len() as u64;
                }
            }
            Err(_) => return text(StatusCode::BAD_REQUEST, Bytes::from_static(b"bad body")),
        }
    }
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let status = if state.config.fail_rate > 0.0 && rand::random::<f64>() < state.config.fail_rate {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let mut response = text(status, state.body.clone());
    let headers = response.headers_mut();
    headers.insert("x-instance", state.port.into());
    if received > 0 {
        headers.insert("x-body-received", received.into());
    }
    response
}

async fn cache_answer(state: Arc<DemoState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let seq = state.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let query: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(ms) = param("latency_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let varied = param("vary")
        .and_then(|name| req.headers().get(name))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let body = match param("bytes").and_then(|v| v.parse::<usize>().ok()) {
        Some(size) => Bytes::from(vec![b'c'; size]),
        None => Bytes::from(serde_json::json!({"n": seq, "vary": varied}).to_string()),
    };
    let status = param("status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(StatusCode::OK);
    // Quoted unless it already is (a weak `W/"x"` or a quoted `"x"` goes as given).
    let etag = param("etag").and_then(|tag| {
        let quoted = tag.starts_with('"') || tag.starts_with("W/\"");
        let tag = if quoted {
            tag.to_owned()
        } else {
            format!("\"{tag}\"")
        };
        http::HeaderValue::from_str(&tag).ok()
    });
    // If-None-Match as RFC 9110 §13.1.2 reads it (weak comparison, lists, `*`), by the cache's
    // own rule: one field compared byte for byte missed `"x"` against a `W/"x"` tag.
    let unchanged = etag.as_ref().is_some_and(|tag| {
        let mut asked = http::HeaderMap::new();
        for value in req.headers().get_all(http::header::IF_NONE_MATCH) {
            asked.append(http::header::IF_NONE_MATCH, value.clone());
        }
        let stored = http::HeaderMap::from_iter([(http::header::ETAG, tag.clone())]);
        let verdict = crate::cache::policy::precondition(&asked, StatusCode::OK, &stored);
        verdict == crate::cache::policy::Precondition::NotModified
    });
    let mut response = if unchanged {
        text(StatusCode::NOT_MODIFIED, Bytes::new())
    } else if matches!(status.as_u16(), 204 | 304) {
        // These carry no body (RFC 9110 §15.3.5, §15.4.5): over HTTP/2 one breaks the stream.
        text(status, Bytes::new())
    } else {
        text(status, body)
    };
    let headers = response.headers_mut();
    headers.insert("x-instance", state.port.into());
    if let Some(tag) = etag {
        headers.insert(http::header::ETAG, tag);
    }
    for (param_name, header) in [
        ("cc", http::header::CACHE_CONTROL),
        ("vary", http::header::VARY),
        ("set_cookie", http::header::SET_COOKIE),
        ("expires", http::header::EXPIRES),
        ("last_modified", http::header::LAST_MODIFIED),
    ] {
        if let Some(value) = param(param_name).and_then(|v| http::HeaderValue::from_str(v).ok()) {
            headers.insert(header, value);
        }
    }
    response
}

fn query_u64(query: Option<&str>, name: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse().ok())
}

fn text(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameter_is_read() {
        assert_eq!(query_u64(Some("a=1&latency_ms=25"), "latency_ms"), Some(25));
        assert_eq!(query_u64(Some("latency_ms=x"), "latency_ms"), None);
        assert_eq!(query_u64(None, "latency_ms"), None);
    }
}
