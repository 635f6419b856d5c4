//! The replica decision: the Kubernetes HPA algorithm (`replica_calculator.go` for the per-metric
//! recommendation, `horizontal.go` for stabilization, scaling policies and bounds) as pure
//! functions over plain data, with the clock passed in.
//!
//! Per metric: ratio = average of the ready instances' values / target; no change while the
//! ratio is within the tolerance band; else ceil(ratio × ready). Ready instances without a
//! sample count at the target when scaling down and at 0 when scaling up; instances still
//! starting count at 0 when scaling up; when that substitution flips the direction or lands in
//! the band, the count stays. The largest recommendation over all metrics wins, then it is
//! stabilized (min over the up window, max over the down window of past recommendations) and
//! capped by the scaling policies and the min/max bounds.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// A load signal the autoscaler can target, each an average per ready instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Requests in flight, averaged over the sync period.
    InFlightPerInstance,
    /// Requests started per second.
    RpsPerInstance,
    /// Response-head latency in ms (approximated by the instance's peak-EWMA latency).
    P95LatencyMs,
    /// CPU use of the instance's process in percent of one core (process provider only).
    CpuPercent,
}

impl Metric {
    pub const ALL: [Metric; 4] = [
        Metric::InFlightPerInstance,
        Metric::RpsPerInstance,
        Metric::P95LatencyMs,
        Metric::CpuPercent,
    ];

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Metric::InFlightPerInstance => "in_flight_per_instance",
            Metric::RpsPerInstance => "rps_per_instance",
            Metric::P95LatencyMs => "p95_latency_ms",
            Metric::CpuPercent => "cpu_percent",
        }
    }
}

/// One metric over one sync period, with its target.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSample {
    pub metric: Metric,
    pub target: f64,
    /// One entry per ready instance: its value, or `None` when it had no sample.
    pub ready: Vec<Option<f64>>,
}

/// What one metric asked for, kept for the admin API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricRecommendation {
    pub metric: Metric,
    /// Average over the ready instances that had a sample.
    pub value: Option<f64>,
    pub target: f64,
    /// `None` when no ready instance had a sample.
    pub replicas: Option<u32>,
}

/// ceil() that ignores float noise such as 2.0000000000000004.
fn ceil_count(x: f64) -> i64 {
    (x - 1e-9).ceil().max(0.0) as i64
}

/// An instance count, at most `u32::MAX` (a tiny target can ask for more; the bounds then
/// cap it) rather than wrapped to a small one.
fn to_count(replicas: i64) -> u32 {
    u32::try_from(replicas).unwrap_or(u32::MAX)
}

/// The HPA recommendation for one metric (`calcPlainMetricReplicas`). `current` counts every
/// instance, including those still starting; `sample.ready` has one entry per ready instance.
pub fn recommend(current: u32, sample: &MetricSample, tolerance: f64) -> Option<u32> {
    let target = sample.target;
    let values: Vec<f64> = sample.ready.iter().flatten().copied().collect();
    if values.is_empty() || target <= 0.0 {
        return None;
    }
    let ready = values.len() as f64;
    let missing = (sample.ready.len() - values.len()) as f64;
    let unready = f64::from(current).max(sample.ready.len() as f64) - sample.ready.len() as f64;
    let sum: f64 = values.iter().sum();
    let ratio = sum / (target * ready);
    let scale_up_with_unready = unready > 0.0 && ratio > 1.0;
    if !scale_up_with_unready && missing == 0.0 {
        if (1.0 - ratio).abs() <= tolerance {
            return Some(current);
        }
        return Some(to_count(ceil_count(ratio * ready)));
    }
    // Missing samples count at the target on the way down and at 0 on the way up.
    let mut total = sum;
    let mut count = ready + missing;
    if ratio < 1.0 {
        total += target * missing;
    }
    if scale_up_with_unready {
        count += unready;
    }
    let new_ratio = total / (target * count);
    if (1.0 - new_ratio).abs() <= tolerance
        || (ratio < 1.0 && new_ratio > 1.0)
        || (ratio > 1.0 && new_ratio < 1.0)
    {
        return Some(current);
    }
    let replicas = ceil_count(new_ratio * count);
    let current_i = i64::from(current);
    if (new_ratio < 1.0 && replicas > current_i) || (new_ratio > 1.0 && replicas < current_i) {
        return Some(current);
    }
    Some(to_count(replicas))
}

