//! The `scalegate` command line: thin wiring of the library's subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use scalegate::config::Config;
use scalegate::logging::{self, LogFormat};

// glibc's malloc cost about 2 µs of CPU per proxied request (an alternating A/B on the fair
// benchmark layout), much of it consolidating fastbins whenever a buffer-sized block is taken.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "scalegate",
    version,
    about = "HTTP gateway: proxy, balance, limit, cache, observe, autoscale, load-test"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        help_heading = "Logging (every command)"
    )]
    log_format: LogFormat,
    /// Log level or filter directives (e.g. info, debug, info,scalegate=trace); else the
    /// LOG_LEVEL environment variable; else info.
    #[arg(
        long,
        global = true,
        help_heading = "Logging (every command)",
        value_parser = logging::checked_filter
    )]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway, from a config file or from --listen/--upstream flags.
    Serve {
        /// TOML config file.
        #[arg(long, short, conflicts_with_all = ["file", "listen", "admin_listen", "upstream"])]
        config: Option<PathBuf>,
        /// The config file, given without --config (as `check` takes it).
        #[arg(value_name = "CONFIG", conflicts_with_all = ["listen", "admin_listen", "upstream"])]
        file: Option<PathBuf>,
        /// Address to listen on (zero-config form).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Address of the admin API and dashboard (zero-config form).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: String,
        /// Instance address (repeatable; zero-config form).
        #[arg(long)]
        upstream: Vec<String>,
    },
    /// Validate a config file and print every problem with its key.
    Check {
        /// TOML config file.
        #[arg(required_unless_present = "config_flag")]
        config: Option<PathBuf>,
        /// The config file, given as `serve` takes it.
        #[arg(
            long = "config",
            short = 'c',
            id = "config_flag",
            value_name = "CONFIG",
            conflicts_with = "config"
        )]
        config_flag: Option<PathBuf>,
    },
    /// Run a tiny demo instance (for the quickstart, tests and benchmarks).
    DemoBackend(scalegate::demo::DemoConfig),
    /// Generate HTTP load and report latency percentiles.
    Bench(scalegate::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Read here rather than by clap, whose global flag given on one level would still have the
    // variable checked on the other: a flag must win over a bad LOG_LEVEL.
    let level = match cli.log_level {
        Some(level) => level,
        None => match logging::checked_filter(&std::env::var("LOG_LEVEL").unwrap_or_default()) {
            Ok(level) => level,
            Err(err) => {
                eprintln!("error: LOG_LEVEL: {err}");
                return ExitCode::from(2);
            }
        },
    };
    logging::init(cli.log_format, &level);
    let result = match cli.command {
        Command::Serve {
            config,
            file,
            listen,
            admin_listen,
            upstream,
        } => serve(config.or(file), &listen, &admin_listen, &upstream),
        Command::Check {
            config,
            config_flag,
        } => {
            let config = config.or(config_flag).expect("clap requires one");
            match Config::load(&config) {
                Ok(loaded) => {
                    // As `nginx -t` says its warnings: they do not make the file invalid.
                    let now = std::time::SystemTime::now();
                    for (key, warning) in loaded.tls.iter().flat_map(|tls| tls.warnings(now)) {
                        eprintln!("warning: {key}: {warning}");
                    }
                    println!("{}: ok", config.display());
                    Ok(())
                }
                Err(errors) => Err(anyhow::anyhow!("{}: invalid\n{errors}", config.display())),
            }
        }
        Command::DemoBackend(demo) => runtime(scalegate::config::cpus_available()).and_then(|rt| {
            rt.block_on(scalegate::demo::run(demo))
                .context("demo-backend")
        }),
        Command::Bench(args) => return ExitCode::from(scalegate::bench::run_cli(args) as u8),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A JSON log stays JSON to its last line, so a collector does not drop the one that
            // says why the process stopped.
            match cli.log_format {
                LogFormat::Json => tracing::error!(target: logging::FATAL, "{err:#}"),
                LogFormat::Text => eprintln!("error: {err:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn serve(
    path: Option<PathBuf>,
    listen: &str,
    admin_listen: &str,
    upstreams: &[String],
) -> anyhow::Result<()> {
    let config = match &path {
        Some(path) => Config::load(path)
            .map_err(|errors| anyhow::anyhow!("{}: invalid\n{errors}", path.display()))?,
        None if upstreams.is_empty() => {
            anyhow::bail!(
                "give --config FILE, or --upstream ADDR (repeatable) for the zero-config form"
            )
        }
        None => Config::from_flags(listen, admin_listen, upstreams)
            .map_err(|errors| anyhow::anyhow!("invalid flags\n{errors}"))?,
    };
    let rt = runtime(config.server.worker_threads())?;
    let served = rt.block_on(scalegate::proxy::serve(config, path));
    // Not the runtime's drop, which waits for every blocking thread: a reload stuck reading a
    // file on a hung mount would hold the exit (and ignore every further signal) for good. A
    // second is for the tasks to end: a tunnel cut by the grace logs its request as it goes.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    served.context("serve")
}

const EVENT_INTERVAL: u32 = 255;

/// A runtime of `workers` threads; a single worker runs on the current thread, which avoids
/// cross-thread wake-ups.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    // How many tasks run between two looks at the sockets (tokio's default is 61). Under load the
    // run queue rarely empties, so this sets how often the I/O driver is polled: every 255 tasks
    // took 6-8 % less CPU per request at 256 connections, and a lower p99, than 61 did (bench/
    // compare.sh, alternating runs, 2026-11-27); 8 cost CPU, 1024 was the same as 255. Timers
    // are looked at as often, which under full load delays one by at most about a millisecond.
    builder.event_interval(EVENT_INTERVAL);
    builder.enable_all().build().context("tokio runtime")
}
