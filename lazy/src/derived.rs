//! This crate's derived data in the store directory, measured and evicted: the raw copies
//! (`<store_dir>/raw/<2 hex>/<64 hex>`, see [`crate::local`]) and the partial NARs
//! (`<store_dir>/partial/<hashpart>.nar` and their `.json` records, see `engine/partial.rs`).
//! Neither is needed for correctness: a raw copy is written again on the next open that wants
//! it, and a partial NAR's bytes are fetched again. The node daemon evicts them when the store
//! is over its quota or a write found no space ([`evict_derived`]): first what serves nothing
//! (raw copies of contents no stored path holds any more, partial NARs no engine has open),
//! and raw copies of stored files only as a last resort, as the next open of such a file
//! writes its copy again.
//!
//! What is never removed:
//! - a partial NAR an engine has open (any engine, in any process): each holds a shared lock
//!   on its partial files, and eviction removes one only under an exclusive lock taken without
//!   waiting, the rule every removal of a partial file follows;
//! - a file being written (a `.tmp-*` file younger than [`TMP_MIN_AGE`]).
//!
//! Removing a raw copy is safe at any moment: a passthrough file already open keeps its
//! descriptor, and the next open that finds the copy missing reads through FUSE and writes it
//! again.

use std::fs::{self, File, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use thiserror::Error;

/// A `.tmp-*` file (a raw copy or a partial record being written) is left alone until it is
/// this old.
pub const TMP_MIN_AGE: Duration = Duration::from_secs(3600);

/// Why derived data could not be measured or evicted.
#[derive(Debug, Error)]
#[error("{action} {}", path.display())]
pub struct DerivedError {
    /// What was being done.
    pub action: &'static str,
    /// On what.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

fn err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DerivedError {
    let path = path.to_path_buf();
    move |source| DerivedError {
        action,
        path,
        source,
    }
}

/// Derived data on disk (bytes are the disk space used: partial NARs are sparse).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DerivedUsage {
    /// Raw copies.
    pub raw_files: u64,
    /// Their bytes on disk.
    pub raw_bytes: u64,
    /// Partial NARs (records not counted as files).
    pub partial_files: u64,
    /// Bytes on disk of partial NARs and their records.
    pub partial_bytes: u64,
}

impl DerivedUsage {
    /// All bytes of derived data on disk.
    pub fn bytes(&self) -> u64 {
        self.raw_bytes + self.partial_bytes
    }
}

/// What [`evict_derived`] removed (bytes on disk).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DerivedEviction {
    /// Raw copies removed.
    pub raw_files: u64,
    /// Their bytes.
    pub raw_bytes: u64,
    /// Partial NARs removed (with their records).
    pub partial_files: u64,
    /// Their bytes.
    pub partial_bytes: u64,
    /// Partial NARs left because an engine has them open.
    pub partial_in_use: u64,
}

impl DerivedEviction {
    /// All bytes freed.
    pub fn bytes(&self) -> u64 {
        self.raw_bytes + self.partial_bytes
    }
}

/// Disk space a file uses.
fn disk_bytes(m: &fs::Metadata) -> u64 {
    m.blocks() * 512
}

fn is_young_tmp(name: &str, m: &fs::Metadata) -> bool {
    name.starts_with(".tmp-")
        && m.modified()
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_none_or(|age| age < TMP_MIN_AGE)
}

/// The entries of `dir` (none if it does not exist).
fn entries(dir: &Path) -> Result<Vec<fs::DirEntry>, DerivedError> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .collect::<Result<Vec<_>, _>>()
            .map_err(err("listing", dir)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(err("listing", dir)(e)),
    }
}

/// Raw copies with their metadata: (path, disk bytes, last access).
fn raw_copies(store_dir: &Path) -> Result<Vec<(PathBuf, u64, i64)>, DerivedError> {
    let mut out = Vec::new();
    for fan in entries(&store_dir.join("raw"))? {
        for e in entries(&fan.path())? {
            let Ok(m) = e.metadata() else { continue };
            let name = e.file_name();
            if !m.is_file() || is_young_tmp(&name.to_string_lossy(), &m) {
                continue;
            }
            out.push((e.path(), disk_bytes(&m), m.atime()));
        }
    }
    Ok(out)
}

/// Measures the derived data under `store_dir`.
pub fn derived_usage(store_dir: &Path) -> Result<DerivedUsage, DerivedError> {
    let mut u = DerivedUsage::default();
    for (_, bytes, _) in raw_copies(store_dir)? {
        u.raw_files += 1;
        u.raw_bytes += bytes;
    }
    for e in entries(&store_dir.join("partial"))? {
        let Ok(m) = e.metadata() else { continue };
        if !m.is_file() {
            continue;
        }
        if e.file_name().to_string_lossy().ends_with(".nar") {
            u.partial_files += 1;
        }
        u.partial_bytes += disk_bytes(&m);
    }
    Ok(u)
}

fn remove(path: &Path) -> Result<bool, DerivedError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(err("removing", path)(e)),
    }
}

