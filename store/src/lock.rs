//! The store's lock file (`<dir>/lock`), which keeps garbage collection away from other users.
//!
//! Every open [`crate::Store`] holds a shared `flock` on it for its whole life. The offline
//! garbage collection ([`crate::Store::gc`]) converts its own lock to an exclusive one, which
//! succeeds only when no other `Store` (in this process or another) has the directory open;
//! otherwise it fails with [`crate::StoreError::Busy`] rather than deleting objects an ingest
//! elsewhere is about to reference. Stale files in `tmp/` are likewise removed only under the
//! exclusive lock: at open, if the lock can be had exclusively for a moment, and by the
//! offline gc; `.tmp-*` files an interrupted object write leaves in a fan-out directory are
//! removed by gc's sweep. The live gc ([`crate::Store::gc_live`]) does not take this lock:
//! it is for the store's one writer, whose readers elsewhere keep their shared locks, and it
//! sweeps only files old enough to belong to no write under way.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::error::StoreError;

pub(crate) struct StoreLock {
    file: File,
    path: PathBuf,
}

impl StoreLock {
    /// Opens the lock file and takes the exclusive lock if no one else holds any lock on it
    /// (returning `true`), else waits for a shared one (returning `false`). The caller must
    /// call [`StoreLock::downgrade`] after its exclusive-only work.
    pub(crate) fn open(dir: &Path) -> Result<(Self, bool), StoreError> {
        let path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::Lock {
                path: path.clone(),
                source,
            })?;
        let lock = StoreLock { file, path };
        let exclusive = lock.try_exclusive()?;
        Ok((lock, exclusive))
    }

    fn err(&self, source: std::io::Error) -> StoreError {
        StoreError::Lock {
            path: self.path.clone(),
            source,
        }
    }

    /// Tries to make this handle's lock exclusive. On failure the handle holds a shared lock
    /// again (Linux may drop the old lock during a failed conversion, so it is retaken).
    pub(crate) fn try_exclusive(&self) -> Result<bool, StoreError> {
        match self.file.try_lock() {
            Ok(()) => Ok(true),
            Err(std::fs::TryLockError::WouldBlock) => {
                self.file.lock_shared().map_err(|e| self.err(e))?;
                Ok(false)
            }
            Err(std::fs::TryLockError::Error(e)) => Err(self.err(e)),
        }
    }

    /// Turns an exclusive lock back into a shared one.
    pub(crate) fn downgrade(&self) -> Result<(), StoreError> {
        self.file.lock_shared().map_err(|e| self.err(e))
    }
}
