//! Garbage collection: keep the closure of every rooted environment (and whatever a live
//! caller names), drop everything else; and the record of each collection (`gc_runs`).
//!
//! Two ways to run it:
//! - **offline**, [`Store::gc`]: needs the store to itself (see [`crate::lock`]); it fails
//!   with [`StoreError::Busy`] while another `Store` has the directory open (`kof-store gc`
//!   when no daemon answers);
//! - **live**, [`Store::gc_live`]: for the store's one writer (`kof-fetcherd`) while it
//!   serves. Other processes may read (the FUSE server reads object files and the database
//!   directly); none may write. The caller names what it keeps beyond the roots
//!   ([`LiveSet`]: leased and idle views' generations, paths being read), asked for inside
//!   the transaction that deletes, so a root or lease set after the live set was read cannot
//!   lose a path: it is either seen, or finds the path already gone (and fetches it again).
//!
//! Both exclude this `Store`'s own ingests for their duration (`gc_guard`), so no ingest
//! finds an object present and references it while gc removes it. Order of work, each step
//! safe to interrupt:
//! 1. one transaction reads the live set and deletes dead paths (their refs and nodes
//!    cascade), chunk lists no file uses any more, and objects no remaining path uses;
//! 2. the object files of those objects are removed;
//! 3. a sweep removes object files that have no row at all (left by an interrupted ingest or
//!    an interrupted step 2), and stale files in `tmp/`. A live gc leaves files younger than
//!    [`LIVE_SWEEP_MIN_AGE`] alone: they may belong to an ingest of another kind of writer
//!    under way.
//!
//! The live set is the closure (following stored References) of: every rooted environment's
//! roots and closure; every path with a fetch under way (`fetches` rows in state
//! `fetching`); and, for a live gc, the caller's [`LiveSet`]. Objects are shared across paths:
//! only objects no remaining path uses are deleted.
//!
//! A caller that fetches a generation and may run gc in the same process should record and
//! root (or pin) the generation, or name it in its [`LiveSet`], before fetching it. Reads of
//! paths outside the live set that run during gc may fail once their objects are gone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::time::{Duration, SystemTime};

use kof_nar::StorePath;
use rusqlite::{params, OptionalExtension};
use tracing::info;

use crate::error::StoreError;
use crate::ingest::now;
use crate::objects::Digest;
use crate::Store;

/// A live gc removes orphan object files and `tmp/` entries only once they are this old.
pub const LIVE_SWEEP_MIN_AGE: Duration = Duration::from_secs(3600);

/// What a gc run removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Store paths deleted, sorted.
    pub paths_removed: Vec<StorePath>,
    /// Objects deleted (rows and files).
    pub objects_removed: u64,
    /// Object files without a row (from interrupted ingests) deleted.
    pub orphans_removed: u64,
    /// Bytes of object and temporary files deleted.
    pub bytes_freed: u64,
}

/// What a live gc keeps beyond the rooted environments: the caller's in-memory state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveSet {
    /// Recorded generations (owner, name, generation) whose roots and closures are kept
    /// (leased, or shown by a view the caller keeps). One not recorded is skipped.
    pub generations: Vec<(String, String, u64)>,
    /// Store paths kept with their closures (reads or ingests in flight).
    pub paths: Vec<StorePath>,
}

/// Why a gc ran (`gc_runs.trigger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GcTrigger {
    /// Asked for (`kof-store gc`).
    Manual,
    /// The store was over its quota (`store_max_bytes`, `store_min_free`).
    Quota,
    /// A write failed for want of space.
    NoSpace,
}

impl GcTrigger {
    /// The name stored in `gc_runs.trigger` and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            GcTrigger::Manual => "manual",
            GcTrigger::Quota => "quota",
            GcTrigger::NoSpace => "no-space",
        }
    }

    /// The trigger of a stored name.
    pub fn parse(s: &str) -> Option<GcTrigger> {
        GcTrigger::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Every trigger, in a fixed order.
    pub const ALL: [GcTrigger; 3] = [GcTrigger::Manual, GcTrigger::Quota, GcTrigger::NoSpace];
}

impl std::fmt::Display for GcTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One collection as recorded in `gc_runs`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GcRun {
    /// Unix time it started.
    pub started_at: i64,
    /// Unix time it ended.
    pub finished_at: i64,
    /// Why it ran (`manual`, `quota`, `no-space`).
    pub trigger: String,
    /// Store paths removed.
    pub paths_removed: u64,
    /// Objects removed (rows and files; orphan files included).
    pub objects_removed: u64,
    /// Bytes of the store's own files freed (objects, orphans, `tmp/`).
    pub bytes_freed: u64,
    /// Bytes of derived data (raw copies, partial NARs) freed.
    pub derived_bytes_freed: u64,
}

