//! The shared store: one Lua script per decision (EVALSHA, reloaded on NOSCRIPT by redis-rs),
//! time from Redis `TIME` so replicas with skewed clocks agree, keys expiring on their own.
//! Calls go through the gateway's [`RedisLink`]: while it is down, decisions fall back.

use std::sync::Arc;

use redis::Script;

use super::algorithm::{decide, Algorithm, Quota, RateDecision, SlotState, Window};
use super::client::LimitKey;
use crate::redis_link::RedisLink;

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

    /// Decides at Redis; `None` when the link is down or this call failed (which marks it down).
    pub async fn decide(
        &self,
        rule: &str,
        quota: &Quota,
        key: &LimitKey<'_>,
    ) -> Option<RateDecision> {
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
        // redis-rs loads the script on NOSCRIPT (first use, or after Redis restarted).
        let reply = self
            .link
            .call(|mut c| async move { invocation.invoke_async::<Vec<i64>>(&mut c).await })
            .await?;
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
}
