//! `$average`, `$shuffle` (Ember change: missing upstream), as jsonata-js 2.x has them.

use super::*;

/// `$average(numbers)`: their mean; undefined for undefined or an empty array.
pub fn fn_average<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    max_args!(context, args, 1);
    let arg = args.first().copied().unwrap_or_else(Value::undefined);
    if arg.is_undefined() || (arg.is_array() && arg.is_empty()) {
        return Ok(Value::undefined());
    }
    let arr = Value::wrap_in_array_if_needed(context.arena, arg, ArrayFlags::empty());
    let mut sum = 0.0;
    for member in arr.members() {
        assert_array_of_type!(member.is_number(), context, 1, "number");
        sum += member.as_f64();
    }
    Ok(Value::number(context.arena, sum / arr.len() as f64))
}

/// `$shuffle(array)`: its members in a random order (the "inside-out" Fisher-Yates shuffle
/// jsonata-js uses).
pub fn fn_shuffle<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    max_args!(context, args, 1);
    let arg = args.first().copied().unwrap_or_else(Value::undefined);
    if arg.is_undefined() {
        return Ok(Value::undefined());
    }
    let arr = Value::wrap_in_array_if_needed(context.arena, arg, ArrayFlags::empty());
    if arr.len() <= 1 {
        return Ok(arr);
    }
    let mut out: Vec<&'a Value<'a>> = Vec::with_capacity(arr.len());
    let mut rng = rand::thread_rng();
    for (i, member) in arr.members().enumerate() {
        let j = rng.gen_range(0..=i);
        if j == i {
            out.push(member);
        } else {
            out.push(out[j]);
            out[j] = member;
        }
    }
    Ok(Value::array_from(
        context.arena,
        BumpVec::from_iter_in(out, context.arena),
        ArrayFlags::empty(),
    ))
}
