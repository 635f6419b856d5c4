//! The response cache of cached routes: look the request up, answer hits from memory, coalesce
//! misses into one instance request per key (which asks the shared tier, when there is one,
//! before an instance), store what HTTP's rules allow while the client streams it, refresh
//! stale entries in the background, keep the routes' `warm` paths fresh and answer stale when
//! instances fail.
//! `policy` makes the decisions, with the clock passed in: those of HTTP's rules (what is
//! stored, for how long, what a request may be answered with), what a request does once the
//! fetch it waited on is done, and when a warmed path is fetched again. This file moves bytes
//! and time: it reads the clocks where time has passed (a request's arrival, the end of a wait,
//! an answer's arrival, a warming tick), passes them down, and sequences a miss (wait for the
//! fill in flight, fill, revalidate, fall back to stale).

pub mod coalesce;
pub mod policy;
pub mod shared;
pub mod store;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{RouteCacheConfig, RouteConfig};
use crate::proxy::headers::X_REQUEST_ID;
use crate::proxy::{BoxError, ForwardBody, GatewayBody, InstanceFetch, ProxyError, Runtime};
use crate::ratelimit::{hold_slots, Slots};
use coalesce::{FillTurn, Lease, Waited, LOCK_TIMEOUT};
use policy::{AfterWait, Precondition, RangeAnswer, RequestVerdict, State};
pub use store::{Entry, Outcome, Purge, Store};

pub static X_CACHE_STATUS: HeaderName = HeaderName::from_static("x-cache-status");

/// A cached route: its rules and the shared store.
pub struct RouteCache {
    pub rules: RouteCacheConfig,
    pub store: Arc<Store>,
    /// The route's exact host, sent on warming requests.
    host: Option<String>,
}

impl RouteCache {
    /// One slot per route, `None` where the route has no `cache` table.
    pub fn for_routes(routes: &[RouteConfig], store: &Arc<Store>) -> Vec<Option<Arc<RouteCache>>> {
        routes
            .iter()
            .map(|route| {
                route.cache.clone().map(|rules| {
                    Arc::new(RouteCache {
                        rules,
                        store: store.clone(),
                        host: route.host.clone().filter(|h| !h.starts_with('*')),
                    })
                })
            })
            .collect()
    }

    /// The key of a request on this route (see `policy::cache_key`). It holds the Host as the
    /// instance gets it, port and all: an answer built from it (a redirect, a link) would
    /// otherwise be stored for every client of the route, one request's Host poisoning it.
    fn key_of(&self, parts: &Parts, scheme: &str, client_ip: IpAddr) -> String {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        policy::cache_key(
            path,
            scheme,
            host,
            &self.rules.key,
            &parts.headers,
            client_ip,
        )
    }
}

