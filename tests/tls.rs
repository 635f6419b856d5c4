//! TLS termination end to end, with a test CA made by rcgen: SNI picks the certificate, ALPN
//! offers h2 and http/1.1, instances see X-Forwarded-Proto https, HSTS and the HTTP→HTTPS
//! redirect, and a bad certificate is refused at start naming its key.

mod support;

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use rustls::pki_types::ServerName;
use support::*;

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    name: &str,
) -> TlsStream {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap_or_else(|err| panic!("TLS handshake as {name}: {err}"))
}

/// Sends GET /echo over the stream with HTTP/2 or HTTP/1.1 as negotiated; returns
/// (status, headers, body as JSON).
async fn echo(stream: TlsStream, host: &str) -> (u16, http::HeaderMap, serde_json::Value) {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = hyper_util::rt::TokioIo::new(stream);
    let uri = format!("https://{host}/echo");
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(uri)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        sender.send_request(req).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("/echo")
            .header("host", host)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        sender.send_request(req).await.unwrap()
    };
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        serde_json::from_slice(&body).unwrap(),
    )
}

/// A gateway with an HTTPS listener for `a.test`, its certificate issued by `ca` into `dir`, in
/// front of `backend`; `route_tail` adds keys to the route.
fn https_gateway(ca: &TestCa, dir: &std::path::Path, backend: &Proc, route_tail: &str) -> Gateway {
    ca.issue(dir, "a.test", &["a.test"], &[]);
    let d = dir.display();
    let config = format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\n\
         [[tls.certificates]]\ncert = \"{d}/a.test.pem\"\nkey = \"{d}/a.test.key\"\nnames = [\"a.test\"]\n\n\
         {}{route_tail}",
        app_config(&[backend], "")
    );
    gateway_announcing(&config, 3)
}

