//! The active health checker: one task per upstream probes every instance each `interval`
//! with `GET path` on a fresh connection (an instance whose last probe is still under way skips
//! the round) and feeds the result to the instance's `HealthState`.
//! The probe goes the way requests do: over TLS when the upstream has it, in HTTP/2 for h2 and
//! h2c upstreams.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{header, Request};
use http_body_util::Empty;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::{self, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::ActiveHealthConfig;
use crate::proxy::connect::Connector;
use crate::proxy::error::described;
use crate::proxy::upstream::{Instance, Upstream};

/// Starts the checker for `upstream` when it has active checks configured. The task holds only
/// a weak reference and ends once the upstream is gone or retired (replaced by a reload).
pub fn spawn_active_checks(upstream: &Arc<Upstream>) {
    let Some(config) = upstream.config.health.clone() else {
        return;
    };
    let upstream = Arc::downgrade(upstream);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(config.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Probes still under way, by task: an instance slow to answer skips a round of its own
        // rather than holding back every other instance's checks.
        let mut checks = JoinSet::new();
        let mut probing: HashMap<task::Id, SocketAddr> = HashMap::new();
        let mut busy: HashSet<SocketAddr> = HashSet::new();
        loop {
            ticker.tick().await;
            let Some(live) = upstream.upgrade().filter(|u| !u.is_retired()) else {
                break;
            };
            let set = live.set.load_full();
            drop(live);
            while let Some(done) = checks.try_join_next_with_id() {
                let id = done.map_or_else(|err| err.id(), |(id, ())| id);
                if let Some(addr) = probing.remove(&id) {
                    busy.remove(&addr);
                }
            }
            for instance in &set.instances {
                if busy.insert(instance.addr) {
                    let check = checks.spawn(check_instance(
                        instance.clone(),
                        config.clone(),
                        upstream.clone(),
                    ));
                    probing.insert(check.id(), instance.addr);
                }
            }
        }
    });
}

/// Probes the instance at `addr` now rather than at the checker's next round, when `upstream`
/// has active checks: an instance added at run time serves once a check passed, and waiting up
/// to an `interval` for it leaves the new capacity idle.
pub fn check_soon(upstream: &Arc<Upstream>, addr: SocketAddr) {
    if let (Some(instance), Some(health)) = (upstream.find(addr), &upstream.config.health) {
        tokio::spawn(check_instance(
            instance,
            health.clone(),
            Arc::downgrade(upstream),
        ));
    }
}

/// Probes one instance once and records the result, unless the checks it was made for no
/// longer apply by then: a reload retired `checks_of` (removed the checks, or changed them and
/// a new checker runs them), and a verdict of the old checks would stand with no checker left
/// to revise it, or count twice with the new checker's.
async fn check_instance(
    instance: Arc<Instance>,
    config: ActiveHealthConfig,
    checks_of: Weak<Upstream>,
) {
    let connector = &instance.pool.connector;
    let (connector, probed) = match config.port {
        Some(port) => (
            Cow::Owned(connector.on_port(port)),
            Cow::Owned(SocketAddr::new(instance.addr.ip(), port).to_string()),
        ),
        None => (Cow::Borrowed(connector), Cow::Borrowed(&instance.addr_text)),
    };
    let host = config.host.as_deref().unwrap_or(&probed);
    let http2 = instance.pool.http2.is_some();
    let probing = probe(&connector, http2, &config.path, host);
    let outcome = tokio::time::timeout(config.timeout, probing).await;
    let (ok, detail) = match outcome {
        Ok(Ok(status)) => (
            (config.expect_status.0..=config.expect_status.1).contains(&status),
            format!("status {status}"),
        ),
        Ok(Err(ProbeFailure::Instance(err))) => (false, err),
        Ok(Err(ProbeFailure::Gateway(err))) => {
            tracing::debug!(instance = %instance.addr, %err, "health check skipped");
            return;
        }
        Err(_) => (false, format!("no answer within {:?}", config.timeout)),
    };
    if checks_of
        .upgrade()
        .is_none_or(|upstream| upstream.is_retired())
    {
        return;
    }
    instance.record_check(ok, detail, config.rise, config.fall, Instant::now());
}

/// Why a probe got no status.
enum ProbeFailure {
    /// The instance's doing: the check failed.
    Instance(String),
    /// The gateway could not open a connection (out of file descriptors and the like): no
    /// verdict on the instance.
    Gateway(String),
}

impl From<String> for ProbeFailure {
    fn from(reason: String) -> ProbeFailure {
        ProbeFailure::Instance(reason)
    }
}

async fn probe(
    connector: &Connector,
    http2: bool,
    path: &str,
    host: &str,
) -> Result<u16, ProbeFailure> {
    let io = match connector.connect().await {
        Ok(io) => TokioIo::new(io),
        Err(err) if err.is_local() => return Err(ProbeFailure::Gateway(err.to_string())),
        Err(err) => return Err(ProbeFailure::Instance(err.to_string())),
    };
    let request = Request::get(path).header(header::USER_AGENT, "scalegate-health");
    let response = if http2 {
        let (mut sender, connection) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|err| format!("handshake: {}", described(&err)))?;
        tokio::spawn(connection);
        let scheme = if connector.is_tls() { "https" } else { "http" };
        let request = request
            .uri(format!("{scheme}://{host}{path}"))
            .body(Empty::<Bytes>::new())
            .map_err(|err| err.to_string())?;
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = http1::handshake(io)
            .await
            .map_err(|err| format!("handshake: {}", described(&err)))?;
        tokio::spawn(connection);
        // Over HTTP/2 the host goes in `:authority` alone: nginx refuses a Host field beside
        // it as a duplicate (400), and every instance it served was checked down.
        let request = request
            .header(header::HOST, host)
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|err| err.to_string())?;
        sender.send_request(request).await
    };
    let response = response.map_err(|err| format!("request: {}", described(&err)))?;
    Ok(response.status().as_u16())
}
