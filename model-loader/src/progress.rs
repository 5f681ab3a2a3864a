//! The progress bars Ember draws on a terminal, kept in one [`MultiProgress`] so that log
//! lines can be written between them: [`suspend`] clears the bars, writes, and redraws them
//! below, so a log line never lands inside a bar.

use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar};

fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// Shows `bar` with the others (on stderr, when it is a terminal).
pub fn add(bar: ProgressBar) -> ProgressBar {
    bars().add(bar)
}

/// Runs `write` with the bars cleared from the terminal, then redraws them: for anything
/// written to stderr while a bar may be shown.
pub fn suspend<R>(write: impl FnOnce() -> R) -> R {
    bars().suspend(write)
}
