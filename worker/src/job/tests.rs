//! Validation from realistic batch lines, good and bad; no model needed (the token counter is
//! a stand-in).

use std::collections::HashSet;

use ember_model_loader::Message;
use serde_json::{json, Value};

use super::*;
use ember_engine::{Prompt, SamplingParams};

const MSG: &str = "6f1c1d52-9a55-4e0b-8f6e-2b8f3d4c5a61";

fn limits() -> JobLimits {
    JobLimits {
        models: vec!["smollm2".into(), "tinyllama".into()],
        max_tokens_limit: 1024,
        default_max_tokens: 64,
        context_length: 2048,
        max_body_bytes: 1024 * 1024,
    }
}

/// An encoder for the rules' tests: every prompt is ten tokens (the engine's real encoder is
/// tested with the model).
fn ten_tokens(_: &Prompt, _: bool) -> Result<Vec<u32>, String> {
    Ok(vec![1; 10])
}

fn chat_line() -> Value {
    json!({
        "custom_id": "request-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32
        }
    })
}

/// `chat_line()` with `edit` applied.
fn edited(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut line = chat_line();
    edit(&mut line);
    line.to_string().into_bytes()
}

fn check(body: &[u8]) -> Result<ValidJob, Box<RejectedJob>> {
    validate(body, MSG, &limits(), &ten_tokens)
}

fn refused(body: &[u8]) -> RejectedJob {
    match check(body) {
        Ok(job) => panic!("accepted a bad line: {job:?}"),
        Err(r) => *r,
    }
}

#[test]
fn each_rule_has_its_own_error() {
    let long_content = "x".repeat(1024 * 1024 + 10);
    let cases: [(&str, Vec<u8>); 31] = [
        ("body_too_large", edited(|l| l["body"]["messages"][0]["content"] = json!(long_content))),
        ("not_utf8", b"{\"custom_id\": \"caf\xe9\", \"method\": \"POST\"}".to_vec()),
        ("invalid_json", br#"{"custom_id": "request-1", "method": "POST",, "url": "/v1/completions"}"#.to_vec()),
        ("not_an_object", b"[\"request-1\"]".to_vec()),
        ("invalid_type", edited(|l| l["body"]["max_tokens"] = json!("thirty-two"))),
        ("missing_custom_id", edited(|l| l["custom_id"] = json!(""))),
        ("invalid_custom_id", edited(|l| l["custom_id"] = json!("../../etc/passwd"))),
        ("invalid_batch_id", edited(|l| l["ember"] = json!({"batch_id": "a/b"}))),
        ("result_key_not_allowed", edited(|l| l["ember"] = json!({"result_key": "results/b1/victim.json"}))),
        ("unknown_ember_field", edited(|l| l["ember"] = json!({"result_kye": "x.json"}))),
        ("unsupported_method", edited(|l| l["method"] = json!("GET"))),
        ("unsupported_url", edited(|l| l["url"] = json!("/v1/embeddings"))),
        ("missing_body", edited(|l| l["body"] = Value::Null)),
        ("missing_model", edited(|l| l["body"]["model"] = json!(""))),
        ("model_not_found", edited(|l| l["body"]["model"] = json!("gpt-4o"))),
        ("unknown_parameter", edited(|l| l["body"]["max_token"] = json!(5))),
        ("unsupported_parameter", edited(|l| l["body"]["n"] = json!(2))),
        ("missing_messages", edited(|l| l["body"]["messages"] = Value::Null)),
        ("empty_messages", edited(|l| l["body"]["messages"] = json!([]))),
        ("unknown_role", edited(|l| l["body"]["messages"][0]["role"] = json!("tool"))),
        ("empty_content", edited(|l| l["body"]["messages"][0]["content"] = json!("  "))),
        (
            "unsupported_content_part",
            edited(|l| {
                l["body"]["messages"][0]["content"] =
                    json!([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}])
            }),
        ),
        ("missing_prompt", edited(|l| l["url"] = json!("/v1/completions"))),
        (
            "empty_prompt",
            edited(|l| {
                l["url"] = json!("/v1/completions");
                l["body"] = json!({"model": "smollm2", "prompt": ""});
            }),
        ),
        ("max_tokens_not_positive", edited(|l| l["body"]["max_tokens"] = json!(-5))),
        ("max_tokens_over_limit", edited(|l| l["body"]["max_tokens"] = json!(5000))),
        ("conflicting_max_tokens", edited(|l| l["body"]["max_completion_tokens"] = json!(8))),
        ("invalid_temperature", edited(|l| l["body"]["temperature"] = json!(3.5))),
        ("invalid_top_p", edited(|l| l["body"]["top_p"] = json!(0))),
        ("invalid_repetition_penalty", edited(|l| l["body"]["repetition_penalty"] = json!(-1))),
        ("too_many_stop_sequences", edited(|l| l["body"]["stop"] = json!(["a", "b", "c", "d", "e"]))),
    ];
    let mut labels = HashSet::new();
    for (label, body) in &cases {
        let r = refused(body);
        assert_eq!(r.error.label(), *label, "{}", r.error);
        assert!(!r.error.is_retryable(), "{label}");
        assert!(labels.insert(r.error.label()), "{label} used twice");
    }
    // The two rules that need the tokenizer.
    let too_long = validate(&edited(|_| {}), MSG, &limits(), &|_, _| Ok(vec![1; 4096])).err().map(|r| r.error);
    assert_eq!(too_long, Some(JobError::PromptTooLong { prompt_tokens: 4096, context: 2048 }));
    let encoding = validate(&edited(|_| {}), MSG, &limits(), &|_, _| Err("roles must alternate".into()));
    assert_eq!(encoding.err().map(|r| r.error.label()), Some("prompt_encoding"));
}

