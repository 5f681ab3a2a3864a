//! `ember-manifest.json`: the SHA-256 and size of every file of a model, and for files larger
//! than one chunk a digest of every [`CHUNK_SIZE`] piece. When a model has one, every byte is
//! checked before the model is built and a mismatch refuses to load.
//!
//! Why chunks: SHA-256 of one large file is one core's work (about 1.3 GB/s on this project's
//! machine, 2 GB/s at best), slower than a parallel download. Chunk digests let a download
//! verify each piece as it lands, in parallel, and name the piece that is wrong.
//!
//! Which digests (manifest version 3): the chunks are BLAKE3 (`chunks_blake3`), which runs
//! several times faster than SHA-256 on one core (SIMD over the chunk's 1 KiB blocks), so that
//! verifying costs a fraction of the download's CPU instead of more than it; the whole file
//! keeps its SHA-256 (`sha256`), the digest `sha256sum` and S3's checksums speak. Earlier
//! manifests still load: version 2's SHA-256 chunk digests (`chunks`) are checked as they are,
//! and a manifest without chunk digests has its files verified whole. An older Ember reading a
//! version 3 manifest ignores `chunks_blake3` and verifies each file whole by its SHA-256.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{LoadError, Result};

pub const MANIFEST_FILE: &str = "ember-manifest.json";

/// The chunk size `ember model manifest` writes: one ranged GET each, 16 MiB as S3's own
/// guidance for parallel ranged GETs suggests (8-16 MB).
pub const CHUNK_SIZE: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub sha256: String,
    pub size: u64,
    /// The size of each piece in `chunks` (the last one may be shorter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u64>,
    /// SHA-256 of each `chunk_size` piece of the file, in order (manifest version 2; read, no
    /// longer written).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
    /// BLAKE3 of each `chunk_size` piece of the file, in order; empty for files of one chunk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks_blake3: Vec<String>,
}

/// The hash a manifest's chunk digests were made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkHash {
    Blake3,
    Sha256,
}

impl ChunkHash {
    /// The name error messages use (as `b3sum` and `sha256sum` call them).
    pub fn name(self) -> &'static str {
        match self {
            Self::Blake3 => "blake3",
            Self::Sha256 => "sha256",
        }
    }

    pub fn digest(self, bytes: &[u8]) -> String {
        self.digest_pieces(&[bytes])
    }

    /// The digest of `pieces` one after another (a chunk that landed in parts).
    pub fn digest_pieces(self, pieces: &[&[u8]]) -> String {
        match self {
            Self::Blake3 => {
                let mut hasher = blake3::Hasher::new();
                for p in pieces {
                    hasher.update(p);
                }
                hasher.finalize().to_hex().to_string()
            }
            Self::Sha256 => {
                let mut hasher = Sha256::new();
                for p in pieces {
                    hasher.update(p);
                }
                hex::encode(hasher.finalize())
            }
        }
    }
}

/// The BLAKE3 digest of a `len`-byte input from hashers that each took one piece of it: a
/// piece's offset, its length, and a hasher fed exactly its bytes after
/// `HasherExt::set_input_offset(offset)`. BLAKE3 is a tree of 1 KiB chunks in which the left
/// subtree of every node holds the largest power of two of chunks that leaves the right one
/// non-empty, so pieces of one power-of-two size (at least 1 KiB) at multiples of it are whole
/// subtrees: their chaining values are merged up to the root, and no byte is hashed twice.
/// None when the pieces do not cover the input that way.
pub fn blake3_of_subtrees(pieces: &[(u64, u64, blake3::Hasher)], len: u64) -> Option<blake3::Hash> {
    use blake3::hazmat::{
        left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
    };
    const CHUNK: u64 = blake3::CHUNK_LEN as u64;
    type Pieces = [(u64, u64, blake3::Hasher)];
    fn piece(pieces: &Pieces, start: u64, len: u64) -> Option<&blake3::Hasher> {
        pieces.iter().find(|(o, l, _)| *o == start && *l == len).map(|(_, _, h)| h)
    }
    fn node(pieces: &Pieces, start: u64, len: u64) -> Option<ChainingValue> {
        if let Some(h) = piece(pieces, start, len) {
            return start.is_multiple_of(CHUNK).then(|| h.finalize_non_root());
        }
        if len <= CHUNK {
            return None;
        }
        let left = left_subtree_len(len);
        Some(merge_subtrees_non_root(&node(pieces, start, left)?, &node(pieces, start + left, len - left)?, Mode::Hash))
    }
    if let Some(h) = piece(pieces, 0, len) {
        return Some(h.finalize());
    }
    if len <= CHUNK {
        return None;
    }
    let left = left_subtree_len(len);
    Some(merge_subtrees_root(&node(pieces, 0, left)?, &node(pieces, left, len - left)?, Mode::Hash))
}

