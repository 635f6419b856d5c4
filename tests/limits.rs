//! Limits against abuse, end to end: connection caps refuse cleanly and count, a slowloris
//! client and a slow-drip upload are cut off while others are served, an over-long URI gets
//! 414, HTTP/2 clients get the configured settings.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

/// A client opening with HTTP/2's preface (prior knowledge) over a connection cap is refused in
/// HTTP/2: a GOAWAY saying none of its streams was taken up (REFUSED_STREAM), which it may send
/// again elsewhere. An HTTP/1.1 503 was garbage to it.
#[tokio::test]
async fn an_http2_client_over_the_cap_is_refused_in_http2() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys("max_connections_per_ip = 1", &app_config(&[&a], ""));
    let _held = TcpStream::connect(gw.proxy).unwrap();
    let client = client();
    let counted = eventually(Duration::from_secs(5), || async {
        let metrics = get(&client, &gw.admin_url("/metrics")).await;
        String::from_utf8_lossy(&metrics.body).contains("scalegate_open_connections 1")
    });
    assert!(counted.await);
    let tcp = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (mut sender, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let request = http::Request::get("http://x/").body(()).unwrap();
    let refused = match sender.send_request(request, true) {
        Ok((response, _)) => response.await.unwrap_err(),
        Err(err) => err,
    };
    assert_eq!(
        refused.reason(),
        Some(h2::Reason::REFUSED_STREAM),
        "{refused}"
    );
    assert!(refused.is_go_away(), "{refused}");
    drop(sender);
    let _ = driver.await;
}

#[tokio::test]
async fn per_ip_connection_cap_refuses_cleanly_and_frees_on_close() {
    let a = demo_backend(&[]);
    let gw = gateway_logging_with_server_keys("max_connections_per_ip = 2", &app_config(&[&a], ""));
    let first = TcpStream::connect(gw.proxy).unwrap();
    let _second = TcpStream::connect(gw.proxy).unwrap();
    let client = client();
    let open_connections = |count: usize| {
        let client = client.clone();
        let url = gw.admin_url("/metrics");
        async move {
            let metrics = get(&client, &url).await;
            String::from_utf8_lossy(&metrics.body)
                .contains(&format!("scalegate_open_connections {count}"))
        }
    };
    assert!(
        eventually(Duration::from_secs(5), || open_connections(2)).await,
        "the gateway never counted both connections"
    );
    let answer = raw_exchange(gw.proxy, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // A JSON body like every error's, its request ID also in the head.
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let json: serde_json::Value = serde_json::from_str(body).expect(body);
    assert_eq!(json["error"], "too_many_connections");
    let id = json["request_id"].as_str().unwrap();
    assert!(
        !id.is_empty() && head.contains(&format!("x-request-id: {id}\r\n")),
        "{answer}"
    );
    // Logged with the body it sent, as every answer is.
    let logged = eventually(Duration::from_secs(5), || async {
        access_lines(&gw).contains_key(id)
    });
    assert!(logged.await, "{:?}", access_lines(&gw));
    assert_eq!(access_lines(&gw)[id]["bytes"], body.len(), "{answer}");
    drop(first);
    // Once the gateway has seen the close, the freed slot takes a new connection at once.
    assert!(
        eventually(Duration::from_secs(5), || open_connections(1)).await,
        "closing a connection did not free its slot"
    );
    let answer = raw_exchange(
        gw.proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let metrics =
        String::from_utf8(get(&client, &gw.admin_url("/metrics")).await.body.to_vec()).unwrap();
    assert!(
        metrics
            .contains(r#"scalegate_connections_refused_total{reason="max_connections_per_ip"} 1"#),
        "{metrics}"
    );
    // Counted (and logged) with the ID its answer carried, as nginx logs its limit_conn 503s.
    let refused = metrics.lines().any(|line| {
        line.starts_with("scalegate_requests_total{route=\"-\"")
            && line.contains("status=\"5xx\"")
            && line.ends_with(" 1")
    });
    assert!(refused, "{metrics}");
}

/// Connection caps change on reload for the connections after it, with the ones already open
/// counted; a worker count cannot change, and such a reload is refused naming the key rather
/// than reported as applied.
#[tokio::test]
async fn a_reload_changes_connection_caps_and_refuses_a_new_worker_count() {
    let a = demo_backend(&[]);
    let app = app_config(&[&a], "");
    let gw = gateway(&app);
    let client = client();
    let reload = |keys: &str| {
        gw.write_config(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{keys}\n{app}"
        ));
        let (client, url) = (client.clone(), gw.admin_url("/api/reload"));
        async move { request(&client, "POST", &url, &[], "").await.unwrap() }
    };
    // A connection opened while there is no per-IP cap counts toward the one a reload sets.
    assert_eq!(reload("max_connections_per_ip = 0").await.status, 200);
    let mut held = TcpStream::connect(gw.proxy).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut status = [0u8; 12];
    held.read_exact(&mut status).unwrap();
    assert_eq!(&status, b"HTTP/1.1 200");
    assert_eq!(reload("max_connections_per_ip = 1").await.status, 200);
    let answer = raw_exchange(gw.proxy, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");

    // The count in force written down changes nothing; another takes a restart.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let same = reload(&format!("max_connections_per_ip = 1\nworkers = {cpus}")).await;
    assert_eq!(same.status, 200, "{}", same.error_text());
    let refused = reload(&format!(
        "max_connections_per_ip = 1\nworkers = {}",
        cpus + 1
    ))
    .await;
    assert_eq!(refused.status, 422);
    let errors = refused.json()["errors"].to_string();
    // Named with its line in the file, as every other config problem.
    assert!(errors.contains("server.workers (line "), "{errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_while_others_are_served() {
    let a = demo_backend(&[]);
    let gw =
        gateway_logging_with_server_keys("header_read_timeout = \"1s\"", &app_config(&[&a], ""));
    let mut slow = TcpStream::connect(gw.proxy).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let started = Instant::now();
    // Meanwhile the gateway serves everyone else.
    let client = client();
    for _ in 0..20 {
        assert_eq!(get(&client, &gw.url("/")).await.status, 200);
    }
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(6),
        "the half-sent request held its connection for {waited:?}"
    );
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
        "{rest}"
    );
    assert_eq!(backend_requests(&client, &a).await, 20);
    // Counted (and logged) as nginx does: a 408 with no route.
    let metrics = get(&client, &gw.admin_url("/metrics")).await.body;
    let metrics = String::from_utf8_lossy(&metrics);
    let timed_out = metrics.lines().any(|line| {
        line.starts_with("scalegate_requests_total{route=\"-\"")
            && line.contains("status=\"4xx\"")
            && line.ends_with(" 1")
    });
    assert!(timed_out, "{metrics}");
    // Logged with the time it held its connection, as nginx's `$request_time` shows it.
    let timed_out = || {
        access_lines(&gw)
            .into_values()
            .find(|line| line["status"] == 408)
    };
    let logged = eventually(Duration::from_secs(5), || async { timed_out().is_some() });
    assert!(logged.await, "{:?}", access_lines(&gw));
    let cut = timed_out().unwrap();
    assert!(cut["duration_ms"].as_f64().unwrap() >= 1000.0, "{cut}");
}

/// Connections [`answer_after_the_body`] accepted.
static UPLOAD_CONNECTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Reads one request with a 10-byte body and answers it.
fn answer_after_the_body(mut stream: TcpStream, _: usize) {
    UPLOAD_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if read_until(&mut stream, b"\r\n\r\nhelloworld").is_none() {
        return;
    }
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
}

/// A small upload is read whole before an instance is picked, as nginx reads a body first: a
/// slow client's holds no connection to an instance meanwhile.
#[test]
fn a_small_upload_is_read_before_an_instance_is_picked() {
    use std::sync::atomic::Ordering::Relaxed;
    let gw = gateway(&app_config_at(&[raw_instance(answer_after_the_body)], ""));
    let mut client = TcpStream::connect(gw.proxy).unwrap();
    client
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(UPLOAD_CONNECTIONS.load(Relaxed), 0);
    client.write_all(b"world").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = [0u8; 12];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    assert_eq!(UPLOAD_CONNECTIONS.load(Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_drip_upload_is_cut_with_408_while_others_are_served() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys(
        "body_read_timeout = \"1s\"\nmin_body_rate = \"100\"",
        &app_config(&[&a], ""),
    );
    let proxy = gw.proxy;
    // One byte every 100 ms: 10 bytes/s against the 100 bytes/s asked for.
    let drip = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(proxy).unwrap();
        stream
            .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        // Bounded: 100 bytes at most; stops dripping once the gateway answered.
        for _ in 0..100 {
            if stream.write_all(b"x").is_err() {
                break;
            }
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    stream
                        .set_read_timeout(Some(Duration::from_secs(2)))
                        .unwrap();
                    let _ = stream.read_to_end(&mut answer);
                    break;
                }
                Err(_) => {}
            }
        }
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    });
    let client = client();
    for _ in 0..20 {
        assert_eq!(get(&client, &gw.url("/")).await.status, 200);
    }
    let (answer, waited) = tokio::task::spawn_blocking(move || drip.join().unwrap())
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_too_slow"), "{answer}");
    assert!(
        waited < Duration::from_secs(6),
        "the slow upload held its connection for {waited:?}"
    );
    // A body that small is read whole before its request goes (as nginx buffers bodies):
    // the slow upload never reached the instance.
    assert_eq!(backend_requests(&client, &a).await, 20);
    // A body at a normal pace passes the same limit.
    let reply = request(&client, "POST", &gw.url("/upload"), &[], &"y".repeat(5000))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-body-received"), "5000");
    // A window's bytes once the gateway waits for them, then a pause of a window and a half: as
    // nginx's `client_body_timeout`, the silence alone is too slow (the windows alone let it
    // pass, the first full and the pause ending within the second).
    let mut stream = TcpStream::connect(proxy).unwrap();
    let head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\n\r\n";
    stream.write_all(head).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream.write_all(&[b'z'; 150]).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = stream.write_all(&[b'z'; 150]);
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test]
async fn an_overlong_uri_gets_414_with_the_request_id() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys("max_uri_length = \"1KiB\"", &app_config(&[&a], ""));
    let client = client();
    let long = format!("/{}", "a".repeat(2000));
    let reply = get(&client, &gw.url(&long)).await;
    assert_eq!(reply.status, 414);
    assert_eq!(reply.json()["request_id"], reply.header("x-request-id"));
    assert_eq!(get(&client, &gw.url("/short")).await.status, 200);
    assert_eq!(backend_requests(&client, &a).await, 1);
}

