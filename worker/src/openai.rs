//! OpenAI-shaped response bodies, so clients written for the OpenAI API read Ember's output.

use serde_json::{json, Value};

use ember_engine::Completion;

/// A `chat.completion` object (or `text_completion` for plain prompts).
pub fn completion_body(id: &str, model: &str, created: u64, chat: bool, c: &Completion) -> Value {
    let choice = if chat {
        json!({
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": null,
            "finish_reason": c.finish_reason,
        })
    } else {
        json!({"index": 0, "text": c.text, "logprobs": null, "finish_reason": c.finish_reason})
    };
    json!({
        "id": id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": c.usage,
    })
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// One streamed chunk: a `chat.completion.chunk` whose delta carries `text` (and the role on
/// the first chunk), or a `text_completion` chunk. `usage` is `Some(null)` on every chunk when
/// the client asked for a usage chunk (`stream_options.include_usage`), as OpenAI sends it.
pub struct ChunkHead<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub created: u64,
    pub chat: bool,
    pub include_usage: bool,
}

impl ChunkHead<'_> {
    /// A chunk with one choice: `text` (with the assistant role on the first chat chunk) and
    /// the finish reason on the last one.
    pub fn choice(&self, text: &str, first: bool, finish_reason: Option<ember_engine::FinishReason>) -> Value {
        let choice = if self.chat {
            let delta = match (first, text.is_empty() && finish_reason.is_some()) {
                (true, _) => json!({"role": "assistant", "content": text}),
                (false, true) => json!({}),
                (false, false) => json!({"content": text}),
            };
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason})
        };
        self.chunk(json!([choice]), Value::Null)
    }

    /// The last chunk when usage was asked for: no choices, the usage counts.
    pub fn usage(&self, usage: &ember_engine::Usage) -> Value {
        self.chunk(json!([]), json!(usage))
    }

    fn chunk(&self, choices: Value, usage: Value) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = usage;
        }
        chunk
    }
}

/// The `GET /v1/models` list.
pub fn models_body(models: &[String], created: u64) -> Value {
    let data: Vec<Value> =
        models.iter().map(|m| json!({"id": m, "object": "model", "created": created, "owned_by": "ember"})).collect();
    json!({"object": "list", "data": data})
}