/// How a scaling policy limits the change within its period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    Pods,
    Percent,
}

/// One HPA scaling policy: at most `value` instances (or percent) per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalingPolicy {
    pub kind: PolicyKind,
    pub value: u32,
    pub period: Duration,
}

/// Which policy wins when several are given (HPA `selectPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectPolicy {
    /// The policy allowing the largest change.
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No change in this direction.
    Disabled,
}

/// Behavior in one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalingRules {
    pub stabilization: Duration,
    pub policies: Vec<ScalingPolicy>,
    pub select: SelectPolicy,
}

impl ScalingRules {
    /// HPA default for scaling up: no window; 4 instances or 100 % per 15 s, whichever is more.
    pub fn default_up() -> ScalingRules {
        ScalingRules {
            stabilization: Duration::ZERO,
            policies: vec![
                ScalingPolicy {
                    kind: PolicyKind::Pods,
                    value: 4,
                    period: Duration::from_secs(15),
                },
                ScalingPolicy {
                    kind: PolicyKind::Percent,
                    value: 100,
                    period: Duration::from_secs(15),
                },
            ],
            select: SelectPolicy::Max,
        }
    }

    /// HPA default for scaling down: 300 s window; 100 % per 15 s.
    pub fn default_down() -> ScalingRules {
        ScalingRules {
            stabilization: Duration::from_secs(300),
            policies: vec![ScalingPolicy {
                kind: PolicyKind::Percent,
                value: 100,
                period: Duration::from_secs(15),
            }],
            select: SelectPolicy::Max,
        }
    }
}

/// The inclusive replica bounds in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

/// Everything the decision needs besides the samples.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub tolerance: f64,
    pub scale_up: ScalingRules,
    pub scale_down: ScalingRules,
}

/// Past recommendations (for stabilization) and scale events (for policies) of one upstream.
#[derive(Debug, Default, Clone)]
pub struct History {
    recommendations: VecDeque<(Instant, u32)>,
    /// Positive: instances added, negative: removed.
    events: VecDeque<(Instant, i64)>,
    /// The count found at the first decision has been recorded as a recommendation.
    seeded: bool,
}

impl History {
    /// Records that the count went from `from` to `to` at `now`. A start from nothing (the
    /// pool brought up to `min`) is not a scaling step and takes nothing from the policies'
    /// allowance, as HPA never scales a target up from 0.
    pub fn record_scale(&mut self, now: Instant, from: u32, to: u32) {
        if from != to && from > 0 {
            self.events
                .push_back((now, i64::from(to) - i64::from(from)));
        }
    }

    /// Instances (added, removed) by events newer than `now - period`.
    fn changes_within(&self, now: Instant, period: Duration) -> (i64, i64) {
        let mut added = 0;
        let mut removed = 0;
        for &(at, delta) in &self.events {
            if now.saturating_duration_since(at) < period {
                if delta > 0 {
                    added += delta;
                } else {
                    removed -= delta;
                }
            }
        }
        (added, removed)
    }

    fn prune(&mut self, now: Instant, config: &PolicyConfig) {
        let keep_recommendations = config
            .scale_up
            .stabilization
            .max(config.scale_down.stabilization);
        self.recommendations
            .retain(|(at, _)| now.saturating_duration_since(*at) <= keep_recommendations);
        let keep_events = config
            .scale_up
            .policies
            .iter()
            .chain(&config.scale_down.policies)
            .map(|p| p.period)
            .max()
            .unwrap_or_default();
        self.events
            .retain(|(at, _)| now.saturating_duration_since(*at) <= keep_events);
    }
}

