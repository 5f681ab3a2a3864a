//! JSONPath queries (through `serde_json_path`), reference paths for `ResultPath`, and payload
//! templates (`Parameters`, `ResultSelector`, `ItemSelector`) with their `.$` keys.

use serde_json::{Map, Value};
use serde_json_path::JsonPath;

use super::error::{names, StatesError};
use super::intrinsics;

/// Where a path is evaluated: the state's data (`$`) and the context object (`$$`).
pub struct Scope<'a> {
    /// The value `$` refers to.
    pub input: &'a Value,
    /// The context object `$$` refers to.
    pub context: &'a Value,
    /// The workflow variables `$name` refers to.
    pub vars: Option<&'a Map<String, Value>>,
}

/// A variable reference (`$name`, `$name.a[0]`): the name and the path into its value.
fn variable(path: &str) -> Option<(&str, String)> {
    let rest = path.strip_prefix('$')?;
    if !rest.starts_with(|c: char| c.is_alphabetic() || c == '_') {
        return None;
    }
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
    Some((&rest[..end], format!("${}", &rest[end..])))
}

/// Checks that `path` is a JSONPath (or a `$$` context path) Step Functions accepts.
pub fn check_path(path: &str) -> Result<(), String> {
    if let Some((_, rest)) = variable(path) {
        return check_path(&rest);
    }
    let (_, p) = split_context(path);
    if !p.starts_with('$') {
        return Err(format!("'{path}' is not a JSONPath (it must start with '$')"));
    }
    JsonPath::parse(&to_rfc9535(p)).map(|_| ()).map_err(|e| format!("invalid JSONPath '{path}': {e}"))
}

