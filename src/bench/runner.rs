//! The load itself: one task per connection, each doing its own exchanges in place (HTTP/1.1
//! through `h1`, HTTP/2 by polling a hyper connection in the same task, so no hand-off to
//! another task per request), keeping its own tally, and reconnecting when the server closes
//! or breaks the connection. A request is sent again only when it provably never went out.

use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout_at, Instant};

use super::h1::{self, Http1};
use super::report::{ErrorKind, Tally};
use super::schedule::{departure, Departure, Limit, Schedule};
use super::target::{Origin, Template};

/// Measured requests are published for the progress bar in batches of this many, or after
/// [`PROGRESS_EVERY`], whichever comes first (a slow server's few requests show too).
const PROGRESS_BATCH: u64 = 64;
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// The longest the clock waits for every connection to open. Connections are opened before
/// it starts, so their set-up is not charged to the first requests; but a server that does
/// not accept (its backlog full) must not hold the run past its time. A connection still
/// opening when the clock starts goes on opening, its first request timed from the start, as
/// wrk's clock runs while it connects.
const CONNECT_PHASE: Duration = Duration::from_secs(1);

/// How late tokio's timer may wake a sleep by its own design (it keeps millisecond slots).
const TIMER_GRANULARITY: Duration = Duration::from_millis(1);

/// A validated run: what to send, where, how much and how fast.
#[derive(Debug, Clone)]
pub struct Plan {
    pub templates: Vec<Template>,
    pub origins: Vec<Origin>,
    pub connections: usize,
    pub limit: Limit,
    /// Requests per second for an open loop; `None` for a closed loop.
    pub rate: Option<f64>,
    pub timeout: Duration,
    pub warmup: Duration,
    pub http2: bool,
}

/// The instants every connection works against, fixed once all connections are up.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    measure_start: Instant,
}

/// When the run ends for every connection: the end of a timed run, or the moment it was
/// stopped (Ctrl-C). Requests unanswered or unsent then are cut off. Read on every request, so
/// it is atomics, not a lock: nanoseconds after the start, and a waker per connection for a
/// stop that comes while a request is out.
struct Cut {
    /// `u64::MAX` while neither the end nor a stop is known.
    after_start_ns: AtomicU64,
    stopped: AtomicBool,
    wakers: Box<[AtomicWaker]>,
}

impl Cut {
    fn at(&self, clock: &Clock) -> Option<Instant> {
        match self.after_start_ns.load(Ordering::Acquire) {
            u64::MAX => None,
            ns => Some(clock.start + Duration::from_nanos(ns)),
        }
    }

    /// Moves the cut to `at` (after `start`) when that is sooner.
    fn bring_to(&self, start: Instant, at: Instant) {
        let ns = u64::try_from(at.saturating_duration_since(start).as_nanos()).unwrap_or(u64::MAX);
        self.after_start_ns.fetch_min(ns, Ordering::AcqRel);
    }

    /// The run is stopped now: every connection's request out is cut at once.
    fn stop(&self, start: Instant) {
        self.bring_to(start, Instant::now());
        self.stopped.store(true, Ordering::Release);
        for waker in &self.wakers {
            waker.wake();
        }
    }

