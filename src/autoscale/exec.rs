//! The `exec` provider, for clusters: runs `scale_command` (e.g. `kubectl scale ...
//! --replicas={replicas}`) when the desired count changes, and keeps the pool in step with a
//! DNS name re-resolved every `interval` (like nginx `resolve`): new addresses are added (they
//! serve once their health checks pass), vanished ones are drained and removed. Without
//! `discover`, instances come from the config or the admin API.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::process::{each_line, forward_lines, spawn_alone, GroupGuard};
use super::Provider;
use crate::clock::unix_ms_now as unix_ms;
use crate::config::{AutoscaleConfig, ExecConfig, InstanceConfig};
use crate::proxy::upstream::Upstream;
use crate::proxy::Gateway;

/// How long a discovery lookup may take; a failed one keeps the pool as it is.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// A replica count the provider knows, and where from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KnownCount {
    /// Set by its scale command.
    Applied(u32),
    /// Read from the cluster (`replicas_command`).
    Read(u32),
}

impl KnownCount {
    fn count(self) -> u32 {
        match self {
            KnownCount::Applied(count) | KnownCount::Read(count) => count,
        }
    }
}

/// One run of `replicas_command`: the command as run, and the count it printed or why none.
struct ReplicaRead {
    command: Vec<String>,
    count: Result<u32, String>,
    /// [`ExecProvider::scales`] when it started.
    after_scales: u64,
}

pub(super) struct ExecProvider {
    gateway: Arc<Gateway>,
    upstream: String,
    config: ExecConfig,
    drain_timeout: Duration,
    /// The count last applied, or read from the cluster (`replicas_command`); until either, the
    /// instances in the pool.
    replicas: Option<KnownCount>,
    /// Addresses added by discovery, with when they were first seen.
    discovered: BTreeMap<SocketAddr, Instant>,
    /// When each pool member was first seen (capacity age for `startup_grace`).
    first_seen: BTreeMap<SocketAddr, Instant>,
    next_discovery: Instant,
    /// When `replicas_command` runs next: once a sync period, as HPA reads the scale target.
    next_read: Instant,
    /// The read under way, in the background: a slow command must not hold up the samples,
    /// the decisions and the operator's pins for its `command_timeout`.
    reading: Option<JoinHandle<ReplicaRead>>,
    /// Scale commands run so far.
    scales: u64,
    last_command: Value,
    last_read: Value,
}

impl ExecProvider {
    pub fn new(
        gateway: Arc<Gateway>,
        upstream: &str,
        config: ExecConfig,
        auto: &AutoscaleConfig,
    ) -> ExecProvider {
        ExecProvider {
            gateway,
            upstream: upstream.to_string(),
            config,
            drain_timeout: auto.drain_timeout,
            replicas: None,
            discovered: BTreeMap::new(),
            first_seen: BTreeMap::new(),
            next_discovery: Instant::now(),
            next_read: Instant::now(),
            reading: None,
            scales: 0,
            last_command: Value::Null,
            last_read: Value::Null,
        }
    }

    /// Fills `{upstream}` (and `{replicas}` when given) into a command's words.
    fn command_words(&self, words: &[String], replicas: Option<u32>) -> Vec<String> {
        let replicas = replicas.map(|n| n.to_string());
        words
            .iter()
            .map(|word| {
                let word = word.replace("{upstream}", &self.upstream);
                match &replicas {
                    Some(replicas) => word.replace("{replicas}", replicas),
                    None => word,
                }
            })
            .collect()
    }

    /// Starts reading the cluster's count with `replicas_command`, in the background.
    fn start_read(&mut self, command: &[String]) {
        let args = self.command_words(command, None);
        let tag = format!("{} replicas_command", self.upstream);
        let timeout = self.config.timeout;
        let after_scales = self.scales;
        self.reading = Some(tokio::spawn(async move {
            let count = run_command(&args, timeout, tag, Stdout::Read)
                .await
                .and_then(|out| replicas_in(&out));
            ReplicaRead {
                command: args,
                count,
                after_scales,
            }
        }));
    }

    /// Takes the count a `replicas_command` read: one set outside the gateway (a `kubectl
    /// scale` by hand, a deploy) is the count the next decision starts from. A failed read
    /// keeps the last count, and so does one that started before a scale command.
    fn took_read(&mut self, read: ReplicaRead) {
        let ReplicaRead {
            command,
            count,
            after_scales,
        } = read;
        // One started before the last scale command may have read the count that command
        // changed: taken for a change made outside the gateway, it undid the scale (the next
        // sync ran the command again, a second scale event).
        let current = after_scales == self.scales;
        match count {
            Ok(replicas) if current && self.replicas.map(KnownCount::count) != Some(replicas) => {
                let before = self.replicas.map(KnownCount::count);
                tracing::info!(upstream = %self.upstream, replicas, ?before, "replica count read from the cluster");
                self.replicas = Some(KnownCount::Read(replicas));
            }
            Ok(_) => {}
            Err(ref err) => {
                tracing::warn!(upstream = %self.upstream, %err, "reading the replica count failed");
            }
        }
        self.last_read = json!({
            "at_unix_ms": unix_ms(),
            "command": command,
            "ok": count.is_ok(),
            "replicas": count.as_ref().ok(),
            "error": count.as_ref().err(),
        });
    }

