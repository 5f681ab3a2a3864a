//! GGUF files: the model config and tokenizer from the metadata, and `import_gguf`, which
//! writes a Hugging Face directory (safetensors, config.json, tokenizer.json,
//! tokenizer_config.json, ember-manifest.json) from a GGUF file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::bpe::{ByteBpe, GPT2_SPLIT, LLAMA3_SPLIT};
use crate::chat::{ChatTemplateField, SpecialToken, TokenizerConfig};
use crate::config::{Architecture, ModelConfig};
use crate::error::{LoadError, Result};
use crate::gguf_header::{GgufHeader, StringArray};
use crate::manifest::Manifest;
use crate::model::unpermute_qk;
use crate::weights::{check_tensors, expected_tensors, GgufWeights, WeightSource};

fn md<'a>(ct: &'a GgufHeader, key: &str) -> Result<&'a Value> {
    ct.content.metadata.get(key).ok_or_else(|| LoadError::BadConfig(format!("GGUF metadata has no `{key}`")))
}

fn md_u32(ct: &GgufHeader, key: &str) -> Result<u32> {
    md(ct, key)?.to_u32().map_err(|e| LoadError::BadConfig(format!("GGUF `{key}`: {e}")))
}

fn md_f32(ct: &GgufHeader, key: &str) -> Result<f32> {
    md(ct, key)?.to_f32().map_err(|e| LoadError::BadConfig(format!("GGUF `{key}`: {e}")))
}

fn md_str<'a>(ct: &'a GgufHeader, key: &str) -> Result<&'a str> {
    md(ct, key)?.to_string().map(String::as_str).map_err(|e| LoadError::BadConfig(format!("GGUF `{key}`: {e}")))
}

/// A string array of the metadata (a vocabulary, its merges), packed as the header holds it.
fn md_strings<'a>(ct: &'a GgufHeader, key: &str) -> Result<&'a StringArray> {
    ct.strings(key).ok_or_else(|| match ct.content.metadata.get(key) {
        Some(_) => LoadError::BadConfig(format!("GGUF `{key}` is not an array of strings")),
        None => LoadError::BadConfig(format!("GGUF metadata has no `{key}`")),
    })
}