impl GcRun {
    /// The run of `report`, started at `started_at` (unix time) and ending now.
    pub fn of(
        trigger: GcTrigger,
        started_at: i64,
        report: &GcReport,
        derived_bytes_freed: u64,
    ) -> GcRun {
        GcRun {
            started_at,
            finished_at: now(),
            trigger: trigger.as_str().to_string(),
            paths_removed: report.paths_removed.len() as u64,
            objects_removed: report.objects_removed + report.orphans_removed,
            bytes_freed: report.bytes_freed,
            derived_bytes_freed,
        }
    }
}

/// Every recorded collection, summed, and the last one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcHistory {
    /// The last run, if any.
    pub last: Option<GcRun>,
    /// Runs recorded.
    pub runs: u64,
    /// Runs by trigger (`manual`, `quota`, `no-space`), only those that ran.
    pub runs_by_trigger: Vec<(String, u64)>,
    /// Store paths removed in all.
    pub paths_removed: u64,
    /// Bytes of the store's own files freed in all.
    pub bytes_freed: u64,
    /// Bytes of derived data freed in all.
    pub derived_bytes_freed: u64,
}

impl Store {
    /// Offline gc: deletes every stored path outside the closure (following stored
    /// References) of the rooted environments' roots and closures, then every object no
    /// remaining path uses. Fails with [`StoreError::Busy`] while another `Store` has the
    /// directory open (a running daemon collects with [`Store::gc_live`] instead). The run is
    /// not recorded: see [`Store::record_gc_run`].
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _excl = self.gc_guard.write();
        if !self.lock.try_exclusive()? {
            return Err(StoreError::Busy {
                dir: self.dir.clone(),
            });
        }
        let result = self.collect(&mut || Ok(LiveSet::default()), &mut |_| {}, None);
        let downgraded = self.lock.downgrade();
        let report = result?;
        downgraded?;
        Ok(report)
    }

    /// Live gc, for the store's one writer while readers (other processes included) and its
    /// own ingests go on: [`Store::gc`]'s collection with `keep`'s [`LiveSet`] added to the
    /// live set. `keep` is called inside the deleting transaction (the database's write lock
    /// is held: it must not write to this store), so what it names is what is live at the
    /// moment of deletion. `removed` is called with the paths removed as soon as their
    /// removal is committed, before their object files go: a caller that remembers which
    /// paths are stored forgets them there. Ingests of this `Store` wait for the collection to
    /// end. Orphan object files and `tmp/` entries younger than [`LIVE_SWEEP_MIN_AGE`] are
    /// left. The run is not recorded: see [`Store::record_gc_run`].
    pub fn gc_live(
        &self,
        keep: &mut dyn FnMut() -> Result<LiveSet, StoreError>,
        removed: &mut dyn FnMut(&[StorePath]),
    ) -> Result<GcReport, StoreError> {
        let _excl = self.gc_guard.write();
        self.collect(keep, removed, Some(LIVE_SWEEP_MIN_AGE))
    }

    /// Whether some stored path has a regular file of content `digest` (what a raw copy of
    /// that content serves).
    pub fn holds_content(&self, digest: &Digest) -> Result<bool, StoreError> {
        let conn = self.db.get()?;
        let found = conn
            .prepare_cached("SELECT 1 FROM nodes WHERE digest = ? LIMIT 1")?
            .exists([&digest.0[..]])?;
        Ok(found)
    }

    /// Records a collection in `gc_runs`.
    pub fn record_gc_run(&self, run: &GcRun) -> Result<(), StoreError> {
        let _writer = self.db.write_guard();
        let conn = self.db.get()?;
        conn.execute(
            "INSERT INTO gc_runs (started_at, finished_at, trigger, paths_removed,
                objects_removed, bytes_freed, derived_bytes_freed)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
            params![
                run.started_at,
                run.finished_at,
                run.trigger,
                run.paths_removed as i64,
                run.objects_removed as i64,
                run.bytes_freed as i64,
                run.derived_bytes_freed as i64
            ],
        )?;
        Ok(())
    }

    /// The recorded collections: the last one and the totals.
    pub fn gc_history(&self) -> Result<GcHistory, StoreError> {
        let conn = self.db.get()?;
        let mut h = GcHistory::default();
        let (runs, paths, bytes, derived): (i64, i64, i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(paths_removed), 0), coalesce(sum(bytes_freed), 0),
                    coalesce(sum(derived_bytes_freed), 0) FROM gc_runs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        h.runs = runs as u64;
        h.paths_removed = paths as u64;
        h.bytes_freed = bytes as u64;
        h.derived_bytes_freed = derived as u64;
        let mut stmt = conn
            .prepare("SELECT trigger, count(*) FROM gc_runs GROUP BY trigger ORDER BY trigger")?;
        for r in stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })? {
            h.runs_by_trigger.push(r?);
        }
        h.last = conn
            .query_row(
                "SELECT started_at, finished_at, trigger, paths_removed, objects_removed,
                        bytes_freed, derived_bytes_freed
                 FROM gc_runs ORDER BY id DESC LIMIT 1",
                [],
                |r| {
                    Ok(GcRun {
                        started_at: r.get(0)?,
                        finished_at: r.get(1)?,
                        trigger: r.get(2)?,
                        paths_removed: r.get::<_, i64>(3)? as u64,
                        objects_removed: r.get::<_, i64>(4)? as u64,
                        bytes_freed: r.get::<_, i64>(5)? as u64,
                        derived_bytes_freed: r.get::<_, i64>(6)? as u64,
                    })
                },
            )
            .optional()?;
        Ok(h)
    }

    /// The collection, under `gc_guard` held exclusively by the caller. `min_age`: sweep only
    /// orphans and `tmp/` entries at least this old (a live gc), else all (offline).
    fn collect(
        &self,
        keep: &mut dyn FnMut() -> Result<LiveSet, StoreError>,
        removed: &mut dyn FnMut(&[StorePath]),
        min_age: Option<Duration>,
    ) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        let mut conn = self.db.get()?;
        let writer = self.db.write_guard();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // The live set, read under the database's write lock: no root, environment or
        // fetch row changes until the deletions commit.
        let mut wanted: VecDeque<String> = VecDeque::new();
        let mut generations: Vec<(String, String, u64)> = {
            let mut stmt = tx.prepare("SELECT owner, name, generation FROM roots")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)? as u64,
                ))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let root_count = generations.len();
        let extra = keep()?;
        generations.extend(extra.generations);
        {
            let mut stmt = tx.prepare_cached(
                "SELECT roots, closure FROM environments
                 WHERE owner = ? AND name = ? AND generation = ?",
            )?;
            for (i, (owner, name, generation)) in generations.iter().enumerate() {
                let found = stmt
                    .query_row(params![owner, name, *generation as i64], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                    })
                    .optional()?;
                match found {
                    Some((roots, closure)) => {
                        wanted.extend(serde_json::from_str::<Vec<String>>(&roots)?);
                        wanted.extend(serde_json::from_str::<Vec<String>>(&closure)?);
                    }
                    // A root names a recorded generation (set_root checks); the caller's
                    // generations may not be recorded (yet).
                    None if i < root_count => {
                        return Err(StoreError::EnvironmentNotFound {
                            owner: owner.clone(),
                            name: name.clone(),
                            generation: *generation,
                        })
                    }
                    None => {}
                }
            }
        }
        wanted.extend(extra.paths.iter().map(|p| p.base_name()));
        {
            let mut stmt = tx.prepare("SELECT store_path FROM fetches WHERE state = 'fetching'")?;
            for p in stmt.query_map([], |r| r.get::<_, String>(0))? {
                wanted.push_back(p?);
            }
        }
        let mut refs: HashMap<String, Vec<String>> = HashMap::new();
        {
            let mut stmt = tx.prepare(
                "SELECT p.store_path, r.reference FROM paths p LEFT JOIN refs r ON r.path_id = p.id",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let e = refs.entry(r.get(0)?).or_default();
                if let Some(reference) = r.get::<_, Option<String>>(1)? {
                    e.push(reference);
                }
            }
        }
        let mut live: HashSet<String> = HashSet::new();
        while let Some(p) = wanted.pop_front() {
            if let Some(rs) = refs.get(&p) {
                if live.insert(p) {
                    wanted.extend(rs.iter().cloned());
                }
            }
        }
        let dead: Vec<String> = refs
            .keys()
            .filter(|p| !live.contains(*p))
            .cloned()
            .collect();

        {
            let mut del = tx.prepare("DELETE FROM paths WHERE store_path = ?")?;
            for p in &dead {
                del.execute([p])?;
            }
        }
        tx.execute(
            "DELETE FROM chunks WHERE file_digest NOT IN
               (SELECT digest FROM nodes WHERE kind = 1 AND chunked = 1)",
            [],
        )?;
        let dead_objects: Vec<Digest> = {
            let mut stmt = tx.prepare(
                "SELECT digest FROM objects o WHERE
                   NOT EXISTS (SELECT 1 FROM nodes n WHERE n.digest = o.digest AND n.chunked = 0)
                   AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.object = o.digest)",
            )?;
            let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
            let mut v = Vec::new();
            for r in rows {
                v.push(Digest::from_sql(r?)?);
            }
            // Objects of prepared paths not yet committed (see `PreparedPath`) stay.
            v.retain(|d| !self.inflight.is_pinned(d));
            v
        };
        {
            let mut del = tx.prepare("DELETE FROM objects WHERE digest = ?")?;
            for d in &dead_objects {
                del.execute([&d.0[..]])?;
            }
        }
        tx.commit()?;
        drop(writer);
        let mut gone = Vec::with_capacity(dead.len());
        for p in dead {
            gone.push(StorePath::from_base_name(&p).map_err(|source| {
                StoreError::CorruptStorePath {
                    what: "stored path",
                    value: p.clone(),
                    source,
                }
            })?);
        }
        gone.sort();
        report.paths_removed = gone;
        removed(&report.paths_removed);

        for d in &dead_objects {
            report.bytes_freed += self.objects.remove(d)?;
        }
        report.objects_removed = dead_objects.len() as u64;
        let (orphans, orphan_bytes) = self.sweep_orphans(&conn, min_age)?;
        report.orphans_removed = orphans;
        report.bytes_freed += orphan_bytes;
        report.bytes_freed += self.clean_tmp_older(min_age)?;

        info!(
            live = min_age.is_some(),
            paths = report.paths_removed.len(),
            objects = report.objects_removed,
            orphans = report.orphans_removed,
            bytes = report.bytes_freed,
            "gc done"
        );
        Ok(report)
    }

    /// Removes object files that have no row, one fan-out directory at a time.
    fn sweep_orphans(
        &self,
        conn: &rusqlite::Connection,
        min_age: Option<Duration>,
    ) -> Result<(u64, u64), StoreError> {
        let (mut count, mut bytes) = (0, 0);
        let mut stmt = conn.prepare("SELECT 1 FROM objects WHERE digest = ?")?;
        for i in 0..=255u8 {
            let sub = self.objects.objects_dir().join(hex::encode([i]));
            let entries = match fs::read_dir(&sub) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("listing", &sub, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io("listing", &sub, e))?;
                let name = entry.file_name();
                let known = match name.to_str().and_then(Digest::from_hex) {
                    Some(d) => stmt.exists([&d.0[..]])?,
                    None => false,
                };
                if !known {
                    let p = entry.path();
                    let meta = entry.metadata().ok();
                    if !old_enough(meta.as_ref(), min_age) {
                        continue;
                    }
                    let len = meta.map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(&p).map_err(|e| StoreError::io("removing", &p, e))?;
                    count += 1;
                    bytes += len;
                }
            }
        }
        Ok((count, bytes))
    }

    /// Removes everything in `tmp/` (only ever called under the exclusive lock, when no
    /// ingest can be writing there); returns the bytes freed.
    pub(crate) fn clean_tmp(&self) -> Result<u64, StoreError> {
        self.clean_tmp_older(None)
    }

    /// Removes the entries of `tmp/` at least `min_age` old (all of them for `None`); returns
    /// the bytes freed.
    fn clean_tmp_older(&self, min_age: Option<Duration>) -> Result<u64, StoreError> {
        let tmp = self.objects.tmp_dir();
        let mut bytes = 0;
        let entries = fs::read_dir(tmp).map_err(|e| StoreError::io("listing", tmp, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("listing", tmp, e))?;
            let p = entry.path();
            let meta = fs::symlink_metadata(&p).map_err(|e| StoreError::io("inspecting", &p, e))?;
            if !old_enough(Some(&meta), min_age) {
                continue;
            }
            let res = if meta.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            res.map_err(|e| StoreError::io("removing", &p, e))?;
            bytes += meta.len();
        }
        Ok(bytes)
    }
}

/// Whether a file with metadata `meta` was last modified at least `min_age` ago (always, for
/// `None`; never when its age cannot be told).
fn old_enough(meta: Option<&fs::Metadata>, min_age: Option<Duration>) -> bool {
    let Some(min_age) = min_age else {
        return true;
    };
    meta.and_then(|m| m.modified().ok())
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age >= min_age)
}