    /// Completes once the run is stopped; connection `index` registers its waker.
    fn stopped(&self, index: usize) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.stopped.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.wakers[index].register(cx.waker());
            if self.stopped.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

/// State shared by the connections: only what must be global.
struct Shared {
    plan: Plan,
    schedule: Option<Schedule>,
    /// Closed loop: measured requests claimed so far, so a count is exact and request i goes to
    /// URL i mod n.
    claimed: AtomicU64,
    /// Completed measured requests, published in batches, for the progress bar.
    completed: AtomicU64,
    cut: Cut,
}

/// A finished run: the merged tally and when the measured window ended.
pub struct Outcome {
    pub tally: Tally,
    pub elapsed: Duration,
    /// Ended by the stop (Ctrl-C), not by its count or time.
    pub interrupted: bool,
}

/// Live counters a progress display may read while the run goes on.
#[derive(Clone)]
pub struct Progress {
    shared: Arc<Shared>,
    clock: watch::Receiver<Option<Clock>>,
}

impl Progress {
    /// Completed requests so far (published in batches) and time since the start, once started.
    pub fn snapshot(&self) -> (u64, Option<Duration>) {
        let completed = self.shared.completed.load(Ordering::Relaxed);
        let since = self.clock.borrow().map(|clock| clock.start.elapsed());
        (completed, since)
    }
}

/// Starts every connection, waits for them to connect (at most [`CONNECT_PHASE`]), releases
/// them together and collects their tallies. `on_start` gets a [`Progress`] handle before the
/// load begins; when `stop` completes (Ctrl-C), the run ends there as a timed run ends at its
/// deadline, also while connections are still opening.
pub async fn run(
    plan: Plan,
    on_start: impl FnOnce(Progress),
    stop: impl std::future::Future<Output = ()>,
) -> Outcome {
    let schedule = plan
        .rate
        .map(|rate| Schedule::new(rate, plan.connections as u64, plan.warmup, plan.limit));
    let shared = Arc::new(Shared {
        schedule,
        claimed: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        cut: Cut {
            after_start_ns: AtomicU64::new(u64::MAX),
            stopped: AtomicBool::new(false),
            wakers: (0..plan.connections).map(|_| AtomicWaker::new()).collect(),
        },
        plan,
    });
    let (clock_tx, clock_rx) = watch::channel(None);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(shared.plan.connections);
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..shared.plan.connections {
        let worker = Worker::new(index, shared.clone());
        let clock = clock_rx.clone();
        let ready = ready_tx.clone();
        tasks.spawn(worker.run(clock, ready));
    }
    drop(ready_tx);
    let mut stop = pin!(stop);
    let mut stopped = false;
    let connect_phase = sleep(CONNECT_PHASE);
    let mut connect_phase = pin!(connect_phase);
    let mut opening = shared.plan.connections;
    while opening > 0 {
        tokio::select! {
            ready = ready_rx.recv() => match ready {
                Some(()) => opening -= 1,
                None => break,
            },
            () = &mut connect_phase => break,
            () = &mut stop => {
                stopped = true;
                break;
            }
        }
    }
    let start = Instant::now();
    let measure_start = start + shared.plan.warmup;
    let deadline = match shared.plan.limit {
        Limit::Time(duration) => Some(measure_start + duration),
        Limit::Count(_) => None,
    };
    on_start(Progress {
        shared: shared.clone(),
        clock: clock_rx.clone(),
    });
    if let Some(deadline) = deadline {
        shared.cut.bring_to(start, deadline);
    }
    if stopped {
        shared.cut.stop(start);
    }
    let _ = clock_tx.send(Some(Clock {
        start,
        measure_start,
    }));
    let mut tally = Tally::default();
    let mut last_done = measure_start;
    loop {
        let joined = tokio::select! {
            joined = tasks.join_next() => joined,
            () = &mut stop, if !stopped => {
                stopped = true;
                shared.cut.stop(start);
                continue;
            }
        };
        let Some(joined) = joined else { break };
        // A worker only ends by returning its tally; a panic would be a bug worth seeing.
        let (worker_tally, done) = joined.expect("a bench connection task panicked");
        tally.merge(&worker_tally);
        last_done = last_done.max(done);
    }
    // A cut run lasted until its cut, however soon its connections then stopped.
    let clock = Clock {
        start,
        measure_start,
    };
    // A count-limited open-loop run lasted at least its plan, however soon its last answer came.
    let planned_end = shared
        .schedule
        .map(|schedule| start + schedule.planned_end());
    let end = shared
        .cut
        .at(&clock)
        .unwrap_or_else(|| planned_end.map_or(last_done, |planned| last_done.max(planned)));
    Outcome {
        tally,
        elapsed: end.saturating_duration_since(measure_start),
        interrupted: stopped,
    }
}

/// Bytes moved by one worker's connections, kept across reconnects.
#[derive(Default)]
pub struct ByteCounts {
    read: AtomicU64,
    written: AtomicU64,
}

impl ByteCounts {
    /// One writer (the worker's own task), so a load and a store are enough.
    fn bump(counter: &AtomicU64, by: usize) {
        counter.store(
            counter.load(Ordering::Relaxed) + by as u64,
            Ordering::Relaxed,
        );
    }