/// The model config from GGUF metadata.
pub fn gguf_config(ct: &GgufHeader) -> Result<ModelConfig> {
    let arch = md_str(ct, "general.architecture")?;
    let architecture = match arch {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        other => return Err(LoadError::UnsupportedArchitecture(format!("GGUF `{other}`"))),
    };
    let k = |s: &str| format!("{arch}.{s}");
    let heads = md_u32(ct, &k("attention.head_count"))? as usize;
    let hidden = md_u32(ct, &k("embedding_length"))? as usize;
    let vocab_size = match md_u32(ct, &k("vocab_size")) {
        Ok(v) => v as usize,
        Err(_) => md_strings(ct, "tokenizer.ggml.tokens")?.len(),
    };
    let cfg = ModelConfig {
        architecture,
        hidden_size: hidden,
        intermediate_size: md_u32(ct, &k("feed_forward_length"))? as usize,
        num_hidden_layers: md_u32(ct, &k("block_count"))? as usize,
        num_attention_heads: heads,
        num_key_value_heads: md_u32(ct, &k("attention.head_count_kv")).map(|v| v as usize).unwrap_or(heads),
        head_dim: md_u32(ct, &k("attention.key_length")).map(|v| v as usize).unwrap_or(hidden / heads.max(1)),
        vocab_size,
        rms_norm_eps: md_f32(ct, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f64,
        rope_theta: md_f32(ct, &k("rope.freq_base")).unwrap_or(10000.0) as f64,
        rope_scaling: None,
        max_position_embeddings: md_u32(ct, &k("context_length")).map(|v| v as usize).unwrap_or(4096),
        sliding_window: md_u32(ct, &k("attention.sliding_window")).ok().map(|v| v as usize),
        tie_word_embeddings: !ct.content.tensor_infos.contains_key("output.weight"),
        bos_token_id: md_u32(ct, "tokenizer.ggml.bos_token_id").ok(),
        eos_token_ids: md_u32(ct, "tokenizer.ggml.eos_token_id").ok().into_iter().collect(),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The tokenizer a GGUF model loads with: Ember's byte-level BPE over the header's packed
/// vocabulary ([`ByteBpe`], which encodes and decodes as [`gguf_tokenizer`] does, for a
/// fraction of its build). SentencePiece GGUF vocabularies are not rebuilt: ship a
/// tokenizer.json.
pub fn gguf_byte_bpe(ct: &GgufHeader) -> Result<ByteBpe> {
    let v = gpt2_vocabulary(ct)?;
    ByteBpe::new(v.tokens, v.merges, v.types, v.pre)
        .map_err(|e| LoadError::Tokenizer(format!("GGUF BPE vocabulary: {e}")))
}

/// A GGUF header's byte-level BPE vocabulary.
struct Gpt2Vocabulary<'a> {
    tokens: &'a StringArray,
    /// `"left right"`, in rank order.
    merges: &'a StringArray,
    /// GGUF's token types: may be empty.
    types: &'a [i32],
    /// `tokenizer.ggml.pre`, the pre-tokenizer's name.
    pre: &'a str,
}

fn gpt2_vocabulary(ct: &GgufHeader) -> Result<Gpt2Vocabulary<'_>> {
    let model = md_str(ct, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(LoadError::Tokenizer(format!(
            "GGUF tokenizer model `{model}` is not rebuilt by Ember; put the model's tokenizer.json next to the .gguf file"
        )));
    }
    // GGUF writes the token types as i32 (kept packed). Types stored as anything else count
    // as normal tokens; a value that is not an array is refused.
    let types = match ct.i32s("tokenizer.ggml.token_type") {
        Some(types) => types,
        None => {
            if let Ok(v) = md(ct, "tokenizer.ggml.token_type") {
                v.to_vec().map_err(|e| LoadError::BadConfig(format!("GGUF token types: {e}")))?;
            }
            &[]
        }
    };
    Ok(Gpt2Vocabulary {
        tokens: md_strings(ct, "tokenizer.ggml.tokens")?,
        merges: md_strings(ct, "tokenizer.ggml.merges")?,
        types,
        pre: md_str(ct, "tokenizer.ggml.pre").unwrap_or("default"),
    })
}

/// Builds a `tokenizers` tokenizer from GGUF's byte-level BPE metadata (GPT-2 style vocab
/// and merges), for `ember model import` to write as tokenizer.json. SentencePiece GGUF
/// vocabularies are not rebuilt: ship a tokenizer.json.
pub fn gguf_tokenizer(ct: &GgufHeader) -> Result<Tokenizer> {
    let Gpt2Vocabulary { tokens, merges: merged, types, pre } = gpt2_vocabulary(ct)?;
    // Sized once (a collect through the filter would grow it by doubling: megabytes of fresh
    // memory touched and dropped).
    let mut merges: Vec<(String, String)> = Vec::with_capacity(merged.len());
    merges.extend(merged.iter().filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned()))));
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(i, t)| (t.to_owned(), i as u32)).collect();
    // llama.cpp takes a word that is in the vocabulary whole, merges or not, for Llama 3's
    // pre-tokenizer (as Llama 3's own tokenizer.json does).
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(matches!(pre, "llama3" | "llama-bpe"))
        .build()
        .map_err(|e| LoadError::Tokenizer(format!("GGUF BPE vocabulary: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| LoadError::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
        Ok(s.into())
    };
    let byte_level = ByteLevel::new(false, true, false);
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // SmolLM splits every digit on its own before the GPT-2 rules.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        "llama3" | "llama-bpe" => Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level.into()]).into(),
        _ => Sequence::new(vec![split(GPT2_SPLIT)?, byte_level.into()]).into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, true, false)));
    // Control (3) and user-defined (4) tokens must never be split by the BPE.
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, t)| **t == 3 || **t == 4)
        .map(|(tok, t)| AddedToken::from(tok, *t == 3))
        .collect();
    tokenizer.add_special_tokens(specials).map_err(|e| LoadError::Tokenizer(format!("GGUF special tokens: {e}")))?;
    Ok(tokenizer)
}

/// `tokenizer_config.json` equivalent from GGUF metadata.
pub fn gguf_tokenizer_config(ct: &GgufHeader) -> TokenizerConfig {
    let tokens = md_strings(ct, "tokenizer.ggml.tokens").ok();
    let token = |key: &str| {
        let id = md_u32(ct, key).ok()?;
        tokens?.get(id as usize).map(|t| SpecialToken::Text(t.to_owned()))
    };
    TokenizerConfig {
        chat_template: md_str(ct, "tokenizer.chat_template").ok().map(|t| ChatTemplateField::One(t.to_string())),
        bos_token: token("tokenizer.ggml.bos_token_id"),
        eos_token: token("tokenizer.ggml.eos_token_id"),
    }
}

/// Options for [`import_gguf`].
#[derive(Debug, Clone, Copy)]
pub struct ImportOptions {
    /// The dtype of the written safetensors.
    pub dtype: DType,
}

