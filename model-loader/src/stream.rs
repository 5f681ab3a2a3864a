//! Loading safetensors weights straight onto the device as the bytes arrive.
//!
//! The S3 parts of each weights file are requested in parallel but consumed in file order
//! ([`futures::StreamExt::buffered`]), so one pass over the bytes can hash them for the
//! manifest and route them to their tensors: [`SafetensorsStream`] parses the header from the
//! first bytes, then hands each tensor's bytes to a [`TensorSink`]. On CUDA the sink is
//! `CudaSink` (with the `cuda` feature): each part goes through a small ring of pinned host
//! buffers and an asynchronous host-to-device copy into the tensor's device memory, so
//! downloads, hashing and copies overlap and no full copy of the model is ever held in host
//! memory (only the parts in flight). [`HostSink`] is the same path on the CPU; the tests run
//! it against moto S3.

use std::collections::HashMap;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};

use crate::error::{LoadError, Result};
use crate::weights::WeightSource;

/// Receives tensors' bytes, in any order within a tensor.
pub trait TensorSink: Send {
    /// A tensor is about to arrive; its index is the number of `begin` calls before it.
    fn begin(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Result<()>;
    /// `bytes` at byte `offset` of tensor `index`.
    fn write(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<()>;
    /// Every byte was written: the tensors, by name, on the sink's device.
    fn finish(&mut self) -> Result<HashMap<String, Tensor>>;
}

/// Largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// One tensor's place in a file's data section.
#[derive(Debug, Clone)]
struct Slot {
    start: u64,
    end: u64,
    index: usize,
}

enum State {
    /// Collecting the 8-byte header length, then the header.
    Header(Vec<u8>),
    /// Routing data bytes; `pos` is the offset in the data section.
    Data { pos: u64, next: usize },
}

/// An incremental safetensors parser: feed it the file's bytes in order.
pub struct SafetensorsStream {
    file: String,
    state: State,
    slots: Vec<Slot>,
    data_len: u64,
}

impl SafetensorsStream {
    pub fn new(file: &str) -> Self {
        Self { file: file.into(), state: State::Header(Vec::new()), slots: Vec::new(), data_len: 0 }
    }

    fn bad(&self, message: impl Into<String>) -> LoadError {
        LoadError::BadWeights { file: self.file.clone(), message: message.into() }
    }

    /// The next bytes of the file.
    pub fn feed(&mut self, mut bytes: &[u8], sink: &mut dyn TensorSink) -> Result<()> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Header(buf) => {
                    let want = if buf.len() < 8 {
                        8
                    } else {
                        let mut len = [0u8; 8];
                        len.copy_from_slice(&buf[..8]);
                        let n = u64::from_le_bytes(len);
                        if n == 0 || n > MAX_HEADER {
                            let file = self.file.clone();
                            return Err(LoadError::BadWeights {
                                file,
                                message: format!(
                                    "a header of {n} bytes: not a safetensors file (0 bytes) or over the 100 MB limit"
                                ),
                            });
                        }
                        8 + n as usize
                    };
                    let take = (want - buf.len()).min(bytes.len());
                    buf.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if buf.len() == want && want > 8 {
                        let header = std::mem::take(buf);
                        self.parse_header(&header[8..], sink)?;
                        self.state = State::Data { pos: 0, next: 0 };
                    }
                }
                State::Data { pos, next } => {
                    let end = *pos + bytes.len() as u64;
                    if end > self.data_len {
                        return Err(self.bad(format!("more bytes than the header's {} of data", self.data_len)));
                    }
                    // Each slot overlapping [pos, end) gets its part; slots are in file order.
                    while let Some(slot) = self.slots.get(*next) {
                        if slot.start >= end {
                            break;
                        }
                        let from = slot.start.max(*pos);
                        let to = slot.end.min(end);
                        if from < to {
                            let chunk = &bytes[(from - *pos) as usize..(to - *pos) as usize];
                            sink.write(slot.index, (from - slot.start) as usize, chunk)?;
                        }
                        if slot.end <= end {
                            *next += 1;
                        } else {
                            break;
                        }
                    }
                    *pos = end;
                    bytes = &[];
                }
            }
        }
        Ok(())
    }

    /// How many tensors the header listed (0 before the header is in).
    pub fn tensor_count(&self) -> usize {
        self.slots.len()
    }

    /// The file ended: every tensor's bytes must have arrived.
    pub fn finish(&self) -> Result<()> {
        match &self.state {
            State::Data { pos, .. } if *pos == self.data_len => Ok(()),
            State::Data { pos, .. } => {
                Err(self.bad(format!("truncated: {pos} of {} data bytes arrived", self.data_len)))
            }
            State::Header(_) => Err(self.bad("truncated: the file ended inside its header")),
        }
    }

    fn parse_header(&mut self, header: &[u8], sink: &mut dyn TensorSink) -> Result<()> {
        #[derive(serde::Deserialize)]
        struct Info {
            dtype: String,
            shape: Vec<usize>,
            data_offsets: (u64, u64),
        }
        let raw: HashMap<String, serde_json::Value> =
            serde_json::from_slice(header).map_err(|e| self.bad(format!("header: {e}")))?;
        let mut infos = Vec::with_capacity(raw.len());
        for (name, value) in raw {
            if name == "__metadata__" {
                continue;
            }
            let info: Info = serde_json::from_value(value).map_err(|e| self.bad(format!("tensor {name}: {e}")))?;
            infos.push((name, info));
        }
        infos.sort_by_key(|(_, i)| i.data_offsets.0);
        for (name, info) in infos {
            let (dtype, size) = match info.dtype.as_str() {
                "F32" => (DType::F32, 4),
                "F16" => (DType::F16, 2),
                "BF16" => (DType::BF16, 2),
                other => {
                    return Err(LoadError::BadTensorDtype {
                        name: format!("{name} (in {})", self.file),
                        dtype: other.into(),
                    })
                }
            };
            let (start, end) = info.data_offsets;
            let want = info.shape.iter().product::<usize>() as u64 * size;
            if end < start || end - start != want {
                return Err(self.bad(format!(
                    "tensor {name}: {} bytes for shape {:?}",
                    end.wrapping_sub(start),
                    info.shape
                )));
            }
            sink.begin(&name, dtype, &info.shape)?;
            let index = self.slots.len();
            self.data_len = self.data_len.max(end);
            self.slots.push(Slot { start, end, index });
        }
        Ok(())
    }
}