/// Rewrites a Step Functions (Jayway) path into RFC 9535 syntax, which `serde_json_path`
/// parses. The two differ in member names, and AWS's answers follow Jayway:
/// - after `.`, Jayway takes every character up to the next `.`, `[`, `(` or space as the
///   name, so `$.detail-type`, `$.1st` and `$.a:b` are member names; RFC 9535 allows only
///   letters, digits (not first) and `_` there. Such names become `['...']`.
/// - inside a quoted bracket name, a backslash stops the next character from closing the
///   string but is kept: AWS matches `$['Test\""Name"']` against the key `Test\""Name"`
///   (LocalStack's recording `test_escape_sequence_parsing[ESCAPE_SEQUENCES_JSONPATH]`).
///   RFC 9535 unescapes, so the name is re-quoted with the backslash escaped.
pub fn to_rfc9535(path: &str) -> String {
    let chars: Vec<char> = path.chars().collect();
    let mut out = String::with_capacity(path.len() + 8);
    let mut i = 0;
    let mut depth = 0usize;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '.' if depth == 0 => {
                out.push('.');
                i += 1;
                if chars.get(i) == Some(&'.') {
                    out.push('.');
                    i += 1;
                }
                let start = i;
                while i < chars.len() && !matches!(chars[i], '.' | '[' | '(' | ' ') {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                if name.is_empty() && chars.get(i) == Some(&'[') && !out.ends_with("..") {
                    // Jayway reads `$.abc.['def ghi']` (the developer guide's own example) as
                    // `$.abc['def ghi']`.
                    out.pop();
                } else if name.is_empty() || name == "*" || is_shorthand(&name) {
                    out.push_str(&name);
                } else {
                    // `.['x']` is not RFC 9535; `..['x']` is.
                    if !out.ends_with("..") {
                        out.pop();
                    }
                    out.push('[');
                    out.push_str(&quote(&name));
                    out.push(']');
                }
            }
            '[' => {
                depth += 1;
                out.push('[');
                i += 1;
            }
            ']' => {
                depth = depth.saturating_sub(1);
                out.push(']');
                i += 1;
            }
            '\'' | '"' => {
                let start = i + 1;
                i = start;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                let end = i.min(chars.len());
                let raw: String = chars[start..end].iter().collect();
                if i < chars.len() {
                    out.push_str(&quote(&raw));
                    i += 1;
                } else {
                    // Unterminated: leave it for the parser to report.
                    out.push(c);
                    out.push_str(&raw);
                }
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// An RFC 9535 member-name-shorthand: a letter, `_` or non-ASCII first, then also digits.
fn is_shorthand(name: &str) -> bool {
    let mut cs = name.chars();
    let first_ok = cs.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii());
    first_ok && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || !c.is_ascii())
}

/// `name` as an RFC 9535 single-quoted string.
fn quote(name: &str) -> String {
    let mut q = String::from("'");
    for ch in name.chars() {
        match ch {
            '\'' => q.push_str("\\'"),
            '\\' => q.push_str("\\\\"),
            c if (c as u32) < 0x20 => q.push_str(&format!("\\u{:04x}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('\'');
    q
}

fn split_context(path: &str) -> (bool, &str) {
    if path.starts_with("$$") {
        (true, &path[1..])
    } else {
        (false, path)
    }
}

/// A path is definite when it can select at most one node; indefinite paths (wildcards,
/// descendants, filters, slices, unions) return an array, as in Step Functions.
fn is_definite(path: &str) -> bool {
    let mut in_quote: Option<char> = None;
    let mut prev = ' ';
    let mut depth = 0;
    for c in path.chars() {
        match in_quote {
            Some(q) => {
                if c == q && prev != '\\' {
                    in_quote = None;
                }
            }
            None => match c {
                '\'' | '"' => in_quote = Some(c),
                '*' | '?' => return false,
                '.' if prev == '.' => return false,
                '[' => depth += 1,
                ']' => depth -= 1,
                ':' | ',' if depth > 0 => return false,
                _ => {}
            },
        }
        prev = c;
    }
    true
}

/// Evaluates a path (`$...` on the input, `$$...` on the context). A definite path that
/// matches nothing is a `States.Runtime` error naming the path.
pub fn query(path: &str, scope: &Scope<'_>) -> Result<Value, StatesError> {
    query_opt(path, scope)?
        .ok_or_else(|| StatesError::runtime(format!("Invalid path '{path}': No results for path: {path}")))
}

/// Like [`query`], but a definite path that matches nothing gives `None`.
pub fn query_opt(path: &str, scope: &Scope<'_>) -> Result<Option<Value>, StatesError> {
    if let Some((name, rest)) = variable(path) {
        let value = scope.vars.and_then(|v| v.get(name)).ok_or_else(|| {
            StatesError::runtime(format!("Invalid path '{path}': the variable '${name}' is not assigned"))
        })?;
        return query_opt(&rest, &Scope { input: value, context: scope.context, vars: None });
    }
    let (ctx, p) = split_context(path);
    let doc = if ctx { scope.context } else { scope.input };
    if p == "$" {
        return Ok(Some(doc.clone()));
    }
    let jp =
        JsonPath::parse(&to_rfc9535(p)).map_err(|e| StatesError::runtime(format!("Invalid path '{path}': {e}")))?;
    let nodes = jp.query(doc);
    if is_definite(p) {
        Ok(nodes.all().first().map(|v| (*v).clone()))
    } else {
        Ok(Some(Value::Array(nodes.all().into_iter().cloned().collect())))
    }
}

/// One step of a reference path.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    /// An object member.
    Field(String),
    /// An array element.
    Index(usize),
}

/// Parses a reference path (`$`, `$.a.b`, `$['a'][0]`): the only form `ResultPath` accepts.
pub fn parse_reference(path: &str) -> Result<Vec<Segment>, String> {
    check_path(path)?;
    let mut rest = path.strip_prefix('$').ok_or_else(|| format!("'{path}' must start with '$'"))?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let name = &r[..end];
            if name.is_empty() || name == "*" {
                return Err(format!("'{path}' is not a reference path"));
            }
            out.push(Segment::Field(name.to_string()));
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or_else(|| format!("unclosed '[' in '{path}'"))?;
            let inner = r[..end].trim();
            if let Some(q) = inner
                .strip_prefix('\'')
                .and_then(|s| s.strip_suffix('\''))
                .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
            {
                out.push(Segment::Field(q.to_string()));
            } else if let Ok(i) = inner.parse::<usize>() {
                out.push(Segment::Index(i));
            } else {
                return Err(format!("'{path}' is not a reference path (only names and indexes)"));
            }
            rest = &r[end + 1..];
        } else {
            return Err(format!("'{path}' is not a reference path"));
        }
    }
    Ok(out)
}

/// Applies `ResultPath`: `None` (JSON null) keeps the input, `$` replaces it, otherwise the
/// result is written at the reference path in a copy of the input, creating objects on the
/// way. Writing through a non-object is `States.ResultPathMatchFailure`.
pub fn apply_result_path(input: &Value, result: Value, result_path: Option<&str>) -> Result<Value, StatesError> {
    let Some(path) = result_path else { return Ok(input.clone()) };
    let segs = parse_reference(path).map_err(StatesError::runtime)?;
    if segs.is_empty() {
        return Ok(result);
    }
    let mut out = input.clone();
    let fail = || {
        StatesError::new(
            names::RESULT_PATH_MATCH_FAILURE,
            format!("Unable to apply ResultPath \"{path}\" to input {input}"),
        )
    };
    let mut cur = &mut out;
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        match seg {
            Segment::Field(name) => {
                let obj = cur.as_object_mut().ok_or_else(fail)?;
                if last {
                    obj.insert(name.clone(), result);
                    return Ok(out);
                }
                cur = obj.entry(name.clone()).or_insert_with(|| Value::Object(Map::new()));
            }
            Segment::Index(idx) => {
                let arr = cur.as_array_mut().ok_or_else(fail)?;
                let slot = arr.get_mut(*idx).ok_or_else(fail)?;
                if last {
                    *slot = result;
                    return Ok(out);
                }
                cur = slot;
            }
        }
    }
    Ok(out)
}

/// Evaluates a payload template: keys ending in `.$` take the value of their path or
/// intrinsic call (and lose the suffix); nested objects and arrays are processed too.
pub fn eval_template(template: &Value, scope: &Scope<'_>) -> Result<Value, StatesError> {
    match template {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                if let Some(name) = k.strip_suffix(".$") {
                    let expr = v.as_str().ok_or_else(|| {
                        StatesError::runtime(format!(
                            "The value of field '{k}' must be a string path or intrinsic function"
                        ))
                    })?;
                    out.insert(name.to_string(), eval_expression(expr, k, scope)?);
                } else {
                    out.insert(k.clone(), eval_template(v, scope)?);
                }
            }
            Ok(Value::Object(out))
        }
        Value::Array(items) => {
            Ok(Value::Array(items.iter().map(|v| eval_template(v, scope)).collect::<Result<_, _>>()?))
        }
        other => Ok(other.clone()),
    }
}

