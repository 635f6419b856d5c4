//! Every metric the gateway exposes, named in this one file, and the cheap recording behind them.
//!
//! The request path only touches atomics: each route holds an `Arc<RequestStats>` (counters by
//! method and status class, a fixed-bucket duration histogram), beside one gateway-wide
//! in-flight gauge. A scrape reads those atomics and the instance counters and writes the
//! OpenMetrics text through prometheus-client (or Prometheus's classic format from it). Label values come from config names and instance addresses only, so the
//! label sets stay bounded whatever clients send.

pub mod live;
mod process;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Prefix of every metric name.
pub const PREFIX: &str = "scalegate";

// Metric names, without the prefix (and counters without `_total`, which the encoder adds).
pub const REQUESTS: &str = "requests";
pub const IN_FLIGHT: &str = "in_flight_requests";
pub const REQUEST_DURATION: &str = "request_duration_seconds";
pub const INSTANCE_REQUESTS: &str = "instance_requests";
pub const INSTANCE_FAILURES: &str = "instance_failures";
pub const INSTANCE_IN_FLIGHT: &str = "instance_in_flight_requests";
pub const INSTANCE_UP: &str = "instance_up";
pub const INSTANCE_STATE: &str = "instance_state";
pub const INSTANCE_EJECTIONS: &str = "instance_ejections";
pub const INSTANCE_RETRIES: &str = "instance_retries";
pub const INSTANCE_RESENDS: &str = "instance_resends";
pub const INSTANCE_BROKEN_ANSWERS: &str = "instance_broken_answers";
pub const INSTANCE_ANSWERS: &str = "instance_answers";
pub const INSTANCE_LATENCY: &str = "instance_latency_ewma_seconds";
pub const OPEN_CONNECTIONS: &str = "open_connections";
pub const CONNECTIONS_REFUSED: &str = "connections_refused";
pub const RATE_LIMIT_DECISIONS: &str = "rate_limit_decisions";
pub const RATE_LIMIT_REDIS_UP: &str = "rate_limit_redis_up";
pub const RATE_LIMIT_FALLBACK: &str = "rate_limit_fallback_decisions";
pub const RATE_LIMIT_DELAYED: &str = "rate_limit_delayed";
pub const AUTOSCALE_CURRENT: &str = "autoscale_current_replicas";
pub const AUTOSCALE_DESIRED: &str = "autoscale_desired_replicas";
pub const AUTOSCALE_READY: &str = "autoscale_ready_replicas";
pub const PROCESS_CPU: &str = "process_cpu_seconds";
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
pub const PROCESS_FDS: &str = "process_open_fds";
pub const PROCESS_START: &str = "process_start_time_seconds";
pub const CACHE_HITS: &str = "cache_hits";
pub const CACHE_MISSES: &str = "cache_misses";
pub const CACHE_STALE: &str = "cache_stale";
pub const CACHE_BYPASSES: &str = "cache_bypasses";
pub const CACHE_EVICTIONS: &str = "cache_evictions";
pub const CACHE_ENTRIES: &str = "cache_entries";
pub const CACHE_BYTES: &str = "cache_bytes";
pub const CACHE_MAX_BYTES: &str = "cache_max_bytes";
pub const CACHE_SHARED_HITS: &str = "cache_shared_hits";
pub const CACHE_SHARED_ERRORS: &str = "cache_shared_errors";
pub const CACHE_REDIS_UP: &str = "cache_redis_up";
pub const CONFIG_RELOADS: &str = "config_reloads";
pub const CONFIG_LAST_RELOAD_OK: &str = "config_last_reload_successful";
pub const TLS_HANDSHAKE_FAILURES: &str = "tls_handshake_failures";
pub const TLS_CERTIFICATE_EXPIRY: &str = "tls_certificate_expiry_timestamp_seconds";

