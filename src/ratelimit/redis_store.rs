//! The shared store: one Lua script per request (EVALSHA, loaded again on NOSCRIPT), time
//! from Redis `TIME` so replicas with skewed clocks agree, keys expiring on their own. Calls go
//! through the gateway's [`RedisLink`]: while it is down, decisions fall back.

use std::sync::Arc;

use redis::{Cmd, ErrorKind, RedisError, Script, ServerErrorKind};
use smallvec::SmallVec;

use super::algorithm::{
    decide_all, Algorithm, JointDecision, Quota, RateDecision, SlotState, Window,
};
use super::client::LimitKey;
use crate::redis_link::{Connection, RedisLink};

/// Reads each rule's state and returns what it read: {now, then a, b, c, d per key}. GCRA
/// (ARGV triple 'g', T, τ): a = stored TAT or -1. Sliding window ('w', period, limit): a =
/// stored window index or -1, b = its previous count, c = its current count, d = the period it
/// was cut by (a key from before periods were stored has none: the rule's). Counts of another
/// period go to the latest window of this one they may fall in (`Window::counts_at`), and are
/// stored so, whatever the decision, as a TAT beyond the cap is (`algorithm::restate`). When
/// every rule lets the request pass, applies to each the update `algorithm::decide` makes; when
/// one refuses it, to none (`algorithm::decide_all`). A key of another type (the rule's algorithm changed, or
/// something else wrote it) is deleted and read as absent, as an unparsable value is: a
/// WRONGTYPE error would fail every decision on it, for as long as the key lives. Expiries are
/// relative (PX), as Redis before 6.2 has no PXAT. Kept lean: it runs in Redis for every
/// request.
const SCRIPT: &str = r"
local function read(command, key, ...)
  local r = redis.pcall(command, key, ...)
  if type(r) == 'table' and r.err then
    redis.call('DEL', key)
    return false
  end
  return r
end
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local function set_tat(key, tat)
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil(tat / 1000) + 1 - math.floor(now / 1000))
end
local function set_window(key, w, prev, curr, x)
  redis.call('HSET', key, 'w', string.format('%.0f', w), 'p', prev, 'c', curr, 'l', x)
  redis.call('PEXPIRE', key, math.ceil((w + 2) * x / 1000) - math.floor(now / 1000))
end
local reply, book, pass = {now}, {}, true
for i, key in ipairs(KEYS) do
  local x, y = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  if ARGV[3 * i - 2] == 'g' then
    local stored = tonumber(read('GET', key))
    local tat = stored or now
    if tat < now then tat = now end
    if tat > now + y + x then
      tat = now + y + x
      set_tat(key, tat)
    end
    if now + y >= tat then book[i] = {tat + x} else pass = false end
    reply[4 * i - 2], reply[4 * i - 1], reply[4 * i], reply[4 * i + 1] = stored or -1, 0, 0, 0
  else
    local s = read('HMGET', key, 'w', 'p', 'c', 'l') or {}
    local sw, sp, sc, sl = tonumber(s[1]), tonumber(s[2]) or 0, tonumber(s[3]) or 0, tonumber(s[4]) or x
    local w = math.floor(now / x)
    local elapsed = now - w * x
    local prev, curr = 0, 0
    if sw then
      local ends = {math.max(sw * sl - 1, 0), math.min((sw + 1) * sl - 1, now)}
      for j, count in ipairs({sp, sc}) do
        local back = w - math.floor(ends[j] / x)
        if back == 0 then curr = curr + count elseif back == 1 then prev = prev + count end
      end
      if sl ~= x then set_window(key, w, prev, curr, x) end
    end
    if prev * (x - elapsed) + (curr + 1) * x <= y * x then
      book[i] = {w, prev, curr + 1, x}
    else
      pass = false
    end
    reply[4 * i - 2], reply[4 * i - 1], reply[4 * i], reply[4 * i + 1] = sw or -1, sp, sc, sl
  end
end
if pass then
  for i, key in ipairs(KEYS) do
    local b = book[i]
    if #b == 1 then
      set_tat(key, b[1])
    else
      set_window(key, b[1], b[2], b[3], b[4])
    end
  end
end
return reply
";

/// Gives back what [`SCRIPT`] booked for one key, on a cluster, when a later rule refused the
/// request. ARGV: 'g', T (the TAT moves back by T) or 'w', period, the window index booked in
/// (its count, now current or previous, goes down by one).
const GIVE_BACK: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
if redis.call('TYPE', KEYS[1]).ok ~= (ARGV[1] == 'g' and 'string' or 'hash') then return 0 end
if ARGV[1] == 'g' then
  local tat = tonumber(redis.call('GET', KEYS[1]))
  if not tat then return 0 end
  tat = tat - ARGV[2]
  if tat <= now then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil(tat / 1000) + 1 - math.floor(now / 1000))
  end
  return 1
end
local s = redis.call('HMGET', KEYS[1], 'w', 'p', 'c', 'l')
local w, booked = tonumber(s[1]), tonumber(ARGV[3])
if (tonumber(s[4]) or tonumber(ARGV[2])) ~= tonumber(ARGV[2]) then return 0 end
if w == booked and (tonumber(s[3]) or 0) > 0 then
  redis.call('HINCRBY', KEYS[1], 'c', -1)
elseif w == booked + 1 and (tonumber(s[2]) or 0) > 0 then
  redis.call('HINCRBY', KEYS[1], 'p', -1)
end
return 1
";

/// One rule's part of a decision at Redis: the rule's [`super::redis_prefix`], its quota, and
/// the request's key under it.
pub type RedisCheck<'a> = (&'a [u8], &'a Quota, LimitKey<'a>);

