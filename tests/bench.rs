//! End-to-end tests of `scalegate bench` against real demo-backend processes on loopback.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

/// Exit status, stdout and stderr of `scalegate bench ARGS` (bounded by a 30 s limit).
async fn bench(args: &[&str]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(bin());
    command.arg("bench").args(args).kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("bench finished within 30 s")
        .expect("bench ran");
    (
        output.status.code().expect("bench exited"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The `--json` report of a run that must succeed.
async fn bench_json(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, stdout, stderr) = bench(&all).await;
    assert_eq!(code, 0, "bench {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn url(backend: &Proc, path: &str) -> String {
    format!("http://{}{path}", backend.addr())
}

fn count(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {report}"))
}

fn latency_ms(report: &Value, key: &str) -> f64 {
    report["latency_us"][key].as_f64().unwrap() / 1000.0
}

#[tokio::test]
async fn counts_are_exact_with_n_and_match_the_server() {
    let backend = demo_backend(&[]);
    let client = client();
    let target = url(&backend, "/work");

    let closed = bench_json(&["-n", "1237", "-c", "7", &target]).await;
    assert_eq!(count(&closed, "requests"), 1237);
    assert_eq!(count(&closed, "responses"), 1237);
    assert_eq!(closed["status"]["200"], 1237);
    assert_eq!(backend_requests(&client, &backend).await, 1237);

    let open = bench_json(&["-n", "301", "-c", "4", "-q", "2000", &target]).await;
    assert_eq!(count(&open, "responses"), 301);
    assert_eq!(backend_requests(&client, &backend).await, 1237 + 301);

    // Warm-up requests reach the server but stay out of the report.
    let warmed = bench_json(&["-n", "200", "-c", "2", "--warmup", "300ms", &target]).await;
    assert_eq!(count(&warmed, "responses"), 200);
    let warmup = count(&warmed, "warmup_requests");
    assert!(warmup > 0);
    assert_eq!(
        backend_requests(&client, &backend).await,
        1237 + 301 + 200 + warmup
    );
}

#[tokio::test]
async fn several_urls_and_protocols_share_the_load() {
    let a = demo_backend(&[]);
    let b = demo_backend(&[]);
    let client = client();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("urls.txt");
    std::fs::write(&list, format!("# second instance\n\n{}\n", url(&b, "/y"))).unwrap();
    let report = bench_json(&[
        "-n",
        "100",
        "-c",
        "3",
        "-m",
        "post",
        "--body",
        "hello",
        "-H",
        "x-test: 1",
        &url(&a, "/x"),
        "--urls-file",
        list.to_str().unwrap(),
    ])
    .await;
    assert_eq!(count(&report, "responses"), 100);
    assert_eq!(report["method"], "POST");
    assert_eq!(report["urls"].as_array().unwrap().len(), 2);
    assert_eq!(backend_requests(&client, &a).await, 50);
    assert_eq!(backend_requests(&client, &b).await, 50);

    let h2 = bench_json(&["--http2", "-n", "100", "-c", "2", &url(&a, "/x")]).await;
    assert_eq!(h2["http2"], true);
    assert_eq!(h2["status"]["200"], 100);
    assert_eq!(backend_requests(&client, &a).await, 150);
}

#[tokio::test]
async fn rate_mode_holds_the_asked_rate() {
    let backend = demo_backend(&[]);
    let report = bench_json(&["-q", "200", "-d", "3s", "-c", "10", &url(&backend, "/work")]).await;
    assert_eq!(report["mode"], "open");
    // 600 requests are planned; on a very busy machine a few may be left unsent at the end.
    let responses = count(&report, "responses");
    assert!((588..=600).contains(&responses), "{responses} of 600");
    let unfinished = count(&report, "unfinished");
    assert_eq!(
        responses + count(&report, "unsent") + unfinished + count(&report, "failed"),
        600
    );
    let rps = report["rps"].as_f64().unwrap();
    assert!((196.0..=204.0).contains(&rps), "{rps} req/s for 200 asked");
    // The server saw what the report counts, and at most the requests the end cut off.
    let seen = backend_requests(&client(), &backend).await;
    assert!(
        (responses..=responses + unfinished).contains(&seen),
        "{seen}"
    );

    // Counted, the run lasts its 100 slots of 10 ms: answered on time, it reports the rate asked
    // (timed from the last request's answer it said 100 / 0.99 s, 1 % over), and never more.
    let counted = bench_json(&["-q", "100", "-n", "100", "-c", "2", &url(&backend, "/work")]).await;
    assert_eq!(count(&counted, "responses"), 100);
    let rps = counted["rps"].as_f64().unwrap();
    assert!((90.0..=100.0).contains(&rps), "{rps} req/s for 100 asked");
}

#[tokio::test]
async fn a_stalled_server_shows_in_p99_in_rate_mode() {
    let backend = demo_backend(&["--latency-ms", "200"]);
    let target = url(&backend, "/work");
    // Two connections answer at most 10 requests/s; 20/s are asked, so requests queue up and
    // their latency, counted from when they were due, grows far past the server's 200 ms.
    let open = bench_json(&["-q", "20", "-d", "2s", "-c", "2", &target]).await;
    assert!(latency_ms(&open, "p50") >= 200.0);
    let p99 = latency_ms(&open, "p99");
    assert!(p99 > 700.0, "open-loop p99 {p99} ms hides the queueing");
    assert!(count(&open, "unsent") > 0);

    // A closed loop waits for each answer before asking again, so it never sees the queue.
    let closed = bench_json(&["-d", "1s", "-c", "2", &target]).await;
    let p99 = latency_ms(&closed, "p99");
    assert!((200.0..500.0).contains(&p99), "closed-loop p99 {p99} ms");
}

#[tokio::test]
async fn errors_are_classified() {
    let closed = format!("http://{}/", dead_addr());
    let report = bench_json(&["-n", "10", "-c", "2", &closed]).await;
    assert_eq!(count(&report, "responses"), 0);
    assert_eq!(report["errors"]["connect"], 10);
    assert_eq!(report["errors"]["total"], 10);
    assert_eq!(count(&report, "failed"), 10);

    let slow = demo_backend(&["--latency-ms", "2000"]);
    let report = bench_json(&["-n", "4", "-c", "2", "--timeout", "200ms", &url(&slow, "/")]).await;
    assert_eq!(report["errors"]["timeout"], 4);
    assert_eq!(count(&report, "requests"), 4);
    // In the latency figures at the time they waited (a lower bound), not left out.
    assert!(latency_ms(&report, "max") >= 199.0, "{report}");

    // A server that accepts and hangs up at once resets every request.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rude = format!("http://{}/", listener.local_addr().unwrap());
    let hang_up = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    let report = bench_json(&["-n", "5", "-c", "1", &rude]).await;
    hang_up.abort();
    assert_eq!(report["errors"]["reset"], 5, "{report}");

    // A server that answers the first request of each connection and hangs up on the second
    // after reading it: that second request failed, and is never sent twice.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let one_only = format!("http://{}/", listener.local_addr().unwrap());
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = received.clone();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                for answered in [true, false] {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                        _ => return,
                    };
                    if answered {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        let _ = stream.write_all(ok).await;
                    }
                }
            });
        }
    });
    let report = bench_json(&["-n", "10", "-c", "1", &one_only]).await;
    server.abort();
    assert_eq!(report["status"]["200"], 5, "{report}");
    assert_eq!(report["errors"]["reset"], 5, "{report}");
    assert_eq!(received.load(std::sync::atomic::Ordering::SeqCst), 10);

    let failing = demo_backend(&["--fail-rate", "1"]);
    let report = bench_json(&["-n", "20", &url(&failing, "/")]).await;
    assert_eq!(report["status"]["500"], 20);
    assert_eq!(report["errors"]["total"], 0);
    assert_eq!(count(&report, "failed"), 20);
}

