//! `$encodeUrlComponent`, `$encodeUrl`, `$decodeUrlComponent`, `$decodeUrl` (Ember change:
//! missing upstream): JavaScript's `encodeURIComponent`, `encodeURI`, `decodeURIComponent`
//! and `decodeURI`, as jsonata-js uses them.

use super::*;

/// Characters `encodeURIComponent` leaves as they are, besides ASCII letters and digits.
const COMPONENT_UNRESERVED: &str = "-_.!~*'()";
/// Characters `encodeURI` also leaves (and `decodeURI` does not decode).
const URI_RESERVED: &str = ";,/?:@&=+$#";

fn string_arg<'a>(
    context: &FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<Option<String>> {
    max_args!(context, args, 1);
    match args.first().copied().unwrap_or_else(Value::undefined) {
        Value::Undefined => Ok(None),
        Value::String(s) => Ok(Some(s.to_string())),
        _ => bad_arg!(context, 1),
    }
}

fn encode(s: &str, keep: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || keep.contains(c) {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// Decodes `%XX` escapes (UTF-8); escapes of characters in `keep` stay escaped. `None` for a
/// malformed escape or invalid UTF-8, as JavaScript's URIError.
fn decode(s: &str, keep: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let hex = |i: usize| -> Option<u8> {
        let h = bytes.get(i + 1..i + 3)?;
        u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let first = hex(i)?;
        let len = match first {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => return None,
        };
        let mut seq = vec![first];
        for k in 1..len {
            let at = i + 3 * k;
            if bytes.get(at) != Some(&b'%') {
                return None;
            }
            seq.push(hex(at)?);
        }
        let decoded = std::str::from_utf8(&seq).ok()?;
        if len == 1 && keep.contains(decoded) {
            out.extend_from_slice(&bytes[i..i + 3]);
        } else {
            out.extend_from_slice(decoded.as_bytes());
        }
        i += 3 * len;
    }
    String::from_utf8(out).ok()
}

fn result<'a>(
    context: &FunctionContext<'a, '_>,
    input: &str,
    out: Option<String>,
) -> Result<&'a Value<'a>> {
    match out {
        Some(s) => Ok(Value::string(context.arena, &s)),
        None => Err(Error::D3140MalformedUrl(
            context.char_index,
            context.name.to_string(),
            input.to_string(),
        )),
    }
}

pub fn fn_encode_url_component<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    match string_arg(&context, args)? {
        None => Ok(Value::undefined()),
        Some(s) => result(&context, &s, Some(encode(&s, COMPONENT_UNRESERVED))),
    }
}

pub fn fn_encode_url<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    match string_arg(&context, args)? {
        None => Ok(Value::undefined()),
        Some(s) => {
            let keep = format!("{COMPONENT_UNRESERVED}{URI_RESERVED}");
            result(&context, &s, Some(encode(&s, &keep)))
        }
    }
}

pub fn fn_decode_url_component<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    match string_arg(&context, args)? {
        None => Ok(Value::undefined()),
        Some(s) => result(&context, &s, decode(&s, "")),
    }
}

pub fn fn_decode_url<'a>(
    context: FunctionContext<'a, '_>,
    args: &[&'a Value<'a>],
) -> Result<&'a Value<'a>> {
    match string_arg(&context, args)? {
        None => Ok(Value::undefined()),
        Some(s) => result(&context, &s, decode(&s, URI_RESERVED)),
    }
}