impl FileDigest {
    /// The digest of a whole file, without chunk digests.
    pub fn whole(sha256: String, size: u64) -> Self {
        Self { sha256, size, chunk_size: None, chunks: Vec::new(), chunks_blake3: Vec::new() }
    }

    /// The chunk size when chunk digests are present and cover the file exactly.
    pub fn chunking(&self) -> Option<u64> {
        self.chunk_digests().map(|(size, _, _)| size)
    }

    /// The chunk size, the hash and the digests, preferring BLAKE3 when both are listed.
    pub fn chunk_digests(&self) -> Option<(u64, ChunkHash, &[String])> {
        let size = self.chunk_size.filter(|&c| c > 0)?;
        let covers = |list: &[String]| !list.is_empty() && list.len() as u64 == self.size.div_ceil(size);
        if covers(&self.chunks_blake3) {
            Some((size, ChunkHash::Blake3, &self.chunks_blake3))
        } else if covers(&self.chunks) {
            Some((size, ChunkHash::Sha256, &self.chunks))
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub files: BTreeMap<String, FileDigest>,
}

impl Manifest {
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| LoadError::BadJson { file: MANIFEST_FILE.into(), message: e.to_string() })
    }

    /// Hashes every regular file directly in `dir` (the manifest itself excepted).
    pub fn for_dir(dir: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        let entries = std::fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| LoadError::io(dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // The signature signs the manifest, so the manifest cannot list it.
            if !path.is_file()
                || name == MANIFEST_FILE
                || name == crate::signing::SIGNATURE_FILE
                || name.starts_with('.')
            {
                continue;
            }
            files.insert(name, digest_file(&path)?);
        }
        Ok(Self { version: 3, files })
    }

