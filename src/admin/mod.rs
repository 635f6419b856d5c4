//! The admin listener: `/health` for load balancers, `/health/detailed` and `/health/redis`,
//! `/metrics` for Prometheus, the dashboard (`/`) with its live stats (`/api/stats`,
//! `/api/stream`), and the JSON API that lists upstreams, adds and drains instances, reloads the
//! config, reports and purges the cache, reports rate limits and steers the autoscalers.
//! Everything but `/health` and `/health/redis` sits behind basic auth when
//! `admin.username`/`admin.password` are set.

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
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::auth::constant_time_eq;
use crate::autoscale::ModeError;
use crate::cache::Purge;
use crate::config::{parse_addr, InstanceConfig};
use crate::metrics::{live, InstanceSample};
use crate::proxy::connections::AcceptFailures;
use crate::proxy::upstream::{Instance, Upstream};
use crate::proxy::{Gateway, GatewayBody};

/// Time an admin client has to send a request head (and an idle keep-alive connection is
/// kept), and a request body.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const ADMIN_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Open admin connections at most: the port is for operators, dashboards and scrapers, and
/// one that any client may reach must not let them hold file descriptors without bound.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// Serves the admin API until `stop` turns true.
pub async fn serve(gateway: Arc<Gateway>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    tokio::spawn(sample_stats(gateway.clone(), stop.clone()));
    let mut accept_failures = AcceptFailures::default();
    let open = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        if let Err(failed) = &accepted {
            crate::proxy::shed_idle_on_shortage(&gateway.runtime.load(), failed);
        }
        let Some((stream, peer)) = accept_failures.accepted("admin", accepted).await else {
            continue;
        };
        // Past the cap the connection is closed at once.
        let Ok(slot) = open.clone().try_acquire_owned() else {
            continue;
        };
        let gateway = gateway.clone();
        tokio::spawn(async move {
            // What a request changes is logged with who asked (the span's `client`).
            let service = service_fn(move |req| {
                let span = tracing::info_span!("admin", client = %peer);
                handle(gateway.clone(), req).instrument(span)
            });
            // HTTP/1.1 alone: browsers, scrapers and scripts speak it to a plain-HTTP port,
            // and hyper's HTTP/2 has no time limit on a connection that opens no stream. A
            // client that never finishes its head, or idles, is not kept for good.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

async fn handle(
    gateway: Arc<Gateway>,
    req: Request<Incoming>,
) -> Result<Response<GatewayBody>, Infallible> {
    let path = req.uri().path().to_string();
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if (path == "/health" || path == "/health/redis") && !read {
        // Open like their answers: 405 needs no credentials.
        return Ok(method_not_allowed(req.method(), &path, "GET, HEAD"));
    }
    if path == "/health/redis" {
        // Open like /health: load balancers and monitors probe it.
        let limiter = gateway.limiter.clone();
        let (mut healthy, mut body) = limiter.redis_health().await;
        // The shared cache's own link, when the cache uses Redis.
        let runtime = gateway.runtime.load_full();
        if let Some(tier) = &runtime.cache.shared {
            let (up, cache) = tier.health().await;
            healthy &= up;
            body["cache"] = cache;
            // The top line says it too: a monitor may read it rather than the code.
            if !up {
                body["status"] = "down".into();
            }
        }
        let status = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return Ok(reply(status, body));
    }
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
    if !read {
        if let Some(refusal) = cross_site_refusal(req.headers(), credentials.is_some()) {
            tracing::warn!(path, refusal, "admin change refused");
            return Ok(reply(StatusCode::FORBIDDEN, json!({"error": refusal})));
        }
    }
    if let Some((user, password)) = credentials {
        let given = req.headers().get(header::AUTHORIZATION);
        if !authorized(given, &user, &password) {
            // A first request without credentials is how a browser learns it needs them;
            // wrong ones are worth an operator's eye, as nginx logs them.
            if given.is_some() {
                tracing::warn!(path, "admin credentials refused");
            }
            let mut response = reply(StatusCode::UNAUTHORIZED, json!({"error": "unauthorized"}));
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"scalegate\""),
            );
            return Ok(response);
        }
    }
    // Segments are percent-decoded: an instance address may come as `127.0.0.1%3A3001` or
    // `%5B::1%5D:3001`, and an upstream name may hold any character.
    let decoded: Vec<std::borrow::Cow<str>> = path
        .trim_matches('/')
        .split('/')
        .map(|segment| percent_encoding::percent_decode_str(segment).decode_utf8_lossy())
        .collect();
    let segments: Vec<&str> = decoded.iter().map(AsRef::as_ref).collect();
    // HEAD is GET without the body (hyper leaves the body out).
    let method = match req.method() {
        &Method::HEAD => Method::GET,
        other => other.clone(),
    };
    let response = match (&method, segments.as_slice()) {
        (&Method::GET, [""] | ["dashboard"]) => dashboard(),
        (&Method::GET, ["api", "stats"]) => reply(
            StatusCode::OK,
            json!({"latest": *gateway.live.latest(), "history": gateway.live.history()}),
        ),
        (&Method::GET, ["api", "stream"]) => stats_stream(&gateway),
        (&Method::GET, ["health", "detailed"]) => health_detailed(&gateway),
        (&Method::GET, ["metrics"]) => {
            let openmetrics = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(prefers_openmetrics);
            metrics(&gateway, openmetrics)
        }
        (&Method::GET, ["api", "cache", "stats"]) => cache_stats(&gateway),
        (&Method::DELETE, ["api", "cache"]) => purge_cache(&gateway, req.uri().query()).await,
        (&Method::GET, ["api", "ratelimit"]) => {
            let runtime = gateway.runtime.load();
            let mut report = gateway.limiter.report();
            report["rules"] = runtime.admission.rules_report();
            report["concurrency"] = runtime.admission.concurrency_report();
            reply(StatusCode::OK, report)
        }
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
                Ok(body) => {
                    let _serialized = gateway.hold_reloads().await;
                    add_instance(&gateway, &name, &body)
                }
                Err(response) => response,
            }
        }
        (&Method::DELETE, ["api", "upstreams", name, "instances", addr]) => {
            let _serialized = gateway.hold_reloads().await;
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
        (&Method::POST, ["api", "reload"]) => match gateway.reload_aside().await {
            Ok(()) => reply(StatusCode::OK, json!({"reloaded": true})),
            Err(errors) => {
                crate::proxy::log_refused_reload(&errors);
                let errors: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
                reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"reloaded": false, "errors": errors}),
                )
            }
        },
        _ => match allowed_methods(&segments) {
            Some(allow) => method_not_allowed(req.method(), &path, allow),
            None => reply(
                StatusCode::NOT_FOUND,
                json!({"error": "not found", "path": path}),
            ),
        },
    };
    Ok(response)
}

