//! The proxy: listener, per-request pipeline, forwarding, retries, reload and graceful shutdown.
//!
//! `Gateway` holds the live `Runtime` (config, upstreams, routes) in an `ArcSwap`: each request
//! takes one snapshot, so a reload swaps the snapshot without touching requests in flight.

mod body;
pub mod client_h1;
mod client_h2;
mod client_io;
pub(crate) mod connect;
pub mod connections;
mod deadline;
pub mod error;
mod forward;
mod h1;
pub(crate) mod h2;
pub mod headers;
mod pipeline;
mod record;
mod retry;
pub mod router;
mod tunnel;
pub mod upstream;

pub use body::{BoxError, ForwardBody, GatewayBody};
pub use error::ProxyError;
pub use forward::InstanceFetch;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::limits::StoreKind;
use crate::config::{CacheStoreKind, Config, ConfigError, ConfigErrors};
use crate::metrics::live::LiveStats;
use crate::metrics::{Metrics, RequestStats};
use crate::redis_link::{ConnectError, LinkUser, RedisLink};
use client_io::ClientStream;
use connections::AcceptFailures;
use upstream::Upstream;

/// One configuration in force: the config and the live upstreams it describes.
pub struct Runtime {
    pub config: Config,
    pub upstreams: Vec<Arc<Upstream>>,
    /// The upstream of each route, by route position.
    route_upstreams: Vec<Arc<Upstream>>,
    /// The request counters of each route, by route position; empty when `server.metrics` is off.
    route_stats: Vec<Arc<RequestStats>>,
    /// The response store, kept across reloads while `[cache]` stays the same.
    pub cache: Arc<crate::cache::Store>,
    /// The cache of each route, by route position; `None` where the route is not cached.
    route_caches: Vec<Option<Arc<crate::cache::RouteCache>>>,
    /// The `X-Forwarded-Prefix` of each route that strips a prefix other than `/`, by route
    /// position: made once here, not per request.
    route_prefixes: Vec<Option<http::HeaderValue>>,
    /// TLS settings for new connections on the HTTPS listener.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// API keys, rate limits and concurrency limits per route.
    pub admission: crate::ratelimit::Admission,
    /// The gateway's request counters (they outlive reloads), reached through the runtime so
    /// that a request holds one shared reference, not two.
    pub metrics: Arc<Metrics>,
}

impl Runtime {
    /// Builds the runtime, carrying live instances over from `previous` where they still fit.
    fn build(
        config: Config,
        previous: Option<&Runtime>,
        metrics: &Arc<Metrics>,
        limiter: &Arc<crate::ratelimit::Limiter>,
        redis: Option<&Arc<RedisLink>>,
    ) -> Runtime {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|uc| {
                let old = previous.and_then(|p| p.upstream(&uc.name));
                Arc::new(Upstream::new(uc.clone(), old.map(|o| &**o)))
            })
            .collect();
        let route_upstreams = config
            .routes
            .iter()
            .map(|route| {
                upstreams
                    .iter()
                    .find(|u| u.config.name == route.upstream)
                    .expect("validated: every route names an upstream")
                    .clone()
            })
            .collect();
        let route_stats = if config.server.metrics {
            config
                .routes
                .iter()
                .map(|route| metrics.route(&route.name, &route.upstream))
                .collect()
        } else {
            Vec::new()
        };
        let cache = match previous {
            Some(p) if p.config.cache == config.cache => p.cache.clone(),
            _ => {
                let shared = redis.filter(|_| config.cache.store == CacheStoreKind::Redis);
                let before = previous.map(|p| &*p.cache);
                crate::cache::Store::replacing(config.cache.max_size, shared.cloned(), before)
            }
        };
        let route_caches = crate::cache::RouteCache::for_routes(&config.routes, &cache);
        let route_prefixes = config
            .routes
            .iter()
            .map(forward::forwarded_prefix)
            .collect();
        let tls = config
            .tls
            .as_ref()
            .map(|tls| crate::tls::server_config(&tls.certificates, None));
        let admission = crate::ratelimit::Admission::build(
            &config,
            limiter.clone(),
            previous.map(|p| &p.admission),
        );
        Runtime {
            config,
            upstreams,
            route_upstreams,
            route_stats,
            cache,
            route_caches,
            route_prefixes,
            tls,
            admission,
            metrics: metrics.clone(),
        }
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.config.name == name)
    }

    fn route_upstream(&self, route: usize) -> &Arc<Upstream> {
        &self.route_upstreams[route]
    }

    fn route_cache(&self, route: usize) -> Option<&Arc<crate::cache::RouteCache>> {
        self.route_caches[route].as_ref()
    }

    /// The cached routes, by route position.
    pub fn cached_routes(&self) -> impl Iterator<Item = (usize, &crate::cache::RouteCache)> {
        self.route_caches
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c.as_deref()?)))
    }

    /// Where to count a request: its route's counters, or the unrouted ones; `None` when
    /// recording is off.
    fn request_stats(&self, route: Option<usize>) -> Option<&RequestStats> {
        if !self.config.server.metrics {
            return None;
        }
        Some(route.map_or(&*self.metrics.unrouted, |r| &*self.route_stats[r]))
    }
}

