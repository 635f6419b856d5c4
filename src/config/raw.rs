//! The config file as written: serde types with defaults, and their validation into `Config`.
//! Defaults here are the documented ones (see `scalegate.example.toml`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;

use super::cache::{validate_cache, validate_route_cache, RawCache, RawRouteCache};
use super::limits::{
    self, RawAuth, RawRateLimit, RawRouteLimits, RawState, DEFAULT_QUEUE_SIZE,
    DEFAULT_QUEUE_TIMEOUT,
};
use super::{
    parse_hash_key, ActiveHealthConfig, AdminConfig, Config, ConfigErrors, InstanceConfig,
    PassiveHealthConfig, Problems, RouteConfig, ServerConfig, UpstreamConfig,
};
use crate::balance::Strategy;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub cache: RawCache,
    pub tls: Option<super::tls::RawTls>,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
    #[serde(default)]
    pub auth: RawAuth,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawServer {
    pub listen: String,
    pub admin_listen: Option<String>,
    pub workers: Option<usize>,
    pub access_log: bool,
    pub metrics: bool,
    #[serde(deserialize_with = "super::units::size_text")]
    pub max_body: String,
    #[serde(deserialize_with = "super::units::size_text")]
    pub max_header_size: String,
    pub underscores_in_headers: bool,
    #[serde(deserialize_with = "super::units::size_text")]
    pub max_uri_length: String,
    pub max_headers: usize,
    pub header_read_timeout: String,
    pub idle_timeout: String,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub body_read_timeout: String,
    #[serde(deserialize_with = "super::units::size_text")]
    pub min_body_rate: String,
    pub shutdown_grace: String,
    pub shutdown_delay: String,
    pub http2: limits::RawHttp2,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            admin_listen: None,
            workers: None,
            access_log: true,
            metrics: true,
            max_body: "10MiB".into(),
            max_header_size: "32KiB".into(),
            underscores_in_headers: false,
            max_uri_length: "8KiB".into(),
            max_headers: DEFAULT_MAX_HEADERS,
            header_read_timeout: "10s".into(),
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            idle_timeout: "60s".into(),
            body_read_timeout: "30s".into(),
            min_body_rate: "1KiB".into(),
            shutdown_grace: "30s".into(),
            shutdown_delay: "0s".into(),
            http2: limits::RawHttp2::default(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawUpstream {
    pub strategy: String,
    pub hash_key: Option<String>,
    pub instances: Vec<RawInstance>,
    pub keepalive: usize,
    pub keepalive_requests: u64,
    pub pipeline: Option<usize>,
    pub connect_timeout: String,
    pub response_timeout: String,
    pub idle_timeout: String,
    pub retries: u32,
    pub retry_on_status: Vec<u16>,
    pub retry_budget: f64,
    pub slow_start: String,
    pub drain_timeout: String,
    pub health: Option<RawActiveHealth>,
    pub max_fails: u32,
    pub fail_timeout: String,
    pub fail_on_status: Vec<u16>,
    pub max_in_flight: u32,
    pub queue_size: usize,
    pub queue_timeout: String,
    pub autoscale: Option<super::autoscale::RawAutoscale>,
    pub protocol: String,
    pub tls: Option<super::upstream_tls::RawUpstreamTls>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            strategy: "round_robin".into(),
            hash_key: None,
            instances: Vec::new(),
            keepalive: 256,
            keepalive_requests: DEFAULT_KEEPALIVE_REQUESTS,
            pipeline: None,
            connect_timeout: "2s".into(),
            response_timeout: "60s".into(),
            idle_timeout: "60s".into(),
            retries: 2,
            retry_on_status: Vec::new(),
            retry_budget: 20.0,
            slow_start: "0s".into(),
            drain_timeout: "30s".into(),
            health: None,
            max_fails: 1,
            fail_timeout: "10s".into(),
            fail_on_status: Vec::new(),
            max_in_flight: 0,
            queue_size: DEFAULT_QUEUE_SIZE,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT.into(),
            autoscale: None,
            protocol: "http1".into(),
            tls: None,
        }
    }
}

