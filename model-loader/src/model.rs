//! One Llama/Mistral model for every weight format: linear layers are [`Linear`]s, which hold
//! either a quantized GGUF tensor or a dense float tensor, multiplied by Ember's CPU kernels
//! or candle's. The model is immutable; each
//! sequence's keys and values live in its own [`SeqCache`], so one loaded model can serve
//! many sequences.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use ember_kernels::cpu::attention::{self, KvLayer, Rope};

use crate::config::{Llama3RopeScaling, ModelConfig};
use crate::error::Result;
use crate::linear::Linear;
use crate::weights::WeightSource;

struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A built model on one device.
pub struct Model {
    cfg: ModelConfig,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: RopeTables,
    rope_interleaved: bool,
    dtype: DType,
    device: Device,
    fused_norm: bool,
    /// What the CPU forward pass reads as plain f32 values, when it runs
    /// ([`Model::set_cpu_forward`]).
    cpu: Option<CpuParts>,
}

/// The norms' weights as plain f32 values, for the CPU forward pass (which reads the rotary
/// tables in place: copied, they took 67 MB more for a model of Llama 3's 131,072 positions).
struct CpuParts {
    input_norms: Vec<Vec<f32>>,
    post_norms: Vec<Vec<f32>>,
    norm: Vec<f32>,
}

/// The keys and values one sequence has seen so far.
///
/// Each layer's keys and values live in buffers with room for more tokens than they hold
/// (`(kv_heads, capacity, head_dim)`), so a decode step writes only the new token's keys and
/// values; attention reads the filled part in place. When a buffer is full it is replaced by
/// one twice as large (at most the reserved length), so the copies made while growing add up
/// to less than the final length: amortized, a step costs the same at token 2,000 as at
/// token 2. Keys are kept in f32, the precision attention scores are computed in, so a
/// half-precision model does not convert the whole cache on every step; values stay in the
/// model's dtype. The CPU forward pass in f32 (`Model::forward_cpu`) keeps its own layers
/// ([`KvLayer`]: keys and values in f32, token by token, growing the same way); a sequence
/// uses one kind or the other, whichever its model runs.
///
/// Not `Clone`: a buffer is written in place, and a clone would share it.
#[derive(Debug, Default)]
pub struct SeqCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    /// The most tokens this sequence will hold, when known: buffers never grow past it.
    reserve: Option<usize>,
    /// Grow by concatenation, a copy of the whole cache per layer per step: how the cache
    /// worked before 2026-11-30, kept as the baseline the generation benchmark measures.
    concat: bool,
    /// Per layer, for the CPU forward pass: keys and values in f32, token by token.
    cpu: Vec<KvLayer>,
}

/// One layer's keys (f32) and values, `(kv_heads, capacity, head_dim)`; the first
/// [`SeqCache::len`] tokens are filled.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl LayerKv {
    fn capacity(&self) -> usize {
        self.k.dims().get(1).copied().unwrap_or(0)
    }
}

/// The smallest buffer allocated, in tokens.
const MIN_KV_CAPACITY: usize = 64;

