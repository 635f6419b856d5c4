//! The per-request pipeline: validate the head, route, pick an instance, send, retry what may
//! be retried, and stream the answer back.
//!
//! Retry rules: a request that never reached an instance (connect failure, or hyper handing the
//! request back unsent) is retried for every method; once sent, only idempotent requests
//! without a body are retried (the body is gone); nothing is retried after response bytes came
//! back, nor after a timeout. Every retry spends the upstream's retry budget.

use std::convert::Infallible;
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{BodyTooLarge, ForwardBody, GatewayBody, UpstreamBody};
use super::error::ProxyError;
use super::headers::{
    check_framing, forward_request_headers, is_sane_request_id, new_request_id, strip_hop_by_hop,
    X_REQUEST_ID,
};
use super::router::{host_without_port, match_route};
use super::upstream::{InFlightGuard, Instance, NoInstance, Sender, Upstream};
use super::{Gateway, Runtime};
use crate::balance::{hash_bytes, HashKey, Strategy};

/// Entry point for one client request; never fails (errors become responses).
pub async fn handle(
    gateway: Arc<Gateway>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<GatewayBody>, Infallible> {
    let started = Instant::now();
    let request_id = match req.headers().get(&X_REQUEST_ID) {
        Some(id) if is_sane_request_id(id) => id.clone(),
        _ => new_request_id(
            gateway.id_prefix,
            gateway.request_seq.fetch_add(1, Ordering::Relaxed),
        ),
    };
    let runtime = gateway.runtime.load_full();
    let access_log = runtime
        .config
        .server
        .access_log
        .then(|| (req.method().clone(), req.uri().path().to_owned()));
    let (response, upstream) = match forward(&runtime, req, peer, &request_id).await {
        Ok((response, upstream)) => (response, Some(upstream)),
        Err((error, upstream)) => {
            // Overload refusals are expected under load; logging each would add to it.
            if error.status().is_server_error() && !matches!(error, ProxyError::Overloaded { .. }) {
                tracing::warn!(request_id = ?request_id, %error, "request failed");
            }
            (error.response(&request_id), upstream)
        }
    };
    if let Some((method, path)) = access_log {
        tracing::info!(
            target: "access",
            method = %method,
            path = %path,
            status = response.status().as_u16(),
            upstream = upstream.as_ref().map_or("-", |u| u.config.name.as_str()),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            request_id = request_id.to_str().unwrap_or_default(),
            client = %peer.ip(),
        );
    }
    Ok(response)
}

type Forwarded = (Response<GatewayBody>, Arc<Upstream>);
type Failed = (ProxyError, Option<Arc<Upstream>>);

async fn forward(
    runtime: &Runtime,
    req: Request<Incoming>,
    peer: SocketAddr,
    request_id: &HeaderValue,
) -> Result<Forwarded, Failed> {
    let (mut parts, body) = req.into_parts();
    let max_body = runtime.config.server.max_body;
    let declared = check_framing(&parts.headers)
        .map_err(|err| (ProxyError::BadRequest(err.reason()), None))?;
    if declared.is_some_and(|length| length > max_body) {
        return Err((ProxyError::BodyTooLarge, None));
    }
    let host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let host_name = host
        .as_ref()
        .and_then(|h| h.to_str().ok())
        .map(host_without_port);
    let route = match_route(&runtime.config.routes, host_name, parts.uri.path())
        .ok_or((ProxyError::NoRoute, None))?;
    let upstream = runtime.route_upstream(route).clone();
    // Held until the response head is back: the concurrency slots live in `admitted`.
    let admitted = runtime
        .admission
        .admit(route, &parts.headers, peer.ip())
        .await
        .map_err(|error| (error, Some(upstream.clone())))?;
    let hash = match &upstream.config.strategy {
        Strategy::ConsistentHash(key) => hash_key(key, &parts, peer),
        _ => None,
    };

    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    }
    parts.version = Version::HTTP_11;
    if let Some(host) = &host {
        if !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, host.clone());
        }
    }
    forward_request_headers(&mut parts.headers, peer.ip(), "http", host, request_id);

    let has_body = !body.is_end_stream();
    let config = &upstream.config;
    // A body-less idempotent request can be sent again even after an instance took it.
    let replay = (!has_body && is_idempotent(&parts.method) && config.retries > 0).then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });
    let forward_body = if has_body {
        ForwardBody::stream(body, max_body)
    } else {
        ForwardBody::Empty
    };
    let mut request = Some(Request::from_parts(parts, forward_body));
    upstream.retry_budget.deposit();

    let mut tried: u64 = 0;
    let mut attempts: u32 = 0;
    let mut last_error = ProxyError::NoHealthyInstance;
    loop {
        let set = upstream.set.load_full();
        let (index, instance) = match upstream.pick(&set, tried, hash, Instant::now()) {
            Ok(picked) => picked,
            Err(NoInstance::NoneHealthy) if attempts == 0 => {
                return Err((ProxyError::NoHealthyInstance, Some(upstream)))
            }
            Err(_) => return Err((last_error, Some(upstream))),
        };
        if index < 64 {
            tried |= 1 << index;
        }
        attempts += 1;
        let req = match request.take() {
            Some(req) => req,
            None => match &replay {
                Some((method, uri, headers)) => {
                    let mut req = Request::new(ForwardBody::Empty);
                    *req.method_mut() = method.clone();
                    *req.uri_mut() = uri.clone();
                    *req.headers_mut() = headers.clone();
                    req
                }
                None => return Err((last_error, Some(upstream))),
            },
        };
        let guard = InFlightGuard::enter(instance.clone());
        match send(&instance, req, config.response_timeout).await {
            Ok((response, sender)) => {
                let (mut head, incoming) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                head.headers
                    .insert(X_REQUEST_ID.clone(), request_id.clone());
                admitted.add_headers(&mut head.headers);
                let body = GatewayBody::Upstream(UpstreamBody::new(incoming, sender, guard));
                return Ok((Response::from_parts(head, body), upstream));
            }
            Err(failure) => {
                drop(guard);
                let now = Instant::now();
                let retry_ok = attempts <= config.retries;
                match failure {
                    Attempt::NotSent(req, reason) => {
                        instance.record_failure(now, config);
                        last_error = ProxyError::InstanceFailed(reason);
                        request = Some(*req);
                    }
                    Attempt::Sent(reason) => {
                        instance.record_failure(now, config);
                        last_error = ProxyError::InstanceFailed(reason);
                        if replay.is_none() {
                            return Err((last_error, Some(upstream)));
                        }
                    }
                    Attempt::Timeout => {
                        instance.record_failure(now, config);
                        return Err((ProxyError::InstanceTimeout, Some(upstream)));
                    }
                    Attempt::BodyTooLarge => {
                        return Err((ProxyError::BodyTooLarge, Some(upstream)))
                    }
                    Attempt::ClientBody(reason) => {
                        return Err((ProxyError::InstanceFailed(reason), Some(upstream)))
                    }
                }
                if !retry_ok || !upstream.retry_budget.try_withdraw() {
                    return Err((last_error, Some(upstream)));
                }
                tracing::debug!(instance = %instance.addr, attempt = attempts, "retrying on another instance");
            }
        }
    }
}