/// Answers a request of a cached route; errors become responses here so that every answer
/// carries `X-Cache-Status`. The request's concurrency `slots` are held by the answer's body,
/// and by a fetch others wait on for as long as it lasts, even when its client left.
pub async fn serve(
    cache: &Arc<RouteCache>,
    parts: Parts,
    body: ForwardBody,
    (client_ip, scheme): (IpAddr, &'static str),
    (fetch, slots): (InstanceFetch, Slots),
) -> Response<GatewayBody> {
    let mut slots = Some(slots);
    let mut response = answer(cache, parts, body, (client_ip, scheme), fetch, &mut slots).await;
    if let Some(slots) = slots {
        hold_slots(&mut response, slots);
    }
    response
}

/// [`serve`], leaving `slots` where the answer did not take them.
async fn answer(
    cache: &Arc<RouteCache>,
    parts: Parts,
    body: ForwardBody,
    (client_ip, scheme): (IpAddr, &'static str),
    fetch: InstanceFetch,
    slots: &mut Option<Slots>,
) -> Response<GatewayBody> {
    let has_body = !http_body::Body::is_end_stream(&body);
    let verdict = policy::request_verdict(&parts.method, &parts.headers, has_body, &cache.rules);
    if verdict == RequestVerdict::Bypass {
        // What an unsafe request changed is no longer what is stored (RFC 9111 §4.4).
        let changes = (!parts.method.is_safe()).then(|| cache.key_of(&parts, scheme, client_ip));
        let result = fetch.send(parts, body).await;
        if let (Some(key), Ok(answer)) = (changes, &result) {
            if policy::invalidates(answer.status()) {
                cache.store.invalidate(key);
            }
        }
        return labelled(result, Outcome::Bypass, cache, &fetch.request_id);
    }
    let key = cache.key_of(&parts, scheme, client_ip);
    let store = &cache.store;
    let stored = store.get(&key, &parts.headers);
    let now = Instant::now();
    let state = stored.as_ref().map(|e| state_at(e, now));
    let stored_answer = |entry: &Entry, outcome, now| {
        hit(
            entry,
            outcome,
            (&parts.method, &parts.headers),
            cache,
            &fetch,
            now,
        )
    };
    match (state, stored) {
        (Some(State::Fresh), Some(entry)) => stored_answer(&entry, Outcome::Hit, now),
        (Some(State::Revalidate), Some(entry)) => {
            let answer = stored_answer(&entry, Outcome::Updating, now);
            let key: Arc<str> = Arc::from(key);
            if let Some(lease) = store.inflight.try_lead(&key) {
                tokio::spawn(refresh(
                    cache.rules.clone(),
                    store.clone(),
                    key,
                    parts,
                    fetch.clone(),
                    lease,
                    Some(entry.clone()),
                ));
            }
            answer
        }
        // A key whose answer was too large to store goes as the client sent it (hits never
        // ask: nothing of it is stored).
        (_, None) if store.is_pass(&key) => {
            let result = fetch.send(parts, body).await;
            labelled(result, Outcome::Miss, cache, &fetch.request_id)
        }
        (_, mut stale) => {
            let key: Arc<str> = Arc::from(key);
            // However many turns it waits, a request waits LOCK_TIMEOUT at most in all.
            let deadline = now + LOCK_TIMEOUT;
            // It waited once more after a fetch that stored another Vary variant than its own.
            let mut rejoined = false;
            loop {
                let waited = match store.inflight.join(&key, Instant::now(), deadline) {
                    FillTurn::Lead(lease) => Waited::Lead(lease),
                    FillTurn::Wait(waiting) => store.inflight.wait(&key, waiting, deadline).await,
                    FillTurn::GiveUp => Waited::TimedOut,
                };
                match waited {
                    // The first request for the key, one whose turn came after a failed or
                    // purged fetch, or one that found the fetch as old as LOCK_AGE.
                    Waited::Lead(lease) => {
                        break lead_for(cache, key, parts, fetch, lease, stale, slots).await
                    }
                    Waited::Done(ended) => {
                        // The entry that was stale went with the purge: it no longer stands in
                        // for a failure, nor are its validators asked about.
                        if ended.purged {
                            stale = None;
                        }
                        let now = Instant::now();
                        let stored = store.get(&key, &parts.headers);
                        let woken = policy::Woken {
                            stored: stored.as_ref().map(|e| (state_at(e, now), e)),
                            failed: ended.failed,
                            purged: ended.purged,
                            rejoined,
                            variants_stored: store.has_entries(&key),
                            stale: stale.as_ref().map(|e| (state_at(e, now), e)),
                        };
                        match policy::after_wait(woken) {
                            AfterWait::Hit(entry) => break stored_answer(entry, Outcome::Hit, now),
                            AfterWait::Updating(entry) => {
                                break stored_answer(entry, Outcome::Updating, now)
                            }
                            AfterWait::Stale(entry) => {
                                break stored_answer(entry, Outcome::Stale, now)
                            }
                            AfterWait::Rejoin => rejoined = true,
                            AfterWait::FillAlone => {
                                break fill(cache, key, parts, fetch, None, stale).await
                            }
                            AfterWait::WaitAgain => {}
                        }
                    }
                    // nginx proxy_cache_lock: a late waiter goes to the instance, uncached
                    // (the fetches it waited on are younger than LOCK_AGE, or it would fetch
                    // for the store); its failure still serves what stale_if_error allows.
                    Waited::TimedOut => {
                        let (method, request_headers) =
                            (parts.method.clone(), parts.headers.clone());
                        let result = fetch.send(as_cache_fetch(parts), ForwardBody::Empty).await;
                        let request = (&method, &request_headers);
                        let now = Instant::now();
                        break stale_answer(&result, stale, request, cache, &fetch, now)
                            .unwrap_or_else(|| {
                                labelled(result, Outcome::Miss, cache, &fetch.request_id)
                            });
                    }
                }
            }
        }
    }
}

/// Runs the fetch of a request that took a key's lease, holding the request's `slots`.
async fn lead_for(
    cache: &Arc<RouteCache>,
    key: Arc<str>,
    parts: Parts,
    fetch: InstanceFetch,
    lease: Lease,
    stale: Option<Arc<Entry>>,
    slots: &mut Option<Slots>,
) -> Response<GatewayBody> {
    // The fetch outlives this client: the requests waiting on the lease get its answer even
    // when the one that started it leaves, as Varnish keeps a fetch going for its waiting list.
    let request_id = fetch.request_id.clone();
    let held = slots.take().unwrap_or_default();
    let lead = lead(cache.clone(), key, parts, fetch, lease, stale);
    let lead = async move {
        let mut response = lead.await;
        hold_slots(&mut response, held);
        response
    };
    match tokio::spawn(lead).await {
        Ok(response) => response,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Only when the runtime shuts down.
        Err(_) => labelled(
            Err(ProxyError::InstanceFailed("the gateway is stopping".into())),
            Outcome::Miss,
            cache,
            &request_id,
        ),
    }
}

/// The request that took a key's lease: the shared tier, when there is one, then an instance.
async fn lead(
    cache: Arc<RouteCache>,
    key: Arc<str>,
    parts: Parts,
    fetch: InstanceFetch,
    lease: Lease,
    stale: Option<Arc<Entry>>,
) -> Response<GatewayBody> {
    let store = &cache.store;
    // Another replica may have stored it: the shared tier before an instance.
    let shared = match &store.shared {
        Some(_) => store.get_shared(&key, &parts.headers).await,
        None => None,
    };
    let now = Instant::now();
    match shared {
        Some(entry) if state_at(&entry, now) == State::Fresh => {
            drop(lease);
            if let Some(shared) = &store.shared {
                shared.hits.fetch_add(1, Ordering::Relaxed);
            }
            hit(
                &entry,
                Outcome::Hit,
                (&parts.method, &parts.headers),
                &cache,
                &fetch,
                now,
            )
        }
        // A stale shared entry still serves on error, as a memory one would.
        Some(entry) => fill(&cache, key, parts, fetch, Some(lease), Some(entry)).await,
        None => fill(&cache, key, parts, fetch, Some(lease), stale).await,
    }
}

/// A response made from a stored entry: 304 without a body when it satisfies the client's own
/// conditions (If-None-Match, If-Modified-Since), else the part a GET's Range asks for (206, or
/// 416 past the end), else the whole answer, as nginx answers from its cache.
fn hit(
    entry: &Entry,
    outcome: Outcome,
    (method, request): (&Method, &HeaderMap),
    cache: &RouteCache,
    fetch: &InstanceFetch,
    now: Instant,
) -> Response<GatewayBody> {
    cache.store.counters.record(outcome);
    let length = entry.body.len() as u64;
    // HEAD is never ranged (RFC 9110 §14.2).
    let range = || {
        if *method == Method::GET {
            policy::range_answer(request, entry.status, &entry.headers, length)
        } else {
            RangeAnswer::Whole
        }
    };
    // The status, the body, and for a range its Content-Range and length.
    let (status, body, range) = match policy::precondition(request, entry.status, &entry.headers) {
        Precondition::NotModified => (StatusCode::NOT_MODIFIED, None, None),
        Precondition::Failed => (StatusCode::PRECONDITION_FAILED, None, None),
        Precondition::Holds => match range() {
            RangeAnswer::Whole => (entry.status, Some(entry.body.clone()), None),
            RangeAnswer::Part { first, last } => (
                StatusCode::PARTIAL_CONTENT,
                Some(entry.body.slice(first as usize..=last as usize)),
                Some((format!("bytes {first}-{last}/{length}"), last - first + 1)),
            ),
            RangeAnswer::Unsatisfiable => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                None,
                Some((format!("bytes */{length}"), 0)),
            ),
        },
    };
    let mut response = Response::new(GatewayBody::Full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    // A 412 or a 416 describes no stored bytes: none of the stored fields go with it.
    if !matches!(
        status,
        StatusCode::PRECONDITION_FAILED | StatusCode::RANGE_NOT_SATISFIABLE
    ) {
        headers.clone_from(&entry.headers);
    }
    if let Some((content_range, part_length)) = range {
        let content_range = HeaderValue::try_from(content_range).expect("digits");
        headers.insert(header::CONTENT_RANGE, content_range);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(part_length));
    }
    let in_store = now.saturating_duration_since(entry.stored_at);
    let age = entry.freshness.initial_age.saturating_add(in_store);
    headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
    headers.insert(X_REQUEST_ID.clone(), fetch.request_id.clone());
    headers.insert(
        X_CACHE_STATUS.clone(),
        HeaderValue::from_static(outcome.as_str()),
    );
    response
}

/// The `stale` entry's answer at `now` in place of `result`, when that is the instance failing
/// and the entry's `stale_if_error` window allows.
fn stale_answer(
    result: &Result<Response<GatewayBody>, ProxyError>,
    stale: Option<Arc<Entry>>,
    request: (&Method, &HeaderMap),
    cache: &RouteCache,
    fetch: &InstanceFetch,
    now: Instant,
) -> Option<Response<GatewayBody>> {
    let entry = stale.filter(|e| instance_failed(result) && state_at(e, now).usable_on_error())?;
    Some(hit(&entry, Outcome::Stale, request, cache, fetch, now))
}

/// Whether a fetch's outcome is the instance failing (an error, or a 5xx answer): what a stale
/// entry may stand in for, and what its waiters take turns after.
fn instance_failed(result: &Result<Response<GatewayBody>, ProxyError>) -> bool {
    match result {
        Ok(response) => policy::is_error_status(response.status()),
        Err(error) => error.status().is_server_error(),
    }
}

/// Where `entry` stands in its lifetime at `now`.
fn state_at(entry: &Entry, now: Instant) -> State {
    State::at(
        &entry.freshness,
        now.saturating_duration_since(entry.stored_at),
    )
}

/// An instance's answer (or the gateway's error) with `X-Cache-Status`.
fn labelled(
    result: Result<Response<GatewayBody>, ProxyError>,
    outcome: Outcome,
    cache: &RouteCache,
    request_id: &HeaderValue,
) -> Response<GatewayBody> {
    cache.store.counters.record(outcome);
    let mut response = result.unwrap_or_else(|error| {
        error.log_failure(request_id);
        error.response(request_id)
    });
    response.headers_mut().insert(
        X_CACHE_STATUS.clone(),
        HeaderValue::from_static(outcome.as_str()),
    );
    response
}

/// A client's request as the cache fetches it: HEAD as GET (nginx `proxy_cache_convert_head`),
/// without the client's conditions and Range, so the answer is the whole resource and can be
/// stored; a revalidation adds the entry's own validators afterwards.
fn as_cache_fetch(mut parts: Parts) -> Parts {
    parts.method = Method::GET;
    for name in &policy::CLIENT_CONDITIONS {
        parts.headers.remove(name);
    }
    parts
}

/// Fetches for a client and stores the answer when allowed, streaming it to the client as it
/// comes. With `lease`, identical requests are waiting for this one; they wake when the entry
/// is stored or storing was given up. `stale` answers instead of a failure within its
/// stale-if-error window.
async fn fill(
    cache: &RouteCache,
    key: Arc<str>,
    parts: Parts,
    fetch: InstanceFetch,
    lease: Option<Lease>,
    stale: Option<Arc<Entry>>,
) -> Response<GatewayBody> {
    let outcome = if stale.is_some() {
        Outcome::Expired
    } else {
        Outcome::Miss
    };
    let (method, request_headers) = (parts.method.clone(), parts.headers.clone());
    let fetched = fetch_for_store(parts, &fetch, stale.as_ref()).await;
    // Read when the answer came, not when it was asked for: what it stores is aged from then.
    let (now, wall) = (Instant::now(), SystemTime::now());
    let result = match fetched {
        Fetched::NotModified(stale, not_modified) => {
            let (entry, storable) = renewed(
                &cache.rules,
                &stale,
                &not_modified,
                &request_headers,
                (now, wall),
            );
            let entry = if storable {
                keep(&cache.store, key, entry, lease)
            } else {
                Arc::new(entry)
            };
            let request = (&method, &request_headers);
            return hit(&entry, outcome, request, cache, &fetch, now);
        }
        Fetched::Answer(result) => result,
    };
    if instance_failed(&result) {
        if let Some(lease) = &lease {
            lease.failed();
        }
    }
    let request = (&method, &request_headers);
    if let Some(answer) = stale_answer(&result, stale, request, cache, &fetch, now) {
        return answer;
    }
    let Ok(response) = result else {
        return labelled(result, outcome, cache, &fetch.request_id);
    };
    let Some(pending) = Pending::new(&cache.rules, &response, &request_headers, (now, wall)) else {
        if declared_length(&response).is_some_and(|length| length > cache.rules.max_body) {
            cache.store.mark_pass(key);
        }
        return labelled(Ok(response), outcome, cache, &fetch.request_id);
    };
    // The client's own conditions, judged on the fresh answer as on a stored one (and as nginx
    // judges them on a miss): a 304 or 412 goes without a body, while the fill goes on reading
    // the whole answer into the store.
    let judged = policy::precondition(&request_headers, response.status(), response.headers());
    let (head, body) = response.into_parts();
    let length = http_body::Body::size_hint(&body).exact();
    let (tx, rx) = mpsc::channel(16);
    let store = cache.store.clone();
    let max_body = cache.rules.max_body;
    let client = (judged == Precondition::Holds).then_some(tx);
    tokio::spawn(async move {
        let mut lease = lease;
        let mut body = body;
        let mut buffer = Some(BytesMut::new());
        let mut client = client;
        // Frames the client has not taken yet: while the answer may still be stored, the
        // instance is read at its own pace (at most max_body ahead), so one slow client does
        // not hold the lease every other request for the key waits on.
        let mut backlog = VecDeque::new();
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Err(err) => {
                    // Cut off mid-body: a failure of the instance, as one before the head. The
                    // waiters hear of it now, not once a slow client took what came.
                    if let Some(lease) = lease.take() {
                        lease.failed();
                    }
                    if relay(&mut client, &mut backlog, false).await {
                        if let Some(tx) = client.take() {
                            let _ = tx.send(Err(err)).await;
                        }
                    }
                    return;
                }
            };
            if let Some(buf) = buffer.as_mut() {
                if (buf.len() + data.len()) as u64 <= max_body {
                    buf.extend_from_slice(&data);
                } else {
                    // Too large to store: the waiters need not wait any longer.
                    buffer = None;
                    drop(lease.take());
                    store.mark_pass(key.clone());
                }
            }
            backlog.push_back(data);
            // The client left: keep reading only while the entry may still be stored.
            if !relay(&mut client, &mut backlog, buffer.is_some()).await && buffer.is_none() {
                return;
            }
        }
        if let Some(buf) = buffer {
            keep(&store, key, pending.into_entry(buf.freeze()), lease);
        }
        relay(&mut client, &mut backlog, false).await;
    });
    let mut response = match judged {
        Precondition::Holds => Response::from_parts(head, GatewayBody::Relay(rx, length)),
        Precondition::NotModified => {
            let mut response = Response::from_parts(head, GatewayBody::Full(None));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        }
        // As from the store: no stored field describes a failed precondition.
        Precondition::Failed => {
            let mut response = Response::new(GatewayBody::Full(None));
            *response.status_mut() = StatusCode::PRECONDITION_FAILED;
            response
                .headers_mut()
                .insert(X_REQUEST_ID.clone(), fetch.request_id.clone());
            response
        }
    };
    cache.store.counters.record(outcome);
    response.headers_mut().insert(
        X_CACHE_STATUS.clone(),
        HeaderValue::from_static(outcome.as_str()),
    );
    response
}

