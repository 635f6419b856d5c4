//! The instance side over TLS and HTTP/2, end to end with a test CA made by rcgen and demo
//! backends serving HTTPS (`--tls-cert`), requiring client certificates (`--tls-client-ca`) or
//! speaking h2c: verification against the configured CA, pooled TLS connections, client
//! certificates, h2c and h2 (one multiplexed connection, large bodies both ways), health checks
//! over the same protocol, and upgrades refused towards HTTP/2.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use rcgen::ExtendedKeyUsagePurpose;
use rustls::pki_types::ServerName;
use support::*;

/// A test CA and the files it issued, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
}

impl Pki {
    fn new() -> Pki {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        Pki { dir, ca }
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// Issues `NAME.pem` and `NAME.key` for these subject names, for servers or clients.
    fn issue(&self, name: &str, sans: &[&str], purpose: ExtendedKeyUsagePurpose) {
        self.ca.issue(self.dir.path(), name, sans, &[purpose]);
    }

    /// A demo backend serving HTTPS with a certificate for 127.0.0.1 and `backend.test`.
    fn https_backend(&self, extra: &[&str]) -> Proc {
        self.issue(
            "server",
            &["127.0.0.1", "backend.test"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (cert, key) = (self.path("server.pem"), self.path("server.key"));
        let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
        args.extend_from_slice(extra);
        demo_backend(&args)
    }

    /// The demo backend's `/__stats`, asked directly over TLS.
    async fn stats(&self, backend: SocketAddr) -> serde_json::Value {
        let tcp = tokio::net::TcpStream::connect(backend).await.unwrap();
        let tls = self
            .ca
            .connector(&[])
            .connect(ServerName::try_from("backend.test").unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get("/__stats")
            .header("host", "backend.test")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let body = sender
            .send_request(request)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        serde_json::from_slice(&body).unwrap()
    }
}

/// One upstream `app` with these instance addresses and extra keys, and a catch-all route.
fn upstream(instances: &[String], keys: &str) -> String {
    let list: Vec<String> = instances.iter().map(|i| format!("\"{i}\"")).collect();
    format!(
        "[upstreams.app]\ninstances = [{}]\nmax_fails = 0\n{keys}\n\n[[routes]]\nupstream = \"app\"\n",
        list.join(", ")
    )
}

async fn echo_version(client: &Client, gw: &Gateway) -> String {
    let reply = get(client, &gw.url("/echo")).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.json()["version"].as_str().unwrap().to_string()
}

/// The last active check of the first instance, once there is one (at most 5 s).
async fn last_check(client: &Client, gw: &Gateway) -> serde_json::Value {
    for _ in 0..100 {
        let detailed = get(client, &gw.admin_url("/health/detailed")).await.json();
        let check = &detailed["upstreams"][0]["instances"][0]["last_check"];
        if !check.is_null() {
            return check.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no health check within 5 s");
}

#[tokio::test]
async fn https_instances_with_a_configured_ca_pool_their_connections() {
    let pki = Pki::new();
    let backend = pki.https_backend(&[]);
    let config = upstream(
        &[format!("https://{}", backend.addr())],
        &format!("tls = {{ ca = \"{}\" }}", pki.path("ca.pem")),
    );
    let gw = gateway(&config);
    let client = client();
    assert_eq!(echo_version(&client, &gw).await, "HTTP/1.1");
    for _ in 0..50 {
        let reply = get(&client, &gw.url("/hello")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(&reply.body[..], b"ok");
    }
    let stats = pki.stats(backend.addr()).await;
    assert_eq!(stats["requests"], 51, "{stats}");
    // 51 requests in sequence went over one pooled connection (the other is this test's own).
    assert_eq!(stats["connections"], 2, "{stats}");
}

#[tokio::test]
async fn a_wrong_ca_or_name_is_a_502_and_the_instance_sees_nothing() {
    let pki = Pki::new();
    let other = Pki::new();
    let backend = pki.https_backend(&[]);
    let instance = [backend.addr().to_string()];
    let wrong_ca = gateway(&upstream(
        &instance,
        &format!("tls = {{ ca = \"{}\" }}", other.path("ca.pem")),
    ));
    let wrong_name = gateway(&upstream(
        &instance,
        &format!(
            "tls = {{ ca = \"{}\", server_name = \"elsewhere.test\" }}",
            pki.path("ca.pem")
        ),
    ));
    let right_name = gateway(&upstream(
        &instance,
        &format!(
            "tls = {{ ca = \"{}\", server_name = \"backend.test\" }}",
            pki.path("ca.pem")
        ),
    ));
    let client = client();
    for gw in [&wrong_ca, &wrong_name] {
        let reply = get(&client, &gw.url("/hello")).await;
        assert_eq!(reply.status, 502, "{:?}", reply.body);
        assert!(
            reply.json()["reason"]
                .as_str()
                .unwrap()
                .contains("TLS handshake"),
            "{:?}",
            reply.body
        );
    }
    assert_eq!(pki.stats(backend.addr()).await["requests"], 0);
    assert_eq!(get(&client, &right_name.url("/hello")).await.status, 200);
    assert_eq!(pki.stats(backend.addr()).await["requests"], 1);
}

#[tokio::test]
async fn a_client_certificate_is_presented_when_configured() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    let backend = pki.https_backend(&["--tls-client-ca", &ca]);
    pki.issue(
        "client",
        &["gateway.test"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let instance = [format!("https://{}", backend.addr())];
    // Health checks go over TLS too, with the same client certificate (or without).
    let health = "health = { interval = \"200ms\" }";
    let without = gateway(&upstream(
        &instance,
        &format!("tls = {{ ca = \"{ca}\" }}\n{health}"),
    ));
    let with = gateway(&upstream(
        &instance,
        &format!(
            "tls = {{ ca = \"{ca}\", client_cert = \"{}\", client_key = \"{}\" }}\n{health}",
            pki.path("client.pem"),
            pki.path("client.key")
        ),
    ));
    let client = client();
    let refused = get(&client, &without.url("/hello")).await;
    assert!(
        [502, 503].contains(&refused.status),
        "{} {:?}",
        refused.status,
        refused.body
    );
    let reply = get(&client, &with.url("/hello")).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let check = last_check(&client, &with).await;
    assert_eq!(check["detail"], "status 200", "{check}");
    let check = last_check(&client, &without).await;
    assert_eq!(check["ok"], false, "{check}");
}

#[tokio::test]
async fn h2c_instances_get_http2_on_one_connection() {
    let backend = demo_backend(&[]);
    let gw = gateway(&upstream(
        &[backend.addr().to_string()],
        "protocol = \"h2c\"\nhealth = { interval = \"200ms\" }",
    ));
    let client = client();
    assert_eq!(echo_version(&client, &gw).await, "HTTP/2.0");
    // The gateway's own fields reach HTTP/2 instances too.
    let echo = get(&client, &gw.url("/echo")).await.json();
    let seen = |name: &str| {
        echo["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|pair| pair[0] == name)
    };
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    ] {
        assert!(seen(name), "{name} missing: {echo}");
    }
    // TE is hop-by-hop: the gateway says `te: trailers` on its own hop only for an HTTP/2
    // client that takes trailers (an HTTP/1.1 client's answer goes without them).
    let te_seen = |client: Client| {
        let url = gw.url("/echo");
        async move {
            let echo = request(&client, "GET", &url, &[("te", "trailers")], "")
                .await
                .unwrap()
                .json();
            let te: Vec<String> = echo["headers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|pair| pair[0] == "te")
                .map(|pair| pair[1].as_str().unwrap().to_owned())
                .collect();
            te
        }
    };
    assert!(!seen("te"), "{echo}");
    assert!(te_seen(support::client()).await.is_empty());
    assert_eq!(te_seen(h2c_client()).await, ["trailers"]);
    let check = last_check(&client, &gw).await;
    assert_eq!(check["detail"], "status 200", "{check}");
    let before = backend_connections(&client, &backend).await;
    let requests = (0..40).map(|_| {
        let client = client.clone();
        let url = gw.url("/hello?latency_ms=20");
        async move { get(&client, &url).await.status }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // The 40 concurrent requests shared the gateway's connection (health checks and this
    // test's own /__stats requests come on theirs).
    let after = backend_connections(&client, &backend).await;
    assert!(after - before <= 3, "{before} -> {after} connections");

    // Upgrades cannot cross HTTP/2: refused with a 502, the instance never asked.
    let asked = backend_requests(&client, &backend).await;
    let answer = raw_exchange(
        gw.proxy,
        b"GET /upgrade HTTP/1.1\r\nHost: a\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert_eq!(backend_requests(&client, &backend).await, asked);
}

/// Health checks over HTTP/2 carry the host in `:authority` only, as requests do: nginx answers
/// 400 to a `host` field beside it (a duplicate), and every instance it served was down.
#[tokio::test]
async fn http2_health_checks_send_no_host_field() {
    let instance = h2c_instance(|request, mut respond| {
        let status = if request.headers().contains_key(http::header::HOST) {
            400
        } else {
            200
        };
        let answer = http::Response::builder().status(status).body(()).unwrap();
        let _ = respond.send_response(answer, true);
    })
    .await;
    let gw = gateway(&upstream(
        &[instance.to_string()],
        "protocol = \"h2c\"\nhealth = { interval = \"200ms\", path = \"/ready\" }",
    ));
    let client = client();
    let check = last_check(&client, &gw).await;
    assert_eq!(check["detail"], "status 200", "{check}");
    assert_eq!(get(&client, &gw.url("/")).await.status, 200);
}

/// An h2c instance built on the h2 crate that answers every stream with `answer`.
async fn h2c_instance<F>(answer: F) -> SocketAddr
where
    F: Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<bytes::Bytes>)
        + Clone
        + Send
        + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((request, respond))) = conn.accept().await {
                    answer(request, respond);
                }
            });
        }
    });
    addr
}

/// An h2c instance that resets every stream with `reason`, counting them.
async fn resetting_h2c_instance(
    reason: h2::Reason,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let streams = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = streams.clone();
    let addr = h2c_instance(move |_, mut respond| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        respond.send_reset(reason);
    })
    .await;
    (addr, streams)
}

/// An HTTP/2 instance's answer that breaks the h2 rules (less body than its content-length)
/// reaches an HTTP/2 client as INTERNAL_ERROR, a failure on the gateway's side, not the
/// instance's PROTOCOL_ERROR, which would tell the client that it erred.
#[tokio::test]
async fn an_http2_instance_s_broken_answer_resets_the_client_s_stream_as_internal() {
    let short = h2c_instance(|_, mut respond| {
        let head = http::Response::builder()
            .header("content-length", "10")
            .body(())
            .unwrap();
        let mut body = respond.send_response(head, false).unwrap();
        let _ = body.send_data(bytes::Bytes::from_static(b"hello"), true);
    })
    .await;
    let gw = gateway(&upstream(&[short.to_string()], "protocol = \"h2c\""));
    let socket = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (sender, connection) = h2::client::handshake(socket).await.unwrap();
    tokio::spawn(connection);
    let mut sender = sender.ready().await.unwrap();
    let request = http::Request::get(gw.url("/x")).body(()).unwrap();
    let (answer, _) = sender.send_request(request, true).unwrap();
    let reason = match answer.await {
        Ok(answer) => {
            let mut body = answer.into_body();
            loop {
                match body.data().await {
                    Some(Ok(_)) => {}
                    Some(Err(err)) => break err.reason(),
                    None => break None,
                }
            }
        }
        Err(err) => err.reason(),
    };
    assert_eq!(reason, Some(h2::Reason::INTERNAL_ERROR));
}

/// An HTTP/2 instance that pauses inside its answer body past the response timeout: the client
/// gets what came, then the answer is cut off, and the request no longer counts as in flight.
#[tokio::test]
async fn a_paused_http2_answer_body_is_cut_off() {
    let stalling = h2c_instance(|_, mut respond| {
        let head = http::Response::builder()
            .header("content-length", "100")
            .body(())
            .unwrap();
        let mut body = respond.send_response(head, false).unwrap();
        body.send_data(bytes::Bytes::from_static(b"0123456789"), false)
            .unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(body);
        });
    })
    .await;
    let gw = gateway(&upstream(
        &[stalling.to_string()],
        "protocol = \"h2c\"\nresponse_timeout = \"1s\"",
    ));
    assert_cut_off_after_ten_bytes(&gw, "/x").await;
}

/// Towards an HTTP/2 instance too, the response timeout runs only while the gateway waits on
/// the instance: a client that pauses inside its body past it still gets the answer, and an
/// instance that takes no part of the body for the whole timeout gets 504.
#[tokio::test]
async fn an_http2_instance_is_timed_while_waited_on_never_while_the_client_is() {
    let backend = demo_backend(&[]);
    let gw = gateway(&upstream(
        &[backend.addr().to_string()],
        "protocol = \"h2c\"\nresponse_timeout = \"1s\"",
    ));
    let answer = answer_to_a_paused_upload(gw.proxy).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-body-received: 10\r\n"), "{answer}");

    // This one keeps the stream open but never reads from it: past its window (64 KiB), the
    // body waits on the instance.
    let deaf = h2c_instance(|request, respond| {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop((request, respond));
        });
    })
    .await;
    let gw = gateway(&upstream(
        &[deaf.to_string()],
        "protocol = \"h2c\"\nresponse_timeout = \"1s\"",
    ));
    let client = client();
    let stalled = request(&client, "POST", &gw.url("/deaf"), &[], &"z".repeat(1 << 20))
        .await
        .unwrap();
    assert_eq!(stalled.status, 504);
}

