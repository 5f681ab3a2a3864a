//! `$formatBase`, `$formatInteger`, `$parseInteger` (Ember change: missing upstream), as
//! jsonata-js 2.x has them. `$formatInteger` and `$parseInteger` take decimal-digit pictures
//! (`0`, `000`, `#,##0`, with an optional `;o` ordinal modifier); the word, roman and letter
//! pictures are reported as unsupported.

use super::*;

/// The zero of each Unicode decimal digit family jsonata-js accepts in a picture.
const DECIMAL_GROUPS: [u32; 37] = [
    0x30, 0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6,
    0x0D66, 0x0DE6, 0x0E50, 0x0ED0, 0x0F20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80,
    0x1A90, 0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0,
    0xFF10,
];

/// `$formatBase(number, radix)`: the rounded number in base `radix` (2 to 36, default 10).
pub fn fn_format_base<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    max_args!(context, args, 2);
    let value = args.first().copied().unwrap_or_else(Value::undefined);
    if value.is_undefined() {
        return Ok(Value::undefined());
    }
    assert_arg!(value.is_number(), context, 1);
    let radix = match args.get(1) {
        None => 10.0,
        Some(r) if r.is_undefined() => 10.0,
        Some(r) if r.is_number() => r.as_f64().round_ties_even(),
        Some(_) => bad_arg!(context, 2),
    };
    if !(2.0..=36.0).contains(&radix) {
        return Err(Error::D3100RadixOutOfRange(
            context.char_index,
            radix.to_string(),
        ));
    }
    let n = value.as_f64().round_ties_even();
    let mut magnitude = n.abs() as u128;
    let radix = radix as u128;
    let mut digits = Vec::new();
    loop {
        let d = (magnitude % radix) as u32;
        digits.push(char::from_digit(d, radix as u32).unwrap_or('?'));
        magnitude /= radix;
        if magnitude == 0 {
            break;
        }
    }
    if n < 0.0 {
        digits.push('-');
    }
    let out: String = digits.into_iter().rev().collect();
    Ok(Value::string(context.arena, &out))
}

/// A decimal-digit picture, analysed as jsonata-js's `analyseIntegerPicture` does.
struct DecimalPicture {
    zero: u32,
    mandatory_digits: usize,
    ordinal: bool,
    /// (position counted from the right, character)
    separators: Vec<(usize, char)>,
    /// Every separator is the same character at a regular interval: that interval.
    regular: usize,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn analyse(context: &FunctionContext<'_, '_>, picture: &str) -> Result<DecimalPicture> {
    let (primary, ordinal) = match picture.rfind(';') {
        Some(i) => (&picture[..i], picture[i + 1..].starts_with('o')),
        None => (picture, false),
    };
    if matches!(primary, "A" | "a" | "I" | "i" | "W" | "Ww" | "w") {
        return Err(Error::S0299UnsupportedFeature(
            context.char_index,
            format!("The ${} picture '{}'", context.name, primary),
        ));
    }
    let mut zero = None;
    let (mut mandatory_digits, mut position) = (0, 0);
    let mut separators = Vec::new();
    for c in primary.chars().rev() {
        let code = c as u32;
        if let Some(group) = DECIMAL_GROUPS
            .iter()
            .find(|g| (**g..=**g + 9).contains(&code))
        {
            mandatory_digits += 1;
            position += 1;
            match zero {
                None => zero = Some(*group),
                Some(z) if z != *group => return Err(Error::PictureError(
                    context.char_index,
                    "D3131",
                    "In a decimal digit pattern, all digits must be from the same decimal group",
                )),
                Some(_) => {}
            }
        } else if c == '#' {
            position += 1;
        } else {
            separators.push((position, c));
        }
    }
    let Some(zero) = zero else {
        return Err(Error::D3130UnsupportedIntegerPicture(
            context.char_index,
            primary.to_string(),
        ));
    };
    let regular = match separators.first() {
        Some(&(_, c)) if separators.iter().all(|s| s.1 == c) => {
            let positions: Vec<usize> = separators.iter().map(|s| s.0).collect();
            let factor = positions.iter().copied().reduce(gcd).unwrap_or(0);
            if factor > 0 && (1..=positions.len()).all(|i| positions.contains(&(i * factor))) {
                factor
            } else {
                0
            }
        }
        _ => 0,
    };
    Ok(DecimalPicture {
        zero,
        mandatory_digits,
        ordinal,
        separators,
        regular,
    })
}

/// `$formatInteger(number, picture)`: the number (rounded down) written with the picture's
/// digits, minimum width and grouping separators.
pub fn fn_format_integer<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    max_args!(context, args, 2);
    let value = args.first().copied().unwrap_or_else(Value::undefined);
    if value.is_undefined() {
        return Ok(Value::undefined());
    }
    assert_arg!(value.is_number(), context, 1);
    let picture = args.get(1).copied().unwrap_or_else(Value::undefined);
    assert_arg!(picture.is_string(), context, 2);
    let format = analyse(&context, &picture.as_str())?;

