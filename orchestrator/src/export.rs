//! Export an Ember pipeline to AWS Step Functions: every Task whose resource is Ember's own
//! (`ember:generate`, `ember:tool:NAME`) becomes a call of the Ember Lambda function; every
//! other state is left as it is, since Ember pipelines are already Amazon States Language.
//!
//! ## What the Lambda receives and returns
//!
//! The event is `{"task": "<resource>", "input": <the task's effective input>}`: the state's
//! `Parameters` when it has them (Step Functions evaluates their `.$` paths and intrinsics as
//! Ember does), otherwise its whole input after `InputPath` (`"input.$": "$"`). The function
//! returns the task's result, the same JSON Ember's own hop would produce, or fails with the
//! task's error name (for example `Ember.InvalidInput`) so that `Retry` and `Catch` match as
//! they do in Ember.
//!
//! ## How the result keeps Ember's shape
//!
//! `arn:aws:states:::lambda:invoke` wraps the function's answer:
//! `{"Payload": <result>, "StatusCode": 200, ...}`. The export unwraps it exactly:
//! - with a `ResultSelector`, each of its paths is rewritten to read under `$.Payload`;
//! - with `ResultPath` `"$"` (the default) and no `OutputPath`, `OutputPath: "$.Payload"`;
//! - with `ResultPath: null` the result is discarded anyway;
//! - otherwise (`ResultPath` into a field, no selector) no selector or output path can
//!   unwrap it without knowing the result's fields, so that state calls the function ARN
//!   directly as its `Resource` (the Lambda integration that returns the bare payload, with
//!   the same event).
//!
//! Each exported task also retries Lambda's transient errors (throttling, service errors)
//! after its own `Retry` rules, as the AWS documentation recommends.
//!
//! ```
//! use ember_orchestrator::export::export_for_step_functions;
//! let def = serde_json::json!({"StartAt": "G", "States": {"G": {"Type": "Task", "Resource": "ember:generate", "End": true}}});
//! let arn = "arn:aws:lambda:us-east-1:123456789012:function:ember-worker";
//! let out = export_for_step_functions(&def, arn).expect("valid");
//! assert_eq!(out["States"]["G"]["Resource"], "arn:aws:states:::lambda:invoke");
//! assert_eq!(out["States"]["G"]["Parameters"]["Payload"]["task"], "ember:generate");
//! assert_eq!(out["States"]["G"]["OutputPath"], "$.Payload");
//! ```

use serde_json::{json, Map, Value};

/// The optimized Lambda integration.
pub const LAMBDA_INVOKE: &str = "arn:aws:states:::lambda:invoke";

/// Lambda's transient errors, retried on every exported task.
const LAMBDA_TRANSIENT: [&str; 4] = [
    "Lambda.ServiceException",
    "Lambda.AWSLambdaException",
    "Lambda.SdkClientException",
    "Lambda.TooManyRequestsException",
];

/// Why a pipeline could not be exported.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExportError {
    /// The function ARN is not a Lambda function ARN.
    #[error("--function-arn `{0}` is not a Lambda function ARN (arn:aws:lambda:REGION:ACCOUNT:function:NAME)")]
    BadFunctionArn(String),
    /// Something at `at` is not the JSON the States Language wants there.
    #[error("{at}: {message}")]
    Malformed {
        /// Where (a JSON path into the definition).
        at: String,
        /// What is wrong.
        message: String,
    },
    /// An `ember:` resource that Ember does not have.
    #[error("{at}: unknown Ember resource `{resource}`: use ember:generate or ember:tool:NAME")]
    UnknownResource {
        /// The state.
        at: String,
        /// The resource.
        resource: String,
    },
}

impl ExportError {
    /// Stable label for logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::BadFunctionArn(_) => "export_bad_function_arn",
            Self::Malformed { .. } => "export_malformed",
            Self::UnknownResource { .. } => "export_unknown_resource",
        }
    }
}

/// Rewrites `definition`'s Ember tasks into Lambda calls of `function_arn`; see the module
/// docs for the payload and result shapes.
pub fn export_for_step_functions(definition: &Value, function_arn: &str) -> Result<Value, ExportError> {
    if !is_function_arn(function_arn) {
        return Err(ExportError::BadFunctionArn(function_arn.to_string()));
    }
    let mut out = definition.clone();
    let jsonata = definition.get("QueryLanguage").and_then(Value::as_str) == Some("JSONata");
    rewrite_machine(&mut out, "$", function_arn, jsonata)?;
    Ok(out)
}

