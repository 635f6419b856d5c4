//! Config of what may pass the gateway: `[state]` (Redis), `[rate_limit]` (store, trusted
//! proxies, default rules), `[auth]` (API keys), the per-route / per-upstream keys for rate
//! limits, API keys and concurrency limits, and `[server.http2]` (what an HTTP/2 client may
//! open and send). Raw serde types and their validation.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::Deserialize;

use super::Problems;
use crate::ratelimit::algorithm::{Algorithm, Quota};

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawState {
    pub redis_url: Option<String>,
    /// PEM file of the CA that signed the server certificate of `rediss://` URLs (instead of
    /// the system roots).
    pub redis_ca: Option<String>,
    pub redis_cluster: bool,
    pub redis_timeout: String,
    pub on_redis_error: String,
}

impl Default for RawState {
    fn default() -> Self {
        RawState {
            redis_url: None,
            redis_ca: None,
            redis_cluster: false,
            redis_timeout: "50ms".into(),
            on_redis_error: "local".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawRateLimit {
    pub store: String,
    pub trusted_proxies: Vec<String>,
    pub max_keys: usize,
    pub rules: Vec<RawRule>,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        RawRateLimit {
            store: "memory".into(),
            trusted_proxies: Vec::new(),
            max_keys: 100_000,
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct RawRule {
    pub name: Option<String>,
    #[serde(default = "ip")]
    pub key: String,
    pub limit: u64,
    pub period: String,
    #[serde(default)]
    pub burst: u64,
    pub delay: Option<u64>,
    #[serde(default = "gcra")]
    pub algorithm: String,
}

fn ip() -> String {
    "ip".into()
}

fn gcra() -> String {
    "gcra".into()
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawAuth {
    pub api_keys: Vec<String>,
    pub api_keys_file: Option<String>,
    pub header: String,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            api_keys: Vec::new(),
            api_keys_file: None,
            header: "X-API-Key".into(),
        }
    }
}

/// `[server.http2]`: the settings the gateway announces to HTTP/2 clients, and its pings.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawHttp2 {
    pub max_concurrent_streams: u32,
    #[serde(deserialize_with = "super::units::size_text")]
    pub initial_stream_window: String,
    /// Left out: [`DEFAULT_CONNECTION_WINDOW`], or the stream window when that is larger.
    #[serde(deserialize_with = "super::units::optional_size_text")]
    pub initial_connection_window: Option<String>,
    #[serde(deserialize_with = "super::units::size_text")]
    pub max_frame_size: String,
    pub keep_alive_interval: String,
    pub keep_alive_timeout: String,
}

impl Default for RawHttp2 {
    fn default() -> Self {
        RawHttp2 {
            max_concurrent_streams: 256,
            initial_stream_window: "256KiB".into(),
            initial_connection_window: None,
            max_frame_size: "16KiB".into(),
            keep_alive_interval: "30s".into(),
            keep_alive_timeout: "20s".into(),
        }
    }
}

/// Validated `[server.http2]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Config {
    pub max_concurrent_streams: u32,
    pub initial_stream_window: u32,
    pub initial_connection_window: u32,
    pub max_frame_size: u32,
    /// `None`: no pings.
    pub keep_alive_interval: Option<Duration>,
    pub keep_alive_timeout: Duration,
}

/// The connection's flow-control window when none is given: room for several streams' windows,
/// so that one upload its instance is slow to read does not hold up the others.
const DEFAULT_CONNECTION_WINDOW: u32 = 2 << 20;

/// Largest flow-control window HTTP/2 allows (RFC 9113 §6.9.1).
const MAX_WINDOW: u64 = (1 << 31) - 1;

pub(super) fn validate_http2(p: &mut Problems, raw: &RawHttp2) -> Http2Config {
    let key = |name: &str| format!("server.http2.{name}");
    if raw.max_concurrent_streams == 0 {
        p.push(key("max_concurrent_streams"), "must be at least 1");
    }
    let mut size_in = |name: &str, text: &str, range: std::ops::RangeInclusive<u64>, why: &str| {
        let size = p.size(&key(name), text);
        if !range.contains(&size) {
            p.push_unless_reported(&key(name), format!("{size} bytes: {why}"));
        }
        size.clamp(*range.start(), *range.end()) as u32
    };
    let initial_stream_window = size_in(
        "initial_stream_window",
        &raw.initial_stream_window,
        1..=MAX_WINDOW,
        "must be between 1 and 2147483647 (2^31 - 1)",
    );
    let initial_connection_window = match &raw.initial_connection_window {
        Some(text) => size_in(
            "initial_connection_window",
            text,
            65_535..=MAX_WINDOW,
            "must be between 65535 (the protocol's starting window) and 2147483647",
        ),
        // Raising the stream window alone keeps a config valid.
        None => initial_stream_window.max(DEFAULT_CONNECTION_WINDOW),
    };
    let max_frame_size = size_in(
        "max_frame_size",
        &raw.max_frame_size,
        16_384..=16_777_215,
        "must be between 16384 (16KiB) and 16777215 (16MiB - 1)",
    );
    if initial_connection_window < initial_stream_window {
        p.push_unless_reported(
            &key("initial_connection_window"),
            "must be at least initial_stream_window: one upload the instance is slow to read \
             would otherwise stop every other upload on the connection",
        );
    }
    let interval = p.duration(&key("keep_alive_interval"), &raw.keep_alive_interval);
    let keep_alive_timeout = p.duration(&key("keep_alive_timeout"), &raw.keep_alive_timeout);
    if !interval.is_zero() && keep_alive_timeout.is_zero() {
        p.push(
            key("keep_alive_timeout"),
            "must be more than 0 while keep_alive_interval is set (\"0s\" turns pings off)",
        );
    }
    Http2Config {
        max_concurrent_streams: raw.max_concurrent_streams.max(1),
        initial_stream_window,
        initial_connection_window,
        max_frame_size,
        keep_alive_interval: (!interval.is_zero()).then_some(interval),
        keep_alive_timeout,
    }
}

/// The limit-related keys of one `[[routes]]` entry.
#[derive(Debug, Default)]
pub struct RawRouteLimits {
    pub rate_limits: Option<Vec<RawRule>>,
    pub auth: Option<String>,
    pub max_in_flight: Option<u32>,
    pub queue_size: Option<usize>,
    pub queue_timeout: Option<String>,
}

/// Defaults of the concurrency keys, for routes and upstreams alike.
pub const DEFAULT_QUEUE_SIZE: usize = 100;
pub const DEFAULT_QUEUE_TIMEOUT: &str = "1s";

/// Everything that decides whether a request may go on, validated.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub state: StateConfig,
    pub store: StoreKind,
    pub trusted_proxies: Vec<IpNet>,
    pub max_keys: usize,
    pub auth: AuthConfig,
    /// By route position.
    pub routes: Vec<RouteLimits>,
    /// Upstreams with a `max_in_flight`, by name.
    pub upstreams: BTreeMap<String, ConcurrencyConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Redis,
}

#[derive(Clone)]
pub struct StateConfig {
    /// Node URLs (one, or several cluster seeds); they may hold a password.
    pub redis_urls: Vec<String>,
    /// PEM bytes of `state.redis_ca`.
    pub redis_ca: Option<Vec<u8>>,
    pub redis_cluster: bool,
    pub redis_timeout: Duration,
    pub on_redis_error: OnRedisError,
}

impl fmt::Debug for StateConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.redis_urls.iter().map(|u| redacted(u)).collect();
        f.debug_struct("StateConfig")
            .field("redis_urls", &urls)
            .field("redis_ca", &self.redis_ca.is_some())
            .field("redis_cluster", &self.redis_cluster)
            .field("redis_timeout", &self.redis_timeout)
            .field("on_redis_error", &self.on_redis_error)
            .finish()
    }
}

