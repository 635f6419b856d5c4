//! Whether a request may go on, decided after routing and before an instance is picked: API
//! key (401), rate limits (429 with the IETF RateLimit headers), concurrency limits (503).
//!
//! [`Limiter`] lives as long as the process: the stores (memory, and Redis when configured),
//! the Redis link's health and the per-rule counters, so a config reload keeps them.
//! [`Admission`] is built from each config: the rules, keys and concurrency slots per route.

pub mod algorithm;
mod client;
mod concurrency;
pub mod memory;
pub mod redis_store;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::HeaderValue;
use http::{HeaderMap, HeaderName, Response};
use ipnet::IpNet;
use serde_json::{json, Value};
use smallvec::SmallVec;
use tokio::time::Instant;

use crate::auth::{ApiKeyId, ApiKeys, AuthFailure};
use crate::config::limits::{OnRedisError, RuleKey, StoreKind};
use crate::config::{Config, LimitsConfig};
use crate::proxy::GatewayBody;
use crate::proxy::ProxyError;
use crate::redis_link::RedisLink;
use algorithm::{ceil_secs, pacing_delay_us, strictest, Algorithm, Quota, RateDecision};
pub use client::{client_ip, redis_prefix, LimitKey};
pub use concurrency::{ConcurrencyLimit, Slots};
use memory::MemoryStore;
use redis_store::{RedisCheck, RedisStore};

pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Decisions of one rule since start (kept across reloads by rule name).
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Requests that passed every rule of their route.
    pub allowed: AtomicU64,
    /// Requests this rule refused.
    pub limited: AtomicU64,
    /// Requests this rule let in after a wait (`delay`), also counted as allowed.
    pub delayed: AtomicU64,
    /// Decided without Redis because it did not answer (whatever `on_redis_error` then did).
    pub fallback: AtomicU64,
}

/// The stores and counters; one per process.
pub struct Limiter {
    memory: MemoryStore,
    redis: Option<RedisStore>,
    on_redis_error: OnRedisError,
    counters: Mutex<BTreeMap<String, Arc<RuleCounters>>>,
    /// Requests answered 429, once each however many rules refused them (each rule's own
    /// `limited` counts them again).
    pub limited_requests: AtomicU64,
}

impl Limiter {
    /// `link` is the gateway's Redis link, used when `rate_limit.store` is redis.
    pub fn new(config: &LimitsConfig, link: Option<&Arc<RedisLink>>) -> Arc<Limiter> {
        Arc::new(Limiter {
            memory: MemoryStore::new(config.max_keys),
            redis: link
                .filter(|_| config.store == StoreKind::Redis)
                .map(|link| RedisStore::new(link.clone())),
            on_redis_error: config.state.on_redis_error,
            counters: Mutex::new(BTreeMap::new()),
            limited_requests: AtomicU64::new(0),
        })
    }

    fn counters(&self, rule: &str) -> Arc<RuleCounters> {
        self.counters
            .lock()
            .expect("rule counters")
            .entry(rule.to_string())
            .or_default()
            .clone()
    }

