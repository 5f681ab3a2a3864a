//! The query language of each state, the fields each language allows, `Assign`, and the
//! reading of JSONata states.

use serde_json::{Map, Value};

use super::{esc, Validator};
use crate::asl::choice::Rule;
use crate::asl::definition::*;
use crate::asl::{jsonata, path, timestamp};

/// JSONPath's data-flow fields, which JSONata states replace with `Arguments` and `Output`.
const JSONPATH_ONLY: &[&str] = &[
    "InputPath",
    "OutputPath",
    "Parameters",
    "ResultSelector",
    "ResultPath",
    "ItemsPath",
    "SecondsPath",
    "TimestampPath",
    "ErrorPath",
    "CausePath",
    "TimeoutSecondsPath",
    "HeartbeatSecondsPath",
    "MaxConcurrencyPath",
    "ToleratedFailurePercentagePath",
    "ToleratedFailureCountPath",
    "Result",
];

/// Fields only JSONata states have.
const JSONATA_ONLY: &[&str] = &["Arguments", "Output", "Items"];

fn jsonata_fields(ty: &str) -> &'static [&'static str] {
    match ty {
        "Pass" => &["Type", "Comment", "QueryLanguage", "Next", "End", "Output", "Assign"],
        "Task" => &[
            "Type",
            "Comment",
            "QueryLanguage",
            "Resource",
            "Next",
            "End",
            "Arguments",
            "Output",
            "Assign",
            "Retry",
            "Catch",
            "TimeoutSeconds",
            "HeartbeatSeconds",
        ],
        "Choice" => &["Type", "Comment", "QueryLanguage", "Choices", "Default", "Output", "Assign"],
        "Wait" => &["Type", "Comment", "QueryLanguage", "Next", "End", "Seconds", "Timestamp", "Output", "Assign"],
        "Succeed" => &["Type", "Comment", "QueryLanguage", "Output"],
        "Fail" => &["Type", "Comment", "QueryLanguage", "Error", "Cause"],
        "Parallel" => &[
            "Type",
            "Comment",
            "QueryLanguage",
            "Branches",
            "Next",
            "End",
            "Arguments",
            "Output",
            "Assign",
            "Retry",
            "Catch",
        ],
        "Map" => &[
            "Type",
            "Comment",
            "QueryLanguage",
            "ItemProcessor",
            "Iterator",
            "Items",
            "ItemSelector",
            "MaxConcurrency",
            "ToleratedFailurePercentage",
            "ToleratedFailureCount",
            "Next",
            "End",
            "Output",
            "Assign",
            "Retry",
            "Catch",
            "Label",
        ],
        _ => &[],
    }
}

/// Whether `k` is `Assign` on a JSONPath state that may assign (all but Succeed and Fail).
fn jsonpath_assign(k: &str, ty: &str) -> bool {
    k == "Assign" && !matches!(ty, "Succeed" | "Fail")
}

/// Whether `name` can be a variable: a letter or `_`, then letters, digits or `_`; at most
/// 80 characters; not `states` (reserved for `$states`).
pub(super) fn valid_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.chars().count() <= 80
        && name != "states"
        && chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