fn forwarded_proto(echo: &serde_json::Value) -> String {
    echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|pair| pair[0] == "x-forwarded-proto")
        .map(|pair| pair[1].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Answers depend on the scheme (X-Forwarded-Proto: redirects to HTTPS, absolute links): a
/// cached route keeps plain-HTTP and HTTPS clients' entries apart, as nginx's default key does.
#[tokio::test]
async fn cached_answers_never_cross_schemes() {
    let (ca, dir) = (TestCa::new(), tempfile::tempdir().unwrap());
    let backend = demo_backend(&[]);
    let gw = https_gateway(&ca, dir.path(), &backend, "cache = { ttl = \"60s\" }\n");
    let plain = get(&client(), &gw.url("/echo")).await;
    assert_eq!(plain.header("x-cache-status"), "MISS");
    assert_eq!(forwarded_proto(&plain.json()), "http");
    let h1_only = ca.connector(&[b"http/1.1"]);
    for expected in ["MISS", "HIT"] {
        let stream = connect(&h1_only, gw.proc.named("tls"), "a.test").await;
        let (status, headers, body) = echo(stream, "a.test").await;
        assert_eq!(
            (status, &headers["x-cache-status"]),
            (200, &expected.parse().unwrap())
        );
        assert_eq!(forwarded_proto(&body), "https");
    }
}

#[tokio::test]
async fn sni_alpn_forwarded_proto_hsts_and_redirect() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let a_der = ca.issue(dir.path(), "a.test", &["a.test"], &[]);
    let b_der = ca.issue(dir.path(), "b.test", &["b.test"], &[]);
    let backend = demo_backend(&[]);
    let d = dir.path().display();
    let config = format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\nredirect_http = true\nhsts = \"max-age=31536000\"\n\
         [[tls.certificates]]\ncert = \"{d}/a.test.pem\"\nkey = \"{d}/a.test.key\"\nnames = [\"a.test\"]\n\
         [[tls.certificates]]\ncert = \"{d}/b.test.pem\"\nkey = \"{d}/b.test.key\"\nnames = [\"b.test\"]\n\n{}",
        app_config(&[&backend], "")
    );
    let gw = gateway_announcing(&config, 3);
    let tls_addr = gw.proc.named("tls");

    // SNI chooses the certificate; h2 is negotiated when offered.
    let h2_and_h1 = ca.connector(&[b"h2", b"http/1.1"]);
    let stream = connect(&h2_and_h1, tls_addr, "b.test").await;
    assert_eq!(stream.get_ref().1.peer_certificates().unwrap()[0], b_der);
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, headers, body) = echo(stream, "b.test").await;
    assert_eq!(status, 200);
    assert_eq!(forwarded_proto(&body), "https");
    assert_eq!(headers["strict-transport-security"], "max-age=31536000");
    assert!(headers.contains_key("x-request-id"));

    // http/1.1 over TLS, the other certificate.
    let h1_only = ca.connector(&[b"http/1.1"]);
    let stream = connect(&h1_only, tls_addr, "a.test").await;
    assert_eq!(stream.get_ref().1.peer_certificates().unwrap()[0], a_der);
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, _, body) = echo(stream, "a.test").await;
    assert_eq!(status, 200);
    assert_eq!(forwarded_proto(&body), "https");

    // Framing hyper's parser accepts but the gateway refuses (a doubled `chunked`) gets the same
    // 400 with a request ID over TLS as on the plain listener, and never reaches the instance.
    let mut stream = connect(&h1_only, tls_addr, "a.test").await;
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"POST /echo HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"request_id\""), "{answer}");

    // A plain HTTP request sent to the TLS port gets a 400 saying so, as nginx answers it,
    // rather than a TLS alert.
    let answer = raw_exchange(tls_addr, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("plain HTTP request was sent to the HTTPS port"),
        "{answer}"
    );
    assert!(answer.contains("\"request_id\""), "{answer}");

    // Plain HTTP is redirected to the same URL on the TLS port, and carries no HSTS.
    let reply = request(
        &client(),
        "GET",
        &gw.url("/path?q=1"),
        &[("host", "a.test:8080")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 308);
    assert_eq!(
        reply.header("location"),
        format!("https://a.test:{}/path?q=1", tls_addr.port())
    );
    assert!(reply.headers.get("strict-transport-security").is_none());
    assert!(!reply.header("x-request-id").is_empty());
    // Only a host that passes the checks every request's host passes is redirected to; a
    // request naming none is not served over plain HTTP either.
    let proxy = gw.proxy;
    for (head, status, location) in [
        ("GET /x HTTP/1.1\r\nHost: evil.example/abc\r\n", "400", None),
        ("GET /x HTTP/1.1\r\nHost: u:p@evil.example\r\n", "400", None),
        (
            "GET /x HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n",
            "400",
            None,
        ),
        ("GET /x HTTP/1.0\r\n", "400", None),
        (
            "GET /x HTTP/1.1\r\nHost: [::1]:8080\r\n",
            "308",
            Some("https://[::1]:"),
        ),
        (
            "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n",
            "405",
            None,
        ),
    ] {
        let sent = format!("{head}Connection: close\r\n\r\n");
        let answer = raw_exchange_off_thread(proxy, sent.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{head}: {answer}"
        );
        if let Some(location) = location {
            assert!(
                answer.contains(&format!("location: {location}")),
                "{head}: {answer}"
            );
        }
    }
    assert_eq!(backend_requests(&client(), &backend).await, 2);

    // SIGHUP reloads the certificate files; an open connection keeps working meanwhile.
    let open = connect(&h1_only, tls_addr, "a.test").await;
    let renewed = ca.issue(dir.path(), "a.test", &["a.test"], &[]);
    assert_ne!(renewed, a_der);
    signal(gw.proc.pid(), "HUP");
    let fresh_cert = eventually(std::time::Duration::from_secs(5), || async {
        let stream = connect(&h1_only, tls_addr, "a.test").await;
        stream.get_ref().1.peer_certificates().unwrap()[0] == renewed
    })
    .await;
    assert!(
        fresh_cert,
        "the renewed certificate was not served after SIGHUP"
    );
    let (status, _, _) = echo(open, "a.test").await;
    assert_eq!(status, 200);

    // Closing the HTTPS listener (or opening one) takes a restart: a reload without [tls] is
    // refused, saying so, and HTTPS keeps serving.
    gw.reload_with(&app_config(&[&backend], ""));
    let reload = request(&client(), "POST", &gw.admin_url("/api/reload"), &[], "")
        .await
        .unwrap();
    assert_eq!(reload.status, 422);
    let errors = reload.json()["errors"].to_string();
    assert!(
        errors.contains("tls.listen") && errors.contains("restart"),
        "{errors}"
    );
    let stream = connect(&h1_only, tls_addr, "a.test").await;
    let (status, _, _) = echo(stream, "a.test").await;
    assert_eq!(status, 200);
}

