//! The in-memory store: entries by key (each key holds its Vary variants), bounded in bytes
//! with moka's TinyLFU admission and LRU eviction, each key dropped once no variant is of any
//! use (past freshness and both stale windows). Counters for hits, misses, stale and evictions.
//! With a shared tier, memory is looked at first and Redis behind it (see `shared`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::StatusCode;
use moka::notification::RemovalCause;
use tokio::time::Instant;

use super::coalesce::Coalescer;
use super::policy::{vary_matches, Freshness};
use super::shared::{SharedTier, UnsentPurge};
use crate::metrics::CacheSample;
use crate::redis_link::RedisLink;

/// Variants kept per key; a new variant pushes out the oldest.
const MAX_VARIANTS: usize = 8;
/// Bookkeeping bytes counted per entry on top of its body, headers and key.
const ENTRY_OVERHEAD: usize = 160;

/// One stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// Without hop-by-hop headers, `Age` and the request ID (set per answer).
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stored_at: Instant,
    pub freshness: Freshness,
    pub vary_names: Vec<HeaderName>,
    /// The storing request's values of `vary_names`.
    pub vary_values: Vec<Option<Vec<u8>>>,
}

impl Entry {
    fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 8)
            .sum();
        let vary: usize = self.vary_values.iter().flatten().map(Vec::len).sum();
        self.body.len() + headers + vary + ENTRY_OVERHEAD
    }

    pub fn matches(&self, request: &HeaderMap) -> bool {
        vary_matches(&self.vary_names, &self.vary_values, request)
    }

    fn remaining(&self, now: Instant) -> Duration {
        self.freshness
            .keep_for()
            .saturating_sub(now.saturating_duration_since(self.stored_at))
    }
}

/// The variants stored under one key.
#[derive(Debug, Clone)]
struct Variants(Arc<[Arc<Entry>]>);

impl Variants {
    fn remaining(&self) -> Duration {
        let now = Instant::now();
        self.0
            .iter()
            .map(|e| e.remaining(now))
            .max()
            .unwrap_or_default()
    }
}

struct KeepWhileUseful;

impl moka::Expiry<Arc<str>, Variants> for KeepWhileUseful {
    fn expire_after_create(
        &self,
        _key: &Arc<str>,
        value: &Variants,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.remaining())
    }

    fn expire_after_update(
        &self,
        _key: &Arc<str>,
        value: &Variants,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.remaining())
    }
}

/// What the cache did with one request, as `X-Cache-Status` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Expired,
    /// Served stale because the instance failed (stale-if-error).
    Stale,
    /// Served stale while a background refresh runs (stale-while-revalidate).
    Updating,
    Bypass,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Expired => "EXPIRED",
            Outcome::Stale => "STALE",
            Outcome::Updating => "UPDATING",
            Outcome::Bypass => "BYPASS",
        }
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
    bypasses: AtomicU64,
    evictions: AtomicU64,
}

impl Counters {
    pub fn record(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Hit => &self.hits,
            Outcome::Miss | Outcome::Expired => &self.misses,
            Outcome::Stale | Outcome::Updating => &self.stale,
            Outcome::Bypass => &self.bypasses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What an admin purge removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    All,
    /// Keys whose path starts so (keys begin with the path).
    Prefix(String),
    Key(String),
}

impl Purge {
    /// The form announced to the other replicas.
    pub fn to_message(&self) -> String {
        match self {
            Purge::All => "all".into(),
            Purge::Prefix(prefix) => format!("prefix {prefix}"),
            Purge::Key(key) => format!("key {key}"),
        }
    }

