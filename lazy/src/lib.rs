//! Lazy environments: a Flox environment's root file system appears from metadata alone, and
//! the NAR bytes of its store paths are fetched as readers need them, ahead of a background
//! prefetch.
//!
//! What this crate owns:
//! - the demand engine ([`LazyStore`]): partial NARs, range and stream fetches, readahead,
//!   prefetch below demand, learned profiles ([`Profile`]), and the FUSE content source that
//!   reads stored and partial bytes ([`LazyContent`], [`LocalReader`]);
//! - views ([`view`]): an environment generation's root file system as a `kof-fuse` tree;
//!
//! What it never does: resolve an environment on FloxHub (`kof-floxhub`), speak to a binary
//! cache other than through `kof-substituter`'s fetcher and cache client, mount a file system
//! or keep leases (the daemon, `kof-fetcherd`, and `kof-store run` do), or let an unverified
//! byte into the store.
//!
//! # The invariant
//!
//! **No byte reaches a reader before it was checked against a digest whose chain of trust ends
//! in a trusted signature.** Readers are FUSE reads, passthrough raw copies, store ingest,
//! `dump-nar` and `export`; the names, sizes, modes, symlink targets and NAR offsets a view shows
//! are held to the same rule. No option turns it off.
//!
//! # The engine
//!
//! - [`LazyStore::entry`] gives a path's view tree from metadata only: its stored tree; else
//!   the tree of the path's **signed index** (`kof-index`, published beside the narinfo by
//!   `kof-cache publish`; its signature by a `trusted_public_keys` key binds store path,
//!   NarHash, NarSize and the index's digest); else the cache's unsigned `.ls` listing, kept as
//!   a *hint*; else (no listing) the whole path is fetched and verified now.
//! - [`LazyStore::ensure`] makes NAR bytes `start..end` of a path readable. Bytes not stored go
//!   to a sparse *partial file* `<store_dir>/partial/<hashpart>.nar`, at their NAR offsets:
//!   - **indexed path** (a valid index, a cache that honours `Range`): the index's chunks
//!     covering the range are fetched as their bytes of the NAR file (a seekable zstd NAR: one
//!     frame per chunk), adjacent missing chunks coalesced into one GET of compressed bytes,
//!     each chunk single-flight, GETs in parallel. Each chunk is decoded and its length and
//!     BLAKE3 checked against the index **before** it is written to the partial file and marked
//!     filled; a chunk that fails is refused (EIO for the read, the log names path, cache and
//!     chunk, nothing written) and the next substituter with the path is tried. When every
//!     chunk is present, the partial file is ingested into the store, which checks NarHash and
//!     NarSize once more. A `200` to a range request marks the cache as not range-capable and
//!     switches to the stream path.
//!   - **stream path** (path-level laziness: no index, an invalid one, or no `Range`): one
//!     streamed fetch per path, in whatever compression the cache serves, through the
//!     fetcher's verifying pipeline ([`kof_substituter::fetcher::Fetcher::fetch_teed`]) into
//!     the store; readers wait for the commit, so nothing of the path is served before its
//!     NarHash matched. Paths no reader touches are never fetched.
//!
//!   When the path is committed the partial file is removed (unless another engine on the
//!   same store still has it open).
//! - **Listings are hints.** A view built from a `.ls` listing shows the path's names before
//!   they are verified, so [`LazyStore::gate`] holds every lookup and directory read inside
//!   the path (the FUSE view asks it) until the whole NAR is verified and stored and its tree
//!   compared with the listing's; a listing that lied refuses the path (every read fails, the
//!   log names the cache). Content reads of such a path wait for the same.
//! - Demand has priority: demand fetches take slots of their own; prefetch
//!   ([`LazyStore::prefetch`]) takes prefetch slots, and a prefetch stream still queued for a
//!   slot switches to a demand slot as soon as a reader waits for it. Prefetch uses the same
//!   single-flight machinery (compressed chunks for indexed paths), so a path being
//!   prefetched serves demand readers too.
//! - Learned profiles ([`Profile`]): the ranges demand reads asked for while a recording is on,
//!   saved per environment and fetched first, in parallel, on the next cold start.
//!
//! Partial files outlive their process when they can be trusted: at a clean exit,
//! [`LazyStore::save_partials`] syncs each indexed partial file and records beside it
//! (`<hashpart>.json`) which chunks it holds, for which NarHash, NarSize and index digest. A
//! new engine resumes a partial file whose record matches the narinfo and index it resolves
//! now, checking each recorded chunk against the index again, and removes the others: those
//! without a record (a killed process; which of their bytes were fetched is not known) and
//! those whose record does not match. Several engines may share one store (two `kof-store
//! run` at once): an engine holds a shared lock on each partial file it has open and removes
//! one only under an exclusive lock, so never while another engine uses it (the rule is in
//! `engine/partial.rs`). A [`LocalReader`] in another process opens the partial file afresh
//! for each read after its `ensure`, so it never keeps a removed file's stale descriptor.
//!
//! A demand read of bytes a prefetch GET is already fetching waits for that GET (at most
//! [`LazyOptions::max_prefetch_request`] bytes) rather than fetching them twice.

