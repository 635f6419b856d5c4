//! The dashboard in a real headless Chromium, driven over the DevTools protocol: under load it
//! must chart non-zero traffic and list every instance (50 of them), and go live by itself after
//! its stream was refused; a screenshot is saved as an artifact.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// A headless Chromium, killed on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch_browser() -> Browser {
    let binary = ["chromium", "/usr/bin/chromium", "chromium-browser"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("chromium is installed by scripts/test (Debian package chromium)");
    let profile = tempfile::tempdir().unwrap();
    let child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--remote-debugging-port=0",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let port_file = profile.path().join("DevToolsActivePort");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let port = loop {
        if let Some(port) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok())
        {
            break port;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "chromium did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    Browser {
        child,
        _profile: profile,
        port,
    }
}

/// One DevTools session on the browser's first page.
struct Page {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    async fn open(browser: &Browser) -> Page {
        let client = client();
        let targets = get(
            &client,
            &format!("http://127.0.0.1:{}/json/list", browser.port),
        )
        .await
        .json();
        let url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Page { socket, next_id: 1 }
    }

    /// Sends a command and returns its result, skipping the events that arrive meanwhile.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(Message::text(message)).await.unwrap();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .expect("DevTools answer in time")
                .expect("DevTools socket open")
                .unwrap();
            let Message::Text(text) = frame else { continue };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == id {
                assert!(answer.get("error").is_none(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }
}

fn artifact_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_charts_live_traffic_and_lists_every_instance() {
    let a = demo_backend(&["--latency-ms", "2"]);
    let b = demo_backend(&[]);
    let c = demo_backend(&[]);
    // 47 backup instances (never sent traffic while the primaries are up) make a 50-row table,
    // the size the dashboard must stay usable at.
    let backups: Vec<String> = (0..47).map(|n| format!("127.0.0.{}:9", n + 2)).collect();
    let config = format!(
        "[admin]\nusername = \"ops\"\npassword = \"s3cret\"\n\n[upstreams.app]\ninstances = [\"{}\", \"{}\", \"{}\", {}]\n\n[[routes]]\nupstream = \"app\"\n",
        a.addr(),
        b.addr(),
        c.addr(),
        backups
            .iter()
            .map(|addr| format!("{{ addr = \"{addr}\", backup = true }}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let gw = gateway(&config);
    let client = client();

    // Without the credentials the page is refused.
    assert_eq!(get(&client, &gw.admin_url("/dashboard")).await.status, 401);

    // Bounded background load: stops when the test is done or after 40 s.
    let done = Arc::new(AtomicBool::new(false));
    let load = {
        let done = done.clone();
        let url = gw.url("/load");
        tokio::spawn(async move {
            let client = support::client();
            let deadline = std::time::Instant::now() + Duration::from_secs(40);
            let mut sent = 0u64;
            while !done.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let _ = request(&client, "GET", &url, &[], "").await;
                sent += 1;
            }
            sent
        })
    };

    // Every live stream taken: the page's own is refused (503), which a browser never retries
    // by itself. The page must say so, and go live once streams are free again.
    let auth = base64::engine::general_purpose::STANDARD.encode("ops:s3cret");
    let streams: Vec<std::net::TcpStream> = (0..64)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(gw.admin).unwrap();
            let head = format!(
                "GET /api/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n\r\n"
            );
            std::io::Write::write_all(&mut stream, head.as_bytes()).unwrap();
            let mut first = [0u8; 12];
            std::io::Read::read_exact(&mut stream, &mut first).unwrap();
            assert_eq!(&first, b"HTTP/1.1 200");
            stream
        })
        .collect();

    let browser = launch_browser();
    let mut page = Page::open(&browser).await;
    page.call("Network.enable", json!({})).await;
    page.call(
        "Network.setExtraHTTPHeaders",
        json!({"headers": {"Authorization": format!("Basic {auth}")}}),
    )
    .await;
    page.call("Page.navigate", json!({"url": gw.admin_url("/dashboard")}))
        .await;
    let status =
        "document.getElementById('status') ? document.getElementById('status').textContent : ''";
    let mut said = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline && !said.contains("refused") {
        tokio::time::sleep(Duration::from_millis(100)).await;
        said = page
            .eval(status)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned();
    }
    assert!(
        said.contains("refused"),
        "with every stream taken the page says {said:?}"
    );
    drop(streams);

    let probe = "JSON.stringify(window.__dashboard ? {
        maxRps: Math.max(0, ...window.__dashboard.series.rps),
        updates: window.__dashboard.updates,
        rows: [...document.querySelectorAll('#instances tbody tr td:nth-child(2)')].map(td => td.textContent),
        kpi: document.getElementById('k-rps').textContent
    } : null)";
    let mut seen = Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Some(text) = page.eval(probe).await.as_str() {
            seen = serde_json::from_str(text).unwrap();
            if seen["maxRps"].as_f64().unwrap_or(0.0) > 0.0
                && seen["updates"].as_u64().unwrap_or(0) >= 2
                && seen["rows"].as_array().map_or(0, Vec::len) == 50
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let shot = page
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    std::fs::write(artifact_dir().join("dashboard.png"), &png).unwrap();
    done.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();

    assert!(sent > 0);
    assert!(
        seen["maxRps"].as_f64().unwrap_or(0.0) > 0.0,
        "the charts never showed traffic: {seen}"
    );
    assert!(seen["updates"].as_u64().unwrap_or(0) >= 2, "{seen}");
    let mut rows: Vec<String> = seen["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    rows.sort();
    let mut expected: Vec<String> = [&a, &b, &c].iter().map(|p| p.addr().to_string()).collect();
    expected.extend(backups);
    expected.sort();
    assert_eq!(rows, expected);
    assert!(png.len() > 10_000, "screenshot is {} bytes", png.len());
}
