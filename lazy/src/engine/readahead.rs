//! Readahead: a demand read of a small file also fetches the rest of the file; of a large file,
//! a growing window after the read. In the background, under readahead slots.

use kof_node_api::report::chain;
use std::sync::Arc;

use kof_nar::StorePath;

use super::range::claim;
use super::{LazyStore, Mode, PathState, RunError};
use crate::Cause;

/// The window readahead of one large file: where its last demand read ended and how far
/// ahead of it was read.
#[derive(Clone, Copy)]
pub(super) struct Window {
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

impl LazyStore {
    /// The range a whole-file readahead should fetch for a demand read at NAR byte `start` of
    /// `path` (state `st`): the file holding it, when it is small enough, reaches beyond
    /// `start..end` and was not read ahead before.
    pub(super) fn readahead_of(
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
        let files = self.files.lock().get(path)?.clone();
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
        if !self.read_ahead.lock().insert((path.clone(), off)) {
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
        let mut windows = self.windows.lock();
        let key = (path.clone(), off);
        let w = next_window(windows.get(&key).copied(), start, end, min, max.max(min));
        windows.insert(key, w);
        let ahead_end = end.saturating_add(w.size).min(file_end);
        (ahead_end > end).then_some((end, ahead_end))
    }

    /// Reads chunks `a..b` ahead in the background as demand work, not waited for: in pieces
    /// of at most `piece` chunks, those from `from` (where the read that asked ended) first,
    /// then those before it. Each piece claims its missing chunks only once it has a readahead
    /// slot, so chunks a demand read needs meanwhile are fetched by that read, not queued
    /// behind the readahead. A failed piece leaves its chunks missing for the next read.
    pub(super) fn spawn_readahead(
        &self,
        st: &Arc<PathState>,
        a: usize,
        b: usize,
        from: usize,
        piece: usize,
    ) {
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
                    if PathState::settled(&g).is_some() || g.mode != Mode::Indexed {
                        return;
                    }
                    let runs = claim(&mut g.chunks, p0, p1, piece, usize::MAX);
                    if !runs.is_empty() {
                        if let Err(e) = st.file(&mut g) {
                            drop(g);
                            for &(x, y) in &runs {
                                me.release(&st, x, y);
                            }
                            tracing::debug!(error = %chain(&e), "readahead failed; its chunks stay missing");
                            return;
                        }
                    }
                    runs
                };
                for (x, y) in runs {
                    let _slot = me.demand_slots.acquire().await.expect("never closed");
                    if let Err(RunError::Failed { error: e, .. }) =
                        me.fetch_run(st.clone(), x, y, Cause::Demand).await
                    {
                        tracing::debug!(error = %chain(&e), "readahead failed; its chunks stay missing");
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