/// A `.$` value: a path, a context path or an intrinsic function call.
pub fn eval_expression(expr: &str, field: &str, scope: &Scope<'_>) -> Result<Value, StatesError> {
    if expr.starts_with('$') {
        query_opt(expr, scope)?.ok_or_else(|| {
            StatesError::runtime(format!(
                "The JSONPath '{expr}' specified for the field '{field}' could not be found in the input '{}'",
                if expr.starts_with("$$") { scope.context } else { scope.input }
            ))
        })
    } else {
        intrinsics::evaluate(expr, scope)
    }
}

/// Checks every `.$` value of a template (paths parse, intrinsic calls parse). Returns
/// `(json-pointer-suffix, message)` for each problem.
pub fn check_template(template: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match template {
        Value::Object(map) => {
            for (k, v) in map {
                let loc = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                if k.ends_with(".$") {
                    match v.as_str() {
                        Some(s) if s.starts_with('$') => {
                            if let Err(e) = check_path(s) {
                                out.push((loc, e));
                            }
                        }
                        Some(s) => {
                            if let Err(e) = intrinsics::parse(s) {
                                out.push((loc, e));
                            }
                        }
                        None => {
                            out.push((loc, format!("'{k}' must have a string value (a path or an intrinsic function)")))
                        }
                    }
                } else {
                    check_template(v, &loc, out);
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                check_template(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope<'a>(input: &'a Value, ctx: &'a Value) -> Scope<'a> {
        Scope { input, context: ctx, vars: None }
    }

    #[test]
    fn definite_and_indefinite_queries() {
        let input = json!({"a": {"b": [1, 2, 3]}, "items": [{"x": 1}, {"x": 5}]});
        let ctx = json!({"State": {"Name": "S"}});
        let s = scope(&input, &ctx);
        assert_eq!(query("$.a.b[1]", &s).unwrap(), json!(2));
        assert_eq!(query("$.items[*].x", &s).unwrap(), json!([1, 5]));
        assert_eq!(query("$.items[?(@.x > 2)]", &s).unwrap(), json!([{"x": 5}]));
        assert_eq!(query("$$.State.Name", &s).unwrap(), json!("S"));
        assert_eq!(query("$", &s).unwrap(), input);
        let err = query("$.missing", &s).unwrap_err();
        assert_eq!(err.error, "States.Runtime");
        assert!(err.cause.contains("$.missing"), "{}", err.cause);
    }

    #[test]
    fn jayway_member_names_and_bracket_escapes() {
        // Jayway names after '.' run to the next '.', '[', '(' or space.
        assert_eq!(to_rfc9535("$.detail-type.x"), "$['detail-type'].x");
        assert_eq!(to_rfc9535("$.1st"), "$['1st']");
        assert_eq!(to_rfc9535("$..a-b"), "$..['a-b']");
        assert_eq!(to_rfc9535("$.naïve"), "$.naïve");
        assert_eq!(to_rfc9535("$.abc.['def ghi']"), "$.abc['def ghi']");
        assert_eq!(to_rfc9535("$[\"x y\"]"), "$['x y']");
        // A backslash keeps the quote from closing the name and stays in it.
        assert_eq!(to_rfc9535(r#"$['Test\""Name"']"#), r#"$['Test\\""Name"']"#);
        assert_eq!(to_rfc9535(r"$['a\'b']"), r"$['a\\\'b']");
        assert_eq!(to_rfc9535("$.items[?(@.x > 1)]"), "$.items[?(@.x > 1)]");

        let input = json!({"detail-type": 1, "1st": 2, "a\\'b": 3, "Test\\\"\"Name\"": 4, "x y": {"k": 5}});
        let ctx = json!({});
        let s = scope(&input, &ctx);
        assert_eq!(query("$.detail-type", &s).unwrap(), json!(1));
        assert_eq!(query("$.1st", &s).unwrap(), json!(2));
        assert_eq!(query(r"$['a\'b']", &s).unwrap(), json!(3));
        assert_eq!(query(r#"$['Test\""Name"']"#, &s).unwrap(), json!(4));
        assert_eq!(query("$['x y'].k", &s).unwrap(), json!(5));
        assert!(check_path("$.a b").is_err());
        assert_eq!(apply_result_path(&json!({}), json!(1), Some("$.out-put")).unwrap(), json!({"out-put": 1}));
    }

    #[test]
    fn result_path_writes() {
        let input = json!({"a": 1});
        assert_eq!(apply_result_path(&input, json!(2), Some("$.b.c")).unwrap(), json!({"a": 1, "b": {"c": 2}}));
        assert_eq!(apply_result_path(&input, json!(2), Some("$")).unwrap(), json!(2));
        assert_eq!(apply_result_path(&input, json!(2), None).unwrap(), input);
        let e = apply_result_path(&input, json!(2), Some("$.a.b")).unwrap_err();
        assert_eq!(e.error, "States.ResultPathMatchFailure");
        assert!(parse_reference("$.a[*]").is_err());
        assert_eq!(parse_reference("$['x y'][2]").unwrap(), vec![Segment::Field("x y".into()), Segment::Index(2)]);
    }

    #[test]
    fn templates() {
        let input = json!({"name": "Ada", "n": 2});
        let ctx = json!({"Execution": {"Id": "e1"}});
        let t = json!({"who.$": "$.name", "id.$": "$$.Execution.Id", "lit": {"k.$": "States.Format('hi {}', $.name)"}, "arr": [{"v.$": "$.n"}]});
        let out = eval_template(&t, &scope(&input, &ctx)).unwrap();
        assert_eq!(out, json!({"who": "Ada", "id": "e1", "lit": {"k": "hi Ada"}, "arr": [{"v": 2}]}));
        let e = eval_template(&json!({"x.$": "$.nope"}), &scope(&input, &ctx)).unwrap_err();
        assert!(e.cause.contains("$.nope") && e.cause.contains("x.$"), "{}", e.cause);
    }
}
