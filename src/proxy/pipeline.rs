//! HTTP/1.1 pipelining to an instance, for upstreams with `pipeline` above 1 (the default for
//! plain HTTP/1.1 instances): body-less idempotent requests are queued on a shared connection
//! (a "line") and the answers read back in the order the requests went out (RFC 9112 §9.3.2).
//!
//! Why: on loopback most of a proxied request's cost is the kernel's work per TCP segment, and
//! the instance's per read. A line's writer sends every request queued during one scheduler
//! turn in one write, so the instance reads many requests at once and answers them in a burst.
//!
//! How: the task of each request appends its head to the line's pending bytes and queues a
//! turn. The read side of the connection ([`InstanceConn`]) is handed from turn to turn: the
//! request at the front reads its answer head and body as on a pooled connection, and at the
//! body's end passes it on ([`LineHold::hand_on`]). A request given up before any of its answer
//! was read (its client left, or its turn took too long) leaves that answer to be read and
//! thrown away when it comes, by a task of its own, and the line goes on. Anything else that
//! leaves the order in doubt (a request given up in the middle of its answer, a broken read or
//! write, an answer that closes the connection) breaks the line: every request still queued on
//! it gets [`Broken::Lost`] and is sent again on a connection of its own, as after a stale
//! keep-alive connection.
//!
//! When not to pipeline ([`joinable`]): lines carry one request each until an answer has shown
//! that the instance keeps connections open (RFC 9112 §9.3.2), and an instance that closes a
//! connection before it ever kept one open, or sends an answer that does not parse, is not
//! pipelined to again (closing with requests unread resets the connection, cutting its answer
//! off; a misframed answer would shift every answer queued behind it). Instances answer a
//! connection's requests one after another, so a slow one is better served by connections of
//! its own: a request does not queue behind one that has waited [`FLOWING_WAIT`] already, nor
//! at all while the instance's pace (its time per answer on a line) is past [`PACE_LIMIT`] or
//! not yet measured ([`pace_after`]);
//! nor are requests for a path that answered slowly among quick ones ([`SLOW_PATH`]); a request
//! for a path whose last answer was not quick, or that has not answered yet, goes alone on its
//! line ([`PathWatch::goes_alone`]). And an answer whose body streams (large, or still coming)
//! sends the requests queued behind it and not yet written elsewhere, so that a large answer, or
//! its slow reader, holds up no one who can still go; those written wait a while
//! ([`STREAMING_GRACE`]: sent again, they would run twice), then go too. Until the instance has answered a whole write of several requests, a line
//! writes no more while one it wrote is unanswered ([`PipeliningVerdict::pipelined`]): a server
//! that drops pipelined requests is found out before it can answer a later request in a dropped
//! one's place.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::connect::{ConnectError, Connector, InstanceStream};
use super::h1::{InstanceConn, SendError};
use crate::clock::ticks_ms;
use crate::http1::{BodyProgress, Framing};

/// Why a queued request got no turn on its line.
#[derive(Clone)]
pub enum Broken {
    /// The line's connection could not be opened: nothing was sent.
    Unconnected(Arc<ConnectError>),
    /// The line broke with the request written (or about to be): its answer will not come.
    Lost,
    /// The request was taken off a line whose answer ahead streams its body, before it was
    /// written: it goes elsewhere, and the line goes on.
    Unsent,
    /// Written behind an answer that streamed its body for longer than [`STREAMING_GRACE`]:
    /// it goes again elsewhere (it may run twice), and its answer here is thrown away.
    Overtaken,
}

/// How long requests written behind an answer that streams its body wait for it to end before
/// they go again elsewhere: long enough for an answer that is only larger than a read or two
/// (sent again, each would run twice), short enough that a large answer's slow reader holds
/// up no one for long.
const STREAMING_GRACE: Duration = Duration::from_millis(100);

/// A queued request's way to its turn.
struct QueuedTurn {
    to: oneshot::Sender<Result<Box<InstanceConn>, Broken>>,
    queued: Instant,
    /// The request's id on its line ([`Line::give_up`]).
    id: u64,
    /// The request was given up while it waited: its answer is read and thrown away.
    abandoned: bool,
}

/// The most time an abandoned request's answer may take to be read and thrown away, and the
/// most bytes of body it may have; past either the line breaks instead, and the requests
/// behind it go again on connections of their own (so they wait no longer than this behind
/// an answer nobody reads).
const SKIP_WAIT: Duration = Duration::from_millis(100);
const SKIP_BYTES: u64 = 256 * 1024;

/// The longest a line's oldest unanswered request may have waited for a request to queue
/// behind it.
pub const FLOWING_WAIT: Duration = Duration::from_millis(1);

/// The most time per answer an instance may take on average, on a line, for requests to queue
/// behind one another on its lines. Sub-millisecond instances gain from pipelining; one taking
/// longer would answer queued requests one after another where connections of their own get
/// them answered side by side (in front of an instance taking 10 ms per answer, 64 clients got
/// a third of the requests per second they get without pipelining).
pub const PACE_LIMIT: Duration = Duration::from_micros(500);
const PACE_LIMIT_US: u32 = PACE_LIMIT.as_micros() as u32;

/// While an instance's pace is past [`PACE_LIMIT`] or not yet measured, one request per
/// [`probe_interval`] queues behind another anyway, alone, so that its answer measures the
/// instance again: at least this often.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The longest a probe's answer is awaited before another request may probe ([`probe_hold`]).
const PROBE_HOLD: Duration = Duration::from_secs(10);

/// A pace not yet measured: the instance is not pipelined to, but for a probe, until an answer
/// shows it quick. Taking it for quick, a new gateway (a deploy, a restart) would queue a
/// whole first wave of requests behind a slow instance's answers, each waiting for all those
/// before it.
const UNMEASURED: u32 = u32::MAX;

/// Paths are told apart for their slowness by a hash into this many slots (two paths sharing
/// one only pipeline less).
const PATH_SLOTS: usize = 256;

/// A path whose answers take this long, and over four times the instance's pace for every path
/// together, [`SLOW_ANSWERS`] times in a row, is not pipelined to for [`SLOW_PATH_PAUSE`], so
/// that no request queues behind it: an instance's slow endpoint among quick ones. Set well
/// above [`PACE_LIMIT`], as a path's first request on a line counts its whole wait, connection
/// and queueing included; and relative to every path's answers as they come, so that a stall
/// of the gateway or the instance, or queueing under load, which slows every path at once,
/// pauses none: the common pace catches up within a few answers, whichever paths they are for.
pub const SLOW_PATH: Duration = Duration::from_millis(2);

/// A path whose last answer took this long goes alone on its line ([`PathWatch::goes_alone`])
/// until one comes quicker: whatever the other paths do, its requests would wait that long
/// behind one another (a burst of 1 s reports, all the traffic there is, never counts as slow
/// among quick ones). Far above what queueing under load adds to a quick answer.
pub const LONG_ANSWER: Duration = Duration::from_millis(20);

/// Slow answers in a row that pause a path ([`SLOW_PATH`]); after a pause, one does.
pub const SLOW_ANSWERS: u32 = 4;

/// How long a slow path ([`SLOW_PATH`]) goes unpipelined before it is measured afresh.
pub const SLOW_PATH_PAUSE: Duration = Duration::from_secs(5);

/// Until an instance has answered a request queued behind another, the most time such an
/// answer may take to start once its turn came. A server that reads pipelined requests and
/// drops all but the first would otherwise hold each queued request for the whole response
/// timeout; past this wait the request goes again on a connection of its own and the instance
/// gets no pipelined requests (see [`Lines::proof_due`]).
pub const PROOF_WAIT: Duration = Duration::from_secs(1);

/// The lines to one instance.
pub struct Lines {
    /// A snapshot a request scans for a line to join; opening a line or dropping closed ones
    /// replaces it, so no request waits on another to look.
    lines: ArcSwap<Vec<Arc<Line>>>,
    /// Requests in flight per line before another line is opened.
    depth: usize,
    idle_timeout: Duration,
    /// What the instance showed of how it takes pipelined requests; shared with its lines.
    verdict: Arc<PipeliningVerdict>,
    /// The instance's pace in microseconds ([`pace_after`]): an average of the time its answers
    /// took after the request's turn came, for requests queued behind another ([`PaceSample`]),
    /// or [`UNMEASURED`].
    pace: AtomicU32,
    /// When a request may next queue to measure a slow or unmeasured instance
    /// ([`probe_interval`] after the last answer that found it slow, [`probe_hold`] after the
    /// last probe).
    probe_at: Mutex<Instant>,
    /// The last whole latency of a request first on its line, in microseconds ([`probe_hold`]).
    latency: AtomicU32,
    /// The slow answers of each slot of paths ([`PathSlot`]), and the pace of every path
    /// together ([`next_pace`]).
    paths: Box<[PathWatch]>,
    all_paths: AtomicU32,
}

/// Where a request's path falls among [`PATH_SLOTS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathSlot(usize);

impl PathSlot {
    pub fn of(path: &str) -> PathSlot {
        PathSlot((crate::balance::hash_bytes(path.as_bytes()) % PATH_SLOTS as u64) as usize)
    }
}

/// The answers of one slot of paths.
#[derive(Default)]
struct PathWatch {
    /// Its last answer came within [`LONG_ANSWER`]. Until one has, each of its requests goes
    /// alone on its line ([`LineView::lonely`]): a burst of requests for a path never seen, or
    /// one that answers slowly (a report that takes a second, on an instance quick everywhere
    /// else), would otherwise queue behind one another.
    last_quick: AtomicBool,
    /// Its slow answers in a row ([`next_slow_answers`]).
    slow_answers: AtomicU32,
    /// Until when ([`ticks_ms`]) its requests are not pipelined.
    paused_until_ms: AtomicU64,
    /// Its last answer said a length over [`SKIP_BYTES`]: were its client to leave, the rest
    /// could not be thrown away in time, and the requests written behind it would run twice.
    last_large: AtomicBool,
}

impl PathWatch {
    /// Its requests go alone on their lines ([`LineView::lonely`]) until an answer came quick
    /// ([`PathWatch::last_quick`]), and while its last answers were slow: once its pause
    /// ([`SLOW_PATH_PAUSE`]) ends, a burst of its requests would otherwise queue behind one
    /// another before the first slow answer pauses it again (eight 1 s requests took up to 4 s).
    fn goes_alone(&self) -> bool {
        !self.last_quick.load(Ordering::Relaxed)
            || self.slow_answers.load(Ordering::Relaxed) >= SLOW_ANSWERS - 1
            || self.last_large.load(Ordering::Relaxed)
    }
}

/// What one answer tells of its instance's pace, taken when the request's turn comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaceSample {
    /// The request was first on its line: its wait tells the instance's whole latency, not its
    /// time per answer.
    First,
    /// The answer had started arriving before the request's turn came.
    Ready,
    /// The request waited behind another one's answer, and its own had not started arriving
    /// when its turn came, at this time.
    From(Instant),
}

/// The pace after an answer took `sample_us`: a moving average weighting each answer 1/8, so
/// that one long pause (the instance descheduled) does not stop pipelining to a fast instance.
pub fn next_pace(pace_us: u32, sample_us: u32) -> u32 {
    pace_us - pace_us / 8 + sample_us / 8
}

/// An instance's pace ([`Lines`]) after an answer that took `sample_us`, `first` when the
/// request was first on its line. Such an answer's wait is the instance's whole latency, an
/// upper bound of its time per answer: within [`PACE_LIMIT`] it sets an [`UNMEASURED`] pace (a
/// new gateway in front of a quick instance pipelines at once), and is averaged into one past
/// the limit (a quick instance measured slow by a stall comes back within a few answers, while
/// a slow instance's occasional quick answer, a 404 say, does not make it quick); otherwise it
/// tells nothing. An answer behind another within the limit while the pace is past it sets it
/// outright (a probe found the instance quick again); the first sets it, the others are
/// averaged ([`next_pace`]).
pub fn pace_after(pace_us: u32, sample_us: u32, first: bool) -> u32 {
    let quick = sample_us < PACE_LIMIT_US;
    match pace_us {
        UNMEASURED if quick => sample_us,
        _ if first && quick && pace_us >= PACE_LIMIT_US => next_pace(pace_us, sample_us),
        _ if first => pace_us,
        _ if quick && pace_us >= PACE_LIMIT_US => sample_us,
        UNMEASURED => sample_us.min(UNMEASURED - 1),
        _ => next_pace(pace_us, sample_us),
    }
}

