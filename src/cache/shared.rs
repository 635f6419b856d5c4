//! The shared tier (`[cache] store = "redis"`): entries every replica can read, behind each
//! replica's memory tier. One Redis string per cache key (the latest variant stored) in a
//! compact binary form whose times are Unix milliseconds, so replicas agree on an entry's age;
//! it expires on its own once no longer of any use. Purges delete the Redis keys and are
//! announced on a channel so every replica drops its memory copies too.
//!
//! Redis failing never fails a request: calls go through the cache's own [`RedisLink`] (bounded
//! by `redis_timeout`, skipped during an outage) and a failure is counted and answered as a miss.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes};
use futures_util::StreamExt;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use redis::aio::ConnectionLike as _;
use redis::Value;
use tokio::time::Instant;

use super::policy::{self, Freshness};
use super::store::{Entry, Purge, Store};
use crate::clock::unix_ms;
use crate::proxy::headers::strip_hop_by_hop;
use crate::redis_link::{startup_timeout, RedisLink};

/// Every cache key in Redis starts with this.
const KEY_PREFIX: &str = "scalegate:cache:";
/// Purges are announced here.
const PURGE_CHANNEL: &str = "scalegate:cache:purge";
/// First byte of every stored entry; a different one is not ours (or an older format): a miss.
const FORMAT: u8 = 1;
/// Keys asked for per SCAN step while purging: a few milliseconds of Redis's time each, so a
/// purge over millions of keys takes seconds, not minutes of round trips.
const SCAN_BATCH: u64 = 2000;
/// How often an idle purge subscription checks that its store is still in use.
const SUBSCRIBER_CHECK: Duration = Duration::from_secs(10);

pub struct SharedTier {
    link: Arc<RedisLink>,
    /// Requests answered with an entry read from Redis.
    pub hits: AtomicU64,
    /// Reads, writes and purges that Redis did not serve (down, failed or too slow).
    pub errors: AtomicU64,
    /// Shared with the tier a reload put in its place: the invalidations still under way
    /// belong to both.
    pub unsent: Arc<Mutex<UnsentInvalidations>>,
}

/// The most keys whose invalidation may be under way at once; past them, the whole shared
/// tier is purged once Redis answers.
const UNSENT_MAX: usize = 10_000;

/// What an invalidation must have Redis do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsentPurge {
    /// Delete its key.
    Key,
    /// Too many keys are under way: delete every entry.
    All,
    /// As `All`, which an earlier invalidation is already having done.
    AllUnderWay,
}

/// Invalidations (an unsafe request's answer makes its key's entries stale, RFC 9111 §4.4)
/// that have not reached Redis yet: it may be down, or the DEL still on its way. While one is,
/// its key is not read from Redis, which may still hold the entry the write made stale (served
/// again, even to the replica that took the write, until its TTL).
#[derive(Debug, Default)]
pub struct UnsentInvalidations {
    /// Keys, with how many invalidations of each are under way.
    keys: HashMap<String, u32>,
    /// More keys than [`UNSENT_MAX`] were: nothing is read from Redis until it was purged
    /// whole.
    overflowed: bool,
}

impl UnsentInvalidations {
    /// Notes one more invalidation of `key` under way, and says what must reach Redis for it.
    pub fn hold(&mut self, key: &str) -> UnsentPurge {
        if let Some(count) = self.keys.get_mut(key) {
            *count += 1;
            return UnsentPurge::Key;
        }
        if self.keys.len() >= UNSENT_MAX {
            return if std::mem::replace(&mut self.overflowed, true) {
                UnsentPurge::AllUnderWay
            } else {
                UnsentPurge::All
            };
        }
        self.keys.insert(key.to_owned(), 1);
        UnsentPurge::Key
    }

