//! The `process` provider: each instance is a child process of the gateway, started from the
//! `command` template on a free port of `port_range`, in its own process group.
//!
//! A child joins the pool once its port accepts connections (and, when the upstream has active
//! health checks, serves only after they pass). A child that exits on its own is taken out and
//! restarted after an exponential backoff. Scale-in drains the chosen child (no new requests,
//! in-flight ones finish up to `drain_timeout`), then sends SIGTERM to its group and SIGKILL
//! after `stop_grace`; whatever of its group outlives the child then is killed (as a container's
//! processes go with its main one). On gateway exit every child is stopped the same way, and a
//! guard kills the group of one whose supervisor is dropped without that (a SIGKILLed gateway
//! cannot clean up: see the docs). Ports come from one [`PortBook`] for every upstream, so two
//! `port_range`s that overlap never hand out one port twice.

use std::collections::{BTreeSet, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use smallvec::SmallVec;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::Provider;
use crate::config::{AutoscaleConfig, InstanceConfig, ProcessConfig};
use crate::proxy::upstream::Upstream;
use crate::proxy::Gateway;

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A child that ran this long before crashing restarts without backoff history.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Linux reports process CPU times in ticks of 1/100 s (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChildState {
    /// Spawned, port not accepting yet.
    Starting,
    /// In the pool.
    Serving,
    /// Exited on its own; restarts at the given time.
    Crashed { restart_at: Instant },
    /// Being drained and stopped.
    Stopping,
    /// Being stopped for failing its checks too long (`unhealthy_restart`): it starts again
    /// once it is down, and counts as current meanwhile.
    Replacing,
}

impl ChildState {
    fn name(self) -> &'static str {
        match self {
            ChildState::Starting => "starting",
            ChildState::Serving => "serving",
            ChildState::Crashed { .. } => "crashed",
            ChildState::Stopping | ChildState::Replacing => "stopping",
        }
    }
}

struct Child {
    id: u64,
    addr: SocketAddr,
    pid: Option<u32>,
    state: ChildState,
    /// Its port accepted connections since it was last started: a restart keeps that port (the
    /// instance keeps its address); one that never listened tries another.
    listened: bool,
    started: Instant,
    restarts: u32,
    backoff: Duration,
    stop: Arc<Notify>,
    /// Since when it has failed its active checks while serving.
    failing_since: Option<Instant>,
    /// Its port still took connections after its process exited: whatever the command left
    /// behind (a server that daemonized) holds it. Restarts keep that port: each would
    /// otherwise leave one more such process on the next port, none of them ever stopped.
    port_left_held: bool,
}

enum Event {
    Listening { id: u64 },
    Exited { id: u64, status: String },
    Stopped { id: u64 },
}

/// The ports the gateway's children hold, across every upstream: a port is booked from the
/// start of a child until it is forgotten, whether it runs, crashed or is being replaced.
#[derive(Default)]
pub(super) struct PortBook {
    booked: Mutex<BTreeSet<u16>>,
}

impl PortBook {
    /// Books the first port of `candidates` that nobody booked and nothing listens on.
    fn book(&self, candidates: impl Iterator<Item = u16>) -> Option<u16> {
        let mut booked = self.booked.lock().expect("port book");
        let port = candidates
            .filter(|port| !booked.contains(port))
            .find(|&port| nothing_listens_on(port))?;
        booked.insert(port);
        Some(port)
    }

    fn release(&self, port: u16) {
        self.booked.lock().expect("port book").remove(&port);
    }
}

/// Whether `port` is free on every address: the wildcards clash with a listener on any one
/// (another program on 127.0.0.2 or the LAN address would make a child binding the wildcard
/// fail). A machine without IPv6 says so on the second bind, which is no clash.
fn nothing_listens_on(port: u16) -> bool {
    let _alone = probe_or_spawn();
    let in_use = |err: std::io::Error| err.kind() == std::io::ErrorKind::AddrInUse;
    std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
        && std::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
            .map_or_else(|err| !in_use(err), |_| true)
}

/// Held while the gateway probes a port or starts a process. A process started on another
/// thread mid-probe got a copy of the probe's listener, open until it ran its command: the
/// second bind then clashed with the first, a free port looked taken, and a child that had
/// nothing wrong was counted as failing to start (or as one that left a daemon behind).
static PROBING_OR_SPAWNING: Mutex<()> = Mutex::new(());

fn probe_or_spawn() -> std::sync::MutexGuard<'static, ()> {
    // Poisoned or not, it guards no data.
    PROBING_OR_SPAWNING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts `command`, no port probe under way meanwhile ([`PROBING_OR_SPAWNING`]): the spawn
/// returns once the new process runs its command, which closed the gateway's sockets.
pub(super) fn spawn_alone(
    command: &mut tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    let _alone = probe_or_spawn();
    command.spawn()
}

pub(super) struct ProcessProvider {
    gateway: Arc<Gateway>,
    ports: Arc<PortBook>,
    upstream: String,
    config: ProcessConfig,
    exe: String,
    drain_timeout: Duration,
    stop_grace: Duration,
    children: Vec<Child>,
    /// Addresses children had and gave up (a restart on another port, a child forgotten): an
    /// instance left at one is taken out (see `maintain`).
    former: HashSet<SocketAddr>,
    next_id: u64,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl ProcessProvider {
    pub fn new(
        gateway: Arc<Gateway>,
        ports: Arc<PortBook>,
        upstream: &str,
        config: ProcessConfig,
        auto: &AutoscaleConfig,
    ) -> ProcessProvider {
        let exe = std::env::current_exe()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| {
                std::env::args()
                    .next()
                    .unwrap_or_else(|| "scalegate".into())
            });
        let (events_tx, events) = mpsc::unbounded_channel();
        ProcessProvider {
            gateway,
            ports,
            upstream: upstream.to_string(),
            config,
            exe,
            drain_timeout: auto.drain_timeout,
            stop_grace: auto.stop_grace,
            children: Vec::new(),
            former: HashSet::new(),
            next_id: 1,
            events_tx,
            events,
        }
    }

    /// Forgets child `id` (stopped, or given up), and its port.
    fn forget(&mut self, id: u64) {
        if let Some(index) = self.children.iter().position(|c| c.id == id) {
            let child = self.children.remove(index);
            self.release_port(&child);
        }
    }

    fn release_port(&mut self, child: &Child) {
        if child.addr.port() != 0 {
            self.ports.release(child.addr.port());
            self.former.insert(child.addr);
        }
    }

    /// Starts the process of `child` and its supervisor task.
    fn launch(&self, child: &mut Child) -> Result<(), String> {
        let port = child.addr.port().to_string();
        let args: Vec<String> = self
            .config
            .command
            .iter()
            .map(|arg| arg.replace("{self}", &self.exe).replace("{port}", &port))
            .collect();
        let mut command = tokio::process::Command::new(&args[0]);
        command
            .args(&args[1..])
            .envs(self.config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some(dir) = &self.config.workdir {
            command.current_dir(dir);
        }
        let mut process = spawn_alone(&mut command)
            .map_err(|err| format!("cannot start `{}`: {err}", args[0]))?;
        child.pid = process.id();
        child.started = Instant::now();
        child.state = ChildState::Starting;
        child.listened = false;
        child.stop = Arc::new(Notify::new());
        let tag = format!("{}#{} {}", self.upstream, child.id, child.addr);
        if let Some(out) = process.stdout.take() {
            tokio::spawn(forward_lines(out, tag.clone(), "stdout"));
        }
        if let Some(err) = process.stderr.take() {
            tokio::spawn(forward_lines(err, tag.clone(), "stderr"));
        }
        tracing::info!(instance = %tag, pid = ?child.pid, "instance started");
        tokio::spawn(supervise(
            process,
            child.id,
            child.addr,
            child.stop.clone(),
            self.events_tx.clone(),
            self.stop_grace,
        ));
        Ok(())
    }

    /// Starts a new child, or records a failed start as a crash so it is retried. A child that
    /// listened before starts again on its port when that is free; otherwise its port goes back
    /// to the book and it takes the first free one of the range.
    fn spawn_child(&mut self, now: Instant, mut child: Child) {
        let (low, high) = self.config.ports;
        let own = child.addr.port();
        let keep =
            own != 0 && (child.port_left_held || (child.listened && nothing_listens_on(own)));
        if own != 0 && !keep {
            self.ports.release(own);
            self.former.insert(child.addr);
        }
        // One that never listened tries the ports after its own first: whatever made it fail
        // there (a listener the probe cannot see) may not hold on the next.
        let after = if own == 0 { low } else { own.saturating_add(1) };
        let port = if keep {
            Some(own)
        } else {
            self.ports.book((after..=high).chain(low..after))
        };
        // A port another program holds is as much a failed start as a command that will not
        // run: both are tried again with the same growing backoff.
        let started = match port {
            Some(port) => {
                child.addr = SocketAddr::from(([127, 0, 0, 1], port));
                self.launch(&mut child)
            }
            None => {
                child.addr = SocketAddr::from(([127, 0, 0, 1], 0));
                Err("no free port left in port_range".to_string())
            }
        };
        if let Err(err) = started {
            tracing::error!(upstream = %self.upstream, %err, retry_in_secs = child.backoff.as_secs_f64(), "instance did not start");
            child.state = ChildState::Crashed {
                restart_at: now + child.backoff,
            };
            child.backoff = (child.backoff * 2).min(MAX_BACKOFF);
        }
        self.children.push(child);
    }

    fn new_child(&mut self, now: Instant) -> Child {
        let id = self.next_id;
        self.next_id += 1;
        Child {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pid: None,
            state: ChildState::Starting,
            listened: false,
            started: now,
            restarts: 0,
            backoff: FIRST_BACKOFF,
            stop: Arc::new(Notify::new()),
            failing_since: None,
            port_left_held: false,
        }
    }

    fn handle_event(&mut self, upstream: &Arc<Upstream>, event: Event, now: Instant) {
        match event {
            Event::Listening { id } => {
                if let Some(child) = self.children.iter_mut().find(|c| c.id == id) {
                    if child.state == ChildState::Starting {
                        child.state = ChildState::Serving;
                        child.listened = true;
                        upstream.add_instance(&instance_config(child.addr));
                        crate::health::check_soon(upstream, child.addr);
                    }
                }
            }
            Event::Exited { id, status } => {
                let Some(child) = self.children.iter_mut().find(|c| c.id == id) else {
                    return;
                };
                if child.state == ChildState::Stopping {
                    self.forget(id);
                    return;
                }
                if let Some(instance) = upstream.find(child.addr) {
                    upstream.remove_instance(&instance);
                }
                if child.listened && !nothing_listens_on(child.addr.port()) {
                    child.port_left_held = true;
                    tracing::error!(
                        upstream = %self.upstream,
                        instance = %child.addr,
                        "the instance's process exited but its port still takes connections: \
                         its command left a process behind (a server that daemonizes?); run it \
                         in the foreground. It is started again on the same port"
                    );
                }
                let restart_in = restart_later(child, now);
                tracing::warn!(
                    upstream = %self.upstream,
                    instance = %child.addr,
                    %status,
                    restart_in_ms = restart_in.as_millis() as u64,
                    "instance exited unexpectedly"
                );
            }
            Event::Stopped { id } => match self.children.iter_mut().find(|c| c.id == id) {
                Some(child) if child.state == ChildState::Replacing => {
                    let restart_in = restart_later(child, now);
                    tracing::info!(
                        upstream = %self.upstream,
                        instance = %child.addr,
                        restart_in_ms = restart_in.as_millis() as u64,
                        "unhealthy instance stopped: starting it again"
                    );
                }
                _ => self.forget(id),
            },
        }
    }

    /// Stops the children that have failed their health checks, or not opened their port, for
    /// `limit` (Kubernetes' liveness probe restarts a container the same way): one that never
    /// becomes healthy would otherwise count in the pool for good, serving nothing. They start
    /// again, on the same port, with the backoff of a crash.
    fn replace_unhealthy(&mut self, upstream: &Upstream, limit: Duration, now: Instant) {
        for child in &mut self.children {
            let failing_since = match child.state {
                ChildState::Starting => Some(child.started),
                ChildState::Serving => {
                    let (out, last_passed) = upstream.find(child.addr).map_or((false, true), |i| {
                        let last = i.last_check.lock().expect("last check lock");
                        (
                            !i.passes_active_checks(),
                            last.as_ref().is_none_or(|c| c.ok),
                        )
                    });
                    liveness_failing_since(&mut child.failing_since, out, last_passed, now)
                }
                ChildState::Crashed { .. } | ChildState::Stopping | ChildState::Replacing => None,
            };
            if failing_since.is_none_or(|since| now.saturating_duration_since(since) < limit) {
                continue;
            }
            tracing::warn!(
                upstream = %self.upstream,
                instance = %child.addr,
                state = child.state.name(),
                after_secs = limit.as_secs_f64(),
                "instance unhealthy for unhealthy_restart: stopping it to start it again"
            );
            if let Some(instance) = upstream.find(child.addr) {
                upstream.remove_instance(&instance);
            }
            child.state = ChildState::Replacing;
            child.failing_since = None;
            child.stop.notify_one();
        }
    }
}

/// Since when a serving child fails its liveness, as `unhealthy_restart` counts it: from its
/// first failed check while its checks have it out, until a check passes (Kubernetes' liveness
/// probe needs one success). One coming back, passing checks but short of `rise` of them, is
/// not failing: restarted then, a process that had recovered was killed.
fn liveness_failing_since(
    since: &mut Option<Instant>,
    out: bool,
    last_passed: bool,
    now: Instant,
) -> Option<Instant> {
    if out && !last_passed {
        Some(*since.get_or_insert(now))
    } else {
        *since = None;
        None
    }
}

/// Whether an instance added at run time at `addr` was a child's (one of `children` not
/// serving there now, or an address in `former`) that no serving child owns.
fn is_orphan(addr: SocketAddr, children: &[Child], former: &HashSet<SocketAddr>) -> bool {
    let mut there = children.iter().filter(|c| c.addr == addr).peekable();
    let had = there.peek().is_some() || former.contains(&addr);
    had && !there.any(|c| c.state == ChildState::Serving)
}

fn instance_config(addr: SocketAddr) -> InstanceConfig {
    InstanceConfig {
        addr,
        weight: 1,
        backup: false,
    }
}

impl Provider for ProcessProvider {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn scales_from_zero(&self) -> bool {
        true
    }

    /// Children being replaced count: they start again.
    fn current(&self) -> u32 {
        self.children
            .iter()
            .filter(|c| c.state != ChildState::Stopping)
            .count() as u32
    }

    fn members(&self, _upstream: &Upstream) -> Vec<(SocketAddr, Instant)> {
        self.children
            .iter()
            .filter(|c| c.state == ChildState::Serving)
            .map(|c| (c.addr, c.started))
            .collect()
    }

    fn cpu_seconds(&self) -> Vec<(SocketAddr, f64)> {
        let serving: Vec<(SocketAddr, u32)> = self
            .children
            .iter()
            .filter(|c| c.state == ChildState::Serving)
            .filter_map(|c| Some((c.addr, c.pid?)))
            .collect();
        if serving.is_empty() {
            return Vec::new();
        }
        // Each instance leads its own process group: what a wrapper or a multi-process server
        // started counts as the instance's own CPU.
        let stats = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| {
                entry
                    .file_name()
                    .to_str()
                    .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
            })
            .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok());
        let mut totals = vec![0.0; serving.len()];
        for (group, seconds) in stats.filter_map(|stat| group_cpu_seconds(&stat)) {
            if let Some(i) = serving.iter().position(|&(_, pid)| pid == group) {
                totals[i] += seconds;
            }
        }
        serving
            .iter()
            .zip(totals)
            .map(|(&(addr, _), seconds)| (addr, seconds))
            .collect()
    }

    async fn maintain(&mut self, upstream: &Arc<Upstream>, _: &AutoscaleConfig, now: Instant) {
        while let Ok(event) = self.events.try_recv() {
            self.handle_event(upstream, event, now);
        }
        let limit = upstream
            .config
            .autoscale
            .as_ref()
            .map(|a| a.unhealthy_restart);
        if let Some(limit) = limit.filter(|limit| !limit.is_zero()) {
            self.replace_unhealthy(upstream, limit, now);
        }
        let due: Vec<u64> = self
            .children
            .iter()
            .filter(|c| matches!(c.state, ChildState::Crashed { restart_at } if restart_at <= now))
            .map(|c| c.id)
            .collect();
        for id in due {
            let Some(index) = self.children.iter().position(|c| c.id == id) else {
                continue;
            };
            let mut child = self.children.remove(index);
            child.restarts += 1;
            self.spawn_child(now, child);
        }
        // An instance added to an upstream that a reload was replacing went with it (adds here
        // do not wait for reloads): put it back on the upstream in force.
        for child in self
            .children
            .iter()
            .filter(|c| c.state == ChildState::Serving)
        {
            if upstream.find(child.addr).is_none() {
                upstream.add_instance(&instance_config(child.addr));
            }
        }
        // And one whose child no longer serves there (its exit was handled on an upstream a
        // reload was replacing) goes: nothing else would take it out of rotation. Only at an
        // address a child had: one the admin API added stays.
        let set = upstream.set.load();
        for instance in set.instances.iter().filter(|i| {
            i.is_dynamic() && !i.is_draining() && is_orphan(i.addr, &self.children, &self.former)
        }) {
            tracing::info!(upstream = %self.upstream, instance = %instance.addr, "taking out an instance whose process no longer serves");
            upstream.remove_instance(instance);
        }
        // A former address is remembered until it is out of the upstream: one the admin API
        // adds there later is the operator's.
        let children = &self.children;
        self.former.retain(|addr| {
            !children.iter().any(|c| c.addr == *addr)
                && set
                    .instances
                    .iter()
                    .any(|i| i.addr == *addr && !i.is_draining())
        });
    }

    async fn scale(&mut self, upstream: &Arc<Upstream>, desired: u32) -> Result<(), String> {
        let now = Instant::now();
        let current = self.current();
        for _ in current..desired {
            let child = self.new_child(now);
            self.spawn_child(now, child);
        }
        if desired >= current {
            return Ok(());
        }
        let candidates: Vec<Victim> = self
            .children
            .iter()
            .filter_map(|c| Some((c, runs_if_kept(c.state)?)))
            .map(|(c, running)| {
                let instance = upstream.find(c.addr);
                Victim {
                    id: c.id,
                    running,
                    serving: c.state == ChildState::Serving,
                    healthy: instance.as_ref().is_some_and(|i| i.passes_active_checks()),
                    in_flight: instance.map_or(0, |i| {
                        i.counters
                            .in_flight
                            .load(std::sync::atomic::Ordering::Relaxed)
                    }),
                }
            })
            .collect();
        for id in pick_victims(candidates, (current - desired) as usize) {
            let Some(child) = self.children.iter_mut().find(|c| c.id == id) else {
                continue;
            };
            let was = child.state;
            child.state = ChildState::Stopping;
            tracing::info!(upstream = %self.upstream, instance = %child.addr, "scaling in: draining instance");
            match (was, upstream.find(child.addr)) {
                (ChildState::Crashed { .. }, _) => self.forget(id),
                // Its stop is under way: once stopped it is removed, not started again.
                (ChildState::Replacing, _) => {}
                (_, Some(instance)) => {
                    // Marked now, not when the task first runs: a reload in between would
                    // carry it on as serving (rebuilt, if the pool settings changed), in
                    // rotation while its process is stopped.
                    instance.start_draining();
                    let (upstream, gateway) = (upstream.clone(), self.gateway.clone());
                    let stop = child.stop.clone();
                    let timeout = self.drain_timeout;
                    tokio::spawn(async move {
                        upstream.drain(&gateway, &instance, timeout).await;
                        stop.notify_one();
                    });
                }
                (_, None) => child.stop.notify_one(),
            }
        }
        Ok(())
    }

    fn status(&self, upstream: &Upstream, now: Instant) -> Value {
        let children: Vec<Value> = self
            .children
            .iter()
            .map(|c| {
                // A child in the pool serves only while its checks pass: one that never passes
                // them (or fails them later) is listed as such, not as serving.
                let health = (c.state == ChildState::Serving)
                    .then(|| upstream.find(c.addr))
                    .flatten();
                let state = match &health {
                    Some(instance) if !instance.is_available(now) => "unhealthy",
                    _ => c.state.name(),
                };
                json!({
                    "id": c.id,
                    "addr": c.addr.to_string(),
                    "pid": c.pid,
                    "state": state,
                    "health": health.map(|instance| instance.state_name(now)),
                    "restarts": c.restarts,
                    "uptime_secs": now.saturating_duration_since(c.started).as_secs_f64(),
                })
            })
            .collect();
        Value::Array(children)
    }

    async fn shutdown(mut self) {
        let mut running = 0;
        for child in &self.children {
            if child.pid.is_some() {
                child.stop.notify_one();
                running += 1;
            }
        }
        let deadline = Instant::now() + self.stop_grace + Duration::from_secs(2);
        while running > 0 {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Event::Stopped { .. } | Event::Exited { .. })) => running -= 1,
                Ok(Some(Event::Listening { .. })) => {}
                Ok(None) | Err(_) => break,
            }
        }
        tracing::info!(upstream = %self.upstream, "all instances stopped");
    }
}