#![deny(missing_docs)]
mod counters;
pub mod derived;
mod engine;
mod local;
pub mod prepare;
mod profile;
mod tree;
pub mod view;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kof_nar::StorePath;
use kof_store::StoreError;
use thiserror::Error;

use kof_substituter::cache::CacheError;
use kof_substituter::fetcher::PathError;
use kof_substituter::substituters::SubstituteError;

pub use counters::{ByCause, LazyCounters};
pub use engine::{LazyStore, PrefetchReport, StartedEntries};
pub use local::{partial_file, LazyContent, LocalReader};
pub use profile::{
    export_profile, import_profile, Profile, ProfileError, ProfileRange, MAX_PROFILE_BYTES,
    PROFILE_VERSION,
};
pub use tree::{entry_of_listing, entry_of_tree};

/// Why bytes are fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// A reader waits for them.
    Demand,
    /// Background fetch of a closure.
    Prefetch,
    /// A learned profile's ranges.
    Profile,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cause::Demand => "demand",
            Cause::Prefetch => "prefetch",
            Cause::Profile => "profile",
        })
    }
}

/// Makes NAR bytes of a store path readable locally (in the store, or in its partial file).
/// Implemented by the engine ([`LazyStore`], in process) and by the daemon API client.
pub trait Ensure: Send + Sync {
    /// Returns once NAR bytes `start..end` of `store_path` (a base name) are readable, or fails
    /// (within the engine's read bound).
    fn ensure(&self, store_path: &str, start: u64, end: u64) -> std::io::Result<()>;

    /// Returns once what a view shows inside `store_path` (a base name) is verified (see
    /// [`LazyStore::gate`]), or fails (within the engine's read bound).
    fn gate(&self, store_path: &str) -> std::io::Result<()>;
}

