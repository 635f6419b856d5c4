//! End-to-end tests of the proxy core: real gateway and demo-backend processes on loopback.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

async fn instance_counts(
    client: &Client,
    gw: &Gateway,
    n: usize,
    headers: &[(&str, &str)],
) -> HashMap<String, u32> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let reply = request(client, "GET", &gw.url("/work"), headers, "")
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
        *counts
            .entry(reply.header("x-instance").to_string())
            .or_default() += 1;
    }
    counts
}

/// `POST /api/upstreams/app/instances` with `addr`.
async fn add_instance(client: &Client, gw: &Gateway, addr: std::net::SocketAddr) -> Reply {
    let body = format!("{{\"addr\": \"{addr}\"}}");
    let url = gw.admin_url("/api/upstreams/app/instances");
    request(client, "POST", &url, &[], &body).await.unwrap()
}

/// The state `/api/upstreams` gives the instance at `addr` of the first upstream.
#[tokio::test]
async fn round_robin_spreads_evenly_and_weights_count() {
    let a = demo_backend(&[]);
    let b = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a, &b], ""));
    let client = client();
    let counts = instance_counts(&client, &gw, 40, &[]).await;
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![20, 20]);

    let weighted = format!(
        "[upstreams.app]\ninstances = [\"{}\", {{ addr = \"{}\", weight = 3 }}]\n[[routes]]\nupstream = \"app\"\n",
        a.addr(),
        b.addr()
    );
    let gw = gateway(&weighted);
    let counts = instance_counts(&client, &gw, 40, &[]).await;
    assert_eq!(counts[&a.addr().port().to_string()], 10);
    assert_eq!(counts[&b.addr().port().to_string()], 30);
}

#[tokio::test]
async fn fail_on_status_takes_an_instance_answering_500_out() {
    let failing = demo_backend(&["--fail-rate", "1"]);
    let fine = demo_backend(&[]);
    let client = client();
    let statuses = |gw: Gateway| {
        let client = client.clone();
        async move {
            let mut statuses = Vec::new();
            for _ in 0..6 {
                statuses.push(get(&client, &gw.url("/work")).await.status);
            }
            statuses.iter().filter(|s| **s == 500).count()
        }
    };
    // By default an answer is an answer: round robin sends every other request to it.
    let plain = gateway(&app_config(&[&failing, &fine], ""));
    assert_eq!(statuses(plain).await, 3);
    // Counted as a failure, the first 500 takes it out (max_fails = 1); the 500 itself still
    // reaches the client, never retried.
    let counted = gateway(&app_config(
        &[&failing, &fine],
        "fail_on_status = [500, 502, 503]",
    ));
    assert_eq!(statuses(counted).await, 1);
}

/// `retry_on_status` (nginx's `proxy_next_upstream http_500`): an idempotent request answered
/// with a listed status goes to another instance; a POST's answer is passed on as it came; and
/// when every try was answered so, the client gets the last answer rather than a 502.
#[tokio::test]
async fn retry_on_status_tries_an_idempotent_request_on_another_instance() {
    let failing = demo_backend(&["--fail-rate", "1"]);
    let fine = demo_backend(&[]);
    let client = client();
    let gw = gateway(&app_config(&[&failing, &fine], "retry_on_status = [500]"));
    for _ in 0..20 {
        assert_eq!(get(&client, &gw.url("/work")).await.status, 200);
    }
    assert_eq!(backend_requests(&client, &failing).await, 10);
    assert_eq!(backend_requests(&client, &fine).await, 20);
    // Each 500 was read whole before the retry: its connection went back to the pool (dropped
    // unread, it was closed, and so was the pipelined line it served: 11 connections for 10).
    let stats = get(&client, &format!("http://{}/__stats", failing.addr())).await;
    let connections = stats.json()["connections"].as_u64().unwrap();
    assert!(connections <= 2, "{}", stats.json());
    let mut posts = Vec::new();
    for _ in 0..4 {
        let reply = request(&client, "POST", &gw.url("/work"), &[], "x").await;
        posts.push(reply.unwrap().status);
    }
    posts.sort_unstable();
    assert_eq!(posts, [200, 200, 500, 500]);

    let also_failing = demo_backend(&["--fail-rate", "1"]);
    let gw = gateway(&app_config(
        &[&failing, &also_failing],
        "retry_on_status = [500]",
    ));
    let reply = get(&client, &gw.url("/work")).await;
    assert_eq!(reply.status, 500);
    assert_eq!(
        backend_requests(&client, &failing).await + backend_requests(&client, &also_failing).await,
        10 + 2 + 2,
        "each instance tried once"
    );
}

/// An upgrade answered with a listed status is tried again too, and the next instance's 101
/// switches the client: the client's side of the connection had gone with the first answer,
/// and that 101 was taken for a switch nobody asked for (a 502).
#[tokio::test]
async fn retry_on_status_carries_an_upgrade_to_the_instance_that_switches() {
    // Answers every request 500 (demo-backend's failures spare /upgrade).
    let failing = raw_instance(|mut stream, _| {
        use std::io::Write;
        if read_until(&mut stream, b"\r\n\r\n").is_none() {
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    });
    let fine = demo_backend(&[]);
    let gw = gateway(&app_config_at(
        &[failing, fine.addr()],
        "retry_on_status = [500]",
    ));
    let upgrade =
        b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
    // Round robin: one of the two goes to the failing instance first, then to the other.
    let (first, second) = tokio::join!(
        raw_exchange_off_thread(gw.proxy, upgrade),
        raw_exchange_off_thread(gw.proxy, upgrade)
    );
    let mut statuses: Vec<&str> = [&first, &second]
        .iter()
        .map(|answer| answer.get(9..12).unwrap_or(""))
        .collect();
    statuses.sort_unstable();
    assert_eq!(statuses, ["101", "101"], "{first}\n{second}");
}

/// A passive ejection the active checks never saw fail (an instance restarted between two of
/// them) ends after `rise` passing checks, not after all of `fail_timeout`, as HAProxy and
/// Envoy do. One for the instance's answers (`fail_on_status`) does not: its health endpoint
/// passing says nothing of those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_active_checks_end_an_ejection_for_failing_to_answer() {
    let mut restarted = demo_backend(&[]);
    let fine = demo_backend(&[]);
    let failing = demo_backend(&["--fail-rate", "1"]);
    let client = client();
    let gw = gateway(&app_config(
        &[&restarted, &fine, &failing],
        "fail_on_status = [500]\nfail_timeout = \"60s\"\n[upstreams.app.health]\ninterval = \"500ms\"\nrise = 2\nfall = 3",
    ));
    let state = |proc: &Proc| {
        let (client, gw, addr) = (client.clone(), &gw, proc.addr().to_string());
        async move { instance_state(&client, gw, addr).await }
    };
    let all_up = eventually(Duration::from_secs(5), || async {
        state(&restarted).await == "up" && state(&failing).await == "up"
    });
    assert!(all_up.await);
    // Down for less than `fall` checks: only requests see it, and they take it out.
    let port = restarted.addr().port().to_string();
    drop(restarted);
    for _ in 0..6 {
        get(&client, &gw.url("/work")).await;
    }
    restarted = spawn(&["demo-backend", "--port", &port], 1);
    assert_eq!(state(&restarted).await, "failed");
    assert_eq!(state(&failing).await, "failed");
    let back = eventually(Duration::from_secs(5), || async {
        state(&restarted).await == "up"
    });
    assert!(back.await, "still out, while its checks pass");
    assert_eq!(
        state(&failing).await,
        "failed",
        "back though it answers 500s"
    );
}

/// `strip_prefix` (nginx `proxy_pass http://app/;`, Traefik's StripPrefix): the instance gets
/// the path without the route's prefix, the query, and `X-Forwarded-Prefix` (the client's own
/// replaced); other routes pass the path as sent. A path matched only in its normalized form
/// goes in that form.
#[tokio::test]
async fn a_route_can_strip_its_prefix() {
    let a = demo_backend(&[]);
    let gw = gateway(&format!(
        "[upstreams.app]\ninstances = [\"{}\"]\n[[routes]]\npath_prefix = \"/api/\"\n\
         strip_prefix = true\nupstream = \"app\"\n[[routes]]\nupstream = \"app\"\n",
        a.addr()
    ));
    let client = client();
    let echo = |path: &'static str| {
        let (client, url) = (client.clone(), gw.url(path));
        async move {
            let reply = request(&client, "GET", &url, &[("x-forwarded-prefix", "/evil")], "")
                .await
                .unwrap();
            assert_eq!(reply.status, 200, "{path}");
            let json = reply.json();
            let prefix = json["headers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|pair| pair[0] == "x-forwarded-prefix")
                .map(|pair| pair[1].as_str().unwrap().to_string())
                .collect::<Vec<String>>();
            (json["uri"].as_str().unwrap().to_string(), prefix)
        }
    };
    assert_eq!(
        echo("/api/echo?x=1").await,
        ("/echo?x=1".to_string(), vec!["/api".to_string()])
    );
    // A client's own is not passed on elsewhere either, as X-Forwarded-Host is not.
    assert_eq!(echo("/echo").await, ("/echo".to_string(), vec![]));
    let normalized = raw_exchange(
        gw.proxy,
        b"GET //api/./echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(normalized.contains("\"uri\":\"/echo\""), "{normalized}");
}

#[tokio::test]
async fn a_retry_leaves_the_rotation_as_it_was() {
    // One of two instances refuses connections and passive checks are off: every request is
    // served, and the refusing one is met first by every other request, not by all of them.
    let live = demo_backend(&[]);
    let dead = dead_addr();
    let client = client();
    for strategy in ["round_robin", "least_conn"] {
        let gw = gateway(&app_config_at(
            &[dead, live.addr()],
            &format!("strategy = \"{strategy}\"\nmax_fails = 0"),
        ));
        let counts = instance_counts(&client, &gw, 10, &[]).await;
        assert_eq!(counts.values().sum::<u32>(), 10);
        let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
        let instances = detailed["upstreams"][0]["instances"].as_array().unwrap();
        let failures = instances
            .iter()
            .find(|i| i["addr"] == dead.to_string())
            .map(|i| i["failures"].as_u64().unwrap());
        assert_eq!(failures, Some(5), "{strategy}: {detailed}");
    }
}

/// A gateway just started retries every request in flight on an instance that drops them all
/// at once: its retry budget starts with its savings full. Started empty, it allowed 20 % of
/// the requests seen so far plus the floor's 10 a second, and the rest got 502s though the
/// other instance was up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_gateway_retries_every_request_an_instance_drops() {
    const REQUESTS: usize = 60;
    // Reads each request, then closes its connection unanswered half a second later: by then
    // every request is in flight, half of them here.
    let dropping = raw_instance(|mut stream, _| {
        read_until(&mut stream, b"\r\n\r\n");
        std::thread::sleep(Duration::from_millis(500));
    });
    let live = demo_backend(&[]);
    let gw = gateway(&app_config_at(
        &[dropping, live.addr()],
        "strategy = \"round_robin\"",
    ));
    let client = client();
    let requests: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (client, url) = (client.clone(), gw.url("/"));
            tokio::spawn(async move { get(&client, &url).await.status })
        })
        .collect();
    let mut statuses = Vec::new();
    for request in requests {
        statuses.push(request.await.unwrap());
    }
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(backend_requests(&client, &live).await, REQUESTS as u64);
}

/// The retry budget pays only for retries that have an instance to go to: with both
/// instances refusing, each request's second failure (no instance left, one retry still allowed)
/// spent a second retry for nothing, and within a second the budget's floor of ten ran out
/// after five requests, so later ones were never tried on the second instance.
#[tokio::test]
async fn a_retry_with_no_instance_left_spends_nothing_of_the_budget() {
    let gw = gateway_logging(&app_config_at(
        &[dead_addr(), dead_addr()],
        "retries = 2\nretry_budget = 0\nmax_fails = 0",
    ));
    let client = client();
    let mut ids = Vec::new();
    // Nine retries needed, ten in the floor's second (eighteen spent were past it even when the
    // requests straddled two of its seconds, unless the second turned after the fourth or fifth).
    for _ in 0..9 {
        let reply = get(&client, &gw.url("/")).await;
        assert_eq!(reply.status, 502);
        ids.push(reply.header("x-request-id").to_owned());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines = access_lines(&gw);
    for id in ids {
        assert_eq!(lines[&id]["attempts"], 2, "{}", lines[&id]);
    }
}

/// An idempotent request that got no answer within `response_timeout` goes to another instance
/// (nginx's `proxy_next_upstream error timeout`), its body too while at most 64 KiB; a POST
/// cannot, nor a PUT whose larger body went out.
#[tokio::test]
async fn a_response_timeout_is_retried_only_when_the_request_can_be_replayed() {
    let slow = demo_backend(&["--latency-ms", "10000"]);
    let fast = demo_backend(&[]);
    let gw = gateway(&app_config(
        &[&slow, &fast],
        "response_timeout = \"1s\"\nmax_fails = 0",
    ));
    let client = client();
    let fast_port = fast.addr().port().to_string();
    for _ in 0..4 {
        let reply = get(&client, &gw.url("/work")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-instance"), fast_port);
    }
    let mut posts = Vec::new();
    for _ in 0..2 {
        let reply = request(&client, "POST", &gw.url("/work"), &[], "body")
            .await
            .unwrap();
        posts.push(reply.status);
    }
    posts.sort_unstable();
    assert_eq!(posts, [200, 504]);
    // An idempotent request with a body goes again too, body and all, while what went out of
    // it was kept (64 KiB); a larger body streams through once and cannot.
    for _ in 0..2 {
        let reply = request(&client, "PUT", &gw.url("/work"), &[], "body")
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-body-received"), "4");
    }
    let large = "z".repeat(100 * 1024);
    let mut puts = Vec::new();
    for _ in 0..2 {
        let reply = request(&client, "PUT", &gw.url("/work"), &[], &large)
            .await
            .unwrap();
        puts.push(reply.status);
    }
    puts.sort_unstable();
    assert_eq!(puts, [200, 504]);

    // Part of an answer head came back: the instance acted on the request, so a GET is not
    // sent again either (504 as for any response timeout).
    let (half, _) = scripted_instance().await;
    let gw = gateway(&app_config_at(
        &[half, fast.addr()],
        "response_timeout = \"1s\"\nmax_fails = 0",
    ));
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(get(&client, &gw.url("/half-head")).await.status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 504]);
    // Nor one with a body, whose upload and answer go together.
    let mut puts = Vec::new();
    for _ in 0..2 {
        let reply = request(&client, "PUT", &gw.url("/half-head"), &[], "abc").await;
        puts.push(reply.unwrap().status);
    }
    puts.sort_unstable();
    assert_eq!(puts, [200, 504]);
}

#[tokio::test]
async fn pooled_connections_are_closed_after_idle_timeout_without_traffic() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], "idle_timeout = \"1s\""));
    let client = client();
    assert_eq!(get(&client, &gw.url("/work")).await.status, 200);
    let idle = || async {
        let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
        detailed["upstreams"][0]["instances"][0]["idle_connections"].as_u64()
    };
    assert_eq!(idle().await, Some(1));
    assert!(eventually(Duration::from_secs(5), || async { idle().await == Some(0) }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_keep_health_verdicts_and_run_time_instances_right() {
    let (a, b, c, d) = (
        demo_backend(&[]),
        demo_backend(&[]),
        demo_backend(&[]),
        demo_backend(&[]),
    );
    let checks =
        "[upstreams.app.health]\npath = \"/health\"\ninterval = \"100ms\"\nfall = 3\nrise = 2";
    let gw = gateway(&app_config(&[&a, &b], checks));
    let client = client();
    let ports = |counts: HashMap<String, u32>| {
        let mut ports: Vec<String> = counts.into_keys().collect();
        ports.sort();
        ports
    };
    let port = |p: &Proc| p.addr().port().to_string();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    // An instance added through the admin API stays across a reload that changes the
    // connection settings (it used to be dropped).
    assert_eq!(add_instance(&client, &gw, d.addr()).await.status, 201);
    let all_three = sorted(vec![port(&a), port(&b), port(&d)]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            ports(instance_counts(&client, &gw, 6, &[]).await) == all_three
        })
        .await
    );
    // An instance new in a reload must pass its checks first: c is failing them.
    set_health(&client, &c, false).await;
    set_health(&client, &b, false).await;
    let with_c = format!("connect_timeout = \"1500ms\"\n{checks}");
    gw.write_config(&app_config(&[&a, &b, &c], &with_c));
    let reload_url = gw.admin_url("/api/reload");
    let reload = request(&client, "POST", &reload_url, &[], "")
        .await
        .unwrap();
    assert_eq!(reload.status, 200);
    // At once, before any check of it ran, c gets nothing; b leaves once its checks fail.
    let first = ports(instance_counts(&client, &gw, 8, &[]).await);
    assert!(!first.contains(&port(&c)), "{first:?}");
    let serving = sorted(vec![port(&a), port(&d)]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            ports(instance_counts(&client, &gw, 8, &[]).await) == serving
        })
        .await
    );
    // Requests a has served so far, as /health/detailed counts them.
    let served_by_a = || async {
        let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
        detailed["upstreams"][0]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["addr"] == a.addr().to_string())
            .and_then(|i| i["requests"].as_u64())
            .unwrap()
    };
    let before = served_by_a().await;
    assert!(before > 0);
    // Without [health] the checks' last verdict no longer holds: b and c serve again. The
    // instances are rebuilt for the new settings and keep their counters.
    gw.reload_with(&app_config(&[&a, &b, &c], "connect_timeout = \"1200ms\""));
    assert!(served_by_a().await >= before, "a's counters started afresh");
    let everyone = sorted(vec![port(&a), port(&b), port(&c), port(&d)]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            ports(instance_counts(&client, &gw, 12, &[]).await) == everyone
        })
        .await
    );
}

