//! The cache's decisions, as pure functions over plain data with the clock passed in (RFC 9111
//! subset for a shared cache, RFC 5861 stale extensions): may a request use the cache, may a
//! response be stored and for how long, is an entry fresh, servable stale or expired, does an
//! entry's Vary match a request, what a request's cache key is, how a stored response is
//! revalidated (conditional request headers, headers after a 304), when a client's own
//! conditional request gets 304 from a stored response, what a request does once the fetch it
//! waited on is done, and when a warmed entry is fetched again.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use crate::balance::HashKey;
use crate::config::RouteCacheConfig;

/// Whether a request may be answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestVerdict {
    /// Look it up (GET/HEAD without a body, Authorization only where the route allows it).
    Lookup,
    /// Forward it, do not store the answer.
    Bypass,
}

pub fn request_verdict(
    method: &Method,
    headers: &HeaderMap,
    has_body: bool,
    rules: &RouteCacheConfig,
) -> RequestVerdict {
    let cacheable_method = *method == Method::GET || *method == Method::HEAD;
    let authorization_ok =
        rules.allow_authorization || !headers.contains_key(header::AUTHORIZATION);
    if cacheable_method && !has_body && authorization_ok {
        RequestVerdict::Lookup
    } else {
        RequestVerdict::Bypass
    }
}

/// Whether an answer to an unsafe request says the resource changed, so that what is stored
/// for its URI goes (RFC 9111 §4.4: a non-error status).
pub fn invalidates(status: StatusCode) -> bool {
    status.is_success() || status.is_redirection()
}

/// Statuses a cache may store without being told explicitly (RFC 9110 §15.1).
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// The `Cache-Control` directives a shared cache acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    /// `proxy-revalidate`: must-revalidate for shared caches only (RFC 9111 §5.2.2.8). It
    /// forbids serving stale as must-revalidate does, but unlike it does not make an answer to
    /// a request with Authorization shareable (§3.5 names only public, s-maxage and
    /// must-revalidate).
    pub proxy_revalidate: bool,
    pub max_age: Option<Duration>,
    pub s_maxage: Option<Duration>,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
}

impl CacheControl {
    /// Reads every `Cache-Control` line; unknown directives are ignored, a malformed number
    /// counts as 0 (stale) and of a repeated directive the first counts, as RFC 9111 §4.2.1
    /// asks; a number too large counts as 2^31 seconds (§1.2.2).
    pub fn parse(headers: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for directive in text.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let seconds = || delta_seconds(arg);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "max-age" => _ = cc.max_age.get_or_insert_with(seconds),
                    "s-maxage" => _ = cc.s_maxage.get_or_insert_with(seconds),
                    "stale-while-revalidate" => {
                        _ = cc.stale_while_revalidate.get_or_insert_with(seconds);
                    }
                    "stale-if-error" => _ = cc.stale_if_error.get_or_insert_with(seconds),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// The largest delta-seconds taken (RFC 9111 §1.2.2): 2^31 seconds, 68 years. A larger one
/// (up to what a `u64` holds) overflowed the clock arithmetic and panicked.
const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// A directive's or `Age`'s delta-seconds (RFC 9111 §1.2.2): digits only, else 0; at most
/// [`MAX_DELTA_SECONDS`], as the RFC asks of a value too large to represent.
fn delta_seconds(arg: Option<&str>) -> Duration {
    let Some(digits) = arg.filter(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()))
    else {
        return Duration::ZERO;
    };
    let seconds = digits.parse::<u64>().unwrap_or(MAX_DELTA_SECONDS);
    Duration::from_secs(seconds.min(MAX_DELTA_SECONDS))
}

/// How long a stored response may be used: fresh for `lifetime` from an age of `initial_age`,
/// then stale but servable within the two windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    pub lifetime: Duration,
    pub initial_age: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// The response has a validator (`ETag`, `Last-Modified`) to renew it with.
    pub revalidatable: bool,
}

/// How long an entry with a validator is kept once it can no longer answer by itself, so the
/// next request asks the instance whether it changed and a 304 renews it without the body.
/// nginx's `proxy_cache_revalidate` works on entries its `inactive` time (10 minutes by
/// default) has not removed.
pub const REVALIDATION_KEEP: Duration = Duration::from_secs(600);

impl Freshness {
    /// How long after storing the entry can answer requests: fresh, or stale within a window.
    pub fn usable_for(&self) -> Duration {
        self.lifetime
            .saturating_add(self.stale_while_revalidate.max(self.stale_if_error))
            .saturating_sub(self.initial_age)
    }

    /// How long after storing the entry is kept: while usable, then [`REVALIDATION_KEEP`]
    /// longer when it can be revalidated.
    pub fn keep_for(&self) -> Duration {
        let revalidation = if self.revalidatable {
            REVALIDATION_KEEP
        } else {
            Duration::ZERO
        };
        self.usable_for().saturating_add(revalidation)
    }
}

/// Why a response was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    Status,
    NoStore,
    Private,
    /// `no-cache`: every use needs revalidation, which this cache does by fetching again.
    NoCache,
    SetCookie,
    VaryStar,
    /// Requests with Authorization need `public`, `s-maxage` or `must-revalidate` (RFC 9111 §3.5).
    Authorization,
    /// Neither fresh nor servable stale for any time.
    NoLifetime,
}

/// Decides whether a response may be stored and for how long. `now` is the wall clock (for
/// `Expires`/`Date`); the route's `ttl` applies when the response gives no lifetime, or always
/// with `override`.
pub fn storable(
    status: StatusCode,
    response: &HeaderMap,
    request_has_authorization: bool,
    rules: &RouteCacheConfig,
    now: SystemTime,
) -> Result<Freshness, NotStored> {
    let cc = CacheControl::parse(response);
    // Any final status the cache understands may be stored when the answer says it may (RFC
    // 9111 §3: explicit freshness, or `public`), as nginx stores a 302 with a max-age; without
    // that, only those a cache may store on its own. A 206 or 304 is never a whole answer.
    let explicit = cc.public
        || cc.max_age.is_some()
        || cc.s_maxage.is_some()
        || response.contains_key(header::EXPIRES);
    // A status the cache does not know (299, 600) is not understood, whatever the answer says
    // (RFC 9111 §3, and `must-understand`, §5.2.2.3).
    let understood = status.as_u16() >= 200
        && status.canonical_reason().is_some()
        && status != StatusCode::PARTIAL_CONTENT
        && status != StatusCode::NOT_MODIFIED;
    // The route's `ttl_statuses` (nginx `proxy_cache_valid 200 1m`) narrow or widen those.
    let ttl_applies = rules.ttl_statuses.as_ref().map_or_else(
        || heuristically_cacheable(status),
        |statuses| statuses.contains(&status.as_u16()),
    );
    if !(ttl_applies || explicit && understood) {
        return Err(NotStored::Status);
    }
    if cc.no_store {
        return Err(NotStored::NoStore);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    if cc.no_cache {
        return Err(NotStored::NoCache);
    }
    if response.contains_key(header::SET_COOKIE) && !rules.cache_set_cookie {
        return Err(NotStored::SetCookie);
    }
    if vary_names(response).is_none() {
        return Err(NotStored::VaryStar);
    }
    if request_has_authorization
        && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate || rules.override_ttl)
    {
        return Err(NotStored::Authorization);
    }
    // The route's `ttl` and stale windows are for the statuses it names: another (a 503 with
    // `public` alone, a 500 with `Expires: 0`) lives only as long as it says, as nginx keeps
    // none of them, rather than being served for the route's ttl after the instance recovered.
    let (lifetime, initial_age) = if rules.override_ttl && ttl_applies {
        // The route's word, from now: the instance's `Age` counts no more than its max-age.
        (rules.ttl, Duration::ZERO)
    } else {
        let stated = cc
            .s_maxage
            .or(cc.max_age)
            .or_else(|| expires_lifetime(response, now));
        let lifetime = match stated {
            Some(lifetime) => lifetime,
            None if ttl_applies => rules.ttl,
            None => return Err(NotStored::NoLifetime),
        };
        (lifetime, age_header(response))
    };
    let route_windows = if ttl_applies {
        (rules.stale_while_revalidate, rules.stale_if_error)
    } else {
        (Duration::ZERO, Duration::ZERO)
    };
    // must-revalidate, proxy-revalidate (this is a shared cache), and s-maxage (which implies
    // proxy-revalidate) forbid serving stale.
    let no_stale = cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some();
    let window = |directive: Option<Duration>, route: Duration| {
        if no_stale {
            Duration::ZERO
        } else {
            directive.unwrap_or(route)
        }
    };
    let freshness = Freshness {
        lifetime,
        initial_age,
        stale_while_revalidate: window(cc.stale_while_revalidate, route_windows.0),
        stale_if_error: window(cc.stale_if_error, route_windows.1),
        revalidatable: has_validator(response),
    };
    if freshness.usable_for().is_zero() {
        return Err(NotStored::NoLifetime);
    }
    Ok(freshness)
}