/// An h2c instance answering `/big` with 8 MiB and anything else with `small`, counting the
/// connections it accepted. With a `gate`, answers wait until that many requests have come
/// since the last release (at most 10 s), so a burst is all in flight at once however slowly
/// its requests arrive.
async fn sized_h2c_instance(
    gate: usize,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let arrived = std::sync::Arc::new(AtomicUsize::new(0));
    let released = std::sync::Arc::new(tokio::sync::Notify::new());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let (arrived, released) = (arrived.clone(), released.clone());
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    let (arrived, released) = (arrived.clone(), released.clone());
                    tokio::spawn(async move {
                        if gate > 0 {
                            let release = released.notified();
                            if (arrived.fetch_add(1, Ordering::SeqCst) + 1) % gate == 0 {
                                released.notify_waiters();
                            } else {
                                let _ =
                                    tokio::time::timeout(Duration::from_secs(10), release).await;
                            }
                        }
                        let big = request.uri().path() == "/big";
                        let body = if big {
                            bytes::Bytes::from(vec![b'b'; 8 << 20])
                        } else {
                            bytes::Bytes::from_static(b"small")
                        };
                        let head = http::Response::builder()
                            .header("content-length", body.len())
                            .body(())
                            .unwrap();
                        let Ok(mut stream) = respond.send_response(head, false) else {
                            return;
                        };
                        // Sent as flow control allows, a window at a time.
                        let mut rest = body;
                        while !rest.is_empty() {
                            stream.reserve_capacity(rest.len().min(1 << 20));
                            let Some(Ok(room)) =
                                std::future::poll_fn(|cx| stream.poll_capacity(cx)).await
                            else {
                                return;
                            };
                            let part = rest.split_to(room.min(rest.len()));
                            if stream.send_data(part, rest.is_empty()).is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
    });
    (addr, connections)
}

/// Clients that stop reading large answers hold no other answer up (each stream's unread data
/// holds the shared connection's window too), and requests past what one connection carries
/// at once go on another connection rather than queue for a stream slot at the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_downloads_and_busy_connections_hold_no_request_up() {
    use tokio::io::AsyncWriteExt;
    let (instance, _) = sized_h2c_instance(0).await;
    let gw = gateway(&upstream(
        &[instance.to_string()],
        "protocol = \"h2c\"\nresponse_timeout = \"3s\"",
    ));
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut client = socket.connect(gw.proxy).await.unwrap();
        client
            .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        stalled.push(client);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = client();
    for _ in 0..3 {
        let reply = get(&client, &gw.url("/small")).await;
        assert_eq!((reply.status, &reply.body[..]), (200, &b"small"[..]));
    }
    drop(stalled);

    // 150 requests in flight at once: two connections carry them. Once the burst is over the
    // second is closed (the pool's sweep, once a second), so the next burst opens one again.
    let (slow, connections_to_slow) = sized_h2c_instance(150).await;
    let gw = gateway(&upstream(&[slow.to_string()], "protocol = \"h2c\""));
    let opened = || connections_to_slow.load(std::sync::atomic::Ordering::SeqCst);
    for (burst, connections) in [(0, 2), (1, 3)] {
        let sent = (0..150).map(|n| {
            let (client, url) = (client.clone(), gw.url(&format!("/s{burst}-{n}")));
            async move { get(&client, &url).await.status }
        });
        let statuses = futures_util::future::join_all(sent).await;
        assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
        assert_eq!(opened(), connections, "burst {burst}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
}

/// A stream an HTTP/2 instance resets counts against it as a reset connection does: with
/// max_fails = 1 it is taken out, and an idempotent request goes to another instance. So does
/// a refused stream (REFUSED_STREAM: not processed, RFC 9113 §8.7), which goes to another
/// instance whatever its method, with its body: an instance refusing every stream kept its
/// share, and 79 % of requests under least_conn got 502 once the retry budget ran out.
#[tokio::test]
async fn reset_streams_count_against_the_instance() {
    use std::sync::atomic::Ordering;
    let (refusing, refused) = resetting_h2c_instance(h2::Reason::REFUSED_STREAM).await;
    let (failing, _) = resetting_h2c_instance(h2::Reason::INTERNAL_ERROR).await;
    let backend = demo_backend(&[]);
    let config = |instances: &str| {
        format!(
            "[upstreams.app]\ninstances = [{instances}]\nprotocol = \"h2c\"\n\
             strategy = \"round_robin\"\nmax_fails = 1\n\n[[routes]]\nupstream = \"app\"\n"
        )
    };
    let gw = gateway(&config(&format!("\"{refusing}\", \"{}\"", backend.addr())));
    let client = client();
    for _ in 0..4 {
        let reply = request(&client, "POST", &gw.url("/work"), &[], "payload")
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-body-received"), "7");
    }
    assert!(refused.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        instance_state(&client, &gw, refusing.to_string()).await,
        "failed"
    );
    let both = gateway(&config(&format!("\"{failing}\", \"{}\"", backend.addr())));
    for _ in 0..4 {
        assert_eq!(get(&client, &both.url("/x")).await.status, 200);
    }
    assert_eq!(
        instance_state(&client, &both, failing.to_string()).await,
        "failed"
    );
    let lone = gateway_logging(&config(&format!("\"{failing}\"")));
    for _ in 0..3 {
        // 502, never 503: a lone instance taken out is tried anyway, as nginx does.
        assert_eq!(get(&client, &lone.url("/x")).await.status, 502);
    }
    // The log says which HTTP/2 error it was, not just "http2 error".
    let said = eventually(Duration::from_secs(3), || async {
        lone.proc
            .log_lines()
            .iter()
            .any(|line| line.contains("request failed") && line.contains("internal error"))
    })
    .await;
    assert!(said, "{:?}", lone.proc.log_lines());
}

async fn backend_connections(client: &Client, backend: &Proc) -> u64 {
    let reply = get(client, &format!("http://{}/__stats", backend.addr())).await;
    reply.json()["connections"].as_u64().unwrap()
}

#[tokio::test]
async fn h2_over_tls_streams_large_bodies_both_ways() {
    let pki = Pki::new();
    let backend = pki.https_backend(&[]);
    let gw = gateway(&upstream(
        &[backend.addr().to_string()],
        &format!(
            "protocol = \"h2\"\ntls = {{ ca = \"{}\" }}\nhealth = {{ interval = \"200ms\" }}",
            pki.path("ca.pem")
        ),
    ));
    let client = client();
    assert_eq!(echo_version(&client, &gw).await, "HTTP/2.0");
    let check = last_check(&client, &gw).await;
    assert_eq!(check["detail"], "status 200", "{check}");

    let size = 8 * 1024 * 1024;
    let reply = get(&client, &gw.url(&format!("/cache/big?bytes={size}"))).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), size);
    assert!(reply.body.iter().all(|b| *b == b'c'));

    let upload = "u".repeat(3 * 1024 * 1024);
    let reply = request(&client, "POST", &gw.url("/upload"), &[], &upload)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.header("x-body-received"), upload.len().to_string());
    let stats = pki.stats(backend.addr()).await;
    assert_eq!(stats["requests"], 3, "{stats}");
}