/// Method label values; anything else counts as `OTHER`.
pub const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];
/// Status class label values, by `status / 100 - 1`.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Upper bounds (seconds) of the duration histogram as exported: 100 µs to 60 s, about 2.5×
/// apart.
pub const DURATION_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds (seconds) the durations are counted in: ten per decade (the R10 series, about
/// 1.25× apart), every exported bound among them, so the exported buckets are sums of these.
/// The dashboard's percentiles come from these: interpolated in the exported buckets, 2.5×
/// wide, a p99 of 39 ms read as 50 ms.
const FINE_BUCKETS: [f64; 58] = [
    0.0001, 0.000125, 0.00016, 0.0002, 0.00025, 0.000315, 0.0004, 0.0005, 0.00063, 0.0008, //
    0.001, 0.00125, 0.0016, 0.002, 0.0025, 0.00315, 0.004, 0.005, 0.0063, 0.008, //
    0.01, 0.0125, 0.016, 0.02, 0.025, 0.0315, 0.04, 0.05, 0.063, 0.08, //
    0.1, 0.125, 0.16, 0.2, 0.25, 0.315, 0.4, 0.5, 0.63, 0.8, //
    1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0, //
    10.0, 12.5, 16.0, 20.0, 25.0, 30.0, 40.0, 60.0,
];

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The [`STATUS_CLASSES`] position of `status`.
pub fn status_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// A histogram with fixed buckets ([`FINE_BUCKETS`]), recorded with one atomic add per bucket
/// hit.
#[derive(Debug)]
pub struct DurationHistogram {
    /// Non-cumulative counts; the last slot is +Inf.
    counts: [AtomicU64; FINE_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Default for DurationHistogram {
    fn default() -> Self {
        DurationHistogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl DurationHistogram {
    pub fn record(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let slot = FINE_BUCKETS.partition_point(|&bound| bound < seconds);
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }

    /// Current non-cumulative bucket counts (last = +Inf) and the sum in seconds.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut counts = [0u64; FINE_BUCKETS.len() + 1];
        for (slot, count) in counts.iter_mut().zip(&self.counts) {
            *slot = count.load(Ordering::Relaxed);
        }
        HistogramSnapshot {
            counts,
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// Bucket counts at one moment; subtract two to get what happened in between.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistogramSnapshot {
    /// Non-cumulative counts in [`FINE_BUCKETS`]; the last slot is +Inf.
    counts: [u64; FINE_BUCKETS.len() + 1],
    pub sum_seconds: f64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        HistogramSnapshot {
            counts: [0; FINE_BUCKETS.len() + 1],
            sum_seconds: 0.0,
        }
    }
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Non-cumulative counts in the exported buckets ([`DURATION_BUCKETS`], then +Inf): each
    /// sums the fine buckets within it.
    pub fn exported_counts(&self) -> [u64; DURATION_BUCKETS.len() + 1] {
        let mut exported = [0; DURATION_BUCKETS.len() + 1];
        for (slot, &count) in self.counts.iter().enumerate() {
            let upper = FINE_BUCKETS.get(slot).copied().unwrap_or(f64::INFINITY);
            exported[DURATION_BUCKETS.partition_point(|&bound| bound < upper)] += count;
        }
        exported
    }

    /// What was recorded between `earlier` and `self`.
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        let mut counts = self.counts;
        for (slot, before) in counts.iter_mut().zip(earlier.counts) {
            *slot = slot.saturating_sub(before);
        }
        HistogramSnapshot {
            counts,
            sum_seconds: (self.sum_seconds - earlier.sum_seconds).max(0.0),
        }
    }

    pub fn add(&mut self, other: &HistogramSnapshot) {
        for (slot, more) in self.counts.iter_mut().zip(other.counts) {
            *slot += more;
        }
        self.sum_seconds += other.sum_seconds;
    }

    /// The `q` quantile (0..1) in seconds, interpolated linearly inside its bucket as
    /// Prometheus' `histogram_quantile` does; `None` when nothing was recorded. Values in the
    /// +Inf bucket report the last finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (slot, &count) in self.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            if (seen + count) as f64 >= rank {
                let Some(&upper) = FINE_BUCKETS.get(slot) else {
                    return Some(FINE_BUCKETS[FINE_BUCKETS.len() - 1]);
                };
                let lower = if slot == 0 {
                    0.0
                } else {
                    FINE_BUCKETS[slot - 1]
                };
                let within = (rank - seen as f64) / count as f64;
                return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
            }
            seen += count;
        }
        Some(FINE_BUCKETS[FINE_BUCKETS.len() - 1])
    }
}

/// The counters of one route (or of requests no route matched).
#[derive(Debug, Default)]
pub struct RequestStats {
    counts: [[AtomicU64; STATUS_CLASSES.len()]; METHODS.len()],
    pub duration: DurationHistogram,
}

impl RequestStats {
    pub fn record(&self, method: &Method, status: u16, duration: Duration) {
        self.counts[method_index(method)][status_index(status)].fetch_add(1, Ordering::Relaxed);
        self.duration.record(duration);
    }

    /// Requests so far by status class, all methods together.
    pub fn by_status_class(&self) -> [u64; STATUS_CLASSES.len()] {
        let mut out = [0; STATUS_CLASSES.len()];
        for row in &self.counts {
            for (slot, count) in out.iter_mut().zip(row) {
                *slot += count.load(Ordering::Relaxed);
            }
        }
        out
    }
}

/// The request counters of every route ever configured, kept across reloads so counters never
/// go backwards.
#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<Vec<RouteStatsEntry>>,
    pub unrouted: Arc<RequestStats>,
    in_flight: AtomicI64,
    pub reloads: ReloadCounts,
    pub tls_handshake_failures: HandshakeFailures,
}

