//! The control loop of one upstream: sample the signals several times per sync period, decide
//! once per period (or at once when the operator changes the mode), have the provider apply
//! the result, and publish the status for the admin API.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::policy::{self, Bounds, Decision, History, Metric};
use super::signals::Sampler;
use super::{Handle, Mode, Provider};
use crate::clock::unix_ms_now as unix_ms;
use crate::config::AutoscaleConfig;
use crate::proxy::upstream::Upstream;
use crate::proxy::Gateway;

/// Signals are sampled this often (or every sync period when that is shorter).
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Decisions kept for the admin API.
const KEEP_DECISIONS: usize = 20;

pub(super) struct Run {
    pub gateway: Arc<Gateway>,
    pub name: String,
    pub initial: AutoscaleConfig,
    pub handle: Arc<Handle>,
    pub modes: mpsc::UnboundedReceiver<Mode>,
    pub stop: watch::Receiver<bool>,
}

/// The controller's memory between ticks.
struct State {
    mode: Mode,
    history: History,
    sampler: Sampler,
    decisions: VecDeque<Value>,
    scale_events: VecDeque<Value>,
    last: Option<Decision>,
    desired: u32,
    /// The count the provider is being asked for, while it works on it.
    scaling_to: Option<u32>,
    /// When each member first served (see [`track_joined`]), as seen at the sample ticks.
    joined: HashMap<SocketAddr, Instant>,
}