    pub fn from_message(message: &[u8]) -> Option<Purge> {
        let text = std::str::from_utf8(message).ok()?;
        match text.split_once(' ') {
            None if text == "all" => Some(Purge::All),
            Some(("prefix", prefix)) => Some(Purge::Prefix(prefix.into())),
            Some(("key", key)) => Some(Purge::Key(key.into())),
            _ => None,
        }
    }
}

/// How long a key whose answer was too large to store (over the route's `max_body`) is passed
/// straight to the instance, its requests as the client sent them (a `Range` or a condition
/// the instance answers itself, rather than the whole body fetched again for every request
/// to cut from), as Varnish's hit-for-pass objects do (their default lifetime too).
pub const PASS_WINDOW: Duration = Duration::from_secs(120);

/// An invalidation Redis did not take is tried again this long after, then twice as long each
/// time up to [`INVALIDATION_RETRY_LONGEST`], and only while the link is up (its own probe
/// finds Redis back).
const INVALIDATION_RETRY_FIRST: Duration = Duration::from_millis(100);
const INVALIDATION_RETRY_LONGEST: Duration = Duration::from_secs(1);

/// At most this many keys are remembered as passed; the oldest unused go first.
const MAX_PASSES: u64 = 10_000;

/// The gateway's response store, shared by every cached route and kept across reloads.
pub struct Store {
    entries: moka::sync::Cache<Arc<str>, Variants>,
    /// Keys whose last answer was too large to store ([`PASS_WINDOW`]).
    passes: moka::sync::Cache<Arc<str>, ()>,
    pub counters: Arc<Counters>,
    pub inflight: Arc<Coalescer>,
    pub max_size: u64,
    /// The Redis tier behind memory (`cache.store = "redis"`).
    pub shared: Option<SharedTier>,
}

impl Store {
    /// With `shared`, entries are also kept in Redis and purges from other replicas are
    /// followed (that needs a tokio runtime).
    pub fn new(max_size: u64, shared: Option<Arc<RedisLink>>) -> Arc<Store> {
        Store::replacing(max_size, shared, None)
    }

