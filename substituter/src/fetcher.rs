//! Fetches closures from binary caches into the store: in parallel, each NAR streamed and
//! verified on its way in, each path downloaded once however many callers want it.
//!
//! One download is a pipeline that never holds a whole NAR in memory:
//!
//! ```text
//! HTTP body chunks ──bounded channel──▶ FileHash/FileSize check ─▶ decompressor
//!   (async task)     (backpressure)      (at EOF of the file)       (xz, zstd, bzip2, none)
//!        ─▶ NarSize guard ─▶ Store::prepare_nar (blocking thread: parses, hashes, writes)
//! ```
//!
//! Nix's closure rule: the store only *prepares* a path as its NAR comes in (objects written,
//! NarHash checked, nothing visible); the path is committed once all its References are. Each
//! path's task, after its download and prepare (its download slot released), waits for the
//! fetches of its References that are not stored (joining those in flight, starting those not
//! yet started) and then commits. So downloads and prepares run in parallel while commits follow
//! reference order, and a fetch that fails part-way leaves no stored path whose references are
//! missing: a path whose reference failed is not committed (it fails with
//! [`PathError::Reference`]), and its objects stay in the store unused, so the next try writes
//! them no more (gc removes them if none comes). The lazy engine follows the same rule: it has
//! its paths prepared ([`Fetcher::prepare_teed`], or its own partial file for range-fetched
//! paths) and commits each after its references, which it fetches whole itself.
//!
//! Ordering matters: the store prepares a path once it has read the whole NAR and its NarHash
//! matched. So that a file whose FileHash is wrong (or that carries junk after the compressed
//! stream) is refused *before* that, the NarSize guard, when it is about to hand over the last
//! byte of the NAR, first drives the decompressor to its end, which drains the compressed file to
//! its end, where the FileHash/FileSize check runs. An error there is returned from that last
//! `read`, so the store never sees a complete NAR and prepares nothing. This does not depend on
//! the store reading past the NAR's end.
//!
//! The reader layers return plain `io::Error`s to the store; the first cause is also kept in a
//! shared slot so the caller gets a typed [`PathError`] back rather than the store's wrapping.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::stream::{FuturesUnordered, StreamExt};
use kof_nar::hash::HashingReader;
use kof_nar::{Compression, NixHash, StorePath};
use kof_store::{IngestStats, PreparedPath, Store, StoreError};
use parking_lot::Mutex;
use thiserror::Error;
use tokio::sync::{mpsc, Semaphore};

use crate::cache::{http_client, BinaryCache, CacheError, HttpOptions, NarStream, RetryPolicy};
use crate::closure::{compute_closure, compute_closure_with, Closure, ClosureEntry, ClosureError};
use crate::substituters::{Substitute, SubstituteError, Substituters};
use kof_node_api::config::Config;

/// Why one store path could not be fetched. Every variant names the path; those about a
/// download name the NAR's URL.
#[derive(Debug, Error)]
pub enum PathError {
    /// Opening the NAR download failed.
    #[error("fetching {path}")]
    Open {
        /// The path.
        path: StorePath,
        /// The cause (names the URL).
        source: CacheError,
    },
    /// The download broke off (reset, timeout, truncated body, server error).
    #[error("downloading {path}")]
    Download {
        /// The path.
        path: StorePath,
        /// The cause (names the URL).
        source: CacheError,
    },
    /// The NAR file's size is not the narinfo's FileSize.
    #[error("{path}: {url} is {got}{} bytes, FileSize says {expected}", if *.got > *.expected { "+" } else { "" })]
    FileSize {
        /// The path.
        path: StorePath,
        /// The NAR file URL.
        url: String,
        /// FileSize.
        expected: u64,
        /// Bytes received (when larger, the count at which reading stopped).
        got: u64,
    },
    /// The narinfo gives no FileSize and the file is larger than any compression of a NAR of
    /// NarSize bytes could be (a bound so a hostile cache cannot stream forever).
    #[error(
        "{path}: {url} is larger than {limit} bytes, more than a NAR of NarSize could compress to"
    )]
    FileTooLarge {
        /// The path.
        path: StorePath,
        /// The NAR file URL.
        url: String,
        /// The bound.
        limit: u64,
    },
    /// The NAR file's sha256 is not the narinfo's FileHash.
    #[error("{path}: {url} has hash {got}, FileHash says {expected}")]
    FileHash {
        /// The path.
        path: StorePath,
        /// The NAR file URL.
        url: String,
        /// FileHash.
        expected: NixHash,
        /// What the file hashed to.
        got: NixHash,
    },
    /// The NAR file does not decompress.
    #[error("{path}: decompressing {url} ({compression})")]
    Decompress {
        /// The path.
        path: StorePath,
        /// The NAR file URL.
        url: String,
        /// The compression the narinfo names.
        compression: Compression,
        /// The decoder's error.
        source: std::io::Error,
    },
    /// Bytes follow the end of the compressed stream.
    #[error("{path}: {url} has data after the end of its {compression} stream")]
    TrailingCompressed {
        /// The path.
        path: StorePath,
        /// The NAR file URL.
        url: String,
        /// The compression.
        compression: Compression,
    },
    /// The decompressed NAR is shorter than NarSize.
    #[error("{path}: {url} decompresses to {got} bytes, NarSize says {expected}")]
    NarTooShort {
        /// The path.
        path: StorePath,
        /// The NAR file URL.
        url: String,
        /// NarSize.
        expected: u64,
        /// Bytes it gave.
        got: u64,
    },
    /// The decompressed NAR is longer than NarSize.
    #[error("{path}: {url} decompresses to more than NarSize {expected} bytes")]
    NarTooLong {
        /// The path.
        path: StorePath,
        /// The NAR file URL.
        url: String,
        /// NarSize.
        expected: u64,
    },
    /// The store refused the NAR (malformed, NarHash mismatch) or could not write it.
    #[error("{path}: ingesting {url}")]
    Ingest {
        /// The path.
        path: StorePath,
        /// The NAR file URL.
        url: String,
        /// The store's error.
        source: StoreError,
    },
    /// The path was prepared, and is not committed because fetching one of its References
    /// failed (Nix's closure rule).
    #[error("{path}: its reference {reference} could not be fetched")]
    Reference {
        /// The path.
        path: StorePath,
        /// The reference that failed.
        reference: StorePath,
        /// Why the reference failed (a [`PathError`], or the lazy engine's error).
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The path was prepared, and is not committed because no cache has one of its References.
    #[error("{path}: no cache has its reference {reference}")]
    ReferenceUnavailable {
        /// The path.
        path: StorePath,
        /// The reference no cache has.
        reference: StorePath,
    },
    /// The path was prepared, and is not committed because looking up one of its References
    /// failed.
    #[error("{path}: looking up its reference {reference}")]
    ReferenceLookup {
        /// The path.
        path: StorePath,
        /// The reference.
        reference: StorePath,
        /// The cause.
        source: SubstituteError,
    },
    /// The store refused to commit the prepared path (see [`kof_store::Store::commit_prepared`]).
    #[error("{path}: committing")]
    Commit {
        /// The path.
        path: StorePath,
        /// The store's error.
        source: StoreError,
    },
    /// Asking the store whether the path is present failed.
    #[error("{path}: checking the store")]
    Store {
        /// The path.
        path: StorePath,
        /// The store's error.
        source: StoreError,
    },
    /// Looking for another cache after a failure failed.
    #[error("{path}: looking for another source")]
    Lookup {
        /// The path.
        path: StorePath,
        /// The cause.
        source: SubstituteError,
    },
    /// The download or ingest task stopped without a result (panic, or the runtime shutting
    /// down).
    #[error("{path}: fetching {url} was aborted: {reason}")]
    Aborted {
        /// The path.
        path: StorePath,
        /// The NAR file URL.
        url: String,
        /// What happened.
        reason: String,
        /// The task's failure (a panic or a cancellation), when a task ended without a result.
        #[source]
        source: Option<tokio::task::JoinError>,
    },
}

