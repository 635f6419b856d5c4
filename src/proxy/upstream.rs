//! Live state of upstreams and their instances: the lock-free counters the balancer reads,
//! the health flags, the keep-alive connection pool, and the RAII in-flight guard.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use smallvec::SmallVec;
use tokio::time::Instant;

use super::connect::{ConnectError, Connector};
use super::h1::InstanceConn;
use super::h2::Http2Connections;
use super::pipeline::Lines;
use super::retry::RetryBudget;
use super::Gateway;
use crate::balance::{self, Candidate, Layout, PickInput, Strategy};
use crate::clock::{ticks_ms, ticks_ns};
use crate::config::{InstanceConfig, UpstreamConfig};
use crate::health::{HealthState, PassiveState, Transition};

/// Time constant of the peak-EWMA latency average.
const EWMA_TAU: Duration = Duration::from_secs(10);
/// How fast an instance's latency goes stale once it gets no answers: the balancer draws it
/// toward the pool's with this time constant since its last sample, so an instance passed over
/// after one slow answer is tried again within seconds (under the 10 s of `EWMA_TAU` a spike
/// kept it out for half a minute while the others answered).
const STALE_TAU: Duration = Duration::from_secs(1);

/// The result of the last active check, for `/health/detailed`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub detail: String,
    pub at_unix_ms: u64,
}

/// How an instance joined its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// Listed in the config the gateway started with: serves at once, at full weight.
    AtStart,
    /// New in a reloaded config: like one added at run time, it must pass an active check
    /// (when configured) before it serves, and ramps under slow start; unless the reload left
    /// its upstream nothing else to serve with ([`Upstream::new`]).
    ByReload,
    /// Added at run time (admin API or autoscaler); kept across reloads.
    AtRunTime,
}

/// One instance of an upstream.
pub struct Instance {
    pub addr: SocketAddr,
    pub addr_text: String,
    pub weight: u32,
    pub backup: bool,
    /// Added at run time (admin API or autoscaler), kept across config reloads; also a
    /// configured one a reload dropped whose drain the admin API called off.
    dynamic: AtomicBool,
    /// Shared with the instance a reload rebuilds at this address.
    pub counters: Arc<InstanceCounters>,
    active_up: AtomicBool,
    active: Mutex<HealthState>,
    passive: Mutex<PassiveState>,
    passive_down_until: AtomicU64,
    /// `SERVING`, `DRAINING` (no new requests; the drain may still be cancelled) or
    /// `REMOVING` (the drain is taking it out of the set).
    drain_state: AtomicU8,
    /// Counts the drains started: a drain called off and started again within one of the
    /// first one's polls leaves the first to end quietly, the new one keeping its whole
    /// `drain_timeout`.
    drains: AtomicU64,
    /// When the instance last came up after being down; 0 = up from the start (no slow start).
    up_since: AtomicU64,
    pub last_check: Mutex<Option<CheckReport>>,
    pub pool: Pool,
}

/// What is counted of an instance's requests. A reload that rebuilds an instance (new weight,
/// role or connection settings) shares them with the new one: requests still in flight on the
/// old one go on counting where scrapes, the balancer and the autoscaler read, so counters only
/// grow and the in-flight gauge stays true.
#[derive(Debug, Default)]
pub struct InstanceCounters {
    pub in_flight: AtomicU32,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    /// Times health checks (active or passive) took the instance out of rotation.
    pub ejections: AtomicU64,
    /// Failed attempts on this instance that were retried on another.
    pub retries: AtomicU64,
    /// Requests written to the instance that went to it again on a new connection, with no
    /// answer from it: a kept-alive connection it had closed, a pipelined line that broke or
    /// whose answer ahead streamed too long. Body-less idempotent ones only; the instance may
    /// have run them twice, which `retries` and the access log's `attempts` leave out.
    pub resends: AtomicU64,
    /// Answers whose body the instance broke off after their head went to the client (closed,
    /// reset, stalled or malformed): the client got a cut answer under a 2xx in the access log.
    pub broken_answers: AtomicU64,
    /// Answer heads the instance sent, by status class (1xx … 5xx; interim ones not counted):
    /// a stats page's `hrsp_5xx`, which `failures` leaves out unless `fail_on_status` lists it.
    pub answers: [AtomicU64; 5],
    latency_bits: AtomicU64,
    latency_stamp: AtomicU64,
}

/// What a 5xx answer counts as for an instance with no latency average yet.
const UNPROVEN_FAILURE: Duration = Duration::from_millis(100);

/// A pooled connection found closed within this of its answer was closed for that answer, not
/// for idling (idle timeouts of servers are seconds long).
const CLOSED_SOON: Duration = Duration::from_millis(100);

/// How long an instance found closing connections after uploads keeps them out of the pool.
const UPLOAD_LESSON: Duration = Duration::from_secs(60);

const SERVING: u8 = 0;
const DRAINING: u8 = 1;
const REMOVING: u8 = 2;

impl Instance {
    pub fn new(config: &InstanceConfig, upstream: &UpstreamConfig, joined: Joined) -> Instance {
        let dynamic = joined == Joined::AtRunTime;
        // Instances joining a serving upstream must pass their active checks before they serve.
        let starts_up = joined == Joined::AtStart || upstream.health.is_none();
        Instance {
            addr: config.addr,
            addr_text: config.addr.to_string(),
            weight: config.weight,
            backup: config.backup,
            dynamic: AtomicBool::new(dynamic),
            counters: Arc::default(),
            active_up: AtomicBool::new(starts_up),
            active: Mutex::new(match &upstream.health {
                Some(checks) if !starts_up => HealthState::joining(checks.rise),
                _ => HealthState::new(true),
            }),
            passive: Mutex::new(PassiveState::default()),
            passive_down_until: AtomicU64::new(0),
            drain_state: AtomicU8::new(SERVING),
            drains: AtomicU64::new(0),
            up_since: AtomicU64::new(if joined == Joined::AtStart {
                0
            } else {
                ticks_ns(Instant::now())
            }),
            last_check: Mutex::new(None),
            pool: Pool::new(config.addr, upstream),
        }
    }

    /// Healthy by active and passive checks at `now` (draining is separate).
    pub fn is_available(&self, now: Instant) -> bool {
        // Zero: never taken out, which spares reading the clock as nanoseconds per pick.
        let down_until = self.passive_down_until.load(Ordering::Relaxed);
        self.active_up.load(Ordering::Relaxed) && (down_until == 0 || down_until <= ticks_ns(now))
    }

    /// Whether a pick at `now` may take it: serving, and up by both kinds of checks, or by
    /// active checks alone while `passive_ignored` (every instance is out).
    fn pickable(&self, now: Instant, passive_ignored: bool) -> bool {
        let up = if passive_ignored {
            self.passes_active_checks()
        } else {
            self.is_available(now)
        };
        up && !self.is_draining()
    }

    /// Up by active checks (or has none), whatever passive checks say.
    pub fn passes_active_checks(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.drain_state.load(Ordering::Relaxed) != SERVING
    }

