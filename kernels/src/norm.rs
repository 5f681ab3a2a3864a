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
