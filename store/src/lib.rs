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
//! - **Atomic ingest**: a store path becomes visible only after all its objects are durably
//!   written and its NarHash matched; a crash at any moment leaves nothing half-visible.
//! - **Exact reproduction**: [`Store::dump_nar`] hashes to the narinfo's NarHash and
//!   [`Store::export`] writes the tree `nix-store --restore` makes.

// PLACEHOLDER: the store helper replaces this file; the public API below is the contract the
// fetcher and the command line are written against.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kof_nar::{NarInfo, StorePath};

/// Errors from the store. (The real type has one variant per cause, each keeping its source.)
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// placeholder
    #[error("placeholder")]
    Placeholder,
}

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
}

/// The store.
pub struct Store {
    _root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store at `dir`.
    pub fn open(_dir: &Path) -> Result<Store, StoreError> {
        unimplemented!()
    }
    /// Whether `path` is stored (fully ingested and visible).
    pub fn has_path(&self, _path: &StorePath) -> Result<bool, StoreError> {
        unimplemented!()
    }
    /// The stored metadata of `path`.
    pub fn path_info(&self, _path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        unimplemented!()
    }
    /// All stored paths, sorted.
    pub fn list_paths(&self) -> Result<Vec<PathInfo>, StoreError> {
        unimplemented!()
    }
    /// Ingests the uncompressed NAR of `info.store_path` read from `nar`. Verifies the NAR's
    /// sha256 and size against `info.nar_hash` / `info.nar_size`; on any error nothing becomes
    /// visible. Safe to call from several threads at once for different paths. Ingesting a
    /// path already stored is a no-op that still consumes and verifies the stream.
    pub fn ingest_nar(
        &self,
        _info: &NarInfo,
        _source_cache: &str,
        _nar: &mut dyn Read,
    ) -> Result<IngestStats, StoreError> {
        unimplemented!()
    }
    /// Writes the NAR of a stored path.
    pub fn dump_nar(&self, _path: &StorePath, _out: &mut dyn Write) -> Result<(), StoreError> {
        unimplemented!()
    }
    /// Writes a stored path's tree to `dir` (which must not exist), as `nix-store --restore`.
    pub fn export(&self, _path: &StorePath, _dir: &Path) -> Result<(), StoreError> {
        unimplemented!()
    }
    /// Records a resolved environment generation.
    pub fn put_environment(&self, _env: &EnvironmentRecord) -> Result<(), StoreError> {
        unimplemented!()
    }
    /// Marks an environment generation as kept by gc. A live (unpinned) root replaces the
    /// environment's previous unpinned root; pinned roots stay until removed.
    pub fn set_root(
        &self,
        _owner: &str,
        _name: &str,
        _generation: u64,
        _pinned: bool,
    ) -> Result<(), StoreError> {
        unimplemented!()
    }
    /// Totals.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        unimplemented!()
    }
}