/// Converts a GGUF Llama file into a Hugging Face directory: dequantized weights under HF
/// names with q/k rows back in HF order, config.json, tokenizer files and a manifest.
pub fn import_gguf(gguf: &Path, out_dir: &Path, opts: ImportOptions) -> Result<Manifest> {
    let bytes = std::fs::read(gguf).map_err(|e| LoadError::io(gguf, e))?;
    let name = gguf.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let weights = GgufWeights::new(&name, &bytes)?;
    let cfg = gguf_config(&weights.header)?;
    check_tensors(&weights, &cfg)?;
    let tokenizer = gguf_tokenizer(&weights.header)?;
    let tok_cfg = gguf_tokenizer_config(&weights.header);
    std::fs::create_dir_all(out_dir).map_err(|e| LoadError::io(out_dir, e))?;

    let cpu = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut names: Vec<String> = expected_tensors(&cfg).into_iter().map(|(n, _)| n).collect();
    if weights.shape("rope_freqs.weight").is_some() {
        names.push("rope_freqs.weight".into());
    }
    for hf in names {
        let mut t = weights.tensor(&hf, DType::F32, &cpu)?;
        if hf.ends_with("self_attn.q_proj.weight") {
            t = unpermute_qk(&t, cfg.num_attention_heads)?;
        } else if hf.ends_with("self_attn.k_proj.weight") {
            t = unpermute_qk(&t, cfg.num_key_value_heads)?;
        }
        tensors.insert(hf, t.to_dtype(opts.dtype)?);
    }
    let st_path = out_dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st_path)?;
    // The safetensors writer creates its file private (0600); a model directory is meant to be
    // read by other users too (a container's worker user, a shared cache), like the JSON files
    // beside it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&st_path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| LoadError::io(&st_path, e))?;
    }

    let dtype_name = match opts.dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    write_json(&out_dir.join("config.json"), &cfg.to_hf(dtype_name))?;
    write_json(&out_dir.join("tokenizer_config.json"), &tok_cfg)?;
    let tok_path = out_dir.join("tokenizer.json");
    tokenizer
        .save(&tok_path, false)
        .map_err(|e| LoadError::Tokenizer(format!("writing {}: {e}", tok_path.display())))?;
    Manifest::write_for_dir(out_dir)
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| LoadError::BadJson { file: path.display().to_string(), message: e.to_string() })?;
    std::fs::write(path, text + "\n").map_err(|e| LoadError::io(path, e))
}

/// Rewrites a GGUF file with every tensor stored as `dtype` (F32 or F16), metadata kept.
/// Used to compare the same weights at another precision against llama.cpp, which reads
/// GGUF only.
pub fn convert_gguf(src: &Path, dst: &Path, dtype: GgmlDType) -> Result<()> {
    if !matches!(dtype, GgmlDType::F32 | GgmlDType::F16) {
        return Err(LoadError::BadConfig(format!("convert to {dtype:?} is not supported: use f32 or f16")));
    }
    let bytes = std::fs::read(src).map_err(|e| LoadError::io(src, e))?;
    let name = src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let weights = GgufWeights::new(&name, &bytes)?;
    let cpu = Device::Cpu;
    let mut names: Vec<&String> = weights.header.content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    let mut reader = std::io::Cursor::new(&bytes[..]);
    for n in names {
        let q = weights.header.content.tensor(&mut reader, n, &cpu)?;
        // Norm vectors stay f32, as llama.cpp's converter keeps them.
        let target = if q.shape().rank() == 1 { GgmlDType::F32 } else { dtype };
        let t = q.dequantize(&cpu)?;
        tensors.push((n.as_str(), QTensor::quantize(&t, target)?));
    }
    let file_type = Value::U32(if dtype == GgmlDType::F16 { 1 } else { 0 });
    write_gguf(dst, &weights.header.metadata(), file_type, &tensors)
}

/// Writes a GGUF file: `metadata` as it was but for `general.file_type`, which becomes
/// `file_type`, and `tensors` in the order given.
pub(crate) fn write_gguf(
    dst: &Path,
    metadata: &std::collections::HashMap<String, Value>,
    file_type: Value,
    tensors: &[(&str, QTensor)],
) -> Result<()> {
    let mut metadata: Vec<(&str, &Value)> =
        metadata.iter().filter(|(k, _)| k.as_str() != "general.file_type").map(|(k, v)| (k.as_str(), v)).collect();
    metadata.push(("general.file_type", &file_type));
    metadata.sort_by(|a, b| a.0.cmp(b.0));
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(dst).map_err(|e| LoadError::io(dst, e))?);
    candle_core::quantized::gguf_file::write(&mut out, &metadata, &refs)?;
    std::io::Write::flush(&mut out).map_err(|e| LoadError::io(dst, e))?;
    Ok(())
}
