//! [`LazyStore`]: per-path fetch state (chunks for the range path, a high-water mark for the
//! stream path), single-flight fetches, demand and prefetch slots, completion into the store.
//!
//! # Nix's closure rule
//!
//! The store makes a path valid only with its References. The engine **commits references
//! first**: a completed path is prepared (from its partial file, or by the fetcher's
//! [`kof_substituter::fetcher::Fetcher::prepare_teed`] for a stream), then the engine fetches
//! its missing references whole through its own single-flight state, and commits the path once
//! they are stored. It holds no slot while it waits (so waiting paths never starve their
//! references of slots). A range-fetched path's reads are served from its partial file
//! meanwhile, but a view's gate may wait for the path to be stored, so its references are
//! fetched as demand; a streamed path's readers wait for the commit, so its references are
//! fetched as demand too (a reader may come while they are fetched, and prefetch would wait for
//! demand to be quiet). A lease's closure holds every
//! reference, so this fetches nothing the lease does not pin; the cost is that the first read
//! of an unindexed path waits for its references as well. If a reference cannot be fetched,
//! the path is not committed (its reads fail as for a refused path, and its fetch state names
//! the reference).
//!
//! # A full file system
//!
//! The engine writes to the store's file system in three places; each meets `ENOSPC` (or
//! `EDQUOT`) cleanly, and nothing already there stops being readable:
//!
//! - **A chunk of a partial file** (`range.rs`): the chunk was decoded and checked against the
//!   signed index, but it cannot be written. Its claim is released (it is missing again, never
//!   marked filled, so no record names it), and the read that needed it fails with
//!   [`LazyError::NoSpace`] naming the partial file: EIO for that read only, and one log line
//!   ("ensure failed", with the cause) in the engine and one in the daemon. Every chunk
//!   already in the file, and every stored path, keeps being served; the next read of the
//!   missing range fetches it again, and succeeds as soon as space is free (no state is left
//!   failed). The same holds when the partial file cannot be created.
//!
//!   *Why not serve the verified chunk from memory without caching it?* It would keep the
//!   invariant (the bytes were checked against the index digest before use), but the reader
//!   that needs them is usually not in this process: the daemon's FUSE server reads partial
//!   files itself and asks the engine, over the API socket, only to *ensure* a range
//!   ([`crate::Ensure`] returns no bytes). Serving from memory would need that protocol to
//!   carry the bytes of every demand read, for a case (a full disk) that gc of derived data
//!   is there to end. So the read fails, with its cause.
//! - **The ingest of a complete partial file** (`range.rs`, `complete`): the store's
//!   [`kof_store::StoreError::NoSpace`] (or the database's `SQLITE_FULL`) is not a refusal.
//!   The partial file is kept whole (every chunk verified and readable, so readers go on
//!   reading the path from it), the path goes back to fetching with all its chunks filled,
//!   and the ingest is tried again after [`NO_SPACE_RETRY_MIN`], doubling up to
//!   [`NO_SPACE_RETRY_MAX`]; a caller waiting for the path to be stored (prefetch, a gate)
//!   gets the error instead of waiting. Nothing of the path is visible in the store until an
//!   ingest commits, as ever.
//! - **A streamed fetch** (`stream.rs`): the fetcher's ingest fails with the store's error;
//!   the stream is dropped and the next read starts another.
//!
//! Raw copies for passthrough (`crate::local`) are skipped while the disk is full.

use kof_node_api::report::chain;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use futures_util::future::{BoxFuture, Shared};
use futures_util::StreamExt;
use kof_fuse::{Content, Entry};
use kof_nar::StorePath;
use kof_store::Store;
use parking_lot::{Mutex, MutexGuard};
use tokio::runtime::Handle;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use super::counters::Counters;
use super::local::partial_file;
use super::tree::{entry_of_listing, entry_of_tree};
use super::{Cause, Ensure, LazyCounters, LazyError, LazyOptions};
use kof_index::{Expected, VerifiedIndex};
use kof_nar::listing::Listing;
use kof_substituter::closure::{Closure, ClosureEntry};
use kof_substituter::fetcher::Fetcher;
use kof_substituter::substituters::Substitute;

mod partial;
mod prefetch;
mod range;
mod readahead;
mod recording;
mod stream;

pub use prefetch::PrefetchReport;
use range::RunError;
use readahead::Window;
use recording::Recording;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Missing,
    InFlight,
    Filled,
}

/// How a path's bytes are fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Its cache has a valid signed index and honours `Range`: chunks are fetched as readers
    /// need them, each decoded and checked against the index before it is readable.
    Indexed,
    /// Path-level: the whole NAR streams through the fetcher's verifying pipeline into the
    /// store; readers wait for the commit.
    Stream,
}

#[derive(Debug, Clone)]
enum Phase {
    Fetching,
    /// Every chunk is present; the partial file is being ingested.
    Completing,
    Stored,
    Failed(Arc<LazyError>),
}

