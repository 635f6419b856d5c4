//! The per-request pipeline: validate the head, route, pick an instance, send, retry what may
//! be retried, and stream the answer back.
//!
//! Retry rules (`retry::next_attempt`): a request that never reached an instance is retried for
//! every method; once sent (a response timeout included), only an idempotent one whose body can
//! go again; nothing after response bytes came back, except an answer whose status the upstream
//! lists in `retry_on_status`. Every retry spends the upstream's retry budget.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{BodyPace, ClientBody, ClientBodyFailure, ForwardBody, GatewayBody, Holding};
use super::connect::ConnectError;
use super::error::ProxyError;
use super::h1::{encode_bodiless, AnswerHead, InstanceBody, InstanceConn, Outgoing, SendError};
use super::h2::{self, Http2Error};
use super::headers::{
    client_request_id, cookie_value, is_websocket, restore_upgrade, strip_hop_by_hop, values,
    websocket_upgrade, ForwardedFields, X_FORWARDED_PREFIX, X_REQUEST_ID,
};
use super::pipeline::{AnswerWait, Broken, LineHold, Lines, PathSlot};
use super::record::{RequestRecord, Served};
use super::retry::{next_attempt, Attempts, FailureKind, NextAttempt, Resend, Step};
use super::router::{has_encoded_nul, host_without_port, match_route, stripped_target};
use super::tunnel::{self, ClientUpgrade};
use super::upstream::{InFlightGuard, Instance, NoInstance};
use super::{Gateway, Runtime};
use crate::balance::{hash_bytes, HashKey, Strategy};
use crate::config::{RouteConfig, UpstreamConfig};
use crate::http1::{recycle_map, Framing};
use crate::ratelimit::hold_slots;

/// The client end of a connection, its IP rendered once per connection for X-Forwarded-For.
#[derive(Clone)]
pub struct ClientAddr {
    pub addr: SocketAddr,
    ip: HeaderValue,
    /// The connection came through the TLS listener.
    pub secure: bool,
    /// The gateway's own HTTP/1.1 loop answers this client, and writes an instance's fields as
    /// they came (`RawFields`); hyper needs them in the header map.
    raw_answers: bool,
}

impl ClientAddr {
    pub fn new(addr: SocketAddr, secure: bool) -> ClientAddr {
        // A dual-stack listener (`[::]:PORT`) takes IPv4 peers as `::ffff:a.b.c.d`: they are
        // the IPv4 clients they are, for `trusted_proxies`, rate-limit keys and the log.
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let ip = HeaderValue::try_from(addr.ip().to_string()).expect("an IP is a header value");
        ClientAddr {
            addr,
            ip,
            secure,
            raw_answers: false,
        }
    }

    /// This client, answered by the gateway's own HTTP/1.1 loop.
    pub fn answered_raw(self) -> ClientAddr {
        ClientAddr {
            raw_answers: true,
            ..self
        }
    }

    fn scheme(&self) -> &'static str {
        if self.secure {
            "https"
        } else {
            "http"
        }
    }
}

/// The record of a request about to be handled (see [`RequestRecord`]): made by the caller,
/// which keeps it until the answer went out, so that the answer's end is what it times.
pub fn request_record(gateway: &Gateway, head: &Parts, client: &ClientAddr) -> RequestRecord {
    RequestRecord::new(
        gateway.runtime.load_full(),
        head.method.clone(),
        logged_target(&head.uri),
        request_id(gateway, &head.headers),
        client.addr.ip(),
    )
}

/// The target a request is logged with: with its query, as nginx's `$request_uri` and HAProxy's
/// and Envoy's default logs; a CONNECT's is its authority, as nginx logs the request line.
fn logged_target(uri: &Uri) -> &str {
    uri.path_and_query().map_or_else(
        || uri.authority().map_or("-", |authority| authority.as_str()),
        |target| target.as_str(),
    )
}

/// The request's ID: the client's X-Request-ID when it is sane, else a new one.
pub fn request_id(gateway: &Gateway, headers: &HeaderMap) -> HeaderValue {
    client_request_id(headers).map_or_else(|| gateway.new_request_id(), HeaderValue::clone)
}

