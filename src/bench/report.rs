//! What a run measured: per-connection tallies (merged once at the end, so no counter is
//! shared per request), and the report built from them: text for people and one JSON object
//! with a stable schema for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::failon::Outcome;

/// Version of the JSON object printed by `--json`; bumped only when a field changes meaning
/// or goes away (new fields may appear within a version).
pub const SCHEMA_VERSION: u64 = 1;

/// Longest latency the histogram keeps exactly; longer ones are recorded as this.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Why a request got no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The TCP connection could not be made (refused, unreachable, or not within --timeout).
    Connect,
    /// No complete response within --timeout.
    Timeout,
    /// The server reset or closed the connection before the response was complete.
    Reset,
    /// Anything else (an unparsable response, for instance).
    Other,
    /// The load generator could not open a socket itself (file descriptors or local ports
    /// ran out): not the server's doing.
    Local,
}

/// Failed requests by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    pub connect: u64,
    pub timeout: u64,
    pub reset: u64,
    pub other: u64,
    pub local: u64,
}

impl ErrorCounts {
    pub fn add(&mut self, kind: ErrorKind) {
        match kind {
            ErrorKind::Connect => self.connect += 1,
            ErrorKind::Timeout => self.timeout += 1,
            ErrorKind::Reset => self.reset += 1,
            ErrorKind::Other => self.other += 1,
            ErrorKind::Local => self.local += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.named().iter().map(|(_, count)| count).sum()
    }

    fn merge(&mut self, other: &ErrorCounts) {
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.reset += other.reset;
        self.other += other.other;
        self.local += other.local;
    }

    fn named(&self) -> [(&'static str, u64); 5] {
        [
            ("connect", self.connect),
            ("timeout", self.timeout),
            ("reset", self.reset),
            ("other", self.other),
            ("local", self.local),
        ]
    }
}

/// What one connection measured (warm-up requests only counted).
#[derive(Debug, Clone)]
pub struct Tally {
    /// Latency of answered requests, in microseconds (and, once [`Tally::with_cut_offs`], of
    /// the cut-off requests that count).
    pub latency_us: Histogram<u64>,
    /// Lower bounds: the waits so far of the requests the end of the run cut off (`unsent`,
    /// `unfinished`), and of those that hit `--timeout`.
    pub cut_us: Histogram<u64>,
    /// Answered requests by status code; a short list searched linearly (usually one entry).
    pub statuses: Vec<(u16, u64)>,
    pub errors: ErrorCounts,
    pub warmup_requests: u64,
    /// Open loop: measured requests due before the end of the run and never sent.
    pub unsent: u64,
    /// Requests sent and still unanswered when the run ended.
    pub unfinished: u64,
    /// Answers (warm-up ones included) that came within the measured window: what the server
    /// delivered in it.
    pub answered_in_window: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            latency_us: Histogram::new(3).expect("3 significant figures is a valid precision"),
            cut_us: Histogram::new(3).expect("3 significant figures is a valid precision"),
            statuses: Vec::new(),
            errors: ErrorCounts::default(),
            warmup_requests: 0,
            unsent: 0,
            unfinished: 0,
            answered_in_window: 0,
            bytes_read: 0,
            bytes_written: 0,
        }
    }
}

impl Tally {
    pub fn record_response(&mut self, status: u16, latency: Duration) {
        record(&mut self.latency_us, latency);
        match self.statuses.iter_mut().find(|(code, _)| *code == status) {
            Some((_, count)) => *count += 1,
            None => self.statuses.push((status, 1)),
        }
    }

    /// A request that hit `--timeout`, at the time it had waited: a lower bound of its
    /// latency, in the figures as the end's cut-offs are (wrk leaves them out, and a stall
    /// that ends in timeouts read as quick answers only).
    pub fn record_timed_out(&mut self, waited: Duration) {
        record(&mut self.cut_us, waited);
    }

    /// A request the end of the run cut off, at the time it had waited by then: a lower
    /// bound of its latency.
    pub fn record_cut(&mut self, waited: Duration, sent: bool) {
        record(&mut self.cut_us, waited);
        if sent {
            self.unfinished += 1;
        } else {
            self.unsent += 1;
        }
    }

