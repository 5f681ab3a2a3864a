//! `$formatNumber(number, picture, options)` (Ember change: missing upstream): XPath F&O 3.1
//! `format-number`, ported from jsonata-js 2.x step by step (including its quirks, so that
//! results match the reference): sub-pictures for positive and negative numbers, mandatory
//! (`0`) and optional (`#`) digits, grouping, percent and per-mille, exponents, and the
//! `options` object overriding the decimal format's characters.

use super::*;

/// The decimal format's properties (F&O 4.7.1); jsonata-js's defaults.
struct Properties {
    decimal: char,
    grouping: char,
    exponent: char,
    minus: String,
    percent: char,
    per_mille: char,
    zero: char,
    digit: char,
    pattern: char,
}

impl Properties {
    fn new(options: &Value) -> Self {
        let mut p = Properties {
            decimal: '.',
            grouping: ',',
            exponent: 'e',
            minus: "-".to_string(),
            percent: '%',
            per_mille: '\u{2030}',
            zero: '0',
            digit: '#',
            pattern: ';',
        };
        if let Value::Object(map) = options {
            for (key, value) in map.iter() {
                let Value::String(s) = value else { continue };
                let Some(c) = s.chars().next() else { continue };
                match key.as_str() {
                    "decimal-separator" => p.decimal = c,
                    "grouping-separator" => p.grouping = c,
                    "exponent-separator" => p.exponent = c,
                    "minus-sign" => p.minus = s.to_string(),
                    "percent" => p.percent = c,
                    "per-mille" => p.per_mille = c,
                    "zero-digit" => p.zero = c,
                    "digit" => p.digit = c,
                    "pattern-separator" => p.pattern = c,
                    _ => {}
                }
            }
        }
        p
    }

    fn is_family(&self, c: char) -> bool {
        (self.zero as u32..self.zero as u32 + 10).contains(&(c as u32))
    }

    fn is_active(&self, c: char) -> bool {
        self.is_family(c)
            || [
                self.decimal,
                self.exponent,
                self.grouping,
                self.digit,
                self.pattern,
            ]
            .contains(&c)
    }
}

fn index_of(s: &[char], c: char, from: usize) -> Option<usize> {
    s.iter().skip(from).position(|&x| x == c).map(|i| i + from)
}

fn last_index_of(s: &[char], c: char) -> Option<usize> {
    s.iter().rposition(|&x| x == c)
}

fn substring(s: &[char], start: usize, end: usize) -> Vec<char> {
    let end = end.min(s.len());
    let start = start.min(end);
    s[start..end].to_vec()
}

struct Parts {
    prefix: Vec<char>,
    suffix: Vec<char>,
    active: Vec<char>,
    mantissa: Vec<char>,
    exponent: Option<Vec<char>>,
    integer: Vec<char>,
    fractional: Vec<char>,
    picture: Vec<char>,
}

fn split_parts(p: &Properties, sub: &[char]) -> Parts {
    let is_boundary = |c: char| p.is_active(c) && c != p.exponent;
    let prefix = match sub.iter().position(|&c| is_boundary(c)) {
        Some(i) => sub[..i].to_vec(),
        None => Vec::new(),
    };
    let suffix = match sub.iter().rposition(|&c| is_boundary(c)) {
        Some(i) => sub[i + 1..].to_vec(),
        None => Vec::new(),
    };
    let active = substring(sub, prefix.len(), sub.len() - suffix.len());
    let (mantissa, exponent) = match index_of(sub, p.exponent, prefix.len()) {
        Some(e) if e <= sub.len() - suffix.len() => (
            substring(&active, 0, e),
            Some(substring(&active, e + 1, active.len())),
        ),
        _ => (active.clone(), None),
    };
    let (integer, fractional) = match index_of(&mantissa, p.decimal, 0) {
        None => (mantissa.clone(), suffix.clone()),
        Some(d) => (
            substring(&mantissa, 0, d),
            substring(&mantissa, d + 1, mantissa.len()),
        ),
    };
    Parts {
        prefix,
        suffix,
        active,
        mantissa,
        exponent,
        integer,
        fractional,
        picture: sub.to_vec(),
    }
}

