//! Model configuration: parsed once from `config.json` (or GGUF metadata) into [`ModelConfig`].

use serde::{Deserialize, Serialize};

use crate::error::{LoadError, Result};

/// The architectures Ember builds. Both share one model file: Mistral is Llama with a
/// sliding attention window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
}

/// Llama 3 style frequency scaling of the rotary embedding (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// What the model builder needs, whatever file format it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as Hugging Face writes it for Llama and Mistral.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Required rather than defaulted: a config that names the rope base under another key
    /// would otherwise run with the wrong frequencies and produce plausible garbage.
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

/// `eos_token_id` is a number in most configs and a list in Llama 3's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

fn default_rms_eps() -> f64 {
    1e-6
}

fn default_max_pos() -> usize {
    4096
}

impl HfConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| LoadError::BadJson { file: "config.json".into(), message: e.to_string() })
    }

    pub fn architecture(&self) -> Result<Architecture> {
        let name =
            self.architectures.first().cloned().or_else(|| self.model_type.clone()).unwrap_or_else(|| "<none>".into());
        match name.as_str() {
            "LlamaForCausalLM" | "llama" => Ok(Architecture::Llama),
            "MistralForCausalLM" | "mistral" => Ok(Architecture::Mistral),
            _ => Err(LoadError::UnsupportedArchitecture(name)),
        }
    }

    pub fn into_config(self) -> Result<ModelConfig> {
        let architecture = self.architecture()?;
        let rope_scaling = match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(parse_rope_scaling(v)?),
        };
        let cfg = ModelConfig {
            architecture,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: match architecture {
                Architecture::Mistral => self.sliding_window,
                Architecture::Llama => None,
            },
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: self.bos_token_id.as_ref().and_then(|b| b.to_vec().first().copied()),
            eos_token_ids: self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<Llama3RopeScaling> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("<none>");
    if kind != "llama3" {
        return Err(LoadError::BadConfig(format!(
            "rope_scaling type `{kind}` is not supported (Ember supports `llama3`)"
        )));
    }
    serde_json::from_value(v.clone())
        .map_err(|e| LoadError::BadConfig(format!("rope_scaling of type llama3 is incomplete: {e}")))
}

impl ModelConfig {
    /// Reject configurations the model builder would otherwise trip over later.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LoadError::BadConfig(m));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("attention head counts must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for rotary embeddings", self.head_dim));
        }
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return bad("hidden_size, num_hidden_layers and vocab_size must be positive".into());
        }
        if !self.rope_theta.is_finite() || self.rope_theta <= 0.0 {
            return bad(format!("rope_theta must be positive, got {}", self.rope_theta));
        }
        Ok(())
    }

    /// Back to a Hugging Face `config.json` (used by `ember model import-gguf`).
    pub fn to_hf(&self, torch_dtype: &str) -> HfConfig {
        let (arch, model_type) = match self.architecture {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        };
        HfConfig {
            architectures: vec![arch.into()],
            model_type: Some(model_type.into()),
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: Some(self.num_key_value_heads),
            head_dim: Some(self.head_dim),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.as_ref().map(|s| {
                serde_json::json!({
                    "rope_type": "llama3",
                    "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings,
                })
            }),
            max_position_embeddings: self.max_position_embeddings,
            sliding_window: self.sliding_window,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: self.bos_token_id.map(TokenIds::One),
            eos_token_id: match self.eos_token_ids.as_slice() {
                [] => None,
                [one] => Some(TokenIds::One(*one)),
                many => Some(TokenIds::Many(many.to_vec())),
            },
            torch_dtype: Some(torch_dtype.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,
        "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
        "num_key_value_heads":3,"vocab_size":49152,"rms_norm_eps":1e-5,"rope_theta":100000.0,
        "max_position_embeddings":8192,"tie_word_embeddings":true,"bos_token_id":1,
        "eos_token_id":2}"#;

    #[test]
    fn parses_a_llama_config() -> Result<()> {
        let cfg = HfConfig::from_json(SMOLLM)?.into_config()?;
        assert_eq!(cfg.architecture, Architecture::Llama);
        assert_eq!(cfg.head_dim, 64);
        assert_eq!(cfg.eos_token_ids, vec![2]);
        assert_eq!(cfg.rope_theta, 100000.0);
        Ok(())
    }

    #[test]
    fn missing_rope_theta_is_an_error_not_a_silent_default() {
        let text = SMOLLM.replace("\"rope_theta\":100000.0,", "\"rope_base\":100000.0,");
        let err = HfConfig::from_json(&text).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("rope_theta")));
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let text = SMOLLM.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let err = HfConfig::from_json(&text).and_then(HfConfig::into_config);
        assert!(matches!(err, Err(LoadError::UnsupportedArchitecture(a)) if a == "GPT2LMHeadModel"));
    }

    #[test]
    fn llama3_rope_scaling_and_eos_list() -> Result<()> {
        let text = SMOLLM.replace(
            "\"eos_token_id\":2",
            "\"eos_token_id\":[128001,128009],\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,\
             \"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}",
        );
        let cfg = HfConfig::from_json(&text)?.into_config()?;
        assert_eq!(cfg.eos_token_ids, vec![128001, 128009]);
        assert_eq!(cfg.rope_scaling.map(|s| s.factor), Some(8.0));
        Ok(())
    }
}
