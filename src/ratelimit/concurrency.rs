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
}

pub struct ConcurrencyLimit {
    pub config: ConcurrencyConfig,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    /// Requests turned away (queue full or waited too long), for metrics.
    pub refused: AtomicU64,
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
            waiting: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// A free slot, held until the permit drops.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Waits in the queue for a slot; `Err(retry_after)` when the queue is full or the wait
    /// timed out.
    pub async fn wait(&self) -> Result<OwnedSemaphorePermit, Duration> {
        let retry_after = self.config.queue_timeout.max(Duration::from_secs(1));
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
        self.config.max_in_flight as usize - self.slots.available_permits()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn acquire(limit: &ConcurrencyLimit) -> Result<OwnedSemaphorePermit, Duration> {
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
        assert_eq!(acquire(&limit).await.unwrap_err(), Duration::from_secs(1));
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
}