    pub fn add_read(&self, by: usize) {
        ByteCounts::bump(&self.read, by);
    }

    pub fn add_written(&self, by: usize) {
        ByteCounts::bump(&self.written, by);
    }
}

/// A TCP stream that counts the bytes hyper moves over it (HTTP/2), for the transfer figures.
struct CountedStream {
    inner: TcpStream,
    counts: Arc<ByteCounts>,
}

impl CountedStream {
    fn wrote(&self, result: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = result {
            self.counts.add_written(n);
        }
        result
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.counts.add_read(buf.filled().len() - before);
        result
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            ByteCounts::bump(&this.counts.written, n);
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

type Io = TokioIo<CountedStream>;
type Body = Full<Bytes>;

/// An HTTP/2 client connection: hyper's sending half and the half that moves its bytes,
/// polled by the task that sends.
struct Http2 {
    sender: http2::SendRequest<Body>,
    /// Dropped once done (the server closed): requests it had not sent then come back.
    driver: Option<Pin<Box<http2::Connection<Io, Body, TokioExecutor>>>>,
}

enum Protocol {
    Http1(Http1),
    Http2(Http2),
}

/// One live connection of a worker.
struct Connection {
    protocol: Protocol,
    /// Requests answered on it: a connection that closes before its first answer is an error,
    /// not a keep-alive that ran out.
    answered: u64,
}

/// The result of one attempt on a connection.
enum Step {
    Answered {
        status: u16,
        keep_alive: bool,
    },
    /// The server had closed the connection before the request went out (seen before the
    /// write, or the write refused): reconnect and send it again.
    Unsent,
    Failed(ErrorKind),
}

impl Connection {
    async fn open(
        origin: &Origin,
        http2: bool,
        counts: &Arc<ByteCounts>,
    ) -> Result<Connection, ErrorKind> {
        let stream = TcpStream::connect(origin.addr)
            .await
            .map_err(|err| connect_error(&err))?;
        // Latency is the point of measuring: never let Nagle hold a request back.
        stream.set_nodelay(true).map_err(|_| ErrorKind::Connect)?;
        let protocol = if http2 {
            let io = TokioIo::new(CountedStream {
                inner: stream,
                counts: counts.clone(),
            });
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|err| classify(&err))?;
            Protocol::Http2(Http2 {
                sender,
                driver: Some(Box::pin(conn)),
            })
        } else {
            Protocol::Http1(Http1::new(stream, counts.clone()))
        };
        Ok(Connection {
            protocol,
            answered: 0,
        })
    }

    /// Sends one request and reads its whole answer.
    async fn exchange(&mut self, template: &Template) -> Step {
        match &mut self.protocol {
            Protocol::Http1(conn) => {
                match conn.exchange(template.http1(), template.is_head()).await {
                    Ok(answer) => Step::Answered {
                        status: answer.status,
                        keep_alive: answer.keep_alive,
                    },
                    Err(h1::Failure::Unsent) => Step::Unsent,
                    Err(h1::Failure::Error(kind)) => Step::Failed(kind),
                }
            }
            Protocol::Http2(conn) => conn.exchange(template).await,
        }
    }
}

impl Http2 {
    /// Runs the exchange while polling the connection's driver in the same task. Once the
    /// driver is done (the server closed), it is dropped: a request it had not sent comes back
    /// unsent, to go again on a new connection, and an answer that came before the close,
    /// still being handed over (hyper does it from a task of its own), gets
    /// [`CLOSE_HANDOVER`] to arrive; so a graceful GOAWAY loses no answer. A request the
    /// server refused unprocessed goes again too.
    async fn exchange(&mut self, template: &Template) -> Step {
        let Http2 { sender, driver } = self;
        let mut work = pin!(async move {
            if sender.ready().await.is_err() {
                return Step::Unsent;
            }
            match sender.try_send_request(template.http2()).await {
                Ok(response) => read_to_end(response).await,
                Err(err) if err.message().is_some() => Step::Unsent,
                Err(err) if refused_unprocessed(err.error()) => Step::Unsent,
                Err(err) => Step::Failed(classify(err.error())),
            }
        });
        if let Some(running) = driver {
            tokio::select! {
                biased;
                out = &mut work => return out,
                ended = running.as_mut() => {
                    if let Err(err) = &ended {
                        say_if_not_http2(err);
                    }
                    *driver = None;
                }
            }
        }
        tokio::time::timeout(CLOSE_HANDOVER, work)
            .await
            .unwrap_or(Step::Failed(ErrorKind::Reset))
    }
}

/// Says once on stderr that a server's bytes were not HTTP/2 (the h2 codec found them
/// malformed): `--http2` speaks HTTP/2 from the first byte (prior knowledge), which a server
/// that only speaks HTTP/1.1 cannot read. Its requests count as errors, as they should; this
/// says why.
fn say_if_not_http2(err: &hyper::Error) {
    let malformed = crate::proxy::h2::h2_cause(err).is_some_and(|h2| {
        h2.is_go_away()
            && h2.is_library()
            && matches!(
                h2.reason(),
                Some(h2::Reason::FRAME_SIZE_ERROR | h2::Reason::PROTOCOL_ERROR)
            )
    });
    if !malformed {
        return;
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!(
            "bench: the server did not answer in HTTP/2 ({err}); --http2 speaks HTTP/2 from the first byte (h2c prior knowledge), which a server that only speaks HTTP/1.1 cannot read."
        );
    });
}

/// How long an answer that came before an HTTP/2 server closed the connection may take to be
/// handed over once the close was seen.
const CLOSE_HANDOVER: Duration = Duration::from_millis(200);

/// Whether an HTTP/2 server said it did not process the request: it refused the stream, or
/// the stream was past the last one its graceful GOAWAY took (RFC 9113 §8.7): safe to send
/// again, and no answer was lost.
fn refused_unprocessed(err: &hyper::Error) -> bool {
    crate::proxy::h2::h2_cause(err).is_some_and(|h2| match h2.reason() {
        Some(h2::Reason::REFUSED_STREAM) => true,
        Some(h2::Reason::NO_ERROR) => h2.is_go_away() && h2.is_remote(),
        _ => false,
    })
}

async fn read_to_end(response: http::Response<Incoming>) -> Step {
    let status = response.status().as_u16();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if let Err(err) = frame {
            return Step::Failed(classify(&err));
        }
    }
    Step::Answered {
        status,
        keep_alive: true,
    }
}

