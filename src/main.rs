//! The `scalegate` command line: thin wiring of the library's subcommands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use scalegate::logging::{self, LogFormat};

#[derive(Parser)]
#[command(name = "scalegate", version, about = "HTTP gateway: proxy, balance, limit, cache, observe, autoscale, load-test")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log level or filter directive (e.g. info, debug, scalegate=trace).
    #[arg(long, global = true, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a tiny demo instance (for the quickstart, tests and benchmarks).
    DemoBackend(scalegate::demo::DemoConfig),
    /// Generate HTTP load and report latency percentiles.
    Bench(scalegate::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, &cli.log_level);
    match cli.command {
        Command::DemoBackend(config) => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(scalegate::demo::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: demo-backend: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bench(args) => ExitCode::from(scalegate::bench::run_cli(args) as u8),
    }
}
