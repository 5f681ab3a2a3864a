//! GGUF weights tiled while the file still downloads.
//!
//! Ember's CPU kernels read quantized weights in their own tiled layout
//! ([`ember_kernels::cpu::QuantLinear::tiled_from_blocks`]); building it is the largest part of
//! a GGUF model's build (a pass over every weight byte, writing as many). [`GgufTiler`] is
//! fed the file's bytes in order as they land, parses the header from the first of them, and
//! tiles each tensor as soon as its last byte is in, so the build after the download only has
//! the last tensors left. A tensor within one piece is tiled from it directly; one that spans
//! pieces is gathered first (one copy of that tensor).
//!
//! The bytes are not yet verified when they are tiled: the tiles are used only if the whole
//! download then passes its checks, as the fetch fails otherwise.

use std::borrow::Cow;

use candle_core::quantized::{gguf_file, GgmlDType};
use ember_kernels::cpu::QuantLinear;

use crate::gguf_header::GgufHeader;

/// Lowers the calling thread's priority to the least (nice 19): the tiler should take only
/// the CPU the download, its hashing and everything else leave idle. Where the network is the
/// bottleneck that is most of a core, and the tiles are done when the last byte lands; where
/// the CPU is (a local object store on the same cores), tiling at equal priority slowed the
/// download more than it saved.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take and return plain integers and touch no memory; the
    // thread id is this thread's own, so only its priority changes.
    unsafe {
        let tid = libc::gettid();
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

/// The most header bytes held while waiting for the header to parse; beyond that the file's
/// tensors are left to the build (the header is metadata and tensor names, megabytes at most).
const MAX_HEADER: usize = 64 << 20;

/// One tensor to tile: its GGUF name, format, shape `(n, k)` and bytes in the file.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    pub name: String,
    pub dtype: GgmlDType,
    pub n: usize,
    pub k: usize,
    pub start: u64,
    pub len: u64,
}

/// A tensor whose bytes are all in: what tiling it takes.
pub struct Ready<'a> {
    /// GGUF tensor name.
    pub name: String,
    pub dtype: GgmlDType,
    pub n: usize,
    pub k: usize,
    /// Its blocks: borrowed from the piece that held it whole, else gathered.
    pub blocks: Cow<'a, [u8]>,
}

impl Ready<'_> {
    /// The tiled layer (None where the kernels do not tile it here).
    pub fn tile(&self) -> Option<QuantLinear> {
        QuantLinear::tiled_from_blocks(self.dtype, &self.blocks, self.n, self.k)
    }

    fn into_owned(self) -> Ready<'static> {
        Ready { name: self.name, dtype: self.dtype, n: self.n, k: self.k, blocks: Cow::Owned(self.blocks.into_owned()) }
    }
}

/// Finds a GGUF file's quantized tensors in its bytes, fed in file order, and hands each one
/// on as soon as its last byte is in.
#[derive(Default)]
pub struct GgufTiler {
    /// The file's first bytes, until the header parses.
    header: Vec<u8>,
    /// Tensors to tile, in file order (None until the header is in).
    plan: Option<Vec<Planned>>,
    next: usize,
    /// The bytes so far of tensor `next`, when it spans pieces.
    carry: Vec<u8>,
    /// Bytes of the file fed so far.
    pos: u64,
    /// The header never parsed: nothing is tiled here.
    gave_up: bool,
    /// The parsed header, until [`GgufTiler::take_header`] takes it.
    parsed: Option<GgufHeader>,
    /// Parse the header only: nothing is routed, and the plan waits for
    /// [`GgufTiler::take_plan`] (the tensors are then tiled where they land, once verified).
    header_only: bool,
}

impl GgufTiler {
    /// A tiler that only parses the header (see [`GgufTiler::take_plan`]).
    pub(crate) fn header_only() -> Self {
        Self { header_only: true, ..Self::default() }
    }

    /// The tensors to tile, in file order, once the header has parsed (header-only tilers;
    /// once). Nothing more is read after that: later bytes are ignored.
    pub(crate) fn take_plan(&mut self) -> Option<Vec<Planned>> {
        let plan = self.plan.take()?;
        self.gave_up = true;
        Some(plan)
    }

    /// The next `bytes` of the file; `out` gets every tensor they complete.
    pub fn feed<'a>(&mut self, bytes: &'a [u8], out: &mut dyn FnMut(Ready<'a>)) {
        let at = self.pos;
        self.pos += bytes.len() as u64;
        if self.gave_up {
            return;
        }
        if self.plan.is_some() {
            if !self.header_only {
                self.route(at, bytes, out);
            }
            return;
        }
        // The header is most often whole in the first piece: parse it there, without copying
        // the piece (a part is megabytes of fresh memory to touch). Later pieces are added to
        // the bytes held so far.
        let parsed = if self.header.is_empty() {
            let parsed = GgufHeader::read(bytes);
            if let Ok(header) = parsed {
                self.parsed_header(header);
                if !self.header_only {
                    self.route(0, bytes, out);
                }
                return;
            }
            self.header.extend_from_slice(bytes);
            parsed
        } else {
            self.header.extend_from_slice(bytes);
            GgufHeader::read(&self.header)
        };
        match parsed {
            Ok(header) => {
                self.parsed_header(header);
                let seen = std::mem::take(&mut self.header);
                if !self.header_only {
                    self.route(0, &seen, &mut |ready| out(ready.into_owned()));
                }
            }
            Err(_) if self.header.len() < MAX_HEADER => {}
            Err(_) => {
                self.gave_up = true;
                self.header = Vec::new();
            }
        }
    }

