//! Reading store files locally, with no network: from the store when the path is stored, else
//! from its partial NAR file after asking an [`Ensure`] to make the bytes present. Usable in
//! another process than the engine (the FUSE server), whose `Ensure` is the daemon client.
//!
//! For FUSE passthrough a stored file needs a local file holding exactly its bytes. A file
//! stored as one raw object has one (its object file). Others (zstd-compressed, or chunked)
//! get a materialized raw copy at `<store_dir>/raw/<2 hex>/<BLAKE3 hex of the content>`,
//! written in the background on the first open that asks for it (that open, and those until
//! the copy is in place, read through FUSE as before). Only files of at least
//! [`RAW_CACHE_MIN`] bytes are materialized: smaller ones cost little through FUSE and would
//! mostly add inodes. The copy is verified on creation (its BLAKE3 must equal the content's
//! digest, else it is dropped) and renamed into place complete, mode 0444; a copy of the wrong
//! size is never used (it is removed and written again). A copy that finds the file system
//! full (`ENOSPC`, `EDQUOT`) is removed and simply skipped: no copy is started for
//! [`RAW_CACHE_FULL_PAUSE`], and the file is read through FUSE meanwhile. `raw/` is derived
//! data: the store's gc does not look at it, and the whole directory may be deleted at any
//! time (copies of paths gc removed stay until then).

use kof_node_api::report::chain;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kof_fuse::{ContentSource, FileRef};
use kof_nar::StorePath;
use kof_store::{Codec, Digest, FileContent, NodeKind, Store};
use parking_lot::Mutex;

use super::Ensure;

/// The partial NAR file of `path` in the store directory `store_dir`.
pub fn partial_file(store_dir: &Path, path: &StorePath) -> PathBuf {
    store_dir
        .join("partial")
        .join(format!("{}.nar", path.hash_part()))
}

/// A stored path's files by NAR offset.
type FileMap = Arc<HashMap<u64, FileContent>>;

/// The smallest file given a materialized raw copy for passthrough (16 KiB).
pub const RAW_CACHE_MIN: u64 = 16 << 10;

/// At most this many raw copies are written at once (each is one background thread); an
/// open finding them all busy starts none, and a later open of the file tries again.
pub const RAW_CACHE_WRITERS: usize = 2;

/// The materialized raw copy of the file content `digest` in the store directory `store_dir`.
pub fn raw_file(store_dir: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.to_hex();
    store_dir.join("raw").join(&hex[..2]).join(hex)
}

/// After a raw copy found the file system full, no copy is started for this long: passthrough
/// is an optimisation, and the space is better left to the store (a copy failing that way is
/// not marked failed, so its file gets one once there is room).
pub const RAW_CACHE_FULL_PAUSE: std::time::Duration = std::time::Duration::from_secs(30);

/// Raw copies being written, contents whose copy failed (not tried again by this process),
/// and until when copies are skipped because the file system was found full.
#[derive(Default)]
struct RawWriters {
    running: HashSet<Digest>,
    failed: HashSet<Digest>,
    full_until: Option<std::time::Instant>,
}

