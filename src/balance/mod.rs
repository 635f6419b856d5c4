//! Balancing: which instance gets the next request. One enum of strategies and pure functions
//! over plain candidate data (`pick_instance`), the consistent-hash ring, and peak-EWMA math.
//! The proxy builds the candidate list from live instance state and calls in here.

use std::time::Duration;

use http::HeaderName;
use smallvec::SmallVec;

/// How an upstream spreads requests over its instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    RoundRobin,
    LeastConn,
    /// Power of two choices over in-flight requests, peak-EWMA latency breaking ties.
    RandomTwo,
    /// Power of two choices (drawn by weight) over cost = peak-EWMA latency × (in-flight + 1).
    P2cEwma,
    ConsistentHash(HashKey),
}

impl Strategy {
    /// Every strategy, in the order the docs list them (`consistent_hash` with a stand-in key).
    fn every() -> [Strategy; 5] {
        [
            Strategy::RoundRobin,
            Strategy::LeastConn,
            Strategy::RandomTwo,
            Strategy::P2cEwma,
            Strategy::ConsistentHash(HashKey::ClientIp),
        ]
    }

    /// Every name the config file accepts.
    pub fn names() -> impl Iterator<Item = &'static str> {
        Self::every().into_iter().map(|strategy| strategy.name())
    }

    /// The strategy a config name stands for; `hash_key` is asked only for `consistent_hash`.
    pub fn from_name(name: &str, hash_key: impl FnOnce() -> HashKey) -> Option<Strategy> {
        match Self::every().into_iter().find(|s| s.name() == name)? {
            Strategy::ConsistentHash(_) => Some(Strategy::ConsistentHash(hash_key())),
            strategy => Some(strategy),
        }
    }

    /// The name the config file gives it.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastConn => "least_conn",
            Strategy::RandomTwo => "random_two",
            Strategy::P2cEwma => "p2c_ewma",
            Strategy::ConsistentHash(_) => "consistent_hash",
        }
    }
}

/// Where a consistent-hash key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(HeaderName),
    Cookie(String),
}

/// What the balancer knows about one instance that may take the request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Position of the instance in the upstream's instance list.
    pub index: usize,
    pub in_flight: u32,
    /// Peak-EWMA response latency in nanoseconds (0 = no sample yet).
    pub latency_ns: f64,
    /// How much `latency_ns` still says: 1 for a sample just taken, decaying toward 0 while the
    /// instance gets no answers; 0 without a sample.
    pub freshness: f64,
    pub weight: u32,
    /// Slow-start factor in (0, 1]: 1 once the instance is fully ramped.
    pub ramp: f64,
}

impl Candidate {
    fn capacity(&self) -> f64 {
        f64::from(self.weight) * self.ramp
    }
}

/// Per-request inputs that are not instance state: a shared sequence number (round robin and
/// tie rotation), random bits (power of two choices, slow-start admission) and the hash of the
/// request's key for consistent hashing.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickInput {
    pub seq: u64,
    pub random: u64,
    pub hash: Option<u64>,
}

/// Picks one of `candidates` (all eligible: healthy, not draining, not yet tried) and returns its
/// `index`. `layout` is what the strategy laid out for the instance set.
pub fn pick_instance(
    strategy: &Strategy,
    candidates: &[Candidate],
    input: PickInput,
    layout: &Layout,
) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    if candidates.len() == 1 {
        return Some(candidates[0].index);
    }
    let chosen = match strategy {
        Strategy::RoundRobin => match layout {
            Layout::Schedule(schedule) => schedule.pick(candidates, input),
            _ => weighted_round_robin(candidates, input),
        },
        Strategy::LeastConn => least_loaded(candidates, input),
        // Both draw two by capacity and keep the first unless the second is better: ties and
        // near-ties leave the choice to the draw, so weights and slow start hold at low load.
        Strategy::RandomTwo => {
            let (a, b) = two_by_capacity(candidates, input.random);
            let (a, b) = (&candidates[a], &candidates[b]);
            let load = |c: &Candidate| f64::from(c.in_flight) / c.capacity();
            match load(a).partial_cmp(&load(b)) {
                Some(std::cmp::Ordering::Less) => a,
                Some(std::cmp::Ordering::Greater) => b,
                _ => {
                    let pool = pool_latency(candidates);
                    let latency = |c| compared_latency(c, pool);
                    if clearly_lower(latency(b), latency(a)) {
                        b
                    } else {
                        a
                    }
                }
            }
        }
        Strategy::P2cEwma => {
            let (a, b) = two_by_capacity(candidates, input.random);
            let (a, b) = (&candidates[a], &candidates[b]);
            let pool = pool_latency(candidates);
            // In-flight requests count per unit of capacity, as least_conn counts them, so an
            // instance of weight 5 carries five times the queue at the same cost.
            let cost = |c: &Candidate| {
                compared_latency(c, pool) * (1.0 + f64::from(c.in_flight) / c.capacity())
            };
            if clearly_lower(cost(b), cost(a)) {
                b
            } else {
                a
            }
        }
        Strategy::ConsistentHash(_) => {
            let hash = input.hash.unwrap_or(input.random);
            return match layout {
                Layout::Ring(ring) => ring
                    .lookup(hash, |index| candidates.iter().any(|c| c.index == index))
                    .or(Some(candidates[0].index)),
                _ => Some(candidates[(hash % candidates.len() as u64) as usize].index),
            };
        }
    };
    Some(chosen.index)
}

