//! JSONata, the query language of `QueryLanguage: "JSONata"` states: `{% expression %}`
//! strings in `Arguments`, `Output`, `Assign`, `Condition`, `Items`, `ItemSelector` and the
//! other fields that take one, evaluated by the `jsonata-rs` library (vendored with fixes in
//! third_party/jsonata-rs, see its EMBER-CHANGES.md) with the bindings Step
//! Functions gives: `$states` (`input`, `context`, `result`, `errorOutput`), the workflow
//! variables, and the functions Step Functions adds to JSONata (`$partition`, `$range`,
//! `$hash`, `$random`, `$uuid`, `$parse`).
//!
//! As in Step Functions, an expression has no context value (`$` is undefined): data comes
//! from `$states.input` and the variables. An expression that evaluates to nothing
//! (undefined) is an error, not a missing field.

use bumpalo::Bump;
use jsonata_rs::{ArrayFlags, FunctionContext, JsonAta, Value as JValue};
use serde_json::{Map, Number, Value};

use super::error::{names, StatesError};
use super::intrinsics;

/// What an expression can see: `$states` and the workflow variables.
#[derive(Debug, Clone, Copy)]
pub struct Bindings<'a> {
    /// The `$states` object.
    pub states: &'a Value,
    /// The workflow variables in scope, by name (without `$`).
    pub vars: &'a Map<String, Value>,
}

/// The expression inside a `{% ... %}` string, if `s` is one.
pub fn expression(s: &str) -> Option<&str> {
    s.strip_prefix("{%").and_then(|r| r.strip_suffix("%}")).map(str::trim)
}

/// Whether `v` is a `{% ... %}` string.
pub fn is_expression(v: &Value) -> bool {
    v.as_str().and_then(expression).is_some()
}

/// Checks that an expression parses; the message names what is wrong.
pub fn check(expr: &str) -> Result<(), String> {
    let arena = Bump::new();
    match guarded(|| JsonAta::new(expr, &arena).map(|_| ())) {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(format!("invalid JSONata expression '{expr}': {e}")),
        None => Err(format!("the JSONata expression '{expr}' uses a feature Ember's JSONata does not support yet (see orchestrator/CONFORMANCE.md)")),
    }
}