#[tokio::test]
async fn json_report_has_the_documented_schema() {
    let backend = demo_backend(&["--body-bytes", "100"]);
    let target = url(&backend, "/work");
    let report = bench_json(&[
        "-n",
        "50",
        "-c",
        "2",
        "--threads",
        "1",
        "--fail-on",
        "p99>10s",
        &target,
    ])
    .await;
    let object = report.as_object().unwrap();
    let numbers = [
        "connections",
        "threads",
        "warmup_s",
        "duration_s",
        "requests",
        "responses",
        "rps",
        "failed",
        "bytes_read",
        "bytes_written",
        "read_bytes_per_s",
        "warmup_requests",
        "unsent",
        "unfinished",
    ];
    for key in numbers {
        assert!(object[key].is_number(), "{key} is a number in {report}");
    }
    assert_eq!(report["schema_version"], 1);
    assert_eq!(report["interrupted"], false);
    assert_eq!(report["urls"], serde_json::json!([target]));
    assert_eq!(report["method"], "GET");
    assert_eq!(report["http2"], false);
    assert_eq!(report["mode"], "closed");
    assert_eq!(report["rate"], Value::Null);
    assert_eq!(report["threads"], 1);
    assert_eq!(report["status"], serde_json::json!({"200": 50}));
    // Never more threads than connections.
    let one = bench_json(&["-n", "5", "-c", "1", "--threads", "4", &target]).await;
    assert_eq!(one["threads"], 1, "{one}");
    let errors: Vec<&str> = report["errors"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        errors,
        ["connect", "local", "other", "reset", "timeout", "total"]
    );
    let latency = report["latency_us"].as_object().unwrap();
    let mut previous = 0.0;
    for key in ["min", "p50", "p90", "p95", "p99", "p99_9", "max"] {
        let value = latency[key].as_f64().unwrap();
        assert!(
            value >= previous && value > 0.0,
            "latency_us.{key} = {value}"
        );
        previous = value;
    }
    assert!(latency["mean"].is_number() && latency["stdev"].is_number());
    // Every answer carries the 100-byte body plus its head.
    assert!(count(&report, "bytes_read") > 50 * 100);
    assert!(count(&report, "bytes_written") > 50 * 20);
    let fail_on = report["fail_on"].as_array().unwrap();
    assert_eq!(fail_on.len(), 1);
    assert_eq!(fail_on[0]["condition"], "p99>10s");
    assert_eq!(fail_on[0]["tripped"], false);
    assert!(fail_on[0]["value"].as_f64().unwrap() > 0.0);
    assert_eq!(
        object.len(),
        numbers.len() + 11,
        "a field was added or removed: update the README schema and this test"
    );
}

