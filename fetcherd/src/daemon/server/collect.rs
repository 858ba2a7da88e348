//! Garbage collection on the live node: the `gc` op, collection by quota (`store_max_bytes`,
//! `store_min_free`), and the collection a write that found no space asks for
//! ([`Daemon::gc_no_space`]).
//!
//! One collection runs at a time (`gc_lock`). A collection frees, in this order:
//! 1. derived data that serves nothing (`kof_lazy::derived`): raw copies of contents no
//!    stored path holds, partial NARs no engine has open (a manual `gc` with `derived`, and
//!    the collection after ENOSPC, take every raw copy);
//! 2. garbage: [`kof_store::Store::gc_live`] with the daemon's live set
//!    ([`Daemon::live_set`]): the leased generations, the generations of the idle views it
//!    keeps, the paths with a demand read in flight, and the paths the lazy engine is
//!    fetching with their references, beside the store's own roots (kept environments, the
//!    pinned roots of leases) and fetches under way. The engine forgets the removed paths
//!    as soon as their removal commits, so a later lease of their generation fetches them
//!    again (the FUSE server's reader drops its memory of one at its first failed read);
//! 3. by quota only, while still over: the least recently used idle view (by the
//!    generation's `last_used_at`, then by when it became idle) is dropped, and garbage (and
//!    the raw copies it leaves unused) collected again;
//! 4. by quota only, last: raw copies of stored files, which the next open of each file
//!    writes again (evicting them earlier would only trade disk for churn). Leased and kept
//!    (rooted) generations are never evicted: when nothing more can go, a warning says how
//!    much could not be freed.
//!
//! Within one step garbage goes first, so the raw copies of the paths it removes go in the
//! same step.
//!
//! Each run is recorded in the store (`gc_runs`) and counted in the metrics (`kof_gc_*`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kof_lazy::derived::{derived_usage, evict_derived};
use kof_nar::StorePath;
use kof_node_api::api::{ErrorKind, GcDone};
use kof_node_api::report::chain;
use kof_store::{Digest, GcReport, GcRun, GcTrigger, LiveSet};
use tracing::{info, warn};

use super::{blocking, fail, now_secs, Daemon, Failure};

/// How often the quota is checked when no prepare, prefetch or release prompts it.
pub(super) const QUOTA_CHECK_EVERY: Duration = Duration::from_secs(30);

/// A view kept after its last lease (config `idle_view_secs`), and the generation it shows,
/// which stays live for gc while the view is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct IdleView {
    /// When its last lease went.
    pub(super) since: Instant,
    /// (owner, name, generation) of that lease.
    pub(super) generation: (String, String, u64),
}

/// Which raw copies a step may evict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawCopies {
    /// Only those of contents no stored path holds (left by paths gc removed): they serve
    /// nothing.
    Unused,
    /// Every one (the next open of a stored file writes its copy again).
    All,
}

/// What the steps of one run freed, summed.
#[derive(Debug, Default)]
struct Freed {
    paths: Vec<StorePath>,
    objects: u64,
    bytes: u64,
    derived: u64,
}

impl Freed {
    fn add(&mut self, report: GcReport, derived: u64) {
        self.paths.extend(report.paths_removed);
        self.objects += report.objects_removed + report.orphans_removed;
        self.bytes += report.bytes_freed;
        self.derived += derived;
    }
}