/// Schedules a child that is down (crashed, or stopped to be replaced) to start again after
/// its backoff, which doubles for the next time (and starts over after a stable run); returns
/// the wait.
fn restart_later(child: &mut Child, now: Instant) -> Duration {
    if now.saturating_duration_since(child.started) >= STABLE_AFTER {
        child.backoff = FIRST_BACKOFF;
    }
    let wait = child.backoff;
    child.pid = None;
    child.failing_since = None;
    child.state = ChildState::Crashed {
        restart_at: now + wait,
    };
    child.backoff = (wait * 2).min(MAX_BACKOFF);
    wait
}

/// A child that could be stopped, as the victim choice sees it.
#[derive(Debug, Clone, Copy)]
struct Victim {
    id: u64,
    running: bool,
    serving: bool,
    /// Passes its active checks (or there are none).
    healthy: bool,
    in_flight: u32,
}

/// Which children to stop first: ones not running, then ones not yet serving, then ones
/// failing their checks (Kubernetes removes pods not ready first: keeping one would leave the
/// pool with nothing to serve), then the least loaded, the newest among equals (the oldest have
/// warm caches and proven health).
/// Whether a child may be stopped to scale in, and whether it runs now: a crashed child, or
/// one stopped to be replaced (counted in the pool, but serving nothing), goes before any
/// running one; one already stopping is not counted.
fn runs_if_kept(state: ChildState) -> Option<bool> {
    match state {
        ChildState::Stopping => None,
        ChildState::Crashed { .. } | ChildState::Replacing => Some(false),
        ChildState::Starting | ChildState::Serving => Some(true),
    }
}