/// A timed run against a server that is down measures nothing: the requests the end of the run
/// found in the generator's own reconnect back-off never went out. They passed for 1 µs
/// answers, so a latency gate held while the server was down.
#[tokio::test]
async fn a_run_against_a_server_that_is_down_measures_no_latency() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let (code, stdout, stderr) = bench(&[
        "-c",
        "4",
        "-d",
        "1s",
        "--json",
        "--fail-on",
        "p99>100ms",
        &target,
    ])
    .await;
    assert_eq!(code, 1, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["latency_us"]["p99"], Value::Null, "{report}");
    assert_eq!(report["unfinished"], 0, "{report}");
    assert!(count(&report, "requests") > 0, "{report}");
    // An open loop's requests held in the reconnect back-off are cut off at the end with
    // what they waited: no answer measured the server, so a latency gate trips all the same.
    let (code, _, stderr) = bench(&[
        "-q",
        "50",
        "-c",
        "4",
        "-d",
        "1s",
        "--fail-on",
        "p99>500ms",
        &target,
    ])
    .await;
    assert_eq!(code, 1, "{stderr}");
}

#[tokio::test]
async fn fail_on_sets_the_exit_status() {
    let backend = demo_backend(&[]);
    let target = url(&backend, "/work");

    let (code, stdout, _) =
        bench(&["-n", "50", "--fail-on", "p99>10s,errors>0,rps<1", &target]).await;
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("Fail-on    p99>10s: held"), "{stdout}");

    let (code, _, stderr) = bench(&["-n", "50", "--fail-on", "errors>0, p50<1h", &target]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("`p50<1h` tripped"), "{stderr}");
    assert!(!stderr.contains("errors>0"), "{stderr}");

    for bad in ["p99>>3", "p99>3", "latency>1s", "errors>x"] {
        let (code, _, stderr) = bench(&["-n", "5", "--fail-on", bad, &target]).await;
        assert_eq!(code, 2, "{bad}: {stderr}");
        assert!(stderr.contains("--fail-on"), "{bad}: {stderr}");
    }
    let unusable = [
        vec!["-n", "5", "https://127.0.0.1:1/"],
        vec!["-n", "5", "127.0.0.1:1/"],
        vec![
            "-n",
            "5",
            "--body-file",
            "/nonexistent/body",
            target.as_str(),
        ],
        vec!["-n", "0", target.as_str()],
        vec!["-n", "5"],
    ];
    for args in unusable {
        let (code, _, stderr) = bench(&args).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(!stderr.is_empty());
    }
    assert_eq!(backend_requests(&client(), &backend).await, 100);
}