/// Why a connection could not be opened: the server's side (refused, unreachable), or this
/// machine's (out of file descriptors, local ports or memory), which is said once on stderr.
fn connect_error(err: &io::Error) -> ErrorKind {
    use nix::errno::Errno;
    const LOCAL: [Errno; 5] = [
        Errno::EMFILE,
        Errno::ENFILE,
        Errno::ENOMEM,
        Errno::EADDRNOTAVAIL,
        Errno::ENOBUFS,
    ];
    if !err
        .raw_os_error()
        .is_some_and(|code| LOCAL.contains(&Errno::from_raw(code)))
    {
        return ErrorKind::Connect;
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!(
            "bench: this machine cannot open more connections ({err}); counted as `local` errors, not the server's. Use fewer connections or raise `ulimit -n`."
        );
    });
    ErrorKind::Local
}

/// Sorts a transport error into the kinds the report counts, from the error and its sources.
pub fn classify(err: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => return ErrorKind::Connect,
                io::ErrorKind::TimedOut => return ErrorKind::Timeout,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => return ErrorKind::Reset,
                _ => {}
            }
        }
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            if hyper.is_timeout() {
                return ErrorKind::Timeout;
            }
            if hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed() {
                return ErrorKind::Reset;
            }
        }
        current = err.source();
    }
    ErrorKind::Other
}

/// How one request ended.
enum Sent {
    Answered(u16),
    Failed(ErrorKind),
    /// The run ended first, at this instant.
    Cut(Instant),
}

/// The wait before connecting again after `failures` connects in a row failed: none after a
/// success, then 10 ms doubling up to 1 s, so a refusing server (or a local limit) is not
/// hammered and does not use up a counted run's requests at once.
pub fn reconnect_delay(failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => Duration::from_millis(10 << (n - 1).min(7)).min(Duration::from_secs(1)),
    }
}

