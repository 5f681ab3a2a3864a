//! From the raw queue message body to a JSON object, and typed reads of its fields.
//!
//! The body is read as an untyped JSON object rather than deserialized into a struct: a serde
//! type error loses the field name and stops at the first problem before we know the line's
//! `custom_id`, while these reads name the field (`body.messages[2].content`) and let the
//! rules run in the order that gives the most useful error.

use serde_json::{Map, Value};

use super::JobError;

/// Checks size, encoding and syntax, in that order, so a huge body is refused before it is
/// scanned.
pub(crate) fn parse_object(body: &[u8], max_bytes: usize) -> Result<Map<String, Value>, JobError> {
    if body.len() > max_bytes {
        return Err(JobError::BodyTooLarge { bytes: body.len(), limit: max_bytes });
    }
    let text = std::str::from_utf8(body).map_err(|e| JobError::NotUtf8 { at: e.valid_up_to() })?;
    let value: Value = serde_json::from_str(text).map_err(|e| JobError::NotJson {
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(JobError::NotAnObject { found: kind(&other) }),
    }
}

/// How a JSON value is described in an error message.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a fractional number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The fields of one JSON object, read with their full path (`body.max_tokens`) in errors.
#[derive(Clone, Copy)]
pub(crate) struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a str,
}

impl<'a> Fields<'a> {
    pub fn new(map: &'a Map<String, Value>, path: &'a str) -> Self {
        Self { map, path }
    }

    pub fn path_of(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// The value of `name`; JSON `null` reads as absent, as in the OpenAI API.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    pub fn names(&self) -> impl Iterator<Item = (&'a str, &'a Value)> {
        self.map.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.as_str(), v))
    }

    pub fn wrong_type(&self, name: &str, expected: &'static str, found: &Value) -> JobError {
        JobError::WrongType { field: self.path_of(name), expected, found: kind(found) }
    }

    pub fn str(&self, name: &str) -> Result<Option<&'a str>, JobError> {
        self.read(name, "a string", Value::as_str)
    }

    pub fn object(&self, name: &str) -> Result<Option<&'a Map<String, Value>>, JobError> {
        self.read(name, "an object", Value::as_object)
    }

    pub fn list(&self, name: &str) -> Result<Option<&'a Vec<Value>>, JobError> {
        self.read(name, "a list", Value::as_array)
    }

    /// Any JSON integer, negative or beyond `i64`; `2.0` is refused as OpenAI does.
    pub fn int(&self, name: &str) -> Result<Option<i128>, JobError> {
        self.read(name, "an integer", |v| v.as_i64().map(i128::from).or_else(|| v.as_u64().map(i128::from)))
    }

    pub fn uint(&self, name: &str) -> Result<Option<u64>, JobError> {
        self.read(name, "a non-negative integer", Value::as_u64)
    }

    pub fn float(&self, name: &str) -> Result<Option<f32>, JobError> {
        // Out-of-range values become infinite here and are refused by the range checks.
        self.read(name, "a number", |v| v.as_f64().map(|f| f as f32))
    }

    fn read<T>(
        &self,
        name: &str,
        expected: &'static str,
        cast: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, JobError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => cast(v).map(Some).ok_or_else(|| self.wrong_type(name, expected, v)),
        }
    }
}
