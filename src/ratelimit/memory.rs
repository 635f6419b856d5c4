//! The in-process store: rule state in a fixed set of mutex-guarded shards, keyed by a 64-bit
//! hash of (rule, key) so a lookup allocates nothing. Memory is bounded: a full shard first
//! drops idle entries (whose state means the same as none), then an eighth of what is left.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, MutexGuard};

use smallvec::SmallVec;

use super::algorithm::{decide_all, JointDecision, Quota, SlotState};

const SHARDS: usize = 64;

struct Slot {
    state: SlotState,
    idle_after: u64,
    /// When a request last asked about it, passed or refused: a full shard forgets the least
    /// recently asked first.
    seen: u64,
}

pub struct MemoryStore {
    shards: Box<[Mutex<HashMap<u64, Slot>>]>,
    per_shard: usize,
    hasher: RandomState,
}

impl MemoryStore {
    /// A store holding about `max_keys` (rule, key) entries at most.
    pub fn new(max_keys: usize) -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max_keys.div_ceil(SHARDS).max(8),
            hasher: RandomState::new(),
        }
    }

    /// Decides one request under several rules, each given as (rule id, quota, key), at `now`
    /// (µs); it is booked in all of them or, when one refuses it, in none
    /// ([`decide_all`]).
    pub fn decide<K: Hash>(&self, checks: &[(u64, &Quota, K)], now: u64) -> JointDecision {
        let hashes: SmallVec<[u64; 4]> = checks
            .iter()
            .map(|(rule_id, _, key)| self.hasher.hash_one((rule_id, key)))
            .collect();
        let shard_of = |hash: u64| (hash % SHARDS as u64) as usize;
        let mut shards: SmallVec<[usize; 4]> = hashes.iter().map(|&h| shard_of(h)).collect();
        shards.sort_unstable();
        shards.dedup();
        // All the rules' shards at once, so no other request books in between; taken in index
        // order, so two requests over the same shards cannot wait on each other.
        let mut locked: SmallVec<[MutexGuard<'_, HashMap<u64, Slot>>; 4]> = shards
            .iter()
            .map(|&i| self.shards[i].lock().expect("rate-limit shard"))
            .collect();
        let guard = |hash: u64| {
            shards
                .binary_search(&shard_of(hash))
                .expect("every rule's shard is locked")
        };
        let stored: SmallVec<[Option<SlotState>; 4]> = hashes
            .iter()
            .map(|&hash| {
                locked[guard(hash)].get_mut(&hash).map(|slot| {
                    slot.seen = now;
                    slot.state
                })
            })
            .collect();
        let joint = decide_all(
            checks.iter().zip(&stored).map(|((_, q, _), s)| (*q, *s)),
            now,
        );
        for &(i, state) in &joint.restated {
            if let Some(slot) = locked[guard(hashes[i])].get_mut(&hashes[i]) {
                *slot = Slot {
                    state,
                    idle_after: state.idle_after(checks[i].1),
                    seen: now,
                };
            }
        }
        for (((hash, state), stored), (_, quota, _)) in
            hashes.iter().zip(&joint.booked).zip(&stored).zip(checks)
        {
            let slots = &mut locked[guard(*hash)];
            if stored.is_none() && slots.len() >= self.per_shard {
                make_room(slots, now);
            }
            slots.insert(
                *hash,
                Slot {
                    state: *state,
                    idle_after: state.idle_after(quota),
                    seen: now,
                },
            );
        }
        joint
    }

    /// Entries held now (for the admin API).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("rate-limit shard").len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn make_room(slots: &mut HashMap<u64, Slot>, now: u64) {
    let before = slots.len();
    slots.retain(|_, slot| slot.idle_after > now);
    if slots.len() * 8 > before * 7 {
        // Still (nearly) full of live entries: forget some, which only ever admits more. Drop
        // enough that the next purge is an eighth of the capacity away, the least recently
        // asked first (nginx's limit_req drops the least recently used): a client held back
        // that keeps asking stays held back through a flood of new keys.
        let mut oldest: Vec<(u64, u64)> =
            slots.iter().map(|(key, slot)| (slot.seen, *key)).collect();
        let count = (before / 8 + 1).min(oldest.len());
        if count < oldest.len() {
            oldest.select_nth_unstable(count);
        }
        for (_, key) in &oldest[..count] {
            slots.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::algorithm::Algorithm;

    const SEC: u64 = 1_000_000;

    fn quota(limit: u64, burst: u64) -> Quota {
        Quota {
            algorithm: Algorithm::Gcra,
            limit,
            period_us: SEC,
            burst,
        }
    }

    #[test]
    fn keys_and_rules_are_separate() {
        let store = MemoryStore::new(1000);
        let q = quota(1, 0);
        assert!(store.decide(&[(1, &q, &"a")], 0).allowed());
        assert!(!store.decide(&[(1, &q, &"a")], 0).allowed());
        assert!(store.decide(&[(1, &q, &"b")], 0).allowed());
        assert!(store.decide(&[(2, &q, &"a")], 0).allowed());
    }

    #[test]
    fn a_request_one_rule_refuses_is_booked_in_none() {
        let store = MemoryStore::new(1000);
        let (strict, loose) = (quota(1, 0), quota(100, 99));
        let both = |now| store.decide(&[(1, &strict, "c"), (2, &loose, "c")], now);
        assert!(both(0).allowed());
        for now in 1..50 {
            assert!(!both(now).allowed());
        }
        // The loose rule counted the one request that passed, not the 49 refused ones: 99 of
        // its 100 a second are left.
        let loose_alone = store.decide(&[(2, &loose, "c")], 50);
        assert_eq!(loose_alone.decisions[0].remaining, 98);
    }

    #[test]
    fn memory_stays_bounded_and_idle_keys_go_first() {
        let store = MemoryStore::new(SHARDS * 16);
        let q = quota(1, 0);
        for i in 0..100_000u64 {
            store.decide(&[(1, &q, &i)], i);
        }
        assert!(store.len() <= SHARDS * 16, "{}", store.len());
        // A key that is still limited survives when the others have gone idle.
        let later = 10 * SEC;
        assert!(store.decide(&[(1, &q, &"hot")], later).allowed());
        for i in 0..(SHARDS as u64 * 2) {
            store.decide(&[(1, &q, &(i + 1_000_000))], later + 1);
        }
        assert!(!store.decide(&[(1, &q, &"hot")], later + 2).allowed());
    }

    /// A flood of new keys under the same hourly rule does not make room by forgetting clients
    /// the rule holds back that keep asking: the least recently asked go first.
    #[test]
    fn a_flood_of_keys_does_not_free_a_held_back_client() {
        let store = MemoryStore::new(SHARDS * 16);
        let hourly = Quota {
            algorithm: Algorithm::Gcra,
            limit: 1,
            period_us: 3600 * SEC,
            burst: 0,
        };
        let held = 0..(SHARDS as u64 / 2);
        for client in held.clone() {
            assert!(store.decide(&[(1, &hourly, &client)], 0).allowed());
        }
        let mut freed = 0;
        // 50,000 new keys, 100 between two of the held clients' tries.
        for round in 1..=500u64 {
            let at = round * 1000;
            for key in 0..100u64 {
                store.decide(&[(1, &hourly, &(1_000_000 * round + key))], at + key);
            }
            freed += held
                .clone()
                .filter(|client| store.decide(&[(1, &hourly, client)], at + 500).allowed())
                .count();
        }
        assert_eq!(freed, 0);
    }

    /// nginx `limit_req zone=z rate=10r/s burst=5 nodelay`, driven by tokio's paused clock the
    /// way the gateway drives the store.
    #[tokio::test(start_paused = true)]
    async fn gcra_burst_matches_nginx_on_a_paused_clock() {
        use std::time::Duration;
        use tokio::time::Instant;
        let store = MemoryStore::new(1000);
        let q = quota(10, 5);
        let origin = Instant::now();
        let now = || origin.elapsed().as_micros() as u64 + SEC;
        let burst: Vec<bool> = (0..8)
            .map(|_| store.decide(&[(7, &q, &"client")], now()).allowed())
            .collect();
        assert_eq!(burst, [true, true, true, true, true, true, false, false]);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(store.decide(&[(7, &q, &"client")], now()).allowed());
        assert!(!store.decide(&[(7, &q, &"client")], now()).allowed());
        // 10 r/s sustained: one every 100 ms passes, a second in between does not.
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(50)).await;
            let half = store.decide(&[(7, &q, &"client")], now()).allowed();
            tokio::time::advance(Duration::from_millis(50)).await;
            let full = store.decide(&[(7, &q, &"client")], now()).allowed();
            assert!(!half && full);
        }
        // Quiet for a second: the burst of 6 is back.
        tokio::time::advance(Duration::from_secs(1)).await;
        let refill = (0..8)
            .filter(|_| store.decide(&[(7, &q, &"client")], now()).allowed())
            .count();
        assert_eq!(refill, 6);
    }
}
