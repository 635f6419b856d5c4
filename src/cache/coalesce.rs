//! Request coalescing: one fetch per key at a time. The first request for a key takes a lease;
//! identical requests wait until the lease ends (the entry stored, or the fetch given up), up
//! to [`LOCK_TIMEOUT`], after which they go to an instance themselves (nginx `proxy_cache_lock`).
//! A lease whose fetch failed, or whose key was purged while it fetched (so that it stored
//! nothing), says so: one waiter then takes the next lease and the others keep waiting, rather
//! than all asking the instance at once.
//! A fetch that has gone on for [`LOCK_AGE`] (a slow or hung instance) no longer holds every
//! request for its key back: one more request takes a lease of its own and fetches, its answer
//! stored, while the others wait on for whichever fetch ends first (nginx
//! `proxy_cache_lock_age`); the key is free again once every one of its fetches ended.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How long identical requests wait for the fetch in flight (nginx `proxy_cache_lock_timeout`).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the newest fetch of a key may go on before one more request fetches it too
/// (nginx `proxy_cache_lock_age`, whose default this is).
pub const LOCK_AGE: Duration = Duration::from_secs(5);

/// Keys being fetched. Touched only on misses, never held across an await.
#[derive(Debug, Default)]
pub struct Coalescer {
    inflight: Mutex<HashMap<Arc<str>, InFlight>>,
    /// Bumped by every purge of more than one key: a fetch that started before one must not
    /// store what it got.
    generation: AtomicU64,
}

/// The fetches in flight for one key: one, or more once the lock aged.
#[derive(Debug)]
struct InFlight {
    /// Wakes the waiters at the end of each of the key's leases, with how it ended: what any
    /// of them stored answers the waiters, whichever ends first.
    ended: watch::Sender<Ended>,
    /// When the newest lease was taken: the lock's age counts from then.
    locked_at: Instant,
    /// The purge marks of the key's leases still going.
    leases: Vec<Arc<AtomicBool>>,
}

/// The right to fetch a key; waiters wake when it drops.
#[derive(Debug)]
pub struct Lease {
    coalescer: Arc<Coalescer>,
    key: Arc<str>,
    generation: u64,
    /// Its key was purged since the lease was taken.
    purged: Arc<AtomicBool>,
    /// The instance failed its fetch.
    failed: AtomicBool,
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
    /// They hear of it when the lease drops.
    pub fn failed(&self) {
        self.failed.store(true, Ordering::Release);
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
        let ended = Ended {
            failed: self.failed.load(Ordering::Acquire),
            purged: !self.is_current(),
        };
        let mut inflight = self.coalescer.inflight.lock().expect("coalescer lock");
        let Some(fetch) = inflight.get_mut(&self.key) else {
            return;
        };
        fetch.leases.retain(|mark| !Arc::ptr_eq(mark, &self.purged));
        // Sent under the lock, before the key may go: a waiter checking for an end under the
        // lock (at its lock-age turn) never misses one.
        fetch.ended.send_replace(ended);
        if fetch.leases.is_empty() {
            inflight.remove(&self.key);
        }
    }
}

/// A request's place in the line for a key being fetched.
#[derive(Debug)]
pub struct Waiting {
    /// Changes at the end of each of the key's leases from when the request joined.
    ended: watch::Receiver<Ended>,
    /// When it looks again at whether to fetch itself: its deadline, or the lock's coming of
    /// age, whichever is first.
    until: Instant,
}

pub enum FillTurn {
    /// Nobody is fetching this key, or the fetch has gone on for [`LOCK_AGE`]: fetch it.
    Lead(Lease),
    /// Someone is: wait for them.
    Wait(Waiting),
    /// Someone is, and the request waited its [`LOCK_TIMEOUT`] out: go to the instance
    /// uncached.
    GiveUp,
}

/// How a wait ended.
#[derive(Debug)]
pub enum Waited {
    /// A lease of the key ended, as it says.
    Done(Ended),
    /// The lock aged: this request fetches too.
    Lead(Lease),
    TimedOut,
}