fn is_function_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.split(':').collect();
    parts.len() >= 7
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "lambda"
        && parts[5] == "function"
        && !parts[6].is_empty()
}

fn malformed(at: &str, message: &str) -> ExportError {
    ExportError::Malformed { at: at.to_string(), message: message.to_string() }
}

/// A state machine (or a Parallel branch, or a Map's processor): `{"StartAt", "States"}`.
/// `jsonata`: the machine's query language is JSONata (states may also choose it).
fn rewrite_machine(machine: &mut Value, at: &str, arn: &str, jsonata: bool) -> Result<(), ExportError> {
    let states = machine
        .get_mut("States")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| malformed(at, "has no \"States\" object"))?;
    for (name, state) in states.iter_mut() {
        let here = format!("{at}.States.{name}");
        let obj = state.as_object_mut().ok_or_else(|| malformed(&here, "a state must be an object"))?;
        let state_jsonata = match obj.get("QueryLanguage").and_then(Value::as_str) {
            Some(q) => q == "JSONata",
            None => jsonata,
        };
        match obj.get("Type").and_then(Value::as_str) {
            Some("Task") if state_jsonata => rewrite_jsonata_task(obj, &here, arn)?,
            Some("Task") => rewrite_task(obj, &here, arn)?,
            Some("Parallel") => {
                let branches = obj
                    .get_mut("Branches")
                    .and_then(Value::as_array_mut)
                    .ok_or_else(|| malformed(&here, "a Parallel state needs \"Branches\""))?;
                for (i, b) in branches.iter_mut().enumerate() {
                    rewrite_machine(b, &format!("{here}.Branches[{i}]"), arn, jsonata)?;
                }
            }
            Some("Map") => {
                let key = if obj.contains_key("ItemProcessor") { "ItemProcessor" } else { "Iterator" };
                let inner = obj.get_mut(key).ok_or_else(|| malformed(&here, "a Map state needs \"ItemProcessor\""))?;
                rewrite_machine(inner, &format!("{here}.{key}"), arn, jsonata)?;
            }
            Some(_) => {}
            None => return Err(malformed(&here, "a state needs a \"Type\"")),
        }
    }
    Ok(())
}

/// The task's Ember resource; `None` when it already names an AWS resource.
fn ember_resource(task: &Map<String, Value>, at: &str) -> Result<Option<String>, ExportError> {
    let Some(resource) = task.get("Resource").and_then(Value::as_str).map(str::to_string) else {
        return Err(malformed(at, "a Task needs a \"Resource\""));
    };
    if !resource.starts_with("ember:") {
        return Ok(None);
    }
    if resource != "ember:generate" && resource.strip_prefix("ember:tool:").is_none_or(str::is_empty) {
        return Err(ExportError::UnknownResource { at: at.to_string(), resource });
    }
    Ok(Some(resource))
}

/// Retries Lambda's transient errors after the task's own rules.
fn retry_transient(task: &mut Map<String, Value>, at: &str) -> Result<(), ExportError> {
    let retry = task.entry("Retry").or_insert_with(|| json!([]));
    let rules = retry.as_array_mut().ok_or_else(|| malformed(at, "\"Retry\" must be an array"))?;
    rules.push(json!({"ErrorEquals": LAMBDA_TRANSIENT, "IntervalSeconds": 1, "MaxAttempts": 3, "BackoffRate": 2.0}));
    Ok(())
}

/// A JSONata task stays JSONata: it calls the function ARN directly (the integration that
/// returns the bare result, so `$states.result` and `Output` mean what they mean in Ember),
/// with `Arguments` `{"task": ..., "input": <the task's Arguments, or $states.input>}`.
fn rewrite_jsonata_task(task: &mut Map<String, Value>, at: &str, arn: &str) -> Result<(), ExportError> {
    let Some(resource) = ember_resource(task, at)? else { return Ok(()) };
    let input = task.remove("Arguments").unwrap_or_else(|| json!("{% $states.input %}"));
    task.insert("Resource".into(), json!(arn));
    task.insert("Arguments".into(), json!({"task": resource, "input": input}));
    retry_transient(task, at)
}