/// The running gateway, shared by the proxy listener, the admin API and the background tasks.
pub struct Gateway {
    pub runtime: ArcSwap<Runtime>,
    draining: AtomicBool,
    config_path: Option<PathBuf>,
    request_seq: AtomicU64,
    id_prefix: u32,
    reload_lock: tokio::sync::Mutex<()>,
    pub metrics: Arc<Metrics>,
    pub live: LiveStats,
    /// Open client connections against `server.max_connections` and `max_connections_per_ip`.
    pub connections: Arc<connections::ConnectionLimits>,
    /// Port the HTTPS listener got (the configured one may be 0), for HTTP→HTTPS redirects.
    https_port: AtomicU16,
    /// Rate-limit stores and counters; outlive reloads.
    pub limiter: Arc<crate::ratelimit::Limiter>,
    /// The rate limiter's link to `[state]` Redis, when it uses Redis (set at start).
    pub redis: Option<Arc<RedisLink>>,
    /// The response cache's link to the same Redis, whenever one is configured.
    pub cache_redis: Option<Arc<RedisLink>>,
    /// The autoscalers' status and mode switches, for the admin API.
    pub autoscale: crate::autoscale::Registry,
    /// Cancelled when a stop's `shutdown_grace` is over: the client connections and tunnels
    /// still open are cut then, before the autoscaler stops its instances (for up to
    /// `stop_grace`), rather than served on meanwhile.
    pub cut: tokio_util::sync::CancellationToken,
    /// When the stop under way cuts what is still in flight (set as it starts draining).
    stop_due: watch::Sender<Option<tokio::time::Instant>>,
}

impl Gateway {
    /// Creates the gateway and starts its health checks (needs a tokio runtime).
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Arc<Gateway> {
        let metrics = Arc::new(Metrics::default());
        let connections = Arc::new(connections::ConnectionLimits::new(
            config.server.max_connections,
            config.server.max_connections_per_ip,
            connections::raise_descriptor_limit(),
        ));
        let uses_redis =
            config.limits.store == StoreKind::Redis || config.cache.store == CacheStoreKind::Redis;
        // One link each: a burst of large cache transfers must not hold up, or time out, the
        // rate-limit decisions queued behind it on one connection. The cache's is there
        // whenever Redis is configured, so a reload may turn the shared cache on.
        let state = &config.limits.state;
        let redis = (config.limits.store == StoreKind::Redis)
            .then(|| RedisLink::new(state, LinkUser::RateLimits));
        let cache_redis = uses_redis.then(|| RedisLink::new(state, LinkUser::Cache));
        let limiter = crate::ratelimit::Limiter::new(&config.limits, redis.as_ref());
        let runtime = Arc::new(Runtime::build(
            config,
            None,
            &metrics,
            &limiter,
            cache_redis.as_ref(),
        ));
        for upstream in &runtime.upstreams {
            crate::health::spawn_active_checks(upstream);
        }
        crate::cache::spawn_warming(&runtime);
        Arc::new(Gateway {
            runtime: ArcSwap::new(runtime),
            draining: AtomicBool::new(false),
            config_path,
            request_seq: AtomicU64::new(1),
            id_prefix: rand::random(),
            reload_lock: tokio::sync::Mutex::new(()),
            metrics,
            live: LiveStats::default(),
            https_port: AtomicU16::new(0),
            connections,
            limiter,
            redis,
            cache_redis,
            autoscale: crate::autoscale::Registry::default(),
            cut: tokio_util::sync::CancellationToken::new(),
            stop_due: watch::Sender::new(None),
        })
    }

    /// Completes once a stop drains, with the moment its `shutdown_grace` ends and whatever
    /// is still in flight is cut.
    pub async fn stop_due(&self) -> tokio::time::Instant {
        let mut due = self.stop_due.subscribe();
        let due = due.wait_for(Option::is_some).await.map(|due| *due);
        match due {
            Ok(due) => due.unwrap_or_else(tokio::time::Instant::now),
            // Never: the gateway holds the sender.
            Err(_) => std::future::pending().await,
        }
    }

    /// Re-reads the config file. A bad config is refused and the running one keeps serving.
    fn reload(&self) -> Result<(), ConfigErrors> {
        // Not a reload refused (no config was pushed): not counted as one.
        let Some(path) = &self.config_path else {
            return Err(ConfigErrors(vec![crate::config::ConfigError {
                key: "reload".into(),
                line: None,
                message: "the gateway was started without --config, there is nothing to re-read"
                    .into(),
            }]));
        };
        let result = self.apply_config_file(path);
        self.metrics.reloads.record(result.is_ok());
        result
    }