    /// Counters of every rule seen since start, by rule name (for metrics).
    pub fn rule_counters(&self) -> Vec<(String, Arc<RuleCounters>)> {
        let counters = self.counters.lock().expect("rule counters");
        counters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Whether decisions go to Redis now (configured and answering).
    fn is_shared(&self) -> bool {
        self.redis
            .as_ref()
            .is_some_and(|redis| redis.link().is_up())
    }

    /// Decides a request under `rules` (`keys`: its key under each) at Redis while it
    /// answers, else as [`Limiter::decide_here`]. The decisions come in the rules' order; on a
    /// Redis cluster they may stop at the first refusal, and with `on_redis_error = "allow"`
    /// there are none while Redis does not answer.
    async fn decide(&self, rules: &[Rule], keys: &[LimitKey<'_>]) -> SmallVec<[RateDecision; 4]> {
        if let Some(redis) = &self.redis {
            let checks: SmallVec<[RedisCheck<'_>; 4]> = rules
                .iter()
                .zip(keys)
                .map(|(rule, key)| (&rule.redis_prefix[..], &rule.quota, *key))
                .collect();
            if let Some(decisions) = redis.decide(&checks).await {
                return decisions;
            }
        }
        self.decide_here(rules, keys)
    }

    /// Decides in this process: with the memory store, or by `on_redis_error` when Redis is
    /// configured (it did not answer).
    fn decide_here(&self, rules: &[Rule], keys: &[LimitKey<'_>]) -> SmallVec<[RateDecision; 4]> {
        if self.redis.is_some() {
            for rule in rules {
                rule.counters.fallback.fetch_add(1, Ordering::Relaxed);
            }
            match self.on_redis_error {
                OnRedisError::Local => {}
                // Nothing is decided: the request goes on, and no RateLimit field tells of a
                // quota nobody looked at (a client pacing itself by one would speed up).
                OnRedisError::Allow => return SmallVec::new(),
                OnRedisError::Deny => {
                    return rules
                        .iter()
                        .map(|_| RateDecision {
                            allowed: false,
                            remaining: 0,
                            reset_us: 1_000_000,
                            retry_after_us: 1_000_000,
                        })
                        .collect()
                }
            }
        }
        let checks: SmallVec<[(u64, &Quota, LimitKey<'_>); 4]> = rules
            .iter()
            .zip(keys)
            .map(|(rule, key)| (rule.id, &rule.quota, *key))
            .collect();
        let now = crate::clock::ticks_us(Instant::now());
        self.memory.decide(&checks, now).decisions
    }

    /// `/health/redis`: `(healthy, body)`.
    pub async fn redis_health(&self) -> (bool, Value) {
        let Some(redis) = &self.redis else {
            return (true, json!({"status": "ok", "store": "memory"}));
        };
        let (healthy, mut body) = redis.link().health().await;
        body["store"] = "redis".into();
        if !healthy {
            body["on_redis_error"] = format!("{:?}", self.on_redis_error).to_lowercase().into();
        }
        (healthy, body)
    }

    /// Store state, for the admin API.
    pub fn report(&self) -> Value {
        json!({
            "store": if self.redis.is_some() { "redis" } else { "memory" },
            "redis_up": self.redis.as_ref().map(|r| r.link().is_up()),
            "redis_outages": self
                .redis
                .as_ref()
                .map(|r| r.link().outages.load(Ordering::Relaxed)),
            "memory_keys": self.memory.len(),
        })
    }
}

/// One rule, ready to decide.
struct Rule {
    name: String,
    /// Identifies the rule's entries in the memory store (stable across reloads).
    id: u64,
    key: RuleKey,
    quota: Quota,
    /// Requests of a burst past this many wait for their turn ([`pacing_delay_us`]); `None`:
    /// all go at once.
    delay: Option<u64>,
    /// `"name";q=LIMIT;w=SECONDS`
    policy: HeaderValue,
    /// `scalegate:rl:NAME:`, the start of the rule's Redis keys.
    redis_prefix: Box<[u8]>,
    counters: Arc<RuleCounters>,
}

impl Rule {
    /// `"name";r=REMAINING;t=SECONDS`, built without the formatting machinery: it is made for
    /// every request on a limited route.
    fn state_header(&self, decision: &RateDecision) -> HeaderValue {
        let mut numbers = itoa::Buffer::new();
        // Assembled on the stack; the header value is then the one allocation.
        let mut value: SmallVec<[u8; 96]> = SmallVec::new();
        value.push(b'"');
        value.extend_from_slice(self.name.as_bytes());
        value.extend_from_slice(b"\";r=");
        // Never more than the policy's `q`: a burst larger than the limit could leave more.
        let remaining = decision.remaining.min(self.quota.limit);
        value.extend_from_slice(numbers.format(remaining).as_bytes());
        value.extend_from_slice(b";t=");
        value.extend_from_slice(numbers.format(ceil_secs(decision.reset_us)).as_bytes());
        HeaderValue::from_bytes(&value).expect("validated: rule names are header-safe")
    }
}

/// What a route does with the API key a request presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyUse {
    /// Nothing: no `auth` and no rule keyed by it.
    Ignored,
    /// A rule counts by it; a request without a valid one counts by client address.
    Counted,
    /// `auth = "api_key"`: a request without a valid one gets 401.
    Required,
}

struct RoutePolicy {
    name: String,
    key_use: KeyUse,
    rules: Vec<Rule>,
    /// Some rule delays requests: admission then waits, so it is never decided at once.
    paced: bool,
    own_limit: Option<Arc<ConcurrencyLimit>>,
    /// The upstream's limit, taken on admission by a route without a cache.
    upstream_limit: Option<Arc<ConcurrencyLimit>>,
    /// The upstream's limit on a cached route: taken only by requests that go to an instance
    /// (a miss, a refresh, a bypass), never by a hit, as nginx's `max_conns` and HAProxy's
    /// server `maxconn` count connections to servers.
    fetch_limit: Option<Arc<ConcurrencyLimit>>,
}

impl RoutePolicy {
    /// The request's key under each of the route's rules. `refused`: the route requires an
    /// API key and the request's was missing or wrong; it then counts by client address under
    /// every rule, whatever the rule is keyed by. Else a guesser who varies a header a rule
    /// counts by (or the key itself) would get a fresh count for each guess and never be
    /// limited.
    fn keys<'a>(
        &'a self,
        client: IpAddr,
        api_key: Option<ApiKeyId>,
        refused: bool,
        headers: &'a HeaderMap,
    ) -> SmallVec<[LimitKey<'a>; 4]> {
        self.rules
            .iter()
            .map(|rule| {
                if refused {
                    LimitKey::Ip(client)
                } else {
                    LimitKey::of(&rule.key, client, api_key, headers, &self.name)
                }
            })
            .collect()
    }
}

/// The least time a request let go after a rate limit's delay must have left before a stop
/// cuts what is in flight; one with less is answered 503 (`shutting_down`) at once.
const STOP_MARGIN: Duration = Duration::from_secs(1);

/// Everything a config says about who may pass, per route.
pub struct Admission {
    limiter: Arc<Limiter>,
    routes: Vec<RoutePolicy>,
    api_keys: ApiKeys,
    trusted_proxies: Vec<IpNet>,
    upstream_limits: Vec<(String, Arc<ConcurrencyLimit>)>,
}

/// A request that may go on: the headers for its response, and its concurrency slots.
#[derive(Default)]
pub struct Admitted {
    headers: Option<(HeaderValue, HeaderValue)>,
    slots: Slots,
}

impl Admitted {
    /// Whether `apply_to` adds fields to the response.
    pub fn adds_fields(&self) -> bool {
        self.headers.is_some()
    }

    /// The concurrency slots, for work that outlives the request (a cache fill its client
    /// left) to hold instead.
    pub fn take_slots(&mut self) -> Slots {
        std::mem::take(&mut self.slots)
    }

    /// Slots taken after admission, held with the others.
    pub fn add_slots(&mut self, slots: Slots) {
        self.slots.extend(slots);
    }

    /// Adds `RateLimit-Policy` and `RateLimit` (the rule with the least remaining) to the
    /// response, and hands the concurrency slots to its body, which holds them to its end.
    pub fn apply_to(self, response: &mut Response<GatewayBody>) {
        if let Some((policy, state)) = self.headers {
            let headers = response.headers_mut();
            headers.insert(RATELIMIT_POLICY.clone(), policy);
            headers.insert(RATELIMIT.clone(), state);
        }
        hold_slots(response, self.slots);
    }
}

/// A slot of `limit`, at once or after waiting in its queue; 503 when the queue is full or the
/// wait ran out.
async fn take_slot(limit: &ConcurrencyLimit) -> Result<concurrency::Slot, ProxyError> {
    match limit.try_acquire() {
        Some(slot) => Ok(slot),
        None => limit
            .wait()
            .await
            .map_err(|retry_after| ProxyError::Overloaded { retry_after }),
    }
}

/// Hands `slots` to the response's body, which holds them to its end.
pub fn hold_slots(response: &mut Response<GatewayBody>, slots: Slots) {
    if !slots.is_empty() {
        let body = std::mem::replace(response.body_mut(), GatewayBody::Full(None));
        let tunnel = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        *response.body_mut() = body.holding(slots, tunnel);
    }
}

/// The 429 of a request some rule refused (the longest wait speaks), or the headers of an
/// allowed one (the rule with the least remaining speaks). Counts the request as allowed by
/// every rule when it passes and `going_on` (a request refused for its API key passes no
/// further), else as limited by the rules that refused it.
fn conclude(
    policy: &RoutePolicy,
    decisions: &[RateDecision],
    admitted: &mut Admitted,
    going_on: bool,
    limited_requests: &AtomicU64,
) -> Result<Duration, ProxyError> {
    let passes = decisions.iter().all(|d| d.allowed);
    // No decisions at all (`on_redis_error = "allow"` while Redis is down): the request
    // passes every rule unchecked, and is counted as allowed by each, as its fallback is.
    if decisions.is_empty() && going_on {
        for rule in &policy.rules {
            rule.counters.allowed.fetch_add(1, Ordering::Relaxed);
        }
    }
    let mut wait_us = 0;
    for (rule, decision) in policy.rules.iter().zip(decisions) {
        if passes {
            let wait = rule.delay.map_or(0, |undelayed| {
                pacing_delay_us(&rule.quota, decision, undelayed)
            });
            wait_us = wait_us.max(wait);
            if going_on {
                rule.counters.allowed.fetch_add(1, Ordering::Relaxed);
                if wait > 0 {
                    rule.counters.delayed.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else if !decision.allowed {
            rule.counters.limited.fetch_add(1, Ordering::Relaxed);
        }
    }
    // A delayed request's answer comes after its wait: each rule's quota is as it will be then,
    // and the strictest of those is told.
    let after_wait = policy
        .rules
        .iter()
        .zip(decisions)
        .map(|(rule, decision)| as_of_wait(&rule.quota, *decision, wait_us));
    let Some((index, decision)) = after_wait.enumerate().reduce(strictest) else {
        return Ok(Duration::ZERO);
    };
    let rule = &policy.rules[index];
    let state = rule.state_header(&decision);
    if !decision.allowed {
        limited_requests.fetch_add(1, Ordering::Relaxed);
        return Err(ProxyError::RateLimited {
            retry_after: ceil_secs(decision.retry_after_us).max(1),
            policy: rule.policy.clone(),
            state,
        });
    }
    admitted.headers = Some((rule.policy.clone(), state));
    Ok(Duration::from_micros(wait_us))
}

/// `decision` as it stands `wait_us` later: the quota is whole that much sooner, and under GCRA
/// one more request fits per interval waited, up to the burst (a window's weighting of its last
/// count is not redone: the count stays, the stricter way).
fn as_of_wait(quota: &Quota, decision: RateDecision, wait_us: u64) -> RateDecision {
    let remaining = match quota.algorithm {
        Algorithm::Gcra => (decision.remaining + wait_us / quota.interval_us())
            .min(quota.burst)
            .max(decision.remaining),
        Algorithm::SlidingWindow => decision.remaining,
    };
    RateDecision {
        reset_us: decision.reset_us.saturating_sub(wait_us),
        remaining,
        ..decision
    }
}

impl Admission {
    /// Compiles `config`; concurrency limits are carried over from `previous` (resized when
    /// their numbers changed), so requests in flight across a reload still count.
    pub fn build(
        config: &Config,
        limiter: Arc<Limiter>,
        previous: Option<&Admission>,
    ) -> Admission {
        let limits = &config.limits;
        let reuse = |old: Option<&Arc<ConcurrencyLimit>>, new| match old {
            Some(old) if old.config == new => old.clone(),
            Some(old) => Arc::new(old.resized(new)),
            None => Arc::new(ConcurrencyLimit::new(new)),
        };
        let upstream_limits: Vec<(String, Arc<ConcurrencyLimit>)> = limits
            .upstreams
            .iter()
            .map(|(name, c)| {
                let old = previous.and_then(|p| {
                    p.upstream_limits
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, l)| l)
                });
                (name.clone(), reuse(old, *c))
            })
            .collect();
        let routes = config
            .routes
            .iter()
            .zip(&limits.routes)
            .map(|(route, route_limits)| {
                let own_limit = route_limits.concurrency.map(|c| {
                    let old = previous
                        .and_then(|p| p.routes.iter().find(|r| r.name == route.name))
                        .and_then(|r| r.own_limit.as_ref());
                    reuse(old, c)
                });
                let upstream_limit = upstream_limits
                    .iter()
                    .find(|(n, _)| *n == route.upstream)
                    .map(|(_, limit)| limit.clone());
                let (upstream_limit, fetch_limit) = match route.cache {
                    Some(_) => (None, upstream_limit),
                    None => (upstream_limit, None),
                };
                let rules: Vec<Rule> = route_limits
                    .rules
                    .iter()
                    .map(|rule| {
                        let mut hasher = std::hash::DefaultHasher::new();
                        rule.name.hash(&mut hasher);
                        let policy = format!(
                            "\"{}\";q={};w={}",
                            rule.name,
                            rule.quota.limit,
                            ceil_secs(rule.quota.period_us)
                        );
                        Rule {
                            redis_prefix: redis_prefix(&rule.name).into(),
                            name: rule.name.clone(),
                            id: hasher.finish(),
                            key: rule.key.clone(),
                            quota: rule.quota,
                            delay: rule.delay,
                            policy: HeaderValue::from_str(&policy)
                                .expect("validated: rule names are header-safe"),
                            counters: limiter.counters(&rule.name),
                        }
                    })
                    .collect();
                let key_use = if route_limits.api_key {
                    KeyUse::Required
                } else if rules.iter().any(|rule| rule.key == RuleKey::ApiKey) {
                    KeyUse::Counted
                } else {
                    KeyUse::Ignored
                };
                RoutePolicy {
                    name: route.name.clone(),
                    key_use,
                    paced: rules.iter().any(|rule| rule.delay.is_some()),
                    rules,
                    own_limit,
                    upstream_limit,
                    fetch_limit,
                }
            })
            .collect();
        Admission {
            limiter,
            routes,
            api_keys: ApiKeys::new(&limits.auth),
            trusted_proxies: limits.trusted_proxies.clone(),
            upstream_limits,
        }
    }

    /// Decides at once when no Redis call or queueing is needed (the usual case, kept out of
    /// the async path). `None`: nothing was counted or held; await [`Admission::admit`].
    pub fn admit_now(
        &self,
        route: usize,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Option<Result<Admitted, ProxyError>> {
        let policy = &self.routes[route];
        // Decided at Redis, or waited for: `admit` checks the API key, once.
        if !policy.rules.is_empty() && (policy.paced || self.limiter.is_shared()) {
            return None;
        }
        let (api_key, unauthorized) = self.api_key(policy, headers);
        let mut admitted = Admitted::default();
        // Slots first: when one is taken the request would queue, and must not have been
        // counted yet. A refusal below frees them again.
        if unauthorized.is_none() {
            for limit in policy.own_limit.iter().chain(&policy.upstream_limit) {
                admitted.slots.push(limit.try_acquire()?);
            }
        }
        if !policy.rules.is_empty() {
            let keys = policy.keys(client, api_key, unauthorized.is_some(), headers);
            let decisions = self.limiter.decide_here(&policy.rules, &keys);
            let going_on = unauthorized.is_none();
            // Never a wait here: paced routes are admitted by `admit`.
            let limited = &self.limiter.limited_requests;
            if let Err(refusal) = conclude(policy, &decisions, &mut admitted, going_on, limited) {
                return Some(Err(refusal));
            }
        }
        Some(unauthorized.map_or(Ok(admitted), Err))
    }

    /// Decides whether the request routed to `route` may go on, asking Redis and waiting in
    /// the concurrency queues as needed. `meanwhile` runs beside a rate limit's delay, when
    /// there is one (reading the request's body), and its failure ends the request.
    /// `stop_due` completes when a stop drains the gateway, with the moment it cuts what is in
    /// flight: a delay that would end later is answered 503 at once, not cut then unanswered.
    pub async fn admit(
        &self,
        route: usize,
        headers: &HeaderMap,
        client: IpAddr,
        meanwhile: impl std::future::Future<Output = Result<(), ProxyError>>,
        stop_due: impl std::future::Future<Output = tokio::time::Instant>,
    ) -> Result<Admitted, ProxyError> {
        let policy = &self.routes[route];
        let (api_key, unauthorized) = self.api_key(policy, headers);
        let mut admitted = Admitted::default();
        if !policy.rules.is_empty() {
            let keys = policy.keys(client, api_key, unauthorized.is_some(), headers);
            let decisions = self.limiter.decide(&policy.rules, &keys).await;
            let going_on = unauthorized.is_none();
            let limited = &self.limiter.limited_requests;
            let wait = conclude(policy, &decisions, &mut admitted, going_on, limited)?;
            // Before the API key's verdict and the concurrency slots, as nginx's `limit_req`
            // delays in its preaccess phase: a waiting request holds no slot an instance could
            // use.
            if !wait.is_zero() {
                let until = tokio::time::Instant::now() + wait;
                let mut waited = std::pin::pin!(async {
                    tokio::join!(tokio::time::sleep_until(until), meanwhile).1
                });
                let waited = tokio::select! {
                    waited = &mut waited => waited,
                    stop_due = stop_due => {
                        // With a second to spare for its answer: one let go just before the
                        // cut would be cut unanswered all the same.
                        if until + STOP_MARGIN > stop_due {
                            return Err(ProxyError::ShuttingDown);
                        }
                        waited.await
                    }
                };
                waited?;
            }
        }
        if let Some(unauthorized) = unauthorized {
            return Err(unauthorized);
        }
        for limit in policy.own_limit.iter().chain(&policy.upstream_limit) {
            admitted.slots.push(take_slot(limit).await?);
        }
        Ok(admitted)
    }

    /// The upstream's slot for a request of a cached route that goes to an instance, waiting
    /// in its queue as needed; none when the route has no such limit (or took it on admission).
    pub async fn fetch_slot(&self, route: usize) -> Result<Slots, ProxyError> {
        let mut slots = Slots::default();
        if let Some(limit) = &self.routes[route].fetch_limit {
            slots.push(take_slot(limit).await?);
        }
        Ok(slots)
    }

    /// The client's address: the peer, or the last untrusted hop of X-Forwarded-For when the
    /// peer is one of `trusted_proxies`. Rate-limit keys and cache keys both use it.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        client_ip(peer, headers, &self.trusted_proxies)
    }

    /// The request's API key when the route requires one or counts by it, and its 401 when the
    /// route requires one it lacks. Such a request still counts under the route's rules, by
    /// client address, as nginx limits requests before it checks credentials: keys cannot be
    /// guessed faster than the rules let requests through (past them, a guess gets 429).
    fn api_key(
        &self,
        policy: &RoutePolicy,
        headers: &HeaderMap,
    ) -> (Option<ApiKeyId>, Option<ProxyError>) {
        if policy.key_use == KeyUse::Ignored {
            return (None, None);
        }
        let refused = match self.api_keys.identify(headers) {
            Ok(id) => return (Some(id), None),
            Err(_) if policy.key_use == KeyUse::Counted => return (None, None),
            Err(AuthFailure::Missing) => "missing API key",
            Err(AuthFailure::Wrong) => "wrong API key",
        };
        let refused = ProxyError::Unauthorized {
            reason: refused,
            challenge: self.api_keys.challenge.clone(),
        };
        (None, Some(refused))
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// The counters of the rules in force (each once, however many routes share it), for the
    /// admin API; a rule a reload removed keeps its counters for metrics only.
    pub fn rules_report(&self) -> Value {
        let mut seen = std::collections::HashSet::new();
        let rules: Vec<Value> = self
            .routes
            .iter()
            .flat_map(|route| &route.rules)
            .filter(|rule| seen.insert(&rule.name))
            .map(|rule| {
                let c = &rule.counters;
                json!({
                    "name": rule.name,
                    "allowed": c.allowed.load(Ordering::Relaxed),
                    "limited": c.limited.load(Ordering::Relaxed),
                    "delayed": c.delayed.load(Ordering::Relaxed),
                    "fallback": c.fallback.load(Ordering::Relaxed),
                })
            })
            .collect();
        Value::Array(rules)
    }

    /// Concurrency limits in force, for the admin API.
    pub fn concurrency_report(&self) -> Value {
        let routes: Vec<Value> = self
            .routes
            .iter()
            .filter_map(|r| {
                let limit = r.own_limit.as_ref()?;
                Some(json!({"route": r.name, "limit": limit_json(limit)}))
            })
            .collect();
        let upstreams: Vec<Value> = self
            .upstream_limits
            .iter()
            .map(|(name, limit)| json!({"upstream": name, "limit": limit_json(limit)}))
            .collect();
        json!({ "routes": routes, "upstreams": upstreams })
    }
}

fn limit_json(limit: &ConcurrencyLimit) -> Value {
    json!({
        "max_in_flight": limit.config.max_in_flight,
        "in_flight": limit.in_flight(),
        "waiting": limit.waiting(),
        "queue_size": limit.config.queue_size,
        "refused": limit.refused.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gcra(limit: u64, period_us: u64, burst: u64) -> Quota {
        Quota {
            algorithm: Algorithm::Gcra,
            limit,
            period_us,
            burst,
        }
    }

    /// An allowed decision with `remaining` left and the quota whole in `reset_us`.
    fn allowed(remaining: u64, reset_us: u64) -> RateDecision {
        RateDecision {
            allowed: true,
            remaining,
            reset_us,
            retry_after_us: 0,
        }
    }

    #[test]
    fn state_header_follows_the_draft() {
        let rule = Rule {
            name: "per_ip".into(),
            id: 1,
            key: RuleKey::ClientIp,
            quota: gcra(20, 60_000_000, 0),
            delay: None,
            policy: HeaderValue::from_static("\"per_ip\";q=20;w=60"),
            redis_prefix: redis_prefix("per_ip").into(),
            counters: Arc::default(),
        };
        let decision = allowed(7, 29_000_001);
        assert_eq!(rule.state_header(&decision), "\"per_ip\";r=7;t=30");
        let beyond = RateDecision {
            remaining: 25,
            ..decision
        };
        assert_eq!(rule.state_header(&beyond), "\"per_ip\";r=20;t=30");
    }

    /// Each rule is taken as of the end of the wait, within what it can hold: a rule of 10 a
    /// second with a burst of 2, behind another rule's 2 s wait, has 2 left then, not 20.
    #[test]
    fn a_wait_grows_each_rules_quota_up_to_its_burst() {
        let fast = gcra(10, 1_000_000, 2);
        let third = allowed(0, 300_000);
        let later = as_of_wait(&fast, third, 2_000_000);
        assert_eq!((later.remaining, later.reset_us), (2, 0));
        let sooner = as_of_wait(&fast, third, 100_000);
        assert_eq!((sooner.remaining, sooner.reset_us), (1, 200_000));
        assert_eq!(as_of_wait(&fast, third, 0), third);
    }

    fn rule_keyed_by(key: RuleKey) -> Rule {
        Rule {
            name: "r".into(),
            id: 1,
            key,
            quota: gcra(2, 60_000_000, 1),
            delay: None,
            policy: HeaderValue::from_static("\"r\";q=2;w=60"),
            redis_prefix: redis_prefix("r").into(),
            counters: Arc::default(),
        }
    }

    /// A request refused for its API key counts by client address under every rule: a guesser
    /// who sends a new `X-Tenant` (or key) with each guess would otherwise get a fresh count
    /// each time and never see a 429. An identified request keeps each rule's own key.
    #[test]
    fn a_refused_key_counts_by_client_address_under_every_rule() {
        let tenant = http::HeaderName::from_static("x-tenant");
        let policy = RoutePolicy {
            name: "private".into(),
            key_use: KeyUse::Required,
            rules: vec![
                rule_keyed_by(RuleKey::Header(tenant.clone())),
                rule_keyed_by(RuleKey::ApiKey),
                rule_keyed_by(RuleKey::Route),
                rule_keyed_by(RuleKey::ClientIp),
            ],
            paced: false,
            own_limit: None,
            upstream_limit: None,
            fetch_limit: None,
        };
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(tenant, HeaderValue::from_static("t-1"));
        let refused = policy.keys(client, None, true, &headers);
        assert_eq!(refused.as_slice(), [LimitKey::Ip(client); 4]);
        let identified = policy.keys(client, Some(ApiKeyId(9)), false, &headers);
        assert_eq!(
            identified.as_slice(),
            [
                LimitKey::Header(b"t-1"),
                LimitKey::ApiKey(ApiKeyId(9)),
                LimitKey::Route("private"),
                LimitKey::Ip(client),
            ]
        );
    }

    /// A request told to wait 2 s (third of a burst at one a second) is answered after it:
    /// its `RateLimit` says the quota is whole 1 s after the answer, not 3, and that two more
    /// may pass then, as they may.
    #[test]
    fn a_delayed_answer_tells_the_reset_from_after_its_wait() {
        let quota = gcra(10, 10_000_000, 2);
        let policy = RoutePolicy {
            name: "paced".into(),
            key_use: KeyUse::Ignored,
            rules: vec![Rule {
                name: "paced".into(),
                id: 1,
                key: RuleKey::ClientIp,
                quota,
                delay: Some(0),
                policy: HeaderValue::from_static("\"paced\";q=10;w=10"),
                redis_prefix: redis_prefix("paced").into(),
                counters: Arc::default(),
            }],
            paced: true,
            own_limit: None,
            upstream_limit: None,
            fetch_limit: None,
        };
        let third = allowed(0, 3_000_000);
        let mut admitted = Admitted::default();
        let limited = AtomicU64::new(0);
        let wait = conclude(&policy, &[third], &mut admitted, true, &limited).unwrap();
        assert_eq!(wait, Duration::from_secs(2));
        let (_, state) = admitted.headers.unwrap();
        assert_eq!(state, "\"paced\";r=2;t=1");
        assert_eq!(policy.rules[0].counters.delayed.load(Ordering::Relaxed), 1);
    }
}