#[test]
fn upgrades_other_than_websocket_over_http_1_1_go_on_as_plain_requests() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    // h2c: tunnelled, the client's next requests would reach the instance past routing and
    // checks.
    let answer = raw_exchange(
        gw.proxy,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(!answer.contains("upgrade"), "{answer}");
    assert!(!answer.contains("http2-settings"), "{answer}");
    // HTTP/1.0 has no Upgrade (RFC 9110 §7.8): the instance gets none and answers plainly.
    let answer = raw_exchange(
        gw.proxy,
        b"GET /upgrade HTTP/1.0\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.ends_with("no Upgrade"), "{answer}");
    // Nor does a request with a body: a 101 would leave its rest and the tunnel's first bytes
    // mixed.
    let answer = raw_exchange(
        gw.proxy,
        b"POST /upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
          Content-Length: 5\r\n\r\nhello",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.ends_with("no Upgrade"), "{answer}");
}

/// Opens a WebSocket tunnel through `gw` to the demo instance's echo; with the 101's head.
fn open_tunnel(gw: &Gateway) -> (TcpStream, String) {
    let mut ws = TcpStream::connect(gw.proxy).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    ws.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    (ws, head)
}

/// Sends `frame` through the tunnel and reads its echo.
fn echoed(ws: &mut TcpStream, frame: &[u8]) -> std::io::Result<()> {
    ws.write_all(frame)?;
    let mut echo = vec![0u8; frame.len()];
    ws.read_exact(&mut echo)?;
    assert_eq!(echo, frame);
    Ok(())
}

/// A graceful stop waits for open tunnels, as nginx, HAProxy and Traefik do, up to the grace;
/// a tunnel cut when it runs out is logged with the bytes it carried to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_keeps_tunnels_open_for_the_grace() {
    let a = demo_backend(&[]);
    let mut gw =
        gateway_logging_with_server_keys("shutdown_grace = \"1500ms\"", &app_config(&[&a], ""));
    let (mut ws, _) = open_tunnel(&gw);
    let frame = *b"0123456789";
    echoed(&mut ws, &frame).unwrap();
    signal(gw.proc.pid(), "TERM");
    std::thread::sleep(Duration::from_millis(500));
    echoed(&mut ws, &frame).expect("the tunnel was cut as the stop began");
    let stopped = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = gw.proc.child.wait().unwrap();
        (status, gw)
    })
    .await
    .unwrap();
    let (status, gw) = status;
    assert!(status.success(), "{status:?}");
    // The open tunnel held the stop until the grace (1.5 s after the signal) ran out.
    let held = stopped.elapsed();
    assert!(
        (Duration::from_millis(700)..Duration::from_secs(3)).contains(&held),
        "{held:?}"
    );
    let line = gw
        .proc
        .log_lines()
        .into_iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
        .find(|line| line["path"] == "/upgrade")
        .expect("the tunnel's access line");
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["bytes"], 20, "{line}");
    drop(ws);
}