/// How one attempt on one instance failed.
enum Attempt {
    /// The request never reached the instance; here it is back, untouched.
    NotSent(Box<Request<ForwardBody>>, String),
    /// The instance may have seen the request.
    Sent(String),
    Timeout,
    BodyTooLarge,
    /// Reading the client's body failed (client went away): not the instance's fault.
    ClientBody(String),
}

async fn send(
    instance: &Instance,
    req: Request<ForwardBody>,
    timeout: std::time::Duration,
) -> Result<(Response<Incoming>, Sender), Attempt> {
    let mut sender = match instance.pool.checkout().await {
        Ok(sender) => sender,
        Err(err) => return Err(Attempt::NotSent(Box::new(req), err.to_string())),
    };
    let started = Instant::now();
    match tokio::time::timeout(timeout, sender.try_send_request(req)).await {
        Err(_) => Err(Attempt::Timeout),
        Ok(Ok(response)) => {
            instance.observe_latency(started.elapsed(), Instant::now());
            Ok((response, sender))
        }
        Ok(Err(mut err)) => {
            if let Some(req) = err.take_message() {
                return Err(Attempt::NotSent(
                    Box::new(req),
                    err.into_error().to_string(),
                ));
            }
            let err = err.into_error();
            let mut source = err.source();
            while let Some(cause) = source {
                if cause.is::<BodyTooLarge>() {
                    return Err(Attempt::BodyTooLarge);
                }
                if cause.is::<hyper::Error>() && err.is_user() {
                    return Err(Attempt::ClientBody(cause.to_string()));
                }
                source = cause.source();
            }
            Err(Attempt::Sent(err.to_string()))
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The consistent-hash key of a request; `None` (spread at random) when the key is absent.
fn hash_key(key: &HashKey, parts: &Parts, peer: SocketAddr) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(match peer.ip() {
            std::net::IpAddr::V4(ip) => hash_bytes(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash_bytes(&ip.octets()),
        }),
        HashKey::Header(name) => parts.headers.get(name).map(|v| hash_bytes(v.as_bytes())),
        HashKey::Cookie(name) => parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash_bytes(v.as_bytes())),
    }
}
