//! Concurrency limits: at most `max_in_flight` requests at once through a route or to an
//! upstream; the next `queue_size` wait up to `queue_timeout` for a slot, the rest are refused.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;
use tokio::sync::Semaphore;

use crate::config::limits::ConcurrencyConfig;

/// The concurrency slots one request holds (route and upstream); freed when dropped.
#[derive(Default)]
pub struct Slots(SmallVec<[Slot; 2]>);

impl Slots {
    pub fn push(&mut self, slot: Slot) {
        self.0.push(slot);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn extend(&mut self, other: Slots) {
        self.0.extend(other.0);
    }
}

/// The slots of a limit and of the limits reloads made of it: requests in flight and in the
/// queue hold on to the one they met, so every version shares it.
#[derive(Debug)]
struct Pool {
    slots: Semaphore,
    /// Slots a lowered limit still takes back as requests in flight end (see
    /// [`ConcurrencyLimit::resized`]).
    owed: AtomicUsize,
}

impl Pool {
    /// Pays one slot of what a lowered limit is owed, if anything is; whether it did.
    fn pay_debt(&self) -> bool {
        self.owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                owed.checked_sub(1)
            })
            .is_ok()
    }

    /// Pays what is owed with `slots`, as far as they go, and puts the rest in use.
    fn pay_then_add(&self, slots: usize) {
        let mut left = slots;
        let _ = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                let paid = owed.min(slots);
                left = slots - paid;
                Some(owed - paid)
            });
        self.slots.add_permits(left);
    }
}

/// One request's slot of a limit, held until dropped. Its permit is taken out of the semaphore
/// on acquisition and given back by hand on drop, so that the drop can keep it instead.
#[derive(Debug)]
pub struct Slot(Arc<Pool>);

impl Drop for Slot {
    /// A lowered limit's debt is settled here, by the ending request itself: its slot is kept
    /// out of use rather than handed to the first waiter. Taking it back through the semaphore
    /// (a task waiting for slots) would queue behind every waiting request, and the queue would
    /// drain at the old limit. The decrement is one atomic step, so a raise forgiving the debt
    /// at the same time cannot make both keep (or both hand back) the same slot.
    fn drop(&mut self) {
        if !self.0.pay_debt() {
            self.0.slots.add_permits(1);
        }
    }
}