/// F&O 4.7.3: the first problem found is reported as jsonata-js does (its last check wins).
fn validate(p: &Properties, parts: &Parts) -> Option<(&'static str, &'static str)> {
    let sub = &parts.picture;
    let mut error = None;
    let decimal_pos = index_of(sub, p.decimal, 0);
    if decimal_pos != last_index_of(sub, p.decimal) {
        error = Some(("D3081", "The sub-picture must not contain more than one instance of the 'decimal-separator' character"));
    }
    if index_of(sub, p.percent, 0) != last_index_of(sub, p.percent) {
        error = Some((
            "D3082",
            "The sub-picture must not contain more than one instance of the 'percent' character",
        ));
    }
    if index_of(sub, p.per_mille, 0) != last_index_of(sub, p.per_mille) {
        error = Some((
            "D3083",
            "The sub-picture must not contain more than one instance of the 'per-mille' character",
        ));
    }
    if sub.contains(&p.percent) && sub.contains(&p.per_mille) {
        error = Some((
            "D3084",
            "The sub-picture must not contain both a 'percent' and a 'per-mille' character",
        ));
    }
    if !parts
        .mantissa
        .iter()
        .any(|&c| p.is_family(c) || c == p.digit)
    {
        error = Some(("D3085", "The mantissa part of a sub-picture must contain at least one character that is either an 'optional digit character' or a member of the 'decimal digit family'"));
    }
    if parts.active.iter().any(|&c| !p.is_active(c)) {
        error = Some(("D3086", "The sub-picture must not contain a passive character that is preceded by an active character and that is followed by another active character"));
    }
    match decimal_pos {
        Some(d) => {
            let before = d.checked_sub(1).and_then(|i| sub.get(i));
            if before == Some(&p.grouping) || sub.get(d + 1) == Some(&p.grouping) {
                error = Some(("D3087", "The sub-picture must not contain a 'grouping-separator' character that appears adjacent to a 'decimal-separator' character"));
            }
        }
        None => {
            if parts.integer.last() == Some(&p.grouping) {
                error = Some(("D3088", "The sub-picture must not contain a 'grouping-separator' at the end of the integer part"));
            }
        }
    }
    if sub
        .windows(2)
        .any(|w| w[0] == p.grouping && w[1] == p.grouping)
    {
        error = Some(("D3089", "The sub-picture must not contain two adjacent instances of the 'grouping-separator' character"));
    }
    if let Some(o) = index_of(&parts.integer, p.digit, 0) {
        if parts.integer[..o].iter().any(|&c| p.is_family(c)) {
            error = Some(("D3090", "The integer part of the sub-picture must not contain a member of the 'decimal digit family' that is followed by an instance of the 'optional digit character'"));
        }
    }
    if let Some(o) = last_index_of(&parts.fractional, p.digit) {
        if parts.fractional[o..].iter().any(|&c| p.is_family(c)) {
            error = Some(("D3091", "The fractional part of the sub-picture must not contain an instance of the 'optional digit character' that is followed by a member of the 'decimal digit family'"));
        }
    }
    if let Some(exp) = &parts.exponent {
        if !exp.is_empty() && (sub.contains(&p.percent) || sub.contains(&p.per_mille)) {
            error = Some(("D3092", "A sub-picture that contains a 'percent' or 'per-mille' character must not contain a character treated as an 'exponent-separator'"));
        }
        if exp.is_empty() || exp.iter().any(|&c| !p.is_family(c)) {
            error = Some(("D3093", "The exponent part of the sub-picture must comprise only of one or more characters that are members of the 'decimal digit family'"));
        }
    }
    error
}

#[derive(Clone)]
struct Analysed {
    integer_grouping: Vec<usize>,
    regular_grouping: usize,
    min_integer: usize,
    scaling_factor: usize,
    prefix: String,
    fractional_grouping: Vec<usize>,
    min_fractional: usize,
    max_fractional: usize,
    min_exponent: usize,
    suffix: String,
    picture: Vec<char>,
}