impl PathError {
    /// `path`'s task (its NAR at `url`; empty when none) ended without a result: `source`, a
    /// panic or a cancellation.
    fn task_ended(path: StorePath, url: String, source: tokio::task::JoinError) -> PathError {
        PathError::Aborted {
            path,
            url,
            reason: "its task ended without a result".into(),
            source: Some(source),
        }
    }

    /// Whether trying the same cache again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            PathError::Open { source, .. } | PathError::Download { source, .. } => {
                source.is_transient()
            }
            // A file shorter than FileSize is a truncated body.
            PathError::FileSize { expected, got, .. } => got < expected,
            _ => false,
        }
    }

    /// The store path this error is about.
    pub fn path(&self) -> &StorePath {
        match self {
            PathError::Open { path, .. }
            | PathError::Download { path, .. }
            | PathError::FileSize { path, .. }
            | PathError::FileTooLarge { path, .. }
            | PathError::FileHash { path, .. }
            | PathError::Decompress { path, .. }
            | PathError::TrailingCompressed { path, .. }
            | PathError::NarTooShort { path, .. }
            | PathError::NarTooLong { path, .. }
            | PathError::Ingest { path, .. }
            | PathError::Store { path, .. }
            | PathError::Reference { path, .. }
            | PathError::ReferenceUnavailable { path, .. }
            | PathError::ReferenceLookup { path, .. }
            | PathError::Commit { path, .. }
            | PathError::Lookup { path, .. }
            | PathError::Aborted { path, .. } => path,
        }
    }
}

/// Why a fetch failed.
#[derive(Debug)]
pub enum FetchError {
    /// The closure could not be computed.
    Closure(ClosureError),
    /// Some paths could not be fetched (the others were). Its cause (`source()`) is the first
    /// failure.
    Paths {
        /// Paths in the closure.
        total: usize,
        /// One error per failed path, sorted by path.
        failures: Vec<Arc<PathError>>,
    },
}

impl From<ClosureError> for FetchError {
    fn from(e: ClosureError) -> Self {
        FetchError::Closure(e)
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Transparent: the closure error is this error.
            FetchError::Closure(e) => e.fmt(f),
            FetchError::Paths { total, failures } => write!(
                f,
                "{} of {total} store paths failed to fetch; first",
                failures.len()
            ),
        }
    }
}

impl std::error::Error for FetchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FetchError::Closure(e) => e.source(),
            FetchError::Paths { failures, .. } => failures
                .first()
                .map(|e| &**e as &(dyn std::error::Error + 'static)),
        }
    }
}