/// An instance: `"host:port"` or a table. Not a serde `untagged` enum: that would take a
/// table with a misspelt key as the plain form's defaults and report a wrong type without the
/// field; the table form here names the field in type errors (its unknown keys are reported
/// with every other one's, by `Config::from_toml`).
#[derive(Debug)]
pub enum RawInstance {
    Addr(String),
    Table(RawInstanceTable),
}

#[derive(Debug, Deserialize)]
pub struct RawInstanceTable {
    addr: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    backup: bool,
}

impl<'de> Deserialize<'de> for RawInstance {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InstanceVisitor;
        impl<'de> serde::de::Visitor<'de> for InstanceVisitor {
            type Value = RawInstance;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an address \"host:port\" or a table { addr, weight, backup }")
            }

            fn visit_str<E: serde::de::Error>(self, addr: &str) -> Result<RawInstance, E> {
                Ok(RawInstance::Addr(addr.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                table: A,
            ) -> Result<RawInstance, A::Error> {
                let table = serde::de::value::MapAccessDeserializer::new(table);
                RawInstanceTable::deserialize(table).map(RawInstance::Table)
            }
        }
        deserializer.deserialize_any(InstanceVisitor)
    }
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawActiveHealth {
    pub path: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub interval: String,
    pub timeout: String,
    pub rise: u32,
    pub fall: u32,
    #[serde(deserialize_with = "super::units::status_text")]
    pub expect_status: String,
}

