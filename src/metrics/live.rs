//! Live statistics for the dashboard: once a second the gateway's counters are read and turned
//! into rates and percentiles over that second (a `StatsPoint`), kept for a few minutes of
//! history and pushed to `/api/stream` subscribers. Nothing here runs on the request path.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::{CacheSample, HistogramSnapshot, InstanceSample, STATUS_CLASSES};

/// Points kept for the charts: five minutes at one a second.
pub const HISTORY: usize = 300;
/// How often a point is made.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Cumulative counters read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub by_class: [u64; STATUS_CLASSES.len()],
    pub histogram: HistogramSnapshot,
    pub in_flight: i64,
    /// Requests refused by rate-limit rules (429), all rules together.
    pub limited: u64,
    /// Requests are counted by route (`server.metrics`): without, there is no request rate.
    pub recorded: bool,
    pub instances: Vec<InstanceSample>,
    pub cache: CacheSample,
}

/// One second of the gateway, as the dashboard shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsPoint {
    /// Unix time in milliseconds.
    pub t: u64,
    /// `None` while requests are not counted (`server.metrics = false`), as the 5xx rate.
    pub rps: Option<f64>,
    /// Responses with a 5xx status per second.
    pub errors_per_s: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub in_flight: i64,
    /// Instances per upstream (what the autoscaler changes).
    pub replicas: BTreeMap<String, usize>,
    /// Share of cacheable requests answered from the cache in this second; `None` without any.
    pub cache_hit_ratio: Option<f64>,
    /// Rate-limit rejections per second.
    pub limited_per_s: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceRow {
    pub upstream: String,
    pub addr: String,
    pub state: &'static str,
    pub in_flight: u32,
    pub rps: f64,
    pub errors_per_s: f64,
    pub latency_ms: f64,
}

/// What happened between two readings `elapsed` apart.
pub fn stats_point(before: &Totals, now: &Totals, elapsed: Duration, unix_ms: u64) -> StatsPoint {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = |after: u64, earlier: u64| after.saturating_sub(earlier) as f64 / secs;
    let total = |t: &Totals| t.by_class.iter().sum::<u64>();
    let window = now.histogram.since(&before.histogram);
    let ms = |q: f64| window.quantile(q).map(|s| s * 1000.0);
    let mut replicas = BTreeMap::new();
    let instances = now
        .instances
        .iter()
        .map(|i| {
            *replicas.entry(i.upstream.clone()).or_insert(0) += 1;
            let earlier = before
                .instances
                .iter()
                .find(|b| b.upstream == i.upstream && b.instance == i.instance);
            InstanceRow {
                upstream: i.upstream.clone(),
                addr: i.instance.clone(),
                state: i.state,
                in_flight: i.in_flight,
                rps: rate(i.requests, earlier.map_or(i.requests, |b| b.requests)),
                errors_per_s: rate(i.failures, earlier.map_or(i.failures, |b| b.failures)),
                latency_ms: i.latency_seconds * 1000.0,
            }
        })
        .collect();
    StatsPoint {
        t: unix_ms,
        rps: now.recorded.then(|| rate(total(now), total(before))),
        errors_per_s: now
            .recorded
            .then(|| rate(now.by_class[4], before.by_class[4])),
        p50_ms: ms(0.5),
        p95_ms: ms(0.95),
        p99_ms: ms(0.99),
        in_flight: now.in_flight,
        replicas,
        cache_hit_ratio: cache_hit_ratio(&before.cache, &now.cache),
        limited_per_s: rate(now.limited, before.limited),
        instances,
    }
}

fn cache_hit_ratio(before: &CacheSample, now: &CacheSample) -> Option<f64> {
    let lookups = now.lookups().saturating_sub(before.lookups());
    let served = now.served().saturating_sub(before.served());
    (lookups > 0).then(|| served as f64 / lookups as f64)
}

/// The latest point (watched by stream subscribers) and the recent history.
pub struct LiveStats {
    latest: watch::Sender<Arc<StatsPoint>>,
    history: Mutex<VecDeque<StatsPoint>>,
    /// Live streams open: each holds an admin connection for as long as its page is open, and
    /// the admin port's connections are capped, `/health` among them.
    streams: Arc<tokio::sync::Semaphore>,
}

/// Live streams (`/api/stream`) open at most: a quarter of the admin port's connections.
pub const MAX_STREAMS: usize = 64;

impl Default for LiveStats {
    fn default() -> Self {
        LiveStats {
            latest: watch::channel(Arc::new(StatsPoint::default())).0,
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        }
    }
}

