//! Prefetch below demand: a closure's paths and a learned profile's ranges, fetched when demand
//! is quiet ([`LazyStore::demand_quiet`]), under prefetch slots.

use kof_node_api::report::chain;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kof_substituter::closure::{Closure, ClosureEntry};
use tokio::task::JoinHandle;

use super::LazyStore;
use crate::profile::Profile;
use crate::Cause;

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

/// Counts as demand work while held (see [`LazyStore::demand_quiet`]).
pub(super) struct DemandActivity(Arc<LazyStore>);

impl Drop for DemandActivity {
    fn drop(&mut self) {
        *self.0.demand_ended.lock() = Instant::now();
        self.0.demand_active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl LazyStore {
    /// Marks demand work under way until the guard is dropped.
    pub(super) fn demand_activity(&self) -> DemandActivity {
        self.demand_active.fetch_add(1, Ordering::SeqCst);
        DemandActivity(self.arc())
    }

    /// Returns once no demand work is under way and none ended within
    /// [`LazyOptions::prefetch_quiet`]: prefetch starts its fetches only then, so that it takes
    /// the link only while demand leaves it idle.
    pub(super) async fn demand_quiet(&self) {
        let quiet = self.opts.prefetch_quiet;
        if quiet.is_zero() {
            return;
        }
        loop {
            let wait = if self.demand_active.load(Ordering::SeqCst) > 0 {
                quiet
            } else {
                let since = self.demand_ended.lock().elapsed();
                if since >= quiet {
                    return;
                }
                quiet - since
            };
            tokio::time::sleep(wait.min(Duration::from_millis(10))).await;
        }
    }

    /// Fetches every member of `closure` not stored, in the background, below demand: at most
    /// [`crate::LazyOptions::prefetch_concurrency`] fetches at once, through the same single-flight
    /// state as demand reads (so a path being prefetched serves them too).
    pub fn prefetch(&self, closure: Closure) -> JoinHandle<PrefetchReport> {
        // A prefetch starts as a program does (a view was just prepared): its first reads come
        // within the quiet time, ahead of the prefetch.
        *self.demand_ended.lock() = Instant::now();
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
                        tracing::warn!(%path, error = %chain(&e), "prefetch failed");
                        report.failures.push(chain(&e));
                    }
                    Err(e) => report.failures.push(chain(&e)),
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

    /// Fetches a profile's ranges, all in parallel, as [`Cause::Profile`] (under demand slots:
    /// a profile is what the next reads will ask for). Resolves to the failures, rendered.
    pub fn prefetch_profile(&self, profile: Profile) -> JoinHandle<Vec<String>> {
        let me = self.arc();
        tokio::spawn(async move {
            let ranges = match profile.store_ranges() {
                Ok(r) => r,
                Err(e) => return vec![chain(&e)],
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
                    Ok(Err(e)) => failures.push(chain(&e)),
                    Err(e) => failures.push(chain(&e)),
                }
            }
            failures
        })
    }
}
