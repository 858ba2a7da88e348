//! [`LazyStore`]: per-path fetch state (chunks for the range path, a high-water mark for the
//! stream path), single-flight fetches, demand and prefetch slots, completion into the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use kof_fuse::{Content, Entry};
use kof_nar::{Compression, StorePath};
use kof_store::Store;
use tokio::runtime::Handle;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use super::counters::Counters;
use super::local::partial_file;
use super::profile::Profile;
use super::tree::{entry_of_listing, entry_of_tree};
use super::{Cause, Ensure, LazyCounters, LazyError, LazyOptions};
use kof_substituter::closure::{Closure, ClosureEntry};
use kof_substituter::fetcher::{Fetcher, NarTee, PathOutcome};
use kof_substituter::substituters::Substitute;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Missing,
    InFlight,
    Filled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Range,
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

/// A path's regular files as `(nar_offset, size)`, sorted by offset.
type FileExtents = Arc<Vec<(u64, u64)>>;

type StreamJob = Shared<BoxFuture<'static, Result<(), Arc<LazyError>>>>;

struct PathInner {
    mode: Mode,
    chunks: Vec<Chunk>,
    filled: usize,
    /// Stream path: NAR bytes `0..hwm` are in the partial file.
    hwm: u64,
    stream: Option<StreamJob>,
    phase: Phase,
    file: Option<Arc<File>>,
}

/// The fetch state of one path not (yet) stored.
struct PathState {
    sub: Arc<Substitute>,
    partial: PathBuf,
    inner: Mutex<PathInner>,
    /// Bumped on every change of `inner` that waiters care about.
    changed: watch::Sender<()>,
    /// A demand reader waits for this path's stream.
    demanded: AtomicBool,
    demand: Notify,
}

impl PathState {
    fn path(&self) -> &StorePath {
        &self.sub.info.store_path
    }

    fn nar_size(&self) -> u64 {
        self.sub.info.nar_size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PathInner> {
        self.inner.lock().expect("path state poisoned")
    }

    fn bump(&self) {
        self.changed.send_replace(());
    }

    /// The partial file, created sparse at NarSize on first use.
    fn file(&self, g: &mut PathInner) -> Result<Arc<File>, LazyError> {
        if let Some(f) = &g.file {
            return Ok(f.clone());
        }
        let err = |source| LazyError::Partial {
            path: self.path().clone(),
            file: self.partial.clone(),
            source,
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.partial)
            .map_err(err)?;
        f.set_len(self.nar_size()).map_err(err)?;
        let f = Arc::new(f);
        g.file = Some(f.clone());
        Ok(f)
    }

    fn remove_partial(&self, g: &mut PathInner) {
        g.file = None;
        if let Err(e) = std::fs::remove_file(&self.partial) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path(), file = %self.partial.display(), error = %e,
                    "removing the partial file");
            }
        }
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

/// Why a range fetch did not fill its chunks.
enum RunError {
    /// The cache ignores `Range`: the path now uses the stream path.
    Unsupported,
    Failed(LazyError, bool),
    /// A prefetch GET stopped at a chunk boundary because demand work started: its chunks not
    /// filled are missing again, for a later prefetch (or the demand) to fetch.
    Yielded,
}

/// What a closure prefetch did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrefetchReport {
    /// Paths that were not stored when it started.
    pub paths: usize,
    /// Of those, paths now stored.
    pub stored: usize,
    /// One error per path that failed, rendered.
    pub failures: Vec<String>,
}

/// A recording of demand ranges.
struct Recording {
    /// Only these paths, when set.
    only: Option<HashSet<StorePath>>,
    ranges: Vec<(StorePath, u64, u64)>,
}

/// The lazy engine. See the [module docs](super).
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

/// The window readahead of one large file: where its last demand read ended and how far
/// ahead of it was read.
#[derive(Clone, Copy)]
struct Window {
    start: u64,
    end: u64,
    size: u64,
}

/// The next window after a demand read of `start..end`, given the previous one: doubled (up
/// to `max`) when the read is near the previous one (within the previous read and its
/// window, or a window before it), else back to `min`.
fn next_window(prev: Option<Window>, start: u64, end: u64, min: u64, max: u64) -> Window {
    let size = match prev {
        Some(w) if start + w.size >= w.start && start <= w.end + w.size => {
            (w.size.saturating_mul(2)).min(max).max(min)
        }
        _ => min,
    };
    Window { start, end, size }
}

/// Counts as demand work while held (see [`LazyStore::demand_quiet`]).
struct DemandActivity(Arc<LazyStore>);

impl Drop for DemandActivity {
    fn drop(&mut self) {
        *self.0.demand_ended.lock().expect("demand clock poisoned") = Instant::now();
        self.0.demand_active.fetch_sub(1, Ordering::SeqCst);
    }
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
    LazyError::Aborted {
        path: path.clone(),
        reason: e.to_string(),
    }
}

