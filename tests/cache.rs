//! The response cache end to end: real demo instances (their `/__stats` counts what reached
//! them) behind a real gateway with cached routes.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

fn cached(backend: &Proc, cache: &str, top: &str) -> Gateway {
    gateway(&format!(
        "{top}\n{}",
        cached_config(backend.addr(), "", cache)
    ))
}

/// One upstream (with `extra` keys) of `instance`, and one route to it with `cache`.
fn cached_config(instance: SocketAddr, extra: &str, cache: &str) -> String {
    format!(
        "{}cache = {{ {cache} }}\n",
        app_config_at(&[instance], extra)
    )
}

async fn status_and_n(client: &Client, url: &str, headers: &[(&str, &str)]) -> (String, u64) {
    let reply = request(client, "GET", url, headers, "").await.unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    (
        reply.header("x-cache-status").to_string(),
        reply.json()["n"].as_u64().unwrap(),
    )
}

/// A fill reads the instance at its own pace, not the first client's: a client that takes
/// nothing does not make the next request for the key wait out the lock and go uncached. And a
/// miss keeps the instance's Content-Length.
#[tokio::test]
async fn a_slow_first_client_neither_slows_the_fill_nor_loses_the_length() {
    use tokio::io::AsyncWriteExt;
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "max_body = \"20MiB\"", "");
    let path = "/cache/big?bytes=15000000";
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(gw.proxy).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", gw.proxy);
    slow.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = client();
    let second = get(&client, &gw.url(path)).await;
    assert_eq!((second.status, second.body.len()), (200, 15_000_000));
    // A HIT: it waited for the fill, not out the 5 s lock (which would end in an uncached MISS).
    assert_eq!(second.header("x-cache-status"), "HIT");
    drop(slow);

    let miss = get(&client, &gw.url("/cache/length")).await;
    assert_eq!(miss.header("x-cache-status"), "MISS");
    assert_eq!(miss.header("content-length"), miss.body.len().to_string());
}

/// `ttl_statuses = [200]` (nginx `proxy_cache_valid 200 1m`): a 404 that gives no lifetime is
/// not kept for `ttl`, as by default it is.
#[tokio::test]
async fn ttl_statuses_limit_what_ttl_keeps() {
    let backend = demo_backend(&[]);
    let client = client();
    for (statuses, second) in [("", "HIT"), (", ttl_statuses = [200]", "MISS")] {
        let gw = cached(&backend, &format!("ttl = \"60s\"{statuses}"), "");
        let url = gw.url("/cache/missing?status=404");
        let first = get(&client, &url).await;
        assert_eq!(
            (first.status, first.header("x-cache-status")),
            (404, "MISS")
        );
        let again = get(&client, &url).await;
        assert_eq!(again.header("x-cache-status"), second, "{statuses}");
        let ok = gw.url("/cache/found");
        get(&client, &ok).await;
        assert_eq!(get(&client, &ok).await.header("x-cache-status"), "HIT");
    }
}

/// A reload that changes `[cache]` (here its size) keeps the entries that fit and the
/// counters going: they went back to 0, which Prometheus reads as a reset.
#[tokio::test]
async fn a_reload_that_resizes_the_cache_keeps_its_entries_and_counts() {
    let backend = demo_backend(&[]);
    let config = |size: &str| {
        format!(
            "[cache]\nmax_size = \"{size}\"\n{}",
            cached_config(backend.addr(), "", "ttl = \"60s\"")
        )
    };
    let gw = gateway(&config("1MiB"));
    let client = client();
    let url = gw.url("/cache/kept");
    assert_eq!(get(&client, &url).await.header("x-cache-status"), "MISS");
    assert_eq!(get(&client, &url).await.header("x-cache-status"), "HIT");
    gw.write_config(&config("2MiB"));
    let reload = request(&client, "POST", &gw.admin_url("/api/reload"), &[], "").await;
    assert_eq!(reload.unwrap().status, 200);
    assert_eq!(get(&client, &url).await.header("x-cache-status"), "HIT");
    let stats = get(&client, &gw.admin_url("/api/cache/stats")).await.json();
    assert_eq!(
        (&stats["hits"], &stats["misses"]),
        (&2.into(), &1.into()),
        "{stats}"
    );
}

#[tokio::test]
async fn hits_until_the_ttl_then_fetches_again() {
    let backend = demo_backend(&[]);
    // stale_if_error keeps the entry past its ttl, so the refetch is labelled EXPIRED.
    let gw = cached(&backend, "ttl = \"1s\", stale_if_error = \"60s\"", "");
    let client = client();
    let url = gw.url("/cache");
    assert_eq!(status_and_n(&client, &url, &[]).await, ("MISS".into(), 1));
    let reply = get(&client, &url).await;
    assert_eq!(reply.header("x-cache-status"), "HIT");
    assert_eq!(reply.json()["n"], 1);
    assert_eq!(reply.header("age"), "0");
    assert!(!reply.header("x-request-id").is_empty());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        status_and_n(&client, &url, &[]).await,
        ("EXPIRED".into(), 2)
    );
    assert_eq!(status_and_n(&client, &url, &[]).await, ("HIT".into(), 2));
    // The response's own max-age beats the route ttl.
    let long = gw.url("/cache?cc=max-age%3D60");
    assert_eq!(status_and_n(&client, &long, &[]).await.0, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = get(&client, &long).await;
    assert_eq!(reply.header("x-cache-status"), "HIT");
    assert_eq!(reply.header("age"), "1");
    // HEAD is answered from the same entry.
    let head = request(&client, "HEAD", &long, &[], "").await.unwrap();
    assert_eq!(head.header("x-cache-status"), "HIT");
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn a_hundred_concurrent_misses_make_one_instance_request() {
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "ttl = \"60s\"", "");
    let client = client();
    let url = gw.url("/cache?latency_ms=300");
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move { get(&client, &url).await })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["n"], 1);
        *statuses
            .entry(reply.header("x-cache-status").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(backend_requests(&client, &backend).await, 1, "{statuses:?}");
    assert_eq!(statuses.get("MISS"), Some(&1), "{statuses:?}");
}