/// TLS handshakes with clients that did not complete.
#[derive(Debug, Default)]
pub struct HandshakeFailures {
    pub failed: AtomicU64,
    pub timed_out: AtomicU64,
}

/// Failed client handshakes by reason, and when each served certificate expires (what an
/// alert on a renewal that did not happen watches, as Envoy's `days_until_expiration`).
pub fn tls_families(
    failures: &HandshakeFailures,
    certificates: &[crate::tls::TlsCertificate],
) -> Vec<Family> {
    let mut failed = Family::new(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes with clients that failed (error) or did not finish within header_read_timeout (timeout).",
    );
    for (reason, count) in [
        ("error", &failures.failed),
        ("timeout", &failures.timed_out),
    ] {
        failed.push(
            vec![("reason", reason.to_owned())],
            Value::Counter(count.load(Ordering::Relaxed)),
        );
    }
    let mut expiry = Family::new(
        TLS_CERTIFICATE_EXPIRY,
        "When each served certificate expires (Unix seconds), by the config key of its file.",
    );
    for certificate in certificates {
        if let Some(leaf) = &certificate.leaf {
            expiry.push(
                vec![("certificate", format!("{}.cert", certificate.config_key))],
                Value::Gauge(leaf.not_after_unix as f64),
            );
        }
    }
    vec![failed, expiry]
}

/// Config reloads by outcome, and whether the last one took (Prometheus's and Traefik's
/// `..._last_reload_successful`, what an alert on a bad config push watches).
#[derive(Debug, Default)]
pub struct ReloadCounts {
    applied: AtomicU64,
    refused: AtomicU64,
    last_refused: AtomicBool,
}

impl ReloadCounts {
    pub fn record(&self, applied: bool) {
        let counter = if applied {
            &self.applied
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.last_refused.store(!applied, Ordering::Relaxed);
    }
}

/// Reloads by result (`applied`, `refused`) and whether the last one was applied (1 before any).
pub fn reload_families(reloads: &ReloadCounts) -> Vec<Family> {
    let mut counts = Family::new(
        CONFIG_RELOADS,
        "Config reloads (SIGHUP, POST /api/reload) by result.",
    );
    for (result, count) in [("applied", &reloads.applied), ("refused", &reloads.refused)] {
        counts.push(
            vec![("result", result.to_owned())],
            Value::Counter(count.load(Ordering::Relaxed)),
        );
    }
    let mut last = Family::new(
        CONFIG_LAST_RELOAD_OK,
        "1 when the last config reload was applied (or none was tried), 0 when it was refused.",
    );
    let ok = !reloads.last_refused.load(Ordering::Relaxed);
    last.push(Vec::new(), Value::Gauge(f64::from(u8::from(ok))));
    vec![counts, last]
}

#[derive(Debug)]
struct RouteStatsEntry {
    route: String,
    upstream: String,
    stats: Arc<RequestStats>,
}

impl Metrics {
    /// Counts a request in flight, until [`Metrics::request_ended`]. The proxy's request record
    /// calls both, as it is made and dropped.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The counters for `route` → `upstream`, made on first use (at config load, not per request).
    pub fn route(&self, route: &str, upstream: &str) -> Arc<RequestStats> {
        let mut routes = self.routes.lock().expect("metrics routes lock");
        if let Some(entry) = routes
            .iter()
            .find(|e| e.route == route && e.upstream == upstream)
        {
            return entry.stats.clone();
        }
        let stats = Arc::new(RequestStats::default());
        routes.push(RouteStatsEntry {
            route: route.to_string(),
            upstream: upstream.to_string(),
            stats: stats.clone(),
        });
        stats
    }