    /// The merged tally with the cut-off requests that tell something in its latency figures:
    /// those that had already waited at least the median answer's time (all of them when
    /// nothing was answered). So a server that stalls until the end still shows, while a
    /// request sent a microsecond before the end does not pass for a quick answer.
    pub fn with_cut_offs(mut self) -> Tally {
        let median = if self.latency_us.is_empty() {
            0
        } else {
            self.latency_us.value_at_quantile(0.5)
        };
        for value in self.cut_us.iter_recorded() {
            let micros = value.value_iterated_to();
            if micros >= median {
                let _ = self.latency_us.record_n(micros, value.count_at_value());
            }
        }
        self
    }

    pub fn merge(&mut self, other: &Tally) {
        for (mine, theirs) in [
            (&mut self.latency_us, &other.latency_us),
            (&mut self.cut_us, &other.cut_us),
        ] {
            mine.add(theirs)
                .expect("auto-resizing histograms of the same precision always add");
        }
        for &(status, count) in &other.statuses {
            match self.statuses.iter_mut().find(|(code, _)| *code == status) {
                Some((_, total)) => *total += count,
                None => self.statuses.push((status, count)),
            }
        }
        self.errors.merge(&other.errors);
        self.warmup_requests += other.warmup_requests;
        self.unsent += other.unsent;
        self.unfinished += other.unfinished;
        self.answered_in_window += other.answered_in_window;
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
    }
}

fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    let micros = micros.clamp(1, MAX_LATENCY_US);
    // Recording grows the histogram as needed; saturating would clamp to its current size.
    if histogram.record(micros).is_err() {
        histogram.saturating_record(micros);
    }
}

/// One latency figure of the report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatencyStat {
    Min,
    Mean,
    Max,
    /// A percentile, 0–100.
    Percentile(f64),
}

/// How the run was set up, for the report's header.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    pub urls: Vec<String>,
    pub method: String,
    pub http2: bool,
    pub connections: usize,
    pub threads: usize,
    /// Asked rate (open loop), or `None` for a closed loop.
    pub rate: Option<f64>,
    pub warmup: Duration,
}

/// The merged measurements of a run over its measured window.
#[derive(Debug, Clone)]
pub struct Report {
    pub info: RunInfo,
    pub tally: Tally,
    /// From the end of the warm-up to the last response (or the end of a timed run).
    pub elapsed: Duration,
    /// Stopped by Ctrl-C before its count or time: the report covers the run up to there.
    pub interrupted: bool,
}

/// The percentiles the report always shows, with their JSON names.
const PERCENTILES: [(&str, &str, f64); 5] = [
    ("p50", "p50", 50.0),
    ("p90", "p90", 90.0),
    ("p95", "p95", 95.0),
    ("p99", "p99", 99.0),
    ("p99.9", "p99_9", 99.9),
];

impl Report {
    /// Answered requests (any status).
    pub fn responses(&self) -> u64 {
        self.tally.statuses.iter().map(|(_, count)| count).sum()
    }

    /// Measured requests sent or attempted: answered plus failed.
    pub fn requests(&self) -> u64 {
        self.responses() + self.tally.errors.total()
    }

    /// Failed requests: transport errors plus 5xx answers.
    pub fn failed(&self) -> u64 {
        let server_errors: u64 = self
            .tally
            .statuses
            .iter()
            .filter(|(code, _)| *code >= 500)
            .map(|(_, count)| count)
            .sum();
        self.tally.errors.total() + server_errors
    }

    /// Answers per second that came within the measured window.
    pub fn rps(&self) -> f64 {
        per_second(self.tally.answered_in_window, self.elapsed)
    }

    /// A latency figure in microseconds; `None` when no request was measured (all failed).
    pub fn latency_us(&self, stat: LatencyStat) -> Option<f64> {
        let histogram = &self.tally.latency_us;
        if histogram.is_empty() {
            return None;
        }
        Some(match stat {
            LatencyStat::Min => histogram.min() as f64,
            LatencyStat::Mean => histogram.mean(),
            LatencyStat::Max => histogram.max() as f64,
            LatencyStat::Percentile(p) => histogram.value_at_percentile(p) as f64,
        })
    }