/// Why a [`Fetcher`] could not be built from a config.
#[derive(Debug, Error)]
pub enum SetupError {
    /// The HTTP client could not be built.
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    /// A substituter URL is unusable.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Progress of a fetch, for progress bars and logs. A caller whose path is already being
/// downloaded for another caller gets no `PathStarted`/`Progress` for it, only its
/// `PathDone`/`PathFailed`.
#[derive(Debug, Clone, PartialEq)]
pub enum FetchEvent {
    /// The closure is known. From [`Fetcher::fetch_closure`] this comes when the walk ends,
    /// after the downloads of the paths found first have started.
    Resolved {
        /// Paths in the closure.
        paths: usize,
        /// Paths to download.
        to_fetch: usize,
        /// Sum of the download sizes (FileSize, or NarSize when absent) of those paths.
        total_download_bytes: u64,
        /// Sum of their NarSize.
        total_nar_bytes: u64,
    },
    /// A download (attempt) started.
    PathStarted {
        /// The path.
        path: StorePath,
        /// Bytes to download (FileSize, or NarSize when absent).
        size: u64,
    },
    /// Bytes of a path downloaded so far (in this attempt).
    Progress {
        /// The path.
        path: StorePath,
        /// Bytes so far.
        bytes: u64,
    },
    /// A path was fetched and stored.
    PathDone {
        /// The path.
        path: StorePath,
        /// What the store did.
        stats: IngestStats,
        /// Bytes downloaded.
        downloaded_bytes: u64,
    },
    /// A path was already stored.
    PathSkipped {
        /// The path.
        path: StorePath,
    },
    /// A path could not be fetched.
    PathFailed {
        /// The path.
        path: StorePath,
        /// The error, rendered.
        error: String,
    },
}

/// Where [`FetchEvent`]s go.
pub type EventSink = mpsc::UnboundedSender<FetchEvent>;

/// What a fetch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchSummary {
    /// Paths in the closure.
    pub paths: usize,
    /// Paths downloaded and stored by this fetch (or by a concurrent one it waited for).
    pub paths_fetched: usize,
    /// Paths that were already stored.
    pub paths_already_present: usize,
    /// Bytes downloaded (compressed), counting each path's successful attempt.
    pub bytes_downloaded: u64,
    /// Uncompressed NAR bytes ingested.
    pub nar_bytes: u64,
    /// Bytes newly written to the store.
    pub new_stored_bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Tuning of a [`Fetcher`].
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// NAR downloads at once.
    pub max_parallel_downloads: usize,
    /// Narinfo lookups at once while computing a closure.
    pub lookups_in_flight: usize,
    /// How a path is retried after a transient failure.
    pub retry: RetryPolicy,
    /// Body chunks buffered between the download and the store, per download.
    pub channel_chunks: usize,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            max_parallel_downloads: 16,
            lookups_in_flight: crate::closure::DEFAULT_LOOKUPS_IN_FLIGHT,
            retry: RetryPolicy::default(),
            channel_chunks: 16,
        }
    }
}

/// What fetching one path came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathOutcome {
    /// Downloaded and stored.
    Fetched {
        /// What the store did.
        stats: IngestStats,
        /// Bytes downloaded.
        downloaded_bytes: u64,
    },
    /// It was stored already.
    AlreadyPresent,
}

/// Sees a download's NAR bytes as the store reads them: uncompressed and within NarSize, but
/// not yet checked against NarHash (that happens when the store has read the last byte). The
/// lazy engine (`kof-lazy`) writes them to a partial file so readers need not wait for
/// the whole path.
pub trait NarTee: Send + Sync {
    /// A download attempt starts: what earlier attempts handed over may be wrong.
    fn restart(&self);
    /// Bytes `offset..offset + data.len()` of the NAR. An error fails the download.
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
}

type SharedFetch = Shared<BoxFuture<'static, Result<PathOutcome, Arc<PathError>>>>;

struct Inner {
    store: Arc<Store>,
    subs: Arc<Substituters>,
    opts: FetchOptions,
    downloads: Semaphore,
    in_flight: Mutex<HashMap<StorePath, SharedFetch>>,
}

/// Fetches closures into a store. Cheap to clone; clones share the download limit, the
/// in-flight map and the narinfo memo.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