/// Entry point for one client request, recorded in `record`; never fails (errors become
/// responses). `upgrade` is the client's side of the connection should the request switch
/// protocols.
pub async fn handle(
    gateway: &Gateway,
    req: Request<ClientBody>,
    client: &ClientAddr,
    upgrade: Option<ClientUpgrade>,
    record: &mut RequestRecord,
) -> Response<GatewayBody> {
    let runtime = &record.runtime;
    let tls = runtime.config.tls.as_ref();
    let redirect = tls
        .filter(|tls| tls.redirect_http && !client.secure)
        .and_then(|_| https_redirect(&req, gateway.https_port()));
    let mut response = match redirect {
        Some(Ok(mut response)) => {
            let id = record.request_id.clone();
            response.headers_mut().insert(X_REQUEST_ID.clone(), id);
            response
        }
        Some(Err(error)) => error.response(&record.request_id),
        None => {
            let request_id = &record.request_id;
            match forward(
                gateway,
                runtime,
                req,
                client,
                request_id,
                upgrade,
                &mut record.served,
            )
            .await
            {
                Ok(response) => response,
                Err(error) => {
                    error.log_failure(request_id);
                    error.response(request_id)
                }
            }
        }
    };
    if let Some(hsts) = hsts_for(runtime, client) {
        response
            .headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
    record.answered(response.status());
    response
}

/// The record of a request refused as its head was read (400, 413, 414, 431, 505): no route,
/// and its method and path are logged as `-`, as nginx logs a request it could not parse.
pub fn refused_record(
    gateway: &Gateway,
    client: &ClientAddr,
    status: http::StatusCode,
    request_id: HeaderValue,
) -> RequestRecord {
    let mut record = RequestRecord::new(
        gateway.runtime.load_full(),
        Method::from_bytes(b"-").expect("a token"),
        "-",
        request_id,
        client.addr.ip(),
    );
    record.answered(status);
    record
}

async fn forward(
    gateway: &Gateway,
    runtime: &Arc<Runtime>,
    req: Request<ClientBody>,
    client: &ClientAddr,
    request_id: &HeaderValue,
    client_upgrade: Option<ClientUpgrade>,
    served: &mut Served,
) -> Result<Response<GatewayBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    if let Some(refusal) = refused_method(&parts.method) {
        return Err(refusal);
    }
    let server = &runtime.config.server;
    if parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len()) > server.max_uri_length {
        return Err(ProxyError::UriTooLong);
    }
    let max_body = server.max_body;
    // Framing was checked where the head was read (client_h1, serve_hyper): the body knows
    // its declared length.
    if body
        .size_hint()
        .exact()
        .is_some_and(|length| length > max_body)
    {
        return Err(ProxyError::BodyTooLarge);
    }
    if has_encoded_nul(parts.uri.path()) {
        return Err(ProxyError::BadRequest("an encoded NUL (%00) in the path"));
    }
    let (host, host_from_target) = request_host(&parts.headers, &parts.uri, parts.version)?;
    let host_bytes = host.as_ref().map(HeaderValue::as_bytes);
    let route = match_route(&runtime.config.routes, host_bytes, parts.uri.path())
        .ok_or(ProxyError::NoRoute)?;
    served.route = Some(route);
    let upstream = runtime.route_upstream(route);
    // The concurrency slots in `admitted` go to the response body and are held to its end.
    let admission = &runtime.admission;
    let client_ip = admission.client_ip(client.addr.ip(), &parts.headers);
    let mut body = if body.is_end_stream() {
        ForwardBody::Empty
    } else {
        ForwardBody::stream(body, max_body, BodyPace::from_config(server))
    };
    let mut admitted = match admission.admit_now(route, &parts.headers, client_ip) {
        Some(admitted) => admitted,
        // Boxed: only requests that wait for Redis or a queue carry the waiting state.
        None => {
            // A request a rate limit delays reads its small body meanwhile: its client's
            // connection is then watched again, and a client that leaves during the wait
            // takes its request with it, as nginx answers it 499 rather than forward it.
            let read_meanwhile = async {
                body.read_if_small()
                    .await
                    .map_err(|err| ProxyError::from(ClientBodyFailure::of(&err)))
            };
            let stop_due = gateway.stop_due();
            let admitting =
                admission.admit(route, &parts.headers, client_ip, read_meanwhile, stop_due);
            Box::pin(admitting).await
        }
    }?;
    let hash = match &upstream.config.strategy {
        Strategy::ConsistentHash(key) => hash_key(key, &parts, client_ip),
        _ => None,
    };

    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    }
    // Only an HTTP/2 client gets the instance's trailers (client_h1 drops them).
    let from_http2 = parts.version == Version::HTTP_2;
    if from_http2 {
        join_cookies(&mut parts.headers);
    }
    // An HTTP/1.0 request's Upgrade is ignored (RFC 9110 §7.8): 1.0 has no such mechanism. So
    // is one with a body (a WebSocket handshake has none): after a 101 the client's bytes
    // would be the body's rest and the tunnel's first alike.
    let may_upgrade = parts.version != Version::HTTP_10 && http_body::Body::is_end_stream(&body);
    parts.version = Version::HTTP_11;
    match &host {
        // The target's authority replaces what Host said (RFC 9112 §3.2.2).
        Some(host) if host_from_target => {
            parts.headers.insert(header::HOST, host.clone());
        }
        Some(_) => {}
        // HTTP/1.1 needs a Host: an HTTP/1.0 client's request carries the upstream's name, as
        // nginx's default `proxy_set_header Host $proxy_host` does.
        None => {
            if let Ok(name) = HeaderValue::from_str(&upstream.config.name) {
                parts.headers.insert(header::HOST, name);
            }
        }
    }
    let upgrade = websocket_upgrade(&parts.headers).filter(|_| may_upgrade);
    let client_upgrade = client_upgrade.filter(|_| upgrade.is_some());
    // TE is hop-by-hop, but an HTTP/2 instance (gRPC) wants to hear on its own hop that trailers
    // reach the client (RFC 9113 §8.2.2 allows `te: trailers` alone), which holds when the
    // client speaks HTTP/2 too.
    let te_trailers = from_http2
        && upstream.config.protocol.is_http2()
        && values(&parts.headers, &header::TE)
            .any(|value| crate::http1::has_token(value.as_bytes(), b"trailers"));
    let fields = ForwardedFields::take(
        &mut parts.headers,
        &client.ip,
        client.scheme(),
        host,
        request_id,
    );
    if let Some(protocol) = upgrade {
        restore_upgrade(&mut parts.headers, protocol);
    }
    if te_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }

    // Upgrades (WebSocket) are tunnels, never cached.
    if let Some(cache) = runtime
        .route_cache(route)
        .filter(|_| client_upgrade.is_none())
    {
        // The cache keys and varies on the request as the instance sees it.
        fields.insert_into(&mut parts.headers);
        let fetch = InstanceFetch {
            runtime: runtime.clone(),
            route,
            hash,
            request_id: request_id.clone(),
        };
        // Boxed, like the HTTP/2 path: every connection's task would otherwise carry the
        // cache's (large) state whether its route is cached or not.
        let slots = admitted.take_slots();
        let mut response = Box::pin(crate::cache::serve(
            cache,
            parts,
            body,
            (client_ip, client.scheme()),
            (fetch, slots),
        ))
        .await;
        admitted.apply_to(&mut response);
        return Ok(response);
    }
    // Fields the gateway adds to the answer later must replace the instance's: those go
    // through the map (rate-limit state, and HSTS on a secure connection).
    // So must an answer that may be held for `retry_on_status`: it is kept with its fields
    // in the map.
    let raw_answer = client.raw_answers
        && !admitted.adds_fields()
        && hsts_for(runtime, client).is_none()
        && upstream.config.retry_on_status.is_empty();
    // A cached route's upgrade (a tunnel, never cached) goes to an instance: it takes the
    // upstream's slot that its hits do not.
    if client_upgrade.is_some() {
        admitted.add_slots(admission.fetch_slot(route).await?);
    }
    let result = to_instance(
        runtime,
        route,
        &mut parts,
        body,
        hash,
        Added::Fields(&fields, raw_answer),
        (client_upgrade, served),
    )
    .await;
    recycle_map(parts.headers);
    result.map(|mut response| {
        admitted.apply_to(&mut response);
        response
    })
}

/// The pipeline after routing, owned so the cache can run it for a client or in the background.
#[derive(Clone)]
pub struct InstanceFetch {
    runtime: Arc<Runtime>,
    route: usize,
    hash: Option<u64>,
    pub request_id: HeaderValue,
}

impl InstanceFetch {
    /// For requests the gateway makes itself (cache warming).
    pub fn for_route(runtime: Arc<Runtime>, route: usize, request_id: HeaderValue) -> Self {
        InstanceFetch {
            runtime,
            route,
            hash: None,
            request_id,
        }
    }

    /// Sends the request to an instance, holding the upstream's concurrency slot (a cached
    /// route's hits take none) to the answer's end.
    pub async fn send(
        &self,
        mut parts: Parts,
        body: ForwardBody,
    ) -> Result<Response<GatewayBody>, ProxyError> {
        let slot = self.runtime.admission.fetch_slot(self.route).await?;
        let mut response = to_instance(
            &self.runtime,
            self.route,
            &mut parts,
            body,
            self.hash,
            Added::InMap(&self.request_id),
            (None, &mut Served::default()),
        )
        .await?;
        hold_slots(&mut response, slot);
        Ok(response)
    }
}