impl Validator<'_> {
    /// The state's `QueryLanguage`, or its machine's. A JSONata machine cannot hold JSONPath
    /// states (Step Functions allows only the other direction).
    pub(super) fn state_query_language(&mut self, obj: &Map<String, Value>, at: &str) -> QueryLanguage {
        match obj.get("QueryLanguage").map(|q| q.as_str()) {
            None => self.ql,
            Some(Some("JSONata")) => QueryLanguage::JsonAta,
            Some(Some("JSONPath")) if self.ql == QueryLanguage::JsonAta => {
                self.err(
                    format!("{at}/QueryLanguage"),
                    "a state cannot use JSONPath when its state machine's QueryLanguage is JSONata (set JSONata on the state instead, or JSONPath on the machine)",
                );
                QueryLanguage::JsonAta
            }
            Some(Some("JSONPath")) => QueryLanguage::JsonPath,
            Some(_) => {
                self.err(format!("{at}/QueryLanguage"), "QueryLanguage must be \"JSONPath\" or \"JSONata\"");
                self.ql
            }
        }
    }

    /// Reports every field the state's type and query language do not allow.
    pub(super) fn check_fields(
        &mut self,
        obj: &Map<String, Value>,
        at: &str,
        ty: &str,
        jsonpath_fields: &[&str],
        ql: QueryLanguage,
    ) {
        for k in obj.keys() {
            let k = k.as_str();
            let loc = format!("{at}/{}", esc(k));
            match ql {
                QueryLanguage::JsonAta if !jsonata_fields(ty).contains(&k) => {
                    if JSONPATH_ONLY.contains(&k) {
                        self.err(loc, format!("field '{k}' is not allowed in a JSONata state: JSONata states use Arguments and Output (with {{% $states.input %}}) instead of InputPath, Parameters, ResultSelector, ResultPath, OutputPath and the *Path fields"));
                    } else {
                        self.err(loc, format!("field '{k}' is not allowed in a {ty} state"));
                    }
                }
                QueryLanguage::JsonPath if !jsonpath_fields.contains(&k) && !jsonpath_assign(k, ty) => {
                    if JSONATA_ONLY.contains(&k) && jsonata_fields(ty).contains(&k) {
                        self.err(
                            loc,
                            format!("field '{k}' needs QueryLanguage \"JSONata\" (on the state or the state machine)"),
                        );
                    } else {
                        self.err(loc, format!("field '{k}' is not allowed in a {ty} state"));
                    }
                }
                _ => {}
            }
        }
    }

    /// A field holding JSON with `{% %}` expressions (`Arguments`, `Output`, `ItemSelector`).
    pub(super) fn jsonata_template(&mut self, obj: &Map<String, Value>, key: &str, at: &str) -> Option<Value> {
        let v = obj.get(key)?;
        let mut problems = Vec::new();
        jsonata::check_template(v, &format!("{at}/{}", esc(key)), &mut problems);
        for (l, m) in problems {
            self.err(l, m);
        }
        Some(v.clone())
    }

    /// `Assign`: an object of variable names to values (JSONPath: `name.$` keys take a path
    /// or an intrinsic; JSONata: values may hold `{% %}` expressions).
    pub(super) fn assign(&mut self, obj: &Map<String, Value>, at: &str, ql: QueryLanguage) -> Option<Value> {
        let v = obj.get("Assign")?;
        let aat = format!("{at}/Assign");
        let Some(m) = v.as_object() else {
            self.err(aat, "Assign must be an object of variable names and values");
            return None;
        };
        for k in m.keys() {
            let name = match ql {
                QueryLanguage::JsonPath => k.strip_suffix(".$").unwrap_or(k),
                QueryLanguage::JsonAta => k.as_str(),
            };
            if !valid_variable_name(name) {
                self.err(
                    format!("{aat}/{}", esc(k)),
                    format!("'{name}' is not a valid variable name: use a letter or _ followed by letters, digits or _ (at most 80 characters; 'states' is reserved)"),
                );
            }
        }
        let mut problems = Vec::new();
        match ql {
            QueryLanguage::JsonPath => path::check_template(v, &aat, &mut problems),
            QueryLanguage::JsonAta => jsonata::check_template(v, &aat, &mut problems),
        }
        for (l, m) in problems {
            self.err(l, m);
        }
        Some(v.clone())
    }

    /// A JSONata number field: a literal (an integer >= `min`) or a `{% %}` expression.
    fn jsonata_number(&mut self, obj: &Map<String, Value>, key: &str, at: &str, min: f64) -> Option<NumberSource> {
        let v = obj.get(key)?;
        if let Some(e) = v.as_str().and_then(jsonata::expression) {
            if let Err(m) = jsonata::check(e) {
                self.err(format!("{at}/{key}"), m);
            }
            return Some(NumberSource::Expr(e.to_string()));
        }
        match v.as_f64().filter(|n| *n >= min && n.fract() == 0.0) {
            Some(n) => Some(NumberSource::Value(n)),
            None => {
                self.err(format!("{at}/{key}"), format!("{key} must be an integer >= {min} or a {{% %}} expression"));
                None
            }
        }
    }

    /// A JSONata string field that may be an expression (`Error`, `Cause`).
    fn jsonata_string(&mut self, obj: &Map<String, Value>, key: &str, at: &str) -> Option<String> {
        let v = obj.get(key)?;
        match v.as_str() {
            Some(s) => {
                if let Some(e) = jsonata::expression(s) {
                    if let Err(m) = jsonata::check(e) {
                        self.err(format!("{at}/{key}"), m);
                    }
                }
                Some(s.to_string())
            }
            None => {
                self.err(format!("{at}/{key}"), format!("{key} must be a string or a {{% %}} expression"));
                None
            }
        }
    }

    /// Reads a state whose query language is JSONata (its fields already checked).
    pub(super) fn jsonata_state(
        &mut self,
        obj: &Map<String, Value>,
        at: &str,
        ty: &str,
        next: Option<String>,
        before: usize,
    ) -> Option<State> {
        let ql = QueryLanguage::JsonAta;
        let mut state = State {
            kind: Kind::Succeed,
            input_path: PathField::Default,
            output_path: PathField::Default,
            result_path: PathField::Default,
            parameters: None,
            result_selector: None,
            next,
            retry: self.retriers(obj, at),
            catch: self.catchers(obj, at, ql),
            query_language: ql,
            arguments: self.jsonata_template(obj, "Arguments", at),
            output: self.jsonata_template(obj, "Output", at),
            assign: self.assign(obj, at, ql),
        };
        state.kind = match ty {
            "Pass" => Kind::Pass { result: None },
            "Task" => {
                let resource = self.task_resource(obj, at);
                let timeout = self.jsonata_number(obj, "TimeoutSeconds", at, 1.0);
                let heartbeat = self.jsonata_number(obj, "HeartbeatSeconds", at, 1.0);
                Kind::Task { resource, timeout, heartbeat }
            }
            "Choice" => self.choice(obj, at, |v, r, rat| v.jsonata_rule(r, rat)),
            "Wait" => {
                let given: Vec<&str> = ["Seconds", "Timestamp"].into_iter().filter(|k| obj.contains_key(*k)).collect();
                if given.len() != 1 {
                    self.err(
                        at.to_string(),
                        format!("a JSONata Wait state needs exactly one of Seconds or Timestamp (found {given:?})"),
                    );
                }
                match obj.get("Timestamp") {
                    Some(Value::String(t)) if jsonata::expression(t).is_some() => {
                        let e = jsonata::expression(t).unwrap_or_default().to_string();
                        if let Err(m) = jsonata::check(&e) {
                            self.err(format!("{at}/Timestamp"), m);
                        }
                        Kind::Wait(WaitFor::TimestampExpr(e))
                    }
                    Some(Value::String(t)) if timestamp::parse(t).is_some() => {
                        Kind::Wait(WaitFor::Timestamp(t.clone()))
                    }
                    Some(_) => {
                        self.err(
                            format!("{at}/Timestamp"),
                            "Timestamp must be an RFC 3339 time like 2026-01-01T00:00:00Z or a {% %} expression",
                        );
                        Kind::Wait(WaitFor::Seconds(NumberSource::Value(0.0)))
                    }
                    None => Kind::Wait(WaitFor::Seconds(
                        self.jsonata_number(obj, "Seconds", at, 0.0).unwrap_or(NumberSource::Value(0.0)),
                    )),
                }
            }
            "Succeed" => Kind::Succeed,
            "Fail" => Kind::Fail {
                error: self.jsonata_string(obj, "Error", at),
                error_path: None,
                cause: self.jsonata_string(obj, "Cause", at),
                cause_path: None,
            },
            "Parallel" => Kind::Parallel { branches: self.branches(obj, at) },
            "Map" => {
                // Limits given as expressions are evaluated when the Map starts; the rest of
                // the Map's fields read as in JSONPath states.
                const LIMITS: [&str; 3] = ["MaxConcurrency", "ToleratedFailurePercentage", "ToleratedFailureCount"];
                let mut plain = obj.clone();
                let mut exprs: [Option<String>; 3] = Default::default();
                for (i, key) in LIMITS.iter().enumerate() {
                    if let Some(s) = obj.get(*key).and_then(Value::as_str).filter(|s| jsonata::expression(s).is_some())
                    {
                        self.jsonata_template(obj, key, at);
                        plain.remove(*key);
                        exprs[i] = Some(s.to_string());
                    }
                }
                let mut kind = self.map(&plain, at, &mut state)?;
                if let Kind::Map { items, item_selector, limit_paths, .. } = &mut kind {
                    let [m, p, c] = exprs;
                    limit_paths.max_concurrency = m.or(limit_paths.max_concurrency.take());
                    limit_paths.tolerated_percentage = p.or(limit_paths.tolerated_percentage.take());
                    limit_paths.tolerated_count = c.or(limit_paths.tolerated_count.take());
                    *items = match obj.get("Items") {
                        None => None,
                        Some(v @ Value::Array(_)) => self.jsonata_template(obj, "Items", at).or(Some(v.clone())),
                        Some(v) if jsonata::is_expression(v) => self.jsonata_template(obj, "Items", at),
                        Some(_) => {
                            self.err(format!("{at}/Items"), "Items must be an array or a {% %} expression giving one");
                            None
                        }
                    };
                    if item_selector.is_some() {
                        *item_selector = self.jsonata_template(obj, "ItemSelector", at);
                    }
                }
                kind
            }
            _ => return None,
        };
        if self.diags[before..].iter().any(|d| d.severity == super::Severity::Error) {
            return None;
        }
        Some(state)
    }

    /// One JSONata Choice rule: `Condition` (an expression or a boolean), `Next`, and
    /// optionally `Assign` and `Output`.
    fn jsonata_rule(&mut self, r: &Value, at: &str) -> Option<ChoiceRule> {
        let Some(o) = r.as_object() else {
            self.err(at, "a Choice rule must be an object");
            return None;
        };
        for k in o.keys() {
            if !["Condition", "Next", "Assign", "Output", "Comment"].contains(&k.as_str()) {
                self.err(
                    format!("{at}/{}", esc(k)),
                    format!(
                        "field '{k}' is not allowed in a JSONata Choice rule (use Condition, Next, Assign, Output)"
                    ),
                );
            }
        }
        let condition = match o.get("Condition") {
            Some(v @ Value::Bool(_)) => v.clone(),
            Some(Value::String(s)) if jsonata::expression(s).is_some() => {
                self.jsonata_template(o, "Condition", at);
                Value::String(s.clone())
            }
            _ => {
                self.err(
                    format!("{at}/Condition"),
                    "a JSONata Choice rule needs a Condition: a {% %} expression or a boolean",
                );
                return None;
            }
        };
        let Some(next) = o.get("Next").and_then(Value::as_str) else {
            self.err(format!("{at}/Next"), "a Choice rule must have a Next");
            return None;
        };
        Some(ChoiceRule {
            rule: Rule::Condition(condition),
            next: next.to_string(),
            assign: self.assign(o, at, QueryLanguage::JsonAta),
            output: self.jsonata_template(o, "Output", at),
        })
    }
}