    /// `reload` on the blocking pool: reading the file and building the next runtime would
    /// otherwise hold up a worker that serves requests.
    pub async fn reload_aside(self: &Arc<Self>) -> Result<(), ConfigErrors> {
        let gateway = Arc::clone(self);
        let metrics = Arc::clone(&self.metrics);
        // Its log lines keep the caller's context (the admin API's client).
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| gateway.reload()))
            .await
            .unwrap_or_else(|failed| {
                // A panic, or the runtime stopping: the running config stays either way.
                metrics.reloads.record(false);
                Err(ConfigErrors(vec![crate::config::ConfigError {
                    key: "reload".into(),
                    line: None,
                    message: format!("the reload stopped half-way: {failed}"),
                }]))
            })
    }

    fn apply_config_file(&self, path: &std::path::Path) -> Result<(), ConfigErrors> {
        // On the blocking pool (`reload_aside`), where waiting blocks no worker.
        let _serialized = self.reload_lock.blocking_lock();
        let config = Config::load(path)?;
        let current = self.runtime.load_full();
        let mut needing_restart =
            restart_only_changes(&current.config, &config, self.cache_redis.is_some());
        if !needing_restart.is_empty() {
            Config::place_in_file(path, &mut needing_restart);
            return Err(ConfigErrors(needing_restart));
        }
        self.connections.set_limits(
            config.server.max_connections,
            config.server.max_connections_per_ip,
        );
        let next = Arc::new(Runtime::build(
            config,
            Some(&current),
            &self.metrics,
            &self.limiter,
            self.cache_redis.as_ref(),
        ));
        for upstream in &next.upstreams {
            crate::health::spawn_active_checks(upstream);
        }
        crate::cache::spawn_warming(&next);
        if next.config.cache.store == CacheStoreKind::Redis {
            if let Some(link) = &self.cache_redis {
                link.start_in_background();
            }
        }
        self.runtime.store(Arc::clone(&next));
        for upstream in &current.upstreams {
            upstream.retire(next.upstream(&upstream.config.name).cloned());
        }
        tracing::info!(path = %path.display(), "configuration reloaded");
        warn_of_risky_settings(&self.runtime.load().config);
        Ok(())
    }

    pub fn https_port(&self) -> u16 {
        self.https_port.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        self.runtime.load().upstream(name).cloned()
    }

    /// Holds off reloads while the guard lives: a reload builds the next upstreams from the
    /// instance sets in force, so an instance added or drained through the admin API or by
    /// discovery meanwhile would be lost with the old ones. An async lock: a reload holds it on
    /// the blocking pool for as long as it reads and builds, and a worker waiting on it would
    /// stop serving requests.
    pub async fn hold_reloads(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reload_lock.lock().await
    }

    /// A request ID for a request that came without a usable one.
    pub fn new_request_id(&self) -> http::HeaderValue {
        headers::new_request_id(
            self.id_prefix,
            self.request_seq.fetch_add(1, Ordering::Relaxed),
        )
    }
}

/// Runs the gateway until SIGTERM/SIGINT/SIGQUIT, then drains: the proxy stops accepting, `/health`
/// answers 503, in-flight requests finish within `shutdown_grace`.
pub async fn serve(config: Config, config_path: Option<PathBuf>) -> std::io::Result<()> {
    // Before anything is announced: a SIGTERM sent right after the "listening" lines must
    // drain, and a SIGHUP reload, not kill the process by the default action.
    let Signals { stop, hangup } = Signals::register()?;
    let (listen, admin_listen) = (config.server.listen, config.admin.listen);
    let tls_listen = config.tls.as_ref().map(|tls| tls.listen);
    let gateway = Gateway::new(config, config_path);
    // Before listening: a Redis that refuses the configured password stops the start; an
    // unreachable one does not (limits and the cache fall back until it answers).
    // The cache's link only when the cache uses it now (a reload may start it later).
    let cache_link = gateway
        .cache_redis
        .as_ref()
        .filter(|_| gateway.runtime.load().config.cache.store == CacheStoreKind::Redis);
    let links: Vec<&Arc<RedisLink>> = gateway.redis.iter().chain(cache_link).collect();
    let started = futures_util::future::join_all(links.iter().map(|link| link.start())).await;
    for outcome in &started {
        if let Err(ConnectError::Auth(message)) = outcome {
            return Err(std::io::Error::other(format!(
                "state.redis_url: {message} (check the password in the URL, and that the user's ACL allows the gateway's commands)"
            )));
        }
    }
    if let (Some(link), true) = (links.first(), started.iter().any(Result::is_ok)) {
        tracing::info!(redis = %link.target(), "state is shared through Redis");
    }
    let proxy_listener = bind("server.listen", listen).await?;
    let admin_listener = bind(gateway.runtime.load().config.admin.listen_key, admin_listen).await?;
    let tls_listener = match tls_listen {
        Some(addr) => Some(bind("tls.listen", addr).await?),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    // Registered before the addresses are announced, so the admin API knows every autoscaled
    // upstream from its first request.
    let autoscalers = crate::autoscale::start(&gateway, stop_rx.clone());
    if let Some(listener) = &tls_listener {
        gateway
            .https_port
            .store(listener.local_addr()?.port(), Ordering::Relaxed);
    }
    let proxy_addr: SocketAddr = proxy_listener.local_addr()?;
    let admin_addr: SocketAddr = admin_listener.local_addr()?;
    // Tests and scripts wait for these lines; a stdout that is closed or full (println! would
    // panic) does not stop the gateway.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "proxy listening on {proxy_addr}");
    let _ = writeln!(stdout, "admin listening on {admin_addr}");
    if let Some(listener) = &tls_listener {
        let _ = writeln!(stdout, "tls listening on {}", listener.local_addr()?);
    }
    let _ = stdout.flush();
    drop(stdout);
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, "scalegate is serving");
    warn_of_risky_settings(&gateway.runtime.load().config);

    tokio::spawn(crate::admin::serve(
        gateway.clone(),
        admin_listener,
        stop_rx.clone(),
    ));
    tokio::spawn(reload_on_sighup(gateway.clone(), hangup));
    tokio::spawn(close_stale_connections(gateway.clone()));
    let stops = count_stop_signals(stop);
    let stop_count = |at_least: u32| {
        let mut stops = stops.clone();
        async move {
            let _ = stops.wait_for(|count| *count >= at_least).await;
        }
    };
    let forced = stop_count(2);
    let signal = async {
        stop_count(1).await;
        // Load balancers and Kubernetes endpoints learn of the stop only from /health: keep
        // serving a while after it turned 503, then stop accepting.
        let delay = gateway.runtime.load().config.server.shutdown_delay;
        if !delay.is_zero() {
            gateway.draining.store(true, Ordering::Relaxed);
            tracing::info!(
                delay_secs = delay.as_secs_f64(),
                "/health answers 503; serving on for shutdown_delay"
            );
            // A second stop signal cuts the delay too.
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop_count(2) => {}
            }
        }
    };
    tokio::pin!(signal);
    accept_loop(
        gateway.clone(),
        proxy_listener,
        tls_listener,
        &mut signal,
        forced,
    )
    .await;
    gateway.draining.store(true, Ordering::Relaxed);
    gateway.cut.cancel();
    let _ = stop_tx.send(true);
    // Instances the autoscaler started are stopped only after in-flight requests finished.
    autoscalers.stopped().await;
    Ok(())
}

