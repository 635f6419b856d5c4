//! A link to Redis (`[state]`): a multiplexed connection (or a cluster connection) opened with
//! the `[state]` settings. The rate limiter and the response cache each have their own, so a
//! burst of large cache transfers never holds up (or times out) a rate-limit decision.
//!
//! The link is either up or down. While up, every call is bounded by `redis_timeout`; the first
//! failure marks it down (logged once per outage) and starts a probe that pings with backoff, so
//! requests during an outage do not touch Redis at all and each user falls back its own way.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, TlsCertificates, Value,
};
use tokio::time::{timeout, Instant};

use crate::config::limits::{redacted, StateConfig};

/// A connection to one node or to a cluster; both multiplex, so clones share one socket. A
/// single node's plain multiplexed connection is replaced by the probe when it breaks; a
/// cluster connection reconnects to its nodes by itself.
#[derive(Clone)]
pub enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Connection {
    /// This handle with its own per-command limit instead of `redis_timeout`, for admin work
    /// (purges, health pings) that may take longer than a rate-limit decision. A cluster
    /// connection keeps the limit it was built with: redis-rs sets it per connection there.
    pub fn with_response_timeout(mut self, limit: Duration) -> Connection {
        if let Connection::Single(c) = &mut self {
            c.set_response_timeout(limit);
        }
        self
    }

    /// One command and its typed reply. For a single node this is the inherent call: going
    /// through the `ConnectionLike` trait would box its future on every request.
    pub async fn query<T: redis::FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T, RedisError> {
        match self {
            Connection::Single(c) => {
                let reply = c.send_packed_command(cmd).await?.extract_error()?;
                Ok(redis::from_redis_value(reply)?)
            }
            Connection::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// Why the first connection failed.
#[derive(Debug)]
pub enum ConnectError {
    /// Redis refused the credentials: a config problem, the gateway does not start.
    Auth(String),
    /// Unreachable or slow: the gateway starts and its users fall back meanwhile.
    Unavailable(String),
}

/// Who a link serves: named in its log lines, as each falls back its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkUser {
    RateLimits,
    Cache,
}

impl LinkUser {
    fn name(self) -> &'static str {
        match self {
            LinkUser::RateLimits => "rate limits",
            LinkUser::Cache => "cache",
        }
    }

    /// What happens while its link is down.
    fn fallback(self) -> &'static str {
        match self {
            LinkUser::RateLimits => "rate limits fall back to this instance (on_redis_error)",
            LinkUser::Cache => "the response cache serves from this instance's memory",
        }
    }
}

pub struct RedisLink {
    pub state: StateConfig,
    user: LinkUser,
    connection: ArcSwapOption<Connection>,
    /// Why the link went down, or why the probe last failed: what `/health/redis` says during
    /// an outage (the old connection's error would be stale, e.g. a broken pipe where Redis
    /// now refuses the password).
    last_error: std::sync::Mutex<Option<String>>,
    up: AtomicBool,
    /// When the probe last brought the link up ([`crate::clock::ticks_ms`]); 0 while it has
    /// not (up from the start, or never up).
    up_since_ms: AtomicU64,
    /// The probe's first wait, in milliseconds ([`first_probe_delay`]).
    probe_delay_ms: AtomicU64,
    probing: AtomicBool,
    /// Held by the call replacing a broken connection.
    reconnecting: tokio::sync::Mutex<()>,
    pub outages: AtomicU64,
}

