//! Limits against abuse, end to end: connection caps refuse cleanly and count, a slowloris
//! client is cut off while others are served, an over-long URI gets 414.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

#[tokio::test]
async fn per_ip_connection_cap_refuses_cleanly_and_frees_on_close() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys("max_connections_per_ip = 2", &app_config(&[&a], ""));
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_while_others_are_served() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys("header_read_timeout = \"1s\"", &app_config(&[&a], ""));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_tunnelled_and_count_as_in_flight() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
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
        ws.write_all(&frame).unwrap();
        let mut echoed = [0u8; 11];
        ws.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, frame);
    }
    let client = client();
    let in_flight = || async {
        let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
        detailed["upstreams"][0]["instances"][0]["in_flight"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(in_flight().await, 1, "an open tunnel counts as in flight");
    drop(ws);
    assert!(
        eventually(Duration::from_secs(5), || async { in_flight().await == 0 }).await,
        "the tunnel's in-flight count was not released"
    );
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