/// The first retry of an ingest that failed because the file system was full.
pub(crate) const NO_SPACE_RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(500);

/// The longest wait between retries of an ingest that failed because the file system was full.
/// Short, as it bounds the time to recover once space is freed, and a retry while the disk
/// is still full costs little: the ingest stops at its first object write.
pub(crate) const NO_SPACE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// The error of a partial file operation on `file` of `path`: [`LazyError::NoSpace`] when the
/// file system is full, else [`LazyError::Partial`].
pub(crate) fn partial_error(
    path: &StorePath,
    file: &std::path::Path,
    source: std::io::Error,
) -> LazyError {
    if kof_store::is_no_space_io(&source) {
        LazyError::NoSpace {
            path: path.clone(),
            file: file.to_path_buf(),
            source,
        }
    } else {
        LazyError::Partial {
            path: path.clone(),
            file: file.to_path_buf(),
            source,
        }
    }
}

/// A path's regular files as `(nar_offset, size)`, sorted by offset.
type FileExtents = Arc<Vec<(u64, u64)>>;

type StreamJob = Shared<BoxFuture<'static, Result<(), Arc<LazyError>>>>;

struct PathInner {
    mode: Mode,
    chunks: Vec<Chunk>,
    filled: usize,
    stream: Option<StreamJob>,
    phase: Phase,
    file: Option<Arc<File>>,
    /// The ingest of the complete partial file failed because the file system was full: why,
    /// and how many times in a row (the path is back in [`Phase::Fetching`], every chunk
    /// filled, and a retry is scheduled).
    no_space: Option<(Arc<LazyError>, u32)>,
}

/// The fetch state of one path not (yet) stored.
struct PathState {
    sub: Arc<Substitute>,
    /// The path's verified index (the chunk table of [`Mode::Indexed`]).
    index: Option<Arc<VerifiedIndex>>,
    partial: PathBuf,
    inner: Mutex<PathInner>,
    /// Bumped on every change of `inner` that waiters care about.
    changed: watch::Sender<()>,
    /// A demand reader waits for this path's stream.
    demanded: AtomicBool,
    /// Given up for the next substituter after its cache's bytes failed verification: its
    /// waiters go to the path's new state.
    switched: AtomicBool,
    demand: Notify,
}

impl PathState {
    fn path(&self) -> &StorePath {
        &self.sub.info.store_path
    }

    fn nar_size(&self) -> u64 {
        self.sub.info.nar_size
    }

    /// The index of an indexed path.
    fn index(&self) -> &VerifiedIndex {
        self.index
            .as_deref()
            .expect("only indexed paths have chunks")
    }

    /// The chunks holding NAR bytes `start..end`.
    fn chunk_span(&self, start: u64, end: u64) -> (usize, usize) {
        let r = self.index().index().chunks_for(start, end);
        (r.start, r.end)
    }

    /// About how many chunks make `bytes` (at least one).
    fn chunks_in(&self, bytes: u64) -> usize {
        let idx = self.index().index();
        let avg = (idx.nar_size / idx.chunks.len().max(1) as u64).max(1);
        ((bytes / avg) as usize).max(1)
    }

    fn lock(&self) -> MutexGuard<'_, PathInner> {
        self.inner.lock()
    }

    fn bump(&self) {
        self.changed.send_replace(());
    }

    /// The partial file, created sparse at NarSize on first use.
    fn file(&self, g: &mut PathInner) -> Result<Arc<File>, LazyError> {
        if let Some(f) = &g.file {
            return Ok(f.clone());
        }
        let err = |source| partial_error(self.path(), &self.partial, source);
        let f = partial::open_shared(&self.partial).map_err(err)?;
        f.set_len(self.nar_size()).map_err(err)?;
        let f = Arc::new(f);
        g.file = Some(f.clone());
        Ok(f)
    }

    /// Removes the partial file (and its record), unless another engine has it open.
    fn remove_partial(&self, g: &mut PathInner) {
        let file = g.file.take();
        partial::remove_unless_shared(file.as_deref(), &self.partial);
    }

    /// Terminal phases as a result.
    fn settled(g: &PathInner) -> Option<Result<(), LazyError>> {
        match &g.phase {
            Phase::Stored => Some(Ok(())),
            Phase::Failed(e) => Some(Err(LazyError::Shared(e.clone()))),
            _ => None,
        }
    }
}

