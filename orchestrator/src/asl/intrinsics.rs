//! Intrinsic functions (`States.Format(...)` and the rest): a small parser for the call
//! syntax and the functions themselves. Argument errors are `States.Runtime` errors naming
//! the function and the argument.

use base64::Engine as _;
use serde_json::{Number, Value};

use super::error::StatesError;
use super::path::{self, Scope};

/// One argument of an intrinsic call.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    /// A literal (string, number, boolean or null); a string keeps its `\{`, `\}`, `\\` escapes.
    Literal(Value),
    /// A path into the input (`$.x`) or the context (`$$.x`).
    Path(String),
    /// A nested call.
    Call(Call),
}

/// A parsed intrinsic call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The full name, e.g. `States.Format`.
    pub name: String,
    /// The arguments in order.
    pub args: Vec<Arg>,
}

const FUNCTIONS: &[&str] = &[
    "States.Format",
    "States.StringToJson",
    "States.JsonToString",
    "States.Array",
    "States.ArrayPartition",
    "States.ArrayContains",
    "States.ArrayRange",
    "States.ArrayGetItem",
    "States.ArrayLength",
    "States.ArrayUnique",
    "States.Base64Encode",
    "States.Base64Decode",
    "States.Hash",
    "States.JsonMerge",
    "States.MathRandom",
    "States.MathAdd",
    "States.StringSplit",
    "States.UUID",
];

/// Parses an intrinsic call such as `States.Format('{} items', $.n)`.
pub fn parse(src: &str) -> Result<Call, String> {
    let mut p = Parser { s: src.as_bytes(), i: 0, src };
    p.ws();
    let call = p.call()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected text after the call at offset {} in '{src}'", p.i));
    }
    Ok(call)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    src: &'a str,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn err(&self, what: &str) -> String {
        format!("{what} at offset {} in intrinsic '{}'", self.i, self.src)
    }
    fn call(&mut self) -> Result<Call, String> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_') {
            self.i += 1;
        }
        let name = self.src[start..self.i].to_string();
        if !FUNCTIONS.contains(&name.as_str()) {
            return Err(format!("unknown intrinsic function '{name}' in '{}'", self.src));
        }
        self.ws();
        if self.peek() != Some(b'(') {
            return Err(self.err("expected '('"));
        }
        self.i += 1;
        let mut args = Vec::new();
        self.ws();
        if self.peek() == Some(b')') {
            self.i += 1;
            return Ok(Call { name, args });
        }
        loop {
            self.ws();
            args.push(self.arg()?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b')') => {
                    self.i += 1;
                    return Ok(Call { name, args });
                }
                _ => return Err(self.err("expected ',' or ')'")),
            }
        }
    }
    fn arg(&mut self) -> Result<Arg, String> {
        match self.peek() {
            Some(b'\'') => self.string(),
            Some(b'$') => self.path(),
            Some(c) if c == b'-' || c.is_ascii_digit() => self.number(),
            Some(c) if c.is_ascii_alphabetic() => {
                let rest = &self.src[self.i..];
                for (kw, v) in [("true", Value::Bool(true)), ("false", Value::Bool(false)), ("null", Value::Null)] {
                    if rest.starts_with(kw)
                        && !rest[kw.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '.')
                    {
                        self.i += kw.len();
                        return Ok(Arg::Literal(v));
                    }
                }
                Ok(Arg::Call(self.call()?))
            }
            _ => Err(self.err("expected an argument")),
        }
    }
    fn string(&mut self) -> Result<Arg, String> {
        self.i += 1;
        let mut out = String::new();
        let rest = &self.src[self.i..];
        let mut chars = rest.char_indices();
        while let Some((off, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    // `\{`, `\}` and `\\` stay escaped so States.Format can tell them from
                    // placeholders; every other use unescapes them (see `literal`).
                    Some((_, e @ ('{' | '}' | '\\'))) => {
                        out.push('\\');
                        out.push(e);
                    }
                    Some((_, '\'')) => out.push('\''),
                    // The developer guide reserves exactly ' { } \ for escaping; AWS rejects
                    // the definition for any other escape, e.g. `\"` (LocalStack's recording
                    // `test_illegal_escapes`).
                    Some((_, e)) => {
                        return Err(self.err(&format!(
                            "'\\{e}' is not an escape: in an intrinsic string only \\', \\{{, \\}} and \\\\ are"
                        )))
                    }
                    None => return Err(self.err("unterminated escape")),
                },
                '\'' => {
                    self.i += off + 1;
                    return Ok(Arg::Literal(Value::String(out)));
                }
                c => out.push(c),
            }
        }
        Err(self.err("unterminated string"))
    }
    fn number(&mut self) -> Result<Arg, String> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E')) {
            self.i += 1;
        }
        let text = &self.src[start..self.i];
        let v: Value = serde_json::from_str(text).map_err(|_| self.err(&format!("bad number '{text}'")))?;
        Ok(Arg::Literal(v))
    }
    fn path(&mut self) -> Result<Arg, String> {
        let start = self.i;
        let (mut depth, mut quote) = (0i32, None::<u8>);
        while let Some(c) = self.peek() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) if c == b'\\' => self.i += 1,
                Some(_) => {}
                None => match c {
                    b'\'' | b'"' => quote = Some(c),
                    b'[' | b'(' => depth += 1,
                    b']' => depth -= 1,
                    b')' if depth == 0 => break,
                    b')' => depth -= 1,
                    b',' if depth == 0 => break,
                    _ => {}
                },
            }
            self.i += 1;
        }
        let p = self.src[start..self.i.min(self.s.len())].trim().to_string();
        check_dot_names(&p)?;
        path::check_path(&p)?;
        Ok(Arg::Path(p))
    }
}

