//! The rate-limit decisions themselves: GCRA and the sliding-window counter over plain state,
//! with the clock passed in as microseconds. The Redis script applies the same updates and
//! hands back what it read, and these functions turn that into the decision, so both stores
//! answer the same way.

use smallvec::SmallVec;

/// How a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Generic cell rate algorithm: token-bucket semantics, equal to nginx
    /// `limit_req rate=limit/period burst=burst nodelay`.
    Gcra,
    /// Counter over the previous and the current fixed window, the previous one weighted by how
    /// much of it still overlaps the sliding window.
    SlidingWindow,
}

/// The numbers of one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub algorithm: Algorithm,
    pub limit: u64,
    pub period_us: u64,
    /// GCRA only: requests admitted at once on top of the first one.
    pub burst: u64,
}

impl Quota {
    /// GCRA emission interval T = period / limit, rounded up to whole microseconds: rounded
    /// down, `limit` + 1 requests would fit in one period (3 per second spaced 333 333 µs).
    pub fn interval_us(&self) -> u64 {
        self.period_us.div_ceil(self.limit.max(1)).max(1)
    }

    /// GCRA tolerance τ = T × burst.
    pub fn tolerance_us(&self) -> u64 {
        self.interval_us() * self.burst
    }
}

/// The answer for one request under one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// Requests that could still pass right now.
    pub remaining: u64,
    /// Time until the quota is whole again.
    pub reset_us: u64,
    /// When rejected: time until a request would pass.
    pub retry_after_us: u64,
}

/// What the sliding window keeps per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Index of the current fixed window (now / period).
    pub index: u64,
    /// The period the windows were cut by: a reload may change the rule's.
    pub period_us: u64,
    pub prev: u64,
    pub curr: u64,
}

impl Window {
    /// The counts as (previous, current) of the window `index` of `period` that holds `now`.
    /// Each count goes to the latest window it may have been made in: under the same period
    /// that is where it was made, and a period changed by a reload keeps them (the stricter
    /// way) instead of reading a window index of another period as nothing.
    fn counts_at(&self, period: u64, index: u64, now: u64) -> (u64, u64) {
        let start = self.index.saturating_mul(self.period_us);
        let mut counts = (0, 0);
        for (latest, count) in [
            (start.saturating_sub(1), self.prev),
            (self.last_current_us().min(now), self.curr),
        ] {
            match index.checked_sub(latest / period) {
                Some(0) => counts.1 += count,
                Some(1) => counts.0 += count,
                _ => {}
            }
        }
        counts
    }

    /// The last microsecond of the window the current count was made in.
    fn last_current_us(&self) -> u64 {
        (self.index + 1).saturating_mul(self.period_us) - 1
    }
}

/// What a store keeps per (rule, key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Theoretical arrival time of the next request, µs.
    Gcra(u64),
    Window(Window),
}

impl SlotState {
    /// The moment from which this state means the same as no state at all, so it may be dropped.
    pub fn idle_after(&self, quota: &Quota) -> u64 {
        match self {
            SlotState::Gcra(tat) => *tat,
            // Its current count is gone two windows of the quota after the one it falls in.
            SlotState::Window(w) => {
                (w.last_current_us() / quota.period_us + 2).saturating_mul(quota.period_us)
            }
        }
    }
}

/// Decides one request at `now` given the stored state; returns the state to store when allowed.
pub fn decide(
    quota: &Quota,
    state: Option<SlotState>,
    now: u64,
) -> (RateDecision, Option<SlotState>) {
    match quota.algorithm {
        Algorithm::Gcra => {
            let tat = match state {
                Some(SlotState::Gcra(tat)) => Some(tat),
                _ => None,
            };
            let (decision, tat) = gcra(quota, tat, now);
            (decision, tat.map(SlotState::Gcra))
        }
        Algorithm::SlidingWindow => {
            let window = match state {
                Some(SlotState::Window(w)) => Some(w),
                _ => None,
            };
            let (decision, window) = sliding_window(quota, window, now);
            (decision, window.map(SlotState::Window))
        }
    }
}

/// One request under several rules at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JointDecision {
    /// Each rule's answer, in the rules' order.
    pub decisions: SmallVec<[RateDecision; 4]>,
    /// The state each rule stores: one per rule when every rule let the request pass, else
    /// none at all.
    pub booked: SmallVec<[SlotState; 4]>,
    /// Rules (by position) whose stored state was made under other numbers (a reload changed
    /// the quota), restated under their own: a TAT beyond what the quota can book brought down
    /// to that ([`gcra_cap`]), so the waits a stricter quota booked end at once; a window of
    /// another period as [`Window::counts_at`] places its counts, so they expire with the new
    /// windows. Stored whatever the decision.
    pub restated: SmallVec<[(usize, SlotState); 2]>,
}

