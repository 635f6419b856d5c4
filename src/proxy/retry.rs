//! What follows a failed attempt on an instance, and the retry budget: retries may add at most
//! a fixed share on top of live requests, so a failing pool is not hit by a retry storm. Every
//! request deposits `ratio` of a token, every retry withdraws one; a floor of a few retries a
//! second lets retries through on a quiet gateway (Linkerd's `minRetriesPerSecond`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use smallvec::SmallVec;
use tokio::time::Instant;

/// Tokens are counted in thousandths so the deposit per request stays an integer.
const UNIT: i64 = 1000;
/// Retries allowed each second beyond those the traffic earned.
const FLOOR_PER_SECOND: u64 = 10;
/// Savings are capped at this many requests' deposits, so a long calm period cannot fund a
/// long storm; yet enough for a burst: every request in flight on an instance that dies
/// fails at once, and each is owed its retry (at 100 requests' worth, a killed instance with
/// more than 30 in flight turned the rest into 502s).
const SAVED_REQUESTS: i64 = 10_000;

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
    /// The answer head is not valid HTTP/1.1: never sent again (the instance acted on the
    /// request), and held against the instance, as Envoy's gateway failures and HAProxy's
    /// layer-7 observation count it. An instance that answers garbage at once would otherwise
    /// draw most of the traffic: it has no latency to weigh and nothing in flight.
    Invalid,
    /// An HTTP/2 instance reset the request's stream, which counts against it as a reset
    /// connection does (nginx and Envoy count it too: an instance that resets every stream
    /// answered fast and drew most requests, REFUSED_STREAM included). `refused`
    /// (REFUSED_STREAM): it was not processed, so it may go anywhere.
    Reset { refused: bool },
    /// The stream was past the last one of a graceful GOAWAY (NO_ERROR): not processed, so it
    /// may go anywhere, and no failure of the instance, which is closing that connection.
    GoneAway,
    /// A reused connection the instance had closed before answering (most often at its
    /// keep-alive timeout, as the connection was taken); `sent`: the request went out on it.
    Stale { sent: bool },
    /// Taken off a pipelined line before it was written (the answer ahead streams): nothing
    /// went wrong with the instance or its connections.
    Requeued,
    /// No answer head within the response timeout.
    Timeout,
    /// The client's body failed.
    Client,
    /// The gateway ran short of its own resources (out of file descriptors and the like):
    /// neither the instance's fault nor worth trying on another instance.
    Local,
}

impl FailureKind {
    /// Whether the failure counts against the instance's passive health.
    pub fn is_instance_fault(self) -> bool {
        matches!(
            self,
            FailureKind::NotSent
                | FailureKind::Sent
                | FailureKind::BrokeOff
                | FailureKind::Invalid
                | FailureKind::Timeout
                | FailureKind::Reset { .. }
        )
    }
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextAttempt {
    /// The request fails with this attempt's error.
    GiveUp,
    /// Once more on a new connection, outside `retries` and the budget (nginx does not count
    /// such tries either); the instance is picked again, as nginx does after a cached
    /// connection failed, so it may be the same one or, by then less loaded, another.
    Reconnect,
    /// On another instance, when `retries` and the retry budget allow.
    Retry,
    /// Picked again as if it had just come, on any connection: it was never sent.
    Requeue,
}

/// The most times a request is taken off lines and picked again ([`NextAttempt::Requeue`]);
/// past them it goes as after a stale connection, on a new one.
const REQUEUES: u8 = 4;

/// What a request allows once an attempt with it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resend {
    /// Its method is idempotent (RFC 9110 §9.2.2).
    pub idempotent: bool,
    /// Its body, if it has one, can be sent again (`ForwardBody::rewind`).
    pub body_again: bool,
}