pub struct ConcurrencyLimit {
    pub config: ConcurrencyConfig,
    /// Shared with the limits this one replaced by reloads: requests in flight hold its slots.
    pool: Arc<Pool>,
    /// Shared with the limits this one replaced, as the queue on `pool` is.
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
            pool: Arc::new(Pool {
                slots: Semaphore::new(config.max_in_flight as usize),
                owed: AtomicUsize::new(0),
            }),
            waiting: Arc::new(AtomicUsize::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The limit of `config` in place of `self` (a reload changed it): the requests in flight
    /// keep their slots and count against the new number. A raised limit adds slots at once;
    /// a lowered one takes back free slots at once and the rest as requests end (each ending
    /// request's slot then goes out of use, not to the queue), so nothing more is let in until
    /// fewer than the new number run, and never more than the larger.
    pub fn resized(&self, config: ConcurrencyConfig) -> ConcurrencyLimit {
        let (before, after) = (
            self.config.max_in_flight as usize,
            config.max_in_flight as usize,
        );
        let pool = &self.pool;
        if after > before {
            // What is owed from an earlier lowering is forgiven first.
            pool.pay_then_add(after - before);
        } else if before > after {
            let shrink = before - after;
            // Owed first, then the free slots taken against it: a request ending in between
            // pays its part instead of handing its slot to the queue. What was taken beyond
            // what is still owed then (those requests paid it) goes back.
            pool.owed.fetch_add(shrink, Ordering::AcqRel);
            let taken = pool.slots.forget_permits(shrink);
            pool.pay_then_add(taken);
        }
        ConcurrencyLimit {
            config,
            pool: self.pool.clone(),
            waiting: self.waiting.clone(),
            refused: self.refused.clone(),
        }
    }

    /// A free slot, held until it drops.
    pub fn try_acquire(&self) -> Option<Slot> {
        let permit = self.pool.slots.try_acquire().ok()?;
        permit.forget();
        Some(Slot(self.pool.clone()))
    }

    /// Waits in the queue for a slot; `Err(retry_after)` (whole seconds) when the queue is full
    /// or the wait timed out.
    pub async fn wait(&self) -> Result<Slot, u64> {
        let retry_after = retry_after_secs(self.config.queue_timeout);
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.config.queue_size {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(retry_after);
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(self.config.queue_timeout, self.pool.slots.acquire()).await {
            Ok(Ok(permit)) => {
                // Nothing between the permit and its slot can be cancelled: no await.
                permit.forget();
                Ok(Slot(self.pool.clone()))
            }
            _ => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(retry_after)
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        (self.config.max_in_flight as usize + self.pool.owed.load(Ordering::Acquire))
            .saturating_sub(self.pool.slots.available_permits())
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
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

    async fn acquire(limit: &ConcurrencyLimit) -> Result<Slot, u64> {
        match limit.try_acquire() {
            Some(slot) => Ok(slot),
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
    /// raised again, the new slots are there at once. Debts are settled as slots drop, with no
    /// task to run, so no runtime is needed.
    #[test]
    fn a_resized_limit_counts_the_requests_in_flight() {
        let three = ConcurrencyLimit::new(at_most(3));
        let running: Vec<_> = (0..3).map(|_| three.try_acquire().unwrap()).collect();
        three.refused.store(5, Ordering::Relaxed);
        let one = three.resized(at_most(1));
        assert_eq!(one.in_flight(), 3);
        assert_eq!(one.refused.load(Ordering::Relaxed), 5, "counts carry over");
        assert!(one.try_acquire().is_none());
        let mut running = running.into_iter();
        drop(running.next());
        assert!(one.try_acquire().is_none(), "one taken back, two still run");
        drop(running.next());
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
        let now: Vec<_> = (0..3).filter_map(|_| two.try_acquire()).collect();
        assert_eq!(now.len(), 3);
        assert!(two.try_acquire().is_none());
        drop(now);
        // Lowered with free slots: they are taken at once and nothing is owed.
        let four = ConcurrencyLimit::new(at_most(4));
        let held = four.try_acquire().unwrap();
        let two = four.resized(at_most(2));
        assert_eq!(two.in_flight(), 1);
        let other = two.try_acquire().expect("one of the two is free");
        assert!(two.try_acquire().is_none());
        drop((held, other));
        assert_eq!(two.in_flight(), 0);
        let both: Vec<_> = (0..3).filter_map(|_| two.try_acquire()).collect();
        assert_eq!(both.len(), 2);
    }

    /// Lets every task that can run do so: with the clock paused, time only moves on once all
    /// tasks are idle.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// Lowered from 4 to 1 while 4 run and 6 wait in the queue (the reload of the review:
    /// queued requests kept coming in at the old limit): no waiter gets in until all 4 ended,
    /// then one at a time, each only when the one before it ended.
    #[tokio::test(start_paused = true)]
    async fn a_lowered_limit_holds_the_queue_back_until_requests_end() {
        let four = Arc::new(ConcurrencyLimit::new(ConcurrencyConfig {
            max_in_flight: 4,
            queue_size: 100,
            queue_timeout: Duration::from_secs(30),
        }));
        let running: Vec<_> = (0..4).map(|_| four.try_acquire().unwrap()).collect();
        let (admitted, mut entered) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..6 {
            // The waiters wait on the limit they met, as queued requests do across a reload.
            let (four, admitted) = (four.clone(), admitted.clone());
            tokio::spawn(async move { admitted.send(four.wait().await.map_err(drop)) });
        }
        settle().await;
        assert_eq!(four.waiting(), 6);
        let one = four.resized(ConcurrencyConfig {
            max_in_flight: 1,
            ..four.config
        });
        assert_eq!(one.in_flight(), 4);
        let mut running = running.into_iter();
        for still_running in [3, 2, 1] {
            drop(running.next());
            settle().await;
            assert!(
                entered.try_recv().is_err(),
                "let in with {still_running} running"
            );
            assert_eq!(one.waiting(), 6);
            assert_eq!(one.in_flight(), still_running);
        }
        drop(running.next());
        let mut current = entered
            .recv()
            .await
            .unwrap()
            .expect("let in once all ended");
        for left in (0..5).rev() {
            settle().await;
            assert!(entered.try_recv().is_err(), "two let in at once");
            assert_eq!((one.in_flight(), one.waiting()), (1, left + 1));
            drop(current);
            current = entered.recv().await.unwrap().expect("the next one let in");
        }
        assert_eq!((one.in_flight(), one.waiting()), (1, 0));
        drop(current);
        assert_eq!(one.in_flight(), 0);
        assert_eq!(one.refused.load(Ordering::Relaxed), 0);
    }
}
