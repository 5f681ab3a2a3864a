//! Retry timing: the delay before retry `n` (0 for the first retry).

use super::definition::Retrier;

/// `min(IntervalSeconds * BackoffRate^n, MaxDelaySeconds)` in seconds, `n` = 0 for the first
/// retry. With `JitterStrategy: FULL` the caller picks uniformly in `[0, this]`
/// ([`jittered_delay`]).
pub fn retry_delay_seconds(interval_seconds: f64, backoff_rate: f64, n: u32, max_delay_seconds: Option<f64>) -> f64 {
    let d = interval_seconds * backoff_rate.powi(n as i32);
    match max_delay_seconds {
        Some(m) => d.min(m),
        None => d,
    }
}

/// The delay actually used for retry `n` of `r`, given a uniform random sample in `[0, 1)`
/// (kept as an argument so the choice is recorded and tests are deterministic).
pub fn jittered_delay(r: &Retrier, n: u32, sample: f64) -> f64 {
    let d = retry_delay_seconds(r.interval_seconds, r.backoff_rate, n, r.max_delay_seconds);
    if r.jitter_full {
        d * sample
    } else {
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        assert_eq!(retry_delay_seconds(1.0, 2.0, 0, None), 1.0);
        assert_eq!(retry_delay_seconds(1.0, 2.0, 3, None), 8.0);
        assert_eq!(retry_delay_seconds(3.0, 1.5, 2, Some(5.0)), 5.0);
        let r = Retrier {
            error_equals: vec![],
            interval_seconds: 2.0,
            max_attempts: 3,
            backoff_rate: 2.0,
            max_delay_seconds: Some(10.0),
            jitter_full: true,
        };
        assert_eq!(jittered_delay(&r, 1, 0.5), 2.0);
        assert_eq!(jittered_delay(&r, 5, 0.25), 2.5);
    }
}