/// `count` requests for `path` with `accept` at once: their cache statuses and answer numbers.
async fn burst(gw: &Gateway, path: &str, accept: &'static str, count: usize) -> Vec<(String, u64)> {
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let url = gw.url(path);
            tokio::spawn(async move { status_and_n(&client(), &url, &[("accept", accept)]).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// Requests that waited for a fetch take its answer when it was stored stale at once
/// (`max-age=0` under stale-while-revalidate), and the requests of another Vary variant than
/// the one fetched wait for one fetch of their own, rather than each going to the instance.
#[tokio::test]
async fn waiting_requests_share_a_stale_stored_answer_and_a_fetch_of_their_variant() {
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "stale_while_revalidate = \"20s\"", "");
    let client = client();
    let stale = "/cache?latency_ms=300&cc=max-age%3D0";
    let answers = burst(&gw, stale, "a", 10).await;
    assert_eq!(backend_requests(&client, &backend).await, 1, "{answers:?}");
    let updating = answers.iter().filter(|(status, _)| status == "UPDATING");
    assert_eq!(updating.count(), 9, "{answers:?}");

    let varied = "/cache?latency_ms=300&vary=accept&cc=max-age%3D60";
    let later = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::join!(burst(&gw, varied, "a", 5), burst(&gw, varied, "b", 5))
    };
    let (first, (a, b)) = tokio::join!(burst(&gw, varied, "a", 1), later);
    // One fetch per variant.
    assert_eq!(
        backend_requests(&client, &backend).await,
        3,
        "{first:?} {a:?} {b:?}"
    );
    assert!(a.iter().all(|&(_, n)| n == first[0].1), "{first:?} {a:?}");
    assert!(b.iter().all(|&(_, n)| n == b[0].1), "{b:?}");
}

/// The client whose miss started the fetch leaves before the answer: the fetch goes on, and
/// the requests waiting for it are answered from it, not each by the instance.
#[tokio::test]
async fn waiting_requests_keep_their_fetch_when_the_first_client_leaves() {
    use tokio::io::AsyncWriteExt;
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "ttl = \"60s\"", "");
    let path = "/cache?latency_ms=600";
    let mut first = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", gw.proxy);
    first.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = client();
    let waiting: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            let url = gw.url(path);
            tokio::spawn(async move { status_and_n(&client, &url, &[]).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(first);
    for task in waiting {
        assert_eq!(task.await.unwrap(), ("HIT".into(), 1));
    }
    assert_eq!(backend_requests(&client, &backend).await, 1);
}

/// A fetch that outlives its client still holds the request's place under the route's
/// `max_in_flight`: a client cannot push misses past the cap by hanging up.
#[tokio::test]
async fn a_fetch_its_client_left_still_counts_against_the_concurrency_cap() {
    use tokio::io::AsyncWriteExt;
    let backend = demo_backend(&[]);
    let gw = gateway(&format!(
        "[upstreams.app]\ninstances = [\"{}\"]\n\n[[routes]]\nupstream = \"app\"\nmax_in_flight = 1\nqueue_timeout = \"100ms\"\ncache = {{ ttl = \"60s\" }}\n",
        backend.addr()
    ));
    let mut leaving = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    leaving
        .write_all(b"GET /cache?latency_ms=800 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(leaving);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = client();
    let other = get(&client, &gw.url("/cache?latency_ms=800&other=1")).await;
    assert_eq!(other.status, 503, "{:?}", other.body);
    // Once the fetch is done, the place is free again.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get(&client, &gw.url("/cache?quick=1")).await.status, 200);
}

/// An upstream's `max_in_flight` counts the requests that reach its instances: hits take no
/// slot, and a refresh refused one serves the stale entry (nginx's upstream `max_conns` with
/// `proxy_cache_use_stale`).
#[tokio::test]
async fn hits_take_no_slot_of_the_upstream_limit() {
    let backend = demo_backend(&[]);
    let gw = gateway(&format!(
        "[upstreams.app]\ninstances = [\"{}\"]\nmax_in_flight = 1\nqueue_size = 0\n\n\
         [[routes]]\nupstream = \"app\"\ncache = {{ ttl = \"60s\", stale_if_error = \"60s\" }}\n",
        backend.addr()
    ));
    let client = client();
    let old = gw.url("/cache?k=old&cc=max-age%3D1");
    assert_eq!(status_and_n(&client, &old, &[]).await, ("MISS".into(), 1));
    let hot = gw.url("/cache?k=hot");
    assert_eq!(status_and_n(&client, &hot, &[]).await, ("MISS".into(), 2));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A miss holds the upstream's one slot for 1.5 s.
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), gw.url("/cache?k=slow&latency_ms=1500"));
        async move { get(&client, &url).await.status }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status_and_n(&client, &hot, &[]).await, ("HIT".into(), 2));
    assert_eq!(status_and_n(&client, &old, &[]).await, ("STALE".into(), 1));
    let refused = get(&client, &gw.url("/cache?k=new")).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert_eq!(refused.json()["error"], "overloaded");
    assert_eq!(refused.header("x-cache-status"), "MISS");
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(get(&client, &gw.url("/cache?k=new")).await.status, 200);
}

/// An instance that answers its `n`-th request (counted over every connection, from 0) with
/// `answer(n)`: a pause, then those bytes. Also returns the count of requests.
fn numbered_instance(
    answer: impl Fn(usize) -> (Duration, &'static str) + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let addr = raw_instance(move |mut stream, _| {
        let mut read = Vec::new();
        loop {
            let mut buf = [0u8; 4096];
            while !read.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => read.extend_from_slice(&buf[..n]),
                }
            }
            read.clear();
            let (pause, text) = answer(seen.fetch_add(1, Ordering::SeqCst));
            std::thread::sleep(pause);
            if stream.write_all(text.as_bytes()).is_err() {
                return;
            }
        }
    });
    (addr, count)
}

const FAILED: &str = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nfail";
const FRESH_A_MINUTE: &str =
    "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 3\r\n\r\nnew";
const FRESH_A_SECOND: &str =
    "HTTP/1.1 200 OK\r\nCache-Control: max-age=1\r\nContent-Length: 3\r\n\r\nold";

/// A gateway with one cached route to `instance`, its upstream with `extra` keys.
fn cached_at(instance: SocketAddr, extra: &str, cache: &str) -> Gateway {
    gateway(&cached_config(instance, extra, cache))
}

/// GETs `path` from `gw` once, then `waiters` times once the instance has its request (the
/// count `asked` went past what it was), so that the first is the fetch they wait on; the
/// statuses, `X-Cache-Status` and bodies, the first's first.
async fn first_then_waiters(
    gw: &Gateway,
    path: &str,
    waiters: usize,
    asked: &AtomicUsize,
) -> Vec<(u16, String, String)> {
    let client = client();
    let ask = |client: Client, url: String| async move {
        let reply = get(&client, &url).await;
        let label = reply.header("x-cache-status").to_string();
        (
            reply.status,
            label,
            String::from_utf8_lossy(&reply.body).into_owned(),
        )
    };
    let before = asked.load(Ordering::SeqCst);
    let first = tokio::spawn(ask(client.clone(), gw.url(path)));
    let sent = eventually(Duration::from_secs(5), || async {
        asked.load(Ordering::SeqCst) > before
    });
    assert!(sent.await, "the first request never reached the instance");
    let rest: Vec<_> = (0..waiters)
        .map(|_| tokio::spawn(ask(client.clone(), gw.url(path))))
        .collect();
    let mut answers = vec![first.await.unwrap()];
    for waiter in rest {
        answers.push(waiter.await.unwrap());
    }
    answers
}

/// A fill the instance fails hands the lease to one waiter, as nginx's cache lock does: the
/// others wait on, then hit, rather than all asking the instance that just failed at once.
#[tokio::test]
async fn after_a_failed_fill_one_waiter_fetches_for_the_rest() {
    let (instance, asked) = numbered_instance(|n| match n {
        0 => (Duration::from_millis(400), FAILED),
        _ => (Duration::from_millis(50), FRESH_A_MINUTE),
    });
    let gw = cached_at(instance, "", "ttl = \"60s\"");
    let answers = first_then_waiters(&gw, "/x", 9, &asked).await;
    assert_eq!(answers[0], (500, "MISS".into(), "fail".into()));
    let statuses: Vec<_> = answers[1..].iter().map(|(status, ..)| *status).collect();
    assert_eq!(statuses, [200; 9], "{answers:?}");
    assert_eq!(asked.load(Ordering::SeqCst), 2, "{answers:?}");
}