    /// Every route's counters with their labels, and the unrouted ones as route `-`.
    pub fn routes(&self) -> Vec<(String, String, Arc<RequestStats>)> {
        let routes = self.routes.lock().expect("metrics routes lock");
        routes
            .iter()
            .map(|e| (e.route.clone(), e.upstream.clone(), e.stats.clone()))
            .chain(std::iter::once((
                "-".to_string(),
                "-".to_string(),
                self.unrouted.clone(),
            )))
            .collect()
    }
}

/// Instance states as exported by `instance_state`.
pub const INSTANCE_STATES: [&str; 4] = ["up", "down", "failed", "draining"];

/// One metric family as a scrape sees it: owned, so any capability can contribute its own.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: Vec<(&'static str, String)>,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub enum Value {
    Counter(u64),
    /// A counter of seconds (CPU time).
    CounterSeconds(f64),
    Gauge(f64),
    Histogram(Box<HistogramSnapshot>),
}

impl Family {
    pub fn new(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            samples: Vec::new(),
        }
    }

    pub fn push(&mut self, labels: Vec<(&'static str, String)>, value: Value) {
        self.samples.push(Sample { labels, value });
    }

    fn metric_type(&self) -> MetricType {
        match self.samples.first().map(|s| &s.value) {
            Some(Value::Counter(_) | Value::CounterSeconds(_)) => MetricType::Counter,
            Some(Value::Histogram(_)) => MetricType::Histogram,
            _ => MetricType::Gauge,
        }
    }
}

/// What an instance looks like to a scrape.
#[derive(Debug, Clone)]
pub struct InstanceSample {
    pub upstream: String,
    pub instance: String,
    pub state: &'static str,
    pub requests: u64,
    pub failures: u64,
    pub in_flight: u32,
    pub ejections: u64,
    pub retries: u64,
    pub resends: u64,
    pub broken_answers: u64,
    /// By [`STATUS_CLASSES`].
    pub answers: [u64; 5],
    pub latency_seconds: f64,
}

/// Name, help and value of one per-instance family.
type InstanceFamily = (&'static str, &'static str, fn(&InstanceSample) -> Value);

