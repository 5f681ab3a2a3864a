//! Weight sources behind one trait, so one model file serves safetensors (any float dtype)
//! and GGUF (quantized) weights. Tensor names are the Hugging Face ones; the GGUF source
//! maps them to llama.cpp's.

use std::collections::HashMap;
use std::io::Cursor;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{LoadError, Result};
use crate::files::FileBytes;
use crate::gguf_header::GgufHeader;
use crate::linear::Linear;
use ember_kernels::cpu::QuantLinear;

/// Where the model's tensors come from.
pub trait WeightSource {
    /// The tensor's shape (row-major, `[out, in]` for linear layers), if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// A linear layer's weight, kept quantized where the source is.
    fn matmul(&self, name: &str, dtype: DType, device: &Device) -> Result<QMatMul>;
    /// A linear layer with its kernel picked ([`Linear::new`]); a source whose bytes outlive
    /// the load may hand them to the layer instead of copying them.
    fn linear(&self, name: &str, dtype: DType, device: &Device) -> Result<Linear> {
        Ok(Linear::new(self.matmul(name, dtype, device)?))
    }
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

/// The mapping a shard's bytes live in, shared with the layers that read them in place.
type Owner = std::sync::Arc<memmap2::Mmap>;

/// Safetensors files (one or several shards), read from memory or a memory map.
pub struct SafetensorsWeights<'a> {
    views: HashMap<String, (String, safetensors::tensor::TensorView<'a>)>,
    /// Per file, the mapping its bytes are in, when the layers may keep reading it.
    owners: HashMap<String, Owner>,
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
        Ok(Self { views, owners: HashMap::new() })
    }