impl Default for RawActiveHealth {
    fn default() -> Self {
        RawActiveHealth {
            path: "/health".into(),
            host: None,
            port: None,
            interval: "5s".into(),
            timeout: "2s".into(),
            rise: 2,
            fall: 3,
            expect_status: "200-399".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct RawRoute {
    pub name: Option<String>,
    pub host: Option<String>,
    #[serde(default = "root")]
    pub path_prefix: String,
    #[serde(default)]
    pub strip_prefix: bool,
    pub upstream: String,
    pub cache: Option<RawRouteCache>,
    #[serde(default)]
    pub rate_limits: Option<Vec<limits::RawRule>>,
    #[serde(default)]
    pub auth: Option<String>,
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    #[serde(default)]
    pub queue_size: Option<usize>,
    #[serde(default)]
    pub queue_timeout: Option<String>,
}

fn root() -> String {
    "/".into()
}

impl RawConfig {
    pub(super) fn from_flags(listen: &str, admin_listen: &str, upstreams: &[String]) -> RawConfig {
        let upstream = RawUpstream {
            instances: upstreams.iter().cloned().map(RawInstance::Addr).collect(),
            ..RawUpstream::default()
        };
        RawConfig {
            server: RawServer {
                listen: listen.to_string(),
                admin_listen: Some(admin_listen.to_string()),
                ..RawServer::default()
            },
            admin: RawAdmin::default(),
            upstreams: BTreeMap::from([("default".to_string(), upstream)]),
            routes: vec![RawRoute {
                name: None,
                host: None,
                path_prefix: root(),
                strip_prefix: false,
                upstream: "default".into(),
                cache: None,
                rate_limits: None,
                auth: None,
                max_in_flight: None,
                queue_size: None,
                queue_timeout: None,
            }],
            cache: RawCache::default(),
            tls: None,
            state: RawState::default(),
            rate_limit: RawRateLimit::default(),
            auth: RawAuth::default(),
        }
    }

    pub(super) fn validate(mut self) -> Result<Config, ConfigErrors> {
        let mut p = Problems::default();
        let server = validate_server(&mut p, &self.server);
        // Two spellings of one key: `[admin] listen` and `[server] admin_listen`.
        let (admin_key, admin_listen) = match (&self.admin.listen, &self.server.admin_listen) {
            (Some(admin), Some(server)) if admin != server => {
                p.push(
                    "server.admin_listen",
                    format!("`{server}` differs from admin.listen `{admin}`: set one of the two"),
                );
                ("admin.listen", admin.as_str())
            }
            (Some(admin), _) => ("admin.listen", admin.as_str()),
            (None, Some(server)) => ("server.admin_listen", server.as_str()),
            (None, None) => ("admin.listen", "127.0.0.1:9090"),
        };
        let admin = AdminConfig {
            listen: p.addr(admin_key, admin_listen),
            listen_key: admin_key,
            credentials: match (self.admin.username, self.admin.password) {
                (Some(_), Some(pass)) if pass.is_empty() => {
                    p.push("admin.password", "must not be empty");
                    None
                }
                (Some(user), Some(pass)) => Some((user, pass)),
                (None, None) => None,
                _ => {
                    p.push("admin", "username and password must be set together");
                    None
                }
            },
        };
        if self.upstreams.is_empty() {
            p.push("upstreams", "at least one upstream is needed");
        }
        let upstreams: Vec<UpstreamConfig> = self
            .upstreams
            .iter()
            .map(|(name, raw)| validate_upstream(&mut p, name, raw))
            .collect();
        if self.routes.is_empty() {
            p.push(
                "routes",
                "at least one route is needed (e.g. [[routes]] upstream = \"app\")",
            );
        }
        // Given names label metrics and rate limits: two routes may not share one. Unnamed
        // routes take their upstream's name, which routes to one upstream do share.
        for (i, route) in self.routes.iter().enumerate() {
            let Some(name) = &route.name else { continue };
            if name == "-" {
                p.push(
                    format!("routes[{i}].name"),
                    "`-` labels the requests no route took in the metrics: choose another",
                );
            }
            if let Some(first) = self.routes[..i]
                .iter()
                .position(|earlier| earlier.name.as_ref() == Some(name))
            {
                p.push(
                    format!("routes[{i}].name"),
                    format!("`{name}` is already the name of routes[{first}]"),
                );
            }
        }
        let route_limits: Vec<(String, RawRouteLimits)> = self
            .routes
            .iter_mut()
            .map(|raw| {
                let name = raw.name.clone().unwrap_or_else(|| raw.upstream.clone());
                let limits = RawRouteLimits {
                    rate_limits: raw.rate_limits.take(),
                    auth: raw.auth.take(),
                    max_in_flight: raw.max_in_flight,
                    queue_size: raw.queue_size,
                    queue_timeout: raw.queue_timeout.take(),
                };
                (name, limits)
            })
            .collect();
        let upstream_limits: Vec<(String, u32, usize, String)> = self
            .upstreams
            .iter()
            .map(|(name, raw)| {
                (
                    name.clone(),
                    raw.max_in_flight,
                    raw.queue_size,
                    raw.queue_timeout.clone(),
                )
            })
            .collect();
        let limits = limits::validate(
            &mut p,
            &self.state,
            &self.rate_limit,
            &self.auth,
            &route_limits,
            &upstream_limits,
        );
        let mut first_with: BTreeMap<(Option<String>, String), usize> = BTreeMap::new();
        let routes = self
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, raw)| {
                let key = format!("routes[{i}]");
                // An IPv6 address is compared without its brackets, as a Host's is read.
                let host = raw.host.map(|h| {
                    let h = h.to_ascii_lowercase();
                    match h.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                        Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6.to_owned(),
                        _ => h,
                    }
                });
                if let Some(problem) = host.as_deref().and_then(host_problem) {
                    p.push(format!("{key}.host"), problem);
                }
                let matches = (host.clone(), raw.path_prefix.clone());
                if let Some(first) = first_with.get(&matches) {
                    p.push(
                        key.clone(),
                        format!("same host and path_prefix as routes[{first}], which is always chosen first"),
                    );
                } else {
                    first_with.insert(matches, i);
                }
                if !self.upstreams.contains_key(&raw.upstream) {
                    p.push(
                        format!("{key}.upstream"),
                        format!("no upstream named `{}`", raw.upstream),
                    );
                }
                if let Some(problem) = path_prefix_problem(&raw.path_prefix) {
                    p.push(format!("{key}.path_prefix"), problem);
                }
                let cache = raw.cache.as_ref().map(|c| {
                    validate_route_cache(&mut p, &format!("{key}.cache"), c, host.as_deref())
                });
                RouteConfig {
                    name: raw.name.unwrap_or_else(|| raw.upstream.clone()),
                    host,
                    path_prefix: raw.path_prefix,
                    strip_prefix: raw.strip_prefix,
                    upstream: raw.upstream,
                    cache,
                }
            })
            .collect();
        let cache = validate_cache(&mut p, &self.cache, !limits.state.redis_urls.is_empty());
        let tls = self
            .tls
            .as_ref()
            .map(|raw| super::tls::validate_tls(&mut p, raw));
        let mut listeners = vec![("server.listen", server.listen), (admin_key, admin.listen)];
        listeners.extend(tls.as_ref().map(|tls| ("tls.listen", tls.listen)));
        for (i, (key, addr)) in listeners.iter().enumerate() {
            if let Some((other, _)) = listeners[..i]
                .iter()
                .find(|(_, earlier)| listeners_clash(*earlier, *addr))
            {
                p.push(
                    *key,
                    format!("{addr} takes the port of {other}: each listener needs its own"),
                );
            }
        }
        p.finish(Config {
            server,
            admin,
            upstreams,
            routes,
            cache,
            tls,
            limits,
        })
    }
}