/// Inside an intrinsic call a dot-notation member name is letters, digits and `_` only (the
/// intrinsic grammar's identifier); other names need brackets: AWS accepts `$.detail-type` in
/// a `.$` field but not inside `States.Format(...)`, where `$['detail-type']` works.
fn check_dot_names(p: &str) -> Result<(), String> {
    let (mut depth, mut quote, mut after_dot) = (0i32, None::<char>, false);
    let mut prev = ' ';
    for c in p.chars() {
        match quote {
            Some(q) => {
                if c == q && prev != '\\' {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => quote = Some(c),
                '[' => depth += 1,
                ']' => depth -= 1,
                '.' if depth == 0 => after_dot = true,
                c if after_dot && depth == 0 && !(c.is_ascii_alphanumeric() || c == '_' || c == '*' || c == '$') => {
                    return Err(format!(
                        "'{p}': inside an intrinsic function a name after '.' may hold only letters, digits and '_'; write the member in brackets, like $['detail-type']"
                    ));
                }
                _ => {}
            },
        }
        prev = c;
    }
    Ok(())
}

/// Parses and evaluates an intrinsic call.
pub fn evaluate(src: &str, scope: &Scope<'_>) -> Result<Value, StatesError> {
    let call = parse(src).map_err(StatesError::runtime)?;
    eval_call(&call, scope)
}

fn arg_err(f: &str, i: usize, msg: impl std::fmt::Display) -> StatesError {
    StatesError::runtime(format!("The value of argument {} of the intrinsic function {f} is invalid: {msg}", i + 1))
}

fn want_count(f: &str, args: &[Value], n: std::ops::RangeInclusive<usize>) -> Result<(), StatesError> {
    if n.contains(&args.len()) {
        Ok(())
    } else {
        Err(StatesError::runtime(format!(
            "The intrinsic function {f} takes {} argument(s) but {} were given",
            if n.start() == n.end() { n.start().to_string() } else { format!("{}-{}", n.start(), n.end()) },
            args.len()
        )))
    }
}

fn as_str<'a>(f: &str, args: &'a [Value], i: usize) -> Result<&'a str, StatesError> {
    args[i].as_str().ok_or_else(|| arg_err(f, i, format!("expected a string, got {}", args[i])))
}
fn as_arr<'a>(f: &str, args: &'a [Value], i: usize) -> Result<&'a Vec<Value>, StatesError> {
    args[i].as_array().ok_or_else(|| arg_err(f, i, format!("expected an array, got {}", args[i])))
}
/// An integer argument. AWS takes any number and rounds it half up, as Java's `Math.round`
/// does: `States.MathAdd(1.5, 0)` is 2, `States.MathAdd(-1.5, 0)` is -1 and
/// `States.MathAdd(1.49, 1.5)` is 3 (LocalStack's recording `test_math_add`, and
/// `test_math_random` with 12.5 and 44.51); every integer parameter is read the same way.
fn as_int(f: &str, args: &[Value], i: usize) -> Result<i64, StatesError> {
    match &args[i] {
        Value::Number(n) => match n.as_i64() {
            Some(v) => Ok(v),
            None => n
                .as_f64()
                .map(|x| (x + 0.5).floor())
                .filter(|x| x.abs() < 9.0e18)
                .map(|x| x as i64)
                .ok_or_else(|| arg_err(f, i, format!("{n} is out of range for an integer"))),
        },
        other => Err(arg_err(f, i, format!("expected an integer, got {other}"))),
    }
}

