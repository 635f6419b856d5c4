//! The admin listener: `/health` for load balancers, `/health/detailed`, and the JSON API that
//! lists upstreams, adds and drains instances and reloads the config. Everything but `/health`
//! sits behind basic auth when `admin.username`/`admin.password` are set.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::autoscale::ModeError;
use crate::config::{parse_addr, InstanceConfig};
use crate::proxy::upstream::{Instance, Upstream};
use crate::proxy::{Gateway, GatewayBody};

/// Serves the admin API until `stop` turns true.
pub async fn serve(gateway: Arc<Gateway>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(gateway.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    gateway: Arc<Gateway>,
    req: Request<Incoming>,
) -> Result<Response<GatewayBody>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/health" {
        return Ok(if gateway.is_draining() {
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "draining"}),
            )
        } else {
            reply(StatusCode::OK, json!({"status": "ok"}))
        });
    }
    let credentials = gateway.runtime.load().config.admin.credentials.clone();
    if let Some((user, password)) = credentials {
        if !authorized(req.headers().get(header::AUTHORIZATION), &user, &password) {
            let mut response = reply(StatusCode::UNAUTHORIZED, json!({"error": "unauthorized"}));
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"scalegate\""),
            );
            return Ok(response);
        }
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let response = match (&method, segments.as_slice()) {
        (&Method::GET, ["health", "detailed"]) => health_detailed(&gateway),
        (&Method::GET, ["api", "upstreams"]) => {
            let runtime = gateway.runtime.load();
            let now = Instant::now();
            let upstreams: Vec<Value> = runtime
                .upstreams
                .iter()
                .map(|u| upstream_json(u, now))
                .collect();
            reply(StatusCode::OK, json!({ "upstreams": upstreams }))
        }
        (&Method::POST, ["api", "upstreams", name, "instances"]) => {
            let name = name.to_string();
            match read_json(req).await {
                Ok(body) => add_instance(&gateway, &name, &body),
                Err(response) => response,
            }
        }
        (&Method::DELETE, ["api", "upstreams", name, "instances", addr]) => {
            drain_instance(&gateway, name, addr)
        }
        (&Method::GET, ["api", "autoscale"]) => reply(StatusCode::OK, gateway.autoscale.status()),
        (&Method::POST, ["api", "autoscale", name]) => {
            let name = name.to_string();
            match read_json(req).await {
                Ok(body) => set_autoscale_mode(&gateway, &name, &body),
                Err(response) => response,
            }
        }
        (&Method::POST, ["api", "reload"]) => match gateway.reload() {
            Ok(()) => reply(StatusCode::OK, json!({"reloaded": true})),
            Err(errors) => {
                tracing::error!("reload refused, the running configuration stays:\n{errors}");
                let errors: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
                reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"reloaded": false, "errors": errors}),
                )
            }
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"error": "not found", "path": path}),
        ),
    };
    Ok(response)
}

fn health_detailed(gateway: &Gateway) -> Response<GatewayBody> {
    let runtime = gateway.runtime.load();
    let now = Instant::now();
    let upstreams: Vec<Value> = runtime
        .upstreams
        .iter()
        .map(|u| upstream_json(u, now))
        .collect();
    let serving = runtime.upstreams.iter().all(|u| {
        u.set
            .load()
            .instances
            .iter()
            .any(|i| i.is_available(now) && !i.is_draining())
    });
    let status = if gateway.is_draining() {
        "draining"
    } else if serving {
        "ok"
    } else {
        "degraded"
    };
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply(code, json!({ "status": status, "upstreams": upstreams }))
}

fn upstream_json(upstream: &Upstream, now: Instant) -> Value {
    let set = upstream.set.load();
    let instances: Vec<Value> = set
        .instances
        .iter()
        .map(|i| instance_json(i, now))
        .collect();
    json!({
        "name": upstream.config.name,
        "strategy": format!("{:?}", upstream.config.strategy),
        "instances": instances,
    })
}

fn instance_json(instance: &Instance, now: Instant) -> Value {
    let counts = instance.health_counts();
    json!({
        "addr": instance.addr_text,
        "state": instance.state_name(now),
        "weight": instance.weight,
        "backup": instance.backup,
        "dynamic": instance.dynamic,
        "in_flight": instance.in_flight.load(Ordering::Relaxed),
        "requests": instance.requests.load(Ordering::Relaxed),
        "failures": instance.failures.load(Ordering::Relaxed),
        "latency_ms": instance.latency().as_secs_f64() * 1000.0,
        "idle_connections": instance.pool.idle_count(),
        "consecutive_ok": counts.consecutive_ok,
        "consecutive_fail": counts.consecutive_fail,
        "last_check": *instance.last_check.lock().expect("last check lock"),
    })
}