fn pick_victims(mut candidates: Vec<Victim>, count: usize) -> Vec<u64> {
    candidates.sort_by_key(|v| {
        let order = (v.running, v.serving, v.healthy, v.in_flight);
        (order, std::cmp::Reverse(v.id))
    });
    candidates.into_iter().take(count).map(|v| v.id).collect()
}

/// The process group of a `/proc/PID/stat` line and the CPU seconds it stands for: its own
/// (utime + stime) and that of its children it has waited for (cutime + cstime), so summed over
/// a group's live processes they give the group's CPU. The command name (field 2) is in
/// parentheses and may hold spaces, so fields are counted after its closing parenthesis.
fn group_cpu_seconds(stat: &str) -> Option<(u32, f64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: SmallVec<[&str; 15]> = rest.split_whitespace().take(15).collect();
    let number = |i: usize| -> Option<u64> { fields.get(i)?.parse().ok() };
    let group = u32::try_from(number(2)?).ok()?;
    let ticks = number(11)? + number(12)? + number(13)? + number(14)?;
    Some((group, ticks as f64 / TICKS_PER_SECOND))
}

/// Waits for the child to exit or to be told to stop; reports its port accepting once.
async fn supervise(
    mut process: tokio::process::Child,
    id: u64,
    addr: SocketAddr,
    stop: Arc<Notify>,
    events: mpsc::UnboundedSender<Event>,
    grace: Duration,
) {
    // Dropped without the stop below (the runtime shutting down, a panic): the whole group goes.
    let mut group = GroupGuard(process.id());
    let listening = wait_listening(addr);
    tokio::pin!(listening);
    let mut announced = false;
    loop {
        tokio::select! {
            status = process.wait() => {
                // What the instance started goes with it, as a container's processes do.
                group.kill();
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                let _ = events.send(Event::Exited { id, status });
                return;
            }
            () = &mut listening, if !announced => {
                announced = true;
                let _ = events.send(Event::Listening { id });
            }
            () = stop.notified() => break,
            // The provider is gone (its controller ended): stop the child as well.
            () = events.closed() => break,
        }
    }
    terminate(&mut process, grace).await;
    group.kill();
    let _ = events.send(Event::Stopped { id });
}

