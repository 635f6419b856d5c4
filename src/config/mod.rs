//! Configuration: the TOML file (after `${ENV}` interpolation) is read into raw serde types
//! (`raw`), then validated into [`Config`], whose values are ready to use (parsed addresses,
//! durations, sizes, strategies). Every problem is reported with the key it belongs to.

mod autoscale;
mod cache;
mod decode;
mod env;
pub mod limits;
mod lines;
mod raw;
mod suggest;
mod tls;
pub mod units;
mod upstream_tls;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::HeaderName;

pub use autoscale::{AutoscaleConfig, DiscoverConfig, ExecConfig, ProcessConfig, ProviderConfig};
pub use cache::{CacheConfig, CacheStoreKind, RouteCacheConfig};
pub use limits::LimitsConfig;
pub use raw::{RawConfig, DEFAULT_MAX_HEADERS};
pub use tls::TlsConfig;
pub use upstream_tls::{UpstreamProtocol, UpstreamTls};

use crate::balance::{HashKey, Strategy};

/// One configuration problem: the key it is about, the line when known, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {}): {}", self.key, line, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

/// The validated gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub cache: CacheConfig,
    pub tls: Option<TlsConfig>,
    /// Rate limits, API keys and concurrency limits.
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Runtime worker threads; `None` = the CPUs this process may run on.
    pub workers: Option<usize>,
    pub access_log: bool,
    /// Per-request metrics (counters by route, duration histogram, in-flight gauge).
    pub metrics: bool,
    pub max_body: u64,
    pub max_header_bytes: usize,
    /// Request fields whose names hold `_` are passed on (nginx's `underscores_in_headers`).
    pub underscores_in_headers: bool,
    pub max_uri_length: usize,
    /// Header fields a request may have; more get 431.
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// Open client connections at most (0 = no limit); more are refused.
    pub max_connections: usize,
    /// Open client connections from one IP at most (0 = no limit).
    pub max_connections_per_ip: usize,
    /// A request body must bring at least `min_body_rate` bytes per second, judged over each
    /// window of this length (at least one byte per window); 0 turns the check off.
    pub body_read_timeout: Duration,
    /// Bytes per second.
    pub min_body_rate: u64,
    /// What HTTP/2 clients may open and send.
    pub http2: limits::Http2Config,
    pub shutdown_grace: Duration,
    /// After SIGTERM/SIGINT, how long to go on accepting while /health answers 503.
    pub shutdown_delay: Duration,
}

impl ServerConfig {
    /// The runtime's worker threads: `workers`, else one per CPU this process may use (so
    /// `taskset -c 0` means one).
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(cpus_available)
    }
}

/// A file path as errors show it: a relative one with the working directory it is read from
/// (not the config file's directory, as with HAProxy and Envoy), which is easy to miss when
/// `check` passed in one directory and a service starts in another.
pub fn shown_path(path: &std::path::Path) -> String {
    match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => format!(
            "{} (relative paths are read from the working directory, {})",
            path.display(),
            cwd.display()
        ),
        _ => path.display().to_string(),
    }
}

/// The CPUs this process may run on.
pub fn cpus_available() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// How the file spells the key of `listen` (`admin.listen` or `server.admin_listen`), so
    /// that problems with it are named as written.
    pub listen_key: &'static str,
    /// `user:password` for HTTP basic auth on the admin port, when set.
    pub credentials: Option<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub strategy: Strategy,
    pub instances: Vec<InstanceConfig>,
    /// Idle keep-alive connections kept per instance.
    pub keepalive: usize,
    /// Requests one instance connection carries, then it is closed (pooled connections and
    /// pipelined lines alike).
    pub keepalive_requests: u64,
    /// Requests in flight on one connection to an instance: above 1, body-less idempotent
    /// requests are pipelined (see `proxy::pipeline`).
    pub pipeline: usize,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
    /// Answer statuses that have an idempotent request tried on another instance, within
    /// `retries` and the budget; none by default (nginx's `proxy_next_upstream http_503`).
    pub retry_on_status: Vec<u16>,
    /// Retries may add at most this fraction on top of live requests (0.2 = 20 %).
    pub retry_budget: f64,
    pub slow_start: Duration,
    pub health: Option<ActiveHealthConfig>,
    pub passive: PassiveHealthConfig,
    pub drain_timeout: Duration,
    /// Instances started and stopped from live load, when the `autoscale` table is given.
    pub autoscale: Option<AutoscaleConfig>,
    /// HTTP/1.1, h2 or h2c to the instances.
    pub protocol: UpstreamProtocol,
    /// TLS to the instances (`tls` table, `https://` instances or `protocol = "h2"`).
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    pub addr: SocketAddr,
    pub weight: u32,
    pub backup: bool,
}