thread_local! {
    /// Set while the library runs, so the panic hook stays quiet for its panics.
    static IN_LIBRARY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs library code that may panic (upstream jsonata-rs panicked on features it lacks; the
/// vendored copy in third_party/jsonata-rs returns errors for those it is known to reach, and
/// this guard stays for any left): `None` if it did. The panic is not printed (a bad expression is a
/// user's error, reported as one, not a crash); panics elsewhere print as before.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_LIBRARY.with(|f| f.get()) {
                previous(info);
            }
        }));
    });
    IN_LIBRARY.with(|f| f.set(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_LIBRARY.with(|f| f.set(false));
    out.ok()
}

/// Checks every `{% %}` string of a template (any JSON value). Returns
/// `(json-pointer, message)` for each problem.
pub fn check_template(template: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match template {
        Value::String(s) => {
            // Only a string that is exactly `{% ... %}` is an expression; anything else, even
            // ` {% x %} ` with a space before, is a literal (as Step Functions reads it).
            if let Some(e) = expression(s) {
                if let Err(m) = check(e) {
                    out.push((at.to_string(), m));
                }
            }
        }
        Value::Object(m) => {
            for (k, v) in m {
                check_template(v, &format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                check_template(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// The `$name` references of an expression that are not bound inside it (neither `$x :=`
/// nor a function parameter) and are not `$states` or a function: the workflow variables it
/// reads. String literals and regexes are skipped.
pub fn variable_references(expr: &str) -> Vec<String> {
    let mut refs = Vec::new();
    let mut local = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                if j > start {
                    let name = &expr[start..j];
                    let rest = expr[j..].trim_start();
                    let before = expr[..i].trim_end();
                    let is_call = rest.starts_with('(');
                    let is_binding = rest.starts_with(":=")
                        || before.ends_with("function(")
                        || before.ends_with(',') && is_param_list(&expr[..i]);
                    if is_binding {
                        local.push(name.to_string());
                    } else if !is_call
                        && name != "states"
                        && !local.iter().any(|l| l == name)
                        && !refs.iter().any(|r| r == name)
                    {
                        refs.push(name.to_string());
                    }
                }
                i = j.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    refs
}

/// Whether the text before a `$name` is inside an open `function(` parameter list.
fn is_param_list(before: &str) -> bool {
    match (before.rfind("function("), before.rfind(')')) {
        (Some(f), Some(c)) => c < f,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Deepest nesting of an evaluation (recursive functions), as jsonata-js's default guards do.
const MAX_DEPTH: usize = 500;
/// Longest evaluation of one expression, in milliseconds.
const MAX_MILLIS: usize = 5_000;

fn eval_error(state_field: &str, expr: &str, detail: impl std::fmt::Display) -> StatesError {
    StatesError::new(
        names::QUERY_EVALUATION_ERROR,
        format!("The JSONata expression '{expr}' specified for the field '{state_field}' threw an error during evaluation. {detail}"),
    )
}

/// Evaluates one expression (the text inside `{% %}`) for the field `field` (named in
/// errors, as `Output/result`).
pub fn evaluate(expr: &str, field: &str, b: Bindings<'_>) -> Result<Value, StatesError> {
    let arena = Bump::new();
    // Registered functions and the variables shadow the library's built-ins: Step Functions'
    // `$random` takes an optional seed, and Step Functions has no `$eval` (use `$parse`).
    let unsupported = || eval_error(field, expr, "the expression uses a feature Ember's JSONata does not support yet");
    let j = guarded(|| JsonAta::new(expr, &arena)).ok_or_else(unsupported)?.map_err(|e| eval_error(field, expr, e))?;
    j.register_function("partition", 2, fn_partition);
    j.register_function("range", 3, fn_range);
    j.register_function("hash", 2, fn_hash);
    j.register_function("parse", 1, fn_parse);
    j.register_function("random", 1, fn_random);
    j.register_function("eval", 1, fn_no_eval);
    for (k, v) in b.vars {
        j.assign_var(k, from_json(&arena, v));
    }
    j.assign_var("states", from_json(&arena, b.states));
    // The library may still panic on some input it does not expect; a bad expression must
    // fail its state, never the worker. Depth and time limits stop runaway recursion.
    let out = guarded(|| j.evaluate_timeboxed(None, Some(MAX_DEPTH), Some(MAX_MILLIS)))
        .ok_or_else(unsupported)?
        .map_err(|e| eval_error(field, expr, e))?;
    match to_json(out) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(StatesError::new(
            names::QUERY_EVALUATION_ERROR,
            format!("The JSONata expression '{expr}' specified for the field '{field}' returned nothing (undefined)."),
        )),
        Err(what) => Err(eval_error(field, expr, what)),
    }
}

/// Evaluates a template: every `{% %}` string (at any depth) is replaced by its value; other
/// values are kept as they are. `field` names the template in errors (`Output`, `Arguments`).
pub fn eval_template(template: &Value, field: &str, b: Bindings<'_>) -> Result<Value, StatesError> {
    match template {
        Value::String(s) => match expression(s) {
            Some(e) => evaluate(e, field, b),
            None => Ok(template.clone()),
        },
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                out.insert(k.clone(), eval_template(v, &format!("{field}/{k}"), b)?);
            }
            Ok(Value::Object(out))
        }
        Value::Array(a) => Ok(Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, v)| eval_template(v, &format!("{field}/{i}"), b))
                .collect::<Result<_, _>>()?,
        )),
        other => Ok(other.clone()),
    }
}

/// Converts a JSONata result to JSON; `None` for undefined, `Err` for values JSON cannot hold.
fn to_json<'a>(v: &'a JValue<'a>) -> Result<Option<Value>, String> {
    Ok(Some(match v {
        JValue::Undefined => return Ok(None),
        JValue::Null => Value::Null,
        JValue::Bool(b) => Value::Bool(*b),
        JValue::Number(n) => number(*n)?,
        JValue::String(s) => Value::String(s.to_string()),
        JValue::Array(..) | JValue::Range(_) => {
            let mut out = Vec::with_capacity(v.len());
            for m in v.members() {
                if let Some(x) = to_json(m)? {
                    out.push(x);
                }
            }
            // A sequence of one value is that value (JSONata's singleton rule).
            if out.len() == 1 && v.has_flags(ArrayFlags::SEQUENCE) && !v.has_flags(ArrayFlags::SINGLETON) {
                return Ok(out.pop());
            }
            Value::Array(out)
        }
        JValue::Object(_) => {
            let mut out = Map::new();
            for (k, x) in v.entries() {
                if let Some(x) = to_json(x)? {
                    out.insert(k.to_string(), x);
                }
            }
            Value::Object(out)
        }
        JValue::Regex(_) | JValue::Lambda { .. } | JValue::NativeFn { .. } | JValue::Transformer { .. } => {
            return Err("the result is a function or a regular expression, which is not JSON".to_string())
        }
    }))
}

/// A JSONata number as JSON: integers stay integers (as JavaScript prints them).
fn number(n: f64) -> Result<Value, String> {
    if !n.is_finite() {
        return Err(format!("the number {n} cannot be represented in JSON"));
    }
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        return Ok(Value::from(n as i64));
    }
    Number::from_f64(n).map(Value::Number).ok_or_else(|| format!("the number {n} cannot be represented in JSON"))
}

/// JSON of a JSONata argument (undefined as null).
fn arg_json<'a>(v: &'a JValue<'a>) -> Value {
    to_json(v).ok().flatten().unwrap_or(Value::Null)
}