fn rewrite_task(task: &mut Map<String, Value>, at: &str, arn: &str) -> Result<(), ExportError> {
    let Some(resource) = ember_resource(task, at)? else { return Ok(()) };
    let mut payload = Map::new();
    payload.insert("task".into(), Value::String(resource));
    match task.remove("Parameters") {
        Some(p) => payload.insert("input".into(), p),
        None => payload.insert("input.$".into(), Value::String("$".into())),
    };
    let result_path = task.get("ResultPath").cloned();
    let output_path = task.get("OutputPath").cloned();
    let default_result = result_path.is_none() || result_path == Some(json!("$"));
    let default_output = output_path.is_none() || output_path == Some(json!("$"));
    if let Some(selector) = task.get_mut("ResultSelector") {
        under_payload(selector);
        invoke(task, arn, payload);
    } else if result_path == Some(Value::Null) {
        invoke(task, arn, payload);
    } else if default_result && default_output {
        invoke(task, arn, payload);
        task.insert("OutputPath".into(), json!("$.Payload"));
    } else {
        // No exact unwrap exists here: the direct Lambda integration returns the bare result.
        task.insert("Resource".into(), json!(arn));
        task.insert("Parameters".into(), Value::Object(payload));
    }
    retry_transient(task, at)
}

fn invoke(task: &mut Map<String, Value>, arn: &str, payload: Map<String, Value>) {
    task.insert("Resource".into(), json!(LAMBDA_INVOKE));
    task.insert("Parameters".into(), json!({"FunctionName": arn, "Payload": payload}));
}