/// F&O 4.7.4.
fn analyse(p: &Properties, parts: &Parts) -> Analysed {
    let is_digit = |c: char| p.is_family(c) || c == p.digit;
    let grouping_positions = |part: &[char], to_left: bool| -> Vec<usize> {
        let mut positions = Vec::new();
        let mut at = index_of(part, p.grouping, 0);
        while let Some(g) = at {
            let g = g.min(part.len());
            let side = if to_left { &part[..g] } else { &part[g..] };
            positions.push(side.iter().filter(|&&c| is_digit(c)).count());
            // jsonata-js searches the integer part for the next one, whichever part this is.
            at = index_of(&parts.integer, p.grouping, g + 1);
        }
        positions
    };
    let integer_grouping = grouping_positions(&parts.integer, false);
    let regular_grouping = match integer_grouping.iter().copied().reduce(gcd) {
        Some(f) if (1..=integer_grouping.len()).all(|i| integer_grouping.contains(&(i * f))) => f,
        _ => 0,
    };
    let fractional_grouping = grouping_positions(&parts.fractional, true);

    let mut min_integer = parts.integer.iter().filter(|&&c| p.is_family(c)).count();
    let scaling_factor = min_integer;
    let mut min_fractional = parts.fractional.iter().filter(|&&c| p.is_family(c)).count();
    let mut max_fractional = parts.fractional.iter().filter(|&&c| is_digit(c)).count();
    let exponent_present = parts.exponent.is_some();
    if min_integer == 0 && max_fractional == 0 {
        if exponent_present {
            min_fractional = 1;
            max_fractional = 1;
        } else {
            min_integer = 1;
        }
    }
    if exponent_present && min_integer == 0 && parts.integer.contains(&p.digit) {
        min_integer = 1;
    }
    if min_integer == 0 && min_fractional == 0 {
        min_fractional = 1;
    }
    let min_exponent = parts
        .exponent
        .as_ref()
        .map_or(0, |e| e.iter().filter(|&&c| p.is_family(c)).count());
    Analysed {
        integer_grouping,
        regular_grouping,
        min_integer,
        scaling_factor,
        prefix: parts.prefix.iter().collect(),
        fractional_grouping,
        min_fractional,
        max_fractional,
        min_exponent,
        suffix: parts.suffix.iter().collect(),
        picture: parts.picture.clone(),
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// JSONata's `$round(value, precision)`: half to even, shifting the decimal point in text.
fn round(value: f64, precision: usize) -> Result<f64> {
    let shifted = multiply_by_pow10(value, precision as isize)?;
    let rounded = shifted.round_ties_even();
    let back = multiply_by_pow10(rounded, -(precision as isize))?;
    Ok(if back == 0.0 { 0.0 } else { back })
}

pub fn fn_format_number<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    max_args!(context, args, 3);
    let value = args.first().copied().unwrap_or_else(Value::undefined);
    if value.is_undefined() {
        return Ok(Value::undefined());
    }
    assert_arg!(value.is_number(), context, 1);
    let picture = args.get(1).copied().unwrap_or_else(Value::undefined);
    assert_arg!(picture.is_string(), context, 2);
    let options = args.get(2).copied().unwrap_or_else(Value::undefined);
    assert_arg!(options.is_undefined() || options.is_object(), context, 3);

    let p = Properties::new(options);
    let picture: Vec<char> = picture.as_str().chars().collect();
    let sub_pictures: Vec<&[char]> = picture.split(|&c| c == p.pattern).collect();
    if sub_pictures.len() > 2 {
        return Err(Error::PictureError(
            context.char_index,
            "D3080",
            "The picture string must only contain a maximum of two sub-pictures",
        ));
    }
    let parts: Vec<Parts> = sub_pictures.iter().map(|s| split_parts(&p, s)).collect();
    for part in &parts {
        if let Some((code, message)) = validate(&p, part) {
            return Err(Error::PictureError(context.char_index, code, message));
        }
    }
    let mut variables: Vec<Analysed> = parts.iter().map(|part| analyse(&p, part)).collect();
    if variables.len() == 1 {
        let mut negative = variables[0].clone();
        negative.prefix = format!("{}{}", p.minus, negative.prefix);
        variables.push(negative);
    }

    let value = value.as_f64();
    let pic = if value >= 0.0 {
        &variables[0]
    } else {
        &variables[1]
    };
    let adjusted = if pic.picture.contains(&p.percent) {
        value * 100.0
    } else if pic.picture.contains(&p.per_mille) {
        value * 1000.0
    } else {
        value
    };
    let (mantissa, exponent) = if pic.min_exponent == 0 {
        (adjusted, None)
    } else {
        let max_mantissa = 10f64.powi(pic.scaling_factor as i32);
        let min_mantissa = 10f64.powi(pic.scaling_factor as i32 - 1);
        let (mut m, mut e) = (adjusted, 0i32);
        if m != 0.0 && m.is_finite() {
            while m.abs() < min_mantissa {
                m *= 10.0;
                e -= 1;
            }
            while m.abs() > max_mantissa {
                m /= 10.0;
                e += 1;
            }
        }
        (m, Some(e))
    };
    let rounded = round(mantissa, pic.max_fractional)?;
    let family = |s: String| -> Vec<char> {
        s.chars()
            .map(|c| match c.to_digit(10) {
                Some(d) => char::from_u32(p.zero as u32 + d).unwrap_or(c),
                None => c,
            })
            .collect()
    };
    let mut s = family(format!("{:.*}", pic.max_fractional, rounded.abs()));
    match index_of(&s, '.', 0) {
        None => s.push(p.decimal),
        Some(i) => s[i] = p.decimal,
    }
    while s.first() == Some(&p.zero) {
        s.remove(0);
    }
    while s.last() == Some(&p.zero) {
        s.pop();
    }
    let decimal_pos = index_of(&s, p.decimal, 0).unwrap_or(s.len());
    let pad_left = pic.min_integer.saturating_sub(decimal_pos);
    let pad_right = pic.min_fractional.saturating_sub(s.len() - decimal_pos - 1);
    s.splice(0..0, std::iter::repeat_n(p.zero, pad_left));
    s.extend(std::iter::repeat_n(p.zero, pad_right));
    let mut decimal_pos = index_of(&s, p.decimal, 0).unwrap_or(s.len());
    if pic.regular_grouping > 0 {
        let groups = decimal_pos.saturating_sub(1) / pic.regular_grouping;
        for group in 1..=groups {
            s.insert(decimal_pos - group * pic.regular_grouping, p.grouping);
        }
    } else {
        for &pos in &pic.integer_grouping {
            s.insert(decimal_pos.saturating_sub(pos), p.grouping);
            decimal_pos += 1;
        }
    }
    let decimal_pos = index_of(&s, p.decimal, 0).unwrap_or(s.len());
    for &pos in &pic.fractional_grouping {
        let at = (pos + decimal_pos + 1).min(s.len());
        s.insert(at, p.grouping);
    }
    let decimal_pos = index_of(&s, p.decimal, 0);
    if !pic.picture.contains(&p.decimal) || decimal_pos == Some(s.len() - 1) {
        s.pop();
    }
    let mut out: String = s.into_iter().collect();
    if let Some(e) = exponent {
        let mut digits: String = family(e.abs().to_string()).into_iter().collect();
        let width = digits.chars().count();
        if width < pic.min_exponent {
            digits.insert_str(0, &p.zero.to_string().repeat(pic.min_exponent - width));
        }
        out.push(p.exponent);
        if e < 0 {
            out.push_str(&p.minus);
        }
        out.push_str(&digits);
    }
    Ok(Value::string(
        context.arena,
        &format!("{}{}{}", pic.prefix, out, pic.suffix),
    ))
}