/// `Expires − Date` (Date defaults to now); an unparsable `Expires` means already expired.
fn expires_lifetime(response: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let expires = response.get(header::EXPIRES)?;
    let Some(expires) = http_date(expires) else {
        return Some(Duration::ZERO);
    };
    let date = response
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?).ok()
}

/// What a client's preconditions make of a stored answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// No condition, or every one holds: the answer goes (whole, or the asked range).
    Holds,
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

/// A client's conditional GET or HEAD against a stored 200, in the order of RFC 9110 §13.2.2,
/// as nginx judges them on cached answers. If-Match must name the stored ETag (strong
/// comparison, or `*`), else 412; without it, If-Unmodified-Since (a single valid date, else
/// ignored) must be at or after the stored Last-Modified, else 412 (also without a
/// Last-Modified, as in nginx). Then If-None-Match, when present, decides alone: `*`, or one of
/// its entity tags weakly equal to the stored ETag, gives 304. Otherwise If-Modified-Since, a
/// single valid date at or after the stored Last-Modified, gives 304 (nginx's
/// `if_modified_since before`; its default `exact` wants the same second). Answers other than
/// 200 are not judged.
pub fn precondition(
    request: &HeaderMap,
    stored_status: StatusCode,
    stored: &HeaderMap,
) -> Precondition {
    if stored_status != StatusCode::OK {
        return Precondition::Holds;
    }
    let etag = stored.get(header::ETAG).map(HeaderValue::as_bytes);
    let modified = stored.get(header::LAST_MODIFIED).and_then(http_date);
    let mut if_match = request.get_all(header::IF_MATCH).iter().peekable();
    let unmodified = if if_match.peek().is_some() {
        if_match.any(|list| names_stored(list.as_bytes(), etag, Comparison::Strong))
    } else {
        single_date(request, header::IF_UNMODIFIED_SINCE)
            .is_none_or(|since| modified.is_some_and(|modified| modified <= since))
    };
    if !unmodified {
        return Precondition::Failed;
    }
    let mut none_match = request.get_all(header::IF_NONE_MATCH).iter().peekable();
    let not_modified = if none_match.peek().is_some() {
        none_match.any(|list| names_stored(list.as_bytes(), etag, Comparison::Weak))
    } else {
        single_date(request, header::IF_MODIFIED_SINCE)
            .zip(modified)
            .is_some_and(|(since, modified)| modified <= since)
    };
    if not_modified {
        Precondition::NotModified
    } else {
        Precondition::Holds
    }
}

/// The date of a field that holds one valid HTTP-date; `None` when it is missing, repeated or
/// not a date (such fields are ignored, RFC 9110 §13.1.3, §13.1.4).
fn single_date(request: &HeaderMap, name: HeaderName) -> Option<SystemTime> {
    let mut values = request.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => http_date(value),
        _ => None,
    }
}

/// What a client's Range asks of a stored 200 of `length` bytes (RFC 9110 §14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No Range, or one the cache may ignore: the whole answer.
    Whole,
    /// Bytes `first..=last`, as 206.
    Part { first: u64, last: u64 },
    /// A range that starts past the end: 416.
    Unsatisfiable,
}

/// The answer to a GET's Range from a stored 200, as nginx serves ranges from its cache: one
/// byte range (`first-last`, `first-`, `-suffix`) gets its part; several ranges, other units,
/// a malformed value, or an If-Range that names another version (entity tags compared
/// strongly, a date against Last-Modified exactly) get the whole answer, as a server may.
pub fn range_answer(
    request: &HeaderMap,
    stored_status: StatusCode,
    stored: &HeaderMap,
    length: u64,
) -> RangeAnswer {
    let mut ranges = request.get_all(header::RANGE).iter();
    let (Some(range), None) = (ranges.next(), ranges.next()) else {
        return RangeAnswer::Whole;
    };
    if stored_status != StatusCode::OK || !if_range_holds(request, stored) {
        return RangeAnswer::Whole;
    }
    let Some(spec) = range.to_str().ok().and_then(|v| {
        let (unit, spec) = v.trim().split_once('=')?;
        unit.trim()
            .eq_ignore_ascii_case("bytes")
            .then_some(spec.trim())
    }) else {
        return RangeAnswer::Whole;
    };
    let number = |digits: &str| {
        let ok = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
        ok.then(|| digits.parse::<u64>().ok()).flatten()
    };
    let Some((first, last)) = spec.split_once('-') else {
        return RangeAnswer::Whole;
    };
    let (first, last) = match (first.trim(), last.trim()) {
        ("", suffix) => match number(suffix) {
            Some(0) => return RangeAnswer::Unsatisfiable,
            Some(suffix) => (length.saturating_sub(suffix), u64::MAX),
            None => return RangeAnswer::Whole,
        },
        (first, "") => match number(first) {
            Some(first) => (first, u64::MAX),
            None => return RangeAnswer::Whole,
        },
        (first, last) => match (number(first), number(last)) {
            (Some(first), Some(last)) if first <= last => (first, last),
            _ => return RangeAnswer::Whole,
        },
    };
    if first >= length {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Part {
        first,
        last: last.min(length - 1),
    }
}

/// Whether If-Range, when present, still names the stored answer: an entity tag equal to the
/// stored ETag, both strong, or a date equal to Last-Modified.
fn if_range_holds(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(validator) = request.get(header::IF_RANGE) else {
        return true;
    };
    let validator = validator.as_bytes().trim_ascii();
    if validator.starts_with(b"\"") {
        let stored = stored
            .get(header::ETAG)
            .and_then(|etag| entity_tag(etag.as_bytes().trim_ascii()));
        return entity_tag(validator)
            .zip(stored)
            .is_some_and(|(validator, stored)| Comparison::Strong.equal(validator, stored));
    }
    let date = HeaderValue::from_bytes(validator).ok();
    match (
        date.as_ref().and_then(http_date),
        stored.get(header::LAST_MODIFIED).and_then(http_date),
    ) {
        (Some(date), Some(modified)) => date == modified,
        _ => false,
    }
}

/// How two entity tags are compared (RFC 9110 §8.8.3.2).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Comparison {
    /// Neither is weak, and the quoted parts are the same.
    Strong,
    /// The quoted parts are the same.
    Weak,
}