impl JointDecision {
    pub fn allowed(&self) -> bool {
        self.decisions.iter().all(|d| d.allowed)
    }
}

/// Decides one request under all of its route's rules, each on its own stored state. It counts
/// against the rules only when all of them let it pass: as with nginx's `limit_req` over
/// several zones, a client retrying on one rule's 429 does not spend another rule's quota.
pub fn decide_all<'q>(
    checks: impl IntoIterator<Item = (&'q Quota, Option<SlotState>)>,
    now: u64,
) -> JointDecision {
    let mut joint = JointDecision {
        decisions: SmallVec::new(),
        booked: SmallVec::new(),
        restated: SmallVec::new(),
    };
    for (i, (quota, stored)) in checks.into_iter().enumerate() {
        if let Some(restated) = stored.and_then(|s| restate(quota, s, now)) {
            joint.restated.push((i, restated));
        }
        let (decision, next) = decide(quota, stored, now);
        joint.decisions.push(decision);
        joint.booked.extend(next);
    }
    if !joint.allowed() {
        joint.booked.clear();
    }
    joint
}

/// `stored` under `quota`'s numbers when it was made under others; `None` when it reads the
/// same under both.
fn restate(quota: &Quota, stored: SlotState, now: u64) -> Option<SlotState> {
    match (quota.algorithm, stored) {
        (Algorithm::Gcra, SlotState::Gcra(tat)) => {
            let cap = gcra_cap(quota, now);
            (tat > cap).then_some(SlotState::Gcra(cap))
        }
        (Algorithm::SlidingWindow, SlotState::Window(w)) if w.period_us != quota.period_us => {
            let index = now / quota.period_us;
            let (prev, curr) = w.counts_at(quota.period_us, index, now);
            Some(SlotState::Window(Window {
                index,
                period_us: quota.period_us,
                prev,
                curr,
            }))
        }
        _ => None,
    }
}

/// The latest TAT `quota` can book at `now`: τ + T ahead, a quota used up. One stored under a
/// stricter quota can lie further ahead; it counts as this, so a limit raised by a reload holds
/// from then on instead of after the waits the old limit booked.
pub fn gcra_cap(quota: &Quota, now: u64) -> u64 {
    now + quota.tolerance_us() + quota.interval_us()
}

/// GCRA: allow iff now ≥ TAT − τ, then TAT = max(TAT, now) + T (TAT at most [`gcra_cap`]).
pub fn gcra(quota: &Quota, tat: Option<u64>, now: u64) -> (RateDecision, Option<u64>) {
    let interval = quota.interval_us();
    let tolerance = quota.tolerance_us();
    let tat = tat.unwrap_or(now).clamp(now, gcra_cap(quota, now));
    if now + tolerance >= tat {
        let next = tat + interval;
        let decision = RateDecision {
            allowed: true,
            remaining: (now + tolerance - tat) / interval,
            reset_us: next - now,
            retry_after_us: 0,
        };
        (decision, Some(next))
    } else {
        let decision = RateDecision {
            allowed: false,
            remaining: 0,
            reset_us: tat - now,
            retry_after_us: tat - tolerance - now,
        };
        (decision, None)
    }
}

/// nginx `limit_req` without `nodelay` (and its `delay=undelayed`): how long a request GCRA
/// let in waits before it goes on, so that requests past the first `undelayed` of a burst
/// leave spaced by the rate instead of at once. The request's own place in the queue is how
/// far its TAT was ahead of now, its `reset_us` less one interval; the wait is what lies
/// beyond the `undelayed` intervals. At most the burst's tolerance.
pub fn pacing_delay_us(quota: &Quota, allowed: &RateDecision, undelayed: u64) -> u64 {
    let interval = quota.interval_us();
    let ahead = allowed.reset_us.saturating_sub(interval);
    ahead.saturating_sub(undelayed.saturating_mul(interval))
}

/// The longest [`pacing_delay_us`] can make a request wait under a rule with `delay =
/// undelayed`: the burst's intervals past those let through at once.
pub fn longest_wait(quota: &Quota, undelayed: u64) -> std::time::Duration {
    let intervals = quota.burst.saturating_sub(undelayed);
    std::time::Duration::from_micros(quota.interval_us().saturating_mul(intervals))
}