#[tokio::test]
async fn upgrades_tunnel_through_tls_instances() {
    use std::io::{Read, Write};
    let pki = Pki::new();
    let backend = pki.https_backend(&[]);
    let gw = gateway(&upstream(
        &[format!("https://{}", backend.addr())],
        &format!("tls = {{ ca = \"{}\" }}", pki.path("ca.pem")),
    ));
    let mut tunnel = std::net::TcpStream::connect(gw.proxy).unwrap();
    tunnel
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    tunnel
        .write_all(
            b"GET /upgrade HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tunnel.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for message in [&b"ping"[..], b"through TLS"] {
        tunnel.write_all(message).unwrap();
        let mut echoed = vec![0u8; message.len()];
        tunnel.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, message);
    }
}

#[tokio::test]
async fn h2_uploads_over_max_body_get_413() {
    let backend = demo_backend(&[]);
    let gw = gateway_with_server_keys(
        "max_body = \"1KiB\"",
        &upstream(
            &[backend.addr().to_string()],
            "protocol = \"h2c\"\nresponse_timeout = \"5s\"",
        ),
    );
    let mut upload =
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        upload.extend_from_slice(b"200\r\n");
        upload.extend_from_slice(&[b'u'; 0x200]);
        upload.extend_from_slice(b"\r\n");
    }
    upload.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(gw.proxy, &upload);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

