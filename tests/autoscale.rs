//! End-to-end tests of the autoscaler: a real gateway that starts real `scalegate demo-backend`
//! child processes, driven by a load loop in the test that counts every failed request. Their
//! port ranges lie below the kernel's ephemeral range (32768 and up), where no outgoing
//! connection of a busy machine can hold a port a child needs.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// An upstream scaled by the process provider on `ports`, with fast checks for tests.
fn process_config(ports: &str, min: u32, max: u32, extra: &str) -> String {
    format!(
        r#"
[upstreams.app]
strategy = "least_conn"
instances = []
[upstreams.app.health]
interval = "300ms"
rise = 1
[upstreams.app.autoscale]
min = {min}
max = {max}
command = "{{self}} demo-backend --port {{port}} --latency-ms 50"
port_range = "{ports}"
target = {{ in_flight_per_instance = 2 }}
sync_period = "1s"
startup_grace = "1s"
stop_grace = "2s"
{extra}
[[routes]]
upstream = "app"
"#
    )
}

/// The gateway under test, stopped with SIGTERM when dropped so that it stops its instances
/// (the SIGKILL of `support::Proc` would leave them running, as documented).
struct Autoscaled(Gateway);

impl std::ops::Deref for Autoscaled {
    type Target = Gateway;
    fn deref(&self) -> &Gateway {
        &self.0
    }
}

impl std::ops::DerefMut for Autoscaled {
    fn deref_mut(&mut self) -> &mut Gateway {
        &mut self.0
    }
}

