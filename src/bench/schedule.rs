//! The open-loop schedule: when each request is meant to leave, and where its latency starts.
//!
//! Request `j` of the whole run is planned at `j / rate` after the start and carried by
//! connection `j mod connections`. A connection that is still busy when its next request is
//! due sends it as soon as it is free, and that request's latency counts from the planned
//! time: the wait was caused by the server, so it shows in the percentiles instead of being
//! left out (no coordinated omission). A connection that is early sleeps until the planned
//! time; any lateness of that wake-up is the timer's, so latency then counts from the send.

use std::time::Duration;

/// Where the planned requests end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// Exactly this many measured requests.
    Count(u64),
    /// Requests planned before this much time after the warm-up.
    Time(Duration),
}

/// A request planned for one connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planned {
    /// Index in the whole run.
    pub index: u64,
    /// Time after the run start when it is due.
    pub at: Duration,
    /// False during the warm-up: sent but left out of the report.
    pub measured: bool,
}

/// The constant-rate plan of a whole run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    rate: f64,
    connections: u64,
    /// Index of the first measured request (requests before it fall in the warm-up).
    first_measured: u64,
    /// Index one past the last planned request.
    end: u64,
}

impl Schedule {
    /// `rate` requests per second over `connections`, after `warmup`, until `limit`.
    pub fn new(rate: f64, connections: u64, warmup: Duration, limit: Limit) -> Schedule {
        let first_measured = planned_before(warmup, rate);
        let end = match limit {
            Limit::Count(n) => first_measured.saturating_add(n),
            Limit::Time(duration) => planned_before(warmup + duration, rate),
        };
        Schedule {
            rate,
            connections: connections.max(1),
            first_measured,
            end,
        }
    }

    /// The `k`-th request of connection `conn`, or `None` when that connection is done. Each
    /// round of one request per connection takes the next `connections` indices, the
    /// connections' turns shifted by one from round to round: with a fixed order, connection
    /// `conn` always got the indices of one remainder, so with connections a multiple of the
    /// URLs it sent one URL only, and a slow URL's queue built up on its connections while
    /// the others idled.
    pub fn planned(&self, conn: u64, k: u64) -> Option<Planned> {
        let c = self.connections;
        let turn = (conn + c - k % c) % c;
        let j = k.checked_mul(c)?.checked_add(turn)?;
        (j < self.end).then(|| Planned {
            index: j,
            at: Duration::from_secs_f64(j as f64 / self.rate),
            measured: j >= self.first_measured,
        })
    }

    /// Time after the run start when the plan's last slot closes: each request holds a
    /// `1 / rate` slot, so a count-limited run answered on time lasts `count / rate` and reports
    /// the rate asked, not `count / ((count - 1) / rate)`.
    pub fn planned_end(&self) -> Duration {
        Duration::from_secs_f64(self.end as f64 / self.rate)
    }
}

/// How many indices `j` have `j / rate < time`: `time × rate` rounded up, except that a
/// product within float error of a whole number is taken as that number (so 3 s at 200/s plans
/// 600, not 601), while any time past 0 plans request 0 however low the rate.
fn planned_before(time: Duration, rate: f64) -> u64 {
    let product = time.as_secs_f64() * rate;
    let nearest = product.round();
    if (product - nearest).abs() <= 1e-9 * nearest.max(1.0) {
        nearest as u64
    } else {
        product.ceil() as u64
    }
}

/// The longest an open-loop run may be planned to take: a rate too low for its count is a
/// mistake, not a run.
pub const LONGEST_PLAN: Duration = Duration::from_secs(365 * 24 * 3600);

/// Checks that `rate` over `limit` (after `warmup`) plans a run of at most [`LONGEST_PLAN`].
pub fn check_rate(rate: f64, warmup: Duration, limit: Limit) -> Result<(), String> {
    let last = match limit {
        Limit::Count(n) => (planned_before(warmup, rate) as f64 + n as f64 - 1.0) / rate,
        Limit::Time(_) => 1.0 / rate,
    };
    if last.is_finite() && last <= LONGEST_PLAN.as_secs_f64() {
        Ok(())
    } else {
        Err(format!(
            "-q {rate}: the run's requests would be due over more than a year; raise the rate"
        ))
    }
}

/// How a planned request leaves, given when its connection became free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure<I> {
    /// Behind schedule: send now, latency counts from the planned time.
    Late { latency_from: I },
    /// Ahead of schedule: sleep until the planned time, latency counts from the send.
    Wait { until: I },
}