/// A Redis URL fit for logs: the password replaced by `***`.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let auth = &url[scheme + 3..at];
            let user = auth.split_once(':').map_or("", |(user, _)| user);
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        // Not URL-shaped (a scheme typo such as `redis:/:PW@host`): all before the `@` may be
        // the password.
        (_, Some(at)) => format!("***{}", &url[at..]),
        _ => url.to_string(),
    }
}

/// What a decision does when Redis does not answer within `redis_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRedisError {
    /// Decide with the in-process store and the same rules until Redis answers again.
    Local,
    Allow,
    /// Reject with 429 (never a 5xx).
    Deny,
}

#[derive(Clone)]
pub struct AuthConfig {
    pub header: HeaderName,
    pub api_keys: Vec<String>,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("header", &self.header)
            .field(
                "api_keys",
                &format_args!("[{} hidden]", self.api_keys.len()),
            )
            .finish()
    }
}

#[derive(Debug, Clone, Default)]
pub struct RouteLimits {
    pub api_key: bool,
    pub rules: Vec<RuleConfig>,
    pub concurrency: Option<ConcurrencyConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    /// Names the rule's counters and its Redis keys (`scalegate:rl:NAME:...`).
    pub name: String,
    pub key: RuleKey,
    pub quota: Quota,
    /// nginx `limit_req` without `nodelay`: requests of a burst past this many wait for their
    /// turn at the rate instead of going at once. `None`: none waits (`nodelay`).
    pub delay: Option<u64>,
}