/// Binds one listener; a failure names the key and address, as nginx names the address.
async fn bind(key: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| std::io::Error::new(err.kind(), format!("{key} {addr}: {err}")))
}

/// What a reload cannot apply: listeners are opened, and the rate-limit and cache stores
/// connected, at start. Such a reload is refused, so the config in force always says what the
/// gateway does.
fn restart_only_changes(running: &Config, next: &Config, has_redis: bool) -> Vec<ConfigError> {
    let mut problems = Vec::new();
    let mut needs_restart = |key: &str, what: String| {
        problems.push(ConfigError {
            key: key.to_owned(),
            line: None,
            message: format!("{what}: that takes a restart, so this reload is refused"),
        });
    };
    if next.server.listen != running.server.listen {
        let what = format!("the gateway listens on {}", running.server.listen);
        needs_restart("server.listen", what);
    }
    if next.admin.listen != running.admin.listen {
        let what = format!("the admin API listens on {}", running.admin.listen);
        needs_restart(next.admin.listen_key, what);
    }
    let https = |config: &Config| config.tls.as_ref().map(|tls| tls.listen);
    if https(next) != https(running) {
        let what = match https(running) {
            Some(addr) => format!("HTTPS is served on {addr}"),
            None => "no HTTPS listener is open".to_owned(),
        };
        needs_restart("tls.listen", what);
    }
    // The Redis link and the rate limiter are built once, from these.
    let (state, next_state) = (&running.limits.state, &next.limits.state);
    for (key, changed) in [
        ("state.redis_url", next_state.redis_urls != state.redis_urls),
        ("state.redis_ca", next_state.redis_ca != state.redis_ca),
        (
            "state.redis_cluster",
            next_state.redis_cluster != state.redis_cluster,
        ),
        (
            "state.redis_timeout",
            next_state.redis_timeout != state.redis_timeout,
        ),
        (
            "state.on_redis_error",
            next_state.on_redis_error != state.on_redis_error,
        ),
        (
            "rate_limit.store",
            next.limits.store != running.limits.store,
        ),
        (
            "rate_limit.max_keys",
            next.limits.max_keys != running.limits.max_keys,
        ),
    ] {
        if changed {
            needs_restart(
                key,
                "the Redis link and rate limiter are set up with it at start".to_owned(),
            );
        }
    }
    if next.cache.store == CacheStoreKind::Redis && !has_redis {
        needs_restart("cache.store", "the gateway runs without Redis".to_owned());
    }
    // Compared as run: writing down the count in force (one per CPU) changes nothing.
    let workers = running.server.worker_threads();
    if next.server.worker_threads() != workers {
        needs_restart(
            "server.workers",
            format!("the gateway runs {workers} worker threads"),
        );
    }
    // Autoscalers start with the gateway: bounds, targets and behavior reload; who runs the
    // instances, and how long they are drained and given to stop, do not.
    let added = next
        .upstreams
        .iter()
        .filter(|u| running.upstream(&u.name).is_none());
    for name in running.upstreams.iter().chain(added).map(|u| &u.name) {
        let autoscale = |config: &Config| config.upstream(name)?.autoscale.clone();
        let key = format!("upstreams.{name}.autoscale");
        match (autoscale(running), autoscale(next)) {
            (None, None) => {}
            (None, Some(_)) => needs_restart(&key, "it has no autoscaler running".to_owned()),
            (Some(_), None) => needs_restart(&key, "its autoscaler is running".to_owned()),
            (Some(before), Some(after)) => {
                for changed in before.restart_keys(&after) {
                    needs_restart(
                        &format!("{key}.{changed}"),
                        "the autoscaler runs with the value it started with".to_owned(),
                    );
                }
            }
        }
    }
    problems
}

/// How new client connections are served under one config.
struct ConnectionSettings {
    /// The config they come from: weak, so that after a reload the old one's instances, and
    /// their idle connections, go as soon as its last request ends, not at the next accept.
    /// (The allocation stays while this lives, so its address is not reused.)
    runtime: Weak<Runtime>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// hyper serves HTTP/2 only: prior knowledge on the plain listener, ALPN h2 over TLS.
    /// Every HTTP/1.1 connection, plain or TLS, is the gateway's own loop (client_h1).
    http2: Arc<auto::Builder<TokioExecutor>>,
    limits: client_h1::ClientLimits,
}