impl Fetcher {
    /// A fetcher into `store` from `subs`.
    pub fn new(store: Arc<Store>, subs: Arc<Substituters>, opts: FetchOptions) -> Fetcher {
        Fetcher {
            inner: Arc::new(Inner {
                store,
                subs,
                downloads: Semaphore::new(opts.max_parallel_downloads.max(1)),
                opts,
                in_flight: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A fetcher set up from the node config: its substituters, trusted keys, signature policy
    /// and download limit, with default HTTP timeouts and retries.
    pub fn from_config(config: &Config, store: Arc<Store>) -> Result<Fetcher, SetupError> {
        let client = http_client(&HttpOptions {
            read_timeout: config.read_timeout,
            ..HttpOptions::default()
        })
        .map_err(SetupError::Client)?;
        let retry = RetryPolicy {
            attempts: config.download_attempts,
            ..RetryPolicy::default()
        };
        let caches = config
            .substituters
            .iter()
            .map(|u| BinaryCache::new(u, client.clone(), retry.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let subs = Substituters::new(
            caches,
            config.trusted_public_keys.clone(),
            config.require_sigs,
        );
        let opts = FetchOptions {
            max_parallel_downloads: config.max_parallel_downloads,
            retry,
            ..FetchOptions::default()
        };
        Ok(Fetcher::new(store, Arc::new(subs), opts))
    }

    /// The substituters.
    pub fn substituters(&self) -> &Arc<Substituters> {
        &self.inner.subs
    }

    /// The closure of `roots`: what is stored, and what is to fetch from where.
    pub async fn resolve(&self, roots: &[StorePath]) -> Result<Closure, ClosureError> {
        compute_closure(
            &self.inner.subs,
            &self.inner.store,
            roots,
            self.inner.opts.lookups_in_flight,
        )
        .await
    }

    /// [`Fetcher::resolve`], calling `on_remote` with each path to fetch the moment its narinfo
    /// is accepted (see [`crate::closure::compute_closure_with`]), so that a caller can start
    /// on it (its listing, say) while the walk goes on.
    pub async fn resolve_with(
        &self,
        roots: &[StorePath],
        on_remote: impl FnMut(&Arc<Substitute>),
    ) -> Result<Closure, ClosureError> {
        compute_closure_with(
            &self.inner.subs,
            &self.inner.store,
            roots,
            self.inner.opts.lookups_in_flight,
            on_remote,
        )
        .await
    }

    /// Fetches the closure of `roots` into the store.
    pub async fn fetch_closure(
        &self,
        roots: &[StorePath],
        events: Option<EventSink>,
    ) -> Result<FetchSummary, FetchError> {
        let start = Instant::now();
        // Each path's download starts as soon as its narinfo is accepted, while the walk goes
        // on: with 20 ms per request, waiting for the whole closure first cost a tenth of a
        // 160 MB fetch at 50 MB/s.
        let mut started = HashMap::new();
        let walked = compute_closure_with(
            &self.inner.subs,
            &self.inner.store,
            roots,
            self.inner.opts.lookups_in_flight,
            |sub| {
                let fut = self
                    .inner
                    .clone()
                    .fetch_shared(sub.clone(), events.clone(), None);
                started.insert(sub.info.store_path.clone(), fut);
            },
        )
        .await;
        // On a failed walk, the downloads already started are let finish (or fail) before the
        // error is returned, so nothing is left in flight: what they stored is verified and
        // simply found present next time.
        let closure = match walked {
            Ok(c) => c,
            Err(e) => {
                for (_, fut) in started {
                    let _ = fut.await;
                }
                return Err(e.into());
            }
        };
        let mut summary = self.fetch_started(&closure, started, events).await?;
        summary.elapsed = start.elapsed();
        Ok(summary)
    }

    /// Fetches one path (nothing when it is stored), retrying and trying other caches as
    /// [`Fetcher::fetch`] does, also handing its NAR bytes to `tee`. Not under this fetcher's
    /// download limit: the caller (the lazy engine) has its own. Single-flight with this
    /// fetcher's other fetches: a fetch of the path already under way (one started for the
    /// References of another path, say) is joined, and then `tee` is handed nothing. The path
    /// is committed after its References, which are fetched whole first if they are not stored
    /// (see [`Fetcher::commit_after_references`]).
    pub async fn fetch_teed(
        &self,
        sub: Arc<Substitute>,
        tee: Arc<dyn NarTee>,
    ) -> Result<PathOutcome, Arc<PathError>> {
        self.inner.clone().fetch_shared(sub, None, Some(tee)).await
    }

    /// Downloads and prepares one path as [`Fetcher::fetch_teed`] does (retries, other caches,
    /// bytes handed to `tee`, fetch state recorded), and commits nothing: the caller commits it
    /// ([`kof_store::Store::commit_prepared`]) once its References are stored. Neither
    /// single-flight nor under this fetcher's download limit: the caller (the lazy engine, which
    /// fetches the references through its own single-flight state, holding no download slot
    /// while it waits for them) provides both.
    pub async fn prepare_teed(
        &self,
        sub: Arc<Substitute>,
        tee: Arc<dyn NarTee>,
    ) -> Result<Prepared, PathError> {
        let path = sub.info.store_path.clone();
        let result = self.inner.fetch_attempts(sub, None, Some(tee)).await;
        if let Err(e) = &result {
            let (p, error) = (path, e.to_string());
            self.inner
                .record_state(move |store| store.record_fetch_failed(&p, &error))
                .await;
        }
        result
    }

    /// Commits `prepared` once its References (other than itself) are stored: those not stored
    /// are fetched first, joining their fetches in flight (under this fetcher's download limit,
    /// single-flight). If one of them fails, `prepared` is dropped uncommitted and the error
    /// names that reference. For a path prepared outside this fetcher.
    pub async fn commit_after_references(
        &self,
        prepared: PreparedPath,
    ) -> Result<IngestStats, PathError> {
        self.inner.commit_after_references(prepared).await
    }

    /// Fetches every member of `closure` not yet stored. All paths are attempted; if any
    /// failed, the error lists every failure.
    pub async fn fetch(
        &self,
        closure: &Closure,
        events: Option<EventSink>,
    ) -> Result<FetchSummary, FetchError> {
        self.fetch_started(closure, HashMap::new(), events).await
    }

    /// [`Fetcher::fetch`], joining the downloads in `started` instead of starting them again.
    async fn fetch_started(
        &self,
        closure: &Closure,
        mut started: HashMap<StorePath, SharedFetch>,
        events: Option<EventSink>,
    ) -> Result<FetchSummary, FetchError> {
        let start = Instant::now();
        let emit = |e: FetchEvent| {
            if let Some(tx) = &events {
                let _ = tx.send(e);
            }
        };
        let remote: Vec<&Arc<Substitute>> = closure.remote().collect();
        emit(FetchEvent::Resolved {
            paths: closure.entries.len(),
            to_fetch: remote.len(),
            total_download_bytes: remote.iter().map(|s| download_size(s)).sum(),
            total_nar_bytes: remote.iter().map(|s| s.info.nar_size).sum(),
        });
        let mut summary = FetchSummary {
            paths: closure.entries.len(),
            ..FetchSummary::default()
        };
        let mut pending = FuturesUnordered::new();
        for entry in &closure.entries {
            match entry {
                ClosureEntry::Stored(info) => {
                    summary.paths_already_present += 1;
                    emit(FetchEvent::PathSkipped {
                        path: info.store_path.clone(),
                    });
                }
                ClosureEntry::Remote(sub) => {
                    let fut = match started.remove(&sub.info.store_path) {
                        Some(f) => f,
                        None => self
                            .inner
                            .clone()
                            .fetch_shared(sub.clone(), events.clone(), None),
                    };
                    let path = sub.info.store_path.clone();
                    pending.push(async move { (path, fut.await) });
                }
            }
        }
        let mut failures = Vec::new();
        while let Some((path, result)) = pending.next().await {
            match result {
                Ok(PathOutcome::AlreadyPresent) => {
                    summary.paths_already_present += 1;
                    emit(FetchEvent::PathSkipped { path });
                }
                Ok(PathOutcome::Fetched {
                    stats,
                    downloaded_bytes,
                }) => {
                    summary.paths_fetched += 1;
                    summary.bytes_downloaded += downloaded_bytes;
                    summary.nar_bytes += stats.nar_bytes;
                    summary.new_stored_bytes += stats.new_stored_bytes;
                    emit(FetchEvent::PathDone {
                        path,
                        stats,
                        downloaded_bytes,
                    });
                }
                Err(e) => {
                    emit(FetchEvent::PathFailed {
                        path,
                        error: e.to_string(),
                    });
                    failures.push(e);
                }
            }
        }
        summary.elapsed = start.elapsed();
        if failures.is_empty() {
            Ok(summary)
        } else {
            failures.sort_by(|a, b| a.path().cmp(b.path()));
            Err(FetchError::Paths {
                total: closure.entries.len(),
                failures,
            })
        }
    }
}

/// Bytes to download for `sub`.
fn download_size(sub: &Substitute) -> u64 {
    sub.info.file_size.unwrap_or(sub.info.nar_size)
}

impl Inner {
    /// The shared fetch of `sub`'s path: joins one in flight, else starts one (as a task, so it
    /// completes for the other waiters even if this caller goes away).
    fn fetch_shared(
        self: Arc<Self>,
        sub: Arc<Substitute>,
        events: Option<EventSink>,
        tee: Option<Arc<dyn NarTee>>,
    ) -> SharedFetch {
        let path = sub.info.store_path.clone();
        // The lock is held until the new entry is in the map, so the task's own removal (which
        // takes the lock) cannot run before the insertion.
        let mut map = self.in_flight.lock();
        if let Some(f) = map.get(&path) {
            return f.clone();
        }
        let me = self.clone();
        let task_path = path.clone();
        let url = sub.cache.nar_url(&sub.info);
        let handle = tokio::spawn(async move {
            let result = me.fetch_one(sub, events, tee).await.map_err(Arc::new);
            me.in_flight.lock().remove(&task_path);
            result
        });
        let err_path = path.clone();
        let fut = async move {
            handle
                .await
                .unwrap_or_else(|e| Err(Arc::new(PathError::task_ended(err_path, url, e))))
        }
        .boxed()
        .shared();
        map.insert(path, fut.clone());
        fut
    }

    /// Fetches one path: skips it if stored, retries transient failures with backoff, and
    /// after a failure that retrying the same cache cannot fix, tries the next cache that has
    /// the path.
    #[tracing::instrument(skip_all, fields(path = %sub.info.store_path))]
    async fn fetch_one(
        self: &Arc<Self>,
        sub: Arc<Substitute>,
        events: Option<EventSink>,
        tee: Option<Arc<dyn NarTee>>,
    ) -> Result<PathOutcome, PathError> {
        let path = sub.info.store_path.clone();
        let result = match self.fetch_attempts(sub, events, tee).await {
            Ok(Prepared::AlreadyPresent) => Ok(PathOutcome::AlreadyPresent),
            Ok(Prepared::Path {
                prepared,
                downloaded_bytes,
            }) => self
                .commit_after_references(*prepared)
                .await
                .map(|stats| PathOutcome::Fetched {
                    stats,
                    downloaded_bytes,
                }),
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            let (p, error) = (path.clone(), e.to_string());
            self.record_state(move |store| store.record_fetch_failed(&p, &error))
                .await;
        }
        result
    }

    /// See [`Fetcher::commit_after_references`].
    async fn commit_after_references(
        self: &Arc<Self>,
        prepared: PreparedPath,
    ) -> Result<IngestStats, PathError> {
        let path = prepared.store_path().clone();
        let stats = prepared.stats().clone();
        if !prepared.already_stored() {
            let mut waits = Vec::new();
            let mut unavailable = None;
            for reference in self.missing_references(&prepared).await? {
                let joined = self.in_flight.lock().get(&reference).cloned();
                let fut = match joined {
                    Some(f) => f,
                    None => match self.subs.lookup(&reference).await {
                        Ok(Some(sub)) => self.clone().fetch_shared(sub, None, None),
                        Ok(None) => {
                            unavailable = Some(PathError::ReferenceUnavailable {
                                path: path.clone(),
                                reference,
                            });
                            break;
                        }
                        Err(source) => {
                            unavailable = Some(PathError::ReferenceLookup {
                                path: path.clone(),
                                reference,
                                source,
                            });
                            break;
                        }
                    },
                };
                waits.push(async move { (reference, fut.await) });
            }
            // The fetches of references already started are let finish (or fail) even when
            // another reference cannot be had, so none is left in flight when this path fails.
            let results = futures_util::future::join_all(waits).await;
            if let Some(e) = unavailable {
                return Err(e);
            }
            for (reference, result) in results {
                if let Err(source) = result {
                    tracing::debug!(%path, %reference, "not committed: a reference failed");
                    return Err(PathError::Reference {
                        path,
                        reference,
                        source: source as Arc<dyn std::error::Error + Send + Sync>,
                    });
                }
            }
        }
        let store = self.store.clone();
        let p = path.clone();
        tokio::task::spawn_blocking(move || store.commit_prepared(vec![prepared]))
            .await
            .map_err(|e| PathError::Aborted {
                path: p.clone(),
                url: String::new(),
                reason: "its commit task ended without a result".into(),
                source: Some(e),
            })?
            .map_err(|source| PathError::Commit { path: p, source })?;
        Ok(stats)
    }

    /// The References of `prepared` (other than itself) that are not stored.
    async fn missing_references(
        &self,
        prepared: &PreparedPath,
    ) -> Result<Vec<StorePath>, PathError> {
        let path = prepared.store_path().clone();
        let refs: Vec<StorePath> = prepared
            .references()
            .iter()
            .filter(|r| **r != path)
            .cloned()
            .collect();
        if refs.is_empty() {
            return Ok(refs);
        }
        self.on_store(&path, move |store| {
            let mut missing = Vec::new();
            for r in refs {
                if !store.has_path(&r)? {
                    missing.push(r);
                }
            }
            Ok(missing)
        })
        .await
    }

    /// Runs `f` on the store off the runtime; its error, or its task's end without a result,
    /// is a failure of `path`.
    async fn on_store<T: Send + 'static>(
        &self,
        path: &StorePath,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, PathError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| PathError::task_ended(path.clone(), String::new(), e))?
            .map_err(|source| PathError::Store {
                path: path.clone(),
                source,
            })
    }

    /// Records fetch state in the store. Bookkeeping only: a failure to record is logged and
    /// never fails the fetch.
    async fn record_state(
        &self,
        f: impl FnOnce(&Store) -> Result<(), kof_store::StoreError> + Send + 'static,
    ) {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %kof_node_api::report::chain(&e), "recording fetch state")
            }
            Err(e) => tracing::warn!(error = %e, "recording fetch state"),
        }
    }

    /// A teed fetch (the lazy engine's) is not under `downloads`: the engine has its own limits
    /// so that demand never queues behind bulk fetches.
    async fn fetch_attempts(
        &self,
        mut sub: Arc<Substitute>,
        events: Option<EventSink>,
        tee: Option<Arc<dyn NarTee>>,
    ) -> Result<Prepared, PathError> {
        let path = sub.info.store_path.clone();
        let attempts = self.opts.retry.attempts.max(1);
        let mut attempt = 1;
        loop {
            let permit = match tee {
                Some(_) => None,
                None => Some(
                    self.downloads
                        .acquire()
                        .await
                        .expect("download semaphore is never closed"),
                ),
            };
            if self.has_path(&path).await? {
                return Ok(Prepared::AlreadyPresent);
            }
            let (p, source) = (path.clone(), sub.cache.nar_url(&sub.info));
            self.record_state(move |store| store.record_fetch_started(&p, &source))
                .await;
            let result = self.download(&sub, events.as_ref(), tee.clone()).await;
            drop(permit);
            let error = match result {
                Ok(outcome) => return Ok(outcome),
                Err(e) => e,
            };
            if error.is_transient() && attempt < attempts {
                let delay = self.opts.retry.delay(attempt);
                tracing::warn!(error = %kof_node_api::report::chain(&error), attempt, ?delay,
                    "transient failure, retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
                continue;
            }
            // This cache will not do: is there another?
            match self.subs.lookup_from(&path, sub.cache_index + 1).await {
                Ok(Some(next)) => {
                    tracing::warn!(error = %kof_node_api::report::chain(&error),
                        next = next.cache.url(), "trying the next cache");
                    sub = next;
                    attempt = 1;
                }
                Ok(None) => return Err(error),
                Err(e) => {
                    tracing::warn!(error = %kof_node_api::report::chain(&e), "no other cache");
                    return Err(error);
                }
            }
        }
    }

    async fn has_path(&self, path: &StorePath) -> Result<bool, PathError> {
        let p = path.clone();
        self.on_store(path, move |store| store.has_path(&p)).await
    }

    /// One attempt: stream the NAR from the cache through the verifying pipeline into the store,
    /// which prepares the path (commits nothing).
    async fn download(
        &self,
        sub: &Substitute,
        events: Option<&EventSink>,
        tee: Option<Arc<dyn NarTee>>,
    ) -> Result<Prepared, PathError> {
        let info = sub.info.clone();
        let path = info.store_path.clone();
        let url = sub.cache.nar_url(&info);
        if let Some(tx) = events {
            let _ = tx.send(FetchEvent::PathStarted {
                path: path.clone(),
                size: download_size(sub),
            });
        }
        let stream = sub
            .cache
            .nar_stream(&info)
            .await
            .map_err(|source| PathError::Open {
                path: path.clone(),
                source,
            })?;
        let (tx, rx) = mpsc::channel(self.opts.channel_chunks.max(1));
        let ctx = Arc::new(Ctx {
            path: path.clone(),
            url: url.clone(),
            compression: info.compression,
            cause: Mutex::new(None),
        });
        let store = self.store.clone();
        let source_cache = sub.cache.url().to_string();
        let ingest_ctx = ctx.clone();
        let ingest = tokio::task::spawn_blocking(move || {
            let reader = pipeline(rx, &info, ingest_ctx)?;
            let mut reader = TeeReader {
                inner: reader,
                tee,
                offset: 0,
            };
            if let Some(t) = &reader.tee {
                t.restart();
            }
            Some(store.prepare_nar(&info, &source_cache, &mut reader))
        });
        let (downloaded, ingested) = tokio::join!(pump(stream, tx, &path, events), ingest);
        let ingested = ingested.map_err(|e| PathError::task_ended(path.clone(), url.clone(), e))?;
        // The first cause a reader layer recorded explains any failure better than the store's
        // wrapping of the io::Error it was handed.
        if let Some(cause) = ctx.take_cause() {
            return Err(cause);
        }
        match ingested {
            Some(Ok(prepared)) => Ok(Prepared::Path {
                prepared: Box::new(prepared),
                downloaded_bytes: downloaded,
            }),
            Some(Err(source)) => Err(PathError::Ingest { path, url, source }),
            None => Err(PathError::Aborted {
                path,
                url,
                reason: "the NAR pipeline could not be set up".into(),
                source: None,
            }),
        }
    }
}

/// What the download attempts of one path came to: stored already, or downloaded and
/// prepared (see [`Fetcher::prepare_teed`]).
#[derive(Debug)]
pub enum Prepared {
    /// It was stored already.
    AlreadyPresent,
    /// Downloaded and prepared, not committed.
    Path {
        /// The prepared path, for [`kof_store::Store::commit_prepared`].
        prepared: Box<PreparedPath>,
        /// Bytes downloaded.
        downloaded_bytes: u64,
    },
}

/// One message from the download task to the ingest thread.
enum Msg {
    Data(Bytes),
    Error(CacheError),
    End,
}

/// Sends the body's chunks down `tx` (waiting when it is full: backpressure), reporting
/// progress. Returns the bytes received.
async fn pump(
    mut stream: NarStream,
    tx: mpsc::Sender<Msg>,
    path: &StorePath,
    events: Option<&EventSink>,
) -> u64 {
    const PROGRESS_EVERY: u64 = 256 * 1024;
    let mut bytes = 0u64;
    let mut reported = 0u64;
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                bytes += chunk.len() as u64;
                if let Some(ev) = events {
                    if bytes - reported >= PROGRESS_EVERY {
                        reported = bytes;
                        let _ = ev.send(FetchEvent::Progress {
                            path: path.clone(),
                            bytes,
                        });
                    }
                }
                if tx.send(Msg::Data(chunk)).await.is_err() {
                    // The ingest side stopped (it failed); its error is the one reported.
                    return bytes;
                }
            }
            Err(e) => {
                let _ = tx.send(Msg::Error(e)).await;
                return bytes;
            }
        }
    }
    if let Some(ev) = events {
        if bytes != reported {
            let _ = ev.send(FetchEvent::Progress {
                path: path.clone(),
                bytes,
            });
        }
    }
    let _ = tx.send(Msg::End).await;
    bytes
}