/// The process group of a child, killed (SIGKILL) when it is dropped or told to, once.
pub(super) struct GroupGuard(pub(super) Option<u32>);

impl GroupGuard {
    pub(super) fn kill(&mut self) {
        if let Some(pid) = self.0.take() {
            signal_group(pid, Signal::SIGKILL);
        }
    }

    /// Leaves the group alone from now on.
    pub(super) fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_listening(addr: SocketAddr) {
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM to the child's process group; within `grace` the child and the rest of its group
/// may end, then SIGKILL (the caller kills what is left of the group).
async fn terminate(process: &mut tokio::process::Child, grace: Duration) {
    let Some(pid) = process.id() else {
        return;
    };
    let deadline = Instant::now() + grace;
    signal_group(pid, Signal::SIGTERM);
    if tokio::time::timeout_at(deadline, process.wait())
        .await
        .is_err()
    {
        tracing::warn!(pid, "instance ignored SIGTERM: killing it");
        signal_group(pid, Signal::SIGKILL);
        let _ = process.wait().await;
        return;
    }
    // The leader ended: the members it left (workers still finishing) have what is left of it.
    while group_lives(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process of the group led by `pid` is still there.
fn group_lives(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|raw| killpg(Pid::from_raw(raw), None).is_ok())
}

/// Signals the process group led by `pid` (its own, from `process_group(0)`), so whatever the
/// instance started goes too.
fn signal_group(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if let Err(err) = killpg(Pid::from_raw(raw), signal) {
        tracing::debug!(pid, %err, ?signal, "signalling the instance's process group failed");
    }
}

/// The longest line of an instance's (or a scale command's) output that is logged; the rest of
/// a longer one is left out and counted, so output without line breaks cannot fill memory.
const MAX_LINE: usize = 16 * 1024;

/// Logs `stream` line by line (each at most [`MAX_LINE`] bytes), reading it to its end so the
/// writer never blocks on a full pipe.
pub(super) async fn forward_lines(stream: impl AsyncRead + Unpin, tag: String, name: &'static str) {
    each_line(stream, |text| {
        tracing::info!(target: "instance", instance = %tag, stream = name, "{text}");
    })
    .await;
}

/// Hands each line of `stream` to `emit` as [`printable`] text, cut at [`MAX_LINE`] bytes.
pub(super) async fn each_line(stream: impl AsyncRead + Unpin, mut emit: impl FnMut(String)) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let mut cut = 0;
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) if !buf.is_empty() => buf,
            _ => break,
        };
        let end = buf.iter().position(|&b| b == b'\n');
        let chunk = &buf[..end.unwrap_or(buf.len())];
        let room = MAX_LINE - line.len();
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        cut += chunk.len().saturating_sub(room);
        let used = chunk.len() + usize::from(end.is_some());
        reader.consume(used);
        if end.is_some() {
            emit(printable(&line, cut));
            line.clear();
            cut = 0;
        }
    }
    if !line.is_empty() || cut > 0 {
        emit(printable(&line, cut));
    }
}