/// The gateway's own fields on a request to an instance.
#[derive(Clone, Copy)]
enum Added<'a> {
    /// To be written with the head (a client's request on a route without a cache), and
    /// whether the answer's fields may stay raw.
    Fields(&'a ForwardedFields, bool),
    /// Already in the header map (cached routes) or none (cache warming); the request ID is
    /// for the answer.
    InMap(&'a HeaderValue),
}

impl<'a> Added<'a> {
    /// The request as it goes to an instance.
    fn outgoing(self, parts: &'a Parts) -> Outgoing<'a> {
        let (fields, raw_answer) = match self {
            Added::Fields(fields, raw_answer) => (Some(fields), raw_answer),
            Added::InMap(_) => (None, false),
        };
        Outgoing {
            parts,
            fields,
            raw_answer,
        }
    }

    fn request_id(self) -> &'a HeaderValue {
        match self {
            Added::Fields(fields, _) => fields.request_id(),
            Added::InMap(id) => id,
        }
    }
}

/// Picks an instance, sends, retries what may be retried; notes each attempt in `served`.
async fn to_instance(
    runtime: &Runtime,
    route: usize,
    parts: &mut Parts,
    mut body: ForwardBody,
    hash: Option<u64>,
    added: Added<'_>,
    (mut client_upgrade, served): (Option<ClientUpgrade>, &mut Served),
) -> Result<Response<GatewayBody>, ProxyError> {
    let request_id = added.request_id();
    let prefix = runtime.route_prefixes[route].as_ref();
    strip_route_prefix(&runtime.config.routes[route], prefix, parts);
    let parts = &*parts;
    // The upstream in force now: the request may have waited across a reload (a rate limit's
    // delay, a queue) that replaced the instances it was routed to.
    let upstream = runtime.route_upstream(route).in_force();
    let config = &upstream.config;
    let idempotent = is_idempotent(&parts.method);
    // A body-less idempotent request can be sent again whatever became of an attempt: such
    // requests may wait for a pooled connection's liveness unchecked, and be pipelined.
    let replayable = body.is_end_stream() && idempotent;
    if client_upgrade.is_some() && config.protocol.is_http2() {
        return Err(ProxyError::InstanceFailed(
            "upgrades cannot be forwarded to HTTP/2 instances".to_owned(),
        ));
    }
    // A small body is read whole before an instance is picked, as nginx reads a request body
    // before it passes the request on: a slow client's upload holds no instance connection and
    // is not in flight there, and the body leaves with its head in one write (an instance that
    // answers after reading the head alone may close the connection after its answer).
    if let Err(err) = body.read_if_small().await {
        return Err(ClientBodyFailure::of(&err).into());
    }
    upstream.retry_budget.deposit();

    let seq = upstream.next_seq();
    let mut attempts = Attempts::default();
    let budget = || upstream.retry_budget.try_withdraw(Instant::now());
    let mut last_error = ProxyError::NoHealthyInstance;
    // One instance set for every attempt: `tried` holds positions in it, which a set changed
    // between attempts (an instance added or removed) would shift.
    let set = upstream.set.load_full();
    // The instance whose failed attempt the next one retries: counted once another instance
    // is there to take it.
    let mut retrying: Option<Arc<Instance>> = None;
    // The last answer whose status (in `retry_on_status`) had the request tried on another
    // instance, and who gave it: the client's when no later attempt answers.
    let mut retried_answer: Option<(Response<GatewayBody>, SocketAddr)> = None;
    loop {
        let now = Instant::now();
        let (index, instance) = match upstream.pick(&set, &attempts.tried, hash, seq, now) {
            Ok(picked) => picked,
            Err(NoInstance::NoneHealthy) if attempts.count == 0 => {
                return Err(ProxyError::NoHealthyInstance)
            }
            Err(_) => return given_up(last_error, retried_answer, served),
        };
        if let Some(failed) = retrying.take() {
            failed.counters.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(instance = %failed.addr, retry = %instance.addr, attempt = attempts.count, "retrying on another instance");
        }
        let attempt = attempts.start(index);
        (served.instance, served.attempts) = (Some(instance.addr), attempt);
        let guard = InFlightGuard::enter(instance.clone());
        let checkout = Checkout {
            probe: !replayable,
            fresh: attempts.fresh,
            // Not a HEAD: a body sent after a HEAD answer by mistake (a classic server bug)
            // would become the answer of the request queued behind it.
            pipelinable: replayable && client_upgrade.is_none() && parts.method != Method::HEAD,
            now,
        };
        let answer = match send(
            &instance,
            added.outgoing(parts),
            &mut body,
            config.response_timeout,
            checkout,
        )
        .await
        {
            Ok(Answer::Http2(response, slot)) => {
                judge_answer(&instance, config, response.status(), now);
                let (mut head, incoming) = response.into_parts();
                head.version = Version::HTTP_11;
                strip_hop_by_hop(&mut head.headers);
                head.headers
                    .insert(X_REQUEST_ID.clone(), request_id.clone());
                // A 204, a 304 or a HEAD answer has no body whatever the instance sent (RFC
                // 9110 §6.4.1): passed on, it broke an HTTP/2 client's stream. The answer ends
                // here, and the instance's stream with it.
                if matches!(head.status.as_u16(), 204 | 304) || parts.method == Method::HEAD {
                    Response::from_parts(head, GatewayBody::Full(None))
                } else {
                    let body = Holding::paced(incoming, (guard, slot), config.response_timeout);
                    Response::from_parts(head, GatewayBody::Http2(body))
                }
            }
            Ok(Answer::Http1(conn, line, mut answer)) => {
                // The client's side of an upgrade goes with a switch only: an answer that does not
                // switch may be tried again (`retry_on_status`) on an instance that does.
                let switched = answer.head.status == http::StatusCode::SWITCHING_PROTOCOLS;
                let upgrade = if switched {
                    client_upgrade.take()
                } else {
                    None
                };
                // Only WebSocket is ever asked for (`websocket_upgrade`): a switch to anything
                // else, or one that does not say to what (a 101 must, RFC 9110 §15.2.2), is one
                // the client did not ask for either (§7.8).
                let unasked = || {
                    let switched_to = answer.head.headers.get(header::UPGRADE);
                    upgrade.is_none() || !switched_to.is_some_and(is_websocket)
                };
                if switched && unasked() {
                    instance.record_failure(Instant::now(), config);
                    return Err(ProxyError::InstanceFailed(
                        "instance switched protocols unasked".to_owned(),
                    ));
                }
                judge_answer(&instance, config, answer.head.status, now);
                if let Some(client_side) = upgrade {
                    let head = &mut answer.head;
                    // The switch is the instance's Upgrade field (checked above): one that
                    // left `Connection: upgrade` out still gets both to the client, which
                    // fails a 101 without them (RFC 6455 §4.1), as nginx sends them.
                    let protocol = head.headers.get(header::UPGRADE).cloned();
                    strip_hop_by_hop(&mut head.headers);
                    if let Some(protocol) = protocol {
                        restore_upgrade(&mut head.headers, protocol);
                    }
                    head.headers
                        .insert(X_REQUEST_ID.clone(), request_id.clone());
                    // The connection now belongs to the tunnel, not the pool.
                    tunnel::spawn(client_side, conn, guard, runtime.config.server.idle_timeout);
                    return Ok(Response::from_parts(answer.head, GatewayBody::Full(None)));
                }
                strip_hop_by_hop(&mut answer.head.headers);
                // Raw fields carry the request ID themselves.
                if answer.raw_fields.is_none() {
                    answer
                        .head
                        .headers
                        .insert(X_REQUEST_ID.clone(), request_id.clone());
                }
                let timeout = config.response_timeout;
                let body = InstanceBody::new(conn, line, &mut answer, guard, timeout);
                Response::from_parts(answer.head, GatewayBody::Upstream(body))
            }
            Err(failure) => {
                drop(guard);
                let Attempt { kind, error } = failure;
                if kind.is_instance_fault() {
                    instance.record_failure(Instant::now(), config);
                }
                // Short of descriptors: once idle connections made room (its own shed, or one
                // made since the attempt began), the request goes once more (as after a stale
                // pooled connection) rather than get the 503. A shed line's descriptor is
                // freed when its writer task runs: that gets its turn first.
                let shed = kind == FailureKind::Local
                    && (super::shed_idle_connections(runtime, &error) > 0
                        || super::shed_since(now));
                let kind = if shed {
                    tokio::time::sleep(SHED_SETTLE).await;
                    FailureKind::Stale { sent: false }
                } else {
                    kind
                };
                let request = Resend {
                    idempotent,
                    body_again: body.rewind(),
                };
                let next = next_attempt(kind, request, attempts.fresh);
                let left = set.any_left(&attempts.tried, Instant::now());
                if attempts.after_failure(next, config.retries, || left && budget()) == Step::GiveUp
                {
                    return given_up(error, retried_answer, served);
                }
                match next {
                    NextAttempt::Retry => retrying = Some(instance),
                    NextAttempt::Reconnect if kind == (FailureKind::Stale { sent: true }) => {
                        instance.counters.resends.fetch_add(1, Ordering::Relaxed);
                        served.resent += 1;
                    }
                    _ => {}
                }
                last_error = error;
                continue;
            }
        };
        // nginx's `proxy_next_upstream http_503` and the like: for a request that may be sent
        // again, as for a failure after it was sent.
        // The answer is read whole first, so its connection goes back to the pool (or its
        // pipelined line on): dropped unread, it broke the line, and every request queued
        // behind it went again. So only one of a known, small length is.
        let holdable = |answer: &Response<GatewayBody>| {
            let length = http_body::Body::size_hint(answer.body()).upper();
            length.is_some_and(|length| length <= HELD_ANSWER_MAX)
        };
        if config.retry_on_status.contains(&answer.status().as_u16())
            && idempotent
            && holdable(&answer)
            && body.rewind()
            && set.any_left(&attempts.tried, Instant::now())
            && attempts.retry(config.retries, budget) == Step::Again
        {
            tracing::debug!(instance = %instance.addr, status = %answer.status(), "answer to be retried on another instance");
            let (head, held) = answer.into_parts();
            // One broken off, or stalled (it would hold the retry up to `response_timeout`),
            // leaves nothing to hold: the retry goes on all the same.
            let read = http_body_util::BodyExt::collect(held);
            match tokio::time::timeout(HELD_ANSWER_WAIT, read).await {
                Ok(Ok(held)) => {
                    let held = held.to_bytes();
                    let held = (!held.is_empty()).then_some(held);
                    let answer = Response::from_parts(head, GatewayBody::Full(held));
                    retried_answer = Some((answer, instance.addr));
                }
                Ok(Err(_)) | Err(_) => {
                    last_error =
                        ProxyError::InstanceFailed("the instance broke off its answer".into());
                }
            }
            retrying = Some(instance);
            continue;
        }
        return Ok(answer);
    }
}

/// How long a request short of a descriptor waits, once idle connections were shed, for their
/// tasks to close them.
const SHED_SETTLE: std::time::Duration = std::time::Duration::from_millis(10);

/// The largest answer held while a `retry_on_status` retry is tried.
const HELD_ANSWER_MAX: u64 = 64 * 1024;
/// The longest such an answer's body is waited for.
const HELD_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A request's end when no attempt is left: the last answer that was retried for its status,
/// when one was (nginx passes on the last answer too), else the last failure.
fn given_up(
    error: ProxyError,
    retried_answer: Option<(Response<GatewayBody>, SocketAddr)>,
    served: &mut Served,
) -> Result<Response<GatewayBody>, ProxyError> {
    match retried_answer {
        Some((answer, from)) => {
            served.instance = Some(from);
            Ok(answer)
        }
        None => Err(error),
    }
}

/// Makes the request as a route with `strip_prefix` sends it: its path without the prefix,
/// and `X-Forwarded-Prefix` (Traefik's) saying what was taken off, so the instance can build
/// its links; the client's own is replaced. Other routes' requests are left as they are. The
/// cache keys, the access log and the metrics have the path the client sent already.
fn strip_route_prefix(
    route: &RouteConfig,
    forwarded_prefix: Option<&HeaderValue>,
    parts: &mut Parts,
) {
    if !route.strip_prefix {
        return;
    }
    let stripped = parts
        .uri
        .path_and_query()
        .and_then(|target| stripped_target(target.as_str(), &route.path_prefix))
        .and_then(|target| Uri::try_from(target).ok());
    let Some(uri) = stripped else {
        return;
    };
    parts.uri = uri;
    if let Some(prefix) = forwarded_prefix {
        parts
            .headers
            .insert(X_FORWARDED_PREFIX.clone(), prefix.clone());
    }
}

/// The `X-Forwarded-Prefix` a route with `strip_prefix` sends: its prefix without the final
/// `/`, escaped as in a path (a prefix of other than ASCII goes as `%C3%A9`, as clients send
/// it); `None` for other routes and for the prefix `/`.
pub(super) fn forwarded_prefix(route: &RouteConfig) -> Option<HeaderValue> {
    let prefix = route.path_prefix.trim_end_matches('/');
    if !route.strip_prefix || prefix.is_empty() {
        return None;
    }
    let escaped = percent_encoding::utf8_percent_encode(prefix, super::router::PATH_ESCAPES);
    HeaderValue::from_str(&escaped.to_string()).ok()
}

/// How one attempt on one instance failed, and the error the client gets if it was the last.
struct Attempt {
    kind: FailureKind,
    error: ProxyError,
}

impl Attempt {
    #[cold]
    fn failed(kind: FailureKind, reason: String) -> Attempt {
        Attempt {
            kind,
            error: ProxyError::InstanceFailed(reason),
        }
    }

    /// No connection: never sent, so it may go elsewhere. A connect timeout is a 504, as in
    /// nginx.
    #[cold]
    fn not_connected(err: &ConnectError) -> Attempt {
        let (kind, error) = match err {
            ConnectError::Timeout => (FailureKind::NotSent, ProxyError::ConnectTimeout),
            // The request's failure line says so; nothing more per request.
            ConnectError::Local(_) => (FailureKind::Local, ProxyError::GatewayShortage),
            err => (
                FailureKind::NotSent,
                ProxyError::InstanceFailed(err.to_string()),
            ),
        };
        Attempt { kind, error }
    }

    /// How a failed HTTP/1.1 exchange counts; `reused`: on a connection that served before.
    #[cold]
    fn of_send(err: SendError, reused: bool) -> Attempt {
        match err {
            SendError::Unsent(err) if reused => {
                Attempt::failed(FailureKind::Stale { sent: false }, err.to_string())
            }
            SendError::Unsent(err) => Attempt::failed(FailureKind::NotSent, err.to_string()),
            SendError::NoAnswer(reason) if reused => {
                Attempt::failed(FailureKind::Stale { sent: true }, reason)
            }
            SendError::Sent(reason) | SendError::NoAnswer(reason) => {
                Attempt::failed(FailureKind::Sent, reason)
            }
            SendError::BrokeOff(reason) => Attempt::failed(FailureKind::BrokeOff, reason),
            SendError::Invalid(reason) => Attempt::failed(FailureKind::Invalid, reason),
            SendError::Client(failure) => Attempt::client(failure),
            SendError::TimedOut => Attempt::timed_out(),
            SendError::TimedOutMidHead => Attempt {
                kind: FailureKind::BrokeOff,
                error: ProxyError::InstanceTimeout,
            },
        }
    }

    #[cold]
    fn timed_out() -> Attempt {
        Attempt {
            kind: FailureKind::Timeout,
            error: ProxyError::InstanceTimeout,
        }
    }

    #[cold]
    fn client(failure: ClientBodyFailure) -> Attempt {
        Attempt {
            kind: FailureKind::Client,
            error: failure.into(),
        }
    }
}

/// An instance's answer head: on the HTTP/1.1 connection it came on (with the request's place
/// on it when pipelined), or from HTTP/2.
enum Answer {
    Http1(Box<InstanceConn>, Option<LineHold>, AnswerHead),
    /// With the request's place on its connection, held until the answer ends.
    Http2(Response<Incoming>, h2::StreamSlot),
}

/// Which HTTP/1.1 connection an attempt may take.
#[derive(Clone, Copy)]
struct Checkout {
    /// Check a pooled connection with the kernel first: the request could not be sent again
    /// if the connection turned out closed.
    probe: bool,
    /// Open a new connection (the last pooled one was stale), never pipelined.
    fresh: bool,
    /// A body-less idempotent request other than HEAD, no upgrade: it may be pipelined.
    pipelinable: bool,
    /// When the attempt began: a pooled connection's idle time and, when the connection was
    /// pooled, the start of the instance's latency.
    now: Instant,
}

async fn send(
    instance: &Instance,
    head: Outgoing<'_>,
    body: &mut ForwardBody,
    timeout: std::time::Duration,
    checkout: Checkout,
) -> Result<Answer, Attempt> {
    if let Some(shared) = &instance.pool.http2 {
        return Box::pin(send_http2(instance, shared, head, body, timeout)).await;
    }
    if let Some(lines) = &instance.pool.lines {
        if checkout.pipelinable && !checkout.fresh {
            let path = PathSlot::of(head.parts.uri.path());
            if lines.pipelines(path, checkout.now) {
                return send_pipelined(instance, lines, head, path, timeout, checkout.now).await;
            }
        }
    }
    let checked_out = instance
        .pool
        .checkout(checkout.probe, checkout.fresh, checkout.now)
        .await;
    let (mut conn, reused) = match checked_out {
        Ok(checked_out) => checked_out,
        Err(err) => return Err(Attempt::not_connected(&err)),
    };
    // A new connection's set-up is not the instance's answer time.
    let started = if reused { checkout.now } else { Instant::now() };
    match conn.send(head, body, started, timeout).await {
        Ok(answer) => {
            observe_latency(instance, started, answer.head.status);
            Ok(Answer::Http1(conn, None, answer))
        }
        Err(err) => Err(Attempt::of_send(err, reused)),
    }
}

/// One attempt on a pipelined line: the request is queued, then its answer head is read in
/// its turn. The response timeout counts from the queueing, the wait behind earlier answers
/// included. A line that breaks before the request's turn, or a turn that does not come within
/// the timeout, sends the request again once, on a connection of its own, as a stale pooled
/// connection does.
async fn send_pipelined(
    instance: &Instance,
    lines: &Lines,
    head: Outgoing<'_>,
    path: PathSlot,
    timeout: std::time::Duration,
    started: Instant,
) -> Result<Answer, Attempt> {
    let connector = &instance.pool.connector;
    let idle = || instance.pool.take_idle(false, started);
    let ticket = lines.enqueue(connector, idle, started, path, |out| {
        encode_bodiless(out, head)
    });
    let due = started + timeout;
    let stale = |reason: &str| {
        Err(Attempt::failed(
            FailureKind::Stale { sent: true },
            reason.into(),
        ))
    };
    let (conn, line) = match tokio::time::timeout_at(due, ticket.turn()).await {
        Ok(Ok(turn)) => turn,
        Ok(Err(Broken::Unconnected(err))) => return Err(Attempt::not_connected(&err)),
        Ok(Err(Broken::Lost)) => return stale("the pipelined connection closed before the answer"),
        Ok(Err(Broken::Overtaken)) => {
            return stale("the answer ahead on its pipelined line streamed too long")
        }
        Ok(Err(Broken::Unsent)) => {
            return Err(Attempt::failed(
                FailureKind::Requeued,
                "taken off a pipelined line behind a streaming answer".into(),
            ))
        }
        // Held up by the answers before it, which are not this request's instance's fault
        // alone: it goes again on a connection of its own, with a timeout of its own.
        Err(_) => {
            return stale("the answers before it on its pipelined line took the response timeout")
        }
    };
    let pace = line.pace_sample(&conn);
    let proof_due = lines.proof_due(pace).filter(|&proof| proof < due);
    let mut waiting = AnswerWait::new(conn, line);
    let answer = waiting
        .reader()
        .read_answer(head, proof_due.unwrap_or(due), due)
        .await;
    let (conn, line) = waiting.into_parts();
    match answer {
        Ok(answer) => {
            // Only the close ends this answer: an instance that kept the connection open after
            // it would have the answers to the requests behind read as its body, and handed to
            // this client. It is pipelined to no more; with requests written behind it, the
            // answer is not trusted, and the request goes again alone (as without pipelining).
            if answer.framing.framing == Framing::UntilClose {
                lines.refuse("it sent an answer without a length (ended by its close)");
                if line.written_behind() {
                    return stale("an answer without a length, with requests written behind it");
                }
            }
            let came = observe_latency(instance, started, answer.head.status);
            lines.record_answer(path, pace, started, came);
            lines.record_length(path, answer.framing.framing);
            lines.answered(&line, answer.framing.keep_alive, answer.head.status);
            Ok(Answer::Http1(conn, Some(line), answer))
        }
        // The first answer due behind another did not come, or the connection closed
        // instead: the instance may drop pipelined requests. It gets no more; this one goes
        // again on a connection of its own, and the line breaks as `line` is dropped.
        Err(SendError::TimedOut | SendError::NoAnswer(_)) if proof_due.is_some() => {
            lines.refuse("it did not answer a request pipelined behind another");
            stale("no answer to a pipelined request: the instance is not pipelined to")
        }
        // Behind another answer, what does not parse is most likely what that answer left
        // over (a body after a 204, more bytes than its Content-Length): not this request's
        // instance failing it. It goes again alone, as it would have gone without pipelining,
        // and the instance is pipelined to no more.
        Err(SendError::Invalid(_)) if line.behind() => {
            lines.refuse("an answer that did not parse, behind another");
            stale("the answer ahead on its pipelined line was misframed")
        }
        Err(err) => {
            if matches!(err, SendError::Invalid(_)) {
                lines.refuse("an answer that did not parse");
            }
            Err(Attempt::of_send(err, conn.answered_any()))
        }
    }
}

/// One attempt on an HTTP/2 instance. The body comes back from a failed exchange (unless it
/// outgrew what is kept of it), so the request can go again, here or on another instance.
async fn send_http2(
    instance: &Instance,
    shared: &h2::Http2Connections,
    Outgoing { parts, fields, .. }: Outgoing<'_>,
    body: &mut ForwardBody,
    timeout: std::time::Duration,
) -> Result<Answer, Attempt> {
    let connector = &instance.pool.connector;
    // Once, a request the instance did not take up on a connection it is leaving (a GOAWAY:
    // nginx sends one after `keepalive_requests`) goes again on a new connection to it, as
    // after a stale pooled HTTP/1.1 connection.
    let mut reconnected = false;
    let mut refusals = 0;
    loop {
        let (sender, slot) = shared
            .sender(connector)
            .await
            .map_err(|err| Attempt::not_connected(&err))?;
        let request = h2::request(parts, fields, connector.is_tls(), &instance.addr_text)
            .map_err(|reason| Attempt::failed(FailureKind::NotSent, reason))?;
        let started = Instant::now();
        let (kind, reason) = match h2::send(sender, request, body, started, timeout).await {
            Ok(response) => {
                observe_latency(instance, started, response.status());
                return Ok(Answer::Http2(response, slot));
            }
            Err(Http2Error::NotSent(reason)) => (FailureKind::NotSent, reason),
            Err(Http2Error::GoneAway(reason)) => (FailureKind::GoneAway, reason),
            Err(Http2Error::Sent(reason)) => (FailureKind::Sent, reason),
            Err(Http2Error::Reset { reason, refused }) => (FailureKind::Reset { refused }, reason),
            Err(Http2Error::Client(failure)) => return Err(Attempt::client(failure)),
            Err(Http2Error::TimedOut) => return Err(Attempt::timed_out()),
        };
        // A REFUSED_STREAM was not processed (RFC 9113 §8.7), and its connection is fine.
        // Most often the stream was past the instance's limit, which its SETTINGS told after
        // a new instance's first burst went out (by the next try the limit is known): it goes
        // again on the instance a few times before it counts as the instance failing.
        if kind == (FailureKind::Reset { refused: true })
            && refusals < REFUSED_RESENDS
            && body.rewind()
        {
            refusals += 1;
            continue;
        }
        let untouched = matches!(kind, FailureKind::NotSent | FailureKind::GoneAway);
        if untouched && !reconnected && body.rewind() {
            shared.forget(&slot);
            reconnected = true;
            continue;
        }
        return Err(Attempt::failed(kind, reason));
    }
}

/// The most times one request goes again to an HTTP/2 instance that refused its stream.
const REFUSED_RESENDS: u32 = 4;

/// What makes an HTTP/2 request malformed beyond what hyper checks (RFC 9113 §8.2.1, §8.3.1):
/// a field value with whitespace at either end (an HTTP/1.1 instance would trim it, so the
/// request it sees is not the one checked here), `*` as the path of a method other than
/// OPTIONS, a path that neither is `*` nor starts with `/` (`?x` would go out as the request
/// line `GET ?x`), a path that is not ASCII (a request target is, RFC 3986; the HTTP/1.1
/// listener refuses such a line too), and a Host naming another authority than `:authority`.
/// An intermediary must not forward a malformed request; these get 400.
pub(super) fn http2_malformation(parts: &Parts) -> Result<(), &'static str> {
    // A CONNECT names an authority and no path (RFC 9113 §8.5): well formed, it gets the 405
    // an HTTP/1.1 one gets.
    if parts.method == Method::CONNECT && parts.uri.path_and_query().is_none() {
        return Ok(());
    }
    let padded = |value: &HeaderValue| {
        let bytes = value.as_bytes();
        let blank = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
        blank(bytes.first()) || blank(bytes.last())
    };
    if parts.headers.values().any(padded) {
        return Err("a field value starts or ends with whitespace");
    }
    if parts.uri.path() == "*" && parts.method != Method::OPTIONS {
        return Err("only OPTIONS may have * as its path");
    }
    let target = parts.uri.path_and_query().map_or("", |pq| pq.as_str());
    if !(target.starts_with('/') || target == "*") {
        return Err("the path does not start with /");
    }
    if parts
        .uri
        .path_and_query()
        .is_some_and(|pq| !pq.as_str().is_ascii())
    {
        return Err("the path is not ASCII");
    }
    let host = parts.headers.get(header::HOST).map(HeaderValue::as_bytes);
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    if let (Some(host), Some(authority)) = (host, authority) {
        if !host.eq_ignore_ascii_case(authority) {
            return Err("Host names another authority than :authority");
        }
    }
    Ok(())
}