/// How long a probe's answer is awaited before another request may probe, the instance's last
/// whole latency being `latency_us`: twice that (the answer before the probe's, then its own),
/// at least [`PROBE_INTERVAL`] and at most [`PROBE_HOLD`]. Its answer sets when the next may
/// come ([`probe_interval`]), so a slow instance gets one probe in flight, not one per wave of
/// requests while the first is unanswered; a probe never answered (its client left, its line
/// broke) is given up on after this.
pub fn probe_hold(latency_us: u32) -> Duration {
    Duration::from_micros(u64::from(latency_us) * 2).clamp(PROBE_INTERVAL, PROBE_HOLD)
}

/// How long after a probe (or an answer that found the instance slow) the next request may
/// queue to measure it: [`PROBE_INTERVAL`], or the time of 64 answers at its pace when that is
/// longer, so that in front of an instance taking 300 ms per answer one request in 19 s waits
/// for another's answer, not one in every 100 ms.
pub fn probe_interval(pace_us: u32) -> Duration {
    if pace_us == UNMEASURED {
        return PROBE_INTERVAL;
    }
    PROBE_INTERVAL.max(Duration::from_micros(u64::from(pace_us) * 64))
}

/// A path's slow answers in a row after `slow` of them and an answer that took `sample_us`,
/// `all_us` being the pace of every path together with that answer; `None` once they reach
/// [`SLOW_ANSWERS`]: the path is then paused.
pub fn next_slow_answers(slow: u32, sample_us: u32, all_us: u32) -> Option<u32> {
    if sample_us < SLOW_PATH.as_micros() as u32 || sample_us / 4 <= all_us {
        return Some(0);
    }
    (slow + 1 < SLOW_ANSWERS).then_some(slow + 1)
}

/// What an instance showed of how it takes pipelined requests.
struct PipeliningVerdict {
    /// An answer showed it keeps connections open: lines may carry more than one request from
    /// their first.
    proven: AtomicBool,
    /// It answered every request of a write that carried several ([`Line::take_pending`]).
    /// Until then a line writes nothing more while a request it wrote is unanswered, so that
    /// a server that drops the requests after the first of a read cannot answer a later one
    /// in a dropped one's place; and an answer due behind another must start within
    /// [`PROOF_WAIT`] of its turn.
    pipelined: AtomicBool,
    /// It gets no pipelined requests: it closed a connection before it had ever kept one
    /// open, sent an answer that did not parse, or did not answer a pipelined request.
    refused: AtomicBool,
    /// Requests a line takes in all ([`LineView::spent`]): `keepalive_requests`, or fewer once
    /// the instance showed a limit of its own ([`learned_limit`]).
    limit: AtomicU64,
    /// After how many requests the instance last closed a line with an answer (0: never).
    last_close: AtomicU64,
    /// The instance, named when pipelining to it ends.
    instance: SocketAddr,
}

impl PipeliningVerdict {
    fn new(instance: SocketAddr, keepalive_requests: u64) -> PipeliningVerdict {
        PipeliningVerdict {
            instance,
            proven: AtomicBool::new(false),
            pipelined: AtomicBool::new(false),
            refused: AtomicBool::new(false),
            limit: AtomicU64::new(keepalive_requests),
            last_close: AtomicU64::new(0),
        }
    }

    fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Ends pipelining to the instance until a reload, saying why the first time: an operator
    /// who sees its requests each on a connection of its own can tell what the instance did.
    fn refuse(&self, why: &'static str) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(instance = %self.instance, why, "pipelining to the instance ended until a reload");
        }
    }
}

/// The requests a line may take in all, `limit` so far, once the instance closed a line with
/// an ordinary answer (not an error), requests queued behind it, to the `closed_after`-th
/// request on the connection, having closed the one before after `last_close`: a count seen
/// twice in a row is the instance's own limit (nginx's `keepalive_requests`, Apache's
/// `MaxKeepAliveRequests`), and lines retire there from then on, so that no request is queued
/// behind its last answer. One close teaches nothing (a server may close after any answer now
/// and then), nor does a close after the first request (such an instance is not pipelined to at
/// all).
pub fn learned_limit(limit: u64, last_close: u64, closed_after: u64) -> u64 {
    if closed_after >= 2 && closed_after == last_close {
        limit.min(closed_after)
    } else {
        limit
    }
}

/// One pipelined connection.
pub struct Line {
    state: Mutex<LineState>,
    /// Requests queued and not yet answered to the end.
    outstanding: AtomicUsize,
    wake_writer: Notify,
    /// Its instance's [`PipeliningVerdict`]: an abandoned answer that does not parse refuses it
    /// as a read one does.
    verdict: Arc<PipeliningVerdict>,
}

struct LineState {
    /// Request heads queued since the writer last wrote.
    pending: Vec<u8>,
    /// The writer has been woken for `pending`.
    write_asked: bool,
    /// The requests whose answers are due, in order; the front one is next to read.
    turns: VecDeque<QueuedTurn>,
    /// The read side, while no request holds it; `None` while connecting too.
    reader: Option<Box<InstanceConn>>,
    /// Set once the line takes no more requests: broken, or the instance said it closes.
    closed: Option<Broken>,
    /// See [`LineView::streaming`].
    streaming: bool,
    /// See [`LineView::lonely`].
    lonely: bool,
    /// Requests in the last write (see [`PipeliningVerdict::pipelined`]).
    last_write: usize,
    /// The last write held several requests, or went out behind unanswered ones: an instance
    /// that drops pipelined requests may have dropped one of them, unanswered yet.
    last_write_pipelined: bool,
    /// When the oldest request not yet answered to its end was queued.
    front_since: Instant,
    last_used: Instant,
    /// The id of the next request to join.
    next_turn: u64,
    /// The requests whose heads are in `pending`, not yet written: their ids, and where each
    /// head ends in `pending`.
    unwritten: Vec<(u64, usize)>,
    /// A probe is among them ([`Joining::probe`]).
    probe_unwritten: bool,
}

impl LineState {
    /// Connected, not closed, no request on it.
    fn is_idle(&self) -> bool {
        self.closed.is_none() && self.reader.is_some() && self.turns.is_empty()
    }
}

/// What became of a request given up before its answer ([`Line::give_up`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GiveUp {
    /// Its head was not written yet: taken out, it is never sent.
    Unsent,
    /// Still queued: its answer will be thrown away when it comes.
    Abandoned,
    /// Its turn came: the read side is in its channel.
    TurnCame,
}

/// A request's place on a line, from its turn to the end of its answer's body. Dropped before
/// [`LineHold::hand_on`], it breaks the line: the answers behind it could not be told apart
/// (but see [`LineHold::skip`]).
pub struct LineHold {
    line: Arc<Line>,
    handed_on: bool,
    /// The requests behind this one were sent elsewhere ([`LineHold::release_queue`]).
    released_queue: bool,
    /// It was queued behind another request's answer, not first on an idle line.
    behind: bool,
    /// Tells the request apart on its line ([`Line::give_up`]); also the requests its
    /// connection carried before this one.
    id: u64,
}

/// A queued request: its turn at the read side. Dropped before its turn came (its client left),
/// it leaves its answer to be read and thrown away, and the line goes on.
pub struct Ticket {
    /// Until the turn comes.
    hold: Option<LineHold>,
    turn: oneshot::Receiver<Result<Box<InstanceConn>, Broken>>,
}

/// A request looking for a line to join.
struct Joining<'a, F> {
    write_head: &'a F,
    now: Instant,
    depth: usize,
    /// See [`LineView::proven`].
    proven: bool,
    /// See [`LineView::paced`].
    paced: bool,
    /// It queues to measure the instance ([`PROBE_INTERVAL`]): written at once, not held back
    /// until the answers before it came ([`PipeliningVerdict::pipelined`]).
    probe: bool,
    /// Its path goes alone ([`PathWatch::goes_alone`]): nothing queues behind it on its line.
    alone: bool,
    idle_timeout: Duration,
}

/// A line as a request choosing one sees it.
#[derive(Clone, Copy, Debug)]
pub struct LineView {
    /// Requests on it not yet answered to their end.
    pub load: usize,
    /// The instance is known to keep connections open.
    pub proven: bool,
    /// The instance's pace is within [`PACE_LIMIT`], or this request measures it again.
    pub paced: bool,
    /// How long its oldest unanswered request has waited.
    pub waited: Duration,
    /// Its reader is taking an answer body that did not come whole with its head.
    pub streaming: bool,
    /// It carries a request for a path that goes alone ([`PathWatch::goes_alone`]), and
    /// nothing may queue behind that until its answer came.
    pub lonely: bool,
    /// It took its `keepalive_requests` (those its connection carried before it became a line
    /// counted): it takes no more and closes once they are answered, so that no request is
    /// queued on it when it closes, as there would be on one the instance closes at its limit.
    pub spent: bool,
}

/// Whether a request may join a line of `depth`: none that is spent; an empty one always; a busy
/// one while it has room, its connection is known to persist, its instance answers quickly and
/// its oldest request has not waited [`FLOWING_WAIT`]. Requests join the first such line (the
/// oldest), so that a scheduler turn's requests share few writes.
pub fn joinable(line: LineView, depth: usize) -> bool {
    !line.spent
        && (line.load == 0
            || (line.proven
                && line.paced
                && !line.streaming
                && !line.lonely
                && line.load < depth
                && line.waited < FLOWING_WAIT))
}

impl Lines {
    pub fn new(
        instance: SocketAddr,
        depth: usize,
        keepalive_requests: u64,
        idle_timeout: Duration,
    ) -> Lines {
        Lines {
            lines: ArcSwap::default(),
            depth,
            idle_timeout,
            verdict: Arc::new(PipeliningVerdict::new(instance, keepalive_requests)),
            pace: AtomicU32::new(UNMEASURED),
            probe_at: Mutex::new(Instant::now()),
            latency: AtomicU32::new(0),
            paths: (0..PATH_SLOTS).map(|_| PathWatch::default()).collect(),
            all_paths: AtomicU32::new(0),
        }
    }

    /// Whether requests to this instance may be pipelined: not once it closed a connection
    /// before it had ever kept one open, or sent an answer that did not parse.
    pub fn taken(&self) -> bool {
        !self.verdict.refused.load(Ordering::Relaxed)
    }

    /// Queues a request for `path` on the first line it may join ([`joinable`]), opening a
    /// line when there is none, on the idle pooled connection `idle` gives when it gives one
    /// (the instance kept it open: it is proven); `write_head` appends its head to the bytes
    /// the line writes next.
    pub fn enqueue(
        &self,
        connector: &Connector,
        idle: impl FnOnce() -> Option<Box<InstanceConn>>,
        now: Instant,
        path: PathSlot,
        write_head: impl Fn(&mut Vec<u8>),
    ) -> Ticket {
        let alone = self.paths[path.0].goes_alone();
        let joining = Joining {
            write_head: &write_head,
            now,
            depth: self.depth,
            proven: self.verdict.proven.load(Ordering::Relaxed),
            paced: !alone && self.pace.load(Ordering::Relaxed) < PACE_LIMIT_US,
            probe: false,
            alone,
            idle_timeout: self.idle_timeout,
        };
        if !joining.paced && !alone {
            // Past the pace limit, one request per probe interval may queue all the same; the
            // probe is spent once one did.
            let mut probe_at = self.probe_at.lock().expect("probe lock");
            if now >= *probe_at {
                let probing = Joining {
                    paced: true,
                    probe: true,
                    ..joining
                };
                let ticket = self.join_first(connector, idle, &probing);
                if ticket.hold().behind {
                    *probe_at = now + probe_hold(self.latency.load(Ordering::Relaxed));
                }
                return ticket;
            }
        }
        self.join_first(connector, idle, &joining)
    }