/// The lazy engine. See the [module docs](super).
///
/// Its verbs live in files of their own under `engine/`: `range.rs` (range fetch: claim,
/// GET, fill, ingest), `stream.rs` (streamed whole-path fetch, and
/// [`LazyStore::fetch_whole`]), `readahead.rs`, `prefetch.rs` (closures, profiles, and the
/// demand clock prefetch waits on), `recording.rs`, and `partial.rs` (partial files across
/// processes: their locks, records and [`LazyStore::save_partials`]); `engine.rs` holds the state, the path states, metadata ([`LazyStore::entry`])
/// and [`LazyStore::ensure`].
///
/// # Locks
///
/// Fourteen mutexes of the engine, one per path state, three semaphores, and a file lock per
/// partial file:
///
/// | lock | guards |
/// |---|---|
/// | `paths` | the fetch state of each path not stored (added by `state`, removed by `mark_stored`) |
/// | `subs` | the narinfo and cache of each path looked up or registered |
/// | `entries` | memoised view trees |
/// | `stored` | paths known to be stored |
/// | `range_ok` | per cache URL, whether it honours `Range` |
/// | `indexes` | each path's verified index, or that it has none usable |
/// | `hints` | view trees taken from unsigned `.ls` listings, not yet checked against their NAR |
/// | `lied` | paths whose listing did not match their verified NAR |
/// | `adopting` | the creation of a path state with an adopted partial file (see 2. below) |
/// | `recordings` | demand-range recordings by key |
/// | `files` | the regular files of listed paths (for whole-file readahead) |
/// | `read_ahead` | files whose whole-file readahead has started |
/// | `windows` | the readahead window of each large file |
/// | `demand_ended` | when demand work last ended (the prefetch quiet clock) |
/// | `PathState::inner` (one per path) | its chunks, high-water mark, stream job, phase and open partial file |
/// | `demand_slots` (semaphore) | demand fetches at once (range GETs, demand streams, readahead GETs) |
/// | `prefetch_slots` (semaphore) | prefetch fetches at once |
/// | `readahead_slots` (semaphore) | readahead pieces at once |
/// | partial file `flock` (per file) | shared: this engine has the file open; exclusive: it may remove or adopt it |
///
/// The order, from the outside in:
///
/// 1. Semaphore permits are awaited with **no mutex held** and may be held across `.await`
///    and while any mutex is taken. The only nesting of permits is `readahead_slots` →
///    `demand_slots` (a readahead piece holds its readahead slot while it waits for a demand
///    slot per GET); a holder of a demand or prefetch slot never waits for another slot.
/// 2. Every mutex, `PathState::inner` included, is a leaf: taken alone and released before
///    any other lock is taken (no mutex is ever taken under another), but one: `adopting` is
///    held across a partial file's adoption (its file I/O and `flock`s, and `paths` taken
///    under it), so that the check for a state, the adoption and the insert are one step. `PathState::inner` may
///    be held across blocking file system calls on the partial file (open, `set_len`,
///    remove) and while spawning a task, never while waiting for a permit or another mutex.
/// 3. Partial files' `flock`s (see `engine/partial.rs`): a shared lock is taken when the
///    engine opens a partial file (under `PathState::inner`; it may wait, but only for another
///    engine's exclusive lock, which is held for a removal or an adoption and never across
///    network I/O), and kept until the file is closed; exclusive locks are only tried, never
///    waited for.
///
/// The mutexes are `parking_lot`'s (no poisoning: a panic under a lock leaves plain data
/// behind, never a poisoned lock for every later caller). No guard is held across `.await`
/// (the guards are not `Send`, so a spawned future holding one would not compile). The
/// [`crate::LocalReader`]'s two mutexes (stored files, raw-copy writers) are leaves of their
/// own and never taken by the engine.
pub struct LazyStore {
    me: Weak<LazyStore>,
    fetcher: Arc<Fetcher>,
    store: Arc<Store>,
    opts: LazyOptions,
    handle: Handle,
    paths: Mutex<HashMap<StorePath, Arc<PathState>>>,
    subs: Mutex<HashMap<StorePath, Arc<Substitute>>>,
    entries: Mutex<HashMap<StorePath, Arc<Entry>>>,
    stored: Mutex<HashSet<StorePath>>,
    /// Per cache URL: whether it honours `Range` (absent: not known yet).
    range_ok: Mutex<HashMap<String, bool>>,
    /// Per path: its verified index, or `None` when its cache has none usable. Memo of
    /// [`LazyStore::index_of`].
    indexes: Mutex<HashMap<StorePath, Option<Arc<VerifiedIndex>>>>,
    /// View trees built from a cache's unsigned `.ls` listing: what the view shows of the path
    /// until its NAR is verified, when the two are compared ([`LazyStore::check_hint`]).
    hints: Mutex<HashMap<StorePath, Arc<Entry>>>,
    /// Paths whose listing lied: every read of them fails with this.
    lied: Mutex<HashMap<StorePath, Arc<LazyError>>>,
    /// Held while a path's state is created with an adopted partial file.
    adopting: Mutex<()>,
    demand_slots: Arc<Semaphore>,
    prefetch_slots: Arc<Semaphore>,
    /// Readahead GETs in flight (FIFO: a file is read ahead in the order it was asked).
    readahead_slots: Arc<Semaphore>,
    counters: Counters,
    recordings: Mutex<HashMap<String, Recording>>,
    /// Regular files of paths described by a listing, as `(nar_offset, size)` sorted by
    /// offset: what a whole-file readahead reads.
    files: Mutex<HashMap<StorePath, FileExtents>>,
    /// Files whose readahead has started, by path and NAR offset.
    read_ahead: Mutex<HashSet<(StorePath, u64)>>,
    /// Window readahead of large files, by path and NAR offset of the file.
    windows: Mutex<HashMap<(StorePath, u64), Window>>,
    /// Demand work (ensures and the fetches they started) under way now.
    demand_active: AtomicUsize,
    /// When demand work last ended.
    demand_ended: Mutex<Instant>,
}