impl LiveStats {
    pub fn publish(&self, point: StatsPoint) {
        {
            let mut history = self.history.lock().expect("stats history lock");
            if history.len() == HISTORY {
                history.pop_front();
            }
            // The per-instance table is only needed for the latest point.
            history.push_back(StatsPoint {
                instances: Vec::new(),
                ..point.clone()
            });
        }
        self.latest.send_replace(Arc::new(point));
    }

    pub fn latest(&self) -> Arc<StatsPoint> {
        self.latest.borrow().clone()
    }

    pub fn history(&self) -> Vec<StatsPoint> {
        self.history
            .lock()
            .expect("stats history lock")
            .iter()
            .cloned()
            .collect()
    }

    /// The points to come, with a stream's place held until both are dropped; `None` when
    /// [`MAX_STREAMS`] are open.
    pub fn subscribe(
        &self,
    ) -> Option<(
        watch::Receiver<Arc<StatsPoint>>,
        tokio::sync::OwnedSemaphorePermit,
    )> {
        let place = self.streams.clone().try_acquire_owned().ok()?;
        Some((self.latest.subscribe(), place))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(by_class: [u64; 5], requests: u64, failures: u64) -> Totals {
        Totals {
            by_class,
            histogram: HistogramSnapshot::default(),
            in_flight: 3,
            limited: 0,
            recorded: true,
            instances: vec![InstanceSample {
                upstream: "app".into(),
                instance: "127.0.0.1:1".into(),
                state: "up",
                in_flight: 3,
                requests,
                failures,
                ejections: 0,
                retries: 0,
                resends: 0,
                broken_answers: 0,
                answers: [0; 5],
                latency_seconds: 0.0015,
            }],
            cache: CacheSample::default(),
        }
    }

    #[test]
    fn rates_are_deltas_over_the_elapsed_time() {
        let mut before = totals([0, 100, 0, 0, 10], 110, 1);
        let mut now = totals([0, 300, 0, 0, 30], 330, 5);
        before.limited = 4;
        now.limited = 10;
        let point = stats_point(&before, &now, Duration::from_secs(2), 42);
        assert!((point.limited_per_s - 3.0).abs() < 1e-9);
        assert_eq!(point.t, 42);
        assert!((point.rps.unwrap() - 110.0).abs() < 1e-9);
        assert!((point.errors_per_s.unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(point.p50_ms, None, "no requests were timed");
        assert_eq!(point.replicas["app"], 1);
        assert!((point.instances[0].rps - 110.0).abs() < 1e-9);
        assert!((point.instances[0].errors_per_s - 2.0).abs() < 1e-9);
    }

    /// With requests not counted, the point has no request rate rather than a 0 that looks
    /// like no traffic; instances still show theirs.
    #[test]
    fn no_request_rate_while_requests_are_not_counted() {
        let before = totals([0; 5], 0, 0);
        let mut now = totals([0; 5], 50, 0);
        now.recorded = false;
        let point = stats_point(&before, &now, Duration::from_secs(1), 0);
        assert_eq!((point.rps, point.errors_per_s), (None, None));
        assert_eq!(point.instances[0].rps, 50.0);
    }

    #[test]
    fn cache_hit_ratio_is_over_the_second() {
        let mut before = totals([0; 5], 0, 0);
        let mut now = before.clone();
        assert_eq!(
            stats_point(&before, &now, Duration::from_secs(1), 0).cache_hit_ratio,
            None
        );
        before.cache.hits = 100;
        before.cache.misses = 100;
        now.cache.hits = 130;
        now.cache.stale = 10;
        now.cache.misses = 110;
        let point = stats_point(&before, &now, Duration::from_secs(1), 0);
        assert_eq!(point.cache_hit_ratio, Some(0.8));
    }

    #[test]
    fn a_new_instance_starts_at_zero_rate() {
        let before = Totals::default();
        let now = totals([0, 5, 0, 0, 0], 5, 0);
        let point = stats_point(&before, &now, Duration::from_secs(1), 0);
        assert_eq!(point.instances[0].rps, 0.0);
    }

    #[test]
    fn history_is_bounded_and_keeps_instances_only_in_the_latest() {
        let live = LiveStats::default();
        for n in 0..(HISTORY as u64 + 5) {
            let mut point = stats_point(
                &Totals::default(),
                &totals([0; 5], 0, 0),
                Duration::from_secs(1),
                n,
            );
            point.rps = Some(n as f64);
            live.publish(point);
        }
        let history = live.history();
        assert_eq!(history.len(), HISTORY);
        assert_eq!(history[0].t, 5);
        assert!(history.iter().all(|p| p.instances.is_empty()));
        assert_eq!(live.latest().instances.len(), 1);
    }
}