/// The host a request is for, and whether it came from the target rather than a Host field
/// (RFC 9112 §3.2): the target's authority when it has one (absolute form, or HTTP/2's
/// `:authority`), else the Host field. 400 for more than one Host field, one that is not a
/// `host[:port]`, an HTTP/1.1 request without one, or an HTTP/2 one naming no host at all (an
/// http(s) target has one, RFC 9110 §4.2.1), as nginx answers.
fn request_host(
    headers: &HeaderMap,
    uri: &Uri,
    version: Version,
) -> Result<(Option<HeaderValue>, bool), ProxyError> {
    let mut fields = values(headers, &header::HOST);
    let field = fields.next();
    if fields.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host field"));
    }
    if field.is_some_and(|host| !is_host(host.as_bytes())) {
        return Err(ProxyError::BadRequest(
            "the Host field is not a host[:port]",
        ));
    }
    if field.is_none() && version == Version::HTTP_11 {
        return Err(ProxyError::BadRequest(
            "HTTP/1.1 request without a Host field",
        ));
    }
    if field.is_none() && version == Version::HTTP_2 && uri.authority().is_none() {
        return Err(ProxyError::BadRequest(
            "HTTP/2 request without :authority or Host",
        ));
    }
    // An absolute-form target's authority is held to the same rule: user info in it (RFC 9110
    // §4.2.4 says to treat it as an error) would otherwise reach the instance as its Host.
    let target = match uri.authority() {
        Some(authority) if !is_host(authority.as_str().as_bytes()) => {
            return Err(ProxyError::BadRequest(
                "the target's authority is not a host[:port]",
            ))
        }
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => None,
    };
    Ok(match target {
        Some(target) => (Some(target), true),
        None => (field.cloned(), false),
    })
}