/// A tunnel keeps its place under `max_in_flight` for as long as it lasts, as nginx, HAProxy and
/// Envoy count an upgraded connection: its slots were given back with the 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_holds_its_concurrency_slot_until_it_closes() {
    let a = demo_backend(&[]);
    let body = format!(
        "[upstreams.app]\ninstances = [\"{}\"]\n\n[[routes]]\nupstream = \"app\"\n\
         max_in_flight = 1\nqueue_size = 0\n",
        a.addr()
    );
    let gw = gateway(&body);
    let (mut ws, _) = open_tunnel(&gw);
    echoed(&mut ws, b"0123456789").unwrap();
    let refused = raw_exchange(
        gw.proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    drop(ws);
    let client = client();
    let served = eventually(Duration::from_secs(5), || async {
        get(&client, &gw.url("/")).await.status == 200
    })
    .await;
    assert!(
        served,
        "the tunnel's slot was not given back when it closed"
    );
}

/// When the grace runs out, a tunnel is cut then, also while the autoscaler goes on to stop
/// its instances (for up to `stop_grace`): it was served on until they had stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_is_cut_when_the_grace_runs_out_not_when_the_autoscaler_is_done() {
    let a = demo_backend(&[]);
    let port = unclaimed_port();
    // An instance that ignores SIGTERM holds the autoscaler's stop for its whole stop_grace.
    let scaled = format!(
        "[upstreams.scaled]\ninstances = []\n[upstreams.scaled.autoscale]\nmin = 1\nmax = 1\n\
         port_range = \"{port}-{port}\"\nstop_grace = \"5s\"\n\
         target = {{ in_flight_per_instance = 10 }}\n\
         command = \"sh -c 'trap \\\"\\\" TERM; exec sleep 20' {{port}}\"\n"
    );
    let gw = gateway_logging_with_server_keys(
        "shutdown_grace = \"1s\"",
        &format!("{scaled}{}", app_config(&[&a], "")),
    );
    let (mut ws, _) = open_tunnel(&gw);
    let frame = *b"0123456789";
    echoed(&mut ws, &frame).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    signal(gw.proc.pid(), "TERM");
    let stopped = Instant::now();
    let mut rest = [0u8; 16];
    let read = ws.read(&mut rest);
    let cut = stopped.elapsed();
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?} after {cut:?}"
    );
    assert!(
        cut < Duration::from_secs(3),
        "the tunnel was cut {cut:?} after the stop"
    );
    // The gateway stops its instance (killed after stop_grace), then exits.
    let status = gw.exit_status().await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_tunnelled_and_count_as_in_flight() {
    let a = demo_backend(&[]);
    // A tunnel is still an open client connection: it holds its place under the caps.
    let gw = gateway_with_server_keys("max_connections = 1", &app_config(&[&a], ""));
    let (mut ws, head) = open_tunnel(&gw);
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("x-request-id:"), "{head}");
    // A masked WebSocket text frame "hello" and whatever else: bytes flow both ways untouched.
    let frame = [
        0x81,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    for _ in 0..3 {
        echoed(&mut ws, &frame).unwrap();
    }
    let client = client();
    let in_flight = || async {
        let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
        detailed["upstreams"][0]["instances"][0]["in_flight"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(in_flight().await, 1, "an open tunnel counts as in flight");
    let metrics = get(&client, &gw.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(metrics.contains("scalegate_open_connections 1"));
    // For the gateway too, and its request is counted (and logged) once it closes, with its
    // whole time, as nginx logs a WebSocket.
    assert!(
        metrics.contains("scalegate_in_flight_requests 1"),
        "{metrics}"
    );
    let switched = |metrics: &str| {
        metrics.lines().any(|l| {
            l.starts_with("scalegate_requests_total{")
                && l.contains("status=\"1xx\"")
                && !l.ends_with(" 0")
        })
    };
    assert!(!switched(&metrics), "{metrics}");
    let refused = raw_exchange(gw.proxy, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    // Open a while: the duration histogram times the exchange up to the 101, not the tunnel.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(ws);
    assert!(
        eventually(Duration::from_secs(5), || async { in_flight().await == 0 }).await,
        "the tunnel's in-flight count was not released"
    );
    let counted = eventually(Duration::from_secs(5), || async {
        let metrics = get(&client, &gw.admin_url("/metrics")).await;
        switched(&String::from_utf8_lossy(&metrics.body))
    });
    assert!(
        counted.await,
        "the tunnel's request was not counted when it closed"
    );
    let metrics = get(&client, &gw.admin_url("/metrics")).await;
    let timed: f64 = String::from_utf8_lossy(&metrics.body)
        .lines()
        .filter(|l| l.starts_with("scalegate_request_duration_seconds_sum{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        timed < 1.0,
        "the tunnel's life was timed as its request: {timed} s"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            let metrics = get(&client, &gw.admin_url("/metrics")).await;
            String::from_utf8_lossy(&metrics.body).contains("scalegate_open_connections 0")
        })
        .await,
        "the tunnel's connection slot was not released"
    );
    let answer = raw_exchange(
        gw.proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_right_behind_an_upgrade_request_reach_the_instance_first() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let mut tunnel = TcpStream::connect(gw.proxy).unwrap();
    tunnel
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The new protocol's first bytes in the same write as the request: the gateway read them
    // with the head and must hand them to the tunnel before anything else.
    tunnel
        .write_all(
            b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nearly",
        )
        .unwrap();
    tunnel.write_all(b"+late").unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 256];
    while !seen.ends_with(b"early+late") {
        let read = tunnel.read(&mut chunk).unwrap();
        assert!(read > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..read]);
    }
    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 101"), "{text}");
    assert!(text.contains("upgrade: websocket"), "{text}");
}

#[tokio::test]
async fn too_many_header_fields_get_431() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys("max_headers = 20", &app_config(&[&a], ""));
    let mut head = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for n in 0..25 {
        head.push_str(&format!("X-Field-{n}: v\r\n"));
    }
    head.push_str("\r\n");
    let answer = raw_exchange(gw.proxy, head.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let ok = raw_exchange(
        gw.proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(backend_requests(&client(), &a).await, 1);
}

const H2_SETTINGS: &str = "[server.http2]\nmax_concurrent_streams = 2\ninitial_stream_window = \"128KiB\"\ninitial_connection_window = \"4MiB\"\nmax_frame_size = \"32KiB\"";

/// One HTTP/2 frame: type, flags, stream and payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn read_frame(stream: &mut TcpStream) -> Frame {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).unwrap();
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }
}

/// A raw HTTP/2 connection to `gw`'s proxy port: the preface and an empty SETTINGS sent, reads
/// timing out after 5 s.
fn h2_opened(gw: &Gateway) -> TcpStream {
    let mut h2 = TcpStream::connect(gw.proxy).unwrap();
    h2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    h2.write_all(&frame(4, 0, 0, &[])).unwrap();
    h2
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A stop closes an idle HTTP/2 connection whose client never acknowledges the GOAWAY's PING
/// (frozen, or gone without a FIN) within a second or so, as an idle HTTP/1.1 one: it held the
/// stop for the whole shutdown grace.
#[tokio::test]
async fn a_stop_does_not_wait_on_an_http2_client_that_never_answers() {
    let a = demo_backend(&[]);
    let mut gw = gateway_with_server_keys("shutdown_grace = \"60s\"", &app_config(&[&a], ""));
    let mut h2 = h2_opened(&gw);
    // One request answered, so the connection is served and then idle.
    h2.write_all(&frame(1, 0x5, 1, &[0x82, 0x86, 0x84, 0x01, 0x01, b'x']))
        .unwrap();
    loop {
        let f = read_frame(&mut h2);
        // HEADERS or DATA ending stream 1.
        if f.stream == 1 && f.kind <= 1 && f.flags & 0x1 != 0 {
            break;
        }
    }
    signal(gw.proc.pid(), "TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gw.proc.child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = gw.proc.child.try_wait().unwrap();
    assert!(status
        .expect("the stop waited on the silent client")
        .success());
    drop(h2);
}

/// The gateway's CPU time so far (user and system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// An HTTP/2 connection its timers close waits quietly for its client to go: a client that
/// opened one and then said nothing made the connection's task spin a core until dropped.
#[tokio::test]
async fn a_connection_its_timers_close_does_not_spin() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys("header_read_timeout = \"500ms\"", &app_config(&[&a], ""));
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(h2_opened(&gw));
    }
    let before = cpu_ticks(gw.proc.pid());
    // Past the timeout, and the second the closing connections get to end.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let spent = cpu_ticks(gw.proc.pid()) - before;
    // Spinning, four connections cost about four seconds of CPU (400 ticks); quiet, almost none.
    assert!(
        spent < 50,
        "{spent} ticks of CPU while closing idle connections"
    );
    drop(silent);
}

/// A client that sends the first bytes of the HTTP/2 preface ("PR") and nothing more is let go
/// at `header_read_timeout`, as a slow HTTP/1.1 head is: the peek that waits for the rest
/// returned at once, so the deadline never fired and the connection was held for good (also
/// after its client left), each costing 200 wake-ups a second.
#[tokio::test]
async fn a_client_stuck_in_the_http2_preface_is_let_go() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys("header_read_timeout = \"500ms\"", &app_config(&[&a], ""));
    let mut stuck: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut stream = TcpStream::connect(gw.proxy).unwrap();
            stream.write_all(b"PR").unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream
        })
        .collect();
    let before = cpu_ticks(gw.proc.pid());
    for stream in &mut stuck {
        let mut byte = [0u8; 1];
        let read = stream.read(&mut byte);
        assert!(
            matches!(read, Ok(0))
                || read.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the connection was not closed"
        );
    }
    assert!(cpu_ticks(gw.proc.pid()) - before < 50);
    let client = client();
    let closed = eventually(Duration::from_secs(2), || async {
        let metrics = get(&client, &gw.admin_url("/metrics")).await;
        String::from_utf8_lossy(&metrics.body).contains("scalegate_open_connections 0")
    });
    assert!(closed.await);
}