/// Tuning of the engine.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    /// An ensure that cannot complete within this fails.
    pub read_timeout: Duration,
    /// Demand fetches (range GETs or streams) at once.
    pub demand_concurrency: usize,
    /// Prefetch fetches at once.
    pub prefetch_concurrency: usize,
    /// Whether signed indexes are used for chunk reads at all; `false` reads every path whole
    /// (path-level laziness). Either way every byte is verified before it is served.
    pub range_reads: bool,
    /// Largest demand GET when coalescing chunks.
    pub max_demand_request: u64,
    /// Largest prefetch GET.
    pub max_prefetch_request: u64,
    /// Attempts of a range fetch that fails transiently.
    pub range_attempts: u32,
    /// Whole-file readahead: the first demand read of a file of at most this many bytes (its
    /// size from the listing) also fetches the rest of the file, in parallel GETs of at most
    /// [`LazyOptions::readahead_request`] bytes, without making the read wait for them. A
    /// program that maps an executable or a library faults its pages in one after another, in
    /// no order: one round trip per chunk otherwise. `0` turns it off.
    pub readahead_file_max: u64,
    /// Largest GET of a whole-file readahead.
    pub readahead_request: u64,
    /// Readahead GETs in flight at once, over the whole engine. A readahead claims its chunks
    /// only when it gets a slot, so a demand read meanwhile fetches its own chunk at once,
    /// sharing the link with at most this many readahead GETs rather than with a whole
    /// library's worth of them.
    pub readahead_in_flight: usize,
    /// Window readahead of a file larger than [`LazyOptions::readahead_file_max`] (which is
    /// not fetched whole): a demand read also fetches, in the background, this many bytes
    /// after it, in parallel GETs. Like the kernel's readahead, the window doubles (up to
    /// [`LazyOptions::readahead_window_max`]) while reads of the file stay near the previous
    /// one, and falls back to this after a jump. A program mapping a large library or data
    /// file faults its pages in one after another: without it, one round trip per chunk.
    /// `0` turns it off.
    pub readahead_window_min: u64,
    /// Largest window of a large file's readahead.
    pub readahead_window_max: u64,
    /// Prefetch stays below demand: a prefetch GET or stream starts only when no demand
    /// fetch is in flight and none ended within this quiet time (a program's reads come in
    /// chains, one shortly after another).
    pub prefetch_quiet: Duration,
}

impl LazyOptions {
    /// The options a node configuration sets (the demand bound); the rest default.
    pub fn from_config(config: &kof_node_api::config::Config) -> LazyOptions {
        LazyOptions {
            read_timeout: config.demand_timeout,
            ..LazyOptions::default()
        }
    }
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions {
            read_timeout: Duration::from_secs(60),
            demand_concurrency: 16,
            prefetch_concurrency: 4,
            range_reads: true,
            max_demand_request: 8 << 20,
            max_prefetch_request: 4 << 20,
            range_attempts: 3,
            readahead_file_max: 32 << 20,
            readahead_request: 1 << 20,
            readahead_in_flight: 8,
            readahead_window_min: 1 << 20,
            readahead_window_max: 8 << 20,
            prefetch_quiet: Duration::from_millis(30),
        }
    }
}

