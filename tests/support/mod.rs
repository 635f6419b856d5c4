//! Test support: starts real `scalegate` processes (demo backends, gateways) on ephemeral
//! loopback ports and stops them when dropped.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Path of the built `scalegate` binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_scalegate")
}

/// Runs `scalegate` with `args`, which must make it refuse to start: waits (at most 10 s) for
/// it to exit with a failure and returns what it printed on stderr.
pub fn refused_start(args: &[&str]) -> String {
    let mut child = Command::new(bin())
        .args(args)
        .env("LOG_LEVEL", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("scalegate {args:?} started when it should have refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    stderr
}

/// A child process killed on drop, with the addresses it announced on stdout.
pub struct Proc {
    pub child: Child,
    /// Each `NAME listening on ADDR` line seen before start-up finished, as (NAME, ADDR).
    pub addrs: Vec<(String, SocketAddr)>,
    /// Its stderr, line by line, when started by [`spawn_logging`]; empty otherwise.
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// First announced address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0].1
    }

    /// Address announced as `NAME listening on ADDR`.
    pub fn named(&self, name: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name} address in {:?}", self.addrs))
            .1
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stderr lines written so far (see [`spawn_logging`]).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `scalegate ARGS` and waits until it printed `expect` lines of the form
/// `[NAME ]listening on ADDR` on stdout (at most 20 s). Stdout after that is drained.
pub fn spawn(args: &[&str], expect: usize) -> Proc {
    spawn_with_env(args, expect, &[])
}

pub fn spawn_with_env(args: &[&str], expect: usize, env: &[(&str, &str)]) -> Proc {
    start(args, expect, env, false)
}

/// As [`spawn_with_env`], keeping stderr (the log) for [`Proc::log_lines`].
pub fn spawn_logging(args: &[&str], expect: usize, env: &[(&str, &str)]) -> Proc {
    start(args, expect, env, true)
}

fn start(args: &[&str], expect: usize, env: &[(&str, &str)], keep_log: bool) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if keep_log {
            Stdio::piped()
        } else {
            Stdio::inherit()
        });
    if !env.iter().any(|(k, _)| *k == "LOG_LEVEL") {
        cmd.env("LOG_LEVEL", "warn");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn scalegate");
    let stdout = child.stdout.take().expect("stdout");
    let log = Arc::new(Mutex::new(Vec::new()));
    if let Some(stderr) = child.stderr.take() {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = 0;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sent < expect {
                if let Some((name, addr)) = line.split_once("listening on ") {
                    let name = name.trim().to_string();
                    if let Ok(addr) = addr.trim().parse::<SocketAddr>() {
                        sent += 1;
                        let _ = tx.send((name, addr));
                    }
                }
            }
        }
    });
    let mut addrs = Vec::new();
    while addrs.len() < expect {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(pair) => addrs.push(pair),
            Err(_) => {
                let _ = child.kill();
                panic!("scalegate {args:?} did not announce {expect} address(es); got {addrs:?}");
            }
        }
    }
    Proc { child, addrs, log }
}

/// Starts a demo backend on a free port with extra flags.
pub fn demo_backend(extra: &[&str]) -> Proc {
    let mut args = vec!["demo-backend", "--port", "0"];
    args.extend_from_slice(extra);
    spawn(&args, 1)
}

/// A running gateway with its config file.
pub struct Gateway {
    pub proc: Proc,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Rewrites the config file (same listeners) and sends SIGHUP.
    pub fn reload_with(&self, body: &str) {
        std::fs::write(&self.config_path, with_listeners(body)).unwrap();
        signal(self.proc.pid(), "HUP");
    }

    /// Rewrites the config file (same listeners) without signalling: `POST /api/reload` then
    /// applies it before it answers.
    pub fn write_config(&self, body: &str) {
        std::fs::write(&self.config_path, with_listeners(body)).unwrap();
    }

    /// As [`Gateway::reload_with`], with more `[server]` keys beside the test listeners.
    pub fn reload_with_server_keys(&self, keys: &str, body: &str) {
        self.reload_with(&with_server_keys(keys, body));
    }

    /// Waits, off the async workers, for the gateway's process to exit; its status.
    pub async fn exit_status(mut self) -> std::process::ExitStatus {
        tokio::task::spawn_blocking(move || self.proc.child.wait().unwrap())
            .await
            .unwrap()
    }
}