fn store_failure(what: &str, e: &(dyn std::error::Error + 'static)) -> Failure {
    fail(ErrorKind::Store, format!("{what}: {}", chain(e)))
}

impl Daemon {
    /// What the daemon keeps beyond the store's roots: leased generations (pinned roots
    /// already, named again so a lease is live whatever its root), idle views' generations,
    /// and the paths demand reads are waiting for.
    pub(super) fn live_set(&self) -> LiveSet {
        let mut generations: Vec<(String, String, u64)> = self
            .leases
            .lock()
            .values()
            .map(|r| (r.owner.clone(), r.name.clone(), r.generation))
            .collect();
        generations.extend(
            self.idle_views
                .lock()
                .values()
                .map(|i| i.generation.clone()),
        );
        let mut paths: Vec<StorePath> = self
            .reading
            .lock()
            .keys()
            .filter_map(|p| StorePath::from_base_name(p).ok())
            .collect();
        // Paths being fetched, with their references (their commit needs them stored).
        paths.extend(self.prep.lazy().fetching_with_references());
        LiveSet { generations, paths }
    }

    /// The bytes the store uses on disk as the quota counts them: objects, the metadata
    /// database (without its write-ahead log) and derived data.
    pub(super) fn store_bytes(&self) -> Result<u64, Failure> {
        let store = self.prep.store();
        let stats = store
            .stats()
            .map_err(|e| store_failure("store totals", &e))?;
        let derived =
            derived_usage(store.dir()).map_err(|e| store_failure("measuring derived data", &e))?;
        // The database file, not its write-ahead log (a few MiB that come and go with each
        // checkpoint: counting them would make the measure jitter around a limit).
        let db = std::fs::metadata(store.dir().join("db.sqlite")).map_or(0, |m| m.len());
        Ok(stats.stored_bytes + db + derived.bytes())
    }

    /// How many bytes must go for the store to be within `store_max_bytes` and leave
    /// `store_min_free` free (0: within both, or none is set), and the store's size.
    fn quota_need(&self) -> Result<(u64, u64), Failure> {
        let usage = self.store_bytes()?;
        let (max, min_free) = (self.config.store_max_bytes, self.config.store_min_free);
        if max.is_none() && min_free.is_none() {
            return Ok((0, usage));
        }
        let vfs = nix::sys::statvfs::statvfs(&self.config.store_dir).map_err(|e| {
            fail(
                ErrorKind::Store,
                format!(
                    "statvfs {}: {}",
                    self.config.store_dir.display(),
                    chain(&std::io::Error::from(e))
                ),
            )
        })?;
        let frsize = vfs.fragment_size() as u64;
        let fs_bytes = vfs.blocks() as u64 * frsize;
        let avail = vfs.blocks_available() as u64 * frsize;
        let over_max = max.map_or(0, |m| usage.saturating_sub(m.bytes(fs_bytes)));
        let short_free = min_free.map_or(0, |m| m.bytes(fs_bytes).saturating_sub(avail));
        Ok((over_max.max(short_free), usage))
    }

    /// One step: garbage, then derived data (up to `derived_want` bytes; raw copies of stored
    /// contents only with [`RawCopies::All`]).
    async fn collect_step(
        self: &Arc<Self>,
        derived_want: u64,
        raw: RawCopies,
    ) -> Result<(GcReport, u64), Failure> {
        let d = self.clone();
        blocking("gc", move || {
            let store = d.prep.store().clone();
            let lazy = d.prep.lazy().clone();
            let report = store
                .gc_live(&mut || Ok(d.live_set()), &mut |removed| {
                    lazy.forget_stored(removed)
                })
                .map_err(|e| store_failure("collecting garbage", &e))?;
            let derived = if derived_want > 0 {
                let mut keep = |name: &str| match raw {
                    RawCopies::All => false,
                    RawCopies::Unused => Digest::from_hex(name)
                        .is_none_or(|digest| store.holds_content(&digest).unwrap_or(true)),
                };
                let ev = evict_derived(store.dir(), derived_want, &mut keep)
                    .map_err(|e| store_failure("evicting derived data", &e))?;
                if ev.bytes() > 0 {
                    info!(
                        raw_copies = ev.raw_files,
                        partial_nars = ev.partial_files,
                        partial_nars_in_use = ev.partial_in_use,
                        bytes = ev.bytes(),
                        "derived data evicted"
                    );
                }
                ev.bytes()
            } else {
                0
            };
            Ok((report, derived))
        })
        .await
    }

    /// Records a run in the store and the metrics, and makes its answer.
    async fn finish_run(
        self: &Arc<Self>,
        trigger: GcTrigger,
        started_at: i64,
        started: Instant,
        freed: Freed,
        store_bytes_before: u64,
    ) -> Result<GcDone, Failure> {
        let d = self.clone();
        let mut paths = freed.paths;
        paths.sort();
        let report = GcReport {
            paths_removed: paths,
            objects_removed: freed.objects,
            orphans_removed: 0,
            bytes_freed: freed.bytes,
        };
        let run = GcRun::of(trigger, started_at, &report, freed.derived);
        let took = started.elapsed();
        let (run, after) = blocking("recording the gc run", move || {
            d.prep
                .store()
                .record_gc_run(&run)
                .map_err(|e| store_failure("recording the gc run", &e))?;
            let after = d.store_bytes()?;
            Ok((run, after))
        })
        .await?;
        self.metrics.gc.run(
            trigger.as_str(),
            run.bytes_freed + run.derived_bytes_freed,
            run.finished_at,
            took,
        );
        info!(
            trigger = %trigger,
            paths = run.paths_removed,
            objects = run.objects_removed,
            bytes = run.bytes_freed,
            derived_bytes = run.derived_bytes_freed,
            store_bytes_before,
            store_bytes_after = after,
            secs = took.as_secs_f64(),
            "gc run"
        );
        Ok(GcDone {
            trigger: trigger.as_str().to_string(),
            paths_removed: report
                .paths_removed
                .iter()
                .map(|p| p.to_absolute())
                .collect(),
            objects_removed: run.objects_removed,
            bytes_freed: run.bytes_freed,
            derived_bytes_freed: run.derived_bytes_freed,
            elapsed_secs: took.as_secs_f64(),
            store_bytes_before,
            store_bytes_after: after,
        })
    }

    /// One collection of `trigger`: derived data up to `derived_want` bytes, then garbage.
    async fn collect(
        self: &Arc<Self>,
        trigger: GcTrigger,
        derived_want: u64,
    ) -> Result<GcDone, Failure> {
        let _one = self.gc_lock.lock().await;
        let (started_at, started) = (now_secs(), Instant::now());
        let d = self.clone();
        let before = blocking("measuring the store", move || d.store_bytes()).await?;
        let mut freed = Freed::default();
        let (report, derived) = self.collect_step(derived_want, RawCopies::All).await?;
        freed.add(report, derived);
        self.finish_run(trigger, started_at, started, freed, before)
            .await
    }

    /// The `gc` op: garbage now (and every piece of derived data that may go, for `derived`).
    pub(super) async fn gc_op(self: &Arc<Self>, derived: bool) -> Result<GcDone, Failure> {
        let done = self
            .collect(GcTrigger::Manual, if derived { u64::MAX } else { 0 })
            .await?;
        self.quota_kick.notify_one();
        Ok(done)
    }

    /// For a write that failed for want of space (`StoreError::NoSpace`, `StorageFull`): one
    /// collection with trigger `no-space`, which frees every piece of derived data that may
    /// go (raw copies, partial NARs no engine has open) and then the garbage, recorded and
    /// counted like any run; the quota is checked after it. Waits for a collection under way.
    /// The caller may retry its write once it returns.
    pub async fn gc_no_space(self: &Arc<Self>) -> Result<GcDone, Failure> {
        let done = self.collect(GcTrigger::NoSpace, u64::MAX).await?;
        self.quota_kick.notify_one();
        Ok(done)
    }

    /// When `e` says the file system is full, starts one [`Daemon::gc_no_space`] in the
    /// background (one at a time: failures meanwhile start no other), so the next attempt of
    /// the failed write finds space.
    pub(super) fn after_failure(self: &Arc<Self>, e: &(dyn std::error::Error + 'static)) {
        if !kof_store::chain_is_no_space(e) || self.no_space_gc.swap(true, Ordering::AcqRel) {
            return;
        }
        warn!(error = %chain(e), "no space left: collecting");
        let d = self.clone();
        tokio::spawn(async move {
            if let Err(f) = d.gc_no_space().await {
                warn!("collecting after running out of space: {}", f.message);
            }
            d.no_space_gc.store(false, Ordering::Release);
        });
    }

    /// Collects while the store is over its quota: derived data first, then garbage, then
    /// least recently used idle views. `None` when within it (or no quota is set).
    pub(super) async fn enforce_quota(self: &Arc<Self>) -> Result<Option<GcDone>, Failure> {
        if self.config.store_max_bytes.is_none() && self.config.store_min_free.is_none() {
            return Ok(None);
        }
        let _one = self.gc_lock.lock().await;
        let d = self.clone();
        let (need, before) = blocking("checking the quota", move || d.quota_need()).await?;
        if need == 0 {
            return Ok(None);
        }
        info!(
            over_by = need,
            store_bytes = before,
            "store over its quota: collecting"
        );
        let (started_at, started) = (now_secs(), Instant::now());
        let mut freed = Freed::default();
        let (report, derived) = self.collect_step(need, RawCopies::Unused).await?;
        freed.add(report, derived);
        let mut last_resort = false;
        loop {
            let d = self.clone();
            let (need, _) = blocking("checking the quota", move || d.quota_need()).await?;
            if need == 0 {
                break;
            }
            let step = if self.evict_lru_idle_view().await {
                RawCopies::Unused
            } else if !last_resort {
                // Raw copies of stored files: the next open of each writes it again.
                last_resort = true;
                RawCopies::All
            } else {
                warn!(
                    could_not_free = need,
                    "store over its quota, and nothing more may go (leased and kept generations stay)"
                );
                break;
            };
            let (report, derived) = self.collect_step(need, step).await?;
            freed.add(report, derived);
        }
        self.finish_run(GcTrigger::Quota, started_at, started, freed, before)
            .await
            .map(Some)
    }

    /// Drops the least recently used idle view whose lock is free (its generation becomes
    /// garbage unless something else keeps it): `false` when there is none.
    async fn evict_lru_idle_view(self: &Arc<Self>) -> bool {
        let idle: Vec<(String, IdleView)> = self
            .idle_views
            .lock()
            .iter()
            .map(|(v, i)| (v.clone(), i.clone()))
            .collect();
        let d = self.clone();
        let mut ranked = blocking("ranking idle views", move || {
            let store = d.prep.store();
            Ok(idle
                .into_iter()
                .map(|(v, i)| {
                    let (o, n, g) = &i.generation;
                    let used = store.environment_last_used(o, n, *g).ok().flatten();
                    (used.unwrap_or(0), i.since, v)
                })
                .collect::<Vec<_>>())
        })
        .await
        .unwrap_or_default();
        ranked.sort();
        for (_, since, view) in ranked {
            let lock = self.view_lock(&view);
            // A view being taken by a lease (or removed) now is not a candidate.
            let Ok(_held) = lock.try_lock() else {
                continue;
            };
            if self.idle_views.lock().get(&view).map(|i| i.since) != Some(since) {
                continue;
            }
            match self.remove_idle_view(&view).await {
                Ok(()) => {
                    info!(view = %view, "idle view dropped for the quota");
                    return true;
                }
                Err(e) => {
                    warn!(view = %view, error = %chain(&e), "dropping an idle view for the quota")
                }
            }
        }
        false
    }

    /// Checks the quota every [`QUOTA_CHECK_EVERY`] and whenever a prepare, prefetch, release
    /// or gc prompts it.
    pub(super) async fn quota_task(self: Arc<Self>) {
        if self.config.store_max_bytes.is_none() && self.config.store_min_free.is_none() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(QUOTA_CHECK_EVERY) => {}
                _ = self.quota_kick.notified() => {}
            }
            if let Err(f) = self.enforce_quota().await {
                warn!("collecting for the quota: {}", f.message);
            }
        }
    }

    /// Records that the generation was used now (`last_used_at`), for eviction by age.
    pub(super) async fn touch(&self, owner: &str, name: &str, generation: u64) {
        let store = self.prep.store().clone();
        let (o, n) = (owner.to_string(), name.to_string());
        let r =
            tokio::task::spawn_blocking(move || store.touch_environment(&o, &n, generation)).await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(env = %format!("{owner}/{name}:{generation}"), error = %chain(&e), "recording the last use")
            }
            Err(e) => warn!(error = %chain(&e), "recording the last use"),
        }
    }
}