impl ConnectionSettings {
    fn of(runtime: Arc<Runtime>) -> ConnectionSettings {
        let server = &runtime.config.server;
        ConnectionSettings {
            limits: client_h1::ClientLimits::of(server),
            http2: Arc::new(client_h2::server(server)),
            tls: runtime.tls.clone(),
            runtime: Arc::downgrade(&runtime),
        }
    }
}

/// The most answer bytes an HTTP/1.1 client's socket holds unsent before a write to it waits.
/// A client's `idle_timeout` counts from the last write that went through; by default the
/// kernel lets a waiting writer on only once a third of the send buffer (megabytes on a fast
/// path) has gone, so a steady reader slower than that per timeout (about 22 kB/s at 60 s) was
/// cut off as one that stopped. Under this mark the writer is let on once less than half of it
/// is unsent: about every 256–330 KB the client takes (at 60 s a reader at 7 kB/s kept its
/// connection, one at 4.5 kB/s did not). It also bounds the kernel memory a slow reader holds.
/// 128 KiB made a 256 MiB download on loopback 6 % slower; 512 KiB costs nothing measurable.
/// Not on HTTP/2 connections: hyper's writer there woke often enough under it to make a large
/// download 13 % slower, and a window the client opens as it reads shows its pace anyway.
const CLIENT_NOTSENT_LOWAT: u32 = 512 * 1024;

/// Sets [`CLIENT_NOTSENT_LOWAT`] on an HTTP/1.1 client's socket (where the kernel has it).
fn limit_unsent(tcp: &tokio::net::TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(CLIENT_NOTSENT_LOWAT);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = tcp;
}

/// Accepts on the plain listener and, when TLS is configured, the HTTPS one, until `stop`;
/// then drains: in-flight requests get `shutdown_grace`, unless `forced` (a second stop signal)
/// completes first.
async fn accept_loop(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    tls_listener: Option<TcpListener>,
    stop: &mut (impl std::future::Future<Output = ()> + Unpin),
    forced: impl std::future::Future<Output = ()>,
) {
    // The `[server]` settings of the config in force; a reload changes them for the connections
    // accepted after it (as nginx's new workers do), so they are rebuilt when it does.
    let mut settings = ConnectionSettings::of(gateway.runtime.load_full());
    // Every connection watches `drain`, and holds a receiver until it is done.
    let drain = watch::Sender::new(false);
    let mut accept_failures = AcceptFailures::default();
    loop {
        let (accepted, secure) = tokio::select! {
            accepted = listener.accept() => (accepted, false),
            accepted = accept_on(tls_listener.as_ref()) => (accepted, true),
            () = &mut *stop => break,
        };
        if let Err(failed) = &accepted {
            shed_idle_on_shortage(&gateway.runtime.load(), failed);
        }
        let Some((stream, peer)) = accept_failures.accepted("proxy", accepted).await else {
            continue;
        };
        if !std::ptr::eq(
            Arc::as_ptr(&gateway.runtime.load()),
            settings.runtime.as_ptr(),
        ) {
            settings = ConnectionSettings::of(gateway.runtime.load_full());
        }
        let (builder, limits) = (settings.http2.clone(), settings.limits);
        let permit = match gateway.connections.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                refuse(stream, peer, secure, refusal, &gateway);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let client = forward::ClientAddr::new(peer, secure);
        let gateway = gateway.clone();
        let cut = gateway.cut.clone();
        if !secure {
            let drain = drain.subscribe();
            let serving = async move {
                let accepted = tokio::time::Instant::now();
                match starts_with_http2_preface(&stream, limits.header_read_timeout).await {
                    Some(false) => {
                        limit_unsent(&stream);
                        let stream = ClientStream::Tcp(stream);
                        client_h1::serve(stream, gateway, (client, permit), limits, drain).await;
                    }
                    Some(true) => {
                        client_h2::serve(
                            &builder, stream, gateway, client, limits, accepted, drain,
                        )
                        .await;
                        drop(permit);
                    }
                    None => drop(permit),
                }
            };
            tokio::spawn(cut.run_until_cancelled_owned(serving));
            continue;
        }
        let Some(tls) = settings.tls.clone() else {
            continue;
        };
        let drain = drain.subscribe();
        let serving = async move {
            let accepted = tokio::time::Instant::now();
            match first_byte(&stream, limits.header_read_timeout).await {
                FirstByte::PlainHttp => {
                    answer_plain_http_on_https(stream, &client, &gateway).await;
                    return;
                }
                FirstByte::None => return,
                FirstByte::Tls => {}
            }
            let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
            // The first byte's wait and the handshake share one header_read_timeout.
            let due = accepted + limits.header_read_timeout;
            let stream = match tokio::time::timeout_at(due, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(%err, %peer, "TLS handshake failed");
                    let failed = &gateway.metrics.tls_handshake_failures.failed;
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    let timed_out = &gateway.metrics.tls_handshake_failures.timed_out;
                    timed_out.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                client_h2::serve(&builder, stream, gateway, client, limits, accepted, drain).await;
                drop(permit);
            } else {
                limit_unsent(stream.get_ref().0);
                let stream = ClientStream::Tls(Box::new(stream));
                client_h1::serve(stream, gateway, (client, permit), limits, drain).await;
            }
        };
        tokio::spawn(cut.run_until_cancelled_owned(serving));
    }
    drop(listener);
    drop(tls_listener);
    gateway.draining.store(true, Ordering::Relaxed);
    drain.send_replace(true);
    let grace = gateway.runtime.load().config.server.shutdown_grace;
    gateway
        .stop_due
        .send_replace(Some(tokio::time::Instant::now() + grace));
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "draining: finishing in-flight requests"
    );
    let finished = drain.closed();
    tokio::select! {
        finished = tokio::time::timeout(grace, finished) => if finished.is_err() {
            tracing::warn!("shutdown grace elapsed with requests still in flight");
        },
        () = forced => {}
    }
}

