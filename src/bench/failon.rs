//! `--fail-on`: conditions that make the run fail, such as `p99>200ms,errors>1%,rps<1000`.
//!
//! Each comma-separated condition is `METRIC OP VALUE` with OP one of `<`, `<=`, `>`, `>=`;
//! the run fails (exit 1) when any condition is true of the report. Metrics: `min`, `mean`,
//! `max` and `pNN` (any percentile, e.g. `p99.9`) take a duration with a unit (`250ms`, `1s`);
//! `rps` takes requests per second; `errors` takes a count or a percentage of the requests
//! (`errors>0`, `errors>=1%`) and counts transport errors plus 5xx answers.

use std::str::FromStr;

use crate::config::units::parse_duration;

use super::report::{micros, LatencyStat, Report};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Metric {
    Latency(LatencyStat),
    Rps,
    Errors,
    ErrorPercent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn holds(self, value: f64, limit: f64) -> bool {
        match self {
            Op::Lt => value < limit,
            Op::Le => value <= limit,
            Op::Gt => value > limit,
            Op::Ge => value >= limit,
        }
    }
}

/// One parsed condition; `limit` is in microseconds for latencies.
#[derive(Debug, Clone, PartialEq)]
struct Condition {
    text: String,
    metric: Metric,
    op: Op,
    limit: f64,
}

/// All conditions of one `--fail-on` flag.
#[derive(Debug, Clone, PartialEq)]
pub struct FailOn(Vec<Condition>);

/// A condition checked against a report.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub condition: String,
    /// The measured value in the condition's unit (microseconds, req/s, count or percent).
    pub value: f64,
    /// The measured value for people (`312.40 ms`, `2.5%`).
    pub shown: String,
    pub tripped: bool,
}

impl FromStr for FailOn {
    type Err = String;

