//! Arrival traces for the simulator: when each job arrives and how many tokens it
//! generates.
//!
//! Two file formats:
//! - JSON: `{"name": "spike", "tokens": 128, "seed": 7, "duration_s": 1800, "segments":
//!   [{"from_s": 0, "to_s": 600, "rate_per_s": 0.5}, {"from_s": 600, "to_s": 601, "jobs":
//!   300}]}`. A segment has either `jobs` (spread evenly over it; all at `from_s` when
//!   `to_s` equals it) or `rate_per_s` (Poisson arrivals from a seeded generator, so the
//!   same file always gives the same trace), and may set its own `tokens`. `arrivals`, a
//!   list of seconds, adds single jobs.
//! - CSV: one job a line, `at_s[,tokens]`; a header line and `#` comments are skipped.
//!   `scripts/azure-trace.py` converts Azure's public LLM inference trace to it.

use std::path::Path;

use serde::Deserialize;

/// Tokens a job generates when the trace does not say.
pub const DEFAULT_TOKENS: u32 = 128;

/// One job of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceJob {
    /// Arrival, seconds from the start.
    pub at: f64,
    /// Tokens it generates.
    pub tokens: u32,
}

/// A trace: jobs sorted by arrival.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Its name in tables.
    pub name: String,
    /// The jobs, by arrival.
    pub jobs: Vec<TraceJob>,
    /// How long the trace lasts (at least the last arrival).
    pub duration: f64,
}