/// The request families (by route) and the instance families.
/// `per_request`: `server.metrics` is on; off, no request is counted by route, and none of
/// those series is shown (a `-` route stuck at 0 read as no malformed request ever coming).
pub fn core_families(
    metrics: &Metrics,
    instances: &[InstanceSample],
    per_request: bool,
) -> Vec<Family> {
    let mut requests = Family::new(
        REQUESTS,
        "Requests answered, by route, upstream, method and status class.",
    );
    let mut in_flight = Family::new(IN_FLIGHT, "Requests being handled by the gateway.");
    in_flight.push(Vec::new(), Value::Gauge(metrics.in_flight() as f64));
    let mut duration = Family::new(
        REQUEST_DURATION,
        "Time from request head to the answer's last byte, by route and upstream.",
    );
    let routes = if per_request {
        metrics.routes()
    } else {
        Vec::new()
    };
    for (route, upstream, stats) in routes {
        let labels = vec![("route", route), ("upstream", upstream)];
        for (m, row) in stats.counts.iter().enumerate() {
            let counts = row.each_ref().map(|count| count.load(Ordering::Relaxed));
            // Every status class of a method seen (and of GET from the start) is there, at 0
            // until it happens: Prometheus's increase() needs a sample before the first 5xx
            // to see it, and an alert on them would miss a route's first outage.
            if m != 0 && counts.iter().all(|&count| count == 0) {
                continue;
            }
            for (class, count) in STATUS_CLASSES.iter().zip(counts) {
                let mut labels = labels.clone();
                labels.push(("method", METHODS[m].to_string()));
                labels.push(("status", (*class).to_string()));
                requests.push(labels, Value::Counter(count));
            }
        }
        duration.push(
            labels,
            Value::Histogram(Box::new(stats.duration.snapshot())),
        );
    }
    let mut families = vec![requests, in_flight, duration];
    let per_instance: [InstanceFamily; 8] = [
        (INSTANCE_REQUESTS, "Requests sent to the instance.", |i| {
            Value::Counter(i.requests)
        }),
        (
            INSTANCE_FAILURES,
            "Requests to the instance that failed (connect error, reset, timeout, invalid answer head, or a status listed in fail_on_status).",
            |i| Value::Counter(i.failures),
        ),
        (
            INSTANCE_IN_FLIGHT,
            "Requests in flight on the instance.",
            |i| Value::Gauge(f64::from(i.in_flight)),
        ),
        (
            INSTANCE_EJECTIONS,
            "Times the instance was taken out of rotation by health checks.",
            |i| Value::Counter(i.ejections),
        ),
        (
            INSTANCE_RETRIES,
            "Failed attempts on the instance that were retried elsewhere.",
            |i| Value::Counter(i.retries),
        ),
        (
            INSTANCE_RESENDS,
            "Requests written to the instance and sent to it again on a new connection, unanswered (a closed keep-alive connection, a broken pipelined line): it may have run them twice.",
            |i| Value::Counter(i.resends),
        ),
        (
            INSTANCE_BROKEN_ANSWERS,
            "Answers the instance broke off after their head went out (closed, reset, stalled or malformed body).",
            |i| Value::Counter(i.broken_answers),
        ),
        (
            INSTANCE_LATENCY,
            "Peak-EWMA of the instance's response-head latency.",
            |i| Value::Gauge(i.latency_seconds),
        ),
    ];
    for (name, help, value) in per_instance {
        let mut family = Family::new(name, help);
        for i in instances {
            family.push(instance_labels(i), value(i));
        }
        families.push(family);
    }
    let mut answers = Family::new(
        INSTANCE_ANSWERS,
        "Answers the instance sent, by status class.",
    );
    // All five classes from the start, as HAProxy's hrsp_* counters: see requests_total.
    for i in instances {
        for (class, count) in STATUS_CLASSES.iter().zip(i.answers) {
            let mut labels = instance_labels(i);
            labels.push(("status", (*class).to_string()));
            answers.push(labels, Value::Counter(count));
        }
    }
    families.push(answers);
    let mut up = Family::new(INSTANCE_UP, "1 when the instance may get traffic.");
    let mut state = Family::new(
        INSTANCE_STATE,
        "1 for the instance's current state (up, down, failed, draining).",
    );
    for i in instances {
        up.push(
            instance_labels(i),
            Value::Gauge(if i.state == "up" { 1.0 } else { 0.0 }),
        );
        for name in INSTANCE_STATES {
            let mut labels = instance_labels(i);
            labels.push(("state", name.to_string()));
            state.push(
                labels,
                Value::Gauge(if i.state == name { 1.0 } else { 0.0 }),
            );
        }
    }
    families.push(up);
    families.push(state);
    families.extend(process::families());
    families
}

/// The response cache's counters and size at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheSample {
    pub hits: u64,
    /// Misses and expired entries fetched again.
    pub misses: u64,
    /// Stale entries served (stale-while-revalidate and stale-if-error).
    pub stale: u64,
    pub bypasses: u64,
    /// Entries pushed out by the size bound.
    pub evictions: u64,
    /// Hits read from the shared tier (Redis) after a memory miss.
    pub shared_hits: u64,
    /// Shared-tier reads, writes and purges Redis did not serve (down, failed, too slow).
    pub shared_errors: u64,
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// With the shared tier: whether its Redis link serves now.
    pub shared_up: Option<bool>,
}

impl CacheSample {
    /// Requests answered from the cache (fresh or stale).
    pub fn served(&self) -> u64 {
        self.hits + self.stale
    }

    /// Requests that could have been answered from the cache.
    pub fn lookups(&self) -> u64 {
        self.hits + self.stale + self.misses
    }

    /// Share of lookups answered from the cache; `None` before the first lookup.
    pub fn hit_ratio(&self) -> Option<f64> {
        let lookups = self.lookups();
        (lookups > 0).then(|| self.served() as f64 / lookups as f64)
    }
}