    /// A store in place of `previous` (a reload changed `[cache]`): its counters go on, so
    /// they never go backwards, and its entries move over as far as they fit.
    pub fn replacing(
        max_size: u64,
        shared: Option<Arc<RedisLink>>,
        previous: Option<&Store>,
    ) -> Arc<Store> {
        let counters = previous.map_or_else(Arc::default, |p| p.counters.clone());
        let evictions = counters.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_size)
            .weigher(|key: &Arc<str>, value: &Variants| {
                let bytes = key.len() + value.0.iter().map(|e| e.weight()).sum::<usize>();
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .expire_after(KeepWhileUseful)
            .eviction_listener(move |_key, _value, cause| {
                if cause == RemovalCause::Size {
                    evictions.evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        let passes = moka::sync::Cache::builder()
            .max_capacity(MAX_PASSES)
            .time_to_live(PASS_WINDOW)
            .build();
        if let Some(previous) = previous {
            for (key, variants) in previous.entries.iter() {
                entries.insert(Arc::clone(&key), variants);
            }
        }
        let shared = shared.map(|link| {
            let mut tier = SharedTier::new(link);
            if let Some(before) = previous.and_then(|p| p.shared.as_ref()) {
                tier.carry_over(before);
            }
            tier
        });
        let store = Arc::new(Store {
            entries,
            passes,
            counters,
            inflight: Arc::new(Coalescer::default()),
            max_size,
            shared,
        });
        if let Some(shared) = &store.shared {
            shared.spawn_purge_subscriber(Arc::downgrade(&store));
        }
        store
    }

    /// The variant of `key` that matches the request's varying headers.
    pub fn get(&self, key: &str, request: &HeaderMap) -> Option<Arc<Entry>> {
        let variants = self.entries.get(key)?;
        variants.0.iter().find(|e| e.matches(request)).cloned()
    }

    /// Stores `entry`, replacing the variant with the same Vary values (and every variant
    /// stored under a different Vary list: the instance changed what it varies on).
    pub fn insert(&self, key: Arc<str>, entry: Entry) -> Arc<Entry> {
        let entry = Arc::new(entry);
        let now = Instant::now();
        self.entries.entry(key).and_upsert_with(|old| {
            let mut variants: Vec<Arc<Entry>> = old
                .map(|old| old.into_value().0.to_vec())
                .unwrap_or_default()
                .into_iter()
                .filter(|e| {
                    e.vary_names == entry.vary_names
                        && e.vary_values != entry.vary_values
                        && !e.remaining(now).is_zero()
                })
                .collect();
            if variants.len() >= MAX_VARIANTS {
                variants.remove(0);
            }
            variants.push(entry.clone());
            Variants(variants.into())
        });
        entry
    }

    /// Writes a newly fetched entry to the shared tier, if there is one.
    pub async fn share(&self, key: &str, entry: &Entry) {
        if let Some(shared) = &self.shared {
            shared.put(key, entry).await;
        }
    }

    /// The shared tier's entry for `key` when it matches the request's varying headers; it is
    /// copied into memory so the next requests are memory hits.
    pub async fn get_shared(&self, key: &Arc<str>, request: &HeaderMap) -> Option<Arc<Entry>> {
        let entry = self.shared.as_ref()?.get(key).await?;
        if !entry.matches(request) {
            return None;
        }
        Some(self.insert(key.clone(), entry))
    }

    /// Notes that `key`'s answer was too large to store: its requests pass for a while.
    pub fn mark_pass(&self, key: Arc<str>) {
        self.passes.insert(key, ());
    }

    /// Whether some variant of `key` is stored in memory.
    pub fn has_entries(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Whether requests for `key` go straight to the instance ([`PASS_WINDOW`]).
    pub fn is_pass(&self, key: &str) -> bool {
        self.passes.contains_key(key)
    }

    /// Removes entries from memory only (and keeps fills in flight for them from storing, and
    /// forgets passes); the number of keys removed.
    pub fn purge_memory(&self, purge: &Purge) -> u64 {
        match purge {
            Purge::Key(key) => {
                self.inflight.invalidate_key(key);
                self.passes.invalidate(key.as_str());
            }
            Purge::All => {
                self.inflight.invalidate();
                self.passes.invalidate_all();
            }
            Purge::Prefix(prefix) => {
                self.inflight.invalidate_prefix(prefix);
                for (key, ()) in self.passes.iter() {
                    if key.starts_with(prefix.as_str()) {
                        self.passes.invalidate(&*key);
                    }
                }
            }
        }
        // moka's bookkeeping is brought up to date around a count or a walk; a key's removal
        // takes effect at once, and is what every accepted unsafe request costs.
        let purged = match purge {
            Purge::All => {
                self.entries.run_pending_tasks();
                let count = self.entries.entry_count();
                self.entries.invalidate_all();
                self.entries.run_pending_tasks();
                count
            }
            Purge::Prefix(prefix) => {
                self.entries.run_pending_tasks();
                let mut purged = 0;
                for (key, _) in self.entries.iter() {
                    if key.starts_with(prefix.as_str()) {
                        self.entries.invalidate(&*key);
                        purged += 1;
                    }
                }
                self.entries.run_pending_tasks();
                purged
            }
            Purge::Key(key) => u64::from(self.entries.remove(key.as_str()).is_some()),
        };
        purged
    }

    /// Removes entries from memory and from the shared tier (telling the other replicas):
    /// the keys removed from memory, and from Redis (`None` without a shared tier). An error
    /// says the shared tier could not be purged; memory was purged all the same.
    pub async fn purge(&self, purge: &Purge) -> (u64, Result<Option<u64>, String>) {
        let memory = self.purge_memory(purge);
        let shared = match &self.shared {
            Some(shared) => shared.purge(purge).await.map(Some),
            None => Ok(None),
        };
        (memory, shared)
    }

    /// Drops what is stored for `key` after an unsafe request changed it (RFC 9111 §4.4): from
    /// memory at once, from the shared tier and the other replicas in the background. Until
    /// Redis took it (tried again while it is down), the key is not read from Redis; past
    /// [`UnsentInvalidations`]' bound, the whole tier is purged instead.
    ///
    /// [`UnsentInvalidations`]: super::shared::UnsentInvalidations
    pub fn invalidate(self: &Arc<Self>, key: String) {
        // Held before memory goes: a read in between would take the stale entry back from Redis.
        let held = self.shared.as_ref().map(|shared| {
            let asked = shared
                .unsent
                .lock()
                .expect("unsent invalidations")
                .hold(&key);
            (asked, shared.unsent.clone())
        });
        let purge = Purge::Key(key);
        self.purge_memory(&purge);
        let (purge, unsent) = match held {
            None | Some((UnsentPurge::AllUnderWay, _)) => return,
            Some((UnsentPurge::Key, unsent)) => (purge, unsent),
            Some((UnsentPurge::All, unsent)) => (Purge::All, unsent),
        };
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut wait = INVALIDATION_RETRY_FIRST;
            loop {
                // A reload's store carries on with the same invalidations under way.
                let Some(store) = store.upgrade() else {
                    return;
                };
                let Some(shared) = &store.shared else {
                    return;
                };
                // A failure is counted in the shared tier's errors.
                if shared.is_up() && shared.purge(&purge).await.is_ok() {
                    break;
                }
                drop(store);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(INVALIDATION_RETRY_LONGEST);
            }
            let mut unsent = unsent.lock().expect("unsent invalidations");
            match &purge {
                Purge::Key(key) => unsent.release(key),
                _ => unsent.purged_all(),
            }
        });
    }

    /// Counters and sizes, with moka's pending bookkeeping applied first so sizes are current.
    pub fn sample(&self) -> CacheSample {
        self.entries.run_pending_tasks();
        let c = &self.counters;
        CacheSample {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            stale: c.stale.load(Ordering::Relaxed),
            bypasses: c.bypasses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            shared_hits: self
                .shared
                .as_ref()
                .map_or(0, |s| s.hits.load(Ordering::Relaxed)),
            shared_errors: self
                .shared
                .as_ref()
                .map_or(0, |s| s.errors.load(Ordering::Relaxed)),
            entries: self.entries.entry_count(),
            bytes: self.entries.weighted_size(),
            max_bytes: self.max_size,
            shared_up: self.shared.as_ref().map(SharedTier::is_up),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn entry(body: usize, vary: Option<&str>) -> Entry {
        Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body]),
            stored_at: Instant::now(),
            freshness: Freshness {
                lifetime: Duration::from_secs(60),
                initial_age: Duration::ZERO,
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                revalidatable: false,
            },
            vary_names: vary
                .map(|_| vec![HeaderName::from_static("accept")])
                .unwrap_or_default(),
            vary_values: vary
                .map(|v| vec![Some(v.as_bytes().to_vec())])
                .unwrap_or_default(),
        }
    }

    #[test]
    fn variants_are_kept_apart_and_replaced_in_place() {
        let store = Store::new(1 << 20, None);
        let key: Arc<str> = Arc::from("/a h");
        store.insert(key.clone(), entry(1, Some("json")));
        store.insert(key.clone(), entry(2, Some("html")));
        store.insert(key.clone(), entry(3, Some("json")));
        let mut request = HeaderMap::new();
        request.insert("accept", HeaderValue::from_static("json"));
        assert_eq!(store.get("/a h", &request).unwrap().body.len(), 3);
        request.insert("accept", HeaderValue::from_static("html"));
        assert_eq!(store.get("/a h", &request).unwrap().body.len(), 2);
        request.insert("accept", HeaderValue::from_static("xml"));
        assert!(store.get("/a h", &request).is_none());
    }

    #[test]
    fn size_bound_holds_and_evictions_are_counted() {
        let store = Store::new(64 * 1024, None);
        for i in 0..200 {
            store.insert(Arc::from(format!("/k{i} h")), entry(1024, None));
        }
        let sample = store.sample();
        assert!(sample.bytes <= 64 * 1024, "{sample:?}");
        assert!(sample.entries < 200);
    }

    #[test]
    fn purges_by_all_prefix_and_key() {
        let store = Store::new(1 << 20, None);
        for key in ["/a/1 h", "/a/2 h", "/b/1 h"] {
            store.insert(Arc::from(key), entry(1, None));
        }
        assert_eq!(store.purge_memory(&Purge::Prefix("/a/".into())), 2);
        assert_eq!(store.purge_memory(&Purge::Key("/b/1 h".into())), 1);
        assert_eq!(store.purge_memory(&Purge::Key("/b/1 h".into())), 0);
        store.insert(Arc::from("/c h"), entry(1, None));
        assert_eq!(store.purge_memory(&Purge::All), 1);
        assert_eq!(store.sample().entries, 0);
    }

    #[test]
    fn purge_messages_round_trip() {
        for purge in [
            Purge::All,
            Purge::Prefix("/a b/".into()),
            Purge::Key("/c?d h 1".into()),
        ] {
            assert_eq!(
                Purge::from_message(purge.to_message().as_bytes()),
                Some(purge)
            );
        }
        assert_eq!(Purge::from_message(b"everything"), None);
        assert_eq!(Purge::from_message(&[0xff]), None);
    }
}