/// A purge while a fill is in flight keeps its answer out of the store; the requests waiting
/// on it then take turns, as after a failed fill: one fetches again and the rest are answered
/// from what that stores, rather than all asking the instance at once.
#[tokio::test]
async fn after_a_purge_during_a_fill_one_waiter_fetches_for_the_rest() {
    let (instance, asked) = numbered_instance(|n| match n {
        0 => (Duration::from_millis(1000), FRESH_A_MINUTE),
        _ => (Duration::from_millis(300), FRESH_A_MINUTE),
    });
    let gw = cached_at(instance, "", "ttl = \"60s\"");
    let client = client();
    let ask = |url: String| {
        let client = client.clone();
        async move {
            let reply = get(&client, &url).await;
            (reply.status, reply.header("x-cache-status").to_string())
        }
    };
    let first = tokio::spawn(ask(gw.url("/x")));
    let sent = eventually(Duration::from_secs(5), || async {
        asked.load(Ordering::SeqCst) == 1
    });
    assert!(sent.await, "the first request never reached the instance");
    let waiters: Vec<_> = (0..20).map(|_| tokio::spawn(ask(gw.url("/x")))).collect();
    // The waiters are in line well before the first fetch's answer comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let purge = gw.admin_url("/api/cache?prefix=/x");
    let purged = request(&client, "DELETE", &purge, &[], "").await.unwrap();
    assert_eq!(purged.status, 200);
    let mut answers = vec![first.await.unwrap()];
    for waiter in waiters {
        answers.push(waiter.await.unwrap());
    }
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    // The first fetch, whose answer the purge kept out, and one more, which the rest hit.
    assert_eq!(asked.load(Ordering::SeqCst), 2, "{answers:?}");
    let misses = answers.iter().filter(|(_, label)| label == "MISS").count();
    assert_eq!(misses, 2, "{answers:?}");
    assert_eq!(ask(gw.url("/x")).await, (200, "HIT".into()));
}

/// A fill the instance hangs on does not hold back every request for its key until it ends:
/// once it has gone on for 5 s (nginx `proxy_cache_lock_age`), one waiter fetches too, its
/// answer is stored, and the other waiters are answered from it while the first fill still
/// hangs.
#[tokio::test]
async fn a_hung_fill_lets_one_more_request_fetch_once_the_lock_is_5_s_old() {
    let (instance, asked) = numbered_instance(|n| match n {
        0 => (Duration::from_secs(30), FRESH_A_MINUTE),
        _ => (Duration::from_millis(100), FRESH_A_MINUTE),
    });
    let gw = cached_at(instance, "response_timeout = \"60s\"", "ttl = \"60s\"");
    let client = client();
    let ask = |url: String| {
        let client = client.clone();
        async move {
            let reply = get(&client, &url).await;
            let label = reply.header("x-cache-status").to_string();
            (
                reply.status,
                label,
                String::from_utf8_lossy(&reply.body).into_owned(),
            )
        }
    };
    let hung = tokio::spawn(ask(gw.url("/x")));
    let sent = eventually(Duration::from_secs(5), || async {
        asked.load(Ordering::SeqCst) == 1
    });
    assert!(sent.await, "the first request never reached the instance");
    // Waiters that came well after the lock: their own 5 s of waiting last past its age.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiters: Vec<_> = (0..10).map(|_| tokio::spawn(ask(gw.url("/x")))).collect();
    let mut answers = Vec::new();
    for waiter in waiters {
        answers.push(waiter.await.unwrap());
    }
    assert!(!hung.is_finished(), "the first fill is still going");
    assert!(
        answers
            .iter()
            .all(|(status, _, body)| *status == 200 && body == "new"),
        "{answers:?}"
    );
    // One waiter fetched (a MISS, stored), the others hit what it stored.
    let hits = answers
        .iter()
        .filter(|(_, label, _)| label == "HIT")
        .count();
    assert_eq!(hits, 9, "{answers:?}");
    assert_eq!(asked.load(Ordering::SeqCst), 2, "{answers:?}");
    assert_eq!(ask(gw.url("/x")).await.1, "HIT");
    hung.abort();
}