/// 405 for `method` on a known `path`, with `Allow`.
fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Response<GatewayBody> {
    let mut response = reply(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({"error": format!("{method} is not allowed here; use {allow}"), "path": path}),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// The methods a known admin path answers to (for 405's `Allow`); `None` for unknown paths.
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    Some(match segments {
        [""] | ["dashboard"] | ["health", "detailed"] | ["metrics"] => "GET, HEAD",
        ["api", "stats" | "stream" | "upstreams" | "ratelimit" | "autoscale"] => "GET, HEAD",
        ["api", "cache", "stats"] => "GET, HEAD",
        ["api", "cache"] => "DELETE",
        ["api", "upstreams", _, "instances"] | ["api", "autoscale", _] | ["api", "reload"] => {
            "POST"
        }
        ["api", "upstreams", _, "instances", _] => "DELETE",
        _ => return None,
    })
}

/// The dashboard page; its script and styles are inside it, so it works with no internet.
fn dashboard() -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::full(Bytes::from_static(include_bytes!(
        "dashboard.html"
    ))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// `GET /api/stream`: server-sent events, one `StatsPoint` a second, until the client leaves.
fn stats_stream(gateway: &Gateway) -> Response<GatewayBody> {
    let Some((mut updates, place)) = gateway.live.subscribe() else {
        let error = format!(
            "{} live streams are open already: close one (the admin port's connections, /health's included, are capped)",
            crate::metrics::live::MAX_STREAMS
        );
        // And the connection goes: kept open, it would hold the admin place it took.
        let mut refused = reply(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": error }));
        refused
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return refused;
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let _place = place;
        loop {
            let event = format!("data: {}\n\n", json!(*updates.borrow_and_update().clone()));
            if tx.send(Bytes::from(event)).await.is_err() || updates.changed().await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(GatewayBody::Channel(rx));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Makes a dashboard point every second from the gateway's counters, until `stop`.
async fn sample_stats(gateway: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(live::INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut before = (Instant::now(), read_totals(&gateway));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => break,
        }
        let now = (Instant::now(), read_totals(&gateway));
        let unix_ms = crate::clock::unix_ms_now();
        gateway.live.publish(live::stats_point(
            &before.1,
            &now.1,
            now.0 - before.0,
            unix_ms,
        ));
        before = now;
    }
}

fn read_totals(gateway: &Gateway) -> live::Totals {
    let runtime = gateway.runtime.load();
    let mut totals = live::Totals {
        in_flight: gateway.metrics.in_flight(),
        cache: runtime.cache.sample(),
        instances: instance_samples(gateway),
        limited: gateway.limiter.limited_requests.load(Ordering::Relaxed),
        recorded: runtime.config.server.metrics,
        ..live::Totals::default()
    };
    for (_, _, stats) in gateway.metrics.routes() {
        for (slot, count) in totals.by_class.iter_mut().zip(stats.by_status_class()) {
            *slot += count;
        }
        totals.histogram.add(&stats.duration.snapshot());
    }
    totals
}

/// `GET /metrics`: the Prometheus exposition of everything the gateway counts, as OpenMetrics
/// when the scraper asks for it, else the classic text format.
fn metrics(gateway: &Gateway, openmetrics: bool) -> Response<GatewayBody> {
    let instances = instance_samples(gateway);
    let per_request = gateway.runtime.load().config.server.metrics;
    let mut families = crate::metrics::core_families(&gateway.metrics, &instances, per_request);
    families.extend(crate::metrics::cache_families(
        &gateway.runtime.load().cache.sample(),
    ));
    let connections = &gateway.connections;
    families.extend(crate::metrics::connection_families(
        connections.open(),
        connections.refused_total.load(Ordering::Relaxed),
        connections.refused_per_ip.load(Ordering::Relaxed),
    ));
    families.extend(crate::metrics::rate_limit_families(
        &gateway.limiter.rule_counters(),
        gateway.limiter.report()["redis_up"].as_bool(),
    ));
    families.extend(crate::metrics::autoscale_families(
        &gateway.autoscale.status(),
    ));
    families.extend(crate::metrics::reload_families(&gateway.metrics.reloads));
    let runtime = gateway.runtime.load();
    let certificates = runtime
        .config
        .tls
        .as_ref()
        .map_or(&[][..], |tls| &tls.certificates);
    families.extend(crate::metrics::tls_families(
        &gateway.metrics.tls_handshake_failures,
        certificates,
    ));
    let text = crate::metrics::render(families);
    let (text, content_type) = if openmetrics {
        (
            text,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            crate::metrics::to_prometheus_text(&text),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    let mut response = Response::new(GatewayBody::full(text));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Whether an `Accept` field prefers OpenMetrics to the classic text format: by quality
/// (RFC 9110 §12.5.1; `q=0` refuses), media types without case; a tie goes to the classic
/// format, the default.
fn prefers_openmetrics(accept: &str) -> bool {
    let (mut openmetrics, mut text) = (0.0f64, 0.0f64);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim();
        let quality = parts
            .filter_map(|param| param.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, q)| q.trim().parse::<f64>().ok())
            .unwrap_or(1.0);
        if media.eq_ignore_ascii_case("application/openmetrics-text") {
            openmetrics = openmetrics.max(quality);
        } else if ["text/plain", "text/*", "*/*"]
            .iter()
            .any(|m| media.eq_ignore_ascii_case(m))
        {
            text = text.max(quality);
        }
    }
    openmetrics > 0.0 && openmetrics > text
}

/// Every instance of every upstream, as metrics and the dashboard see it.
fn instance_samples(gateway: &Gateway) -> Vec<InstanceSample> {
    let runtime = gateway.runtime.load();
    let now = Instant::now();
    let mut samples = Vec::new();
    for upstream in &runtime.upstreams {
        for instance in &upstream.set.load().instances {
            samples.push(instance_sample(&upstream.config.name, instance, now));
        }
    }
    samples
}

fn instance_sample(upstream: &str, instance: &Instance, now: Instant) -> InstanceSample {
    InstanceSample {
        upstream: upstream.to_string(),
        instance: instance.addr_text.clone(),
        state: instance.state_name(now),
        requests: instance.counters.requests.load(Ordering::Relaxed),
        failures: instance.counters.failures.load(Ordering::Relaxed),
        in_flight: instance.counters.in_flight.load(Ordering::Relaxed),
        ejections: instance.counters.ejections.load(Ordering::Relaxed),
        retries: instance.counters.retries.load(Ordering::Relaxed),
        resends: instance.counters.resends.load(Ordering::Relaxed),
        broken_answers: instance.counters.broken_answers.load(Ordering::Relaxed),
        answers: instance
            .counters
            .answers
            .each_ref()
            .map(|count| count.load(Ordering::Relaxed)),
        latency_seconds: instance.latency().as_secs_f64(),
    }
}

fn health_detailed(gateway: &Gateway) -> Response<GatewayBody> {
    let runtime = gateway.runtime.load();
    let now = Instant::now();
    let upstreams: Vec<Value> = runtime
        .upstreams
        .iter()
        .map(|u| upstream_json(u, now))
        .collect();
    let mut components: Vec<Component> = runtime
        .upstreams
        .iter()
        .map(|u| upstream_component(u, now))
        .collect();
    let limits = gateway.limiter.report();
    if let Some(up) = limits["redis_up"].as_bool() {
        // Without Redis the gateway still decides (on_redis_error), so it is degraded, not down.
        components.push(Component {
            name: "redis".into(),
            kind: "rate_limit_store",
            status: if up { "ok" } else { "degraded" },
            reason: if up {
                "limits shared through Redis".into()
            } else {
                "Redis does not answer: on_redis_error decides".into()
            },
        });
    }
    if runtime.cached_routes().next().is_some() {
        let cache = runtime.cache.sample();
        let held = format!(
            "{} entries, {} of {} bytes",
            cache.entries, cache.bytes, cache.max_bytes
        );
        // Without Redis each replica serves from its memory: degraded, as the limits are.
        let shared_down = runtime.cache.shared.as_ref().is_some_and(|s| !s.is_up());
        components.push(Component {
            name: "cache".into(),
            kind: "cache",
            status: if shared_down { "degraded" } else { "ok" },
            reason: if shared_down {
                format!("{held}; Redis does not answer: the shared tier is out, memory only")
            } else {
                held
            },
        });
    }
    let autoscale = gateway.autoscale.status();
    for upstream in autoscale["upstreams"].as_array().into_iter().flatten() {
        let (current, desired) = (&upstream["current"], &upstream["desired"]);
        let ready = &upstream["ready"];
        components.push(Component {
            name: format!(
                "autoscale:{}",
                upstream["upstream"].as_str().unwrap_or_default()
            ),
            kind: "autoscaler",
            // Instances it runs that do not serve (starting, crashing, failing their checks)
            // leave it short as surely as a count below the desired one.
            status: if current == desired && ready == current {
                "ok"
            } else {
                "degraded"
            },
            reason: format!(
                "{ready} of {current} instances ready, working toward {desired} ({})",
                upstream["mode"]
            ),
        });
    }
    let status = overall_status(gateway.is_draining(), &components);
    let code = match status {
        "ok" | "degraded" => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    reply(
        code,
        json!({
            "status": status,
            "components": components,
            "upstreams": upstreams,
            "rate_limit": limits,
        }),
    )
}

/// One part of the gateway in `/health/detailed`: `ok`, `degraded` (serving with less than it
/// should) or `down` (not serving), with the reason in words.
#[derive(Debug, Clone, serde::Serialize)]
struct Component {
    name: String,
    kind: &'static str,
    status: &'static str,
    reason: String,
}

fn upstream_component(upstream: &Upstream, now: Instant) -> Component {
    let set = upstream.set.load();
    let serving: Vec<&Arc<Instance>> = set.instances.iter().filter(|i| !i.is_draining()).collect();
    let up = serving.iter().filter(|i| i.is_available(now)).count();
    // Instances out by passive checks alone are still tried when no other is available.
    let status = match up {
        0 if !serving.iter().any(|i| i.passes_active_checks()) => "down",
        n if n < serving.len() => "degraded",
        _ => "ok",
    };
    Component {
        name: upstream.config.name.clone(),
        kind: "upstream",
        status,
        reason: format!("{up} of {} instances healthy", serving.len()),
    }
}

/// `draining` while shutting down; `down` (503) when no upstream can serve; `degraded` when
/// any component is not `ok`: one pool down leaves the others' routes serving, and a monitor
/// or load balancer probing this must not take the whole gateway out for it.
fn overall_status(draining: bool, components: &[Component]) -> &'static str {
    if draining {
        return "draining";
    }
    let mut upstreams = components
        .iter()
        .filter(|c| c.kind == "upstream")
        .peekable();
    if upstreams.peek().is_some() && upstreams.all(|c| c.status == "down") {
        return "down";
    }
    if components.iter().any(|c| c.status != "ok") {
        "degraded"
    } else {
        "ok"
    }
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
        "strategy": upstream.config.strategy.name(),
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
        "dynamic": instance.is_dynamic(),
        "in_flight": instance.counters.in_flight.load(Ordering::Relaxed),
        "requests": instance.counters.requests.load(Ordering::Relaxed),
        "failures": instance.counters.failures.load(Ordering::Relaxed),
        "broken_answers": instance.counters.broken_answers.load(Ordering::Relaxed),
        "resends": instance.counters.resends.load(Ordering::Relaxed),
        "answers": crate::metrics::STATUS_CLASSES
            .iter()
            .zip(&instance.counters.answers)
            .map(|(class, count)| ((*class).to_string(), json!(count.load(Ordering::Relaxed))))
            .collect::<serde_json::Map<String, Value>>(),
        "latency_ms": instance.latency().as_secs_f64() * 1000.0,
        "idle_connections": instance.pool.idle_count(),
        "consecutive_ok": counts.consecutive_ok,
        "consecutive_fail": counts.consecutive_fail,
        "last_check": *instance.last_check.lock().expect("last check lock"),
    })
}

/// Called with reloads held off.
fn add_instance(gateway: &Gateway, name: &str, body: &Value) -> Response<GatewayBody> {
    let Some(upstream) = gateway.upstream(name) else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no upstream named `{name}`")}),
        );
    };
    // Typed, so `"weight": "5"` or `"backup": "yes"` is refused rather than read as a default.
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewInstance {
        addr: String,
        #[serde(default = "one")]
        weight: u32,
        #[serde(default)]
        backup: bool,
    }
    fn one() -> u32 {
        1
    }
    // An object only: serde would also read `["IP:PORT", 1, false]` as the struct.
    let parsed = match body {
        Value::Object(_) => <NewInstance as serde::Deserialize>::deserialize(body),
        _ => Err(serde::de::Error::custom("not a JSON object")),
    };
    let new = match parsed {
        Ok(new) => new,
        Err(err) => {
            let error = format!("body must be {{\"addr\": \"IP:PORT\", \"weight\": 1-1000, \"backup\": bool}}: {err}");
            return reply(StatusCode::BAD_REQUEST, json!({ "error": error }));
        }
    };
    let config = match InstanceConfig::parse(&new.addr, new.weight, new.backup) {
        // `https://` only restates the upstream's own TLS.
        Ok((config, https)) if !https || upstream.config.tls.is_some() => config,
        Ok(_) => {
            let error = format!("`{}`: upstream `{name}` does not speak TLS", new.addr);
            return reply(StatusCode::BAD_REQUEST, json!({ "error": error }));
        }
        Err(problems) => {
            let error: Vec<String> = problems
                .into_iter()
                .map(|(field, message)| match field.strip_prefix('.') {
                    Some(field) => format!("{field} {message}"),
                    None => message,
                })
                .collect();
            let error = error.join("; ");
            return reply(StatusCode::BAD_REQUEST, json!({ "error": error }));
        }
    };
    let addr = config.addr;
    if upstream.add_instance(&config) {
        tracing::info!(upstream = name, instance = %addr, "instance added");
        crate::health::check_soon(&upstream, addr);
        return reply(StatusCode::CREATED, json!({"added": addr.to_string()}));
    }
    let draining = upstream
        .find(addr)
        .filter(|instance| instance.is_draining());
    match draining {
        // Adding an instance being drained cancels the drain (HAProxy's `set server ... state
        // ready`), unless an autoscaler may be the one draining it (before stopping its
        // process, or as it left DNS): not for the admin API to undo.
        Some(_) if upstream.config.autoscale.is_some() => reply(
            StatusCode::CONFLICT,
            json!({"error": format!("{addr} is being drained in `{name}`, which an autoscaler manages: add it again once it is gone")}),
        ),
        // Its weight and role are fixed for its life: another would not be what was asked for.
        Some(instance) if (instance.weight, instance.backup) != (config.weight, config.backup) => {
            let (weight, backup) = (instance.weight, instance.backup);
            reply(
                StatusCode::CONFLICT,
                json!({"error": format!("{addr} is being drained in `{name}` with weight {weight} and backup {backup}: add it with those to cancel the drain, or again once it is gone")}),
            )
        }
        Some(instance) if instance.stop_draining() => {
            // One the file in force no longer lists stays as one added now would: the next
            // reload would otherwise remove it at once, in-flight requests and all.
            if !upstream.config.instances.iter().any(|i| i.addr == addr) {
                instance.make_dynamic();
            }
            tracing::info!(upstream = name, instance = %addr, "drain cancelled through the admin API");
            reply(StatusCode::OK, json!({"undrained": addr.to_string()}))
        }
        Some(_) => reply(
            StatusCode::CONFLICT,
            json!({"error": format!("{addr} is being removed from `{name}`: add it again once it is gone")}),
        ),
        None => reply(
            StatusCode::CONFLICT,
            json!({"error": format!("{addr} is already in `{name}`")}),
        ),
    }
}

/// Marks the instance draining (no new requests) and removes it once its in-flight requests
/// finished or `drain_timeout` passed.
/// Called with reloads held off.
fn drain_instance(gateway: &Arc<Gateway>, name: &str, addr: &str) -> Response<GatewayBody> {
    let Some(upstream) = gateway.upstream(name) else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no upstream named `{name}`")}),
        );
    };
    let Ok(parsed) = parse_addr(addr) else {
        let error = format!("`{addr}` is not an address (expected IP:PORT)");
        return reply(StatusCode::BAD_REQUEST, json!({ "error": error }));
    };
    let Some(instance) = upstream.find(parsed) else {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no instance {addr} in `{name}`")}),
        );
    };
    // The autoscaler, not the admin API, decides whether its processes run: it would start
    // this one again after the drain.
    if gateway.autoscale.runs_process(name, instance.addr) {
        let error = format!(
            "{addr} is a process of the autoscaler of `{name}`: scale it with POST /api/autoscale/{name}"
        );
        return reply(StatusCode::CONFLICT, json!({ "error": error }));
    }
    // One check-and-set, so two DELETEs at once start one drain.
    if instance.start_draining() {
        return reply(
            StatusCode::ACCEPTED,
            json!({"draining": instance.addr.to_string(), "already": true}),
        );
    }
    let timeout = upstream.config.drain_timeout;
    tracing::info!(upstream = name, instance = %instance.addr, "draining instance");
    let (gateway, draining) = (gateway.clone(), instance.addr.to_string());
    tokio::spawn(async move { upstream.drain(&gateway, &instance, timeout).await });
    reply(StatusCode::ACCEPTED, json!({ "draining": draining }))
}