/// Whether `host` is a `host[:port]` (RFC 3986 §3.2.2): a registered name or IPv4 address, or
/// a bracketed IP literal, then digits after a colon. Nothing that could read as a path, user
/// info or another field.
fn is_host(host: &[u8]) -> bool {
    let (name, port) = match host.iter().rposition(|&b| b == b':') {
        Some(colon) if !host[colon..].contains(&b']') => (&host[..colon], &host[colon + 1..]),
        _ => (host, &b""[..]),
    };
    let name_ok = match name {
        [b'[', literal @ .., b']'] => literal
            .iter()
            .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
        // No empty label (`a..example`, `.a`), as nginx refuses them: a trailing dot ends a
        // fully qualified name, more than one names nothing.
        _ => {
            name.iter().all(|&b| REG_NAME[usize::from(b)])
                && name.first() != Some(&b'.')
                && !name.windows(2).any(|pair| pair == b"..")
        }
    };
    !name.is_empty() && name_ok && port.iter().all(u8::is_ascii_digit)
}

/// The bytes of a registered name: unreserved, pct-encoded and sub-delims (RFC 3986 §3.2.2).
/// A table, as every request's Host goes through it.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut at = 0;
    while at < 256 {
        let b = at as u8;
        table[at] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        at += 1;
    }
    table
};