/// Passes the `backlog` on to the client: without waiting when `ahead` (what does not fit in the
/// channel stays in the backlog), else waiting for the client to take each frame. False once
/// the client left (the backlog is dropped then).
async fn relay(
    client: &mut Option<mpsc::Sender<Result<Bytes, BoxError>>>,
    backlog: &mut VecDeque<Bytes>,
    ahead: bool,
) -> bool {
    let Some(tx) = client.as_ref() else {
        backlog.clear();
        return false;
    };
    while let Some(data) = backlog.pop_front() {
        let sent = if ahead {
            match tx.try_send(Ok(data)) {
                Err(mpsc::error::TrySendError::Full(Ok(data))) => {
                    backlog.push_front(data);
                    return true;
                }
                other => other.is_ok(),
            }
        } else {
            tx.send(Ok(data)).await.is_ok()
        };
        if !sent {
            *client = None;
            backlog.clear();
            return false;
        }
    }
    true
}

/// A response that may be stored once its body is complete.
struct Pending {
    entry: Entry,
}

impl Pending {
    /// `None` when the rules forbid storing it or its declared length is over `max_body`. The
    /// response came at `now` (`wall` by the wall clock, which `Expires` and `Date` are read by).
    fn new(
        rules: &RouteCacheConfig,
        response: &Response<GatewayBody>,
        request: &http::HeaderMap,
        (now, wall): (Instant, SystemTime),
    ) -> Option<Pending> {
        let headers = response.headers();
        if declared_length(response).is_some_and(|length| length > rules.max_body) {
            return None;
        }
        let freshness = policy::storable(
            response.status(),
            headers,
            request.contains_key(header::AUTHORIZATION),
            rules,
            wall,
        )
        .ok()?;
        let vary_names = policy::vary_names(headers)?;
        let vary_values = policy::vary_values(&vary_names, request);
        let mut stored = headers.clone();
        strip_per_answer(&mut stored);
        Some(Pending {
            entry: Entry {
                status: response.status(),
                headers: stored,
                body: Bytes::new(),
                stored_at: now,
                freshness,
                vary_names,
                vary_values,
            },
        })
    }

