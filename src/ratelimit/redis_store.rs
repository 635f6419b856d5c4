//! The shared store: one Lua script per decision (EVALSHA, reloaded on NOSCRIPT by redis-rs),
//! time from Redis `TIME` so replicas with skewed clocks agree, keys expiring on their own.
//!
//! The link is either up or down. While up, every call is bounded by `redis_timeout`; the first
//! failure marks it down (logged once per outage) and starts a probe that pings with backoff, so
//! requests during an outage do not touch Redis at all and are decided by the fallback.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, RedisError, Script, ServerErrorKind, TlsCertificates,
};
use tokio::time::{timeout, Instant};

use super::algorithm::{decide, Algorithm, Quota, RateDecision, SlotState, Window};
use super::client::LimitKey;
use crate::config::limits::{redacted, StateConfig};

/// Reads the state, applies the same update as `algorithm::decide` when the request passes,
/// and returns what it read: {now, a, b, c}. GCRA (ARGV: 'g', T, τ): a = stored TAT or -1.
/// Sliding window (ARGV: 'w', period, limit): a = stored window index or -1, b = its previous
/// count, c = its current count. Kept lean: it runs in Redis for every request.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
if ARGV[1] == 'g' then
  local stored = tonumber(redis.call('GET', KEYS[1]))
  local tat = stored or now
  if tat < now then tat = now end
  if now + ARGV[3] >= tat then
    tat = tat + ARGV[2]
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PXAT', math.ceil(tat / 1000) + 1)
  end
  return {now, stored or -1, 0, 0}
end
local period = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'w', 'p', 'c')
local sw, sp, sc = tonumber(s[1]), tonumber(s[2]) or 0, tonumber(s[3]) or 0
local w = math.floor(now / period)
local elapsed = now - w * period
local prev, curr = 0, 0
if sw == w then prev, curr = sp, sc elseif sw == w - 1 then prev = sc end
if prev * (period - elapsed) + (curr + 1) * period <= limit * period then
  redis.call('HSET', KEYS[1], 'w', string.format('%.0f', w), 'p', prev, 'c', curr + 1)
  redis.call('PEXPIREAT', KEYS[1], math.ceil((w + 2) * period / 1000))
end
return {now, sw or -1, sp, sc}
";