    /// Queues a request on the first line it may join, opening a line when there is none.
    fn join_first<F: Fn(&mut Vec<u8>)>(
        &self,
        connector: &Connector,
        idle: impl FnOnce() -> Option<Box<InstanceConn>>,
        joining: &Joining<'_, F>,
    ) -> Ticket {
        // A closed line refuses in `join`; closed ones are dropped when a line opens and by the
        // sweep, so a request locks no more lines than it looks at.
        let joined = self.lines.load().iter().find_map(|line| line.join(joining));
        if let Some(ticket) = joined {
            return ticket;
        }
        // Requests on two threads that both found every line full each open one (as HTTP/2
        // connections are opened): the sweep closes what the burst left idle.
        // A pooled connection past a limit learned since it was pooled is closed, not a line.
        let pooled = idle().filter(|conn| conn.requests() < self.verdict.limit());
        if pooled.is_some() {
            self.verdict.proven.store(true, Ordering::Relaxed);
        }
        let line = Line::new(pooled.as_deref(), joining.now, self.verdict.clone());
        // Joined before it is shown to other requests (one alone on its line would refuse a
        // line another joined first), and before its writer starts: a writer that failed to
        // connect at once (a refused connection, on another worker thread) would otherwise
        // close the line first.
        let ticket = line
            .join(joining)
            .expect("a new line takes its first request");
        self.lines.rcu(|lines| {
            let mut kept = open_lines(lines);
            kept.push(line.clone());
            kept
        });
        tokio::spawn(write_line(line, connector.clone(), pooled));
        ticket
    }

