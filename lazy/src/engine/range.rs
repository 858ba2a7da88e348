//! Indexed range fetch: claiming a path's missing chunks (the chunks of its signed index),
//! GETting their bytes of the NAR file (each chunk single-flight, adjacent ones coalesced into
//! one GET of compressed bytes), decoding and checking each chunk against the index before it
//! is written into the partial file and marked filled, and ingesting the complete partial file
//! into the store (which checks NarHash once more).

use kof_node_api::report::chain;
use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use tokio::task::JoinHandle;

use super::{
    partial_error, spawn_err, Chunk, LazyStore, Mode, PathState, Phase, NO_SPACE_RETRY_MAX,
    NO_SPACE_RETRY_MIN,
};
use crate::{Cause, LazyError};

/// Why a range fetch did not fill its chunks.
pub(super) enum RunError {
    /// The cache ignores `Range`: the path now uses the stream path.
    Unsupported,
    /// The fetch failed; `transient` failures (a timeout, a 5xx, a connection reset) are
    /// tried again, up to [`crate::LazyOptions::range_attempts`].
    Failed {
        /// What failed.
        error: LazyError,
        /// Whether another attempt may succeed.
        transient: bool,
    },
    /// A prefetch GET stopped at a chunk boundary because demand work started: its chunks not
    /// filled are missing again, for a later prefetch (or the demand) to fetch.
    Yielded,
}

impl RunError {
    /// A failure another attempt would not mend.
    pub(super) fn permanent(error: LazyError) -> RunError {
        RunError::Failed {
            error,
            transient: false,
        }
    }
}