    fn parsed_header(&mut self, header: GgufHeader) {
        self.plan = Some(plan(&header.content));
        self.parsed = Some(header);
    }

    /// The file's header, once, as soon as it has parsed (for work that needs only the
    /// metadata, such as the tokenizer).
    pub fn take_header(&mut self) -> Option<GgufHeader> {
        self.parsed.take()
    }

    fn route<'a>(&mut self, at: u64, bytes: &'a [u8], out: &mut dyn FnMut(Ready<'a>)) {
        let end = at + bytes.len() as u64;
        let Some(plan) = &self.plan else { return };
        while let Some(t) = plan.get(self.next) {
            if t.start >= end {
                break;
            }
            let t_end = t.start + t.len;
            let (from, to) = (t.start.max(at), t_end.min(end));
            let piece = &bytes[(from - at) as usize..(to - at) as usize];
            let whole = from == t.start && to == t_end;
            let blocks = if whole && self.carry.is_empty() {
                Cow::Borrowed(piece)
            } else {
                self.carry.extend_from_slice(piece);
                if to < t_end {
                    break;
                }
                Cow::Owned(std::mem::take(&mut self.carry))
            };
            out(Ready { name: t.name.clone(), dtype: t.dtype, n: t.n, k: t.k, blocks });
            self.next += 1;
        }
    }
}

/// The header's tensors that the kernels tile, in file order.
fn plan(content: &gguf_file::Content) -> Vec<Planned> {
    let mut plan: Vec<Planned> = content
        .tensor_infos
        .iter()
        .filter(|(_, info)| QuantLinear::tiled_kind(info.ggml_dtype).is_some())
        .filter_map(|(name, info)| {
            let (n, k) = info.shape.dims2().ok()?;
            let len = (info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64;
            let start = content.tensor_data_offset.checked_add(info.offset)?;
            Some(Planned { name: name.clone(), dtype: info.ggml_dtype, n, k, start, len })
        })
        .collect();
    plan.sort_by_key(|t| t.start);
    // Overlapping tensors (a malformed file) are left to the build, which reads each one alone.
    let mut end = 0;
    plan.retain(|t| {
        let ok = t.start >= end;
        end = end.max(t.start + t.len);
        ok
    });
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;
    use std::io::Cursor;

    /// A small GGUF file of two quantized tensors and a norm, fed in pieces of every size
    /// from 1 byte up: every quantized tensor comes out tiled, equal to tiling it whole.
    #[test]
    fn tiles_equal_the_whole_file_s_whatever_the_pieces() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 64.0 * 32.0, &dev)?.reshape((32, 64))?.affine(0.001, -1.0)?;
        let b = Tensor::arange(0f32, 32.0 * 64.0, &dev)?.reshape((64, 32))?.affine(-0.002, 1.5)?;
        let qa = QTensor::quantize(&a, GgmlDType::Q4_1)?;
        let qb = QTensor::quantize(&b, GgmlDType::Q8_0)?;
        let norm = QTensor::quantize(&Tensor::ones(32, candle_core::DType::F32, &dev)?, GgmlDType::F32)?;
        let mut file = Cursor::new(Vec::new());
        let tensors = [("a.weight", &qa), ("norm.weight", &norm), ("b.weight", &qb)];
        gguf_file::write(&mut file, &[], &tensors)?;
        let file = file.into_inner();
        let tile_in_pieces = |piece: usize| {
            let mut t = GgufTiler::default();
            let mut built = HashMap::new();
            for bytes in file.chunks(piece) {
                t.feed(bytes, &mut |ready| {
                    if let Some(layer) = ready.tile() {
                        built.insert(ready.name.clone(), layer);
                    }
                });
            }
            built
        };
        let whole = tile_in_pieces(file.len());
        if whole.is_empty() {
            println!("no tiled kernels on this CPU: nothing is tiled, nothing to compare");
            return Ok(());
        }
        assert_eq!(whole.len(), 2, "the two quantized tensors, not the norm");
        let x = Tensor::arange(0f32, 64.0, &dev)?.reshape((1, 1, 64))?.affine(0.01, 0.0)?;
        let want = whole["a.weight"].forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let xb = Tensor::arange(0f32, 32.0, &dev)?.reshape((1, 1, 32))?.affine(-0.02, 0.3)?;
        let want_b = whole["b.weight"].forward(&xb)?.flatten_all()?.to_vec1::<f32>()?;
        // The same tiles as tiling each tensor's blocks alone, as the build does.
        let alone =
            QuantLinear::tiled_from_blocks(GgmlDType::Q8_0, &qb.data()?, 64, 32).ok_or_else(|| anyhow::anyhow!("b"))?;
        assert_eq!(alone.forward(&xb)?.flatten_all()?.to_vec1::<f32>()?, want_b);
        for piece in [1, 7, 100, 1000, file.len() / 2] {
            let built = tile_in_pieces(piece);
            assert_eq!(built.len(), 2, "pieces of {piece} bytes");
            assert_eq!(built["a.weight"].forward(&x)?.flatten_all()?.to_vec1::<f32>()?, want, "pieces of {piece}");
            assert_eq!(built["b.weight"].forward(&xb)?.flatten_all()?.to_vec1::<f32>()?, want_b, "pieces of {piece}");
        }
        // A file cut short hands on what arrived whole and nothing else.
        let mut t = GgufTiler::default();
        let mut names = Vec::new();
        t.feed(&file[..file.len() - 10], &mut |ready| names.push(ready.name));
        assert_eq!(names, ["a.weight"]);
        Ok(())
    }
}