/// A timed closed loop sends request i to URL i mod n too: with as many connections as URLs,
/// each connection sent one URL only, so a slow URL got a handful of requests and a fast one
/// thousands.
#[tokio::test]
async fn a_timed_run_shares_its_requests_between_a_fast_and_a_slow_url() {
    let fast = demo_backend(&[]);
    let slow = demo_backend(&["--latency-ms", "20"]);
    let report = bench_json(&["-c", "2", "-d", "1s", &url(&fast, "/"), &url(&slow, "/")]).await;
    let client = client();
    let (fast, slow) = (
        backend_requests(&client, &fast).await,
        backend_requests(&client, &slow).await,
    );
    assert!(slow >= 10, "{report}");
    assert!(fast.abs_diff(slow) <= 2, "fast {fast}, slow {slow}");
}

/// Ctrl-C during the reconnect back-off of a counted run (which has no end to cap the wait)
/// ends the run at once, not after the back-off's second.
#[tokio::test]
async fn ctrl_c_ends_a_counted_runs_reconnect_wait() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let args = ["bench", "-c", "1", "-n", "100", "--json", &target];
    // Inside the wait that starts about 2.27 s in and lasts 1 s.
    let report = interrupted(
        &args,
        Duration::from_millis(2400),
        Duration::from_millis(400),
    )
    .await;
    assert_eq!(count(&report, "responses"), 0, "{report}");
}

/// A server on a loopback port that answers each request with a short 200 while `answering`
/// holds, and after that reads requests and never answers; it closes a connection idle for
/// `idle_close`, as servers do at their keep-alive timeout. Returns its URL and how many
/// requests it has read.
async fn scripted_server(
    answering: Duration,
    idle_close: Duration,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(AtomicU64::new(0));
    let counted = seen.clone();
    let stop_answering = tokio::time::Instant::now() + answering;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = counted.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    let read = tokio::time::timeout(idle_close, stream.read(&mut buf)).await;
                    match read {
                        Ok(Ok(n)) if n > 0 => {}
                        // Idle too long, or the client left: close.
                        _ => return,
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    if tokio::time::Instant::now() >= stop_answering {
                        std::future::pending::<()>().await;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn a_connection_closed_while_idle_takes_no_request_with_it() {
    // Requests 100 ms apart on 2 connections, each idle 200 ms between its requests: the
    // server closes every connection after each answer's 50 ms of quiet.
    let (url, seen) = scripted_server(Duration::from_secs(60), Duration::from_millis(50)).await;
    let report = bench_json(&["-q", "10", "-c", "2", "-n", "8", &url]).await;
    assert_eq!(report["status"]["200"], 8, "{report}");
    assert_eq!(report["errors"]["total"], 0, "{report}");
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 8);
}

#[tokio::test]
async fn a_server_that_stalls_until_the_end_shows_and_the_run_ends_on_time() {
    // Answers for 1 s of a 2 s run at 50 requests/s, then takes requests and answers none.
    let (url, _) = scripted_server(Duration::from_secs(1), Duration::from_secs(60)).await;
    let started = std::time::Instant::now();
    let (code, stdout, stderr) = bench(&[
        "-q",
        "50",
        "-c",
        "5",
        "-d",
        "2s",
        "--timeout",
        "10s",
        "--json",
        "--fail-on",
        "p99>100ms",
        &url,
    ])
    .await;
    let took = started.elapsed();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("p99>100ms"), "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    // Stopped at its end, not when the 10 s timeout of the unanswered requests ran out.
    assert!(took < Duration::from_secs(5), "{took:?}");
    let duration = report["duration_s"].as_f64().unwrap();
    assert!((1.99..2.2).contains(&duration), "{duration}");
    assert_eq!(count(&report, "unfinished"), 5, "{report}");
    let unsent = count(&report, "unsent");
    assert!((35..=50).contains(&unsent), "{report}");
    assert_eq!(
        count(&report, "responses") + count(&report, "unfinished") + unsent,
        100,
        "{report}"
    );
    // The second half of the run waited up to a second: a quarter of the requests at least
    // half a second.
    assert!(latency_ms(&report, "p90") >= 500.0, "{report}");
    assert!(latency_ms(&report, "p99") >= 900.0, "{report}");
}

/// A listener whose accept queue is full: connects to it hang (the kernel drops their SYNs).
/// The streams that filled it are returned, to be held.
async fn accepting_nothing() -> (std::net::SocketAddr, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        let connect = tokio::net::TcpStream::connect(addr);
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), connect).await {
            held.push(stream);
        }
    }
    // The listener stays open (never accepting) for as long as the test runs.
    std::mem::forget(listener);
    (addr, held)
}

