//! The shared store: one Lua script per decision call (EVALSHA, loaded again on NOSCRIPT), time
//! from Redis `TIME` so replicas with skewed clocks agree, keys expiring on their own. Calls go
//! through the gateway's [`RedisLink`]: while it is down, decisions fall back. On one node,
//! decisions asked for while earlier ones are at Redis go out together in one call.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::{Cmd, ErrorKind, RedisError, Script, ServerErrorKind};
use smallvec::SmallVec;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use super::algorithm::{
    decide_all, Algorithm, JointDecision, Quota, RateDecision, SlotState, Window,
};
use super::client::LimitKey;
use crate::redis_link::{Connection, RedisLink};

/// Decides requests one after another, each under its rules, and returns what it read: {now,
/// then a, b, c, d per key}. ARGV per request: its number of keys n, then a triple per key;
/// KEYS: every request's keys in order. GCRA (triple 'g', T, τ): a = stored TAT or -1. Sliding
/// window ('w', period, limit): a = stored window index or -1, b = its previous count, c = its
/// current count, d = the period it was cut by (a key from before periods were stored has none:
/// the rule's). Counts of another period go to the latest window of this one they may fall in
/// (`Window::counts_at`), and are stored so, whatever the decision, as a TAT beyond the cap is
/// (`algorithm::restate`). When every rule of a request lets it pass, applies to each the
/// update `algorithm::decide` makes; when one refuses it, to none (`algorithm::decide_all`). A
/// later request of the same call sees what an earlier one booked, as a later call would: each
/// key is read once, held in the script while the call lasts and written once at its end, so
/// the requests of one busy client, which share a key, cost one read and one write. A key of another type (the rule's algorithm
/// changed, or something else wrote it) is deleted and read as absent, as an unparsable value
/// is: a WRONGTYPE error would fail every decision on it, for as long as the key lives.
/// Expiries are relative (PX), as Redis before 6.2 has no PXAT. Kept lean: it runs in Redis for
/// every request.
const SCRIPT: &str = r"
local function read(command, key, ...)
  local r = redis.pcall(command, key, ...)
  if type(r) == 'table' and r.err then
    redis.call('DEL', key)
    return false
  end
  return r
end
-- A number stored state can hold: nan or inf (written by hand) is no state, and is replaced.
local function finite(text)
  local x = tonumber(text)
  if x and x == x and x ~= math.huge and x ~= -math.huge then return x end
  return false