/// One connection's share of the run.
struct Worker {
    index: usize,
    shared: Arc<Shared>,
    tally: Tally,
    /// One connection per origin, opened on first use.
    connections: Vec<Option<Connection>>,
    counts: Arc<ByteCounts>,
    /// Byte counts when the measured window began.
    baseline: Option<(u64, u64)>,
    unpublished: u64,
    /// When the unpublished requests are published at the latest.
    publish_by: Instant,
    /// Connects that failed in a row ([`reconnect_delay`]).
    connect_failures: u32,
}

impl Worker {
    fn new(index: usize, shared: Arc<Shared>) -> Worker {
        let origins = shared.plan.origins.len();
        Worker {
            index,
            connections: (0..origins).map(|_| None).collect(),
            shared,
            tally: Tally::default(),
            counts: Arc::new(ByteCounts::default()),
            baseline: None,
            unpublished: 0,
            publish_by: Instant::now(),
            connect_failures: 0,
        }
    }

    /// Whether the run has ended by `at`.
    fn is_cut(&self, clock: &Clock, at: Instant) -> bool {
        self.shared.cut.at(clock).is_some_and(|cut| at >= cut)
    }

    async fn run(
        mut self,
        mut clock: watch::Receiver<Option<Clock>>,
        ready: tokio::sync::mpsc::Sender<()>,
    ) -> (Tally, Instant) {
        // Connect before the clock starts, so connection set-up is not charged to the first
        // requests; a failure here is counted when a request tries again, and a connect the
        // clock did not wait for is given up for one the first request makes, timed.
        let templates = &self.shared.plan.templates;
        let origin = templates[self.index % templates.len()].origin;
        let first = &self.shared.plan.origins[origin];
        let open = tokio::time::timeout(
            self.shared.plan.timeout,
            Connection::open(first, self.shared.plan.http2, &self.counts),
        );
        let opened = tokio::select! {
            opened = open => opened.ok().and_then(Result::ok),
            _ = clock.wait_for(Option::is_some) => None,
        };
        if let Some(conn) = opened {
            self.connections[origin] = Some(conn);
        }
        let _ = ready.send(()).await;
        drop(ready);
        let clock = match clock.wait_for(Option::is_some).await {
            Ok(clock) => clock.expect("waited for it to be set"),
            Err(_) => return (self.tally, Instant::now()),
        };
        let done = match self.shared.schedule {
            Some(schedule) => self.open_loop(clock, schedule).await,
            None => self.closed_loop(clock).await,
        };
        self.shared
            .completed
            .fetch_add(self.unpublished, Ordering::Relaxed);
        if let Some((read, written)) = self.baseline {
            self.tally.bytes_read = self.counts.read.load(Ordering::Relaxed) - read;
            self.tally.bytes_written = self.counts.written.load(Ordering::Relaxed) - written;
        }
        (self.tally, done)
    }

    /// Sends the next request as soon as the previous one is answered.
    async fn closed_loop(&mut self, clock: Clock) -> Instant {
        // The previous answer's time doubles as the next send time: one clock read per request.
        let mut free_at = clock.start;
        for k in 0.. {
            if self.is_cut(&clock, free_at) {
                break;
            }
            let measured = free_at >= clock.measure_start;
            // A warm-up request takes the URLs in turn on its connection; a measured one takes
            // the run's next index, so that request i goes to URL i mod n.
            let Some(index) = (if measured {
                self.claim()
            } else {
                Some(self.index as u64 + k)
            }) else {
                break;
            };
            free_at = self
                .request(&clock, free_at, free_at, measured, index)
                .await;
        }
        free_at
    }

    /// The run-wide index of one more measured request, or `None` when a counted run has sent
    /// them all.
    fn claim(&self) -> Option<u64> {
        let ticket = self.shared.claimed.fetch_add(1, Ordering::Relaxed);
        match self.shared.plan.limit {
            Limit::Count(n) => (ticket < n).then_some(ticket),
            Limit::Time(_) => Some(ticket),
        }
    }