/// The outcome of one sync: the count to move to and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub current: u32,
    pub desired: u32,
    /// Largest metric recommendation before stabilization and limits.
    pub recommended: Option<u32>,
    pub reason: &'static str,
    pub metrics: Vec<MetricRecommendation>,
    pub bounds: Bounds,
}

/// One HPA sync: recommendation per metric, the largest wins, then bounds, stabilization and
/// policies. Records the recommendation in `history`; the caller records the scale event once
/// it applied the change.
pub fn decide(
    now: Instant,
    current: u32,
    samples: &[MetricSample],
    bounds: Bounds,
    config: &PolicyConfig,
    history: &mut History,
) -> Decision {
    history.prune(now, config);
    let metrics: Vec<MetricRecommendation> = samples
        .iter()
        .map(|sample| {
            let values: Vec<f64> = sample.ready.iter().flatten().copied().collect();
            MetricRecommendation {
                metric: sample.metric,
                value: (!values.is_empty())
                    .then(|| values.iter().sum::<f64>() / values.len() as f64),
                target: sample.target,
                replicas: recommend(current, sample, config.tolerance),
            }
        })
        .collect();
    let recommended = metrics.iter().filter_map(|m| m.replicas).max();
    // As the HPA: a metric without samples may hide load, so the others cannot scale down.
    let unmeasured = metrics.iter().any(|m| m.replicas.is_none());
    let (desired, reason) = if current > bounds.max {
        (bounds.max, "above max")
    } else if current < bounds.min {
        (bounds.min, "below min")
    } else if unmeasured && recommended.is_some_and(|r| r < current) {
        (current, "a metric without samples holds the scale-down")
    } else if let Some(recommended) = recommended {
        // HPA's `recordInitialRecommendation`: the count found at start stands in the down
        // window, so a restarted gateway does not shrink the pool before the window passed.
        if !history.seeded {
            history.seeded = true;
            history.recommendations.push_back((now, current));
        }
        let stabilized = stabilize(now, current, recommended, config, history);
        history.recommendations.push_back((now, recommended));
        limit_rate(now, current, stabilized, bounds, config, history)
    } else {
        (current, "no metrics from ready instances")
    };
    Decision {
        current,
        desired,
        recommended,
        reason,
        metrics,
        bounds,
    }
}

/// `stabilizeRecommendationWithBehaviors`: up to the smallest recommendation within the up
/// window, down to the largest within the down window.
fn stabilize(
    now: Instant,
    current: u32,
    recommendation: u32,
    config: &PolicyConfig,
    history: &History,
) -> u32 {
    let mut up = recommendation;
    let mut down = recommendation;
    for &(at, past) in &history.recommendations {
        let age = now.saturating_duration_since(at);
        if age < config.scale_up.stabilization {
            up = up.min(past);
        }
        if age < config.scale_down.stabilization {
            down = down.max(past);
        }
    }
    current.max(up).min(down)
}

/// `convertDesiredReplicasWithBehaviorRate`: caps the step by the policies and the bounds.
fn limit_rate(
    now: Instant,
    current: u32,
    desired: u32,
    bounds: Bounds,
    config: &PolicyConfig,
    history: &History,
) -> (u32, &'static str) {
    let mut minimum = i64::from(bounds.min);
    let mut maximum = i64::from(bounds.max);
    let cur = i64::from(current);
    // The HPA calls these TooFewReplicas and TooManyReplicas: the wanted count was outside the
    // bounds, not the count before.
    let mut reason_low = "held at min";
    let mut reason_high = "held at max";
    if desired > current {
        let limit = scale_limit(now, cur, &config.scale_up, history, true).max(cur);
        if maximum > limit {
            maximum = limit;
            reason_high = "scale-up limited by policy";
        }
    } else if desired < current {
        let limit = scale_limit(now, cur, &config.scale_down, history, false).min(cur);
        if minimum < limit {
            minimum = limit;
            reason_low = "scale-down limited by policy";
        }
    }
    let wanted = i64::from(desired);
    if wanted < minimum {
        (minimum as u32, reason_low)
    } else if wanted > maximum {
        (maximum as u32, reason_high)
    } else if desired == current {
        (desired, "within tolerance or stabilized")
    } else {
        (desired, "desired within range")
    }
}

