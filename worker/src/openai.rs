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
