//! The `ember` binary.

use std::process::ExitCode;

use clap::Parser;
use ember_worker::cli::{run, Cli};
use ember_worker::telemetry;

fn main() -> ExitCode {
    telemetry::mark_process_start();
    let cli = Cli::parse();
    // Before the runtime spawns threads.
    telemetry::set_thread_count(cli.threads);
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