#[test]
fn messages_point_at_the_problem() {
    let r = refused(b"{\"custom_id\": \"caf\xe9\"}");
    assert_eq!(r.error, JobError::NotUtf8 { at: 18 });
    assert!(r.error.to_string().contains("offset 18"));

    let r = refused(b"{\"custom_id\": \"a\",\n  \"method\": POST}");
    assert!(matches!(r.error, JobError::NotJson { line: 2, column: 13, .. }), "{:?}", r.error);
    assert!(r.error.to_string().contains("line 2 column 13"));

    let r = refused(&edited(|l| l["body"]["max_tokens"] = json!(-5)));
    assert_eq!(r.error, JobError::MaxTokensNotPositive { field: "max_tokens", value: -5 });

    let r = refused(&edited(|l| l["body"]["model"] = json!("gpt-4o")));
    let text = r.error.to_string();
    assert!(text.contains("gpt-4o") && text.contains("smollm2, tinyllama") && text.contains("default"), "{text}");

    let r = refused(&edited(|l| l["body"]["max_tokens"] = json!(5000)));
    assert!(r.error.to_string().contains("at most 1024"));

    let big = edited(|l| l["body"]["messages"][0]["content"] = json!("x".repeat(1024 * 1024)));
    assert!(matches!(refused(&big).error, JobError::BodyTooLarge { limit: 1048576, .. }));

    let r = refused(&edited(|l| l["custom_id"] = json!("a".repeat(300))));
    assert!(r.error.to_string().contains("300 bytes"), "{}", r.error);
    let r = refused(&edited(|l| l["body"]["messages"][0]["content"] = json!([{"type": "text"}])));
    assert_eq!(r.error.param().as_deref(), Some("body.messages[0].content[0].text"));
}

#[test]
fn a_refused_job_is_still_answerable() {
    // Not JSON: no custom_id, so the queue message id stands in and the key cannot collide
    // with a real custom_id.
    let r = refused(b"not json");
    assert_eq!(r.custom_id, MSG);
    assert_eq!(r.result_key, "results/default/_rejected/6f1c1d529a554e0b8f6e2b8f3d4c5a61.json");

    // An unusable custom_id is echoed but not used as a key.
    let r = refused(&edited(|l| {
        l["custom_id"] = json!("../x");
        l["ember"] = json!({"batch_id": "b1"});
    }));
    assert_eq!((r.custom_id.as_str(), r.batch_id.as_deref()), ("../x", Some("b1")));
    assert!(r.result_key.starts_with("results/b1/_rejected/"));

    // A later error goes where the job's result would have gone.
    let r = refused(&edited(|l| {
        l["ember"] = json!({"batch_id": "b1"});
        l["body"]["messages"] = json!([]);
    }));
    assert_eq!((r.custom_id.as_str(), r.result_key.as_str()), ("request-1", "results/b1/request-1.json"));
    assert_eq!(ResultLine::rejected(&r).custom_id, "request-1");

    // A job cannot name its own key: not another job's, not a pipeline record's. It is
    // answered in its own _rejected/ slot.
    for key in ["results/b1/victim.json", "pipelines/executions/e1/hops/0.json", "results/b1/_errors/v.json"] {
        let r = refused(&edited(|l| l["ember"] = json!({"batch_id": "b1", "result_key": key})));
        assert_eq!(r.error.label(), "result_key_not_allowed");
        assert!(r.result_key.starts_with("results/b1/_rejected/"), "{key}: {}", r.result_key);
    }
}