    async fn discover(&mut self, dns: &str, now: Instant) {
        // A resolver that does not answer must not freeze the controller's syncs and status.
        let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(dns)).await;
        let found: Vec<SocketAddr> = match lookup.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 5 s",
            ))
        }) {
            Ok(addrs) => addrs.collect(),
            Err(err) => {
                // A failed lookup keeps the pool as it is rather than emptying it.
                tracing::warn!(upstream = %self.upstream, dns, %err, "discovery lookup failed");
                return;
            }
        };
        // Changed on the upstream in force once the lookup is back, with reloads held off: an
        // instance added to an upstream that a reload was replacing would be lost, and it is
        // added only once.
        let _serialized = self.gateway.hold_reloads().await;
        let Some(upstream) = self.gateway.upstream(&self.upstream) else {
            return;
        };
        for addr in &found {
            if self.discovered.contains_key(addr) {
                continue;
            }
            let in_pool = match upstream.find(*addr) {
                // Back in DNS while the drain its leaving started runs: the drain is called
                // off. One already being removed is added again by a later lookup.
                Some(instance) if instance.is_draining() => instance.stop_draining(),
                Some(_) => true,
                None => {
                    let config = InstanceConfig {
                        addr: *addr,
                        weight: 1,
                        backup: false,
                    };
                    if upstream.add_instance(&config) {
                        tracing::info!(upstream = %self.upstream, instance = %addr, "discovered instance added");
                        crate::health::check_soon(&upstream, *addr);
                    }
                    true
                }
            };
            if in_pool {
                self.discovered.insert(*addr, now);
            }
        }
        let gone: Vec<SocketAddr> = self
            .discovered
            .keys()
            .filter(|addr| !found.contains(addr))
            .copied()
            .collect();
        for addr in gone {
            self.discovered.remove(&addr);
            if let Some(instance) = upstream.find(addr) {
                tracing::info!(upstream = %self.upstream, instance = %addr, "instance left DNS: draining it");
                // Marked now, as on scale-in (see the process provider).
                instance.start_draining();
                let (upstream, gateway) = (upstream.clone(), self.gateway.clone());
                let timeout = self.drain_timeout;
                tokio::spawn(async move { upstream.drain(&gateway, &instance, timeout).await });
            }
        }
    }
}

impl Provider for ExecProvider {
    fn kind(&self) -> &'static str {
        "exec"
    }

    /// With `replicas_command`, 0 until a read succeeded: a count not known is left alone
    /// (as HPA does not act on a target it cannot read), where the pool's count would have a
    /// scale command shrink a cluster whose instances are not all discovered yet.
    fn current(&self) -> u32 {
        let unread = || match self.config.replicas_command {
            Some(_) => 0,
            None => self.first_seen.len() as u32,
        };
        self.replicas.map_or_else(unread, KnownCount::count)
    }

    /// Only a count this provider set itself: 0 seen before any scale command is a cluster
    /// not found yet, and 0 read from the cluster one scaled to zero on purpose (HPA leaves
    /// such a target alone too).
    fn scales_from_zero(&self) -> bool {
        matches!(self.replicas, Some(KnownCount::Applied(_)))
    }

    fn members(&self, _upstream: &Upstream) -> Vec<(SocketAddr, Instant)> {
        self.first_seen.iter().map(|(a, t)| (*a, *t)).collect()
    }

    fn cpu_seconds(&self) -> Vec<(SocketAddr, f64)> {
        Vec::new()
    }

    async fn maintain(&mut self, upstream: &Arc<Upstream>, config: &AutoscaleConfig, now: Instant) {
        if let Some(discover) = self.config.discover.clone() {
            if now >= self.next_discovery {
                self.next_discovery = now + discover.interval;
                self.discover(&discover.dns, now).await;
            }
        }
        if let Some(command) = self.config.replicas_command.clone() {
            let done = self.reading.as_ref().is_some_and(JoinHandle::is_finished);
            if let Some(reading) = self.reading.take_if(|_| done) {
                if let Ok(read) = reading.await {
                    self.took_read(read);
                }
            }
            // As often as the syncs, at the period a reload may have changed.
            if self.reading.is_none() && now >= self.next_read {
                self.next_read = now + config.sync_period;
                self.start_read(&command);
            }
        }
        let set = upstream.set.load();
        let live: Vec<SocketAddr> = set
            .instances
            .iter()
            .filter(|i| !i.is_draining())
            .map(|i| i.addr)
            .collect();
        self.first_seen.retain(|addr, _| live.contains(addr));
        for addr in live {
            self.first_seen.entry(addr).or_insert(now);
        }
    }

    async fn scale(&mut self, _upstream: &Arc<Upstream>, desired: u32) -> Result<(), String> {
        let args = self.command_words(&self.config.scale_command, Some(desired));
        let tag = format!("{} scale_command", self.upstream);
        self.scales += 1;
        let result = run_command(&args, self.config.timeout, tag, Stdout::Logged)
            .await
            .map(drop);
        self.last_command = json!({
            "at_unix_ms": unix_ms(),
            "command": args,
            "ok": result.is_ok(),
            "error": result.as_ref().err(),
        });
        if result.is_ok() {
            self.replicas = Some(KnownCount::Applied(desired));
        }
        result
    }

    fn status(&self, _upstream: &Upstream, _now: Instant) -> Value {
        json!({
            "replicas": self.replicas.map(KnownCount::count),
            "discovered": self.discovered.keys().map(ToString::to_string).collect::<Vec<_>>(),
            "last_command": self.last_command,
            "last_read": self.last_read,
        })
    }

    async fn shutdown(self) {
        // Dropped, the read's command goes with its group.
        if let Some(reading) = self.reading {
            reading.abort();
        }
    }
}