fn add_instance(gateway: &Gateway, name: &str, body: &Value) -> Response<GatewayBody> {
    let Some(upstream) = gateway.upstream(name) else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no upstream named `{name}`")}),
        );
    };
    let Some(addr) = body.get("addr").and_then(Value::as_str) else {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "body needs \"addr\": \"IP:PORT\""}),
        );
    };
    let addr = match parse_addr(addr) {
        Ok(addr) => addr,
        Err(err) => return reply(StatusCode::BAD_REQUEST, json!({ "error": err })),
    };
    let weight = body.get("weight").and_then(Value::as_u64).unwrap_or(1);
    if !(1..=1000).contains(&weight) {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "weight must be between 1 and 1000"}),
        );
    }
    let config = InstanceConfig {
        addr,
        weight: weight as u32,
        backup: body.get("backup").and_then(Value::as_bool).unwrap_or(false),
    };
    if upstream.add_instance(&config) {
        tracing::info!(upstream = name, instance = %addr, "instance added");
        reply(StatusCode::CREATED, json!({"added": addr.to_string()}))
    } else {
        reply(
            StatusCode::CONFLICT,
            json!({"error": format!("{addr} is already in `{name}`")}),
        )
    }
}

/// Marks the instance draining (no new requests) and removes it once its in-flight requests
/// finished or `drain_timeout` passed.
fn drain_instance(gateway: &Gateway, name: &str, addr: &str) -> Response<GatewayBody> {
    let Some(upstream) = gateway.upstream(name) else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no upstream named `{name}`")}),
        );
    };
    let instance = parse_addr(addr).ok().and_then(|addr| upstream.find(addr));
    let Some(instance) = instance else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no instance {addr} in `{name}`")}),
        );
    };
    instance.start_draining();
    let timeout = upstream.config.drain_timeout;
    tracing::info!(upstream = name, instance = %instance.addr, "draining instance");
    tokio::spawn(async move { upstream.drain(&instance, timeout).await });
    reply(StatusCode::ACCEPTED, json!({"draining": addr}))
}

/// Pins the count of an autoscaled upstream, pauses or resumes its autoscaler.
fn set_autoscale_mode(gateway: &Gateway, name: &str, body: &Value) -> Response<GatewayBody> {
    let mode = match crate::autoscale::parse_mode(body) {
        Ok(mode) => mode,
        Err(err) => return reply(StatusCode::BAD_REQUEST, json!({ "error": err })),
    };
    match gateway.autoscale.set_mode(name, mode) {
        Ok(()) => reply(
            StatusCode::ACCEPTED,
            json!({ "upstream": name, "mode": mode }),
        ),
        Err(ModeError::NotAutoscaled) => reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no autoscaled upstream named `{name}`")}),
        ),
        Err(err) => reply(StatusCode::BAD_REQUEST, json!({ "error": err.to_string() })),
    }
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Response<GatewayBody>> {
    let bytes: Bytes = Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|_| reply(StatusCode::BAD_REQUEST, json!({"error": "unreadable body"})))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|err| {
        reply(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("invalid JSON: {err}")}),
        )
    })
}

/// Basic auth check; compares without early exit so timing does not reveal the password.
fn authorized(value: Option<&HeaderValue>, user: &str, password: &str) -> bool {
    let Some(encoded) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let expected = format!("{user}:{password}");
    constant_time_eq(&decoded, expected.as_bytes())
}

/// Equality whose time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

fn reply(status: StatusCode, body: Value) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::full(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth() {
        let good = HeaderValue::from_static("Basic YWRtaW46c2VjcmV0"); // admin:secret
        assert!(authorized(Some(&good), "admin", "secret"));
        assert!(!authorized(Some(&good), "admin", "secreT"));
        assert!(!authorized(None, "admin", "secret"));
        assert!(!authorized(
            Some(&HeaderValue::from_static("Bearer x")),
            "admin",
            "secret"
        ));
    }

    #[test]
    fn constant_time_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
