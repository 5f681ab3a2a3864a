//! Structured logs on stderr: JSON in Lambda (or when asked), human-readable elsewhere; and
//! OpenTelemetry traces when an OTLP endpoint is configured ([`otel`]).

use std::sync::OnceLock;
use std::time::Instant;

use tracing_subscriber::EnvFilter;

pub mod metrics;
pub mod otel;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Marks the process start; call first thing in `main`.
pub fn mark_process_start() {
    let _ = PROCESS_START.get_or_init(Instant::now);
}

/// Seconds since [`mark_process_start`].
pub fn since_process_start() -> f64 {
    PROCESS_START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs: JSON when running in AWS Lambda, text otherwise, unless a format is given;
/// `default_level` applies when `EMBER_LOG` is unset (an `EnvFilter` directive such as `warn`).
/// Traces: see [`otel`]. Call inside the tokio runtime; keep the answer until the end and shut
/// it down.
pub fn init(format: Option<LogFormat>, default_level: &str) -> Result<otel::Tracing, otel::TraceError> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let format = format.unwrap_or(if in_lambda() { LogFormat::Json } else { LogFormat::Text });
    // Trace spans are for the trace backend, not the logs (unless EMBER_LOG asks for them).
    let filter = EnvFilter::try_from_env("EMBER_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let filter = match format!("{}=off", otel::TARGET).parse() {
        Ok(d) if !std::env::var("EMBER_LOG").is_ok_and(|v| v.contains(otel::TARGET)) => filter.add_directive(d),
        _ => filter,
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(BarSafeStderr).with_ansi(ansi);
    let logs = match format {
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
        LogFormat::Text => fmt.compact().fmt_fields(EscapedFields::default()).with_filter(filter).boxed(),
    };
    let (traces, guard) = otel::layer()?;
    // Only Ember's trace spans, and its warnings and errors as events on them.
    let traces = traces.map(|l| {
        l.with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.target() == otel::TARGET
                || (m.is_event() && *m.level() <= tracing::Level::WARN && m.target().starts_with("ember"))
        }))
    });
    let _ = tracing_subscriber::registry().with(logs).with(traces).try_init();
    Ok(guard)
}

/// Stderr for log lines, one event at a time, written with the progress bars cleared
/// ([`ember_model_loader::progress::suspend`]) so that a line never lands inside a bar.
struct BarSafeStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BarSafeStderr {
    type Writer = EventBuffer;

    fn make_writer(&'a self) -> EventBuffer {
        EventBuffer(Vec::new())
    }
}

/// One event's text, written out whole when the formatter is done with it (on drop).
struct EventBuffer(Vec<u8>);

impl std::io::Write for EventBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventBuffer {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.0);
        // A log line that cannot be written has nowhere else to go.
        ember_model_loader::progress::suspend(|| {
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), &text);
        });
    }
}

/// Text-log fields with every control character escaped (`\n` as the two characters `\` `n`),
/// so no field can start a line of its own: a job's `custom_id`, error message or prompt text
/// reaches the logs, and a newline in it would otherwise forge a log line. JSON logs need no
/// help (JSON strings escape control characters).
#[derive(Default)]
pub struct EscapedFields(tracing_subscriber::fmt::format::DefaultFields);

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut buf = String::new();
        self.0.format_fields(tracing_subscriber::fmt::format::Writer::new(&mut buf), fields)?;
        writer.write_str(&escape_controls(&buf))
    }
}

/// `text` with control characters written as Rust escapes (`\n`, `\r`, `\t`, `\u{1b}`).
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Whether this process runs in AWS Lambda (or under a local Lambda runtime emulator).
pub fn in_lambda() -> bool {
    std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some() || std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some()
}

/// Fixes the CPU thread count for model execution before any work starts: `requested`, or the
/// count candle would pick. Candle reads `RAYON_NUM_THREADS` on every matrix multiplication
/// and, when it is unset, parses `/proc/cpuinfo` each time (measured at 7% of a worker's CPU
/// time on one-token jobs); setting it once avoids that.
///
/// Call at the start of `main`, before any other thread exists: changing the environment
/// while other threads may read it is racy.
pub fn set_thread_count(requested: Option<usize>) {
    let n = requested.unwrap_or_else(candle_core::utils::get_num_threads).max(1);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("plain id"), "plain id");
        assert_eq!(escape_controls("a\nINFO forged\r\u{1b}[31m"), "a\\nINFO forged\\r\\u{1b}[31m");
    }
}
