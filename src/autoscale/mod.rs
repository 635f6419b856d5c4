//! Autoscaler: one controller task per upstream with an `autoscale` table samples the
//! gateway's own load signals, runs the HPA decision (`policy`, bounded by `schedule`) every
//! sync period and has a provider act on it: `process` starts and stops local child processes,
//! `exec` runs a scale command (e.g. `kubectl scale`) and discovers instances from DNS.
//! The admin API reads each controller's status and can pin a count or pause it.

mod controller;
mod exec;
pub mod policy;
mod process;
pub mod schedule;
mod signals;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{AutoscaleConfig, ProviderConfig};
use crate::proxy::upstream::Upstream;
use crate::proxy::Gateway;
use policy::Bounds;

/// Who decides the count: the policy, nobody (paused), or the operator (pinned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Auto,
    Paused,
    Pinned(u32),
}

/// Reads a `POST /api/autoscale/{upstream}` body: `{"pin": N}`, `{"pause": true}` or
/// `{"resume": true}`, one command alone (with two, one would be dropped unsaid).
pub fn parse_mode(body: &Value) -> Result<Mode, String> {
    let shapes = || "expected one of {\"pin\": N}, {\"pause\": true} or {\"resume\": true}".into();
    let mut fields = body.as_object().into_iter().flatten();
    let (Some((command, value)), None) = (fields.next(), fields.next()) else {
        return Err(shapes());
    };
    match (command.as_str(), value) {
        ("pin", pin) => pin
            .as_u64()
            .filter(|n| (1..=1000).contains(n))
            .map(|n| Mode::Pinned(n as u32))
            .ok_or_else(|| "\"pin\" must be a count from 1 to 1000".to_string()),
        ("pause", Value::Bool(true)) => Ok(Mode::Paused),
        ("resume", Value::Bool(true)) => Ok(Mode::Auto),
        _ => Err(shapes()),
    }
}

/// What one controller shares with the admin API.
struct Handle {
    upstream: String,
    status: Mutex<Value>,
    modes: mpsc::UnboundedSender<Mode>,
}

/// The running autoscalers of a gateway.
#[derive(Default)]
pub struct Registry {
    handles: Mutex<Vec<Arc<Handle>>>,
}

impl Registry {
    /// Status of every autoscaled upstream, for `GET /api/autoscale`.
    pub fn status(&self) -> Value {
        let handles = self.handles.lock().expect("autoscale registry lock");
        let upstreams: Vec<Value> = handles
            .iter()
            .map(|h| h.status.lock().expect("autoscale status lock").clone())
            .collect();
        json!({ "upstreams": upstreams })
    }

    /// Whether the autoscaler of `upstream` runs the instance at `addr` as one of its processes
    /// (the `process` provider lists its children; `exec`'s instances are the cluster's).
    pub fn runs_process(&self, upstream: &str, addr: std::net::SocketAddr) -> bool {
        let handles = self.handles.lock().expect("autoscale registry lock");
        let Some(handle) = handles.iter().find(|h| h.upstream == upstream) else {
            return false;
        };
        let status = handle.status.lock().expect("autoscale status lock");
        let addr = addr.to_string();
        status["instances"]
            .as_array()
            .is_some_and(|children| children.iter().any(|c| c["addr"] == addr.as_str()))
    }

    /// Hands a new mode to the upstream's controller; a pin must lie within `bounds`, those in
    /// force for the upstream (its config as last reloaded, its schedules now).
    pub fn set_mode(&self, upstream: &str, mode: Mode, bounds: Bounds) -> Result<(), ModeError> {
        let handles = self.handles.lock().expect("autoscale registry lock");
        let handle = handles
            .iter()
            .find(|h| h.upstream == upstream)
            .ok_or(ModeError::NotAutoscaled)?;
        if let Mode::Pinned(n) = mode {
            check_pin(n, bounds)?;
        }
        handle
            .modes
            .send(mode)
            .map_err(|_| ModeError::NotAutoscaled)?;
        // Shown at once: the controller takes it at its next tick, which waits for a scale
        // command under way.
        handle.status.lock().expect("autoscale status lock")["mode"] = serde_json::json!(mode);
        Ok(())
    }
}

/// A pinned count within the bounds in force, or why not: the controller would clamp it,
/// and the answer would say it was taken as asked.
fn check_pin(n: u32, bounds: Bounds) -> Result<(), ModeError> {
    if (bounds.min..=bounds.max).contains(&n) {
        Ok(())
    } else {
        Err(ModeError::OutOfBounds(bounds.min, bounds.max))
    }
}

/// The bounds of `config` in force now: its `min` and `max`, as its schedules change them.
pub fn bounds_in_force(config: &crate::config::AutoscaleConfig) -> Bounds {
    let unix_secs = crate::clock::unix_ms_now() / 1000;
    schedule::bounds_at(config.bounds, &config.schedules, unix_secs)
}