/// What a rule counts requests by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleKey {
    ClientIp,
    /// The API key the request presented (its position in the list, never the key itself);
    /// requests without a known key count by client IP.
    ApiKey,
    /// Requests without the header count by client IP.
    Header(HeaderName),
    Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyConfig {
    pub max_in_flight: u32,
    pub queue_size: usize,
    pub queue_timeout: Duration,
}

/// Validates the limit sections; `routes` are (route name, its raw limit keys) in order.
pub(super) fn validate(
    p: &mut Problems,
    state: &RawState,
    rate_limit: &RawRateLimit,
    auth: &RawAuth,
    routes: &[(String, RawRouteLimits)],
    upstreams: &[(String, u32, usize, String)],
) -> LimitsConfig {
    let state = validate_state(p, state);
    let store = match rate_limit.store.as_str() {
        "memory" => StoreKind::Memory,
        "redis" => {
            if state.redis_urls.is_empty() {
                p.push("rate_limit.store", "\"redis\" needs state.redis_url");
            }
            StoreKind::Redis
        }
        other => {
            p.push(
                "rate_limit.store",
                format!("`{other}`: expected memory or redis"),
            );
            StoreKind::Memory
        }
    };
    let trusted_proxies = rate_limit
        .trusted_proxies
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            parse_net(text)
                .map_err(|err| p.push(format!("rate_limit.trusted_proxies[{i}]"), err))
                .ok()
        })
        .collect();
    if rate_limit.max_keys == 0 {
        p.push("rate_limit.max_keys", "must be at least 1");
    }
    let raw_auth_file = auth.api_keys_file.as_ref();
    let auth = validate_auth(p, auth);

    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let defaults: Vec<RuleConfig> = rate_limit
        .rules
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let key = format!("rate_limit.rules[{i}]");
            let default_name = format!("default{i}");
            validate_rule(p, &key, raw, &default_name, &mut names)
        })
        .collect();
    let routes = routes
        .iter()
        .enumerate()
        .map(|(i, (route_name, raw))| {
            let key = format!("routes[{i}]");
            let api_key = match raw.auth.as_deref() {
                None | Some("none") => false,
                Some("api_key") => {
                    // An unreadable key file is reported as such, not again here.
                    if auth.api_keys.is_empty() && raw_auth_file.is_none() {
                        p.push(
                            format!("{key}.auth"),
                            "\"api_key\" needs auth.api_keys or auth.api_keys_file",
                        );
                    }
                    true
                }
                Some(other) => {
                    p.push(
                        format!("{key}.auth"),
                        format!("`{other}`: expected api_key or none"),
                    );
                    false
                }
            };
            let rules = match &raw.rate_limits {
                None => defaults.clone(),
                Some(list) => list
                    .iter()
                    .enumerate()
                    .map(|(j, rule)| {
                        let default_name = if list.len() == 1 {
                            route_name.clone()
                        } else {
                            format!("{route_name}{j}")
                        };
                        validate_rule(
                            p,
                            &format!("{key}.rate_limits[{j}]"),
                            rule,
                            &default_name,
                            &mut names,
                        )
                    })
                    .collect(),
            };
            let concurrency = raw.max_in_flight.map(|max| {
                validate_concurrency(
                    p,
                    &key,
                    max,
                    raw.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
                    raw.queue_timeout
                        .as_deref()
                        .unwrap_or(DEFAULT_QUEUE_TIMEOUT),
                )
            });
            if raw.max_in_flight.is_none() {
                // Named by the key that was written.
                let given = [
                    ("queue_size", raw.queue_size.is_some()),
                    ("queue_timeout", raw.queue_timeout.is_some()),
                ];
                for (name, _) in given.iter().filter(|(_, given)| *given) {
                    p.push(
                        format!("{key}.{name}"),
                        "queue_size and queue_timeout only apply with max_in_flight",
                    );
                }
            }
            RouteLimits {
                api_key,
                rules,
                concurrency,
            }
        })
        .collect();
    let upstreams = upstreams
        .iter()
        .filter(|(_, max, _, _)| *max > 0)
        .map(|(name, max, queue_size, queue_timeout)| {
            let key = format!("upstreams.{name}");
            let config = validate_concurrency(p, &key, *max, *queue_size, queue_timeout);
            (name.clone(), config)
        })
        .collect();
    LimitsConfig {
        state,
        store,
        trusted_proxies,
        max_keys: rate_limit.max_keys.max(1),
        auth,
        routes,
        upstreams,
    }
}

