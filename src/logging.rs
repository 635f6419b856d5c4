//! Logging set-up: `tracing` with text or JSON output, level from `--log-level` or `LOG_LEVEL`.

use tracing_subscriber::EnvFilter;

/// Output format of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber writing to stderr. `level` is an `EnvFilter` directive
/// such as `info` or `scalegate=debug`.
pub fn init(format: LogFormat, level: &str) {
    let mut filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    if !level.contains("rustls") {
        // rustls warns once per handshake about things clients choose (an IP address sent as
        // SNI, as wrk and many scripts do): a log line per connection any client can trigger.
        filter = filter.add_directive("rustls=error".parse().expect("a valid directive"));
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
}
