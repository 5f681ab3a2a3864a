//! Ember change: the context value as an implicit first argument, as jsonata-js's function
//! signatures mark with `-` (`<s-:s>`): `Product.Name.$uppercase()`, `items.$string()`,
//! `$substring(0, 3)` inside a path. Upstream only did this inside a few functions.

use super::value::{ArrayFlags, Value};
use crate::{Error, Result};

/// (function, each parameter's types, required parameters), from jsonata-js 2.x's
/// signatures: `s` string, `n` number, `b` boolean, `o` object, `a` array, `f` function,
/// `r` regular expression, `x` anything.
const CONTEXT_FIRST: &[(&str, &[&str], usize)] = &[
    ("string", &["x", "b"], 1),
    ("substring", &["s", "n", "n"], 2),
    ("substringBefore", &["s", "s"], 2),
    ("substringAfter", &["s", "s"], 2),
    ("lowercase", &["s"], 1),
    ("uppercase", &["s"], 1),
    ("length", &["s"], 1),
    ("trim", &["s"], 1),
    ("pad", &["s", "n", "s"], 2),
    ("match", &["s", "rf", "n"], 2),
    ("contains", &["s", "sr"], 2),
    ("replace", &["s", "sr", "sf", "n"], 3),
    ("split", &["s", "sr", "n"], 2),
    ("formatNumber", &["n", "s", "o"], 2),
    ("formatBase", &["n", "n"], 1),
    ("formatInteger", &["n", "s"], 2),
    ("parseInteger", &["s", "s"], 2),
    ("number", &["nsb"], 1),
    ("floor", &["n"], 1),
    ("ceil", &["n"], 1),
    ("round", &["n", "n"], 1),
    ("abs", &["n"], 1),
    ("sqrt", &["n"], 1),
    ("power", &["n", "n"], 2),
    ("boolean", &["x"], 1),
    ("not", &["x"], 1),
    ("sift", &["o", "f"], 1),
    ("keys", &["x"], 1),
    ("lookup", &["x", "s"], 2),
    ("spread", &["x"], 1),
    ("each", &["o", "f"], 2),
    ("base64encode", &["s"], 1),
    ("base64decode", &["s"], 1),
    ("encodeUrlComponent", &["s"], 1),
    ("encodeUrl", &["s"], 1),
    ("decodeUrlComponent", &["s"], 1),
    ("decodeUrl", &["s"], 1),
    ("toMillis", &["s", "s"], 1),
    ("fromMillis", &["n", "s", "s"], 1),
    ("clone", &["oa"], 1),
];

/// Whether `args` fit `params` (an undefined argument fits any parameter, as a missing one).
fn fits(params: &[&str], required: usize, args: &[&Value]) -> bool {
    args.len() >= required
        && args.len() <= params.len()
        && args
            .iter()
            .zip(params)
            .all(|(a, p)| a.is_undefined() || has_type(p, a))
}

fn has_type(types: &str, v: &Value) -> bool {
    types.chars().any(|t| match t {
        'x' => true,
        's' => v.is_string(),
        'n' => v.is_number(),
        'b' => v.is_bool(),
        'o' => v.is_object(),
        'a' => v.is_array(),
        'f' => v.is_function(),
        'r' => matches!(v, Value::Regex(_)),
        _ => false,
    })
}

/// The arguments with the context value put first, when the built-in function `name` takes
/// its first argument from the context and the call left it out: the arguments do not fit
/// the parameters but fit those after the first (jsonata-js's signature matching). A context
/// of another type than the first parameter's is jsonata-js's error `T0411`.
pub fn with_context<'a>(
    name: &str,
    char_index: usize,
    args: &[&'a Value<'a>],
    input: &'a Value<'a>,
) -> Result<Option<Vec<&'a Value<'a>>>> {
    let Some(&(_, params, required)) = CONTEXT_FIRST.iter().find(|f| f.0 == name) else {
        return Ok(None);
    };
    if fits(params, required, args) || !fits(&params[1..], required.saturating_sub(1), args) {
        return Ok(None);
    }
    let context = if input.is_array() && input.has_flags(ArrayFlags::WRAPPED) {
        input.get_member(0)
    } else {
        input
    };
    if !context.is_undefined() && !has_type(params[0], context) {
        return Err(Error::T0411ContextNotCompatible(
            char_index,
            1,
            name.to_string(),
        ));
    }
    let mut out = Vec::with_capacity(args.len() + 1);
    out.push(context);
    out.extend_from_slice(args);
    Ok(Some(out))
}
