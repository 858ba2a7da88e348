//! The node's deduplicating content-addressed store of Nix store paths.
//!
//! `kof-store` (this crate) owns the bytes and metadata of every store path a node has fetched,
//! shared by every environment and pod on the node. It never touches the network: the fetcher
//! (`kof-fetcherd`) hands it uncompressed NAR streams it has downloaded, and the FUSE view and the
//! command line read from it.
//!
//! - **Objects**: file contents addressed by BLAKE3, kept once however many store paths,
//!   environments and generations hold them. Large files are split by content-defined chunking
//!   (FastCDC over the uncompressed bytes) so successive versions of a package share chunks.
//!   Objects are zstd-compressed at rest only where that pays.
//! - **Metadata** in SQLite (WAL): store paths with their narinfo data and directory trees,
//!   resolved environments, and roots for garbage collection.
//! - **Atomic ingest, in closure order**: a store path becomes visible only after all its
//!   objects are durably written and its NarHash matched, and only with its References (Nix's
//!   closure rule): ingest is a prepare ([`Store::prepare_nar`], parallel) and a commit
//!   ([`Store::commit_prepared`]) that refuses a path whose references are not valid. A crash
//!   or a failed fetch at any moment leaves nothing half-visible and no valid path with a
//!   missing reference ([`Store::check_closure_rule`] checks).
//! - **Exact reproduction**: [`Store::dump_nar`] hashes to the narinfo's NarHash and
//!   [`Store::export`] writes the tree `nix-store --restore` makes.
//!
//! This crate never fetches, never resolves an environment and never mounts anything; it keeps
//! no state outside its directory.
//!
//! # Layout of a store directory
//!
//! `store_dir` (configuration key `store_dir`, default `/var/lib/kof`) is shared by several
//! crates. This crate owns the first four entries; the others are kept beside them by the
//! crate named, and this crate never reads or removes them (gc included).
//!
//! | entry | written by | holds |
//! |---|---|---|
//! | `db.sqlite`, `db.sqlite-wal`, `db.sqlite-shm` | this crate ([`db`]) | SQLite metadata in WAL mode: store paths, trees, objects, chunks, environments, gc roots, fetch states |
//! | `objects/<2 hex>/<64 hex>` | this crate ([`objects`]) | object files by BLAKE3 digest, raw or zstd; an object being written is a `.tmp-*` file in its fan-out directory until it is renamed into place (gc sweeps stale ones); a fan-out directory is made when its first object is written |
//! | `tmp/` | this crate | scratch space, emptied under the exclusive lock (at open when it can be had, and by gc) |
//! | `lock` | this crate ([`lock`]) | the store lock: a shared `flock` per open [`Store`], exclusive for the offline gc |
//! | `partial/<hash part>.nar`, `partial/<hash part>.json` | `kof-lazy` (the demand engine) | sparse partial NARs of store paths being fetched on demand, and the record of which chunks each holds (written at a clean exit, so the next engine resumes them); removed when the path is ingested; derived data |
//! | `raw/<2 hex>/<64 hex>` | `kof-lazy` | raw copies (mode 0444, BLAKE3-checked) of files of 16 KiB or more stored compressed or in chunks, by content digest, for FUSE passthrough; derived data, deletable at any time |
//! | `profiles/<owner>/<name>.json` | `kof-lazy` (`kof-store profile import` writes them too) | learned prefetch profiles: which files an environment reads first |
//! | `leases/<lease>.json` | `kof-fetcherd` | one record per lease, written atomically, so a restarted daemon serves its views again |
//! | `floxmeta/<owner>.git`, `floxmeta/<owner>.lock` | `kof-floxhub` | bare git mirrors of FloxHub's floxmeta repositories, one per owner, and the lock file around each mirror's fetches |
//! | `containers/<namespace>/<id>/` | `kof-shim` | each container's overlay (upper, work, root) and record; the default of `containers_dir`, used only when the configuration names `store_dir` and not `containers_dir` |
//!
//! `mnt/` also sits there by default without belonging to the store: it is the daemon's
//! `mount_dir` (`/var/lib/kof/mnt`), where the FUSE server mounts the views. The daemon's run
//! directory (the API socket, the FUSE server's `fuse.sock`, `fuse.lock` and
//! `fuse-server.log`) is the API socket's directory, `/run/kof` by default, not under
//! `store_dir`.
//!
//! Concurrency: a `Store` is `Send + Sync`; ingests of different paths run in parallel, a
//! second ingest of the same path waits for the first. Every open `Store` holds a shared lock
//! on `lock`. Offline, [`Store::gc`] needs it exclusively and fails with [`StoreError::Busy`]
//! while any other `Store` (in this or another process) is open (see [`lock`]); the store's
//! one writer (the daemon) collects while it serves with [`Store::gc_live`].