/// Sliding-window counter: estimate = prev × (W − elapsed)/W + curr; allow iff estimate + 1 ≤
/// limit. Computed in integers (both sides × W) so the Lua script gets the same answer.
pub fn sliding_window(
    quota: &Quota,
    stored: Option<Window>,
    now: u64,
) -> (RateDecision, Option<Window>) {
    let period = quota.period_us;
    let index = now / period;
    let elapsed = now - index * period;
    let (prev, curr) = stored.map_or((0, 0), |w| w.counts_at(period, index, now));
    let weighted = u128::from(prev) * u128::from(period - elapsed);
    let capacity = u128::from(quota.limit) * u128::from(period);
    let used = weighted + u128::from(curr + 1) * u128::from(period);
    if used <= capacity {
        let decision = RateDecision {
            allowed: true,
            remaining: ((capacity - used) / u128::from(period)) as u64,
            // The quota is whole again once this request's window has slid out too, at the
            // end of the next one (the end of this one would still find it weighing).
            reset_us: 2 * period - elapsed,
            retry_after_us: 0,
        };
        let window = Window {
            index,
            period_us: period,
            prev,
            curr: curr + 1,
        };
        (decision, Some(window))
    } else {
        // When does prev × (W − e) + (curr' + 1) × W ≤ limit × W hold again?
        let retry_after_us = if curr < quota.limit {
            // In this window, once enough of the previous one has slid out.
            let room = (quota.limit - curr - 1) * period / prev.max(1);
            (period - room.min(period)).saturating_sub(elapsed).max(1)
        } else {
            // In the next one, where this window's count becomes the weighted part.
            let room = (quota.limit.saturating_sub(1)) * period / curr.max(1);
            (period - elapsed) + period.saturating_sub(room)
        };
        let decision = RateDecision {
            allowed: false,
            remaining: 0,
            // Not before a request would pass: a client waiting for the reset is let through.
            reset_us: (period - elapsed).max(retry_after_us),
            retry_after_us,
        };
        (decision, None)
    }
}

/// Several rules applied to one request: any rejection rejects (the longest wait is reported);
/// otherwise the rule with the least remaining speaks for the headers.
pub fn strictest(a: (usize, RateDecision), b: (usize, RateDecision)) -> (usize, RateDecision) {
    let (_, da) = a;
    let (_, db) = b;
    match (da.allowed, db.allowed) {
        (true, false) => b,
        (false, true) => a,
        (false, false) if db.retry_after_us > da.retry_after_us => b,
        (false, false) => a,
        (true, true) if db.remaining < da.remaining => b,
        (true, true) => a,
    }
}