/// Weighted round robin driven by one shared counter: each cycle of sum(weights) picks gives
/// every instance exactly its weight, its turns spread over the cycle (taken in order, weights
/// 10 and 10 gave ten in a row to each, where nginx alternates). An instance in slow start is
/// admitted with probability `ramp` and otherwise passes its turn to the next one.
fn weighted_round_robin(candidates: &[Candidate], input: PickInput) -> &Candidate {
    let total: u64 = candidates.iter().map(|c| u64::from(c.weight)).sum();
    let (turn, stride) = (input.seq % total, spread_stride(total));
    // In 64 bits whenever it fits (a 128-bit division costs a call).
    let mut slot = turn.checked_mul(stride).map_or_else(
        || (u128::from(turn) * u128::from(stride) % u128::from(total)) as u64,
        |product| product % total,
    );
    let mut pos = 0;
    for (i, c) in candidates.iter().enumerate() {
        if slot < u64::from(c.weight) {
            pos = i;
            break;
        }
        slot -= u64::from(c.weight);
    }
    let dice = unit_interval(input.random);
    for step in 0..candidates.len() {
        let c = &candidates[(pos + step) % candidates.len()];
        if c.ramp >= 1.0 || dice < c.ramp {
            return c;
        }
    }
    &candidates[pos]
}

/// A stride coprime to `total`, near its golden section: stepping through a cycle of `total`
/// slots by it visits each slot once, the slots of one instance (next to each other) far apart.
fn spread_stride(total: u64) -> u64 {
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut stride = ((total as f64 * 0.618) as u64).max(1);
    while gcd(stride, total) != 1 {
        stride += 1;
    }
    stride
}

/// Fewest in-flight requests per unit of weight; instances tied for the fewest share by
/// weighted round robin (nginx's least_conn), so weights hold at low load too.
fn least_loaded(candidates: &[Candidate], input: PickInput) -> &Candidate {
    let load = |c: &Candidate| f64::from(c.in_flight) / c.capacity();
    let (mut best, mut least, mut ties) = (&candidates[0], load(&candidates[0]), 1);
    for c in &candidates[1..] {
        let l = load(c);
        if l < least {
            (best, least, ties) = (c, l, 1);
        } else if l == least {
            ties += 1;
        }
    }
    if ties == 1 {
        return best;
    }
    let tied: SmallVec<[Candidate; 16]> = candidates
        .iter()
        .filter(|c| load(c) <= least)
        .copied()
        .collect();
    let chosen = weighted_round_robin(&tied, input).index;
    candidates
        .iter()
        .find(|c| c.index == chosen)
        .expect("chosen among the candidates")
}

/// Latencies under this are compared as this. Below a few milliseconds the difference between
/// instances of one service is scheduling noise on a busy host, not capacity (instances
/// answering in 70 µs showed peaks of 3-5 ms on a loaded 2-core machine): compared as they were,
/// one spike sent every request to the other instance, whatever the weights.
const LATENCY_FLOOR_NS: f64 = 5e6;

/// The latency the candidates' samples give a typical one now: their average, each counted
/// by its freshness; 0 when none has a sample.
fn pool_latency(candidates: &[Candidate]) -> f64 {
    let (sum, weight) = candidates.iter().fold((0.0, 0.0), |(sum, weight), c| {
        (sum + c.latency_ns * c.freshness, weight + c.freshness)
    });
    if weight > 1e-9 {
        sum / weight
    } else {
        0.0
    }
}