/// What every reader layer of one download shares: names for errors and the first cause.
struct Ctx {
    path: StorePath,
    url: String,
    compression: Compression,
    cause: Mutex<Option<PathError>>,
}

impl Ctx {
    /// Records `cause` if it is the first, and gives the io::Error to return to the reader's
    /// caller.
    fn fail(&self, cause: PathError) -> std::io::Error {
        let msg = cause.to_string();
        let mut slot = self.cause.lock();
        slot.get_or_insert(cause);
        std::io::Error::other(msg)
    }

    fn has_cause(&self) -> bool {
        self.cause.lock().is_some()
    }

    fn take_cause(&self) -> Option<PathError> {
        self.cause.lock().take()
    }
}

/// Builds the blocking reader stack over the channel. Runs on the blocking thread. `None` when
/// the decoder cannot be set up (the cause is recorded in `ctx`).
fn pipeline(
    rx: mpsc::Receiver<Msg>,
    info: &kof_nar::NarInfo,
    ctx: Arc<Ctx>,
) -> Option<NarSizeGuard> {
    let channel = ChannelReader {
        rx,
        current: Bytes::new(),
        ctx: ctx.clone(),
    };
    let checked = FileCheck {
        hashing: Some(HashingReader::new(channel)),
        expected_hash: info.file_hash,
        expected_size: info.file_size,
        limit: max_file_size(info.nar_size),
        ctx: ctx.clone(),
    };
    let buffered = BufReader::with_capacity(64 * 1024, checked);
    let decoder = match info.compression {
        Compression::None => Decoder::None(buffered),
        Compression::Xz => Decoder::Xz(xz2::bufread::XzDecoder::new(buffered)),
        Compression::Bzip2 => Decoder::Bzip2(bzip2::bufread::BzDecoder::new(buffered)),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(buffered) {
            Ok(d) => Decoder::Zstd(d),
            Err(source) => {
                // Recorded as the cause; `download` returns it.
                let _ = ctx.fail(PathError::Decompress {
                    path: ctx.path.clone(),
                    url: ctx.url.clone(),
                    compression: ctx.compression,
                    source,
                });
                return None;
            }
        },
    };
    Some(NarSizeGuard {
        inner: StrictDecoder {
            decoder,
            finished: false,
            ctx: ctx.clone(),
        },
        nar_size: info.nar_size,
        delivered: 0,
        ctx,
    })
}