/// Removes derived data under `store_dir` until at least `want` bytes of disk are freed (or
/// none is left that may go; `u64::MAX` for all): raw copies first, least recently accessed
/// first, but those whose content digest (hex, the copy's name) `keep_raw` keeps, then partial
/// NARs no engine has open (with their records), oldest first, and records whose partial NAR
/// is gone.
pub fn evict_derived(
    store_dir: &Path,
    want: u64,
    keep_raw: &mut dyn FnMut(&str) -> bool,
) -> Result<DerivedEviction, DerivedError> {
    let mut ev = DerivedEviction::default();
    let mut raw = raw_copies(store_dir)?;
    raw.sort_by_key(|(_, _, atime)| *atime);
    for (path, bytes, _) in raw {
        if ev.bytes() >= want {
            return Ok(ev);
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| keep_raw(&n)) {
            continue;
        }
        if remove(&path)? {
            ev.raw_files += 1;
            ev.raw_bytes += bytes;
        }
    }
    let dir = store_dir.join("partial");
    let mut partials = Vec::new();
    for e in entries(&dir)? {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(m) = e.metadata() else { continue };
        if !m.is_file() {
            continue;
        }
        if name.ends_with(".nar") {
            partials.push((e.path(), m.mtime()));
        } else if name.ends_with(".json") && !e.path().with_extension("nar").exists() {
            // A record without its partial NAR names nothing.
            let bytes = disk_bytes(&m);
            if remove(&e.path())? {
                ev.partial_bytes += bytes;
            }
        } else if name.starts_with(".tmp-") && !is_young_tmp(&name, &m) {
            let bytes = disk_bytes(&m);
            if remove(&e.path())? {
                ev.partial_bytes += bytes;
            }
        }
    }
    partials.sort_by_key(|(_, mtime)| *mtime);
    for (path, _) in partials {
        if ev.bytes() >= want {
            break;
        }
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err("opening", &path)(e)),
        };
        match f.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                ev.partial_in_use += 1;
                continue;
            }
            Err(TryLockError::Error(e)) => return Err(err("locking", &path)(e)),
        }
        // Under the exclusive lock: the name must still name the locked file (an engine may
        // have removed it and made a new one since the open).
        let (a, b) = match (f.metadata(), fs::metadata(&path)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => continue,
        };
        if a.dev() != b.dev() || a.ino() != b.ino() {
            continue;
        }
        let record = path.with_extension("json");
        let record_bytes = fs::metadata(&record).map(|m| disk_bytes(&m)).unwrap_or(0);
        // The record first: a record without its file is ignored, never the other way round.
        if remove(&record)? {
            ev.partial_bytes += record_bytes;
        }
        if remove(&path)? {
            ev.partial_files += 1;
            ev.partial_bytes += disk_bytes(&a);
        }
        drop(f);
    }
    Ok(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_copies_go_first_and_partials_in_use_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::create_dir_all(dir.join("raw/ab")).unwrap();
        fs::create_dir_all(dir.join("partial")).unwrap();
        fs::write(
            dir.join("raw/ab").join("ab".repeat(32)),
            vec![1u8; 64 << 10],
        )
        .unwrap();
        fs::write(dir.join("raw/ab/.tmp-x-1-0"), vec![1u8; 4096]).unwrap();
        fs::write(dir.join("partial/aaa.nar"), vec![2u8; 32 << 10]).unwrap();
        fs::write(dir.join("partial/aaa.json"), b"{}").unwrap();
        fs::write(dir.join("partial/bbb.nar"), vec![3u8; 32 << 10]).unwrap();
        fs::write(dir.join("partial/ccc.json"), b"{}").unwrap();
        let u = derived_usage(dir).unwrap();
        assert_eq!((u.raw_files, u.partial_files), (1, 2));

        // An engine holds bbb.
        let held = File::open(dir.join("partial/bbb.nar")).unwrap();
        held.lock_shared().unwrap();

        // Raw copies kept by the predicate stay; unused partial NARs and orphan records go.
        let ev = evict_derived(dir, u64::MAX, &mut |_| true).unwrap();
        assert_eq!(ev.raw_files, 0);
        assert_eq!(ev.partial_files, 1);
        assert_eq!(ev.partial_in_use, 1);
        assert!(!dir.join("partial/aaa.nar").exists());
        assert!(!dir.join("partial/aaa.json").exists());
        assert!(!dir.join("partial/ccc.json").exists());
        assert!(dir.join("partial/bbb.nar").exists(), "in use by an engine");

        // Asking for little removes one raw copy, not a copy being written.
        let ev = evict_derived(dir, 1, &mut |_| false).unwrap();
        assert_eq!(ev.raw_files, 1);
        assert!(
            dir.join("raw/ab/.tmp-x-1-0").exists(),
            "a copy being written stays"
        );

        drop(held);
        let ev = evict_derived(dir, u64::MAX, &mut |_| false).unwrap();
        assert_eq!(ev.partial_files, 1);
        assert_eq!(derived_usage(dir).unwrap().partial_files, 0);
    }
}
