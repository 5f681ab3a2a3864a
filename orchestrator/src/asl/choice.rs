//! Choice rules: parsing (with every problem reported) and evaluation.

use serde_json::Value;

use super::error::StatesError;
use super::path::{self, Scope};
use super::timestamp;

/// A comparison operator (without its `Path` suffix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Lt,
    Gt,
    Le,
    Ge,
}

/// The kind of value an operator compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    String,
    Numeric,
    Boolean,
    Timestamp,
}

/// A Choice rule (top-level rules also carry `Next`).
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// All must hold.
    And(Vec<Rule>),
    /// One must hold.
    Or(Vec<Rule>),
    /// Must not hold.
    Not(Box<Rule>),
    /// `Variable` compared with a literal or (`...Path`) with another path.
    Compare {
        /// The path of the value tested.
        variable: String,
        /// The operator name as written (`NumericLessThanPath`...).
        operator: String,
        /// The literal or path operand.
        operand: Value,
    },
    /// `Condition` (JSONata states): a `{% %}` expression, or a literal boolean, that must be
    /// `true`. The interpreter evaluates it; [`eval`] only handles JSONPath rules.
    Condition(Value),
}

const TYPE_TESTS: &[&str] = &["IsPresent", "IsNull", "IsNumeric", "IsString", "IsBoolean", "IsTimestamp"];

fn split_operator(name: &str) -> Option<(Kind, Option<Op>, bool)> {
    let (base, is_path) = match name.strip_suffix("Path") {
        Some(b) if name != "StringMatchesPath" => (b, true),
        _ => (name, false),
    };
    if base == "StringMatches" && !is_path {
        return Some((Kind::String, None, false));
    }
    for (prefix, kind) in [
        ("String", Kind::String),
        ("Numeric", Kind::Numeric),
        ("Boolean", Kind::Boolean),
        ("Timestamp", Kind::Timestamp),
    ] {
        if let Some(rest) = base.strip_prefix(prefix) {
            let op = match rest {
                "Equals" => Op::Eq,
                "LessThan" => Op::Lt,
                "GreaterThan" => Op::Gt,
                "LessThanEquals" => Op::Le,
                "GreaterThanEquals" => Op::Ge,
                _ => return None,
            };
            if kind == Kind::Boolean && op != Op::Eq {
                return None;
            }
            return Some((kind, Some(op), is_path));
        }
    }
    None
}

/// Parses one rule at JSON location `at`; `top` rules must have `Next`, nested ones must not.
/// Problems go to `out` as `(location, message)`.
pub fn parse_rule(v: &Value, at: &str, top: bool, out: &mut Vec<(String, String)>) -> Option<Rule> {
    let Some(obj) = v.as_object() else {
        out.push((at.to_string(), "a Choice rule must be an object".into()));
        return None;
    };
    if top && !obj.contains_key("Next") {
        out.push((at.to_string(), "a Choice rule must have a Next".into()));
    }
    if !top && obj.contains_key("Next") {
        out.push((format!("{at}/Next"), "only top-level Choice rules may have a Next".into()));
    }
    let ops: Vec<&String> =
        obj.keys().filter(|k| !matches!(k.as_str(), "Next" | "Comment" | "Variable" | "Assign")).collect();
    if ops.len() != 1 {
        out.push((
            at.to_string(),
            format!(
                "a Choice rule needs exactly one operator, found {}",
                if ops.is_empty() { "none".to_string() } else { format!("{ops:?}") }
            ),
        ));
        return None;
    }
    let op = ops[0].as_str();
    let arg = &obj[op];
    let oat = format!("{at}/{op}");
    match op {
        "And" | "Or" => {
            if obj.contains_key("Variable") {
                out.push((format!("{at}/Variable"), format!("{op} takes no Variable")));
            }
            let Some(items) = arg.as_array().filter(|a| !a.is_empty()) else {
                out.push((oat, format!("{op} must be a non-empty array of rules")));
                return None;
            };
            let rules: Vec<Option<Rule>> =
                items.iter().enumerate().map(|(i, r)| parse_rule(r, &format!("{oat}/{i}"), false, out)).collect();
            let rules: Option<Vec<Rule>> = rules.into_iter().collect();
            rules.map(|r| if op == "And" { Rule::And(r) } else { Rule::Or(r) })
        }
        "Not" => parse_rule(arg, &oat, false, out).map(|r| Rule::Not(Box::new(r))),
        _ => {
            let Some(variable) = obj.get("Variable").and_then(Value::as_str) else {
                out.push((format!("{at}/Variable"), format!("{op} needs a string Variable (a path)")));
                return None;
            };
            if let Err(e) = path::check_path(variable) {
                out.push((format!("{at}/Variable"), e));
            }
            if TYPE_TESTS.contains(&op) {
                if !arg.is_boolean() {
                    out.push((oat, format!("{op} takes true or false")));
                    return None;
                }
            } else if let Some((kind, _, is_path)) = split_operator(op) {
                let ok = if is_path {
                    match arg.as_str() {
                        Some(p) => path::check_path(p).map_err(|e| out.push((oat.clone(), e))).is_ok(),
                        None => false,
                    }
                } else {
                    match kind {
                        Kind::String => arg.is_string(),
                        Kind::Numeric => arg.is_number(),
                        Kind::Boolean => arg.is_boolean(),
                        Kind::Timestamp => arg.as_str().is_some_and(|s| timestamp::parse(s).is_some()),
                    }
                };
                if !ok {
                    out.push((oat, format!("{op} has an operand of the wrong type: {arg}")));
                    return None;
                }
            } else {
                out.push((oat, format!("unknown Choice operator '{op}'")));
                return None;
            }
            Some(Rule::Compare { variable: variable.to_string(), operator: op.to_string(), operand: arg.clone() })
        }
    }
}