fn eval_call(call: &Call, scope: &Scope<'_>) -> Result<Value, StatesError> {
    let mut args = Vec::with_capacity(call.args.len());
    for (i, a) in call.args.iter().enumerate() {
        args.push(match a {
            Arg::Literal(Value::String(s)) if !(i == 0 && call.name == "States.Format") => Value::String(unescape(s)),
            Arg::Literal(v) => v.clone(),
            Arg::Path(p) => path::query(p, scope)?,
            Arg::Call(c) => eval_call(c, scope)?,
        });
    }
    apply(&call.name, args)
}

/// Applies the intrinsic function `f` to evaluated arguments (also the body of the JSONata
/// functions Step Functions defines with the same meaning: `$partition`, `$range`, `$hash`,
/// `$parse`).
pub(crate) fn apply(f: &str, args: Vec<Value>) -> Result<Value, StatesError> {
    match f {
        "States.Format" => {
            if args.is_empty() {
                return Err(StatesError::runtime("The intrinsic function States.Format needs a template argument"));
            }
            let tpl = as_str(f, &args, 0)?;
            format(tpl, &args[1..])
        }
        "States.StringToJson" => {
            want_count(f, &args, 1..=1)?;
            let s = as_str(f, &args, 0)?;
            // AWS parses an empty or blank string to null (LocalStack's recording
            // `test_string_to_json` with "" and " ").
            if s.trim().is_empty() {
                return Ok(Value::Null);
            }
            let mut v: Value = serde_json::from_str(s).map_err(|e| arg_err(f, 0, format!("not JSON: {e}")))?;
            positive_zero(&mut v);
            Ok(v)
        }
        "States.JsonToString" => {
            want_count(f, &args, 1..=1)?;
            Ok(Value::String(args[0].to_string()))
        }
        "States.Array" => Ok(Value::Array(args)),
        "States.ArrayPartition" => {
            want_count(f, &args, 2..=2)?;
            let arr = as_arr(f, &args, 0)?;
            let size = as_int(f, &args, 1)?;
            if size <= 0 {
                return Err(arg_err(f, 1, "the chunk size must be greater than 0"));
            }
            Ok(Value::Array(arr.chunks(size as usize).map(|c| Value::Array(c.to_vec())).collect()))
        }
        "States.ArrayContains" => {
            want_count(f, &args, 2..=2)?;
            Ok(Value::Bool(as_arr(f, &args, 0)?.contains(&args[1])))
        }
        "States.ArrayRange" => {
            want_count(f, &args, 3..=3)?;
            let (a, b, step) = (as_int(f, &args, 0)?, as_int(f, &args, 1)?, as_int(f, &args, 2)?);
            if step == 0 {
                return Err(arg_err(f, 2, "the step must not be 0"));
            }
            let mut out = Vec::new();
            let mut x = a;
            while (step > 0 && x <= b) || (step < 0 && x >= b) {
                out.push(Value::from(x));
                if out.len() > 1000 {
                    return Err(StatesError::runtime(format!(
                        "The intrinsic function {f} would return more than 1000 items"
                    )));
                }
                x += step;
            }
            Ok(Value::Array(out))
        }
        "States.ArrayGetItem" => {
            want_count(f, &args, 2..=2)?;
            let arr = as_arr(f, &args, 0)?;
            let i = as_int(f, &args, 1)?;
            usize::try_from(i)
                .ok()
                .and_then(|i| arr.get(i))
                .cloned()
                .ok_or_else(|| arg_err(f, 1, format!("index {i} is out of bounds for an array of {}", arr.len())))
        }
        "States.ArrayLength" => {
            want_count(f, &args, 1..=1)?;
            Ok(Value::from(as_arr(f, &args, 0)?.len()))
        }
        "States.ArrayUnique" => {
            want_count(f, &args, 1..=1)?;
            let mut out: Vec<Value> = Vec::new();
            for v in as_arr(f, &args, 0)? {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(Value::Array(out))
        }
        "States.Base64Encode" => {
            want_count(f, &args, 1..=1)?;
            let s = as_str(f, &args, 0)?;
            if s.len() > 10_000 {
                return Err(arg_err(f, 0, "the input is longer than 10000 characters"));
            }
            Ok(Value::String(base64::engine::general_purpose::STANDARD.encode(s)))
        }
        "States.Base64Decode" => {
            want_count(f, &args, 1..=1)?;
            let s = as_str(f, &args, 0)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| arg_err(f, 0, format!("not base64: {e}")))?;
            String::from_utf8(bytes).map(Value::String).map_err(|_| arg_err(f, 0, "the decoded data is not UTF-8"))
        }
        "States.Hash" => {
            want_count(f, &args, 2..=2)?;
            let data = match &args[0] {
                Value::String(s) => s.clone(),
                Value::Null => return Err(arg_err(f, 0, "the data must not be null")),
                other => other.to_string(),
            };
            let algo = as_str(f, &args, 1)?;
            Ok(Value::String(hash(algo, data.as_bytes()).ok_or_else(|| {
                arg_err(f, 1, format!("unsupported algorithm '{algo}' (MD5, SHA-1, SHA-256, SHA-384, SHA-512)"))
            })?))
        }
        "States.JsonMerge" => {
            want_count(f, &args, 3..=3)?;
            let (Some(a), Some(b)) = (args[0].as_object(), args[1].as_object()) else {
                let i = if args[0].is_object() { 1 } else { 0 };
                return Err(arg_err(f, i, format!("expected an object, got {}", args[i])));
            };
            if args[2] != Value::Bool(false) {
                return Err(arg_err(f, 2, "only a shallow merge (false) is supported"));
            }
            let mut out = a.clone();
            for (k, v) in b {
                out.insert(k.clone(), v.clone());
            }
            Ok(Value::Object(out))
        }
        "States.MathRandom" => {
            want_count(f, &args, 2..=3)?;
            let (lo, hi) = (as_int(f, &args, 0)?, as_int(f, &args, 1)?);
            if hi <= lo {
                return Err(arg_err(f, 1, "the end must be greater than the start"));
            }
            use rand::{Rng, SeedableRng};
            let v = if args.len() == 3 {
                let seed = as_int(f, &args, 2)?;
                rand::rngs::StdRng::seed_from_u64(seed as u64).random_range(lo..hi)
            } else {
                rand::rng().random_range(lo..hi)
            };
            Ok(Value::from(v))
        }
        "States.MathAdd" => {
            want_count(f, &args, 2..=2)?;
            let (a, b) = (as_int(f, &args, 0)?, as_int(f, &args, 1)?);
            a.checked_add(b).map(Value::from).ok_or_else(|| arg_err(f, 1, "the sum overflows"))
        }
        "States.StringSplit" => {
            want_count(f, &args, 2..=2)?;
            let s = as_str(f, &args, 0)?;
            let delims: Vec<char> = as_str(f, &args, 1)?.chars().collect();
            Ok(Value::Array(
                s.split(|c| delims.contains(&c))
                    .filter(|t| !t.is_empty())
                    .map(|t| Value::String(t.to_string()))
                    .collect(),
            ))
        }
        "States.UUID" => {
            want_count(f, &args, 0..=0)?;
            Ok(Value::String(uuid::Uuid::new_v4().to_string()))
        }
        other => Err(StatesError::runtime(format!("unknown intrinsic function '{other}'"))),
    }
}