/// A JSON value in the arena, for a function's result.
fn from_json<'a>(arena: &'a Bump, v: &Value) -> &'a JValue<'a> {
    match v {
        Value::Null => JValue::null(arena),
        Value::Bool(b) => JValue::bool(*b),
        Value::Number(n) => JValue::number(arena, n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => JValue::string(arena, s),
        Value::Array(a) => {
            let out = JValue::array_with_capacity(arena, a.len(), ArrayFlags::empty());
            for x in a {
                out.push(from_json(arena, x));
            }
            out
        }
        Value::Object(o) => {
            let out = JValue::object_with_capacity(arena, o.len());
            for (k, x) in o {
                out.insert(k, from_json(arena, x));
            }
            out
        }
    }
}

/// Runs one of Step Functions' JSONata functions through the intrinsic of the same meaning;
/// its error becomes a JSONata error (reported as `States.QueryEvaluationError`).
fn via_intrinsic<'a>(
    ctx: &FunctionContext<'a, '_>,
    intrinsic: &str,
    args: &[&'a JValue<'a>],
) -> jsonata_rs::Result<&'a JValue<'a>> {
    let json: Vec<Value> = args.iter().map(|a| arg_json(a)).collect();
    match intrinsics::apply(intrinsic, json) {
        Ok(v) => Ok(from_json(ctx.arena, &v)),
        Err(e) => Err(jsonata_rs::Error::D3137Error(format!("${}: {}", ctx.name, e.cause))),
    }
}

fn fn_partition<'a>(ctx: FunctionContext<'a, '_>, args: &[&'a JValue<'a>]) -> jsonata_rs::Result<&'a JValue<'a>> {
    via_intrinsic(&ctx, "States.ArrayPartition", args)
}

fn fn_range<'a>(ctx: FunctionContext<'a, '_>, args: &[&'a JValue<'a>]) -> jsonata_rs::Result<&'a JValue<'a>> {
    // A JSONata sequence: one number comes back as that number, not a one-element array (as
    // Step Functions returns it).
    let out = via_intrinsic(&ctx, "States.ArrayRange", args)?;
    Ok(if out.is_array() && out.len() == 1 { out.get_member(0) } else { out })
}

fn fn_hash<'a>(ctx: FunctionContext<'a, '_>, args: &[&'a JValue<'a>]) -> jsonata_rs::Result<&'a JValue<'a>> {
    via_intrinsic(&ctx, "States.Hash", args)
}

fn fn_parse<'a>(ctx: FunctionContext<'a, '_>, args: &[&'a JValue<'a>]) -> jsonata_rs::Result<&'a JValue<'a>> {
    via_intrinsic(&ctx, "States.StringToJson", args)
}

/// `$eval`, which Step Functions does not offer.
fn fn_no_eval<'a>(_ctx: FunctionContext<'a, '_>, _args: &[&'a JValue<'a>]) -> jsonata_rs::Result<&'a JValue<'a>> {
    Err(jsonata_rs::Error::D3137Error("$eval is not available in Step Functions: use $parse".to_string()))
}

