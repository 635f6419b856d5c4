//! Logging set-up: `tracing` with text or JSON output, level from `--log-level` or `LOG_LEVEL`.

use std::io::IsTerminal;

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

/// Installs the global subscriber writing to stderr. `level` is a filter [`checked_filter`]
/// accepted, such as `info` or `info,scalegate=debug`. Colours only when stderr is a terminal.
pub fn init(format: LogFormat, level: &str) {
    let mut filter = EnvFilter::try_new(level).expect("a filter checked_filter accepted");
    if !level.contains("rustls") {
        // rustls warns once per handshake about things clients choose (an IP address sent as
        // SNI, as wrk and many scripts do): a log line per connection any client can trigger.
        filter = filter.add_directive("rustls=error".parse().expect("a valid directive"));
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
}

#[cfg(test)]
mod tests {
    use super::*;

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