/// An h2c instance that answers the first `answered` streams of each connection, then sends a
/// graceful GOAWAY naming the last of them: the streams after it on that connection were not
/// processed (RFC 9113 §6.8), as when nginx reaches `keepalive_requests`. Written at the frame
/// level: the h2 crate's server names the last stream it received, never leaving one out.
async fn going_away_h2c_instance(
    answered: usize,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let streams = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = streams.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                socket.read_exact(&mut preface).await?;
                socket.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
                let (mut served, mut gone) = (0, false);
                loop {
                    let mut head = [0u8; 9];
                    socket.read_exact(&mut head).await?;
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
                    let mut payload = vec![0u8; len];
                    socket.read_exact(&mut payload).await?;
                    match (head[3], head[4]) {
                        // SETTINGS, not an ACK: acknowledged.
                        (4, flags) if flags & 1 == 0 => {
                            socket.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await?;
                        }
                        // HEADERS of a request: `:status 200` (static index 8), and the end.
                        (1, _) if !gone => {
                            served += 1;
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let mut answer = vec![0, 0, 1, 1, 0x5];
                            answer.extend_from_slice(&stream.to_be_bytes());
                            answer.push(0x88);
                            if served == answered {
                                answer.extend_from_slice(&[0, 0, 8, 7, 0, 0, 0, 0, 0]);
                                answer.extend_from_slice(&stream.to_be_bytes());
                                answer.extend_from_slice(&[0, 0, 0, 0]);
                                gone = true;
                            }
                            socket.write_all(&answer).await?;
                        }
                        _ => {}
                    }
                }
                #[allow(unreachable_code)]
                Ok::<(), std::io::Error>(())
            });
        }
    });
    (addr, streams)
}