/// Tensors collected in host memory, then put on `device`: the CPU reference of
/// `CudaSink` (on the CPU, the tensors are built from the bytes as they are).
pub struct HostSink {
    device: Device,
    tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)>,
}

impl HostSink {
    pub fn new(device: &Device) -> Self {
        Self { device: device.clone(), tensors: Vec::new() }
    }
}

impl TensorSink for HostSink {
    fn begin(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Result<()> {
        let n = shape.iter().product::<usize>() * dtype.size_in_bytes();
        self.tensors.push((name.into(), dtype, shape.to_vec(), vec![0; n]));
        Ok(())
    }

    fn write(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        let Some((name, _, _, buf)) = self.tensors.get_mut(index) else {
            return Err(LoadError::BadConfig(format!("tensor index {index} was never begun")));
        };
        let Some(dst) = buf.get_mut(offset..offset + bytes.len()) else {
            return Err(LoadError::BadConfig(format!("write past the end of tensor {name}")));
        };
        dst.copy_from_slice(bytes);
        Ok(())
    }

    fn finish(&mut self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(self.tensors.len());
        for (name, dtype, shape, bytes) in self.tensors.drain(..) {
            out.insert(name, Tensor::from_raw_buffer(&bytes, dtype, &shape, &self.device)?);
        }
        Ok(out)
    }
}

/// A file's view of a sink shared by several files: each file's parser numbers its tensors
/// from 0; the sink's indices run on across files.
pub(crate) struct Offset<'a> {
    pub sink: &'a mut dyn TensorSink,
    pub base: usize,
}

impl TensorSink for Offset<'_> {
    fn begin(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Result<()> {
        self.sink.begin(name, dtype, shape)
    }
    fn write(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        self.sink.write(self.base + index, offset, bytes)
    }
    fn finish(&mut self) -> Result<HashMap<String, Tensor>> {
        self.sink.finish()
    }
}