#![deny(missing_docs)]

pub mod db;
mod dump;
mod environments;
mod error;
mod fetches;
mod gc;
mod ingest;
pub mod lock;
pub mod objects;
mod tree;
mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kof_nar::{NixHash, StorePath};
use parking_lot::RwLock;
use rusqlite::{OptionalExtension, Row};

pub use environments::RootRecord;
pub use error::{chain_is_no_space, is_no_space_io, StoreError};
pub use fetches::{FetchState, FetchStateKind};
pub use gc::{GcHistory, GcReport, GcRun, GcTrigger, LiveSet, LIVE_SWEEP_MIN_AGE};
pub use ingest::{PreparedPath, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, SMALL_FILE_MAX};
pub use objects::{Codec, Digest, ObjectInfo};
pub use tree::{FileContent, FilePiece, FileReader, NodeKind, TreeNode};
pub use verify::{CorruptItem, Corruption, DanglingReference, VerifyReport};

/// The metadata of one stored path: the narinfo fields worth keeping, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The store path.
    pub store_path: StorePath,
    /// sha256 of its NAR (verified at ingest).
    pub nar_hash: kof_nar::NixHash,
    /// Size of its NAR.
    pub nar_size: u64,
    /// References (base names, as in the narinfo, may include itself).
    pub references: Vec<StorePath>,
    /// Deriver, if the narinfo named one.
    pub deriver: Option<String>,
    /// Signatures as given by the cache (`name:base64`).
    pub sigs: Vec<String>,
    /// CA field, if any.
    pub ca: Option<String>,
    /// URL of the cache it was fetched from.
    pub source_cache: String,
    /// Unix time it was registered.
    pub registered_at: i64,
}

/// What one ingest did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Uncompressed NAR bytes consumed.
    pub nar_bytes: u64,
    /// Bytes written to disk for objects that were new to the store.
    pub new_stored_bytes: u64,
    /// Number of objects new to the store.
    pub new_objects: u64,
    /// Number of objects the path references in all (chunks count one each).
    pub objects: u64,
}

/// A resolved environment generation, as the fetcher recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentRecord {
    /// FloxHub owner.
    pub owner: String,
    /// Environment name.
    pub name: String,
    /// Generation number.
    pub generation: u64,
    /// Nix system (`x86_64-linux`).
    pub system: String,
    /// The generation's `manifest.lock`, verbatim.
    pub lockfile: String,
    /// `[vars]`.
    pub vars: BTreeMap<String, String>,
    /// The `on-activate` hook, if any.
    pub hook: Option<String>,
    /// The history entries of `metadata.json` (JSON array), the audit trail.
    pub history: serde_json::Value,
    /// The roots of the closure: the outputs installed for this system.
    pub roots: Vec<StorePath>,
    /// The whole closure, sorted.
    pub closure: Vec<StorePath>,
    /// Unix time it was resolved.
    pub resolved_at: i64,
}

/// Totals for `kof-store stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Stored store paths.
    pub store_paths: u64,
    /// Sum of NarSize of stored paths.
    pub logical_bytes: u64,
    /// Bytes on disk for objects.
    pub stored_bytes: u64,
    /// Sum of uncompressed sizes of distinct objects.
    pub unique_bytes: u64,
    /// Distinct objects.
    pub objects: u64,
    /// Environments recorded.
    pub environments: u64,
    /// Fetches started and not finished (under way, or their process died).
    pub fetches_unfinished: u64,
    /// Fetches that ended in an error and have not succeeded since.
    pub fetches_failed: u64,
}

/// The store: one directory on the node, shared by every environment and pod.
pub struct Store {
    dir: PathBuf,
    db: db::Pool,
    objects: std::sync::Arc<objects::Objects>,
    lock: lock::StoreLock,
    /// Ingests hold it shared, gc exclusively, so gc in this process never races an ingest
    /// that found an object present and is about to reference it.
    gc_guard: RwLock<()>,
    inflight: ingest::InFlight,
}