/// Why the engine could not do what was asked. Every variant names the store path.
#[derive(Debug, Error)]
pub enum LazyError {
    /// No substituter has the path.
    #[error("{path} is in no substituter")]
    NotFound {
        /// The path.
        path: StorePath,
    },
    /// Looking the path up failed.
    #[error("looking up {path}")]
    Lookup {
        /// The path.
        path: StorePath,
        /// The cause.
        source: Box<SubstituteError>,
    },
    /// The bytes did not become available within the read bound.
    #[error("{path}: NAR bytes {start}..{end} ({cause}) not available within {timeout:?}")]
    Timeout {
        /// The path.
        path: StorePath,
        /// First byte.
        start: u64,
        /// End.
        end: u64,
        /// Why they were wanted.
        cause: Cause,
        /// The bound.
        timeout: Duration,
    },
    /// The range lies outside the NAR.
    #[error("{path}: NAR bytes {start}..{end} are outside its NAR of {nar_size} bytes")]
    OutOfRange {
        /// The path.
        path: StorePath,
        /// First byte.
        start: u64,
        /// End.
        end: u64,
        /// NarSize.
        nar_size: u64,
    },
    /// A range GET failed.
    #[error("{path}: fetching NAR bytes {start}..{end}")]
    Range {
        /// The path.
        path: StorePath,
        /// First byte.
        start: u64,
        /// End.
        end: u64,
        /// The cause (names the URL).
        source: Box<CacheError>,
    },
    /// A range body had another length than asked for.
    #[error("{path}: {url} sent {got} bytes for NAR bytes {start}..{end}")]
    RangeLength {
        /// The path.
        path: StorePath,
        /// The NAR URL.
        url: String,
        /// First byte.
        start: u64,
        /// End.
        end: u64,
        /// Bytes received (at the point it stopped).
        got: u64,
    },
    /// A streamed fetch of the whole path failed.
    #[error(transparent)]
    Fetch(Arc<PathError>),
    /// The fetched bytes did not verify (NarHash, NarSize or NAR format): the path is refused.
    #[error("{path}: fetched NAR refused, nothing stored")]
    Refused {
        /// The path.
        path: StorePath,
        /// The store's verdict.
        source: Box<StoreError>,
    },
    /// Writing or reading the partial file failed.
    #[error("{path}: partial file {}", file.display())]
    Partial {
        /// The path.
        path: StorePath,
        /// The partial file.
        file: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The partial file could not be created or grow: its file system is full (`ENOSPC`, or
    /// `EDQUOT` under a quota). The read that needed the bytes fails; the chunks already in
    /// the file stay readable (see the engine's module doc).
    #[error("{path}: partial file {}: file system full", file.display())]
    NoSpace {
        /// The path.
        path: StorePath,
        /// The partial file.
        file: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The store failed.
    #[error("{path}: store")]
    Store {
        /// The path.
        path: StorePath,
        /// The cause.
        source: Box<StoreError>,
    },
    /// Fetching the `.ls` listing failed.
    #[error("{path}: fetching its listing")]
    Listing {
        /// The path.
        path: StorePath,
        /// The cause.
        source: Box<CacheError>,
    },
    /// The stored tree is inconsistent.
    #[error("{path}: stored tree: {reason}")]
    BadTree {
        /// The path.
        path: StorePath,
        /// What is wrong.
        reason: String,
    },
    /// The base name is not a valid store path.
    #[error("invalid store path name {name:?}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        source: kof_nar::store_path::StorePathError,
    },
    /// A task of the engine stopped without a result (it panicked or was cancelled).
    #[error("{path}: a task of the engine stopped without a result")]
    Task {
        /// The path.
        path: StorePath,
        /// The cause.
        source: tokio::task::JoinError,
    },
    /// A range fetch found its path's partial file gone (the path was committed or refused
    /// meanwhile).
    #[error("{path}: the partial file was removed during a fetch")]
    PartialGone {
        /// The path.
        path: StorePath,
    },
    /// Bytes from a cache failed the check against the path's signed index: refused, nothing
    /// of them written or stored.
    #[error("{path}: bytes of {url} from cache {cache} failed verification")]
    Unverified {
        /// The path.
        path: StorePath,
        /// The cache.
        cache: String,
        /// The NAR file's URL.
        url: String,
        /// What did not match.
        source: Box<kof_index::ChunkError>,
    },
    /// The `.ls` listing a view was built from does not match the path's verified NAR.
    #[error("{path}: the listing from cache {cache} does not match its verified NAR (names, types, sizes, modes, symlink targets or offsets differ)")]
    ListingLied {
        /// The path.
        path: StorePath,
        /// The cache that served the listing.
        cache: String,
    },
    /// The same failure, shared by every waiter.
    #[error(transparent)]
    Shared(Arc<LazyError>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use kof_node_api::config::Config;

    /// `demand_timeout_secs` is the engine's read bound (moved here with `LazyOptions` from the
    /// config's tests, whose assertions these are).
    #[test]
    fn the_config_sets_the_read_bound() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::load_from(None, None, &dir.path().join("absent.toml")).unwrap();
        assert_eq!(LazyOptions::from_config(&c).read_timeout, c.demand_timeout);
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "demand_timeout_secs = 7\n").unwrap();
        let c = Config::load_from(Some(&p), None, std::path::Path::new("/nonexistent")).unwrap();
        assert_eq!(
            LazyOptions::from_config(&c).read_timeout,
            std::time::Duration::from_secs(7)
        );
    }
}