/// A reload that swaps an upstream's instance for another fails no request: the new one
/// serves at once when nothing else would. One added beside a serving instance waits for a
/// check, and one passing check brings it in (`rise` is for instances that failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swapping_instances_fails_no_request() {
    let (a, b, c) = (demo_backend(&[]), demo_backend(&[]), demo_backend(&[]));
    let checks = "[upstreams.app.health]\ninterval = \"5s\"\nrise = 3";
    let gw = gateway(&app_config(&[&a], checks));
    let client = client();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (client, url, stop, failed) =
            (client.clone(), gw.url("/"), stop.clone(), failed.clone());
        tokio::spawn(async move {
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if get(&client, &url).await.status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.reload_with(&app_config(&[&b], checks));
    assert!(
        eventually(Duration::from_secs(5), || async {
            backend_requests(&client, &b).await > 0
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.reload_with(&app_config(&[&b, &c], checks));
    let c_serves = eventually(Duration::from_secs(3), || async {
        backend_requests(&client, &c).await > 0
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        c_serves,
        "the added instance waited for more than one check"
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
}

/// The admin port holds no client for good: HTTP/1.1 alone (an HTTP/2 preface is refused and
/// closed), a body that stalls gets 408, and connections past 256 are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_bounds_what_clients_hold() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    // Reads until the peer closes (true), or `limit` passes (false); what came is returned.
    async fn until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> (bool, String) {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 1024];
        let closed = tokio::time::timeout(limit, async {
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .is_ok();
        (closed, String::from_utf8_lossy(&seen).into_owned())
    }
    let mut h2 = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let (closed, _) = until_closed(&mut h2, Duration::from_secs(5)).await;
    assert!(closed, "an HTTP/2 preface kept the admin connection open");

    let mut stalled = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    let head = "POST /api/upstreams/app/instances HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"addr\":";
    stalled.write_all(head.as_bytes()).await.unwrap();
    let (_, answer) = until_closed(&mut stalled, Duration::from_secs(15)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    let mut held = Vec::new();
    for _ in 0..256 {
        held.push(tokio::net::TcpStream::connect(gw.admin).await.unwrap());
    }
    let mut over = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    let _ = over
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (closed, answer) = until_closed(&mut over, Duration::from_secs(5)).await;
    assert!(closed && answer.is_empty(), "{answer}");
    drop(held);
    // Until the gateway has seen them close, the port is still full: a request may be cut.
    let health = eventually(Duration::from_secs(5), || async {
        let reply = request(&client(), "GET", &gw.admin_url("/health"), &[], "").await;
        reply.is_ok_and(|reply| reply.status == 200)
    })
    .await;
    assert!(
        health,
        "the admin port did not serve again once connections closed"
    );

    // Live streams, which hold their connection as long as their page is open, take a quarter
    // of the places at most: 256 of them had kept /health out for good.
    async fn stream_head(stream: &mut tokio::net::TcpStream) -> String {
        stream
            .write_all(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut chunk = [0u8; 512];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    }
    let mut streams = Vec::new();
    for _ in 0..64 {
        let mut stream = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
        assert!(stream_head(&mut stream).await.starts_with("HTTP/1.1 200"));
        streams.push(stream);
    }
    let mut over = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    let refused = stream_head(&mut over).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("connection: close"), "{refused}");
    assert_eq!(get(&client(), &gw.admin_url("/health")).await.status, 200);
}

/// Admin changes are logged with the client that asked, and wrong credentials are logged too
/// (a first request without any is how a browser learns it needs them: not logged).
#[tokio::test]
async fn admin_changes_and_refused_credentials_name_the_client() {
    let a = demo_backend(&[]);
    let b = demo_backend(&[]);
    let gw = gateway_logging(&format!(
        "[admin]\nusername = \"ops\"\npassword = \"s3cret\"\n{}",
        app_config(&[&a], "")
    ));
    let client = client();
    let url = gw.admin_url("/api/upstreams/app/instances");
    let body = format!("{{\"addr\":\"{}\"}}", b.addr());
    let bare = request(&client, "POST", &url, &[], &body).await.unwrap();
    assert_eq!(bare.status, 401);
    let wrong = [("authorization", "Basic b3BzOndyb25n")];
    let refused = request(&client, "POST", &url, &wrong, &body).await.unwrap();
    assert_eq!(refused.status, 401);
    let right = [("authorization", "Basic b3BzOnMzY3JldA==")];
    let added = request(&client, "POST", &url, &right, &body).await.unwrap();
    assert_eq!(added.status, 201);
    let logged = |message: &str| {
        gw.proc
            .log_lines()
            .into_iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
            .filter(|line| line["message"] == message)
            .collect::<Vec<_>>()
    };
    let found = eventually(Duration::from_secs(3), || async {
        !logged("instance added").is_empty()
    })
    .await;
    assert!(found, "{:?}", gw.proc.log_lines());
    let client_of =
        |line: &serde_json::Value| line["span"]["client"].as_str().unwrap_or("").to_owned();
    assert!(client_of(&logged("instance added")[0]).starts_with("127.0.0.1:"));
    let refusals = logged("admin credentials refused");
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(
        client_of(&refusals[0]).starts_with("127.0.0.1:"),
        "{refusals:?}"
    );
    // A reload through the API too, though it runs off the request's task.
    let reload = gw.admin_url("/api/reload");
    let reloaded = request(&client, "POST", &reload, &right, "").await.unwrap();
    assert_eq!(reloaded.status, 200);
    let found = eventually(Duration::from_secs(3), || async {
        !logged("configuration reloaded").is_empty()
    })
    .await;
    assert!(found, "{:?}", gw.proc.log_lines());
    let line = &logged("configuration reloaded")[0];
    assert!(client_of(line).starts_with("127.0.0.1:"), "{line}");
}

#[tokio::test]
async fn the_admin_api_answers_odd_requests_clearly() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let client = client();
    let call = |method: &'static str, path: &str, body: &str| {
        let (client, url, body) = (client.clone(), gw.admin_url(path), body.to_string());
        async move { request(&client, method, &url, &[], &body).await.unwrap() }
    };
    // A known path with another method: 405 and what is allowed; HEAD is GET without a body.
    let wrong = call("POST", "/metrics", "").await;
    assert_eq!((wrong.status, wrong.header("allow")), (405, "GET, HEAD"));
    let head = call("HEAD", "/metrics", "").await;
    assert_eq!((head.status, head.body.len()), (200, 0));
    // The open health paths too, however a monitor or a mistyped script calls them.
    for path in ["/health", "/health/redis"] {
        let wrong = call("DELETE", path, "").await;
        assert_eq!((wrong.status, wrong.header("allow")), (405, "GET, HEAD"));
        assert_eq!(call("HEAD", path, "").await.status, 200);
    }
    assert_eq!(call("GET", "/nowhere", "").await.status, 404);
    // Port 0 is no instance; a body over 64 KiB is 413.
    let port_zero = call(
        "POST",
        "/api/upstreams/app/instances",
        r#"{"addr": "127.0.0.1:0"}"#,
    );
    assert_eq!(port_zero.await.status, 400);
    let huge = format!("{{\"addr\": \"{}\"}}", "x".repeat(70 * 1024));
    assert_eq!(
        call("POST", "/api/upstreams/app/instances", &huge)
            .await
            .status,
        413
    );
    // Addresses may be percent-encoded in the path; a second drain of an instance still
    // finishing a request says it is already draining.
    let slow = {
        let (client, url) = (client.clone(), gw.url("/work?latency_ms=3000"));
        tokio::spawn(async move { get(&client, &url).await.status })
    };
    let in_flight = || async {
        let detailed = call("GET", "/health/detailed", "").await.json();
        detailed["upstreams"][0]["instances"][0]["in_flight"].as_u64()
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            in_flight().await == Some(1)
        })
        .await
    );
    let encoded = format!(
        "/api/upstreams/app/instances/127.0.0.1%3A{}",
        a.addr().port()
    );
    let first = call("DELETE", &encoded, "").await;
    assert_eq!(
        (first.status, first.json()["already"].as_bool()),
        (202, None)
    );
    let again = call("DELETE", &encoded, "").await;
    assert_eq!(
        (again.status, again.json()["already"].as_bool()),
        (202, Some(true))
    );
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test]
async fn a_reload_sets_the_server_limits_of_new_connections() {
    let a = demo_backend(&[]);
    // Raised by the reload: the chunk-size check as the head is read follows it too.
    let gw = gateway_with_server_keys("max_body = \"1KiB\"", &app_config(&[&a], ""));
    let upload = "POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n";
    let answer = |gw: &Gateway| {
        let mut bytes = upload.as_bytes().to_vec();
        bytes.extend_from_slice(&[b'x'; 0x800]);
        bytes.extend_from_slice(b"\r\n0\r\n\r\n");
        raw_exchange(gw.proxy, &bytes)
    };
    assert!(answer(&gw).starts_with("HTTP/1.1 413"));
    gw.reload_with_server_keys("max_body = \"1MiB\"", &app_config(&[&a], ""));
    assert!(
        eventually(Duration::from_secs(5), || async {
            answer(&gw).starts_with("HTTP/1.1 200")
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn least_conn_sends_fewer_requests_to_the_slow_instance() {
    let slow = demo_backend(&["--latency-ms", "60"]);
    let fast = demo_backend(&["--latency-ms", "2"]);
    let gw = gateway(&app_config(&[&slow, &fast], "strategy = \"least_conn\""));
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let url = gw.url("/work");
        tasks.push(tokio::spawn(async move {
            for _ in 0..15 {
                assert_eq!(get(&client, &url).await.status, 200);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let slow_count = backend_requests(&client, &slow).await;
    let fast_count = backend_requests(&client, &fast).await;
    assert_eq!(slow_count + fast_count, 120);
    assert!(
        fast_count > 3 * slow_count,
        "fast {fast_count} vs slow {slow_count}"
    );
}

#[tokio::test]
async fn consistent_hash_is_sticky_per_key() {
    let backends: Vec<Proc> = (0..3).map(|_| demo_backend(&[])).collect();
    let refs: Vec<&Proc> = backends.iter().collect();
    let gw = gateway(&app_config(
        &refs,
        "strategy = \"consistent_hash\"\nhash_key = \"header:X-User\"",
    ));
    let client = client();
    let mut seen = std::collections::HashSet::new();
    for user in 0..12 {
        let user = format!("user-{user}");
        let counts = instance_counts(&client, &gw, 5, &[("x-user", &user)]).await;
        assert_eq!(
            counts.len(),
            1,
            "{user} moved between instances: {counts:?}"
        );
        seen.extend(counts.into_keys());
    }
    assert!(
        seen.len() >= 2,
        "keys should spread over instances: {seen:?}"
    );
}

#[tokio::test]
async fn backup_serves_only_when_every_primary_is_down() {
    let primary = demo_backend(&[]);
    let backup = demo_backend(&[]);
    let config = format!(
        "[upstreams.app]\ninstances = [\"{}\", {{ addr = \"{}\", backup = true }}]\n[upstreams.app.health]\ninterval = \"100ms\"\nfall = 1\nrise = 1\n[[routes]]\nupstream = \"app\"\n",
        primary.addr(),
        backup.addr()
    );
    let gw = gateway(&config);
    let client = client();
    let counts = instance_counts(&client, &gw, 10, &[]).await;
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        vec![&primary.addr().port().to_string()]
    );
    set_health(&client, &primary, false).await;
    let backup_port = backup.addr().port().to_string();
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(&client, &gw.url("/work")).await.header("x-instance") == backup_port
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_an_instance_under_load_fails_no_idempotent_request() {
    kill_one_of_three_under_load(8, 60, 5, "").await;
}

/// About 80 requests in flight on the instance killed, each on a connection of its own and owed
/// a retry at once: the retry budget's savings must cover them (they used to cover 30).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_an_instance_with_many_requests_in_flight_fails_none_of_them() {
    kill_one_of_three_under_load(240, 3, 200, "pipeline = 1").await;
}

/// `tasks` clients each sending `each` GETs in turn to three instances answering after
/// `latency_ms`; one instance is killed once each client had its first answer. No request
/// fails.
async fn kill_one_of_three_under_load(tasks: u64, each: u64, latency_ms: u64, extra: &str) {
    let latency = latency_ms.to_string();
    let a = demo_backend(&["--latency-ms", &latency]);
    let mut b = demo_backend(&["--latency-ms", &latency]);
    let c = demo_backend(&["--latency-ms", &latency]);
    let extra = format!("strategy = \"least_conn\"\n{extra}");
    let gw = gateway(&app_config(&[&a, &b, &c], &extra));
    let client = client();
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut running = Vec::new();
    for _ in 0..tasks {
        let (client, url, failures, done) = (
            client.clone(),
            gw.url("/work"),
            failures.clone(),
            done.clone(),
        );
        running.push(tokio::spawn(async move {
            for _ in 0..each {
                match request(&client, "GET", &url, &[], "").await {
                    Ok(reply) if reply.status == 200 => {}
                    other => {
                        eprintln!("failed: {:?}", other.map(|r| (r.status, r.body)));
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while done.load(Ordering::Relaxed) < tasks.max(120) {
        assert!(
            std::time::Instant::now() < deadline,
            "the first answers did not come"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Half way through the requests then in flight.
    tokio::time::sleep(Duration::from_millis(latency_ms / 2)).await;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    for task in running {
        task.await.unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), tasks * each);
    assert_eq!(failures.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn active_checks_take_an_instance_out_after_fall_and_back_after_rise() {
    let a = demo_backend(&[]);
    let b = demo_backend(&[]);
    let gw = gateway(&app_config(
        &[&a, &b],
        "[upstreams.app.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nfall = 2\nrise = 3",
    ));
    let client = client();
    let state_of = |addr: String| instance_state(&client, &gw, addr);
    set_health(&client, &a, false).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            state_of(a.addr().to_string()).await == "down"
        })
        .await
    );
    let counts = instance_counts(&client, &gw, 10, &[]).await;
    assert_eq!(
        counts.len(),
        1,
        "down instance still got traffic: {counts:?}"
    );
    let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
    assert!(detailed.to_string().contains("status 503"), "{detailed}");

    set_health(&client, &a, true).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            state_of(a.addr().to_string()).await == "up"
        })
        .await
    );
    let counts = instance_counts(&client, &gw, 10, &[]).await;
    assert_eq!(counts.len(), 2);
    // With every instance failing its checks there is nothing to try: 503.
    for backend in [&a, &b] {
        set_health(&client, backend, false).await;
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            state_of(a.addr().to_string()).await == "down"
                && state_of(b.addr().to_string()).await == "down"
        })
        .await
    );
    let reply = get(&client, &gw.url("/work")).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"], "no_healthy_instance");
}

/// An instance added through the admin API is checked at once, not at the checker's next
/// round: with checks 30 s apart it serves within a few seconds.
#[tokio::test]
async fn an_instance_added_at_run_time_is_checked_at_once() {
    let a = demo_backend(&[]);
    let b = demo_backend(&[]);
    let gw = gateway(&app_config(
        &[&a],
        "[upstreams.app.health]\ninterval = \"30s\"\nrise = 1",
    ));
    let client = client();
    assert_eq!(add_instance(&client, &gw, b.addr()).await.status, 201);
    let up = eventually(Duration::from_secs(3), || async {
        instance_state(&client, &gw, b.addr().to_string()).await == "up"
    });
    assert!(
        up.await,
        "{}",
        get(&client, &gw.admin_url("/api/upstreams")).await.json()
    );
}

/// With `port`, each instance is checked at that port of its IP (a management port): its
/// verdict there decides, whatever the instance's own port would answer.
#[tokio::test]
async fn probes_go_to_the_health_port_when_one_is_set() {
    let serving = demo_backend(&[]);
    let management = demo_backend(&[]);
    let gw = gateway(&app_config(
        &[&serving],
        &format!(
            "[upstreams.app.health]\ninterval = \"100ms\"\nfall = 1\nrise = 1\nport = {}",
            management.addr().port()
        ),
    ));
    let client = client();
    let state = || instance_state(&client, &gw, serving.addr().to_string());
    assert_eq!(state().await, "up");
    set_health(&client, &management, false).await;
    assert!(eventually(Duration::from_secs(5), || async { state().await == "down" }).await);
    assert_eq!(get(&client, &gw.url("/work")).await.status, 503);
    set_health(&client, &management, true).await;
    assert!(eventually(Duration::from_secs(5), || async { state().await == "up" }).await);
    assert_eq!(get(&client, &gw.url("/work")).await.status, 200);
}

#[tokio::test]
async fn a_slow_probe_holds_back_no_other_check_and_probes_carry_the_configured_host() {
    // One instance takes its probes and never answers (timeout 10 s); the other's checks go on
    // every 100 ms meanwhile, so it is seen down long before the slow probe times out.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let heads = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = silent.accept().await {
            let mut head = vec![0; 1024];
            let read = tokio::io::AsyncReadExt::read(&mut conn, &mut head).await;
            let head = String::from_utf8_lossy(&head[..read.unwrap_or(0)]).to_lowercase();
            seen.lock().unwrap().push(head);
            held.push(conn);
        }
    });
    let b = demo_backend(&[]);
    let gw = gateway(&app_config_at(
        &[silent_addr, b.addr()],
        "[upstreams.app.health]\ninterval = \"100ms\"\ntimeout = \"10s\"\nfall = 1\n\
         host = \"app.internal\"",
    ));
    let client = client();
    let state_of_b =
        || async { instance_state(&client, &gw, b.addr().to_string()).await == "down" };
    assert!(
        eventually(Duration::from_secs(2), || async {
            !heads.lock().unwrap().is_empty()
        })
        .await
    );
    set_health(&client, &b, false).await;
    assert!(
        eventually(Duration::from_secs(5), state_of_b).await,
        "the other instance's checks waited for the silent one's"
    );
    let head = heads.lock().unwrap()[0].clone();
    assert!(head.starts_with("get /health "), "{head}");
    assert!(head.contains("\r\nhost: app.internal\r\n"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_through_the_admin_api_loses_nothing() {
    let a = demo_backend(&["--latency-ms", "300"]);
    let b = demo_backend(&["--latency-ms", "300"]);
    let gw = gateway(&app_config(&[&a, &b], ""));
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (client, url) = (client.clone(), gw.url("/work"));
        tasks.push(tokio::spawn(async move { get(&client, &url).await.status }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = request(
        &client,
        "DELETE",
        &gw.admin_url(&format!("/api/upstreams/app/instances/{}", a.addr())),
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 202);
    // New requests go to the other instance only.
    let reply = get(&client, &gw.url("/work")).await;
    assert_eq!(reply.header("x-instance"), b.addr().port().to_string());
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            let json = get(&client, &gw.admin_url("/api/upstreams")).await.json();
            json["upstreams"][0]["instances"].as_array().unwrap().len() == 1
        })
        .await
    );
    // Fields of the wrong type are refused, not read as defaults.
    for odd in [r#""weight": "5""#, r#""backup": "yes""#, r#""wieght": 2"#] {
        let body = format!("{{\"addr\": \"{}\", {odd}}}", a.addr());
        let url = gw.admin_url("/api/upstreams/app/instances");
        let reply = request(&client, "POST", &url, &[], &body).await.unwrap();
        assert_eq!(reply.status, 400, "{odd}");
        assert!(reply.error_text().contains("body must be"));
    }
    // So are an array in place of the object, and an address no host has.
    let url = gw.admin_url("/api/upstreams/app/instances");
    for body in [
        r#"["127.0.0.1:5556", 7, true]"#,
        r#"{"addr": "0.0.0.0:80"}"#,
    ] {
        let reply = request(&client, "POST", &url, &[], body).await.unwrap();
        assert_eq!(reply.status, 400, "{body}");
    }
    let garbage = gw.admin_url("/api/upstreams/app/instances/garbage");
    let reply = request(&client, "DELETE", &garbage, &[], "").await.unwrap();
    assert_eq!(reply.status, 400);
    let json = get(&client, &gw.admin_url("/api/upstreams")).await.json();
    assert_eq!(json["upstreams"][0]["strategy"], "round_robin");
    // And it can be added back.
    assert_eq!(add_instance(&client, &gw, a.addr()).await.status, 201);
    let counts = instance_counts(&client, &gw, 4, &[]).await;
    assert_eq!(counts.len(), 2);

    // A reload during a drain brings the configured instance back into rotation, whatever the
    // drain does afterwards to the instance set it started from, with its requests in flight
    // still counted (it came back fresh, at 0, while one was running on it).
    let slow = {
        let (client, url) = (client.clone(), gw.url("/work?latency_ms=3000"));
        tokio::spawn(async move { get(&client, &url).await.status })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    for backend in [&a, &b] {
        let path = format!("/api/upstreams/app/instances/{}", backend.addr());
        let reply = request(&client, "DELETE", &gw.admin_url(&path), &[], "").await;
        assert_eq!(reply.unwrap().status, 202);
    }
    gw.reload_with(&app_config(&[&a, &b], ""));
    let both_up = |within| {
        eventually(within, || async {
            let json = get(&client, &gw.admin_url("/api/upstreams")).await.json();
            let instances = json["upstreams"][0]["instances"]
                .as_array()
                .unwrap()
                .clone();
            instances.len() == 2 && instances.iter().all(|i| i["state"] == "up")
        })
    };
    assert!(
        both_up(Duration::from_secs(2)).await,
        "the reload did not bring them back"
    );
    let json = get(&client, &gw.admin_url("/api/upstreams")).await.json();
    let in_flight: u64 = json["upstreams"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["in_flight"].as_u64().unwrap())
        .sum();
    assert_eq!(in_flight, 1, "{json}");
    assert_eq!(slow.await.unwrap(), 200);
    assert!(
        both_up(Duration::from_secs(5)).await,
        "{}",
        get(&client, &gw.admin_url("/api/upstreams")).await.json()
    );
    assert_eq!(instance_counts(&client, &gw, 4, &[]).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_can_be_cancelled_and_admin_changes_survive_reloads_at_the_same_moment() {
    let a = demo_backend(&[]);
    let b = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a, &b], ""));
    let client = client();
    let slow = {
        let (client, url) = (client.clone(), gw.url("/work?latency_ms=1000"));
        tokio::spawn(async move { get(&client, &url).await.status })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let path = format!("/api/upstreams/app/instances/{}", a.addr());
    let reply = request(&client, "DELETE", &gw.admin_url(&path), &[], "").await;
    assert_eq!(reply.unwrap().status, 202);
    // Adding it again while it drains cancels the drain: it stays once its requests are done.
    // Not with another weight, which it cannot take.
    let url = gw.admin_url("/api/upstreams/app/instances");
    let heavier = format!("{{\"addr\": \"{}\", \"weight\": 3}}", a.addr());
    let reply = request(&client, "POST", &url, &[], &heavier).await.unwrap();
    assert_eq!(reply.status, 409, "{}", reply.error_text());
    let reply = add_instance(&client, &gw, a.addr()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["undrained"], a.addr().to_string());
    assert_eq!(slow.await.unwrap(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(instance_counts(&client, &gw, 4, &[]).await.len(), 2);

    // Instances added while reloads run are kept: a reload builds on the sets in force, and an
    // addition made meanwhile went to the sets it replaced.
    let mut changes = Vec::new();
    for i in 0..60u16 {
        let (reloader, reload) = (client.clone(), gw.admin_url("/api/reload"));
        changes.push(tokio::spawn(async move {
            request(&reloader, "POST", &reload, &[], "")
                .await
                .unwrap()
                .status
        }));
        let (client, url) = (client.clone(), gw.admin_url("/api/upstreams/app/instances"));
        let body = format!("{{\"addr\": \"127.0.0.2:{}\"}}", 20000 + i);
        changes.push(tokio::spawn(async move {
            request(&client, "POST", &url, &[], &body)
                .await
                .unwrap()
                .status
        }));
    }
    for change in changes {
        assert!([200, 201].contains(&change.await.unwrap()));
    }
    let json = get(&client, &gw.admin_url("/api/upstreams")).await.json();
    assert_eq!(
        json["upstreams"][0]["instances"].as_array().unwrap().len(),
        62
    );
}

/// A reload while an instance added at run time drains keeps it in view, draining with its
/// request in flight, and its drain then removes it from the upstream in force.
#[tokio::test]
async fn a_drain_outlives_a_reload_and_stays_in_view() {
    let a = demo_backend(&[]);
    let b = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let client = client();
    assert_eq!(add_instance(&client, &gw, b.addr()).await.status, 201);
    // Round robin over two: of two requests, one holds b.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (client, url) = (client.clone(), gw.url("/work?latency_ms=1500"));
            tokio::spawn(async move { get(&client, &url).await.status })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Named as the config may name it; the answer says which instance that is.
    let path = format!("/api/upstreams/app/instances/localhost:{}", b.addr().port());
    let reply = request(&client, "DELETE", &gw.admin_url(&path), &[], "").await;
    let reply = reply.unwrap();
    assert_eq!(reply.status, 202);
    assert_eq!(reply.json()["draining"], b.addr().to_string());
    gw.write_config(&app_config(&[&a], ""));
    let reload = request(&client, "POST", &gw.admin_url("/api/reload"), &[], "").await;
    assert_eq!(reload.unwrap().status, 200);
    let json = get(&client, &gw.admin_url("/api/upstreams")).await.json();
    let instances = json["upstreams"][0]["instances"]
        .as_array()
        .unwrap()
        .clone();
    let b_view = instances.iter().find(|i| i["addr"] == b.addr().to_string());
    let b_view = b_view.unwrap_or_else(|| panic!("draining instance gone: {json}"));
    assert_eq!(b_view["state"], "draining", "{json}");
    assert_eq!(b_view["in_flight"], 1, "{json}");
    for request in slow {
        assert_eq!(request.await.unwrap(), 200);
    }
    let removed = eventually(Duration::from_secs(5), || async {
        let json = get(&client, &gw.admin_url("/api/upstreams")).await.json();
        json["upstreams"][0]["instances"].as_array().unwrap().len() == 1
    });
    assert!(removed.await);
    // Gone from the upstream in force, so it can be added again.
    assert_eq!(add_instance(&client, &gw, b.addr()).await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_loses_nothing_and_bad_config_is_refused() {
    let a = demo_backend(&["--latency-ms", "20"]);
    let b = demo_backend(&["--latency-ms", "20"]);
    let gw = gateway(&app_config(&[&a], ""));
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (client, url) = (client.clone(), gw.url("/work"));
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..30 {
                statuses.push(get(&client, &url).await.status);
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    gw.reload_with(&app_config(&[&b], ""));
    for task in tasks {
        assert!(task.await.unwrap().iter().all(|s| *s == 200));
    }
    assert!(
        eventually(Duration::from_secs(3), || async {
            get(&client, &gw.url("/work")).await.header("x-instance") == b.addr().port().to_string()
        })
        .await
    );
    // A bad config is refused through the API and the running one keeps serving.
    std::fs::write(&gw.config_path, "[upstreams.app]\nstrategy = \"fastest\"\n").unwrap();
    let reply = request(&client, "POST", &gw.admin_url("/api/reload"), &[], "")
        .await
        .unwrap();
    assert_eq!(reply.status, 422);
    assert!(reply.json()["errors"]
        .to_string()
        .contains("upstreams.app.strategy"));
    assert_eq!(get(&client, &gw.url("/work")).await.status, 200);
    // Both counted, and the last one was refused: what an alert on a bad push watches.
    let metrics = get(&client, &gw.admin_url("/metrics")).await.body;
    let metrics = String::from_utf8_lossy(&metrics);
    for sample in [
        "scalegate_config_reloads_total{result=\"applied\"} 1",
        "scalegate_config_reloads_total{result=\"refused\"} 1",
        "scalegate_config_last_reload_successful 0.0",
    ] {
        assert!(
            metrics.lines().any(|l| l == sample),
            "{sample} not in {metrics}"
        );
    }
}

/// The number of the first line of `text` that starts with `start`.
fn line_starting(text: &str, start: &str) -> usize {
    text.lines()
        .position(|line| line.starts_with(start))
        .unwrap()
        + 1
}

/// The errors of a reload the gateway refuses (422).
async fn refused_reload(client: &Client, gw: &Gateway) -> String {
    let reply = request(client, "POST", &gw.admin_url("/api/reload"), &[], "")
        .await
        .unwrap();
    assert_eq!(reply.status, 422);
    reply.json()["errors"].to_string()
}

/// A reload refused for a key that takes a restart names the key's line, in a file with an
/// unquoted `${VAR}` too (which is no TOML until filled in).
#[tokio::test]
async fn a_refused_reload_names_the_line_in_a_file_with_unquoted_variables() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys(
        "max_headers = ${SG_TEST_NOT_SET_MH:-50}",
        &app_config(&[&a], ""),
    );
    let client = client();
    let running = std::fs::read_to_string(&gw.config_path).unwrap();
    let listen_line = line_starting(&running, "listen = ");
    let moved = running.replacen(
        "\nlisten = \"127.0.0.1:0\"",
        &format!("\nlisten = \"127.0.0.1:{}\"", unclaimed_port()),
        1,
    );
    assert_ne!(moved, running);
    std::fs::write(&gw.config_path, moved).unwrap();
    let errors = refused_reload(&client, &gw).await;
    assert!(
        errors.contains(&format!("server.listen (line {listen_line}):")),
        "{errors}"
    );
}

/// An autoscaler without a drain_timeout of its own takes the upstream's: a reload changing
/// that is refused under the upstream's key, the one the file has, with its line.
#[tokio::test]
async fn a_refused_reload_names_an_inherited_drain_timeout_as_written() {
    let a = demo_backend(&[]);
    let config = |drain: &str| {
        format!(
            "[upstreams.app]\ninstances = []\ndrain_timeout = \"{drain}\"\n\
             [upstreams.app.autoscale]\nprovider = \"exec\"\nmin = 1\nmax = 1\n\
             scale_command = \"true {{replicas}}\"\ndiscover = {{ dns = \"{}\", interval = \"1s\" }}\n\
             target = {{ rps_per_instance = 100 }}\n\n[[routes]]\nupstream = \"app\"\n",
            a.addr()
        )
    };
    let gw = gateway(&config("5s"));
    let client = client();
    gw.write_config(&config("6s"));
    let written = std::fs::read_to_string(&gw.config_path).unwrap();
    let line = line_starting(&written, "drain_timeout");
    let errors = refused_reload(&client, &gw).await;
    assert!(
        errors.contains(&format!("upstreams.app.drain_timeout (line {line}):")),
        "{errors}"
    );
    assert!(!errors.contains("autoscale.drain_timeout"), "{errors}");
}

/// A web page cannot change the gateway through an open admin port: a change that a browser
/// says comes from another origin gets 403 (CSRF), the operator's own goes through.
#[tokio::test]
async fn the_admin_refuses_changes_from_web_pages() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let client = client();
    let add = gw.admin_url("/api/upstreams/app/instances");
    let body = r#"{"addr": "127.0.0.1:9"}"#;
    let page = [
        ("origin", "https://evil.example"),
        ("content-type", "text/plain"),
    ];
    let refused = request(&client, "POST", &add, &page, body).await.unwrap();
    assert_eq!(refused.status, 403, "{:?}", refused.body);
    let upstreams = get(&client, &gw.admin_url("/api/upstreams")).await.json();
    assert!(
        !upstreams.to_string().contains("127.0.0.1:9\""),
        "{upstreams}"
    );
    let reload = request(&client, "POST", &gw.admin_url("/api/reload"), &[], "").await;
    assert_eq!(reload.unwrap().status, 200);
}

/// A refused reload logs an event per problem, so each stays one line of a text log too.
#[tokio::test]
async fn a_refused_reload_logs_each_problem() {
    let a = demo_backend(&[]);
    let gw = gateway_logging(&app_config(&[&a], ""));
    let client = client();
    gw.write_config("[upstreams.app]\nstrategy = \"fastest\"\nretries = \"x\"\n");
    let reply = request(&client, "POST", &gw.admin_url("/api/reload"), &[], "")
        .await
        .unwrap();
    assert_eq!(reply.status, 422);
    let problems = reply.json()["errors"].as_array().unwrap().len();
    assert!(problems >= 2, "{}", reply.json());
    let refused = || {
        gw.proc
            .log_lines()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|line| line["message"].as_str().map(str::to_owned))
            .filter(|message| message.starts_with("reload refused"))
            .collect::<Vec<_>>()
    };
    let all_logged = eventually(Duration::from_secs(5), || async {
        refused().len() == problems
    });
    assert!(all_logged.await, "{:?}", refused());
    let logged = refused();
    assert!(logged.iter().all(|m| !m.contains('\n')), "{logged:?}");
    assert!(logged[0].contains("upstreams.app"), "{logged:?}");
}

/// The access-log line is written once the answer's last byte went out (nginx's
/// `$request_time`), with the body bytes sent (`$body_bytes_sent`), over HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn the_access_log_line_covers_the_whole_answer_body() {
    let (instance, _) = scripted_instance().await;
    let gw = gateway_logging(&app_config_at(&[instance], ""));
    for (client, id) in [(client(), "drip-h1"), (h2c_client(), "drip-h2")] {
        let reply = request(
            &client,
            "GET",
            &gw.url("/drip"),
            &[("x-request-id", id)],
            "",
        )
        .await
        .unwrap();
        assert_eq!(&reply.body[..], b"0123456789");
    }
    let chunked = get(&client(), &gw.url("/chunked")).await;
    let chunked_id = chunked.header("x-request-id").to_string();
    let ids = ["drip-h1", "drip-h2", chunked_id.as_str()];
    let logged = eventually(Duration::from_secs(5), || async {
        let lines = access_lines(&gw);
        ids.iter().all(|id| lines.contains_key(*id))
    })
    .await;
    let lines = access_lines(&gw);
    assert!(logged, "{lines:?}");
    for id in ["drip-h1", "drip-h2"] {
        let line = &lines[id];
        assert_eq!(line["bytes"], 10, "{line}");
        assert!(line["duration_ms"].as_f64().unwrap() >= 500.0, "{line}");
        // In whole microseconds: no float noise in the log.
        let duration = line["duration_ms"].to_string();
        let decimals = duration.split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 3, "{line}");
    }
    assert_eq!(lines[chunked_id.as_str()]["bytes"], 11);
}

/// A request whose client leaves while its answer streams (an HTTP/1.1 client that closes, an
/// HTTP/2 stream dropped) is over for the gauge too: nothing stays counted in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leaving_mid_answer_leave_nothing_in_flight() {
    use std::io::{Read, Write};
    let (instance, _) = scripted_instance().await;
    let gw = gateway(&app_config_at(&[instance], "response_timeout = \"1s\""));
    let proxy = gw.proxy;
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(proxy).unwrap();
        stream
            .write_all(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut head = [0u8; 64];
        let n = stream.read(&mut head).unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    })
    .await
    .unwrap();
    let h2 = h2c_client();
    let started = http::Request::get(gw.url("/stall"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let answer = h2.request(started).await.unwrap();
    assert_eq!(answer.status(), 200);
    drop(answer);
    let client = client();
    let settled = eventually(Duration::from_secs(10), || async {
        let metrics = get(&client, &gw.admin_url("/metrics")).await;
        String::from_utf8_lossy(&metrics.body).contains("scalegate_in_flight_requests 0.0\n")
    })
    .await;
    assert!(settled, "requests stayed in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_an_access_log_line_even_when_its_client_left() {
    use std::io::Write;
    let a = demo_backend(&["--latency-ms", "1000"]);
    let gw = gateway_logging(&app_config(&[&a], ""));
    let client = client();
    let served = request(
        &client,
        "GET",
        &gw.url("/done?q=1"),
        &[("x-request-id", "served-1")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(served.status, 200);
    // An HTTP/1.1 client that closes while its request waits for the instance...
    let mut leaving = std::net::TcpStream::connect(gw.proxy).unwrap();
    leaving
        .write_all(b"GET /gone HTTP/1.1\r\nHost: x\r\nX-Request-ID: left-h1\r\n\r\n")
        .unwrap();
    // ...and an HTTP/2 client that resets its stream.
    let h2 = h2c_client();
    let url = gw.url("/reset");
    let reset =
        tokio::spawn(
            async move { request(&h2, "GET", &url, &[("x-request-id", "left-h2")], "").await },
        );
    // Both are at the instance before their clients go.
    let in_flight = || async {
        let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
        detailed["upstreams"][0]["instances"][0]["in_flight"].as_u64()
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            in_flight().await == Some(2)
        })
        .await
    );
    drop(leaving);
    reset.abort();
    // Clients that leave inside their uploads: closing the connection, and resetting the
    // stream; no answer reaches them, and they are logged as gone, not as bad requests.
    let mut uploading = std::net::TcpStream::connect(gw.proxy).unwrap();
    uploading
        .write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nX-Request-ID: left-upload-h1\r\nContent-Length: 100000\r\n\r\nsome")
        .unwrap();
    let socket = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (sender, connection) = h2::client::handshake(socket).await.unwrap();
    tokio::spawn(connection);
    let upload = http::Request::post(gw.url("/up"))
        .header("x-request-id", "left-upload-h2")
        .header("content-length", "100000")
        .body(())
        .unwrap();
    let (_answer, mut stream) = sender
        .ready()
        .await
        .unwrap()
        .send_request(upload, false)
        .unwrap();
    stream
        .send_data(bytes::Bytes::from_static(b"some"), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(uploading);
    stream.send_reset(h2::Reason::CANCEL);
    // Heads refused as they are read get their line too, with the ID their answer carries:
    // an HTTP/1.1 one, and an HTTP/2 one malformed by RFC 9113 §8.2.1.
    let refused = raw_exchange(gw.proxy, b"NOT HTTP AT ALL\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    let refused_id = refused
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap()
        .to_string();
    let padded = request(
        &h2c_client(),
        "GET",
        &gw.url("/x"),
        &[("x-padded", "a "), ("x-request-id", "padded-h2")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(padded.status, 400);
    // Refused after its fields were read: the client's ID stays.
    let padded_id = padded.header("x-request-id").to_string();
    assert_eq!(padded_id, "padded-h2");
    let logged = eventually(Duration::from_secs(5), || async {
        let lines = access_lines(&gw);
        [
            "served-1",
            "left-h1",
            "left-h2",
            &refused_id,
            &padded_id,
            "left-upload-h1",
            "left-upload-h2",
        ]
        .iter()
        .all(|id| lines.contains_key(*id))
    })
    .await;
    let lines = access_lines(&gw);
    assert!(logged, "{lines:?}");
    let line = &lines["served-1"];
    assert_eq!(
        (
            &line["method"],
            &line["path"],
            &line["status"],
            &line["upstream"],
            &line["client"]
        ),
        (
            &"GET".into(),
            &"/done?q=1".into(),
            &200.into(),
            &"app".into(),
            &"127.0.0.1".into()
        )
    );
    assert_eq!(
        (&line["instance"], &line["attempts"]),
        (&a.addr().to_string().into(), &1.into())
    );
    assert!(line["duration_ms"].as_f64().unwrap() >= 1000.0, "{line}");
    // The HTTP/1.1 head could not be read; the HTTP/2 one could, and says what it asked.
    for (id, method, path) in [(&refused_id, "-", "-"), (&padded_id, "GET", "/x")] {
        let line = &lines[id];
        assert_eq!(
            (
                &line["status"],
                &line["method"],
                &line["path"],
                &line["upstream"],
                &line["instance"],
                &line["attempts"]
            ),
            (
                &400.into(),
                &method.into(),
                &path.into(),
                &"-".into(),
                &"-".into(),
                &0.into()
            )
        );
    }
    // nginx's 499: the client closed the request before its answer.
    for (id, path) in [
        ("left-h1", "/gone"),
        ("left-h2", "/reset"),
        ("left-upload-h1", "/up"),
        ("left-upload-h2", "/up"),
    ] {
        let line = &lines[id];
        assert_eq!(line["bytes"], 0, "{line}");
        assert_eq!(
            (&line["status"], &line["path"], &line["upstream"]),
            (&499.into(), &path.into(), &"app".into()),
            "{line}"
        );
    }
    let metrics = get(&client, &gw.admin_url("/metrics")).await.body;
    let metrics = String::from_utf8_lossy(&metrics);
    let count = |route: &str, class: &str| {
        let (route, status) = (
            format!("{{route=\"{route}\""),
            format!("status=\"{class}\"}}"),
        );
        // Summed over the methods (a refused HTTP/2 request has its own).
        metrics
            .lines()
            .filter(|line| line.starts_with("scalegate_requests_total{"))
            .filter(|line| line.contains(&route) && line.contains(&status))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .reduce(|a, b| a + b)
    };
    // The four who left are 4xx (499), and the refused heads count where requests no route
    // matched do.
    assert_eq!(
        (count("app", "2xx"), count("app", "4xx"), count("-", "4xx")),
        (Some(1), Some(4), Some(2)),
        "{metrics}"
    );
}

#[tokio::test]
async fn forwarding_headers_and_request_ids() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let client = client();
    let reply = request(
        &client,
        "GET",
        &gw.url("/echo"),
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("connection", "x-private"),
            ("x-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("x-request-id", "client-id-1"),
        ],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.header("x-request-id"), "client-id-1");
    let echo = reply.json();
    let headers: HashMap<String, String> = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().into(),
                pair[1].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], gw.proxy.to_string());
    assert_eq!(headers["x-request-id"], "client-id-1");
    assert!(!headers.contains_key("x-private"));
    assert!(!headers.contains_key("keep-alive"));
    assert!(!headers.contains_key("connection"));

    let reply = request(
        &client,
        "GET",
        &gw.url("/work"),
        &[("x-request-id", "bad id with spaces")],
        "",
    )
    .await
    .unwrap();
    let generated = reply.header("x-request-id");
    assert_eq!(generated.len(), 16, "{generated}");

    // An HTTP/1.0 request without Host reaches the instance with the upstream's name as Host.
    let old = raw_exchange_off_thread(gw.proxy, b"GET /echo HTTP/1.0\r\n\r\n").await;
    // Answered as HTTP/1.1 (RFC 9110 2.5: the server's own version), closed as 1.0 expects.
    assert!(old.starts_with("HTTP/1.1 200"), "{old}");
    assert!(old.contains("connection: close"), "{old}");
    assert!(old.contains(r#"["host","app"]"#), "{old}");

    // Host rules of RFC 9112 §3.2, as nginx applies them: an absolute target names the host,
    // Connection cannot take Host away, and a missing, doubled or malformed Host gets 400.
    let absolute = raw_exchange_off_thread(
        gw.proxy,
        b"GET http://target.example/echo HTTP/1.1\r\nHost: field.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        absolute.contains(r#"["host","target.example"]"#),
        "{absolute}"
    );
    // Its empty path goes as `/` (RFC 9112 §3.2.1): the instance would refuse `GET ?x=1`.
    let rooted = raw_exchange_off_thread(
        gw.proxy,
        b"GET http://target.example?x=1 HTTP/1.1\r\nHost: target.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(rooted.starts_with("HTTP/1.1 200"), "{rooted}");
    let kept = raw_exchange_off_thread(
        gw.proxy,
        b"GET /echo HTTP/1.1\r\nHost: a.example\r\nConnection: Host, close\r\n\r\n",
    )
    .await;
    assert!(kept.contains(r#"["host","a.example"]"#), "{kept}");
    for (head, why) in [
        (&b"GET /echo HTTP/1.1\r\n\r\n"[..], "without a Host"),
        (
            b"GET /echo HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
            "more than one Host",
        ),
        (
            b"GET /echo HTTP/1.1\r\nHost: a.example/x\r\n\r\n",
            "not a host",
        ),
        (
            b"GET http://user:pw@b.example/echo HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "authority is not a host",
        ),
    ] {
        let refused = raw_exchange_off_thread(gw.proxy, head).await;
        assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
        assert!(refused.contains(why), "{refused}");
        assert!(refused.contains("\"request_id\""), "{refused}");
    }
}

/// An answer with fields of every kind: end-to-end ones in the instance's own spelling (twice
/// named, odd spacing), hop-by-hop ones, its own request ID, rate-limit state and Date.
const FIELDS_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nServer: scripted\r\nKeep-Alive: timeout=5\r\n\
    Date: Tue, 01 Jan 2030 00:00:00 GMT\r\nX-Request-ID: instance-id\r\nSet-Cookie: a=1\r\n\
    Connection: keep-alive\r\nSet-Cookie: b=2\r\nX-Spaced: a  b\r\nRateLimit: instance\r\n\
    Content-Length: 2\r\n\r\nok";

/// The instance's end-to-end fields reach the client once each and unchanged, its hop-by-hop
/// ones and its request ID do not, and fields the gateway sets replace the instance's: whether
/// the gateway's HTTP/1.1 loop writes the fields as they came, or from a header map (HTTP/2
/// clients, answers the gateway adds fields to).
#[tokio::test]
async fn answer_fields_reach_clients_once_each() {
    let (instance, _) = scripted_instance().await;
    let limited = "[[routes]]\npath_prefix = \"/limited\"\nupstream = \"app\"\n\
                   rate_limits = [{ name = \"r\", limit = 100, period = \"1m\", burst = 99 }]\n";
    let gw = gateway(&app_config_at(&[instance], limited));
    let fold = |text: &str| text.to_ascii_lowercase();
    for path in ["/fields", "/limited/fields"] {
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nX-Request-ID: client-id\r\nConnection: close\r\n\r\n"
        );
        let answer = fold(&raw_exchange_off_thread(gw.proxy, head.as_bytes()).await);
        assert!(answer.starts_with("http/1.1 200 ok\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
        for line in [
            "\r\nserver: scripted\r\n",
            "\r\ndate: tue, 01 jan 2030 00:00:00 gmt\r\n",
            "\r\nx-request-id: client-id\r\n",
            "\r\nset-cookie: a=1\r\n",
            "\r\nset-cookie: b=2\r\n",
            "\r\nx-spaced: a  b\r\n",
            "\r\ncontent-length: 2\r\n",
            "\r\nconnection: close\r\n",
        ] {
            assert!(answer.contains(line), "{line:?} in {answer}");
        }
        for name in [
            "server",
            "date",
            "x-request-id",
            "content-length",
            "connection",
            "ratelimit",
        ] {
            let field = format!("\r\n{name}: ");
            assert_eq!(answer.matches(&field).count(), 1, "{name} in {answer}");
        }
        assert!(!answer.contains("keep-alive"), "{answer}");
        let instance_limit = answer.contains("ratelimit: instance");
        assert_eq!(instance_limit, path == "/fields", "{answer}");
    }

    let reply = request(
        &h2c_client(),
        "GET",
        &gw.url("/fields"),
        &[("x-request-id", "client-id")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.header("server"), "scripted");
    assert_eq!(reply.header("x-request-id"), "client-id");
    assert_eq!(reply.header("x-spaced"), "a  b");
    assert_eq!(reply.headers.get_all("set-cookie").iter().count(), 2);
    assert!(!reply.headers.contains_key("keep-alive"));
    assert_eq!(reply.body, "ok");
}

#[tokio::test]
async fn fields_named_with_underscores_are_dropped_unless_allowed() {
    // CGI-style instances read X_Forwarded_For as X-Forwarded-For: the gateway's own field.
    let a = demo_backend(&[]);
    let strict = gateway(&app_config(&[&a], ""));
    let lenient = gateway_with_server_keys("underscores_in_headers = true", &app_config(&[&a], ""));
    let head =
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\nConnection: close\r\n\r\n";
    let dropped = raw_exchange_off_thread(strict.proxy, head).await;
    assert!(dropped.starts_with("HTTP/1.1 200"), "{dropped}");
    assert!(!dropped.contains("6.6.6.6"), "{dropped}");
    let kept = raw_exchange_off_thread(lenient.proxy, head).await;
    assert!(kept.contains(r#"["x_forwarded_for","6.6.6.6"]"#), "{kept}");
    for (gw, passed) in [(&strict, false), (&lenient, true)] {
        let reply = request(
            &h2c_client(),
            "GET",
            &gw.url("/echo"),
            &[("x_tenant", "evil")],
            "",
        )
        .await
        .unwrap();
        assert_eq!(reply.status, 200);
        let echoed = reply.json().to_string();
        assert_eq!(echoed.contains("evil"), passed, "{echoed}");
    }
}

#[tokio::test]
async fn smuggling_shaped_requests_never_smuggle() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let client = client();
    let refused: [&[u8]; 8] = [
        b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!",
        b"POST /work HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        // Both framings: refused, and the tail is never read as a second request.
        b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        // Broken chunks that come with the head: not even the head goes to an instance.
        b"POST /work HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
        b"POST /work HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        // Chunk lines ended by bare LFs: refused at once, not waited on for a CRLF.
        b"POST /work HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
        // A target that is not ASCII (RFC 3986), as the HTTP/2 listener refuses its path.
        b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for case in refused {
        let answer = raw_exchange(gw.proxy, case);
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{}\n{answer}",
            String::from_utf8_lossy(case)
        );
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains("\"request_id\""), "{answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    }
    // A chunk past max_body (10 MiB) is refused as soon as its size line is read.
    let answer = raw_exchange(
        gw.proxy,
        b"POST /work HTTP/1.1\r\nHost: x\r\nX-Request-ID: mine-413\r\nTransfer-Encoding: chunked\r\n\r\n1000000\r\nhello",
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Refusals of heads whose fields were read keep the client's request ID.
    assert!(answer.contains("x-request-id: mine-413"), "{answer}");
    let answer = raw_exchange(
        gw.proxy,
        b"POST /work HTTP/1.1\r\nHost: x\r\nX-Request-ID: mine-400\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    assert!(answer.contains("x-request-id: mine-400"), "{answer}");
    // A refused HEAD gets its answer's head alone (RFC 9110 §9.3.2).
    let answer = raw_exchange(
        gw.proxy,
        b"HEAD /work HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "{answer}");
    assert_eq!(backend_requests(&client, &a).await, 0);
}

/// Pooled instance connections keep one response timer for their life: a timer left over from
/// an earlier request must neither cut a later one short nor let a slow one run past the timeout.
#[tokio::test]
async fn the_response_timeout_holds_for_every_request_on_a_reused_connection() {
    let backend = demo_backend(&[]);
    let gw = gateway(&app_config(&[&backend], "response_timeout = \"400ms\""));
    let client = client();
    let status = |path: &'static str| {
        let url = gw.url(path);
        let client = &client;
        async move { request(client, "GET", &url, &[], "").await.unwrap().status }
    };

    assert_eq!(status("/first").await, 200);
    // The first request's timer runs out while the connection idles in the pool.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(status("/second?latency_ms=100").await, 200);
    assert_eq!(status("/slow?latency_ms=3000").await, 504);
}

/// The response timeout runs while the gateway waits on the instance, never on the client: it
/// starts once the body went out, bounds each part of an upload and each pause inside an answer
/// body; and an instance that answers before it read the body still gets all of it.
#[tokio::test]
async fn the_response_timeout_waits_on_instances_never_on_clients() {
    let (instance, seen) = scripted_instance().await;
    // Not pipelined: the test checks which connection the request after an upload takes.
    let gw = gateway(&app_config_at(
        &[instance],
        "response_timeout = \"1s\"\npipeline = 1",
    ));
    // A client that pauses longer than the response timeout inside its body: the instance
    // took every byte as it came, so the wait is the client's, not the instance's.
    let proxy = gw.proxy;
    let answer = answer_to_a_paused_upload(proxy).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("length:10"), "{answer}");
    // The instance was not held to blame: it still takes requests (max_fails = 1).
    let client = client();
    assert_eq!(get(&client, &gw.url("/chunked")).await.status, 200);

    // An instance that answers its head first, then reads the body: its head is out before
    // the rest of the body is.
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let pause = Duration::from_millis(300);
        let mut stream = post_in_two_halves(proxy, "/duplex", "", pause);
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        while !answer.ends_with(b"0\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        // The connection carries the next request.
        stream
            .write_all(b"GET /no-content HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut next = String::new();
        let _ = stream.read_to_string(&mut next);
        (String::from_utf8_lossy(&answer).into_owned(), next)
    })
    .await
    .unwrap();
    let (answer, next) = answer;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("got 10"), "{answer}");
    assert!(next.starts_with("HTTP/1.1 204"), "{next}");
    // Both requests went on the one instance connection: the body went out whole.
    let log = seen.lock().unwrap().clone();
    let [.., (duplex, _), (next, _)] = &log[..] else {
        panic!("{log:?}")
    };
    assert_eq!(duplex, next, "{log:?}");

    // An instance that pauses inside its answer body past the timeout: the client gets what
    // came, then the connection closes, and the request no longer counts as in flight.
    assert_cut_off_after_ten_bytes(&gw, "/stall").await;
    // Toward an HTTP/2 client the stream is reset, and the cut counted the same.
    let broken = || async {
        let upstreams = get(&client, &gw.admin_url("/api/upstreams")).await.json();
        upstreams["upstreams"][0]["instances"][0]["broken_answers"].clone()
    };
    let before = broken().await.as_u64().unwrap();
    let h2 = request(&h2c_client(), "GET", &gw.url("/stall"), &[], "").await;
    assert!(h2.is_err(), "{:?}", h2.map(|r| r.body));
    assert_eq!(broken().await, before + 1);

    // An instance that takes none of the body for the whole timeout gets the blame: 504 (a
    // close when the instance gives up after 30 s would be a 502).
    let stalled = request(&client, "POST", &gw.url("/deaf"), &[], &"z".repeat(8 << 20))
        .await
        .unwrap();
    assert_eq!(stalled.status, 504);
}

#[tokio::test]
async fn an_instance_back_while_all_were_out_takes_the_requests_at_once() {
    // Both instances refuse and are taken out (max_fails = 1, fail_timeout 30 s); then one
    // listens again. While every instance is out both are tried, so the first answer may take
    // a request or two; from then on the one that answered is back in rotation and the dead
    // one gets nothing (it shared the requests with it, each second one a 502, for 30 s).
    let (first, second) = (dead_addr(), dead_addr());
    let gw = gateway(&app_config_at(
        &[first, second],
        "retries = 0
fail_timeout = \"30s\"",
    ));
    let client = client();
    for _ in 0..2 {
        assert_eq!(get(&client, &gw.url("/work")).await.status, 502);
    }
    // Out by passive checks alone, they are still tried: degraded, not down.
    let detailed = get(&client, &gw.admin_url("/health/detailed")).await;
    assert_eq!(detailed.status, 200);
    assert_eq!(detailed.json()["components"][0]["status"], "degraded");
    let _revived = spawn(&["demo-backend", "--port", &second.port().to_string()], 1);
    let mut answered = false;
    for _ in 0..4 {
        if get(&client, &gw.url("/work")).await.status == 200 {
            answered = true;
            break;
        }
    }
    assert!(answered, "the revived instance never answered");
    for _ in 0..20 {
        assert_eq!(get(&client, &gw.url("/work")).await.status, 200);
    }
}

#[tokio::test]
async fn error_statuses_carry_json_and_the_request_id() {
    let slow = demo_backend(&["--latency-ms", "3000"]);
    let gw = gateway_with_server_keys(
        "max_body = \"1KiB\"\nmax_header_size = \"8KiB\"",
        &app_config(&[&slow], "response_timeout = \"300ms\""),
    );
    let client = client();

    let reply = request(
        &client,
        "GET",
        &gw.url("/work"),
        &[("x-request-id", "t-504")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 504);
    assert_eq!(reply.header("x-request-id"), "t-504");
    assert_eq!(reply.json()["request_id"], "t-504");

    let big = "x".repeat(2048);
    let reply = request(&client, "POST", &gw.url("/work"), &[], &big)
        .await
        .unwrap();
    assert_eq!(reply.status, 413);
    assert!(reply.json()["request_id"].is_string());

    let huge = "y".repeat(16 * 1024);
    let answer = raw_exchange(
        gw.proxy,
        format!("GET /work HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n").as_bytes(),
    );
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(100)]
    );

    // Nothing listens there: connect refused on every instance → 502.
    let dead = dead_addr();
    let gw = gateway(&format!(
        "[upstreams.app]\ninstances = [\"{dead}\"]\n[[routes]]\nupstream = \"app\"\n"
    ));
    for _ in 0..2 {
        let reply = get(&client, &gw.url("/work")).await;
        assert_eq!(reply.status, 502);
        assert_eq!(reply.json()["error"], "bad_gateway");
    }
    // That failure took it out of rotation (max_fails = 1, fail_timeout 10 s), but it is the
    // only instance: it is still tried (nginx ignores max_fails for a lone server), so it
    // serves again as soon as it listens.
    let _revived = spawn(&["demo-backend", "--port", &dead.port().to_string()], 1);
    assert_eq!(get(&client, &gw.url("/work")).await.status, 200);

    // A connect that does not finish within connect_timeout is a 504, as in nginx: a listener
    // whose accept queue is full drops further SYNs.
    let full = tokio::net::TcpSocket::new_v4().unwrap();
    full.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = full.listen(0).unwrap();
    let addr = full.local_addr().unwrap();
    let _queued: Vec<std::net::TcpStream> = (0..2)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .collect();
    let gw = gateway(&format!(
        "[upstreams.app]\ninstances = [\"{addr}\"]\nconnect_timeout = \"200ms\"\n\
         [[routes]]\nupstream = \"app\"\n"
    ));
    let reply = get(&client, &gw.url("/work")).await;
    assert_eq!(reply.status, 504);
    assert_eq!(
        reply.json()["reason"],
        "could not connect to an instance in time"
    );
}

#[tokio::test]
async fn routes_by_host_and_path_prefix() {
    let api = demo_backend(&[]);
    let web = demo_backend(&[]);
    let config = format!(
        "[upstreams.api]\ninstances = [\"{}\"]\n[upstreams.web]\ninstances = [\"{}\"]\n\
         [[routes]]\npath_prefix = \"/api\"\nupstream = \"api\"\n\
         [[routes]]\nhost = \"admin.test\"\nupstream = \"api\"\n\
         [[routes]]\nupstream = \"web\"\n",
        api.addr(),
        web.addr()
    );
    let gw = gateway(&config);
    let client = client();
    let port = |r: Reply| r.header("x-instance").to_string();
    assert_eq!(
        port(get(&client, &gw.url("/api/users")).await),
        api.addr().port().to_string()
    );
    assert_eq!(
        port(get(&client, &gw.url("/index.html")).await),
        web.addr().port().to_string()
    );
    let reply = request(&client, "GET", &gw.url("/x"), &[("host", "admin.test")], "")
        .await
        .unwrap();
    assert_eq!(port(reply), api.addr().port().to_string());

    // No open proxy: an absolute-form URI for another host only reaches configured routes, and
    // CONNECT is refused without touching an instance.
    let proxy = gw.proxy;
    let (absolute, connect) = tokio::task::spawn_blocking(move || {
        (
            raw_exchange(
                proxy,
                b"GET http://elsewhere.example/api/x HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n",
            ),
            raw_exchange(
                proxy,
                b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\nConnection: close\r\n\r\n",
            ),
        )
    })
    .await
    .unwrap();
    assert!(absolute.starts_with("HTTP/1.1 200"), "{absolute}");
    assert!(
        absolute.contains(&format!("x-instance: {}", api.addr().port())),
        "{absolute}"
    );
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    assert!(connect.contains("allow: GET, HEAD, POST"), "{connect}");
    // TRACE is refused too: an instance's echo would hand back cookies and credentials.
    let trace = raw_exchange_off_thread(
        proxy,
        b"TRACE /api/x HTTP/1.1\r\nHost: a\r\nCookie: s=secret\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(trace.starts_with("HTTP/1.1 405"), "{trace}");
    assert!(!trace.contains("secret"), "{trace}");
    // So is a standard method in other letters, which a case-blind instance would take for it;
    // an extension method in lower case passes.
    for method in ["trace", "Get", "hEAD"] {
        let head = format!("{method} /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let odd = raw_exchange_off_thread(proxy, head.as_bytes()).await;
        assert!(odd.starts_with("HTTP/1.1 400"), "{method}: {odd}");
    }
    let extension = raw_exchange_off_thread(
        proxy,
        b"purge /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(extension.starts_with("HTTP/1.1 200"), "{extension}");
    // A request line of another HTTP major version: 505, with the request ID.
    let newer = raw_exchange_off_thread(proxy, b"GET /api/x HTTP/2.0\r\nHost: a\r\n\r\n").await;
    assert!(newer.starts_with("HTTP/1.1 505"), "{newer}");
    assert!(newer.contains("\"request_id\""), "{newer}");
    // An encoded NUL in the path: 400, as nginx answers (a C instance would cut the path
    // there, at another route's path than the one matched).
    for nul in ["/x/..%00/api", "/api/a%00b"] {
        let reply = get(&client, &gw.url(nul)).await;
        assert_eq!(reply.status, 400, "{nul}");
        assert!(reply.json()["reason"].to_string().contains("%00"), "{nul}");
    }
    assert_eq!(backend_requests(&client, &web).await, 1);
    // The extension method's request is the last one to reach it.
    assert_eq!(backend_requests(&client, &api).await, 4);
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let client = h2c_client();
    let reply = get(&client, &gw.url("/work")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"ok");
    // HEAD gets the fields and no body (RFC 9110 §9.3.2), also for answers the gateway makes:
    // hyper's HTTP/2 server would send their body, a stream error for the client.
    let dead = dead_addr();
    let refused = gateway(&app_config_at(&[dead], "retries = 0"));
    for (url, status) in [(gw.url("/work"), 200), (refused.url("/work"), 502)] {
        let head = request(&client, "HEAD", &url, &[], "").await.unwrap();
        assert_eq!((head.status, head.body.len()), (status, 0), "{url}");
    }
    // Cookies an HTTP/2 client sends as separate fields reach the HTTP/1.1 instance as one.
    let cookies = [("cookie", "a=1"), ("cookie", "b=2")];
    let echo = request(&client, "GET", &gw.url("/echo"), &cookies, "")
        .await
        .unwrap();
    let seen = echo.json()["headers"].to_string();
    assert!(seen.contains(r#"["cookie","a=1; b=2"]"#), "{seen}");
    let error = request(&client, "HEAD", &refused.url("/work"), &[], "")
        .await
        .unwrap();
    let json = get(&client, &refused.url("/work")).await.body;
    assert_eq!(error.header("content-length"), json.len().to_string());
    // A field value padded with whitespace makes the request malformed (RFC 9113 §8.2.1): an
    // HTTP/1.1 instance would trim it and see another request than the one checked.
    let padded = request(&client, "GET", &gw.url("/echo"), &[("x-padded", "a ")], "")
        .await
        .unwrap();
    assert_eq!(padded.status, 400);
    let reason = padded.json()["reason"].to_string();
    assert!(reason.contains("whitespace"), "{reason}");
    assert!(!padded.header("x-request-id").is_empty());
    // So does a path that is not ASCII, as the HTTP/1.1 listener refuses its request line.
    let raw = request(&client, "GET", &gw.url("/caf\u{e9}"), &[], "").await;
    assert_eq!(raw.unwrap().status, 400);
    assert_eq!(backend_requests(&support::client(), &a).await, 3);
}

/// Request trailers are dropped on the way to an HTTP/1.1 instance from an HTTP/2 client as
/// from an HTTP/1.1 one: they would pass every check the header fields go through.
#[tokio::test]
async fn an_http2_client_s_request_trailers_do_not_reach_the_instance() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let instance = listener.local_addr().unwrap();
    let received = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Up to the end of the chunked body: its last chunk and the empty line after it.
        while !seen.windows(5).any(|w| w == b"0\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        String::from_utf8_lossy(&seen).into_owned()
    });
    let gw = gateway(&app_config_at(&[instance], ""));
    let socket = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (sender, connection) = h2::client::handshake(socket).await.unwrap();
    tokio::spawn(connection);
    let mut sender = sender.ready().await.unwrap();
    let request = http::Request::post(gw.url("/upload")).body(()).unwrap();
    let (answer, mut upload) = sender.send_request(request, false).unwrap();
    upload.send_data("hello".into(), false).unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
    trailers.insert("authorization", "Bearer stolen".parse().unwrap());
    upload.send_trailers(trailers).unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);
    let received = received.join().unwrap();
    assert!(received.ends_with("5\r\nhello\r\n0\r\n\r\n"), "{received}");
    assert!(!received.contains("6.6.6.6"), "{received}");
    assert!(!received.contains("stolen"), "{received}");
}

#[tokio::test]
async fn a_large_upload_streams_in_bounded_memory() {
    use http_body_util::BodyExt;
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys("max_body = \"2GiB\"", &app_config(&[&a], ""));
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 1024;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Chunks>();
    let body = Chunks {
        left: CHUNKS,
        chunk: bytes::Bytes::from(vec![b'z'; CHUNK]),
    };
    let req = http::Request::post(gw.url("/upload")).body(body).unwrap();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-body-received"].to_str().unwrap(),
        (CHUNK * CHUNKS).to_string()
    );
    response.into_body().collect().await.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.proc.pid())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        peak_kib < 64 * 1024,
        "gateway peak RSS {peak_kib} KiB for a 1 GiB upload"
    );
}

/// A request body of `left` copies of `chunk`, made as it is sent (never held whole).
struct Chunks {
    left: usize,
    chunk: bytes::Bytes,
}

impl hyper::body::Body for Chunks {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(self.chunk.clone()))))
    }
}

#[tokio::test]
async fn zero_config_flags_balance_over_the_given_instances() {
    let (a, b) = (demo_backend(&[]), demo_backend(&[]));
    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());
    let gw = spawn(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            &a_addr,
            "--upstream",
            &b_addr,
        ],
        2,
    );
    let client = client();
    let mut seen = HashMap::new();
    for _ in 0..4 {
        let reply = get(&client, &format!("http://{}/work", gw.named("proxy"))).await;
        assert_eq!(reply.status, 200);
        *seen
            .entry(reply.header("x-instance").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let health = get(&client, &format!("http://{}/health", gw.named("admin"))).await;
    assert_eq!(health.status, 200);
}

/// `--log-level` wins over LOG_LEVEL, whichever side of the command it is given on; a bad
/// LOG_LEVEL alone is refused, named as such.
#[test]
fn the_log_level_flag_wins_over_the_environment() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart.toml");
    let run = |args: &[&str], env: &str| {
        std::process::Command::new(bin())
            .args(args)
            .env("LOG_LEVEL", env)
            .output()
            .unwrap()
    };
    for args in [
        ["--log-level", "info", "check", example],
        ["check", "--log-level", "info", example],
    ] {
        let out = run(&args, "bogus");
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    let out = run(&["check", example], "bogus");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("LOG_LEVEL"),
        "{out:?}"
    );
    assert!(run(&["check", example], "").status.success());
}

/// `scalegate check FILE`, run to its end.
fn check_config(path: &std::path::Path) -> std::process::Output {
    std::process::Command::new(bin())
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap()
}

/// Writes `body` as a config file, has `check` refuse it naming each of `keys`, and returns the
/// file (in its directory) and what `check` said.
fn refused_naming(body: &str, keys: &[&str]) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, body).unwrap();
    let check = check_config(&path);
    assert!(!check.status.success());
    let stderr = String::from_utf8_lossy(&check.stderr).into_owned();
    for key in keys {
        assert!(stderr.contains(key), "{key} missing in: {stderr}");
    }
    (dir, path, stderr)
}

#[test]
fn check_names_the_bad_keys_and_serve_refuses_the_same_config() {
    let (_dir, path, _) = refused_naming(
        "[server]\nlisten = \"nowhere\"\n[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\nstrategy = \"fastest\"\n[[routes]]\nupstream = \"ghost\"\n",
        &[
            "server.listen (line 2)",
            "upstreams.app.strategy (line 5)",
            "routes[0].upstream (line 7)",
        ],
    );
    let serve = std::process::Command::new(bin())
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!serve.status.success());
    assert!(String::from_utf8_lossy(&serve.stderr).contains("upstreams.app.strategy"));
    // Under a JSON log, the reason it stopped is a JSON line too, whatever the level filter
    // leaves out (`access=info` keeps the access log alone; `off`).
    for filter in ["info", "access=info", "off"] {
        let serve = std::process::Command::new(bin())
            .args([
                "serve",
                "--config",
                path.to_str().unwrap(),
                "--log-format",
                "json",
                "--log-level",
                filter,
            ])
            .output()
            .unwrap();
        assert!(!serve.status.success());
        let stderr = String::from_utf8_lossy(&serve.stderr);
        let last: serde_json::Value =
            serde_json::from_str(stderr.lines().last().unwrap_or_default()).unwrap();
        assert_eq!(last["level"], "ERROR", "{filter}: {stderr}");
        assert!(
            last["message"]
                .to_string()
                .contains("upstreams.app.strategy"),
            "{filter}: {stderr}"
        );
    }

    std::fs::write(&path, "[upstreams.app]\ninstances = [\"${SG_TEST_ADDR:-127.0.0.1:1}\"]\n[[routes]]\nupstream = \"app\"\n").unwrap();
    let check = check_config(&path);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// A variable that is not set hides none of the file's other problems from `check`.
#[test]
fn check_reports_environment_problems_with_the_rest() {
    let (_dir, _, stderr) = refused_naming(
        "[server]\nlisten = \"${SG_TEST_NOT_SET}\"\nmax_body = \"zz\"\n[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\nstrategy = \"bad\"\n[[routes]]\nupstream = \"app\"\n",
        &[
            "${SG_TEST_NOT_SET} (line 2)",
            "server.max_body (line 3)",
            "upstreams.app.strategy (line 6)",
        ],
    );
    // The empty stand-in for the variable is no address of the file's: not reported.
    assert!(!stderr.contains("server.listen"), "{stderr}");
}

/// The demo instance refuses values it would misread: a failure rate outside 0–1 (or NaN,
/// which failed nothing), a body too large to hold.
#[test]
fn demo_backend_refuses_what_it_cannot_honour() {
    for (flag, value, expected) in [
        ("--fail-rate", "1.5", "expected a number from 0.0 to 1.0"),
        ("--fail-rate", "nan", "expected a number from 0.0 to 1.0"),
        ("--body-bytes", "99999999999999", "is not in 0..=1073741824"),
    ] {
        let stderr = refused_start(&["demo-backend", "--port", "0", flag, value]);
        assert!(stderr.contains(expected), "{flag} {value}: {stderr}");
    }
    // TLS files it cannot read: refused before it says it listens (scripts wait for that line).
    let missing = std::process::Command::new(bin())
        .args([
            "demo-backend",
            "--port",
            "0",
            "--tls-cert",
            "/nonexistent/c.pem",
        ])
        .args(["--tls-key", "/nonexistent/k.pem"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(missing.stdout.is_empty(), "{missing:?}");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/c.pem"));
}

/// A listener that cannot bind names its key and address (nginx names the address).
#[test]
fn a_taken_port_is_named_with_its_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let stderr = refused_start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        &addr,
        "--upstream",
        "127.0.0.1:1",
    ]);
    assert!(
        stderr.contains(&format!("admin.listen {addr}: Address already in use")),
        "{stderr}"
    );
    // A file that writes the admin address as `server.admin_listen` sees that key named.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"{addr}\"\n\n{}",
        app_config_at(&["127.0.0.1:1".parse().unwrap()], "")
    );
    std::fs::write(&path, config).unwrap();
    let stderr = refused_start(&["serve", "--config", path.to_str().unwrap()]);
    assert!(
        stderr.contains(&format!(
            "server.admin_listen {addr}: Address already in use"
        )),
        "{stderr}"
    );
}

/// SIGTERM, and SIGQUIT (nginx's graceful stop, its image's STOPSIGNAL; it used to kill the
/// gateway at once), drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_signal_finishes_in_flight_requests_then_exits_zero() {
    let a = demo_backend(&["--latency-ms", "700"]);
    for stop in ["TERM", "QUIT"] {
        let gw = gateway(&app_config(&[&a], ""));
        let client = client();
        let url = gw.url("/work");
        let in_flight = {
            let client = client.clone();
            tokio::spawn(async move { get(&client, &url).await.status })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        signal(gw.proc.pid(), stop);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The admin port answers through the drain: a refused connection is no 503.
        let health = request(&client, "GET", &gw.admin_url("/health"), &[], "")
            .await
            .expect("the admin port answers while the gateway drains");
        assert_eq!(health.status, 503, "SIG{stop}");
        assert_eq!(in_flight.await.unwrap(), 200, "SIG{stop}");
        let status = gw.exit_status().await;
        assert!(status.success(), "SIG{stop}: {status:?}");
    }
}

/// A reload stuck reading its file (a config on a hung network mount; here a FIFO nobody
/// writes) does not hold the exit: the runtime waited for its blocking thread, and neither
/// the stop nor a second signal ended the process.
#[tokio::test]
async fn a_reload_stuck_on_its_file_does_not_hold_the_exit() {
    let a = demo_backend(&[]);
    let mut gw = gateway(&app_config(&[&a], ""));
    std::fs::remove_file(&gw.config_path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&gw.config_path)
        .status()
        .unwrap();
    assert!(made.success());
    signal(gw.proc.pid(), "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(gw.proc.pid(), "TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut exited = None;
    while exited.is_none() && std::time::Instant::now() < deadline {
        exited = gw.proc.child.try_wait().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = exited.expect("still running 10 s after SIGTERM, its reload stuck");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_second_stop_signal_stops_at_once_and_a_hangup_right_after_start_reloads() {
    let a = demo_backend(&["--latency-ms", "20000"]);
    // Cut short in the grace (a request in flight), and in the delay before it.
    for delay in ["0s", "60s"] {
        let mut gw = gateway(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             access_log = false\nshutdown_grace = \"60s\"\nshutdown_delay = \"{delay}\"\n{}",
            app_config(&[&a], "")
        ));
        // SIGHUP at once after the "listening" lines: a reload, not the default (death).
        signal(gw.proc.pid(), "HUP");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let alive = |gw: &mut Gateway| gw.proc.child.try_wait().unwrap().is_none();
        assert!(alive(&mut gw), "a SIGHUP killed it");
        let (client, url) = (client(), gw.url("/work"));
        let _in_flight = tokio::spawn(async move { request(&client, "GET", &url, &[], "").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        signal(gw.proc.pid(), "TERM");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(alive(&mut gw), "the first signal drains");
        signal(gw.proc.pid(), "INT");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(&mut gw) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let status = gw.proc.child.try_wait().unwrap();
        let status = status.expect("a second signal did not stop the gateway within 5 s");
        assert!(status.success(), "shutdown_delay {delay}: {status:?}");
    }
}

#[tokio::test]
async fn shutdown_delay_serves_on_while_health_says_503() {
    let a = demo_backend(&[]);
    let gw = gateway_with_server_keys("shutdown_delay = \"3s\"", &app_config(&[&a], ""));
    let client = client();
    signal(gw.proc.pid(), "TERM");
    let health_503 = eventually(Duration::from_secs(2), || async {
        get(&client, &gw.admin_url("/health")).await.status == 503
    });
    assert!(health_503.await);
    // A new connection is still accepted and served while load balancers catch up.
    let answer = raw_exchange(
        gw.proxy,
        b"GET /work HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let status = gw.exit_status().await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn folded_headers_and_bare_lf_never_smuggle() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let client = client();
    // obs-fold (a header continued on the next line) is refused before anything is forwarded.
    let folded = raw_exchange(
        gw.proxy,
        b"GET /work HTTP/1.1\r\nHost: x\r\nX-Long: a\r\n b\r\n\r\n",
    );
    assert!(folded.starts_with("HTTP/1.1 400"), "{folded}");
    assert_eq!(backend_requests(&client, &a).await, 0);

    let (instance, seen) = scripted_instance().await;
    let scripted = gateway(&app_config_at(&[instance], ""));
    // Bare LF line endings: one request in, one answer out, exactly that request at the instance.
    let bare_lf = raw_exchange_off_thread(
        scripted.proxy,
        b"GET /continue HTTP/1.1\nHost: x\nConnection: close\n\nGET /smuggled HTTP/1.1\nHost: x\n\n",
    )
    .await;
    assert!(bare_lf.starts_with("HTTP/1.1 200"), "{bare_lf}");
    assert_eq!(bare_lf.matches("HTTP/1.1 ").count(), 1, "{bare_lf}");
    let seen_paths = paths(&seen);
    assert_eq!(
        seen_paths
            .iter()
            .filter(|path| *path == "/continue")
            .count(),
        1,
        "{seen_paths:?}"
    );
    assert!(
        !seen_paths.contains(&"/smuggled".to_string()),
        "{seen_paths:?}"
    );
}

/// Reads (and drops) a body of the length `head` gives from `buf` and then `stream`: its length,
/// `Some(None)` without a Content-Length, `None` when the connection ends first.
async fn read_sized_body(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    head: &str,
) -> Option<Option<usize>> {
    use tokio::io::AsyncReadExt;
    let lower = head.to_ascii_lowercase();
    let Some(at) = lower.find("content-length: ") else {
        return Some(None);
    };
    let length: usize = lower[at + 16..].split("\r\n").next()?.parse().ok()?;
    while buf.len() < length {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..length);
    Some(Some(length))
}

fn paths(seen: &std::sync::Mutex<Vec<(usize, String)>>) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, path)| path.clone())
        .collect()
}

/// A hand-written HTTP/1.1 instance: answers by path with exact bytes, so the gateway's side of
/// framing is tested against answers a framework would never send. Records which connection
/// each request came on.
async fn scripted_instance() -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<(usize, String)>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<(usize, String)>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        for conn_id in 0.. {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let head_end = loop {
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    buf.drain(..head_end);
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    log.lock().unwrap().push((conn_id, path.clone()));
                    let answer: Vec<u8> = match path.as_str() {
                        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n".to_vec(),
                        "/both" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n".to_vec(),
                        "/fields" | "/limited/fields" => FIELDS_ANSWER.to_vec(),
                        "/continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                        "/stall" => {
                            // A tenth of the body, then silence with the connection open.
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                                .await;
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                        "/drip" => {
                            // Half the body, a pause, the other half.
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
                                .await;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            b"56789".to_vec()
                        }
                        "/half-head" => {
                            // The status line, then silence with the connection open.
                            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n").await;
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                        "/deaf" => {
                            // Takes the head, then neither reads the body nor answers.
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                        "/coded" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(),
                        "/duplex" => {
                            // Answers its head at once, then reads the body (its length from
                            // the head) and sends how much came.
                            if stream.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").await.is_err() {
                                return;
                            }
                            let Some(Some(length)) = read_sized_body(&mut stream, &mut buf, &head).await else {
                                return;
                            };
                            let got = format!("got {length}");
                            format!("{:x}\r\n{got}\r\n0\r\n\r\n", got.len()).into_bytes()
                        }
                        "/repeated-length" => b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
                        "/no-content" => b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n".to_vec(),
                        "/499" => b"HTTP/1.1 499 Client Closed\r\nContent-Length: 4\r\n\r\ngone".to_vec(),
                        "/switch-h2c" => b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n".to_vec(),
                        "/switch-unsaid" => b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n".to_vec(),
                        "/switch-terse" => {
                            // A switch said by its Upgrade field alone; then the tunnel ends.
                            let _ = stream
                                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
                                .await;
                            return;
                        }
                        "/head-chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                        "/broken" => {
                            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n").await;
                            return;
                        }
                        "/invalid" => b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n".to_vec(),
                        "/early" => {
                            let _ = stream
                                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!")
                                .await;
                            return;
                        }
                        "/upload" => {
                            // Reads the body by the framing the gateway chose, answers what came.
                            let lower = head.to_ascii_lowercase();
                            let mut body = Vec::new();
                            if lower.contains("transfer-encoding: chunked") {
                                let mut decoder = scalegate::http1::Chunked::Size;
                                while decoder != scalegate::http1::Chunked::Done {
                                    let step = decoder.decode(&buf).unwrap();
                                    body.extend_from_slice(&buf[step.data.clone()]);
                                    buf.drain(..step.used);
                                    if step.used == 0 {
                                        let mut chunk = [0u8; 4096];
                                        match stream.read(&mut chunk).await {
                                            Ok(0) | Err(_) => return,
                                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                        }
                                    }
                                }
                                body.splice(0..0, b"chunked:".iter().copied());
                            } else {
                                match read_sized_body(&mut stream, &mut buf, &head).await {
                                    Some(Some(length)) => body = format!("length:{length}").into_bytes(),
                                    Some(None) => {}
                                    None => return,
                                }
                            }
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                                .into_bytes()
                                .into_iter()
                                .chain(body)
                                .collect()
                        }
                        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                    };
                    if stream.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn bodyless_and_early_answers_say_what_rfc_9110_asks() {
    let (instance, _) = scripted_instance().await;
    let gw = gateway(&app_config_at(&[instance], ""));
    let answer = |head: &'static [u8]| raw_exchange_off_thread(gw.proxy, head);
    // A 204 carries no Content-Length (RFC 9110 §8.6), whatever the instance wrote.
    let no_content =
        answer(b"GET /no-content HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(no_content.starts_with("HTTP/1.1 204"), "{no_content}");
    assert!(
        !no_content.to_ascii_lowercase().contains("content-length"),
        "{no_content}"
    );
    // A switch to a protocol the client did not ask for, or to one it does not say, is not
    // passed on (RFC 9110 §7.8, §15.2.2).
    let switched = answer(
        b"GET /switch-h2c HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(switched.starts_with("HTTP/1.1 502"), "{switched}");
    let unsaid = answer(
        b"GET /switch-unsaid HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(unsaid.starts_with("HTTP/1.1 502"), "{unsaid}");
    // One the client asked for, said without `Connection: upgrade`, reaches the client with
    // both fields, as a WebSocket client requires.
    let terse = answer(
        b"GET /switch-terse HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert!(terse.starts_with("http/1.1 101"), "{terse}");
    assert!(terse.contains("\r\nconnection: upgrade\r\n"), "{terse}");
    assert!(terse.contains("\r\nupgrade: websocket\r\n"), "{terse}");
    // Nor over HTTP/2, whose clients refuse the stream if it does.
    let h2 = request(&h2c_client(), "GET", &gw.url("/no-content"), &[], "").await;
    let h2 = h2.unwrap();
    assert_eq!((h2.status, h2.header("content-length")), (204, ""));
    // A HEAD answer without a length gets none invented: a GET would have sent a chunked body.
    let head = answer(b"HEAD /head-chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("content-length"),
        "{head}"
    );
    // An early answer to a body too large to discard closes the connection, and says so.
    let early = answer(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n").await;
    assert!(early.starts_with("HTTP/1.1 413"), "{early}");
    assert!(early.contains("connection: close\r\n"), "{early}");
    // A length the instance repeated goes on as one field with one number: an HTTP/2 client
    // refuses `5, 5` (RFC 9113 §8.1.1), and a HEAD answer carries the field as it is.
    let h2 = request(&h2c_client(), "GET", &gw.url("/repeated-length"), &[], "").await;
    let h2 = h2.unwrap();
    assert_eq!((h2.status, &h2.body[..]), (200, &b"hello"[..]));
    let head =
        answer(b"HEAD /repeated-length HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let lengths: Vec<_> = head
        .lines()
        .filter(|line| line.to_ascii_lowercase().starts_with("content-length:"))
        .collect();
    assert_eq!(lengths, ["content-length: 5"], "{head}");
}

#[tokio::test]
async fn broken_or_invalid_answer_heads_are_never_sent_again() {
    let (first, first_seen) = scripted_instance().await;
    let (second, second_seen) = scripted_instance().await;
    let gw = gateway(&app_config_at(&[first, second], ""));
    let client = client();
    // Answer bytes came back: the instance acted on the request, so a GET is not retried. A
    // coding other than chunked would reach the client applied and unnamed: 502, as nginx.
    for path in ["/broken", "/invalid", "/coded"] {
        let reply = get(&client, &gw.url(path)).await;
        assert_eq!(reply.status, 502, "{path}");
        let tries = [&first_seen, &second_seen]
            .iter()
            .map(|seen| paths(seen).iter().filter(|p| *p == path).count())
            .sum::<usize>();
        assert_eq!(tries, 1, "{path} went to more than one instance");
    }
    // An invalid head counts against the instance (max_fails = 1): the other one takes the
    // following requests. Without that, an instance answering garbage at once would draw the
    // traffic of latency- and load-aware strategies.
    let (one, one_seen) = scripted_instance().await;
    let (two, two_seen) = scripted_instance().await;
    let pair = gateway(&app_config_at(&[one, two], "strategy = \"p2c_ewma\""));
    assert_eq!(get(&client, &pair.url("/invalid")).await.status, 502);
    for _ in 0..4 {
        assert_eq!(get(&client, &pair.url("/chunked")).await.status, 200);
    }
    let (one_paths, two_paths) = (paths(&one_seen), paths(&two_seen));
    let (bad, good) = if one_paths.contains(&"/invalid".to_string()) {
        (one_paths, two_paths)
    } else {
        (two_paths, one_paths)
    };
    assert_eq!(bad, ["/invalid"]);
    assert_eq!(good, ["/chunked"; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_answers_are_reframed_and_connections_reused_only_when_safe() {
    let (instance, seen) = scripted_instance().await;
    let gw = gateway(&app_config_at(&[instance], "retries = 0"));
    let client = client();

    // Chunked answers are decoded (extensions and trailers dropped), then re-framed for the
    // client; the connection goes back to the pool and carries the next request.
    let chunked = get(&client, &gw.url("/chunked")).await;
    assert_eq!(
        (chunked.status, &chunked.body[..]),
        (200, &b"hello world"[..])
    );
    let again = get(&client, &gw.url("/chunked")).await;
    assert_eq!(&again.body[..], b"hello world");
    // 1xx interim answers are skipped.
    let cont = get(&client, &gw.url("/continue")).await;
    assert_eq!((cont.status, &cont.body[..]), (200, &b"ok"[..]));
    {
        let log = seen.lock().unwrap();
        assert_eq!(log.len(), 3);
        assert!(log.iter().all(|(conn, _)| *conn == log[0].0), "{log:?}");
    }

    // Content-Length beside Transfer-Encoding: the chunked framing wins, the length is not
    // passed on, and that connection is never reused.
    let both = get(&client, &gw.url("/both")).await;
    assert_eq!((both.status, &both.body[..]), (200, &b"body"[..]));
    assert_eq!(both.header("content-length"), "");
    get(&client, &gw.url("/continue")).await;
    {
        let log = seen.lock().unwrap();
        let both_conn = log.iter().find(|(_, p)| p == "/both").unwrap().0;
        assert_ne!(log.last().unwrap().0, both_conn, "{log:?}");
    }

    // A body of unknown length goes out chunked; a known length goes out as is.
    let body = "x".repeat(100_000);
    let proxy = gw.proxy;
    let chunked_upload = tokio::task::spawn_blocking(move || {
        raw_exchange(
            proxy,
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert!(
        chunked_upload.starts_with("HTTP/1.1 200"),
        "{chunked_upload}"
    );
    assert!(
        chunked_upload.ends_with("chunked:abcde"),
        "{chunked_upload}"
    );
    let sized = request(&client, "POST", &gw.url("/upload"), &[], &body)
        .await
        .unwrap();
    assert_eq!(&sized.body[..], b"length:100000");

    // An answer before the upload finished is passed on as it is.
    let early = request(
        &client,
        "POST",
        &gw.url("/early"),
        &[],
        &"z".repeat(4_000_000),
    )
    .await;
    let early = early.unwrap();
    assert_eq!((early.status, &early.body[..]), (413, &b"big!"[..]));
    // An instance's own 499 is an answer: it reaches the client (the gateway's 499, for a
    // client gone inside its upload, is written to nobody).
    let own = get(&client, &gw.url("/499")).await;
    assert_eq!((own.status, &own.body[..]), (499, &b"gone"[..]));
}

#[tokio::test]
async fn odd_transfer_codings_and_signed_lengths_are_refused_before_the_instance() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let client = client();
    let tail = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let refused = [
        "Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Content-Length: +5\r\n\r\nhello",
        "Content-Length: -5\r\n\r\nhello",
        "Content-Length: 5 5\r\n\r\nhello",
        "Content-Length: 0x5\r\n\r\nhello",
        "X-Bare-CR: a\rContent-Length: 5\r\n\r\nhello",
    ];
    for case in refused {
        let request = format!("POST /work HTTP/1.1\r\nHost: x\r\n{case}{tail}");
        let answer = raw_exchange(gw.proxy, request.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400"), "{case:?}\n{answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{case:?}\n{answer}");
    }
    assert_eq!(backend_requests(&client, &a).await, 0);
}

#[tokio::test]
async fn invalid_chunk_sizes_get_400_and_the_tail_never_reaches_the_instance() {
    let (instance, seen) = scripted_instance().await;
    let gw = gateway(&app_config_at(&[instance], ""));
    // The last two hide a line end (a bare LF) in a chunk extension, for a parser in front.
    for size in ["zz", "fffffffffffffffffffff", "-5", "5 5", "5;ext\nX", " 5"] {
        let request = format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let answer = raw_exchange_off_thread(gw.proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{size}\n{answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{size}\n{answer}");
        // At most the head was forwarded before the body broke; the tail never was.
        assert!(
            paths(&seen).iter().all(|path| path == "/upload"),
            "{size}: {:?}",
            paths(&seen)
        );
    }
}

#[tokio::test]
async fn bare_lf_line_endings_reach_the_instance_as_the_gateway_read_them() {
    let a = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a], ""));
    let client = client();
    // Bare LF in the request line and between fields: one request, its fields intact.
    let answer = raw_exchange(
        gw.proxy,
        b"GET /echo HTTP/1.1\nHost: x\r\nX-Mixed: one\nX-After: two\nConnection: close\n\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#"["x-mixed","one"]"#), "{answer}");
    assert!(answer.contains(r#"["x-after","two"]"#), "{answer}");
    assert_eq!(backend_requests(&client, &a).await, 1);
    // Two pipelined bare-LF requests are two requests to both the gateway and the instance.
    let answer = raw_exchange(
        gw.proxy,
        b"GET /echo HTTP/1.1\nHost: x\n\nGET /echo HTTP/1.1\nHost: x\nConnection: close\n\n",
    );
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    assert_eq!(backend_requests(&client, &a).await, 3);
}

/// An instance that answers one request per connection and closes it a moment later without
/// having said so (as a server does at its keep-alive timeout, or after leaving a body unread):
/// a request sent on the pooled connection in that moment is never answered.
async fn one_shot_instance() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_closing_idle_connections_never_count_as_failures() {
    let instance = one_shot_instance().await;
    let gw = gateway(&app_config_at(&[instance], ""));
    let client = client();
    let url = gw.url("/");
    let mut statuses = std::collections::BTreeMap::new();
    for round in 0..40 {
        let (method, body) = if round % 2 == 0 {
            ("GET", "")
        } else {
            ("POST", "a body the instance never reads")
        };
        let batch: Vec<_> = (0..4)
            .map(|_| request(&client, method, &url, &[], body))
            .collect();
        for reply in futures_util::future::join_all(batch).await {
            *statuses.entry((method, reply.unwrap().status)).or_insert(0) += 1;
        }
    }
    // Replayable requests are sent again on a new connection; a POST sent on a connection the
    // instance then closed cannot be (the instance may have seen it) and gets 502. Either way
    // the instance stays in rotation: a 503 would mean a closed idle connection was taken for
    // the instance's failure.
    assert_eq!(statuses.get(&("GET", 200)), Some(&80), "{statuses:?}");
    assert!(
        !statuses.keys().any(|(_, status)| *status == 503),
        "{statuses:?}"
    );
    let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
    let instance = &detailed["upstreams"][0]["instances"][0];
    assert_eq!(instance["failures"], 0, "{detailed}");
}

/// The warning of a failed request names it by the same request ID as its access line and its
/// answer, so the two can be joined in JSON logs.
#[tokio::test]
async fn a_failed_requests_warning_carries_its_plain_request_id() {
    let gw = gateway_logging(&format!(
        "[upstreams.app]\ninstances = [\"{}\"]\n\n[[routes]]\nupstream = \"app\"\n",
        dead_addr()
    ));
    let reply = request(
        &client(),
        "GET",
        &gw.url("/"),
        &[("x-request-id", "failed-1")],
        "",
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 502);
    let warned = || {
        gw.proc
            .log_lines()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["message"] == "request failed")
    };
    assert!(eventually(Duration::from_secs(5), || async { warned().is_some() }).await);
    assert_eq!(warned().unwrap()["request_id"], "failed-1");
}

/// A stdout or stderr that cannot be written (full, or a closed pipe) does not stop the
/// gateway: the "listening" lines panicked on stdout at start, and a failed log line (every
/// request's access-log line) aborted it.
#[tokio::test]
async fn outputs_that_cannot_be_written_do_not_stop_the_gateway() {
    let a = demo_backend(&[]);
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        })
        .collect();
    let (listen, admin) = (
        format!("127.0.0.1:{}", ports[0]),
        format!("127.0.0.1:{}", ports[1]),
    );
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--listen", &listen, "--admin-listen", &admin])
        .args(["--upstream", &a.addr().to_string()])
        .stdout(full())
        .stderr(full())
        .spawn()
        .unwrap();
    let client = client();
    let serving = eventually(Duration::from_secs(10), || async {
        let reply = request(&client, "GET", &format!("http://{listen}/x"), &[], "").await;
        reply.is_ok_and(|r| r.status == 200)
    })
    .await;
    for _ in 0..3 {
        let reply = request(&client, "GET", &format!("http://{listen}/y"), &[], "").await;
        assert_eq!(reply.map(|r| r.status).ok(), Some(200));
    }
    let exited = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(serving, "the gateway did not serve: {exited:?}");
}

/// `DELETE /api/upstreams/app/instances/{addr}`.
async fn drain_instance(client: &Client, gw: &Gateway, addr: std::net::SocketAddr) -> Reply {
    let url = gw.admin_url(&format!("/api/upstreams/app/instances/{addr}"));
    request(client, "DELETE", &url, &[], "").await.unwrap()
}

/// Whether `/api/upstreams` lists `addr` in upstream `app`.
async fn listed(client: &Client, gw: &Gateway, addr: std::net::SocketAddr) -> bool {
    let json = get(client, &gw.admin_url("/api/upstreams")).await.json();
    json["upstreams"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["addr"] == addr.to_string().as_str())
}

/// Two requests at once, so each of two instances has one in flight (round robin or
/// least_conn alike), 300 ms after which it returns; abort the task to let them go.
async fn one_on_each(client: &Client, gw: &Gateway) -> tokio::task::JoinHandle<()> {
    let (client, url) = (client.clone(), gw.url("/work"));
    let both = tokio::spawn(async move {
        let first = request(&client, "GET", &url, &[], "");
        let second = request(&client, "GET", &url, &[], "");
        let _ = tokio::join!(first, second);
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    both
}

/// A drain called off and started again within one poll of the first drain: the new drain
/// has its whole `drain_timeout` (the first one's deadline removed the instance), and the
/// first ends without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_started_again_has_its_whole_timeout() {
    let slow = demo_backend(&["--latency-ms", "20000"]);
    let other = demo_backend(&[]);
    let gw = gateway(&app_config(&[&slow, &other], "drain_timeout = \"3s\""));
    let client = client();
    let pinned = one_on_each(&client, &gw).await;
    let started = std::time::Instant::now();
    assert_eq!(drain_instance(&client, &gw, slow.addr()).await.status, 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(add_instance(&client, &gw, slow.addr()).await.status, 200);
    assert_eq!(drain_instance(&client, &gw, slow.addr()).await.status, 202);
    // Past the first drain's deadline, within the second's.
    while started.elapsed() < Duration::from_millis(3700) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        listed(&client, &gw, slow.addr()).await,
        "removed at the first drain's deadline"
    );
    let gone = eventually(Duration::from_secs(5), || async {
        !listed(&client, &gw, slow.addr()).await
    });
    assert!(gone.await);
    pinned.abort();
}

/// A configured instance that a reload dropped while it drained, brought back through the
/// admin API, is kept by later reloads as one added at run time: the next reload removed it at
/// once, in-flight requests and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undrained_instance_the_file_dropped_stays_across_reloads() {
    let a = demo_backend(&["--latency-ms", "3000"]);
    let b = demo_backend(&[]);
    let gw = gateway(&app_config(&[&a, &b], ""));
    let client = client();
    let in_flight = one_on_each(&client, &gw).await;
    assert_eq!(drain_instance(&client, &gw, a.addr()).await.status, 202);
    let reload = |body: String| {
        let (client, url) = (client.clone(), gw.admin_url("/api/reload"));
        gw.write_config(&body);
        async move {
            request(&client, "POST", &url, &[], "")
                .await
                .unwrap()
                .status
        }
    };
    assert_eq!(reload(app_config(&[&b], "")).await, 200);
    assert!(
        listed(&client, &gw, a.addr()).await,
        "a draining instance stays"
    );
    assert_eq!(add_instance(&client, &gw, a.addr()).await.status, 200);
    assert_eq!(reload(app_config(&[&b], "retries = 1")).await, 200);
    assert!(
        listed(&client, &gw, a.addr()).await,
        "the next reload removed it"
    );
    in_flight.abort();
}

/// A check under way when a reload removes `[health]` does not count once it ends: no checker
/// is left to bring the instance back, and it stayed out for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_under_way_when_a_reload_removes_the_checks_does_not_count() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = demo_backend(&[]);
    // The checks go to a management port of our own, answered by hand.
    let checks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health = format!(
        "[upstreams.app.health]\nport = {}\ninterval = \"200ms\"\ntimeout = \"20s\"\nfall = 1\nrise = 1",
        checks.local_addr().unwrap().port()
    );
    let gw = gateway(&app_config(&[&backend], &health));
    let client = client();
    let failing =
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let probe = || async {
        let (mut probe, _) = checks.accept().await.unwrap();
        let mut head = [0u8; 1024];
        let _ = probe.read(&mut head).await.unwrap();
        probe
    };
    let mut first = probe().await;
    first.write_all(failing).await.unwrap();
    drop(first);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(&client, &gw.url("/")).await.status == 503
        })
        .await,
        "the failed check did not take the instance out"
    );
    let mut under_way = probe().await;
    gw.write_config(&app_config(&[&backend], ""));
    let reload = request(&client, "POST", &gw.admin_url("/api/reload"), &[], "").await;
    assert_eq!(reload.unwrap().status, 200);
    assert_eq!(get(&client, &gw.url("/")).await.status, 200);
    under_way.write_all(failing).await.unwrap();
    drop(under_way);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&client, &gw.url("/")).await.status, 200);
}