/// A line of output fit for a log line: invalid UTF-8 replaced, control characters escaped,
/// and what was cut from it counted.
fn printable(line: &[u8], cut: usize) -> String {
    let text = String::from_utf8_lossy(line);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if cut > 0 {
        out.push_str(&format!(" … ({cut} more bytes left out)"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_lines_are_cut_and_made_printable() {
        let mut input = b"first\nbell\x07 and \xff\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend(b"\nlast without a break");
        let mut lines = Vec::new();
        each_line(&input[..], |line| lines.push(line)).await;
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0], "first");
        assert_eq!(lines[1], "bell\\u{7} and \u{fffd}");
        assert!(lines[2].starts_with("xxx"));
        assert!(
            lines[2].ends_with("(10 more bytes left out)"),
            "{}",
            &lines[2][MAX_LINE..]
        );
        assert_eq!(lines[3], "last without a break");
    }

    #[test]
    fn a_child_address_no_serving_child_owns_is_an_orphan() {
        let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let child = |port, state| Child {
            id: u64::from(port),
            addr: at(port),
            pid: None,
            state,
            listened: true,
            started: Instant::now(),
            restarts: 0,
            backoff: FIRST_BACKOFF,
            stop: Arc::new(Notify::new()),
            failing_since: None,
            port_left_held: false,
        };
        let restart_at = Instant::now();
        let children = [
            child(3001, ChildState::Serving),
            child(3002, ChildState::Crashed { restart_at }),
        ];
        // A child moved from 3003 to another port.
        let former = HashSet::from([at(3003)]);
        assert!(!is_orphan(at(3001), &children, &former));
        assert!(is_orphan(at(3002), &children, &former));
        assert!(is_orphan(at(3003), &children, &former));
        // Never a child's (the admin API added it): left alone.
        assert!(!is_orphan(at(3004), &children, &former));
    }

    #[test]
    fn a_passing_check_stops_the_liveness_clock() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut since = None;
        assert_eq!(
            liveness_failing_since(&mut since, true, false, at(0)),
            Some(at(0))
        );
        assert_eq!(
            liveness_failing_since(&mut since, true, false, at(3)),
            Some(at(0))
        );
        // Back to passing, still out until `rise` checks pass: not failing.
        assert_eq!(liveness_failing_since(&mut since, true, true, at(4)), None);
        // Failing again: the clock starts afresh.
        assert_eq!(
            liveness_failing_since(&mut since, true, false, at(5)),
            Some(at(5))
        );
        assert_eq!(liveness_failing_since(&mut since, false, true, at(6)), None);
    }

    /// A port goes to one child at a time, and one held on any address is not handed out: a
    /// child binding the wildcard would fail on it for good.
    #[test]
    fn the_port_book_hands_out_each_free_port_once() {
        let elsewhere = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let held = elsewhere.local_addr().unwrap().port();
        assert!(!nothing_listens_on(held));
        let free: Vec<u16> = (held.saturating_sub(50)..held)
            .filter(|port| nothing_listens_on(*port))
            .take(2)
            .collect();
        assert_eq!(free.len(), 2);
        let ports = [held, free[0], free[1]];
        let book = PortBook::default();
        assert_eq!(book.book(ports.into_iter()), Some(free[0]));
        assert_eq!(book.book(ports.into_iter()), Some(free[1]));
        assert_eq!(book.book(ports.into_iter()), None);
        book.release(free[0]);
        assert_eq!(book.book(ports.into_iter()), Some(free[0]));
    }

    /// Processes started while a free port is probed leave it free: one started mid-probe got a
    /// copy of the probe's listener, and the port looked taken (bounded: 200 starts, 10 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_started_meanwhile_does_not_make_a_free_port_look_taken() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let starting = tokio::task::spawn_blocking({
            let done = done.clone();
            move || {
                for _ in 0..200 {
                    let mut command = tokio::process::Command::new("true");
                    command.process_group(0);
                    drop(spawn_alone(&mut command).unwrap());
                }
                done.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut taken = 0;
        while !done.load(std::sync::atomic::Ordering::Relaxed)
            && std::time::Instant::now() < deadline
        {
            taken += usize::from(!nothing_listens_on(port));
        }
        starting.await.unwrap();
        assert_eq!(taken, 0, "a free port looked taken");
    }

    #[test]
    fn victims_prefer_idle_new_and_not_yet_serving() {
        let v = |id, running, serving, in_flight| Victim {
            id,
            running,
            serving,
            healthy: true,
            in_flight,
        };
        let candidates = vec![
            v(1, true, true, 0),
            v(2, true, true, 5),
            v(3, true, true, 0),
            v(4, true, false, 0),
            v(5, false, false, 0),
        ];
        assert_eq!(pick_victims(candidates.clone(), 3), vec![5, 4, 3]);
        assert_eq!(pick_victims(candidates.clone(), 4), vec![5, 4, 3, 1]);
        // One failing its checks goes before any healthy one, however new or idle they are:
        // scaling 3 to 1 must not keep it alone.
        let mut failing = candidates[..3].to_vec();
        failing[0].healthy = false;
        failing[0].in_flight = 3;
        assert_eq!(pick_victims(failing, 2), vec![1, 3]);
    }

    /// Scaling in, a child being replaced (counted in the pool, serving nothing) goes before
    /// any running one, as a crashed one does; one already stopping is not a candidate.
    #[test]
    fn a_child_being_replaced_is_the_first_to_go() {
        let restart_at = Instant::now();
        assert_eq!(runs_if_kept(ChildState::Replacing), Some(false));
        assert_eq!(
            runs_if_kept(ChildState::Crashed { restart_at }),
            Some(false)
        );
        assert_eq!(runs_if_kept(ChildState::Serving), Some(true));
        assert_eq!(runs_if_kept(ChildState::Starting), Some(true));
        assert_eq!(runs_if_kept(ChildState::Stopping), None);
        let candidates = vec![
            Victim {
                id: 1,
                running: true,
                serving: true,
                healthy: true,
                in_flight: 0,
            },
            Victim {
                id: 2,
                running: false,
                serving: false,
                healthy: false,
                in_flight: 0,
            },
        ];
        assert_eq!(pick_victims(candidates, 1), vec![2]);
    }

    #[test]
    fn proc_stat_cpu_times() {
        let stat =
            "1234 (my app (x)) S 1 1234 1234 0 -1 4194560 120 0 0 0 250 50 30 20 20 0 4 0 100 0 0";
        assert_eq!(group_cpu_seconds(stat), Some((1234, 3.5)));
        let worker = "1240 (worker) R 1234 1234 1234 0 -1 0 0 0 0 0 100 0 0 0 20 0 1 0 100 0 0";
        assert_eq!(group_cpu_seconds(worker), Some((1234, 1.0)));
        assert_eq!(group_cpu_seconds("garbage"), None);
    }
}
