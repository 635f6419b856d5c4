//! `scalegate bench`: the load generator and its report.
//!
//! Closed loop (`-c` with `-n` or `-d`): every connection sends its next request as soon as the
//! previous one is answered. Open loop (`-q`): requests leave at a constant rate whatever the
//! server does, and latency counts from when each request was due (see `schedule`), so a
//! stalled server shows in the percentiles. Exit status: 0 ran, 1 a `--fail-on` condition
//! tripped, 2 bad arguments or an unusable URL or file.

mod failon;
mod h1;
mod report;
mod runner;
mod schedule;
mod target;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::units::parse_duration;

pub use failon::FailOn;

use failon::Outcome;
use report::{Report, RunInfo};
use schedule::Limit;

/// How long a run lasts when neither `-n` nor `-d` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Command-line arguments of `scalegate bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Target URL(s), plain http://; several are used in turn (round robin).
    #[arg(required_unless_present = "urls_file")]
    pub urls: Vec<String>,
    /// File with more URLs, one per line (blank lines and lines starting with # are skipped).
    #[arg(long, value_name = "FILE")]
    pub urls_file: Option<PathBuf>,
    /// Connections kept open; each carries one request at a time.
    #[arg(short = 'c', long, default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,
    /// Send exactly this many measured requests in total, then stop.
    #[arg(short = 'n', long, conflicts_with = "duration",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Run for this long, e.g. 30s or 1m (10s when neither -n nor -d is given).
    #[arg(short = 'd', long, value_parser = positive_duration)]
    pub duration: Option<Duration>,
    /// Open loop: send this many requests per second in total, spread over the connections,
    /// and count latency from when each request was due.
    #[arg(short = 'q', long, value_name = "RPS", value_parser = positive_rate)]
    pub rate: Option<f64>,
    /// Request method.
    #[arg(short = 'm', long, default_value = "GET", value_parser = method)]
    pub method: Method,
    /// Request header `NAME: VALUE` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE", value_parser = header)]
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Request body.
    #[arg(long, conflicts_with = "body_file")]
    pub body: Option<String>,
    /// Request body read from a file.
    #[arg(long, value_name = "FILE")]
    pub body_file: Option<PathBuf>,
    /// Speak HTTP/2 without TLS (h2c, prior knowledge) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// Longest wait for a connection or for a whole answer; a request past it is a timeout error.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    pub timeout: Duration,
    /// Send load for this long first and leave it out of the report.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Worker threads of the load generator (default: the CPUs this process may use).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Print the report as one JSON object (schema in the README).
    #[arg(long)]
    pub json: bool,
    /// Exit with status 1 when any condition holds, e.g. "p99>200ms,errors>1%,rps<1000".
    #[arg(long, value_name = "CONDITIONS", value_parser = fail_on)]
    pub fail_on: Option<FailOn>,
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        duration if duration.is_zero() => Err("must be more than 0".into()),
        duration => Ok(duration),
    }
}

/// The highest `-q`: far above what one machine's generator sends, and low enough that the
/// requests a stalled run leaves unsent are counted at its end in moments.
const MAX_RATE: f64 = 1_000_000.0;

fn positive_rate(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|rate| rate.is_finite() && *rate > 0.0 && *rate <= MAX_RATE)
        .ok_or_else(|| {
            format!(
                "`{text}` is not a number of requests per second above 0 and at most {MAX_RATE}"
            )
        })
}

fn method(text: &str) -> Result<Method, String> {
    Method::from_bytes(text.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("`{text}` is not an HTTP method"))
}