impl RedisLink {
    pub fn new(state: &StateConfig, user: LinkUser) -> Arc<RedisLink> {
        Arc::new(RedisLink {
            state: state.clone(),
            user,
            connection: ArcSwapOption::empty(),
            last_error: std::sync::Mutex::new(None),
            up: AtomicBool::new(false),
            up_since_ms: AtomicU64::new(0),
            probe_delay_ms: AtomicU64::new(FIRST_PROBE_DELAY.as_millis() as u64),
            probing: AtomicBool::new(false),
            reconnecting: tokio::sync::Mutex::new(()),
            outages: AtomicU64::new(0),
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

    /// First connection at start-up. On failure the probe keeps trying.
    pub async fn start(self: &Arc<Self>) -> Result<(), ConnectError> {
        match self.connect_and_check(startup_timeout(&self.state)).await {
            Ok(()) => {
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
                    // Not up yet: `mark_down` does not log this first outage itself.
                    tracing::warn!(
                        link = self.user.name(),
                        "{message}; {} until it answers",
                        self.user.fallback()
                    );
                    self.mark_down(message);
                }
                Err(failure)
            }
        }
    }

    /// Connects in the background when the link has not been up yet nor is being tried (the
    /// cache's link, when a reload turns the shared cache on).
    pub fn start_in_background(self: &Arc<Self>) {
        if !self.is_up() && !self.probing.swap(true, Ordering::Relaxed) {
            tokio::spawn(self.clone().probe());
        }
    }

    /// The connection while the link is up; `None` during an outage.
    pub fn connection(&self) -> Option<Connection> {
        if !self.is_up() {
            return None;
        }
        self.connection.load().as_deref().cloned()
    }

    /// Runs `call` on the connection; `None` when the link is down or the call failed or timed
    /// out (which marks the link down). Each command is bounded by the connection's own
    /// response timeout (`redis_timeout`), so no timer of ours is armed per call.
    ///
    /// A single node's connection found broken (Redis restarted, or the connection was cut)
    /// is replaced at once and `call` runs once more on the new one, so a restart does not send
    /// the requests in flight to the fallback. `call` thus runs at least once: a connection cut
    /// after Redis ran it but before the reply came runs it twice (a rate-limit decision then
    /// counts the request twice, the stricter way).
    pub async fn call<T, F, Fut>(self: &Arc<Self>, call: F) -> Option<T>
    where
        F: Fn(Connection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        if !self.is_up() {
            return None;
        }
        let connection = self.connection.load_full()?;
        match call(Connection::clone(&connection)).await {
            Err(err)
                if err.is_connection_dropped() && matches!(*connection, Connection::Single(_)) =>
            {
                tracing::debug!(%err, "Redis connection broken, opening another");
                let fresh = self.replace_broken(&connection).await?;
                self.settle(call(fresh).await)
            }
            result => self.settle(result),
        }
    }

    /// A working connection in place of `broken`: the one another call already opened, or a
    /// new one (within a few `redis_timeout`s). `None`, and the link marked down, when none
    /// opens.
    async fn replace_broken(self: &Arc<Self>, broken: &Arc<Connection>) -> Option<Connection> {
        // One caller reconnects; the others wait for it and take what it opened, or fall back
        // at once when it found Redis down (each trying again would stall them in turn).
        let _turn = self.reconnecting.lock().await;
        if !self.is_up() {
            return None;
        }
        let current = self.connection.load_full()?;
        if !Arc::ptr_eq(&current, broken) {
            return Some(Connection::clone(&current));
        }
        match self.connect_and_check(self.state.redis_timeout * 4).await {
            Ok(()) => self.connection(),
            Err(err) => {
                self.mark_down(&format!("reconnecting: {err}"));
                None
            }
        }
    }

    /// [`RedisLink::call`] for admin work of many round trips (a purge's SCAN over a large
    /// keyspace): each command bounded by `command_limit` rather than `redis_timeout`, the
    /// whole by nothing, so it finishes however large the keyspace, as long as Redis answers.
    pub async fn call_admin<T, F, Fut>(
        self: &Arc<Self>,
        command_limit: Duration,
        call: F,
    ) -> Option<T>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let connection = self.connection()?.with_response_timeout(command_limit);
        self.settle(call(connection).await)
    }

    fn settle<T>(self: &Arc<Self>, result: Result<T, RedisError>) -> Option<T> {
        match result {
            Ok(reply) => Some(reply),
            Err(err) => {
                tracing::debug!(%err, "Redis call failed");
                self.mark_down(&err.to_string());
                None
            }
        }
    }

    /// PING round trip, for `/health/redis`; while the link is up, also the write its probe
    /// makes, so that a Redis demoted or out of memory is found by the health check of an
    /// idle gateway too (the link is marked down then, as by a failed decision).
    pub async fn ping(self: &Arc<Self>) -> Result<Duration, String> {
        if !self.is_up() {
            // The probe's own verdict: the connection kept from before the outage may be
            // long dead.
            let last = self.last_error.lock().expect("last error").clone();
            if let Some(error) = last {
                return Err(error);
            }
        }
        let Some(stored) = self.connection.load_full() else {
            return Err(if self.probing.load(Ordering::Relaxed) {
                "not connected yet".to_string()
            } else {
                "not connected".to_string()
            });
        };
        let limit = self.state.redis_timeout.max(Duration::from_millis(500));
        let mut connection = Connection::clone(&stored).with_response_timeout(limit);
        let mut started = Instant::now();
        let mut pinged = timeout(limit, ping(connection.clone())).await;
        // Redis restarted while this gateway was idle: no decision replaced the connection, so
        // the health check does, as a call would, rather than report the dead one for good.
        if let Ok(Err(err)) = &pinged {
            if err.is_connection_dropped() && matches!(*stored, Connection::Single(_)) {
                if let Some(fresh) = self.replace_broken(&stored).await {
                    connection = fresh.with_response_timeout(limit);
                    started = Instant::now();
                    pinged = timeout(limit, ping(connection.clone())).await;
                }
            }
        }
        let latency = match pinged {
            Ok(Ok(())) => started.elapsed(),
            Ok(Err(err)) => return Err(err.to_string()),
            Err(_) => return Err("timed out".into()),
        };
        if self.is_up() {
            let writes = serves_writes(connection, self.state.redis_timeout);
            let written = timeout(limit, writes).await.unwrap_or_else(|_| {
                Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "a write timed out",
                )))
            });
            if let Err(err) = written {
                // A refusal takes the link down, as a decision's would. A health check that
                // anyone may call does not, for a slow answer or a cut connection.
                if refused_by_redis(&err) {
                    self.mark_down(&err.to_string());
                }
                return Err(err.to_string());
            }
        }
        Ok(latency)
    }

    /// `/health/redis`'s view of this link: whether it serves, and `status`, `shared` and the
    /// PING's `latency_ms` or the `error` that keeps it down.
    pub async fn health(self: &Arc<Self>) -> (bool, serde_json::Value) {
        let shared = self.is_up();
        match self.ping().await {
            Ok(latency) if shared => (
                true,
                serde_json::json!({
                    "status": "ok",
                    "shared": true,
                    "latency_ms": latency.as_secs_f64() * 1000.0,
                }),
            ),
            // Down whatever PING says: a Redis out of memory, paused for writes, demoted to a
            // replica or too slow answers it.
            Ok(latency) => (
                false,
                serde_json::json!({
                    "status": "down",
                    "shared": false,
                    "latency_ms": latency.as_secs_f64() * 1000.0,
                    "error": "Redis answers PING but not the writes the shared state needs, in time",
                }),
            ),
            Err(error) => (
                false,
                serde_json::json!({"status": "down", "shared": false, "error": error}),
            ),
        }
    }

    /// Why the link is down now (`None` once it is up), for `/health/redis`.
    fn note_error(&self, error: Option<String>) {
        *self.last_error.lock().expect("last error") = error;
    }

    /// Marks the link down for `reason` (logged once per outage) and starts the probe that
    /// brings it back.
    fn mark_down(self: &Arc<Self>, reason: &str) {
        self.note_error(Some(reason.to_owned()));
        if self.up.swap(false, Ordering::Relaxed) {
            let up_since = self.up_since_ms.load(Ordering::Relaxed);
            let up_for = match up_since {
                0 => Duration::MAX,
                since => {
                    let now = crate::clock::ticks_ms(Instant::now());
                    Duration::from_millis(now.saturating_sub(since))
                }
            };
            let previous = Duration::from_millis(self.probe_delay_ms.load(Ordering::Relaxed));
            let (delay, same_outage) = first_probe_delay(up_for, previous);
            self.probe_delay_ms
                .store(delay.as_millis() as u64, Ordering::Relaxed);
            if same_outage {
                tracing::debug!(
                    error = reason,
                    "Redis failed again soon after the probe passed"
                );
            } else {
                self.outages.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                redis = %self.target(),
                link = self.user.name(),
                error = reason,
                    "Redis does not answer, or refuses commands; {} until it serves",
                    self.user.fallback()
                );
            }
        }
        if !self.probing.swap(true, Ordering::Relaxed) {
            tokio::spawn(self.clone().probe());
        }
    }

    async fn probe(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(self.probe_delay_ms.load(Ordering::Relaxed));
        // A reason the operator must act on (a password or ACL changed) is said once, at
        // WARN: the outage's line may only say the connection broke.
        let mut said_refusal = false;
        loop {
            tokio::time::sleep(backoff).await;
            match self.connect_and_check(startup_timeout(&self.state)).await {
                Ok(()) => {
                    self.note_error(None);
                    self.probing.store(false, Ordering::Relaxed);
                    let now = crate::clock::ticks_ms(Instant::now());
                    self.up_since_ms.store(now, Ordering::Relaxed);
                    self.up.store(true, Ordering::Relaxed);
                    let link = self.user.name();
                    if self.outages.load(Ordering::Relaxed) == 0 {
                        // Its first connection: Redis was unreachable at start, or a reload
                        // turned the shared cache on.
                        tracing::info!(redis = %self.target(), link, "Redis connected; state is shared");
                    } else {
                        tracing::info!(redis = %self.target(), link, "Redis answers again; state is shared again");
                    }
                    return;
                }
                Err(err) => {
                    if is_auth_error(&err) && !said_refusal {
                        said_refusal = true;
                        tracing::warn!(redis = %self.target(), link = self.user.name(), error = %err, "Redis refuses the gateway's credentials");
                    } else {
                        tracing::debug!(%err, "Redis probe failed");
                    }
                    self.note_error(Some(err.to_string()));
                }
            }
            backoff = next_probe_delay(backoff);
        }
    }

    /// Opens a connection (a cluster's is kept: it reconnects by itself), pings, and makes it
    /// the one calls use.
    async fn connect_and_check(&self, limit: Duration) -> Result<(), RedisError> {
        let work = async {
            let connection = match self.connection.load_full() {
                Some(c) if matches!(*c, Connection::Cluster(_)) => Connection::clone(&c),
                _ => self.open().await?,
            };
            ping(connection.clone()).await?;
            serves_writes(connection.clone(), self.state.redis_timeout).await?;
            may_use_keys(connection.clone(), self.user).await?;
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

    /// A client of the node at `url`, trusting `state.redis_ca` for `rediss://` when set.
    pub fn node_client(&self, url: &str) -> Result<redis::Client, RedisError> {
        match self.trusted_ca() {
            Some(certificates) => redis::Client::build_with_tls(url, certificates),
            None => redis::Client::open(url),
        }
    }

    /// `state.redis_ca` as redis-rs takes it, when set.
    fn trusted_ca(&self) -> Option<TlsCertificates> {
        self.state.redis_ca.as_ref().map(|ca| TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        })
    }

    async fn open(&self) -> Result<Connection, RedisError> {
        if self.state.redis_cluster {
            let mut builder = redis::cluster::ClusterClientBuilder::new(
                self.state.redis_urls.iter().map(String::as_str),
            )
            .connection_timeout(startup_timeout(&self.state))
            .response_timeout(self.state.redis_timeout);
            if let Some(certificates) = self.trusted_ca() {
                builder = builder.certs(certificates);
            }
            Ok(Connection::Cluster(
                builder.build()?.get_async_connection().await?,
            ))
        } else {
            let client = self.node_client(&self.state.redis_urls[0])?;
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
}

/// The probe's first wait: a Redis that only dropped the connection (restarted, or failed
/// over) is found back at once.
const FIRST_PROBE_DELAY: Duration = Duration::from_millis(50);

/// The probe's longest wait: a Redis down for long is still found back within a second, and is
/// not asked more than once a second meanwhile.
const LONGEST_PROBE_DELAY: Duration = Duration::from_secs(1);

/// The probe's wait after one of `previous` failed: twice as long, up to
/// [`LONGEST_PROBE_DELAY`].
fn next_probe_delay(previous: Duration) -> Duration {
    previous.saturating_mul(2).min(LONGEST_PROBE_DELAY)
}

/// A link up for less than this when it fails again is the same outage: whatever the probe
/// checks passed, but the calls still fail (a cluster node down that holds some keys' slots).
const STEADY_AFTER: Duration = Duration::from_secs(5);

/// The probe's first wait once the link, up for `up_for`, went down, and whether that is the
/// outage before it going on. One that goes on waits longer each time (from `previous`, the
/// last first wait), so the calls that pay `redis_timeout` each time it is let up again grow
/// rarer, and it is not logged as one more outage.
fn first_probe_delay(up_for: Duration, previous: Duration) -> (Duration, bool) {
    if up_for < STEADY_AFTER {
        (next_probe_delay(previous), true)
    } else {
        (FIRST_PROBE_DELAY, false)
    }
}

/// Connecting (TCP, TLS, AUTH, SELECT) takes several round trips: allow more than one call.
pub fn startup_timeout(state: &StateConfig) -> Duration {
    (state.redis_timeout * 10).max(Duration::from_secs(1))
}

/// A PING answered with success: an error reply (NOAUTH from a Redis that wants a password)
/// is a failure, though the connection carried it.
async fn ping(mut connection: Connection) -> Result<(), RedisError> {
    connection
        .req_packed_command(&redis::cmd("PING"))
        .await
        .and_then(Value::extract_error)
        .map(drop)
}

/// Whether a lone Redis takes writes: a replica answers PING but refuses every script with
/// READONLY, so it cannot hold shared state. (A cluster routes writes to its primaries.) Only
/// a replica's answer fails the check: a user not allowed ROLE (an ACL without `@admin`)
/// gets an error reply, and its Redis is taken as it is.
async fn takes_writes(mut connection: Connection) -> Result<(), RedisError> {
    let role = connection.req_packed_command(&redis::cmd("ROLE")).await?;
    let first = match &role {
        Value::Array(parts) => parts.first(),
        _ => None,
    };
    let is_replica = matches!(first, Some(Value::BulkString(role)) if role.as_slice() == b"slave");
    if is_replica {
        return Err(RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "a read-only replica",
            "point state.redis_url at the primary".to_owned(),
        )));
    }
    Ok(())
}