/// Two listeners that could not both bind: the same port (other than 0, any free port) on the
/// same address, or under a wildcard: 0.0.0.0 takes the port on every IPv4 address, :: on every
/// address (dual stack, as the listeners are opened).
fn listeners_clash(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wide: SocketAddr, other: SocketAddr| match wide.ip() {
        std::net::IpAddr::V6(ip) => ip.is_unspecified(),
        std::net::IpAddr::V4(ip) => ip.is_unspecified() && other.is_ipv4(),
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// Why a route's `path_prefix` could never match, if so. Requests are matched on their path
/// decoded (`%XX`), with `.` and `..` resolved and slashes merged (`proxy::router`), so a prefix
/// must be in that form itself, and hold no query or fragment.
fn path_prefix_problem(prefix: &str) -> Option<String> {
    if !prefix.starts_with('/') {
        return Some("must start with /".into());
    }
    if prefix.contains(['?', '#']) {
        return Some("routes match the path alone: no `?` or `#` (and what follows)".into());
    }
    if prefix.chars().any(char::is_control) {
        return Some("holds a control character, which no request's path may hold".into());
    }
    let normal = crate::proxy::router::normalized_path(prefix);
    if *normal != *prefix.as_bytes() {
        let written = std::str::from_utf8(&normal)
            .ok()
            .filter(|text| !text.chars().any(char::is_control));
        let Some(written) = written else {
            return Some(
                "never matches: requests are matched on their path decoded, and this one \
                 decodes to bytes that are not text (or to a control character)"
                    .into(),
            );
        };
        return Some(format!(
            "never matches: requests are matched on their path decoded, with `.` and `..` \
             resolved and repeated slashes merged; write `{written}`"
        ));
    }
    None
}

/// Why a route's `host` (lowercased) could never match a request's Host, if so: it is a name
/// or an IP address, or `*.` and a name; without a port, as ports are not compared.
pub(super) fn host_problem(host: &str) -> Option<&'static str> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name.contains("://") {
        return Some("names a scheme: give the host alone");
    }
    if name.contains(':') {
        return Some("names a port: ports are not compared, give the host alone");
    }
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.split('.').all(label) {
        None
    } else {
        Some("is not a host name: letters, digits, `-` and dots, `*.` in front for subdomains")
    }
}

/// hyper's own limit: keeping it lets hyper parse heads on the stack.
pub const DEFAULT_MAX_HEADERS: usize = 100;

/// The most header fields a config may allow: a request's fields land in a map that holds at
/// most 32,768 (more panicked its connection), and each request sets room aside for this many
/// (a huge number ran the gateway out of memory). HAProxy's `tune.http.maxhdr` tops out near
/// the same.
const MOST_MAX_HEADERS: usize = 10_000;

/// The most runtime worker threads a config may ask for.
const MAX_WORKERS: usize = 1024;