/// Reads the chunks the download task sends. Blocks (on the blocking thread) when none is
/// ready; an explicit end marker tells a complete body from a download task that vanished.
struct ChannelReader {
    rx: mpsc::Receiver<Msg>,
    current: Bytes,
    ctx: Arc<Ctx>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Msg::Data(b)) => self.current = b,
                Some(Msg::End) => return Ok(0),
                Some(Msg::Error(source)) => {
                    return Err(self.ctx.fail(PathError::Download {
                        path: self.ctx.path.clone(),
                        source,
                    }))
                }
                None => {
                    return Err(self.ctx.fail(PathError::Aborted {
                        path: self.ctx.path.clone(),
                        url: self.ctx.url.clone(),
                        reason: "the download task stopped without finishing".into(),
                        source: None,
                    }))
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// Hashes and counts the NAR file as downloaded; refuses it as soon as it exceeds FileSize and,
/// at its end, if its size or sha256 differ from FileSize/FileHash.
struct FileCheck {
    hashing: Option<HashingReader<ChannelReader>>,
    expected_hash: Option<NixHash>,
    expected_size: Option<u64>,
    /// Bound on the file's size when FileSize is absent.
    limit: u64,
    ctx: Arc<Ctx>,
}

/// The largest file accepted for a NAR of `nar_size` bytes when the narinfo gives no FileSize:
/// xz, zstd and bzip2 all expand incompressible input by well under 1/8, plus a constant.
fn max_file_size(nar_size: u64) -> u64 {
    nar_size
        .saturating_add(nar_size / 8)
        .saturating_add(64 * 1024)
}

impl Read for FileCheck {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(hashing) = self.hashing.as_mut() else {
            return Ok(0); // verified end
        };
        if buf.is_empty() {
            return Ok(0);
        }
        let n = hashing.read(buf)?;
        let count = hashing.count();
        match self.expected_size {
            Some(expected) if count > expected => {
                return Err(self.ctx.fail(PathError::FileSize {
                    path: self.ctx.path.clone(),
                    url: self.ctx.url.clone(),
                    expected,
                    got: count,
                }))
            }
            None if count > self.limit => {
                return Err(self.ctx.fail(PathError::FileTooLarge {
                    path: self.ctx.path.clone(),
                    url: self.ctx.url.clone(),
                    limit: self.limit,
                }))
            }
            _ => {}
        }
        if n > 0 {
            return Ok(n);
        }
        let (got_hash, got_size, _) = self.hashing.take().expect("checked above").finish();
        if let Some(expected) = self.expected_size {
            if got_size != expected {
                return Err(self.ctx.fail(PathError::FileSize {
                    path: self.ctx.path.clone(),
                    url: self.ctx.url.clone(),
                    expected,
                    got: got_size,
                }));
            }
        }
        if let Some(expected) = self.expected_hash {
            if got_hash != expected {
                return Err(self.ctx.fail(PathError::FileHash {
                    path: self.ctx.path.clone(),
                    url: self.ctx.url.clone(),
                    expected,
                    got: got_hash,
                }));
            }
        }
        Ok(0)
    }
}

