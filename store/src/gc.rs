//! Garbage collection: keep the closure of every rooted environment, drop everything else.
//!
//! gc needs the store to itself (see [`crate::lock`]): it fails with
//! [`StoreError::Busy`] while another `Store` has the directory open, and it excludes this
//! `Store`'s own ingests for its duration. Order of work, each step safe to interrupt:
//! 1. one transaction deletes dead paths (their refs and nodes cascade), chunk lists no file
//!    uses any more, and objects no remaining path uses;
//! 2. the object files of those objects are removed;
//! 3. a sweep removes object files that have no row at all (left by an interrupted ingest or
//!    an interrupted step 2), and stale files in `tmp/`.
//!
//! Only roots protect paths: a caller that fetches a generation and may run gc in the same
//! process should record and root (or pin) the generation before fetching it. Reads of
//! unrooted paths that run during gc may fail once their objects are gone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;

use kof_nar::StorePath;
use tracing::info;

use crate::error::StoreError;
use crate::objects::Digest;
use crate::Store;

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

impl Store {
    /// Deletes every stored path outside the closure (following stored References) of the
    /// rooted environments' roots and closures, then every object no remaining path uses.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _excl = self.gc_guard.write();
        if !self.lock.try_exclusive()? {
            return Err(StoreError::Busy {
                dir: self.dir.clone(),
            });
        }
        let result = self.gc_exclusive();
        let downgraded = self.lock.downgrade();
        let report = result?;
        downgraded?;
        Ok(report)
    }

    fn gc_exclusive(&self) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        // The live set.
        let mut wanted: VecDeque<String> = VecDeque::new();
        for root in self.roots()? {
            let env = self
                .get_environment(&root.owner, &root.name, root.generation)?
                .ok_or_else(|| StoreError::EnvironmentNotFound {
                    owner: root.owner.clone(),
                    name: root.name.clone(),
                    generation: root.generation,
                })?;
            wanted.extend(env.roots.iter().chain(&env.closure).map(|p| p.base_name()));
        }
        let mut conn = self.db.get()?;
        let mut refs: HashMap<String, Vec<String>> = HashMap::new();
        {
            let mut stmt = conn.prepare(
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

        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
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
            v
        };
        {
            let mut del = tx.prepare("DELETE FROM objects WHERE digest = ?")?;
            for d in &dead_objects {
                del.execute([&d.0[..]])?;
            }
        }
        tx.commit()?;

        for d in &dead_objects {
            report.bytes_freed += self.objects.remove(d)?;
        }
        report.objects_removed = dead_objects.len() as u64;
        let (orphans, orphan_bytes) = self.sweep_orphans(&conn)?;
        report.orphans_removed = orphans;
        report.bytes_freed += orphan_bytes;
        report.bytes_freed += self.clean_tmp()?;

        let mut removed = Vec::with_capacity(dead.len());
        for p in dead {
            removed.push(StorePath::from_base_name(&p).map_err(|source| {
                StoreError::CorruptStorePath {
                    what: "stored path",
                    value: p.clone(),
                    source,
                }
            })?);
        }
        removed.sort();
        report.paths_removed = removed;
        info!(
            paths = report.paths_removed.len(),
            objects = report.objects_removed,
            orphans = report.orphans_removed,
            bytes = report.bytes_freed,
            "gc done"
        );
        Ok(report)
    }

    /// Removes object files that have no row, one fan-out directory at a time.
    fn sweep_orphans(&self, conn: &rusqlite::Connection) -> Result<(u64, u64), StoreError> {
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
                    let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
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
        let tmp = self.objects.tmp_dir();
        let mut bytes = 0;
        let entries = fs::read_dir(tmp).map_err(|e| StoreError::io("listing", tmp, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("listing", tmp, e))?;
            let p = entry.path();
            let meta = fs::symlink_metadata(&p).map_err(|e| StoreError::io("inspecting", &p, e))?;
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
