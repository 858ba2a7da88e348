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
    /// A write into the store (or an export target) failed because its file system is full
    /// (`ENOSPC`) or the writer's quota is spent (`EDQUOT`). Nothing it was writing became
    /// visible; freeing space and trying again succeeds.
    #[error("writing {}: file system full", path.display())]
    NoSpace {
        /// the file (or directory) being written
        path: PathBuf,
        /// the cause (`ENOSPC` or `EDQUOT`)
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
    /// A commit would make `path` valid while its reference `reference` is neither stored nor
    /// committed with it (Nix's closure rule); nothing was committed.
    #[error("{path} cannot become valid: its reference {reference} is not stored")]
    MissingReference {
        /// the path refused
        path: StorePath,
        /// its first reference that is not valid
        reference: StorePath,
    },
    /// An object a prepared path uses was removed (by gc) between its prepare and its commit;
    /// nothing was committed, and preparing the path again writes the object again.
    #[error("{path}: object {digest} it uses was collected after it was prepared")]
    PreparedObjectGone {
        /// the path
        path: StorePath,
        /// the object no longer stored
        digest: Digest,
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
    /// The error of `op` on `path`: [`StoreError::NoSpace`] when the file system is full,
    /// else [`StoreError::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if is_no_space_io(&source) {
            return StoreError::NoSpace {
                path: path.into(),
                source,
            };
        }
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// This error, with the database's `SQLITE_FULL` made a [`StoreError::NoSpace`] naming the
    /// database file `db` (the SQLite error kept as the `io::Error`'s inner error).
    pub(crate) fn naming_db(self, db: &std::path::Path) -> Self {
        match self {
            StoreError::Db(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) => {
                StoreError::NoSpace {
                    path: db.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::StorageFull, e),
                }
            }
            other => other,
        }
    }

    /// Whether this failure is a full file system: [`StoreError::NoSpace`], or the database's
    /// `SQLITE_FULL` (its transaction rolled back), rather than a fault of the store.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace { .. } => true,
            StoreError::Db(e) => e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            _ => false,
        }
    }
}

/// Whether `e` is `ENOSPC` (no space left on the device) or `EDQUOT` (quota exceeded).
/// (Checked by kind too: a wrapped OS error, as `tempfile` returns, has no raw code.)
pub fn is_no_space_io(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
}

/// Whether `e` or any error in its `source()` chain is a full file system: a
/// [`StoreError`] for which [`StoreError::is_no_space`] holds, or an `io::Error` that is
/// `ENOSPC` or `EDQUOT`. For callers above the store (the lazy engine, the daemon) whose own
/// errors wrap the store's, to tell "free some space" from a fault.
pub fn chain_is_no_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(se) = e.downcast_ref::<StoreError>() {
            if se.is_no_space() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if is_no_space_io(io) {
                return true;
            }
            // An `io::Error` wrapping another error: its `source()` skips the wrapped one.
            if io.get_ref().is_some_and(|inner| chain_is_no_space(inner)) {
                return true;
            }
        }
        if let Some(db) = e.downcast_ref::<rusqlite::Error>() {
            if db.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_full_file_system_is_told_apart_through_wrappers() {
        let enospc = || std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = StoreError::io("writing", "/s/objects/ab/.tmp-x", enospc());
        assert!(
            matches!(&e, StoreError::NoSpace { path, .. } if path == Path::new("/s/objects/ab/.tmp-x"))
        );
        assert_eq!(
            e.to_string(),
            "writing /s/objects/ab/.tmp-x: file system full"
        );
        assert!(e.is_no_space() && chain_is_no_space(&e));
        // A quota spent is a full file system too.
        let e = StoreError::io(
            "writing",
            "/s/x",
            std::io::Error::from_raw_os_error(libc::EDQUOT),
        );
        assert!(e.is_no_space());
        // Other I/O errors are not.
        let e = StoreError::io(
            "writing",
            "/s/x",
            std::io::Error::from_raw_os_error(libc::EIO),
        );
        assert!(matches!(e, StoreError::Io { .. }) && !chain_is_no_space(&e));
        // Wrapped in an io::Error (as a FUSE content source returns it), or as a cause.
        let wrapped = std::io::Error::other(StoreError::io("writing", "/s/x", enospc()));
        assert!(chain_is_no_space(&wrapped));
        #[derive(Debug, thiserror::Error)]
        #[error("above the store")]
        struct Above(#[source] StoreError);
        assert!(chain_is_no_space(&Above(StoreError::io(
            "w",
            "/s/x",
            enospc()
        ))));
        // SQLite's SQLITE_FULL, and it named as the database file.
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        let e = StoreError::Db(full);
        assert!(e.is_no_space() && chain_is_no_space(&e));
        let e = e.naming_db(Path::new("/s/db.sqlite"));
        assert!(
            matches!(&e, StoreError::NoSpace { path, .. } if path == Path::new("/s/db.sqlite"))
        );
        assert!(chain_is_no_space(&e));
    }
}
