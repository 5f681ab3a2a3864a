//! Weight sources behind one trait, so one model file serves safetensors (any float dtype)
//! and GGUF (quantized) weights. Tensor names are the Hugging Face ones; the GGUF source
//! maps them to llama.cpp's.

use std::collections::HashMap;
use std::io::Cursor;

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{LoadError, Result};

/// Where the model's tensors come from.
pub trait WeightSource {
    /// The tensor's shape (row-major, `[out, in]` for linear layers), if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// A linear layer's weight, kept quantized where the source is.
    fn matmul(&self, name: &str, dtype: DType, device: &Device) -> Result<QMatMul>;
    /// A plain tensor (norm scales, rope factors), converted to `dtype`.
    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor>;
    /// Whether q/k projection rows are in llama.cpp's order, which pairs rotary dimensions
    /// as neighbours (interleaved rope) instead of halves.
    fn rope_interleaved(&self) -> bool;
    /// The dtype activations must run in given the requested one: quantized matmuls take
    /// f32 inputs.
    fn activation_dtype(&self, requested: DType) -> DType {
        requested
    }
}

/// Every tensor the architecture reads, with its shape. Checked before anything is built:
/// candle itself panics on a missing layer.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![cfg.intermediate_size, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![cfg.intermediate_size, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, cfg.intermediate_size]),
        ]);
    }
    out
}

/// Fails on the first tensor that is missing or has the wrong shape, naming it.
pub fn check_tensors(source: &dyn WeightSource, cfg: &ModelConfig) -> Result<()> {
    for (name, expected) in expected_tensors(cfg) {
        match source.shape(&name) {
            None => return Err(LoadError::MissingTensor { name }),
            Some(actual) if actual != expected => return Err(LoadError::BadTensorShape { name, expected, actual }),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Safetensors files (one or several shards), read from memory or a memory map.
pub struct SafetensorsWeights<'a> {
    views: HashMap<String, (String, safetensors::tensor::TensorView<'a>)>,
}

impl<'a> SafetensorsWeights<'a> {
    /// `files` are (file name, bytes) pairs; a header that does not fit the bytes (a truncated
    /// download) is an error naming the file.
    pub fn new(files: &[(&str, &'a [u8])]) -> Result<Self> {
        let mut views = HashMap::new();
        for (file, bytes) in files {
            let st = safetensors::SafeTensors::deserialize(bytes)
                .map_err(|e| LoadError::BadWeights { file: (*file).to_string(), message: e.to_string() })?;
            for (name, view) in st.tensors() {
                views.insert(name, ((*file).to_string(), view));
            }
        }
        Ok(Self { views })
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let Some((file, view)) = self.views.get(name) else {
            return Err(LoadError::MissingTensor { name: name.into() });
        };
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(LoadError::BadTensorDtype {
                    name: format!("{name} (in {file})"),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?)
    }
}

impl WeightSource for SafetensorsWeights<'_> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.views.get(name).map(|(_, v)| v.shape().to_vec())
    }

    fn matmul(&self, name: &str, dtype: DType, device: &Device) -> Result<QMatMul> {
        Ok(QMatMul::Tensor(self.tensor(name, dtype, device)?))
    }

    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(self.load(name, device)?.to_dtype(dtype)?)
    }

    fn rope_interleaved(&self) -> bool {
        false
    }
}

/// The llama.cpp name of a Hugging Face tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        "rope_freqs.weight" => Some("rope_freqs.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let short = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}"))
}

/// A GGUF file held in memory or memory-mapped.
pub struct GgufWeights<'a> {
    pub content: gguf_file::Content,
    bytes: &'a [u8],
    file: String,
    /// Dequantize linear layers to this dtype at load instead of keeping them quantized.
    dequantize: Option<DType>,
}

impl<'a> GgufWeights<'a> {
    pub fn new(file: &str, bytes: &'a [u8]) -> Result<Self> {
        let content = gguf_file::Content::read(&mut Cursor::new(bytes))
            .map_err(|e| LoadError::BadWeights { file: file.to_string(), message: e.to_string() })?;
        Ok(Self { content, bytes, file: file.to_string(), dequantize: None })
    }

    /// Dequantize every weight to `dtype` at load (None keeps the file's quantization).
    pub fn with_dequantize(mut self, dtype: Option<DType>) -> Self {
        self.dequantize = dtype;
        self
    }

    /// The quantized tensor under its Hugging Face name.
    pub fn qtensor(&self, hf_name: &str, device: &Device) -> Result<QTensor> {
        let name = gguf_name(hf_name).ok_or_else(|| LoadError::MissingTensor { name: hf_name.into() })?;
        if !self.content.tensor_infos.contains_key(&name) {
            return Err(LoadError::MissingTensor { name: format!("{hf_name} (GGUF `{name}`)") });
        }
        self.content
            .tensor(&mut Cursor::new(self.bytes), &name, device)
            .map_err(|e| LoadError::BadWeights { file: self.file.clone(), message: format!("{name}: {e}") })
    }
}

impl WeightSource for GgufWeights<'_> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let info = self.content.tensor_infos.get(&gguf_name(name)?)?;
        Some(info.shape.dims().to_vec())
    }

    fn matmul(&self, name: &str, dtype: DType, device: &Device) -> Result<QMatMul> {
        match self.dequantize {
            Some(_) => Ok(QMatMul::Tensor(self.tensor(name, dtype, device)?)),
            None => Ok(QMatMul::from_qtensor(self.qtensor(name, device)?)?),
        }
    }

    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(self.qtensor(name, device)?.dequantize(device)?.to_dtype(dtype)?)
    }

    fn rope_interleaved(&self) -> bool {
        true
    }

    fn activation_dtype(&self, _requested: DType) -> DType {
        self.dequantize.unwrap_or(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(gguf_name("model.layers.12.mlp.down_proj.weight").as_deref(), Some("blk.12.ffn_down.weight"));
        assert_eq!(gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_name("model.layers.1.bogus.weight"), None);
    }
}