    /// Forgets the instance's pace: once taken out of rotation it may come back as another
    /// process, slower than the one measured, and requests queued behind its answers as if it
    /// were not would wait a line's depth of them.
    pub fn forget_pace(&self) {
        self.pace.store(UNMEASURED, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn pace_measured(&self) -> bool {
        self.pace.load(Ordering::Relaxed) != UNMEASURED
    }

    /// Whether a request for `path` may be pipelined at `now`: not once the instance was
    /// refused pipelining ([`Lines::taken`]), nor while the path is paused as slow.
    pub fn pipelines(&self, path: PathSlot, now: Instant) -> bool {
        let paused_until = self.paths[path.0].paused_until_ms.load(Ordering::Relaxed);
        self.taken() && ticks_ms(now) >= paused_until
    }

    /// Takes the length an answer for `path` said (`framing`) into whether the path's requests
    /// go alone on their lines ([`PathWatch::last_large`]).
    pub fn record_length(&self, path: PathSlot, framing: Framing) {
        let large = matches!(framing, Framing::Length(length) if length > SKIP_BYTES);
        let slot = &self.paths[path.0];
        if slot.last_large.load(Ordering::Relaxed) != large {
            slot.last_large.store(large, Ordering::Relaxed);
        }
    }

    /// Takes an answer head for `path`, queued at `started`, come at `came`, into the
    /// instance's pace ([`PaceSample`]: requests behind another only) and into the count of
    /// the path's slow answers (timed from the turn behind another, 0 when the answer was
    /// there by then, else from the queueing).
    pub fn record_answer(
        &self,
        path: PathSlot,
        sample: PaceSample,
        started: Instant,
        came: Instant,
    ) {
        let since = match sample {
            PaceSample::First => started,
            PaceSample::Ready => came,
            PaceSample::From(turn) => turn,
        };
        let took = u32::try_from(came.saturating_duration_since(since).as_micros());
        let took = took.unwrap_or(u32::MAX);
        let first = sample == PaceSample::First;
        if first {
            self.latency.store(took, Ordering::Relaxed);
        }
        let before = self.pace.load(Ordering::Relaxed);
        let pace = pace_after(before, took, first);
        if pace != before {
            self.pace.store(pace, Ordering::Relaxed);
        }
        // A slow answer behind another (a probe's, most often) sets when the next may probe.
        if !first && pace >= PACE_LIMIT_US {
            *self.probe_at.lock().expect("probe lock") = came + probe_interval(pace);
        }
        let all = next_pace(self.all_paths.load(Ordering::Relaxed), took);
        self.all_paths.store(all, Ordering::Relaxed);
        let slot = &self.paths[path.0];
        let quick = took < LONG_ANSWER.as_micros() as u32;
        if slot.last_quick.load(Ordering::Relaxed) != quick {
            slot.last_quick.store(quick, Ordering::Relaxed);
        }
        let slow = slot.slow_answers.load(Ordering::Relaxed);
        match next_slow_answers(slow, took, all) {
            Some(slow) => slot.slow_answers.store(slow, Ordering::Relaxed),
            None => {
                // One slow answer after the pause pauses it again.
                slot.slow_answers.store(SLOW_ANSWERS - 1, Ordering::Relaxed);
                let until = ticks_ms(came) + SLOW_PATH_PAUSE.as_millis() as u64;
                slot.paused_until_ms.store(until, Ordering::Relaxed);
            }
        }
    }

    /// When the answer of a request whose turn came with `sample` must have started: [`PROOF_WAIT`]
    /// after its turn while the instance has not yet answered a request queued behind
    /// another, else never (`None`: only the response timeout bounds it).
    pub fn proof_due(&self, sample: PaceSample) -> Option<Instant> {
        match sample {
            PaceSample::From(turn) if !self.verdict.pipelined.load(Ordering::Relaxed) => {
                Some(turn + PROOF_WAIT)
            }
            _ => None,
        }
    }

    /// The instance framed an answer wrongly, or dropped a pipelined request (`why`): with
    /// requests queued, a misframed answer (a body after a 204, say) would shift every answer
    /// behind it, so pipelining to it ends.
    pub fn refuse(&self, why: &'static str) {
        self.verdict.refuse(why);
    }

    /// An answer head came on `hold`'s line: one that keeps the connection open proves the
    /// instance; one that closes it ends the line, ends pipelining to an instance never proven
    /// (a server that closes every connection after one answer), and may show the instance's
    /// own limit of requests per connection ([`learned_limit`]) when its `status` is not an
    /// error and requests were queued behind it (the close cost them their place: a line closed
    /// with nothing behind it, under light load, lost nothing worth learning from).
    pub fn answered(&self, hold: &LineHold, persistent: bool, status: http::StatusCode) {
        if persistent {
            self.verdict.proven.store(true, Ordering::Relaxed);
            return;
        }
        let ordinary = !status.is_client_error() && !status.is_server_error();
        if ordinary && hold.line.load() > 1 {
            let closed_after = hold.id + 1;
            let last_close = self
                .verdict
                .last_close
                .swap(closed_after, Ordering::Relaxed);
            let limit = learned_limit(self.verdict.limit(), last_close, closed_after);
            self.verdict.limit.fetch_min(limit, Ordering::Relaxed);
        }
        if !self.verdict.proven.load(Ordering::Relaxed) {
            self.verdict
                .refuse("it closed a connection after its first answer");
        }
        let mut state = hold.line.state.lock().expect("line lock");
        if state.closed.is_none() {
            state.closed = Some(Broken::Lost);
        }
    }

    /// Lines connected with no request on them.
    pub fn idle_count(&self) -> usize {
        self.lines
            .load()
            .iter()
            .filter(|line| line.idle_since().is_some())
            .count()
    }

    /// Closes the lines idle past the idle timeout, then those idle longest past `keep` (what
    /// the upstream's `keepalive` leaves beside the pool's idle connections), and lets go of
    /// closed ones (the pool's sweep calls this). A burst's lines thus idle down to the cap
    /// within a sweep, not only after the idle timeout.
    pub fn close_idle(&self, now: Instant, keep: usize) {
        self.lines.rcu(|lines| open_lines(lines));
        let lines = self.lines.load_full();
        let mut idle = Vec::new();
        for line in lines.iter() {
            line.close_if_idle(now, self.idle_timeout);
            if let Some(since) = line.idle_since() {
                idle.push((since, line));
            }
        }
        if idle.len() > keep {
            idle.sort_by_key(|(since, _)| *since);
            let surplus = idle.len() - keep;
            for (_, line) in idle.into_iter().take(surplus) {
                // Only while still idle: a request may have taken it meanwhile.
                line.close_if_idle(now, Duration::ZERO);
            }
        }
    }
}

/// `lines` without the closed ones: what a new snapshot keeps.
fn open_lines(lines: &[Arc<Line>]) -> Vec<Arc<Line>> {
    lines
        .iter()
        .filter(|line| !line.is_closed())
        .cloned()
        .collect()
}

impl Drop for Lines {
    /// The writers hold their lines: they end when the lines break.
    fn drop(&mut self) {
        for line in self.lines.load().iter() {
            line.break_off(Broken::Lost);
        }
    }
}

impl Line {
    /// A line on `pooled`, or on a connection its writer opens once started.
    fn new(
        pooled: Option<&InstanceConn>,
        now: Instant,
        verdict: Arc<PipeliningVerdict>,
    ) -> Arc<Line> {
        Arc::new(Line {
            state: Mutex::new(LineState {
                pending: Vec::with_capacity(4096),
                write_asked: false,
                turns: VecDeque::new(),
                reader: None,
                closed: None,
                streaming: false,
                lonely: false,
                front_since: now,
                last_used: now,
                // A pooled connection's requests count toward `keepalive_requests`.
                next_turn: pooled.map_or(0, |conn| conn.requests()),
                unwritten: Vec::new(),
                probe_unwritten: false,
                last_write: 0,
                last_write_pipelined: false,
            }),
            outstanding: AtomicUsize::new(0),
            wake_writer: Notify::new(),
            verdict,
        })
    }

    fn load(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// See [`LineView::spent`].
    fn spent(&self, state: &LineState) -> bool {
        state.next_turn >= self.verdict.limit()
    }

    fn is_closed(&self) -> bool {
        self.state.lock().expect("line lock").closed.is_some()
    }

    /// Queues a request when it may join ([`joinable`]); `None` when not, or when the line
    /// turned out closed (an idle connection the instance closed, or one idle too long), which
    /// is then broken.
    fn join<F: Fn(&mut Vec<u8>)>(self: &Arc<Line>, joining: &Joining<'_, F>) -> Option<Ticket> {
        let Joining {
            write_head,
            now,
            depth,
            proven,
            paced,
            probe,
            alone,
            idle_timeout,
            ..
        } = *joining;
        let mut state = self.state.lock().expect("line lock");
        let load = self.load();
        let view = LineView {
            load,
            proven,
            paced,
            waited: now.saturating_duration_since(state.front_since),
            streaming: state.streaming,
            lonely: state.lonely,
            spent: self.spent(&state),
        };
        if state.closed.is_some() {
            return None;
        }
        // An idle line is done with when the instance closed it, it idled too long, or a limit
        // learned while it sat idle left it spent (no answer will pass its reader on again).
        let idle = state.turns.is_empty() && load == 0;
        let idle_too_long = now.duration_since(state.last_used) > idle_timeout;
        let stale = idle
            && (view.spent
                || state
                    .reader
                    .as_mut()
                    .is_some_and(|reader| idle_too_long || !reader.is_open()));
        if stale {
            drop(state);
            self.break_off(Broken::Lost);
            return None;
        }
        if !joinable(view, depth) {
            return None;
        }
        let (turn, waiting) = oneshot::channel();
        if idle {
            state.front_since = now;
        }
        // Alone, it joined an empty line (it is not `paced`).
        state.lonely |= alone;
        let id = state.next_turn;
        state.next_turn += 1;
        let behind = match state.reader.take() {
            Some(reader) if state.turns.is_empty() => {
                // The read side is free: this request is next.
                let _ = turn.send(Ok(reader));
                false
            }
            reader => {
                state.reader = reader;
                state.turns.push_back(QueuedTurn {
                    to: turn,
                    queued: now,
                    id,
                    abandoned: false,
                });
                !idle
            }
        };
        // A probe behind an unanswered request goes out at once: its answer then follows that
        // one's as a pipelined answer would, and measures the instance's time per answer, not
        // the round trip and the writer's wait; an instance dropping it is found out as
        // [`PROOF_WAIT`] says.
        state.probe_unwritten |= probe && behind;
        write_head(&mut state.pending);
        let end = state.pending.len();
        state.unwritten.push((id, end));
        state.last_used = now;
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        let wake = !std::mem::replace(&mut state.write_asked, true);
        drop(state);
        if wake {
            self.wake_writer.notify_one();
        }
        Some(Ticket {
            hold: Some(LineHold {
                line: self.clone(),
                handed_on: false,
                released_queue: false,
                behind,
                id,
            }),
            turn: waiting,
        })
    }

    /// The read side goes to the request whose answer is next, or waits for one; on a closed
    /// line it is closed, and whoever still waits is told. An abandoned request's answer is
    /// read and thrown away first, by a task of its own.
    fn pass_reader(self: &Arc<Line>, reader: Box<InstanceConn>) {
        let mut state = self.state.lock().expect("line lock");
        if state.closed.is_some() {
            drop(state);
            drop(reader);
            return self.break_off(Broken::Lost);
        }
        let mut pipelined = self.verdict.pipelined.load(Ordering::Relaxed);
        if !pipelined && self.all_written_answered(&state) && state.last_write > 1 {
            self.verdict.pipelined.store(true, Ordering::Relaxed);
            pipelined = true;
        }
        // Requests queued but not asked to be written were held back ([`Line::take_pending`]):
        // they go now, once the instance proved itself (on this line or another) or every
        // request written before them was answered.
        if !state.pending.is_empty()
            && !state.write_asked
            && (pipelined || self.all_written_answered(&state))
        {
            state.write_asked = true;
            self.wake_writer.notify_one();
        }
        let Some(turn) = state.turns.pop_front() else {
            // Bytes no request asked for: whoever joins next would take them as its answer. A
            // spent line has no request left to answer: it closes.
            if reader.has_buffered() || self.spent(&state) {
                drop(state);
                drop(reader);
                return self.break_off(Broken::Lost);
            }
            state.streaming = false;
            state.lonely = false;
            state.reader = Some(reader);
            return;
        };
        state.front_since = turn.queued;
        state.streaming = false;
        state.lonely = false;
        if turn.abandoned {
            drop(state);
            tokio::spawn(skip_abandoned(self.clone(), reader));
            return;
        }
        // Sent under the lock: a ticket given up that finds its turn gone finds the read side
        // in its channel ([`Ticket`]'s drop).
        let sent = turn.to.send(Ok(reader));
        drop(state);
        if sent.is_err() {
            self.break_off(Broken::Lost);
        }
    }

    /// The requests written behind a streaming answer (ids up to `last_written`), those still
    /// waiting for their turn, go elsewhere ([`Broken::Overtaken`]): their answers are thrown
    /// away when they come, as a client's that left. Requests that joined once it ended stay.
    fn overtake(&self, last_written: u64) {
        let mut state = self.state.lock().expect("line lock");
        for turn in state.turns.iter_mut() {
            if turn.id <= last_written && !turn.abandoned {
                turn.abandoned = true;
                let to = std::mem::replace(&mut turn.to, oneshot::channel().0);
                let _ = to.send(Err(Broken::Overtaken));
            }
        }
    }

    /// Gives up request `id` before its answer: unsent, its head is taken out of the bytes to
    /// write and its turn out of the queue; queued, its turn is marked abandoned.
    fn give_up(&self, id: u64) -> GiveUp {
        let mut state = self.state.lock().expect("line lock");
        let state = &mut *state;
        let queued = state.turns.iter().position(|turn| turn.id == id);
        if let Some(at) = state.unwritten.iter().position(|&(unsent, _)| unsent == id) {
            let start = at
                .checked_sub(1)
                .map_or(0, |before| state.unwritten[before].1);
            let end = state.unwritten.remove(at).1;
            state.pending.drain(start..end);
            for later in &mut state.unwritten[at..] {
                later.1 -= end - start;
            }
            if let Some(at) = queued {
                state.turns.remove(at);
            }
            self.outstanding.fetch_sub(1, Ordering::Relaxed);
            if state.closed.is_some() {
                // The writer of a closed line waits for its last request to go: this was it.
                self.wake_writer.notify_one();
            }
            return GiveUp::Unsent;
        }
        match queued {
            Some(at) => {
                state.turns[at].abandoned = true;
                GiveUp::Abandoned
            }
            None => GiveUp::TurnCame,
        }
    }

    /// Takes no more requests; every queued one gets `why`.
    fn break_off(&self, why: Broken) {
        let mut state = self.state.lock().expect("line lock");
        if state.closed.is_none() {
            state.closed = Some(why.clone());
        }
        let turns = std::mem::take(&mut state.turns);
        let reader = state.reader.take();
        drop(state);
        for turn in turns {
            if turn.abandoned {
                self.outstanding.fetch_sub(1, Ordering::Relaxed);
            }
            let _ = turn.to.send(Err(why.clone()));
        }
        // Closed outside the lock; the writer wakes to see the line closed and stops.
        drop(reader);
        self.wake_writer.notify_one();
    }

    /// Since when the line has been idle: connected, not closed, no request on it.
    fn idle_since(&self) -> Option<Instant> {
        let state = self.state.lock().expect("line lock");
        state.is_idle().then_some(state.last_used)
    }

    /// Closes the line when it is idle and idled too long or the instance closed it (or sent
    /// something unasked): its socket is not held half-closed until the idle timeout.
    fn close_if_idle(&self, now: Instant, idle_timeout: Duration) {
        let mut state = self.state.lock().expect("line lock");
        let idle_too_long = now.duration_since(state.last_used) > idle_timeout;
        let stale = state.is_idle()
            && (idle_too_long
                || state
                    .reader
                    .as_mut()
                    .is_some_and(|reader| !reader.is_open()));
        if !stale {
            return;
        }
        // Closed under the lock that found it idle: a request joining in between would be
        // failed with the line (and, written already, sent again elsewhere).
        state.closed.get_or_insert(Broken::Lost);
        let reader = state.reader.take();
        drop(state);
        drop(reader);
        self.wake_writer.notify_one();
    }

    /// The bytes to write next, into `out`; `false` once the line is closed and no request on
    /// it is left, when the writer ends (closing the connection's write side). Requests queued
    /// on a closed line are not written: their answers could not come.
    fn take_pending(&self, out: &mut Vec<u8>) -> bool {
        let mut state = self.state.lock().expect("line lock");
        state.write_asked = false;
        if state.closed.is_some() {
            return self.load() > 0;
        }
        let proving = !self.verdict.pipelined.load(Ordering::Relaxed);
        let unanswered = self.load().saturating_sub(state.unwritten.len());
        // While proving, a probe goes out at once only behind a request the instance cannot
        // have dropped (written alone, with nothing else unanswered): behind a dropped one,
        // the probe's answer would be read as that one's.
        let probe_may_go = state.probe_unwritten && !state.last_write_pipelined;
        if proving && !probe_may_go && unanswered > 0 {
            // Held back until they are ([`PipeliningVerdict::pipelined`]): the last answer wakes
            // the writer.
            return true;
        }
        state.probe_unwritten = false;
        if !state.unwritten.is_empty() {
            state.last_write = state.unwritten.len();
            state.last_write_pipelined = state.unwritten.len() > 1 || unanswered > 0;
        }
        std::mem::swap(out, &mut state.pending);
        state.unwritten.clear();
        true
    }

    /// Every request written so far was answered to its end (or its answer thrown away).
    fn all_written_answered(&self, state: &LineState) -> bool {
        self.load() == state.unwritten.len()
    }
}

impl Ticket {
    /// Waits for this request's turn at the read side: the answers before its own were read.
    pub async fn turn(mut self) -> Result<(Box<InstanceConn>, LineHold), Broken> {
        let turn = (&mut self.turn).await;
        let hold = self.hold.take().expect("held until the turn");
        match turn {
            Ok(Ok(reader)) => Ok((reader, hold)),
            Ok(Err(Broken::Unsent)) => {
                hold.unsent();
                Err(Broken::Unsent)
            }
            Ok(Err(Broken::Overtaken)) => {
                hold.overtaken();
                Err(Broken::Overtaken)
            }
            Ok(Err(why)) => Err(why),
            Err(_) => Err(Broken::Lost),
        }
    }

    fn hold(&self) -> &LineHold {
        self.hold.as_ref().expect("held until the turn")
    }
}

impl Drop for Ticket {
    /// Not yet written, the request is never sent (given the read side at once, it passes it
    /// on). Written and queued, its turn is marked abandoned: its answer is thrown away when it
    /// comes, and the request counts on the line until then. Its turn come, the read side is
    /// in the channel: the answer is thrown away now.
    fn drop(&mut self) {
        let Some(mut hold) = self.hold.take() else {
            return;
        };
        match hold.line.give_up(hold.id) {
            GiveUp::Unsent => {
                hold.handed_on = true;
                if let Ok(Ok(reader)) = self.turn.try_recv() {
                    hold.line.pass_reader(reader);
                }
            }
            GiveUp::Abandoned => hold.handed_on = true,
            GiveUp::TurnCame => match self.turn.try_recv() {
                Ok(Ok(reader)) => hold.skip(reader),
                Ok(Err(Broken::Unsent)) => hold.unsent(),
                _ => {}
            },
        }
    }
}

impl LineHold {
    /// What this request's answer will tell of the instance's pace, its turn having come with
    /// `reader`.
    pub fn pace_sample(&self, reader: &InstanceConn) -> PaceSample {
        if !self.behind {
            PaceSample::First
        } else if reader.has_buffered() {
            PaceSample::Ready
        } else {
            PaceSample::From(Instant::now())
        }
    }

    /// This answer's body streams (large, or still coming): no one joins the line until it
    /// ends, and the requests queued behind it but not yet written go elsewhere now rather than
    /// wait for it and its client. Those written wait for their answers, which follow it: sent
    /// again elsewhere, each would run twice.
    pub fn release_queue(&mut self) {
        if std::mem::replace(&mut self.released_queue, true) {
            return;
        }
        let mut state = self.line.state.lock().expect("line lock");
        let state = &mut *state;
        state.streaming = true;
        // Ids grow in queueing order and a write takes every head pending: from the first
        // unwritten one on, no request was written.
        if let Some(&(first_unwritten, _)) = state.unwritten.first() {
            state.unwritten.clear();
            state.pending.clear();
            state.probe_unwritten = false;
            let (released, kept) = std::mem::take(&mut state.turns)
                .into_iter()
                .partition(|turn| turn.id >= first_unwritten);
            state.turns = kept;
            for turn in released {
                let _ = turn.to.send(Err(Broken::Unsent));
            }
        }
        let Some(last_written) = state.turns.back().map(|turn| turn.id) else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let line = self.line.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STREAMING_GRACE).await;
            line.overtake(last_written);
        });
    }