/// The `[server]` table of test gateways: ephemeral listeners, no access log, a short grace.
const TEST_SERVER: &str = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = false\nshutdown_grace = \"5s\"\n";

fn with_listeners(body: &str) -> String {
    if body.contains("[server]") {
        body.to_string()
    } else {
        format!("{TEST_SERVER}\n{body}")
    }
}

/// `body` with the test `[server]` table and more of its keys (`keys`, one per line), which
/// replace the table's own.
fn with_server_keys(keys: &str, body: &str) -> String {
    let name = |line: &str| line.split('=').next().unwrap_or_default().trim().to_owned();
    let given: Vec<String> = keys.lines().map(name).collect();
    let server: String = TEST_SERVER
        .lines()
        .filter(|line| !given.contains(&name(line)))
        .map(|line| format!("{line}\n"))
        .collect();
    format!("{server}{keys}\n\n{body}")
}

/// [`gateway`] with more `[server]` keys (`keys`, one per line) beside the test listeners.
pub fn gateway_with_server_keys(keys: &str, body: &str) -> Gateway {
    gateway(&with_server_keys(keys, body))
}

/// Starts `scalegate serve --config` with `body` (a `[server]` section on ephemeral ports is
/// added unless `body` has one).
pub fn gateway(body: &str) -> Gateway {
    gateway_announcing(body, 2)
}

/// As [`gateway`], waiting for `listeners` announced addresses (3 with a `[tls]` listener).
pub fn gateway_announcing(body: &str, listeners: usize) -> Gateway {
    start_gateway(body, listeners, false)
}

/// As [`gateway`] with the access log on (test gateways have it off), logging at `info` in
/// JSON; its lines are in `proc.log_lines()`.
pub fn gateway_logging(body: &str) -> Gateway {
    gateway_logging_with_server_keys("", body)
}

/// [`gateway_logging`] with more `[server]` keys (`keys`, one per line), which replace the
/// test table's own.
pub fn gateway_logging_with_server_keys(keys: &str, body: &str) -> Gateway {
    let config = with_server_keys(keys, body).replace("access_log = false", "access_log = true");
    start_gateway(&config, 2, true)
}

fn start_gateway(body: &str, listeners: usize, keep_log: bool) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("scalegate.toml");
    std::fs::write(&config_path, with_listeners(body)).unwrap();
    let config = config_path.to_str().unwrap();
    let proc = if keep_log {
        spawn_logging(
            &["serve", "--config", config, "--log-format", "json"],
            listeners,
            &[("LOG_LEVEL", "info")],
        )
    } else {
        spawn(&["serve", "--config", config], listeners)
    };
    Gateway {
        proxy: proc.named("proxy"),
        admin: proc.named("admin"),
        proc,
        config_path,
        _dir: dir,
    }
}

/// The `[upstreams.app]` + catch-all route config for these backends.
pub fn app_config(backends: &[&Proc], extra: &str) -> String {
    let addrs: Vec<std::net::SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    app_config_at(&addrs, extra)
}