/// What a request does about a key whose newest fetch was started at `locked_at`, at `now`,
/// waiting until its `deadline` at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// The fetch has gone on for [`LOCK_AGE`]: fetch too (the lock's age then counts anew).
    /// Taken even past the deadline, where the request would go to the instance anyway: this
    /// way its answer is stored.
    Lead,
    /// Wait for the fetch, and look again `until` then (the deadline or the lock's coming of
    /// age, whichever is first).
    Wait { until: Instant },
    /// Waited long enough: go to the instance uncached.
    GiveUp,
}

/// The decision behind [`Turn`], a pure function of the clock.
pub fn turn(locked_at: Instant, now: Instant, deadline: Instant) -> Turn {
    let aged_at = locked_at + LOCK_AGE;
    if now >= aged_at {
        Turn::Lead
    } else if now >= deadline {
        Turn::GiveUp
    } else {
        Turn::Wait {
            until: deadline.min(aged_at),
        }
    }
}

impl Coalescer {
    /// A request for `key` at `now`, which waits until `deadline` at most, joins the line.
    pub fn join(self: &Arc<Self>, key: &Arc<str>, now: Instant, deadline: Instant) -> FillTurn {
        let mut inflight = self.inflight.lock().expect("coalescer lock");
        let Some(fetch) = inflight.get_mut(key) else {
            return FillTurn::Lead(self.first_lease(&mut inflight, key, now));
        };
        match turn(fetch.locked_at, now, deadline) {
            Turn::Lead => FillTurn::Lead(self.lease(key, fetch, now)),
            Turn::Wait { until } => FillTurn::Wait(Waiting {
                ended: fetch.ended.subscribe(),
                until,
            }),
            Turn::GiveUp => FillTurn::GiveUp,
        }
    }

    /// The lease of a key nobody is fetching.
    fn first_lease(
        self: &Arc<Self>,
        inflight: &mut HashMap<Arc<str>, InFlight>,
        key: &Arc<str>,
        now: Instant,
    ) -> Lease {
        let (ended, _) = watch::channel(Ended::default());
        let fetch = inflight.entry(key.clone()).or_insert(InFlight {
            ended,
            locked_at: now,
            leases: Vec::new(),
        });
        self.lease(key, fetch, now)
    }

    /// A new lease of `key`, whose lock's age counts from `now`.
    fn lease(self: &Arc<Self>, key: &Arc<str>, fetch: &mut InFlight, now: Instant) -> Lease {
        let purged = Arc::new(AtomicBool::new(false));
        fetch.leases.push(purged.clone());
        fetch.locked_at = now;
        Lease {
            coalescer: self.clone(),
            key: key.clone(),
            generation: self.generation.load(Ordering::Acquire),
            purged,
            failed: AtomicBool::new(false),
        }
    }

    /// A purge of many keys happened: fetches in flight store nothing.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// `key` was purged: its fetches in flight, if any, store nothing; others are untouched.
    pub fn invalidate_key(&self, key: &str) {
        if let Some(fetch) = self.inflight.lock().expect("coalescer lock").get(key) {
            mark_purged(fetch);
        }
    }

    /// Keys starting with `prefix` were purged: their fetches in flight store nothing.
    pub fn invalidate_prefix(&self, prefix: &str) {
        let inflight = self.inflight.lock().expect("coalescer lock");
        for (key, fetch) in inflight.iter() {
            if key.starts_with(prefix) {
                mark_purged(fetch);
            }
        }
    }

    /// Only takes the lease when nobody holds one (for background refreshes, which never wait).
    pub fn try_lead(self: &Arc<Self>, key: &Arc<str>) -> Option<Lease> {
        let mut inflight = self.inflight.lock().expect("coalescer lock");
        if inflight.contains_key(key) {
            return None;
        }
        Some(self.first_lease(&mut inflight, key, Instant::now()))
    }