/// A candidate's latency as the load-aware strategies compare it: its own, drawn toward
/// `pool`'s as it goes stale. An instance that gets few requests, by its weight, is not taken
/// for faster than the others because its sample is older; one passed over after a slow answer
/// comes back to the pool's latency, and is tried again, within seconds. One without a sample
/// counts as the pool's (as Envoy takes a new host for an average one): counted as fast, an
/// instance added to a loaded pool drew nearly every request until its first answer came.
fn compared_latency(c: &Candidate, pool: f64) -> f64 {
    if c.latency_ns <= 0.0 {
        return pool.max(LATENCY_FLOOR_NS);
    }
    (pool + (c.latency_ns - pool) * c.freshness).max(LATENCY_FLOOR_NS)
}

/// Whether latency or cost `x` is clearly below `than`: instances of one service differ by
/// noise, and an idle instance's latency decays while others answer, so a small difference must
/// not outweigh the weighted draw (that sent nearly every request to one instance, whatever the
/// weights); a clearly slower instance still loses.
fn clearly_lower(x: f64, than: f64) -> bool {
    x < than * 0.75
}

/// 64 random bits as a number in [0, 1).
fn unit_interval(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Two different positions among `candidates` (at least two), each drawn with a chance in
/// proportion to its capacity (weight × slow-start ramp), as nginx's `random two` draws.
fn two_by_capacity(candidates: &[Candidate], random: u64) -> (usize, usize) {
    let a = draw_by_capacity(candidates, random, None);
    (a, draw_by_capacity(candidates, mix(random), Some(a)))
}

/// A position among `candidates` but `skip` (at least one other), drawn with a chance in
/// proportion to its capacity from the random bits `random`.
fn draw_by_capacity(candidates: &[Candidate], random: u64, skip: Option<usize>) -> usize {
    let total: f64 = candidates
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .map(|(_, c)| c.capacity())
        .sum();
    let mut left = unit_interval(random) * total;
    let mut last = 0;
    for (i, c) in candidates.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        last = i;
        left -= c.capacity();
        if left < 0.0 {
            return i;
        }
    }
    last
}

/// What a strategy lays out once per instance set rather than at every pick.
#[derive(Debug, Clone, Default)]
pub enum Layout {
    #[default]
    Nothing,
    /// `consistent_hash`.
    Ring(HashRing),
    /// `round_robin`.
    Schedule(SmoothSchedule),
}

impl Layout {
    /// `instances`: (stable name such as the address, weight, primary) in instance-list order.
    pub fn new(strategy: &Strategy, instances: &[(&str, u32, bool)]) -> Layout {
        match strategy {
            Strategy::ConsistentHash(_) => {
                let weights: Vec<(&str, u32)> = instances.iter().map(|&(n, w, _)| (n, w)).collect();
                Layout::Ring(HashRing::new(&weights))
            }
            Strategy::RoundRobin => {
                // Backups serve only when no primary may: they have no turn in the schedule.
                let weights: Vec<u32> = instances
                    .iter()
                    .map(|&(_, w, primary)| if primary { w } else { 0 })
                    .collect();
                SmoothSchedule::new(&weights).map_or(Layout::Nothing, Layout::Schedule)
            }
            _ => Layout::Nothing,
        }
    }
}

/// nginx's smooth weighted round robin, played once through a cycle (as many turns as the
/// weights add up to): weights 5, 1, 1 give a a b a c a a, where walking the weights in order
/// gives a a a a a b c. Laid out per instance set, a pick is one lookup by the request's
/// sequence number, with no shared state to lock.
#[derive(Debug, Clone)]
pub struct SmoothSchedule {
    /// The instance position of each turn.
    turns: Vec<u32>,
}

/// Most turns a schedule holds, and most turns × instances spent laying one out; past either,
/// round robin walks the weights in order instead.
const MAX_TURNS: u64 = 65_536;
const MAX_LAYOUT_STEPS: u64 = 1 << 22;

impl SmoothSchedule {
    /// `weights` by instance position; 0 gives an instance no turn. `None` when there is
    /// nothing to lay out, or too much.
    pub fn new(weights: &[u32]) -> Option<SmoothSchedule> {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        if total == 0 || total > MAX_TURNS || total * weights.len() as u64 > MAX_LAYOUT_STEPS {
            return None;
        }
        let total = total as i64;
        let mut current = vec![0i64; weights.len()];
        let mut turns = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, &weight) in weights.iter().enumerate() {
                current[i] += i64::from(weight);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            turns.push(best as u32);
        }
        Some(SmoothSchedule { turns })
    }

    /// The candidate whose turn `input.seq` is. In slow start it takes its turn with the
    /// chance of its ramp. A turn its instance declines, or cannot take (out of rotation,
    /// draining, tried already), goes to a draw by capacity among the others: passed on by the
    /// turn's number, the turns of the instances out fell on the same few others (4 instances
    /// with 2 out shared 1 : 3).
    fn pick<'c>(&self, candidates: &'c [Candidate], input: PickInput) -> &'c Candidate {
        let turn = self.turns[(input.seq % self.turns.len() as u64) as usize] as usize;
        let owner = candidates.iter().position(|c| c.index == turn);
        if let Some(c) = owner.map(|i| &candidates[i]) {
            if c.ramp >= 1.0 || unit_interval(input.random) < c.ramp {
                return c;
            }
        }
        &candidates[draw_by_capacity(candidates, mix(input.random), owner)]
    }
}