type Compressed = BufReader<FileCheck>;

/// The decompressor the narinfo names. The buffered decoders are used so the buffered input
/// stays reachable (`get_mut`) for the end-of-stream drain.
enum Decoder {
    None(Compressed),
    Xz(xz2::bufread::XzDecoder<Compressed>),
    Zstd(zstd::stream::read::Decoder<'static, Compressed>),
    Bzip2(bzip2::bufread::BzDecoder<Compressed>),
}

impl Decoder {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Decoder::None(r) => r.read(buf),
            Decoder::Xz(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
            Decoder::Bzip2(d) => d.read(buf),
        }
    }

    fn compressed(&mut self) -> &mut Compressed {
        match self {
            Decoder::None(r) => r,
            Decoder::Xz(d) => d.get_mut(),
            Decoder::Zstd(d) => d.get_mut(),
            Decoder::Bzip2(d) => d.get_mut(),
        }
    }
}

/// Decompresses, and at the end of the compressed stream requires the file to end too (the xz
/// and bzip2 decoders stop at their stream's end and would otherwise leave trailing bytes, and
/// the FileHash check, unread).
struct StrictDecoder {
    decoder: Decoder,
    finished: bool,
    ctx: Arc<Ctx>,
}

impl Read for StrictDecoder {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.finished || buf.is_empty() {
            return Ok(0);
        }
        let n = self.decoder.read(buf).map_err(|source| {
            if self.ctx.has_cause() {
                // An inner layer failed first; that is the cause.
                std::io::Error::other(source.to_string())
            } else {
                self.ctx.fail(PathError::Decompress {
                    path: self.ctx.path.clone(),
                    url: self.ctx.url.clone(),
                    compression: self.ctx.compression,
                    source,
                })
            }
        })?;
        if n > 0 {
            return Ok(n);
        }
        // End of the compressed stream: the file must end here as well. Reaching the file's
        // end runs the FileHash/FileSize check.
        let rest = self.decoder.compressed().fill_buf()?;
        if !rest.is_empty() {
            return Err(self.ctx.fail(PathError::TrailingCompressed {
                path: self.ctx.path.clone(),
                url: self.ctx.url.clone(),
                compression: self.ctx.compression,
            }));
        }
        self.finished = true;
        Ok(0)
    }
}

