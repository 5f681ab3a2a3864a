//! The local tier: verified copies of S3 models on local disk (Lambda's /tmp, an instance's
//! NVMe), so the next start of the same model maps them instead of downloading.
//!
//! Layout: one folder per model (`<dir>/<16 hex digits of the S3 URL>/`) holding its files
//! under their own names, `entry.json` (what each file was verified as), and `lock`.
//!
//! - **Verified once.** A file is written by the download that verified it, chunk by chunk,
//!   against the manifest. `entry.json` records the file's ETag and size in S3, the manifest
//!   digest it matched, and the file's identity on disk at that moment: device, inode, size,
//!   modification and change times in nanoseconds. The change time (ctime) is set by the
//!   kernel on every write or metadata change and cannot be set back from user space, so an
//!   unchanged record means unchanged bytes, and a warm start skips hashing. Anything else
//!   (a write, a copy over it, a restored backup) changes ctime, and the file is hashed again;
//!   if it no longer matches, it is dropped and downloaded fresh.
//! - **Two processes, one cache.** Filling a model's folder holds an exclusive `flock` on its
//!   `lock` file: a second process starting the same model waits, then finds it filled. A
//!   process that uses a model holds a shared lock for as long as the model is loaded
//!   ([`Pin`]). Files are written under a temporary name and renamed, and `entry.json` is
//!   replaced by rename, so a crash leaves either the old state or the new one.
//! - **Tiles beside a GGUF file.** A start that tiled a cached GGUF file for the CPU kernels
//!   keeps the tiles beside it ([`crate::tiles`]: `<file>.tiles`, trusted by the same stamps),
//!   so the next start maps them too. They take about the file's size again, and count
//!   toward the limit.
//! - **Size limit.** Before a fill, least recently used models are deleted until the new files
//!   fit; a model whose lock another process holds (in use, or being filled) is never deleted.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{LoadError, Result};
use crate::manifest::FileDigest;

const ENTRY_FILE: &str = "entry.json";
const LOCK_FILE: &str = "lock";

/// A cache directory and its size limit.
#[derive(Debug, Clone)]
pub struct Tier {
    pub dir: PathBuf,
    /// Total bytes of model files the cache may hold; None for no limit.
    pub max_bytes: Option<u64>,
}

/// A file's identity on disk when it was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Stamp {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }
}

/// What one cached file was verified as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    pub etag: String,
    pub size: u64,
    /// The manifest entry it matched; None when the model had no manifest (unverified).
    pub digest: Option<FileDigest>,
    pub stamp: Stamp,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Record {
    origin: String,
    files: BTreeMap<String, CachedFile>,
}

/// How a cached file stands against what S3 lists now.
pub enum Lookup {
    /// Same object, verified at write time and not changed since: use without hashing.
    Verified(PathBuf),
    /// Same object, but the file changed on disk (or was never verified): hash it before use.
    Changed(PathBuf),
    /// Not cached, or cached from another version of the object.
    Missing,
}

/// One model's folder, locked. Exclusive while it is checked and filled; [`Entry::pin`] turns
/// it into the shared lock a loaded model holds.
pub struct Entry {
    dir: PathBuf,
    lock: File,
    record: Record,
}