/// Reads files of store paths from the store or from partial NAR files.
pub struct LocalReader {
    store: Arc<Store>,
    /// Stored paths' files by NAR offset, by base name. A stored path never changes; one a gc
    /// removed is dropped at its first failed read.
    stored: Mutex<HashMap<Arc<str>, FileMap>>,
    raw: Arc<Mutex<RawWriters>>,
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
            raw: Arc::default(),
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
                format!("{:?}: {}", file.store_path, chain(&e)),
            )
        })
    }

    /// The files of `file`'s path if it is known to be stored.
    fn cached_files(&self, file: &FileRef) -> Option<FileMap> {
        self.stored.lock().get(&file.store_path).cloned()
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
            .insert(file.store_path.clone(), map.clone());
        Ok(Some(map))
    }

    /// Drops the cached files of `file`'s path if the path is no longer stored (a gc on the
    /// live node removed it): `true` if so.
    fn forget_if_gone(&self, file: &FileRef, path: &StorePath) -> bool {
        if self.store.has_path(path).unwrap_or(true) {
            return false;
        }
        self.stored.lock().remove(&file.store_path);
        true
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
                match self.read_stored(file, &files, offset, len) {
                    Ok(buf) => return Ok(buf),
                    // Removed by a gc since its files were cached: fetched again below.
                    Err(_) if self.forget_if_gone(file, &path) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let start = file.nar_offset + offset;
        let end = start + len as u64;
        tracing::trace!(store_path = %file.store_path, file = %file.path, offset, len, "read of a path not stored");
        if let Err(e) = ensure.ensure(&file.store_path, start, end) {
            tracing::warn!(store_path = %file.store_path, file = %file.path, offset, len,
                error = %chain(&e), "read failed: bytes not available");
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

    /// A file holding exactly `file`'s bytes, opened, for FUSE passthrough: its object file
    /// when it is stored as one raw object, else its materialized raw copy once written (see
    /// the module doc). `None` for a path not stored, a file under `RAW_CACHE_MIN` (16 KiB) that is
    /// not one raw object, or while its copy is being written (the first call starts that).
    pub fn backing_file(&self, file: &FileRef) -> Option<File> {
        let path = Self::store_path(file).ok()?;
        let files = self.stored_files(file, &path).ok()??;
        let content = self.content(file, &files).ok()?;
        if content.size == 0 {
            return None;
        }
        if !content.chunked {
            let pieces = self.store.file_pieces(&content).ok()?;
            if let [p] = pieces.as_slice() {
                if p.object.codec == Codec::Raw
                    && p.object.size == content.size
                    && p.object.stored_size == content.size
                {
                    let f = File::open(self.store.object_path(&p.object.digest)).ok()?;
                    return (f.metadata().ok()?.len() == content.size).then_some(f);
                }
            }
        }
        if content.size < RAW_CACHE_MIN {
            return None;
        }
        self.raw_copy(file, content)
    }

    /// The raw copy of `content` if it is in place with the right size; else starts writing
    /// it (unless already being written, or failed before) and returns `None`.
    fn raw_copy(&self, file: &FileRef, content: FileContent) -> Option<File> {
        let dest = raw_file(self.store.dir(), &content.digest);
        match File::open(&dest) {
            Ok(f) => match f.metadata() {
                Ok(m) if m.len() == content.size => return Some(f),
                Ok(m) => {
                    tracing::warn!(store_path = %file.store_path, file = %file.path,
                        raw = %dest.display(), has = m.len(), size = content.size,
                        "raw copy has the wrong size: removing it");
                    drop(f);
                    if let Err(e) = fs::remove_file(&dest) {
                        tracing::warn!(raw = %dest.display(), error = %chain(&e), "removing a raw copy");
                        return None;
                    }
                }
                Err(_) => return None,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::debug!(raw = %dest.display(), error = %chain(&e), "opening a raw copy");
                return None;
            }
        }
        {
            let mut w = self.raw.lock();
            if w.failed.contains(&content.digest)
                || w.running.contains(&content.digest)
                || w.running.len() >= RAW_CACHE_WRITERS
                || w.full_until.is_some_and(|t| std::time::Instant::now() < t)
            {
                return None;
            }
            w.running.insert(content.digest);
        }
        let (store, raw) = (self.store.clone(), self.raw.clone());
        let what = format!("{}/{}", file.store_path, file.path);
        let spawned = std::thread::Builder::new()
            .name("kof-raw-copy".into())
            .spawn(move || {
                let res = write_raw_copy(&store, &content, &dest);
                let mut w = raw.lock();
                w.running.remove(&content.digest);
                match res {
                    Ok(()) => tracing::debug!(file = %what, raw = %dest.display(),
                        size = content.size, "raw copy written"),
                    Err(e) if kof_store::is_no_space_io(&e) => {
                        tracing::info!(file = %what, raw = %dest.display(), error = %chain(&e),
                            pause = ?RAW_CACHE_FULL_PAUSE,
                            "raw copy skipped, the file system is full: the file is read through FUSE");
                        w.full_until = Some(std::time::Instant::now() + RAW_CACHE_FULL_PAUSE);
                    }
                    Err(e) => {
                        tracing::warn!(file = %what, raw = %dest.display(), error = %chain(&e),
                            "raw copy not written: the file is read through FUSE");
                        w.failed.insert(content.digest);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %chain(&e), "starting a raw copy writer");
            self.raw.lock().running.remove(&content.digest);
        }
        None
    }
}

/// Writes `content` read from `store` to a temporary file beside `dest`, checks its size and
/// BLAKE3 against the content's, makes it read-only and renames it to `dest`. A failure
/// leaves no file behind. Both the daemon and its FUSE server may write the same copy at once:
/// each writes its own temporary file and the rename makes either complete copy visible.
fn write_raw_copy(store: &Store, content: &FileContent, dest: &Path) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = dest
        .parent()
        .expect("raw copies live in a fan-out directory");
    // `raw/` and its fan-out directory only, never the store directory above them: a copy
    // finishing after its store was removed (a test's temporary store) must not bring the
    // removed tree back.
    let raw = dir.parent().expect("the fan-out directory is in raw/");
    for d in [raw, dir] {
        match fs::create_dir(d) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    let tmp = dir.join(format!(
        ".tmp-{}-{}-{}",
        content.digest.to_hex(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let res = (|| {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&tmp)?;
        let mut reader = store.open_file(content).map_err(io::Error::other)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            total += n as u64;
        }
        if total != content.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the store gave {total} bytes of a {}-byte file",
                    content.size
                ),
            ));
        }
        let got = Digest::from(hasher.finalize());
        if got != content.digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the bytes written hash to {got}, not {}", content.digest),
            ));
        }
        drop(out);
        fs::rename(&tmp, dest)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// The [`ContentSource`] of a lazy view: local reads, and an [`Ensure`] for missing bytes and
/// for the gate of store paths (the engine in process, the daemon client in the FUSE server).
pub struct LazyContent {
    /// Local reads.
    pub local: LocalReader,
    /// Who fetches missing bytes.
    pub ensure: Arc<dyn Ensure>,
    /// Store paths whose gate passed (a path once verified stays verified).
    pub opened: Mutex<HashSet<String>>,
}

impl LazyContent {
    /// A content source reading through `local` and fetching through `ensure`.
    pub fn new(local: LocalReader, ensure: Arc<dyn Ensure>) -> LazyContent {
        LazyContent {
            local,
            ensure,
            opened: Mutex::new(HashSet::new()),
        }
    }
}

impl ContentSource for LazyContent {
    fn gate(&self, store_path: &str) -> io::Result<()> {
        if self.opened.lock().contains(store_path) {
            return Ok(());
        }
        self.ensure.gate(store_path)?;
        self.opened.lock().insert(store_path.to_string());
        Ok(())
    }

    fn read(&self, file: &FileRef, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        self.local.read(file, offset, size, &*self.ensure)
    }

    fn backing_file(&self, file: &FileRef) -> Option<File> {
        self.local.backing_file(file)
    }
}