/// An HTTP/2 request that names no host (no :authority, no Host) gets 400, as an HTTP/1.1 one
/// without Host does, rather than reaching the instance under the upstream's name; so does one
/// whose path does not start with `/`.
#[tokio::test]
async fn an_http2_request_naming_no_host_gets_400() {
    let a = demo_backend(&[]);
    let gw = gateway_logging(&app_config(&[&a], ""));
    let mut h2 = h2_opened(&gw);
    // The head block and the body of the answer on `stream`.
    let mut answer_to = |stream: u32, block: &[u8]| {
        h2.write_all(&frame(1, 0x5, stream, block)).unwrap();
        let (mut head, mut body) = (Vec::new(), Vec::new());
        loop {
            let f = read_frame(&mut h2);
            if f.stream != stream {
                continue;
            }
            match f.kind {
                1 => head = f.payload,
                0 => body.extend_from_slice(&f.payload),
                _ => {}
            }
            if f.flags & 0x1 != 0 {
                break (head, String::from_utf8_lossy(&body).into_owned());
            }
        }
    };
    // GET, http, / and nothing else; `:status 400` is indexed in HPACK's static table, and the
    // gateway's own refusal says why.
    let (head, body) = answer_to(1, &[0x82, 0x86, 0x84]);
    assert_eq!(head.first(), Some(&0x8c), "{head:?}");
    assert!(body.contains(":authority"), "{body}");
    // Nor does a path that is not one (`?x` would reach the instance as `GET ?x`).
    let (head, body) = answer_to(3, &[0x82, 0x86, 0x04, 0x02, b'?', b'x', 0x01, 0x01, b'x']);
    assert_eq!(head.first(), Some(&0x8c), "{head:?}");
    assert!(body.contains("does not start with /"), "{body}");
    assert_eq!(backend_requests(&client(), &a).await, 0);
    // Logged with the method and target it came with.
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = json["request_id"].as_str().unwrap().to_owned();
    let logged = eventually(Duration::from_secs(5), || async {
        access_lines(&gw).contains_key(&id)
    });
    assert!(logged.await, "{:?}", access_lines(&gw));
    let line = &access_lines(&gw)[&id];
    assert_eq!(
        (&line["method"], &line["path"], &line["status"]),
        (&"GET".into(), &"?x".into(), &400.into()),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_get_the_configured_settings_and_extra_streams_are_refused() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys(H2_SETTINGS, &app_config(&[&a], ""));
    let mut h2 = h2_opened(&gw);
    let (mut settings, mut window_update) = (None, None);
    while settings.is_none() || window_update.is_none() {
        let f = read_frame(&mut h2);
        match f.kind {
            4 if settings.is_none() => settings = Some(f.payload),
            8 if f.stream == 0 => {
                window_update = Some(u32::from_be_bytes(f.payload[..4].try_into().unwrap()))
            }
            _ => {}
        }
    }
    let settings: Vec<(u16, u32)> = settings
        .unwrap()
        .chunks(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect();
    for expected in [(3, 2), (4, 128 * 1024), (5, 32 * 1024)] {
        assert!(
            settings.contains(&expected),
            "{expected:?} not in {settings:?}"
        );
    }
    assert_eq!(window_update, Some(4 * 1024 * 1024 - 65_535));

    // Three streams at once against max_concurrent_streams = 2: the third is refused.
    h2.write_all(&frame(4, 1, 0, &[])).unwrap();
    let path = b"/slow?latency_ms=1000";
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path);
    block.extend_from_slice(&[0x01, 0x01, b'x']);
    let mut three = Vec::new();
    for stream in [1, 3, 5] {
        three.extend(frame(1, 0x5, stream, &block));
    }
    h2.write_all(&three).unwrap();
    let refused = loop {
        let f = read_frame(&mut h2);
        if f.kind == 3 {
            break (
                f.stream,
                u32::from_be_bytes(f.payload[..4].try_into().unwrap()),
            );
        }
    };
    assert_eq!(
        refused,
        (5, 0x7),
        "expected RST_STREAM(REFUSED_STREAM) on stream 5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_queues_streams_beyond_max_concurrent_streams() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys(H2_SETTINGS, &app_config(&[&a], ""));
    let client = h2c_client();
    assert_eq!(get(&client, &gw.url("/")).await.status, 200);
    let started = Instant::now();
    let replies: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            let url = gw.url("/?latency_ms=400");
            tokio::spawn(async move { get(&client, &url).await.status })
        })
        .collect();
    for reply in replies {
        assert_eq!(reply.await.unwrap(), 200);
    }
    // Two streams at a time on the one connection: four 400 ms requests need two rounds.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "4 streams ran at once in {took:?}"
    );
    assert_eq!(backend_requests(&support::client(), &a).await, 5);
}