end
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local held, changed = {}, {}
local function hold(key, state)
  if not held[key].changed then
    held[key].changed = true
    changed[#changed + 1] = key
  end
  held[key].state = state
end
local reply, r, k, a = {now}, 1, 0, 1
while a <= #ARGV do
  local n, book, pass = tonumber(ARGV[a]), {}, true
  for i = 1, n do
    local key, kind = KEYS[k + i], ARGV[a + 3 * i - 2]
    local x, y = tonumber(ARGV[a + 3 * i - 1]), tonumber(ARGV[a + 3 * i])
    if held[key] and held[key].kind ~= kind then
      -- The rule's algorithm changed between two requests of this call (a reload).
      redis.call('DEL', key)
      held[key] = {state = false, kind = kind, changed = held[key].changed}
    end
    if not held[key] then
      local state = false
      if kind == 'g' then
        state = finite(read('GET', key))
      else
        local s = read('HMGET', key, 'w', 'p', 'c', 'l') or {}
        if finite(s[1]) then
          state = {finite(s[1]), finite(s[2]) or 0, finite(s[3]) or 0, finite(s[4]) or x}
        end
      end
      held[key] = {state = state, kind = kind}
    end
    local stored = held[key].state
    if kind == 'g' then
      local tat = stored or now
      if tat < now then tat = now end
      if tat > now + y + x then
        tat = now + y + x
        hold(key, tat)
      end
      if now + y >= tat then book[i] = tat + x else pass = false end
      reply[r + 1], reply[r + 2], reply[r + 3], reply[r + 4] = stored or -1, 0, 0, 0
    else
      local w = math.floor(now / x)
      local elapsed = now - w * x
      local prev, curr = 0, 0
      if stored then
        local sw, sl = stored[1], stored[4]
        local ends = {math.max(sw * sl - 1, 0), math.min((sw + 1) * sl - 1, now)}
        for j, count in ipairs({stored[2], stored[3]}) do
          local back = w - math.floor(ends[j] / x)
          if back == 0 then curr = curr + count elseif back == 1 then prev = prev + count end
        end
        if sl ~= x then hold(key, {w, prev, curr, x}) end
        reply[r + 1], reply[r + 2], reply[r + 3], reply[r + 4] = sw, stored[2], stored[3], sl
      else
        reply[r + 1], reply[r + 2], reply[r + 3], reply[r + 4] = -1, 0, 0, x
      end
      if prev * (x - elapsed) + (curr + 1) * x <= y * x then
        book[i] = {w, prev, curr + 1, x}
      else
        pass = false
      end
    end
    r = r + 4
  end
  if pass then
    for i = 1, n do hold(KEYS[k + i], book[i]) end
  end
  k, a = k + n, a + 1 + 3 * n
end
for _, key in ipairs(changed) do
  local h = held[key]
  if not h.state then
  elseif h.kind == 'g' then
    local tat = h.state
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil(tat / 1000) + 1 - math.floor(now / 1000))
  else
    local w, x = h.state[1], h.state[4]
    redis.call('HSET', key, 'w', string.format('%.0f', w), 'p', h.state[2], 'c', h.state[3], 'l', x)
    redis.call('PEXPIRE', key, math.ceil((w + 2) * x / 1000) - math.floor(now / 1000))
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

/// Decision calls at Redis at once, one being run and one on its way, unless they leave full.
/// Decisions asked for while they are out wait, and go out together in the next call: Redis
/// spends much of a decision's cost on the call itself (the script's start and its `TIME`), and
/// it shares the machine with everything else.
const CALLS_IN_FLIGHT: usize = 2;

/// Requests decided in one call at most, so that one call does not hold Redis for long.
const MOST_PER_CALL: usize = 64;