/// A plain multiplexed connection (pipelining concurrent requests on one socket); when it
/// breaks, the probe replaces it. A cluster connection reconnects to its nodes by itself.
#[derive(Clone)]
enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Connection {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T, RedisError> {
        match self {
            // The inherent call: the trait's would box its future on every decision.
            Connection::Single(c) => {
                let reply = c.send_packed_command(cmd).await?.extract_error()?;
                Ok(redis::from_redis_value(reply)?)
            }
            Connection::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

/// Why the first connection failed.
#[derive(Debug)]
pub enum ConnectError {
    /// Redis refused the credentials: a config problem, the gateway does not start.
    Auth(String),
    /// Unreachable or slow: the gateway starts and decides with the fallback meanwhile.
    Unavailable(String),
}

pub struct RedisStore {
    state: StateConfig,
    script: Script,
    connection: ArcSwapOption<Connection>,
    up: AtomicBool,
    probing: AtomicBool,
    pub outages: AtomicU64,
    last_latency_us: AtomicU64,
}

impl RedisStore {
    pub fn new(state: &StateConfig) -> Arc<RedisStore> {
        Arc::new(RedisStore {
            state: state.clone(),
            script: Script::new(SCRIPT),
            connection: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            outages: AtomicU64::new(0),
            last_latency_us: AtomicU64::new(0),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The URL(s) for messages, without passwords.
    pub fn target(&self) -> String {
        let urls: Vec<String> = self.state.redis_urls.iter().map(|u| redacted(u)).collect();
        urls.join(",")
    }

    /// First connection at start-up: ping and load the script. On failure the probe keeps trying.
    pub async fn start(self: &Arc<Self>) -> Result<(), ConnectError> {
        match self.connect_and_check(startup_timeout(&self.state)).await {
            Ok(_) => {
                self.up.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(err) => {
                let failure = if is_auth_error(&err) {
                    ConnectError::Auth(format!(
                        "Redis at {} refused the credentials: {err}",
                        self.target()
                    ))
                } else {
                    ConnectError::Unavailable(format!("Redis at {}: {err}", self.target()))
                };
                if let ConnectError::Unavailable(message) = &failure {
                    tracing::warn!("{message}; deciding locally until it answers");
                    self.mark_down();
                }
                Err(failure)
            }
        }
    }

    /// Decides at Redis with one EVALSHA (`key_prefix`: the rule's [`super::redis_prefix`]);
    /// `None` when the link is down or this call failed (which marks it down).
    pub async fn decide(
        self: &Arc<Self>,
        key_prefix: &[u8],
        quota: &Quota,
        key: &LimitKey<'_>,
    ) -> Option<RateDecision> {
        if !self.is_up() {
            return None;
        }
        let mut connection = Connection::clone(self.connection.load().as_ref()?);
        let mut cmd = Cmd::with_capacity(7, 160);
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(1)
            .arg(&key.redis_key(key_prefix)[..]);
        match quota.algorithm {
            Algorithm::Gcra => cmd
                .arg("g")
                .arg(quota.interval_us())
                .arg(quota.tolerance_us()),
            Algorithm::SlidingWindow => cmd.arg("w").arg(quota.period_us).arg(quota.limit),
        };
        // Bounded by the connection's response timeout (`redis_timeout`).
        let reply = match connection.query::<(i64, i64, i64, i64)>(&cmd).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // Redis restarted or flushed its scripts: load it again, then decide.
                match connection.query::<String>(&load_script()).await {
                    Ok(_) => connection.query(&cmd).await,
                    Err(err) => Err(err),
                }
            }
            other => other,
        };
        let (now, a, b, c) = match reply {
            Ok(reply) => reply,
            Err(err) => {
                tracing::debug!(%err, "Redis decision failed");
                self.mark_down();
                return None;
            }
        };
        let now = now.max(0) as u64;
        let stored = (a >= 0).then(|| match quota.algorithm {
            Algorithm::Gcra => SlotState::Gcra(a as u64),
            Algorithm::SlidingWindow => SlotState::Window(Window {
                index: a as u64,
                prev: b.max(0) as u64,
                curr: c.max(0) as u64,
            }),
        });
        Some(decide(quota, stored, now).0)
    }

    /// PING round trip, for `/health/redis`.
    pub async fn ping(&self) -> Result<Duration, String> {
        let Some(connection) = self.connection.load_full() else {
            return Err(if self.probing.load(Ordering::Relaxed) {
                "not connected yet".to_string()
            } else {
                "not connected".to_string()
            });
        };
        let started = Instant::now();
        match timeout(
            self.state.redis_timeout.max(Duration::from_millis(500)),
            ping(Connection::clone(&connection)),
        )
        .await
        {
            Ok(Ok(())) => {
                let latency = started.elapsed();
                self.last_latency_us
                    .store(latency.as_micros() as u64, Ordering::Relaxed);
                Ok(latency)
            }
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Marks the link down (logged once per outage) and starts the probe that brings it back.
    fn mark_down(self: &Arc<Self>) {
        if self.up.swap(false, Ordering::Relaxed) {
            self.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                redis = %self.target(),
                "Redis does not answer; rate limits fall back until it does"
            );
        }
        if !self.probing.swap(true, Ordering::Relaxed) {
            tokio::spawn(self.clone().probe());
        }
    }

    async fn probe(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            tokio::time::sleep(backoff).await;
            match self.connect_and_check(startup_timeout(&self.state)).await {
                Ok(()) => {
                    self.probing.store(false, Ordering::Relaxed);
                    self.up.store(true, Ordering::Relaxed);
                    tracing::info!(redis = %self.target(), "Redis answers again; limits are shared again");
                    return;
                }
                Err(err) => tracing::debug!(%err, "Redis probe failed"),
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Opens a connection (a cluster's is kept: it reconnects by itself), pings, loads the
    /// script, and makes it the one decisions use.
    async fn connect_and_check(&self, limit: Duration) -> Result<(), RedisError> {
        let work = async {
            let mut connection = match self.connection.load_full() {
                Some(c) if matches!(*c, Connection::Cluster(_)) => Connection::clone(&c),
                _ => self.open().await?,
            };
            ping(connection.clone()).await?;
            if let Connection::Single(_) = connection {
                // A cluster loads it per node on first use (NOSCRIPT).
                connection.query::<String>(&load_script()).await?;
            }
            self.connection.store(Some(Arc::new(connection)));
            Ok(())
        };
        match timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ))),
        }
    }

    async fn open(&self) -> Result<Connection, RedisError> {
        let certificates = || TlsCertificates {
            client_tls: None,
            root_cert: self.state.redis_ca.clone(),
        };
        if self.state.redis_cluster {
            let mut builder = redis::cluster::ClusterClientBuilder::new(
                self.state.redis_urls.iter().map(String::as_str),
            )
            .connection_timeout(startup_timeout(&self.state))
            .response_timeout(self.state.redis_timeout);
            if self.state.redis_ca.is_some() {
                builder = builder.certs(certificates());
            }
            Ok(Connection::Cluster(
                builder.build()?.get_async_connection().await?,
            ))
        } else {
            let url = self.state.redis_urls[0].as_str();
            let client = if self.state.redis_ca.is_some() {
                redis::Client::build_with_tls(url, certificates())?
            } else {
                redis::Client::open(url)?
            };
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(startup_timeout(&self.state)))
                .set_response_timeout(Some(self.state.redis_timeout));
            Ok(Connection::Single(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            ))
        }
    }

    pub fn last_latency(&self) -> Duration {
        Duration::from_micros(self.last_latency_us.load(Ordering::Relaxed))
    }
}

/// Connecting (TCP, TLS, AUTH, SELECT) takes several round trips: allow more than one decision.
fn startup_timeout(state: &StateConfig) -> Duration {
    (state.redis_timeout * 10).max(Duration::from_secs(1))
}

fn load_script() -> Cmd {
    let mut cmd = redis::cmd("SCRIPT");
    cmd.arg("LOAD").arg(SCRIPT);
    cmd
}

async fn ping(mut connection: Connection) -> Result<(), RedisError> {
    let cmd = redis::cmd("PING");
    match &mut connection {
        Connection::Single(c) => c.req_packed_command(&cmd).await.map(drop),
        Connection::Cluster(c) => c.req_packed_command(&cmd).await.map(drop),
    }
}

fn is_auth_error(err: &RedisError) -> bool {
    let text = err.to_string();
    err.kind() == redis::ErrorKind::AuthenticationFailed
        || [
            "WRONGPASS",
            "NOAUTH",
            "NOPERM",
            "invalid password",
            "invalid username",
        ]
        .iter()
        .any(|marker| text.contains(marker))
}