/// When the instance fails a refresh, the requests waiting on it get the stale entry its
/// failure serves (`stale_if_error`) without asking the instance again; and a request that
/// waited out the lock (5 s) and failed on its own gets it too.
#[tokio::test]
async fn waiters_on_a_failed_refresh_get_the_stale_entry() {
    let (instance, asked) = numbered_instance(|n| match n {
        0 => (Duration::ZERO, FRESH_A_SECOND),
        1 => (Duration::from_millis(400), FAILED),
        // The third hangs past the lock timeout, the rest fail at once.
        2 => (Duration::from_secs(20), FAILED),
        _ => (Duration::ZERO, FAILED),
    });
    let gw = cached_at(
        instance,
        "response_timeout = \"15s\"",
        "ttl = \"60s\", stale_if_error = \"60s\"",
    );
    let client = client();
    assert_eq!(
        get(&client, &gw.url("/x")).await.header("x-cache-status"),
        "MISS"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let answers = first_then_waiters(&gw, "/x", 4, &asked).await;
    for answer in &answers {
        assert_eq!(*answer, (200, "STALE".into(), "old".into()), "{answers:?}");
    }
    assert_eq!(asked.load(Ordering::SeqCst), 2, "{answers:?}");

    let hung = tokio::spawn({
        let (client, url) = (client.clone(), gw.url("/x"));
        async move { get(&client, &url).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let late = get(&client, &gw.url("/x")).await;
    assert_eq!(
        (late.status, late.header("x-cache-status"), &late.body[..]),
        (200, "STALE", &b"old"[..])
    );
    assert_eq!(asked.load(Ordering::SeqCst), 4);
    hung.abort();
}

/// A background refresh that meets a failure does not store it over the entry, even when the
/// failure says it may be stored: the entry goes on answering, as after a client's fetch.
#[tokio::test]
async fn a_refresh_that_fails_keeps_the_stale_entry() {
    const FAILED_FOR_A_MINUTE: &str = "HTTP/1.1 503 Service Unavailable\r\nCache-Control: max-age=60\r\nContent-Length: 4\r\n\r\nfail";
    let (instance, asked) = numbered_instance(|n| match n {
        0 => (Duration::ZERO, FRESH_A_SECOND),
        _ => (Duration::ZERO, FAILED_FOR_A_MINUTE),
    });
    let gw = cached_at(instance, "", "stale_while_revalidate = \"30s\"");
    let client = client();
    let answer = |reply: Reply| {
        let status = reply.header("x-cache-status").to_string();
        (reply.status, status, reply.body)
    };
    assert_eq!(
        answer(get(&client, &gw.url("/x")).await),
        (200, "MISS".into(), "old".into())
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        answer(get(&client, &gw.url("/x")).await),
        (200, "UPDATING".into(), "old".into())
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            asked.load(Ordering::SeqCst) == 2
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = answer(get(&client, &gw.url("/x")).await);
    assert_eq!((after.0, &after.2[..]), (200, &b"old"[..]), "{after:?}");
}

#[tokio::test]
async fn stale_is_served_while_the_instance_is_down() {
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "ttl = \"1s\", stale_if_error = \"60s\"", "");
    let client = client();
    let url = gw.url("/cache");
    assert_eq!(status_and_n(&client, &url, &[]).await, ("MISS".into(), 1));
    drop(backend);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        assert_eq!(status_and_n(&client, &url, &[]).await, ("STALE".into(), 1));
    }
    // Without a stored entry the failure shows, still labelled. (The failed refreshes above
    // took the lone instance out of rotation, but with nothing else to try it is tried: 502.)
    let reply = get(&client, &gw.url("/cache?other")).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"], "bad_gateway");
    assert_eq!(reply.json()["request_id"], reply.header("x-request-id"));
    assert_eq!(reply.header("x-cache-status"), "MISS");
}

#[tokio::test]
async fn expired_entries_with_an_etag_are_revalidated_without_the_body() {
    let backend = demo_backend(&[]);
    // No stale window: the entry is kept past its lifetime for its ETag alone.
    let gw = cached(&backend, "ttl = \"1s\"", "");
    let client = client();
    let url = gw.url("/cache?etag=v1");
    assert_eq!(status_and_n(&client, &url, &[]).await, ("MISS".into(), 1));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The instance answered 304 (its second request): the stored body (n = 1) serves, renewed.
    let reply = get(&client, &url).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-cache-status"), "EXPIRED");
    assert_eq!(reply.header("etag"), "\"v1\"");
    assert_eq!(reply.json()["n"], 1);
    assert_eq!(backend_requests(&client, &backend).await, 2);
    assert_eq!(status_and_n(&client, &url, &[]).await, ("HIT".into(), 1));
    // A client's own condition does not reach the instance: the cache revalidates with the
    // entry's validators and renews the entry, then answers the condition itself.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let conditional = [("if-none-match", "\"v0\", \"v1\"")];
    let reply = request(&client, "GET", &url, &conditional, "")
        .await
        .unwrap();
    assert_eq!(
        (reply.status, reply.header("x-cache-status")),
        (304, "EXPIRED")
    );
    assert!(reply.body.is_empty());
    assert_eq!(backend_requests(&client, &backend).await, 3);
    assert_eq!(status_and_n(&client, &url, &[]).await, ("HIT".into(), 1));
}

/// A GET's single byte range is served from the stored answer as 206, one past the end as 416,
/// over HTTP/1.1 and HTTP/2 alike; the instance only ever sees the one whole fetch.
#[tokio::test]
async fn ranges_are_cut_from_stored_answers() {
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "", "");
    let url = gw.url("/cache?bytes=100");
    for client in [client(), h2c_client()] {
        let whole = get(&client, &url).await;
        assert_eq!((whole.status, whole.body.len()), (200, 100));
        let part = request(&client, "GET", &url, &[("range", "bytes=90-")], "")
            .await
            .unwrap();
        assert_eq!((part.status, part.header("x-cache-status")), (206, "HIT"));
        assert_eq!(part.header("content-range"), "bytes 90-99/100");
        assert_eq!((part.header("content-length"), part.body.len()), ("10", 10));
        let past = request(&client, "GET", &url, &[("range", "bytes=100-")], "")
            .await
            .unwrap();
        assert_eq!(
            (past.status, past.header("content-range")),
            (416, "bytes */100")
        );
        assert!(past.body.is_empty());
        // HEAD has no ranges; several ranges get the whole answer.
        let head = request(&client, "HEAD", &url, &[("range", "bytes=0-1")], "")
            .await
            .unwrap();
        assert_eq!((head.status, head.header("content-length")), (200, "100"));
        let several = request(&client, "GET", &url, &[("range", "bytes=0-1,5-6")], "")
            .await
            .unwrap();
        assert_eq!((several.status, several.body.len()), (200, 100));
    }
    assert_eq!(backend_requests(&client(), &backend).await, 1);
}

/// Hits answer a client's conditional GET as nginx's cache does: 304 without a body when its
/// If-None-Match names the stored ETag, or when nothing changed since its If-Modified-Since;
/// 412 when its If-Match or If-Unmodified-Since does not hold; the whole answer otherwise.
#[tokio::test]
async fn conditional_requests_get_304_or_412_from_stored_answers() {
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "", "");
    let client = client();
    let modified = "Tue, 24 Nov 2026 10:00:00 GMT";
    let url = gw.url("/cache?etag=v1&last_modified=Tue%2C%2024%20Nov%202026%2010%3A00%3A00%20GMT");
    assert_eq!(status_and_n(&client, &url, &[]).await, ("MISS".into(), 1));
    let unchanged = [
        ("if-none-match", "W/\"v1\""),
        ("if-modified-since", modified),
        ("if-modified-since", "Wed, 25 Nov 2026 10:00:00 GMT"),
    ];
    for condition in unchanged {
        let reply = request(&client, "GET", &url, &[condition], "")
            .await
            .unwrap();
        assert_eq!((reply.status, reply.header("x-cache-status")), (304, "HIT"));
        assert!(reply.body.is_empty());
        assert_eq!(reply.header("etag"), "\"v1\"");
        assert_eq!(reply.header("last-modified"), modified);
        assert!(!reply.header("x-request-id").is_empty());
    }
    let changed = [
        ("if-none-match", "\"v0\""),
        ("if-modified-since", "Mon, 23 Nov 2026 10:00:00 GMT"),
        ("if-match", "\"v1\""),
        ("if-unmodified-since", modified),
    ];
    for condition in changed {
        assert_eq!(
            status_and_n(&client, &url, &[condition]).await,
            ("HIT".into(), 1)
        );
    }
    // If-Match and If-Unmodified-Since that do not hold get 412, with none of the stored fields.
    let failing = [
        ("if-match", "\"v0\""),
        ("if-unmodified-since", "Mon, 23 Nov 2026 10:00:00 GMT"),
    ];
    for condition in failing {
        let reply = request(
            &client,
            "GET",
            &url,
            &[condition, ("if-none-match", "*")],
            "",
        )
        .await
        .unwrap();
        assert_eq!((reply.status, reply.header("x-cache-status")), (412, "HIT"));
        assert_eq!(
            (reply.header("content-length"), reply.header("etag")),
            ("0", "")
        );
        assert!(reply.body.is_empty() && !reply.header("x-request-id").is_empty());
    }
    assert_eq!(backend_requests(&client, &backend).await, 1);

    // On a miss too, as nginx judges them: the client gets its 304 or 412 at once, and the
    // fill still stores the whole answer.
    let fresh = gw.url("/cache/fresh?etag=v2");
    let reply = request(&client, "GET", &fresh, &[("if-none-match", "\"v2\"")], "")
        .await
        .unwrap();
    assert_eq!(
        (reply.status, reply.header("x-cache-status")),
        (304, "MISS")
    );
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("etag"), "\"v2\"");
    let stored = eventually(Duration::from_secs(3), || async {
        get(&client, &fresh).await.header("x-cache-status") == "HIT"
    })
    .await;
    assert!(stored, "the fill behind a 304 was not stored");
    let other = gw.url("/cache/other?etag=v3");
    let reply = request(&client, "GET", &other, &[("if-match", "\"v0\"")], "")
        .await
        .unwrap();
    assert_eq!(
        (reply.status, reply.header("x-cache-status")),
        (412, "MISS")
    );
    assert!(reply.body.is_empty() && !reply.header("x-request-id").is_empty());
}

#[tokio::test]
async fn stale_while_revalidate_refreshes_once_in_the_background() {
    let backend = demo_backend(&[]);
    let gw = cached(
        &backend,
        "ttl = \"1s\", stale_while_revalidate = \"30s\"",
        "",
    );
    let client = client();
    let url = gw.url("/cache?latency_ms=200");
    assert_eq!(status_and_n(&client, &url, &[]).await, ("MISS".into(), 1));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..5 {
        assert_eq!(
            status_and_n(&client, &url, &[]).await,
            ("UPDATING".into(), 1)
        );
    }
    let refreshed = eventually(Duration::from_secs(5), || async {
        get(&client, &url).await.json()["n"] == 2
    })
    .await;
    assert!(refreshed);
    assert_eq!(backend_requests(&client, &backend).await, 2);
}

#[tokio::test]
async fn vary_keeps_variants_apart() {
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "", "");
    let client = client();
    let url = gw.url("/cache?vary=Accept");
    let json = [("accept", "application/json")];
    let html = [("accept", "text/html")];
    assert_eq!(status_and_n(&client, &url, &json).await, ("MISS".into(), 1));
    assert_eq!(status_and_n(&client, &url, &html).await, ("MISS".into(), 2));
    assert_eq!(status_and_n(&client, &url, &json).await, ("HIT".into(), 1));
    let reply = request(&client, "GET", &url, &html, "").await.unwrap();
    assert_eq!(reply.header("x-cache-status"), "HIT");
    assert_eq!(reply.json()["vary"], "text/html");
    // Vary: * never matches, so it is never stored.
    let star = gw.url("/cache?vary=*");
    assert_eq!(status_and_n(&client, &star, &[]).await.0, "MISS");
    assert_eq!(status_and_n(&client, &star, &[]).await.0, "MISS");
}