/// A request that never reached an instance (or that an HTTP/2 instance refused unprocessed)
/// may go anywhere; one an instance may have seen (including one it did not answer within the
/// response timeout, as nginx's default `proxy_next_upstream error timeout`) only when its
/// method is idempotent; never once answer bytes came back, and never without its body. A
/// stale pooled connection gets one reconnect, unless this attempt was it (`reconnected`).
pub fn next_attempt(failure: FailureKind, request: Resend, reconnected: bool) -> NextAttempt {
    let Resend {
        idempotent,
        body_again,
    } = request;
    if !body_again {
        return NextAttempt::GiveUp;
    }
    match failure {
        FailureKind::NotSent | FailureKind::Reset { refused: true } | FailureKind::GoneAway => {
            NextAttempt::Retry
        }
        FailureKind::Sent | FailureKind::Reset { .. } | FailureKind::Timeout if idempotent => {
            NextAttempt::Retry
        }
        FailureKind::Stale { sent } if !reconnected && (idempotent || !sent) => {
            NextAttempt::Reconnect
        }
        FailureKind::Requeued => NextAttempt::Requeue,
        FailureKind::Sent
        | FailureKind::Reset { .. }
        | FailureKind::Stale { .. }
        | FailureKind::BrokeOff
        | FailureKind::Invalid
        | FailureKind::Timeout
        | FailureKind::Client
        | FailureKind::Local => NextAttempt::GiveUp,
    }
}

/// One request's attempts on its upstream's instances: which were tried, how many attempts
/// count, and whether the next one opens a new connection.
#[derive(Debug, Default)]
pub struct Attempts {
    /// Positions in the instance set already tried: retries are few, and an upstream may have
    /// hundreds of instances.
    pub tried: SmallVec<[usize; 4]>,
    /// Attempts that count against `retries` (a reconnect does not).
    pub count: u32,
    /// The next attempt opens a new connection: the pooled one this attempt took was stale.
    pub fresh: bool,
    /// Times it was picked again after being taken off a line unsent.
    requeues: u8,
}

/// Whether a request that did not get its answer from an attempt tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Again,
    GiveUp,
}

impl Attempts {
    /// Records an attempt on the instance at position `index`; returns its number.
    pub fn start(&mut self, index: usize) -> u32 {
        self.tried.push(index);
        self.count += 1;
        self.count
    }

    /// What follows an attempt that failed, `next` saying what its failure allows. A reconnect
    /// undoes the attempt (the instance may be picked again, on a new connection); a retry goes
    /// as [`Attempts::retry`] decides.
    pub fn after_failure(
        &mut self,
        next: NextAttempt,
        retries: u32,
        budget: impl FnOnce() -> bool,
    ) -> Step {
        match next {
            NextAttempt::GiveUp => Step::GiveUp,
            NextAttempt::Requeue if self.requeues < REQUEUES => {
                self.requeues += 1;
                self.count -= 1;
                self.tried.pop();
                Step::Again
            }
            NextAttempt::Reconnect | NextAttempt::Requeue => {
                self.fresh = true;
                self.count -= 1;
                self.tried.pop();
                Step::Again
            }
            NextAttempt::Retry => self.retry(retries, budget),
        }
    }

    /// Another instance's try, when the attempts so far leave room under `retries` and then
    /// the retry budget pays for it (asked only then, and before the next pick: a pick may
    /// take an ejected instance's one trial request, which a refusal would waste).
    pub fn retry(&mut self, retries: u32, budget: impl FnOnce() -> bool) -> Step {
        if self.count > retries || !budget() {
            return Step::GiveUp;
        }
        // Another instance's pool is not suspect.
        self.fresh = false;
        Step::Again
    }
}

#[derive(Debug)]
pub struct RetryBudget {
    deposit: i64,
    balance: AtomicI64,
    cap: i64,
    /// The floor's current second (high bits) and the retries it allowed in it (low 16 bits).
    floor: AtomicU64,
}

impl RetryBudget {
    /// `ratio`: 0.2 lets retries add 20 % on top of requests. It starts full, as after a long
    /// calm period: started empty, a gateway just up (a deploy, a restart) had saved nothing
    /// yet, and the requests in flight on an instance that died then got 502s, past the floor,
    /// though another instance was there to take them.
    pub fn new(ratio: f64) -> RetryBudget {
        let deposit = (ratio * UNIT as f64).round() as i64;
        let cap = deposit * SAVED_REQUESTS;
        RetryBudget {
            deposit,
            balance: AtomicI64::new(cap),
            cap,
            floor: AtomicU64::new(0),
        }
    }