/// Requests an HTTP/2 instance did not take up before it went away (a graceful GOAWAY) go again
/// on a new connection to it, not counted as retries: with `retries = 0` every one is answered,
/// those with a body (whatever their method) as those without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_an_http2_instance_left_unprocessed_go_again_on_a_new_connection() {
    let client = client();
    for (method, body) in [("GET", ""), ("POST", "payload")] {
        let (instance, answered) = going_away_h2c_instance(5).await;
        let gw = gateway(&upstream(
            &[instance.to_string()],
            "protocol = \"h2c\"\nretries = 0",
        ));
        let sent = (0..8).map(|n| {
            let (client, url) = (client.clone(), gw.url(&format!("/r{n}")));
            async move {
                request(&client, method, &url, &[], body)
                    .await
                    .unwrap()
                    .status
            }
        });
        let statuses = futures_util::future::join_all(sent).await;
        assert_eq!(statuses, [200; 8], "{method}");
        assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 8);
    }
}

/// An h2c instance that takes `limit` streams at once on each connection and answers each
/// after `delay`; returns the connections it accepted so far.
async fn limited_h2c_instance(
    limit: u32,
    delay: Duration,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepted = connections.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut builder = h2::server::Builder::new();
                builder.max_concurrent_streams(limit);
                let Ok(mut conn) = builder.handshake::<_, bytes::Bytes>(socket).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = respond.send_response(http::Response::new(()), true);
                    });
                }
            });
        }
    });
    (addr, connections)
}