/// One request's rules as [`SCRIPT`] takes them, owned so that they can wait for a call.
struct Decision {
    keys: SmallVec<[SmallVec<[u8; 96]>; 2]>,
    rules: SmallVec<[(&'static str, u64, u64); 2]>,
}

impl Decision {
    fn new(checks: &[RedisCheck<'_>]) -> Decision {
        Decision {
            keys: checks
                .iter()
                .map(|(prefix, _, key)| key.redis_key(prefix))
                .collect(),
            rules: checks
                .iter()
                .map(|(_, quota, _)| match quota.algorithm {
                    Algorithm::Gcra => ("g", quota.interval_us(), quota.tolerance_us()),
                    Algorithm::SlidingWindow => ("w", quota.period_us, quota.limit),
                })
                .collect(),
        }
    }
}

/// The reply of a decision call, and where one request's states start in it; `None` when the
/// call failed.
type CallReply = Option<(Arc<Vec<i64>>, usize)>;

/// A decision waiting for its call.
struct Waiting {
    decision: Decision,
    since: Instant,
    reply: oneshot::Sender<CallReply>,
}

pub struct RedisStore {
    link: Arc<RedisLink>,
    script: Arc<Script>,
    give_back: Script,
    /// To the task sending the decision calls, started on the first decision (inside the
    /// runtime).
    queue: OnceLock<mpsc::UnboundedSender<Waiting>>,
}

impl RedisStore {
    pub fn new(link: Arc<RedisLink>) -> RedisStore {
        RedisStore {
            link,
            script: Arc::new(Script::new(SCRIPT)),
            give_back: Script::new(GIVE_BACK),
            queue: OnceLock::new(),
        }
    }

    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    /// Decides one request under its route's rules at Redis; `None` when the link is down or
    /// a call failed (which marks it down).
    ///
    /// On one node the request's rules are decided in one call, booked in all or none, with
    /// the other requests waiting for a call then. A cluster keeps keys of different slots on
    /// different nodes, out of one script's reach: there each rule is one call, in order; the
    /// first refusal ends the request's decisions, and what the rules before it booked is
    /// given back.
    pub async fn decide(&self, checks: &[RedisCheck<'_>]) -> Option<SmallVec<[RateDecision; 4]>> {
        if self.link.state.redis_cluster {
            return self.decide_rule_by_rule(checks).await;
        }
        if !self.link.is_up() {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting {
            decision: Decision::new(checks),
            since: Instant::now(),
            reply,
        };
        self.queue().send(waiting).ok()?;
        let (reply, at) = answer.await.ok()??;
        let states = reply.get(at..at + 4 * checks.len())?;
        let (joint, _) = read_reply(checks, reply[0], states)?;
        Some(joint.decisions)
    }

    fn queue(&self) -> &mpsc::UnboundedSender<Waiting> {
        self.queue.get_or_init(|| {
            let (queue, waiting) = mpsc::unbounded_channel();
            tokio::spawn(send_calls(self.link.clone(), self.script.clone(), waiting));
            queue
        })
    }

    /// [`RedisStore::decide`] on a cluster.
    async fn decide_rule_by_rule(
        &self,
        checks: &[RedisCheck<'_>],
    ) -> Option<SmallVec<[RateDecision; 4]>> {
        self.link
            .call(|mut connection| async move {
                let mut decisions = SmallVec::new();
                // The rules that booked the request so far, with Redis's time.
                let mut booked: SmallVec<[(&RedisCheck<'_>, u64); 4]> = SmallVec::new();
                for check in checks {
                    let one = std::slice::from_ref(check);
                    let cmd = decision_command(&self.script, std::iter::once(&Decision::new(one)));
                    let reply: Vec<i64> = match run(&mut connection, &self.script, &cmd).await {
                        Ok(reply) => reply,
                        Err(err) => {
                            // The request is decided again without Redis: what the rules
                            // before this one booked goes back first.
                            self.give_back(&mut connection, &booked).await;
                            return Err(err);
                        }
                    };
                    let (joint, now) = reply
                        .split_first()
                        .and_then(|(now, states)| read_reply(one, *now, states))
                        .ok_or_else(|| {
                            RedisError::from((ErrorKind::Parse, "rate-limit script reply"))
                        })?;
                    decisions.extend_from_slice(&joint.decisions);
                    if !joint.allowed() {
                        self.give_back(&mut connection, &booked).await;
                        break;
                    }
                    booked.push((check, now));
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
}

/// Sends the waiting decisions, all that wait (up to [`MOST_PER_CALL`]) in each call, with at
/// most [`CALLS_IN_FLIGHT`] calls out at once; a call that leaves full lets the next one go at
/// once, so that a backlog goes out as fast as Redis takes it. Ends with the store.
async fn send_calls(
    link: Arc<RedisLink>,
    script: Arc<Script>,
    mut waiting: mpsc::UnboundedReceiver<Waiting>,
) {
    let in_flight = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    let mut last_full = false;
    loop {
        let permit = if last_full {
            None
        } else {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            Some(permit)
        };
        let mut batch = Vec::with_capacity(MOST_PER_CALL);
        if waiting.recv_many(&mut batch, MOST_PER_CALL).await == 0 {
            return;
        }
        last_full = batch.len() == MOST_PER_CALL;
        pass_over_stale(&mut batch, Instant::now(), link.state.redis_timeout);
        if batch.is_empty() {
            continue;
        }
        let (link, script) = (link.clone(), script.clone());
        tokio::spawn(async move {
            let reply = decide_batch(&link, &script, &batch).await.map(Arc::new);
            let mut at = 1;
            for Waiting {
                decision,
                reply: to,
                ..
            } in batch
            {
                // Nobody waits when the request's client left.
                let _ = to.send(reply.clone().map(|reply| (reply, at)));
                at += 4 * decision.keys.len();
            }
            drop(permit);
        });
    }
}

/// Takes out of `batch` the decisions whose client left, and those that waited for a call
/// longer than `limit` (`redis_timeout`: Redis takes them slower than they come), which are
/// answered `None` and so decided as when Redis does not answer in time. Neither goes to Redis.
fn pass_over_stale(batch: &mut Vec<Waiting>, now: Instant, limit: Duration) {
    let stale = |waiting: &mut Waiting| {
        waiting.reply.is_closed() || now.saturating_duration_since(waiting.since) > limit
    };
    for waiting in batch.extract_if(.., stale) {
        // Fails, unheard, for a client that left.
        let _ = waiting.reply.send(None);
    }
}

/// One call deciding `batch` in order: the script's reply, checked for its length.
async fn decide_batch(
    link: &Arc<RedisLink>,
    script: &Script,
    batch: &[Waiting],
) -> Option<Vec<i64>> {
    let cmd = decision_command(script, batch.iter().map(|waiting| &waiting.decision));
    let keys: usize = batch
        .iter()
        .map(|waiting| waiting.decision.keys.len())
        .sum();
    link.call(|mut connection| {
        let cmd = &cmd;
        async move {
            let reply: Vec<i64> = run(&mut connection, script, cmd).await?;
            if reply.len() != 1 + 4 * keys {
                return Err(RedisError::from((
                    ErrorKind::Parse,
                    "rate-limit script reply",
                )));
            }
            Ok(reply)
        }
    })
    .await
}

/// EVALSHA of [`SCRIPT`] deciding `decisions`, in order.
fn decision_command<'d>(
    script: &Script,
    decisions: impl Iterator<Item = &'d Decision> + Clone,
) -> Cmd {
    let keys: usize = decisions.clone().map(|decision| decision.keys.len()).sum();
    let mut cmd = Cmd::with_capacity(3 + 5 * keys, 64 + 128 * keys);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
    for decision in decisions.clone() {
        for key in &decision.keys {
            cmd.arg(&key[..]);
        }
    }
    for decision in decisions {
        cmd.arg(decision.keys.len());
        for (kind, x, y) in &decision.rules {
            cmd.arg(*kind).arg(*x).arg(*y);
        }
    }
    cmd
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

/// The decisions a request's `states` in the script's reply stand for, and Redis's time (µs)
/// from `now`: the same computation over the same states, at that time. `None` when the states
/// do not have the script's shape.
fn read_reply(group: &[RedisCheck<'_>], now: i64, states: &[i64]) -> Option<(JointDecision, u64)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    /// Redis's time in a reply: µs since the epoch.
    const NOW: i64 = 1_700_000_000_000_000;
    const MINUTE: u64 = 60_000_000;

    /// 10 a minute, 4 more at once.
    const GCRA: Quota = Quota {
        algorithm: Algorithm::Gcra,
        limit: 10,
        period_us: MINUTE,
        burst: 4,
    };

    /// 3 a minute, sliding.
    const WINDOW: Quota = Quota {
        algorithm: Algorithm::SlidingWindow,
        limit: 3,
        period_us: MINUTE,
        burst: 0,
    };

    fn checks(quotas: &[Quota]) -> Vec<RedisCheck<'_>> {
        let client = LimitKey::Ip([192, 0, 2, 1].into());
        quotas
            .iter()
            .map(|quota| (&b"rl:"[..], quota, client))
            .collect()
    }

    /// The script's reply as `decide_rule_by_rule` reads it: the integers `run` takes it as,
    /// Redis's time first, then four per rule.
    fn read(quotas: &[Quota], reply: Value) -> Option<(JointDecision, u64)> {
        let reply: Vec<i64> = redis::from_redis_value(reply).ok()?;
        let (now, states) = reply.split_first()?;
        read_reply(&checks(quotas), *now, states)
    }

    fn ints(reply: &[i64]) -> Value {
        Value::Array(reply.iter().map(|&n| Value::Int(n)).collect())
    }

    /// The same decision the memory store makes over `stored` at [`NOW`].
    fn decided(quotas: &[Quota], stored: &[Option<SlotState>]) -> Option<(JointDecision, u64)> {
        let now = NOW as u64;
        Some((
            decide_all(quotas.iter().zip(stored.iter().copied()), now),
            now,
        ))
    }

    #[test]
    fn a_gcra_reply_reads_as_the_tat_it_stored_or_as_none() {
        let absent = read(&[GCRA], ints(&[NOW, -1, 0, 0, 0]));
        assert_eq!(absent, decided(&[GCRA], &[None]));
        let (joint, now) = absent.unwrap();
        assert_eq!(now, NOW as u64);
        assert!(joint.allowed());
        assert_eq!(joint.decisions[0].remaining, GCRA.burst);

        // Two requests booked: the TAT is two intervals ahead.
        let tat = NOW + 2 * GCRA.interval_us() as i64;
        let booked = read(&[GCRA], ints(&[NOW, tat, 0, 0, 0]));
        assert_eq!(
            booked,
            decided(&[GCRA], &[Some(SlotState::Gcra(tat as u64))])
        );
        assert_eq!(booked.unwrap().0.decisions[0].remaining, GCRA.burst - 2);

        // Used up: a TAT past the tolerance refuses.
        let full = NOW + ((GCRA.burst + 1) * GCRA.interval_us()) as i64;
        let (joint, _) = read(&[GCRA], ints(&[NOW, full, 0, 0, 0])).unwrap();
        assert!(!joint.allowed());
        assert!(joint.booked.is_empty());
    }

    #[test]
    fn a_window_reply_reads_as_the_window_it_stored_with_its_period() {
        let index = NOW / MINUTE as i64;
        let absent = read(&[WINDOW], ints(&[NOW, -1, 0, 0, MINUTE as i64]));
        assert_eq!(absent, decided(&[WINDOW], &[None]));

        let stored = Window {
            index: index as u64,
            period_us: MINUTE,
            prev: 1,
            curr: 1,
        };
        let read_back = read(&[WINDOW], ints(&[NOW, index, 1, 1, MINUTE as i64]));
        assert_eq!(
            read_back,
            decided(&[WINDOW], &[Some(SlotState::Window(stored))])
        );
        assert!(read_back.unwrap().0.restated.is_empty());

        // Cut by another period (a reload changed the rule's): read with that period, and
        // restated under the rule's own.
        let hour = 60 * MINUTE;
        let other = Window {
            index: NOW as u64 / hour,
            period_us: hour,
            prev: 0,
            curr: 3,
        };
        let reply = ints(&[NOW, other.index as i64, 0, 3, hour as i64]);
        let (joint, _) = read(&[WINDOW], reply).unwrap();
        assert_eq!(
            Some((joint.clone(), NOW as u64)),
            decided(&[WINDOW], &[Some(SlotState::Window(other))])
        );
        assert_eq!(joint.restated.len(), 1);
    }

    #[test]
    fn a_reply_for_several_rules_is_read_rule_by_rule_in_order() {
        let index = NOW / MINUTE as i64;
        // The window is used up: the request is refused and books in neither.
        let reply = ints(&[NOW, -1, 0, 0, 0, index, 0, 3, MINUTE as i64]);
        let (joint, _) = read(&[GCRA, WINDOW], reply).unwrap();
        let used_up = Window {
            index: index as u64,
            period_us: MINUTE,
            prev: 0,
            curr: 3,
        };
        assert_eq!(
            Some((joint.clone(), NOW as u64)),
            decided(&[GCRA, WINDOW], &[None, Some(SlotState::Window(used_up))])
        );
        assert!(joint.decisions[0].allowed);
        assert!(!joint.decisions[1].allowed);
        assert!(joint.booked.is_empty());
    }

    #[test]
    fn a_reply_not_of_the_scripts_shape_is_rejected() {
        for reply in [
            Value::Nil,
            Value::Int(NOW),
            ints(&[]),
            ints(&[NOW]),
            // One number short, one too many.
            ints(&[NOW, -1, 0, 0]),
            ints(&[NOW, -1, 0, 0, 0, 0]),
            Value::Array(vec![
                Value::Int(NOW),
                Value::Nil,
                Value::Int(0),
                Value::Int(0),
                Value::Int(0),
            ]),
            Value::Array(vec![
                Value::Int(NOW),
                Value::SimpleString("-1".into()),
                Value::Int(0),
                Value::Int(0),
                Value::BulkString(b"a minute".to_vec()),
            ]),
        ] {
            assert_eq!(read(&[GCRA], reply.clone()), None, "{reply:?}");
        }
        // Four numbers for one rule, where the request has two.
        assert_eq!(read(&[GCRA, WINDOW], ints(&[NOW, -1, 0, 0, 0])), None);
    }

    /// Numbers the script never returns (a key written by hand, a clock before 1970): read as
    /// the nearest state that means something, without a panic.
    #[test]
    fn odd_numbers_in_a_reply_of_the_right_shape_are_read_without_a_panic() {
        let index = NOW / MINUTE as i64;
        // A time before the epoch reads as the epoch, a negative count as none, and a period
        // of 0 or less as 1 µs.
        let (joint, now) = read(&[GCRA], ints(&[-5, -1, 0, 0, 0])).unwrap();
        assert_eq!(now, 0);
        assert!(joint.allowed());
        let odd_window = ints(&[NOW, index, -7, -7, 0]);
        let as_if = Window {
            index: index as u64,
            period_us: 1,
            prev: 0,
            curr: 0,
        };
        assert_eq!(
            read(&[WINDOW], odd_window),
            decided(&[WINDOW], &[Some(SlotState::Window(as_if))])
        );
        for reply in [
            ints(&[i64::MAX, i64::MAX, 0, 0, 0]),
            ints(&[NOW, i64::MAX, 0, 0, 0]),
            ints(&[i64::MAX, i64::MAX, i64::MAX, i64::MAX, i64::MAX]),
            ints(&[NOW, i64::MAX, i64::MAX, i64::MAX, i64::MAX]),
            ints(&[NOW, index, i64::MAX, i64::MAX, MINUTE as i64]),
            ints(&[NOW, 0, i64::MAX, i64::MAX, i64::MIN]),
            ints(&[i64::MIN, i64::MIN, i64::MIN, i64::MIN, i64::MIN]),
        ] {
            for quota in [GCRA, WINDOW] {
                assert!(read(&[quota], reply.clone()).is_some(), "{reply:?}");
            }
        }
    }

    fn waiting(since: Instant) -> (Waiting, oneshot::Receiver<CallReply>) {
        let (reply, answer) = oneshot::channel();
        let decision = Decision::new(&[]);
        (
            Waiting {
                decision,
                since,
                reply,
            },
            answer,
        )
    }

    #[test]
    fn decisions_that_waited_too_long_fall_back_and_those_of_clients_gone_are_dropped() {
        let t0 = Instant::now();
        let limit = Duration::from_millis(50);
        let (old, mut old_answer) = waiting(t0);
        let (fresh, mut fresh_answer) = waiting(t0 + Duration::from_millis(20));
        let (gone, gone_answer) = waiting(t0 + Duration::from_millis(30));
        drop(gone_answer);
        let (due, mut due_answer) = waiting(t0 + Duration::from_millis(10));
        let mut batch = vec![old, fresh, gone, due];
        pass_over_stale(&mut batch, t0 + Duration::from_millis(60), limit);
        // What stays keeps its order; only the one past the limit was answered.
        let since: Vec<_> = batch.iter().map(|waiting| waiting.since - t0).collect();
        assert_eq!(
            since,
            [Duration::from_millis(20), Duration::from_millis(10)]
        );
        assert_eq!(old_answer.try_recv().unwrap(), None);
        assert!(fresh_answer.try_recv().is_err());
        assert!(due_answer.try_recv().is_err());
    }
}