/// Whole seconds for headers, rounded up so a client that waits that long is let through.
pub fn ceil_secs(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000;

    fn gcra_quota(limit: u64, period_us: u64, burst: u64) -> Quota {
        Quota {
            algorithm: Algorithm::Gcra,
            limit,
            period_us,
            burst,
        }
    }

    fn window_quota(limit: u64, period_us: u64) -> Quota {
        Quota {
            algorithm: Algorithm::SlidingWindow,
            limit,
            period_us,
            burst: 0,
        }
    }

    /// Runs `arrivals` through `decide` and returns the admitted times.
    fn admitted(quota: &Quota, arrivals: &[u64]) -> Vec<u64> {
        let mut state = None;
        let mut out = Vec::new();
        for &now in arrivals {
            let (decision, next) = decide(quota, state, now);
            if decision.allowed {
                state = next;
                out.push(now);
            }
        }
        out
    }

    /// A limit raised by a reload holds from then on: the TAT booked under the old quota is
    /// brought down to a quota used up under the new one, not kept as the old quota's wait.
    #[test]
    fn a_raised_limit_holds_at_once() {
        let (strict, loose) = (
            gcra_quota(1, 3600 * SEC, 0),
            gcra_quota(1000, 60 * SEC, 100),
        );
        let t0 = 50 * SEC;
        let (_, booked) = gcra(&strict, None, t0);
        let stored = booked.map(SlotState::Gcra);
        let joint = decide_all([(&loose, stored)], t0 + 1);
        assert!(!joint.allowed());
        assert_eq!(joint.decisions[0].retry_after_us, 60_000);
        assert!(joint.decisions[0].reset_us <= 6 * SEC + 60_000);
        assert_eq!(joint.restated.len(), 1);
        let (_, capped) = joint.restated[0];
        let joint = decide_all([(&loose, Some(capped))], t0 + 1 + 60_000);
        assert!(joint.allowed());
        assert!(joint.restated.is_empty());
        // A limit lowered keeps what was booked (the loose quota's 60 ms), and books its own.
        let (_, booked) = gcra(&loose, None, t0);
        let joint = decide_all([(&strict, booked.map(SlotState::Gcra))], t0 + 1);
        assert_eq!(joint.decisions[0].retry_after_us, 60_000 - 1);
        assert!(joint.restated.is_empty());
    }

    #[test]
    fn gcra_burst_is_nginx_nodelay() {
        // limit_req rate=10r/s burst=5 nodelay: 6 at once, then one every 100 ms.
        let q = gcra_quota(10, SEC, 5);
        let mut tat = None;
        let t0 = 50 * SEC;
        for i in 0..6 {
            let (d, next) = gcra(&q, tat, t0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 5 - i);
            tat = next;
        }
        let (d, _) = gcra(&q, tat, t0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_us, 100_000);
        let (d, _) = gcra(&q, tat, t0 + 99_999);
        assert!(!d.allowed);
        let (d, next) = gcra(&q, tat, t0 + 100_000);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        // After a quiet second the whole burst is back, never more.
        let later = t0 + 100_000 + 2 * SEC;
        let (d, _) = gcra(&q, next, later);
        assert!(d.allowed);
        assert_eq!(d.remaining, 5);
    }

    #[test]
    fn pacing_delays_a_burst_as_nginx_without_nodelay() {
        // limit_req rate=10r/s burst=5: 6 at once pass, leaving 100 ms apart; with delay=2
        // the first three go at once and the rest keep the same spacing after them.
        let q = gcra_quota(10, SEC, 5);
        let t0 = 50 * SEC;
        let mut tat = None;
        let mut waits = Vec::new();
        for _ in 0..6 {
            let (d, next) = gcra(&q, tat, t0);
            assert!(d.allowed);
            waits.push((pacing_delay_us(&q, &d, 0), pacing_delay_us(&q, &d, 2)));
            tat = next;
        }
        assert_eq!(
            waits,
            [
                (0, 0),
                (100_000, 0),
                (200_000, 0),
                (300_000, 100_000),
                (400_000, 200_000),
                (500_000, 300_000),
            ]
        );
        // The seventh waits for the first place to free, 100 ms on, and queues behind the rest.
        let (d, _) = gcra(&q, tat, t0 + 50_000);
        assert!(!d.allowed);
        let (d, _) = gcra(&q, tat, t0 + 150_000);
        assert!(d.allowed);
        assert_eq!(pacing_delay_us(&q, &d, 0), 450_000);
        // A quiet client is not delayed.
        let (d, _) = gcra(&q, tat, t0 + 10 * SEC);
        assert_eq!(pacing_delay_us(&q, &d, 0), 0);
        // The sixth's wait is the longest there is.
        assert_eq!(longest_wait(&q, 0).as_micros(), 500_000);
        assert_eq!(longest_wait(&q, 2).as_micros(), 300_000);
    }

    /// The interval rounds up: 3 per second spaced 333 333 µs let a fourth in within 1 s.
    #[test]
    fn gcra_never_fits_one_more_in_a_period_it_does_not_divide() {
        let q = gcra_quota(3, SEC, 0);
        let t0 = 50 * SEC;
        let times = admitted(&q, &[t0, t0 + 333_334, t0 + 666_668, t0 + 999_999]);
        assert_eq!(times.len(), 3);
        assert_eq!(max_in_any_window(&times, SEC), 3);
    }

    /// A reload that changes a sliding window's period keeps its counts: 3 per minute used
    /// up stays used up as 3 per hour, and is stored so (expiring with the hour's windows).
    #[test]
    fn a_changed_window_period_keeps_the_counts() {
        let (minute, hour) = (window_quota(3, 60 * SEC), window_quota(3, 3600 * SEC));
        let t0 = 7200 * SEC + 61 * SEC;
        let mut state = None;
        for i in 0..3 {
            let joint = decide_all([(&minute, state)], t0 + i);
            assert!(joint.allowed());
            state = Some(joint.booked[0]);
        }
        let joint = decide_all([(&hour, state)], t0 + 10);
        assert!(!joint.allowed());
        let [(0, restated)] = joint.restated[..] else {
            panic!("{:?}", joint.restated)
        };
        let SlotState::Window(w) = restated else {
            panic!("{restated:?}")
        };
        assert_eq!(
            (w.index, w.period_us, w.prev, w.curr),
            (2, 3600 * SEC, 0, 3)
        );
        assert_eq!(restated.idle_after(&hour), 4 * 3600 * SEC);
        // Still used up near the hour's end, when the minute's windows were long gone.
        let (late, _) = decide(&hour, Some(restated), 3 * 3600 * SEC - 1);
        assert!(!late.allowed);
        // Back to a minute: the counts fall in the minute they may have been made in last,
        // and slide out of it as that minute's would.
        let joint = decide_all([(&minute, Some(restated))], t0 + 20);
        assert!(!joint.allowed());
        let [(0, restated)] = joint.restated[..] else {
            panic!("{:?}", joint.restated)
        };
        let (later, _) = decide(&minute, Some(restated), t0 + 2 * 60 * SEC);
        assert!(later.allowed);
        // The same period reads as it always did.
        assert!(decide_all([(&minute, state)], t0 + 30).restated.is_empty());
    }

    #[test]
    fn gcra_without_burst_spaces_requests() {
        let q = gcra_quota(20, 60 * SEC, 0);
        let (d, tat) = gcra(&q, None, 0);
        assert!(d.allowed && d.remaining == 0);
        assert_eq!(d.reset_us, 3 * SEC);
        let (d, _) = gcra(&q, tat, SEC);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_us, 2 * SEC);
        assert_eq!(ceil_secs(d.retry_after_us), 2);
    }

    #[test]
    fn sliding_window_boundary() {
        let q = window_quota(10, SEC);
        // 10 late in window 0 fill it; the 11th is refused.
        let arrivals: Vec<u64> = (0..11).map(|i| 900_000 + i).collect();
        let mut state = None;
        for (i, &now) in arrivals.iter().enumerate() {
            let (d, next) = sliding_window(&q, state, now);
            assert_eq!(d.allowed, i < 10, "request {i}");
            if d.allowed {
                state = next;
                assert_eq!(d.remaining, 9 - i as u64);
            } else {
                // Nothing slides out before the window ends, then 10 × (1 − e) ≤ 9 needs e ≥ 0.1.
                assert_eq!(d.retry_after_us, (SEC - now) + 100_000);
            }
        }
        // Right at the boundary the previous window still counts in full: refused.
        let (d, _) = sliding_window(&q, state, SEC);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_us, 100_000);
        // Halfway into window 1 half of window 0 has slid out: 5 more pass, not 6.
        for i in 0..6 {
            let (d, next) = sliding_window(&q, state, SEC + SEC / 2 + i);
            assert_eq!(d.allowed, i < 5, "request {i} at 1.5 s");
            if d.allowed {
                state = next;
            }
        }
        // Two windows later everything is forgotten.
        let (d, _) = sliding_window(&q, state, 3 * SEC);
        assert!(d.allowed);
        assert_eq!(d.remaining, 9);
    }

    #[test]
    fn strictest_rule_wins() {
        let ok = |remaining| RateDecision {
            allowed: true,
            remaining,
            reset_us: 0,
            retry_after_us: 0,
        };
        let no = |retry_after_us| RateDecision {
            allowed: false,
            remaining: 0,
            reset_us: 0,
            retry_after_us,
        };
        assert_eq!(strictest((0, ok(5)), (1, ok(3))).0, 1);
        assert_eq!(strictest((0, ok(2)), (1, ok(3))).0, 0);
        assert_eq!(strictest((0, ok(0)), (1, no(5))).0, 1);
        assert_eq!(strictest((0, no(9)), (1, no(5))).0, 0);
    }

    #[test]
    fn a_request_one_rule_refuses_counts_against_none() {
        // 2 per 2 s and 6 per hour: a client retrying on the first rule's 429 keeps its hourly
        // quota for the requests that pass.
        let short = gcra_quota(2, 2 * SEC, 1);
        let long = window_quota(6, 3600 * SEC);
        let (mut a, mut b) = (None, None);
        let mut served = 0;
        for step in 0..200u64 {
            let now = 1_000 * SEC + step * 100_000;
            let joint = decide_all([(&short, a), (&long, b)], now);
            if joint.allowed() {
                assert_eq!(joint.booked.len(), 2);
                a = Some(joint.booked[0]);
                b = Some(joint.booked[1]);
                served += 1;
            } else {
                assert!(joint.booked.is_empty());
            }
        }
        // 20 s of retries every 100 ms: the burst of 2, then one a second until the hour's 6.
        assert_eq!(served, 6);
    }

    /// Most admitted in any half-open window [t, t + period).
    fn max_in_any_window(times: &[u64], period: u64) -> usize {
        let mut best = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end] >= times[start] + period {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    fn arrivals(gaps: Vec<u64>) -> Vec<u64> {
        let mut now = 1_000 * SEC;
        gaps.into_iter()
            .map(|gap| {
                now += gap;
                now
            })
            .collect()
    }

    /// A quota drawn by a property test: GCRA with `burst`, or a sliding window.
    fn drawn_quota(limit: u64, burst: u64, sliding: bool, period_ms: u64) -> Quota {
        Quota {
            algorithm: if sliding {
                Algorithm::SlidingWindow
            } else {
                Algorithm::Gcra
            },
            limit,
            period_us: period_ms * 1000,
            burst: if sliding { 0 } else { burst },
        }
    }

    proptest! {
        #[test]
        fn gcra_never_admits_more_than_limit_plus_burst_per_period(
            limit in 1u64..50,
            burst in 0u64..20,
            period_ms in 10u64..5_000,
            gaps in proptest::collection::vec(0u64..200_000, 1..400),
        ) {
            let q = gcra_quota(limit, period_ms * 1000, burst);
            let times = admitted(&q, &arrivals(gaps));
            prop_assert!(max_in_any_window(&times, q.period_us) as u64 <= limit + burst);
        }

        #[test]
        fn sliding_window_bounds(
            limit in 1u64..50,
            period_ms in 10u64..5_000,
            gaps in proptest::collection::vec(0u64..200_000, 1..400),
        ) {
            let q = window_quota(limit, period_ms * 1000);
            let times = admitted(&q, &arrivals(gaps));
            // Exact per fixed window; the weighted estimate may let up to 2 × limit through a
            // sliding one when the previous window's requests bunched up at its end.
            let mut per_window = std::collections::HashMap::new();
            for t in &times {
                *per_window.entry(t / q.period_us).or_insert(0u64) += 1;
            }
            prop_assert!(per_window.values().all(|&n| n <= limit));
            prop_assert!(max_in_any_window(&times, q.period_us) as u64 <= 2 * limit);
        }

        #[test]
        fn joint_decisions_are_each_rules_own_and_book_all_or_none(
            limits in proptest::collection::vec(1u64..5, 1..4),
            gaps in proptest::collection::vec(0u64..400_000, 1..100),
        ) {
            let quotas: Vec<Quota> = limits
                .iter()
                .enumerate()
                .map(|(i, &limit)| {
                    let period_us = (i as u64 + 1) * SEC;
                    if i % 2 == 0 { gcra_quota(limit, period_us, 1) } else { window_quota(limit, period_us) }
                })
                .collect();
            let mut states: Vec<Option<SlotState>> = vec![None; quotas.len()];
            for now in arrivals(gaps) {
                let joint = decide_all(quotas.iter().zip(states.iter().copied()), now);
                for (i, quota) in quotas.iter().enumerate() {
                    prop_assert_eq!(joint.decisions[i], decide(quota, states[i], now).0);
                }
                let all = joint.decisions.iter().all(|d| d.allowed);
                prop_assert_eq!(joint.booked.len(), if all { quotas.len() } else { 0 });
                for (state, booked) in states.iter_mut().zip(&joint.booked) {
                    *state = Some(*booked);
                }
            }
        }

        #[test]
        fn a_client_that_waits_as_told_is_let_through(
            limit in 1u64..50,
            burst in 0u64..5,
            sliding in any::<bool>(),
            period_ms in 10u64..5_000,
            gaps in proptest::collection::vec(0u64..50_000, 1..200),
        ) {
            let q = drawn_quota(limit, burst, sliding, period_ms);
            let mut state = None;
            for now in arrivals(gaps) {
                let (d, next) = decide(&q, state, now);
                let wait = if d.allowed {
                    state = next;
                    // Told `r=0;t=…`, a client that waits `t`.
                    d.reset_us
                } else {
                    prop_assert!(d.retry_after_us > 0);
                    // The reset (RateLimit `t`) is no earlier than a request would pass.
                    prop_assert!(d.reset_us >= d.retry_after_us);
                    d.retry_after_us
                };
                let (later, _) = decide(&q, state, now + wait);
                prop_assert!(later.allowed, "{d:?}");
            }
        }
    }
}