/// [`app_config`] for instances given by address (hand-written instances in a test).
pub fn app_config_at(instances: &[std::net::SocketAddr], extra: &str) -> String {
    let list: Vec<String> = instances.iter().map(|addr| format!("\"{addr}\"")).collect();
    format!(
        "[upstreams.app]\ninstances = [{}]\n{extra}\n\n[[routes]]\nupstream = \"app\"\n",
        list.join(", ")
    )
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// A client that speaks HTTP/2 with prior knowledge (h2c).
pub fn h2c_client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A finished response: status, headers and the whole body.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `error` text of a JSON error answer (the admin API's carry a sentence there).
    pub fn error_text(&self) -> String {
        let json = self.json();
        json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error text in {json}"))
            .to_owned()
    }
}

pub async fn request(
    client: &Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Reply, String> {
    use http_body_util::BodyExt;
    let mut builder = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

pub async fn get(client: &Client, url: &str) -> Reply {
    request(client, "GET", url, &[], "").await.unwrap()
}

/// Makes a demo backend's `/health` answer 200 (`true`) or 503.
pub async fn set_health(client: &Client, backend: &Proc, healthy: bool) {
    let state = if healthy { "ok" } else { "fail" };
    let url = format!("http://{}/__health/{state}", backend.addr());
    assert_eq!(
        request(client, "POST", &url, &[], "").await.unwrap().status,
        200
    );
}

/// Requests counted by a demo backend (`/__stats`).
/// The entry of a JSON list (`/health/detailed`'s `components` or `upstreams`) whose `name`
/// is `name`; `null` when there is none.
pub fn named(list: &serde_json::Value, name: &str) -> serde_json::Value {
    let entries = list.as_array().map(Vec::as_slice).unwrap_or_default();
    let found = entries.iter().find(|entry| entry["name"] == name);
    found.cloned().unwrap_or_default()
}

/// The state `/api/upstreams` gives the instance at `addr` of the first upstream.
pub async fn instance_state(client: &Client, gw: &Gateway, addr: String) -> String {
    let json = get(client, &gw.admin_url("/api/upstreams")).await.json();
    json["upstreams"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["addr"] == addr.as_str())
        .map(|i| i["state"].as_str().unwrap().to_string())
        .unwrap()
}

pub async fn backend_requests(client: &Client, backend: &Proc) -> u64 {
    let reply = get(client, &format!("http://{}/__stats", backend.addr())).await;
    reply.json()["requests"].as_u64().unwrap()
}

/// Polls `check` every 50 ms until it holds, up to `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Sends raw bytes on a new connection and returns everything read until the peer closes or
/// 3 s pass.
/// [`raw_exchange`] from async tests without blocking the runtime their own servers run on.
pub async fn raw_exchange_off_thread(addr: SocketAddr, bytes: &[u8]) -> String {
    let bytes = bytes.to_vec();
    tokio::task::spawn_blocking(move || raw_exchange(addr, &bytes))
        .await
        .unwrap()
}

/// The access-log lines (JSON) of `gw` so far, by request ID.
pub fn access_lines(gw: &Gateway) -> std::collections::HashMap<String, serde_json::Value> {
    gw.proc
        .log_lines()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "access")
        .map(|line| (line["request_id"].as_str().unwrap_or("").to_string(), line))
        .collect()
}

/// Reads `stream` until what came holds `marker`; `None` when it closed or failed first.
pub fn read_until(stream: &mut impl std::io::Read, marker: &[u8]) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(marker.len()).any(|w| w == marker) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    Some(seen)
}

/// A hand-written instance: `serve(connection, its index)` on a thread per connection.
pub fn raw_instance(
    serve: impl Fn(std::net::TcpStream, usize) + Send + Sync + 'static,
) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for (index, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { return };
            let serve = serve.clone();
            std::thread::spawn(move || serve(stream, index));
        }
    });
    addr
}

/// GETs `path` from a gateway whose one instance sends "0123456789" of its answer body and then
/// pauses for 30 s: the client gets those bytes, then the gateway closes the connection (a
/// 1 s response timeout; waiting on the instance would outlast the 10 s this waits), and
/// nothing stays in flight.
pub async fn assert_cut_off_after_ten_bytes(gw: &Gateway, path: &str) {
    use std::io::{Read, Write};
    let broken = || async {
        let upstreams = get(&client(), &gw.admin_url("/api/upstreams")).await.json();
        upstreams["upstreams"][0]["instances"][0]["broken_answers"]
            .as_u64()
            .unwrap()
    };
    let broken_before = broken().await;
    let (proxy, head) = (gw.proxy, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
    let (cut, closed) = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(proxy).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        let mut cut = Vec::new();
        // Ok: the gateway closed it; Err: still open after 10 s.
        let closed = stream.read_to_end(&mut cut).is_ok();
        (String::from_utf8_lossy(&cut).into_owned(), closed)
    })
    .await
    .unwrap();
    assert!(closed, "still open: {cut}");
    assert!(cut.ends_with("\r\n\r\n0123456789"), "{cut}");
    let upstreams = get(&client(), &gw.admin_url("/api/upstreams")).await.json();
    assert_eq!(upstreams["upstreams"][0]["instances"][0]["in_flight"], 0);
    // Counted against the instance: the access log has the 200 that went out.
    assert_eq!(broken().await, broken_before + 1);
}

/// The whole answer to `POST /upload` whose 10-byte body pauses 1.5 s halfway, longer than
/// the `response_timeout` of 1 s the tests give it, on a connection that then closes.
pub async fn answer_to_a_paused_upload(proxy: SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let pause = Duration::from_millis(1500);
        let mut stream = post_in_two_halves(proxy, "/upload", "Connection: close\r\n", pause);
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    })
    .await
    .unwrap()
}

