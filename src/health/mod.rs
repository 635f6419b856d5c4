//! Health: the pure state machines that decide whether an instance takes traffic —
//! `HealthState` for active checks (rise/fall) and `PassiveState` for failures seen on live
//! traffic (nginx `max_fails` within `fail_timeout`) — and the active checking task.

mod active;

pub use active::{check_soon, spawn_active_checks};

use std::time::Duration;

use tokio::time::Instant;

/// Active-check state of one instance: it goes down after `fall` consecutive failed checks
/// and comes back after `rise` consecutive good ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthState {
    pub up: bool,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    /// It was up at some time: coming up is coming back.
    ever_up: bool,
}

/// A change of an instance's active-check verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Up for the first time (an instance that joined down).
    CameUp,
    /// Up again after it went down.
    WentUp,
    WentDown,
}

impl HealthState {
    pub fn new(up: bool) -> HealthState {
        HealthState {
            up,
            consecutive_ok: 0,
            consecutive_fail: 0,
            ever_up: up,
        }
    }

    /// An instance joining a serving upstream: down until its first passing check (as Envoy
    /// takes a new host), then as any other (`rise` passes in a row after a failure).
    pub fn joining(rise: u32) -> HealthState {
        HealthState {
            consecutive_ok: rise.saturating_sub(1),
            ..HealthState::new(false)
        }
    }

    /// Records one check result and says whether the verdict changed.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        if ok {
            self.consecutive_ok = self.consecutive_ok.saturating_add(1);
            self.consecutive_fail = 0;
            if !self.up && self.consecutive_ok >= rise {
                self.up = true;
                let first = !std::mem::replace(&mut self.ever_up, true);
                return Some(if first {
                    Transition::CameUp
                } else {
                    Transition::WentUp
                });
            }
        } else {
            self.consecutive_fail = self.consecutive_fail.saturating_add(1);
            self.consecutive_ok = 0;
            if self.up && self.consecutive_fail >= fall {
                self.up = false;
                return Some(Transition::WentDown);
            }
        }
        None
    }
}

/// Passive-check state (nginx semantics): `max_fails` failed requests within `fail_timeout`
/// take the instance out for `fail_timeout`; then one request at a time tries it (the balancer
/// claims that trial), and the first valid answer to a request sent after the ejection puts it
/// back. The time it is out until is kept by the instance, where the balancer reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PassiveState {
    window_start: Option<Instant>,
    fails: u32,
    /// When the instance was last taken out, until a valid answer ends that.
    ejected_at: Option<Instant>,
    /// Active checks passed in a row since it was taken out.
    checks_passed: u32,
    /// It was taken out for its answers (`fail_on_status`), not for failing to answer: its
    /// health endpoint passing says nothing of those, so only `fail_timeout` ends that.
    ejected_for_answers: bool,
}

impl PassiveState {
    /// Records a failed request at `now`, `out` saying whether the instance is out of rotation
    /// then; returns `Some(until)` when it must be taken out until `until`.
    pub fn record_failure(
        &mut self,
        now: Instant,
        out: bool,
        max_fails: u32,
        fail_timeout: Duration,
    ) -> Option<Instant> {
        // Requests that were in flight when it was taken out fail too, and so may its trial:
        // one ejection, not many (a failed trial leaves it out until its claim runs out).
        if max_fails == 0 || out {
            return None;
        }
        match self.window_start {
            Some(start) if now.duration_since(start) < fail_timeout => self.fails += 1,
            _ => {
                self.window_start = Some(now);
                self.fails = 1;
            }
        }
        if self.fails < max_fails {
            return None;
        }
        self.window_start = None;
        self.fails = 0;
        self.ejected_at = Some(now);
        self.checks_passed = 0;
        Some(now + fail_timeout)
    }

    /// Records an active check; returns whether it ends an ejection: `rise` passed in a row
    /// since the instance was taken out (HAProxy brings a server `observe` took down back after
    /// `rise` checks; Envoy un-ejects on a passing one). Without that, an instance restarted
    /// quicker than `fall` checks stayed out for all of `fail_timeout` while every check passed.
    pub fn record_check(&mut self, ok: bool, rise: u32) -> bool {
        if self.ejected_at.is_none() || self.ejected_for_answers {
            return false;
        }
        if !ok {
            self.checks_passed = 0;
            return false;
        }
        self.checks_passed += 1;
        if self.checks_passed < rise.max(1) {
            return false;
        }
        self.ejected_at = None;
        self.checks_passed = 0;
        true
    }

    /// Says what the last ejection was for: its answers (`fail_on_status`), or a failure to
    /// answer.
    pub fn ejected_for(&mut self, answers: bool) {
        self.ejected_for_answers = answers;
    }