/// Past an instance's own stream limit (below the gateway's 100 a connection), requests go on
/// another connection, as Envoy does, rather than wait unseen inside the HTTP/2 client (where a
/// graceful GOAWAY failed the one waiting, counted as sent: a 502, the instance ejected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_instance_s_stream_limit_opens_connections_rather_than_queueing() {
    let (instance, connections) = limited_h2c_instance(2, Duration::from_millis(300)).await;
    let gw = gateway(&upstream(&[instance.to_string()], "protocol = \"h2c\""));
    let client = client();
    // The first connection learns the limit.
    assert_eq!(get(&client, &gw.url("/warm")).await.status, 200);
    let sent = (0..6).map(|n| {
        let (client, url) = (client.clone(), gw.url(&format!("/r{n}")));
        async move { get(&client, &url).await.status }
    });
    let statuses = futures_util::future::join_all(sent).await;
    assert_eq!(statuses, [200; 6]);
    let opened = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        opened >= 3,
        "6 requests over {opened} connection(s) of 2 streams"
    );
}

/// A new instance's first burst, sent before its SETTINGS told its stream limit (2 here), is
/// refused past it: those requests go again within the limit, and none fails (with one resend
/// each, most of a burst got 502s and the instance was taken out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_burst_past_an_http2_instance_s_stream_limit_is_sent_again() {
    let (instance, _) = limited_h2c_instance(2, Duration::from_millis(200)).await;
    let gw = gateway(&upstream(
        &[instance.to_string()],
        "protocol = \"h2c\"\nretries = 0",
    ));
    let client = client();
    let sent = (0..40).map(|n| {
        let (client, url) = (client.clone(), gw.url(&format!("/r{n}")));
        async move { get(&client, &url).await.status }
    });
    let statuses = futures_util::future::join_all(sent).await;
    assert_eq!(statuses, [200; 40]);
}