/// Consistent-hash ring: virtual nodes per instance (proportional to weight) hashed from the
/// instance address, so adding one instance of N moves about 1/N of the keys.
#[derive(Debug, Clone, Default)]
pub struct HashRing {
    points: Vec<(u64, usize)>,
}

const VNODES_PER_WEIGHT: u32 = 160;
/// Points a ring may hold (1 MiB of them): past it, every instance's count is scaled down by
/// the same factor, so weights keep their proportions (up to rounding) however large. Past it
/// (about 410 instances of weight 1), adding an instance rescales every count, and about 2/N
/// of the keys move rather than 1/N.
const MAX_POINTS: f64 = 65_536.0;

impl HashRing {
    /// `instances`: (stable name such as the address, weight) in instance-list order.
    pub fn new(instances: &[(&str, u32)]) -> HashRing {
        let weight = |w: u32| f64::from(VNODES_PER_WEIGHT * w.max(1));
        let wanted: f64 = instances.iter().map(|(_, w)| weight(*w)).sum();
        let scale = (MAX_POINTS / wanted).min(1.0);
        let mut points = Vec::new();
        for (index, (name, w)) in instances.iter().enumerate() {
            let vnodes = (weight(*w) * scale).round().max(1.0) as u32;
            for v in 0..vnodes {
                let mut h = hash_bytes(name.as_bytes());
                h = mix(h ^ u64::from(v).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                points.push((h, index));
            }
        }
        points.sort_unstable();
        HashRing { points }
    }

    /// First instance clockwise from `hash` that `usable` accepts.
    pub fn lookup(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(point, _)| *point < hash);
        (0..self.points.len())
            .map(|step| self.points[(start + step) % self.points.len()].1)
            .find(|index| usable(*index))
    }
}

/// FNV-1a with a final avalanche: stable across processes and versions, so every gateway
/// replica maps a key to the same instance.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Peak-EWMA update (Finagle): a sample above the average replaces it at once (peaks are
/// believed immediately); below it, the average decays towards it with time constant `tau`.
pub fn peak_ewma(previous: f64, elapsed: Duration, sample: f64, tau: Duration) -> f64 {
    if previous <= 0.0 || sample > previous {
        return sample;
    }
    let w = (-elapsed.as_secs_f64() / tau.as_secs_f64()).exp();
    previous * w + sample * (1.0 - w)
}