/// Whether a lone Redis takes writes ([`takes_writes`]) and one goes through within
/// `redis_timeout`: a Redis that answers PING but refuses writes (out of memory under
/// `noeviction`) or holds them (`CLIENT PAUSE WRITE`, as a failover does) would fail the next
/// decisions again at once, and the link would flap down and up at every request. Not on a
/// cluster, which routes writes to its primaries and where the probe key's one shard would
/// decide for all of them; and a user whose ACL does not cover the probe key (NOPERM) is taken
/// as it is, as one not allowed ROLE is.
async fn serves_writes(
    mut connection: Connection,
    redis_timeout: Duration,
) -> Result<(), RedisError> {
    if matches!(connection, Connection::Cluster(_)) {
        return Ok(());
    }
    takes_writes(connection.clone()).await?;
    let started = Instant::now();
    let mut set = redis::cmd("SET");
    set.arg("scalegate:probe").arg(1).arg("PX").arg(10_000);
    match connection.req_packed_command(&set).await? {
        Value::ServerError(err) if err.code() == "NOPERM" => {}
        reply => drop(reply.extract_error()?),
    }
    if started.elapsed() > redis_timeout {
        return Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "a write took longer than redis_timeout",
        )));
    }
    Ok(())
}

/// Whether the user may do what `user` does with its keys: an ACL without `EVALSHA`, or whose
/// key patterns leave out the limiter's (`scalegate:rl:*`) or the cache's (`scalegate:cache:*`)
/// keys, passes every other check and then refuses each call, and the link went down and up
/// again with every request. Redis checks a command's keys before it runs it: `EVALSHA` of a
/// script nobody loaded answers NOSCRIPT to a user who may run it on that key, a read of a
/// missing key 0.
async fn may_use_keys(mut connection: Connection, user: LinkUser) -> Result<(), RedisError> {
    let check = match user {
        LinkUser::RateLimits => {
            let mut evalsha = redis::cmd("EVALSHA");
            evalsha
                .arg("0000000000000000000000000000000000000000")
                .arg(1)
                .arg("scalegate:rl:probe");
            evalsha
        }
        LinkUser::Cache => {
            let mut exists = redis::cmd("EXISTS");
            exists.arg("scalegate:cache:probe");
            exists
        }
    };
    let reply = connection.req_packed_command(&check).await?;
    match &reply {
        Value::ServerError(err) if err.code() == "NOPERM" => reply.extract_error().map(drop),
        _ => Ok(()),
    }
}