/// HTTP/2 rapid reset (CVE-2023-44487): a client that resets most of its streams before their
/// answers, 100 of them at least, has its connection closed, and the log names it; each such
/// stream may have cost a request to an instance. Other clients are served on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resetting_its_streams_before_their_answers_is_cut_off() {
    let a = demo_backend(&[]);
    let gw = gateway_logging(&app_config(&[&a], ""));
    let slow = |sender: &mut h2::client::SendRequest<bytes::Bytes>| {
        let request = http::Request::get(gw.url("/?latency_ms=10000"))
            .body(())
            .unwrap();
        sender.send_request(request, true).unwrap()
    };
    // Giving up on slow answers after more than a second is no abuse, however many.
    let socket = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (sender, connection) = h2::client::handshake(socket).await.unwrap();
    let mut connection = tokio::spawn(connection);
    let mut sender = sender.ready().await.unwrap();
    let mut patient: Vec<_> = (0..150).map(|_| slow(&mut sender)).collect();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for (_, stream) in &mut patient {
        stream.send_reset(h2::Reason::CANCEL);
    }
    let still_open = tokio::time::timeout(Duration::from_millis(1500), &mut connection).await;
    assert!(still_open.is_err(), "a patient client was cut off");
    drop(patient);
    // A rapid one is, even holding a stream open past the GOAWAY.
    let _held = slow(&mut sender);
    reset_rapidly(&gw, sender, connection, 0).await;
    let named = gw
        .proc
        .log_lines()
        .iter()
        .any(|line| line.contains("rapid reset") && line.contains("\"client\":\"127.0.0.1:"));
    assert!(named, "{:?}", gw.proc.log_lines());
    assert_eq!(get(&h2c_client(), &gw.url("/")).await.status, 200);
}

/// A rapid reset padded with streams the gateway answers itself (two 405s per reset stream)
/// is cut off all the same: they cost nothing, and are not counted among the streams the
/// resets must be half of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padding_a_rapid_reset_with_cheap_streams_does_not_hide_it() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let socket = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (sender, connection) = h2::client::handshake(socket).await.unwrap();
    reset_rapidly(&gw, sender, tokio::spawn(connection), 2).await;
}

/// Opens streams to a slow path and resets each soon after, each followed by `padding` TRACE
/// requests answered (405) by the gateway alone, until the gateway closes the connection:
/// after 100 resets and before 300.
async fn reset_rapidly(
    gw: &Gateway,
    mut sender: h2::client::SendRequest<bytes::Bytes>,
    connection: tokio::task::JoinHandle<Result<(), h2::Error>>,
    padding: usize,
) {
    let mut reset = 0;
    'streams: for _ in 0..300 {
        sender = match sender.ready().await {
            Ok(sender) => sender,
            Err(_) => break,
        };
        let request = http::Request::get(gw.url("/?latency_ms=3000"))
            .body(())
            .unwrap();
        let Ok((_answer, mut stream)) = sender.send_request(request, true) else {
            break;
        };
        // On its way to the instance before it is reset.
        tokio::time::sleep(Duration::from_millis(2)).await;
        stream.send_reset(h2::Reason::CANCEL);
        reset += 1;
        for _ in 0..padding {
            let request = http::Request::builder()
                .method("TRACE")
                .uri(gw.url("/"))
                .body(())
                .unwrap();
            let Ok((answer, _)) = sender.send_request(request, true) else {
                break 'streams;
            };
            match answer.await {
                Ok(answer) => assert_eq!(answer.status(), 405),
                Err(_) => break 'streams,
            }
        }
    }
    assert!(
        (100..300).contains(&reset),
        "{reset} streams reset: {:?}",
        gw.proc.log_lines()
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "the connection stayed open");
}

