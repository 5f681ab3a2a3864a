//! `ember model quantize`: rewrite a GGUF file with its weights in another format, the
//! metadata (config, tokenizer, chat template) kept. Which tensor gets which type follows
//! llama.cpp's `llama-quantize` in simplified form:
//!
//! - 1-D tensors (norm scales) stay f32.
//! - The output matrix (`output.weight`, or `token_embd.weight` when the head is tied to it):
//!   Q8_0 for the 32-block types, Q6_K for the K-quant types, as given for f32/f16/bf16.
//! - Q4_K_M: Q4_K for every matrix, except Q6_K for `attn_v` and `ffn_down` in the first and
//!   last eighth of the layers and every third layer between (llama.cpp's `use_more_bits`).
//! - K-quants need rows that are whole 256-element blocks; a matrix whose rows are not falls
//!   back as in llama.cpp: Q4_K to Q5_0, Q6_K to Q8_0 (SmolLM2's 576-wide rows do).

use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{LoadError, Result};
use crate::weights::GgufWeights;

/// A target of `ember model quantize` (llama.cpp's names, lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q4KM,
}

impl FromStr for QuantType {
    type Err = LoadError;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => QuantType::F32,
            "f16" => QuantType::F16,
            "bf16" => QuantType::Bf16,
            "q8_0" => QuantType::Q8_0,
            "q4_0" => QuantType::Q4_0,
            "q4_1" => QuantType::Q4_1,
            "q5_0" => QuantType::Q5_0,
            "q4_k_m" => QuantType::Q4KM,
            other => {
                return Err(LoadError::BadConfig(format!(
                    "unknown quantization type `{other}`: use f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q4_k_m"
                )))
            }
        })
    }
}

impl QuantType {
    /// GGUF `general.file_type` (llama.cpp's `llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q8_0 => 7,
            QuantType::Q5_0 => 8,
            QuantType::Q4KM => 15,
            QuantType::Bf16 => 32,
        }
    }

    /// The type of the 2-D tensor `name` with rows of `cols` elements, in a model of
    /// `layers` layers whose head is `output` (see the module doc).
    pub fn tensor_type(self, name: &str, cols: usize, layers: usize, output: &str) -> GgmlDType {
        let wanted = match self {
            QuantType::F32 => GgmlDType::F32,
            QuantType::F16 => GgmlDType::F16,
            QuantType::Bf16 => GgmlDType::BF16,
            QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 if name == output => GgmlDType::Q8_0,
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4_1 => GgmlDType::Q4_1,
            QuantType::Q5_0 => GgmlDType::Q5_0,
            QuantType::Q4KM if name == output => GgmlDType::Q6K,
            QuantType::Q4KM => {
                let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok());
                let more_bits = |i: usize| i < layers / 8 || i >= 7 * layers / 8 || (i - layers / 8) % 3 == 2;
                match layer {
                    Some(i) if (name.contains("attn_v") || name.contains("ffn_down")) && more_bits(i) => GgmlDType::Q6K,
                    _ => GgmlDType::Q4K,
                }
            }
        };
        match wanted {
            GgmlDType::Q4K if !cols.is_multiple_of(256) => GgmlDType::Q5_0,
            GgmlDType::Q6K if !cols.is_multiple_of(256) => GgmlDType::Q8_0,
            t => t,
        }
    }
}

/// Rewrites the GGUF file `src` as `dst` with its weights in `target` (dequantized from
/// whatever `src` holds, then quantized). Metadata is kept but for `general.file_type`.
pub fn quantize_gguf(src: &Path, dst: &Path, target: QuantType) -> Result<()> {
    let bytes = std::fs::read(src).map_err(|e| LoadError::io(src, e))?;
    let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let weights = GgufWeights::new(&name, &bytes)?;
    let infos = &weights.header.content.tensor_infos;
    let output = if infos.contains_key("output.weight") { "output.weight" } else { "token_embd.weight" };
    let layers = infos.keys().filter_map(|n| n.strip_prefix("blk.")?.split('.').next()?.parse::<usize>().ok()).max();
    let layers = layers.map_or(0, |l| l + 1);
    let cpu = Device::Cpu;
    let mut names: Vec<&String> = infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    let mut reader = std::io::Cursor::new(&bytes[..]);
    for n in names {
        let q = weights.header.content.tensor(&mut reader, n, &cpu)?;
        let dims = q.shape().dims().to_vec();
        let ty = match dims.as_slice() {
            [_, cols] => target.tensor_type(n, *cols, layers, output),
            _ => GgmlDType::F32,
        };
        let t = if q.dtype() == ty { q } else { QTensor::quantize(&q.dequantize(&cpu)?, ty)? };
        tensors.push((n.as_str(), t));
    }
    crate::gguf::write_gguf(dst, &weights.header.metadata(), Value::U32(target.file_type()), &tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_follows_llama_cpp_rules() {
        let t = |name: &str, cols: usize| QuantType::Q4KM.tensor_type(name, cols, 32, "output.weight");
        assert_eq!(t("output.weight", 4096), GgmlDType::Q6K);
        assert_eq!(t("blk.0.attn_v.weight", 4096), GgmlDType::Q6K);
        assert_eq!(t("blk.5.attn_v.weight", 4096), GgmlDType::Q4K);
        assert_eq!(t("blk.6.ffn_down.weight", 4096), GgmlDType::Q6K);
        assert_eq!(t("blk.7.ffn_down.weight", 4096), GgmlDType::Q4K);
        assert_eq!(t("blk.7.attn_q.weight", 4096), GgmlDType::Q4K);
        assert_eq!(t("blk.7.attn_q.weight", 576), GgmlDType::Q5_0);
        assert_eq!(t("output.weight", 576), GgmlDType::Q8_0);
        assert_eq!(QuantType::Q4_1.tensor_type("blk.0.ffn_up.weight", 576, 30, "token_embd.weight"), GgmlDType::Q4_1);
        assert_eq!(QuantType::Q4_1.tensor_type("token_embd.weight", 576, 30, "token_embd.weight"), GgmlDType::Q8_0);
        assert!("q9_9".parse::<QuantType>().is_err());
    }
}
