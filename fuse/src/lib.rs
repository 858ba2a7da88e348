//! The read-only lazy FUSE view of kof environments.
//!
//! One FUSE mount per node. Its root holds one directory per prepared *view* (a lease of an
//! environment for a container); each view is a complete root file system described by an
//! in-memory [`Entry`] tree built from metadata only (narinfos, listings, stored trees). File
//! contents are never held here: a read asks the [`ContentSource`], which serves the bytes from
//! the node store, or fetches them on demand.
//!
//! It never fetches, never writes a file, and knows nothing of leases, FloxHub or binary
//! caches: which views exist is the caller's decision (the FUSE server of `kof-fetcherd`), and
//! where bytes come from is the [`ContentSource`]'s.
//!
//! The tree model ([`Entry`], [`Content`], [`FileRef`]) is what the fetcher daemon builds; the
//! file system ([`mount`], [`Mounted`]) is what the kernel talks to.
//!
//! Inodes: directories, symlinks and inline files get one per view and path (the kernel refuses
//! aliased directories); a store file (same [`FileRef`], same executable bit) has one inode
//! across all views, so pods of one environment share its page cache. Inside views, entries,
//! attributes and absent names are cached by the kernel for a day and open files keep their page
//! cache; the mount root, whose views come and go, is not cached for long and `remove_view`
//! invalidates the view's entry. Files the [`ContentSource`] has locally are served by FUSE
//! passthrough when the kernel has it.
//!
//! Modules: `tree` (the inode table and its inode scheme), `filesystem` (the FUSE operations,
//! caching and passthrough), `mount` (mounting, views, unmounting), `handover` (passing a live
//! mount to a successor process and taking one over), `stats` (operation latency), `error`.

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::sync::Arc;

mod error;
mod filesystem;
mod handover;
mod mount;
mod stats;
mod tree;

pub use error::FuseError;
pub use handover::{resume, HandOver, MountState};
pub use mount::{mount, MountOptions, Mounted};
pub use stats::{OpStat, OpStats};
pub use tree::RestoreError;

/// A regular file inside a Nix store path: enough to find its bytes, locally or in the path's NAR.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileRef {
    /// The store path's base name (`<hash>-<name>`).
    pub store_path: Arc<str>,
    /// The file's path inside the store path (`bin/python3`; empty when the store path is a file).
    pub path: Arc<str>,
    /// Where the file's contents start in the store path's uncompressed NAR.
    pub nar_offset: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// Where a regular file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A file of a store path, read through the [`ContentSource`].
    Store(FileRef),
    /// A small generated file (`etc/passwd`, ...), held in memory.
    Inline(Arc<[u8]>),
}

/// One node of a view's tree. Subtrees are shared (`Arc`) between views holding the same store
/// path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory and its entries by name.
    Directory(BTreeMap<OsString, Arc<Entry>>),
    /// A regular file.
    Regular {
        /// Mode 0555 when set, else 0444.
        executable: bool,
        /// Its bytes.
        content: Content,
    },
    /// A symlink and its target, verbatim.
    Symlink(OsString),
}

/// Serves the bytes of store files. Implemented by the fetcher (in process) and by the daemon
/// client (in the FUSE server process). Called from FUSE worker threads: it may block.
pub trait ContentSource: Send + Sync + 'static {
    /// Reads up to `size` bytes of `file` at `offset`, waiting until they are available. Short
    /// only at end of file. An error becomes `EIO` for the reader.
    fn read(&self, file: &FileRef, offset: u64, size: u32) -> std::io::Result<Vec<u8>>;

    /// A local file holding exactly `file`'s bytes, when there is one, for FUSE passthrough.
    fn backing_file(&self, _file: &FileRef) -> Option<std::fs::File> {
        None
    }

    /// Returns once what the view shows inside store path `store_path` (a base name) may be
    /// shown: asked before every lookup, directory read and symlink read inside a view's
    /// `nix/store/<base>` (answers are then cached by the kernel). A source whose tree of the
    /// path came from unverified metadata verifies the path first; an error becomes `EIO`.
    fn gate(&self, _store_path: &str) -> std::io::Result<()> {
        Ok(())
    }
}