/// An HTTP/2 instance may send as large an answer head as an HTTP/1.1 one (64 KiB; hyper's
/// client allowed 16 KiB), and a body it sends with a 204 does not reach an HTTP/2 client,
/// whose stream it broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_instance_s_large_head_passes_and_a_204_s_body_does_not() {
    let instance = h2c_instance(|request, mut respond| {
        let (status, body): (u16, &[u8]) = if request.uri().path() == "/empty" {
            (204, b"not for a 204")
        } else {
            (200, b"ok")
        };
        let large = if status == 200 { 20_000 } else { 1 };
        let head = http::Response::builder()
            .status(status)
            .header("x-large", "v".repeat(large))
            .body(())
            .unwrap();
        let mut stream = respond.send_response(head, false).unwrap();
        let _ = stream.send_data(bytes::Bytes::from_static(body), true);
    })
    .await;
    let gw = gateway(&upstream(&[instance.to_string()], "protocol = \"h2c\""));
    let large = get(&client(), &gw.url("/large")).await;
    assert_eq!((large.status, large.header("x-large").len()), (200, 20_000));
    let empty = request(&h2c_client(), "GET", &gw.url("/empty"), &[], "")
        .await
        .unwrap();
    assert_eq!((empty.status, empty.body.len()), (204, 0));
}

/// The demo instance sends no body with a 204 or 304, over HTTP/2 either (hyper sent one there).
#[tokio::test]
async fn the_demo_instance_sends_no_body_with_a_204() {
    let demo = demo_backend(&[]);
    for status in [204, 304] {
        let url = format!("http://{}/cache/empty?status={status}", demo.addr());
        let reply = request(&h2c_client(), "GET", &url, &[], "").await.unwrap();
        assert_eq!((reply.status, reply.body.len()), (status, 0));
    }
}

/// The demo instance reads If-None-Match as RFC 9110 asks: weak comparison, lists and `*`.
#[tokio::test]
async fn the_demo_instance_compares_etags_weakly() {
    let demo = demo_backend(&[]);
    let client = client();
    let url = format!("http://{}/cache?etag=W%2F%22x%22", demo.addr());
    for (asked, status) in [
        ("\"x\"", 304),
        ("W/\"x\"", 304),
        ("\"y\", W/\"x\"", 304),
        ("*", 304),
        ("\"y\"", 200),
    ] {
        let reply = request(&client, "GET", &url, &[("if-none-match", asked)], "")
            .await
            .unwrap();
        assert_eq!(reply.status, status, "{asked}");
    }
}
