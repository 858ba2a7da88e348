//! Partial NAR files across processes: who may write and remove them, the record that lets a
//! later engine resume one, and the sweep a new engine makes of those an earlier process left.
//!
//! # The rule
//!
//! Several engines may use one store at once (two `kof-store run` without the daemon). A
//! partial file `<store_dir>/partial/<hashpart>.nar` is shared by every engine fetching that
//! path: each holds a **shared lock** (`File::lock_shared`) on it while it has the file open,
//! and writes only the chunks it claimed itself. A store path has one NAR, so two engines
//! write the same bytes at the same offsets; should two caches disagree, the ingest's
//! NarHash check refuses the mixture, as it refuses any wrong byte.
//!
//! A partial file is removed (on completion, on refusal, when a stream fails, by the sweep,
//! or when its record does not match) only under an **exclusive lock** taken without waiting
//! (`File::try_lock`): never while another live engine has the file open. An exclusive lock is
//! held only for a removal or an adoption (no network I/O under it), so an engine opening a
//! partial file waits for its shared lock at most that long; after locking it checks that the
//! name still names the locked file (a removal may have come between its open and its lock).
//!
//! # The record
//!
//! A partial file's fetched chunks are known only to the engine that fetched them. At a clean
//! exit, [`LazyStore::save_partials`] writes, for each range-path partial, a record beside it
//! (`<hashpart>.json`): the store path, NarHash, NarSize, the cache and NAR URL it came from,
//! the chunk size, and the chunks filled. Written in this order: the file's data is synced
//! (`fdatasync`), then the record is written to a temporary file, synced and renamed into
//! place, so a record only ever names bytes that are on disk. A killed process writes no
//! record: its bytes are never trusted (an earlier record stays true, as chunks it names are
//! never written again with other bytes).
//!
//! Why at exit rather than as chunks fill: a durable record per chunk would put a disk flush
//! on the path of every demand read; one flush per partial file at exit costs nothing while
//! programs run. The price is that a process killed without its exit path keeps nothing of
//! what it fetched since the last save.
//!
//! A new engine adopts an orphaned partial file (no engine holds it) when its record matches
//! the narinfo it resolves now (same store path, NarHash, NarSize and chunk size, on the range
//! path): its recorded chunks are filled from the start, and a read of them fetches nothing.
//! Adopted bytes are verified like any other: the path enters the store only through the
//! ingest, which checks NarHash and NarSize. A partial file whose record does not match, or
//! that has none, is removed. Stream-path partials (compressed caches, or caches that ignore
//! `Range`) are never recorded: a compressed stream cannot resume at a NAR offset, so the
//! next engine removes them.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use kof_index::VerifiedIndex;
use kof_node_api::report::chain;
use kof_substituter::substituters::Substitute;
use serde::{Deserialize, Serialize};

use super::{Chunk, LazyStore, Mode, Phase};

/// The record format's version.
const RECORD_VERSION: u32 = 2;

/// Largest record read (a record of a 4 GiB NAR in 4 KiB chunks, all filled and scattered,
/// stays well below this).
const MAX_RECORD_BYTES: u64 = 64 << 20;

/// What a partial file holds, written beside it at a clean exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PartialRecord {
    version: u32,
    /// The absolute store path.
    store_path: String,
    /// NarHash of the narinfo the bytes were fetched for.
    nar_hash: String,
    /// NarSize.
    nar_size: u64,
    /// The cache the bytes came from.
    cache: String,
    /// The NAR's URL in that cache.
    url: String,
    /// The SHA-256 of the signed index whose chunks they are.
    index: String,
    /// The chunks present, as runs `[first, end)` of chunk indices.
    chunks: Vec<(usize, usize)>,
}

impl PartialRecord {
    fn new(sub: &Substitute, index: &VerifiedIndex, chunks: Vec<(usize, usize)>) -> PartialRecord {
        PartialRecord {
            version: RECORD_VERSION,
            store_path: sub.info.store_path.to_absolute(),
            nar_hash: sub.info.nar_hash.to_string(),
            nar_size: sub.info.nar_size,
            cache: sub.cache.url().to_string(),
            url: sub.info.url.clone(),
            index: index.digest().to_string(),
            chunks,
        }
    }

    /// Whether it describes the same NAR in the same chunks as `other` (where the bytes came
    /// from does not matter: one NAR is the same bytes from any cache).
    fn same_nar(&self, other: &PartialRecord) -> bool {
        self.version == other.version
            && self.store_path == other.store_path
            && self.nar_hash == other.nar_hash
            && self.nar_size == other.nar_size
            && self.index == other.index
    }
}

/// The record beside the partial file `partial`.
pub(super) fn record_file(partial: &Path) -> PathBuf {
    partial.with_extension("json")
}

