//! Logging set-up: `tracing` with text or JSON output, level from `--log-level` or `LOG_LEVEL`.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

/// Output format of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A log filter as given (`--log-level`, `LOG_LEVEL`), if every directive is a level or
/// `TARGET=LEVEL`: a bare word that is no level (`inof`) would be read as a target name and
/// silence every log, so it is refused. An empty value is the default, `info`, as if unset
/// (`LOG_LEVEL: ${LOG_LEVEL}` in a compose file passes one): it would silence errors too.
pub fn checked_filter(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Ok("info".to_owned());
    }
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if level.parse::<LevelFilter>().is_err() {
            return Err(format!(
                "`{directive}`: expected a level (trace, debug, info, warn, error, off) or \
                 TARGET=LEVEL"
            ));
        }
    }
    EnvFilter::try_new(text).map_err(|err| err.to_string())?;
    Ok(text.to_owned())
}

/// The target of the event that says why the process stopped: never filtered out.
pub const FATAL: &str = "scalegate::fatal";

/// Installs the global subscriber writing to stderr. `level` is a filter [`checked_filter`]
/// accepted, such as `info` or `info,scalegate=debug`. Colours only when stderr is a terminal.
pub fn init(format: LogFormat, level: &str) {
    let mut filter = EnvFilter::try_new(level).expect("a filter checked_filter accepted");
    // The error that stops the process is always written, whatever the filter leaves out.
    filter = filter.add_directive(format!("{FATAL}=error").parse().expect("a valid directive"));
    if !level.contains("rustls") {
        // rustls warns once per handshake about things clients choose (an IP address sent as
        // SNI, as wrk and many scripts do): a log line per connection any client can trigger.
        filter = filter.add_directive("rustls=error".parse().expect("a valid directive"));
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder
            .with_writer(|| Lossy(OneLine(std::io::stderr())))
            .try_init(),
        LogFormat::Json => builder
            .with_writer(|| Lossy(std::io::stderr()))
            .json()
            .flatten_event(true)
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
}

/// Stderr for the text format, which writes each event whole in one call: a line break inside
/// a value (an error text, a name from outside) is written escaped, so one event stays one line
/// and nothing a peer sends can forge a log line of its own. JSON escapes them itself.
struct OneLine<W>(W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, event: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(&one_line(event))?;
        Ok(event.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A writer whose failures lose the line, not the process: tracing-subscriber reports a failed
/// write with `eprintln!`, which panics when stderr is what failed (a full disk, a log reader
/// gone: a restarted shipper or journald), and the gateway died at its next log line. nginx
/// and HAProxy carry on without the line too.
struct Lossy<W>(W);

impl<W: Write> Write for Lossy<W> {
    fn write(&mut self, event: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.write_all(event);
        Ok(event.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// `event` with every CR and LF but a final LF written as `\r` and `\n`.
fn one_line(event: &[u8]) -> Cow<'_, [u8]> {
    let body = event.strip_suffix(b"\n").unwrap_or(event);
    if !body.iter().any(|&b| b == b'\n' || b == b'\r') {
        return Cow::Borrowed(event);
    }
    let mut line = Vec::with_capacity(event.len() + 8);
    for &byte in body {
        match byte {
            b'\n' => line.extend_from_slice(b"\\n"),
            b'\r' => line.extend_from_slice(b"\\r"),
            _ => line.push(byte),
        }
    }
    line.extend_from_slice(&event[body.len()..]);
    Cow::Owned(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_event_is_written_as_one_line() {
        let plain = b"INFO scalegate: served\n";
        assert!(matches!(one_line(plain), Cow::Borrowed(_)));
        assert_eq!(
            &*one_line(b"WARN request failed error=bad\r\nINFO forged\n"),
            b"WARN request failed error=bad\\r\\nINFO forged\n"
        );
        assert_eq!(&*one_line(b"no end\nof line"), b"no end\\nof line");

        let mut written = Vec::new();
        let event = b"a\nb\n";
        assert_eq!(OneLine(&mut written).write(event).unwrap(), event.len());
        assert_eq!(written, b"a\\nb\n");
    }

    #[test]
    fn log_filters_are_levels_or_target_levels() {
        for good in [
            "info",
            "WARN",
            "info,scalegate=debug",
            "access=off,debug",
            "rustls=trace",
        ] {
            assert_eq!(checked_filter(good).as_deref(), Ok(good), "{good}");
        }
        for unset in ["", " "] {
            assert_eq!(checked_filter(unset).as_deref(), Ok("info"));
        }
        for bad in ["inof", "verbose", "info,scalegate=loud", "scalegate"] {
            let error = checked_filter(bad).unwrap_err();
            assert!(error.contains("expected a level"), "{bad}: {error}");
        }
    }
}