/// The response cache's families.
pub fn cache_families(cache: &CacheSample) -> Vec<Family> {
    let families: [(&'static str, &'static str, Value); 10] = [
        (
            CACHE_HITS,
            "Requests answered from a fresh cache entry.",
            Value::Counter(cache.hits),
        ),
        (
            CACHE_MISSES,
            "Cacheable requests fetched from an instance (missing or expired entry).",
            Value::Counter(cache.misses),
        ),
        (
            CACHE_STALE,
            "Requests answered from a stale entry (stale-while-revalidate, stale-if-error).",
            Value::Counter(cache.stale),
        ),
        (
            CACHE_BYPASSES,
            "Requests on cached routes that may not use the cache (method, body, Authorization).",
            Value::Counter(cache.bypasses),
        ),
        (
            CACHE_EVICTIONS,
            "Entries pushed out by the cache size bound.",
            Value::Counter(cache.evictions),
        ),
        (
            CACHE_SHARED_HITS,
            "Hits read from the shared Redis tier after a memory miss (also counted as hits).",
            Value::Counter(cache.shared_hits),
        ),
        (
            CACHE_SHARED_ERRORS,
            "Shared-tier reads, writes and purges Redis did not serve (answered as misses).",
            Value::Counter(cache.shared_errors),
        ),
        (
            CACHE_ENTRIES,
            "Keys in the cache.",
            Value::Gauge(cache.entries as f64),
        ),
        (
            CACHE_BYTES,
            "Bytes held by the cache (bodies, headers, keys).",
            Value::Gauge(cache.bytes as f64),
        ),
        (
            CACHE_MAX_BYTES,
            "The cache size bound in bytes.",
            Value::Gauge(cache.max_bytes as f64),
        ),
    ];
    let shared_up = cache.shared_up.map(|up| {
        (
            CACHE_REDIS_UP,
            "With the shared tier: 1 while its Redis serves, 0 while each replica serves from memory only.",
            Value::Gauge(if up { 1.0 } else { 0.0 }),
        )
    });
    families
        .into_iter()
        .chain(shared_up)
        .map(|(name, help, value)| {
            let mut family = Family::new(name, help);
            family.push(Vec::new(), value);
            family
        })
        .collect()
}

/// Client connections open now and refused so far, by reason.
pub fn connection_families(open: usize, refused_total: u64, refused_per_ip: u64) -> Vec<Family> {
    let mut open_family = Family::new(OPEN_CONNECTIONS, "Client connections open now.");
    open_family.push(Vec::new(), Value::Gauge(open as f64));
    let mut refused = Family::new(
        CONNECTIONS_REFUSED,
        "Client connections refused by server.max_connections or max_connections_per_ip.",
    );
    for (reason, count) in [
        ("max_connections", refused_total),
        ("max_connections_per_ip", refused_per_ip),
    ] {
        refused.push(vec![("reason", reason.to_string())], Value::Counter(count));
    }
    vec![open_family, refused]
}

/// Rate-limit decisions by rule and outcome, and whether the shared store answers.
pub fn rate_limit_families(
    rules: &[(String, Arc<crate::ratelimit::RuleCounters>)],
    redis_up: Option<bool>,
) -> Vec<Family> {
    let mut decisions = Family::new(
        RATE_LIMIT_DECISIONS,
        "Requests by rule and outcome: allowed (passed every rule of the route), limited (refused by this rule).",
    );
    for (rule, counters) in rules {
        for (outcome, counter) in [
            ("allowed", &counters.allowed),
            ("limited", &counters.limited),
        ] {
            decisions.push(
                vec![("rule", rule.clone()), ("outcome", outcome.to_string())],
                Value::Counter(counter.load(Ordering::Relaxed)),
            );
        }
    }
    // Families of their own: these requests are also in the decisions above, so an outcome
    // label would count them twice in a sum over outcomes.
    let per_rule = |name, help, count: fn(&crate::ratelimit::RuleCounters) -> &AtomicU64| {
        let mut family = Family::new(name, help);
        for (rule, counters) in rules {
            family.push(
                vec![("rule", rule.clone())],
                Value::Counter(count(counters).load(Ordering::Relaxed)),
            );
        }
        family
    };
    let delayed = per_rule(
        RATE_LIMIT_DELAYED,
        "Requests a rule with a delay made wait for their turn, by rule; each is also counted as allowed.",
        |c| &c.delayed,
    );
    let mut families = vec![decisions, delayed];
    if let Some(up) = redis_up {
        families.push(per_rule(
            RATE_LIMIT_FALLBACK,
            "Rate-limit decisions made without Redis (while it did not answer), by rule; each is also counted as allowed or limited.",
            |c| &c.fallback,
        ));
        let mut family = Family::new(
            RATE_LIMIT_REDIS_UP,
            "1 while the shared rate-limit store (Redis) answers, 0 while falling back.",
        );
        family.push(Vec::new(), Value::Gauge(if up { 1.0 } else { 0.0 }));
        families.push(family);
    }
    families
}

