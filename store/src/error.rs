//! The store's error type: one variant per cause, each keeping its source.

use std::path::PathBuf;

use kof_nar::nar::NarError;
use kof_nar::{NixHash, StorePath};

use crate::objects::Digest;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory of the store (or an export target) could not be read or written.
    #[error("{op} {}", path.display())]
    Io {
        /// what was being done
        op: &'static str,
        /// the file or directory
        path: PathBuf,
        /// the cause
        source: std::io::Error,
    },
    /// The store's lock file could not be opened or locked.
    #[error("locking {}", path.display())]
    Lock {
        /// the lock file
        path: PathBuf,
        /// the cause
        source: std::io::Error,
    },
    /// Garbage collection needs the store to itself, and another `Store` (in this or another
    /// process) has it open.
    #[error("the store at {} is open elsewhere; gc needs exclusive access", dir.display())]
    Busy {
        /// the store directory
        dir: PathBuf,
    },
    /// An ingest's object writer stopped (its own error is reported instead where known).
    #[error("the object writer stopped")]
    WriterStopped,
    /// The SQLite metadata database failed.
    #[error("store database")]
    Db(#[from] rusqlite::Error),
    /// The database was written by a newer kof with a schema this one does not know.
    #[error("store database schema version {found} is newer than supported {supported}")]
    SchemaTooNew {
        /// `user_version` found
        found: i64,
        /// the newest this build knows
        supported: i64,
    },
    /// A value read back from the database is not what the store wrote (hand-edited or corrupt).
    #[error("corrupt store metadata: {0}")]
    CorruptMetadata(String),
    /// The NAR stream of `path` could not be read or is malformed.
    #[error("NAR of {path}")]
    Nar {
        /// the store path being ingested
        path: StorePath,
        /// the cause
        source: NarError,
    },
    /// The NAR's sha256 is not the narinfo's NarHash.
    #[error("NAR of {path}: hash mismatch, narinfo says {expected}, got {got}")]
    NarHashMismatch {
        /// the store path
        path: StorePath,
        /// NarHash from the narinfo
        expected: NixHash,
        /// hash of the bytes received
        got: NixHash,
    },
    /// The NAR's length is not the narinfo's NarSize.
    #[error("NAR of {path}: size mismatch, narinfo says {expected} bytes, got {got}")]
    NarSizeMismatch {
        /// the store path
        path: StorePath,
        /// NarSize from the narinfo
        expected: u64,
        /// bytes received
        got: u64,
    },
    /// A NAR rebuilt from the store does not hash to the stored NarHash (the store is corrupt).
    #[error("NAR rebuilt for {path} hashes to {got}, stored NarHash is {expected}: store corrupt")]
    DumpMismatch {
        /// the store path
        path: StorePath,
        /// stored NarHash
        expected: NixHash,
        /// hash of what was written
        got: NixHash,
    },
    /// The store path is not in the store.
    #[error("{0} is not in the store")]
    PathNotFound(StorePath),
    /// No such environment generation is recorded.
    #[error("environment {owner}/{name} generation {generation} is not recorded")]
    EnvironmentNotFound {
        /// owner
        owner: String,
        /// name
        name: String,
        /// generation
        generation: u64,
    },
    /// An object's file is missing or unreadable.
    #[error("object {digest}")]
    ObjectUnreadable {
        /// the object
        digest: Digest,
        /// the cause
        source: std::io::Error,
    },
    /// A database row names a store path that does not parse (hand-edited or corrupt).
    #[error("corrupt store metadata: {what} {value:?}")]
    CorruptStorePath {
        /// which row or column held it
        what: &'static str,
        /// the text found
        value: String,
        /// why it is not a store path
        source: kof_nar::store_path::StorePathError,
    },
    /// A chunked file's chunks could not be read back and reassembled.
    #[error("corrupt store metadata: chunked file {digest} does not reassemble")]
    ChunkedFile {
        /// the file's content digest
        digest: Digest,
        /// the cause
        source: std::io::Error,
    },
    /// An object's stored bytes could not be decoded back (a damaged or truncated file).
    #[error("object {digest} is corrupt")]
    ObjectUndecodable {
        /// the object
        digest: Digest,
        /// the cause
        source: std::io::Error,
    },
    /// An object's bytes are not what its digest and size say.
    #[error("object {digest} is corrupt: {reason}")]
    ObjectCorrupt {
        /// the object
        digest: Digest,
        /// what is wrong
        reason: String,
        /// The decoder's error, when one found it.
        #[source]
        source: Option<std::io::Error>,
    },
    /// A read past the end of a file.
    #[error("read of {len} bytes at offset {offset} past the end of a {size}-byte file")]
    RangeOutOfBounds {
        /// requested offset
        offset: u64,
        /// requested length
        len: u64,
        /// file size
        size: u64,
    },
    /// The export target already exists.
    #[error("export target {} already exists", .0.display())]
    ExportTargetExists(PathBuf),
    /// An environment record could not be (de)serialised.
    #[error("environment record JSON")]
    Json(#[from] serde_json::Error),
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
