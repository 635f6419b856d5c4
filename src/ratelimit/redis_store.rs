//! The shared store: one Lua script per decision (EVALSHA, loaded again on NOSCRIPT), time
//! from Redis `TIME` so replicas with skewed clocks agree, keys expiring on their own. Calls go
//! through the gateway's [`RedisLink`]: while it is down, decisions fall back.

use std::sync::Arc;

use redis::{Cmd, ErrorKind, Script, ServerErrorKind};

use super::algorithm::{decide, Algorithm, Quota, RateDecision, SlotState, Window};
use super::client::LimitKey;
use crate::redis_link::RedisLink;

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

pub struct RedisStore {
    link: Arc<RedisLink>,
    script: Script,
}

impl RedisStore {
    pub fn new(link: Arc<RedisLink>) -> RedisStore {
        RedisStore {
            link,
            script: Script::new(SCRIPT),
        }
    }

    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    /// Decides at Redis with one EVALSHA (`key_prefix`: the rule's [`super::redis_prefix`]);
    /// `None` when the link is down or this call failed (which marks it down).
    pub async fn decide(
        &self,
        key_prefix: &[u8],
        quota: &Quota,
        key: &LimitKey<'_>,
    ) -> Option<RateDecision> {
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
        let script = &self.script;
        let (now, a, b, c) = self
            .link
            .call(|mut connection| async move {
                match connection.query::<(i64, i64, i64, i64)>(&cmd).await {
                    Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        // Redis restarted or flushed its scripts: load it again, then decide.
                        script.load_async(&mut connection).await?;
                        connection.query(&cmd).await
                    }
                    other => other,
                }
            })
            .await?;
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
}
