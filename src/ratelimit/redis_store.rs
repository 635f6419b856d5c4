//! The shared store: one Lua script per decision (EVALSHA, reloaded on NOSCRIPT by redis-rs),
//! time from Redis `TIME` so replicas with skewed clocks agree, keys expiring on their own.
//!
//! The link is either up or down. While up, every call is bounded by `redis_timeout`; the first
//! failure marks it down (logged once per outage) and starts a probe that pings with backoff, so
//! requests during an outage do not touch Redis at all and are decided by the fallback.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, Script};
use tokio::time::{timeout, Instant};

use super::algorithm::{decide, Algorithm, Quota, RateDecision, SlotState, Window};
use super::client::LimitKey;
use crate::config::limits::{redacted, StateConfig};

/// Reads the state, applies the same update as `algorithm::decide` when the request passes,
/// and returns what it read: {now, a, b, c}. GCRA: a = stored TAT or -1. Sliding window:
/// a = stored window index or -1, b = its previous count, c = its current count.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[2])
if ARGV[1] == 'g' then
  local interval = tonumber(ARGV[3])
  local tolerance = tonumber(ARGV[4])
  local stored = tonumber(redis.call('GET', KEYS[1]))
  local tat = math.max(stored or now, now)
  if now + tolerance >= tat then
    tat = tat + interval
    redis.call('SET', KEYS[1], string.format('%.0f', tat))
    redis.call('PEXPIREAT', KEYS[1], math.ceil(tat / 1000) + 1)
  end
  return {now, stored or -1, 0, 0}
end
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

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
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
    connection: OnceLock<Connection>,
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
            connection: OnceLock::new(),
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

    /// Decides at Redis; `None` when the link is down or this call failed (which marks it down).
    pub async fn decide(
        self: &Arc<Self>,
        rule: &str,
        quota: &Quota,
        key: &LimitKey<'_>,
    ) -> Option<RateDecision> {
        if !self.is_up() {
            return None;
        }
        let mut connection = self.connection.get()?.clone();
        let mut invocation = self.script.key(key.redis_key(rule));
        invocation.arg(match quota.algorithm {
            Algorithm::Gcra => "g",
            Algorithm::SlidingWindow => "w",
        });
        invocation.arg(quota.period_us);
        match quota.algorithm {
            Algorithm::Gcra => invocation
                .arg(quota.interval_us())
                .arg(quota.tolerance_us()),
            Algorithm::SlidingWindow => invocation.arg(quota.limit),
        };
        let call = async {
            match &mut connection {
                Connection::Single(c) => invocation.invoke_async::<Vec<i64>>(c).await,
                Connection::Cluster(c) => invocation.invoke_async::<Vec<i64>>(c).await,
            }
        };
        let reply = match timeout(self.state.redis_timeout, call).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(err)) => {
                tracing::debug!(%err, "Redis decision failed");
                self.mark_down();
                return None;
            }
            Err(_) => {
                self.mark_down();
                return None;
            }
        };
        let &[now, a, b, c] = reply.as_slice() else {
            tracing::warn!(?reply, "unexpected reply from the rate-limit script");
            return None;
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
        let Some(connection) = self.connection.get() else {
            return Err(if self.probing.load(Ordering::Relaxed) {
                "not connected yet".to_string()
            } else {
                "not connected".to_string()
            });
        };
        let started = Instant::now();
        match timeout(
            self.state.redis_timeout.max(Duration::from_millis(500)),
            ping(connection.clone()),
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

    /// Opens the connection if there is none yet, pings, and loads the script.
    async fn connect_and_check(&self, limit: Duration) -> Result<(), RedisError> {
        let work = async {
            let connection = match self.connection.get() {
                Some(c) => c.clone(),
                None => {
                    let c = self.open().await?;
                    self.connection.get_or_init(|| c).clone()
                }
            };
            ping(connection.clone()).await?;
            if let Connection::Single(mut c) = connection {
                // A cluster loads it per node on first use (NOSCRIPT).
                self.script.prepare_invoke().load_async(&mut c).await?;
            }
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
        if self.state.redis_cluster {
            let client = redis::cluster::ClusterClient::new(
                self.state.redis_urls.iter().map(String::as_str),
            )?;
            Ok(Connection::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(self.state.redis_urls[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(startup_timeout(&self.state)))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            Ok(Connection::Single(ConnectionManager::new_lazy_with_config(
                client, config,
            )?))
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