/// What is wrong with an instance as given: the field under the instance's key (`""` for the
/// address itself, `".weight"`) and why.
pub type InstanceProblem = (&'static str, String);

impl InstanceConfig {
    /// An instance as the config file and the admin API give it: `IP:PORT` or
    /// `localhost:PORT` (port 0 is no instance), after `http://` or `https://`, weight 1 to
    /// 1000. Also says whether it was written `https://` (TLS is set per upstream).
    pub fn parse(
        addr: &str,
        weight: u32,
        backup: bool,
    ) -> Result<(InstanceConfig, bool), Vec<InstanceProblem>> {
        let mut problems = Vec::new();
        if !(1..=1000).contains(&weight) {
            problems.push((".weight", "must be between 1 and 1000".to_owned()));
        }
        let (addr, https) = match addr.trim().strip_prefix("https://") {
            Some(addr) => (addr, true),
            None => (addr, false),
        };
        match parse_addr(addr) {
            Ok(addr) if addr.port() == 0 => {
                problems.push(("", format!("{addr}: an instance needs a port other than 0")));
            }
            // A listen-everywhere address names no host to connect to (Linux would take it as
            // this host, which is never what an instance list means).
            Ok(addr) if addr.ip().is_unspecified() => {
                problems.push((
                    "",
                    format!(
                        "{addr}: an instance needs the address of a host, not {}",
                        addr.ip()
                    ),
                ));
            }
            Ok(addr) if problems.is_empty() => {
                return Ok((
                    InstanceConfig {
                        addr,
                        weight,
                        backup,
                    },
                    https,
                ));
            }
            Ok(_) => {}
            Err(err) => problems.push(("", err)),
        }
        Err(problems)
    }
}

#[derive(Debug, Clone)]
pub struct ActiveHealthConfig {
    pub path: String,
    /// The probe's Host; the address probed when unset.
    pub host: Option<String>,
    /// Probe this port of each instance's IP instead of the instance's own (a management
    /// port), as HAProxy's `check port` and Envoy's health-check `port_value`.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Inclusive range of statuses that count as healthy.
    pub expect_status: (u16, u16),
}

#[derive(Debug, Clone)]
pub struct PassiveHealthConfig {
    /// Failures within `fail_timeout` that take an instance out; 0 disables passive checks.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// Answer statuses that count as failures too (Envoy's consecutive 5xx); none by default.
    pub fail_on_status: Vec<u16>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// Exact host, or `*.example.com` for any subdomain; `None` matches every host.
    pub host: Option<String>,
    pub path_prefix: String,
    /// The instance gets the path without `path_prefix` (nginx `proxy_pass http://app/;`,
    /// Traefik's StripPrefix), and `X-Forwarded-Prefix`.
    pub strip_prefix: bool,
    pub upstream: String,
    /// Responses are cached only on routes that have this.
    pub cache: Option<RouteCacheConfig>,
}

impl Config {
    /// Reads, interpolates and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            ConfigErrors(vec![ConfigError {
                key: path.display().to_string(),
                line: None,
                message: format!("cannot read: {err}"),
            }])
        })?;
        Config::from_toml(&text)
    }

    /// Gives `errors` found in the file at `path` after it was loaded (a reload's refusals)
    /// the lines of their keys in it, naming those keys as the file has them.
    pub fn place_in_file(path: &Path, errors: &mut [ConfigError]) {
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        // Placed in the text as it was loaded: an unquoted `${VAR}` is no TOML until filled
        // in, and the file would not parse. (It loaded, so every reference fills.)
        let text = env::interpolate(&text, |name| std::env::var(name).ok()).text;
        name_inherited_drain_timeouts(&text, errors);
        lines::place(&text, errors);
        errors.sort_by_key(|error| error.line.unwrap_or(usize::MAX));
    }

    /// Interpolates `${ENV}` from the process environment, parses and validates. Problems with
    /// the environment are reported with those of the rest of the file, which is read with a
    /// stand-in for each reference that could not be filled.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        let env::Interpolated {
            text,
            problems: env_problems,
        } = env::interpolate(text, |name| std::env::var(name).ok());
        let stand_ins: Vec<usize> = env_problems.iter().map(|problem| problem.at).collect();
        let env_lines: Vec<usize> = env_problems.iter().map(|problem| problem.line).collect();
        let mut problems: Vec<ConfigError> = env_problems
            .into_iter()
            .map(|problem| ConfigError {
                key: format!("${{{}}}", problem.name),
                line: Some(problem.line),
                message: problem.message.into(),
            })
            .collect();
        let decoded = match decode::decode(&text) {
            Ok(decoded) => decoded,
            Err(ConfigErrors(syntax)) => {
                // A stand-in may not fit the syntax around it (`${A}${B}` outside quotes):
                // the reference is what is wrong on that line.
                let syntax = syntax
                    .into_iter()
                    .filter(|error| !error.line.is_some_and(|line| env_lines.contains(&line)));
                problems.extend(syntax);
                problems.sort_by_key(|problem| problem.line.unwrap_or(usize::MAX));
                return Err(ConfigErrors(problems));
            }
        };
        let decode::Decoded {
            raw,
            unknown,
            typed,
            removed,
        } = decoded;
        // What a stand-in makes of its key's value (a type, an address, a range it does not
        // fit) is not reported beside the reference's own problem: it is not in the file.
        let stood_in = lines::keys_at(&text, &stand_ins);
        let from_file = |problem: &ConfigError| !decode::left_by_removed(&stood_in, &problem.key);
        problems.extend(unknown);
        problems.extend(typed.into_iter().filter(from_file));
        match raw.map(RawConfig::validate) {
            Some(Ok(config)) if problems.is_empty() => return Ok(config),
            Some(Ok(_)) | None => {}
            // What a key taken out for its type leaves behind is not reported again.
            Some(Err(ConfigErrors(later))) => problems.extend(
                later
                    .into_iter()
                    .filter(|problem| !decode::left_by_removed(&removed, &problem.key))
                    .filter(from_file),
            ),
        }
        hide_secret_values(&mut problems);
        lines::place(&text, &mut problems);
        // In the file's order, as one fixes them; those no line holds last.
        problems.sort_by_key(|problem| problem.line.unwrap_or(usize::MAX));
        Err(ConfigErrors(problems))
    }

    /// The zero-config form: the proxy and admin listeners, one `default` upstream, one
    /// catch-all route.
    pub fn from_flags(
        listen: &str,
        admin_listen: &str,
        upstreams: &[String],
    ) -> Result<Config, ConfigErrors> {
        let raw = RawConfig::from_flags(listen, admin_listen, upstreams);
        let flags = raw.validate().map(|mut config| {
            // No file spells it: the flag stands for the canonical key (`server.admin_listen`
            // is only how the flags are carried in), as `server.listen` does for `--listen`.
            config.admin.listen_key = "admin.listen";
            config
        });
        flags.map_err(|ConfigErrors(errors)| {
            // Named as the user wrote them: flags, not the keys they stand for.
            let flag = |key: &str| match key {
                "server.listen" => "--listen".to_owned(),
                "server.admin_listen" | "admin.listen" => "--admin-listen".to_owned(),
                "upstreams.default.instances" => "--upstream".to_owned(),
                key => match key.strip_prefix("upstreams.default.instances[") {
                    Some(rest) => {
                        let index: usize = rest.trim_end_matches(']').parse().unwrap_or(0);
                        format!("--upstream (#{})", index + 1)
                    }
                    None => key.to_owned(),
                },
            };
            let in_words = |message: &str| {
                ["server.admin_listen", "server.listen"]
                    .iter()
                    .fold(message.to_owned(), |message, key| {
                        message.replace(key, &flag(key))
                    })
            };
            ConfigErrors(
                errors
                    .into_iter()
                    .map(|error| ConfigError {
                        key: flag(&error.key),
                        message: in_words(&error.message),
                        ..error
                    })
                    .collect(),
            )
        })
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

/// An autoscaler without a `drain_timeout` of its own takes its upstream's, so a refusal of
/// `upstreams.NAME.autoscale.drain_timeout` in `text` that has no such key is about
/// `upstreams.NAME.drain_timeout`: named so, since the key named must be one the file has.
fn name_inherited_drain_timeouts(text: &str, errors: &mut [ConfigError]) {
    let Ok(doc) = text.parse::<toml::Table>() else {
        return;
    };
    for error in errors {
        let Some(name) = error
            .key
            .strip_prefix("upstreams.")
            .and_then(|rest| rest.strip_suffix(".autoscale.drain_timeout"))
        else {
            continue;
        };
        let autoscale = doc
            .get("upstreams")
            .and_then(|upstreams| upstreams.get(name))
            .and_then(|upstream| upstream.get("autoscale"));
        if autoscale.is_some_and(|autoscale| autoscale.get("drain_timeout").is_none()) {
            error.key = format!("upstreams.{name}.drain_timeout");
            error.message = format!(
                "taken by the autoscaler, which has no drain_timeout of its own: {}",
                error.message
            );
        }
    }
}

/// Collects problems while validating, so all of them are reported at once.
#[derive(Default)]
pub(crate) struct Problems(Vec<ConfigError>);

impl Problems {
    pub(crate) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            key: key.into(),
            line: None,
            message: message.into(),
        });
    }

    pub(crate) fn duration(&mut self, key: &str, text: &str) -> Duration {
        units::parse_duration(text).unwrap_or_else(|err| {
            self.push(key, err);
            Duration::ZERO
        })
    }

    /// Adds a problem with a parsed value unless `key` already has one: a value that did not
    /// parse is not also reported out of range.
    pub(crate) fn push_unless_reported(&mut self, key: &str, message: impl Into<String>) {
        if !self.0.iter().any(|e| e.key == key) {
            self.push(key, message);
        }
    }

    /// A duration that must be more than 0 (0 is reported, unless the text was already).
    pub(crate) fn positive_duration(&mut self, key: &str, text: &str) -> Duration {
        let value = self.duration(key, text);
        if value.is_zero() {
            self.push_unless_reported(key, "must be more than 0");
        }
        value
    }

    pub(crate) fn size(&mut self, key: &str, text: &str) -> u64 {
        units::parse_size(text).unwrap_or_else(|err| {
            self.push(key, err);
            0
        })
    }

    pub(crate) fn addr(&mut self, key: &str, text: &str) -> SocketAddr {
        parse_addr(text).unwrap_or_else(|err| {
            self.push(key, err);
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    pub(crate) fn header(&mut self, key: &str, text: &str) -> HeaderName {
        HeaderName::from_bytes(text.as_bytes()).unwrap_or_else(|_| {
            self.push(key, format!("`{text}` is not a valid header name"));
            HeaderName::from_static("x-invalid")
        })
    }

    pub(crate) fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.0))
        }
    }
}

