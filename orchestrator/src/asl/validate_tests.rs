#![allow(clippy::unwrap_used)]
//! Each bad definition gives the expected location and message.

use super::*;

fn errors(src: &str) -> Vec<Diagnostic> {
    let r = Resources::with_tools(["json", "http_get"]);
    match validate(src, &r) {
        Ok(d) => d.warnings,
        Err(InvalidDefinition(d)) => d,
    }
}

fn has(diags: &[Diagnostic], loc: &str, needle: &str) -> bool {
    diags.iter().any(|d| d.location == loc && d.message.contains(needle))
}

#[test]
fn invalid_json_has_line_and_column() {
    let d = errors("{\n  \"StartAt\": \"A\",\n  \"States\": {\n}");
    assert_eq!(d.len(), 1);
    assert!(d[0].location.starts_with("line 4 column"), "{d:?}");
}

#[test]
fn every_problem_is_reported() {
    let src = r#"{
      "StartAt": "A",
      "States": {
        "A": {"Type": "Pass", "Next": "Nowhere"},
        "B": {"Type": "Task", "Resource": "arn:aws:lambda:us-east-1:1:function:f", "End": true},
        "C": {"Type": "Pass", "Seconds": 3, "End": true},
        "D": {"Type": "Choice", "Choices": [{"Variable": "$.x", "NumericEquals": 1, "Next": "Missing"}], "Default": "A"},
        "E": {"Type": "Task", "Resource": "ember:tool:json", "End": true, "Retry": [{"ErrorEquals": ["States.ALL"], "BackoffRate": 0.5}]}
      }
    }"#;
    let d = errors(src);
    assert!(has(&d, "/States/A/Next", "'Nowhere' is not a state"), "{d:#?}");
    assert!(has(&d, "/States/B/Resource", "unknown Task resource"), "{d:#?}");
    assert!(has(&d, "/States/C/Seconds", "not allowed in a Pass state"), "{d:#?}");
    assert!(has(&d, "/States/D/Choices/0/Next", "'Missing' is not a state"), "{d:#?}");
    assert!(has(&d, "/States/E/Retry/0/BackoffRate", "BackoffRate"), "{d:#?}");
}

#[test]
fn unreachable_and_missing_terminal() {
    let d = errors(
        r#"{"StartAt": "A", "States": {"A": {"Type": "Pass", "End": true}, "B": {"Type": "Pass", "End": true}}}"#,
    );
    assert!(has(&d, "/States/B", "unreachable"), "{d:#?}");
    let d = errors(
        r#"{"StartAt": "A", "States": {"A": {"Type": "Pass", "Next": "B"}, "B": {"Type": "Pass", "Next": "A"}}}"#,
    );
    assert!(has(&d, "/States", "no terminal state"), "{d:#?}");
    let d = errors(r#"{"StartAt": "A", "States": {"A": {"Type": "Pass"}}}"#);
    assert!(has(&d, "/States/A", "needs Next or End"), "{d:#?}");
}

#[test]
fn cycle_without_exit_is_a_warning() {
    let src = r#"{"StartAt": "C", "States": {
        "C": {"Type": "Choice", "Choices": [{"Variable": "$.go", "BooleanEquals": true, "Next": "Loop1"}], "Default": "Done"},
        "Loop1": {"Type": "Pass", "Next": "Loop2"},
        "Loop2": {"Type": "Pass", "Next": "Loop1"},
        "Done": {"Type": "Succeed"}}}"#;
    let r = Resources::default();
    let def = validate(src, &r).unwrap();
    assert!(def.warnings.iter().all(|w| w.severity == Severity::Warning));
    assert!(has(&def.warnings, "/States/Loop1", "cycle with no path to a terminal"), "{:#?}", def.warnings);
    assert!(has(&def.warnings, "/States/Loop2", "cycle"));
}

