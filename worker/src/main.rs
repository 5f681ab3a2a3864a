//! The `ember` binary.

use std::process::ExitCode;

use clap::Parser;
use ember_worker::cli::{run, Cli};
use ember_worker::telemetry;

fn main() -> ExitCode {
    telemetry::mark_process_start();
    // Errors are sentences for the user: no backtrace inside their text (candle's errors
    // capture one when RUST_BACKTRACE is set). Panics still honour RUST_BACKTRACE. Set before
    // any thread exists.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    // Before the runtime spawns threads.
    telemetry::set_thread_count(cli.threads);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The trace exporter is a task on the runtime.
    let tracing = match runtime.block_on(async { telemetry::init(cli.log_format, cli.command.default_log_level()) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    tracing.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