/// Redis itself refused (an error reply): not a connection cut, nor one slow answer, which
/// the next decision judges on its own.
fn refused_by_redis(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
    )
}

/// Redis refused the gateway's credentials or its ACL the commands. By the reply's code:
/// redis-rs writes a NOPERM reply as `NoPerm: ...`, which a look for `NOPERM` in the text missed.
/// A cluster's first connection keeps only the text of a node's error (in an I/O error, "Failed
/// to create initial connections"), so the text is also searched for the way redis-rs writes
/// each of these: a refused AUTH by its kind, WRONGPASS and NOAUTH quoted, NOPERM as `NoPerm`.
/// A refused SELECT keeps only the reply's detail: NOAUTH's and NOPERM's are searched for too.
fn is_auth_error(err: &RedisError) -> bool {
    let text = err.to_string();
    err.kind() == redis::ErrorKind::AuthenticationFailed
        || err
            .code()
            .is_some_and(|code| ["WRONGPASS", "NOAUTH", "NOPERM"].contains(&code))
        || [
            "invalid password",
            "invalid username",
            "AuthenticationFailed",
            "\"WRONGPASS\"",
            "\"NOAUTH\"",
            "NoPerm",
            "Authentication required",
            "has no permissions",
        ]
        .iter()
        .any(|marker| text.contains(marker))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error redis-rs makes of an error reply, as a call or the link's own PING gets it.
    fn reply(resp: &str) -> RedisError {
        let reply = redis::parse_redis_value(resp.as_bytes()).expect("an error reply");
        reply.extract_error().expect_err("an error reply")
    }

    fn io(kind: std::io::ErrorKind, text: &str) -> RedisError {
        RedisError::from(std::io::Error::new(kind, text.to_owned()))
    }

    /// What the gateway is told when Redis refuses its credentials: the first connection then
    /// stops the gateway, and the probe says so at WARN.
    #[test]
    fn refused_credentials_and_acls_are_auth_errors() {
        for refused in [
            // AUTH refused on a RESP2 connection (a wrong password, or one Redis does not
            // want): redis-rs keeps no code, only its kind.
            RedisError::from((
                redis::ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )),
            // HELLO's AUTH refused on a RESP3 connection.
            reply("-WRONGPASS invalid username-password pair or user is disabled.\r\n"),
            // No password where Redis wants one: the connection opens, its PING is refused.
            reply("-NOAUTH Authentication required.\r\n"),
            // An ACL without the commands the gateway runs.
            reply("-NOPERM this user has no permissions to run the 'evalsha' command\r\n"),
            // Redis before 6 refusing AUTH.
            reply("-ERR invalid password\r\n"),
        ] {
            assert!(is_auth_error(&refused), "{refused}");
        }
    }

    /// A cluster's first connection fails with an I/O error that keeps only the text of a
    /// node's: a refusal there is the same config mistake as on a lone Redis.
    #[test]
    fn a_cluster_refusing_the_credentials_is_an_auth_error() {
        for refused_by_a_node in [
            RedisError::from((
                redis::ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )),
            reply("-WRONGPASS invalid username-password pair or user is disabled.\r\n"),
            reply("-NOAUTH Authentication required.\r\n"),
            reply("-NOPERM this user has no permissions to run the 'ping' command\r\n"),
        ] {
            let refused = RedisError::from((
                redis::ErrorKind::Io,
                "Failed to create initial connections",
                refused_by_a_node.to_string(),
            ));
            assert!(is_auth_error(&refused), "{refused}");
        }
    }

    /// With a database other than 0, a RESP2 connection's SELECT is its first command: redis-rs
    /// keeps only the detail of a refusal there.
    #[test]
    fn a_refused_select_for_want_of_credentials_is_an_auth_error() {
        for detail in [
            "Authentication required.",
            "this user has no permissions to run the 'select' command",
        ] {
            let refused = RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                "Redis server refused to switch database",
                detail.to_owned(),
            ));
            assert!(is_auth_error(&refused), "{refused}");
        }
        let out_of_range = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "Redis server refused to switch database",
            "DB index is out of range".to_owned(),
        ));
        assert!(!is_auth_error(&out_of_range), "{out_of_range}");
    }

    /// Redis unreachable, slow or busy: the gateway starts (or stays up) and falls back until
    /// it answers; nothing in its config to fix.
    #[test]
    fn other_failures_and_refusals_are_not_auth_errors() {
        for failure in [
            io(std::io::ErrorKind::ConnectionRefused, "connection refused"),
            io(std::io::ErrorKind::ConnectionReset, "reset by peer"),
            io(std::io::ErrorKind::TimedOut, "timed out"),
            RedisError::from((
                redis::ErrorKind::Io,
                "Failed to create initial connections",
                "Connection refused (os error 111)".to_owned(),
            )),
            RedisError::from((redis::ErrorKind::Parse, "rate-limit script reply")),
            reply("-LOADING Redis is loading the dataset in memory\r\n"),
            reply("-READONLY You can't write against a read only replica.\r\n"),
            reply("-OOM command not allowed when used memory > 'maxmemory'.\r\n"),
            reply("-NOSCRIPT No matching script. Please use EVAL.\r\n"),
            reply("-ERR DB index is out of range\r\n"),
            reply("-BUSY Redis is busy running a script.\r\n"),
        ] {
            assert!(!is_auth_error(&failure), "{failure}");
        }
    }

    /// A refusal (an error reply) takes the link down when the health check's write meets it;
    /// a cut connection or a slow answer does not, as the next decision judges those itself.
    #[test]
    fn only_an_error_reply_is_a_refusal_by_redis() {
        for refusal in [
            reply("-OOM command not allowed when used memory > 'maxmemory'.\r\n"),
            reply("-READONLY You can't write against a read only replica.\r\n"),
            reply("-MISCONF Redis is unable to persist to disk\r\n"),
            reply("-LOADING Redis is loading the dataset in memory\r\n"),
            reply("-NOPERM this user has no permissions to run the 'set' command\r\n"),
            reply("-NOAUTH Authentication required.\r\n"),
            reply("-ERR max number of clients reached\r\n"),
            // What `takes_writes` makes of a replica's ROLE.
            RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "a read-only replica",
                "point state.redis_url at the primary".to_owned(),
            )),
        ] {
            assert!(refused_by_redis(&refusal), "{refusal}");
        }
        for failure in [
            io(std::io::ErrorKind::ConnectionReset, "reset by peer"),
            io(std::io::ErrorKind::BrokenPipe, "broken pipe"),
            // What `ping` and `serves_writes` make of a slow write.
            io(std::io::ErrorKind::TimedOut, "a write timed out"),
            io(
                std::io::ErrorKind::TimedOut,
                "a write took longer than redis_timeout",
            ),
            RedisError::from((redis::ErrorKind::Parse, "rate-limit script reply")),
            RedisError::from((
                redis::ErrorKind::AuthenticationFailed,
                "Password authentication failed",
            )),
        ] {
            assert!(!refused_by_redis(&failure), "{failure}");
        }
    }

    #[test]
    fn the_probe_waits_twice_as_long_after_each_failure_up_to_a_second() {
        let delays: Vec<u128> = std::iter::successors(Some(FIRST_PROBE_DELAY), |&delay| {
            Some(next_probe_delay(delay))
        })
        .take(8)
        .map(|delay| delay.as_millis())
        .collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        // However long the outage: the cap holds, and no wait overflows past it.
        assert_eq!(next_probe_delay(LONGEST_PROBE_DELAY), LONGEST_PROBE_DELAY);
        assert_eq!(next_probe_delay(Duration::MAX), LONGEST_PROBE_DELAY);
    }

    /// A link that fails again within seconds of the probe letting it up is the same outage:
    /// the probe waits longer each time, up to its longest wait; one that served a while starts
    /// a new outage, probed at once.
    #[test]
    fn a_link_failing_soon_after_it_came_back_is_probed_less_often() {
        let soon = Duration::from_millis(300);
        let (first, again) = first_probe_delay(soon, FIRST_PROBE_DELAY);
        assert_eq!((first, again), (FIRST_PROBE_DELAY * 2, true));
        let mut delay = first;
        for _ in 0..10 {
            delay = first_probe_delay(soon, delay).0;
        }
        assert_eq!(delay, LONGEST_PROBE_DELAY);
        assert_eq!(
            first_probe_delay(STEADY_AFTER, delay),
            (FIRST_PROBE_DELAY, false)
        );
        assert_eq!(
            first_probe_delay(Duration::MAX, delay),
            (FIRST_PROBE_DELAY, false)
        );
    }
}
