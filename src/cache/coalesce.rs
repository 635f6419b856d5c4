//! Request coalescing: one fetch per key at a time. The first request for a key takes a lease;
//! identical requests wait until the lease ends (the entry stored, or the fetch given up), up
//! to [`LOCK_TIMEOUT`], after which they go to an instance themselves (nginx `proxy_cache_lock`).
//! A lease whose fetch failed, or whose key was purged while it fetched (so that it stored
//! nothing), says so: one waiter then takes the next lease and the others keep waiting, rather
//! than all asking the instance at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How long identical requests wait for the fetch in flight (nginx `proxy_cache_lock_timeout`).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Keys being fetched. Touched only on misses, never held across an await.
#[derive(Debug, Default)]
pub struct Coalescer {
    inflight: Mutex<HashMap<Arc<str>, InFlight>>,
    /// Bumped by every purge of more than one key: a fetch that started before one must not
    /// store what it got.
    generation: AtomicU64,
}

/// A fetch in flight: its waiters' wake-up (with how the fetch ended), and its mark of a
/// purge of its own key.
#[derive(Debug)]
struct InFlight {
    done: watch::Receiver<Ended>,
    purged: Arc<AtomicBool>,
}

/// The right to fetch a key; waiters wake when it drops.
#[derive(Debug)]
pub struct Lease {
    coalescer: Arc<Coalescer>,
    key: Arc<str>,
    generation: u64,
    /// Its key was purged since the lease was taken.
    purged: Arc<AtomicBool>,
    done: watch::Sender<Ended>,
}

/// How a lease ended, as its waiters hear it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The instance failed the fetch.
    pub failed: bool,
    /// Its key was purged while it fetched: nothing it got was stored.
    pub purged: bool,
}

impl Lease {
    /// The instance failed this fetch (an error, a 5xx answer, a body cut off): the waiters
    /// take turns rather than all retrying at once (a 5xx the fetch stores is a hit for them).
    pub fn failed(&self) {
        self.done.send_modify(|ended| ended.failed = true);
    }

    /// No purge of its key happened since the lease was taken: what the fetch got may be
    /// stored.
    pub fn is_current(&self) -> bool {
        self.coalescer.generation.load(Ordering::Acquire) == self.generation
            && !self.purged.load(Ordering::Acquire)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Its waiters find nothing stored after a purge: told so, they take turns rather than
        // each asking the instance at once.
        if !self.is_current() {
            self.done.send_modify(|ended| ended.purged = true);
        }
        self.coalescer
            .inflight
            .lock()
            .expect("coalescer lock")
            .remove(&self.key);
    }
}

pub enum FillTurn {
    /// Nobody is fetching this key: fetch it.
    Lead(Lease),
    /// Someone is: wait for them.
    Wait(watch::Receiver<Ended>),
}

/// How a wait ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    /// The lease ended, as it says.
    Done(Ended),
    TimedOut,
}

impl Coalescer {
    pub fn join(self: &Arc<Self>, key: &Arc<str>) -> FillTurn {
        let mut inflight = self.inflight.lock().expect("coalescer lock");
        if let Some(fetch) = inflight.get(key) {
            return FillTurn::Wait(fetch.done.clone());
        }
        let (tx, done) = watch::channel(Ended::default());
        let purged = Arc::new(AtomicBool::new(false));
        let fetch = InFlight {
            done,
            purged: purged.clone(),
        };
        inflight.insert(key.clone(), fetch);
        FillTurn::Lead(Lease {
            coalescer: self.clone(),
            key: key.clone(),
            generation: self.generation.load(Ordering::Acquire),
            purged,
            done: tx,
        })
    }

    /// A purge of many keys happened: fetches in flight store nothing.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// `key` was purged: its fetch in flight, if any, stores nothing; others are untouched.
    pub fn invalidate_key(&self, key: &str) {
        if let Some(fetch) = self.inflight.lock().expect("coalescer lock").get(key) {
            fetch.purged.store(true, Ordering::Release);
        }
    }

    /// Keys starting with `prefix` were purged: their fetches in flight store nothing.
    pub fn invalidate_prefix(&self, prefix: &str) {
        let inflight = self.inflight.lock().expect("coalescer lock");
        for (key, fetch) in inflight.iter() {
            if key.starts_with(prefix) {
                fetch.purged.store(true, Ordering::Release);
            }
        }
    }