    /// A budget at `ratio` that keeps what `previous` (the one a reload replaces) saved, up to
    /// its own cap: a reload must not leave the burst after it without retries.
    pub fn carried(ratio: f64, previous: &RetryBudget) -> RetryBudget {
        let budget = RetryBudget::new(ratio);
        let saved = previous
            .balance
            .load(Ordering::Relaxed)
            .clamp(0, budget.cap);
        budget.balance.store(saved, Ordering::Relaxed);
        budget
    }

    /// Called once per client request.
    pub fn deposit(&self) {
        let previous = self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        if previous + self.deposit > self.cap {
            self.balance.fetch_sub(self.deposit, Ordering::Relaxed);
        }
    }

    /// Takes one retry's worth of tokens if the traffic earned one, else a place under the
    /// floor of the second `now` falls in.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let previous = self.balance.fetch_sub(UNIT, Ordering::Relaxed);
        if previous >= UNIT {
            return true;
        }
        self.balance.fetch_add(UNIT, Ordering::Relaxed);
        self.floor_allows(now)
    }

    #[cold]
    fn floor_allows(&self, now: Instant) -> bool {
        let second = crate::clock::ticks_ms(now) / 1_000;
        let mut current = self.floor.load(Ordering::Relaxed);
        loop {
            // The window only moves forward: a caller with an older `now` counts against the
            // current second rather than starting its own.
            let (second, used) = match current >> 16 {
                current_second if current_second >= second => (current_second, current & 0xffff),
                _ => (second, 0),
            };
            if used >= FLOOR_PER_SECOND {
                return false;
            }
            let next = (second << 16) | (used + 1);
            match self.floor.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn what_follows_a_failed_attempt() {
        use FailureKind::*;
        use NextAttempt::*;
        // (failure, idempotent, reconnected) -> next, for a request whose body can go again
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
            (GoneAway, false, false, Retry),
            (Reset { refused: false }, true, false, Retry),
            (Reset { refused: false }, false, false, GiveUp),
            (BrokeOff, true, false, GiveUp),
            (Invalid, true, false, GiveUp),
            (Timeout, true, false, Retry),
            (Timeout, false, false, GiveUp),
            (Client, true, false, GiveUp),
            (Requeued, false, true, Requeue),
        ];
        for (failure, idempotent, reconnected, next) in cases {
            let request = Resend {
                idempotent,
                body_again: true,
            };
            assert_eq!(
                next_attempt(failure, request, reconnected),
                next,
                "{failure:?} idempotent={idempotent} reconnected={reconnected}"
            );
            // A body that cannot go again keeps the request where it failed.
            let spent = Resend {
                idempotent,
                body_again: false,
            };
            assert_eq!(next_attempt(failure, spent, reconnected), GiveUp);
        }
        assert!(Timeout.is_instance_fault());
        assert!(BrokeOff.is_instance_fault());
        assert!(Invalid.is_instance_fault());
        assert!(Reset { refused: true }.is_instance_fault());
        assert!(Reset { refused: false }.is_instance_fault());
        assert!(!GoneAway.is_instance_fault());
        assert!(!Stale { sent: true }.is_instance_fault());
        assert!(!Client.is_instance_fault());
        assert!(!Local.is_instance_fault());
        let any = Resend {
            idempotent: true,
            body_again: true,
        };
        assert_eq!(next_attempt(Local, any, false), NextAttempt::GiveUp);
    }

    #[test]
    fn attempts_count_retries_but_not_reconnects() {
        let mut attempts = Attempts::default();
        assert_eq!(attempts.start(4), 1);
        // A stale pooled connection: the attempt is undone, the next opens a new connection.
        let again = attempts.after_failure(NextAttempt::Reconnect, 1, || unreachable!());
        assert_eq!(again, Step::Again);
        assert_eq!(
            (attempts.count, attempts.fresh, attempts.tried.len()),
            (0, true, 0)
        );
        assert_eq!(attempts.start(4), 1);
        // Taken off a pipelined line unsent: picked again as new, on any connection, a few
        // times; then on a new connection.
        for _ in 0..REQUEUES {
            let again = attempts.after_failure(NextAttempt::Requeue, 1, || unreachable!());
            assert_eq!(again, Step::Again);
            assert_eq!((attempts.count, attempts.fresh), (0, true));
            assert_eq!(attempts.start(4), 1);
        }
        attempts.fresh = false;
        attempts.after_failure(NextAttempt::Requeue, 1, || unreachable!());
        assert!(attempts.fresh);
        assert_eq!(attempts.start(4), 1);
        // A retry, paid by the budget, on a pooled connection again.
        assert_eq!(
            attempts.after_failure(NextAttempt::Retry, 1, || true),
            Step::Again
        );
        assert!(!attempts.fresh);
        assert_eq!(attempts.start(7), 2);
        assert_eq!(attempts.tried.as_slice(), [4, 7]);
        // `retries = 1` spent: the budget is not asked.
        assert_eq!(attempts.retry(1, || unreachable!()), Step::GiveUp);
        // Room left, but the budget refuses.
        assert_eq!(attempts.retry(2, || false), Step::GiveUp);
        assert_eq!(
            attempts.after_failure(NextAttempt::GiveUp, 9, || true),
            Step::GiveUp
        );
    }

    /// A budget at `ratio` whose savings are spent.
    fn spent(ratio: f64) -> RetryBudget {
        let budget = RetryBudget::new(ratio);
        budget.balance.store(0, Ordering::Relaxed);
        budget
    }

    /// A gateway just up may retry as one after a long calm period: the requests in flight on
    /// an instance that dies in its first seconds are each owed their retry.
    #[test]
    fn a_new_budget_starts_with_its_savings_full() {
        let budget = RetryBudget::new(0.2);
        let now = Instant::now();
        let allowed = (0..10_000).filter(|_| budget.try_withdraw(now)).count();
        assert_eq!(allowed, 2_000 + 10);
    }

    #[test]
    fn retries_are_capped_at_the_ratio_plus_the_floor() {
        let budget = spent(0.2);
        let now = Instant::now();
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.try_withdraw(now) {
                retries += 1;
            }
        }
        // 20 % of 1000 requests plus the floor's 10 in this second.
        assert_eq!(retries, 210);
    }

    #[test]
    fn the_floor_allows_ten_retries_a_second_without_traffic() {
        let budget = spent(0.2);
        let start = Instant::now();
        for later in [0, 1, 5] {
            let now = start + Duration::from_secs(later);
            let allowed = (0..50).filter(|_| budget.try_withdraw(now)).count();
            assert_eq!(allowed, 10, "second {later}");
        }
    }

    #[test]
    fn an_older_instant_never_reopens_the_floor() {
        let budget = RetryBudget::new(0.0);
        let start = Instant::now();
        let later = start + Duration::from_secs(3);
        assert_eq!((0..20).filter(|_| budget.try_withdraw(later)).count(), 10);
        // Interleaved callers with an instant from the second before: no new ten.
        assert_eq!((0..20).filter(|_| budget.try_withdraw(start)).count(), 0);
        assert_eq!((0..20).filter(|_| budget.try_withdraw(later)).count(), 0);
    }

    #[test]
    fn savings_are_capped() {
        let budget = RetryBudget::new(0.2);
        for _ in 0..100_000 {
            budget.deposit();
        }
        let now = Instant::now();
        let allowed = (0..10_000).filter(|_| budget.try_withdraw(now)).count();
        assert_eq!(allowed, 2_000 + 10);
    }

    #[test]
    fn a_reload_keeps_the_savings_within_the_new_cap() {
        let budget = spent(0.2);
        for _ in 0..1000 {
            budget.deposit();
        }
        let now = Instant::now();
        let kept = RetryBudget::carried(0.2, &budget);
        assert_eq!(
            (0..1000).filter(|_| kept.try_withdraw(now)).count(),
            200 + 10
        );
        let none = RetryBudget::carried(0.0, &budget);
        assert_eq!((0..1000).filter(|_| none.try_withdraw(now)).count(), 10);
    }

    #[test]
    fn zero_ratio_leaves_only_the_floor() {
        let budget = RetryBudget::new(0.0);
        for _ in 0..100 {
            budget.deposit();
        }
        let now = Instant::now();
        assert_eq!((0..50).filter(|_| budget.try_withdraw(now)).count(), 10);
    }
}