/// Waits for a new plain connection's first bytes: `Some(true)` when they are HTTP/2's
/// connection preface (prior knowledge h2c), `Some(false)` for anything else (HTTP/1), `None`
/// when the client closed or sent nothing within `timeout`. Peeks, so nothing is consumed.
async fn starts_with_http2_preface(
    stream: &tokio::net::TcpStream,
    timeout: Duration,
) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let until = tokio::time::Instant::now() + timeout;
    let mut first = [0u8; 4];
    let mut pause = Duration::from_millis(5);
    loop {
        let seen = tokio::time::timeout_at(until, stream.peek(&mut first))
            .await
            .ok()?
            .ok()?;
        if seen == 0 {
            return None;
        }
        if !PREFACE.starts_with(&first[..seen]) {
            return Some(false);
        }
        if seen == first.len() {
            return Some(true);
        }
        // The preface's first bytes came alone: peek again once more have arrived. A peek
        // returns at once while they sit there (so the timeout above never fires, and a
        // client that left after them is not seen): the deadline is checked here, and the
        // pauses grow, so a client sending "PR" and nothing more costs little and is let go.
        let now = tokio::time::Instant::now();
        if now >= until {
            return None;
        }
        tokio::time::sleep_until((now + pause).min(until)).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Whether a client of the HTTPS listener opened with a plain HTTP request (a method's first
/// letter) rather than a TLS handshake record (0x16). Peeks, so nothing is consumed.
async fn first_byte(stream: &tokio::net::TcpStream, timeout: Duration) -> FirstByte {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(timeout, stream.peek(&mut first)).await;
    match peeked {
        Ok(Ok(1)) if first[0].is_ascii_uppercase() => FirstByte::PlainHttp,
        // Closed (or reset) before a byte: a TCP check of a load balancer or an orchestrator,
        // not a handshake that failed.
        Ok(Ok(0) | Err(_)) => FirstByte::None,
        _ => FirstByte::Tls,
    }
}

/// What a connection to the HTTPS listener sent first.
enum FirstByte {
    /// A letter: a plain HTTP request.
    PlainHttp,
    /// A TLS record, or nothing yet (the handshake's timeout goes on).
    Tls,
    /// Nothing before it closed.
    None,
}

/// A plain HTTP request on the HTTPS listener gets a 400 that says so (as nginx's "The plain
/// HTTP request was sent to HTTPS port"), rather than a TLS alert a client shows as garbage;
/// logged and counted like any refused head. The request is read and dropped for a moment
/// after the answer, so that closing with it unread does not reset the answer away.
async fn answer_plain_http_on_https(
    mut stream: tokio::net::TcpStream,
    client: &forward::ClientAddr,
    gateway: &Gateway,
) {
    let request_id = gateway.new_request_id();
    let error = ProxyError::BadRequest("a plain HTTP request was sent to the HTTPS port");
    let answer = error.response(&request_id);
    let sent = write_and_linger(&mut stream, &client_h1::closing_answer_bytes(&answer)).await;
    let mut record = forward::refused_record(gateway, client, error.status(), request_id);
    if sent {
        record.sent_whole(&answer);
    }
}

/// Writes `bytes` (within a second), then closes the connection: what the client sent is read
/// and dropped for a moment first, so that closing with it unread does not reset the answer
/// away. Whether all of `bytes` went.
async fn write_and_linger(stream: &mut tokio::net::TcpStream, bytes: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let written = tokio::time::timeout(Duration::from_secs(1), stream.write_all(bytes)).await;
    let sent = matches!(written, Ok(Ok(())));
    if sent && stream.shutdown().await.is_ok() {
        let mut sink = [0u8; 4096];
        let linger = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), linger).await;
    }
    sent
}

/// Refused plain connections being answered (waiting for their client's first bytes, then
/// writing and closing); past this many, the next ones are answered at once.
static REFUSALS_WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const MOST_REFUSALS_WAITING: usize = 64;
/// How long a refused plain connection's first bytes are waited for.
const REFUSAL_WAIT: Duration = Duration::from_millis(200);

