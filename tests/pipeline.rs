//! End-to-end tests of HTTP/1.1 pipelining to instances (`pipeline` above 1): answers reach the
//! requests they belong to, on few connections, and a line that breaks loses no request.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use support::*;

/// `tasks` clients each sending `each` GETs of `/echo?id=TASK-N` at once, in turn; every
/// answer must be 200 and echo its own request's target.
async fn echo_in_parallel(gw: &Gateway, tasks: usize, each: usize) {
    let client = client();
    let mut running = Vec::new();
    for task in 0..tasks {
        let (client, base) = (client.clone(), gw.url("/echo"));
        running.push(tokio::spawn(async move {
            for n in 0..each {
                let target = format!("{base}?id={task}-{n}");
                let reply = get(&client, &target).await;
                let body = String::from_utf8_lossy(&reply.body).into_owned();
                assert_eq!(reply.status, 200, "{target}: {body}");
                let own = format!("/echo?id={task}-{n}");
                assert!(body.contains(&own), "{own} got {body}");
            }
        }));
    }
    for task in running {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_reach_their_own_requests_on_few_connections() {
    let backend = demo_backend(&[]);
    let gw = gateway(&app_config(&[&backend], "pipeline = 8"));
    echo_in_parallel(&gw, 40, 10).await;
    let stats = get(&client(), &format!("http://{}/__stats", backend.addr()))
        .await
        .json();
    // One connection per concurrent request without pipelining; a line carries up to 8.
    let connections = stats["connections"].as_u64().unwrap();
    assert!((1..=12).contains(&connections), "{connections} connections");
}

/// An instance that answers each request on a connection with its target as the body and
/// closes the connection after its third answer: saying so (`Connection: close`) on even
/// connections, abruptly on odd ones, whatever requests it had already read.
fn closing_instance() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for (index, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || answer_three(stream, index % 2 == 0));
        }
    });
    addr
}

fn answer_three(mut stream: TcpStream, say_close: bool) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    for answered in 1..=3 {
        let end = loop {
            if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&read[..end]).into_owned();
        read.drain(..end);
        let target = head.split(' ').nth(1).unwrap_or("?").to_owned();
        let close = if say_close && answered == 3 {
            "Connection: close\r\n"
        } else {
            ""
        };
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{close}\r\n{target}",
            target.len()
        );
        if stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_closing_its_connections_loses_no_pipelined_request() {
    let gw = gateway(&app_config_at(
        &[closing_instance()],
        "pipeline = 8\nretries = 0\nmax_fails = 0",
    ));
    echo_in_parallel(&gw, 12, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_gets_504_and_the_requests_queued_behind_it_are_answered() {
    let backend = demo_backend(&[]);
    let gw = gateway(&app_config(
        &[&backend],
        "pipeline = 8\nresponse_timeout = \"400ms\"\nmax_fails = 0",
    ));
    let client = client();
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), gw.url("/?latency_ms=2000"));
        async move { get(&client, &url).await }
    });
    // Queued behind the slow one on its line.
    tokio::time::sleep(Duration::from_millis(100)).await;
    echo_in_parallel(&gw, 4, 1).await;
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 504, "{:?}", slow.body);
}