#[test]
fn nested_machines_and_paths() {
    let src = r#"{"StartAt": "P", "States": {
        "P": {"Type": "Parallel", "End": true, "ResultPath": "$.a[*]", "Branches": [
            {"StartAt": "X", "States": {"X": {"Type": "Pass", "Next": "Y"}}}
        ]},
        "M": {"Type": "Map", "End": true, "ItemProcessor": {"StartAt": "I", "States": {"I": {"Type": "Pass", "End": true, "InputPath": "a.b"}}}}
      }}"#;
    let d = errors(src);
    assert!(has(&d, "/States/P/ResultPath", "reference path"), "{d:#?}");
    assert!(has(&d, "/States/P/Branches/0/States/X/Next", "'Y' is not a state"), "{d:#?}");
    assert!(has(&d, "/States/M/ItemProcessor/States/I/InputPath", "must start with '$'"), "{d:#?}");
    assert!(has(&d, "/States/M", "unreachable"), "{d:#?}");
}

#[test]
fn bad_parameters_and_intrinsics() {
    let src = r#"{"StartAt": "A", "States": {"A": {"Type": "Pass", "End": true,
        "Parameters": {"a.$": "States.Nope(1)", "b": {"c.$": "$..["}, "d.$": 5}}}}"#;
    let d = errors(src);
    assert!(has(&d, "/States/A/Parameters/a.$", "unknown intrinsic"), "{d:#?}");
    assert!(has(&d, "/States/A/Parameters/b/c.$", "invalid JSONPath"), "{d:#?}");
    assert!(has(&d, "/States/A/Parameters/d.$", "string value"), "{d:#?}");
}

#[test]
fn a_good_definition_validates() {
    let src = r#"{"StartAt": "T", "States": {
        "T": {"Type": "Task", "Resource": "ember:tool:json", "Next": "W",
              "Retry": [{"ErrorEquals": ["Ember.InvalidJson"], "MaxAttempts": 2}, {"ErrorEquals": ["States.ALL"]}],
              "Catch": [{"ErrorEquals": ["States.ALL"], "Next": "F", "ResultPath": "$.err"}]},
        "W": {"Type": "Wait", "Seconds": 1, "Next": "S"},
        "S": {"Type": "Succeed"},
        "F": {"Type": "Fail", "Error": "E", "Cause": "c"}}}"#;
    let def = validate(src, &Resources::with_tools(["json"])).unwrap();
    assert!(def.warnings.is_empty());
    assert_eq!(def.machine.start_at, "T");
}

#[test]
fn jsonata_states_take_arguments_and_output_not_paths() {
    let src = r#"{"QueryLanguage": "JSONata", "StartAt": "A", "States": {
        "A": {"Type": "Task", "Resource": "ember:tool:json", "Parameters": {"x.$": "$.x"}, "Arguments": {"text": "{% $states.input.t %}"}, "Next": "B"},
        "B": {"Type": "Pass", "QueryLanguage": "JSONPath", "Output": "{% 1 + %}", "End": true}}}"#;
    let d = errors(src);
    assert!(has(&d, "/States/A/Parameters", "use Arguments and Output"), "{d:#?}");
    assert!(has(&d, "/States/B/QueryLanguage", "cannot use JSONPath"), "{d:#?}");
    assert!(has(&d, "/States/B/Output", "invalid JSONata expression"), "{d:#?}");
    let d = errors(r#"{"StartAt": "A", "States": {"A": {"Type": "Pass", "Output": {"a": 1}, "End": true}}}"#);
    assert!(has(&d, "/States/A/Output", "needs QueryLanguage \"JSONata\""), "{d:#?}");
    let d = errors(
        r#"{"QueryLanguage": "JSONata", "StartAt": "C", "States": {
        "C": {"Type": "Choice", "Choices": [{"Variable": "$.x", "IsPresent": true, "Next": "D"}], "Default": "D"},
        "D": {"Type": "Succeed"}}}"#,
    );
    assert!(has(&d, "/States/C/Choices/0/Variable", "not allowed in a JSONata Choice rule"), "{d:#?}");
    assert!(has(&d, "/States/C/Choices/0/Condition", "needs a Condition"), "{d:#?}");
}

