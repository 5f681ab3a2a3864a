//! Per-job and per-process metrics. Outside Lambda they are structured log events; in Lambda
//! they are also printed to stdout in CloudWatch Embedded Metric Format (EMF), which CloudWatch
//! Logs turns into metrics with no agent and no API call.

use serde_json::{json, Map, Value};

use super::in_lambda;

/// What one finished job measured.
#[derive(Debug, Clone)]
pub struct JobMetrics<'a> {
    pub message_id: &'a str,
    pub custom_id: &'a str,
    pub model: &'a str,
    /// From the message's send time to the start of its (last) run.
    pub queue_wait_s: f64,
    pub generation_s: f64,
    pub prefill_s: f64,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub receive_count: u32,
}

/// Where the start-up time of a worker process went.
#[derive(Debug, Clone)]
pub struct ColdStart<'a> {
    pub model: &'a str,
    pub fetch_s: f64,
    pub verify_s: f64,
    pub build_s: f64,
    /// Process start to ready to take jobs.
    pub ready_s: f64,
}

pub fn job(m: &JobMetrics<'_>) {
    let decode_tok_s = m.completion_tokens.saturating_sub(1) as f64 / (m.generation_s - m.prefill_s).max(1e-9);
    tracing::info!(
        message_id = m.message_id,
        custom_id = m.custom_id,
        model = m.model,
        queue_wait_s = m.queue_wait_s,
        generation_s = m.generation_s,
        prompt_tokens = m.prompt_tokens,
        completion_tokens = m.completion_tokens,
        decode_tok_s,
        receive_count = m.receive_count,
        "job done"
    );
    if in_lambda() {
        let values = [
            ("QueueWait", "Seconds", json!(m.queue_wait_s)),
            ("GenerationTime", "Seconds", json!(m.generation_s)),
            ("PromptTokens", "Count", json!(m.prompt_tokens)),
            ("CompletionTokens", "Count", json!(m.completion_tokens)),
            ("DecodeTokensPerSecond", "Count/Second", json!(decode_tok_s)),
        ];
        let props = [("custom_id", json!(m.custom_id)), ("message_id", json!(m.message_id))];
        println!("{}", emf(m.model, &values, &props));
    }
}

pub fn cold_start(m: &ColdStart<'_>) {
    tracing::info!(
        model = m.model,
        fetch_s = m.fetch_s,
        verify_s = m.verify_s,
        build_s = m.build_s,
        ready_s = m.ready_s,
        "cold start"
    );
    if in_lambda() {
        let values = [
            ("ColdStartFetch", "Seconds", json!(m.fetch_s)),
            ("ColdStartVerify", "Seconds", json!(m.verify_s)),
            ("ColdStartBuild", "Seconds", json!(m.build_s)),
            ("ColdStartReady", "Seconds", json!(m.ready_s)),
        ];
        println!("{}", emf(m.model, &values, &[]));
    }
}

/// One EMF document: the metric values as top-level members, described under `_aws`, with
/// the model as the one dimension.
pub fn emf(model: &str, values: &[(&str, &str, Value)], properties: &[(&str, Value)]) -> Value {
    let timestamp_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let definitions: Vec<Value> = values.iter().map(|(name, unit, _)| json!({"Name": name, "Unit": unit})).collect();
    let mut doc = Map::new();
    doc.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{"Namespace": "Ember", "Dimensions": [["Model"]], "Metrics": definitions}],
        }),
    );
    doc.insert("Model".into(), json!(model));
    for (name, _, value) in values {
        doc.insert((*name).into(), value.clone());
    }
    for (name, value) in properties {
        doc.insert((*name).into(), value.clone());
    }
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emf_documents_describe_every_value() {
        let doc = emf("smollm2", &[("QueueWait", "Seconds", json!(1.5))], &[("custom_id", json!("q1"))]);
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "Ember");
        assert_eq!(directive["Dimensions"], json!([["Model"]]));
        assert_eq!(directive["Metrics"], json!([{"Name": "QueueWait", "Unit": "Seconds"}]));
        assert_eq!(doc["QueueWait"], 1.5);
        assert_eq!(doc["Model"], "smollm2");
        assert_eq!(doc["custom_id"], "q1");
        assert!(doc["_aws"]["Timestamp"].as_u64().is_some_and(|t| t > 1_600_000_000_000));
    }
}
