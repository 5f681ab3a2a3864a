//! Tokenizer and chat template: `tokenizer.json` plus the Jinja `chat_template` from
//! `tokenizer_config.json`, rendered with the model's own special tokens.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{LoadError, Result};

/// One chat message, as in the OpenAI chat completions API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// The fields of `tokenizer_config.json` that Ember uses.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TokenizerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<ChatTemplateField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<SpecialToken>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<SpecialToken>,
}

/// `chat_template` is a string, or a list of named templates (we use `default`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChatTemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamedTemplate {
    pub name: String,
    pub template: String,
}

/// A special token is written as a string or as an `AddedToken` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Text(s) => s,
            Self::Added { content } => content,
        }
    }
}

impl TokenizerConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| LoadError::BadJson { file: "tokenizer_config.json".into(), message: e.to_string() })
    }

    fn template(&self) -> Option<&str> {
        match self.chat_template.as_ref()? {
            ChatTemplateField::One(t) => Some(t),
            ChatTemplateField::Named(list) => {
                list.iter().find(|t| t.name == "default").or_else(|| list.first()).map(|t| t.template.as_str())
            }
        }
    }
}

/// Turns chat messages into the prompt text the model was trained on.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<minijinja::Environment<'static>>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).finish()
    }
}

const TEMPLATE_NAME: &str = "chat";

/// Used when a model ships no template: ChatML, the most common instruct format.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl ChatTemplate {
    pub fn new(config: &TokenizerConfig) -> Result<Self> {
        let source = config.template().unwrap_or(CHATML_TEMPLATE).to_string();
        let mut env = minijinja::Environment::new();
        // Hugging Face templates are written for Jinja2 in Python: `.strip()`, `.items()`
        // and friends, plus a `raise_exception` helper.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| LoadError::ChatTemplate(format!("does not parse: {e}")))?;
        Ok(Self {
            env: Arc::new(env),
            bos_token: config.bos_token.as_ref().map(|t| t.as_str().to_string()).unwrap_or_default(),
            eos_token: config.eos_token.as_ref().map(|t| t.as_str().to_string()).unwrap_or_default(),
        })
    }

    /// Renders the conversation, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(|e| LoadError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| LoadError::ChatTemplate(format!("rendering failed: {e}")))
    }
}

/// Loads `tokenizer.json` from bytes.
pub fn tokenizer_from_bytes(bytes: &[u8]) -> Result<Tokenizer> {
    Tokenizer::from_bytes(bytes).map_err(|e| LoadError::Tokenizer(format!("tokenizer.json: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_named_templates_with_python_methods() -> Result<()> {
        let cfg = TokenizerConfig::from_json(
            r#"{"chat_template":[{"name":"default","template":"{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'].strip() }}{% endfor %}"}],
                "bos_token":{"content":"<s>"}}"#,
        )?;
        let t = ChatTemplate::new(&cfg)?;
        let text = t.render(&[Message::new("user", "  hi  ")])?;
        assert_eq!(text, "<s>[user]hi");
        Ok(())
    }

    #[test]
    fn raise_exception_becomes_an_error() -> Result<()> {
        let cfg = TokenizerConfig::from_json(r#"{"chat_template":"{{ raise_exception('roles must alternate') }}"}"#)?;
        let err = ChatTemplate::new(&cfg)?.render(&[]).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("roles must alternate")));
        Ok(())
    }

    #[test]
    fn chatml_is_the_fallback() -> Result<()> {
        let t = ChatTemplate::new(&TokenizerConfig::default())?;
        let text = t.render(&[Message::new("user", "Hi")])?;
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        Ok(())
    }
}