/// Rewrites the paths of a ResultSelector so that they read the function's answer under
/// `$.Payload` (intrinsic calls and `$$` context paths are left alone).
fn under_payload(selector: &mut Value) {
    match selector {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key.ends_with(".$") {
                    if let Some(path) = v.as_str().filter(|p| *p == "$" || p.starts_with("$.") || p.starts_with("$[")) {
                        *v = Value::String(format!("$.Payload{}", &path[1..]));
                    }
                } else {
                    under_payload(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(under_payload),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:ember-worker";

    fn export(def: Value) -> Value {
        export_for_step_functions(&def, ARN).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn jsonata_tasks_stay_jsonata_and_call_the_function_directly() {
        let out = export(json!({"QueryLanguage": "JSONata", "StartAt": "G", "States": {
            "G": {"Type": "Task", "Resource": "ember:generate",
                  "Arguments": {"prompt": "{% $states.input.q %}"}, "Output": "{% $states.result.text %}", "Next": "T"},
            "T": {"Type": "Task", "Resource": "ember:tool:json", "End": true}}}));
        let g = &out["States"]["G"];
        assert_eq!(g["Resource"], ARN);
        assert_eq!(g["Arguments"], json!({"task": "ember:generate", "input": {"prompt": "{% $states.input.q %}"}}));
        assert_eq!(g["Output"], "{% $states.result.text %}");
        assert!(g.get("Parameters").is_none() && g.get("OutputPath").is_none());
        assert_eq!(out["States"]["T"]["Arguments"], json!({"task": "ember:tool:json", "input": "{% $states.input %}"}));
        assert_eq!(out["QueryLanguage"], "JSONata");
        // A JSONata state in a JSONPath machine is exported as JSONata too.
        let out = export(json!({"StartAt": "G", "States": {"G": {"Type": "Task", "QueryLanguage": "JSONata",
            "Resource": "ember:generate", "End": true}}}));
        assert_eq!(out["States"]["G"]["Resource"], ARN);
    }

    #[test]
    fn a_plain_task_becomes_a_lambda_invoke_with_the_payload_unwrapped() {
        let out = export(json!({"StartAt": "G", "States": {
            "G": {"Type": "Task", "Resource": "ember:generate", "InputPath": "$.req", "Next": "D"},
            "D": {"Type": "Succeed"}}}));
        let g = &out["States"]["G"];
        assert_eq!(g["Resource"], LAMBDA_INVOKE);
        assert_eq!(
            g["Parameters"],
            json!({"FunctionName": ARN, "Payload": {"task": "ember:generate", "input.$": "$"}})
        );
        assert_eq!(g["OutputPath"], "$.Payload");
        assert_eq!(g["InputPath"], "$.req");
        assert_eq!(g["Retry"][0]["ErrorEquals"][0], "Lambda.ServiceException");
        assert_eq!(out["States"]["D"], json!({"Type": "Succeed"}));
    }

    #[test]
    fn parameters_become_the_input_and_selectors_read_under_payload() {
        let out = export(json!({"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "ember:tool:json",
            "Parameters": {"text.$": "$.raw", "fixed": 1},
            "ResultSelector": {"value.$": "$.value", "all.$": "$", "n.$": "States.ArrayLength($.items)", "k": {"x.$": "$.x"}},
            "ResultPath": "$.parsed", "Retry": [{"ErrorEquals": ["Ember.InvalidInput"], "MaxAttempts": 0}], "End": true}}}));
        let t = &out["States"]["T"];
        assert_eq!(
            t["Parameters"]["Payload"],
            json!({"task": "ember:tool:json", "input": {"text.$": "$.raw", "fixed": 1}})
        );
        assert_eq!(
            t["ResultSelector"],
            json!({"value.$": "$.Payload.value", "all.$": "$.Payload", "n.$": "States.ArrayLength($.items)", "k": {"x.$": "$.Payload.x"}})
        );
        assert_eq!(t["ResultPath"], "$.parsed");
        assert!(t.get("OutputPath").is_none());
        let retry = t["Retry"].as_array().map(Vec::len);
        assert_eq!(retry, Some(2), "the state's own rule first, then Lambda's transient errors");
        assert_eq!(t["Retry"][0]["ErrorEquals"][0], "Ember.InvalidInput");
    }

    #[test]
    fn a_result_path_into_a_field_without_selector_calls_the_function_directly() {
        let out = export(json!({"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "ember:generate",
            "ResultPath": "$.answer", "End": true}}}));
        let t = &out["States"]["T"];
        assert_eq!(t["Resource"], ARN);
        assert_eq!(t["Parameters"], json!({"task": "ember:generate", "input.$": "$"}));
        assert_eq!(t["ResultPath"], "$.answer");
        let discard = export(json!({"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "ember:generate",
            "ResultPath": null, "End": true}}}));
        assert_eq!(discard["States"]["T"]["Resource"], LAMBDA_INVOKE);
    }

    #[test]
    fn nested_branches_and_map_processors_are_rewritten() {
        let task = json!({"Type": "Task", "Resource": "ember:tool:count", "End": true});
        let out = export(json!({"StartAt": "P", "States": {
            "P": {"Type": "Parallel", "Next": "M", "Branches": [{"StartAt": "A", "States": {"A": task}}]},
            "M": {"Type": "Map", "End": true, "ItemProcessor": {"StartAt": "B", "States": {"B": task}}},
            "W": {"Type": "Map", "End": true, "Iterator": {"StartAt": "C", "States": {"C": task, "X": {"Type": "Pass", "End": true}}}}}}));
        assert_eq!(out["States"]["P"]["Branches"][0]["States"]["A"]["Resource"], LAMBDA_INVOKE);
        assert_eq!(out["States"]["M"]["ItemProcessor"]["States"]["B"]["Resource"], LAMBDA_INVOKE);
        assert_eq!(out["States"]["W"]["Iterator"]["States"]["C"]["Resource"], LAMBDA_INVOKE);
        assert_eq!(out["States"]["W"]["Iterator"]["States"]["X"], json!({"Type": "Pass", "End": true}));
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let def = json!({"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "ember:teleport", "End": true}}});
        let e = export_for_step_functions(&def, ARN).err();
        assert_eq!(e.as_ref().map(ExportError::label), Some("export_unknown_resource"));
        assert!(e.is_some_and(|e| e.to_string().contains("$.States.T: unknown Ember resource `ember:teleport`")));
        let e = export_for_step_functions(&def, "arn:aws:s3:::bucket").err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("not a Lambda function ARN")));
        let e = export_for_step_functions(&json!({"StartAt": "T"}), ARN).err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("$: has no \"States\" object"));
        // Resources that are already AWS's stay as they are.
        let aws = json!({"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "arn:aws:states:::sqs:sendMessage", "End": true}}});
        assert_eq!(export(aws.clone()), aws);
    }
}