impl SeqCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache for a sequence that will hold at most `tokens` tokens (prompt and completion):
    /// its buffers grow up to that length and no further.
    pub fn with_reserve(tokens: usize) -> Self {
        Self { reserve: Some(tokens), ..Self::default() }
    }

    /// A cache that grows by concatenating (a copy of the whole cache per layer per step), as
    /// Ember's did before 2026-11-30: the baseline of the generation benchmark.
    pub fn concatenating() -> Self {
        Self { concat: true, ..Self::default() }
    }

    /// Tokens already in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `t` new keys and values `(kv_heads, t, head_dim)` to layer `l`, which holds
    /// [`SeqCache::len`] tokens, and answers the layer's keys and values so far, read in
    /// place.
    fn append(&mut self, l: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (len, t) = (self.len, k.dim(1)?);
        let total = len + t;
        let k = k.to_dtype(DType::F32)?.contiguous()?;
        let v = v.contiguous()?;
        let layer = &mut self.layers[l];
        if self.concat {
            let (k, v) = match layer.take() {
                None => (k, v),
                Some(old) => (Tensor::cat(&[&old.k, &k], 1)?, Tensor::cat(&[&old.v, &v], 1)?),
            };
            *layer = Some(LayerKv { k: k.clone(), v: v.clone() });
            return Ok((k, v));
        }
        let capacity = layer.as_ref().map_or(0, LayerKv::capacity);
        if total > capacity {
            let grown = (2 * capacity).max(total).max(MIN_KV_CAPACITY);
            let grown = self.reserve.map_or(grown, |r| grown.min(r.max(total)));
            let (heads, dim) = (k.dim(0)?, k.dim(2)?);
            let nk = Tensor::zeros((heads, grown, dim), DType::F32, k.device())?;
            let nv = Tensor::zeros((heads, grown, dim), v.dtype(), v.device())?;
            if let Some(old) = layer.take() {
                nk.slice_set(&old.k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                nv.slice_set(&old.v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
            *layer = Some(LayerKv { k: nk, v: nv });
        }
        let Some(kv) = layer.as_ref() else {
            return Err(candle_core::Error::Msg("KV cache layer missing after allocation".into()).into());
        };
        kv.k.slice_set(&k, 1, len)?;
        kv.v.slice_set(&v, 1, len)?;
        Ok((kv.k.narrow(1, 0, total)?, kv.v.narrow(1, 0, total)?))
    }
}

impl Model {
    /// Builds the model. Call [`crate::weights::check_tensors`] first for a clear error on a
    /// checkpoint that does not match the config.
    pub fn load(source: &dyn WeightSource, cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let weights = source.activation_dtype(dtype);
        // On the CPU, Ember's dense kernel reads f16/bf16 weights in place and sums in f32:
        // the activations (and the cache's values) then run in f32, as llama.cpp runs them.
        // In f16 every candle op on the CPU (norms, rope, softmax, the residual adds)
        // converted each value both ways: the 17-token SmolLM2 prefill took 0.81x
        // llama.cpp's time in f16 activations, against 1.00x for bf16 weights.
        let act = if device.is_cpu() && matches!(weights, DType::F16 | DType::BF16) && crate::linear::dense_kernels_on()
        {
            DType::F32
        } else {
            weights
        };
        let embed = source.linear("model.embed_tokens.weight", weights, device)?;
        // A tied head shares the embedding's weight (an `Arc`): the table is held once.
        let lm_head =
            if cfg.tie_word_embeddings { embed.clone() } else { source.linear("lm_head.weight", weights, device)? };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let m = |n: &str| -> Result<Linear> { source.linear(&format!("{p}.{n}.weight"), weights, device) };
            layers.push(Layer {
                input_norm: source.tensor(&format!("{p}.input_layernorm.weight"), act, device)?,
                q: m("self_attn.q_proj")?,
                k: m("self_attn.k_proj")?,
                v: m("self_attn.v_proj")?,
                o: m("self_attn.o_proj")?,
                post_norm: source.tensor(&format!("{p}.post_attention_layernorm.weight"), act, device)?,
                gate: m("mlp.gate_proj")?,
                up: m("mlp.up_proj")?,
                down: m("mlp.down_proj")?,
            });
        }
        let norm = source.tensor("model.norm.weight", act, device)?;
        let rope_factors = match source.shape("rope_freqs.weight") {
            Some(_) => Some(source.tensor("rope_freqs.weight", DType::F32, device)?.to_vec1::<f32>()?),
            None => None,
        };
        let rope = RopeTables::new(inv_freqs(cfg, rope_factors.as_deref()), cfg.max_position_embeddings, act, device)?;
        let mut model = Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rope,
            rope_interleaved: source.rope_interleaved(),
            dtype: act,
            device: device.clone(),
            fused_norm: device.is_cuda(),
            cpu: None,
        };
        model.set_cpu_forward(crate::linear::kernels_enabled())?;
        Ok(model)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype activations run in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs `tokens` (the next tokens of one sequence) through the model, appending their keys
    /// and values to `cache`, and returns the f32 logits of the last token. The one-sequence
    /// case of [`Model::forward_ragged`], so a sequence gets the same numbers alone or batched.
    pub fn forward(&self, tokens: &[u32], cache: &mut SeqCache) -> Result<Tensor> {
        Ok(self.forward_ragged(&[tokens], &mut [cache])?.squeeze(0)?)
    }

    /// Queries, keys and values of `x` `(1, t, hidden)` as heads `(1, heads, t, head_dim)`, with
    /// the rotary embedding of row `i` of `cos`/`sin` applied to row `i` of `x`: the rows may be
    /// consecutive positions of one sequence, or one token each of several sequences.
    fn project(&self, layer: &Layer, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let heads =
            |y: &Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) };
        let rope = |x: Tensor| -> Result<Tensor> {
            Ok(if self.rope_interleaved {
                candle_nn::rotary_emb::rope_i(&x, cos, sin)?
            } else {
                candle_nn::rotary_emb::rope(&x, cos, sin)?
            })
        };
        let [q, k, v]: [Tensor; 3] = Linear::forward_shared(&[&layer.q, &layer.k, &layer.v], x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("q, k and v projections: expected three outputs".into()))?;
        Ok((rope(heads(&q, nh)?)?, rope(heads(&k, nkv)?)?, heads(&v, nkv)?))
    }

    /// Attention of one sequence: its new queries `(1, heads, t, head_dim)` against its cache
    /// extended by the new keys and values `(1, kv_heads, t, head_dim)`. Grouped-query heads
    /// are matched by reshaping the queries (`kv_heads` groups of `heads / kv_heads`), not by
    /// copying the keys. Scores and softmax in f32 whatever the weights are: half precision
    /// there changes greedy answers. `l` is the layer. Returns `(1, t, heads * head_dim)`,
    /// before the output projection.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut SeqCache,
        l: usize,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let t = q.dim(2)?;
        // (1, nkv, t, hd) -> (nkv, t, hd): the cache's layout.
        let (k, v) = cache.append(l, &k.squeeze(0)?, &v.squeeze(0)?)?;
        let total = k.dim(1)?;
        let group = nh / nkv;
        // (1, nh, t, hd) -> (nkv, group * t, hd): the queries of each kv head's group together.
        let q = q.reshape((nkv, group * t, hd))?.to_dtype(DType::F32)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.reshape((nkv, group, t, total))?.broadcast_add(mask)?.reshape((nkv, group * t, total))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        let y = probs.matmul(&v)?;
        // (nkv, group * t, hd) -> (1, nh, t, hd) -> (1, t, nh * hd)
        Ok(y.reshape((1, nh, t, hd))?.transpose(1, 2)?.reshape((1, t, nh * hd))?)
    }

    /// One decode step for several sequences at once: `tokens[i]` is the next token of the
    /// sequence whose cache is `caches[i]`. See [`Model::forward_ragged`].
    pub fn forward_batch(&self, tokens: &[u32], caches: &mut [&mut SeqCache]) -> Result<Tensor> {
        let chunks: Vec<&[u32]> = tokens.chunks(1).collect();
        self.forward_ragged(&chunks, caches)
    }

    /// Runs several sequences in one pass: `chunks[i]` are the next tokens of the sequence
    /// whose cache is `caches[i]` (a whole prompt to prefill, or one token to decode), each at
    /// its own position. The projections, the rotary embedding and the MLP run on all rows of
    /// all sequences together, so the weights are read once per pass for the whole batch;
    /// attention runs per sequence, over that sequence's own cache. [`Model::forward`] is the
    /// one-sequence case. Returns the f32 logits of each sequence's last token,
    /// `(chunks.len(), vocab)`.
    ///
    /// On the CPU the pass runs inside candle's thread pool (`Device::with_context`): each
    /// of candle's parallel ops (softmax, norms, elementwise) called from outside that pool
    /// hands its work to a pool thread and sleeps on a futex until it is done, a wake-up per
    /// op, hundreds per token.
    pub fn forward_ragged(&self, chunks: &[&[u32]], caches: &mut [&mut SeqCache]) -> Result<Tensor> {
        self.device.with_context(|| self.forward_ragged_here(chunks, caches))
    }

    fn forward_ragged_here(&self, chunks: &[&[u32]], caches: &mut [&mut SeqCache]) -> Result<Tensor> {
        let b = chunks.len();
        if b != caches.len() || b == 0 || chunks.iter().any(|c| c.is_empty()) {
            return Err(candle_core::Error::Msg(format!(
                "forward_ragged needs one non-empty chunk per cache, got {b} chunks and {} caches",
                caches.len()
            ))
            .into());
        }
        if let Some(cpu) = self.cpu.as_ref().filter(|_| !self.fused_norm && caches.iter().all(|c| !c.concat)) {
            return self.forward_cpu(cpu, chunks, caches);
        }
        let tokens: Vec<u32> = chunks.concat();
        let rows = tokens.len();
        let ids = Tensor::new(tokens.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut x = self.embed.embedding(&ids)?.to_dtype(self.dtype)?;
        // Per sequence: its first row in the batch, its length, its mask; per row, its position.
        let mut spans = Vec::with_capacity(b);
        let mut positions = Vec::with_capacity(rows);
        let mut lasts = Vec::with_capacity(b);
        for (chunk, cache) in chunks.iter().zip(caches.iter_mut()) {
            if cache.layers.len() != self.layers.len() {
                cache.layers = (0..self.layers.len()).map(|_| None).collect();
            }
            let (start, t) = (cache.len, chunk.len());
            spans.push((positions.len(), t, self.mask(start, t)?));
            positions.extend((start..start + t).map(|p| p as u32));
            lasts.push(positions.len() as u32 - 1);
        }
        let (cos, sin) = self.rope.rows(positions.iter().max().map_or(0, |&p| p as usize + 1))?;
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = cos.index_select(&positions, 0)?;
        let sin = sin.index_select(&positions, 0)?;
        let width = self.cfg.num_attention_heads * self.cfg.head_dim;
        let eps = self.cfg.rms_norm_eps as f32;
        let first_norm = self.layers.first().map_or(&self.norm, |l| &l.input_norm);
        let mut h = candle_nn::ops::rms_norm(&x, first_norm, eps)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = self.project(layer, &h, &cos, &sin)?;
            let mut ys = Vec::with_capacity(b);
            for (cache, (at, t, mask)) in caches.iter_mut().zip(&spans) {
                let pick = |x: &Tensor| x.narrow(2, *at, *t);
                ys.push(self.attend(&pick(&q)?, &pick(&k)?, &pick(&v)?, mask.as_ref(), cache, l)?);
            }
            let y = Tensor::cat(&ys, 1)?.reshape((1, rows, width))?;
            (x, h) = self.add_norm(&x, &linear(&layer.o, &y)?, &layer.post_norm)?;
            let [gate, up]: [Tensor; 2] = Linear::forward_shared(&[&layer.gate, &layer.up], &h)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("gate and up projections: expected two outputs".into()))?;
            let mlp = ember_kernels::cpu::act::silu_mul_tensors(&gate, &up)?;
            // The residual add closes the layer; the norm after it is the next layer's input
            // norm, or the final norm after the last layer.
            let next_norm = self.layers.get(l + 1).map_or(&self.norm, |n| &n.input_norm);
            (x, h) = self.add_norm(&x, &linear(&layer.down, &mlp)?, next_norm)?;
        }
        for (cache, chunk) in caches.iter_mut().zip(chunks) {
            cache.len += chunk.len();
        }
        let lasts = Tensor::new(lasts.as_slice(), &self.device)?;
        let x = h.squeeze(0)?.index_select(&lasts, 0)?.unsqueeze(0)?;
        let logits = linear(&self.lm_head, &x)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// [`Model::forward_ragged`] on the CPU in f32, with every activation a plain row-major
    /// buffer (`rows x width`): the matmuls read and write them in place
    /// ([`Linear::forward_slice`]), q/k/v and gate/up each share one quantization of their
    /// input, and the rotary embedding, cache, attention ([`ember_kernels::cpu::attention`]),
    /// residual adds and norms ([`ember_kernels::cpu::rows`]) run on the rows between them.
    /// Through candle ops the same pass ran about 40 ops a layer, each allocating its output
    /// tensor: about 3 ms of a 17-token SmolLM2 prefill on this machine, which two threads do
    /// not shorten, against 12-19 ms for its matmuls.
    fn forward_cpu(&self, cpu: &CpuParts, chunks: &[&[u32]], caches: &mut [&mut SeqCache]) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let (hidden, qw, kw) = (self.cfg.hidden_size, nh * hd, nkv * hd);
        let eps = self.cfg.rms_norm_eps as f32;
        let tokens: Vec<u32> = chunks.concat();
        let rows = tokens.len();
        let ids = Tensor::new(tokens.as_slice(), &self.device)?;
        let mut x: Vec<f32> = self.embed.embedding(&ids)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        // Per sequence: its first row in the batch and its length; per row, its position.
        let (mut spans, mut positions, mut lasts) = (Vec::new(), Vec::with_capacity(rows), Vec::new());
        for (chunk, cache) in chunks.iter().zip(caches.iter_mut()) {
            if cache.cpu.len() != self.layers.len() {
                cache.cpu = (0..self.layers.len()).map(|_| KvLayer::new(nkv, hd)).collect();
            }
            spans.push((positions.len(), chunk.len()));
            positions.extend(cache.len..cache.len + chunk.len());
            lasts.push(positions.len() - 1);
        }
        let (cos, sin) = self.rope.rows(positions.iter().max().map_or(0, |&p| p + 1))?;
        let (cos_storage, cos_layout) = cos.storage_and_layout();
        let (sin_storage, sin_layout) = sin.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(cos)), Storage::Cpu(CpuStorage::F32(sin)), Some(c), Some(s)) =
            (&*cos_storage, &*sin_storage, cos_layout.contiguous_offsets(), sin_layout.contiguous_offsets())
        else {
            return Err(candle_core::Error::Msg("rotary tables are not contiguous f32 on the CPU".into()).into());
        };
        let rope = Rope { cos: &cos[c.0..c.1], sin: &sin[s.0..s.1], interleaved: self.rope_interleaved };
        let one = |out: Vec<Vec<f32>>, what: &str| -> Result<Vec<f32>> {
            out.into_iter().next().ok_or_else(|| candle_core::Error::Msg(format!("{what}: no output")).into())
        };
        let mut h = vec![0f32; x.len()];
        let first_norm = cpu.input_norms.first().unwrap_or(&cpu.norm);
        ember_kernels::cpu::rows::add_rms_norm(&mut x, None, first_norm, eps, &mut h);
        for (l, layer) in self.layers.iter().enumerate() {
            let [mut q, mut k, v]: [Vec<f32>; 3] = Linear::forward_slice(&[&layer.q, &layer.k, &layer.v], &h, rows)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("q, k and v projections: expected three outputs".into()))?;
            rope.apply(&mut q, nh, hd, &positions);
            rope.apply(&mut k, nkv, hd, &positions);
            let mut y = vec![0f32; rows * qw];
            for (cache, &(at, t)) in caches.iter_mut().zip(&spans) {
                let (len, reserve) = (cache.len, cache.reserve);
                let kv = &mut cache.cpu[l];
                let grown = (2 * len).max(len + t).max(MIN_KV_CAPACITY);
                let grown = reserve.map_or(grown, |r| grown.min(r.max(len + t)));
                kv.append(&k[at * kw..(at + t) * kw], &v[at * kw..(at + t) * kw], grown);
                let out = &mut y[at * qw..(at + t) * qw];
                attention::attend(&q[at * qw..(at + t) * qw], kv, len, nh, self.cfg.sliding_window, out);
            }
            let o = one(Linear::forward_slice(&[&layer.o], &y, rows)?, "output projection")?;
            ember_kernels::cpu::rows::add_rms_norm(&mut x, Some(&o), &cpu.post_norms[l], eps, &mut h);
            let [gate, up]: [Vec<f32>; 2] = Linear::forward_slice(&[&layer.gate, &layer.up], &h, rows)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("gate and up projections: expected two outputs".into()))?;
            let mut mlp = vec![0f32; gate.len()];
            ember_kernels::cpu::act::silu_mul(&gate, &up, &mut mlp);
            let down = one(Linear::forward_slice(&[&layer.down], &mlp, rows)?, "down projection")?;
            // The residual add closes the layer; the norm after it is the next layer's input
            // norm, or the final norm after the last layer.
            let next_norm = cpu.input_norms.get(l + 1).unwrap_or(&cpu.norm);
            ember_kernels::cpu::rows::add_rms_norm(&mut x, Some(&down), next_norm, eps, &mut h);
        }
        for (cache, chunk) in caches.iter_mut().zip(chunks) {
            cache.len += chunk.len();
        }
        let last: Vec<f32> = lasts.iter().flat_map(|&r| h[r * hidden..(r + 1) * hidden].iter().copied()).collect();
        let logits = one(Linear::forward_slice(&[&self.lm_head], &last, lasts.len())?, "output layer")?;
        let vocab = logits.len() / lasts.len();
        Ok(Tensor::from_vec(logits, (lasts.len(), vocab), &self.device)?)
    }

    /// Whether the forward pass runs on plain f32 rows (`Model::forward_cpu`): on by default on
    /// the CPU with f32 activations and Ember's kernels on; off runs candle's ops, to compare
    /// the two (as does [`Model::set_fused_norm`], an op of candle's path). A sequence's cache
    /// must not switch between the two.
    pub fn set_cpu_forward(&mut self, on: bool) -> Result<()> {
        self.cpu = if on && self.device.is_cpu() && self.dtype == DType::F32 {
            let values = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
            Some(CpuParts {
                input_norms: self.layers.iter().map(|l| values(&l.input_norm)).collect::<Result<_>>()?,
                post_norms: self.layers.iter().map(|l| values(&l.post_norm)).collect::<Result<_>>()?,
                norm: values(&self.norm)?,
            })
        } else {
            None
        };
        Ok(())
    }

    /// `(x + delta, rms_norm(x + delta) * weight)`: one fused kernel when [`Model::fused_norm`]
    /// is on (the default on CUDA), else candle's add and norm.
    fn add_norm(&self, x: &Tensor, delta: &Tensor, weight: &Tensor) -> Result<(Tensor, Tensor)> {
        let eps = self.cfg.rms_norm_eps as f32;
        if self.fused_norm {
            return Ok(ember_kernels::add_rms_norm_tensors(x, delta, weight, eps)?);
        }
        let sum = (x + delta)?;
        let normed = candle_nn::ops::rms_norm(&sum, weight, eps)?;
        Ok((sum, normed))
    }

    /// Whether the residual add and the RMSNorm after it run as one fused op
    /// ([`ember_kernels::add_rms_norm_tensors`]). On by default on CUDA, where it saves a kernel
    /// launch and a round trip of the activations through memory per norm; off on the CPU,
    /// where candle's ops are as fast. Either way the numbers are the same up to rounding.
    pub fn set_fused_norm(&mut self, on: bool) {
        self.fused_norm = on;
    }

    /// See [`Model::set_fused_norm`].
    pub fn fused_norm(&self) -> bool {
        self.fused_norm
    }

    /// Additive mask for `t` new tokens after `start` cached ones: causal, and limited to the
    /// sliding window where the model has one. None when nothing needs masking.
    fn mask(&self, start: usize, t: usize) -> Result<Option<Tensor>> {
        let window = self.cfg.sliding_window.unwrap_or(usize::MAX);
        let total = start + t;
        if t == 1 && total <= window {
            return Ok(None);
        }
        let mut m = vec![0f32; t * total];
        for i in 0..t {
            let pos = start + i;
            for j in 0..total {
                if j > pos || pos - j >= window {
                    m[i * total + j] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(m, (t, total), &self.device)?))
    }
}

