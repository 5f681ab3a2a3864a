//! The `ember` binary.

use std::process::ExitCode;

use clap::Parser;
use ember_worker::cli::{run, Cli};
use ember_worker::telemetry;

fn main() -> ExitCode {
    telemetry::mark_process_start();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // candle sizes its CPU thread pool from this variable; set before any work starts
        // and before the runtime spawns threads.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