#[tokio::test]
async fn no_store_private_set_cookie_and_authorization_are_not_cached() {
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "", "");
    let client = client();
    for query in [
        "cc=no-store",
        "cc=private%2C%20max-age%3D60",
        "set_cookie=s%3D1",
    ] {
        let url = gw.url(&format!("/cache?{query}"));
        let (first, n1) = status_and_n(&client, &url, &[]).await;
        let (second, n2) = status_and_n(&client, &url, &[]).await;
        assert_eq!(
            (first.as_str(), second.as_str()),
            ("MISS", "MISS"),
            "{query}"
        );
        assert_ne!(n1, n2, "{query}");
    }
    let url = gw.url("/cache?auth");
    let auth = [("authorization", "Bearer t")];
    assert_eq!(status_and_n(&client, &url, &auth).await.0, "BYPASS");
    assert_eq!(status_and_n(&client, &url, &[]).await.0, "MISS");
    assert_eq!(status_and_n(&client, &url, &auth).await.0, "BYPASS");
    let post = request(&client, "POST", &url, &[], "x").await.unwrap();
    assert_eq!(post.header("x-cache-status"), "BYPASS");
    // Routes without a cache table carry no cache header at all.
    let plain = gateway(&app_config(&[&backend], ""));
    assert_eq!(
        get(&client, &plain.url("/cache"))
            .await
            .header("x-cache-status"),
        ""
    );
}

/// An answer too large to store marks its key: for a while its requests go to the instance as
/// the client sent them, a Range included, rather than refetching the whole body to cut from;
/// a purge forgets the mark.
#[tokio::test]
async fn a_key_too_large_to_store_passes_its_requests_through() {
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "max_body = \"16B\"", "");
    let client = client();
    let url = gw.url("/echo");
    let range = [("range", "bytes=0-9")];
    let asked = |reply: &Reply| String::from_utf8_lossy(&reply.body).contains("bytes=0-9");
    let first = request(&client, "GET", &url, &range, "").await.unwrap();
    // The whole answer (a fill fetches it whole), which would show a forwarded Range.
    assert_eq!(
        (first.status, first.header("x-cache-status")),
        (200, "MISS")
    );
    assert!(!asked(&first), "a fill asks for the whole answer");
    let second = request(&client, "GET", &url, &range, "").await.unwrap();
    assert_eq!(second.header("x-cache-status"), "MISS");
    assert!(asked(&second), "passed as sent: {:?}", second.body);
    let purged = request(&client, "DELETE", &gw.admin_url("/api/cache"), &[], "")
        .await
        .unwrap();
    assert_eq!(purged.status, 200);
    let third = request(&client, "GET", &url, &range, "").await.unwrap();
    assert_eq!(
        (third.status, third.header("x-cache-status")),
        (200, "MISS")
    );
    assert!(!asked(&third), "the purge forgot the pass");
}

/// An unsafe request the instance accepted drops what is stored for its URI (RFC 9111 §4.4),
/// and only that. An answer that says how long it keeps is stored whatever its final status
/// (a 307 with a max-age, as nginx stores it); a 503 without is not.
#[tokio::test]
async fn unsafe_requests_invalidate_and_explicit_freshness_stores_any_status() {
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "ttl = \"60s\"", "");
    let client = client();
    let (doc, other) = (gw.url("/cache/doc"), gw.url("/cache/other"));
    assert_eq!(status_and_n(&client, &doc, &[]).await, ("MISS".into(), 1));
    assert_eq!(status_and_n(&client, &other, &[]).await, ("MISS".into(), 2));
    for (method, n) in [("PUT", 4), ("POST", 6), ("DELETE", 8)] {
        let change = request(&client, method, &doc, &[], "new").await.unwrap();
        assert_eq!(change.header("x-cache-status"), "BYPASS");
        assert_eq!(status_and_n(&client, &doc, &[]).await, ("MISS".into(), n));
        assert_eq!(status_and_n(&client, &doc, &[]).await, ("HIT".into(), n));
    }
    assert_eq!(status_and_n(&client, &other, &[]).await, ("HIT".into(), 2));

    let cache_status = |url: String| {
        let client = client.clone();
        async move {
            let reply = get(&client, &url).await;
            (reply.status, reply.header("x-cache-status").to_string())
        }
    };
    let told = gw.url("/cache/moved?status=307&cc=max-age%3D60");
    assert_eq!(cache_status(told.clone()).await, (307, "MISS".into()));
    assert_eq!(cache_status(told).await, (307, "HIT".into()));
    let untold = gw.url("/cache/down?status=503");
    assert_eq!(cache_status(untold.clone()).await, (503, "MISS".into()));
    assert_eq!(cache_status(untold).await, (503, "MISS".into()));
}

#[tokio::test]
async fn size_bound_holds_under_a_flood_of_distinct_keys() {
    let backend = demo_backend(&[]);
    let gw = cached(
        &backend,
        "max_body = \"100KiB\"",
        "[cache]\nmax_size = \"64KiB\"\n",
    );
    let client = client();
    for i in 0..300 {
        let reply = get(&client, &gw.url(&format!("/cache?bytes=2000&k={i}"))).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body.len(), 2000);
    }
    // Bodies over max_body stream through whole, and are not stored.
    let big = gw.url("/cache?bytes=200000");
    for _ in 0..2 {
        let reply = get(&client, &big).await;
        assert_eq!(reply.body.len(), 200_000);
        assert_eq!(reply.header("x-cache-status"), "MISS");
    }
    let stats = get(&client, &gw.admin_url("/api/cache/stats")).await.json();
    assert!(stats["bytes"].as_u64().unwrap() <= 64 * 1024, "{stats}");
    assert!(stats["entries"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["evictions"].as_u64().unwrap() > 0, "{stats}");
}