    fn statuses(&self) -> BTreeMap<u16, u64> {
        self.tally.statuses.iter().copied().collect()
    }

    /// The `--json` object; every field is documented in the README's bench section.
    pub fn to_json(&self, outcomes: &[Outcome]) -> Value {
        let histogram = &self.tally.latency_us;
        // null, not 0, when nothing was measured: a 0 would read as a real latency.
        let whole = |stat| self.latency_us(stat).map(|us| us as u64);
        let mut latency = serde_json::Map::new();
        latency.insert("min".into(), json!(whole(LatencyStat::Min)));
        latency.insert(
            "mean".into(),
            json!(self.latency_us(LatencyStat::Mean).map(round2)),
        );
        let stdev = (!histogram.is_empty()).then(|| round2(histogram.stdev()));
        latency.insert("stdev".into(), json!(stdev));
        for (_, name, p) in PERCENTILES {
            latency.insert(name.into(), json!(whole(LatencyStat::Percentile(p))));
        }
        latency.insert("max".into(), json!(whole(LatencyStat::Max)));
        let status: serde_json::Map<String, Value> = self
            .statuses()
            .into_iter()
            .map(|(code, count)| (code.to_string(), json!(count)))
            .collect();
        let mut errors: serde_json::Map<String, Value> = self
            .tally
            .errors
            .named()
            .into_iter()
            .map(|(name, count)| (name.to_string(), json!(count)))
            .collect();
        errors.insert("total".into(), json!(self.tally.errors.total()));
        let info = &self.info;
        json!({
            "schema_version": SCHEMA_VERSION,
            "urls": info.urls,
            "method": info.method,
            "http2": info.http2,
            "connections": info.connections,
            "threads": info.threads,
            "mode": if info.rate.is_some() { "open" } else { "closed" },
            "rate": info.rate,
            "warmup_s": info.warmup.as_secs_f64(),
            "duration_s": round6(self.elapsed.as_secs_f64()),
            "requests": self.requests(),
            "responses": self.responses(),
            "rps": round2(self.rps()),
            "failed": self.failed(),
            "status": status,
            "errors": errors,
            "latency_us": latency,
            "bytes_read": self.tally.bytes_read,
            "bytes_written": self.tally.bytes_written,
            "read_bytes_per_s": round2(per_second(self.tally.bytes_read, self.elapsed)),
            "warmup_requests": self.tally.warmup_requests,
            "unsent": self.tally.unsent,
            "unfinished": self.tally.unfinished,
            "interrupted": self.interrupted,
            "fail_on": outcomes.iter().map(|o| json!({
                "condition": o.condition,
                "value": round2(o.value),
                "tripped": o.tripped,
            })).collect::<Vec<_>>(),
        })
    }