    /// [`SafetensorsWeights::new`] over fetched files: dense layers that Ember's CPU kernel
    /// runs in the file's own dtype read their weights where the file is mapped (the local
    /// tier, a local folder, or the download's landing area) instead of a copy. The weights
    /// are then held once, and the build does not write the model's bytes a second time.
    pub fn shared(files: &[(&'a str, &'a FileBytes)]) -> Result<Self> {
        let plain: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, &***b)).collect();
        let mut weights = Self::new(&plain)?;
        for (name, bytes) in files {
            if let Some(owner) = bytes.shared() {
                weights.owners.insert((*name).to_string(), owner);
            }
        }
        Ok(weights)
    }

    /// The dtype tensor `name` has in its file (None if absent or not a float dtype).
    pub fn dtype_of(&self, name: &str) -> Option<DType> {
        match self.views.get(name)?.1.dtype() {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// A dense layer over the file's bytes, where that is possible: on the CPU, with Ember's
    /// dense kernel, the file's dtype asked for, and the bytes aligned for it.
    fn borrowed(&self, name: &str, dtype: DType, device: &Device) -> Option<Linear> {
        let (file, view) = self.views.get(name)?;
        let owner = self.owners.get(file)?;
        if !device.is_cpu() || !crate::linear::dense_kernels_on() {
            return None;
        }
        let [n, k] = view.shape() else { return None };
        if self.dtype_of(name)? != dtype {
            return None;
        }
        let start = (view.data().as_ptr() as usize).checked_sub(owner.as_ptr() as usize)?;
        let bytes = ember_kernels::cpu::SharedBytes::new(owner.clone(), start..start + view.data().len())?;
        ember_kernels::cpu::DenseLinear::from_bytes(bytes, dtype, *n, *k).map(Linear::EmberDense)
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let Some((file, view)) = self.views.get(name) else {
            return Err(LoadError::MissingTensor { name: name.into() });
        };
        let Some(dtype) = self.dtype_of(name) else {
            return Err(LoadError::BadTensorDtype {
                name: format!("{name} (in {file})"),
                dtype: format!("{:?}", view.dtype()),
            });
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

    fn linear(&self, name: &str, dtype: DType, device: &Device) -> Result<Linear> {
        match self.borrowed(name, dtype, device) {
            Some(layer) => Ok(layer),
            None => Ok(Linear::new(self.matmul(name, dtype, device)?)),
        }
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
    pub header: std::sync::Arc<GgufHeader>,
    bytes: &'a [u8],
    file: String,
    /// Dequantize linear layers to this dtype at load instead of keeping them quantized.
    dequantize: Option<DType>,
    /// Layers tiled while the file downloaded ([`crate::prebuild`]), by GGUF name: each is
    /// taken by the first layer that asks for it.
    tiled_early: std::sync::Mutex<HashMap<String, QuantLinear>>,
    /// Every tiled layer handed out (GGUF name, format, layer), to keep for a later start.
    handed_out: std::sync::Mutex<Vec<(String, GgmlDType, QuantLinear)>>,
}

impl<'a> GgufWeights<'a> {
    pub fn new(file: &str, bytes: &'a [u8]) -> Result<Self> {
        let header =
            GgufHeader::read(bytes).map_err(|message| LoadError::BadWeights { file: file.to_string(), message })?;
        Ok(Self::parsed(file, bytes, std::sync::Arc::new(header)))
    }

    /// [`GgufWeights::new`] with the header already parsed from these very bytes (during the
    /// download, [`crate::files::ModelFiles::early_header`]): a GGUF header holds the whole
    /// vocabulary and merges, and parsing it a second time is tens of MB of fresh allocations.
    pub fn parsed(file: &str, bytes: &'a [u8], header: std::sync::Arc<GgufHeader>) -> Self {
        Self {
            header,
            bytes,
            file: file.to_string(),
            dequantize: None,
            tiled_early: Default::default(),
            handed_out: Default::default(),
        }
    }

    /// The tiled layers this source handed out: GGUF name, format, layer.
    pub fn tiled_layers(&self) -> Vec<(String, GgmlDType, QuantLinear)> {
        self.handed_out.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Layers already tiled from this file's bytes (by GGUF tensor name), used instead of
    /// tiling them again.
    pub fn with_tiled(self, layers: HashMap<String, QuantLinear>) -> Self {
        Self { tiled_early: std::sync::Mutex::new(layers), ..self }
    }

    /// Dequantize every weight to `dtype` at load (None keeps the file's quantization).
    pub fn with_dequantize(mut self, dtype: Option<DType>) -> Self {
        self.dequantize = dtype;
        self
    }

    /// The quantized tensor under its Hugging Face name.
    pub fn qtensor(&self, hf_name: &str, device: &Device) -> Result<QTensor> {
        let name = gguf_name(hf_name).ok_or_else(|| LoadError::MissingTensor { name: hf_name.into() })?;
        if !self.header.content.tensor_infos.contains_key(&name) {
            return Err(LoadError::MissingTensor { name: format!("{hf_name} (GGUF `{name}`)") });
        }
        self.header
            .content
            .tensor(&mut Cursor::new(self.bytes), &name, device)
            .map_err(|e| LoadError::BadWeights { file: self.file.clone(), message: format!("{name}: {e}") })
    }
}

impl GgufWeights<'_> {
    /// A layer tiled from the tensor's blocks where they sit in the file, when Ember's kernels
    /// tile this format on this CPU (see [`QuantLinear::tiled_from_blocks`]).
    fn tiled(&self, hf_name: &str) -> Option<QuantLinear> {
        let info = self.header.content.tensor_infos.get(&gguf_name(hf_name)?)?;
        let (n, k) = info.shape.dims2().ok()?;
        let size = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let start = usize::try_from(self.header.content.tensor_data_offset.checked_add(info.offset)?).ok()?;
        let blocks = self.bytes.get(start..start.checked_add(size)?)?;
        QuantLinear::tiled_from_blocks(info.ggml_dtype, blocks, n, k)
    }
}

impl WeightSource for GgufWeights<'_> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let info = self.header.content.tensor_infos.get(&gguf_name(name)?)?;
        Some(info.shape.dims().to_vec())
    }

    fn linear(&self, name: &str, dtype: DType, device: &Device) -> Result<Linear> {
        if self.dequantize.is_none() && device.is_cpu() && crate::linear::kernels_enabled() {
            let info = gguf_name(name).and_then(|g| self.header.content.tensor_infos.get(&g));
            // A layer tiled before (during the download, or kept in the tier) must be this
            // tensor's: same shape and format, else it is tiled again here.
            let fits = |l: &QuantLinear| {
                info.is_some_and(|i| {
                    i.shape.dims2().ok() == Some(l.shape()) && QuantLinear::tiled_kind(i.ggml_dtype) == Some(l.kind())
                })
            };
            let early = gguf_name(name).and_then(|g| self.tiled_early.lock().ok()?.get(&g).cloned()).filter(fits);
            if let Some(layer) = early.or_else(|| self.tiled(name)) {
                let info =
                    gguf_name(name).and_then(|g| Some((self.header.content.tensor_infos.get(&g)?.ggml_dtype, g)));
                if let (Some((dtype, g)), Ok(mut kept)) = (info, self.handed_out.lock()) {
                    kept.push((g, dtype, layer.clone()));
                }
                return Ok(Linear::Ember(layer));
            }
        }
        Ok(Linear::new(self.matmul(name, dtype, device)?))
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

    /// Dense weights in a mapped file are read where they are mapped, and keep the mapping
    /// alive after the files are dropped; the same weights held in a `Vec` (or asked for in
    /// another dtype) are copied as before. Both multiply alike.
    #[test]
    fn mapped_dense_weights_are_read_in_place() -> anyhow::Result<()> {
        if !crate::linear::dense_kernels_on() {
            println!("no dense kernel on this CPU: every layer is copied, nothing to check");
            return Ok(());
        }
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("model.safetensors");
        let w = Tensor::arange(0f32, 96.0, &Device::Cpu)?.reshape((8, 12))?.affine(0.01, -0.3)?.to_dtype(DType::F16)?;
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), w.clone())]), &path)?;
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((1, 2, 12))?.affine(0.1, -1.0)?;
        let mapped = FileBytes::map(&path)?;
        let layer = {
            let weights = SafetensorsWeights::shared(&[("model.safetensors", &mapped)])?;
            assert_eq!(
                weights.linear("w", DType::F32, &Device::Cpu)?.path(),
                "ember-cpu-dense",
                "another dtype: a copy"
            );
            weights.linear("w", DType::F16, &Device::Cpu)?
        };
        drop(mapped);
        assert_eq!(layer.path(), "ember-cpu-dense-in-place");
        let owned = FileBytes::Owned(std::fs::read(&path)?);
        let copied =
            SafetensorsWeights::shared(&[("model.safetensors", &owned)])?.linear("w", DType::F16, &Device::Cpu)?;
        assert_eq!(copied.path(), "ember-cpu-dense");
        let (a, b) =
            (layer.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, copied.forward(&x)?.flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(gguf_name("model.layers.12.mlp.down_proj.weight").as_deref(), Some("blk.12.ffn_down.weight"));
        assert_eq!(gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_name("model.layers.1.bogus.weight"), None);
    }
}