/// Replica counts of each autoscaled upstream, from the autoscaler's status (`upstreams[]` with
/// `upstream`, `current`, `desired`, `ready`).
pub fn autoscale_families(status: &serde_json::Value) -> Vec<Family> {
    let families = [
        (
            AUTOSCALE_CURRENT,
            "Instances the autoscaler runs, starting ones included.",
            "current",
        ),
        (
            AUTOSCALE_DESIRED,
            "Instances the autoscaler is working toward.",
            "desired",
        ),
        (
            AUTOSCALE_READY,
            "Autoscaled instances that pass their health checks.",
            "ready",
        ),
    ]
    .map(|(name, help, field)| {
        let mut family = Family::new(name, help);
        for upstream in status["upstreams"].as_array().into_iter().flatten() {
            if let Some(value) = upstream[field].as_f64() {
                let name = upstream["upstream"].as_str().unwrap_or_default();
                family.push(vec![("upstream", name.to_string())], Value::Gauge(value));
            }
        }
        family
    });
    families.into_iter().collect()
}

fn instance_labels(i: &InstanceSample) -> Vec<(&'static str, String)> {
    vec![
        ("upstream", i.upstream.clone()),
        ("instance", i.instance.clone()),
    ]
}

/// Writes families in the OpenMetrics text format (what Prometheus scrapes), names prefixed.
pub fn render(families: Vec<Family>) -> String {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(Families(families)));
    let mut out = String::with_capacity(16 * 1024);
    if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        let _ = writeln!(out, "# encoding failed: {err}");
    }
    out
}

#[derive(Debug)]
struct Families(Vec<Family>);

impl prometheus_client::collector::Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for family in &self.0 {
            if family.samples.is_empty() {
                continue;
            }
            let mut metric =
                encoder.encode_descriptor(family.name, family.help, None, family.metric_type())?;
            if let [only] = family.samples.as_slice() {
                if only.labels.is_empty() {
                    // Through `encode_family` an empty label set would be written as `{}`.
                    encode_value(metric, &only.value)?;
                    continue;
                }
            }
            for sample in &family.samples {
                let escaped: Vec<(&str, Cow<str>)> = sample
                    .labels
                    .iter()
                    .map(|(k, v)| (*k, escaped_label_value(v)))
                    .collect();
                let labels: Vec<(&str, &str)> =
                    escaped.iter().map(|(k, v)| (*k, v.as_ref())).collect();
                encode_value(metric.encode_family(&labels.as_slice())?, &sample.value)?;
            }
        }
        Ok(())
    }
}

/// A label value as the exposition formats want it: `\`, `"` and line feeds escaped
/// (prometheus-client writes values as given, and a route named `a"b` broke the whole scrape).
fn escaped_label_value(value: &str) -> Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 4);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn encode_value(
    encoder: prometheus_client::encoding::MetricEncoder<'_>,
    value: &Value,
) -> std::fmt::Result {
    match value {
        Value::Counter(v) => ConstCounter::new(*v).encode(encoder),
        Value::CounterSeconds(v) => ConstCounter::new(*v).encode(encoder),
        Value::Gauge(v) => ConstGauge::new(*v).encode(encoder),
        Value::Histogram(h) => encode_histogram(encoder, h),
    }
}

fn encode_histogram(
    mut encoder: prometheus_client::encoding::MetricEncoder<'_>,
    histogram: &HistogramSnapshot,
) -> std::fmt::Result {
    // The encoder accumulates the counts itself and writes `f64::MAX` as `+Inf`.
    let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
        .iter()
        .copied()
        .chain(std::iter::once(f64::MAX))
        .zip(histogram.exported_counts())
        .collect();
    encoder.encode_histogram::<NoLabelSet>(histogram.sum_seconds, histogram.count(), &buckets, None)
}