/// `GET /api/cache/stats`: entries, bytes, hit ratio and the counters behind it.
fn cache_stats(gateway: &Gateway) -> Response<GatewayBody> {
    let c = gateway.runtime.load().cache.sample();
    reply(
        StatusCode::OK,
        json!({
            "entries": c.entries,
            "bytes": c.bytes,
            "max_bytes": c.max_bytes,
            "hit_ratio": c.hit_ratio(),
            "hits": c.hits,
            "misses": c.misses,
            "stale": c.stale,
            "bypasses": c.bypasses,
            "evictions": c.evictions,
            "shared_hits": c.shared_hits,
            "shared_errors": c.shared_errors,
        }),
    )
}

/// The purge a `?key=` asks for. Keys hold the Host lowercased, as the operator may not write
/// it; a key of a path and scheme alone (no Host, as keys were before they held it) purges that
/// path and scheme for every Host.
fn purge_of_key(key: &str) -> Purge {
    let parts: Vec<&str> = key.split(' ').collect();
    match parts.as_slice() {
        [_, _] => Purge::Prefix(format!("{key} ")),
        [path, scheme, host, rest @ ..] => {
            let mut key = format!("{path} {scheme} {}", host.to_ascii_lowercase());
            for part in rest {
                key.push(' ');
                key.push_str(part);
            }
            Purge::Key(key)
        }
        _ => Purge::Key(key.to_owned()),
    }
}