/// What becomes of a command's standard output.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stdout {
    /// Each line goes to the log.
    Logged,
    /// Kept (its first [`READ_MAX`] bytes) and handed back.
    Read,
}

/// The most of a command's output that is kept to be read.
const READ_MAX: u64 = 4096;

/// Runs `args` in a process group of its own, stopped with everything it started once it
/// outlives `timeout` (a wrapper's late `kubectl` would apply an old count); the output it was
/// asked to keep, or why it failed, with the last lines of its stderr.
async fn run_command(
    args: &[String],
    timeout: Duration,
    tag: String,
    stdout: Stdout,
) -> Result<String, String> {
    let mut command = tokio::process::Command::new(&args[0]);
    command
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let mut child =
        spawn_alone(&mut command).map_err(|err| format!("cannot run `{}`: {err}", args[0]))?;
    // The gateway stopping drops this wait: the command goes, with its group.
    let mut group = GroupGuard(child.id());
    // What a read command printed, kept as it comes: a process it left behind may hold its
    // output open past its exit, and what came before counts all the same.
    let printed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let output = child.stdout.take().map(|out| match stdout {
        Stdout::Logged => tokio::spawn(forward_lines(out, tag, "stdout")),
        Stdout::Read => {
            let printed = printed.clone();
            tokio::spawn(async move {
                let mut out = out.take(READ_MAX);
                let mut buf = [0u8; 512];
                while let Ok(read @ 1..) = out.read(&mut buf).await {
                    let mut printed = printed.lock().expect("printed lock");
                    printed.extend_from_slice(&buf[..read]);
                }
            })
        }
    });
    // The last lines of stderr say why it failed; all of it is read, little kept.
    let stderr = child.stderr.take().map(|err| {
        tokio::spawn(async move {
            let mut kept = VecDeque::new();
            each_line(err, |line| {
                if kept.len() == 5 {
                    kept.pop_front();
                }
                kept.push_back(line);
            })
            .await;
            Vec::from(kept).join("; ")
        })
    });
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    match (&waited, stdout) {
        // A read has nothing to leave running: what it left goes, and its output ends.
        (Ok(_), Stdout::Read) => group.kill(),
        (Ok(_), Stdout::Logged) => group.disarm(),
        (Err(_), _) => {}
    }
    match waited {
        Err(_) => {
            group.kill();
            let _ = child.wait().await;
            Err(format!("`{}` timed out", args.join(" ")))
        }
        Ok(Err(err)) => Err(format!("`{}` failed: {err}", args.join(" "))),
        // Logged output is not waited for: a server the command started may keep it open.
        Ok(Ok(status)) if status.success() => {
            if stdout == Stdout::Read {
                ended(output).await;
            }
            let printed = printed.lock().expect("printed lock");
            Ok(String::from_utf8_lossy(&printed).into_owned())
        }
        Ok(Ok(status)) => {
            let said = ended(stderr).await;
            Err(format!("`{}` failed ({status}): {said}", args.join(" ")))
        }
    }
}

/// What an output's reader came to once the output ended: a process the command left running
/// may hold it open, so its end is waited for a moment only (the default past that).
async fn ended<T: Default>(reader: Option<JoinHandle<T>>) -> T {
    match reader {
        Some(reader) => tokio::time::timeout(Duration::from_secs(1), reader)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default(),
        None => T::default(),
    }
}

/// The replica count a `replicas_command` printed: one whole number, blanks around it allowed
/// (`kubectl ... -o jsonpath` prints no newline, `echo` one).
fn replicas_in(output: &str) -> Result<u32, String> {
    let text = output.trim();
    text.parse().map_err(|_| {
        let shown: String = text.chars().take(80).collect();
        format!("printed `{shown}`, not a replica count")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_count_is_one_whole_number() {
        assert_eq!(replicas_in("3"), Ok(3));
        assert_eq!(replicas_in(" 12\n"), Ok(12));
        assert_eq!(replicas_in("0"), Ok(0));
        for bad in ["", "-1", "3 4", "three", "2.5", "99999999999"] {
            let err = replicas_in(bad).unwrap_err();
            assert!(err.contains("not a replica count"), "{bad}: {err}");
        }
    }
}