#[tokio::test]
async fn purge_all_by_prefix_and_by_key() {
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "", "");
    let client = client();
    let paths = ["/cache/p/a", "/cache/p/b", "/cache/q"];
    for path in paths {
        assert_eq!(status_and_n(&client, &gw.url(path), &[]).await.0, "MISS");
        assert_eq!(status_and_n(&client, &gw.url(path), &[]).await.0, "HIT");
    }
    let purge = |query: String| {
        let client = client.clone();
        let url = gw.admin_url(&format!("/api/cache{query}"));
        async move {
            request(&client, "DELETE", &url, &[], "")
                .await
                .unwrap()
                .json()
        }
    };
    assert_eq!(purge("?prefix=/cache/p/".into()).await["purged"], 2);
    assert_eq!(
        status_and_n(&client, &gw.url("/cache/p/a"), &[]).await.0,
        "MISS"
    );
    assert_eq!(
        status_and_n(&client, &gw.url("/cache/q"), &[]).await.0,
        "HIT"
    );
    // A key is the path and query, then the scheme, then the Host, then the route's other
    // parts.
    let key = format!("?key=/cache/q%20http%20{}", gw.proxy);
    assert_eq!(purge(key).await["purged"], 1);
    assert_eq!(
        status_and_n(&client, &gw.url("/cache/q"), &[]).await.0,
        "MISS"
    );
    // A key of the path and scheme alone is that entry for every Host.
    assert_eq!(purge("?key=/cache/q%20http".into()).await["purged"], 1);
    assert_eq!(
        status_and_n(&client, &gw.url("/cache/q"), &[]).await.0,
        "MISS"
    );
    assert_eq!(purge(String::new()).await["purged"], 2);
    assert_eq!(
        status_and_n(&client, &gw.url("/cache/p/a"), &[]).await.0,
        "MISS"
    );
    assert!(purge("?nonsense=1".into()).await["error"].is_string());

    let stats = get(&client, &gw.admin_url("/api/cache/stats")).await.json();
    assert_eq!(stats["hits"], 4, "{stats}");
    let metrics = get(&client, &gw.admin_url("/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("scalegate_cache_hits_total 4"), "{text}");
    assert!(text.contains("scalegate_cache_entries 1"), "{text}");

    // A fill that started before a purge answers its client but stores nothing.
    let slow = gw.url("/cache/r?latency_ms=800");
    let filling = {
        let (client, slow) = (client.clone(), slow.clone());
        tokio::spawn(async move { status_and_n(&client, &slow, &[]).await.0 })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    purge("?prefix=/cache/r".into()).await;
    assert_eq!(filling.await.unwrap(), "MISS");
    assert_eq!(status_and_n(&client, &slow, &[]).await.0, "MISS");
}

/// Entries are kept per Host, as the instance gets it: one client's Host (a redirect built
/// from it) never answers another's, on a catch-all route too.
#[tokio::test]
async fn one_host_s_answer_is_not_served_for_another() {
    let backend = demo_backend(&[]);
    let gw = cached(&backend, "ttl = \"60s\"", "");
    let client = client();
    let url = gw.url("/cache/page");
    let evil = [("host", "evil.example")];
    assert_eq!(status_and_n(&client, &url, &evil).await, ("MISS".into(), 1));
    assert_eq!(status_and_n(&client, &url, &[]).await, ("MISS".into(), 2));
    assert_eq!(status_and_n(&client, &url, &evil).await, ("HIT".into(), 1));
    // The port is part of it, as the instance sees it.
    let port = [("host", "evil.example:6666")];
    assert_eq!(status_and_n(&client, &url, &port).await, ("MISS".into(), 3));
}

#[tokio::test]
async fn warm_paths_are_fetched_at_start_and_kept_fresh() {
    let backend = demo_backend(&[]);
    // Warmed for the route's host: entries are kept per Host.
    let gw = gateway(&format!(
        "[upstreams.app]\ninstances = [\"{}\"]\n\n[[routes]]\nhost = \"warm.test\"\n\
         upstream = \"app\"\ncache = {{ ttl = \"3s\", warm = [\"/cache/warm\"] }}\n",
        backend.addr()
    ));
    let site = [("host", "warm.test")];
    let client = client();
    let fetched = eventually(Duration::from_secs(5), || async {
        backend_requests(&client, &backend).await >= 1
    })
    .await;
    assert!(fetched, "the warm path was never fetched");
    assert_eq!(
        status_and_n(&client, &gw.url("/cache/warm"), &site).await.0,
        "HIT"
    );
    // Past the first entry's ttl the path is still a hit: it was fetched again before expiry.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (status, n) = status_and_n(&client, &gw.url("/cache/warm"), &site).await;
    assert_eq!(status, "HIT");
    assert!(n >= 2, "{n}");
}

#[tokio::test]
async fn routes_on_a_host_key_by_host_and_configured_parts() {
    let backend = demo_backend(&[]);
    let gw = gateway(&format!(
        "[upstreams.app]\ninstances = [\"{}\"]\n\n[[routes]]\nhost = \"*.shop.test\"\nupstream = \"app\"\ncache = {{ key = [\"header:x-tenant\"] }}\n",
        backend.addr()
    ));
    let client = client();
    let url = gw.url("/cache");
    let a = [("host", "a.shop.test"), ("x-tenant", "1")];
    let b = [("host", "b.shop.test"), ("x-tenant", "1")];
    let a2 = [("host", "a.shop.test"), ("x-tenant", "2")];
    assert_eq!(status_and_n(&client, &url, &a).await, ("MISS".into(), 1));
    assert_eq!(status_and_n(&client, &url, &b).await, ("MISS".into(), 2));
    assert_eq!(status_and_n(&client, &url, &a2).await, ("MISS".into(), 3));
    assert_eq!(status_and_n(&client, &url, &a).await, ("HIT".into(), 1));
    let purged = request(
        &client,
        "DELETE",
        &gw.admin_url("/api/cache?key=%2Fcache%20http%20a.shop.test%201"),
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(purged.json()["purged"], 1);
}

#[tokio::test]
async fn client_ip_keys_follow_trusted_proxies_like_rate_limits() {
    let backend = demo_backend(&[]);
    let gw = gateway(&format!(
        "[rate_limit]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n[upstreams.app]\ninstances = [\"{}\"]\n\n[[routes]]\nupstream = \"app\"\ncache = {{ key = [\"ip\"] }}\n",
        backend.addr()
    ));
    let client = client();
    let url = gw.url("/cache");
    // Behind a trusted balancer, each client behind it gets its own entries.
    let one = [("x-forwarded-for", "203.0.113.1")];
    let two = [("x-forwarded-for", "203.0.113.2")];
    assert_eq!(status_and_n(&client, &url, &one).await, ("MISS".into(), 1));
    assert_eq!(status_and_n(&client, &url, &two).await, ("MISS".into(), 2));
    assert_eq!(status_and_n(&client, &url, &one).await, ("HIT".into(), 1));
}

/// Two replicas sharing one Redis tier (and one instance).
/// The Host both replicas of [`shared_pair`] are asked by, as behind one load balancer: the
/// shared tier keeps entries per Host.
const SITE: (&str, &str) = ("host", "site.test");

/// A GET asking for [`SITE`].
async fn site_get(client: &Client, url: &str) -> Reply {
    request(client, "GET", url, &[SITE], "").await.unwrap()
}

fn shared_pair(redis: &Redis, backend: &Proc, cache: &str) -> (Gateway, Gateway) {
    shared_pair_at(&redis.url(), "", backend, cache)
}

/// [`shared_pair`] sharing the Redis at `url`, with more `[state]` keys.
fn shared_pair_at(url: &str, state: &str, backend: &Proc, cache: &str) -> (Gateway, Gateway) {
    let top = format!("[state]\nredis_url = \"{url}\"\n{state}\n\n[cache]\nstore = \"redis\"\n");
    (cached(backend, cache, &top), cached(backend, cache, &top))
}

/// A write accepted while Redis does not answer still invalidates the shared entry once it
/// does: the replica that took the write does not read the stale entry back from Redis, and
/// the other replica is told. The DEL and its announcement were dropped, and both served the
/// stale entry until its TTL.
#[tokio::test]
async fn a_write_while_redis_is_stalled_invalidates_once_it_answers() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let (a, b) = shared_pair(&redis, &backend, "ttl = \"60s\"");
    let client = client();
    let path = "/cache/written";
    assert_eq!(status_and_n(&client, &a.url(path), &[SITE]).await.0, "MISS");
    assert!(eventually(Duration::from_secs(5), || async { redis_has(&redis, path) }).await);
    assert_eq!(
        status_and_n(&client, &b.url(path), &[SITE]).await,
        ("HIT".into(), 1)
    );
    redis.signal("STOP");
    // A's next read of Redis times out, and its link goes down.
    assert_eq!(site_get(&client, &a.url("/cache/other")).await.status, 200);
    let down = eventually(Duration::from_secs(5), || async {
        stats(&client, &a).await["shared_errors"].as_u64() >= Some(1)
    })
    .await;
    assert!(down, "{}", stats(&client, &a).await);
    let put = request(&client, "PUT", &a.url(path), &[SITE], "new")
        .await
        .unwrap();
    assert_eq!(put.status, 200);
    // Not read back from Redis meanwhile.
    assert_eq!(status_and_n(&client, &a.url(path), &[SITE]).await.0, "MISS");
    redis.signal("CONT");
    let told = eventually(Duration::from_secs(10), || async {
        !redis_has(&redis, path) || stats(&client, &b).await["entries"] == 0
    })
    .await;
    assert!(told, "{}", stats(&client, &b).await);
    let dropped = eventually(Duration::from_secs(10), || async {
        stats(&client, &b).await["entries"] == 0
    })
    .await;
    assert!(
        dropped,
        "B kept the stale entry: {}",
        stats(&client, &b).await
    );
    let (status, n) = status_and_n(&client, &b.url(path), &[SITE]).await;
    assert!(n > 1, "B served the stale entry: {status} {n}");
}

/// Over `rediss://` with `redis_ca`, purges reach the other replica's memory too: its
/// subscription ignored the CA and failed for good, quietly.
#[tokio::test]
async fn purges_reach_replicas_over_rediss_with_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let redis = tls_redis(dir.path());
    let backend = demo_backend(&[]);
    let ca = format!("redis_ca = \"{}\"", dir.path().join("ca.pem").display());
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let (a, b) = shared_pair_at(&url, &ca, &backend, "ttl = \"60s\"");
    let client = client();
    let path = "/cache/tls";
    assert_eq!(status_and_n(&client, &a.url(path), &[SITE]).await.0, "MISS");
    // B takes it from Redis into its memory.
    let shared = eventually(Duration::from_secs(5), || async {
        status_and_n(&client, &b.url(path), &[SITE]).await.0 == "HIT"
    })
    .await;
    assert!(shared, "B never found A's entry in Redis");
    assert_eq!(stats(&client, &b).await["entries"], 1);
    let purged = request(&client, "DELETE", &a.admin_url("/api/cache"), &[], "")
        .await
        .unwrap();
    assert_eq!(purged.status, 200);
    let dropped = eventually(Duration::from_secs(5), || async {
        stats(&client, &b).await["entries"] == 0
    })
    .await;
    assert!(
        dropped,
        "B kept the purged entry: {}",
        stats(&client, &b).await
    );
}

/// Whether Redis holds the entry of a plain-HTTP client's request for `path` on [`SITE`].
fn redis_has(redis: &Redis, path: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(format!("scalegate:cache:{path} http site.test"))
        .query::<i64>(&mut redis.conn())
        .unwrap()
        == 1
}

async fn stats(client: &Client, gw: &Gateway) -> serde_json::Value {
    get(client, &gw.admin_url("/api/cache/stats")).await.json()
}

/// A cache key in Redis of another type (something else wrote it) is a miss whose fill
/// replaces it; its WRONGTYPE took the whole Redis link down (rate limits fell back with it)
/// and the fill was never stored.
#[tokio::test]
async fn a_foreign_value_at_a_cache_key_is_replaced() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let (a, b) = shared_pair(&redis, &backend, "ttl = \"60s\"");
    let path = "/cache/planted";
    let key = format!("scalegate:cache:{path} http site.test");
    let () = redis::cmd("HSET")
        .arg(&key)
        .arg("x")
        .arg("y")
        .query(&mut redis.conn())
        .unwrap();
    let client = client();
    assert_eq!(
        status_and_n(&client, &a.url(path), &[SITE]).await,
        ("MISS".into(), 1)
    );
    let kind = || {
        redis::cmd("TYPE")
            .arg(&key)
            .query::<String>(&mut redis.conn())
            .unwrap()
    };
    let replaced = eventually(Duration::from_secs(5), || async { kind() == "string" }).await;
    assert!(replaced, "the key is still a {}", kind());
    assert_eq!(
        status_and_n(&client, &b.url(path), &[SITE]).await,
        ("HIT".into(), 1)
    );
    let health = get(&client, &a.admin_url("/health/redis")).await;
    assert_eq!(health.status, 200, "{:?}", health.body);
    assert_eq!(health.json()["cache"]["shared"], true);
}