fn validate_state(p: &mut Problems, raw: &RawState) -> StateConfig {
    let redis_urls: Vec<String> = raw
        .redis_url
        .iter()
        .flat_map(|urls| urls.split(','))
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    for url in &redis_urls {
        if redis::IntoConnectionInfo::into_connection_info(url.as_str()).is_err() {
            p.push(
                "state.redis_url",
                format!(
                    "`{}` is not a Redis URL (redis://[:PASSWORD@]HOST:PORT[/DB] or rediss://...)",
                    redacted(url)
                ),
            );
        }
    }
    if raw.redis_url.is_some() && redis_urls.is_empty() {
        p.push("state.redis_url", "is empty");
    }
    if redis_urls.len() > 1 && !raw.redis_cluster {
        p.push(
            "state.redis_url",
            "several URLs are only for Redis Cluster (set state.redis_cluster = true)",
        );
    }
    let redis_ca = raw.redis_ca.as_ref().and_then(|path| {
        if !redis_urls.iter().all(|url| url.starts_with("rediss://")) {
            p.push("state.redis_ca", "is only for rediss:// URLs");
        }
        // Parsed as certificates here, so a broken file is a config error, not a Redis that
        // looks unreachable; redis-rs takes the PEM bytes themselves.
        let pem = crate::tls::load_certificates(std::path::Path::new(path))
            .and_then(|_| std::fs::read(path).map_err(|err| format!("`{path}`: {err}")));
        match pem {
            Ok(pem) => Some(pem),
            Err(err) => {
                p.push("state.redis_ca", err);
                None
            }
        }
    });
    let redis_timeout = p.positive_duration("state.redis_timeout", &raw.redis_timeout);
    let on_redis_error = match raw.on_redis_error.as_str() {
        "local" => OnRedisError::Local,
        "allow" => OnRedisError::Allow,
        "deny" => OnRedisError::Deny,
        other => {
            p.push(
                "state.on_redis_error",
                format!("`{other}`: expected local, allow or deny"),
            );
            OnRedisError::Local
        }
    };
    StateConfig {
        redis_urls,
        redis_ca,
        redis_cluster: raw.redis_cluster,
        redis_timeout,
        on_redis_error,
    }
}