    let n = value.as_f64().floor();
    let mut digits: Vec<char> = format!("{}", n.abs()).chars().collect();
    while digits.len() < format.mandatory_digits {
        digits.insert(0, '0');
    }
    if format.zero != 0x30 {
        for d in digits.iter_mut() {
            *d = char::from_u32(*d as u32 - 0x30 + format.zero).unwrap_or(*d);
        }
    }
    if format.regular > 0 {
        let sep = format.separators[0].1;
        let groups = (digits.len() - 1) / format.regular;
        for i in (1..=groups).rev() {
            let at = digits.len() - i * format.regular;
            digits.insert(at, sep);
        }
    } else {
        // Leftmost first, so each position still counts from the right end.
        for &(position, sep) in format.separators.iter().rev() {
            let at = digits.len().saturating_sub(position);
            digits.insert(at, sep);
        }
    }
    let mut out: String = digits.into_iter().collect();
    if format.ordinal {
        let tail: Vec<char> = out.chars().rev().take(2).collect();
        let suffix = match (tail.first(), tail.get(1)) {
            (_, Some('1')) => "th",
            (Some('1'), _) => "st",
            (Some('2'), _) => "nd",
            (Some('3'), _) => "rd",
            _ => "th",
        };
        out.push_str(suffix);
    }
    if n < 0.0 {
        out.insert(0, '-');
    }
    Ok(Value::string(context.arena, &out))
}

/// `$parseInteger(string, picture)`: the integer a decimal-digit picture wrote.
pub fn fn_parse_integer<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    max_args!(context, args, 2);
    let value = args.first().copied().unwrap_or_else(Value::undefined);
    if value.is_undefined() {
        return Ok(Value::undefined());
    }
    assert_arg!(value.is_string(), context, 1);
    let picture = args.get(1).copied().unwrap_or_else(Value::undefined);
    assert_arg!(picture.is_string(), context, 2);
    let format = analyse(&context, &picture.as_str())?;

    let mut text = value.as_str().to_string();
    if format.ordinal {
        let keep = text.chars().count().saturating_sub(2);
        text = text.chars().take(keep).collect();
    }
    // As jsonata-js: a regular picture's separators are taken to be commas.
    if format.regular > 0 {
        text = text.replace(',', "");
    } else {
        for &(_, sep) in &format.separators {
            text = text.replace(sep, "");
        }
    }
    let digits: String = text
        .chars()
        .map(|c| {
            if format.zero != 0x30 && (format.zero..=format.zero + 9).contains(&(c as u32)) {
                char::from_u32(c as u32 - format.zero + 0x30).unwrap_or(c)
            } else {
                c
            }
        })
        .collect();
    // JavaScript's parseInt: an optional sign and the leading digits.
    let trimmed = digits.trim_start();
    let (sign, rest) = match trimmed.strip_prefix('-') {
        Some(r) => (-1.0, r),
        None => (1.0, trimmed.strip_prefix('+').unwrap_or(trimmed)),
    };
    let leading: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    match leading.parse::<f64>() {
        Ok(n) => Ok(Value::number(context.arena, sign * n)),
        Err(_) => Ok(Value::undefined()),
    }
}