/// A server that accepts no connection holds neither a timed run past its time nor Ctrl-C:
/// the clock waits at most a second for connections to open, and a stop ends the wait.
#[tokio::test]
async fn a_server_accepting_nothing_holds_neither_the_run_nor_ctrl_c() {
    let (addr, _held) = accepting_nothing().await;
    let target = format!("http://{addr}/");
    let started = std::time::Instant::now();
    let report = bench_json(&["-c", "8", "-d", "1s", "--timeout", "10s", &target]).await;
    // Its time plus at most the connect phase, not the 10 s a connect may take.
    assert!(started.elapsed() < Duration::from_secs(5), "{report}");
    assert_eq!(count(&report, "responses"), 0, "{report}");
    assert_eq!(count(&report, "unfinished"), 8, "{report}");

    let args = ["bench", "-c", "8", "-d", "20s", "--json", &target];
    // Late enough for the generator to be listening for Ctrl-C, inside its 1 s connect wait.
    let report = interrupted(&args, Duration::from_millis(600), Duration::from_secs(2)).await;
    assert_eq!(count(&report, "responses"), 0, "{report}");
}

/// Runs `scalegate ARGS`, stops it with SIGINT `after` a while, and returns its report, which
/// must come `within` that long of the signal, with exit status 0.
async fn interrupted(args: &[&str], after: Duration, within: Duration) -> Value {
    let child = tokio::process::Command::new(bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(after).await;
    let pid = child.id().unwrap().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    let output = tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not end soon after Ctrl-C"))
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn ctrl_c_ends_the_run_with_a_report_of_it() {
    let backend = demo_backend(&[]);
    // A closed loop, and an open loop whose next request is seconds away.
    ctrl_c_during(&backend, &["-c", "2"]).await;
    let open = ctrl_c_during(&backend, &["-c", "1", "-q", "0.5"]).await;
    // Its one request went out at the start and was answered; the next was not due yet.
    assert_eq!(count(&open, "responses"), 1, "{open}");
    assert_eq!(count(&open, "unfinished"), 0, "{open}");
}

/// Runs `bench -d 20s MODE`, stops it with SIGINT after 0.8 s, and returns its report.
async fn ctrl_c_during(backend: &Proc, mode: &[&str]) -> Value {
    let target = url(backend, "/");
    let mut args = vec!["bench", "-d", "20s", "--json", target.as_str()];
    args.extend_from_slice(mode);
    let report = interrupted(&args, Duration::from_millis(800), Duration::from_secs(1)).await;
    let duration = report["duration_s"].as_f64().unwrap();
    assert!((0.3..3.0).contains(&duration), "{duration}");
    assert!(count(&report, "responses") > 0, "{report}");
    assert_eq!(report["interrupted"], true, "{report}");
    report
}

#[tokio::test]
async fn running_out_of_sockets_here_is_not_the_servers_fault() {
    let backend = demo_backend(&[]);
    let command = format!(
        "ulimit -n 24; exec {} bench -c 40 -n 200 --json {}",
        bin(),
        url(&backend, "/")
    );
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("sh")
            .args(["-c", &command])
            .output(),
    )
    .await
    .expect("bench finished within 30 s")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot open more connections"), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(report["errors"]["local"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"]["connect"], 0, "{report}");
    assert_eq!(count(&report, "requests"), 200, "{report}");
}

/// Reads a request head off `stream`, byte by byte (the body stays unread); false once the
/// client went away.
async fn head_read(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read_exact(&mut byte).await.is_err() {
            return false;
        }
        head.push(byte[0]);
    }
    true
}