impl Comparison {
    /// Whether two entity tags, each (weak, quoted part), compare equal this way.
    fn equal(self, (a_weak, a): (bool, &[u8]), (b_weak, b): (bool, &[u8])) -> bool {
        a == b && (self == Comparison::Weak || !(a_weak || b_weak))
    }
}

/// Whether `tag` starts with `W/`, and the rest.
fn split_weak(tag: &[u8]) -> (bool, &[u8]) {
    match tag.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, tag),
    }
}

/// Splits an entity tag into whether it is weak and its quoted part; `None` when malformed.
fn entity_tag(tag: &[u8]) -> Option<(bool, &[u8])> {
    let (weak, quoted) = split_weak(tag);
    let ok = quoted.len() >= 2 && quoted[0] == b'"' && quoted[quoted.len() - 1] == b'"';
    ok.then_some((weak, quoted))
}

/// Whether an If-Match or If-None-Match value names the stored representation: `*` names any;
/// a list of entity tags (commas may sit inside their quotes) names the one whose tag it holds,
/// compared as `comparison` says.
fn names_stored(list: &[u8], etag: Option<&[u8]>, comparison: Comparison) -> bool {
    let mut rest = list.trim_ascii();
    if rest == b"*" {
        return true;
    }
    let Some(stored) = etag.and_then(|tag| entity_tag(tag.trim_ascii())) else {
        return false;
    };
    loop {
        // Empty list elements are allowed (RFC 9110 §5.6.1): skip every comma and space.
        let skip = rest.iter().take_while(|b| b",\t ".contains(b)).count();
        rest = &rest[skip..];
        let (weak, after_weak) = split_weak(rest);
        let Some(body) = after_weak.strip_prefix(b"\"") else {
            return false;
        };
        let Some(close) = body.iter().position(|&b| b == b'"') else {
            return false;
        };
        if comparison.equal((weak, &after_weak[..close + 2]), stored) {
            return true;
        }
        rest = &body[close + 1..];
    }
}

/// The `Age` the instance reported (it may sit behind another cache). The gateway's own time
/// in store is added by [`State::at`]; `Date` is not used for age since instance clocks drift.
fn age_header(response: &HeaderMap) -> Duration {
    // A list (two Age fields joined, or `20, 5`) counts by its first value (RFC 9111 §5.1).
    let age = response.get(header::AGE).and_then(|v| v.to_str().ok());
    delta_seconds(age.map(|age| age.split(',').next().unwrap_or(age).trim()))
}

/// What a stored entry is good for at a given age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Fresh,
    /// Stale within stale-while-revalidate: serve it and refresh in the background.
    Revalidate,
    /// Must be fetched again; `usable_on_error` says whether stale-if-error still covers it.
    Expired {
        usable_on_error: bool,
    },
}

impl State {
    /// The state of an entry `in_store` after it was stored.
    pub fn at(freshness: &Freshness, in_store: Duration) -> State {
        let age = freshness.initial_age.saturating_add(in_store);
        let within = |window: Duration| age < freshness.lifetime.saturating_add(window);
        if age < freshness.lifetime {
            State::Fresh
        } else if within(freshness.stale_while_revalidate) {
            State::Revalidate
        } else {
            State::Expired {
                usable_on_error: within(freshness.stale_if_error),
            }
        }
    }
}

impl State {
    /// Whether an entry in this state may answer in place of a failure: within
    /// `stale_if_error`, or within `stale_while_revalidate`, whose refresh the failed fetch may be.
    pub fn usable_on_error(self) -> bool {
        matches!(
            self,
            State::Expired {
                usable_on_error: true
            } | State::Revalidate
        )
    }
}

/// Whether a warmed path's entry, `in_store` since it was stored, is fetched again at a look
/// at it, looks coming `every` apart: when it would no longer be fresh an interval after the
/// next look, so that the fetch has that interval to come back before the entry goes stale.
pub fn needs_warming(freshness: &Freshness, in_store: Duration, every: Duration) -> bool {
    State::at(freshness, in_store.saturating_add(every.saturating_mul(2))) != State::Fresh
}

/// What a request that waited on another's fetch of its key finds once that fetch is done.
/// `E` is an entry as the caller holds it, so that the decision names the one it answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Woken<E> {
    /// The entry now stored for the request's own variant, with its state, if there is one.
    pub stored: Option<(State, E)>,
    /// The instance failed the fetch waited on.
    pub failed: bool,
    /// The key was purged (or an unsafe request changed it) during the fetch waited on, which
    /// therefore stored nothing.
    pub purged: bool,
    /// The request already waited once more, after a fetch that stored another variant.
    pub rejoined: bool,
    /// Some variant of the key is stored.
    pub variants_stored: bool,
    /// The entry that was stale when the request came, with its state now, if there was one.
    pub stale: Option<(State, E)>,
}

/// What a request does once the fetch it waited on is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterWait<E> {
    /// Answer with the stored entry, fresh.
    Hit(E),
    /// Answer with the stored entry, stale within stale-while-revalidate.
    Updating(E),
    /// Wait once more, for a fetch of the request's own variant.
    Rejoin,
    /// Fetch for this request alone, under no lease.
    FillAlone,
    /// Answer with the stale entry in place of the failure.
    Stale(E),
    /// Take the next turn: lead the next fetch of the key, or wait for the one who does.
    WaitAgain,
}

/// What a request does after a wait. A stored entry answers as it would a request arriving
/// now (one stored stale at once, `max-age=0` under stale-while-revalidate, is Updating).
/// Without one, after a fetch that did not fail, the request fetches alone (the answer was
/// uncacheable or too large), unless the fetch stored another variant: then it waits for one
/// fetch of its own variant, as nginx locks per variant, but only once, so that requests of
/// many different variants do not queue one by one. After a purge during the fetch the answer
/// may well be cacheable, so the waiters take turns (one fetches, the others wait on it)
/// rather than all asking the instance at once; the stale entry, purged too, is not served.
/// After a failure, the stale entry answers if its window allows, else the waiters take turns
/// asking the instance that just failed, rather than all at once.
pub fn after_wait<E>(woken: Woken<E>) -> AfterWait<E> {
    match woken.stored {
        Some((State::Fresh, entry)) => return AfterWait::Hit(entry),
        Some((State::Revalidate, entry)) => return AfterWait::Updating(entry),
        _ => {}
    }
    if woken.purged {
        return AfterWait::WaitAgain;
    }
    if !woken.failed {
        return if woken.stored.is_none() && !woken.rejoined && woken.variants_stored {
            AfterWait::Rejoin
        } else {
            AfterWait::FillAlone
        };
    }
    match woken.stale {
        Some((state, entry)) if state.usable_on_error() => AfterWait::Stale(entry),
        _ => AfterWait::WaitAgain,
    }
}