/// `DELETE /api/cache` (everything), `?prefix=/path` (keys whose path starts so) or `?key=KEY`
/// (one key exactly: `PATH?QUERY SCHEME HOST[ PARTS]`, see `cache_key`). With the shared
/// tier, Redis and every replica's memory too; 503 when Redis could not be purged.
async fn purge_cache(gateway: &Gateway, query: Option<&str>) -> Response<GatewayBody> {
    let store = gateway.runtime.load().cache.clone();
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect();
    let purge = match pairs.as_slice() {
        [] => Purge::All,
        [(name, prefix)] if name == "prefix" => Purge::Prefix(prefix.clone()),
        [(name, key)] if name == "key" => purge_of_key(key),
        _ => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "expected no query, ?prefix=/path or ?key=KEY"}),
            )
        }
    };
    // Carried to its end even when the admin client leaves: a purge stopped half way (a SCAN
    // over millions of keys takes seconds) would announce nothing to the other replicas.
    let message = purge.to_message();
    let purged = match tokio::spawn(async move { store.purge(&purge).await }).await {
        Ok(purged) => purged,
        Err(err) => (0, Err(format!("the purge stopped: {err}"))),
    };
    tracing::info!(purge = message, keys = purged.0, "cache purged");
    match purged {
        (purged, Ok(None)) => reply(StatusCode::OK, json!({ "purged": purged })),
        (purged, Ok(Some(shared))) => reply(
            StatusCode::OK,
            json!({ "purged": purged, "shared_purged": shared }),
        ),
        (purged, Err(error)) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "purged": purged, "error": error }),
        ),
    }
}