pub struct RedisStore {
    link: Arc<RedisLink>,
    script: Script,
    give_back: Script,
}

impl RedisStore {
    pub fn new(link: Arc<RedisLink>) -> RedisStore {
        RedisStore {
            link,
            script: Script::new(SCRIPT),
            give_back: Script::new(GIVE_BACK),
        }
    }

    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    /// Decides one request under its route's rules at Redis; `None` when the link is down or
    /// a call failed (which marks it down).
    ///
    /// On one node that is one EVALSHA over all the rules' keys, booked in all or none. A
    /// cluster keeps keys of different slots on different nodes, out of one script's reach:
    /// there each rule is one EVALSHA, in order; the first refusal ends the request's
    /// decisions, and what the rules before it booked is given back.
    pub async fn decide(&self, checks: &[RedisCheck<'_>]) -> Option<SmallVec<[RateDecision; 4]>> {
        let per_call = if self.link.state.redis_cluster {
            1
        } else {
            checks.len().max(1)
        };
        self.link
            .call(|mut connection| async move {
                let mut decisions = SmallVec::new();
                // On a cluster: the rules that booked the request so far, with Redis's time.
                let mut booked: SmallVec<[(&RedisCheck<'_>, u64); 4]> = SmallVec::new();
                for group in checks.chunks(per_call) {
                    let reply = run(&mut connection, &self.script, &self.command(group)).await;
                    let reply: Vec<i64> = match reply {
                        Ok(reply) => reply,
                        Err(err) => {
                            // The request is decided again without Redis: what the rules
                            // before this one booked goes back first.
                            self.give_back(&mut connection, &booked).await;
                            return Err(err);
                        }
                    };
                    let (joint, now) = read_reply(group, &reply).ok_or_else(|| {
                        RedisError::from((ErrorKind::Parse, "rate-limit script reply"))
                    })?;
                    decisions.extend_from_slice(&joint.decisions);
                    if !joint.allowed() {
                        self.give_back(&mut connection, &booked).await;
                        break;
                    }
                    if let [check] = group {
                        booked.push((check, now));
                    }
                }
                Ok(decisions)
            })
            .await
    }

    /// Gives back what each of `booked` (a check, and when Redis booked it) took. One not given
    /// back counts the request against its rule, as it would have before: no reason to fail.
    async fn give_back(&self, connection: &mut Connection, booked: &[(&RedisCheck<'_>, u64)]) {
        for (check, booked_at) in booked {
            let cmd = self.give_back_command(check, *booked_at);
            if let Err(err) = run::<i64>(connection, &self.give_back, &cmd).await {
                tracing::debug!(%err, "rate-limit give-back failed");
            }
        }
    }

    /// EVALSHA of the give-back script for `check`, booked at `booked_at` (Redis's µs).
    fn give_back_command(&self, (prefix, quota, key): &RedisCheck<'_>, booked_at: u64) -> Cmd {
        let mut cmd = Cmd::with_capacity(7, 160);
        cmd.arg("EVALSHA")
            .arg(self.give_back.get_hash())
            .arg(1)
            .arg(&key.redis_key(prefix)[..]);
        match quota.algorithm {
            Algorithm::Gcra => cmd.arg("g").arg(quota.interval_us()),
            Algorithm::SlidingWindow => cmd
                .arg("w")
                .arg(quota.period_us)
                .arg(booked_at / quota.period_us),
        };
        cmd
    }

    /// EVALSHA of the script over `group`'s keys.
    fn command(&self, group: &[RedisCheck<'_>]) -> Cmd {
        let mut cmd = Cmd::with_capacity(3 + 4 * group.len(), 64 + 96 * group.len());
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(group.len());
        for (prefix, _, key) in group {
            cmd.arg(&key.redis_key(prefix)[..]);
        }
        for (_, quota, _) in group {
            match quota.algorithm {
                Algorithm::Gcra => cmd
                    .arg("g")
                    .arg(quota.interval_us())
                    .arg(quota.tolerance_us()),
                Algorithm::SlidingWindow => cmd.arg("w").arg(quota.period_us).arg(quota.limit),
            };
        }
        cmd
    }
}

/// `cmd` (an EVALSHA of `script`), loading the script first when Redis does not have it
/// (restarted, or its scripts flushed).
async fn run<T: redis::FromRedisValue>(
    connection: &mut Connection,
    script: &Script,
    cmd: &Cmd,
) -> Result<T, RedisError> {
    match connection.query(cmd).await {
        Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(connection).await?;
            connection.query(cmd).await
        }
        other => other,
    }
}

/// The decisions the script's reply stands for, and Redis's time (µs): the same computation
/// over the same states, at that time. `None` when the reply does not have the script's shape.
fn read_reply(group: &[RedisCheck<'_>], reply: &[i64]) -> Option<(JointDecision, u64)> {
    let (&now, states) = reply.split_first()?;
    if states.len() != 4 * group.len() {
        return None;
    }
    let stored = group
        .iter()
        .zip(states.chunks(4))
        .map(|((_, quota, _), abcd)| {
            let (a, b, c, d) = (abcd[0], abcd[1], abcd[2], abcd[3]);
            let state = (a >= 0).then(|| match quota.algorithm {
                Algorithm::Gcra => SlotState::Gcra(a as u64),
                Algorithm::SlidingWindow => SlotState::Window(Window {
                    index: a as u64,
                    period_us: d.max(1) as u64,
                    prev: b.max(0) as u64,
                    curr: c.max(0) as u64,
                }),
            });
            (*quota, state)
        });
    let now = now.max(0) as u64;
    Some((decide_all(stored, now), now))
}