/// Weights already on the device, as a [`TensorSink`] delivered them.
pub struct PreloadedWeights {
    tensors: HashMap<String, Tensor>,
}

impl PreloadedWeights {
    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Self { tensors }
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| LoadError::MissingTensor { name: name.into() })
    }
}

impl WeightSource for PreloadedWeights {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }

    fn matmul(&self, name: &str, dtype: DType, device: &Device) -> Result<QMatMul> {
        Ok(QMatMul::Tensor(self.tensor(name, dtype, device)?))
    }

    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(self.get(name)?.to_device(device)?.to_dtype(dtype)?)
    }

    fn rope_interleaved(&self) -> bool {
        false
    }
}

#[cfg(feature = "cuda")]
pub use cuda::CudaSink;

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::HashMap;
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{
        result, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, PinnedHostSlice,
    };
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{CudaStorage, DType, Device, Storage, Tensor};

    use super::TensorSink;
    use crate::error::{LoadError, Result};

    /// Pinned staging buffers in the ring, and the size of each.
    const STAGING_BUFFERS: usize = 4;
    const STAGING_BYTES: usize = 8 << 20;

    enum Buf {
        F32(CudaSlice<f32>),
        F16(CudaSlice<half::f16>),
        BF16(CudaSlice<half::bf16>),
    }

    /// Tensors allocated in device memory and filled by asynchronous copies from a ring of
    /// pinned host buffers (pinned memory is what lets the copy run while the host goes on).
    pub struct CudaSink {
        device: CudaDevice,
        stream: Arc<CudaStream>,
        tensors: Vec<(String, Vec<usize>, Buf)>,
        staging: Vec<(PinnedHostSlice<u8>, Option<CudaEvent>)>,
        next: usize,
    }

    // SAFETY: the sink is used by one thread at a time (every method takes &mut self); the
    // pinned buffers and device slices it owns are plain allocations of the CUDA context,
    // which the driver allows any thread to use once the context is bound (cudarc binds it).
    unsafe impl Send for CudaSink {}

    fn cuda_err(e: impl std::fmt::Display) -> LoadError {
        LoadError::Device(format!("loading weights into GPU memory: {e}"))
    }

    impl CudaSink {
        pub fn new(device: &Device) -> Result<Self> {
            let Device::Cuda(dev) = device else {
                return Err(LoadError::Device("CudaSink needs a CUDA device".into()));
            };
            let stream = dev.cuda_stream();
            let mut staging = Vec::with_capacity(STAGING_BUFFERS);
            for _ in 0..STAGING_BUFFERS {
                // SAFETY: the buffer is only read by copies issued after bytes were written
                // into it (see `write`); its initial contents are never read.
                let buf = unsafe { stream.context().alloc_pinned::<u8>(STAGING_BYTES) }.map_err(cuda_err)?;
                staging.push((buf, None));
            }
            Ok(Self { device: dev.clone(), stream, tensors: Vec::new(), staging, next: 0 })
        }
    }

    impl TensorSink for CudaSink {
        fn begin(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Result<()> {
            let n: usize = shape.iter().product();
            // SAFETY: every byte of the allocation is written by `write` before `finish` hands
            // the tensor out (the safetensors parser checks the file covered all the data).
            let buf = unsafe {
                match dtype {
                    DType::F32 => Buf::F32(self.device.alloc::<f32>(n).map_err(cuda_err)?),
                    DType::F16 => Buf::F16(self.device.alloc::<half::f16>(n).map_err(cuda_err)?),
                    DType::BF16 => Buf::BF16(self.device.alloc::<half::bf16>(n).map_err(cuda_err)?),
                    other => return Err(LoadError::BadTensorDtype { name: name.into(), dtype: format!("{other:?}") }),
                }
            };
            self.tensors.push((name.into(), shape.to_vec(), buf));
            Ok(())
        }

        fn write(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<()> {
            let stream = self.stream.clone();
            let Some((name, _, buf)) = self.tensors.get_mut(index) else {
                return Err(LoadError::BadConfig(format!("tensor index {index} was never begun")));
            };
            let len = match buf {
                Buf::F32(s) => s.len() * 4,
                Buf::F16(s) => s.len() * 2,
                Buf::BF16(s) => s.len() * 2,
            };
            let base = match buf {
                Buf::F32(s) => s.device_ptr_mut(&stream).0,
                Buf::F16(s) => s.device_ptr_mut(&stream).0,
                Buf::BF16(s) => s.device_ptr_mut(&stream).0,
            };
            if offset + bytes.len() > len {
                return Err(LoadError::BadConfig(format!("write past the end of tensor {name}")));
            }
            let mut at = offset;
            for chunk in bytes.chunks(STAGING_BYTES) {
                let (pinned, done) = &mut self.staging[self.next];
                self.next = (self.next + 1) % STAGING_BUFFERS;
                // The copy that last read this buffer must be over before it is refilled.
                if let Some(event) = done.take() {
                    event.synchronize().map_err(cuda_err)?;
                }
                let host = pinned.as_mut_slice().map_err(cuda_err)?;
                host[..chunk.len()].copy_from_slice(chunk);
                // SAFETY: the destination range [base + at, base + at + len) lies inside the
                // tensor's allocation (checked above); the source is pinned memory that stays
                // untouched until the event recorded after the copy completes.
                unsafe {
                    result::memcpy_htod_async(base + at as u64, &host[..chunk.len()], stream.cu_stream())
                        .map_err(cuda_err)?;
                }
                *done = Some(stream.record_event(None).map_err(cuda_err)?);
                at += chunk.len();
            }
            Ok(())
        }

        fn finish(&mut self) -> Result<HashMap<String, Tensor>> {
            self.stream.synchronize().map_err(cuda_err)?;
            let mut out = HashMap::with_capacity(self.tensors.len());
            for (name, shape, buf) in self.tensors.drain(..) {
                let storage = match buf {
                    Buf::F32(s) => CudaStorage::wrap_cuda_slice(s, self.device.clone()),
                    Buf::F16(s) => CudaStorage::wrap_cuda_slice(s, self.device.clone()),
                    Buf::BF16(s) => CudaStorage::wrap_cuda_slice(s, self.device.clone()),
                };
                let tensor =
                    Tensor::from_storage(Storage::Cuda(storage), shape, candle_core::op::BackpropOp::none(), false);
                out.insert(name, tensor);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file fed in chunks of every awkward size gives the same tensors as the
    /// safetensors crate reading it whole.
    #[test]
    fn streamed_tensors_equal_the_file_read_whole() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 30.0, &dev)?.reshape((5, 6))?;
        let b = Tensor::arange(0f32, 7.0, &dev)?.to_dtype(DType::F16)?;
        let c = Tensor::arange(0f32, 1000.0, &dev)?.to_dtype(DType::BF16)?.reshape((10, 100))?;
        let dir = tempfile::tempdir().map_err(|e| LoadError::io("tempdir", e))?;
        let path = dir.path().join("m.safetensors");
        candle_core::safetensors::save(&HashMap::from([("a", a.clone()), ("b", b.clone()), ("c", c.clone())]), &path)?;
        let bytes = std::fs::read(&path).map_err(|e| LoadError::io(&path, e))?;
        for chunk in [1, 3, 7, 8, 9, 64, 1000, bytes.len()] {
            let mut sink = HostSink::new(&dev);
            let mut parser = SafetensorsStream::new("m.safetensors");
            for part in bytes.chunks(chunk) {
                parser.feed(part, &mut sink)?;
            }
            parser.finish()?;
            let got = sink.finish()?;
            for (name, want) in [("a", &a), ("b", &b), ("c", &c)] {
                let g = got[name].to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(g, want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, "chunk {chunk}, {name}");
                assert_eq!(got[name].dtype(), want.dtype());
                assert_eq!(got[name].dims(), want.dims());
            }
        }
        // A truncated file is an error naming it.
        let mut sink = HostSink::new(&dev);
        let mut parser = SafetensorsStream::new("m.safetensors");
        parser.feed(&bytes[..bytes.len() - 10], &mut sink)?;
        let err = parser.finish().map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(err.contains("m.safetensors") && err.contains("truncated"), "{err}");
        Ok(())
    }
}