/// Pins the count of an autoscaled upstream, pauses or resumes its autoscaler.
fn set_autoscale_mode(gateway: &Gateway, name: &str, body: &Value) -> Response<GatewayBody> {
    let mode = match crate::autoscale::parse_mode(body) {
        Ok(mode) => mode,
        Err(err) => return reply(StatusCode::BAD_REQUEST, json!({ "error": err })),
    };
    let not_autoscaled = || {
        let error = format!("no autoscaled upstream named `{name}`");
        reply(StatusCode::NOT_FOUND, json!({ "error": error }))
    };
    let bounds = gateway.upstream(name).and_then(|upstream| {
        let config = upstream.config.autoscale.as_ref()?;
        Some(crate::autoscale::bounds_in_force(config))
    });
    let Some(bounds) = bounds else {
        return not_autoscaled();
    };
    if gateway.is_draining() {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "the gateway is shutting down: its autoscalers decide nothing more"}),
        );
    }
    match gateway.autoscale.set_mode(name, mode, bounds) {
        Ok(()) => reply(
            StatusCode::ACCEPTED,
            json!({ "upstream": name, "mode": mode }),
        ),
        Err(ModeError::NotAutoscaled) => not_autoscaled(),
        Err(err) => reply(StatusCode::BAD_REQUEST, json!({ "error": err.to_string() })),
    }
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Response<GatewayBody>> {
    let body = Limited::new(req.into_body(), 64 * 1024).collect();
    let Ok(collected) = tokio::time::timeout(ADMIN_BODY_TIMEOUT, body).await else {
        return Err(reply(
            StatusCode::REQUEST_TIMEOUT,
            json!({"error": format!("the body did not come within {} s", ADMIN_BODY_TIMEOUT.as_secs())}),
        ));
    };
    let bytes: Bytes = collected
        .map_err(|err| {
            if err.is::<http_body_util::LengthLimitError>() {
                reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    json!({"error": "the body is over 64 KiB"}),
                )
            } else {
                reply(StatusCode::BAD_REQUEST, json!({"error": "unreadable body"}))
            }
        })?
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
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let Some(encoded) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .and_then(|(scheme, encoded)| scheme.eq_ignore_ascii_case("basic").then_some(encoded))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let expected = format!("{user}:{password}");
    constant_time_eq(&decoded, expected.as_bytes())
}

