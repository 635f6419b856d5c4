//! `scalegate bench`: the load generator and its report.

use clap::Args;

/// Command-line arguments of `scalegate bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Target URL(s).
    #[arg(required = true)]
    pub urls: Vec<String>,
}

/// Runs the load generator and returns the process exit code.
pub fn run_cli(args: BenchArgs) -> i32 {
    eprintln!("bench is not built yet: {:?}", args.urls);
    2
}
