//! Reading store files locally, with no network: from the store when the path is stored, else
//! from its partial NAR file after asking an [`Ensure`] to make the bytes present. Usable in
//! another process than the engine (the FUSE server), whose `Ensure` is the daemon client.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kof_fuse::{ContentSource, FileRef};
use kof_nar::StorePath;
use kof_store::{Codec, FileContent, NodeKind, Store};

use super::Ensure;

/// The partial NAR file of `path` in the store directory `store_dir`.
pub fn partial_file(store_dir: &Path, path: &StorePath) -> PathBuf {
    store_dir
        .join("partial")
        .join(format!("{}.nar", path.hash_part()))
}

/// A stored path's files by NAR offset.
type FileMap = Arc<HashMap<u64, FileContent>>;

/// Reads files of store paths from the store or from partial NAR files.
pub struct LocalReader {
    store: Arc<Store>,
    /// Stored paths' files by NAR offset, by base name. Stored paths never change.
    stored: Mutex<HashMap<Arc<str>, FileMap>>,
}

fn invalid(file: &FileRef, what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}/{}: {what}", file.store_path, file.path),
    )
}

impl LocalReader {
    /// A reader over `store`.
    pub fn new(store: Arc<Store>) -> LocalReader {
        LocalReader {
            store,
            stored: Mutex::new(HashMap::new()),
        }
    }

    /// The store read from.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn store_path(file: &FileRef) -> io::Result<StorePath> {
        StorePath::from_base_name(&file.store_path).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{:?}: {e}", file.store_path),
            )
        })
    }

    /// The files of `file`'s path if it is known to be stored.
    fn cached_files(&self, file: &FileRef) -> Option<FileMap> {
        self.stored
            .lock()
            .expect("stored map poisoned")
            .get(&file.store_path)
            .cloned()
    }

    /// The files of `path` if it is stored.
    fn stored_files(&self, file: &FileRef, path: &StorePath) -> io::Result<Option<FileMap>> {
        if let Some(m) = self.cached_files(file) {
            return Ok(Some(m));
        }
        if !self.store.has_path(path).map_err(io::Error::other)? {
            return Ok(None);
        }
        let nodes = self.store.tree(path).map_err(io::Error::other)?;
        let map: HashMap<u64, FileContent> = nodes
            .into_iter()
            .filter_map(|n| match (n.kind, n.nar_offset) {
                (NodeKind::Regular { content, .. }, Some(off)) => Some((off, content)),
                _ => None,
            })
            .collect();
        let map = Arc::new(map);
        self.stored
            .lock()
            .expect("stored map poisoned")
            .insert(file.store_path.clone(), map.clone());
        Ok(Some(map))
    }

    /// The stored content of `file`, checked against the file's size.
    fn content(&self, file: &FileRef, files: &FileMap) -> io::Result<FileContent> {
        let c = files.get(&file.nar_offset).ok_or_else(|| {
            invalid(
                file,
                format!("no stored file at NAR offset {}", file.nar_offset),
            )
        })?;
        if c.size != file.size {
            return Err(invalid(
                file,
                format!(
                    "stored file has {} bytes, the view says {}",
                    c.size, file.size
                ),
            ));
        }
        Ok(*c)
    }

    fn read_stored(
        &self,
        file: &FileRef,
        files: &FileMap,
        offset: u64,
        len: usize,
    ) -> io::Result<Vec<u8>> {
        let content = self.content(file, files)?;
        let mut buf = vec![0u8; len];
        let n = self
            .store
            .read_file_range(&content, offset, &mut buf)
            .map_err(io::Error::other)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads up to `size` bytes of `file` at `offset` (short only at its end). A file of a
    /// stored path is read from the store; otherwise `ensure` is asked for its NAR bytes,
    /// which are then read from the partial file (or from the store, if the path was
    /// committed meanwhile and the partial file is gone).
    pub fn read(
        &self,
        file: &FileRef,
        offset: u64,
        size: u32,
        ensure: &dyn Ensure,
    ) -> io::Result<Vec<u8>> {
        if offset >= file.size || size == 0 {
            return Ok(Vec::new());
        }
        let len = (file.size - offset).min(size as u64) as usize;
        let path = Self::store_path(file)?;
        let partial = partial_file(self.store.dir(), &path);
        // A path being fetched has a partial file (and is not stored): no database query for
        // each of its reads. Otherwise ask the store (answers are kept once stored).
        let fetching = self.cached_files(file).is_none() && partial.exists();
        if !fetching {
            if let Some(files) = self.stored_files(file, &path)? {
                return self.read_stored(file, &files, offset, len);
            }
        }
        let start = file.nar_offset + offset;
        let end = start + len as u64;
        tracing::trace!(store_path = %file.store_path, file = %file.path, offset, len, "read of a path not stored");
        if let Err(e) = ensure.ensure(&file.store_path, start, end) {
            tracing::warn!(store_path = %file.store_path, file = %file.path, offset, len,
                error = %e, "read failed: bytes not available");
            return Err(e);
        }
        // Opened after `ensure` returned, so the bytes are in the file opened.
        match File::open(&partial) {
            Ok(f) => {
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, start)?;
                Ok(buf)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Committed (or refused) since `ensure` returned.
                match self.stored_files(file, &path)? {
                    Some(files) => self.read_stored(file, &files, offset, len),
                    None => Err(io::Error::other(format!(
                        "{}/{}: the partial file vanished and the path is not stored (refused?)",
                        file.store_path, file.path
                    ))),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// When `file` is stored as one raw object (its object file holds exactly its bytes), that
    /// file opened, for FUSE passthrough.
    pub fn backing_file(&self, file: &FileRef) -> Option<File> {
        let path = Self::store_path(file).ok()?;
        let files = self.stored_files(file, &path).ok()??;
        let content = self.content(file, &files).ok()?;
        if content.chunked || content.size == 0 {
            return None;
        }
        let pieces = self.store.file_pieces(&content).ok()?;
        match pieces.as_slice() {
            [p] if p.object.codec == Codec::Raw
                && p.object.size == content.size
                && p.object.stored_size == content.size =>
            {
                let f = File::open(self.store.object_path(&p.object.digest)).ok()?;
                (f.metadata().ok()?.len() == content.size).then_some(f)
            }
            _ => None,
        }
    }
}

/// The [`ContentSource`] of a lazy view: local reads, and an [`Ensure`] for missing bytes (the
/// engine in process, the daemon client in the FUSE server).
pub struct LazyContent {
    /// Local reads.
    pub local: LocalReader,
    /// Who fetches missing bytes.
    pub ensure: Arc<dyn Ensure>,
}

impl ContentSource for LazyContent {
    fn read(&self, file: &FileRef, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        self.local.read(file, offset, size, &*self.ensure)
    }

    fn backing_file(&self, file: &FileRef) -> Option<File> {
        self.local.backing_file(file)
    }
}