    fn into_entry(self, body: Bytes) -> Entry {
        Entry { body, ..self.entry }
    }
}

/// The length an answer's Content-Length declares.
fn declared_length(response: &Response<GatewayBody>) -> Option<u64> {
    response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Headers set per answer, never stored.
fn strip_per_answer(headers: &mut HeaderMap) {
    headers.remove(&X_REQUEST_ID);
    headers.remove(header::AGE);
    headers.remove(&X_CACHE_STATUS);
}

/// Stores `entry` in memory, wakes the waiters (they read memory), then writes it to the shared
/// tier in the background.
fn keep(store: &Arc<Store>, key: Arc<str>, entry: Entry, lease: Option<Lease>) -> Arc<Entry> {
    // Fetched before a purge: it answers its request, and is not stored to outlive the purge.
    if lease.as_ref().is_some_and(|lease| !lease.is_current()) {
        return Arc::new(entry);
    }
    let entry = store.insert(key.clone(), entry);
    drop(lease);
    if store.shared.is_some() {
        let (store, shared) = (store.clone(), entry.clone());
        tokio::spawn(async move { store.share(&key, &shared).await });
    }
    entry
}

/// Makes the request conditional on `stale`'s validators; the entry being revalidated, if any.
fn add_validators(request: &mut HeaderMap, stale: Option<&Arc<Entry>>) -> Option<Arc<Entry>> {
    let stale = stale?;
    let conditions = policy::validators(&stale.headers);
    if conditions.is_empty() {
        return None;
    }
    for (name, value) in conditions {
        request.insert(name, value);
    }
    Some(stale.clone())
}

/// What a fetch for the store brought back.
enum Fetched {
    /// A 304 to the validators of the stale entry: that entry, and the 304's headers to renew
    /// it with.
    NotModified(Arc<Entry>, HeaderMap),
    /// The instance's answer, or why there is none.
    Answer(Result<Response<GatewayBody>, ProxyError>),
}

/// Fetches the request's answer for the store, whether for a client (`fill`) or for nobody
/// in particular (`refresh`): a GET without the client's own conditions, conditional on the
/// `stale` entry's validators when it has some, so that a 304 renews it without its body.
async fn fetch_for_store(
    parts: Parts,
    fetch: &InstanceFetch,
    stale: Option<&Arc<Entry>>,
) -> Fetched {
    let mut parts = as_cache_fetch(parts);
    let revalidating = add_validators(&mut parts.headers, stale);
    let result = fetch.send(parts, ForwardBody::Empty).await;
    match (result, revalidating) {
        (Ok(response), Some(stale)) if response.status() == StatusCode::NOT_MODIFIED => {
            Fetched::NotModified(stale, response.into_parts().0.headers)
        }
        (result, _) => Fetched::Answer(result),
    }
}

/// `stale` renewed by a 304 that came at `now` (`wall` by the wall clock): its body under the
/// 304's headers, fresh from then. The flag says whether it may be stored (a 304 can forbid
/// it; the body still answers this request). `request` is the client's headers.
fn renewed(
    rules: &RouteCacheConfig,
    stale: &Entry,
    not_modified: &HeaderMap,
    request: &HeaderMap,
    (now, wall): (Instant, SystemTime),
) -> (Entry, bool) {
    let mut headers = policy::updated_headers(&stale.headers, not_modified);
    let freshness = policy::storable(
        stale.status,
        &headers,
        request.contains_key(header::AUTHORIZATION),
        rules,
        wall,
    );
    strip_per_answer(&mut headers);
    let entry = Entry {
        status: stale.status,
        headers,
        body: stale.body.clone(),
        stored_at: now,
        freshness: freshness.unwrap_or(stale.freshness),
        vary_names: stale.vary_names.clone(),
        vary_values: stale.vary_values.clone(),
    };
    (entry, freshness.is_ok())
}

/// stale-while-revalidate and warming: fetches the entry again for nobody in particular, once
/// per key; conditionally when `stale` has validators, so a 304 renews it without the body.
async fn refresh(
    rules: RouteCacheConfig,
    store: Arc<Store>,
    key: Arc<str>,
    parts: Parts,
    fetch: InstanceFetch,
    lease: Lease,
    stale: Option<Arc<Entry>>,
) {
    let request_headers = parts.headers.clone();
    let fetched = fetch_for_store(parts, &fetch, stale.as_ref()).await;
    let (now, wall) = (Instant::now(), SystemTime::now());
    let result = match fetched {
        Fetched::NotModified(stale, not_modified) => {
            let (entry, storable) =
                renewed(&rules, &stale, &not_modified, &request_headers, (now, wall));
            if storable {
                keep(&store, key, entry, Some(lease));
            }
            return;
        }
        Fetched::Answer(result) => result,
    };
    // Requests for the key that expired meanwhile wait on this lease: they hear of a failure
    // as from a client's fetch.
    if instance_failed(&result) {
        lease.failed();
        // Nor is a failure stored over an entry that may still stand in for it (a client's
        // fetch serves the entry then), whatever lifetime the failure gives itself.
        if stale.is_some_and(|e| state_at(&e, now).usable_on_error()) {
            return;
        }
    }
    let Ok(response) = result else {
        return;
    };
    let Some(pending) = Pending::new(&rules, &response, &request_headers, (now, wall)) else {
        return;
    };
    let limited = http_body_util::Limited::new(response.into_body(), rules.max_body as usize);
    match limited.collect().await {
        Ok(body) => {
            keep(
                &store,
                key,
                pending.into_entry(body.to_bytes()),
                Some(lease),
            );
        }
        // Cut off midway, or over max_body (which storing gives up on, as a fill does).
        Err(err)
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_none() =>
        {
            lease.failed()
        }
        Err(_) => {}
    }
}

/// How often warmed paths are checked.
const WARM_EVERY: Duration = Duration::from_secs(1);

/// Fetches every route's `warm` paths now and again before they expire, for as long as this
/// runtime is the one in force (the task holds it weakly and ends after a reload).
pub fn spawn_warming(runtime: &Arc<Runtime>) {
    if runtime
        .cached_routes()
        .all(|(_, c)| c.rules.warm.is_empty())
    {
        return;
    }
    let weak = Arc::downgrade(runtime);
    tokio::spawn(keep_warm(weak));
}

async fn keep_warm(runtime: Weak<Runtime>) {
    let mut ticker = tokio::time::interval(WARM_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let request_id = HeaderValue::from_static("scalegate-cache-warm");
    let loopback = IpAddr::from([127, 0, 0, 1]);
    loop {
        ticker.tick().await;
        let Some(runtime) = runtime.upgrade() else {
            return;
        };
        let now = Instant::now();
        // Warmed entries are for the clients most likely to ask: HTTPS ones when the gateway
        // terminates TLS. The instance is told the scheme, as for a client's request.
        let scheme = if runtime.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        for (route, cache) in runtime.cached_routes() {
            for path in &cache.rules.warm {
                let mut builder =
                    http::Request::get(path.as_str()).header("x-forwarded-proto", scheme);
                if let Some(host) = &cache.host {
                    builder = builder.header(header::HOST, host.as_str());
                }
                let Ok(request) = builder.body(()) else {
                    continue;
                };
                let (parts, ()) = request.into_parts();
                let key = cache.key_of(&parts, scheme, loopback);
                let current = cache.store.get(&key, &parts.headers);
                let due = current.as_ref().is_none_or(|e| {
                    let in_store = now.saturating_duration_since(e.stored_at);
                    policy::needs_warming(&e.freshness, in_store, WARM_EVERY)
                });
                if !due {
                    continue;
                }
                let key: Arc<str> = Arc::from(key);
                if let Some(lease) = cache.store.inflight.try_lead(&key) {
                    let fetch =
                        InstanceFetch::for_route(runtime.clone(), route, request_id.clone());
                    tokio::spawn(refresh(
                        cache.rules.clone(),
                        cache.store.clone(),
                        key,
                        parts,
                        fetch,
                        lease,
                        current,
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::policy::tests::{headers, rules};
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// A 304 renews the entry as of when it came: its time in store starts then, and an
    /// `Expires` is read against the wall clock of then.
    #[test]
    fn a_304_renews_the_entry_from_when_it_came() {
        let stored_at = Instant::now();
        let stale = Entry {
            status: StatusCode::OK,
            headers: headers(&[("etag", "\"v1\""), ("cache-control", "max-age=1")]),
            body: Bytes::from_static(b"body"),
            stored_at,
            freshness: policy::Freshness {
                lifetime: S(1),
                initial_age: S(0),
                stale_while_revalidate: S(0),
                stale_if_error: S(0),
                revalidatable: true,
            },
            vary_names: Vec::new(),
            vary_values: Vec::new(),
        };
        let (now, wall) = (stored_at + S(5), SystemTime::UNIX_EPOCH + S(2_000_000_000));
        let expires = httpdate::fmt_http_date(wall + S(120));
        let not_modified = headers(&[("cache-control", "public"), ("expires", &expires)]);
        let request = HeaderMap::new();
        let (entry, storable) = renewed(&rules(), &stale, &not_modified, &request, (now, wall));
        assert!(storable);
        assert_eq!(entry.stored_at, now);
        assert_eq!(entry.freshness.lifetime, S(120));
        assert_eq!(entry.body, stale.body);
        assert_eq!(entry.headers["etag"], "\"v1\"");
        // A 304 that forbids storing still renews the answer to this request, on the old terms.
        let no_store = headers(&[("cache-control", "no-store")]);
        let (entry, storable) = renewed(&rules(), &stale, &no_store, &request, (now, wall));
        assert!(!storable);
        assert_eq!(entry.freshness, stale.freshness);
    }

    /// An answer's entry counts from when it came, its `Expires` read against the wall clock of
    /// then; nothing is stored of one whose declared length is over `max_body`.
    #[test]
    fn an_answer_is_stored_from_when_it_came_unless_declared_too_large() {
        let rules = rules();
        let (now, wall) = (Instant::now(), SystemTime::UNIX_EPOCH + S(2_000_000_000));
        let expires = httpdate::fmt_http_date(wall + S(60));
        let answer = |length: u64| {
            let mut response = Response::new(GatewayBody::Full(None));
            *response.headers_mut() = headers(&[("expires", &expires), ("x-request-id", "r1")]);
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            response
        };
        let request = HeaderMap::new();
        let pending = Pending::new(&rules, &answer(4), &request, (now, wall)).expect("stored");
        assert_eq!(pending.entry.stored_at, now);
        assert_eq!(pending.entry.freshness.lifetime, S(60));
        assert!(!pending.entry.headers.contains_key(&X_REQUEST_ID));
        let too_large = answer(rules.max_body + 1);
        assert!(Pending::new(&rules, &too_large, &request, (now, wall)).is_none());
    }
}