/// Sends `POST path` with a 10-byte body in two halves `pause` apart, blocking; the connection
/// is left to read the answer from.
pub fn post_in_two_halves(
    proxy: std::net::SocketAddr,
    path: &str,
    fields: &str,
    pause: Duration,
) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(proxy).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n{fields}\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(b"12345").unwrap();
    std::thread::sleep(pause);
    stream.write_all(b"67890").unwrap();
    stream
}

pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A free loopback port that stays free until this test binary uses it: for a server started
/// (and restarted) on a port chosen for it, or an address where nothing must listen. It lies
/// below the kernel's ephemeral range (32768 and up), and so does a Redis cluster bus port
/// (port + 10000), so no socket another test binds to port 0 or connects from can take it; a
/// counter keeps one binary's ports apart.
pub fn unclaimed_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let random = std::collections::hash_map::RandomState::new().build_hasher();
        AtomicU64::new(random.finish())
    });
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..10_000 {
        let port = 10_000 + (next.fetch_add(1, Ordering::Relaxed) % 10_000) as u16;
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port in 10000-19999");
}

/// A loopback address where nothing listens: connecting to it is refused.
pub fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], unclaimed_port()))
}

/// A `redis-server` of our own on a free loopback port, killed on drop.
pub struct Redis {
    pub child: Option<Child>,
    pub port: u16,
    pub password: Option<String>,
    /// More `redis-server` arguments; `{port}` stands for the chosen port.
    extra: Vec<String>,
    dir: Option<std::path::PathBuf>,
}

impl Redis {
    pub fn start(password: Option<&str>) -> Redis {
        Redis::start_with(password, &[], None)
    }

    /// [`Redis::start`] with more server arguments (`{port}` is replaced by the port; later
    /// arguments override earlier ones, so `--port 0 --tls-port {port}` makes it TLS only),
    /// running in `dir` when given (cluster nodes write their config there).
    pub fn start_with(
        password: Option<&str>,
        extra: &[&str],
        dir: Option<&std::path::Path>,
    ) -> Redis {
        let port = unclaimed_port();
        let mut redis = Redis {
            child: None,
            port,
            password: password.map(String::from),
            extra: extra
                .iter()
                .map(|arg| arg.replace("{port}", &port.to_string()))
                .collect(),
            dir: dir.map(std::path::Path::to_path_buf),
        };
        redis.restart();
        redis
    }

    /// (Re)starts the server on the same port, empty.
    pub fn restart(&mut self) {
        let mut cmd = Command::new(redis_server());
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        self.child = Some(
            cmd.spawn()
                .expect("redis-server (scripts/test installs it)"),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server: a stopped one keeps its connections and
    /// data but answers nothing, as a Redis stalled by a long command or a host pause.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TLS-only `redis-server` whose certificate a CA of its own signed, written as `ca.pem` in
/// `dir` (which must outlive the server).
pub fn tls_redis(dir: &std::path::Path) -> Redis {
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let ca = TestCa::new();
    std::fs::write(path("ca.pem"), ca.cert.pem()).unwrap();
    ca.issue(dir, "redis", &["127.0.0.1"], &[]);
    let (cert, key, ca_file) = (path("redis.pem"), path("redis.key"), path("ca.pem"));
    // The plain port is off.
    Redis::start_with(
        None,
        &[
            "--port",
            "0",
            "--tls-port",
            "{port}",
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca_file,
            "--tls-auth-clients",
            "no",
        ],
        None,
    )
}

pub fn redis_server() -> &'static str {
    if std::path::Path::new("/usr/bin/redis-server").exists() {
        "/usr/bin/redis-server"
    } else {
        "redis-server"
    }
}

/// A test certificate authority (rcgen) that issues certificates into files, and the rustls
/// client side that trusts it.
pub struct TestCa {
    pub cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// Writes `DIR/STEM.pem` and `DIR/STEM.key` for these subject names (and extended key
    /// usages, none meaning any); returns the certificate's DER.
    pub fn issue(
        &self,
        dir: &std::path::Path,
        stem: &str,
        names: &[&str],
        usages: &[rcgen::ExtendedKeyUsagePurpose],
    ) -> rustls::pki_types::CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = usages.to_vec();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    /// A TLS client trusting only this CA, offering `alpn`.
    pub fn connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    }
}