fn validate_auth(p: &mut Problems, raw: &RawAuth) -> AuthConfig {
    // Never echo a key itself.
    const BAD_KEY: &str = "must be at least 8 visible ASCII characters";
    // No space or tab either: a client's header value loses them at its ends, so such a key
    // could never match (and a `# note` after a key in the file would be part of it).
    let usable = |key: &str| key.len() >= 8 && key.bytes().all(|b| b.is_ascii_graphic());
    let mut api_keys: Vec<String> = raw.api_keys.clone();
    for (i, key) in api_keys.iter().enumerate() {
        if !usable(key) {
            p.push(format!("auth.api_keys[{i}]"), BAD_KEY);
        }
    }
    if let Some(path) = &raw.api_keys_file {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for (number, line) in text.lines().enumerate() {
                    let key = line.trim();
                    if key.is_empty() || key.starts_with('#') {
                        continue;
                    }
                    if !usable(key) {
                        let at = number + 1;
                        p.push("auth.api_keys_file", format!("{path} line {at}: {BAD_KEY}"));
                    }
                    api_keys.push(key.to_owned());
                }
            }
            Err(err) => {
                let shown = super::shown_path(std::path::Path::new(path));
                p.push("auth.api_keys_file", format!("cannot read {shown}: {err}"));
            }
        }
    }
    AuthConfig {
        header: p.header("auth.header", &raw.header),
        api_keys,
    }
}

fn validate_rule(
    p: &mut Problems,
    key: &str,
    raw: &RawRule,
    default_name: &str,
    names: &mut BTreeMap<String, String>,
) -> RuleConfig {
    let name = raw.name.clone().unwrap_or_else(|| default_name.to_string());
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        p.push(
            format!("{key}.name"),
            "letters, digits, - _ . only (it goes into headers and Redis keys)",
        );
    }
    if let Some(first) = names.insert(name.clone(), key.to_string()) {
        p.push(
            format!("{key}.name"),
            format!("`{name}` is already the name of {first}"),
        );
    }
    let rule_key = match raw.key.as_str() {
        "ip" => RuleKey::ClientIp,
        "api_key" => RuleKey::ApiKey,
        "route" => RuleKey::Route,
        other => match other.strip_prefix("header:") {
            Some(header) => RuleKey::Header(p.header(&format!("{key}.key"), header)),
            None => {
                p.push(
                    format!("{key}.key"),
                    format!("`{other}`: expected ip, api_key, route or header:NAME"),
                );
                RuleKey::ClientIp
            }
        },
    };
    let algorithm = match raw.algorithm.as_str() {
        "gcra" => Algorithm::Gcra,
        "sliding_window" => Algorithm::SlidingWindow,
        other => {
            p.push(
                format!("{key}.algorithm"),
                format!("`{other}`: expected gcra or sliding_window"),
            );
            Algorithm::Gcra
        }
    };
    let period = p.duration(&format!("{key}.period"), &raw.period);
    let period_us = period.as_micros().min(u128::from(u64::MAX)) as u64;
    if period_us < 1000 {
        p.push(format!("{key}.period"), "must be at least 1ms");
    }
    if raw.limit == 0 {
        p.push(format!("{key}.limit"), "must be at least 1");
    }
    // The Redis script computes in doubles: keep limit × period (µs), and burst × period, exact
    // in 53 bits. The larger of the two is the one named.
    let (larger, count) = if raw.burst > raw.limit {
        ("burst", raw.burst)
    } else {
        ("limit", raw.limit)
    };
    if u128::from(count) * u128::from(period_us) >= 1 << 52 {
        p.push(
            format!("{key}.{larger}"),
            format!("{larger} × period is too large (keep it below 4.5e15 requests·µs)"),
        );
    }
    if let Some(delay) = raw.delay.filter(|delay| *delay >= raw.burst) {
        if algorithm == Algorithm::Gcra {
            p.push(
                format!("{key}.delay"),
                format!(
                    "{delay} is not below burst ({}): no request would wait; leave delay out for that",
                    raw.burst
                ),
            );
        }
    }
    if algorithm == Algorithm::SlidingWindow {
        for (field, set) in [("burst", raw.burst > 0), ("delay", raw.delay.is_some())] {
            if set {
                p.push(
                    format!("{key}.{field}"),
                    "only used with algorithm = \"gcra\"",
                );
            }
        }
    }
    RuleConfig {
        name,
        key: rule_key,
        quota: Quota {
            algorithm,
            limit: raw.limit.max(1),
            period_us: period_us.max(1000),
            burst: raw.burst,
        },
        delay: raw.delay,
    }
}