    /// The human report.
    pub fn to_text(&self, outcomes: &[Outcome]) -> String {
        let info = &self.info;
        let mut out = String::new();
        let mode = match info.rate {
            Some(rate) => format!("open loop at {rate} req/s"),
            None => "closed loop".to_string(),
        };
        let protocol = if info.http2 { "HTTP/2" } else { "HTTP/1.1" };
        let _ = writeln!(
            out,
            "{} {} over {} connection(s), {protocol}, {mode}, {} thread(s)",
            info.method,
            plural(info.urls.len(), "URL"),
            info.connections,
            info.threads
        );
        for url in info.urls.iter().take(5) {
            let _ = writeln!(out, "  {url}");
        }
        if info.urls.len() > 5 {
            let _ = writeln!(out, "  … and {} more", info.urls.len() - 5);
        }
        let warmup = if info.warmup.is_zero() {
            String::new()
        } else {
            format!(
                " (after a {} warm-up of {} requests)",
                seconds(info.warmup),
                self.tally.warmup_requests
            )
        };
        if self.interrupted {
            let _ = writeln!(
                out,
                "\nStopped    by Ctrl-C after {}: the figures cover the run up to there",
                seconds(self.elapsed)
            );
        }
        let _ = writeln!(
            out,
            "\nRequests   {} ended (answered or failed), {} answered in {}{warmup}: {:.1} req/s",
            self.requests(),
            self.responses(),
            seconds(self.elapsed),
            self.rps()
        );
        let _ = writeln!(
            out,
            "Transfer   {} read ({}/s), {} written",
            bytes(self.tally.bytes_read as f64),
            bytes(per_second(self.tally.bytes_read, self.elapsed)),
            bytes(self.tally.bytes_written as f64)
        );
        let first = [
            ("min", LatencyStat::Min),
            ("mean", LatencyStat::Mean),
            ("max", LatencyStat::Max),
        ];
        let line = |stats: &mut dyn Iterator<Item = (&str, LatencyStat)>| {
            stats
                .map(|(name, stat)| format!("{name} {}", shown_latency(self.latency_us(stat))))
                .collect::<Vec<_>>()
                .join("   ")
        };
        let _ = writeln!(out, "Latency    {}", line(&mut first.into_iter()));
        let _ = writeln!(
            out,
            "           {}",
            line(
                &mut PERCENTILES
                    .iter()
                    .map(|&(name, _, p)| (name, LatencyStat::Percentile(p)))
            )
        );
        let statuses = self
            .statuses()
            .into_iter()
            .map(|(code, count)| format!("{code}: {count}"));
        let _ = writeln!(out, "Status     {}", listed(statuses));
        let errors = self
            .tally
            .errors
            .named()
            .into_iter()
            .filter(|(_, count)| *count > 0)
            .map(|(name, count)| format!("{name}: {count}"));
        let _ = writeln!(out, "Errors     {}", listed(errors));
        if self.failed() > 0 {
            let _ = writeln!(out, "Failed     {} (errors and 5xx answers)", self.failed());
        }
        if self.tally.unsent > 0 {
            let _ = writeln!(
                out,
                "Unsent     {} planned requests were still waiting to go out at the end (connections busy or reconnecting)",
                self.tally.unsent
            );
        }
        if self.tally.unfinished > 0 {
            let _ = writeln!(
                out,
                "Unfinished {} requests were still unanswered at the end",
                self.tally.unfinished
            );
        }
        if self.tally.unsent + self.tally.unfinished > 0 {
            let _ = writeln!(
                out,
                "           (in the latency figures at the time they had waited by the end, when at least the median)"
            );
        }
        for outcome in outcomes {
            let _ = writeln!(
                out,
                "Fail-on    {}: {} (measured {})",
                outcome.condition,
                if outcome.tripped { "TRIPPED" } else { "held" },
                outcome.shown
            );
        }
        out
    }
}

/// Items side by side, or "none".
fn listed(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join("   ")
    }
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn round6(value: f64) -> f64 {
    (value * 1e6).round() / 1e6
}

fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

/// A latency figure, or "n/a" when nothing was measured.
pub fn shown_latency(us: Option<f64>) -> String {
    us.map_or_else(|| "n/a".to_string(), micros)
}

/// A latency in the unit that keeps it readable.
pub fn micros(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.3} s", us / 1_000_000.0)
    }
}