    /// Only takes the lease when nobody holds it (for background refreshes, which never wait).
    pub fn try_lead(self: &Arc<Self>, key: &Arc<str>) -> Option<Lease> {
        match self.join(key) {
            FillTurn::Lead(lease) => Some(lease),
            FillTurn::Wait(_) => None,
        }
    }
}

/// Waits until the lease holder is done, at most until `deadline`.
pub async fn wait(mut rx: watch::Receiver<Ended>, deadline: Instant) -> Waited {
    // `changed` fails once the sender (inside the lease) is dropped: that is the signal.
    match tokio::time::timeout_at(deadline, async { while rx.changed().await.is_ok() {} }).await {
        Ok(()) => Waited::Done(*rx.borrow()),
        Err(_) => Waited::TimedOut,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_leader_and_waiters_wake_when_it_is_done() {
        let coalescer = Arc::new(Coalescer::default());
        let key: Arc<str> = Arc::from("/a h");
        let FillTurn::Lead(lease) = coalescer.join(&key) else {
            panic!("first is the leader")
        };
        let FillTurn::Wait(rx) = coalescer.join(&key) else {
            panic!("second waits")
        };
        assert!(coalescer.try_lead(&key).is_none());
        let waiter = tokio::spawn(wait(rx, Instant::now() + LOCK_TIMEOUT));
        drop(lease);
        assert_eq!(waiter.await.unwrap(), Waited::Done(Ended::default()));
        let lease = coalescer.try_lead(&key).expect("the key is free again");
        // A failed fetch says so to its waiters.
        let FillTurn::Wait(rx) = coalescer.join(&key) else {
            panic!("waits")
        };
        let waiter = tokio::spawn(wait(rx, Instant::now() + LOCK_TIMEOUT));
        lease.failed();
        drop(lease);
        let failed = Ended {
            failed: true,
            purged: false,
        };
        assert_eq!(waiter.await.unwrap(), Waited::Done(failed));
    }

    /// A lease whose key was purged while it fetched tells its waiters so, whichever purge it
    /// was (the key, a prefix of it, everything).
    #[tokio::test(start_paused = true)]
    async fn waiters_hear_of_a_purge_during_the_fetch() {
        let coalescer = Arc::new(Coalescer::default());
        let key: Arc<str> = Arc::from("/a h");
        let purges: [&dyn Fn(&Coalescer); 3] = [
            &|c| c.invalidate_key("/a h"),
            &|c| c.invalidate_prefix("/a"),
            &|c| c.invalidate(),
        ];
        for purge in purges {
            let lease = coalescer.try_lead(&key).expect("free");
            let FillTurn::Wait(rx) = coalescer.join(&key) else {
                panic!("waits")
            };
            let waiter = tokio::spawn(wait(rx, Instant::now() + LOCK_TIMEOUT));
            purge(&coalescer);
            drop(lease);
            let purged = Ended {
                failed: false,
                purged: true,
            };
            assert_eq!(waiter.await.unwrap(), Waited::Done(purged));
        }
    }

    #[test]
    fn a_purged_key_stores_nothing_and_leaves_other_fetches_alone() {
        let coalescer = Arc::new(Coalescer::default());
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("/a h"), Arc::from("/b h"));
        let (Some(lease_a), Some(lease_b)) = (coalescer.try_lead(&a), coalescer.try_lead(&b))
        else {
            panic!("both lead")
        };
        coalescer.invalidate_key(&a);
        assert!(!lease_a.is_current());
        assert!(lease_b.is_current());
        drop(lease_a);
        assert!(
            coalescer.try_lead(&a).unwrap().is_current(),
            "a new fetch stores"
        );
        coalescer.invalidate_prefix("/b");
        assert!(!lease_b.is_current());
        let lease_c = coalescer.try_lead(&Arc::from("/c h")).unwrap();
        coalescer.invalidate();
        assert!(!lease_c.is_current());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_give_up_after_the_lock_timeout() {
        let coalescer = Arc::new(Coalescer::default());
        let key: Arc<str> = Arc::from("/a h");
        let _lease = coalescer.try_lead(&key).unwrap();
        let FillTurn::Wait(rx) = coalescer.join(&key) else {
            panic!("waits")
        };
        let start = Instant::now();
        assert_eq!(wait(rx, start + LOCK_TIMEOUT).await, Waited::TimedOut);
        assert_eq!(start.elapsed(), LOCK_TIMEOUT);
    }
}