/// Decides between sending at once (behind schedule) and sleeping (ahead of it).
/// `timer_lag` is how late the timer woke the connection's last sleep (up to a millisecond):
/// everything it sent since is that much later than with a punctual timer, so a request due
/// meanwhile counts its latency from that much after its plan (never after it is sent). The
/// timer's lateness is the generator's, not the server's.
pub fn departure<I, D>(planned: I, free_at: I, timer_lag: D) -> Departure<I>
where
    I: Ord + Copy + std::ops::Add<D, Output = I>,
{
    if planned <= free_at {
        Departure::Late {
            latency_from: (planned + timer_lag).min(free_at),
        }
    } else {
        Departure::Wait { until: planned }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_planned(schedule: &Schedule, connections: u64) -> Vec<(u64, Planned)> {
        let mut out = Vec::new();
        for conn in 0..connections {
            let mut k = 0;
            while let Some(p) = schedule.planned(conn, k) {
                out.push((conn, p));
                k += 1;
            }
        }
        out.sort_by_key(|(_, p)| p.at);
        out
    }

    #[test]
    fn requests_are_spread_evenly_over_connections() {
        let schedule = Schedule::new(100.0, 4, Duration::ZERO, Limit::Count(8));
        let planned = all_planned(&schedule, 4);
        assert_eq!(planned.len(), 8);
        for (j, (_, p)) in planned.iter().enumerate() {
            assert_eq!(p.index, j as u64);
            assert_eq!(p.at, Duration::from_millis(10 * j as u64));
            assert!(p.measured);
        }
        // The last request's slot, 70 to 80 ms, closes the plan.
        assert_eq!(schedule.planned_end(), Duration::from_millis(80));
    }

    /// Every connection takes every URL in turn (request `i` goes to URL `i mod n`), and each
    /// round of requests goes one to each connection.
    #[test]
    fn each_connection_takes_every_url_in_turn() {
        let schedule = Schedule::new(100.0, 4, Duration::ZERO, Limit::Count(16));
        let planned = all_planned(&schedule, 4);
        for round in planned.chunks(4) {
            let mut conns: Vec<u64> = round.iter().map(|(conn, _)| *conn).collect();
            conns.sort_unstable();
            assert_eq!(conns, [0, 1, 2, 3]);
        }
        for conn in 0..4 {
            let urls: Vec<u64> = (0..4)
                .map(|k| schedule.planned(conn, k).unwrap().index % 2)
                .collect();
            assert!(urls.contains(&0) && urls.contains(&1), "{conn}: {urls:?}");
        }
    }

    #[test]
    fn count_is_exact_with_uneven_connections() {
        for (n, c) in [(10, 3), (1, 5), (7, 7), (100, 64)] {
            let schedule = Schedule::new(1000.0, c, Duration::ZERO, Limit::Count(n));
            assert_eq!(all_planned(&schedule, c).len() as u64, n, "n={n} c={c}");
        }
    }

    #[test]
    fn timed_runs_plan_rate_times_duration() {
        let schedule = Schedule::new(
            200.0,
            10,
            Duration::ZERO,
            Limit::Time(Duration::from_secs(3)),
        );
        let planned = all_planned(&schedule, 10);
        assert_eq!(planned.len(), 600);
        assert!(planned.last().unwrap().1.at < Duration::from_secs(3));
    }

    #[test]
    fn warmup_requests_come_first_and_are_not_measured() {
        let schedule = Schedule::new(100.0, 2, Duration::from_millis(50), Limit::Count(10));
        let planned = all_planned(&schedule, 2);
        assert_eq!(planned.len(), 15);
        assert!(planned[..5].iter().all(|(_, p)| !p.measured));
        assert!(planned[5..].iter().all(|(_, p)| p.measured));
        assert_eq!(planned[5].1.at, Duration::from_millis(50));
    }

    #[test]
    fn any_time_plans_the_first_request_and_whole_products_are_exact() {
        assert_eq!(planned_before(Duration::from_secs(1), 1e-6), 1);
        assert_eq!(planned_before(Duration::ZERO, 1e-6), 0);
        assert_eq!(planned_before(Duration::from_secs(3), 200.0), 600);
        assert_eq!(planned_before(Duration::from_millis(2500), 1.0), 3);
        assert_eq!(planned_before(Duration::from_millis(100), 0.1 * 3.0), 1);
    }

    #[test]
    fn rates_too_low_for_the_run_are_refused() {
        assert!(check_rate(1e-19, Duration::ZERO, Limit::Count(2)).is_err());
        assert!(check_rate(1e-300, Duration::ZERO, Limit::Count(2)).is_err());
        assert!(check_rate(1e-9, Duration::ZERO, Limit::Time(Duration::from_secs(1))).is_err());
        assert!(check_rate(0.01, Duration::ZERO, Limit::Count(2)).is_ok());
        assert!(check_rate(1.0, Duration::from_secs(5), Limit::Count(1000)).is_ok());
    }

    #[test]
    fn a_busy_connection_counts_latency_from_the_planned_time() {
        assert_eq!(departure(10, 25, 0), Departure::Late { latency_from: 10 });
        assert_eq!(departure(10, 10, 0), Departure::Late { latency_from: 10 });
        assert_eq!(departure(30, 25, 0), Departure::Wait { until: 30 });
    }

    /// Requests due while the timer overslept a wait (here by 800 µs, with a 50 µs server
    /// and one due every 200 µs) are not charged for it.
    #[test]
    fn the_timers_lateness_is_not_charged_to_the_requests_behind_it() {
        // The first slept until 0 and woke at 800; answered at 850. The next, due at 200, is
        // sent at 850: with a punctual timer it would have gone on time, so it counts from its
        // send (its 50 µs are the server's).
        assert_eq!(
            departure(200, 850, 800),
            Departure::Late { latency_from: 850 }
        );
        // Behind a 10 ms answer the connection is late by the server's doing: 9.9 ms of the
        // wait are charged, as with a punctual timer.
        assert_eq!(
            departure(200, 10_850, 800),
            Departure::Late {
                latency_from: 1_000
            }
        );
    }
}