/// Closes a connection over the limits. A plain one is first told why in its client's
/// protocol, its request ID generated as no request is read: an HTTP/1.1 client gets a 503
/// with the JSON body every error has; a client opening with HTTP/2's preface (prior
/// knowledge), which read that 503 as garbage, gets a GOAWAY that says none of its streams was
/// taken up. Which one is known by the client's first bytes, waited for a moment (up to 64
/// refusals at once; past those, a refusal is the 503 written now, or nothing if the socket does
/// not take it at once: a flood of refused clients never holds the accept loop).
fn refuse(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    secure: bool,
    refusal: connections::ConnRefusal,
    gateway: &Arc<Gateway>,
) {
    if secure {
        tracing::debug!(?refusal, peer = ?stream.peer_addr().ok(), "connection refused");
        return;
    }
    let reason = match refusal {
        connections::ConnRefusal::TooManyConnections => {
            "the gateway holds server.max_connections connections"
        }
        connections::ConnRefusal::TooManyFromClient => {
            "this client holds server.max_connections_per_ip connections"
        }
    };
    let client = forward::ClientAddr::new(peer, secure);
    let request_id = gateway.new_request_id();
    let error = ProxyError::TooManyConnections(reason);
    let answer = error.response(&request_id);
    // An access-log line and a count, as nginx's limit_conn 503s get: the request ID the
    // answer carries is then found somewhere.
    let record = move |gateway: &Gateway,
                       sent_whole: Option<&http::Response<body::GatewayBody>>| {
        let mut record = forward::refused_record(gateway, &client, error.status(), request_id);
        if let Some(answer) = sent_whole {
            record.sent_whole(answer);
        }
    };
    if REFUSALS_WAITING.fetch_add(1, Ordering::Relaxed) >= MOST_REFUSALS_WAITING {
        REFUSALS_WAITING.fetch_sub(1, Ordering::Relaxed);
        let bytes = client_h1::closing_answer_bytes(&answer);
        let written = stream.try_write(&bytes);
        record(
            gateway,
            written.is_ok_and(|n| n == bytes.len()).then_some(&answer),
        );
        return;
    }
    let gateway = gateway.clone();
    tokio::spawn(async move {
        let mut stream = stream;
        let http2 = starts_with_http2_preface(&stream, REFUSAL_WAIT).await == Some(true);
        if http2 {
            refuse_http2(stream).await;
            record(&gateway, None);
        } else {
            let bytes = client_h1::closing_answer_bytes(&answer);
            let sent = write_and_linger(&mut stream, &bytes).await;
            record(&gateway, sent.then_some(&answer));
        }
        // Counted to the end: a flood of refused clients holds at most so many sockets.
        REFUSALS_WAITING.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Refuses a whole HTTP/2 connection as an HTTP/2 server: h2 answers the preface, then sends
/// a GOAWAY with REFUSED_STREAM whose last stream is 0, so the client knows none of its
/// requests was taken up and may send them again (RFC 9113 §6.8). Within a second.
async fn refuse_http2(stream: tokio::net::TcpStream) {
    let refused = async {
        let mut connection = ::h2::server::handshake(stream).await.ok()?;
        connection.abrupt_shutdown(::h2::Reason::REFUSED_STREAM);
        // Driven until closed, so the GOAWAY goes out (streams it brings are refused).
        while let Some(Ok(_)) = connection.accept().await {}
        Some(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), refused).await;
}

/// Accepts on `listener`, or never when there is none.
async fn accept_on(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// The signals the gateway acts on, caught from the moment they are registered.
struct Signals {
    /// SIGTERM, SIGINT and SIGQUIT (nginx's graceful stop, the `STOPSIGNAL` of its image).
    stop: [tokio::signal::unix::Signal; 3],
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            stop: [
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::quit())?,
            ],
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

/// Counts stop signals: the first drains, a second (Ctrl-C again, or a supervisor's second
/// SIGTERM) stops without waiting out `shutdown_grace`, as a second Ctrl-C does for most
/// supervisors; autoscaled instances are still stopped.
fn count_stop_signals(
    [mut term, mut int, mut quit]: [tokio::signal::unix::Signal; 3],
) -> watch::Receiver<u32> {
    let (count, counted) = watch::channel(0);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = quit.recv() => "SIGQUIT",
            };
            count.send_modify(|count| *count += 1);
            if *count.borrow() == 1 {
                tracing::info!("{name} received");
            } else {
                tracing::warn!(
                    "{name} received again: stopping without waiting for requests in flight"
                );
            }
        }
    });
    counted
}

/// Closes pooled instance connections idle past their upstream's `idle_timeout`, or closed by
/// the instance meanwhile, once a second, as nginx's upstream keepalive cache does: a quiet
/// gateway does not hold sockets (and the instances' connection slots) for good.
async fn close_stale_connections(gateway: Arc<Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let runtime = gateway.runtime.load();
        let now = tokio::time::Instant::now();
        for upstream in &runtime.upstreams {
            for instance in &upstream.set.load().instances {
                instance.pool.close_stale(now);
            }
        }
    }
}

/// Closes every idle instance connection when `failed` says the gateway is short of file
/// descriptors (or memory), so that accepting clients and connecting to instances can go on:
/// the fds a burst left in the pools would otherwise stay taken until `idle_timeout`, and new
/// clients wait in the listen queue without even a 503.
pub fn shed_idle_on_shortage(runtime: &Runtime, failed: &std::io::Error) {
    if connect::is_local_shortage(failed) {
        shed_idle_connections(runtime, failed);
    }
}

/// When idle connections were last shed for a shortage, by whoever ([`crate::clock::ticks_ms`];
/// 0: never).
static LAST_SHED_MS: AtomicU64 = AtomicU64::new(0);

/// Whether idle connections were shed at `since` or after: then a connect that failed for a
/// shortage may work now, though the request's own shed found nothing left (the accept loop,
/// failing too, had just shed them).
pub fn shed_since(since: tokio::time::Instant) -> bool {
    let last = LAST_SHED_MS.load(Ordering::Relaxed);
    last != 0 && last >= crate::clock::ticks_ms(since)
}