/// HTTPS clients on HTTP/1.1 get the gateway's own HTTP/1.1 rules, as on the plain listener:
/// smuggling-shaped framing and oversized heads are refused with a request ID; a 100 Continue
/// comes when the body is wanted; upgrades tunnel; keep-alive carries the next request; every
/// close sends TLS's close_notify first, so an answer read to the close is known whole.
#[tokio::test]
async fn https_clients_on_http1_get_the_plain_listeners_rules() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ca, dir) = (TestCa::new(), tempfile::tempdir().unwrap());
    let backend = demo_backend(&[]);
    let gw = https_gateway(&ca, dir.path(), &backend, "");
    let tls_addr = gw.proc.named("tls");
    let h1_only = ca.connector(&[b"http/1.1"]);
    // One request on a new connection made by `connector`; the answer read to the close.
    let answer_to = |connector: tokio_rustls::TlsConnector, request: Vec<u8>| {
        async move {
            let mut stream = connect(&connector, tls_addr, "a.test").await;
            stream.write_all(&request).await.unwrap();
            let mut answer = Vec::new();
            // Unwrapped: a close without TLS's close_notify alert is an error to the client.
            stream.read_to_end(&mut answer).await.unwrap();
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let both = b"POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\
        Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let answer = answer_to(h1_only.clone(), both.to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"request_id\""), "{answer}");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: {}\r\n\r\n",
        "b".repeat(40_000)
    );
    let answer = answer_to(h1_only.clone(), huge.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(answer.contains("\"request_id\""), "{answer}");
    assert_eq!(backend_requests(&client(), &backend).await, 0);
    // A client that offers only http/1.0 by ALPN (curl --http1.0) is served, not refused.
    let http10 = b"GET /echo HTTP/1.0\r\nHost: a.test\r\n\r\n".to_vec();
    let answer = answer_to(ca.connector(&[b"http/1.0"]), http10).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // 100 Continue, then the answer to the body, then the next request on the same connection.
    let mut stream = connect(&h1_only, tls_addr, "a.test").await;
    let head = b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n";
    stream.write_all(head).await.unwrap();
    let mut continued = [0u8; 25];
    stream.read_exact(&mut continued).await.unwrap();
    assert_eq!(&continued, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").await.unwrap();
    stream
        .write_all(b"GET /echo HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answers = Vec::new();
    stream.read_to_end(&mut answers).await.unwrap();
    let answers = String::from_utf8_lossy(&answers);
    assert!(answers.starts_with("HTTP/1.1 200"), "{answers}");
    assert!(answers.contains("x-body-received: 5\r\n"), "{answers}");
    assert!(answers.contains("x-forwarded-proto"), "{answers}");

    // An upgrade becomes a tunnel through the TLS session.
    let mut stream = connect(&h1_only, tls_addr, "a.test").await;
    let upgrade =
        b"GET /upgrade HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
    stream.write_all(upgrade).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
}

#[test]
fn a_bad_certificate_is_refused_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n\
         [upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\nupstream = \"app\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tls.cert"), "{stderr}");
    assert!(stderr.contains("/nonexistent/cert.pem"), "{stderr}");
    // The key file is checked too, and named under its own key.
    assert!(stderr.contains("tls.key"), "{stderr}");
    assert!(stderr.contains("/nonexistent/key.pem"), "{stderr}");
}

/// With `hsts` set, an instance's own Strict-Transport-Security is replaced by the gateway's,
/// not sent beside it (a client would get two policies).
#[tokio::test]
async fn the_gateway_s_hsts_replaces_the_instance_s() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let instance = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming().take(8) {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=1\r\nContent-Length: 2\r\n\r\nok";
                        if stream.write_all(answer).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    ca.issue(dir.path(), "a.test", &["a.test"], &[]);
    let d = dir.path().display();
    let config = format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\nhsts = \"max-age=31536000\"\ncert = \"{d}/a.test.pem\"\n\
         key = \"{d}/a.test.key\"\n\n{}",
        app_config_at(&[instance], "")
    );
    let gw = gateway_announcing(&config, 3);
    let stream = connect(
        &ca.connector(&[b"http/1.1"]),
        gw.proc.named("tls"),
        "a.test",
    )
    .await;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", "a.test")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let answer = sender.send_request(req).await.unwrap();
    let policies: Vec<_> = answer
        .headers()
        .get_all("strict-transport-security")
        .iter()
        .collect();
    assert_eq!(policies, ["max-age=31536000"]);
}

/// Clients resume their TLS sessions, also across a reload, which builds the TLS settings
/// anew: each reload used to start every client over with a full handshake.
#[tokio::test]
async fn tls_sessions_resume_across_reloads() {
    let (ca, dir) = (TestCa::new(), tempfile::tempdir().unwrap());
    let backend = demo_backend(&[]);
    let gw = https_gateway(&ca, dir.path(), &backend, "");
    let connector = ca.connector(&[b"http/1.1"]);
    let kind = |stream: &TlsStream| stream.get_ref().1.handshake_kind();
    let first = connect(&connector, gw.proc.named("tls"), "a.test").await;
    assert_eq!(kind(&first), Some(rustls::HandshakeKind::Full));
    // The request reads the tickets the gateway sent after the handshake.
    assert_eq!(echo(first, "a.test").await.0, 200);
    let again = connect(&connector, gw.proc.named("tls"), "a.test").await;
    assert_eq!(kind(&again), Some(rustls::HandshakeKind::Resumed));
    assert_eq!(echo(again, "a.test").await.0, 200);
    let reload = request(&client(), "POST", &gw.admin_url("/api/reload"), &[], "").await;
    assert_eq!(reload.unwrap().status, 200);
    let after = connect(&connector, gw.proc.named("tls"), "a.test").await;
    assert_eq!(kind(&after), Some(rustls::HandshakeKind::Resumed));
    assert_eq!(echo(after, "a.test").await.0, 200);
}

