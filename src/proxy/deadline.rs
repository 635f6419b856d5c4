//! Timers that live as long as a connection: one `Sleep` whose due time moves with each
//! request, instead of one timer per request, whose registration and removal would take the
//! timer wheel's lock twice per request.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// One timer per connection whose due time moves without touching the timer wheel: it fires
/// at its old deadline at most once per timeout, then re-arms for the current due time. Keeps
/// per-request timer work off keep-alive connections.
pub struct LazyDeadline {
    sleep: Pin<Box<Sleep>>,
}

impl LazyDeadline {
    pub fn new(at: Instant) -> LazyDeadline {
        LazyDeadline {
            sleep: Box::pin(tokio::time::sleep_until(at)),
        }
    }

    /// Completes at `due`.
    pub async fn wait(&mut self, due: Instant) {
        std::future::poll_fn(|cx| self.poll_until(cx, due)).await;
    }

    /// Ready once `due` has passed; else registers `cx` to be woken then.
    pub fn poll_until(&mut self, cx: &mut Context<'_>, due: Instant) -> Poll<()> {
        if self.sleep.deadline() > due {
            self.sleep.as_mut().reset(due);
        }
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            if Instant::now() >= due {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(due);
        }
    }
}

/// How long an instance's answer body may wait for its next bytes (nginx's
/// `proxy_read_timeout` between two reads), so a stalled instance cannot hold a client, a
/// connection and the in-flight count for good. Only waits count: a client that takes nothing
/// does not poll the body. The timer is a `LazyDeadline` the caller owns.
pub struct PauseLimit {
    limit: Duration,
    since: Option<Instant>,
}

/// Why a body that paused too long ends.
pub const PAUSED: &str = "instance paused inside its answer body past the timeout";

impl PauseLimit {
    pub fn new(limit: Duration) -> PauseLimit {
        PauseLimit { limit, since: None }
    }

    /// Bytes came: the next wait starts afresh.
    pub fn progressed(&mut self) {
        self.since = None;
    }

    /// The body waits: ready once this wait has lasted the limit.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>, timer: &mut LazyDeadline) -> Poll<()> {
        let since = *self.since.get_or_insert_with(Instant::now);
        timer.poll_until(cx, since + self.limit)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_lazy_deadline_fires_at_the_latest_due_time() {
        let t0 = Instant::now();
        let mut deadline = LazyDeadline::new(t0 + Duration::from_secs(10));
        // Moving the due time later costs no timer work and still fires then, not before.
        deadline.wait(t0 + Duration::from_secs(25)).await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(25));
        // An earlier due time than the armed one fires on time.
        let t1 = Instant::now();
        deadline = LazyDeadline::new(t1 + Duration::from_secs(60));
        deadline.wait(t1 + Duration::from_secs(1)).await;
        assert_eq!(Instant::now() - t1, Duration::from_secs(1));
    }
}