const PATH_COLUMNS: &str = "id, store_path, nar_hash, nar_size, deriver, sigs, ca, source_cache, \
                            registered_at";

fn path_row(conn: &rusqlite::Connection, r: &Row<'_>) -> Result<PathInfo, StoreError> {
    let id: i64 = r.get(0)?;
    let base: String = r.get(1)?;
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::CorruptMetadata(format!("{what} of stored path {base:?}: {e}"))
    };
    let store_path = StorePath::from_base_name(&base).map_err(|e| bad("name", &e))?;
    let nar_hash = NixHash::parse(&r.get::<_, String>(2)?).map_err(|e| bad("NarHash", &e))?;
    let mut references = Vec::new();
    let mut stmt =
        conn.prepare_cached("SELECT reference FROM refs WHERE path_id = ? ORDER BY reference")?;
    for reference in stmt.query_map([id], |r| r.get::<_, String>(0))? {
        let reference = reference?;
        references.push(StorePath::from_base_name(&reference).map_err(|e| bad("reference", &e))?);
    }
    Ok(PathInfo {
        store_path,
        nar_hash,
        nar_size: r.get::<_, i64>(3)? as u64,
        references,
        deriver: r.get(4)?,
        sigs: serde_json::from_str(&r.get::<_, String>(5)?)?,
        ca: r.get(6)?,
        source_cache: r.get(7)?,
        registered_at: r.get(8)?,
    })
}

impl Store {
    /// Opens (creating if needed) the store at `dir`, migrating its database. Takes the
    /// shared lock for the life of the `Store`; if no one else has the store open, first
    /// removes what interrupted writers left in `tmp/`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io("creating", dir, e))?;
        let (lock, exclusive) = lock::StoreLock::open(dir)?;
        let objects = std::sync::Arc::new(objects::Objects::open(dir)?);
        let db = db::Pool::open(&dir.join("db.sqlite"))?;
        let store = Store {
            dir: dir.to_path_buf(),
            db,
            objects,
            lock,
            gc_guard: RwLock::new(()),
            inflight: ingest::InFlight::default(),
        };
        if exclusive {
            let cleaned = store.clean_tmp();
            store.lock.downgrade()?;
            cleaned?;
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `path` is stored (fully ingested and visible).
    pub fn has_path(&self, path: &StorePath) -> Result<bool, StoreError> {
        let conn = self.db.get()?;
        let found = conn
            .prepare_cached("SELECT 1 FROM paths WHERE store_path = ?")?
            .exists([path.base_name()])?;
        Ok(found)
    }

    /// The stored metadata of `path`.
    pub fn path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        let conn = self.db.get()?;
        let found = conn
            .prepare_cached(&format!(
                "SELECT {PATH_COLUMNS} FROM paths WHERE store_path = ?"
            ))?
            .query_row([path.base_name()], |r| Ok(path_row(&conn, r)))
            .optional()?;
        found.transpose()
    }

    /// All stored paths, sorted.
    pub fn list_paths(&self) -> Result<Vec<PathInfo>, StoreError> {
        let conn = self.db.get()?;
        let mut stmt = conn.prepare_cached(&format!("SELECT {PATH_COLUMNS} FROM paths"))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(path_row(&conn, r)?);
        }
        out.sort_by(|a, b| a.store_path.cmp(&b.store_path));
        Ok(out)
    }

    /// Totals.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let conn = self.db.get()?;
        let (store_paths, logical_bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(nar_size), 0) FROM paths",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let (objects, unique_bytes, stored_bytes): (i64, i64, i64) = conn.query_row(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(stored_size), 0) FROM objects",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let environments: i64 =
            conn.query_row("SELECT count(*) FROM environments", [], |r| r.get(0))?;
        let (fetches_unfinished, fetches_failed): (i64, i64) = conn.query_row(
            "SELECT coalesce(sum(state = 'fetching'), 0), coalesce(sum(state = 'failed'), 0)
             FROM fetches",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Stats {
            fetches_unfinished: fetches_unfinished as u64,
            fetches_failed: fetches_failed as u64,
            store_paths: store_paths as u64,
            logical_bytes: logical_bytes as u64,
            stored_bytes: stored_bytes as u64,
            unique_bytes: unique_bytes as u64,
            objects: objects as u64,
            environments: environments as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
        check::<StoreError>();
    }
}