fn header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}`: expected NAME: VALUE"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("`{text}`: `{}` is not a header name", name.trim()))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| format!("`{text}`: the value is not a valid header value"))?;
    Ok((name, value))
}

fn fail_on(text: &str) -> Result<FailOn, String> {
    text.parse()
}

/// The URLs given on the command line followed by those of `--urls-file`.
fn all_urls(args: &BenchArgs) -> Result<Vec<String>, String> {
    let mut urls = args.urls.clone();
    if let Some(path) = &args.urls_file {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("--urls-file {}: {err}", path.display()))?;
        urls.extend(
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(str::to_string),
        );
    }
    if urls.is_empty() {
        return Err("no URL given (the --urls-file has none)".into());
    }
    Ok(urls)
}

fn plan(args: &BenchArgs, urls: &[String]) -> Result<runner::Plan, String> {
    let body = match (&args.body, &args.body_file) {
        (Some(body), _) => Bytes::from(body.clone()),
        (None, Some(path)) => Bytes::from(
            std::fs::read(path).map_err(|err| format!("--body-file {}: {err}", path.display()))?,
        ),
        (None, None) => Bytes::new(),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &args.headers {
        headers.append(name.clone(), value.clone());
    }
    target::check_headers(&headers, args.http2)?;
    let parts = target::RequestParts {
        method: args.method.clone(),
        headers,
        body,
    };
    let (templates, origins) = target::build(urls, &parts)?;
    let limit = match (args.requests, args.duration) {
        (Some(n), _) => Limit::Count(n),
        (None, Some(duration)) => Limit::Time(duration),
        (None, None) => Limit::Time(DEFAULT_DURATION),
    };
    if let Some(rate) = args.rate {
        schedule::check_rate(rate, args.warmup, limit)?;
    }
    Ok(runner::Plan {
        templates,
        origins,
        connections: args.connections as usize,
        limit,
        rate: args.rate,
        timeout: args.timeout,
        warmup: args.warmup,
        http2: args.http2,
    })
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    // One thread runs on the current thread: no cross-thread wake-ups per request.
    if threads == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
}

/// Redraws the progress bar from the run's live counters until aborted.
async fn show_progress(progress: runner::Progress, bar: ProgressBar, limit: Limit) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let (completed, since) = progress.snapshot();
        match limit {
            Limit::Count(_) => bar.set_position(completed),
            Limit::Time(_) => {
                bar.set_position(since.unwrap_or_default().as_millis() as u64);
                bar.set_message(format!("{completed} requests"));
            }
        }
    }
}

fn progress_bar(limit: Limit, warmup: Duration) -> ProgressBar {
    let (length, template) = match limit {
        Limit::Count(n) => (n, "{bar:40} {pos}/{len} requests  {elapsed}"),
        Limit::Time(duration) => (
            (warmup + duration).as_millis() as u64,
            "{bar:40} {elapsed} of the run  {msg}",
        ),
    };
    let bar = ProgressBar::new(length);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

/// Runs the load generator and returns the process exit code.
pub fn run_cli(args: BenchArgs) -> i32 {
    let prepared = all_urls(&args).and_then(|urls| Ok((plan(&args, &urls)?, urls)));
    let (plan, urls) = match prepared {
        Ok(prepared) => prepared,
        Err(message) => {
            eprintln!("error: {message}");
            return 2;
        }
    };
    // A thread beyond one per connection would have nothing to run.
    let threads = args
        .threads
        .map_or_else(crate::config::cpus_available, |threads| threads as usize)
        .min(plan.connections);
    let runtime = match runtime(threads) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the load generator's runtime: {err}");
            return 2;
        }
    };
    let info = RunInfo {
        urls,
        method: args.method.to_string(),
        http2: args.http2,
        connections: plan.connections,
        threads,
        rate: plan.rate,
        warmup: plan.warmup,
    };
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| progress_bar(plan.limit, plan.warmup));
    let limit = plan.limit;
    let outcome = runtime.block_on(async {
        let mut drawing = None;
        // Ctrl-C ends the run where it is, and the report covers it up to there (as wrk's).
        let interrupted = async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let outcome = runner::run(
            plan,
            |progress| {
                if let Some(bar) = &bar {
                    drawing = Some(tokio::spawn(show_progress(progress, bar.clone(), limit)));
                }
            },
            interrupted,
        )
        .await;
        if let Some(drawing) = drawing {
            drawing.abort();
        }
        outcome
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = Report {
        info,
        tally: outcome.tally.with_cut_offs(),
        elapsed: outcome.elapsed,
        interrupted: outcome.interrupted,
    };
    let outcomes = args
        .fail_on
        .as_ref()
        .map(|fail_on| fail_on.evaluate(&report))
        .unwrap_or_default();
    if args.json {
        println!("{}", report.to_json(&outcomes));
    } else {
        print!("{}", report.to_text(&outcomes));
    }
    let tripped: Vec<&Outcome> = outcomes.iter().filter(|o| o.tripped).collect();
    for outcome in &tripped {
        eprintln!(
            "fail-on: `{}` tripped (measured {})",
            outcome.condition, outcome.shown
        );
    }
    i32::from(!tripped.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_checked() {
        assert_eq!(positive_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(positive_duration("0").unwrap_err().contains("more than 0"));
        assert!(positive_duration("2").is_err());
        assert_eq!(positive_rate("250.5"), Ok(250.5));
        for bad in ["0", "-1", "inf", "fast", "1e7"] {
            assert!(positive_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(method("post"), Ok(Method::POST));
        assert!(method("GE T").is_err());
        let (name, value) = header("X-Token:  abc ").unwrap();
        assert_eq!((name.as_str(), value.to_str().unwrap()), ("x-token", "abc"));
        assert!(header("no colon").is_err());
        assert!(header("bad name: x").is_err());
    }
}
