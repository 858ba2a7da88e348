//! Stream path: one streamed fetch of a whole path through the fetcher's verifying pipeline,
//! its NAR bytes teed into the partial file under a high-water mark; and whole-path fetches
//! ([`LazyStore::fetch_whole`]) on either path.

use kof_node_api::report::chain;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use kof_nar::StorePath;
use kof_substituter::fetcher::{NarTee, PathOutcome};

use super::{spawn_err, LazyStore, Mode, PathState, RunError, StreamJob};
use crate::{Cause, LazyError};

impl LazyStore {
    /// Stream path: joins (or starts) the path's one streamed fetch and returns once the
    /// stream has passed `end` (or the path is stored).
    pub(super) async fn ensure_stream(
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
        tracing::warn!(path = %st.path(), error = %chain(&e), "streamed fetch failed");
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
                        Err(RunError::Failed { error, .. }) => return Err(error),
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
