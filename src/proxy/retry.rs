//! What follows a failed attempt on an instance, and the retry budget: retries may add at most
//! a fixed share on top of live requests, so a failing pool is not hit by a retry storm. Every
//! request deposits `ratio` of a token, every retry withdraws one; a small reserve lets the
//! first retries through on a quiet gateway.

use std::sync::atomic::{AtomicI64, Ordering};

/// Tokens are counted in thousandths so the deposit per request stays an integer.
const UNIT: i64 = 1000;
/// Retries allowed with no traffic to earn them (the floor), and the cap on saved tokens.
const RESERVE: i64 = 10 * UNIT;

/// How an attempt on one instance failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request never reached the instance.
    NotSent,
    /// The instance may have seen the request; no byte of an answer came back.
    Sent,
    /// Part of an answer head came back, then the connection broke: never sent again, since
    /// the instance acted on the request.
    BrokeOff,
    /// The answer head is not valid HTTP/1.1. Often one endpoint's bug, so neither sent again
    /// nor held against the instance (nginx's `invalid_header` is not, by default).
    Invalid,
    /// An HTTP/2 instance reset the request's stream: one request failed, not the instance.
    /// `refused` (REFUSED_STREAM): it was not processed, so it may go anywhere.
    Reset { refused: bool },
    /// A reused connection the instance had closed before answering (most often at its
    /// keep-alive timeout, as the connection was taken); `sent`: the request went out on it.
    Stale { sent: bool },
    /// No answer head within the response timeout.
    Timeout,
    /// The client's body failed.
    Client,
}

impl FailureKind {
    /// Whether the failure counts against the instance's passive health.
    pub fn is_instance_fault(self) -> bool {
        matches!(
            self,
            FailureKind::NotSent | FailureKind::Sent | FailureKind::BrokeOff | FailureKind::Timeout
        )
    }
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextAttempt {
    /// The request fails with this attempt's error.
    GiveUp,
    /// Once more on a new connection to the same instance, outside `retries` and the budget
    /// (nginx does not count such tries either).
    Reconnect,
    /// On another instance, when `retries` and the retry budget allow.
    Retry,
}

/// A request that never reached an instance may go anywhere; one an instance may have seen
/// only when it is `replayable` (idempotent and body-less); never once answer bytes came back
/// or after a response timeout. A stale pooled connection gets one reconnect, unless this
/// attempt was it (`reconnected`).
pub fn next_attempt(failure: FailureKind, replayable: bool, reconnected: bool) -> NextAttempt {
    match failure {
        FailureKind::NotSent | FailureKind::Reset { refused: true } => NextAttempt::Retry,
        FailureKind::Sent | FailureKind::Reset { .. } if replayable => NextAttempt::Retry,
        FailureKind::Stale { sent } if !reconnected && (replayable || !sent) => {
            NextAttempt::Reconnect
        }
        FailureKind::Sent
        | FailureKind::Reset { .. }
        | FailureKind::Stale { .. }
        | FailureKind::BrokeOff
        | FailureKind::Invalid
        | FailureKind::Timeout
        | FailureKind::Client => NextAttempt::GiveUp,
    }
}

#[derive(Debug)]
pub struct RetryBudget {
    deposit: i64,
    balance: AtomicI64,
    cap: i64,
}

impl RetryBudget {
    /// `ratio`: 0.2 lets retries add 20 % on top of requests.
    pub fn new(ratio: f64) -> RetryBudget {
        let deposit = (ratio * UNIT as f64).round() as i64;
        RetryBudget {
            deposit,
            balance: AtomicI64::new(RESERVE),
            // Savings are capped so a long calm period cannot fund a long storm.
            cap: RESERVE + deposit * 100,
        }
    }

    /// Called once per client request.
    pub fn deposit(&self) {
        let previous = self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        if previous + self.deposit > self.cap {
            self.balance.fetch_sub(self.deposit, Ordering::Relaxed);
        }
    }

    /// Takes one retry's worth of tokens if there is one.
    pub fn try_withdraw(&self) -> bool {
        let previous = self.balance.fetch_sub(UNIT, Ordering::Relaxed);
        if previous >= UNIT {
            true
        } else {
            self.balance.fetch_add(UNIT, Ordering::Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_follows_a_failed_attempt() {
        use FailureKind::*;
        use NextAttempt::*;
        // (failure, replayable, reconnected) -> next
        let cases = [
            (NotSent, false, false, Retry),
            (NotSent, true, true, Retry),
            (Sent, true, false, Retry),
            (Sent, false, false, GiveUp),
            (Stale { sent: false }, false, false, Reconnect),
            (Stale { sent: true }, true, false, Reconnect),
            (Stale { sent: true }, false, false, GiveUp),
            (Stale { sent: false }, true, true, GiveUp),
            (Reset { refused: true }, false, false, Retry),
            (Reset { refused: false }, true, false, Retry),
            (Reset { refused: false }, false, false, GiveUp),
            (BrokeOff, true, false, GiveUp),
            (Invalid, true, false, GiveUp),
            (Timeout, true, false, GiveUp),
            (Client, true, false, GiveUp),
        ];
        for (failure, replayable, reconnected, next) in cases {
            assert_eq!(
                next_attempt(failure, replayable, reconnected),
                next,
                "{failure:?} replayable={replayable} reconnected={reconnected}"
            );
        }
        assert!(Timeout.is_instance_fault());
        assert!(BrokeOff.is_instance_fault());
        assert!(!Invalid.is_instance_fault());
        assert!(!Reset { refused: true }.is_instance_fault());
        assert!(!Reset { refused: false }.is_instance_fault());
        assert!(!Stale { sent: true }.is_instance_fault());
        assert!(!Client.is_instance_fault());
    }

    #[test]
    fn retries_are_capped_at_the_ratio_after_the_reserve() {
        let budget = RetryBudget::new(0.2);
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.try_withdraw() {
                retries += 1;
            }
        }
        // 20 % of 1000 requests plus the reserve of 10.
        assert_eq!(retries, 210);
    }

    #[test]
    fn the_reserve_allows_a_few_retries_without_traffic() {
        let budget = RetryBudget::new(0.2);
        let allowed = (0..50).filter(|_| budget.try_withdraw()).count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn savings_are_capped() {
        let budget = RetryBudget::new(0.2);
        for _ in 0..100_000 {
            budget.deposit();
        }
        let allowed = (0..1000).filter(|_| budget.try_withdraw()).count();
        assert_eq!(allowed, 30);
    }

    #[test]
    fn zero_ratio_leaves_only_the_reserve() {
        let budget = RetryBudget::new(0.0);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!((0..50).filter(|_| budget.try_withdraw()).count(), 10);
    }
}