fn validate_server(p: &mut Problems, raw: &RawServer) -> ServerConfig {
    if !(1..=MOST_MAX_HEADERS).contains(&raw.max_headers) {
        p.push(
            "server.max_headers",
            format!("must be from 1 to {MOST_MAX_HEADERS}"),
        );
    }
    match raw.workers {
        Some(0) => p.push(
            "server.workers",
            "must be at least 1 (leave it out for one per CPU)",
        ),
        // Thousands of threads serve no better than one per CPU, and where a container caps
        // threads or memory the runtime cannot even start them.
        Some(workers) if workers > MAX_WORKERS => p.push(
            "server.workers",
            format!("must be at most {MAX_WORKERS} (leave it out for one per CPU)"),
        ),
        _ => {}
    }
    let max_header_bytes = p.size("server.max_header_size", &raw.max_header_size) as usize;
    if max_header_bytes < 8192 {
        p.push_unless_reported("server.max_header_size", "must be at least 8KiB");
    }
    let max_uri_length = p.size("server.max_uri_length", &raw.max_uri_length);
    if max_uri_length < 16 {
        p.push_unless_reported("server.max_uri_length", "must be at least 16 bytes");
    } else if max_uri_length > max_header_bytes as u64 && max_header_bytes >= 8192 {
        // The request line is part of the head: such a target would get 431, never reach
        // this limit's 414.
        p.push_unless_reported(
            "server.max_uri_length",
            format!(
                "must be at most server.max_header_size ({max_header_bytes} bytes): the request line counts toward the head"
            ),
        );
    }
    ServerConfig {
        listen: p.addr("server.listen", &raw.listen),
        workers: raw.workers,
        access_log: raw.access_log,
        metrics: raw.metrics,
        // 0 lifts the limit, as nginx's `client_max_body_size 0` does.
        max_body: match p.size("server.max_body", &raw.max_body) {
            0 => u64::MAX,
            bytes => bytes,
        },
        max_header_bytes,
        underscores_in_headers: raw.underscores_in_headers,
        max_uri_length: max_uri_length as usize,
        max_headers: raw.max_headers,
        header_read_timeout: p
            .positive_duration("server.header_read_timeout", &raw.header_read_timeout),
        max_connections: raw.max_connections,
        max_connections_per_ip: raw.max_connections_per_ip,
        idle_timeout: p.positive_duration("server.idle_timeout", &raw.idle_timeout),
        body_read_timeout: p.duration("server.body_read_timeout", &raw.body_read_timeout),
        min_body_rate: p.size("server.min_body_rate", &raw.min_body_rate),
        http2: limits::validate_http2(p, &raw.http2),
        shutdown_grace: p.duration("server.shutdown_grace", &raw.shutdown_grace),
        shutdown_delay: p.duration("server.shutdown_delay", &raw.shutdown_delay),
    }
}

/// Requests per pipelined connection when the config names none: plain HTTP/1.1 instances
/// are pipelined to (see `proxy::pipeline` for when a request queues and when it does not);
/// TLS and HTTP/2 ones are not, nor are instances of an upstream that keeps no connections
/// open (`keepalive = 0`).
pub const DEFAULT_PIPELINE: usize = 32;

/// Requests one instance connection carries before it is closed, as nginx's upstream
/// `keepalive_requests` (also its default, and nginx's own default as a server): a line
/// retired by the gateway loses no request queued on it, where one the instance closes does,
/// and a server's state per connection (nginx's grows with every pipelined request and takes
/// milliseconds to free after a million) is freed often.
pub const DEFAULT_KEEPALIVE_REQUESTS: u64 = 1000;

fn default_pipeline(plain_http1: bool, keepalive: usize) -> usize {
    if plain_http1 && keepalive > 0 {
        DEFAULT_PIPELINE
    } else {
        1
    }
}

/// The statuses listed under `key`, each of which must be from `lowest` to 599 (`what` says
/// what such a status is).
fn statuses(p: &mut Problems, key: &str, listed: &[u16], (lowest, what): (u16, &str)) -> Vec<u16> {
    for status in listed.iter().filter(|s| !(lowest..=599).contains(*s)) {
        p.push(key.to_owned(), format!("{status} is not {what}"));
    }
    listed.to_vec()
}