fn bytes(count: f64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if count < 1024.0 {
        return format!("{count:.0} B");
    }
    let mut value = count / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            urls: vec!["http://127.0.0.1:1/".into()],
            method: "GET".into(),
            http2: false,
            connections: 2,
            threads: 1,
            rate: None,
            warmup: Duration::ZERO,
        }
    }

    fn report(tallies: &[Tally], elapsed: Duration) -> Report {
        let mut tally = Tally::default();
        for t in tallies {
            tally.merge(t);
        }
        Report {
            info: info(),
            tally: tally.with_cut_offs(),
            elapsed,
            interrupted: false,
        }
    }

    #[test]
    fn tallies_merge_into_one_report() {
        let mut a = Tally::default();
        let mut b = Tally::default();
        for ms in 1..=90 {
            a.record_response(200, Duration::from_millis(ms));
        }
        for ms in 91..=100 {
            b.record_response(503, Duration::from_millis(ms));
        }
        b.record_response(200, Duration::from_millis(5));
        a.errors.add(ErrorKind::Timeout);
        b.errors.add(ErrorKind::Connect);
        b.errors.add(ErrorKind::Connect);
        a.bytes_read = 1000;
        b.bytes_read = 24;
        // Answers of the window, warm-up ones that came in it included.
        a.answered_in_window = 95;
        b.answered_in_window = 6;
        let report = report(&[a, b], Duration::from_secs(2));
        assert_eq!(report.responses(), 101);
        assert_eq!(report.requests(), 104);
        assert_eq!(report.failed(), 3 + 10);
        assert!((report.rps() - 50.5).abs() < 1e-9);
        assert_eq!(report.statuses(), BTreeMap::from([(200, 91), (503, 10)]));
        let p50 = report.latency_us(LatencyStat::Percentile(50.0)).unwrap();
        assert!((50_000.0..51_000.0).contains(&p50), "{p50}");
        let max = report.latency_us(LatencyStat::Max).unwrap();
        assert!((100_000.0..100_100.0).contains(&max), "{max}");
        let min = report.latency_us(LatencyStat::Min).unwrap();
        assert!((1000.0..1002.0).contains(&min));
    }

    #[test]
    fn requests_cut_off_by_the_end_count_at_their_wait() {
        let mut tally = Tally::default();
        for _ in 0..10 {
            tally.record_response(200, Duration::from_millis(1));
        }
        // A server that stopped answering: one sent and unanswered, nine never sent.
        tally.record_cut(Duration::from_secs(2), true);
        for waited in 1..=9 {
            tally.record_cut(Duration::from_millis(100 * waited), false);
        }
        // And one sent a moment before the end: it says nothing, and is left out.
        tally.record_cut(Duration::from_micros(3), true);
        let report = report(&[tally], Duration::from_secs(3));
        assert_eq!(report.responses(), 10);
        assert_eq!(report.requests(), 10);
        assert_eq!(report.tally.latency_us.len(), 20);
        let p90 = report.latency_us(LatencyStat::Percentile(90.0)).unwrap();
        assert!(p90 >= 800_000.0, "{p90}");
        let min = report.latency_us(LatencyStat::Min).unwrap();
        assert!(min >= 1000.0, "{min}");
        let json = report.to_json(&[]);
        assert_eq!(
            (json["unsent"].as_u64(), json["unfinished"].as_u64()),
            (Some(9), Some(2))
        );
        let text = report.to_text(&[]);
        assert!(text.contains("Unsent     9 "), "{text}");
        assert!(text.contains("Unfinished 2 "), "{text}");
    }

    #[test]
    fn an_empty_run_reports_no_latency() {
        let mut tally = Tally::default();
        tally.errors.add(ErrorKind::Connect);
        let report = report(&[tally], Duration::ZERO);
        assert_eq!(report.rps(), 0.0);
        assert_eq!(report.latency_us(LatencyStat::Percentile(99.0)), None);
        let json = report.to_json(&[]);
        assert_eq!(json["latency_us"]["stdev"], Value::Null);
        assert_eq!(json["latency_us"]["p99"], Value::Null);
        let text = report.to_text(&[]);
        assert!(text.contains("Status     none"), "{text}");
        assert!(text.contains("p99 n/a"), "{text}");
        assert!(text.contains("Failed     1 "), "{text}");
    }

    #[test]
    fn json_counts_by_kind_and_status() {
        let mut tally = Tally::default();
        tally.record_response(200, Duration::from_micros(1500));
        tally.errors.add(ErrorKind::Reset);
        let json = report(&[tally], Duration::from_secs(1)).to_json(&[]);
        assert_eq!(json["schema_version"], SCHEMA_VERSION);
        assert_eq!(json["errors"]["reset"], 1);
        assert_eq!(json["errors"]["total"], 1);
        assert_eq!(json["status"]["200"], 1);
        assert_eq!(json["requests"], 2);
        assert_eq!(json["latency_us"]["p99_9"], 1500);
        assert_eq!(json["mode"], "closed");
        assert_eq!(json["rate"], Value::Null);
    }

    #[test]
    fn latencies_and_sizes_read_well() {
        assert_eq!(micros(850.0), "850 µs");
        assert_eq!(micros(12_345.0), "12.35 ms");
        assert_eq!(micros(2_500_000.0), "2.500 s");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.50 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0), "3.00 MiB");
    }
}