    /// Its client left with `body` of the answer still to come, and requests were written
    /// behind it: the rest is read and thrown away (within [`SKIP_WAIT`] and [`SKIP_BYTES`]),
    /// so that they get their answers here rather than run again elsewhere; else the line
    /// breaks. `reusable`: the answer leaves the connection open.
    pub fn skip_rest(self, mut reader: Box<InstanceConn>, body: BodyProgress, reusable: bool) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        tokio::spawn(async move {
            let due = Instant::now() + SKIP_WAIT;
            if let Ok(true) = reader.skip_body(body, due, SKIP_BYTES).await {
                self.hand_on(reader, reusable);
            }
        });
    }

    /// Requests were written on the line behind this one.
    pub fn written_behind(&self) -> bool {
        let state = self.line.state.lock().expect("line lock");
        self.line.load().saturating_sub(state.unwritten.len()) > 1
    }

    /// It was queued behind another request's answer: what it reads may be what that answer
    /// left over (a body after a 204, more than its Content-Length said).
    pub fn behind(&self) -> bool {
        self.behind
    }

    /// The request was overtaken ([`Broken::Overtaken`]): its turn stays, marked abandoned, and
    /// the line throws its answer away and goes on.
    fn overtaken(mut self) {
        self.handed_on = true;
    }

    /// The request was taken off the line before it was written ([`Broken::Unsent`]): its
    /// place is given back, and the line goes on.
    fn unsent(mut self) {
        self.handed_on = true;
        self.line.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    /// The request was given up with the read side in hand, before any of its answer was
    /// taken: a task of its own reads the answer and throws it away, then passes the read side
    /// on. (Outside a runtime, shutting down, the line breaks.)
    fn skip(mut self, reader: Box<InstanceConn>) {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.handed_on = true;
            tokio::spawn(skip_abandoned(self.line.clone(), reader));
        }
    }

    /// This request's answer was read to its end: the read side goes to the next request, or
    /// waits for one. `reusable` false (the connection closes, or the answer was cut short)
    /// breaks the line.
    pub fn hand_on(mut self, reader: Box<InstanceConn>, reusable: bool) {
        self.handed_on = true;
        let line = &self.line;
        line.outstanding.fetch_sub(1, Ordering::Relaxed);
        if !reusable {
            drop(reader);
            line.break_off(Broken::Lost);
            return;
        }
        line.pass_reader(reader);
    }
}

impl Drop for LineHold {
    fn drop(&mut self) {
        if !self.handed_on {
            self.line.outstanding.fetch_sub(1, Ordering::Relaxed);
            self.line.break_off(Broken::Lost);
        }
    }
}

/// A request whose turn came, waiting for its answer head. Dropped while it waits (its client
/// left), it leaves its answer to be read and thrown away, and the line goes on.
pub struct AnswerWait {
    turn: Option<(Box<InstanceConn>, LineHold)>,
}

impl AnswerWait {
    pub fn new(reader: Box<InstanceConn>, hold: LineHold) -> AnswerWait {
        AnswerWait {
            turn: Some((reader, hold)),
        }
    }

    pub fn reader(&mut self) -> &mut InstanceConn {
        &mut self.turn.as_mut().expect("an answer waited for").0
    }

    /// The head came, or reading it failed: what becomes of the line is the caller's.
    pub fn into_parts(mut self) -> (Box<InstanceConn>, LineHold) {
        self.turn.take().expect("an answer waited for")
    }
}

impl Drop for AnswerWait {
    fn drop(&mut self) {
        if let Some((reader, hold)) = self.turn.take() {
            hold.skip(reader);
        }
    }
}

/// Reads an abandoned request's answer and throws it away, then passes the read side on; the
/// line breaks when that fails or takes more than [`SKIP_WAIT`] or [`SKIP_BYTES`].
async fn skip_abandoned(line: Arc<Line>, mut reader: Box<InstanceConn>) {
    let due = Instant::now() + SKIP_WAIT;
    let skipped = reader.skip_answer(due, SKIP_BYTES).await;
    line.outstanding.fetch_sub(1, Ordering::Relaxed);
    if matches!(skipped, Ok(true)) {
        return line.pass_reader(reader);
    }
    if matches!(skipped, Err(SendError::Invalid(_))) {
        line.verdict.refuse("an answer that did not parse");
    }
    drop(reader);
    line.break_off(Broken::Lost);
}

/// A line's writer: opens the connection, then writes whatever requests were queued since its
/// last write, once per wake-up, after letting the requests of the same scheduler turn join.
async fn write_line(line: Arc<Line>, connector: Connector, pooled: Option<Box<InstanceConn>>) {
    let (stream, answered_any) = match pooled.map(|conn| (conn.answered_any(), conn.into_parts())) {
        // An idle pooled connection has nothing buffered (it would not have been pooled).
        Some((answered_any, (stream, rest))) if rest.is_empty() => (Ok(stream), answered_any),
        _ => (connector.connect().await, false),
    };
    let tcp = match stream {
        Ok(InstanceStream::Tcp(tcp)) => tcp,
        Ok(_) => return line.break_off(Broken::Lost),
        Err(err) => return line.break_off(Broken::Unconnected(Arc::new(err))),
    };
    let (read, mut write) = tcp.into_split();
    line.pass_reader(InstanceConn::read_side(read, answered_any));
    let mut out = Vec::with_capacity(4096);
    loop {
        // Woken by the first request queued since the last write, the writer runs after the
        // other tasks already ready: their requests join this write.
        line.wake_writer.notified().await;
        out.clear();
        if !line.take_pending(&mut out) {
            return;
        }
        if !out.is_empty() && !write_out(&line, &mut write, &out).await {
            return line.break_off(Broken::Lost);
        }
    }
}

