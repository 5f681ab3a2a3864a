//! `$eval(expression, context)` (Ember change: missing upstream): parses and evaluates a
//! JSONata expression given as a string, in the calling expression's environment, with the
//! same depth and time limits, as jsonata-js does.

use super::*;

pub fn fn_eval<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    max_args!(context, args, 2);
    let expr = args.first().copied().unwrap_or_else(Value::undefined);
    if expr.is_undefined() {
        return Ok(Value::undefined());
    }
    assert_arg!(expr.is_string(), context, 1);
    let input = match args.get(1).copied() {
        Some(focus) if !focus.is_undefined() => {
            if focus.is_array() && !focus.has_flags(ArrayFlags::SEQUENCE) {
                Value::wrap_in_array(context.arena, focus, ArrayFlags::WRAPPED)
            } else {
                focus
            }
        }
        _ => context.input,
    };
    let ast = crate::parser::parse(&expr.as_str())
        .map_err(|e| Error::D3120EvalSyntax(context.char_index, e.to_string()))?;
    context
        .evaluator
        .evaluate(&ast, input, &context.frame)
        .map_err(|e| match e {
            // Limits stay the limits of the whole evaluation.
            Error::U1001StackOverflow | Error::U1001Timeout => e,
            _ => Error::D3121EvalDynamic(context.char_index, e.to_string()),
        })
}