    /// Records a valid answer to a request sent at `sent`; returns whether it ends an
    /// ejection. An answer to a request sent before the ejection does not: a slow instance's
    /// late answers must not undo the failures that took it out (nginx resets `fails` only for
    /// a peer chosen after its last failure).
    pub fn record_success(&mut self, sent: Instant) -> bool {
        match self.ejected_at {
            Some(at) if sent >= at => {
                self.ejected_at = None;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_passing_checks_end_a_passive_ejection() {
        let now = Instant::now();
        let mut passive = PassiveState::default();
        assert!(!passive.record_check(true, 2), "not ejected");
        let fail_timeout = Duration::from_secs(30);
        assert!(passive
            .record_failure(now, false, 1, fail_timeout)
            .is_some());
        assert!(!passive.record_check(true, 2));
        assert!(
            !passive.record_check(false, 2),
            "a failure starts the count over"
        );
        assert!(!passive.record_check(true, 2));
        assert!(passive.record_check(true, 2));
        assert!(!passive.record_success(now), "already back");
        // Taken out for its answers (fail_on_status): passing checks say nothing of those.
        assert!(passive
            .record_failure(now, false, 1, fail_timeout)
            .is_some());
        passive.ejected_for(true);
        for _ in 0..5 {
            assert!(!passive.record_check(true, 2));
        }
    }

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut state = HealthState::new(true);
        assert_eq!(state.observe(false, 2, 3), None);
        assert_eq!(state.observe(false, 2, 3), None);
        assert_eq!(
            state.observe(true, 2, 3),
            None,
            "a success resets the fall count"
        );
        assert_eq!(state.observe(false, 2, 3), None);
        assert_eq!(state.observe(false, 2, 3), None);
        assert_eq!(state.observe(false, 2, 3), Some(Transition::WentDown));
        assert!(!state.up);
        assert_eq!(state.observe(true, 2, 3), None);
        assert_eq!(state.observe(true, 2, 3), Some(Transition::WentUp));
        assert!(state.up);
    }

    #[test]
    fn a_joining_instance_comes_up_on_its_first_pass_then_rises_as_any_other() {
        let mut joining = HealthState::joining(3);
        assert_eq!(joining.observe(true, 3, 2), Some(Transition::CameUp));
        let mut failed_first = HealthState::joining(3);
        assert_eq!(failed_first.observe(false, 3, 2), None);
        assert_eq!(failed_first.observe(true, 3, 2), None);
        assert_eq!(failed_first.observe(true, 3, 2), None);
        assert_eq!(failed_first.observe(true, 3, 2), Some(Transition::CameUp));
        // Down and up again: back, not new.
        assert_eq!(
            failed_first.observe(false, 3, 1),
            Some(Transition::WentDown)
        );
        for _ in 0..2 {
            assert_eq!(failed_first.observe(true, 3, 1), None);
        }
        assert_eq!(failed_first.observe(true, 3, 1), Some(Transition::WentUp));
        assert_eq!(HealthState::joining(1), HealthState::joining(0));
    }

    #[tokio::test(start_paused = true)]
    async fn passive_failures_within_the_window_take_the_instance_out() {
        let timeout = Duration::from_secs(10);
        let mut state = PassiveState::default();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert_eq!(state.record_failure(t0, false, 3, timeout), None);
        assert_eq!(state.record_failure(at(1), false, 3, timeout), None);
        let until = state.record_failure(at(2), false, 3, timeout);
        assert_eq!(until, Some(at(12)));
        // Its requests still in flight fail while it is out: the same ejection.
        for late in [2, 5, 11] {
            assert_eq!(state.record_failure(at(late), true, 1, timeout), None);
        }
        // A late answer to a request sent before the ejection does not end it; an answer to
        // one sent after (its trial) does, once.
        assert!(!state.record_success(at(1)));
        assert!(state.record_success(at(12)));
        assert!(!state.record_success(at(13)));
        // Back in rotation, failures count again.
        assert_eq!(
            state.record_failure(at(14), false, 1, timeout),
            Some(at(24))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn passive_failures_spread_beyond_the_window_do_not_count_together() {
        let timeout = Duration::from_secs(10);
        let mut state = PassiveState::default();
        let t0 = Instant::now();
        assert_eq!(state.record_failure(t0, false, 2, timeout), None);
        assert_eq!(
            state.record_failure(t0 + Duration::from_secs(11), false, 2, timeout),
            None
        );
        assert!(state
            .record_failure(t0 + Duration::from_secs(12), false, 2, timeout)
            .is_some());
        assert_eq!(
            state.record_failure(t0, false, 0, timeout),
            None,
            "0 disables"
        );
    }
}
