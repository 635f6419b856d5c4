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
use tokio::time::Instant;

use super::process::{each_line, forward_lines, GroupGuard};
use super::Provider;
use crate::clock::unix_ms_now as unix_ms;

/// How long a discovery lookup may take; a failed one keeps the pool as it is.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
use crate::config::{AutoscaleConfig, ExecConfig, InstanceConfig};
use crate::proxy::upstream::Upstream;
use crate::proxy::Gateway;

pub(super) struct ExecProvider {
    gateway: Arc<Gateway>,
    upstream: String,
    config: ExecConfig,
    drain_timeout: Duration,
    /// The count last applied; until then, the instances in the pool.
    replicas: Option<u32>,
    /// Addresses added by discovery, with when they were first seen.
    discovered: BTreeMap<SocketAddr, Instant>,
    /// When each pool member was first seen (capacity age for `startup_grace`).
    first_seen: BTreeMap<SocketAddr, Instant>,
    next_discovery: Instant,
    last_command: Value,
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
            last_command: Value::Null,
        }
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

    fn current(&self) -> u32 {
        self.replicas.unwrap_or(self.first_seen.len() as u32)
    }

    /// Only a count this provider set itself: 0 seen before any scale command is a cluster
    /// not found yet.
    fn scales_from_zero(&self) -> bool {
        self.replicas.is_some()
    }

    fn members(&self, _upstream: &Upstream) -> Vec<(SocketAddr, Instant)> {
        self.first_seen.iter().map(|(a, t)| (*a, *t)).collect()
    }

    fn cpu_seconds(&self) -> Vec<(SocketAddr, f64)> {
        Vec::new()
    }

    async fn maintain(&mut self, upstream: &Arc<Upstream>, now: Instant) {
        if let Some(discover) = self.config.discover.clone() {
            if now >= self.next_discovery {
                self.next_discovery = now + discover.interval;
                self.discover(&discover.dns, now).await;
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
        let replicas = desired.to_string();
        let args: Vec<String> = self
            .config
            .scale_command
            .iter()
            .map(|a| {
                a.replace("{replicas}", &replicas)
                    .replace("{upstream}", &self.upstream)
            })
            .collect();
        let mut command = tokio::process::Command::new(&args[0]);
        command
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own group: a timed-out command goes with whatever it started (a wrapper's
            // late `kubectl` would apply an old count).
            .process_group(0);
        let result = match command.spawn() {
            Err(err) => Err(format!("cannot run `{}`: {err}", args[0])),
            Ok(mut child) => {
                // The gateway stopping drops this wait: the command goes, with its group.
                let mut group = GroupGuard(child.id());
                let tag = format!("{} scale_command", self.upstream);
                if let Some(out) = child.stdout.take() {
                    tokio::spawn(forward_lines(out, tag, "stdout"));
                }
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
                let waited = tokio::time::timeout(self.config.timeout, child.wait()).await;
                if waited.is_ok() {
                    group.disarm();
                }
                match waited {
                    Err(_) => {
                        group.kill();
                        let _ = child.wait().await;
                        Err(format!("`{}` timed out", args.join(" ")))
                    }
                    Ok(Err(err)) => Err(format!("`{}` failed: {err}", args.join(" "))),
                    Ok(Ok(status)) if status.success() => Ok(()),
                    Ok(Ok(status)) => {
                        // A process it left running may hold stderr open: wait a moment only.
                        let said = match stderr {
                            Some(task) => tokio::time::timeout(Duration::from_secs(1), task)
                                .await
                                .ok()
                                .and_then(Result::ok)
                                .unwrap_or_default(),
                            None => String::new(),
                        };
                        Err(format!("`{}` failed ({status}): {said}", args.join(" ")))
                    }
                }
            }
        };
        self.last_command = json!({
            "at_unix_ms": unix_ms(),
            "command": args,
            "ok": result.is_ok(),
            "error": result.as_ref().err(),
        });
        if result.is_ok() {
            self.replicas = Some(desired);
        }
        result
    }

    fn status(&self, _upstream: &Upstream, _now: Instant) -> Value {
        json!({
            "replicas": self.replicas,
            "discovered": self.discovered.keys().map(ToString::to_string).collect::<Vec<_>>(),
            "last_command": self.last_command,
        })
    }

    async fn shutdown(self) {}
}