/// A trace file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Reading failed.
    #[error("reading the trace {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid JSON for a trace.
    #[error("the trace {path} is not a JSON trace (see `ember autoscale simulate --help`): {message}")]
    Json {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// A bad CSV line.
    #[error("{path} line {line}: {message} (want `at_s[,tokens]`)")]
    Csv {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// Why.
        message: String,
    },
    /// Values that make no trace.
    #[error("the trace {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceFile {
    name: Option<String>,
    tokens: Option<u32>,
    #[serde(default)]
    seed: u64,
    duration_s: Option<f64>,
    #[serde(default)]
    segments: Vec<Segment>,
    #[serde(default)]
    arrivals: Vec<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Segment {
    from_s: f64,
    to_s: f64,
    jobs: Option<u64>,
    rate_per_s: Option<f64>,
    tokens: Option<u32>,
}

/// SplitMix64: a small, seedable generator, so traces are the same on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Trace {
    /// Reads a `.json` or `.csv` trace; the name defaults to the file stem.
    pub fn load(path: &Path) -> Result<Self, TraceError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io { path: shown.clone(), source })?;
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| shown.clone());
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
            Self::from_csv(&stem, &text, &shown)
        } else {
            Self::from_json(&stem, &text, &shown)
        }
    }

    /// Parses a JSON trace (see the module docs); `path` is for messages.
    pub fn from_json(default_name: &str, text: &str, path: &str) -> Result<Self, TraceError> {
        let file: TraceFile =
            serde_json::from_str(text).map_err(|e| TraceError::Json { path: path.into(), message: e.to_string() })?;
        let invalid = |message: String| TraceError::Invalid { path: path.into(), message };
        let tokens = file.tokens.unwrap_or(DEFAULT_TOKENS);
        let mut rng = SplitMix64(file.seed);
        let mut jobs: Vec<TraceJob> = file.arrivals.iter().map(|&at| TraceJob { at, tokens }).collect();
        for (i, s) in file.segments.iter().enumerate() {
            if !(s.from_s.is_finite() && s.to_s.is_finite() && s.from_s >= 0.0 && s.to_s >= s.from_s) {
                return Err(invalid(format!("segment {i}: want 0 <= from_s <= to_s")));
            }
            let tokens = s.tokens.unwrap_or(tokens);
            match (s.jobs, s.rate_per_s) {
                (Some(n), None) => {
                    let step = if n == 0 { 0.0 } else { (s.to_s - s.from_s) / n as f64 };
                    jobs.extend((0..n).map(|k| TraceJob { at: s.from_s + step * k as f64, tokens }));
                }
                (None, Some(rate)) if rate.is_finite() && rate >= 0.0 => {
                    if rate > 0.0 {
                        let mut at = s.from_s;
                        loop {
                            at += -(1.0 - rng.next_f64()).ln() / rate;
                            if at >= s.to_s {
                                break;
                            }
                            jobs.push(TraceJob { at, tokens });
                        }
                    }
                }
                _ => return Err(invalid(format!("segment {i}: give either `jobs` or a non-negative `rate_per_s`"))),
            }
        }
        if jobs.iter().any(|j| !(j.at.is_finite() && j.at >= 0.0) || j.tokens == 0) {
            return Err(invalid("arrivals must be at 0 s or later, with tokens above 0".into()));
        }
        jobs.sort_by(|a, b| a.at.total_cmp(&b.at));
        let last = jobs.last().map_or(0.0, |j| j.at);
        let end = file.segments.iter().map(|s| s.to_s).fold(last, f64::max);
        Ok(Self {
            name: file.name.unwrap_or_else(|| default_name.to_string()),
            jobs,
            duration: file.duration_s.unwrap_or(end).max(end),
        })
    }

    /// Parses a CSV trace (see the module docs); `path` is for messages.
    pub fn from_csv(name: &str, text: &str, path: &str) -> Result<Self, TraceError> {
        let mut jobs = Vec::new();
        let mut first = true;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // A header is the first line that is not a comment (comments may come first: a
            // converted trace carries its source's citation there).
            let header = first && line.starts_with(|c: char| c.is_alphabetic());
            first = false;
            if header {
                continue;
            }
            let err = |message: String| TraceError::Csv { path: path.into(), line: i + 1, message };
            let mut cols = line.split(',').map(str::trim);
            let at: f64 = cols.next().unwrap_or_default().parse().map_err(|e| err(format!("arrival time: {e}")))?;
            let tokens = match cols.next() {
                Some(t) => t.parse().map_err(|e| err(format!("tokens: {e}")))?,
                None => DEFAULT_TOKENS,
            };
            if !(at.is_finite() && at >= 0.0) || tokens == 0 {
                return Err(err("want an arrival at 0 s or later and tokens above 0".into()));
            }
            jobs.push(TraceJob { at, tokens });
        }
        jobs.sort_by(|a, b| a.at.total_cmp(&b.at));
        let duration = jobs.last().map_or(0.0, |j| j.at);
        Ok(Self { name: name.to_string(), jobs, duration })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_segments_are_deterministic() -> Result<(), TraceError> {
        let text = r#"{"name": "t", "seed": 3, "tokens": 64, "segments": [
            {"from_s": 0, "to_s": 0, "jobs": 5},
            {"from_s": 10, "to_s": 110, "rate_per_s": 2.0, "tokens": 16},
            {"from_s": 200, "to_s": 210, "jobs": 10}], "arrivals": [300]}"#;
        let a = Trace::from_json("x", text, "t.json")?;
        let b = Trace::from_json("x", text, "t.json")?;
        assert_eq!(a, b);
        assert_eq!(a.name, "t");
        assert_eq!(a.jobs.iter().filter(|j| j.at == 0.0).count(), 5);
        let poisson = a.jobs.iter().filter(|j| j.tokens == 16).count();
        assert!((150..250).contains(&poisson), "{poisson} arrivals at 2/s over 100 s");
        assert_eq!(a.jobs.iter().filter(|j| (200.0..210.0).contains(&j.at)).count(), 10);
        assert_eq!(a.duration, 300.0);
        Ok(())
    }

    #[test]
    fn bad_traces_say_what_is_wrong() {
        let e = Trace::from_json("x", r#"{"segments": [{"from_s": 5, "to_s": 1, "jobs": 1}]}"#, "a.json");
        assert!(e.is_err_and(|e| e.to_string().contains("segment 0")));
        let e = Trace::from_json("x", r#"{"segments": [{"from_s": 0, "to_s": 1}]}"#, "a.json");
        assert!(e.is_err_and(|e| e.to_string().contains("either `jobs`")));
        let e = Trace::from_csv("x", "at_s,tokens\n1,10\nsoon,3\n", "a.csv");
        assert!(e.is_err_and(|e| e.to_string().contains("a.csv line 3")));
    }

    #[test]
    fn csv_traces() -> Result<(), TraceError> {
        let t = Trace::from_csv("c", "at_s,tokens\n# comment\n2.5,10\n1\n", "c.csv")?;
        assert_eq!(t.jobs, [TraceJob { at: 1.0, tokens: DEFAULT_TOKENS }, TraceJob { at: 2.5, tokens: 10 }]);
        // A citation before the header, as scripts/azure-trace.py writes it.
        let t = Trace::from_csv("c", "# CC-BY 4.0, cite ...\nat_s,tokens\n0.000,44\n4.315,109\n", "c.csv")?;
        assert_eq!(t.jobs.len(), 2);
        assert!(Trace::from_csv("c", "at_s,tokens\nat_s,tokens\n", "c.csv").is_err(), "one header only");
        Ok(())
    }
}