fn format(tpl: &str, args: &[Value]) -> Result<Value, StatesError> {
    const F: &str = "States.Format";
    let mut out = String::new();
    let mut next = 0usize;
    let mut chars = tpl.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(e) = chars.next() {
                    out.push(e);
                }
            }
            '{' if chars.peek() == Some(&'}') => {
                chars.next();
                let v = args.get(next).ok_or_else(|| {
                    StatesError::runtime(format!(
                        "The intrinsic function {F} has more placeholders than the {} argument(s) given",
                        args.len()
                    ))
                })?;
                java_to_string(v, &mut out);
                next += 1;
            }
            c => out.push(c),
        }
    }
    if next != args.len() {
        return Err(StatesError::runtime(format!(
            "The intrinsic function {F} has {next} placeholder(s) but {} argument(s) were given",
            args.len()
        )));
    }
    Ok(Value::String(out))
}

/// A string literal as a value: the escapes kept for `States.Format` (`\{`, `\}`, `\\`)
/// resolved.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// `-0` parses to the integer 0 on AWS (LocalStack's recording `test_string_to_json`);
/// serde_json makes it the float -0.0.
fn positive_zero(v: &mut Value) {
    match v {
        Value::Number(n) if n.as_f64() == Some(0.0) && n.is_f64() && n.to_string() == "-0.0" => *v = Value::from(0),
        Value::Array(items) => items.iter_mut().for_each(positive_zero),
        Value::Object(m) => m.values_mut().for_each(positive_zero),
        _ => {}
    }
}