    fn from_str(text: &str) -> Result<FailOn, String> {
        let conditions = text
            .split(',')
            .map(str::trim)
            .map(|part| {
                if part.is_empty() {
                    Err(format!("empty condition in `{text}`"))
                } else {
                    parse_condition(part)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FailOn(conditions))
    }
}

fn parse_condition(text: &str) -> Result<Condition, String> {
    let at = text.find(['<', '>']).ok_or_else(|| {
        format!("`{text}`: expected METRIC<VALUE or METRIC>VALUE, like p99>200ms")
    })?;
    let (name, rest) = text.split_at(at);
    let (op, value) = match rest.as_bytes() {
        [b'<', b'=', ..] => (Op::Le, &rest[2..]),
        [b'>', b'=', ..] => (Op::Ge, &rest[2..]),
        [b'<', ..] => (Op::Lt, &rest[1..]),
        _ => (Op::Gt, &rest[1..]),
    };
    let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
    let number = |value: &str| -> Result<f64, String> {
        value
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("`{text}`: `{value}` is not a number"))
    };
    let (metric, limit) = match name.as_str() {
        "rps" => (Metric::Rps, number(value)?),
        "errors" => match value.strip_suffix('%') {
            Some(percent) => match number(percent.trim())? {
                percent if percent > 100.0 => {
                    return Err(format!("`{text}`: a share of the requests is at most 100%"))
                }
                percent => (Metric::ErrorPercent, percent),
            },
            None => (Metric::Errors, number(value)?),
        },
        _ => {
            let stat = latency_stat(&name).ok_or_else(|| {
                format!(
                    "`{text}`: unknown metric `{name}` (min, mean, max, p50, p99.9, rps, errors)"
                )
            })?;
            let limit = parse_duration(value).map_err(|err| format!("`{text}`: {err}"))?;
            (Metric::Latency(stat), limit.as_secs_f64() * 1e6)
        }
    };
    Ok(Condition {
        text: text.to_string(),
        metric,
        op,
        limit,
    })
}

fn latency_stat(name: &str) -> Option<LatencyStat> {
    match name {
        "min" => Some(LatencyStat::Min),
        "mean" => Some(LatencyStat::Mean),
        "max" => Some(LatencyStat::Max),
        _ => name
            .strip_prefix('p')?
            .parse::<f64>()
            .ok()
            .filter(|p| (0.0..=100.0).contains(p))
            .map(LatencyStat::Percentile),
    }
}

impl FailOn {
    /// Checks every condition against the report.
    pub fn evaluate(&self, report: &Report) -> Vec<Outcome> {
        self.0
            .iter()
            .map(|condition| {
                let (value, shown) = match condition.metric {
                    // Only answers measure the server: with none, the figures hold the
                    // generator's own waits (cut-offs, a reconnect's back-off) at most.
                    Metric::Latency(stat) => {
                        match report.latency_us(stat).filter(|_| report.responses() > 0) {
                            Some(us) => (us, micros(us)),
                            // Nothing answered: no latency can show the condition false, so it
                            // trips whichever way it points.
                            None => {
                                return Outcome {
                                    condition: condition.text.clone(),
                                    value: f64::NAN,
                                    shown: "nothing, no request was answered".to_string(),
                                    tripped: true,
                                }
                            }
                        }
                    }
                    Metric::Rps => {
                        let rps = report.rps();
                        (rps, format!("{rps:.1} req/s"))
                    }
                    // Nothing answered: no share of failures can pass a server that answers
                    // nothing (requests cut unanswered at the end are no errors).
                    Metric::Errors | Metric::ErrorPercent if report.responses() == 0 => {
                        return Outcome {
                            condition: condition.text.clone(),
                            value: f64::NAN,
                            shown: "nothing, no request was answered".to_string(),
                            tripped: true,
                        }
                    }
                    Metric::Errors => {
                        let failed = report.failed() as f64;
                        (failed, format!("{failed} failed"))
                    }
                    Metric::ErrorPercent => {
                        let percent = report.failed() as f64 * 100.0 / report.requests() as f64;
                        (percent, format!("{percent:.2}% failed"))
                    }
                };
                Outcome {
                    condition: condition.text.clone(),
                    value,
                    shown,
                    tripped: condition.op.holds(value, condition.limit),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bench::report::{ErrorKind, RunInfo, Tally};

    fn report() -> Report {
        let mut tally = Tally::default();
        for ms in 1..=100 {
            tally.record_response(if ms <= 98 { 200 } else { 500 }, Duration::from_millis(ms));
        }
        tally.errors.add(ErrorKind::Timeout);
        tally.errors.add(ErrorKind::Timeout);
        tally.answered_in_window = 100;
        Report {
            info: RunInfo {
                urls: vec![],
                method: "GET".into(),
                http2: false,
                connections: 1,
                threads: 1,
                rate: None,
                warmup: Duration::ZERO,
            },
            tally,
            elapsed: Duration::from_secs(1),
            interrupted: false,
        }
    }

    fn tripped(spec: &str) -> Vec<bool> {
        tripped_on(spec, &report())
    }

    fn tripped_on(spec: &str, report: &Report) -> Vec<bool> {
        spec.parse::<FailOn>()
            .unwrap()
            .evaluate(report)
            .iter()
            .map(|o| o.tripped)
            .collect()
    }

    #[test]
    fn parses_each_metric_and_operator() {
        let FailOn(conditions) =
            "p99>200ms, errors>0,rps<1000,p50<=1s,mean>=2ms,errors>1.5%,p99.9>1m"
                .parse()
                .unwrap();
        let metrics: Vec<(Metric, Op, f64)> = conditions
            .iter()
            .map(|c| (c.metric, c.op, c.limit))
            .collect();
        assert_eq!(
            metrics,
            vec![
                (
                    Metric::Latency(LatencyStat::Percentile(99.0)),
                    Op::Gt,
                    200_000.0
                ),
                (Metric::Errors, Op::Gt, 0.0),
                (Metric::Rps, Op::Lt, 1000.0),
                (
                    Metric::Latency(LatencyStat::Percentile(50.0)),
                    Op::Le,
                    1_000_000.0
                ),
                (Metric::Latency(LatencyStat::Mean), Op::Ge, 2000.0),
                (Metric::ErrorPercent, Op::Gt, 1.5),
                (
                    Metric::Latency(LatencyStat::Percentile(99.9)),
                    Op::Gt,
                    60_000_000.0
                ),
            ]
        );
        assert_eq!(conditions[1].text, "errors>0");
    }

    #[test]
    fn malformed_conditions_say_what_is_wrong() {
        for (spec, needle) in [
            ("p99", "expected METRIC"),
            ("p99>200", "unit"),
            ("p99>fast", "duration"),
            ("p999>1s", "unknown metric"),
            ("latency>1s", "unknown metric"),
            ("rps<many", "not a number"),
            ("errors>-1", "not a number"),
            ("p99>1s,", "empty condition"),
            ("errors>150%", "at most 100%"),
            ("", "empty condition"),
        ] {
            let err = spec.parse::<FailOn>().unwrap_err();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }

    #[test]
    fn conditions_trip_on_the_report() {
        // p99 is 99 ms (to 3 significant figures), 102 requests of which 4 failed (2 timeouts, 2 answers of 500), 100 rps.
        assert_eq!(tripped("p99>200ms,p99>50ms"), [false, true]);
        assert_eq!(tripped("errors>0,errors>4,errors>=4"), [true, false, true]);
        assert_eq!(tripped("errors>3%,errors>4%"), [true, false]);
        assert_eq!(tripped("rps<1000,rps<100,rps<=100"), [true, false, true]);
        assert_eq!(tripped("max>101ms,min<2ms,mean>60ms"), [false, true, false]);
    }

    #[test]
    fn latency_and_error_conditions_trip_when_nothing_was_answered() {
        let mut empty = report();
        empty.tally = Tally::default();
        empty.tally.errors.add(ErrorKind::Connect);
        assert_eq!(
            tripped_on("p99>200ms,max>1s,min<1ms,errors>50%", &empty),
            [true, true, true, true]
        );
        // Not even an error: every request was still unanswered when the run ended.
        empty.tally = Tally::default();
        assert_eq!(
            tripped_on("errors>1%,errors>0,rps<1", &empty),
            [true, true, true]
        );
        // Only the generator's own waits (an open loop's requests held in a reconnect's
        // back-off against a server that is down, cut off at the end): still nothing measured.
        empty.tally.record_cut(Duration::from_millis(440), false);
        empty.tally.errors.add(ErrorKind::Connect);
        assert_eq!(tripped_on("p99>500ms,max<1s", &empty), [true, true]);
    }

    /// Requests that hit `--timeout` are in the latency figures at the time they waited, as
    /// the end's cut-offs are: a stall that ends in timeouts does not read as quick answers.
    #[test]
    fn timed_out_requests_count_in_the_latency_figures() {
        let mut stalled = report();
        for _ in 0..30 {
            stalled.tally.errors.add(ErrorKind::Timeout);
            stalled.tally.record_timed_out(Duration::from_millis(250));
        }
        stalled.tally = stalled.tally.with_cut_offs();
        assert_eq!(tripped_on("max>240ms,p90>240ms", &stalled), [true, true]);
    }

    #[test]
    fn outcomes_carry_the_measured_value() {
        let outcomes = "errors>0".parse::<FailOn>().unwrap().evaluate(&report());
        assert_eq!(outcomes[0].value, 4.0);
        assert_eq!(outcomes[0].shown, "4 failed");
    }
}