/// Evaluates a rule. A Variable that matches nothing is `States.Runtime` (except for
/// `IsPresent`); values of the wrong type make a comparison false.
pub fn eval(rule: &Rule, scope: &Scope<'_>) -> Result<bool, StatesError> {
    match rule {
        Rule::And(rs) => {
            for r in rs {
                if !eval(r, scope)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Rule::Or(rs) => {
            for r in rs {
                if eval(r, scope)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Rule::Not(r) => Ok(!eval(r, scope)?),
        Rule::Condition(_) => Err(StatesError::runtime("a JSONata Condition in a JSONPath Choice rule")),
        Rule::Compare { variable, operator, operand } => {
            let value = path::query_opt(variable, scope)?;
            if operator == "IsPresent" {
                return Ok(value.is_some() == (operand == &Value::Bool(true)));
            }
            let value = value.ok_or_else(|| {
                StatesError::runtime(format!(
                    "Invalid path '{variable}': The choice state's condition path references an invalid value."
                ))
            })?;
            let want = operand == &Value::Bool(true);
            let test = |b: bool| Ok(b == want);
            match operator.as_str() {
                "IsNull" => return test(value.is_null()),
                "IsNumeric" => return test(value.is_number()),
                "IsString" => return test(value.is_string()),
                "IsBoolean" => return test(value.is_boolean()),
                "IsTimestamp" => return test(value.as_str().is_some_and(|s| timestamp::parse(s).is_some())),
                "StringMatches" => {
                    return Ok(match (value.as_str(), operand.as_str()) {
                        (Some(v), Some(p)) => string_matches(v, p),
                        _ => false,
                    })
                }
                _ => {}
            }
            let Some((kind, Some(op), is_path)) = split_operator(operator) else {
                return Err(StatesError::runtime(format!("unknown Choice operator '{operator}'")));
            };
            let other = if is_path {
                let p = operand.as_str().unwrap_or("$");
                path::query_opt(p, scope)?.ok_or_else(|| {
                    StatesError::runtime(format!(
                        "Invalid path '{p}': The choice state's condition path references an invalid value."
                    ))
                })?
            } else {
                operand.clone()
            };
            let ord = match kind {
                Kind::String => match (value.as_str(), other.as_str()) {
                    (Some(a), Some(b)) => Some(a.cmp(b)),
                    _ => None,
                },
                Kind::Numeric => match (value.as_f64(), other.as_f64()) {
                    (Some(a), Some(b)) => a.partial_cmp(&b),
                    _ => None,
                },
                Kind::Boolean => match (value.as_bool(), other.as_bool()) {
                    (Some(a), Some(b)) => Some(a.cmp(&b)),
                    _ => None,
                },
                Kind::Timestamp => {
                    match (value.as_str().and_then(timestamp::parse), other.as_str().and_then(timestamp::parse)) {
                        (Some(a), Some(b)) => a.partial_cmp(&b),
                        _ => None,
                    }
                }
            };
            use std::cmp::Ordering::*;
            Ok(match (ord, op) {
                (None, _) => false,
                (Some(o), Op::Eq) => o == Equal,
                (Some(o), Op::Lt) => o == Less,
                (Some(o), Op::Gt) => o == Greater,
                (Some(o), Op::Le) => o != Greater,
                (Some(o), Op::Ge) => o != Less,
            })
        }
    }
}

/// `StringMatches`: `*` matches any run of characters; `\*` and `\\` are literal.
pub fn string_matches(value: &str, pattern: &str) -> bool {
    #[derive(PartialEq)]
    enum Tok {
        Star,
        Ch(char),
    }
    let mut toks = Vec::new();
    let mut it = pattern.chars();
    while let Some(c) = it.next() {
        match c {
            '\\' => toks.push(Tok::Ch(it.next().unwrap_or('\\'))),
            '*' => toks.push(Tok::Star),
            c => toks.push(Tok::Ch(c)),
        }
    }
    let v: Vec<char> = value.chars().collect();
    // Classic wildcard matching with backtracking on the last star.
    let (mut i, mut j) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while i < v.len() {
        if j < toks.len() && toks[j] == Tok::Ch(v[i]) {
            i += 1;
            j += 1;
        } else if j < toks.len() && toks[j] == Tok::Star {
            star = Some(j);
            mark = i;
            j += 1;
        } else if let Some(s) = star {
            j = s + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    while j < toks.len() && toks[j] == Tok::Star {
        j += 1;
    }
    j == toks.len()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(rule: Value, input: Value) -> Result<bool, StatesError> {
        let mut errs = Vec::new();
        let r = parse_rule(&rule, "/r", false, &mut errs).unwrap_or_else(|| panic!("{errs:?}"));
        assert!(errs.is_empty(), "{errs:?}");
        let ctx = json!({});
        eval(&r, &Scope { input: &input, context: &ctx, vars: None })
    }

    #[test]
    fn operators() {
        let i = json!({"s": "abc", "n": 5, "m": 7, "b": true, "t": "2026-01-01T00:00:00Z", "t2": "2026-06-01T00:00:00+02:00", "z": null});
        assert!(check(json!({"Variable": "$.s", "StringEquals": "abc"}), i.clone()).unwrap());
        assert!(check(json!({"Variable": "$.s", "StringLessThan": "abd"}), i.clone()).unwrap());
        assert!(check(json!({"Variable": "$.s", "StringGreaterThanEquals": "abc"}), i.clone()).unwrap());
        assert!(check(json!({"Variable": "$.n", "NumericLessThanPath": "$.m"}), i.clone()).unwrap());
        assert!(check(json!({"Variable": "$.n", "NumericEquals": 5.0}), i.clone()).unwrap());
        assert!(!check(json!({"Variable": "$.s", "NumericEquals": 5}), i.clone()).unwrap());
        assert!(check(json!({"Variable": "$.b", "BooleanEquals": true}), i.clone()).unwrap());
        assert!(check(json!({"Variable": "$.t", "TimestampLessThanPath": "$.t2"}), i.clone()).unwrap());
        assert!(check(json!({"Variable": "$.s", "StringMatches": "a*c"}), i.clone()).unwrap());
        assert!(check(json!({"Variable": "$.nope", "IsPresent": false}), i.clone()).unwrap());
        assert!(check(json!({"Variable": "$.z", "IsNull": true}), i.clone()).unwrap());
        assert!(check(json!({"Variable": "$.t", "IsTimestamp": true}), i.clone()).unwrap());
        assert!(check(json!({"Not": {"Variable": "$.n", "IsString": true}}), i.clone()).unwrap());
        assert!(check(json!({"And": [{"Variable": "$.n", "IsNumeric": true}, {"Or": [{"Variable": "$.b", "IsBoolean": false}, {"Variable": "$.s", "StringEqualsPath": "$.s"}]}]}), i.clone()).unwrap());
        let e = check(json!({"Variable": "$.nope", "NumericEquals": 1}), i).unwrap_err();
        assert_eq!(e.error, "States.Runtime");
        assert!(e.cause.contains("$.nope"));
    }

    #[test]
    fn wildcards() {
        assert!(string_matches("log-2026.txt", "log-*.txt"));
        assert!(string_matches("a*b", "a\\*b"));
        assert!(!string_matches("axb", "a\\*b"));
        assert!(string_matches("", "*"));
        assert!(!string_matches("abc", "*d"));
    }

    #[test]
    fn bad_rules_are_located() {
        let mut errs = Vec::new();
        parse_rule(
            &json!({"Variable": "$.x", "NumericEquals": "5", "Next": "A"}),
            "/States/C/Choices/0",
            true,
            &mut errs,
        );
        assert_eq!(errs[0].0, "/States/C/Choices/0/NumericEquals");
        errs.clear();
        parse_rule(&json!({"Variable": "$.x", "Next": "A"}), "/States/C/Choices/1", true, &mut errs);
        assert_eq!(errs[0].0, "/States/C/Choices/1");
    }
}