/// A CONTINUATION flood (a header block sent in endless pieces, CVE-2024-27316's kind) is cut
/// by the h2 codec with a GOAWAY, and the log names the client, as for a rapid reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off_and_named() {
    let a = demo_backend(&[]);
    let gw = gateway_logging(&app_config(&[&a], ""));
    let mut h2 = h2_opened(&gw);
    // HEADERS without END_HEADERS, then CONTINUATION frames that never end the block.
    let mut flood = frame(1, 0x1, 1, &[0x82]);
    for _ in 0..50 {
        flood.extend(frame(9, 0, 1, &[]));
    }
    let _ = h2.write_all(&flood);
    let mut goaway = None;
    while goaway.is_none() {
        let mut head = [0u8; 9];
        if h2.read_exact(&mut head).is_err() {
            break;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        h2.read_exact(&mut payload).unwrap();
        if head[3] == 7 {
            goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
    }
    // ENHANCE_YOUR_CALM.
    assert_eq!(goaway, Some(0xb));
    let named = eventually(Duration::from_secs(3), || async {
        gw.proc.log_lines().iter().any(|line| {
            line.contains("flooded the connection") && line.contains("\"client\":\"127.0.0.1:")
        })
    })
    .await;
    assert!(named, "{:?}", gw.proc.log_lines());
    assert_eq!(backend_requests(&client(), &a).await, 0);
}

/// The timers hyper's HTTP/2 server lacks: a connection that never finishes its preface, one
/// left idle and one whose client stops taking answer data are closed; a stream waiting on a
/// slow instance keeps its connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_that_stall_or_idle_are_closed() {
    let big = demo_backend(&["--body-bytes", "4194304"]);
    let gw = gateway_with_server_keys(
        "header_read_timeout = \"1s\"\nidle_timeout = \"2s\"",
        &app_config(&[&big], ""),
    );
    let closes_within = |seconds: u64, mut stream: TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(seconds)))
            .unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(err) => {
                    return !matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
            }
        }
    };
    // Half a preface: hyper would wait for the rest forever.
    let mut partial = TcpStream::connect(gw.proxy).unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    assert!(
        closes_within(8, partial),
        "a half-sent preface kept its connection"
    );

    // A request to an instance slower than idle_timeout is answered; then the idle
    // connection is closed.
    let socket = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (mut sender, connection) = h2::client::handshake(socket).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(gw.url("/slow?latency_ms=2500"))
        .body(())
        .unwrap();
    let (answer, _) = sender.send_request(request, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    let mut received = 0;
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        received += data.len();
        body.flow_control().release_capacity(data.len()).unwrap();
    }
    assert_eq!(received, 4 << 20);
    // The client keeps its side open (`sender` lives on): only the gateway can end it.
    let idle_since = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(8), connection).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
    assert!(
        idle_since.elapsed() >= Duration::from_millis(1500),
        "closed before it was idle for idle_timeout"
    );
    drop(sender);

    // A client that takes none of a large answer: while another stream on the connection waits
    // on a slow instance, and then takes its answer, the connection stays; once the unread
    // answer is all that is left, the connection is dropped and the request stops counting as
    // in flight.
    let socket = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (mut sender, connection) = h2::client::Builder::new()
        .initial_window_size(16 << 10)
        .handshake::<_, bytes::Bytes>(socket)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(gw.url("/big")).body(()).unwrap();
    let (answer, _) = sender.send_request(request, true).unwrap();
    let _unread = answer.await.unwrap();
    let request = http::Request::get(gw.url("/slow?latency_ms=3000"))
        .body(())
        .unwrap();
    let (answer, _) = sender.send_request(request, true).unwrap();
    let mut body = answer
        .await
        .expect("a stream beside a paused one was cut")
        .into_body();
    let mut received = 0;
    while let Some(data) = body.data().await {
        let data = data.expect("a stream beside a paused one was cut");
        received += data.len();
        body.flow_control().release_capacity(data.len()).unwrap();
    }
    assert_eq!(received, 4 << 20);
    let ended = tokio::time::timeout(Duration::from_secs(8), connection).await;
    assert!(ended.is_ok(), "a client taking no data kept its connection");
    let client = client();
    let idle = || {
        let (client, url) = (client.clone(), gw.admin_url("/metrics"));
        async move {
            let metrics = get(&client, &url).await;
            String::from_utf8_lossy(&metrics.body).contains("scalegate_in_flight_requests 0")
        }
    };
    assert!(
        eventually(Duration::from_secs(5), idle).await,
        "the stalled request still counts as in flight"
    );
}

/// The descriptors `pid` has open, once those of starting up have settled (the same set twice
/// running), and a function that sets its descriptor limit (soft; the hard one stays above).
fn settled_descriptors(pid: u32) -> (Vec<u64>, impl Fn(u64)) {
    let open_fds = || -> Vec<u64> {
        let mut fds: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        fds.sort_unstable();
        fds
    };
    let mut open = open_fds();
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(50));
        let again = open_fds();
        if again == open {
            break;
        }
        open = again;
    }
    let hard = open.last().copied().unwrap_or(0) + 128;
    let limit = move |soft: u64| {
        let status = std::process::Command::new("prlimit")
            .args([
                "--pid",
                &pid.to_string(),
                &format!("--nofile={soft}:{hard}"),
            ])
            .status()
            .unwrap();
        assert!(status.success(), "prlimit failed");
    };
    (open, limit)
}

/// The lowest descriptor limit that leaves `free` descriptors free besides those `open`.
fn limit_leaving(open: &[u64], free: u64) -> u64 {
    (1..)
        .find(|limit| limit - open.iter().filter(|fd| *fd < limit).count() as u64 == free)
        .unwrap()
}