impl LazyStore {
    /// An engine fetching with `fetcher` into `store`. Must be called within a tokio runtime
    /// (its handle serves [`LazyStore::ensure_blocking`]). Partial files left by an earlier
    /// process are removed: which of their bytes were present is not known.
    pub fn new(fetcher: Arc<Fetcher>, store: Arc<Store>, opts: LazyOptions) -> Arc<LazyStore> {
        let dir = store.dir().join("partial");
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "creating the partial directory");
        }
        let opts = LazyOptions {
            range_chunk: opts.range_chunk.max(4096),
            ..opts
        };
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

    /// Marks demand work under way until the guard is dropped.
    fn demand_activity(&self) -> DemandActivity {
        self.demand_active.fetch_add(1, Ordering::SeqCst);
        DemandActivity(self.arc())
    }

    /// Returns once no demand work is under way and none ended within
    /// [`LazyOptions::prefetch_quiet`]: prefetch starts its fetches only then, so that it takes
    /// the link only while demand leaves it idle.
    async fn demand_quiet(&self) {
        let quiet = self.opts.prefetch_quiet;
        if quiet.is_zero() {
            return;
        }
        loop {
            let wait = if self.demand_active.load(Ordering::SeqCst) > 0 {
                quiet
            } else {
                let since = self
                    .demand_ended
                    .lock()
                    .expect("demand clock poisoned")
                    .elapsed();
                if since >= quiet {
                    return;
                }
                quiet - since
            };
            tokio::time::sleep(wait.min(Duration::from_millis(10))).await;
        }
    }

    /// The range a whole-file readahead should fetch for a demand read at NAR byte `start` of
    /// `path` (state `st`): the file holding it, when it is small enough, reaches beyond
    /// `start..end` and was not read ahead before.
    fn readahead_of(
        &self,
        st: &PathState,
        path: &StorePath,
        start: u64,
        end: u64,
    ) -> Option<(u64, u64)> {
        let max = self.opts.readahead_file_max;
        // Not before the cache is known to honour `Range`: each GET of a cache that ignores
        // it is a whole NAR.
        if max == 0 || self.cache_honours_range(st.sub.cache.url()) != Some(true) {
            return None;
        }
        let files = self
            .files
            .lock()
            .expect("files poisoned")
            .get(path)?
            .clone();
        let i = files
            .partition_point(|(off, _)| *off <= start)
            .checked_sub(1)?;
        let (off, size) = files[i];
        let file_end = off + size;
        if start >= file_end {
            return None;
        }
        if size > max {
            return self.window_of(path, off, file_end, start, end);
        }
        if off >= start && file_end <= end {
            return None;
        }
        if !self
            .read_ahead
            .lock()
            .expect("read_ahead poisoned")
            .insert((path.clone(), off))
        {
            return None;
        }
        Some((off, file_end))
    }

    /// The window readahead of a demand read at `start..end` of the large file at NAR bytes
    /// `off..file_end` of `path`: the next [`Window`]'s bytes after the read, within the file.
    fn window_of(
        &self,
        path: &StorePath,
        off: u64,
        file_end: u64,
        start: u64,
        end: u64,
    ) -> Option<(u64, u64)> {
        let (min, max) = (
            self.opts.readahead_window_min,
            self.opts.readahead_window_max,
        );
        if min == 0 {
            return None;
        }
        let mut windows = self.windows.lock().expect("windows poisoned");
        let key = (path.clone(), off);
        let w = next_window(windows.get(&key).copied(), start, end, min, max.max(min));
        windows.insert(key, w);
        let ahead_end = end.saturating_add(w.size).min(file_end);
        (ahead_end > end).then_some((end, ahead_end))
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

    /// A snapshot of the counters.
    pub fn counters(&self) -> LazyCounters {
        self.counters.snapshot()
    }

    /// Whether `cache` is known to honour `Range` (`None`: not asked yet).
    pub fn cache_honours_range(&self, cache_url: &str) -> Option<bool> {
        self.range_ok
            .lock()
            .expect("range map poisoned")
            .get(cache_url)
            .copied()
    }

    fn register(&self, sub: &Arc<Substitute>) {
        self.subs
            .lock()
            .expect("subs poisoned")
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
        if self.stored.lock().expect("stored poisoned").contains(path) {
            return Ok(true);
        }
        let found = self.on_store(path, |store, p| store.has_path(p)).await?;
        if found {
            self.stored
                .lock()
                .expect("stored poisoned")
                .insert(path.clone());
        }
        Ok(found)
    }

    async fn substitute(&self, path: &StorePath) -> Result<Arc<Substitute>, LazyError> {
        if let Some(s) = self.subs.lock().expect("subs poisoned").get(path) {
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
        if let Some(st) = self.paths.lock().expect("paths poisoned").get(path) {
            return Ok(Some(st.clone()));
        }
        if self.is_stored(path).await? {
            return Ok(None);
        }
        let sub = self.substitute(path).await?;
        let mut paths = self.paths.lock().expect("paths poisoned");
        let st = paths.entry(path.clone()).or_insert_with(|| {
            let ranged = self.opts.range_reads
                && sub.info.compression == Compression::None
                && self.cache_honours_range(sub.cache.url()) != Some(false);
            let n = sub.info.nar_size.div_ceil(self.opts.range_chunk) as usize;
            Arc::new(PathState {
                partial: partial_file(self.store.dir(), path),
                inner: Mutex::new(PathInner {
                    mode: if ranged { Mode::Range } else { Mode::Stream },
                    chunks: vec![Chunk::Missing; n],
                    filled: 0,
                    hwm: 0,
                    stream: None,
                    phase: Phase::Fetching,
                    file: None,
                }),
                changed: watch::channel(()).0,
                demanded: AtomicBool::new(false),
                demand: Notify::new(),
                sub: sub.clone(),
            })
        });
        Ok(Some(st.clone()))
    }

    /// Marks `st` stored: removes its partial file, wakes its waiters, forgets its state.
    fn mark_stored(&self, st: &PathState) {
        {
            let mut g = st.lock();
            g.phase = Phase::Stored;
            st.remove_partial(&mut g);
        }
        st.bump();
        self.stored
            .lock()
            .expect("stored poisoned")
            .insert(st.path().clone());
        self.paths.lock().expect("paths poisoned").remove(st.path());
    }

    /// The view tree of a closure member, from metadata only when possible: the stored tree,
    /// else the `.ls` listing of its cache, else (no listing, or an invalid one) the path is
    /// fetched whole now. Memoised.
    pub async fn entry(&self, e: &ClosureEntry) -> Result<Arc<Entry>, LazyError> {
        let path = e.path().clone();
        if let Some(entry) = self.entries.lock().expect("entries poisoned").get(&path) {
            return Ok(entry.clone());
        }
        let entry = match e {
            ClosureEntry::Remote(sub) if !self.is_stored(&path).await? => {
                self.register(sub);
                match self.listing_entry(sub).await? {
                    Some(entry) => {
                        let mut files = Vec::new();
                        file_extents(&entry, &mut files);
                        files.sort_unstable();
                        self.files
                            .lock()
                            .expect("files poisoned")
                            .insert(path.clone(), Arc::new(files));
                        entry
                    }
                    None => {
                        tracing::info!(%path, cache = sub.cache.url(),
                            "no usable listing: fetching the whole path for its tree");
                        self.ensure_stored(&path, Cause::Demand).await?;
                        self.stored_entry(&path).await?
                    }
                }
            }
            _ => self.stored_entry(&path).await?,
        };
        let entry = Arc::new(entry);
        self.entries
            .lock()
            .expect("entries poisoned")
            .insert(path, entry.clone());
        Ok(entry)
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
                tracing::warn!(%path, error = %e, "unparsable listing ignored");
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
                tracing::warn!(%path, start, end, %cause, error = %e, "ensure failed");
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
        let Some(st) = self.state(path).await? else {
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
                    return r;
                }
                g.mode
            };
            match mode {
                Mode::Range => {
                    let readahead = match cause {
                        Cause::Demand => self.readahead_of(&st, path, start, end),
                        _ => None,
                    };
                    match self.ensure_range(&st, start, end, cause, readahead).await {
                        // (ensure_range retries a yielded prefetch itself.)
                        Err(RunError::Unsupported | RunError::Yielded) => continue,
                        Err(RunError::Failed(e, _)) => return Err(e),
                        Ok(()) => return Ok(()),
                    }
                }
                Mode::Stream => return self.ensure_stream(&st, end, cause).await,
            }
        }
    }

    /// Range path: claims the missing chunks of `start..end` and fetches them (demand: all at
    /// once, in parallel; prefetch: a window at a time, each under a prefetch slot, when
    /// demand is quiet), then waits for chunks others are fetching. `readahead`: NAR bytes
    /// whose missing chunks are also claimed (after the read's own) and fetched in the
    /// background, in parallel GETs, not waited for.
    async fn ensure_range(
        &self,
        st: &Arc<PathState>,
        start: u64,
        end: u64,
        cause: Cause,
        mut readahead: Option<(u64, u64)>,
    ) -> Result<(), RunError> {
        let chunk = self.opts.range_chunk;
        let (c0, c1) = ((start / chunk) as usize, end.div_ceil(chunk) as usize);
        let limit = |bytes: u64| ((bytes / chunk) as usize).max(1);
        let max_run = limit(match cause {
            Cause::Prefetch => self.opts.max_prefetch_request,
            _ => self.opts.max_demand_request,
        });
        let mut failures = 0u32;
        let mut fetched_any = false;
        loop {
            let mut rx = st.changed.subscribe();
            let mut permit = match cause {
                Cause::Prefetch => Some({
                    let _queued = self.counters.queued();
                    self.demand_quiet().await;
                    let p = self
                        .prefetch_slots
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("never closed");
                    // Demand may have come while this waited for a slot.
                    self.demand_quiet().await;
                    p
                }),
                _ => None,
            };
            let runs = {
                let mut g = st.lock();
                if let Some(r) = PathState::settled(&g) {
                    return r.map_err(|e| RunError::Failed(e, false));
                }
                if g.mode != Mode::Range {
                    return Err(RunError::Unsupported);
                }
                if g.chunks[c0..c1].iter().all(|c| *c == Chunk::Filled) {
                    if !fetched_any {
                        self.counters.local_hit();
                    }
                    return Ok(());
                }
                // Prefetch claims one window per slot; demand everything missing.
                let claim_limit = if permit.is_some() {
                    max_run
                } else {
                    usize::MAX
                };
                let runs = claim(&mut g.chunks, c0, c1, max_run, claim_limit);
                if !runs.is_empty() {
                    st.file(&mut g).map_err(|e| RunError::Failed(e, false))?;
                }
                drop(g);
                if let Some((a, b)) = readahead.take().filter(|_| permit.is_none()) {
                    let (a, b) = ((a / chunk) as usize, b.div_ceil(chunk) as usize);
                    self.spawn_readahead(st, a, b, c1, limit(self.opts.readahead_request));
                }
                runs
            };
            if runs.is_empty() {
                drop(permit);
                // Others are fetching what is missing.
                let _ = rx.changed().await;
                continue;
            }
            fetched_any = true;
            // Fetches run as tasks, so that a caller going away (a timed-out ensure) never
            // leaves chunks claimed with no one fetching them.
            let results: Vec<Result<(), RunError>> = if let Some(permit) = permit.take() {
                let me = self.arc();
                let st2 = st.clone();
                let task = tokio::spawn(async move {
                    let _slot = permit;
                    let mut out = Vec::new();
                    let mut yielded = false;
                    for (a, b) in runs {
                        if yielded {
                            // Claimed, not fetched: missing again.
                            me.release(&st2, a, b);
                            continue;
                        }
                        let r = me.fetch_run(st2.clone(), a, b, cause).await;
                        yielded = matches!(r, Err(RunError::Yielded));
                        out.push(r);
                    }
                    out
                });
                task.await
                    .unwrap_or_else(|e| vec![Err(RunError::Failed(spawn_err(st.path(), e), false))])
            } else {
                let tasks: Vec<JoinHandle<Result<(), RunError>>> = runs
                    .into_iter()
                    .map(|(a, b)| {
                        let me = self.arc();
                        let st = st.clone();
                        tokio::spawn(async move {
                            let _slot = me.demand_slots.acquire().await.expect("never closed");
                            me.fetch_run(st, a, b, cause).await
                        })
                    })
                    .collect();
                let mut out = Vec::new();
                for t in tasks {
                    out.push(
                        t.await.unwrap_or_else(|e| {
                            Err(RunError::Failed(spawn_err(st.path(), e), false))
                        }),
                    );
                }
                out
            };
            drop(permit);
            for r in results {
                match r {
                    // Prefetch gave the link to demand: wait for quiet and claim again.
                    Ok(()) | Err(RunError::Yielded) => {}
                    Err(RunError::Unsupported) => return Err(RunError::Unsupported),
                    Err(RunError::Failed(e, transient)) => {
                        failures += 1;
                        if !transient || failures >= self.opts.range_attempts.max(1) {
                            return Err(RunError::Failed(e, transient));
                        }
                        let delay = kof_substituter::cache::RetryPolicy::default().delay(failures);
                        tracing::warn!(path = %st.path(), error = %e, ?delay, "range fetch failed, retrying");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }

    /// Reads chunks `a..b` ahead in the background as demand work, not waited for: in pieces
    /// of at most `piece` chunks, those from `from` (where the read that asked ended) first,
    /// then those before it. Each piece claims its missing chunks only once it has a readahead
    /// slot, so chunks a demand read needs meanwhile are fetched by that read, not queued
    /// behind the readahead. A failed piece leaves its chunks missing for the next read.
    fn spawn_readahead(&self, st: &Arc<PathState>, a: usize, b: usize, from: usize, piece: usize) {
        let from = from.clamp(a, b);
        let pieces = (from..b)
            .step_by(piece)
            .map(|p| (p, (p + piece).min(b)))
            .chain((a..from).step_by(piece).map(|p| (p, (p + piece).min(from))));
        for (p0, p1) in pieces {
            let me = self.arc();
            let st = st.clone();
            tokio::spawn(async move {
                let _active = me.demand_activity();
                let _ahead = me.readahead_slots.acquire().await.expect("never closed");
                let runs = {
                    let mut g = st.lock();
                    if PathState::settled(&g).is_some() || g.mode != Mode::Range {
                        return;
                    }
                    let runs = claim(&mut g.chunks, p0, p1, piece, usize::MAX);
                    if !runs.is_empty() {
                        if let Err(e) = st.file(&mut g) {
                            drop(g);
                            for &(x, y) in &runs {
                                me.release(&st, x, y);
                            }
                            tracing::debug!(error = %e, "readahead failed; its chunks stay missing");
                            return;
                        }
                    }
                    runs
                };
                for (x, y) in runs {
                    let _slot = me.demand_slots.acquire().await.expect("never closed");
                    if let Err(RunError::Failed(e, _)) =
                        me.fetch_run(st.clone(), x, y, Cause::Demand).await
                    {
                        tracing::debug!(error = %e, "readahead failed; its chunks stay missing");
                    }
                }
            });
        }
    }

    /// GETs chunks `a..b` (claimed by the caller) into the partial file, marking each chunk
    /// filled as soon as its last byte is written. On failure, the chunks not filled are
    /// released for another attempt.
    async fn fetch_run(
        &self,
        st: Arc<PathState>,
        a: usize,
        b: usize,
        cause: Cause,
    ) -> Result<(), RunError> {
        let chunk = self.opts.range_chunk;
        let start = a as u64 * chunk;
        let end = (b as u64 * chunk).min(st.nar_size());
        let mut next = a; // first chunk not yet marked filled
        let result = self
            .fetch_run_inner(&st, start, end, cause, &mut next)
            .await;
        if result.is_err() {
            self.release(&st, next, b);
        }
        result
    }

    /// Makes claimed chunks of `a..b` not filled missing again, and wakes their waiters.
    fn release(&self, st: &Arc<PathState>, a: usize, b: usize) {
        let mut g = st.lock();
        for c in &mut g.chunks[a..b] {
            if *c == Chunk::InFlight {
                *c = Chunk::Missing;
            }
        }
        drop(g);
        st.bump();
    }

    async fn fetch_run_inner(
        &self,
        st: &Arc<PathState>,
        start: u64,
        end: u64,
        cause: Cause,
        next: &mut usize,
    ) -> Result<(), RunError> {
        let chunk = self.opts.range_chunk;
        let path = st.path().clone();
        let info = &st.sub.info;
        let cache = &st.sub.cache;
        let _in_flight = self.counters.request(cause);
        let t0 = Instant::now();
        tracing::debug!(%path, start, end, %cause, "range GET");
        let stream = match cache.nar_range(info, start, end).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::warn!(cache = cache.url(), %path,
                    "cache ignores Range (200): streaming whole NARs from it");
                self.range_ok
                    .lock()
                    .expect("range map poisoned")
                    .insert(cache.url().to_string(), false);
                st.lock().mode = Mode::Stream;
                st.bump();
                return Err(RunError::Unsupported);
            }
            Err(source) => {
                let transient = source.is_transient();
                return Err(RunError::Failed(
                    LazyError::Range {
                        path,
                        start,
                        end,
                        source: Box::new(source),
                    },
                    transient,
                ));
            }
        };
        self.range_ok
            .lock()
            .expect("range map poisoned")
            .entry(cache.url().to_string())
            .or_insert(true);
        let file = st.lock().file.clone();
        let Some(file) = file else {
            return Err(RunError::Failed(
                LazyError::Aborted {
                    path,
                    reason: "the partial file was removed during a fetch".into(),
                },
                false,
            ));
        };
        let mut pos = start;
        let mut stream = stream;
        let short = |got: u64| LazyError::RangeLength {
            path: path.clone(),
            url: cache.nar_url(info),
            start,
            end,
            got,
        };
        while let Some(item) = stream.next().await {
            let bytes = item.map_err(|source| {
                let transient = source.is_transient();
                RunError::Failed(
                    LazyError::Range {
                        path: path.clone(),
                        start,
                        end,
                        source: Box::new(source),
                    },
                    transient,
                )
            })?;
            if pos + bytes.len() as u64 > end {
                return Err(RunError::Failed(
                    short(pos - start + bytes.len() as u64),
                    false,
                ));
            }
            // A page-cache write of one body chunk: short enough to do on the runtime thread.
            file.write_all_at(&bytes, pos).map_err(|source| {
                RunError::Failed(
                    LazyError::Partial {
                        path: path.clone(),
                        file: st.partial.clone(),
                        source,
                    },
                    false,
                )
            })?;
            pos += bytes.len() as u64;
            self.counters.bytes(cause, bytes.len() as u64);
            let done_to = if pos == st.nar_size() {
                st.lock().chunks.len()
            } else {
                (pos / chunk) as usize
            };
            if done_to > *next {
                self.fill(st, *next, done_to);
                *next = done_to;
                // Prefetch stays below demand: a demand read started while this GET streamed
                // shares the link with it, so stop at this chunk boundary (the connection is
                // dropped; the rest is fetched again later).
                if cause == Cause::Prefetch
                    && pos != end
                    && self.demand_active.load(Ordering::SeqCst) > 0
                {
                    self.counters.prefetch_yield();
                    tracing::debug!(%path, at = pos, end, "prefetch GET yields to demand");
                    return Err(RunError::Yielded);
                }
            }
        }
        if pos != end {
            return Err(RunError::Failed(short(pos - start), true));
        }
        self.counters.latency(t0.elapsed());
        Ok(())
    }

    /// Marks chunks `a..b` filled; when that completes the path, starts its ingest.
    fn fill(&self, st: &Arc<PathState>, a: usize, b: usize) {
        let complete = {
            let mut g = st.lock();
            let g = &mut *g;
            for c in &mut g.chunks[a..b] {
                if *c != Chunk::Filled {
                    *c = Chunk::Filled;
                    g.filled += 1;
                }
            }
            let complete = g.filled == g.chunks.len() && matches!(g.phase, Phase::Fetching);
            if complete {
                g.phase = Phase::Completing;
            }
            complete
        };
        st.bump();
        if complete {
            let me = self.arc();
            let st = st.clone();
            tokio::spawn(async move { me.complete(st).await });
        }
    }

    /// Ingests a complete partial file: the store verifies NarHash and NarSize and commits, or
    /// refuses and nothing is stored. Either way the partial file goes.
    async fn complete(&self, st: Arc<PathState>) {
        let store = self.store.clone();
        let info = st.sub.info.clone();
        let source = st.sub.cache.url().to_string();
        let partial = st.partial.clone();
        let path = st.path().clone();
        let result = tokio::task::spawn_blocking(move || {
            let f = File::open(&partial)?;
            let mut r = BufReader::with_capacity(1 << 20, f);
            Ok::<_, std::io::Error>(store.ingest_nar(&info, &source, &mut r))
        })
        .await;
        let failure = match result {
            Ok(Ok(Ok(stats))) => {
                tracing::info!(%path, nar_bytes = stats.nar_bytes, "range-fetched path verified and stored");
                self.counters.completed();
                self.mark_stored(&st);
                return;
            }
            Ok(Ok(Err(source))) => LazyError::Refused {
                path: path.clone(),
                source: Box::new(source),
            },
            Ok(Err(source)) => LazyError::Partial {
                path: path.clone(),
                file: st.partial.clone(),
                source,
            },
            Err(e) => spawn_err(&path, e),
        };
        tracing::error!(%path, error = %failure, "range-fetched NAR refused; the path stays unstored and its reads fail");
        self.counters.refused();
        {
            let mut g = st.lock();
            g.phase = Phase::Failed(Arc::new(failure));
            st.remove_partial(&mut g);
        }
        st.bump();
    }

    /// Stream path: joins (or starts) the path's one streamed fetch and returns once the
    /// stream has passed `end` (or the path is stored).
    async fn ensure_stream(
        &self,
        st: &Arc<PathState>,
        end: u64,
        cause: Cause,
    ) -> Result<(), LazyError> {
        if cause != Cause::Prefetch {
            st.demanded.store(true, Ordering::SeqCst);
            st.demand.notify_waiters();
        }
        let mut rx = st.changed.subscribe();
        let job = {
            let mut g = st.lock();
            if let Some(r) = PathState::settled(&g) {
                return r;
            }
            if g.hwm >= end && g.stream.is_some() {
                self.counters.local_hit();
                return Ok(());
            }
            match &g.stream {
                Some(j) => j.clone(),
                None => {
                    let j = self.start_stream(st.clone(), cause);
                    g.stream = Some(j.clone());
                    j
                }
            }
        };
        let mut job = job;
        loop {
            tokio::select! {
                r = &mut job => return r.map_err(LazyError::Shared),
                _ = rx.changed() => {
                    let g = st.lock();
                    if let Some(r) = PathState::settled(&g) {
                        return r;
                    }
                    if g.hwm >= end {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Spawns the streamed fetch of `st`'s path. It takes a demand slot when a reader waits
    /// for it, else a prefetch slot (switching to a demand slot if a reader comes while it
    /// queues).
    fn start_stream(&self, st: Arc<PathState>, cause: Cause) -> StreamJob {
        let me = self.arc();
        let path = st.path().clone();
        let handle = tokio::spawn(async move {
            let _slot = if cause != Cause::Prefetch || st.demanded.load(Ordering::SeqCst) {
                me.demand_slots.acquire().await.expect("never closed")
            } else {
                let demanded = st.demand.notified();
                tokio::pin!(demanded);
                demanded.as_mut().enable();
                if st.demanded.load(Ordering::SeqCst) {
                    me.demand_slots.acquire().await.expect("never closed")
                } else {
                    let _queued = me.counters.queued();
                    let quiet_slot = async {
                        me.demand_quiet().await;
                        me.prefetch_slots.acquire().await
                    };
                    tokio::select! {
                        p = quiet_slot => p.expect("never closed"),
                        _ = demanded => me.demand_slots.acquire().await.expect("never closed"),
                    }
                }
            };
            let cause = if st.demanded.load(Ordering::SeqCst) {
                Cause::Demand
            } else {
                cause
            };
            let file = {
                let mut g = st.lock();
                st.file(&mut g)
            };
            let file = match file {
                Ok(f) => f,
                Err(e) => return Err(me.stream_failed(&st, e)),
            };
            let _in_flight = me.counters.request(cause);
            let t0 = Instant::now();
            tracing::debug!(path = %st.path(), %cause, "streaming the whole NAR");
            let tee = Arc::new(PartialTee {
                st: st.clone(),
                file,
            });
            match me.fetcher.fetch_teed(st.sub.clone(), tee).await {
                Ok(outcome) => {
                    if let PathOutcome::Fetched {
                        downloaded_bytes, ..
                    } = outcome
                    {
                        me.counters.bytes(cause, downloaded_bytes);
                        me.counters.completed();
                    }
                    me.counters.latency(t0.elapsed());
                    me.mark_stored(&st);
                    Ok(())
                }
                Err(e) => Err(me.stream_failed(&st, LazyError::Fetch(Arc::new(e)))),
            }
        });
        async move {
            handle
                .await
                .unwrap_or_else(|e| Err(Arc::new(spawn_err(&path, e))))
        }
        .boxed()
        .shared()
    }

    /// A failed stream: its bytes are dropped and the next ensure starts another.
    fn stream_failed(&self, st: &PathState, e: LazyError) -> Arc<LazyError> {
        tracing::warn!(path = %st.path(), error = %e, "streamed fetch failed");
        let mut g = st.lock();
        g.stream = None;
        g.hwm = 0;
        st.remove_partial(&mut g);
        drop(g);
        st.bump();
        Arc::new(e)
    }

    /// Fetches `path` whole into the store (if it is not stored) and waits for the commit,
    /// joining whatever fetch of it is under way. No read bound: a whole path takes its time.
    pub async fn fetch_whole(&self, path: &StorePath, cause: Cause) -> Result<(), LazyError> {
        self.ensure_stored(path, cause).await
    }

    /// Fetches `path` whole into the store (if it is not stored) and waits for the commit.
    async fn ensure_stored(&self, path: &StorePath, cause: Cause) -> Result<(), LazyError> {
        loop {
            let Some(st) = self.state(path).await? else {
                return Ok(());
            };
            let mut rx = st.changed.subscribe();
            let mode = {
                let g = st.lock();
                if let Some(r) = PathState::settled(&g) {
                    return r;
                }
                g.mode
            };
            match mode {
                Mode::Stream => {
                    let job = {
                        let mut g = st.lock();
                        if let Some(r) = PathState::settled(&g) {
                            return r;
                        }
                        match &g.stream {
                            Some(j) => j.clone(),
                            None => {
                                let j = self.start_stream(st.clone(), cause);
                                g.stream = Some(j.clone());
                                j
                            }
                        }
                    };
                    return job.await.map_err(LazyError::Shared);
                }
                Mode::Range => {
                    match self.ensure_range(&st, 0, st.nar_size(), cause, None).await {
                        Err(RunError::Unsupported | RunError::Yielded) => continue,
                        Err(RunError::Failed(e, _)) => return Err(e),
                        Ok(()) => {}
                    }
                    // Every chunk is there: wait for the ingest.
                    loop {
                        if let Some(r) = PathState::settled(&st.lock()) {
                            return r;
                        }
                        if rx.changed().await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Fetches every member of `closure` not stored, in the background, below demand: at most
    /// [`LazyOptions::prefetch_concurrency`] fetches at once, through the same single-flight
    /// state as demand reads (so a path being prefetched serves them too).
    pub fn prefetch(&self, closure: Closure) -> JoinHandle<PrefetchReport> {
        // A prefetch starts as a program does (a view was just prepared): its first reads come
        // within the quiet time, ahead of the prefetch.
        *self.demand_ended.lock().expect("demand clock poisoned") = Instant::now();
        let me = self.arc();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for entry in &closure.entries {
                let ClosureEntry::Remote(sub) = entry else {
                    continue;
                };
                me.register(sub);
                let me = me.clone();
                let path = sub.info.store_path.clone();
                tasks.push(tokio::spawn(async move {
                    let r = me.ensure_stored(&path, Cause::Prefetch).await;
                    (path, r)
                }));
            }
            let mut report = PrefetchReport {
                paths: tasks.len(),
                ..PrefetchReport::default()
            };
            for t in tasks {
                match t.await {
                    Ok((_, Ok(()))) => report.stored += 1,
                    Ok((path, Err(e))) => {
                        tracing::warn!(%path, error = %e, "prefetch failed");
                        report.failures.push(e.to_string());
                    }
                    Err(e) => report.failures.push(e.to_string()),
                }
            }
            tracing::info!(
                paths = report.paths,
                stored = report.stored,
                failed = report.failures.len(),
                "prefetch done"
            );
            report
        })
    }

    /// Starts recording the demand ranges ensured from now on under `key` (replacing a
    /// recording of that key).
    pub fn start_recording(&self, key: &str) {
        self.start_recording_only(key, None);
    }

    /// Like [`LazyStore::start_recording`], recording only ranges of `paths` (an environment's
    /// closure), so concurrent environments do not mix.
    pub fn start_recording_only(&self, key: &str, paths: Option<Vec<StorePath>>) {
        self.recordings.lock().expect("recordings poisoned").insert(
            key.to_string(),
            Recording {
                only: paths.map(|p| p.into_iter().collect()),
                ranges: Vec::new(),
            },
        );
    }

    /// Stops the recording of `key` and gives its profile (`None` if none was on).
    pub fn stop_recording(&self, key: &str) -> Option<Profile> {
        let rec = self
            .recordings
            .lock()
            .expect("recordings poisoned")
            .remove(key)?;
        Some(Profile::from_ranges(key, rec.ranges))
    }

    fn record(&self, path: &StorePath, start: u64, end: u64) {
        let mut recs = self.recordings.lock().expect("recordings poisoned");
        for rec in recs.values_mut() {
            if rec.only.as_ref().is_none_or(|o| o.contains(path)) {
                rec.ranges.push((path.clone(), start, end));
            }
        }
    }

    /// Fetches a profile's ranges, all in parallel, as [`Cause::Profile`] (under demand slots:
    /// a profile is what the next reads will ask for). Resolves to the failures, rendered.
    pub fn prefetch_profile(&self, profile: Profile) -> JoinHandle<Vec<String>> {
        let me = self.arc();
        tokio::spawn(async move {
            let ranges = match profile.store_ranges() {
                Ok(r) => r,
                Err(e) => return vec![e.to_string()],
            };
            let tasks: Vec<_> = ranges
                .into_iter()
                .map(|(path, start, end)| {
                    let me = me.clone();
                    tokio::spawn(async move { me.ensure(&path, start, end, Cause::Profile).await })
                })
                .collect();
            let mut failures = Vec::new();
            for t in tasks {
                match t.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failures.push(e.to_string()),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        })
    }
}

/// Claims the missing chunks of `c0..c1` (marks them in flight), at most `limit` of them, as
/// runs of adjacent chunks no longer than `max_run`.
fn claim(
    chunks: &mut [Chunk],
    c0: usize,
    c1: usize,
    max_run: usize,
    limit: usize,
) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut claimed = 0;
    for (i, c) in chunks.iter_mut().enumerate().take(c1).skip(c0) {
        if claimed >= limit {
            break;
        }
        if *c != Chunk::Missing {
            continue;
        }
        *c = Chunk::InFlight;
        claimed += 1;
        if let Some((a, b)) = runs.last_mut() {
            if *b == i && i - *a < max_run {
                *b = i + 1;
                continue;
            }
        }
        runs.push((i, i + 1));
    }
    runs
}

/// Writes a stream's NAR bytes into the partial file and raises the high-water mark.
struct PartialTee {
    st: Arc<PathState>,
    file: Arc<File>,
}

impl NarTee for PartialTee {
    fn restart(&self) {
        self.st.lock().hwm = 0;
        self.st.bump();
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)?;
        {
            let mut g = self.st.lock();
            g.hwm = g.hwm.max(offset + data.len() as u64);
        }
        self.st.bump();
        Ok(())
    }
}

impl Ensure for LazyStore {
    fn ensure(&self, store_path: &str, start: u64, end: u64) -> std::io::Result<()> {
        let path = StorePath::from_base_name(store_path).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                LazyError::BadName {
                    name: store_path.to_string(),
                    reason: e.to_string(),
                },
            )
        })?;
        self.ensure_blocking(&path, start, end, Cause::Demand)
            .map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_coalesce_adjacent_missing_chunks() {
        use Chunk::*;
        let mut c = vec![
            Missing, Missing, Filled, Missing, InFlight, Missing, Missing, Missing,
        ];
        let runs = claim(&mut c, 0, 8, 2, usize::MAX);
        assert_eq!(runs, vec![(0, 2), (3, 4), (5, 7), (7, 8)]);
        assert!(c.iter().all(|x| *x != Missing));
        let mut c = vec![Missing; 10];
        assert_eq!(claim(&mut c, 2, 10, 4, 3), vec![(2, 5)]);
        assert_eq!(c.iter().filter(|x| **x == InFlight).count(), 3);
    }

    #[test]
    fn readahead_window_grows_while_reads_stay_near_and_resets_on_a_jump() {
        const M: u64 = 1 << 20;
        let w = next_window(None, 0, 4096, M, 8 * M);
        assert_eq!(w.size, M);
        let w = next_window(Some(w), M + 4096, M + 8192, M, 8 * M);
        assert_eq!(w.size, 2 * M);
        let w = next_window(Some(w), 3 * M, 3 * M + 4096, M, 8 * M);
        assert_eq!(w.size, 4 * M);
        let w = next_window(Some(w), 7 * M, 7 * M + 4096, M, 8 * M);
        assert_eq!(w.size, 8 * M);
        let w = next_window(Some(w), 15 * M, 15 * M + 4096, M, 8 * M);
        assert_eq!(w.size, 8 * M, "capped");
        // A read just before the previous one still counts as near (faults in no order).
        let w = next_window(Some(w), 10 * M, 10 * M + 4096, M, 8 * M);
        assert_eq!(w.size, 8 * M);
        let w = next_window(Some(w), 100 * M, 100 * M + 4096, M, 8 * M);
        assert_eq!(w.size, M, "a jump resets the window");
    }
}
