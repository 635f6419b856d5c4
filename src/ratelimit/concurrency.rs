//! Concurrency limits: at most `max_in_flight` requests at once through a route or to an
//! upstream; the next `queue_size` wait up to `queue_timeout` for a slot, the rest are refused.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::limits::ConcurrencyConfig;

/// The concurrency slots one request holds (route and upstream); freed when dropped.
#[derive(Default)]
pub struct Slots(SmallVec<[OwnedSemaphorePermit; 2]>);

impl Slots {
    pub fn push(&mut self, slot: OwnedSemaphorePermit) {
        self.0.push(slot);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn extend(&mut self, other: Slots) {
        self.0.extend(other.0);
    }
}

pub struct ConcurrencyLimit {
    pub config: ConcurrencyConfig,
    /// Shared with the limits this one replaced by reloads: requests in flight hold its slots.
    slots: Arc<Semaphore>,
    /// Slots a lowered limit still takes back as requests in flight end (see [`Self::resized`]).
    owed: Arc<AtomicUsize>,
    /// Shared with the limits this one replaced, as the queue on `slots` is.
    waiting: Arc<AtomicUsize>,
    /// Requests turned away (queue full or waited too long), for metrics.
    pub refused: Arc<AtomicU64>,
}

/// Counts a waiter while it waits, also when its request is dropped mid-wait.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConcurrencyLimit {
    pub fn new(config: ConcurrencyConfig) -> ConcurrencyLimit {
        ConcurrencyLimit {
            config,
            slots: Arc::new(Semaphore::new(config.max_in_flight as usize)),
            owed: Arc::new(AtomicUsize::new(0)),
            waiting: Arc::new(AtomicUsize::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The limit of `config` in place of `self` (a reload changed it): the requests in flight
    /// keep their slots and count against the new number. A raised limit adds slots at once;
    /// a lowered one takes back free slots at once and the rest as requests end, so no more
    /// than the new number run once the old ones are done, and never more than the larger.
    /// Must run inside the runtime (a lowered limit may leave a task taking slots back).
    pub fn resized(&self, config: ConcurrencyConfig) -> ConcurrencyLimit {
        let (before, after) = (
            self.config.max_in_flight as usize,
            config.max_in_flight as usize,
        );
        if after > before {
            // What is owed from an earlier lowering is forgiven first.
            let mut grow = after - before;
            let _ = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                    let forgiven = owed.min(grow);
                    grow -= forgiven;
                    Some(owed - forgiven)
                });
            self.slots.add_permits(grow);
        } else if before > after {
            let shrink = before - after;
            let taken = self.slots.forget_permits(shrink);
            if shrink > taken {
                self.owed.fetch_add(shrink - taken, Ordering::AcqRel);
                tokio::spawn(take_back(self.slots.clone(), self.owed.clone()));
            }
        }
        ConcurrencyLimit {
            config,
            slots: self.slots.clone(),
            owed: self.owed.clone(),
            waiting: self.waiting.clone(),
            refused: self.refused.clone(),
        }
    }

    /// A free slot, held until the permit drops.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Waits in the queue for a slot; `Err(retry_after)` (whole seconds) when the queue is full
    /// or the wait timed out.
    pub async fn wait(&self) -> Result<OwnedSemaphorePermit, u64> {
        let retry_after = retry_after_secs(self.config.queue_timeout);
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.config.queue_size {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(retry_after);
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(
            self.config.queue_timeout,
            self.slots.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(retry_after)
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        (self.config.max_in_flight as usize + self.owed.load(Ordering::Acquire))
            .saturating_sub(self.slots.available_permits())
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Takes slots out of use as requests give them back, while a lowered limit is owed some
/// (a raise may forgive the rest first: a slot taken then goes back).
async fn take_back(slots: Arc<Semaphore>, owed: Arc<AtomicUsize>) {
    while owed.load(Ordering::Acquire) > 0 {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let paid = owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                owed.checked_sub(1)
            })
            .is_ok();
        if paid {
            slot.forget();
        }
    }
}

/// What a refused client is told to wait, in whole seconds: the queue's timeout, rounded up so
/// that it is not told too soon, and at least 1.
fn retry_after_secs(queue_timeout: Duration) -> u64 {
    let micros = u64::try_from(queue_timeout.as_micros()).unwrap_or(u64::MAX);
    super::algorithm::ceil_secs(micros).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_the_queue_timeout_up() {
        for (ms, secs) in [(0, 1), (300, 1), (2000, 2), (2500, 3)] {
            assert_eq!(retry_after_secs(Duration::from_millis(ms)), secs, "{ms} ms");
        }
    }

    async fn acquire(limit: &ConcurrencyLimit) -> Result<OwnedSemaphorePermit, u64> {
        match limit.try_acquire() {
            Some(permit) => Ok(permit),
            None => limit.wait().await,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn queue_then_refusal() {
        let limit = Arc::new(ConcurrencyLimit::new(ConcurrencyConfig {
            max_in_flight: 1,
            queue_size: 1,
            queue_timeout: Duration::from_millis(300),
        }));
        let first = acquire(&limit).await.unwrap();
        let queued = tokio::spawn({
            let limit = limit.clone();
            async move { acquire(&limit).await.is_ok() }
        });
        tokio::task::yield_now().await;
        assert_eq!(limit.waiting(), 1);
        // The queue (1) is full: refused at once.
        assert_eq!(acquire(&limit).await.unwrap_err(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(first);
        assert!(queued.await.unwrap());
        assert_eq!(limit.waiting(), 0);
        // Held past queue_timeout: the waiter gives up.
        let _held = acquire(&limit).await.unwrap();
        assert!(acquire(&limit).await.is_err());
        assert_eq!(limit.waiting(), 0);
        assert_eq!(limit.in_flight(), 1);
        assert_eq!(limit.refused.load(Ordering::Relaxed), 2);
    }

    fn at_most(max_in_flight: u32) -> ConcurrencyConfig {
        ConcurrencyConfig {
            max_in_flight,
            queue_size: 0,
            queue_timeout: Duration::from_millis(100),
        }
    }

    /// A reload that changes the limit carries the requests in flight: lowered from 3 to 1
    /// with 3 running, nothing more is let in until two of them ended, and then one at a time;
    /// raised again, the new slots are there at once.
    #[tokio::test]
    async fn a_resized_limit_counts_the_requests_in_flight() {
        let three = ConcurrencyLimit::new(at_most(3));
        let running: Vec<_> = (0..3).map(|_| three.try_acquire().unwrap()).collect();
        three.refused.store(5, Ordering::Relaxed);
        let one = three.resized(at_most(1));
        assert_eq!(one.in_flight(), 3);
        assert_eq!(one.refused.load(Ordering::Relaxed), 5, "counts carry over");
        assert!(one.try_acquire().is_none());
        let mut running = running.into_iter();
        drop(running.next());
        tokio::task::yield_now().await;
        assert!(one.try_acquire().is_none(), "one taken back, two still run");
        drop(running.next());
        tokio::task::yield_now().await;
        assert_eq!(one.in_flight(), 1);
        assert!(one.try_acquire().is_none(), "the one left is the limit");
        drop(running.next());
        let only = one.try_acquire().expect("a slot once all ended");
        assert!(one.try_acquire().is_none());
        let two = one.resized(at_most(2));
        assert!(two.try_acquire().is_some());
        drop(only);
        // Lowered with a debt, then raised before it was paid: the debt is forgiven first.
        let four = ConcurrencyLimit::new(at_most(4));
        let held: Vec<_> = (0..4).map(|_| four.try_acquire().unwrap()).collect();
        let two = four.resized(at_most(2)).resized(at_most(3));
        assert_eq!(two.in_flight(), 4);
        drop(held);
        tokio::task::yield_now().await;
        let now: Vec<_> = (0..3).filter_map(|_| two.try_acquire()).collect();
        assert_eq!(now.len(), 3);
        assert!(two.try_acquire().is_none());
    }
}