/// Out of file descriptors, a request that cannot reach an instance is the gateway's shortage:
/// a 503 saying so, the instance not held to blame (nginx answers 500 and blames none either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_blames_no_instance() {
    let a = demo_backend(&[]);
    // No pooled connection to the instance: every request needs a new descriptor.
    let gw = gateway(&app_config(&[&a], "max_fails = 1\nkeepalive = 0"));
    let client = client();
    let (open, limit) = settled_descriptors(gw.proc.pid());
    // One descriptor free: the client's connection takes it, and nothing is left for a
    // connection to the instance.
    limit(limit_leaving(&open, 1));
    let answer = raw_exchange(gw.proxy, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    limit(limit_leaving(&open, 64));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("gateway_short_of_resources"), "{answer}");
    // And closes the connection, freeing the descriptor it is short of: a keep-alive client
    // retrying on it would hold it for good (nginx closes too).
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
    let instance = &detailed["upstreams"][0]["instances"][0];
    assert_eq!(instance["failures"], 0, "{detailed}");
    assert_eq!(get(&client, &gw.url("/")).await.status, 200);
}

/// Out of descriptors because a burst left idle connections in the pools (an HTTP/2 client's
/// streams each took one), the gateway closes them rather than leave new clients waiting in
/// the listen queue until `idle_timeout`, without even a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_give_way_when_descriptors_run_out() {
    const STREAMS: usize = 16;
    let a = demo_backend(&["--latency-ms", "300"]);
    let gw = gateway(&app_config(&[&a], "keepalive = 64\npipeline = 1"));
    let (open, limit) = settled_descriptors(gw.proc.pid());
    // Room for the HTTP/2 client and an instance connection for each of its streams: once it
    // is gone, one descriptor is free and the pool holds the rest. Kept, they would let the
    // 12 clients below in one at a time, 300 ms each, past the clients' 3 s.
    limit(limit_leaving(&open, STREAMS as u64 + 1));
    let h2 = h2c_client();
    let burst = (0..STREAMS).map(|n| {
        let (h2, url) = (h2.clone(), gw.url(&format!("/s{n}")));
        async move { get(&h2, &url).await.status }
    });
    assert_eq!(futures_util::future::join_all(burst).await, [200; STREAMS]);
    drop(h2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let clients = (0..12).map(|_| raw_exchange_off_thread(gw.proxy, request));
    let answers = futures_util::future::join_all(clients).await;
    limit(limit_leaving(&open, 64));
    // Each one answered at once: served, or refused for want of descriptors (12 clients need
    // 24), none left waiting.
    let served = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 200"))
        .count();
    let refused = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 503") && a.contains("gateway_short_of_resources"))
        .count();
    assert_eq!(served + refused, answers.len(), "{answers:?}");
    assert!(served >= 6, "{answers:?}");
}

/// A request that finds no descriptor for its instance connection while idle connections to
/// another upstream hold them: those are closed and the request goes once more, served rather
/// than refused with the 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_short_of_a_descriptor_goes_again_once_idle_ones_are_closed() {
    let a = demo_backend(&["--latency-ms", "200"]);
    let b = demo_backend(&[]);
    let gw = gateway(&format!(
        "[upstreams.a]\ninstances = [\"{}\"]\npipeline = 1\n[upstreams.b]\ninstances = [\"{}\"]\n\
         [[routes]]\npath_prefix = \"/b\"\nupstream = \"b\"\n[[routes]]\nupstream = \"a\"\n",
        a.addr(),
        b.addr()
    ));
    let (open, limit) = settled_descriptors(gw.proc.pid());
    // An HTTP/2 client and a connection to `a` for each of its 4 streams, which then wait in
    // `a`'s pool: one descriptor is left.
    limit(limit_leaving(&open, 6));
    let h2 = h2c_client();
    let burst = (0..4).map(|n| {
        let (h2, url) = (h2.clone(), gw.url(&format!("/a{n}")));
        async move { get(&h2, &url).await.status }
    });
    assert_eq!(futures_util::future::join_all(burst).await, [200; 4]);
    // The client's connection takes the free one, none is left for `b`'s.
    let request = b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange_off_thread(gw.proxy, request).await;
    limit(limit_leaving(&open, 64));
    drop(h2);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Active checks that cannot open a connection for want of descriptors pass no verdict: the
/// instance stays up (with `fall = 1` one failed check would take it out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_skip_a_round_the_gateway_cannot_open() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(
        &[&a],
        "health = { interval = \"100ms\", fall = 1, rise = 50 }",
    ));
    let client = client();
    let up = || {
        let (client, url) = (client.clone(), gw.admin_url("/health/detailed"));
        async move {
            let detailed = get(&client, &url).await.json();
            detailed["upstreams"][0]["instances"][0]["state"] == "up"
        }
    };
    assert!(eventually(Duration::from_secs(10), up).await);
    let (open, limit) = settled_descriptors(gw.proc.pid());
    limit(limit_leaving(&open, 0));
    tokio::time::sleep(Duration::from_millis(600)).await;
    limit(limit_leaving(&open, 64));
    let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
    let instance = &detailed["upstreams"][0]["instances"][0];
    assert_eq!(instance["state"], "up", "{detailed}");
}

/// An HTTP/2 head over `max_headers` or `max_header_size` gets the 431 an HTTP/1.1 one gets: a
/// JSON answer with the request ID, and an access-log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_http2_head_gets_the_json_431() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let client = h2c_client();
    let names: Vec<String> = (0..150).map(|i| format!("x-field-{i}")).collect();
    let mut many: Vec<(&str, &str)> = names.iter().map(|name| (name.as_str(), "1")).collect();
    many.push(("x-request-id", "many-fields"));
    let long = "a".repeat(40 << 10);
    let large = [("x-large", long.as_str()), ("x-request-id", "large-field")];
    for (fields, id) in [(&many[..], "many-fields"), (&large[..], "large-field")] {
        let reply = request(&client, "GET", &gw.url("/"), fields, "")
            .await
            .unwrap();
        assert_eq!(reply.status, 431, "{id}");
        let json = reply.json();
        assert_eq!(json["error"], "headers_too_large", "{json}");
        assert_eq!(json["request_id"], id, "{json}");
    }
    assert_eq!(backend_requests(&support::client(), &a).await, 0);
    let metrics = get(&support::client(), &gw.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(
        metrics.lines().any(
            |line| line.starts_with("scalegate_requests_total{route=\"-\"")
                && line.contains("status=\"4xx\"")
                && line.ends_with(" 2")
        ),
        "{metrics}"
    );
}