#[test]
fn a_good_chat_line_becomes_its_request() -> Result<(), Box<RejectedJob>> {
    let body = edited(|l| {
        l["ember"] = json!({"batch_id": "nightly-7"});
        l["extra_annotation"] = json!("ignored");
        l["body"] = json!({
            "model": "default",
            "messages": [
                {"role": "developer", "content": "Answer in one word."},
                {"role": "user", "content": [{"type": "text", "text": "Capital of"}, {"type": "text", "text": "France?"}]}
            ],
            "max_completion_tokens": 16,
            "temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1, "seed": -1,
            "stop": "\n", "n": 1, "stream": false, "user": "u-42", "presence_penalty": 0, "logprobs": null
        });
    });
    let job = check(&body)?;
    assert_eq!((job.custom_id.as_str(), job.model.as_str(), job.chat), ("request-1", "smollm2", true));
    assert_eq!(
        (job.batch_id.as_deref(), job.result_key.as_str()),
        (Some("nightly-7"), "results/nightly-7/request-1.json")
    );
    assert_eq!(job.prompt_tokens, 10);
    assert_eq!(
        job.request,
        GenerateRequest {
            allow_special_tokens: false,
            prompt_ids: Some(vec![1; 10]),
            prompt: Prompt::Chat(vec![
                Message::new("system", "Answer in one word."),
                Message::new("user", "Capital of\nFrance?"),
            ]),
            max_tokens: 16,
            sampling: SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                top_k: 40,
                repetition_penalty: 1.1,
                seed: Some(u64::MAX)
            },
            stop: vec!["\n".into()],
        }
    );
    Ok(())
}

#[test]
fn a_good_completions_line_becomes_its_request() -> Result<(), Box<RejectedJob>> {
    let line = br#"{"custom_id": "c-2", "method": "POST", "url": "/v1/completions",
        "body": {"model": "tinyllama", "prompt": "Once upon a time", "stop": ["\n\n", "THE END"], "seed": 7}}
"#;
    let job = check(line)?;
    assert!(!job.chat);
    assert_eq!(job.model, "tinyllama");
    assert_eq!(job.result_key, "results/default/c-2.json");
    let want = GenerateRequest {
        allow_special_tokens: false,
        prompt_ids: Some(vec![1; 10]),
        prompt: Prompt::Text("Once upon a time".into()),
        max_tokens: 64,
        sampling: SamplingParams { seed: Some(7), ..SamplingParams::default() },
        stop: vec!["\n\n".into(), "THE END".into()],
    };
    assert_eq!(job.request, want);
    Ok(())
}

#[test]
fn the_module_example_runs() -> Result<(), Box<RejectedJob>> {
    let limits = JobLimits::new(vec!["smollm2".into()], 2048);
    let line = br#"{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
    "body": {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}}"#;
    let job = validate(line, "0b7e5c1e-6a1f-4d2b-9d5e-3f0c2a1b4c5d", &limits, &|_, _| Ok(vec![1; 3]))?;
    assert_eq!(job.result_key, "results/default/q1.json");
    let refused = validate(b"{not json", "msg-2", &limits, &|_, _| Ok(vec![1; 3])).err();
    assert_eq!(
        refused.as_deref().map(ResultLine::rejected).as_ref().and_then(ResultLine::error_code),
        Some("invalid_json")
    );
    assert_eq!(check_prompt_length(2047, 2048), Ok(()));
    Ok(())
}