/// Rewrites OpenMetrics text (what prometheus-client writes) as the Prometheus text format
/// 0.0.4, which Prometheus scrapes by default and `promtool check metrics` lints: counter
/// families are announced under their `_total` sample name, and `# EOF` goes.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + counters.len() * 16);
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let header = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match header {
            Some((prefix, rest)) => {
                let name = rest.split(' ').next().unwrap_or_default();
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(&name) {
                    out.push_str("_total");
                }
                out.push_str(&rest[name.len()..]);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = DurationHistogram::default();
        for _ in 0..90 {
            h.record(Duration::from_micros(800)); // (0.5 ms, 1 ms]
        }
        for _ in 0..10 {
            h.record(Duration::from_millis(40)); // (25 ms, 50 ms]
        }
        let snap = h.snapshot();
        assert_eq!(snap.count(), 100);
        let exported = snap.exported_counts();
        assert_eq!(exported[3], 90);
        assert_eq!(exported[8], 10);
        // Counted 1.25x apart, the percentiles land within a quarter of the truth.
        let p50 = snap.quantile(0.5).unwrap();
        assert!(p50 > 0.00063 && p50 <= 0.0008, "{p50}");
        let p99 = snap.quantile(0.99).unwrap();
        assert!(p99 > 0.0315 && p99 <= 0.04, "{p99}");
        assert_eq!(HistogramSnapshot::default().quantile(0.5), None);
        h.record(Duration::from_secs(100));
        assert_eq!(h.snapshot().exported_counts()[DURATION_BUCKETS.len()], 1);
        assert_eq!(h.snapshot().quantile(1.0), Some(60.0));
        // A duration on a bound counts in the bucket it bounds (`le`), in both sets.
        let on_bound = DurationHistogram::default();
        on_bound.record(Duration::from_micros(250));
        assert_eq!(on_bound.snapshot().exported_counts()[1], 1);
    }

    #[test]
    fn every_exported_bound_is_a_fine_one() {
        for bound in DURATION_BUCKETS {
            assert!(FINE_BUCKETS.contains(&bound), "{bound}");
        }
        assert!(FINE_BUCKETS.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn snapshots_subtract_to_what_happened_between() {
        let h = DurationHistogram::default();
        h.record(Duration::from_millis(1));
        let before = h.snapshot();
        h.record(Duration::from_millis(3));
        h.record(Duration::from_millis(3));
        let delta = h.snapshot().since(&before);
        assert_eq!(delta.count(), 2);
        assert!((delta.sum_seconds - 0.006).abs() < 1e-9);
    }

    #[test]
    fn requests_are_counted_by_method_and_status_class() {
        let metrics = Metrics::default();
        let stats = metrics.route("api", "app");
        assert!(Arc::ptr_eq(&stats, &metrics.route("api", "app")));
        metrics.request_started();
        assert_eq!(metrics.in_flight(), 1);
        metrics.request_ended();
        assert_eq!(metrics.in_flight(), 0);
        stats.record(&Method::GET, 204, Duration::from_millis(2));
        stats.record(&Method::from_bytes(b"PURGE").unwrap(), 503, Duration::ZERO);
        assert_eq!(stats.by_status_class(), [0, 1, 0, 0, 1]);
        let off = render(core_families(&metrics, &[], false));
        assert!(!off.contains("scalegate_requests_total{"), "{off}");
        let text = render(core_families(&metrics, &[], true));
        assert!(text.contains(
            "scalegate_requests_total{route=\"api\",upstream=\"app\",method=\"GET\",status=\"2xx\"} 1"
        ), "{text}");
        assert!(
            text.contains("method=\"OTHER\",status=\"5xx\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE scalegate_request_duration_seconds histogram"));
        assert!(text.ends_with("# EOF\n"));
        assert!(
            text.contains(r#"_bucket{le="+Inf",route="api",upstream="app"} 2"#),
            "{text}"
        );
        assert!(text.contains("scalegate_in_flight_requests 0"), "{text}");
    }

    #[test]
    fn openmetrics_counters_are_renamed_for_the_prometheus_text_format() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{x=\"1\"} 2\n# HELP g G.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 2\n# HELP g G.\n# TYPE g gauge\ng 1\n"
        );
    }
}