/// HTTP/2 clients send each cookie as a field of its own; towards HTTP/1.1 they must become one
/// field joined by "; " (RFC 9113 §8.2.3), or instances that read one Cookie line lose some.
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = values(headers, &header::COOKIE);
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for more in values(headers, &header::COOKIE).skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(more.as_bytes());
    }
    if let Ok(joined) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, joined);
    }
}

/// An answer to a request sent at `sent` counts for the instance's passive health: against it
/// when the upstream's `fail_on_status` lists its status (it still goes to the client, and as
/// an answer is never retried), for it otherwise.
fn judge_answer(
    instance: &Instance,
    config: &UpstreamConfig,
    status: http::StatusCode,
    sent: Instant,
) {
    instance.counters.answers[crate::metrics::status_index(status.as_u16())]
        .fetch_add(1, Ordering::Relaxed);
    if config.passive.fail_on_status.contains(&status.as_u16()) {
        instance.record_failed_answer(Instant::now(), config);
    } else {
        instance.record_success(sent);
    }
}

/// An answer's latency feeds the balancer; returns when the answer head came.
fn observe_latency(instance: &Instance, started: Instant, status: http::StatusCode) -> Instant {
    let now = Instant::now();
    instance.observe_latency(now - started, now, status.is_server_error());
    now
}