/// Accepts `host:port` with an IP or `localhost` (resolved to 127.0.0.1, so it never depends on DNS).
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let text = text.strip_prefix("http://").unwrap_or(text);
    // A pasted URL's root: `http://10.0.0.5:8080/` is the same instance.
    let text = text.strip_suffix('/').unwrap_or(text);
    if let Ok(addr) = text.parse::<SocketAddr>() {
        // An IPv4-mapped IPv6 address is the IPv4 one: the same instance, not another.
        return Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()));
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    Err(format!("`{text}` is not an address (expected IP:PORT)"))
}

/// A key path as the config errors write it (`upstreams.app.instances[1].wieght`).
fn key_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => match key_path(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => key_path(parent),
    }
}

/// `consistent_hash` key from its config spelling: `ip`, `header:NAME` or `cookie:NAME`.
pub(crate) fn parse_hash_key(problems: &mut Problems, key: &str, text: &str) -> HashKey {
    if text == "ip" {
        return HashKey::ClientIp;
    }
    if let Some(name) = text.strip_prefix("header:") {
        return HashKey::Header(problems.header(key, name));
    }
    if let Some(name) = text.strip_prefix("cookie:") {
        return HashKey::Cookie(name.to_string());
    }
    problems.push(
        key,
        format!("`{text}`: expected ip, header:NAME or cookie:NAME"),
    );
    HashKey::ClientIp
}