/// An entry over 1 MiB stays in memory: its transfer would hold up the cache reads queued
/// behind it on the cache's Redis connection and outlast `redis_timeout`.
#[tokio::test]
async fn large_entries_stay_out_of_the_shared_tier() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let (a, _b) = shared_pair(&redis, &backend, "ttl = \"60s\", max_body = \"4MiB\"");
    let client = client();
    let (large, small) = ("/cache/large?bytes=2000000", "/cache/small?bytes=1000000");
    for path in [large, small] {
        let reply = site_get(&client, &a.url(path)).await;
        assert_eq!(reply.header("x-cache-status"), "MISS");
    }
    let stored = eventually(Duration::from_secs(5), || async {
        redis_has(&redis, small)
    })
    .await;
    assert!(stored, "the small entry never reached Redis");
    assert!(!redis_has(&redis, large));
    assert_eq!(
        site_get(&client, &a.url(large))
            .await
            .header("x-cache-status"),
        "HIT"
    );
}

/// The cache and the rate limiter talk to Redis over connections of their own: a burst of
/// large cache transfers queued on a shared one timed out rate-limit decisions and took the
/// limiter's link down.
#[tokio::test]
async fn the_cache_and_the_rate_limiter_keep_their_own_redis_connections() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let top = format!(
        "[state]\nredis_url = \"{}\"\n\n[cache]\nstore = \"redis\"\n\n[rate_limit]\nstore = \"redis\"\n\
         [[rate_limit.rules]]\nlimit = 1000\nperiod = \"1s\"\n",
        redis.url()
    );
    let gw = cached(&backend, "ttl = \"60s\"", &top);
    let client = client();
    // A rate-limit decision, then a cache read (a miss), then the fill's write.
    assert_eq!(site_get(&client, &gw.url("/cache/x")).await.status, 200);
    let written = eventually(Duration::from_secs(5), || async {
        redis_has(&redis, "/cache/x")
    })
    .await;
    assert!(written);
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis.conn())
        .unwrap();
    let last_command = |command: &str| {
        clients
            .lines()
            .any(|line| line.contains(&format!(" cmd={command} ")))
    };
    // One connection's last command was the decision, another's the cache's write.
    assert!(last_command("evalsha"), "{clients}");
    assert!(last_command("set"), "{clients}");
}

/// A reload that turns the shared cache on (Redis already set up for the rate limits) connects
/// the cache's link then: its entries reach Redis.
#[tokio::test]
async fn a_reload_turns_the_shared_cache_on() {
    let redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let top = |store: &str| {
        format!(
            "[state]\nredis_url = \"{}\"\n\n[cache]\nstore = \"{store}\"\n\n\
             [rate_limit]\nstore = \"redis\"\n",
            redis.url()
        )
    };
    let config = |store: &str| {
        format!(
            "{}\n{}",
            top(store),
            cached_config(backend.addr(), "", "ttl = \"60s\"")
        )
    };
    let gw = gateway(&config("memory"));
    let client = client();
    assert_eq!(
        site_get(&client, &gw.url("/cache/before")).await.status,
        200
    );
    gw.reload_with(&config("redis"));
    // A new path each time: one fetched before the reload took would stay a memory hit.
    let tries = std::sync::atomic::AtomicU32::new(0);
    let shared = eventually(Duration::from_secs(10), || async {
        let path = format!("/cache/after-{}", tries.fetch_add(1, Ordering::Relaxed));
        site_get(&client, &gw.url(&path)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        redis_has(&redis, &path)
    })
    .await;
    assert!(shared, "entries never reached Redis after the reload");
    assert!(!redis_has(&redis, "/cache/before"));
}

/// A purge Redis could not carry out in full (here SCAN is refused; on a large keyspace, time
/// runs out) still tells every replica to drop its memory copies, and says it failed.
#[tokio::test]
async fn a_purge_that_fails_at_redis_still_reaches_the_replicas() {
    let redis = Redis::start(None);
    let () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "noscan",
                "on",
                ">secret-pass",
                "~*",
                "&*",
                "+@all",
                "-scan",
            ][..],
        )
        .query(&mut redis.conn())
        .unwrap();
    let backend = demo_backend(&[]);
    let url = redis
        .url()
        .replace("redis://", "redis://noscan:secret-pass@");
    let (a, b) = shared_pair_at(&url, "", &backend, "ttl = \"60s\"");
    let client = client();
    let path = "/cache/kept";
    assert_eq!(
        site_get(&client, &a.url(path))
            .await
            .header("x-cache-status"),
        "MISS"
    );
    assert!(eventually(Duration::from_secs(5), || async { redis_has(&redis, path) }).await);
    assert_eq!(
        site_get(&client, &b.url(path))
            .await
            .header("x-cache-status"),
        "HIT"
    );
    assert_eq!(stats(&client, &b).await["entries"], 1);
    let purge = request(&client, "DELETE", &a.admin_url("/api/cache"), &[], "")
        .await
        .unwrap();
    assert_eq!(purge.status, 503, "{:?}", purge.json());
    let dropped = eventually(Duration::from_secs(5), || async {
        stats(&client, &b).await["entries"] == 0
    })
    .await;
    assert!(dropped, "B kept its copy: {}", stats(&client, &b).await);
}