impl Run {
    pub async fn run<P: Provider>(mut self, mut provider: P) {
        let mut ticker = tokio::time::interval(self.initial.sync_period.min(SAMPLE_EVERY));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first sync runs at once, so the pool reaches `min` without waiting a period.
        let mut next_sync = Instant::now();
        let mut state = State {
            mode: Mode::Auto,
            history: History::default(),
            sampler: Sampler::default(),
            decisions: VecDeque::new(),
            scale_events: VecDeque::new(),
            last: None,
            desired: 0,
            scaling_to: None,
            joined: HashMap::new(),
        };
        // Watched during a tick's work too: a scale command or a DNS lookup that hangs must not
        // hold the gateway's stop up (for up to `command_timeout`); the command is killed.
        let mut stop = self.stop.clone();
        loop {
            let mut sync_now = false;
            tokio::select! {
                _ = ticker.tick() => {}
                Some(mode) = self.modes.recv() => {
                    tracing::info!(upstream = %self.name, ?mode, "autoscale mode changed");
                    state.mode = mode;
                    sync_now = true;
                }
                _ = stop.changed() => break,
            }
            let tick = self.tick(&mut provider, &mut state, &mut next_sync, sync_now);
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                () = tick => {}
            }
        }
        tracing::info!(upstream = %self.name, "autoscaler stopping its instances");
        provider.shutdown().await;
    }

    /// One tick: the provider's upkeep, a sample, and a sync when one is due (or `sync_now`).
    async fn tick<P: Provider>(
        &self,
        provider: &mut P,
        state: &mut State,
        next_sync: &mut Instant,
        sync_now: bool,
    ) {
        let Some(upstream) = self.gateway.upstream(&self.name) else {
            return;
        };
        let config = upstream
            .config
            .autoscale
            .clone()
            .unwrap_or_else(|| self.initial.clone());
        let now = Instant::now();
        provider.maintain(&upstream, &config, now).await;
        let members = provider.members(&upstream);
        // Read from /proc, so only for an upstream that targets CPU.
        let cpu = if config.targets.iter().any(|(m, _)| *m == Metric::CpuPercent) {
            provider.cpu_seconds()
        } else {
            Vec::new()
        };
        state.sampler.sample(&upstream, &members, &cpu, now);
        let standings = members.iter().map(|(addr, _)| {
            let standing = match upstream.find(*addr) {
                Some(i) if i.is_draining() => Standing::Leaving,
                Some(i) if i.is_available(now) => Standing::Serving,
                Some(_) => Standing::TakenOut,
                None => Standing::Leaving,
            };
            (*addr, standing)
        });
        track_joined(&mut state.joined, standings, now);
        // A gateway on its way out decides nothing more: the requests it drains are bound to
        // their instances, and an instance started now (or a `kubectl scale` run now) would
        // never serve it. Upkeep goes on (a crashed instance is still replaced while
        // `shutdown_delay` serves); the instances are stopped once the drain is over.
        if (sync_now || now >= *next_sync) && !self.gateway.is_draining() {
            *next_sync = now + config.sync_period;
            self.sync(provider, &upstream, &config, &members, state, now)
                .await;
        }
        self.publish(provider, &upstream, &config, state, now);
    }

    async fn sync<P: Provider>(
        &self,
        provider: &mut P,
        upstream: &Arc<Upstream>,
        config: &AutoscaleConfig,
        members: &[(std::net::SocketAddr, Instant)],
        state: &mut State,
        now: Instant,
    ) {
        let ready: Vec<_> = members
            .iter()
            .filter(|(addr, started)| {
                let joined = state.joined.get(addr).copied();
                is_ready(
                    now,
                    *started,
                    joined,
                    config.startup_grace,
                    config.sync_period,
                )
            })
            .map(|(addr, _)| *addr)
            .collect();
        let samples = state.sampler.finish(&ready, &config.targets);
        let current = provider.current();
        if current == 0 && !provider.scales_from_zero() && !matches!(state.mode, Mode::Pinned(_)) {
            // Nothing is worked toward: the status shows no count from before.
            state.desired = 0;
            let record = json!({
                "at_unix_ms": unix_ms(),
                "mode": state.mode,
                "current": 0,
                "desired": 0,
                "reason": "a target at 0 instances is left alone (none known yet, or scaled to zero outside the gateway)",
            });
            push_bounded(&mut state.decisions, record);
            return;
        }
        let bounds = super::bounds_in_force(config);
        let decision = policy::decide(
            now,
            current,
            &samples,
            bounds,
            &config.policy,
            &mut state.history,
        );
        // The operator's word wins over the policy's, within the bounds in force (a reload may
        // have lowered `max` below a pin).
        let (desired, reason) = match state.mode {
            Mode::Auto => (decision.desired, decision.reason),
            Mode::Paused => (current, "paused by the operator"),
            Mode::Pinned(n) => pinned(n, decision.bounds),
        };
        state.desired = desired;
        let mut record = json!({
            "at_unix_ms": unix_ms(),
            "mode": state.mode,
            "current": current,
            // Not the status's `ready` (in rotation now): an instance checks took out after it
            // joined still counts toward the average, as HPA counts a pod once ready.
            "counted": ready.len(),
            "desired": desired,
            "recommended": decision.recommended,
            "reason": reason,
            "bounds": decision.bounds,
            "metrics": decision.metrics,
        });
        if desired != current {
            // A scale command may run for up to its `command_timeout`: meanwhile the status
            // shows the decision under way.
            state.scaling_to = Some(desired);
            self.publish(provider, upstream, config, state, now);
            let applied = provider.scale(upstream, desired).await;
            state.scaling_to = None;
            match &applied {
                Ok(()) => {
                    state.history.record_scale(now, current, desired);
                    tracing::info!(
                        upstream = %self.name,
                        from = current,
                        to = desired,
                        reason,
                        "autoscale"
                    );
                }
                Err(err) => {
                    tracing::error!(upstream = %self.name, to = desired, %err, "scaling failed");
                    record["error"] = json!(err);
                }
            }
            push_bounded(&mut state.scale_events, record.clone());
        }
        push_bounded(&mut state.decisions, record);
        state.last = Some(decision);
    }

    /// Hands the status to the admin API.
    fn publish<P: Provider>(
        &self,
        provider: &P,
        upstream: &Upstream,
        config: &AutoscaleConfig,
        state: &State,
        now: Instant,
    ) {
        let last = state.last.as_ref();
        let status = json!({
            "upstream": self.name,
            "provider": provider.kind(),
            "mode": state.mode,
            "current": provider.current(),
            "desired": state.desired,
            "scaling_to": state.scaling_to,
            "ready": provider
                .members(upstream)
                .iter()
                .filter(|(addr, _)| upstream.find(*addr).is_some_and(|i| i.is_available(now)))
                .count(),
            "bounds": last.map(|d| d.bounds).unwrap_or(config.bounds),
            "sync_period_secs": config.sync_period.as_secs_f64(),
            "signals": last.map(|d| d.metrics.clone()).unwrap_or_default(),
            "instances": provider.status(upstream, now),
            "decisions": state.decisions,
            "scale_events": state.scale_events,
        });
        *self.handle.status.lock().expect("autoscale status lock") = status;
    }
}