    /// One invalidation of `key` reached Redis.
    pub fn release(&mut self, key: &str) {
        if let Some(count) = self.keys.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.keys.remove(key);
            }
        }
    }

    /// The whole tier was purged: the keys' own invalidations still go, and reads may resume.
    pub fn purged_all(&mut self) {
        self.overflowed = false;
    }

    /// Whether reading `key` from Redis could bring back what a write made stale.
    pub fn blocks(&self, key: &str) -> bool {
        self.overflowed || self.keys.contains_key(key)
    }
}

/// The largest body the shared tier holds: a transfer of tens of megabytes outlasts
/// `redis_timeout` (taking the cache's link down) and holds up every cache read queued behind
/// it on the connection. Larger entries stay in each replica's memory.
pub const SHARED_MAX_BODY: usize = 1024 * 1024;

impl SharedTier {
    pub fn new(link: Arc<RedisLink>) -> SharedTier {
        SharedTier {
            link,
            hits: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            unsent: Arc::default(),
        }
    }

    /// Goes on from `before` (the tier a reload replaced): its counts, and its invalidations
    /// under way.
    pub fn carry_over(&mut self, before: &SharedTier) {
        for (count, was) in [(&self.hits, &before.hits), (&self.errors, &before.errors)] {
            count.store(was.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.unsent = before.unsent.clone();
    }

    /// Whether Redis serves the shared tier now (else each replica has its memory only).
    pub fn is_up(&self) -> bool {
        self.link.is_up()
    }

    /// `/health/redis`'s view of the tier's link.
    pub async fn health(&self) -> (bool, serde_json::Value) {
        self.link.health().await
    }

    /// The entry stored under `key` by any replica; `None` when there is none or Redis failed.
    pub async fn get(&self, key: &str) -> Option<Entry> {
        if self
            .unsent
            .lock()
            .expect("unsent invalidations")
            .blocks(key)
        {
            return None;
        }
        let redis_key = &redis_key(key);
        let reply = self
            .link
            .call(
                |mut c| async move { c.req_packed_command(redis::cmd("GET").arg(redis_key)).await },
            )
            .await;
        let found = match reply {
            Some(Value::BulkString(bytes)) => bytes,
            Some(Value::Nil) => return None,
            // Something else wrote the key: that key's problem, not the link's; a miss, whose
            // fill overwrites it.
            Some(Value::ServerError(err)) if err.code() == "WRONGTYPE" => return None,
            // Another refusal (LOADING, NOPERM, ...) or no answer: counted.
            _ => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        decode(
            Bytes::from(found),
            unix_ms(SystemTime::now()),
            Instant::now(),
        )
    }

    /// Stores `entry` for the rest of its useful life (nothing when it has none left, or when
    /// it is over [`SHARED_MAX_BODY`]).
    pub async fn put(&self, key: &str, entry: &Entry) {
        if entry.body.len() > SHARED_MAX_BODY {
            return;
        }
        let now = Instant::now();
        let in_store = now.saturating_duration_since(entry.stored_at);
        let remaining = entry.freshness.keep_for().saturating_sub(in_store);
        if remaining.is_zero() {
            return;
        }
        let stored_unix_ms = unix_ms(SystemTime::now()).saturating_sub(in_store.as_millis() as u64);
        let value = &encode(entry, stored_unix_ms);
        let redis_key = &redis_key(key);
        let px = remaining.as_millis().max(1) as u64;
        let stored = self
            .link
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(redis_key)
                    .arg(value)
                    .arg("PX")
                    .arg(px)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
        if stored.is_none() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Deletes the matching keys from Redis and tells every replica to drop its memory copies;
    /// the number of Redis keys deleted.
    pub async fn purge(&self, purge: &Purge) -> Result<u64, String> {
        let limit = startup_timeout(&self.link.state);
        let pattern = match purge {
            Purge::Key(_) => None,
            Purge::All => Some(format!("{KEY_PREFIX}*")),
            Purge::Prefix(prefix) => Some(format!("{KEY_PREFIX}{}*", glob_escaped(prefix))),
        };
        if pattern.is_some() && self.link.state.redis_cluster {
            return Err("purging all or by prefix is not supported on Redis Cluster yet".into());
        }
        let message = purge.to_message();
        let deleted = self
            .link
            .call_admin(limit, |mut c| async move {
                let deleted = match (pattern, purge) {
                    (None, Purge::Key(key)) => {
                        redis::cmd("DEL")
                            .arg(redis_key(key))
                            .query_async::<u64>(&mut c)
                            .await
                    }
                    (Some(pattern), _) => delete_matching(&mut c, &pattern).await,
                    (None, _) => Ok(0),
                };
                // Announced also when the deletion stopped part way: the other replicas' memory
                // copies go either way, and the purge is said to have failed.
                let announced = redis::cmd("PUBLISH")
                    .arg(PURGE_CHANNEL)
                    .arg(message)
                    .query_async::<u64>(&mut c)
                    .await;
                let deleted = deleted?;
                announced?;
                Ok(deleted)
            })
            .await;
        deleted.ok_or_else(|| {
            self.errors.fetch_add(1, Ordering::Relaxed);
            format!(
                "Redis at {} did not answer: the shared tier was not purged",
                self.link.target()
            )
        })
    }

    /// Applies purges announced by any replica to `store`'s memory tier, for as long as the
    /// store is in use. Whenever the subscription is made after a failed or lost one, the
    /// memory tier is emptied: purges sent meanwhile were missed.
    pub fn spawn_purge_subscriber(&self, store: Weak<Store>) {
        let link = self.link.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            let mut first = true;
            let mut failing = false;
            loop {
                if store.strong_count() == 0 {
                    return;
                }
                match subscribe(&link).await {
                    Ok(stream) => {
                        backoff = Duration::from_millis(50);
                        if failing {
                            tracing::info!("cache purge subscription back");
                            failing = false;
                        }
                        if !first {
                            if let Some(store) = store.upgrade() {
                                store.purge_memory(&Purge::All);
                            }
                        }
                        first = false;
                        if !follow(stream, &store).await {
                            return;
                        }
                    }
                    Err(err) => {
                        first = false;
                        // Once per outage: the link's own outage is logged too, and this one
                        // may last without it (a subscription refused while commands pass).
                        if failing {
                            tracing::debug!(%err, "cache purge subscription failed");
                        } else {
                            tracing::warn!(%err, "cache purge subscription failed: purges from other replicas are missed until it is back, and memory is emptied then");
                            failing = true;
                        }
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        });
    }
}

async fn subscribe(link: &RedisLink) -> redis::RedisResult<redis::aio::PubSubStream> {
    let client = link.node_client(&link.state.redis_urls[0])?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(PURGE_CHANNEL).await?;
    Ok(pubsub.into_on_message())
}

/// Applies purge messages until the subscription ends (`true`) or the store is gone (`false`).
async fn follow(mut stream: redis::aio::PubSubStream, store: &Weak<Store>) -> bool {
    loop {
        match tokio::time::timeout(SUBSCRIBER_CHECK, stream.next()).await {
            Ok(Some(message)) => {
                let Some(store) = store.upgrade() else {
                    return false;
                };
                if let Some(purge) = Purge::from_message(message.get_payload_bytes()) {
                    store.purge_memory(&purge);
                }
            }
            Ok(None) => return true,
            Err(_) if store.strong_count() == 0 => return false,
            Err(_) => {}
        }
    }
}

async fn delete_matching(
    connection: &mut crate::redis_link::Connection,
    pattern: &str,
) -> redis::RedisResult<u64> {
    let mut cursor = 0u64;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_BATCH)
            .query_async(connection)
            .await?;
        if !keys.is_empty() {
            deleted += redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<u64>(connection)
                .await?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

fn redis_key(key: &str) -> String {
    let mut redis_key = String::with_capacity(KEY_PREFIX.len() + key.len());
    redis_key.push_str(KEY_PREFIX);
    redis_key.push_str(key);
    redis_key
}

/// `text` matched literally in a SCAN MATCH pattern.
fn glob_escaped(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// The stored form: format byte, status, stored-at (Unix ms), the four freshness durations
/// (ms), headers, Vary names with the storing request's values, body; lengths big-endian.
fn encode(entry: &Entry, stored_unix_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(entry.body.len() + 512);
    out.put_u8(FORMAT);
    out.put_u16(entry.status.as_u16());
    out.put_u64(stored_unix_ms);
    let f = &entry.freshness;
    for d in [
        f.lifetime,
        f.initial_age,
        f.stale_while_revalidate,
        f.stale_if_error,
    ] {
        out.put_u64(millis(d));
    }
    out.put_u32(entry.headers.len() as u32);
    for (name, value) in &entry.headers {
        put_bytes(&mut out, name.as_str().as_bytes());
        put_bytes(&mut out, value.as_bytes());
    }
    out.put_u32(entry.vary_names.len() as u32);
    for (name, value) in entry.vary_names.iter().zip(&entry.vary_values) {
        put_bytes(&mut out, name.as_str().as_bytes());
        match value {
            Some(value) => {
                out.put_u8(1);
                put_bytes(&mut out, value);
            }
            None => out.put_u8(0),
        }
    }
    put_bytes(&mut out, &entry.body);
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

/// The entry in `stored`, placed on this process's clock: stored as long ago as the wall clocks
/// say (never in the future). `None` for anything malformed, and for what no fill stores (an
/// interim or 304 status); hop-by-hop and framing fields are dropped, as from an instance's
/// answer: whatever wrote the key, the answer is framed by the gateway.
fn decode(stored: Bytes, now_unix_ms: u64, now: Instant) -> Option<Entry> {
    let mut r = Reader {
        bytes: &stored,
        at: 0,
    };
    if r.u8()? != FORMAT {
        return None;
    }
    let status = StatusCode::from_u16(r.u16()?)
        .ok()
        .filter(|s| !s.is_informational() && *s != StatusCode::NOT_MODIFIED)?;
    let stored_unix_ms = r.u64()?;
    let mut duration = || r.u64().map(Duration::from_millis);
    let mut freshness = Freshness {
        lifetime: duration()?,
        initial_age: duration()?,
        stale_while_revalidate: duration()?,
        stale_if_error: duration()?,
        revalidatable: false,
    };
    let count = r.u32()? as usize;
    let mut headers = HeaderMap::with_capacity(count.min(64));
    for _ in 0..count {
        let name = HeaderName::from_bytes(r.bytes()?).ok()?;
        let value = HeaderValue::from_bytes(r.bytes()?).ok()?;
        headers.append(name, value);
    }
    strip_hop_by_hop(&mut headers);
    freshness.revalidatable = policy::has_validator(&headers);
    let count = r.u32()? as usize;
    let mut vary_names = Vec::with_capacity(count.min(16));
    let mut vary_values = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        vary_names.push(HeaderName::from_bytes(r.bytes()?).ok()?);
        vary_values.push(match r.u8()? {
            0 => None,
            _ => Some(r.bytes()?.to_vec()),
        });
    }
    let length = r.u32()? as usize;
    let start = r.at;
    r.take(length)?;
    if r.at != stored.len() {
        return None;
    }
    let in_store = Duration::from_millis(now_unix_ms.saturating_sub(stored_unix_ms));
    Some(Entry {
        status,
        headers,
        body: stored.slice(start..start + length),
        stored_at: now.checked_sub(in_store).unwrap_or(now),
        freshness,
        vary_names,
        vary_values,
    })
}

/// Reads the stored form without ever reading past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let taken = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(taken)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key is not read while an invalidation of it is under way, however many overlap; past
    /// the bound one purge of everything is asked for, once, and reads wait for it.
    #[test]
    fn unsent_invalidations_block_their_keys_until_they_land() {
        let mut unsent = UnsentInvalidations::default();
        assert_eq!(unsent.hold("/a"), UnsentPurge::Key);
        assert_eq!(unsent.hold("/a"), UnsentPurge::Key);
        assert!(unsent.blocks("/a") && !unsent.blocks("/b"));
        unsent.release("/a");
        assert!(unsent.blocks("/a"));
        unsent.release("/a");
        assert!(!unsent.blocks("/a"));
        for n in 0..UNSENT_MAX {
            assert_eq!(unsent.hold(&format!("/k{n}")), UnsentPurge::Key);
        }
        assert_eq!(unsent.hold("/over"), UnsentPurge::All);
        assert_eq!(unsent.hold("/later"), UnsentPurge::AllUnderWay);
        assert!(unsent.blocks("/b"));
        unsent.purged_all();
        assert!(!unsent.blocks("/b") && unsent.blocks("/k0"));
    }

    fn entry(stored_at: Instant) -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Entry {
            status: StatusCode::NOT_FOUND,
            headers,
            body: Bytes::from_static(b"not here"),
            stored_at,
            freshness: Freshness {
                lifetime: Duration::from_secs(60),
                initial_age: Duration::from_secs(2),
                stale_while_revalidate: Duration::from_millis(1500),
                stale_if_error: Duration::ZERO,
                revalidatable: false,
            },
            vary_names: vec![
                HeaderName::from_static("accept"),
                HeaderName::from_static("x-lang"),
            ],
            vary_values: vec![Some(b"text/html".to_vec()), None],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn round_trip_keeps_everything_and_ages_by_the_wall_clock() {
        let now = Instant::now();
        let original = entry(now);
        let stored = Bytes::from(encode(&original, 1_000_000));
        // Read by another replica 7.5 s later (by the wall clock).
        let read = decode(stored.clone(), 1_007_500, now).unwrap();
        assert_eq!(read.status, original.status);
        assert_eq!(read.headers, original.headers);
        assert_eq!(read.body, original.body);
        assert_eq!(read.freshness, original.freshness);
        assert_eq!(read.vary_names, original.vary_names);
        assert_eq!(read.vary_values, original.vary_values);
        assert_eq!(
            now.saturating_duration_since(read.stored_at),
            Duration::from_millis(7500)
        );
        // A reader whose clock is behind the writer's sees it as just stored, not in the future.
        let behind = decode(stored, 999_000, now).unwrap();
        assert_eq!(behind.stored_at, now);
    }

    #[test]
    fn malformed_or_foreign_values_are_misses() {
        let now = Instant::now();
        let stored = encode(&entry(now), 1);
        for cut in [0, 1, 5, 40, stored.len() - 1] {
            assert!(decode(Bytes::copy_from_slice(&stored[..cut]), 2, now).is_none());
        }
        let mut longer = stored.clone();
        longer.push(0);
        assert!(decode(Bytes::from(longer), 2, now).is_none());
        let mut other_format = stored;
        other_format[0] = 9;
        assert!(decode(Bytes::from(other_format), 2, now).is_none());
        assert!(decode(Bytes::from_static(&[1, 0, 200, 0xff]), 2, now).is_none());
        // What no fill stores is not served from whatever wrote it.
        for status in [StatusCode::SWITCHING_PROTOCOLS, StatusCode::NOT_MODIFIED] {
            let planted = Entry {
                status,
                ..entry(now)
            };
            assert!(decode(Bytes::from(encode(&planted, 1)), 2, now).is_none());
        }
        let mut framed = entry(now);
        for (name, value) in [
            ("transfer-encoding", "chunked"),
            ("connection", "x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=1"),
        ] {
            framed.headers.insert(name, HeaderValue::from_static(value));
        }
        let read = decode(Bytes::from(encode(&framed, 1)), 2, now).unwrap();
        assert_eq!(read.headers, entry(now).headers);
    }

    #[test]
    fn purge_patterns_match_literally() {
        assert_eq!(redis_key("/a?b h"), "scalegate:cache:/a?b h");
        assert_eq!(glob_escaped("/a*[b]?\\"), "/a\\*\\[b\\]\\?\\\\");
    }
}
