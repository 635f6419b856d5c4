//! One request's access-log line, request counters and place in the in-flight gauge, written
//! when the request is over: after the last byte of its answer went to the client (nginx's
//! `$request_time`), or when it was abandoned on the way.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use super::Runtime;

use super::error::CLIENT_CLOSED_REQUEST;

/// Where forwarding took a request: filled in as it routes and tries instances.
#[derive(Debug, Clone, Copy, Default)]
pub struct Served {
    pub route: Option<usize>,
    /// The instance of the last attempt (the one that answered, when one did).
    pub instance: Option<SocketAddr>,
    /// Instances tried: more than one when the request was retried.
    pub attempts: u32,
    /// Times it was written to an instance and sent to it again, unanswered, on a new
    /// connection (outside `attempts`: [`InstanceCounters::resends`]).
    ///
    /// [`InstanceCounters::resends`]: super::upstream::InstanceCounters::resends
    pub resent: u32,
}

/// Written when dropped. Until the answer's status is known it stands for an abandoned request
/// (its HTTP/1.1 client left, its HTTP/2 stream was reset, the shutdown grace ran out), logged
/// as 499 as nginx logs it.
pub struct RequestRecord {
    /// The runtime snapshot the request is served with (and the gateway's metrics with it).
    pub runtime: Arc<Runtime>,
    started: Instant,
    method: Method,
    /// `None` when the access log is off.
    path: Option<String>,
    pub request_id: HeaderValue,
    client_ip: IpAddr,
    pub served: Served,
    status: u16,
    /// Answer body bytes handed to the client's connection (nginx's `$body_bytes_sent`).
    body_bytes: u64,
    /// A tunnel's exchange time, up to its 101: what the duration histogram takes, so that an
    /// hour-long WebSocket is not an hour-long request in the route's percentiles.
    switched_after: Option<std::time::Duration>,
}

impl RequestRecord {
    pub fn new(
        runtime: Arc<Runtime>,
        method: Method,
        path: &str,
        request_id: HeaderValue,
        client_ip: IpAddr,
    ) -> RequestRecord {
        runtime.metrics.request_started();
        RequestRecord {
            path: runtime.config.server.access_log.then(|| path.to_owned()),
            runtime,
            started: Instant::now(),
            method,
            request_id,
            client_ip,
            served: Served::default(),
            status: CLIENT_CLOSED_REQUEST.as_u16(),
            body_bytes: 0,
            switched_after: None,
        }
    }

    /// The 101 went out: the request goes on as a tunnel, logged with its whole time when it
    /// closes, but timed in the histogram up to now.
    pub fn switched_protocols(&mut self) {
        self.switched_after = Some(self.started.elapsed());
    }

    pub fn answered(&mut self, status: http::StatusCode) {
        self.status = status.as_u16();
    }

    pub fn sent(&mut self, bytes: usize) {
        self.body_bytes += bytes as u64;
    }

    /// The whole of the gateway's own `answer` went out (written by hand, not by a loop that
    /// counts as it writes).
    pub fn sent_whole(&mut self, answer: &http::Response<super::GatewayBody>) {
        let length = http_body::Body::size_hint(answer.body()).exact();
        self.body_bytes += length.unwrap_or(0);
    }

    /// The request began `waited` ago (a head that timed out began before its record).
    pub fn began(&mut self, waited: std::time::Duration) {
        self.started = Instant::now().checked_sub(waited).unwrap_or(self.started);
    }

    /// The answer's body failed after its head went out: every such failure comes from the
    /// instance (closed, reset, stalled, malformed). The access log keeps the status sent, as
    /// nginx's does; this says why the answer is short (nginx's "upstream prematurely closed
    /// connection") and counts it against the instance.
    #[cold]
    pub fn broke_off(&self, error: &(dyn std::error::Error + 'static)) {
        let served = self.served;
        let upstream = served.route.map(|r| self.runtime.route_upstream(r));
        let instance = served
            .instance
            .zip(upstream)
            .and_then(|(addr, upstream)| upstream.find(addr));
        if let Some(instance) = &instance {
            instance
                .counters
                .broken_answers
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(
            upstream = upstream.map_or("-", |u| u.config.name.as_str()),
            instance = %InstanceAddr(served.instance),
            request_id = self.request_id.to_str().unwrap_or_default(),
            error,
            "answer cut short: the instance broke off its body"
        );
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let runtime = &self.runtime;
        runtime.metrics.request_ended();
        let served = self.served;
        if let Some(stats) = runtime.request_stats(served.route) {
            stats.record(
                &self.method,
                self.status,
                self.switched_after.unwrap_or(elapsed),
            );
        }
        if let Some(path) = &self.path {
            tracing::info!(
                target: "access",
                method = %self.method,
                path = %path,
                status = self.status,
                bytes = self.body_bytes,
                upstream = served
                    .route
                    .map_or("-", |r| runtime.route_upstream(r).config.name.as_str()),
                instance = %InstanceAddr(served.instance),
                attempts = served.attempts,
                resent = served.resent,
                // Whole microseconds over 1000 print as short as they are (1.733, not
                // 1.7328219999999999).
                duration_ms = elapsed.as_micros() as f64 / 1000.0,
                request_id = self.request_id.to_str().unwrap_or_default(),
                client = %self.client_ip,
            );
        }
    }
}

/// An instance address in the access log, `-` for a request no instance got.
struct InstanceAddr(Option<SocketAddr>);

impl std::fmt::Display for InstanceAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}
