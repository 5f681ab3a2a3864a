//! Launching the kernels of `src/cuda/ember.cu` through candle's cudarc (so there is one CUDA
//! context and one stream, candle's). Only with the `cuda` feature.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Device, Layout, Storage, Tensor};

use crate::sampling::{check_params, distinct, id_bits, RowParams, RowResult, SampleError};

/// The PTX nvcc built from `src/cuda/ember.cu` (see build.rs).
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ember.ptx"));
const MODULE: &str = "ember-kernels";
const BLOCK: u32 = 1024;

/// The first CUDA device, when this machine has a working driver and a GPU; None otherwise
/// (the tests print that the GPU run did not happen).
pub fn first_device() -> Option<Device> {
    use candle_core::cuda_backend::cudarc::driver::{result, CudaContext};
    result::init().ok()?;
    if CudaContext::device_count().ok()? < 1 {
        return None;
    }
    Device::new_cuda(0).ok()
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn add_rms_norm<T: CudaDType + DeviceRepr>(
    kernel: &str,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    rows: usize,
    hidden: usize,
    eps: f32,
) -> candle_core::Result<CudaStorage> {
    let dev = &s1.device;
    let range = |l: &Layout| l.start_offset()..l.start_offset() + l.shape().elem_count();
    let x = s1.as_cuda_slice::<T>()?.slice(range(l1));
    let r = s2.as_cuda_slice::<T>()?.slice(range(l2));
    let w = s3.as_cuda_slice::<T>()?.slice(range(l3));
    // SAFETY: every element of `out` is written by the kernel before anything reads it: each
    // of the `rows` blocks writes its row of sums and its row of normed values.
    let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(2 * rows * hidden)? };
    let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
    let hidden_i = i32::try_from(hidden).map_err(candle_core::Error::wrap)?;
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&r);
    b.arg(&w);
    b.arg(&mut out);
    b.arg(&hidden_i);
    b.arg(&eps);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the argument list matches the kernel's signature (three input pointers of
    // `rows * hidden`, `rows * hidden` and `hidden` elements of T, one output of
    // `2 * rows * hidden`, an int and a float), and the grid has one block per row.
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// One row's settings as the kernel's `struct RowParams` lays them out.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GpuRowParams {
    temperature: f32,
    top_k: i32,
    top_p: f32,
    repetition_penalty: f32,
    seed: u64,
}

// SAFETY: a plain `repr(C)` struct of numbers with the same field order, sizes and alignment
// as the CUDA struct (4 + 4 + 4 + 4 bytes, then an 8-byte integer at offset 16), so any bit
// pattern copied to the device is a valid value there.
unsafe impl DeviceRepr for GpuRowParams {}

/// [`crate::sampling::sample_batch`] on a CUDA tensor of logits `(rows, vocab)`: one kernel
/// launch for the batch; only one 8-byte answer per row (a token id, or where its first
/// non-finite logit is) comes back to the host, in one copy, so the step synchronizes once.
/// A row with bad settings or a non-finite logit is that row's error alone.
pub fn sample_batch_cuda(
    logits: &Tensor,
    params: &[RowParams],
    seen: &[&[u32]],
    step: u64,
) -> Result<Vec<RowResult>, SampleError> {
    let dev_err = |e: candle_core::Error| SampleError::Device(e.to_string());
    let (rows, vocab) = logits.dims2().map_err(dev_err)?;
    if rows != params.len() || rows != seen.len() || vocab == 0 {
        return Err(SampleError::Shape { len: rows * vocab, rows: params.len(), vocab });
    }
    let mut gpu_params = Vec::with_capacity(rows);
    let mut bad_params = Vec::with_capacity(rows);
    for (row, p) in params.iter().enumerate() {
        // A row with bad settings runs greedy in the launch and answers its error.
        let checked = check_params(row, p);
        let p = if checked.is_ok() { *p } else { RowParams::greedy() };
        bad_params.push(checked.err());
        gpu_params.push(GpuRowParams {
            temperature: p.temperature,
            top_k: i32::try_from(p.top_k.min(vocab)).unwrap_or(i32::MAX),
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
        });
    }
    let mut offsets = vec![0i32];
    let mut ids = Vec::new();
    for s in seen {
        ids.extend(distinct(s));
        offsets.push(i32::try_from(ids.len()).map_err(|e| SampleError::Device(e.to_string()))?);
    }
    if ids.is_empty() {
        ids.push(0); // no zero-length allocation; the offsets say nothing is seen
    }
    let id_bits = i32::try_from(id_bits(vocab)).map_err(|e| SampleError::Device(e.to_string()))?;
    let logits = logits.to_dtype(DType::F32).and_then(|t| t.contiguous()).map_err(dev_err)?;
    let (guard, layout) = logits.storage_and_layout();
    let Storage::Cuda(storage) = &*guard else {
        return Err(SampleError::Device("sample_batch_cuda needs logits on a CUDA device".into()));
    };
    let launch = || -> candle_core::Result<Vec<i64>> {
        let dev = &storage.device;
        let src = storage.as_cuda_slice::<f32>()?;
        let src = src.slice(layout.start_offset()..layout.start_offset() + rows * vocab);
        // SAFETY: the first rows x vocab floats are written by the copy just below before the
        // kernel reads them; the kernel writes each of the second rows x vocab (the masses)
        // before it reads it.
        let mut work = unsafe { dev.alloc::<f32>(2 * rows * vocab)? };
        dev.memcpy_dtod(&src, &mut work.slice_mut(0..rows * vocab))?;
        let d_params = dev.clone_htod(&gpu_params)?;
        let d_offsets = dev.clone_htod(&offsets)?;
        let d_ids = dev.clone_htod(&ids)?;
        let mut out = dev.alloc_zeros::<i64>(rows)?;
        let func = dev.get_or_load_custom_func("sample_rows", MODULE, PTX)?;
        let vocab_i = i32::try_from(vocab).map_err(candle_core::Error::wrap)?;
        let mut b = func.builder();
        b.arg(&mut work);
        b.arg(&vocab_i);
        b.arg(&id_bits);
        b.arg(&d_params);
        b.arg(&d_offsets);
        b.arg(&d_ids);
        b.arg(&step);
        b.arg(&mut out);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match `sample_rows`: `work` holds 2 x rows x vocab floats, the
        // params and offsets have rows and rows + 1 entries, every offset is within `ids`,
        // `id_bits` is wide enough for every id below `vocab`, and `out` has one entry per row;
        // one block of BLOCK (the kernel's launch bound) threads per row.
        unsafe { b.launch(cfg) }.w()?;
        dev.clone_dtoh(&out)
    };
    let out = launch().map_err(dev_err)?;
    drop(guard);
    let answer = |(row, (code, bad)): (usize, (i64, Option<SampleError>))| -> RowResult {
        if let Some(e) = bad {
            return Err(e);
        }
        match u32::try_from(code) {
            Ok(token) => Ok(token),
            Err(_) => {
                let index = usize::try_from(-(code + 1)).unwrap_or(0);
                // Only on this error path: one more copy, of the bad value.
                let value =
                    logits.get(row).and_then(|r| r.get(index)).and_then(|v| v.to_scalar::<f32>()).unwrap_or(f32::NAN);
                Err(SampleError::NonFinite { row, index, value })
            }
        }
    };
    Ok(out.into_iter().zip(bad_params).enumerate().map(answer).collect())
}