#[tokio::test]
async fn replicas_share_hits_and_purges_through_redis() {
    let mut redis = Redis::start(None);
    let backend = demo_backend(&[]);
    let (a, b) = shared_pair(&redis, &backend, "ttl = \"60s\"");
    let client = client();
    let path = "/cache/shared";
    assert_eq!(
        status_and_n(&client, &a.url(path), &[SITE]).await,
        ("MISS".into(), 1)
    );
    // The shared write follows the client's answer.
    let stored = eventually(Duration::from_secs(5), || async { redis_has(&redis, path) }).await;
    assert!(stored, "the entry never reached Redis");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("scalegate:cache:{path} http site.test"))
        .query(&mut redis.conn())
        .unwrap();
    assert!((1..=60_000).contains(&pttl), "{pttl}");
    // Fetched through A, a hit through B: the instance saw one request.
    let reply = site_get(&client, &b.url(path)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-cache-status"), "HIT");
    assert_eq!(reply.json()["n"], 1);
    assert_eq!(reply.header("age"), "0");
    assert_eq!(
        status_and_n(&client, &b.url(path), &[SITE]).await,
        ("HIT".into(), 1)
    );
    assert_eq!(backend_requests(&client, &backend).await, 1);
    let b_stats = stats(&client, &b).await;
    assert_eq!(b_stats["shared_hits"], 1, "{b_stats}");
    assert_eq!(b_stats["hits"], 2, "{b_stats}");

    // Age is counted from when A stored it, on B as well.
    let aged = "/cache/aged";
    assert_eq!(status_and_n(&client, &a.url(aged), &[SITE]).await.0, "MISS");
    assert!(eventually(Duration::from_secs(5), || async { redis_has(&redis, aged) }).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = site_get(&client, &b.url(aged)).await;
    assert_eq!(reply.header("x-cache-status"), "HIT");
    assert_eq!(reply.header("age"), "1");

    // A purge through A's admin API empties Redis and B's memory.
    let purged = request(
        &client,
        "DELETE",
        &a.admin_url("/api/cache?prefix=/cache/shared"),
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(purged.status, 200);
    assert_eq!(purged.json()["shared_purged"], 1, "{:?}", purged.json());
    assert!(!redis_has(&redis, path));
    let dropped = eventually(Duration::from_secs(5), || async {
        stats(&client, &b).await["entries"] == 1
    })
    .await;
    assert!(
        dropped,
        "B kept the purged entry: {}",
        stats(&client, &b).await
    );
    assert_eq!(
        status_and_n(&client, &b.url(path), &[SITE]).await,
        ("MISS".into(), 3)
    );
    // B writes its new entry to Redis after answering: wait for it, so the purge below finds it.
    assert!(eventually(Duration::from_secs(5), || async { redis_has(&redis, path) }).await);
    // Purge everything: B's memory follows too.
    let all = request(&client, "DELETE", &a.admin_url("/api/cache"), &[], "")
        .await
        .unwrap();
    assert_eq!(all.status, 200);
    let emptied = eventually(Duration::from_secs(5), || async {
        stats(&client, &b).await["entries"] == 0
    })
    .await;
    assert!(emptied, "{}", stats(&client, &b).await);
    assert!(!redis_has(&redis, path));

    // A change through one replica drops the entry from Redis and from the other's memory.
    let changed = "/cache/changed";
    assert_eq!(
        status_and_n(&client, &a.url(changed), &[SITE]).await.0,
        "MISS"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            redis_has(&redis, changed)
        })
        .await
    );
    assert_eq!(
        status_and_n(&client, &b.url(changed), &[SITE]).await.0,
        "HIT"
    );
    let put = request(&client, "PUT", &a.url(changed), &[SITE], "new")
        .await
        .unwrap();
    assert_eq!(put.status, 200);
    let gone = eventually(Duration::from_secs(5), || async {
        !redis_has(&redis, changed) && stats(&client, &b).await["entries"] == 0
    })
    .await;
    assert!(gone, "{}", stats(&client, &b).await);
    assert_eq!(
        status_and_n(&client, &b.url(changed), &[SITE]).await.0,
        "MISS"
    );

    // Redis gone: answers still come (from instances, or memory), never a 5xx.
    assert_eq!(status_and_n(&client, &a.url(path), &[SITE]).await.0, "MISS");
    redis.kill();
    for i in 0..5 {
        for gw in [&a, &b] {
            let (status, _) =
                status_and_n(&client, &gw.url(&format!("/cache/down?{i}")), &[]).await;
            assert_eq!(status, "MISS");
        }
    }
    assert_eq!(status_and_n(&client, &a.url(path), &[SITE]).await.0, "HIT");
    let a_stats = stats(&client, &a).await;
    assert!(a_stats["shared_errors"].as_u64().unwrap() >= 1, "{a_stats}");
    let metrics = get(&client, &a.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(metrics.contains("scalegate_cache_shared_errors_total"));
    assert!(metrics.contains("scalegate_cache_redis_up 0"), "{metrics}");
    // So does /health/redis, though the rate limits keep to memory.
    let health = get(&client, &a.admin_url("/health/redis")).await;
    assert_eq!(health.status, 503);
    let health = health.json();
    assert_eq!(health["store"], "memory", "{health}");
    assert_eq!(health["cache"]["status"], "down", "{health}");
    assert_eq!(health["status"], "down", "{health}");
    // The health view says the cache is memory only meanwhile.
    let detailed = get(&client, &a.admin_url("/health/detailed")).await.json();
    let cache = named(&detailed["components"], "cache");
    assert_eq!(cache["status"], "degraded", "{detailed}");
    // A purge that cannot reach Redis says so, after purging memory.
    let failed = request(&client, "DELETE", &a.admin_url("/api/cache"), &[], "")
        .await
        .unwrap();
    assert_eq!(failed.status, 503);
    assert!(failed.error_text().contains("not purged"));
}

/// A client that stops reading a large hit is cut off, and the access log counts what went
/// out, not the whole answer.
#[tokio::test]
async fn a_hit_cut_off_logs_the_bytes_that_went_out() {
    use tokio::io::AsyncWriteExt;
    const SIZE: usize = 4_000_000;
    let backend = demo_backend(&[]);
    let cache = "ttl = \"60s\", max_body = \"8MiB\"";
    let gw = gateway_logging_with_server_keys(
        "idle_timeout = \"1s\"",
        &cached_config(backend.addr(), "", cache),
    );
    let path = format!("/cache/big?bytes={SIZE}");
    let stored = eventually(Duration::from_secs(5), || async {
        get(&client(), &gw.url(&path))
            .await
            .header("x-cache-status")
            == "HIT"
    })
    .await;
    assert!(stored);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(gw.proxy).await.unwrap();
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nX-Request-Id: stalled\r\n\r\n",
        gw.proxy
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let logged = eventually(Duration::from_secs(5), || async {
        access_lines(&gw).contains_key("stalled")
    })
    .await;
    let lines = access_lines(&gw);
    assert!(logged, "{lines:?}");
    let sent = lines["stalled"]["bytes"].as_u64().unwrap();
    assert!(sent < SIZE as u64, "{}", lines["stalled"]);
}
