//! Numbers a state reads from its input through a `...Path` field (Wait's `SecondsPath`,
//! Map's `MaxConcurrencyPath`, `ToleratedFailureCountPath`, `ToleratedFailurePercentagePath`),
//! checked as AWS checks them. Each bad value is a `States.Runtime` error whose cause is AWS's
//! own text, as recorded in LocalStack's AWS snapshots (`tests/aws/services/stepfunctions/v2/
//! base/test_wait.snapshot.json`, `scenarios/test_base_scenarios.snapshot.json`).

use serde_json::Value;

use super::error::StatesError;

/// The longest wait AWS schedules: a delay that does not fit a Java `int` of seconds is
/// `Wait state delay is too long.` (24855 days waits, 24856 days fails).
pub const MAX_WAIT_SECONDS: f64 = i32::MAX as f64;

/// How AWS quotes a value in these causes: a string bare, anything else as JSON.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A JSON integer (written without a fraction); `1.5`, `"3"` and `{}` are not.
fn integer(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_u64().map(|u| u.min(i64::MAX as u64) as i64))
}

/// `SecondsPath`'s value `v` (found at `path`): a non-negative integer.
pub fn wait_seconds(v: &Value, path: &str) -> Result<f64, StatesError> {
    let n = integer(v).ok_or_else(|| {
        StatesError::runtime(format!(
            "The SecondsPath parameter cannot be parsed as a long value: {path} == {}",
            shown(v)
        ))
    })?;
    if n < 0 {
        return Err(StatesError::runtime(format!(
            "The SecondsPath parameter references a negative value: {path} == {n}"
        )));
    }
    Ok(n as f64)
}

/// The error for a `SecondsPath` that selects nothing.
pub fn wait_seconds_missing(path: &str) -> StatesError {
    StatesError::runtime(format!("The SecondsPath parameter does not reference an input value: {path}"))
}

/// Fails a wait longer than AWS schedules.
pub fn check_wait_length(seconds: f64) -> Result<f64, StatesError> {
    if seconds > MAX_WAIT_SECONDS {
        Err(StatesError::runtime("Wait state delay is too long."))
    } else {
        Ok(seconds)
    }
}

fn not_integer(field: &str, v: &Value, path: &str) -> StatesError {
    StatesError::runtime(format!(
        "The {field} field refers to value \"{}\" which is not a valid integer: {path}",
        shown(v)
    ))
}

/// `MaxConcurrencyPath`'s value: a non-negative integer (0 = no limit).
pub fn max_concurrency(v: &Value, path: &str) -> Result<u64, StatesError> {
    // A string holding an integer is accepted (recorded: a variable holding "1", LocalStack's
    // `v2/assign/test_assign_reference_variables` MAP_STATE_REFERENCE_IN_MAX_CONCURRENCY_PATH).
    let n = integer(v)
        .or_else(|| v.as_str().and_then(|s| s.parse::<i64>().ok()))
        .ok_or_else(|| not_integer("MaxConcurrencyPath", v, path))?;
    // AWS accepts a negative value and then never runs the Map (LocalStack's recording
    // `test_max_concurrency_path_negative` stops after ExecutionStarted); failing says why.
    u64::try_from(n).map_err(|_| StatesError::runtime("MaxConcurrency cannot be negative."))
}

/// `ToleratedFailureCountPath`'s value: a non-negative integer.
pub fn tolerated_count(v: &Value, path: &str) -> Result<u64, StatesError> {
    let n = integer(v).ok_or_else(|| not_integer("ToleratedFailureCountPath", v, path))?;
    u64::try_from(n).map_err(|_| StatesError::runtime("ToleratedFailureCount cannot be negative."))
}

/// `ToleratedFailurePercentagePath`'s value: a number from 0 to 100.
pub fn tolerated_percentage(v: &Value, path: &str) -> Result<f64, StatesError> {
    let p = v.as_f64().ok_or_else(|| {
        StatesError::runtime(format!(
            "The ToleratedFailurePercentagePath field refers to value \"{}\" which is not a valid float: {path}",
            shown(v)
        ))
    })?;
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(StatesError::runtime("ToleratedFailurePercentage must be between 0 and 100."))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wait_seconds_are_non_negative_integers() {
        assert_eq!(wait_seconds(&json!(0), "$.s").unwrap(), 0.0);
        assert_eq!(wait_seconds(&json!(7), "$.s").unwrap(), 7.0);
        let e = wait_seconds(&json!(1.5), "$.s").unwrap_err();
        assert_eq!(e.error, "States.Runtime");
        assert_eq!(e.cause, "The SecondsPath parameter cannot be parsed as a long value: $.s == 1.5");
        let e = wait_seconds(&json!(-1.5), "$.s").unwrap_err();
        assert!(e.cause.contains("cannot be parsed as a long value"), "{}", e.cause);
        let e = wait_seconds(&json!(-1), "$.s").unwrap_err();
        assert_eq!(e.cause, "The SecondsPath parameter references a negative value: $.s == -1");
        let e = wait_seconds(&json!("10"), "$.s").unwrap_err();
        assert_eq!(e.cause, "The SecondsPath parameter cannot be parsed as a long value: $.s == 10");
        assert!(check_wait_length(MAX_WAIT_SECONDS).is_ok());
        assert_eq!(check_wait_length(MAX_WAIT_SECONDS + 1.0).unwrap_err().cause, "Wait state delay is too long.");
    }

    #[test]
    fn map_limits_quote_the_value_as_aws_does() {
        assert_eq!(max_concurrency(&json!(0), "$.m").unwrap(), 0);
        let e = max_concurrency(&json!("NoNumber"), "$.m").unwrap_err();
        assert_eq!(
            e.cause,
            "The MaxConcurrencyPath field refers to value \"NoNumber\" which is not a valid integer: $.m"
        );
        let e = max_concurrency(&json!({}), "$.m").unwrap_err();
        assert_eq!(e.cause, "The MaxConcurrencyPath field refers to value \"{}\" which is not a valid integer: $.m");
        assert!(max_concurrency(&json!(1.5), "$.m").is_err());
        assert!(max_concurrency(&json!(-1), "$.m").is_err());
        assert_eq!(tolerated_count(&json!(1), "$.c").unwrap(), 1);
        assert_eq!(tolerated_count(&json!(-1), "$.c").unwrap_err().cause, "ToleratedFailureCount cannot be negative.");
        assert_eq!(tolerated_percentage(&json!(1.1), "$.p").unwrap(), 1.1);
        assert_eq!(tolerated_percentage(&json!(100), "$.p").unwrap(), 100.0);
        assert_eq!(
            tolerated_percentage(&json!(100.1), "$.p").unwrap_err().cause,
            "ToleratedFailurePercentage must be between 0 and 100."
        );
        let e = tolerated_percentage(&json!("NoNumber"), "$.p").unwrap_err();
        assert!(e.cause.ends_with("\"NoNumber\" which is not a valid float: $.p"), "{}", e.cause);
    }
}