/// Why a mode change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    #[error("no autoscaled upstream of that name")]
    NotAutoscaled,
    #[error("the pinned count must be within the bounds in force: min {0}, max {1}")]
    OutOfBounds(u32, u32),
}

/// What the controller needs from a provider. Two implementations: `process` and `exec`.
trait Provider: Send + 'static {
    fn kind(&self) -> &'static str;
    /// The count being worked toward, instances still starting included (HPA's "current").
    fn current(&self) -> u32;
    /// Whether a count of 0 is one to scale up from. The process provider starts the pool
    /// itself; a cluster seen with no instance (discovery not answered yet) is left alone, as
    /// HPA leaves a target at 0 replicas.
    fn scales_from_zero(&self) -> bool;
    /// Instances that count as capacity and are in the pool, with when each started.
    fn members(&self, upstream: &Upstream) -> Vec<(SocketAddr, Instant)>;
    /// Cumulative CPU seconds of each member, where the provider can read them.
    fn cpu_seconds(&self) -> Vec<(SocketAddr, f64)>;
    /// Housekeeping at every sample tick: restarts, discovery, keeping members in the pool.
    fn maintain(
        &mut self,
        upstream: &Arc<Upstream>,
        config: &AutoscaleConfig,
        now: Instant,
    ) -> impl Future<Output = ()> + Send;
    /// Moves toward `desired` instances.
    fn scale(
        &mut self,
        upstream: &Arc<Upstream>,
        desired: u32,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Provider-specific detail for the admin API.
    fn status(&self, upstream: &Upstream, now: Instant) -> Value;
    /// Stops what the provider started (gateway exit).
    fn shutdown(self) -> impl Future<Output = ()> + Send;
}

/// The controller tasks; `stopped` waits until each has stopped its instances.
pub struct Autoscalers {
    tasks: JoinSet<()>,
}

impl Autoscalers {
    pub async fn stopped(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts one controller per upstream with an `autoscale` table; they run until `stop` turns
/// true. Provider settings are read once here (a reload changes bounds, targets and behavior,
/// not the provider).
pub fn start(gateway: &Arc<Gateway>, stop: watch::Receiver<bool>) -> Autoscalers {
    let mut tasks = JoinSet::new();
    let runtime = gateway.runtime.load_full();
    let ports = Arc::new(process::PortBook::default());
    for upstream in &runtime.upstreams {
        let Some(config) = upstream.config.autoscale.clone() else {
            continue;
        };
        let name = upstream.config.name.clone();
        let (modes, mode_rx) = mpsc::unbounded_channel();
        let handle = Arc::new(Handle {
            upstream: name.clone(),
            status: Mutex::new(json!({ "upstream": name })),
            modes,
        });
        gateway
            .autoscale
            .handles
            .lock()
            .expect("autoscale registry lock")
            .push(handle.clone());
        let run = controller::Run {
            gateway: gateway.clone(),
            name: name.clone(),
            initial: config.clone(),
            handle,
            modes: mode_rx,
            stop: stop.clone(),
        };
        match &config.provider {
            ProviderConfig::Process(process) => {
                let provider = process::ProcessProvider::new(
                    Arc::clone(gateway),
                    Arc::clone(&ports),
                    &name,
                    process.clone(),
                    &config,
                );
                tasks.spawn(run.run(provider));
            }
            ProviderConfig::Exec(exec) => {
                let provider =
                    exec::ExecProvider::new(Arc::clone(gateway), &name, exec.clone(), &config);
                tasks.spawn(run.run(provider));
            }
        }
    }
    Autoscalers { tasks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_must_lie_within_the_bounds_in_force() {
        let bounds = Bounds { min: 2, max: 6 };
        assert_eq!(check_pin(2, bounds), Ok(()));
        assert_eq!(check_pin(6, bounds), Ok(()));
        assert_eq!(check_pin(1, bounds), Err(ModeError::OutOfBounds(2, 6)));
        assert_eq!(check_pin(7, bounds), Err(ModeError::OutOfBounds(2, 6)));
    }

    #[test]
    fn admin_bodies() {
        assert_eq!(parse_mode(&json!({"pin": 3})), Ok(Mode::Pinned(3)));
        assert_eq!(parse_mode(&json!({"pause": true})), Ok(Mode::Paused));
        assert_eq!(parse_mode(&json!({"resume": true})), Ok(Mode::Auto));
        assert!(parse_mode(&json!({"pin": 0})).is_err());
        assert!(parse_mode(&json!({"pin": "3"})).is_err());
        assert!(parse_mode(&json!({})).is_err());
        assert!(parse_mode(&json!({"pin": 2, "pause": true})).is_err());
        assert!(parse_mode(&json!({"pause": false})).is_err());
        assert!(parse_mode(&json!([{"pause": true}])).is_err());
    }
}