    /// Sends this connection's share of the schedule, each request at its planned time or as
    /// soon after as the connection is free.
    async fn open_loop(&mut self, clock: Clock, schedule: Schedule) -> Instant {
        let conn = self.index as u64;
        let mut free_at = clock.start;
        // How late the timer woke this connection's last sleep: the requests behind it are
        // not charged for it ([`departure`]).
        let mut timer_lag = Duration::ZERO;
        let mut k = 0;
        while let Some(planned) = schedule.planned(conn, k) {
            if self.is_cut(&clock, free_at) {
                // What was due before the end and never went out waited all that time.
                let cut = self.shared.cut.at(&clock).unwrap_or(free_at);
                while let Some(planned) = schedule.planned(conn, k) {
                    let due = clock.start + planned.at;
                    if due >= cut {
                        break;
                    }
                    if planned.measured {
                        self.tally.record_cut(cut - due, false);
                    }
                    k += 1;
                }
                break;
            }
            let due = clock.start + planned.at;
            let (latency_from, sent_at) = match departure(due, free_at, timer_lag) {
                Departure::Late { latency_from } => (latency_from, free_at),
                Departure::Wait { until } => {
                    // A stop (Ctrl-C) ends the wait: at a low rate the next request may be far off.
                    tokio::select! {
                        () = sleep_until(until) => {}
                        () = self.shared.cut.stopped(self.index) => {
                            free_at = Instant::now();
                            continue;
                        }
                    }
                    let now = Instant::now();
                    // The timer's own granularity, no more: a longer stall of the generator
                    // is charged to the requests behind it, as it would be with no sleep.
                    timer_lag = now.saturating_duration_since(until).min(TIMER_GRANULARITY);
                    (now, now)
                }
            };
            free_at = self
                .request(
                    &clock,
                    latency_from,
                    sent_at,
                    planned.measured,
                    planned.index,
                )
                .await;
            k += 1;
        }
        free_at
    }

    /// Sends request `index` of the run (its URL is the index-th in turn), reconnecting if
    /// needed, records it, and returns when it finished.
    async fn request(
        &mut self,
        clock: &Clock,
        latency_from: Instant,
        sent_at: Instant,
        measured: bool,
        index: u64,
    ) -> Instant {
        if measured && self.baseline.is_none() {
            self.baseline = Some((
                self.counts.read.load(Ordering::Relaxed),
                self.counts.written.load(Ordering::Relaxed),
            ));
        }
        let template = (index % self.shared.plan.templates.len() as u64) as usize;
        let (mut latency_from, mut sent_at) = (latency_from, sent_at);
        let delay = reconnect_delay(self.connect_failures);
        if !delay.is_zero() {
            let until = Instant::now() + delay;
            let until = self
                .shared
                .cut
                .at(clock)
                .map_or(until, |cut| cut.min(until));
            // A stop (Ctrl-C) ends the wait: a counted run has no end of its own to cap it.
            tokio::select! {
                () = sleep_until(until) => {}
                () = self.shared.cut.stopped(self.index) => {}
            }
            let until = until.min(Instant::now());
            if self.is_cut(clock, until) {
                // The run ended during the generator's own wait: the request never went out.
                // Only one already due (open loop, behind schedule) waited for the server.
                if measured && latency_from < sent_at {
                    self.tally.record_cut(until - latency_from, false);
                }
                return until;
            }
            // The generator's own wait is not the server's latency, unless the request was
            // already due (open loop, behind schedule).
            if latency_from == sent_at {
                (latency_from, sent_at) = (until, until);
            }
        }
        let result = self.send(clock, template, sent_at).await;
        let done = match result {
            Sent::Cut(at) => at,
            _ => Instant::now(),
        };
        if matches!(result, Sent::Answered(_)) && done >= clock.measure_start {
            self.tally.answered_in_window += 1;
        }
        if !measured {
            self.tally.warmup_requests += 1;
        } else {
            match result {
                Sent::Answered(status) => {
                    self.tally.record_response(status, done - latency_from);
                }
                Sent::Failed(kind) => {
                    self.tally.errors.add(kind);
                    if kind == ErrorKind::Timeout {
                        self.tally.record_timed_out(done - latency_from);
                    }
                }
                Sent::Cut(at) => self.tally.record_cut(at - latency_from, true),
            }
        }
        if measured {
            self.unpublished += 1;
        }
        if self.unpublished == PROGRESS_BATCH || done >= self.publish_by {
            self.shared
                .completed
                .fetch_add(self.unpublished, Ordering::Relaxed);
            self.unpublished = 0;
            self.publish_by = done + PROGRESS_EVERY;
        }
        done
    }