/// The 308 to the same URL on HTTPS (`https_port` left out when it is 443), built from the
/// host the request names once it passed the checks every request's host passes, else the
/// error (a 400, or the 405 of a method refused on any listener); `None` for a target that
/// names no resource (`OPTIONS *`), which `forward` answers.
fn https_redirect<B>(
    req: &Request<B>,
    https_port: u16,
) -> Option<Result<Response<GatewayBody>, ProxyError>> {
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if let Some(refusal) = refused_method(req.method()) {
        return Some(Err(refusal));
    }
    if !path.starts_with('/') {
        return None;
    }
    let host = match request_host(req.headers(), req.uri(), req.version()) {
        Ok((Some(host), _)) => host,
        Ok((None, _)) => {
            return Some(Err(ProxyError::BadRequest(
                "no Host to redirect to HTTPS (plain HTTP is redirected)",
            )))
        }
        Err(error) => return Some(Err(error)),
    };
    let name = host_without_port(host.to_str().unwrap_or_default());
    // An IP literal keeps its brackets in a URL.
    let name = if name.contains(':') {
        format!("[{name}]")
    } else {
        name.to_owned()
    };
    let location = if https_port == 443 {
        format!("https://{name}{path}")
    } else {
        format!("https://{name}:{https_port}{path}")
    };
    let location = HeaderValue::try_from(location).ok()?;
    let mut response = Response::new(GatewayBody::Full(None));
    *response.status_mut() = http::StatusCode::PERMANENT_REDIRECT;
    response.headers_mut().insert(header::LOCATION, location);
    Some(Ok(response))
}

/// The refusal of a method the gateway answers for every target, on any listener.
fn refused_method(method: &Method) -> Option<ProxyError> {
    match *method {
        // A reverse proxy never opens tunnels to where a client asks (no open proxy).
        Method::CONNECT => Some(ProxyError::MethodNotAllowed(
            "CONNECT: this is a reverse proxy",
        )),
        // An instance's echo would hand a page's script the cookies and credentials it cannot
        // read (cross-site tracing); nginx refuses TRACE too.
        Method::TRACE => Some(ProxyError::MethodNotAllowed(
            "TRACE: it would echo credentials back",
        )),
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::OPTIONS
        | Method::PATCH => None,
        // Methods are case-sensitive: `trace` is not TRACE to the gateway, but an instance that
        // reads methods without case would take it for TRACE (past the refusal above), or a
        // `head` for HEAD and frame its answer as the gateway does not. nginx answers 400 to
        // any method not in capitals; extension methods in other letters still pass.
        ref other if is_standard_method_in_other_case(other.as_str()) => Some(
            ProxyError::BadRequest("a standard method must be written in capitals"),
        ),
        _ => None,
    }
}

fn is_standard_method_in_other_case(method: &str) -> bool {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    STANDARD
        .iter()
        .any(|name| name.eq_ignore_ascii_case(method) && *name != method)
}