/// Hands what it reads to the [`NarTee`], if any, on its way to the store.
struct TeeReader {
    inner: NarSizeGuard,
    tee: Option<Arc<dyn NarTee>>,
    offset: u64,
}

impl Read for TeeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(t) = &self.tee {
            if n > 0 {
                t.write(self.offset, &buf[..n])?;
            }
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// Hands the store exactly NarSize bytes. Before handing over the last of them it makes sure
/// the decompressed stream ends there and the file checks passed, so a bad file fails the
/// ingest before the store can commit.
struct NarSizeGuard {
    inner: StrictDecoder,
    nar_size: u64,
    delivered: u64,
    ctx: Arc<Ctx>,
}

impl Read for NarSizeGuard {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let remaining = self.nar_size - self.delivered;
        if remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(self.ctx.fail(PathError::NarTooShort {
                path: self.ctx.path.clone(),
                url: self.ctx.url.clone(),
                expected: self.nar_size,
                got: self.delivered,
            }));
        }
        self.delivered += n as u64;
        if self.delivered == self.nar_size {
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? != 0 {
                return Err(self.ctx.fail(PathError::NarTooLong {
                    path: self.ctx.path.clone(),
                    url: self.ctx.url.clone(),
                    expected: self.nar_size,
                }));
            }
        }
        Ok(n)
    }
}