    /// One request from `template` on this worker's connection to its origin, within the
    /// timeout counted from `sent_at`, until the run is cut.
    async fn send(&mut self, clock: &Clock, template: usize, sent_at: Instant) -> Sent {
        let plan = &self.shared.plan;
        let cut = &self.shared.cut;
        let template = &plan.templates[template];
        let timeout = sent_at + plan.timeout;
        let ends = || cut.at(clock).map_or(timeout, |at| at.min(timeout));
        // Past the limit: the run's end when that came first, else `kind`.
        let over = |kind| match cut.at(clock) {
            Some(at) if at <= timeout => Sent::Cut(at),
            _ => Sent::Failed(kind),
        };
        // A request goes again on a new connection once when its connection turned out closed
        // before it went out; a server that closes every new connection gets no more tries.
        let mut resent = false;
        loop {
            let slot = &mut self.connections[template.origin];
            let conn = match slot {
                Some(conn) => conn,
                None => {
                    let open =
                        Connection::open(&plan.origins[template.origin], plan.http2, &self.counts);
                    let opened = tokio::select! {
                        opened = timeout_at(ends(), open) => opened,
                        () = cut.stopped(self.index) => return over(ErrorKind::Connect),
                    };
                    if let Ok(Ok(conn)) = opened {
                        slot.insert(conn)
                    } else {
                        self.connect_failures += 1;
                        return match opened {
                            Ok(Err(kind)) => Sent::Failed(kind),
                            _ => over(ErrorKind::Connect),
                        };
                    }
                }
            };
            let exchange = timeout_at(ends(), conn.exchange(template));
            let step = tokio::select! {
                step = exchange => step.ok(),
                () = cut.stopped(self.index) => None,
            };
            // A connection that fails before its first answer counts as a failed connect, so
            // the next ones back off: a server that takes connections and drops them (or does
            // not speak the protocol) is not hammered with new ones.
            if !matches!(step, Some(Step::Answered { .. })) && conn.answered == 0 {
                self.connect_failures += 1;
            }
            match step {
                Some(Step::Answered { status, keep_alive }) => {
                    conn.answered += 1;
                    self.connect_failures = 0;
                    if !keep_alive || template.closes() {
                        *slot = None;
                    }
                    return Sent::Answered(status);
                }
                Some(Step::Unsent) if conn.answered > 0 || !resent => {
                    *slot = None;
                    resent = true;
                }
                Some(Step::Unsent) => {
                    *slot = None;
                    return Sent::Failed(ErrorKind::Reset);
                }
                Some(Step::Failed(kind)) => {
                    *slot = None;
                    return Sent::Failed(kind);
                }
                None => {
                    // Unanswered: where the answer would begin on this connection is unknown.
                    *slot = None;
                    return over(ErrorKind::Timeout);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped(io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "wrapped")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn reconnects_back_off_after_failures() {
        let delays: Vec<u128> = (0..10).map(|n| reconnect_delay(n).as_millis()).collect();
        assert_eq!(delays, [0, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(reconnect_delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn local_shortages_are_not_the_servers() {
        use nix::errno::Errno;
        for local in [Errno::EMFILE, Errno::EADDRNOTAVAIL] {
            let err = io::Error::from_raw_os_error(local as i32);
            assert_eq!(connect_error(&err), ErrorKind::Local, "{local}");
        }
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(connect_error(&refused), ErrorKind::Connect);
    }

    #[test]
    fn io_errors_are_classified_through_their_sources() {
        let kinds = [
            (io::ErrorKind::ConnectionRefused, ErrorKind::Connect),
            (io::ErrorKind::TimedOut, ErrorKind::Timeout),
            (io::ErrorKind::ConnectionReset, ErrorKind::Reset),
            (io::ErrorKind::BrokenPipe, ErrorKind::Reset),
            (io::ErrorKind::UnexpectedEof, ErrorKind::Reset),
            (io::ErrorKind::InvalidData, ErrorKind::Other),
        ];
        for (io_kind, expected) in kinds {
            let err = Wrapped(io::Error::from(io_kind));
            assert_eq!(classify(&err), expected, "{io_kind:?}");
        }
    }
}