/// The Strict-Transport-Security field the gateway sets on answers to `client`: its `hsts`,
/// on secure connections only. One place decides it, as the answer's fields must go through
/// the header map wherever it is set (it replaces an instance's own).
fn hsts_for<'a>(runtime: &'a Runtime, client: &ClientAddr) -> Option<&'a HeaderValue> {
    let tls = runtime.config.tls.as_ref()?;
    tls.hsts.as_ref().filter(|_| client.secure)
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The consistent-hash key of a request; `None` (spread at random) when the key is absent.
/// The request's hash for `consistent_hash`; none (a random instance) when it lacks the key.
/// An empty value is no key, as nginx's `hash` takes it: every such request went to one
/// instance.
fn hash_key(key: &HashKey, parts: &Parts, client_ip: IpAddr) -> Option<u64> {
    let value = match key {
        HashKey::ClientIp => {
            return Some(match client_ip {
                std::net::IpAddr::V4(ip) => hash_bytes(&ip.octets()),
                std::net::IpAddr::V6(ip) => hash_bytes(&ip.octets()),
            })
        }
        HashKey::Header(name) => parts.headers.get(name).map(HeaderValue::as_bytes),
        HashKey::Cookie(name) => cookie_value(&parts.headers, name).map(str::as_bytes),
    };
    value.filter(|v| !v.is_empty()).map(hash_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_logged_with_their_target() {
        let logged = |target: &str| logged_target(&target.parse().unwrap()).to_owned();
        assert_eq!(logged("/a/b?x=1"), "/a/b?x=1");
        assert_eq!(logged("http://h/a?x=1"), "/a?x=1");
        assert_eq!(logged("elsewhere.example:443"), "elsewhere.example:443");
        assert_eq!(logged("*"), "*");
    }

    #[test]
    fn an_empty_hash_key_is_no_key() {
        let parts = |field: (&str, &str)| {
            let request = Request::builder()
                .header(field.0, field.1)
                .body(())
                .unwrap();
            request.into_parts().0
        };
        let client = IpAddr::from([127, 0, 0, 1]);
        let user = HashKey::Header(http::HeaderName::from_static("x-user"));
        let sid = HashKey::Cookie("sid".into());
        assert!(hash_key(&user, &parts(("x-user", "ann")), client).is_some());
        assert!(hash_key(&user, &parts(("x-user", "")), client).is_none());
        assert!(hash_key(&sid, &parts(("cookie", "a=1; sid=s1")), client).is_some());
        assert!(hash_key(&sid, &parts(("cookie", "a=1; sid=")), client).is_none());
        assert!(hash_key(&sid, &parts(("cookie", "a=1")), client).is_none());
    }

    fn head(version: Version, target: &str, hosts: &[&str]) -> Parts {
        let mut request = Request::builder().version(version).uri(target);
        for host in hosts {
            request = request.header(header::HOST, *host);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_are_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:5000".parse().unwrap();
        let client = ClientAddr::new(mapped, false);
        assert_eq!(client.addr, "192.0.2.7:5000".parse::<SocketAddr>().unwrap());
        assert_eq!(client.ip, "192.0.2.7");
    }

    #[test]
    fn malformed_http2_requests_are_named() {
        let v2 = Version::HTTP_2;
        assert_eq!(
            http2_malformation(&head(v2, "https://a.example/x", &[])),
            Ok(())
        );
        assert_eq!(
            http2_malformation(&head(v2, "https://a.example/x", &["A.example"])),
            Ok(())
        );
        assert!(http2_malformation(&head(v2, "https://a.example/x", &["b.example"])).is_err());
        assert!(http2_malformation(&head(v2, "*", &["a.example"])).is_err());
        let mut options = head(v2, "*", &["a.example"]);
        options.method = Method::OPTIONS;
        assert_eq!(http2_malformation(&options), Ok(()));
        assert_eq!(http2_malformation(&head(v2, "/x", &["a.example"])), Ok(()));
        let mut connect = head(v2, "a.example:443", &[]);
        connect.method = Method::CONNECT;
        assert_eq!(http2_malformation(&connect), Ok(()));
        for padded in [" a", "a ", "\tb"] {
            let mut parts = head(v2, "https://a.example/x", &[]);
            parts
                .headers
                .insert("x-padded", HeaderValue::from_str(padded).unwrap());
            assert!(http2_malformation(&parts).is_err(), "{padded:?}");
        }
    }

    #[test]
    fn the_host_comes_from_the_target_else_the_one_host_field() {
        let host = |version, target, hosts: &[&str]| {
            let parts = head(version, target, hosts);
            request_host(&parts.headers, &parts.uri, parts.version)
                .map(|(host, from_target)| {
                    (host.map(|h| h.to_str().unwrap().to_owned()), from_target)
                })
                .map_err(|error| error.to_string())
        };
        let v11 = Version::HTTP_11;
        assert_eq!(
            host(v11, "/", &["a.example:8080"]),
            Ok((Some("a.example:8080".into()), false))
        );
        // Absolute form: the target wins over Host (RFC 9112 §3.2.2).
        let absolute = host(v11, "http://b.example/x", &["a.example"]);
        assert_eq!(absolute, Ok((Some("b.example".into()), true)));
        // HTTP/1.0 may leave Host out; HTTP/2 names the host in :authority.
        assert_eq!(host(Version::HTTP_10, "/", &[]), Ok((None, false)));
        let h2 = host(Version::HTTP_2, "https://c.example/", &[]);
        assert_eq!(h2, Ok((Some("c.example".into()), true)));
        // An HTTP/2 request naming no host at all is refused, as an HTTP/1.1 one is.
        let nowhere = host(Version::HTTP_2, "/x", &[]).unwrap_err();
        assert!(nowhere.contains(":authority"), "{nowhere}");
        for (hosts, why) in [
            (&[][..], "without a Host"),
            (&["a.example", "b.example"][..], "more than one"),
            (&["a.example/x"][..], "not a host"),
            (&["user@a.example"][..], "not a host"),
            (&["a.example:80x"][..], "not a host"),
            (&[""][..], "not a host"),
        ] {
            let refused = host(v11, "/", hosts).unwrap_err();
            assert!(refused.contains(why), "{hosts:?}: {refused}");
        }
    }

    #[test]
    fn cookies_of_http2_clients_become_one_field() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        headers.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut headers);
        let cookies: Vec<_> = headers.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        let mut one = HeaderMap::new();
        one.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        join_cookies(&mut one);
        assert_eq!(one[header::COOKIE], "a=1; b=2");
    }

    #[test]
    fn hosts_are_names_or_literals_with_a_port() {
        for good in [
            "a",
            "a.example.",
            "xn--bcher-kva.example",
            "10.0.0.1:443",
            "[::1]",
            "[::1]:8080",
            "a_b%41",
        ] {
            assert!(is_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            ":80",
            "a b",
            "a\\b",
            "a/b",
            "a@b",
            "[::1",
            "::1",
            "a:b",
            "[::1]x",
            "a.example..",
            "a..example",
            ".a.example",
            "a.example...:80",
        ] {
            assert!(!is_host(bad.as_bytes()), "{bad}");
        }
    }
}
