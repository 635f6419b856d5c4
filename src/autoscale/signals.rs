//! Load signals per instance, sampled by the controller several times per sync period (never
//! on the request path) from the instances' atomic counters, and turned into one value per
//! metric and ready instance when the period ends.
//!
//! `p95_latency_ms` is approximated by the instance's peak-EWMA response-head latency (the
//! balancer's own average; it follows peaks fast and decays over ~10 s); an instance that
//! served nothing during the period has no latency sample, and when no ready instance started
//! or held a request the latency is 0: nothing waited, so an idle pool comes down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::policy::{Metric, MetricSample};
use crate::proxy::upstream::Upstream;

/// Counters of one instance at one moment.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    requests: u64,
    cpu_seconds: Option<f64>,
}

#[derive(Debug, Clone)]
struct Track {
    base: Reading,
    last: Reading,
    in_flight_sum: f64,
    samples: u32,
    latency_ms: f64,
}

impl Track {
    /// The value of `metric` over the period, `None` without a sample.
    fn value(&self, metric: Metric) -> Option<f64> {
        let elapsed = self
            .last
            .at
            .saturating_duration_since(self.base.at)
            .as_secs_f64();
        let served = self.last.requests.saturating_sub(self.base.requests);
        match metric {
            Metric::InFlightPerInstance => {
                (self.samples > 0).then(|| self.in_flight_sum / f64::from(self.samples))
            }
            Metric::RpsPerInstance => (elapsed > 0.0).then(|| served as f64 / elapsed),
            Metric::P95LatencyMs => (served > 0).then_some(self.latency_ms),
            Metric::CpuPercent => match (self.base.cpu_seconds, self.last.cpu_seconds) {
                (Some(base), Some(last)) if elapsed > 0.0 => {
                    Some((last - base).max(0.0) / elapsed * 100.0)
                }
                _ => None,
            },
        }
    }
}

/// Accumulates samples of the members of one upstream between syncs.
#[derive(Debug, Default)]
pub struct Sampler {
    tracks: HashMap<SocketAddr, Track>,
}

impl Sampler {
    /// Takes one sample of every member; forgets instances that are no longer members.
    pub fn sample(
        &mut self,
        upstream: &Upstream,
        members: &[(SocketAddr, Instant)],
        cpu: &[(SocketAddr, f64)],
        now: Instant,
    ) {
        self.tracks
            .retain(|addr, _| members.iter().any(|(m, _)| m == addr));
        for (addr, _) in members {
            let Some(instance) = upstream.find(*addr) else {
                continue;
            };
            let reading = Reading {
                at: now,
                requests: instance.counters.requests.load(Ordering::Relaxed),
                cpu_seconds: cpu.iter().find(|(a, _)| a == addr).map(|(_, s)| *s),
            };
            let in_flight = f64::from(instance.counters.in_flight.load(Ordering::Relaxed));
            let latency_ms = instance.latency().as_secs_f64() * 1000.0;
            match self.tracks.get_mut(addr) {
                Some(track) => {
                    track.last = reading;
                    track.in_flight_sum += in_flight;
                    track.samples += 1;
                    track.latency_ms = latency_ms;
                }
                None => {
                    // The first reading is only a baseline for the rates.
                    self.tracks.insert(
                        *addr,
                        Track {
                            base: reading,
                            last: reading,
                            in_flight_sum: 0.0,
                            samples: 0,
                            latency_ms,
                        },
                    );
                }
            }
        }
    }

    /// The value of `metric` for each ready instance.
    fn values(&self, ready: &[SocketAddr], metric: Metric) -> Vec<Option<f64>> {
        let track = |addr: &SocketAddr| self.tracks.get(addr);
        let values: Vec<Option<f64>> = ready
            .iter()
            .map(|addr| track(addr).and_then(|t| t.value(metric)))
            .collect();
        if metric != Metric::P95LatencyMs || values.iter().any(Option::is_some) {
            return values;
        }
        // Nothing started nor in flight over a whole period: no request waited. (Requests longer
        // than the period start in none of its samples, yet keep the instances busy.)
        let idle = |t: &&Track| t.last.at > t.base.at && t.in_flight_sum == 0.0;
        if ready.iter().filter_map(track).any(|t| !idle(&t)) {
            return values;
        }
        ready
            .iter()
            .map(|addr| track(addr).filter(idle).map(|_| 0.0))
            .collect()
    }

    /// Ends the period: one sample per target with a value (or none) per ready instance.
    pub fn finish(&mut self, ready: &[SocketAddr], targets: &[(Metric, f64)]) -> Vec<MetricSample> {
        let samples = targets
            .iter()
            .map(|&(metric, target)| MetricSample {
                metric,
                target,
                ready: self.values(ready, metric),
            })
            .collect();
        for track in self.tracks.values_mut() {
            track.base = track.last;
            track.in_flight_sum = 0.0;
            track.samples = 0;
        }
        samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn values_over_a_period() {
        let start = Instant::now();
        let track = Track {
            base: Reading {
                at: start,
                requests: 100,
                cpu_seconds: Some(1.0),
            },
            last: Reading {
                at: start + Duration::from_secs(2),
                requests: 300,
                cpu_seconds: Some(2.0),
            },
            in_flight_sum: 12.0,
            samples: 4,
            latency_ms: 42.0,
        };
        assert_eq!(track.value(Metric::InFlightPerInstance), Some(3.0));
        assert_eq!(track.value(Metric::RpsPerInstance), Some(100.0));
        assert_eq!(track.value(Metric::P95LatencyMs), Some(42.0));
        assert_eq!(track.value(Metric::CpuPercent), Some(50.0));
        let idle = Track {
            last: track.base,
            samples: 0,
            ..track
        };
        assert_eq!(idle.value(Metric::InFlightPerInstance), None);
        assert_eq!(idle.value(Metric::RpsPerInstance), None);
        assert_eq!(idle.value(Metric::P95LatencyMs), None);
    }

    #[test]
    fn an_idle_pool_has_no_latency_to_scale_for() {
        let start = Instant::now();
        let reading = |at: u64, requests: u64| Reading {
            at: start + Duration::from_secs(at),
            requests,
            cpu_seconds: None,
        };
        let track = |served: u64| Track {
            base: reading(0, 10),
            last: reading(2, 10 + served),
            in_flight_sum: 0.0,
            samples: 4,
            latency_ms: 80.0,
        };
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let mut sampler = Sampler::default();
        sampler.tracks.insert(a, track(0));
        sampler.tracks.insert(b, track(0));
        let latency = |sampler: &Sampler| sampler.values(&[a, b], Metric::P95LatencyMs);
        assert_eq!(latency(&sampler), vec![Some(0.0), Some(0.0)]);
        // One served: the idle one has no sample, as before.
        sampler.tracks.insert(b, track(5));
        assert_eq!(latency(&sampler), vec![None, Some(80.0)]);
        // None started one, but one holds a request longer than the period: no sample either.
        let mut busy = track(0);
        busy.in_flight_sum = 4.0;
        sampler.tracks.insert(b, busy);
        assert_eq!(latency(&sampler), vec![None, None]);
    }
}