impl LazyStore {
    /// Range path: claims the missing chunks of `start..end` and fetches them (demand: all at
    /// once, in parallel; prefetch: a window at a time, each under a prefetch slot, when
    /// demand is quiet), then waits for chunks others are fetching. `readahead`: NAR bytes
    /// whose missing chunks are also claimed (after the read's own) and fetched in the
    /// background, in parallel GETs, not waited for.
    pub(super) async fn ensure_range(
        &self,
        st: &Arc<PathState>,
        start: u64,
        end: u64,
        cause: Cause,
        mut readahead: Option<(u64, u64)>,
    ) -> Result<(), RunError> {
        let (c0, c1) = st.chunk_span(start, end);
        let limit = |bytes: u64| st.chunks_in(bytes);
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
                    return r.map_err(RunError::permanent);
                }
                if g.mode != Mode::Indexed {
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
                    st.file(&mut g).map_err(RunError::permanent)?;
                }
                drop(g);
                if let Some((a, b)) = readahead.take().filter(|_| permit.is_none()) {
                    let (a, b) = st.chunk_span(a, b);
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
                    .unwrap_or_else(|e| vec![Err(RunError::permanent(spawn_err(st.path(), e)))])
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
                        t.await
                            .unwrap_or_else(|e| Err(RunError::permanent(spawn_err(st.path(), e)))),
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
                    Err(RunError::Failed {
                        error: e,
                        transient,
                    }) => {
                        failures += 1;
                        if !transient || failures >= self.opts.range_attempts.max(1) {
                            return Err(RunError::Failed {
                                error: e,
                                transient,
                            });
                        }
                        let delay = kof_substituter::cache::RetryPolicy::default().delay(failures);
                        tracing::warn!(path = %st.path(), error = %chain(&e), ?delay, "range fetch failed, retrying");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }

    /// GETs chunks `a..b` (claimed by the caller) into the partial file, marking each chunk
    /// filled as soon as its last byte is written. On failure, the chunks not filled are
    /// released for another attempt.
    pub(super) async fn fetch_run(
        &self,
        st: Arc<PathState>,
        a: usize,
        b: usize,
        cause: Cause,
    ) -> Result<(), RunError> {
        let mut next = a; // first chunk not yet marked filled
        let result = self.fetch_run_inner(&st, a, b, cause, &mut next).await;
        if result.is_err() {
            self.release(&st, next, b);
        }
        result
    }

    /// Makes claimed chunks of `a..b` not filled missing again, and wakes their waiters.
    pub(super) fn release(&self, st: &Arc<PathState>, a: usize, b: usize) {
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
        a: usize,
        b: usize,
        cause: Cause,
        next: &mut usize,
    ) -> Result<(), RunError> {
        let index = st.index.clone().expect("only indexed paths have chunks");
        let chunks = &index.index().chunks;
        let (start, end) = (chunks[a].nar_offset, chunks[b - 1].nar_range().end);
        let (fstart, fend) = (chunks[a].file_offset, chunks[b - 1].file_range().end);
        let path = st.path().clone();
        let info = &st.sub.info;
        let cache = &st.sub.cache;
        let _in_flight = self.counters.request(cause);
        let t0 = Instant::now();
        tracing::debug!(%path, start, end, fstart, fend, %cause, "range GET of indexed chunks");
        let stream = match cache.nar_range(info, fstart, fend).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::warn!(cache = cache.url(), %path,
                    "cache ignores Range (200): streaming whole NARs from it");
                self.range_ok.lock().insert(cache.url().to_string(), false);
                st.lock().mode = Mode::Stream;
                st.bump();
                return Err(RunError::Unsupported);
            }
            Err(source) => {
                let transient = source.is_transient();
                return Err(RunError::Failed {
                    error: LazyError::Range {
                        path,
                        start,
                        end,
                        source: Box::new(source),
                    },
                    transient,
                });
            }
        };
        self.range_ok
            .lock()
            .entry(cache.url().to_string())
            .or_insert(true);
        let file = st.lock().file.clone();
        let Some(file) = file else {
            return Err(RunError::permanent(LazyError::PartialGone { path }));
        };
        let mut stream = stream;
        let short = |got: u64| LazyError::RangeLength {
            path: path.clone(),
            url: cache.nar_url(info),
            start: fstart,
            end: fend,
            got,
        };
        // Bytes of the NAR file received and not yet decoded: the frames of chunks `next..`.
        let mut pending: Vec<u8> = Vec::new();
        let mut received = 0u64;
        while let Some(item) = stream.next().await {
            let bytes = item.map_err(|source| {
                let transient = source.is_transient();
                RunError::Failed {
                    error: LazyError::Range {
                        path: path.clone(),
                        start,
                        end,
                        source: Box::new(source),
                    },
                    transient,
                }
            })?;
            received += bytes.len() as u64;
            if fstart + received > fend {
                return Err(RunError::permanent(short(received)));
            }
            self.counters.bytes(cause, bytes.len() as u64);
            pending.extend_from_slice(&bytes);
            let mut used = 0usize;
            let before = *next;
            // The chunks decoded from this piece are marked filled even when a later one in it
            // fails: a chunk decoded, written and left in flight would never be read again.
            let mut failed = None;
            while *next < b {
                let c = &chunks[*next];
                let len = c.file_len as usize;
                if pending.len() - used < len {
                    break;
                }
                // No byte is written, let alone read, before it matched the signed index.
                let nar = match index.decode_chunk(*next, &pending[used..used + len]) {
                    Ok(nar) => nar,
                    Err(source) => {
                        failed = Some(RunError::permanent(LazyError::Unverified {
                            path: path.clone(),
                            cache: cache.url().to_string(),
                            url: cache.nar_url(info),
                            source: Box::new(source),
                        }));
                        break;
                    }
                };
                // A page-cache write of one chunk: short enough for the runtime thread.
                // A full disk fails this chunk (and the read needing it) only: its claim is
                // released below, never marked filled (see "A full file system" in the engine).
                if let Err(source) = file.write_all_at(&nar, c.nar_offset) {
                    failed = Some(RunError::permanent(partial_error(
                        &path,
                        &st.partial,
                        source,
                    )));
                    break;
                }
                used += len;
                *next += 1;
            }
            if let Some(e) = failed {
                if *next > before {
                    self.fill(st, before, *next);
                }
                return Err(e);
            }
            pending.drain(..used);
            if *next > before {
                self.fill(st, before, *next);
                // Prefetch stays below demand: a demand read started while this GET streamed
                // shares the link with it, so stop at this chunk boundary (the connection is
                // dropped; the rest is fetched again later).
                if cause == Cause::Prefetch
                    && *next < b
                    && self.demand_active.load(Ordering::SeqCst) > 0
                {
                    self.counters.prefetch_yield();
                    tracing::debug!(%path, at = chunks[*next].nar_offset, end, "prefetch GET yields to demand");
                    return Err(RunError::Yielded);
                }
            }
        }
        if *next != b {
            return Err(RunError::Failed {
                error: short(received),
                transient: true,
            });
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
    pub(super) async fn complete(&self, st: Arc<PathState>) {
        let store = self.store.clone();
        let info = st.sub.info.clone();
        let source = st.sub.cache.url().to_string();
        let partial = st.partial.clone();
        let path = st.path().clone();
        let result = tokio::task::spawn_blocking(move || {
            let f = File::open(&partial)?;
            let mut r = BufReader::with_capacity(1 << 20, f);
            Ok::<_, std::io::Error>(store.prepare_nar(&info, &source, &mut r))
        })
        .await;
        // Nix's closure rule: committed after its References, fetched whole first if needed.
        let result = match result {
            // As demand: a reader may be waiting for the path to be stored (a view's gate).
            Ok(Ok(Ok(prepared))) => Ok(Ok(self
                .commit_after_references(prepared, Cause::Demand)
                .await)),
            // A full disk is not a verdict on the bytes.
            Ok(Ok(Err(source))) if source.is_no_space() => Ok(Ok(Err(LazyError::Store {
                path: path.clone(),
                source: Box::new(source),
            }))),
            Ok(Ok(Err(source))) => Ok(Ok(Err(LazyError::Refused {
                path: path.clone(),
                source: Box::new(source),
            }))),
            Ok(Err(e)) => Ok(Err(e)),
            Err(e) => Err(e),
        };
        let failure = match result {
            Ok(Ok(Ok(stats))) => {
                if st.lock().no_space.take().is_some() {
                    tracing::info!(%path, "complete NAR ingested now that the file system has room");
                }
                tracing::info!(%path, nar_bytes = stats.nar_bytes, "range-fetched path verified and stored");
                self.counters.completed();
                self.mark_stored(&st);
                return;
            }
            Ok(Ok(Err(failure))) => failure,
            Ok(Err(source)) => partial_error(&path, &st.partial, source),
            Err(e) => spawn_err(&path, e),
        };
        if kof_store::chain_is_no_space(&failure) {
            self.defer_ingest(st, failure);
            return;
        }
        tracing::error!(%path, error = %chain(&failure), "range-fetched NAR refused; the path stays unstored and its reads fail");
        self.counters.refused();
        {
            let mut g = st.lock();
            g.phase = Phase::Failed(Arc::new(failure));
            st.remove_partial(&mut g);
        }
        st.bump();
    }
}

impl LazyStore {
    /// Nix's closure rule for the engine's paths: `prepared` is committed once its References
    /// are stored; those not stored are fetched whole through this engine first, as `cause`.
    /// The caller holds no slot meanwhile. A range-fetched path's reads are served from its
    /// partial file while it waits, but a view's gate may wait for it to be stored, so its
    /// references are fetched as demand; a streamed path's readers wait for the commit, so its
    /// references are fetched as demand too. If a reference fails, nothing is committed and the
    /// path's fetch state says why.
    pub(super) async fn commit_after_references(
        &self,
        prepared: kof_store::PreparedPath,
        cause: Cause,
    ) -> Result<kof_store::IngestStats, LazyError> {
        let path = prepared.store_path().clone();
        let waits = prepared
            .references()
            .iter()
            .filter(|r| **r != path)
            .map(|r| {
                let ensure = self.arc().ensure_reference(r.clone(), cause);
                async move { (r.clone(), ensure.await) }
            });
        for (reference, result) in futures_util::future::join_all(waits).await {
            if let Err(e) = result {
                let failure = kof_substituter::fetcher::PathError::Reference {
                    path: path.clone(),
                    reference,
                    source: Arc::new(e),
                };
                let (store, error) = (self.store.clone(), chain(&failure));
                let p = path.clone();
                if let Ok(Err(e)) =
                    tokio::task::spawn_blocking(move || store.record_fetch_failed(&p, &error)).await
                {
                    tracing::warn!(%path, error = %chain(&e), "recording fetch state");
                }
                return Err(LazyError::Fetch(Arc::new(failure)));
            }
        }
        let stats = prepared.stats().clone();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.commit_prepared(vec![prepared]))
            .await
            .map_err(|e| spawn_err(&path, e))?
            .map_err(|source| LazyError::Store {
                path: path.clone(),
                source: Box::new(source),
            })?;
        Ok(stats)
    }