/// The furthest count the policies allow this period (`calculateScale{Up,Down}Limit`).
fn scale_limit(
    now: Instant,
    current: i64,
    rules: &ScalingRules,
    history: &History,
    up: bool,
) -> i64 {
    // Max picks the biggest change: the highest count going up, the lowest going down.
    let biggest = match rules.select {
        SelectPolicy::Disabled => return current,
        SelectPolicy::Max => up,
        SelectPolicy::Min => !up,
    };
    let mut result: Option<i64> = None;
    for policy in &rules.policies {
        let (added, removed) = history.changes_within(now, policy.period);
        let start = current - added + removed;
        let value = i64::from(policy.value);
        let proposed = match (policy.kind, up) {
            (PolicyKind::Pods, true) => start + value,
            (PolicyKind::Pods, false) => start - value,
            (PolicyKind::Percent, true) => ceil_count(start as f64 * (1.0 + value as f64 / 100.0)),
            // Truncates like the HPA's int32 conversion.
            (PolicyKind::Percent, false) => (start as f64 * (1.0 - value as f64 / 100.0)) as i64,
        };
        result = Some(match result {
            None => proposed,
            Some(r) if biggest => r.max(proposed),
            Some(r) => r.min(proposed),
        });
    }
    result.unwrap_or(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(target: f64, ready: &[Option<f64>]) -> MetricSample {
        MetricSample {
            metric: Metric::InFlightPerInstance,
            target,
            ready: ready.to_vec(),
        }
    }

    fn all(values: &[f64]) -> Vec<Option<f64>> {
        values.iter().copied().map(Some).collect()
    }

    fn config() -> PolicyConfig {
        PolicyConfig {
            tolerance: 0.1,
            scale_up: ScalingRules::default_up(),
            scale_down: ScalingRules::default_down(),
        }
    }

    const WIDE: Bounds = Bounds { min: 1, max: 100 };

    #[test]
    fn docs_example_double_and_halve() {
        // Kubernetes docs: current 200m for a target of 100m doubles; 50m halves.
        assert_eq!(
            recommend(4, &sample(100.0, &all(&[200.0; 4])), 0.1),
            Some(8)
        );
        assert_eq!(recommend(4, &sample(100.0, &all(&[50.0; 4])), 0.1), Some(2));
    }

    #[test]
    fn tolerance_band_keeps_the_count() {
        assert_eq!(recommend(3, &sample(10.0, &all(&[10.9; 3])), 0.1), Some(3));
        assert_eq!(recommend(3, &sample(10.0, &all(&[9.1; 3])), 0.1), Some(3));
        assert_eq!(recommend(3, &sample(10.0, &all(&[11.5; 3])), 0.1), Some(4));
        assert_eq!(recommend(3, &sample(10.0, &all(&[1.0; 3])), 0.1), Some(1));
        assert_eq!(recommend(3, &sample(10.0, &[None, None, None]), 0.1), None);
    }

    #[test]
    fn starting_instances_count_as_capacity_not_load_when_scaling_up() {
        // 2 ready at 2× target, 2 starting: (20+20+0+0)/4 = 1× target → stay at 4.
        assert_eq!(
            recommend(4, &sample(10.0, &all(&[20.0, 20.0])), 0.1),
            Some(4)
        );
        // 2 ready at 3× target, 1 starting: 60/3 = 2× → 6.
        assert_eq!(
            recommend(3, &sample(10.0, &all(&[30.0, 30.0])), 0.1),
            Some(6)
        );
        // Scaling down ignores starting instances: ceil(0.5 × 2) = 1.
        assert_eq!(recommend(3, &sample(10.0, &all(&[5.0, 5.0])), 0.1), Some(1));
    }

    #[test]
    fn missing_samples_count_at_target_down_and_zero_up() {
        // Down: (2 + 10) / 2 = 0.6 → ceil(0.6 × 2) = 2.
        assert_eq!(
            recommend(2, &sample(10.0, &[Some(2.0), None]), 0.1),
            Some(2)
        );
        // Down: (0 + 10 + 10 + 10) / 4 = 0.75 → 3.
        assert_eq!(
            recommend(4, &sample(10.0, &[Some(0.0), None, None, None]), 0.1),
            Some(3)
        );
        // Up: (40 + 0) / 2 = 2 → 4.
        assert_eq!(
            recommend(2, &sample(10.0, &[Some(40.0), None]), 0.1),
            Some(4)
        );
        // Up that the substitution turns into "within tolerance": keep.
        assert_eq!(
            recommend(2, &sample(10.0, &[Some(21.0), None]), 0.1),
            Some(2)
        );
    }

    #[test]
    fn largest_metric_wins() {
        let now = Instant::now();
        let samples = [
            sample(10.0, &all(&[20.0, 20.0])),
            MetricSample {
                metric: Metric::RpsPerInstance,
                target: 100.0,
                ready: all(&[300.0, 300.0]),
            },
        ];
        let decision = decide(now, 2, &samples, WIDE, &config(), &mut History::default());
        assert_eq!(decision.desired, 6);
        assert_eq!(decision.metrics[0].replicas, Some(4));
        assert_eq!(decision.metrics[1].replicas, Some(6));
    }

    /// A metric without samples holds a scale-down the others ask for (the HPA refuses to
    /// scale down on invalid metrics), not a scale-up.
    #[test]
    fn a_metric_without_samples_holds_a_scale_down() {
        let now = Instant::now();
        let quiet = [sample(10.0, &all(&[1.0; 6])), sample(10.0, &[None; 6])];
        let decision = decide(now, 6, &quiet, WIDE, &config(), &mut History::default());
        assert_eq!(decision.desired, 6, "{}", decision.reason);
        assert_eq!(
            decision.reason,
            "a metric without samples holds the scale-down"
        );
        let busy = [sample(10.0, &all(&[30.0; 2])), sample(10.0, &[None; 2])];
        let decision = decide(now, 2, &busy, WIDE, &config(), &mut History::default());
        assert_eq!(decision.desired, 6);
    }

    /// A recommendation beyond u32 saturates; the bounds cap it.
    #[test]
    fn a_huge_recommendation_is_capped_not_wrapped() {
        let tiny = sample(1e-9, &all(&[1e3; 4]));
        assert_eq!(recommend(4, &tiny, 0.1), Some(u32::MAX));
        let decision = decide(
            Instant::now(),
            4,
            &[tiny],
            WIDE,
            &config(),
            &mut History::default(),
        );
        assert!(decision.desired > 4);
    }

    /// Runs one sync with all instances at `load` × target and applies the result.
    fn sync(
        now: Instant,
        current: &mut u32,
        load: f64,
        bounds: Bounds,
        config: &PolicyConfig,
        history: &mut History,
    ) -> Decision {
        let values = vec![Some(10.0 * load); *current as usize];
        let decision = decide(
            now,
            *current,
            &[sample(10.0, &values)],
            bounds,
            config,
            history,
        );
        history.record_scale(now, *current, decision.desired);
        *current = decision.desired;
        decision
    }

    #[test]
    fn flapping_is_suppressed_by_the_down_window() {
        let config = PolicyConfig {
            scale_down: ScalingRules {
                stabilization: Duration::from_secs(300),
                ..ScalingRules::default_down()
            },
            ..config()
        };
        let mut history = History::default();
        let start = Instant::now();
        let mut current = 2;
        // Load alternates high/low every 15 s: the count rises but never falls inside the window.
        let mut counts = Vec::new();
        for step in 0..10u32 {
            let load = if step % 2 == 0 { 2.0 } else { 0.3 };
            let now = start + Duration::from_secs(15 * u64::from(step));
            sync(now, &mut current, load, WIDE, &config, &mut history);
            counts.push(current);
        }
        assert!(counts.windows(2).all(|w| w[1] >= w[0]), "{counts:?}");
        // Calm afterwards: it shrinks only once the window has passed the last high sample.
        let last_high = start + Duration::from_secs(15 * 8);
        let peak = current;
        let mut t = last_high + Duration::from_secs(15);
        while t < last_high + Duration::from_secs(300) {
            sync(t, &mut current, 0.1, WIDE, &config, &mut history);
            assert_eq!(current, peak, "shrank inside the window at {t:?}");
            t += Duration::from_secs(15);
        }
        sync(
            last_high + Duration::from_secs(315),
            &mut current,
            0.1,
            WIDE,
            &config,
            &mut history,
        );
        assert!(current < peak);
    }

    #[test]
    fn a_restart_does_not_shrink_the_pool_before_the_down_window_passed() {
        let config = config();
        let mut history = History::default();
        let start = Instant::now();
        // Found at 8 instances, all idle from the first decision on.
        let mut current = 8;
        let mut t = start;
        while t < start + Duration::from_secs(300) {
            sync(t, &mut current, 0.1, WIDE, &config, &mut history);
            assert_eq!(current, 8, "shrank at {t:?}");
            t += Duration::from_secs(15);
        }
        sync(
            start + Duration::from_secs(301),
            &mut current,
            0.1,
            WIDE,
            &config,
            &mut history,
        );
        assert!(current < 8);
    }

    #[test]
    fn the_start_from_nothing_takes_no_scale_up_allowance() {
        let config = config();
        let mut history = History::default();
        let start = Instant::now();
        let bounds = Bounds { min: 4, max: 20 };
        let mut current = 0;
        let d = sync(start, &mut current, 1.0, bounds, &config, &mut history);
        assert_eq!((d.desired, d.reason), (4, "below min"));
        // 4× the target right away: 4 more (Pods 4, Percent 100 % of 4) within the first period.
        let d = sync(
            start + Duration::from_secs(2),
            &mut current,
            4.0,
            bounds,
            &config,
            &mut history,
        );
        assert_eq!(d.desired, 8, "{d:?}");
    }

    #[test]
    fn up_window_takes_the_smallest_recent_recommendation() {
        let config = PolicyConfig {
            scale_up: ScalingRules {
                stabilization: Duration::from_secs(60),
                ..ScalingRules::default_up()
            },
            ..config()
        };
        let mut history = History::default();
        let start = Instant::now();
        let mut current = 2;
        sync(start, &mut current, 1.0, WIDE, &config, &mut history);
        // A short spike within the up window does not scale up.
        let spike = sync(
            start + Duration::from_secs(15),
            &mut current,
            3.0,
            WIDE,
            &config,
            &mut history,
        );
        assert_eq!(spike.desired, 2);
        // Sustained past the window (the calm sample aged out): it scales.
        sync(
            start + Duration::from_secs(30),
            &mut current,
            3.0,
            WIDE,
            &config,
            &mut history,
        );
        sync(
            start + Duration::from_secs(61),
            &mut current,
            3.0,
            WIDE,
            &config,
            &mut history,
        );
        assert_eq!(current, 6);
    }

    #[test]
    fn default_scale_up_allows_four_or_double_per_period() {
        let config = config();
        let mut history = History::default();
        let start = Instant::now();
        let mut current = 1;
        // Load 20× target from one instance: 4 more (more than 100 %) in the first period.
        let d = sync(start, &mut current, 20.0, WIDE, &config, &mut history);
        assert_eq!((d.desired, d.reason), (5, "scale-up limited by policy"));
        // Within the same 15 s period nothing more is allowed (period start = 1).
        let d = sync(
            start + Duration::from_secs(5),
            &mut current,
            20.0,
            WIDE,
            &config,
            &mut history,
        );
        assert_eq!(d.desired, 5);
        // Next period from 5: max(5 + 4, 5 × 2) = 10.
        let d = sync(
            start + Duration::from_secs(16),
            &mut current,
            20.0,
            WIDE,
            &config,
            &mut history,
        );
        assert_eq!(d.desired, 10);
    }

    #[test]
    fn docs_example_scale_down_pods_4_or_10_percent_per_minute() {
        // Kubernetes docs: policies {Pods 4 / 60 s, Percent 10 / 60 s}, selectPolicy Max, from 80
        // to a target of 10: first 8 go, then at 72 also 8 (10 % rounded up), and below 40
        // the Pods policy removes 4 at a time.
        let config = PolicyConfig {
            tolerance: 0.1,
            scale_up: ScalingRules::default_up(),
            scale_down: ScalingRules {
                stabilization: Duration::ZERO,
                policies: vec![
                    ScalingPolicy {
                        kind: PolicyKind::Pods,
                        value: 4,
                        period: Duration::from_secs(60),
                    },
                    ScalingPolicy {
                        kind: PolicyKind::Percent,
                        value: 10,
                        period: Duration::from_secs(60),
                    },
                ],
                select: SelectPolicy::Max,
            },
        };
        let mut history = History::default();
        let start = Instant::now();
        let mut current = 80;
        let mut steps = Vec::new();
        for minute in 0..20u64 {
            // A constant total load of 10 × target, spread over the current instances.
            let values = vec![Some(100.0 / f64::from(current)); current as usize];
            let now = start + Duration::from_secs(60 * minute + 1);
            let d = decide(
                now,
                current,
                &[sample(10.0, &values)],
                WIDE,
                &config,
                &mut history,
            );
            history.record_scale(now, current, d.desired);
            steps.push(current - d.desired);
            current = d.desired;
            if current <= 10 {
                break;
            }
        }
        assert_eq!(&steps[..2], &[8, 8]);
        assert_eq!(current, 10);
        assert!(
            steps.iter().rev().skip(1).take(3).all(|&s| s == 4),
            "{steps:?}"
        );
        // Within one period a second step is not allowed.
        let mut history = History::default();
        let values = vec![Some(1.25); 80];
        let d = decide(
            start,
            80,
            &[sample(10.0, &values)],
            WIDE,
            &config,
            &mut history,
        );
        history.record_scale(start, 80, d.desired);
        let later = start + Duration::from_secs(30);
        let values = vec![Some(1.25); 72];
        let d = decide(
            later,
            72,
            &[sample(10.0, &values)],
            WIDE,
            &config,
            &mut history,
        );
        assert_eq!(d.desired, 72);
    }

    #[test]
    fn select_policy_min_and_disabled() {
        let mut config = config();
        config.scale_up.select = SelectPolicy::Min;
        let mut history = History::default();
        let now = Instant::now();
        let mut current = 10;
        // Min of (10 + 4, 10 × 2) = 14.
        sync(now, &mut current, 5.0, WIDE, &config, &mut history);
        assert_eq!(current, 14);
        config.scale_down.select = SelectPolicy::Disabled;
        config.scale_down.stabilization = Duration::ZERO;
        let d = sync(
            now + Duration::from_secs(60),
            &mut current,
            0.1,
            WIDE,
            &config,
            &mut history,
        );
        assert_eq!(d.desired, 14);
    }

    #[test]
    fn bounds_apply_before_and_after_the_metrics() {
        let config = config();
        let mut history = History::default();
        let now = Instant::now();
        let bounds = Bounds { min: 3, max: 5 };
        let d = decide(
            now,
            1,
            &[sample(10.0, &all(&[10.0]))],
            bounds,
            &config,
            &mut history,
        );
        assert_eq!((d.desired, d.reason), (3, "below min"));
        let d = decide(
            now,
            7,
            &[sample(10.0, &all(&[10.0; 7]))],
            bounds,
            &config,
            &mut history,
        );
        assert_eq!((d.desired, d.reason), (5, "above max"));
        let d = decide(
            now,
            4,
            &[sample(10.0, &all(&[40.0; 4]))],
            bounds,
            &config,
            &mut history,
        );
        assert_eq!((d.desired, d.reason), (5, "held at max"));
        let d = decide(
            now,
            4,
            &[sample(10.0, &[None; 4])],
            bounds,
            &config,
            &mut history,
        );
        assert_eq!(d.desired, 4);
    }
}