fn validate_upstream(p: &mut Problems, name: &str, raw: &RawUpstream) -> UpstreamConfig {
    let key = format!("upstreams.{name}");
    // The name is a route's `upstream`, a metrics label, a segment of admin API paths and
    // of the dotted key paths problems are reported under (`upstreams.api.v1.retries` would
    // name another table, and its line); `-` labels the requests no route took.
    if name.is_empty()
        || name == "-"
        || name.contains(['/', '?', '#', '.'])
        || name.chars().any(char::is_control)
    {
        p.push(
            key.clone(),
            "an upstream name must be non-empty, not `-`, without `/`, `?`, `#`, `.` or control characters",
        );
    }
    let strategy = Strategy::from_name(&raw.strategy, || {
        parse_hash_key(
            p,
            &format!("{key}.hash_key"),
            raw.hash_key.as_deref().unwrap_or("ip"),
        )
    })
    .unwrap_or_else(|| {
        let names: Vec<&str> = Strategy::names().collect();
        let (last, others) = names.split_last().expect("strategies exist");
        p.push(
            format!("{key}.strategy"),
            format!(
                "`{}`: expected {} or {last}",
                raw.strategy,
                others.join(", ")
            ),
        );
        Strategy::RoundRobin
    });
    if raw.hash_key.is_some() && !matches!(strategy, Strategy::ConsistentHash(_)) {
        p.push(
            format!("{key}.hash_key"),
            "only used with strategy = \"consistent_hash\"",
        );
    }
    if raw.instances.is_empty() && raw.autoscale.is_none() {
        p.push(
            format!("{key}.instances"),
            "at least one instance is needed (or an autoscale table)",
        );
    }
    let mut instances: Vec<InstanceConfig> = Vec::new();
    let mut https = 0;
    for (i, instance) in raw.instances.iter().enumerate() {
        let ikey = format!("{key}.instances[{i}]");
        let (addr, weight, backup) = match instance {
            RawInstance::Addr(addr) => (addr.as_str(), 1, false),
            RawInstance::Table(table) => (table.addr.as_str(), table.weight, table.backup),
        };
        match InstanceConfig::parse(addr, weight, backup) {
            Ok((instance, tls)) => {
                https += usize::from(tls);
                if instances.iter().any(|seen| seen.addr == instance.addr) {
                    p.push(&ikey, format!("{} is listed twice", instance.addr));
                }
                instances.push(instance);
            }
            Err(problems) => {
                for (field, message) in problems {
                    p.push(format!("{ikey}{field}"), message);
                }
            }
        }
    }
    if !(0.0..=1000.0).contains(&raw.retry_budget) {
        p.push(
            format!("{key}.retry_budget"),
            "a percentage between 0 and 1000",
        );
    }
    let health = raw.health.as_ref().map(|h| {
        let hkey = format!("{key}.health");
        if h.rise == 0 {
            p.push(format!("{hkey}.rise"), "must be at least 1");
        }
        if h.fall == 0 {
            p.push(format!("{hkey}.fall"), "must be at least 1");
        }
        // A path no request line can carry would fail every probe, and so take the upstream down.
        if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
            p.push(
                format!("{hkey}.path"),
                format!("`{}` is not a path starting with /", h.path),
            );
        }
        let host = h.host.as_deref().filter(|host| {
            // `Authority` takes any digits for a port; a port is 1 to 65535.
            let port = (!host.ends_with(']'))
                .then(|| host.rsplit_once(':'))
                .flatten()
                .map(|(_, port)| port);
            let valid = !host.contains('@')
                && port.is_none_or(|port| port.parse::<u16>().is_ok_and(|n| n > 0))
                && host
                    .parse::<http::uri::Authority>()
                    .is_ok_and(|a| a.as_str() == *host);
            if !valid {
                p.push(
                    format!("{hkey}.host"),
                    format!("`{host}` is not a host name (with an optional :port)"),
                );
            }
            valid
        });
        let expect_status = parse_status_range(&h.expect_status).unwrap_or_else(|| {
            p.push(
                format!("{hkey}.expect_status"),
                "expected a status or range such as 200-399",
            );
            (200, 399)
        });
        if h.port == Some(0) {
            p.push(format!("{hkey}.port"), "expected a port from 1 to 65535");
        }
        ActiveHealthConfig {
            path: h.path.clone(),
            host: host.map(str::to_owned),
            port: h.port.filter(|port| *port > 0),
            interval: p.positive_duration(&format!("{hkey}.interval"), &h.interval),
            timeout: p.positive_duration(&format!("{hkey}.timeout"), &h.timeout),
            rise: h.rise,
            fall: h.fall,
            expect_status,
        }
    });
    let connect_timeout =
        p.positive_duration(&format!("{key}.connect_timeout"), &raw.connect_timeout);
    let response_timeout =
        p.positive_duration(&format!("{key}.response_timeout"), &raw.response_timeout);
    let drain_timeout = p.duration(&format!("{key}.drain_timeout"), &raw.drain_timeout);
    let autoscale = raw.autoscale.as_ref().map(|auto| {
        super::autoscale::validate(p, &format!("{key}.autoscale"), auto, drain_timeout)
    });
    let (protocol, tls) = super::upstream_tls::validate(
        p,
        &key,
        &raw.protocol,
        raw.tls.as_ref(),
        https > 0,
        https == raw.instances.len(),
    );
    let plain_http1 = !protocol.is_http2() && tls.is_none();
    let pipeline = match raw.pipeline {
        Some(0) => {
            p.push(
                format!("{key}.pipeline"),
                "must be at least 1 (1 = no pipelining)",
            );
            1
        }
        Some(depth) if depth > 1 && !plain_http1 => {
            p.push(
                format!("{key}.pipeline"),
                "pipelining is for plain HTTP/1.1 instances (no `tls`, protocol \"http1\")",
            );
            1
        }
        Some(depth) => depth,
        None => default_pipeline(plain_http1, raw.keepalive),
    };
    if raw.keepalive_requests == 0 {
        p.push(
            format!("{key}.keepalive_requests"),
            "must be at least 1 (requests per instance connection)",
        );
    }
    UpstreamConfig {
        name: name.to_string(),
        strategy,
        instances,
        keepalive: raw.keepalive,
        keepalive_requests: raw.keepalive_requests.max(1),
        pipeline,
        connect_timeout,
        response_timeout,
        // keepalive = 0 is how pooling is turned off; an idle time of 0 would only hide that.
        idle_timeout: p.positive_duration(&format!("{key}.idle_timeout"), &raw.idle_timeout),
        retries: raw.retries,
        retry_on_status: statuses(
            p,
            &format!("{key}.retry_on_status"),
            &raw.retry_on_status,
            (400, "an error status (400-599)"),
        ),
        retry_budget: raw.retry_budget / 100.0,
        slow_start: p.duration(&format!("{key}.slow_start"), &raw.slow_start),
        health,
        passive: PassiveHealthConfig {
            max_fails: raw.max_fails,
            // max_fails = 0 is how passive checks are turned off.
            fail_timeout: p.positive_duration(&format!("{key}.fail_timeout"), &raw.fail_timeout),
            fail_on_status: statuses(
                p,
                &format!("{key}.fail_on_status"),
                &raw.fail_on_status,
                (100, "an HTTP status (100-599)"),
            ),
        },
        drain_timeout,
        autoscale,
        protocol,
        tls,
    }
}

/// `200`, `200-399` → inclusive range.
fn parse_status_range(text: &str) -> Option<(u16, u16)> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let low: u16 = low.trim().parse().ok()?;
    let high: u16 = high.trim().parse().ok()?;
    ((100..=599).contains(&low) && (low..=599).contains(&high)).then_some((low, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_ranges() {
        assert_eq!(parse_status_range("200-399"), Some((200, 399)));
        assert_eq!(parse_status_range("204"), Some((204, 204)));
        assert_eq!(parse_status_range("399-200"), None);
        assert_eq!(parse_status_range("abc"), None);
    }
}