/// Three POSTs of a `bytes`-long body, one connection, to `url`, with `more` arguments.
async fn large_uploads(url: &str, bytes: usize, more: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("big");
    std::fs::write(&body, vec![b'x'; bytes]).unwrap();
    let body = body.to_str().unwrap();
    let mut args = vec!["-n", "3", "-c", "1", "-m", "POST", "--body-file", body, url];
    args.extend_from_slice(more);
    bench_json(&args).await
}

/// A server that answers a large upload early (413) and closes without reading the rest: that
/// answer is the request's result (RFC 9112 §9.5), not a reset, and the bytes written count.
#[tokio::test]
async fn an_early_answer_to_a_large_upload_is_the_result() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/upload", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !head_read(&mut stream).await {
                    return;
                }
                let refused = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                let _ = stream.write_all(refused).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    let report = large_uploads(&url, 4 << 20, &[]).await;
    server.abort();
    assert_eq!(report["status"]["413"], 3, "{report}");
    assert_eq!(report["errors"]["total"], 0, "{report}");
    assert!(count(&report, "bytes_written") > 0, "{report}");
}

/// A server that asks for a large upload's body with `100 Continue` gets it whole: an interim
/// answer is no early answer. The upload stopped at it, and every request timed out.
#[tokio::test]
async fn an_interim_answer_does_not_stop_an_upload() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: usize = 32 << 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/upload", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                while head_read(&mut stream).await {
                    let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                    let mut body = vec![0u8; BODY];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if stream.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let expect = ["--timeout", "3s", "-H", "Expect: 100-continue"];
    let report = large_uploads(&url, BODY, &expect).await;
    server.abort();
    assert_eq!(report["status"]["200"], 3, "{report}");
    assert_eq!(report["errors"]["total"], 0, "{report}");
}

/// An HTTP/2 server that hangs up during the handshake resets the requests at once: none
/// waits out `--timeout`.
#[tokio::test]
async fn an_http2_server_hanging_up_resets_requests_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rude = format!("http://{}/", listener.local_addr().unwrap());
    let hang_up = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    let started = std::time::Instant::now();
    let report = bench_json(&["--http2", "-n", "8", "-c", "2", "--timeout", "5s", &rude]).await;
    hang_up.abort();
    assert!(started.elapsed() < Duration::from_secs(4), "{report}");
    assert_eq!(report["errors"]["timeout"], 0, "{report}");
    assert_eq!(report["errors"]["total"], 8, "{report}");
}

/// `--http2` against a server that only speaks HTTP/1.1 says why every request fails, and backs
/// off as after failed connects rather than opening thousands of connections a second.
#[tokio::test]
async fn http2_to_an_http1_server_says_why_and_backs_off() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}/", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let tally = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tally.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                let _ = stream.read_exact(&mut preface).await;
                let answer =
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                let _ = stream.write_all(answer).await;
            });
        }
    });
    let (code, stdout, stderr) =
        bench(&["--http2", "-c", "2", "-d", "1s", "--json", &target]).await;
    server.abort();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("did not answer in HTTP/2"), "{stderr}");
    assert_eq!(
        stderr.matches("did not answer in HTTP/2").count(),
        1,
        "{stderr}"
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(count(&report, "responses"), 0, "{report}");
    // Without backing off, two connections made thousands of attempts in that second.
    let connections = accepted.load(Ordering::Relaxed);
    assert!(connections < 100, "{connections} connections: {report}");
}

/// An HTTP/2 server that shuts down gracefully (GOAWAY, then its answers, then the close)
/// delivers every answer it sends: bench counts them all, none as `reset`, and sends the
/// requests the closed connections did not take on new ones.
#[tokio::test]
async fn answers_before_a_graceful_http2_close_are_counted() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let polite = format!("http://{}/", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                let Some(Ok((_request, mut respond))) = conn.accept().await else {
                    return;
                };
                conn.graceful_shutdown();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let head = http::Response::builder().status(200).body(()).unwrap();
                    if let Ok(mut body) = respond.send_response(head, false) {
                        let _ = body.send_data(bytes::Bytes::from_static(b"ok"), true);
                    }
                });
                while let Some(Ok(_)) = conn.accept().await {}
            });
        }
    });
    let report = bench_json(&["--http2", "-n", "60", "-c", "6", &polite]).await;
    server.abort();
    assert_eq!(report["errors"]["total"], 0, "{report}");
    assert_eq!(report["status"]["200"], 60, "{report}");
}