/// A value as AWS's Java runtime prints it into `States.Format`: strings bare, objects as
/// `{k=v, k2=v2}` and arrays as `[a, b]` (Java's `Map`/`List` `toString`); AWS formats
/// `{"Arg1": 1, "Arg2": []}` as `{Arg1=1, Arg2=[]}` (LocalStack's recording `test_format_2`).
fn java_to_string(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => out.push_str(s),
        Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                java_to_string(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(k);
                out.push('=');
                java_to_string(x, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn hash(algo: &str, data: &[u8]) -> Option<String> {
    Some(match algo {
        "MD5" => {
            use md5::Digest;
            hex::encode(md5::Md5::digest(data))
        }
        "SHA-1" => {
            use sha1::Digest;
            hex::encode(sha1::Sha1::digest(data))
        }
        "SHA-256" => {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(data))
        }
        "SHA-384" => {
            use sha2::Digest;
            hex::encode(sha2::Sha384::digest(data))
        }
        "SHA-512" => {
            use sha2::Digest;
            hex::encode(sha2::Sha512::digest(data))
        }
        _ => return None,
    })
}

/// Whether a JSON number is an integer (used by callers that need one).
pub fn is_integer(n: &Number) -> bool {
    n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(src: &str, input: Value) -> Result<Value, StatesError> {
        let ctx = json!({});
        evaluate(src, &Scope { input: &input, context: &ctx, vars: None })
    }

    #[test]
    fn functions() {
        let i = json!({"n": 3, "s": "a,b,,c", "arr": [1, 2, 2, 3], "o": {"a": 1}, "p": {"b": 2}});
        assert_eq!(ev("States.Format('x={} y={}', $.n, 'q')", i.clone()).unwrap(), json!("x=3 y=q"));
        assert_eq!(ev("States.Format('\\{\\} {}', true)", i.clone()).unwrap(), json!("{} true"));
        assert_eq!(ev("States.StringToJson('{\"a\":1}')", i.clone()).unwrap(), json!({"a": 1}));
        assert_eq!(ev("States.JsonToString($.o)", i.clone()).unwrap(), json!("{\"a\":1}"));
        assert_eq!(ev("States.Array(1, 'a', $.n, null)", i.clone()).unwrap(), json!([1, "a", 3, null]));
        assert_eq!(ev("States.ArrayPartition($.arr, 3)", i.clone()).unwrap(), json!([[1, 2, 2], [3]]));
        assert_eq!(ev("States.ArrayContains($.arr, 3)", i.clone()).unwrap(), json!(true));
        assert_eq!(ev("States.ArrayRange(1, 9, 2)", i.clone()).unwrap(), json!([1, 3, 5, 7, 9]));
        assert_eq!(ev("States.ArrayGetItem($.arr, 3)", i.clone()).unwrap(), json!(3));
        assert_eq!(ev("States.ArrayLength($.arr)", i.clone()).unwrap(), json!(4));
        assert_eq!(ev("States.ArrayUnique($.arr)", i.clone()).unwrap(), json!([1, 2, 3]));
        assert_eq!(ev("States.Base64Encode('Data to encode')", i.clone()).unwrap(), json!("RGF0YSB0byBlbmNvZGU="));
        assert_eq!(ev("States.Base64Decode('RGF0YSB0byBlbmNvZGU=')", i.clone()).unwrap(), json!("Data to encode"));
        assert_eq!(
            ev("States.Hash('input data', 'SHA-1')", i.clone()).unwrap(),
            json!("aaff4a450a104cd177d28d18d74485e8cae074b7")
        );
        assert_eq!(ev("States.JsonMerge($.o, $.p, false)", i.clone()).unwrap(), json!({"a": 1, "b": 2}));
        let r = ev("States.MathRandom(1, 10)", i.clone()).unwrap().as_i64().unwrap();
        assert!((1..10).contains(&r));
        assert_eq!(ev("States.MathAdd($.n, -1)", i.clone()).unwrap(), json!(2));
        assert_eq!(ev("States.StringSplit($.s, ',')", i.clone()).unwrap(), json!(["a", "b", "c"]));
        assert_eq!(ev("States.UUID()", i.clone()).unwrap().as_str().unwrap().len(), 36);
        assert_eq!(ev("States.ArrayLength(States.Array(1, 2))", i).unwrap(), json!(2));
    }

    #[test]
    fn numbers_objects_and_empty_strings_as_aws() {
        let i = json!({"o": {"Arg1": 1, "Arg2": [true, "s", null]}, "e": "", "b": " ", "z": "-0"});
        // Math.round: half up, also for negatives.
        assert_eq!(ev("States.MathAdd(1.49, 1.5)", i.clone()).unwrap(), json!(3));
        assert_eq!(ev("States.MathAdd(-1.5, -1.51)", i.clone()).unwrap(), json!(-3));
        assert_eq!(ev("States.MathAdd(-0.5, 0.5)", i.clone()).unwrap(), json!(1));
        assert_eq!(ev("States.ArrayRange(1.4, 5.6, 2.0)", i.clone()).unwrap(), json!([1, 3, 5]));
        assert_eq!(ev("States.ArrayGetItem(States.Array('a', 'b', 'c'), 1.6)", i.clone()).unwrap(), json!("c"));
        let r = ev("States.MathRandom(12.5, 44.51)", i.clone()).unwrap().as_i64().unwrap();
        assert!((13..45).contains(&r), "{r}");
        assert_eq!(ev("States.Format('{}', $.o)", i.clone()).unwrap(), json!("{Arg1=1, Arg2=[true, s, null]}"));
        assert_eq!(ev("States.Format('[{}]', $.e)", i.clone()).unwrap(), json!("[]"));
        assert_eq!(ev("States.StringToJson($.e)", i.clone()).unwrap(), Value::Null);
        assert_eq!(ev("States.StringToJson($.b)", i.clone()).unwrap(), Value::Null);
        assert_eq!(ev("States.StringToJson($.z)", i.clone()).unwrap().to_string(), "0");
        assert_eq!(ev("States.Base64Encode($.e)", i.clone()).unwrap(), json!(""));
        assert_eq!(ev("States.StringSplit($.e, ',')", i).unwrap(), json!([]));
    }

    #[test]
    fn only_reserved_characters_escape_in_intrinsic_strings() {
        assert_eq!(ev(r"States.Format('it\'s \\ \{\}')", json!({})).unwrap(), json!(r"it's \ {}"));
        assert_eq!(ev(r"States.StringSplit('a\\b\{c', '\\')", json!({})).unwrap(), json!(["a", "b{c"]));
        let e = parse(r#"States.Format('say \"hi\"')"#).unwrap_err();
        assert!(e.contains("is not an escape"), "{e}");
        assert!(parse("States.Format('{}', $.detail-type)").is_err());
        assert!(parse("States.Format('{}', $['detail-type'], $.a_b.c1)").is_ok());
        assert!(parse(r"States.Format('{}', $['it\'s, (x)'])").is_ok());
    }

    #[test]
    fn wrong_argument_types_name_function_and_argument() {
        let e = ev("States.MathAdd('a', 1)", json!({})).unwrap_err();
        assert_eq!(e.error, "States.Runtime");
        assert!(e.cause.contains("States.MathAdd") && e.cause.contains("argument 1"), "{}", e.cause);
        let e = ev("States.ArrayLength($.x)", json!({"x": 5})).unwrap_err();
        assert!(e.cause.contains("States.ArrayLength") && e.cause.contains("array"), "{}", e.cause);
        assert!(parse("States.Nope(1)").is_err());
        assert!(parse("States.Format('a'").is_err());
    }
}