/// Why a change (any method but GET and HEAD) is refused as coming from a web page rather
/// than from the operator, or `None`. A browser sends any page's POST to the admin port,
/// `text/plain` needing no preflight (CSRF), but says where it came from: an `Origin` other
/// than the admin's own, or `Sec-Fetch-Site` other than same-origin, is refused. Without
/// credentials, a change must also name the admin by IP address or `localhost`: a page whose
/// name an attacker points at 127.0.0.1 (DNS rebinding) is its own origin.
fn cross_site_refusal(headers: &http::HeaderMap, credentials: bool) -> Option<&'static str> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if let Some(origin) = origin {
        let origin_host = origin.split_once("://").map(|(_, rest)| rest);
        let same = origin_host
            .zip(host)
            .is_some_and(|(origin, host)| origin.eq_ignore_ascii_case(host));
        if !same {
            return Some("a change from another origin (a web page's request) is refused");
        }
    }
    let site = headers.get("sec-fetch-site").map(HeaderValue::as_bytes);
    if site.is_some_and(|site| site != b"same-origin" && site != b"none") {
        return Some("a change from another site (a web page's request) is refused");
    }
    let by_address = host.is_some_and(|host| {
        let name = crate::proxy::router::host_without_port(host);
        name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
    });
    if !credentials && !by_address {
        return Some(
            "without admin credentials, changes must name the admin by IP address or localhost",
        );
    }
    None
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
    fn purge_keys_are_read_as_stored() {
        let key = |text: &str| match purge_of_key(text) {
            Purge::Key(key) => format!("key {key}"),
            Purge::Prefix(prefix) => format!("prefix {prefix}"),
            Purge::All => "all".into(),
        };
        assert_eq!(
            key("/a?b=1 https Shop.Example:443"),
            "key /a?b=1 https shop.example:443"
        );
        assert_eq!(key("/a http site.test X-1 "), "key /a http site.test X-1 ");
        // Without a Host: that path and scheme for every Host.
        assert_eq!(key("/a?b=1 https"), "prefix /a?b=1 https ");
        assert_eq!(key("/a"), "key /a");
    }

    #[test]
    fn changes_from_web_pages_are_refused() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = http::HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_static(value));
            }
            map
        };
        let refused = |pairs, credentials| cross_site_refusal(&headers(pairs), credentials);
        // The operator's curl, and the dashboard's own requests.
        assert_eq!(refused(&[("host", "127.0.0.1:9090")], false), None);
        assert_eq!(refused(&[("host", "[::1]:9090")], false), None);
        let dashboard = [
            ("host", "localhost:9090"),
            ("origin", "http://localhost:9090"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(refused(&dashboard, false), None);
        // Another page's POST (CSRF), however it says so.
        let page = [
            ("host", "127.0.0.1:9090"),
            ("origin", "https://evil.example"),
        ];
        assert!(refused(&page, true).is_some());
        assert!(refused(&[("host", "127.0.0.1:9090"), ("origin", "null")], true).is_some());
        let site = [("host", "127.0.0.1:9090"), ("sec-fetch-site", "cross-site")];
        assert!(refused(&site, true).is_some());
        // A name pointed at the admin (DNS rebinding) is its own origin: without credentials,
        // only an address or localhost is taken; with them, the name is the operator's.
        let rebound = [
            ("host", "rebind.evil.example:9090"),
            ("origin", "http://rebind.evil.example:9090"),
        ];
        assert!(refused(&rebound, false).is_some());
        assert_eq!(refused(&rebound, true), None);
    }

    #[test]
    fn the_metrics_format_follows_the_accept_qualities() {
        // What Prometheus sends.
        assert!(prefers_openmetrics(
            "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        ));
        assert!(prefers_openmetrics("Application/OpenMetrics-Text"));
        assert!(!prefers_openmetrics(
            "application/openmetrics-text;q=0, text/plain"
        ));
        assert!(!prefers_openmetrics(
            "text/plain;version=0.0.4;q=1, application/openmetrics-text;q=0.5"
        ));
        assert!(!prefers_openmetrics("text/plain"));
        assert!(!prefers_openmetrics("*/*"));
    }

    #[test]
    fn basic_auth() {
        let good = HeaderValue::from_static("Basic YWRtaW46c2VjcmV0"); // admin:secret
        assert!(authorized(Some(&good), "admin", "secret"));
        let lower = HeaderValue::from_static("basic YWRtaW46c2VjcmV0");
        assert!(authorized(Some(&lower), "admin", "secret"));
        assert!(!authorized(Some(&good), "admin", "secreT"));
        assert!(!authorized(None, "admin", "secret"));
        assert!(!authorized(
            Some(&HeaderValue::from_static("Bearer x")),
            "admin",
            "secret"
        ));
    }

    #[test]
    fn the_gateway_is_down_only_when_no_upstream_can_serve() {
        let component = |kind, status| Component {
            name: "x".into(),
            kind,
            status,
            reason: String::new(),
        };
        let (up, down) = (component("upstream", "ok"), component("upstream", "down"));
        assert_eq!(overall_status(false, &[]), "ok");
        assert_eq!(
            overall_status(false, &[up.clone(), component("redis", "degraded")]),
            "degraded"
        );
        assert_eq!(
            overall_status(false, &[up.clone(), down.clone()]),
            "degraded"
        );
        assert_eq!(overall_status(false, &[down.clone(), down.clone()]), "down");
        assert_eq!(overall_status(true, &[up]), "draining");
    }
}