/// Whether `f` is the file `path` names now.
fn same_file(f: &File, path: &Path) -> io::Result<bool> {
    let (a, b) = (f.metadata()?, fs::metadata(path)?);
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

/// Opens (creating) the partial file `partial` for writing, under a shared lock.
pub(super) fn open_shared(partial: &Path) -> io::Result<File> {
    loop {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(partial)?;
        f.lock_shared()?;
        match same_file(&f, partial) {
            Ok(true) => return Ok(f),
            // Removed (and perhaps created again) between the open and the lock.
            Ok(false) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Takes the exclusive lock of `f` (the file `partial` names) without waiting: `Ok(false)`
/// when another engine holds it.
fn try_exclusive(f: &File, partial: &Path) -> io::Result<bool> {
    match f.try_lock() {
        Ok(()) => same_file(f, partial),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

fn remove_quietly(file: &Path) {
    if let Err(e) = fs::remove_file(file) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(file = %file.display(), error = %chain(&e), "removing a partial file");
        }
    }
}

/// Removes the partial file `partial` and its record unless another engine has the file open.
/// `file` is this engine's descriptor of it, if it has one (its shared lock is given up).
pub(super) fn remove_unless_shared(file: Option<&File>, partial: &Path) {
    let opened;
    let f = match file {
        Some(f) => f,
        None => match File::open(partial) {
            Ok(f) => {
                opened = f;
                &opened
            }
            Err(_) => return,
        },
    };
    match try_exclusive(f, partial) {
        Ok(true) => {
            remove_quietly(partial);
            remove_quietly(&record_file(partial));
        }
        Ok(false) => {
            tracing::debug!(file = %partial.display(), "partial file in use by another engine: left to it")
        }
        Err(e) => {
            tracing::warn!(file = %partial.display(), error = %chain(&e), "locking a partial file")
        }
    }
}

/// Reads the record of `partial`, if there is a readable one.
fn read_record(partial: &Path) -> Option<PartialRecord> {
    let path = record_file(partial);
    let f = File::open(&path).ok()?;
    if f.metadata().ok()?.len() > MAX_RECORD_BYTES {
        return None;
    }
    match serde_json::from_reader(io::BufReader::new(f)) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(record = %path.display(), error = %chain(&e), "unreadable partial record ignored");
            None
        }
    }
}

/// Adopts the orphaned partial file `partial` of `sub`, whose chunks are those of `index`: the
/// file, under a shared lock, and its chunks present. `None` when there is nothing to adopt:
/// no file, a file another engine holds (left alone), or a file without a matching record
/// (removed). Each recorded chunk is checked against the index again as it is adopted (a
/// chunk that no longer matches is fetched again): bytes are served only once verified.
pub(super) fn adopt(
    partial: &Path,
    sub: &Substitute,
    index: &VerifiedIndex,
) -> Option<(File, Vec<Chunk>)> {
    let n = index.index().chunks.len();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(partial)
        .ok()?;
    match try_exclusive(&f, partial) {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => {
            tracing::warn!(file = %partial.display(), error = %chain(&e), "locking a partial file");
            return None;
        }
    }
    let want = PartialRecord::new(sub, index, Vec::new());
    let adopted = read_record(partial).and_then(|rec| {
        let fits = rec.same_nar(&want)
            && rec.chunks.iter().all(|&(a, b)| a < b && b <= n)
            && f.metadata().is_ok_and(|m| m.len() == sub.info.nar_size);
        fits.then_some(rec)
    });
    let Some(rec) = adopted else {
        tracing::info!(path = %sub.info.store_path, file = %partial.display(),
            "partial file without a matching record: discarded");
        remove_quietly(partial);
        remove_quietly(&record_file(partial));
        return None;
    };
    if let Err(e) = f.lock_shared() {
        tracing::warn!(file = %partial.display(), error = %chain(&e), "locking a partial file");
        return None;
    }
    let mut chunks = vec![Chunk::Missing; n];
    let mut stale = 0;
    for (a, b) in rec.chunks {
        for (i, slot) in chunks.iter_mut().enumerate().take(b).skip(a) {
            let c = &index.index().chunks[i];
            let mut buf = vec![0u8; c.nar_len as usize];
            let ok = f.read_exact_at(&mut buf, c.nar_offset).is_ok()
                && index.check_chunk(i, &buf).is_ok();
            if ok {
                *slot = Chunk::Filled;
            } else {
                stale += 1;
            }
        }
    }
    if stale > 0 {
        tracing::warn!(path = %sub.info.store_path, file = %partial.display(), chunks = stale,
            "recorded chunks that no longer match the index: fetched again");
    }
    Some((f, chunks))
}

/// The sweep of a new engine over `dir`: partial files no live engine holds are removed,
/// unless a record lies beside them (those wait for [`adopt`]); records without their file,
/// and temporary records of processes that are gone, are removed.
pub(super) fn sweep(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.rsplit_once(".tmp-").map(|(_, p)| p) {
            if !Path::new("/proc").join(pid).exists() {
                remove_quietly(&path);
            }
        } else if name.ends_with(".json") {
            if !path.with_extension("nar").exists() {
                remove_quietly(&path);
            }
        } else if name.ends_with(".nar") {
            let Ok(f) = File::open(&path) else {
                continue;
            };
            if matches!(try_exclusive(&f, &path), Ok(true)) && !record_file(&path).exists() {
                remove_quietly(&path);
            }
        }
    }
}

/// Syncs the bytes of `file` (the partial file `partial`) and writes the record `rec` beside
/// it, merged with a record already there for the same NAR (its chunks are on disk too).
fn save(partial: &Path, file: &File, mut rec: PartialRecord) -> io::Result<()> {
    file.sync_data()?;
    if let Some(old) = read_record(partial).filter(|old| old.same_nar(&rec)) {
        rec.chunks = merge_runs(old.chunks.into_iter().chain(rec.chunks));
    }
    let dest = record_file(partial);
    let tmp = dest.with_file_name(format!(
        "{}.tmp-{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        let mut out = File::create(&tmp)?;
        out.write_all(&serde_json::to_vec(&rec).map_err(io::Error::other)?)?;
        out.sync_all()?;
        fs::rename(&tmp, &dest)?;
        if let Some(dir) = dest.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Sorted, merged runs.
fn merge_runs(runs: impl IntoIterator<Item = (usize, usize)>) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = runs.into_iter().filter(|(a, b)| a < b).collect();
    runs.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(runs.len());
    for (a, b) in runs {
        match out.last_mut() {
            Some((_, e)) if a <= *e => *e = (*e).max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The filled chunks of `chunks` as runs.
fn filled_runs(chunks: &[Chunk]) -> Vec<(usize, usize)> {
    merge_runs(
        chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| **c == Chunk::Filled)
            .map(|(i, _)| (i, i + 1)),
    )
}

impl LazyStore {
    /// Waits, at most `bound`, until no demand work is under way: the fetches reads started,
    /// and the readahead they spawned (the rest of a file a program began to read). A caller at
    /// a clean exit lets them finish before [`LazyStore::save_partials`], so the next run finds
    /// whole the files this one began to read (its reads, whose kernel readahead is not quite
    /// the same from run to run, then hit locally) instead of fetching their rest again. It
    /// starts nothing new. Returns whether the engine settled within `bound`.
    pub async fn settle(&self, bound: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        while self.demand_active.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// Saves what this engine's range-path partial files hold, so that the next engine on
    /// this store resumes them instead of fetching their bytes again (see the [module
    /// docs](crate)): each file's data is synced, then its record written beside it.
    /// Blocking (one `fdatasync` per partial file).
    ///
    /// **Call it at a clean exit**, after the last read (`kof-store run` once the program
    /// has exited, the daemon when it stops); the engine stays usable after it, and chunks
    /// filled later are recorded by a later call. Returns how many records were written;
    /// a record that cannot be written is logged and its partial file is fetched again by
    /// the next engine.
    pub fn save_partials(&self) -> usize {
        let states: Vec<_> = self.paths.lock().values().cloned().collect();
        let mut saved = 0;
        for st in states {
            let (file, runs) = {
                let g = st.lock();
                // A path still being ingested is recorded too: the caller may end before its
                // ingest does (a run's runtime is shut down), and its partial file is whole.
                let live = matches!(g.phase, Phase::Fetching | Phase::Completing);
                if g.mode != Mode::Indexed || !live || g.filled == 0 {
                    continue;
                }
                let Some(f) = g.file.clone() else {
                    continue;
                };
                (f, filled_runs(&g.chunks))
            };
            let Some(index) = st.index.as_deref() else {
                continue;
            };
            let rec = PartialRecord::new(&st.sub, index, runs);
            match save(&st.partial, &file, rec) {
                Ok(()) => saved += 1,
                Err(e) => tracing::warn!(path = %st.path(), file = %st.partial.display(),
                    error = %chain(&e), "partial record not written: the next run fetches its bytes again"),
            }
        }
        if saved > 0 {
            tracing::info!(partials = saved, "partial NARs recorded for the next run");
        }
        saved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_filled_chunks_become_runs() {
        assert_eq!(
            merge_runs([(5, 7), (0, 2), (1, 3), (7, 8), (9, 9)]),
            vec![(0, 3), (5, 8)]
        );
        use Chunk::*;
        assert_eq!(
            filled_runs(&[Filled, Filled, Missing, InFlight, Filled]),
            vec![(0, 2), (4, 5)]
        );
    }
}