/// Keeps a cached model from being evicted while it is loaded (a shared `flock`).
#[derive(Debug)]
pub struct Pin {
    _lock: File,
    /// Work that writes into the model's folder after the load (the tiles kept for the next
    /// start, [`crate::tiles`]): finished before the lock is let go.
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Pin {
    /// Holds `writer` until it is done, and the model's folder until then.
    pub fn finish_before_release(&mut self, writer: std::thread::JoinHandle<()>) {
        self.writer = Some(writer);
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock takes a file descriptor and an operation and touches no memory; the
        // descriptor is valid for as long as `file` is borrowed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Opens and locks `dir/lock`, retrying if the folder was evicted while this process waited
/// (the lock it got would belong to a deleted file).
fn lock_dir(dir: &Path, op: libc::c_int) -> std::io::Result<File> {
    loop {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        flock(&file, op)?;
        match std::fs::metadata(&path) {
            Ok(now) if now.ino() == file.metadata()?.ino() => return Ok(file),
            _ => continue,
        }
    }
}

impl Tier {
    fn entry_dir(&self, origin: &str) -> PathBuf {
        use sha2::Digest;
        let hash = hex::encode(sha2::Sha256::digest(origin.as_bytes()));
        self.dir.join(&hash[..16])
    }

    /// Opens the model's folder with an exclusive lock, waiting for another process that holds
    /// it (blocking: call from a blocking thread).
    pub fn open(&self, origin: &str) -> Result<Entry> {
        let dir = self.entry_dir(origin);
        let lock = lock_dir(&dir, libc::LOCK_EX).map_err(|e| LoadError::io(&dir, e))?;
        let record = std::fs::read(dir.join(ENTRY_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            .filter(|r| r.origin == origin)
            .unwrap_or_else(|| Record { origin: origin.to_string(), files: BTreeMap::new() });
        // The lock file's modification time is the entry's last use, for eviction.
        let _ = lock.set_modified(std::time::SystemTime::now());
        // Whoever writes into the folder holds its lock (exclusive to fill it, shared while it
        // writes the tiles of a model in use): with the exclusive lock held, a partial file is
        // what a process that died mid-write left behind.
        if let Ok(read) = std::fs::read_dir(&dir) {
            for stale in read.flatten().filter(|e| e.file_name().to_string_lossy().contains(".partial-")) {
                tracing::info!(file = %stale.path().display(), "cache: removing a partial file a stopped process left");
                let _ = std::fs::remove_file(stale.path());
            }
        }
        Ok(Entry { dir, lock, record })
    }

    /// Deletes least recently used models (never `keep`, never one another process has
    /// locked) until `incoming` more bytes fit under the limit. Returns the bytes freed.
    pub fn make_room(&self, incoming: u64, keep: &Entry) -> u64 {
        let Some(max) = self.max_bytes else { return 0 };
        let Ok(read) = std::fs::read_dir(&self.dir) else { return 0 };
        let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
        for dir in read.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
            let used =
                std::fs::metadata(dir.join(LOCK_FILE)).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            entries.push((used, dir_size(&dir), dir));
        }
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort_by_key(|e| e.0);
        let mut freed = 0;
        for (_, size, dir) in entries {
            if total + incoming <= max {
                break;
            }
            if dir == keep.dir {
                continue;
            }
            let Ok(lock) = std::fs::OpenOptions::new().write(true).open(dir.join(LOCK_FILE)) else { continue };
            if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_err() {
                tracing::info!(entry = %dir.display(), "cache: not evicting a model another process is using");
                continue;
            }
            if std::fs::remove_dir_all(&dir).is_ok() {
                tracing::info!(entry = %dir.display(), bytes = size, "cache: evicted the least recently used model");
                total -= size;
                freed += size;
            }
        }
        if total + incoming > max {
            tracing::warn!(
                cache = %self.dir.display(),
                max_bytes = max,
                needed = total + incoming,
                "cache: the model does not fit under the cache limit with the models in use; caching it anyway"
            );
        }
        freed
    }
}

/// Bytes the whole cache at `root` holds (every model's folder).
pub fn total_size(root: &Path) -> u64 {
    std::fs::read_dir(root)
        .map(|r| r.flatten().map(|e| e.path()).filter(|p| p.is_dir()).map(|p| dir_size(&p)).sum())
        .unwrap_or(0)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|r| r.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

impl Entry {
    /// Where file `name` lives in the cache.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A temporary name to download `name` into, renamed by [`Entry::commit`].
    pub fn partial_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.partial-{}", std::process::id()))
    }

    /// How the cached copy of `name` stands against the object S3 lists now (`etag`, `size`)
    /// and the manifest's entry for it (`digest`; None when the model has no manifest).
    pub fn lookup(&self, name: &str, etag: &str, size: u64, digest: Option<&FileDigest>) -> Lookup {
        let Some(cached) = self.record.files.get(name) else { return Lookup::Missing };
        if etag.is_empty() || cached.etag != etag || cached.size != size || cached.digest.as_ref() != digest {
            return Lookup::Missing;
        }
        let path = self.path(name);
        match std::fs::metadata(&path) {
            Ok(meta) if Stamp::of(&meta) == cached.stamp && digest.is_some() => Lookup::Verified(path),
            Ok(meta) if meta.len() == size => Lookup::Changed(path),
            _ => Lookup::Missing,
        }
    }

    /// Records that the file at `path` (now verified against `digest`, or unverified when
    /// None) is the cached copy of `name`, renaming it into place first if it is a partial.
    pub fn commit(&mut self, name: &str, path: &Path, etag: &str, digest: Option<FileDigest>) -> Result<PathBuf> {
        let target = self.path(name);
        if path != target {
            std::fs::rename(path, &target).map_err(|e| LoadError::io(&target, e))?;
        }
        let meta = std::fs::metadata(&target).map_err(|e| LoadError::io(&target, e))?;
        let cached = CachedFile { etag: etag.to_string(), size: meta.len(), digest, stamp: Stamp::of(&meta) };
        self.record.files.insert(name.to_string(), cached);
        Ok(target)
    }

    /// Forgets (and deletes) the cached copy of `name`, and anything kept beside it.
    pub fn drop_file(&mut self, name: &str) {
        self.record.files.remove(name);
        crate::tiles::remove(&self.path(name));
        let _ = std::fs::remove_file(self.path(name));
    }

    /// The model's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stamp `name` had when it was verified (or last committed).
    pub fn stamp(&self, name: &str) -> Option<Stamp> {
        self.record.files.get(name).map(|f| f.stamp)
    }

    /// Writes `entry.json` (by rename) and turns the exclusive lock into the shared one the
    /// loaded model holds.
    pub fn pin(self) -> Result<Pin> {
        let path = self.dir.join(ENTRY_FILE);
        let tmp = self.dir.join(format!("{ENTRY_FILE}.{}", std::process::id()));
        let text = serde_json::to_vec_pretty(&self.record)
            .map_err(|e| LoadError::BadJson { file: ENTRY_FILE.into(), message: e.to_string() })?;
        std::fs::write(&tmp, text).map_err(|e| LoadError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| LoadError::io(&path, e))?;
        flock(&self.lock, libc::LOCK_SH).map_err(|e| LoadError::io(&self.dir, e))?;
        Ok(Pin { _lock: self.lock, writer: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partial file a stopped process left in a model's folder is removed by the next
    /// process that takes the folder's exclusive lock; finished files stay.
    #[test]
    fn partial_files_left_by_a_stopped_process_are_removed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let tier = Tier { dir: dir.path().to_path_buf(), max_bytes: None };
        let entry = tier.open("s3://b/m")?;
        let folder = entry.dir().to_path_buf();
        std::fs::write(folder.join("model.gguf.partial-999999"), b"half")?;
        std::fs::write(folder.join("model.gguf.tiles.partial-999999"), b"half")?;
        std::fs::write(folder.join("model.gguf"), b"whole")?;
        drop(entry.pin()?);
        let _again = tier.open("s3://b/m")?;
        let mut names: Vec<String> =
            std::fs::read_dir(&folder)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["entry.json", "lock", "model.gguf"]);
        Ok(())
    }
}
