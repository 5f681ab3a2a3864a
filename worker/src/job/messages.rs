//! Chat messages: OpenAI's roles and content (a string or a list of text parts) turned into
//! the `{role, content}` messages the model's chat template renders.

use ember_model_loader::Message;
use serde_json::Value;

use super::input::{kind, Fields};
use super::JobError;

/// The roles a message may have. Tool and function messages are refused: Ember runs no tools,
/// and chat templates without tool support fail on them or render them as plain text.
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant"];

/// `body.messages`, checked and converted.
pub(crate) fn chat_messages(body: &Fields<'_>) -> Result<Vec<Message>, JobError> {
    let list = body.list("messages")?.ok_or(JobError::MissingMessages)?;
    if list.is_empty() {
        return Err(JobError::EmptyMessages);
    }
    list.iter().enumerate().map(|(index, m)| message(index, m)).collect()
}

fn message(index: usize, value: &Value) -> Result<Message, JobError> {
    let path = format!("body.messages[{index}]");
    let map = value.as_object().ok_or_else(|| JobError::WrongType {
        field: path.clone(),
        expected: "an object with `role` and `content`",
        found: kind(value),
    })?;
    let fields = Fields::new(map, &path);
    let role = match fields.str("role")?.unwrap_or_default() {
        // OpenAI's newer name for the system role; chat templates only know "system".
        "developer" => "system",
        r if ROLES.contains(&r) => r,
        r => return Err(JobError::UnknownRole { index, role: r.to_string() }),
    };
    let content = content(index, &fields)?;
    if content.trim().is_empty() {
        return Err(JobError::EmptyContent { index });
    }
    Ok(Message { role: role.to_string(), content })
}

/// A string, or the text parts of a list joined with newlines (as vLLM joins them), so a
/// message split into parts reads as it would in one string.
fn content(index: usize, fields: &Fields<'_>) -> Result<String, JobError> {
    match fields.get("content") {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let texts = parts.iter().enumerate().map(|(i, p)| text_part(index, i, p)).collect::<Result<Vec<_>, _>>()?;
            Ok(texts.join("\n"))
        }
        Some(other) => Err(fields.wrong_type("content", "a string or a list of {\"type\": \"text\"} parts", other)),
    }
}

fn text_part(index: usize, part: usize, value: &Value) -> Result<String, JobError> {
    let path = format!("body.messages[{index}].content[{part}]");
    let map = value.as_object().ok_or_else(|| JobError::WrongType {
        field: path.clone(),
        expected: "a {\"type\": \"text\", \"text\": ...} object",
        found: kind(value),
    })?;
    let fields = Fields::new(map, &path);
    match fields.str("type")? {
        Some("text") => fields.str("text")?.map(str::to_string).ok_or_else(|| JobError::WrongType {
            field: fields.path_of("text"),
            expected: "a string",
            found: "nothing",
        }),
        other => Err(JobError::UnsupportedContentPart { index, part_type: other.unwrap_or_default().to_string() }),
    }
}