fn validate_concurrency(
    p: &mut Problems,
    key: &str,
    max_in_flight: u32,
    queue_size: usize,
    queue_timeout: &str,
) -> ConcurrencyConfig {
    if max_in_flight == 0 {
        p.push(
            format!("{key}.max_in_flight"),
            "must be at least 1 (leave it out for no limit)",
        );
    }
    ConcurrencyConfig {
        max_in_flight: max_in_flight.max(1),
        queue_size,
        // queue_size = 0 is how a route refuses at once instead of queueing.
        queue_timeout: p.positive_duration(&format!("{key}.queue_timeout"), queue_timeout),
    }
}

/// `10.0.0.0/8`, `::1/128`, or a bare address (a single host).
/// An address or CIDR range; an IPv4-mapped IPv6 one (`::ffff:10.0.0.0/104`) as the IPv4 range it
/// is, since client addresses are compared as IPv4 (a dual-stack listener's peers included).
fn parse_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net = text
        .parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{text}` is not an address or CIDR range"))?;
    Ok(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n";

    #[test]
    fn rules_routes_and_defaults() {
        let text = format!(
            r#"{BASE}
max_in_flight = 10
[rate_limit]
trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]
[[rate_limit.rules]]
name = "per_ip"
limit = 100
period = "1m"
burst = 20

[auth]
api_keys = ["key-number-one"]

[[routes]]
upstream = "app"

[[routes]]
name = "api"
path_prefix = "/api"
upstream = "app"
auth = "api_key"
max_in_flight = 2
rate_limits = [{{ key = "api_key", limit = 5, period = "1s", algorithm = "sliding_window" }}]
"#
        );
        let config = Config::from_toml(&text).unwrap();
        let limits = &config.limits;
        assert_eq!(limits.store, StoreKind::Memory);
        assert_eq!(limits.trusted_proxies.len(), 2);
        assert_eq!(
            parse_net("::ffff:10.0.0.0/104"),
            Ok("10.0.0.0/8".parse::<IpNet>().unwrap())
        );
        assert_eq!(
            parse_net("::ffff:127.0.0.1"),
            Ok("127.0.0.1/32".parse::<IpNet>().unwrap())
        );
        assert_eq!(limits.routes[0].rules[0].name, "per_ip");
        assert_eq!(limits.routes[0].rules[0].quota.period_us, 60_000_000);
        assert!(!limits.routes[0].api_key);
        let api = &limits.routes[1];
        assert!(api.api_key);
        assert_eq!(api.rules.len(), 1);
        assert_eq!(api.rules[0].name, "api");
        assert_eq!(api.rules[0].key, RuleKey::ApiKey);
        assert_eq!(api.rules[0].quota.algorithm, Algorithm::SlidingWindow);
        assert_eq!(api.concurrency.unwrap().max_in_flight, 2);
        assert_eq!(api.concurrency.unwrap().queue_size, DEFAULT_QUEUE_SIZE);
        assert_eq!(limits.upstreams["app"].max_in_flight, 10);
        assert_eq!(limits.state.redis_timeout, Duration::from_millis(50));
        assert_eq!(limits.state.on_redis_error, OnRedisError::Local);
        assert!(!format!("{config:?}").contains("key-number-one"));
    }

    #[test]
    fn every_bad_limit_key_is_named() {
        let text = format!(
            r#"{BASE}
[state]
redis_url = "http://nope"
redis_timeout = "0ms"
on_redis_error = "panic"
[rate_limit]
store = "redis"
trusted_proxies = ["10.0.0.0/33"]
[[rate_limit.rules]]
key = "cookie:x"
limit = 0
period = "soon"
algorithm = "leaky"
[[rate_limit.rules]]
name = "default0"
limit = 1
period = "1s"
burst = 3
delay = 1
algorithm = "sliding_window"
[auth]
api_keys = ["short", "trailing-space ", "tab\tinside-it", "non-ascii-\u00e9t\u00e9"]
header = "bad header"
[[routes]]
upstream = "app"
auth = "password"
max_in_flight = 0
"#
        );
        let errors = Config::from_toml(&text).unwrap_err().0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for expected in [
            "state.redis_url",
            "state.redis_timeout",
            "state.on_redis_error",
            "rate_limit.trusted_proxies[0]",
            "rate_limit.rules[0].key",
            "rate_limit.rules[0].limit",
            "rate_limit.rules[0].period",
            "rate_limit.rules[0].algorithm",
            "rate_limit.rules[1].name",
            "rate_limit.rules[1].burst",
            "rate_limit.rules[1].delay",
            "auth.api_keys[0]",
            "auth.api_keys[1]",
            "auth.api_keys[2]",
            "auth.api_keys[3]",
            "auth.header",
            "routes[0].auth",
            "routes[0].max_in_flight",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
        assert!(!errors.iter().any(|e| e.message.contains("short")));
    }

    /// A `delay` that no request could ever be past (at or over the burst) is a mistake to
    /// say, not a rule that silently never waits.
    #[test]
    fn a_delay_no_request_reaches_is_refused() {
        for (numbers, refused) in [
            ("burst = 2, delay = 2", true),
            ("delay = 0", true),
            ("burst = 2, delay = 1", false),
            ("burst = 2, delay = 0", false),
        ] {
            let text = format!(
                "{BASE}[[routes]]\nupstream = \"app\"\nrate_limits = [{{ limit = 1, period = \"1s\", {numbers} }}]\n"
            );
            let keys: Vec<String> = Config::from_toml(&text)
                .err()
                .map(|errors| errors.0.into_iter().map(|e| e.key).collect())
                .unwrap_or_default();
            let expected: &[&str] = if refused {
                &["routes[0].rate_limits[0].delay"]
            } else {
                &[]
            };
            assert_eq!(keys, expected, "{numbers}");
        }
    }

    /// Numbers too large for the Redis script's doubles name the one that is too large.
    #[test]
    fn an_oversized_quota_names_its_number() {
        for (numbers, named) in [
            ("limit = 1, period = \"1s\", burst = 5000000000", "burst"),
            ("limit = 5000000000, period = \"1s\"", "limit"),
        ] {
            let text =
                format!("{BASE}[[routes]]\nupstream = \"app\"\nrate_limits = [{{ {numbers} }}]\n");
            let errors = Config::from_toml(&text).unwrap_err().0;
            let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(
                keys,
                [format!("routes[0].rate_limits[0].{named}")],
                "{errors:?}"
            );
        }
    }

    /// A bad key in the key file is reported there, by its line (never the key itself); an
    /// unreadable file is reported once, not also as a route's missing keys.
    #[test]
    fn key_file_problems_name_the_file_and_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(
            &file,
            "# keys\ngood-key-0001\nshort\n  padded-key-0002  \nfilekey-003 # note\n",
        )
        .unwrap();
        let text = |path: &std::path::Path| {
            format!(
                "{BASE}[auth]\napi_keys_file = \"{}\"\n[[routes]]\nupstream = \"app\"\nauth = \"api_key\"\n",
                path.display()
            )
        };
        let errors = Config::from_toml(&text(&file)).unwrap_err().0;
        // A key padded in the file is trimmed; a note after one is refused, not made part of it.
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].key, "auth.api_keys_file");
        assert!(errors[0].message.contains("line 3"), "{}", errors[0]);
        assert!(errors[1].message.contains("line 5"), "{}", errors[1]);
        assert!(!errors[0].message.contains("short"), "{}", errors[0]);
        let errors = Config::from_toml(&text(&dir.path().join("missing")))
            .unwrap_err()
            .0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["auth.api_keys_file"]);
    }

    #[test]
    fn http2_settings_have_defaults_and_named_errors() {
        let config = Config::from_toml(&format!("{BASE}[[routes]]\nupstream = \"app\"\n")).unwrap();
        let h2 = config.server.http2;
        assert_eq!(h2.max_concurrent_streams, 256);
        assert_eq!(h2.initial_stream_window, 256 << 10);
        assert_eq!(h2.initial_connection_window, 2 << 20);
        assert_eq!(h2.max_frame_size, 16_384);
        assert_eq!(h2.keep_alive_interval, Some(Duration::from_secs(30)));

        let text = format!(
            "[server.http2]\nmax_concurrent_streams = 8\ninitial_stream_window = \"64KiB\"\n\
             initial_connection_window = \"16MiB\"\nmax_frame_size = \"1MiB\"\n\
             keep_alive_interval = \"0s\"\n{BASE}[[routes]]\nupstream = \"app\"\n"
        );
        let h2 = Config::from_toml(&text).unwrap().server.http2;
        assert_eq!(
            (h2.max_concurrent_streams, h2.initial_stream_window),
            (8, 65_536)
        );
        assert_eq!(
            (h2.initial_connection_window, h2.max_frame_size),
            (16 << 20, 1 << 20)
        );
        assert_eq!(h2.keep_alive_interval, None);

        // Raising the stream window alone raises the connection's with it; a connection window
        // set below the stream window is named.
        let text = format!(
            "[server.http2]\ninitial_stream_window = \"4MiB\"\n{BASE}[[routes]]\nupstream = \"app\"\n"
        );
        let h2 = Config::from_toml(&text).unwrap().server.http2;
        assert_eq!(h2.initial_connection_window, 4 << 20);
        let text = format!(
            "[server.http2]\ninitial_stream_window = \"1MiB\"\n\
             initial_connection_window = \"512KiB\"\n{BASE}[[routes]]\nupstream = \"app\"\n"
        );
        let errors = Config::from_toml(&text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "server.http2.initial_connection_window");
        assert!(errors[0].message.contains("initial_stream_window"));

        let text = format!(
            "[server.http2]\nmax_concurrent_streams = 0\ninitial_stream_window = \"2GiB\"\n\
             initial_connection_window = \"1KiB\"\nmax_frame_size = \"1KiB\"\n\
             keep_alive_interval = \"soon\"\nkeep_alive_timeout = \"0s\"\n\
             {BASE}[[routes]]\nupstream = \"app\"\n"
        );
        let errors = Config::from_toml(&text).unwrap_err().0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for expected in [
            "server.http2.max_concurrent_streams",
            "server.http2.initial_stream_window",
            "server.http2.initial_connection_window",
            "server.http2.max_frame_size",
            "server.http2.keep_alive_interval",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
        let text = format!(
            "[server.http2]\nkeep_alive_timeout = \"0s\"\n{BASE}[[routes]]\nupstream = \"app\"\n"
        );
        let errors = Config::from_toml(&text).unwrap_err().0;
        assert_eq!(errors[0].key, "server.http2.keep_alive_timeout");
    }

    #[test]
    fn redis_store_needs_a_url_and_passwords_stay_out_of_messages() {
        let text =
            format!("{BASE}[rate_limit]\nstore = \"redis\"\n[[routes]]\nupstream = \"app\"\n");
        let errors = Config::from_toml(&text).unwrap_err().0;
        assert_eq!(errors[0].key, "rate_limit.store");
        assert_eq!(
            redacted("redis://:s3cret@127.0.0.1:6379/2"),
            "redis://:***@127.0.0.1:6379/2"
        );
        assert_eq!(
            redacted("rediss://user:pw@host:1"),
            "rediss://user:***@host:1"
        );
        assert_eq!(redacted("redis://127.0.0.1"), "redis://127.0.0.1");
    }

    #[test]
    fn redis_ca_must_be_a_pem_file_for_rediss_urls() {
        let config = |url: &str, ca: &str| {
            format!("[state]\nredis_url = \"{url}\"\nredis_ca = \"{ca}\"\n{BASE}[[routes]]\nupstream = \"app\"\n")
        };
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        let not_pem = not_pem.to_str().unwrap();
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let broken = broken.to_str().unwrap();
        for (url, ca, says) in [
            ("redis://127.0.0.1:1", not_pem, "only for rediss://"),
            ("rediss://127.0.0.1:1", "/no/such/ca.pem", "/no/such/ca.pem"),
            ("rediss://127.0.0.1:1", not_pem, "no certificate"),
            ("rediss://127.0.0.1:1", broken, "not a PEM certificate"),
        ] {
            let errors = Config::from_toml(&config(url, ca)).unwrap_err().0;
            assert!(
                errors
                    .iter()
                    .any(|e| e.key == "state.redis_ca" && e.message.contains(says)),
                "{says}: {errors:?}"
            );
        }
    }
}