/// `$random()` or `$random(seed)`: a number in [0, 1); the same seed gives the same number.
fn fn_random<'a>(ctx: FunctionContext<'a, '_>, args: &[&'a JValue<'a>]) -> jsonata_rs::Result<&'a JValue<'a>> {
    use rand::{Rng, SeedableRng};
    let x: f64 = match args.first().filter(|a| !a.is_undefined()) {
        None => rand::rng().random(),
        Some(seed) if seed.is_number() && seed.is_integer() => {
            rand::rngs::StdRng::seed_from_u64(seed.as_f64() as i64 as u64).random()
        }
        Some(_) => return Err(jsonata_rs::Error::D3137Error("$random: the seed must be an integer".to_string())),
    };
    Ok(JValue::number(ctx.arena, x))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(expr: &str, states: Value, vars: Value) -> Result<Value, StatesError> {
        let vars = vars.as_object().cloned().unwrap_or_default();
        evaluate(expr, "Output", Bindings { states: &states, vars: &vars })
    }

    #[test]
    fn states_and_variables_are_bound_and_dollar_is_undefined() {
        let states = json!({"input": {"a": [1, 2, 3], "name": "Ada"}});
        assert_eq!(eval("$states.input.name", states.clone(), json!({})).unwrap(), json!("Ada"));
        assert_eq!(eval("$sum($states.input.a) + $x", states.clone(), json!({"x": 4})).unwrap(), json!(10));
        assert_eq!(eval("$states.input.a[1]", states.clone(), json!({})).unwrap(), json!(2));
        let e = eval("$states.input.missing", states, json!({})).unwrap_err();
        assert_eq!(e.error, "States.QueryEvaluationError");
        assert!(e.cause.contains("returned nothing (undefined)"), "{}", e.cause);
    }

    #[test]
    fn numbers_keep_their_json_shape() {
        let s = json!({});
        assert_eq!(eval("1 + 2", s.clone(), json!({})).unwrap(), json!(3));
        assert_eq!(eval("1 / 4", s.clone(), json!({})).unwrap(), json!(0.25));
        assert_eq!(eval("[1..3]", s.clone(), json!({})).unwrap(), json!([1, 2, 3]));
        assert_eq!(eval("{'a': [true, null, 'x']}", s, json!({})).unwrap(), json!({"a": [true, null, "x"]}));
    }

    #[test]
    fn step_functions_functions() {
        let s = json!({});
        assert_eq!(eval("$partition([1,2,3,4,5], 2)", s.clone(), json!({})).unwrap(), json!([[1, 2], [3, 4], [5]]));
        assert_eq!(eval("$range(0, 10, 5)", s.clone(), json!({})).unwrap(), json!([0, 5, 10]));
        assert_eq!(
            eval("$hash('input data', 'SHA-1')", s.clone(), json!({})).unwrap(),
            json!("aaff4a450a104cd177d28d18d74485e8cae074b7")
        );
        assert_eq!(eval("$parse('{\"a\": [1]}').a", s.clone(), json!({})).unwrap(), json!([1]));
        let r1 = eval("$random(7)", s.clone(), json!({})).unwrap();
        assert_eq!(r1, eval("$random(7)", s.clone(), json!({})).unwrap());
        assert!(r1.as_f64().is_some_and(|x| (0.0..1.0).contains(&x)));
        assert_eq!(eval("$length($uuid())", s.clone(), json!({})).unwrap(), json!(36));
        // Variables shadow built-ins (as in jsonata-js): `$count` is the variable here.
        assert_eq!(eval("$count + 1", s.clone(), json!({"count": 42})).unwrap(), json!(43));
        let e = eval("$eval('1 + 1')", s.clone(), json!({})).unwrap_err();
        assert!(e.cause.contains("use $parse"), "{}", e.cause);
        let e = eval("$partition([1], 0)", s, json!({})).unwrap_err();
        assert_eq!(e.error, "States.QueryEvaluationError");
    }

    #[test]
    fn templates_evaluate_only_expressions() {
        let states = json!({"input": {"n": 2}});
        let vars = Map::new();
        let b = Bindings { states: &states, vars: &vars };
        let t =
            json!({"lit": "$states.input.n", "n": "{% $states.input.n %}", "arr": ["{% $states.input.n * 2 %}", 1]});
        assert_eq!(eval_template(&t, "Output", b).unwrap(), json!({"lit": "$states.input.n", "n": 2, "arr": [4, 1]}));
        let e = eval_template(&json!({"r": "{% $nope %}"}), "Output", b).unwrap_err();
        assert!(e.cause.contains("'Output/r'"), "{}", e.cause);
    }

    #[test]
    fn variable_references_skip_locals_functions_and_strings() {
        assert_eq!(variable_references("$a + $b.c + $states.input.x"), vec!["a", "b"]);
        assert_eq!(variable_references("($t := 1; $t + $u)"), vec!["u"]);
        assert_eq!(variable_references("$map($xs, function($v, $i) { $v + $k })"), vec!["xs", "k"]);
        assert_eq!(variable_references("'$notavar' & \"$nor\" & $sum($q)"), vec!["q"]);
    }
}