/// `x (b, t, in)` through a linear layer `(out, in)` (see [`Linear::forward`]).
fn linear(w: &Linear, x: &Tensor) -> Result<Tensor> {
    w.forward(x)
}

/// Inverse frequencies of the rotary embedding, with Llama 3 scaling or GGUF `rope_freqs`.
pub fn inv_freqs(cfg: &ModelConfig, rope_factors: Option<&[f32]>) -> Vec<f64> {
    let d = cfg.head_dim;
    let mut f: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64)).collect();
    if let Some(factors) = rope_factors {
        for (f, k) in f.iter_mut().zip(factors) {
            *f /= *k as f64;
        }
    } else if let Some(s) = &cfg.rope_scaling {
        f = f.into_iter().map(|f| llama3_scale(f, s)).collect();
    }
    f
}

fn llama3_scale(freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

/// The rotary tables, `cos` and `sin` rows by position, made as far as positions are asked
/// for: a long context is not paid for at load (131,072 positions for Llama 3.1 would be 67 MB
/// of f32 tables, fresh memory at every start, where a start needs a few thousand rows).
struct RopeTables {
    freqs: Vec<f64>,
    /// The context: the most rows the tables hold.
    limit: usize,
    dtype: DType,
    device: Device,
    tables: std::sync::RwLock<(Tensor, Tensor)>,
}

/// Rows made at load; a forward pass that reaches past the rows made doubles them (or more).
const ROPE_ROWS_AT_LOAD: usize = 4096;

impl RopeTables {
    fn new(freqs: Vec<f64>, limit: usize, dtype: DType, device: &Device) -> Result<Self> {
        let tables = Self::make(&freqs, limit.min(ROPE_ROWS_AT_LOAD), dtype, device)?;
        Ok(Self { freqs, limit, dtype, device: device.clone(), tables: std::sync::RwLock::new(tables) })
    }

    fn make(freqs: &[f64], n: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = rope_angles(freqs, n);
        let half = freqs.len();
        let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// The tables with at least `rows` rows (at most the context: positions past it fail
    /// where they are looked up, as with a table of the whole context).
    fn rows(&self, rows: usize) -> Result<(Tensor, Tensor)> {
        let want = rows.min(self.limit);
        let poisoned = || candle_core::Error::Msg("the rotary tables' lock was poisoned".into());
        {
            let tables = self.tables.read().map_err(|_| poisoned())?;
            if tables.0.dim(0)? >= want {
                return Ok(tables.clone());
            }
        }
        let mut tables = self.tables.write().map_err(|_| poisoned())?;
        let held = tables.0.dim(0)?;
        if held < want {
            *tables = Self::make(&self.freqs, want.max(2 * held).min(self.limit), self.dtype, &self.device)?;
        }
        Ok(tables.clone())
    }
}

/// `cos(p f)` and `sin(p f)` for positions `0..n` (rows) and each frequency `f` (columns).
///
/// One position to the next is a rotation by `f` (the angle-addition formulas, in f64), with
/// the exact value taken again every [`ROPE_EXACT_EVERY`] positions: a table of 8,192
/// positions is half a million sines and cosines, about 7 ms of a cold start's last step when
/// each is computed on its own. Between exact values the f64 error stays around 1e-14, far
/// below the f32 the table is stored in.
fn rope_angles(freqs: &[f64], n: usize) -> (Vec<f32>, Vec<f32>) {
    let half = freqs.len();
    let steps: Vec<(f64, f64)> = freqs.iter().map(|f| f.sin_cos()).collect();
    let mut at: Vec<(f64, f64)> = vec![(0.0, 1.0); half];
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for ((f, (s, c)), (step_sin, step_cos)) in freqs.iter().zip(&mut at).zip(&steps) {
            (*s, *c) = if p % ROPE_EXACT_EVERY == 0 {
                (p as f64 * f).sin_cos()
            } else {
                (*s * step_cos + *c * step_sin, *c * step_cos - *s * step_sin)
            };
            cos.push(*c as f32);
            sin.push(*s as f32);
        }
    }
    (cos, sin)
}

/// How often [`rope_angles`] computes a position's angles exactly.
const ROPE_EXACT_EVERY: usize = 32;

/// Undoes llama.cpp's reordering of q/k projection rows (`heads` is the number of heads of
/// that projection): llama.cpp pairs rotary dimensions as neighbours, Hugging Face as halves.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The token with the highest logit of a `(vocab,)` tensor; ties go to the lowest id, as in
/// `torch.argmax` (`ember_kernels::sampling::argmax`, Ember's one argmax).
pub fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(ember_kernels::sampling::argmax(&logits.to_dtype(DType::F32)?.to_vec1::<f32>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rotary tables are made to the rows a forward pass asks for (doubling, never past the
    /// context), and their rows are those of a table of the whole context made at once.
    #[test]
    fn rope_tables_grow_to_the_rows_asked_for_and_no_further() -> Result<()> {
        let freqs: Vec<f64> = (0..32).map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / 64.0)).collect();
        let limit = 3 * ROPE_ROWS_AT_LOAD;
        let rope = RopeTables::new(freqs.clone(), limit, DType::F32, &Device::Cpu)?;
        let (whole_cos, whole_sin) = rope_angles(&freqs, limit);
        // (rows asked for, rows held after): made at load, doubled, grown past a doubling,
        // capped at the context.
        for (asked, held) in [
            (1, ROPE_ROWS_AT_LOAD),
            (ROPE_ROWS_AT_LOAD, ROPE_ROWS_AT_LOAD),
            (ROPE_ROWS_AT_LOAD + 1, 2 * ROPE_ROWS_AT_LOAD),
            (limit - 1, limit),
            (limit + 10, limit),
        ] {
            let (cos, sin) = rope.rows(asked)?;
            assert_eq!(cos.dims(), [held, freqs.len()], "asked for {asked}");
            // Each row is the same whatever the table's length.
            assert_eq!(cos.flatten_all()?.to_vec1::<f32>()?, whole_cos[..held * freqs.len()], "asked for {asked}");
            assert_eq!(sin.flatten_all()?.to_vec1::<f32>()?, whole_sin[..held * freqs.len()], "asked for {asked}");
        }
        Ok(())
    }

    /// The rotated table against each angle's own sine and cosine, over the head sizes and
    /// bases of SmolLM2, Llama 2 and Llama 3, at positions well past the first exact reseed.
    #[test]
    fn rope_table_matches_each_angle_computed_alone() {
        for (theta, head_dim, n) in
            [(100_000.0f64, 64usize, 8192usize), (10_000.0, 128, 4096), (500_000.0, 128, 32_768)]
        {
            let freqs: Vec<f64> =
                (0..head_dim / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)).collect();
            let (cos, sin) = rope_angles(&freqs, n);
            assert_eq!((cos.len(), sin.len()), (n * freqs.len(), n * freqs.len()));
            let mut worst = 0f32;
            for p in 0..n {
                for (i, f) in freqs.iter().enumerate() {
                    let (s, c) = (p as f64 * f).sin_cos();
                    worst = worst.max((cos[p * freqs.len() + i] - c as f32).abs());
                    worst = worst.max((sin[p * freqs.len() + i] - s as f32).abs());
                }
            }
            // One f32 rounding step at most (values up to 1: 2^-24 ~ 6e-8).
            assert!(worst <= 6e-8, "theta {theta}, head_dim {head_dim}: worst difference {worst:e}");
        }
    }
}
