//! `$spread`, `$sift`, `$type` (Ember change: missing upstream), as jsonata-js 2.x has them.

use super::*;

/// The argument, or the context value when the function is called without one.
fn arg_or_context<'a>(context: &FunctionContext<'a, '_>, args: &[&'a Value<'a>]) -> &'a Value<'a> {
    match args.first() {
        Some(arg) => arg,
        None if context.input.is_array() && context.input.has_flags(ArrayFlags::WRAPPED) => {
            &context.input[0]
        }
        None => context.input,
    }
}

/// `$spread(object)`: an array of one-entry objects, one per key, in key order; arrays are
/// spread member by member; other values are returned as they are.
pub fn fn_spread<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    max_args!(context, args, 1);
    Ok(spread(&context, arg_or_context(&context, args)))
}

fn spread<'a>(context: &FunctionContext<'a, '_>, arg: &'a Value<'a>) -> &'a Value<'a> {
    if arg.is_array() {
        let mut out = BumpVec::new_in(context.arena);
        for member in arg.members() {
            fn_append_internal(&mut out, spread(context, member));
        }
        Value::array_from(context.arena, out, ArrayFlags::SEQUENCE)
    } else if arg.is_object() {
        let result = Value::array(context.arena, ArrayFlags::SEQUENCE);
        for (key, value) in arg.entries() {
            let single = Value::object_with_capacity(context.arena, 1);
            single.insert(key, value);
            result.push(single);
        }
        result
    } else {
        arg
    }
}

/// `$sift(object, function($v, $k, $o))`: the entries for which the function is truthy, in
/// key order; undefined when none is.
pub fn fn_sift<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    max_args!(context, args, 2);
    let (obj, func) = match args {
        [func] => (arg_or_context(&context, &[]), *func),
        [obj, func] => (*obj, *func),
        _ => bad_arg!(context, 1),
    };
    if obj.is_undefined() {
        return Ok(Value::undefined());
    }
    assert_arg!(obj.is_object(), context, 1);
    assert_arg!(func.is_function(), context, 2);

    let result = Value::object(context.arena);
    let arity = func.arity();
    for (key, value) in obj.entries() {
        let mut call_args = vec![*value];
        if arity >= 2 {
            call_args.push(Value::string(context.arena, key));
        }
        if arity >= 3 {
            call_args.push(obj);
        }
        let keep =
            context.trampoline_evaluate_value(context.evaluate_function(func, &call_args)?)?;
        if !keep.is_undefined() && fn_boolean(context.clone(), &[keep])?.as_bool() {
            result.insert(key, value);
        }
    }
    match result {
        Value::Object(map) if map.is_empty() => Ok(Value::undefined()),
        _ => Ok(result),
    }
}

/// `$type(value)`: the JSON type's name ("null", "number", "string", "boolean", "array",
/// "object") or "function"; undefined for undefined.
pub fn fn_type<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    max_args!(context, args, 1);
    let arg = args.first().copied().unwrap_or_else(Value::undefined);
    let name = match arg {
        Value::Undefined => return Ok(Value::undefined()),
        Value::Null => "null",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Bool(_) => "boolean",
        Value::Array(..) | Value::Range(_) => "array",
        Value::Lambda { .. } | Value::NativeFn { .. } | Value::Transformer { .. } => "function",
        Value::Object(_) | Value::Regex(_) => "object",
    };
    Ok(Value::string(context.arena, name))
}

/// `$clone(value)`: a deep copy, as jsonata-js's `JSON.parse(JSON.stringify(value))`:
/// functions inside objects are dropped, inside arrays become null.
pub fn fn_clone<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    max_args!(context, args, 1);
    let arg = args.first().copied().unwrap_or_else(Value::undefined);
    if arg.is_undefined() {
        return Ok(Value::undefined());
    }
    if arg.is_function() {
        // JSON.parse of $string(function), which is "".
        return Err(Error::D3137Error(
            "$clone: a function cannot be cloned as JSON".to_string(),
        ));
    }
    Ok(deep_copy(context.arena, arg))
}

fn deep_copy<'a>(arena: &'a Bump, v: &'a Value<'a>) -> &'a Value<'a> {
    match v {
        Value::Array(..) | Value::Range(_) => {
            let out = Value::array_with_capacity(arena, v.len(), ArrayFlags::empty());
            for member in v.members() {
                if member.is_function() || member.is_undefined() {
                    out.push(Value::null(arena));
                } else {
                    out.push(deep_copy(arena, member));
                }
            }
            out
        }
        Value::Object(map) => {
            let out = Value::object_with_capacity(arena, map.len());
            for (key, value) in map.iter() {
                if !value.is_function() && !value.is_undefined() {
                    out.insert(key, deep_copy(arena, value));
                }
            }
            out
        }
        Value::Number(n) if !n.is_finite() => Value::null(arena),
        Value::Regex(_) => Value::object(arena),
        _ => v.clone(arena),
    }
}