/// See [`shed_idle_on_shortage`]; `failed` says why, for the log. Returns how many closed.
pub fn shed_idle_connections(runtime: &Runtime, failed: &dyn std::fmt::Display) -> usize {
    let now = tokio::time::Instant::now();
    let shed: usize = runtime
        .upstreams
        .iter()
        .flat_map(|upstream| upstream.set.load().instances.clone())
        .map(|instance| instance.pool.shed_idle(now))
        .sum();
    if shed > 0 {
        LAST_SHED_MS.store(crate::clock::ticks_ms(now), Ordering::Relaxed);
        tracing::warn!(
            shed,
            error = %failed,
            "short of file descriptors: idle instance connections closed"
        );
    }
    shed
}

/// Warns (at start and after each reload) when the admin API is reachable from other hosts
/// without credentials: it can point live traffic anywhere (add an instance), reload and purge.
fn warn_of_risky_settings(config: &Config) {
    for (key, warning) in config
        .tls
        .iter()
        .flat_map(|tls| tls.warnings(std::time::SystemTime::now()))
    {
        tracing::warn!(key, "{warning}");
    }
    let admin = config.admin.listen;
    if !admin.ip().to_canonical().is_loopback() && config.admin.credentials.is_none() {
        tracing::warn!(%admin, "the admin API is reachable from other hosts without credentials: set admin.username and admin.password");
    }
    // A delay nginx would take as well, but one a client (and a stop's grace) rarely waits out.
    let mut said = std::collections::HashSet::new();
    for rule in config.limits.routes.iter().flat_map(|route| &route.rules) {
        let Some(undelayed) = rule.delay else {
            continue;
        };
        let longest = crate::ratelimit::algorithm::longest_wait(&rule.quota, undelayed);
        if longest > LONG_RATE_LIMIT_WAIT && said.insert(&rule.name) {
            tracing::warn!(
                rule = %rule.name,
                longest_wait_secs = longest.as_secs(),
                "a rate limit's delay can hold a request this long: lower its burst or delay's gap, or shorten its period"
            );
        }
    }
}

/// A rate limit's longest wait past which the start and each reload warn of it.
const LONG_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);

async fn reload_on_sighup(gateway: Arc<Gateway>, mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        if let Err(errors) = gateway.reload_aside().await {
            log_refused_reload(&errors);
        }
    }
}

/// Logs a refused reload, an event per problem: each stays one line of the log.
pub fn log_refused_reload(errors: &ConfigErrors) {
    for error in &errors.0 {
        tracing::error!("reload refused, the running configuration stays: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shed by anyone counts for the attempts that began before it, not for later ones.
    #[test]
    fn a_shed_counts_for_attempts_that_began_before_it() {
        let began = tokio::time::Instant::now();
        let shed_at = began + Duration::from_millis(5);
        LAST_SHED_MS.store(crate::clock::ticks_ms(shed_at), Ordering::Relaxed);
        assert!(shed_since(began));
        assert!(!shed_since(shed_at + Duration::from_secs(5)));
    }

    fn config(autoscale: &str) -> Config {
        Config::from_toml(&format!(
            "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n{autoscale}\n[[routes]]\nupstream = \"app\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn autoscalers_reload_their_bounds_not_what_they_start_with() {
        let table = "[upstreams.app.autoscale]\nmax = 4\ntarget = { in_flight_per_instance = 8 }\n\
                     command = \"{self} demo-backend --port {port}\"";
        let running = config(table);
        let keys = |next: &Config| -> Vec<String> {
            restart_only_changes(&running, next, false)
                .into_iter()
                .map(|e| e.key)
                .collect()
        };
        assert!(keys(&config(table)).is_empty());
        assert!(keys(&config(&table.replace("max = 4", "max = 8"))).is_empty());
        for (changed, key) in [
            (format!("{table}\nstop_grace = \"30s\""), ".stop_grace"),
            (format!("{table}\ndrain_timeout = \"2m\""), ".drain_timeout"),
            (table.replace("demo-backend", "demo-backend2"), ".command"),
            (String::new(), ""),
        ] {
            assert_eq!(
                keys(&config(&changed)),
                [format!("upstreams.app.autoscale{key}")],
                "{changed}"
            );
        }
    }

    #[test]
    fn redis_and_limiter_settings_are_refused_by_name_on_reload() {
        let running = config("[state]\nredis_url = \"redis://127.0.0.1:1\"");
        let keys = |next: &str| -> Vec<String> {
            restart_only_changes(&running, &config(next), true)
                .into_iter()
                .map(|e| e.key)
                .collect()
        };
        assert!(keys("[state]\nredis_url = \"redis://127.0.0.1:1\"").is_empty());
        assert_eq!(
            keys(
                "[state]\nredis_url = \"redis://127.0.0.1:2\"\non_redis_error = \"deny\"\n\
                  redis_timeout = \"2s\"\nredis_cluster = true\n\
                  [rate_limit]\nstore = \"redis\"\nmax_keys = 10"
            ),
            [
                "state.redis_url",
                "state.redis_cluster",
                "state.redis_timeout",
                "state.on_redis_error",
                "rate_limit.store",
                "rate_limit.max_keys"
            ]
        );
    }
}