    /// Fetches `reference` whole through this engine, as `cause`. A boxed future: the
    /// completion of a path awaits it, and it may complete other paths.
    fn ensure_reference(
        self: Arc<Self>,
        reference: kof_nar::StorePath,
        cause: Cause,
    ) -> futures_util::future::BoxFuture<'static, Result<(), LazyError>> {
        Box::pin(async move { self.ensure_stored(&reference, cause).await })
    }

    /// After the ingest of `st`'s complete partial file failed because the file system is
    /// full: the path goes back to fetching with every chunk filled (its reads keep being
    /// served from the partial file, which is kept), waiters for the commit get `failure`,
    /// and the ingest is tried again later (see "A full file system" in the engine).
    fn defer_ingest(&self, st: Arc<PathState>, failure: LazyError) {
        let failure = Arc::new(failure);
        let attempts = {
            let mut g = st.lock();
            let attempts = g.no_space.as_ref().map_or(0, |(_, n)| *n) + 1;
            g.phase = Phase::Fetching;
            g.no_space = Some((failure.clone(), attempts));
            attempts
        };
        st.bump();
        let delay = NO_SPACE_RETRY_MIN
            .saturating_mul(1 << attempts.saturating_sub(1).min(8))
            .min(NO_SPACE_RETRY_MAX);
        tracing::warn!(path = %st.path(), error = %chain(&*failure), ?delay, attempts,
            "complete NAR not ingested, the file system is full: its reads are served from the \
             partial file, and the ingest is tried again");
        let me = self.arc();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let again = {
                let mut g = st.lock();
                let again = g.no_space.is_some()
                    && matches!(g.phase, Phase::Fetching)
                    && g.filled == g.chunks.len();
                if again {
                    g.phase = Phase::Completing;
                }
                again
            };
            if again {
                st.bump();
                me.complete(st).await;
            }
        });
    }
}

/// Claims the missing chunks of `c0..c1` (marks them in flight), at most `limit` of them, as
/// runs of adjacent chunks no longer than `max_run`.
pub(super) fn claim(
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
}