/// Writes `out` to the line's connection; false when that fails, or when the line closes
/// first: an instance that stopped reading would otherwise hold the writer, and with it the
/// connection, for as long as it lives. (Every request on a closed line was failed over.)
async fn write_out(line: &Line, write: &mut OwnedWriteHalf, out: &[u8]) -> bool {
    let writing = write.write_all(out);
    tokio::pin!(writing);
    let mut woken = false;
    let written = loop {
        tokio::select! {
            written = &mut writing => break written.is_ok(),
            () = line.wake_writer.notified() => {
                if line.is_closed() {
                    return false;
                }
                // A request queued meanwhile: its write follows this one.
                woken = true;
            }
        }
    };
    if woken {
        line.wake_writer.notify_one();
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::proxy::h1::Outgoing;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// Lines of depth 4 to a listener that takes connections and never answers, the instance's
    /// pace already measured quick (a new one starts unmeasured: see
    /// `a_new_instance_gets_one_probe_until_an_answer_shows_it_quick`).
    fn lines() -> (Lines, Connector, TcpListener) {
        let (lines, connector, listener) = unmeasured_lines();
        lines.pace.store(100, Ordering::Relaxed);
        (lines, connector, listener)
    }

    /// The path the tests' requests are for, answered before (see
    /// `a_request_for_a_path_not_yet_answered_goes_alone_on_its_line` for one that was not).
    const ROOT: PathSlot = PathSlot(0);

    /// [`lines`] before any answer measured the instance.
    fn unmeasured_lines() -> (Lines, Connector, TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config::from_toml(&format!(
            "[upstreams.app]\ninstances = [\"{addr}\"]\npipeline = 4\n[[routes]]\nupstream = \"app\"\n"
        ))
        .unwrap();
        let connector = Connector::new(addr, config.upstream("app").unwrap());
        let listener = TcpListener::from_std(listener).unwrap();
        let lines = Lines::new(addr, 4, 1000, Duration::from_secs(60));
        lines.paths[ROOT.0]
            .last_quick
            .store(true, Ordering::Relaxed);
        (lines, connector, listener)
    }

    /// No idle pooled connection: a new line connects.
    fn no_idle() -> Option<Box<InstanceConn>> {
        None
    }

    fn get(out: &mut Vec<u8>) {
        out.extend_from_slice(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n");
    }

    /// A request queued first on a new line: its turn comes as soon as the line connects.
    async fn first_in_line(lines: &Lines, connector: &Connector) -> (Box<InstanceConn>, LineHold) {
        let ticket = lines.enqueue(connector, no_idle, Instant::now(), ROOT, get);
        ticket.turn().await.ok().unwrap()
    }

    /// `lines()` with a first request holding the read side, its answer having shown that the
    /// instance keeps connections open, and the instance known to answer pipelined requests.
    async fn proven() -> (Lines, Connector, TcpListener, Box<InstanceConn>, LineHold) {
        let (lines, connector, listener) = lines();
        lines.verdict.pipelined.store(true, Ordering::Relaxed);
        let (reader, first) = first_in_line(&lines, &connector).await;
        lines.answered(&first, true, http::StatusCode::OK);
        (lines, connector, listener, reader, first)
    }

    /// When `first`, on its line, was queued: requests queued at that instant join its line
    /// however long the test took since (see [`FLOWING_WAIT`]).
    fn queued_at(first: &LineHold) -> Instant {
        first.line.state.lock().unwrap().front_since
    }

    /// `lines()` with a first request holding the read side, its head read by the instance
    /// (the other end of the line, returned) and its answer having shown that the instance
    /// keeps connections open; not yet known to answer pipelined requests.
    async fn first_written() -> (Lines, Connector, TcpStream, Box<InstanceConn>, LineHold) {
        let (lines, connector, listener) = lines();
        let (reader, first) = first_in_line(&lines, &connector).await;
        lines.answered(&first, true, http::StatusCode::OK);
        let (mut instance, _) = listener.accept().await.unwrap();
        heads_read(&mut instance, 1).await;
        (lines, connector, instance, reader, first)
    }

    /// A request of 32 MiB, more than the socket buffers hold while the instance reads nothing.
    fn huge(out: &mut Vec<u8>) {
        out.extend_from_slice(b"GET / HTTP/1.1\r\nx-pad: ");
        out.resize(out.len() + HUGE, b'a');
        out.extend_from_slice(b"\r\n\r\n");
    }
    const HUGE: usize = 32 << 20;

    /// Reads what the instance's end of a line gets, up to `heads` request heads or the
    /// connection's end (within 10 s): the heads and bytes read.
    async fn read_heads(instance: &mut TcpStream, heads: usize) -> (usize, usize) {
        let (mut got, mut bytes, mut tail) = (0, 0, [0u8; 3]);
        let mut buf = vec![0u8; 1 << 16];
        let reading = async {
            while got < heads {
                match tokio::io::AsyncReadExt::read(instance, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut seen = tail.to_vec();
                        seen.extend_from_slice(&buf[..n]);
                        got += seen.windows(4).filter(|w| w == b"\r\n\r\n").count();
                        tail.copy_from_slice(&seen[seen.len() - 3..]);
                        bytes += n;
                    }
                }
            }
        };
        let read_all = tokio::time::timeout(Duration::from_secs(10), reading).await;
        assert!(read_all.is_ok(), "stuck after {got} heads, {bytes} bytes");
        (got, bytes)
    }

    /// A line that breaks while its writer waits on an instance that stopped reading lets its
    /// connection go: the writer does not hold it until the instance reads the rest.
    #[tokio::test]
    async fn a_line_broken_mid_write_closes_its_connection() {
        let (lines, connector, listener) = lines();
        let ticket = lines.enqueue(&connector, no_idle, Instant::now(), ROOT, huge);
        let (reader, hold) = ticket.turn().await.ok().unwrap();
        let (mut instance, _) = listener.accept().await.unwrap();
        // The socket buffers fill and the write waits.
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Given up before its answer: the line breaks.
        drop((reader, hold));
        let (heads, bytes) = read_heads(&mut instance, 1).await;
        assert_eq!(heads, 0, "the whole request went out: {bytes} bytes");
    }

    /// A request queued while the writer waits on a long write goes out after it.
    #[tokio::test]
    async fn a_request_queued_during_a_long_write_follows_it() {
        let (lines, connector, listener, _reader, first) = proven().await;
        let (mut instance, _) = listener.accept().await.unwrap();
        let now = queued_at(&first);
        let _long = lines.enqueue(&connector, no_idle, now, ROOT, huge);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _next = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert_eq!(read_heads(&mut instance, 3).await.0, 3);
    }

    /// A proven line left idle, and when its first request was queued.
    async fn idle_proven() -> (Lines, Connector, TcpListener, Arc<Line>, Instant) {
        let (lines, connector, listener, reader, first) = proven().await;
        let now = queued_at(&first);
        let line = first.line.clone();
        first.hand_on(reader, true);
        (lines, connector, listener, line, now)
    }

    /// Two requests for `path`: the first takes the idle `line`, the second does not queue
    /// behind it.
    fn assert_alone(
        lines: &Lines,
        connector: &Connector,
        (line, now): (&Arc<Line>, Instant),
        path: PathSlot,
    ) -> (Ticket, Ticket) {
        let alone = lines.enqueue(connector, no_idle, now, path, get);
        assert!(Arc::ptr_eq(line, &alone.hold().line));
        let again = lines.enqueue(connector, no_idle, now, path, get);
        assert!(!Arc::ptr_eq(line, &again.hold().line));
        (alone, again)
    }

    /// A request for a path that has not answered yet goes alone on its line: nothing joins
    /// behind it until its answer came; from then on the path is pipelined as any other.
    #[tokio::test]
    async fn a_request_for_a_path_not_yet_answered_goes_alone_on_its_line() {
        let (lines, connector, _listener, line, now) = idle_proven().await;
        let report = PathSlot(1);
        let (alone, again) = assert_alone(&lines, &connector, (&line, now), report);
        let quick = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(!Arc::ptr_eq(&line, &quick.hold().line));
        assert!(!Arc::ptr_eq(&quick.hold().line, &again.hold().line));

        let (reader, hold) = alone.turn().await.ok().unwrap();
        lines.record_answer(report, PaceSample::First, now, now);
        hold.hand_on(reader, true);
        let first = lines.enqueue(&connector, no_idle, now, report, get);
        let behind = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(Arc::ptr_eq(&line, &first.hold().line));
        assert!(Arc::ptr_eq(&line, &behind.hold().line));
    }

    /// A path whose last answer said a length too large to throw away when its client leaves
    /// goes alone too, until a smaller one came.
    #[tokio::test]
    async fn a_request_for_a_path_with_large_answers_goes_alone_on_its_line() {
        let (lines, connector, _listener, line, now) = idle_proven().await;
        let download = PathSlot(1);
        lines.record_answer(download, PaceSample::First, now, now);
        lines.record_length(download, Framing::Length(SKIP_BYTES + 1));
        let (alone, again) = assert_alone(&lines, &connector, (&line, now), download);
        drop(again);
        let (reader, hold) = alone.turn().await.ok().unwrap();
        lines.record_length(download, Framing::Length(SKIP_BYTES));
        hold.hand_on(reader, true);
        let first = lines.enqueue(&connector, no_idle, now, download, get);
        let behind = lines.enqueue(&connector, no_idle, now, download, get);
        assert!(Arc::ptr_eq(&first.hold().line, &behind.hold().line));
    }

    /// A path known slow goes alone too once its pause ended, until an answer shows it quick.
    #[tokio::test]
    async fn a_request_for_a_path_known_slow_goes_alone_on_its_line() {
        let (lines, connector, _listener, line, now) = idle_proven().await;
        let report = PathSlot(1);
        lines.paths[report.0]
            .last_quick
            .store(true, Ordering::Relaxed);
        lines.paths[report.0]
            .slow_answers
            .store(SLOW_ANSWERS - 1, Ordering::Relaxed);
        drop(assert_alone(&lines, &connector, (&line, now), report));

        // So does one whose last answer took long, whatever the others' pace; a quick answer
        // brings it back.
        let (lines, connector, _listener, line, now) = idle_proven().await;
        lines.record_answer(report, PaceSample::First, now, now + LONG_ANSWER);
        let (alone, again) = assert_alone(&lines, &connector, (&line, now), report);
        drop(again);
        let (reader, hold) = alone.turn().await.ok().unwrap();
        lines.record_answer(report, PaceSample::First, now, now);
        hold.hand_on(reader, true);
        let first = lines.enqueue(&connector, no_idle, now, report, get);
        let behind = lines.enqueue(&connector, no_idle, now, report, get);
        assert!(Arc::ptr_eq(&first.hold().line, &behind.hold().line));
    }

    #[tokio::test]
    async fn requests_held_back_go_when_another_line_proved_the_instance() {
        let (lines, connector, mut instance, reader, first) = first_written().await;
        let held = lines.enqueue(&connector, no_idle, queued_at(&first), ROOT, get);
        tokio::task::yield_now().await;
        lines.verdict.pipelined.store(true, Ordering::Relaxed);
        first.hand_on(reader, true);
        let written = tokio::time::timeout(Duration::from_secs(5), heads_read(&mut instance, 1));
        assert!(written.await.is_ok());
        drop(held);
    }

    #[tokio::test]
    async fn until_a_write_of_several_requests_was_answered_no_write_follows_an_unanswered_one() {
        use tokio::io::AsyncReadExt;
        let (lines, connector, mut instance, reader, first) = first_written().await;
        let queued =
            [(); 2].map(|()| lines.enqueue(&connector, no_idle, queued_at(&first), ROOT, get));
        // Held back while the first is unanswered.
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(50), instance.read(&mut byte));
        assert!(early.await.is_err());
        first.hand_on(reader, true);
        heads_read(&mut instance, 2).await;
        let pipelined = || lines.verdict.pipelined.load(Ordering::Relaxed);
        let mut answered = Vec::new();
        for ticket in queued {
            assert!(!pipelined());
            let (reader, hold) = ticket.turn().await.ok().unwrap();
            hold.hand_on(reader, true);
            answered.push(pipelined());
        }
        // Both requests of that write answered: from then on writes follow one another.
        assert_eq!(answered, [false, true]);
        let (reader, first) = first_in_line(&lines, &connector).await;
        let second = lines.enqueue(&connector, no_idle, queued_at(&first), ROOT, get);
        assert!(Arc::ptr_eq(&first.line, &second.hold().line));
        heads_read(&mut instance, 2).await;
        drop((reader, first, second));
    }

    #[tokio::test]
    async fn a_probe_goes_out_at_once_behind_an_unanswered_request() {
        let (lines, connector, mut instance, _reader, first) = first_written().await;
        lines.pace.store(UNMEASURED, Ordering::Relaxed);
        // Not yet known to answer pipelined requests, a line holds a request back while one it
        // wrote is unanswered: but a probe, measuring the instance, goes out behind it now.
        let probe = lines.enqueue(&connector, no_idle, queued_at(&first), ROOT, get);
        assert!(Arc::ptr_eq(&first.line, &probe.hold().line));
        let written = tokio::time::timeout(Duration::from_secs(5), heads_read(&mut instance, 1));
        assert!(written.await.is_ok());
    }

    /// Whether the ticket's line broke before its turn came (within 5 s).
    async fn lost(ticket: Ticket) -> bool {
        let turn = tokio::time::timeout(Duration::from_secs(5), ticket.turn()).await;
        matches!(turn, Ok(Err(Broken::Lost)))
    }

    #[tokio::test]
    async fn after_an_answer_that_closes_the_line_takes_no_one_and_its_queue_goes_elsewhere() {
        let (lines, connector, _listener) = lines();
        let now = Instant::now();
        let (reader, first) = first_in_line(&lines, &connector).await;
        // Unproven, the line takes no second request.
        let aside = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(!Arc::ptr_eq(&first.line, &aside.hold().line));
        lines.answered(&first, true, http::StatusCode::OK);
        let second = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(Arc::ptr_eq(&first.line, &second.hold().line));
        first.hand_on(reader, true);
        let (reader, second) = second.turn().await.ok().unwrap();
        let third = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(Arc::ptr_eq(&second.line, &third.hold().line));
        lines.answered(&second, false, http::StatusCode::OK);
        let fourth = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(!Arc::ptr_eq(&second.line, &fourth.hold().line));
        second.hand_on(reader, true);
        assert!(lost(third).await);
        // A proven line closing later (nginx's keepalive_requests) does not end pipelining.
        assert!(lines.taken());
    }

    #[tokio::test]
    async fn an_instance_closing_a_line_after_its_first_answer_is_not_pipelined_to() {
        let (lines, connector, _listener) = lines();
        let (_reader, first) = first_in_line(&lines, &connector).await;
        assert!(lines.taken());
        lines.answered(&first, false, http::StatusCode::OK);
        assert!(!lines.taken());
    }

    #[tokio::test]
    async fn a_request_given_up_breaks_its_line_and_the_read_side_goes_in_order() {
        let (lines, connector, _listener, reader, first) = proven().await;
        let now = queued_at(&first);
        let second = lines.enqueue(&connector, no_idle, now, ROOT, get);
        let third = lines.enqueue(&connector, no_idle, now, ROOT, get);
        first.hand_on(reader, true);
        let (reader, second) = second.turn().await.ok().unwrap();
        assert_eq!(second.line.load(), 2);
        drop(reader);
        drop(second);
        assert!(lost(third).await);
        assert_eq!(
            lines
                .enqueue(&connector, no_idle, now, ROOT, get)
                .hold()
                .line
                .load(),
            1
        );
    }

    /// `lines()` with a first request reading its answer, and two queued behind it; the
    /// instance's side of the connection.
    async fn three_in_line() -> (Lines, TcpStream, [Ticket; 2], Box<InstanceConn>, LineHold) {
        let (lines, connector, listener, mut reader, first) = proven().await;
        let now = queued_at(&first);
        let queued = [(); 2].map(|()| lines.enqueue(&connector, no_idle, now, ROOT, get));
        let (mut instance, _) = listener.accept().await.unwrap();
        instance.write_all(OK).await.unwrap();
        assert_eq!(status_read(&mut reader).await, 200);
        (lines, instance, queued, reader, first)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

    /// What the instance's side of a line reads until `heads` request heads came.
    async fn heads_read(instance: &mut TcpStream, heads: usize) -> String {
        use tokio::io::AsyncReadExt;
        let mut written = Vec::new();
        while written.windows(4).filter(|w| w == b"\r\n\r\n").count() < heads {
            let mut buf = [0u8; 1024];
            let read = instance.read(&mut buf).await.unwrap();
            assert!(read > 0);
            written.extend_from_slice(&buf[..read]);
        }
        String::from_utf8(written).unwrap()
    }

    /// The status of the answer `reader` reads next, for a GET.
    async fn status_read(reader: &mut InstanceConn) -> http::StatusCode {
        let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
        let head = Outgoing {
            parts: &parts,
            fields: None,
            raw_answer: false,
        };
        let due = Instant::now() + Duration::from_secs(5);
        reader
            .read_answer(head, due, due)
            .await
            .unwrap()
            .head
            .status
    }

    #[tokio::test]
    async fn a_request_given_up_in_the_queue_has_its_answer_thrown_away() {
        let (lines, mut instance, [second, third], reader, first) = three_in_line().await;
        let line = first.line.clone();
        drop(second);
        assert_eq!(
            line.load(),
            3,
            "the abandoned request still counts until its answer"
        );
        first.hand_on(reader, true);
        // A chunked answer, all here: thrown away without waiting for more.
        instance
            .write_all(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3\r\nabc\r\n0\r\n\r\n")
            .await
            .unwrap();
        let (mut reader, third) = third.turn().await.ok().unwrap();
        instance
            .write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(status_read(&mut reader).await, 202);
        assert!(!line.is_closed());
        assert_eq!(line.load(), 1);
        third.hand_on(reader, true);
        assert!(lines.taken());
    }

    /// [`three_in_line`] with the second request given up and `answer` its answer, which
    /// breaks the line: the third request's turn does not come.
    async fn broken_by_abandoned(answer: &[u8]) -> Lines {
        let (lines, mut instance, [second, third], reader, first) = three_in_line().await;
        drop(second);
        first.hand_on(reader, true);
        instance.write_all(answer).await.unwrap();
        assert!(lost(third).await);
        lines
    }

    #[tokio::test]
    async fn an_abandoned_answer_that_closes_the_connection_breaks_the_line() {
        let closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert!(broken_by_abandoned(closing).await.taken());
    }

    #[tokio::test]
    async fn an_abandoned_answer_that_does_not_parse_ends_pipelining_to_the_instance() {
        let misframed = b"HTTP/1.1 200 OK\r\nContent-Length: two\r\n\r\n";
        assert!(!broken_by_abandoned(misframed).await.taken());
    }

    #[tokio::test]
    async fn a_request_given_up_before_it_was_written_is_never_sent() {
        let (lines, connector, listener, _reader, first) = proven().await;
        let now = queued_at(&first);
        let target = |n: u8| {
            move |out: &mut Vec<u8>| {
                out.extend_from_slice(b"GET /");
                out.push(b'0' + n);
                out.extend_from_slice(b" HTTP/1.1\r\nhost: a\r\n\r\n");
            }
        };
        let line = first.line.clone();
        // Queued in one scheduler turn; the writer writes none of them before the next.
        let queued = [2, 3, 4].map(|n| lines.enqueue(&connector, no_idle, now, ROOT, target(n)));
        let [second, third, fourth] = queued;
        drop(third);
        assert_eq!(line.load(), 3);
        let (mut instance, _) = listener.accept().await.unwrap();
        let written = heads_read(&mut instance, 3).await;
        assert!(
            written.contains("GET /2 ")
                && written.contains("GET /4 ")
                && !written.contains("GET /3 "),
            "{written}"
        );
        drop((second, fourth));
    }

    #[tokio::test]
    async fn a_request_given_the_read_side_and_up_before_it_was_written_passes_it_on() {
        let (lines, connector, _listener, reader, first) = proven().await;
        let now = queued_at(&first);
        first.hand_on(reader, true);
        let second = lines.enqueue(&connector, no_idle, now, ROOT, get);
        let third = lines.enqueue(&connector, no_idle, now, ROOT, get);
        drop(second);
        let turn = tokio::time::timeout(Duration::from_secs(5), third.turn()).await;
        assert!(matches!(turn, Ok(Ok(_))));
    }

    #[tokio::test]
    async fn a_line_that_breaks_lets_go_of_its_abandoned_requests() {
        let (lines, connector, listener, _reader, first) = proven().await;
        let line = first.line.clone();
        let second = lines.enqueue(&connector, no_idle, queued_at(&first), ROOT, get);
        // Written (the instance has read it), then given up: abandoned.
        let (mut instance, _) = listener.accept().await.unwrap();
        heads_read(&mut instance, 2).await;
        drop(second);
        assert_eq!(line.load(), 2);
        // Its writer ends once nothing is left on the closed line.
        drop(first);
        assert!(line.is_closed());
        assert_eq!(line.load(), 0);
    }

    /// The request queued behind a streaming answer and not yet written (held back here: the
    /// instance has not answered a pipelined write yet) leaves the line, which goes on.
    #[tokio::test]
    async fn an_answer_streaming_its_body_sends_the_unwritten_queue_behind_it_elsewhere() {
        let (lines, connector, _listener) = lines();
        let now = Instant::now();
        let (_reader, mut first) = first_in_line(&lines, &connector).await;
        lines.answered(&first, true, http::StatusCode::OK);
        let second = lines.enqueue(&connector, no_idle, now, ROOT, get);
        first.release_queue();
        let turn = tokio::time::timeout(Duration::from_secs(5), second.turn()).await;
        assert!(matches!(turn, Ok(Err(Broken::Unsent))));
        assert!(!first.line.is_closed());
        assert_eq!(first.line.load(), 1);
        let (lines, connector, _listener) = self::lines();
        let (_reader, mut first) = first_in_line(&lines, &connector).await;
        lines.answered(&first, true, http::StatusCode::OK);
        first.release_queue();
        // Nothing was queued: the line lives on, but no one joins it while the body streams.
        let second = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(!Arc::ptr_eq(&first.line, &second.hold().line));
        assert!(!first.line.is_closed());
    }

    /// A request written behind a streaming answer waits for it a while (sent again, it would
    /// run twice), then goes elsewhere, its answer to be thrown away when it comes.
    #[tokio::test]
    async fn a_written_request_behind_a_streaming_answer_waits_a_grace_then_goes_elsewhere() {
        let (lines, connector, _listener) = lines();
        let now = Instant::now();
        let (_reader, mut first) = first_in_line(&lines, &connector).await;
        lines.answered(&first, true, http::StatusCode::OK);
        // Pipelining proven: the second is written at once.
        lines.verdict.pipelined.store(true, Ordering::Relaxed);
        let second = lines.enqueue(&connector, no_idle, now, ROOT, get);
        let line = first.line.clone();
        for _ in 0..100 {
            if line.state.lock().unwrap().unwritten.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            line.state.lock().unwrap().unwritten.is_empty(),
            "never written"
        );
        let started = Instant::now();
        first.release_queue();
        let turn = tokio::time::timeout(Duration::from_secs(5), second.turn()).await;
        assert!(matches!(turn, Ok(Err(Broken::Overtaken))));
        assert!(started.elapsed() >= STREAMING_GRACE);
        // The line goes on; the overtaken request still counts on it until its answer is read
        // and thrown away.
        assert!(!line.is_closed());
        assert_eq!(line.load(), 2);
        assert!(line.state.lock().unwrap().turns[0].abandoned);
    }

    #[tokio::test]
    async fn requests_queue_behind_a_slow_instance_only_to_measure_it_again() {
        let (lines, connector, _listener, reader, first) = proven().await;
        let now = queued_at(&first);
        let second = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(Arc::ptr_eq(&first.line, &second.hold().line));
        // The first on a line, or an answer there at its turn, tells no slowness.
        assert_eq!(first.pace_sample(&reader), PaceSample::First);
        let answered = |sample, came| lines.record_answer(PathSlot::of("/"), sample, now, came);
        answered(PaceSample::First, now + Duration::from_secs(1));
        answered(PaceSample::Ready, now);
        let third = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(Arc::ptr_eq(&first.line, &third.hold().line));
        first.hand_on(reader, true);
        let (reader, second) = second.turn().await.ok().unwrap();
        let PaceSample::From(turn) = second.pace_sample(&reader) else {
            panic!("the second request waited behind the first, its answer not yet here");
        };
        // Its answer took 100 ms after its turn came: no request queues behind another (each
        // one dropped here breaks the line it opened)...
        let came = turn + Duration::from_millis(100);
        answered(PaceSample::From(turn), came);
        for _ in 0..10 {
            let apart = lines.enqueue(&connector, no_idle, now, ROOT, get);
            assert!(!Arc::ptr_eq(&second.line, &apart.hold().line));
        }
        // ... but for one per probe interval, which measures it again (a request first on its
        // line does not: it measures nothing): 64 answers' time at its pace (12.6 ms).
        let pace = lines.pace.load(Ordering::Relaxed);
        assert!(probe_interval(pace) > PROBE_INTERVAL);
        let early = came + PROBE_INTERVAL;
        let front = lines.enqueue(&connector, no_idle, early, ROOT, get);
        let apart = lines.enqueue(&connector, no_idle, early, ROOT, get);
        assert!(!Arc::ptr_eq(&front.hold().line, &apart.hold().line));
        let probe_time = came + probe_interval(pace);
        let front = lines.enqueue(&connector, no_idle, probe_time, ROOT, get);
        let probe = lines.enqueue(&connector, no_idle, probe_time, ROOT, get);
        assert!(Arc::ptr_eq(&front.hold().line, &probe.hold().line));
        let apart = lines.enqueue(&connector, no_idle, probe_time, ROOT, get);
        assert!(!Arc::ptr_eq(&front.hold().line, &apart.hold().line));
    }

    #[tokio::test]
    async fn a_new_instance_gets_one_probe_until_an_answer_shows_it_quick() {
        let (lines, connector, _listener) = unmeasured_lines();
        let (_reader, first) = first_in_line(&lines, &connector).await;
        lines.answered(&first, true, http::StatusCode::OK);
        let now = queued_at(&first);
        // A slow answer of a request first on its line measures no pace, only the instance's
        // whole latency.
        let answered =
            |took| lines.record_answer(PathSlot::of("/"), PaceSample::First, now, now + took);
        answered(Duration::from_millis(300));
        let probe = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(Arc::ptr_eq(&first.line, &probe.hold().line));
        let apart = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(!Arc::ptr_eq(&first.line, &apart.hold().line));
        // While the probe is unanswered, no other request probes (with the next wave of a slow
        // instance's clients, say) for twice the instance's latency...
        let later = now + Duration::from_millis(500);
        let front = lines.enqueue(&connector, no_idle, later, ROOT, get);
        let apart = lines.enqueue(&connector, no_idle, later, ROOT, get);
        assert!(!Arc::ptr_eq(&front.hold().line, &apart.hold().line));
        // ... after which a probe whose answer never came is given up on.
        let given_up = now + Duration::from_millis(700);
        let front = lines.enqueue(&connector, no_idle, given_up, ROOT, get);
        let probe = lines.enqueue(&connector, no_idle, given_up, ROOT, get);
        assert!(Arc::ptr_eq(&front.hold().line, &probe.hold().line));
        // A quick answer of a request first on its line shows the instance quick.
        answered(Duration::from_micros(200));
        let joining = lines.enqueue(&connector, no_idle, now, ROOT, get);
        assert!(Arc::ptr_eq(&first.line, &joining.hold().line));
    }

    #[test]
    fn the_pace_is_set_by_a_quick_answer_and_averaged_from_answers_behind_another() {
        // Unmeasured, one quick answer sets it, first on its line or not; slow, one quick
        // answer behind another does.
        assert_eq!(pace_after(UNMEASURED, 300, true), 300);
        assert_eq!(pace_after(UNMEASURED, 300, false), 300);
        assert_eq!(pace_after(40_000, 300, false), 300);
        // An answer first on its line is the instance's whole latency: slow, it tells nothing;
        // quick, it is averaged into a slow pace, so that a slow instance's occasional quick
        // answer (a 404, say) does not make it quick, and a run of them does.
        assert_eq!(pace_after(UNMEASURED, 3_000, true), UNMEASURED);
        assert_eq!(pace_after(200, 3_000, true), 200);
        assert_eq!(pace_after(200, 100, true), 200);
        assert_eq!(pace_after(40_000, 300, true), next_pace(40_000, 300));
        let after_404s = (0..10).fold(300_000, |pace, _| pace_after(pace, 100, true));
        assert!(after_404s >= PACE_LIMIT_US);
        let after_quick_ones = (0..8).fold(800, |pace, _| pace_after(pace, 300, true));
        assert!(after_quick_ones < PACE_LIMIT_US);
        // Behind another, the first answer sets it and the others are averaged.
        assert_eq!(pace_after(UNMEASURED, 3_000, false), 3_000);
        assert_eq!(pace_after(200, 3_000, false), next_pace(200, 3_000));
        assert_eq!(pace_after(3_000, 600, false), next_pace(3_000, 600));
    }

    #[test]
    fn a_probe_is_awaited_for_twice_the_instance_s_latency_within_bounds() {
        assert_eq!(probe_hold(0), PROBE_INTERVAL);
        assert_eq!(probe_hold(300_000), Duration::from_millis(600));
        assert_eq!(probe_hold(60_000_000), PROBE_HOLD);
    }

    #[test]
    fn probes_of_a_slow_instance_are_64_of_its_answers_apart() {
        assert_eq!(probe_interval(UNMEASURED), PROBE_INTERVAL);
        assert_eq!(probe_interval(600), PROBE_INTERVAL);
        assert_eq!(probe_interval(300_000), Duration::from_millis(19_200));
    }

    #[test]
    fn the_pace_follows_answers_weighting_each_an_eighth() {
        assert_eq!(next_pace(0, 800), 100);
        assert_eq!(next_pace(800, 800), 800);
        assert_eq!(next_pace(800, 0), 700);
    }

    #[tokio::test]
    async fn a_path_slow_four_times_in_a_row_beside_the_others_is_paused_for_a_while() {
        // Beside quick paths (all paths together at 100 µs), answers of 2 ms or more count;
        // four in a row pause the path; a quick one starts the count again.
        let count = |samples: &[u32]| {
            samples
                .iter()
                .try_fold(0, |slow, &sample| next_slow_answers(slow, sample, 100))
        };
        assert_eq!(count(&[50_000; 3]), Some(3));
        assert_eq!(count(&[50_000; 4]), None);
        assert_eq!(count(&[2_000; 4]), None);
        assert_eq!(count(&[1_900; 4]), Some(0));
        assert_eq!(count(&[50_000, 50_000, 50_000, 100, 50_000]), Some(1));
        // Every path slow at once (a stall, queueing, or the one path of an instance): the
        // common pace catches up before four in a row.
        let mut all = 100;
        let stalled = (0..100).try_fold(0, |slow, _| {
            all = next_pace(all, 20_000);
            next_slow_answers(slow, 20_000, all)
        });
        assert_eq!(stalled, Some(0));

        let (lines, _, _) = lines();
        let (slow, quick) = (PathSlot::of("/report"), PathSlot::of("/"));
        assert_ne!(slow, quick);
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let quick_answers = |ms| {
            for _ in 0..40 {
                lines.record_answer(quick, PaceSample::Ready, at(ms), at(ms));
            }
        };
        // Counted from the queueing for the first on its line, from the turn behind another:
        // four answers of 50 ms among quick ones make the path slow.
        for ms in [0, 50, 100] {
            quick_answers(ms);
            lines.record_answer(slow, PaceSample::First, at(ms), at(ms + 50));
        }
        quick_answers(150);
        assert!(lines.pipelines(slow, at(150)));
        lines.record_answer(slow, PaceSample::From(at(150)), at(100), at(200));
        lines.record_answer(quick, PaceSample::From(at(200)), at(100), at(201));
        assert!(!lines.pipelines(slow, at(201)));
        assert!(lines.pipelines(quick, at(201)));
        let resumes = 200 + SLOW_PATH_PAUSE.as_millis() as u64;
        assert!(!lines.pipelines(slow, at(resumes - 5)));
        assert!(lines.pipelines(slow, at(resumes + 5)));
        // Once back, one slow answer pauses it again.
        quick_answers(resumes + 5);
        let back = at(resumes + 5);
        lines.record_answer(
            slow,
            PaceSample::First,
            back,
            back + Duration::from_millis(50),
        );
        assert!(!lines.pipelines(slow, back + Duration::from_millis(51)));
    }

    /// A pooled connection that carried more requests than a limit learned since it was pooled
    /// is closed rather than made a line, which would be spent before its first request.
    #[tokio::test]
    async fn a_pooled_connection_past_a_learned_limit_is_not_made_a_line() {
        let (lines, connector, listener) = lines();
        lines.verdict.limit.store(2, Ordering::Relaxed);
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let pooled = Box::new(InstanceConn::new(InstanceStream::Tcp(stream))).with_requests(5);
        let ticket = lines.enqueue(&connector, || Some(pooled), Instant::now(), ROOT, get);
        // The line connects afresh: its first request is the connection's first.
        assert_eq!(ticket.hold().id, 0);
    }

    /// An idle line a limit learned since its last request left spent is closed when next
    /// looked at, not left open until the idle sweep.
    #[tokio::test]
    async fn an_idle_line_spent_by_a_learned_limit_is_closed() {
        let (lines, connector, _listener) = lines();
        let (reader, first) = first_in_line(&lines, &connector).await;
        lines.answered(&first, true, http::StatusCode::OK);
        let line = first.line.clone();
        first.hand_on(reader, true);
        lines.verdict.limit.store(1, Ordering::Relaxed);
        let next = lines.enqueue(&connector, no_idle, Instant::now(), ROOT, get);
        assert!(!Arc::ptr_eq(&line, &next.hold().line));
        assert!(line.is_closed());
    }

    /// An idle line the instance closed is closed by the idle sweep at once, not held
    /// half-closed until the idle timeout.
    #[tokio::test]
    async fn the_idle_sweep_closes_a_line_the_instance_closed() {
        let (lines, connector, listener) = lines();
        let (reader, first) = first_in_line(&lines, &connector).await;
        let (instance_end, _) = listener.accept().await.unwrap();
        lines.answered(&first, true, http::StatusCode::OK);
        let line = first.line.clone();
        first.hand_on(reader, true);
        lines.close_idle(Instant::now(), 1);
        assert!(!line.is_closed());
        drop(instance_end);
        tokio::time::sleep(Duration::from_millis(50)).await;
        lines.close_idle(Instant::now(), 1);
        assert!(line.is_closed());
    }

    /// Idle lines past what `keepalive` leaves are closed by the sweep, the longest idle first,
    /// as the pool keeps its warmest connections.
    #[tokio::test]
    async fn the_idle_sweep_keeps_no_more_idle_lines_than_keepalive_leaves() {
        let (lines, connector, _listener) = lines();
        // Unproven, the busy first line takes no second request: another line opens.
        let (first_reader, first) = first_in_line(&lines, &connector).await;
        let (second_reader, second) = first_in_line(&lines, &connector).await;
        let (older, younger) = (first.line.clone(), second.line.clone());
        assert!(!Arc::ptr_eq(&older, &younger));
        lines.answered(&first, true, http::StatusCode::OK);
        first.hand_on(first_reader, true);
        tokio::time::sleep(Duration::from_millis(5)).await;
        lines.answered(&second, true, http::StatusCode::OK);
        second.hand_on(second_reader, true);
        assert_eq!(lines.idle_count(), 2);
        lines.close_idle(Instant::now(), 2);
        assert_eq!(lines.idle_count(), 2);
        lines.close_idle(Instant::now(), 1);
        assert!(older.is_closed() && !younger.is_closed());
        lines.close_idle(Instant::now(), 0);
        assert!(younger.is_closed());
    }

    /// The instance closes a line on a pooled connection that carried 4 requests, answering its
    /// 5th with `status` and `Connection: close`, with another request queued behind it when
    /// `behind`.
    async fn closed_after_five(
        lines: &Lines,
        connector: &Connector,
        status: http::StatusCode,
        behind: bool,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let pooled = Box::new(InstanceConn::new(InstanceStream::Tcp(stream))).with_requests(4);
        let now = Instant::now();
        let ticket = lines.enqueue(connector, || Some(pooled), now, ROOT, get);
        let queued = behind.then(|| lines.enqueue(connector, no_idle, now, ROOT, get));
        let (_reader, fifth) = ticket.turn().await.ok().unwrap();
        assert_eq!(fifth.id + 1, 5);
        if let Some(queued) = &queued {
            assert!(Arc::ptr_eq(&fifth.line, &queued.hold().line));
        }
        lines.answered(&fifth, false, status);
    }

    /// Two lines in a row closed by the instance after 5 requests, each with an ordinary answer
    /// and a request queued behind it, make 5 the most a line takes; a close with nothing
    /// queued behind, or with an error answer, teaches nothing.
    #[tokio::test]
    async fn lines_learn_an_instance_s_own_limit_of_requests_per_connection() {
        let (lines, connector, _listener) = lines();
        let (ok, error) = (http::StatusCode::OK, http::StatusCode::SERVICE_UNAVAILABLE);
        closed_after_five(&lines, &connector, ok, false).await;
        closed_after_five(&lines, &connector, ok, false).await;
        assert_eq!(lines.verdict.limit(), 1000, "nothing was queued behind");
        closed_after_five(&lines, &connector, error, true).await;
        closed_after_five(&lines, &connector, error, true).await;
        assert_eq!(lines.verdict.limit(), 1000, "error answers");
        closed_after_five(&lines, &connector, ok, true).await;
        assert_eq!(lines.verdict.limit(), 1000, "one close");
        closed_after_five(&lines, &connector, ok, true).await;
        assert_eq!(lines.verdict.limit(), 5);
    }

    #[test]
    fn an_instance_closing_lines_twice_after_as_many_requests_shows_its_limit() {
        // One close teaches nothing; the same count twice in a row is the instance's limit.
        assert_eq!(learned_limit(1000, 0, 100), 1000);
        assert_eq!(learned_limit(1000, 100, 100), 100);
        assert_eq!(learned_limit(1000, 37, 100), 1000);
        // Never above the limit configured; a close after the first request shows nothing.
        assert_eq!(learned_limit(50, 100, 100), 50);
        assert_eq!(learned_limit(1000, 1, 1), 1000);
    }

    #[test]
    fn a_request_joins_an_empty_line_or_a_proven_one_with_room_that_flows() {
        let busy = LineView {
            load: 3,
            proven: true,
            paced: true,
            waited: Duration::from_micros(300),
            streaming: false,
            lonely: false,
            spent: false,
        };
        assert!(joinable(busy, 4));
        assert!(!joinable(LineView { load: 4, ..busy }, 4));
        assert!(!joinable(
            LineView {
                proven: false,
                ..busy
            },
            4
        ));
        assert!(!joinable(
            LineView {
                streaming: true,
                ..busy
            },
            4
        ));
        assert!(!joinable(
            LineView {
                load: 1,
                lonely: true,
                ..busy
            },
            4
        ));
        assert!(!joinable(
            LineView {
                paced: false,
                ..busy
            },
            4
        ));
        assert!(!joinable(
            LineView {
                waited: FLOWING_WAIT,
                ..busy
            },
            4
        ));
        let empty = LineView {
            load: 0,
            proven: false,
            paced: false,
            waited: Duration::from_secs(5),
            streaming: false,
            lonely: false,
            spent: false,
        };
        assert!(joinable(empty, 4));
        assert!(!joinable(
            LineView {
                spent: true,
                ..empty
            },
            4
        ));
        assert!(!joinable(
            LineView {
                spent: true,
                ..busy
            },
            4
        ));
    }

    /// A request given up (its client left) after its line broke, before its task saw the break,
    /// is taken out as never written: the closed line's writer, parked with that request still
    /// counted, must still end and let go of the connection.
    #[tokio::test]
    async fn a_request_dropped_unsent_on_a_broken_line_lets_the_writer_end() {
        use tokio::io::AsyncReadExt;
        let (lines, connector, mut instance, reader, first) = first_written().await;
        // Held back: the first is unanswered and the instance not yet known to answer
        // pipelined requests.
        let second = lines.enqueue(&connector, no_idle, queued_at(&first), ROOT, get);
        assert!(Arc::ptr_eq(&first.line, &second.hold().line));
        let line = first.line.clone();
        // The first answer closes the connection: the line breaks at its end.
        lines.answered(&first, false, http::StatusCode::OK);
        first.hand_on(reader, false);
        // The writer sees the closed line with the second request still counted, and waits.
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The second's client leaves before its task saw the break.
        drop(second);
        assert!(line.is_closed());
        assert_eq!(line.load(), 0);
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(2), instance.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "the closed line's writer still holds the connection open: {read:?}"
        );
    }

    /// Until the instance answered a whole write of several, an answer must not be taken for
    /// that of a request it may have dropped. A write of two (A, B) the instance reads at once
    /// and answers only the first of (a server dropping pipelined requests); the pace turns
    /// slow (a slow answer on another line, or `forget_pace`), and the next request, a probe,
    /// joins behind B within `FLOWING_WAIT`: written at once, its answer is read as B's.
    #[tokio::test]
    async fn a_probe_is_not_written_behind_a_request_the_instance_may_have_dropped() {
        let (lines, connector, listener) = lines();
        lines.verdict.proven.store(true, Ordering::Relaxed);
        let now = Instant::now();
        let target = |n: u8| {
            move |out: &mut Vec<u8>| {
                out.extend_from_slice(b"GET /");
                out.push(b'0' + n);
                out.extend_from_slice(b" HTTP/1.1\r\nhost: a\r\n\r\n");
            }
        };
        // One scheduler turn: one write of two.
        let a = lines.enqueue(&connector, no_idle, now, ROOT, target(1));
        let b = lines.enqueue(&connector, no_idle, now, ROOT, target(2));
        assert!(Arc::ptr_eq(&a.hold().line, &b.hold().line));
        let (mut instance, _) = listener.accept().await.unwrap();
        let written = heads_read(&mut instance, 2).await;
        assert!(
            written.contains("GET /1 ") && written.contains("GET /2 "),
            "{written}"
        );
        // The instance answers A and drops B. Meanwhile the pace turned slow.
        lines.pace.store(UNMEASURED, Ordering::Relaxed);
        let c = lines.enqueue(&connector, no_idle, now, ROOT, target(3));
        assert!(Arc::ptr_eq(&a.hold().line, &c.hold().line));
        // Written now, C's answer would follow A's and be read as B's.
        let early = tokio::time::timeout(Duration::from_millis(200), heads_read(&mut instance, 1));
        let written = early.await;
        assert!(
            written.is_err(),
            "C went out behind unanswered B: {written:?}"
        );
        drop((a, b, c));
    }
}
