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
        // As the safetensors crate validates a header: in offset order, each tensor starts
        // where the one before ends (the first at 0) and spans exactly its shape's bytes, so
        // no two overlap, no gap hides bytes, and every byte of every tensor is written once.
        infos.sort_by_key(|(_, i)| i.data_offsets);
        let mut expected = 0u64;
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
            if start != expected || end < start {
                return Err(self.bad(format!(
                    "tensor {name}: data_offsets [{start}, {end}) do not start where the previous tensor ends \
                     (byte {expected}): overlapping, out-of-order or gapped data"
                )));
            }
            let want = info.shape.iter().try_fold(size, |n: u64, d| n.checked_mul(*d as u64));
            if want != Some(end - start) {
                return Err(self.bad(format!("tensor {name}: {} bytes for shape {:?}", end - start, info.shape)));
            }
            sink.begin(&name, dtype, &info.shape)?;
            let index = self.slots.len();
            expected = end;
            self.data_len = end;
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
    use crate::staging::{CopyQueue, StagingRing};

    /// Pinned staging buffers in the ring, and the size of each.
    const STAGING_BUFFERS: usize = 4;
    const STAGING_BYTES: usize = 8 << 20;

    enum Buf {
        F32(CudaSlice<f32>),
        F16(CudaSlice<half::f16>),
        BF16(CudaSlice<half::bf16>),
    }

    /// candle's stream, as the staging ring's queue. The ring, not `PinnedHostSlice`, keeps
    /// the buffers alive: cudarc's `Drop` for it waits only for the slice's own event, which
    /// its safe copies record and the raw `memcpy_htod_async` used here (a copy into an
    /// offset of a tensor) does not.
    struct CudaQueue(Arc<CudaStream>);

    impl CopyQueue for CudaQueue {
        type Staging = PinnedHostSlice<u8>;
        type Event = CudaEvent;

        unsafe fn copy_async(&mut self, staging: &mut Self::Staging, bytes: &[u8], to: u64) -> Result<()> {
            let host = staging.as_mut_slice().map_err(cuda_err)?;
            let Some(host) = host.get_mut(..bytes.len()) else {
                return Err(LoadError::Device(format!("{} bytes do not fit a staging buffer", bytes.len())));
            };
            host.copy_from_slice(bytes);
            // SAFETY: the caller vouches that [to, to + len) is device memory that outlives
            // the copy; the source is pinned memory that the ring leaves untouched (and
            // allocated) until an event recorded after this copy, or the whole stream, is over.
            unsafe { result::memcpy_htod_async(to, &*host, self.0.cu_stream()) }.map_err(cuda_err)
        }

        fn record(&mut self) -> Result<CudaEvent> {
            self.0.record_event(None).map_err(cuda_err)
        }

        fn wait(&mut self, event: &CudaEvent) -> Result<()> {
            event.synchronize().map_err(cuda_err)
        }

        fn wait_all(&mut self) -> Result<()> {
            self.0.synchronize().map_err(cuda_err)
        }
    }

    /// Tensors allocated in device memory and filled by asynchronous copies from a ring of
    /// pinned host buffers (pinned memory is what lets the copy run while the host goes on).
    /// Dropped before [`TensorSink::finish`] (a load that failed midway), it waits for the
    /// copies in flight before the buffers they read or write are freed.
    pub struct CudaSink {
        device: CudaDevice,
        stream: Arc<CudaStream>,
        ring: StagingRing<CudaQueue>,
        tensors: Vec<(String, Vec<usize>, Buf)>,
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
                // into it (see `CudaQueue::copy_async`); its initial contents are never read.
                let buf = unsafe { stream.context().alloc_pinned::<u8>(STAGING_BYTES) }.map_err(cuda_err)?;
                staging.push(buf);
            }
            let ring = StagingRing::new(CudaQueue(stream.clone()), staging, STAGING_BYTES);
            Ok(Self { device: dev.clone(), stream, ring, tensors: Vec::new() })
        }
    }

    impl Drop for CudaSink {
        fn drop(&mut self) {
            // Before any field is freed: the copies in flight read the staging buffers and
            // write the tensors.
            if let Err(e) = self.ring.wait_all() {
                tracing::error!(error = %e, "could not wait for the weight copies in flight; leaking their tensors");
                std::mem::forget(std::mem::take(&mut self.tensors));
            }
        }
    }

    impl TensorSink for CudaSink {
        fn begin(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Result<()> {
            let n: usize = shape.iter().product();
            // SAFETY: every byte of the allocation is written by `write` before `finish` hands
            // the tensor out (the safetensors parser checks the file covered all the data,
            // with no tensor overlapping another).
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
            if offset.checked_add(bytes.len()).is_none_or(|end| end > len) {
                return Err(LoadError::BadConfig(format!("write past the end of tensor {name}")));
            }
            // SAFETY: [base + offset, base + offset + len) lies inside the tensor's allocation
            // (checked above), which the sink owns and keeps until the ring's copies are over
            // (`finish` and `Drop` wait for them first).
            unsafe { self.ring.send(bytes, base + offset as u64) }
        }

        fn finish(&mut self) -> Result<HashMap<String, Tensor>> {
            self.ring.wait_all()?;
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

    /// A tensor of a test header: name, shape (F32) and data_offsets.
    type Entry<'a> = (&'a str, &'a [usize], (u64, u64));

    /// A header for `tensors` over `data` bytes of data.
    fn file_with(tensors: &[Entry<'_>], data: usize) -> Vec<u8> {
        let header: serde_json::Map<String, serde_json::Value> = tensors
            .iter()
            .map(|(name, shape, (s, e))| {
                ((*name).to_string(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [s, e]}))
            })
            .collect();
        let header = serde_json::Value::Object(header).to_string().into_bytes();
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header);
        file.extend((0..data).map(|i| i as u8));
        file
    }

    fn stream_whole(file: &[u8]) -> Result<HashMap<String, Tensor>> {
        let mut sink = HostSink::new(&Device::Cpu);
        let mut parser = SafetensorsStream::new("t.safetensors");
        parser.feed(file, &mut sink)?;
        parser.finish()?;
        sink.finish()
    }

    /// Finding 5 of issue 20: data_offsets that overlap, leave a gap or do not start at 0 are
    /// refused, as the safetensors crate refuses them; tensors listed out of offset order in
    /// the JSON are fine (the crate sorts them too).
    #[test]
    fn overlapping_or_gapped_offsets_are_refused_like_the_safetensors_crate() -> Result<()> {
        let cases: [(&str, Vec<Entry<'_>>, usize); 4] = [
            ("overlap", vec![("a", &[4], (0, 16)), ("b", &[4], (8, 24))], 24),
            ("gap", vec![("a", &[4], (0, 16)), ("b", &[4], (20, 36))], 36),
            ("not from 0", vec![("a", &[4], (4, 20))], 20),
            ("same range twice", vec![("a", &[4], (0, 16)), ("b", &[4], (0, 16))], 16),
        ];
        for (what, tensors, data) in cases {
            let file = file_with(&tensors, data);
            let ours = stream_whole(&file).map(|_| ()).map_err(|e| e.to_string());
            assert!(ours.as_ref().is_err_and(|e| e.contains("data_offsets")), "{what}: {ours:?}");
            assert!(safetensors::SafeTensors::deserialize(&file).is_err(), "{what}: the crate refuses it too");
        }
        // Listed out of order but contiguous: accepted, with the right bytes in each.
        let file = file_with(&[("b", &[2], (16, 24)), ("a", &[4], (0, 16))], 24);
        let got = stream_whole(&file)?;
        assert!(safetensors::SafeTensors::deserialize(&file).is_ok());
        let bytes =
            |t: &Tensor| -> Result<Vec<u8>> { Ok(t.to_vec1::<f32>()?.iter().flat_map(|f| f.to_le_bytes()).collect()) };
        assert_eq!(bytes(&got["a"])?, (0..16).collect::<Vec<u8>>());
        assert_eq!(bytes(&got["b"])?, (16..24).collect::<Vec<u8>>());
        Ok(())
    }

    /// Finding 4 on a GPU: a sink dropped midway through a load (copies in flight) waits for
    /// them before freeing its pinned buffers and tensors; the next load on the same device
    /// gets every byte right. (Under `compute-sanitizer` this also shows no access to freed
    /// memory.) Prints `CUDA kernel NOT RUN` where no GPU is present.
    #[cfg(feature = "cuda")]
    #[test]
    fn a_cuda_load_aborted_midway_frees_nothing_still_in_use() -> Result<()> {
        let Some(dev) = ember_kernels::cuda::first_device() else {
            eprintln!("CUDA kernel NOT RUN: this machine has no usable CUDA device");
            return Ok(());
        };
        let n = 24 << 20; // three staging buffers of copies, 96 MB of f32
        let data: Vec<u8> = (0..n * 4).map(|i| (i % 251) as u8).collect();
        {
            let mut sink = CudaSink::new(&dev)?;
            sink.begin("w", DType::F32, &[n])?;
            sink.write(0, 0, &data[..data.len() / 2])?;
            // dropped here, without finish: the copies may still be running
        }
        let mut sink = CudaSink::new(&dev)?;
        sink.begin("w", DType::F32, &[n])?;
        for (i, part) in data.chunks(5 << 20).enumerate() {
            sink.write(0, i * (5 << 20), part)?;
        }
        let got = sink.finish()?;
        let back: Vec<u8> = got["w"].to_vec1::<f32>()?.iter().flat_map(|f| f.to_le_bytes()).collect();
        assert!(back == data, "the bytes on the device differ from the file's");
        Ok(())
    }
}