/// `path` over HTTP/1.1 on TLS as `a.test`, read 32 KiB at a time, `pause` after each read,
/// through a 16 KiB receive buffer: the answer's head and body size.
async fn read_over_tls(gw: &Gateway, ca: &TestCa, path: &str, pause: Duration) -> (String, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let tcp = socket.connect(gw.proc.named("tls")).await.unwrap();
    let name = ServerName::try_from("a.test".to_string()).unwrap();
    let connector = ca.connector(&[b"http/1.1"]);
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    let (mut answer, mut buf) = (Vec::new(), vec![0u8; 32 * 1024]);
    loop {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(read) => answer.extend_from_slice(&buf[..read]),
        }
        tokio::time::sleep(pause).await;
    }
    let body_at = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&answer[..body_at]).into_owned();
    (head, answer.len() - body_at)
}

/// A TLS client that reads a large cached answer slowly but steadily gets all of it: the
/// idle timeout is for a client that takes nothing, not for the whole answer.
#[tokio::test]
async fn a_slow_steady_tls_reader_gets_a_whole_cached_answer() {
    const SIZE: usize = 1_500_000;
    let (ca, dir) = (TestCa::new(), tempfile::tempdir().unwrap());
    let backend = demo_backend(&[]);
    ca.issue(dir.path(), "a.test", &["a.test"], &[]);
    let d = dir.path().display();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = false\n\
         idle_timeout = \"1s\"\n\
         [tls]\nlisten = \"127.0.0.1:0\"\n\
         [[tls.certificates]]\ncert = \"{d}/a.test.pem\"\nkey = \"{d}/a.test.key\"\nnames = [\"a.test\"]\n\n\
         {}cache = {{ ttl = \"60s\", max_body = \"2MiB\" }}\n",
        app_config(&[&backend], "")
    );
    let gw = gateway_announcing(&config, 3);
    let path = format!("/cache/big?bytes={SIZE}");
    let (head, filled) = read_over_tls(&gw, &ca, &path, Duration::ZERO).await;
    assert!(head.contains("x-cache-status: MISS"), "{head}");
    assert_eq!(filled, SIZE);
    // About 640 kB/s: 2.3 s for the answer, twice the idle timeout and more.
    let (head, read) = read_over_tls(&gw, &ca, &path, Duration::from_millis(50)).await;
    assert!(head.contains("x-cache-status: HIT"), "{head}");
    assert_eq!(read, SIZE, "cut off");
}

/// A certificate that does not cover a name it is served for is warned of by `check` (the file
/// stays valid, as `nginx -t` takes it); `/metrics` says when each certificate expires and counts
/// the client handshakes that failed.
#[tokio::test]
async fn certificate_troubles_are_said_and_counted() {
    let (ca, dir) = (TestCa::new(), tempfile::tempdir().unwrap());
    let backend = demo_backend(&[]);
    ca.issue(dir.path(), "a.test", &["a.test"], &[]);
    let d = dir.path().display();
    let config = format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\n\
         [[tls.certificates]]\ncert = \"{d}/a.test.pem\"\nkey = \"{d}/a.test.key\"\nnames = [\"a.test\", \"c.test\"]\n\n{}",
        app_config(&[&backend], "")
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &config).unwrap();
    let checked = std::process::Command::new(bin())
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "{said}");
    assert!(
        said.contains("warning: tls.certificates[0].cert: its certificate does not cover `c.test` (it names a.test)"),
        "{said}"
    );

    let gw = gateway_announcing(&config, 3);
    // TCP checks (connect, close) are no failed handshakes: the count below is the garbage's.
    for _ in 0..3 {
        drop(
            tokio::net::TcpStream::connect(gw.proc.named("tls"))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut garbage = tokio::net::TcpStream::connect(gw.proc.named("tls"))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    garbage
        .write_all(b"\x16\x03\x01\x00\x05hello")
        .await
        .unwrap();
    let _ = garbage.read(&mut [0; 64]).await;
    let client = client();
    let counted = eventually(Duration::from_secs(3), || async {
        let text = String::from_utf8_lossy(&get(&client, &gw.admin_url("/metrics")).await.body)
            .into_owned();
        text.contains("scalegate_tls_handshake_failures_total{reason=\"error\"} 1")
            && text.contains(
                "scalegate_tls_certificate_expiry_timestamp_seconds{certificate=\"tls.certificates[0].cert\"} ",
            )
    });
    assert!(counted.await);
}
