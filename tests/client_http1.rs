//! The client-facing HTTP/1.1 side over raw TCP: keep-alive, pipelining, closing, HTTP/1.0,
//! HEAD, request and response framing, 100-continue, parse errors, idle timeout and graceful
//! shutdown. Responses are parsed here byte by byte, so a change of the server underneath
//! cannot silently change what a client sees.

mod support;

use std::convert::Infallible;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use support::*;

/// How long any single read on a test connection may block.
const READ_LIMIT: Duration = Duration::from_secs(5);
/// Size of the `/big` answer.
const BIG: usize = 5 * 1024 * 1024;

type AnswerBody = UnsyncBoxBody<Bytes, Infallible>;

/// An instance (hyper HTTP/1.1 on its own thread) whose answers tell what it was asked:
/// `/body` answers `len=N;BODY`, `/stream` streams three parts with no length, `/no-content`
/// 204, `/not-modified` 304, `/big` [`BIG`] patterned bytes, anything else `path=PATH`.
fn instance() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    hyper_util::rt::TokioIo::new(stream),
                    hyper::service::service_fn(answer),
                ));
            }
        });
    });
    addr
}

async fn answer(req: http::Request<Incoming>) -> Result<http::Response<AnswerBody>, Infallible> {
    let path = req.uri().path().to_string();
    let sized = |status: u16, body: Vec<u8>| {
        http::Response::builder()
            .status(status)
            .header("content-length", body.len())
            .body(Full::new(Bytes::from(body)).boxed_unsync())
            .unwrap()
    };
    let response = match path.as_str() {
        "/body" => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut out = format!("len={};", body.len()).into_bytes();
            out.extend_from_slice(&body);
            sized(200, out)
        }
        "/stream" => {
            let parts = futures_util::stream::unfold(0, |i| async move {
                if i == 3 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let frame = Frame::data(Bytes::from(format!("part{i};")));
                Some((Ok::<_, Infallible>(frame), i + 1))
            });
            http::Response::new(StreamBody::new(parts).boxed_unsync())
        }
        "/no-content" => http::Response::builder()
            .status(204)
            .body(Full::new(Bytes::new()).boxed_unsync())
            .unwrap(),
        "/not-modified" => http::Response::builder()
            .status(304)
            .header("etag", "\"v1\"")
            .body(Full::new(Bytes::new()).boxed_unsync())
            .unwrap(),
        "/big" => sized(200, big_body()),
        _ => sized(200, format!("path={path}").into_bytes()),
    };
    Ok(response)
}

fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

/// A gateway in front of one [`instance`], with more `[server]` keys.
fn gateway_to_instance(server_keys: &str) -> Gateway {
    let instance = instance();
    gateway_with_server_keys(server_keys, &app_config_at(&[instance], ""))
}

/// One answer as the client read it.
#[derive(Debug)]
struct Answer {
    status_line: String,
    status: u16,
    /// Names lowercased, in the order sent.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    chunked: bool,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw client connection that keeps unread bytes between answers (pipelining).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// A pause before each read, to make a slow reader.
    pace: Duration,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(READ_LIMIT)).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
            pace: Duration::ZERO,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads more into the buffer; 0 at end of stream (a reset counts as the end).
    fn fill(&mut self) -> usize {
        std::thread::sleep(self.pace);
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => 0,
            Err(e) => panic!(
                "read failed ({e}) with {:?} unread",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Takes one CRLF-terminated line (without the CRLF).
    fn line(&mut self) -> String {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.buf[..at].to_vec()).unwrap();
                self.buf.drain(..at + 2);
                return line;
            }
            assert!(
                self.fill() > 0,
                "closed mid-line: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill() > 0,
                "closed with {} of {n} bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one answer to a `method` request: 1xx, 204, 304 and HEAD answers have no body,
    /// then chunked, Content-Length, or until the close.
    fn answer(&mut self, method: &str) -> Answer {
        let status_line = self.line();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("header line has a colon");
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut answer = Answer {
            status_line,
            status,
            headers,
            body: Vec::new(),
            chunked: false,
        };
        if method == "HEAD" || status < 200 || status == 204 || status == 304 {
            return answer;
        }
        if answer
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            answer.chunked = true;
            loop {
                let size_line = self.line();
                let size = size_line.split(';').next().unwrap().trim();
                let size = usize::from_str_radix(size, 16).unwrap();
                if size == 0 {
                    while !self.line().is_empty() {}
                    break;
                }
                let data = self.take(size);
                answer.body.extend_from_slice(&data);
                assert_eq!(self.take(2), b"\r\n");
            }
        } else if let Some(length) = answer.header("content-length") {
            let length: usize = length.parse().unwrap();
            answer.body = self.take(length);
        } else {
            while self.fill() > 0 {}
            answer.body = std::mem::take(&mut self.buf);
        }
        answer
    }

    /// Sends one request and reads its answer.
    fn exchange(&mut self, method: &str, request: &str) -> Answer {
        self.send(request.as_bytes());
        self.answer(method)
    }

    /// True when nothing more was sent and the server closed the connection.
    fn closed(&mut self) -> bool {
        self.buf.is_empty() && self.fill() == 0
    }
}

fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
}

/// The gateway's own `[server]` table with a long shutdown grace, for the SIGTERM test.
fn config_with_long_grace(instance: SocketAddr) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = false\n\
         shutdown_grace = \"20s\"\n\n\
         [upstreams.app]\ninstances = [\"{instance}\"]\n\n[[routes]]\nupstream = \"app\"\n"
    )
}

fn assert_ok(answer: &Answer, body: &str) {
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.text(), body, "{answer:?}");
}

fn keeps_alive(answer: &Answer) -> bool {
    !answer
        .header("connection")
        .is_some_and(|c| c.eq_ignore_ascii_case("close"))
}

#[test]
fn sequential_requests_share_one_keep_alive_connection() {
    let gw = gateway_to_instance("");
    let mut conn = Conn::open(gw.proxy);
    let mut ids = Vec::new();
    for i in 0..5 {
        let answer = conn.exchange("GET", &get_request(&format!("/seq/{i}")));
        assert_eq!(answer.status_line, "HTTP/1.1 200 OK");
        assert_ok(&answer, &format!("path=/seq/{i}"));
        assert!(keeps_alive(&answer), "{answer:?}");
        ids.push(answer.header("x-request-id").unwrap().to_string());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "each request has its own id: {ids:?}");
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let gw = gateway_to_instance("");
    let mut conn = Conn::open(gw.proxy);
    conn.send(
        format!(
            "{}{}{}",
            get_request("/first"),
            get_request("/second"),
            get_request("/third")
        )
        .as_bytes(),
    );
    for path in ["/first", "/second", "/third"] {
        assert_ok(&conn.answer("GET"), &format!("path={path}"));
    }
    // Bodies in the pipeline end exactly where their framing says; a slow streamed answer in
    // the middle does not let the one behind it overtake.
    conn.send(
        b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
          GET /stream HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n\
          GET /last HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_ok(&conn.answer("POST"), "len=3;abc");
    assert_ok(&conn.answer("GET"), "part0;part1;part2;");
    assert_ok(&conn.answer("POST"), "len=2;de");
    assert_ok(&conn.answer("GET"), "path=/last");
}

#[test]
fn connection_close_from_the_client_is_answered_then_closed() {
    let gw = gateway_to_instance("");
    let mut conn = Conn::open(gw.proxy);
    let answer = conn.exchange(
        "GET",
        "GET /bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_ok(&answer, "path=/bye");
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(conn.closed());
}

#[test]
fn http10_requests_close_unless_keep_alive_is_asked() {
    let gw = gateway_to_instance("");
    // RFC 9110 2.5: the server's own version in the status line, whatever the client's.
    let mut conn = Conn::open(gw.proxy);
    let answer = conn.exchange("GET", "GET /old HTTP/1.0\r\n\r\n");
    assert_eq!(answer.status_line, "HTTP/1.1 200 OK", "{answer:?}");
    assert_ok(&answer, "path=/old");
    assert!(conn.closed());

    let mut conn = Conn::open(gw.proxy);
    let answer = conn.exchange("GET", "GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_ok(&answer, "path=/a");
    assert!(
        answer
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("keep-alive")),
        "an HTTP/1.0 client closes unless told keep-alive: {answer:?}"
    );
    let answer = conn.exchange("GET", "GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_ok(&answer, "path=/b");
    let answer = conn.exchange("GET", "GET /c HTTP/1.0\r\n\r\n");
    assert_ok(&answer, "path=/c");
    assert!(conn.closed());

    // An answer of unknown length is never chunked for HTTP/1.0: the close ends it, even when
    // the client asked to keep the connection, and then keep-alive is not promised (RFC 9112
    // 9.3 and C.2.2: keep-alive means the connection persists).
    for asked in ["", "Connection: keep-alive\r\n"] {
        let mut conn = Conn::open(gw.proxy);
        let answer = conn.exchange("GET", &format!("GET /stream HTTP/1.0\r\n{asked}\r\n"));
        assert_eq!(answer.header("transfer-encoding"), None, "{answer:?}");
        assert_eq!(answer.header("content-length"), None, "{answer:?}");
        assert!(
            !answer
                .header("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("keep-alive")),
            "{answer:?}"
        );
        assert_ok(&answer, "part0;part1;part2;");
        assert!(conn.closed());
    }
}

#[test]
fn head_answers_carry_the_length_but_no_body() {
    let gw = gateway_to_instance("");
    let mut conn = Conn::open(gw.proxy);
    let answer = conn.exchange("HEAD", "HEAD /sized HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("content-length"),
        Some("path=/sized".len().to_string().as_str())
    );
    // Any body bytes after the HEAD answer would be read as the next status line.
    assert_ok(&conn.exchange("GET", &get_request("/next")), "path=/next");
    // The same pipelined.
    conn.send(
        format!(
            "HEAD /sized HTTP/1.1\r\nHost: x\r\n\r\n{}",
            get_request("/after")
        )
        .as_bytes(),
    );
    assert_eq!(conn.answer("HEAD").status, 200);
    assert_ok(&conn.answer("GET"), "path=/after");
}

#[test]
fn a_chunked_body_with_extensions_and_trailers_arrives_intact() {
    let gw = gateway_to_instance("");
    let mut conn = Conn::open(gw.proxy);
    conn.send(
        format!(
            "POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             3;name=value\r\nabc\r\nA\r\n0123456789\r\n2;x\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n{}",
            get_request("/after")
        )
        .as_bytes(),
    );
    assert_ok(&conn.answer("POST"), "len=15;abc0123456789de");
    assert_ok(&conn.answer("GET"), "path=/after");
}

#[test]
fn a_sized_body_sent_in_delayed_pieces_arrives_complete() {
    let gw = gateway_to_instance("");
    let mut conn = Conn::open(gw.proxy);
    conn.send(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n");
    for piece in ["abc", "def", "ghi"] {
        std::thread::sleep(Duration::from_millis(50));
        conn.send(piece.as_bytes());
    }
    assert_ok(&conn.answer("POST"), "len=9;abcdefghi");
    assert_ok(&conn.exchange("GET", &get_request("/next")), "path=/next");
}

#[test]
fn expect_100_continue_gets_the_interim_answer_before_the_body() {
    let gw = gateway_to_instance("max_body = \"1KiB\"");
    let mut conn = Conn::open(gw.proxy);
    let interim = conn.exchange(
        "POST",
        "POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    );
    assert_eq!(interim.status_line, "HTTP/1.1 100 Continue");
    conn.send(b"hello");
    assert_ok(&conn.answer("POST"), "len=5;hello");
    assert_ok(&conn.exchange("GET", &get_request("/next")), "path=/next");

    // A body refused by its announced length gets the final answer instead of 100, and the
    // connection closes since the body was never read.
    let mut conn = Conn::open(gw.proxy);
    let answer = conn.exchange(
        "POST",
        "POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
    );
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(conn.closed());
}

/// A chunk whose declared size takes the body over `max_body` is refused when its size line is
/// read, as nginx refuses it, not once that much data went to the instance: a client that
/// stopped there held the request until `body_read_timeout`.
#[test]
fn a_chunk_declared_over_max_body_is_refused_on_its_size_line() {
    let gw = gateway_to_instance("max_body = \"1KiB\"");
    let mut conn = Conn::open(gw.proxy);
    conn.send(
        b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    );
    std::thread::sleep(Duration::from_millis(200));
    // The size line alone: nothing of the chunk's data comes.
    conn.send(b"100000\r\n");
    let answer = conn.answer("POST");
    assert_eq!(answer.status, 413, "{answer:?}");
}

/// A request refused without its body being read (here: no API key) whose client asked for
/// 100 Continue but sent the body along anyway keeps its connection: the body is all there to
/// drop, and the request pipelined behind it is answered (nginx does the same). One whose body
/// has not come yet closes it, as the client may never send it.
#[test]
fn a_refused_expect_request_whose_body_came_along_keeps_the_connection() {
    let config = format!(
        "[auth]\napi_keys = [\"key-00000001\"]\n{}\n[[routes]]\npath_prefix = \"/private\"\nupstream = \"app\"\nauth = \"api_key\"\n",
        app_config_at(&[instance()], "")
    );
    let gw = gateway(&config);
    let mut conn = Conn::open(gw.proxy);
    conn.send(
        b"POST /private HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc\
          GET /next HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let refused = conn.answer("POST");
    assert_eq!(refused.status, 401, "{refused:?}");
    assert!(keeps_alive(&refused), "{refused:?}");
    assert_ok(&conn.answer("GET"), "path=/next");

    let mut conn = Conn::open(gw.proxy);
    let refused = conn.exchange(
        "POST",
        "POST /private HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
    );
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(refused.header("connection"), Some("close"));
    assert!(conn.closed());
}

/// 414 is for a target over `max_uri_length`, not for a request line whose method and version
/// take it over: a head too large with such a target is a 431.
#[test]
fn a_target_within_its_limit_in_a_head_too_large_is_a_431() {
    let gw = gateway_to_instance("max_header_size = \"8KiB\"\nmax_uri_length = \"1KiB\"");
    let big = "y".repeat(16 * 1024);
    for (target_len, status) in [(1020, 431), (1100, 414)] {
        let target = format!("/{}", "t".repeat(target_len - 1));
        let mut conn = Conn::open(gw.proxy);
        let answer = conn.exchange(
            "GET",
            &format!("GET {target} HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"),
        );
        assert_eq!(answer.status, status, "{target_len}: {answer:?}");
    }
}

#[test]
fn oversized_heads_get_431_and_malformed_ones_400_then_the_close() {
    let gw = gateway_to_instance("max_header_size = \"8KiB\"");
    let mut conn = Conn::open(gw.proxy);
    let big = "y".repeat(16 * 1024);
    let answer = conn.exchange(
        "GET",
        &format!("GET /big-head HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"),
    );
    assert_eq!(answer.status, 431, "{answer:?}");
    assert!(conn.closed());
    // A HEAD refused before its fields were read gets no body either (RFC 9110 §9.3.2), also
    // after the empty line a request may follow.
    for before in ["", "\r\n"] {
        let mut conn = Conn::open(gw.proxy);
        let answer = conn.exchange(
            "HEAD",
            &format!("{before}HEAD /big-head HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"),
        );
        assert_eq!(answer.status, 431, "{answer:?}");
        assert!(conn.closed(), "a body came after the HEAD's 431");
    }

    for malformed in [
        "GET\r\n\r\n",
        "\x01\x02 garbage\r\n\r\n",
        "GET / HTTX/1.1\r\n\r\n",
    ] {
        let mut conn = Conn::open(gw.proxy);
        let answer = conn.exchange("GET", malformed);
        assert_eq!(answer.status, 400, "{malformed:?}: {answer:?}");
        assert!(conn.closed(), "{malformed:?}");
    }
    let mut conn = Conn::open(gw.proxy);
    let answer = conn.exchange("GET", "GET / HTTP/9.9\r\n\r\n");
    assert_eq!(answer.status, 505, "{answer:?}");
    assert!(conn.closed());
}

#[test]
fn unsized_empty_and_not_modified_answers_keep_the_connection_usable() {
    let gw = gateway_to_instance("");
    let mut conn = Conn::open(gw.proxy);
    let streamed = conn.exchange("GET", &get_request("/stream"));
    assert_ok(&streamed, "part0;part1;part2;");
    assert_eq!(streamed.header("content-length"), None);
    // Chunked for an HTTP/1.1 client, so the same connection carries on.
    assert!(streamed.chunked, "{streamed:?}");

    let empty = conn.exchange("GET", &get_request("/no-content"));
    assert_eq!(empty.status_line, "HTTP/1.1 204 No Content");
    // RFC 9110 8.6 and RFC 9112 6.1: neither length field on a 204.
    assert_eq!(empty.header("content-length"), None, "{empty:?}");
    assert_eq!(empty.header("transfer-encoding"), None, "{empty:?}");
    assert_ok(
        &conn.exchange("GET", &get_request("/after-204")),
        "path=/after-204",
    );

    let not_modified = conn.exchange(
        "GET",
        "GET /not-modified HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"v1\"\r\n\r\n",
    );
    assert_eq!(not_modified.status_line, "HTTP/1.1 304 Not Modified");
    assert_eq!(not_modified.header("etag"), Some("\"v1\""));
    assert_eq!(not_modified.header("transfer-encoding"), None);
    assert_ok(
        &conn.exchange("GET", &get_request("/after-304")),
        "path=/after-304",
    );
}

#[test]
fn idle_keep_alive_connections_close_after_the_idle_timeout() {
    // Between requests `server.idle_timeout` applies (nginx's keepalive_timeout), not the
    // longer header_read_timeout set here.
    let gw = gateway_to_instance("idle_timeout = \"1s\"\nheader_read_timeout = \"30s\"");
    let mut conn = Conn::open(gw.proxy);
    assert_ok(&conn.exchange("GET", &get_request("/once")), "path=/once");
    // The read limit (5 s) bounds the wait; the close comes with no answer bytes.
    assert!(conn.closed());
}

#[test]
fn a_connection_that_never_sends_a_byte_closes_after_the_header_read_timeout() {
    let gw = gateway_to_instance("header_read_timeout = \"1s\"");
    let mut conn = Conn::open(gw.proxy);
    assert!(conn.closed());
}

#[test]
fn sigterm_closes_idle_keep_alive_connections_and_exits_zero() {
    let mut gw = gateway(&config_with_long_grace(instance()));
    let mut idle = Conn::open(gw.proxy);
    assert_ok(&idle.exchange("GET", &get_request("/once")), "path=/once");
    let mut late = Conn::open(gw.proxy);
    assert_ok(&late.exchange("GET", &get_request("/once")), "path=/once");
    signal(gw.proc.pid(), "TERM");
    // A request sent as the drain began (the client could not know) is still served, and the
    // connection closes after it.
    let draining = std::time::Instant::now() + Duration::from_secs(5);
    while !raw_exchange(
        gw.admin,
        b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .starts_with("HTTP/1.1 503")
    {
        assert!(
            std::time::Instant::now() < draining,
            "the gateway did not drain"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = late.exchange("GET", &get_request("/late"));
    assert_ok(&answer, "path=/late");
    assert!(!keeps_alive(&answer));
    assert!(late.closed());
    // Closed within the read limit, well before the 20 s grace would force it.
    assert!(idle.closed());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = gw.proc.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway waited for the grace with only idle connections open"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_large_answer_read_slowly_arrives_complete_then_the_connection_is_reused() {
    let gw = gateway_to_instance("");
    let mut conn = Conn::open(gw.proxy);
    conn.send(get_request("/big").as_bytes());
    // Let every buffer on the way fill up before the client starts draining them slowly.
    std::thread::sleep(Duration::from_millis(300));
    conn.pace = Duration::from_millis(1);
    let answer = conn.answer("GET");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body.len(), BIG);
    assert!(answer.body == big_body(), "the body's bytes differ");
    conn.pace = Duration::ZERO;
    assert_ok(&conn.exchange("GET", &get_request("/next")), "path=/next");
}

#[test]
fn a_slow_steady_reader_is_not_cut_off_by_the_idle_timeout() {
    // About 400 kB/s against an idle_timeout of 2 s. The kernel wakes a blocked writer only once
    // the bytes it has not yet sent fall under the socket's low-water mark; by default that is a
    // third of a send buffer of megabytes on loopback, which takes this reader seconds, so the
    // gateway saw no progress for the whole timeout and cut it off. With the gateway's mark it
    // sees progress about every 0.3 s.
    let gw = gateway_to_instance("idle_timeout = \"2s\"");
    let mut conn = Conn::open(gw.proxy);
    conn.send(get_request("/big").as_bytes());
    conn.pace = Duration::from_millis(40);
    let slow_until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < slow_until {
        assert!(conn.fill() > 0, "closed after {} bytes", conn.buf.len());
    }
    // Then the rest at full speed: a connection cut off during the slow part ends short.
    conn.pace = Duration::ZERO;
    let answer = conn.answer("GET");
    assert_eq!(answer.status, 200);
    assert!(answer.body == big_body(), "the body's bytes differ");
}

#[test]
fn a_client_that_stops_reading_is_cut_off_after_the_idle_timeout() {
    let gw = gateway_to_instance("idle_timeout = \"1s\"");
    let mut conn = Conn::open(gw.proxy);
    conn.send(get_request("/big").as_bytes());
    // Not reading: the socket buffers fill far short of 5 MiB and the gateway's writes stall.
    std::thread::sleep(Duration::from_secs(3));
    // What the gateway wrote before it gave up, then the close (a stuck connection would
    // instead time the read out and fail the test).
    let mut total = 0;
    loop {
        match conn.fill() {
            0 => break,
            read => total += read,
        }
        conn.buf.clear();
    }
    assert!(total > 0 && total < BIG, "read {total} bytes");
}

#[test]
fn gateway_errors_carry_the_request_id_and_keep_the_connection() {
    let live = instance();
    let dead = dead_addr();
    let gw = gateway(&format!(
        "[upstreams.app]\ninstances = [\"{live}\"]\n[upstreams.dead]\ninstances = [\"{dead}\"]\n\n\
         [[routes]]\npath_prefix = \"/only\"\nupstream = \"app\"\n\
         [[routes]]\npath_prefix = \"/dead\"\nupstream = \"dead\"\n"
    ));
    let mut conn = Conn::open(gw.proxy);
    let check = |answer: &Answer, status: u16, error: &str| {
        assert_eq!(answer.status, status, "{answer:?}");
        let id = answer.header("x-request-id").expect("x-request-id");
        assert!(!id.is_empty());
        let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(json["error"], error);
        assert_eq!(json["request_id"], id);
        // The gateway is the origin of this answer (RFC 9110 6.6.1).
        assert!(answer.header("date").is_some(), "{answer:?}");
        assert!(keeps_alive(answer), "{answer:?}");
    };

    let not_found = conn.exchange(
        "GET",
        "GET /elsewhere HTTP/1.1\r\nHost: x\r\nX-Request-Id: client-7\r\n\r\n",
    );
    check(&not_found, 404, "no_route");
    assert_eq!(not_found.header("x-request-id"), Some("client-7"));
    assert_ok(
        &conn.exchange("GET", &get_request("/only/x")),
        "path=/only/x",
    );

    let bad_gateway = conn.exchange("GET", &get_request("/dead/x"));
    check(&bad_gateway, 502, "bad_gateway");
    assert_ne!(
        bad_gateway.header("x-request-id"),
        not_found.header("x-request-id")
    );
    assert_ok(
        &conn.exchange("GET", &get_request("/only/y")),
        "path=/only/y",
    );
}

#[test]
fn the_rest_of_a_body_answered_early_is_discarded_and_the_connection_kept() {
    // The demo instance answers /echo without reading the body.
    let demo = demo_backend(&[]);
    let gw = gateway(&app_config(&[&demo], ""));
    let mut conn = Conn::open(gw.proxy);
    conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n");
    conn.send(&[b'a'; 1000]);
    let answer = conn.answer("POST");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(keeps_alive(&answer), "{answer:?}");
    // The body's other 99,000 bytes come after the answer; then a next request.
    conn.send(&[b'a'; 99_000]);
    let next = conn.exchange("GET", &get_request("/echo"));
    assert_eq!(next.status, 200, "{next:?}");
}

/// A chunked body answered early, its end not here yet, closes the connection and the answer
/// says so: how much more comes is not known (the discard gave up past 1 MiB and closed a
/// connection the answer had kept alive). One whose end came along is dropped and the
/// connection kept.
#[test]
fn a_chunked_body_answered_early_keeps_the_connection_only_when_its_end_is_here() {
    // The demo instance answers /echo without reading the body.
    let demo = demo_backend(&[]);
    let gw = gateway(&app_config(&[&demo], ""));
    let mut conn = Conn::open(gw.proxy);
    conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n");
    conn.send(&[b'a'; 4096]);
    conn.send(b"\r\n");
    let answer = conn.answer("POST");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(!keeps_alive(&answer), "{answer:?}");

    let mut conn = Conn::open(gw.proxy);
    let mut whole =
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n".to_vec();
    whole.extend_from_slice(&[b'a'; 4096]);
    whole.extend_from_slice(b"\r\n0\r\n\r\n");
    conn.send(&whole);
    let answer = conn.answer("POST");
    assert!(keeps_alive(&answer), "{answer:?}");
    let next = conn.exchange("GET", &get_request("/echo"));
    assert_eq!(next.status, 200, "{next:?}");
}