/// Failures that let stale-if-error answer instead (RFC 5861 §4: 500, 502, 503, 504).
pub fn is_error_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// The header names a response varies on; `None` for `Vary: *` (never matches).
pub fn vary_names(response: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in response.get_all(header::VARY) {
        // What cannot be read as field names (`x y`, non-ASCII) varies on something unknown,
        // as `*` does: skipped, the answer would be served across what it varies on.
        let text = value.to_str().ok()?;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return None;
            }
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Some(names)
}

/// The request's values of the varying headers (several lines joined), as stored with an entry.
pub fn vary_values(names: &[HeaderName], request: &HeaderMap) -> Vec<Option<Vec<u8>>> {
    names
        .iter()
        .map(|name| {
            let mut lines = request.get_all(name).iter();
            let first = lines.next()?;
            let mut joined = first.as_bytes().to_vec();
            for more in lines {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(more.as_bytes());
            }
            Some(joined)
        })
        .collect()
}

/// Whether `request` has the `stored` values of the varying headers `names` (as
/// [`vary_values`] gives them), compared in place: a lookup runs on every hit of a varying
/// entry, and building the values first allocated for each.
pub fn vary_matches(names: &[HeaderName], stored: &[Option<Vec<u8>>], request: &HeaderMap) -> bool {
    names.len() == stored.len()
        && names.iter().zip(stored).all(|(name, stored)| {
            let mut lines = request.get_all(name).iter();
            match (lines.next(), stored) {
                (None, None) => true,
                (Some(first), Some(stored)) => {
                    let mut rest = stored.strip_prefix(first.as_bytes());
                    for more in lines {
                        rest = rest
                            .and_then(|rest| rest.strip_prefix(b", "))
                            .and_then(|rest| rest.strip_prefix(more.as_bytes()));
                    }
                    rest.is_some_and(<[u8]>::is_empty)
                }
                _ => false,
            }
        })
}

/// The cache key: path and query first (so a purge by path prefix is a string prefix test),
/// then the client's scheme (answers often depend on it: redirects to HTTPS, absolute links;
/// nginx's default key starts with it), then the Host the instance gets, lowercased (the
/// gateway passes the client's on, as HAProxy does, whose cache keys by it too; nginx's
/// default key can leave it out only because nginx sends the upstream's name instead), then
/// the route's configured parts, each after a space. In the parts, `%`, space and
/// `,` are percent-escaped and repeated header lines joined by `,`, so one part cannot pass
/// for two. GET and HEAD share keys.
pub fn cache_key(
    path_and_query: &str,
    scheme: &str,
    host: Option<&str>,
    parts: &[HashKey],
    headers: &HeaderMap,
    client_ip: std::net::IpAddr,
) -> String {
    let mut key = String::with_capacity(path_and_query.len() + 40);
    key.push_str(path_and_query);
    key.push(' ');
    key.push_str(scheme);
    if let Some(host) = host {
        key.push(' ');
        key.extend(host.chars().map(|c| c.to_ascii_lowercase()));
    }
    for part in parts {
        key.push(' ');
        match part {
            HashKey::ClientIp => {
                use std::fmt::Write as _;
                let _ = write!(key, "{client_ip}");
            }
            HashKey::Header(name) => {
                for (at, value) in headers.get_all(name).iter().enumerate() {
                    if at > 0 {
                        key.push(',');
                    }
                    push_escaped(&mut key, &String::from_utf8_lossy(value.as_bytes()));
                }
            }
            HashKey::Cookie(name) => {
                if let Some(value) = crate::proxy::headers::cookie_value(headers, name) {
                    push_escaped(&mut key, value);
                }
            }
        }
    }
    key
}

/// `text` with `%`, space and `,` percent-escaped: the separators of the key's parts.
fn push_escaped(key: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '%' => key.push_str("%25"),
            ' ' => key.push_str("%20"),
            ',' => key.push_str("%2C"),
            c => key.push(c),
        }
    }
}

/// Whether `response` carries something [`validators`] turns into a condition.
pub fn has_validator(response: &HeaderMap) -> bool {
    response.contains_key(header::ETAG) || response.contains_key(header::LAST_MODIFIED)
}

/// Request headers that ask the instance whether a stored response is still current (RFC 9111
/// §4.3.1): its `ETag` as If-None-Match, its `Last-Modified` as If-Modified-Since. Empty when
/// it has neither.
pub fn validators(stored: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let mut conditions = Vec::with_capacity(2);
    if let Some(etag) = stored.get(header::ETAG) {
        conditions.push((header::IF_NONE_MATCH, etag.clone()));
    }
    if let Some(modified) = stored.get(header::LAST_MODIFIED) {
        conditions.push((header::IF_MODIFIED_SINCE, modified.clone()));
    }
    conditions
}

/// The fields that would make an instance answer less than the whole current resource (a 304
/// to the client's own validators, a 206 to its Range): a cache's fetch goes without them, so
/// its answer can be stored and the client still gets a full one (nginx does the same).
pub const CLIENT_CONDITIONS: [HeaderName; 6] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::RANGE,
];

/// A stored response's headers after a 304 (RFC 9111 §3.2, §4.3.4): every field the 304
/// carries replaces the stored one, except those that describe the stored body's bytes.
pub fn updated_headers(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let body_framing = [
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::CONTENT_RANGE,
        header::TRANSFER_ENCODING,
    ];
    let mut updated = stored.clone();
    for name in not_modified.keys() {
        if body_framing.contains(name) {
            continue;
        }
        updated.remove(name);
        for value in not_modified.get_all(name) {
            updated.append(name.clone(), value.clone());
        }
    }
    updated
}