impl Drop for Autoscaled {
    fn drop(&mut self) {
        let child = &mut self.0.proc.child;
        if matches!(child.try_wait(), Ok(None)) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn autoscaled(body: &str) -> Autoscaled {
    Autoscaled(gateway(body))
}

async fn autoscale_status(client: &Client, gw: &Gateway) -> Value {
    get(client, &gw.admin_url("/api/autoscale")).await.json()["upstreams"][0].clone()
}

/// (addr, pid) of the children in the given provider state.
fn children(status: &Value, state: &str) -> Vec<(String, u64)> {
    status["instances"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter(|c| c["state"] == state)
                .map(|c| {
                    (
                        c["addr"].as_str().unwrap_or_default().to_string(),
                        c["pid"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Instances of `app` that take traffic (health checks passed, not draining), with their
/// request counts.
async fn pool_up(client: &Client, gw: &Gateway) -> Vec<(String, u64)> {
    let reply = get(client, &gw.admin_url("/api/upstreams")).await.json();
    reply["upstreams"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "up")
        .map(|i| {
            (
                i["addr"].as_str().unwrap().to_string(),
                i["requests"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn process_alive(pid: u64) -> bool {
    // A zombie (exited, not yet reaped) is not running either.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("Z")
                .to_string();
            state != "Z" && state != "X"
        })
        .unwrap_or(false)
}

/// A closed-loop load: `workers` tasks each send requests back to back until `stop` is set,
/// at most `limit` requests each and never longer than `max_time`.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(client: &Client, url: String, workers: usize, limit: u64, max_time: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + max_time;
        let tasks = (0..workers)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    for _ in 0..limit {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        match request(&client, "GET", &url, &[], "").await {
                            Ok(reply) if reply.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            Ok(reply) => {
                                eprintln!("load: status {}", reply.status);
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(err) => {
                                eprintln!("load: {err}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Stops the workers; returns (ok, failed).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_step_scales_out_then_in_after_the_window_without_failed_requests() {
    let window = Duration::from_secs(4);
    let gw = autoscaled(&process_config(
        "24100-24119",
        1,
        4,
        "scale_down = { stabilization = \"4s\" }",
    ));
    let client = client();
    assert!(
        eventually(Duration::from_secs(15), || async {
            pool_up(&client, &gw).await.len() == 1
        })
        .await,
        "the first instance did not come up"
    );
    // Light background load for the whole test: 2 in flight = the target of one instance.
    let light = Load::start(&client, gw.url("/light"), 2, 2_000, Duration::from_secs(60));
    // Load step: 12 more in flight asks for 7 instances, capped at max = 4.
    let step = Instant::now();
    let heavy = Load::start(
        &client,
        gw.url("/heavy"),
        12,
        2_000,
        Duration::from_secs(40),
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            pool_up(&client, &gw).await.len() >= 2
        })
        .await,
        "the pool did not grow under load"
    );
    println!(
        "added capacity serving {:.2}s after the load step",
        step.elapsed().as_secs_f64()
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            let up = pool_up(&client, &gw).await;
            up.len() == 4 && up.iter().all(|(_, requests)| *requests > 0)
        })
        .await,
        "the pool did not reach 4 serving instances: {:?}",
        pool_up(&client, &gw).await
    );
    let peak = autoscale_status(&client, &gw).await["current"]
        .as_u64()
        .unwrap();
    assert_eq!(peak, 4);

    let (heavy_ok, heavy_failed) = heavy.finish().await;
    let calm = Instant::now();
    let mut shrank_after = None;
    let deadline = calm + Duration::from_secs(20);
    while Instant::now() < deadline {
        let current = autoscale_status(&client, &gw).await["current"]
            .as_u64()
            .unwrap();
        if current < peak {
            shrank_after = Some(calm.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shrank_after = shrank_after.expect("the pool did not shrink after the load stopped");
    // The last high recommendation is at most one sync period older than the calm.
    assert!(
        shrank_after >= window - Duration::from_secs(1),
        "shrank {shrank_after:?} after the load stopped, inside the {window:?} window"
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            autoscale_status(&client, &gw).await["current"] == 1
                && pool_up(&client, &gw).await.len() == 1
        })
        .await,
        "the pool did not shrink back to 1"
    );
    let (light_ok, light_failed) = light.finish().await;
    assert!(heavy_ok > 100 && light_ok > 50, "{heavy_ok} {light_ok}");
    assert_eq!(
        (heavy_failed, light_failed),
        (0, 0),
        "requests failed during the scale-out/scale-in cycle"
    );
    let status = autoscale_status(&client, &gw).await;
    let events = status["scale_events"].as_array().unwrap();
    assert!(events
        .iter()
        .any(|e| e["desired"].as_u64() > e["current"].as_u64()));
    assert!(events
        .iter()
        .any(|e| e["desired"].as_u64() < e["current"].as_u64()));
    assert!(events
        .iter()
        .all(|e| e["reason"].is_string() && e["metrics"].is_array()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_instance_is_replaced_and_no_child_survives_the_gateway() {
    let mut gw = autoscaled(&process_config("24200-24219", 2, 3, ""));
    let client = client();
    assert!(
        eventually(Duration::from_secs(15), || async {
            children(&autoscale_status(&client, &gw).await, "serving").len() == 2
        })
        .await
    );
    let before = children(&autoscale_status(&client, &gw).await, "serving");
    let (victim_addr, victim_pid) = before[0].clone();
    signal(victim_pid as u32, "KILL");
    assert!(
        eventually(Duration::from_secs(15), || async {
            let serving = children(&autoscale_status(&client, &gw).await, "serving");
            serving.len() == 2 && !serving.iter().any(|(_, pid)| *pid == victim_pid)
        })
        .await,
        "the crashed instance was not restarted"
    );
    let status = autoscale_status(&client, &gw).await;
    let replaced = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["addr"] == victim_addr.as_str())
        .expect("the instance keeps its port");
    assert_eq!(replaced["restarts"], 1);
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(&client, &gw.url("/after-crash")).await.status == 200
                && pool_up(&client, &gw).await.len() == 2
        })
        .await
    );

    let pids: Vec<u64> = children(&autoscale_status(&client, &gw).await, "serving")
        .into_iter()
        .map(|(_, pid)| pid)
        .collect();
    assert!(pids.iter().all(|pid| process_alive(*pid)));
    signal(gw.proc.pid(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    let exited = loop {
        if let Some(status) = gw.proc.child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        exited.is_some_and(|s| s.success()),
        "gateway exit: {exited:?}"
    );
    let alive: Vec<u64> = pids.into_iter().filter(|pid| process_alive(*pid)).collect();
    assert!(alive.is_empty(), "children outlived the gateway: {alive:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_pins_pauses_and_resumes() {
    let gw = autoscaled(&process_config(
        "24300-24319",
        1,
        4,
        "scale_down = { stabilization = \"1s\" }",
    ));
    let client = client();
    let pin = |body: &'static str| {
        let client = client.clone();
        let url = gw.admin_url("/api/autoscale/app");
        async move { request(&client, "POST", &url, &[], body).await.unwrap() }
    };
    assert_eq!(pin(r#"{"pin": 3}"#).await.status, 202);
    assert!(
        eventually(Duration::from_secs(15), || async {
            pool_up(&client, &gw).await.len() == 3
        })
        .await
    );
    let status = autoscale_status(&client, &gw).await;
    assert_eq!(status["mode"]["pinned"], 3);
    let last = status["decisions"].as_array().unwrap().last().cloned();
    assert_eq!(
        last.unwrap()["reason"],
        "pinned by the operator",
        "{status}"
    );
    // Paused keeps the count although the idle pool would shrink.
    assert_eq!(pin(r#"{"pause": true}"#).await.status, 202);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = autoscale_status(&client, &gw).await;
    assert_eq!(
        (status["mode"].as_str(), status["current"].as_u64()),
        (Some("paused"), Some(3))
    );
    let metrics = get(&client, &gw.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    for line in [
        r#"scalegate_autoscale_current_replicas{upstream="app"} 3"#,
        r#"scalegate_autoscale_desired_replicas{upstream="app"} 3"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
    let component = named(&detailed["components"], "autoscale:app");
    assert_eq!(component["status"], "ok", "{detailed}");
    // Resumed: the policy brings the idle pool back to min.
    assert_eq!(pin(r#"{"resume": true}"#).await.status, 202);
    assert!(
        eventually(Duration::from_secs(15), || async {
            autoscale_status(&client, &gw).await["current"] == 1
        })
        .await
    );
    assert_eq!(pin(r#"{"pin": 0}"#).await.status, 400);
    assert_eq!(pin(r#"{"pin": 5}"#).await.status, 400);
    // Pins are checked against the bounds in force: a reload raising max admits 5.
    gw.write_config(&process_config(
        "24300-24319",
        1,
        6,
        "scale_down = { stabilization = \"1s\" }",
    ));
    let reload = request(&client, "POST", &gw.admin_url("/api/reload"), &[], "").await;
    assert_eq!(reload.unwrap().status, 200);
    assert_eq!(pin(r#"{"pin": 5}"#).await.status, 202);
    assert_eq!(pin(r#"{"resume": true}"#).await.status, 202);
    let missing = request(
        &client,
        "POST",
        &gw.admin_url("/api/autoscale/nope"),
        &[],
        r#"{"pause": true}"#,
    )
    .await
    .unwrap();
    assert_eq!(missing.status, 404);
    // Its instances are the autoscaler's: a drain through the instance API, which the
    // autoscaler would undo at its next sync, is refused and names the way to scale.
    let (addr, _) = children(&autoscale_status(&client, &gw).await, "serving")[0].clone();
    let path = format!("/api/upstreams/app/instances/{addr}");
    let refused = request(&client, "DELETE", &gw.admin_url(&path), &[], "")
        .await
        .unwrap();
    assert_eq!(refused.status, 409);
    assert!(refused.error_text().contains("/api/autoscale/app"));
}

/// An upstream scaled by the exec provider between 2 and 3 instances: `scale` is the scale
/// command, instances are found at `dns`; `extra` adds autoscale keys.
fn exec_config(scale: &str, dns: &str, extra: &str) -> String {
    format!(
        r#"
[upstreams.app]
instances = []
[upstreams.app.health]
interval = "300ms"
rise = 1
[upstreams.app.autoscale]
provider = "exec"
min = 2
max = 3
scale_command = "{scale}"
discover = {{ dns = "{dns}", interval = "1s" }}
target = {{ rps_per_instance = 100 }}
{extra}
[[routes]]
upstream = "app"
"#
    )
}

/// A gateway of [`exec_config`] whose scale command appends each count it is run with to a
/// file, one per line.
struct RecordedScaling {
    gw: Autoscaled,
    record: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn recorded_scaling(dns: &str, extra: &str) -> RecordedScaling {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("replicas");
    let scale = format!("sh -c 'echo {{replicas}} >> {}'", record.display());
    let gw = autoscaled(&exec_config(&scale, dns, extra));
    RecordedScaling {
        gw,
        record,
        _dir: dir,
    }
}

impl RecordedScaling {
    /// Whether the scale command has run with `count`, within 10 s.
    async fn ran_with(&self, count: &str) -> bool {
        eventually(Duration::from_secs(10), || async {
            std::fs::read_to_string(&self.record)
                .is_ok_and(|text| text.lines().any(|line| line == count))
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_provider_runs_the_scale_command_and_discovers_instances() {
    let backend = demo_backend(&[]);
    let dns = format!("localhost:{}", backend.addr().port());
    let scaled = recorded_scaling(&dns, "sync_period = \"1s\"");
    let gw = &scaled.gw;
    let client = client();
    assert!(
        scaled.ran_with("2").await,
        "the scale command did not run with the minimum"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            pool_up(&client, gw)
                .await
                .iter()
                .any(|(addr, _)| *addr == backend.addr().to_string())
        })
        .await,
        "the discovered instance did not join the pool"
    );
    assert_eq!(get(&client, &gw.url("/via-discovery")).await.status, 200);
    let status = autoscale_status(&client, gw).await;
    assert_eq!(status["provider"], "exec");
    assert_eq!(status["current"], 2);
    assert_eq!(status["instances"]["last_command"]["ok"], true);
}

/// `replicas_command` reads the cluster's count at each sync: a count set outside the gateway
/// (a `kubectl scale` by hand) is the one decisions start from, so one over `max` is scaled back
/// to it; a read that prints no count keeps the last one and says why in the status. The
/// command here leaves a process holding its output: what it printed counts all the same.
#[tokio::test]
async fn exec_provider_reads_the_replica_count_from_the_cluster() {
    let backend = demo_backend(&[]);
    let dns = format!("localhost:{}", backend.addr().port());
    let cluster_dir = tempfile::tempdir().unwrap();
    let cluster = cluster_dir.path().join("cluster");
    std::fs::write(&cluster, "3\n").unwrap();
    let extra = format!(
        "sync_period = \"500ms\"\nreplicas_command = \"sh -c 'cat {}; sleep 30 &'\"",
        cluster.display()
    );
    let scaled = recorded_scaling(&dns, &extra);
    let gw = &scaled.gw;
    let client = client();
    let current_is = |n: u64| {
        let client = client.clone();
        async move { autoscale_status(&client, gw).await["current"] == n }
    };
    assert!(eventually(Duration::from_secs(10), || current_is(3)).await);
    // Three is within bounds: nothing to apply (without the read, the pool's one instance was
    // scaled up to the minimum of two).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !scaled.record.exists(),
        "a scale command ran for a count in bounds"
    );
    // Scaled by hand past `max`: back to three.
    std::fs::write(&cluster, "7").unwrap();
    assert!(
        scaled.ran_with("3").await,
        "a count over max was not scaled back"
    );
    std::fs::write(&cluster, "oops").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let status = autoscale_status(&client, gw).await;
            status["instances"]["last_read"]["error"]
                .as_str()
                .is_some_and(|error| error.contains("`oops`, not a replica count"))
        })
        .await
    );
    let status = autoscale_status(&client, gw).await;
    assert!(
        matches!(status["current"].as_u64(), Some(3 | 7)),
        "{status}"
    );
}

/// A read of the cluster's count that started before a scale command and ends after it read
/// the count the command changed: it is not taken for a change made outside the gateway, which
/// had the next sync scale again.
#[tokio::test]
async fn a_read_overtaken_by_a_scale_command_does_not_undo_it() {
    let backend = demo_backend(&[]);
    let dns = format!("localhost:{}", backend.addr().port());
    let dir = tempfile::tempdir().unwrap();
    let (cluster, record) = (dir.path().join("cluster"), dir.path().join("replicas"));
    std::fs::write(&cluster, "1\n").unwrap();
    let scale = format!(
        "sh -c 'sleep 0.3; echo {{replicas}} >> {record}; echo {{replicas}} > {cluster}'",
        record = record.display(),
        cluster = cluster.display()
    );
    let extra = format!(
        "sync_period = \"500ms\"\nreplicas_command = \"sh -c 'sleep 0.1; cat {}'\"",
        cluster.display()
    );
    let gw = autoscaled(&exec_config(&scale, &dns, &extra));
    let scaled = eventually(Duration::from_secs(10), || async { record.exists() }).await;
    assert!(scaled, "not scaled up to the minimum");
    // Several syncs and reads later, still the one command.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(std::fs::read_to_string(&record).unwrap(), "2\n");
    let status = autoscale_status(&client(), &gw).await;
    assert_eq!(status["current"], 2, "{status}");
}

/// A `replicas_command` that takes its time runs beside the controller: a pin is applied at
/// once, not after the read's `command_timeout`.
#[tokio::test]
async fn a_slow_replica_count_read_holds_nothing_up() {
    let backend = demo_backend(&[]);
    let dns = format!("localhost:{}", backend.addr().port());
    let extra =
        "sync_period = \"500ms\"\nreplicas_command = \"sleep 20\"\ncommand_timeout = \"30s\"";
    let scaled = recorded_scaling(&dns, extra);
    let gw = &scaled.gw;
    let client = client();
    // Not read yet: a count not known is left alone.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let status = autoscale_status(&client, gw).await;
            status["decisions"][0]["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("left alone"))
        })
        .await
    );
    assert!(!scaled.record.exists(), "scaled with a count not read");
    let url = gw.admin_url("/api/autoscale/app");
    let pin = request(&client, "POST", &url, &[], r#"{"pin": 3}"#)
        .await
        .unwrap();
    assert_eq!(pin.status, 202);
    assert!(scaled.ran_with("3").await, "the pin waited for the read");
}

/// A scale command still running when the gateway is told to stop does not hold the stop up
/// (for up to `command_timeout`): it is killed, with its group, and the gateway exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_scale_command_does_not_hold_the_stop_up() {
    let backend = demo_backend(&[]);
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let body = exec_config(
        &format!(
            "sh -c 'echo $$ > {}; exec sleep 40 {{replicas}}'",
            pid_file.display()
        ),
        &format!("localhost:{}", backend.addr().port()),
        "sync_period = \"500ms\"\ncommand_timeout = \"60s\"",
    );
    let mut gw = autoscaled(&body);
    let pid = || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
    };
    let running = eventually(Duration::from_secs(10), || async { pid().is_some() }).await;
    assert!(running, "the scale command did not run");
    let command = pid().unwrap();
    assert!(process_alive(command));
    signal(gw.proc.pid(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.proc.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exited = gw.proc.child.try_wait().unwrap();
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
    let gone = eventually(Duration::from_secs(2), || async { !process_alive(command) }).await;
    assert!(gone, "the scale command outlived the gateway");
}

/// A cluster whose instances are not known yet (discovery does not answer) is left alone: HPA
/// never acts on a target at 0, and `kubectl scale --replicas=min` would shrink it.
#[tokio::test]
async fn exec_provider_leaves_a_cluster_it_cannot_see_alone() {
    let scaled = recorded_scaling("no-such-host.invalid:80", "sync_period = \"500ms\"");
    let gw = &scaled.gw;
    let client = client();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let status = autoscale_status(&client, gw).await;
            status["decisions"]
                .as_array()
                .is_some_and(|decisions| decisions.len() >= 3)
        })
        .await
    );
    let status = autoscale_status(&client, gw).await;
    assert_eq!(status["current"], 0, "{status}");
    assert!(
        status["decisions"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("left alone"),
        "{status}"
    );
    assert!(
        !scaled.record.exists(),
        "the scale command ran for a cluster never seen"
    );
}

/// A scale command that outlives `command_timeout` is stopped with everything it started: a
/// wrapper's late `kubectl` would otherwise apply an old count.
#[tokio::test]
async fn a_timed_out_scale_command_is_stopped_with_its_children() {
    let backend = demo_backend(&[]);
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("late");
    let body = exec_config(
        &format!(
            "sh -c '(sleep 1.5; echo {{replicas}} >> {}) & wait'",
            record.display()
        ),
        &format!("localhost:{}", backend.addr().port()),
        "command_timeout = \"300ms\"\nsync_period = \"500ms\"",
    );
    let gw = autoscaled(&body);
    let client = client();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let status = autoscale_status(&client, &gw).await;
            status["instances"]["last_command"]["error"]
                .as_str()
                .is_some_and(|error| error.contains("timed out"))
        })
        .await,
        "the scale command never timed out"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!record.exists(), "a timed-out command's child ran on");
}

/// A demo-backend child scaled on in-flight requests, for [`one_child`].
const DEMO_CHILD: &str =
    "command = \"{self} demo-backend --port {port}\"\ntarget = { in_flight_per_instance = 2 }";

/// An upstream of exactly one process child on `ports`, checked every 200 ms; `health` and
/// `autoscale` are more keys of those tables (`autoscale` names the command and target).
fn one_child(ports: &str, health: &str, autoscale: &str) -> String {
    format!(
        "[upstreams.app]\ninstances = []\n[upstreams.app.health]\ninterval = \"200ms\"\nrise = 1\n\
         {health}\n[upstreams.app.autoscale]\nmin = 1\nmax = 1\nport_range = \"{ports}\"\n\
         sync_period = \"1s\"\n{autoscale}\n[[routes]]\nupstream = \"app\"\n"
    )
}

/// `cpu_percent` is the CPU of the instance's whole process group: here a wrapper shell starts
/// a busy helper and execs the server, which itself idles.
#[tokio::test]
async fn cpu_percent_counts_what_the_instance_started() {
    let gw = autoscaled(&one_child(
        "24400-24409",
        "",
        "command = \"sh -c 'yes > /dev/null & exec {self} demo-backend --port {port}'\"\n\
         target = { cpu_percent = 50 }\nstartup_grace = \"0s\"",
    ));
    let client = client();
    let busy = eventually(Duration::from_secs(15), || async {
        let status = autoscale_status(&client, &gw).await;
        status["signals"]
            .as_array()
            .and_then(|signals| signals.first())
            .and_then(|cpu| cpu["value"].as_f64())
            .is_some_and(|percent| percent > 30.0)
    })
    .await;
    assert!(busy, "{}", autoscale_status(&client, &gw).await);
}

/// A child whose port accepts connections but whose health check never passes is listed as
/// unhealthy, not as serving, and takes no traffic.
#[tokio::test]
async fn a_child_failing_its_checks_is_not_listed_as_serving() {
    let gw = autoscaled(&one_child(
        "24500-24509",
        "path = \"/cache?status=503\"",
        DEMO_CHILD,
    ));
    let client = client();
    let listed = eventually(Duration::from_secs(15), || async {
        let status = autoscale_status(&client, &gw).await;
        status["instances"][0]["pid"].as_u64().is_some()
            && status["instances"][0]["state"] == "unhealthy"
            && status["instances"][0]["health"] == "down"
    })
    .await;
    let status = autoscale_status(&client, &gw).await;
    assert!(listed, "{status}");
    assert!(children(&status, "serving").is_empty(), "{status}");
    let detailed = get(&client, &gw.admin_url("/health/detailed")).await.json();
    let component = named(&detailed["components"], "autoscale:app");
    assert_eq!(component["status"], "degraded", "{detailed}");
    assert_eq!(get(&client, &gw.url("/")).await.status, 503);
}

/// A child failing its checks for `unhealthy_restart` is stopped and started again (as a
/// Kubernetes liveness probe restarts a container), with a crash's backoff.
#[tokio::test]
async fn a_child_failing_its_checks_too_long_is_restarted() {
    let gw = autoscaled(&one_child(
        "24600-24609",
        "path = \"/cache?status=503\"",
        &format!("{DEMO_CHILD}\nunhealthy_restart = \"1s\"\nstop_grace = \"1s\""),
    ));
    let client = client();
    let first_pid = eventually(Duration::from_secs(15), || async {
        let status = autoscale_status(&client, &gw).await;
        status["instances"][0]["pid"].as_u64().is_some()
    })
    .await;
    assert!(first_pid, "{}", autoscale_status(&client, &gw).await);
    let pid = autoscale_status(&client, &gw).await["instances"][0]["pid"].clone();
    let restarted = eventually(Duration::from_secs(15), || async {
        let status = autoscale_status(&client, &gw).await;
        let child = &status["instances"][0];
        child["restarts"].as_u64() >= Some(1) && child["pid"].is_u64() && child["pid"] != pid
    })
    .await;
    let status = autoscale_status(&client, &gw).await;
    assert!(restarted, "{status}");
    // Still one child: the one being replaced counted as current, so none was added beside it.
    assert_eq!(
        status["instances"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
}

/// A start that finds no free port (another program holds the only one of `port_range`) is a
/// failed start: retried with backoff, and the instance starts once the port is free.
#[tokio::test]
async fn a_start_without_a_free_port_is_retried_until_one_frees() {
    // A port the system just gave out: a fixed one may be another test's ephemeral port.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let gw = autoscaled(&one_child(&format!("{port}-{port}"), "", DEMO_CHILD));
    let client = client();
    let retried = eventually(Duration::from_secs(10), || async {
        let status = autoscale_status(&client, &gw).await;
        status["instances"][0]["state"] == "crashed"
            && status["instances"][0]["restarts"].as_u64() >= Some(1)
    })
    .await;
    assert!(retried, "{}", autoscale_status(&client, &gw).await);
    assert_eq!(get(&client, &gw.url("/")).await.status, 503);

    drop(holder);
    let serving = eventually(Duration::from_secs(15), || async {
        children(&autoscale_status(&client, &gw).await, "serving").len() == 1
    })
    .await;
    assert!(serving, "{}", autoscale_status(&client, &gw).await);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(&client, &gw.url("/")).await.status == 200
        })
        .await
    );
}

/// A failed scale command's reason comes from its stderr, but a process it left running that
/// holds stderr open delays the verdict by a second at most, not until that process ends.
#[tokio::test]
async fn a_failed_scale_command_is_reported_without_waiting_for_what_it_left_running() {
    let backend = demo_backend(&[]);
    let body = exec_config(
        "sh -c 'echo quota exceeded for {replicas} >&2; sleep 8 & exit 3'",
        &format!("localhost:{}", backend.addr().port()),
        "sync_period = \"1s\"",
    );
    let gw = autoscaled(&body);
    let client = client();
    let reported = eventually(Duration::from_secs(5), || async {
        let status = autoscale_status(&client, &gw).await;
        status["instances"]["last_command"]["ok"] == false
    })
    .await;
    let status = autoscale_status(&client, &gw).await;
    assert!(reported, "{status}");
    let error = status["instances"]["last_command"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("quota exceeded"), "{status}");
}

/// What an instance started goes with it: a member of its process group that ignores SIGTERM
/// is killed when the instance crashes and when the gateway stops, not left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_takes_its_whole_process_group_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let members = dir.path().join("members");
    let command = format!(
        "command = '''sh -c 'sh -c \"trap \\\"\\\" TERM; echo \\$\\$ >> {}; exec sleep 300\" & exec {{self}} demo-backend --port {{port}}' '''\n\
         target = {{ in_flight_per_instance = 2 }}\nstop_grace = \"1s\"",
        members.display()
    );
    let mut gw = autoscaled(&one_child("24700-24709", "", &command));
    let client = client();
    let member_pids = || {
        std::fs::read_to_string(&members)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse::<u64>().ok())
            .collect::<Vec<u64>>()
    };
    let serving = eventually(Duration::from_secs(15), || async {
        children(&autoscale_status(&client, &gw).await, "serving").len() == 1
            && member_pids().len() == 1
    })
    .await;
    assert!(serving, "{}", autoscale_status(&client, &gw).await);
    let (_, leader) = children(&autoscale_status(&client, &gw).await, "serving")[0].clone();
    signal(leader as u32, "KILL");
    let restarted = eventually(Duration::from_secs(15), || async {
        let serving = children(&autoscale_status(&client, &gw).await, "serving");
        serving.len() == 1 && serving[0].1 != leader && member_pids().len() == 2
    })
    .await;
    assert!(restarted, "{}", autoscale_status(&client, &gw).await);
    let first = member_pids()[0];
    assert!(
        !process_alive(first),
        "a crashed instance's group member lives on"
    );
    let second = member_pids()[1];
    assert!(process_alive(second));
    signal(gw.proc.pid(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    while gw.proc.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = eventually(Duration::from_secs(2), || async { !process_alive(second) }).await;
    assert!(gone, "a group member outlived the gateway");
}

/// Two autoscaled upstreams on one port range never get the same port: the second's children
/// found the first's listening and took them for their own, so one upstream's requests went to
/// the other's application. (Each child takes a moment to listen, as an application does.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_sharing_a_port_range_get_ports_of_their_own() {
    let upstream = |name: &str| {
        format!(
            "[upstreams.{name}]\ninstances = []\n[upstreams.{name}.autoscale]\nmin = 2\nmax = 2\n\
             port_range = \"24800-24803\"\nsync_period = \"1s\"\n\
             command = \"sh -c 'sleep 0.5; exec {{self}} demo-backend --port {{port}}'\"\n\
             target = {{ in_flight_per_instance = 2 }}\n"
        )
    };
    let gw = autoscaled(&format!(
        "{}{}[[routes]]\npath_prefix = \"/a\"\nupstream = \"a\"\n[[routes]]\nupstream = \"b\"\n",
        upstream("a"),
        upstream("b")
    ));
    let client = client();
    let serving = || async {
        let status = get(&client, &gw.admin_url("/api/autoscale")).await.json();
        status["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|u| children(u, "serving"))
            .map(|(addr, _)| addr)
            .collect::<Vec<String>>()
    };
    let all = eventually(Duration::from_secs(15), || async {
        serving().await.len() == 4
    })
    .await;
    let mut addrs = serving().await;
    assert!(all, "{addrs:?}");
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 4, "two children on one port: {addrs:?}");
    // None of them found its port taken by the other upstream's child and crashed.
    let status = get(&client, &gw.admin_url("/api/autoscale")).await.json();
    let restarts: Vec<&Value> = status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|u| u["instances"].as_array().unwrap())
        .map(|c| &c["restarts"])
        .collect();
    assert!(restarts.iter().all(|r| *r == 0), "{status}");
}

/// A child that exits before it ever listens starts again on the next port of the range, not
/// on its own for good (whatever made it fail there, a listener the probe cannot see, may hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_never_listened_tries_the_next_port() {
    let gw = autoscaled(&one_child(
        "24900-24903",
        "",
        "command = \"sh -c '[ {port} = 24900 ] && exit 1; exec {self} demo-backend --port {port}'\"\n\
         target = { in_flight_per_instance = 2 }",
    ));
    let client = client();
    let serving = eventually(Duration::from_secs(10), || async {
        children(&autoscale_status(&client, &gw).await, "serving").len() == 1
    })
    .await;
    let status = autoscale_status(&client, &gw).await;
    assert!(serving, "{status}");
    assert_eq!(children(&status, "serving")[0].0, "127.0.0.1:24901");
}

/// While a scale command runs, the status says which count it was asked for, and a mode the
/// operator sets meanwhile shows at once (it takes effect when the command ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_a_scale_under_way_and_a_mode_set_meanwhile() {
    let backend = demo_backend(&[]);
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("replicas");
    let body = exec_config(
        &format!(
            "sh -c 'echo {{replicas}} >> {}; [ {{replicas}} = 3 ] && exec sleep 4; true'",
            record.display()
        ),
        &format!("localhost:{}", backend.addr().port()),
        "sync_period = \"500ms\"",
    );
    let gw = autoscaled(&body);
    let client = client();
    assert!(
        eventually(Duration::from_secs(10), || async {
            autoscale_status(&client, &gw).await["current"] == 2
        })
        .await,
        "the first scale to the minimum did not end"
    );
    assert_eq!(
        autoscale_status(&client, &gw).await["scaling_to"],
        Value::Null
    );
    let url = gw.admin_url("/api/autoscale/app");
    let pin = request(&client, "POST", &url, &[], r#"{"pin": 3}"#)
        .await
        .unwrap();
    assert_eq!(pin.status, 202);
    assert!(
        eventually(Duration::from_secs(5), || async {
            std::fs::read_to_string(&record).is_ok_and(|text| text.lines().any(|l| l == "3"))
        })
        .await,
        "the scale command did not run for the pin"
    );
    let status = autoscale_status(&client, &gw).await;
    assert_eq!(status["scaling_to"], 3, "{status}");
    assert_eq!(status["mode"], json!({"pinned": 3}), "{status}");
    let resume = request(&client, "POST", &url, &[], r#"{"resume": true}"#)
        .await
        .unwrap();
    assert_eq!(resume.status, 202);
    let status = autoscale_status(&client, &gw).await;
    assert_eq!(status["mode"], "auto", "{status}");
    assert_eq!(status["scaling_to"], 3, "{status}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            autoscale_status(&client, &gw).await["scaling_to"] == Value::Null
        })
        .await,
        "the status kept the scale under way after the command ended"
    );
}

/// A gateway told to stop decides nothing more while it drains: its in-flight requests (here
/// four times the target) are bound to their instances, and an instance started now could
/// never serve one. An operator's pin is refused meanwhile. It scaled up 0.8 s after SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_gateway_scales_no_more() {
    let gw = autoscaled(&process_config("25000-25009", 1, 4, ""));
    let client = client();
    assert!(
        eventually(Duration::from_secs(15), || async {
            children(&autoscale_status(&client, &gw).await, "serving").len() == 1
        })
        .await
    );
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let (client, url) = (client.clone(), gw.url("/slow?latency_ms=3000"));
            tokio::spawn(async move { get(&client, &url).await.status })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(gw.proc.pid(), "TERM");
    let draining = eventually(Duration::from_secs(2), || async {
        get(&client, &gw.admin_url("/health")).await.status == 503
    });
    assert!(draining.await);
    let pin = request(
        &client,
        "POST",
        &gw.admin_url("/api/autoscale/app"),
        &[("content-type", "application/json")],
        r#"{"pin": 3}"#,
    )
    .await
    .unwrap();
    assert_eq!(pin.status, 503, "{:?}", pin.body);
    // Two sync periods with 8 requests in flight on one instance of target 2.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let status = autoscale_status(&client, &gw).await;
    assert_eq!(
        status["instances"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    for request in slow {
        assert_eq!(request.await.unwrap(), 200);
    }
}

/// Upkeep goes on while a stopping gateway still serves (`shutdown_delay`): an instance that
/// crashes then is replaced, not left in the pool as up with its old pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_still_replaces_a_crashed_instance() {
    let gw = Autoscaled(gateway_with_server_keys(
        "shutdown_delay = \"8s\"",
        &process_config("25010-25019", 1, 1, ""),
    ));
    let client = client();
    let serving = || async { children(&autoscale_status(&client, &gw).await, "serving") };
    assert!(
        eventually(Duration::from_secs(15), || async {
            serving().await.len() == 1
        })
        .await
    );
    let (_, pid) = serving().await[0].clone();
    signal(gw.proc.pid(), "TERM");
    let draining = eventually(Duration::from_secs(2), || async {
        get(&client, &gw.admin_url("/health")).await.status == 503
    });
    assert!(draining.await);
    signal(pid as u32, "KILL");
    let replaced = eventually(Duration::from_secs(6), || async {
        serving().await.first().is_some_and(|(_, now)| *now != pid)
    });
    assert!(replaced.await, "{}", autoscale_status(&client, &gw).await);
}

/// Kills, when dropped, the processes whose command line matches a pattern: what a test's
/// daemonizing command leaves behind, out of the gateway's reach.
struct KillLeftBehind(&'static str);

impl Drop for KillLeftBehind {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f", self.0])
            .status();
    }
}

/// A command whose server daemonizes (leaves the launcher's process group and outlives it) is
/// named as such, and started again on its port: each restart left one more server behind on
/// the next port of the range, none of them ever stopped.
#[tokio::test]
async fn a_command_that_daemonizes_is_named_and_keeps_its_port() {
    // The servers alone, not the launchers (`sh -c` lines naming them too).
    let pattern = "^[^ ]*scalegate demo-backend --port 2510[0-9]";
    let _left = KillLeftBehind(pattern);
    let gw = Autoscaled(gateway_logging(&one_child(
        "25100-25109",
        "",
        "command = \"sh -c 'setsid {self} demo-backend --port {port} >/dev/null 2>&1 & sleep 0.5'\"\n\
         target = { in_flight_per_instance = 2 }\nstop_grace = \"1s\"",
    )));
    let named = eventually(Duration::from_secs(10), || async {
        gw.proc
            .log_lines()
            .iter()
            .any(|line| line.contains("its command left a process behind"))
    });
    assert!(named.await, "{:?}", gw.proc.log_lines());
    // Restarts go on (0.5 s, 1 s, 2 s apart); one server is left behind, not one each.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let client = client();
    let restarts = autoscale_status(&client, &gw).await["instances"][0]["restarts"].clone();
    assert!(restarts.as_u64() >= Some(2), "{restarts}");
    let left = std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&left.stdout).lines().count();
    assert_eq!(pids, 1, "{}", String::from_utf8_lossy(&left.stdout));
}