/// Slow-start factor: grows linearly from 10 % to 100 % over `slow_start` after an instance
/// (re)joined. Never 0, so a new instance still gets a trickle of traffic to prove itself.
pub fn ramp_factor(since_up: Duration, slow_start: Duration) -> f64 {
    if slow_start.is_zero() || since_up >= slow_start {
        return 1.0;
    }
    0.1 + 0.9 * since_up.as_secs_f64() / slow_start.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(index: usize, in_flight: u32) -> Candidate {
        Candidate {
            index,
            in_flight,
            latency_ns: 0.0,
            freshness: 1.0,
            weight: 1,
            ramp: 1.0,
        }
    }

    #[test]
    fn every_strategy_name_reads_back_as_itself() {
        for name in Strategy::names() {
            let strategy = Strategy::from_name(name, || HashKey::ClientIp).unwrap();
            assert_eq!(strategy.name(), name);
        }
        assert_eq!(
            Strategy::from_name("least_conn", || HashKey::ClientIp),
            Some(Strategy::LeastConn)
        );
        let cookie = || HashKey::Cookie("session".into());
        assert_eq!(
            Strategy::from_name("consistent_hash", cookie),
            Some(Strategy::ConsistentHash(cookie()))
        );
        assert_eq!(Strategy::from_name("leastconn", || HashKey::ClientIp), None);
    }

    fn counts(strategy: &Strategy, cands: &[Candidate], n: u64) -> Vec<u64> {
        counts_over(strategy, cands, &Layout::Nothing, n)
    }

    /// Picks of `strategy` over `layout` for `n` requests, by instance.
    fn counts_over(strategy: &Strategy, cands: &[Candidate], layout: &Layout, n: u64) -> Vec<u64> {
        let mut counts = vec![0; cands.iter().map(|c| c.index).max().unwrap() + 1];
        for seq in 0..n {
            let input = PickInput {
                seq,
                random: mix(seq + 1),
                hash: None,
            };
            counts[pick_instance(strategy, cands, input, layout).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_rotates_evenly() {
        let cands = [cand(0, 0), cand(1, 0), cand(2, 0)];
        assert_eq!(
            counts(&Strategy::RoundRobin, &cands, 300),
            vec![100, 100, 100]
        );
    }

    #[test]
    fn round_robin_honours_weights_exactly_per_cycle() {
        let mut cands = [cand(0, 0), cand(1, 0)];
        cands[1].weight = 3;
        assert_eq!(counts(&Strategy::RoundRobin, &cands, 400), vec![100, 300]);
    }

    #[test]
    fn round_robin_interleaves_weights_as_nginx_does() {
        let strategy = Strategy::RoundRobin;
        let layout = Layout::new(&strategy, &[("a", 5, true), ("b", 1, true), ("c", 1, true)]);
        let cands = [cand(0, 0), cand(1, 0), cand(2, 0)];
        let cands = cands.map(|c| Candidate {
            weight: if c.index == 0 { 5 } else { 1 },
            ..c
        });
        let pick = |seq| {
            pick_instance(
                &strategy,
                &cands,
                PickInput {
                    seq,
                    ..PickInput::default()
                },
                &layout,
            )
        };
        let cycle: Vec<usize> = (0..7).map(pick).map(Option::unwrap).collect();
        assert_eq!(cycle, [0, 0, 1, 0, 2, 0, 0]);
        // With one out of the candidates (unhealthy, or tried), its turns go by weight to the
        // others, and the rest of the cycle stays as it was.
        let without_b = [cands[0], cands[2]];
        let picks: Vec<usize> = (0..7)
            .map(|seq| {
                let input = PickInput {
                    seq,
                    ..PickInput::default()
                };
                pick_instance(&strategy, &without_b, input, &layout).unwrap()
            })
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 0);
        assert_eq!(picks.iter().filter(|&&i| i == 2).count(), 1, "{picks:?}");
        // Backups have no turn; a layout too large to play is left out.
        let with_backup = Layout::new(&strategy, &[("a", 1, true), ("z", 1, false)]);
        let Layout::Schedule(schedule) = with_backup else {
            panic!("a schedule");
        };
        assert_eq!(schedule.turns, [0]);
        assert!(SmoothSchedule::new(&[1000; 100]).is_none());
    }

    #[test]
    fn turns_of_instances_out_or_ramping_are_shared_by_the_others_alike() {
        let names = [
            ("a", 1, true),
            ("b", 1, true),
            ("c", 1, true),
            ("d", 1, true),
        ];
        let layout = Layout::new(&Strategy::RoundRobin, &names);
        // b and d out: a and c share their turns evenly (they took 1 : 3 when the turn's
        // number passed them on).
        let c = counts_over(
            &Strategy::RoundRobin,
            &[cand(0, 0), cand(2, 0)],
            &layout,
            4000,
        );
        assert!(
            (1800..2200).contains(&c[0]) && (1800..2200).contains(&c[2]),
            "{c:?}"
        );
        // a barely ramped: what it declines goes to the three others alike, not to b.
        let mut cands = [cand(0, 0), cand(1, 0), cand(2, 0), cand(3, 0)];
        cands[0].ramp = 0.01;
        let c = counts_over(&Strategy::RoundRobin, &cands, &layout, 4000);
        assert!(c[0] < 100, "{c:?}");
        assert!(c[1..].iter().all(|n| (1250..1420).contains(n)), "{c:?}");
    }

    #[test]
    fn slow_start_gets_a_share_of_its_ramp() {
        let mut cands = [cand(0, 0), cand(1, 0)];
        cands[1].ramp = 0.25;
        let c = counts(&Strategy::RoundRobin, &cands, 10_000);
        // Instance 1 keeps about a quarter of its turns; the rest go to instance 0.
        assert!((1000..1600).contains(&c[1]), "{c:?}");
    }

    #[test]
    fn least_conn_prefers_fewest_in_flight_and_rotates_ties() {
        let cands = [cand(0, 5), cand(1, 2), cand(2, 9)];
        assert_eq!(counts(&Strategy::LeastConn, &cands, 10), vec![0, 10, 0]);
        let idle = [cand(0, 0), cand(1, 0)];
        assert_eq!(counts(&Strategy::LeastConn, &idle, 10), vec![5, 5]);
        // Heavy weights alike take turns rather than runs of their weight, and still share a
        // cycle by weight: 10 and 10 gave ten in a row each; 7 and 3 give 7 : 3.
        for weights in [[10, 10], [7, 3], [1000, 1]] {
            let mut idle = [cand(0, 0), cand(1, 0)];
            (idle[0].weight, idle[1].weight) = (weights[0], weights[1]);
            let total = u64::from(weights[0] + weights[1]);
            let picks: Vec<usize> = (0..total)
                .map(|seq| {
                    let input = PickInput {
                        seq,
                        random: mix(seq + 1),
                        hash: None,
                    };
                    pick_instance(&Strategy::LeastConn, &idle, input, &Layout::Nothing).unwrap()
                })
                .collect();
            let ones = picks.iter().filter(|&&i| i == 1).count();
            assert_eq!(ones as u32, weights[1], "{weights:?}: {picks:?}");
            let longest_run = picks.chunk_by(|a, b| a == b).map(<[usize]>::len).max();
            let fair_run = (weights[0] / weights[1]) as usize + 1;
            assert!(longest_run <= Some(fair_run), "{weights:?}: {picks:?}");
        }
    }

    #[test]
    fn least_conn_counts_weight() {
        let mut cands = [cand(0, 3), cand(1, 5)];
        cands[1].weight = 4; // 6/4 per unit < 4/1
        assert_eq!(counts(&Strategy::LeastConn, &cands, 4), vec![0, 4]);
    }

    #[test]
    fn power_of_two_never_picks_the_most_loaded_of_three() {
        let cands = [cand(0, 0), cand(1, 1), cand(2, 50)];
        let c = counts(&Strategy::RandomTwo, &cands, 3000);
        assert_eq!(c[2], 0, "{c:?}");
        assert!(c[0] > c[1], "{c:?}");
    }

    #[test]
    fn p2c_ewma_avoids_the_slow_instance() {
        let mut cands = [cand(0, 1), cand(1, 1)];
        cands[0].latency_ns = 50e6;
        cands[1].latency_ns = 1e6;
        assert_eq!(counts(&Strategy::P2cEwma, &cands, 100), vec![0, 100]);
    }

    #[test]
    fn two_by_capacity_is_distinct_and_follows_weights() {
        let mut cands = [cand(0, 0), cand(1, 0), cand(2, 0)];
        let mut seen = [0u32; 3];
        for r in 0..3000u64 {
            let (a, b) = two_by_capacity(&cands, mix(r));
            assert_ne!(a, b);
            seen[a] += 1;
            seen[b] += 1;
        }
        assert!(seen.iter().all(|s| (1800..2200).contains(s)), "{seen:?}");
        // Weights 1, 1, 8: the heavy one is nearly always one of the two.
        cands[2].weight = 8;
        let heavy = (0..1000u64)
            .filter(|r| {
                let (a, b) = two_by_capacity(&cands, mix(*r));
                a == 2 || b == 2
            })
            .count();
        assert!(heavy > 900, "{heavy}");
    }

    #[test]
    fn idle_instances_share_by_weight_under_every_load_aware_strategy() {
        let mut idle = [cand(0, 0), cand(1, 0)];
        idle[1].weight = 3;
        // nginx: least_conn with weights 1 and 3 and nothing in flight gives 10 and 30.
        assert_eq!(counts(&Strategy::LeastConn, &idle, 40), vec![10, 30]);
        for strategy in [Strategy::RandomTwo, Strategy::P2cEwma] {
            let c = counts(&strategy, &idle, 4000);
            assert!((2600..3400).contains(&c[1]), "{strategy:?}: {c:?}");
        }
    }

    #[test]
    fn latencies_alike_leave_the_choice_to_the_weights() {
        // Weights 5, 1, 1 and latencies that differ by noise (the heavy instance's the highest,
        // the others' decayed a little while it answered): the weights still hold, idle or
        // loaded in proportion to them.
        let mut cands = [cand(0, 0), cand(1, 0), cand(2, 0)];
        cands[0].weight = 5;
        for (c, ms) in cands.iter_mut().zip([5.2, 4.6, 4.1]) {
            c.latency_ns = ms * 1e6;
        }
        for in_flight in [[0, 0, 0], [5, 1, 1]] {
            for (c, n) in cands.iter_mut().zip(in_flight) {
                c.in_flight = n;
            }
            for strategy in [Strategy::RandomTwo, Strategy::P2cEwma] {
                let c = counts(&strategy, &cands, 7000);
                assert!(
                    (4500..5500).contains(&c[0]),
                    "{strategy:?} {in_flight:?}: {c:?}"
                );
            }
        }
        // A clearly faster instance still wins a tie in flight.
        cands[0].latency_ns = 12e6;
        cands[1].latency_ns = 2e6;
        let c = counts(&Strategy::RandomTwo, &[cands[0], cands[1]], 1000);
        assert_eq!(c[1], 1000, "{c:?}");
    }

    #[test]
    fn an_older_sample_does_not_make_an_instance_faster() {
        // Weights 5 and 1, both answering in 50 ms, at a few requests a second: the light one's
        // last answer is older. Taken as decaying toward zero, it won nearly every draw.
        let mut cands = [cand(0, 0), cand(1, 0)];
        cands[0].weight = 5;
        for (c, freshness) in cands.iter_mut().zip([0.8, 0.1]) {
            c.latency_ns = 50e6;
            c.freshness = freshness;
        }
        for strategy in [Strategy::RandomTwo, Strategy::P2cEwma] {
            let c = counts(&strategy, &cands, 6000);
            assert!((4500..5500).contains(&c[0]), "{strategy:?}: {c:?}");
        }
        // One passed over after a slow answer: out while that answer is fresh, back to its
        // share by weight once it is stale.
        let mut cands = [cand(0, 0), cand(1, 0), cand(2, 0)];
        for (c, ms) in cands.iter_mut().zip([50.0, 50.0, 400.0]) {
            c.latency_ns = ms * 1e6;
        }
        // Its 400 ms draw toward the others' 50 ms: e⁻⁴ of it is left 4 s on.
        for (freshness, share) in [(1.0, 0..1), ((-4f64).exp(), 800..1200)] {
            cands[2].freshness = freshness;
            for strategy in [Strategy::RandomTwo, Strategy::P2cEwma] {
                let c = counts(&strategy, &cands, 3000);
                assert!(share.contains(&c[2]), "{strategy:?} {freshness}: {c:?}");
            }
        }
        // At start only the slow one has answered: the others, with no sample, count as it
        // does, and go first once it holds the requests its slow answers keep in flight.
        for c in &mut cands[..2] {
            (c.latency_ns, c.freshness) = (0.0, 0.0);
        }
        cands[2].freshness = 1.0;
        for strategy in [Strategy::RandomTwo, Strategy::P2cEwma] {
            let c = counts(&strategy, &cands, 3000);
            assert!((800..1200).contains(&c[2]), "{strategy:?}: {c:?}");
        }
        cands[2].in_flight = 3;
        for strategy in [Strategy::RandomTwo, Strategy::P2cEwma] {
            assert_eq!(counts(&strategy, &cands, 3000)[2], 0, "{strategy:?}");
        }
    }

    #[test]
    fn an_instance_added_to_a_loaded_pool_is_not_flooded() {
        // Three answering in 100 ms with 4 requests in flight each; the new one has no sample
        // yet and already twice their queue. Counted as fast (5 ms), it still won every draw
        // it was in (half the requests), and went on until it held 20 times their queue.
        let mut cands = [cand(0, 4), cand(1, 4), cand(2, 4), cand(3, 8)];
        for c in &mut cands[..3] {
            c.latency_ns = 100e6;
        }
        let c = counts(&Strategy::P2cEwma, &cands, 4000);
        assert_eq!(c[3], 0, "{c:?}");
        // As loaded as the others, it gets its share.
        cands[3].in_flight = 4;
        let c = counts(&Strategy::P2cEwma, &cands, 4000);
        assert!((800..1200).contains(&c[3]), "{c:?}");
    }

    #[test]
    fn sub_millisecond_latencies_leave_the_choice_to_the_weights() {
        // Instances answering in tens of microseconds, one of them three times the other's
        // latency after a scheduling hiccup: weights 3 and 1 still share 3 : 1.
        let mut cands = [cand(0, 0), cand(1, 0)];
        cands[0].weight = 3;
        // Answers of 70 µs with the peaks of a busy host: 4 ms against 0.1 ms.
        for (slow, quick) in [(0.3e6, 0.1e6), (4e6, 0.1e6)] {
            cands[0].latency_ns = slow;
            cands[1].latency_ns = quick;
            for strategy in [Strategy::RandomTwo, Strategy::P2cEwma] {
                let c = counts(&strategy, &cands, 4000);
                assert!((2600..3400).contains(&c[0]), "{strategy:?}: {c:?}");
            }
        }
        // In-flight still counts under p2c_ewma: the busy one of two alike instances loses.
        cands[0].in_flight = 6;
        let c = counts(&Strategy::P2cEwma, &cands, 1000);
        assert_eq!(c[1], 1000, "{c:?}");
    }

    #[test]
    fn ring_moves_about_one_nth_of_keys_when_one_instance_is_added() {
        let names: Vec<String> = (0..5).map(|i| format!("10.0.0.{i}:80")).collect();
        let mut instances: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        let before = HashRing::new(&instances);
        instances.push(("10.0.0.9:80", 1));
        let after = HashRing::new(&instances);
        let keys = 20_000u64;
        let mut moved = 0;
        for k in 0..keys {
            let h = hash_bytes(&k.to_le_bytes());
            let a = before.lookup(h, |_| true).unwrap();
            let b = after.lookup(h, |_| true).unwrap();
            if a != b {
                assert_eq!(b, 5, "a key may only move to the new instance");
                moved += 1;
            }
        }
        let share = moved as f64 / keys as f64;
        assert!((0.11..0.23).contains(&share), "moved {share}");
    }

    #[test]
    fn ring_shares_follow_weights_however_large() {
        // 1:40 fits the point budget, 1:1000 with 2:500 is scaled down to it.
        for weights in [vec![1, 40], vec![1, 1000, 500]] {
            let names: Vec<String> = (0..weights.len())
                .map(|i| format!("10.0.0.{i}:80"))
                .collect();
            let instances: Vec<(&str, u32)> = names
                .iter()
                .map(String::as_str)
                .zip(weights.iter().copied())
                .collect();
            let ring = HashRing::new(&instances);
            let keys = 200_000u64;
            let mut counts = vec![0u64; weights.len()];
            for k in 0..keys {
                counts[ring.lookup(hash_bytes(&k.to_le_bytes()), |_| true).unwrap()] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (count, weight) in counts.iter().zip(&weights) {
                let share = *count as f64 / keys as f64;
                let expected = f64::from(*weight) / f64::from(total);
                // Few points give a light instance a rough share; a heavy one is close.
                assert!(
                    (share - expected).abs() < 0.25 * expected + 0.002,
                    "{weights:?}: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn ring_skips_unusable_instances_and_is_stable() {
        let ring = HashRing::new(&[("a:1", 1), ("b:1", 1), ("c:1", 1)]);
        let h = hash_bytes(b"user-42");
        let first = ring.lookup(h, |_| true).unwrap();
        assert_eq!(ring.lookup(h, |_| true), Some(first));
        let other = ring.lookup(h, |i| i != first).unwrap();
        assert_ne!(other, first);
    }

    #[test]
    fn consistent_hash_pick_is_sticky() {
        let strategy = Strategy::ConsistentHash(HashKey::ClientIp);
        let layout = Layout::new(
            &strategy,
            &[("a:1", 1, true), ("b:1", 1, true), ("c:1", 1, true)],
        );
        let cands = [cand(0, 0), cand(1, 7), cand(2, 0)];
        let input = |seq| PickInput {
            seq,
            random: seq,
            hash: Some(hash_bytes(b"10.1.2.3")),
        };
        let first = pick_instance(&strategy, &cands, input(0), &layout);
        for seq in 1..50 {
            assert_eq!(pick_instance(&strategy, &cands, input(seq), &layout), first);
        }
    }

    #[test]
    fn peak_ewma_takes_peaks_and_decays() {
        let tau = Duration::from_secs(10);
        assert_eq!(peak_ewma(0.0, Duration::ZERO, 5.0, tau), 5.0);
        assert_eq!(peak_ewma(5.0, Duration::ZERO, 9.0, tau), 9.0);
        let decayed = peak_ewma(9.0, Duration::from_secs(10), 1.0, tau);
        assert!((decayed - (1.0 + 8.0 * (-1f64).exp())).abs() < 1e-9);
    }

    #[test]
    fn ramp_grows_to_one() {
        let s = Duration::from_secs(10);
        assert!((ramp_factor(Duration::ZERO, s) - 0.1).abs() < 1e-9);
        assert!((ramp_factor(Duration::from_secs(5), s) - 0.55).abs() < 1e-9);
        assert_eq!(ramp_factor(Duration::from_secs(11), s), 1.0);
        assert_eq!(ramp_factor(Duration::ZERO, Duration::ZERO), 1.0);
    }
}
