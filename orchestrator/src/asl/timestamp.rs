//! RFC 3339 timestamps as Step Functions accepts them (uppercase `T`, `Z` or an offset).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_smithy_types::date_time::{DateTime, Format};

/// Seconds since the Unix epoch (with fraction), or `None` when `s` is not a timestamp.
pub fn parse(s: &str) -> Option<f64> {
    if !s.contains('T') || s.contains('t') || s.ends_with('z') {
        return None;
    }
    let dt = DateTime::from_str(s, Format::DateTimeWithOffset).ok()?;
    Some(dt.as_secs_f64())
}

/// Formats a time as Step Functions does in the context object (`2026-11-28T05:45:29.123Z`).
pub fn format(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let millis = Duration::from_millis(d.as_millis() as u64);
    DateTime::from(UNIX_EPOCH + millis).fmt(Format::DateTime).unwrap_or_default()
}

/// The time a timestamp names.
pub fn to_system_time(s: &str) -> Option<SystemTime> {
    let secs = parse(s)?;
    if secs >= 0.0 {
        Some(UNIX_EPOCH + Duration::from_secs_f64(secs))
    } else {
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn parses_offsets_and_rejects_lowercase() {
        assert_eq!(super::parse("2026-01-01T00:00:00Z"), Some(1767225600.0));
        assert_eq!(super::parse("2026-01-01T02:00:00+02:00"), Some(1767225600.0));
        assert_eq!(super::parse("2026-01-01t00:00:00z"), None);
        assert_eq!(super::parse("hello"), None);
        let s = super::format(std::time::UNIX_EPOCH + std::time::Duration::from_millis(1767225600123));
        assert_eq!(s, "2026-01-01T00:00:00.123Z");
    }
}