#[test]
fn variables_out_of_scope_and_outer_variables_assigned_in_branches_are_reported() {
    let src = r#"{"StartAt": "A", "States": {
        "A": {"Type": "Pass", "Assign": {"total": 1, "bad name": 2, "states": 3}, "Next": "P"},
        "P": {"Type": "Parallel", "Branches": [{"StartAt": "B", "States": {
            "B": {"Type": "Pass", "Assign": {"total.$": "$x", "inner": 1}, "End": true}}}], "Next": "E"},
        "E": {"Type": "Pass", "Parameters": {"t.$": "$total", "i.$": "$inner"}, "End": true}}}"#;
    let d = errors(src);
    assert!(has(&d, "/States/A/Assign/bad name", "not a valid variable name"), "{d:#?}");
    assert!(has(&d, "/States/A/Assign/states", "not a valid variable name"), "{d:#?}");
    assert!(has(&d, "/States/P/Branches/0/States/B/Assign/total.$", "enclosing scope"), "{d:#?}");
    assert!(has(&d, "/States/E/Parameters/i.$", "'$inner' is not a variable"), "{d:#?}");
    assert!(!d.iter().any(|x| x.message.contains("'$total' is not")), "{d:#?}");
    let jsonata = r#"{"QueryLanguage": "JSONata", "StartAt": "A", "States": {
        "A": {"Type": "Pass", "Assign": {"n": 1}, "Output": "{% $n + $m + $sum([1]) + ($k := 2; $k) %}", "End": true}}}"#;
    let d = errors(jsonata);
    assert!(has(&d, "/States/A/Output", "'$m' is not a variable"), "{d:#?}");
    assert_eq!(d.iter().filter(|x| x.message.contains("is not a variable")).count(), 1, "{d:#?}");
    // Scope findings warn (Step Functions runs such definitions; the read fails at run time).
    assert!(d.iter().filter(|x| x.message.contains("is not a variable")).all(|x| x.severity == Severity::Warning));
}

#[test]
fn map_limit_paths_exclude_their_literal_and_must_be_paths() {
    let src = r#"{
      "StartAt": "M",
      "States": {
        "M": {"Type": "Map", "MaxConcurrency": 2, "MaxConcurrencyPath": "$.m",
              "ToleratedFailureCountPath": 3, "ToleratedFailurePercentagePath": "$.p",
              "ItemProcessor": {"StartAt": "P", "States": {"P": {"Type": "Pass", "End": true}}}, "End": true}
      }
    }"#;
    let d = errors(src);
    assert!(has(&d, "/States/M/MaxConcurrencyPath", "give MaxConcurrency or MaxConcurrencyPath, not both"), "{d:#?}");
    assert!(has(&d, "/States/M/ToleratedFailureCountPath", "must be a path string"), "{d:#?}");
    assert!(!d.iter().any(|x| x.location.contains("ToleratedFailurePercentagePath")), "{d:#?}");
}

#[test]
fn intrinsic_strings_and_paths_follow_the_intrinsic_grammar() {
    let pass = |expr: &str| {
        format!(
            r#"{{"StartAt": "A", "States": {{"A": {{"Type": "Pass", "Parameters": {{"x.$": {}}}, "End": true}}}}}}"#,
            serde_json::Value::String(expr.to_string())
        )
    };
    // `\"` is not one of the escapes (' { } \) the developer guide defines.
    let d = errors(&pass(r#"States.StringToJson('{"text":"An \"escaped\" quote"}')"#));
    assert!(has(&d, "/States/A/Parameters/x.$", "is not an escape"), "{d:#?}");
    // A dash after '.' is a member name in a `.$` path, but not inside an intrinsic call.
    let d = errors(&pass("States.Format('{}', $.detail-type)"));
    assert!(has(&d, "/States/A/Parameters/x.$", "$['detail-type']"), "{d:#?}");
    assert!(errors(&pass("States.Format('{}', $['detail-type'])")).is_empty());
    assert!(errors(&pass("$.detail-type")).is_empty());
    assert!(errors(&pass(r"States.Format('it\'s {} \{\} \\', $['a\'b'])")).is_empty());
}