/// Where a member stands in its upstream at a sample tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Passing its checks, not draining.
    Serving,
    /// Out of rotation by an active or passive check.
    TakenOut,
    /// Draining, or not (or no longer) in the upstream.
    Leaving,
}

/// Keeps `joined`, when each member first served, up to date at a sample tick. A member a
/// check takes out after it joined keeps its place, as HPA counts a pod that was ready once:
/// an overloaded pool's instances time out and are taken out, and leaving their load out kept
/// such a pool from growing. One leaving is dropped.
fn track_joined(
    joined: &mut HashMap<SocketAddr, Instant>,
    standings: impl Iterator<Item = (SocketAddr, Standing)>,
    now: Instant,
) {
    let standings: HashMap<SocketAddr, Standing> = standings.collect();
    joined.retain(|addr, _| standings.get(addr).is_some_and(|s| *s != Standing::Leaving));
    for (addr, standing) in standings {
        if standing == Standing::Serving {
            joined.entry(addr).or_insert(now);
        }
    }
}

/// Whether a member counts as ready at a sync: past its startup grace, and joined (see
/// [`track_joined`]) for the whole sync period (give or take one sample tick). One that joined
/// during the period counts as still starting (at 0 when scaling up), as HPA treats a pod that
/// only just became ready: its average, and the others' from before it took a share of the
/// load, would otherwise add up to more load than there is.
fn is_ready(
    now: Instant,
    started: Instant,
    joined: Option<Instant>,
    grace: Duration,
    period: Duration,
) -> bool {
    now.saturating_duration_since(started) >= grace
        && joined
            .is_some_and(|joined| now.saturating_duration_since(joined) + SAMPLE_EVERY >= period)
}

fn push_bounded(list: &mut VecDeque<Value>, value: Value) {
    if list.len() == KEEP_DECISIONS {
        list.pop_front();
    }
    list.push_back(value);
}

/// The count a pin of `n` runs at within `bounds`, and why: a reload or schedule may have moved
/// the bounds past the pin since it was set.
fn pinned(n: u32, bounds: Bounds) -> (u32, &'static str) {
    let held = n.clamp(bounds.min, bounds.max);
    let reason = if held == n {
        "pinned by the operator"
    } else {
        "pinned by the operator, held within the bounds in force"
    };
    (held, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_outside_the_bounds_in_force_runs_within_them_and_says_so() {
        let bounds = Bounds { min: 1, max: 2 };
        assert_eq!(pinned(2, bounds), (2, "pinned by the operator"));
        assert_eq!(
            pinned(6, bounds),
            (2, "pinned by the operator, held within the bounds in force")
        );
    }

    #[test]
    fn an_instance_is_ready_once_it_served_a_whole_period() {
        let (grace, period) = (Duration::from_secs(5), Duration::from_secs(2));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // Started at 0, serving from 6 s: ready at 8 s less one tick, not before.
        assert!(!is_ready(at(7_000), t0, Some(at(6_000)), grace, period));
        assert!(is_ready(at(7_750), t0, Some(at(6_000)), grace, period));
        // Serving for long, but still within its grace; or not serving at all.
        assert!(!is_ready(at(4_000), t0, Some(at(1_000)), grace, period));
        assert!(!is_ready(at(60_000), t0, None, grace, period));
    }

    #[test]
    fn a_member_taken_out_after_it_joined_keeps_counting() {
        let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            "127.0.0.1:3".parse().unwrap(),
        );
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        let mut joined = HashMap::new();
        let tick = |joined: &mut HashMap<_, _>, at, standings: &[(SocketAddr, Standing)]| {
            track_joined(joined, standings.iter().copied(), at);
        };
        // `a` serves; `b` has never passed a check: not joined.
        tick(
            &mut joined,
            t0,
            &[(a, Standing::Serving), (b, Standing::TakenOut)],
        );
        assert_eq!(joined, HashMap::from([(a, t0)]));
        // Taken out (timing out under load), `a` keeps its place and its time; `b` joins.
        tick(
            &mut joined,
            later,
            &[(a, Standing::TakenOut), (b, Standing::Serving)],
        );
        assert_eq!(joined, HashMap::from([(a, t0), (b, later)]));
        // Draining, or gone from the members: dropped.
        tick(
            &mut joined,
            later,
            &[(a, Standing::Leaving), (c, Standing::Serving)],
        );
        assert_eq!(joined, HashMap::from([(c, later)]));
    }
}