    /// Marks the instance draining; returns whether it already was.
    pub fn start_draining(&self) -> bool {
        self.drain_state
            .compare_exchange(SERVING, DRAINING, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    }

    /// Added at run time, or made so: kept across reloads.
    pub fn is_dynamic(&self) -> bool {
        self.dynamic.load(Ordering::Relaxed)
    }

    /// From now on kept across reloads as one added at run time.
    pub fn make_dynamic(&self) {
        self.dynamic.store(true, Ordering::Relaxed);
    }

    /// Puts a draining instance back in rotation, its drain then ending without removing it;
    /// false when it is not draining or its drain is already taking it out.
    pub fn stop_draining(&self) -> bool {
        self.drain_state
            .compare_exchange(DRAINING, SERVING, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    pub fn state_name(&self, now: Instant) -> &'static str {
        if self.is_draining() {
            "draining"
        } else if !self.passes_active_checks() {
            "down"
        } else if !self.is_available(now) {
            "failed"
        } else {
            "up"
        }
    }

    pub fn latency(&self) -> Duration {
        Duration::from_nanos(
            f64::from_bits(self.counters.latency_bits.load(Ordering::Relaxed)) as u64,
        )
    }

    /// Folds one response-header latency into the peak-EWMA. Concurrent updates may lose one
    /// sample; the average does not need to be exact, only cheap.
    /// A 5xx answer (`server_error`) never lowers the average: an instance that fails fast (its
    /// database gone, say) must not look fast to `p2c_ewma` and `random_two` and draw requests.
    pub fn observe_latency(&self, sample: Duration, now: Instant, server_error: bool) {
        let now_ns = ticks_ns(now);
        let previous = f64::from_bits(self.counters.latency_bits.load(Ordering::Relaxed));
        let elapsed = Duration::from_nanos(
            now_ns.saturating_sub(self.counters.latency_stamp.load(Ordering::Relaxed)),
        );
        let sample = sample.as_nanos() as f64;
        let sample = match (server_error, previous > 0.0) {
            (true, true) => sample.max(previous),
            // No average yet (a new instance whose first answers are instant 500s): an
            // assumed, unremarkable latency rather than the fastest in the pool.
            (true, false) => sample.max(UNPROVEN_FAILURE.as_nanos() as f64),
            (false, _) => sample,
        };
        let next = balance::peak_ewma(previous, elapsed, sample, EWMA_TAU);
        self.counters
            .latency_bits
            .store(next.to_bits(), Ordering::Relaxed);
        self.counters.latency_stamp.store(now_ns, Ordering::Relaxed);
    }

    /// Records a failed request (transport error or timeout) for passive health.
    #[cold]
    pub fn record_failure(&self, now: Instant, upstream: &UpstreamConfig) {
        self.record_failure_of(now, upstream, false);
    }

    /// [`Instance::record_failure`] for an answer `fail_on_status` lists: an ejection it causes
    /// lasts `fail_timeout`, whatever the active checks say.
    pub fn record_failed_answer(&self, now: Instant, upstream: &UpstreamConfig) {
        self.record_failure_of(now, upstream, true);
    }

    fn record_failure_of(&self, now: Instant, upstream: &UpstreamConfig, answer: bool) {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        let mut passive = self.passive.lock().expect("passive state lock");
        let out = !self.is_available(now);
        let until = passive.record_failure(
            now,
            out,
            upstream.passive.max_fails,
            upstream.passive.fail_timeout,
        );
        if let Some(until) = until {
            passive.ejected_for(answer);
            // Under the lock, as a success ending an ejection stores too.
            self.passive_down_until
                .store(ticks_ns(until), Ordering::Relaxed);
            drop(passive);
            self.counters.ejections.fetch_add(1, Ordering::Relaxed);
            self.pool.forget_pace();
            tracing::warn!(
                upstream = %upstream.name,
                instance = %self.addr,
                for_secs = upstream.passive.fail_timeout.as_secs_f64(),
                "instance failed {} time(s): taken out of rotation",
                upstream.passive.max_fails
            );
        }
    }

    /// Records a valid answer to a request sent at `sent`: one from an instance out by passive
    /// checks (its trial, or any answer while every instance was out and all were tried) puts
    /// it back in rotation, ramping under slow start.
    #[inline]
    pub fn record_success(&self, sent: Instant) {
        if self.passive_down_until.load(Ordering::Relaxed) != 0 {
            self.back_from_ejection(sent);
        }
    }

    #[cold]
    fn back_from_ejection(&self, sent: Instant) {
        // The stores happen under the lock: a failure ejecting it again meanwhile must not be
        // overwritten.
        let mut passive = self.passive.lock().expect("passive state lock");
        if !passive.record_success(sent) {
            return;
        }
        self.up_since
            .store(ticks_ns(Instant::now()), Ordering::Relaxed);
        self.passive_down_until.store(0, Ordering::Relaxed);
        drop(passive);
        tracing::info!(instance = %self.addr, "instance answered again: back in rotation");
    }

    /// Claims the one request an instance whose passive ejection ran out gets before it is back
    /// (nginx lets one through per `fail_timeout`); false when another request holds it. An
    /// instance never taken out needs no claim.
    fn claim_trial(&self, now: Instant, fail_timeout: Duration) -> bool {
        let down_until = self.passive_down_until.load(Ordering::Relaxed);
        // Another request's claim pushed the time out forward: it holds the trial.
        down_until == 0
            || (down_until <= ticks_ns(now)
                && self
                    .passive_down_until
                    .compare_exchange(
                        down_until,
                        ticks_ns(now + fail_timeout),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok())
    }

    /// Records an active check result; logs and applies a change of verdict.
    pub fn record_check(&self, ok: bool, detail: String, rise: u32, fall: u32, now: Instant) {
        // Held while the verdict is applied: two checks ending together (one started when the
        // instance was added, one of the regular round) apply theirs in the order they counted.
        let mut active = self.active.lock().expect("health state lock");
        let transition = active.observe(ok, rise, fall);
        *self.last_check.lock().expect("last check lock") = Some(CheckReport {
            ok,
            detail,
            at_unix_ms: crate::clock::unix_ms_now(),
        });
        match transition {
            Some(came @ (Transition::CameUp | Transition::WentUp)) => {
                if came == Transition::CameUp {
                    tracing::info!(instance = %self.addr, "instance passed its checks: in rotation");
                } else {
                    tracing::info!(instance = %self.addr, "instance is healthy again");
                }
                self.up_since.store(ticks_ns(now), Ordering::Relaxed);
                // Healthy by active checks: a passive ejection ends as well.
                let mut passive = self.passive.lock().expect("passive state lock");
                *passive = PassiveState::default();
                self.passive_down_until.store(0, Ordering::Relaxed);
                drop(passive);
                self.active_up.store(true, Ordering::Relaxed);
            }
            Some(Transition::WentDown) => {
                self.counters.ejections.fetch_add(1, Ordering::Relaxed);
                self.pool.forget_pace();
                tracing::warn!(instance = %self.addr, "instance failed its health checks");
                self.active_up.store(false, Ordering::Relaxed);
            }
            None => self.end_ejection_by_checks(ok, rise, now),
        }
        drop(active);
    }

    /// A passive ejection the active checks never saw (the instance restarted between two of
    /// them) ends once `rise` of them passed since: [`PassiveState::record_check`].
    fn end_ejection_by_checks(&self, ok: bool, rise: u32, now: Instant) {
        let mut passive = self.passive.lock().expect("passive state lock");
        if !passive.record_check(ok, rise) {
            return;
        }
        self.up_since.store(ticks_ns(now), Ordering::Relaxed);
        self.passive_down_until.store(0, Ordering::Relaxed);
        drop(passive);
        tracing::info!(instance = %self.addr, "instance passed its checks: back in rotation");
    }

    pub fn health_counts(&self) -> HealthState {
        *self.active.lock().expect("health state lock")
    }

    /// The slow-start factor: the instance ramps after it came up by active checks, joined,
    /// or came back from a passive ejection.
    fn ramp(&self, now: Instant, slow_start: Duration) -> f64 {
        if slow_start.is_zero() {
            return 1.0;
        }
        let since = self
            .up_since
            .load(Ordering::Relaxed)
            .max(self.passive_down_until.load(Ordering::Relaxed));
        if since == 0 {
            return 1.0;
        }
        balance::ramp_factor(
            Duration::from_nanos(ticks_ns(now).saturating_sub(since)),
            slow_start,
        )
    }

    /// What the balancer needs of the instance. `latency_aware`: the latency, and how fresh it
    /// is (decaying with `STALE_TAU` since its last sample): the balancer draws a stale one
    /// toward the pool's, so that an instance that stopped getting requests after one slow
    /// answer is tried again. (Finagle's and tower's peak-EWMA decay it toward zero, which
    /// made whichever instance answered least recently, as a low weight makes it, the fastest.)
    fn candidate(
        &self,
        index: usize,
        now: Instant,
        slow_start: Duration,
        latency_aware: bool,
    ) -> Candidate {
        let (latency_ns, freshness) = if latency_aware {
            let stamp = self.counters.latency_stamp.load(Ordering::Relaxed);
            let latency = f64::from_bits(self.counters.latency_bits.load(Ordering::Relaxed));
            let since = ticks_ns(now).saturating_sub(stamp) as f64;
            let fresh = if stamp == 0 {
                0.0
            } else {
                (-since / STALE_TAU.as_nanos() as f64).exp()
            };
            (latency, fresh)
        } else {
            (0.0, 0.0)
        };
        Candidate {
            index,
            in_flight: self.counters.in_flight.load(Ordering::Relaxed),
            latency_ns,
            freshness,
            weight: self.weight,
            ramp: self.ramp(now, slow_start),
        }
    }

    /// Takes the active-check verdict of `old` (same address, rebuilt for new pool settings)
    /// and shares its counters ([`InstanceCounters`]).
    fn carry_from(&mut self, old: &Instance) {
        self.counters = Arc::clone(&old.counters);
        *self.last_check.lock().expect("last check lock") =
            old.last_check.lock().expect("last check lock").clone();
        *self.active.lock().expect("health state lock") = old.health_counts();
        let up = old.active_up.load(Ordering::Relaxed);
        self.active_up.store(up, Ordering::Relaxed);
        let since = old.up_since.load(Ordering::Relaxed);
        self.up_since.store(since, Ordering::Relaxed);
    }

    /// Serves before any check of it ran, as an instance listed at start does.
    fn serve_unchecked(&self) {
        let checked = self.last_check.lock().expect("last check lock").is_some();
        if !checked && !self.active_up.load(Ordering::Relaxed) {
            *self.active.lock().expect("health state lock") = HealthState::new(true);
            self.active_up.store(true, Ordering::Relaxed);
        }
    }

    /// Active checks were removed from the config: their last verdict no longer applies.
    fn forget_active_checks(&self) {
        *self.active.lock().expect("health state lock") = HealthState::new(true);
        self.active_up.store(true, Ordering::Relaxed);
        // Shown beside "up" by the admin API, a last failed check read as a contradiction.
        *self.last_check.lock().expect("last check lock") = None;
    }
}

/// Counts a request as in flight on an instance until dropped (held by the response body, so
/// streaming responses count until their last byte).
pub struct InFlightGuard {
    pub instance: Arc<Instance>,
}

impl InFlightGuard {
    pub fn enter(instance: Arc<Instance>) -> InFlightGuard {
        instance.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        instance.counters.requests.fetch_add(1, Ordering::Relaxed);
        InFlightGuard { instance }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.instance
            .counters
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The instances of an upstream at one moment; replaced whole (copy on write) when instances
/// are added or removed, so the request path reads it without locks.
#[derive(Default)]
pub struct InstanceSet {
    pub instances: Vec<Arc<Instance>>,
    /// The strategy's ring or schedule for these instances.
    pub layout: Layout,
}

impl InstanceSet {
    pub fn new(instances: Vec<Arc<Instance>>, strategy: &Strategy) -> InstanceSet {
        let described: Vec<(&str, u32, bool)> = instances
            .iter()
            .map(|i| (i.addr_text.as_str(), i.weight, !i.backup))
            .collect();
        let layout = Layout::new(strategy, &described);
        InstanceSet { instances, layout }
    }

    /// Whether a pick at `now` could find an instance not in `tried`, as [`Upstream::pick`]
    /// lists them: an available one (up by both kinds of checks), or, only when none is
    /// available at all, one up by active checks (every instance out by passive checks alone
    /// is tried then). Asked before a retry spends from the budget, which it would spend for
    /// nothing.
    pub fn any_left(&self, tried: &[usize], now: Instant) -> bool {
        let panic = !self.instances.iter().any(|i| i.pickable(now, false));
        self.instances
            .iter()
            .enumerate()
            .any(|(index, i)| !tried.contains(&index) && i.pickable(now, panic))
    }
}

/// Why no instance could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoInstance {
    /// Nothing is healthy: 503.
    NoneHealthy,
    /// Healthy instances exist but every one was already tried: 502.
    AllTried,
}

/// An upstream: its settings, its instance set and its balancing and retry state.
pub struct Upstream {
    pub config: UpstreamConfig,
    pub set: ArcSwap<InstanceSet>,
    seq: AtomicU64,
    pub retry_budget: RetryBudget,
    /// A reload replaced this upstream; its active checker stops (requests still holding it
    /// must not keep a second checker probing the instances the new one shares).
    retired: AtomicBool,
    /// The upstream of the same name that replaced it: a request that waited across the reload
    /// (a rate limit's delay, a queue, Redis) is sent to the instances in force, not to one the
    /// reload took out.
    successor: ArcSwapOption<Upstream>,
}

impl Upstream {
    /// Builds the upstream, reusing live instances from `previous` (same address, weight, role
    /// and pool settings) so health, counters and pooled connections survive a reload. An
    /// instance whose settings changed is rebuilt with its active-check verdict and counters (a
    /// passive ejection starts afresh); instances added at run time (admin API, autoscaler)
    /// are kept whatever changed, and one the new config lists becomes the config's (a later
    /// reload that drops it from the file removes it).
    pub fn new(config: UpstreamConfig, previous: Option<&Upstream>) -> Upstream {
        let old: Vec<Arc<Instance>> = previous
            .map(|p| p.set.load().instances.clone())
            .unwrap_or_default();
        let same_pool = previous.is_some_and(|p| p.config.same_pool(&config));
        let carried = |ic: &InstanceConfig, joined: Joined| {
            // A configured instance being drained comes back: the reload says it belongs. Its
            // drain is cancelled (as the admin API's undrain does), so it keeps its counters
            // and its requests in flight stay in its gauge. One whose drain is already
            // removing it comes back fresh.
            let before = old
                .iter()
                .find(|i| i.addr == ic.addr && !i.is_draining())
                .or_else(|| old.iter().find(|i| i.addr == ic.addr && i.stop_draining()));
            match before {
                Some(i)
                    if same_pool
                        && i.weight == ic.weight
                        && i.backup == ic.backup
                        && i.is_dynamic() == (joined == Joined::AtRunTime) =>
                {
                    i.clone()
                }
                Some(i) => {
                    let mut rebuilt = Instance::new(ic, &config, joined);
                    rebuilt.carry_from(i);
                    Arc::new(rebuilt)
                }
                None => Arc::new(Instance::new(ic, &config, joined)),
            }
        };
        let joined = if previous.is_some() {
            Joined::ByReload
        } else {
            Joined::AtStart
        };
        let mut instances: Vec<Arc<Instance>> = config
            .instances
            .iter()
            .map(|ic| carried(ic, joined))
            .collect();
        for dynamic in old.iter().filter(|i| i.is_dynamic() && !i.is_draining()) {
            if !instances.iter().any(|i| i.addr == dynamic.addr) {
                let ic = InstanceConfig {
                    addr: dynamic.addr,
                    weight: dynamic.weight,
                    backup: dynamic.backup,
                };
                instances.push(carried(&ic, Joined::AtRunTime));
            }
        }
        // An instance being drained stays, still draining, until its drain removes it (from
        // the upstream in force then): its in-flight requests stay in view, and the admin API
        // can still cancel the drain. One the reload configures afresh is already back.
        for draining in old.iter().filter(|i| i.is_draining()) {
            if !instances.iter().any(|i| i.addr == draining.addr) {
                instances.push(draining.clone());
            }
        }
        if config.health.is_none() {
            for instance in &instances {
                instance.forget_active_checks();
            }
        }
        // A reload that replaces every instance that served (A swapped for B) would leave
        // nothing to serve with until a check passed: the new ones then serve at once, as they
        // would at start and as nginx and HAProxy take new servers; checks take out any that
        // is not up.
        let now = Instant::now();
        let serving =
            |set: &[Arc<Instance>]| set.iter().any(|i| i.is_available(now) && !i.is_draining());
        if serving(&old) && !serving(&instances) {
            for instance in &instances {
                instance.serve_unchecked();
            }
        }
        let set = InstanceSet::new(instances, &config.strategy);
        Upstream {
            retry_budget: match previous {
                Some(previous) => RetryBudget::carried(config.retry_budget, &previous.retry_budget),
                None => RetryBudget::new(config.retry_budget),
            },
            set: ArcSwap::from_pointee(set),
            // Round robin goes on where it was: restarted at the first instance, a pool
            // reloaded more often than it cycles left its last instances without requests.
            seq: AtomicU64::new(previous.map_or(0, |p| p.seq.load(Ordering::Relaxed))),
            retired: AtomicBool::new(false),
            successor: ArcSwapOption::empty(),
            config,
        }
    }

    /// Replaced by a reload, by `successor` when the new config has an upstream of this name.
    pub fn retire(&self, successor: Option<Arc<Upstream>>) {
        self.successor.store(successor);
        self.retired.store(true, Ordering::Relaxed);
    }

    /// The upstream in force under this one's name: itself, or what reloads replaced it with
    /// (itself when a reload removed the name).
    pub fn in_force(self: &Arc<Self>) -> Arc<Upstream> {
        let mut upstream = Arc::clone(self);
        while upstream.is_retired() {
            match upstream.successor.load_full() {
                Some(next) => upstream = next,
                None => break,
            }
        }
        upstream
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// The sequence number of a new request, for round robin and tie rotation. Drawn once per
    /// request: were retries to draw too, with two instances and one dead every request would
    /// meet the dead one first.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Chooses an instance for one attempt, skipping the positions in `tried`. Backups serve
    /// only when no primary is available or every available one was tried for this request.
    /// When none is available, those out by passive checks alone (not failing active checks)
    /// are used anyway rather than refusing every request: nginx ignores `max_fails` for a lone
    /// server, and Envoy's panic routing does the same for a whole pool. One failure must not
    /// stop a one-instance upstream for `fail_timeout`.
    pub fn pick(
        &self,
        set: &InstanceSet,
        tried: &[usize],
        hash: Option<u64>,
        seq: u64,
        now: Instant,
    ) -> Result<(usize, Arc<Instance>), NoInstance> {
        let slow_start = self.config.slow_start;
        let latency_aware = matches!(
            self.config.strategy,
            Strategy::RandomTwo | Strategy::P2cEwma
        );
        let mut candidates: SmallVec<[Candidate; 16]> = SmallVec::new();
        let mut any_healthy = false;
        let mut panic = false;
        'tiers: for passive_ignored in [false, true] {
            panic = passive_ignored;
            // Backups take over once every available primary was tried for this request too.
            for backup_tier in [false, true] {
                for (index, instance) in set.instances.iter().enumerate() {
                    if instance.backup != backup_tier || !instance.pickable(now, passive_ignored) {
                        continue;
                    }
                    any_healthy = true;
                    if tried.contains(&index) {
                        continue;
                    }
                    candidates.push(instance.candidate(index, now, slow_start, latency_aware));
                }
                if !candidates.is_empty() {
                    break 'tiers;
                }
            }
            if any_healthy {
                break;
            }
        }
        let input = PickInput {
            seq,
            random: rand::random(),
            hash,
        };
        let fail_timeout = self.config.passive.fail_timeout;
        let mut held_by_trial = None;
        loop {
            let Some(index) =
                balance::pick_instance(&self.config.strategy, &candidates, input, &set.layout)
            else {
                // Only instances whose trial another request claimed after they were listed
                // were left. Listed again they are out, and a backup (or a primary another
                // request put back) takes the request; when none does, one of them is tried
                // anyway, as when every instance is out. Each claim lost puts one more
                // instance out, so the listing is redone once per instance at most.
                if let Some(index) = held_by_trial {
                    let relisted = self.pick(set, tried, hash, seq, now);
                    return Ok(relisted.unwrap_or_else(|_| (index, set.instances[index].clone())));
                }
                return Err(if any_healthy {
                    NoInstance::AllTried
                } else {
                    NoInstance::NoneHealthy
                });
            };
            let instance = &set.instances[index];
            // While every instance is out, any may be tried; otherwise one whose ejection ran
            // out takes one request at a time until it answers.
            if panic || instance.claim_trial(now, fail_timeout) {
                return Ok((index, instance.clone()));
            }
            held_by_trial = Some(index);
            candidates.retain(|c| c.index != index);
        }
    }

    /// Adds an instance at run time; returns false if the address is already present.
    pub fn add_instance(&self, config: &InstanceConfig) -> bool {
        let mut added = false;
        self.set.rcu(|set| {
            if set.instances.iter().any(|i| i.addr == config.addr) {
                added = false;
                return Arc::clone(set);
            }
            added = true;
            let mut instances = set.instances.clone();
            instances.push(Arc::new(Instance::new(
                config,
                &self.config,
                Joined::AtRunTime,
            )));
            Arc::new(InstanceSet::new(instances, &self.config.strategy))
        });
        added
    }

    /// Removes an instance from the set (in-flight requests keep their own reference); one
    /// that has replaced it at the same address stays.
    pub fn remove_instance(&self, instance: &Arc<Instance>) {
        self.set.rcu(|set| {
            let instances = set
                .instances
                .iter()
                .filter(|i| !Arc::ptr_eq(i, instance))
                .cloned()
                .collect();
            Arc::new(InstanceSet::new(instances, &self.config.strategy))
        });
    }

    /// Takes `instance` out of rotation, waits until its in-flight requests finished (at most
    /// `timeout`), then removes it from the set, and from the upstream that replaced this one
    /// if a reload came meanwhile (it carries draining instances over). Shared by the admin
    /// API and the autoscaler.
    pub async fn drain(&self, gateway: &Gateway, instance: &Arc<Instance>, timeout: Duration) {
        // The admin API may have marked it already.
        let _ = instance.start_draining();
        let drain = instance.drains.fetch_add(1, Ordering::Relaxed) + 1;
        let superseded = || instance.drains.load(Ordering::Relaxed) != drain;
        let deadline = Instant::now() + timeout;
        let in_flight = || instance.counters.in_flight.load(Ordering::Relaxed);
        let wait_idle = || async {
            while in_flight() > 0
                && Instant::now() < deadline
                && instance.is_draining()
                && !superseded()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        wait_idle().await;
        if superseded() {
            return;
        }
        let (name, addr) = (&self.config.name, instance.addr);
        // From here on the drain cannot be cancelled (nor run twice): it removes the instance.
        let removing = instance.drain_state.compare_exchange(
            DRAINING,
            REMOVING,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if removing.is_err() {
            tracing::info!(upstream = %name, instance = %addr, "drain cancelled: instance back in rotation");
            return;
        }
        {
            // Serialized with reloads, so none builds its sets from one still holding it.
            let _serialized = gateway.hold_reloads().await;
            self.remove_instance(instance);
            if let Some(current) = gateway.upstream(name) {
                current.remove_instance(instance);
            }
        }
        // A request that picked the instance just before it was marked draining counts itself
        // in flight a moment later: give it that moment, then wait for it as well.
        tokio::time::sleep(Duration::from_millis(50)).await;
        wait_idle().await;
        match in_flight() {
            0 => tracing::info!(upstream = %name, instance = %addr, "drained instance removed"),
            left => tracing::warn!(
                upstream = %name,
                instance = %addr,
                in_flight = left,
                "drain_timeout ran out: instance removed with requests or WebSocket tunnels still open (they go on to their end)"
            ),
        }
    }

    pub fn find(&self, addr: SocketAddr) -> Option<Arc<Instance>> {
        self.set
            .load()
            .instances
            .iter()
            .find(|i| i.addr == addr)
            .cloned()
    }
}

impl UpstreamConfig {
    /// Connections made under `other` would be the same as under this config.
    fn same_pool(&self, other: &UpstreamConfig) -> bool {
        (
            self.keepalive,
            self.keepalive_requests,
            self.pipeline,
            self.connect_timeout,
            self.idle_timeout,
            self.protocol,
        ) == (
            other.keepalive,
            other.keepalive_requests,
            other.pipeline,
            other.connect_timeout,
            other.idle_timeout,
            other.protocol,
        ) && self.tls.as_ref().map(|tls| (&tls.source, &tls.server_name))
            == other
                .tls
                .as_ref()
                .map(|tls| (&tls.source, &tls.server_name))
    }
}

struct IdleConn {
    conn: Box<InstanceConn>,
    since: Instant,
}

/// Connections to one instance. For HTTP/1.1, idle keep-alive connections used last-in
/// first-out as nginx's keepalive cache does: the busiest few stay warm and the surplus ages out
/// at the bottom (a short uncontended mutex around a push or pop; a lock-free stack of owned
/// values would need unsafe code, which this crate forbids). For HTTP/2, one shared connection.
pub struct Pool {
    pub(crate) connector: Connector,
    idle: Mutex<VecDeque<IdleConn>>,
    keepalive: usize,
    /// Requests a connection carries before it is closed instead of pooled.
    keepalive_requests: u64,
    idle_timeout: Duration,
    /// Set for h2 and h2c upstreams (which then keep no idle HTTP/1.1 connections).
    pub(crate) http2: Option<Http2Connections>,
    /// Set when the upstream pipelines (`pipeline` above 1).
    pub(crate) lines: Option<Lines>,
    /// Which uploads leave connections the instance closes ([`UploadLesson`]).
    upload_lesson: UploadLesson,
}

/// What a pool learned of an instance that closes connections after answers to uploads it did
/// not read whole (hyper does; nginx and Go servers read the rest): connections that uploaded
/// as much as one found closed soon after its answer are not pooled, for [`UPLOAD_LESSON`]
/// from the last such close. Their next request would meet the close, and a POST could not go
/// again. An instance restarting under uploads looks the same, which is why the lesson ends.
/// (Hyper closes after some uploads of a size and not others: one answered after proves
/// nothing.) Atomics, read at every check-in.
struct UploadLesson {
    /// The smallest such upload (`u64::MAX`: none).
    smallest: AtomicU64,
    /// When the lesson runs out ([`ticks_ms`]).
    ends_ms: AtomicU64,
}

impl UploadLesson {
    fn new() -> UploadLesson {
        UploadLesson {
            smallest: AtomicU64::new(u64::MAX),
            ends_ms: AtomicU64::new(0),
        }
    }

    /// An upload of `bytes` was followed by the instance's close, found at `now`; true when
    /// that taught something new (a lesson begun, or a smaller size).
    fn learn(&self, bytes: u64, now: Instant) -> bool {
        let now_ms = ticks_ms(now);
        let current = self.ends_ms.load(Ordering::Relaxed) > now_ms;
        let before = if current {
            self.smallest.fetch_min(bytes, Ordering::Relaxed)
        } else {
            self.smallest.swap(bytes, Ordering::Relaxed)
        };
        let lesson = UPLOAD_LESSON.as_millis() as u64;
        self.ends_ms.fetch_max(now_ms + lesson, Ordering::Relaxed);
        !current || bytes < before
    }

    /// Whether a connection that uploaded `bytes` is not to be pooled at `now`.
    fn keeps_out(&self, bytes: u64, now: Instant) -> bool {
        bytes >= self.smallest.load(Ordering::Relaxed)
            && self.ends_ms.load(Ordering::Relaxed) > ticks_ms(now)
    }
}

impl Pool {
    fn new(addr: SocketAddr, upstream: &UpstreamConfig) -> Pool {
        let http2 = upstream.protocol.is_http2();
        Pool {
            connector: Connector::new(addr, upstream),
            idle: Mutex::new(VecDeque::new()),
            keepalive: if http2 { 0 } else { upstream.keepalive },
            keepalive_requests: upstream.keepalive_requests,
            idle_timeout: upstream.idle_timeout,
            upload_lesson: UploadLesson::new(),
            http2: http2.then(Http2Connections::default),
            lines: (upstream.pipeline > 1 && !http2).then(|| {
                Lines::new(
                    addr,
                    upstream.pipeline,
                    upstream.keepalive_requests,
                    upstream.idle_timeout,
                )
            }),
        }
    }

    /// The most recently used idle connection that is still open, else a new one; `true` with
    /// a reused connection. `probe` asks the kernel too (see `InstanceStream::probe_open`);
    /// `fresh` skips the idle ones.
    pub async fn checkout(
        &self,
        probe: bool,
        fresh: bool,
        now: Instant,
    ) -> Result<(Box<InstanceConn>, bool), ConnectError> {
        // A fresh checkout leaves the idle connections where they are.
        if !fresh {
            if let Some(conn) = self.take_idle(probe, now) {
                return Ok((conn, true));
            }
        }
        // Boxed: the connect (and TLS handshake) state is only needed on a pool miss.
        Ok((
            Box::new(InstanceConn::new(Box::pin(self.connector.connect()).await?)),
            false,
        ))
    }

    /// The most recently used idle connection that is still open, closing the ones found
    /// closed or idle too long on the way. (Not the least recently used for a request that
    /// could not go again: that one is the likeliest to meet an instance's idle timeout, often
    /// 2–5 s against the pool's 60.)
    pub(crate) fn take_idle(&self, probe: bool, now: Instant) -> Option<Box<InstanceConn>> {
        while let Some(mut idle) = self.pop() {
            if self.expired(&idle, now) {
                continue;
            }
            if idle.conn.is_open() && (!probe || idle.conn.probe_open()) {
                return Some(idle.conn);
            }
            // Soon after the answer: a close for idling (Node's 5 s) is no sign.
            let bytes = idle.conn.uploaded();
            let soon = now.saturating_duration_since(idle.since) < CLOSED_SOON;
            if bytes > 0 && soon && self.upload_lesson.learn(bytes, now) {
                tracing::info!(
                    instance = %self.connector.addr(),
                    bytes,
                    "the instance closed a connection soon after answering an upload: connections \
                     that upload as much are not reused on it for a minute"
                );
            }
        }
        None
    }

    fn pop(&self) -> Option<IdleConn> {
        self.idle.lock().expect("pool lock").pop_back()
    }

    /// Returns a connection whose exchange finished; dropped when the pool is full or the
    /// connection carried `keepalive_requests`. The oldest idle connection is closed once it
    /// outlived the idle timeout.
    pub fn checkin(&self, conn: Box<InstanceConn>) {
        let now = Instant::now();
        if self.keepalive == 0
            || conn.requests() >= self.keepalive_requests
            || self.upload_lesson.keeps_out(conn.uploaded(), now)
        {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        let expired = idle
            .front()
            .is_some_and(|oldest| self.expired(oldest, now))
            .then(|| idle.pop_front())
            .flatten();
        let refused = if idle.len() < self.keepalive {
            idle.push_back(IdleConn { conn, since: now });
            None
        } else {
            Some(conn)
        };
        drop(idle);
        // Sockets are closed outside the lock.
        drop((expired, refused));
    }

    /// Whether `idle` has been idle past the idle timeout at `now`.
    fn expired(&self, idle: &IdleConn, now: Instant) -> bool {
        now.duration_since(idle.since) > self.idle_timeout
    }

    /// Closes the idle connections that outlived the idle timeout, and those the instance
    /// closed meanwhile (as nginx's keepalive cache does when their close arrives: a socket
    /// held half-closed until the timeout holds a descriptor). Costs no system call for an
    /// idle connection with no event since its last read.
    pub fn close_stale(&self, now: Instant) {
        if let Some(http2) = &self.http2 {
            http2.close_idle();
        }
        let mut idle = self.idle.lock().expect("pool lock");
        let mut stale = Vec::new();
        // In place, oldest first, keeping the order and the queue's memory.
        for _ in 0..idle.len() {
            let Some(mut conn) = idle.pop_front() else {
                break;
            };
            if self.expired(&conn, now) || !conn.conn.is_open() {
                stale.push(conn);
            } else {
                idle.push_back(conn);
            }
        }
        let pooled = idle.len();
        drop(idle);
        // Sockets are closed outside the lock.
        drop(stale);
        // Idle lines and idle pooled connections share `keepalive`, as nginx's cache holds
        // that many idle connections in all.
        if let Some(lines) = &self.lines {
            lines.close_idle(now, self.keepalive.saturating_sub(pooled));
        }
    }

    /// Closes every idle connection (pooled, idle lines, extra HTTP/2 ones) now: the gateway
    /// ran out of file descriptors, and a burst's idle connections would otherwise hold them,
    /// the clients' share included, until `idle_timeout`. Returns how many pooled connections
    /// and idle lines went.
    pub fn shed_idle(&self, now: Instant) -> usize {
        if let Some(http2) = &self.http2 {
            http2.close_idle();
        }
        let shed = std::mem::take(&mut *self.idle.lock().expect("pool lock"));
        let lines = self.lines.as_ref().map_or(0, |lines| {
            let idle = lines.idle_count();
            lines.close_idle(now, 0);
            idle
        });
        shed.len() + lines
    }

    /// What pipelining learned of the instance's pace (see [`Lines::forget_pace`]).
    pub fn forget_pace(&self) {
        if let Some(lines) = &self.lines {
            lines.forget_pace();
        }
    }

    /// Idle connections: pooled ones, and lines no request is on.
    pub fn idle_count(&self) -> usize {
        let lines = self.lines.as_ref().map_or(0, Lines::idle_count);
        lines + self.idle.lock().expect("pool lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pool(keepalive: usize, idle_timeout: &str) -> (Pool, tokio::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config::from_toml(&format!(
            "[upstreams.app]\ninstances = [\"{addr}\"]\nkeepalive = {keepalive}\nidle_timeout = \"{idle_timeout}\"\n[[routes]]\nupstream = \"app\"\n"
        ))
        .unwrap();
        let upstream = config.upstream("app").unwrap();
        (
            Pool::new(addr, upstream),
            tokio::net::TcpListener::from_std(listener).unwrap(),
        )
    }

    fn upstream(instances: usize, strategy: &str) -> Upstream {
        upstream_with(instances, &format!("strategy = \"{strategy}\""))
    }

    /// An upstream of `instances` addresses (none listening) with more keys.
    fn upstream_with(instances: usize, keys: &str) -> Upstream {
        let list: Vec<String> = (0..instances)
            .map(|i| format!("\"127.0.0.1:{}\"", 20000 + i))
            .collect();
        let config = Config::from_toml(&format!(
            "[upstreams.app]\n{keys}\ninstances = [{}]\n[[routes]]\nupstream = \"app\"\n",
            list.join(", ")
        ))
        .unwrap();
        Upstream::new(config.upstream("app").unwrap().clone(), None)
    }

    /// A retry is paid for only when a pick has an instance left: none untried, or only ones
    /// draining, down by active checks, or out by passive checks while another is available,
    /// leaves none.
    #[test]
    fn only_an_untried_serving_instance_is_left_for_a_retry() {
        let upstream = upstream(3, "round_robin");
        let set = upstream.set.load();
        let now = Instant::now();
        assert!(set.any_left(&[0, 1], now));
        assert!(!set.any_left(&[0, 1, 2], now));
        set.instances[2].start_draining();
        assert!(!set.any_left(&[0, 1], now));
        assert!(set.any_left(&[0], now));
        // Out by passive checks while the one tried is still available: a pick passes it by.
        set.instances[1].record_failure(now, &upstream.config);
        assert!(!set.any_left(&[0], now));
        // Every instance out by passive checks: each is tried anyway.
        set.instances[0].record_failure(now, &upstream.config);
        assert!(set.any_left(&[0], now));
        set.instances[1].active_up.store(false, Ordering::Relaxed);
        assert!(!set.any_left(&[0], now));
    }

    /// Requests racing for the one trial of a primary whose ejection ran out: one takes it, the
    /// others go to the healthy backup, not to the instance still out (they used to, whenever
    /// they had listed it before the winner claimed it).
    #[test]
    fn the_losers_of_a_trial_race_go_to_the_backup() {
        let config = Config::from_toml(
            "[upstreams.app]\ninstances = [\"127.0.0.1:1\", \
             { addr = \"127.0.0.1:2\", backup = true }]\n[[routes]]\nupstream = \"app\"\n",
        )
        .unwrap();
        let upstream = Upstream::new(config.upstream("app").unwrap().clone(), None);
        let set = upstream.set.load_full();
        let primary = &set.instances[0];
        for round in 0..300 {
            let now = Instant::now();
            // Ejected, and the ejection just ran out.
            primary
                .passive_down_until
                .store(ticks_ns(now) - 1, Ordering::Relaxed);
            let start = std::sync::Barrier::new(4);
            let picks: Vec<usize> = std::thread::scope(|scope| {
                let racers: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            upstream.pick(&set, &[], None, 0, now).unwrap().0
                        })
                    })
                    .collect();
                racers.into_iter().map(|r| r.join().unwrap()).collect()
            });
            let on_primary = picks.iter().filter(|&&index| index == 0).count();
            assert_eq!(on_primary, 1, "round {round}: {picks:?}");
        }
    }

    #[test]
    fn backups_take_over_once_every_primary_was_tried() {
        let config = Config::from_toml(
            "[upstreams.app]\ninstances = [\"127.0.0.1:1\", \"127.0.0.1:2\", \
             { addr = \"127.0.0.1:3\", backup = true }]\n[[routes]]\nupstream = \"app\"\n",
        )
        .unwrap();
        let upstream = Upstream::new(config.upstream("app").unwrap().clone(), None);
        let set = upstream.set.load();
        let now = Instant::now();
        let first = upstream.pick(&set, &[], None, 0, now).unwrap().0;
        assert!(first < 2);
        let second = upstream.pick(&set, &[first], None, 0, now).unwrap().0;
        assert_eq!(second, 1 - first);
        assert_eq!(upstream.pick(&set, &[0, 1], None, 0, now).unwrap().0, 2);
        assert!(matches!(
            upstream.pick(&set, &[0, 1, 2], None, 0, now),
            Err(NoInstance::AllTried)
        ));
    }

    #[test]
    fn latency_goes_stale_while_an_instance_gets_no_answers() {
        let upstream = upstream(2, "p2c_ewma");
        let set = upstream.set.load();
        let now = Instant::now();
        // No sample: nothing to go by.
        assert_eq!(
            set.instances[1]
                .candidate(1, now, Duration::ZERO, true)
                .freshness,
            0.0
        );
        set.instances[0].observe_latency(Duration::from_millis(400), now, false);
        let at = |later: u64| {
            let when = now + Duration::from_secs(later);
            set.instances[0].candidate(0, when, Duration::ZERO, true)
        };
        assert!((at(0).freshness - 1.0).abs() < 1e-6, "{:?}", at(0));
        // One time constant (1 s): e⁻¹ of it; ten seconds on, next to nothing. The latency
        // itself is the sample's.
        assert!(
            (at(1).freshness - 1.0 / std::f64::consts::E).abs() < 1e-3,
            "{:?}",
            at(1)
        );
        assert!(at(10).freshness < 1e-4, "{:?}", at(10));
        assert_eq!(at(10).latency_ns, 400e6);
        // What was measured stays as it was (the admin API, metrics and autoscaler read it).
        assert_eq!(set.instances[0].latency(), Duration::from_millis(400));
    }

    #[test]
    fn answers_that_fail_fast_do_not_make_an_instance_look_fast() {
        let upstream = upstream(2, "p2c_ewma");
        let set = upstream.set.load();
        let instance = &set.instances[0];
        let now = Instant::now();
        instance.observe_latency(Duration::from_millis(50), now, false);
        // Its database went away: instant 500s for a minute keep the 50 ms it had.
        for second in 1..=60 {
            let at = now + Duration::from_secs(second);
            instance.observe_latency(Duration::from_micros(300), at, true);
        }
        assert_eq!(instance.latency(), Duration::from_millis(50));
        // Fast valid answers do bring it down.
        for second in 61..=120 {
            let at = now + Duration::from_secs(second);
            instance.observe_latency(Duration::from_micros(300), at, false);
        }
        assert!(instance.latency() < Duration::from_millis(5));
        // A new instance whose first answers are instant 500s is not the fastest either.
        let fresh = &set.instances[1];
        fresh.observe_latency(Duration::from_micros(300), now, true);
        assert_eq!(fresh.latency(), UNPROVEN_FAILURE);
    }

    /// A reload that rebuilds an instance (its weight changed) shares its counters: a request in
    /// flight on the old one is in the new one's gauge, and what it counts (a failure) lands
    /// where scrapes read.
    #[test]
    fn a_rebuilt_instance_counts_the_requests_in_flight_on_the_old_one() {
        let old = upstream(1, "least_conn");
        let in_flight = InFlightGuard::enter(old.set.load().instances[0].clone());
        let config = Config::from_toml(
            "[upstreams.app]\ninstances = [{ addr = \"127.0.0.1:20000\", weight = 5 }]\n[[routes]]\nupstream = \"app\"\n",
        )
        .unwrap();
        let new = Upstream::new(config.upstream("app").unwrap().clone(), Some(&old));
        let rebuilt = new.set.load().instances[0].clone();
        assert!(!Arc::ptr_eq(&rebuilt, &in_flight.instance), "not rebuilt");
        let counters = &rebuilt.counters;
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 1);
        in_flight
            .instance
            .record_failure(Instant::now(), &old.config);
        assert_eq!(counters.failures.load(Ordering::Relaxed), 1);
        drop(in_flight);
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(counters.requests.load(Ordering::Relaxed), 1);
    }

    /// A reload that rebuilds an instance keeps its last check: one its checks took out stays
    /// out, even when the reload removes the only instance serving (the new ones then serve
    /// at once only if no check has spoken of them).
    #[test]
    fn a_rebuilt_instance_keeps_its_last_check() {
        let health = "health = { fall = 1 }";
        let old = upstream_with(2, health);
        let failing = old.set.load().instances[1].clone();
        failing.record_check(false, "status 503".into(), 1, 1, Instant::now());
        assert!(!failing.passes_active_checks());
        let config = Config::from_toml(&format!(
            "[upstreams.app]\n{health}\ninstances = [{{ addr = \"127.0.0.1:20001\", weight = 2 }}]\n[[routes]]\nupstream = \"app\"\n"
        ))
        .unwrap();
        let new = Upstream::new(config.upstream("app").unwrap().clone(), Some(&old));
        let rebuilt = new.set.load().instances[0].clone();
        assert!(!Arc::ptr_eq(&rebuilt, &failing), "not rebuilt");
        assert!(rebuilt.last_check.lock().unwrap().is_some());
        assert!(!rebuilt.passes_active_checks());
    }

    /// A reload goes on with the round robin where it was and keeps what the retry budget
    /// saved: both started from nothing, and a pool reloaded more often than it cycled left its
    /// last instances without requests.
    #[test]
    fn a_reload_keeps_the_round_robin_position_and_the_budget() {
        let old = upstream(3, "round_robin");
        for _ in 0..5 {
            old.next_seq();
        }
        // Its savings spent (it starts full), then 100 requests' worth saved.
        while old.retry_budget.try_withdraw(Instant::now()) {}
        for _ in 0..100 {
            old.retry_budget.deposit();
        }
        let config = old.config.clone();
        let new = Upstream::new(config, Some(&old));
        assert_eq!(new.next_seq(), 5);
        // 20 saved (20 % of 100 requests), then the floor's 10 a second.
        let now = Instant::now();
        let allowed = (0..100)
            .filter(|_| new.retry_budget.try_withdraw(now))
            .count();
        assert_eq!(allowed, 20 + 10);
    }

    /// An instance added at run time that a reloaded file lists (weight unchanged) is the
    /// file's from then on: the next reload without it removes it.
    #[test]
    fn a_run_time_instance_the_file_lists_is_adopted_by_the_reload() {
        let start = upstream(1, "round_robin");
        let added: SocketAddr = "127.0.0.1:20001".parse().unwrap();
        let run_time = InstanceConfig {
            addr: added,
            weight: 1,
            backup: false,
        };
        assert!(start.add_instance(&run_time));
        let listed = Config::from_toml(
            "[upstreams.app]\ninstances = [\"127.0.0.1:20000\", \"127.0.0.1:20001\"]\n[[routes]]\nupstream = \"app\"\n",
        )
        .unwrap();
        let adopted = Upstream::new(listed.upstream("app").unwrap().clone(), Some(&start));
        let set = adopted.set.load();
        assert_eq!(set.instances.len(), 2);
        assert!(set.instances.iter().all(|i| !i.is_dynamic()));
        let dropped = Upstream::new(start.config.clone(), Some(&adopted));
        let set = dropped.set.load();
        assert_eq!(set.instances.len(), 1);
        assert_ne!(set.instances[0].addr, added);
    }

    /// Taken out by passive or active checks, an instance may come back as another, slower
    /// process: pipelining measures it afresh.
    #[test]
    fn an_instance_taken_out_is_measured_afresh_for_pipelining() {
        use super::super::pipeline::{PaceSample, PathSlot};
        let upstream = upstream(1, "round_robin");
        let instance = &upstream.set.load().instances[0];
        let lines = instance.pool.lines.as_ref().expect("pipelined by default");
        let measure = || {
            let now = Instant::now();
            let quick = now + Duration::from_micros(200);
            lines.record_answer(PathSlot::of("/"), PaceSample::First, now, quick);
            assert!(lines.pace_measured());
        };
        measure();
        instance.record_failure(Instant::now(), &upstream.config);
        assert!(!lines.pace_measured(), "after a passive ejection");
        measure();
        instance.record_check(false, "refused".into(), 1, 1, Instant::now());
        assert!(!lines.pace_measured(), "after failing active checks");
    }

    #[test]
    fn slow_start_ramps_after_a_passive_ejection_too() {
        let upstream = upstream_with(2, "slow_start = \"10s\"\nfail_timeout = \"5s\"");
        let set = upstream.set.load();
        let now = Instant::now();
        let instance = &set.instances[0];
        assert_eq!(instance.ramp(now, upstream.config.slow_start), 1.0);
        instance.record_failure(now, &upstream.config);
        // Back 5 s later; one second after that it has 10 % + 9 % of its weight.
        let ramp = instance.ramp(now + Duration::from_secs(6), upstream.config.slow_start);
        assert!((ramp - 0.19).abs() < 0.01, "{ramp}");
        let ramp = instance.ramp(now + Duration::from_secs(15), upstream.config.slow_start);
        assert_eq!(ramp, 1.0);
    }

    #[test]
    fn retries_skip_every_tried_instance_however_many_there_are() {
        for strategy in ["round_robin", "least_conn", "random_two", "p2c_ewma"] {
            let upstream = upstream(70, strategy);
            let set = upstream.set.load();
            let now = Instant::now();
            let mut tried = Vec::new();
            for seq in 0..70 {
                let (index, _) = upstream.pick(&set, &tried, None, seq, now).unwrap();
                assert!(!tried.contains(&index), "{strategy}: {index} again");
                tried.push(index);
            }
            let all = upstream.pick(&set, &tried, None, 70, now);
            assert!(matches!(all, Err(NoInstance::AllTried)), "{strategy}");
        }
    }

    #[test]
    fn an_ejected_instance_gets_one_request_at_a_time_until_it_answers() {
        let upstream = upstream_with(2, "fail_timeout = \"5s\"");
        let set = upstream.set.load();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let picks = |now: Instant| -> Vec<usize> {
            (0..4)
                .map(|seq| upstream.pick(&set, &[], None, seq, now).unwrap().0)
                .collect()
        };
        let ejected = &set.instances[0];
        ejected.record_failure(t0, &upstream.config);
        assert_eq!(picks(at(1)), [1, 1, 1, 1]);
        // Its time out ran: the first request that picks it is its trial; the others go on to
        // the other instance while the trial is under way (nginx: one request per fail_timeout).
        assert_eq!(picks(at(5)), [0, 1, 1, 1]);
        assert_eq!(picks(at(6)), [1, 1, 1, 1]);
        // A request that saw it available as the trial was claimed does not get a second one.
        assert!(!ejected.claim_trial(at(5), upstream.config.passive.fail_timeout));
        // A late answer to a request sent before the ejection does not bring it back...
        ejected.record_success(t0 - Duration::from_millis(1));
        assert_eq!(picks(at(6)), [1, 1, 1, 1]);
        // ... the trial's answer does.
        ejected.record_success(at(5));
        assert_eq!(picks(at(6)), [0, 1, 0, 1]);
        assert_eq!(ejected.state_name(at(6)), "up");
    }

    #[test]
    fn an_instance_that_answers_while_all_are_out_is_back_in_rotation() {
        let upstream = upstream_with(2, "fail_timeout = \"30s\"");
        let set = upstream.set.load();
        let t0 = Instant::now();
        for instance in set.instances.iter() {
            instance.record_failure(t0, &upstream.config);
        }
        // Every instance out: both are tried; the one that answers is back at once, rather
        // than sharing requests with the dead one until fail_timeout.
        let later = t0 + Duration::from_secs(1);
        set.instances[1].record_success(later);
        assert_eq!(set.instances[1].state_name(later), "up");
        assert_eq!(set.instances[0].state_name(later), "failed");
        for seq in 0..4 {
            assert_eq!(upstream.pick(&set, &[], None, seq, later).unwrap().0, 1);
        }
    }

    #[test]
    fn instances_out_by_passive_checks_alone_still_serve_when_nothing_else_can() {
        let upstream = upstream(2, "round_robin");
        let set = upstream.set.load();
        let now = Instant::now();
        let config = &upstream.config;
        // One of two out: the other takes every request.
        set.instances[0].record_failure(now, config);
        for seq in 0..4 {
            let (index, _) = upstream.pick(&set, &[], None, seq, now).unwrap();
            assert_eq!(index, 1);
        }
        // Both out by passive checks: both serve again, in turn, rather than nothing.
        set.instances[1].record_failure(now, config);
        let picked: Vec<usize> = (0..4)
            .map(|seq| upstream.pick(&set, &[], None, seq, now).unwrap().0)
            .collect();
        assert_eq!(picked, [0, 1, 0, 1]);
        assert!(matches!(
            upstream.pick(&set, &[0, 1], None, 4, now),
            Err(NoInstance::AllTried)
        ));
        // Failing active checks is different: such an instance stays out.
        for instance in set.instances.iter() {
            instance.record_check(false, String::new(), 2, 1, now);
        }
        assert!(matches!(
            upstream.pick(&set, &[], None, 5, now),
            Err(NoInstance::NoneHealthy)
        ));
    }

    #[tokio::test]
    async fn the_pool_hands_out_the_warmest_connection_and_ages_out_the_coldest() {
        let (pool, _listener) = pool(2, "200ms");
        let (first, reused) = pool.checkout(false, false, Instant::now()).await.unwrap();
        assert!(!reused);
        let (second, _) = pool.checkout(false, false, Instant::now()).await.unwrap();
        let (third, _) = pool.checkout(false, false, Instant::now()).await.unwrap();
        let second_port = second.local_port();
        pool.checkin(first);
        pool.checkin(second);
        // Full: the third is closed rather than kept.
        pool.checkin(third);
        assert_eq!(pool.idle_count(), 2);
        let (warmest, reused) = pool.checkout(false, false, Instant::now()).await.unwrap();
        assert!(reused);
        assert_eq!(warmest.local_port(), second_port);

        // The connection left at the bottom outlives the idle timeout and is closed at the next
        // check-in; the one just used stays.
        tokio::time::sleep(Duration::from_millis(300)).await;
        pool.checkin(warmest);
        assert_eq!(pool.idle_count(), 1);
        let (again, _) = pool.checkout(false, false, Instant::now()).await.unwrap();
        assert_eq!(again.local_port(), second_port);
    }

    #[tokio::test]
    async fn idle_connections_past_the_idle_timeout_are_closed_without_traffic() {
        let (pool, _listener) = pool(4, "1s");
        let (old, _) = pool.checkout(false, false, Instant::now()).await.unwrap();
        let (young, _) = pool.checkout(false, false, Instant::now()).await.unwrap();
        pool.checkin(old);
        // Under the timeout, so this check-in closes nothing itself.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let young_in = Instant::now();
        pool.checkin(young);
        assert_eq!(pool.idle_count(), 2);
        // Judged at set instants: the old one has idled over 1.1 s, the young one 0.8 s.
        pool.close_stale(young_in + Duration::from_millis(800));
        assert_eq!(pool.idle_count(), 1);
        pool.close_stale(young_in + Duration::from_secs(2));
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_fresh_checkout_opens_a_connection_and_keeps_the_idle_ones() {
        let (pool, _listener) = pool(2, "10s");
        let (idle, _) = pool.checkout(false, false, Instant::now()).await.unwrap();
        let idle_port = idle.local_port();
        pool.checkin(idle);
        let (fresh, reused) = pool.checkout(false, true, Instant::now()).await.unwrap();
        assert!(!reused);
        assert_ne!(fresh.local_port(), idle_port);
        assert_eq!(pool.idle_count(), 1);
        let (again, reused) = pool.checkout(false, false, Instant::now()).await.unwrap();
        assert!(reused);
        assert_eq!(again.local_port(), idle_port);
    }

    #[tokio::test]
    async fn a_connection_the_instance_closed_while_idle_is_not_handed_out() {
        let (pool, listener) = pool(2, "10s");
        let (conn, _) = pool.checkout(true, false, Instant::now()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let closed_port = conn.local_port();
        pool.checkin(conn);
        drop(accepted);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (fresh, reused) = pool.checkout(true, false, Instant::now()).await.unwrap();
        assert!(!reused, "the closed connection was handed out again");
        assert_ne!(fresh.local_port(), closed_port);
    }

    /// A pool whose connection that uploaded 1,000 bytes the instance closed, found closed
    /// `found_after` its check-in plus 50 ms; with the new connection that took its place.
    async fn pool_after_a_closed_upload(
        found_after: Duration,
    ) -> (Pool, tokio::net::TcpListener, Box<InstanceConn>) {
        let (pool, listener) = pool(4, "10s");
        let (closing, _) = pool.checkout(false, false, Instant::now()).await.unwrap();
        let (closing_end, _) = listener.accept().await.unwrap();
        // Before anything was learned, a connection that uploaded is pooled.
        pool.checkin(closing.with_upload(1000));
        assert_eq!(pool.idle_count(), 1);
        drop(closing_end);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let found = Instant::now() + found_after;
        let (next, reused) = pool.checkout(true, false, found).await.unwrap();
        assert!(!reused);
        (pool, listener, next)
    }

    /// Once an instance closed a connection soon after answering an upload, connections that
    /// uploaded as much are not pooled; those that uploaded less still are.
    #[tokio::test]
    async fn an_instance_that_closes_after_uploads_gets_no_reused_upload_connection() {
        let (pool, _listener, same) = pool_after_a_closed_upload(Duration::ZERO).await;
        pool.checkin(same.with_upload(1000));
        let pooled = pool.idle_count();
        assert_eq!(pooled, 0, "a connection that uploaded as much was pooled");
        let (less, _) = pool.checkout(false, false, Instant::now()).await.unwrap();
        pool.checkin(less.with_upload(999));
        assert_eq!(pool.idle_count(), 1);
        // For a while: then the instance is tried again.
        let lesson = &pool.upload_lesson;
        assert!(lesson.keeps_out(1000, Instant::now()));
        assert!(!lesson.keeps_out(1000, Instant::now() + UPLOAD_LESSON));
    }

    /// A lesson holds for uploads at least as large, lowers with a smaller close, and once run
    /// out starts again from the next close alone.
    #[test]
    fn an_upload_lesson_holds_for_a_while_then_starts_afresh() {
        let lesson = UploadLesson::new();
        let t0 = Instant::now();
        assert!(!lesson.keeps_out(1_000_000, t0));
        assert!(lesson.learn(60_000, t0));
        assert!(lesson.keeps_out(60_000, t0) && !lesson.keeps_out(59_999, t0));
        assert!(!lesson.learn(100_000, t0), "nothing new");
        assert!(lesson.learn(30_000, t0 + Duration::from_secs(30)));
        assert!(lesson.keeps_out(30_000, t0 + Duration::from_secs(89)));
        let later = t0 + Duration::from_secs(90) + UPLOAD_LESSON;
        assert!(!lesson.keeps_out(30_000, later));
        assert!(lesson.learn(100_000, later));
        assert!(!lesson.keeps_out(60_000, later) && lesson.keeps_out(100_000, later));
    }

    /// A connection found closed long after its upload's answer was closed for idling: that
    /// teaches nothing.
    #[tokio::test]
    async fn a_close_long_after_an_upload_is_no_sign() {
        let (pool, _listener, next) = pool_after_a_closed_upload(CLOSED_SOON).await;
        pool.checkin(next.with_upload(1000));
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn the_sweep_closes_an_idle_connection_the_instance_closed() {
        let (pool, listener) = pool(2, "10s");
        let (closing, _) = pool.checkout(false, false, Instant::now()).await.unwrap();
        let (closing_end, _) = listener.accept().await.unwrap();
        let (kept, _) = pool.checkout(false, false, Instant::now()).await.unwrap();
        let (_kept_end, _) = listener.accept().await.unwrap();
        pool.checkin(closing);
        pool.checkin(kept);
        drop(closing_end);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Well within the idle timeout: only the closed one goes.
        pool.close_stale(Instant::now());
        assert_eq!(pool.idle_count(), 1);
    }
}
