//! Exact reproduction of stored paths: the NAR (`dump_nar`, checked against the stored
//! NarHash as it is written) and the file tree `nix-store --restore` makes (`export`).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kof_nar::nar::NarWriter;
use kof_nar::{NixHash, StorePath};
use sha2::{Digest as _, Sha256};

use crate::error::StoreError;
use crate::tree::{unwrap_io, NodeKind};
use crate::Store;

/// Modes `nix-store --restore` gives (it sets umask 022 itself, whatever the caller's):
/// directories and executables 0755, other files 0644.
const DIR_MODE: u32 = 0o755;
const EXEC_MODE: u32 = 0o755;
const FILE_MODE: u32 = 0o644;

/// Passes bytes on to `inner` while hashing them (kof-nar's `HashingReader` is the read side).
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn corrupt_tree(path: &StorePath) -> StoreError {
    StoreError::CorruptMetadata(format!("tree of {path} is not in NAR order"))
}

impl Store {
    /// Writes the NAR of a stored path. The bytes are hashed as they go out and compared with
    /// the stored NarHash at the end: a mismatch (a corrupt store) is an error, though the
    /// bytes are already written by then.
    pub fn dump_nar(&self, path: &StorePath, out: &mut dyn Write) -> Result<(), StoreError> {
        let info = self
            .path_info(path)?
            .ok_or_else(|| StoreError::PathNotFound(path.clone()))?;
        let nodes = self.tree(path)?;
        let out_err = |e: io::Error| {
            unwrap_io(e, |e| {
                StoreError::io("writing NAR of", path.to_absolute(), e)
            })
        };
        let mut hw = HashingWriter {
            inner: out,
            hasher: Sha256::new(),
            count: 0,
        };
        let mut w = NarWriter::new(&mut hw).map_err(out_err)?;
        let mut open_dirs: Vec<u64> = Vec::new();
        for n in &nodes {
            if let Some(parent) = n.parent {
                loop {
                    match open_dirs.last() {
                        None => return Err(corrupt_tree(path)),
                        Some(&d) if d == parent => break,
                        Some(_) => {
                            open_dirs.pop();
                            w.end_directory().map_err(out_err)?;
                            w.end_entry().map_err(out_err)?;
                        }
                    }
                }
                w.entry(&n.name).map_err(out_err)?;
            } else if n.id != 0 {
                return Err(corrupt_tree(path));
            }
            match &n.kind {
                NodeKind::Directory => {
                    w.begin_directory().map_err(out_err)?;
                    open_dirs.push(n.id);
                    continue;
                }
                NodeKind::Regular {
                    executable,
                    content,
                } => {
                    let mut r = self.open_file(content)?;
                    w.regular(*executable, content.size, &mut r)
                        .map_err(out_err)?;
                }
                NodeKind::Symlink { target } => w.symlink(target).map_err(out_err)?,
            }
            if n.parent.is_some() {
                w.end_entry().map_err(out_err)?;
            }
        }
        while open_dirs.pop().is_some() {
            w.end_directory().map_err(out_err)?;
            if !open_dirs.is_empty() {
                w.end_entry().map_err(out_err)?;
            }
        }
        w.finish().map_err(out_err)?;
        let got = NixHash(hw.hasher.finalize().into());
        if got != info.nar_hash || hw.count != info.nar_size {
            return Err(StoreError::DumpMismatch {
                path: path.clone(),
                expected: info.nar_hash,
                got,
            });
        }
        Ok(())
    }

    /// Writes a stored path's tree to `dir` (which must not exist; its parent must), exactly
    /// as `nix-store --restore` would: directories 0755, executables 0755, other files 0644,
    /// symlinks verbatim.
    pub fn export(&self, path: &StorePath, dir: &Path) -> Result<(), StoreError> {
        if fs::symlink_metadata(dir).is_ok() {
            return Err(StoreError::ExportTargetExists(dir.to_path_buf()));
        }
        let nodes = self.tree(path)?;
        let mut dirs: HashMap<u64, PathBuf> = HashMap::new();
        for n in &nodes {
            let target = match n.parent {
                None => dir.to_path_buf(),
                Some(p) => dirs
                    .get(&p)
                    .ok_or_else(|| corrupt_tree(path))?
                    .join(OsStr::from_bytes(&n.name)),
            };
            match &n.kind {
                NodeKind::Directory => {
                    fs::create_dir(&target)
                        .and_then(|()| {
                            fs::set_permissions(&target, Permissions::from_mode(DIR_MODE))
                        })
                        .map_err(|e| StoreError::io("creating directory", &target, e))?;
                    dirs.insert(n.id, target);
                }
                NodeKind::Regular {
                    executable,
                    content,
                } => {
                    let io_err = |e| StoreError::io("writing", &target, e);
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&target)
                        .map_err(io_err)?;
                    let mut r = self.open_file(content)?;
                    io::copy(&mut r, &mut f).map_err(|e| unwrap_io(e, io_err))?;
                    let mode = if *executable { EXEC_MODE } else { FILE_MODE };
                    f.set_permissions(Permissions::from_mode(mode))
                        .map_err(io_err)?;
                }
                NodeKind::Symlink { target: to } => {
                    std::os::unix::fs::symlink(OsStr::from_bytes(to), &target)
                        .map_err(|e| StoreError::io("creating symlink", &target, e))?;
                }
            }
        }
        Ok(())
    }
}