/// Keys whose values are secrets: a problem with one never quotes the value (serde's type
/// errors do, as in ``invalid type: integer `98765432` `` or `invalid type: string "key"`),
/// since a mistyped secret is usually the real one.
/// An autoscaler's `env` is where a process's credentials go, so its values count as secrets.
fn hide_secret_values(problems: &mut [ConfigError]) {
    const SECRET: [&str; 2] = ["admin.password", "auth.api_keys"];
    for problem in problems {
        let key = problem.key.split('[').next().unwrap_or_default();
        if !SECRET.contains(&key) && !key.contains(".autoscale.env.") {
            continue;
        }
        let mut kept = String::with_capacity(problem.message.len());
        let mut rest = problem.message.as_str();
        while let Some(start) = rest.find(['`', '"']) {
            let quote = &rest[start..=start];
            let Some(len) = rest[start + 1..].find(quote) else {
                break;
            };
            kept.push_str(rest[..start].trim_end());
            rest = &rest[start + len + 2..];
        }
        kept.push_str(rest);
        problem.message = kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistyped_secrets_are_named_but_never_quoted() {
        let text = r#"
[state]
redis_url = "redis:/:LEAKME-REDIS@127.0.0.1:6379/0"
[admin]
username = "ops"
password = 98765432
[auth]
api_keys = ["a-good-key-123", 123456789012]
[upstreams.app]
instances = ["127.0.0.1:1"]
[upstreams.app.autoscale]
env = { DB_PASSWORD = 55501234 }
"#;
        let errors = Config::from_toml(text).unwrap_err().to_string();
        for secret in ["LEAKME-REDIS", "98765432", "123456789012", "55501234"] {
            assert!(!errors.contains(secret), "{secret} in {errors}");
        }
        // A string where a list belongs is quoted with double quotes.
        let one_key = "[auth]\napi_keys = \"the-real-key-42\"\n[upstreams.app]\ninstances = []\n";
        let listed = Config::from_toml(one_key).unwrap_err().to_string();
        assert!(!listed.contains("the-real-key-42"), "{listed}");
        assert!(listed.contains("auth.api_keys"), "{listed}");
        for key in [
            "state.redis_url",
            "admin.password",
            "auth.api_keys[1]",
            "upstreams.app.autoscale.env.DB_PASSWORD",
        ] {
            assert!(errors.contains(key), "{key} not named in {errors}");
        }
        assert!(errors.contains("***@127.0.0.1:6379/0"), "{errors}");
        assert!(
            errors.contains("invalid type: integer, expected"),
            "{errors}"
        );
    }

    const MINIMAL: &str = r#"
[upstreams.app]
instances = ["127.0.0.1:3001", { addr = "127.0.0.1:3002", weight = 3 }, { addr = "127.0.0.1:3003", backup = true }]

[[routes]]
upstream = "app"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.admin.listen, "127.0.0.1:9090".parse().unwrap());
        let app = config.upstream("app").unwrap();
        assert_eq!(app.strategy, Strategy::RoundRobin);
        assert_eq!(app.instances.len(), 3);
        assert_eq!(app.instances[1].weight, 3);
        assert!(app.instances[2].backup);
        assert_eq!(app.retries, 2);
        assert!((app.retry_budget - 0.2).abs() < 1e-9);
        assert_eq!(config.routes[0].path_prefix, "/");
    }

    #[test]
    fn errors_come_in_the_order_of_their_lines() {
        let text = "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\nconnect_timeout = \"0s\"\n\
                    [server]\nlisten = \"nope\"\n[[routes]]\nupstream = \"app\"\n";
        let errors = Config::from_toml(text).unwrap_err().0;
        let keys: Vec<(&str, Option<usize>)> =
            errors.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            keys,
            [
                ("upstreams.app.connect_timeout", Some(3)),
                ("server.listen", Some(5))
            ]
        );
    }

    #[test]
    fn every_error_names_its_key() {
        let text = r#"
[server]
listen = "nowhere"
max_body = "10 parsecs"

[upstreams.app]
strategy = "least_conn"
instances = []
connect_timeout = "5"
[upstreams.app.health]
fall = 0

[upstreams.other]
strategy = "leastconn"
instances = ["127.0.0.1:3001"]

[[routes]]
upstream = "missing"
"#;
        let errors = Config::from_toml(text).unwrap_err().0;
        let strategy = errors
            .iter()
            .find(|e| e.key == "upstreams.other.strategy")
            .expect("the misspelt strategy is named");
        assert!(
            strategy.message.ends_with(
                "expected round_robin, least_conn, random_two, p2c_ewma or consistent_hash"
            ),
            "{}",
            strategy.message
        );
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"server.listen"), "{keys:?}");
        assert!(keys.contains(&"server.max_body"), "{keys:?}");
        assert!(keys.contains(&"upstreams.app.instances"), "{keys:?}");
        assert!(keys.contains(&"upstreams.app.connect_timeout"), "{keys:?}");
        assert!(keys.contains(&"upstreams.app.health.fall"), "{keys:?}");
        assert!(keys.contains(&"routes[0].upstream"), "{keys:?}");
    }

    /// A `.` in an upstream's name is refused: the dotted key paths its problems are reported
    /// under would name another table.
    #[test]
    fn an_upstream_name_with_a_dot_is_refused() {
        let text = "[upstreams.web]\ninstances = [\"127.0.0.1:1\"]\n\
            [upstreams.\"api.v1\"]\ninstances = [\"127.0.0.1:2\"]\n\
            [[routes]]\nupstream = \"web\"\n";
        let errors = Config::from_toml(text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "upstreams.api.v1");
        assert!(errors[0].message.contains("`.`"), "{}", errors[0].message);
    }

    #[test]
    fn unknown_keys_and_types_report_a_line() {
        let err = Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n")
            .unwrap_err()
            .0;
        assert_eq!(err[0].line, Some(3));
        assert!(err[0].message.contains("lisen"), "{}", err[0].message);
        // Every unknown key at once, each with its line, beside the other problems.
        assert_placed(
            "[server]\nlisen = 3\n[upstreams.a]\ninstances = [\"127.0.0.1:1\"]\nretires = 2\n\
             [[routes]]\nupstream = \"nowhere\"\nhots = \"x\"\n",
            &[
                ("server.lisen", Some(2)),
                ("upstreams.a.retires", Some(5)),
                ("routes[0].upstream", Some(7)),
                ("routes[0].hots", Some(8)),
            ],
        );
        let err =
            Config::from_toml("[upstreams.a]\ninstances = [\"127.0.0.1:1\"]\nretries = \"x\"\n")
                .unwrap_err()
                .0;
        assert_eq!(
            (err[0].key.as_str(), err[0].line),
            ("upstreams.a.retries", Some(3))
        );
        // An instance table is checked like any other table.
        let err = Config::from_toml(
            "[upstreams.a]\ninstances = [\"127.0.0.1:1\", { addr = \"127.0.0.1:2\", wieght = 5 }]\n",
        )
        .unwrap_err()
        .0;
        assert_eq!(err[0].key, "upstreams.a.instances[1].wieght");
        assert!(
            err[0].message.contains("unknown field"),
            "{}",
            err[0].message
        );
    }

    /// A target longer than the head may be would get 431 before its own limit's 414.
    #[test]
    fn a_uri_limit_past_the_head_limit_is_refused() {
        let text = "[server]\nmax_header_size = \"8KiB\"\nmax_uri_length = \"16KiB\"\n\
                    [upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\nupstream = \"app\"\n";
        let errors = Config::from_toml(text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "server.max_uri_length");
        assert!(errors[0].message.contains("8192"), "{}", errors[0].message);
    }

    #[test]
    fn values_that_could_never_work_are_refused() {
        let text = "[server]\nheader_read_timeout = \"0s\"\nidle_timeout = \"0s\"\n\
                    max_uri_length = \"0\"\nmax_headers = 10000000000000\n\
                    [upstreams.app]\ninstances = [\"127.0.0.1:1\"]\nidle_timeout = \"0s\"\n\
                    keepalive_requests = 0\n\
                    fail_timeout = \"0s\"\nmax_in_flight = 5\nqueue_timeout = \"0s\"\n\
                    [upstreams.app.health]\ninterval = \"0s\"\ntimeout = \"0s\"\n\
                    [[routes]]\nhost = \"exa mple..com\"\nupstream = \"app\"\n\
                    [[routes]]\nhost = \"api.example.com:8080\"\nupstream = \"app\"\n\
                    [[routes]]\nupstream = \"app\"\n[[routes]]\nupstream = \"app\"\n\
                    [[routes]]\nhost = \"*.Example.com\"\nupstream = \"app\"\n\
                    [[routes]]\nhost = \"::1\"\nupstream = \"app\"\n";
        let errors = Config::from_toml(text).unwrap_err().0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server.header_read_timeout",
                "server.idle_timeout",
                "server.max_uri_length",
                "server.max_headers",
                "upstreams.app.idle_timeout",
                "upstreams.app.keepalive_requests",
                "upstreams.app.fail_timeout",
                "upstreams.app.queue_timeout",
                "upstreams.app.health.interval",
                "upstreams.app.health.timeout",
                "routes[0].host",
                "routes[1].host",
                "routes[3]",
            ]
        );
        assert!(
            errors[12].message.contains("routes[2]"),
            "{}",
            errors[12].message
        );
    }

    #[test]
    fn instances_in_the_file_follow_the_admin_apis_rules() {
        let text = "[upstreams.app]\ninstances = [\"127.0.0.1:0\", { addr = \"127.0.0.1:2\", weight = 0 }, \
                    \"0.0.0.0:80\"]\n[[routes]]\nupstream = \"app\"\n";
        let errors = Config::from_toml(text).unwrap_err().0;
        let found: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.key.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "upstreams.app.instances[0]",
                    "127.0.0.1:0: an instance needs a port other than 0"
                ),
                (
                    "upstreams.app.instances[1].weight",
                    "must be between 1 and 1000"
                ),
                (
                    "upstreams.app.instances[2]",
                    "0.0.0.0:80: an instance needs the address of a host, not 0.0.0.0"
                ),
            ]
        );
    }

    /// One upstream and a catch-all route: the rest of a config whose `[server]` a test varies.
    const APP: &str =
        "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\nupstream = \"app\"\n";

    /// The first problem found in `server` (a `[server]` table and more) followed by [`APP`]:
    /// its key and line.
    fn first_problem(server: &str) -> (String, Option<usize>, String) {
        let errors = Config::from_toml(&format!("{server}\n{APP}"))
            .unwrap_err()
            .0;
        let first = errors.into_iter().next().expect("a problem");
        (first.key, first.line, first.message)
    }

    /// Checks where the problems of `text` are: each one's key and line, in order.
    fn assert_placed(text: &str, expected: &[(&str, Option<usize>)]) {
        let errors = Config::from_toml(text).unwrap_err().0;
        let found: Vec<(&str, Option<usize>)> =
            errors.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn an_expected_status_may_be_a_bare_number() {
        let health = |value: &str| {
            let text = format!("{APP}\n[upstreams.app.health]\nexpect_status = {value}\n");
            Config::from_toml(&text).map(|c| c.upstream("app").unwrap().health.clone().unwrap())
        };
        assert_eq!(health("200").unwrap().expect_status, (200, 200));
        assert_eq!(health("\"200-204\"").unwrap().expect_status, (200, 204));
        assert!(health("-200").is_err());
        assert!(health("true").is_err());
        let port_zero = format!("{APP}[upstreams.app.health]\nport = 0\n");
        let errors = Config::from_toml(&port_zero).unwrap_err().0;
        assert_eq!(errors[0].key, "upstreams.app.health.port");
    }

    #[test]
    fn sizes_may_be_bare_numbers_of_bytes_and_durations_are_bounded() {
        let config = Config::from_toml(&format!(
            "[server]\nmax_body = 1048576\n[server.http2]\nmax_frame_size = 32768\n{APP}"
        ))
        .unwrap();
        assert_eq!(config.server.max_body, 1 << 20);
        assert_eq!(config.server.http2.max_frame_size, 32768);
        let unlimited = Config::from_toml(&format!("[server]\nmax_body = 0\n{APP}")).unwrap();
        assert_eq!(unlimited.server.max_body, u64::MAX);
        let (key, _, message) = first_problem("[server]\nmax_body = -1");
        assert_eq!(key, "server.max_body");
        assert!(message.contains("not negative"), "{message}");
        let (key, line, _) = first_problem("[server]\nidle_timeout = \"99999999999999999999h\"");
        assert_eq!((key.as_str(), line), ("server.idle_timeout", Some(2)));
        let (key, line, message) = first_problem("[server]\nworkers = 2000");
        assert_eq!((key.as_str(), line), ("server.workers", Some(2)));
        assert!(message.contains("at most 1024"), "{message}");
    }

    #[test]
    fn every_wrongly_typed_value_is_reported_with_the_other_problems() {
        let text = "[server]\nworkers = \"two\"\nidle_timeout = 5\n\
            [upstreams.app]\ninstances = [\"127.0.0.1:1\"]\nmax_fails = \"three\"\n\
            strategy = \"fastest\"\n[[routes]]\nupstream = \"app\"\nwieght = 1\n";
        assert_placed(
            text,
            &[
                ("server.workers", Some(2)),
                ("server.idle_timeout", Some(3)),
                ("upstreams.app.max_fails", Some(6)),
                ("upstreams.app.strategy", Some(7)),
                ("routes[0].wieght", Some(10)),
            ],
        );
        let errors = Config::from_toml(text).unwrap_err().0;
        assert!(errors[1].message.contains("invalid type"), "{}", errors[1]);
    }

    #[test]
    fn a_key_taken_out_for_its_type_leaves_no_second_problem() {
        // A required field: without "missing field" for it, and the keys read after it still are
        // (tables are read in name order).
        assert_placed(
            "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\nupstream = 5\n\
             [server]\nworkers = \"x\"\n",
            &[("routes[0].upstream", Some(4)), ("server.workers", Some(6))],
        );
        // A table lacking a required key goes whole, the rest still read.
        assert_placed(
            "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\npath_prefix = \"/\"\n\
             [server]\nworkers = \"x\"\n",
            &[("routes[0]", Some(3)), ("server.workers", Some(6))],
        );
        // The instances taken out do not also count as "no instances".
        assert_placed(
            "[upstreams.app]\ninstances = \"127.0.0.1:1\"\nretries = -1\n\
             [[routes]]\nupstream = \"app\"\n",
            &[
                ("upstreams.app.instances", Some(2)),
                ("upstreams.app.retries", Some(3)),
            ],
        );
        // Nor do the checks of the table that held it, which saw its default.
        assert_placed(
            "[admin]\nusername = 5\npassword = \"x\"\n[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n\
             [[routes]]\nupstream = \"app\"\n",
            &[("admin.username", Some(2))],
        );
        // An array element cannot go without renumbering the rest: the array goes whole, with
        // no "no instances" for it, and the keys after it still read.
        assert_placed(
            "[server]\nworkers = \"x\"\n[upstreams.app]\ninstances = [\"127.0.0.1:1\", 5]\n\
             retries = \"two\"\n[[routes]]\nupstream = \"app\"\n",
            &[
                ("server.workers", Some(2)),
                ("upstreams.app.instances[1]", Some(4)),
                ("upstreams.app.retries", Some(5)),
            ],
        );
    }

    #[test]
    fn a_probe_host_must_be_a_host() {
        let text = |host: &str| {
            format!(
                "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n[upstreams.app.health]\n\
                 host = \"{host}\"\n[[routes]]\nupstream = \"app\"\n"
            )
        };
        for fine in ["app.internal", "app.internal:8080", "10.0.0.1"] {
            let config = Config::from_toml(&text(fine)).unwrap();
            let health = config.upstreams[0].health.as_ref().unwrap();
            assert_eq!(health.host.as_deref(), Some(fine));
        }
        for bad in ["two words", "app/path", "user@app", "app:99999", "app:0"] {
            assert_placed(&text(bad), &[("upstreams.app.health.host", Some(4))]);
        }
        let path =
            |path: &str| text("app").replace("host = \"app\"", &format!("path = \"{path}\""));
        for bad in ["/h ealth", "health", "/a\\u0007"] {
            assert_placed(&path(bad), &[("upstreams.app.health.path", Some(4))]);
        }
        assert!(Config::from_toml(&path("/health?full=1")).is_ok());
    }

    #[test]
    fn fail_on_status_takes_http_statuses_only() {
        let text =
            "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\nfail_on_status = [500, 99, 600]\n\
                    [[routes]]\nupstream = \"app\"\n";
        assert_placed(
            text,
            &[
                ("upstreams.app.fail_on_status", Some(3)),
                ("upstreams.app.fail_on_status", Some(3)),
            ],
        );
        let fine = text.replace("500, 99, 600", "500, 503");
        let config = Config::from_toml(&fine).unwrap();
        assert_eq!(config.upstreams[0].passive.fail_on_status, [500, 503]);
        // Only an error is worth another instance's try.
        let retry = text.replace(
            "fail_on_status = [500, 99, 600]",
            "retry_on_status = [302, 503]",
        );
        assert_placed(&retry, &[("upstreams.app.retry_on_status", Some(3))]);
        let fine = retry.replace("302, ", "");
        assert_eq!(
            Config::from_toml(&fine).unwrap().upstreams[0].retry_on_status,
            [503]
        );
    }

    #[test]
    fn flag_errors_name_the_flags() {
        let upstreams = ["127.0.0.1:1".to_owned(), "nowhere".to_owned()];
        let errors = Config::from_flags("8080", "127.0.0.1:9090", &upstreams)
            .unwrap_err()
            .0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["--listen", "--upstream (#2)"]);
        let errors = Config::from_flags("127.0.0.1:8080", "127.0.0.1:8080", &upstreams[..1])
            .unwrap_err()
            .0;
        assert_eq!(errors[0].key, "--admin-listen");
        assert!(
            errors[0].message.contains("port of --listen"),
            "{}",
            errors[0]
        );
        let mixed = ["127.0.0.1:1".to_owned(), "https://127.0.0.1:2".to_owned()];
        let errors = Config::from_flags("127.0.0.1:8080", "127.0.0.1:9090", &mixed)
            .unwrap_err()
            .0;
        assert_eq!(errors[0].key, "--upstream", "{}", errors[0]);
    }

    #[test]
    fn the_admin_address_is_named_as_it_was_written() {
        let (key, line, _) = first_problem("[server]\nadmin_listen = \"0.0.0.0:99999\"");
        assert_eq!((key.as_str(), line), ("server.admin_listen", Some(2)));
        let (key, _, _) = first_problem(
            "[server]\nadmin_listen = \"127.0.0.1:9091\"\n[admin]\nlisten = \"127.0.0.1:9092\"",
        );
        assert_eq!(key, "server.admin_listen");
    }

    #[test]
    fn refusals_found_after_loading_are_placed_as_the_file_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n",
        )
        .unwrap();
        let refusal = |key: &str| ConfigError {
            key: key.into(),
            line: None,
            message: "takes a restart".into(),
        };
        // The config knows how the file spells the admin address's key.
        let text = std::fs::read_to_string(&path).unwrap();
        let written = format!("{text}[upstreams.app]\ninstances = [\"127.0.0.1:3\"]\n[[routes]]\nupstream = \"app\"\n");
        std::fs::write(&path, &written).unwrap();
        let admin_key = Config::load(&path).unwrap().admin.listen_key;
        assert_eq!(admin_key, "server.admin_listen");
        let mut errors = [refusal(admin_key), refusal("server.listen")];
        Config::place_in_file(&path, &mut errors);
        let placed: Vec<(&str, Option<usize>)> =
            errors.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            placed,
            [("server.listen", Some(2)), ("server.admin_listen", Some(3))]
        );
        // An unquoted `${VAR}` is no TOML before it is filled in: placed all the same.
        let unquoted = written.replacen(
            "[server]\n",
            "[server]\nmax_headers = ${SG_TEST_NEVER_SET_MH:-50}\n",
            1,
        );
        std::fs::write(&path, unquoted).unwrap();
        assert!(Config::load(&path).is_ok());
        let mut errors = [refusal("server.listen")];
        Config::place_in_file(&path, &mut errors);
        assert_eq!(errors[0].line, Some(3));
    }

    #[test]
    fn an_inherited_drain_timeout_is_named_where_the_file_has_it() {
        let text = "[upstreams.app]\ndrain_timeout = \"5s\"\n[upstreams.app.autoscale]\nmax = 2\n\
            [upstreams.own]\n[upstreams.own.autoscale]\ndrain_timeout = \"9s\"\n";
        let refusal = |key: &str| ConfigError {
            key: key.into(),
            line: None,
            message: "takes a restart".into(),
        };
        let mut errors = [
            refusal("upstreams.app.autoscale.drain_timeout"),
            refusal("upstreams.own.autoscale.drain_timeout"),
            refusal("upstreams.app.autoscale.stop_grace"),
        ];
        name_inherited_drain_timeouts(text, &mut errors);
        lines::place(text, &mut errors);
        let placed: Vec<(&str, Option<usize>)> =
            errors.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            placed,
            [
                ("upstreams.app.drain_timeout", Some(2)),
                ("upstreams.own.autoscale.drain_timeout", Some(7)),
                ("upstreams.app.autoscale.stop_grace", Some(3)),
            ]
        );
        assert!(errors[0].message.contains("no drain_timeout of its own"));
    }

    /// The keys and lines of `text`'s problems.
    fn keys_and_lines(text: &str) -> Vec<(String, Option<usize>)> {
        let errors = Config::from_toml(text).unwrap_err().0;
        errors.into_iter().map(|e| (e.key, e.line)).collect()
    }

    #[test]
    fn environment_problems_hide_none_of_the_others() {
        let text = "[server]\nlisten = \"${SG_TEST_NEVER_SET_A}\"\nmax_body = \"zz\"\n\
            max_headers = ${SG_TEST_NEVER_SET_B}\nmax_connections = ${SG_TEST_NEVER_SET_C:-x}\n\n\
            [upstreams.app]\ninstances = [\"127.0.0.1:1\"]\nstrategy = \"bad\"\n\n\
            [[routes]]\nupstream = \"app\"\n";
        // The stand-ins ("" for the address, 0 for the numbers) are no value of the file's:
        // what they would make wrong with their keys is not reported.
        let expected = [
            ("${SG_TEST_NEVER_SET_A}", 2),
            ("server.max_body", 3),
            ("${SG_TEST_NEVER_SET_B}", 4),
            ("${SG_TEST_NEVER_SET_C}", 5),
            ("upstreams.app.strategy", 9),
        ];
        let expected: Vec<(String, Option<usize>)> = expected
            .iter()
            .map(|&(key, line)| (key.to_owned(), Some(line)))
            .collect();
        assert_eq!(keys_and_lines(text), expected);
        // A stand-in that breaks its line's syntax is not reported as a syntax error; a
        // syntax error elsewhere is, with the variable.
        let text = "[server]\nmax_connections = ${SG_TEST_NEVER_SET_A}${SG_TEST_NEVER_SET_B}\n";
        let found = keys_and_lines(text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found
            .iter()
            .all(|(key, line)| key.starts_with("${") && *line == Some(2)));
        let text = "[server]\nlisten = \"${SG_TEST_NEVER_SET_A}\"\nmax_body = = 1\n";
        let found = keys_and_lines(text);
        let keys: Vec<&str> = found.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(keys, ["${SG_TEST_NEVER_SET_A}", "config"], "{found:?}");
        // Unknown keys are wrong whatever their values.
        let text = "[server]\nlisen = \"${SG_TEST_NEVER_SET_A}\"\n";
        let keys: Vec<String> = keys_and_lines(text)
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert!(keys.contains(&"server.lisen".to_owned()), "{keys:?}");
    }

    #[test]
    fn upstream_names_fit_where_they_are_used() {
        for name in ["", "a/b", "q?"] {
            let text = format!(
                "[upstreams.\"{name}\"]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\nupstream = \"{name}\"\n"
            );
            let errors = Config::from_toml(&text).unwrap_err().0;
            assert_eq!(errors[0].key, format!("upstreams.{name}"), "{name}");
        }
    }

    #[test]
    fn an_ipv4_mapped_address_is_the_ipv4_one() {
        assert_eq!(
            parse_addr("http://127.0.0.1:3001/"),
            parse_addr("127.0.0.1:3001")
        );
        assert!(parse_addr("http://127.0.0.1:3001/api").is_err());
        let mapped = parse_addr("[::ffff:127.0.0.1]:3001").unwrap();
        assert_eq!(mapped, parse_addr("127.0.0.1:3001").unwrap());
    }

    #[test]
    fn syntax_errors_name_their_line_and_column() {
        let errors = Config::from_toml("[server]\nlisten = \"127.0.0.1:1\n")
            .unwrap_err()
            .0;
        assert_eq!(
            (errors[0].key.as_str(), errors[0].line),
            ("config", Some(2))
        );
        assert!(errors[0].message.contains("(column "), "{}", errors[0]);
    }

    #[test]
    fn path_prefixes_that_never_match_are_refused_and_ipv6_hosts_taken() {
        let route = |keys: &str| {
            format!(
                "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\n{keys}\nupstream = \"app\"\n"
            )
        };
        for (prefix, hint) in [
            ("/caf%C3%A9", "write `/café`"),
            ("/a/../b", "write `/b`"),
            ("/c//d", "write `/c/d`"),
            ("/x?y=1", "no `?`"),
            ("/%E9", "not text"),
            ("/a%00b", "not text"),
            ("/n\\u0000b", "control character"),
            ("api", "must start with /"),
        ] {
            let errors = Config::from_toml(&route(&format!("path_prefix = \"{prefix}\"")))
                .unwrap_err()
                .0;
            assert_eq!(errors[0].key, "routes[0].path_prefix", "{prefix}");
            assert!(errors[0].message.contains(hint), "{prefix}: {}", errors[0]);
        }
        for prefix in ["/", "/api/", "/café", "/a.b/c"] {
            let config = Config::from_toml(&route(&format!("path_prefix = \"{prefix}\"")));
            assert!(config.is_ok(), "{prefix}: {:?}", config.err());
        }
        let v6 = Config::from_toml(&route("host = \"[::1]\"")).unwrap();
        assert_eq!(v6.routes[0].host.as_deref(), Some("::1"));
        let index = crate::proxy::router::match_route(&v6.routes, Some(b"[::1]:8080"), "/");
        assert_eq!(index, Some(0));
    }

    #[test]
    fn past_the_cap_on_type_errors_a_last_line_says_more_follow() {
        let mut text = String::new();
        for i in 0..70 {
            text.push_str(&format!(
                "[upstreams.u{i}]\ninstances = [\"127.0.0.1:1\"]\nretries = \"x\"\n"
            ));
        }
        text.push_str("[[routes]]\nupstream = \"u0\"\n");
        let errors = Config::from_toml(&text).unwrap_err().0;
        let last = errors.last().unwrap();
        assert_eq!(last.key, "config");
        assert!(last.message.contains("not shown"), "{last}");
    }

    #[test]
    fn given_route_names_are_unique() {
        let text = "[upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n\
                    [[routes]]\nname = \"api\"\npath_prefix = \"/a\"\nupstream = \"app\"\n\
                    [[routes]]\nname = \"api\"\npath_prefix = \"/b\"\nupstream = \"app\"\n\
                    [[routes]]\nupstream = \"app\"\n";
        assert_placed(text, &[("routes[1].name", Some(8))]);
    }

    /// `-` labels the requests no route took: a route or upstream of that name gave a second
    /// series of the same labels, and Prometheus dropped one.
    #[test]
    fn no_route_or_upstream_is_named_dash() {
        let text = "[upstreams.\"-\"]\ninstances = [\"127.0.0.1:1\"]\n\
                    [[routes]]\nname = \"-\"\nupstream = \"-\"\n";
        let errors = Config::from_toml(text).unwrap_err().0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"upstreams.-"), "{keys:?}");
        assert!(keys.contains(&"routes[0].name"), "{keys:?}");
    }

    #[test]
    fn the_admin_listener_needs_its_own_port_and_a_password() {
        let text = "[server]\nlisten = \"127.0.0.1:8080\"\n[admin]\nlisten = \"127.0.0.1:8080\"\n\
                    username = \"admin\"\npassword = \"\"\n\
                    [upstreams.app]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\nupstream = \"app\"\n";
        let errors = Config::from_toml(text).unwrap_err().0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["admin.listen", "admin.password"]);
        assert!(
            errors[0]
                .message
                .contains("takes the port of server.listen"),
            "{}",
            errors[0]
        );
        // A wildcard address takes its port on every address; port 0 is any free port.
        let wildcard = text
            .replace("\"127.0.0.1:8080\"\n[admin]", "\"0.0.0.0:8080\"\n[admin]")
            .replace("password = \"\"", "password = \"s\"");
        let errors = Config::from_toml(&wildcard).unwrap_err().0;
        assert_eq!(errors[0].key, "admin.listen");
        let any_port = wildcard.replace(":8080", ":0");
        assert!(Config::from_toml(&any_port).is_ok());
        // 0.0.0.0 leaves IPv6 addresses free; :: takes the port on both families.
        let v6 = wildcard.replace("\"127.0.0.1:8080\"", "\"[::1]:8080\"");
        assert!(Config::from_toml(&v6).is_ok());
        let dual = v6.replace("0.0.0.0:8080", "[::]:8080");
        assert!(Config::from_toml(&dual).is_err());
    }

    #[test]
    fn problems_found_after_parsing_have_lines_too() {
        let text = "[upstreams.app]\nstrategy = \"fastest\"\ninstances = [\"127.0.0.1:1\"]\n\n\
                    [[routes]]\nupstream = \"app\"\n[[routes]]\nupstream = \"nowhere\"\npath_prefix = \"/b\"\n";
        assert_placed(
            text,
            &[
                ("upstreams.app.strategy", Some(2)),
                ("routes[1].upstream", Some(8)),
            ],
        );
    }

    #[test]
    fn zero_config_flags() {
        let config = Config::from_flags(
            "127.0.0.1:8081",
            "127.0.0.1:9091",
            &["127.0.0.1:3001".into(), "localhost:3002".into()],
        )
        .unwrap();
        assert_eq!(config.upstreams[0].instances.len(), 2);
        assert_eq!(config.routes.len(), 1);
        assert_eq!(config.admin.listen, "127.0.0.1:9091".parse().unwrap());
        assert!(Config::from_flags("127.0.0.1:8081", "127.0.0.1:9091", &[]).is_err());
    }

    #[test]
    fn cache_tables_are_validated_with_their_keys() {
        let text = r#"
[cache]
max_size = "lots"
[upstreams.app]
instances = ["127.0.0.1:1"]
[[routes]]
upstream = "app"
cache = { ttl = "5", stale_if_error = "x", max_body = "1XB", key = ["header:bad header", "nope"], warm = ["x"], ttl_statuses = [200, 304] }
[[routes]]
host = "*.a.test"
upstream = "app"
cache = { warm = ["/w"] }
[[routes]]
path_prefix = "/any-host"
upstream = "app"
cache = { warm = ["/w"] }
"#;
        let errors = Config::from_toml(text).unwrap_err().0;
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for key in [
            "cache.max_size",
            "routes[0].cache.ttl",
            "routes[0].cache.stale_if_error",
            "routes[0].cache.max_body",
            "routes[0].cache.key[0]",
            "routes[0].cache.key[1]",
            "routes[0].cache.warm[0]",
            "routes[0].cache.ttl_statuses[1]",
            "routes[1].cache.warm",
            "routes[2].cache.warm",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        let err = Config::from_toml("[upstreams.a]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\nupstream = \"a\"\ncache = { tll = \"1s\" }\n").unwrap_err().0;
        assert!(err[0].message.contains("tll"), "{}", err[0].message);
    }

    #[test]
    fn cache_defaults() {
        let text = format!("{MINIMAL}cache = {{ override = true, key = [\"cookie:lang\"] }}\n");
        let config = Config::from_toml(&text).unwrap();
        assert_eq!(config.cache.max_size, 256 * 1024 * 1024);
        let cache = config.routes[0].cache.as_ref().unwrap();
        assert_eq!(cache.ttl, Duration::from_secs(60));
        assert_eq!(cache.stale_while_revalidate, Duration::ZERO);
        assert_eq!(cache.max_body, 1024 * 1024);
        assert!(cache.override_ttl && !cache.cache_set_cookie && !cache.allow_authorization);
        assert_eq!(cache.key, [HashKey::Cookie("lang".into())]);
        assert!(Config::from_toml(MINIMAL).unwrap().routes[0]
            .cache
            .is_none());
        assert_eq!(config.cache.store, CacheStoreKind::Memory);
    }

    #[test]
    fn cache_store_redis_needs_the_state_url() {
        let redis = format!("[cache]\nstore = \"redis\"\n{MINIMAL}");
        let errors = Config::from_toml(&redis).unwrap_err().0;
        assert_eq!(errors[0].key, "cache.store");
        assert!(errors[0].message.contains("state.redis_url"));
        let shared = format!("[state]\nredis_url = \"redis://127.0.0.1:6379\"\n{redis}");
        assert_eq!(
            Config::from_toml(&shared).unwrap().cache.store,
            CacheStoreKind::Redis
        );
        let odd = format!("[cache]\nstore = \"disk\"\n{MINIMAL}");
        let errors = Config::from_toml(&odd).unwrap_err().0;
        assert!(errors[0].message.contains("expected memory or redis"));
    }

    #[test]
    fn consistent_hash_key_is_parsed() {
        let text = r#"
[upstreams.app]
strategy = "consistent_hash"
hash_key = "header:X-User"
instances = ["127.0.0.1:1"]
[[routes]]
upstream = "app"
"#;
        let config = Config::from_toml(text).unwrap();
        assert_eq!(
            config.upstreams[0].strategy,
            Strategy::ConsistentHash(HashKey::Header(HeaderName::from_static("x-user")))
        );
    }
}
