//! Fused residual add + RMSNorm: `sum = x + residual`, `normed = sum / rms(sum) * weight`, in
//! one pass over each row instead of candle's separate add and norm kernels (each of which
//! reads and writes the whole activation).
//!
//! This is the CPU reference of the CUDA kernel. Each row's mean square is reduced in f32 in
//! index order; a CUDA block reduces it as a tree, so the two agree within float rounding, not
//! bit for bit (the tests allow for that).

/// Answers `(sum, normed)`, both `rows x hidden` row-major.
pub fn add_rms_norm(x: &[f32], residual: &[f32], weight: &[f32], eps: f32) -> Result<(Vec<f32>, Vec<f32>), NormError> {
    let hidden = weight.len();
    if hidden == 0 || x.len() != residual.len() || !x.len().is_multiple_of(hidden) {
        return Err(NormError::Shape { x: x.len(), residual: residual.len(), hidden });
    }
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(NormError::Eps(eps));
    }
    let sum: Vec<f32> = x.iter().zip(residual).map(|(a, b)| a + b).collect();
    let mut normed = Vec::with_capacity(sum.len());
    for row in sum.chunks(hidden) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        normed.extend(row.iter().zip(weight).map(|(v, w)| v * scale * w));
    }
    Ok((sum, normed))
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NormError {
    #[error("x has {x} values and residual {residual}; both must be whole rows of {hidden}")]
    Shape { x: usize, residual: usize, hidden: usize },
    #[error("eps must be positive and finite, got {0}")]
    Eps(f32),
}

/// The fused op on candle tensors: answers `(x + residual, rms_norm(x + residual) * weight)`
/// with `x` and `residual` of shape `(..., hidden)` and `weight` of shape `(hidden,)`.
///
/// On the CPU it runs [`add_rms_norm`] (math in f32 whatever the dtype); on CUDA (with the
/// `cuda` feature) the `add_rms_norm_*` kernel, one block per row, one read of each input and
/// one write of each output, where candle runs an add and a norm kernel.
pub fn add_rms_norm_tensors(
    x: &candle_core::Tensor,
    residual: &candle_core::Tensor,
    weight: &candle_core::Tensor,
    eps: f32,
) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor)> {
    let both = x.contiguous()?.apply_op3_no_bwd(&residual.contiguous()?, &weight.contiguous()?, &AddRmsNorm { eps })?;
    Ok((both.get(0)?, both.get(1)?))
}

/// The candle custom op behind [`add_rms_norm_tensors`]; its output is `(2, ...x's shape)`:
/// the sums, then the normed values.
struct AddRmsNorm {
    eps: f32,
}

impl AddRmsNorm {
    /// Rows and hidden size, after checking the shapes and that each input is contiguous.
    fn dims(
        &self,
        l1: &candle_core::Layout,
        l2: &candle_core::Layout,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(usize, usize, candle_core::Shape)> {
        let hidden = l3.shape().elem_count();
        let n = l1.shape().elem_count();
        if l3.shape().rank() != 1 || l1.shape() != l2.shape() || l1.shape().dims().last() != Some(&hidden) {
            candle_core::bail!(
                "add_rms_norm: x {:?} and residual {:?} must have the same shape, ending in the weight's {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        if !(l1.is_contiguous() && l2.is_contiguous() && l3.is_contiguous()) {
            candle_core::bail!("add_rms_norm: inputs must be contiguous");
        }
        let mut dims = vec![2];
        dims.extend_from_slice(l1.shape().dims());
        Ok((n / hidden.max(1), hidden, candle_core::Shape::from(dims)))
    }
}

impl candle_core::CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "ember-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as C;
        let (_, _, shape) = self.dims(l1, l2, l3)?;
        let part = |s: &C, l: &candle_core::Layout| -> candle_core::Result<Vec<f32>> {
            let (a, b) = (l.start_offset(), l.start_offset() + l.shape().elem_count());
            Ok(match s {
                C::F32(v) => v[a..b].to_vec(),
                C::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
                C::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
                _ => candle_core::bail!("add_rms_norm: unsupported dtype: use f32, f16 or bf16"),
            })
        };
        let (x, r, w) = (part(s1, l1)?, part(s2, l2)?, part(s3, l3)?);
        // The sum is rounded to the storage dtype before the norm reads it, as in candle's
        // separate add; for f32 that is a no-op.
        let round: fn(f32) -> f32 = match s1 {
            C::F16(_) => |v| half::f16::from_f32(v).to_f32(),
            C::BF16(_) => |v| half::bf16::from_f32(v).to_f32(),
            _ => |v| v,
        };
        let summed: Vec<f32> = x.iter().zip(&r).map(|(a, b)| round(a + b)).collect();
        let zeros = vec![0.0; summed.len()];
        let (sum, normed) = add_rms_norm(&summed, &zeros, &w, self.eps).map_err(candle_core::Error::wrap)?;
        let all = sum.into_iter().chain(normed);
        let out = match s1 {
            C::F16(_) => C::F16(all.map(half::f16::from_f32).collect()),
            C::BF16(_) => C::BF16(all.map(half::bf16::from_f32).collect()),
            _ => C::F32(all.collect()),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CudaStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let (rows, hidden, shape) = self.dims(l1, l2, l3)?;
        let out = match s1.dtype() {
            candle_core::DType::F32 => {
                crate::cuda::add_rms_norm::<f32>("add_rms_norm_f32", s1, l1, s2, l2, s3, l3, rows, hidden, self.eps)?
            }
            candle_core::DType::F16 => crate::cuda::add_rms_norm::<half::f16>(
                "add_rms_norm_f16",
                s1,
                l1,
                s2,
                l2,
                s3,
                l3,
                rows,
                hidden,
                self.eps,
            )?,
            candle_core::DType::BF16 => crate::cuda::add_rms_norm::<half::bf16>(
                "add_rms_norm_bf16",
                s1,
                l1,
                s2,
                l2,
                s3,
                l3,
                rows,
                hidden,
                self.eps,
            )?,
            other => candle_core::bail!("add_rms_norm: unsupported dtype {other:?}"),
        };
        Ok((out, shape))
    }
}