/// The regular files of `entry` as `(nar_offset, size)`.
fn file_extents(entry: &Entry, out: &mut Vec<(u64, u64)>) {
    match entry {
        Entry::Directory(children) => children.values().for_each(|c| file_extents(c, out)),
        Entry::Regular {
            content: Content::Store(f),
            ..
        } => out.push((f.nar_offset, f.size)),
        _ => {}
    }
}

/// Trees of closure members being described (their listings fetched) while the closure is
/// still walked, by store path: see [`LazyStore::start_entry`].
pub type StartedEntries = BTreeMap<StorePath, JoinHandle<Result<Arc<Entry>, LazyError>>>;

/// Closure members described at once by [`LazyStore::entries`].
const ENTRIES_IN_FLIGHT: usize = 32;

fn spawn_err(path: &StorePath, e: tokio::task::JoinError) -> LazyError {
    LazyError::Task {
        path: path.clone(),
        source: e,
    }
}

impl LazyStore {
    /// An engine fetching with `fetcher` into `store`. Must be called within a tokio runtime
    /// (its handle serves [`LazyStore::ensure_blocking`]). Partial files an earlier process
    /// left are removed, unless another engine still has them open or a record beside them
    /// lets this engine resume them (see [`LazyStore::save_partials`]).
    pub fn new(fetcher: Arc<Fetcher>, store: Arc<Store>, opts: LazyOptions) -> Arc<LazyStore> {
        let dir = store.dir().join("partial");
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %chain(&e), "creating the partial directory");
        }
        partial::sweep(&dir);
        Arc::new_cyclic(|me| LazyStore {
            me: me.clone(),
            fetcher,
            store,
            handle: Handle::current(),
            demand_slots: Arc::new(Semaphore::new(opts.demand_concurrency.max(1))),
            readahead_slots: Arc::new(Semaphore::new(opts.readahead_in_flight.max(1))),
            prefetch_slots: Arc::new(Semaphore::new(opts.prefetch_concurrency.max(1))),
            opts,
            paths: Mutex::new(HashMap::new()),
            subs: Mutex::new(HashMap::new()),
            entries: Mutex::new(HashMap::new()),
            stored: Mutex::new(HashSet::new()),
            range_ok: Mutex::new(HashMap::new()),
            indexes: Mutex::new(HashMap::new()),
            hints: Mutex::new(HashMap::new()),
            lied: Mutex::new(HashMap::new()),
            adopting: Mutex::new(()),
            counters: Counters::default(),
            recordings: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            read_ahead: Mutex::new(HashSet::new()),
            windows: Mutex::new(HashMap::new()),
            demand_active: AtomicUsize::new(0),
            demand_ended: Mutex::new(Instant::now()),
        })
    }

    fn arc(&self) -> Arc<LazyStore> {
        self.me.upgrade().expect("the engine is alive while used")
    }

    /// The fetcher.
    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The options.
    pub fn options(&self) -> &LazyOptions {
        &self.opts
    }

    /// The paths this engine is fetching (each with a fetch state that has not failed) and
    /// their references: what a live gc keeps, as a path commits only once its references are
    /// stored.
    pub fn fetching_with_references(&self) -> Vec<StorePath> {
        // `paths` and each state's lock are leaves: taken one after the other.
        let states: Vec<Arc<PathState>> = self.paths.lock().values().cloned().collect();
        let mut out = Vec::with_capacity(states.len());
        for st in states {
            if matches!(st.lock().phase, Phase::Failed(_)) {
                continue;
            }
            out.push(st.path().clone());
            out.extend(st.sub.info.references.iter().cloned());
        }
        out
    }

    /// Forgets that `paths` are stored (a gc removed them), so that the next read of one
    /// fetches it again instead of finding nothing in the store.
    pub fn forget_stored(&self, paths: &[StorePath]) {
        let mut stored = self.stored.lock();
        for p in paths {
            stored.remove(p);
        }
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> LazyCounters {
        self.counters.snapshot()
    }

    /// Whether `cache` is known to honour `Range` (`None`: not asked yet).
    pub fn cache_honours_range(&self, cache_url: &str) -> Option<bool> {
        self.range_ok.lock().get(cache_url).copied()
    }

    fn register(&self, sub: &Arc<Substitute>) {
        self.subs
            .lock()
            .entry(sub.info.store_path.clone())
            .or_insert_with(|| sub.clone());
    }

    /// Runs a store query about `path` on a blocking thread; its error names the path.
    async fn on_store<T: Send + 'static>(
        &self,
        path: &StorePath,
        query: impl FnOnce(&Store, &StorePath) -> Result<T, kof_store::StoreError> + Send + 'static,
    ) -> Result<T, LazyError> {
        let store = self.store.clone();
        let p = path.clone();
        tokio::task::spawn_blocking(move || query(&store, &p))
            .await
            .map_err(|e| spawn_err(path, e))?
            .map_err(|source| LazyError::Store {
                path: path.clone(),
                source: Box::new(source),
            })
    }

    async fn is_stored(&self, path: &StorePath) -> Result<bool, LazyError> {
        if self.stored.lock().contains(path) {
            return Ok(true);
        }
        let found = self.on_store(path, |store, p| store.has_path(p)).await?;
        if found {
            self.stored.lock().insert(path.clone());
        }
        Ok(found)
    }

    async fn substitute(&self, path: &StorePath) -> Result<Arc<Substitute>, LazyError> {
        if let Some(s) = self.subs.lock().get(path) {
            return Ok(s.clone());
        }
        match self.fetcher.substituters().lookup(path).await {
            Ok(Some(s)) => {
                self.register(&s);
                Ok(s)
            }
            Ok(None) => Err(LazyError::NotFound { path: path.clone() }),
            Err(source) => Err(LazyError::Lookup {
                path: path.clone(),
                source: Box::new(source),
            }),
        }
    }

    /// The fetch state of `path`, or `None` when it is stored.
    async fn state(&self, path: &StorePath) -> Result<Option<Arc<PathState>>, LazyError> {
        if let Some(st) = self.paths.lock().get(path) {
            return Ok(Some(st.clone()));
        }
        if self.is_stored(path).await? {
            return Ok(None);
        }
        let sub = self.substitute(path).await?;
        let index = if self.opts.range_reads {
            self.index_of(&sub).await
        } else {
            None
        };
        let index = index.filter(|_| self.cache_honours_range(sub.cache.url()) != Some(false));
        let n = index.as_ref().map_or(0, |i| i.index().chunks.len());
        let partial = partial_file(self.store.dir(), path);
        // A partial file an earlier engine recorded. Adoption and the insert of the state are
        // one step under `adopting` (else a second caller, finding the file locked by the first
        // one's adoption, would insert an empty state first and the recorded chunks be lost).
        let adopting = self.adopting.lock();
        let adopted = match &index {
            Some(idx) if !self.paths.lock().contains_key(path) => {
                partial::adopt(&partial, &sub, idx)
            }
            _ => None,
        };
        let mut complete = false;
        let st = self
            .paths
            .lock()
            .entry(path.clone())
            .or_insert_with(|| {
                let (chunks, file) = match adopted {
                    Some((f, chunks)) => (chunks, Some(Arc::new(f))),
                    None => (vec![Chunk::Missing; n], None),
                };
                let filled = chunks.iter().filter(|c| **c == Chunk::Filled).count();
                if file.is_some() {
                    tracing::info!(%path, chunks = filled, of = n,
                        "resuming the partial NAR an earlier run recorded");
                }
                complete = n > 0 && filled == n;
                Arc::new(PathState {
                    partial,
                    inner: Mutex::new(PathInner {
                        mode: if index.is_some() {
                            Mode::Indexed
                        } else {
                            Mode::Stream
                        },
                        chunks,
                        filled,
                        stream: None,
                        no_space: None,
                        phase: if complete {
                            Phase::Completing
                        } else {
                            Phase::Fetching
                        },
                        file,
                    }),
                    changed: watch::channel(()).0,
                    demanded: AtomicBool::new(false),
                    switched: AtomicBool::new(false),
                    demand: Notify::new(),
                    sub: sub.clone(),
                    index: index.clone(),
                })
            })
            .clone();
        drop(adopting);
        if complete {
            // Every chunk was recorded: ingest it now (verified like any other).
            let (me, st) = (self.arc(), st.clone());
            tokio::spawn(async move { me.complete(st).await });
        }
        Ok(Some(st))
    }

    /// After `st`'s cache served bytes that failed verification: nothing of them was kept,
    /// the path's state fails with `error` (its partial file goes), and the next substituter
    /// that has the path is tried. Returns whether there is one (the path's next state uses
    /// it); else the path stays failed and every read of it fails with `error`.
    async fn next_source(&self, st: &Arc<PathState>, error: LazyError) -> bool {
        let path = st.path().clone();
        tracing::error!(%path, cache = st.sub.cache.url(), error = %chain(&error),
            "bytes from this cache failed verification: refused, nothing stored");
        self.counters.refused();
        let next = match self
            .fetcher
            .substituters()
            .lookup_from(&path, st.sub.cache_index + 1)
            .await
        {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(%path, error = %chain(&e), "no other substituter");
                None
            }
        };
        if let Some(sub) = &next {
            tracing::warn!(%path, cache = sub.cache.url(), "trying the next substituter");
            self.subs.lock().insert(path.clone(), sub.clone());
            self.indexes.lock().remove(&path);
            self.paths.lock().remove(&path);
        }
        {
            let mut g = st.lock();
            g.phase = Phase::Failed(Arc::new(error));
            st.switched.store(next.is_some(), Ordering::SeqCst);
            st.remove_partial(&mut g);
        }
        st.bump();
        next.is_some()
    }

    /// After a range fetch of `st` failed with `error`: bytes that failed verification send the
    /// path to the next substituter (`Ok`: the path's new state is to be used); any other
    /// error, or no other substituter, is the result.
    async fn after_failed_fetch(
        &self,
        st: &Arc<PathState>,
        error: LazyError,
    ) -> Result<(), LazyError> {
        let LazyError::Unverified { .. } = error else {
            return Err(error);
        };
        if self.next_source(st, error).await {
            return Ok(());
        }
        let g = st.lock();
        Err(PathState::settled(&g)
            .and_then(Result::err)
            .expect("next_source fails the state it gives up"))
    }

    /// Marks `st` stored: removes its partial file, wakes its waiters, forgets its state.
    fn mark_stored(&self, st: &PathState) {
        {
            let mut g = st.lock();
            g.phase = Phase::Stored;
            st.remove_partial(&mut g);
        }
        st.bump();
        self.stored.lock().insert(st.path().clone());
        self.paths.lock().remove(st.path());
    }

    /// The view tree of a closure member, from metadata only when possible: the stored tree;
    /// else the tree of its cache's signed index (verified: the path is then read by chunks);
    /// else the cache's unsigned `.ls` listing, kept as a *hint* the path's verified NAR must
    /// match before anything of the path is served ([`LazyStore::gate`]); else (no listing, or
    /// an invalid one) the path is fetched whole now. Memoised.
    pub async fn entry(&self, e: &ClosureEntry) -> Result<Arc<Entry>, LazyError> {
        let path = e.path().clone();
        if let Some(entry) = self.entries.lock().get(&path) {
            return Ok(entry.clone());
        }
        let entry = match e {
            ClosureEntry::Remote(sub) if !self.is_stored(&path).await? => {
                self.register(sub);
                let index = match self.opts.range_reads {
                    true => self.index_of(sub).await,
                    false => None,
                };
                let listed = match &index {
                    Some(idx) => {
                        let listing = Listing {
                            version: 1,
                            root: idx.index().root.clone(),
                        };
                        match entry_of_listing(&path.base_name(), &listing, sub.info.nar_size) {
                            Ok(entry) => Some((entry, false)),
                            Err(reason) => {
                                tracing::warn!(%path, cache = sub.cache.url(), %reason,
                                    "signed index with an unusable tree: reading the path whole");
                                self.indexes.lock().insert(path.clone(), None);
                                None
                            }
                        }
                    }
                    None => None,
                };
                let listed = match listed {
                    Some(l) => Some(l),
                    None => self.listing_entry(sub).await?.map(|e| (e, true)),
                };
                match listed {
                    Some((entry, hint)) => {
                        let mut files = Vec::new();
                        file_extents(&entry, &mut files);
                        files.sort_unstable();
                        self.files.lock().insert(path.clone(), Arc::new(files));
                        if hint {
                            self.hints
                                .lock()
                                .insert(path.clone(), Arc::new(entry.clone()));
                        }
                        entry
                    }
                    None => {
                        tracing::info!(%path, cache = sub.cache.url(),
                            "no index and no usable listing: fetching the whole path for its tree");
                        self.ensure_stored(&path, Cause::Demand).await?;
                        self.stored_entry(&path).await?
                    }
                }
            }
            _ => self.stored_entry(&path).await?,
        };
        let entry = Arc::new(entry);
        self.entries.lock().insert(path, entry.clone());
        Ok(entry)
    }

    /// The verified index of `sub`'s path from its cache, or `None` when the cache has none
    /// or it does not verify (logged with the path, the cache and the cause: the path is then
    /// read whole, never by unverified ranges). Memoised per path.
    async fn index_of(&self, sub: &Substitute) -> Option<Arc<VerifiedIndex>> {
        let path = &sub.info.store_path;
        if let Some(known) = self.indexes.lock().get(path) {
            return known.clone();
        }
        let found = match sub.cache.index_file(path).await {
            Ok(Some(bytes)) => {
                let expected = Expected {
                    store_path: path,
                    nar_hash: &sub.info.nar_hash,
                    nar_size: sub.info.nar_size,
                };
                let keys = self.fetcher.substituters().keys();
                match VerifiedIndex::open(&bytes, expected, keys) {
                    Ok(v) => {
                        tracing::debug!(%path, cache = sub.cache.url(), signer = v.signer(),
                            chunks = v.index().chunks.len(), "signed index verified");
                        Some(Arc::new(v))
                    }
                    Err(e) => {
                        self.counters.index_refused();
                        tracing::warn!(%path, cache = sub.cache.url(), error = %chain(&e),
                            "index refused: the path is read whole and verified before use");
                        None
                    }
                }
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(%path, cache = sub.cache.url(), error = %chain(&e),
                    "index not fetched: the path is read whole and verified before use");
                None
            }
        };
        self.indexes
            .lock()
            .entry(path.clone())
            .or_insert(found)
            .clone()
    }

    /// Compares the view tree a `.ls` listing gave `path` with its stored (verified) tree, once
    /// the path is stored. A listing that lied refuses the path for this engine: every later
    /// read of it fails, naming the cause.
    async fn check_hint(&self, path: &StorePath) -> Result<(), LazyError> {
        if let Some(e) = self.lied.lock().get(path) {
            return Err(LazyError::Shared(e.clone()));
        }
        let Some(hint) = self.hints.lock().get(path).cloned() else {
            return Ok(());
        };
        let stored = self.stored_entry(path).await?;
        if *hint == stored {
            self.hints.lock().remove(path);
            return Ok(());
        }
        let cache = self
            .subs
            .lock()
            .get(path)
            .map(|s| s.cache.url().to_string())
            .unwrap_or_default();
        let e = Arc::new(LazyError::ListingLied {
            path: path.clone(),
            cache,
        });
        tracing::error!(%path, error = %chain(&*e),
            "the view built from this listing is refused; its reads fail");
        self.counters.refused();
        self.lied.lock().entry(path.clone()).or_insert(e.clone());
        Err(LazyError::Shared(e))
    }

    /// Opens `path` to a view: returns once everything the view shows of it is verified. A path
    /// whose tree came from its signed index, or from the store, is open at once; one whose tree
    /// came from an unsigned listing is fetched whole and verified first (its NarHash, then
    /// its tree against the listing's). The FUSE view asks this before it answers a lookup or
    /// a directory read inside the path. Within the read bound.
    pub async fn gate(&self, path: &StorePath) -> Result<(), LazyError> {
        if !self.hints.lock().contains_key(path) {
            return match self.lied.lock().get(path) {
                Some(e) => Err(LazyError::Shared(e.clone())),
                None => Ok(()),
            };
        }
        let _active = self.demand_activity();
        let timeout = self.opts.read_timeout;
        match tokio::time::timeout(timeout, self.ensure_stored(path, Cause::Demand)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(LazyError::Timeout {
                    path: path.clone(),
                    start: 0,
                    end: 0,
                    cause: Cause::Demand,
                    timeout,
                })
            }
        }
        self.check_hint(path).await
    }

    /// [`LazyStore::gate`] from a thread outside the runtime (a FUSE worker), blocking.
    pub fn gate_blocking(&self, path: &StorePath) -> Result<(), LazyError> {
        self.handle.block_on(self.gate(path))
    }

    /// Starts describing a closure member in the background (see [`LazyStore::entry`]), for
    /// [`LazyStore::entries`] to take from `started`: called as each narinfo is accepted during
    /// the closure walk, so listings are fetched while the walk goes on.
    pub fn start_entry(&self, sub: &Arc<Substitute>, started: &mut StartedEntries) {
        let me = self.arc();
        let e = ClosureEntry::Remote(sub.clone());
        started.insert(
            sub.info.store_path.clone(),
            tokio::spawn(async move { me.entry(&e).await }),
        );
    }

    /// The tree of every member of `closure`: from `started` when under way there, else
    /// described now, in parallel.
    pub async fn entries(
        &self,
        closure: &Closure,
        mut started: StartedEntries,
    ) -> Result<BTreeMap<StorePath, Arc<Entry>>, LazyError> {
        use futures_util::stream::{self, TryStreamExt};
        stream::iter(closure.entries.iter().cloned())
            .map(|e| {
                let me = self.arc();
                let task = started.remove(e.path());
                async move {
                    let entry = match task {
                        Some(t) => t.await.map_err(|j| spawn_err(e.path(), j))?,
                        None => me.entry(&e).await,
                    }?;
                    Ok((e.path().clone(), entry))
                }
            })
            .buffer_unordered(ENTRIES_IN_FLIGHT)
            .try_collect()
            .await
    }

    async fn listing_entry(&self, sub: &Substitute) -> Result<Option<Entry>, LazyError> {
        let path = &sub.info.store_path;
        let listing = match sub.cache.listing(path).await {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(None),
            Err(e @ kof_substituter::cache::CacheError::Listing { .. }) => {
                tracing::warn!(%path, error = %chain(&e), "unparsable listing ignored");
                return Ok(None);
            }
            Err(source) => {
                return Err(LazyError::Listing {
                    path: path.clone(),
                    source: Box::new(source),
                })
            }
        };
        match entry_of_listing(&path.base_name(), &listing, sub.info.nar_size) {
            Ok(e) => Ok(Some(e)),
            Err(reason) => {
                tracing::warn!(%path, cache = sub.cache.url(), %reason, "invalid listing ignored");
                Ok(None)
            }
        }
    }

    async fn stored_entry(&self, path: &StorePath) -> Result<Entry, LazyError> {
        let nodes = self.on_store(path, |store, p| store.tree(p)).await?;
        entry_of_tree(&path.base_name(), &nodes).map_err(|reason| LazyError::BadTree {
            path: path.clone(),
            reason,
        })
    }

    /// Makes NAR bytes `start..end` of `path` readable (stored, or in its partial file), within
    /// the read bound. Demand ranges are recorded by active recordings.
    pub async fn ensure(
        &self,
        path: &StorePath,
        start: u64,
        end: u64,
        cause: Cause,
    ) -> Result<(), LazyError> {
        let timeout = self.opts.read_timeout;
        let _active = (cause != Cause::Prefetch).then(|| self.demand_activity());
        let result =
            match tokio::time::timeout(timeout, self.ensure_inner(path, start, end, cause)).await {
                Ok(r) => r,
                Err(_) => Err(LazyError::Timeout {
                    path: path.clone(),
                    start,
                    end,
                    cause,
                    timeout,
                }),
            };
        match &result {
            Ok(()) if cause == Cause::Demand => self.record(path, start, end),
            Ok(()) => {}
            Err(e) => {
                self.counters.failure();
                tracing::warn!(%path, start, end, %cause, error = %chain(e), "ensure failed");
            }
        }
        result
    }

    /// [`LazyStore::ensure`] from a thread outside the runtime (a FUSE worker), blocking. Must
    /// not be called from a runtime thread (tokio panics); async code calls `ensure`.
    pub fn ensure_blocking(
        &self,
        path: &StorePath,
        start: u64,
        end: u64,
        cause: Cause,
    ) -> Result<(), LazyError> {
        self.handle.block_on(self.ensure(path, start, end, cause))
    }

    async fn ensure_inner(
        &self,
        path: &StorePath,
        start: u64,
        end: u64,
        cause: Cause,
    ) -> Result<(), LazyError> {
        'source: loop {
            let Some(st) = self.state(path).await? else {
                // Stored, so verified; but a view built from its listing must match it.
                self.check_hint(path).await?;
                self.counters.local_hit();
                return Ok(());
            };
            if start > end || end > st.nar_size() {
                return Err(LazyError::OutOfRange {
                    path: path.clone(),
                    start,
                    end,
                    nar_size: st.nar_size(),
                });
            }
            if start == end {
                return Ok(());
            }
            loop {
                let mode = {
                    let g = st.lock();
                    if let Some(r) = PathState::settled(&g) {
                        // A state given up for the next substituter: use the path's new one.
                        if r.is_err() && st.switched.load(Ordering::SeqCst) {
                            continue 'source;
                        }
                        return r;
                    }
                    g.mode
                };
                match mode {
                    Mode::Indexed => {
                        let readahead = match cause {
                            Cause::Demand => self.readahead_of(&st, path, start, end),
                            _ => None,
                        };
                        match self.ensure_range(&st, start, end, cause, readahead).await {
                            // (ensure_range retries a yielded prefetch itself.)
                            Err(RunError::Unsupported | RunError::Yielded) => continue,
                            Err(RunError::Failed { error, .. }) => {
                                self.after_failed_fetch(&st, error).await?;
                                continue 'source;
                            }
                            Ok(()) => return Ok(()),
                        }
                    }
                    Mode::Stream => {
                        self.ensure_stream(&st, cause).await?;
                        return self.check_hint(path).await;
                    }
                }
            }
        }
    }
}

impl Ensure for LazyStore {
    fn ensure(&self, store_path: &str, start: u64, end: u64) -> std::io::Result<()> {
        let path = StorePath::from_base_name(store_path).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                LazyError::BadName {
                    name: store_path.to_string(),
                    source: e,
                },
            )
        })?;
        self.ensure_blocking(&path, start, end, Cause::Demand)
            .map_err(std::io::Error::other)
    }

    fn gate(&self, store_path: &str) -> std::io::Result<()> {
        let path = StorePath::from_base_name(store_path).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                LazyError::BadName {
                    name: store_path.to_string(),
                    source: e,
                },
            )
        })?;
        self.gate_blocking(&path).map_err(std::io::Error::other)
    }
}
