//! Stream path (path-level laziness): one streamed fetch of a whole path, in whatever
//! compression its cache serves, through the fetcher's verifying pipeline into the store.
//! Readers wait for the commit: no byte of an unindexed path is served before its NarHash is
//! checked. And whole-path fetches ([`LazyStore::fetch_whole`]) on either path.

use kof_node_api::report::chain;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use kof_nar::StorePath;
use kof_substituter::fetcher::{NarTee, Prepared};

use super::{spawn_err, LazyStore, Mode, PathState, Phase, RunError, StreamJob};
use crate::{Cause, LazyError};

impl LazyStore {
    /// Stream path: joins (or starts) the path's one streamed fetch and returns once the path
    /// is verified and stored.
    pub(super) async fn ensure_stream(
        &self,
        st: &Arc<PathState>,
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
            let _in_flight = me.counters.request(cause);
            let t0 = Instant::now();
            tracing::debug!(path = %st.path(), %cause, "streaming the whole NAR");
            let prepared = me
                .fetcher
                .prepare_teed(st.sub.clone(), Arc::new(Unread))
                .await;
            // Nix's closure rule: committed after its References, which this engine fetches
            // first, holding no slot meanwhile (see `commit_after_references`).
            drop((_slot, _in_flight));
            let committed = match prepared {
                Ok(Prepared::AlreadyPresent) => Ok(None),
                Ok(Prepared::Path {
                    prepared,
                    downloaded_bytes,
                }) => {
                    me.counters.latency(t0.elapsed());
                    // Its readers (and a view's gate) wait for the commit, demanded or not yet:
                    // its references are fetched as demand.
                    me.commit_after_references(*prepared, Cause::Demand)
                        .await
                        .map(|_| Some(downloaded_bytes))
                }
                Err(e) => Err(LazyError::Fetch(Arc::new(e))),
            };
            match committed {
                Ok(downloaded) => {
                    if let Some(downloaded_bytes) = downloaded {
                        me.counters.bytes(cause, downloaded_bytes);
                        me.counters.completed();
                    } else {
                        me.counters.latency(t0.elapsed());
                    }
                    me.mark_stored(&st);
                    Ok(())
                }
                Err(e) => Err(me.stream_failed(&st, e)),
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
        tracing::warn!(path = %st.path(), error = %chain(&e), "streamed fetch failed");
        st.lock().stream = None;
        st.bump();
        Arc::new(e)
    }

    /// Fetches `path` whole into the store (if it is not stored) and waits for the commit,
    /// joining whatever fetch of it is under way. No read bound: a whole path takes its time.
    pub async fn fetch_whole(&self, path: &StorePath, cause: Cause) -> Result<(), LazyError> {
        self.ensure_stored(path, cause).await
    }

    /// Fetches `path` whole into the store (if it is not stored) and waits for the commit.
    pub(super) async fn ensure_stored(
        &self,
        path: &StorePath,
        cause: Cause,
    ) -> Result<(), LazyError> {
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
                // (A reader waiting marks the stream demanded, so a stream still queued as
                // prefetch takes a demand slot.)
                Mode::Stream => return self.ensure_stream(&st, cause).await,
                Mode::Indexed => {
                    match self.ensure_range(&st, 0, st.nar_size(), cause, None).await {
                        Err(RunError::Unsupported | RunError::Yielded) => continue,
                        Err(RunError::Failed { error, .. }) => {
                            self.after_failed_fetch(&st, error).await?;
                            continue;
                        }
                        Ok(()) => {}
                    }
                    // Every chunk is there: wait for the ingest (unless it waits for space).
                    loop {
                        {
                            let g = st.lock();
                            if let Some(r) = PathState::settled(&g) {
                                return r;
                            }
                            if let (Some((e, _)), Phase::Fetching) = (&g.no_space, &g.phase) {
                                return Err(LazyError::Shared(e.clone()));
                            }
                        }
                        if rx.changed().await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// A stream's NAR bytes are not handed to anyone before the fetcher verified and stored them
/// (readers of an unindexed path wait for the commit), so the tee takes nothing.
struct Unread;

impl NarTee for Unread {
    fn restart(&self) {}

    fn write(&self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}