/// The route rules and headers of the tests here serve the cache's other tests too.
#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::cache) fn rules() -> RouteCacheConfig {
        RouteCacheConfig {
            ttl: Duration::from_secs(60),
            ttl_statuses: None,
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(300),
            max_body: 1 << 20,
            key: Vec::new(),
            override_ttl: false,
            cache_set_cookie: false,
            allow_authorization: false,
            warm: Vec::new(),
        }
    }

    #[test]
    fn conditional_requests_get_304_from_a_matching_stored_200() {
        use Precondition::{Holds, NotModified};
        let stored = headers(&[
            ("etag", "W/\"v1,a\""),
            ("last-modified", "Tue, 24 Nov 2026 10:00:00 GMT"),
        ]);
        let ok = StatusCode::OK;
        let asks = |pairs: &[(&str, &str)]| precondition(&headers(pairs), ok, &stored);
        // Entity tags: weak comparison, lists (commas inside quotes too), several fields, `*`.
        assert_eq!(asks(&[("if-none-match", "\"v1,a\"")]), NotModified);
        assert_eq!(asks(&[("if-none-match", "\"x\", W/\"v1,a\"")]), NotModified);
        assert_eq!(
            asks(&[("if-none-match", ", \"x\" , ,\t\"v1,a\"")]),
            NotModified
        );
        assert_eq!(
            asks(&[("if-none-match", "\"x\""), ("if-none-match", "\"v1,a\"")]),
            NotModified
        );
        assert_eq!(asks(&[("if-none-match", "*")]), NotModified);
        assert_eq!(asks(&[("if-none-match", "\"v1\"")]), Holds);
        assert_eq!(asks(&[("if-none-match", "v1,a")]), Holds);
        // If-None-Match decides alone, even when the date would match.
        let newer = "Wed, 25 Nov 2026 10:00:00 GMT";
        assert_eq!(
            asks(&[("if-none-match", "\"x\""), ("if-modified-since", newer)]),
            Holds
        );
        // Dates: at or after Last-Modified; one valid date only.
        assert_eq!(asks(&[("if-modified-since", newer)]), NotModified);
        let same = "Tue, 24 Nov 2026 10:00:00 GMT";
        assert_eq!(asks(&[("if-modified-since", same)]), NotModified);
        let older = "Tue, 24 Nov 2026 09:59:59 GMT";
        assert_eq!(asks(&[("if-modified-since", older)]), Holds);
        assert_eq!(asks(&[("if-modified-since", "yesterday")]), Holds);
        assert_eq!(
            asks(&[("if-modified-since", newer), ("if-modified-since", newer)]),
            Holds
        );
        assert_eq!(asks(&[]), Holds);
        // `*` names any stored representation; a tag needs an ETag to match; only a 200 counts.
        let untagged = HeaderMap::new();
        let star = headers(&[("if-none-match", "*")]);
        assert_eq!(precondition(&star, ok, &untagged), NotModified);
        let tag = headers(&[("if-none-match", "\"x\"")]);
        assert_eq!(precondition(&tag, ok, &untagged), Holds);
        let moved = StatusCode::MOVED_PERMANENTLY;
        assert_eq!(precondition(&star, moved, &stored), Holds);
    }

    #[test]
    fn if_match_and_if_unmodified_since_come_first_and_may_fail() {
        use Precondition::{Failed, Holds, NotModified};
        let newer = "Wed, 25 Nov 2026 10:00:00 GMT";
        let older = "Tue, 24 Nov 2026 09:59:59 GMT";
        let stored = headers(&[
            ("etag", "\"s1\""),
            ("last-modified", "Tue, 24 Nov 2026 10:00:00 GMT"),
        ]);
        let ok = StatusCode::OK;
        let asks = |pairs: &[(&str, &str)]| precondition(&headers(pairs), ok, &stored);
        // If-Match compares strongly: a weak tag never matches.
        assert_eq!(asks(&[("if-match", "\"x\", \"s1\"")]), Holds);
        assert_eq!(asks(&[("if-match", "\"s2\"")]), Failed);
        assert_eq!(asks(&[("if-match", "W/\"s1\"")]), Failed);
        assert_eq!(asks(&[("if-match", "*")]), Holds);
        // If-Match, when present, decides over If-Unmodified-Since.
        assert_eq!(
            asks(&[("if-match", "\"s1\""), ("if-unmodified-since", older)]),
            Holds
        );
        // If-Unmodified-Since: at or after Last-Modified holds; a bad date is ignored.
        assert_eq!(asks(&[("if-unmodified-since", newer)]), Holds);
        assert_eq!(asks(&[("if-unmodified-since", older)]), Failed);
        assert_eq!(asks(&[("if-unmodified-since", "yesterday")]), Holds);
        // They come before If-None-Match: a failed one is 412 even where 304 would be.
        assert_eq!(
            asks(&[("if-none-match", "*"), ("if-match", "\"nope\"")]),
            Failed
        );
        assert_eq!(
            asks(&[("if-none-match", "*"), ("if-unmodified-since", newer)]),
            NotModified
        );
        // A weak stored tag matches only `*`; without Last-Modified the date cannot hold.
        let weak = headers(&[("etag", "W/\"s1\"")]);
        let if_match = |value: &str| headers(&[("if-match", value)]);
        assert_eq!(precondition(&if_match("W/\"s1\""), ok, &weak), Failed);
        assert_eq!(precondition(&if_match("\"s1\""), ok, &weak), Failed);
        assert_eq!(precondition(&if_match("*"), ok, &weak), Holds);
        let since = headers(&[("if-unmodified-since", newer)]);
        assert_eq!(precondition(&since, ok, &weak), Failed);
    }

    #[test]
    fn one_byte_range_of_a_stored_200_is_served() {
        use RangeAnswer::{Part, Unsatisfiable, Whole};
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 24 Nov 2026 10:00:00 GMT"),
        ]);
        let ok = StatusCode::OK;
        let ask = |pairs: &[(&str, &str)]| range_answer(&headers(pairs), ok, &stored, 100);
        assert_eq!(ask(&[]), Whole);
        assert_eq!(ask(&[("range", "bytes=0-9")]), Part { first: 0, last: 9 });
        assert_eq!(
            ask(&[("range", "Bytes = 90-200")]),
            Part {
                first: 90,
                last: 99
            }
        );
        assert_eq!(
            ask(&[("range", "bytes=95-")]),
            Part {
                first: 95,
                last: 99
            }
        );
        assert_eq!(
            ask(&[("range", "bytes=-10")]),
            Part {
                first: 90,
                last: 99
            }
        );
        assert_eq!(ask(&[("range", "bytes=-500")]), Part { first: 0, last: 99 });
        assert_eq!(ask(&[("range", "bytes=100-")]), Unsatisfiable);
        assert_eq!(ask(&[("range", "bytes=-0")]), Unsatisfiable);
        // What the cache may ignore: several ranges, other units, nonsense, two fields.
        for ignored in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=5-1",
            "bytes=+1-2",
            "bytes",
            "bytes=-",
        ] {
            assert_eq!(ask(&[("range", ignored)]), Whole, "{ignored}");
        }
        assert_eq!(
            ask(&[("range", "bytes=0-1"), ("range", "bytes=0-1")]),
            Whole
        );
        // If-Range: the same version (strong tag, exact date) or the whole answer.
        let range = ("range", "bytes=0-9");
        assert_eq!(
            ask(&[range, ("if-range", "\"v1\"")]),
            Part { first: 0, last: 9 }
        );
        let date = "Tue, 24 Nov 2026 10:00:00 GMT";
        assert_eq!(
            ask(&[range, ("if-range", date)]),
            Part { first: 0, last: 9 }
        );
        for other in [
            "\"v2\"",
            "W/\"v1\"",
            "Wed, 25 Nov 2026 10:00:00 GMT",
            "soon",
        ] {
            assert_eq!(ask(&[range, ("if-range", other)]), Whole, "{other}");
        }
        let moved = StatusCode::MOVED_PERMANENTLY;
        assert_eq!(range_answer(&headers(&[range]), moved, &stored, 100), Whole);
        assert_eq!(
            range_answer(&headers(&[range]), ok, &stored, 0),
            Unsatisfiable
        );
    }

    #[test]
    fn of_a_repeated_directive_the_first_counts_and_a_huge_number_is_2_to_the_31_seconds() {
        // The longest lifetime with the longest windows and age: no overflow anywhere.
        let longest = Freshness {
            lifetime: Duration::MAX,
            initial_age: Duration::MAX,
            stale_while_revalidate: Duration::MAX,
            stale_if_error: Duration::MAX,
            revalidatable: true,
        };
        assert_eq!(longest.keep_for(), REVALIDATION_KEEP);
        assert_eq!(
            State::at(&longest, Duration::MAX),
            State::Expired {
                usable_on_error: false
            }
        );
        // An Age past what a u64 holds is 2^31 seconds, not 0: the answer is too old to store.
        let aged = headers(&[("age", "99999999999999999999")]);
        assert_eq!(age_header(&aged), Duration::from_secs(1 << 31));
        let max_age =
            |value: &str| CacheControl::parse(&headers(&[("cache-control", value)])).max_age;
        let secs = |n| Some(Duration::from_secs(n));
        assert_eq!(max_age("max-age=0, max-age=60"), secs(0));
        assert_eq!(max_age("max-age=60, max-age=0"), secs(60));
        assert_eq!(max_age("max-age=18446744073709551616"), secs(1 << 31));
        assert_eq!(max_age("max-age=18446744073709551615"), secs(1 << 31));
        assert_eq!(max_age("max-age=2147483649"), secs(1 << 31));
        assert_eq!(max_age("max-age=2147483647"), secs((1 << 31) - 1));
        // Not delta-seconds: stale.
        assert_eq!(max_age("max-age=+5"), secs(0));
        assert_eq!(max_age("max-age=abc"), secs(0));
    }

    pub(in crate::cache) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn store(pairs: &[(&str, &str)], r: &RouteCacheConfig) -> Result<Freshness, NotStored> {
        storable(StatusCode::OK, &headers(pairs), false, r, SystemTime::now())
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn only_get_and_head_without_body_are_looked_up() {
        let r = rules();
        let none = HeaderMap::new();
        assert_eq!(
            request_verdict(&Method::GET, &none, false, &r),
            RequestVerdict::Lookup
        );
        assert_eq!(
            request_verdict(&Method::HEAD, &none, false, &r),
            RequestVerdict::Lookup
        );
        assert_eq!(
            request_verdict(&Method::POST, &none, false, &r),
            RequestVerdict::Bypass
        );
        assert_eq!(
            request_verdict(&Method::GET, &none, true, &r),
            RequestVerdict::Bypass
        );
    }

    #[test]
    fn authorization_bypasses_unless_the_route_allows_it() {
        let mut r = rules();
        let auth = headers(&[("authorization", "Bearer x")]);
        assert_eq!(
            request_verdict(&Method::GET, &auth, false, &r),
            RequestVerdict::Bypass
        );
        r.allow_authorization = true;
        assert_eq!(
            request_verdict(&Method::GET, &auth, false, &r),
            RequestVerdict::Lookup
        );
        // Even then the response must say it is shareable.
        let plain = headers(&[("cache-control", "max-age=10")]);
        assert_eq!(
            storable(StatusCode::OK, &plain, true, &r, SystemTime::now()),
            Err(NotStored::Authorization)
        );
        for cc in [
            "public, max-age=10",
            "s-maxage=10",
            "must-revalidate, max-age=10",
        ] {
            let h = headers(&[("cache-control", cc)]);
            assert!(
                storable(StatusCode::OK, &h, true, &r, SystemTime::now()).is_ok(),
                "{cc}"
            );
        }
        // proxy-revalidate is not among them (RFC 9111 §3.5): one user's answer is not shared.
        let proxy = headers(&[("cache-control", "proxy-revalidate, max-age=10")]);
        assert_eq!(
            storable(StatusCode::OK, &proxy, true, &r, SystemTime::now()),
            Err(NotStored::Authorization)
        );
        assert!(storable(StatusCode::OK, &proxy, false, &r, SystemTime::now()).is_ok());
    }

    #[test]
    fn freshness_precedence_s_maxage_max_age_expires_ttl() {
        let r = rules();
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now);
        let expires = httpdate::fmt_http_date(now + S(120));
        let all = [
            ("cache-control", "max-age=20, s-maxage=10"),
            ("expires", expires.as_str()),
            ("date", date.as_str()),
        ];
        assert_eq!(store(&all, &r).unwrap().lifetime, S(10));
        assert_eq!(store(&all[..0], &r).unwrap().lifetime, S(60), "route ttl");
        let max_age = [("cache-control", "max-age=20"), all[1], all[2]];
        assert_eq!(store(&max_age, &r).unwrap().lifetime, S(20));
        assert_eq!(store(&all[1..], &r).unwrap().lifetime, S(120));
        // An invalid Expires means already expired; only the stale windows keep it.
        let bad = store(&[("expires", "0")], &r).unwrap();
        assert_eq!(bad.lifetime, S(0));
        assert_eq!(bad.keep_for(), S(300));
    }

    #[test]
    fn override_makes_the_route_ttl_win() {
        let mut r = rules();
        r.override_ttl = true;
        let f = store(&[("cache-control", "max-age=5")], &r).unwrap();
        assert_eq!(f.lifetime, S(60));
    }

    #[test]
    fn no_store_private_no_cache_set_cookie_vary_star_are_not_stored() {
        let r = rules();
        let cases = [
            ("cache-control", "no-store", NotStored::NoStore),
            ("cache-control", "private, max-age=60", NotStored::Private),
            ("cache-control", "no-cache", NotStored::NoCache),
            ("set-cookie", "a=b", NotStored::SetCookie),
            ("vary", "Accept, *", NotStored::VaryStar),
        ];
        for (name, value, why) in cases {
            assert_eq!(store(&[(name, value)], &r), Err(why), "{name}: {value}");
        }
        let mut allowed = rules();
        allowed.cache_set_cookie = true;
        assert!(store(&[("set-cookie", "a=b")], &allowed).is_ok());
    }

    #[test]
    fn only_accepted_unsafe_requests_invalidate() {
        for yes in [200, 201, 204, 303] {
            assert!(invalidates(StatusCode::from_u16(yes).unwrap()), "{yes}");
        }
        for no in [100, 400, 409, 500, 503] {
            assert!(!invalidates(StatusCode::from_u16(no).unwrap()), "{no}");
        }
    }

    /// `ttl_statuses = [200, 302]` is nginx's `proxy_cache_valid 200 302 1m`: a 404 without a
    /// lifetime of its own is not stored, a 302 is, and a 404 that gives one still is.
    #[test]
    fn ttl_statuses_choose_what_ttl_applies_to() {
        let r = RouteCacheConfig {
            ttl_statuses: Some(vec![200, 302]),
            override_ttl: true,
            ..rules()
        };
        let none = HeaderMap::new();
        let now = SystemTime::now();
        let stored = |status: u16, headers: &HeaderMap| {
            storable(
                StatusCode::from_u16(status).unwrap(),
                headers,
                false,
                &r,
                now,
            )
        };
        assert_eq!(stored(200, &none).unwrap().lifetime, r.ttl);
        assert_eq!(stored(302, &none).unwrap().lifetime, r.ttl);
        assert_eq!(stored(404, &none), Err(NotStored::Status));
        let mut own = HeaderMap::new();
        own.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=5"));
        assert_eq!(stored(404, &own).unwrap().lifetime, Duration::from_secs(5));
        assert_eq!(stored(200, &own).unwrap().lifetime, r.ttl, "override");
    }

    #[test]
    fn only_cacheable_statuses_are_stored() {
        let r = rules();
        let none = HeaderMap::new();
        let now = SystemTime::now();
        for ok in [200, 301, 404, 410] {
            let status = StatusCode::from_u16(ok).unwrap();
            assert!(storable(status, &none, false, &r, now).is_ok(), "{ok}");
        }
        for no in [201, 302, 500, 503] {
            let status = StatusCode::from_u16(no).unwrap();
            assert_eq!(
                storable(status, &none, false, &r, now),
                Err(NotStored::Status)
            );
        }
        // Told explicitly, any final status the cache understands.
        let told = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
            headers
        };
        for ok in [201, 302, 307, 503] {
            let status = StatusCode::from_u16(ok).unwrap();
            let stored = storable(status, &told("max-age=60"), false, &r, now);
            assert_eq!(stored.unwrap().lifetime, S(60), "{ok}");
            // `public` alone says it may be stored, not for how long: the route's ttl is for
            // the statuses it names (a 503 was served for it after the instance recovered).
            assert_eq!(
                storable(status, &told("public"), false, &r, now),
                Err(NotStored::NoLifetime),
                "{ok}"
            );
        }
        // Nor do the route's stale windows keep an error that says it is not to be reused.
        let stale_route = RouteCacheConfig {
            stale_while_revalidate: S(30),
            stale_if_error: S(30),
            ..rules()
        };
        let mut expired = HeaderMap::new();
        expired.insert(header::EXPIRES, HeaderValue::from_static("0"));
        for headers in [told("max-age=0"), expired] {
            assert_eq!(
                storable(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &headers,
                    false,
                    &stale_route,
                    now
                ),
                Err(NotStored::NoLifetime),
                "{headers:?}"
            );
        }
        // A status the cache does not understand, nor a part or a 304, whatever it says.
        for no in [206, 299, 304, 600] {
            let status = StatusCode::from_u16(no).unwrap();
            assert_eq!(
                storable(status, &told("max-age=60"), false, &r, now),
                Err(NotStored::Status),
                "{no}"
            );
        }
    }

    /// With `override`, the route's ttl counts from when the entry is stored: an instance's
    /// `Age` past it kept the answer from being stored at all (nginx keeps it for the ttl).
    /// Without it, `Age` counts by its first value.
    #[test]
    fn age_is_read_as_rfc_9111_says_and_override_ignores_it() {
        let overriding = RouteCacheConfig {
            override_ttl: true,
            ..rules()
        };
        let aged = headers(&[("cache-control", "max-age=60"), ("age", "600")]);
        let stored = storable(StatusCode::OK, &aged, false, &overriding, SystemTime::now());
        assert_eq!(stored.unwrap().initial_age, Duration::ZERO);
        assert_eq!(age_header(&headers(&[("age", "20, 5")])), S(20));
    }

    #[test]
    fn stale_windows_come_from_the_response_or_the_route() {
        let r = rules();
        let f = store(
            &[("cache-control", "max-age=10, stale-while-revalidate=5")],
            &r,
        )
        .unwrap();
        assert_eq!(f.stale_while_revalidate, S(5));
        assert_eq!(f.stale_if_error, S(300));
        let f = store(&[("cache-control", "max-age=10, stale-if-error=7")], &r).unwrap();
        assert_eq!(f.stale_if_error, S(7));
        assert_eq!(f.stale_while_revalidate, S(30));
    }

    #[test]
    fn must_revalidate_and_s_maxage_forbid_stale() {
        let r = rules();
        for cc in [
            "max-age=10, must-revalidate",
            "max-age=10, proxy-revalidate, stale-while-revalidate=30",
            "s-maxage=10, stale-if-error=60",
        ] {
            let f = store(&[("cache-control", cc)], &r).unwrap();
            assert_eq!(f.stale_while_revalidate, S(0), "{cc}");
            assert_eq!(f.stale_if_error, S(0), "{cc}");
        }
    }

    #[test]
    fn nothing_to_keep_is_not_stored() {
        let mut r = rules();
        r.stale_while_revalidate = S(0);
        r.stale_if_error = S(0);
        assert_eq!(
            store(&[("cache-control", "max-age=0")], &r),
            Err(NotStored::NoLifetime)
        );
    }

    #[test]
    fn entries_with_a_validator_are_kept_to_be_revalidated() {
        let mut r = rules();
        r.stale_while_revalidate = S(0);
        r.stale_if_error = S(0);
        let plain = store(&[("cache-control", "max-age=10")], &r).unwrap();
        assert_eq!(plain.keep_for(), S(10));
        for validator in [
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ] {
            let kept = store(&[("cache-control", "max-age=10"), validator], &r).unwrap();
            assert_eq!(kept.usable_for(), S(10));
            assert_eq!(kept.keep_for(), S(10) + REVALIDATION_KEEP);
            // Past its lifetime it answers nothing by itself: it is only asked about.
            assert_eq!(
                State::at(&kept, S(11)),
                State::Expired {
                    usable_on_error: false
                }
            );
        }
        // A response with no lifetime at all is still not stored, validator or not.
        assert_eq!(
            store(&[("cache-control", "max-age=0"), ("etag", "\"v1\"")], &r),
            Err(NotStored::NoLifetime)
        );
    }

    #[test]
    fn age_moves_an_entry_through_its_states() {
        let f = Freshness {
            lifetime: S(10),
            initial_age: S(2),
            stale_while_revalidate: S(5),
            stale_if_error: S(20),
            revalidatable: false,
        };
        assert_eq!(State::at(&f, S(0)), State::Fresh);
        assert_eq!(State::at(&f, S(7)), State::Fresh);
        assert_eq!(State::at(&f, S(8)), State::Revalidate);
        assert_eq!(
            State::at(&f, S(13)),
            State::Expired {
                usable_on_error: true
            }
        );
        assert_eq!(
            State::at(&f, S(28)),
            State::Expired {
                usable_on_error: false
            }
        );
        assert_eq!(f.keep_for(), S(28));
        let with_age = store(&[("age", "4"), ("cache-control", "max-age=10")], &rules()).unwrap();
        assert_eq!(with_age.initial_age, S(4));
    }

    #[test]
    fn a_warmed_entry_is_fetched_again_unless_fresh_an_interval_past_the_next_look() {
        let f = Freshness {
            lifetime: S(10),
            initial_age: S(0),
            stale_while_revalidate: S(30),
            stale_if_error: S(300),
            revalidatable: true,
        };
        assert!(!needs_warming(&f, S(0), S(1)));
        assert!(!needs_warming(&f, Duration::from_millis(7999), S(1)));
        assert!(needs_warming(&f, S(8), S(1)));
        // Within stale-while-revalidate it no longer counts as warm.
        assert!(needs_warming(&f, S(12), S(1)));
        // The instance's Age counts as time in store; a longer interval looks further ahead.
        let aged = Freshness {
            initial_age: S(3),
            ..f
        };
        assert!(!needs_warming(&aged, S(4), S(1)));
        assert!(needs_warming(&aged, S(5), S(1)));
        assert!(needs_warming(&f, S(4), S(3)));
        // A lifetime shorter than two intervals is fetched at every look.
        let short = Freshness {
            lifetime: S(2),
            ..f
        };
        assert!(needs_warming(&short, S(0), S(1)));
        assert!(needs_warming(&f, Duration::MAX, Duration::MAX));
    }

    #[test]
    fn revalidating_or_within_stale_if_error_answers_a_failure() {
        assert!(!State::Fresh.usable_on_error());
        assert!(State::Revalidate.usable_on_error());
        let expired = |usable_on_error| State::Expired { usable_on_error };
        assert!(expired(true).usable_on_error());
        assert!(!expired(false).usable_on_error());
    }

    #[test]
    fn after_a_wait_a_request_answers_from_the_store_rejoins_fills_or_takes_a_turn() {
        use AfterWait::{FillAlone, Hit, Rejoin, Stale, Updating, WaitAgain};
        let expired = |usable_on_error| State::Expired { usable_on_error };
        let woken = Woken {
            stored: None,
            failed: false,
            purged: false,
            rejoined: false,
            variants_stored: false,
            stale: Some((expired(true), "stale")),
        };
        // What the fetch stored answers, whether or not it failed (a stored 5xx is a hit).
        for failed in [false, true] {
            let stored = |state| Woken {
                stored: Some((state, "stored")),
                failed,
                ..woken
            };
            assert_eq!(after_wait(stored(State::Fresh)), Hit("stored"));
            assert_eq!(after_wait(stored(State::Revalidate)), Updating("stored"));
        }
        // Nothing stored for this variant, no failure: rejoin once when another variant was
        // stored, else fetch alone.
        let others = Woken {
            variants_stored: true,
            ..woken
        };
        assert_eq!(after_wait(others), Rejoin);
        let rejoined = Woken {
            rejoined: true,
            ..others
        };
        assert_eq!(after_wait(rejoined), FillAlone);
        assert_eq!(after_wait(woken), FillAlone);
        // Its own variant stored but expired: nothing to wait for, it fetches alone.
        let own_expired = Woken {
            stored: Some((expired(false), "stored")),
            ..others
        };
        assert_eq!(after_wait(own_expired), FillAlone);
        // A failure: the stale entry while its window allows, else the next turn; never a
        // rejoin, and never the expired stored entry.
        let failed = Woken {
            failed: true,
            ..others
        };
        assert_eq!(after_wait(failed), Stale("stale"));
        let revalidating = Woken {
            stale: Some((State::Revalidate, "stale")),
            ..failed
        };
        assert_eq!(after_wait(revalidating), Stale("stale"));
        for stale in [Some((expired(false), "stale")), None] {
            assert_eq!(after_wait(Woken { stale, ..failed }), WaitAgain);
        }
        let failed_own_expired = Woken {
            failed: true,
            ..own_expired
        };
        assert_eq!(after_wait(failed_own_expired), Stale("stale"));
        // A purge during the fetch: nothing was stored, and what was stale is gone too; the
        // waiters take turns, whatever the fetch brought, rather than all asking at once.
        for base in [woken, others, own_expired, failed, revalidating] {
            let purged = Woken {
                purged: true,
                ..base
            };
            assert_eq!(after_wait(purged), WaitAgain, "{base:?}");
        }
        // What a fetch after the purge stored still answers.
        let stored_since = Woken {
            stored: Some((State::Fresh, "stored")),
            purged: true,
            ..woken
        };
        assert_eq!(after_wait(stored_since), Hit("stored"));
    }

    #[test]
    fn error_statuses_for_stale_if_error() {
        for s in [500, 502, 503, 504] {
            assert!(is_error_status(StatusCode::from_u16(s).unwrap()));
        }
        assert!(!is_error_status(StatusCode::NOT_FOUND));
        assert!(!is_error_status(StatusCode::from_u16(501).unwrap()));
    }

    #[test]
    fn vary_names_and_values() {
        let response = headers(&[("vary", "Accept, accept-encoding"), ("vary", "Accept")]);
        let names = vary_names(&response).unwrap();
        assert_eq!(names, ["accept", "accept-encoding"]);
        assert_eq!(vary_names(&headers(&[("vary", "*")])), None);
        // What is no field name varies on something unknown, as `*` does.
        assert_eq!(vary_names(&headers(&[("vary", "accept, x y")])), None);
        let request = headers(&[("accept", "a"), ("accept", "b")]);
        assert_eq!(
            vary_values(&names, &request),
            [Some(b"a, b".to_vec()), None]
        );
        // A lookup compares in place what storing would have built.
        let stored = vary_values(&names, &request);
        for (asked, same) in [
            (vec![("accept", "a"), ("accept", "b")], true),
            (vec![("accept", "a, b")], true),
            (vec![("accept", "a")], false),
            (
                vec![("accept", "a"), ("accept", "b"), ("accept", "c")],
                false,
            ),
            (vec![("accept", "a"), ("accept", "bb")], false),
            (
                vec![
                    ("accept", "a"),
                    ("accept", "b"),
                    ("accept-encoding", "gzip"),
                ],
                false,
            ),
            (vec![], false),
        ] {
            let asked = headers(&asked);
            assert_eq!(vary_matches(&names, &stored, &asked), same, "{asked:?}");
            assert_eq!(vary_values(&names, &asked) == stored, same, "{asked:?}");
        }
    }

    #[test]
    fn key_is_path_then_host_then_parts() {
        let request = headers(&[("x-tenant", "t1"), ("cookie", "a=1; lang=fr")]);
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let parts = [
            HashKey::Header(HeaderName::from_static("x-tenant")),
            HashKey::Cookie("lang".into()),
            HashKey::ClientIp,
        ];
        assert_eq!(
            cache_key("/a?b=1", "https", Some("Example.com"), &parts, &request, ip),
            "/a?b=1 https example.com t1 fr 127.0.0.1"
        );
        assert_eq!(cache_key("/a", "http", None, &[], &request, ip), "/a http");
        // Parts cannot pass for one another: separators inside values are escaped, and
        // repeated lines are joined.
        let two = [
            HashKey::Header(HeaderName::from_static("a")),
            HashKey::Header(HeaderName::from_static("b")),
        ];
        let key = |pairs: &[(&str, &str)]| cache_key("/", "http", None, &two, &headers(pairs), ip);
        assert_ne!(
            key(&[("a", "x y"), ("b", "z")]),
            key(&[("a", "x"), ("b", "y z")])
        );
        assert_ne!(key(&[("a", "x,y")]), key(&[("a", "x"), ("a", "y")]));
        assert_eq!(key(&[("a", "50% off"), ("b", "z")]), "/ http 50%25%20off z");
    }

    #[test]
    fn validators_come_from_the_stored_response() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 01 Jun 2027 10:00:00 GMT"),
        ]);
        assert_eq!(
            validators(&stored),
            [
                (header::IF_NONE_MATCH, HeaderValue::from_static("\"v1\"")),
                (
                    header::IF_MODIFIED_SINCE,
                    HeaderValue::from_static("Tue, 01 Jun 2027 10:00:00 GMT")
                ),
            ]
        );
        assert!(validators(&headers(&[("content-type", "text/plain")])).is_empty());
    }

    #[test]
    fn a_304_renews_headers_and_freshness_but_not_the_body_framing() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("cache-control", "max-age=1"),
            ("content-length", "42"),
            ("content-type", "application/json"),
            ("x-multi", "a"),
        ]);
        let not_modified = headers(&[
            ("etag", "\"v1\""),
            ("cache-control", "max-age=30"),
            ("content-length", "0"),
            ("x-multi", "b"),
            ("x-multi", "c"),
        ]);
        let updated = updated_headers(&stored, &not_modified);
        assert_eq!(updated["content-length"], "42");
        assert_eq!(updated["content-type"], "application/json");
        assert_eq!(updated["cache-control"], "max-age=30");
        let multi: Vec<_> = updated.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["b", "c"]);
        let renewed = storable(StatusCode::OK, &updated, false, &rules(), SystemTime::now());
        assert_eq!(renewed.unwrap().lifetime, S(30));
        // A 304 may also take the right to store away.
        let refused = updated_headers(&stored, &headers(&[("cache-control", "no-store")]));
        assert_eq!(
            storable(StatusCode::OK, &refused, false, &rules(), SystemTime::now()),
            Err(NotStored::NoStore)
        );
    }
}