    /// Waits until one of the key's leases ends, at most until `deadline`; when the lock comes
    /// of age meanwhile, one of its waiters takes a lease of its own.
    pub async fn wait(
        self: &Arc<Self>,
        key: &Arc<str>,
        mut waiting: Waiting,
        deadline: Instant,
    ) -> Waited {
        loop {
            // `changed` fails once the last lease is gone, after its end was sent: either way
            // an end came.
            let ended = waiting.ended.changed();
            if tokio::time::timeout_at(waiting.until, ended).await.is_ok() {
                return Waited::Done(*waiting.ended.borrow());
            }
            let now = Instant::now();
            let mut inflight = self.inflight.lock().expect("coalescer lock");
            // An end that came meanwhile comes first: what it stored answers this request.
            let fetch = match inflight.get_mut(key) {
                Some(fetch) if matches!(waiting.ended.has_changed(), Ok(false)) => fetch,
                _ => return Waited::Done(*waiting.ended.borrow()),
            };
            match turn(fetch.locked_at, now, deadline) {
                Turn::Lead => return Waited::Lead(self.lease(key, fetch, now)),
                Turn::Wait { until } => waiting.until = until,
                Turn::GiveUp => return Waited::TimedOut,
            }
        }
    }
}

/// Marks every fetch in flight of a key as purged.
fn mark_purged(fetch: &InFlight) {
    for mark in &fetch.leases {
        mark.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// Joins `key` at the current time with the usual deadline; the wait, if it is one.
    fn join_now(coalescer: &Arc<Coalescer>, key: &Arc<str>) -> FillTurn {
        let now = Instant::now();
        coalescer.join(key, now, now + LOCK_TIMEOUT)
    }

    fn waiter(coalescer: &Arc<Coalescer>, key: &Arc<str>) -> tokio::task::JoinHandle<Waited> {
        let FillTurn::Wait(waiting) = join_now(coalescer, key) else {
            panic!("waits")
        };
        let (coalescer, key) = (coalescer.clone(), key.clone());
        let deadline = Instant::now() + LOCK_TIMEOUT;
        tokio::spawn(async move { coalescer.wait(&key, waiting, deadline).await })
    }

    fn ended(waited: Waited) -> Ended {
        match waited {
            Waited::Done(ended) => ended,
            other => panic!("not an end: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_leader_and_waiters_wake_when_it_is_done() {
        let coalescer = Arc::new(Coalescer::default());
        let key: Arc<str> = Arc::from("/a h");
        let FillTurn::Lead(lease) = join_now(&coalescer, &key) else {
            panic!("first is the leader")
        };
        let waiting = waiter(&coalescer, &key);
        assert!(coalescer.try_lead(&key).is_none());
        drop(lease);
        assert_eq!(ended(waiting.await.unwrap()), Ended::default());
        let lease = coalescer.try_lead(&key).expect("the key is free again");
        // A failed fetch says so to its waiters.
        let waiting = waiter(&coalescer, &key);
        lease.failed();
        drop(lease);
        let failed = Ended {
            failed: true,
            purged: false,
        };
        assert_eq!(ended(waiting.await.unwrap()), failed);
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
            let waiting = waiter(&coalescer, &key);
            purge(&coalescer);
            drop(lease);
            let purged = Ended {
                failed: false,
                purged: true,
            };
            assert_eq!(ended(waiting.await.unwrap()), purged);
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
    async fn waiters_give_up_at_their_deadline_before_the_lock_ages() {
        let coalescer = Arc::new(Coalescer::default());
        let key: Arc<str> = Arc::from("/a h");
        let _lease = coalescer.try_lead(&key).unwrap();
        let start = Instant::now();
        let deadline = start + MS(1500);
        let FillTurn::Wait(waiting) = coalescer.join(&key, start, deadline) else {
            panic!("waits")
        };
        let waited = coalescer.wait(&key, waiting, deadline).await;
        assert!(matches!(waited, Waited::TimedOut), "{waited:?}");
        assert_eq!(start.elapsed(), MS(1500));
        // Past its deadline, a request that joins again goes at once.
        let now = Instant::now();
        assert!(matches!(
            coalescer.join(&key, now, deadline),
            FillTurn::GiveUp
        ));
    }

    /// nginx `proxy_cache_lock_age`: a fetch as old as LOCK_AGE lets one more request fetch
    /// (the lock's age counting anew from it), which it takes even past its own deadline,
    /// since it would go to the instance then anyway; before that, the deadline ends the wait.
    #[test]
    fn the_turn_follows_the_lock_age_and_the_deadline() {
        let locked_at = Instant::now();
        let at = |ms| locked_at + MS(ms);
        let aged_at = locked_at + LOCK_AGE;
        assert_eq!(
            turn(locked_at, at(1000), at(6000)),
            Turn::Wait { until: aged_at }
        );
        assert_eq!(
            turn(locked_at, at(1000), at(3000)),
            Turn::Wait { until: at(3000) }
        );
        assert_eq!(turn(locked_at, at(3000), at(3000)), Turn::GiveUp);
        assert_eq!(turn(locked_at, aged_at, at(6000)), Turn::Lead);
        assert_eq!(turn(locked_at, aged_at, aged_at), Turn::Lead);
        assert_eq!(turn(locked_at, at(9000), at(4000)), Turn::Lead);
    }

    /// A hung fetch: once it is LOCK_AGE old, one waiter takes a lease of its own while the
    /// others wait on, for whichever fetch ends first; a request that comes then waits too. The
    /// key is free once every fetch ended.
    #[tokio::test(start_paused = true)]
    async fn a_hung_fetch_lets_one_waiter_fetch_once_the_lock_is_old() {
        let coalescer = Arc::new(Coalescer::default());
        let key: Arc<str> = Arc::from("/a h");
        let start = Instant::now();
        let hung = coalescer.try_lead(&key).unwrap();
        tokio::time::sleep(MS(1000)).await;
        let first = waiter(&coalescer, &key);
        tokio::time::sleep(MS(1000)).await;
        let second = waiter(&coalescer, &key);
        tokio::time::sleep_until(start + LOCK_AGE + MS(1)).await;
        let (leading, waiting) = match (first.is_finished(), second.is_finished()) {
            (true, false) => (first, second),
            (false, true) => (second, first),
            both => panic!("exactly one takes a lease: {both:?}"),
        };
        let Waited::Lead(lease) = leading.await.unwrap() else {
            panic!("the one that ended leads")
        };
        // The lock is young again: a request that comes now waits.
        let late = waiter(&coalescer, &key);
        tokio::time::sleep(MS(500)).await;
        assert!(!waiting.is_finished() && !late.is_finished());
        // The second fetch ends first: both hear of it.
        drop(lease);
        assert_eq!(ended(waiting.await.unwrap()), Ended::default());
        assert_eq!(ended(late.await.unwrap()), Ended::default());
        // The hung one still holds the key, whose lock is young again since the second began.
        assert!(coalescer.try_lead(&key).is_none());
        assert!(matches!(join_now(&coalescer, &key), FillTurn::Wait(_)));
        drop(hung);
        assert!(coalescer.try_lead(&key).is_some(), "free once both ended");
    }

    /// A request that comes when the lock is old fetches at once, without waiting first.
    #[tokio::test(start_paused = true)]
    async fn a_request_coming_to_an_old_lock_fetches() {
        let coalescer = Arc::new(Coalescer::default());
        let key: Arc<str> = Arc::from("/a h");
        let _hung = coalescer.try_lead(&key).unwrap();
        tokio::time::sleep(LOCK_AGE).await;
        assert!(matches!(join_now(&coalescer, &key), FillTurn::Lead(_)));
        assert!(matches!(join_now(&coalescer, &key), FillTurn::Wait(_)));
    }
}