    /// Writes `ember-manifest.json` into `dir` and returns it.
    pub fn write_for_dir(dir: &Path) -> Result<Self> {
        let manifest = Self::for_dir(dir)?;
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| LoadError::BadJson { file: MANIFEST_FILE.into(), message: e.to_string() })?;
        std::fs::write(&path, text + "\n").map_err(|e| LoadError::io(path, e))?;
        Ok(manifest)
    }

    /// Checks one file's digest against the manifest. Files the manifest does not list are
    /// refused too: an unlisted weights file is as untrusted as a changed one.
    pub fn check(&self, name: &str, actual: &FileDigest) -> Result<()> {
        let Some(expected) = self.files.get(name) else {
            return Err(LoadError::ChecksumMismatch {
                file: name.into(),
                expected: "<not listed in the manifest>".into(),
                actual: actual.sha256.clone(),
            });
        };
        if expected.size != actual.size {
            return Err(LoadError::SizeMismatch { file: name.into(), expected: expected.size, actual: actual.size });
        }
        if !expected.sha256.eq_ignore_ascii_case(&actual.sha256) {
            return Err(LoadError::ChecksumMismatch {
                file: name.into(),
                expected: expected.sha256.clone(),
                actual: actual.sha256.clone(),
            });
        }
        Ok(())
    }

    /// The listed digest of `name`, or the error for a file the manifest does not list.
    pub fn entry(&self, name: &str) -> Result<&FileDigest> {
        self.files.get(name).ok_or_else(|| LoadError::ChecksumMismatch {
            file: name.into(),
            expected: "<not listed in the manifest>".into(),
            actual: "<not hashed>".into(),
        })
    }

    /// Checks chunk `index` of `name` (the bytes at `index * chunk_size`), naming the chunk and
    /// its byte range on a mismatch.
    pub fn check_chunk(&self, name: &str, index: usize, bytes: &[u8]) -> Result<()> {
        self.check_chunk_pieces(name, index, &[bytes])
    }

    /// [`Manifest::check_chunk`] for a chunk that landed in several pieces, in order.
    pub fn check_chunk_pieces(&self, name: &str, index: usize, pieces: &[&[u8]]) -> Result<()> {
        let entry = self.entry(name)?;
        let Some((chunk, hash, expected)) = entry.chunk_digests().and_then(|(c, h, d)| Some((c, h, d.get(index)?)))
        else {
            return Err(LoadError::BadConfig(format!("the manifest has no chunk {index} for `{name}`")));
        };
        let actual = hash.digest_pieces(pieces);
        if !expected.eq_ignore_ascii_case(&actual) {
            let start = index as u64 * chunk;
            return Err(LoadError::ChunkMismatch {
                file: name.into(),
                chunk: index,
                start,
                end: start + pieces.iter().map(|p| p.len() as u64).sum::<u64>(),
                hash: hash.name(),
                expected: expected.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// [`Manifest::check_chunk_pieces`] for a chunk whose pieces were hashed as they landed
    /// (see [`blake3_of_subtrees`]): `subtrees` holds each piece's offset in the chunk, length
    /// and hasher. Where the chunk's digest is not BLAKE3, or the pieces are not whole subtrees
    /// of its tree, the pieces' bytes are hashed instead.
    pub fn check_chunk_hashed(
        &self,
        name: &str,
        index: usize,
        pieces: &[&[u8]],
        subtrees: &[(u64, u64, blake3::Hasher)],
    ) -> Result<()> {
        let entry = self.entry(name)?;
        let Some((chunk, hash, expected)) = entry.chunk_digests().and_then(|(c, h, d)| Some((c, h, d.get(index)?)))
        else {
            return Err(LoadError::BadConfig(format!("the manifest has no chunk {index} for `{name}`")));
        };
        let len = pieces.iter().map(|p| p.len() as u64).sum::<u64>();
        let merged = match hash {
            ChunkHash::Blake3 if !subtrees.is_empty() => {
                blake3_of_subtrees(subtrees, len).map(|h| h.to_hex().to_string())
            }
            _ => None,
        };
        let actual = merged.unwrap_or_else(|| hash.digest_pieces(pieces));
        if !expected.eq_ignore_ascii_case(&actual) {
            let start = index as u64 * chunk;
            return Err(LoadError::ChunkMismatch {
                file: name.into(),
                chunk: index,
                start,
                end: start + len,
                hash: hash.name(),
                expected: expected.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Checks every byte of `name` against the manifest: chunk by chunk (in parallel, naming
    /// the first bad chunk) when it has chunk digests, else the whole file.
    pub fn check_bytes(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let entry = self.entry(name)?;
        if entry.size != bytes.len() as u64 {
            return Err(LoadError::SizeMismatch {
                file: name.into(),
                expected: entry.size,
                actual: bytes.len() as u64,
            });
        }
        let Some(chunk) = entry.chunking() else {
            return self.check(name, &digest_bytes(bytes));
        };
        let pieces: Vec<(usize, &[u8])> = bytes.chunks(chunk as usize).enumerate().collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(pieces.len()).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let pieces = &pieces;
                    s.spawn(move || {
                        pieces.iter().skip(t).step_by(threads).try_for_each(|(i, b)| self.check_chunk(name, *i, b))
                    })
                })
                .collect();
            let mut results: Vec<Result<()>> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(LoadError::BadConfig("a checksum thread panicked".into()))))
                .collect();
            // Name the first bad chunk in file order, whichever thread found it.
            results.sort_by_key(|r| match r {
                Err(LoadError::ChunkMismatch { chunk, .. }) => *chunk,
                Err(_) => 0,
                Ok(()) => usize::MAX,
            });
            results.into_iter().next().unwrap_or(Ok(()))
        })
    }
}

/// The digest of `bytes`, with BLAKE3 chunk digests when it is larger than one chunk.
pub fn digest_bytes(bytes: &[u8]) -> FileDigest {
    let (sha256, chunks_blake3) = std::thread::scope(|s| {
        let whole = s.spawn(|| hex::encode(Sha256::digest(bytes)));
        let chunks: Vec<String> = if bytes.len() as u64 > CHUNK_SIZE {
            bytes.chunks(CHUNK_SIZE as usize).map(|c| ChunkHash::Blake3.digest(c)).collect()
        } else {
            Vec::new()
        };
        (whole.join().unwrap_or_default(), chunks)
    });
    let chunk_size = (!chunks_blake3.is_empty()).then_some(CHUNK_SIZE);
    FileDigest { chunk_size, chunks_blake3, ..FileDigest::whole(sha256, bytes.len() as u64) }
}

pub fn digest_file(path: &Path) -> Result<FileDigest> {
    Ok(digest_bytes(&crate::files::FileBytes::map(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_byte_is_refused_naming_the_file() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| LoadError::io("tmp", e))?;
        std::fs::write(dir.path().join("a.bin"), b"hello").map_err(|e| LoadError::io("a", e))?;
        let m = Manifest::write_for_dir(dir.path())?;
        assert!(m.check("a.bin", &digest_bytes(b"hello")).is_ok());
        let err = m.check("a.bin", &digest_bytes(b"hellp")).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("`a.bin` failed its checksum")));
        let err = m.check("b.bin", &digest_bytes(b"x"));
        assert!(matches!(err, Err(LoadError::ChecksumMismatch { file, .. }) if file == "b.bin"));
        Ok(())
    }
}

#[cfg(test)]
mod chunk_tests {
    use super::*;

    /// Three chunks of 4 bytes and one of 2: `chunk_size` is a manifest's choice, not a constant.
    fn entry(bytes: &[u8], hash: ChunkHash) -> FileDigest {
        let digests: Vec<String> = bytes.chunks(4).map(|c| hash.digest(c)).collect();
        let whole = FileDigest::whole(hex::encode(Sha256::digest(bytes)), bytes.len() as u64);
        match hash {
            ChunkHash::Blake3 => FileDigest { chunk_size: Some(4), chunks_blake3: digests, ..whole },
            ChunkHash::Sha256 => FileDigest { chunk_size: Some(4), chunks: digests, ..whole },
        }
    }

    #[test]
    fn blake3_is_the_published_function() {
        // The empty input's digest from BLAKE3's specification and test vectors.
        let empty = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";
        assert_eq!(ChunkHash::Blake3.digest(b""), empty);
    }

    #[test]
    fn a_flipped_byte_is_named_by_its_chunk_with_blake3_and_with_version_2_sha256_chunks() -> Result<()> {
        let good = b"0123456789abcd".to_vec();
        for hash in [ChunkHash::Blake3, ChunkHash::Sha256] {
            let m = Manifest { version: 3, files: [("w.bin".to_string(), entry(&good, hash))].into() };
            assert_eq!(m.entry("w.bin")?.chunk_digests().map(|(size, h, _)| (size, h)), Some((4, hash)));
            m.check_bytes("w.bin", &good)?;
            let mut bad = good.clone();
            bad[9] ^= 1;
            match m.check_bytes("w.bin", &bad) {
                Err(LoadError::ChunkMismatch { file, chunk: 2, start: 8, end: 12, .. }) if file == "w.bin" => {}
                other => panic!("{hash:?}: a flipped byte 9 must be refused as chunk 2 (bytes 8..12): {other:?}"),
            }
        }
        Ok(())
    }

    /// Pieces hashed where they landed, each with its offset, merge to `blake3::hash` of the
    /// whole: every power-of-two piece size from 1 KiB, on inputs that end at, just before and
    /// just after a piece boundary, and on one piece covering everything (finalized as the root).
    #[test]
    fn pieces_hashed_as_they_land_merge_to_the_digest_of_the_whole() {
        use blake3::hazmat::HasherExt;
        let bytes: Vec<u8> = (0..70_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for piece in [1024u64, 2048, 4096, 16384] {
            for len in [1, 1023, 1024, 1025, 3 * 1024, 4096 * 3 + 1, 16384 * 4, 16384 * 4 - 1, 69_999] {
                let input = &bytes[..len as usize];
                let pieces: Vec<(u64, u64, blake3::Hasher)> = input
                    .chunks(piece as usize)
                    .enumerate()
                    .map(|(i, p)| {
                        let mut h = blake3::Hasher::new();
                        if i > 0 {
                            h.set_input_offset(i as u64 * piece);
                        }
                        h.update(p);
                        (i as u64 * piece, p.len() as u64, h)
                    })
                    .collect();
                assert_eq!(
                    blake3_of_subtrees(&pieces, len),
                    Some(blake3::hash(input)),
                    "pieces of {piece}, {len} bytes"
                );
            }
        }
        // Pieces that are not whole subtrees (1,000 bytes) are declined, not merged wrongly.
        let mut first = blake3::Hasher::new();
        first.update(&bytes[..1000]);
        let mut second = blake3::Hasher::new();
        second.update(&bytes[1000..2000]);
        assert_eq!(blake3_of_subtrees(&[(0, 1000, first), (1000, 1000, second)], 2000), None);
    }

    #[test]
    fn a_chunk_hashed_as_it_landed_is_checked_and_a_flipped_byte_named() -> Result<()> {
        use blake3::hazmat::HasherExt;
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 31 + i / 97) as u8).collect();
        let digests = bytes.chunks(8192).map(|c| ChunkHash::Blake3.digest(c)).collect();
        let whole = FileDigest::whole(hex::encode(Sha256::digest(&bytes)), bytes.len() as u64);
        let m = Manifest {
            version: 3,
            files: [("w".to_string(), FileDigest { chunk_size: Some(8192), chunks_blake3: digests, ..whole })].into(),
        };
        let hashed = |chunk: &[u8]| -> Vec<(u64, u64, blake3::Hasher)> {
            chunk
                .chunks(2048)
                .enumerate()
                .map(|(i, p)| {
                    let mut h = blake3::Hasher::new();
                    h.set_input_offset(i as u64 * 2048).update(p);
                    (i as u64 * 2048, p.len() as u64, h)
                })
                .collect()
        };
        let pieces: Vec<&[u8]> = bytes[..8192].chunks(2048).collect();
        m.check_chunk_hashed("w", 0, &pieces, &hashed(&bytes[..8192]))?;
        m.check_chunk_hashed("w", 1, &[&bytes[8192..]], &hashed(&bytes[8192..]))?;
        let mut bad = bytes[..8192].to_vec();
        bad[5000] ^= 0x10;
        match m.check_chunk_hashed("w", 0, &pieces, &hashed(&bad)) {
            Err(LoadError::ChunkMismatch { chunk: 0, start: 0, end: 8192, .. }) => {}
            other => panic!("a byte flipped as it landed must fail chunk 0: {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn a_chunk_that_landed_in_pieces_hashes_as_one() -> Result<()> {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 255) as u8).collect();
        for hash in [ChunkHash::Blake3, ChunkHash::Sha256] {
            let (a, rest) = bytes.split_at(1024);
            let (b, c) = rest.split_at(4097);
            assert_eq!(hash.digest_pieces(&[a, b, c]), hash.digest(&bytes), "{hash:?}");
        }
        let m = Manifest { version: 3, files: [("w".to_string(), entry(b"0123456789abcd", ChunkHash::Blake3))].into() };
        m.check_chunk_pieces("w", 1, &[b"45", b"67"])?;
        match m.check_chunk_pieces("w", 1, &[b"45", b"76"]) {
            Err(LoadError::ChunkMismatch { chunk: 1, start: 4, end: 8, .. }) => {}
            other => panic!("a bad piece must fail its chunk (bytes 4..8): {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn blake3_chunks_are_preferred_and_a_version_2_manifest_parses() -> Result<()> {
        let bytes = b"0123456789".to_vec();
        let v2 = serde_json::to_vec(&Manifest {
            version: 2,
            files: [("w".into(), entry(&bytes, ChunkHash::Sha256))].into(),
        })
        .map_err(|e| LoadError::BadConfig(e.to_string()))?;
        let parsed = Manifest::from_json(&v2)?;
        assert_eq!(parsed.entry("w")?.chunk_digests().map(|(_, h, _)| h), Some(ChunkHash::Sha256));
        assert!(!String::from_utf8_lossy(&v2).contains("chunks_blake3"));
        // Both lists present: BLAKE3 is checked (a wrong SHA-256 list is then not consulted).
        let both = FileDigest { chunks: vec!["00".repeat(32); 3], ..entry(&bytes, ChunkHash::Blake3) };
        let m = Manifest { version: 3, files: [("w".into(), both)].into() };
        m.check_bytes("w", &bytes)?;
        Ok(())
    }
}