/// The HTTP/2 send timeout follows the client's real pace: a client reading a large cached
/// answer slowly but steadily gets all of it, and one that opens no window at all, even for an
/// answer of one frame, loses its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http2_send_timeout_follows_the_clients_pace() {
    let big = demo_backend(&["--body-bytes", "400000"]);
    let gw = gateway_with_server_keys(
        "idle_timeout = \"2s\"",
        &format!(
            "[upstreams.app]\ninstances = [\"{}\"]\n\n[[routes]]\nupstream = \"app\"\n\
             cache = {{ ttl = \"60s\", max_body = \"1MiB\" }}\n",
            big.addr()
        ),
    );
    let h2c = |window: u32| {
        let proxy = gw.proxy;
        async move {
            let socket = tokio::net::TcpStream::connect(proxy).await.unwrap();
            let (sender, connection) = h2::client::Builder::new()
                .initial_window_size(window)
                .handshake::<_, bytes::Bytes>(socket)
                .await
                .unwrap();
            (sender, tokio::spawn(connection))
        }
    };
    assert_eq!(get(&client(), &gw.url("/page")).await.status, 200);
    let (mut sender, _connection) = h2c(16 << 10).await;
    let request = http::Request::get(gw.url("/page")).body(()).unwrap();
    let (answer, _) = sender.send_request(request, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.headers()["x-cache-status"], "HIT");
    let mut body = answer.into_body();
    let mut received = 0;
    // 16 KiB every 200 ms: 400 kB take about 5 s, more than twice idle_timeout, with room for
    // a busy machine's delays between reads.
    while let Some(data) = body.data().await {
        let data = data.expect("a steady reader was cut off");
        received += data.len();
        tokio::time::sleep(Duration::from_millis(200)).await;
        body.flow_control().release_capacity(data.len()).unwrap();
    }
    assert_eq!(received, 400_000);

    let (mut sender, connection) = h2c(0).await;
    let request = http::Request::get(gw.url("/health")).body(()).unwrap();
    let (answer, _) = sender.send_request(request, true).unwrap();
    let _unread = answer.await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(8), connection).await;
    assert!(
        ended.is_ok(),
        "a client opening no window kept its connection"
    );
}

/// A stream whose client takes nothing of its answer lets its instance connection go after
/// `idle_timeout`, while the connection goes on serving its other streams (nginx's per-stream
/// `send_timeout`): five paused downloads held five instance connections for as long as the
/// client kept another stream busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_http2_stream_lets_its_instance_connection_go() {
    let big = demo_backend(&["--body-bytes", "400000"]);
    let quick = demo_backend(&[]);
    let gw = gateway_with_server_keys(
        "idle_timeout = \"1s\"",
        &format!(
            "[upstreams.big]\ninstances = [\"{}\"]\n[upstreams.quick]\ninstances = [\"{}\"]\n\n\
             [[routes]]\npath_prefix = \"/big\"\nupstream = \"big\"\n\
             [[routes]]\nupstream = \"quick\"\n",
            big.addr(),
            quick.addr()
        ),
    );
    let socket = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    // Each stream's window takes one frame; the connection's, everything.
    let (mut sender, connection) = h2::client::Builder::new()
        .initial_window_size(16 << 10)
        .initial_connection_window_size(8 << 20)
        .handshake::<_, bytes::Bytes>(socket)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut paused = Vec::new();
    for _ in 0..5 {
        let request = http::Request::get(gw.url("/big")).body(()).unwrap();
        let (answer, _) = sender.send_request(request, true).unwrap();
        paused.push(answer.await.unwrap());
    }
    let client = client();
    let big_in_flight = || async {
        let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
        let big = named(&detailed["upstreams"], "big");
        big["instances"][0]["in_flight"].as_u64().unwrap()
    };
    assert_eq!(big_in_flight().await, 5);
    // The connection stays busy on quick requests, past twice idle_timeout.
    let deadline = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < deadline {
        let request = http::Request::get(gw.url("/quick")).body(()).unwrap();
        let (answer, _) = sender.send_request(request, true).unwrap();
        let answer = answer.await.expect("the busy stream's connection was kept");
        assert_eq!(answer.status(), 200);
        let mut body = answer.into_body();
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            body.flow_control().release_capacity(data.len()).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        big_in_flight().await,
        0,
        "paused streams still hold the instance"
    );
    assert!(!connection.is_finished());
    drop(paused);
}

/// Out of file descriptors, the gateway keeps running: each listener (the proxy's and the admin
/// API's) says so once (not at every retry, nor again each time one freed descriptor lets an
/// accept through), and the connections that waited in the listen queue are served once
/// descriptors are free.
#[test]
fn running_out_of_file_descriptors_is_logged_once_and_recovered_from() {
    let a = demo_backend(&[]);
    let gw = gateway_logging(&app_config(&[&a], ""));
    let pid = gw.proc.child.id();
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = format!("--nofile={0}:{0}", open_fds + 16);
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    // Lines of the log saying `text` of `listener`.
    let logged = |text: &str, listener: &str| {
        let listener = format!("\"listener\":\"{listener}\"");
        let lines = gw.proc.log_lines();
        lines
            .iter()
            .filter(|line| line.contains(text) && line.contains(&listener))
            .count()
    };
    let failing = "accept failed: retrying every 20 ms until it works";
    let again = "accepting connections again";
    // The log comes through a pipe read by another thread: wait for a line to arrive.
    let logged_soon = |text: &str, listener: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while logged(text, listener) == 0 {
            assert!(
                Instant::now() < deadline,
                "{listener} never logged {text:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut held: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(gw.proxy).unwrap())
        .collect();
    logged_soon(failing, "proxy");
    let _admin_waiting: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(gw.admin).unwrap())
        .collect();
    logged_soon(failing, "admin");
    // The last connection still waits to be accepted; its request is answered once the others
    // close and free their descriptors.
    let mut waiting = held.pop().unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(held);
    let mut answer = String::new();
    waiting.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Said once each, though descriptors freed one by one let accepts through between failures.
    for listener in ["proxy", "admin"] {
        assert_eq!(logged(failing, listener), 1, "{:#?}", gw.proc.log_lines());
    }
    // Over once accepting has gone a second without failing: the next connection says so.
    std::thread::sleep(Duration::from_millis(1100));
    let get = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    for (listener, addr) in [("proxy", gw.proxy), ("admin", gw.admin)] {
        let answer = raw_exchange(addr, get);
        assert!(answer.starts_with("HTTP/1.1 200"), "{listener}: {answer}");
        logged_soon(again, listener);
        assert_eq!(logged(again, listener), 1, "{:#?}", gw.proc.log_lines());
        assert_eq!(logged(failing, listener), 1);
    }
}
